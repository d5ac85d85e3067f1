//! The per-user meter actor on virtual time with the in-memory store.

use std::sync::Arc;
use std::time::Duration;

use voicegate_engine::meter::{
    Meter, MeterConfig, RecordSpeech, RecordStatus, SpeechAmount, SpeechSource, UsageTotals,
};
use voicegate_engine::store::{MemoryStore, Store, StoreTime};
use voicegate_engine::time::TokioClock;
use voicegate_engine::time::{MS_PER_DAY, MS_PER_HOUR, MS_PER_MINUTE};

/// 2026-11-27T12:00:00Z
const T0: u64 = 1_795_737_600_000 + 12 * MS_PER_HOUR;
const RETENTION: u64 = 8 * MS_PER_DAY;

fn config() -> MeterConfig {
    MeterConfig {
        shards: 0,
        ..MeterConfig::default()
    }
}

fn start(store: Arc<MemoryStore>, config: MeterConfig) -> (Meter, Arc<TokioClock>) {
    tokio::time::pause();
    let clock = TokioClock::new(T0);
    let meter = Meter::start(config, store as Arc<dyn Store>, clock.clone());
    (meter, clock)
}

fn ms(uid: &str, ms: u64, start: u64, source: SpeechSource) -> RecordSpeech {
    RecordSpeech::new(uid, SpeechAmount::Ms(ms), start, source)
}

fn daily(t: &UsageTotals) -> (u64, u64, u64) {
    (
        t.rolling.daily_ms,
        t.rolling.three_day_ms,
        t.rolling.weekly_ms,
    )
}

async fn sleep(d: Duration) {
    tokio::time::sleep(d).await;
}

#[actix::test]
async fn speech_lands_in_the_minute_of_the_audio_and_counts_per_window() {
    let store = Arc::new(MemoryStore::new());
    let (meter, _) = start(store, config());
    meter
        .record(ms("u", 1_000, T0 - MS_PER_HOUR, SpeechSource::Realtime))
        .await;
    meter
        .record(ms("u", 2_000, T0 - 2 * MS_PER_DAY, SpeechSource::Sync))
        .await;
    meter
        .record(ms("u", 3_000, T0 - 5 * MS_PER_DAY, SpeechSource::Sync))
        .await;
    let t = meter.totals("u").await.unwrap();
    assert!(t.known);
    assert_eq!(daily(&t), (1_000, 3_000, 6_000));
    assert_eq!(t.month_ms, 6_000, "all charged in the month of arrival");
}

#[actix::test]
async fn realtime_and_sync_share_one_pool() {
    let store = Arc::new(MemoryStore::new());
    let (meter, _) = start(store, config());
    meter
        .record(ms("u", 10_000, T0, SpeechSource::Realtime))
        .await;
    let out = meter
        .record_and_read(ms("u", 20_000, T0, SpeechSource::Sync))
        .await
        .unwrap();
    assert_eq!(out.status, RecordStatus::Recorded);
    assert_eq!(daily(&out.totals), (30_000, 30_000, 30_000));
}

#[actix::test]
async fn zero_speech_is_a_no_op() {
    let store = Arc::new(MemoryStore::new());
    let (meter, _) = start(store.clone(), config());
    let out = meter
        .record_and_read(ms("u", 0, T0, SpeechSource::Sync))
        .await
        .unwrap();
    assert_eq!(out.status, RecordStatus::Empty);
    assert_eq!(daily(&out.totals), (0, 0, 0));
    sleep(Duration::from_secs(3)).await;
    assert_eq!(store.apply_calls(), 0);
}

#[actix::test]
async fn recorded_speech_reaches_the_store_within_one_flush_interval() {
    let store = Arc::new(MemoryStore::new());
    let (meter, clock) = start(store.clone(), config());
    meter
        .record(ms("u", 5_000, T0, SpeechSource::Realtime))
        .await;
    meter
        .record(ms("u", 7_000, T0 - 3 * MS_PER_HOUR, SpeechSource::Sync))
        .await;
    sleep(Duration::from_millis(1_100)).await;
    let at = StoreTime {
        now_ms: voicegate_engine::time::Clock::now_ms(&*clock),
        retention_ms: RETENTION,
        keys_retention_ms: RETENTION,
    };
    let snap = store.snapshot("u", at);
    assert_eq!(snap.buckets.iter().map(|b| b.1).sum::<u64>(), 12_000);
    assert_eq!(snap.months.iter().map(|m| m.1).sum::<u64>(), 12_000);
    assert_eq!(
        store.apply_calls(),
        1,
        "one batch for the user in one flush"
    );
    assert_eq!(meter.pending_speech_ms(), 0);
}

#[actix::test]
async fn an_idle_actor_is_passivated_after_15_minutes_and_rehydrates_from_the_store() {
    let store = Arc::new(MemoryStore::new());
    let (meter, _) = start(store.clone(), config());
    meter
        .record(ms("u", 4_000, T0, SpeechSource::Realtime))
        .await;
    sleep(Duration::from_secs(5)).await;
    assert_eq!(meter.live_actors(), 1);
    sleep(Duration::from_secs(16 * 60)).await;
    assert_eq!(meter.live_actors(), 0, "passivated");
    let t = meter.totals("u").await.unwrap();
    assert!(t.known);
    assert_eq!(t.rolling.daily_ms, 4_000, "rehydrated");
    assert_eq!(meter.live_actors(), 1);
}

#[actix::test]
async fn a_failed_hydration_answers_unknown_totals_then_recovers() {
    let store = Arc::new(MemoryStore::new());
    {
        // Speech already in the store from an earlier incarnation.
        let (meter, _) = start(store.clone(), config());
        meter.record(ms("u", 9_000, T0, SpeechSource::Sync)).await;
        meter.flush_user("u").await.unwrap();
        meter.shutdown(Duration::from_secs(5)).await;
    }
    store.set_unavailable(true);
    let meter = Meter::start(
        config(),
        store.clone() as Arc<dyn Store>,
        TokioClock::new(T0),
    );
    let out = meter
        .record_and_read(ms("u", 1_000, T0, SpeechSource::Realtime))
        .await
        .unwrap();
    assert_eq!(
        out.status,
        RecordStatus::Recorded,
        "recording never waits for the store"
    );
    assert!(!out.totals.known);
    assert_eq!(out.totals.rolling.daily_ms, 1_000, "own pending only");
    sleep(Duration::from_secs(3)).await;
    assert!(!meter.totals("u").await.unwrap().known);
    store.set_unavailable(false);
    sleep(Duration::from_secs(6)).await;
    let t = meter.totals("u").await.unwrap();
    assert!(t.known);
    assert_eq!(t.rolling.daily_ms, 10_000);
}

#[actix::test]
async fn a_30s_store_outage_keeps_every_ms_pending_and_flushes_it_after() {
    let store = Arc::new(MemoryStore::new());
    let (meter, clock) = start(store.clone(), config());
    meter
        .record(ms("u1", 1_000, T0, SpeechSource::Realtime))
        .await;
    sleep(Duration::from_millis(1_500)).await;
    store.set_unavailable(true);
    let mut expected = 1_000;
    for i in 0..30u64 {
        for uid in ["u1", "u2", "u3"] {
            meter
                .record(ms(
                    uid,
                    500 + i,
                    voicegate_engine::time::Clock::now_ms(&*clock),
                    SpeechSource::Realtime,
                ))
                .await;
            expected += 500 + i;
        }
        sleep(Duration::from_secs(1)).await;
    }
    assert_eq!(
        meter.pending_speech_ms(),
        expected - 1_000,
        "the gauge shows what is pending"
    );
    store.set_unavailable(false);
    sleep(Duration::from_secs(8)).await;
    assert_eq!(meter.pending_speech_ms(), 0);
    let at = StoreTime {
        now_ms: voicegate_engine::time::Clock::now_ms(&*clock),
        retention_ms: RETENTION,
        keys_retention_ms: RETENTION,
    };
    let total: u64 = ["u1", "u2", "u3"]
        .iter()
        .map(|u| {
            store
                .snapshot(u, at)
                .buckets
                .iter()
                .map(|b| b.1)
                .sum::<u64>()
        })
        .sum();
    assert_eq!(total, expected);
}

#[actix::test]
async fn the_same_idempotency_key_never_meters_twice() {
    let store = Arc::new(MemoryStore::new());
    let (meter, _) = start(store.clone(), config());
    let rec =
        ms("u", 6_000, T0 - MS_PER_HOUR, SpeechSource::Sync).with_idempotency_key("sha256:abc");
    assert_eq!(
        meter.record_and_read(rec.clone()).await.unwrap().status,
        RecordStatus::Recorded
    );
    assert_eq!(
        meter.record_and_read(rec.clone()).await.unwrap().status,
        RecordStatus::Duplicate
    );
    meter.flush_user("u").await.unwrap();
    meter.passivate_user("u");
    sleep(Duration::from_secs(2)).await;
    assert_eq!(meter.live_actors(), 0);
    let out = meter.record_and_read(rec).await.unwrap();
    assert_eq!(
        out.status,
        RecordStatus::Duplicate,
        "remembered across incarnations"
    );
    assert_eq!(out.totals.rolling.daily_ms, 6_000);
}

#[actix::test]
async fn keys_expire_after_their_own_longer_retention() {
    let store = Arc::new(MemoryStore::new());
    let cfg = config();
    let keys_retention = cfg.keys_retention.as_millis() as u64;
    assert!(keys_retention > RETENTION, "{keys_retention}");
    let (meter, _) = start(store.clone(), cfg);
    let rec = ms("u", 1_000, T0, SpeechSource::Sync).with_idempotency_key("k");
    meter.record(rec.clone()).await;
    meter.flush_user("u").await.unwrap();
    // Past the buckets' retention the key is still known (a backdated file uploaded again)...
    sleep(Duration::from_millis(RETENTION + MS_PER_MINUTE)).await;
    assert_eq!(
        meter.record_and_read(rec.clone()).await.unwrap().status,
        RecordStatus::Duplicate
    );
    // ...and forgotten after its own.
    sleep(Duration::from_millis(keys_retention - RETENTION)).await;
    assert_eq!(
        meter.record_and_read(rec).await.unwrap().status,
        RecordStatus::Recorded
    );
}

#[actix::test]
async fn a_full_pending_buffer_drops_and_says_so() {
    let store = Arc::new(MemoryStore::new());
    store.set_unavailable(true);
    let (meter, _) = start(
        store.clone(),
        MeterConfig {
            max_pending_per_user: 3,
            ..config()
        },
    );
    let mut statuses = Vec::new();
    for i in 0..5 {
        let rec = ms("u", 1_000, T0, SpeechSource::Sync).with_idempotency_key(format!("k{i}"));
        statuses.push(meter.record_and_read(rec).await.unwrap().status);
    }
    assert_eq!(&statuses[..3], &[RecordStatus::Recorded; 3]);
    assert_eq!(&statuses[3..], &[RecordStatus::Dropped; 2]);
}

#[actix::test]
async fn two_writers_see_each_others_speech_after_a_refresh() {
    let store = Arc::new(MemoryStore::new());
    let (a, _) = start(store.clone(), config());
    let b = Meter::start(
        config(),
        store.clone() as Arc<dyn Store>,
        TokioClock::new(T0),
    );
    a.record(ms("u", 1_000, T0, SpeechSource::Realtime)).await;
    b.record(ms("u", 2_000, T0, SpeechSource::Sync)).await;
    a.flush_user("u").await.unwrap();
    b.flush_user("u").await.unwrap();
    assert_eq!(
        a.totals("u").await.unwrap().rolling.daily_ms,
        1_000,
        "own view until refreshed"
    );
    sleep(Duration::from_secs(31)).await;
    a.totals("u").await.unwrap();
    sleep(Duration::from_secs(11)).await;
    assert_eq!(
        a.totals("u").await.unwrap().rolling.daily_ms,
        3_000,
        "refreshed every 30 s while active"
    );
    b.refresh_user("u").await.unwrap();
    assert_eq!(b.totals("u").await.unwrap().rolling.daily_ms, 3_000);
}

#[actix::test]
async fn month_usage_is_charged_in_the_month_of_arrival() {
    let store = Arc::new(MemoryStore::new());
    tokio::time::pause();
    // 2026-11-30T23:59:00Z
    let end_of_november =
        1_795_737_600_000 + 3 * MS_PER_DAY + 23 * MS_PER_HOUR + 59 * MS_PER_MINUTE;
    let meter = Meter::start(
        config(),
        store as Arc<dyn Store>,
        TokioClock::new(end_of_november),
    );
    meter
        .record(ms(
            "u",
            5_000,
            end_of_november - 40 * MS_PER_DAY,
            SpeechSource::Sync,
        ))
        .await;
    let t = meter.totals("u").await.unwrap();
    assert_eq!((t.month, t.month_ms), (202611, 5_000));
    assert_eq!(
        t.rolling.weekly_ms, 5_000,
        "backdated speech clamps into the oldest minute of the week"
    );
    sleep(Duration::from_secs(61)).await;
    let t = meter.totals("u").await.unwrap();
    assert_eq!((t.month, t.month_ms), (202612, 0));
    assert_eq!(t.rolling.weekly_ms, 0, "and slides out of the week with it");
}

#[actix::test]
async fn shutdown_flushes_every_actor_and_reports_it() {
    let store = Arc::new(MemoryStore::new());
    let (meter, _) = start(
        store.clone(),
        MeterConfig {
            flush_interval: Duration::from_secs(3600),
            ..config()
        },
    );
    for i in 0..50 {
        meter
            .record(ms(&format!("u{i}"), 100 + i, T0, SpeechSource::Realtime))
            .await;
    }
    meter.totals("u49").await.unwrap();
    let report = meter.shutdown(Duration::from_secs(10)).await;
    assert_eq!(
        report.speech_ms_flushed,
        (0..50).map(|i| 100 + i).sum::<u64>()
    );
    assert_eq!((report.users_left, report.pending_ms_left), (0, 0));
    assert_eq!(store.apply_calls(), 50);
}

/// Records every batch the store is asked to apply (and whether it was up at the time).
struct Spy {
    inner: MemoryStore,
    seen: std::sync::Mutex<Vec<(u64, u64, bool)>>,
}

impl Store for Spy {
    fn load<'a>(
        &'a self,
        uid: &'a str,
        writer: voicegate_engine::store::WriterId,
        at: StoreTime,
    ) -> futures_util::future::BoxFuture<
        'a,
        Result<voicegate_engine::store::UserSnapshot, voicegate_engine::store::StoreError>,
    > {
        self.inner.load(uid, writer, at)
    }

    fn apply<'a>(
        &'a self,
        batches: &'a [voicegate_engine::store::Batch],
        at: StoreTime,
    ) -> futures_util::future::BoxFuture<
        'a,
        Result<voicegate_engine::store::ApplyResults, voicegate_engine::store::StoreError>,
    > {
        let fut = self.inner.apply(batches, at);
        let seen: Vec<(u64, u64)> = batches.iter().map(|b| (b.seq, b.speech_ms())).collect();
        Box::pin(async move {
            let result = fut.await;
            let up = result.is_ok();
            self.seen
                .lock()
                .unwrap()
                .extend(seen.into_iter().map(|(seq, ms)| (seq, ms, up)));
            result
        })
    }

    fn kind(&self) -> &'static str {
        "spy"
    }
}

#[actix::test]
async fn a_retried_batch_is_resent_unchanged_and_newer_speech_waits_for_the_next_sequence() {
    tokio::time::pause();
    let spy = Arc::new(Spy {
        inner: MemoryStore::new(),
        seen: Default::default(),
    });
    let meter = Meter::start(config(), spy.clone() as Arc<dyn Store>, TokioClock::new(T0));
    meter.totals("u").await.unwrap();
    spy.inner.set_unavailable(true);
    meter
        .record(ms("u", 1_000, T0, SpeechSource::Realtime))
        .await;
    sleep(Duration::from_millis(1_100)).await; // batch 1 fails
    meter
        .record(ms("u", 2_000, T0, SpeechSource::Realtime))
        .await;
    sleep(Duration::from_secs(3)).await; // batch 1 retried, still failing
    spy.inner.set_unavailable(false);
    sleep(Duration::from_secs(8)).await;
    let seen = spy.seen.lock().unwrap().clone();
    let ok: Vec<(u64, u64)> = seen.iter().filter(|s| s.2).map(|s| (s.0, s.1)).collect();
    assert_eq!(
        ok,
        vec![(1, 1_000), (2, 2_000)],
        "batch 1 unchanged, then batch 2: {seen:?}"
    );
    assert!(
        seen.iter()
            .filter(|s| !s.2)
            .all(|s| (s.0, s.1) == (1, 1_000)),
        "{seen:?}"
    );
    assert!(
        seen.iter().filter(|s| !s.2).count() >= 2,
        "retried: {seen:?}"
    );
}

#[actix::test]
async fn the_pending_bound_over_all_users_drops_and_says_so() {
    let store = Arc::new(MemoryStore::new());
    store.set_unavailable(true);
    let (meter, _) = start(
        store.clone(),
        MeterConfig {
            max_pending_total: 4,
            ..config()
        },
    );
    let mut statuses = Vec::new();
    for i in 0..6 {
        let rec = ms(&format!("u{i}"), 1_000, T0, SpeechSource::Sync).with_idempotency_key("file");
        statuses.push(meter.record_and_read(rec).await.unwrap().status);
    }
    assert_eq!(&statuses[..4], &[RecordStatus::Recorded; 4]);
    assert_eq!(&statuses[4..], &[RecordStatus::Dropped; 2]);
    assert_eq!(meter.pending_speech_ms(), 4_000);
}

//! The reference's metering behaviours (omi-behaviour §7 B32–B37, G65–G66) against the engine with a
//! real Redis: every total is read back from a fresh actor hydrated from Redis.

use std::sync::Arc;
use std::time::Duration;

use voicegate_engine::meter::{
    Meter, MeterConfig, RecordSpeech, RecordStatus, SpeechAmount, SpeechSource, UsageTotals,
};
use voicegate_engine::policy::{CapKind, SoftCaps};
use voicegate_engine::store::test_redis::RedisServer;
use voicegate_engine::store::{RedisStore, RedisStoreConfig, Store};
use voicegate_engine::time::Clock;
use voicegate_engine::time::SystemClock;

struct Rig {
    _server: RedisServer,
    meter: Meter,
}

fn rig() -> Rig {
    let server = RedisServer::start().expect("redis-server starts");
    let store: Arc<dyn Store> =
        Arc::new(RedisStore::new(&RedisStoreConfig::new(server.url())).expect("store"));
    let config = MeterConfig {
        shards: 2,
        flush_interval: Duration::from_millis(50),
        ..MeterConfig::default()
    };
    Rig {
        _server: server,
        meter: Meter::start(config, store, Arc::new(SystemClock)),
    }
}

fn now() -> u64 {
    SystemClock.now_ms()
}

fn rec(uid: &str, ms: u64, source: SpeechSource) -> RecordSpeech {
    RecordSpeech::new(uid, SpeechAmount::Ms(ms), now(), source)
}

/// Flushes the user, stops its actor, and reads the totals from a new actor hydrated from Redis.
async fn from_redis(meter: &Meter, uid: &str) -> UsageTotals {
    meter.flush_user(uid).await.expect("flush");
    let live = meter.live_actors();
    meter.passivate_user(uid);
    for _ in 0..500 {
        if meter.live_actors() < live {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(meter.live_actors(), live - 1, "passivated");
    let t = meter.totals(uid).await.expect("totals");
    assert!(t.known, "hydrated from Redis");
    t
}

fn windows(t: &UsageTotals) -> (u64, u64, u64) {
    (
        t.rolling.daily_ms,
        t.rolling.three_day_ms,
        t.rolling.weekly_ms,
    )
}

fn caps(daily: u64, three_day: u64, weekly: u64) -> SoftCaps {
    SoftCaps {
        daily_ms: daily,
        three_day_ms: three_day,
        weekly_ms: weekly,
    }
}

#[actix::test]
async fn b32_sync_speech_counts_in_every_window() {
    let r = rig();
    r.meter
        .record(rec("user1", 30_000, SpeechSource::Sync))
        .await;
    assert_eq!(
        windows(&from_redis(&r.meter, "user1").await),
        (30_000, 30_000, 30_000)
    );
}

#[actix::test]
async fn b33_realtime_and_sync_share_one_pool() {
    let r = rig();
    r.meter
        .record(rec("user1", 10_000, SpeechSource::Realtime))
        .await;
    r.meter
        .record(rec("user1", 20_000, SpeechSource::Sync))
        .await;
    assert_eq!(from_redis(&r.meter, "user1").await.rolling.daily_ms, 30_000);
}

#[actix::test]
async fn b34_a_little_speech_triggers_no_cap() {
    let r = rig();
    r.meter
        .record(rec("user1", 1_000, SpeechSource::Sync))
        .await;
    let t = from_redis(&r.meter, "user1").await;
    assert!(SoftCaps::default().triggered(&t.rolling).is_empty());
}

#[actix::test]
async fn b35_over_a_5000_ms_daily_cap_the_first_trigger_is_daily() {
    let r = rig();
    let out = r
        .meter
        .record_and_read(rec("user1", 6_000, SpeechSource::Sync))
        .await
        .unwrap();
    let cap = SoftCaps {
        daily_ms: 5_000,
        ..SoftCaps::default()
    };
    assert_eq!(
        cap.triggered(&out.totals.rolling).first().map(|t| t.cap),
        Some(CapKind::Daily)
    );
    let t = from_redis(&r.meter, "user1").await;
    assert_eq!(
        cap.triggered(&t.rolling).first().map(|t| t.cap),
        Some(CapKind::Daily)
    );
}

#[actix::test]
async fn b36_5000_ms_reads_back_and_triggers_nothing_from_the_precomputed_totals() {
    let r = rig();
    let out = r
        .meter
        .record_and_read(rec("user1", 5_000, SpeechSource::Sync))
        .await
        .unwrap();
    assert!(
        SoftCaps::default()
            .triggered(&out.totals.rolling)
            .is_empty(),
        "no store read needed"
    );
    assert_eq!(from_redis(&r.meter, "user1").await.rolling.daily_ms, 5_000);
}

#[actix::test]
async fn b37_three_raw_30s_runs_meter_90_s() {
    let r = rig();
    let file_start = now() - 10 * 60_000;
    for offset_s in [0u64, 150, 300] {
        r.meter
            .record(RecordSpeech::new(
                "user1",
                SpeechAmount::Ms(30_000),
                file_start + offset_s * 1000,
                SpeechSource::Sync,
            ))
            .await;
    }
    let t = from_redis(&r.meter, "user1").await;
    assert_eq!(t.rolling.daily_ms, 90_000);
    assert!(SoftCaps::default().triggered(&t.rolling).is_empty());
}

#[actix::test]
async fn g65_records_accumulate_and_zero_is_ignored() {
    let r = rig();
    r.meter
        .record(rec("a", 5_000, SpeechSource::Realtime))
        .await;
    assert_eq!(
        windows(&from_redis(&r.meter, "a").await),
        (5_000, 5_000, 5_000)
    );
    r.meter
        .record(rec("b", 3_000, SpeechSource::Realtime))
        .await;
    r.meter
        .record(rec("b", 4_000, SpeechSource::Realtime))
        .await;
    assert_eq!(
        windows(&from_redis(&r.meter, "b").await),
        (7_000, 7_000, 7_000)
    );
    let out = r
        .meter
        .record_and_read(rec("c", 0, SpeechSource::Realtime))
        .await
        .unwrap();
    assert_eq!(out.status, RecordStatus::Empty);
    assert_eq!(windows(&from_redis(&r.meter, "c").await), (0, 0, 0));
}

#[actix::test]
async fn g66_caps_of_10_20_30_s_trigger_strictly_above() {
    let r = rig();
    let caps = caps(10_000, 20_000, 30_000);
    let triggered = |t: &UsageTotals| {
        caps.triggered(&t.rolling)
            .iter()
            .map(|t| t.cap)
            .collect::<Vec<_>>()
    };
    for (uid, ms, expected) in [
        ("nine", 9_000, vec![]),
        ("eleven", 11_000, vec![CapKind::Daily]),
        (
            "thirty-one",
            31_000,
            vec![CapKind::Daily, CapKind::ThreeDay, CapKind::Weekly],
        ),
        ("exactly-ten", 10_000, vec![]),
    ] {
        r.meter.record(rec(uid, ms, SpeechSource::Sync)).await;
        assert_eq!(
            triggered(&from_redis(&r.meter, uid).await),
            expected,
            "{uid}"
        );
    }
}

//! Replay oracle: seeded event logs run against two meters (two writers) sharing one real, durable
//! Redis, with injected faults, a Redis restart, passivation and re-hydration; the final Redis state and
//! every actor's totals must equal a pure reference model exactly (zero ms lost, zero doubled). The same
//! logs run against a real Redis Cluster (3 masters, 3 replicas, `loadtest/redis-cluster.sh`) through the
//! store's cluster client, where a case's restart is a manual failover instead (a replica takes its
//! master's slots over mid-case: the writers follow MOVED).
//!
//! `cargo test -p voicegate-engine --test integration meter_oracle::` runs 200 cases on each.
//! `VOICEGATE_ORACLE_CASES=10000 cargo test -p voicegate-engine --release --test integration meter_oracle::` runs 10,000
//! on each (`…meter_oracle::replayed_event_logs_meter_exactly_once_on_a_cluster` for the cluster alone);
//! `VOICEGATE_ORACLE_SEED=<n>` replays from another seed (a failure prints its case seed).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use voicegate_engine::meter::{
    Meter, MeterConfig, RecordSpeech, RecordStatus, SpeechAmount, SpeechSource, UsageTotals,
};
use voicegate_engine::store::test_redis::{RedisCluster, RedisServer};
use voicegate_engine::store::testing::FaultyStore;
use voicegate_engine::store::{RedisStore, RedisStoreConfig, Store, StoreTime, WriterId};
use voicegate_engine::time::{Clock, ManualClock};
use voicegate_engine::time::{MS_PER_DAY, MS_PER_HOUR, MS_PER_MINUTE};

/// 2026-11-03T00:00:00Z: runs stay inside one month (month boundaries are covered by `meter_actor`).
const T0: u64 = 1_793_664_000_000;
const RETENTION: u64 = 8 * MS_PER_DAY;
const WEEK: u64 = 7 * MS_PER_DAY;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn chance(&mut self, pct: u64) -> bool {
        self.below(100) < pct
    }
}

/// The pure reference: what must be metered, computed independently of the engine.
#[derive(Default)]
struct Model {
    /// uid → minute → ms
    buckets: BTreeMap<String, BTreeMap<u64, u64>>,
    /// uid → month total (all runs stay in one month)
    month: BTreeMap<String, u64>,
    keys: BTreeMap<String, BTreeSet<String>>,
}

impl Model {
    /// Reference placement: clamp the start into [oldest minute of the week, now], split at minute
    /// boundaries, anything past now's minute lands in now's minute.
    fn record(&mut self, uid: &str, ms: u64, start: u64, now: u64, key: Option<&str>) -> bool {
        if let Some(key) = key
            && !self.keys.entry(uid.into()).or_default().insert(key.into())
        {
            return false;
        }
        let oldest_minute = (now - WEEK).div_ceil(MS_PER_MINUTE);
        let now_minute = now / MS_PER_MINUTE;
        let start = start.clamp(oldest_minute * MS_PER_MINUTE, now);
        let end = start + ms;
        let buckets = self.buckets.entry(uid.into()).or_default();
        let mut minute = start / MS_PER_MINUTE;
        while minute < now_minute {
            let lo = start.max(minute * MS_PER_MINUTE);
            let hi = end.min((minute + 1) * MS_PER_MINUTE);
            if hi > lo {
                *buckets.entry(minute).or_default() += hi - lo;
            }
            minute += 1;
        }
        let rest = end.saturating_sub(start.max(now_minute * MS_PER_MINUTE));
        if rest > 0 {
            *buckets.entry(now_minute).or_default() += rest;
        }
        *self.month.entry(uid.into()).or_default() += ms;
        true
    }

    fn kept_buckets(&self, uid: &str, now: u64) -> Vec<(u32, u64)> {
        let first = (now - RETENTION).div_ceil(MS_PER_MINUTE);
        self.buckets.get(uid).map_or_else(Vec::new, |b| {
            b.range(first..).map(|(&m, &ms)| (m as u32, ms)).collect()
        })
    }

    fn totals(&self, uid: &str, now: u64) -> (u64, u64, u64, u64) {
        let sum = |window: u64| {
            let first = (now - window).div_ceil(MS_PER_MINUTE);
            self.buckets
                .get(uid)
                .map_or(0, |b| b.range(first..).map(|(_, &ms)| ms).sum())
        };
        (
            sum(MS_PER_DAY),
            sum(3 * MS_PER_DAY),
            sum(WEEK),
            self.month.get(uid).copied().unwrap_or(0),
        )
    }
}

fn config() -> MeterConfig {
    MeterConfig {
        shards: 0,
        flush_interval: Duration::from_secs(3600),
        refresh_interval: Duration::from_secs(3600),
        idle_passivation: Duration::from_secs(3600),
        store_timeout: Duration::from_secs(5),
        hydrate_timeout: Duration::from_secs(5),
        ..MeterConfig::default()
    }
}

fn tuple(t: &UsageTotals) -> (u64, u64, u64, u64) {
    (
        t.rolling.daily_ms,
        t.rolling.three_day_ms,
        t.rolling.weekly_ms,
        t.month_ms,
    )
}

struct Case {
    seed: u64,
    users: usize,
    events: usize,
}

/// What the case runs on.
enum Backend<'a> {
    /// One durable redis-server; a case's disruption restarts it.
    Single(&'a mut RedisServer),
    /// A 3-master cluster; a case's disruption is a manual failover.
    Cluster(&'a RedisCluster),
}

impl Backend<'_> {
    fn reset(&mut self) -> RedisStore {
        match self {
            Backend::Single(server) => {
                server.command(&["FLUSHALL"]).expect("flushall");
                // Compact the AOF so a restart replays only this case, not every earlier one.
                let _ = server.command(&["BGREWRITEAOF"]);
                RedisStore::new(&RedisStoreConfig::new(server.url())).expect("store")
            }
            Backend::Cluster(cluster) => {
                cluster.flush_all().expect("flushall on every master");
                RedisStore::new(&RedisStoreConfig::cluster(cluster.urls())).expect("cluster store")
            }
        }
    }

    fn disrupt(&mut self, seed: u64) {
        match self {
            Backend::Single(server) => server.restart().expect("redis restarts"),
            Backend::Cluster(cluster) => {
                cluster
                    .failover(seed as usize)
                    .expect("a replica takes over");
            }
        }
    }
}

/// Runs one case; returns (ms metered, batches applied whose reply was lost, disrupted) for the summary.
async fn run_case(backend: &mut Backend<'_>, case: &Case) -> (u64, u64, bool) {
    let mut rng = Rng(case.seed);
    let redis = backend.reset();
    let faulty = Arc::new(FaultyStore::new(redis.clone(), case.seed));
    faulty.set_fault_rates(10, 10, 5);
    let clock = ManualClock::new(T0 + rng.below(MS_PER_DAY));
    let store: Arc<dyn Store> = faulty.clone();
    let writers = [
        Meter::start(config(), store.clone(), clock.clone() as Arc<dyn Clock>),
        Meter::start(config(), store.clone(), clock.clone() as Arc<dyn Clock>),
    ];
    let started = clock.now_ms();
    let uids: Vec<String> = (0..case.users).map(|i| format!("u{i}")).collect();
    let mut model = Model::default();
    let mut keyed: Vec<(String, String, u64, u64)> = Vec::new();
    let restart_at = if rng.chance(30) {
        Some(rng.below(case.events as u64) as usize)
    } else {
        None
    };
    for step in 0..case.events {
        if restart_at == Some(step) {
            backend.disrupt(case.seed);
        }
        let w = rng.below(2) as usize;
        let uid = uids[rng.below(uids.len() as u64) as usize].clone();
        let now = clock.now_ms();
        match rng.below(100) {
            0..=54 => {
                let (ms, start, key) = if !keyed.is_empty() && rng.chance(15) {
                    // The same file again (same content hash, same speech), maybe through the other writer.
                    let (u, key, ms, start) = keyed[rng.below(keyed.len() as u64) as usize].clone();
                    let rec = RecordSpeech::new(
                        u.as_str(),
                        SpeechAmount::Ms(ms),
                        start,
                        SpeechSource::Sync,
                    )
                    .with_idempotency_key(key.clone());
                    let fresh = model.record(&u, ms, start, now, Some(&key));
                    let out = writers[w]
                        .record_and_read(rec)
                        .await
                        .expect("actor answers");
                    assert!(!fresh, "seed {}: a replayed key is never fresh", case.seed);
                    assert_ne!(out.status, RecordStatus::Dropped);
                    continue;
                } else if rng.chance(25) {
                    let key = format!("file-{}", rng.next());
                    // A file's speech ends before it arrives, so a replay of it (at a later now, maybe
                    // through the other writer) lands in the same minutes.
                    let ms = 1 + rng.below(5 * MS_PER_MINUTE);
                    let start = now - ms - rng.below(3 * MS_PER_DAY);
                    keyed.push((uid.clone(), key.clone(), ms, start));
                    (ms, start, Some(key))
                } else {
                    // Out of order, spread over 9 days back and a little into the future.
                    let start = (now + rng.below(10 * MS_PER_MINUTE))
                        .saturating_sub(rng.below(9 * MS_PER_DAY));
                    (1 + rng.below(3 * MS_PER_MINUTE), start, None)
                };
                let mut rec = RecordSpeech::new(
                    uid.as_str(),
                    SpeechAmount::Ms(ms),
                    start,
                    SpeechSource::Realtime,
                );
                if let Some(key) = &key {
                    rec = rec.with_idempotency_key(key.clone());
                }
                model.record(&uid, ms, start, now, key.as_deref());
                let out = writers[w]
                    .record_and_read(rec)
                    .await
                    .expect("actor answers");
                assert_eq!(out.status, RecordStatus::Recorded, "seed {}", case.seed);
            }
            // Time moves forward, at most 2 days per case, so replayed keys never clamp differently.
            55..=69 if now < started + 2 * MS_PER_DAY => clock.advance(rng.below(2 * MS_PER_HOUR)),
            55..=69 => {}
            70..=84 => {
                let _ = writers[w].flush_user(&uid).await;
            }
            85..=92 => {
                writers[w].flush_all().await;
            }
            _ => {
                writers[w].passivate_user(&uid);
                writers[w].flush_all().await;
            }
        }
    }
    // Heal, drain both writers, then make every view current.
    faulty.set_fault_rates(0, 0, 0);
    for _ in 0..200 {
        for w in &writers {
            w.flush_all().await;
        }
        if writers.iter().all(|w| w.pending_speech_ms() == 0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for w in &writers {
        assert_eq!(w.pending_speech_ms(), 0, "seed {}: drained", case.seed);
    }
    let now = clock.now_ms();
    let at = StoreTime {
        now_ms: now,
        retention_ms: RETENTION,
        keys_retention_ms: RETENTION,
    };
    let mut total = 0;
    for uid in &uids {
        let snap = redis.load(uid, WriterId(0), at).await.expect("load");
        assert_eq!(
            snap.buckets,
            model.kept_buckets(uid, now),
            "seed {}: Redis buckets of {uid}",
            case.seed
        );
        let expected = model.totals(uid, now);
        let month: u64 = snap.months.iter().map(|m| m.1).sum();
        assert_eq!(
            month, expected.3,
            "seed {}: Redis month of {uid}",
            case.seed
        );
        let keys: BTreeSet<String> = snap.idempotency_keys.into_iter().map(|k| k.0).collect();
        assert_eq!(
            keys,
            model.keys.get(uid).cloned().unwrap_or_default(),
            "seed {}: keys of {uid}",
            case.seed
        );
        for (i, w) in writers.iter().enumerate() {
            w.refresh_user(uid).await.expect("refresh");
            let t = w.totals(uid).await.expect("totals");
            assert!(t.known);
            assert_eq!(
                tuple(&t),
                expected,
                "seed {}: writer {i} totals of {uid}",
                case.seed
            );
        }
        total += expected.3;
    }
    for w in &writers {
        w.shutdown(Duration::from_secs(5)).await;
    }
    (total, faulty.applied_then_failed(), restart_at.is_some())
}

#[actix::test]
async fn replayed_event_logs_meter_exactly_once() {
    let mut server = RedisServer::start_durable().expect("redis-server starts");
    replay(Backend::Single(&mut server), "redis").await;
}

#[actix::test]
async fn replayed_event_logs_meter_exactly_once_on_a_cluster() {
    let cluster = RedisCluster::start().expect("redis cluster starts");
    replay(Backend::Cluster(&cluster), "cluster").await;
}

async fn replay(mut backend: Backend<'_>, name: &str) {
    let cases: u64 = std::env::var("VOICEGATE_ORACLE_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let seed: u64 = std::env::var("VOICEGATE_ORACLE_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5EED);
    // `VOICEGATE_ORACLE_CASE=<seed>:<users>:<events>` replays one failed case.
    if let Ok(one) = std::env::var("VOICEGATE_ORACLE_CASE") {
        let parts: Vec<u64> = one.split(':').filter_map(|p| p.parse().ok()).collect();
        if let [seed, users, events] = parts[..] {
            run_case(
                &mut backend,
                &Case {
                    seed,
                    users: users as usize,
                    events: events as usize,
                },
            )
            .await;
            return;
        }
    }
    let mut rng = Rng(seed);
    let (mut metered, mut lost_replies, mut restarts) = (0, 0, 0);
    for done in 0..cases {
        let case = Case {
            seed: rng.next(),
            users: 12 + rng.below(24) as usize,
            events: 60 + rng.below(140) as usize,
        };
        println!(
            "oracle ({name}) case {}:{}:{}",
            case.seed, case.users, case.events
        );
        let (ms, lost, restarted) = run_case(&mut backend, &case).await;
        metered += ms;
        if (done + 1) % 500 == 0 {
            println!("oracle ({name}): {} cases exact so far", done + 1);
        }
        lost_replies += lost;
        restarts += u64::from(restarted);
    }
    println!(
        "oracle ({name}): {cases} cases exact; {metered} ms metered, {lost_replies} applied-then-lost flush replies retried, {restarts} Redis restarts or failovers"
    );
    assert!(
        cases < 10 || (lost_replies > 0 && restarts > 0),
        "the faults were exercised"
    );
}

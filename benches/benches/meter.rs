//! Meter benches (issue 3 acceptance):
//! - `record_speech`: record-speech messages into the user actors (2 arbiter shards, 1000 users), target
//!   ≥ 1,000,000 messages/s on the 2-core machine;
//! - `flush_10k_dirty_users`: one flush round of 10,000 dirty users against a local `redis-server`, target
//!   ≤ 1 s, with exactly one script call (`EVALSHA`, counted in `INFO commandstats`) per dirty user.
//!
//! `cargo bench -p voicegate-benches --bench meter`

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use futures_util::future::join_all;
use voicegate_engine::meter::{Meter, MeterConfig, RecordSpeech, SpeechAmount, SpeechSource};
use voicegate_engine::store::test_redis::RedisServer;
use voicegate_engine::store::{MemoryStore, RedisStore, RedisStoreConfig, Store};
use voicegate_engine::time::MS_PER_HOUR;
use voicegate_engine::time::SystemClock;

const T0: u64 = 1_795_737_600_000 + 12 * MS_PER_HOUR;
const USERS: usize = 1000;
const MESSAGES: usize = 1_000_000;

fn record_speech(c: &mut Criterion) {
    let mut group = c.benchmark_group("meter");
    group
        .sample_size(10)
        .throughput(Throughput::Elements(MESSAGES as u64));
    group.bench_function("record_speech", |b| {
        b.iter_custom(|iters| {
            let system = actix::System::new();
            system.block_on(async move {
                let config = MeterConfig {
                    shards: 2,
                    flush_interval: Duration::from_millis(1000),
                    ..MeterConfig::default()
                };
                let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
                let meter = Meter::start(config, store, Arc::new(SystemClock));
                let uids: Vec<Arc<str>> =
                    (0..USERS).map(|i| Arc::from(format!("user-{i}"))).collect();
                // Create and hydrate the actors first: the bench measures steady-state recording.
                join_all(uids.iter().map(|u| meter.totals(u))).await;
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let start = Instant::now();
                    for i in 0..MESSAGES {
                        let uid = &uids[i % USERS];
                        meter
                            .record(RecordSpeech {
                                uid: Arc::clone(uid),
                                amount: SpeechAmount::Samples {
                                    samples: 512,
                                    rate_hz: 16_000,
                                },
                                audio_start_ms: T0,
                                source: SpeechSource::Realtime,
                                idempotency_key: None,
                            })
                            .await;
                    }
                    // Every actor has handled its messages once it answers a read queued behind them.
                    join_all(uids.iter().map(|u| meter.totals(u))).await;
                    total += start.elapsed();
                }
                meter.shutdown(Duration::from_secs(10)).await;
                total
            })
        });
    });
    group.finish();
}

fn flush_10k_dirty_users(c: &mut Criterion) {
    const DIRTY: usize = 10_000;
    let server = RedisServer::start().expect("redis-server starts (apt: redis-server)");
    let mut group = c.benchmark_group("meter");
    group
        .sample_size(10)
        .throughput(Throughput::Elements(DIRTY as u64));
    group.bench_function("flush_10k_dirty_users", |b| {
        b.iter_custom(|iters| {
            let system = actix::System::new();
            let server = &server;
            system.block_on(async move {
                let store: Arc<dyn Store> = Arc::new(RedisStore::new(&RedisStoreConfig::new(server.url())).expect("store"));
                let config = MeterConfig { shards: 2, flush_interval: Duration::from_secs(3600), ..MeterConfig::default() };
                let meter = Meter::start(config, store, Arc::new(SystemClock));
                let uids: Vec<String> = (0..DIRTY).map(|i| format!("bench-user-{i}")).collect();
                join_all(uids.iter().map(|u| meter.totals(u))).await;
                meter.flush_all().await;
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    for uid in &uids {
                        meter.record(RecordSpeech::new(uid.as_str(), SpeechAmount::Ms(1_500), T0, SpeechSource::Realtime)).await;
                    }
                    join_all(uids.iter().map(|u| meter.totals(u))).await;
                    let calls_before = server.command_calls("evalsha").unwrap_or(0);
                    let start = Instant::now();
                    let round = meter.flush_all().await;
                    let elapsed = start.elapsed();
                    total += elapsed;
                    let calls = server.command_calls("evalsha").unwrap_or(0) - calls_before;
                    assert_eq!(round.batches_acked, DIRTY, "every dirty user flushed in one round");
                    assert_eq!(calls, DIRTY as u64, "one script call per dirty user");
                    eprintln!("flush of {DIRTY} dirty users: {elapsed:?}, {calls} EVALSHA calls ({:.2} per user)", calls as f64 / DIRTY as f64);
                }
                meter.shutdown(Duration::from_secs(10)).await;
                total
            })
        });
    });
    group.finish();
}

criterion_group!(benches, record_speech, flush_10k_dirty_users);
criterion_main!(benches);

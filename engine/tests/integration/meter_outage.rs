//! Redis down during recording: audio is still admitted, the pending gauge shows what is waiting, and
//! after Redis returns every ms is in Redis. The outage lasts 2 s here (the 30 s version on virtual time
//! is `meter_actor::a_30s_store_outage_keeps_every_ms_pending_and_flushes_it_after`);
//! `VOICEGATE_OUTAGE_MS=30000` runs it for 30 s against the real server.

use std::sync::Arc;
use std::time::{Duration, Instant};

use voicegate_engine::meter::{
    Meter, MeterConfig, RecordSpeech, RecordStatus, SpeechAmount, SpeechSource,
};
use voicegate_engine::store::test_redis::RedisServer;
use voicegate_engine::store::{RedisStore, RedisStoreConfig, Store, StoreTime, WriterId};
use voicegate_engine::time::{Clock, SystemClock};

#[actix::test]
async fn redis_down_while_recording_loses_nothing() {
    let outage = Duration::from_millis(
        std::env::var("VOICEGATE_OUTAGE_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2_000),
    );
    let mut server = RedisServer::start_durable().expect("redis-server starts");
    let mut redis_config = RedisStoreConfig::new(server.url());
    redis_config.connect_timeout = Duration::from_millis(200);
    redis_config.response_timeout = Duration::from_millis(300);
    let redis = RedisStore::new(&redis_config).expect("store");
    let config = MeterConfig {
        shards: 2,
        flush_interval: Duration::from_millis(50),
        flush_max_backoff: Duration::from_millis(400),
        store_timeout: Duration::from_millis(500),
        ..MeterConfig::default()
    };
    let meter = Meter::start(
        config,
        Arc::new(redis.clone()) as Arc<dyn Store>,
        Arc::new(SystemClock),
    );
    let uids = ["alice", "bob", "carol"];
    let mut recorded = 0;
    for uid in uids {
        meter
            .record(RecordSpeech::new(
                uid,
                SpeechAmount::Ms(1_000),
                SystemClock.now_ms(),
                SpeechSource::Realtime,
            ))
            .await;
        recorded += 1_000;
        meter.flush_user(uid).await.expect("flush while up");
    }
    server.stop().expect("redis stops");
    let down_at = Instant::now();
    let mut during = 0;
    let mut i = 0u64;
    while down_at.elapsed() < outage {
        for uid in uids {
            let ms = 20 + i % 7;
            let rec = RecordSpeech::new(
                uid,
                SpeechAmount::Samples {
                    samples: ms * 16,
                    rate_hz: 16_000,
                },
                SystemClock.now_ms(),
                SpeechSource::Realtime,
            );
            let out = meter
                .record_and_read(rec)
                .await
                .expect("answers while Redis is down");
            assert_eq!(out.status, RecordStatus::Recorded, "audio still admitted");
            during += ms;
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    recorded += during;
    assert_eq!(
        meter.pending_speech_ms(),
        during,
        "the pending gauge shows what waits for Redis"
    );
    server.resume().expect("redis returns");
    let back_at = Instant::now();
    while meter.pending_speech_ms() > 0 && back_at.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(meter.pending_speech_ms(), 0, "drained after Redis returned");
    let at = StoreTime {
        now_ms: SystemClock.now_ms(),
        retention_ms: meter.config().retention.as_millis() as u64,
        keys_retention_ms: meter.config().keys_retention.as_millis() as u64,
    };
    let mut in_redis = 0;
    for uid in uids {
        let snap = redis.load(uid, WriterId(0), at).await.expect("load");
        in_redis += snap.buckets.iter().map(|b| b.1).sum::<u64>();
    }
    assert_eq!(in_redis, recorded, "every ms is in Redis");
    println!(
        "outage {:?}: {during} ms recorded while down, drained {:?} after Redis returned",
        outage,
        back_at.elapsed()
    );
}

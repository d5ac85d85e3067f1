//! Sync uploads end to end against a real redis-server: the fixtures uploaded as a device would are metered
//! exactly as `voicegate analyze` measures them, and uploading them again changes nothing.

use crate::common;

use common::engine_server::{EngineServer, fair_use_on, fixtures, offline_speech_ms, omi_name};
use voicegate_engine::meter::{Meter, MeterConfig};
use voicegate_engine::store::{RedisStore, RedisStoreConfig};
use voicegate_engine::time::SystemClock;

#[actix_web::test]
async fn fixtures_meter_what_analyze_finds_and_a_reupload_changes_nothing() {
    let server = EngineServer::start(fair_use_on(), |_| {}).await;
    // Device names with recent timestamps, one minute apart, an hour ago.
    let files: Vec<(String, Vec<u8>)> = fixtures()
        .into_iter()
        .enumerate()
        .map(|(i, (_, bytes))| (omi_name(3_600 - 60 * i as u64), bytes))
        .collect();
    assert_eq!(files.len(), 12);
    let expected: u64 = files.iter().map(|(n, b)| offline_speech_ms(n, b)).sum();
    println!(
        "offline pipeline: {expected} ms of speech in {} files",
        files.len()
    );

    let (code, first, _) = server.upload("device-user", "", &files).await;
    assert_eq!(code, 200, "{first}");
    assert_eq!(first["speech_ms"], expected, "{first}");
    assert_eq!(first["metered_speech_ms"], expected);
    assert_eq!(first["locked"], false);
    let new_ids = first["new_memories"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(!new_ids.is_empty(), "{first}");
    for f in first["files"].as_array().unwrap() {
        assert_eq!(f["status"], "ok", "{f}");
    }
    let speech = server.status_speech_ms("device-user").await;
    println!("status after the first upload: {speech}");
    assert_eq!(speech["daily_ms"], expected);
    assert_eq!(speech["weekly_ms"], expected);

    // Again: the same conversations, nothing new metered.
    let (code, again, _) = server.upload("device-user", "", &files).await;
    assert_eq!(code, 200, "{again}");
    assert_eq!(
        again["new_memories"].as_array().map(Vec::len),
        Some(0),
        "{again}"
    );
    let mut updated = again["updated_memories"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut first_ids = new_ids.clone();
    updated.sort_by_key(|v| v.to_string());
    first_ids.sort_by_key(|v| v.to_string());
    assert_eq!(updated, first_ids);
    assert_eq!(again["metered_speech_ms"], 0);
    for f in again["files"].as_array().unwrap() {
        assert_eq!(f["status"], "duplicate", "{f}");
    }
    assert_eq!(
        server.status_speech_ms("device-user").await["daily_ms"],
        expected
    );

    // The conversation list holds exactly the first upload's conversations.
    let (code, list) = server
        .get("/v1/conversations?limit=200", "device-user")
        .await;
    assert_eq!(code, 200);
    assert_eq!(
        list["conversations"].as_array().map(Vec::len),
        Some(new_ids.len())
    );

    // After the drain, Redis itself holds every ms (read by a fresh meter on the same Redis).
    let redis = server.shutdown().await;
    let store = RedisStore::new(&RedisStoreConfig::new(redis.url())).unwrap();
    let meter = Meter::start(
        MeterConfig::default(),
        std::sync::Arc::new(store),
        std::sync::Arc::new(SystemClock),
    );
    let totals = meter.totals("device-user").await.unwrap();
    assert!(totals.known);
    assert_eq!(totals.rolling.daily_ms, expected);
}

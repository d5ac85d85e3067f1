//! SIGTERM to the real `voicegate serve` process with 50 listen streams in flight: every client sees its
//! `metadata` then close 1001 "server draining", the process exits 0, and every ms a client was told it
//! spoke is in Redis afterwards (read back through a fresh meter on the same Redis).

use crate::listen_support;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use listen_support::{
    AWAY, Child, assert_stored_as_told, fixture_packets, free_port, speaking_device, until_spoken,
    wait_ready,
};
use tokio::sync::mpsc;
use tokio::time::Instant;
use voicegate_engine::store::test_redis::RedisServer;
use voicegate_server::sessions::DRAIN_CLOSE_REASON;

const STREAMS: usize = 50;

#[actix_web::test]
async fn sigterm_with_50_streams_closes_each_with_1001_and_every_reported_ms_is_in_redis() {
    let redis = RedisServer::start().unwrap_or_else(|e| panic!("redis-server: {e}"));
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port())
        .parse()
        .unwrap_or_else(|e| panic!("{e}"));
    let child = Command::new(env!("CARGO_BIN_EXE_voicegate"))
        .arg("serve")
        .env("VOICEGATE_BIND", addr.to_string())
        // Admission by load off: a busy CI machine must not refuse the sessions this test counts.
        .env("VOICEGATE_ADMISSION_CPU_PERCENT", "0")
        .env("VOICEGATE_ADMISSION_LATE_PERCENT", "0")
        .env("VOICEGATE_REDIS_URL", redis.url())
        .env("VOICEGATE_DRAIN_TIMEOUT_SECS", "20")
        .env("RUST_LOG", "warn")
        // Not about transcription: no model loads (the default is local when installed).
        .env("VOICEGATE_STT", "none")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn voicegate: {e}"));
    let mut child = Child(child);
    wait_ready(addr).await;

    let packets = Arc::new(fixture_packets("d01"));
    let mut devices = Vec::with_capacity(STREAMS);
    let (spoke_tx, mut spoke_rx) = mpsc::unbounded_channel();
    for i in 0..STREAMS {
        let (uid, packets) = (format!("drain{i:02}"), Arc::clone(&packets));
        devices.push(tokio::spawn(speaking_device(
            addr,
            uid,
            packets,
            spoke_tx.clone(),
        )));
        // Staggered starts: at the signal some streams are inside a speech run, some between runs.
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    drop(spoke_tx);
    // The signal goes once every stream has metered speech (its first `speech_ended`), not after a guess.
    until_spoken(&mut spoke_rx, STREAMS).await;
    let pid = child.0.id().to_string();
    let killed = Command::new("kill").args(["-TERM", &pid]).status();
    assert!(killed.is_ok_and(|s| s.success()), "kill -TERM {pid}");

    let mut told = Vec::with_capacity(STREAMS);
    for (i, d) in devices.into_iter().enumerate() {
        let seen = d.await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            seen.close,
            Some((AWAY, DRAIN_CLOSE_REASON.to_owned())),
            "drain{i:02}: {:?}",
            seen.events
        );
        told.push(seen.metadata()["speech_ms"].as_u64().unwrap_or(u64::MAX));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap_or_else(|e| panic!("{e}")) {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "server did not exit after the drain"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "voicegate exited with {status}");
    assert!(
        told.iter().all(|&ms| ms > 0 && ms != u64::MAX),
        "every stream had spoken by the signal and reported it in its metadata: {told:?}"
    );

    // What the store holds, read by a fresh meter (as another node would after the restart).
    assert_stored_as_told(redis.url(), "drain", &told).await;
    eprintln!(
        "drain: {STREAMS} streams, {} ms of speech told and stored",
        told.iter().sum::<u64>()
    );
}

//! SIGTERM to the real `voicegate serve` process with paused uploads and live streams (issue #17 item 2):
//! the drain leaves no upload temp folder behind (the body timeouts are set far beyond the drain, so only
//! the drain can clean up), every stream is closed with 1001 and every ms it was told is in Redis; a
//! restart sweeps the folders a killed process left.

use crate::listen_support;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use listen_support::{
    AWAY, Child, assert_stored_as_told, fixture_packets, free_port, speaking_device, until_spoken,
    wait_ready,
};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use voicegate_engine::store::test_redis::RedisServer;

/// Paused uploads and live streams at the signal: 10 of each in CI; `VOICEGATE_TEST_DRAIN_SIZE=50` for the
/// acceptance figure of issue #17 (`docs/operations.md`, "Draining").
fn drain_size() -> usize {
    std::env::var("VOICEGATE_TEST_DRAIN_SIZE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10)
}

fn spawn(addr: std::net::SocketAddr, redis: &str, upload_dir: &std::path::Path) -> Child {
    let child = Command::new(env!("CARGO_BIN_EXE_voicegate"))
        .arg("serve")
        .env("VOICEGATE_BIND", addr.to_string())
        // Admission by load off: a busy CI machine must not refuse the sessions this test counts.
        .env("VOICEGATE_ADMISSION_CPU_PERCENT", "0")
        .env("VOICEGATE_ADMISSION_LATE_PERCENT", "0")
        .env("VOICEGATE_REDIS_URL", redis)
        .env("VOICEGATE_UPLOAD_DIR", upload_dir)
        .env("VOICEGATE_DRAIN_TIMEOUT_SECS", "6")
        .env("VOICEGATE_BODY_IDLE_TIMEOUT_SECS", "600")
        .env("VOICEGATE_BODY_TIMEOUT_SECS", "600")
        // Drain is under test, not transcription: no speech-to-text engine to load.
        .env("VOICEGATE_STT", "none")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn voicegate: {e}"));
    Child(child)
}

async fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(s) = child.0.try_wait().unwrap_or_else(|e| panic!("{e}")) {
            return s;
        }
        assert!(Instant::now() < deadline, "server did not exit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn folders(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// An upload that sends its head and 1 KB of its first file, then pauses (its socket is kept open).
async fn paused_upload(addr: std::net::SocketAddr, uid: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut req = format!(
        "POST /v1/sync-local-files HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {uid}\r\n\
         Content-Type: multipart/form-data; boundary=xyz\r\nContent-Length: 100000\r\n\r\n\
         --xyz\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.bin\"\r\n\r\n"
    )
    .into_bytes();
    req.extend(std::iter::repeat_n(7u8, 1024));
    s.write_all(&req).await.unwrap_or_else(|e| panic!("{e}"));
    s
}

#[actix_web::test]
async fn sigterm_with_paused_uploads_and_streams_leaves_no_temp_folder_and_meters_every_stream() {
    let redis = RedisServer::start().unwrap_or_else(|e| panic!("redis-server: {e}"));
    let upload_dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port())
        .parse()
        .unwrap_or_else(|e| panic!("{e}"));
    let mut child = spawn(addr, &redis.url(), upload_dir.path());
    wait_ready(addr).await;
    let (streams, uploads) = (drain_size(), drain_size());

    let packets = Arc::new(fixture_packets("d01"));
    let (spoke_tx, mut spoke_rx) = mpsc::unbounded_channel();
    let devices: Vec<_> = (0..streams)
        .map(|i| {
            let (uid, packets) = (format!("drainup{i:02}"), Arc::clone(&packets));
            tokio::spawn(speaking_device(addr, uid, packets, spoke_tx.clone()))
        })
        .collect();
    drop(spoke_tx);
    let mut paused = Vec::with_capacity(uploads);
    for i in 0..uploads {
        paused.push(paused_upload(addr, &format!("paused{i:02}")).await);
    }
    // Synchronise on the event: every paused upload holds its temp folder.
    let deadline = Instant::now() + Duration::from_secs(20);
    while folders(upload_dir.path()).len() < uploads {
        assert!(
            Instant::now() < deadline,
            "{:?}",
            folders(upload_dir.path())
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The signal goes once every stream has metered speech (its first `speech_ended`), not after a guess.
    until_spoken(&mut spoke_rx, streams).await;
    let pid = child.0.id().to_string();
    let killed = Command::new("kill").args(["-TERM", &pid]).status();
    assert!(killed.is_ok_and(|s| s.success()), "kill -TERM {pid}");

    let mut told = Vec::with_capacity(streams);
    for (i, d) in devices.into_iter().enumerate() {
        let seen = d.await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            seen.close.as_ref().map(|c| c.0),
            Some(AWAY),
            "drainup{i:02}"
        );
        told.push(seen.metadata()["speech_ms"].as_u64().unwrap_or(u64::MAX));
    }
    let status = wait_exit(&mut child).await;
    assert!(status.success(), "voicegate exited with {status}");
    assert!(
        told.iter().all(|&ms| ms > 0 && ms != u64::MAX),
        "every stream had spoken by the signal and reported it in its metadata: {told:?}"
    );
    let left = folders(upload_dir.path());
    assert!(left.is_empty(), "temp folders left by the drain: {left:?}");
    drop(paused);

    assert_stored_as_told(redis.url(), "drainup", &told).await;
    eprintln!(
        "drain: {uploads} paused uploads, {streams} streams ({} ms told and stored), 0 temp folders left",
        told.iter().sum::<u64>()
    );
}

#[actix_web::test]
async fn a_restart_sweeps_the_temp_folders_a_killed_process_left() {
    let redis = RedisServer::start().unwrap_or_else(|e| panic!("redis-server: {e}"));
    let upload_dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port())
        .parse()
        .unwrap_or_else(|e| panic!("{e}"));
    let mut child = spawn(addr, &redis.url(), upload_dir.path());
    wait_ready(addr).await;
    let mut paused = Vec::new();
    for i in 0..3 {
        paused.push(paused_upload(addr, &format!("crash{i}")).await);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while folders(upload_dir.path()).len() < 3 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A crash: no drain runs.
    let _ = child.0.kill();
    let _ = child.0.wait();
    drop(paused);
    assert_eq!(folders(upload_dir.path()).len(), 3, "a kill leaves them");
    let unrelated = upload_dir.path().join("voicegate-spool");
    std::fs::create_dir(&unrelated).unwrap_or_else(|e| panic!("{e}"));

    let _restarted = spawn(addr, &redis.url(), upload_dir.path());
    wait_ready(addr).await;
    assert_eq!(
        folders(upload_dir.path()),
        vec!["voicegate-spool".to_owned()]
    );
}

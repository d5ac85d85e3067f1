//! SIGTERM to the real `voicegate serve` process with 50 listen streams in flight: every client sees its
//! `metadata` then close 1001 "server draining", the process exits 0, and every ms a client was told it
//! spoke is in Redis afterwards (read back through a fresh meter on the same Redis).

use crate::listen_support;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use listen_support::{AWAY, Seen, connect, fixture_packets, read_all};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use voicegate_engine::meter::{Meter, MeterConfig};
use voicegate_engine::store::test_redis::RedisServer;
use voicegate_engine::store::{RedisStore, RedisStoreConfig};
use voicegate_engine::time::SystemClock;
use voicegate_server::sessions::DRAIN_CLOSE_REASON;

const STREAMS: usize = 50;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Kills the server if the test fails before it exits.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn wait_ready(addr: std::net::SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let client = reqwest::Client::new();
    loop {
        let ok = client
            .get(format!("http://{addr}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if ok {
            return;
        }
        assert!(Instant::now() < deadline, "server not ready in 60 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One device: streams d01 in real time until the server closes the socket. `spoke` fires when the server
/// reported the device's first finished speech run (`speech_ended`), i.e. once it has metered speech.
async fn device(
    addr: std::net::SocketAddr,
    uid: String,
    packets: Arc<Vec<Vec<u8>>>,
    spoke: mpsc::UnboundedSender<()>,
) -> Seen {
    let ws = connect(addr, Some(&uid), "codec=opus&sample_rate=16000")
        .await
        .unwrap_or_else(|s| panic!("{uid}: upgrade {s}"));
    let (mut tx, rx) = ws.split();
    let mut spoke = Some(spoke);
    let rx = rx.inspect(move |m| {
        if let Ok(Message::Text(t)) = m
            && t.as_str().contains("\"speech_ended\"")
            && let Some(spoke) = spoke.take()
        {
            let _ = spoke.send(());
        }
    });
    let reader = tokio::spawn(read_all(rx, Duration::from_secs(60)));
    let t0 = Instant::now();
    for (i, p) in packets.iter().enumerate() {
        tokio::time::sleep_until(t0 + Duration::from_millis(10 * i as u64)).await;
        if reader.is_finished() || tx.send(Message::binary(p.clone())).await.is_err() {
            break;
        }
    }
    reader.await.unwrap_or_else(|e| panic!("{e}"))
}

#[actix_web::test]
async fn sigterm_with_50_streams_closes_each_with_1001_and_every_reported_ms_is_in_redis() {
    let redis = RedisServer::start().unwrap_or_else(|e| panic!("redis-server: {e}"));
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port())
        .parse()
        .unwrap_or_else(|e| panic!("{e}"));
    let child = Command::new(env!("CARGO_BIN_EXE_voicegate"))
        .arg("serve")
        .env("VOICEGATE_BIND", addr.to_string())
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
        devices.push(tokio::spawn(device(addr, uid, packets, spoke_tx.clone())));
        // Staggered starts: at the signal some streams are inside a speech run, some between runs.
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    drop(spoke_tx);
    // The signal goes once every stream has metered speech (its first `speech_ended`), not after a guess.
    for n in 0..STREAMS {
        tokio::time::timeout(Duration::from_secs(60), spoke_rx.recv())
            .await
            .unwrap_or_else(|_| panic!("only {n} of {STREAMS} streams reported speech within 60 s"))
            .unwrap_or_else(|| panic!("a device ended before it spoke ({n} had spoken)"));
    }
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
    let store =
        RedisStore::new(&RedisStoreConfig::new(redis.url())).unwrap_or_else(|e| panic!("{e}"));
    let meter = Meter::start(
        MeterConfig::default(),
        Arc::new(store),
        Arc::new(SystemClock),
    );
    for (i, &ms) in told.iter().enumerate() {
        let totals = meter
            .totals(&format!("drain{i:02}"))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(totals.known, "store unreadable");
        assert_eq!(
            (totals.rolling.daily_ms, totals.month_ms),
            (ms, ms),
            "drain{i:02}: told {ms} ms, Redis holds {:?}",
            totals
        );
    }
    eprintln!(
        "drain: {STREAMS} streams, {} ms of speech told and stored",
        told.iter().sum::<u64>()
    );
}

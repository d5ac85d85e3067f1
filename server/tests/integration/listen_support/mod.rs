//! A websocket client for the listen tests: connect with a bearer token, stream Opus packets of a fixture
//! at a chosen pace (one packet per message, as a device does), collect every event with its receipt time.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use voicegate_engine::audio::codec::Codec;
use voicegate_engine::pipeline::offline::{FileAnalysis, analyze, bin_format};
use voicegate_engine::pipeline::stream::PipelineConfig;

use crate::common::refusal::Reply;

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens `/v4/listen?{query}`; `Err(status)` when the upgrade is refused.
pub async fn connect(
    addr: std::net::SocketAddr,
    bearer: Option<&str>,
    query: &str,
) -> Result<Ws, u16> {
    connect_or_refusal(addr, bearer, query)
        .await
        .map_err(|refusal| refusal.status)
}

/// Opens `/v4/listen?{query}`; when the upgrade is refused, what the refusal said (status,
/// `Retry-After`, JSON body) for [`crate::common::refusal::assert_refusal`].
pub async fn connect_or_refusal(
    addr: std::net::SocketAddr,
    bearer: Option<&str>,
    query: &str,
) -> Result<Ws, Reply> {
    let mut req = format!("ws://{addr}/v4/listen?{query}")
        .into_client_request()
        .unwrap_or_else(|e| panic!("{e}"));
    if let Some(b) = bearer {
        let v = HeaderValue::from_str(&format!("Bearer {b}")).unwrap_or_else(|e| panic!("{e}"));
        req.headers_mut().insert("authorization", v);
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, _)) => Ok(ws),
        Err(WsError::Http(resp)) => {
            let retry_after = resp
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap_or("<not text>"));
            let bytes = resp.body().as_deref().unwrap_or_default();
            let body = serde_json::from_slice(bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into_owned()));
            Err(Reply::new(resp.status().as_u16(), retry_after, body))
        }
        Err(e) => panic!("connect: {e}"),
    }
}

/// The Opus packets of a fixture container (`[u32 LE len][packet]…`).
pub fn fixture_packets(id: &str) -> Vec<Vec<u8>> {
    let path = format!("{}/../fixtures/{id}.bin", env!("CARGO_MANIFEST_DIR"));
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut out = Vec::new();
    let mut rest = &bytes[..];
    while rest.len() >= 4 {
        let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if rest.len() < 4 + len {
            break;
        }
        out.push(rest[4..4 + len].to_vec());
        rest = &rest[4 + len..];
    }
    out
}

/// The offline pipeline over the same packets (what `voicegate analyze` says).
pub fn offline(packets: &[Vec<u8>]) -> FileAnalysis {
    let mut bin = Vec::new();
    for p in packets {
        bin.extend_from_slice(&(p.len() as u32).to_le_bytes());
        bin.extend_from_slice(p);
    }
    let format = bin_format(Codec::opus(16_000).unwrap_or_else(|| panic!("rate")), 160);
    let a = analyze("stream.bin", &bin[..], &format, &PipelineConfig::default());
    assert!(a.error.is_none(), "{:?}", a.error);
    a
}

/// Everything a client saw.
#[derive(Debug, Default)]
pub struct Seen {
    /// JSON events, each with the ms since streaming started when it arrived.
    pub events: Vec<(Value, u64)>,
    pub pings: usize,
    pub close: Option<(u16, String)>,
}

impl Seen {
    pub fn of_type(&self, t: &str) -> Vec<&Value> {
        self.events
            .iter()
            .map(|(v, _)| v)
            .filter(|v| v["type"] == t)
            .collect()
    }

    pub fn metadata(&self) -> &Value {
        let m = self.of_type("metadata");
        assert_eq!(m.len(), 1, "exactly one metadata: {:?}", self.events);
        m[0]
    }

    /// `[start, end]` of every speech run from the events (ms of stream audio).
    pub fn runs(&self) -> Vec<[u64; 2]> {
        self.of_type("speech_ended")
            .iter()
            .map(|e| {
                let end = e["at_ms"].as_u64().unwrap_or(0);
                [end - e["speech_ms"].as_u64().unwrap_or(0), end]
            })
            .collect()
    }
}

/// Reads until the server closes (or `limit` passes).
pub async fn read_all<S>(mut rx: S, limit: Duration) -> Seen
where
    S: futures_util::Stream<Item = Result<Message, WsError>> + Unpin,
{
    let t0 = Instant::now();
    let mut seen = Seen::default();
    let deadline = t0 + limit;
    loop {
        let next = tokio::time::timeout_at(deadline, rx.next()).await;
        let msg = match next {
            Err(_) => panic!("no close within {limit:?}; saw {:?}", seen.events),
            Ok(None) | Ok(Some(Err(_))) => break,
            Ok(Some(Ok(m))) => m,
        };
        match msg {
            Message::Text(t) if t.as_str() == "ping" => seen.pings += 1,
            Message::Text(t) => {
                let v: Value = serde_json::from_str(t.as_str())
                    .unwrap_or_else(|e| panic!("event is not JSON: {t}: {e}"));
                seen.events.push((v, t0.elapsed().as_millis() as u64));
            }
            Message::Close(frame) => {
                seen.close = frame.map(|f| (u16::from(f.code), f.reason.to_string()));
                break;
            }
            _ => {}
        }
    }
    seen
}

/// Streams `packets` one per message at `speed`× real time (10 ms each), then `CloseStream`, and returns
/// what the client saw, with `sent_at_ms[i]` = when frame `i + 1` left.
pub async fn stream_packets(ws: Ws, packets: &[Vec<u8>], speed: u32) -> (Seen, Vec<u64>) {
    let (mut tx, rx) = ws.split();
    let limit = Duration::from_millis(packets.len() as u64 * 10 / u64::from(speed) + 30_000);
    let reader = tokio::spawn(read_all(rx, limit));
    let t0 = Instant::now();
    let step = Duration::from_micros(10_000 / u64::from(speed));
    let mut sent = Vec::with_capacity(packets.len());
    for (i, p) in packets.iter().enumerate() {
        tokio::time::sleep_until(t0 + step * i as u32).await;
        sent.push(t0.elapsed().as_millis() as u64);
        tx.send(Message::binary(p.clone()))
            .await
            .unwrap_or_else(|e| panic!("send: {e}"));
    }
    tx.send(Message::text(r#"{"type":"CloseStream"}"#))
        .await
        .unwrap_or_else(|e| panic!("send: {e}"));
    let seen = reader.await.unwrap_or_else(|e| panic!("{e}"));
    (seen, sent)
}

pub const NORMAL: u16 = 1000;
pub const AWAY: u16 = 1001;
pub const POLICY: u16 = 1008;
pub const TOO_BIG: u16 = 1009;

pub fn code(c: CloseCode) -> u16 {
    u16::from(c)
}

/// A free local TCP port (for a server started as a process).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("{e}"))
}

/// A `voicegate serve` process, killed if the test fails before it exits.
pub struct Child(pub std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits (at most 60 s) until the server at `addr` answers `/readyz` with success.
pub async fn wait_ready(addr: std::net::SocketAddr) {
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

/// One device: streams `packets` (Opus, 10 ms each) in real time until the server closes the socket.
/// `spoke` fires when the server reported the device's first finished speech run (`speech_ended`), i.e.
/// once it has metered speech: tests synchronise on it, not on a sleep.
pub async fn speaking_device(
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

/// Waits (at most 60 s) until `n` devices reported speech on `spoke`.
pub async fn until_spoken(spoke: &mut mpsc::UnboundedReceiver<()>, n: usize) {
    for k in 0..n {
        tokio::time::timeout(Duration::from_secs(60), spoke.recv())
            .await
            .unwrap_or_else(|_| panic!("only {k} of {n} streams reported speech within 60 s"))
            .unwrap_or_else(|| panic!("a device ended before it spoke ({k} had spoken)"));
    }
}

/// Asserts that Redis at `redis_url` holds exactly what each device was told (`told[i]` ms for the user
/// `{prefix}{i:02}`, today and this month), read by a fresh meter as another node would after a restart.
pub async fn assert_stored_as_told(redis_url: String, prefix: &str, told: &[u64]) {
    use voicegate_engine::meter::{Meter, MeterConfig};
    use voicegate_engine::store::{RedisStore, RedisStoreConfig};
    use voicegate_engine::time::SystemClock;

    let store =
        RedisStore::new(&RedisStoreConfig::new(redis_url)).unwrap_or_else(|e| panic!("{e}"));
    let meter = Meter::start(
        MeterConfig::default(),
        Arc::new(store),
        Arc::new(SystemClock),
    );
    for (i, &ms) in told.iter().enumerate() {
        let uid = format!("{prefix}{i:02}");
        let totals = meter.totals(&uid).await.unwrap_or_else(|e| panic!("{e}"));
        assert!(totals.known, "store unreadable");
        assert_eq!(
            (totals.rolling.daily_ms, totals.month_ms),
            (ms, ms),
            "{uid}: told {ms} ms, Redis holds {totals:?}"
        );
    }
}

//! A websocket client for the listen tests: connect with a bearer token, stream Opus packets of a fixture
//! at a chosen pace (one packet per message, as a device does), collect every event with its receipt time.
#![allow(dead_code)]

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use voicegate_engine::audio::codec::Codec;
use voicegate_engine::pipeline::offline::{FileAnalysis, analyze, bin_format};
use voicegate_engine::pipeline::stream::PipelineConfig;

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens `/v4/listen?{query}`; `Err(status)` when the upgrade is refused.
pub async fn connect(
    addr: std::net::SocketAddr,
    bearer: Option<&str>,
    query: &str,
) -> Result<Ws, u16> {
    let mut req = format!("ws://{addr}/v4/listen?{query}")
        .into_client_request()
        .unwrap_or_else(|e| panic!("{e}"));
    if let Some(b) = bearer {
        let v = HeaderValue::from_str(&format!("Bearer {b}")).unwrap_or_else(|e| panic!("{e}"));
        req.headers_mut().insert("authorization", v);
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, _)) => Ok(ws),
        Err(WsError::Http(resp)) => Err(resp.status().as_u16()),
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

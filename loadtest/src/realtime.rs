//! The realtime scenario: one lightweight task per simulated device, each a distinct user.
//!
//! A task connects to `/v4/listen`, sends its frames on absolute deadlines (`t0 + n × 10 ms / pace`, so
//! a late wake-up never shifts later frames: the sender catches up instead of drifting), reads every
//! server event in the same `select!`, and records when each frame left so that an event carrying
//! `frames_received = N` gives the latency of frame N. At the end it sends `CloseStream` and waits for
//! the final `metadata`, whose `frames_received` is the number of frames acknowledged.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::http::header::AUTHORIZATION;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::auth::Authenticator;
use crate::corpus::{Corpus, FRAME_MS};
use crate::live::Live;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Send times kept per stream (20 s at real time); older frames fall back to their deadline.
const SEND_RING: usize = 2048;
/// Read buffer per stream (see [`ws_config`]).
const READ_BUFFER: usize = 4096;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Frames counted locally before the shared counter is bumped (keeps atomics off the per-frame path).
const LIVE_BATCH: u64 = 100;

/// What every stream shares.
pub struct RealtimeCtx {
    pub corpus: Arc<Corpus>,
    pub ws_url: String,
    pub auth: Authenticator,
    pub pace: f64,
    pub frames_per_stream: u64,
    pub keepalive: Duration,
    pub close_timeout: Duration,
    pub live: Arc<Live>,
}

/// The server's final `metadata` event.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Metadata {
    pub frames_received: u64,
    pub frames_dropped: u64,
    pub audio_ms: u64,
    pub speech_ms: u64,
    pub stt_forwarded_ms: u64,
}

/// One stream's result.
#[derive(Debug, Default)]
pub struct StreamOutcome {
    pub user: String,
    pub start_clip: usize,
    pub setup_us: Option<u64>,
    pub frames_sent: u64,
    /// Connected, sent every frame, and got `metadata`.
    pub held: bool,
    pub metadata: Option<Metadata>,
    /// Sum of `frames_dropped` reported in `frames_dropped` events.
    pub dropped_events: u64,
    pub events: u64,
    /// Event receipt − send time of the frame it names, µs (`metadata` excluded).
    pub latencies_us: Vec<u64>,
    /// The event type of each entry of `latencies_us` (an index into [`EVENT_KINDS`]).
    pub latency_kinds: Vec<u8>,
    /// `CloseStream` sent → `metadata` received, µs.
    pub close_us: Option<u64>,
    pub errors: Vec<String>,
}

/// The event types the server documents (`docs/protocol.md`); anything else counts as `other`.
pub const EVENT_KINDS: [&str; 9] = [
    "speech_started",
    "speech_ended",
    "usage",
    "fair_use",
    "stt_budget_exhausted",
    "conversation_closed",
    "frames_dropped",
    "metadata",
    "other",
];

fn kind_index(kind: &str) -> u8 {
    let last = EVENT_KINDS.len() - 1;
    EVENT_KINDS[..last]
        .iter()
        .position(|k| *k == kind)
        .unwrap_or(last) as u8
}

impl StreamOutcome {
    fn error(&mut self, live: &Live, kind: impl Into<String>) {
        live.errors.fetch_add(1, Relaxed);
        self.errors.push(kind.into());
    }
}

#[derive(Deserialize)]
struct Event<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    #[serde(default)]
    frames_received: Option<u64>,
    #[serde(default)]
    frames_dropped: Option<u64>,
    #[serde(default)]
    audio_ms: Option<u64>,
    /// A number in `metadata` and `speech_ended`, an object of rolling totals in `usage`.
    #[serde(default)]
    speech_ms: Option<serde_json::Value>,
    #[serde(default)]
    stt_forwarded_ms: Option<u64>,
}

/// Per-stream sending state used to turn `frames_received` into a latency.
struct Clock {
    t0: Instant,
    interval_ns: u64,
    sent: u64,
    ring: Box<[u64]>,
}

impl Clock {
    fn sent_at(&self, frame_index: u64) -> Instant {
        let offset_us = if self.sent - frame_index <= SEND_RING as u64 {
            self.ring[(frame_index % SEND_RING as u64) as usize]
        } else {
            frame_index * self.interval_ns / 1_000
        };
        self.t0 + Duration::from_micros(offset_us)
    }
}

enum Flow {
    Continue,
    Metadata,
    Closed(String),
}

/// Runs one stream to the end; never panics, every failure is an error kind in the outcome.
pub async fn run_stream(
    ctx: Arc<RealtimeCtx>,
    index: usize,
    user: String,
    start_delay: Duration,
) -> StreamOutcome {
    tokio::time::sleep(start_delay).await;
    let mut out = StreamOutcome {
        user,
        start_clip: index % ctx.corpus.clips.len(),
        ..StreamOutcome::default()
    };
    let mut ws = match connect(&ctx, &mut out).await {
        Ok(ws) => ws,
        Err(kind) => {
            out.error(&ctx.live, kind);
            ctx.live.streams_done.fetch_add(1, Relaxed);
            return out;
        }
    };
    ctx.live.stream_opened();
    // The whole session is bounded: sending takes frames × interval, then the close timeout.
    let send_time = Duration::from_secs_f64(
        ctx.frames_per_stream as f64 * FRAME_MS as f64 / 1_000.0 / ctx.pace,
    );
    let bound = send_time + ctx.close_timeout + Duration::from_secs(30);
    match tokio::time::timeout(bound, session(&ctx, &mut ws, &mut out)).await {
        Ok(()) => {}
        Err(_) => out.error(&ctx.live, "session_timeout"),
    }
    ctx.live.stream_closed();
    ctx.live.streams_done.fetch_add(1, Relaxed);
    out
}

async fn connect(ctx: &RealtimeCtx, out: &mut StreamOutcome) -> Result<Ws, String> {
    let mut req = ctx
        .ws_url
        .as_str()
        .into_client_request()
        .map_err(|_| "bad_url".to_owned())?;
    let header = ctx.auth.header(&out.user)?;
    let value = HeaderValue::from_str(&header).map_err(|_| "bad_auth_header".to_owned())?;
    req.headers_mut().insert(AUTHORIZATION, value);
    let started = Instant::now();
    let connecting = tokio_tungstenite::connect_async_with_config(req, Some(ws_config()), true);
    match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Ok(Ok((ws, _))) => {
            out.setup_us = Some(started.elapsed().as_micros() as u64);
            Ok(ws)
        }
        Ok(Err(e)) => Err(connect_error_kind(&e)),
        Err(_) => Err("connect_timeout".into()),
    }
}

/// Server events are a few hundred bytes. tungstenite's default 128 KiB read buffer is zero-filled up to
/// its capacity on every read: that `memset` was 52 % of the harness's CPU at 300 streams (and 128 KiB of
/// RSS per stream).
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(0)
}

fn connect_error_kind(e: &WsError) -> String {
    match e {
        WsError::Http(resp) => format!("upgrade_http_{}", resp.status().as_u16()),
        WsError::Io(io) => format!("connect_io_{:?}", io.kind()).to_lowercase(),
        _ => "connect_failed".into(),
    }
}

async fn session(ctx: &RealtimeCtx, ws: &mut Ws, out: &mut StreamOutcome) {
    let interval_ns = (FRAME_MS as f64 * 1e6 / ctx.pace).round().max(1.0) as u64;
    let mut clock = Clock {
        t0: Instant::now(),
        interval_ns,
        sent: 0,
        ring: vec![0u64; SEND_RING].into_boxed_slice(),
    };
    let mut next_keepalive = clock.t0 + ctx.keepalive;
    let mut unreported = 0u64;
    let sleep = tokio::time::sleep_until(clock.t0);
    tokio::pin!(sleep);
    while clock.sent < ctx.frames_per_stream {
        let deadline = clock.t0 + Duration::from_nanos(clock.sent * interval_ns);
        sleep.as_mut().reset(deadline);
        tokio::select! {
            biased;
            msg = ws.next() => match on_message(ctx, msg, &clock, out) {
                Flow::Continue => {}
                Flow::Metadata => {
                    out.error(&ctx.live, "metadata_before_close");
                    return;
                }
                Flow::Closed(kind) => {
                    out.error(&ctx.live, kind);
                    return;
                }
            },
            () = &mut sleep => {
                let frame = ctx.corpus.frame(out.start_clip, clock.sent).clone();
                let now = Instant::now();
                if ws.send(Message::Binary(frame)).await.is_err() {
                    out.error(&ctx.live, "send_failed");
                    return;
                }
                clock.ring[(clock.sent % SEND_RING as u64) as usize] =
                    now.duration_since(clock.t0).as_micros() as u64;
                clock.sent += 1;
                out.frames_sent = clock.sent;
                unreported += 1;
                if unreported == LIVE_BATCH {
                    ctx.live.frames_sent.fetch_add(unreported, Relaxed);
                    unreported = 0;
                }
                if now >= next_keepalive {
                    next_keepalive += ctx.keepalive;
                    if ws.send(Message::text(r#"{"type":"KeepAlive"}"#)).await.is_err() {
                        out.error(&ctx.live, "send_failed");
                        return;
                    }
                }
            }
        }
    }
    ctx.live.frames_sent.fetch_add(unreported, Relaxed);
    close(ctx, ws, &clock, out).await;
}

/// `CloseStream`, then read until `metadata` and the server's close.
async fn close(ctx: &RealtimeCtx, ws: &mut Ws, clock: &Clock, out: &mut StreamOutcome) {
    let closing = Instant::now();
    if ws
        .send(Message::text(r#"{"type":"CloseStream"}"#))
        .await
        .is_err()
    {
        out.error(&ctx.live, "send_failed");
        return;
    }
    let deadline = closing + ctx.close_timeout;
    loop {
        let msg = match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(msg) => msg,
            Err(_) => {
                let kind = if out.metadata.is_some() {
                    "close_timeout"
                } else {
                    "metadata_timeout"
                };
                out.error(&ctx.live, kind);
                return;
            }
        };
        match on_message(ctx, msg, clock, out) {
            Flow::Continue => {}
            Flow::Metadata => {
                out.close_us = Some(closing.elapsed().as_micros() as u64);
                out.held = out.errors.is_empty();
            }
            Flow::Closed(kind) => {
                if out.metadata.is_none() {
                    out.held = false;
                    out.error(&ctx.live, format!("{kind}_before_metadata"));
                } else if kind != "closed_1000" && kind != "eof" {
                    out.error(&ctx.live, format!("{kind}_after_metadata"));
                }
                return;
            }
        }
    }
}

fn on_message(
    ctx: &RealtimeCtx,
    msg: Option<Result<Message, WsError>>,
    clock: &Clock,
    out: &mut StreamOutcome,
) -> Flow {
    let received = Instant::now();
    let text = match msg {
        None => return Flow::Closed("eof".into()),
        Some(Err(WsError::ConnectionClosed)) => return Flow::Closed("eof".into()),
        Some(Err(_)) => return Flow::Closed("read_failed".into()),
        Some(Ok(Message::Close(frame))) => {
            let code = frame.map(|f| u16::from(f.code)).unwrap_or(1005);
            let code = if code == u16::from(CloseCode::Normal) {
                1000
            } else {
                code
            };
            return Flow::Closed(format!("closed_{code}"));
        }
        Some(Ok(Message::Text(t))) => t,
        Some(Ok(_)) => return Flow::Continue,
    };
    if text.as_str() == "ping" {
        return Flow::Continue;
    }
    let Ok(event) = serde_json::from_str::<Event>(text.as_str()) else {
        out.error(&ctx.live, "unparsable_event");
        return Flow::Continue;
    };
    out.events += 1;
    ctx.live.events.fetch_add(1, Relaxed);
    let frames = event.frames_received.unwrap_or(0);
    if frames > clock.sent {
        out.error(&ctx.live, "event_ahead_of_frames_sent");
    }
    match event.kind {
        "metadata" => {
            out.metadata = Some(Metadata {
                frames_received: frames,
                frames_dropped: event.frames_dropped.unwrap_or(0),
                audio_ms: event.audio_ms.unwrap_or(0),
                speech_ms: event.speech_ms.and_then(|v| v.as_u64()).unwrap_or(0),
                stt_forwarded_ms: event.stt_forwarded_ms.unwrap_or(0),
            });
            return Flow::Metadata;
        }
        "frames_dropped" => {
            out.dropped_events += event.frames_dropped.unwrap_or(0);
            out.error(&ctx.live, "server_frames_dropped");
        }
        _ => {}
    }
    if (1..=clock.sent).contains(&frames) {
        let sent = clock.sent_at(frames - 1);
        out.latencies_us
            .push(received.saturating_duration_since(sent).as_micros() as u64);
        out.latency_kinds.push(kind_index(event.kind));
    }
    Flow::Continue
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_documented_event_parses() {
        let usage = r#"{"type":"usage","frames_received":1,"session_speech_ms":2,"speech_ms":{"daily_ms":3,"three_day_ms":4,"weekly_ms":5,"month_ms":6},"stage":"warning"}"#;
        let e: Event = serde_json::from_str(usage).unwrap();
        assert_eq!((e.kind, e.frames_received), ("usage", Some(1)));
        let meta = r#"{"type":"metadata","frames_received":9,"frames_dropped":1,"audio_ms":90,"speech_ms":40,"stt_forwarded_ms":40}"#;
        let e: Event = serde_json::from_str(meta).unwrap();
        assert_eq!(e.speech_ms.and_then(|v| v.as_u64()), Some(40));
        let dropped = r#"{"type":"frames_dropped","frames_received":9,"frames_dropped":3,"reason":"ring_full"}"#;
        let e: Event = serde_json::from_str(dropped).unwrap();
        assert_eq!(e.frames_dropped, Some(3));
    }

    #[test]
    fn send_time_comes_from_the_ring_then_from_the_deadline() {
        let t0 = Instant::now();
        let mut clock = Clock {
            t0,
            interval_ns: 10_000_000,
            sent: 3,
            ring: vec![0u64; SEND_RING].into_boxed_slice(),
        };
        clock.ring[2] = 25_000;
        assert_eq!(clock.sent_at(2), t0 + Duration::from_micros(25_000));
        clock.sent = SEND_RING as u64 + 10;
        assert_eq!(clock.sent_at(2), t0 + Duration::from_millis(20));
    }
}

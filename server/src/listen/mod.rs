//! `GET /v4/listen`: the realtime websocket (contract in `docs/protocol.md`).
//!
//! - `admit`: one admission for both paths: the upgrade is authenticated (401) and admitted by the
//!   [`SessionRegistry`] (429 / 503) before any socket exists; parameters the server cannot serve close
//!   the socket with 1008 and the reason.
//! - `front`: a connection whose first request is the listen upgrade is answered by [`ListenFront`] on the
//!   HTTP worker, then its socket moves to the session's pipeline thread (the usual path).
//! - This module's actix-web route: an upgrade on a connection that already carried a request. The HTTP
//!   worker only moves bytes between the request payload, two bounded channels and the response body.
//! - `conn`: either way the websocket itself (frames, control messages, pings, idle, drain, close codes) is
//!   spoken by the session's pipeline thread on every tick, over the socket or the channels: the
//!   connection is the session's [`Transport`](voicegate_engine::pipeline::live::Transport). `run_on`
//!   runs the session and turns the way it ended into a close code (`close_frame`). The pipeline half
//!   ([`voicegate_engine::pipeline::live`]) decodes, resamples, runs the VAD, sends the events, meters,
//!   applies the STT allowance, closes conversations, and sends the final `metadata`.

mod admit;
mod conn;
pub mod front;
pub mod params;

use std::sync::Arc;
use std::time::Duration;

use actix_codec::Encoder;
use actix_http::ws::{self, CloseCode};
use actix_web::{HttpRequest, HttpResponse, web};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use tokio::sync::mpsc;
use voicegate_engine::audio::codec::Codec;
use voicegate_engine::pipeline::live::load::TickLagWindow;
use voicegate_engine::pipeline::live::{
    FeedConfig, LiveConfig, LiveServices, PipelinePool, SessionParams, run_session,
};
use voicegate_engine::stt::SttProvider;
use voicegate_engine::telemetry as t;

use crate::auth::Authenticator;
use crate::config::ServeConfig;
use crate::engine::Engine;
use crate::error::ApiError;
use crate::sessions::{DRAIN_CLOSE_REASON, SessionGuard, SessionRegistry};
use admit::{Admission, admit};
use conn::{ChannelWire, ConnParts, Wire, WsConn};
pub use front::ListenFront;
pub use params::{ListenParams, ParamError};

/// Server → client text heartbeat interval.
pub const PING_INTERVAL: Duration = Duration::from_secs(10);
/// Bytes of ring per ms of Opus audio: 64 kbit/s (far above a voice packet) plus the 6-byte record header
/// of one 10 ms packet.
const OPUS_RING_BYTES_PER_MS: u64 = 9;
/// Chunks in flight each way between the HTTP worker and the pipeline thread of an actix-web upgrade
/// (the payload arrives in chunks of up to 32 KB; events are small).
const CHANNEL_CHUNKS: usize = 16;
/// Longest close reason: a control frame's payload is at most 125 bytes, 2 of them the code.
const MAX_CLOSE_REASON: usize = 123;

/// What every listen session shares: the pipeline threads, the engine services, the limits.
pub struct ListenState {
    pool: PipelinePool,
    services: Arc<LiveServices>,
    live: LiveConfig,
    buffer_ms: u64,
    max_message_bytes: usize,
    idle_timeout: Duration,
}

impl ListenState {
    /// Starts the pipeline threads (`VOICEGATE_LISTEN_THREADS`) and loads the VAD model now, so the first
    /// session does not pay for it. Must run inside an actix `System`.
    pub fn start(cfg: &ServeConfig, services: LiveServices, live: LiveConfig) -> Self {
        match voicegate_engine::audio::vad::SileroModel::shared() {
            Ok(model) => tracing::info!(
                message = "VAD model loaded.",
                backend = model.backend_name()
            ),
            Err(error) => tracing::error!(
                message = "VAD model failed to load; listen sessions will close with 1011.",
                %error
            ),
        }
        let pool = PipelinePool::start(cfg.listen_threads);
        tracing::info!(
            message = "Listen pipeline threads started.",
            threads = pool.threads()
        );
        ListenState {
            pool,
            services: Arc::new(services),
            live: LiveConfig {
                tick: Duration::from_millis(cfg.listen_tick_ms.max(1)),
                pace: cfg.listen_pace(),
                ..live
            },
            buffer_ms: cfg.listen_buffer_ms,
            max_message_bytes: cfg.ws_max_message_bytes,
            idle_timeout: Duration::from_secs(cfg.ws_idle_timeout_secs.max(1)),
        }
    }
}

/// What the server mounts for `GET /v4/listen`: the front door and the route's shared state.
pub struct Mounted {
    pub front: Arc<ListenFront>,
    pub state: web::Data<ListenState>,
}

/// Builds `GET /v4/listen` for an engine-wired server: starts the pipeline threads and shares the engine's
/// fair use, plans, conversations and clock, and the node's speech-to-text provider, with every session.
/// The caller (`crate::serve::mount_engine`) registers the front door, the state and [`configure`].
/// Must run inside an actix `System`.
pub fn mount(
    config: &ServeConfig,
    auth: web::Data<Authenticator>,
    sessions: SessionRegistry,
    engine: &Engine,
    stt: Arc<dyn SttProvider>,
) -> Mounted {
    let services = LiveServices {
        fair_use: engine.fair_use.clone(),
        plans: Arc::clone(&engine.plans),
        conversations: Arc::clone(&engine.conversations),
        stt,
        clock: Arc::clone(&engine.clock),
        // Read by admission control when it is on; otherwise only reported into.
        tick_lag: sessions.load_gate().map_or_else(
            || {
                Arc::new(TickLagWindow::new(Duration::from_millis(
                    config.admission.lag_ms,
                )))
            },
            |gate| gate.tick_lag(),
        ),
    };
    let live = LiveConfig {
        pipeline: engine.pipeline,
        stt: FeedConfig {
            preroll: Duration::from_millis(config.stt_preroll_ms),
            ..FeedConfig::default()
        },
        ..LiveConfig::default()
    };
    let state = Arc::new(ListenState::start(config, services, live));
    let front = ListenFront::new(Arc::clone(&state), auth, sessions);
    Mounted {
        front: Arc::new(front),
        state: web::Data::from(state),
    }
}

/// Mounts `GET /v4/listen` (needs `web::Data<ListenState>` in the app data).
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/v4/listen", web::get().to(listen));
}

async fn listen(
    req: HttpRequest,
    body: web::Payload,
    auth: web::Data<Authenticator>,
    sessions: web::Data<SessionRegistry>,
    state: web::Data<ListenState>,
) -> Result<HttpResponse, ApiError> {
    let Admission {
        guard,
        params,
        upgrade,
    } = admit(&auth, &sessions, req.head(), req.query_string()).await?;
    let (in_tx, in_rx) = mpsc::channel::<Bytes>(CHANNEL_CHUNKS);
    let (out_tx, mut out_rx) = mpsc::channel::<Bytes>(CHANNEL_CHUNKS);
    let body_stream = futures_util::stream::poll_fn(move |cx| {
        out_rx
            .poll_recv(cx)
            .map(|chunk| chunk.map(Ok::<_, std::convert::Infallible>))
    });
    let mut upgrade = upgrade;
    let resp = HttpResponse::from(
        upgrade
            .message_body(actix_web::body::BodyStream::new(body_stream))
            .map_err(|e| ApiError::internal("ws_response", e))?,
    )
    .map_into_boxed_body();
    match params {
        Ok(params) => {
            let state = state.into_inner();
            actix_web::rt::spawn(carry_payload(body, in_tx));
            let wire = ChannelWire::new(in_rx, out_tx.clone());
            let spawned = state.pool.spawn({
                let state = Arc::clone(&state);
                move || run_on(state, params, guard, wire, BytesMut::new(), "http_worker")
            });
            if spawned.is_err() {
                send_close(&out_tx, CloseCode::Error, "server stopping".to_owned());
            }
        }
        Err(e) => {
            metrics::counter!(t::LISTEN_SESSIONS_CLOSED_TOTAL, "reason" => "bad_params")
                .increment(1);
            send_close(&out_tx, CloseCode::Policy, e.to_string());
            drop(guard);
        }
    }
    Ok(resp)
}

/// Moves the request payload (the client's websocket bytes) into the session's channel; the channel's
/// bound is the backpressure. Ends when the client does or the session drops its end.
async fn carry_payload(mut body: web::Payload, to_session: mpsc::Sender<Bytes>) {
    while let Some(chunk) = body.next().await {
        let Ok(chunk) = chunk else { break };
        if to_session.send(chunk).await.is_err() {
            break;
        }
    }
}

/// Queues a close frame as the whole answer of an upgrade that never became a session.
fn send_close(out: &mpsc::Sender<Bytes>, code: CloseCode, reason: String) {
    let mut frame = BytesMut::new();
    if ws::Codec::new()
        .encode(close_message(code, Some(reason)), &mut frame)
        .is_ok()
    {
        let _ = out.try_send(frame.freeze());
    }
}

/// How a session's websocket ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    CloseStream,
    ClientClosed,
    Idle,
    Drain,
    TooLarge,
    Protocol,
    /// The session stopped by itself (pipeline failure).
    SessionFailed,
}

impl End {
    fn reason(self) -> &'static str {
        match self {
            End::CloseStream => "close_stream",
            End::ClientClosed => "client_closed",
            End::Idle => "idle",
            End::Drain => "drain",
            End::TooLarge => "too_large",
            End::Protocol => "protocol",
            End::SessionFailed => "pipeline_error",
        }
    }
}

fn ring_bytes(codec: Codec, buffer_ms: u64) -> usize {
    let per_ms = match codec {
        Codec::Opus { .. } => OPUS_RING_BYTES_PER_MS,
        Codec::Pcm8 | Codec::Pcm16 => u64::from(codec.sample_rate()) * 2 / 1000 + 1,
    };
    usize::try_from(per_ms.saturating_mul(buffer_ms)).unwrap_or(usize::MAX)
}

/// One session on its pipeline thread, speaking the websocket over `wire` on every tick; then the close.
async fn run_on<W: Wire>(
    state: Arc<ListenState>,
    params: ListenParams,
    guard: SessionGuard,
    wire: W,
    leftover: BytesMut,
    transport: &'static str,
) {
    metrics::counter!(t::LISTEN_SESSIONS_OPENED_TOTAL, "transport" => transport).increment(1);
    let session_params = SessionParams {
        uid: Arc::from(guard.uid()),
        codec: params.codec,
        language: params.language.clone(),
        conversation_timeout_ms: params.conversation_timeout_s * 1000,
    };
    let mut conn = WsConn::new(
        wire,
        leftover,
        ConnParts {
            splittable: !params.codec.is_opus(),
            max_message: state.max_message_bytes,
            idle: state.idle_timeout,
            guard,
        },
    );
    let services = Arc::clone(&state.services);
    let queue_bytes = ring_bytes(params.codec, state.buffer_ms);
    let report = run_session(session_params, state.live, services, &mut conn, queue_bytes).await;
    let end = match (report.error, conn.end()) {
        (None, Some(end)) => end,
        _ => End::SessionFailed,
    };
    metrics::counter!(t::LISTEN_SESSIONS_CLOSED_TOTAL, "reason" => end.reason()).increment(1);
    let (code, reason) = close_frame(end, state.max_message_bytes);
    conn.close(code, reason).await;
}

/// The close code and reason of the way a session ended (`docs/protocol.md`, close codes).
fn close_frame(end: End, max_message_bytes: usize) -> (CloseCode, Option<String>) {
    match end {
        End::CloseStream | End::ClientClosed => (CloseCode::Normal, None),
        End::Idle => (CloseCode::Away, Some("idle timeout".to_owned())),
        End::Drain => (CloseCode::Away, Some(DRAIN_CLOSE_REASON.to_owned())),
        End::TooLarge => (
            CloseCode::Size,
            Some(format!(
                "message over {max_message_bytes} bytes (VOICEGATE_WS_MAX_MESSAGE_BYTES)"
            )),
        ),
        End::Protocol => (
            CloseCode::Protocol,
            Some("websocket protocol error".to_owned()),
        ),
        End::SessionFailed => (CloseCode::Error, Some("internal error".to_owned())),
    }
}

/// A close message whose reason fits a control frame (cut at a character boundary: a 1008 names the
/// client's own value, which may be long).
fn close_message(code: CloseCode, reason: Option<String>) -> ws::Message {
    let description = reason.map(|mut r| {
        if r.len() > MAX_CLOSE_REASON {
            let mut cut = MAX_CLOSE_REASON;
            while !r.is_char_boundary(cut) {
                cut -= 1;
            }
            r.truncate(cut);
        }
        r
    });
    ws::Message::Close(Some(ws::CloseReason { code, description }))
}

/// The payload length a websocket frame header at the front of `buf` declares, once the header's length
/// bytes are in (the codec only checks it against its limit once the whole frame has arrived).
fn declared_frame_len(buf: &[u8]) -> Option<u64> {
    let len7 = *buf.get(1)? & 0x7f;
    match len7 {
        126 => Some(u64::from(u16::from_be_bytes([*buf.get(2)?, *buf.get(3)?]))),
        127 => {
            let b: [u8; 8] = buf.get(2..10)?.try_into().ok()?;
            Some(u64::from_be_bytes(b))
        }
        n => Some(u64::from(n)),
    }
}

/// A text control message of the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TextControl {
    KeepAlive,
    Finalize,
    CloseStream,
}

/// The client's text message as the session reads it: the control's name (`KeepAlive`, `Finalize`,
/// `CloseStream`) or why it is ignored (`invalid_json`, `unknown_type`). For the `control` fuzz target.
pub fn read_control(text: &str) -> Result<&'static str, &'static str> {
    control_of(text).map(|c| match c {
        TextControl::KeepAlive => "KeepAlive",
        TextControl::Finalize => "Finalize",
        TextControl::CloseStream => "CloseStream",
    })
}

/// Parses `{"type": …}`; anything else is ignored with a reason (`invalid_json`, `unknown_type`).
fn control_of(text: &str) -> Result<TextControl, &'static str> {
    #[derive(serde::Deserialize)]
    struct Typed<'a> {
        #[serde(rename = "type", borrow)]
        kind: Option<std::borrow::Cow<'a, str>>,
    }
    // Only a JSON object is a control: serde would also read the struct from an array (`["KeepAlive"]`,
    // found by the `control` fuzz target).
    if !text.trim_start().starts_with('{') {
        return Err("invalid_json");
    }
    let typed: Typed<'_> = serde_json::from_str(text).map_err(|_| "invalid_json")?;
    match typed.kind.as_deref() {
        Some("KeepAlive") => Ok(TextControl::KeepAlive),
        Some("Finalize") => Ok(TextControl::Finalize),
        Some("CloseStream") => Ok(TextControl::CloseStream),
        _ => Err("unknown_type"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_messages_and_garbage() {
        assert_eq!(
            control_of(r#"{"type":"KeepAlive"}"#),
            Ok(TextControl::KeepAlive)
        );
        assert_eq!(
            control_of(r#"{"type":"Finalize","x":1}"#),
            Ok(TextControl::Finalize)
        );
        assert_eq!(
            control_of(r#"{"type":"CloseStream"}"#),
            Ok(TextControl::CloseStream)
        );
        assert_eq!(control_of("hello"), Err("invalid_json"));
        assert_eq!(control_of(r#"{"type":"Nope"}"#), Err("unknown_type"));
        assert_eq!(control_of("[1,2]"), Err("invalid_json"));
        // An array holding a control's name is not that control (the `control` fuzz target's crash).
        assert_eq!(control_of(r#"["KeepAlive"] "#), Err("invalid_json"));
        assert_eq!(control_of(r#" ["CloseStream"]"#), Err("invalid_json"));
        assert_eq!(
            control_of(" \n{\"type\":\"KeepAlive\"}"),
            Ok(TextControl::KeepAlive)
        );
    }

    #[test]
    fn a_long_close_reason_is_cut_to_fit_a_control_frame() {
        let long = format!("codec \"{}\" is not supported", "é".repeat(100));
        let ws::Message::Close(Some(reason)) = close_message(CloseCode::Policy, Some(long)) else {
            panic!("not a close");
        };
        let text = reason.description.unwrap_or_default();
        assert!(
            text.len() <= MAX_CLOSE_REASON && text.starts_with("codec \""),
            "{text}"
        );
        let mut frame = BytesMut::new();
        assert!(
            ws::Codec::new()
                .encode(close_message(CloseCode::Policy, Some(text)), &mut frame)
                .is_ok()
        );
        assert!(frame.len() <= 2 + 125);
    }

    #[test]
    fn the_declared_length_of_a_frame_is_read_from_its_header() {
        assert_eq!(declared_frame_len(&[0x82]), None);
        assert_eq!(declared_frame_len(&[0x82, 0x85]), Some(5));
        assert_eq!(declared_frame_len(&[0x82, 0xfe, 0x01]), None);
        assert_eq!(declared_frame_len(&[0x82, 0xfe, 0x01, 0x00]), Some(256));
        let mut huge = vec![0x82, 0xff];
        huge.extend_from_slice(&(1u64 << 40).to_be_bytes());
        assert_eq!(declared_frame_len(&huge), Some(1 << 40));
    }

    #[test]
    fn ring_holds_the_configured_audio_time() {
        assert_eq!(ring_bytes(Codec::Pcm16, 2000), 66_000);
        assert_eq!(ring_bytes(Codec::Opus { rate: 16_000 }, 2000), 18_000);
    }
}

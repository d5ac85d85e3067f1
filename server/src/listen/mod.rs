//! `GET /v4/listen`: the realtime websocket (contract in `docs/protocol.md`).
//!
//! - The upgrade is authenticated (401) and admitted by the [`SessionRegistry`] (429 / 503) before any
//!   socket exists; parameters the server cannot serve close the socket with 1008 and the reason.
//! - `front` + `conn` (the usual path): a connection whose first request is the listen upgrade is answered
//!   by [`ListenFront`] on the HTTP worker, then its socket moves to the session's pipeline thread, which
//!   reads it on every tick (frames into the session's bounded queue, control frames, pings, idle, drain)
//!   and writes the events.
//! - This module (the same contract for an upgrade on a connection that already carried a request, which
//!   actix-web serves): the session's I/O half on the actix worker moves binary frames into the queue
//!   (drops counted by reason), answers text control messages, pings every 10 s, closes idle sockets.
//! - Both turn the way a session ended into a close code ([`close_frame`]). The pipeline half
//!   ([`voicegate_engine::pipeline::live`]) runs on a pipeline thread: decode → resample → VAD, events,
//!   metering, STT allowance, conversations, and the final `metadata`.

mod conn;
pub mod front;
pub mod params;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use actix_web::{HttpRequest, HttpResponse, web};
use actix_ws::{AggregatedMessage, CloseCode, CloseReason, ProtocolError};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use voicegate_engine::audio::codec::Codec;
use voicegate_engine::pipeline::live::{
    Control, EventSink, FrameCounters, LiveConfig, LiveServices, PipelinePool, SessionInput,
    SessionParams, SessionReport, frame_ring, run_session,
};
use voicegate_engine::stt::NoTranscriber;
use voicegate_engine::telemetry as t;

use crate::auth::AuthedUser;
use crate::config::ServeConfig;
use crate::engine::Engine;
use crate::error::ApiError;
use crate::serve::ServerBuilder;
use crate::sessions::{DRAIN_CLOSE_REASON, SessionGuard, SessionRegistry};
pub use front::ListenFront;
pub use params::{ListenParams, ParamError};

/// Server → client text heartbeat interval.
pub const PING_INTERVAL: Duration = Duration::from_secs(10);
/// Bytes of ring per ms of Opus audio: 64 kbit/s (far above a voice packet) plus the 6-byte record header
/// of one 10 ms packet.
const OPUS_RING_BYTES_PER_MS: u64 = 9;

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
        if let Err(error) = voicegate_engine::audio::vad::SileroModel::shared() {
            tracing::error!(message = "VAD model failed to load; listen sessions will close with 1011.", %error);
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
                ..live
            },
            buffer_ms: cfg.listen_buffer_ms,
            max_message_bytes: cfg.ws_max_message_bytes,
            idle_timeout: Duration::from_secs(cfg.ws_idle_timeout_secs.max(1)),
        }
    }
}

/// Mounts `GET /v4/listen` on an engine-wired server: starts the pipeline threads and shares the engine's
/// fair use, plans, conversations and clock with every session (the transcriber is the no-op default).
/// Must run inside an actix `System`.
pub fn mount(server: &mut ServerBuilder, engine: &Engine) {
    let services = LiveServices {
        fair_use: engine.fair_use.clone(),
        plans: Arc::clone(&engine.plans),
        conversations: Arc::clone(&engine.conversations),
        transcriber: Arc::new(NoTranscriber),
        clock: Arc::clone(&engine.clock),
    };
    let live = LiveConfig {
        pipeline: engine.pipeline,
        ..LiveConfig::default()
    };
    let state = Arc::new(ListenState::start(&server.state().config, services, live));
    let front = ListenFront::new(
        Arc::clone(&state),
        server.state().auth.clone(),
        server.state().sessions.get_ref().clone(),
    );
    server
        .listen_front(Arc::new(front))
        .app_data(web::Data::from(state))
        .routes(configure);
}

/// Mounts `GET /v4/listen` (needs `web::Data<ListenState>` in the app data).
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/v4/listen", web::get().to(listen));
}

async fn listen(
    req: HttpRequest,
    body: web::Payload,
    user: AuthedUser,
    sessions: web::Data<SessionRegistry>,
    state: web::Data<ListenState>,
) -> Result<HttpResponse, ApiError> {
    let guard = sessions.open(&user.uid)?;
    let params = ListenParams::from_query(req.query_string());
    let (resp, session, stream) =
        actix_ws::handle(&req, body).map_err(|e| ApiError::BadRequest {
            code: "ws_handshake",
            message: e.to_string(),
        })?;
    let max = state.max_message_bytes;
    let stream = stream
        .max_frame_size(max)
        .aggregate_continuations()
        .max_continuation_size(max);
    match params {
        Ok(params) => {
            let state = state.into_inner();
            actix_web::rt::spawn(run_socket(state, params, guard, session, stream));
        }
        Err(e) => {
            actix_web::rt::spawn(async move {
                metrics::counter!(t::LISTEN_SESSIONS_CLOSED_TOTAL, "reason" => "bad_params")
                    .increment(1);
                close(session, CloseCode::Policy, Some(e.to_string())).await;
                drop(stream);
                drop(guard);
            });
        }
    }
    Ok(resp)
}

/// How the I/O loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    CloseStream,
    ClientClosed,
    Idle,
    Drain,
    TooLarge,
    Protocol,
    /// The session task stopped by itself (pipeline failure) or vanished.
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

/// The websocket end of a session's events.
struct WsSink(actix_ws::Session);

impl EventSink for WsSink {
    async fn send(&mut self, text: String) -> bool {
        self.0.text(text).await.is_ok()
    }
}

fn ring_bytes(codec: Codec, buffer_ms: u64) -> usize {
    let per_ms = match codec {
        Codec::Opus { .. } => OPUS_RING_BYTES_PER_MS,
        Codec::Pcm8 | Codec::Pcm16 => u64::from(codec.sample_rate()) * 2 / 1000 + 1,
    };
    usize::try_from(per_ms.saturating_mul(buffer_ms)).unwrap_or(usize::MAX)
}

async fn run_socket(
    state: Arc<ListenState>,
    params: ListenParams,
    mut guard: SessionGuard,
    session: actix_ws::Session,
    mut stream: actix_ws::AggregatedMessageStream,
) {
    metrics::counter!(t::LISTEN_SESSIONS_OPENED_TOTAL, "transport" => "http_worker").increment(1);
    let (mut frames, consumer) = frame_ring(ring_bytes(params.codec, state.buffer_ms));
    let counters = Arc::new(FrameCounters::default());
    let (ctrl_tx, ctrl_rx) = mpsc::channel(4);
    let (done_tx, mut done_rx) = oneshot::channel::<SessionReport>();
    let input = SessionInput {
        frames: consumer,
        counters: Arc::clone(&counters),
        control: ctrl_rx,
    };
    let session_params = SessionParams {
        uid: Arc::from(guard.uid()),
        codec: params.codec,
        language: params.language.clone(),
        conversation_timeout_ms: params.conversation_timeout_s * 1000,
    };
    let (services, live, sink) = (
        Arc::clone(&state.services),
        state.live,
        WsSink(session.clone()),
    );
    let spawned = state.pool.spawn(move || async move {
        let report = run_session(session_params, live, services, input, sink).await;
        let _ = done_tx.send(report);
    });
    if spawned.is_err() {
        close(session, CloseCode::Error, Some("server stopping".into())).await;
        return;
    }

    let splittable = !params.codec.is_opus();
    let mut pinger = session.clone();
    let mut seq: u32 = 0;
    let mut last_msg = Instant::now();
    let idle = tokio::time::sleep(state.idle_timeout);
    tokio::pin!(idle);
    let mut ping = tokio::time::interval_at(Instant::now() + PING_INTERVAL, PING_INTERVAL);
    let mut early_report = None;
    // One drain future for the session's life: made afresh on every message, it registered with (and
    // left) the watch channel every session shares, a lock taken 100 times a second per stream.
    let end = {
        let closing = guard.closing();
        tokio::pin!(closing);
        loop {
            tokio::select! {
                biased;
                report = &mut done_rx => {
                    early_report = Some(report.ok());
                    break End::SessionFailed;
                }
                () = &mut closing => break End::Drain,
                msg = stream.recv() => match msg {
                    None => break End::ClientClosed,
                    Some(Err(e)) => break protocol_end(&e),
                    Some(Ok(AggregatedMessage::Binary(bytes))) => {
                        last_msg = Instant::now();
                        seq = seq.wrapping_add(1);
                        counters.received.store(u64::from(seq), Ordering::Relaxed);
                        if bytes.len() <= 2 {
                            continue; // keepalive
                        }
                        if let Err(reason) = frames.push(seq, &bytes, splittable) {
                            counters.dropped(reason).fetch_add(1, Ordering::Relaxed);
                            metrics::counter!(t::LISTEN_FRAMES_DROPPED_TOTAL, "reason" => reason.as_str())
                                .increment(1);
                        }
                    }
                    Some(Ok(AggregatedMessage::Text(text))) => {
                        last_msg = Instant::now();
                        match control_of(&text) {
                            Ok(TextControl::KeepAlive) => {}
                            Ok(TextControl::Finalize) => {
                                // A full control queue already holds a pending Finalize or Stop.
                                let _ = ctrl_tx.try_send(Control::Finalize);
                            }
                            Ok(TextControl::CloseStream) => break End::CloseStream,
                            Err(reason) => {
                                metrics::counter!(t::LISTEN_TEXT_IGNORED_TOTAL, "reason" => reason)
                                    .increment(1);
                            }
                        }
                    }
                    Some(Ok(AggregatedMessage::Ping(bytes))) => {
                        last_msg = Instant::now();
                        let _ = pinger.pong(&bytes).await;
                    }
                    Some(Ok(AggregatedMessage::Pong(_))) => last_msg = Instant::now(),
                    Some(Ok(AggregatedMessage::Close(_))) => break End::ClientClosed,
                },
                _ = ping.tick() => {
                    if pinger.text("ping").await.is_err() {
                        break End::ClientClosed;
                    }
                }
                () = &mut idle => {
                    let deadline = last_msg + state.idle_timeout;
                    if Instant::now() >= deadline {
                        break End::Idle;
                    }
                    idle.as_mut().reset(deadline);
                }
            }
        }
    };
    // Nothing is pushed after this point: the session processes exactly what the ring holds.
    let report = match early_report {
        Some(report) => report,
        None => {
            let _ = ctrl_tx.send(Control::Stop).await;
            done_rx.await.ok()
        }
    };
    let end = match report {
        Some(r) if r.error.is_none() => end,
        _ => End::SessionFailed,
    };
    metrics::counter!(t::LISTEN_SESSIONS_CLOSED_TOTAL, "reason" => end.reason()).increment(1);
    let (code, reason) = close_frame(end, state.max_message_bytes);
    close(session, code, reason).await;
    // The session has metered everything it reported: the drain may now flush the meter.
    drop(guard);
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

fn protocol_end(e: &ProtocolError) -> End {
    match e {
        ProtocolError::Overflow => End::TooLarge,
        // actix-ws reports an aggregated message over the continuation limit as this I/O error.
        ProtocolError::Io(io) if io.to_string().contains("maximum continuation size") => {
            End::TooLarge
        }
        _ => End::Protocol,
    }
}

async fn close(session: actix_ws::Session, code: CloseCode, description: Option<String>) {
    let _ = session.close(Some(CloseReason { code, description })).await;
}

/// A text control message of the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TextControl {
    KeepAlive,
    Finalize,
    CloseStream,
}

/// Parses `{"type": …}`; anything else is ignored with a reason (`invalid_json`, `unknown_type`).
fn control_of(text: &str) -> Result<TextControl, &'static str> {
    #[derive(serde::Deserialize)]
    struct Typed<'a> {
        #[serde(rename = "type", borrow)]
        kind: Option<std::borrow::Cow<'a, str>>,
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
    }

    #[test]
    fn ring_holds_the_configured_audio_time() {
        assert_eq!(ring_bytes(Codec::Pcm16, 2000), 66_000);
        assert_eq!(ring_bytes(Codec::Opus { rate: 16_000 }, 2000), 18_000);
    }
}

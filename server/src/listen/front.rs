//! The listen websocket's front door: a connection whose first request is `GET /v4/listen` is answered here
//! on the HTTP worker that accepted it, then handed to its session's pipeline thread (`super::conn`), which
//! reads it on its own tick. Every other connection goes to actix-web untouched (so does a listen upgrade
//! sent on a connection that already carried a request: the actix-web route in [`super`] serves it, over a
//! `conn::ChannelWire`; there is no actix-ws).
//!
//! The answers are the route's, from the same admission (`super::admit`): 401, 429 / 503, 400
//! `ws_handshake`, 101 then close 1008 (a parameter the server cannot serve), each error with the JSON
//! body of [`ApiError`]; the request's latency is recorded under the route `/v4/listen` as the middleware
//! would.

use std::sync::Arc;
use std::time::Duration;

use actix_codec::{Decoder, Encoder};
use actix_http::body::BodySize;
use actix_http::h1;
use actix_http::header::{self, HeaderValue};
use actix_http::ws;
use actix_http::{ConnectionType, Request, Response, ServiceConfig, StatusCode};
use actix_web::ResponseError;
use actix_web::web;
use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::time::Instant;
use voicegate_engine::telemetry as t;
use voicegate_engine::time::Backoff;

use super::admit::{Admission, admit, record_latency};
use super::{ListenParams, ListenState, close_message, run_on};
use crate::auth::Authenticator;
use crate::error::ApiError;
use crate::sessions::{SessionGuard, SessionRegistry};

/// The request line (method and path) this door takes; the next byte must start the query or end the path.
const LISTEN_LINE: &[u8] = b"GET /v4/listen";
/// How long a new connection may take to send its request head (actix-web's client request timeout).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head read before answering 431.
const MAX_HEAD: usize = 32 * 1024;
/// How soon a connection whose first bytes are a prefix of `LISTEN_LINE` is looked at again; the wait
/// grows (a jittered [`Backoff`]) up to [`PEEK_RETRY_MAX`], so a client that stalls mid-line costs a few
/// wake-ups.
const PEEK_RETRY: Duration = Duration::from_millis(2);
const PEEK_RETRY_MAX: Duration = Duration::from_millis(250);
/// How long a refused upgrade's answer may take to leave, and the client to close after a 1008.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

/// Whether a connection's first bytes are a listen request: `Some(true)` / `Some(false)` once known,
/// `None` while they are a strict prefix of `LISTEN_LINE` and the next bytes decide.
pub fn classify(first: &[u8]) -> Option<bool> {
    let n = LISTEN_LINE.len();
    if first.len() <= n {
        return if LISTEN_LINE.starts_with(first) {
            None
        } else {
            Some(false)
        };
    }
    Some(&first[..n] == LISTEN_LINE && matches!(first[n], b'?' | b' '))
}

/// What a new connection's first bytes say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirstRequest {
    /// `GET /v4/listen`: the front door answers it.
    Listen,
    /// Anything else (or nothing, the client gone): actix-web's.
    Other,
    /// A prefix of the listen line, or nothing at all, until the request timeout.
    TimedOut,
}

/// Peeks at a new connection (never consuming a byte) until [`classify`] decides or `deadline` passes.
pub async fn first_request(io: &TcpStream, deadline: Instant) -> FirstRequest {
    let mut buf = [0u8; 16];
    let mut retry = Backoff::new(PEEK_RETRY, PEEK_RETRY_MAX);
    loop {
        let peeked = tokio::time::timeout_at(deadline, io.peek(&mut buf)).await;
        match peeked {
            Err(_) => return FirstRequest::TimedOut,
            Ok(Ok(0)) | Ok(Err(_)) => return FirstRequest::Other,
            Ok(Ok(n)) => match classify(&buf[..n]) {
                Some(true) => return FirstRequest::Listen,
                Some(false) => return FirstRequest::Other,
                // Part of a request line: the rest is on its way (peek returns at once while unread
                // bytes wait, so pause rather than spin).
                None => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return FirstRequest::TimedOut;
                    }
                    tokio::time::sleep(retry.next_delay().min(left)).await;
                }
            },
        }
    }
}

/// The answer to a connection that sent no request line within the request timeout: 408 (as actix-web
/// answers; given the connection now, it would wait a timeout more) with the JSON error body
/// `request_head_timeout`.
pub async fn answer_timeout(io: TcpStream, config: &ServiceConfig) {
    let mut codec = h1::Codec::new(config.clone());
    answer_status(io, &mut codec, StatusCode::REQUEST_TIMEOUT).await;
}

/// What the door needs: the listen state (pipeline threads, engine services, limits), the token check and
/// the session registry.
pub struct ListenFront {
    state: Arc<ListenState>,
    auth: web::Data<Authenticator>,
    sessions: SessionRegistry,
}

impl ListenFront {
    pub fn new(
        state: Arc<ListenState>,
        auth: web::Data<Authenticator>,
        sessions: SessionRegistry,
    ) -> Self {
        ListenFront {
            state,
            auth,
            sessions,
        }
    }

    /// Answers the connection's listen request (its head due by `deadline`, the one the peek had); on
    /// success the socket leaves for a pipeline thread. `config` is the worker's (one per worker: each
    /// holds a date-header timer).
    pub async fn serve(
        self: Arc<Self>,
        mut io: TcpStream,
        deadline: Instant,
        config: &ServiceConfig,
    ) {
        let mut codec = h1::Codec::new(config.clone());
        let mut buf = BytesMut::with_capacity(1024);
        let Some(mut req) = read_head(&mut io, &mut codec, &mut buf, deadline).await else {
            return;
        };
        // The client address (the auth throttle's key), as actix-web's dispatcher records it.
        req.head_mut().peer_addr = io.peer_addr().ok();
        let started = Instant::now();
        let query = req.uri().query().unwrap_or("");
        let admitted = admit(&self.auth, &self.sessions, req.head(), query).await;
        let Admission {
            guard,
            params,
            mut upgrade,
        } = match admitted {
            Ok(a) => a,
            Err(err) => {
                let status = err.status_code().as_u16();
                answer_error(io, &mut codec, &err).await;
                record_latency(status, started);
                return;
            }
        };
        let upgrade = upgrade.finish().drop_body();
        let mut out = BytesMut::new();
        if codec
            .encode(h1::Message::Item((upgrade, BodySize::None)), &mut out)
            .is_err()
        {
            return;
        }
        let sent = write_all(&mut io, &out).await;
        record_latency(101, started);
        if !sent {
            return;
        }
        let _ = io.set_nodelay(true);
        let params = match params {
            Ok(p) => p,
            Err(e) => {
                metrics::counter!(t::LISTEN_SESSIONS_CLOSED_TOTAL, "reason" => "bad_params")
                    .increment(1);
                close_on_worker(io, ws::CloseCode::Policy, e.to_string()).await;
                drop(guard);
                return;
            }
        };
        self.hand_over(io, buf, params, guard).await;
    }

    /// Moves the socket to the session's pipeline thread and runs the session there.
    async fn hand_over(
        &self,
        io: TcpStream,
        leftover: BytesMut,
        params: ListenParams,
        guard: SessionGuard,
    ) {
        let (tx, rx) = oneshot::channel::<std::net::TcpStream>();
        let state = Arc::clone(&self.state);
        let spawned = self.state.pool.spawn(move || async move {
            if let Ok(stream) = rx.await {
                run_on(state, params, guard, stream, leftover, "pipeline").await;
            }
        });
        if spawned.is_err() {
            close_on_worker(io, ws::CloseCode::Error, "server stopping".to_owned()).await;
            return;
        }
        // Leaves this worker's reactor: from now on only the pipeline thread's ticks read it.
        match io.into_std() {
            Ok(stream) => {
                let _ = tx.send(stream);
            }
            Err(error) => {
                // The session task ends when `tx` drops; its guard goes with it.
                tracing::warn!(message = "Listen socket could not leave the HTTP worker.", %error);
            }
        }
    }
}

/// Reads the request head (the request timeout and [`MAX_HEAD`] bound it). `None` once the connection is
/// answered or gone.
async fn read_head(
    io: &mut TcpStream,
    codec: &mut h1::Codec,
    buf: &mut BytesMut,
    deadline: Instant,
) -> Option<Request> {
    loop {
        let refuse = match codec.decode(buf) {
            Ok(Some(h1::Message::Item(req))) => return Some(req),
            Ok(Some(h1::Message::Chunk(_))) => return None,
            Ok(None) if buf.len() >= MAX_HEAD => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Ok(None) => match tokio::time::timeout_at(deadline, io.read_buf(buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return None,
                Ok(Ok(_)) => continue,
                Err(_) => StatusCode::REQUEST_TIMEOUT,
            },
            Err(actix_http::error::ParseError::TooLarge) => {
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
            }
            Err(_) => StatusCode::BAD_REQUEST,
        };
        // The connection is answered and closed; `io` is left to the caller to drop.
        answer_status_in_place(io, codec, refuse).await;
        return None;
    }
}

/// The JSON error answer of a request head the door could not take (408, 431 or 400), then close.
async fn answer_status(mut io: TcpStream, codec: &mut h1::Codec, status: StatusCode) {
    answer_error_in_place(&mut io, codec, &ApiError::request_head(status)).await;
}

async fn answer_status_in_place(io: &mut TcpStream, codec: &mut h1::Codec, status: StatusCode) {
    answer_error_in_place(io, codec, &ApiError::request_head(status)).await;
}

/// The route's JSON error answer (status, headers and body of [`ApiError::error_response`]), then close.
async fn answer_error(mut io: TcpStream, codec: &mut h1::Codec, err: &ApiError) {
    answer_error_in_place(&mut io, codec, err).await;
}

async fn answer_error_in_place(io: &mut TcpStream, codec: &mut h1::Codec, err: &ApiError) {
    let (res, body) = err.error_response().into_parts();
    let mut res: Response<()> = res.into();
    let body = actix_web::body::to_bytes(body).await.unwrap_or_default();
    res.head_mut().set_connection_type(ConnectionType::Close);
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let mut out = BytesMut::new();
    let size = BodySize::Sized(body.len() as u64);
    if codec
        .encode(h1::Message::Item((res, size)), &mut out)
        .is_ok()
    {
        out.extend_from_slice(&body);
        let _ = write_all(io, &out).await;
    }
    end_answer(io).await;
}

/// Writes `bytes` within [`ANSWER_TIMEOUT`]; false when the client is gone or too slow.
async fn write_all(io: &mut TcpStream, bytes: &[u8]) -> bool {
    matches!(
        tokio::time::timeout(ANSWER_TIMEOUT, io.write_all(bytes)).await,
        Ok(Ok(()))
    )
}

/// Closes an upgraded socket that never became a session (1008, 1011) from the HTTP worker.
async fn close_on_worker(mut io: TcpStream, code: ws::CloseCode, reason: String) {
    let mut out = BytesMut::new();
    let close = close_message(code, Some(reason));
    if ws::Codec::new().encode(close, &mut out).is_err() || !write_all(&mut io, &out).await {
        return;
    }
    end_answer(&mut io).await;
}

/// Ends our side after an answer and reads to the client's end (bounded): closing over unread bytes
/// (a pipelined request, early frames) makes the kernel reset the connection, which can discard the
/// answer before the client reads it.
async fn end_answer(io: &mut TcpStream) {
    let _ = io.shutdown().await;
    let mut sink = [0u8; 1024];
    let _ = tokio::time::timeout(ANSWER_TIMEOUT, async {
        while matches!(io.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_get_of_the_listen_path_takes_the_door() {
        assert_eq!(classify(b"GET /v4/listen?codec=opus HTTP/1.1"), Some(true));
        assert_eq!(classify(b"GET /v4/listen HTTP/1.1"), Some(true));
        assert_eq!(classify(b"GET /v4/listener HTTP/1.1"), Some(false));
        assert_eq!(classify(b"GET /v4/listen/x HTTP/1.1"), Some(false));
        assert_eq!(classify(b"POST /v4/listen HTTP/1.1"), Some(false));
        assert_eq!(classify(b"GET /healthz HTTP/1.1"), Some(false));
        assert_eq!(classify(b"\x16\x03\x01"), Some(false), "a TLS hello");
    }

    #[test]
    fn a_prefix_of_the_listen_line_waits_for_more() {
        assert_eq!(classify(b""), None);
        assert_eq!(classify(b"GET /v4/li"), None);
        assert_eq!(classify(b"GET /v4/listen"), None);
        assert_eq!(classify(b"GET /v5"), Some(false));
    }
}

//! Request timeouts: no phase of a request can hold a connection, a temp folder or a descriptor for as
//! long as the client likes.
//!
//! - **Head** (`VOICEGATE_HEADER_TIMEOUT_SECS`): actix-http's client request timeout and the listen front
//!   door's deadline; a head not complete in time gets 408 and the connection closes.
//! - **Body progress** (`VOICEGATE_BODY_IDLE_TIMEOUT_SECS`) and **whole body** (`VOICEGATE_BODY_TIMEOUT_SECS`):
//!   [`enforce`], a middleware around every route. It wraps the request payload to see each chunk arrive;
//!   a body that stalls, or is not complete by its deadline, ends the request with 408 (`request_body_stalled`
//!   / `request_body_timeout`) and the connection closes. The handler's future is dropped at that moment, so
//!   whatever it held (an upload's temp folder, the body buffered so far) is freed at once.
//!
//! Only the client's part is timed: once the body has ended, the server's own work (decode, VAD, metering)
//! is not cut short by these timers. Requests without a body (no `Content-Length` > 0, not chunked) and
//! websocket upgrades (the body is the socket) are passed through.

use std::cell::Cell;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

use actix_web::body::MessageBody;
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::http::header;
use actix_web::middleware::Next;
use actix_web::{HttpMessage, web};
use bytes::Bytes;
use futures_util::Stream;
use tokio::time::Instant;
use voicegate_engine::telemetry::HTTP_REQUEST_TIMEOUTS_TOTAL;

use crate::config::ServeConfig;
use crate::error::ApiError;

/// The timeouts of one request's phases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestTimeouts {
    /// From the connection (or the previous answer) to a complete request head.
    pub header: Duration,
    /// Longest wait for the next body byte.
    pub body_idle: Duration,
    /// From the head to the body's end.
    pub body_total: Duration,
}

impl ServeConfig {
    /// The request timeouts (head, body progress, whole body). Defined here, not in `config`, so that
    /// `config` does not import `timeouts` back.
    pub fn request_timeouts(&self) -> RequestTimeouts {
        RequestTimeouts {
            header: Duration::from_secs(self.header_timeout_secs),
            body_idle: Duration::from_secs(self.body_idle_timeout_secs),
            body_total: Duration::from_secs(self.body_timeout_secs),
        }
    }
}

/// What the payload wrapper saw, shared with the watchdog (one worker thread: `Cell`s suffice).
struct Progress {
    last: Cell<Instant>,
    ended: Cell<bool>,
}

/// The request payload, noting every chunk's arrival and its end.
struct TimedPayload {
    inner: Payload,
    progress: Rc<Progress>,
}

impl Stream for TimedPayload {
    type Item = Result<Bytes, actix_web::error::PayloadError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let polled = Pin::new(&mut self.inner).poll_next(cx);
        match &polled {
            Poll::Ready(Some(Ok(_))) => self.progress.last.set(Instant::now()),
            Poll::Ready(None | Some(Err(_))) => self.progress.ended.set(true),
            Poll::Pending => {}
        }
        polled
    }
}

/// Whether the request carries a body the client still has to send.
fn has_body(req: &ServiceRequest) -> bool {
    let headers = req.headers();
    if headers.contains_key(header::UPGRADE) {
        return false;
    }
    let chunked = headers
        .get(header::TRANSFER_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    chunked || declared > 0
}

/// Middleware (`middleware::from_fn(timeouts::enforce)`): the body timeouts of every request with a body.
pub async fn enforce<B: MessageBody + 'static>(
    mut req: ServiceRequest,
    next: Next<B>,
) -> Result<ServiceResponse<B>, actix_web::Error> {
    let timeouts = req
        .app_data::<web::Data<ServeConfig>>()
        .map(|cfg| cfg.request_timeouts());
    let Some(timeouts) = timeouts.filter(|_| has_body(&req)) else {
        return next.call(req).await;
    };
    let started = Instant::now();
    let progress = Rc::new(Progress {
        last: Cell::new(started),
        ended: Cell::new(false),
    });
    let inner = req.take_payload();
    let timed: actix_http::BoxedPayloadStream = Box::pin(TimedPayload {
        inner,
        progress: Rc::clone(&progress),
    });
    req.set_payload(Payload::from(timed));
    let path = req.path().to_owned();
    // Owned (boxed) so that dropping it below really drops the handler's future.
    let mut call = Box::pin(next.call(req));
    let total_deadline = started + timeouts.body_total;
    let phase = loop {
        if progress.ended.get() {
            // The client's part is done; the server's work is not timed here.
            return call.await;
        }
        let idle_deadline = progress.last.get() + timeouts.body_idle;
        let deadline = idle_deadline.min(total_deadline);
        tokio::select! {
            res = &mut call => return res,
            () = tokio::time::sleep_until(deadline) => {}
        }
        if progress.ended.get() {
            continue;
        }
        let now = Instant::now();
        if now >= total_deadline {
            break "body_total";
        }
        if now >= progress.last.get() + timeouts.body_idle {
            break "body_idle";
        }
    };
    // Dropping the handler's future here frees what it held (temp folder, buffered body) before answering.
    drop(call);
    metrics::counter!(HTTP_REQUEST_TIMEOUTS_TOTAL, "phase" => phase).increment(1);
    let err = if phase == "body_total" {
        ApiError::request_timeout(
            "request_body_timeout",
            format!(
                "the request body was not complete within {} s (VOICEGATE_BODY_TIMEOUT_SECS)",
                timeouts.body_total.as_secs()
            ),
        )
    } else {
        ApiError::request_timeout(
            "request_body_stalled",
            format!(
                "no request body byte arrived for {} s (VOICEGATE_BODY_IDLE_TIMEOUT_SECS)",
                timeouts.body_idle.as_secs()
            ),
        )
    };
    tracing::info!(message = "Request body timed out.", phase, %path);
    // The rest of the body may still come: the connection cannot carry another request.
    Err(err.closing_connection().into())
}

//! The request-head errors actix-http answers itself (400 for a head it cannot parse, 408 for a head that
//! did not come in time, 431 for a head over its limit) carry an empty body; every other refusal carries
//! the JSON error shape ([`ApiError`]). [`JsonHeadErrors`] wraps a connection's socket and rewrites exactly
//! those answers as they are written: a response head starting `HTTP/1.1 400 | 408 | 431` with
//! `content-length: 0` gets the JSON body (`bad_request`, `request_head_timeout`,
//! `request_head_too_large`) and its length. The app's own answers always have a JSON body (the
//! `json_bodies` middleware), so they never match; anything else (a partial write, the bytes of a
//! websocket) passes through untouched. The check is a prefix compare per write.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use actix_web::http::StatusCode;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::error::ApiError;

const EMPTY_LENGTH: &[u8] = b"content-length: 0\r\n";
const HEAD_END: &[u8] = b"\r\n\r\n";

/// A connection whose head-level error answers get the JSON error body.
pub struct JsonHeadErrors<T> {
    io: T,
    /// A rewritten answer being written, and how many bytes of the original it stands for.
    pending: Option<(Vec<u8>, usize, usize)>,
}

impl<T> JsonHeadErrors<T> {
    pub fn new(io: T) -> Self {
        JsonHeadErrors { io, pending: None }
    }
}

/// The JSON answer standing for `head` (the start of a write), when it is one of actix-http's own empty
/// head-level error answers; with the length of the original it replaces.
fn rewrite(buf: &[u8]) -> Option<(Vec<u8>, usize)> {
    let status = match buf.get(..13)? {
        b"HTTP/1.1 400 " => StatusCode::BAD_REQUEST,
        b"HTTP/1.1 408 " => StatusCode::REQUEST_TIMEOUT,
        b"HTTP/1.1 431 " => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        _ => return None,
    };
    let head_len = buf.windows(HEAD_END.len()).position(|w| w == HEAD_END)? + HEAD_END.len();
    let head = &buf[..head_len];
    let at = head
        .windows(EMPTY_LENGTH.len())
        .position(|w| w.eq_ignore_ascii_case(EMPTY_LENGTH))?;
    let err = ApiError::request_head(status);
    let body = err.body().to_string();
    let mut out = Vec::with_capacity(head_len + body.len() + 96);
    out.extend_from_slice(&head[..at]);
    out.extend_from_slice(
        format!(
            "content-length: {}\r\ncontent-type: application/json\r\n",
            body.len()
        )
        .as_bytes(),
    );
    if let Some(secs) = err.retry_after_s() {
        out.extend_from_slice(format!("retry-after: {secs}\r\n").as_bytes());
    }
    out.extend_from_slice(&head[at + EMPTY_LENGTH.len()..]);
    out.extend_from_slice(body.as_bytes());
    Some((out, head_len))
}

impl<T: AsyncRead + Unpin> AsyncRead for JsonHeadErrors<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for JsonHeadErrors<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.pending.is_none() {
            match rewrite(buf) {
                Some((out, replaces)) => this.pending = Some((out, 0, replaces)),
                None => return Pin::new(&mut this.io).poll_write(cx, buf),
            }
        }
        let Some((out, written, replaces)) = this.pending.as_mut() else {
            return Poll::Ready(Ok(0));
        };
        while *written < out.len() {
            match Pin::new(&mut this.io).poll_write(cx, &out[*written..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => *written += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        let done = (*replaces).min(buf.len());
        this.pending = None;
        Poll::Ready(Ok(done))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_head_error_gets_the_json_body_and_its_length() {
        let canned = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\nconnection: close\r\ndate: x\r\n\r\n";
        let (out, replaces) = rewrite(canned).unwrap_or_default();
        assert_eq!(replaces, canned.len());
        let text = String::from_utf8_lossy(&out).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or_default();
        assert!(head.starts_with("HTTP/1.1 431 "), "{head}");
        assert!(
            head.contains(&format!("content-length: {}\r\n", body.len())),
            "{head}"
        );
        assert!(
            head.contains("connection: close") && head.contains("date: x"),
            "{head}"
        );
        let body: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
        assert_eq!(body["code"], "request_head_too_large");
        let timeout = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\n\r\n";
        let (out, _) = rewrite(timeout).unwrap_or_default();
        assert!(String::from_utf8_lossy(&out).contains("retry-after: 1\r\n"));
    }

    #[test]
    fn other_writes_pass_untouched() {
        for buf in [
            &b"HTTP/1.1 400 Bad Request\r\ncontent-length: 42\r\n\r\n{"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n",
            b"\x81\x05hello",
            b"",
        ] {
            assert!(rewrite(buf).is_none(), "{:?}", String::from_utf8_lossy(buf));
        }
    }
}

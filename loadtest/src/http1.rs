//! A minimal HTTP/1.1 client over one TCP connection, for the retry storm: the harness must know what a
//! refusal costs on the wire, which a pooled client hides. It sends a prebuilt request (head and body in
//! one buffer, re-sent as is, as a retrying client re-sends its body), reads one `Content-Length`
//! response, keeps the connection while the server does, and counts the connections it opened.
//!
//! The server may answer a refused upload before reading its body and then close the connection
//! (actix closes one whose request body is unread): the next request opens a new one, and a reused
//! connection the server closed while idle is retried once on a fresh one, as pooled clients do.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest response head accepted.
const MAX_HEAD: usize = 16 * 1024;
/// Largest response body accepted (refusals and upload reports are a few KiB).
const MAX_BODY: usize = 4 << 20;

/// One answer.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
    /// `Retry-After`, when the server sent one in seconds.
    pub retry_after_s: Option<u64>,
}

/// A connection to one `host:port`, opened on demand.
#[derive(Debug)]
pub struct Client {
    authority: String,
    conn: Option<TcpStream>,
    buf: Vec<u8>,
    timeout: Duration,
    /// TCP connections opened so far.
    pub connections: u64,
}

/// The `host:port` of an `http://` base URL (`https://` is not supported, as for the realtime streams).
pub fn authority(base_url: &str) -> Result<String, String> {
    let rest = base_url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{base_url}: the retry storm supports http:// URLs only"))?;
    let host = rest.split('/').next().unwrap_or_default();
    if host.is_empty() {
        return Err(format!("{base_url}: no host"));
    }
    Ok(if host.contains(':') {
        host.to_owned()
    } else {
        format!("{host}:80")
    })
}

/// A request's bytes: the head (with `Host` and `Content-Length`) followed by `body`.
pub fn request(
    method: &str,
    authority: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Vec<u8> {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {authority}\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    let mut out = head.into_bytes();
    out.extend_from_slice(body);
    out
}

fn io_kind(what: &str, e: &std::io::Error) -> String {
    format!("{what}_io_{:?}", e.kind()).to_lowercase()
}

impl Client {
    pub fn new(authority: String, timeout: Duration) -> Client {
        Client {
            authority,
            conn: None,
            buf: Vec::with_capacity(4096),
            timeout,
            connections: 0,
        }
    }

    pub fn authority(&self) -> &str {
        &self.authority
    }

    /// Sends `req` (from [`request`]) and reads the answer; an error is a short kind for the report.
    pub async fn send(&mut self, req: &[u8]) -> Result<Response, String> {
        match tokio::time::timeout(self.timeout, self.send_inner(req)).await {
            Ok(r) => r,
            Err(_) => {
                self.conn = None;
                Err("request_timeout".into())
            }
        }
    }

    async fn send_inner(&mut self, req: &[u8]) -> Result<Response, String> {
        let reused = self.conn.is_some();
        match self.exchange(req).await {
            // The server closed the idle connection before this request reached it: once more on a new one.
            Err(Exchange::ClosedBeforeAnswer) if reused => match self.exchange(req).await {
                Ok(r) => Ok(r),
                Err(e) => Err(e.kind()),
            },
            Ok(r) => Ok(r),
            Err(e) => Err(e.kind()),
        }
    }

    async fn exchange(&mut self, req: &[u8]) -> Result<Response, Exchange> {
        let mut conn = match self.conn.take() {
            Some(c) => c,
            None => {
                let c = TcpStream::connect(&self.authority)
                    .await
                    .map_err(|e| Exchange::Failed(io_kind("connect", &e)))?;
                c.set_nodelay(true)
                    .map_err(|e| Exchange::Failed(io_kind("connect", &e)))?;
                self.connections += 1;
                c
            }
        };
        // A write cut short may still have an answer behind it (the server refused before reading the
        // body, then closed): read it before counting the write as failed.
        let written = conn.write_all(req).await;
        let answer = read_response(&mut conn, &mut self.buf).await;
        match (answer, written) {
            (Ok((resp, keep)), written) => {
                if keep && written.is_ok() {
                    self.conn = Some(conn);
                }
                Ok(resp)
            }
            (Err(Exchange::ClosedBeforeAnswer), Ok(())) => Err(Exchange::ClosedBeforeAnswer),
            (Err(_), Err(e)) => Err(Exchange::Failed(io_kind("write", &e))),
            (Err(e), Ok(())) => Err(e),
        }
    }
}

enum Exchange {
    /// EOF before the first byte of an answer.
    ClosedBeforeAnswer,
    Failed(String),
}

impl Exchange {
    fn kind(self) -> String {
        match self {
            Exchange::ClosedBeforeAnswer => "closed_before_answer".into(),
            Exchange::Failed(k) => k,
        }
    }
}

/// Reads one response; returns it and whether the connection may carry another request.
async fn read_response(
    conn: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> Result<(Response, bool), Exchange> {
    buf.clear();
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > MAX_HEAD {
            return Err(Exchange::Failed("response_head_too_large".into()));
        }
        let n = read_more(conn, buf).await?;
        if n == 0 {
            return Err(if buf.is_empty() {
                Exchange::ClosedBeforeAnswer
            } else {
                Exchange::Failed("response_truncated".into())
            });
        }
    };
    let head = parse_head(&buf[..head_end]).map_err(Exchange::Failed)?;
    let len = head.content_length;
    if len > MAX_BODY {
        return Err(Exchange::Failed("response_body_too_large".into()));
    }
    while buf.len() < head_end + len {
        if read_more(conn, buf).await? == 0 {
            return Err(Exchange::Failed("response_truncated".into()));
        }
    }
    let body = buf[head_end..head_end + len].to_vec();
    let keep = head.keep_alive && buf.len() == head_end + len;
    Ok((
        Response {
            status: head.status,
            body,
            retry_after_s: head.retry_after_s,
        },
        keep,
    ))
}

async fn read_more(conn: &mut TcpStream, buf: &mut Vec<u8>) -> Result<usize, Exchange> {
    let mut chunk = [0u8; 4096];
    let n = conn
        .read(&mut chunk)
        .await
        .map_err(|e| Exchange::Failed(io_kind("read", &e)))?;
    buf.extend_from_slice(&chunk[..n]);
    Ok(n)
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Head {
    pub(crate) status: u16,
    pub(crate) content_length: usize,
    pub(crate) keep_alive: bool,
    pub(crate) retry_after_s: Option<u64>,
}

/// The status line and the headers this client needs. A chunked body is refused (the server answers
/// with a length).
pub(crate) fn parse_head(head: &[u8]) -> Result<Head, String> {
    let text = std::str::from_utf8(head).map_err(|_| "response_head_not_utf8".to_owned())?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    let status = parts
        .next()
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| "response_bad_status_line".to_owned())?;
    let mut h = Head {
        status,
        content_length: 0,
        keep_alive: version == "HTTP/1.1",
        retry_after_s: None,
    };
    for line in lines.filter(|l| !l.is_empty()) {
        let Some((name, value)) = line.split_once(':') else {
            return Err("response_bad_header".into());
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => {
                h.content_length = value
                    .parse()
                    .map_err(|_| "response_bad_content_length".to_owned())?;
            }
            "transfer-encoding" if value.eq_ignore_ascii_case("chunked") => {
                return Err("response_chunked_unsupported".into());
            }
            "connection" => {
                if value.eq_ignore_ascii_case("close") {
                    h.keep_alive = false;
                } else if value.eq_ignore_ascii_case("keep-alive") {
                    h.keep_alive = true;
                }
            }
            "retry-after" => h.retry_after_s = value.parse().ok(),
            _ => {}
        }
    }
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_head_parses_with_its_length_retry_after_and_close() {
        let h = parse_head(
            b"HTTP/1.1 429 Too Many Requests\r\ncontent-length: 42\r\nconnection: close\r\n\
              retry-after: 600\r\n\r\n",
        )
        .unwrap();
        assert_eq!(
            h,
            Head {
                status: 429,
                content_length: 42,
                keep_alive: false,
                retry_after_s: Some(600),
            }
        );
        let h = parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").unwrap();
        assert!(h.keep_alive);
        assert_eq!(h.retry_after_s, None);
    }

    #[test]
    fn bad_heads_are_error_kinds() {
        assert_eq!(
            parse_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap_err(),
            "response_chunked_unsupported"
        );
        assert_eq!(
            parse_head(b"garbage\r\n\r\n").unwrap_err(),
            "response_bad_status_line"
        );
        assert_eq!(
            parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n").unwrap_err(),
            "response_bad_content_length"
        );
        assert!(!parse_head(b"HTTP/1.0 200 OK\r\n\r\n").unwrap().keep_alive);
    }

    #[test]
    fn requests_carry_host_and_length_then_the_body() {
        let r = request("POST", "h:1", "/p", &[("A", "b")], b"xyz");
        assert_eq!(
            r,
            b"POST /p HTTP/1.1\r\nHost: h:1\r\nA: b\r\nContent-Length: 3\r\n\r\nxyz"
        );
        assert_eq!(authority("http://h:1/").unwrap(), "h:1");
        assert_eq!(authority("http://h").unwrap(), "h:80");
        assert!(authority("https://h:1").is_err());
    }
}

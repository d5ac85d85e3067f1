//! The websocket client's wire format, kept small because the harness sends ~100,000 frames a second on
//! two cores: the upgrade handshake, masked client frames written straight into a byte buffer, and a parser
//! for the server's (unmasked) frames.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

pub const OP_CONT: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Largest response head read during the handshake.
const MAX_HEAD: usize = 16 * 1024;
/// Largest server message the harness accepts (events are a few hundred bytes).
pub const MAX_MESSAGE: usize = 1 << 20;

/// Where a `ws://host:port/path?query` URL points.
#[derive(Debug, Clone)]
pub struct Target {
    /// `host:port`, for connecting and for the `Host` header.
    pub authority: String,
    pub path_and_query: String,
}

impl Target {
    pub fn parse(url: &str) -> Result<Target, String> {
        let rest = url
            .strip_prefix("ws://")
            .ok_or_else(|| format!("{url}: only ws:// URLs are supported"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.is_empty() {
            return Err(format!("{url}: no host"));
        }
        let authority = if authority.contains(':') {
            authority.to_owned()
        } else {
            format!("{authority}:80")
        };
        Ok(Target {
            authority,
            path_and_query: path.to_owned(),
        })
    }
}

/// Largest refusal body read (the server's JSON errors are a few hundred bytes).
const MAX_REFUSAL_BODY: usize = 4096;

/// An upgrade the server answered with an HTTP error: what a client needs to decide whether to retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    /// The JSON body's `code`, when it has one.
    pub code: Option<String>,
    pub retry_after_s: Option<u64>,
}

/// Why a connection did not become a websocket: an error kind for the report (`connect_io_*`,
/// `upgrade_http_<status>[_<code>]`, …), and the server's answer when it refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectError {
    pub kind: String,
    pub refusal: Option<Refusal>,
}

impl From<String> for ConnectError {
    fn from(kind: String) -> Self {
        ConnectError {
            kind,
            refusal: None,
        }
    }
}

/// Connects and upgrades. Returns the stream and any bytes read past the response head (the server's
/// first frames), or why not.
pub async fn connect(
    target: &Target,
    authorization: &str,
    timeout: Duration,
) -> Result<(TcpStream, Vec<u8>), ConnectError> {
    let attempt = async {
        let mut s = TcpStream::connect(&target.authority)
            .await
            .map_err(|e| format!("connect_io_{:?}", e.kind()).to_lowercase())?;
        s.set_nodelay(true)
            .map_err(|e| format!("connect_io_{:?}", e.kind()).to_lowercase())?;
        let key = generate_key();
        let req = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nAuthorization: {authorization}\r\n\r\n",
            target.path_and_query, target.authority
        );
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| format!("connect_io_{:?}", e.kind()).to_lowercase())?;
        let mut buf = Vec::with_capacity(512);
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if buf.len() > MAX_HEAD {
                return Err("upgrade_head_too_large".to_owned().into());
            }
            let mut chunk = [0u8; 1024];
            let n = s
                .read(&mut chunk)
                .await
                .map_err(|e| format!("connect_io_{:?}", e.kind()).to_lowercase())?;
            if n == 0 {
                return Err("upgrade_eof".to_owned().into());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        if status != 101 {
            return Err(refused(&mut s, buf, end).await);
        }
        let accept = derive_accept_key(key.as_bytes());
        let accepted = head.lines().any(|l| {
            l.split_once(':').is_some_and(|(k, v)| {
                k.trim().eq_ignore_ascii_case("sec-websocket-accept") && v.trim() == accept
            })
        });
        if !accepted {
            return Err("upgrade_bad_accept".to_owned().into());
        }
        Ok((s, buf.split_off(end)))
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or_else(|_| Err("connect_timeout".to_owned().into()))
}

/// Reads a refused upgrade's body (`Content-Length`, at most [`MAX_REFUSAL_BODY`]) for its `code`, and its
/// `Retry-After`.
async fn refused(s: &mut TcpStream, mut buf: Vec<u8>, end: usize) -> ConnectError {
    let head = match crate::http1::parse_head(&buf[..end]) {
        Ok(h) => h,
        Err(kind) => return kind.into(),
    };
    let want = end + head.content_length.min(MAX_REFUSAL_BODY);
    while buf.len() < want {
        let mut chunk = [0u8; 1024];
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let code = serde_json::from_slice::<serde_json::Value>(&buf[end..want.min(buf.len())])
        .ok()
        .and_then(|body| body["code"].as_str().map(str::to_owned));
    let kind = match &code {
        Some(code) => format!("upgrade_http_{}_{code}", head.status),
        None => format!("upgrade_http_{}", head.status),
    };
    ConnectError {
        kind,
        refusal: Some(Refusal {
            status: head.status,
            code,
            retry_after_s: head.retry_after_s,
        }),
    }
}

/// Appends one client frame (final, masked with `mask`) to `out`.
pub fn encode(out: &mut Vec<u8>, opcode: u8, payload: &[u8], mask: [u8; 4]) {
    out.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= usize::from(u16::MAX) => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
}

/// One message from the server.
#[derive(Debug, PartialEq, Eq)]
pub enum ServerMsg {
    Text(Vec<u8>),
    Binary,
    Ping(Vec<u8>),
    Pong,
    /// The close code (1005 when the frame had none).
    Close(u16),
}

/// Why the server's bytes could not be read as websocket frames.
#[derive(Debug, PartialEq, Eq)]
pub struct BadFrame(pub &'static str);

/// Parses server frames from the front of a buffer, putting fragmented messages back together.
#[derive(Debug, Default)]
pub struct Parser {
    partial: Option<(u8, Vec<u8>)>,
}

impl Parser {
    /// The next whole message in `buf` (its bytes are removed), `Ok(None)` when more bytes are needed.
    pub fn next(&mut self, buf: &mut Vec<u8>) -> Result<Option<ServerMsg>, BadFrame> {
        loop {
            let Some((fin, opcode, at, len)) = header(buf)? else {
                return Ok(None);
            };
            if buf.len() < at + len {
                return Ok(None);
            }
            let payload: Vec<u8> = buf[at..at + len].to_vec();
            buf.drain(..at + len);
            let whole = match (opcode, fin) {
                (OP_CONT, _) => {
                    let Some((op, mut data)) = self.partial.take() else {
                        return Err(BadFrame("continuation_not_started"));
                    };
                    if data.len() + payload.len() > MAX_MESSAGE {
                        return Err(BadFrame("message_too_large"));
                    }
                    data.extend_from_slice(&payload);
                    if !fin {
                        self.partial = Some((op, data));
                        continue;
                    }
                    (op, data)
                }
                (OP_TEXT | OP_BINARY, false) => {
                    if self.partial.is_some() {
                        return Err(BadFrame("continuation_started"));
                    }
                    self.partial = Some((opcode, payload));
                    continue;
                }
                (OP_TEXT | OP_BINARY, true) if self.partial.is_some() => {
                    return Err(BadFrame("continuation_started"));
                }
                (op, _) => (op, payload),
            };
            return Ok(Some(match whole {
                (OP_TEXT, data) => ServerMsg::Text(data),
                (OP_BINARY, _) => ServerMsg::Binary,
                (OP_PING, data) => ServerMsg::Ping(data),
                (OP_PONG, _) => ServerMsg::Pong,
                (OP_CLOSE, data) => ServerMsg::Close(if data.len() >= 2 {
                    u16::from_be_bytes([data[0], data[1]])
                } else {
                    1005
                }),
                _ => return Err(BadFrame("bad_opcode")),
            }));
        }
    }
}

/// (fin, opcode, payload offset, payload length) of the frame at the front of `buf`, if its header is in.
fn header(buf: &[u8]) -> Result<Option<(bool, u8, usize, usize)>, BadFrame> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (fin, opcode) = (buf[0] & 0x80 != 0, buf[0] & 0x0f);
    if buf[1] & 0x80 != 0 {
        return Err(BadFrame("masked_server_frame"));
    }
    let (len, at) = match buf[1] & 0x7f {
        126 if buf.len() < 4 => return Ok(None),
        126 => (usize::from(u16::from_be_bytes([buf[2], buf[3]])), 4),
        127 if buf.len() < 10 => return Ok(None),
        127 => {
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            let n = u64::from_be_bytes(b);
            if n > MAX_MESSAGE as u64 {
                return Err(BadFrame("message_too_large"));
            }
            (n as usize, 10)
        }
        n => (usize::from(n), 2),
    };
    if len > MAX_MESSAGE {
        return Err(BadFrame("message_too_large"));
    }
    Ok(Some((fin, opcode, at, len)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![if fin { 0x80 } else { 0 } | opcode];
        if payload.len() < 126 {
            f.push(payload.len() as u8);
        } else {
            f.push(126);
            f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        }
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn a_client_frame_is_masked_and_sized() {
        let mut out = Vec::new();
        encode(&mut out, OP_BINARY, &[1, 2, 3], [0xff, 0, 0xff, 0]);
        assert_eq!(out, [0x82, 0x83, 0xff, 0, 0xff, 0, 0xfe, 2, 0xfc]);
        let mut big = Vec::new();
        encode(&mut big, OP_TEXT, &[0u8; 300], [0; 4]);
        assert_eq!(&big[..4], &[0x81, 0x80 | 126, 1, 44]);
        assert_eq!(big.len(), 4 + 4 + 300);
    }

    #[test]
    fn server_messages_come_out_whole_and_in_order() {
        let mut buf = [
            server_frame(true, OP_TEXT, b"{\"a\":1}"),
            server_frame(false, OP_TEXT, b"par"),
            server_frame(true, OP_PING, b"p"),
            server_frame(true, OP_CONT, b"ts"),
            server_frame(true, OP_CLOSE, &1001u16.to_be_bytes()),
            server_frame(true, OP_TEXT, &[b'x'; 200])[..10].to_vec(),
        ]
        .concat();
        let mut p = Parser::default();
        assert_eq!(
            p.next(&mut buf),
            Ok(Some(ServerMsg::Text(b"{\"a\":1}".to_vec())))
        );
        assert_eq!(p.next(&mut buf), Ok(Some(ServerMsg::Ping(b"p".to_vec()))));
        assert_eq!(
            p.next(&mut buf),
            Ok(Some(ServerMsg::Text(b"parts".to_vec())))
        );
        assert_eq!(p.next(&mut buf), Ok(Some(ServerMsg::Close(1001))));
        assert_eq!(p.next(&mut buf), Ok(None), "a frame cut short waits");
        assert_eq!(buf.len(), 10);
    }

    #[test]
    fn broken_server_frames_are_refused() {
        let mut p = Parser::default();
        assert_eq!(
            p.next(&mut vec![0x81, 0x81, 0, 0, 0, 0, b'x']),
            Err(BadFrame("masked_server_frame"))
        );
        assert_eq!(
            p.next(&mut server_frame(true, OP_CONT, b"x")),
            Err(BadFrame("continuation_not_started"))
        );
    }

    #[test]
    fn urls_name_the_host_port_and_path() {
        let t = Target::parse("ws://127.0.0.1:8089/v4/listen?codec=opus").unwrap();
        assert_eq!(t.authority, "127.0.0.1:8089");
        assert_eq!(t.path_and_query, "/v4/listen?codec=opus");
        assert_eq!(Target::parse("ws://h").unwrap().authority, "h:80");
        assert!(Target::parse("wss://h/").is_err());
    }
}

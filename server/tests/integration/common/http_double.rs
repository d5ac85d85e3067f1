//! The HTTP/1.1 of the provider test doubles (`stt_openai`'s, `stt_deepgram`'s pre-recorded API): one
//! request at a time from a connection (`Content-Length` bodies, keep-alive), and a JSON answer.

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One request as read from the wire.
#[derive(Debug, Clone, Default)]
pub struct HttpRequest {
    pub method: String,
    /// The request target: path and query.
    pub target: String,
    head: String,
    pub body: Vec<u8>,
}

impl HttpRequest {
    /// A header's value (the first, trimmed), or "" when absent.
    pub fn header(&self, name: &str) -> String {
        self.head
            .split("\r\n")
            .skip(1)
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| v.trim().to_string())
            })
            .unwrap_or_default()
    }
}

/// Reads the next request of a connection (`buf` keeps what was read past it); `None` when the client
/// closed or the connection failed.
pub async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<HttpRequest> {
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 8192];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut request_line = head.split("\r\n").next().unwrap_or_default().split(' ');
    let mut req = HttpRequest {
        method: request_line.next().unwrap_or_default().to_string(),
        target: request_line.next().unwrap_or_default().to_string(),
        head,
        body: Vec::new(),
    };
    let length: usize = req.header("content-length").parse().unwrap_or(0);
    while buf.len() < head_end + length {
        let mut chunk = [0u8; 65536];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    req.body = buf[head_end..head_end + length].to_vec();
    buf.drain(..head_end + length);
    Some(req)
}

/// Writes a JSON answer; false when the client is gone.
pub async fn write_json(stream: &mut TcpStream, status: u16, answer: &serde_json::Value) -> bool {
    let text = answer.to_string();
    let out = format!(
        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{text}",
        text.len()
    );
    stream.write_all(out.as_bytes()).await.is_ok()
}

/// The plan of the next request (or connection): plans are taken in order, the last one repeats.
pub fn next_plan<P: Copy>(plans: &Mutex<VecDeque<P>>) -> P {
    let mut p = plans.lock().unwrap();
    if p.len() > 1 {
        p.pop_front().unwrap()
    } else {
        p[0]
    }
}

//! The two transports of `/v4/listen` over raw sockets (real server, real redis-server): the front door
//! (a connection whose first request is the upgrade; its pipeline thread reads the socket on every tick)
//! and the actix-web route (an upgrade on a connection that already carried a request). Both keep the
//! same contract: refusals with the route's JSON errors, fragmented messages, pings answered, a client
//! close frame still gets `metadata`, and the same stream gives the same metadata on either.

use crate::common;
use crate::listen_support;

use std::time::Duration;

use common::engine_server::{EngineServer, fair_use_on};
use common::refusal::assert_refusal;
use listen_support::fixture_packets;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

const LIMIT: Duration = Duration::from_secs(20);
const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;
const CONT: u8 = 0x0;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;
const PONG: u8 = 0xA;

/// A client frame: masked (as clients must), `fin` or a fragment.
fn frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37u8, 0xfa, 0x21, 0x3d];
    let mut f = vec![if fin { 0x80 } else { 0 } | opcode];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n <= 0xffff => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

fn upgrade_request(addr: std::net::SocketAddr, bearer: &str, query: &str) -> String {
    format!(
        "GET /v4/listen?{query} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Authorization: Bearer {bearer}\r\n\r\n"
    )
}

/// Reads one HTTP response head (and a `Content-Length` body). Returns (status, head, body).
async fn read_response(s: &mut TcpStream) -> (u16, String, Vec<u8>) {
    let mut raw = Vec::new();
    let mut byte = [0u8; 1];
    while !raw.ends_with(b"\r\n\r\n") {
        let n = timeout(LIMIT, s.read(&mut byte))
            .await
            .unwrap_or_else(|_| panic!("no response head"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(n, 1, "connection closed inside a response head: {raw:?}");
        raw.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&raw).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let len = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())
                .flatten()
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    timeout(LIMIT, s.read_exact(&mut body))
        .await
        .unwrap_or_else(|_| panic!("no body"))
        .unwrap_or_else(|e| panic!("{e}"));
    (status, head.to_ascii_lowercase(), body)
}

/// What the client read after the upgrade: text messages, pongs, the close frame.
#[derive(Debug, Default)]
struct Received {
    events: Vec<Value>,
    pongs: Vec<Vec<u8>>,
    close: Option<(u16, String)>,
}

/// Reads server frames (unmasked) until a close frame or the end of the stream.
async fn read_frames(s: &mut TcpStream) -> Received {
    let mut got = Received::default();
    let mut buf = Vec::new();
    loop {
        // Parse every whole frame in `buf`.
        while buf.len() >= 2 {
            let (op, len7) = (buf[0] & 0x0f, (buf[1] & 0x7f) as usize);
            let (len, at) = match len7 {
                126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
                126 => break,
                n => (n, 2),
            };
            if buf.len() < at + len {
                break;
            }
            let payload = buf[at..at + len].to_vec();
            buf.drain(..at + len);
            match op {
                TEXT if payload == b"ping" => {}
                TEXT => got.events.push(
                    serde_json::from_slice(&payload).unwrap_or_else(|e| panic!("event: {e}")),
                ),
                PONG => got.pongs.push(payload),
                CLOSE => {
                    let code = if payload.len() >= 2 {
                        u16::from_be_bytes([payload[0], payload[1]])
                    } else {
                        1005
                    };
                    got.close = Some((code, String::from_utf8_lossy(&payload[2..]).into_owned()));
                    return got;
                }
                _ => {}
            }
        }
        let mut chunk = [0u8; 4096];
        let n = timeout(LIMIT, s.read(&mut chunk))
            .await
            .unwrap_or_else(|_| panic!("no close within {LIMIT:?}: {got:?}"))
            .unwrap_or(0);
        if n == 0 {
            return got;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Streams `packets` (the second one split into two fragments), a ping, then `end` (close or
/// CloseStream) on an upgraded socket, and reads everything back.
async fn stream_on(mut s: TcpStream, packets: &[Vec<u8>], end: Vec<u8>) -> Received {
    for (i, p) in packets.iter().enumerate() {
        let bytes = if i == 1 {
            let (a, b) = p.split_at(p.len() / 2);
            [frame(BINARY, false, a), frame(CONT, true, b)].concat()
        } else {
            frame(BINARY, true, p)
        };
        s.write_all(&bytes).await.unwrap_or_else(|e| panic!("{e}"));
        // 10x real time: well inside the 2 s frame queue, even on a busy CI machine.
        if i % 10 == 9 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    s.write_all(&frame(PING, true, b"are you there"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    s.write_all(&end).await.unwrap_or_else(|e| panic!("{e}"));
    read_frames(&mut s).await
}

fn metadata(r: &Received) -> &Value {
    let m: Vec<_> = r
        .events
        .iter()
        .filter(|e| e["type"] == "metadata")
        .collect();
    assert_eq!(m.len(), 1, "exactly one metadata: {:?}", r.events);
    m[0]
}

#[actix_web::test]
async fn both_transports_keep_the_contract_and_give_the_same_metadata() {
    // The client writes at 10x, over the default intake limit of 4x.
    let server = EngineServer::start(fair_use_on(), |c| c.listen_max_pace = 20.0).await;
    let packets: Vec<Vec<u8>> = fixture_packets("d02").into_iter().take(600).collect();
    let query = "codec=opus&sample_rate=16000";
    let close_frame = frame(CLOSE, true, &1000u16.to_be_bytes());
    let close_stream = frame(TEXT, true, br#"{"type":"CloseStream"}"#);

    // The front door: the upgrade is the connection's first request.
    let mut s = TcpStream::connect(server.addr)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    s.write_all(upgrade_request(server.addr, "door", query).as_bytes())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (status, head, _) = read_response(&mut s).await;
    assert_eq!(status, 101, "{head}");
    assert!(
        head.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{head}"
    );
    let door = stream_on(s, &packets, close_stream.clone()).await;

    // The actix-web route: a keep-alive request first, then the upgrade on the same connection.
    let mut s = TcpStream::connect(server.addr)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    s.write_all(format!("GET /healthz HTTP/1.1\r\nHost: {}\r\n\r\n", server.addr).as_bytes())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(read_response(&mut s).await.0, 200);
    s.write_all(upgrade_request(server.addr, "route", query).as_bytes())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (status, head, _) = read_response(&mut s).await;
    assert_eq!(status, 101, "{head}");
    let route = stream_on(s, &packets, close_stream).await;

    for (name, r) in [("door", &door), ("route", &route)] {
        assert_eq!(r.close.as_ref().map(|c| c.0), Some(1000), "{name}: {r:?}");
        assert_eq!(
            r.pongs,
            vec![b"are you there".to_vec()],
            "{name}: the ping is answered"
        );
        let m = metadata(r);
        assert_eq!(m["frames_received"], 600, "{name}: {m}");
        assert_eq!(m["frames_dropped"], 0, "{name}: {m}");
    }
    let (a, b) = (metadata(&door), metadata(&route));
    assert_eq!(a["speech_ms"], b["speech_ms"], "{a} vs {b}");
    assert_eq!(a["audio_ms"], b["audio_ms"], "{a} vs {b}");
    assert!(
        a["speech_ms"].as_u64().unwrap_or(0) > 0,
        "d02's first 6 s hold speech: {a}"
    );
    assert_eq!(
        server.status_speech_ms("door").await["daily_ms"],
        a["speech_ms"],
        "what metadata said is metered"
    );
    // Each stream went the way it was meant to.
    let metrics = server.metrics_text().await;
    let opened = "voicegate_listen_sessions_opened_total";
    assert!(
        counter(&metrics, opened, "transport=\"pipeline\"") >= 1.0,
        "{metrics}"
    );
    assert!(
        counter(&metrics, opened, "transport=\"http_worker\"") >= 1.0,
        "{metrics}"
    );

    // A client close frame instead of CloseStream: metadata still comes, before the close.
    let mut s = TcpStream::connect(server.addr)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    s.write_all(upgrade_request(server.addr, "closer", query).as_bytes())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(read_response(&mut s).await.0, 101);
    let closed = stream_on(s, &packets[..100], close_frame).await;
    assert_eq!(metadata(&closed)["frames_received"], 100, "{closed:?}");
    assert_eq!(closed.close.as_ref().map(|c| c.0), Some(1000), "{closed:?}");
    server.shutdown().await;
}

#[actix_web::test]
async fn refused_upgrades_get_the_routes_json_answers_and_are_timed_under_the_route() {
    let server = EngineServer::start(fair_use_on(), |c| {
        c.ws_sessions_per_user = 1;
        c.ws_max_sessions = 2;
    })
    .await;
    let addr = server.addr;
    let ask = move |req: String| async move {
        let mut s = TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        s.write_all(req.as_bytes())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let (status, head, body) = read_response(&mut s).await;
        let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        if status >= 400 {
            // Every refused upgrade has the one refusal shape (the head is read lower-cased).
            let retry_after = head
                .lines()
                .find_map(|l| l.strip_prefix("retry-after:"))
                .map(str::trim);
            assert_refusal("refused upgrade", status, retry_after, &body);
        }
        (status, head, body, s)
    };

    // No token: 401 with the JSON error and the Bearer challenge, like every route.
    let no_token =
        upgrade_request(server.addr, "x", "codec=opus").replace("Authorization: Bearer x\r\n", "");
    let (status, head, body, _) = ask(no_token).await;
    assert_eq!(status, 401, "{head}");
    assert_eq!(body["code"], "auth_missing", "{body}");
    assert!(head.contains("www-authenticate: bearer"), "{head}");

    // Not a websocket upgrade: 400 ws_handshake.
    let (status, _, body, _) = ask(format!(
        "GET /v4/listen HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer plain\r\n\r\n",
        server.addr
    ))
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["code"], "ws_handshake", "{body}");

    // Over the per-user session limit: 429 too_many_sessions while the first session is open.
    let (status, _, _, first) = ask(upgrade_request(server.addr, "busy", "codec=opus")).await;
    assert_eq!(status, 101);
    let (status, head, body, _) = ask(upgrade_request(server.addr, "busy", "codec=opus")).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["code"], "too_many_sessions", "{body}");
    assert_eq!(body["retryable"], true, "{body}");
    assert!(head.contains("retry-after: 5"), "{head}");
    // Over the node's limit (2 sessions): 503 at_capacity, whoever asks.
    let (status, _, _, second) = ask(upgrade_request(server.addr, "other", "codec=opus")).await;
    assert_eq!(status, 101);
    let (status, head, body, _) = ask(upgrade_request(server.addr, "third", "codec=opus")).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["code"], "at_capacity", "{body}");
    assert_eq!(body["reason"], "max_sessions", "{body}");
    assert_eq!(body["retryable"], true, "{body}");
    assert!(head.contains("retry-after: 5"), "{head}");
    drop((first, second));

    // A request head over the limit: 431, and nothing else happens.
    let huge = format!(
        "GET /v4/listen HTTP/1.1\r\nHost: {}\r\nX-Pad: {}\r\n\r\n",
        server.addr,
        "a".repeat(40_000)
    );
    let mut s = TcpStream::connect(server.addr)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let _ = s.write_all(huge.as_bytes()).await;
    assert_eq!(read_response(&mut s).await.0, 431);

    let metrics = server.metrics_text().await;
    for status in ["1xx", "4xx"] {
        let timed = metrics.lines().any(|l| {
            l.starts_with("voicegate_http_request_duration_seconds_count{")
                && l.contains("route=\"/v4/listen\"")
                && l.contains(&format!("status=\"{status}\""))
        });
        assert!(timed, "no /v4/listen {status} latency in /metrics");
    }
    server.shutdown().await;
}

/// The value of the counter line that starts with `name{` and holds `label`.
fn counter(metrics: &str, name: &str, label: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

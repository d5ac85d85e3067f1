//! Stalled request bodies (issue #17 item 1): uploads and Stripe webhooks that announce a body and stop
//! sending are answered 408 in the documented JSON shape within the body timeouts, their temp folders are
//! removed at once, descriptors return to their baseline, and a concurrent upload and listen stream are
//! unaffected.
//!
//! CI runs 20 + 20 stalls; the acceptance figure is 300 + 300:
//! `STALLS=300 cargo nextest run -p voicegate-server --test integration request_timeouts:: --no-capture`.

use crate::common;
use crate::listen_support;

use std::time::Duration;

use common::engine_server::{EngineServer, fair_use_on, fixtures, omi_name};
use common::refusal::Reply;
use listen_support::{NORMAL, connect, fixture_packets, offline, stream_packets};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

const IDLE_S: u64 = 2;
const TOTAL_S: u64 = 4;

fn stalls() -> usize {
    std::env::var("STALLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

fn upload_dirs(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |d| d.count())
}

/// A request head announcing 100 KB of body (under every body limit), then `sent` of them.
fn stalled_request(addr: std::net::SocketAddr, path: &str, uid: &str, sent: &[u8]) -> Vec<u8> {
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {uid}\r\n\
         Content-Type: multipart/form-data; boundary=xyz\r\nStripe-Signature: t=1,v1=00\r\n\
         Content-Length: 100000\r\n\r\n"
    )
    .into_bytes();
    req.extend_from_slice(sent);
    req
}

fn upload_prefix() -> Vec<u8> {
    let mut body = format!(
        "--xyz\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{}\"\r\n\
         Content-Type: application/octet-stream\r\n\r\n",
        omi_name(60)
    )
    .into_bytes();
    body.extend(std::iter::repeat_n(7u8, 1024));
    body
}

/// The answer in `text` once its head and `Content-Length` body are complete (or the peer closed).
fn parse_answer(text: &str, closed: bool) -> Option<Reply> {
    let (head, body) = text.split_once("\r\n\r\n")?;
    let header = |name: &str| {
        head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    };
    let len = header("content-length")
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(0);
    if body.len() < len && !closed {
        return None;
    }
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = serde_json::from_str(body).unwrap_or(Value::Null);
    Some(Reply::new(status, header("retry-after"), body))
}

/// Reads one answer (head and `Content-Length` body) or panics after `limit`.
async fn read_answer(s: &mut TcpStream, limit: Duration) -> Reply {
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + limit;
    loop {
        let n = tokio::time::timeout_at(deadline, s.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no answer within {limit:?}: {raw:?}"))
            .unwrap_or(0);
        raw.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&raw).into_owned();
        if let Some(answer) = parse_answer(&text, n == 0) {
            return answer;
        }
        assert!(n > 0, "closed without an answer: {text}");
    }
}

#[actix_web::test]
async fn stalled_uploads_and_webhooks_get_408_and_free_everything_while_others_proceed() {
    let n = stalls();
    let temp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let upload_dir = temp.path().to_path_buf();
    let server = EngineServer::start(fair_use_on(), |c| {
        c.upload_dir = Some(upload_dir.clone());
        c.body_idle_timeout_secs = IDLE_S;
        c.body_timeout_secs = TOTAL_S;
    })
    .await;
    let addr = server.addr;
    // A first request warms every worker-side lazy allocation before the baseline is taken.
    let fx = fixtures();
    let (code, body, _) = server
        .upload("warm", "", &[(omi_name(120), fx[0].1.clone())])
        .await;
    assert_eq!(code, 200, "{body}");
    let fds_before = open_fds();

    let started = Instant::now();
    let mut stalled = Vec::with_capacity(2 * n);
    for i in 0..n {
        let mut up = TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let req = stalled_request(
            addr,
            "/v1/sync-local-files",
            &format!("stall{i}"),
            &upload_prefix(),
        );
        up.write_all(&req).await.unwrap_or_else(|e| panic!("{e}"));
        stalled.push(("upload", up));
        let mut hook = TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let req = stalled_request(addr, "/v1/stripe/webhook", "-", &[b'{'; 1024]);
        hook.write_all(&req).await.unwrap_or_else(|e| panic!("{e}"));
        stalled.push(("webhook", hook));
    }
    // Every stalled upload holds its temp folder until the timeout...
    let mut peak_dirs = 0;
    while peak_dirs < n && started.elapsed() < Duration::from_secs(IDLE_S) {
        peak_dirs = peak_dirs.max(upload_dirs(&upload_dir));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let peak_fds = open_fds();

    // ...while a good upload and a real-time listen stream go through untouched.
    let packets: Vec<Vec<u8>> = fixture_packets("d01").into_iter().take(300).collect();
    let expect = offline(&packets);
    let ws = connect(addr, Some("streamer"), "codec=opus&sample_rate=16000")
        .await
        .unwrap_or_else(|s| panic!("upgrade {s}"));
    let stream = tokio::spawn(async move { stream_packets(ws, &packets, 1).await });
    let (code, body, _) = server
        .upload("neighbour", "", &[(omi_name(60), fx[1].1.clone())])
        .await;
    assert_eq!(code, 200, "a concurrent upload: {body}");

    let mut latest = Duration::ZERO;
    for (kind, mut s) in stalled {
        let answer = read_answer(&mut s, Duration::from_secs(TOTAL_S + 10)).await;
        let at = started.elapsed();
        latest = latest.max(at);
        let (status, body) = answer.pair();
        assert_eq!(status, 408, "{kind}: {body}");
        assert_eq!(body["code"], "request_body_stalled", "{kind}: {body}");
        // Retryable at once: the client sends the request again, faster.
        assert_eq!(answer.assert_refusal(kind), Some(1), "{kind}");
    }
    let (seen, _) = stream.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(seen.close.as_ref().map(|c| c.0), Some(NORMAL), "{seen:?}");
    let streamed = seen.metadata()["speech_ms"].as_u64().unwrap_or(0);
    assert!(
        streamed.abs_diff(expect.speech_ms) <= expect.speech_ms / 100,
        "stream speech {streamed} ms, offline {}",
        expect.speech_ms
    );

    // Everything the stalls held is back.
    let mut fds_after = open_fds();
    let deadline = Instant::now() + Duration::from_secs(5);
    while fds_after > fds_before + 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        fds_after = open_fds();
    }
    let dirs_after = upload_dirs(&upload_dir);
    eprintln!(
        "{n} stalled uploads + {n} stalled webhooks: all 408 by {:.2} s (idle timeout {IDLE_S} s); \
         upload temp folders peak {peak_dirs}, after {dirs_after}; descriptors before {fds_before}, \
         with the stalls {peak_fds}, after {fds_after}",
        latest.as_secs_f64()
    );
    assert_eq!(peak_dirs, n, "each stalled upload held a temp folder");
    assert!(
        latest < Duration::from_secs(IDLE_S) + Duration::from_millis(1_500),
        "answered by {latest:?}"
    );
    assert_eq!(dirs_after, 0, "temp folders left behind");
    assert!(
        fds_after <= fds_before + 2,
        "descriptors {fds_before} → {fds_after}"
    );
    server.shutdown().await;
}

#[actix_web::test]
async fn a_body_trickling_past_the_whole_body_timeout_gets_408_request_body_timeout() {
    let temp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let upload_dir = temp.path().to_path_buf();
    let server = EngineServer::start(fair_use_on(), |c| {
        c.upload_dir = Some(upload_dir.clone());
        c.body_idle_timeout_secs = IDLE_S;
        c.body_timeout_secs = TOTAL_S;
    })
    .await;
    let mut s = TcpStream::connect(server.addr)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let started = Instant::now();
    let req = stalled_request(
        server.addr,
        "/v1/sync-local-files",
        "trickler",
        &upload_prefix(),
    );
    s.write_all(&req).await.unwrap_or_else(|e| panic!("{e}"));
    // One byte every half idle timeout: never idle, never done.
    let (mut rd, mut wr) = s.into_split();
    let trickle = tokio::spawn(async move {
        let step = Duration::from_millis(IDLE_S * 1000 / 2);
        while wr.write_all(&[7u8]).await.is_ok() {
            tokio::time::sleep(step).await;
        }
    });
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(TOTAL_S + 10), async {
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&raw).contains("}") {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => raw.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    let at = started.elapsed();
    trickle.abort();
    let text = String::from_utf8_lossy(&raw).into_owned();
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    let answer = parse_answer(&text, true).unwrap_or_else(|| panic!("no answer: {text}"));
    assert_eq!(answer.body["code"], "request_body_timeout", "{text}");
    assert_eq!(answer.assert_refusal("body timeout"), Some(1), "{text}");
    assert!(
        at >= Duration::from_secs(TOTAL_S) && at < Duration::from_secs(TOTAL_S + 2),
        "answered after {at:?}"
    );
    assert_eq!(upload_dirs(&upload_dir), 0);
    server.shutdown().await;
}

#[actix_web::test]
async fn head_level_errors_get_the_json_error_shape_on_every_route() {
    let server = EngineServer::start(fair_use_on(), |c| c.header_timeout_secs = 1).await;
    // Connected, nothing sent: 408 when the head timeout passes, with the JSON body.
    let mut silent = TcpStream::connect(server.addr)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let answer = read_answer(&mut silent, Duration::from_secs(10)).await;
    let (status, body) = answer.pair();
    assert_eq!(status, 408, "{body}");
    assert_eq!(body["code"], "request_head_timeout", "{body}");
    assert_eq!(answer.assert_refusal("head timeout"), Some(1), "{body}");
    // A listen request head over 32 KiB: 431 with the JSON body.
    let mut huge = TcpStream::connect(server.addr)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let req = format!(
        "GET /v4/listen HTTP/1.1\r\nHost: {}\r\nX-Pad: {}\r\n\r\n",
        server.addr,
        "a".repeat(40_000)
    );
    let _ = huge.write_all(req.as_bytes()).await;
    let answer = read_answer(&mut huge, Duration::from_secs(10)).await;
    let (status, body) = answer.pair();
    assert_eq!(status, 431, "{body}");
    assert_eq!(body["code"], "request_head_too_large", "{body}");
    assert_eq!(
        answer.assert_refusal("listen head too large"),
        None,
        "{body}"
    );
    // The same on any other route (actix-http's own answers), and a head that cannot be parsed: 400.
    for (req, status, code) in [
        (
            format!(
                "GET /healthz HTTP/1.1\r\nHost: {}\r\nX-Pad: {}\r\n\r\n",
                server.addr,
                "a".repeat(200_000)
            ),
            431,
            "request_head_too_large",
        ),
        (
            "GET /healthz HTTP/1.1\r\nBad Header\r\n\r\n".to_owned(),
            400,
            "bad_request",
        ),
    ] {
        let mut s = TcpStream::connect(server.addr)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let _ = s.write_all(req.as_bytes()).await;
        let answer = read_answer(&mut s, Duration::from_secs(10)).await;
        let (got, body) = answer.pair();
        assert_eq!((got, body["code"].as_str()), (status, Some(code)), "{body}");
        assert_eq!(answer.assert_refusal(code), None, "{body}");
    }
    server.shutdown().await;
}

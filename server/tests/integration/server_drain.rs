//! A real server on 127.0.0.1:0: websocket upgrade auth, per-user session limit, and the drain
//! (every session sees close 1001, flush runs after sessions are gone, the port stops accepting).

use crate::common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use actix_web::{HttpRequest, HttpResponse, web};
use voicegate_server::ApiError;
use voicegate_server::ServeConfig;
use voicegate_server::auth::AuthedUser;
use voicegate_server::drain::DrainPhase;
use voicegate_server::serve::ServerBuilder;
use voicegate_server::sessions::{DRAIN_CLOSE_REASON, SessionRegistry};

/// A minimal listen endpoint: admit, then wait for client close or drain.
async fn listen(
    req: HttpRequest,
    body: web::Payload,
    user: AuthedUser,
    sessions: web::Data<SessionRegistry>,
) -> Result<HttpResponse, ApiError> {
    let mut guard = sessions.open(&user.uid).await?;
    let (resp, session, mut stream) = actix_ws::handle(&req, body)
        .map_err(|e| ApiError::bad_request("ws_handshake", e.to_string()))?;
    actix_web::rt::spawn(async move {
        tokio::select! {
            () = guard.closing() => {
                let reason = actix_ws::CloseReason {
                    code: actix_ws::CloseCode::Away,
                    description: Some(DRAIN_CLOSE_REASON.to_owned()),
                };
                let _ = session.close(Some(reason)).await;
            }
            _ = stream.recv() => {}
        }
        drop(guard);
    });
    Ok(resp)
}

fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/v4/listen", web::get().to(listen));
}

/// Sends a websocket upgrade; returns the stream and the status line.
fn upgrade(addr: SocketAddr, bearer: Option<&str>) -> (TcpStream, String) {
    let mut tcp = TcpStream::connect(addr).unwrap_or_else(|e| panic!("{e}"));
    tcp.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap_or_else(|e| panic!("{e}"));
    let auth = bearer
        .map(|b| format!("Authorization: Bearer {b}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "GET /v4/listen?codec=opus&sample_rate=16000 HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{auth}\r\n"
    );
    tcp.write_all(req.as_bytes())
        .unwrap_or_else(|e| panic!("{e}"));
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tcp.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let status = head.lines().next().unwrap_or_default().to_owned();
    (tcp, status)
}

/// Reads server frames until a close frame; returns its code and reason.
fn read_close(tcp: &mut TcpStream) -> Option<(u16, String)> {
    loop {
        let mut hdr = [0u8; 2];
        tcp.read_exact(&mut hdr).ok()?;
        let opcode = hdr[0] & 0x0f;
        let mut len = u64::from(hdr[1] & 0x7f);
        if len == 126 {
            let mut ext = [0u8; 2];
            tcp.read_exact(&mut ext).ok()?;
            len = u64::from(u16::from_be_bytes(ext));
        } else if len == 127 {
            let mut ext = [0u8; 8];
            tcp.read_exact(&mut ext).ok()?;
            len = u64::from_be_bytes(ext);
        }
        let mut payload = vec![0u8; usize::try_from(len).ok()?];
        tcp.read_exact(&mut payload).ok()?;
        if opcode == 0x8 {
            let code = u16::from_be_bytes([*payload.first()?, *payload.get(1)?]);
            return Some((code, String::from_utf8_lossy(&payload[2..]).into_owned()));
        }
    }
}

/// The status line of an upgrade, without blocking the test's runtime (the server runs on it too).
async fn status_of(addr: SocketAddr, bearer: Option<&'static str>) -> String {
    actix_web::rt::task::spawn_blocking(move || upgrade(addr, bearer).1)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[actix_web::test]
async fn drain_closes_every_session_with_1001_then_flushes_then_stops_accepting() {
    let cfg = ServeConfig {
        workers: 1,
        ws_sessions_per_user: 2,
        drain_timeout_secs: 10,
        ..common::config()
    };
    let mut builder = ServerBuilder::new(cfg).unwrap_or_else(|e| panic!("{e}"));
    builder.routes(routes);
    let sessions = builder.state().sessions.clone();
    let flushed_with_open_sessions = Arc::new(AtomicUsize::new(usize::MAX));
    {
        let seen = Arc::clone(&flushed_with_open_sessions);
        let sessions = sessions.clone();
        builder.on_drain(DrainPhase::Flush, "test_flush", move || {
            Box::pin(async move { seen.store(sessions.active(), Ordering::SeqCst) })
        });
    }
    let running = builder.start().unwrap_or_else(|e| panic!("{e}"));
    let addr = running.addrs()[0];

    // Upgrade auth and admission are checked before any session exists.
    let status = status_of(addr, None).await;
    assert!(
        status.contains(" 401 "),
        "upgrade without a token: {status}"
    );

    let clients: Vec<_> = ["alice", "alice", "bob"]
        .into_iter()
        .map(|uid| {
            std::thread::spawn(move || {
                let (mut tcp, status) = upgrade(addr, Some(uid));
                assert!(status.contains(" 101 "), "{uid}: {status}");
                read_close(&mut tcp)
            })
        })
        .collect();
    wait_until("3 sessions", || sessions.active() == 3).await;

    let status = status_of(addr, Some("alice")).await;
    assert!(
        status.contains(" 429 "),
        "third session for alice: {status}"
    );

    let (trigger, triggered) = tokio::sync::oneshot::channel::<()>();
    let _ = trigger.send(());
    running
        .run_until(async move {
            let _ = triggered.await;
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    for client in clients {
        let close = client
            .join()
            .unwrap_or_else(|_| panic!("client thread panicked"));
        assert_eq!(close, Some((1001, DRAIN_CLOSE_REASON.to_owned())));
    }
    assert_eq!(
        flushed_with_open_sessions.load(Ordering::SeqCst),
        0,
        "flush must run after every session closed"
    );
    assert_eq!(sessions.active(), 0);
    assert!(
        TcpStream::connect(addr).is_err(),
        "the port still accepts after the drain"
    );
}

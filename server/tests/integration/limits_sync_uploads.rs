//! Concurrent sync uploads (issue 17 item 5): at most `VOICEGATE_SYNC_UPLOADS_PER_USER` per user (429
//! `too_many_uploads`), counted on all nodes sharing the store (leases), and `VOICEGATE_SYNC_MAX_UPLOADS`
//! on the node (503 `uploads_at_capacity`), both retryable with `Retry-After`, refused before the body is
//! read; a finished upload frees its place.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use voicegate_engine::store::test_redis::RedisServer;

use crate::common::engine_server::{EngineServer, fair_use_on, fixtures, multipart, omi_name};
use crate::common::refusal::{Reply, header_str};
use crate::listen_support::{Child, free_port, wait_ready};

/// An upload that sends its head and 1 KB of its first file, then pauses (its socket is kept open).
async fn paused_upload(addr: std::net::SocketAddr, uid: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut req = format!(
        "POST /v1/sync-local-files HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {uid}\r\n\
         Content-Type: multipart/form-data; boundary=xyz\r\nContent-Length: 100000\r\n\r\n\
         --xyz\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.bin\"\r\n\r\n"
    )
    .into_bytes();
    req.extend(std::iter::repeat_n(7u8, 1024));
    s.write_all(&req).await.unwrap_or_else(|e| panic!("{e}"));
    s
}

/// Waits (on the event, bounded) until `dir` holds `n` upload temp folders: `n` uploads were admitted.
async fn until_folders(dir: &std::path::Path, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let have = std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0);
        if have == n {
            return;
        }
        assert!(Instant::now() < deadline, "{have} temp folders, want {n}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A paused upload of `uid` that the node admitted (its temp folder makes `n` in `dir`). The run of an
/// upload answered just before still holds its node place until its job's last write (the place is
/// given back after the answer), so the node may refuse this one 503 `uploads_at_capacity` first: then
/// it is sent again (bounded).
async fn admitted_paused_upload(
    addr: std::net::SocketAddr,
    uid: &str,
    dir: &std::path::Path,
    n: usize,
) -> TcpStream {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut s = paused_upload(addr, uid).await;
        let mut answer = vec![0u8; 4096];
        tokio::select! {
            () = until_folders(dir, n) => return s,
            read = s.read(&mut answer) => {
                let len = read.unwrap_or(0);
                let text = String::from_utf8_lossy(&answer[..len]);
                assert!(
                    text.starts_with("HTTP/1.1 503") && text.contains("uploads_at_capacity"),
                    "a paused upload was answered: {text}"
                );
                assert!(Instant::now() < deadline, "the node's place was not given back: {text}");
            }
        }
    }
}

#[actix_web::test]
async fn a_users_third_upload_gets_429_and_the_nodes_fourth_503_both_with_retry_after() {
    let temp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let dir = temp.path().to_path_buf();
    let server = EngineServer::start(fair_use_on(), |c| {
        c.upload_dir = Some(dir.clone());
        c.sync_uploads_per_user = 2;
        c.sync_max_uploads = 3;
        c.body_idle_timeout_secs = 120;
    })
    .await;
    let fx = fixtures();
    let file = vec![(omi_name(300), fx[0].1.clone())];

    let mut held = vec![
        paused_upload(server.addr, "busy").await,
        paused_upload(server.addr, "busy").await,
    ];
    until_folders(&dir, 2).await;
    let (code, body, headers) = server.upload("busy", "", &file).await;
    assert_eq!(code, 429, "{body}");
    assert_eq!(body["code"], "too_many_uploads", "{body}");
    assert_eq!(body["limit_value"], 2, "{body}");
    let refusal = Reply::new(code, header_str(&headers).as_deref(), body);
    assert_eq!(refusal.assert_refusal("user's third upload"), Some(5));
    // Another user is not held back by it.
    let (code, body, _) = server.upload("other", "", &file).await;
    assert_eq!(code, 200, "{body}");

    held.push(admitted_paused_upload(server.addr, "third", &dir, 3).await);
    let (code, body, headers) = server.upload("fourth", "", &file).await;
    assert_eq!(code, 503, "{body}");
    assert_eq!(body["code"], "uploads_at_capacity", "{body}");
    let refusal = Reply::new(code, header_str(&headers).as_deref(), body);
    assert_eq!(refusal.assert_refusal("node's fourth upload"), Some(5));

    // The user's paused uploads end (the client gives up): their places are free again.
    let third = held.pop();
    drop(held);
    until_folders(&dir, 1).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (code, body, _) = server.upload("busy", "", &file).await;
        if code == 200 {
            break;
        }
        // Only the slot's release may still be on its way (it follows the folder's removal).
        assert!(
            matches!(code, 429 | 503) && Instant::now() < deadline,
            "{code} {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(third);
    server.shutdown().await;
}

#[test]
fn the_defaults_are_2_per_user_and_64_per_node() {
    let cfg = voicegate_server::ServeConfig::default();
    assert_eq!((cfg.sync_uploads_per_user, cfg.sync_max_uploads), (2, 64));
}

fn serve(addr: SocketAddr, redis_url: &str, upload_dir: &std::path::Path) -> Child {
    let child = Command::new(env!("CARGO_BIN_EXE_voicegate"))
        .arg("serve")
        .env("VOICEGATE_BIND", addr.to_string())
        .env("VOICEGATE_REDIS_URL", redis_url)
        .env("VOICEGATE_UPLOAD_DIR", upload_dir)
        .env("VOICEGATE_SYNC_UPLOADS_PER_USER", "2")
        .env("VOICEGATE_BODY_IDLE_TIMEOUT_SECS", "120")
        .env("VOICEGATE_WORKERS", "1")
        .env("VOICEGATE_LISTEN_THREADS", "1")
        .env("VOICEGATE_STT", "none")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn voicegate: {e}"));
    Child(child)
}

async fn upload_to(addr: SocketAddr, uid: &str, files: &[(String, Vec<u8>)]) -> Reply {
    let (ctype, body) = multipart(files);
    let resp = reqwest::Client::new()
        .post(format!("http://{addr}/v1/sync-local-files"))
        .bearer_auth(uid)
        .header("content-type", ctype)
        .body(body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("upload: {e}"));
    Reply::of(resp).await
}

#[actix_web::test]
async fn the_per_user_limit_counts_the_uploads_on_every_node_sharing_the_store() {
    let redis = RedisServer::start().unwrap_or_else(|e| panic!("redis-server: {e}"));
    let (dir1, dir2) = (
        tempfile::tempdir().unwrap_or_else(|e| panic!("{e}")),
        tempfile::tempdir().unwrap_or_else(|e| panic!("{e}")),
    );
    let a1 = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let a2 = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let _node1 = serve(a1, &redis.url(), dir1.path());
    let _node2 = serve(a2, &redis.url(), dir2.path());
    wait_ready(a1).await;
    wait_ready(a2).await;
    let fx = fixtures();
    let file = vec![(omi_name(300), fx[0].1.clone())];

    // One upload of the user on each node: the user's limit (2) is full, though each node holds one.
    let on1 = paused_upload(a1, "spread").await;
    until_folders(dir1.path(), 1).await;
    let on2 = paused_upload(a2, "spread").await;
    until_folders(dir2.path(), 1).await;
    let refusal = upload_to(a1, "spread", &file).await;
    let (code, body) = refusal.pair();
    assert_eq!(code, 429, "{body}");
    assert_eq!(body["code"], "too_many_uploads", "{body}");
    assert_eq!(refusal.assert_refusal("third upload across nodes"), Some(5));
    let (code, body) = upload_to(a2, "other", &file).await.pair();
    assert_eq!(code, 200, "{body}");

    // The upload on node 2 ends: node 1 admits the user again (once node 2 has given its lease back).
    drop(on2);
    until_folders(dir2.path(), 0).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (code, body) = upload_to(a1, "spread", &file).await.pair();
        if code == 200 {
            break;
        }
        assert!(code == 429 && Instant::now() < deadline, "{code} {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(on1);
}

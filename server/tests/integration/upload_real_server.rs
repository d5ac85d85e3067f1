//! Upload limits over a real socket: the client gets its 413 (naming the limit) while it is still sending,
//! and no temp file is left behind.

use crate::common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use actix_web::{HttpRequest, HttpResponse, web};
use voicegate_server::ApiError;
use voicegate_server::ServeConfig;
use voicegate_server::serve::ServerBuilder;
use voicegate_server::upload::{UploadLimits, read_upload};

async fn sync(
    req: HttpRequest,
    payload: web::Payload,
    limits: web::Data<UploadLimits>,
) -> Result<HttpResponse, ApiError> {
    let batch = read_upload(&req, payload, &limits).await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({"files": batch.files.len()})))
}

/// Sends headers and then `body_len` bytes of one file part (without waiting), returns the raw response.
fn send(addr: SocketAddr, declared_length: Option<usize>, file_len: usize) -> String {
    let mut tcp = TcpStream::connect(addr).unwrap_or_else(|e| panic!("{e}"));
    tcp.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap_or_else(|e| panic!("{e}"));
    let head =
        "--B\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.bin\"\r\n\r\n";
    let tail = "\r\n--B--\r\n";
    let length = declared_length.unwrap_or(head.len() + file_len + tail.len());
    let req = format!(
        "POST /v1/sync-local-files HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer u1\r\n\
         Content-Type: multipart/form-data; boundary=B\r\nContent-Length: {length}\r\n\r\n{head}"
    );
    let _ = tcp.write_all(req.as_bytes());
    let writer = tcp.try_clone().unwrap_or_else(|e| panic!("{e}"));
    let sender = std::thread::spawn(move || {
        let mut writer = writer;
        let chunk = vec![0u8; 64 * 1024];
        let mut left = file_len;
        while left > 0 {
            let n = left.min(chunk.len());
            if writer.write_all(&chunk[..n]).is_err() {
                return; // the server answered and closed: expected
            }
            left -= n;
        }
        let _ = writer.write_all(tail.as_bytes());
    });
    let mut response = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = tcp.read(&mut buf) {
        if n == 0 {
            break;
        }
        response.extend_from_slice(&buf[..n]);
        if response.windows(4).any(|w| w == b"\r\n\r\n") && response.ends_with(b"}") {
            break;
        }
    }
    let _ = sender.join();
    String::from_utf8_lossy(&response).into_owned()
}

#[actix_web::test]
async fn oversized_uploads_get_413_over_a_real_socket_and_leave_no_temp_files() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let cfg = ServeConfig {
        workers: 1,
        upload_max_file_bytes: 1024 * 1024,
        upload_max_request_bytes: 4 * 1024 * 1024,
        upload_dir: Some(dir.path().to_path_buf()),
        ..common::config()
    };
    let mut builder = ServerBuilder::new(cfg).unwrap_or_else(|e| panic!("{e}"));
    builder.routes(|c| {
        c.route("/v1/sync-local-files", web::post().to(sync));
    });
    let running = builder.start().unwrap_or_else(|e| panic!("{e}"));
    let addr = running.addrs()[0];
    let blocking = |declared: Option<usize>, len: usize| {
        actix_web::rt::task::spawn_blocking(move || send(addr, declared, len))
    };

    let ok = blocking(None, 1000).await.unwrap_or_else(|e| panic!("{e}"));
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");

    let per_file = blocking(None, 3 * 1024 * 1024)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(per_file.starts_with("HTTP/1.1 413"), "{per_file}");
    assert!(
        per_file.contains("VOICEGATE_UPLOAD_MAX_FILE_BYTES"),
        "{per_file}"
    );

    let declared = blocking(Some(100 * 1024 * 1024), 8 * 1024 * 1024)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(declared.starts_with("HTTP/1.1 413"), "{declared}");
    assert!(
        declared.contains("VOICEGATE_UPLOAD_MAX_REQUEST_BYTES"),
        "{declared}"
    );

    let left: Vec<_> = std::fs::read_dir(dir.path())
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "temp files left: {left:?}");
    running
        .run_until(async {})
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

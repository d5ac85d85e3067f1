//! The streaming multipart reader: limits, empty bodies, hashes, and temp-file cleanup.

use crate::common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use actix_web::http::{StatusCode, header};
use actix_web::{HttpRequest, HttpResponse, test, web};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use voicegate_server::ApiError;
use voicegate_server::ServeConfig;
use voicegate_server::serve::{ServerBuilder, build_app};
use voicegate_server::upload::{UploadLimits, read_upload};

const BOUNDARY: &str = "voicegateTESTboundary";

/// Reads the upload, reports what was saved (and checks the files exist while the batch lives).
async fn upload(
    req: HttpRequest,
    payload: web::Payload,
    limits: web::Data<UploadLimits>,
) -> Result<HttpResponse, ApiError> {
    let batch = read_upload(&req, payload, &limits).await?;
    let files: Vec<Value> = batch
        .files
        .iter()
        .map(|f| {
            let on_disk = std::fs::read(&f.path).unwrap_or_default();
            json!({"name": f.name, "size": f.size, "sha256": f.sha256_hex(), "on_disk": on_disk.len()})
        })
        .collect();
    Ok(HttpResponse::Ok().json(json!({ "files": files })))
}

fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/upload", web::post().to(upload));
}

enum Part<'a> {
    File(&'a str, &'a [u8]),
    Field(&'a str, &'a str),
}

fn multipart(parts: &[Part<'_>]) -> Vec<u8> {
    let mut body = Vec::new();
    for part in parts {
        body.extend_from_slice(format!("--{BOUNDARY}\r\n").as_bytes());
        match part {
            Part::File(name, content) => {
                body.extend_from_slice(
                    format!(
                        "Content-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n\
                         Content-Type: application/octet-stream\r\n\r\n"
                    )
                    .as_bytes(),
                );
                body.extend_from_slice(content);
            }
            Part::Field(name, value) => {
                body.extend_from_slice(
                    format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}")
                        .as_bytes(),
                );
            }
        }
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    body
}

struct Setup {
    dir: tempfile::TempDir,
    cfg: ServeConfig,
}

fn setup(max_file: u64, max_files: usize, max_request: u64) -> Setup {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let cfg = ServeConfig {
        upload_max_file_bytes: max_file,
        upload_max_files: max_files,
        upload_max_request_bytes: max_request,
        upload_dir: Some(dir.path().to_path_buf()),
        ..common::config()
    };
    Setup { dir, cfg }
}

fn entries(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default()
}

async fn post(
    setup: &Setup,
    body: Vec<u8>,
    content_type: &str,
    keep_length: bool,
) -> (StatusCode, Value) {
    let builder = ServerBuilder::new(setup.cfg.clone()).unwrap_or_else(|e| panic!("{e}"));
    let app = test::init_service(build_app(builder.state().clone(), Some(Arc::new(routes)))).await;
    let mut req = test::TestRequest::post()
        .uri("/upload")
        .insert_header((header::CONTENT_TYPE, content_type.to_owned()))
        .set_payload(body)
        .to_request();
    if !keep_length {
        req.headers_mut().remove(header::CONTENT_LENGTH);
    }
    let resp = test::call_service(&app, req).await;
    let status = resp.status();
    let retry_after = resp
        .headers()
        .get(header::RETRY_AFTER)
        .map(|v| v.to_str().unwrap_or("<not text>").to_owned());
    let body: Value = test::read_body_json(resp).await;
    if status.as_u16() >= 400 {
        // Limits and malformed bodies are final: the same request is refused again.
        let retry = common::refusal::assert_refusal(
            "upload refusal",
            status.as_u16(),
            retry_after.as_deref(),
            &body,
        );
        assert_eq!(retry, None, "{body}");
    }
    (status, body)
}

fn form() -> String {
    format!("multipart/form-data; boundary={BOUNDARY}")
}

#[actix_web::test]
async fn files_are_saved_with_size_and_sha256_and_removed_after_the_request() {
    let s = setup(1024, 4, 10_000);
    let a = vec![1u8; 700];
    let b = b"second file".to_vec();
    let body = multipart(&[
        Part::File("audio_omi_opus_16000_1_fs320_1732700000.bin", &a),
        Part::File("b.bin", &b),
    ]);
    let (status, body) = post(&s, body, &form(), true).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let files = body["files"].as_array().cloned().unwrap_or_default();
    assert_eq!(files.len(), 2);
    assert_eq!(
        files[0]["name"],
        "audio_omi_opus_16000_1_fs320_1732700000.bin"
    );
    assert_eq!(files[0]["size"], 700);
    assert_eq!(files[0]["on_disk"], 700);
    assert_eq!(files[0]["sha256"], hex::encode(Sha256::digest(&a)));
    assert_eq!(files[1]["sha256"], hex::encode(Sha256::digest(&b)));
    assert!(
        entries(s.dir.path()).is_empty(),
        "temp files left behind: {:?}",
        entries(s.dir.path())
    );
}

#[actix_web::test]
async fn other_fields_are_skipped() {
    let s = setup(1024, 4, 10_000);
    let body = multipart(&[
        Part::Field("conversation_id", "abc"),
        Part::File("a.bin", b"xyz"),
    ]);
    let (status, body) = post(&s, body, &form(), true).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["files"].as_array().map(Vec::len), Some(1));
}

#[actix_web::test]
async fn file_over_the_per_file_limit_answers_413_naming_it_and_leaves_nothing() {
    let s = setup(100, 4, 10_000);
    let body = multipart(&[
        Part::File("ok.bin", &[0u8; 50]),
        Part::File("big.bin", &[0u8; 101]),
    ]);
    let (status, body) = post(&s, body, &form(), true).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(body["code"], "upload_file_too_large");
    assert_eq!(body["limit"], "VOICEGATE_UPLOAD_MAX_FILE_BYTES");
    assert_eq!(body["limit_value"], 100);
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("big.bin")),
        "{body}"
    );
    assert!(entries(s.dir.path()).is_empty());
}

#[actix_web::test]
async fn file_exactly_at_the_limit_is_accepted() {
    let s = setup(100, 4, 10_000);
    let (status, _) = post(
        &s,
        multipart(&[Part::File("a.bin", &[0u8; 100])]),
        &form(),
        true,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
}

#[actix_web::test]
async fn too_many_files_answers_413_naming_the_limit() {
    let s = setup(100, 2, 10_000);
    let body = multipart(&[
        Part::File("a.bin", b"1"),
        Part::File("b.bin", b"2"),
        Part::File("c.bin", b"3"),
    ]);
    let (status, body) = post(&s, body, &form(), true).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(body["code"], "upload_too_many_files");
    assert_eq!(body["limit"], "VOICEGATE_UPLOAD_MAX_FILES");
    assert!(entries(s.dir.path()).is_empty());
}

#[actix_web::test]
async fn declared_request_length_over_the_limit_answers_413_before_reading() {
    let s = setup(10_000, 10, 500);
    let body = multipart(&[
        Part::File("a.bin", &[0u8; 400]),
        Part::File("b.bin", &[0u8; 400]),
    ]);
    let (status, body) = post(&s, body, &form(), true).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(body["code"], "upload_request_too_large");
    assert_eq!(body["limit"], "VOICEGATE_UPLOAD_MAX_REQUEST_BYTES");
}

#[actix_web::test]
async fn streamed_request_over_the_limit_answers_413_and_leaves_nothing() {
    let s = setup(10_000, 10, 500);
    let body = multipart(&[
        Part::File("a.bin", &[0u8; 400]),
        Part::File("b.bin", &[0u8; 400]),
    ]);
    let (status, body) = post(&s, body, &form(), false).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(body["code"], "upload_request_too_large");
    assert!(entries(s.dir.path()).is_empty());
}

#[actix_web::test]
async fn empty_multipart_answers_400_upload_empty() {
    let s = setup(100, 2, 10_000);
    let (status, body) = post(
        &s,
        format!("--{BOUNDARY}--\r\n").into_bytes(),
        &form(),
        true,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["code"], "upload_empty");
}

#[actix_web::test]
async fn multipart_without_a_files_part_answers_400_upload_empty() {
    let s = setup(100, 2, 10_000);
    let (status, body) = post(
        &s,
        multipart(&[Part::Field("conversation_id", "x")]),
        &form(),
        true,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["code"], "upload_empty");
}

#[actix_web::test]
async fn non_multipart_body_answers_400_upload_not_multipart() {
    let s = setup(100, 2, 10_000);
    let (status, body) = post(&s, b"{}".to_vec(), "application/json", true).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["code"], "upload_not_multipart");
}

#[actix_web::test]
async fn truncated_multipart_answers_400_and_leaves_nothing() {
    let s = setup(10_000, 2, 10_000);
    let mut body = multipart(&[Part::File("a.bin", &[7u8; 300])]);
    body.truncate(200);
    let (status, body) = post(&s, body, &form(), true).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["code"], "upload_malformed");
    assert!(entries(s.dir.path()).is_empty());
}

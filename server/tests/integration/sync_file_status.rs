//! A sync file's own status tells what happened to it (issue #17 item 4): a zero-length record in the
//! middle of a file is reported as the file's status (`truncated`, `empty_record`, the byte offset), not
//! hidden in a warning.

use crate::common;

use common::engine_server::{EngineServer, fair_use_on, fixtures, offline_speech_ms, omi_name};

/// The first `n` records of a `.bin` container, then a zero-length record, then the rest.
fn with_empty_record_after(bytes: &[u8], n: usize) -> (Vec<u8>, Vec<u8>, u64) {
    let mut offset = 0usize;
    for _ in 0..n {
        let len = u32::from_le_bytes([
            bytes[offset],
            bytes[offset + 1],
            bytes[offset + 2],
            bytes[offset + 3],
        ]) as usize;
        offset += 4 + len;
    }
    let head = bytes[..offset].to_vec();
    let mut cut = head.clone();
    cut.extend_from_slice(&0u32.to_le_bytes());
    cut.extend_from_slice(&bytes[offset..]);
    (cut, head, offset as u64)
}

#[actix_web::test]
async fn a_zero_length_record_mid_file_is_the_file_status_with_its_offset() {
    let server = EngineServer::start(fair_use_on(), |_| {}).await;
    let fx = fixtures();
    let (cut, head, offset) = with_empty_record_after(&fx[0].1, 1_500);
    let name = omi_name(3_600);
    let (code, body, _) = server.upload("cutter", "", &[(name.clone(), cut)]).await;
    assert_eq!(code, 200, "{body}");
    let file = &body["files"][0];
    assert_eq!(file["status"], "truncated", "{body}");
    assert_eq!(file["code"], "empty_record", "{body}");
    assert_eq!(file["truncated_at"], offset, "{body}");
    // The records before the cut were metered, nothing after it.
    assert_eq!(file["speech_ms"], offline_speech_ms(&name, &head), "{body}");
    server.shutdown().await;
}

/// A NUL in one file's name (a raw byte in its part header) fails that file, not the request (issue #17
/// item 4).
#[actix_web::test]
async fn a_nul_in_one_file_name_fails_only_that_file() {
    let server = EngineServer::start(fair_use_on(), |_| {}).await;
    let fx = fixtures();
    let good = omi_name(3_600);
    let bad = format!("{}\0.bin", omi_name(3_000));
    let (code, body, _) = server
        .upload(
            "nul",
            "",
            &[(good.clone(), fx[0].1.clone()), (bad, fx[1].1.clone())],
        )
        .await;
    assert_eq!(code, 207, "{body}");
    let files = body["files"].as_array().cloned().unwrap_or_default();
    assert_eq!(files.len(), 2, "{body}");
    assert_eq!(files[0]["status"], "ok", "{body}");
    assert_eq!(files[1]["code"], "invalid_file_name", "{body}");
    assert!(
        files[1]["file"].as_str().is_some_and(|n| n.contains('\0')),
        "the name as sent: {body}"
    );
    assert!(body["speech_ms"].as_u64().unwrap_or(0) > 0, "{body}");
    server.shutdown().await;
}

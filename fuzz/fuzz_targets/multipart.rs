#![no_main]
//! The upload reader (the NUL rewrite of part headers, actix-multipart, the limits, the temp files) on
//! arbitrary bodies cut into arbitrary chunks: no panic and no hang; an accepted batch holds at most the
//! file limit, every file within the per-file limit with its size on disk, all within the request limit;
//! and the temp folder is gone once the batch is dropped, accepted or not.
use std::cell::RefCell;
use std::path::PathBuf;

use actix_web::error::PayloadError;
use actix_web::http::header::{CONTENT_TYPE, HeaderMap, HeaderValue};
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use voicegate_server::upload::{UploadLimits, read_multipart};

const MAX_FILES: usize = 4;
const MAX_FILE: u64 = 2_048;
const MAX_REQUEST: u64 = 8_192;

thread_local! {
    static SYSTEM: RefCell<actix_rt::SystemRunner> = RefCell::new(actix_rt::System::new());
    static DIR: PathBuf = {
        let d = std::env::temp_dir().join(format!("vg-fuzz-multipart-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("fuzz temp dir");
        d
    };
}

fuzz_target!(|data: &[u8]| {
    // Byte 0: the chunk size (1..=256); the body follows, between the fixed boundary's framing.
    let Some((&chunk, body)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk) + 1;
    let chunks: Vec<Result<Bytes, PayloadError>> = body
        .chunks(chunk)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    let mut headers = HeaderMap::new();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("multipart/form-data; boundary=XyZ"),
    );
    let dir = DIR.with(Clone::clone);
    let limits = UploadLimits {
        max_file_bytes: MAX_FILE,
        max_files: MAX_FILES,
        max_request_bytes: MAX_REQUEST,
        dir: Some(dir.clone()),
        folder_prefix: "fuzz-".into(),
    };
    let result = SYSTEM.with(|s| {
        s.borrow().block_on(read_multipart(
            &headers,
            futures_util::stream::iter(chunks),
            &limits,
        ))
    });
    if let Ok(batch) = result {
        assert!(!batch.files.is_empty() && batch.files.len() <= MAX_FILES);
        let mut total = 0;
        for f in &batch.files {
            assert!(f.size <= MAX_FILE);
            let on_disk = std::fs::metadata(&f.path)
                .expect("a saved file exists")
                .len();
            assert_eq!(on_disk, f.size);
            total += f.size;
        }
        assert!(total <= MAX_REQUEST);
    }
    let left = std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0);
    assert_eq!(left, 0, "an upload's temp folder was left behind");
});

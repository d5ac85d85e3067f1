//! The sync use case's per-file step: a saved upload's name checked (codec, timestamp), its content decoded
//! and VAD-segmented by the offline pipeline; and the per-file result the response lists.

use std::fs::File;
use std::io::BufReader;
use std::path::PathBuf;
use std::time::Instant;

use rayon::prelude::*;
use serde::Serialize;

use crate::audio::codec::Codec;
use crate::audio::filename::parse_sync_name;
use crate::pipeline::offline::{FileAnalysis, InputFormat, analyze};
use crate::pipeline::stream::PipelineConfig;
use crate::telemetry::SYNC_PROCESS_DURATION_SECONDS;

/// One uploaded file, saved by the caller (the server's upload reader) and readable at `path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncFile {
    /// The file name the client sent (may be empty or invalid: only this file then fails).
    pub name: String,
    pub path: PathBuf,
    /// SHA-256 of the content, lowercase hex: the metering idempotency key (a re-upload never meters twice).
    pub sha256_hex: String,
}

/// One file after [`analyse`]: its analysis, or why it failed.
#[derive(Debug)]
pub struct Analysed {
    pub(super) name: String,
    pub(super) sha256: String,
    pub(super) start_ms: u64,
    pub(super) limitless: bool,
    /// The saved file (read again to transcribe its spans) and its codec, once the name was valid.
    pub(super) path: PathBuf,
    pub(super) codec: Option<Codec>,
    /// Err: (code, message, whether the failure is the server's).
    pub(super) analysis: Result<FileAnalysis, (&'static str, String, bool)>,
}

impl Analysed {
    /// The file's conversation segments (merged speech of at least [`super::MIN_SEGMENT_MS`]); 0 for a file
    /// that failed.
    pub fn segments(&self) -> usize {
        self.analysis.as_ref().map_or(0, |fa| {
            fa.merged_segments_ms
                .iter()
                .filter(|[s, e]| e.saturating_sub(*s) >= super::MIN_SEGMENT_MS)
                .count()
        })
    }
}

/// One file's result.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct FileResult {
    pub file: String,
    /// `ok`, `truncated` (the container was cut at `truncated_at`: the records before it were metered,
    /// nothing after it), `duplicate` (already metered by an earlier upload of the same content) or
    /// `failed`.
    pub status: &'static str,
    /// Speech found in the file (raw VAD runs, before the 120 s merge).
    pub speech_ms: u64,
    pub duration_ms: u64,
    /// Stable code when `failed` or `truncated` (e.g. `empty_record`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<&'static str>,
    /// The byte offset where a truncated file was cut.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub truncated_at: Option<u64>,
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// Names, decode and VAD of every file, in parallel on the rayon pool; blocking (the caller runs it off
/// its I/O threads). `now_s` (epoch seconds) bounds the names' timestamps. A bad file fails only itself.
pub fn analyse(files: &[SyncFile], now_s: u64, cfg: &PipelineConfig) -> Vec<Analysed> {
    let started = Instant::now();
    let analysed = files
        .par_iter()
        .map(|f| analyse_file(f, now_s, cfg))
        .collect::<Vec<_>>();
    metrics::histogram!(SYNC_PROCESS_DURATION_SECONDS).record(started.elapsed().as_secs_f64());
    analysed
}

pub(super) fn failed(
    file: String,
    code: &'static str,
    error: String,
    duration_ms: u64,
) -> FileResult {
    FileResult {
        file,
        status: "failed",
        speech_ms: 0,
        duration_ms,
        code: Some(code),
        truncated_at: None,
        error: Some(error),
        warnings: Vec::new(),
    }
}

fn analyse_file(f: &SyncFile, now_s: u64, cfg: &PipelineConfig) -> Analysed {
    let display = if f.name.is_empty() {
        "(unnamed)".to_owned()
    } else {
        f.name.clone()
    };
    let mut out = Analysed {
        name: display.clone(),
        sha256: f.sha256_hex.clone(),
        start_ms: 0,
        limitless: false,
        path: f.path.clone(),
        codec: None,
        analysis: Err(("internal", String::new(), true)),
    };
    let (spec, start_ms) = match parse_sync_name(&f.name, now_s) {
        Ok(v) => v,
        Err(e) => {
            out.analysis = Err((e.code(), format!("{display}: {e}"), false));
            return out;
        }
    };
    out.start_ms = start_ms;
    out.limitless = spec.limitless;
    out.codec = Some(spec.codec);
    let file = match File::open(&f.path) {
        Ok(file) => file,
        Err(e) => {
            out.analysis = Err(("temp_file_unreadable", e.to_string(), true));
            return out;
        }
    };
    let fa = analyze(&display, BufReader::new(file), &InputFormat::Bin(spec), cfg);
    out.analysis = match (&fa.error, fa.error_code) {
        (Some(error), code) => {
            let code = code.unwrap_or("decode_failed");
            let server_side = code == "vad_unavailable";
            Err((code, format!("{display}: {error}"), server_side))
        }
        (None, _) => Ok(fa),
    };
    out
}

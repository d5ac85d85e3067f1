//! `POST /v1/sync-local-files`: device files uploaded after the fact.
//!
//! Order (the reference's, with its defects fixed):
//! 1. Entitlement for `sync`: restricted and over a cap → 429 with `Retry-After`, before the body is read.
//!    Credits exhausted → processing continues and the conversations are locked.
//! 2. The body is streamed to a per-request temp directory under the upload limits (413 names the limit).
//! 3. Every file is checked (name, codec, timestamp) and decoded + VAD-segmented in parallel; a bad file fails
//!    only itself.
//! 4. Each good file's raw (pre-merge) speech is metered under its content SHA-256: a re-upload never meters
//!    twice.
//! 5. Restrict stage with the daily STT budget used up → 429 `stt_budget_exhausted` (speech is metered, no
//!    conversation is touched; the client retries after the reset).
//! 6. Merged segments (120 s rule, ≥ 1 s) become spans of conversations, created or merged per user.
//!
//! 200 when every file succeeded, 207 when some failed, 400 when no file was valid (503 when the failures
//! were the server's: the client should retry). The temp files are removed on every path.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::BufReader;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use actix_web::{HttpRequest, HttpResponse, ResponseError, http::StatusCode, web};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use voicegate_engine::audio::filename::parse_sync_name;
use voicegate_engine::conversation::Upsert;
use voicegate_engine::meter::{RecordSpeech, RecordStatus, SpeechAmount, SpeechSource};
use voicegate_engine::pipeline::offline::{FileAnalysis, InputFormat, analyze};
use voicegate_engine::pipeline::stream::PipelineConfig;
use voicegate_engine::policy::backfill::{self, Lane};
use voicegate_engine::policy::{Admission, Mode, SttAllowance, SttDenied};
use voicegate_engine::store::backfill::Charge;
use voicegate_engine::telemetry::{
    SYNC_AUDIO_SECONDS_TOTAL, SYNC_FILES_BY_LANE_TOTAL, SYNC_FILES_TOTAL,
    SYNC_PROCESS_DURATION_SECONDS, SYNC_REQUESTS_TOTAL,
};
use voicegate_engine::time::Span;

use crate::auth::AuthedUser;
use crate::engine::Engine;
use crate::error::ApiError;
use crate::upload::{UploadLimits, read_upload};

/// Merged segments shorter than this are not conversation content (the reference's 1 s rule).
pub const MIN_SEGMENT_MS: u64 = 1_000;

#[derive(Debug, Deserialize)]
pub struct SyncQuery {
    pub conversation_id: Option<String>,
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

/// The response body.
#[derive(Debug, Clone, Serialize)]
pub struct SyncResponse {
    pub new_memories: Vec<String>,
    pub updated_memories: Vec<String>,
    /// Speech found in this request's good files.
    pub speech_ms: u64,
    /// Speech metered by this request (0 for content metered before).
    pub metered_speech_ms: u64,
    pub locked: bool,
    pub files: Vec<FileResult>,
}

struct Analysed {
    name: String,
    sha256: String,
    start_ms: u64,
    limitless: bool,
    analysis: Result<FileAnalysis, (&'static str, String, bool)>,
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub async fn sync_local_files(
    req: HttpRequest,
    user: AuthedUser,
    query: web::Query<SyncQuery>,
    payload: web::Payload,
    engine: web::Data<Engine>,
    limits: web::Data<UploadLimits>,
) -> Result<HttpResponse, ApiError> {
    let result = handle(
        &req,
        &user.uid,
        query.into_inner(),
        payload,
        &engine,
        &limits,
    )
    .await;
    let outcome = match &result {
        Ok(r) if r.status() == StatusCode::OK => "ok",
        Ok(r) if r.status() == StatusCode::MULTI_STATUS => "partial",
        Ok(_) => "failed",
        Err(_) => "rejected",
    };
    metrics::counter!(SYNC_REQUESTS_TOTAL, "outcome" => outcome).increment(1);
    result
}

async fn handle(
    req: &HttpRequest,
    uid: &str,
    query: SyncQuery,
    payload: web::Payload,
    engine: &Engine,
    limits: &UploadLimits,
) -> Result<HttpResponse, ApiError> {
    // 1. Gates, before reading the body.
    let plan = engine.plan(uid).await;
    let ent = engine
        .fair_use
        .entitlement(uid, Mode::Sync, plan.as_record())
        .await;
    if let Admission::Reject {
        reason,
        retry_after_s,
    } = ent.admission
    {
        let mut extra = Map::new();
        extra.insert("new_memories".into(), json!([]));
        extra.insert("updated_memories".into(), json!([]));
        extra.insert("stage".into(), json!(ent.stage));
        return Err(
            ApiError::too_many_requests(reason.code(), reason.message(), retry_after_s)
                .with_fields(extra),
        );
    }
    let locked = ent.lock;

    // 2. The body.
    let batch = read_upload(req, payload, limits).await?;

    // 3. Names, decode and VAD, in parallel on the rayon pool (off the I/O threads).
    let now = now_s();
    let files = batch.files.clone();
    let cfg: PipelineConfig = engine.pipeline;
    let started = Instant::now();
    let analysed = web::block(move || {
        files
            .par_iter()
            .map(|f| analyse_file(f, now, &cfg))
            .collect::<Vec<_>>()
    })
    .await
    .map_err(|e| ApiError::internal("sync_worker_failed", e))?;
    metrics::histogram!(SYNC_PROCESS_DURATION_SECONDS).record(started.elapsed().as_secs_f64());
    drop(batch); // temp files are no longer needed

    // 4. Meter each good file, keyed by its content.
    let mut results = Vec::with_capacity(analysed.len());
    let mut spans = Vec::new();
    let (mut speech_ms, mut metered_ms) = (0u64, 0u64);
    let mut server_failures = 0usize;
    let mut allowance_refused = 0usize;
    let mut limitless = false;
    let arrival_ms = engine.clock.now_ms();
    let today = backfill::utc_day(arrival_ms);
    for a in analysed {
        let fa = match a.analysis {
            Ok(fa) => fa,
            Err((code, error, server_side)) => {
                server_failures += usize::from(server_side);
                results.push(failed(a.name, code, error, 0));
                continue;
            }
        };
        metrics::counter!(SYNC_AUDIO_SECONDS_TOTAL).increment(fa.duration_ms / 1000);
        // The backfill decision (DESIGN §3): too old is refused; backfill is charged to today's allowance
        // before it is metered (and refunded when it turns out not to be metered).
        let lane = backfill::lane(a.start_ms, arrival_ms, &engine.backfill);
        metrics::counter!(SYNC_FILES_BY_LANE_TOTAL, "lane" => lane.label()).increment(1);
        let mut charged = 0u64;
        match lane {
            Lane::Fresh => {}
            Lane::TooOld => {
                results.push(failed(
                    a.name,
                    "recording_too_old",
                    format!(
                        "recorded more than {} days before its upload (VOICEGATE_BACKFILL_LOOKBACK_DAYS)",
                        engine.backfill.lookback_ms / 86_400_000
                    ),
                    fa.duration_ms,
                ));
                continue;
            }
            Lane::Backfill => {
                let allowance = engine.backfill.allowance_ms;
                match engine
                    .backfill_ledger
                    .charge(uid, today, fa.speech_ms, allowance)
                    .await
                {
                    Ok(Charge::Granted { .. }) => charged = fa.speech_ms,
                    Ok(Charge::Exhausted { used_ms }) => {
                        allowance_refused += 1;
                        results.push(failed(
                            a.name,
                            "backfill_allowance_exhausted",
                            format!(
                                "{} ms of speech recorded over 24 h ago does not fit today's backfill allowance \
                                 ({used_ms} of {allowance} ms used, VOICEGATE_BACKFILL_ALLOWANCE_MS); retry after the next UTC midnight",
                                fa.speech_ms
                            ),
                            fa.duration_ms,
                        ));
                        continue;
                    }
                    Err(e) => {
                        // The allowance cannot be checked: backfill waits (fresh speech is unaffected).
                        tracing::warn!(message = "Charging the backfill allowance failed.", uid, error = %e);
                        server_failures += 1;
                        results.push(failed(
                            a.name,
                            "metering_unavailable",
                            "the backfill allowance could not be checked; retry the upload".into(),
                            fa.duration_ms,
                        ));
                        continue;
                    }
                }
            }
        }
        let rec = RecordSpeech::new(
            uid,
            SpeechAmount::Samples {
                samples: fa.speech_samples,
                rate_hz: 16_000,
            },
            a.start_ms,
            SpeechSource::Sync,
        )
        .with_idempotency_key(format!("sync:{}", a.sha256));
        let recorded = engine.fair_use.record(rec).await;
        let unmetered = !matches!(&recorded, Ok(o) if o.status == RecordStatus::Recorded);
        if charged > 0
            && unmetered
            && let Err(error) = engine.backfill_ledger.refund(uid, today, charged).await
        {
            tracing::warn!(message = "Refunding the backfill allowance failed.", uid, %error);
        }
        let status = match recorded {
            Ok(o) => o.status,
            Err(e) => {
                tracing::warn!(message = "Metering a sync file failed.", uid, file = %a.name, error = %e);
                server_failures += 1;
                results.push(failed(
                    a.name,
                    "metering_unavailable",
                    "the speech could not be metered; retry the upload".into(),
                    fa.duration_ms,
                ));
                continue;
            }
        };
        let whole = if fa.truncated_at.is_some() {
            "truncated"
        } else {
            "ok"
        };
        let file_status = match status {
            RecordStatus::Recorded => {
                metered_ms += fa.speech_ms;
                whole
            }
            RecordStatus::Empty => whole,
            RecordStatus::Duplicate => "duplicate",
            RecordStatus::Dropped => {
                server_failures += 1;
                results.push(failed(
                    a.name,
                    "metering_overloaded",
                    "the meter is over its memory bound; retry the upload".into(),
                    fa.duration_ms,
                ));
                continue;
            }
        };
        limitless |= a.limitless;
        speech_ms += fa.speech_ms;
        spans.extend(
            fa.merged_segments_ms
                .iter()
                .filter(|[s, e]| e.saturating_sub(*s) >= MIN_SEGMENT_MS)
                .map(|[s, e]| Span {
                    start: a.start_ms + s,
                    end: a.start_ms + e,
                }),
        );
        results.push(FileResult {
            file: a.name,
            status: file_status,
            speech_ms: fa.speech_ms,
            duration_ms: fa.duration_ms,
            code: fa.truncation_code,
            truncated_at: fa.truncated_at,
            error: None,
            warnings: fa.warnings,
        });
    }
    for r in &results {
        let s = if r.status == "failed" { "failed" } else { "ok" };
        metrics::counter!(SYNC_FILES_TOTAL, "status" => s).increment(1);
    }
    let good = results.iter().filter(|r| r.status != "failed").count();
    if good == 0 && allowance_refused > 0 {
        return Err(allowance_exhausted(
            arrival_ms,
            locked,
            &[],
            &[],
            0,
            0,
            &results,
        ));
    }
    if good == 0 {
        let refusal = if server_failures > 0 {
            ApiError::unavailable(
                "sync_unavailable",
                "no file could be processed now; retry the upload",
            )
        } else {
            ApiError::bad_request(
                "no_valid_files",
                "no uploaded file was valid; see files[].error",
            )
        };
        // An answer, not a rejection: the files were read and judged (counted as `failed`).
        return Ok(refusal
            .with_field("new_memories", json!([]))
            .with_field("updated_memories", json!([]))
            .with_field("speech_ms", 0)
            .with_field("metered_speech_ms", 0)
            .with_field("locked", locked)
            .with_field(
                "files",
                serde_json::to_value(&results).unwrap_or(Value::Null),
            )
            .error_response());
    }

    // 5. The daily STT budget of the restrict stage.
    if let SttAllowance::None {
        reason: SttDenied::BudgetExhausted,
        resets_at_ms,
        ..
    } = ent.stt
    {
        let retry_after_s = resets_at_ms
            .map(|at| at.saturating_sub(engine.clock.now_ms()).div_ceil(1000))
            .unwrap_or(3_600);
        let mut extra = Map::new();
        extra.insert("new_memories".into(), json!([]));
        extra.insert("updated_memories".into(), json!([]));
        extra.insert("credits_exhausted".into(), json!(locked));
        extra.insert("dg_budget_exhausted".into(), json!(true));
        extra.insert("skipped_segments".into(), json!(spans.len()));
        extra.insert("speech_ms".into(), json!(speech_ms));
        extra.insert(
            "files".into(),
            serde_json::to_value(&results).unwrap_or(Value::Null),
        );
        return Err(ApiError::too_many_requests(
            SttDenied::BudgetExhausted.code(),
            "today's transcription budget is used up; the speech was metered, retry after the reset",
            retry_after_s,
        )
        .with_fields(extra));
    }

    // 6. Conversations.
    let source = if limitless { "limitless" } else { "omi" };
    let outcome = engine
        .conversations
        .upsert(Upsert {
            uid: uid.to_owned(),
            spans,
            locked,
            source: source.to_owned(),
            target: query.conversation_id.filter(|s| !s.is_empty()),
        })
        .await
        .map_err(|e| {
            ApiError::unavailable(
                e.code(),
                format!("{e}; the speech was metered, retry the upload"),
            )
        })?;
    if allowance_refused > 0 {
        // What fitted was metered and joined conversations; the rest waits for the next UTC day.
        return Err(allowance_exhausted(
            arrival_ms,
            locked,
            &dedup(outcome.new),
            &dedup(outcome.updated),
            speech_ms,
            metered_ms,
            &results,
        ));
    }
    let all_ok = results.iter().all(|r| r.status != "failed");
    let body = SyncResponse {
        new_memories: dedup(outcome.new),
        updated_memories: dedup(outcome.updated),
        speech_ms,
        metered_speech_ms: metered_ms,
        locked,
        files: results,
    };
    let status = if all_ok {
        StatusCode::OK
    } else {
        StatusCode::MULTI_STATUS
    };
    Ok(HttpResponse::build(status).json(body))
}

/// 429 `backfill_allowance_exhausted`: some files did not fit today's backfill allowance; `Retry-After` to
/// the next UTC midnight. The body also says what was accepted (a retry of those is a duplicate).
fn allowance_exhausted(
    now_ms: u64,
    locked: bool,
    new: &[String],
    updated: &[String],
    speech_ms: u64,
    metered_ms: u64,
    results: &[FileResult],
) -> ApiError {
    ApiError::too_many_requests(
        "backfill_allowance_exhausted",
        "today's allowance of backdated speech (files recorded over 24 h ago) is used up; \
         see files[], retry those after the next UTC midnight",
        backfill::retry_after_s(now_ms),
    )
    .with_field("new_memories", json!(new))
    .with_field("updated_memories", json!(updated))
    .with_field("speech_ms", speech_ms)
    .with_field("metered_speech_ms", metered_ms)
    .with_field("locked", locked)
    .with_field(
        "files",
        serde_json::to_value(results).unwrap_or(Value::Null),
    )
}

fn dedup(ids: Vec<String>) -> Vec<String> {
    ids.into_iter()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

fn failed(file: String, code: &'static str, error: String, duration_ms: u64) -> FileResult {
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

fn analyse_file(f: &crate::upload::SavedFile, now_s: u64, cfg: &PipelineConfig) -> Analysed {
    let display = if f.name.is_empty() {
        "(unnamed)".to_owned()
    } else {
        f.name.clone()
    };
    let mut out = Analysed {
        name: display.clone(),
        sha256: f.sha256_hex(),
        start_ms: 0,
        limitless: false,
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

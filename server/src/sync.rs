//! `POST /v1/sync-local-files`: device files uploaded after the fact. The use case (decode, VAD, the backfill
//! decision, metering, conversations, per-file status) is the engine's [`voicegate_engine::pipeline::sync`];
//! this handler keeps the HTTP around it:
//! 0. Admission: at most `VOICEGATE_SYNC_UPLOADS_PER_USER` uploads per user on all nodes (a lease; 429
//!    `too_many_uploads`) and
//!    `VOICEGATE_SYNC_MAX_UPLOADS` on the node (503 `uploads_at_capacity`) at once ([`crate::upload_slots`]).
//! 1. Entitlement for `sync`: restricted and over a cap → 429 with `Retry-After`, before the body is read.
//!    Credits exhausted → processing continues and the conversations are locked.
//! 2. The body is streamed to a per-request temp directory under the upload limits (413 names the limit).
//! 3. The engine analyses the files on the rayon pool (off the I/O threads), then settles them (meter,
//!    conversations, and the spans' transcription through the node's provider, which reads the files
//!    again); the temp files are removed once settled (and on every path).
//! 4. The outcome becomes the response: 200 when every file succeeded, 207 when some failed, 400 when no
//!    file was valid (503 when the failures were the server's: the client should retry), 429
//!    `backfill_allowance_exhausted` with `Retry-After`, 503 when the conversations could not be written.
//!    An exhausted STT budget refuses nothing: the spans it does not cover are stored `budget_exhausted`.

use actix_web::{HttpRequest, HttpResponse, ResponseError, http::StatusCode, web};
use serde::Deserialize;
use serde_json::{Value, json};
use voicegate_engine::pipeline::sync::{
    self as use_case, SyncFile, SyncOutcome, SyncReport, SyncRequest, SyncServices,
};
use voicegate_engine::policy::{Admission, Entitlement, Mode};
use voicegate_engine::stt::SttProvider;
use voicegate_engine::telemetry::SYNC_REQUESTS_TOTAL;

use crate::auth::AuthedUser;
use crate::engine::Engine;
use crate::error::ApiError;
use crate::upload::{UploadLimits, read_upload};
use crate::upload_slots::UploadSlots;

#[derive(Debug, Deserialize)]
pub struct SyncQuery {
    pub conversation_id: Option<String>,
}

pub async fn sync_local_files(
    req: HttpRequest,
    user: AuthedUser,
    query: web::Query<SyncQuery>,
    payload: web::Payload,
    engine: web::Data<Engine>,
    limits: web::Data<UploadLimits>,
    slots: web::Data<UploadSlots>,
) -> Result<HttpResponse, ApiError> {
    // Held until the answer (dropped with the request on every other path).
    let _slot = match slots.acquire(&user.uid).await {
        Ok(slot) => slot,
        Err(refused) => {
            metrics::counter!(SYNC_REQUESTS_TOTAL, "outcome" => "rejected").increment(1);
            return Err(refused.into());
        }
    };
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
    // 1. Gates, before reading the body (the reference's v1 body fields on a refusal).
    let ent = admit(engine, uid).await.map_err(|refusal| {
        refusal
            .with_field("new_memories", json!([]))
            .with_field("updated_memories", json!([]))
    })?;

    // 2. The body.
    let batch = read_upload(req, payload, limits).await?;

    // 3. The use case: names, decode and VAD on the rayon pool (off the I/O threads), then the meter and
    //    the conversations.
    let arrival_ms = engine.clock.now_ms();
    let now_s = arrival_ms / 1000;
    let files: Vec<SyncFile> = batch
        .files
        .iter()
        .map(|f| SyncFile {
            name: f.name.clone(),
            path: f.path.clone(),
            sha256_hex: f.sha256_hex(),
        })
        .collect();
    let cfg = engine.pipeline;
    let analysed = web::block(move || use_case::analyse(&files, now_s, &cfg))
        .await
        .map_err(|e| ApiError::internal("sync_worker_failed", e))?;
    let services = SyncServices {
        fair_use: engine.fair_use.clone(),
        conversations: engine.conversations.clone(),
        backfill: engine.backfill,
        backfill_ledger: engine.backfill_ledger.clone(),
        clock: engine.clock.clone(),
        // The node's provider (`VOICEGATE_STT`), registered by the app state; absent: nothing is transcribed.
        stt: req
            .app_data::<web::Data<dyn SttProvider>>()
            .map(|p| p.clone().into_inner()),
        stt_preroll_ms: engine.stt_preroll_ms,
    };
    let request = SyncRequest {
        uid: uid.to_owned(),
        locked: ent.lock,
        stt: ent.stt,
        target: query.conversation_id,
        arrival_ms,
    };
    let outcome = use_case::settle(&services, request, analysed)
        .await
        .map_err(|e| {
            ApiError::unavailable(
                e.code(),
                format!("{e}; the speech was metered, retry the upload"),
            )
        })?;
    drop(batch); // the temp files were read again to transcribe the spans: no longer needed

    // 4. The response.
    match outcome {
        SyncOutcome::Done(report) => {
            let status = if report.all_ok() {
                StatusCode::OK
            } else {
                StatusCode::MULTI_STATUS
            };
            Ok(HttpResponse::build(status).json(report))
        }
        SyncOutcome::NoValidFiles {
            report,
            server_side,
        } => {
            let refusal = if server_side {
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
            Ok(with_report(refusal, &report).error_response())
        }
        SyncOutcome::BackfillAllowanceExhausted {
            report,
            retry_after_s,
        } => Err(with_report(
            ApiError::too_many_requests(
                "backfill_allowance_exhausted",
                "today's allowance of backdated speech (files recorded over 24 h ago) is used up; \
                 see files[], retry those after the next UTC midnight",
                retry_after_s,
            ),
            &report,
        )),
    }
}

/// The sync gate of v1 and v2, before the body is read: the caller's entitlement for `sync`, or the 429
/// of a restricted user over a cap (`fair_use_restricted`, `Retry-After` bounded by the policy) with the
/// user's `stage`. Credits exhausted admit (the entitlement's `lock` says to lock what is created).
pub async fn admit(engine: &Engine, uid: &str) -> Result<Entitlement, ApiError> {
    let plan = engine.plan(uid).await;
    let ent = engine
        .fair_use
        .entitlement(uid, Mode::Sync, plan.as_record())
        .await;
    match ent.admission {
        Admission::Reject {
            reason,
            retry_after_s,
        } => Err(
            ApiError::too_many_requests(reason.code(), reason.message(), retry_after_s)
                .with_field("stage", json!(ent.stage)),
        ),
        Admission::Admit => Ok(ent),
    }
}

/// A refusal that also says what the request did: the conversations touched, the speech found and
/// metered, the lock, and every file's result (a retry of what was accepted is a duplicate).
fn with_report(refusal: ApiError, report: &SyncReport) -> ApiError {
    match serde_json::to_value(report) {
        Ok(Value::Object(fields)) => refusal.with_fields(fields),
        // Unreachable (a struct of strings, numbers and bools serialises to an object); the refusal stands.
        _ => refusal,
    }
}

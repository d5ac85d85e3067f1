//! `POST /v1/sync-local-files`: device files uploaded after the fact, deprecated in favour of v2 and run on
//! its machinery (`crate::sync_v2`; `docs/api.md`). The use case (decode, VAD, the backfill decision,
//! metering, conversations, transcription) is the engine's [`voicegate_engine::pipeline::sync`]; this
//! handler keeps the HTTP around it:
//! 0. Entitlement for `sync`: restricted and over a cap → 429 with `Retry-After`, before anything else (a
//!    client retrying into it costs one entitlement read). Credits exhausted → processing continues and the
//!    conversations are locked.
//! 1. Admission: at most `VOICEGATE_SYNC_UPLOADS_PER_USER` uploads per user on all nodes (a lease; 429
//!    `too_many_uploads`) and `VOICEGATE_SYNC_MAX_UPLOADS` on the node (503 `uploads_at_capacity`) at once
//!    ([`crate::upload_slots`]); the slot is held until the upload's job has run.
//! 2. The spool's room (507 `sync_spool_full`), then the body, streamed to a per-request temp directory
//!    under the upload limits (413 names the limit), becomes a job: moved into the spool, recorded under the
//!    user's quotas (429 `too_many_sync_jobs`, `sync_spool_user_quota`), queued under this node's lease.
//! 3. The job runs now on this node ([`crate::sync_v2::worker::Workers::run_inline`]); the answer waits for
//!    its speech to be metered and in conversations (`VOICEGATE_SYNC_V1_WAIT_SECS`, else 202 with the job),
//!    then briefly for the transcription (`VOICEGATE_SYNC_V1_TRANSCRIPT_WAIT_SECS`, else `pending`: the job
//!    finishes it).
//! 4. The outcome becomes the response: 200 when every file succeeded, 207 when some failed, 400 when no
//!    file was valid (503 when the failures were the server's: the client should retry), 429
//!    `backfill_allowance_exhausted` with `Retry-After`, 503 when the conversations could not be written.
//!    An exhausted STT budget refuses nothing: the spans it does not cover are stored `budget_exhausted`.

use actix_web::{HttpRequest, HttpResponse, ResponseError, http::StatusCode, web};
use serde_json::{Value, json};
use voicegate_engine::pipeline::sync::{SyncOutcome, SyncReport};
use voicegate_engine::policy::Entitlement;
use voicegate_engine::telemetry::SYNC_REQUESTS_TOTAL;

use crate::auth::AuthedUser;
use crate::engine::Engine;
use crate::error::ApiError;
use crate::sync_v2::record::{Origin, POLL_AFTER_MS};
use crate::sync_v2::{self, Progress, SyncJobs, SyncQuery, admit};
use crate::upload::{UploadLimits, read_upload};
use crate::upload_slots::{UploadSlot, UploadSlots};

#[allow(clippy::too_many_arguments)] // actix extractors
pub async fn sync_local_files(
    req: HttpRequest,
    user: AuthedUser,
    query: web::Query<SyncQuery>,
    payload: web::Payload,
    engine: web::Data<Engine>,
    limits: web::Data<UploadLimits>,
    slots: web::Data<UploadSlots>,
    jobs: web::Data<SyncJobs>,
) -> Result<HttpResponse, ApiError> {
    let rejected = |refusal: ApiError| {
        metrics::counter!(SYNC_REQUESTS_TOTAL, "outcome" => "rejected").increment(1);
        refusal
    };
    // 1. The gate, first: a restricted client retrying in a loop costs one entitlement read per retry, not
    //    an upload slot's lease taken and given back as well (docs/performance.md, "Retry storm").
    let ent = admit(&engine, &user.uid)
        .await
        .map_err(|refusal| rejected(v1_refusal(refusal)))?;
    // Held until the answer, or until the upload's job has run (dropped with the request on every other
    // path).
    let slot = slots
        .acquire(&user.uid)
        .await
        .map_err(|refused| rejected(refused.into()))?;
    let result = handle(
        &req,
        ent,
        &user.uid,
        query.into_inner(),
        payload,
        &engine,
        &limits,
        &jobs,
        slot,
    )
    .await;
    let outcome = match &result {
        Ok(r) if r.status() == StatusCode::OK => "ok",
        Ok(r) if r.status() == StatusCode::MULTI_STATUS => "partial",
        Ok(r) if r.status() == StatusCode::ACCEPTED => "running",
        Ok(_) => "failed",
        Err(_) => "rejected",
    };
    metrics::counter!(SYNC_REQUESTS_TOTAL, "outcome" => outcome).increment(1);
    result
}

#[allow(clippy::too_many_arguments)]
async fn handle(
    req: &HttpRequest,
    ent: Entitlement,
    uid: &str,
    query: SyncQuery,
    payload: web::Payload,
    engine: &Engine,
    limits: &UploadLimits,
    jobs: &SyncJobs,
    slot: UploadSlot,
) -> Result<HttpResponse, ApiError> {
    // 2. The spool's room for it, the body, then a job of it (spooled, recorded, queued under the lease
    //    this request runs it with).
    let room = sync_v2::reserve_room(req, jobs, limits).map_err(v1_refusal)?;
    let batch = read_upload(req, payload, limits).await?;
    let upload = sync_v2::Upload {
        batch,
        room,
        locked: ent.lock,
        target: query.conversation_id,
    };
    let submitted = sync_v2::submit(engine, jobs, uid, upload, Origin::V1)
        .await
        .map_err(v1_refusal)?;
    let job_id = submitted.queued.job_id.clone();
    let Some(lease) = submitted.lease else {
        // `submit` returns a v1 job's lease or an error.
        return Err(ApiError::internal(
            "sync_job_lease",
            "a v1 job without its lease",
        ));
    };

    // 3. The job runs now, on this node (decode and VAD on the decode pool, then the meter, the
    //    conversations and the transcription). The answer waits for the speech to be settled, then a
    //    little for the transcription; whatever outlives the request goes on in the job.
    let mut progress = jobs.workers.run_inline(submitted.queued, lease, slot);
    let settled = tokio::time::timeout(jobs.cfg.v1_wait, async {
        progress
            .wait_for(|p| !matches!(p, Progress::Running))
            .await
            .map(|p| p.clone())
    })
    .await;
    let mut now = match settled {
        Ok(Ok(p)) => p,
        // Not settled in time; or the run stopped before it was (a drain, a store error): the job is in
        // the queue and is resumed (here or on another node).
        Err(_) | Ok(Err(_)) => return Ok(still_running(&job_id, &jobs.cfg)),
    };
    if matches!(now, Progress::Settled(_))
        && let Ok(Ok(p)) = tokio::time::timeout(jobs.cfg.v1_transcript_wait, async {
            progress
                .wait_for(|p| matches!(p, Progress::Ended(_) | Progress::Failed(_)))
                .await
                .map(|p| p.clone())
        })
        .await
    {
        now = p;
    }

    // 4. The response.
    let outcome = match now {
        Progress::Settled(outcome) | Progress::Ended(outcome) => outcome,
        Progress::Failed(e) => {
            return Err(ApiError::unavailable(failure_code(&e.code), e.message)
                .with_field("job_id", json!(job_id)));
        }
        Progress::Running => {
            return Err(ApiError::internal(
                "sync_job_progress",
                "still running after waiting",
            ));
        }
    };
    match outcome {
        SyncOutcome::Done(report) => {
            let status = if report.all_ok() {
                StatusCode::OK
            } else {
                StatusCode::MULTI_STATUS
            };
            Ok(HttpResponse::build(status).json(body(&report, &job_id)))
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
            Ok(with_report(refusal, &report, &job_id).error_response())
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
            &job_id,
        )),
    }
}

/// The v1 body: the report and the job that holds it (`GET /v2/sync-local-files/{job_id}` follows a
/// `pending` transcription to its end).
fn body(report: &SyncReport, job_id: &str) -> Value {
    let mut body = serde_json::to_value(report).unwrap_or_else(|_| json!({}));
    if let Some(obj) = body.as_object_mut() {
        obj.insert("job_id".into(), json!(job_id));
    }
    body
}

/// The speech was not settled within `VOICEGATE_SYNC_V1_WAIT_SECS` (a very large upload on a busy node), or
/// its run was stopped (a drain): 202 with the job, which goes on or is resumed; the client follows it on v2
/// (or uploads again later: nothing is metered twice).
fn still_running(job_id: &str, cfg: &sync_v2::JobsConfig) -> HttpResponse {
    HttpResponse::Accepted()
        .insert_header((
            actix_web::http::header::LOCATION,
            format!("/v2/sync-local-files/{job_id}"),
        ))
        .json(json!({
            "job_id": job_id,
            "status": "running",
            "message": format!(
                "the upload is accepted and still being processed (at most {} s were waited); poll \
                 /v2/sync-local-files/{job_id}",
                cfg.v1_wait.as_secs()
            ),
            "poll_after_ms": POLL_AFTER_MS,
            "new_memories": [],
            "updated_memories": [],
        }))
}

/// A refusal of v1 with the reference's v1 body fields (nothing was created; the gate's refusals carry
/// them as the reference's do).
fn v1_refusal(refusal: ApiError) -> ApiError {
    refusal
        .with_field("new_memories", json!([]))
        .with_field("updated_memories", json!([]))
}

/// A job error's code as a refusal code (the codes a run can fail with; anything else is
/// `sync_unavailable`).
fn failure_code(code: &str) -> &'static str {
    match code {
        "metering_unavailable" => "metering_unavailable",
        "conversation_store_unavailable" => "conversation_store_unavailable",
        "conversation_store_busy" => "conversation_store_busy",
        "conversation_store_corrupt" => "conversation_store_corrupt",
        "conversation_invalid" => "conversation_invalid",
        "conversation_not_found" => "conversation_not_found",
        "sync_job_files_lost" => "sync_job_files_lost",
        _ => "sync_unavailable",
    }
}

/// A refusal that also says what the request did: the conversations touched, the speech found and
/// metered, the lock, and every file's result (a retry of what was accepted is a duplicate).
fn with_report(refusal: ApiError, report: &SyncReport, job_id: &str) -> ApiError {
    match body(report, job_id) {
        Value::Object(fields) => refusal.with_fields(fields),
        // Unreachable (a struct of strings, numbers and bools serialises to an object); the refusal stands.
        _ => refusal,
    }
}

//! Making a job of an upload read by its request (v1 and v2): the spool's room reserved before the body,
//! the files moved into the spool, the record created under the user's quotas, the job queued (and, for
//! v1, its lease taken first so its request runs it).

use actix_web::HttpRequest;
use actix_web::http::header;
use voicegate_engine::audio::filename::parse_sync_name;
use voicegate_engine::lease::{Acquired, LeaseGuard};
use voicegate_engine::policy::backfill;
use voicegate_engine::store::lease::LeaseKey;
use voicegate_engine::store::sync_jobs::{CreateLimits, Created, QueuedJob};
use voicegate_engine::telemetry::SYNC_JOBS_CREATED_TOTAL;

use super::record::{self, FileState, JobFile, JobRecord, JobStatus, Origin};
use super::room::Reservation;
use super::{
    JOBS_END_RETRY_AFTER_S, SyncJobs, discard, job, new_job_id, refused, spool, spool_down,
    store_down, worker,
};
use crate::engine::Engine;
use crate::error::ApiError;
use crate::upload::{UploadBatch, UploadLimits};

/// An upload made a job: its record, its queue entry and, for v1, the job's lease.
pub(crate) struct Submitted {
    pub queued: QueuedJob,
    pub rec: JobRecord,
    pub lease: Option<LeaseGuard>,
}

/// An upload read by its request, to become a job.
pub(crate) struct Upload {
    pub batch: UploadBatch,
    /// Its room in the spool ([`reserve_room`], before the body was read).
    pub room: Reservation,
    /// The entitlement's credit lock at admission.
    pub locked: bool,
    /// `?conversation_id=`.
    pub target: Option<String>,
}

/// The spool's room for what a request's body can hold (its declared length, else the request limit; a
/// longer body is cut by the HTTP framing or refused 413 by the reader), before the body is read: 507
/// `sync_spool_full` when the spool (`VOICEGATE_SYNC_SPOOL_MAX_BYTES`) or its volume
/// (`VOICEGATE_SYNC_SPOOL_MIN_FREE_BYTES`) has no room for it.
pub(crate) fn reserve_room(
    req: &HttpRequest,
    jobs: &SyncJobs,
    limits: &UploadLimits,
) -> Result<Reservation, ApiError> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    jobs.room
        .reserve(declared.map_or(limits.max_request_bytes, |n| {
            n.min(limits.max_request_bytes)
        }))
        .map_err(|full| {
            let (limit, value) = full.limit();
            refused(
                "spool_full",
                ApiError::new(
                    actix_web::http::StatusCode::INSUFFICIENT_STORAGE,
                    "sync_spool_full",
                    full.to_string(),
                )
                .retry_after(JOBS_END_RETRY_AFTER_S)
                .with_field("limit", limit)
                .with_field("limit_value", value)
                .closing_connection(),
            )
        })
}

/// Makes a job of an upload read by the caller: the files moved into the spool, the record created under the
/// user's quotas (`VOICEGATE_SYNC_JOBS_PER_USER`, else 429 `too_many_sync_jobs`;
/// `VOICEGATE_SYNC_SPOOL_BYTES_PER_USER`, else 429 `sync_spool_user_quota`) and queued. A v2 job is then run
/// by the worker pool; a v1 job comes with its lease, for its request to run it ([`Workers::run_inline`]).
pub(crate) async fn submit(
    engine: &Engine,
    jobs: &SyncJobs,
    uid: &str,
    upload: Upload,
    origin: Origin,
) -> Result<Submitted, ApiError> {
    let Upload {
        batch,
        room,
        locked,
        target,
    } = upload;
    let bytes: u64 = batch.files.iter().map(|f| f.size).sum();
    let job_id = new_job_id();
    let dest = jobs.cfg.spool.join(&job_id);
    // A v1 job is run by its request's node: its lease is taken first (before the job exists, so a refusal
    // leaves nothing behind) and held while it is queued, so no worker (here or on another node) takes it.
    let lease = if origin == Origin::V1 {
        match engine
            .leases
            .acquire(LeaseKey::job(worker::JOB_LEASE, uid, &job_id), 1)
            .await
        {
            Acquired::Granted(g) => Some(g),
            Acquired::Refused { .. } | Acquired::Unavailable { .. } => {
                return Err(ApiError::unavailable(
                    "sync_jobs_unavailable",
                    "the job's lease could not be taken; retry the request",
                ));
            }
        }
    } else {
        None
    };
    let (to, staging) = (dest.clone(), jobs.incoming());
    // Off the async workers: across file systems the move is a copy.
    let files = actix_web::web::block(move || batch.persist(&to, &staging))
        .await
        .map_err(|e| ApiError::internal("sync_spool_worker", e))?
        .map_err(|e| spool_down(&e))?;
    if let Err(e) = spool::write_owner(&dest, uid) {
        discard(&dest);
        return Err(spool_down(&e));
    }

    // 4. The record, queued.
    let now = engine.clock.now_ms();
    let files: Vec<JobFile> = files
        .iter()
        .map(|f| JobFile {
            name: f.name.clone(),
            spool_name: f
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            sha256: f.sha256_hex(),
            bytes: f.size,
            lane: match parse_sync_name(&f.name, now / 1000) {
                Ok((_, start_ms)) => backfill::lane(start_ms, now, &engine.backfill)
                    .label()
                    .to_owned(),
                Err(_) => "unknown".to_owned(),
            },
            state: FileState::Pending,
            decoded: false,
            segments: 0,
            result: None,
        })
        .collect();
    let rec = JobRecord::queued(
        job_id.clone(),
        uid.to_owned(),
        files,
        (locked, target.filter(|s| !s.is_empty())),
        now,
        origin,
    );
    let queued = QueuedJob {
        uid: uid.to_owned(),
        job_id: job_id.clone(),
        backfill: rec.is_backfill(),
    };
    let text = serde_json::to_string(&rec).map_err(|e| ApiError::internal("sync_job_record", e))?;
    let limits = CreateLimits {
        max_open_per_user: jobs.cfg.jobs_per_user,
        max_bytes_per_user: jobs.cfg.spool_bytes_per_user,
        retention_ms: jobs.cfg.retention_ms,
    };
    let created = jobs
        .store
        .create(uid, &job_id, &text, bytes, now, limits)
        .await;
    let created = match created {
        Ok(c) => c,
        Err(e) => {
            discard(&dest);
            return Err(store_down(&e));
        }
    };
    match created {
        Created::Created => {}
        Created::UserQuotaFull { open } => {
            discard(&dest);
            return Err(refused(
                "jobs_per_user",
                ApiError::too_many_requests(
                    "too_many_sync_jobs",
                    format!(
                        "{open} of your sync jobs are not finished (VOICEGATE_SYNC_JOBS_PER_USER); poll them \
                         and upload more once one has ended"
                    ),
                    JOBS_END_RETRY_AFTER_S,
                ),
            ));
        }
        Created::UserBytesFull { bytes: held } => {
            discard(&dest);
            return Err(refused(
                "spool_user_quota",
                ApiError::too_many_requests(
                    "sync_spool_user_quota",
                    format!(
                        "your unfinished sync jobs hold {held} bytes; this upload's {bytes} would pass \
                         VOICEGATE_SYNC_SPOOL_BYTES_PER_USER ({}); poll them and upload more once one has ended",
                        jobs.cfg.spool_bytes_per_user
                    ),
                    JOBS_END_RETRY_AFTER_S,
                )
                .with_field("limit", "VOICEGATE_SYNC_SPOOL_BYTES_PER_USER")
                .with_field("limit_value", jobs.cfg.spool_bytes_per_user),
            ));
        }
    }
    // A v1 job runs now under its lease; its queue entry is only the resume point should this process die,
    // due once the request's waits are over (no dispatcher probes it meanwhile).
    let due = match origin {
        Origin::V2 => now,
        Origin::V1 => now.saturating_add(
            u64::try_from((jobs.cfg.v1_wait + jobs.cfg.v1_transcript_wait).as_millis())
                .unwrap_or(u64::MAX),
        ),
    };
    if let Err(e) = jobs.store.schedule(&queued, due).await {
        // Closed as failed (best effort: the store just failed), so the user's quotas are not held by a job
        // that never runs; the client's retry creates another job and meters nothing twice.
        discard(&dest);
        let mut failed = rec.clone();
        failed.status = JobStatus::Failed;
        failed.finished_at_ms = Some(now);
        failed.error = Some(record::JobError {
            code: "sync_jobs_unavailable".into(),
            message: "the job could not be queued; upload the files again".into(),
            retryable: true,
        });
        if let Ok(text) = serde_json::to_string(&failed)
            && let Err(error) = jobs
                .store
                .finish(&queued, &text, jobs.cfg.retention_ms)
                .await
        {
            tracing::warn!(message = "Closing a sync job that could not be queued failed; it holds its quotas until it expires.", uid, job_id, %error);
        }
        return Err(store_down(&e));
    }
    room.commit(bytes);
    if lease.is_none() {
        jobs.workers.wake();
    }
    metrics::counter!(SYNC_JOBS_CREATED_TOTAL, "lane" => job::lane_label(&queued)).increment(1);
    tracing::info!(
        message = "Sync job queued.",
        uid,
        job_id,
        files = rec.files.len(),
        backfill = queued.backfill,
        origin = ?origin
    );
    Ok(Submitted { queued, rec, lease })
}

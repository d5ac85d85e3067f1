//! Sync v2: `POST /v2/sync-local-files` stores the upload durably and answers **202** with a job;
//! `GET /v2/sync-local-files/{job_id}` reports it (`docs/api.md`, "Sync v2").
//!
//! 1. Admission as v1 (`crate::sync`): the entitlement (429 for a restricted user over a cap, before the
//!    body; the credit lock is read and kept in the job), then the per-user and per-node upload limits.
//! 2. The queue's bound (`VOICEGATE_SYNC_QUEUE_MAX` jobs on all nodes, else 503 `sync_queue_full`), then the
//!    spool's room for the declared length ([`room`]: `VOICEGATE_SYNC_SPOOL_MAX_BYTES` and the volume's
//!    `VOICEGATE_SYNC_SPOOL_MIN_FREE_BYTES`, else 507 `sync_spool_full`), all before the body.
//! 3. The body is streamed under the upload limits into the spool (`VOICEGATE_SYNC_SPOOL_DIR`; shared by the
//!    nodes that share a store) and moved to `<spool>/<job id>/` with one rename; nothing is decoded.
//! 4. The job's record is written under the user's quotas, counted on all nodes and checked at once by the
//!    store: unfinished jobs (`VOICEGATE_SYNC_JOBS_PER_USER`, else 429 `too_many_sync_jobs`) and their
//!    files' bytes (`VOICEGATE_SYNC_SPOOL_BYTES_PER_USER`, else 429 `sync_spool_user_quota`; only the body
//!    tells the bytes, so this one is after it). A refused job's folder is removed. Then the job is queued
//!    and the node's [`worker`] pool woken.
//!
//! The job record and the status body are [`record`]'s; running, resuming and lanes are [`worker`]'s.

mod job;
pub mod record;
pub mod room;
pub mod spool;
mod submit;
pub mod worker;

pub use self::job::Progress;
use self::submit::Submitted;
pub(crate) use self::submit::{Upload, reserve_room, submit};

use std::path::PathBuf;
use std::sync::Arc;

use actix_web::{HttpRequest, HttpResponse, http::header, web};
use serde::Deserialize;
use serde_json::json;
use voicegate_engine::policy::{Admission, Entitlement, Mode};
use voicegate_engine::store::sync_jobs::SyncJobStore;
use voicegate_engine::telemetry::SYNC_UPLOADS_REFUSED_TOTAL;

use self::record::{JobRecord, Origin, POLL_AFTER_MS};
use self::room::SpoolRoom;
use self::worker::Workers;
use crate::auth::AuthedUser;
use crate::engine::Engine;
use crate::error::ApiError;
use crate::upload::{UploadLimits, read_upload};
use crate::upload_slots::UploadSlots;

/// `?conversation_id=` of an upload (v1 and v2).
#[derive(Debug, Deserialize)]
pub struct SyncQuery {
    pub conversation_id: Option<String>,
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

/// The v2 settings.
#[derive(Clone, Debug)]
pub struct JobsConfig {
    pub spool: PathBuf,
    /// How long a v1 upload waits for its speech to be metered and in conversations
    /// (`VOICEGATE_SYNC_V1_WAIT_SECS`; then 202 with the job).
    pub v1_wait: std::time::Duration,
    /// Then how long it waits for the transcription (`VOICEGATE_SYNC_V1_TRANSCRIPT_WAIT_SECS`; then
    /// `transcript_status: pending`, the job goes on).
    pub v1_transcript_wait: std::time::Duration,
    pub jobs_per_user: u64,
    pub spool_bytes_per_user: u64,
    pub queue_max: u64,
    pub retention_ms: u64,
}

/// The v2 app data: the job store, the settings, the spool's room and the node's worker pool.
#[derive(Clone)]
pub struct SyncJobs {
    pub store: Arc<dyn SyncJobStore>,
    pub cfg: JobsConfig,
    pub room: Arc<SpoolRoom>,
    pub workers: Workers,
}

/// `Retry-After` of a refusal that lasts until some queued jobs end: ten of a job's polls.
const JOBS_END_RETRY_AFTER_S: u64 = 10 * POLL_AFTER_MS.div_ceil(1000);

impl SyncJobs {
    /// Where uploads are written before they become a job (the spool's file system, so the move is a
    /// rename).
    pub fn incoming(&self) -> PathBuf {
        self.cfg.spool.join("incoming")
    }
}

/// Builds the v2 app data from the configuration and starts the node's worker pool (inside the actix
/// system). Sweeps upload folders a crashed process left in the spool's `incoming` folder.
pub fn start(
    cfg: &crate::ServeConfig,
    engine: &Engine,
    stt: Arc<dyn voicegate_engine::stt::SttProvider>,
) -> SyncJobs {
    let spool = cfg
        .sync_jobs
        .spool_dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join("voicegate-spool"));
    let swept = crate::upload::sweep_leftovers(&spool.join("incoming"));
    if swept > 0 {
        tracing::info!(
            message = "Removed unfinished sync v2 uploads of a previous process.",
            folders = swept
        );
    }
    let retention_ms = cfg.sync_jobs.retention_secs.saturating_mul(1000);
    if let Err(error) = std::fs::create_dir_all(&spool) {
        // Not fatal: uploads answer 503 `sync_spool_unavailable` until the folder can be made.
        tracing::error!(message = "The sync spool folder cannot be made.", dir = %spool.display(), %error);
    }
    let room = SpoolRoom::new(
        spool.clone(),
        cfg.sync_jobs.spool_max_bytes,
        cfg.sync_jobs.spool_min_free_bytes,
    );
    let workers = Workers::start(
        engine.clone(),
        Arc::clone(&engine.sync_jobs),
        Some(stt),
        worker::WorkerConfig {
            workers: cfg.sync_jobs.workers,
            stt_wait: std::time::Duration::from_secs(cfg.sync_jobs.stt_wait_secs),
            backfill_workers: cfg.sync_jobs.backfill_workers,
            backfill_jobs_per_user: u32::try_from(cfg.sync_jobs.backfill_jobs_per_user)
                .unwrap_or(u32::MAX),
            retention_ms,
            spool: spool.clone(),
            room: Arc::clone(&room),
        },
    );
    SyncJobs {
        store: Arc::clone(&engine.sync_jobs),
        cfg: JobsConfig {
            spool,
            v1_wait: std::time::Duration::from_secs(cfg.sync_jobs.v1_wait_secs),
            v1_transcript_wait: std::time::Duration::from_secs(
                cfg.sync_jobs.v1_transcript_wait_secs,
            ),
            jobs_per_user: cfg.sync_jobs.jobs_per_user as u64,
            spool_bytes_per_user: cfg.sync_jobs.spool_bytes_per_user,
            queue_max: cfg.sync_jobs.queue_max as u64,
            retention_ms,
        },
        room,
        workers,
    }
}

/// A new job id: a random UUID v4 (as the reference's).
fn new_job_id() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// A job id as [`new_job_id`] makes them (anything else is unknown, without a store call).
fn valid_job_id(id: &str) -> bool {
    id.len() == 36
        && id.bytes().enumerate().all(|(i, c)| {
            matches!(i, 8 | 13 | 18 | 23) == (c == b'-') && (c == b'-' || c.is_ascii_hexdigit())
        })
}

#[allow(clippy::too_many_arguments)]
pub async fn create(
    req: HttpRequest,
    user: AuthedUser,
    query: web::Query<SyncQuery>,
    payload: web::Payload,
    engine: web::Data<Engine>,
    limits: web::Data<UploadLimits>,
    slots: web::Data<UploadSlots>,
    jobs: web::Data<SyncJobs>,
) -> Result<HttpResponse, ApiError> {
    let uid = user.uid.as_str();
    // 1. Gates, before reading the body (v1's): the entitlement first (a refused retry costs no slot), then
    //    the upload slot, held while the body is read (the same limits as v1).
    let ent = admit(&engine, uid).await?;
    let _slot = slots.acquire(uid).await?;
    // 2. The queue's bound.
    match jobs.store.queued().await {
        Ok(n) if n >= jobs.cfg.queue_max => {
            return Err(refused(
                "queue_full",
                ApiError::unavailable(
                    "sync_queue_full",
                    format!(
                        "{n} sync jobs are queued on all servers (VOICEGATE_SYNC_QUEUE_MAX); retry later"
                    ),
                ),
            ));
        }
        Ok(_) => {}
        Err(e) => return Err(store_down(&e)),
    }
    std::fs::create_dir_all(jobs.incoming()).map_err(|e| spool_down(&e))?;
    let room = reserve_room(&req, &jobs, &limits)?;

    // 3. The body, into the spool (a refused or failed upload's files go with its batch).
    let mut spool_limits = limits.get_ref().clone();
    spool_limits.dir = Some(jobs.incoming());
    let batch = read_upload(&req, payload, &spool_limits).await?;

    // 4. The record, queued.
    let target = query.into_inner().conversation_id;
    let upload = Upload {
        batch,
        room,
        locked: ent.lock,
        target,
    };
    let Submitted { queued, rec, .. } = submit(&engine, &jobs, uid, upload, Origin::V2).await?;
    let job_id = queued.job_id;
    Ok(HttpResponse::Accepted()
        .insert_header((header::LOCATION, format!("/v2/sync-local-files/{job_id}")))
        .json(json!({
            "job_id": job_id,
            "status": "queued",
            "total_files": rec.files.len(),
            "total_segments": 0,
            "poll_after_ms": POLL_AFTER_MS,
        })))
}

pub async fn status(
    user: AuthedUser,
    path: web::Path<String>,
    jobs: web::Data<SyncJobs>,
) -> Result<HttpResponse, ApiError> {
    let job_id = path.into_inner();
    let not_found = || ApiError::not_found("sync_job_not_found", "Sync job not found or expired");
    if !valid_job_id(&job_id) {
        return Err(not_found());
    }
    // The key holds the caller's uid: another user's job is simply not found (never revealed).
    let text = jobs
        .store
        .get(&user.uid, &job_id)
        .await
        .map_err(|e| store_down(&e))?
        .ok_or_else(not_found)?;
    let rec: JobRecord =
        serde_json::from_str(&text).map_err(|e| ApiError::internal("sync_job_record", e))?;
    if rec.uid != user.uid {
        return Err(not_found());
    }
    Ok(HttpResponse::Ok().json(rec.view()))
}

/// Counts a refusal of an upload for a limit (`voicegate_sync_uploads_refused_total{reason}`).
fn refused(reason: &'static str, err: ApiError) -> ApiError {
    metrics::counter!(SYNC_UPLOADS_REFUSED_TOTAL, "reason" => reason).increment(1);
    err
}

fn store_down(e: &voicegate_engine::store::StoreError) -> ApiError {
    tracing::warn!(message = "The sync job store failed.", error = %e);
    ApiError::unavailable(
        "sync_jobs_unavailable",
        "the job store is not reachable; retry the request",
    )
}

fn spool_down(e: &std::io::Error) -> ApiError {
    tracing::error!(message = "The sync spool is not writable.", error = %e);
    ApiError::unavailable(
        "sync_spool_unavailable",
        "the upload could not be stored; retry the request",
    )
}

fn discard(dir: &std::path::Path) {
    if let Err(error) = std::fs::remove_dir_all(dir) {
        tracing::warn!(message = "Removing a refused job's spool folder failed.", dir = %dir.display(), %error);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_ids_are_uuid_v4_and_only_they_are_valid() {
        let id = new_job_id();
        assert!(valid_job_id(&id), "{id}");
        assert_eq!(&id[14..15], "4");
        assert_ne!(new_job_id(), id);
        for bad in [
            "",
            "../x",
            "0123456789abcdef0123456789abcdef0123",
            &id.to_uppercase()[..35],
        ] {
            assert!(!valid_job_id(bad), "{bad}");
        }
    }
}

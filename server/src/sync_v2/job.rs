//! One run of a sync v2 job (the pool that starts runs is [`super::worker`]): the unsettled files decoded
//! one at a time, then settled together as v1 settles an upload; each file's state written to the record;
//! the job's end, its deferral to the next UTC day, or its retry after a server-side failure.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use voicegate_engine::conversation::TranscriptStatus;
use voicegate_engine::events::{Event, EventKind};
use voicegate_engine::pipeline::sync::{self as use_case, SyncFile, SyncOutcome, SyncRequest};
use voicegate_engine::policy::{Mode, backfill};
use voicegate_engine::store::StoreError;
use voicegate_engine::store::sync_jobs::{QueuedJob, SyncJobStore};
use voicegate_engine::stt::SttProvider;
use voicegate_engine::telemetry::SYNC_JOBS_TOTAL;
use voicegate_engine::time::Backoff;

use super::record::{FileState, JobError, JobRecord, JobStage, JobStatus, Origin};
use crate::engine::Engine;

const DAY_MS: u64 = 86_400_000;
/// Runs of one job at most before a persistent server-side failure fails it.
pub const MAX_ATTEMPTS: u32 = 8;

/// What a run needs (the worker pool holds one).
pub(super) struct JobContext {
    pub(super) engine: Engine,
    pub(super) store: Arc<dyn SyncJobStore>,
    pub(super) stt: Option<Arc<dyn SttProvider>>,
    pub(super) retention_ms: u64,
    pub(super) spool: PathBuf,
    /// `VOICEGATE_SYNC_STT_WAIT_SECS`.
    pub(super) stt_wait: Duration,
}

/// The metric label of a job's lane.
pub fn lane_label(job: &QueuedJob) -> &'static str {
    if job.backfill {
        "sync_backfill"
    } else {
        "sync_fresh"
    }
}
/// Files decoded at once (in parallel on the decode pool), between two progress writes. Measured with
/// 20 uploaders (`loadtest/measure.sh sync --uploaders 20 --files 10 --rounds 3 --v2`, 2 workers): one file
/// at a time 2,330-2,443 audio-s per s, 4 at a time 2,541-2,593, 16 at a time 2,645 (v1 in the same
/// session: 2,653-2,852); each chunk ends on its slowest file, so small chunks leave a core idle.
const DECODE_CHUNK: usize = 16;

/// What a v1 request waits for while its job runs (`crate::sync`), through a `watch` channel.
#[derive(Debug, Clone)]
pub enum Progress {
    /// Decoding, metering, writing the conversations.
    Running,
    /// Metered and in conversations; the spans are being transcribed (the outcome's `transcript_status` is
    /// `pending`).
    Settled(SyncOutcome),
    /// The job ended with this outcome.
    Ended(SyncOutcome),
    /// The run stopped before the speech was settled: the job's error (the job ends `failed`).
    Failed(JobError),
}

/// Where a run reports its progress (a v1 request waits on the other end; nobody for a v2 job).
pub(super) type Observer = Option<tokio::sync::watch::Sender<Progress>>;

/// Tells the waiting request, if any; whether one is still there (the client may have left, or the request
/// answered 202: the job goes on regardless).
fn tell(observer: &Observer, progress: Progress) -> bool {
    observer
        .as_ref()
        .is_some_and(|tx| tx.send(progress).is_ok())
}

/// Whether a v1 request still waits on this run (then it tells its client what to retry).
fn watched(observer: &Observer) -> bool {
    observer.as_ref().is_some_and(|tx| !tx.is_closed())
}

/// Why a run stopped before the job's end (the job stays queued and is resumed).
#[derive(Debug, thiserror::Error)]
pub(super) enum RunError {
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("record: {0}")]
    Record(#[from] serde_json::Error),
}

/// One run of a job: every file not yet settled, in order, then the job's end (or its deferral).
pub(super) async fn run(
    inner: &JobContext,
    job: &QueuedJob,
    observer: &Observer,
) -> Result<(), RunError> {
    let store = &inner.store;
    let engine = &inner.engine;
    let Some(text) = store.get(&job.uid, &job.job_id).await? else {
        // Expired (or never written by a node that died while creating it): nothing to run.
        tracing::warn!(message = "A queued sync job has no record; dropped.", uid = %job.uid, job_id = %job.job_id);
        store.unqueue(job).await?;
        return Ok(());
    };
    let mut rec: JobRecord = serde_json::from_str(&text)?;
    if rec.status.is_terminal() {
        store.unqueue(job).await?;
        return Ok(());
    }
    let started = Instant::now();
    rec.status = JobStatus::Running;
    rec.attempts += 1;
    rec.resumes_at_ms = None;
    rec.error = None;
    save(inner, &mut rec).await?;

    let dir = inner.spool.join(&rec.job_id);
    if rec
        .files
        .iter()
        .any(|f| f.state != FileState::Done && !dir.join(&f.spool_name).is_file())
    {
        rec.error = Some(JobError {
            code: "sync_job_files_lost".into(),
            message:
                "the job's uploaded files are no longer in the spool (VOICEGATE_SYNC_SPOOL_DIR); \
                      upload them again (nothing is metered twice)"
                    .into(),
            retryable: true,
        });
        if let Some(e) = &rec.error {
            let _ = tell(observer, Progress::Failed(e.clone()));
        }
        return end(inner, job, rec, JobStatus::Failed).await;
    }

    // The entitlement at run time (the STT allowance; the credit lock is the upload's).
    let plan = engine.plan(&rec.uid).await;
    let ent = engine
        .fair_use
        .entitlement(&rec.uid, Mode::Sync, plan.as_record())
        .await;
    let services = use_case::SyncServices {
        fair_use: engine.fair_use.clone(),
        conversations: engine.conversations.clone(),
        backfill: engine.backfill,
        backfill_ledger: engine.backfill_ledger.clone(),
        clock: engine.clock.clone(),
        stt: inner.stt.clone(),
        stt_preroll_ms: engine.stt_preroll_ms,
        stt_wait: inner.stt_wait,
        stt_busy: use_case::BUSY_BACKOFF,
    };
    // 1. Decode and segment the unsettled files, a few at a time (the status shows the progress).
    let todo: Vec<usize> = (0..rec.files.len())
        .filter(|&i| rec.files[i].state != FileState::Done)
        .collect();
    rec.stage = Some(JobStage::Decoding);
    let mut analysed = Vec::with_capacity(todo.len());
    for &i in &todo {
        rec.files[i].decoded = false;
    }
    for chunk in todo.chunks(DECODE_CHUNK) {
        save(inner, &mut rec).await?;
        let files: Vec<SyncFile> = chunk
            .iter()
            .map(|&i| SyncFile {
                name: rec.files[i].name.clone(),
                path: dir.join(&rec.files[i].spool_name),
                sha256_hex: rec.files[i].sha256.clone(),
            })
            .collect();
        let t = Instant::now();
        let cfg = engine.pipeline;
        let now_s = rec.created_at_ms / 1000;
        let done = tokio::task::spawn_blocking(move || use_case::analyse(&files, now_s, &cfg))
            .await
            .map_err(|e| StoreError::Unavailable(format!("decode worker: {e}")))?;
        rec.timings.decode_ms += elapsed_ms(t);
        for (&i, a) in chunk.iter().zip(&done) {
            rec.files[i].segments = a.segments() as u64;
            rec.files[i].decoded = true;
        }
        analysed.extend(done);
    }

    // 2. Settle them together, as v1 does (metering, conversations, transcription): the job's
    //    conversations are exactly the ones v1 makes of the same files.
    rec.stage = Some(JobStage::Processing);
    save(inner, &mut rec).await?;
    let t = Instant::now();
    let request = SyncRequest {
        uid: rec.uid.clone(),
        locked: rec.locked,
        stt: ent.stt,
        target: rec.target.clone(),
        arrival_ms: rec.created_at_ms,
    };
    let settled = match use_case::settle_speech(&services, request, analysed).await {
        Ok(settled) => settled,
        Err(e) => return retry_later(inner, job, rec, e.code(), &e.to_string(), observer).await,
    };
    // Settled only once the speech is in the store: a crash after this point must not lose it (the
    // meter's write-behind would otherwise hold it up to a flush interval).
    if settled.outcome().report().metered_speech_ms > 0
        && let Err(e) = engine.meter.flush_user(&rec.uid).await
    {
        let message = e.to_string();
        return retry_later(inner, job, rec, "metering_unavailable", &message, observer).await;
    }
    // A v1 request that receives this outcome tells its client which files to retry (`files[]`): then
    // they are settled once. Otherwise (a v2 job, or nobody got the answer) the job retries them itself.
    let answered =
        rec.origin == Origin::V1 && tell(observer, Progress::Settled(settled.outcome().clone()));
    let outcome = settled.transcribe(&services).await;
    rec.timings.processing_ms += elapsed_ms(t);
    let report = outcome.report().clone();
    // The allowance is per UTC day: deferred files run again at the next UTC midnight.
    let deferred_until = match &outcome {
        SyncOutcome::BackfillAllowanceExhausted { .. } if !answered => {
            let next_day = backfill::utc_day(engine.clock.now_ms()) + 1;
            Some(next_day.saturating_mul(DAY_MS))
        }
        _ => None,
    };
    // 3. Each file's state from its result (the report lists them in order).
    let mut server_side = false;
    for (&i, result) in todo.iter().zip(&report.files) {
        let f = &mut rec.files[i];
        // Settled once when the v1 answer tells the client what to retry.
        let v2 = !answered;
        f.state = match (result.status, result.code) {
            ("failed", Some("backfill_allowance_exhausted")) if v2 => FileState::Deferred,
            (
                "failed",
                Some("metering_unavailable" | "metering_overloaded" | "vad_unavailable"),
            ) if v2 && rec.attempts < MAX_ATTEMPTS => {
                server_side = true;
                FileState::Pending
            }
            _ => FileState::Done,
        };
        if f.state == FileState::Done {
            f.result = serde_json::to_value(result).ok();
        }
    }
    add_report(&mut rec, &report);
    rec.timings.total_ms += elapsed_ms(started);
    rec.stage = None;
    if server_side {
        return retry_later(
            inner,
            job,
            rec,
            "sync_unavailable",
            "some files could not be processed now",
            observer,
        )
        .await;
    }
    if let Some(until) =
        deferred_until.filter(|_| rec.files.iter().any(|f| f.state == FileState::Deferred))
    {
        rec.status = JobStatus::Queued;
        rec.resumes_at_ms = Some(until);
        save(inner, &mut rec).await?;
        store.schedule(job, until).await?;
        tracing::info!(message = "Sync job deferred to the next UTC day (backfill allowance).", uid = %rec.uid, job_id = %rec.job_id, resumes_at_ms = until);
        return Ok(());
    }
    let status = rec.final_status();
    // Told first: the speech is settled whatever `end` (a store write) does.
    tell(observer, Progress::Ended(outcome));
    end(inner, job, rec, status).await
}

/// Adds what one settle did to the job's totals.
fn add_report(rec: &mut JobRecord, report: &use_case::SyncReport) {
    rec.speech_ms += report.speech_ms;
    rec.metered_speech_ms += report.metered_speech_ms;
    rec.stt_ms += report.stt_ms;
    for id in &report.new_memories {
        if !rec.new_memories.contains(id) {
            rec.new_memories.push(id.clone());
        }
        rec.updated_memories.retain(|u| u != id);
    }
    for id in &report.updated_memories {
        if !rec.new_memories.contains(id) && !rec.updated_memories.contains(id) {
            rec.updated_memories.push(id.clone());
        }
    }
    rec.new_memories.sort();
    rec.updated_memories.sort();
    let statuses = rec
        .transcript_status
        .as_deref()
        .and_then(TranscriptStatus::parse)
        .into_iter()
        .chain(report.transcript_status);
    rec.transcript_status = TranscriptStatus::worst(statuses).map(|s| s.as_str().to_owned());
}

async fn save(inner: &JobContext, rec: &mut JobRecord) -> Result<(), RunError> {
    rec.updated_at_ms = inner.engine.clock.now_ms();
    let text = serde_json::to_string(&rec)?;
    inner
        .store
        .save(&rec.uid, &rec.job_id, &text, inner.retention_ms)
        .await?;
    Ok(())
}

/// A server-side failure: the job goes back to the queue after a backoff (or fails once it ran
/// [`MAX_ATTEMPTS`] times). A v1 job whose request still waits fails at once: the answer tells the client to
/// retry the upload (the speech already metered is not metered again).
async fn retry_later(
    inner: &JobContext,
    job: &QueuedJob,
    mut rec: JobRecord,
    code: &str,
    message: &str,
    observer: &Observer,
) -> Result<(), RunError> {
    if rec.origin == Origin::V1 && watched(observer) {
        let error = JobError {
            code: code.to_owned(),
            message: format!("{message}; the speech was metered, retry the upload"),
            retryable: true,
        };
        let _ = tell(observer, Progress::Failed(error.clone()));
        rec.error = Some(error);
        return end(inner, job, rec, JobStatus::Failed).await;
    }
    rec.error = Some(JobError {
        code: code.to_owned(),
        message: format!("{message}; the job is retried"),
        retryable: true,
    });
    if rec.attempts >= MAX_ATTEMPTS {
        rec.error = Some(JobError {
            code: "sync_unavailable".into(),
            message: format!(
                "{message}; the job failed after {MAX_ATTEMPTS} runs, upload the files again \
                 (nothing is metered twice)"
            ),
            retryable: true,
        });
        return end(inner, job, rec, JobStatus::Failed).await;
    }
    let mut backoff = Backoff::new(Duration::from_secs(2), Duration::from_secs(120));
    let mut delay = backoff.next_delay();
    for _ in 1..rec.attempts {
        delay = backoff.next_delay();
    }
    let due = inner.engine.clock.now_ms() + u64::try_from(delay.as_millis()).unwrap_or(120_000);
    rec.status = JobStatus::Queued;
    rec.stage = None;
    rec.resumes_at_ms = Some(due);
    save(inner, &mut rec).await?;
    inner.store.schedule(job, due).await?;
    Ok(())
}

/// The job's end: the final record, off the queue, its spool folder removed.
async fn end(
    inner: &JobContext,
    job: &QueuedJob,
    mut rec: JobRecord,
    status: JobStatus,
) -> Result<(), RunError> {
    let now = inner.engine.clock.now_ms();
    rec.status = status;
    rec.stage = None;
    rec.finished_at_ms = Some(now);
    rec.updated_at_ms = now;
    let text = serde_json::to_string(&rec)?;
    inner.store.finish(job, &text, inner.retention_ms).await?;
    remove_spool(&inner.spool.join(&rec.job_id));
    inner.engine.events.publish(Event {
        kind: EventKind::SyncJobEnded,
        uid: rec.uid.clone(),
        id: rec.job_id.clone(),
        version: now,
        data: serde_json::json!({
            "status": status,
            "files": rec.files.len(),
            "failed_files": rec.failed_files(),
            "speech_ms": rec.speech_ms,
            "new_memories": rec.new_memories,
            "updated_memories": rec.updated_memories,
        }),
    });
    metrics::counter!(SYNC_JOBS_TOTAL, "status" => status_label(status), "lane" => lane_label(job))
        .increment(1);
    tracing::info!(message = "Sync job ended.", uid = %rec.uid, job_id = %rec.job_id, status = status_label(status), files = rec.files.len(), speech_ms = rec.speech_ms);
    Ok(())
}

fn remove_spool(dir: &Path) {
    if let Err(error) = std::fs::remove_dir_all(dir)
        && error.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(message = "Removing a finished sync job's spool folder failed.", dir = %dir.display(), %error);
    }
}

fn status_label(s: JobStatus) -> &'static str {
    match s {
        JobStatus::Queued => "queued",
        JobStatus::Running => "running",
        JobStatus::Completed => "completed",
        JobStatus::PartialFailure => "partial_failure",
        JobStatus::Failed => "failed",
    }
}

fn elapsed_ms(t: Instant) -> u64 {
    u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX)
}

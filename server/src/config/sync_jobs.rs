//! Sync v2 jobs' settings (`crate::sync_v2`), flattened into [`super::ServeConfig`].

use std::path::PathBuf;

use clap::Args;

use super::defaults;

#[derive(Args, Debug, Clone, PartialEq, Eq)]
pub struct SyncJobArgs {
    /// Spool of sync uploads, v1 and v2 (jobs' files until they end). Several nodes sharing a store must share it (a network volume). Unset: `voicegate-spool` in the system temp directory.
    #[arg(
        id = "sync_spool_dir",
        long = "sync-spool-dir",
        env = "VOICEGATE_SYNC_SPOOL_DIR"
    )]
    pub spool_dir: Option<PathBuf>,

    /// Sync v2 jobs this node runs at once (each decodes one file at a time on the shared decode pool).
    #[arg(id = "sync_workers", long = "sync-workers", env = "VOICEGATE_SYNC_WORKERS", default_value_t = defaults::SYNC_WORKERS)]
    pub workers: usize,

    /// Of those, the most running jobs with backdated files (the backfill lane) at once, so backfill never delays fresh uploads.
    #[arg(id = "sync_backfill_workers", long = "sync-backfill-workers", env = "VOICEGATE_SYNC_BACKFILL_WORKERS", default_value_t = defaults::SYNC_BACKFILL_WORKERS)]
    pub backfill_workers: usize,

    /// Backfill-lane jobs of one user running at once, on all nodes (a lease).
    #[arg(id = "sync_backfill_jobs_per_user", long = "sync-backfill-jobs-per-user", env = "VOICEGATE_SYNC_BACKFILL_JOBS_PER_USER", default_value_t = defaults::SYNC_BACKFILL_JOBS_PER_USER)]
    pub backfill_jobs_per_user: usize,

    /// Unfinished sync jobs per user (v1 and v2) (429 `too_many_sync_jobs` above it).
    #[arg(id = "sync_jobs_per_user", long = "sync-jobs-per-user", env = "VOICEGATE_SYNC_JOBS_PER_USER", default_value_t = defaults::SYNC_JOBS_PER_USER)]
    pub jobs_per_user: usize,

    /// Sync v2 jobs queued on all nodes at most (503 `sync_queue_full` above it).
    #[arg(id = "sync_queue_max", long = "sync-queue-max", env = "VOICEGATE_SYNC_QUEUE_MAX", default_value_t = defaults::SYNC_QUEUE_MAX)]
    pub queue_max: usize,

    /// Bytes of one user's unfinished sync jobs' files (v1 and v2), on all nodes (429 `sync_spool_user_quota` above it). At least VOICEGATE_UPLOAD_MAX_REQUEST_BYTES.
    #[arg(id = "sync_spool_bytes_per_user", long = "sync-spool-bytes-per-user", env = "VOICEGATE_SYNC_SPOOL_BYTES_PER_USER", default_value_t = defaults::SYNC_SPOOL_BYTES_PER_USER)]
    pub spool_bytes_per_user: u64,

    /// Bytes in the spool at most, uploads being read included (507 `sync_spool_full` above it, before the body is read). At least VOICEGATE_UPLOAD_MAX_REQUEST_BYTES.
    #[arg(id = "sync_spool_max_bytes", long = "sync-spool-max-bytes", env = "VOICEGATE_SYNC_SPOOL_MAX_BYTES", default_value_t = defaults::SYNC_SPOOL_MAX_BYTES)]
    pub spool_max_bytes: u64,

    /// Free space kept on the spool's file system: an upload that would leave less is refused (507 `sync_spool_full`, before the body is read). 0 turns the check off.
    #[arg(id = "sync_spool_min_free_bytes", long = "sync-spool-min-free-bytes", env = "VOICEGATE_SYNC_SPOOL_MIN_FREE_BYTES", default_value_t = defaults::SYNC_SPOOL_MIN_FREE_BYTES)]
    pub spool_min_free_bytes: u64,

    /// How long a sync v2 job's record is kept after its last change (its status then answers 404).
    #[arg(id = "sync_job_retention_secs", long = "sync-job-retention-secs", env = "VOICEGATE_SYNC_JOB_RETENTION_SECS", default_value_t = defaults::SYNC_JOB_RETENTION_SECS)]
    pub retention_secs: u64,

    /// How long a v1 upload (`POST /v1/sync-local-files`, run as a job on the request's node) waits for its speech to be metered and in conversations; past it the answer is 202 with the job to follow on v2.
    #[arg(id = "sync_v1_wait_secs", long = "sync-v1-wait-secs", env = "VOICEGATE_SYNC_V1_WAIT_SECS", default_value_t = defaults::SYNC_V1_WAIT_SECS)]
    pub v1_wait_secs: u64,

    /// Then how long a v1 upload waits for its spans' transcription; past it the answer says `transcript_status: pending` and the job finishes the transcription (its `job_id` is in the answer).
    #[arg(id = "sync_v1_transcript_wait_secs", long = "sync-v1-transcript-wait-secs", env = "VOICEGATE_SYNC_V1_TRANSCRIPT_WAIT_SECS", default_value_t = defaults::SYNC_V1_TRANSCRIPT_WAIT_SECS)]
    pub v1_transcript_wait_secs: u64,

    /// A sync job run transcribes its spans for at most this long: spans not started by then are stored `pending` (a re-upload transcribes them). Nobody waits on it; it bounds a run against a stalled provider.
    #[arg(id = "sync_stt_wait_secs", long = "sync-stt-wait-secs", env = "VOICEGATE_SYNC_STT_WAIT_SECS", default_value_t = defaults::SYNC_STT_WAIT_SECS)]
    pub stt_wait_secs: u64,
}

impl Default for SyncJobArgs {
    fn default() -> Self {
        SyncJobArgs {
            spool_dir: None,
            workers: defaults::SYNC_WORKERS,
            backfill_workers: defaults::SYNC_BACKFILL_WORKERS,
            backfill_jobs_per_user: defaults::SYNC_BACKFILL_JOBS_PER_USER,
            jobs_per_user: defaults::SYNC_JOBS_PER_USER,
            queue_max: defaults::SYNC_QUEUE_MAX,
            spool_bytes_per_user: defaults::SYNC_SPOOL_BYTES_PER_USER,
            spool_max_bytes: defaults::SYNC_SPOOL_MAX_BYTES,
            spool_min_free_bytes: defaults::SYNC_SPOOL_MIN_FREE_BYTES,
            retention_secs: defaults::SYNC_JOB_RETENTION_SECS,
            v1_wait_secs: defaults::SYNC_V1_WAIT_SECS,
            v1_transcript_wait_secs: defaults::SYNC_V1_TRANSCRIPT_WAIT_SECS,
            stt_wait_secs: defaults::SYNC_STT_WAIT_SECS,
        }
    }
}

impl SyncJobArgs {
    /// The spool's byte bounds, by name: each must hold at least one request of the upload limit.
    pub fn spool_bounds(&self) -> [(&'static str, u64); 2] {
        [
            (
                "VOICEGATE_SYNC_SPOOL_BYTES_PER_USER",
                self.spool_bytes_per_user,
            ),
            ("VOICEGATE_SYNC_SPOOL_MAX_BYTES", self.spool_max_bytes),
        ]
    }

    /// The settings that must not be 0, by name (checked with the server's other limits).
    pub fn limits(&self) -> [(&'static str, u64); 10] {
        [
            ("VOICEGATE_SYNC_WORKERS", self.workers as u64),
            (
                "VOICEGATE_SYNC_BACKFILL_WORKERS",
                self.backfill_workers as u64,
            ),
            (
                "VOICEGATE_SYNC_BACKFILL_JOBS_PER_USER",
                self.backfill_jobs_per_user as u64,
            ),
            ("VOICEGATE_SYNC_JOBS_PER_USER", self.jobs_per_user as u64),
            ("VOICEGATE_SYNC_QUEUE_MAX", self.queue_max as u64),
            (
                "VOICEGATE_SYNC_SPOOL_BYTES_PER_USER",
                self.spool_bytes_per_user,
            ),
            ("VOICEGATE_SYNC_SPOOL_MAX_BYTES", self.spool_max_bytes),
            ("VOICEGATE_SYNC_JOB_RETENTION_SECS", self.retention_secs),
            ("VOICEGATE_SYNC_V1_WAIT_SECS", self.v1_wait_secs),
            ("VOICEGATE_SYNC_STT_WAIT_SECS", self.stt_wait_secs),
        ]
    }
}

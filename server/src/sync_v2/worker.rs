//! The sync v2 job worker pool of one node.
//!
//! - A dispatcher task wakes on every new job (this node's) and once a second (other nodes' jobs, jobs
//!   whose deferral ended, jobs a dead node held), reads the jobs due from the store's queue and starts
//!   up to `VOICEGATE_SYNC_WORKERS` at once.
//! - **Fair across users**: among the jobs due, those of users with the fewest jobs running on this node go
//!   first (then the oldest), so one user's 500 files never starve another's 2.
//! - **Lanes** (DESIGN §3): a job holding backdated files runs in the backfill lane: at most
//!   `VOICEGATE_SYNC_BACKFILL_WORKERS` of the node's workers, and per user at most
//!   `VOICEGATE_SYNC_BACKFILL_JOBS_PER_USER` jobs on all nodes (a lease), so backfill never delays fresh
//!   uploads.
//! - **Ownership**: a job runs only under its lease (`sync_job`, limit 1, [`crate::engine::Engine::leases`];
//!   the heartbeat refreshes it). A node that dies stops refreshing; within `VOICEGATE_LEASE_TTL_SECS` another
//!   node (or this one restarted) takes the job from the queue and **resumes** it: files already settled are
//!   skipped, a file cut off mid-way is settled again (its metering is keyed by its content hash, its spans
//!   are deduplicated by the conversations, a span already transcribed is not sent again).
//! - **Drain**: the node stops taking jobs and aborts the ones running, which gives their leases back at
//!   once; another node (or this one after its restart) resumes them.
//! - **Watched**: every [`WATCH_EVERY`] the pool publishes how long the oldest job waiting in each lane has
//!   been due (`voicegate_sync_oldest_queued_job_age_seconds`; a deferred job is not waiting until its time,
//!   a running one, here or on another node, not at all), and every [`super::room::MEASURE_EVERY`] it
//!   measures the spool's bytes.
//! - A server-side failure (store, conversations) puts the job back in the queue with the house backoff; after
//!   8 runs the job fails `sync_unavailable`, `retryable: true`. A job whose spooled files are
//!   gone fails `sync_job_files_lost`, `retryable: true` (upload again).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use voicegate_engine::lease::{Acquired, LeaseGuard};
use voicegate_engine::store::StoreError;
use voicegate_engine::store::lease::LeaseKey;
use voicegate_engine::store::sync_jobs::{DueJob, OldestDue, QueuedJob, SyncJobStore};
use voicegate_engine::stt::SttProvider;
use voicegate_engine::telemetry::{
    SYNC_JOBS_QUEUED, SYNC_JOBS_RUNNING, SYNC_OLDEST_QUEUED_JOB_AGE_SECONDS,
};

use super::job::{JobContext, Progress, lane_label};
use super::room::SpoolRoom;
use crate::engine::Engine;

/// How often the dispatcher looks at the queue without being woken.
const POLL: Duration = Duration::from_secs(1);
/// Queue entries read per dispatch round.
const DUE_BATCH: usize = 256;
/// How often the age of the oldest waiting job is read.
pub const WATCH_EVERY: Duration = Duration::from_secs(5);
/// Rounds of looking past jobs running on other nodes (one job per lane a round) when finding the oldest
/// waiting one; past them, the age reported may be a running job's (the alert errs on the loud side).
const MAX_RUNNING_SKIPPED: usize = 64;
/// Lease kinds (metric labels; `docs/operations.md` limits table).
pub const JOB_LEASE: &str = "sync_job";
pub const BACKFILL_LEASE: &str = "sync_backfill_job";

/// The pool's settings.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    pub workers: usize,
    /// `VOICEGATE_SYNC_STT_WAIT_SECS`: a run's transcription bound.
    pub stt_wait: Duration,
    pub backfill_workers: usize,
    pub backfill_jobs_per_user: u32,
    pub retention_ms: u64,
    pub spool: PathBuf,
    pub room: Arc<SpoolRoom>,
}

/// The node's worker pool. Cheap to clone.
#[derive(Clone)]
pub struct Workers {
    inner: Arc<Inner>,
}

struct Inner {
    ctx: JobContext,
    cfg: WorkerConfig,
    wake: Notify,
    stopping: AtomicBool,
    running: Mutex<HashMap<QueuedJob, tokio::task::AbortHandle>>,
    /// v1 jobs run by their requests ([`Workers::run_inline`]), outside the pool's count.
    inline: Mutex<HashMap<QueuedJob, tokio::task::AbortHandle>>,
}

impl Workers {
    /// Starts the dispatcher on the current runtime.
    pub fn start(
        engine: Engine,
        store: Arc<dyn SyncJobStore>,
        stt: Option<Arc<dyn SttProvider>>,
        cfg: WorkerConfig,
    ) -> Workers {
        let workers = Workers {
            inner: Arc::new(Inner {
                ctx: JobContext {
                    engine,
                    store,
                    stt,
                    retention_ms: cfg.retention_ms,
                    spool: cfg.spool.clone(),
                    stt_wait: cfg.stt_wait,
                },
                cfg,
                wake: Notify::new(),
                stopping: AtomicBool::new(false),
                running: Mutex::new(HashMap::new()),
                inline: Mutex::new(HashMap::new()),
            }),
        };
        let w = workers.clone();
        tokio::spawn(async move {
            let start = tokio::time::Instant::now();
            let (mut next_sweep, mut next_watch, mut next_measure) = (start, start, start);
            while !w.inner.stopping.load(Ordering::Acquire) {
                let now = tokio::time::Instant::now();
                if now >= next_sweep {
                    next_sweep += super::spool::SWEEP_EVERY;
                    let ctx = &w.inner.ctx;
                    super::spool::sweep(&ctx.spool, ctx.store.as_ref(), super::spool::MIN_AGE)
                        .await;
                }
                if now >= next_measure {
                    next_measure = now + super::room::MEASURE_EVERY;
                    w.inner.cfg.room.measure().await;
                }
                if now >= next_watch {
                    next_watch = now + WATCH_EVERY;
                    w.watch().await;
                }
                w.dispatch().await;
                tokio::select! {
                    () = w.inner.wake.notified() => {}
                    () = tokio::time::sleep(POLL) => {}
                }
            }
        });
        workers
    }

    /// A job was queued (or a worker freed): look at the queue now.
    pub fn wake(&self) {
        self.inner.wake.notify_one();
    }

    /// Jobs running on this node.
    pub fn running(&self) -> usize {
        self.running_jobs().len()
    }

    /// Drain: take no more jobs and abort the running ones; their leases go back at once and the jobs stay
    /// queued, so another node (or this one restarted) resumes them.
    pub fn stop(&self) {
        self.inner.stopping.store(true, Ordering::Release);
        self.inner.wake.notify_one();
        let mut running: Vec<_> = self
            .inner
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain()
            .collect();
        running.extend(
            self.inner
                .inline
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .drain(),
        );
        for (job, handle) in running {
            tracing::info!(message = "Sync job handed back at drain.", uid = %job.uid, job_id = %job.job_id);
            handle.abort();
        }
    }

    fn running_jobs(&self) -> Vec<QueuedJob> {
        self.inner
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .cloned()
            .collect()
    }

    /// Publishes the age of the oldest job waiting in each lane.
    async fn watch(&self) {
        let now = self.inner.ctx.engine.clock.now_ms();
        // A store error keeps the last ages (`voicegate_store_up` says why); the dispatcher logs it.
        if let Ok(oldest) = self.oldest_waiting(now).await {
            for (lane, due) in [
                ("sync_fresh", &oldest.fresh),
                ("sync_backfill", &oldest.backfill),
            ] {
                metrics::gauge!(SYNC_OLDEST_QUEUED_JOB_AGE_SECONDS, "lane" => lane)
                    .set(age_seconds(now, due.as_ref()));
            }
        }
    }

    /// The oldest due job of each lane that is not running: the store's oldest due, skipping the jobs running
    /// here and those whose lease another node holds.
    async fn oldest_waiting(&self, now_ms: u64) -> Result<OldestDue, StoreError> {
        let store = &self.inner.ctx.store;
        let leases = &self.inner.ctx.engine.leases;
        let mut skip = self.running_jobs();
        let mut skipped = 0;
        loop {
            let oldest = store.oldest_due(now_ms, &skip).await?;
            let mut running_elsewhere = Vec::new();
            for due in [&oldest.fresh, &oldest.backfill].into_iter().flatten() {
                let key = LeaseKey::job(JOB_LEASE, &due.job.uid, &due.job.job_id);
                if leases.holders(&key).await.is_ok_and(|h| !h.is_empty()) {
                    running_elsewhere.push(due.job.clone());
                }
            }
            if running_elsewhere.is_empty() || skipped >= MAX_RUNNING_SKIPPED {
                return Ok(oldest);
            }
            skipped += 1;
            skip.extend(running_elsewhere);
        }
    }

    async fn dispatch(&self) {
        let cfg = &self.inner.cfg;
        // Read before the early return: the gauge must move while every worker is busy too.
        if let Ok(n) = self.inner.ctx.store.queued().await {
            metrics::gauge!(SYNC_JOBS_QUEUED).set(n as f64);
        }
        let running = self.running_jobs();
        if running.len() >= cfg.workers {
            return;
        }
        let now = self.inner.ctx.engine.clock.now_ms();
        let due = match self.inner.ctx.store.due(now, DUE_BATCH).await {
            Ok(due) => due,
            Err(error) => {
                tracing::warn!(message = "Reading the sync job queue failed.", %error);
                return;
            }
        };
        let mut per_user: HashMap<String, usize> = HashMap::new();
        for j in &running {
            *per_user.entry(j.uid.clone()).or_default() += 1;
        }
        let mut backfill_running = running.iter().filter(|j| j.backfill).count();
        let mut busy = running.len();
        let mut tried = HashSet::new();
        while busy < cfg.workers {
            // Fewest jobs of the same user running here first, then the queue's order (oldest due first).
            let next = due
                .iter()
                .filter(|j| !tried.contains(*j) && !running.contains(j))
                .filter(|j| !j.backfill || backfill_running < cfg.backfill_workers)
                .min_by_key(|j| per_user.get(&j.uid).copied().unwrap_or(0));
            let Some(job) = next.cloned() else { break };
            tried.insert(job.clone());
            let Some(leases) = self.take(&job).await else {
                continue;
            };
            *per_user.entry(job.uid.clone()).or_default() += 1;
            busy += 1;
            if job.backfill {
                backfill_running += 1;
            }
            self.spawn(job, leases);
        }
    }

    /// The job's lease (and, for backfill, one of the user's backfill slots), or `None` when another node
    /// runs it, the user's backfill slots are taken, or the store does not answer (a job never runs without
    /// its lease).
    async fn take(&self, job: &QueuedJob) -> Option<Vec<LeaseGuard>> {
        let leases = &self.inner.ctx.engine.leases;
        let own = match leases
            .acquire(LeaseKey::job(JOB_LEASE, &job.uid, &job.job_id), 1)
            .await
        {
            Acquired::Granted(g) => g,
            Acquired::Refused { .. } | Acquired::Unavailable { .. } => return None,
        };
        let mut held = vec![own];
        if job.backfill {
            match leases
                .acquire(
                    LeaseKey::user(BACKFILL_LEASE, &job.uid),
                    self.inner.cfg.backfill_jobs_per_user,
                )
                .await
            {
                Acquired::Granted(g) => held.push(g),
                Acquired::Refused { .. } | Acquired::Unavailable { .. } => return None,
            }
        }
        Some(held)
    }

    fn spawn(&self, job: QueuedJob, leases: Vec<LeaseGuard>) {
        let w = self.clone();
        let key = job.clone();
        let mut running = self
            .inner
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let lane = lane_label(&job);
        metrics::gauge!(SYNC_JOBS_RUNNING, "lane" => lane).increment(1.0);
        let task = tokio::spawn(async move {
            let _leases = leases; // held while the job runs; dropped (given back) when it ends or is aborted
            let _running = RunningGauge(lane);
            let uid = job.uid.clone();
            let job_id = job.job_id.clone();
            if let Err(error) = super::job::run(&w.inner.ctx, &job, &None).await {
                tracing::warn!(message = "A sync job run failed; it stays queued.", uid, job_id, %error);
            }
            w.inner
                .running
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&job);
            w.wake();
        });
        running.insert(key, task.abort_handle());
    }
}

impl Workers {
    /// Runs a v1 upload's job now, on this node, under `lease` (taken before the job was queued), outside
    /// the pool's workers (v1 uploads are bounded by the upload limits, whose slot `hold` is), aborted by a drain like the pool's (the request then answers 202: the job
    /// is resumed elsewhere). The receiver follows the run; the job goes on if it is dropped (the
    /// client left), and if this process dies the job is resumed from the queue like any other.
    pub fn run_inline(
        &self,
        job: QueuedJob,
        lease: LeaseGuard,
        hold: impl Send + 'static,
    ) -> watch::Receiver<Progress> {
        let (tx, rx) = watch::channel(Progress::Running);
        let w = self.clone();
        let lane = lane_label(&job);
        metrics::gauge!(SYNC_JOBS_RUNNING, "lane" => lane).increment(1.0);
        let mut inline = self
            .inner
            .inline
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let key = job.clone();
        let task = tokio::spawn(async move {
            // The upload's slot (`VOICEGATE_SYNC_MAX_UPLOADS`, per user) and the lease are held until the job's
            // run ends, also when it outlives the request (a pending transcription, a 202).
            let _held = (lease, hold);
            let _running = RunningGauge(lane);
            if let Err(error) = super::job::run(&w.inner.ctx, &job, &Some(tx)).await {
                tracing::warn!(message = "A v1 sync job run failed; it stays queued.", uid = %job.uid, job_id = %job.job_id, %error);
            }
            w.inner
                .inline
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&job);
        });
        inline.insert(key, task.abort_handle());
        rx
    }
}

/// Whole seconds since `due` became due (0 when nothing waits), rounded to the nearest.
fn age_seconds(now_ms: u64, due: Option<&DueJob>) -> f64 {
    let ms = due.map_or(0, |d| now_ms.saturating_sub(d.due_ms));
    (ms.saturating_add(500) / 1000) as f64
}

/// Counts a job in `voicegate_sync_jobs_running` until dropped (also when the task is aborted).
struct RunningGauge(&'static str);

impl Drop for RunningGauge {
    fn drop(&mut self) {
        metrics::gauge!(SYNC_JOBS_RUNNING, "lane" => self.0).decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_waiting_job_s_age_counts_from_its_due_time_and_nothing_waiting_is_zero() {
        let due = |due_ms| DueJob {
            job: QueuedJob {
                uid: "u".into(),
                job_id: "j".into(),
                backfill: false,
            },
            due_ms,
        };
        assert_eq!(age_seconds(10_000, None), 0.0);
        assert_eq!(age_seconds(610_000, Some(&due(10_000))), 600.0);
        assert_eq!(age_seconds(10_499, Some(&due(10_000))), 0.0);
        assert_eq!(age_seconds(10_500, Some(&due(10_000))), 1.0);
        // A clock behind the due time (another node's) is not a negative age.
        assert_eq!(age_seconds(5_000, Some(&due(10_000))), 0.0);
    }
}

//! Sync v2 jobs in the store (`POST /v2/sync-local-files`): each job's record (opaque JSON, the server's
//! model), each user's open jobs and their spooled bytes (the per-user quotas, counted across nodes), and
//! one queue of jobs due to run that every node's worker pool reads. The Redis implementation is
//! [`super::sync_jobs_redis`].
//!
//! Redis keys ([`super::keys`]):
//! - `vg:{uid}:syncjob:<job id>` STRING: the record; expires `retention` after its last write.
//! - `vg:{uid}:syncjobs:open` ZSET: member = job id, score = created ms; the user's unfinished jobs (an entry
//!   older than the retention is an orphan and is dropped by the next create).
//! - `vg:{uid}:syncjobs:bytes` HASH: job id → bytes of its spooled files, one field per open entry, added
//!   and removed with it (so the bytes are released exactly when the open-job count is).
//! - `vg:syncjobs:queue` ZSET: member = `<lane>\t<uid>\t<job id>`, score = when the job is due (ms). Not a
//!   user's key: one slot on a cluster, read by every node (a few commands per job, never per audio frame).
//!
//! A job is created (record + open entry, atomically, quota-checked) and then queued. A node that dies
//! between the two leaves a record that stays `queued` until it expires: the client's poll says so and a
//! re-upload meters nothing twice.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, PoisonError};

use futures_util::future::BoxFuture;

use super::StoreError;

/// A job in the run queue.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueuedJob {
    pub uid: String,
    pub job_id: String,
    /// The job holds backdated files (the backfill lane's share of the workers and per-user limit apply).
    pub backfill: bool,
}

impl QueuedJob {
    /// The queue's member (`<lane>\t<uid>\t<job id>`, lane `f` or `b`).
    pub fn member(&self) -> String {
        let lane = if self.backfill { "b" } else { "f" };
        format!("{lane}\t{}\t{}", self.uid, self.job_id)
    }

    /// The job of a queue member, `None` when it is not one.
    pub fn parse(member: &str) -> Option<QueuedJob> {
        let mut parts = member.splitn(3, '\t');
        let backfill = match parts.next()? {
            "b" => true,
            "f" => false,
            _ => return None,
        };
        Some(QueuedJob {
            uid: parts.next()?.to_owned(),
            job_id: parts.next()?.to_owned(),
            backfill,
        })
    }
}

/// What a create did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Created {
    Created,
    /// The user already has `open` unfinished jobs (the quota).
    UserQuotaFull {
        open: u64,
    },
    /// The user's unfinished jobs already hold `bytes` of spooled files: this job's would pass the quota.
    UserBytesFull {
        bytes: u64,
    },
}

/// Limits of one create.
#[derive(Clone, Copy, Debug)]
pub struct CreateLimits {
    /// Unfinished jobs per user at most.
    pub max_open_per_user: u64,
    /// Bytes of spooled files of one user's unfinished jobs at most (this job's included).
    pub max_bytes_per_user: u64,
    /// How long a record lives after its last write (also the age past which an open entry is an orphan).
    pub retention_ms: u64,
}

/// A queued job and when it is due.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DueJob {
    pub job: QueuedJob,
    pub due_ms: u64,
}

/// The oldest job due in each lane (`None`: no job of that lane is due).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OldestDue {
    pub fresh: Option<DueJob>,
    pub backfill: Option<DueJob>,
}

impl OldestDue {
    fn note(&mut self, job: &QueuedJob, due_ms: u64) {
        let slot = if job.backfill {
            &mut self.backfill
        } else {
            &mut self.fresh
        };
        if slot
            .as_ref()
            .is_none_or(|d| (due_ms, job) < (d.due_ms, &d.job))
        {
            *slot = Some(DueJob {
                job: job.clone(),
                due_ms,
            });
        }
    }
}

/// Sync jobs in the store. Records are opaque JSON.
pub trait SyncJobStore: Send + Sync + 'static {
    /// Writes a new job's record and adds it, with its `bytes` of spooled files, to the user's open jobs,
    /// when the user stays within both quotas (jobs, then bytes), atomically.
    fn create<'a>(
        &'a self,
        uid: &'a str,
        job_id: &'a str,
        record: &'a str,
        bytes: u64,
        now_ms: u64,
        limits: CreateLimits,
    ) -> BoxFuture<'a, Result<Created, StoreError>>;
    /// The record, or `None` when unknown or expired.
    fn get<'a>(
        &'a self,
        uid: &'a str,
        job_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<String>, StoreError>>;
    /// Overwrites the record (its expiry restarts).
    fn save<'a>(
        &'a self,
        uid: &'a str,
        job_id: &'a str,
        record: &'a str,
        retention_ms: u64,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
    /// Puts the job in the run queue, due at `due_ms` (moves it when it is there).
    fn schedule<'a>(
        &'a self,
        job: &'a QueuedJob,
        due_ms: u64,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
    /// Writes the final record, closes the job (no longer open for the quotas: its bytes are released) and
    /// takes it off the queue.
    fn finish<'a>(
        &'a self,
        job: &'a QueuedJob,
        record: &'a str,
        retention_ms: u64,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
    /// Takes the job off the queue (its record is unknown, expired or already final).
    fn unqueue<'a>(&'a self, job: &'a QueuedJob) -> BoxFuture<'a, Result<(), StoreError>>;
    /// Up to `limit` queued jobs due by `now_ms`, earliest first.
    fn due<'a>(
        &'a self,
        now_ms: u64,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<QueuedJob>, StoreError>>;
    /// Jobs in the queue (due or not).
    fn queued(&self) -> BoxFuture<'_, Result<u64, StoreError>>;
    /// The oldest job due by `now_ms` in each lane, `skip` left out (a job deferred past `now_ms` is not
    /// waiting; the caller skips the ones it knows are running).
    fn oldest_due<'a>(
        &'a self,
        now_ms: u64,
        skip: &'a [QueuedJob],
    ) -> BoxFuture<'a, Result<OldestDue, StoreError>>;
}

/// The jobs in process memory (the embedded single-node store: lost on restart, as its meter is).
#[derive(Default)]
pub struct MemorySyncJobStore {
    inner: Mutex<MemoryJobs>,
}

#[derive(Default)]
struct MemoryJobs {
    /// (uid, job id) → (record, expires at ms).
    records: HashMap<(String, String), (String, u64)>,
    /// uid → job id → (created ms, spooled bytes).
    open: HashMap<String, BTreeMap<String, (u64, u64)>>,
    /// job → due ms.
    queue: HashMap<QueuedJob, u64>,
}

impl MemorySyncJobStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn jobs(&self) -> std::sync::MutexGuard<'_, MemoryJobs> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Memory records have no clock of their own: expiry is judged against the time of the last write (a record
/// is kept at least `retention` after it), and expired ones are dropped on the next create.
impl SyncJobStore for MemorySyncJobStore {
    fn create<'a>(
        &'a self,
        uid: &'a str,
        job_id: &'a str,
        record: &'a str,
        bytes: u64,
        now_ms: u64,
        limits: CreateLimits,
    ) -> BoxFuture<'a, Result<Created, StoreError>> {
        let mut jobs = self.jobs();
        jobs.records.retain(|_, (_, expires)| *expires > now_ms);
        let open = jobs.open.entry(uid.to_owned()).or_default();
        open.retain(|_, (created, _)| now_ms.saturating_sub(*created) < limits.retention_ms);
        let n = open.len() as u64;
        let held: u64 = open.values().map(|(_, b)| *b).sum();
        let outcome = if n >= limits.max_open_per_user {
            Created::UserQuotaFull { open: n }
        } else if held.saturating_add(bytes) > limits.max_bytes_per_user {
            Created::UserBytesFull { bytes: held }
        } else {
            open.insert(job_id.to_owned(), (now_ms, bytes));
            jobs.records.insert(
                (uid.to_owned(), job_id.to_owned()),
                (
                    record.to_owned(),
                    now_ms.saturating_add(limits.retention_ms),
                ),
            );
            Created::Created
        };
        Box::pin(async move { Ok(outcome) })
    }

    fn get<'a>(
        &'a self,
        uid: &'a str,
        job_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<String>, StoreError>> {
        let found = self
            .jobs()
            .records
            .get(&(uid.to_owned(), job_id.to_owned()))
            .map(|(r, _)| r.clone());
        Box::pin(async move { Ok(found) })
    }

    fn save<'a>(
        &'a self,
        uid: &'a str,
        job_id: &'a str,
        record: &'a str,
        _retention_ms: u64,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        if let Some(slot) = self
            .jobs()
            .records
            .get_mut(&(uid.to_owned(), job_id.to_owned()))
        {
            slot.0 = record.to_owned();
        }
        Box::pin(async { Ok(()) })
    }

    fn schedule<'a>(
        &'a self,
        job: &'a QueuedJob,
        due_ms: u64,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        self.jobs().queue.insert(job.clone(), due_ms);
        Box::pin(async { Ok(()) })
    }

    fn finish<'a>(
        &'a self,
        job: &'a QueuedJob,
        record: &'a str,
        _retention_ms: u64,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let mut jobs = self.jobs();
        jobs.queue.remove(job);
        if let Some(open) = jobs.open.get_mut(&job.uid) {
            open.remove(&job.job_id);
        }
        if let Some(slot) = jobs.records.get_mut(&(job.uid.clone(), job.job_id.clone())) {
            slot.0 = record.to_owned();
        }
        Box::pin(async { Ok(()) })
    }

    fn unqueue<'a>(&'a self, job: &'a QueuedJob) -> BoxFuture<'a, Result<(), StoreError>> {
        self.jobs().queue.remove(job);
        Box::pin(async { Ok(()) })
    }

    fn due<'a>(
        &'a self,
        now_ms: u64,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<QueuedJob>, StoreError>> {
        let mut due: Vec<(u64, QueuedJob)> = self
            .jobs()
            .queue
            .iter()
            .filter(|(_, d)| **d <= now_ms)
            .map(|(j, d)| (*d, j.clone()))
            .collect();
        due.sort();
        due.truncate(limit);
        Box::pin(async move { Ok(due.into_iter().map(|(_, j)| j).collect()) })
    }

    fn queued(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        let n = self.jobs().queue.len() as u64;
        Box::pin(async move { Ok(n) })
    }

    fn oldest_due<'a>(
        &'a self,
        now_ms: u64,
        skip: &'a [QueuedJob],
    ) -> BoxFuture<'a, Result<OldestDue, StoreError>> {
        let mut oldest = OldestDue::default();
        for (job, due) in self.jobs().queue.iter() {
            if *due <= now_ms && !skip.contains(job) {
                oldest.note(job, *due);
            }
        }
        Box::pin(async move { Ok(oldest) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(uid: &str, id: &str, backfill: bool) -> QueuedJob {
        QueuedJob {
            uid: uid.into(),
            job_id: id.into(),
            backfill,
        }
    }

    #[test]
    fn queue_members_round_trip() {
        let j = job("user\twith tab", "id", true);
        // A tab in a uid would split differently: the uid is everything between the first two tabs.
        assert_ne!(QueuedJob::parse(&j.member()), Some(j));
        let j = job("u1", "j-1", false);
        assert_eq!(QueuedJob::parse(&j.member()), Some(j));
        assert_eq!(QueuedJob::parse("x\tu\tj"), None);
    }
}

//! Sync v2 jobs in the store (`POST /v2/sync-local-files`): each job's record (opaque JSON, the server's
//! model), each user's open jobs (the per-user quota), and one queue of jobs due to run that every node's
//! worker pool reads.
//!
//! Redis keys ([`keys`]):
//! - `vg:{uid}:syncjob:<job id>` STRING: the record; expires `retention` after its last write.
//! - `vg:{uid}:syncjobs:open` ZSET: member = job id, score = created ms; the user's unfinished jobs (an entry
//!   older than the retention is an orphan and is dropped by the next create).
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
use super::connection::RedisConnection;
use super::keys;
use super::redis_store::store_error;

/// A job in the run queue.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueuedJob {
    pub uid: String,
    pub job_id: String,
    /// The job holds backdated files (the backfill lane's share of the workers and per-user limit apply).
    pub backfill: bool,
}

impl QueuedJob {
    fn member(&self) -> String {
        let lane = if self.backfill { "b" } else { "f" };
        format!("{lane}\t{}\t{}", self.uid, self.job_id)
    }

    fn parse(member: &str) -> Option<QueuedJob> {
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
}

/// Limits of one create.
#[derive(Clone, Copy, Debug)]
pub struct CreateLimits {
    /// Unfinished jobs per user at most.
    pub max_open_per_user: u64,
    /// How long a record lives after its last write (also the age past which an open entry is an orphan).
    pub retention_ms: u64,
}

/// Sync jobs in the store. Records are opaque JSON.
pub trait SyncJobStore: Send + Sync + 'static {
    /// Writes a new job's record and adds it to the user's open jobs, when the user has fewer than the quota.
    fn create<'a>(
        &'a self,
        uid: &'a str,
        job_id: &'a str,
        record: &'a str,
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
    /// Writes the final record, closes the job (no longer open for the quota) and takes it off the queue.
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
    /// uid → job id → created ms.
    open: HashMap<String, BTreeMap<String, u64>>,
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
        now_ms: u64,
        limits: CreateLimits,
    ) -> BoxFuture<'a, Result<Created, StoreError>> {
        let mut jobs = self.jobs();
        jobs.records.retain(|_, (_, expires)| *expires > now_ms);
        let open = jobs.open.entry(uid.to_owned()).or_default();
        open.retain(|_, created| now_ms.saturating_sub(*created) < limits.retention_ms);
        let n = open.len() as u64;
        let outcome = if n >= limits.max_open_per_user {
            Created::UserQuotaFull { open: n }
        } else {
            open.insert(job_id.to_owned(), now_ms);
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
}

/// KEYS: record, open set. ARGV: record, now ms, retention ms, max open. Returns {created 0/1, open}.
const CREATE_LUA: &str = r"
local now = tonumber(ARGV[2])
local retention = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - retention)
local open = redis.call('ZCARD', KEYS[2])
if open >= tonumber(ARGV[4]) then
  return {0, open}
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', retention)
redis.call('ZADD', KEYS[2], now, ARGV[5])
redis.call('PEXPIRE', KEYS[2], retention)
return {1, open + 1}
";

/// KEYS: record, open set. ARGV: record, retention ms, job id.
const FINISH_LUA: &str = r"
redis.call('SET', KEYS[1], ARGV[1], 'PX', tonumber(ARGV[2]))
redis.call('ZREM', KEYS[2], ARGV[3])
return 1
";

/// The jobs in Redis (single instance or Cluster).
#[derive(Clone)]
pub struct RedisSyncJobStore {
    conn: RedisConnection,
    create: redis::Script,
    finish: redis::Script,
}

impl RedisSyncJobStore {
    pub fn new(conn: impl Into<RedisConnection>) -> Self {
        RedisSyncJobStore {
            conn: conn.into(),
            create: redis::Script::new(CREATE_LUA),
            finish: redis::Script::new(FINISH_LUA),
        }
    }
}

impl SyncJobStore for RedisSyncJobStore {
    fn create<'a>(
        &'a self,
        uid: &'a str,
        job_id: &'a str,
        record: &'a str,
        now_ms: u64,
        limits: CreateLimits,
    ) -> BoxFuture<'a, Result<Created, StoreError>> {
        let mut conn = self.conn.clone();
        Box::pin(async move {
            let (created, open): (i64, i64) = self
                .create
                .key(keys::sync_job(uid, job_id))
                .key(keys::sync_jobs_open(uid))
                .arg(record)
                .arg(now_ms)
                .arg(limits.retention_ms.max(1))
                .arg(limits.max_open_per_user)
                .arg(job_id)
                .invoke_async(&mut conn)
                .await
                .map_err(store_error)?;
            Ok(if created == 1 {
                Created::Created
            } else {
                Created::UserQuotaFull {
                    open: u64::try_from(open).unwrap_or(0),
                }
            })
        })
    }

    fn get<'a>(
        &'a self,
        uid: &'a str,
        job_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<String>, StoreError>> {
        let mut conn = self.conn.clone();
        Box::pin(async move {
            redis::cmd("GET")
                .arg(keys::sync_job(uid, job_id))
                .query_async(&mut conn)
                .await
                .map_err(store_error)
        })
    }

    fn save<'a>(
        &'a self,
        uid: &'a str,
        job_id: &'a str,
        record: &'a str,
        retention_ms: u64,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let mut conn = self.conn.clone();
        Box::pin(async move {
            redis::cmd("SET")
                .arg(keys::sync_job(uid, job_id))
                .arg(record)
                .arg("PX")
                .arg(retention_ms.max(1))
                .query_async::<()>(&mut conn)
                .await
                .map_err(store_error)
        })
    }

    fn schedule<'a>(
        &'a self,
        job: &'a QueuedJob,
        due_ms: u64,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let mut conn = self.conn.clone();
        Box::pin(async move {
            redis::cmd("ZADD")
                .arg(keys::SYNC_JOB_QUEUE)
                .arg(due_ms)
                .arg(job.member())
                .query_async::<()>(&mut conn)
                .await
                .map_err(store_error)
        })
    }

    fn finish<'a>(
        &'a self,
        job: &'a QueuedJob,
        record: &'a str,
        retention_ms: u64,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let mut conn = self.conn.clone();
        Box::pin(async move {
            // The user's keys first (one slot), then the queue (another slot on a cluster): a crash between
            // leaves a finished job in the queue, which the next worker to pick it closes again.
            let _: i64 = self
                .finish
                .key(keys::sync_job(&job.uid, &job.job_id))
                .key(keys::sync_jobs_open(&job.uid))
                .arg(record)
                .arg(retention_ms.max(1))
                .arg(&job.job_id)
                .invoke_async(&mut conn)
                .await
                .map_err(store_error)?;
            self.unqueue(job).await
        })
    }

    fn unqueue<'a>(&'a self, job: &'a QueuedJob) -> BoxFuture<'a, Result<(), StoreError>> {
        let mut conn = self.conn.clone();
        Box::pin(async move {
            redis::cmd("ZREM")
                .arg(keys::SYNC_JOB_QUEUE)
                .arg(job.member())
                .query_async::<()>(&mut conn)
                .await
                .map_err(store_error)
        })
    }

    fn due<'a>(
        &'a self,
        now_ms: u64,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<QueuedJob>, StoreError>> {
        let mut conn = self.conn.clone();
        Box::pin(async move {
            let members: Vec<String> = redis::cmd("ZRANGEBYSCORE")
                .arg(keys::SYNC_JOB_QUEUE)
                .arg("-inf")
                .arg(now_ms)
                .arg("LIMIT")
                .arg(0)
                .arg(limit)
                .query_async(&mut conn)
                .await
                .map_err(store_error)?;
            Ok(members.iter().filter_map(|m| QueuedJob::parse(m)).collect())
        })
    }

    fn queued(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        let mut conn = self.conn.clone();
        Box::pin(async move {
            redis::cmd("ZCARD")
                .arg(keys::SYNC_JOB_QUEUE)
                .query_async(&mut conn)
                .await
                .map_err(store_error)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: CreateLimits = CreateLimits {
        max_open_per_user: 2,
        retention_ms: 1_000,
    };

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

    #[actix::test]
    async fn memory_store_quota_queue_and_finish() {
        let s = MemorySyncJobStore::new();
        assert_eq!(
            s.create("u", "a", "{}", 10, LIMITS).await.ok(),
            Some(Created::Created)
        );
        assert_eq!(
            s.create("u", "b", "{}", 20, LIMITS).await.ok(),
            Some(Created::Created)
        );
        assert_eq!(
            s.create("u", "c", "{}", 30, LIMITS).await.ok(),
            Some(Created::UserQuotaFull { open: 2 })
        );
        let a = job("u", "a", false);
        let b = job("u", "b", true);
        s.schedule(&b, 50).await.unwrap();
        s.schedule(&a, 40).await.unwrap();
        assert_eq!(s.due(45, 10).await.unwrap(), vec![a.clone()]);
        assert_eq!(s.due(50, 10).await.unwrap(), vec![a.clone(), b.clone()]);
        s.finish(&a, "{\"done\":1}", 1_000).await.unwrap();
        assert_eq!(s.due(50, 10).await.unwrap(), vec![b]);
        assert_eq!(
            s.get("u", "a").await.unwrap().as_deref(),
            Some("{\"done\":1}")
        );
        // The finished job no longer counts against the quota.
        assert_eq!(
            s.create("u", "c", "{}", 60, LIMITS).await.ok(),
            Some(Created::Created)
        );
        // Records expire after the retention; their open entries become orphans and are dropped.
        assert_eq!(
            s.create("u", "d", "{}", 2_000, LIMITS).await.ok(),
            Some(Created::Created)
        );
        assert_eq!(s.get("u", "a").await.unwrap(), None);
    }
}

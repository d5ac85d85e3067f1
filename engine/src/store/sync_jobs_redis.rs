//! The sync v2 job store in Redis ([`SyncJobStore`]; the keys and the model are
//! [`super::sync_jobs`]'s). A create and a finish are one Lua script each over the user's keys (one slot);
//! the queue is a key of its own, touched by separate commands.

use futures_util::future::BoxFuture;

use super::StoreError;
use super::connection::RedisConnection;
use super::keys;
use super::redis_store::store_error;
use super::sync_jobs::{CreateLimits, Created, DueJob, OldestDue, QueuedJob, SyncJobStore};

/// KEYS: record, open set, bytes hash. ARGV: record, now ms, retention ms, max open, job id, job bytes,
/// max bytes. Returns {outcome (1 created, 0 jobs quota, 2 bytes quota), open jobs, bytes held}.
///
/// Orphans (open entries older than the retention) go with their bytes. The bytes held are summed over the
/// open entries (at most the jobs quota of them), never trusted from a running total.
const CREATE_LUA: &str = r"
local now = tonumber(ARGV[2])
local retention = tonumber(ARGV[3])
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - retention)) do
  redis.call('ZREM', KEYS[2], id)
  redis.call('HDEL', KEYS[3], id)
end
local ids = redis.call('ZRANGE', KEYS[2], 0, -1)
local held = 0
for _, id in ipairs(ids) do
  held = held + (tonumber(redis.call('HGET', KEYS[3], id)) or 0)
end
if #ids >= tonumber(ARGV[4]) then
  return {0, #ids, held}
end
local bytes = tonumber(ARGV[6])
if held + bytes > tonumber(ARGV[7]) then
  return {2, #ids, held}
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', retention)
redis.call('ZADD', KEYS[2], now, ARGV[5])
redis.call('HSET', KEYS[3], ARGV[5], bytes)
redis.call('PEXPIRE', KEYS[2], retention)
redis.call('PEXPIRE', KEYS[3], retention)
return {1, #ids + 1, held + bytes}
";

/// KEYS: record, open set, bytes hash. ARGV: record, retention ms, job id.
const FINISH_LUA: &str = r"
redis.call('SET', KEYS[1], ARGV[1], 'PX', tonumber(ARGV[2]))
redis.call('ZREM', KEYS[2], ARGV[3])
redis.call('HDEL', KEYS[3], ARGV[3])
return 1
";

/// KEYS: the queue. ARGV: now ms, batch, members to skip…. Returns {fresh member, its due ms, backfill
/// member, its due ms} ('' and -1 for a lane with no job due). Reads the due part of the queue in score
/// order, a batch at a time, and stops as soon as both lanes are seen (at worst the due part once: at most
/// `VOICEGATE_SYNC_QUEUE_MAX` entries).
const OLDEST_DUE_LUA: &str = r"
local batch = tonumber(ARGV[2])
local skip = {}
for i = 3, #ARGV do
  skip[ARGV[i]] = true
end
local found = {f = false, b = false}
local out = {f = {'', -1}, b = {'', -1}}
local offset = 0
while not (found.f and found.b) do
  local page = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'WITHSCORES', 'LIMIT', offset, batch)
  for i = 1, #page, 2 do
    local lane = string.sub(page[i], 1, 1)
    if found[lane] == false and not skip[page[i]] then
      found[lane] = true
      out[lane] = {page[i], tonumber(page[i + 1])}
    end
  end
  if #page < 2 * batch then
    break
  end
  offset = offset + batch
end
return {out.f[1], out.f[2], out.b[1], out.b[2]}
";

/// Queue entries one step of [`OLDEST_DUE_LUA`] reads.
const OLDEST_DUE_BATCH: u64 = 500;

/// The jobs in Redis (single instance or Cluster).
#[derive(Clone)]
pub struct RedisSyncJobStore {
    conn: RedisConnection,
    create: redis::Script,
    finish: redis::Script,
    oldest_due: redis::Script,
}

impl RedisSyncJobStore {
    pub fn new(conn: impl Into<RedisConnection>) -> Self {
        RedisSyncJobStore {
            conn: conn.into(),
            create: redis::Script::new(CREATE_LUA),
            finish: redis::Script::new(FINISH_LUA),
            oldest_due: redis::Script::new(OLDEST_DUE_LUA),
        }
    }
}

impl SyncJobStore for RedisSyncJobStore {
    fn create<'a>(
        &'a self,
        uid: &'a str,
        job_id: &'a str,
        record: &'a str,
        bytes: u64,
        now_ms: u64,
        limits: CreateLimits,
    ) -> BoxFuture<'a, Result<Created, StoreError>> {
        let mut conn = self.conn.clone();
        Box::pin(async move {
            let (outcome, open, held): (i64, u64, u64) = self
                .create
                .key(keys::sync_job(uid, job_id))
                .key(keys::sync_jobs_open(uid))
                .key(keys::sync_jobs_bytes(uid))
                .arg(record)
                .arg(now_ms)
                .arg(limits.retention_ms.max(1))
                .arg(limits.max_open_per_user)
                .arg(job_id)
                .arg(bytes)
                .arg(limits.max_bytes_per_user)
                .invoke_async(&mut conn)
                .await
                .map_err(store_error)?;
            Ok(match outcome {
                1 => Created::Created,
                2 => Created::UserBytesFull { bytes: held },
                _ => Created::UserQuotaFull { open },
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
                .key(keys::sync_jobs_bytes(&job.uid))
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

    fn oldest_due<'a>(
        &'a self,
        now_ms: u64,
        skip: &'a [QueuedJob],
    ) -> BoxFuture<'a, Result<OldestDue, StoreError>> {
        let mut conn = self.conn.clone();
        Box::pin(async move {
            let mut call = self.oldest_due.key(keys::SYNC_JOB_QUEUE);
            call.arg(now_ms).arg(OLDEST_DUE_BATCH);
            for job in skip {
                call.arg(job.member());
            }
            let (fresh, fresh_ms, backfill, backfill_ms): (String, i64, String, i64) =
                call.invoke_async(&mut conn).await.map_err(store_error)?;
            let due = |member: &str, ms: i64| {
                Some(DueJob {
                    job: QueuedJob::parse(member)?,
                    due_ms: u64::try_from(ms).ok()?,
                })
            };
            Ok(OldestDue {
                fresh: due(&fresh, fresh_ms),
                backfill: due(&backfill, backfill_ms),
            })
        })
    }
}

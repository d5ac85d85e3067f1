//! Conversations in Redis.
//!
//! Keys (the `vg:{uid}:` prefix keeps a user's keys in one cluster slot):
//! - `vg:{uid}:conv:<day>` HASH `v` (version), `s` (JSON array of that day's conversations)
//! - `vg:{uid}:conv:days`  ZSET of the days that have a bucket (score = member = day)
//!
//! An upsert reads the buckets around its spans, merges in Rust ([`super::apply_upsert`]) and commits with one
//! Lua script that checks the version of **every bucket read** and writes the changed ones: a concurrent
//! writer on any node makes the commit fail and the upsert retry on fresh data, so nothing is duplicated or
//! lost. Writers of one user on one node also queue on a local lock, so conflicts only come from other nodes.

use std::collections::BTreeMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use redis::aio::ConnectionManager;
use redis::{RedisError, Script};
use tokio::sync::Mutex;

use super::logic::{apply_upsert, days_to_read, page, unlock_bucket};
use super::{
    Conversation, ConversationError, ConversationPage, ConversationStore, MAX_LIST_LIMIT, Upsert,
    UpsertOutcome, normalise_spans,
};
use crate::time::{Backoff, Clock, SystemClock};

/// Commit attempts before an upsert gives up with `conversation_store_busy`.
pub const MAX_ATTEMPTS: u32 = 16;
/// The pause between two commit attempts that lost a compare-and-set (jittered, so two writers that
/// collided do not collide again in step).
fn conflict_backoff() -> Backoff {
    Backoff::new(Duration::from_millis(2), Duration::from_millis(128))
}
const LOCAL_LOCKS: usize = 64;

pub fn bucket_key(uid: &str, day: u64) -> String {
    format!("vg:{{{uid}}}:conv:{day}")
}

pub fn days_key(uid: &str) -> String {
    format!("vg:{{{uid}}}:conv:days")
}

/// KEYS: n bucket keys, then the days key. ARGV: n, n expected versions, n new contents ('' = unchanged),
/// n days.
const COMMIT_LUA: &str = r"
local n = tonumber(ARGV[1])
for i = 1, n do
  local v = tonumber(redis.call('HGET', KEYS[i], 'v') or '0')
  if v ~= tonumber(ARGV[1 + i]) then return 0 end
end
for i = 1, n do
  local s = ARGV[1 + n + i]
  if s ~= '' then
    redis.call('HSET', KEYS[i], 'v', tonumber(ARGV[1 + i]) + 1, 's', s)
    redis.call('ZADD', KEYS[n + 1], ARGV[1 + 2 * n + i], ARGV[1 + 2 * n + i])
  end
end
return 1
";

fn store_error(e: RedisError) -> ConversationError {
    ConversationError::Unavailable(e.to_string())
}

fn corrupt(e: serde_json::Error) -> ConversationError {
    ConversationError::Corrupt(e.to_string())
}

/// The Redis conversation store. Cheap to clone.
#[derive(Clone)]
pub struct RedisConversationStore {
    conn: ConnectionManager,
    commit: Script,
    locks: Arc<[Mutex<()>]>,
    hasher: RandomState,
    clock: Arc<dyn Clock>,
}

struct Read {
    /// day → (version, conversations)
    buckets: BTreeMap<u64, (u64, Vec<Conversation>)>,
}

impl RedisConversationStore {
    pub fn new(conn: ConnectionManager) -> Self {
        Self::with_clock(conn, Arc::new(SystemClock))
    }

    pub fn with_clock(conn: ConnectionManager, clock: Arc<dyn Clock>) -> Self {
        RedisConversationStore {
            conn,
            commit: Script::new(COMMIT_LUA),
            locks: (0..LOCAL_LOCKS).map(|_| Mutex::new(())).collect(),
            hasher: RandomState::new(),
            clock,
        }
    }

    fn local_lock(&self, uid: &str) -> &Mutex<()> {
        let i = (self.hasher.hash_one(uid) % LOCAL_LOCKS as u64) as usize;
        &self.locks[i]
    }

    async fn read(
        &self,
        uid: &str,
        days: impl IntoIterator<Item = u64>,
    ) -> Result<Read, ConversationError> {
        let days: Vec<u64> = days.into_iter().collect();
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        for day in &days {
            pipe.cmd("HMGET")
                .arg(bucket_key(uid, *day))
                .arg("v")
                .arg("s");
        }
        let rows: Vec<(Option<u64>, Option<String>)> = if days.is_empty() {
            Vec::new()
        } else {
            pipe.query_async(&mut conn).await.map_err(store_error)?
        };
        let mut buckets = BTreeMap::new();
        for (day, (v, s)) in days.into_iter().zip(rows) {
            let list = match s {
                Some(json) => serde_json::from_str(&json).map_err(corrupt)?,
                None => Vec::new(),
            };
            buckets.insert(day, (v.unwrap_or(0), list));
        }
        Ok(Read { buckets })
    }

    /// Writes `changed` (day → new content) if no bucket in `read` changed since; `Ok(false)` on a conflict.
    async fn commit(
        &self,
        uid: &str,
        read: &Read,
        changed: &BTreeMap<u64, Vec<Conversation>>,
    ) -> Result<bool, ConversationError> {
        let mut inv = self.commit.prepare_invoke();
        for day in read.buckets.keys() {
            inv.key(bucket_key(uid, *day));
        }
        inv.key(days_key(uid));
        inv.arg(read.buckets.len());
        for (v, _) in read.buckets.values() {
            inv.arg(*v);
        }
        for day in read.buckets.keys() {
            match changed.get(day) {
                Some(list) => inv.arg(serde_json::to_string(list).map_err(corrupt)?),
                None => inv.arg(""),
            };
        }
        for day in read.buckets.keys() {
            inv.arg(*day);
        }
        let mut conn = self.conn.clone();
        let ok: i64 = inv.invoke_async(&mut conn).await.map_err(store_error)?;
        Ok(ok == 1)
    }

    async fn upsert_inner(&self, req: Upsert) -> Result<UpsertOutcome, ConversationError> {
        let spans = normalise_spans(req.spans.clone())?;
        let days = days_to_read(&spans, req.target.as_deref());
        let _local = self.local_lock(&req.uid).lock().await;
        let mut backoff = conflict_backoff();
        for _ in 0..MAX_ATTEMPTS {
            let read = self.read(&req.uid, days.iter().copied()).await?;
            let mut work: BTreeMap<u64, Vec<Conversation>> = read
                .buckets
                .iter()
                .map(|(d, (_, list))| (*d, list.clone()))
                .collect();
            let (outcome, changed_days) = apply_upsert(&mut work, &req, self.clock.now_ms())?;
            if changed_days.is_empty() {
                return Ok(outcome);
            }
            let changed: BTreeMap<u64, Vec<Conversation>> = work
                .into_iter()
                .filter(|(d, _)| changed_days.contains(d))
                .collect();
            if self.commit(&req.uid, &read, &changed).await? {
                return Ok(outcome);
            }
            metrics::counter!(crate::telemetry::CONVERSATION_CONFLICTS_TOTAL).increment(1);
            tokio::time::sleep(backoff.next_delay()).await;
        }
        Err(ConversationError::Contended(MAX_ATTEMPTS))
    }

    async fn all_days(&self, uid: &str) -> Result<Vec<u64>, ConversationError> {
        let mut conn = self.conn.clone();
        redis::cmd("ZRANGE")
            .arg(days_key(uid))
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await
            .map_err(store_error)
    }

    async fn unlock_inner(&self, uid: &str) -> Result<u64, ConversationError> {
        let _local = self.local_lock(uid).lock().await;
        let mut total = 0;
        for day in self.all_days(uid).await? {
            let mut done = false;
            let mut backoff = conflict_backoff();
            for _ in 0..MAX_ATTEMPTS {
                let read = self.read(uid, [day]).await?;
                let Some((_, list)) = read.buckets.get(&day) else {
                    break;
                };
                let mut list = list.clone();
                let n = unlock_bucket(&mut list, self.clock.now_ms());
                if n == 0 {
                    done = true;
                    break;
                }
                if self
                    .commit(uid, &read, &BTreeMap::from([(day, list)]))
                    .await?
                {
                    total += n;
                    done = true;
                    break;
                }
                tokio::time::sleep(backoff.next_delay()).await;
            }
            if !done {
                return Err(ConversationError::Contended(MAX_ATTEMPTS));
            }
        }
        Ok(total)
    }

    async fn list_inner(
        &self,
        uid: &str,
        limit: usize,
        offset: usize,
    ) -> Result<ConversationPage, ConversationError> {
        let limit = limit.clamp(1, MAX_LIST_LIMIT);
        let want = offset.saturating_add(limit) + 1;
        let mut days = self.all_days(uid).await?;
        days.reverse();
        let mut seen = Vec::new();
        // Buckets are read newest first, a few at a time, until the page (plus one, for `more`) is filled.
        for chunk in days.chunks(8) {
            let read = self.read(uid, chunk.iter().copied()).await?;
            for (_, (_, list)) in read.buckets.into_iter().rev() {
                seen.extend(list);
            }
            if seen.len() >= want {
                break;
            }
        }
        // Conversations of adjacent buckets can interleave by start time by a few hours: `page` sorts all read.
        Ok(page(seen, limit, offset))
    }
}

impl ConversationStore for RedisConversationStore {
    fn upsert(&self, req: Upsert) -> BoxFuture<'_, Result<UpsertOutcome, ConversationError>> {
        Box::pin(self.upsert_inner(req))
    }

    fn get<'a>(
        &'a self,
        uid: &'a str,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Option<Conversation>, ConversationError>> {
        Box::pin(async move {
            let Some(day) = Conversation::day_of_id(id) else {
                return Ok(None);
            };
            let read = self.read(uid, [day]).await?;
            Ok(read
                .buckets
                .into_values()
                .flat_map(|(_, list)| list)
                .find(|c| c.id == id))
        })
    }

    fn list<'a>(
        &'a self,
        uid: &'a str,
        limit: usize,
        offset: usize,
    ) -> BoxFuture<'a, Result<ConversationPage, ConversationError>> {
        Box::pin(self.list_inner(uid, limit, offset))
    }

    fn unlock_all<'a>(&'a self, uid: &'a str) -> BoxFuture<'a, Result<u64, ConversationError>> {
        Box::pin(self.unlock_inner(uid))
    }
}

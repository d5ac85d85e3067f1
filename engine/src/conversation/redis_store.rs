//! Conversations in Redis.
//!
//! Keys (the `vg:{uid}:` prefix keeps a user's keys in one cluster slot):
//! - `vg:{uid}:conv:<day>` HASH `v` (version), `s` (JSON array of that day's conversations)
//! - `vg:{uid}:conv:days`  ZSET of the days that have a bucket (score = member = day)
//! - `vg:{uid}:conv:tx:<id>` HASH segment id → JSON segment: the transcript of conversation `<id>`
//! - `vg:{uid}:conv:txs:<id>` HASH span key → transcription status (`done`, `pending`, …) of its sync spans
//!
//! An upsert reads the buckets around its spans, merges in Rust ([`super::apply_upsert`]) and commits with one
//! Lua script that checks the version of **every bucket read** and writes the changed ones: a concurrent
//! writer on any node makes the commit fail and the upsert retry on fresh data, so nothing is duplicated or
//! lost. Writers of one user on one node also queue on a local lock, so conflicts only come from other nodes.
//!
//! Transcript segments are added by one script that first checks, in the same atomic step, that the
//! conversation is still in its bucket: a segment that arrives after its conversation was deleted is
//! refused, never left behind. A delete removes the conversation and its transcript in one script too.

use std::collections::BTreeMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::time::Duration;

use crate::store::connection::RedisConnection;
use futures_util::future::BoxFuture;
use redis::{RedisError, Script};
use tokio::sync::Mutex;

mod transcripts;

use super::logic::{apply_upsert, days_to_read, page, unlock_bucket};
use super::transcript::{
    MAX_SEGMENTS_PER_CONVERSATION, MAX_SPAN_STATUSES_PER_CONVERSATION, SegmentsAdded,
    TranscriptSegment, TranscriptStatus, check_segments, sort_segments,
};
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

pub fn transcript_key(uid: &str, id: &str) -> String {
    format!("vg:{{{uid}}}:conv:tx:{id}")
}

pub fn status_key(uid: &str, id: &str) -> String {
    format!("vg:{{{uid}}}:conv:txs:{id}")
}

/// Removes conversations from one bucket with their transcripts. KEYS: the bucket, the days key, then the
/// transcripts to delete. ARGV: the expected version, the new content ('' = the bucket is now empty: it is
/// deleted and its day forgotten), the day. Returns 0 when the bucket changed since it was read.
const DELETE_LUA: &str = r"
local v = tonumber(redis.call('HGET', KEYS[1], 'v') or '0')
if v ~= tonumber(ARGV[1]) then return 0 end
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[2], ARGV[3])
else
  redis.call('HSET', KEYS[1], 'v', v + 1, 's', ARGV[2])
end
for i = 3, #KEYS do
  redis.call('DEL', KEYS[i])
end
return 1
";

/// How a conversation id appears in its bucket's JSON (serde writes `id` first, without spaces).
fn id_needle(id: &str) -> String {
    format!("\"id\":\"{id}\"")
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
    conn: RedisConnection,
    commit: Script,
    add_segments: Script,
    delete: Script,
    locks: Arc<[Mutex<()>]>,
    hasher: RandomState,
    clock: Arc<dyn Clock>,
}

struct Read {
    /// day → (version, conversations)
    buckets: BTreeMap<u64, (u64, Vec<Conversation>)>,
}

impl RedisConversationStore {
    pub fn new(conn: impl Into<RedisConnection>) -> Self {
        Self::with_clock(conn, Arc::new(SystemClock))
    }

    pub fn with_clock(conn: impl Into<RedisConnection>, clock: Arc<dyn Clock>) -> Self {
        RedisConversationStore {
            conn: conn.into(),
            commit: Script::new(COMMIT_LUA),
            add_segments: Script::new(transcripts::ADD_SEGMENTS_LUA),
            delete: Script::new(DELETE_LUA),
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

    /// Removes the conversations `remove` selects from the bucket of `day`, with their transcripts, retrying
    /// on conflicts; returns how many were removed.
    async fn delete_in_day(
        &self,
        uid: &str,
        day: u64,
        remove: impl Fn(&Conversation) -> bool,
    ) -> Result<u64, ConversationError> {
        let mut backoff = conflict_backoff();
        for _ in 0..MAX_ATTEMPTS {
            let read = self.read(uid, [day]).await?;
            let Some((version, list)) = read.buckets.get(&day) else {
                return Ok(0);
            };
            let (gone, kept): (Vec<&Conversation>, Vec<&Conversation>) =
                list.iter().partition(|c| remove(c));
            if gone.is_empty() {
                return Ok(0);
            }
            let content = if kept.is_empty() {
                String::new()
            } else {
                serde_json::to_string(&kept).map_err(corrupt)?
            };
            let mut inv = self.delete.prepare_invoke();
            inv.key(bucket_key(uid, day)).key(days_key(uid));
            for c in &gone {
                inv.key(transcript_key(uid, &c.id))
                    .key(status_key(uid, &c.id));
            }
            inv.arg(*version).arg(content).arg(day);
            let mut conn = self.conn.clone();
            let ok: i64 = inv.invoke_async(&mut conn).await.map_err(store_error)?;
            if ok == 1 {
                return Ok(gone.len() as u64);
            }
            metrics::counter!(crate::telemetry::CONVERSATION_CONFLICTS_TOTAL).increment(1);
            tokio::time::sleep(backoff.next_delay()).await;
        }
        Err(ConversationError::Contended(MAX_ATTEMPTS))
    }

    async fn delete_inner(&self, uid: &str, id: &str) -> Result<bool, ConversationError> {
        let Some(day) = Conversation::day_of_id(id) else {
            return Ok(false);
        };
        let _local = self.local_lock(uid).lock().await;
        Ok(self.delete_in_day(uid, day, |c| c.id == id).await? > 0)
    }

    async fn delete_all_inner(&self, uid: &str) -> Result<u64, ConversationError> {
        let _local = self.local_lock(uid).lock().await;
        let mut total = 0;
        for day in self.all_days(uid).await? {
            total += self.delete_in_day(uid, day, |_| true).await?;
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

    fn add_segments<'a>(
        &'a self,
        uid: &'a str,
        id: &'a str,
        segments: Vec<TranscriptSegment>,
    ) -> BoxFuture<'a, Result<SegmentsAdded, ConversationError>> {
        Box::pin(self.add_inner(uid, id, segments))
    }

    fn transcript<'a>(
        &'a self,
        uid: &'a str,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Vec<TranscriptSegment>, ConversationError>> {
        Box::pin(self.transcript_inner(uid, id))
    }

    fn set_span_statuses<'a>(
        &'a self,
        uid: &'a str,
        id: &'a str,
        statuses: Vec<(String, TranscriptStatus)>,
    ) -> BoxFuture<'a, Result<(), ConversationError>> {
        Box::pin(self.set_statuses_inner(uid, id, statuses))
    }

    fn span_statuses<'a>(
        &'a self,
        uid: &'a str,
        id: &'a str,
    ) -> BoxFuture<'a, Result<BTreeMap<String, TranscriptStatus>, ConversationError>> {
        Box::pin(self.statuses_inner(uid, id))
    }

    fn delete<'a>(
        &'a self,
        uid: &'a str,
        id: &'a str,
    ) -> BoxFuture<'a, Result<bool, ConversationError>> {
        Box::pin(self.delete_inner(uid, id))
    }

    fn delete_all<'a>(&'a self, uid: &'a str) -> BoxFuture<'a, Result<u64, ConversationError>> {
        Box::pin(self.delete_all_inner(uid))
    }
}

//! The store's one lease primitive (DESIGN §3): a holder takes one slot of a limit (per user, or per job of a
//! user) until an expiry; it extends the expiry while it holds the slot (the heartbeat) and gives the slot
//! back when it ends, so the slots of a node that crashed free themselves once their expiry passes.
//!
//! - [`LeaseStore`]: acquire (which also refreshes a slot already held), release, list live holders. Every
//!   decision takes the caller's `now` (a slot is live while its expiry is after `now`); Redis TTLs only
//!   collect garbage.
//! - [`RedisLeaseStore`]: one Lua script on one key, `vg:{uid}:lease:<kind>[:<id>]` ([`keys::lease`]), so it
//!   runs on Redis Cluster (the `{uid}` hash tag).
//! - [`MemoryLeaseStore`]: the same in process memory (the embedded single-node store).
//!
//! Heartbeats, release on drop and the failure mode while the store is unreachable are
//! [`crate::lease`]'s.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use crate::store::connection::RedisConnection;
use futures_util::future::BoxFuture;

use super::StoreError;
use super::keys;
use super::redis_store::store_error;

/// The limited thing: a kind (a fixed word, also the metric label), the user, and for a per-job limit the
/// job's id.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct LeaseKey {
    pub kind: &'static str,
    pub uid: String,
    pub id: Option<String>,
}

impl LeaseKey {
    /// A per-user limit (e.g. `listen_session`).
    pub fn user(kind: &'static str, uid: impl Into<String>) -> Self {
        LeaseKey {
            kind,
            uid: uid.into(),
            id: None,
        }
    }

    /// A limit on one job of a user (e.g. the node working on a sync job: limit 1).
    pub fn job(kind: &'static str, uid: impl Into<String>, id: impl Into<String>) -> Self {
        LeaseKey {
            kind,
            uid: uid.into(),
            id: Some(id.into()),
        }
    }

    /// The Redis key (one per key; carries the `{uid}` hash tag).
    pub fn redis_key(&self) -> String {
        keys::lease(&self.uid, self.kind, self.id.as_deref())
    }
}

/// What one acquire did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseOutcome {
    /// The holder has a slot until `now + ttl`. `held`: live holders now, this one included; `renewed`: the
    /// holder already had a live slot (a refresh), else the slot was taken now.
    Granted { held: u32, renewed: bool },
    /// Every slot is held by others (`held` live holders); nothing changed but expired holders dropped.
    Refused { held: u32 },
}

/// Leases in the store. Implementations must make `acquire` atomic per key.
pub trait LeaseStore: Send + Sync + 'static {
    /// Drops the key's holders whose expiry is not after `now_ms`, then gives `holder` a slot until
    /// `now_ms + ttl_ms`: extended when it holds a live one (never refused then), taken when fewer than
    /// `limit` others hold one, else refused.
    fn acquire<'a>(
        &'a self,
        key: &'a LeaseKey,
        holder: &'a str,
        limit: u32,
        now_ms: u64,
        ttl_ms: u64,
    ) -> BoxFuture<'a, Result<LeaseOutcome, StoreError>>;

    /// Gives `holder`'s slot back (a no-op when it holds none).
    fn release<'a>(
        &'a self,
        key: &'a LeaseKey,
        holder: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// The holders whose expiry is after `now_ms`, sorted.
    fn holders<'a>(
        &'a self,
        key: &'a LeaseKey,
        now_ms: u64,
    ) -> BoxFuture<'a, Result<Vec<String>, StoreError>>;

    /// A short name for logs ("redis", "memory").
    fn kind(&self) -> &'static str;
}

/// KEYS[1]: the lease sorted set (member = holder, score = expiry ms).
/// ARGV: holder, limit, now_ms, expires_ms, gc_ms (TTL slack beyond the latest expiry).
/// Returns {granted 0/1, live holders after the call, renewed 0/1}.
const ACQUIRE_LUA: &str = r"
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[3])
local held = redis.call('ZSCORE', KEYS[1], ARGV[1])
local n = redis.call('ZCARD', KEYS[1])
if not held then
  if n >= tonumber(ARGV[2]) then return {0, n, 0} end
  n = n + 1
end
redis.call('ZADD', KEYS[1], ARGV[4], ARGV[1])
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
local left = tonumber(last[2]) - tonumber(ARGV[3])
redis.call('PEXPIRE', KEYS[1], math.floor(left) + tonumber(ARGV[5]))
if held then return {1, n, 1} end
return {1, n, 0}
";

/// How long a lease key outlives its latest expiry (garbage collection only: expiry decides).
const GC_SLACK_MS: u64 = 60_000;

/// Leases in Redis.
#[derive(Clone)]
pub struct RedisLeaseStore {
    conn: RedisConnection,
    acquire: redis::Script,
}

impl RedisLeaseStore {
    pub fn new(conn: impl Into<RedisConnection>) -> Self {
        RedisLeaseStore {
            conn: conn.into(),
            acquire: redis::Script::new(ACQUIRE_LUA),
        }
    }
}

impl LeaseStore for RedisLeaseStore {
    fn acquire<'a>(
        &'a self,
        key: &'a LeaseKey,
        holder: &'a str,
        limit: u32,
        now_ms: u64,
        ttl_ms: u64,
    ) -> BoxFuture<'a, Result<LeaseOutcome, StoreError>> {
        let mut conn = self.conn.clone();
        Box::pin(async move {
            let (granted, held, renewed): (i64, i64, i64) = self
                .acquire
                .key(key.redis_key())
                .arg(holder)
                .arg(limit)
                .arg(now_ms)
                .arg(now_ms.saturating_add(ttl_ms.max(1)))
                .arg(GC_SLACK_MS)
                .invoke_async(&mut conn)
                .await
                .map_err(store_error)?;
            let held = u32::try_from(held)
                .map_err(|_| StoreError::Protocol(format!("lease count {held}")))?;
            Ok(match granted {
                1 => LeaseOutcome::Granted {
                    held,
                    renewed: renewed == 1,
                },
                _ => LeaseOutcome::Refused { held },
            })
        })
    }

    fn release<'a>(
        &'a self,
        key: &'a LeaseKey,
        holder: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let mut conn = self.conn.clone();
        Box::pin(async move {
            redis::cmd("ZREM")
                .arg(key.redis_key())
                .arg(holder)
                .query_async::<i64>(&mut conn)
                .await
                .map(drop)
                .map_err(store_error)
        })
    }

    fn holders<'a>(
        &'a self,
        key: &'a LeaseKey,
        now_ms: u64,
    ) -> BoxFuture<'a, Result<Vec<String>, StoreError>> {
        let mut conn = self.conn.clone();
        Box::pin(async move {
            let mut live: Vec<String> = redis::cmd("ZRANGEBYSCORE")
                .arg(key.redis_key())
                .arg(format!("({now_ms}"))
                .arg("+inf")
                .query_async(&mut conn)
                .await
                .map_err(store_error)?;
            live.sort();
            Ok(live)
        })
    }

    fn kind(&self) -> &'static str {
        "redis"
    }
}

/// Leases in process memory (single node), with the Redis script's semantics.
#[derive(Default)]
pub struct MemoryLeaseStore {
    /// Lease key → holder → expiry ms.
    keys: Mutex<HashMap<String, HashMap<String, u64>>>,
}

impl MemoryLeaseStore {
    pub fn new() -> Self {
        Self::default()
    }
}

impl LeaseStore for MemoryLeaseStore {
    fn acquire<'a>(
        &'a self,
        key: &'a LeaseKey,
        holder: &'a str,
        limit: u32,
        now_ms: u64,
        ttl_ms: u64,
    ) -> BoxFuture<'a, Result<LeaseOutcome, StoreError>> {
        let mut keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        let holders = keys.entry(key.redis_key()).or_default();
        holders.retain(|_, &mut expires| expires > now_ms);
        let renewed = holders.contains_key(holder);
        let held = u32::try_from(holders.len()).unwrap_or(u32::MAX);
        let outcome = if !renewed && held >= limit {
            LeaseOutcome::Refused { held }
        } else {
            holders.insert(holder.to_owned(), now_ms.saturating_add(ttl_ms.max(1)));
            LeaseOutcome::Granted {
                held: if renewed { held } else { held + 1 },
                renewed,
            }
        };
        if holders.is_empty() {
            keys.remove(&key.redis_key());
        }
        Box::pin(async move { Ok(outcome) })
    }

    fn release<'a>(
        &'a self,
        key: &'a LeaseKey,
        holder: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let mut keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        let redis_key = key.redis_key();
        if let Some(holders) = keys.get_mut(&redis_key) {
            holders.remove(holder);
            if holders.is_empty() {
                keys.remove(&redis_key);
            }
        }
        Box::pin(async { Ok(()) })
    }

    fn holders<'a>(
        &'a self,
        key: &'a LeaseKey,
        now_ms: u64,
    ) -> BoxFuture<'a, Result<Vec<String>, StoreError>> {
        let keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        let mut live: Vec<String> = keys
            .get(&key.redis_key())
            .map(|h| {
                h.iter()
                    .filter(|&(_, &expires)| expires > now_ms)
                    .map(|(holder, _)| holder.clone())
                    .collect()
            })
            .unwrap_or_default();
        live.sort();
        Box::pin(async move { Ok(live) })
    }

    fn kind(&self) -> &'static str {
        "memory"
    }
}

impl<S: LeaseStore + ?Sized> LeaseStore for std::sync::Arc<S> {
    fn acquire<'a>(
        &'a self,
        key: &'a LeaseKey,
        holder: &'a str,
        limit: u32,
        now_ms: u64,
        ttl_ms: u64,
    ) -> BoxFuture<'a, Result<LeaseOutcome, StoreError>> {
        (**self).acquire(key, holder, limit, now_ms, ttl_ms)
    }

    fn release<'a>(
        &'a self,
        key: &'a LeaseKey,
        holder: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        (**self).release(key, holder)
    }

    fn holders<'a>(
        &'a self,
        key: &'a LeaseKey,
        now_ms: u64,
    ) -> BoxFuture<'a, Result<Vec<String>, StoreError>> {
        (**self).holders(key, now_ms)
    }

    fn kind(&self) -> &'static str {
        (**self).kind()
    }
}

//! Users' plan records (set by verified payments, the admin set-plan route and the bulk import; read by every
//! entitlement decision).
//!
//! Redis key: `vg:{uid}:plan` STRING, JSON [`PlanRecordValue`]. No record = the free plan. A change is applied
//! at most once: `vg:{uid}:plan:ev:<event_id>` marks it (kept 30 days, longer than Stripe retries). Changes
//! apply in the order they happened, not the order they arrive: a change older (`source_at_ms`) than the
//! record is marked and not stored (Stripe delivers out of order; a cancellation must not be undone by a
//! late `active` update, nor a renewal by a late cancellation).

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, PoisonError};

use crate::store::connection::RedisConnection;
use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};

/// What the store keeps for a user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanRecordValue {
    pub plan: String,
    pub updated_at_ms: u64,
    /// The payment event that set it.
    pub event_id: String,
    /// When the change happened at its source (a Stripe event's `created`, an admin call's time); 0 for
    /// records written before this field existed.
    #[serde(default)]
    pub source_at_ms: u64,
}

/// What a [`PlanStore::set`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanSet {
    /// The record is now `value`.
    Stored,
    /// This event was applied before: nothing changed.
    Duplicate,
    /// The record holds a newer change: the event is marked, nothing else changed.
    Stale,
}

#[derive(Debug, thiserror::Error)]
#[error("plan store unavailable: {0}")]
pub struct PlanStoreError(pub String);

/// Users' plans.
pub trait PlanStore: Send + Sync + 'static {
    /// The plan id on record (`None` = no record = free).
    fn get<'a>(&'a self, uid: &'a str) -> BoxFuture<'a, Result<Option<String>, PlanStoreError>>;
    /// Records `value` for `uid` unless its event was applied before or the record holds a newer change.
    fn set<'a>(
        &'a self,
        uid: &'a str,
        value: &'a PlanRecordValue,
    ) -> BoxFuture<'a, Result<PlanSet, PlanStoreError>>;
}

/// Plans in process memory.
#[derive(Default)]
pub struct MemoryPlanStore {
    inner: Mutex<(HashMap<String, PlanRecordValue>, HashSet<String>)>,
}

impl PlanStore for MemoryPlanStore {
    fn get<'a>(&'a self, uid: &'a str) -> BoxFuture<'a, Result<Option<String>, PlanStoreError>> {
        let plan = self
            .inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .0
            .get(uid)
            .map(|v| v.plan.clone());
        Box::pin(async move { Ok(plan) })
    }

    fn set<'a>(
        &'a self,
        uid: &'a str,
        value: &'a PlanRecordValue,
    ) -> BoxFuture<'a, Result<PlanSet, PlanStoreError>> {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let outcome = if !inner.1.insert(format!("{uid}\u{0}{}", value.event_id)) {
            PlanSet::Duplicate
        } else if inner
            .0
            .get(uid)
            .is_some_and(|cur| cur.source_at_ms > value.source_at_ms)
        {
            PlanSet::Stale
        } else {
            inner.0.insert(uid.to_owned(), value.clone());
            PlanSet::Stored
        };
        Box::pin(async move { Ok(outcome) })
    }
}

pub fn plan_key(uid: &str) -> String {
    format!("vg:{{{uid}}}:plan")
}

pub fn plan_event_key(uid: &str, event_id: &str) -> String {
    format!("vg:{{{uid}}}:plan:ev:{event_id}")
}

const EVENT_TTL_MS: u64 = 30 * 86_400_000;

/// Marks the event and sets the plan atomically unless the record holds a newer change. KEYS: plan, event
/// mark. ARGV: value, ttl, the change's source_at_ms. Returns 1 stored, 0 duplicate, 2 stale.
const SET_LUA: &str = r"
if not redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[2]) then return 0 end
local cur = redis.call('GET', KEYS[1])
if cur then
  local ok, rec = pcall(cjson.decode, cur)
  if ok and type(rec) == 'table' and tonumber(rec.source_at_ms or 0) > tonumber(ARGV[3]) then return 2 end
end
redis.call('SET', KEYS[1], ARGV[1])
return 1
";

/// Plans in Redis.
#[derive(Clone)]
pub struct RedisPlanStore {
    conn: RedisConnection,
    script: redis::Script,
}

impl RedisPlanStore {
    pub fn new(conn: impl Into<RedisConnection>) -> Self {
        RedisPlanStore {
            conn: conn.into(),
            script: redis::Script::new(SET_LUA),
        }
    }
}

fn err(e: impl std::fmt::Display) -> PlanStoreError {
    PlanStoreError(e.to_string())
}

impl PlanStore for RedisPlanStore {
    fn get<'a>(&'a self, uid: &'a str) -> BoxFuture<'a, Result<Option<String>, PlanStoreError>> {
        let mut conn = self.conn.clone();
        Box::pin(async move {
            let raw: Option<String> = redis::cmd("GET")
                .arg(plan_key(uid))
                .query_async(&mut conn)
                .await
                .map_err(err)?;
            match raw {
                None => Ok(None),
                Some(json) => {
                    let v: PlanRecordValue = serde_json::from_str(&json).map_err(err)?;
                    Ok(Some(v.plan))
                }
            }
        })
    }

    fn set<'a>(
        &'a self,
        uid: &'a str,
        value: &'a PlanRecordValue,
    ) -> BoxFuture<'a, Result<PlanSet, PlanStoreError>> {
        let mut conn = self.conn.clone();
        Box::pin(async move {
            let json = serde_json::to_string(value).map_err(err)?;
            let n: i64 = self
                .script
                .key(plan_key(uid))
                .key(plan_event_key(uid, &value.event_id))
                .arg(json)
                .arg(EVENT_TTL_MS)
                .arg(value.source_at_ms)
                .invoke_async(&mut conn)
                .await
                .map_err(err)?;
            Ok(match n {
                1 => PlanSet::Stored,
                2 => PlanSet::Stale,
                _ => PlanSet::Duplicate,
            })
        })
    }
}

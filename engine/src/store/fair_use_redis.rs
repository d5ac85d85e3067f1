//! Redis implementation of [`FairUseStore`] and [`CooldownLock`].
//!
//! Keys (same `vg:{uid}:` prefix as `store::keys`, so a user's keys share one cluster slot):
//! - `vg:{uid}:fu:state`  HASH `v` (version), `s` (state JSON)
//! - `vg:{uid}:fu:events` LIST of event JSON, newest first, trimmed to [`MAX_EVENTS_PER_USER`]
//! - `vg:{uid}:fu:lock`   STRING `token|expires_ms` (the classifier cooldown lock)
//! - `vg:{uid}:fu:stt:<day>` STRING paid-STT ms forwarded on that UTC day (INCRBY; expires after 2 days)
//! - `vg:{uid}:fu:sessions` ZSET session id → end (audio ms), and `vg:{uid}:fu:session` HASH session id →
//!   summary JSON: the session evidence, written and trimmed by one script
//! - `vg:{uid}:fu:thresholds` HASH `daily:80`, … → 1: the usage thresholds told to the user (one script keeps
//!   exactly the reached ones; expires 8 days after the last write)
//! - `vg:stt:spend:<day>` STRING ms of audio sent to paid providers that UTC day, all users (INCRBY; expires
//!   after 2 days): the spend ceiling's count, one key for the cluster
//! - `vg:fu:case:<ref>`   STRING uid (case-ref index, written after the state script)
//! - `vg:fu:flagged`      HASH uid → stage for users not at none (admin index, written after the state script)
//!
//! The state write is one Lua script (compare version, write, append events, trim, refresh TTL). The two global
//! indexes live in other slots, so they are written by separate commands right after; they are indexes only
//! (admin views re-read the state), and a lost index write is repaired by the user's next commit.

use crate::store::connection::{RedisConnection, transaction};
use redis::{AsyncCommands, Script};

use crate::policy::{CaseRef, FairUseEvent, SessionSummary, Stage, StageState};
use crate::store::fair_use::{
    CommitOutcome, CooldownLock, FairUseFuture, FairUseStore, FairUseStoreError,
    MAX_EVENTS_PER_USER, MAX_SESSIONS_PER_USER, SESSION_RETENTION_MS, STT_LEDGER_RETENTION_DAYS,
    SttLedgerRow, SttParts, VersionedState, stt_total,
};
use crate::time::{MS_PER_DAY, month_of_day};

/// State and events outlive every decay horizon (30 + 7 + 30 days) by far; a user silent this long is gone.
const STATE_TTL_MS: u64 = 400 * 86_400_000;
const FLAGGED_KEY: &str = "vg:fu:flagged";

pub fn state_key(uid: &str) -> String {
    format!("vg:{{{uid}}}:fu:state")
}

pub fn events_key(uid: &str) -> String {
    format!("vg:{{{uid}}}:fu:events")
}

pub fn lock_key(uid: &str) -> String {
    format!("vg:{{{uid}}}:fu:lock")
}

pub fn stt_key(uid: &str, day: u64) -> String {
    format!("vg:{{{uid}}}:fu:stt:{day}")
}

/// A user's per-provider STT ledger for one UTC month (`yyyymm`): a hash of `<day>:<provider>` → ms.
pub fn stt_ledger_key(uid: &str, month: u32) -> String {
    format!("vg:{{{uid}}}:fu:sttledger:{month}")
}

/// STT day counters outlive their day by one more (yesterday stays readable across midnight).
const STT_TTL_MS: u64 = 2 * 86_400_000;

pub fn sessions_key(uid: &str) -> String {
    format!("vg:{{{uid}}}:fu:sessions")
}

pub fn session_key(uid: &str) -> String {
    format!("vg:{{{uid}}}:fu:session")
}

/// Keep one summary (replacing its id's), then drop what ended before the cutoff and, past the bound, the
/// oldest by end. KEYS: sessions (ZSET), session (HASH). ARGV: id, end, json, cutoff, max, ttl.
const RECORD_SESSION_LUA: &str = r"
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[4])
local over = redis.call('ZCARD', KEYS[1]) - #gone - tonumber(ARGV[5])
if over > 0 then
  local oldest = redis.call('ZRANGE', KEYS[1], #gone, #gone + over - 1)
  for i = 1, #oldest do gone[#gone + 1] = oldest[i] end
end
if #gone > 0 then
  redis.call('ZREM', KEYS[1], unpack(gone))
  redis.call('HDEL', KEYS[2], unpack(gone))
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[6])
  redis.call('PEXPIRE', KEYS[2], ARGV[6])
end
return #gone
";

/// The summaries that ended at or after `since`, newest end first. KEYS: sessions, session. ARGV: since,
/// limit.
const READ_SESSIONS_LUA: &str = r"
local ids = redis.call('ZREVRANGEBYSCORE', KEYS[1], '+inf', ARGV[1], 'LIMIT', 0, ARGV[2])
if #ids == 0 then return {} end
return redis.call('HMGET', KEYS[2], unpack(ids))
";

pub fn spend_key(day: u64) -> String {
    format!("vg:stt:spend:{day}")
}

pub fn thresholds_key(uid: &str) -> String {
    format!("vg:{{{uid}}}:fu:thresholds")
}

/// Keep exactly the reached thresholds; answer the ones not kept before. KEYS: thresholds (HASH). ARGV: ttl,
/// reached….
const CLAIM_THRESHOLDS_LUA: &str = r"
local keep = {}
for i = 2, #ARGV do keep[ARGV[i]] = true end
local had = redis.call('HKEYS', KEYS[1])
for i = 1, #had do
  if not keep[had[i]] then redis.call('HDEL', KEYS[1], had[i]) end
end
local new = {}
for i = 2, #ARGV do
  if redis.call('HSETNX', KEYS[1], ARGV[i], '1') == 1 then new[#new + 1] = ARGV[i] end
end
if #ARGV > 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return new
";

pub fn case_key(case_ref: &CaseRef) -> String {
    format!("vg:fu:case:{case_ref}")
}

const COMMIT_LUA: &str = r"
local v = tonumber(redis.call('HGET', KEYS[1], 'v') or '0')
if v ~= tonumber(ARGV[1]) then return {0, v} end
v = v + 1
redis.call('HSET', KEYS[1], 'v', v, 's', ARGV[2])
for i = 5, #ARGV do redis.call('LPUSH', KEYS[2], ARGV[i]) end
redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[3]) - 1)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('PEXPIRE', KEYS[2], ARGV[4]) end
return {1, v}
";

/// Free when absent or when the stored expiry is not after `now` (decided by the caller's clock, not the TTL;
/// the TTL only collects garbage). ARGV: value (`token|expires_ms`), now_ms, expires_ms, ttl_ms.
const ACQUIRE_LUA: &str = r"
local cur = redis.call('GET', KEYS[1])
if cur then
  local sep = string.find(cur, '|', 1, true)
  local exp = sep and tonumber(string.sub(cur, sep + 1)) or nil
  if exp and exp > tonumber(ARGV[2]) then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[4])
return 1
";

/// Compare-and-delete: delete only while our token holds the lock. ARGV: token.
const RELEASE_LUA: &str = r"
local cur = redis.call('GET', KEYS[1])
if cur and string.sub(cur, 1, #ARGV[1] + 1) == ARGV[1] .. '|' then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// A transaction adding `ms` to the day counter `key` (kept [`STT_TTL_MS`]); it answers the new total.
fn day_counter(key: &str, ms: u64) -> redis::Pipeline {
    let mut pipe = redis::pipe();
    pipe.atomic()
        .cmd("INCRBY")
        .arg(key)
        .arg(ms)
        .cmd("PEXPIRE")
        .arg(key)
        .arg(STT_TTL_MS)
        .ignore();
    pipe
}

/// Fair-use state and events in Redis.
#[derive(Clone)]
pub struct RedisFairUseStore {
    conn: RedisConnection,
    commit: Script,
    record_session: Script,
    read_sessions: Script,
    claim_thresholds: Script,
}

impl RedisFairUseStore {
    /// Adds `ms` to a day counter (the cluster's spend) and keeps it [`STT_TTL_MS`]; answers the new total.
    /// One atomic round trip.
    fn add_day_ms(&self, key: String, ms: u64) -> FairUseFuture<u64> {
        let mut conn = self.conn.clone();
        let pipe = day_counter(&key, ms);
        Box::pin(async move {
            let (total,): (u64,) = transaction(&mut conn, &pipe, &key).await?;
            Ok(total)
        })
    }

    pub fn new(conn: impl Into<RedisConnection>) -> Self {
        RedisFairUseStore {
            conn: conn.into(),
            commit: Script::new(COMMIT_LUA),
            record_session: Script::new(RECORD_SESSION_LUA),
            read_sessions: Script::new(READ_SESSIONS_LUA),
            claim_thresholds: Script::new(CLAIM_THRESHOLDS_LUA),
        }
    }
}

impl FairUseStore for RedisFairUseStore {
    fn load(&self, uid: &str) -> FairUseFuture<VersionedState> {
        let mut conn = self.conn.clone();
        let key = state_key(uid);
        Box::pin(async move {
            let (v, s): (Option<u64>, Option<String>) = redis::cmd("HMGET")
                .arg(&key)
                .arg("v")
                .arg("s")
                .query_async(&mut conn)
                .await?;
            match (v, s) {
                (Some(version), Some(json)) => Ok(VersionedState {
                    state: serde_json::from_str(&json)?,
                    version,
                }),
                _ => Ok(VersionedState::default()),
            }
        })
    }

    fn commit(
        &self,
        uid: &str,
        expected_version: u64,
        state: &StageState,
        events: &[FairUseEvent],
    ) -> FairUseFuture<CommitOutcome> {
        let mut conn = self.conn.clone();
        let script = self.commit.clone();
        let uid = uid.to_owned();
        let state_json = serde_json::to_string(state);
        let event_json: Result<Vec<String>, _> = events.iter().map(serde_json::to_string).collect();
        let cases: Vec<CaseRef> = events.iter().map(|e| e.case_ref.clone()).collect();
        let stage = state.stage;
        Box::pin(async move {
            let (state_json, event_json) = (state_json?, event_json?);
            let mut inv = script.prepare_invoke();
            inv.key(state_key(&uid)).key(events_key(&uid));
            inv.arg(expected_version)
                .arg(state_json)
                .arg(MAX_EVENTS_PER_USER)
                .arg(STATE_TTL_MS);
            for e in &event_json {
                inv.arg(e);
            }
            let (ok, version): (i64, u64) = inv.invoke_async(&mut conn).await?;
            if ok != 1 {
                return Ok(CommitOutcome::Conflict { current: version });
            }
            for case in &cases {
                let _: () = conn.pset_ex(case_key(case), &uid, STATE_TTL_MS).await?;
            }
            if stage == Stage::None {
                let _: () = conn.hdel(FLAGGED_KEY, &uid).await?;
            } else {
                let _: () = conn.hset(FLAGGED_KEY, &uid, stage.as_str()).await?;
            }
            Ok(CommitOutcome::Committed { version })
        })
    }

    fn events(&self, uid: &str, limit: usize) -> FairUseFuture<Vec<FairUseEvent>> {
        let mut conn = self.conn.clone();
        let key = events_key(uid);
        Box::pin(async move {
            if limit == 0 {
                return Ok(Vec::new());
            }
            let end = isize::try_from(limit).unwrap_or(isize::MAX) - 1;
            let raw: Vec<String> = conn.lrange(&key, 0, end).await?;
            raw.iter()
                .map(|j| serde_json::from_str(j).map_err(FairUseStoreError::from))
                .collect()
        })
    }

    fn find_case(&self, case_ref: &CaseRef) -> FairUseFuture<Option<String>> {
        let mut conn = self.conn.clone();
        let key = case_key(case_ref);
        Box::pin(async move { Ok(conn.get(&key).await?) })
    }

    fn flagged(&self, stage: Option<Stage>, limit: usize) -> FairUseFuture<Vec<(String, Stage)>> {
        let mut conn = self.conn.clone();
        Box::pin(async move {
            let all: Vec<(String, String)> = conn.hgetall(FLAGGED_KEY).await?;
            let mut out: Vec<(String, Stage)> = all
                .into_iter()
                .filter_map(|(uid, s)| s.parse::<Stage>().ok().map(|s| (uid, s)))
                .filter(|(_, s)| *s != Stage::None && stage.is_none_or(|want| want == *s))
                .collect();
            out.sort();
            out.truncate(limit);
            Ok(out)
        })
    }

    fn add_stt_ms(&self, uid: &str, day: u64, parts: SttParts<'_>) -> FairUseFuture<u64> {
        let mut conn = self.conn.clone();
        let key = stt_key(uid, day);
        let ledger = stt_ledger_key(uid, month_of_day(day));
        let mut pipe = day_counter(&key, stt_total(parts));
        // The day's counter and the ledger share the user's slot: one transaction.
        let mut written = false;
        for (provider, ms) in parts.iter().filter(|(_, ms)| *ms > 0) {
            pipe.cmd("HINCRBY")
                .arg(&ledger)
                .arg(format!("{day}:{provider}"))
                .arg(ms)
                .ignore();
            written = true;
        }
        if written {
            pipe.cmd("PEXPIRE")
                .arg(&ledger)
                .arg(STT_LEDGER_RETENTION_DAYS * MS_PER_DAY)
                .ignore();
        }
        Box::pin(async move {
            let (total,): (u64,) = transaction(&mut conn, &pipe, &key).await?;
            Ok(total)
        })
    }

    fn stt_ledger(&self, uid: &str, from: u64, to: u64) -> FairUseFuture<Vec<SttLedgerRow>> {
        let mut conn = self.conn.clone();
        let uid = uid.to_owned();
        // Bounded by the retention whatever range is asked: at most five months' hashes.
        let from = from.max(to.saturating_sub(STT_LEDGER_RETENTION_DAYS));
        Box::pin(async move {
            let mut months = vec![month_of_day(from)];
            let mut day = from;
            while day <= to {
                let month = month_of_day(day);
                if months.last() != Some(&month) {
                    months.push(month);
                }
                day += 1;
            }
            let mut rows = Vec::new();
            for month in months {
                let fields: Vec<(String, u64)> = conn.hgetall(stt_ledger_key(&uid, month)).await?;
                for (field, ms) in fields {
                    let Some((day, provider)) = field
                        .split_once(':')
                        .and_then(|(d, p)| Some((d.parse::<u64>().ok()?, p)))
                    else {
                        return Err(FairUseStoreError::Protocol(format!(
                            "STT ledger field {field:?} is not <day>:<provider>"
                        )));
                    };
                    if (from..=to).contains(&day) {
                        rows.push(SttLedgerRow {
                            day,
                            provider: provider.to_owned(),
                            ms,
                        });
                    }
                }
            }
            rows.sort_by(|a, b| (a.day, &a.provider).cmp(&(b.day, &b.provider)));
            Ok(rows)
        })
    }

    fn add_spend_ms(&self, day: u64, ms: u64) -> FairUseFuture<u64> {
        self.add_day_ms(spend_key(day), ms)
    }

    fn spend_ms(&self, day: u64) -> FairUseFuture<u64> {
        let mut conn = self.conn.clone();
        let key = spend_key(day);
        Box::pin(async move {
            let used: Option<u64> = conn.get(&key).await?;
            Ok(used.unwrap_or(0))
        })
    }

    fn claim_thresholds(&self, uid: &str, reached: &[String]) -> FairUseFuture<Vec<String>> {
        let mut conn = self.conn.clone();
        let script = self.claim_thresholds.clone();
        let (key, reached) = (thresholds_key(uid), reached.to_vec());
        Box::pin(async move {
            let mut invocation = script.key(&key);
            invocation.arg(SESSION_RETENTION_MS);
            for k in &reached {
                invocation.arg(k);
            }
            Ok(invocation.invoke_async(&mut conn).await?)
        })
    }

    fn stt_ms(&self, uid: &str, day: u64) -> FairUseFuture<u64> {
        let mut conn = self.conn.clone();
        let key = stt_key(uid, day);
        Box::pin(async move {
            let used: Option<u64> = conn.get(&key).await?;
            Ok(used.unwrap_or(0))
        })
    }

    fn record_session(
        &self,
        uid: &str,
        session: &SessionSummary,
        now_ms: u64,
    ) -> FairUseFuture<()> {
        let mut conn = self.conn.clone();
        let script = self.record_session.clone();
        let keys = (sessions_key(uid), session_key(uid));
        let json = serde_json::to_string(session);
        let (id, end) = (session.id.clone(), session.ended_at_ms);
        let cutoff = now_ms.saturating_sub(SESSION_RETENTION_MS);
        Box::pin(async move {
            let json = json?;
            let _gone: i64 = script
                .key(&keys.0)
                .key(&keys.1)
                .arg(&id)
                .arg(end)
                .arg(&json)
                .arg(cutoff)
                .arg(MAX_SESSIONS_PER_USER)
                .arg(SESSION_RETENTION_MS)
                .invoke_async(&mut conn)
                .await?;
            Ok(())
        })
    }

    fn sessions(
        &self,
        uid: &str,
        since_ms: u64,
        limit: usize,
    ) -> FairUseFuture<Vec<SessionSummary>> {
        let mut conn = self.conn.clone();
        let script = self.read_sessions.clone();
        let keys = (sessions_key(uid), session_key(uid));
        Box::pin(async move {
            if limit == 0 {
                return Ok(Vec::new());
            }
            let raw: Vec<Option<String>> = script
                .key(&keys.0)
                .key(&keys.1)
                .arg(since_ms)
                .arg(limit)
                .invoke_async(&mut conn)
                .await?;
            // An id without its summary (a write between the two keys' expiries) is skipped.
            raw.iter()
                .flatten()
                .map(|j| serde_json::from_str(j).map_err(FairUseStoreError::from))
                .collect()
        })
    }
}

/// The classifier cooldown lock in Redis, shared by every node on the same Redis.
#[derive(Clone)]
pub struct RedisCooldownLock {
    conn: RedisConnection,
    acquire: Script,
    release: Script,
}

impl RedisCooldownLock {
    pub fn new(conn: impl Into<RedisConnection>) -> Self {
        RedisCooldownLock {
            conn: conn.into(),
            acquire: Script::new(ACQUIRE_LUA),
            release: Script::new(RELEASE_LUA),
        }
    }
}

impl CooldownLock for RedisCooldownLock {
    fn try_acquire(
        &self,
        uid: &str,
        token: &str,
        now_ms: u64,
        hold_ms: u64,
    ) -> FairUseFuture<bool> {
        let mut conn = self.conn.clone();
        let script = self.acquire.clone();
        let key = lock_key(uid);
        let expires = now_ms.saturating_add(hold_ms);
        let value = format!("{token}|{expires}");
        // The TTL only collects garbage; at least 1 ms because PX 0 is an error.
        let ttl = hold_ms.max(1);
        Box::pin(async move {
            let got: i64 = script
                .key(&key)
                .arg(&value)
                .arg(now_ms)
                .arg(expires)
                .arg(ttl)
                .invoke_async(&mut conn)
                .await?;
            Ok(got == 1)
        })
    }

    fn release(&self, uid: &str, token: &str) -> FairUseFuture<bool> {
        let mut conn = self.conn.clone();
        let script = self.release.clone();
        let key = lock_key(uid);
        let token = token.to_owned();
        Box::pin(async move {
            let n: i64 = script.key(&key).arg(&token).invoke_async(&mut conn).await?;
            Ok(n == 1)
        })
    }
}

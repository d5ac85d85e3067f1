//! Fair-use persistence: the per-user stage state with its audit events, and the classifier cooldown lock.
//!
//! Both are small traits with a Redis implementation (`fair_use_redis`) and an in-memory one (here).
//! State changes are compare-and-set on a version, so two writers (two nodes, or an admin call racing the
//! fair-use ledger) can never lose each other's update: the loser re-reads and re-applies. Nothing here
//! reads the clock: cooldown expiry is decided from the `now_ms` the caller passes in.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use futures_util::future::BoxFuture;

use crate::policy::{CaseRef, FairUseEvent, SessionSummary, Stage, StageState};

/// Events kept per user (newest first); older ones are trimmed.
pub const MAX_EVENTS_PER_USER: usize = 200;

/// Session evidence kept per user: the newest this many by end (a summary is at most ~400 bytes of JSON,
/// so at most ~200 KB per user); a day of short reconnects stays well inside it.
pub const MAX_SESSIONS_PER_USER: usize = 500;

/// Session evidence is kept while its end (audio time) is within this of now: the 7-day window plus a day.
pub const SESSION_RETENTION_MS: u64 = 8 * 86_400_000;

/// The per-provider STT ledger ([`FairUseStore::stt_ledger`]) is kept this many days: a quarter's
/// invoices and the weeks their disputes take.
pub const STT_LEDGER_RETENTION_DAYS: u64 = 100;

/// STT ms charged, by the provider that took the audio (`local`, `deepgram`, `openai`, `none`).
pub type SttParts<'a> = &'a [(&'static str, u64)];

/// The sum of the parts (saturating).
pub fn stt_total(parts: SttParts<'_>) -> u64 {
    parts
        .iter()
        .fold(0u64, |sum, (_, ms)| sum.saturating_add(*ms))
}

/// One row of a user's STT ledger: the ms charged on a UTC day for audio one provider took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SttLedgerRow {
    /// Days since 1970-01-01 (UTC).
    pub day: u64,
    /// `local`, `deepgram`, `openai` or `none`.
    pub provider: String,
    pub ms: u64,
}

/// A store failure. Callers treat it as "unknown", never as a benign answer.
#[derive(Debug, thiserror::Error)]
pub enum FairUseStoreError {
    #[error("fair-use store unavailable: {0}")]
    Unavailable(#[from] redis::RedisError),
    #[error("fair-use record is corrupt: {0}")]
    Corrupt(#[from] serde_json::Error),
    #[error("fair-use store answered unexpectedly: {0}")]
    Protocol(String),
}

impl FairUseStoreError {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            FairUseStoreError::Unavailable(_) => "store_unavailable",
            FairUseStoreError::Corrupt(_) => "store_corrupt",
            FairUseStoreError::Protocol(_) => "store_protocol",
        }
    }
}

pub type FairUseFuture<T> = BoxFuture<'static, Result<T, FairUseStoreError>>;

/// A state with the version it was read at (0 = never written).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct VersionedState {
    pub state: StageState,
    pub version: u64,
}

/// Result of a compare-and-set write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitOutcome {
    Committed {
        version: u64,
    },
    /// Someone wrote first; re-read and re-apply.
    Conflict {
        current: u64,
    },
}

/// Where fair-use state and events live.
pub trait FairUseStore: Send + Sync + 'static {
    fn load(&self, uid: &str) -> FairUseFuture<VersionedState>;
    /// Write `state` and append `events` iff the stored version is still `expected_version`, atomically.
    fn commit(
        &self,
        uid: &str,
        expected_version: u64,
        state: &StageState,
        events: &[FairUseEvent],
    ) -> FairUseFuture<CommitOutcome>;
    /// Newest first.
    fn events(&self, uid: &str, limit: usize) -> FairUseFuture<Vec<FairUseEvent>>;
    /// The uid an event's case ref belongs to.
    fn find_case(&self, case_ref: &CaseRef) -> FairUseFuture<Option<String>>;
    /// Users whose stored stage is not none (optionally only `stage`), at most `limit`, sorted by uid.
    fn flagged(&self, stage: Option<Stage>, limit: usize) -> FairUseFuture<Vec<(String, Stage)>>;
    /// Add the STT ms charged on UTC day `day` (days since the epoch), given by the provider that took the
    /// audio: their sum goes to the day's counter (the budgets' count, kept two days) and each part to the
    /// user's per-provider ledger (kept [`STT_LEDGER_RETENTION_DAYS`]), in one atomic write; returns the
    /// day's new total.
    fn add_stt_ms(&self, uid: &str, day: u64, parts: SttParts<'_>) -> FairUseFuture<u64>;
    /// The user's ledger rows for UTC days `from..=to`, by day then provider.
    fn stt_ledger(&self, uid: &str, from: u64, to: u64) -> FairUseFuture<Vec<SttLedgerRow>>;
    /// Paid-STT ms forwarded on UTC day `day`.
    fn stt_ms(&self, uid: &str, day: u64) -> FairUseFuture<u64>;
    /// Add ms of audio sent to paid providers on UTC day `day`, all users together (the spend ceiling's
    /// count); returns the day's new total.
    fn add_spend_ms(&self, day: u64, ms: u64) -> FairUseFuture<u64>;
    /// The audio sent to paid providers on UTC day `day`, all users together.
    fn spend_ms(&self, day: u64) -> FairUseFuture<u64>;
    /// Keeps `session`, replacing the user's entry with the same id (an open session is rewritten as it
    /// goes; a re-uploaded file replaces its own), then forgets the user's sessions that ended more than
    /// [`SESSION_RETENTION_MS`] before `now_ms` and, past [`MAX_SESSIONS_PER_USER`], the oldest by end.
    fn record_session(&self, uid: &str, session: &SessionSummary, now_ms: u64)
    -> FairUseFuture<()>;
    /// The user's sessions that ended at or after `since_ms` (audio time), newest end first, at most
    /// `limit`.
    fn sessions(
        &self,
        uid: &str,
        since_ms: u64,
        limit: usize,
    ) -> FairUseFuture<Vec<SessionSummary>>;
    /// The usage thresholds told to the user (`daily:80`, …): keeps exactly `reached` (forgets the others,
    /// so a level the usage fell back under is told again on its next crossing) and answers those of
    /// `reached` not kept before, atomically (one session or node tells each crossing once).
    fn claim_thresholds(&self, uid: &str, reached: &[String]) -> FairUseFuture<Vec<String>>;
}

/// The classifier's per-user token lock: held for the cooldown after a success, released early on failure.
pub trait CooldownLock: Send + Sync + 'static {
    /// Take the lock for `hold_ms` from `now_ms` unless another token holds it past `now_ms`.
    fn try_acquire(&self, uid: &str, token: &str, now_ms: u64, hold_ms: u64)
    -> FairUseFuture<bool>;
    /// Compare-and-delete: release only if `token` still holds it. Returns whether it did.
    fn release(&self, uid: &str, token: &str) -> FairUseFuture<bool>;
}

/// In-memory state store (single node, not durable).
#[derive(Debug, Clone, Default)]
pub struct MemoryFairUseStore {
    inner: Arc<Mutex<MemoryInner>>,
}

#[derive(Debug, Default)]
struct MemoryInner {
    states: HashMap<String, VersionedState>,
    events: HashMap<String, Vec<FairUseEvent>>,
    cases: HashMap<CaseRef, String>,
    /// (uid, day) → STT ms; only today and yesterday are kept.
    stt: HashMap<(String, u64), u64>,
    /// uid → session evidence, oldest end first, bounded as the Redis store bounds it.
    sessions: HashMap<String, Vec<SessionSummary>>,
    /// Evidence writes since the last sweep of users whose every session left the retention.
    session_writes: u64,
    /// (uid, day, provider) → STT ms charged: the ledger, swept of days past its retention.
    ledger: std::collections::BTreeMap<(String, u64, String), u64>,
    /// Ledger writes since the last sweep.
    ledger_writes: u64,
    /// UTC day → ms sent to paid providers (only today and yesterday are kept).
    spend: HashMap<u64, u64>,
    /// uid → the usage thresholds told (at most 6 each; a user with none has no entry).
    thresholds: HashMap<String, std::collections::BTreeSet<String>>,
}

/// The memory store sweeps users without a session in the retention once per this many writes.
const SESSION_SWEEP_EVERY: u64 = 4_096;

impl MemoryFairUseStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, MemoryInner> {
        // A panic while holding this lock cannot leave the maps half-updated in a way later readers
        // would misread (every update is a whole-value insert), so a poisoned lock is safe to reuse.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl FairUseStore for MemoryFairUseStore {
    fn load(&self, uid: &str) -> FairUseFuture<VersionedState> {
        let v = self.lock().states.get(uid).cloned().unwrap_or_default();
        Box::pin(async move { Ok(v) })
    }

    fn commit(
        &self,
        uid: &str,
        expected_version: u64,
        state: &StageState,
        events: &[FairUseEvent],
    ) -> FairUseFuture<CommitOutcome> {
        let mut g = self.lock();
        let current = g.states.get(uid).map_or(0, |v| v.version);
        let outcome = if current == expected_version {
            let version = current + 1;
            g.states.insert(
                uid.to_owned(),
                VersionedState {
                    state: state.clone(),
                    version,
                },
            );
            for e in events {
                g.cases.insert(e.case_ref.clone(), uid.to_owned());
            }
            let list = g.events.entry(uid.to_owned()).or_default();
            list.extend(events.iter().cloned());
            if list.len() > MAX_EVENTS_PER_USER {
                let excess = list.len() - MAX_EVENTS_PER_USER;
                list.drain(..excess);
            }
            CommitOutcome::Committed { version }
        } else {
            CommitOutcome::Conflict { current }
        };
        Box::pin(async move { Ok(outcome) })
    }

    fn events(&self, uid: &str, limit: usize) -> FairUseFuture<Vec<FairUseEvent>> {
        let out: Vec<FairUseEvent> = self
            .lock()
            .events
            .get(uid)
            .map(|l| l.iter().rev().take(limit).cloned().collect())
            .unwrap_or_default();
        Box::pin(async move { Ok(out) })
    }

    fn find_case(&self, case_ref: &CaseRef) -> FairUseFuture<Option<String>> {
        let out = self.lock().cases.get(case_ref).cloned();
        Box::pin(async move { Ok(out) })
    }

    fn flagged(&self, stage: Option<Stage>, limit: usize) -> FairUseFuture<Vec<(String, Stage)>> {
        let mut out: Vec<(String, Stage)> = self
            .lock()
            .states
            .iter()
            .map(|(uid, v)| (uid.clone(), v.state.stage))
            .filter(|(_, s)| *s != Stage::None && stage.is_none_or(|want| want == *s))
            .collect();
        out.sort();
        out.truncate(limit);
        Box::pin(async move { Ok(out) })
    }

    fn add_stt_ms(&self, uid: &str, day: u64, parts: SttParts<'_>) -> FairUseFuture<u64> {
        let ms = stt_total(parts);
        let mut g = self.lock();
        g.stt.retain(|(_, d), _| d.saturating_add(1) >= day);
        let total = g.stt.entry((uid.to_owned(), day)).or_default();
        *total = total.saturating_add(ms);
        let total = *total;
        g.ledger_writes += 1;
        if g.ledger_writes.is_multiple_of(SESSION_SWEEP_EVERY) {
            g.ledger
                .retain(|(_, d, _), _| d.saturating_add(STT_LEDGER_RETENTION_DAYS) >= day);
        }
        for &(provider, part) in parts.iter().filter(|(_, ms)| *ms > 0) {
            let row = g
                .ledger
                .entry((uid.to_owned(), day, provider.to_owned()))
                .or_default();
            *row = row.saturating_add(part);
        }
        Box::pin(async move { Ok(total) })
    }

    fn stt_ledger(&self, uid: &str, from: u64, to: u64) -> FairUseFuture<Vec<SttLedgerRow>> {
        let rows: Vec<SttLedgerRow> = self
            .lock()
            .ledger
            .range((uid.to_owned(), from, String::new())..)
            .take_while(|((u, d, _), _)| u == uid && *d <= to)
            .map(|((_, day, provider), ms)| SttLedgerRow {
                day: *day,
                provider: provider.clone(),
                ms: *ms,
            })
            .collect();
        Box::pin(async move { Ok(rows) })
    }

    fn record_session(
        &self,
        uid: &str,
        session: &SessionSummary,
        now_ms: u64,
    ) -> FairUseFuture<()> {
        let cutoff = now_ms.saturating_sub(SESSION_RETENTION_MS);
        let mut g = self.lock();
        g.session_writes += 1;
        if g.session_writes.is_multiple_of(SESSION_SWEEP_EVERY) {
            g.sessions
                .retain(|_, list| list.last().is_some_and(|s| s.ended_at_ms >= cutoff));
        }
        let list = g.sessions.entry(uid.to_owned()).or_default();
        list.retain(|s| s.id != session.id && s.ended_at_ms >= cutoff);
        if session.ended_at_ms >= cutoff {
            let at = list.partition_point(|s| s.ended_at_ms <= session.ended_at_ms);
            list.insert(at, session.clone());
        }
        if list.len() > MAX_SESSIONS_PER_USER {
            let excess = list.len() - MAX_SESSIONS_PER_USER;
            list.drain(..excess);
        }
        if list.is_empty() {
            g.sessions.remove(uid);
        }
        Box::pin(async { Ok(()) })
    }

    fn sessions(
        &self,
        uid: &str,
        since_ms: u64,
        limit: usize,
    ) -> FairUseFuture<Vec<SessionSummary>> {
        let out: Vec<SessionSummary> = self
            .lock()
            .sessions
            .get(uid)
            .map(|l| {
                l.iter()
                    .rev()
                    .take_while(|s| s.ended_at_ms >= since_ms)
                    .take(limit)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        Box::pin(async move { Ok(out) })
    }

    fn add_spend_ms(&self, day: u64, ms: u64) -> FairUseFuture<u64> {
        let mut g = self.lock();
        g.spend.retain(|d, _| d.saturating_add(1) >= day);
        let total = g.spend.entry(day).or_default();
        *total = total.saturating_add(ms);
        let total = *total;
        Box::pin(async move { Ok(total) })
    }

    fn spend_ms(&self, day: u64) -> FairUseFuture<u64> {
        let used = self.lock().spend.get(&day).copied().unwrap_or(0);
        Box::pin(async move { Ok(used) })
    }

    fn claim_thresholds(&self, uid: &str, reached: &[String]) -> FairUseFuture<Vec<String>> {
        let mut g = self.lock();
        let told = g.thresholds.remove(uid).unwrap_or_default();
        let new: Vec<String> = reached
            .iter()
            .filter(|k| !told.contains(*k))
            .cloned()
            .collect();
        if !reached.is_empty() {
            g.thresholds
                .insert(uid.to_owned(), reached.iter().cloned().collect());
        }
        Box::pin(async move { Ok(new) })
    }

    fn stt_ms(&self, uid: &str, day: u64) -> FairUseFuture<u64> {
        let used = self
            .lock()
            .stt
            .get(&(uid.to_owned(), day))
            .copied()
            .unwrap_or(0);
        Box::pin(async move { Ok(used) })
    }
}

/// In-memory cooldown lock (single node).
#[derive(Debug, Clone, Default)]
pub struct MemoryCooldownLock {
    held: Arc<Mutex<HashMap<String, (String, u64)>>>,
}

impl MemoryCooldownLock {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, (String, u64)>> {
        // Whole-value inserts/removes only: a poisoned lock holds a consistent map.
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The token holding `uid`'s lock at `now_ms`, if any (tests and admin views).
    pub fn holder(&self, uid: &str, now_ms: u64) -> Option<String> {
        self.lock()
            .get(uid)
            .filter(|(_, until)| *until > now_ms)
            .map(|(t, _)| t.clone())
    }
}

impl CooldownLock for MemoryCooldownLock {
    fn try_acquire(
        &self,
        uid: &str,
        token: &str,
        now_ms: u64,
        hold_ms: u64,
    ) -> FairUseFuture<bool> {
        let mut g = self.lock();
        let free = g.get(uid).is_none_or(|(_, until)| *until <= now_ms);
        if free {
            g.insert(
                uid.to_owned(),
                (token.to_owned(), now_ms.saturating_add(hold_ms)),
            );
        }
        Box::pin(async move { Ok(free) })
    }

    fn release(&self, uid: &str, token: &str) -> FairUseFuture<bool> {
        let mut g = self.lock();
        let ours = g.get(uid).is_some_and(|(t, _)| t == token);
        if ours {
            g.remove(uid);
        }
        Box::pin(async move { Ok(ours) })
    }
}

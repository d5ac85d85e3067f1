//! The in-memory store: the embedded default (single node, not durable), with the exact semantics of
//! the Redis script. Tests can make it unavailable to simulate an outage.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use futures_util::future::{BoxFuture, FutureExt};

use super::{
    ApplyOutcome, ApplyResults, Batch, Delta, Store, StoreError, StoreTime, UserSnapshot, WriterId,
};
use crate::time::{Minute, MonthKey};

#[derive(Debug, Default, Clone)]
pub(crate) struct UserState {
    pub(crate) buckets: BTreeMap<Minute, u64>,
    pub(crate) months: BTreeMap<MonthKey, u64>,
    /// writer → (highest applied seq, unix ms of that apply)
    pub(crate) writers: HashMap<u128, (u64, u64)>,
    /// idempotency key → unix ms it was metered
    pub(crate) keys: HashMap<String, u64>,
}

impl UserState {
    fn prune(&mut self, at: StoreTime) {
        let first = at.first_kept_minute();
        self.buckets = self.buckets.split_off(&first);
        let first_month = at.first_kept_month();
        self.months = self.months.split_off(&first_month);
        let cutoff = at.now_ms.saturating_sub(at.retention_ms);
        self.writers.retain(|_, &mut (_, seen)| seen >= cutoff);
        let keys_cutoff = at.keys_cutoff_ms();
        self.keys.retain(|_, &mut claimed| claimed >= keys_cutoff);
    }

    fn add(&mut self, delta: &Delta, first_kept: Minute) {
        for &(minute, ms) in &delta.buckets {
            if minute >= first_kept {
                *self.buckets.entry(minute).or_default() += ms;
            }
        }
        for &(month, ms) in &delta.months {
            *self.months.entry(month).or_default() += ms;
        }
    }

    /// The script's semantics, step for step (see `meter_apply.lua`).
    pub(crate) fn apply(&mut self, batch: &Batch, at: StoreTime) -> ApplyOutcome {
        if self
            .writers
            .get(&batch.writer.0)
            .is_some_and(|&(seq, _)| batch.seq <= seq)
        {
            return ApplyOutcome::Duplicate;
        }
        self.prune(at);
        let first_kept = at.first_kept_minute();
        self.add(&batch.plain, first_kept);
        let mut rejected_keys = Vec::new();
        for keyed in &batch.keyed {
            if self.keys.contains_key(&keyed.key) {
                rejected_keys.push(keyed.key.clone());
            } else {
                self.keys.insert(keyed.key.clone(), at.now_ms);
                self.add(&keyed.delta, first_kept);
            }
        }
        self.writers.insert(batch.writer.0, (batch.seq, at.now_ms));
        ApplyOutcome::Applied { rejected_keys }
    }

    pub(crate) fn snapshot(&self, writer: WriterId, at: StoreTime) -> UserSnapshot {
        let first = at.first_kept_minute();
        let cutoff = at.keys_cutoff_ms();
        let mut idempotency_keys: Vec<(String, u64)> = self
            .keys
            .iter()
            .filter(|&(_, &t)| t >= cutoff)
            .map(|(k, &t)| (k.clone(), t))
            .collect();
        idempotency_keys.sort();
        UserSnapshot {
            buckets: self
                .buckets
                .range(first..)
                .map(|(&m, &ms)| (m, ms))
                .collect(),
            months: self.months.iter().map(|(&m, &ms)| (m, ms)).collect(),
            idempotency_keys,
            writer_seq: self.writers.get(&writer.0).map_or(0, |&(seq, _)| seq),
        }
    }
}

/// In-memory [`Store`].
#[derive(Debug, Default)]
pub struct MemoryStore {
    users: Mutex<HashMap<String, UserState>>,
    unavailable: AtomicBool,
    applies: AtomicU64,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Simulates an outage: while set, every call fails with [`StoreError::Unavailable`].
    pub fn set_unavailable(&self, down: bool) {
        self.unavailable.store(down, Ordering::SeqCst);
    }

    /// Batches applied or deduplicated so far (one per user per flush: the "script calls").
    pub fn apply_calls(&self) -> u64 {
        self.applies.load(Ordering::SeqCst)
    }

    /// A user's state as of `at` (tests).
    pub fn snapshot(&self, uid: &str, at: StoreTime) -> UserSnapshot {
        let users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        users
            .get(uid)
            .map(|u| u.snapshot(WriterId(0), at))
            .unwrap_or_default()
    }

    fn check_up(&self) -> Result<(), StoreError> {
        if self.unavailable.load(Ordering::SeqCst) {
            Err(StoreError::Unavailable(
                "memory store set unavailable".into(),
            ))
        } else {
            Ok(())
        }
    }
}

impl Store for MemoryStore {
    fn load<'a>(
        &'a self,
        uid: &'a str,
        writer: WriterId,
        at: StoreTime,
    ) -> BoxFuture<'a, Result<UserSnapshot, StoreError>> {
        let result = self.check_up().map(|()| {
            let users = self.users.lock().unwrap_or_else(|e| e.into_inner());
            users
                .get(uid)
                .map(|u| u.snapshot(writer, at))
                .unwrap_or_default()
        });
        async move { result }.boxed()
    }

    fn apply<'a>(
        &'a self,
        batches: &'a [Batch],
        at: StoreTime,
    ) -> BoxFuture<'a, Result<ApplyResults, StoreError>> {
        let result = self.check_up().map(|()| {
            let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
            self.applies
                .fetch_add(batches.len() as u64, Ordering::SeqCst);
            batches
                .iter()
                .map(|b| Ok(users.entry(b.uid.to_string()).or_default().apply(b, at)))
                .collect()
        });
        async move { result }.boxed()
    }

    fn kind(&self) -> &'static str {
        "memory"
    }
}

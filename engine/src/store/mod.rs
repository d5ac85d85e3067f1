//! Durable per-user state behind one trait.
//!
//! - [`Store`]: what the meter needs (load a user's base, apply idempotent batches), async and `now`-driven.
//! - [`RedisStore`]: the production store; one Lua script call per user batch (`redis_store`).
//! - [`MemoryStore`]: the embedded default, same semantics, no durability.
//! - [`lease`]: the one lease primitive (slots of a per-user or per-job limit, with an expiry).
//! - [`keys`]: every Redis key name, each carrying the `{uid}` hash tag.

pub mod backfill;
pub mod connection;
pub mod fair_use;
pub mod fair_use_redis;
pub mod keys;
pub mod lease;
mod memory;
pub mod plans;
mod redis_store;
mod replicas;
pub mod sync_jobs;
pub mod sync_jobs_redis;
#[cfg(any(test, feature = "test-util"))]
pub mod test_redis;
#[cfg(any(test, feature = "test-util"))]
pub mod testing;

use std::sync::Arc;

use futures_util::future::BoxFuture;

use crate::time::{Minute, MonthKey};

pub use memory::MemoryStore;
pub use redis_store::{RedisStore, RedisStoreConfig};
pub use replicas::{ReplicaCheckError, check_replicas};

/// Identity of one meter actor incarnation: drawn at random (128 bits) when the actor starts.
/// The store remembers each writer's highest applied sequence, which makes retries no-ops.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WriterId(pub u128);

impl WriterId {
    /// A fresh random writer id.
    pub fn random() -> Self {
        Self(rand::random::<u128>())
    }

    /// 32 lower-case hex digits (the form stored in Redis).
    pub fn to_hex(self) -> String {
        format!("{:032x}", self.0)
    }
}

/// Speech ms to add, per minute bucket and per month of arrival. Both lists are sorted by key and
/// hold each key once.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Delta {
    pub buckets: Vec<(Minute, u64)>,
    pub months: Vec<(MonthKey, u64)>,
}

impl Delta {
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty() && self.months.is_empty()
    }

    /// Total ms over the buckets (equal to the total over the months for a delta built by the meter).
    pub fn bucket_ms(&self) -> u64 {
        self.buckets.iter().map(|&(_, ms)| ms).sum()
    }
}

/// A delta that must be applied at most once per user, keyed by an idempotency key (e.g. a sync file's
/// content hash).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyedDelta {
    pub key: String,
    pub delta: Delta,
}

/// One write-behind batch of one user: applied atomically, at most once per `(writer, seq)`.
#[derive(Clone, Debug)]
pub struct Batch {
    pub uid: Arc<str>,
    pub writer: WriterId,
    /// 1, 2, 3, … per writer; batch `n + 1` is only sent after batch `n` was acknowledged.
    pub seq: u64,
    pub plain: Delta,
    pub keyed: Vec<KeyedDelta>,
}

impl Batch {
    /// Speech ms carried by the batch (plain and keyed).
    pub fn speech_ms(&self) -> u64 {
        self.plain.bucket_ms() + self.keyed.iter().map(|k| k.delta.bucket_ms()).sum::<u64>()
    }
}

/// What the store did with one batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApplyOutcome {
    /// Applied now. The keyed deltas whose key the store had already metered were skipped.
    Applied { rejected_keys: Vec<String> },
    /// This `(writer, seq)` (or a later one) had already been applied: nothing changed.
    Duplicate,
}

/// A user's durable metering state as of `now` (buckets inside the retention only).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UserSnapshot {
    /// Sorted by minute.
    pub buckets: Vec<(Minute, u64)>,
    /// Sorted by month.
    pub months: Vec<(MonthKey, u64)>,
    /// Idempotency keys metered within the retention, with the ms time the store claimed them.
    pub idempotency_keys: Vec<(String, u64)>,
    /// The highest sequence applied for the writer asked about (0 when none).
    pub writer_seq: u64,
}

/// The time frame of a store call: every pruning and retention decision uses these, never a clock read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreTime {
    /// Unix ms.
    pub now_ms: u64,
    /// Buckets and writer sequences older than this are pruned.
    pub retention_ms: u64,
    /// Idempotency keys (sync files' content hashes) older than this are pruned: at least the backfill
    /// lookback plus 2 days (DESIGN §3), so a re-upload of any admissible recording is never metered twice.
    /// Never below `retention_ms`.
    pub keys_retention_ms: u64,
}

impl StoreTime {
    /// The first minute kept: a bucket is pruned when its start is before `now - retention`.
    pub fn first_kept_minute(&self) -> Minute {
        let cutoff = self.now_ms.saturating_sub(self.retention_ms);
        cutoff.div_ceil(60_000) as Minute
    }

    /// Idempotency keys claimed before this (unix ms) are pruned.
    pub fn keys_cutoff_ms(&self) -> u64 {
        self.now_ms
            .saturating_sub(self.keys_retention_ms.max(self.retention_ms))
    }

    /// The first month kept (the month before the current one): older month totals are pruned.
    pub fn first_kept_month(&self) -> MonthKey {
        let current = crate::time::month_of_ms(self.now_ms);
        crate::time::previous_month(current)
    }
}

/// Errors of a store call. A `StoreError` never means "partly applied": batches are atomic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("store call timed out")]
    Timeout,
    #[error("store script failed: {0}")]
    Script(String),
    #[error("store returned an unexpected reply: {0}")]
    Protocol(String),
    /// The write ran on the master, but fewer replicas than `VOICEGATE_REDIS_WAIT_REPLICAS` acknowledged it.
    #[error(
        "{acked} of {wanted} replicas acknowledged the write within {timeout_ms} ms (VOICEGATE_REDIS_WAIT_REPLICAS)"
    )]
    NotReplicated {
        acked: u32,
        wanted: u32,
        timeout_ms: u64,
    },
    /// The write ran on the master, which the node knows has fewer healthy replicas than
    /// `VOICEGATE_REDIS_WAIT_REPLICAS`: no `WAIT` was sent (it would hold the connection for its timeout).
    #[error(
        "the master of the write has {replicas} healthy replicas, fewer than VOICEGATE_REDIS_WAIT_REPLICAS={wanted}: not acknowledged, not waited for"
    )]
    TooFewReplicas { replicas: u32, wanted: u32 },
}

impl StoreError {
    /// A low-cardinality word for metric labels.
    pub fn reason(&self) -> &'static str {
        match self {
            StoreError::Unavailable(_) => "unavailable",
            StoreError::Timeout => "timeout",
            StoreError::Script(_) => "script",
            StoreError::Protocol(_) => "protocol",
            StoreError::NotReplicated { .. } | StoreError::TooFewReplicas { .. } => {
                "not_replicated"
            }
        }
    }
}

/// Per-batch results of one `apply` call, in the order of the batches.
pub type ApplyResults = Vec<Result<ApplyOutcome, StoreError>>;

/// Durable metering state. Implementations must make `apply` atomic per batch and idempotent per
/// `(uid, writer, seq)`, and skip keyed deltas whose key was already metered within the retention.
pub trait Store: Send + Sync + 'static {
    /// Loads a user's buckets (inside the retention), month totals, remembered idempotency keys and the
    /// highest sequence applied for `writer`, in one consistent snapshot.
    fn load<'a>(
        &'a self,
        uid: &'a str,
        writer: WriterId,
        at: StoreTime,
    ) -> BoxFuture<'a, Result<UserSnapshot, StoreError>>;

    /// Applies batches (of any users, at most one per user) and prunes what fell out of the retention.
    /// `Err` means no result is known for any batch (for example the connection failed); each batch
    /// may or may not have been applied, and a retry with the same `(writer, seq)` is safe.
    fn apply<'a>(
        &'a self,
        batches: &'a [Batch],
        at: StoreTime,
    ) -> BoxFuture<'a, Result<ApplyResults, StoreError>>;

    /// A short name for logs ("redis", "memory").
    fn kind(&self) -> &'static str;

    /// True when a batch counts as written only once replicas acknowledged it
    /// (`VOICEGATE_REDIS_WAIT_REPLICAS`): then a snapshot that holds a batch is not its acknowledgement
    /// (the master has it, its replicas may not), and the batch is kept until an `apply` acknowledges it.
    fn acknowledges_replicas(&self) -> bool {
        false
    }
}

impl<S: Store + ?Sized> Store for Arc<S> {
    fn load<'a>(
        &'a self,
        uid: &'a str,
        writer: WriterId,
        at: StoreTime,
    ) -> BoxFuture<'a, Result<UserSnapshot, StoreError>> {
        (**self).load(uid, writer, at)
    }

    fn apply<'a>(
        &'a self,
        batches: &'a [Batch],
        at: StoreTime,
    ) -> BoxFuture<'a, Result<ApplyResults, StoreError>> {
        (**self).apply(batches, at)
    }

    fn kind(&self) -> &'static str {
        (**self).kind()
    }

    fn acknowledges_replicas(&self) -> bool {
        (**self).acknowledges_replicas()
    }
}

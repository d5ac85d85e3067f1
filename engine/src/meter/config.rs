//! Metering configuration: every default in one place, with its environment variable next to it.

use std::time::Duration;

use crate::time::{Backoff, MS_PER_DAY};

/// Settings of the meter (actors, write-behind, retention). `Default` gives the production defaults;
/// [`MeterConfig::from_env`] overrides them from `VOICEGATE_*` variables.
#[derive(Clone, Debug)]
pub struct MeterConfig {
    /// How often dirty actors are flushed to the store. `VOICEGATE_METER_FLUSH_INTERVAL_MS`, default 1000.
    pub flush_interval: Duration,
    /// Longest wait between retries of a failed flush (jittered [`Backoff`](crate::time::Backoff) from `flush_interval`).
    /// `VOICEGATE_METER_FLUSH_MAX_BACKOFF_MS`, default 5000.
    pub flush_max_backoff: Duration,
    /// An actor with no message for this long is flushed and stopped. `VOICEGATE_METER_IDLE_PASSIVATION_S`,
    /// default 900 (15 min).
    pub idle_passivation: Duration,
    /// How often an active actor reloads its base from the store (other writers' speech).
    /// `VOICEGATE_METER_REFRESH_INTERVAL_S`, default 30.
    pub refresh_interval: Duration,
    /// Longest an actor waits for its first hydration before answering with totals marked unknown.
    /// `VOICEGATE_METER_HYDRATE_TIMEOUT_MS`, default 500.
    pub hydrate_timeout: Duration,
    /// Longest wait for one store call (a pipeline of batches, or one load) before it counts as failed.
    /// `VOICEGATE_METER_STORE_TIMEOUT_MS`, default 2000.
    pub store_timeout: Duration,
    /// Pending entries (distinct minute buckets plus keyed records) one actor may hold before it drops
    /// records (counted, logged). `VOICEGATE_METER_MAX_PENDING_PER_USER`, default 20000.
    pub max_pending_per_user: usize,
    /// Pending entries all actors together may hold. `VOICEGATE_METER_MAX_PENDING_TOTAL`, default 5000000.
    pub max_pending_total: usize,
    /// Most user batches in one Redis pipeline. `VOICEGATE_METER_MAX_PIPELINE`, default 1000.
    pub max_pipeline: usize,
    /// Buckets, writer sequences and idempotency keys are kept this long. `VOICEGATE_METER_RETENTION_S`,
    /// default 691200 (8 days).
    pub retention: Duration,
    /// Arbiter threads the actors are sharded over; 0 runs every actor on the arbiter that started the
    /// meter (tests on virtual time). `VOICEGATE_METER_SHARDS`, default = available CPUs.
    pub shards: usize,
}

impl Default for MeterConfig {
    fn default() -> Self {
        Self {
            flush_interval: Duration::from_millis(1000),
            flush_max_backoff: Duration::from_millis(5000),
            idle_passivation: Duration::from_secs(15 * 60),
            refresh_interval: Duration::from_secs(30),
            hydrate_timeout: Duration::from_millis(500),
            store_timeout: Duration::from_millis(2000),
            max_pending_per_user: 20_000,
            max_pending_total: 5_000_000,
            max_pipeline: 1000,
            retention: Duration::from_millis(8 * MS_PER_DAY),
            shards: std::thread::available_parallelism().map_or(2, |n| n.get()),
        }
    }
}

/// An environment variable was set to something that is not a non-negative integer.
#[derive(Debug, thiserror::Error)]
#[error("{name} must be a non-negative integer, got {value:?}")]
pub struct ConfigError {
    pub name: &'static str,
    pub value: String,
}

impl MeterConfig {
    /// The defaults, overridden by any `VOICEGATE_METER_*` variable that is set.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Like [`from_env`](Self::from_env) with an explicit lookup (tests).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let mut c = Self::default();
        let num = |name: &'static str| -> Result<Option<u64>, ConfigError> {
            match lookup(name) {
                None => Ok(None),
                Some(v) => v
                    .trim()
                    .parse()
                    .map(Some)
                    .map_err(|_| ConfigError { name, value: v }),
            }
        };
        let ms = |name| num(name).map(|v| v.map(Duration::from_millis));
        let secs = |name| num(name).map(|v| v.map(Duration::from_secs));
        if let Some(v) = ms("VOICEGATE_METER_FLUSH_INTERVAL_MS")? {
            c.flush_interval = v;
        }
        if let Some(v) = ms("VOICEGATE_METER_FLUSH_MAX_BACKOFF_MS")? {
            c.flush_max_backoff = v;
        }
        if let Some(v) = secs("VOICEGATE_METER_IDLE_PASSIVATION_S")? {
            c.idle_passivation = v;
        }
        if let Some(v) = secs("VOICEGATE_METER_REFRESH_INTERVAL_S")? {
            c.refresh_interval = v;
        }
        if let Some(v) = ms("VOICEGATE_METER_HYDRATE_TIMEOUT_MS")? {
            c.hydrate_timeout = v;
        }
        if let Some(v) = ms("VOICEGATE_METER_STORE_TIMEOUT_MS")? {
            c.store_timeout = v;
        }
        if let Some(v) = num("VOICEGATE_METER_MAX_PENDING_PER_USER")? {
            c.max_pending_per_user = v as usize;
        }
        if let Some(v) = num("VOICEGATE_METER_MAX_PENDING_TOTAL")? {
            c.max_pending_total = v as usize;
        }
        if let Some(v) = num("VOICEGATE_METER_MAX_PIPELINE")? {
            c.max_pipeline = (v as usize).max(1);
        }
        if let Some(v) = secs("VOICEGATE_METER_RETENTION_S")? {
            c.retention = v;
        }
        if let Some(v) = num("VOICEGATE_METER_SHARDS")? {
            c.shards = v as usize;
        }
        Ok(c)
    }

    pub(crate) fn retention_ms(&self) -> u64 {
        self.retention.as_millis() as u64
    }

    /// How often an actor checks idleness, refresh and retirement.
    pub(crate) fn actor_tick(&self) -> Duration {
        (self.idle_passivation.min(self.refresh_interval) / 3).max(Duration::from_millis(10))
    }

    /// The backoff of a failed flush or hydration: from `flush_interval` (at least 10 ms), jittered,
    /// capped at `flush_max_backoff`.
    pub(crate) fn backoff(&self) -> Backoff {
        Backoff::new(
            self.flush_interval.max(Duration::from_millis(10)),
            self.flush_max_backoff,
        )
    }
}

//! Metering configuration: [`MeterArgs`] (flags, environment variables and defaults, in one place) and the
//! [`MeterConfig`] the meter runs with.

use std::time::Duration;

use crate::config::{self, ConfigError, ordered, positive};
use crate::meter::window::WINDOWS_MS;
use crate::time::Backoff;

/// Settings of the meter (actors, write-behind, retention), as the meter uses them. `Default` gives the
/// production defaults; [`MeterArgs::config`] builds one from the command line and environment.
#[derive(Clone, Debug)]
pub struct MeterConfig {
    /// How often dirty actors are flushed to the store. `VOICEGATE_METER_FLUSH_INTERVAL_MS`.
    pub flush_interval: Duration,
    /// Longest wait between retries of a failed flush (jittered [`Backoff`] from `flush_interval`).
    /// `VOICEGATE_METER_FLUSH_MAX_BACKOFF_MS`.
    pub flush_max_backoff: Duration,
    /// An actor with no message for this long is flushed and stopped. `VOICEGATE_METER_IDLE_PASSIVATION_S`.
    pub idle_passivation: Duration,
    /// How often an active actor reloads its base from the store (other writers' speech).
    /// `VOICEGATE_METER_REFRESH_INTERVAL_S`.
    pub refresh_interval: Duration,
    /// Longest an actor waits for its first hydration before answering with totals marked unknown.
    /// `VOICEGATE_METER_HYDRATE_TIMEOUT_MS`.
    pub hydrate_timeout: Duration,
    /// Longest wait for one store call (a pipeline of batches, or one load) before it counts as failed.
    /// `VOICEGATE_METER_STORE_TIMEOUT_MS`.
    pub store_timeout: Duration,
    /// Pending entries (distinct minute buckets plus keyed records) one actor may hold before it drops
    /// records (counted, logged). `VOICEGATE_METER_MAX_PENDING_PER_USER`.
    pub max_pending_per_user: usize,
    /// Pending entries all actors together may hold. `VOICEGATE_METER_MAX_PENDING_TOTAL`.
    pub max_pending_total: usize,
    /// Most user batches in one Redis pipeline. `VOICEGATE_METER_MAX_PIPELINE`.
    pub max_pipeline: usize,
    /// Buckets and writer sequences are kept this long. `VOICEGATE_METER_RETENTION_S`.
    pub retention: Duration,
    /// Idempotency keys (sync files' content hashes) are kept this long, at least `retention`: the backfill
    /// lookback plus 2 days (DESIGN §3), set by the server from `VOICEGATE_BACKFILL_LOOKBACK_DAYS`
    /// (default [`defaults::KEYS_RETENTION_S`]).
    pub keys_retention: Duration,
    /// Arbiter threads the actors are sharded over; 0 runs every actor on the arbiter that started the
    /// meter (tests on virtual time). `VOICEGATE_METER_SHARDS`.
    pub shards: usize,
}

impl Default for MeterConfig {
    fn default() -> Self {
        MeterArgs::default().build()
    }
}

/// The meter's settings as an operator writes them (the units are in the names), a clap `Args` that
/// `voicegate serve` flattens into its configuration. [`MeterArgs::config`] checks them and builds the
/// [`MeterConfig`].
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
#[command(next_help_heading = "Metering")]
pub struct MeterArgs {
    /// How often dirty meter actors are flushed to the store, in ms.
    #[arg(long = "meter-flush-interval-ms", env = "VOICEGATE_METER_FLUSH_INTERVAL_MS",
          default_value_t = defaults::FLUSH_INTERVAL_MS, value_parser = config::count())]
    pub flush_interval_ms: u64,
    /// Longest wait between retries of a failed flush, in ms (a jittered backoff that doubles from the flush interval).
    #[arg(long = "meter-flush-max-backoff-ms", env = "VOICEGATE_METER_FLUSH_MAX_BACKOFF_MS",
          default_value_t = defaults::FLUSH_MAX_BACKOFF_MS, value_parser = config::count())]
    pub flush_max_backoff_ms: u64,
    /// A meter actor with no message for this long (s) is flushed and stopped.
    #[arg(long = "meter-idle-passivation-s", env = "VOICEGATE_METER_IDLE_PASSIVATION_S",
          default_value_t = defaults::IDLE_PASSIVATION_S, value_parser = config::count())]
    pub idle_passivation_s: u64,
    /// How often (s) an active meter actor reloads its base from the store (other writers' speech).
    #[arg(long = "meter-refresh-interval-s", env = "VOICEGATE_METER_REFRESH_INTERVAL_S",
          default_value_t = defaults::REFRESH_INTERVAL_S, value_parser = config::count())]
    pub refresh_interval_s: u64,
    /// Longest a meter actor waits for its first load (ms) before answering with totals marked unknown.
    #[arg(long = "meter-hydrate-timeout-ms", env = "VOICEGATE_METER_HYDRATE_TIMEOUT_MS",
          default_value_t = defaults::HYDRATE_TIMEOUT_MS, value_parser = config::count())]
    pub hydrate_timeout_ms: u64,
    /// Longest wait (ms) for one store call (a pipeline of batches, or one load) before it counts as failed.
    #[arg(long = "meter-store-timeout-ms", env = "VOICEGATE_METER_STORE_TIMEOUT_MS",
          default_value_t = defaults::STORE_TIMEOUT_MS, value_parser = config::count())]
    pub store_timeout_ms: u64,
    /// Pending entries (minute buckets plus keyed records) one user's meter may hold before it drops records (counted, logged).
    #[arg(long = "meter-max-pending-per-user", env = "VOICEGATE_METER_MAX_PENDING_PER_USER",
          default_value_t = defaults::MAX_PENDING_PER_USER, value_parser = config::count_usize())]
    pub max_pending_per_user: usize,
    /// Pending entries all meter actors together may hold.
    #[arg(long = "meter-max-pending-total", env = "VOICEGATE_METER_MAX_PENDING_TOTAL",
          default_value_t = defaults::MAX_PENDING_TOTAL, value_parser = config::count_usize())]
    pub max_pending_total: usize,
    /// Most user batches in one Redis pipeline.
    #[arg(long = "meter-max-pipeline", env = "VOICEGATE_METER_MAX_PIPELINE",
          default_value_t = defaults::MAX_PIPELINE, value_parser = config::count_usize())]
    pub max_pipeline: usize,
    /// Minute buckets, writer sequences and idempotency keys are kept this long (s); at least the 168 h window.
    #[arg(long = "meter-retention-s", env = "VOICEGATE_METER_RETENTION_S",
          default_value_t = defaults::RETENTION_S, value_parser = config::count())]
    pub retention_s: u64,
    /// Threads the meter actors are sharded over; 0 runs them on the thread that started the meter (tests). Unset: one per CPU.
    #[arg(long = "meter-shards", env = "VOICEGATE_METER_SHARDS", value_parser = config::count_usize())]
    pub shards: Option<usize>,
}

/// Every default of the meter, in one place.
pub mod defaults {
    pub const FLUSH_INTERVAL_MS: u64 = 1000;
    pub const FLUSH_MAX_BACKOFF_MS: u64 = 5000;
    /// 15 min.
    pub const IDLE_PASSIVATION_S: u64 = 15 * 60;
    pub const REFRESH_INTERVAL_S: u64 = 30;
    pub const HYDRATE_TIMEOUT_MS: u64 = 500;
    pub const STORE_TIMEOUT_MS: u64 = 2000;
    pub const MAX_PENDING_PER_USER: usize = 20_000;
    pub const MAX_PENDING_TOTAL: usize = 5_000_000;
    pub const MAX_PIPELINE: usize = 1000;
    /// 8 days: the 168 h window and a day of margin.
    pub const RETENTION_S: u64 = 8 * 86_400;
    /// The default backfill lookback (30 days) plus 2 days.
    pub const KEYS_RETENTION_S: u64 = 32 * 86_400;
}

impl Default for MeterArgs {
    fn default() -> Self {
        MeterArgs {
            flush_interval_ms: defaults::FLUSH_INTERVAL_MS,
            flush_max_backoff_ms: defaults::FLUSH_MAX_BACKOFF_MS,
            idle_passivation_s: defaults::IDLE_PASSIVATION_S,
            refresh_interval_s: defaults::REFRESH_INTERVAL_S,
            hydrate_timeout_ms: defaults::HYDRATE_TIMEOUT_MS,
            store_timeout_ms: defaults::STORE_TIMEOUT_MS,
            max_pending_per_user: defaults::MAX_PENDING_PER_USER,
            max_pending_total: defaults::MAX_PENDING_TOTAL,
            max_pipeline: defaults::MAX_PIPELINE,
            retention_s: defaults::RETENTION_S,
            shards: None,
        }
    }
}

impl MeterArgs {
    /// The meter's configuration, or the first impossible setting: a zero interval, timeout or bound, a
    /// backoff below the flush interval, a per-user bound above the total, a retention shorter than the
    /// longest rolling window.
    pub fn config(&self) -> Result<MeterConfig, ConfigError> {
        const FLUSH: &str = "VOICEGATE_METER_FLUSH_INTERVAL_MS";
        const PER_USER: &str = "VOICEGATE_METER_MAX_PENDING_PER_USER";
        positive(FLUSH, self.flush_interval_ms)?;
        positive(
            "VOICEGATE_METER_IDLE_PASSIVATION_S",
            self.idle_passivation_s,
        )?;
        positive(
            "VOICEGATE_METER_REFRESH_INTERVAL_S",
            self.refresh_interval_s,
        )?;
        positive("VOICEGATE_METER_STORE_TIMEOUT_MS", self.store_timeout_ms)?;
        positive(PER_USER, self.max_pending_per_user as u64)?;
        positive("VOICEGATE_METER_MAX_PIPELINE", self.max_pipeline as u64)?;
        ordered(
            (FLUSH, self.flush_interval_ms),
            (
                "VOICEGATE_METER_FLUSH_MAX_BACKOFF_MS",
                self.flush_max_backoff_ms,
            ),
        )?;
        ordered(
            (PER_USER, self.max_pending_per_user as u64),
            (
                "VOICEGATE_METER_MAX_PENDING_TOTAL",
                self.max_pending_total as u64,
            ),
        )?;
        let longest_window_s = WINDOWS_MS[WINDOWS_MS.len() - 1] / 1000;
        ordered(
            ("the longest rolling window in s", longest_window_s),
            ("VOICEGATE_METER_RETENTION_S", self.retention_s),
        )?;
        Ok(self.build())
    }

    /// The configuration, unchecked.
    fn build(&self) -> MeterConfig {
        MeterConfig {
            flush_interval: Duration::from_millis(self.flush_interval_ms),
            flush_max_backoff: Duration::from_millis(self.flush_max_backoff_ms),
            idle_passivation: Duration::from_secs(self.idle_passivation_s),
            refresh_interval: Duration::from_secs(self.refresh_interval_s),
            hydrate_timeout: Duration::from_millis(self.hydrate_timeout_ms),
            store_timeout: Duration::from_millis(self.store_timeout_ms),
            max_pending_per_user: self.max_pending_per_user,
            max_pending_total: self.max_pending_total,
            max_pipeline: self.max_pipeline,
            retention: Duration::from_secs(self.retention_s),
            keys_retention: Duration::from_secs(defaults::KEYS_RETENTION_S.max(self.retention_s)),
            shards: self.shards.unwrap_or_else(available_cpus),
        }
    }
}

fn available_cpus() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

impl MeterConfig {
    pub(crate) fn retention_ms(&self) -> u64 {
        self.retention.as_millis() as u64
    }

    /// How long idempotency keys are kept, in ms (never below the retention).
    pub(crate) fn keys_retention_ms(&self) -> u64 {
        self.keys_retention.max(self.retention).as_millis() as u64
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

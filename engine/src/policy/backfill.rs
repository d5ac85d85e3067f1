//! Backfill: the one decision about backdated sync speech (DESIGN §3 "Backfill"), pure.
//!
//! A sync file is **fresh** when recorded within [`BackfillConfig::fresh_ms`] (24 h) of its arrival, else
//! **backfill**; a recording older than [`BackfillConfig::lookback_ms`] (30 days) is refused
//! (`recording_too_old`, final). Fresh speech meets the rolling-window caps as any speech does. Backfill
//! speech also lands in its recording minute, **and** counts, at arrival, against a per-user allowance per
//! UTC day ([`BackfillConfig::allowance_ms`], 4 speech-hours): past it, the file waits for the next UTC day
//! (`backfill_allowance_exhausted`, retryable, `Retry-After` to the next UTC midnight). The ledger of what a
//! user used today is [`crate::store::backfill`]. Invariant: whatever the file names, per UTC day a user gets
//! at most the allowance of backdated speech past the rolling windows.

const DAY_MS: u64 = 86_400_000;

/// The backfill settings (defaults in [`BackfillConfig::default`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackfillConfig {
    /// A recording this recent at arrival is fresh (default 24 h).
    pub fresh_ms: u64,
    /// Backfill speech per user per UTC day (default 4 h).
    pub allowance_ms: u64,
    /// Recordings older than this at arrival are refused (default 30 days).
    pub lookback_ms: u64,
}

impl Default for BackfillConfig {
    fn default() -> Self {
        BackfillConfig {
            fresh_ms: DAY_MS,
            allowance_ms: 4 * 3_600_000,
            lookback_ms: 30 * DAY_MS,
        }
    }
}

impl BackfillConfig {
    /// How long a sync file's content-hash key must be kept so that a re-upload of any admissible recording
    /// is never metered twice: the lookback plus 2 days.
    pub fn idempotency_retention_ms(&self) -> u64 {
        self.lookback_ms.saturating_add(2 * DAY_MS)
    }
}

/// The lane of a sync file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// Recorded within `fresh_ms` of arrival (or in the future, within the clock skew the name parser
    /// allows): metered like realtime speech.
    Fresh,
    /// Older: also charged to the day's backfill allowance.
    Backfill,
    /// Older than the lookback: refused.
    TooOld,
}

impl Lane {
    /// The metric / log label.
    pub fn label(self) -> &'static str {
        match self {
            Lane::Fresh => "sync_fresh",
            Lane::Backfill => "sync_backfill",
            Lane::TooOld => "too_old",
        }
    }
}

/// The lane of a file recorded at `recorded_ms` arriving at `arrival_ms`.
pub fn lane(recorded_ms: u64, arrival_ms: u64, cfg: &BackfillConfig) -> Lane {
    let age = arrival_ms.saturating_sub(recorded_ms);
    if age > cfg.lookback_ms {
        Lane::TooOld
    } else if age > cfg.fresh_ms {
        Lane::Backfill
    } else {
        Lane::Fresh
    }
}

/// The UTC day (days since the epoch) of `ms`: the allowance's period.
pub fn utc_day(ms: u64) -> u64 {
    ms / DAY_MS
}

/// Seconds from `now_ms` to the next UTC midnight (at least 1): the `Retry-After` of an exhausted allowance.
pub fn retry_after_s(now_ms: u64) -> u64 {
    let next = (utc_day(now_ms) + 1) * DAY_MS;
    next.saturating_sub(now_ms).div_ceil(1000).max(1)
}

/// Whether `speech_ms` more backfill fits a day on which `used_ms` was already charged.
pub fn fits(used_ms: u64, speech_ms: u64, cfg: &BackfillConfig) -> bool {
    used_ms.saturating_add(speech_ms) <= cfg.allowance_ms
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_764_000_000_000 + 12 * 3_600_000;

    #[test]
    fn lanes_follow_the_age_at_arrival() {
        let cfg = BackfillConfig::default();
        let h = 3_600_000;
        for (age, want) in [
            (0, Lane::Fresh),
            (24 * h, Lane::Fresh),
            (24 * h + 1, Lane::Backfill),
            (8 * 24 * h, Lane::Backfill),
            (30 * 24 * h, Lane::Backfill),
            (30 * 24 * h + 1, Lane::TooOld),
        ] {
            assert_eq!(lane(NOW - age, NOW, &cfg), want, "age {age}");
        }
        // A name slightly in the future (allowed clock skew) is fresh.
        assert_eq!(lane(NOW + 60_000, NOW, &cfg), Lane::Fresh);
    }

    #[test]
    fn the_allowance_is_strict_and_resets_at_utc_midnight() {
        let cfg = BackfillConfig::default();
        assert!(fits(0, cfg.allowance_ms, &cfg));
        assert!(!fits(1, cfg.allowance_ms, &cfg));
        assert!(!fits(cfg.allowance_ms, 1, &cfg));
        assert!(fits(cfg.allowance_ms, 0, &cfg));
        let midnight = utc_day(NOW) * DAY_MS;
        assert_eq!(retry_after_s(midnight), 86_400);
        assert_eq!(retry_after_s(midnight + DAY_MS - 1), 1);
        assert_eq!(retry_after_s(midnight + 12 * 3_600_000), 43_200);
        assert_eq!(
            utc_day(midnight + DAY_MS - 1) + 1,
            utc_day(midnight + DAY_MS)
        );
    }

    #[test]
    fn content_keys_outlive_the_lookback() {
        let cfg = BackfillConfig::default();
        assert_eq!(cfg.idempotency_retention_ms(), 32 * DAY_MS);
    }
}

//! Rolling speech totals and the soft caps over them.
//!
//! A cap triggers only when a total is **strictly greater** than it; the triggered list is always in the
//! order daily, 3-day, weekly (the reference's order, so the first entry is the event's `trigger`).

use serde::{Deserialize, Serialize};

/// Speech in the rolling 24 h / 72 h / 168 h windows, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollingTotals {
    pub daily_ms: u64,
    pub three_day_ms: u64,
    pub weekly_ms: u64,
}

/// Speech charged to the current calendar month (billing, not fair use).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MonthUsage {
    pub month_ms: u64,
}

/// Exact speech per rolling window and this month: what the status view and the live `usage` event show.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SpeechMs {
    pub daily_ms: u64,
    pub three_day_ms: u64,
    pub weekly_ms: u64,
    pub month_ms: u64,
}

/// One of the three rolling windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum CapKind {
    #[serde(rename = "daily")]
    Daily,
    #[serde(rename = "3day")]
    ThreeDay,
    #[serde(rename = "weekly")]
    Weekly,
}

impl CapKind {
    /// The reference's trigger names (`daily`, `3day`, `weekly`), stable for logs, events and APIs.
    pub fn as_str(self) -> &'static str {
        match self {
            CapKind::Daily => "daily",
            CapKind::ThreeDay => "3day",
            CapKind::Weekly => "weekly",
        }
    }
}

/// The soft caps, in milliseconds of speech per window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SoftCaps {
    pub daily_ms: u64,
    pub three_day_ms: u64,
    pub weekly_ms: u64,
}

impl Default for SoftCaps {
    fn default() -> Self {
        SoftCaps {
            daily_ms: 7_200_000,
            three_day_ms: 28_800_000,
            weekly_ms: 36_000_000,
        }
    }
}

impl SoftCaps {
    /// The paid plans' default caps (4 h / 16 h / 20 h): the reference's later
    /// `FAIR_USE_*_SPEECH_MS_UNLIMITED` (#9964).
    pub const PAID: SoftCaps = SoftCaps {
        daily_ms: 14_400_000,
        three_day_ms: 57_600_000,
        weekly_ms: 72_000_000,
    };

    /// Caps on the rolling 24 h only (the other windows unbounded): how the hard ceiling is asked of
    /// [`under_caps_at`](crate::meter::under_caps_at).
    pub const fn daily_only(daily_ms: u64) -> SoftCaps {
        SoftCaps {
            daily_ms,
            three_day_ms: u64::MAX,
            weekly_ms: u64::MAX,
        }
    }
}

/// The default hard ceiling: 30 speech-hours per rolling 24 h, for every plan (the reference's later
/// `MAX_DAILY_AUDIO_HOURS`). Reachable only with sync or several devices at once.
pub const DEFAULT_CEILING_MS: u64 = 30 * 3_600_000;

/// The soft caps of each kind of plan.
///
/// Which caps apply to a user is decided by their plan ([`PlanCaps::for_plan`]): the paid plans (unlimited
/// minutes) get `paid`; the free plan `basic` and a user on no known plan (`unknown`) get `free`. The caps
/// only decide when the classifier looks at a user (and, at restrict, when sync is refused), so the
/// stricter ones for a user nothing proves is paying cost a legitimate user nothing (the abuse benchmark
/// runs every legitimate archetype on them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanCaps {
    pub free: SoftCaps,
    pub paid: SoftCaps,
}

impl Default for PlanCaps {
    fn default() -> Self {
        PlanCaps {
            free: SoftCaps::default(),
            paid: SoftCaps::PAID,
        }
    }
}

impl PlanCaps {
    /// The same caps for every plan.
    pub const fn uniform(caps: SoftCaps) -> PlanCaps {
        PlanCaps {
            free: caps,
            paid: caps,
        }
    }

    /// The caps of a resolved plan.
    pub fn for_plan(&self, plan: &crate::policy::Plan) -> SoftCaps {
        if plan.paid { self.paid } else { self.free }
    }

    /// The lowest cap of each window over the plans: totals under these are under every plan's caps
    /// (what the hot path checks before it looks a plan up).
    pub fn lowest(&self) -> SoftCaps {
        SoftCaps {
            daily_ms: self.free.daily_ms.min(self.paid.daily_ms),
            three_day_ms: self.free.three_day_ms.min(self.paid.three_day_ms),
            weekly_ms: self.free.weekly_ms.min(self.paid.weekly_ms),
        }
    }

    /// The highest cap of each window over the plans: what a user whose plan could not be read gets
    /// (admitting fails open: a lookup error never restricts a payer).
    pub fn highest(&self) -> SoftCaps {
        SoftCaps {
            daily_ms: self.free.daily_ms.max(self.paid.daily_ms),
            three_day_ms: self.free.three_day_ms.max(self.paid.three_day_ms),
            weekly_ms: self.free.weekly_ms.max(self.paid.weekly_ms),
        }
    }
}

/// One triggered cap: which window, the total in it and the cap it exceeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapTrigger {
    pub cap: CapKind,
    pub speech_ms: u64,
    pub threshold_ms: u64,
}

impl SoftCaps {
    /// Every cap the totals exceed (strictly), in the order daily, 3-day, weekly.
    ///
    /// This ignores enablement, kill switch and exemption on purpose: those are decided once, in
    /// [`crate::policy::Enforcement`], so there is a single place that can switch caps off.
    pub fn triggered(&self, totals: &RollingTotals) -> Vec<CapTrigger> {
        [
            (CapKind::Daily, totals.daily_ms, self.daily_ms),
            (CapKind::ThreeDay, totals.three_day_ms, self.three_day_ms),
            (CapKind::Weekly, totals.weekly_ms, self.weekly_ms),
        ]
        .into_iter()
        .filter(|&(_, speech_ms, threshold_ms)| speech_ms > threshold_ms)
        .map(|(cap, speech_ms, threshold_ms)| CapTrigger {
            cap,
            speech_ms,
            threshold_ms,
        })
        .collect()
    }

    /// Caps exceeded after a record that were not exceeded before it: what a record "pushed over".
    pub fn newly_triggered(
        &self,
        before: &RollingTotals,
        after: &RollingTotals,
    ) -> Vec<CapTrigger> {
        let was: Vec<CapKind> = self.triggered(before).iter().map(|t| t.cap).collect();
        self.triggered(after)
            .into_iter()
            .filter(|t| !was.contains(&t.cap))
            .collect()
    }

    /// The cap of one window.
    pub fn limit_ms(&self, cap: CapKind) -> u64 {
        match cap {
            CapKind::Daily => self.daily_ms,
            CapKind::ThreeDay => self.three_day_ms,
            CapKind::Weekly => self.weekly_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn totals(d: u64, t: u64, w: u64) -> RollingTotals {
        RollingTotals {
            daily_ms: d,
            three_day_ms: t,
            weekly_ms: w,
        }
    }

    #[test]
    fn exactly_at_every_cap_triggers_nothing_and_one_ms_more_triggers_all_in_order() {
        let caps = SoftCaps::default();
        assert!(
            caps.triggered(&totals(7_200_000, 28_800_000, 36_000_000))
                .is_empty()
        );
        let over: Vec<CapKind> = caps
            .triggered(&totals(7_200_001, 28_800_001, 36_000_001))
            .iter()
            .map(|t| t.cap)
            .collect();
        assert_eq!(
            over,
            vec![CapKind::Daily, CapKind::ThreeDay, CapKind::Weekly]
        );
    }

    #[test]
    fn newly_triggered_reports_only_caps_the_record_pushed_over() {
        let caps = SoftCaps {
            daily_ms: 10,
            three_day_ms: 20,
            weekly_ms: 30,
        };
        let fresh = caps.newly_triggered(&totals(11, 11, 11), &totals(25, 25, 25));
        assert_eq!(
            fresh.iter().map(|t| t.cap).collect::<Vec<_>>(),
            vec![CapKind::ThreeDay]
        );
    }
}

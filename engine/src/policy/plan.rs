//! Plans and credits (billing, not fair use).
//!
//! Credits = the plan's monthly minutes − this month's usage. Exhausted credits **lock** content (never block
//! it) and never feed the stage machine. A lookup that failed is `Unavailable`, which must never lock.

use serde::{Deserialize, Serialize};

/// Plans whose monthly minutes are unlimited, as in the reference (`unlimited`, `operator`, `architect`).
pub const DEFAULT_PAID_PLANS: &[&str] = &["unlimited", "operator", "architect"];

/// The free plan's id; a user with no plan record is on it.
pub const FREE_PLAN: &str = "basic";

/// A user's plan, resolved from the plan table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub id: String,
    /// `None` = unlimited.
    pub monthly_minutes: Option<u64>,
    pub paid: bool,
}

/// The plan table: one free plan with monthly minutes, and unlimited paid plans.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanTable {
    /// `BASIC_TIER_MINUTES_LIMIT_PER_MONTH`; 0 = unlimited (the reference's meaning).
    pub free_minutes_per_month: u64,
    pub paid_plans: Vec<String>,
}

impl Default for PlanTable {
    fn default() -> Self {
        PlanTable {
            free_minutes_per_month: 1_200,
            paid_plans: DEFAULT_PAID_PLANS.iter().map(|p| (*p).to_owned()).collect(),
        }
    }
}

impl PlanTable {
    /// The plan of a user from their plan record (`None` = no record = the free plan). An unknown plan id is
    /// treated as the free plan: only a plan the table knows as paid grants unlimited minutes.
    pub fn plan(&self, record: Option<&str>) -> Plan {
        match record {
            Some(id) if self.paid_plans.iter().any(|p| p == id) => Plan {
                id: id.to_owned(),
                monthly_minutes: None,
                paid: true,
            },
            _ => {
                let minutes =
                    (self.free_minutes_per_month > 0).then_some(self.free_minutes_per_month);
                Plan {
                    id: FREE_PLAN.to_owned(),
                    monthly_minutes: minutes,
                    paid: false,
                }
            }
        }
    }

    /// Credits of a resolved plan record and this month's usage.
    pub fn credits(&self, record: Option<&str>, month: crate::policy::MonthUsage) -> Credits {
        Credits::of(self.plan(record), month.month_ms)
    }
}

/// A user's credits for the current month.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credits {
    pub plan: Plan,
    pub used_ms: u64,
    /// `None` = unlimited.
    pub limit_ms: Option<u64>,
}

impl Credits {
    pub fn of(plan: Plan, used_ms: u64) -> Credits {
        let limit_ms = plan.monthly_minutes.map(|m| m.saturating_mul(60_000));
        Credits {
            plan,
            used_ms,
            limit_ms,
        }
    }

    /// `None` = unlimited.
    pub fn remaining_ms(&self) -> Option<u64> {
        self.limit_ms
            .map(|limit| limit.saturating_sub(self.used_ms))
    }

    /// Usage at or over the limit (the reference's `>=`).
    pub fn exhausted(&self) -> bool {
        self.remaining_ms() == Some(0)
    }
}

/// The outcome of looking credits up: only a `Resolved` answer may write a durable lock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum CreditLookup {
    Resolved(Credits),
    /// The plan record or the usage could not be read (store down, timeout).
    Unavailable,
}

impl CreditLookup {
    /// Credits resolved and exhausted: the one reason content is locked.
    pub fn exhausted(&self) -> bool {
        matches!(self, CreditLookup::Resolved(c) if c.exhausted())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::MonthUsage;

    #[test]
    fn no_plan_record_is_the_free_plan_with_1200_minutes() {
        let c = PlanTable::default().credits(None, MonthUsage { month_ms: 0 });
        assert_eq!(c.plan.id, FREE_PLAN);
        assert_eq!(c.limit_ms, Some(72_000_000));
        assert!(!c.exhausted());
    }

    #[test]
    fn free_plan_is_exhausted_exactly_at_the_limit() {
        let table = PlanTable::default();
        assert!(
            !table
                .credits(
                    None,
                    MonthUsage {
                        month_ms: 71_999_999
                    }
                )
                .exhausted()
        );
        assert!(
            table
                .credits(
                    None,
                    MonthUsage {
                        month_ms: 72_000_000
                    }
                )
                .exhausted()
        );
    }

    #[test]
    fn paid_plans_are_unlimited_and_zero_free_minutes_means_unlimited() {
        let table = PlanTable::default();
        let paid = table.credits(Some("unlimited"), MonthUsage { month_ms: u64::MAX });
        assert!(paid.plan.paid && !paid.exhausted() && paid.remaining_ms().is_none());
        let free_unlimited = PlanTable {
            free_minutes_per_month: 0,
            ..PlanTable::default()
        };
        assert!(
            !free_unlimited
                .credits(None, MonthUsage { month_ms: u64::MAX })
                .exhausted()
        );
    }

    #[test]
    fn unknown_plan_id_is_treated_as_free() {
        assert!(!PlanTable::default().plan(Some("gold")).paid);
    }
}

//! Plans and credits (billing, not fair use).
//!
//! Credits = the plan's monthly minutes − this month's usage. Exhausted credits **lock** content (never block
//! it) and never feed the stage machine. A lookup that failed is `Unavailable`, which must never lock.

use serde::{Deserialize, Serialize};

/// Plans whose monthly minutes are unlimited, as in the reference (`unlimited`, `operator`, `architect`).
pub const DEFAULT_PAID_PLANS: &[&str] = &["unlimited", "operator", "architect"];

/// The free plan's id.
pub const FREE_PLAN: &str = "basic";

/// The plan id of a user no source (payment, admin, import) has named, under [`DefaultPlan::Unknown`].
pub const UNKNOWN_PLAN: &str = "unknown";

/// What a user with no plan record is on (`VOICEGATE_DEFAULT_PLAN`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DefaultPlan {
    /// An explicit `unknown` plan: metered (and under fair use) but never locked, since nothing says the user
    /// is on the free plan (a paying user the node never saw a webhook for must not be paywalled).
    #[default]
    Unknown,
    /// The free plan `basic`: locked once its monthly minutes are used.
    Free,
}

impl std::fmt::Display for DefaultPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DefaultPlan::Unknown => "unknown",
            DefaultPlan::Free => "free",
        })
    }
}

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
    /// What a user with no plan record is on.
    #[serde(default)]
    pub default_plan: DefaultPlan,
}

impl Default for PlanTable {
    fn default() -> Self {
        PlanTable {
            free_minutes_per_month: 1_200,
            paid_plans: DEFAULT_PAID_PLANS.iter().map(|p| (*p).to_owned()).collect(),
            default_plan: DefaultPlan::default(),
        }
    }
}

impl PlanTable {
    /// The plan of a user from their plan record. No record: the [`DefaultPlan`] (`unknown`: unlimited
    /// minutes, not paid; or the free plan). A plan id the table does not know as paid is the free plan:
    /// only a plan the table knows as paid grants unlimited minutes.
    pub fn plan(&self, record: Option<&str>) -> Plan {
        match record {
            Some(id) if self.paid_plans.iter().any(|p| p == id) => Plan {
                id: id.to_owned(),
                monthly_minutes: None,
                paid: true,
            },
            None if self.default_plan == DefaultPlan::Unknown => Plan {
                id: UNKNOWN_PLAN.to_owned(),
                monthly_minutes: None,
                paid: false,
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

    /// The free plan as the default for users with no record (the reference's behaviour).
    fn free_default() -> PlanTable {
        PlanTable {
            default_plan: DefaultPlan::Free,
            ..PlanTable::default()
        }
    }

    #[test]
    fn no_plan_record_is_unknown_never_exhausted_by_default_or_the_free_plan_when_set() {
        let unknown = PlanTable::default().credits(None, MonthUsage { month_ms: u64::MAX });
        assert_eq!(unknown.plan.id, UNKNOWN_PLAN);
        assert!(!unknown.plan.paid && !unknown.exhausted() && unknown.limit_ms.is_none());
        let c = free_default().credits(None, MonthUsage { month_ms: 0 });
        assert_eq!(c.plan.id, FREE_PLAN);
        assert_eq!(c.limit_ms, Some(72_000_000));
        assert!(!c.exhausted());
        // A record naming a plan the table does not know as paid is the free plan either way.
        let named = PlanTable::default().credits(Some("basic"), MonthUsage { month_ms: 0 });
        assert_eq!(
            (named.plan.id.as_str(), named.limit_ms),
            (FREE_PLAN, Some(72_000_000))
        );
    }

    #[test]
    fn free_plan_is_exhausted_exactly_at_the_limit() {
        let table = free_default();
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
            ..free_default()
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

//! The entitlement resolver: the one function sync, realtime and status all call.
//!
//! Failure mode per decision: admitting audio fails open (only restrict-while-over-a-cap and the hard
//! ceiling reject, and only sync); opening paid STT on an unknown entitlement fails closed; content is locked
//! only for a *resolved* reason (credits exhausted), never for a lookup error and never because a cap
//! triggered.

use serde::{Deserialize, Serialize};

use crate::policy::stage::{DAY_MS, DecayStep};
use crate::policy::{
    CapTrigger, CreditLookup, FairUseConfig, MonthUsage, RollingTotals, SoftCaps, Stage, StageState,
};

/// Who is asking.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// An offline upload: may be refused with 429.
    Sync,
    /// A live session: never disconnected by fair use.
    Realtime,
    /// The status view: reports what a sync upload would get.
    Status,
}

/// STT forwarded today (UTC calendar day), as the fair-use store counts it (`FairUse::record_stt`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SttUsage {
    /// Days since the Unix epoch (UTC) the count belongs to; a count from another day counts as 0.
    pub day: u64,
    pub used_ms: u64,
}

impl SttUsage {
    pub fn day_of(now_ms: u64) -> u64 {
        now_ms / DAY_MS
    }
}

/// Everything the resolver decides on. Plain data, gathered by the fair-use facade.
#[derive(Debug, Clone, Copy)]
pub struct EntitlementInput<'a> {
    pub uid: &'a str,
    pub mode: Mode,
    pub credits: &'a CreditLookup,
    pub month: MonthUsage,
    pub stage: &'a StageState,
    pub totals: RollingTotals,
    /// False while the meter could not read the store (`totals` are this node's pending speech only): no
    /// cap and no ceiling applies then (admitting fails open).
    pub totals_known: bool,
    /// The soft caps of the user's plan ([`crate::policy::PlanCaps::for_plan`]).
    pub caps: SoftCaps,
    /// When `totals` fall back under every cap with no new speech (the meter's
    /// [`under_caps_at`](crate::meter::under_caps_at) over the same buckets), if known. Bounds the
    /// Retry-After of a restricted-over-cap refusal; `None` leaves the restriction's end as the bound.
    pub under_caps_at_ms: Option<u64>,
    /// When the rolling 24 h total falls back to the hard ceiling with no new speech, if known (bounds a
    /// `speech_ceiling` refusal's Retry-After).
    pub under_ceiling_at_ms: Option<u64>,
    pub stt_today: SttUsage,
    /// Today's audio to paid providers, all users together, reached the spend ceiling.
    pub spend_tripped: bool,
    pub now_ms: u64,
}

/// Whether fair use is enforced for this user, and if not, why (the first of: disabled, kill switch, exempt).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Enforcement {
    Active,
    Disabled,
    KillSwitch,
    Exempt,
}

impl Enforcement {
    pub fn of(cfg: &FairUseConfig, uid: &str) -> Enforcement {
        if !cfg.enabled {
            Enforcement::Disabled
        } else if cfg.kill_switch {
            Enforcement::KillSwitch
        } else if cfg.exempt_uids.contains(uid) {
            Enforcement::Exempt
        } else {
            Enforcement::Active
        }
    }

    pub fn active(self) -> bool {
        self == Enforcement::Active
    }
}

/// Why a request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectReason {
    /// Stage restrict and a soft cap exceeded: sync answers 429.
    RestrictedOverCap,
    /// Speech in the rolling 24 h over the hard ceiling (every plan): sync answers 429.
    SpeechCeiling,
}

impl RejectReason {
    /// Stable machine-readable code.
    pub fn code(self) -> &'static str {
        match self {
            RejectReason::RestrictedOverCap => "fair_use_restricted",
            RejectReason::SpeechCeiling => "speech_ceiling",
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            RejectReason::RestrictedOverCap => {
                "Uploads are temporarily limited for this account: usage is over a fair-use limit while restricted."
            }
            RejectReason::SpeechCeiling => {
                "This account recorded more speech in the last 24 hours than any plan allows; uploads resume as the oldest of it leaves the window."
            }
        }
    }
}

/// Admit or reject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum Admission {
    Admit,
    Reject {
        reason: RejectReason,
        retry_after_s: u64,
    },
}

/// Why paid STT may not be opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SttDenied {
    /// The stage's daily budget is used up; resets at the next UTC midnight.
    BudgetExhausted,
    /// Credits could not be looked up: paid STT fails closed.
    EntitlementUnknown,
    /// Speech in the rolling 24 h is over the hard ceiling; opens again once it falls back.
    SpeechCeiling,
    /// The node's (cluster's) daily spend ceiling on paid speech-to-text is reached; opens at the next UTC
    /// midnight.
    SpendCeiling,
}

impl SttDenied {
    pub fn code(self) -> &'static str {
        match self {
            SttDenied::BudgetExhausted => "stt_budget_exhausted",
            SttDenied::EntitlementUnknown => "entitlement_unknown",
            SttDenied::SpeechCeiling => "speech_ceiling",
            SttDenied::SpendCeiling => "spend_ceiling",
        }
    }
}

/// How much paid STT the user may open now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "allowance", rename_all = "snake_case")]
pub enum SttAllowance {
    Unlimited,
    /// A daily budget applies (throttle/restrict) and some is left.
    Remaining {
        remaining_ms: u64,
        daily_limit_ms: u64,
        used_ms: u64,
        resets_at_ms: u64,
    },
    None {
        reason: SttDenied,
        daily_limit_ms: Option<u64>,
        used_ms: u64,
        resets_at_ms: Option<u64>,
    },
}

impl SttAllowance {
    /// STT may be forwarded now.
    pub fn allows(&self) -> bool {
        !matches!(self, SttAllowance::None { .. })
    }
}

/// The decision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entitlement {
    pub admission: Admission,
    /// Content created now is locked (credits resolved and exhausted). Independent of fair use.
    pub lock: bool,
    pub stt: SttAllowance,
    /// Caps of the user's plan exceeded, in the order daily, 3-day, weekly; empty when enforcement is off.
    pub caps_triggered: Vec<CapTrigger>,
    /// Speech in the rolling 24 h is over the hard ceiling (enforcement active and the ceiling on).
    pub over_ceiling: bool,
    /// The user's stage after decay (what the store holds, shown even when enforcement is off).
    pub stage: Stage,
    /// The stage whose effects apply: `stage` when enforcement is active, otherwise none.
    pub enforced_stage: Stage,
    pub enforcement: Enforcement,
    /// The decayed state and the steps that fell due; the actor persists them when non-empty.
    pub state: StageState,
    pub decay: Vec<DecayStep>,
}

/// Decide. Pure: the same input always gives the same answer.
pub fn resolve(cfg: &FairUseConfig, input: &EntitlementInput<'_>) -> Entitlement {
    let now = input.now_ms;
    let (state, decay) = input.stage.decayed(&cfg.stages, now);
    let enforcement = Enforcement::of(cfg, input.uid);
    let enforced_stage = if enforcement.active() {
        state.stage
    } else {
        Stage::None
    };
    let caps_triggered = if enforcement.active() && input.totals_known {
        input.caps.triggered(&input.totals)
    } else {
        Vec::new()
    };
    // The ceiling is part of fair use: off with it, the kill switch and exemption (the reference's
    // `is_daily_audio_ceiling_exceeded` alike), and a total strictly greater than it counts, as for a cap.
    let over_ceiling = enforcement.active()
        && input.totals_known
        && cfg.ceiling_ms > 0
        && input.totals.daily_ms > cfg.ceiling_ms;

    let mut refusals = Vec::with_capacity(2);
    if input.mode != Mode::Realtime
        && enforced_stage == Stage::Restrict
        && !caps_triggered.is_empty()
    {
        // The refusal lasts until the restriction ends or the totals fall back under the caps, whichever
        // comes first (DESIGN §3 "Errors"); either end admits the same upload.
        let until = [state.restrict_until_ms, input.under_caps_at_ms]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(now);
        refusals.push((until, RejectReason::RestrictedOverCap));
    }
    if input.mode != Mode::Realtime && over_ceiling {
        refusals.push((
            input.under_ceiling_at_ms.unwrap_or(now),
            RejectReason::SpeechCeiling,
        ));
    }
    // Both must end before an upload is admitted: the later end is the answer (the ceiling on a tie).
    let admission = match refusals
        .into_iter()
        .max_by_key(|&(until, r)| (until, r == RejectReason::SpeechCeiling))
    {
        Some((until, reason)) => Admission::Reject {
            reason,
            retry_after_s: retry_after_s(until, now),
        },
        None => Admission::Admit,
    };

    let used_today = if input.stt_today.day == SttUsage::day_of(now) {
        input.stt_today.used_ms
    } else {
        0
    };
    let resets_at_ms = (SttUsage::day_of(now) + 1).saturating_mul(DAY_MS);
    let budget = match enforced_stage {
        Stage::Throttle => cfg.throttle_daily_stt_ms,
        Stage::Restrict => cfg.restrict_daily_stt_ms,
        Stage::None | Stage::Warning => 0,
    };
    let stt = if *input.credits == CreditLookup::Unavailable {
        SttAllowance::None {
            reason: SttDenied::EntitlementUnknown,
            daily_limit_ms: (budget > 0).then_some(budget),
            used_ms: used_today,
            resets_at_ms: None,
        }
    } else if over_ceiling {
        SttAllowance::None {
            reason: SttDenied::SpeechCeiling,
            daily_limit_ms: (budget > 0).then_some(budget),
            used_ms: used_today,
            resets_at_ms: input.under_ceiling_at_ms,
        }
    } else if input.spend_tripped {
        SttAllowance::None {
            reason: SttDenied::SpendCeiling,
            daily_limit_ms: (budget > 0).then_some(budget),
            used_ms: used_today,
            resets_at_ms: Some(resets_at_ms),
        }
    } else if budget == 0 {
        SttAllowance::Unlimited
    } else if used_today >= budget {
        SttAllowance::None {
            reason: SttDenied::BudgetExhausted,
            daily_limit_ms: Some(budget),
            used_ms: used_today,
            resets_at_ms: Some(resets_at_ms),
        }
    } else {
        SttAllowance::Remaining {
            remaining_ms: budget - used_today,
            daily_limit_ms: budget,
            used_ms: used_today,
            resets_at_ms,
        }
    };

    Entitlement {
        admission,
        lock: input.credits.exhausted(),
        stt,
        caps_triggered,
        over_ceiling,
        stage: state.stage,
        enforced_stage,
        enforcement,
        state,
        decay,
    }
}

/// Whole seconds until `until_ms`, rounded up, at least 1 (a Retry-After of 0 invites a hot loop).
pub fn retry_after_s(until_ms: u64, now_ms: u64) -> u64 {
    until_ms.saturating_sub(now_ms).div_ceil(1_000).max(1)
}

//! The stage machine: none → warning → throttle → restrict, and back down by decay.
//!
//! Up: one step per successful classification whose misuse score passes the gate (≥ threshold), with 2
//! (throttle) resp. 3 (restrict) earlier *violations* in the last 7 days. A violation is a cap breach whose
//! classification passed the gate; benign runs and failures never count (the reference counted every event).
//! Down: evaluated on every read, each step at its scheduled instant (not at the read), so a late read gives
//! the same answer as a timely one: restrict → throttle at `restrict_until`, throttle → warning at
//! `throttle_until`, warning → none once 30 days pass with no violation.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::policy::caps::CapKind;
use crate::policy::{CaseRef, RollingTotals, SoftCaps, UsageType, Verdict};

pub const DAY_MS: u64 = 86_400_000;

/// A fair-use stage.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    #[default]
    None,
    Warning,
    Throttle,
    Restrict,
}

impl Stage {
    pub const ALL: [Stage; 4] = [
        Stage::None,
        Stage::Warning,
        Stage::Throttle,
        Stage::Restrict,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::None => "none",
            Stage::Warning => "warning",
            Stage::Throttle => "throttle",
            Stage::Restrict => "restrict",
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A stage name that is not one of `none`, `warning`, `throttle`, `restrict` (admin set-stage answers 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid stage {0:?}: expected none, warning, throttle or restrict")]
pub struct InvalidStage(pub String);

impl InvalidStage {
    pub const CODE: &'static str = "invalid_stage";
}

impl FromStr for Stage {
    type Err = InvalidStage;
    fn from_str(s: &str) -> Result<Stage, InvalidStage> {
        Stage::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| InvalidStage(s.to_owned()))
    }
}

/// The ladder's numbers.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StagePolicy {
    /// `FAIR_USE_CLASSIFIER_ABUSE_SCORE_THRESHOLD`; the gate is `score >= threshold`.
    pub misuse_threshold: f64,
    /// Earlier violations (within the window) needed to go warning → throttle.
    pub throttle_after_violations: u32,
    /// Earlier violations (within the window) needed to go throttle → restrict.
    pub restrict_after_violations: u32,
    pub violation_window_ms: u64,
    pub throttle_ms: u64,
    pub restrict_ms: u64,
    /// Warning decays to none after this long with no violation.
    pub warning_quiet_ms: u64,
}

impl Default for StagePolicy {
    fn default() -> Self {
        StagePolicy {
            misuse_threshold: 0.7,
            throttle_after_violations: 2,
            restrict_after_violations: 3,
            violation_window_ms: 7 * DAY_MS,
            throttle_ms: 7 * DAY_MS,
            restrict_ms: 30 * DAY_MS,
            warning_quiet_ms: 30 * DAY_MS,
        }
    }
}

/// Violations older than this are forgotten (the 30-day count is the longest view anyone asks for).
pub const VIOLATION_RETENTION_MS: u64 = 30 * DAY_MS;
/// Bound on remembered violations (one per classifier cooldown keeps this far from reach).
pub const MAX_VIOLATIONS: usize = 256;

/// A user's persisted fair-use state.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct StageState {
    pub stage: Stage,
    /// When the current stage was entered.
    pub since_ms: Option<u64>,
    /// Times of gated violations, oldest first, within [`VIOLATION_RETENTION_MS`].
    pub violations_ms: Vec<u64>,
    pub last_violation_at_ms: Option<u64>,
    pub throttle_until_ms: Option<u64>,
    pub restrict_until_ms: Option<u64>,
    pub last_classifier_score: Option<f64>,
    pub last_usage_type: Option<UsageType>,
    /// The case ref of the last stage change, what the status view and notices show.
    pub last_case_ref: Option<CaseRef>,
    pub updated_at_ms: u64,
}

/// Why a stage changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A successful classification (whether or not it changed the stage).
    Classification,
    Decay,
    AdminSetStage,
    AdminReset,
}

/// One audit event; every event carries its own case ref.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FairUseEvent {
    pub case_ref: CaseRef,
    pub at_ms: u64,
    pub kind: EventKind,
    pub previous_stage: Stage,
    pub new_stage: Stage,
    /// The classification passed the gate and was counted as a violation.
    pub violation: bool,
    /// Earlier violations in the 7-day window when this classification was applied.
    pub violations_7d: u32,
    pub trigger: Option<CapKind>,
    pub window_speech_ms: Option<RollingTotals>,
    pub thresholds_ms: Option<SoftCaps>,
    pub classifier: Option<Verdict>,
    /// Admin who made the change (admin events only).
    pub actor: Option<String>,
}

impl FairUseEvent {
    fn new(
        case_ref: CaseRef,
        at_ms: u64,
        kind: EventKind,
        previous: Stage,
        new: Stage,
    ) -> FairUseEvent {
        FairUseEvent {
            case_ref,
            at_ms,
            kind,
            previous_stage: previous,
            new_stage: new,
            violation: false,
            violations_7d: 0,
            trigger: None,
            window_speech_ms: None,
            thresholds_ms: None,
            classifier: None,
            actor: None,
        }
    }

    /// The stage changed (an escalation, a decay step or an admin change).
    pub fn changed(&self) -> bool {
        self.previous_stage != self.new_stage
    }
}

/// A stage change caused by decay, at its scheduled instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecayStep {
    pub from: Stage,
    pub to: Stage,
    pub at_ms: u64,
}

impl StageState {
    /// Gated violations in the window ending at `now_ms`.
    pub fn violations_within(&self, window_ms: u64, now_ms: u64) -> u32 {
        let from = now_ms.saturating_sub(window_ms);
        let n = self
            .violations_ms
            .iter()
            .filter(|&&t| t >= from && t <= now_ms)
            .count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// The state as of `now_ms`, with every decay step that fell due (in order). Pure: persisting the steps
    /// is the caller's job (the fair-use ledger), reading never needs to.
    pub fn decayed(&self, policy: &StagePolicy, now_ms: u64) -> (StageState, Vec<DecayStep>) {
        let mut s = self.clone();
        let mut steps = Vec::new();
        loop {
            let step = s
                .next_decay_at(policy)
                .filter(|&until| until <= now_ms)
                .and_then(|until| match s.stage {
                    Stage::None => None,
                    Stage::Restrict => {
                        s.restrict_until_ms = None;
                        s.throttle_until_ms = Some(until.saturating_add(policy.throttle_ms));
                        Some((Stage::Throttle, until))
                    }
                    Stage::Throttle => {
                        s.throttle_until_ms = None;
                        Some((Stage::Warning, until))
                    }
                    Stage::Warning => Some((Stage::None, until)),
                });
            let Some((to, at_ms)) = step else { break };
            steps.push(DecayStep {
                from: s.stage,
                to,
                at_ms,
            });
            s.stage = to;
            s.since_ms = Some(at_ms);
            s.updated_at_ms = s.updated_at_ms.max(at_ms);
        }
        s.prune_violations(now_ms);
        (s, steps)
    }

    /// When the current stage ends (decays one step), if it is not none: restrict at `restrict_until`,
    /// throttle at `throttle_until`, warning after `warning_quiet_ms` without a violation.
    pub fn next_decay_at(&self, policy: &StagePolicy) -> Option<u64> {
        match self.stage {
            Stage::None => None,
            Stage::Restrict => Some(
                self.restrict_until_ms
                    .unwrap_or_else(|| self.anchor().saturating_add(policy.restrict_ms)),
            ),
            Stage::Throttle => Some(
                self.throttle_until_ms
                    .unwrap_or_else(|| self.anchor().saturating_add(policy.throttle_ms)),
            ),
            Stage::Warning => {
                let quiet_from = self.anchor().max(self.last_violation_at_ms.unwrap_or(0));
                Some(quiet_from.saturating_add(policy.warning_quiet_ms))
            }
        }
    }

    /// When the current stage was entered, falling back to the last write for states without it.
    fn anchor(&self) -> u64 {
        self.since_ms.unwrap_or(self.updated_at_ms)
    }

    fn prune_violations(&mut self, now_ms: u64) {
        let from = now_ms.saturating_sub(VIOLATION_RETENTION_MS);
        self.violations_ms.retain(|&t| t >= from);
        if self.violations_ms.len() > MAX_VIOLATIONS {
            let excess = self.violations_ms.len() - MAX_VIOLATIONS;
            self.violations_ms.drain(..excess);
        }
    }

    fn enter(&mut self, stage: Stage, policy: &StagePolicy, now_ms: u64) {
        self.stage = stage;
        self.since_ms = Some(now_ms);
        match stage {
            Stage::None | Stage::Warning => {
                self.throttle_until_ms = None;
                self.restrict_until_ms = None;
            }
            Stage::Throttle => {
                self.throttle_until_ms = Some(now_ms.saturating_add(policy.throttle_ms));
                self.restrict_until_ms = None;
            }
            Stage::Restrict => {
                self.throttle_until_ms = None;
                self.restrict_until_ms = Some(now_ms.saturating_add(policy.restrict_ms));
            }
        }
    }
}

/// Decay steps as events, each with its own case ref (`case_refs` is called once per step).
pub fn decay_events(
    steps: &[DecayStep],
    mut case_refs: impl FnMut() -> CaseRef,
) -> Vec<FairUseEvent> {
    steps
        .iter()
        .map(|s| FairUseEvent::new(case_refs(), s.at_ms, EventKind::Decay, s.from, s.to))
        .collect()
}

/// What a breach that was classified looked like, for the event.
#[derive(Debug, Clone, PartialEq)]
pub struct BreachContext {
    pub trigger: Option<CapKind>,
    pub totals: RollingTotals,
    pub caps: SoftCaps,
}

/// Apply one successful classification to a state **already decayed to `now_ms`**: at most one step up.
/// Returns the new state and the event to record (always one, even when nothing changed, for the audit).
pub fn escalate(
    state: &StageState,
    policy: &StagePolicy,
    verdict: &Verdict,
    breach: &BreachContext,
    now_ms: u64,
    case_ref: CaseRef,
) -> (StageState, FairUseEvent) {
    let mut next = state.clone();
    let gate = verdict.misuse_score >= policy.misuse_threshold;
    let earlier = state.violations_within(policy.violation_window_ms, now_ms);
    let target = match (state.stage, gate) {
        (_, false) => None,
        (Stage::None, true) => Some(Stage::Warning),
        (Stage::Warning, true) if earlier >= policy.throttle_after_violations => {
            Some(Stage::Throttle)
        }
        (Stage::Throttle, true) if earlier >= policy.restrict_after_violations => {
            Some(Stage::Restrict)
        }
        (_, true) => None,
    };
    if gate {
        next.violations_ms.push(now_ms);
        next.last_violation_at_ms = Some(now_ms);
        next.last_classifier_score = Some(verdict.misuse_score);
        next.last_usage_type = Some(verdict.usage_type);
        next.updated_at_ms = now_ms;
        next.prune_violations(now_ms);
    }
    if let Some(stage) = target {
        next.enter(stage, policy, now_ms);
        next.last_case_ref = Some(case_ref.clone());
    }
    let mut event = FairUseEvent::new(
        case_ref,
        now_ms,
        EventKind::Classification,
        state.stage,
        next.stage,
    );
    event.violation = gate;
    event.violations_7d = earlier;
    event.trigger = breach.trigger;
    event.window_speech_ms = Some(breach.totals);
    event.thresholds_ms = Some(breach.caps);
    event.classifier = Some(verdict.clone());
    (next, event)
}

/// Admin set-stage on a state already decayed to `now_ms`. The untils restart from now (`none` and `warning`
/// null them); violations are kept. Records a new case ref as the user's current one unless the stage is none.
pub fn admin_set_stage(
    state: &StageState,
    policy: &StagePolicy,
    stage: Stage,
    admin: &str,
    now_ms: u64,
    case_ref: CaseRef,
) -> (StageState, FairUseEvent) {
    let mut next = state.clone();
    next.enter(stage, policy, now_ms);
    next.updated_at_ms = now_ms;
    next.last_case_ref = (stage != Stage::None).then(|| case_ref.clone());
    let mut event = FairUseEvent::new(
        case_ref,
        now_ms,
        EventKind::AdminSetStage,
        state.stage,
        stage,
    );
    event.actor = Some(admin.to_owned());
    (next, event)
}

/// Admin reset: stage none, violations and untils cleared.
pub fn admin_reset(
    state: &StageState,
    admin: &str,
    now_ms: u64,
    case_ref: CaseRef,
) -> (StageState, FairUseEvent) {
    let next = StageState {
        since_ms: Some(now_ms),
        updated_at_ms: now_ms,
        ..StageState::default()
    };
    let mut event = FairUseEvent::new(
        case_ref,
        now_ms,
        EventKind::AdminReset,
        state.stage,
        Stage::None,
    );
    event.actor = Some(admin.to_owned());
    (next, event)
}

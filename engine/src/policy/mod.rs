//! Fair-use policy, **pure**: plain data in, decision out; no I/O, no clock reads, no randomness.
//!
//! - `config`: every setting with its default and env name.
//! - `backfill`: fresh vs backfill sync files, the lookback and the daily backfill allowance.
//! - `caps`: rolling totals and soft caps (strictly greater triggers).
//! - `plan`: plans and credits; a credit lookup is `Resolved` or `Unavailable`.
//! - `stage`: the stage machine (escalation one step at a time, decay on read, admin set-stage/reset).
//! - `session`: the evidence a realtime session or a sync file leaves for fair use.
//! - `entitlement`: the resolver sync, realtime and status all call.
//! - `verdict`, `case_ref`, `notice`: classifier results, `FU-` case references, user-facing texts.

pub mod backfill;
pub mod caps;
pub mod case_ref;
pub mod config;
pub mod entitlement;
pub mod notice;
pub mod plan;
pub mod session;
pub mod stage;
pub mod verdict;

pub use caps::{
    CapKind, CapTrigger, DEFAULT_CEILING_MS, MonthUsage, PlanCaps, RollingTotals, SoftCaps,
    SpeechMs,
};
pub use case_ref::{CaseRef, InvalidCaseRef};
pub use config::{ClassifierKind, ClassifierSettings, FairUseArgs, FairUseConfig};
pub use entitlement::{
    Admission, Enforcement, Entitlement, EntitlementInput, Mode, RejectReason, SttAllowance,
    SttDenied, SttUsage, resolve, retry_after_s,
};
pub use plan::{CreditLookup, Credits, DefaultPlan, Plan, PlanTable};
pub use session::{SessionLane, SessionMeasures, SessionSummary};
pub use stage::{
    BreachContext, DecayStep, EventKind, FairUseEvent, InvalidStage, Stage, StagePolicy,
    StageState, admin_reset, admin_set_stage, decay_events, escalate,
};
pub use verdict::{Evidence, UsageType, Verdict};

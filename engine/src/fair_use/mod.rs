//! The fair-use service: everything that turns metered speech into fair-use state, behind one handle.
//!
//! - `facade`: [`FairUse`], the handle the server and the live pipeline hold (meter + ledger + cap supervisor
//!   behind one entitlement resolver), and the status view.
//! - `cap_supervisor`: the actor that receives cap breaches, deduplicates them per user (cooldown lock), runs
//!   classifier tasks with bounded concurrency and a timeout, survives errors, panics and hangs (logged with
//!   uid and reason, counted, lock released, retried with backoff) and sends successes to a [`VerdictSink`].
//! - `classifier`, `heuristic`, `openai`: the classifier trait and its two implementations.
//! - `ledger`: load → pure policy → compare-and-set commit of a user's fair-use state (what the facade and
//!   the cap supervisor's verdicts go through).
//! - `notifier`: notices on stage changes.
//!
//! Wall-clock time comes from [`crate::time::Clock`] (the same clock as the meter's), so tests drive both
//! alike. Who messages whom, on which thread: `docs/architecture.md`.

pub mod cap_supervisor;
pub mod classifier;
pub mod facade;
pub mod heuristic;
pub mod ledger;
pub mod notifier;
pub mod openai;

pub use cap_supervisor::{
    CapBreached, CapSupervisor, FOLLOW_UP_EVERY, FollowUp, FollowUpRead, GetSupervisorStats,
    MeterAndLedger, SupervisorDeps, SupervisorStats, TotalsSource, WhenIdle,
};
pub use classifier::{
    Classifier, ClassifierError, NoSessions, SessionLane, SessionSummary, StoredSessions,
    UsageSnapshot, UsageSource,
};
pub use facade::{
    AdminError, FairUse, FairUseParts, FairUseStatus, PlanRecord, UserDetail, ViolationCase,
    Violations, classifier_from_config,
};
pub use heuristic::HeuristicClassifier;
pub use ledger::{Applied, FairUseLedger, LedgerError, VerdictSink};
pub use notifier::{LogNotifier, Notifier};
pub use openai::OpenAiClassifier;

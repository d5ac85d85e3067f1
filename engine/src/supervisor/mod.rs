//! The cap supervisor and what it runs.
//!
//! - `cap_supervisor`: the actor that receives cap breaches, deduplicates them per user (cooldown lock), runs
//!   classifier tasks with bounded concurrency and a timeout, survives errors, panics and hangs (logged with
//!   uid and reason, counted, lock released, retried with backoff) and sends successes to a [`VerdictSink`].
//! - `classifier`, `heuristic`, `openai`: the classifier trait and its two implementations.
//! - `ledger`: load → pure policy → compare-and-set commit of a user's fair-use state (what the user's actor calls).
//! - `notifier`: notices on stage changes.
//! - `fair_use`: [`FairUse`], the handle the server holds (meter + ledger + supervisor behind one resolver).
//!
//! Wall-clock time comes from [`crate::meter::time::Clock`] (the meter's clock), so tests drive both alike.

pub mod cap_supervisor;
pub mod classifier;
pub mod fair_use;
pub mod heuristic;
pub mod ledger;
pub mod notifier;
pub mod openai;

pub use cap_supervisor::{
    CapBreached, CapSupervisor, GetSupervisorStats, SupervisorDeps, SupervisorStats,
};
pub use classifier::{
    Classifier, ClassifierError, NoSessions, SessionSummary, UsageSnapshot, UsageSource,
};
pub use fair_use::{
    AdminError, FairUse, FairUseParts, FairUseStatus, PlanRecord, UserDetail,
    classifier_from_config,
};
pub use heuristic::HeuristicClassifier;
pub use ledger::{Applied, FairUseLedger, LedgerError, VerdictSink};
pub use notifier::{LogNotifier, Notifier};
pub use openai::OpenAiClassifier;

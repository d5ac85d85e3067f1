//! Metering: every user's real speech time in rolling windows, exactly once in the store.
//!
//! - [`window`], [`placement`]: pure minute buckets, rolling totals and where speech lands (time and units
//!   come from [`crate::time`]).
//! - [`under_caps`]: when the rolling totals fall back under the soft caps (bounds a refusal's
//!   `Retry-After`).
//! - [`Meter`]: the facade; one actix actor per active user, sharded over arbiters by uid hash, hydrated
//!   from the [`Store`](crate::store::Store) and passivated when idle.
//! - write-behind: a flusher sends dirty users' batches every interval, many users per pipeline, one
//!   idempotent script call per user; see `docs/metering.md` for the delivery guarantees.

mod actor;
pub mod config;
mod facade;
mod flusher;
mod messages;
mod pending;
pub mod placement;
mod registry;
pub mod under_caps;
pub mod window;

pub use config::{MeterArgs, MeterConfig};
pub use facade::Meter;
pub use flusher::{RoundReport, ShutdownReport};
pub use messages::{
    FlushReport, MeterError, RecordOutcome, RecordSpeech, RecordStatus, SpeechAmount, SpeechSource,
    TotalsAgainst, UsageTotals,
};
pub use under_caps::under_caps_at;
pub use window::MinuteWindow;

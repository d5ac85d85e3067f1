//! Live pipeline: one realtime listen session, from websocket frames to events and metered speech.
//!
//! - [`SessionCore`] (`core`): the session as a sans-IO state machine: frames, the VAD step, ticks and
//!   store results in; events, STT commands and store operations out. Unit-tested on virtual time.
//! - `driver`: [`run_session`] runs a core on its pipeline thread: ticks on a shared grid, reads the
//!   [`Transport`] (the websocket) on each tick, runs the store operations (`ops`) beside the ticks.
//! - `contract`: the core's other inputs and outputs, and its states.
//! - `frames`: the bounded per-tick frame queue between the transport and the pipeline.
//! - `pace`: the session's intake limit (a multiple of real time plus a burst), applied by the driver
//!   between the frame queue and the pipeline, so a fast client is slowed by backpressure.
//! - `gate`: the STT allowance as the session applies it.
//! - `pool`: the pipeline threads sessions run on (round-robin), off the HTTP workers.
//! - `events`: the JSON events sent to the client.
//! - `feed`: which kept audio goes to the speech-to-text provider (pre-roll, the run, its hangover);
//!   `link`: the driver's end of the provider's stream; `transcript`: segments and availability for the app.
//! - `load`: the node's recent tick lag, the overload signal admission control reads.

mod contract;
mod core;
mod driver;
mod events;
mod feed;
mod frames;
mod gate;
mod latency;
mod link;
pub mod load;
mod ops;
mod pace;
mod pool;
mod split;
#[cfg(test)]
mod tests;
pub mod transcript;

use std::sync::Arc;
use std::time::Duration;

pub use contract::{FrameCounts, InFlight, Lifecycle, SessionReport, SttCommand};
pub use core::{MAX_CLOSING, MAX_HELD_SEGMENTS, MAX_UNWRITTEN, SessionCore};
pub use driver::{Transport, run_session};
pub use events::LiveEvent;
pub use feed::FeedConfig;
pub use frames::{DropReason, FrameQueue, MAX_RECORD};
pub use ops::{OpResult, StoreOp};
pub use pace::{Pace, PaceConfig};
pub use pool::{PipelinePool, PoolStopped};

use crate::audio::codec::Codec;
use crate::conversation::ConversationStore;
use crate::fair_use::FairUse;
use crate::pipeline::stream::PipelineConfig;
use crate::store::plans::PlanStore;
use crate::stt::SttProvider;
use crate::time::Clock;

/// Session timing and the speech pipeline's tunables.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LiveConfig {
    pub pipeline: PipelineConfig,
    /// How often a session reads its transport and runs the VAD on what arrived (bounds event latency).
    pub tick: Duration,
    /// How often finished speech is sent to the meter (and STT usage recorded).
    pub meter_interval: Duration,
    /// How often the `usage` event is sent and the entitlement (stage, lock, STT allowance) re-read.
    pub usage_interval: Duration,
    /// How often an open session's evidence (its summary for fair use) is rewritten; the last one is
    /// written when it ends.
    pub evidence_interval: Duration,
    /// How speech is forwarded to the speech-to-text provider (unused with `none`).
    pub stt: FeedConfig,
    /// At the end of a session, how long the last transcripts may take before `metadata` goes out
    /// (metering is settled before; only the client's last transcript waits).
    pub stt_close_wait: Duration,
    /// Most audio taken in per second of wall time (sustained), and the burst above it.
    pub pace: PaceConfig,
}

impl Default for LiveConfig {
    fn default() -> Self {
        LiveConfig {
            pipeline: PipelineConfig::default(),
            tick: Duration::from_millis(50),
            meter_interval: Duration::from_secs(1),
            usage_interval: Duration::from_secs(10),
            evidence_interval: Duration::from_secs(60),
            stt: FeedConfig::default(),
            stt_close_wait: Duration::from_secs(30),
            pace: PaceConfig::default(),
        }
    }
}

/// What sessions share: fair use (with the meter), plans, conversations, the speech-to-text provider, the
/// clock.
pub struct LiveServices {
    pub fair_use: FairUse,
    pub plans: Arc<dyn PlanStore>,
    pub conversations: Arc<dyn ConversationStore>,
    /// `none` keeps the session's hot path free of STT work: no audio is kept, copied or sent.
    pub stt: Arc<dyn SttProvider>,
    pub clock: Arc<dyn Clock>,
    /// Where each session reports the worst tick lag of each of its seconds (admission control reads it).
    pub tick_lag: Arc<load::TickLagWindow>,
}

/// One session's parameters, validated at connect.
#[derive(Debug, Clone)]
pub struct SessionParams {
    pub uid: Arc<str>,
    pub codec: Codec,
    pub language: String,
    /// Silence (stream audio time) that closes a conversation.
    pub conversation_timeout_ms: u64,
}

/// What the client asked of its session (read by the transport on the session's tick).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// `{"type":"Finalize"}`: the STT stream flushes what it has.
    Finalize,
    /// Finish: process everything already received, meter it, send `metadata`.
    Stop,
}

//! Live pipeline: one realtime listen session, from websocket frames to events and metered speech.
//!
//! - `ring`: the bounded byte queue from the websocket reader to the session (drops counted).
//! - `session`: the session task (decode → resample → VAD on every tick, metering each second, STT
//!   allowance, conversations, the final `metadata`).
//! - `pool`: the pipeline threads sessions run on (round-robin), off the websocket I/O workers.
//! - `events`: the JSON events sent to the client.

mod events;
mod pool;
mod ring;
mod session;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use tokio::sync::mpsc;

pub use events::LiveEvent;
pub use pool::{PipelinePool, PoolStopped};
pub use ring::{DropReason, FrameConsumer, FrameProducer, MAX_RECORD, frame_ring};
pub use session::{ChannelSink, EventSink, SessionReport, VecSink, run_session};

use crate::audio::codec::Codec;
use crate::conversation::ConversationStore;
use crate::fair_use::FairUse;
use crate::pipeline::stream::PipelineConfig;
use crate::store::plans::PlanStore;
use crate::stt::Transcriber;
use crate::time::Clock;

/// Session timing and the speech pipeline's tunables.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LiveConfig {
    pub pipeline: PipelineConfig,
    /// How often a session drains its ring and runs the VAD on what arrived (bounds event latency).
    pub tick: Duration,
    /// How often finished speech is sent to the meter (and STT usage recorded).
    pub meter_interval: Duration,
    /// How often the `usage` event is sent and the entitlement (stage, lock, STT allowance) re-read.
    pub usage_interval: Duration,
}

impl Default for LiveConfig {
    fn default() -> Self {
        LiveConfig {
            pipeline: PipelineConfig::default(),
            tick: Duration::from_millis(50),
            meter_interval: Duration::from_secs(1),
            usage_interval: Duration::from_secs(10),
        }
    }
}

/// What sessions share: fair use (with the meter), plans, conversations, the transcriber, the clock.
pub struct LiveServices {
    pub fair_use: FairUse,
    pub plans: Arc<dyn PlanStore>,
    pub conversations: Arc<dyn ConversationStore>,
    pub transcriber: Arc<dyn Transcriber>,
    pub clock: Arc<dyn Clock>,
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

/// Counters the websocket reader writes and the session reads (relaxed: they are statistics, and the
/// reader stops writing before it asks the session to stop).
#[derive(Debug, Default)]
pub struct FrameCounters {
    /// Binary messages received (keepalives included): the sequence of the newest frame.
    pub received: AtomicU64,
    pub dropped_ring_full: AtomicU64,
    pub dropped_too_large: AtomicU64,
}

impl FrameCounters {
    pub fn dropped(&self, reason: DropReason) -> &AtomicU64 {
        match reason {
            DropReason::RingFull => &self.dropped_ring_full,
            DropReason::TooLarge => &self.dropped_too_large,
        }
    }
}

/// Commands from the websocket reader to its session (rare; audio goes through the ring).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// `{"type":"Finalize"}`: process what arrived now and flush the STT stream.
    Finalize,
    /// Finish: process everything already in the ring, meter it, send `metadata`.
    Stop,
}

/// The session's inputs.
pub struct SessionInput {
    pub frames: FrameConsumer,
    pub counters: Arc<FrameCounters>,
    pub control: mpsc::Receiver<Control>,
}

//! The live session core's contract: what goes in besides frames ([`FrameCounts`]), what comes out
//! besides events ([`SttCommand`], [`SessionReport`]), and its observable states ([`Lifecycle`],
//! [`InFlight`]).

/// Frames the transport received and dropped so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FrameCounts {
    /// Binary messages received (keepalives included): the sequence of the newest frame.
    pub received: u64,
    pub dropped_ring_full: u64,
    pub dropped_too_large: u64,
}

impl FrameCounts {
    pub(super) fn dropped(&self) -> [u64; 2] {
        [self.dropped_ring_full, self.dropped_too_large]
    }
}

/// What the STT stream is told (only sessions with a provider get `Audio` and `EndOfRun`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SttCommand {
    /// Samples `[start, end)` of the stream at 16 kHz, already clipped to the STT allowance and charged:
    /// read them from the tap [`super::SessionCore::take_stt`] hands out with the commands.
    Audio {
        start: u64,
        end: u64,
    },
    /// The speech run (with its hangover) is complete.
    EndOfRun,
    Finalize,
    Close,
}

/// What a finished session did (also what its `metadata` event said).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionReport {
    pub frames_received: u64,
    pub frames_dropped: u64,
    pub audio_ms: u64,
    pub speech_ms: u64,
    /// Speech ms the meter acknowledged; equals `speech_ms` unless the meter failed.
    pub metered_ms: u64,
    pub stt_forwarded_ms: u64,
    /// A stable code when the pipeline failed (the server closes with 1011).
    pub error: Option<&'static str>,
}

/// Where the session is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifecycle {
    /// The first status read (which decides the STT gate and `locked`) has not started.
    Starting,
    Running,
    /// Stopped: the rest of the audio is processed, closed conversations written, the meter settled.
    Finishing,
    /// `metadata` sent.
    Finished,
}

/// The store operation in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InFlight {
    None,
    Meter,
    Status {
        first: bool,
    },
    Conversation,
    /// Transcript segments added to a written conversation.
    Transcript,
}

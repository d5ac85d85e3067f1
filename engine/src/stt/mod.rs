//! Speech-to-text: the providers VAD-gated speech is sent to, and the seam a session talks to them through.
//!
//! - [`provider`]: the [`SttProvider`] trait (a streaming handle per session, a batch API for sync spans),
//!   results through a bounded channel, exact `forwarded_samples` counted at the hand-off point.
//! - Providers: [`local`] (Moonshine, embedded, loaded at run time), [`none`] (metering only).
//! - [`select`]: which provider `VOICEGATE_STT` and the installed engine give at startup.
//! - [`chunk`]: cutting audio for a batch-only engine; [`wer`]: scoring transcripts.
//!
//! The live session still talks through the older, audio-less [`Transcriber`] seam below until it is wired
//! to [`SttProvider`] (docs/stt.md).

pub mod chunk;
pub mod local;
pub mod none;
pub mod provider;
pub mod select;
pub mod types;
pub mod wer;

pub use provider::{
    BatchOutput, BatchRequest, BatchTicket, ProviderKind, ResultReceiver, ResultSink, StreamHandle,
    StreamOptions, StreamStats, SttProvider, results_channel,
};
pub use types::{Pcm, ResultKind, SttError, SttEvent, SttResult, Word};

// --- The live session's current seam (time spans only) ---
//
// The paid speech-to-text seam: where a live session forwards the speech its STT allowance permits.
//
// A session opens one [`SttStream`] from the server's [`Transcriber`] and forwards each VAD-gated speech
// run (clipped to the user's remaining daily STT budget) as an [`SttSegment`]. The default,
// [`NoTranscriber`], forwards nothing anywhere: VoiceGate meters and gates STT; a deployment plugs its
// provider client in here. What is forwarded is counted (`stt_forwarded_ms`) whether or not a provider
// is attached, so budgets behave the same with and without one.

use std::sync::Arc;

use crate::audio::codec::Codec;

/// One forwarded stretch of speech, in stream audio milliseconds (0 = the session's first sample).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SttSegment {
    pub start_ms: u64,
    pub end_ms: u64,
}

/// What a transcriber learns about a session when it opens.
#[derive(Debug, Clone)]
pub struct SttSessionInfo {
    pub uid: Arc<str>,
    pub language: String,
    pub codec: Codec,
}

/// Opens one STT stream per live session. Shared by every session: cheap, thread-safe.
pub trait Transcriber: Send + Sync + 'static {
    fn open(&self, session: &SttSessionInfo) -> Box<dyn SttStream>;
}

/// One session's STT stream. Called from the session's pipeline thread; must not block for long
/// (hand work to a task or a bounded queue).
pub trait SttStream: Send {
    /// Speech the allowance lets through.
    fn forward(&mut self, segment: SttSegment);
    /// The client asked to finalize (`{"type":"Finalize"}`): flush what is pending.
    fn finalize(&mut self) {}
    /// The session ended.
    fn close(&mut self) {}
}

/// The default transcriber: accepts everything and sends it nowhere.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoTranscriber;

struct NoStream;

impl SttStream for NoStream {
    fn forward(&mut self, _segment: SttSegment) {}
}

impl Transcriber for NoTranscriber {
    fn open(&self, _session: &SttSessionInfo) -> Box<dyn SttStream> {
        Box::new(NoStream)
    }
}

//! Speech-to-text: the providers VAD-gated speech is sent to, and the seam a session talks to them through.
//!
//! - [`provider`]: the [`SttProvider`] trait (a streaming handle per session, a batch API for sync spans),
//!   results through a bounded channel, exact `forwarded_samples` counted at the hand-off point.
//! - Providers: [`local`] (Moonshine, embedded, loaded at run time), [`deepgram`] (Deepgram's live
//!   websocket API), [`openai`] (an OpenAI-compatible `POST /v1/audio/transcriptions`, one request per
//!   chunk), [`none`] (metering only). Remote providers connect through the shared
//!   [`crate::outbound::Outbound`] client and take their key from a [`key::KeySource`].
//! - [`fallback`]: a second provider serving while the primary fails (`VOICEGATE_STT_FALLBACK`).
//! - [`select`]: which provider `VOICEGATE_STT` and the installed engine give at startup.
//! - [`chunk`]: cutting audio for a batch-only engine; [`wer`]: scoring transcripts.
//!
//! A live session talks to its provider through `pipeline::live` (the feed, the link, the transcript).

pub mod chunk;
pub mod deepgram;
pub mod fallback;
pub mod http;
pub mod key;
pub mod local;
pub mod none;
pub mod openai;
pub mod provider;
mod runtime;
pub mod select;
pub mod types;
pub mod wer;

pub use provider::{
    BatchOutput, BatchRequest, BatchTicket, ProviderKind, ResultReceiver, ResultSink, StreamHandle,
    StreamOptions, StreamStats, SttProvider, results_channel,
};
pub use types::{Pcm, ResultKind, SttError, SttEvent, SttResult, Word};

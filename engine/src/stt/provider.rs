//! The provider seam: what every speech-to-text provider implements, and the bounded plumbing around it.
//!
//! - A live session opens one [`StreamHandle`] per session with [`SttProvider::open_stream`] and pushes the
//!   samples of each speech run while it runs. Pushing never blocks: a provider that cannot take more
//!   audio drops it, counts it (`voicegate_stt_dropped_samples_total`) and says so in the return value.
//! - Results come back asynchronously through a bounded channel ([`results_channel`]); a provider never
//!   waits on a slow reader (a full channel drops the result and counts it).
//! - Sync spans go through [`SttProvider::transcribe_batch`], answered through a [`BatchTicket`].
//! - `forwarded_samples` is counted where the audio is handed to the engine (the FFI call, the socket
//!   write): what a user is charged for is exactly what a provider received.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{mpsc, oneshot};

use super::types::{Pcm, SttError, SttEvent, SttResult};
use crate::telemetry;

/// Which provider a deployment runs (`VOICEGATE_STT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProviderKind {
    Local,
    Deepgram,
    OpenAi,
    None,
}

impl ProviderKind {
    /// Every valid value of `VOICEGATE_STT`, in the order the docs list them.
    pub const ALL: [ProviderKind; 4] = [
        ProviderKind::Local,
        ProviderKind::Deepgram,
        ProviderKind::OpenAi,
        ProviderKind::None,
    ];

    /// The configuration word, also the `provider` label of every STT metric.
    pub fn name(self) -> &'static str {
        match self {
            ProviderKind::Local => "local",
            ProviderKind::Deepgram => "deepgram",
            ProviderKind::OpenAi => "openai",
            ProviderKind::None => "none",
        }
    }

    /// A hosted provider that bills the audio it receives (what the daily spend ceiling counts).
    pub fn is_paid(self) -> bool {
        matches!(self, ProviderKind::Deepgram | ProviderKind::OpenAi)
    }

    /// Its position in [`ProviderKind::ALL`] (arrays counting per provider).
    pub fn index(self) -> usize {
        match self {
            ProviderKind::Local => 0,
            ProviderKind::Deepgram => 1,
            ProviderKind::OpenAi => 2,
            ProviderKind::None => 3,
        }
    }

    pub fn parse(word: &str) -> Option<ProviderKind> {
        ProviderKind::ALL
            .into_iter()
            .find(|k| k.name().eq_ignore_ascii_case(word.trim()))
    }
}

impl std::fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What a provider learns about a stream when it opens.
#[derive(Debug, Clone)]
pub struct StreamOptions {
    /// BCP-47-ish language the client asked for (`en`, `multi`, ...).
    pub language: String,
    /// Whether interim results are wanted (providers that cannot give them ignore it).
    pub interim_results: bool,
}

impl Default for StreamOptions {
    fn default() -> Self {
        StreamOptions {
            language: "en".to_string(),
            interim_results: true,
        }
    }
}

/// A speech-to-text provider. Shared by every session: cheap to call, thread-safe.
pub trait SttProvider: Send + Sync + 'static {
    fn kind(&self) -> ProviderKind;

    /// Whether audio sent through this provider counts toward the daily spend ceiling (a paid provider).
    fn paid(&self) -> bool {
        self.kind().is_paid()
    }

    /// Opens one session's stream. Results and events go to `results`, in order, ending with
    /// [`SttEvent::Closed`] after [`StreamHandle::close`].
    fn open_stream(
        &self,
        options: StreamOptions,
        results: ResultSink,
    ) -> Result<Box<dyn StreamHandle>, SttError>;

    /// Transcribes one stretch of recorded audio (a sync span). Never blocks: the answer comes through the
    /// ticket.
    fn transcribe_batch(&self, request: BatchRequest) -> Result<BatchTicket, SttError>;
}

/// One session's stream. Called from the session's pipeline thread: no method blocks.
pub trait StreamHandle: Send {
    /// Samples of the current speech run; `start` is the stream-time sample offset of `pcm[0]`. Runs are
    /// contiguous: a `start` that does not follow the previous push ends the previous run first.
    ///
    /// `Err(QueueFull)` means that audio (or audio held from before) was dropped, and counted.
    fn push(&mut self, start: u64, pcm: Pcm<'_>) -> Result<(), SttError>;
    /// The current speech run ended (the VAD's pause): a batch provider transcribes what it holds.
    fn end_of_run(&mut self) -> Result<(), SttError>;
    /// The client asked to finalize: flush everything pending into final results.
    fn finalize(&mut self) -> Result<(), SttError>;
    /// The session ended: flush, then send [`SttEvent::Closed`] once every result is out.
    fn close(&mut self);
    /// This stream's counters so far.
    fn stats(&self) -> StreamStats;
    /// The provider the last push went to, when the handle can serve from more than one (the fallback);
    /// `None`: the provider that opened it.
    fn serving(&self) -> Option<ProviderKind> {
        None
    }
}

/// Counters of one stream, shared between the session's handle and the provider's workers.
#[derive(Debug, Default)]
pub struct StreamCounters {
    forwarded_samples: AtomicU64,
    dropped_samples: AtomicU64,
    dropped_results: AtomicU64,
}

/// A copy of [`StreamCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamStats {
    /// Samples handed to the engine (the FFI call, the socket write): what the user is charged.
    pub forwarded_samples: u64,
    /// Samples pushed but never handed over (queue full, provider failing).
    pub dropped_samples: u64,
    /// Results the provider had but could not deliver (the results channel was full).
    pub dropped_results: u64,
}

impl StreamCounters {
    /// Counts samples at the hand-off point. Call it immediately before the FFI call or socket write.
    pub fn forwarded(&self, provider: ProviderKind, samples: u64) {
        self.forwarded_samples.fetch_add(samples, Ordering::Relaxed);
        count_forwarded(provider, samples);
    }

    /// Counts samples that will never reach the provider.
    pub fn dropped(&self, provider: ProviderKind, reason: &'static str, samples: u64) {
        self.dropped_samples.fetch_add(samples, Ordering::Relaxed);
        metrics::counter!(telemetry::STT_DROPPED_SAMPLES_TOTAL, "provider" => provider.name(), "reason" => reason)
            .increment(samples);
    }

    pub fn stats(&self) -> StreamStats {
        StreamStats {
            forwarded_samples: self.forwarded_samples.load(Ordering::Relaxed),
            dropped_samples: self.dropped_samples.load(Ordering::Relaxed),
            dropped_results: self.dropped_results.load(Ordering::Relaxed),
        }
    }
}

/// Exports a provider's series from its start, at zero: its error counters (one per `reason` it can
/// report), its queue depth, and the audio in / forwarded counters. A first error then shows as an
/// increase (`rate()` sees nothing of a series that first appears at 1, so an alert would miss it), and
/// the dashboards show 0 rather than no data. Values already counted are left as they are.
pub fn register_metrics(provider: ProviderKind, error_reasons: &[&'static str]) {
    let name = provider.name();
    for &reason in error_reasons {
        metrics::counter!(telemetry::STT_ERRORS_TOTAL, "provider" => name, "reason" => reason)
            .increment(0);
    }
    metrics::gauge!(telemetry::STT_QUEUE_DEPTH, "provider" => name).increment(0.0);
    metrics::counter!(telemetry::STT_AUDIO_IN_SAMPLES_TOTAL, "provider" => name).increment(0);
    metrics::counter!(telemetry::STT_FORWARDED_SAMPLES_TOTAL, "provider" => name).increment(0);
}

/// Counts samples handed to a provider in the node-wide metric (streams also count them per stream through
/// [`StreamCounters::forwarded`]; batch callers read [`BatchOutput::forwarded_samples`]).
pub fn count_forwarded(provider: ProviderKind, samples: u64) {
    metrics::counter!(telemetry::STT_FORWARDED_SAMPLES_TOTAL, "provider" => provider.name())
        .increment(samples);
}

/// The provider's end of a stream's bounded results channel.
#[derive(Debug, Clone)]
pub struct ResultSink {
    tx: mpsc::Sender<SttEvent>,
    counters: Arc<StreamCounters>,
    provider: ProviderKind,
}

/// The session's end of a stream's results channel.
pub type ResultReceiver = mpsc::Receiver<SttEvent>;

/// A bounded results channel holding at most `capacity` events (at least 1).
pub fn results_channel(capacity: usize) -> (ResultSink, ResultReceiver) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    (
        ResultSink {
            tx,
            counters: Arc::new(StreamCounters::default()),
            provider: ProviderKind::None,
        },
        rx,
    )
}

/// A bounded results channel whose sink counts into `counters`: a provider wrapping others (the fallback)
/// gives each inner stream one, so the stream's figures are one sum whatever provider served it.
pub(crate) fn results_channel_counting(
    capacity: usize,
    counters: Arc<StreamCounters>,
) -> (ResultSink, ResultReceiver) {
    let (sink, rx) = results_channel(capacity);
    (ResultSink { counters, ..sink }, rx)
}

impl ResultSink {
    /// The stream's counters (shared with every clone of this sink).
    pub fn counters(&self) -> &Arc<StreamCounters> {
        &self.counters
    }

    /// Labels this sink's metrics with the provider that owns it (providers call it in `open_stream`).
    pub fn for_provider(mut self, provider: ProviderKind) -> ResultSink {
        self.provider = provider;
        self
    }

    /// Sends without waiting. A full channel drops the event and counts it; a closed one (the session is
    /// gone) drops it silently. `Closed` is the one event worth keeping over a full channel, so it is the
    /// caller's to retry; it is reported back as `false`.
    pub fn send(&self, event: SttEvent) -> bool {
        match self.tx.try_send(event) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.counters
                    .dropped_results
                    .fetch_add(1, Ordering::Relaxed);
                metrics::counter!(telemetry::STT_RESULTS_DROPPED_TOTAL, "provider" => self.provider.name())
                    .increment(1);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    pub fn result(&self, result: SttResult) -> bool {
        self.send(SttEvent::Result(result))
    }

    /// Whether the session still listens.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// A stretch of recorded audio to transcribe in one go (a sync span).
#[derive(Debug, Clone)]
pub struct BatchRequest {
    /// 16 kHz mono samples in [-1, 1].
    pub samples: Arc<[f32]>,
    /// Speech runs inside `samples` (sample ranges relative to `samples[0]`, sorted). Providers that must
    /// cut the audio (the local engine) cut at the pauses between them; empty means "all of it is speech".
    pub speech: Vec<(u64, u64)>,
    pub language: String,
}

/// What a batch transcription returns.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BatchOutput {
    /// Final results in time order; times in ms relative to the request's first sample.
    pub results: Vec<SttResult>,
    /// Samples handed to the engine (what the user is charged).
    pub forwarded_samples: u64,
    /// The provider that answered, when the one asked may hand the span to another (the fallback).
    pub provider: Option<ProviderKind>,
}

/// The answer to one [`BatchRequest`], awaited or waited for.
#[derive(Debug)]
pub struct BatchTicket {
    rx: oneshot::Receiver<Result<BatchOutput, SttError>>,
}

/// The provider's end of a [`BatchTicket`].
#[derive(Debug)]
pub struct BatchReply {
    tx: oneshot::Sender<Result<BatchOutput, SttError>>,
}

pub fn batch_ticket() -> (BatchReply, BatchTicket) {
    let (tx, rx) = oneshot::channel();
    (BatchReply { tx }, BatchTicket { rx })
}

impl BatchReply {
    pub fn send(self, outcome: Result<BatchOutput, SttError>) {
        // The caller may have given up waiting: nothing to do then.
        let _ = self.tx.send(outcome);
    }
}

impl BatchTicket {
    /// Waits inside an async task.
    pub async fn recv(self) -> Result<BatchOutput, SttError> {
        self.rx.await.unwrap_or(Err(SttError::Closed))
    }

    /// Waits on a plain thread (never inside an async runtime's worker).
    pub fn wait(self) -> Result<BatchOutput, SttError> {
        self.rx.blocking_recv().unwrap_or(Err(SttError::Closed))
    }
}

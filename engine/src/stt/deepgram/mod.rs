//! `deepgram`: Deepgram's live websocket API for realtime sessions (docs/stt.md).
//!
//! - Every session's stream is one websocket to `<VOICEGATE_DEEPGRAM_URL>/v1/listen` (16 kHz mono
//!   `linear16`, interim results), run by its own task on the provider's runtime (one thread,
//!   `vg-deepgram`), so no pipeline thread ever waits on the network. The session's handle reaches the
//!   task through a bounded channel (at most 10 s of audio; beyond it pushes are dropped and counted).
//! - The protocol ([`protocol`]): `KeepAlive` while gated silence keeps the stream idle, `Finalize` at the
//!   end of each run and on the client's Finalize, `CloseStream` at the end; `Results` and `Metadata`
//!   parsed; results mapped back from the connection's audio clock to stream time (`clock.rs`).
//! - Failures (`connection.rs`): a refused connect (401, 402, 429, ...) or a mid-stream close is told to
//!   the session (`stt_unavailable`), counted, and retried with the shared backoff while there is audio
//!   to send; the open utterance is sent again after a reconnect, counted apart and never charged twice.
//! - The key: `DEEPGRAM_API_KEY`, or a key file read again at every connection ([`config::KeySource`]).
//! - Connections go through the one [`Outbound`] client (rustls, one CA setting).
//!
//! - Sync spans go to the pre-recorded API (`POST <base>/v1/listen`, `prerecorded.rs`): one request per span
//!   holding only its speech runs, bounded by `VOICEGATE_DEEPGRAM_BATCH_MAX_IN_FLIGHT`, retried as every
//!   hosted provider's requests are ([`crate::stt::http`]).

mod clock;
pub mod config;
mod connection;
mod prerecorded;
pub mod protocol;
mod stream;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use tokio::sync::mpsc;

pub use self::config::{DeepgramArgs, DeepgramConfig, DeepgramConfigError, KeySource};
use self::connection::Ctx;
use self::prerecorded::Slots;
use self::stream::{CMD_CAPACITY, DeepgramStream, Depth};
use super::provider::{
    BatchRequest, BatchTicket, ProviderKind, ResultSink, StreamHandle, StreamOptions, SttProvider,
};
use super::types::SttError;
use crate::outbound::Outbound;
use crate::stt::runtime::OwnedRuntime;

const KIND: ProviderKind = ProviderKind::Deepgram;

/// The provider: its configuration, the outbound client and the runtime its streams' tasks run on.
#[derive(Clone)]
pub struct DeepgramProvider {
    ctx: Arc<Ctx>,
    /// The bound on pre-recorded requests (sync spans).
    slots: Arc<Slots>,
    runtime: Arc<OwnedRuntime>,
}

impl std::fmt::Debug for DeepgramProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeepgramProvider")
            .field("url", &self.ctx.cfg.url)
            .field("model", &self.ctx.cfg.model)
            .finish()
    }
}

impl DeepgramProvider {
    /// Starts the provider's runtime. Nothing is connected until a session opens a stream, so an
    /// unreachable Deepgram at startup is a degraded start (each session is told), never a crash.
    pub fn start(cfg: DeepgramConfig, outbound: Outbound) -> Result<DeepgramProvider, SttError> {
        let runtime = OwnedRuntime::start("vg-deepgram")
            .map_err(|e| SttError::LoadFailed(format!("cannot start the Deepgram runtime: {e}")))?;
        // Every reason a stream's failure can have (`connection.rs`: the connect's HTTP answer, the
        // network, the messages).
        super::provider::register_metrics(
            KIND,
            &[
                "unauthorized",
                "payment",
                "rate_limited",
                "network",
                "protocol",
                "bad_request",
            ],
        );
        super::http::register_retry_metrics(KIND);
        Ok(DeepgramProvider {
            slots: Arc::new(Slots::new(cfg.batch_max_in_flight)),
            ctx: Arc::new(Ctx {
                cfg,
                outbound,
                depth: Arc::new(Depth::default()),
            }),
            runtime: Arc::new(runtime),
        })
    }
}

impl SttProvider for DeepgramProvider {
    fn kind(&self) -> ProviderKind {
        KIND
    }

    fn open_stream(
        &self,
        options: StreamOptions,
        results: ResultSink,
    ) -> Result<Box<dyn StreamHandle>, SttError> {
        let Some(runtime) = self.runtime.get() else {
            return Err(SttError::Closed);
        };
        let sink = results.for_provider(KIND);
        let (tx, rx) = mpsc::channel(CMD_CAPACITY);
        let queued = Arc::new(AtomicU64::new(0));
        runtime.spawn(connection::run(
            Arc::clone(&self.ctx),
            options,
            rx,
            Arc::clone(&queued),
            sink.clone(),
        ));
        Ok(Box::new(DeepgramStream {
            tx: Some(tx),
            queued,
            depth: Arc::clone(&self.ctx.depth),
            sink,
            closed: false,
        }))
    }

    fn transcribe_batch(&self, request: BatchRequest) -> Result<BatchTicket, SttError> {
        let Some(runtime) = self.runtime.get() else {
            return Err(SttError::Closed);
        };
        prerecorded::submit(&self.ctx, &self.slots, runtime, request)
    }
}

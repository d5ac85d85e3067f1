//! `openai`: an OpenAI-compatible `POST /v1/audio/transcriptions` (OpenAI's API; whisper.cpp's server,
//! faster-whisper-server, vLLM and others serve the same request) for live sessions and sync spans
//! (docs/stt.md).
//!
//! - The API transcribes whole files, so audio goes as one request per chunk: a live stream's speech run
//!   is held and sent when the run ends (the VAD's pause), on the client's Finalize, or at the 10 s cap
//!   cut at a quiet point ([`crate::stt::chunk::RunChunker`]); a sync span is cut by
//!   [`crate::stt::chunk::batch_chunks`], as for the local engine. Each chunk is a WAV in a
//!   `multipart/form-data` body ([`protocol`]); `verbose_json` segments come back as final results in
//!   stream time (the chunk's offset added); a `json`-only server's `{text}` is one result per chunk.
//! - Nothing waits on a pipeline thread: a stream's chunks go, in order, to its own task on the
//!   provider's runtime (one thread, `vg-openai`); a node holds at most `VOICEGATE_OPENAI_QUEUE_CHUNKS`
//!   chunks and has at most `VOICEGATE_OPENAI_MAX_IN_FLIGHT` requests open (a chunk past the queue is
//!   dropped and counted, `queue_full`).
//! - `forwarded_samples` counts a chunk once its request went out (`request.rs`); a request that could
//!   not connect counts as dropped (`provider_down`).
//! - Failures (401/403, 402 or 429 `insufficient_quota`, 429, 5xx, timeouts, unreachable, a malformed
//!   answer) are counted in `voicegate_stt_errors_total{reason}`, told to the session once each
//!   ([`SttEvent::Error`]; the session says `stt_unavailable`) and cost that chunk its transcript, never
//!   the session. A 429, a 5xx or a failed connection is first retried (`VOICEGATE_OPENAI_RETRIES`, 2;
//!   `request.rs`); only the last attempt's failure counts.
//! - The key: `OPENAI_API_KEY`, or a key file read again at every request; none for a self-hosted server
//!   that takes none (no `Authorization` header then).
//!
//! [`SttEvent::Error`]: crate::stt::SttEvent::Error

pub mod config;
pub mod protocol;
mod request;
mod stream;

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc};

pub use self::config::{OpenAiArgs, OpenAiConfig, OpenAiConfigError};
use self::request::{Ctx, Places};
use self::stream::{CHUNK_CAPACITY, OpenAiStream};
use super::chunk::{MAX_CHUNK_SAMPLES, batch_chunks};
use super::provider::{
    BatchOutput, BatchRequest, BatchTicket, ProviderKind, ResultSink, StreamHandle, StreamOptions,
    SttProvider, batch_ticket, count_forwarded,
};
use super::types::{Pcm, SttError};
use crate::outbound::Outbound;
use crate::stt::runtime::OwnedRuntime;
use crate::telemetry as t;

const KIND: ProviderKind = ProviderKind::OpenAi;

/// The provider: its configuration, the outbound client and the runtime its requests run on.
#[derive(Clone)]
pub struct OpenAiProvider {
    ctx: Arc<Ctx>,
    runtime: Arc<OwnedRuntime>,
}

impl std::fmt::Debug for OpenAiProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenAiProvider")
            .field("url", &self.ctx.cfg.url)
            .field("model", &self.ctx.cfg.model)
            .finish()
    }
}

impl OpenAiProvider {
    /// Starts the provider's runtime and, in the background, checks once that the server answers at all:
    /// an unreachable server is a logged degraded start (each session is told when its audio fails),
    /// never a refusal or a crash.
    pub fn start(cfg: OpenAiConfig, outbound: Outbound) -> Result<OpenAiProvider, SttError> {
        let runtime = OwnedRuntime::start("vg-openai").map_err(|e| {
            SttError::LoadFailed(format!("cannot start the OpenAI provider's runtime: {e}"))
        })?;
        // Every reason a request's failure can have (`protocol.rs`: the HTTP answer, the network, the body).
        super::provider::register_metrics(
            KIND,
            &[
                "unauthorized",
                "payment",
                "rate_limited",
                "network",
                "protocol",
                "bad_request",
                "engine",
            ],
        );
        super::http::register_retry_metrics(KIND);
        let ctx = Arc::new(Ctx {
            permits: Semaphore::new(cfg.max_in_flight.max(1)),
            held: AtomicUsize::new(0),
            cfg,
            outbound,
        });
        if let Some(rt) = runtime.get() {
            rt.spawn(probe(Arc::clone(&ctx)));
        }
        Ok(OpenAiProvider {
            ctx,
            runtime: Arc::new(runtime),
        })
    }
}

/// Any HTTP answer from the transcriptions URL (even 404 or 405) means the server is there.
async fn probe(ctx: Arc<Ctx>) {
    let url = &ctx.cfg.url;
    match ctx
        .outbound
        .http()
        .get(url)
        .timeout(Duration::from_secs(10))
        .send()
        .await
    {
        Ok(r) => {
            tracing::info!(message = "The OpenAI-compatible speech-to-text server answers.", url = %url, status = r.status().as_u16())
        }
        Err(e) => {
            tracing::warn!(message = "The OpenAI-compatible speech-to-text server is unreachable: starting degraded; sessions are told stt_unavailable while it stays so.", url = %url, error = %e)
        }
    }
}

impl SttProvider for OpenAiProvider {
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
        let (tx, rx) = mpsc::channel(CHUNK_CAPACITY);
        runtime.spawn(stream::run(
            Arc::clone(&self.ctx),
            rx,
            sink.clone(),
            protocol::language(&options.language),
        ));
        Ok(Box::new(OpenAiStream::new(Arc::clone(&self.ctx), tx, sink)))
    }

    fn transcribe_batch(&self, request: BatchRequest) -> Result<BatchTicket, SttError> {
        let Some(runtime) = self.runtime.get() else {
            return Err(SttError::Closed);
        };
        let chunks = batch_chunks(&request.samples, &request.speech, MAX_CHUNK_SAMPLES);
        let Some(places) = Places::take(&self.ctx, chunks.len()) else {
            // Not counted as dropped here: the sync path offers the span again (transcribe.rs) and counts
            // it once if it gives up.
            let dropped: u64 = chunks.iter().map(|(s, e)| (e - s) as u64).sum();
            return Err(SttError::QueueFull {
                dropped_samples: dropped,
            });
        };
        let (reply, ticket) = batch_ticket();
        let ctx = Arc::clone(&self.ctx);
        runtime.spawn(async move {
            reply.send(batch(&ctx, &request, &chunks, places).await);
        });
        Ok(ticket)
    }
}

/// A sync span's chunks, one request each, in order; the first failure fails the span.
async fn batch(
    ctx: &Ctx,
    request: &BatchRequest,
    chunks: &[(usize, usize)],
    mut places: Places,
) -> Result<BatchOutput, SttError> {
    let language = protocol::language(&request.language);
    let mut out = BatchOutput {
        provider: Some(KIND),
        ..BatchOutput::default()
    };
    for &(s, e) in chunks {
        let mut pcm = Vec::with_capacity(e - s);
        Pcm::F32(&request.samples[s..e]).extend_i16(&mut pcm);
        let outcome = request::transcribe(ctx, &pcm, s as u64, language.as_deref()).await;
        places.release_one();
        let n = pcm.len() as u64;
        if outcome.forwarded {
            out.forwarded_samples += n;
            count_forwarded(KIND, n);
        } else {
            metrics::counter!(t::STT_DROPPED_SAMPLES_TOTAL, "provider" => KIND.name(), "reason" => "provider_down")
                .increment(n);
        }
        out.results.extend(outcome.results?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests;

//! One transcription request (one chunk of at most 10 s), on the provider's runtime: the node-wide bound
//! on chunks held and requests open, the key read now, the answer read back (bounded) and parsed; every
//! failure counted by reason.
//!
//! `forwarded_samples` is counted when the request went out: the server answered (any status) or the
//! request failed after its connection was open (a timeout, a reset). A request that could not connect
//! never handed its audio over: that audio counts as dropped (`provider_down`).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use rand::RngExt as _;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE};
use tokio::sync::Semaphore;

use super::KIND;
use super::config::OpenAiConfig;
use super::protocol::{self, MAX_RESPONSE_BYTES};
use crate::outbound::Outbound;
use crate::stt::types::{SttError, SttResult};
use crate::telemetry as t;

/// What every stream and batch of the provider shares.
pub(super) struct Ctx {
    pub cfg: OpenAiConfig,
    pub outbound: Outbound,
    /// Requests open at once, at most `cfg.max_in_flight`.
    pub permits: Semaphore,
    /// Chunks held (waiting or in flight), at most `cfg.queue_chunks`.
    pub held: AtomicUsize,
}

/// `n` chunks' places in the node-wide queue, given back when dropped.
pub(super) struct Places {
    ctx: Arc<Ctx>,
    n: usize,
}

impl Places {
    /// Takes `n` places, or none when fewer are free (the caller drops the audio, counted).
    pub(super) fn take(ctx: &Arc<Ctx>, n: usize) -> Option<Places> {
        let limit = ctx.cfg.queue_chunks;
        ctx.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                (held + n <= limit).then_some(held + n)
            })
            .ok()
            .map(|held| {
                depth(held + n);
                Places {
                    ctx: Arc::clone(ctx),
                    n,
                }
            })
    }

    /// Gives one place back (a chunk is done).
    pub(super) fn release_one(&mut self) {
        if self.n > 0 {
            self.n -= 1;
            let held = self
                .ctx
                .held
                .fetch_sub(1, Ordering::AcqRel)
                .saturating_sub(1);
            depth(held);
        }
    }
}

impl Drop for Places {
    fn drop(&mut self) {
        while self.n > 0 {
            self.release_one();
        }
    }
}

fn depth(held: usize) {
    metrics::gauge!(t::STT_QUEUE_DEPTH, "provider" => KIND.name()).set(held as f64);
}

/// How one request ended: its results, or the error (counted), and whether its audio was handed over.
pub(super) struct Outcome {
    pub results: Result<Vec<SttResult>, SttError>,
    pub forwarded: bool,
}

/// Transcribes one chunk (`pcm` at stream offset `start`), waiting for a request slot first.
pub(super) async fn transcribe(
    ctx: &Ctx,
    pcm: &[i16],
    start: u64,
    language: Option<&str>,
) -> Outcome {
    let queued = Instant::now();
    let Ok(_permit) = ctx.permits.acquire().await else {
        return Outcome {
            results: Err(SttError::Closed),
            forwarded: false,
        };
    };
    metrics::histogram!(t::STT_QUEUE_WAIT_SECONDS, "provider" => KIND.name())
        .record(queued.elapsed().as_secs_f64());
    let began = Instant::now();
    let outcome = send(ctx, pcm, start, language).await;
    metrics::histogram!(t::STT_ENGINE_DURATION_SECONDS, "provider" => KIND.name())
        .record(began.elapsed().as_secs_f64());
    if let Err(e) = &outcome.results {
        metrics::counter!(t::STT_ERRORS_TOTAL, "provider" => KIND.name(), "reason" => e.code())
            .increment(1);
        tracing::warn!(message = "OpenAI-compatible transcription failed; the audio gets no transcript.", reason = e.code(), error = %e, samples = pcm.len());
    }
    outcome
}

async fn send(ctx: &Ctx, pcm: &[i16], start: u64, language: Option<&str>) -> Outcome {
    let not_sent = |e: SttError| Outcome {
        results: Err(e),
        forwarded: false,
    };
    let key = match ctx.cfg.key.as_ref().map(|k| k.current()).transpose() {
        Ok(key) => key,
        Err(e) => return not_sent(e),
    };
    let boundary = {
        let mut rng = rand::rng();
        format!(
            "voicegate-{:016x}{:016x}",
            rng.random::<u64>(),
            rng.random::<u64>()
        )
    };
    let form = protocol::form(pcm, &ctx.cfg.model, language, &boundary);
    let mut request = ctx
        .outbound
        .http()
        .post(&ctx.cfg.url)
        .timeout(ctx.cfg.timeout)
        .header(CONTENT_TYPE, form.content_type)
        .body(form.body);
    if let Some(key) = key {
        request = request.header(AUTHORIZATION, format!("Bearer {key}"));
    }
    let mut response = match request.send().await {
        Ok(r) => r,
        Err(e) if e.is_connect() => {
            return not_sent(SttError::Network(format!(
                "cannot connect to {}: {e}",
                ctx.cfg.url
            )));
        }
        Err(e) if e.is_builder() => {
            return not_sent(SttError::BadRequest(format!("{}: {e}", ctx.cfg.url)));
        }
        Err(e) => {
            let why = if e.is_timeout() {
                format!("no answer within {:?}", ctx.cfg.timeout)
            } else {
                e.to_string()
            };
            return Outcome {
                results: Err(SttError::Network(why)),
                forwarded: true,
            };
        }
    };
    let status = response.status();
    let mut body = Vec::new();
    let read = loop {
        match response.chunk().await {
            Ok(Some(bytes)) if body.len() + bytes.len() <= MAX_RESPONSE_BYTES => {
                body.extend_from_slice(&bytes);
            }
            Ok(Some(_)) => {
                break Err(SttError::Protocol(format!(
                    "the answer is larger than {MAX_RESPONSE_BYTES} bytes"
                )));
            }
            Ok(None) => break Ok(()),
            Err(e) => break Err(SttError::Network(format!("reading the answer: {e}"))),
        }
    };
    let results = if !status.is_success() {
        Err(protocol::status_error(status.as_u16(), &body))
    } else {
        read.and_then(|()| protocol::parse(&body))
            .map(|t| protocol::results(&t, start, pcm.len() as u64))
    };
    Outcome {
        results,
        forwarded: true,
    }
}

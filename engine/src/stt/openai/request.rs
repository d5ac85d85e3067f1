//! One transcription request (one chunk of at most 10 s), on the provider's runtime: the node-wide bound
//! on chunks held and requests open, the key read now, the answer read back (bounded) and parsed; every
//! failure counted by reason.
//!
//! `forwarded_samples` is counted when the request went out: the server answered (any status) or the
//! request failed after its connection was open (a timeout, a reset). A request that could not connect
//! never handed its audio over: that audio counts as dropped (`provider_down`).
//!
//! **Retries** (`VOICEGATE_OPENAI_RETRIES`, 2): a chunk is sent again after a failure a later attempt can
//! fix and that cost the provider nothing to refuse: 429 (not `insufficient_quota`, which is the account's
//! balance), 5xx, or no connection. A timeout or a reset after the audio went out is not retried: the
//! provider may have transcribed (and billed) it. Between attempts the house [`Backoff`] (0.5-5 s, jittered),
//! or a 429's `Retry-After` when it says longer (up to 10 s; longer is not waited for). The request slot is
//! given back while waiting. The chunk counts as forwarded once (the user is charged once); the audio of
//! each further attempt that went out is counted in `voicegate_stt_resent_samples_total`, and each retry in
//! `voicegate_stt_retries_total{reason}`. Only the last attempt's failure is an error (counted, told to
//! the session).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rand::RngExt as _;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE};
use tokio::sync::Semaphore;

use super::KIND;
use super::config::OpenAiConfig;
use super::protocol::{self, MAX_RESPONSE_BYTES};
use crate::outbound::Outbound;
use crate::stt::types::{SttError, SttResult};
use crate::telemetry as t;
use crate::time::Backoff;

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

/// How one attempt ended, and whether another one may fix it (and after how long at least).
struct Attempt {
    outcome: Outcome,
    retry: Option<Duration>,
}

/// The first retry waits at least this; the ceiling doubles per retry.
const RETRY_BASE: Duration = Duration::from_millis(500);
/// The longest backoff between two attempts.
const RETRY_MAX: Duration = Duration::from_secs(5);
/// The longest `Retry-After` of a 429 that is waited for (past it the chunk fails now).
const RETRY_AFTER_MAX: Duration = Duration::from_secs(10);

/// Transcribes one chunk (`pcm` at stream offset `start`): waits for a request slot, sends, and retries a
/// retryable failure up to `VOICEGATE_OPENAI_RETRIES` times (module docs).
pub(super) async fn transcribe(
    ctx: &Ctx,
    pcm: &[i16],
    start: u64,
    language: Option<&str>,
) -> Outcome {
    let mut backoff = Backoff::new(RETRY_BASE, RETRY_MAX);
    let mut forwarded = false;
    let mut retries = 0;
    loop {
        let Attempt { outcome, retry } = attempt(ctx, pcm, start, language).await;
        if outcome.forwarded && forwarded {
            metrics::counter!(t::STT_RESENT_SAMPLES_TOTAL, "provider" => KIND.name())
                .increment(pcm.len() as u64);
        }
        forwarded |= outcome.forwarded;
        let (Err(e), Some(at_least)) = (&outcome.results, retry) else {
            return finish(outcome.results, forwarded, pcm.len());
        };
        if retries >= ctx.cfg.retries {
            return finish(outcome.results, forwarded, pcm.len());
        }
        retries += 1;
        metrics::counter!(t::STT_RETRIES_TOTAL, "provider" => KIND.name(), "reason" => e.code())
            .increment(1);
        let wait = backoff.next_delay().max(at_least);
        tracing::debug!(message = "OpenAI-compatible transcription failed; retrying.", reason = e.code(), error = %e, retry = retries, wait_ms = wait.as_millis() as u64);
        tokio::time::sleep(wait).await;
    }
}

/// The chunk's outcome: a failure is counted and logged once, for the last attempt.
fn finish(results: Result<Vec<SttResult>, SttError>, forwarded: bool, samples: usize) -> Outcome {
    if let Err(e) = &results {
        metrics::counter!(t::STT_ERRORS_TOTAL, "provider" => KIND.name(), "reason" => e.code())
            .increment(1);
        tracing::warn!(message = "OpenAI-compatible transcription failed; the audio gets no transcript.", reason = e.code(), error = %e, samples);
    }
    Outcome { results, forwarded }
}

/// One attempt, holding a request slot only while it runs.
async fn attempt(ctx: &Ctx, pcm: &[i16], start: u64, language: Option<&str>) -> Attempt {
    let queued = Instant::now();
    let Ok(_permit) = ctx.permits.acquire().await else {
        return Attempt {
            outcome: Outcome {
                results: Err(SttError::Closed),
                forwarded: false,
            },
            retry: None,
        };
    };
    metrics::histogram!(t::STT_QUEUE_WAIT_SECONDS, "provider" => KIND.name())
        .record(queued.elapsed().as_secs_f64());
    let began = Instant::now();
    let attempt = send(ctx, pcm, start, language).await;
    metrics::histogram!(t::STT_ENGINE_DURATION_SECONDS, "provider" => KIND.name())
        .record(began.elapsed().as_secs_f64());
    attempt
}

async fn send(ctx: &Ctx, pcm: &[i16], start: u64, language: Option<&str>) -> Attempt {
    let not_sent = |e: SttError, retry: Option<Duration>| Attempt {
        outcome: Outcome {
            results: Err(e),
            forwarded: false,
        },
        retry,
    };
    let key = match ctx.cfg.key.as_ref().map(|k| k.current()).transpose() {
        Ok(key) => key,
        Err(e) => return not_sent(e, None),
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
            // Nothing went out: another attempt costs nothing.
            return not_sent(
                SttError::Network(format!("cannot connect to {}: {e}", ctx.cfg.url)),
                Some(Duration::ZERO),
            );
        }
        Err(e) if e.is_builder() => {
            return not_sent(SttError::BadRequest(format!("{}: {e}", ctx.cfg.url)), None);
        }
        Err(e) => {
            let why = if e.is_timeout() {
                format!("no answer within {:?}", ctx.cfg.timeout)
            } else {
                e.to_string()
            };
            // The audio went out: the provider may have transcribed it. Not retried.
            return Attempt {
                outcome: Outcome {
                    results: Err(SttError::Network(why)),
                    forwarded: true,
                },
                retry: None,
            };
        }
    };
    let status = response.status();
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
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
    let (results, retry) = if !status.is_success() {
        let e = protocol::status_error(status.as_u16(), &body);
        // The provider refused the request (429, 5xx): another attempt may pass, unless the 429 asks
        // for a longer wait than a chunk of live audio can take.
        let retry = matches!(e, SttError::RateLimited(_) | SttError::Engine(_))
            || (status.is_server_error() && matches!(e, SttError::Network(_)));
        let retry = match retry_after {
            Some(after) if after > RETRY_AFTER_MAX => None,
            after => retry.then(|| after.unwrap_or(Duration::ZERO)),
        };
        (Err(e), retry)
    } else {
        let results = read
            .and_then(|()| protocol::parse(&body))
            .map(|t| protocol::results(&t, start, pcm.len() as u64));
        (results, None)
    };
    Attempt {
        outcome: Outcome {
            results,
            forwarded: true,
        },
        retry,
    }
}

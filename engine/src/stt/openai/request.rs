//! One transcription request (one chunk of at most 10 s), on the provider's runtime: the node-wide bound
//! on chunks held and requests open, the key read now, the answer read back (bounded) and parsed; every
//! failure counted by reason.
//!
//! `forwarded_samples` is counted when the request went out: the server answered (any status) or the
//! request failed after its connection was open (a timeout, a reset). A request that could not connect
//! never handed its audio over: that audio counts as dropped (`provider_down`).
//!
//! **Retries** (`VOICEGATE_OPENAI_RETRIES`, 2): a 429 (not `insufficient_quota`, which is the account's
//! balance), a 5xx or a failed connection is sent again after the house backoff, as
//! [`crate::stt::http`] says for every hosted provider. The request slot is given back while waiting. The
//! chunk counts as forwarded once (the user is charged once); only the last attempt's failure is an error
//! (counted, told to the session).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use rand::RngExt as _;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE};
use tokio::sync::Semaphore;

use super::KIND;
use super::config::OpenAiConfig;
use super::protocol::{self, MAX_RESPONSE_BYTES};
use crate::outbound::Outbound;
use crate::stt::http::{self, Attempt};
use crate::stt::types::SttResult;
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
pub(super) type Outcome = http::Outcome<Vec<SttResult>>;

/// Transcribes one chunk (`pcm` at stream offset `start`): waits for a request slot, sends, and retries a
/// retryable failure up to `VOICEGATE_OPENAI_RETRIES` times ([`http::with_retries`]).
pub(super) async fn transcribe(
    ctx: &Ctx,
    pcm: &[i16],
    start: u64,
    language: Option<&str>,
) -> Outcome {
    http::with_retries(KIND, ctx.cfg.retries, pcm.len(), || {
        http::in_slot(KIND, &ctx.permits, send(ctx, pcm, start, language))
    })
    .await
}

async fn send(
    ctx: &Ctx,
    pcm: &[i16],
    start: u64,
    language: Option<&str>,
) -> Attempt<Vec<SttResult>> {
    let key = match ctx.cfg.key.as_ref().map(|k| k.current()).transpose() {
        Ok(key) => key,
        Err(e) => return Attempt::not_sent(e, None),
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
        Err(e) => return Attempt::failed(&e, &ctx.cfg.url, ctx.cfg.timeout),
    };
    let status = response.status();
    let retry_after = http::retry_after(&response);
    let read = http::read_body(&mut response, MAX_RESPONSE_BYTES).await;
    let (results, retry) = if !status.is_success() {
        let e = protocol::status_error(status.as_u16(), read.as_deref().unwrap_or_default());
        let retry = http::retry_for(status.as_u16(), &e, retry_after);
        (Err(e), retry)
    } else {
        let results = read
            .and_then(|body| protocol::parse(&body))
            .map(|t| protocol::results(&t, start, pcm.len() as u64));
        (results, None)
    };
    Attempt {
        outcome: http::Outcome {
            results,
            forwarded: true,
        },
        retry,
    }
}

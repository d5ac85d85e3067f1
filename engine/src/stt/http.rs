//! What the hosted providers' HTTP requests share (the OpenAI-compatible API, Deepgram's pre-recorded API):
//! a request slot held only while a request runs, the answer read within a bound, the failure of a request
//! that did not complete, and the retry loop.
//!
//! **Retries**: a request is sent again after a failure a later attempt can fix and that cost the provider
//! nothing to refuse: 429 (not a balance or quota refusal, which maps to `payment`), 5xx, or no connection.
//! A timeout or a reset after the audio went out is not retried: the provider may have transcribed (and
//! billed) it. Between attempts the house [`Backoff`] (0.5-5 s, jittered), or a 429's `Retry-After` when it
//! says longer (up to 10 s; longer is not waited for). The audio counts as forwarded once (the user is
//! charged once); the audio of each further attempt that went out is counted in
//! `voicegate_stt_resent_samples_total`, each retry in `voicegate_stt_retries_total{reason}`. Only the last
//! attempt's failure is an error (counted in `voicegate_stt_errors_total`, logged).

use std::future::Future;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use super::provider::ProviderKind;
use super::types::SttError;
use crate::telemetry as t;
use crate::time::Backoff;

/// The first retry waits at least this; the ceiling doubles per retry.
pub const RETRY_BASE: Duration = Duration::from_millis(500);
/// The longest backoff between two attempts.
pub const RETRY_MAX: Duration = Duration::from_secs(5);
/// The longest `Retry-After` of a 429 that is waited for (past it the request fails now).
pub const RETRY_AFTER_MAX: Duration = Duration::from_secs(10);

/// How one request ended: its results, or the error, and whether its audio was handed over.
#[derive(Debug)]
pub struct Outcome<T> {
    pub results: Result<T, SttError>,
    pub forwarded: bool,
}

/// How one attempt ended, and whether another one may fix it (and after how long at least).
#[derive(Debug)]
pub struct Attempt<T> {
    pub outcome: Outcome<T>,
    pub retry: Option<Duration>,
}

impl<T> Attempt<T> {
    /// A failure before any audio went out.
    pub fn not_sent(error: SttError, retry: Option<Duration>) -> Attempt<T> {
        Attempt {
            outcome: Outcome {
                results: Err(error),
                forwarded: false,
            },
            retry,
        }
    }

    /// A request that did not complete: a failed connection (nothing went out: retried at once), a request
    /// that could not be built, or a timeout or reset after the audio went out (not retried).
    pub fn failed(e: &reqwest::Error, url: &str, timeout: Duration) -> Attempt<T> {
        if e.is_connect() {
            return Attempt::not_sent(
                SttError::Network(format!("cannot connect to {url}: {e}")),
                Some(Duration::ZERO),
            );
        }
        if e.is_builder() {
            return Attempt::not_sent(SttError::BadRequest(format!("{url}: {e}")), None);
        }
        let why = if e.is_timeout() {
            format!("no answer within {timeout:?}")
        } else {
            e.to_string()
        };
        Attempt {
            outcome: Outcome {
                results: Err(SttError::Network(why)),
                forwarded: true,
            },
            retry: None,
        }
    }
}

/// Whether a refused request (`status`, mapped to `error`) may pass on another attempt, and after how long:
/// a 429 or a 5xx may, unless its `Retry-After` asks for longer than [`RETRY_AFTER_MAX`].
pub fn retry_for(status: u16, error: &SttError, retry_after: Option<Duration>) -> Option<Duration> {
    let retry = matches!(error, SttError::RateLimited(_) | SttError::Engine(_))
        || (status >= 500 && matches!(error, SttError::Network(_)));
    match retry_after {
        Some(after) if after > RETRY_AFTER_MAX => None,
        after => retry.then(|| after.unwrap_or(Duration::ZERO)),
    }
}

/// A response's `Retry-After` in whole seconds (the HTTP-date form is not used by these providers).
pub fn retry_after(response: &reqwest::Response) -> Option<Duration> {
    response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
}

/// Reads a response's body, refusing one longer than `max` bytes (a provider's answer is small; a larger
/// one is not what was asked for).
pub async fn read_body(response: &mut reqwest::Response, max: usize) -> Result<Vec<u8>, SttError> {
    let mut body = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(bytes)) if body.len() + bytes.len() <= max => body.extend_from_slice(&bytes),
            Ok(Some(_)) => {
                return Err(SttError::Protocol(format!(
                    "the answer is larger than {max} bytes"
                )));
            }
            Ok(None) => return Ok(body),
            Err(e) => return Err(SttError::Network(format!("reading the answer: {e}"))),
        }
    }
}

/// Runs one attempt holding one of `permits` (a provider's requests open at once), timing the wait for the
/// slot and the request.
pub async fn in_slot<T>(
    provider: ProviderKind,
    permits: &Semaphore,
    send: impl Future<Output = Attempt<T>>,
) -> Attempt<T> {
    let queued = Instant::now();
    let Ok(_permit) = permits.acquire().await else {
        return Attempt::not_sent(SttError::Closed, None);
    };
    metrics::histogram!(t::STT_QUEUE_WAIT_SECONDS, "provider" => provider.name())
        .record(queued.elapsed().as_secs_f64());
    let began = Instant::now();
    let attempt = send.await;
    metrics::histogram!(t::STT_ENGINE_DURATION_SECONDS, "provider" => provider.name())
        .record(began.elapsed().as_secs_f64());
    attempt
}

/// Sends `samples` of audio with `attempt` and retries a retryable failure up to `retries` times (module
/// docs).
pub async fn with_retries<T, F, Fut>(
    provider: ProviderKind,
    retries: u32,
    samples: usize,
    mut attempt: F,
) -> Outcome<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Attempt<T>>,
{
    let mut backoff = Backoff::new(RETRY_BASE, RETRY_MAX);
    let mut forwarded = false;
    let mut tries = 0;
    loop {
        let Attempt { outcome, retry } = attempt().await;
        if outcome.forwarded && forwarded {
            metrics::counter!(t::STT_RESENT_SAMPLES_TOTAL, "provider" => provider.name())
                .increment(samples as u64);
        }
        forwarded |= outcome.forwarded;
        let (Err(e), Some(at_least)) = (&outcome.results, retry) else {
            return finish(provider, outcome.results, forwarded, samples);
        };
        if tries >= retries {
            return finish(provider, outcome.results, forwarded, samples);
        }
        tries += 1;
        metrics::counter!(t::STT_RETRIES_TOTAL, "provider" => provider.name(), "reason" => e.code())
            .increment(1);
        let wait = backoff.next_delay().max(at_least);
        tracing::debug!(message = "A transcription request failed; retrying.", provider = provider.name(), reason = e.code(), error = %e, retry = tries, wait_ms = wait.as_millis() as u64);
        tokio::time::sleep(wait).await;
    }
}

/// The request's outcome: a failure is counted and logged once, for the last attempt.
fn finish<T>(
    provider: ProviderKind,
    results: Result<T, SttError>,
    forwarded: bool,
    samples: usize,
) -> Outcome<T> {
    if let Err(e) = &results {
        metrics::counter!(t::STT_ERRORS_TOTAL, "provider" => provider.name(), "reason" => e.code())
            .increment(1);
        tracing::warn!(message = "A transcription request failed; its audio gets no transcript.", provider = provider.name(), reason = e.code(), error = %e, samples);
    }
    Outcome { results, forwarded }
}

/// Exports the retry series of a provider that retries, at zero.
pub fn register_retry_metrics(provider: ProviderKind) {
    for reason in ["rate_limited", "engine", "network"] {
        metrics::counter!(t::STT_RETRIES_TOTAL, "provider" => provider.name(), "reason" => reason)
            .increment(0);
    }
    metrics::counter!(t::STT_RESENT_SAMPLES_TOTAL, "provider" => provider.name()).increment(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_rate_limits_and_server_errors_are_retried_within_the_longest_wait() {
        let limited = SttError::RateLimited("429".into());
        assert_eq!(retry_for(429, &limited, None), Some(Duration::ZERO));
        assert_eq!(
            retry_for(429, &limited, Some(Duration::from_secs(3))),
            Some(Duration::from_secs(3))
        );
        assert_eq!(
            retry_for(429, &limited, Some(Duration::from_secs(11))),
            None
        );
        assert_eq!(
            retry_for(503, &SttError::Network("503".into()), None),
            Some(Duration::ZERO)
        );
        assert_eq!(
            retry_for(401, &SttError::Unauthorized("k".into()), None),
            None
        );
        assert_eq!(retry_for(402, &SttError::Payment("$".into()), None), None);
        assert_eq!(
            retry_for(400, &SttError::BadRequest("b".into()), None),
            None
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_retried_request_is_forwarded_once_and_the_last_failure_is_the_outcome() {
        let mut calls = 0;
        let outcome: Outcome<u32> = with_retries(ProviderKind::Deepgram, 2, 100, || {
            calls += 1;
            let n = calls;
            async move {
                if n < 3 {
                    Attempt {
                        outcome: Outcome {
                            results: Err(SttError::RateLimited("busy".into())),
                            forwarded: true,
                        },
                        retry: Some(Duration::ZERO),
                    }
                } else {
                    Attempt {
                        outcome: Outcome {
                            results: Ok(7),
                            forwarded: true,
                        },
                        retry: None,
                    }
                }
            }
        })
        .await;
        assert_eq!(calls, 3);
        assert!(outcome.forwarded);
        assert_eq!(outcome.results.ok(), Some(7));

        let mut calls = 0;
        let outcome: Outcome<u32> = with_retries(ProviderKind::Deepgram, 1, 100, || {
            calls += 1;
            async { Attempt::not_sent(SttError::Network("down".into()), Some(Duration::ZERO)) }
        })
        .await;
        assert_eq!(calls, 2, "one retry, then the failure stands");
        assert!(!outcome.forwarded);
        assert_eq!(outcome.results.map_err(|e| e.code()), Err("network"));
    }
}

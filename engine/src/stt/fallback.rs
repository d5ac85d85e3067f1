//! `VOICEGATE_STT_FALLBACK`: a second provider that serves while the primary is failing (docs/stt.md
//! "Fallback").
//!
//! - **Failing** is the primary's state on the node, shared by every stream and span. A failure of the
//!   account (a refused key, a balance that cannot pay, a rate limit) makes it failing at once; a failure
//!   of one connection or one request (unreachable, a dropped stream, a protocol or engine error: a remote
//!   provider retries those itself) only when [`TRANSIENT_FAILURES`] of them come within the cool-down.
//!   Its own backpressure (`queue_full`) and a request it refuses as malformed (`bad_request`, e.g. a
//!   model that does not serve the language) are not failures: the first stays with the primary (the
//!   span waits, `pending`), the second goes to the fallback without counting against the primary.
//! - While the primary is failing (the cool-down, `VOICEGATE_STT_FALLBACK_SECS`, runs from its last
//!   failure), new streams open on the fallback and sync spans go to it. A live stream whose primary
//!   reported a failure moves to the fallback at its next command once the primary is failing (the
//!   failure is still told to the client, `stt_unavailable`, and the fallback's first result makes it
//!   `stt_available` again); a stream on the fallback goes back to the primary at the start of its next
//!   speech run once the primary is no longer failing.
//! - A span whose primary request fails is sent to the fallback (whether or not the primary is failing
//!   yet); the user is charged what the provider that answered received (a failed request's audio is
//!   not charged, as without a fallback).
//! - A switch closes the old inner stream (its pending results still come) and opens the new one; the
//!   session sees one stream: results in the order they arrive, one `Closed` once every inner stream has
//!   closed. What each provider received is counted by that provider (`provider` label), and the
//!   session charges what it handed over, once, whichever provider took it.
//!
//! The relaying runs on a small runtime of its own (one thread), never on a pipeline thread.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::provider::{
    BatchRequest, BatchTicket, ProviderKind, ResultSink, StreamHandle, StreamOptions, StreamStats,
    SttProvider, batch_ticket, results_channel_counting,
};
use super::runtime::OwnedRuntime;
use super::types::{Pcm, SttError, SttEvent};
use crate::telemetry as t;

/// Events one inner stream may have waiting for the relay (the relay forwards at once).
const INNER_CAPACITY: usize = 64;

/// Whether a provider failure with this [`SttError::code`] counts against the primary.
fn marks_failing(code: &str) -> bool {
    !matches!(code, "queue_full" | "bad_request")
}

/// Failures of the provider's account: every stream and span meets them again.
fn account_failure(code: &str) -> bool {
    matches!(code, "unauthorized" | "payment" | "rate_limited")
}

/// Failures of one connection or request (`network`, `protocol`, `engine`, ...) that make the primary
/// failing when this many come within the cool-down: one dropped websocket is not an outage.
pub const TRANSIENT_FAILURES: usize = 3;

/// The primary's state, shared by every stream and span of the node.
#[derive(Debug)]
struct Health {
    primary: ProviderKind,
    fallback: ProviderKind,
    cooldown: Duration,
    base: Instant,
    /// Milliseconds since `base` until which the primary counts as failing (0: it never failed).
    failing_until_ms: AtomicU64,
    /// When the transient failures within the last cool-down came (ms since `base`), at most
    /// [`TRANSIENT_FAILURES`].
    transient: Mutex<VecDeque<u64>>,
}

impl Health {
    fn new(primary: ProviderKind, fallback: ProviderKind, cooldown: Duration) -> Health {
        Health {
            primary,
            fallback,
            cooldown,
            base: Instant::now(),
            failing_until_ms: AtomicU64::new(0),
            transient: Mutex::new(VecDeque::with_capacity(TRANSIENT_FAILURES)),
        }
    }

    fn now_ms(&self) -> u64 {
        self.base.elapsed().as_millis() as u64
    }

    fn primary_ok(&self) -> bool {
        self.now_ms() >= self.failing_until_ms.load(Ordering::Acquire)
    }

    /// The primary failed (`reason`, an [`SttError::code`]): see the module docs for when that makes it
    /// failing (the fallback then serves for the cool-down).
    fn failed(&self, reason: &str) {
        if !marks_failing(reason) {
            return;
        }
        let now = self.now_ms();
        let cooldown = self.cooldown.as_millis() as u64;
        if !account_failure(reason) {
            // A poisoned lock only means another thread panicked mid-push: the queue is still usable.
            let mut recent = self.transient.lock().unwrap_or_else(|p| p.into_inner());
            while recent.front().is_some_and(|&t| t + cooldown <= now) {
                recent.pop_front();
            }
            if recent.len() == TRANSIENT_FAILURES {
                recent.pop_front();
            }
            recent.push_back(now);
            if recent.len() < TRANSIENT_FAILURES {
                return;
            }
        }
        let before = self
            .failing_until_ms
            .fetch_max(now + cooldown, Ordering::AcqRel);
        if before <= now {
            tracing::warn!(
                message = "The speech-to-text provider is failing: new streams and sync spans go to the fallback for the cool-down.",
                provider = self.primary.name(),
                fallback = self.fallback.name(),
                reason,
                cooldown_secs = self.cooldown.as_secs()
            );
        }
    }
}

/// Counts one stream opened or switched onto `to`, or one span sent to it.
fn count(what: &'static str, to: ProviderKind) {
    metrics::counter!(t::STT_FALLBACK_TOTAL, "what" => what, "to" => to.name()).increment(1);
}

/// A primary provider with a fallback. `kind()` is the primary's.
pub struct FallbackProvider {
    primary: Arc<dyn SttProvider>,
    fallback: Arc<dyn SttProvider>,
    health: Arc<Health>,
    runtime: OwnedRuntime,
}

impl FallbackProvider {
    /// `cooldown`: how long a failure keeps new streams and spans on the fallback.
    pub fn start(
        primary: Arc<dyn SttProvider>,
        fallback: Arc<dyn SttProvider>,
        cooldown: Duration,
    ) -> Result<FallbackProvider, SttError> {
        let runtime = OwnedRuntime::start("vg-stt-fallback")
            .map_err(|e| SttError::LoadFailed(format!("the fallback relay's runtime: {e}")))?;
        for what in ["stream_open", "stream_switch", "span"] {
            for to in [primary.kind(), fallback.kind()] {
                metrics::counter!(t::STT_FALLBACK_TOTAL, "what" => what, "to" => to.name())
                    .increment(0);
            }
        }
        Ok(FallbackProvider {
            health: Arc::new(Health::new(primary.kind(), fallback.kind(), cooldown)),
            primary,
            fallback,
            runtime,
        })
    }
}

impl SttProvider for FallbackProvider {
    fn kind(&self) -> ProviderKind {
        self.primary.kind()
    }

    /// Counted as paid when either side is: which side took a sample is not known where it is charged,
    /// so the ceiling errs toward tripping early.
    fn paid(&self) -> bool {
        self.primary.paid() || self.fallback.paid()
    }

    fn open_stream(
        &self,
        options: StreamOptions,
        results: ResultSink,
    ) -> Result<Box<dyn StreamHandle>, SttError> {
        let Some(runtime) = self.runtime.get() else {
            return Err(SttError::Closed);
        };
        let mut stream = FallbackStream {
            active: None,
            on_fallback: false,
            primary: Arc::clone(&self.primary),
            fallback: Arc::clone(&self.fallback),
            health: Arc::clone(&self.health),
            options,
            outer: results,
            relay: Arc::new(Relay::default()),
            runtime: runtime.handle().clone(),
            next_start: None,
        };
        let first = if self.health.primary_ok() {
            match stream.open_inner(false) {
                Ok(handle) => Ok(handle),
                Err(e) => {
                    self.health.failed(e.code());
                    stream.open_inner(true)
                }
            }
        } else {
            stream.open_inner(true)
        }?;
        if stream.on_fallback {
            count("stream_open", self.fallback.kind());
        }
        stream.active = Some(first);
        Ok(Box::new(stream))
    }

    fn transcribe_batch(&self, request: BatchRequest) -> Result<BatchTicket, SttError> {
        if !self.health.primary_ok() {
            count("span", self.fallback.kind());
            return self.fallback.transcribe_batch(request);
        }
        let ticket = match self.primary.transcribe_batch(request.clone()) {
            Ok(ticket) => ticket,
            Err(e @ SttError::QueueFull { .. }) => return Err(e),
            Err(e) => {
                self.health.failed(e.code());
                count("span", self.fallback.kind());
                return self.fallback.transcribe_batch(request);
            }
        };
        let Some(runtime) = self.runtime.get() else {
            return Ok(ticket);
        };
        let (reply, answer) = batch_ticket();
        let fallback = Arc::clone(&self.fallback);
        let health = Arc::clone(&self.health);
        runtime.spawn(async move {
            let outcome = match ticket.recv().await {
                Err(e) if !matches!(e, SttError::QueueFull { .. }) => {
                    health.failed(e.code());
                    count("span", fallback.kind());
                    match fallback.transcribe_batch(request) {
                        Ok(ticket) => ticket.recv().await,
                        Err(e) => Err(e),
                    }
                }
                outcome => outcome,
            };
            reply.send(outcome);
        });
        Ok(answer)
    }
}

/// What a stream's relay tasks and its handle share.
#[derive(Debug, Default)]
struct Relay {
    /// Inner streams whose `Closed` has not come yet.
    open: AtomicUsize,
    /// The session closed the stream.
    closing: AtomicBool,
    /// The one `Closed` went to the session.
    closed_sent: AtomicBool,
    /// The primary stream reported a failure and gave no result since: it moves to the fallback once the
    /// primary is failing.
    errored: AtomicBool,
}

impl Relay {
    /// Sends the session's one `Closed` once every inner stream has closed after the session's close.
    async fn close_if_done(&self, outer: &ResultSink) {
        if self.open.load(Ordering::SeqCst) != 0
            || !self.closing.load(Ordering::SeqCst)
            || self.closed_sent.swap(true, Ordering::SeqCst)
        {
            return;
        }
        // `Closed` is the one event worth waiting for room for (the session reads on its ticks).
        for _ in 0..100 {
            if outer.send(SttEvent::Closed) || outer.is_closed() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Forwards one inner stream's events to the session until its `Closed`.
async fn relay(
    mut rx: mpsc::Receiver<SttEvent>,
    outer: ResultSink,
    relay: Arc<Relay>,
    health: Option<Arc<Health>>,
) {
    while let Some(event) = rx.recv().await {
        match event {
            SttEvent::Closed => break,
            SttEvent::Error { reason, message } => {
                if let Some(health) = &health
                    && marks_failing(reason)
                {
                    health.failed(reason);
                    relay.errored.store(true, Ordering::SeqCst);
                }
                outer.send(SttEvent::Error { reason, message });
            }
            SttEvent::Result(result) => {
                if health.is_some() {
                    relay.errored.store(false, Ordering::SeqCst);
                }
                outer.result(result);
            }
            other => {
                outer.send(other);
            }
        }
    }
    relay.open.fetch_sub(1, Ordering::SeqCst);
    relay.close_if_done(&outer).await;
}

/// One session's stream over the primary or the fallback.
struct FallbackStream {
    /// Always set once opened.
    active: Option<Box<dyn StreamHandle>>,
    on_fallback: bool,
    primary: Arc<dyn SttProvider>,
    fallback: Arc<dyn SttProvider>,
    health: Arc<Health>,
    options: StreamOptions,
    outer: ResultSink,
    relay: Arc<Relay>,
    runtime: tokio::runtime::Handle,
    /// The sample after the last push; `None` after a run ended (the next push starts a run).
    next_start: Option<u64>,
}

impl FallbackStream {
    /// Opens an inner stream on the fallback or the primary, relayed to the session.
    fn open_inner(&mut self, fallback: bool) -> Result<Box<dyn StreamHandle>, SttError> {
        let provider = if fallback {
            &self.fallback
        } else {
            &self.primary
        };
        let (sink, rx) =
            results_channel_counting(INNER_CAPACITY, Arc::clone(self.outer.counters()));
        self.relay.open.fetch_add(1, Ordering::SeqCst);
        match provider.open_stream(self.options.clone(), sink) {
            Ok(handle) => {
                let health = (!fallback).then(|| Arc::clone(&self.health));
                // The session's channel, its drops labelled with the provider this relay serves.
                self.runtime.spawn(relay(
                    rx,
                    self.outer.clone().for_provider(provider.kind()),
                    Arc::clone(&self.relay),
                    health,
                ));
                self.on_fallback = fallback;
                Ok(handle)
            }
            Err(e) => {
                self.relay.open.fetch_sub(1, Ordering::SeqCst);
                Err(e)
            }
        }
    }

    /// Moves to the fallback when this stream's primary failed and the primary is failing; back to the
    /// primary at a run's start once it is no longer failing.
    fn maybe_switch(&mut self, run_starts: bool) {
        let to_fallback = if self.on_fallback {
            if !(run_starts && self.health.primary_ok()) {
                return;
            }
            false
        } else {
            if self.health.primary_ok() || !self.relay.errored.swap(false, Ordering::SeqCst) {
                return;
            }
            true
        };
        match self.open_inner(to_fallback) {
            Ok(handle) => {
                if let Some(mut old) = self.active.replace(handle) {
                    old.close();
                }
                let to = if to_fallback {
                    self.fallback.kind()
                } else {
                    self.primary.kind()
                };
                count("stream_switch", to);
            }
            Err(e) if !to_fallback => self.health.failed(e.code()),
            Err(e) => tracing::debug!(
                message = "The fallback speech-to-text stream could not open; the stream stays on the primary.",
                error = %e
            ),
        }
    }

    fn active(&mut self) -> Result<&mut Box<dyn StreamHandle>, SttError> {
        self.active.as_mut().ok_or(SttError::Closed)
    }
}

impl StreamHandle for FallbackStream {
    fn push(&mut self, start: u64, pcm: Pcm<'_>) -> Result<(), SttError> {
        self.maybe_switch(self.next_start != Some(start));
        self.next_start = Some(start + pcm.len() as u64);
        self.active()?.push(start, pcm)
    }

    fn end_of_run(&mut self) -> Result<(), SttError> {
        self.next_start = None;
        self.active()?.end_of_run()
    }

    fn finalize(&mut self) -> Result<(), SttError> {
        self.next_start = None;
        self.active()?.finalize()
    }

    fn close(&mut self) {
        self.relay.closing.store(true, Ordering::SeqCst);
        if let Some(active) = self.active.as_mut() {
            active.close();
        }
        // Every inner stream may have ended on its own already: nothing would send the `Closed`.
        let relay = Arc::clone(&self.relay);
        let outer = self.outer.clone();
        self.runtime
            .spawn(async move { relay.close_if_done(&outer).await });
    }

    fn stats(&self) -> StreamStats {
        self.outer.counters().stats()
    }

    fn serving(&self) -> Option<ProviderKind> {
        Some(if self.on_fallback {
            self.fallback.kind()
        } else {
            self.primary.kind()
        })
    }
}

#[cfg(test)]
mod tests;

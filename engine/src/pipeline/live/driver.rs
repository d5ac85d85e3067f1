//! The I/O around a [`SessionCore`]: ticks on a shared grid, the transport read on each tick, the store
//! operations run beside the ticks, events and STT commands delivered, and the finish.
//!
//! Runs on a pipeline thread (see [`super::PipelinePool`]), never on an HTTP worker. Metering and the
//! entitlement re-read are store round trips (user actors, Redis): they run as the session's one in-flight
//! operation, polled beside the ticks, never inline. (Inline, a status read queued 2–3 s behind saturated
//! threads at 600 streams stalled its session's pump that long.)

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, MissedTickBehavior};

use super::contract::{FrameCounts, SessionReport, SttCommand};
use super::core::SessionCore;
use super::events::LiveEvent;
use super::frames::FrameQueue;
use super::link::SttLink;
use super::ops::{OpResult, StoreOp, execute};
use super::pace::Pace;
use super::split::SttSplit;
use super::{Control, LiveConfig, LiveServices, SessionParams};
use crate::audio::vad::SileroModel;
use crate::pipeline::stream::{PipelineError, SpeechPipeline};
use crate::stt::ProviderKind;
use crate::telemetry as t;
use crate::time::Backoff;

/// What a session speaks through: the websocket (over the socket itself, or channels to an HTTP worker).
/// Read and written on the session's own thread, once per tick; nothing in it blocks.
pub trait Transport {
    /// Reads what arrived since the last tick and queues its audio frames in `frames`; what the queue has
    /// no room for waits in the wire (backpressure). Returns the strongest control received
    /// ([`Control::Stop`] ends the session after this tick's frames).
    fn poll(&mut self, frames: &mut FrameQueue) -> Option<Control>;
    /// Sends one event; false once the client is gone or stopped reading.
    fn send(&mut self, text: String) -> bool;
    /// Frames received and dropped so far.
    fn counts(&self) -> FrameCounts;
    /// Whether the server is draining: a finishing session then does not wait for its last transcripts.
    fn draining(&self) -> bool {
        false
    }
}

/// The session's in-flight store operation (boxed: only while one runs does it take memory).
type Op = Pin<Box<dyn Future<Output = OpResult>>>;

/// Resolves with the in-flight operation's result; never while there is none.
async fn next_done(op: &mut Option<Op>) -> OpResult {
    match op {
        Some(f) => f.as_mut().await,
        None => std::future::pending().await,
    }
}

/// The next instant on a process-wide grid of `tick` periods (phase taken from the wall clock).
///
/// Every session ticks on the same grid, so a pipeline thread wakes once per tick and runs all its
/// sessions back to back, with the VAD weights still in cache, instead of waking for each session at
/// its own phase (at 300 streams that was ~6,000 wake-ups a second, each on a cold cache).
fn grid_start(tick: Duration) -> Instant {
    let period = tick.as_nanos().max(1);
    let phase = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() % period);
    let wait = u64::try_from(period - phase).unwrap_or(0);
    Instant::now() + Duration::from_nanos(wait)
}

struct Driver<'t, T: Transport> {
    core: SessionCore,
    transport: &'t mut T,
    /// False once the transport refused an event: the session keeps metering but stops sending.
    open: bool,
    frames: FrameQueue,
    /// What the pipeline may take from `frames` (the intake limit); the rest waits there, then in the socket.
    pace: Pace,
    buf: Vec<u8>,
    /// The provider's stream; `None` with `VOICEGATE_STT=none` (or when it could not open).
    stt: Option<SttLink>,
    stt_close_wait: Duration,
    services: Arc<LiveServices>,
    uid: Arc<str>,
    op: Option<Op>,
    frames_metric: u64,
    /// The latest a tick ran after its scheduled instant since the last second's observation.
    tick_lag_max: Duration,
    /// How each STT charge splits by provider.
    stt_split: SttSplit,
}

/// Runs a session over `transport` (its frame queue holds at most `queue_bytes`) until the client or
/// the pipeline stops it, then finishes it. The transport stays the caller's (to close it afterwards).
pub async fn run_session<T: Transport>(
    params: SessionParams,
    cfg: LiveConfig,
    services: Arc<LiveServices>,
    transport: &mut T,
    queue_bytes: usize,
) -> SessionReport {
    let pipeline = SileroModel::shared()
        .map_err(PipelineError::from)
        .and_then(|model| SpeechPipeline::for_codec(params.codec, &cfg.pipeline, model));
    let pipeline = match pipeline {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(message = "Live pipeline could not start.", error = %e);
            return SessionReport {
                error: Some(e.code()),
                ..SessionReport::default()
            };
        }
    };
    let uid = Arc::clone(&params.uid);
    let started_at_ms = services.clock.now_ms();
    let language = params.language.clone();
    let now = Instant::now();
    let pace = Pace::new(cfg.pace, pipeline.codec_rate(), now);
    let mut driver = Driver {
        core: SessionCore::new(params, cfg, pipeline, now, started_at_ms),
        transport,
        open: true,
        frames: FrameQueue::new(queue_bytes),
        pace,
        buf: Vec::with_capacity(512),
        stt: None,
        stt_close_wait: cfg.stt_close_wait,
        services,
        uid,
        op: None,
        frames_metric: 0,
        tick_lag_max: Duration::ZERO,
        stt_split: SttSplit::default(),
    };
    driver.open_stt(&language);
    driver.run(cfg.tick).await
}

impl<T: Transport> Driver<'_, T> {
    /// Opens the provider's stream (none with `VOICEGATE_STT=none`: the session then keeps no audio):
    /// `service_status` `stt_initiating`, then `ready`, or `stt_unavailable` when it cannot open.
    fn open_stt(&mut self, language: &str) {
        let provider = Arc::clone(&self.services.stt);
        let kind = provider.kind();
        if kind == ProviderKind::None {
            return;
        }
        self.send_event(&LiveEvent::ServiceStatus {
            frames_received: 0,
            status: "stt_initiating",
        });
        match SttLink::open(provider.as_ref(), language) {
            Ok(link) => {
                self.core.enable_stt_feed(kind);
                self.stt = Some(link);
                self.send_event(&LiveEvent::ServiceStatus {
                    frames_received: 0,
                    status: "ready",
                });
            }
            Err(error) => {
                tracing::warn!(message = "The speech-to-text stream could not open; the session goes on without transcripts.", provider = kind.name(), %error);
                self.send_event(&LiveEvent::SttUnavailable {
                    frames_received: 0,
                    reason: "provider_error",
                });
            }
        }
    }

    fn send_event(&mut self, ev: &LiveEvent) {
        metrics::counter!(t::LISTEN_EVENTS_TOTAL, "type" => ev.kind()).increment(1);
        if self.open && !self.transport.send(ev.to_json()) {
            self.open = false;
        }
    }

    /// Reads the provider's results and sends what is due: availability changes, transcript segments.
    fn poll_stt(&mut self, force: bool) {
        let Some(link) = self.stt.as_mut() else {
            return;
        };
        link.poll();
        let finals = link.take_finals();
        if !finals.is_empty() {
            self.core.transcript_finals(finals);
        }
        let Some(link) = self.stt.as_mut() else {
            return;
        };
        let (change, segments) = link.outgoing(
            self.core.stt_gate_reason(),
            self.core.frames_seen(),
            Instant::now(),
            force,
        );
        if let Some(ev) = change {
            self.send_event(&ev);
        }
        if let Some(json) = segments {
            metrics::counter!(t::LISTEN_EVENTS_TOTAL, "type" => "transcript").increment(1);
            if self.open && !self.transport.send(json) {
                self.open = false;
            }
        }
    }

    /// The session's end: closes the provider's stream and waits (at most `stt_close_wait`; not at all
    /// while the server drains) for its last results, so the client gets the last transcript before
    /// `metadata` and the conversation gets it too (also when the client is gone). Metering is settled
    /// already.
    async fn close_stt(&mut self) {
        // The server must stop: the results already in go, no waiting.
        let wait = if !self.transport.draining() {
            self.stt_close_wait
        } else {
            Duration::ZERO
        };
        let Some(link) = self.stt.as_mut() else {
            return;
        };
        link.command(SttCommand::Close, None);
        let deadline = Instant::now() + wait;
        while !link.drained() {
            if tokio::time::timeout_at(deadline, link.recv_one())
                .await
                .is_err()
            {
                break;
            }
        }
        self.poll_stt(true);
    }

    async fn run(&mut self, period: Duration) -> SessionReport {
        let mut tick = tokio::time::interval_at(grid_start(period), period);
        // `Skip` keeps a late session on the shared grid (`Delay` would shift it off for good).
        tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
        loop {
            self.start_op();
            tokio::select! {
                biased;
                done = next_done(&mut self.op) => {
                    self.op = None;
                    self.op_finished(done);
                    self.deliver();
                }
                scheduled = tick.tick() => {
                    self.tick_lag_max = self.tick_lag_max.max(scheduled.elapsed());
                    // On the schedule, not the wake-up: a late tick does not mint extra credit.
                    self.pace.refill(scheduled);
                    let ctrl = self.transport.poll(&mut self.frames);
                    self.pump();
                    if self.core.error().is_some() {
                        break;
                    }
                    match ctrl {
                        Some(Control::Stop) => break,
                        Some(Control::Finalize) => self.core.finalize(),
                        None => {}
                    }
                    if self.core.tick(Instant::now(), self.transport.counts()) {
                        self.count_frames();
                        self.observe_tick_lag();
                    }
                    self.deliver();
                    self.poll_stt(false);
                    if self.core.backlogged() {
                        // Boxed, like the other rare, deep calls: an `async fn` future reserves room for
                        // every future it may await for the session's whole life.
                        Box::pin(self.relieve_backlog()).await;
                    }
                }
            }
        }
        Box::pin(self.finish()).await
    }

    /// Starts the next due store operation when none is in flight.
    fn start_op(&mut self) {
        if self.op.is_some() || !self.core.op_due() {
            return;
        }
        if let Some(op) = self.core.next_op(self.services.clock.now_ms()) {
            self.spawn_op(op);
        }
    }

    fn spawn_op(&mut self, mut op: StoreOp) {
        if let StoreOp::Meter {
            stt_ms,
            stt_by_provider,
            ..
        } = &mut op
            && *stt_ms > 0
        {
            let handed = self.stt.as_ref().map_or([0; 4], SttLink::handed);
            *stt_by_provider = self
                .stt_split
                .split(*stt_ms, handed, self.services.stt.kind());
        }
        let fut = execute(Arc::clone(&self.services), Arc::clone(&self.uid), op);
        self.op = Some(Box::pin(fut));
    }

    /// Applies a finished operation (every path that completes one comes here).
    fn op_finished(&mut self, done: OpResult) {
        if let OpResult::Meter { stt_recorded, .. } = &done {
            self.stt_split.done(*stt_recorded > 0);
        }
        self.core.op_done(done);
    }

    /// Waits for the in-flight operation, if any, and applies it.
    async fn complete_op(&mut self) {
        if let Some(op) = self.op.take() {
            let done = op.await;
            self.op_finished(done);
            self.deliver();
        }
    }

    /// Writes closed conversations until they are back under the bound.
    async fn relieve_backlog(&mut self) {
        while self.core.backlogged() {
            self.complete_op().await;
            self.start_op();
            self.complete_op().await;
        }
    }

    /// Takes the queued frames the pace allows through decode and resample, then the VAD step. Frames
    /// past the pace stay queued; with the queue full the transport leaves the rest in the socket.
    fn pump(&mut self) {
        let mut pushed = 0u32;
        while self.pace.open()
            && let Some(seq) = self.frames.pop(&mut self.buf)
        {
            let before = self.core.decoded_samples();
            self.core.push_frame(seq, &self.buf);
            self.pace
                .take(self.core.decoded_samples().saturating_sub(before));
            pushed += 1;
        }
        if self.pace.note_waiting(self.frames.occupied() > 0) {
            metrics::counter!(t::LISTEN_PACE_LIMITED_TOTAL).increment(1);
        }
        if pushed > 0 {
            self.core.run_vad();
            self.deliver();
        }
    }

    /// Hands the core's STT commands over (giving back the charge of what the provider refused), then
    /// sends its events: a budget announcement a refund made premature is withdrawn before it goes.
    fn deliver(&mut self) {
        let (commands, tap) = self.core.take_stt();
        let refused: u64 = match self.stt.as_mut() {
            Some(link) => commands.map(|cmd| link.command(cmd, tap)).sum(),
            None => {
                drop(commands);
                0
            }
        };
        // Before any store operation starts: the charge given back is still unrecorded.
        self.core.refund_stt(refused);
        for ev in self.core.take_events() {
            metrics::counter!(t::LISTEN_EVENTS_TOTAL, "type" => ev.kind()).increment(1);
            if let (LiveEvent::SpeechEnded { at_ms, .. }, Some(link)) = (&ev, self.stt.as_mut()) {
                link.speech_ended(*at_ms);
            }
            if self.open && !self.transport.send(ev.to_json()) {
                self.open = false;
            }
        }
    }

    /// One observation of the worst tick lag since the last one (every second, and at the finish).
    fn observe_tick_lag(&mut self) {
        let lag = std::mem::take(&mut self.tick_lag_max);
        metrics::histogram!(t::LISTEN_TICK_LAG_SECONDS).record(lag.as_secs_f64());
        self.services.tick_lag.record(lag);
    }

    fn count_frames(&mut self) {
        let frames = self.transport.counts().received;
        metrics::counter!(t::LISTEN_FRAMES_TOTAL)
            .increment(frames.saturating_sub(self.frames_metric));
        self.frames_metric = frames;
    }

    /// End of session: everything received before the stop is processed, metered, and reported.
    async fn finish(&mut self) -> SessionReport {
        if self.core.begin_finish() {
            self.complete_op().await;
        } else {
            self.op = None;
            self.stt_split.done(false);
        }
        // Everything received is processed (the queue bounds it), whatever the pace.
        self.pace.lift();
        self.pump();
        self.core.end_of_stream();
        self.deliver();
        // The conversations first: their events then do not wait for the meter.
        self.complete_op().await;
        while let Some(op) = self.core.next_op(self.services.clock.now_ms()) {
            self.spawn_op(op);
            self.complete_op().await;
        }
        // Writes that failed are tried a few more times (jittered) before the session ends; what is
        // still unwritten then is counted as dropped by the core's `finish`.
        let mut backoff = final_retry_backoff();
        for _ in 0..3 {
            if self.core.unwritten() == 0 {
                break;
            }
            tokio::time::sleep(backoff.next_delay()).await;
            self.core.retry_writes_now();
            while let Some(op) = self.core.next_op(self.services.clock.now_ms()) {
                self.spawn_op(op);
                self.complete_op().await;
            }
        }
        // The final record is retried a few times: what the metadata says must be in the meter.
        let mut backoff = final_retry_backoff();
        for _ in 0..3 {
            if let Some(op) = self.core.final_meter_op(self.services.clock.now_ms()) {
                self.spawn_op(op);
                self.complete_op().await;
            }
            if self.core.settled() {
                break;
            }
            tokio::time::sleep(backoff.next_delay()).await;
        }
        // The last second's frames too: a session shorter than the meter interval counts all of its own.
        self.count_frames();
        self.observe_tick_lag();
        Box::pin(self.close_stt()).await;
        self.core.end_of_transcripts();
        Box::pin(self.write_segments()).await;
        let report = self.core.finish(self.transport.counts());
        metrics::counter!(t::LISTEN_AUDIO_MS_TOTAL).increment(report.audio_ms);
        self.deliver();
        report
    }
}

impl<T: Transport> Driver<'_, T> {
    /// The last transcript segments added to their conversations, failed adds tried a few more times
    /// (jittered); what is still unwritten then is counted as dropped by the core's `finish`.
    async fn write_segments(&mut self) {
        let mut backoff = final_retry_backoff();
        for attempt in 0..4 {
            if attempt > 0 {
                if self.core.unwritten_segments() == 0 {
                    break;
                }
                tokio::time::sleep(backoff.next_delay()).await;
                self.core.retry_adds_now();
            }
            while let Some(op) = self.core.next_op(self.services.clock.now_ms()) {
                self.spawn_op(op);
                self.complete_op().await;
            }
        }
    }
}

/// The waits between attempts of the final record (three attempts: about 0.1 to 0.6 s in all).
fn final_retry_backoff() -> Backoff {
    Backoff::new(Duration::from_millis(50), Duration::from_millis(200))
}

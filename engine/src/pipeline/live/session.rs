//! One live session's pipeline task: drains the frame ring on every tick, runs decode → resample → VAD,
//! emits events, meters speech every second, applies the STT allowance, closes conversations after
//! silence, and on stop finishes everything and sends the final `metadata`.
//!
//! Runs on a pipeline thread (see [`super::PipelinePool`]), never on a websocket I/O worker. Accounting
//! is exact: the meter receives `total - metered` each second from the session's cumulative speech in
//! samples, so the metered sum equals the `metadata` `speech_ms` to the millisecond.
//!
//! Metering and the entitlement re-read are store round trips (user actors, Redis): they run as the
//! session's one in-flight operation, polled beside the ticks, never inline. A slow store therefore delays
//! the `usage` event and the meter, not the audio: ticks keep draining the ring. (Inline, a status read
//! queued 2–3 s behind saturated threads at 600 streams stalled its session's pump that long, so frames
//! overflowed the ring.) Operations run one at a time, in order, so records never overlap.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};

use super::events::LiveEvent;
use super::ring::DropReason;
use super::{Control, LiveConfig, LiveServices, SessionInput, SessionParams};
use crate::audio::detector::SpeechEvent;
use crate::audio::resample::TARGET_RATE;
use crate::audio::vad::SileroModel;
use crate::conversation::{self, ConversationStore, Upsert};
use crate::fair_use::{FairUseStatus, PlanRecord};
use crate::meter::{RecordSpeech, SpeechAmount, SpeechSource};
use crate::pipeline::stream::{PipelineError, SpeechPipeline};
use crate::policy::{Stage, SttAllowance, SttDenied};
use crate::stt::{SttSegment, SttSessionInfo, SttStream};
use crate::telemetry as t;
use crate::time::{Span, samples_to_ms};

/// Where a session's events go (the websocket). `send` answers false once the client is gone; the
/// session then keeps metering but stops sending.
pub trait EventSink {
    fn send(&mut self, text: String) -> impl Future<Output = bool>;

    /// Called at the start of every tick, before the frame queue is drained. A sink that is also the
    /// session's transport (the server's websocket, read on the pipeline thread itself) reads what
    /// arrived since the last tick here, pushes its frames into the queue, and returns the strongest
    /// control it received ([`Control::Stop`] ends the session after this tick's frames). Sinks fed by
    /// another task (the default) push frames and controls through [`SessionInput`] instead.
    fn poll_input(&mut self) -> Option<Control> {
        None
    }
}

/// What a finished session did (also what its `metadata` event said).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionReport {
    pub frames_received: u64,
    pub frames_dropped: u64,
    pub audio_ms: u64,
    pub speech_ms: u64,
    /// Speech ms the meter acknowledged; equals `speech_ms` unless the meter failed.
    pub metered_ms: u64,
    pub stt_forwarded_ms: u64,
    /// A stable code when the pipeline failed (the server closes with 1011).
    pub error: Option<&'static str>,
}

/// How long one event may wait for a slow client before the sink is treated as gone.
const SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// The daily STT budget as last resolved, and what this session forwarded since.
#[derive(Debug, Clone, Copy)]
struct Budget {
    daily_limit_ms: u64,
    used_at_check_ms: u64,
    remaining_at_check_ms: u64,
    resets_at_ms: u64,
    forwarded_since_check_ms: u64,
}

impl Budget {
    fn remaining(&self) -> u64 {
        self.remaining_at_check_ms
            .saturating_sub(self.forwarded_since_check_ms)
    }
}

/// The STT gate: unlimited, a budget, closed, or not known yet (the session's first status read is in
/// flight: speech that ends meanwhile waits in `deferred_stt`).
#[derive(Debug, Clone, Copy)]
enum Gate {
    Pending,
    Unlimited,
    Budget(Budget),
    Closed,
}

/// Speech runs that ended before the first entitlement read; past this many the rest are not forwarded
/// (an unknown entitlement fails closed). A run is at least 250 ms: 256 runs is over a minute of speech.
const MAX_DEFERRED_STT: usize = 256;

/// What a finished store operation reports back to the session.
enum OpDone {
    Meter {
        /// The cumulative speech (ms) this record brought the meter to, if it was accepted.
        metered_to: Option<u64>,
        /// STT ms recorded (0 when none was sent or the record failed).
        stt_recorded: u64,
    },
    Status {
        first: bool,
        status: Box<FairUseStatus>,
    },
    Conversation {
        /// The conversation id, or the store's error code.
        stored: Result<String, &'static str>,
        speech_ms: u64,
        locked: bool,
    },
}

/// What the in-flight operation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OpKind {
    Meter,
    Status,
    Conversation,
}

/// Conversations closed but not yet written; past this many (a store down for many conversation
/// timeouts) the oldest is written inline before another is queued.
const MAX_CLOSING: usize = 8;

/// The session's in-flight store operation (boxed: only while one runs does it take memory).
type Op = Pin<Box<dyn Future<Output = OpDone>>>;

/// Resolves with the in-flight operation's result; never while there is none.
async fn next_op(op: &mut Option<Op>) -> OpDone {
    match op {
        Some(f) => f.as_mut().await,
        None => std::future::pending().await,
    }
}

/// The conversation being built (absolute epoch ms spans).
#[derive(Default)]
struct OpenConversation {
    spans: Vec<Span>,
    speech_samples: u64,
    /// End of the last speech run, in samples at 16 kHz.
    last_end: u64,
}

struct Live<S: EventSink> {
    params: SessionParams,
    cfg: LiveConfig,
    services: Arc<LiveServices>,
    input: SessionInput,
    sink: S,
    sink_open: bool,
    pipeline: SpeechPipeline,
    stt: Box<dyn SttStream>,
    events: Vec<SpeechEvent>,
    buf: Vec<u8>,
    /// Sequence of the newest frame the pipeline consumed (= frames received up to it).
    frames_seen: u64,
    frames_metric: u64,
    /// The latest a tick ran after its scheduled instant since the last second's observation.
    tick_lag_max: Duration,
    dropped_reported: [u64; 2],
    metered_ms: u64,
    stt_forwarded_ms: u64,
    stt_unrecorded_ms: u64,
    gate: Gate,
    exhausted_announced: bool,
    stage: Stage,
    locked: bool,
    conversation: Option<OpenConversation>,
    started_at_ms: u64,
    error: Option<&'static str>,
    /// The store operation in flight, and the ones due next.
    op: Option<Op>,
    op_kind: OpKind,
    /// Closed conversations waiting to be written, oldest first (written before any other operation).
    closing: std::collections::VecDeque<OpenConversation>,
    meter_due: bool,
    status_due: bool,
    /// Speech runs (and their ms) waiting for the first entitlement read ([`Gate::Pending`]).
    deferred_stt: Vec<(Span, u64)>,
}

/// Runs a session until it is told to stop (or its control channel closes), then finishes it.
pub async fn run_session<S: EventSink>(
    params: SessionParams,
    cfg: LiveConfig,
    services: Arc<LiveServices>,
    input: SessionInput,
    sink: S,
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
    let stt = services.transcriber.open(&SttSessionInfo {
        uid: Arc::clone(&params.uid),
        language: params.language.clone(),
        codec: params.codec,
    });
    let started_at_ms = services.clock.now_ms();
    let mut live = Live {
        params,
        cfg,
        services,
        input,
        sink,
        sink_open: true,
        pipeline,
        stt,
        events: Vec::with_capacity(8),
        buf: Vec::with_capacity(512),
        frames_seen: 0,
        frames_metric: 0,
        tick_lag_max: Duration::ZERO,
        dropped_reported: [0; 2],
        metered_ms: 0,
        stt_forwarded_ms: 0,
        stt_unrecorded_ms: 0,
        gate: Gate::Pending,
        exhausted_announced: false,
        stage: Stage::None,
        locked: false,
        conversation: None,
        started_at_ms,
        error: None,
        op: None,
        op_kind: OpKind::Status,
        closing: std::collections::VecDeque::new(),
        meter_due: false,
        status_due: false,
        deferred_stt: Vec::new(),
    };
    live.run().await
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

impl<S: EventSink> Live<S> {
    async fn run(&mut self) -> SessionReport {
        self.op = Some(self.status_op(true));
        self.op_kind = OpKind::Status;
        let mut tick = tokio::time::interval_at(grid_start(self.cfg.tick), self.cfg.tick);
        // `Skip` keeps a late session on the shared grid (`Delay` would shift it off for good).
        tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
        let now = Instant::now();
        let mut next_meter = now + self.cfg.meter_interval;
        let mut next_usage = now + self.cfg.usage_interval;
        loop {
            self.start_due_op();
            tokio::select! {
                biased;
                ctrl = self.input.control.recv() => match ctrl {
                    Some(Control::Finalize) => {
                        self.pump().await;
                        self.stt.finalize();
                    }
                    Some(Control::Stop) | None => break,
                },
                done = next_op(&mut self.op) => {
                    self.op = None;
                    Box::pin(self.apply(done)).await;
                }
                scheduled = tick.tick() => {
                    self.tick_lag_max = self.tick_lag_max.max(scheduled.elapsed());
                    let ctrl = self.sink.poll_input();
                    self.pump().await;
                    if self.error.is_some() {
                        break;
                    }
                    match ctrl {
                        Some(Control::Stop) => break,
                        Some(Control::Finalize) => self.stt.finalize(),
                        None => {}
                    }
                    self.maybe_close_conversation(false).await;
                    let now = Instant::now();
                    if now >= next_meter {
                        next_meter = now + self.cfg.meter_interval;
                        if self.drops_unreported() {
                            Box::pin(self.report_drops()).await;
                        }
                        self.count_frames();
                        self.observe_tick_lag();
                        self.meter_due = true;
                    }
                    if now >= next_usage {
                        next_usage = now + self.cfg.usage_interval;
                        self.status_due = true;
                    }
                }
            }
        }
        // Boxed, like the other rare, deep calls below: an `async fn` future reserves room for every future
        // it may await for the session's whole life, and a task is ~1 KB per stream per KB of future.
        Box::pin(self.finish()).await
    }

    /// Starts the next due store operation when none is in flight: closed conversations first (in order),
    /// then the meter, then the status read (which then reads fresher totals). The session's first status
    /// read is its first operation, so a conversation is only written once `locked` is known.
    fn start_due_op(&mut self) {
        if self.op.is_some() {
            return;
        }
        if let Some(conv) = self.closing.pop_front() {
            self.op = Some(self.conversation_op(conv));
            self.op_kind = OpKind::Conversation;
            return;
        }
        if self.meter_due {
            self.meter_due = false;
            self.op = self.meter_op();
            self.op_kind = OpKind::Meter;
        }
        if self.op.is_none() && self.status_due {
            self.status_due = false;
            self.op = Some(self.status_op(false));
            self.op_kind = OpKind::Status;
        }
    }

    /// Waits for the in-flight operation, if any, and applies it.
    async fn complete_op(&mut self) {
        if let Some(op) = self.op.take() {
            let done = op.await;
            Box::pin(self.apply(done)).await;
        }
    }

    async fn apply(&mut self, done: OpDone) {
        match done {
            OpDone::Meter {
                metered_to,
                stt_recorded,
            } => {
                if let Some(total) = metered_to {
                    self.metered_ms = self.metered_ms.max(total);
                }
                self.stt_unrecorded_ms = self.stt_unrecorded_ms.saturating_sub(stt_recorded);
            }
            OpDone::Status { first, status } => self.apply_status(first, *status).await,
            OpDone::Conversation {
                stored,
                speech_ms,
                locked,
            } => match stored {
                Ok(id) => {
                    let ev = LiveEvent::ConversationClosed {
                        frames_received: self.frames_seen,
                        conversation_id: id,
                        speech_ms,
                        locked,
                    };
                    self.emit(ev).await;
                }
                Err(code) => {
                    metrics::counter!(t::LISTEN_CONVERSATION_ERRORS_TOTAL, "reason" => code)
                        .increment(1);
                }
            },
        }
    }

    /// Drains the ring through the pipeline and emits what it produced.
    async fn pump(&mut self) {
        if self.error.is_some() {
            return;
        }
        let mut pushed = 0u32;
        while let Some(seq) = self.input.frames.pop(&mut self.buf) {
            self.frames_seen = u64::from(seq);
            pushed += 1;
            if let Err(e) = self.pipeline.push_payload(&self.buf, &mut self.events) {
                self.fail(e);
                return;
            }
        }
        if pushed > 0 {
            if let Err(e) = self.pipeline.flush(&mut self.events) {
                self.fail(e);
                return;
            }
            if !self.events.is_empty() {
                // Boxed: speech events come a few times a minute, the tick every 50 ms.
                Box::pin(self.handle_speech_events()).await;
            }
        }
    }

    fn fail(&mut self, e: PipelineError) {
        tracing::error!(message = "Live pipeline failed.", uid = %self.params.uid, error = %e);
        metrics::counter!(t::LISTEN_PIPELINE_ERRORS_TOTAL, "reason" => e.code()).increment(1);
        self.error = Some(e.code());
    }

    async fn handle_speech_events(&mut self) {
        let mut events = std::mem::take(&mut self.events);
        for e in events.drain(..) {
            match e {
                SpeechEvent::Started(start) => {
                    // Decided on the run's own start, not on when the tick saw it: batching (a lagging
                    // pipeline, a fast client) never merges what the timeout separates.
                    let gap_over = self.conversation.as_ref().is_some_and(|c| {
                        start.saturating_sub(c.last_end) >= self.timeout_samples()
                    });
                    if gap_over {
                        Box::pin(self.close_conversation()).await;
                    }
                    let ev = LiveEvent::SpeechStarted {
                        frames_received: self.frames_seen,
                        at_ms: ms(start),
                    };
                    self.emit(ev).await;
                }
                SpeechEvent::Ended(span) => self.speech_ended(span).await,
            }
        }
        self.events = events;
    }

    async fn speech_ended(&mut self, span: Span) {
        let speech_ms = ms(span.len());
        self.emit(LiveEvent::SpeechEnded {
            frames_received: self.frames_seen,
            at_ms: ms(span.end),
            speech_ms,
        })
        .await;
        let conv = self
            .conversation
            .get_or_insert_with(OpenConversation::default);
        conv.spans.push(Span {
            start: self.started_at_ms + ms(span.start),
            end: self.started_at_ms + ms(span.end),
        });
        conv.speech_samples += span.len();
        conv.last_end = span.end;
        self.forward_stt(span, speech_ms).await;
    }

    /// Forwards what the STT allowance permits of one speech run.
    async fn forward_stt(&mut self, span: Span, speech_ms: u64) {
        let allowed = match &self.gate {
            Gate::Pending => {
                if self.deferred_stt.len() < MAX_DEFERRED_STT {
                    self.deferred_stt.push((span, speech_ms));
                }
                return;
            }
            Gate::Unlimited => speech_ms,
            Gate::Budget(b) => b.remaining().min(speech_ms),
            Gate::Closed => 0,
        };
        if allowed > 0 {
            let start_ms = ms(span.start);
            self.stt.forward(SttSegment {
                start_ms,
                end_ms: start_ms + allowed,
            });
            self.stt_forwarded_ms += allowed;
            self.stt_unrecorded_ms += allowed;
            metrics::counter!(t::LISTEN_STT_FORWARDED_MS_TOTAL).increment(allowed);
            if let Gate::Budget(b) = &mut self.gate {
                b.forwarded_since_check_ms += allowed;
            }
        }
        self.announce_exhausted().await;
    }

    async fn announce_exhausted(&mut self) {
        let Gate::Budget(b) = self.gate else {
            return;
        };
        if b.remaining() > 0 || self.exhausted_announced {
            return;
        }
        self.exhausted_announced = true;
        self.emit(LiveEvent::SttBudgetExhausted {
            frames_received: self.frames_seen,
            used_ms: b.used_at_check_ms + b.forwarded_since_check_ms,
            daily_limit_ms: b.daily_limit_ms,
            resets_at_ms: b.resets_at_ms,
        })
        .await;
    }

    /// Closes the open conversation after `conversation_timeout` of silence (stream audio time), when it
    /// holds as many spans as one conversation may, or unconditionally at the end (`force`).
    async fn maybe_close_conversation(&mut self, force: bool) {
        let Some(conv) = &self.conversation else {
            return;
        };
        let due = force
            || conv.spans.len() >= conversation::MAX_SPANS_PER_CONVERSATION
            || (!self.pipeline.in_speech()
                && self.position_16k().saturating_sub(conv.last_end) >= self.timeout_samples());
        if due {
            Box::pin(self.close_conversation()).await;
        }
    }

    /// `conversation_timeout` in samples at 16 kHz.
    fn timeout_samples(&self) -> u64 {
        self.params.conversation_timeout_ms * u64::from(TARGET_RATE) / 1000
    }

    /// Queues the open conversation to be written (an operation, like the meter: a slow store never holds
    /// up the audio). Its `conversation_closed` event follows when the store answers.
    async fn close_conversation(&mut self) {
        let Some(conv) = self.conversation.take() else {
            return;
        };
        if self.closing.len() >= MAX_CLOSING {
            // Bounded: wait for the operation in flight, then write the oldest queued one now.
            self.complete_op().await;
            self.start_due_op();
            self.complete_op().await;
        }
        self.closing.push_back(conv);
    }

    /// Writes everything queued, in order (the finish).
    async fn complete_all_ops(&mut self) {
        self.complete_op().await;
        while !self.closing.is_empty() {
            self.start_due_op();
            self.complete_op().await;
        }
    }

    /// Writes one closed conversation (`locked` as the session knows it when the write starts).
    fn conversation_op(&self, conv: OpenConversation) -> Op {
        let store = Arc::clone(&self.services.conversations);
        let uid = Arc::clone(&self.params.uid);
        let locked = self.locked;
        Box::pin(async move {
            let stored = upsert_conversation(store.as_ref(), &uid, locked, conv.spans).await;
            OpDone::Conversation {
                stored,
                speech_ms: ms(conv.speech_samples),
                locked,
            }
        })
    }

    /// Stream position in samples at 16 kHz.
    fn position_16k(&self) -> u64 {
        let rate = u64::from(self.pipeline.codec_rate().max(1));
        self.pipeline.decoded_samples() * u64::from(TARGET_RATE) / rate
    }

    /// A record of the speech certain so far (finished runs and the committed part of an open one) since
    /// the last accepted one, and of the STT forwarded; `None` when there is nothing to record.
    fn meter_op(&self) -> Option<Op> {
        let total = ms(self.pipeline.speech_samples_committed());
        let delta = total.saturating_sub(self.metered_ms);
        let stt = self.stt_unrecorded_ms;
        if delta == 0 && stt == 0 {
            return None;
        }
        let services = Arc::clone(&self.services);
        let uid = Arc::clone(&self.params.uid);
        let now_ms = self.services.clock.now_ms();
        Some(Box::pin(async move {
            let mut metered_to = None;
            if delta > 0 {
                let rec = RecordSpeech::new(
                    Arc::clone(&uid),
                    SpeechAmount::Ms(delta),
                    now_ms,
                    SpeechSource::Realtime,
                );
                match services.fair_use.record(rec).await {
                    Ok(_) => metered_to = Some(total),
                    Err(e) => {
                        // Kept pending: the next second (or the finish) sends it again.
                        tracing::warn!(message = "Metering realtime speech failed.", uid = %uid, error = %e);
                        metrics::counter!(t::LISTEN_METER_ERRORS_TOTAL, "reason" => "meter")
                            .increment(1);
                    }
                }
            }
            let mut stt_recorded = 0;
            if stt > 0 {
                match services.fair_use.record_stt(&uid, stt).await {
                    Ok(_) => stt_recorded = stt,
                    Err(e) => {
                        tracing::warn!(message = "Recording STT usage failed.", uid = %uid, error = %e);
                        metrics::counter!(t::LISTEN_METER_ERRORS_TOTAL, "reason" => "stt")
                            .increment(1);
                    }
                }
            }
            OpDone::Meter {
                metered_to,
                stt_recorded,
            }
        }))
    }

    /// Meters now, inline (the finish, after the in-flight operation completed).
    async fn meter(&mut self) {
        if let Some(op) = self.meter_op() {
            let done = op.await;
            Box::pin(self.apply(done)).await;
        }
    }

    /// One observation of the worst tick lag since the last one (every second, and at the finish).
    fn observe_tick_lag(&mut self) {
        metrics::histogram!(t::LISTEN_TICK_LAG_SECONDS)
            .record(std::mem::take(&mut self.tick_lag_max).as_secs_f64());
    }

    fn count_frames(&mut self) {
        let frames = self.input.counters.received.load(Ordering::Relaxed);
        metrics::counter!(t::LISTEN_FRAMES_TOTAL)
            .increment(frames.saturating_sub(self.frames_metric));
        self.frames_metric = frames;
    }

    /// A re-read of the user's status (plan, rolling totals, stage, lock, STT allowance).
    fn status_op(&self, first: bool) -> Op {
        let services = Arc::clone(&self.services);
        let uid = Arc::clone(&self.params.uid);
        Box::pin(async move {
            let plan = services.plans.get(&uid).await;
            let record = match &plan {
                Ok(p) => PlanRecord::Known(p.as_deref()),
                Err(e) => {
                    tracing::warn!(message = "Plan lookup failed; credits unavailable.", uid = %uid, error = %e);
                    PlanRecord::Unavailable
                }
            };
            let status = services.fair_use.status(&uid, record).await;
            OpDone::Status {
                first,
                status: Box::new(status),
            }
        })
    }

    /// Applies a status read: the usage event, stage/lock changes, and the STT allowance (which releases
    /// speech deferred until the first read).
    async fn apply_status(&mut self, first: bool, status: FairUseStatus) {
        if !first {
            self.emit(LiveEvent::Usage {
                frames_received: self.frames_seen,
                session_speech_ms: ms(self.pipeline.speech_samples()),
                speech_ms: status.speech_ms,
                stage: status.stage,
            })
            .await;
        }
        let changed = (status.stage, status.locked) != (self.stage, self.locked);
        self.stage = status.stage;
        self.locked = status.locked;
        if changed {
            self.emit(LiveEvent::FairUse {
                frames_received: self.frames_seen,
                stage: status.stage,
                locked: status.locked,
            })
            .await;
        }
        self.apply_allowance(status.stt).await;
        for (span, speech_ms) in std::mem::take(&mut self.deferred_stt) {
            self.forward_stt(span, speech_ms).await;
        }
    }

    async fn apply_allowance(&mut self, stt: SttAllowance) {
        // What this session forwarded but has not yet recorded is not in the store's `used_ms`.
        let pending = self.stt_unrecorded_ms;
        self.gate = match stt {
            SttAllowance::Unlimited => Gate::Unlimited,
            SttAllowance::Remaining {
                remaining_ms,
                daily_limit_ms,
                used_ms,
                resets_at_ms,
            } => Gate::Budget(Budget {
                daily_limit_ms,
                used_at_check_ms: used_ms,
                remaining_at_check_ms: remaining_ms,
                resets_at_ms,
                forwarded_since_check_ms: pending,
            }),
            SttAllowance::None {
                reason: SttDenied::BudgetExhausted,
                daily_limit_ms,
                used_ms,
                resets_at_ms,
            } => Gate::Budget(Budget {
                daily_limit_ms: daily_limit_ms.unwrap_or(0),
                used_at_check_ms: used_ms,
                remaining_at_check_ms: 0,
                resets_at_ms: resets_at_ms.unwrap_or(0),
                forwarded_since_check_ms: pending,
            }),
            // An unknown entitlement fails closed for paid STT, silently: nothing is known to announce.
            SttAllowance::None {
                reason: SttDenied::EntitlementUnknown,
                ..
            } => Gate::Closed,
        };
        match self.gate {
            Gate::Budget(b) if b.remaining() == 0 => self.announce_exhausted().await,
            // Budget available again (a new day, a stage change): re-arm the announcement.
            _ => self.exhausted_announced = false,
        }
    }

    /// Tells the client about frames dropped since the last report.
    fn drops_unreported(&self) -> bool {
        let c = &self.input.counters;
        c.dropped_ring_full.load(Ordering::Relaxed) > self.dropped_reported[0]
            || c.dropped_too_large.load(Ordering::Relaxed) > self.dropped_reported[1]
    }

    async fn report_drops(&mut self) {
        let c = &self.input.counters;
        let now = [
            c.dropped_ring_full.load(Ordering::Relaxed),
            c.dropped_too_large.load(Ordering::Relaxed),
        ];
        for (i, reason) in [DropReason::RingFull, DropReason::TooLarge]
            .into_iter()
            .enumerate()
        {
            if now[i] > self.dropped_reported[i] {
                self.dropped_reported[i] = now[i];
                self.emit(LiveEvent::FramesDropped {
                    frames_received: self.frames_seen,
                    frames_dropped: now[0] + now[1],
                    reason: reason.as_str(),
                })
                .await;
            }
        }
    }

    async fn emit(&mut self, ev: LiveEvent) {
        metrics::counter!(t::LISTEN_EVENTS_TOTAL, "type" => ev.kind()).increment(1);
        if !self.sink_open {
            return;
        }
        let sent = tokio::time::timeout(SEND_TIMEOUT, self.sink.send(ev.to_json())).await;
        if !matches!(sent, Ok(true)) {
            self.sink_open = false;
        }
    }

    /// End of session: everything pushed before the stop is processed, metered, and reported.
    async fn finish(&mut self) -> SessionReport {
        // A record in flight must land (dropped, its speech could be metered twice) and the first status
        // read decides the STT gate of what is still to come; a periodic status read only reads, and
        // waiting for it would only delay the end.
        if self.op_kind != OpKind::Status || matches!(self.gate, Gate::Pending) {
            self.complete_op().await;
        } else {
            self.op = None;
        }
        self.pump().await;
        if self.error.is_none() {
            match self.pipeline.finish(&mut self.events) {
                Ok(()) => self.handle_speech_events().await,
                Err(e) => self.fail(e),
            }
        }
        // The conversations first: their events then do not wait for the meter.
        self.maybe_close_conversation(true).await;
        self.complete_all_ops().await;
        self.report_drops().await;
        // The final record is retried a few times: what the metadata says must be in the meter.
        for attempt in 0..3u64 {
            self.meter().await;
            if self.metered_ms == ms(self.pipeline.speech_samples()) && self.stt_unrecorded_ms == 0
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50 * (attempt + 1))).await;
        }
        self.stt.close();
        // The last second's frames too: a session shorter than the meter interval counts all of its own.
        self.count_frames();
        self.observe_tick_lag();
        let c = &self.input.counters;
        let frames_received = c.received.load(Ordering::Relaxed).max(self.frames_seen);
        let frames_dropped = c.dropped_ring_full.load(Ordering::Relaxed)
            + c.dropped_too_large.load(Ordering::Relaxed);
        let report = SessionReport {
            frames_received,
            frames_dropped,
            audio_ms: samples_to_ms(self.pipeline.decoded_samples(), self.pipeline.codec_rate()),
            speech_ms: ms(self.pipeline.speech_samples()),
            metered_ms: self.metered_ms,
            stt_forwarded_ms: self.stt_forwarded_ms,
            error: self.error,
        };
        metrics::counter!(t::LISTEN_AUDIO_MS_TOTAL).increment(report.audio_ms);
        self.emit(LiveEvent::Metadata {
            frames_received,
            frames_dropped,
            audio_ms: report.audio_ms,
            speech_ms: report.speech_ms,
            stt_forwarded_ms: report.stt_forwarded_ms,
        })
        .await;
        report
    }
}

/// Samples at 16 kHz → ms, rounded once.
fn ms(samples: u64) -> u64 {
    samples_to_ms(samples, TARGET_RATE)
}

/// A sink for tests and tools: collects the JSON texts.
#[derive(Debug, Default)]
pub struct VecSink(pub Vec<String>);

impl EventSink for VecSink {
    async fn send(&mut self, text: String) -> bool {
        self.0.push(text);
        true
    }
}

/// A sink that forwards into a bounded channel (a test client, or a server adapter).
pub struct ChannelSink(pub mpsc::Sender<String>);

impl EventSink for ChannelSink {
    async fn send(&mut self, text: String) -> bool {
        self.0.send(text).await.is_ok()
    }
}

/// Creates or merges a realtime conversation: the first span finds (or starts) it, the rest join it by id,
/// so a long silence inside one realtime conversation never splits it.
async fn upsert_conversation(
    store: &dyn ConversationStore,
    uid: &str,
    locked: bool,
    spans: Vec<Span>,
) -> Result<String, &'static str> {
    let mut rest = spans.into_iter();
    let first = rest.next().ok_or("empty")?;
    let req = |spans, target| Upsert {
        uid: uid.to_owned(),
        spans,
        locked,
        source: "realtime".to_owned(),
        target,
    };
    let log = |e: &conversation::ConversationError| {
        tracing::warn!(message = "Realtime conversation upsert failed.", uid, error = %e);
        e.code()
    };
    let out = store
        .upsert(req(vec![first], None))
        .await
        .map_err(|e| log(&e))?;
    let id = out
        .new
        .first()
        .or(out.updated.first())
        .cloned()
        .ok_or("no_id")?;
    let rest: Vec<_> = rest.collect();
    if !rest.is_empty() {
        store
            .upsert(req(rest, Some(id.clone())))
            .await
            .map_err(|e| log(&e))?;
    }
    Ok(id)
}

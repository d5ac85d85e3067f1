//! The live session's core: a state machine with no I/O and no clock of its own (sans-IO).
//!
//! - **In**: frames ([`SessionCore::push_frame`]: decode and resample), the VAD step
//!   ([`SessionCore::run_vad`]: complete windows through the model, speech events), ticks carrying the
//!   time ([`SessionCore::tick`]), the client's controls, and the results of store operations
//!   ([`SessionCore::op_done`]).
//! - **Out**: client events ([`SessionCore::take_events`]), STT commands ([`SessionCore::take_stt`]) and
//!   the next store operation ([`SessionCore::next_op`]), one in flight at a time.
//!
//! The driver ([`super::run_session`]) does the I/O around it; the unit tests drive it on virtual time.
//! Two seams are kept apart on purpose: the VAD step is a call of its own, so a pipeline thread can later
//! batch its sessions' windows through the model; and STT leaves as commands ([`SttCommand`]), where a
//! later change can add the speech run's samples (a run started / continued with its 16 kHz audio).
//!
//! Accounting is exact: the meter receives `total - metered` each second from the session's cumulative
//! speech in samples, so the metered sum equals the `metadata` `speech_ms` to the millisecond. A slow
//! store delays the `usage` event and the meter, never the audio: operations run beside the ticks.

mod conversations;
mod stt;
mod stt_feed;
mod transcripts;

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use self::stt::Stt;
use self::transcripts::Transcripts;
use super::contract::{FrameCounts, InFlight, Lifecycle, SessionReport, SttCommand};
use super::events::LiveEvent;
use super::frames::DropReason;
use super::gate::Gate;
use super::ops::{OpResult, StoreOp};
use super::{LiveConfig, SessionParams};
use crate::audio::detector::SpeechEvent;
use crate::audio::resample::TARGET_RATE;
use crate::pipeline::stream::{PipelineError, SpeechPipeline};
use crate::pipeline::tap::AudioTap;
use crate::policy::{SessionLane, SessionMeasures, SessionSummary, Stage};
use crate::telemetry as t;
use crate::time::{Backoff, samples_to_ms};

/// Conversations closed but not yet written; past this many (a slow store) the driver completes writes
/// before it takes more audio ([`SessionCore::backlogged`]), unless the writes are failing and wait for
/// their retry (then the audio goes on and [`MAX_UNWRITTEN`] bounds the queue).
pub const MAX_CLOSING: usize = 8;
/// Closed conversations a session holds while their writes fail (each retried with a jittered
/// [`Backoff`]); past this many the oldest is dropped and counted
/// (`voicegate_listen_conversations_dropped_total{reason="queue_full"}`).
pub const MAX_UNWRITTEN: usize = 64;
pub use self::transcripts::MAX_HELD_SEGMENTS;

/// Retries of a failed conversation write: from 250 ms, jittered, capped at 10 s.
fn write_backoff() -> Backoff {
    Backoff::new(Duration::from_millis(250), Duration::from_secs(10))
}

/// One live session's state.
pub struct SessionCore {
    params: SessionParams,
    cfg: LiveConfig,
    pipeline: SpeechPipeline,
    lifecycle: Lifecycle,
    in_flight: InFlight,
    /// Scratch for the pipeline's speech events.
    speech: Vec<SpeechEvent>,
    out: Vec<LiveEvent>,
    stt_out: Vec<SttCommand>,
    /// Sequence of the newest frame the pipeline consumed (= frames received up to it).
    frames_seen: u64,
    dropped_reported: [u64; 2],
    metered_ms: u64,
    stt: Stt,
    stage: Stage,
    locked: bool,
    conversation: Option<conversations::OpenConversation>,
    /// Closed conversations waiting to be written, oldest first (written before any other operation).
    closing: VecDeque<conversations::OpenConversation>,
    /// The conversation whose write is in flight (queued again at the front if the write fails).
    writing: Option<conversations::OpenConversation>,
    /// Retry delays of failed conversation writes (reset by a success).
    write_backoff: Backoff,
    /// A failed write's delay, turned into [`Self::write_retry_at_ms`] by the next [`Self::next_op`].
    write_delay: Option<Duration>,
    /// No conversation write starts before this (epoch ms) after a failure.
    write_retry_at_ms: Option<u64>,
    /// Final transcript segments on their way to their conversation.
    tx: Transcripts,
    next_meter: Instant,
    next_usage: Instant,
    next_evidence: Instant,
    meter_due: bool,
    /// The session's evidence is due to be rewritten with the next meter operation.
    evidence_due: bool,
    /// The evidence written at the end is in the store.
    evidence_final: bool,
    /// The session's evidence id (`rt:` + a process-unique id).
    evidence_id: String,
    /// The longest speech run so far and the count of runs (16 kHz samples / runs).
    longest_run: u64,
    runs: u64,
    status_due: bool,
    started_at_ms: u64,
    error: Option<&'static str>,
}

impl SessionCore {
    /// A session starting at `now` (its tick clock) and `started_at_ms` (epoch ms: conversation spans).
    pub fn new(
        params: SessionParams,
        cfg: LiveConfig,
        pipeline: SpeechPipeline,
        now: Instant,
        started_at_ms: u64,
    ) -> Self {
        SessionCore {
            params,
            cfg,
            pipeline,
            lifecycle: Lifecycle::Starting,
            in_flight: InFlight::None,
            speech: Vec::with_capacity(8),
            out: Vec::with_capacity(4),
            stt_out: Vec::new(),
            frames_seen: 0,
            dropped_reported: [0; 2],
            metered_ms: 0,
            stt: Stt {
                gate: Gate::Pending,
                forwarded_ms: 0,
                unrecorded_ms: 0,
                exhausted_announced: false,
                deferred: Vec::new(),
                feed: None,
                provider: crate::stt::ProviderKind::None,
            },
            stage: Stage::None,
            locked: false,
            conversation: None,
            closing: VecDeque::new(),
            writing: None,
            write_backoff: write_backoff(),
            write_delay: None,
            write_retry_at_ms: None,
            tx: Transcripts::default(),
            next_meter: now + cfg.meter_interval,
            next_usage: now + cfg.usage_interval,
            next_evidence: now + cfg.evidence_interval,
            meter_due: false,
            evidence_due: false,
            evidence_final: false,
            evidence_id: evidence_id(),
            longest_run: 0,
            runs: 0,
            status_due: false,
            started_at_ms,
            error: None,
        }
    }

    pub fn lifecycle(&self) -> Lifecycle {
        self.lifecycle
    }

    pub fn in_flight(&self) -> InFlight {
        self.in_flight
    }

    /// The pipeline's failure code, once it failed (the session then finishes).
    pub fn error(&self) -> Option<&'static str> {
        self.error
    }

    /// Events for the client, in order (drained).
    pub fn take_events(&mut self) -> std::vec::Drain<'_, LiveEvent> {
        self.out.drain(..)
    }

    /// Commands for the STT stream, in order (drained), with the kept audio their `Audio` ranges are in.
    pub fn take_stt(&mut self) -> (std::vec::Drain<'_, SttCommand>, Option<&AudioTap>) {
        (self.stt_out.drain(..), self.pipeline.tap())
    }

    /// Sequence of the newest frame the pipeline consumed (what every event carries).
    pub fn frames_seen(&self) -> u64 {
        self.frames_seen
    }

    /// Samples decoded so far, at the codec's rate (what the intake limit charges).
    pub fn decoded_samples(&self) -> u64 {
        self.pipeline.decoded_samples()
    }

    /// Decodes and resamples one frame (the VAD runs on [`Self::run_vad`]).
    pub fn push_frame(&mut self, seq: u32, payload: &[u8]) {
        if self.error.is_some() {
            return;
        }
        self.frames_seen = u64::from(seq);
        if let Err(e) = self.pipeline.push_payload(payload, &mut self.speech) {
            self.fail(e);
            return;
        }
        if self.stt_lagging() {
            self.run_vad();
        }
    }

    /// The VAD step of a tick: runs every complete window and turns speech into events.
    pub fn run_vad(&mut self) {
        if self.error.is_some() {
            return;
        }
        if let Err(e) = self.pipeline.flush(&mut self.speech) {
            self.fail(e);
            return;
        }
        if !self.speech.is_empty() {
            self.handle_speech_events();
        }
        self.release_stt();
    }

    /// The client asked to finalize: the STT stream flushes what it has.
    pub fn finalize(&mut self) {
        self.stt_out.push(SttCommand::Finalize);
    }

    /// A tick at `now`: closes a conversation after its silence, and schedules the meter (with the
    /// report of dropped frames) every meter interval and the status read every usage interval. Returns
    /// whether a meter interval ended (the driver's per-second metrics).
    pub fn tick(&mut self, now: Instant, counts: FrameCounts) -> bool {
        self.maybe_close_conversation(false);
        let mut second = false;
        if now >= self.next_meter {
            self.next_meter = now + self.cfg.meter_interval;
            self.report_drops(counts);
            self.meter_due = true;
            second = true;
        }
        if now >= self.next_usage {
            self.next_usage = now + self.cfg.usage_interval;
            self.status_due = true;
        }
        if now >= self.next_evidence {
            self.next_evidence = now + self.cfg.evidence_interval;
            self.evidence_due = true;
            self.meter_due = true;
        }
        second
    }

    /// Whether [`Self::next_op`] would start an operation now (cheap: the driver asks on every tick).
    pub fn op_due(&self) -> bool {
        self.in_flight == InFlight::None
            && match self.lifecycle {
                Lifecycle::Starting => true,
                Lifecycle::Running => {
                    !self.closing.is_empty()
                        || self.meter_due
                        || self.status_due
                        || self.tx.has_adds()
                }
                Lifecycle::Finishing => !self.closing.is_empty() || self.tx.has_adds(),
                Lifecycle::Finished => false,
            }
    }

    /// The next store operation to run, when none is in flight: the first status read before anything,
    /// then closed conversations (in order), then the meter, then the status read (which then reads
    /// fresher totals), then transcript segments for written conversations. While finishing, only
    /// conversations and segments; the final meter is [`Self::final_meter_op`].
    pub fn next_op(&mut self, now_ms: u64) -> Option<StoreOp> {
        if self.in_flight != InFlight::None || self.lifecycle == Lifecycle::Finished {
            return None;
        }
        if self.lifecycle == Lifecycle::Starting {
            self.lifecycle = Lifecycle::Running;
            self.in_flight = InFlight::Status { first: true };
            return Some(StoreOp::Status { first: true });
        }
        if let Some(delay) = self.write_delay.take() {
            let delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
            self.write_retry_at_ms = Some(now_ms.saturating_add(delay_ms));
        }
        if self.write_retry_at_ms.is_none_or(|at| now_ms >= at)
            && let Some(conv) = self.closing.pop_front()
        {
            self.in_flight = InFlight::Conversation;
            let op = StoreOp::Conversation {
                spans: conv.spans.clone(),
                speech_ms: ms(conv.speech_samples),
                locked: self.locked,
            };
            self.writing = Some(conv);
            return Some(op);
        }
        if self.lifecycle == Lifecycle::Finishing {
            return self.add_op(now_ms);
        }
        if self.meter_due {
            self.meter_due = false;
            if let Some(op) = self.meter_op(now_ms) {
                return Some(op);
            }
        }
        if self.status_due {
            self.status_due = false;
            self.in_flight = InFlight::Status { first: false };
            return Some(StoreOp::Status { first: false });
        }
        self.add_op(now_ms)
    }

    /// A record of the speech certain so far (finished runs and the committed part of an open one) since
    /// the last accepted one, and of the STT forwarded; `None` when there is nothing to record.
    /// With the session's evidence when it is due (every evidence interval, and at the end until written).
    fn meter_op(&mut self, now_ms: u64) -> Option<StoreOp> {
        let total_ms = ms(self.pipeline.speech_samples_committed());
        let delta_ms = total_ms.saturating_sub(self.metered_ms);
        let stt_ms = self.stt.unrecorded_ms;
        let finishing = self.lifecycle == Lifecycle::Finishing;
        let evidence = if finishing {
            !self.evidence_final
        } else {
            std::mem::take(&mut self.evidence_due)
        };
        if delta_ms == 0 && stt_ms == 0 && !evidence {
            return None;
        }
        self.in_flight = InFlight::Meter;
        Some(StoreOp::Meter {
            delta_ms,
            total_ms,
            stt_ms,
            stt_by_provider: Vec::new(),
            now_ms,
            evidence: evidence.then(|| Box::new(self.evidence(now_ms, !finishing))),
        })
    }

    /// The session's evidence now (`open` while it runs).
    pub fn evidence(&self, now_ms: u64, open: bool) -> SessionSummary {
        SessionSummary::new(
            &self.evidence_id,
            SessionLane::Realtime,
            SessionMeasures {
                started_at_ms: self.started_at_ms,
                audio_ms: samples_to_ms(
                    self.pipeline.decoded_samples(),
                    self.pipeline.codec_rate(),
                ),
                speech_ms: ms(self.pipeline.speech_samples()),
                longest_speech_ms: ms(self.longest_run),
                speech_runs: self.runs,
            },
            now_ms,
            open,
        )
    }

    /// Applies a finished operation.
    pub fn op_done(&mut self, done: OpResult) {
        self.in_flight = InFlight::None;
        match done {
            OpResult::Meter {
                metered_to,
                stt_recorded,
                evidence_written,
            } => {
                if evidence_written && self.lifecycle == Lifecycle::Finishing {
                    self.evidence_final = true;
                }
                if let Some(total) = metered_to {
                    self.metered_ms = self.metered_ms.max(total);
                }
                self.stt.unrecorded_ms = self.stt.unrecorded_ms.saturating_sub(stt_recorded);
            }
            OpResult::Status {
                first,
                status,
                announce,
            } => self.apply_status(first, *status, announce),
            OpResult::Conversation {
                stored,
                speech_ms,
                locked,
            } => match stored {
                Ok(id) => {
                    if let Some(conv) = self.writing.take() {
                        self.conversation_written(&id, conv);
                    }
                    self.write_backoff.reset();
                    self.write_retry_at_ms = None;
                    self.out.push(LiveEvent::ConversationClosed {
                        frames_received: self.frames_seen,
                        conversation_id: id,
                        speech_ms,
                        locked,
                    });
                }
                Err(code) => {
                    // Kept, first in line, and written again after a jittered backoff.
                    metrics::counter!(t::LISTEN_CONVERSATION_ERRORS_TOTAL, "reason" => code)
                        .increment(1);
                    if let Some(conv) = self.writing.take() {
                        self.closing.push_front(conv);
                    }
                    self.write_retry_at_ms = None;
                    self.write_delay = Some(self.write_backoff.next_delay());
                }
            },
            OpResult::Transcript { stored } => self.add_done(stored),
        }
    }

    /// Stops the session: returns whether the operation in flight must still be awaited (a record must
    /// land, or its speech could be metered twice; the first status read decides the STT gate of what is
    /// still to come). A periodic status read only reads: it is abandoned (`false`), and the driver drops
    /// it.
    pub fn begin_finish(&mut self) -> bool {
        self.lifecycle = Lifecycle::Finishing;
        let wait = match self.in_flight {
            InFlight::None => false,
            InFlight::Status { first: false } => self.stt.gate == Gate::Pending,
            InFlight::Status { first: true }
            | InFlight::Meter
            | InFlight::Conversation
            | InFlight::Transcript => true,
        };
        if !wait {
            self.in_flight = InFlight::None;
        }
        wait
    }

    /// The end of the stream, once every frame received was pushed: flushes the pipeline, closes the open
    /// run and the open conversation.
    pub fn end_of_stream(&mut self) {
        if self.error.is_none() {
            match self.pipeline.finish(&mut self.speech) {
                Ok(()) => self.handle_speech_events(),
                Err(e) => self.fail(e),
            }
            self.release_stt();
        }
        self.maybe_close_conversation(true);
    }

    /// The final record (retried by the driver a few times: what the metadata says must be in the meter).
    pub fn final_meter_op(&mut self, now_ms: u64) -> Option<StoreOp> {
        if self.in_flight != InFlight::None {
            return None;
        }
        self.meter_op(now_ms)
    }

    /// Whether the meter holds all of the session's speech and STT, and the store its final evidence.
    pub fn settled(&self) -> bool {
        self.metered_ms == ms(self.pipeline.speech_samples())
            && self.stt.unrecorded_ms == 0
            && self.evidence_final
    }

    /// The last step: drops reported, the STT stream closed, the `metadata` event, the report.
    pub fn finish(&mut self, counts: FrameCounts) -> SessionReport {
        let unwritten = self.unwritten();
        if unwritten > 0 {
            tracing::warn!(message = "Realtime conversations not written when the session ended.", uid = %self.params.uid, unwritten);
            metrics::counter!(t::LISTEN_CONVERSATIONS_DROPPED_TOTAL, "reason" => "session_ended")
                .increment(unwritten as u64);
            let segments: usize = self
                .closing
                .iter()
                .chain(self.writing.iter())
                .map(|c| c.segments.len())
                .sum();
            if segments > 0 {
                metrics::counter!(t::LISTEN_SEGMENTS_DROPPED_TOTAL, "reason" => "session_ended")
                    .increment(segments as u64);
            }
            self.closing.clear();
            self.writing = None;
        }
        self.drop_held_segments();
        self.report_drops(counts);
        self.stt_out.push(SttCommand::Close);
        let frames_received = counts.received.max(self.frames_seen);
        let frames_dropped = counts.dropped_ring_full + counts.dropped_too_large;
        let report = SessionReport {
            frames_received,
            frames_dropped,
            audio_ms: samples_to_ms(self.pipeline.decoded_samples(), self.pipeline.codec_rate()),
            speech_ms: ms(self.pipeline.speech_samples()),
            metered_ms: self.metered_ms,
            stt_forwarded_ms: self.stt.forwarded_ms,
            error: self.error,
        };
        self.out.push(LiveEvent::Metadata {
            frames_received,
            frames_dropped,
            audio_ms: report.audio_ms,
            speech_ms: report.speech_ms,
            stt_forwarded_ms: report.stt_forwarded_ms,
        });
        self.lifecycle = Lifecycle::Finished;
        report
    }

    fn fail(&mut self, e: PipelineError) {
        tracing::error!(message = "Live pipeline failed.", uid = %self.params.uid, error = %e);
        metrics::counter!(t::LISTEN_PIPELINE_ERRORS_TOTAL, "reason" => e.code()).increment(1);
        self.error = Some(e.code());
    }

    /// Tells the client about frames dropped since the last report.
    fn report_drops(&mut self, counts: FrameCounts) {
        let now = counts.dropped();
        for (i, reason) in [DropReason::RingFull, DropReason::TooLarge]
            .into_iter()
            .enumerate()
        {
            if now[i] > self.dropped_reported[i] {
                self.dropped_reported[i] = now[i];
                self.out.push(LiveEvent::FramesDropped {
                    frames_received: self.frames_seen,
                    frames_dropped: now[0] + now[1],
                    reason: reason.as_str(),
                });
            }
        }
    }
}

/// A process-unique evidence id: `rt:` + this process's random tag + a counter.
fn evidence_id() -> String {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    static TAG: OnceLock<u32> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let tag = TAG.get_or_init(rand::random::<u32>);
    format!("rt:{tag:08x}{:x}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Samples at 16 kHz → ms, rounded once.
fn ms(samples: u64) -> u64 {
    samples_to_ms(samples, TARGET_RATE)
}

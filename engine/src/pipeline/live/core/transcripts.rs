//! The session core's transcript for its conversations: each final segment from the provider goes to the
//! conversation its time falls in. While that conversation is open or waiting to be written the segment
//! travels with it; once it is written (it has an id), segments are added to it by id as store operations,
//! after the meter and the status read, retried with a jittered backoff like conversation writes. Nothing
//! here ever holds up the audio or the meter, and everything held is bounded and every drop counted.

use std::collections::VecDeque;
use std::time::Duration;

use super::conversations::OpenConversation;
use super::{SessionCore, write_backoff};
use crate::conversation::transcript::MAX_SEGMENTS_PER_CONVERSATION;
use crate::conversation::{SegmentsAdded, TranscriptSegment};
use crate::pipeline::live::contract::InFlight;
use crate::pipeline::live::ops::StoreOp;
use crate::telemetry as t;
use crate::time::{Backoff, Span};

/// A segment may start this long before its conversation's first span or after its last one ends (the
/// pre-roll, the hangover, a provider's rounding). Conversations are at least 120 s apart.
const SLACK_MS: u64 = 2_000;
/// Written conversations remembered, for segments that arrive after the write.
const WRITTEN_KEPT: usize = 8;
/// Segments a session holds (not yet placed, or waiting to be added); past it new ones are dropped and
/// counted. One conversation's worth: the store's own bound.
pub const MAX_HELD_SEGMENTS: usize = MAX_SEGMENTS_PER_CONVERSATION;
/// Segments one add carries.
const ADD_BATCH: usize = 200;

/// A written conversation: its id and time (absolute epoch ms).
#[derive(Debug)]
struct Written {
    id: String,
    start_ms: u64,
    end_ms: u64,
}

/// Segments not written yet, and the retry state of their adds.
#[derive(Debug)]
pub(super) struct Transcripts {
    /// Final segments no conversation covers yet (absolute ms), oldest first.
    unassigned: VecDeque<TranscriptSegment>,
    written: VecDeque<Written>,
    /// Segments of written conversations to add, by conversation id, oldest first.
    adds: VecDeque<(String, Vec<TranscriptSegment>)>,
    /// The add in flight (queued again at the front if it fails).
    adding: Option<(String, Vec<TranscriptSegment>)>,
    backoff: Backoff,
    delay: Option<Duration>,
    retry_at_ms: Option<u64>,
}

impl Default for Transcripts {
    fn default() -> Self {
        Transcripts {
            unassigned: VecDeque::new(),
            written: VecDeque::new(),
            adds: VecDeque::new(),
            adding: None,
            backoff: write_backoff(),
            delay: None,
            retry_at_ms: None,
        }
    }
}

impl Transcripts {
    /// Segments waiting to be added (queued or in flight).
    pub(super) fn unwritten(&self) -> usize {
        self.adds.iter().map(|(_, s)| s.len()).sum::<usize>()
            + self.adding.as_ref().map_or(0, |(_, s)| s.len())
    }

    pub(super) fn has_adds(&self) -> bool {
        !self.adds.is_empty()
    }

    fn queue_add(&mut self, id: &str, seg: TranscriptSegment) {
        match self.adds.back_mut() {
            Some((last, segs)) if last == id && segs.len() < ADD_BATCH => segs.push(seg),
            _ => self.adds.push_back((id.to_owned(), vec![seg])),
        }
    }
}

/// Where a segment goes.
enum Target {
    Open,
    Closing(usize),
    Writing,
    Written(usize),
}

fn bounds(spans: &[Span]) -> Option<(u64, u64)> {
    Some((spans.first()?.start, spans.last()?.end))
}

/// How far `seg` starts from `[start, end]` (0 inside it).
fn distance(seg: &TranscriptSegment, (start, end): (u64, u64)) -> u64 {
    start
        .saturating_sub(seg.start_ms)
        .max(seg.start_ms.saturating_sub(end))
}

fn dropped(reason: &'static str, n: usize) {
    if n > 0 {
        metrics::counter!(t::LISTEN_SEGMENTS_DROPPED_TOTAL, "reason" => reason).increment(n as u64);
    }
}

impl SessionCore {
    /// Final transcript segments from the provider (times in stream ms), in order.
    pub fn transcript_finals(&mut self, segments: Vec<TranscriptSegment>) {
        for mut seg in segments {
            if self.held_segments() >= MAX_HELD_SEGMENTS {
                dropped("queue_full", 1);
                continue;
            }
            seg.start_ms += self.started_at_ms;
            seg.end_ms += self.started_at_ms;
            self.tx.unassigned.push_back(seg);
        }
        self.route_segments(false);
    }

    /// Every result of the provider is in (the session's end): the segments no conversation covers go to
    /// the nearest one.
    pub fn end_of_transcripts(&mut self) {
        self.route_segments(true);
    }

    /// Transcript segments not written yet (the driver's last attempts when the session ends).
    pub fn unwritten_segments(&self) -> usize {
        self.tx.unwritten()
    }

    fn held_segments(&self) -> usize {
        let in_conversations: usize = self
            .conversation
            .iter()
            .chain(self.closing.iter())
            .chain(self.writing.iter())
            .map(|c| c.segments.len())
            .sum();
        in_conversations + self.tx.unassigned.len() + self.tx.unwritten()
    }

    /// Gives each unassigned segment to the conversation its time falls in; with `last`, the nearest
    /// conversation takes what none covers.
    pub(super) fn route_segments(&mut self, last: bool) {
        let pending = std::mem::take(&mut self.tx.unassigned);
        for seg in pending {
            match self.target(&seg, last) {
                Some(target) => self.place(seg, target),
                None if last => dropped("no_conversation", 1),
                None => self.tx.unassigned.push_back(seg),
            }
        }
    }

    fn target(&self, seg: &TranscriptSegment, nearest: bool) -> Option<Target> {
        let mut candidates: Vec<(Target, (u64, u64))> = Vec::new();
        if let Some((start, _)) = self.conversation.as_ref().and_then(|c| bounds(&c.spans)) {
            candidates.push((Target::Open, (start, u64::MAX)));
        }
        for (i, c) in self.closing.iter().enumerate().rev() {
            if let Some(b) = bounds(&c.spans) {
                candidates.push((Target::Closing(i), b));
            }
        }
        if let Some(b) = self.writing.as_ref().and_then(|c| bounds(&c.spans)) {
            candidates.push((Target::Writing, b));
        }
        for (i, w) in self.tx.written.iter().enumerate().rev() {
            candidates.push((Target::Written(i), (w.start_ms, w.end_ms)));
        }
        let best = candidates
            .into_iter()
            .map(|(target, b)| (distance(seg, b), target))
            .min_by_key(|(d, _)| *d)?;
        (nearest || best.0 <= SLACK_MS).then_some(best.1)
    }

    fn place(&mut self, seg: TranscriptSegment, target: Target) {
        let conv: Option<&mut OpenConversation> = match target {
            Target::Open => self.conversation.as_mut(),
            Target::Closing(i) => self.closing.get_mut(i),
            Target::Writing => self.writing.as_mut(),
            Target::Written(i) => {
                if let Some(w) = self.tx.written.get(i) {
                    let id = w.id.clone();
                    self.tx.queue_add(&id, seg);
                }
                return;
            }
        };
        match conv {
            Some(c) if c.segments.len() < MAX_SEGMENTS_PER_CONVERSATION => c.segments.push(seg),
            _ => dropped("conversation_full", 1),
        }
    }

    /// A conversation was written as `id`: its segments are added to it next, and later ones find it.
    pub(super) fn conversation_written(&mut self, id: &str, mut conv: OpenConversation) {
        if let Some((start_ms, end_ms)) = bounds(&conv.spans) {
            if self.tx.written.len() >= WRITTEN_KEPT {
                self.tx.written.pop_front();
            }
            self.tx.written.push_back(Written {
                id: id.to_owned(),
                start_ms,
                end_ms,
            });
        }
        for seg in conv.segments.drain(..) {
            self.tx.queue_add(id, seg);
        }
    }

    /// The next add of segments, unless one waits for its retry.
    pub(super) fn add_op(&mut self, now_ms: u64) -> Option<StoreOp> {
        if let Some(delay) = self.tx.delay.take() {
            let delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
            self.tx.retry_at_ms = Some(now_ms.saturating_add(delay_ms));
        }
        if self.tx.retry_at_ms.is_some_and(|at| now_ms < at) {
            return None;
        }
        let (id, segments) = self.tx.adds.pop_front()?;
        self.in_flight = InFlight::Transcript;
        let op = StoreOp::Transcript {
            id: id.clone(),
            segments: segments.clone(),
        };
        self.tx.adding = Some((id, segments));
        Some(op)
    }

    /// Lets a failed add be retried at once (the driver's last attempts).
    pub fn retry_adds_now(&mut self) {
        self.tx.delay = None;
        self.tx.retry_at_ms = None;
    }

    /// Applies the result of an add.
    pub(super) fn add_done(&mut self, stored: Result<SegmentsAdded, &'static str>) {
        let Some((id, segments)) = self.tx.adding.take() else {
            return;
        };
        match stored {
            Ok(added) => {
                self.tx.backoff.reset();
                self.tx.retry_at_ms = None;
                dropped("conversation_full", added.refused as usize);
            }
            Err("conversation_not_found") => dropped("conversation_gone", segments.len()),
            Err(code) => {
                metrics::counter!(t::LISTEN_TRANSCRIPT_ERRORS_TOTAL, "reason" => code).increment(1);
                self.tx.adds.push_front((id, segments));
                self.tx.retry_at_ms = None;
                self.tx.delay = Some(self.tx.backoff.next_delay());
            }
        }
    }

    /// The session's end: what is still held is counted as dropped.
    pub(super) fn drop_held_segments(&mut self) {
        let unwritten = self.tx.unwritten() + self.tx.unassigned.len();
        if unwritten > 0 {
            tracing::warn!(message = "Realtime transcript segments not written when the session ended.", uid = %self.params.uid, unwritten);
        }
        dropped("session_ended", unwritten);
        self.tx.adds.clear();
        self.tx.adding = None;
        self.tx.unassigned.clear();
    }
}

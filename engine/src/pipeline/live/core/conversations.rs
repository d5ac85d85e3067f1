//! The session core's conversations: built from speech runs, closed after `conversation_timeout` of
//! silence (stream audio time), and queued to be written as store operations.

use super::{MAX_CLOSING, MAX_UNWRITTEN, SessionCore, ms};
use crate::audio::detector::SpeechEvent;
use crate::audio::resample::TARGET_RATE;
use crate::conversation::{self, TranscriptSegment};
use crate::pipeline::live::events::LiveEvent;
use crate::telemetry as t;
use crate::time::Span;

/// The conversation being built (absolute epoch ms spans).
#[derive(Debug, Default)]
pub(super) struct OpenConversation {
    pub spans: Vec<Span>,
    pub speech_samples: u64,
    /// End of the last speech run, in samples at 16 kHz.
    pub last_end: u64,
    /// Final transcript segments of its time (absolute ms), written with it (`super::transcripts`).
    pub segments: Vec<TranscriptSegment>,
}

impl SessionCore {
    /// Whether closed conversations piled up past [`MAX_CLOSING`]: the driver then completes store
    /// operations before it reads more audio.
    pub fn backlogged(&self) -> bool {
        self.closing.len() > MAX_CLOSING && !self.write_waiting()
    }

    /// Whether a failed conversation write waits for its retry.
    fn write_waiting(&self) -> bool {
        self.write_delay.is_some() || self.write_retry_at_ms.is_some()
    }

    /// Closed conversations not written yet (queued, waiting for a retry, or in flight).
    pub fn unwritten(&self) -> usize {
        self.closing.len() + usize::from(self.writing.is_some())
    }

    /// Lets a failed write be retried at once (the driver's last attempts when the session ends).
    pub fn retry_writes_now(&mut self) {
        self.write_delay = None;
        self.write_retry_at_ms = None;
    }

    pub(super) fn handle_speech_events(&mut self) {
        let mut events = std::mem::take(&mut self.speech);
        for e in events.drain(..) {
            match e {
                SpeechEvent::Started(start) => {
                    // Decided on the run's own start, not on when the tick saw it: batching (a lagging
                    // pipeline, a fast client) never merges what the timeout separates.
                    let gap_over = self.conversation.as_ref().is_some_and(|c| {
                        start.saturating_sub(c.last_end) >= self.timeout_samples()
                    });
                    if gap_over {
                        self.close_conversation();
                    }
                    self.out.push(LiveEvent::SpeechStarted {
                        frames_received: self.frames_seen,
                        at_ms: ms(start),
                    });
                    if let Some(feed) = self.stt.feed.as_mut() {
                        feed.started(start);
                    }
                }
                SpeechEvent::Ended(span) => self.speech_ended(span),
            }
        }
        self.speech = events;
    }

    pub(super) fn speech_ended(&mut self, span: Span) {
        let speech_ms = ms(span.len());
        self.longest_run = self.longest_run.max(span.len());
        self.runs += 1;
        self.out.push(LiveEvent::SpeechEnded {
            frames_received: self.frames_seen,
            at_ms: ms(span.end),
            speech_ms,
        });
        let conv = self
            .conversation
            .get_or_insert_with(OpenConversation::default);
        conv.spans.push(Span {
            start: self.started_at_ms + ms(span.start),
            end: self.started_at_ms + ms(span.end),
        });
        conv.speech_samples += span.len();
        conv.last_end = span.end;
        self.forward_stt(span, speech_ms);
        // Segments of this run that came before it ended now have a conversation.
        self.route_segments(false);
    }

    /// Closes the open conversation after `conversation_timeout` of silence (stream audio time), when it
    /// holds as many spans as one conversation may, or unconditionally at the end (`force`).
    pub(super) fn maybe_close_conversation(&mut self, force: bool) {
        let Some(conv) = &self.conversation else {
            return;
        };
        let due = force
            || conv.spans.len() >= conversation::MAX_SPANS_PER_CONVERSATION
            || (!self.pipeline.in_speech()
                && self.position_16k().saturating_sub(conv.last_end) >= self.timeout_samples());
        if due {
            self.close_conversation();
        }
    }

    /// Queues the open conversation to be written (an operation: a slow store never holds up the audio).
    /// Its `conversation_closed` event follows when the store answers. Past [`MAX_UNWRITTEN`] (writes
    /// failing for a long time) the oldest queued one is dropped and counted.
    pub(super) fn close_conversation(&mut self) {
        if let Some(conv) = self.conversation.take() {
            self.closing.push_back(conv);
            if self.unwritten() > MAX_UNWRITTEN
                && let Some(oldest) = self.closing.pop_front()
            {
                tracing::warn!(message = "Realtime conversation dropped: too many unwritten.", uid = %self.params.uid, spans = oldest.spans.len());
                metrics::counter!(t::LISTEN_CONVERSATIONS_DROPPED_TOTAL, "reason" => "queue_full")
                    .increment(1);
                if !oldest.segments.is_empty() {
                    metrics::counter!(t::LISTEN_SEGMENTS_DROPPED_TOTAL, "reason" => "queue_full")
                        .increment(oldest.segments.len() as u64);
                }
            }
        }
    }

    /// `conversation_timeout` in samples at 16 kHz.
    pub(super) fn timeout_samples(&self) -> u64 {
        self.params.conversation_timeout_ms * u64::from(TARGET_RATE) / 1000
    }

    /// Stream position in samples at 16 kHz.
    fn position_16k(&self) -> u64 {
        let rate = u64::from(self.pipeline.codec_rate().max(1));
        self.pipeline.decoded_samples() * u64::from(TARGET_RATE) / rate
    }
}

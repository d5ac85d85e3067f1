//! What a live session sends the app about speech-to-text: transcript segments in the reference's format
//! (a JSON array, sent as segments change, at most every [`SEND_INTERVAL`]) and whether transcription is
//! available (`stt_unavailable` with a reason, `stt_available`). Sans-IO: time comes in as arguments.

use std::collections::VecDeque;
use std::time::Duration;

use rand::RngExt as _;
use serde::Serialize;
use tokio::time::Instant;

use crate::conversation::TranscriptSegment;
use crate::stt::{ResultKind, SttResult};

/// The shortest time between two transcript messages (the reference sends about every 0.6 s).
pub const SEND_INTERVAL: Duration = Duration::from_millis(600);
/// Segments a session keeps (the newest); older ones were sent long ago.
const MAX_SEGMENTS: usize = 1_000;
/// Final segments waiting for the session to take them (it does every tick); past it the oldest go.
const MAX_FINALS: usize = 256;

/// One transcript segment as the app reads it (DESIGN §7; the reference's `TranscriptSegment`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Segment {
    pub id: String,
    pub text: String,
    /// `SPEAKER_00`, `SPEAKER_01`, … (the provider's diarized speaker; 0 when it gives none).
    pub speaker: String,
    pub speaker_id: u32,
    pub is_user: bool,
    pub person_id: Option<String>,
    /// Seconds of the session's audio (stream time).
    pub start: f64,
    pub end: f64,
    pub translations: Vec<serde_json::Value>,
    /// Not sent: whether the provider may still change it.
    #[serde(skip)]
    pub interim: bool,
    #[serde(skip)]
    changed: bool,
}

/// The session's transcript: segments built from the provider's results.
#[derive(Debug)]
pub struct Transcript {
    segments: VecDeque<Segment>,
    last_sent: Option<Instant>,
    /// Random per session: segment ids are `<session>-<n>`.
    session: u64,
    next: u64,
    /// Segments that became final since [`Self::take_finals`] (stream-time ms), for the conversation.
    finals: Vec<TranscriptSegment>,
}

impl Default for Transcript {
    fn default() -> Self {
        Transcript {
            segments: VecDeque::new(),
            last_sent: None,
            session: rand::rng().random(),
            next: 0,
            finals: Vec::new(),
        }
    }
}

impl Transcript {
    /// Applies one result: an interim result replaces the open interim segment (same id) or opens one; a
    /// final result replaces it for good, or adds a segment.
    pub fn apply(&mut self, r: &SttResult) {
        let interim = r.kind == ResultKind::Interim;
        let speaker_id = r.speaker.unwrap_or(0);
        if let Some(last) = self.segments.back_mut()
            && last.interim
        {
            last.text = r.text.trim().to_string();
            last.start = secs(r.start_ms);
            last.end = secs(r.end_ms);
            last.speaker = speaker(speaker_id);
            last.speaker_id = speaker_id;
            last.interim = interim;
            last.changed = true;
            if !interim {
                let done = final_of(last, r);
                self.keep_final(done);
            }
            return;
        }
        if self.segments.len() >= MAX_SEGMENTS {
            self.segments.pop_front();
        }
        self.next += 1;
        self.segments.push_back(Segment {
            id: format!("{:016x}-{}", self.session, self.next),
            text: r.text.trim().to_string(),
            speaker: speaker(speaker_id),
            speaker_id,
            is_user: false,
            person_id: None,
            start: secs(r.start_ms),
            end: secs(r.end_ms),
            translations: Vec::new(),
            interim,
            changed: true,
        });
        if !interim && let Some(last) = self.segments.back() {
            let done = final_of(last, r);
            self.keep_final(done);
        }
    }

    fn keep_final(&mut self, seg: Option<TranscriptSegment>) {
        let Some(seg) = seg else { return };
        if self.finals.len() >= MAX_FINALS {
            self.finals.remove(0);
            metrics::counter!(crate::telemetry::LISTEN_SEGMENTS_DROPPED_TOTAL, "reason" => "queue_full")
                .increment(1);
        }
        self.finals.push(seg);
    }

    /// The segments that became final since the last call (times in stream ms), oldest first.
    pub fn take_finals(&mut self) -> Vec<TranscriptSegment> {
        std::mem::take(&mut self.finals)
    }

    /// The JSON array of the segments changed since the last message, when there are some and the last
    /// message is at least [`SEND_INTERVAL`] old (or `force`, at the end of the session).
    pub fn due(&mut self, now: Instant, force: bool) -> Option<String> {
        if !self.segments.iter().any(|s| s.changed) {
            return None;
        }
        if !force
            && self
                .last_sent
                .is_some_and(|t| now.saturating_duration_since(t) < SEND_INTERVAL)
        {
            return None;
        }
        self.last_sent = Some(now);
        let changed: Vec<&Segment> = self.segments.iter().filter(|s| s.changed).collect();
        let json = serde_json::to_string(&changed).ok();
        for s in self.segments.iter_mut() {
            s.changed = false;
        }
        json
    }

    /// Every segment kept, oldest first.
    pub fn segments(&self) -> impl Iterator<Item = &Segment> {
        self.segments.iter()
    }
}

/// The stored form of a segment that just became final; `None` when it holds no words.
fn final_of(seg: &Segment, r: &SttResult) -> Option<TranscriptSegment> {
    (!seg.text.is_empty()).then(|| {
        TranscriptSegment::new(
            seg.id.clone(),
            &seg.text,
            seg.speaker_id,
            r.start_ms,
            r.end_ms,
        )
    })
}

fn secs(ms: u64) -> f64 {
    ms as f64 / 1000.0
}

fn speaker(id: u32) -> String {
    format!("SPEAKER_{id:02}")
}

/// Whether transcription is available, as last told to the client: an `stt_unavailable` event when a
/// reason appears or changes, `stt_available` when none is left.
#[derive(Debug, Default)]
pub struct Availability {
    told: Option<&'static str>,
}

/// What to tell the client about availability.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Unavailable(&'static str),
    Available,
}

impl Availability {
    /// The current reason transcription is unavailable (`None`: available); returns the change to tell.
    pub fn update(&mut self, reason: Option<&'static str>) -> Option<Change> {
        if reason == self.told {
            return None;
        }
        self.told = reason;
        Some(match reason {
            Some(r) => Change::Unavailable(r),
            None => Change::Available,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(kind: ResultKind, text: &str, start_ms: u64, end_ms: u64) -> SttResult {
        SttResult {
            kind,
            text: text.into(),
            start_ms,
            end_ms,
            confidence: None,
            words: Vec::new(),
            speaker: None,
        }
    }

    #[test]
    fn segments_go_out_in_the_apps_format_at_most_every_interval() {
        let mut t = Transcript::default();
        let t0 = Instant::now();
        assert_eq!(t.due(t0, false), None, "nothing to send");
        t.apply(&result(ResultKind::Final, " Hello there.", 1_250, 2_500));
        let json = t.due(t0, false).unwrap();
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        let seg = &v.as_array().unwrap()[0];
        assert_eq!(seg["text"], "Hello there.");
        assert_eq!(seg["speaker"], "SPEAKER_00");
        assert_eq!(seg["speaker_id"], 0);
        assert_eq!(seg["is_user"], false);
        assert!(seg["person_id"].is_null());
        assert_eq!(seg["start"], 1.25);
        assert_eq!(seg["end"], 2.5);
        assert_eq!(seg["translations"], serde_json::json!([]));
        assert!(seg["id"].as_str().unwrap().ends_with("-1"));
        assert_eq!(seg.as_object().unwrap().len(), 9, "{seg}");
        // A new segment 100 ms later waits for the interval; only changed segments are sent.
        t.apply(&result(ResultKind::Final, "Second.", 3_000, 4_000));
        assert_eq!(t.due(t0 + Duration::from_millis(100), false), None);
        let json = t.due(t0 + SEND_INTERVAL, false).unwrap();
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v.as_array().unwrap().len(), 1);
        assert_eq!(v[0]["text"], "Second.");
    }

    #[test]
    fn an_interim_segment_is_updated_in_place_until_final() {
        let mut t = Transcript::default();
        let t0 = Instant::now();
        t.apply(&result(ResultKind::Interim, "hel", 0, 500));
        let a: serde_json::Value = serde_json::from_str(&t.due(t0, false).unwrap()).unwrap();
        t.apply(&result(ResultKind::Interim, "hello wor", 0, 900));
        t.apply(&result(ResultKind::Final, "hello world", 0, 1_000));
        let b: serde_json::Value =
            serde_json::from_str(&t.due(t0 + SEND_INTERVAL, true).unwrap()).unwrap();
        assert_eq!(a[0]["id"], b[0]["id"], "same segment");
        assert_eq!(b[0]["text"], "hello world");
        assert_eq!(t.segments().count(), 1);
        t.apply(&result(ResultKind::Final, "next", 2_000, 2_500));
        assert_eq!(t.segments().count(), 2, "a final segment is never replaced");
    }

    #[test]
    fn final_segments_are_handed_over_once_with_their_stream_times() {
        let mut t = Transcript::default();
        t.apply(&result(ResultKind::Interim, "hel", 100, 500));
        assert!(
            t.take_finals().is_empty(),
            "an interim result is not stored"
        );
        t.apply(&result(ResultKind::Final, " hello ", 100, 900));
        t.apply(&result(ResultKind::Final, "", 1_000, 1_200));
        t.apply(&result(ResultKind::Final, "again", 2_000, 2_500));
        let finals = t.take_finals();
        let texts: Vec<_> = finals.iter().map(|s| s.text.as_str()).collect();
        assert_eq!(texts, ["hello", "again"], "empty results carry no words");
        assert_eq!((finals[0].start_ms, finals[0].end_ms), (100, 900));
        let sent: Vec<String> = t.segments().map(|s| s.id.clone()).collect();
        assert_eq!(finals[0].id, sent[0], "the id the app saw");
        assert!(t.take_finals().is_empty());
    }

    #[test]
    fn availability_is_told_once_per_change() {
        let mut a = Availability::default();
        assert_eq!(a.update(None), None);
        assert_eq!(
            a.update(Some("queue_full")),
            Some(Change::Unavailable("queue_full"))
        );
        assert_eq!(a.update(Some("queue_full")), None);
        assert_eq!(
            a.update(Some("budget_exhausted")),
            Some(Change::Unavailable("budget_exhausted"))
        );
        assert_eq!(a.update(None), Some(Change::Available));
    }
}

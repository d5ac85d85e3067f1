//! A conversation's transcript: the final segments a speech-to-text provider gave for its audio, stored
//! beside the conversation (not inside its day bucket: a long conversation's words would make every upsert of
//! that day read and write them) and keyed by segment id, so adding the same segment again (a retry)
//! replaces it instead of duplicating it.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::ConversationError;

/// Segments one conversation keeps; past it further segments are refused (counted by the caller).
pub const MAX_SEGMENTS_PER_CONVERSATION: usize = 10_000;
/// Segments one add may carry.
pub const MAX_SEGMENTS_PER_ADD: usize = 1_000;
/// Longest segment text kept (bytes, cut at a character boundary): a 10 s chunk is ~200 bytes of words.
pub const MAX_SEGMENT_TEXT_BYTES: usize = 4_096;
/// Longest segment id.
pub const MAX_SEGMENT_ID_BYTES: usize = 128;

/// One stored transcript segment. Times are absolute (UTC epoch ms), like the conversation's spans; the
/// app's relative seconds are computed when it is served ([`TranscriptSegment::app_json`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TranscriptSegment {
    pub id: String,
    pub text: String,
    pub speaker_id: u32,
    #[serde(default)]
    pub is_user: bool,
    #[serde(default)]
    pub person_id: Option<String>,
    pub start_ms: u64,
    pub end_ms: u64,
}

impl TranscriptSegment {
    /// A segment with its text trimmed and cut to [`MAX_SEGMENT_TEXT_BYTES`].
    pub fn new(id: String, text: &str, speaker_id: u32, start_ms: u64, end_ms: u64) -> Self {
        let mut text = text.trim();
        if text.len() > MAX_SEGMENT_TEXT_BYTES {
            let mut cut = MAX_SEGMENT_TEXT_BYTES;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text = &text[..cut];
        }
        TranscriptSegment {
            id,
            text: text.to_owned(),
            speaker_id,
            is_user: false,
            person_id: None,
            start_ms,
            end_ms: end_ms.max(start_ms),
        }
    }

    /// The segment in the app's format (the reference's `TranscriptSegment`: `start`/`end` in seconds from
    /// the conversation's start, clamped at 0), plus the absolute `start_ms`/`end_ms`.
    pub fn app_json(&self, conversation_started_at_ms: u64) -> Value {
        let secs = |ms: u64| ms.saturating_sub(conversation_started_at_ms) as f64 / 1000.0;
        json!({
            "id": self.id,
            "text": self.text,
            "speaker": format!("SPEAKER_{:02}", self.speaker_id),
            "speaker_id": self.speaker_id,
            "is_user": self.is_user,
            "person_id": self.person_id,
            "start": secs(self.start_ms),
            "end": secs(self.end_ms),
            "start_ms": self.start_ms,
            "end_ms": self.end_ms,
            "translations": [],
        })
    }
}

/// How far a stretch of a conversation's audio (a sync span) got through transcription. A conversation's
/// own status is the worst of its spans' ([`TranscriptStatus::worst`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TranscriptStatus {
    /// Transcribed and stored: a re-upload sends none of it again.
    Done,
    /// Not transcribed yet (the request's time ran out, the engine's queue was full, or the entitlement could
    /// not be read): a re-upload retries it.
    Pending,
    /// Beyond the user's STT budget for the day: a re-upload after the reset transcribes it.
    BudgetExhausted,
    /// The provider failed on it: a re-upload retries it.
    Failed,
}

impl TranscriptStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            TranscriptStatus::Done => "done",
            TranscriptStatus::Pending => "pending",
            TranscriptStatus::BudgetExhausted => "budget_exhausted",
            TranscriptStatus::Failed => "failed",
        }
    }

    pub fn parse(word: &str) -> Option<TranscriptStatus> {
        [
            TranscriptStatus::Done,
            TranscriptStatus::Pending,
            TranscriptStatus::BudgetExhausted,
            TranscriptStatus::Failed,
        ]
        .into_iter()
        .find(|s| s.as_str() == word)
    }

    /// The worst of some statuses (`None` when there are none): failed, then budget_exhausted, then
    /// pending, then done.
    pub fn worst(statuses: impl IntoIterator<Item = TranscriptStatus>) -> Option<TranscriptStatus> {
        statuses.into_iter().max()
    }
}

/// Span statuses one conversation keeps (a sync span is at least 1 s, a conversation at most 4 h).
pub const MAX_SPAN_STATUSES_PER_CONVERSATION: usize = 20_000;

/// What an add did: `stored` segments written (new or replaced), `refused` ones past
/// [`MAX_SEGMENTS_PER_CONVERSATION`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SegmentsAdded {
    pub stored: u64,
    pub refused: u64,
}

/// Checks an add's segments: the count, and ids that are non-empty and short.
pub fn check_segments(segments: &[TranscriptSegment]) -> Result<(), ConversationError> {
    if segments.len() > MAX_SEGMENTS_PER_ADD {
        return Err(ConversationError::Invalid(format!(
            "{} segments in one add (at most {MAX_SEGMENTS_PER_ADD})",
            segments.len()
        )));
    }
    if let Some(bad) = segments
        .iter()
        .find(|s| s.id.is_empty() || s.id.len() > MAX_SEGMENT_ID_BYTES)
    {
        return Err(ConversationError::Invalid(format!(
            "segment id of {} bytes (1 to {MAX_SEGMENT_ID_BYTES})",
            bad.id.len()
        )));
    }
    Ok(())
}

/// Segments in time order (ties by id), the order they are served in.
pub fn sort_segments(segments: &mut [TranscriptSegment]) {
    segments.sort_by(|a, b| (a.start_ms, a.end_ms, &a.id).cmp(&(b.start_ms, b.end_ms, &b.id)));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_trimmed_and_cut_at_a_character_boundary() {
        let long = "é".repeat(MAX_SEGMENT_TEXT_BYTES);
        let s = TranscriptSegment::new("a".into(), &format!("  {long} "), 0, 10, 5);
        assert!(s.text.len() <= MAX_SEGMENT_TEXT_BYTES);
        assert!(s.text.chars().all(|c| c == 'é'));
        assert_eq!(s.end_ms, 10, "an end before the start is raised to it");
    }

    #[test]
    fn the_app_format_counts_seconds_from_the_conversation_start() {
        let s = TranscriptSegment::new("x-1".into(), "Hello.", 1, 10_500, 12_000);
        let v = s.app_json(10_000);
        assert_eq!(v["start"], 0.5);
        assert_eq!(v["end"], 2.0);
        assert_eq!(v["speaker"], "SPEAKER_01");
        assert_eq!(v["start_ms"], 10_500);
        assert_eq!(
            s.app_json(11_000)["start"],
            0.0,
            "pre-roll before the start"
        );
    }

    #[test]
    fn the_worst_status_wins_and_words_round_trip() {
        use TranscriptStatus::*;
        assert_eq!(TranscriptStatus::worst([]), None);
        assert_eq!(TranscriptStatus::worst([Done, Done]), Some(Done));
        assert_eq!(TranscriptStatus::worst([Done, Pending]), Some(Pending));
        assert_eq!(
            TranscriptStatus::worst([Pending, BudgetExhausted, Done]),
            Some(BudgetExhausted)
        );
        assert_eq!(
            TranscriptStatus::worst([Failed, BudgetExhausted]),
            Some(Failed)
        );
        for s in [Done, Pending, BudgetExhausted, Failed] {
            assert_eq!(TranscriptStatus::parse(s.as_str()), Some(s));
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        assert_eq!(TranscriptStatus::parse("Done"), None);
    }

    #[test]
    fn empty_long_or_too_many_ids_are_refused() {
        let seg = |id: &str| TranscriptSegment::new(id.into(), "a", 0, 0, 1);
        assert!(check_segments(&[seg("ok")]).is_ok());
        assert!(check_segments(&[seg("")]).is_err());
        assert!(check_segments(&[seg(&"x".repeat(MAX_SEGMENT_ID_BYTES + 1))]).is_err());
        let many = vec![seg("a"); MAX_SEGMENTS_PER_ADD + 1];
        assert!(check_segments(&many).is_err());
    }
}

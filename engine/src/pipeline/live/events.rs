//! The JSON events a live session sends its client (documented in `docs/protocol.md`).
//!
//! Every event carries `frames_received`: the sequence count of the newest audio frame the pipeline had
//! consumed when the event was produced, so a client can measure latency from that frame's send time.

use serde::Serialize;

use crate::policy::{CapKind, SpeechMs, Stage};

/// One server → client event.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum LiveEvent {
    /// The detector confirmed a speech run starting at `at_ms` (stream audio time).
    SpeechStarted { frames_received: u64, at_ms: u64 },
    /// A speech run ended at `at_ms`; `speech_ms` is its length (what it adds to the metered total).
    SpeechEnded {
        frames_received: u64,
        at_ms: u64,
        speech_ms: u64,
    },
    /// Every usage interval: this session's speech and the user's rolling totals.
    Usage {
        frames_received: u64,
        session_speech_ms: u64,
        speech_ms: SpeechMs,
        stage: Stage,
    },
    /// The user's stage or credit lock changed (and once at connect when not `none`/unlocked).
    FairUse {
        frames_received: u64,
        stage: Stage,
        locked: bool,
    },
    /// The user's speech reached 80 % or 100 % of a cap of their plan: sent once per crossing (across
    /// sessions and nodes), again only after the usage fell back under that level.
    UsageThreshold {
        frames_received: u64,
        cap: CapKind,
        level_pct: u8,
        speech_ms: u64,
        limit_ms: u64,
        message: String,
    },
    /// The daily STT budget is used up: speech is still metered, no longer forwarded to STT.
    SttBudgetExhausted {
        frames_received: u64,
        used_ms: u64,
        daily_limit_ms: u64,
        resets_at_ms: u64,
    },
    /// `conversation_timeout` of silence closed the current conversation (or the session ended).
    ConversationClosed {
        frames_received: u64,
        conversation_id: String,
        speech_ms: u64,
        locked: bool,
    },
    /// Frames were dropped since the last report (the pipeline fell behind, or a packet was too large).
    FramesDropped {
        frames_received: u64,
        frames_dropped: u64,
        reason: &'static str,
    },
    /// The speech-to-text service's state: `stt_initiating` at connect, then `ready` once the provider's
    /// stream is open (sessions with `VOICEGATE_STT=none` send neither).
    ServiceStatus {
        frames_received: u64,
        status: &'static str,
    },
    /// Transcription stopped: `reason` is `entitlement_unknown`, `budget_exhausted`, `provider_error`,
    /// `queue_full`, … (docs/protocol.md). Metering goes on.
    SttUnavailable {
        frames_received: u64,
        reason: &'static str,
    },
    /// Transcription works again after an `stt_unavailable`.
    SttAvailable { frames_received: u64 },
    /// The last event of a session.
    Metadata {
        frames_received: u64,
        frames_dropped: u64,
        audio_ms: u64,
        speech_ms: u64,
        stt_forwarded_ms: u64,
    },
}

impl LiveEvent {
    /// The `type` string (also the metric label).
    pub fn kind(&self) -> &'static str {
        match self {
            LiveEvent::SpeechStarted { .. } => "speech_started",
            LiveEvent::SpeechEnded { .. } => "speech_ended",
            LiveEvent::Usage { .. } => "usage",
            LiveEvent::FairUse { .. } => "fair_use",
            LiveEvent::UsageThreshold { .. } => "usage_threshold",
            LiveEvent::SttBudgetExhausted { .. } => "stt_budget_exhausted",
            LiveEvent::ConversationClosed { .. } => "conversation_closed",
            LiveEvent::FramesDropped { .. } => "frames_dropped",
            LiveEvent::ServiceStatus { .. } => "service_status",
            LiveEvent::SttUnavailable { .. } => "stt_unavailable",
            LiveEvent::SttAvailable { .. } => "stt_available",
            LiveEvent::Metadata { .. } => "metadata",
        }
    }

    /// The JSON text sent on the socket.
    pub fn to_json(&self) -> String {
        // Serializing these plain structs cannot fail (no maps with non-string keys, no custom impls).
        serde_json::to_string(self).unwrap_or_else(|_| format!("{{\"type\":\"{}\"}}", self.kind()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_serialize_to_the_documented_shapes() {
        let e = LiveEvent::SpeechEnded {
            frames_received: 42,
            at_ms: 1200,
            speech_ms: 800,
        };
        assert_eq!(
            e.to_json(),
            r#"{"type":"speech_ended","frames_received":42,"at_ms":1200,"speech_ms":800}"#
        );
        let u = LiveEvent::Usage {
            frames_received: 1,
            session_speech_ms: 2,
            speech_ms: SpeechMs {
                daily_ms: 3,
                three_day_ms: 4,
                weekly_ms: 5,
                month_ms: 6,
            },
            stage: Stage::Warning,
        };
        assert_eq!(
            u.to_json(),
            r#"{"type":"usage","frames_received":1,"session_speech_ms":2,"speech_ms":{"daily_ms":3,"three_day_ms":4,"weekly_ms":5,"month_ms":6},"stage":"warning"}"#
        );
        assert_eq!(u.kind(), "usage");
    }
}

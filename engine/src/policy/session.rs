//! Session evidence: what one realtime session or one sync file leaves behind for fair use (DESIGN §4,
//! `docs/fair-use.md` "Session evidence"). Plain data; the store keeps it per user for the 7-day window
//! ([`crate::store::fair_use::FairUseStore::record_session`]) and the classifiers read it.

use serde::{Deserialize, Serialize};

/// Where a session's audio came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionLane {
    /// A `/v4/listen` websocket session.
    Realtime,
    /// A sync file recorded within the fresh window of its arrival.
    SyncFresh,
    /// A backdated sync file (also charged to the backfill allowance).
    SyncBackfill,
}

impl SessionLane {
    /// `realtime` or `sync`.
    pub fn source(self) -> &'static str {
        match self {
            SessionLane::Realtime => "realtime",
            SessionLane::SyncFresh | SessionLane::SyncBackfill => "sync",
        }
    }
}

/// At most this many bytes of a session id are kept (a longer one is cut at a character boundary).
pub const MAX_SESSION_ID_BYTES: usize = 64;

/// One session's evidence. Times are **audio time** (epoch ms of the recording), so a backdated sync file
/// lands where its speech happened, like its metered speech.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionSummary {
    /// Realtime: `rt:` + the session's id; sync: `sync:` + the file's content hash prefix (a re-upload
    /// replaces its entry instead of adding one).
    pub id: String,
    pub lane: SessionLane,
    /// `realtime` or `sync` (from the lane; kept in the JSON the LLM classifier reads).
    pub source: String,
    pub started_at_ms: u64,
    pub ended_at_ms: u64,
    /// Audio received (decoded), ms.
    pub audio_ms: u64,
    /// Speech metered, ms.
    pub speech_ms: u64,
    /// `speech_ms / audio_ms`, 0 for no audio (3 decimals).
    pub speech_density: f64,
    /// The longest single speech run, ms.
    pub longest_speech_ms: u64,
    /// Speech runs.
    pub speech_runs: u64,
    /// When it was last written (wall ms): an open realtime session is rewritten as it goes.
    pub updated_at_ms: u64,
    /// Whether the session was still open when this was written.
    pub open: bool,
}

/// The measurements a [`SessionSummary`] is built from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SessionMeasures {
    pub started_at_ms: u64,
    pub audio_ms: u64,
    pub speech_ms: u64,
    pub longest_speech_ms: u64,
    pub speech_runs: u64,
}

impl SessionSummary {
    /// The summary of `m`, written at `now_ms`.
    pub fn new(id: &str, lane: SessionLane, m: SessionMeasures, now_ms: u64, open: bool) -> Self {
        let mut id = id.to_owned();
        if id.len() > MAX_SESSION_ID_BYTES {
            let mut cut = MAX_SESSION_ID_BYTES;
            while !id.is_char_boundary(cut) {
                cut -= 1;
            }
            id.truncate(cut);
        }
        SessionSummary {
            id,
            lane,
            source: lane.source().to_owned(),
            started_at_ms: m.started_at_ms,
            ended_at_ms: m.started_at_ms.saturating_add(m.audio_ms),
            audio_ms: m.audio_ms,
            speech_ms: m.speech_ms.min(m.audio_ms),
            speech_density: density(m.speech_ms, m.audio_ms),
            longest_speech_ms: m.longest_speech_ms.min(m.speech_ms),
            speech_runs: m.speech_runs,
            updated_at_ms: now_ms,
            open,
        }
    }
}

#[allow(clippy::cast_precision_loss)] // ms counts are far below 2^53
fn density(speech_ms: u64, audio_ms: u64) -> f64 {
    if audio_ms == 0 {
        return 0.0;
    }
    ((speech_ms.min(audio_ms) as f64 / audio_ms as f64) * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_derives_end_density_and_source_and_bounds_the_id() {
        let m = SessionMeasures {
            started_at_ms: 1_000,
            audio_ms: 3_000,
            speech_ms: 2_000,
            longest_speech_ms: 1_500,
            speech_runs: 2,
        };
        let s = SessionSummary::new(&"é".repeat(40), SessionLane::SyncBackfill, m, 9, false);
        assert_eq!(s.ended_at_ms, 4_000);
        assert_eq!(s.speech_density, 0.667);
        assert_eq!(s.source, "sync");
        assert!(s.id.len() <= MAX_SESSION_ID_BYTES && s.id.chars().all(|c| c == 'é'));
        let empty = SessionSummary::new(
            "x",
            SessionLane::Realtime,
            SessionMeasures::default(),
            0,
            true,
        );
        assert_eq!(
            (empty.speech_density, empty.source.as_str()),
            (0.0, "realtime")
        );
    }
}

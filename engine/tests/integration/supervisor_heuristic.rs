//! The heuristic classifier: deterministic, conservative (a person's volume, however high, stays under the
//! 0.7 gate), and continuous media or machine volume passes it. Sessions are joined into episodes.

use voicegate_engine::fair_use::heuristic::{CHAIN_GAP_MS, episodes};
use voicegate_engine::fair_use::{HeuristicClassifier, UsageSnapshot};
use voicegate_engine::policy::{
    RollingTotals, SessionLane, SessionMeasures, SessionSummary, UsageType,
};

const HOUR: u64 = 3_600_000;
const MIN: u64 = 60_000;
const NOW: u64 = 1_790_000_000_000;

/// A session of `audio_min` starting `ago_min` before now, with `density` speech.
fn session(
    i: usize,
    lane: SessionLane,
    ago_min: u64,
    audio_min: u64,
    density: f64,
) -> SessionSummary {
    let audio_ms = audio_min * MIN;
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let speech_ms = (audio_ms as f64 * density) as u64;
    SessionSummary::new(
        &format!("s{i}"),
        lane,
        SessionMeasures {
            started_at_ms: NOW - ago_min * MIN,
            audio_ms,
            speech_ms,
            longest_speech_ms: 20_000,
            speech_runs: audio_min,
        },
        NOW,
        false,
    )
}

fn snapshot(sessions: Vec<SessionSummary>) -> UsageSnapshot {
    let day_from = NOW - 24 * HOUR;
    let daily: u64 = sessions
        .iter()
        .filter(|s| s.started_at_ms >= day_from)
        .map(|s| s.speech_ms)
        .sum();
    let weekly: u64 = sessions.iter().map(|s| s.speech_ms).sum();
    UsageSnapshot {
        uid: "u".into(),
        now_ms: NOW,
        lookback_days: 7,
        totals: RollingTotals {
            daily_ms: daily,
            three_day_ms: weekly,
            weekly_ms: weekly,
        },
        sessions,
    }
}

#[test]
fn a_day_of_meetings_and_calls_scores_low() {
    // 6 h of meetings at density 0.6 (the top of the legitimate range), 20 min apart.
    let meetings: Vec<_> = (0..6)
        .map(|i| session(i, SessionLane::Realtime, 600 - i as u64 * 80, 60, 0.6))
        .collect();
    let v = HeuristicClassifier::score(&snapshot(meetings));
    assert!(v.misuse_score < 0.1, "{v:?}");
    assert_eq!(v.usage_type, UsageType::None);
    assert!(v.evidence.is_empty());
}

#[test]
fn a_caregivers_long_sparse_day_stays_below_the_gate() {
    let v = HeuristicClassifier::score(&snapshot(vec![session(
        0,
        SessionLane::Realtime,
        17 * 60,
        16 * 60,
        0.2,
    )]));
    assert!(v.misuse_score < 0.7, "{v:?}");
}

#[test]
fn two_hours_of_dense_speech_is_an_audiobook_with_evidence() {
    let v = HeuristicClassifier::score(&snapshot(vec![
        session(0, SessionLane::Realtime, 130, 120, 0.85),
        session(1, SessionLane::Realtime, 300, 20, 0.5),
    ]));
    assert!(v.misuse_score >= 0.7, "{v:?}");
    assert_eq!(v.usage_type, UsageType::Audiobook);
    assert_eq!(v.evidence.len(), 1);
    assert_eq!(v.evidence[0].conversation_id, "s0");
}

#[test]
fn a_recording_cut_into_back_to_back_files_is_one_episode() {
    // Ninety 2-minute files one minute apart: one episode of 3 h at density 0.85, by sync.
    let files: Vec<_> = (0..90)
        .map(|i| session(i, SessionLane::SyncFresh, 300 - i as u64 * 3, 2, 0.85))
        .collect();
    let eps = episodes(&files);
    assert_eq!(eps.len(), 1, "gaps of 1 min are within {CHAIN_GAP_MS} ms");
    assert_eq!(eps[0].sessions, 90);
    assert!(eps[0].sync);
    let v = HeuristicClassifier::score(&snapshot(files));
    assert!(v.misuse_score >= 0.7, "{v:?}");
    // The same files an hour apart are ninety short sessions: no media signal.
    let apart: Vec<_> = (0..90)
        .map(|i| session(i, SessionLane::SyncFresh, 6_000 - i as u64 * 62, 2, 0.85))
        .collect();
    assert_eq!(episodes(&apart).len(), 90);
    assert!(HeuristicClassifier::score(&snapshot(apart)).misuse_score < 0.7);
}

#[test]
fn a_tv_left_on_all_day_is_tv() {
    let v = HeuristicClassifier::score(&snapshot(vec![session(
        0,
        SessionLane::Realtime,
        21 * 60,
        20 * 60,
        0.6,
    )]));
    assert!(v.misuse_score >= 0.7, "{v:?}");
    assert_eq!(v.usage_type, UsageType::TvMovie);
}

#[test]
fn speech_most_of_the_day_is_misuse_even_without_session_history() {
    let mut s = snapshot(Vec::new());
    s.totals.daily_ms = 13 * HOUR;
    s.totals.weekly_ms = 40 * HOUR;
    let v = HeuristicClassifier::score(&s);
    assert_eq!(v.misuse_score, 1.0);
    assert_eq!(HeuristicClassifier::score(&s), v, "deterministic");
}

#[test]
fn a_persons_high_volume_without_media_stays_below_the_gate() {
    let mut s = snapshot(Vec::new());
    s.totals.daily_ms = 5 * HOUR;
    s.totals.weekly_ms = 40 * HOUR;
    assert!(HeuristicClassifier::score(&s).misuse_score < 0.7);
}

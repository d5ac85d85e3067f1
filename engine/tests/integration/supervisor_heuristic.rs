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

/// The documented thresholds (`docs/fair-use.md` §1.1), each at its edge.
#[test]
fn every_documented_threshold_holds_at_its_edge() {
    use voicegate_engine::fair_use::heuristic::{MODEL, UsageStats};
    let stats = |sessions: Vec<SessionSummary>| UsageStats::of(&snapshot(sessions));
    let rt = SessionLane::Realtime;
    assert_eq!(MODEL, "heuristic-v2");
    // Episodes: 3 min apart joins, 4 min does not (30 min sessions; the first ends 70 min ago).
    for (gap_min, n) in [(3, 1), (4, 2)] {
        let two = vec![
            session(0, rt, 100, 30, 0.3),
            session(1, rt, 70 - gap_min, 30, 0.3),
        ];
        assert_eq!(episodes(&two).len(), n, "gap {gap_min} min");
    }
    // Dense media: at least 45 min at a density of at least 0.75.
    assert_eq!(stats(vec![session(0, rt, 300, 45, 0.75)]).dense_episodes, 1);
    assert_eq!(stats(vec![session(0, rt, 300, 44, 0.9)]).dense_episodes, 0);
    assert_eq!(
        stats(vec![session(0, rt, 300, 120, 0.74)]).dense_episodes,
        0
    );
    // Its ramp, 0.5 h → 1.25 h of dense speech a day (80 min at 0.75 = 1 h: halfway is 0.875 h).
    let dense =
        |min: u64| HeuristicClassifier::score(&snapshot(vec![session(0, rt, 600, min, 0.75)]));
    assert_eq!(dense(40).misuse_score, 0.0, "0.5 h");
    assert!(
        (dense(70).misuse_score - 0.5).abs() < 1e-9,
        "0.875 h: {}",
        dense(70).misuse_score
    );
    assert_eq!(dense(100).misuse_score, 1.0, "1.25 h");
    assert_eq!(dense(100).usage_type, UsageType::Audiobook);
    // Always on: at least 7 h at a density of at least 0.45; 2 h → 3 h a day (420 min at 0.45 = 3.15 h).
    assert_eq!(
        stats(vec![session(0, rt, 23 * 60, 420, 0.45)]).long_episodes,
        1
    );
    assert_eq!(
        stats(vec![session(0, rt, 23 * 60, 419, 0.6)]).long_episodes,
        0
    );
    assert_eq!(
        stats(vec![session(0, rt, 23 * 60, 600, 0.44)]).long_episodes,
        0
    );
    let tv = HeuristicClassifier::score(&snapshot(vec![session(0, rt, 23 * 60, 420, 0.45)]));
    assert_eq!((tv.misuse_score, tv.usage_type), (1.0, UsageType::TvMovie));
    // Machine volume, 7 h → 9 h a day: the larger of the last 24 h and the 7-day total ÷ 7.
    let volume = |daily_h: u64, weekly_h: u64| {
        let mut s = snapshot(Vec::new());
        s.totals.daily_ms = daily_h * HOUR;
        s.totals.weekly_ms = weekly_h * HOUR;
        HeuristicClassifier::score(&s).misuse_score
    };
    assert_eq!(volume(7, 7), 0.0);
    assert!((volume(8, 8) - 0.5).abs() < 1e-9);
    assert_eq!(volume(9, 9), 1.0);
    assert_eq!(volume(0, 63), 1.0, "63 h in 7 days is 9 h a day");
    // Most of the audio by sync at machine volume: commercial.
    let files: Vec<_> = (0..20)
        .map(|i| session(i, SessionLane::SyncFresh, 1_400 - i as u64 * 62, 60, 0.8))
        .collect();
    let farm = HeuristicClassifier::score(&snapshot(files));
    assert_eq!(
        (farm.misuse_score, farm.usage_type),
        (1.0, UsageType::Commercial)
    );
    // Per day over the days active in the lookback: 1.5 h of dense speech that started 48 h ago and none
    // since counts 0.75 h a day (over 2 days), not 1.5 ÷ 7.
    let s = stats(vec![session(0, rt, 48 * 60, 120, 0.75)]);
    assert!((s.dense_hours_per_day - 0.75).abs() < 1e-9, "{s:?}");
}

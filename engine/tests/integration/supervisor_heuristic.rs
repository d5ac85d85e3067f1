//! The heuristic classifier: deterministic, conservative (volume alone never passes the 0.7 gate), and
//! machine-like patterns on top of high volume do.

use voicegate_engine::fair_use::{HeuristicClassifier, SessionSummary, UsageSnapshot};
use voicegate_engine::policy::{RollingTotals, UsageType};

const HOUR: u64 = 3_600_000;
const MIN: u64 = 60_000;

fn snapshot(daily_h: u64, weekly_h: u64, durations_min: &[u64]) -> UsageSnapshot {
    UsageSnapshot {
        uid: "u".into(),
        now_ms: 1_790_000_000_000,
        lookback_days: 7,
        totals: RollingTotals {
            daily_ms: daily_h * HOUR,
            three_day_ms: daily_h * HOUR,
            weekly_ms: weekly_h * HOUR,
        },
        sessions: durations_min
            .iter()
            .enumerate()
            .map(|(i, &m)| SessionSummary {
                id: format!("c{i}"),
                title: format!("session {i}"),
                overview: String::new(),
                category: "other".into(),
                source: "sync".into(),
                started_at_ms: 1_790_000_000_000 - (i as u64 + 1) * 3 * HOUR,
                duration_ms: m * MIN,
                speech_ms: m * MIN / 2,
            })
            .collect(),
    }
}

#[test]
fn personal_use_scores_low() {
    let v = HeuristicClassifier::score(&snapshot(2, 8, &[12, 35, 7, 50, 20]));
    assert!(v.misuse_score < 0.1, "{v:?}");
    assert_eq!(v.usage_type, UsageType::None);
}

#[test]
fn high_volume_without_a_machine_pattern_stays_below_the_gate() {
    let v = HeuristicClassifier::score(&snapshot(5, 40, &[10, 40, 25, 5, 70]));
    assert!(v.misuse_score < 0.7, "{v:?}");
}

#[test]
fn high_volume_with_long_sessions_is_an_audiobook_with_evidence() {
    let v = HeuristicClassifier::score(&snapshot(9, 60, &[180, 200, 150, 20]));
    assert!(v.misuse_score >= 0.7, "{v:?}");
    assert_eq!(v.usage_type, UsageType::Audiobook);
    assert_eq!(v.evidence.len(), 3);
}

#[test]
fn uniform_durations_at_high_volume_look_prerecorded() {
    let v = HeuristicClassifier::score(&snapshot(9, 60, &[45, 46, 44, 45, 45, 46]));
    assert!(v.misuse_score >= 0.7, "{v:?}");
    assert_eq!(v.usage_type, UsageType::Prerecorded);
}

#[test]
fn speech_most_of_the_day_is_misuse_even_without_session_history() {
    let v = HeuristicClassifier::score(&snapshot(13, 40, &[]));
    assert_eq!(v.misuse_score, 1.0);
    assert_eq!(
        HeuristicClassifier::score(&snapshot(13, 40, &[])),
        v,
        "deterministic"
    );
}

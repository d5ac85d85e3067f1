//! The default classifier: deterministic usage statistics, no network.
//!
//! Misuse needs **high volume and a machine-like pattern** (the reference prompt's "extremely conservative"
//! rule): volume alone scores at most 0.5, below the default 0.7 gate.
//! - volume: speech hours per day (the larger of the last 24 h and the 7-day average), 3 h → 0, 9 h → 1;
//! - pattern: the strongest of ≥ 3 sessions over 60 min (audiobook), ≥ 5 sessions with durations whose
//!   coefficient of variation is < 0.3 (prerecorded), ≥ 5 sessions of 25–90 min (podcast), and the share of
//!   the day with speech (25 % → 0, 50 % → 1);
//! - score = volume × (0.5 + 0.5 × pattern).

use futures_util::future::BoxFuture;

use crate::fair_use::classifier::{Classifier, ClassifierError, UsageSnapshot};
use crate::policy::{Evidence, UsageType, Verdict};

pub const MODEL: &str = "heuristic-v1";
const HOUR_MS: f64 = 3_600_000.0;
const LONG_SESSION_MS: u64 = 60 * 60_000;

/// The statistics the score is built from (exposed for the evidence and for tests).
#[derive(Debug, Clone, PartialEq)]
pub struct UsageStats {
    pub hours_per_day: f64,
    pub speech_share_of_day: f64,
    pub sessions_over_60_min: usize,
    pub podcast_like_sessions: usize,
    pub duration_cv: Option<f64>,
}

impl UsageStats {
    pub fn of(s: &UsageSnapshot) -> UsageStats {
        let daily_h = ms_f64(s.totals.daily_ms) / HOUR_MS;
        let weekly_avg_h = ms_f64(s.totals.weekly_ms) / HOUR_MS / 7.0;
        let durations: Vec<f64> = s.sessions.iter().map(|x| ms_f64(x.duration_ms)).collect();
        let duration_cv = (durations.len() >= 5)
            .then(|| coefficient_of_variation(&durations))
            .flatten();
        UsageStats {
            hours_per_day: daily_h.max(weekly_avg_h),
            speech_share_of_day: daily_h / 24.0,
            sessions_over_60_min: s
                .sessions
                .iter()
                .filter(|x| x.duration_ms > LONG_SESSION_MS)
                .count(),
            podcast_like_sessions: s
                .sessions
                .iter()
                .filter(|x| (25 * 60_000..=90 * 60_000).contains(&x.duration_ms))
                .count(),
            duration_cv,
        }
    }
}

/// The heuristic classifier.
#[derive(Debug, Clone, Copy, Default)]
pub struct HeuristicClassifier;

impl HeuristicClassifier {
    /// The verdict, synchronously (it is pure).
    pub fn score(snapshot: &UsageSnapshot) -> Verdict {
        let st = UsageStats::of(snapshot);
        let volume = ramp(st.hours_per_day, 3.0, 9.0);
        let long = if st.sessions_over_60_min >= 3 {
            1.0
        } else {
            0.0
        };
        let uniform = if st.duration_cv.is_some_and(|cv| cv < 0.3) {
            1.0
        } else {
            0.0
        };
        let podcast = if st.podcast_like_sessions >= 5 {
            0.8
        } else {
            0.0
        };
        let share = ramp(st.speech_share_of_day, 0.25, 0.5);
        let pattern = [long, uniform, podcast, share]
            .into_iter()
            .fold(0.0_f64, f64::max);
        let score = volume * (0.5 + 0.5 * pattern);
        let usage_type = if score < 0.7 {
            UsageType::None
        } else if long >= 1.0 {
            UsageType::Audiobook
        } else if uniform >= 1.0 {
            UsageType::Prerecorded
        } else if podcast > 0.0 {
            UsageType::Podcast
        } else {
            UsageType::Unknown
        };
        let evidence = snapshot
            .sessions
            .iter()
            .filter(|x| x.duration_ms > LONG_SESSION_MS)
            .map(|x| Evidence {
                conversation_id: x.id.clone(),
                title: x.title.clone(),
                reason: format!("session of {} min", x.duration_ms / 60_000),
            })
            .collect();
        let cv = st
            .duration_cv
            .map_or_else(|| "n/a".to_owned(), |cv| format!("{cv:.2}"));
        Verdict {
            misuse_score: score,
            usage_type,
            confidence: if snapshot.sessions.is_empty() { 0.5 } else { 0.8 },
            evidence,
            reasoning: format!(
                "{:.1} h speech/day, {:.0}% of the day, {} sessions over 60 min, {} of 25-90 min, duration CV {cv}",
                st.hours_per_day,
                st.speech_share_of_day * 100.0,
                st.sessions_over_60_min,
                st.podcast_like_sessions,
            ),
            model: MODEL.to_owned(),
        }
        .normalised()
    }
}

impl Classifier for HeuristicClassifier {
    fn classify(
        &self,
        snapshot: UsageSnapshot,
    ) -> BoxFuture<'static, Result<Verdict, ClassifierError>> {
        Box::pin(async move { Ok(HeuristicClassifier::score(&snapshot)) })
    }
}

fn ramp(x: f64, from: f64, to: f64) -> f64 {
    ((x - from) / (to - from)).clamp(0.0, 1.0)
}

#[allow(clippy::cast_precision_loss)] // ms counts are far below 2^53
fn ms_f64(ms: u64) -> f64 {
    ms as f64
}

fn coefficient_of_variation(xs: &[f64]) -> Option<f64> {
    #[allow(clippy::cast_precision_loss)] // a handful of sessions
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    if mean <= 0.0 {
        return None;
    }
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    Some(var.sqrt() / mean)
}

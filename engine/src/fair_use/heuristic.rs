//! The default classifier: deterministic statistics over the user's session evidence, no network.
//!
//! Misuse is **continuous media or machine volume**, never volume alone at a person's scale (the
//! reference prompt's "extremely conservative" rule). The sessions (realtime sessions and sync files, in
//! audio time) are first joined into **episodes**: sessions whose gap is at most [`CHAIN_GAP_MS`] are one
//! episode, so a recording cut into back-to-back files or reconnects looks like what it is. Three signals,
//! each 0–1; the score is the largest:
//! - **dense media** (audiobook, podcast, replayed recordings): speech in episodes of at least
//!   [`DENSE_MIN_AUDIO_MS`] whose speech density is at least [`DENSE_DENSITY`]; hours per day (the larger
//!   of the last 24 h and the average over the days active in the lookback), [`DENSE_RAMP_H`] → 0 to 1. People talking leave pauses:
//!   meetings, calls and a day's conversations sit well under that density.
//! - **always on** (a TV or radio left playing): speech in episodes of at least [`LONG_MIN_AUDIO_MS`] whose
//!   density is at least [`LONG_DENSITY`]; hours per day, [`LONG_RAMP_H`] → 0 to 1. A day of recording
//!   a person's life is long but sparse.
//! - **machine volume** (a transcription farm): speech hours per day from the rolling totals (the larger of
//!   the last 24 h and the 7-day average), [`VOLUME_RAMP_H`] → 0 to 1: more than a person speaks and hears
//!   in a working day.
//!
//! The thresholds are tuned on the abuse benchmark (`engine/tests/integration/fair_use_bench.rs`,
//! `docs/fair-use.md` "The abuse benchmark"): every abuser archetype passes the 0.7 gate, no legitimate
//! one does.

use futures_util::future::BoxFuture;

use crate::fair_use::classifier::{Classifier, ClassifierError, UsageSnapshot};
use crate::policy::{Evidence, SessionLane, SessionSummary, UsageType, Verdict};

pub const MODEL: &str = "heuristic-v2";
const HOUR_MS: f64 = 3_600_000.0;
const DAY_MS: u64 = 86_400_000;
const MIN_MS: u64 = 60_000;

/// Sessions at most this far apart (audio time) are one episode.
pub const CHAIN_GAP_MS: u64 = 3 * MIN_MS;
/// Dense media: an episode this long at least …
pub const DENSE_MIN_AUDIO_MS: u64 = 45 * MIN_MS;
/// … whose speech is at least this share of its audio.
pub const DENSE_DENSITY: f64 = 0.75;
/// Dense speech per day (h): signal 0 at the first, 1 at the second.
pub const DENSE_RAMP_H: (f64, f64) = (0.5, 1.25);
/// Always on: an episode this long at least …
pub const LONG_MIN_AUDIO_MS: u64 = 7 * 60 * MIN_MS;
/// … whose speech is at least this share of its audio.
pub const LONG_DENSITY: f64 = 0.45;
/// Always-on speech per day (h): signal 0 at the first, 1 at the second.
pub const LONG_RAMP_H: (f64, f64) = (2.0, 3.0);
/// Speech per day (h): signal 0 at the first, 1 at the second.
pub const VOLUME_RAMP_H: (f64, f64) = (7.0, 9.0);

/// Back-to-back sessions joined.
#[derive(Debug, Clone, PartialEq)]
pub struct Episode {
    pub started_at_ms: u64,
    pub ended_at_ms: u64,
    pub audio_ms: u64,
    pub speech_ms: u64,
    pub sessions: usize,
    /// Most of its audio came by sync.
    pub sync: bool,
    /// The id of its longest session (the evidence cited).
    pub longest_id: String,
}

impl Episode {
    pub fn density(&self) -> f64 {
        if self.audio_ms == 0 {
            0.0
        } else {
            ms_f64(self.speech_ms) / ms_f64(self.audio_ms)
        }
    }

    fn dense(&self) -> bool {
        self.audio_ms >= DENSE_MIN_AUDIO_MS && self.density() >= DENSE_DENSITY
    }

    fn long(&self) -> bool {
        self.audio_ms >= LONG_MIN_AUDIO_MS && self.density() >= LONG_DENSITY
    }

    /// Its speech inside `[from, to)` (audio time), prorated over its span.
    fn speech_within(&self, from: u64, to: u64) -> f64 {
        let span = self.ended_at_ms.saturating_sub(self.started_at_ms);
        if span == 0 {
            return if (from..to).contains(&self.started_at_ms) {
                ms_f64(self.speech_ms)
            } else {
                0.0
            };
        }
        let inside = self
            .ended_at_ms
            .min(to)
            .saturating_sub(self.started_at_ms.max(from));
        ms_f64(self.speech_ms) * ms_f64(inside) / ms_f64(span)
    }
}

/// Joins sessions (any order) into episodes, oldest first.
pub fn episodes(sessions: &[SessionSummary]) -> Vec<Episode> {
    let mut sorted: Vec<&SessionSummary> = sessions.iter().collect();
    sorted.sort_by_key(|s| (s.started_at_ms, s.ended_at_ms));
    let mut out: Vec<(Episode, u64, u64)> = Vec::new();
    for s in sorted {
        let joins = out
            .last()
            .is_some_and(|(e, _, _)| s.started_at_ms <= e.ended_at_ms.saturating_add(CHAIN_GAP_MS));
        let sync_ms = if s.lane == SessionLane::Realtime {
            0
        } else {
            s.audio_ms
        };
        match out.last_mut() {
            Some((e, longest, synced)) if joins => {
                e.ended_at_ms = e.ended_at_ms.max(s.ended_at_ms);
                e.audio_ms += s.audio_ms;
                e.speech_ms += s.speech_ms;
                e.sessions += 1;
                *synced += sync_ms;
                e.sync = *synced * 2 > e.audio_ms;
                if s.audio_ms > *longest {
                    *longest = s.audio_ms;
                    e.longest_id.clone_from(&s.id);
                }
            }
            _ => out.push((
                Episode {
                    started_at_ms: s.started_at_ms,
                    ended_at_ms: s.ended_at_ms,
                    audio_ms: s.audio_ms,
                    speech_ms: s.speech_ms,
                    sessions: 1,
                    sync: sync_ms * 2 > s.audio_ms,
                    longest_id: s.id.clone(),
                },
                s.audio_ms,
                sync_ms,
            )),
        }
    }
    out.into_iter().map(|(e, _, _)| e).collect()
}

/// The statistics the score is built from (exposed for the evidence and for tests).
#[derive(Debug, Clone, PartialEq)]
pub struct UsageStats {
    /// Rolling totals: the larger of the last 24 h and the 7-day average.
    pub speech_hours_per_day: f64,
    /// Speech of dense episodes per day (the larger of the last 24 h and the 7-day average).
    pub dense_hours_per_day: f64,
    /// Speech of long talkative episodes per day (same).
    pub long_hours_per_day: f64,
    pub episodes: usize,
    pub dense_episodes: usize,
    pub long_episodes: usize,
}

impl UsageStats {
    pub fn of(s: &UsageSnapshot) -> UsageStats {
        let eps = episodes(&s.sessions);
        let per_day = |keep: fn(&Episode) -> bool| {
            let day_from = s.now_ms.saturating_sub(DAY_MS);
            let week_from = s.now_ms.saturating_sub(7 * DAY_MS);
            let to = s.now_ms.saturating_add(1);
            let day: f64 = eps
                .iter()
                .filter(|e| keep(e))
                .map(|e| e.speech_within(day_from, to))
                .sum();
            let week: f64 = eps
                .iter()
                .filter(|e| keep(e))
                .map(|e| e.speech_within(week_from, to))
                .sum();
            // The average over the days the user was active in the lookback (at least one): a user who
            // started yesterday is not diluted over seven days.
            let first = eps
                .iter()
                .filter(|e| e.ended_at_ms >= week_from)
                .map(|e| e.started_at_ms.max(week_from))
                .min()
                .unwrap_or(s.now_ms);
            let days = (ms_f64(s.now_ms.saturating_sub(first)) / ms_f64(DAY_MS)).clamp(1.0, 7.0);
            // `+ 0.0` turns a -0.0 (no episodes) into 0.0 for display.
            day.max(week / days) / HOUR_MS + 0.0
        };
        UsageStats {
            speech_hours_per_day: (ms_f64(s.totals.daily_ms)).max(ms_f64(s.totals.weekly_ms) / 7.0)
                / HOUR_MS,
            dense_hours_per_day: per_day(Episode::dense),
            long_hours_per_day: per_day(Episode::long),
            episodes: eps.len(),
            dense_episodes: eps.iter().filter(|e| e.dense()).count(),
            long_episodes: eps.iter().filter(|e| e.long()).count(),
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
        let dense = ramp(st.dense_hours_per_day, DENSE_RAMP_H);
        let long = ramp(st.long_hours_per_day, LONG_RAMP_H);
        let volume = ramp(st.speech_hours_per_day, VOLUME_RAMP_H);
        let score = dense.max(long).max(volume);
        let eps = episodes(&snapshot.sessions);
        let mostly_sync = {
            let sync: u64 = eps.iter().filter(|e| e.sync).map(|e| e.audio_ms).sum();
            let all: u64 = eps.iter().map(|e| e.audio_ms).sum();
            all > 0 && sync * 2 > all
        };
        let usage_type = if score < 0.7 {
            UsageType::None
        } else if mostly_sync && (volume >= dense || dense < 0.7) {
            UsageType::Commercial
        } else if dense >= long && dense >= 0.7 {
            UsageType::Audiobook
        } else if long >= 0.7 {
            UsageType::TvMovie
        } else {
            UsageType::Unknown
        };
        let evidence = eps
            .iter()
            .rev()
            .filter(|e| e.dense() || e.long())
            .map(|e| Evidence {
                conversation_id: e.longest_id.clone(),
                title: format!("{} session(s)", e.sessions),
                reason: format!(
                    "{} min of audio, speech density {:.2}",
                    e.audio_ms / MIN_MS,
                    e.density()
                ),
            })
            .collect();
        Verdict {
            misuse_score: score,
            usage_type,
            confidence: if snapshot.sessions.is_empty() { 0.5 } else { 0.8 },
            evidence,
            reasoning: format!(
                "{:.1} h speech/day; dense media {:.1} h/day in {} episode(s); always-on {:.1} h/day in {} episode(s); {} episode(s) in all",
                st.speech_hours_per_day,
                st.dense_hours_per_day,
                st.dense_episodes,
                st.long_hours_per_day,
                st.long_episodes,
                st.episodes,
            ),
            model: MODEL.to_owned(),
            classifier_failed: None,
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

fn ramp(x: f64, (from, to): (f64, f64)) -> f64 {
    ((x - from) / (to - from)).clamp(0.0, 1.0)
}

#[allow(clippy::cast_precision_loss)] // ms counts are far below 2^53
fn ms_f64(ms: u64) -> f64 {
    ms as f64
}

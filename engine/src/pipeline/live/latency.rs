//! Time from a speech run's end to its final transcript (`voicegate_stt_final_latency_seconds`).
//!
//! The session notes each detector speech end (its stream time, and the wall time the session learnt it);
//! the first final result covering that end resolves it with one observation. A speech end no final ever
//! covers (its audio was not sent: the budget ran out, the provider dropped it) is let go without one,
//! when a later final starts past it or when more ends are waiting than [`MAX_PENDING`].

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// Speech ends waiting for their final, at most (a run is at least 250 ms: 32 is 8 s of speech or more,
/// longer than any provider's normal delay); past it the oldest is let go, unobserved.
pub(super) const MAX_PENDING: usize = 32;
/// How far a final may end before the speech end and still cover it (ms): the detector's end is padded,
/// and a provider's result may stop at its last word.
pub(super) const SLACK_MS: u64 = 250;

#[derive(Debug, Default)]
pub(super) struct FinalLatency {
    /// Speech ends (stream ms) and when the session learnt them, oldest first.
    pending: VecDeque<(u64, Instant)>,
}

impl FinalLatency {
    /// The detector ended a speech run at stream time `end_ms`; the session learnt it at `at`.
    pub fn speech_ended(&mut self, end_ms: u64, at: Instant) {
        if self.pending.len() >= MAX_PENDING {
            self.pending.pop_front();
        }
        self.pending.push_back((end_ms, at));
    }

    /// A final result for stream ms `[start_ms, end_ms]` reached the session at `now`: the latency of
    /// every waiting speech end it covers, in order. Ends before the result's start are let go.
    pub fn final_result(&mut self, start_ms: u64, end_ms: u64, now: Instant) -> Vec<Duration> {
        let mut observed = Vec::new();
        while let Some(&(end, at)) = self.pending.front() {
            if end > end_ms.saturating_add(SLACK_MS) {
                break;
            }
            self.pending.pop_front();
            if end.saturating_add(SLACK_MS) >= start_ms {
                observed.push(now.saturating_duration_since(at));
            }
        }
        observed
    }

    #[cfg(test)]
    fn waiting(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_final_covering_a_speech_end_observes_the_time_since_it() {
        let mut l = FinalLatency::default();
        let t0 = Instant::now();
        l.speech_ended(2_000, t0);
        // An earlier chunk of the same run ends before the speech end: no observation yet.
        assert!(
            l.final_result(0, 1_500, t0 + Duration::from_millis(400))
                .is_empty()
        );
        assert_eq!(
            l.final_result(1_500, 2_300, t0 + Duration::from_millis(900)),
            vec![Duration::from_millis(900)]
        );
        assert_eq!(l.waiting(), 0);
        // A second final of the same audio observes nothing more.
        assert!(
            l.final_result(1_500, 2_300, t0 + Duration::from_secs(1))
                .is_empty()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_final_stopping_at_its_last_word_within_the_slack_still_covers_the_end() {
        let mut l = FinalLatency::default();
        let t0 = Instant::now();
        l.speech_ended(5_000, t0);
        let got = l.final_result(3_000, 5_000 - SLACK_MS, t0 + Duration::from_millis(700));
        assert_eq!(got, vec![Duration::from_millis(700)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_speech_end_no_final_covered_is_let_go_unobserved() {
        let mut l = FinalLatency::default();
        let t0 = Instant::now();
        l.speech_ended(1_000, t0);
        l.speech_ended(9_000, t0 + Duration::from_secs(8));
        // The first run's audio was never sent; the next final starts well after its end.
        let got = l.final_result(8_000, 9_100, t0 + Duration::from_secs(9));
        assert_eq!(got, vec![Duration::from_secs(1)]);
        assert_eq!(l.waiting(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn one_final_covering_two_short_runs_observes_both() {
        let mut l = FinalLatency::default();
        let t0 = Instant::now();
        l.speech_ended(1_000, t0);
        l.speech_ended(1_800, t0 + Duration::from_millis(800));
        let got = l.final_result(0, 2_000, t0 + Duration::from_secs(2));
        assert_eq!(
            got,
            vec![Duration::from_secs(2), Duration::from_millis(1_200)]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_ends_are_bounded() {
        let mut l = FinalLatency::default();
        let t0 = Instant::now();
        for n in 0..(MAX_PENDING as u64 + 10) {
            l.speech_ended(n * 1_000, t0);
        }
        assert_eq!(l.waiting(), MAX_PENDING);
        // The oldest ten went: a final over the first seconds finds none of them.
        assert!(l.final_result(0, 9_000, t0).is_empty());
    }
}

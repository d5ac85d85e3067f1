//! Where a record's speech lands (pure).
//!
//! Speech lands in the minutes of the audio's own time. A start in the future clamps to `now`; a start
//! older than the 168 h window clamps to the window's oldest minute, so backdated audio can never escape
//! the weekly cap. A record spanning minutes is split exactly at minute boundaries; any part that would
//! run past `now` lands in `now`'s minute. The split never loses or invents a millisecond.

use super::window::{WINDOWS_MS, window_first_minute};
use crate::time::Minute;
use crate::time::{MS_PER_MINUTE, minute_of_ms, minute_start_ms};

/// The effective start of a record starting at `start_ms`, seen at `now_ms`.
pub fn clamp_start(start_ms: u64, now_ms: u64) -> u64 {
    let oldest = minute_start_ms(window_first_minute(now_ms, WINDOWS_MS[2]));
    start_ms.clamp(oldest.min(now_ms), now_ms)
}

/// Calls `put(minute, ms)` for each minute the record covers (ascending; each minute at most once); the
/// `ms` passed sum to `speech_ms`.
pub fn place_speech(start_ms: u64, speech_ms: u64, now_ms: u64, mut put: impl FnMut(Minute, u64)) {
    if speech_ms == 0 {
        return;
    }
    let now_minute = minute_of_ms(now_ms);
    let mut at = clamp_start(start_ms, now_ms);
    let mut left = speech_ms;
    loop {
        let minute = minute_of_ms(at);
        if minute >= now_minute {
            put(now_minute, left);
            return;
        }
        let in_minute = (minute_start_ms(minute) + MS_PER_MINUTE - at).min(left);
        put(minute, in_minute);
        left -= in_minute;
        if left == 0 {
            return;
        }
        at += in_minute;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::MS_PER_HOUR;

    const NOW: u64 = 1_795_737_600_000 + 12 * MS_PER_HOUR + 30_000; // 2026-11-27T12:00:30Z

    fn placed(start: u64, ms: u64, now: u64) -> Vec<(Minute, u64)> {
        let mut out = Vec::new();
        place_speech(start, ms, now, |m, v| out.push((m, v)));
        out
    }

    #[test]
    fn speech_inside_one_minute_lands_in_that_minute() {
        let start = NOW - 10 * MS_PER_MINUTE;
        assert_eq!(
            placed(start, 5_000, NOW),
            vec![(minute_of_ms(start), 5_000)]
        );
    }

    #[test]
    fn speech_spanning_minutes_splits_exactly_at_the_boundaries() {
        let start = minute_start_ms(minute_of_ms(NOW) - 5) + 50_000;
        let out = placed(start, 80_000, NOW);
        let m = minute_of_ms(start);
        assert_eq!(out, vec![(m, 10_000), (m + 1, 60_000), (m + 2, 10_000)]);
    }

    #[test]
    fn future_start_clamps_to_now() {
        assert_eq!(
            placed(NOW + 3 * MS_PER_HOUR, 1_000, NOW),
            vec![(minute_of_ms(NOW), 1_000)]
        );
    }

    #[test]
    fn speech_running_past_now_lands_in_the_current_minute() {
        let start = NOW - 40_000; // 20 s into the previous minute
        let out = placed(start, 100_000, NOW);
        assert_eq!(
            out,
            vec![(minute_of_ms(start), 10_000), (minute_of_ms(NOW), 90_000)]
        );
    }

    #[test]
    fn backdated_start_clamps_to_the_oldest_minute_of_the_week() {
        let out = placed(NOW - 30 * 24 * MS_PER_HOUR, 2_000, NOW);
        let oldest = window_first_minute(NOW, WINDOWS_MS[2]);
        assert_eq!(out, vec![(oldest, 2_000)]);
        assert!(minute_start_ms(oldest) >= NOW - WINDOWS_MS[2]);
    }

    #[test]
    fn a_huge_record_is_conserved_and_bounded_by_the_week() {
        let out = placed(0, 30 * 24 * MS_PER_HOUR, NOW);
        assert_eq!(
            out.iter().map(|&(_, ms)| ms).sum::<u64>(),
            30 * 24 * MS_PER_HOUR
        );
        assert!(out.len() <= 7 * 24 * 60 + 1);
        assert_eq!(out.last().map(|&(m, _)| m), Some(minute_of_ms(NOW)));
    }

    #[test]
    fn zero_speech_places_nothing() {
        assert!(placed(NOW, 0, NOW).is_empty());
    }
}

//! When a user's rolling totals fall back under the soft caps (pure, no clock reads).
//!
//! With no new speech, every rolling total only shrinks as time passes: a bucket leaves a window at the
//! first millisecond its start is before `now - window` (`minute_start + window + 1`, the window's edge
//! rule in [`super::window`]), oldest first. So a window that is over its cap now falls back under it when
//! enough of its oldest buckets have left to bring the total to the cap (a cap triggers only when strictly
//! greater), and a window that is not over its cap now never goes over without new speech. The moment no
//! cap is exceeded is the latest of the triggered windows' moments.
//!
//! This is what bounds a `fair_use_restricted` refusal's `Retry-After` besides the restriction's end
//! (DESIGN §3 "Errors"). It walks the buckets (at most the 8 days the meter keeps, sparse), so callers
//! compute it only when a cap is exceeded.

use super::window::{WINDOWS_MS, window_first_minute};
use crate::policy::SoftCaps;
use crate::time::{Minute, minute_start_ms};

/// The earliest instant (Unix ms) at which, with no new speech, no cap in `caps` is exceeded by the
/// rolling totals of `buckets`, or `None` when none is exceeded at `now_ms`.
///
/// `buckets` are `(minute, speech ms)` in ascending minute order, as [`super::MinuteWindow::buckets`]
/// yields them; buckets older than a window simply do not count in it. The answer is always after `now_ms`.
pub fn under_caps_at(buckets: &[(Minute, u64)], caps: &SoftCaps, now_ms: u64) -> Option<u64> {
    let limits = [caps.daily_ms, caps.three_day_ms, caps.weekly_ms];
    WINDOWS_MS
        .iter()
        .zip(limits)
        .filter_map(|(&window_ms, cap_ms)| window_under_cap_at(buckets, window_ms, cap_ms, now_ms))
        .max()
}

/// One window: `None` when its total at `now_ms` is not over `cap_ms`, else the instant the bucket that
/// brings it down to `cap_ms` leaves the window.
fn window_under_cap_at(
    buckets: &[(Minute, u64)],
    window_ms: u64,
    cap_ms: u64,
    now_ms: u64,
) -> Option<u64> {
    let first = window_first_minute(now_ms, window_ms);
    let start = buckets.partition_point(|&(minute, _)| minute < first);
    let in_window = &buckets[start..];
    let total: u64 = in_window.iter().map(|&(_, ms)| ms).sum();
    let mut excess = total.checked_sub(cap_ms).filter(|&e| e > 0)?;
    for &(minute, ms) in in_window {
        if ms >= excess {
            return Some(minute_start_ms(minute) + window_ms + 1);
        }
        excess -= ms;
    }
    // Unreachable: the buckets in the window sum to more than the excess.
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::{MS_PER_HOUR, MS_PER_MINUTE, minute_of_ms};

    /// 2026-11-27T12:00:17Z: not on a minute boundary, so the window edges are not either.
    const NOW: u64 = 1_795_737_600_000 + 12 * MS_PER_HOUR + 17_000;
    const DAY: u64 = 24 * MS_PER_HOUR;

    fn caps(daily_ms: u64, three_day_ms: u64, weekly_ms: u64) -> SoftCaps {
        SoftCaps {
            daily_ms,
            three_day_ms,
            weekly_ms,
        }
    }

    /// Buckets `ago_ms` before NOW (ascending minute order, as the meter keeps them).
    fn ago(entries: &[(u64, u64)]) -> Vec<(Minute, u64)> {
        let mut out: Vec<(Minute, u64)> = entries
            .iter()
            .map(|&(ago_ms, ms)| (minute_of_ms(NOW - ago_ms), ms))
            .collect();
        out.sort_unstable();
        out
    }

    fn leaves(minute: Minute, window_ms: u64) -> u64 {
        minute_start_ms(minute) + window_ms + 1
    }

    /// The totals the meter's window computes at `at`, checked against the caps the same way the
    /// resolver does: an independent oracle for "no cap is exceeded at `at`".
    fn over_at(buckets: &[(Minute, u64)], caps: &SoftCaps, at: u64) -> bool {
        let mut w = crate::meter::MinuteWindow::new();
        for &(minute, ms) in buckets {
            w.add(minute, ms).unwrap();
        }
        !caps.triggered(&w.totals(at)).is_empty()
    }

    #[test]
    fn nothing_over_a_cap_gives_none_and_exactly_at_the_cap_is_not_over() {
        let b = ago(&[(2 * MS_PER_HOUR, 600), (MS_PER_HOUR, 400)]);
        assert_eq!(under_caps_at(&b, &caps(1_000, 1_000, 1_000), NOW), None);
        assert_eq!(under_caps_at(&[], &caps(0, 0, 0), NOW), None);
        assert!(under_caps_at(&b, &caps(999, 10_000, 10_000), NOW).is_some());
    }

    #[test]
    fn one_triggered_window_falls_under_when_its_excess_has_left_it() {
        // 1 500 ms against a 1 000 ms daily cap: the oldest bucket (600) leaves first and is enough.
        let b = ago(&[
            (3 * MS_PER_HOUR, 600),
            (2 * MS_PER_HOUR, 500),
            (MS_PER_HOUR, 400),
        ]);
        let at = under_caps_at(&b, &caps(1_000, 10_000, 10_000), NOW).unwrap();
        assert_eq!(at, leaves(b[0].0, DAY));
        assert!(over_at(&b, &caps(1_000, 10_000, 10_000), at - 1));
        assert!(!over_at(&b, &caps(1_000, 10_000, 10_000), at));
        // A cap of 499: the two oldest must leave; the answer is when the second one does.
        let at = under_caps_at(&b, &caps(499, 10_000, 10_000), NOW).unwrap();
        assert_eq!(at, leaves(b[1].0, DAY));
        // Left at exactly the cap (1 500 - 600 - 500 = 400 <= 400) counts as under.
        let at = under_caps_at(&b, &caps(400, 10_000, 10_000), NOW).unwrap();
        assert_eq!(at, leaves(b[1].0, DAY));
        assert!(over_at(&b, &caps(400, 10_000, 10_000), at - 1));
        assert!(!over_at(&b, &caps(400, 10_000, 10_000), at));
    }

    #[test]
    fn buckets_already_out_of_a_window_do_not_count_in_it() {
        // A bucket 30 h ago counts in the 3-day window only: the daily total (400) is under its cap.
        let b = ago(&[(30 * MS_PER_HOUR, 5_000), (MS_PER_HOUR, 400)]);
        let at = under_caps_at(&b, &caps(1_000, 2_000, 10_000), NOW).unwrap();
        assert_eq!(at, leaves(b[0].0, 3 * DAY));
    }

    #[test]
    fn several_triggered_windows_take_the_latest_of_their_moments() {
        // Daily: 1 200 ms in the last day (cap 1 000); 3-day: 2 700 (cap 2 000); weekly: 3 000 (cap
        // 2 500). Each window falls under when a different bucket leaves it.
        let b = ago(&[
            (100 * MS_PER_HOUR, 300),
            (50 * MS_PER_HOUR, 1_500),
            (5 * MS_PER_HOUR, 700),
            (MS_PER_HOUR, 500),
        ]);
        let daily = leaves(b[2].0, DAY); // the 700 leaves: 500 left
        let three_day = leaves(b[1].0, 3 * DAY); // the 1 500 leaves: 1 200 left
        let weekly = leaves(b[1].0, 7 * DAY); // the 300, then the 1 500 leave: 1 200 left
        let huge = 1_000_000;
        assert_eq!(
            under_caps_at(&b, &caps(1_000, huge, huge), NOW),
            Some(daily)
        );
        assert_eq!(
            under_caps_at(&b, &caps(huge, 2_000, huge), NOW),
            Some(three_day)
        );
        assert_eq!(
            under_caps_at(&b, &caps(huge, huge, 2_500), NOW),
            Some(weekly)
        );
        let c = caps(1_000, 2_000, 2_500);
        let at = under_caps_at(&b, &c, NOW).unwrap();
        assert_eq!(at, weekly);
        assert!(daily < three_day && three_day < weekly);
        assert!(over_at(&b, &c, at - 1));
        assert!(!over_at(&b, &c, at));
    }

    #[test]
    fn the_latest_moment_can_be_a_shorter_windows() {
        // The weekly and 3-day excesses sit in old buckets that leave soon (in 8 h and 2 h); the daily
        // excess is an hour old and stays 23 h: the daily window decides.
        let b = ago(&[
            (160 * MS_PER_HOUR, 1_000),
            (70 * MS_PER_HOUR, 1_000),
            (MS_PER_HOUR, 2_000),
        ]);
        let c = caps(1_500, 2_500, 3_500);
        let daily = leaves(b[2].0, DAY);
        assert!(leaves(b[0].0, 7 * DAY) < daily && leaves(b[1].0, 3 * DAY) < daily);
        assert_eq!(under_caps_at(&b, &c, NOW), Some(daily));
        assert!(over_at(&b, &c, daily - 1));
        assert!(!over_at(&b, &c, daily));
    }

    #[test]
    fn the_answer_is_after_now_even_for_a_bucket_on_the_window_edge() {
        // The oldest minute still in the daily window starts at or after NOW - 24 h; it counts until
        // (and including) its start + 24 h, so it leaves strictly after NOW.
        let first = window_first_minute(NOW, DAY);
        let b = vec![(first, 2_000), (minute_of_ms(NOW), 10)];
        let at = under_caps_at(&b, &caps(1_000, 1_000_000, 1_000_000), NOW).unwrap();
        assert!(at > NOW);
        assert_eq!(at, leaves(first, DAY));
        assert!(at - NOW <= MS_PER_MINUTE + 1);
    }

    #[test]
    fn agrees_with_the_window_on_a_dense_week() {
        // One bucket every 7 minutes over 8 days, 1..=9 s each: the answer is the first instant the
        // meter's own window (an independent computation) shows every total at or under its cap.
        let b: Vec<(Minute, u64)> = (0..(8 * 24 * 60 / 7))
            .map(|i: u64| {
                (
                    minute_of_ms(NOW - 8 * DAY) + (i * 7) as Minute,
                    1_000 + (i % 9) * 1_000,
                )
            })
            .collect();
        // About 1.0 M ms in a day, 3.1 M in 3 days, 7.2 M in a week: the daily cap alone, then all three.
        for c in [
            caps(500_000, 9_000_000, 12_000_000),
            caps(60_000, 2_000_000, 5_000_000),
        ] {
            let Some(at) = under_caps_at(&b, &c, NOW) else {
                panic!("over a cap: {c:?}");
            };
            assert!(over_at(&b, &c, at - 1), "{c:?}");
            assert!(!over_at(&b, &c, at), "{c:?}");
        }
    }
}

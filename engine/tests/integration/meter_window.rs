//! The pure rolling window: table tests (omi-behaviour §7 C39, G65) and its memory cost.

use voicegate_engine::meter::window::{MinuteWindow, WINDOWS_MS, window_first_minute};
use voicegate_engine::time::{MS_PER_DAY, MS_PER_HOUR, MS_PER_MINUTE, minute_of_ms};

const NOW: u64 = 1_795_737_600_000 + 12 * MS_PER_HOUR + 17_000;

fn window_with(entries: &[(u64, u64)]) -> MinuteWindow {
    let mut w = MinuteWindow::new();
    for &(ago_ms, ms) in entries {
        w.add(minute_of_ms(NOW - ago_ms), ms).unwrap();
    }
    w
}

fn totals(w: &mut MinuteWindow, now: u64) -> (u64, u64, u64) {
    let t = w.totals(now);
    (t.daily_ms, t.three_day_ms, t.weekly_ms)
}

#[test]
fn c39_no_buckets_gives_zeros() {
    assert_eq!(totals(&mut MinuteWindow::new(), NOW), (0, 0, 0));
}

#[test]
fn c39_buckets_at_1h_2d_5d_sum_per_window() {
    let mut w = window_with(&[
        (MS_PER_HOUR, 1_000),
        (2 * MS_PER_DAY, 2_000),
        (5 * MS_PER_DAY, 3_000),
    ]);
    assert_eq!(totals(&mut w, NOW), (1_000, 3_000, 6_000));
}

#[test]
fn g65_records_accumulate_in_every_window() {
    let mut w = window_with(&[(0, 5_000)]);
    assert_eq!(totals(&mut w, NOW), (5_000, 5_000, 5_000));
    let mut w = window_with(&[(0, 3_000), (0, 4_000)]);
    assert_eq!(totals(&mut w, NOW), (7_000, 7_000, 7_000));
}

#[test]
fn a_bucket_counts_while_its_start_is_at_or_after_now_minus_the_window() {
    // Edge rule table: (bucket start relative to the day edge, counted in the daily window?)
    let now = 1_795_737_600_000 + 12 * MS_PER_HOUR; // on a minute boundary
    for (start_after_edge_ms, counted) in [(0i64, true), (60_000, true), (-60_000, false)] {
        let start = (now - WINDOWS_MS[0]) as i64 + start_after_edge_ms;
        let mut w = MinuteWindow::new();
        w.add(minute_of_ms(start as u64), 100).unwrap();
        assert_eq!(
            w.totals(now).daily_ms == 100,
            counted,
            "start {start_after_edge_ms:+} ms from the edge"
        );
    }
    // One ms past a minute boundary, the bucket that started exactly at the edge has left the window.
    let edge_minute = window_first_minute(now, WINDOWS_MS[0]);
    assert_eq!(window_first_minute(now + 1, WINDOWS_MS[0]), edge_minute + 1);
}

#[test]
fn moving_now_forward_drops_buckets_as_they_leave_each_window() {
    let mut w = window_with(&[
        (10 * MS_PER_MINUTE, 1_000),
        (25 * MS_PER_HOUR, 2_000),
        (4 * MS_PER_DAY, 4_000),
    ]);
    assert_eq!(totals(&mut w, NOW), (1_000, 3_000, 7_000));
    assert_eq!(totals(&mut w, NOW + 2 * MS_PER_DAY), (0, 1_000, 7_000));
    assert_eq!(
        totals(&mut w, NOW + 3 * MS_PER_DAY + MS_PER_HOUR),
        (0, 0, 3_000)
    );
    assert_eq!(totals(&mut w, NOW + 7 * MS_PER_DAY), (0, 0, 0));
    // Backwards (tests only) recomputes.
    assert_eq!(totals(&mut w, NOW), (1_000, 3_000, 7_000));
}

#[test]
fn adding_and_removing_out_of_order_keeps_totals_exact() {
    let mut w = MinuteWindow::new();
    let base = minute_of_ms(NOW);
    for (i, m) in [50u32, 10, 3000, 0, 7000, 10].iter().enumerate() {
        w.add(base - m, 100 * (i as u64 + 1)).unwrap();
    }
    let full: u64 = w.buckets().map(|b| b.1).sum();
    assert_eq!(full, 2_100);
    assert_eq!(w.sub(base - 10, 200), 200);
    assert_eq!(w.sub(base - 10, 10_000), 600, "never below zero");
    assert_eq!(w.get(base - 10), 0);
    assert_eq!(w.totals(NOW).weekly_ms, 1_300);
    w.prune_before(base - 3000);
    assert_eq!(w.buckets().map(|b| b.1).sum::<u64>(), 100 + 300 + 400);
}

#[test]
fn a_huge_bucket_accumulates_exactly_until_it_saturates() {
    let mut w = MinuteWindow::new();
    let m = minute_of_ms(NOW);
    assert_eq!(w.add(m, 999_999_999).unwrap(), 0);
    assert_eq!(w.add(m, 999_999_999).unwrap(), 0);
    assert_eq!(w.get(m), 1_999_999_998);
    let overflow = w.add(m, u64::from(u32::MAX)).unwrap();
    assert_eq!(w.get(m) + overflow, 1_999_999_998 + u64::from(u32::MAX));
}

/// Issue acceptance: a live actor holding a day of minute buckets costs ≤ 16 KiB. The window is the
/// part that grows with buckets; the rest of the actor is measured in `meter_memory`.
#[test]
fn a_day_of_minute_buckets_takes_under_10_kib() {
    let mut w = MinuteWindow::new();
    let first = minute_of_ms(NOW) - 1439;
    for m in first..first + 1440 {
        w.add(m, 1_000).unwrap();
    }
    assert_eq!(w.len(), 1440);
    let bytes = w.heap_bytes() + size_of::<MinuteWindow>();
    println!("a day of minute buckets: {bytes} bytes");
    assert!(bytes <= 10 * 1024, "{bytes}");
}

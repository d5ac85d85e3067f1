//! The node's tick lag as admission control reads it.
//!
//! Every listen session reports the worst lateness of each of its session-seconds (the observation behind
//! `voicegate_listen_tick_lag_seconds`); [`TickLagWindow`] keeps, per second of the last [`MAX_WINDOW_S`],
//! how many session-seconds were reported and how many of them ran a tick later than the objective. The
//! server reads the share of late session-seconds over its window once a second and stops admitting new
//! sessions while it is above its limit (`server/src/admission.rs`).
//!
//! One short mutex per report (once per session per second, ~1,200 a second at the measured capacity):
//! a few tens of ns uncontended, far below the tick's own work.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The longest window [`TickLagWindow::read`] covers, in seconds.
pub const MAX_WINDOW_S: u64 = 60;
const SLOTS: usize = MAX_WINDOW_S as usize + 1;

/// Session-seconds reported over a window, and how many of them were late.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LagReading {
    pub session_seconds: u64,
    pub late: u64,
}

impl LagReading {
    /// The late share, 0 when nothing was reported.
    pub fn late_ratio(&self) -> f64 {
        if self.session_seconds == 0 {
            0.0
        } else {
            self.late as f64 / self.session_seconds as f64
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    /// The second (since the window's start) this slot counts; an older one is stale.
    second: u64,
    total: u32,
    late: u32,
}

/// Per-second counts of session-seconds and of late ones, for the last [`MAX_WINDOW_S`] seconds.
#[derive(Debug)]
pub struct TickLagWindow {
    objective: Duration,
    start: Instant,
    slots: Mutex<[Slot; SLOTS]>,
}

impl TickLagWindow {
    /// A session-second is late when its worst tick ran more than `objective` after its scheduled instant.
    pub fn new(objective: Duration) -> Self {
        TickLagWindow {
            objective,
            start: Instant::now(),
            slots: Mutex::new([Slot::default(); SLOTS]),
        }
    }

    /// The lateness above which a session-second counts as late.
    pub fn objective(&self) -> Duration {
        self.objective
    }

    /// One session-second whose worst tick ran `lag` late.
    pub fn record(&self, lag: Duration) {
        self.record_at(Instant::now(), lag);
    }

    /// The session-seconds reported in the last `window_s` seconds (the current one included), at most
    /// [`MAX_WINDOW_S`].
    pub fn read(&self, window_s: u64) -> LagReading {
        self.read_at(Instant::now(), window_s)
    }

    fn second(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.start).as_secs()
    }

    fn record_at(&self, at: Instant, lag: Duration) {
        let second = self.second(at);
        let mut slots = self
            .slots
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let slot = &mut slots[(second % SLOTS as u64) as usize];
        if slot.second != second {
            *slot = Slot {
                second,
                total: 0,
                late: 0,
            };
        }
        slot.total = slot.total.saturating_add(1);
        if lag > self.objective {
            slot.late = slot.late.saturating_add(1);
        }
    }

    fn read_at(&self, at: Instant, window_s: u64) -> LagReading {
        let now = self.second(at);
        let oldest = now.saturating_sub(window_s.clamp(1, MAX_WINDOW_S) - 1);
        let slots = self
            .slots
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        slots
            .iter()
            .filter(|s| s.total > 0 && (oldest..=now).contains(&s.second))
            .fold(LagReading::default(), |acc, s| LagReading {
                session_seconds: acc.session_seconds + u64::from(s.total),
                late: acc.late + u64::from(s.late),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn counts_late_session_seconds_over_the_window_only() {
        let w = TickLagWindow::new(250 * MS);
        let t0 = w.start;
        let at = |s: u64| t0 + Duration::from_secs(s) + 100 * MS;
        // Second 0: 3 on time, 1 late; second 5: 2 late; second 9: 1 on time (exactly the objective is on time).
        for lag in [10, 20, 30, 400] {
            w.record_at(at(0), lag * MS);
        }
        w.record_at(at(5), 300 * MS);
        w.record_at(at(5), 2_000 * MS);
        w.record_at(at(9), 250 * MS);
        let r = w.read_at(at(9), 10);
        assert_eq!((r.session_seconds, r.late), (7, 3));
        assert!((r.late_ratio() - 3.0 / 7.0).abs() < 1e-12);
        // A 5-second window at second 9 covers seconds 5..=9.
        assert_eq!(
            w.read_at(at(9), 5),
            LagReading {
                session_seconds: 3,
                late: 2
            }
        );
        // Long after, nothing is left in the window.
        assert_eq!(w.read_at(at(200), 10), LagReading::default());
        assert_eq!(LagReading::default().late_ratio(), 0.0);
    }

    #[test]
    fn a_slot_reused_a_lap_later_forgets_its_old_counts() {
        let w = TickLagWindow::new(250 * MS);
        let t0 = w.start;
        w.record_at(t0, Duration::from_secs(1));
        let lap = t0 + Duration::from_secs(SLOTS as u64);
        w.record_at(lap, MS);
        assert_eq!(
            w.read_at(lap, MAX_WINDOW_S),
            LagReading {
                session_seconds: 1,
                late: 0
            }
        );
    }
}

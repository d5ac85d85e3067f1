//! The realtime intake limit of one session: a token bucket of audio time.
//!
//! A session takes in at most `max_pace` seconds of audio per second of wall time, sustained, plus a
//! burst (a reconnect's backlog) of up to `burst`. The bucket starts full, refills at the pace on every
//! tick and never holds more than the burst. While it is empty the driver leaves frames in the frame
//! queue; once the queue is full the transport stops reading the socket and TCP slows the client. Nothing
//! is dropped and nothing is metered faster than the pace: the pipeline (decode, VAD, meter) only ever
//! sees audio the bucket let through.
//!
//! O(1) per frame and per tick, no allocation: credit is an integer in units where one decoded sample is
//! [`UNITS_PER_SAMPLE`] and one µs of wall time refills `codec rate × pace`.

use std::time::Duration;

use tokio::time::Instant;

/// One decoded sample, in credit units (1 µs of audio at rate `r` is `r` units).
const UNITS_PER_SAMPLE: u64 = 1_000_000;
/// The smallest burst (a smaller setting counts as this).
const MIN_BURST_US: u64 = 1_000_000;
/// Longest gap between refills counted (a stalled thread does not mint more than a burst anyway).
const MAX_REFILL_GAP_US: u64 = 3_600_000_000;

/// The limit: `max_pace_milli` = the multiple of real time × 1000 (0 = no limit), `burst` = audio taken
/// in at once above it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PaceConfig {
    pub max_pace_milli: u64,
    pub burst: Duration,
}

impl PaceConfig {
    /// No limit (the pipeline takes whatever arrives, as fast as it can).
    pub const UNLIMITED: PaceConfig = PaceConfig {
        max_pace_milli: 0,
        burst: Duration::ZERO,
    };

    /// `multiple` × real time sustained (e.g. 4.0), `burst` above it. A multiple that is not a positive
    /// finite number means no limit.
    pub fn new(multiple: f64, burst: Duration) -> Self {
        if !(multiple.is_finite() && multiple > 0.0) {
            return Self::UNLIMITED;
        }
        PaceConfig {
            // Rounded once, at the edge: the bucket's arithmetic is integer.
            max_pace_milli: (multiple * 1000.0).round().max(1.0) as u64,
            burst,
        }
    }
}

impl Default for PaceConfig {
    /// `VOICEGATE_LISTEN_MAX_PACE` and `VOICEGATE_LISTEN_BURST_MS`'s defaults: 4x, 30 s.
    fn default() -> Self {
        PaceConfig::new(4.0, Duration::from_secs(30))
    }
}

/// One session's bucket.
#[derive(Debug)]
pub struct Pace {
    /// Units refilled per µs of wall time (`rate × pace`); 0 = no limit.
    refill_per_us: u64,
    capacity: i64,
    credit: i64,
    last: Instant,
    /// Frames are being held back (counted once per episode).
    holding: bool,
}

impl Pace {
    /// A full bucket at `now` for audio decoded at `rate` Hz.
    pub fn new(cfg: PaceConfig, rate: u32, now: Instant) -> Self {
        let refill_per_us = u64::from(rate).saturating_mul(cfg.max_pace_milli) / 1000;
        // At least a second: a tick's refill must fit, or nothing would ever pass.
        let burst_us = u64::try_from(cfg.burst.as_micros())
            .unwrap_or(u64::MAX)
            .max(MIN_BURST_US);
        let capacity = i64::try_from(burst_us.saturating_mul(u64::from(rate))).unwrap_or(i64::MAX);
        Pace {
            refill_per_us,
            capacity,
            credit: capacity,
            last: now,
            holding: false,
        }
    }

    /// Adds the credit of the wall time since the last refill (the tick's scheduled instant).
    pub fn refill(&mut self, now: Instant) {
        if self.refill_per_us == 0 {
            return;
        }
        let gap = now.saturating_duration_since(self.last);
        self.last = now;
        let gap_us = u64::try_from(gap.as_micros())
            .unwrap_or(u64::MAX)
            .min(MAX_REFILL_GAP_US);
        let add = i64::try_from(gap_us.saturating_mul(self.refill_per_us)).unwrap_or(i64::MAX);
        self.credit = self.credit.saturating_add(add).min(self.capacity);
    }

    /// Whether the pipeline may take another frame now.
    pub fn open(&self) -> bool {
        self.refill_per_us == 0 || self.credit > 0
    }

    /// Charges `samples` decoded (one frame may overdraw: the next ticks pay it back).
    pub fn take(&mut self, samples: u64) {
        if self.refill_per_us == 0 {
            return;
        }
        let cost = i64::try_from(samples.saturating_mul(UNITS_PER_SAMPLE)).unwrap_or(i64::MAX);
        self.credit = self.credit.saturating_sub(cost);
    }

    /// Notes whether frames wait for credit after this tick; true when a new holding episode starts.
    pub fn note_waiting(&mut self, waiting: bool) -> bool {
        let started = waiting && !self.holding;
        self.holding = waiting;
        started
    }

    /// Lifts the limit (the session's end processes everything already received).
    pub fn lift(&mut self) {
        self.refill_per_us = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RATE: u32 = 16_000;
    /// One 10 ms Opus packet at 16 kHz.
    const PACKET: u64 = 160;

    /// Packets a paced consumer takes over `ticks` ticks of 50 ms when `offered` wait at every tick.
    fn taken(cfg: PaceConfig, ticks: u32) -> u64 {
        let t0 = Instant::now();
        let mut pace = Pace::new(cfg, RATE, t0);
        let mut n = 0;
        for i in 1..=ticks {
            pace.refill(t0 + Duration::from_millis(50) * i);
            while pace.open() {
                pace.take(PACKET);
                n += 1;
            }
        }
        n
    }

    #[test]
    fn sustained_intake_is_the_pace_after_the_burst() {
        let cfg = PaceConfig::new(4.0, Duration::from_secs(2));
        // 10 s of wall time: the 2 s burst at once (the first tick finds the bucket full), then 4 × 50 ms
        // on each of the 199 other ticks.
        let n = taken(cfg, 200);
        assert_eq!(n, 200 + 199 * 20);
    }

    #[test]
    fn a_fractional_multiple_is_kept() {
        // The burst is at least a second (100 packets); then 7.5 packets a tick, one overdrawn now and then.
        let cfg = PaceConfig::new(1.5, Duration::ZERO);
        let n = taken(cfg, 200);
        assert!((1_592..=1_593).contains(&n), "{n} packets");
    }

    #[test]
    fn a_quiet_session_refills_to_the_burst_and_no_further() {
        let cfg = PaceConfig::new(4.0, Duration::from_secs(1));
        let t0 = Instant::now();
        let mut pace = Pace::new(cfg, RATE, t0);
        pace.refill(t0 + Duration::from_secs(3600));
        let mut n = 0;
        while pace.open() {
            pace.take(PACKET);
            n += 1;
        }
        assert_eq!(n, 100, "one second of 10 ms packets");
    }

    #[test]
    fn unlimited_and_lifted_never_close() {
        let t0 = Instant::now();
        let mut pace = Pace::new(PaceConfig::UNLIMITED, RATE, t0);
        pace.take(u64::MAX);
        assert!(pace.open());
        let mut pace = Pace::new(PaceConfig::new(4.0, Duration::ZERO), RATE, t0);
        pace.take(RATE.into());
        assert!(!pace.open(), "a second taken empties the smallest bucket");
        pace.lift();
        assert!(pace.open());
        assert_eq!(
            PaceConfig::new(f64::NAN, Duration::ZERO),
            PaceConfig::UNLIMITED
        );
    }

    #[test]
    fn a_holding_episode_is_counted_once() {
        let mut pace = Pace::new(PaceConfig::default(), RATE, Instant::now());
        assert!(pace.note_waiting(true));
        assert!(!pace.note_waiting(true));
        assert!(!pace.note_waiting(false));
        assert!(pace.note_waiting(true));
    }
}

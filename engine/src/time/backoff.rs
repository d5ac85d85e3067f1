//! [`Backoff`]: the one retry delay of the engine and the server (exponential, capped, jittered).
//!
//! Every retry loop (meter flushes and hydration, classifier runs, conversation compare-and-set, a live
//! session's final record and conversation writes, the meter's drain, the listen front door's peek) takes
//! its delays from here, so that many actors or sessions failing together (a Redis restart) do not retry
//! in lock-step.
//!
//! **Full jitter above a floor**: retry `n` (1, 2, …) waits a delay drawn uniformly from
//! `[base, min(max, base × 2ⁿ)]`. Every delay is at least `base` (no hot retry loop) and at most `max`; the
//! ceiling doubles per attempt, so the delay grows exponentially until the cap, where it averages
//! `(base + max) / 2`; [`Backoff::reset`] starts over after a success. (AWS Architecture Blog, "Exponential
//! Backoff And Jitter": full jitter spreads simultaneous failures best; the floor keeps the first retries
//! from landing at once.)
//!
//! Hand-written rather than a crate: `backon` and `backoff` drive the retry loop themselves (an async
//! `retry()` around a future, or an iterator consumed by their own sleep), while our retries are
//! re-scheduled by actix actors (`run_later`), by a sans-IO state machine that only receives ticks, and by
//! plain loops; all they need is "how long until the next attempt", carried in the retrying state. That is
//! the few lines below, with `rand` (already a dependency) as the randomness.

use std::time::Duration;

use rand::RngExt as _;

/// Exponential backoff with full jitter: retry `n` waits a uniform delay in `[base, min(max, base × 2ⁿ)]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempts: u32,
}

impl Backoff {
    /// Delays start at `base` and never exceed `max` (raised to `base` if lower).
    pub const fn new(base: Duration, max: Duration) -> Self {
        let max = if max.as_nanos() < base.as_nanos() {
            base
        } else {
            max
        };
        Backoff {
            base,
            max,
            attempts: 0,
        }
    }

    /// The smallest delay.
    pub fn base(&self) -> Duration {
        self.base
    }

    /// The largest delay.
    pub fn max(&self) -> Duration {
        self.max
    }

    /// Delays handed out since the start or the last [`Self::reset`] (the retry number of the last one).
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// The largest delay retry `attempt` (1, 2, …) can draw: `min(max, base × 2^attempt)`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.max)
    }

    /// The delay before the next attempt, drawn from the thread's random generator.
    pub fn next_delay(&mut self) -> Duration {
        self.next_delay_with(&mut rand::rng())
    }

    /// The delay before the next attempt, drawn from `rng` (tests pass a seeded one).
    pub fn next_delay_with<R: rand::Rng + ?Sized>(&mut self, rng: &mut R) -> Duration {
        self.attempts = self.attempts.saturating_add(1);
        let (lo, hi) = (nanos(self.base), nanos(self.ceiling(self.attempts)));
        Duration::from_nanos(if hi > lo {
            rng.random_range(lo..=hi)
        } else {
            lo
        })
    }

    /// Starts over (after a success): the next delay is drawn from `[base, 2 × base]` again.
    pub fn reset(&mut self) {
        self.attempts = 0;
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng as _;
    use rand::rngs::StdRng;

    const MS: Duration = Duration::from_millis(1);

    fn run(b: &mut Backoff, rng: &mut StdRng, n: usize) -> Vec<Duration> {
        (0..n).map(|_| b.next_delay_with(rng)).collect()
    }

    #[test]
    fn every_delay_lies_between_the_base_and_its_attempts_ceiling() {
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..200 {
            let mut b = Backoff::new(10 * MS, 2_000 * MS);
            for (i, d) in run(&mut b, &mut rng, 40).into_iter().enumerate() {
                let ceiling = (10 * MS * (1 << (i + 1).min(20))).min(2_000 * MS);
                assert!(d >= 10 * MS && d <= ceiling, "retry {}: {d:?}", i + 1);
            }
            assert_eq!(b.attempts(), 40);
        }
    }

    #[test]
    fn the_ceiling_doubles_per_attempt_up_to_the_cap() {
        let b = Backoff::new(10 * MS, 1_000 * MS);
        let ceilings: Vec<u128> = (1..=9).map(|n| b.ceiling(n).as_millis()).collect();
        assert_eq!(ceilings, [20, 40, 80, 160, 320, 640, 1_000, 1_000, 1_000]);
        assert_eq!(b.ceiling(u32::MAX), 1_000 * MS, "no overflow");
        // The drawn delays follow: their mean is (base + ceiling) / 2 per attempt.
        let mut rng = StdRng::seed_from_u64(11);
        let runs = 2_000;
        let mut mean = [0f64; 12];
        for _ in 0..runs {
            let mut b = Backoff::new(10 * MS, 1_000 * MS);
            for (i, d) in run(&mut b, &mut rng, 12).into_iter().enumerate() {
                mean[i] += d.as_secs_f64() * 1000.0 / f64::from(runs);
            }
        }
        for (i, m) in mean.iter().enumerate() {
            let expected = (10.0 + b.ceiling(i as u32 + 1).as_secs_f64() * 1000.0) / 2.0;
            assert!(
                (m / expected - 1.0).abs() < 0.05,
                "retry {}: {m} vs {expected}",
                i + 1
            );
        }
    }

    #[test]
    fn the_cap_holds_and_a_reset_starts_over() {
        let mut rng = StdRng::seed_from_u64(3);
        let mut b = Backoff::new(100 * MS, 250 * MS);
        let delays = run(&mut b, &mut rng, 50);
        assert!(delays.iter().all(|d| *d >= 100 * MS && *d <= 250 * MS));
        assert!(delays.iter().any(|d| *d > 240 * MS), "the cap is reached");
        let mut b = Backoff::new(10 * MS, 10_000 * MS);
        run(&mut b, &mut rng, 20);
        b.reset();
        assert_eq!(b.attempts(), 0);
        for _ in 0..100 {
            let first = b.next_delay_with(&mut rng);
            assert!(first >= 10 * MS && first <= 20 * MS, "{first:?}");
            b.reset();
        }
    }

    #[test]
    fn jitter_spreads_the_delays_of_simultaneous_failures() {
        // 1 000 clients failing at once: their first retries spread over [base, 2 × base], not one instant.
        let mut rng = StdRng::seed_from_u64(42);
        let base = 100 * MS;
        let mut buckets = [0u32; 10];
        for _ in 0..1_000 {
            let d = Backoff::new(base, 10_000 * MS).next_delay_with(&mut rng);
            let i = ((d - base).as_secs_f64() / base.as_secs_f64() * 10.0) as usize;
            buckets[i.min(9)] += 1;
        }
        // Uniform: about 100 per tenth of the range; none empty, none holding a sixth.
        assert!(
            buckets.iter().all(|n| (60..=160).contains(n)),
            "{buckets:?}"
        );
        // Seeded: the same seed gives the same delays, another seed others.
        let a = run(
            &mut Backoff::new(base, 10 * base),
            &mut StdRng::seed_from_u64(5),
            8,
        );
        let b = run(
            &mut Backoff::new(base, 10 * base),
            &mut StdRng::seed_from_u64(5),
            8,
        );
        assert_eq!(a, b);
        let c = run(
            &mut Backoff::new(base, 10 * base),
            &mut StdRng::seed_from_u64(6),
            8,
        );
        assert_ne!(a, c);
    }

    #[test]
    fn degenerate_settings_neither_panic_nor_leave_the_bounds() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut zero = Backoff::new(Duration::ZERO, Duration::ZERO);
        assert_eq!(run(&mut zero, &mut rng, 3), vec![Duration::ZERO; 3]);
        let mut fixed = Backoff::new(50 * MS, 10 * MS);
        assert_eq!(fixed.max(), 50 * MS);
        assert_eq!(run(&mut fixed, &mut rng, 3), vec![50 * MS; 3]);
        let mut long = Backoff::new(Duration::from_secs(3_600), Duration::from_secs(86_400));
        for d in run(&mut long, &mut rng, 100) {
            assert!(d >= Duration::from_secs(3_600) && d <= Duration::from_secs(86_400));
        }
    }
}

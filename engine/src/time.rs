//! Time and units, the engine's leaf module: integer unix ms, minute indexes, UTC months, sample ↔ ms
//! conversion, half-open [`Span`]s, the injectable [`Clock`], and the one retry delay, [`Backoff`].
//!
//! Every decision takes `now` as an argument; only a [`Clock`] reads the time of day, and tests replace it.
//! This module imports nothing from the rest of the crate, so every layer (audio, store, meter, policy,
//! pipeline, fair-use service) can use it without an import cycle (see `docs/architecture.md`).

mod backoff;

pub use backoff::Backoff;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Minutes since the Unix epoch (UTC): the index of a speech bucket.
pub type Minute = u32;
/// A calendar month as `yyyy * 100 + mm` (UTC), e.g. `202611`.
pub type MonthKey = u32;

pub const MS_PER_MINUTE: u64 = 60_000;
pub const MS_PER_HOUR: u64 = 60 * MS_PER_MINUTE;
pub const MS_PER_DAY: u64 = 24 * MS_PER_HOUR;

/// The minute bucket holding the instant `ms`.
pub fn minute_of_ms(ms: u64) -> Minute {
    (ms / MS_PER_MINUTE) as Minute
}

/// Unix ms at which a minute bucket starts.
pub fn minute_start_ms(minute: Minute) -> u64 {
    u64::from(minute) * MS_PER_MINUTE
}

/// The UTC calendar month (`yyyymm`) holding the instant `ms`.
pub fn month_of_ms(ms: u64) -> MonthKey {
    let days = (ms / MS_PER_DAY) as i64;
    let (year, month) = civil_year_month(days);
    (year as u32) * 100 + month
}

/// The month before `month` (`202601` → `202512`).
pub fn previous_month(month: MonthKey) -> MonthKey {
    if month % 100 <= 1 {
        (month / 100 - 1) * 100 + 12
    } else {
        month - 1
    }
}

/// Year and month of a day count since 1970-01-01.
fn civil_year_month(days: i64) -> (i64, u32) {
    let (year, month, _) = civil_from_days(days);
    (year, month)
}

/// Year, month and day of a day count since 1970-01-01 (Howard Hinnant's `civil_from_days`; no date crate
/// is a dependency, and these two functions are all the calendar the engine needs).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// A UTC day (days since 1970-01-01) as `yyyy-mm-dd`.
pub fn day_string(day: u64) -> String {
    let (y, m, d) = civil_from_days(i64::try_from(day).unwrap_or(i64::MAX / 2));
    format!("{y:04}-{m:02}-{d:02}")
}

/// The UTC day (days since 1970-01-01) of a `yyyy-mm-dd` date from 1970 on, or `None` when it is not one
/// (Hinnant's `days_from_civil`).
pub fn parse_day(date: &str) -> Option<u64> {
    let mut parts = date.trim().splitn(3, '-');
    let y: i64 = parts.next()?.parse().ok()?;
    let m: i64 = parts.next()?.parse().ok()?;
    let d: i64 = parts.next()?.parse().ok()?;
    if !(1970..=9999).contains(&y) || !(1..=12).contains(&m) || d < 1 {
        return None;
    }
    let yy = if m <= 2 { y - 1 } else { y };
    let era = yy.div_euclid(400);
    let yoe = yy - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    // A day past the month's end (`02-30`) would land in the next month: not a date.
    let days = u64::try_from(days).ok()?;
    (civil_from_days(days as i64) == (y, m as u32, d as u32)).then_some(days)
}

/// The UTC month (`yyyymm`) of a UTC day.
pub fn month_of_day(day: u64) -> MonthKey {
    month_of_ms(day.saturating_mul(MS_PER_DAY))
}

/// Converts a sample count to ms, rounding to the nearest ms (half up), computed in 128 bits so no count
/// overflows (the result saturates at `u64::MAX`). `rate_hz == 0` gives 0.
pub fn samples_to_ms(samples: u64, rate_hz: u32) -> u64 {
    if rate_hz == 0 {
        return 0;
    }
    let rate = u128::from(rate_hz);
    let ms = (u128::from(samples) * 1000 + rate / 2) / rate;
    u64::try_from(ms).unwrap_or(u64::MAX)
}

/// A half-open span `[start, end)` of integers in one unit, which its holder names: samples at 16 kHz
/// relative to a stream's start in the audio pipeline, absolute unix ms in conversations.
///
/// Serialised (conversations only) as `{"start_ms", "end_ms"}`: sample spans never leave the engine.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct Span {
    #[serde(rename = "start_ms")]
    pub start: u64,
    #[serde(rename = "end_ms")]
    pub end: u64,
}

impl Span {
    /// `[start, end)`; an `end` before `start` gives an empty span at `start`.
    pub fn new(start: u64, end: u64) -> Span {
        Span {
            start,
            end: end.max(start),
        }
    }

    /// The length (0 for an inverted span built by hand).
    pub fn len(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl std::fmt::Display for Span {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}..{}", self.start, self.end)
    }
}

/// The one place the engine reads the time of day.
pub trait Clock: Send + Sync + 'static {
    /// Unix ms, UTC.
    fn now_ms(&self) -> u64;
}

/// The system clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }
}

/// A clock tests set and advance by hand.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    pub fn new(now_ms: u64) -> Arc<Self> {
        Arc::new(Self(AtomicU64::new(now_ms)))
    }

    pub fn set(&self, now_ms: u64) {
        self.0.store(now_ms, Ordering::SeqCst);
    }

    pub fn advance(&self, ms: u64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// A wall clock that follows tokio's clock from a fixed start: under `tokio::time::pause()` it moves only
/// when virtual time does, so idle timers and window edges advance together in tests.
#[derive(Debug)]
pub struct TokioClock {
    start_ms: u64,
    start: tokio::time::Instant,
}

impl TokioClock {
    pub fn new(start_ms: u64) -> Arc<Self> {
        Arc::new(Self {
            start_ms,
            start: tokio::time::Instant::now(),
        })
    }
}

impl Clock for TokioClock {
    fn now_ms(&self) -> u64 {
        self.start_ms + self.start.elapsed().as_millis() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_read_and_write_as_utc_dates() {
        assert_eq!(day_string(0), "1970-01-01");
        assert_eq!(parse_day("1970-01-01"), Some(0));
        // 2026-12-06 is day 20,793.
        assert_eq!(parse_day("2026-12-06"), Some(20_793));
        assert_eq!(day_string(20_793), "2026-12-06");
        assert_eq!(month_of_day(20_793), 202_612);
        for day in [59, 60, 11_016, 11_017, 19_417, 20_454, 20_818] {
            assert_eq!(
                parse_day(&day_string(day)),
                Some(day),
                "{}",
                day_string(day)
            );
        }
        assert_eq!(
            day_string(parse_day("2024-02-29").unwrap_or(0)),
            "2024-02-29"
        );
        for bad in [
            "2025-02-29",
            "2026-13-01",
            "2026-00-10",
            "2026-01-32",
            "1969-12-31",
            "x",
            "2026-1",
        ] {
            assert_eq!(parse_day(bad), None, "{bad}");
        }
    }

    #[test]
    fn months_follow_the_utc_calendar() {
        assert_eq!(month_of_ms(0), 197001);
        // 2026-11-27T00:00:00Z
        assert_eq!(month_of_ms(1_795_737_600_000), 202611);
        // 2024-02-29T23:59:59.999Z and the next ms
        assert_eq!(month_of_ms(1_709_251_199_999), 202402);
        assert_eq!(month_of_ms(1_709_251_200_000), 202403);
        // 2025-12-31T23:59:59.999Z and 2026-01-01
        assert_eq!(month_of_ms(1_767_225_599_999), 202512);
        assert_eq!(month_of_ms(1_767_225_600_000), 202601);
    }

    #[test]
    fn previous_month_wraps_the_year() {
        assert_eq!(previous_month(202601), 202512);
        assert_eq!(previous_month(202612), 202611);
    }

    #[test]
    fn samples_round_to_the_nearest_ms() {
        assert_eq!(samples_to_ms(16_000, 16_000), 1000);
        assert_eq!(samples_to_ms(512, 16_000), 32);
        assert_eq!(samples_to_ms(8, 16_000), 1); // 0.5 ms rounds up
        assert_eq!(samples_to_ms(7, 16_000), 0);
        assert_eq!(samples_to_ms(1, 0), 0);
        assert_eq!(samples_to_ms(u64::MAX, 1000), u64::MAX);
        // Saturates instead of overflowing: u64::MAX samples at 1 Hz are more ms than a u64 holds.
        assert_eq!(samples_to_ms(u64::MAX, 1), u64::MAX);
        assert_eq!(
            samples_to_ms(u64::MAX / 16, 16_000),
            (u64::MAX / 16).div_ceil(16)
        );
    }

    #[test]
    fn spans_are_half_open_and_never_negative() {
        assert_eq!(Span::new(5, 3), Span { start: 5, end: 5 });
        assert!(Span::new(5, 3).is_empty());
        assert_eq!(Span::new(3, 5).len(), 2);
        assert_eq!(Span { start: 5, end: 3 }.len(), 0);
    }

    #[test]
    fn spans_serialise_with_the_conversation_field_names() {
        let json = serde_json::to_string(&Span::new(1, 2)).unwrap();
        assert_eq!(json, r#"{"start_ms":1,"end_ms":2}"#);
        assert_eq!(
            serde_json::from_str::<Span>(&json).unwrap(),
            Span::new(1, 2)
        );
    }
}

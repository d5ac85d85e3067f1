//! Sparse minute buckets with rolling 24 h / 72 h / 168 h totals (pure, no clock reads).
//!
//! Edge rule (the reference's): a bucket counts in a window when its start is at or after `now - window`.
//! Totals are kept incrementally (adding a bucket or moving `now` forward costs O(log n + buckets that
//! fall out)), so recording speech stays O(log n) even with a week of buckets.
//!
//! Memory: buckets are stored as two parallel vectors, a `u16` minute offset from `origin` and a `u32` ms
//! value (6 bytes per bucket), grown by 1/8 at a time: a full day (1440 buckets) takes about 9.7 KiB.

use crate::time::Minute;
use crate::time::{MS_PER_HOUR, MS_PER_MINUTE};

/// The rolling windows, shortest first.
pub const WINDOWS_MS: [u64; 3] = [24 * MS_PER_HOUR, 72 * MS_PER_HOUR, 168 * MS_PER_HOUR];

/// Rolling speech totals in ms: the policy's type, so meter and caps share one definition.
use crate::policy::RollingTotals;

/// The first minute that counts in a window of `window_ms` ending at `now_ms`.
pub fn window_first_minute(now_ms: u64, window_ms: u64) -> Minute {
    now_ms.saturating_sub(window_ms).div_ceil(MS_PER_MINUTE) as Minute
}

/// A minute could not be stored because the buckets would span more than 45 days (the window is pruned to
/// the retention, so this means a caller bug); the caller counts it as dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpanExceeded;

#[derive(Clone, Debug, Default)]
pub struct MinuteWindow {
    origin: Minute,
    offs: Vec<u16>,
    ms: Vec<u32>,
    /// Cached first minutes of each window and the sums of buckets at or after them.
    cutoffs: [Minute; 3],
    sums: [u64; 3],
}

impl MinuteWindow {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.offs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.offs.is_empty()
    }

    /// Heap bytes held by the buckets.
    pub fn heap_bytes(&self) -> usize {
        self.offs.capacity() * size_of::<u16>() + self.ms.capacity() * size_of::<u32>()
    }

    /// Buckets in minute order.
    pub fn buckets(&self) -> impl Iterator<Item = (Minute, u64)> + '_ {
        self.offs
            .iter()
            .zip(&self.ms)
            .map(|(&o, &ms)| (self.origin + Minute::from(o), u64::from(ms)))
    }

    /// Speech ms in one minute.
    pub fn get(&self, minute: Minute) -> u64 {
        self.index_of(minute).map_or(0, |i| u64::from(self.ms[i]))
    }

    pub fn clear(&mut self) {
        self.offs.clear();
        self.ms.clear();
        self.sums = [0; 3];
    }

    /// Adds `ms` to a minute. Returns the ms that did not fit (a bucket saturates at `u32::MAX` ms, about
    /// 49 days, which one minute cannot legitimately hold).
    pub fn add(&mut self, minute: Minute, ms: u64) -> Result<u64, SpanExceeded> {
        if ms == 0 {
            return Ok(0);
        }
        let i = match self.index_of(minute) {
            Some(i) => i,
            None => self.insert(minute)?,
        };
        let room = u64::from(u32::MAX - self.ms[i]);
        let added = ms.min(room);
        self.ms[i] += added as u32;
        self.adjust_sums(minute, added, true);
        Ok(ms - added)
    }

    /// Removes up to `ms` from a minute (a bucket never goes below zero); returns the ms removed.
    pub fn sub(&mut self, minute: Minute, ms: u64) -> u64 {
        let Some(i) = self.index_of(minute) else {
            return 0;
        };
        let removed = ms.min(u64::from(self.ms[i]));
        self.ms[i] -= removed as u32;
        if self.ms[i] == 0 {
            self.offs.remove(i);
            self.ms.remove(i);
        }
        self.adjust_sums(minute, removed, false);
        removed
    }

    /// Drops buckets that start before `first_kept`.
    pub fn prune_before(&mut self, first_kept: Minute) {
        let n = self.lower_bound(first_kept);
        if n == 0 {
            return;
        }
        for i in 0..n {
            let minute = self.origin + Minute::from(self.offs[i]);
            let ms = u64::from(self.ms[i]);
            self.adjust_sums(minute, ms, false);
        }
        self.offs.drain(..n);
        self.ms.drain(..n);
    }

    /// Rolling totals at `now_ms`. Moving `now` forward subtracts only the buckets that left a window;
    /// moving it backward (tests only) recomputes.
    pub fn totals(&mut self, now_ms: u64) -> RollingTotals {
        for (w, &window_ms) in WINDOWS_MS.iter().enumerate() {
            let cutoff = window_first_minute(now_ms, window_ms);
            let old = self.cutoffs[w];
            if cutoff > old {
                let (a, b) = (self.lower_bound(old), self.lower_bound(cutoff));
                let left: u64 = self.ms[a..b].iter().map(|&ms| u64::from(ms)).sum();
                self.sums[w] -= left;
            } else if cutoff < old {
                let from = self.lower_bound(cutoff);
                self.sums[w] = self.ms[from..].iter().map(|&ms| u64::from(ms)).sum();
            }
            self.cutoffs[w] = cutoff;
        }
        RollingTotals {
            daily_ms: self.sums[0],
            three_day_ms: self.sums[1],
            weekly_ms: self.sums[2],
        }
    }

    fn adjust_sums(&mut self, minute: Minute, ms: u64, add: bool) {
        for w in 0..3 {
            if minute >= self.cutoffs[w] {
                if add {
                    self.sums[w] += ms;
                } else {
                    self.sums[w] -= ms;
                }
            }
        }
    }

    /// Index of the first bucket at or after `minute`.
    fn lower_bound(&self, minute: Minute) -> usize {
        if minute <= self.origin {
            return 0;
        }
        let rel = minute - self.origin;
        if rel > Minute::from(u16::MAX) {
            return self.offs.len();
        }
        self.offs.partition_point(|&o| o < rel as u16)
    }

    fn index_of(&self, minute: Minute) -> Option<usize> {
        let rel = minute.checked_sub(self.origin)?;
        let rel = u16::try_from(rel).ok()?;
        self.offs.binary_search(&rel).ok()
    }

    /// Inserts an empty bucket for `minute` (absent), rebasing the offsets when needed.
    fn insert(&mut self, minute: Minute) -> Result<usize, SpanExceeded> {
        if self.offs.is_empty() {
            self.origin = minute;
        } else if minute < self.origin {
            let shift = self.origin - minute;
            let last = Minute::from(*self.offs.last().unwrap_or(&0));
            if last + shift > Minute::from(u16::MAX) {
                return Err(SpanExceeded);
            }
            for o in &mut self.offs {
                *o += shift as u16;
            }
            self.origin = minute;
        } else if minute - self.origin > Minute::from(u16::MAX) {
            let first = self.offs[0];
            if minute - (self.origin + Minute::from(first)) > Minute::from(u16::MAX) {
                return Err(SpanExceeded);
            }
            for o in &mut self.offs {
                *o -= first;
            }
            self.origin += Minute::from(first);
        }
        let rel = (minute - self.origin) as u16;
        let i = self.offs.partition_point(|&o| o < rel);
        if self.offs.len() == self.offs.capacity() {
            let extra = (self.offs.len() / 8).max(16);
            self.offs.reserve_exact(extra);
            self.ms.reserve_exact(extra);
        }
        self.offs.insert(i, rel);
        self.ms.insert(i, 0);
        Ok(i)
    }
}

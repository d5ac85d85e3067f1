//! Deltas recorded by an actor and not yet sealed into a batch.

use crate::store::{Delta, KeyedDelta};
use crate::time::{Minute, MonthKey};

/// Adds `ms` to the entry for `key` in a list sorted by key (appending is the common case).
/// Returns true when a new entry was created.
pub fn add_sorted<K: Ord + Copy>(list: &mut Vec<(K, u64)>, key: K, ms: u64) -> bool {
    if let Some(last) = list.last_mut() {
        if last.0 == key {
            last.1 += ms;
            return false;
        }
        if last.0 < key {
            list.push((key, ms));
            return true;
        }
    } else {
        list.push((key, ms));
        return true;
    }
    match list.binary_search_by(|e| e.0.cmp(&key)) {
        Ok(i) => {
            list[i].1 += ms;
            false
        }
        Err(i) => {
            list.insert(i, (key, ms));
            true
        }
    }
}

/// Pending plain deltas and keyed deltas of one user.
#[derive(Debug, Default)]
pub struct Pending {
    plain: Delta,
    keyed: Vec<KeyedDelta>,
    speech_ms: u64,
}

impl Pending {
    pub fn is_empty(&self) -> bool {
        self.plain.is_empty() && self.keyed.is_empty()
    }

    /// Entries held (distinct minutes and months of the plain delta, plus keyed records): the unit of
    /// the pending bound.
    pub fn entries(&self) -> usize {
        self.plain.buckets.len() + self.plain.months.len() + self.keyed.len()
    }

    pub fn speech_ms(&self) -> u64 {
        self.speech_ms
    }

    pub fn has_key(&self, key: &str) -> bool {
        self.keyed.iter().any(|k| k.key == key)
    }

    pub fn keyed(&self) -> &[KeyedDelta] {
        &self.keyed
    }

    pub fn plain(&self) -> &Delta {
        &self.plain
    }

    /// Adds plain speech to a minute. Returns true when a new entry was created.
    pub fn add_bucket(&mut self, minute: Minute, ms: u64) -> bool {
        self.speech_ms += ms;
        add_sorted(&mut self.plain.buckets, minute, ms)
    }

    /// Charges plain speech to a month. Returns true when a new entry was created.
    pub fn add_month(&mut self, month: MonthKey, ms: u64) -> bool {
        add_sorted(&mut self.plain.months, month, ms)
    }

    pub fn add_keyed(&mut self, keyed: KeyedDelta) {
        self.speech_ms += keyed.delta.bucket_ms();
        self.keyed.push(keyed);
    }

    /// Drops a keyed delta (its key turned out to be metered already); returns it.
    pub fn remove_key(&mut self, key: &str) -> Option<KeyedDelta> {
        let i = self.keyed.iter().position(|k| k.key == key)?;
        let k = self.keyed.remove(i);
        self.speech_ms -= k.delta.bucket_ms();
        Some(k)
    }

    /// Seals everything pending: returns it and leaves `self` empty.
    pub fn take(&mut self) -> (Delta, Vec<KeyedDelta>) {
        self.speech_ms = 0;
        (
            std::mem::take(&mut self.plain),
            std::mem::take(&mut self.keyed),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_sorted_keeps_keys_unique_and_ordered() {
        let mut list = Vec::new();
        for (k, v) in [(5u32, 1u64), (7, 2), (5, 3), (1, 4), (7, 5), (6, 6)] {
            add_sorted(&mut list, k, v);
        }
        assert_eq!(list, vec![(1, 4), (5, 4), (6, 6), (7, 7)]);
    }
}

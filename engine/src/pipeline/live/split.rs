//! How a session's STT charge splits by the provider that took the audio, for the user's per-provider
//! ledger (billing reconciliation, `FairUse::stt_ledger`).
//!
//! The charge of a meter record (`stt_ms`) covers the audio handed to the stream since the last recorded
//! one; the link counts those samples by the provider that took them (with a fallback, the one serving at
//! that push). One provider took it all (every deployment without a fallback, and a fallback stream that
//! did not switch): all the ms go to it. Several: the ms split in proportion to their samples, the
//! rounding remainder to the one that took most, so the parts always add up to the charge.

use crate::stt::ProviderKind;

#[derive(Debug, Default)]
pub(super) struct SttSplit {
    /// Samples by provider attributed by records that were written.
    recorded: [u64; 4],
    /// The totals a record in flight attributes up to, kept once it is written.
    in_flight: Option<[u64; 4]>,
}

impl SttSplit {
    /// Splits `stt_ms` by the samples each provider took since the last written record (`handed`: the
    /// totals so far); with none counted (no stream), all of it goes to `session`, the session's provider.
    pub(super) fn split(
        &mut self,
        stt_ms: u64,
        handed: [u64; 4],
        session: ProviderKind,
    ) -> Vec<(&'static str, u64)> {
        self.in_flight = Some(handed);
        let delta: Vec<u64> = (0..4)
            .map(|i| handed[i].saturating_sub(self.recorded[i]))
            .collect();
        let total: u64 = delta.iter().sum();
        if total == 0 {
            return vec![(session.name(), stt_ms)];
        }
        let mut parts: Vec<u64> = delta
            .iter()
            .map(|&d| {
                let part = u128::from(stt_ms) * u128::from(d) / u128::from(total);
                u64::try_from(part).unwrap_or(stt_ms)
            })
            .collect();
        let left = stt_ms.saturating_sub(parts.iter().sum());
        let most = (0..4).max_by_key(|&i| (delta[i], 4 - i)).unwrap_or(0);
        parts[most] += left;
        ProviderKind::ALL
            .iter()
            .zip(parts)
            .filter(|(_, ms)| *ms > 0)
            .map(|(k, ms)| (k.name(), ms))
            .collect()
    }

    /// The record in flight was written (`true`) or not: its samples count as attributed only once
    /// written; otherwise the next record's charge carries them again, and so does its split.
    pub(super) fn done(&mut self, written: bool) {
        if let Some(handed) = self.in_flight.take()
            && written
        {
            self.recorded = handed;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: usize = 1; // deepgram
    const L: usize = 0; // local

    fn at(pairs: &[(usize, u64)]) -> [u64; 4] {
        let mut a = [0; 4];
        for &(i, n) in pairs {
            a[i] = n;
        }
        a
    }

    #[test]
    fn one_provider_takes_the_whole_charge_and_several_split_it_exactly() {
        let mut s = SttSplit::default();
        assert_eq!(
            s.split(1_000, at(&[(D, 16_000)]), ProviderKind::Deepgram),
            [("deepgram", 1_000)]
        );
        s.done(true);
        // A switch to the local fallback within the next record: 3 s on deepgram, 1 s local.
        let split = s.split(
            4_001,
            at(&[(D, 16_000 + 48_000), (L, 16_000)]),
            ProviderKind::Deepgram,
        );
        assert_eq!(split, [("local", 1_000), ("deepgram", 3_001)]);
        assert_eq!(split.iter().map(|(_, ms)| ms).sum::<u64>(), 4_001);
    }

    #[test]
    fn a_record_not_written_carries_its_samples_to_the_next_split() {
        let mut s = SttSplit::default();
        let _ = s.split(500, at(&[(D, 8_000)]), ProviderKind::Deepgram);
        s.done(false);
        // The next record carries the 500 ms again plus 500 more, all of it deepgram's.
        assert_eq!(
            s.split(1_000, at(&[(D, 16_000)]), ProviderKind::Deepgram),
            [("deepgram", 1_000)]
        );
        s.done(true);
        // Nothing handed since (a charge without a stream): the session's provider.
        assert_eq!(
            s.split(250, at(&[(D, 16_000)]), ProviderKind::OpenAi),
            [("openai", 250)]
        );
    }
}

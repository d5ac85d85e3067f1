//! Speech segments, pure functions over integer spans.
//!
//! `raw` spans are the VAD's speech runs. **Metered speech is the sum of raw spans**: gaps are never
//! billed and a short real utterance counts. For STT and conversations, raw spans are merged when the
//! gap between them is strictly less than the merge gap (120 s), a merged span is split into pieces of
//! at most the split length (300 s), and merged pieces shorter than the minimum (1 s) are dropped.
//! All values share one unit (samples at 16 kHz in the pipeline, ms in tests and reports).

use crate::time::Span;

/// The merge rules for STT segments, in the spans' unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MergeRules {
    /// Spans merge when the gap is strictly less than this.
    pub merge_gap: u64,
    /// A merged span longer than this is split into consecutive pieces of at most this length.
    pub split_at: u64,
    /// Merged pieces shorter than this are dropped.
    pub min_len: u64,
}

impl MergeRules {
    /// The reference rules (120 s gap, 300 s split, 1 s minimum) in units of `per_second`.
    pub fn reference(per_second: u64) -> MergeRules {
        MergeRules {
            merge_gap: 120 * per_second,
            split_at: 300 * per_second,
            min_len: per_second,
        }
    }
}

/// Metered speech: the sum of the raw spans' lengths.
pub fn metered(raw: &[Span]) -> u64 {
    raw.iter().map(Span::len).sum()
}

/// Merge raw spans (sorted by start) for STT, then split long spans and drop short ones.
pub fn merge_for_stt(raw: &[Span], rules: MergeRules) -> Vec<Span> {
    let mut merged: Vec<Span> = Vec::new();
    for span in raw.iter().filter(|s| !s.is_empty()) {
        match merged.last_mut() {
            Some(last) if span.start < last.end.saturating_add(rules.merge_gap) => {
                last.end = last.end.max(span.end);
            }
            _ => merged.push(*span),
        }
    }
    let mut out = Vec::with_capacity(merged.len());
    for span in merged {
        let mut start = span.start;
        while start < span.end {
            let end = if rules.split_at == 0 {
                span.end
            } else {
                span.end.min(start.saturating_add(rules.split_at))
            };
            if end - start >= rules.min_len {
                out.push(Span { start, end });
            }
            start = end;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1000; // ms per second
    fn spans(v: &[(f64, f64)]) -> Vec<Span> {
        v.iter()
            .map(|&(a, b)| Span::new((a * 1000.0) as u64, (b * 1000.0) as u64))
            .collect()
    }

    // omi-behaviour §7 A5–A8 and B37, under our rule: metered = sum of raw spans, short ones count.
    #[test]
    fn a5_raw_0_30_and_150_180_meter_60s() {
        assert_eq!(metered(&spans(&[(0.0, 30.0), (150.0, 180.0)])), 60 * S);
    }

    #[test]
    fn a6_raw_meters_60s_while_the_merged_span_is_130s() {
        let raw = spans(&[(0.0, 30.0), (100.0, 130.0)]);
        assert_eq!(metered(&raw), 60 * S);
        let merged = merge_for_stt(&raw, MergeRules::reference(S));
        assert_eq!(merged, spans(&[(0.0, 130.0)]));
        assert!(metered(&raw) < metered(&merged));
    }

    #[test]
    fn a7_a_short_real_utterance_counts_30_5s() {
        assert_eq!(metered(&spans(&[(0.0, 0.5), (10.0, 40.0)])), 30_500);
    }

    #[test]
    fn a8_no_segments_meter_zero() {
        assert_eq!(metered(&[]), 0);
        assert!(merge_for_stt(&[], MergeRules::reference(S)).is_empty());
    }

    #[test]
    fn b37_three_raw_runs_meter_90s() {
        assert_eq!(
            metered(&spans(&[(0.0, 30.0), (150.0, 180.0), (300.0, 330.0)])),
            90 * S
        );
    }

    #[test]
    fn gap_of_exactly_120s_does_not_merge() {
        let merged = merge_for_stt(
            &spans(&[(0.0, 10.0), (130.0, 140.0)]),
            MergeRules::reference(S),
        );
        assert_eq!(merged.len(), 2);
        let merged = merge_for_stt(
            &spans(&[(0.0, 10.0), (129.999, 140.0)]),
            MergeRules::reference(S),
        );
        assert_eq!(merged.len(), 1);
    }

    #[test]
    fn merged_span_over_300s_is_split_into_300s_pieces() {
        let raw: Vec<Span> = (0..20)
            .map(|i| Span::new(i * 40 * S, i * 40 * S + 30 * S))
            .collect();
        let merged = merge_for_stt(&raw, MergeRules::reference(S));
        assert_eq!(
            merged,
            spans(&[(0.0, 300.0), (300.0, 600.0), (600.0, 790.0)])
        );
    }

    #[test]
    fn merged_pieces_under_1s_are_dropped_but_still_metered() {
        let raw = spans(&[(0.0, 0.5)]);
        assert!(merge_for_stt(&raw, MergeRules::reference(S)).is_empty());
        assert_eq!(metered(&raw), 500);
    }
}

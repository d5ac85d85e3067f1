//! Cutting audio into chunks a batch-only engine can take.
//!
//! Moonshine's compute and memory grow with the clip (1.9 GB peak on an 18.6 s clip, under 800 MB at
//! 10 s: `../shared/reference/stt-notes.md`), so audio goes to it in chunks cut at the VAD's pauses and
//! never longer than [`MAX_CHUNK_SAMPLES`]. A speech run longer than that is cut at its quietest 20 ms
//! within the last [`CUT_SEARCH_SAMPLES`] before the cap, which is most likely between words.

use super::types::Pcm;

/// The longest chunk handed to a batch engine: 10 s at 16 kHz.
pub const MAX_CHUNK_SAMPLES: usize = 160_000;
/// How far back from the cap a forced cut looks for a quiet frame: 2 s.
pub const CUT_SEARCH_SAMPLES: usize = 32_000;
/// Runs separated by at most this pause share a chunk. 0: every VAD pause ends a chunk. Measured on the
/// fixtures (docs/stt.md): joining runs up to 1 s apart made Moonshine repeat earlier sentences into later
/// ones and ran 20% slower, for the same word error rate; the pauses are not sent (nor charged).
pub const MAX_JOIN_GAP_SAMPLES: usize = 0;
/// Frame over which quietness is measured: 20 ms.
const FRAME: usize = 320;

/// Where to cut `samples` (longer than `max`) so that the first chunk is at most `max` samples: the start of
/// the quietest frame in `[max - search, max)`, or `max` itself when the window is too short to search.
pub fn cut_point(samples: &[f32], max: usize, search: usize) -> usize {
    let max = max.min(samples.len()).max(1);
    let from = max.saturating_sub(search);
    let mut best = max;
    let mut best_energy = f32::INFINITY;
    let mut at = from;
    while at + FRAME <= max {
        let energy: f32 = samples[at..at + FRAME].iter().map(|v| v * v).sum();
        if energy < best_energy {
            best_energy = energy;
            best = at + FRAME / 2;
        }
        at += FRAME / 2;
    }
    best.clamp(1, max)
}

/// Groups the speech runs of a recorded span into chunks of at most `max` samples, cut at the pauses between
/// runs; a run longer than `max` is cut with [`cut_point`]. `speech` holds sorted, non-overlapping sample
/// ranges relative to `samples[0]` (clipped to it); empty means the whole span is one run. Runs closer than
/// [`MAX_JOIN_GAP_SAMPLES`] share a chunk (with the pause between them); a longer pause ends the chunk and is
/// not sent.
pub fn batch_chunks(samples: &[f32], speech: &[(u64, u64)], max: usize) -> Vec<(usize, usize)> {
    batch_chunks_joining(samples, speech, max, MAX_JOIN_GAP_SAMPLES)
}

/// [`batch_chunks`] with runs up to `join_gap` samples apart sharing a chunk.
pub fn batch_chunks_joining(
    samples: &[f32],
    speech: &[(u64, u64)],
    max: usize,
    join_gap: usize,
) -> Vec<(usize, usize)> {
    let len = samples.len();
    let whole = [(0u64, len as u64)];
    let runs = if speech.is_empty() {
        &whole[..]
    } else {
        speech
    };
    let mut chunks: Vec<(usize, usize)> = Vec::new();
    let mut open: Option<(usize, usize)> = None;
    for &(s, e) in runs {
        let (s, e) = (clip(s, len), clip(e, len));
        if e <= s {
            continue;
        }
        open = match open {
            Some((os, oe)) if e - os <= max && s.saturating_sub(oe) <= join_gap => Some((os, e)),
            Some(prev) => {
                chunks.push(prev);
                Some((s, e))
            }
            None => Some((s, e)),
        };
        // A single run (or what is left of one) over the cap is cut at its quiet points.
        while let Some((os, oe)) = open {
            if oe - os <= max {
                break;
            }
            let cut = os + cut_point(&samples[os..oe], max, CUT_SEARCH_SAMPLES);
            chunks.push((os, cut));
            open = Some((cut, oe));
        }
    }
    chunks.extend(open);
    chunks
}

/// Widens each run by `before` and `after` samples (the live session's pre-roll and hangover, for callers
/// that hold raw VAD runs), within `0..len`, merging runs that come to overlap.
pub fn pad_runs(runs: &[(u64, u64)], before: u64, after: u64, len: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(runs.len());
    for &(s, e) in runs {
        let (s, e) = (s.saturating_sub(before), e.saturating_add(after).min(len));
        if e <= s {
            continue;
        }
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// A live stream's current speech run, held as 16-bit PCM and cut into chunks for a per-chunk engine or
/// API: a run ends its chunk where it ends (the VAD's pause, [`RunChunker::flush`]) or where the next push
/// does not follow it; a run longer than `max` samples is cut at its quietest frame before the cap, as
/// [`cut_point`] cuts. Holds at most `max` samples.
#[derive(Debug)]
pub struct RunChunker {
    held: Vec<i16>,
    /// Stream-time offset of `held[0]`.
    start: u64,
    max: usize,
}

impl RunChunker {
    /// Chunks of at most `max` samples (at least one frame's worth).
    pub fn new(max: usize) -> RunChunker {
        RunChunker {
            held: Vec::new(),
            start: 0,
            max: max.max(2 * FRAME),
        }
    }

    /// Adds `pcm` at stream offset `start`; the chunks it completes go to `out` as (stream offset, samples).
    pub fn push(&mut self, start: u64, pcm: Pcm<'_>, out: &mut Vec<(u64, Vec<i16>)>) {
        if !self.held.is_empty() && start != self.start + self.held.len() as u64 {
            out.extend(self.flush());
        }
        if self.held.is_empty() {
            self.start = start;
        }
        pcm.extend_i16(&mut self.held);
        while self.held.len() >= self.max {
            let search = CUT_SEARCH_SAMPLES.min(self.max / 2);
            let from = self.max - search;
            let window: Vec<f32> = self.held[from..self.max]
                .iter()
                .map(|&v| f32::from(v) / 32_768.0)
                .collect();
            let cut = from + cut_point(&window, search, search);
            let chunk: Vec<i16> = self.held.drain(..cut).collect();
            out.push((self.start, chunk));
            self.start += cut as u64;
        }
    }

    /// The run ended: what is held, as one chunk.
    pub fn flush(&mut self) -> Option<(u64, Vec<i16>)> {
        if self.held.is_empty() {
            return None;
        }
        let start = self.start;
        self.start += self.held.len() as u64;
        Some((start, std::mem::take(&mut self.held)))
    }
}

fn clip(v: u64, len: usize) -> usize {
    usize::try_from(v).map_or(len, |v| v.min(len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tone(len: usize) -> Vec<f32> {
        (0..len).map(|i| ((i as f32) * 0.05).sin() * 0.5).collect()
    }

    #[test]
    fn a_forced_cut_lands_in_the_quiet_frame_before_the_cap() {
        let mut audio = tone(200_000);
        // A 40 ms pause 1 s before the 10 s cap.
        for v in &mut audio[144_000..144_640] {
            *v = 0.0;
        }
        let cut = cut_point(&audio, MAX_CHUNK_SAMPLES, CUT_SEARCH_SAMPLES);
        assert!((144_000..144_640).contains(&cut), "cut at {cut}");
    }

    #[test]
    fn a_cut_never_exceeds_the_cap_even_without_a_quiet_frame() {
        let audio = tone(170_000);
        let cut = cut_point(&audio, MAX_CHUNK_SAMPLES, CUT_SEARCH_SAMPLES);
        assert!((MAX_CHUNK_SAMPLES - CUT_SEARCH_SAMPLES..=MAX_CHUNK_SAMPLES).contains(&cut));
        // Shorter than one frame: cut at the cap.
        assert_eq!(cut_point(&tone(100), 50, 10), 50);
    }

    #[test]
    fn runs_are_grouped_up_to_the_cap_and_split_at_pauses() {
        let audio = tone(400_000);
        let speech = [
            (1_000, 50_000),
            (60_000, 120_000),
            (130_000, 200_000),
            (210_000, 215_000),
            // 2 s after the previous run: its own chunk.
            (247_000, 250_000),
        ];
        let chunks = batch_chunks_joining(&audio, &speech, MAX_CHUNK_SAMPLES, 16_000);
        assert_eq!(
            chunks,
            vec![(1_000, 120_000), (130_000, 215_000), (247_000, 250_000)],
            "runs joined while the chunk stays within 10 s and the pause within 1 s"
        );
        let one_per_run = batch_chunks(&audio, &speech, MAX_CHUNK_SAMPLES);
        assert_eq!(
            one_per_run.len(),
            speech.len(),
            "the default cuts at every pause"
        );
    }

    #[test]
    fn a_long_run_is_cut_into_capped_chunks_covering_it_exactly() {
        let audio = tone(500_000);
        let chunks = batch_chunks(&audio, &[(10_000, 470_000)], MAX_CHUNK_SAMPLES);
        assert!(chunks.len() >= 3);
        assert_eq!(chunks[0].0, 10_000);
        assert_eq!(chunks.last().map(|c| c.1), Some(470_000));
        for w in chunks.windows(2) {
            assert_eq!(w[0].1, w[1].0, "contiguous");
        }
        for &(s, e) in &chunks {
            assert!(e > s && e - s <= MAX_CHUNK_SAMPLES, "{s}..{e}");
        }
    }

    #[test]
    fn padding_widens_runs_within_the_span_and_merges_overlaps() {
        assert_eq!(
            pad_runs(
                &[(10_000, 12_000), (20_000, 22_000), (24_000, 25_000)],
                4_800,
                1_000,
                25_500
            ),
            vec![(5_200, 13_000), (15_200, 25_500)]
        );
        assert_eq!(
            pad_runs(&[(1_000, 2_000)], 4_800, 1_000, 2_500),
            vec![(0, 2_500)]
        );
    }

    #[test]
    fn a_run_chunker_cuts_at_gaps_run_ends_and_quiet_points_before_the_cap() {
        let mut c = RunChunker::new(MAX_CHUNK_SAMPLES);
        let mut out = Vec::new();
        let loud: Vec<i16> = (0..140_000)
            .map(|i| if i % 2 == 0 { 9_000 } else { -9_000 })
            .collect();
        c.push(16_000, Pcm::I16(&loud), &mut out);
        assert!(out.is_empty());
        // A quiet 40 ms 1.25 s before the cap, then more of the run: the cut lands in it.
        let mut more = vec![0i16; 640];
        more.extend(std::iter::repeat_n(9_000i16, 100_000));
        c.push(156_000, Pcm::I16(&more[..44_000]), &mut out);
        c.push(200_000, Pcm::I16(&more[44_000..]), &mut out);
        assert_eq!(out.len(), 1, "one cut at the cap");
        let (s, first) = (out[0].0, out[0].1.len());
        assert_eq!(s, 16_000);
        assert!((140_000..=140_640).contains(&first), "{first}");
        // A push that does not follow ends the chunk; flush gives the rest, contiguous.
        c.push(900_000, Pcm::I16(&loud[..10]), &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(out[1].0, 16_000 + first as u64);
        assert_eq!(out[0].1.len() + out[1].1.len(), 240_640);
        assert_eq!(c.flush(), Some((900_000, loud[..10].to_vec())));
        assert_eq!(c.flush(), None);
        // Never more than the cap, even without a quiet frame.
        c.push(0, Pcm::I16(&vec![9_000i16; 350_000]), &mut out);
        assert!(out[2..].iter().all(|(_, p)| p.len() <= MAX_CHUNK_SAMPLES));
        let total: usize = out[2..].iter().map(|(_, p)| p.len()).sum::<usize>()
            + c.flush().map_or(0, |(_, p)| p.len());
        assert_eq!(total, 350_000);
    }

    #[test]
    fn empty_speech_means_the_whole_span_and_bad_runs_are_ignored() {
        let audio = tone(20_000);
        assert_eq!(
            batch_chunks(&audio, &[], MAX_CHUNK_SAMPLES),
            vec![(0, 20_000)]
        );
        assert_eq!(
            batch_chunks(
                &audio,
                &[(5_000, 5_000), (30_000, 40_000), (1_000, 90_000)],
                100_000
            ),
            vec![(1_000, 20_000)]
        );
        assert!(batch_chunks(&[], &[], MAX_CHUNK_SAMPLES).is_empty());
    }
}

//! The recent 16 kHz audio a live session keeps for speech-to-text: a fixed ring of 16-bit samples.
//!
//! Only sessions with a speech-to-text provider keep one (`VOICEGATE_STT=none` allocates and copies
//! nothing). The detector confirms a run some windows after it began, and a run is forwarded with a
//! pre-roll before its start, so the session needs the last few seconds of audio at hand; the ring holds
//! exactly that and never grows. Positions are stream-time samples at 16 kHz, the VAD's and detector's clock.

use crate::stt::types::f32_to_i16;

/// The last `capacity` samples of the stream at 16 kHz.
#[derive(Debug, Clone)]
pub struct AudioTap {
    buf: Vec<i16>,
    /// Stream position one past the newest sample.
    end: u64,
}

impl AudioTap {
    /// A ring of `capacity` samples (at least one), allocated once.
    pub fn new(capacity: usize) -> AudioTap {
        AudioTap {
            buf: vec![0; capacity.max(1)],
            end: 0,
        }
    }

    fn cap(&self) -> u64 {
        self.buf.len() as u64
    }

    /// Appends samples in [-1, 1] (the oldest fall off).
    pub fn push(&mut self, mut samples: &[f32]) {
        let cap = self.buf.len();
        if samples.len() > cap {
            self.end += (samples.len() - cap) as u64;
            samples = &samples[samples.len() - cap..];
        }
        while !samples.is_empty() {
            let at = (self.end % self.cap()) as usize;
            let n = samples.len().min(cap - at);
            for (d, s) in self.buf[at..at + n].iter_mut().zip(&samples[..n]) {
                *d = f32_to_i16(*s);
            }
            self.end += n as u64;
            samples = &samples[n..];
        }
    }

    /// Stream position one past the newest sample.
    pub fn end(&self) -> u64 {
        self.end
    }

    /// Stream position of the oldest sample still held.
    pub fn oldest(&self) -> u64 {
        self.end.saturating_sub(self.cap())
    }

    /// The samples of `[start, end)` still held, as at most two slices in order (`start` is raised to
    /// [`Self::oldest`], `end` lowered to [`Self::end`]).
    pub fn slices(&self, start: u64, end: u64) -> (&[i16], &[i16]) {
        let start = start.max(self.oldest());
        let end = end.min(self.end);
        if start >= end {
            return (&[], &[]);
        }
        let cap = self.cap();
        let (a, len) = ((start % cap) as usize, (end - start) as usize);
        if a + len <= self.buf.len() {
            (&self.buf[a..a + len], &[])
        } else {
            let first = self.buf.len() - a;
            (&self.buf[a..], &self.buf[..len - first])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn floats(range: std::ops::Range<i32>) -> Vec<f32> {
        range.map(|v| v as f32 / 32_767.0).collect()
    }

    fn read(tap: &AudioTap, start: u64, end: u64) -> Vec<i16> {
        let (a, b) = tap.slices(start, end);
        [a, b].concat()
    }

    #[test]
    fn the_ring_keeps_the_newest_samples_at_their_stream_positions() {
        let mut tap = AudioTap::new(10);
        tap.push(&floats(0..7));
        assert_eq!((tap.oldest(), tap.end()), (0, 7));
        assert_eq!(read(&tap, 2, 5), vec![2, 3, 4]);
        tap.push(&floats(7..16));
        assert_eq!((tap.oldest(), tap.end()), (6, 16));
        // Wraps: positions 8..13 span the ring's end.
        assert_eq!(read(&tap, 8, 13), vec![8, 9, 10, 11, 12]);
        // What fell off is not returned; what is not there yet neither.
        assert_eq!(read(&tap, 0, 8), vec![6, 7]);
        assert_eq!(read(&tap, 14, 99), vec![14, 15]);
        assert!(read(&tap, 20, 30).is_empty());
        // A push longer than the ring keeps its tail.
        tap.push(&floats(16..40));
        assert_eq!(read(&tap, 0, 40), (30..40).collect::<Vec<i16>>());
    }
}

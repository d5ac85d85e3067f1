//! Streaming resampling of mono audio to 16 kHz with `rubato` (FFT, synchronous).
//!
//! The resampler's delay is trimmed at the start and flushed at the end, so the output of a whole
//! stream has exactly `round(input * 16000 / rate)` samples, aligned with the input.

use rubato::audioadapter_buffers::direct::InterleavedSlice;
use rubato::{Fft, FixedSync, Resampler as _};

/// VAD and metering rate.
pub const TARGET_RATE: u32 = 16_000;

#[derive(Debug, thiserror::Error)]
#[error("resampler: {0}")]
pub struct ResampleError(String);

/// Streaming resampler to 16 kHz.
pub struct Resampler {
    inner: Fft<f32>,
    rate: u32,
    input: Vec<f32>,
    out_buf: Vec<f32>,
    to_skip: usize,
    consumed: u64,
    produced: u64,
}

impl Resampler {
    pub fn new(rate: u32) -> Result<Resampler, ResampleError> {
        // 20 ms chunks at the input rate keep the delay small for live streams.
        let chunk = (rate / 50).max(1) as usize;
        let inner = Fft::<f32>::new(
            rate as usize,
            TARGET_RATE as usize,
            chunk,
            1,
            FixedSync::Input,
        )
        .map_err(|e| ResampleError(e.to_string()))?;
        let to_skip = inner.output_delay();
        let out_buf = vec![0.0; inner.output_frames_max()];
        Ok(Resampler {
            inner,
            rate,
            input: Vec::with_capacity(chunk * 2),
            out_buf,
            to_skip,
            consumed: 0,
            produced: 0,
        })
    }

    /// Push samples at the input rate; 16 kHz samples are appended to `out`.
    pub fn push(&mut self, samples: &[f32], out: &mut Vec<f32>) -> Result<(), ResampleError> {
        self.input.extend_from_slice(samples);
        self.consumed += samples.len() as u64;
        self.drain(out)
    }

    fn drain(&mut self, out: &mut Vec<f32>) -> Result<(), ResampleError> {
        let mut start = 0;
        loop {
            let need = self.inner.input_frames_next();
            if self.input.len() - start < need {
                break;
            }
            let inp = InterleavedSlice::new(&self.input[start..start + need], 1, need)
                .map_err(|e| ResampleError(e.to_string()))?;
            let cap = self.out_buf.len();
            let mut outp = InterleavedSlice::new_mut(&mut self.out_buf[..], 1, cap)
                .map_err(|e| ResampleError(e.to_string()))?;
            let (read, written) = self
                .inner
                .process_into_buffer(&inp, &mut outp, None)
                .map_err(|e| ResampleError(e.to_string()))?;
            start += read;
            let skip = self.to_skip.min(written);
            self.to_skip -= skip;
            out.extend_from_slice(&self.out_buf[skip..written]);
            self.produced += (written - skip) as u64;
        }
        self.input.drain(..start);
        Ok(())
    }

    /// End of stream: flush the delay line so the output has exactly the expected length.
    pub fn finish(&mut self, out: &mut Vec<f32>) -> Result<(), ResampleError> {
        let expected = (self.consumed * u64::from(TARGET_RATE) + u64::from(self.rate) / 2)
            / u64::from(self.rate);
        let mut guard = 0;
        while self.produced < expected && guard < 64 {
            let need = self.inner.input_frames_next();
            let pad = need - self.input.len().min(need);
            self.input.resize(self.input.len() + pad.max(1), 0.0);
            let before = out.len();
            self.drain(out)?;
            guard += 1;
            if self.produced > expected {
                let extra = (self.produced - expected) as usize;
                out.truncate(before.max(out.len() - extra));
                self.produced = expected;
            }
        }
        self.input.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_length_matches_the_rate_ratio_exactly() {
        for rate in [8_000u32, 12_000, 24_000, 48_000] {
            let mut r = Resampler::new(rate).unwrap();
            let mut out = Vec::new();
            let input = vec![0.1f32; rate as usize + 123];
            for chunk in input.chunks(97) {
                r.push(chunk, &mut out).unwrap();
            }
            r.finish(&mut out).unwrap();
            let expected = ((rate as u64 + 123) * 16_000 + rate as u64 / 2) / rate as u64;
            assert_eq!(out.len() as u64, expected, "rate {rate}");
        }
    }

    #[test]
    fn a_tone_keeps_its_level_through_48k_to_16k() {
        let mut r = Resampler::new(48_000).unwrap();
        let input: Vec<f32> = (0..48_000)
            .map(|i| (i as f32 * 2.0 * std::f32::consts::PI * 440.0 / 48_000.0).sin() * 0.5)
            .collect();
        let mut out = Vec::new();
        r.push(&input, &mut out).unwrap();
        r.finish(&mut out).unwrap();
        let rms = (out[2000..14000].iter().map(|x| x * x).sum::<f32>() / 12000.0).sqrt();
        assert!((rms - 0.5 / 2f32.sqrt()).abs() < 0.02, "rms {rms}");
    }
}

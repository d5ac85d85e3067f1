//! WAV input for `voicegate analyze`: 8/16/24/32-bit integer or 32-bit float PCM, any channel count
//! (mixed down to mono), any rate (resampled by the pipeline).

use std::io::Read;

/// A decoded WAV: mono f32 samples and their rate.
pub struct WavAudio {
    pub samples: Vec<f32>,
    pub rate: u32,
    pub channels: u16,
}

#[derive(Debug, thiserror::Error)]
#[error("invalid WAV file: {0}")]
pub struct WavError(String);

/// Upper bound on a WAV accepted by the analyser: 4 hours at 48 kHz.
const MAX_FRAMES: u64 = 4 * 3600 * 48_000;

pub fn read_wav<R: Read>(reader: R) -> Result<WavAudio, WavError> {
    let mut r = hound::WavReader::new(reader).map_err(|e| WavError(e.to_string()))?;
    let spec = r.spec();
    if spec.channels == 0 || spec.sample_rate == 0 {
        return Err(WavError("zero channels or sample rate".into()));
    }
    if u64::from(r.duration()) > MAX_FRAMES {
        return Err(WavError(format!(
            "{} frames is over the analyser's bound of {MAX_FRAMES}",
            r.duration()
        )));
    }
    let ch = usize::from(spec.channels);
    let mut mono = Vec::with_capacity(r.duration() as usize);
    let mut acc = 0.0f32;
    let mut k = 0usize;
    let mut push = |x: f32| {
        acc += x;
        k += 1;
        if k == ch {
            mono.push(acc / ch as f32);
            acc = 0.0;
            k = 0;
        }
    };
    match (spec.sample_format, spec.bits_per_sample) {
        (hound::SampleFormat::Float, 32) => {
            for s in r.samples::<f32>() {
                push(s.map_err(|e| WavError(e.to_string()))?);
            }
        }
        (hound::SampleFormat::Int, bits @ (8 | 16 | 24 | 32)) => {
            let scale = 1.0 / (1u64 << (bits - 1)) as f32;
            for s in r.samples::<i32>() {
                push(s.map_err(|e| WavError(e.to_string()))? as f32 * scale);
            }
        }
        (fmt, bits) => {
            return Err(WavError(format!(
                "unsupported sample format {fmt:?} with {bits} bits"
            )));
        }
    }
    Ok(WavAudio {
        samples: mono,
        rate: spec.sample_rate,
        channels: spec.channels,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wav_with_a_wrong_header_is_an_error() {
        let mut bytes = b"RIFX\x24\x00\x00\x00WAVEfmt ".to_vec();
        bytes.extend_from_slice(&[0u8; 40]);
        assert!(read_wav(&bytes[..]).is_err());
        assert!(read_wav(&b""[..]).is_err());
    }

    #[test]
    fn stereo_16_bit_is_mixed_to_mono() {
        let mut buf = std::io::Cursor::new(Vec::new());
        let spec = hound::WavSpec {
            channels: 2,
            sample_rate: 16_000,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        let mut w = hound::WavWriter::new(&mut buf, spec).unwrap();
        for _ in 0..10 {
            w.write_sample(16_384i16).unwrap();
            w.write_sample(0i16).unwrap();
        }
        w.finalize().unwrap();
        let wav = read_wav(&buf.get_ref()[..]).unwrap();
        assert_eq!(wav.samples.len(), 10);
        assert!((wav.samples[0] - 0.25).abs() < 1e-6);
    }
}

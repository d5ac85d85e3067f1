//! Codecs: Opus (libopus through the `opus` crate, any Opus rate) and 16-bit little-endian PCM.
//!
//! Decoders produce mono f32 samples in [-1, 1] at the codec's own rate. A corrupt Opus packet is
//! skipped and counted by the caller, never fatal.

pub use super::opus_dec::DecodeError;
use super::opus_dec::OpusDecoder;

/// Opus sample rates libopus decodes at natively.
pub const OPUS_RATES: [u32; 5] = [8_000, 12_000, 16_000, 24_000, 48_000];

/// An audio codec and its sample rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum Codec {
    /// Opus at one of [`OPUS_RATES`].
    Opus { rate: u32 },
    /// 16-bit little-endian PCM at 8 kHz.
    Pcm8,
    /// 16-bit little-endian PCM at 16 kHz.
    Pcm16,
}

impl Codec {
    /// Opus at `rate`, if libopus supports that rate.
    pub fn opus(rate: u32) -> Option<Codec> {
        OPUS_RATES.contains(&rate).then_some(Codec::Opus { rate })
    }

    pub fn sample_rate(&self) -> u32 {
        match self {
            Codec::Opus { rate } => *rate,
            Codec::Pcm8 => 8_000,
            Codec::Pcm16 => 16_000,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Codec::Opus { .. } => "opus",
            Codec::Pcm8 => "pcm8",
            Codec::Pcm16 => "pcm16",
        }
    }

    pub fn is_opus(&self) -> bool {
        matches!(self, Codec::Opus { .. })
    }
}

/// A streaming decoder for one codec.
pub enum Decoder {
    Opus { dec: OpusDecoder },
    Pcm { carry: Option<u8> },
}

impl Decoder {
    pub fn new(codec: Codec) -> Result<Decoder, DecodeError> {
        match codec {
            Codec::Opus { rate } => Ok(Decoder::Opus {
                dec: OpusDecoder::new(rate)?,
            }),
            Codec::Pcm8 | Codec::Pcm16 => Ok(Decoder::Pcm { carry: None }),
        }
    }

    /// Decode one payload (an Opus packet, or any run of PCM bytes), appending samples to `out`.
    /// Returns the number of samples appended.
    pub fn decode(&mut self, payload: &[u8], out: &mut Vec<f32>) -> Result<usize, DecodeError> {
        match self {
            Decoder::Opus { dec } => dec.decode(payload, out),
            Decoder::Pcm { carry } => Ok(decode_pcm16le(carry, payload, out)),
        }
    }
}

/// 16-bit LE PCM to f32; an odd trailing byte is carried into the next payload.
fn decode_pcm16le(carry: &mut Option<u8>, mut bytes: &[u8], out: &mut Vec<f32>) -> usize {
    let before = out.len();
    if let Some(lo) = carry.take() {
        match bytes.split_first() {
            Some((&hi, rest)) => {
                out.push(f32::from(i16::from_le_bytes([lo, hi])) / 32768.0);
                bytes = rest;
            }
            None => {
                *carry = Some(lo);
                return 0;
            }
        }
    }
    let pairs = bytes.chunks_exact(2);
    if let [last] = pairs.remainder() {
        *carry = Some(*last);
    }
    out.extend(pairs.map(|p| f32::from(i16::from_le_bytes([p[0], p[1]])) / 32768.0));
    out.len() - before
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pcm_carries_an_odd_byte_across_payloads() {
        let mut d = Decoder::new(Codec::Pcm16).unwrap();
        let mut out = Vec::new();
        let v: i16 = -12345;
        let b = v.to_le_bytes();
        assert_eq!(d.decode(&[0, 0, b[0]], &mut out).unwrap(), 1);
        assert_eq!(d.decode(&[b[1]], &mut out).unwrap(), 1);
        assert_eq!(out, vec![0.0, f32::from(v) / 32768.0]);
    }

    #[test]
    fn random_bytes_as_opus_are_a_packet_error_not_a_panic() {
        let mut d = Decoder::new(Codec::opus(16_000).unwrap()).unwrap();
        let mut out = Vec::new();
        let mut bad = 0;
        let mut seed = 0x1234_5678u32;
        for len in 1..200usize {
            let pkt: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 17;
                    seed ^= seed << 5;
                    seed as u8
                })
                .collect();
            if d.decode(&pkt, &mut out).is_err() {
                bad += 1;
            }
        }
        assert!(bad > 0, "some random packets must be rejected");
    }

    #[test]
    fn opus_roundtrip_at_every_rate() {
        for rate in OPUS_RATES {
            let mut enc =
                opus::Encoder::new(rate, opus::Channels::Mono, opus::Application::Voip).unwrap();
            let frame = (rate / 100) as usize;
            let pcm: Vec<i16> = (0..frame)
                .map(|i| ((i as f32 * 0.1).sin() * 8000.0) as i16)
                .collect();
            let pkt = enc.encode_vec(&pcm, 4000).unwrap();
            let mut d = Decoder::new(Codec::opus(rate).unwrap()).unwrap();
            let mut out = Vec::new();
            assert_eq!(d.decode(&pkt, &mut out).unwrap(), frame);
        }
    }
}

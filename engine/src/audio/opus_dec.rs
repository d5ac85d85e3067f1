//! A libopus decoder whose state memory VoiceGate owns, with an exact shortcut for runs of repeated
//! packets.
//!
//! Devices send digital silence as a run of identical tiny packets (on the fixtures, `b0 ff fe`: a
//! 3-byte CELT silence frame, 28 % of all packets, in runs of up to 12,367). libopus still runs the
//! full synthesis for each one, about 60 % of the cost of a speech packet. Decoding is a pure
//! function of (decoder state, packet); so once decoding a packet leaves the state **bitwise
//! unchanged**, every further copy of that packet would produce the same samples and the same
//! state again. From then on the decoder replays the samples of that call instead of calling
//! libopus, until a different packet arrives. Nothing is approximated: the output is bit-identical
//! to decoding every packet (`tests::repeat_shortcut_is_bit_exact`); on the fixtures the state
//! reaches its fixed point after the 5th identical silence packet.
//!
//! Cost when it does not pay: a repeated short packet is decoded with a snapshot and comparison of
//! the ~18 KB state, at most `MAX_ATTEMPTS` times per run; other packets pay one short slice
//! comparison.

use opusic_sys as ffi;
use std::ffi::CStr;

/// Decoder errors. A `Packet` error concerns one packet only.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("opus decoder could not be created: {0}")]
    Init(String),
    #[error("corrupt opus packet: {0}")]
    Packet(String),
}

/// Only packets up to this many bytes are candidates (silence and DTX frames are 1–3 bytes).
const MAX_REPEAT_PACKET: usize = 8;
/// Snapshot-and-compare attempts per run of a repeated packet before giving up on that run.
const MAX_ATTEMPTS: u8 = 16;
/// Largest Opus frame: 120 ms at 48 kHz.
pub(crate) const MAX_OPUS_FRAME: usize = 5_760;

/// The decoder state lives in these blocks; 64-byte alignment is more than any field of libopus's
/// state needs (`opus_decoder_create` uses plain `malloc`).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Block([u8; 64]);

/// The run of repeated packets the decoder is in.
#[derive(Default)]
struct Repeat {
    /// The last short packet decoded (`len == 0`: the last packet was not a candidate).
    packet: [u8; MAX_REPEAT_PACKET],
    len: u8,
    /// Snapshot-and-compare attempts spent on this run.
    attempts: u8,
    /// Set once decoding `packet` left the state unchanged: the samples every further copy yields.
    fixed_point: Option<Box<[f32]>>,
}

impl Repeat {
    fn is_repeat_of(&self, payload: &[u8]) -> bool {
        self.len != 0 && &self.packet[..usize::from(self.len)] == payload
    }

    /// Start tracking `payload` (or stop tracking, if it is not a candidate).
    fn start(&mut self, payload: &[u8]) {
        self.attempts = 0;
        self.fixed_point = None;
        if !payload.is_empty() && payload.len() <= MAX_REPEAT_PACKET {
            self.packet[..payload.len()].copy_from_slice(payload);
            self.len = payload.len() as u8;
        } else {
            self.len = 0;
        }
    }
}

thread_local! {
    /// Decoded samples, one buffer per thread rather than one per decoder (a live server holds a
    /// decoder per stream).
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// The state before a call, for the fixed-point comparison.
    static SNAPSHOT: std::cell::RefCell<Vec<Block>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A mono libopus decoder.
pub struct OpusDecoder {
    state: Box<[Block]>,
    /// `opus_decoder_get_size(1)`: the bytes of `state` libopus uses.
    size: usize,
    repeat: Repeat,
}

fn opus_error(code: i32) -> String {
    // SAFETY: `opus_strerror` returns a pointer to a static NUL-terminated string for any code.
    let msg = unsafe { CStr::from_ptr(ffi::opus_strerror(code)) };
    msg.to_string_lossy().into_owned()
}

impl OpusDecoder {
    /// A mono decoder producing samples at `rate` (one of 8, 12, 16, 24, 48 kHz).
    pub fn new(rate: u32) -> Result<OpusDecoder, DecodeError> {
        // SAFETY: a pure size query.
        let size = unsafe { ffi::opus_decoder_get_size(1) };
        let size = usize::try_from(size)
            .ok()
            .filter(|&s| s > 0)
            .ok_or_else(|| DecodeError::Init("libopus reported no decoder size".into()))?;
        let rate_c = i32::try_from(rate).map_err(|_| DecodeError::Init(format!("rate {rate}")))?;
        let mut state = vec![Block([0; 64]); size.div_ceil(64)].into_boxed_slice();
        // SAFETY: `state` is at least `opus_decoder_get_size(1)` bytes, 64-byte aligned, and owned by
        // the returned decoder for as long as libopus may use it (it keeps no pointer past a call).
        let rc = unsafe { ffi::opus_decoder_init(state.as_mut_ptr().cast(), rate_c, 1) };
        if rc != ffi::OPUS_OK {
            return Err(DecodeError::Init(opus_error(rc)));
        }
        Ok(OpusDecoder {
            state,
            size,
            repeat: Repeat::default(),
        })
    }

    fn state_bytes(&self) -> &[u8] {
        // SAFETY: `state` spans at least `size` initialised bytes (zeroed at creation).
        unsafe { std::slice::from_raw_parts(self.state.as_ptr().cast::<u8>(), self.size) }
    }

    /// One libopus call into `scratch` (which must hold `MAX_OPUS_FRAME` samples).
    fn decode_raw(&mut self, payload: &[u8], scratch: &mut [f32]) -> Result<usize, DecodeError> {
        let len = i32::try_from(payload.len())
            .map_err(|_| DecodeError::Packet("packet too long".into()))?;
        debug_assert!(scratch.len() >= MAX_OPUS_FRAME);
        // SAFETY: `state` was initialised by `opus_decoder_init`; `payload` is valid for `len` bytes;
        // `scratch` has room for `MAX_OPUS_FRAME` samples, the frame size passed (mono).
        let n = unsafe {
            ffi::opus_decode_float(
                self.state.as_mut_ptr().cast(),
                payload.as_ptr(),
                len,
                scratch.as_mut_ptr(),
                MAX_OPUS_FRAME as i32,
                0,
            )
        };
        usize::try_from(n).map_err(|_| DecodeError::Packet(opus_error(n)))
    }

    /// Decode one packet, appending its samples to `out`; returns how many.
    pub fn decode(&mut self, payload: &[u8], out: &mut Vec<f32>) -> Result<usize, DecodeError> {
        if self.repeat.is_repeat_of(payload) {
            if let Some(samples) = &self.repeat.fixed_point {
                out.extend_from_slice(samples);
                return Ok(samples.len());
            }
        } else {
            self.repeat.start(payload);
        }
        let probe = self.repeat.len != 0 && self.repeat.attempts < MAX_ATTEMPTS;
        SCRATCH.with_borrow_mut(|scratch| {
            scratch.resize(MAX_OPUS_FRAME, 0.0);
            if !probe {
                let n = self.decode_raw(payload, scratch)?;
                out.extend_from_slice(&scratch[..n]);
                return Ok(n);
            }
            SNAPSHOT.with_borrow_mut(|snap| {
                snap.clear();
                snap.extend_from_slice(&self.state);
                self.repeat.attempts += 1;
                let n = self.decode_raw(payload, scratch)?;
                // SAFETY: `snap` is a copy of `state`, so it spans `size` initialised bytes too.
                let before =
                    unsafe { std::slice::from_raw_parts(snap.as_ptr().cast::<u8>(), self.size) };
                if before == self.state_bytes() {
                    self.repeat.fixed_point = Some(scratch[..n].into());
                }
                out.extend_from_slice(&scratch[..n]);
                Ok(n)
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture_packets(name: &str) -> Vec<Vec<u8>> {
        use crate::audio::container::{MAX_OPUS_RECORD, Next, RecordReader};
        let path = format!("{}/../fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
        let bytes = std::fs::read(path).unwrap();
        let mut r = RecordReader::new(bytes.as_slice(), MAX_OPUS_RECORD);
        let mut buf = Vec::new();
        let mut out = Vec::new();
        while let Ok(Next::Record { .. }) = r.next_record(&mut buf) {
            out.push(buf.clone());
        }
        out
    }

    /// Decode with libopus for every packet, through the `opus` crate (no shortcut).
    fn reference(packets: &[Vec<u8>]) -> Vec<f32> {
        let mut d = opus::Decoder::new(16_000, opus::Channels::Mono).unwrap();
        let mut buf = vec![0.0; MAX_OPUS_FRAME];
        let mut out = Vec::new();
        for p in packets {
            if let Ok(n) = d.decode_float(p, &mut buf, false) {
                out.extend_from_slice(&buf[..n]);
            }
        }
        out
    }

    #[test]
    fn repeat_shortcut_is_bit_exact() {
        let mut skipped_any = false;
        for i in 1..=12 {
            let packets = fixture_packets(&format!("d{i:02}.bin"));
            let mut d = OpusDecoder::new(16_000).unwrap();
            let mut out = Vec::new();
            let mut replayed = 0;
            for p in &packets {
                let was_fixed = d.repeat.is_repeat_of(p) && d.repeat.fixed_point.is_some();
                d.decode(p, &mut out).unwrap();
                replayed += usize::from(was_fixed);
            }
            let want = reference(&packets);
            assert_eq!(out.len(), want.len(), "d{i:02}");
            let same = out
                .iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "d{i:02}: samples differ from decoding every packet");
            skipped_any |= replayed > 0;
        }
        assert!(
            skipped_any,
            "the fixtures' silence runs must reach a fixed point"
        );
    }

    #[test]
    fn a_different_packet_ends_the_replay() {
        let packets = fixture_packets("d01.bin");
        let silence = packets
            .iter()
            .find(|p| p.len() <= MAX_REPEAT_PACKET)
            .cloned()
            .expect("a silence packet in d01");
        let speech = packets.iter().find(|p| p.len() > 20).cloned().unwrap();
        let mut seq = vec![speech.clone(); 3];
        seq.extend(std::iter::repeat_n(silence.clone(), 20));
        seq.push(speech.clone());
        seq.extend(std::iter::repeat_n(silence, 20));
        seq.push(speech);
        let mut d = OpusDecoder::new(16_000).unwrap();
        let mut out = Vec::new();
        for p in &seq {
            d.decode(p, &mut out).unwrap();
        }
        let want = reference(&seq);
        assert!(
            out.iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits())
        );
        assert_eq!(out.len(), want.len());
    }

    #[test]
    fn corrupt_repeated_packets_stay_errors() {
        let mut d = OpusDecoder::new(16_000).unwrap();
        let mut out = Vec::new();
        // A code-3 TOC with no frame-count byte is malformed.
        for _ in 0..40 {
            assert!(d.decode(&[0x03], &mut out).is_err());
        }
        assert!(out.is_empty());
        assert!(d.repeat.fixed_point.is_none());
    }

    #[test]
    fn bad_rate_is_an_init_error() {
        assert!(matches!(
            OpusDecoder::new(44_100),
            Err(DecodeError::Init(_))
        ));
    }
}

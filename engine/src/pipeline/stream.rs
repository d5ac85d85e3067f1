//! The speech pipeline shared by offline files and live sessions: decode → resample → VAD → detector.
//!
//! Push payloads (Opus packets or PCM bytes) or samples; speech events come out. Memory is bounded by
//! one VAD batch (about a second of audio) whatever the stream's length.

use std::sync::Arc;

use crate::audio::codec::{Codec, DecodeError, Decoder};
use crate::audio::detector::{DetectorParams, SpeechDetector, SpeechEvent};
use crate::audio::resample::{ResampleError, Resampler, TARGET_RATE};
use crate::audio::segments::MergeRules;
use crate::audio::simd::clear_upper_simd_state;
use crate::audio::vad::{SileroModel, VadError, VadStream, WindowProb};
use crate::pipeline::tap::AudioTap;

/// Tunables of the speech pipeline.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PipelineConfig {
    pub detector: DetectorParams,
    /// Windows with RMS below this level (dBFS) skip the model as certain silence; `None` runs every window.
    pub gate_dbfs: Option<f32>,
    /// STT merge rules, in samples at 16 kHz.
    pub merge: MergeRules,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            detector: DetectorParams::default(),
            gate_dbfs: Some(-50.0),
            merge: MergeRules::reference(u64::from(TARGET_RATE)),
        }
    }
}

/// A failure that stops a stream (a corrupt packet does not: it is counted).
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    Resample(#[from] ResampleError),
    #[error(transparent)]
    Vad(#[from] VadError),
}

impl PipelineError {
    pub fn code(&self) -> &'static str {
        match self {
            PipelineError::Decode(_) => "decoder_failed",
            PipelineError::Resample(_) => "resampler_failed",
            PipelineError::Vad(_) => "vad_failed",
        }
    }
}

/// One stream's pipeline.
pub struct SpeechPipeline {
    codec_rate: u32,
    decoder: Option<Decoder>,
    resampler: Option<Resampler>,
    vad: VadStream,
    detector: SpeechDetector,
    native: Vec<f32>,
    at16: Vec<f32>,
    probs: Vec<WindowProb>,
    /// Samples decoded at the codec's rate.
    decoded: u64,
    packets: u64,
    corrupt_packets: u64,
    /// Sum of finished speech runs, in samples at 16 kHz.
    speech: u64,
    /// The recent 16 kHz audio, kept only for a session with a speech-to-text provider.
    tap: Option<AudioTap>,
}

impl SpeechPipeline {
    /// A pipeline for payloads of `codec`.
    pub fn for_codec(
        codec: Codec,
        cfg: &PipelineConfig,
        model: Arc<SileroModel>,
    ) -> Result<Self, PipelineError> {
        let mut p = Self::for_samples(codec.sample_rate(), cfg, model)?;
        p.decoder = Some(Decoder::new(codec)?);
        Ok(p)
    }

    /// A pipeline fed with already decoded mono samples at `rate`.
    pub fn for_samples(
        rate: u32,
        cfg: &PipelineConfig,
        model: Arc<SileroModel>,
    ) -> Result<Self, PipelineError> {
        let resampler = if rate == TARGET_RATE {
            None
        } else {
            Some(Resampler::new(rate)?)
        };
        Ok(SpeechPipeline {
            codec_rate: rate,
            decoder: None,
            resampler,
            vad: VadStream::new(model, cfg.gate_dbfs),
            detector: SpeechDetector::new(cfg.detector),
            // Grown to what the largest payload needs (a 10 ms packet: 160 samples), not 16 KB each up front.
            native: Vec::new(),
            at16: Vec::new(),
            probs: Vec::with_capacity(64),
            decoded: 0,
            packets: 0,
            corrupt_packets: 0,
            speech: 0,
            tap: None,
        })
    }

    /// Keeps the last `capacity` samples at 16 kHz from now on (see [`AudioTap`]).
    pub fn enable_tap(&mut self, capacity: usize) {
        self.tap = Some(AudioTap::new(capacity));
    }

    /// The recent audio, when [`Self::enable_tap`] was called.
    pub fn tap(&self) -> Option<&AudioTap> {
        self.tap.as_ref()
    }

    /// Decode one payload and run what it completes. A corrupt Opus packet is counted and skipped.
    pub fn push_payload(
        &mut self,
        payload: &[u8],
        events: &mut Vec<SpeechEvent>,
    ) -> Result<(), PipelineError> {
        self.packets += 1;
        let Some(decoder) = self.decoder.as_mut() else {
            return Ok(());
        };
        self.native.clear();
        match decoder.decode(payload, &mut self.native) {
            Ok(_) => {}
            Err(DecodeError::Packet(_)) => {
                self.corrupt_packets += 1;
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        }
        let native = std::mem::take(&mut self.native);
        let r = self.push_native(&native, events);
        self.native = native;
        r
    }

    /// Push decoded samples at the pipeline's rate.
    pub fn push_samples(
        &mut self,
        samples: &[f32],
        events: &mut Vec<SpeechEvent>,
    ) -> Result<(), PipelineError> {
        self.push_native(samples, events)
    }

    fn push_native(
        &mut self,
        samples: &[f32],
        events: &mut Vec<SpeechEvent>,
    ) -> Result<(), PipelineError> {
        self.decoded += samples.len() as u64;
        let before = self.vad.counts().0;
        match self.resampler.as_mut() {
            None => {
                if let Some(tap) = self.tap.as_mut() {
                    tap.push(samples);
                }
                self.vad.push(samples, &mut self.probs)?;
            }
            Some(r) => {
                self.at16.clear();
                r.push(samples, &mut self.at16)?;
                if let Some(tap) = self.tap.as_mut() {
                    tap.push(&self.at16);
                }
                self.vad.push(&self.at16, &mut self.probs)?;
            }
        }
        if self.vad.counts().0 != before {
            clear_upper_simd_state();
        }
        self.drain_probs(events);
        Ok(())
    }

    fn drain_probs(&mut self, events: &mut Vec<SpeechEvent>) {
        let first = events.len();
        for w in self.probs.drain(..) {
            self.detector.push(w, events);
        }
        self.count_ended(&events[first..]);
    }

    fn count_ended(&mut self, new: &[SpeechEvent]) {
        for e in new {
            if let SpeechEvent::Ended(span) = e {
                self.speech += span.len();
            }
        }
    }

    /// Run every complete window now (live sessions call this to keep latency low).
    pub fn flush(&mut self, events: &mut Vec<SpeechEvent>) -> Result<(), PipelineError> {
        self.vad.flush(&mut self.probs)?;
        clear_upper_simd_state();
        self.drain_probs(events);
        Ok(())
    }

    /// End of stream: flush the resampler and the VAD, close any open run.
    pub fn finish(&mut self, events: &mut Vec<SpeechEvent>) -> Result<(), PipelineError> {
        if let Some(r) = self.resampler.as_mut() {
            self.at16.clear();
            r.finish(&mut self.at16)?;
            if let Some(tap) = self.tap.as_mut() {
                tap.push(&self.at16);
            }
            self.vad.push(&self.at16, &mut self.probs)?;
        }
        self.vad.finish(&mut self.probs)?;
        clear_upper_simd_state();
        let first = events.len();
        for w in self.probs.drain(..) {
            self.detector.push(w, events);
        }
        self.detector.finish(events);
        self.count_ended(&events[first..]);
        Ok(())
    }

    /// Samples decoded so far, at the codec's rate.
    pub fn decoded_samples(&self) -> u64 {
        self.decoded
    }

    pub fn codec_rate(&self) -> u32 {
        self.codec_rate
    }

    /// Finished speech so far, in samples at 16 kHz.
    pub fn speech_samples(&self) -> u64 {
        self.speech
    }

    /// Speech so far that is certain to be counted: finished runs plus the committed part of an open run
    /// ([`SpeechDetector::committed_open`]). Realtime meters this every second, so minutes of continuous
    /// speech are metered as they happen; it equals [`speech_samples`](Self::speech_samples) after `finish`.
    pub fn speech_samples_committed(&self) -> u64 {
        self.speech + self.detector.committed_open()
    }

    /// Payloads pushed, and those skipped as corrupt.
    pub fn packet_counts(&self) -> (u64, u64) {
        (self.packets, self.corrupt_packets)
    }

    /// VAD windows run through the model, and skipped by the pre-gate.
    pub fn window_counts(&self) -> (u64, u64) {
        self.vad.counts()
    }

    pub fn in_speech(&self) -> bool {
        self.detector.in_speech()
    }
}

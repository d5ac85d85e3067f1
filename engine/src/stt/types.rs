//! The plain data that crosses the provider seam: audio in, transcripts and events out.

use crate::time::samples_to_ms;

/// Every provider takes 16 kHz mono audio; stream-time offsets are counted in samples at this rate.
pub const SAMPLE_RATE: u32 = 16_000;

/// Samples of one speech run, in either sample format the pipeline holds.
#[derive(Debug, Clone, Copy)]
pub enum Pcm<'a> {
    /// 16-bit linear PCM.
    I16(&'a [i16]),
    /// Floats in [-1, 1] (the decoder's and the VAD's format).
    F32(&'a [f32]),
}

impl Pcm<'_> {
    pub fn len(&self) -> usize {
        match self {
            Pcm::I16(s) => s.len(),
            Pcm::F32(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The samples from `from` on (none when `from` is past the end).
    pub fn tail(&self, from: usize) -> Pcm<'_> {
        match self {
            Pcm::I16(s) => Pcm::I16(s.get(from..).unwrap_or(&[])),
            Pcm::F32(s) => Pcm::F32(s.get(from..).unwrap_or(&[])),
        }
    }

    /// Appends the samples as floats in [-1, 1].
    pub fn extend_f32(&self, out: &mut Vec<f32>) {
        match self {
            Pcm::I16(s) => out.extend(s.iter().map(|&v| f32::from(v) / 32_768.0)),
            Pcm::F32(s) => out.extend_from_slice(s),
        }
    }

    /// Appends the samples as 16-bit PCM (clamped, rounded).
    pub fn extend_i16(&self, out: &mut Vec<i16>) {
        match self {
            Pcm::I16(s) => out.extend_from_slice(s),
            Pcm::F32(s) => out.extend(s.iter().map(|&v| f32_to_i16(v))),
        }
    }
}

/// One float sample as 16-bit PCM, clamped and rounded.
pub fn f32_to_i16(v: f32) -> i16 {
    // The clamp keeps the product inside i16's range, so the cast cannot wrap.
    (v.clamp(-1.0, 1.0) * 32_767.0).round() as i16
}

/// Stream-time milliseconds of a stream-time sample offset (rounded).
pub fn sample_to_ms(sample: u64) -> u64 {
    samples_to_ms(sample, SAMPLE_RATE)
}

/// Whether a result may still change (`Interim`) or is the provider's last word on its audio (`Final`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResultKind {
    Interim,
    Final,
}

/// One word with its times, when the provider gives them.
#[derive(Debug, Clone, PartialEq)]
pub struct Word {
    pub text: String,
    pub start_ms: u64,
    pub end_ms: u64,
    pub confidence: Option<f32>,
    pub speaker: Option<u32>,
}

/// One transcript of a stretch of audio. Times are stream time: milliseconds since the stream's (or the
/// batch's) first sample, the same clock the session meters with.
#[derive(Debug, Clone, PartialEq)]
pub struct SttResult {
    pub kind: ResultKind,
    pub text: String,
    pub start_ms: u64,
    pub end_ms: u64,
    /// 0..=1, when the provider gives one (Moonshine does not).
    pub confidence: Option<f32>,
    /// Word timings, when the provider gives them (Moonshine does not).
    pub words: Vec<Word>,
    /// Diarized speaker index, when the provider gives one.
    pub speaker: Option<u32>,
}

/// What a streaming provider sends back to its session, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum SttEvent {
    Result(SttResult),
    /// The provider failed on some audio (that audio gets no transcript). `reason` is an [`SttError::code`].
    Error {
        reason: &'static str,
        message: String,
    },
    /// Transcription is falling behind: this stream's audio waited `queued_ms` for the engine (more than the
    /// provider's lateness threshold). Results still come, late.
    Behind {
        queued_ms: u64,
    },
    /// Every result of a closed stream has been sent: nothing follows.
    Closed,
}

/// Where a provider's failure came from. `code()` is the stable, low-cardinality word used in metrics,
/// logs and client events.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SttError {
    /// The provider's queue was full: the audio was not sent (counted; the caller decides what to tell).
    /// A batch is neither sent nor charged; on a stream this is audio the provider took earlier (and the
    /// session charged then) and dropped now.
    #[error("the speech-to-text queue is full: {dropped_samples} samples were not transcribed")]
    QueueFull { dropped_samples: u64 },
    /// The provider had no room for the audio of this push: `samples` of it were not taken. None of it
    /// was sent, so none of it is charged (the session gives its charge back); counted as dropped
    /// (`queue_full`). Audio a provider took before is never refused this way.
    #[error("the speech-to-text queue is full: {samples} samples were not taken")]
    Refused { samples: u64 },
    /// The stream was closed or the provider shut down.
    #[error("the speech-to-text stream is closed")]
    Closed,
    /// The local engine is not installed where it was looked for.
    #[error("the local speech-to-text engine is not installed: {0}")]
    NotInstalled(String),
    /// The engine or its model could not be loaded.
    #[error("the speech-to-text engine could not be loaded: {0}")]
    LoadFailed(String),
    /// The engine returned an error for one chunk of audio.
    #[error("transcription failed: {0}")]
    Engine(String),
    /// The provider refused the request as unauthorised (bad or missing key).
    #[error("the speech-to-text provider refused the key: {0}")]
    Unauthorized(String),
    /// The provider's account cannot pay (e.g. HTTP 402).
    #[error("the speech-to-text provider's account cannot pay: {0}")]
    Payment(String),
    /// The provider asked us to slow down (HTTP 429).
    #[error("the speech-to-text provider is rate limiting: {0}")]
    RateLimited(String),
    /// The provider could not be reached or dropped the connection.
    #[error("the speech-to-text provider could not be reached: {0}")]
    Network(String),
    /// The provider answered something the protocol does not allow.
    #[error("the speech-to-text provider answered unexpectedly: {0}")]
    Protocol(String),
    /// The request itself is unusable (e.g. empty audio where some is required).
    #[error("bad speech-to-text request: {0}")]
    BadRequest(String),
}

impl SttError {
    pub fn code(&self) -> &'static str {
        match self {
            SttError::QueueFull { .. } | SttError::Refused { .. } => "queue_full",
            SttError::Closed => "closed",
            SttError::NotInstalled(_) => "not_installed",
            SttError::LoadFailed(_) => "load_failed",
            SttError::Engine(_) => "engine",
            SttError::Unauthorized(_) => "unauthorized",
            SttError::Payment(_) => "payment",
            SttError::RateLimited(_) => "rate_limited",
            SttError::Network(_) => "network",
            SttError::Protocol(_) => "protocol",
            SttError::BadRequest(_) => "bad_request",
        }
    }

    /// Whether trying the same request again later can succeed.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            SttError::QueueFull { .. }
                | SttError::Refused { .. }
                | SttError::Engine(_)
                | SttError::RateLimited(_)
                | SttError::Network(_)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float_samples_round_trip_through_i16_within_one_step() {
        let floats = [-1.5f32, -1.0, -0.5, 0.0, 0.25, 1.0, 2.0];
        let mut ints = Vec::new();
        Pcm::F32(&floats).extend_i16(&mut ints);
        assert_eq!(
            ints,
            vec![-32_767, -32_767, -16_384, 0, 8_192, 32_767, 32_767]
        );
        let mut back = Vec::new();
        Pcm::I16(&ints).extend_f32(&mut back);
        for (a, b) in floats.iter().zip(&back) {
            assert!((a.clamp(-1.0, 1.0) - b).abs() < 1e-4, "{a} -> {b}");
        }
    }

    #[test]
    fn sample_offsets_become_rounded_milliseconds() {
        assert_eq!(sample_to_ms(0), 0);
        assert_eq!(sample_to_ms(16), 1);
        assert_eq!(sample_to_ms(7), 0);
        assert_eq!(sample_to_ms(8), 1);
        assert_eq!(sample_to_ms(160_000), 10_000);
    }

    #[test]
    fn only_transient_failures_are_retryable() {
        assert!(SttError::RateLimited(String::new()).retryable());
        assert!(SttError::QueueFull { dropped_samples: 1 }.retryable());
        assert!(!SttError::Unauthorized(String::new()).retryable());
        assert!(!SttError::Payment(String::new()).retryable());
        assert_eq!(SttError::Payment(String::new()).code(), "payment");
    }
}

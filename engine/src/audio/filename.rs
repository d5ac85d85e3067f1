//! Device file names: `audio_<device>_<codec>_<rate>_<channels>_…_fs<N>_<timestamp>.bin`.
//!
//! The codec, sample rate and Opus frame size come from the name; the recording's start time is the
//! integer after the last `_` (seconds, or milliseconds when above 1e10). Names are client-chosen, so the
//! timestamp is bounded: not before 2024-01-01 and not after now plus the allowed clock skew.

use super::codec::Codec;

/// 2024-01-01T00:00:00Z: no device recording is older.
pub const MIN_TIMESTAMP_S: u64 = 1_704_067_200;
/// Allowed clock skew of a device into the future.
pub const MAX_SKEW_S: u64 = 600;
/// Values above this are milliseconds.
const MS_THRESHOLD: u64 = 10_000_000_000;

/// What a file name says about its audio.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSpec {
    pub codec: Codec,
    /// Opus frame size in samples at `codec`'s rate, from `_fs<N>` (informational: decoding sizes itself).
    pub frame_size: u32,
    /// The device named `limitless` anywhere in the name.
    pub limitless: bool,
    /// Notes about the name that did not stop it being used.
    pub warnings: Vec<String>,
}

/// A name that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("unknown codec `{0}` in the file name (expected opus, pcm8 or pcm16)")]
    UnknownCodec(String),
    #[error(
        "unsupported Opus sample rate {0} Hz in the file name (expected 8000, 12000, 16000, 24000 or 48000)"
    )]
    BadOpusRate(u32),
    #[error("the file name has no `_<timestamp>` before its extension")]
    MissingTimestamp,
    #[error("the file name's timestamp `{0}` is not an integer")]
    InvalidTimestamp(String),
    #[error("the file name's timestamp {0} is before 2024-01-01")]
    TimestampTooOld(u64),
    #[error("the file name's timestamp {0} is in the future")]
    TimestampInFuture(u64),
    #[error("the file name must end with .bin")]
    NotBin,
    #[error("the file name holds a control character (NUL, tab, newline, …)")]
    ControlCharacter,
}

impl NameError {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            NameError::UnknownCodec(_) => "unknown_codec",
            NameError::BadOpusRate(_) => "unsupported_sample_rate",
            NameError::MissingTimestamp => "missing_timestamp",
            NameError::InvalidTimestamp(_) => "invalid_timestamp",
            NameError::TimestampTooOld(_) => "timestamp_too_old",
            NameError::TimestampInFuture(_) => "timestamp_in_future",
            NameError::NotBin => "invalid_file_format",
            NameError::ControlCharacter => "invalid_file_name",
        }
    }
}

fn basename(name: &str) -> &str {
    name.rsplit(['/', '\\']).next().unwrap_or(name)
}

/// The codec and frame size a name describes. A name with no codec is Opus 16 kHz, frame 160.
pub fn parse_spec(name: &str) -> Result<FileSpec, NameError> {
    let base = basename(name);
    let stem = base.split('.').next().unwrap_or(base);
    let lower = stem.to_ascii_lowercase();
    let tokens: Vec<&str> = lower.split('_').collect();
    let mut warnings = Vec::new();

    let codec_at = tokens
        .iter()
        .position(|t| matches!(*t, "opus" | "pcm8" | "pcm16"));
    let rate_after = |i: usize| tokens.get(i + 1).and_then(|t| t.parse::<u32>().ok());
    let codec = match codec_at {
        Some(i) if tokens[i] == "opus" => {
            let rate = rate_after(i).unwrap_or(16_000);
            Codec::opus(rate).ok_or(NameError::BadOpusRate(rate))?
        }
        Some(i) => {
            let codec = if tokens[i] == "pcm8" {
                Codec::Pcm8
            } else {
                Codec::Pcm16
            };
            if let Some(rate) = rate_after(i).filter(|&r| r != codec.sample_rate()) {
                warnings.push(format!(
                    "the name says {rate} Hz but {} is {} Hz 16-bit PCM; decoded as {}",
                    codec.name(),
                    codec.sample_rate(),
                    codec.name()
                ));
            }
            codec
        }
        None => {
            // `audio_<device>_<codec>_<rate>_…`: a word where the codec goes, followed by a rate, is a codec
            // we do not know, not a missing one.
            if tokens.len() >= 4 && tokens[0] == "audio" && tokens[3].parse::<u32>().is_ok() {
                let word = tokens[2];
                if !word.is_empty()
                    && word.chars().all(|c| c.is_ascii_alphanumeric())
                    && word.parse::<u64>().is_err()
                {
                    return Err(NameError::UnknownCodec(word.to_string()));
                }
            }
            Codec::opus(16_000).ok_or(NameError::BadOpusRate(16_000))?
        }
    };
    let frame_size = tokens
        .iter()
        .filter_map(|t| t.strip_prefix("fs").and_then(|n| n.parse::<u32>().ok()))
        .next_back()
        .unwrap_or(160);
    Ok(FileSpec {
        codec,
        frame_size,
        limitless: lower.contains("limitless"),
        warnings,
    })
}

/// The recording's start time in unix milliseconds, checked against `now_s` (unix seconds).
pub fn parse_timestamp_ms(name: &str, now_s: u64) -> Result<u64, NameError> {
    let base = basename(name);
    let (_, after) = base.rsplit_once('_').ok_or(NameError::MissingTimestamp)?;
    let digits = after.split('.').next().unwrap_or("");
    if digits.is_empty() {
        return Err(NameError::MissingTimestamp);
    }
    let value: u64 = digits
        .parse()
        .map_err(|_| NameError::InvalidTimestamp(digits.chars().take(32).collect()))?;
    let ms = if value > MS_THRESHOLD {
        value
    } else {
        value.saturating_mul(1000)
    };
    let secs = ms / 1000;
    if secs < MIN_TIMESTAMP_S {
        return Err(NameError::TimestampTooOld(value));
    }
    if secs > now_s.saturating_add(MAX_SKEW_S) {
        return Err(NameError::TimestampInFuture(value));
    }
    Ok(ms)
}

/// Full check for a metered sync file: `.bin`, a usable codec and a timestamp in range.
pub fn parse_sync_name(name: &str, now_s: u64) -> Result<(FileSpec, u64), NameError> {
    // Names end up in logs and in the answer; a control character is never part of a device's name.
    if name.chars().any(char::is_control) {
        return Err(NameError::ControlCharacter);
    }
    if !basename(name).to_ascii_lowercase().ends_with(".bin") {
        return Err(NameError::NotBin);
    }
    let spec = parse_spec(name)?;
    let ts = parse_timestamp_ms(name, now_s)?;
    Ok((spec, ts))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_780_000_000;

    #[test]
    fn a_control_character_anywhere_refuses_the_name() {
        for name in [
            "audio_omi\0_opus_16000_1_fs160_1779990000.bin",
            "audio_omi_opus_16000_1_fs160_1779990000.bin\0.bin",
            "audio\t_omi_opus_16000_1_fs160_1779990000.bin",
        ] {
            assert_eq!(
                parse_sync_name(name, NOW).err().map(|e| e.code()),
                Some("invalid_file_name"),
                "{name:?}"
            );
        }
    }

    #[test]
    fn omi_opus_name_gives_codec_rate_frame_size_and_timestamp() {
        let name = "audio_omi_opus_16000_1_fs160_1779990000.bin";
        let (spec, ts) = parse_sync_name(name, NOW).unwrap();
        assert_eq!(spec.codec, Codec::opus(16_000).unwrap());
        assert_eq!(spec.frame_size, 160);
        assert!(!spec.limitless);
        assert_eq!(ts, 1_779_990_000_000);
    }

    #[test]
    fn millisecond_timestamps_are_accepted() {
        assert_eq!(
            parse_timestamp_ms("x_1779990000123.bin", NOW),
            Ok(1_779_990_000_123)
        );
    }

    #[test]
    fn name_without_codec_is_opus_16k_frame_160() {
        let spec = parse_spec("clip.bin").unwrap();
        assert_eq!(spec.codec, Codec::opus(16_000).unwrap());
        assert_eq!(spec.frame_size, 160);
    }

    #[test]
    fn pcm8_is_16_bit_at_8k_and_a_conflicting_rate_is_a_warning() {
        let spec = parse_spec("audio_omi_pcm8_16000_1_1779990000.bin").unwrap();
        assert_eq!(spec.codec, Codec::Pcm8);
        assert_eq!(spec.warnings.len(), 1);
        assert_eq!(
            parse_spec("audio_omi_pcm16_16000_1_1779990000.bin")
                .unwrap()
                .codec,
            Codec::Pcm16
        );
    }

    #[test]
    fn opus_at_48k_with_fs960() {
        let spec = parse_spec("audio_dev_opus_48000_1_fs960_1779990000.bin").unwrap();
        assert_eq!(spec.codec, Codec::opus(48_000).unwrap());
        assert_eq!(spec.frame_size, 960);
    }

    #[test]
    fn unknown_codec_is_refused_with_its_name() {
        assert_eq!(
            parse_spec("audio_omi_aac_16000_1_1779990000.bin"),
            Err(NameError::UnknownCodec("aac".into()))
        );
        assert_eq!(
            parse_spec("audio_omi_opus_44100_1_1779990000.bin"),
            Err(NameError::BadOpusRate(44_100))
        );
    }

    #[test]
    fn limitless_anywhere_sets_the_source() {
        assert!(
            parse_spec("audio_Limitless_opus_16000_1_fs160_1779990000.bin")
                .unwrap()
                .limitless
        );
    }

    #[test]
    fn timestamp_before_2024_and_in_the_future_are_refused() {
        assert_eq!(
            parse_timestamp_ms("a_1700000000.bin", NOW),
            Err(NameError::TimestampTooOld(1_700_000_000))
        );
        assert_eq!(
            parse_timestamp_ms("a_1780000601.bin", NOW),
            Err(NameError::TimestampInFuture(1_780_000_601))
        );
        assert!(parse_timestamp_ms("a_1780000600.bin", NOW).is_ok());
        assert_eq!(
            parse_timestamp_ms("a_1704067200.bin", NOW),
            Ok(1_704_067_200_000)
        );
    }

    #[test]
    fn missing_or_garbage_timestamp_is_refused() {
        assert_eq!(
            parse_timestamp_ms("nounderscore.bin", NOW),
            Err(NameError::MissingTimestamp)
        );
        assert_eq!(
            parse_timestamp_ms("a_.bin", NOW),
            Err(NameError::MissingTimestamp)
        );
        assert_eq!(
            parse_timestamp_ms("a_12ab.bin", NOW),
            Err(NameError::InvalidTimestamp("12ab".into()))
        );
        assert_eq!(
            parse_timestamp_ms("a_99999999999999999999999.bin", NOW).map_err(|e| e.code()),
            Err("invalid_timestamp")
        );
        assert_eq!(
            parse_sync_name("a_1779990000.wav", NOW),
            Err(NameError::NotBin)
        );
    }
}

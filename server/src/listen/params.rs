//! The listen query parameters (the reference's names and defaults), validated at connect. A value the
//! server cannot serve is a [`ParamError`]: the socket is accepted, then closed with 1008 and its message.

use std::collections::HashMap;

use voicegate_engine::audio::codec::{Codec, OPUS_RATES};

/// `conversation_timeout` below this is raised to it (seconds).
pub const MIN_CONVERSATION_TIMEOUT_S: u64 = 120;
/// `conversation_timeout=-1`: 4 hours.
pub const UNLIMITED_CONVERSATION_TIMEOUT_S: u64 = 4 * 3_600;

/// Validated parameters of one listen session.
#[derive(Debug, Clone, PartialEq)]
pub struct ListenParams {
    pub language: String,
    pub codec: Codec,
    /// The codec name as asked (`opus_fs320` decodes like `opus`).
    pub codec_name: String,
    pub conversation_timeout_s: u64,
    pub source: String,
}

/// Why a session cannot start (close 1008 with this message).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParamError {
    #[error("The language is not supported, {0}")]
    Language(String),
    #[error("codec {0:?} is not supported (pcm8, pcm16, opus, opus_fs320)")]
    Codec(String),
    #[error("sample_rate {rate} is not supported for {codec} ({allowed})")]
    SampleRate {
        rate: String,
        codec: String,
        allowed: &'static str,
    },
    #[error("channels={0} is not supported (1)")]
    Channels(String),
    #[error("conversation_timeout {0:?} is not an integer number of seconds")]
    ConversationTimeout(String),
    #[error("the query string could not be parsed")]
    Query,
}

impl ListenParams {
    /// Parses the raw query string.
    pub fn from_query(query: &str) -> Result<ListenParams, ParamError> {
        let map: HashMap<String, String> =
            actix_web::web::Query::<HashMap<String, String>>::from_query(query)
                .map_err(|_| ParamError::Query)?
                .into_inner();
        Self::from_map(&map)
    }

    pub fn from_map(q: &HashMap<String, String>) -> Result<ListenParams, ParamError> {
        let get = |k: &str| q.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());
        let language = match get("language").unwrap_or("en") {
            "auto" => "multi".to_owned(),
            l if valid_language(l) => l.to_owned(),
            l => return Err(ParamError::Language(l.to_owned())),
        };
        let codec_name = get("codec").unwrap_or("pcm8").to_ascii_lowercase();
        let rate_raw = get("sample_rate");
        let rate = match rate_raw {
            None => None,
            Some(r) => Some(r.parse::<u32>().map_err(|_| ParamError::SampleRate {
                rate: r.to_owned(),
                codec: codec_name.clone(),
                allowed: "an integer in Hz",
            })?),
        };
        let bad_rate = |allowed| ParamError::SampleRate {
            rate: rate_raw.unwrap_or_default().to_owned(),
            codec: codec_name.clone(),
            allowed,
        };
        let codec = match codec_name.as_str() {
            // PCM is decoded at `sample_rate` (the reference's meaning); the codec name gives the default.
            "pcm8" | "pcm16" => {
                let default = if codec_name == "pcm8" { 8_000 } else { 16_000 };
                match rate.unwrap_or(default) {
                    8_000 => Codec::Pcm8,
                    16_000 => Codec::Pcm16,
                    _ => return Err(bad_rate("8000 or 16000")),
                }
            }
            "opus" | "opus_fs320" => {
                let r = rate.unwrap_or(8_000);
                Codec::opus(r).ok_or_else(|| bad_rate("8000, 12000, 16000, 24000 or 48000"))?
            }
            other => return Err(ParamError::Codec(other.to_owned())),
        };
        debug_assert!(!codec.is_opus() || OPUS_RATES.contains(&codec.sample_rate()));
        match get("channels").unwrap_or("1") {
            "1" => {}
            c => return Err(ParamError::Channels(c.to_owned())),
        }
        let conversation_timeout_s = match get("conversation_timeout") {
            None => MIN_CONVERSATION_TIMEOUT_S,
            Some(v) => match v.parse::<i64>() {
                Ok(-1) => UNLIMITED_CONVERSATION_TIMEOUT_S,
                Ok(n) => u64::try_from(n)
                    .unwrap_or(0)
                    .clamp(MIN_CONVERSATION_TIMEOUT_S, UNLIMITED_CONVERSATION_TIMEOUT_S),
                Err(_) => return Err(ParamError::ConversationTimeout(v.to_owned())),
            },
        };
        let source = get("source")
            .filter(|s| s.len() <= 32 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
            .unwrap_or("omi")
            .to_owned();
        Ok(ListenParams {
            language,
            codec,
            codec_name,
            conversation_timeout_s,
            source,
        })
    }
}

/// A BCP-47-ish tag (`en`, `pt-BR`, `zh-Hans`, `multi`): letters, digits and dashes, at most 16 bytes.
fn valid_language(l: &str) -> bool {
    !l.is_empty()
        && l.len() <= 16
        && l.as_bytes()[0].is_ascii_alphabetic()
        && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(q: &str) -> Result<ListenParams, ParamError> {
        ListenParams::from_query(q)
    }

    #[test]
    fn defaults_are_the_reference_ones() {
        let p = parse("").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p.codec, Codec::Pcm8);
        assert_eq!(p.language, "en");
        assert_eq!(p.conversation_timeout_s, 120);
        assert_eq!(p.source, "omi");
    }

    #[test]
    fn codecs_and_rates() {
        let ok = |q: &str| {
            parse(q)
                .map(|p| p.codec)
                .unwrap_or_else(|e| panic!("{q}: {e}"))
        };
        assert_eq!(
            ok("codec=opus&sample_rate=16000"),
            Codec::Opus { rate: 16_000 }
        );
        assert_eq!(
            ok("codec=opus&sample_rate=48000"),
            Codec::Opus { rate: 48_000 }
        );
        assert_eq!(
            ok("codec=opus_fs320&sample_rate=16000"),
            Codec::Opus { rate: 16_000 }
        );
        assert_eq!(ok("codec=pcm16&sample_rate=16000"), Codec::Pcm16);
        assert_eq!(ok("codec=pcm16"), Codec::Pcm16);
        assert_eq!(ok("codec=pcm8&sample_rate=16000"), Codec::Pcm16);
        assert!(matches!(parse("codec=aac"), Err(ParamError::Codec(c)) if c == "aac"));
        assert!(matches!(
            parse("codec=opus&sample_rate=44100"),
            Err(ParamError::SampleRate { .. })
        ));
        assert!(matches!(
            parse("codec=pcm16&sample_rate=22050"),
            Err(ParamError::SampleRate { .. })
        ));
        assert!(matches!(
            parse("codec=opus&sample_rate=abc"),
            Err(ParamError::SampleRate { .. })
        ));
    }

    #[test]
    fn timeout_language_channels() {
        let t = |q: &str| parse(q).map(|p| p.conversation_timeout_s);
        assert_eq!(t("conversation_timeout=-1"), Ok(4 * 3600));
        assert_eq!(t("conversation_timeout=30"), Ok(120));
        assert_eq!(t("conversation_timeout=600"), Ok(600));
        assert!(t("conversation_timeout=soon").is_err());
        assert_eq!(
            parse("language=auto").map(|p| p.language),
            Ok("multi".into())
        );
        assert!(matches!(
            parse("language=%3Cscript%3E"),
            Err(ParamError::Language(_))
        ));
        assert!(matches!(parse("channels=2"), Err(ParamError::Channels(_))));
    }
}

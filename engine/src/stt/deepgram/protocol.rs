//! Deepgram's live transcription protocol (`/v1/listen` over a websocket), as its documentation states it:
//!
//! - Connecting: query parameters choose the model, language and audio format (`encoding=linear16`,
//!   `sample_rate`, `channels`, `interim_results`); the key goes in `Authorization: Token <key>`
//!   (<https://developers.deepgram.com/reference/speech-to-text/listen-streaming>). A refused
//!   handshake is an HTTP status (401 bad key, 402 no balance left, 429 too many requests, 400 bad
//!   parameters; <https://developers.deepgram.com/docs/stt-troubleshooting-websocket-data-and-net-errors>,
//!   <https://developers.deepgram.com/reference/errors>).
//! - Audio goes as binary frames; control messages are JSON text frames:
//!   `KeepAlive` keeps an idle stream open (the server closes it after 10 s without audio or KeepAlive,
//!   error NET-0001; <https://developers.deepgram.com/docs/audio-keep-alive>), `Finalize` flushes what the
//!   server holds into final results, the last one marked `from_finalize`
//!   (<https://developers.deepgram.com/docs/finalize>), `CloseStream` asks for the last results, a
//!   `Metadata` message and the close (<https://developers.deepgram.com/docs/close-stream>).
//! - The server sends `Results` (`start` and `duration` in seconds of the audio this connection received,
//!   `is_final`, `speech_final`, `from_finalize`, `channel.alternatives[]` with `transcript`, `confidence`
//!   and `words[]`), `Metadata` (`request_id`, `duration`), and other types this client ignores
//!   (`SpeechStarted`, `UtteranceEnd`). A failure mid-stream is a close frame with a reason.
//!
//! The pre-recorded API (sync spans) is the same path over plain HTTP: `POST /v1/listen` with the audio as
//! the body and the same query parameters (`encoding` and `sample_rate` are required for headerless
//! audio; <https://developers.deepgram.com/docs/encoding>,
//! <https://developers.deepgram.com/docs/getting-started-with-pre-recorded-audio>); `utterances=true` asks
//! for the transcript cut into utterances (`results.utterances[]`: `start`, `end` in seconds of the
//! request's audio, `transcript`, `confidence`, `words`, `speaker`;
//! <https://developers.deepgram.com/docs/utterances>), beside the whole transcript in
//! `results.channels[].alternatives[]`. A refusal is the HTTP status with a JSON `err_code` / `err_msg`.

use serde::Deserialize;

use crate::stt::types::{SAMPLE_RATE, SttError};

pub const KEEP_ALIVE: &str = r#"{"type":"KeepAlive"}"#;
pub const FINALIZE: &str = r#"{"type":"Finalize"}"#;
pub const CLOSE_STREAM: &str = r#"{"type":"CloseStream"}"#;

/// The live endpoint for `base` (`wss://api.deepgram.com`; `https://` and `http://` become `wss://` and
/// `ws://`), asking for 16 kHz mono 16-bit PCM and interim results.
pub fn listen_url(base: &str, model: &str, language: &str, interim_results: bool) -> String {
    let base = with_scheme(base, ("https://", "wss://"), ("http://", "ws://"));
    format!(
        "{base}/v1/listen?model={}&language={}&encoding=linear16&sample_rate={SAMPLE_RATE}&channels=1&interim_results={interim_results}&punctuate=true",
        encode(model),
        encode(language)
    )
}

/// The pre-recorded endpoint for `base` (`wss://` and `ws://` become `https://` and `http://`), for headerless
/// 16 kHz mono 16-bit PCM cut into utterances.
pub fn prerecorded_url(base: &str, model: &str, language: &str) -> String {
    let base = with_scheme(base, ("wss://", "https://"), ("ws://", "http://"));
    format!(
        "{base}/v1/listen?model={}&language={}&encoding=linear16&sample_rate={SAMPLE_RATE}&channels=1&punctuate=true&utterances=true",
        encode(model),
        encode(language)
    )
}

/// `base` without trailing slashes, its secure and plain schemes swapped as `(from, to)` says.
fn with_scheme(base: &str, secure: (&str, &str), plain: (&str, &str)) -> String {
    let base = base.trim().trim_end_matches('/');
    for (from, to) in [secure, plain] {
        if let Some(rest) = base.strip_prefix(from) {
            return format!("{to}{rest}");
        }
    }
    base.to_string()
}

/// Whether a base URL is one [`listen_url`] can use.
pub fn valid_base(base: &str) -> bool {
    let b = base.trim();
    ["wss://", "ws://", "https://", "http://"]
        .iter()
        .any(|s| b.len() > s.len() && b.starts_with(s))
}

/// Percent-encodes everything but unreserved characters (RFC 3986).
fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The error a refused handshake stands for.
pub fn refused(status: u16, body: &str) -> SttError {
    let detail = format!("HTTP {status}: {}", body.trim());
    match status {
        401 | 403 => SttError::Unauthorized(detail),
        402 => SttError::Payment(detail),
        429 => SttError::RateLimited(detail),
        400 | 404 | 405 | 413 | 415 | 422 => SttError::BadRequest(detail),
        _ => SttError::Network(detail),
    }
}

/// One message from the server.
#[derive(Debug, Clone, PartialEq)]
pub enum ServerMessage {
    Results(Results),
    Metadata(Metadata),
    /// A documented type this client has no use for (`SpeechStarted`, `UtteranceEnd`, ...).
    Other(String),
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Results {
    /// Seconds of this connection's audio.
    #[serde(default)]
    pub start: f64,
    #[serde(default)]
    pub duration: f64,
    #[serde(default)]
    pub is_final: bool,
    #[serde(default)]
    pub speech_final: bool,
    #[serde(default)]
    pub from_finalize: bool,
    pub channel: Channel,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Channel {
    #[serde(default)]
    pub alternatives: Vec<Alternative>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Alternative {
    #[serde(default)]
    pub transcript: String,
    #[serde(default)]
    pub confidence: Option<f32>,
    #[serde(default)]
    pub words: Vec<DgWord>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct DgWord {
    pub word: String,
    #[serde(default)]
    pub punctuated_word: Option<String>,
    pub start: f64,
    pub end: f64,
    #[serde(default)]
    pub confidence: Option<f32>,
    #[serde(default)]
    pub speaker: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Metadata {
    #[serde(default)]
    pub request_id: String,
    #[serde(default)]
    pub duration: f64,
}

/// The pre-recorded API's answer (the parts read).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Prerecorded {
    pub results: PrerecordedResults,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PrerecordedResults {
    #[serde(default)]
    pub channels: Vec<Channel>,
    /// Present when `utterances=true` was asked for.
    #[serde(default)]
    pub utterances: Option<Vec<Utterance>>,
}

/// One utterance of a pre-recorded answer; times in seconds of the request's audio.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Utterance {
    pub start: f64,
    pub end: f64,
    /// Its transcript, confidence and words, as an alternative's.
    #[serde(flatten)]
    pub text: Alternative,
    #[serde(default)]
    pub speaker: Option<u32>,
}

impl Prerecorded {
    /// The answer as utterances in time order: `results.utterances` when given; otherwise the first
    /// channel's first alternative as one utterance from its first word to its last (the whole audio, of
    /// `duration` seconds, when it has no words).
    pub fn utterances(self, duration: f64) -> Vec<Utterance> {
        if let Some(mut utterances) = self.results.utterances {
            utterances.sort_by(|a, b| a.start.total_cmp(&b.start));
            return utterances;
        }
        let Some(alt) = self
            .results
            .channels
            .into_iter()
            .next()
            .and_then(|c| c.alternatives.into_iter().next())
        else {
            return Vec::new();
        };
        if alt.transcript.trim().is_empty() {
            return Vec::new();
        }
        let start = alt.words.first().map_or(0.0, |w| w.start);
        let end = alt.words.last().map_or(duration, |w| w.end);
        let speaker = alt.words.first().and_then(|w| w.speaker);
        vec![Utterance {
            start,
            end,
            text: alt,
            speaker,
        }]
    }
}

/// Parses a pre-recorded answer (a 2xx body).
pub fn parse_prerecorded(body: &[u8]) -> Result<Prerecorded, SttError> {
    serde_json::from_slice(body).map_err(|e| SttError::Protocol(format!("unreadable answer: {e}")))
}

#[derive(Deserialize)]
struct Envelope {
    #[serde(rename = "type")]
    kind: String,
}

/// Parses one text frame from the server.
pub fn parse(text: &str) -> Result<ServerMessage, SttError> {
    let bad = |e: serde_json::Error| SttError::Protocol(format!("unreadable message: {e}"));
    let envelope: Envelope = serde_json::from_str(text).map_err(bad)?;
    match envelope.kind.as_str() {
        "Results" => Ok(ServerMessage::Results(
            serde_json::from_str(text).map_err(bad)?,
        )),
        "Metadata" => Ok(ServerMessage::Metadata(
            serde_json::from_str(text).map_err(bad)?,
        )),
        _ => Ok(ServerMessage::Other(envelope.kind)),
    }
}

/// Seconds of audio as samples at 16 kHz (rounded; negative and non-finite values are 0).
pub fn secs_to_samples(secs: f64) -> u64 {
    if secs.is_finite() && secs > 0.0 {
        (secs * f64::from(SAMPLE_RATE)).round() as u64
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_listen_url_asks_for_linear16_at_16_khz_with_interim_results() {
        let url = listen_url("wss://api.deepgram.com/", "nova-3", "en", true);
        assert_eq!(
            url,
            "wss://api.deepgram.com/v1/listen?model=nova-3&language=en&encoding=linear16&sample_rate=16000&channels=1&interim_results=true&punctuate=true"
        );
        assert!(
            listen_url("http://127.0.0.1:9/", "m", "pt BR&x=1", false)
                .starts_with("ws://127.0.0.1:9/v1/listen?model=m&language=pt%20BR%26x%3D1&")
        );
        assert!(
            listen_url("https://dg.internal", "m", "en", true)
                .starts_with("wss://dg.internal/v1/listen?")
        );
        assert_eq!(
            prerecorded_url("wss://api.deepgram.com/", "nova-3", "en"),
            "https://api.deepgram.com/v1/listen?model=nova-3&language=en&encoding=linear16&sample_rate=16000&channels=1&punctuate=true&utterances=true"
        );
        assert!(
            prerecorded_url("ws://127.0.0.1:9", "m", "en")
                .starts_with("http://127.0.0.1:9/v1/listen?")
        );
        assert!(
            prerecorded_url("https://dg.internal", "m", "en")
                .starts_with("https://dg.internal/v1/")
        );
        assert!(valid_base("wss://api.deepgram.com") && valid_base("http://127.0.0.1:1"));
        assert!(!valid_base("api.deepgram.com") && !valid_base("wss://") && !valid_base(""));
    }

    #[test]
    fn refused_handshakes_map_to_errors_by_status() {
        assert_eq!(refused(402, "{}").code(), "payment");
        assert_eq!(refused(401, "").code(), "unauthorized");
        assert_eq!(refused(429, "").code(), "rate_limited");
        assert_eq!(refused(400, "bad model").code(), "bad_request");
        assert_eq!(refused(503, "").code(), "network");
        assert!(
            refused(402, "no balance")
                .to_string()
                .contains("HTTP 402: no balance")
        );
    }

    #[test]
    fn results_metadata_and_other_messages_parse() {
        let text = r#"{"type":"Results","channel_index":[0,1],"duration":1.5,"start":2.25,"is_final":true,
            "speech_final":false,"from_finalize":true,"channel":{"alternatives":[{"transcript":"hello there",
            "confidence":0.93,"words":[{"word":"hello","start":2.3,"end":2.6,"confidence":0.9,"punctuated_word":"Hello"},
            {"word":"there","start":2.7,"end":3.1,"confidence":0.95}]}]},"metadata":{"request_id":"r"}}"#;
        let ServerMessage::Results(r) = parse(text).unwrap_or_else(|e| panic!("{e}")) else {
            panic!("not results");
        };
        assert!(r.is_final && r.from_finalize && !r.speech_final);
        assert_eq!(secs_to_samples(r.start), 36_000);
        assert_eq!(r.channel.alternatives[0].transcript, "hello there");
        assert_eq!(
            r.channel.alternatives[0].words[0]
                .punctuated_word
                .as_deref(),
            Some("Hello")
        );
        assert_eq!(
            parse(r#"{"type":"Metadata","request_id":"abc","duration":3.5,"channels":1}"#).ok(),
            Some(ServerMessage::Metadata(Metadata {
                request_id: "abc".into(),
                duration: 3.5
            }))
        );
        assert_eq!(
            parse(r#"{"type":"SpeechStarted","timestamp":1.0}"#).ok(),
            Some(ServerMessage::Other("SpeechStarted".into()))
        );
        assert!(matches!(parse("not json"), Err(SttError::Protocol(_))));
        assert!(matches!(
            parse(r#"{"type":"Results"}"#),
            Err(SttError::Protocol(_))
        ));
        assert_eq!(secs_to_samples(-1.0), 0);
        assert_eq!(secs_to_samples(f64::NAN), 0);
    }

    #[test]
    fn a_prerecorded_answer_gives_its_utterances_or_else_the_whole_transcript() {
        let body = br#"{"metadata":{"request_id":"r","duration":4.0,"channels":1},
            "results":{"channels":[{"alternatives":[{"transcript":"hello there. bye","confidence":0.9,
              "words":[{"word":"hello","start":0.1,"end":0.4},{"word":"bye","start":3.0,"end":3.5}]}]}],
            "utterances":[{"start":3.0,"end":3.5,"confidence":0.8,"channel":0,"transcript":"Bye.","words":[],"speaker":1,"id":"b"},
              {"start":0.1,"end":1.2,"confidence":0.9,"channel":0,"transcript":"Hello there.","words":[{"word":"hello","start":0.1,"end":0.4}],"speaker":0,"id":"a"}]}}"#;
        let answer = parse_prerecorded(body).unwrap_or_else(|e| panic!("{e}"));
        let u = answer.clone().utterances(4.0);
        assert_eq!(u.len(), 2);
        assert_eq!(
            (u[0].text.transcript.as_str(), u[0].speaker),
            ("Hello there.", Some(0))
        );
        assert_eq!((u[1].start, u[1].end, u[1].speaker), (3.0, 3.5, Some(1)));

        let mut without = answer;
        without.results.utterances = None;
        let u = without.utterances(4.0);
        assert_eq!(u.len(), 1);
        assert_eq!((u[0].start, u[0].end), (0.1, 3.5));
        assert_eq!(u[0].text.transcript, "hello there. bye");
        assert_eq!(u[0].text.words.len(), 2);

        let silent = parse_prerecorded(
            br#"{"results":{"channels":[{"alternatives":[{"transcript":"","words":[]}]}]}}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(silent.utterances(2.0).is_empty());
        assert!(matches!(
            parse_prerecorded(b"<html>"),
            Err(SttError::Protocol(_))
        ));
        assert!(matches!(
            parse_prerecorded(b"{}"),
            Err(SttError::Protocol(_))
        ));
    }
}

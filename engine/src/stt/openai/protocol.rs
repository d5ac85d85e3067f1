//! The OpenAI audio transcriptions API as this client speaks it: `POST /v1/audio/transcriptions`, a
//! `multipart/form-data` body (RFC 7578) with `file` (here a WAV of 16 kHz mono 16-bit PCM), `model`,
//! `response_format=verbose_json` and an optional `language` (ISO-639-1); `Authorization: Bearer <key>`.
//!
//! The answer (OpenAI's API reference, "Create transcription"; the same shape from whisper.cpp's server,
//! faster-whisper-server, vLLM): `verbose_json` is `{text, language, duration, segments: [{id, start, end,
//! text, ...}]}`, times in seconds of the file sent; a server that only knows `json` answers `{text}`.
//! Errors come as an HTTP status with `{"error": {"message", "type", "code"}}`.

use serde::Deserialize;

use crate::stt::types::{ResultKind, SAMPLE_RATE, SttError, SttResult, sample_to_ms};

/// The path under a base URL.
const PATH: &str = "/v1/audio/transcriptions";
/// The largest answer read (a 10 s chunk's `verbose_json` is a few KB).
pub const MAX_RESPONSE_BYTES: usize = 1 << 20;

/// `base` + `/v1/audio/transcriptions` (a base ending in `/v1` is not given a second one).
pub fn transcriptions_url(base: &str) -> String {
    let base = base.trim().trim_end_matches('/');
    match base.strip_suffix("/v1") {
        Some(root) => format!("{root}{PATH}"),
        None => format!("{base}{PATH}"),
    }
}

/// A WAV file (RIFF, PCM format 1, 16 kHz, mono, 16-bit little-endian) holding `pcm`.
pub fn wav(pcm: &[i16]) -> Vec<u8> {
    // A chunk is at most a few hundred thousand samples: the sizes fit the header's u32 fields.
    let data_len = u32::try_from(pcm.len() * 2).unwrap_or(u32::MAX - 36);
    let mut out = Vec::with_capacity(44 + pcm.len() * 2);
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&(36 + data_len).to_le_bytes());
    out.extend_from_slice(b"WAVEfmt ");
    out.extend_from_slice(&16u32.to_le_bytes());
    out.extend_from_slice(&1u16.to_le_bytes()); // PCM
    out.extend_from_slice(&1u16.to_le_bytes()); // mono
    out.extend_from_slice(&SAMPLE_RATE.to_le_bytes());
    out.extend_from_slice(&(SAMPLE_RATE * 2).to_le_bytes()); // bytes per second
    out.extend_from_slice(&2u16.to_le_bytes()); // block align
    out.extend_from_slice(&16u16.to_le_bytes()); // bits per sample
    out.extend_from_slice(b"data");
    out.extend_from_slice(&data_len.to_le_bytes());
    for s in pcm {
        out.extend_from_slice(&s.to_le_bytes());
    }
    out
}

/// The language field: ISO-639-1 from a BCP-47-ish tag (`en-US` → `en`); `None` (the server detects it)
/// for `multi`, `auto` or nothing.
pub fn language(tag: &str) -> Option<String> {
    let primary = tag.trim().split(['-', '_']).next().unwrap_or_default();
    let primary = primary.to_ascii_lowercase();
    let usable =
        (2..=3).contains(&primary.len()) && primary.chars().all(|c| c.is_ascii_lowercase());
    (usable && primary != "mul" && primary != "multi").then_some(primary)
}

/// A `multipart/form-data` body: its `Content-Type` and bytes.
#[derive(Debug, Clone)]
pub struct Form {
    pub content_type: String,
    pub body: Vec<u8>,
}

/// The request body for one chunk. `boundary` must not occur in the audio (a random 32-hex-digit one
/// practically never does).
pub fn form(pcm: &[i16], model: &str, language: Option<&str>, boundary: &str) -> Form {
    let mut body = Vec::with_capacity(pcm.len() * 2 + 512);
    let mut field = |name: &str, value: &str| {
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
            )
            .as_bytes(),
        );
    };
    field("model", model);
    field("response_format", "verbose_json");
    if let Some(lang) = language {
        field("language", lang);
    }
    body.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"audio.wav\"\r\nContent-Type: audio/wav\r\n\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(&wav(pcm));
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    Form {
        content_type: format!("multipart/form-data; boundary={boundary}"),
        body,
    }
}

/// One segment of a `verbose_json` answer.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Segment {
    /// Seconds of the file sent.
    pub start: f64,
    pub end: f64,
    pub text: String,
}

/// A transcription answer (`verbose_json`, or `json`: no segments).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Transcription {
    pub text: String,
    #[serde(default)]
    pub segments: Option<Vec<Segment>>,
}

/// Parses a 2xx answer. Anything else than the documented shape is a `protocol` error naming what was
/// wrong (never a panic).
pub fn parse(body: &[u8]) -> Result<Transcription, SttError> {
    let t: Transcription = serde_json::from_slice(body).map_err(|e| {
        SttError::Protocol(format!(
            "the transcription answer is not the documented JSON ({e}): {}",
            snippet(body)
        ))
    })?;
    for s in t.segments.iter().flatten() {
        if !(s.start.is_finite() && s.end.is_finite()) {
            return Err(SttError::Protocol(format!(
                "a segment has a time that is not a number: {}",
                snippet(body)
            )));
        }
    }
    Ok(t)
}

/// An error answer: the status's meaning, with the server's message.
pub fn status_error(status: u16, body: &[u8]) -> SttError {
    #[derive(Deserialize)]
    struct Detail {
        #[serde(default)]
        code: Option<String>,
    }
    #[derive(Deserialize)]
    struct Error {
        error: Detail,
    }
    let code = serde_json::from_slice::<Error>(body)
        .ok()
        .and_then(|e| e.error.code);
    let detail = format!("HTTP {status}: {}", snippet(body));
    match status {
        401 | 403 => SttError::Unauthorized(detail),
        402 => SttError::Payment(detail),
        // OpenAI answers an exhausted balance with 429 `insufficient_quota`: the account cannot pay.
        429 if code.as_deref() == Some("insufficient_quota") => SttError::Payment(detail),
        429 => SttError::RateLimited(detail),
        400 | 404 | 405 | 413 | 415 | 422 => SttError::BadRequest(detail),
        502..=504 => SttError::Network(detail),
        500..=599 => SttError::Engine(detail),
        _ => SttError::Protocol(detail),
    }
}

/// The start of a body, for messages (at most 300 bytes, lossy UTF-8, trimmed).
fn snippet(body: &[u8]) -> String {
    String::from_utf8_lossy(&body[..body.len().min(300)])
        .trim()
        .to_string()
}

fn secs_to_samples(secs: f64) -> u64 {
    // Clamped to non-negative and finite (checked in `parse`): the cast saturates, never wraps.
    (secs.max(0.0) * f64::from(SAMPLE_RATE)).round() as u64
}

/// Final results in stream time for a chunk of `len` samples that starts at stream offset `start`: one
/// per segment with text (times clamped to the chunk), or one for the whole chunk when the answer has no
/// segments (`json`).
pub fn results(t: &Transcription, start: u64, len: u64) -> Vec<SttResult> {
    let result = |text: &str, s: u64, e: u64| SttResult {
        kind: ResultKind::Final,
        text: text.trim().to_string(),
        start_ms: sample_to_ms(start + s),
        end_ms: sample_to_ms(start + e),
        confidence: None,
        words: Vec::new(),
        speaker: None,
    };
    match t.segments.as_deref() {
        Some(segments) if !segments.is_empty() => segments
            .iter()
            .filter(|s| !s.text.trim().is_empty())
            .map(|s| {
                let a = secs_to_samples(s.start).min(len);
                let b = secs_to_samples(s.end).clamp(a, len);
                result(&s.text, a, b)
            })
            .collect(),
        _ if t.text.trim().is_empty() => Vec::new(),
        _ => vec![result(&t.text, 0, len)],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_get_the_transcriptions_path_once() {
        assert_eq!(
            transcriptions_url("https://api.openai.com"),
            "https://api.openai.com/v1/audio/transcriptions"
        );
        assert_eq!(
            transcriptions_url("http://127.0.0.1:8000/v1/"),
            "http://127.0.0.1:8000/v1/audio/transcriptions"
        );
        assert_eq!(
            transcriptions_url("http://gpu:9000/whisper/"),
            "http://gpu:9000/whisper/v1/audio/transcriptions"
        );
    }

    #[test]
    fn the_wav_header_describes_16_khz_mono_16_bit_pcm() {
        let pcm = [0i16, 1, -1, i16::MAX, i16::MIN];
        let w = wav(&pcm);
        assert_eq!(w.len(), 44 + 10);
        assert_eq!(&w[0..4], b"RIFF");
        assert_eq!(u32::from_le_bytes([w[4], w[5], w[6], w[7]]), 36 + 10);
        assert_eq!(&w[8..16], b"WAVEfmt ");
        assert_eq!(u16::from_le_bytes([w[20], w[21]]), 1, "PCM");
        assert_eq!(u16::from_le_bytes([w[22], w[23]]), 1, "mono");
        assert_eq!(u32::from_le_bytes([w[24], w[25], w[26], w[27]]), 16_000);
        assert_eq!(u32::from_le_bytes([w[28], w[29], w[30], w[31]]), 32_000);
        assert_eq!(u16::from_le_bytes([w[34], w[35]]), 16, "bits");
        assert_eq!(&w[36..40], b"data");
        assert_eq!(u32::from_le_bytes([w[40], w[41], w[42], w[43]]), 10);
        assert_eq!(&w[44..48], &[0, 0, 1, 0]);
        assert_eq!(&w[52..54], &i16::MIN.to_le_bytes());
    }

    #[test]
    fn the_form_holds_every_field_and_the_audio_between_boundaries() {
        let f = form(&[1, 2, 3], "whisper-1", Some("en"), "XyZ");
        assert_eq!(f.content_type, "multipart/form-data; boundary=XyZ");
        let text = String::from_utf8_lossy(&f.body).into_owned();
        for part in [
            "--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n",
            "name=\"response_format\"\r\n\r\nverbose_json\r\n",
            "name=\"language\"\r\n\r\nen\r\n",
            "name=\"file\"; filename=\"audio.wav\"\r\nContent-Type: audio/wav\r\n\r\nRIFF",
        ] {
            assert!(text.contains(part), "{part:?} in {text:?}");
        }
        assert!(f.body.ends_with(b"\x01\x00\x02\x00\x03\x00\r\n--XyZ--\r\n"));
        let without = form(&[], "m", None, "b");
        assert!(!String::from_utf8_lossy(&without.body).contains("language"));
    }

    #[test]
    fn languages_become_iso_639_1_or_are_left_to_the_server() {
        assert_eq!(language("en").as_deref(), Some("en"));
        assert_eq!(language("en-US").as_deref(), Some("en"));
        assert_eq!(language("pt_BR").as_deref(), Some("pt"));
        assert_eq!(language("multi"), None);
        assert_eq!(language(""), None);
        assert_eq!(language("x"), None);
    }

    #[test]
    fn verbose_json_segments_map_to_stream_time_within_the_chunk() {
        let body = br#"{"task":"transcribe","language":"english","duration":3.0,"text":" Hello there. Bye.",
            "segments":[{"id":0,"seek":0,"start":0.0,"end":1.5,"text":" Hello there.","tokens":[1],
            "temperature":0.0,"avg_logprob":-0.2,"compression_ratio":1.0,"no_speech_prob":0.01},
            {"id":1,"start":1.5,"end":9.0,"text":" Bye."},{"id":2,"start":2.0,"end":2.5,"text":"  "}]}"#;
        let t = parse(body).unwrap_or_else(|e| panic!("{e}"));
        // A 3 s chunk starting 10 s into the stream.
        let r = results(&t, 160_000, 48_000);
        assert_eq!(r.len(), 2, "blank segments are skipped");
        assert_eq!(
            (r[0].text.as_str(), r[0].start_ms, r[0].end_ms),
            ("Hello there.", 10_000, 11_500)
        );
        assert_eq!(
            (r[1].text.as_str(), r[1].start_ms, r[1].end_ms),
            ("Bye.", 11_500, 13_000),
            "clamped to the chunk's end"
        );
        assert!(
            r.iter()
                .all(|r| r.kind == ResultKind::Final && r.confidence.is_none())
        );
    }

    #[test]
    fn plain_json_gives_one_result_for_the_chunk_and_silence_none() {
        let t = parse(br#"{"text":"just text"}"#).unwrap_or_else(|e| panic!("{e}"));
        let r = results(&t, 16_000, 32_000);
        assert_eq!(
            (r[0].text.as_str(), r[0].start_ms, r[0].end_ms),
            ("just text", 1_000, 3_000)
        );
        let t = parse(br#"{"text":" ","segments":[]}"#).unwrap_or_else(|e| panic!("{e}"));
        assert!(results(&t, 0, 100).is_empty());
    }

    #[test]
    fn a_malformed_answer_is_a_protocol_error_not_a_panic() {
        for body in [
            &b"<html>502 Bad Gateway</html>"[..],
            b"",
            b"{\"segments\":[]}",
            b"{\"text\":\"a\",\"segments\":[{\"start\":\"zero\",\"end\":1,\"text\":\"a\"}]}",
            b"\xff\xfe\x00",
        ] {
            let err = parse(body).unwrap_err();
            assert_eq!(err.code(), "protocol", "{err}");
            assert!(err.to_string().contains("documented JSON"), "{err}");
        }
    }

    #[test]
    fn error_statuses_map_to_the_errors_the_session_reports() {
        assert_eq!(status_error(401, b"{}").code(), "unauthorized");
        assert_eq!(status_error(402, b"").code(), "payment");
        let quota = br#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","code":"insufficient_quota"}}"#;
        assert_eq!(status_error(429, quota).code(), "payment");
        assert_eq!(status_error(429, b"slow down").code(), "rate_limited");
        assert_eq!(status_error(400, b"bad model").code(), "bad_request");
        assert_eq!(status_error(500, b"").code(), "engine");
        assert_eq!(status_error(503, b"").code(), "network");
        assert_eq!(status_error(302, b"").code(), "protocol");
        assert!(
            status_error(401, br#"{"error":{"message":"Incorrect API key"}}"#)
                .to_string()
                .contains("HTTP 401: {\"error\":{\"message\":\"Incorrect API key\"}}")
        );
    }
}

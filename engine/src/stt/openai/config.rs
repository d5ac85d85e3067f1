//! The OpenAI-compatible provider's settings ([`OpenAiArgs`], flattened into `voicegate serve`) and its key.

use std::path::PathBuf;
use std::time::Duration;

use crate::stt::key::KeySource;

/// `VOICEGATE_OPENAI_BASE_URL`.
pub const DEFAULT_BASE_URL: &str = "https://api.openai.com";
/// `VOICEGATE_OPENAI_MODEL`.
pub const DEFAULT_MODEL: &str = "whisper-1";
/// `VOICEGATE_OPENAI_TIMEOUT_SECS`: one request (10 s of audio at most) from the first byte sent to the
/// last byte of the answer.
pub const DEFAULT_TIMEOUT_SECS: u64 = 30;
/// `VOICEGATE_OPENAI_MAX_IN_FLIGHT`: requests one node has open at once.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 8;
/// `VOICEGATE_OPENAI_QUEUE_CHUNKS`: chunks one node holds for the provider (in flight or waiting).
pub const DEFAULT_QUEUE_CHUNKS: usize = 64;
/// `VOICEGATE_OPENAI_RETRIES`: further attempts of one chunk after a failure a later attempt can fix
/// (429 rate limit, 5xx, no connection).
pub const DEFAULT_RETRIES: u32 = 2;
/// The largest number of retries accepted (each waits up to `crate::stt::http::RETRY_MAX`).
pub const MAX_RETRIES: u32 = 5;
/// The host whose API always needs a key.
const OPENAI_HOST: &str = "api.openai.com";

/// The OpenAI-compatible provider's settings as an operator writes them.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
#[command(next_help_heading = "Speech-to-text: OpenAI-compatible")]
pub struct OpenAiArgs {
    /// API key, for VOICEGATE_STT=openai (sent as `Authorization: Bearer`). Or VOICEGATE_OPENAI_API_KEY_FILE. Needed for api.openai.com; a self-hosted base URL may run without one.
    #[arg(
        id = "openai_api_key",
        long = "openai-api-key",
        env = "OPENAI_API_KEY",
        hide_env_values = true
    )]
    pub api_key: Option<String>,

    /// File holding the OpenAI-compatible API key, read again at every request, so a rotated key applies without a restart (wins over OPENAI_API_KEY).
    #[arg(
        id = "openai_api_key_file",
        long = "openai-api-key-file",
        env = "VOICEGATE_OPENAI_API_KEY_FILE"
    )]
    pub key_file: Option<PathBuf>,

    /// Base URL of the OpenAI-compatible server (http:// or https://); requests go to URL/v1/audio/transcriptions (a URL ending in /v1 gets /audio/transcriptions).
    #[arg(id = "openai_base_url", long = "openai-base-url", env = "VOICEGATE_OPENAI_BASE_URL", default_value = DEFAULT_BASE_URL)]
    pub base_url: String,

    /// Transcription model (whisper-1 at OpenAI; the name a self-hosted server expects).
    #[arg(id = "openai_model", long = "openai-model", env = "VOICEGATE_OPENAI_MODEL", default_value = DEFAULT_MODEL)]
    pub model: String,

    /// Longest time one transcription request may take, sending included; past it the chunk fails (`network`).
    #[arg(id = "openai_timeout_secs", long = "openai-timeout-secs", env = "VOICEGATE_OPENAI_TIMEOUT_SECS", default_value_t = DEFAULT_TIMEOUT_SECS)]
    pub timeout_secs: u64,

    /// Transcription requests one node has open at once.
    #[arg(id = "openai_max_in_flight", long = "openai-max-in-flight", env = "VOICEGATE_OPENAI_MAX_IN_FLIGHT", default_value_t = DEFAULT_MAX_IN_FLIGHT)]
    pub max_in_flight: usize,

    /// Chunks (of at most 10 s) one node holds for the provider, in flight or waiting; past it a chunk is dropped (counted, `queue_full`).
    #[arg(id = "openai_queue_chunks", long = "openai-queue-chunks", env = "VOICEGATE_OPENAI_QUEUE_CHUNKS", default_value_t = DEFAULT_QUEUE_CHUNKS)]
    pub queue_chunks: usize,

    /// Further attempts of one chunk after a 429 (not `insufficient_quota`), a 5xx or a failed connection, after the house backoff (0.5-5 s, a 429's Retry-After of up to 10 s honoured); a timeout after the audio went out is not retried (the provider may have transcribed it). 0 = never.
    #[arg(id = "openai_retries", long = "openai-retries", env = "VOICEGATE_OPENAI_RETRIES", default_value_t = DEFAULT_RETRIES)]
    pub retries: u32,
}

impl Default for OpenAiArgs {
    fn default() -> Self {
        OpenAiArgs {
            api_key: None,
            key_file: None,
            base_url: DEFAULT_BASE_URL.to_string(),
            model: DEFAULT_MODEL.to_string(),
            timeout_secs: DEFAULT_TIMEOUT_SECS,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            queue_chunks: DEFAULT_QUEUE_CHUNKS,
            retries: DEFAULT_RETRIES,
        }
    }
}

/// Why the OpenAI-compatible settings cannot start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenAiConfigError {
    #[error("VOICEGATE_OPENAI_BASE_URL={0:?} is not an http:// or https:// URL")]
    Url(String),
    #[error("VOICEGATE_OPENAI_MODEL must not be empty")]
    Model,
    #[error("VOICEGATE_OPENAI_TIMEOUT_SECS must be between 1 and 600")]
    Timeout,
    #[error("{0} must be greater than 0")]
    Zero(&'static str),
    #[error("VOICEGATE_OPENAI_RETRIES must be at most {MAX_RETRIES}")]
    Retries,
    #[error("VOICEGATE_OPENAI_API_KEY_FILE={}: {reason}", path.display())]
    KeyFile { path: PathBuf, reason: String },
}

impl OpenAiArgs {
    /// Whether a key is configured (a non-empty `OPENAI_API_KEY`, or a key file).
    pub fn has_key(&self) -> bool {
        self.key_file.is_some()
            || self
                .api_key
                .as_deref()
                .is_some_and(|k| !k.trim().is_empty())
    }

    /// Whether the base URL is a self-hosted server (not api.openai.com), which may run without a key.
    pub fn self_hosted(&self) -> bool {
        !self.base_url.to_ascii_lowercase().contains(OPENAI_HOST)
    }

    /// Whether the provider can start as far as its key goes: a key, or a server that needs none.
    pub fn has_key_or_self_hosted(&self) -> bool {
        self.has_key() || self.self_hosted()
    }

    /// Checks the settings (and reads the key file once) and builds the provider's configuration.
    pub fn config(&self) -> Result<OpenAiConfig, OpenAiConfigError> {
        let base = self.base_url.trim();
        let lower = base.to_ascii_lowercase();
        let rest = lower
            .strip_prefix("https://")
            .or_else(|| lower.strip_prefix("http://"));
        if rest.is_none_or(|r| r.is_empty() || r.starts_with('/')) {
            return Err(OpenAiConfigError::Url(self.base_url.clone()));
        }
        if self.model.trim().is_empty() {
            return Err(OpenAiConfigError::Model);
        }
        if !(1..=600).contains(&self.timeout_secs) {
            return Err(OpenAiConfigError::Timeout);
        }
        if self.max_in_flight == 0 {
            return Err(OpenAiConfigError::Zero("VOICEGATE_OPENAI_MAX_IN_FLIGHT"));
        }
        if self.queue_chunks == 0 {
            return Err(OpenAiConfigError::Zero("VOICEGATE_OPENAI_QUEUE_CHUNKS"));
        }
        if self.retries > MAX_RETRIES {
            return Err(OpenAiConfigError::Retries);
        }
        let key = match (&self.key_file, &self.api_key) {
            (Some(path), _) => {
                let key = KeySource::File(path.clone());
                key.current().map_err(|e| OpenAiConfigError::KeyFile {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
                Some(key)
            }
            (None, Some(k)) if !k.trim().is_empty() => Some(KeySource::Fixed(k.trim().to_string())),
            (None, _) => None,
        };
        Ok(OpenAiConfig {
            url: super::protocol::transcriptions_url(base),
            model: self.model.trim().to_string(),
            key,
            timeout: Duration::from_secs(self.timeout_secs),
            max_in_flight: self.max_in_flight,
            queue_chunks: self.queue_chunks,
            retries: self.retries,
        })
    }
}

/// The provider's configuration.
#[derive(Debug, Clone)]
pub struct OpenAiConfig {
    /// The full URL of `POST …/v1/audio/transcriptions`.
    pub url: String,
    pub model: String,
    /// `None`: no `Authorization` header (a self-hosted server without keys).
    pub key: Option<KeySource>,
    /// One request, sending included.
    pub timeout: Duration,
    pub max_in_flight: usize,
    pub queue_chunks: usize,
    /// Further attempts of a chunk after a retryable failure.
    pub retries: u32,
}

impl Default for OpenAiConfig {
    fn default() -> Self {
        OpenAiConfig {
            url: super::protocol::transcriptions_url(DEFAULT_BASE_URL),
            model: DEFAULT_MODEL.to_string(),
            key: None,
            timeout: Duration::from_secs(DEFAULT_TIMEOUT_SECS),
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            queue_chunks: DEFAULT_QUEUE_CHUNKS,
            retries: DEFAULT_RETRIES,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_settings_are_refused_naming_them() {
        let ok = OpenAiArgs {
            api_key: Some(" sk-test ".into()),
            ..OpenAiArgs::default()
        };
        let cfg = ok.config().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cfg.url, "https://api.openai.com/v1/audio/transcriptions");
        assert_eq!(
            cfg.key.as_ref().and_then(|k| k.current().ok()).as_deref(),
            Some("sk-test")
        );
        assert!(format!("{cfg:?}").contains("redacted"));
        for url in ["api.openai.com", "ftp://x", "http://", "https:///v1"] {
            let bad = OpenAiArgs {
                base_url: url.into(),
                ..ok.clone()
            };
            assert_eq!(
                bad.config().unwrap_err(),
                OpenAiConfigError::Url(url.into()),
                "{url}"
            );
        }
        let zero = OpenAiArgs {
            max_in_flight: 0,
            ..ok.clone()
        };
        assert!(
            zero.config()
                .unwrap_err()
                .to_string()
                .contains("VOICEGATE_OPENAI_MAX_IN_FLIGHT")
        );
        let slow = OpenAiArgs {
            timeout_secs: 0,
            ..ok.clone()
        };
        assert_eq!(slow.config().unwrap_err(), OpenAiConfigError::Timeout);
        let no_model = OpenAiArgs {
            model: " ".into(),
            ..ok
        };
        assert_eq!(no_model.config().unwrap_err(), OpenAiConfigError::Model);
    }

    #[test]
    fn the_key_is_needed_for_openai_and_optional_for_a_self_hosted_server() {
        let openai = OpenAiArgs::default();
        assert!(!openai.has_key_or_self_hosted());
        let blank = OpenAiArgs {
            api_key: Some("  ".into()),
            ..OpenAiArgs::default()
        };
        assert!(!blank.has_key_or_self_hosted());
        let local = OpenAiArgs {
            base_url: "http://127.0.0.1:8000/v1".into(),
            ..OpenAiArgs::default()
        };
        assert!(local.has_key_or_self_hosted() && !local.has_key());
        let cfg = local.config().unwrap_or_else(|e| panic!("{e}"));
        assert!(cfg.key.is_none(), "no key: no Authorization header");
        assert_eq!(cfg.url, "http://127.0.0.1:8000/v1/audio/transcriptions");
    }

    #[test]
    fn a_key_file_is_read_again_at_every_use_so_a_rotated_key_applies() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("openai.key");
        let args = OpenAiArgs {
            key_file: Some(path.clone()),
            api_key: Some("env-key".into()),
            ..OpenAiArgs::default()
        };
        let err = args.config().unwrap_err().to_string();
        assert!(
            err.contains("VOICEGATE_OPENAI_API_KEY_FILE") && err.contains("openai.key"),
            "{err}"
        );
        std::fs::write(&path, "first\n").unwrap_or_else(|e| panic!("{e}"));
        let cfg = args.config().unwrap_or_else(|e| panic!("{e}"));
        let key = cfg.key.unwrap_or_else(|| panic!("a key"));
        assert_eq!(key.current().ok().as_deref(), Some("first"));
        std::fs::write(&path, "second").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(key.current().ok().as_deref(), Some("second"));
        std::fs::write(&path, "\n").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(key.current().map_err(|e| e.code()), Err("unauthorized"));
    }
}

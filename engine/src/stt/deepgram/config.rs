//! The Deepgram provider's settings ([`DeepgramArgs`], flattened into `voicegate serve`) and its key.

use std::path::PathBuf;
use std::time::Duration;

use super::protocol;
pub use crate::stt::key::KeySource;

/// `VOICEGATE_DEEPGRAM_URL`.
pub const DEFAULT_URL: &str = "wss://api.deepgram.com";
/// `VOICEGATE_DEEPGRAM_MODEL`.
pub const DEFAULT_MODEL: &str = "nova-3";
/// `VOICEGATE_DEEPGRAM_KEEPALIVE_MS`: Deepgram closes a stream after 10 s without audio or `KeepAlive` and
/// asks for one every 3 to 5 s.
pub const DEFAULT_KEEPALIVE_MS: u64 = 4_000;

/// `VOICEGATE_DEEPGRAM_BATCH_MAX_IN_FLIGHT`.
pub const DEFAULT_BATCH_MAX_IN_FLIGHT: usize = 4;
/// The most pre-recorded requests accepted open at once.
pub const MAX_BATCH_MAX_IN_FLIGHT: usize = 100;

/// Deepgram's settings as an operator writes them.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
#[command(next_help_heading = "Speech-to-text: Deepgram")]
pub struct DeepgramArgs {
    /// Deepgram API key, for VOICEGATE_STT=deepgram (the reference's name). Or VOICEGATE_DEEPGRAM_KEY_FILE.
    #[arg(
        long = "deepgram-api-key",
        env = "DEEPGRAM_API_KEY",
        hide_env_values = true
    )]
    pub api_key: Option<String>,

    /// File holding the Deepgram API key, read again at every connection, so a rotated key applies without a restart (wins over DEEPGRAM_API_KEY).
    #[arg(long = "deepgram-key-file", env = "VOICEGATE_DEEPGRAM_KEY_FILE")]
    pub key_file: Option<PathBuf>,

    /// Deepgram's base URL (wss:// or ws://; https:// and http:// are taken as wss:// and ws://); the live API is URL/v1/listen over a websocket, the pre-recorded API (sync spans) a POST to URL/v1/listen over http(s).
    #[arg(long = "deepgram-url", env = "VOICEGATE_DEEPGRAM_URL", default_value = DEFAULT_URL)]
    pub url: String,

    /// Deepgram model, for live streams and sync spans.
    #[arg(long = "deepgram-model", env = "VOICEGATE_DEEPGRAM_MODEL", default_value = DEFAULT_MODEL)]
    pub model: String,

    /// A live stream with no audio sent for this long gets a KeepAlive (Deepgram closes idle streams after 10 s).
    #[arg(long = "deepgram-keepalive-ms", env = "VOICEGATE_DEEPGRAM_KEEPALIVE_MS", default_value_t = DEFAULT_KEEPALIVE_MS)]
    pub keepalive_ms: u64,

    /// Pre-recorded requests (sync spans, one per span) open at once on this node; four times as many spans are held waiting, beyond which a span is left pending.
    #[arg(long = "deepgram-batch-max-in-flight", env = "VOICEGATE_DEEPGRAM_BATCH_MAX_IN_FLIGHT", default_value_t = DEFAULT_BATCH_MAX_IN_FLIGHT)]
    pub batch_max_in_flight: usize,
}

impl Default for DeepgramArgs {
    fn default() -> Self {
        DeepgramArgs {
            api_key: None,
            key_file: None,
            url: DEFAULT_URL.to_string(),
            model: DEFAULT_MODEL.to_string(),
            keepalive_ms: DEFAULT_KEEPALIVE_MS,
            batch_max_in_flight: DEFAULT_BATCH_MAX_IN_FLIGHT,
        }
    }
}

/// Why the Deepgram settings cannot start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeepgramConfigError {
    #[error("VOICEGATE_DEEPGRAM_URL={0:?} is not a ws://, wss://, http:// or https:// URL")]
    Url(String),
    #[error(
        "VOICEGATE_DEEPGRAM_KEEPALIVE_MS must be between 100 and 9000 (Deepgram closes after 10 s idle)"
    )]
    KeepAlive,
    #[error(
        "VOICEGATE_DEEPGRAM_BATCH_MAX_IN_FLIGHT must be between 1 and {MAX_BATCH_MAX_IN_FLIGHT}"
    )]
    BatchMaxInFlight,
    #[error("VOICEGATE_DEEPGRAM_MODEL must not be empty")]
    Model,
    #[error("VOICEGATE_DEEPGRAM_KEY_FILE={}: {reason}", path.display())]
    KeyFile { path: PathBuf, reason: String },
}

impl DeepgramArgs {
    /// Whether a key is configured (a non-empty `DEEPGRAM_API_KEY`, or a key file).
    pub fn has_key(&self) -> bool {
        self.key_file.is_some()
            || self
                .api_key
                .as_deref()
                .is_some_and(|k| !k.trim().is_empty())
    }

    /// Checks the settings (and reads the key file once) and builds the provider's configuration.
    pub fn config(&self) -> Result<DeepgramConfig, DeepgramConfigError> {
        if !protocol::valid_base(&self.url) {
            return Err(DeepgramConfigError::Url(self.url.clone()));
        }
        if !(100..=9_000).contains(&self.keepalive_ms) {
            return Err(DeepgramConfigError::KeepAlive);
        }
        if self.model.trim().is_empty() {
            return Err(DeepgramConfigError::Model);
        }
        if !(1..=MAX_BATCH_MAX_IN_FLIGHT).contains(&self.batch_max_in_flight) {
            return Err(DeepgramConfigError::BatchMaxInFlight);
        }
        let key = match (&self.key_file, &self.api_key) {
            (Some(path), _) => {
                let key = KeySource::File(path.clone());
                key.current().map_err(|e| DeepgramConfigError::KeyFile {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
                key
            }
            (None, Some(k)) => KeySource::Fixed(k.trim().to_string()),
            (None, None) => KeySource::Fixed(String::new()),
        };
        Ok(DeepgramConfig {
            url: self.url.trim().to_string(),
            model: self.model.trim().to_string(),
            keepalive: Duration::from_millis(self.keepalive_ms),
            key,
            batch_max_in_flight: self.batch_max_in_flight,
            ..DeepgramConfig::default()
        })
    }
}

/// The provider's configuration.
#[derive(Debug, Clone)]
pub struct DeepgramConfig {
    pub url: String,
    pub model: String,
    pub key: KeySource,
    /// Idle time before a `KeepAlive`.
    pub keepalive: Duration,
    /// Reconnect delays (the shared jittered backoff) after a failed connect or a mid-stream close.
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// How long a connect (TCP, TLS, upgrade) may take.
    pub connect_timeout: Duration,
    /// How long one write may wait for the socket before the connection counts as lost.
    pub write_timeout: Duration,
    /// After `CloseStream`, how long to wait for the last results and the server's close.
    pub close_timeout: Duration,
    /// Pre-recorded requests open at once.
    pub batch_max_in_flight: usize,
    /// How long one pre-recorded request (a span of up to 300 s) may take, sending and answering.
    pub batch_timeout: Duration,
    /// Retries of a pre-recorded request after a 429, a 5xx or a failed connection.
    pub batch_retries: u32,
}

impl Default for DeepgramConfig {
    fn default() -> Self {
        DeepgramConfig {
            url: DEFAULT_URL.to_string(),
            model: DEFAULT_MODEL.to_string(),
            key: KeySource::Fixed(String::new()),
            keepalive: Duration::from_millis(DEFAULT_KEEPALIVE_MS),
            reconnect_min: Duration::from_millis(250),
            reconnect_max: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
            close_timeout: Duration::from_secs(10),
            batch_max_in_flight: DEFAULT_BATCH_MAX_IN_FLIGHT,
            batch_timeout: Duration::from_secs(120),
            batch_retries: 2,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_settings_are_refused_naming_them() {
        let ok = DeepgramArgs {
            api_key: Some(" k ".into()),
            ..DeepgramArgs::default()
        };
        let cfg = ok.config().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cfg.key.current().ok().as_deref(), Some("k"));
        assert!(format!("{:?}", cfg.key).contains("redacted"));
        let bad_url = DeepgramArgs {
            url: "api.deepgram.com".into(),
            ..ok.clone()
        };
        assert!(
            bad_url
                .config()
                .unwrap_err()
                .to_string()
                .contains("VOICEGATE_DEEPGRAM_URL")
        );
        let bad_keepalive = DeepgramArgs {
            keepalive_ms: 10_000,
            ..ok.clone()
        };
        assert_eq!(
            bad_keepalive.config().unwrap_err(),
            DeepgramConfigError::KeepAlive
        );
        for n in [0, MAX_BATCH_MAX_IN_FLIGHT + 1] {
            let bad = DeepgramArgs {
                batch_max_in_flight: n,
                ..ok.clone()
            };
            assert_eq!(
                bad.config().unwrap_err(),
                DeepgramConfigError::BatchMaxInFlight
            );
        }
        assert!(!DeepgramArgs::default().has_key());
        assert!(
            !DeepgramArgs {
                api_key: Some("  ".into()),
                ..DeepgramArgs::default()
            }
            .has_key()
        );
    }

    #[test]
    fn a_key_file_is_read_again_at_every_use_so_a_rotated_key_applies() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("dg.key");
        let args = DeepgramArgs {
            key_file: Some(path.clone()),
            api_key: Some("env-key".into()),
            ..DeepgramArgs::default()
        };
        let err = args.config().unwrap_err().to_string();
        assert!(
            err.contains("VOICEGATE_DEEPGRAM_KEY_FILE") && err.contains("dg.key"),
            "{err}"
        );
        std::fs::write(&path, "first\n").unwrap_or_else(|e| panic!("{e}"));
        let cfg = args.config().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cfg.key.current().ok().as_deref(), Some("first"));
        std::fs::write(&path, "second").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cfg.key.current().ok().as_deref(), Some("second"));
        std::fs::write(&path, " \n").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cfg.key.current().map_err(|e| e.code()), Err("unauthorized"));
    }
}

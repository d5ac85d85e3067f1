//! The local provider's settings.

use std::path::PathBuf;
use std::time::Duration;

use super::ENGINE_VERSION;
use super::child::ChildConfig;
use super::ffi::EngineFiles;

/// Settings of the local provider (server flags in docs/stt.md).
#[derive(Debug, Clone)]
pub struct LocalConfig {
    /// The unpacked wheel folder (`VOICEGATE_STT_LOCAL_DIR`; default [`LocalConfig::default_dir`]).
    pub dir: PathBuf,
    /// Worker threads, one model each (`VOICEGATE_STT_LOCAL_THREADS`).
    pub threads: usize,
    /// Places in the queue (`VOICEGATE_STT_LOCAL_QUEUE_CHUNKS`): chunks waiting for a worker or still
    /// being filled by a stream (a chunk takes its place with its first sample). A stream that finds no
    /// place has that chunk's audio refused as it is pushed (counted, not charged).
    pub queue_chunks: usize,
    /// Niceness added to the workers (and the engine threads they start): 10 = well below the pipeline.
    pub nice: i32,
    /// A chunk that waited longer than this for a worker counts as late (`voicegate_stt_late_chunks_total`).
    pub late_after: Duration,
    /// Run each worker's model in a child process replaced when its memory passes a limit (the engine
    /// leaks: [`super::child`]); `None` = in this process (tests, benches, embedders).
    pub child: Option<ChildConfig>,
}

impl Default for LocalConfig {
    fn default() -> Self {
        LocalConfig {
            dir: LocalConfig::default_dir(),
            threads: 1,
            queue_chunks: 32,
            nice: 10,
            late_after: Duration::from_secs(2),
            child: None,
        }
    }
}

impl LocalConfig {
    /// `$VOICEGATE_STT_LOCAL_DIR`, else `$XDG_CACHE_HOME/voicegate/moonshine-cpp-0.1.4`, else
    /// `~/.cache/voicegate/moonshine-cpp-0.1.4`: where `scripts/deps.sh` unpacks the wheel.
    pub fn default_dir() -> PathBuf {
        if let Some(dir) = std::env::var_os("VOICEGATE_STT_LOCAL_DIR").filter(|d| !d.is_empty()) {
            return PathBuf::from(dir);
        }
        let cache = std::env::var_os("XDG_CACHE_HOME")
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .unwrap_or_else(|| PathBuf::from(".cache"));
        cache
            .join("voicegate")
            .join(format!("moonshine-cpp-{ENGINE_VERSION}"))
    }

    /// Whether the engine's files are all present in `dir` (no loading).
    pub fn is_installed(&self) -> bool {
        EngineFiles::new(&self.dir).missing().is_none()
    }
}

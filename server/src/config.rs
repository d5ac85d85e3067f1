//! `voicegate serve` configuration: every flag, its environment variable and its default, in one struct.
//!
//! The defaults live in [`defaults`]; the table in `docs/operations.md` is generated from this struct by
//! [`markdown_table`] and a test fails when the two drift (`UPDATE_DOCS=1 cargo test -p voicegate-server
//! --test integration config_docs::` rewrites it).

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use voicegate_engine::meter::{MeterArgs, MeterConfig};
use voicegate_engine::policy::{FairUseArgs, FairUseConfig};
use voicegate_engine::stt::deepgram::DeepgramArgs;
use voicegate_engine::stt::openai::OpenAiArgs;

mod admission;
pub mod defaults;
mod jwks;
mod sync_jobs;
mod table;

pub use admission::AdmissionArgs;
pub use sync_jobs::SyncJobArgs;
#[cfg(test)]
use table::ServeOnly;
pub use table::markdown_table;

/// Flags and environment of `voicegate serve`. Secrets are never printed (`hide_env_values`).
#[derive(Debug, Clone, Args)]
pub struct ServeConfig {
    /// Address to listen on. A non-loopback address requires token verification (JWKS or HS256).
    #[arg(long, env = "VOICEGATE_BIND", default_value = defaults::BIND)]
    pub bind: String,

    /// Redis URL for durable metering. Unset: the embedded in-memory store (not durable, single node).
    #[arg(long, env = "VOICEGATE_REDIS_URL")]
    pub redis_url: Option<String>,

    /// Redis Cluster instead of one Redis: comma-separated seed URLs (`redis://host:port`) of some of its nodes. Setting both it and VOICEGATE_REDIS_URL refuses to start.
    #[arg(long, env = "VOICEGATE_REDIS_CLUSTER_NODES", value_delimiter = ',')]
    pub redis_cluster_nodes: Vec<String>,

    /// Replicas that must acknowledge each meter flush (`WAIT` after the scripts, to the master of the users' slot), so an acknowledged minute survives a master failover; fewer in time fails the flush, which is retried. 0 = off. Refuses to start when the store answers with fewer replicas (docs/metering.md#delivery-guarantees).
    #[arg(long, env = "VOICEGATE_REDIS_WAIT_REPLICAS", default_value_t = defaults::REDIS_WAIT_REPLICAS)]
    pub redis_wait_replicas: u32,

    /// Longest wait (ms) for the replicas' acknowledgement of one flush (with VOICEGATE_REDIS_WAIT_REPLICAS).
    #[arg(long, env = "VOICEGATE_REDIS_WAIT_TIMEOUT_MS", default_value_t = defaults::REDIS_WAIT_TIMEOUT_MS)]
    pub redis_wait_timeout_ms: u64,

    /// Key for the `/v1/admin/…` routes (header `X-Admin-Key`). Unset: admin routes answer 403.
    #[arg(long, env = "ADMIN_KEY", hide_env_values = true)]
    pub admin_key: Option<String>,

    /// JWKS for RS256 ID tokens (Firebase-compatible): an `https://` URL (e.g. Firebase's, refreshed per its Cache-Control and on an unknown `kid`; `http://` only to a loopback host), or a file path (re-read every minute).
    #[arg(long, env = "VOICEGATE_JWKS")]
    pub jwks: Option<String>,

    /// Shortest time (s) a fetched JWKS URL is kept before the next scheduled fetch, whatever its `Cache-Control: max-age` says.
    #[arg(long, env = "VOICEGATE_JWKS_REFRESH_MIN_SECS", default_value_t = defaults::JWKS_REFRESH_MIN_SECS)]
    pub jwks_refresh_min_secs: u64,

    /// Longest time (s) a fetched JWKS URL is kept before the next scheduled fetch, whatever its `Cache-Control: max-age` says (without one: an hour, within both bounds).
    #[arg(long, env = "VOICEGATE_JWKS_REFRESH_MAX_SECS", default_value_t = defaults::JWKS_REFRESH_MAX_SECS)]
    pub jwks_refresh_max_secs: u64,

    /// Shared secret for HS256 tokens.
    #[arg(long, env = "VOICEGATE_JWT_HS256_SECRET", hide_env_values = true)]
    pub jwt_hs256_secret: Option<String>,

    /// Required `aud` claim (the Firebase project id), when set.
    #[arg(long, env = "VOICEGATE_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,

    /// Required `iss` claim (`https://securetoken.google.com/<project>`), when set.
    #[arg(long, env = "VOICEGATE_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// Stripe webhook signing secret (`whsec_…`). Unset: the webhook answers 503.
    #[arg(long, env = "STRIPE_WEBHOOK_SECRET", hide_env_values = true)]
    pub stripe_webhook_secret: Option<String>,

    /// Largest accepted age (and future skew) of a Stripe-Signature timestamp, in seconds.
    #[arg(long, env = "VOICEGATE_STRIPE_TOLERANCE_SECS", default_value_t = defaults::STRIPE_TOLERANCE_SECS)]
    pub stripe_tolerance_secs: u64,

    /// Largest accepted upload file, in bytes (413 `upload_file_too_large` above it).
    #[arg(long, env = "VOICEGATE_UPLOAD_MAX_FILE_BYTES", default_value_t = defaults::UPLOAD_MAX_FILE_BYTES)]
    pub upload_max_file_bytes: u64,

    /// Most files in one upload request (413 `upload_too_many_files` above it).
    #[arg(long, env = "VOICEGATE_UPLOAD_MAX_FILES", default_value_t = defaults::UPLOAD_MAX_FILES)]
    pub upload_max_files: usize,

    /// Largest upload request body, in bytes (413 `upload_request_too_large` above it).
    #[arg(long, env = "VOICEGATE_UPLOAD_MAX_REQUEST_BYTES", default_value_t = defaults::UPLOAD_MAX_REQUEST_BYTES)]
    pub upload_max_request_bytes: u64,

    /// Directory for upload temp files. Unset: the system temp directory.
    #[arg(long, env = "VOICEGATE_UPLOAD_DIR")]
    pub upload_dir: Option<PathBuf>,

    /// Largest websocket message, in bytes (close 1009 above it).
    #[arg(long, env = "VOICEGATE_WS_MAX_MESSAGE_BYTES", default_value_t = defaults::WS_MAX_MESSAGE_BYTES)]
    pub ws_max_message_bytes: usize,

    /// Most concurrent listen sessions per user, counted on every node sharing the store (429 `too_many_sessions` above it).
    #[arg(long, env = "VOICEGATE_WS_SESSIONS_PER_USER", default_value_t = defaults::WS_SESSIONS_PER_USER)]
    pub ws_sessions_per_user: usize,

    /// Most concurrent listen sessions on this node, all users (503 `at_capacity` above it).
    #[arg(long, env = "VOICEGATE_WS_MAX_SESSIONS", default_value_t = defaults::WS_MAX_SESSIONS)]
    pub ws_max_sessions: usize,

    /// Seconds a slot of a per-user limit (sessions, …) lives without its node's heartbeat (refreshed every third of it): how long a crashed node's sessions still count.
    #[arg(long, env = "VOICEGATE_LEASE_TTL_SECS", default_value_t = defaults::LEASE_TTL_SECS)]
    pub lease_ttl_secs: u64,

    /// Longest wait (ms) for the store when taking a slot of a per-user limit; past it the limit's failure mode applies (docs/operations.md#per-user-and-per-address-limits).
    #[arg(long, env = "VOICEGATE_LEASE_TIMEOUT_MS", default_value_t = defaults::LEASE_TIMEOUT_MS)]
    pub lease_timeout_ms: u64,

    /// A listen session with no client message for this long closes with 1001 `idle timeout`.
    #[arg(long, env = "VOICEGATE_WS_IDLE_TIMEOUT_SECS", default_value_t = defaults::WS_IDLE_TIMEOUT_SECS)]
    pub ws_idle_timeout_secs: u64,

    /// Pipeline threads running listen sessions' decode, resampling and VAD (off the HTTP workers); 0 = one per CPU.
    #[arg(long, env = "VOICEGATE_LISTEN_THREADS", default_value_t = defaults::LISTEN_THREADS)]
    pub listen_threads: usize,

    /// How often a listen session runs its pipeline on the frames that arrived, in ms (bounds event latency).
    #[arg(long, env = "VOICEGATE_LISTEN_TICK_MS", default_value_t = defaults::LISTEN_TICK_MS)]
    pub listen_tick_ms: u64,

    /// Audio (ms) a listen session buffers between the socket and its pipeline; frames beyond it are dropped and reported.
    #[arg(long, env = "VOICEGATE_LISTEN_BUFFER_MS", default_value_t = defaults::LISTEN_BUFFER_MS)]
    pub listen_buffer_ms: u64,

    /// Most audio one listen session takes in per second of wall time, sustained, as a multiple of real time; a faster client is slowed (its socket is not read), never metered faster.
    #[arg(long, env = "VOICEGATE_LISTEN_MAX_PACE", default_value_t = defaults::LISTEN_MAX_PACE)]
    pub listen_max_pace: f64,

    /// Audio (ms) a listen session takes in at once above the pace (a reconnect's backlog; at least 1 s), refilled at the pace.
    #[arg(long, env = "VOICEGATE_LISTEN_BURST_MS", default_value_t = defaults::LISTEN_BURST_MS)]
    pub listen_burst_ms: u64,

    /// Most concurrent sync uploads per user, counted on every node sharing the store (429 `too_many_uploads` above it).
    #[arg(long, env = "VOICEGATE_SYNC_UPLOADS_PER_USER", default_value_t = defaults::SYNC_UPLOADS_PER_USER)]
    pub sync_uploads_per_user: usize,

    /// Most concurrent sync uploads on this node, all users (503 `uploads_at_capacity` above it).
    #[arg(long, env = "VOICEGATE_SYNC_MAX_UPLOADS", default_value_t = defaults::SYNC_MAX_UPLOADS)]
    pub sync_max_uploads: usize,

    /// Failed authentications (bad or missing tokens; wrong admin keys, counted apart) one client address may make at once, and then per minute; past it, 429 `too_many_auth_failures`.
    #[arg(long, env = "VOICEGATE_AUTH_FAILURES_PER_MINUTE", default_value_t = defaults::AUTH_FAILURES_PER_MINUTE)]
    pub auth_failures_per_minute: u32,

    /// Client addresses whose failures are tracked at once (bounded memory); past it, new addresses share one budget.
    #[arg(long, env = "VOICEGATE_AUTH_THROTTLE_MAX_ADDRESSES", default_value_t = defaults::AUTH_THROTTLE_MAX_ADDRESSES)]
    pub auth_throttle_max_addresses: usize,

    /// Comma-separated addresses or CIDRs of reverse proxies whose `X-Forwarded-For` names the client. Unset: the peer address is the client.
    #[arg(long, env = "VOICEGATE_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Vec<String>,

    /// Backfill speech (sync files recorded more than 24 h before they arrive) metered per user per UTC day; past it, 429 `backfill_allowance_exhausted` until the next UTC midnight.
    #[arg(long, env = "VOICEGATE_BACKFILL_ALLOWANCE_MS", default_value_t = defaults::BACKFILL_ALLOWANCE_MS)]
    pub backfill_allowance_ms: u64,

    /// Sync files recorded more than this many days before they arrive are refused `recording_too_old`.
    #[arg(long, env = "VOICEGATE_BACKFILL_LOOKBACK_DAYS", default_value_t = defaults::BACKFILL_LOOKBACK_DAYS)]
    pub backfill_lookback_days: u64,

    /// A request head not complete this long after the connection opened (or the previous answer) gets 408 and the connection closes.
    #[arg(long, env = "VOICEGATE_HEADER_TIMEOUT_SECS", default_value_t = defaults::HEADER_TIMEOUT_SECS)]
    pub header_timeout_secs: u64,

    /// A request body with no new byte for this long gets 408 `request_body_stalled` (its upload temp files are removed at once).
    #[arg(long, env = "VOICEGATE_BODY_IDLE_TIMEOUT_SECS", default_value_t = defaults::BODY_IDLE_TIMEOUT_SECS)]
    pub body_idle_timeout_secs: u64,

    /// A request body not complete this long after its head gets 408 `request_body_timeout` (however steadily it trickles).
    #[arg(long, env = "VOICEGATE_BODY_TIMEOUT_SECS", default_value_t = defaults::BODY_TIMEOUT_SECS)]
    pub body_timeout_secs: u64,

    /// Time allowed for a drain (close sessions, finish requests, flush the meter) after SIGTERM/SIGINT.
    #[arg(long, env = "VOICEGATE_DRAIN_TIMEOUT_SECS", default_value_t = defaults::DRAIN_TIMEOUT_SECS)]
    pub drain_timeout_secs: u64,

    /// HTTP worker threads (the websocket I/O only moves bytes; decode and VAD run on the pipeline threads); 0 = half the CPUs, at least one.
    #[arg(long, env = "VOICEGATE_WORKERS", default_value_t = defaults::WORKERS)]
    pub workers: usize,

    /// Speech-to-text provider: local, deepgram, openai or none (docs/stt.md). Unset: local when its engine is installed, else none, said in one log line.
    #[arg(long, env = "VOICEGATE_STT")]
    pub stt: Option<String>,

    /// A second speech-to-text provider (local, deepgram, openai; none or unset: no fallback) that serves new streams, streams whose provider just failed, and sync spans while the primary is failing (docs/stt.md "Fallback").
    #[arg(long, env = "VOICEGATE_STT_FALLBACK")]
    pub stt_fallback: Option<String>,

    /// How long each failure of the primary keeps new streams and spans on the fallback; a stream goes back to the primary at a speech run's start after it.
    #[arg(long, env = "VOICEGATE_STT_FALLBACK_SECS", default_value_t = defaults::STT_FALLBACK_SECS)]
    pub stt_fallback_secs: u64,

    /// Worker threads of the local speech-to-text engine (one model each: ~140-180 MB idle, ~1.5 GB while transcribing a 10 s chunk, growing with the engine's leak up to VOICEGATE_STT_LOCAL_MAX_RSS_MB), run below the pipeline's priority.
    #[arg(long, env = "VOICEGATE_STT_LOCAL_THREADS", default_value_t = defaults::STT_LOCAL_THREADS)]
    pub stt_local_threads: usize,

    /// Places in the local speech-to-text engine's queue: chunks waiting for a worker or still being filled by a speaking session (a chunk takes its place with its first sample), 1 to 4096. A session that finds no place has that chunk's audio refused, counted and not charged.
    #[arg(long, env = "VOICEGATE_STT_LOCAL_QUEUE_CHUNKS", default_value_t = defaults::STT_LOCAL_QUEUE_CHUNKS, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=4096))]
    pub stt_local_queue_chunks: usize,

    /// Resident memory (MB) past which the local engine's process is replaced after its chunk (each worker runs its model in a child process, `voicegate stt-engine`, because the pinned engine leaks ~14-17 MB per second of audio it transcribes); 0 = run the models inside the server, unbounded.
    #[arg(long, env = "VOICEGATE_STT_LOCAL_MAX_RSS_MB", default_value_t = defaults::STT_LOCAL_MAX_RSS_MB)]
    pub stt_local_max_rss_mb: u64,

    /// The program the local engine's child processes run (`voicegate stt-engine`): set by `voicegate serve` to its own binary. Unset (embedders and in-process tests): the models run inside the process.
    #[arg(skip)]
    pub stt_local_exe: Option<PathBuf>,

    /// Folder of the local speech-to-text engine, as scripts/deps.sh unpacks it. Unset: ~/.cache/voicegate/moonshine-cpp-0.1.4 ($XDG_CACHE_HOME honoured).
    #[arg(long, env = "VOICEGATE_STT_LOCAL_DIR")]
    pub stt_local_dir: Option<PathBuf>,

    /// Audio (ms) before each speech run that is sent to speech-to-text with it (kept by sessions with a provider; charged as sent).
    #[arg(long, env = "VOICEGATE_STT_PREROLL_MS", default_value_t = defaults::STT_PREROLL_MS)]
    pub stt_preroll_ms: u64,

    /// PEM file of the certificate authorities every outbound TLS connection (speech-to-text providers, the JWKS URL, the fair-use classifier) trusts, instead of the Mozilla roots built in (e.g. /etc/ssl/certs/ca-certificates.crt, or a private CA).
    #[arg(long, env = "VOICEGATE_TLS_CA_FILE")]
    pub tls_ca_file: Option<PathBuf>,

    /// Log line format on standard output: `text` (human-readable) or `json` (one JSON object per line, for a log collector).
    #[arg(long, env = "VOICEGATE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Every so many seconds, give the pages of the C allocator's freed memory back to the kernel (glibc's `malloc_trim`, on a blocking thread; `voicegate_process_heap_trim_seconds`); 0 = never: freed memory then stays resident until reused.
    #[arg(long, env = "VOICEGATE_HEAP_TRIM_SECS", default_value_t = defaults::HEAP_TRIM_SECS)]
    pub heap_trim_secs: u64,

    /// Deepgram's settings (`DEEPGRAM_API_KEY`, `VOICEGATE_DEEPGRAM_*`).
    #[command(flatten)]
    pub deepgram: DeepgramArgs,

    /// The OpenAI-compatible provider's settings (`OPENAI_API_KEY`, `VOICEGATE_OPENAI_*`).
    #[command(flatten)]
    pub openai: OpenAiArgs,

    /// Sync v2 jobs' settings (`VOICEGATE_SYNC_SPOOL_DIR`, workers, quotas, retention).
    #[command(flatten)]
    pub sync_jobs: SyncJobArgs,

    /// Admission control of listen sessions by measured load (`VOICEGATE_ADMISSION_*`).
    #[command(flatten)]
    pub admission: AdmissionArgs,

    /// The meter's settings (`VOICEGATE_METER_*`).
    #[command(flatten)]
    pub meter: MeterArgs,

    /// The fair-use settings (`FAIR_USE_*`, `VOICEGATE_FAIR_USE_*`, `VOICEGATE_CLASSIFIER_*`).
    #[command(flatten)]
    pub fair_use: FairUseArgs,
}

impl Default for ServeConfig {
    /// The defaults with nothing configured: no secrets, loopback bind (dev auth), in-memory store.
    fn default() -> Self {
        ServeConfig {
            bind: defaults::BIND.to_owned(),
            redis_url: None,
            redis_cluster_nodes: Vec::new(),
            redis_wait_replicas: defaults::REDIS_WAIT_REPLICAS,
            redis_wait_timeout_ms: defaults::REDIS_WAIT_TIMEOUT_MS,
            admin_key: None,
            jwks: None,
            jwks_refresh_min_secs: defaults::JWKS_REFRESH_MIN_SECS,
            jwks_refresh_max_secs: defaults::JWKS_REFRESH_MAX_SECS,
            jwt_hs256_secret: None,
            jwt_audience: None,
            jwt_issuer: None,
            stripe_webhook_secret: None,
            stripe_tolerance_secs: defaults::STRIPE_TOLERANCE_SECS,
            upload_max_file_bytes: defaults::UPLOAD_MAX_FILE_BYTES,
            upload_max_files: defaults::UPLOAD_MAX_FILES,
            upload_max_request_bytes: defaults::UPLOAD_MAX_REQUEST_BYTES,
            upload_dir: None,
            ws_max_message_bytes: defaults::WS_MAX_MESSAGE_BYTES,
            ws_sessions_per_user: defaults::WS_SESSIONS_PER_USER,
            ws_max_sessions: defaults::WS_MAX_SESSIONS,
            lease_ttl_secs: defaults::LEASE_TTL_SECS,
            lease_timeout_ms: defaults::LEASE_TIMEOUT_MS,
            drain_timeout_secs: defaults::DRAIN_TIMEOUT_SECS,
            backfill_allowance_ms: defaults::BACKFILL_ALLOWANCE_MS,
            backfill_lookback_days: defaults::BACKFILL_LOOKBACK_DAYS,
            header_timeout_secs: defaults::HEADER_TIMEOUT_SECS,
            body_idle_timeout_secs: defaults::BODY_IDLE_TIMEOUT_SECS,
            body_timeout_secs: defaults::BODY_TIMEOUT_SECS,
            workers: defaults::WORKERS,
            ws_idle_timeout_secs: defaults::WS_IDLE_TIMEOUT_SECS,
            listen_threads: defaults::LISTEN_THREADS,
            listen_tick_ms: defaults::LISTEN_TICK_MS,
            listen_buffer_ms: defaults::LISTEN_BUFFER_MS,
            listen_max_pace: defaults::LISTEN_MAX_PACE,
            listen_burst_ms: defaults::LISTEN_BURST_MS,
            sync_uploads_per_user: defaults::SYNC_UPLOADS_PER_USER,
            sync_max_uploads: defaults::SYNC_MAX_UPLOADS,
            auth_failures_per_minute: defaults::AUTH_FAILURES_PER_MINUTE,
            auth_throttle_max_addresses: defaults::AUTH_THROTTLE_MAX_ADDRESSES,
            trusted_proxies: Vec::new(),
            // Embedders and tests start many servers: none of them loads a speech-to-text model unless it
            // asks for one. (The command line's default is unset: local when installed.)
            stt: Some("none".to_owned()),
            stt_fallback: None,
            stt_fallback_secs: defaults::STT_FALLBACK_SECS,
            stt_local_threads: defaults::STT_LOCAL_THREADS,
            stt_local_queue_chunks: defaults::STT_LOCAL_QUEUE_CHUNKS,
            stt_local_max_rss_mb: defaults::STT_LOCAL_MAX_RSS_MB,
            stt_local_exe: None,
            stt_local_dir: None,
            stt_preroll_ms: defaults::STT_PREROLL_MS,
            tls_ca_file: None,
            log_format: LogFormat::Text,
            heap_trim_secs: defaults::HEAP_TRIM_SECS,
            deepgram: DeepgramArgs::default(),
            openai: OpenAiArgs::default(),
            sync_jobs: SyncJobArgs::default(),
            // Off unless asked: a test process's own client work would count as the server's CPU.
            admission: AdmissionArgs::off(),
            meter: MeterArgs::default(),
            fair_use: FairUseArgs::default(),
        }
    }
}

/// `VOICEGATE_LOG_FORMAT`: how `voicegate serve` writes its log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (coloured on a terminal).
    #[default]
    Text,
    /// One JSON object per line (`timestamp`, `level`, `fields`, `target`), for a log collector.
    Json,
}

/// A configuration that cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("VOICEGATE_BIND={bind:?} is not a host:port address: {reason}")]
    BadBind { bind: String, reason: String },
    #[error(
        "refusing to start: VOICEGATE_BIND={bind} is not a loopback address and no token verification is \
         configured; set VOICEGATE_JWKS or VOICEGATE_JWT_HS256_SECRET (dev mode, bearer = uid, only runs on loopback)"
    )]
    DevAuthOnPublicBind { bind: String },
    #[error("{name} must be greater than 0")]
    ZeroLimit { name: &'static str },
    #[error(
        "refusing to start: both VOICEGATE_REDIS_URL and VOICEGATE_REDIS_CLUSTER_NODES are set; set the URL for one Redis, or the seed nodes for a Redis Cluster"
    )]
    BothRedisModes,
    #[error(
        "VOICEGATE_LISTEN_MAX_PACE={0} must be a number of at least 1 (a multiple of real time)"
    )]
    BadPace(f64),
    #[error(
        "refusing to start: VOICEGATE_JWKS={0} is a plain http:// URL to a host that is not loopback; use https:// (http:// is only for a JWKS served on this machine, e.g. in tests)"
    )]
    JwksPlainHttp(String),
    #[error("VOICEGATE_JWKS={url} is not a usable URL: {reason}")]
    BadJwksUrl { url: String, reason: String },
    #[error(
        "VOICEGATE_JWKS_REFRESH_MIN_SECS={min} must be at least 1 and at most VOICEGATE_JWKS_REFRESH_MAX_SECS={max}"
    )]
    BadJwksRefresh { min: u64, max: u64 },
    #[error(
        "{name}={value} is less than VOICEGATE_UPLOAD_MAX_REQUEST_BYTES={request}: an upload of the full size would never fit"
    )]
    SpoolBelowRequest {
        name: &'static str,
        value: u64,
        request: u64,
    },
    #[error("{name}={value} is out of range ({range})")]
    BadAdmission {
        name: &'static str,
        value: String,
        range: &'static str,
    },
    #[error("VOICEGATE_TRUSTED_PROXIES: {0}")]
    BadTrustedProxy(String),
    /// A metering or fair-use setting the engine cannot run with.
    #[error(transparent)]
    Engine(#[from] voicegate_engine::config::ConfigError),
}

impl ServeConfig {
    /// Resolves the bind address (a literal `ip:port`, or `host:port` resolved once at startup).
    pub fn bind_addrs(&self) -> Result<Vec<SocketAddr>, ConfigError> {
        let bad = |reason: String| ConfigError::BadBind {
            bind: self.bind.clone(),
            reason,
        };
        if let Ok(addr) = self.bind.parse::<SocketAddr>() {
            return Ok(vec![addr]);
        }
        let addrs: Vec<SocketAddr> = self
            .bind
            .to_socket_addrs()
            .map_err(|e| bad(e.to_string()))?
            .collect();
        if addrs.is_empty() {
            return Err(bad("resolves to no address".to_owned()));
        }
        Ok(addrs)
    }

    /// True when every address the bind resolves to is loopback.
    pub fn bind_is_loopback(&self) -> Result<bool, ConfigError> {
        Ok(self.bind_addrs()?.iter().all(|a| a.ip().is_loopback()))
    }

    /// True when some token verification (JWKS or HS256) is configured.
    pub fn has_token_verification(&self) -> bool {
        self.jwks.is_some() || self.jwt_hs256_secret.is_some()
    }

    /// The Redis to use: `None` for the embedded in-memory store.
    pub fn redis(&self) -> Option<voicegate_engine::store::RedisStoreConfig> {
        use voicegate_engine::store::RedisStoreConfig;
        let seeds: Vec<String> = self
            .redis_cluster_nodes
            .iter()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect();
        let config = if !seeds.is_empty() {
            RedisStoreConfig::cluster(seeds)
        } else {
            RedisStoreConfig::new(self.redis_url.as_deref().filter(|u| !u.is_empty())?)
        };
        Some(RedisStoreConfig {
            wait_replicas: self.redis_wait_replicas,
            wait_timeout: Duration::from_millis(self.redis_wait_timeout_ms),
            ..config
        })
    }

    /// Checks everything that can be checked without I/O beyond name resolution.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.redis_url.as_deref().is_some_and(|u| !u.is_empty())
            && self
                .redis_cluster_nodes
                .iter()
                .any(|s| !s.trim().is_empty())
        {
            return Err(ConfigError::BothRedisModes);
        }
        if !self.has_token_verification() && !self.bind_is_loopback()? {
            return Err(ConfigError::DevAuthOnPublicBind {
                bind: self.bind.clone(),
            });
        }
        let limits: [(&'static str, u64); 19] = [
            (
                "VOICEGATE_UPLOAD_MAX_FILE_BYTES",
                self.upload_max_file_bytes,
            ),
            ("VOICEGATE_UPLOAD_MAX_FILES", self.upload_max_files as u64),
            (
                "VOICEGATE_UPLOAD_MAX_REQUEST_BYTES",
                self.upload_max_request_bytes,
            ),
            (
                "VOICEGATE_WS_MAX_MESSAGE_BYTES",
                self.ws_max_message_bytes as u64,
            ),
            (
                "VOICEGATE_WS_SESSIONS_PER_USER",
                self.ws_sessions_per_user as u64,
            ),
            ("VOICEGATE_WS_MAX_SESSIONS", self.ws_max_sessions as u64),
            ("VOICEGATE_LEASE_TTL_SECS", self.lease_ttl_secs),
            ("VOICEGATE_LEASE_TIMEOUT_MS", self.lease_timeout_ms),
            (
                "VOICEGATE_REDIS_WAIT_TIMEOUT_MS",
                self.redis_wait_timeout_ms,
            ),
            ("VOICEGATE_HEADER_TIMEOUT_SECS", self.header_timeout_secs),
            (
                "VOICEGATE_BODY_IDLE_TIMEOUT_SECS",
                self.body_idle_timeout_secs,
            ),
            ("VOICEGATE_BODY_TIMEOUT_SECS", self.body_timeout_secs),
            ("VOICEGATE_STT_LOCAL_THREADS", self.stt_local_threads as u64),
            ("VOICEGATE_STT_FALLBACK_SECS", self.stt_fallback_secs),
            (
                "VOICEGATE_BACKFILL_LOOKBACK_DAYS",
                self.backfill_lookback_days,
            ),
            (
                "VOICEGATE_SYNC_UPLOADS_PER_USER",
                self.sync_uploads_per_user as u64,
            ),
            ("VOICEGATE_SYNC_MAX_UPLOADS", self.sync_max_uploads as u64),
            (
                "VOICEGATE_AUTH_FAILURES_PER_MINUTE",
                u64::from(self.auth_failures_per_minute),
            ),
            (
                "VOICEGATE_AUTH_THROTTLE_MAX_ADDRESSES",
                self.auth_throttle_max_addresses as u64,
            ),
        ];
        if let Some((name, _)) = limits
            .iter()
            .chain(&self.sync_jobs.limits())
            .find(|(_, v)| *v == 0)
        {
            return Err(ConfigError::ZeroLimit { name });
        }
        if let Some((name, value)) = self
            .sync_jobs
            .spool_bounds()
            .into_iter()
            .find(|(_, v)| *v < self.upload_max_request_bytes)
        {
            return Err(ConfigError::SpoolBelowRequest {
                name,
                value,
                request: self.upload_max_request_bytes,
            });
        }
        if !(self.listen_max_pace.is_finite() && self.listen_max_pace >= 1.0) {
            return Err(ConfigError::BadPace(self.listen_max_pace));
        }
        self.check_jwks()?;
        crate::client_addr::TrustedProxies::parse(&self.trusted_proxies)
            .map_err(ConfigError::BadTrustedProxy)?;
        self.meter_config()?;
        self.fair_use_config()?;
        self.admission.config()?;
        Ok(())
    }

    /// The meter's configuration, checked (see [`MeterArgs::config`]).
    pub fn meter_config(&self) -> Result<MeterConfig, ConfigError> {
        let mut cfg = self.meter.config()?;
        // A sync file's content hash is kept as long as a recording that old can be uploaded (+2 days).
        cfg.keys_retention = Duration::from_millis(self.backfill().idempotency_retention_ms());
        Ok(cfg)
    }

    /// The fair-use configuration, checked (see [`FairUseArgs::config`]).
    pub fn fair_use_config(&self) -> Result<FairUseConfig, ConfigError> {
        Ok(self.fair_use.config()?)
    }

    /// The backfill decision's settings (DESIGN §3 "Backfill").
    pub fn backfill(&self) -> voicegate_engine::policy::backfill::BackfillConfig {
        voicegate_engine::policy::backfill::BackfillConfig {
            allowance_ms: self.backfill_allowance_ms,
            lookback_ms: self.backfill_lookback_days.saturating_mul(86_400_000),
            ..Default::default()
        }
    }

    /// The listen sessions' intake limit (`VOICEGATE_LISTEN_MAX_PACE`, `VOICEGATE_LISTEN_BURST_MS`).
    pub fn listen_pace(&self) -> voicegate_engine::pipeline::live::PaceConfig {
        voicegate_engine::pipeline::live::PaceConfig::new(
            self.listen_max_pace,
            Duration::from_millis(self.listen_burst_ms),
        )
    }

    pub fn drain_timeout(&self) -> Duration {
        Duration::from_secs(self.drain_timeout_secs)
    }

    /// The lifetime and store timeout of the slots of per-user limits.
    pub fn lease(&self) -> voicegate_engine::lease::LeaseConfig {
        voicegate_engine::lease::LeaseConfig {
            ttl: Duration::from_secs(self.lease_ttl_secs),
            timeout: Duration::from_millis(self.lease_timeout_ms),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    fn parse(args: &[&str]) -> ServeConfig {
        let mut full = vec!["serve"];
        full.extend_from_slice(args);
        ServeOnly::try_parse_from(full)
            .map(|s| s.config)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn defaults_match_the_default_impl() {
        // Env vars of the test process could leak in; only check fields whose env is unlikely to be set.
        let parsed = parse(&["--bind", "127.0.0.1:8080"]);
        let d = ServeConfig::default();
        assert_eq!(parsed.upload_max_file_bytes, d.upload_max_file_bytes);
        assert_eq!(parsed.upload_max_files, d.upload_max_files);
        assert_eq!(parsed.drain_timeout_secs, d.drain_timeout_secs);
        assert_eq!(parsed.ws_sessions_per_user, d.ws_sessions_per_user);
    }

    #[test]
    fn engine_settings_are_flags_of_serve() {
        let parsed = parse(&[
            "--meter-flush-interval-ms",
            "250",
            "--fair-use-enabled",
            "false",
            "--fair-use-exempt-uids",
            "a,b",
        ]);
        assert_eq!(parsed.meter.flush_interval_ms, 250);
        let fair = parsed.fair_use_config().unwrap_or_else(|e| panic!("{e}"));
        assert!(!fair.enabled);
        assert_eq!(fair.exempt_uids.len(), 2);
    }

    #[test]
    fn impossible_engine_settings_fail_validation_naming_them() {
        let mut cfg = ServeConfig::default();
        cfg.meter.max_pending_total = 1;
        let err = cfg
            .validate()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("VOICEGATE_METER_MAX_PENDING_PER_USER")
                && err.contains("VOICEGATE_METER_MAX_PENDING_TOTAL"),
            "{err}"
        );
        let mut cfg = ServeConfig::default();
        cfg.fair_use.weekly_speech_ms = 0;
        let err = cfg
            .validate()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("FAIR_USE_WEEKLY_SPEECH_MS"), "{err}");
    }

    #[test]
    fn spool_bounds_below_one_full_upload_fail_validation_naming_them() {
        assert!(ServeConfig::default().validate().is_ok());
        let mut cfg = ServeConfig::default();
        cfg.sync_jobs.spool_bytes_per_user = cfg.upload_max_request_bytes - 1;
        let err = cfg.validate().err().map(|e| e.to_string());
        assert!(
            err.as_deref()
                .is_some_and(|e| e.contains("VOICEGATE_SYNC_SPOOL_BYTES_PER_USER")),
            "{err:?}"
        );
        let mut cfg = ServeConfig::default();
        cfg.sync_jobs.spool_max_bytes = 1;
        let err = cfg.validate().err().map(|e| e.to_string());
        assert!(
            err.as_deref()
                .is_some_and(|e| e.contains("VOICEGATE_SYNC_SPOOL_MAX_BYTES")),
            "{err:?}"
        );
        // Equal is enough; the free-space reserve may be 0 (off).
        let mut cfg = ServeConfig::default();
        cfg.sync_jobs.spool_bytes_per_user = cfg.upload_max_request_bytes;
        cfg.sync_jobs.spool_min_free_bytes = 0;
        assert!(cfg.validate().is_ok());
    }

    #[test]
    fn dev_auth_on_public_bind_is_refused() {
        let cfg = ServeConfig {
            bind: "0.0.0.0:8080".into(),
            ..ServeConfig::default()
        };
        assert!(matches!(
            cfg.validate(),
            Err(ConfigError::DevAuthOnPublicBind { .. })
        ));
    }

    #[test]
    fn public_bind_with_hs256_secret_is_accepted() {
        let cfg = ServeConfig {
            bind: "0.0.0.0:8080".into(),
            jwt_hs256_secret: Some("s".into()),
            ..ServeConfig::default()
        };
        assert!(cfg.validate().is_ok());
    }

    #[test]
    fn loopback_binds_allow_dev_auth() {
        for bind in ["127.0.0.1:0", "[::1]:8080", "localhost:8080"] {
            let cfg = ServeConfig {
                bind: bind.into(),
                ..ServeConfig::default()
            };
            assert!(cfg.validate().is_ok(), "{bind}");
        }
    }

    #[test]
    fn unparsable_bind_is_a_clear_error() {
        let cfg = ServeConfig {
            bind: "nonsense".into(),
            ..ServeConfig::default()
        };
        assert!(matches!(cfg.validate(), Err(ConfigError::BadBind { .. })));
    }

    #[test]
    fn zero_limit_is_refused_with_its_env_name() {
        let cfg = ServeConfig {
            upload_max_files: 0,
            ..ServeConfig::default()
        };
        let err = cfg
            .validate()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("VOICEGATE_UPLOAD_MAX_FILES"), "{err}");
    }

    #[test]
    fn every_setting_has_an_env_name_a_help_and_a_unique_env() {
        let cmd = ServeOnly::command();
        let mut seen = std::collections::BTreeSet::new();
        for arg in cmd.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if long == "help" {
                continue;
            }
            let env = arg
                .get_env()
                .map(|e| e.to_string_lossy().into_owned())
                .unwrap_or_else(|| panic!("--{long} has no environment variable"));
            assert!(arg.get_help().is_some(), "--{long} has no help");
            assert!(seen.insert(env.clone()), "{env} is used twice");
        }
        assert!(seen.len() > 60, "only {} settings", seen.len());
    }

    #[test]
    fn table_lists_every_env_name() {
        let table = markdown_table();
        for env in [
            "VOICEGATE_BIND",
            "ADMIN_KEY",
            "STRIPE_WEBHOOK_SECRET",
            "VOICEGATE_JWKS",
            "VOICEGATE_WORKERS",
            "VOICEGATE_METER_FLUSH_INTERVAL_MS",
            "VOICEGATE_METER_SHARDS",
            "FAIR_USE_DAILY_SPEECH_MS",
            "BASIC_TIER_MINUTES_LIMIT_PER_MONTH",
            "VOICEGATE_CLASSIFIER_RETRY_MAX_SECONDS",
        ] {
            assert!(table.contains(env), "{env} missing from\n{table}");
        }
    }

    #[test]
    fn sync_content_hashes_are_kept_the_backfill_lookback_plus_two_days() {
        let day = Duration::from_secs(86_400);
        let meter = ServeConfig::default().meter_config().unwrap();
        assert_eq!(meter.keys_retention, 32 * day);
        assert_eq!(meter.retention, 8 * day, "buckets keep their own retention");
        let longer = parse(&["--backfill-lookback-days", "60"])
            .meter_config()
            .unwrap();
        assert_eq!(longer.keys_retention, 62 * day);
    }
}

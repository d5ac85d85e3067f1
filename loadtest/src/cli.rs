//! Command line: scenarios (`realtime`, `sync`, `mixed`) and the options they share.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::auth::AuthMode;

#[derive(Debug, Parser)]
#[command(
    name = "voicegate-loadtest",
    about = "Load-test a VoiceGate server: realtime listen streams and sync uploads, then check that \
             every millisecond of speech was metered"
)]
pub struct Cli {
    #[command(flatten)]
    pub common: Common,
    #[command(subcommand)]
    pub scenario: Scenario,
}

#[derive(Debug, Args)]
pub struct Common {
    /// Base URL of the server (http://host:port); websocket URLs are derived from it. Several nodes of one
    /// deployment: their URLs comma-separated. Realtime stream i goes to node i mod N (a user's streams to
    /// consecutive nodes), a user's sync uploads and status reads to nodes other than its first stream's, on
    /// purpose: nothing may depend on sticky routing.
    #[arg(long, global = true, default_value = "http://127.0.0.1:8080", value_parser = parse_nodes)]
    pub url: Nodes,
    /// `dev` (bearer = uid, for a loopback server in dev mode) or `hs256:<secret>` (mints JWTs).
    #[arg(long, global = true, default_value = "dev", value_parser = AuthMode::parse)]
    pub auth: AuthMode,
    /// `aud` claim of minted tokens (when the server checks VOICEGATE_JWT_AUDIENCE).
    #[arg(long, global = true)]
    pub jwt_audience: Option<String>,
    /// `iss` claim of minted tokens (when the server checks VOICEGATE_JWT_ISSUER).
    #[arg(long, global = true)]
    pub jwt_issuer: Option<String>,
    /// Users are named P0…P(N-1); the default is unique per run (`lt<unix seconds>p<process id>u`: two runs in one second differ), so the
    /// accounting check never sees an earlier run's speech.
    #[arg(long, global = true)]
    pub users_prefix: Option<String>,
    /// Directory of fixture `.bin` files (Opus 16 kHz, 10 ms packets).
    #[arg(long, global = true)]
    pub fixtures: Option<PathBuf>,
    /// Print the report as JSON on stdout (no table, no progress bar).
    #[arg(long, global = true)]
    pub json: bool,
    /// Also write the JSON report to this file.
    #[arg(long, global = true)]
    pub report_file: Option<PathBuf>,
    /// Harness threads (it shares the machine with the server): the realtime streams are spread over this
    /// many sender threads, and the runtime of the uploads and the check has as many workers.
    #[arg(long, global = true, default_value_t = 2)]
    pub threads: usize,
    /// Skip the accounting check (status API and offline pipeline).
    #[arg(long, global = true)]
    pub no_check: bool,
    /// Seconds to wait for the status API to show all metered speech before the check gives up.
    #[arg(long, global = true, default_value_t = 30)]
    pub settle_secs: u64,
    /// Hide the progress bar.
    #[arg(long, global = true)]
    pub quiet: bool,
    /// Behave as the app does when a node is lost (a chaos run: `loadtest/chaos.sh`): a realtime stream
    /// whose connection breaks before its final metadata reconnects (backoff from 0.25 s doubling to 2 s)
    /// to the next node and goes on as a new session from the frame that was next, with the frames that
    /// fell due meanwhile sent at once (as a device sends what it buffered); an upload that got no answer
    /// (connection, timeout, 408, 5xx) is sent again with the same files until answered. The accounting
    /// check then judges per user what a node's loss may cost (`docs/reliability.md`): no speech doubled,
    /// and speech lost only within the bound of the broken sessions and of what was told just before.
    #[arg(long, global = true)]
    pub survive_node_loss: bool,
    #[command(flatten)]
    pub storm: StormArgs,
}

/// A retry storm beside the scenario (`--retry-storm N`): see `storm.rs`.
#[derive(Debug, Clone, Args)]
pub struct StormArgs {
    /// Retry storm beside the scenario: storm clients, each a user restricted and over a fair-use cap,
    /// retry their refused sync upload (429 fair_use_restricted) this many times, each retry as soon as
    /// the previous answer arrived, on one keep-alive connection. Needs the server's ADMIN_KEY
    /// (--admin-key) and caps low enough to reach (e.g. FAIR_USE_DAILY_SPEECH_MS=300000).
    #[arg(long, global = true, value_name = "N")]
    pub retry_storm: Option<u64>,
    /// Concurrent storm clients (a user each).
    #[arg(long, global = true, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    pub storm_clients: u16,
    /// Device files in the body each retry re-sends.
    #[arg(long, global = true, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    pub storm_files: u16,
    /// Seconds after the scenario's traffic starts before the storm begins (its users are set up
    /// before that traffic, not during it).
    #[arg(long, global = true, default_value_t = 0.0)]
    pub storm_after: f64,
    /// The server's `X-Admin-Key`, to restrict the storm users.
    #[arg(long, global = true, env = "ADMIN_KEY", hide_env_values = true)]
    pub admin_key: Option<String>,
    /// The server's process id (on this machine): the storm reports the server's CPU over its window
    /// and per refusal. `measure.sh` sets VOICEGATE_SERVER_PID.
    #[arg(long, global = true, env = "VOICEGATE_SERVER_PID")]
    pub server_pid: Option<u32>,
}

#[derive(Debug, Subcommand)]
pub enum Scenario {
    /// N simulated devices, each a distinct user, streaming fixture audio as 10 ms Opus frames.
    Realtime(RealtimeArgs),
    /// Concurrent uploads of fixture files with Omi device names.
    Sync(SyncArgs),
    /// Realtime streams and sync uploads at the same time (uploaders are the users after the streams,
    /// or the streams' own users with --shared-users).
    Mixed {
        #[command(flatten)]
        realtime: RealtimeArgs,
        #[command(flatten)]
        sync: SyncArgs,
        /// The uploaders are the first realtime users: one user streams and syncs at once (with several
        /// nodes, on different nodes), and the check compares the sum with the status API.
        #[arg(long)]
        shared_users: bool,
    },
}

/// The base URLs of the nodes under test, without trailing slashes; never empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nodes(Vec<String>);

impl Nodes {
    pub fn all(&self) -> &[String] {
        &self.0
    }

    /// Node `i` mod the number of nodes.
    pub fn pick(&self, i: usize) -> &str {
        // The list is never empty (`parse_nodes` refuses that), so the modulo is defined.
        &self.0[i % self.0.len()]
    }

    /// The URLs comma-separated, as given (for the report).
    pub fn joined(&self) -> String {
        self.0.join(",")
    }
}

fn parse_nodes(s: &str) -> Result<Nodes, String> {
    let urls: Vec<String> = s
        .split(',')
        .map(|u| u.trim().trim_end_matches('/').to_owned())
        .filter(|u| !u.is_empty())
        .collect();
    if urls.is_empty() {
        return Err("expected at least one base URL (http://host:port)".into());
    }
    if let Some(bad) = urls
        .iter()
        .find(|u| !u.starts_with("http://") && !u.starts_with("https://"))
    {
        return Err(format!("{bad:?} is not an http:// or https:// base URL"));
    }
    Ok(Nodes(urls))
}

#[derive(Debug, Clone, Args)]
pub struct RealtimeArgs {
    /// Concurrent streams.
    #[arg(long, default_value_t = 10)]
    pub streams: usize,
    /// Streams per user (at most the server's VOICEGATE_WS_SESSIONS_PER_USER): streams i·K … i·K+K−1 are
    /// user i's, and with several nodes they go to different nodes.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    pub streams_per_user: u16,
    /// Seconds of audio each stream sends (wall seconds at --pace 1).
    #[arg(long, default_value_t = 30.0)]
    pub duration: f64,
    /// Audio seconds sent per wall second (1.0 = real time, as devices send). Above the server's
    /// VOICEGATE_LISTEN_MAX_PACE (4) the server slows each stream to it after its burst: raise it there.
    #[arg(long, default_value_t = 1.0)]
    pub pace: f64,
    /// Seconds over which stream starts are spread evenly.
    #[arg(long, default_value_t = 0.0)]
    pub ramp: f64,
    /// Seconds between `{"type":"KeepAlive"}` messages on each stream.
    #[arg(long, default_value_t = 10.0)]
    pub keepalive: f64,
    /// Seconds to wait for the final metadata after `CloseStream`.
    #[arg(long, default_value_t = 60.0)]
    pub close_timeout: f64,
    /// Extra query parameters for /v4/listen.
    #[arg(long, default_value = "codec=opus&sample_rate=16000&language=en")]
    pub query: String,
    /// The nodes run a speech-to-text provider: check that the audio their providers received over the run
    /// (`voicegate_stt_forwarded_samples_total` on every node's `/metrics`, before and after) equals what
    /// the sessions were charged (Σ `metadata.stt_forwarded_ms`, to each session's rounding), and report
    /// what fell behind (`voicegate_stt_dropped_samples_total`). Realtime scenario only (sync spans are
    /// transcribed too); nothing else may use the nodes' providers meanwhile.
    #[arg(long)]
    pub check_stt: bool,
    /// Behave as the app does with a full node: an upgrade refused 503 (`at_capacity`, `draining`) is tried
    /// again after its `Retry-After` (plus up to 19 % per-stream jitter; on the next node when there are
    /// several), for at most this many seconds after the stream's first attempt. A stream admitted late
    /// still sends all its audio; one never admitted is counted as refused (`streams_refused`), not as an
    /// error, and the latency and accounting cover the admitted streams. Unset: a refusal is an error.
    #[arg(long, value_name = "SECONDS")]
    pub retry_refused: Option<f64>,
    /// Latency objective: the run fails (exit code 4) when the frame → event p99 is above this many
    /// milliseconds (the design target is 250). Unset: latency is reported, not judged.
    #[arg(long, value_parser = positive_ms)]
    pub max_p99_ms: Option<f64>,
}

impl RealtimeArgs {
    /// How many users the streams belong to.
    pub fn users(&self) -> usize {
        self.streams.div_ceil(usize::from(self.streams_per_user))
    }
}

fn positive_ms(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!(
            "expected a positive number of milliseconds, got {s:?}"
        )),
    }
}

#[derive(Debug, Clone, Args)]
pub struct SyncArgs {
    /// Concurrent uploaders (one user each).
    #[arg(long, default_value_t = 4)]
    pub uploaders: usize,
    /// Files per upload request.
    #[arg(long, default_value_t = 10)]
    pub files: usize,
    /// Upload requests per uploader, one after the other.
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// Seconds one upload may take before it counts as failed.
    #[arg(long, default_value_t = 300.0)]
    pub request_timeout: f64,
    /// Seconds between the starts of an uploader's rounds (a phone syncing now and then); 0: each round
    /// as soon as the previous one was answered.
    #[arg(long, default_value_t = 0.0)]
    pub round_interval: f64,
    /// Upload through `POST /v2/sync-local-files` and poll the job until it ends (its latency is the
    /// time to the poll that saw it end; polls every 200 ms) instead of v1.
    #[arg(long)]
    pub v2: bool,
    /// With `--v2`: each uploader submits all its rounds at once (as an app does), then polls its jobs
    /// at the server's `poll_after_ms`; latency and the run's wall time end at the server's
    /// `finished_at_ms` of each job.
    #[arg(long, requires = "v2")]
    pub pipeline: bool,
    /// Name every file as recorded MIN-MAX days ago (e.g. `8-30`, spread over the range): backdated speech,
    /// which the server meters only up to its daily backfill allowance (v1 only: v2 defers it). Uploads and
    /// files refused `backfill_allowance_exhausted` are counted as refused, not as errors, and the
    /// accounting check expects exactly the files the server metered.
    #[arg(long, value_parser = day_range, conflicts_with = "v2")]
    pub backdate_days: Option<(u64, u64)>,
}

fn day_range(s: &str) -> Result<(u64, u64), String> {
    let parsed = s
        .split_once('-')
        .and_then(|(a, b)| Some((a.trim().parse::<u64>().ok()?, b.trim().parse::<u64>().ok()?)));
    match parsed {
        Some((a, b)) if 1 <= a && a <= b && b <= 365 => Ok((a, b)),
        _ => Err(format!(
            "expected MIN-MAX days (1 <= MIN <= MAX <= 365), got {s:?}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_lists_are_trimmed_and_checked() {
        let n = parse_nodes("http://a:1/, http://b:2").unwrap();
        assert_eq!(n.all(), ["http://a:1", "http://b:2"]);
        assert_eq!(n.pick(0), "http://a:1");
        assert_eq!(n.pick(3), "http://b:2");
        assert_eq!(n.joined(), "http://a:1,http://b:2");
        assert!(parse_nodes(" , ").is_err());
        assert!(
            parse_nodes("http://a:1,b:2")
                .unwrap_err()
                .contains("\"b:2\"")
        );
    }
}

//! `voicegate serve`: startup, the app, and the drain, one module each.
//!
//! [`run`] is the whole command. To wire the engine, build the server yourself:
//! ```ignore
//! let mut server = ServerBuilder::new(cfg)?;
//! server.store_health(Arc::new(redis_health)).payments(Arc::new(engine_payments))
//!       .app_data(web::Data::new(engine_handles))          // visible to every handler
//!       .routes(|cfg| { cfg.route("/v1/sync-local-files", web::post().to(sync)); })
//!       .on_drain(DrainPhase::Flush, "meter_flush", move || Box::pin(async move { meter.flush_all().await }));
//! server.start()?.run_until(drain::shutdown_signal()).await
//! ```
//!
//! - `app`: the app every worker runs ([`AppState`], [`build_app`]).
//! - `builder`: startup ([`ServerBuilder`]: checks, sockets, keys, state; the caller's wiring; start).
//! - `connection`: what a worker does with a new connection (listen front door or actix-http).
//! - `running`: a started server and its drain ([`RunningServer::run_until`]).
//! - here: the command itself ([`main`], [`run`]) and the engine's wiring ([`wire_engine`]).

mod app;
mod builder;
mod connection;
mod head_errors;
mod running;

pub use app::{AppState, RoutesFn, build_app};
pub use builder::{JWKS_RELOAD_INTERVAL, ServerBuilder};
pub use running::RunningServer;

use crate::auth::KeyLoadError;
use crate::config::{ConfigError, LogFormat, ServeConfig};
use actix_web::web;

use crate::drain::DrainPhase;
use crate::engine::{Engine, EngineError};

/// Why `voicegate serve` could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Keys(#[from] KeyLoadError),
    #[error("cannot install the Prometheus recorder: {0}")]
    Metrics(String),
    #[error("cannot listen on {addr}: {error}")]
    Bind { addr: String, error: std::io::Error },
    #[error("server failed: {0}")]
    Server(std::io::Error),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Stt(#[from] crate::stt::SttStartError),
    #[error("refusing to start: {0}")]
    Outbound(#[from] voicegate_engine::outbound::OutboundError),
}

/// Installs the `tracing` subscriber (`RUST_LOG`, default `info`) on standard output: `text` lines,
/// coloured only when that is a terminal (a log file or collector gets plain text), or `json`, one object
/// per line (`VOICEGATE_LOG_FORMAT`). Safe to call twice.
pub fn init_logging(format: LogFormat) {
    use std::io::IsTerminal as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stdout().is_terminal())
            .try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// The `serve` subcommand for `main`: logging, an actix system, [`run`], and an exit code
/// (0 after a drain, 2 when the server cannot start or fails).
pub fn main(cfg: ServeConfig) -> std::process::ExitCode {
    init_logging(cfg.log_format);
    match actix_web::rt::System::new().block_on(run(cfg)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(message = "voicegate serve failed.", error = %e);
            eprintln!("voicegate serve: {e}");
            std::process::ExitCode::from(2)
        }
    }
}

/// `voicegate serve`: the engine (meter, fair use, conversations, plans) behind every route; drains on
/// SIGTERM/SIGINT (sessions closed and metered, then the meter flushed).
pub async fn run(cfg: ServeConfig) -> Result<(), ServeError> {
    name_rayon_threads();
    let mut server = ServerBuilder::new(cfg)?;
    server.fetch_jwks_url().await;
    wire_engine(&mut server)?;
    server
        .start()?
        .run_until(crate::drain::shutdown_signal())
        .await
}

/// Names the threads of the global rayon pool (sync uploads' decode and VAD) `vg-sync-N`; unnamed, they
/// inherit the name of whichever thread first used the pool. Best effort: a pool already built keeps its
/// names.
fn name_rayon_threads() {
    if let Err(error) = rayon::ThreadPoolBuilder::new()
        .thread_name(|i| format!("vg-sync-{i}"))
        .build_global()
    {
        tracing::debug!(message = "The rayon pool was already built.", %error);
    }
}

/// Builds the engine from the server's configuration and mounts it: routes, `/readyz` store check, the
/// Stripe payments sink and the meter flush at drain. Must run inside an actix system.
pub fn wire_engine(server: &mut ServerBuilder) -> Result<Engine, ServeError> {
    let engine = Engine::from_config(&server.state().config, server.outbound())?;
    mount_engine(server, &engine);
    Ok(engine)
}

/// Mounts an engine built by the caller (see [`wire_engine`]).
pub fn mount_engine(server: &mut ServerBuilder, engine: &Engine) {
    // The per-user session limit counts across nodes from here on.
    server
        .state()
        .sessions
        .get_ref()
        .use_leases(engine.leases.clone());
    // So does the per-user upload limit.
    server
        .state()
        .upload_slots
        .get_ref()
        .use_leases(engine.leases.clone());
    let listen = crate::listen::mount(
        &server.state().config,
        server.state().auth.clone(),
        server.state().sessions.get_ref().clone(),
        engine,
        server.state().stt.clone().into_inner(),
    );
    server
        .listen_front(listen.front)
        .app_data(listen.state)
        .routes(crate::listen::configure);
    let jobs = crate::sync_v2::start(
        &server.state().config,
        engine,
        server.state().stt.clone().into_inner(),
    );
    let stopping = jobs.workers.clone();
    server
        .app_data(web::Data::new(jobs))
        .on_drain(DrainPhase::Sessions, "sync_jobs", move || {
            // Running jobs hand their leases back at once; another node (or this one restarted) resumes them.
            Box::pin(async move { stopping.stop() })
        });
    let flush_limit = server.state().config.drain_timeout();
    let flushing = engine.clone();
    server
        .store_health(engine.health())
        .payments(engine.payments())
        .app_data(engine.data())
        .routes(crate::routes::configure)
        .routes(crate::plans_admin::configure)
        .routes(crate::stt_admin::configure)
        .on_drain(DrainPhase::Flush, "meter_flush", move || {
            Box::pin(async move { flushing.flush(flush_limit).await })
        });
}

/// HTTP worker threads: `configured`, or half the CPUs (at least one) when 0. The workers answer HTTP
/// requests, sync uploads and listen upgrades; a listen session's socket then moves to a pipeline thread
/// (one per CPU), which reads it, decodes and runs the VAD. On 2 cores, 1 worker + 2 pipeline threads held
/// 600 streams at p99 221 ms where 2 + 2 gave 1.3 s when the workers still carried the websockets
/// (docs/performance.md).
pub fn http_workers(configured: usize) -> usize {
    if configured > 0 {
        return configured;
    }
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    (cpus / 2).max(1)
}

//! `voicegate serve`: startup, the app, and the drain.
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

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use actix_web::{App, HttpResponse, middleware, web};
use futures_util::future::BoxFuture;
use metrics_exporter_prometheus::PrometheusHandle;
use voicegate_engine::stt::SttProvider;
use voicegate_engine::telemetry::DRAIN_DURATION_SECONDS;

use crate::admin::AdminKey;
use crate::auth::{Authenticator, KeyLoadError};
use crate::config::{ConfigError, ServeConfig};
use crate::drain::{DrainDeadlines, DrainHooks, DrainPhase};
use crate::engine::{Engine, EngineError};
use crate::error::ApiError;
use crate::health::{self, AlwaysReachable, Readiness, StoreHealth};
use crate::listen::ListenFront;
use crate::prometheus;
use crate::sessions::SessionRegistry;
use crate::stripe::{self, LogOnlyPayments, Payments, StripeWebhook};
use crate::upload::UploadLimits;

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
}

/// Routes added by the caller, applied to every worker's app.
pub type RoutesFn = Arc<dyn Fn(&mut web::ServiceConfig) + Send + Sync>;

/// Everything the server shares with its handlers, as `web::Data`.
///
/// Handlers extract the parts they need: `web::Data<ServeConfig>`, `web::Data<UploadLimits>`,
/// `web::Data<SessionRegistry>`, `web::Data<Readiness>`; authentication is the [`crate::auth::AuthedUser`]
/// extractor and the admin check is [`crate::admin::Admin`].
#[derive(Clone)]
pub struct AppState {
    pub config: web::Data<ServeConfig>,
    pub auth: web::Data<Authenticator>,
    pub admin_key: web::Data<AdminKey>,
    pub readiness: web::Data<Readiness>,
    pub store_health: web::Data<dyn StoreHealth>,
    pub stripe: web::Data<StripeWebhook>,
    pub upload_limits: web::Data<UploadLimits>,
    pub sessions: web::Data<SessionRegistry>,
    pub metrics: web::Data<PrometheusHandle>,
    /// The node's speech-to-text provider (`VOICEGATE_STT`), built at startup.
    pub stt: web::Data<dyn SttProvider>,
}

impl AppState {
    /// Registers every part as app data and mounts the built-in routes.
    pub fn configure(&self, cfg: &mut web::ServiceConfig) {
        cfg.app_data(self.config.clone())
            .app_data(self.auth.clone())
            .app_data(self.admin_key.clone())
            .app_data(self.readiness.clone())
            .app_data(self.store_health.clone())
            .app_data(self.stripe.clone())
            .app_data(self.upload_limits.clone())
            .app_data(self.sessions.clone())
            .app_data(self.metrics.clone())
            .app_data(self.stt.clone())
            .app_data(json_errors())
            .app_data(query_errors())
            .app_data(path_errors())
            .route("/healthz", web::get().to(health::healthz))
            .route("/readyz", web::get().to(health::readyz))
            .route("/metrics", web::get().to(prometheus::metrics_route))
            .route("/v1/stripe/webhook", web::post().to(stripe::webhook));
    }
}

fn json_errors() -> web::JsonConfig {
    web::JsonConfig::default()
        .error_handler(|e, _| ApiError::bad_request("invalid_json", e.to_string()).into())
}

fn query_errors() -> web::QueryConfig {
    web::QueryConfig::default()
        .error_handler(|e, _| ApiError::bad_request("invalid_query", e.to_string()).into())
}

fn path_errors() -> web::PathConfig {
    web::PathConfig::default()
        .error_handler(|e, _| ApiError::bad_request("invalid_path", e.to_string()).into())
}

async fn not_found() -> Result<HttpResponse, ApiError> {
    Err(ApiError::not_found(
        "route_not_found",
        "no such route".to_owned(),
    ))
}

/// Builds the app for one worker: state, caller routes, latency middleware, JSON 404.
pub fn build_app(
    state: AppState,
    routes: Option<RoutesFn>,
) -> App<
    impl actix_web::dev::ServiceFactory<
        actix_web::dev::ServiceRequest,
        Config = (),
        Response = actix_web::dev::ServiceResponse<impl actix_web::body::MessageBody>,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    App::new()
        .wrap(middleware::from_fn(crate::timeouts::enforce))
        .wrap(middleware::from_fn(crate::error::json_bodies))
        .wrap(middleware::from_fn(prometheus::record_latency))
        .configure(|cfg| {
            state.configure(cfg);
            if let Some(routes) = &routes {
                routes(cfg);
            }
        })
        .default_service(web::to(not_found))
}

/// Startup: configuration checked, keys loaded, app state built. Add engine wiring, then [`start`](Self::start).
pub struct ServerBuilder {
    state: AppState,
    routes: Option<RoutesFn>,
    extra_data: Vec<RoutesFn>,
    hooks: DrainHooks,
    front: Option<Arc<ListenFront>>,
    /// Bound at [`ServerBuilder::new`], so a port in use is reported before any engine actor starts;
    /// listening only from [`ServerBuilder::start`], so no connection waits in a backlog nobody serves.
    sockets: Vec<socket2::Socket>,
}

impl ServerBuilder {
    /// Validates `cfg` (refusing dev auth on a public bind), loads the token keys, installs the metrics recorder.
    pub fn new(cfg: ServeConfig) -> Result<Self, ServeError> {
        cfg.validate()?;
        let mut sockets = Vec::new();
        for addr in cfg.bind_addrs()? {
            let socket = bind_to(addr).map_err(|error| ServeError::Bind {
                addr: addr.to_string(),
                error,
            })?;
            sockets.push(socket);
        }
        let auth = Authenticator::from_config(&cfg)?;
        announce(&cfg, &auth);
        let upload_parent = crate::upload::temp_parent(cfg.upload_dir.as_deref());
        let swept = crate::upload::sweep_leftovers(&upload_parent);
        if swept > 0 {
            tracing::warn!(
                message = "Removed upload temp folders left by an earlier process.",
                swept,
                dir = %upload_parent.display()
            );
        }
        let metrics = prometheus::install().map_err(|e| ServeError::Metrics(e.to_string()))?;
        let store_kind = if cfg.redis_url.is_some() {
            "redis"
        } else {
            "memory"
        };
        let store: Arc<dyn StoreHealth> = Arc::new(AlwaysReachable(store_kind));
        let stt = crate::stt::build(&cfg)?;
        let sessions = SessionRegistry::new(cfg.ws_sessions_per_user, cfg.ws_max_sessions);
        let stripe = StripeWebhook {
            secret: cfg
                .stripe_webhook_secret
                .as_ref()
                .filter(|s| !s.is_empty())
                .map(|s| s.as_bytes().to_vec()),
            tolerance_secs: cfg.stripe_tolerance_secs,
            payments: Arc::new(LogOnlyPayments),
        };
        let state = AppState {
            admin_key: web::Data::new(AdminKey::new(cfg.admin_key.as_deref())),
            upload_limits: web::Data::new(UploadLimits::from_config(&cfg)),
            config: web::Data::new(cfg),
            auth: web::Data::new(auth),
            readiness: web::Data::new(Readiness::new()),
            store_health: web::Data::from(store),
            stripe: web::Data::new(stripe),
            sessions: web::Data::new(sessions.clone()),
            metrics: web::Data::new(metrics),
            stt: web::Data::from(stt),
        };
        let mut hooks = DrainHooks::default();
        let timeout = state.config.drain_timeout();
        hooks.add(DrainPhase::Sessions, "listen_sessions", move || {
            Box::pin(async move {
                let left = sessions.close_all(timeout).await;
                if left > 0 {
                    tracing::warn!(
                        message = "Listen sessions still open at the drain deadline.",
                        left
                    );
                }
            })
        });
        // After the HTTP stop no request runs: a request cut by the drain deadline may have left its folder.
        let uploads = state.upload_limits.clone();
        hooks.add(DrainPhase::Flush, "upload_temp_sweep", move || {
            Box::pin(async move {
                let swept = crate::upload::sweep_own(&upload_parent, &uploads);
                if swept > 0 {
                    tracing::info!(
                        message = "Removed the temp folders of uploads cut by the drain.",
                        swept
                    );
                }
            })
        });
        Ok(ServerBuilder {
            state,
            routes: None,
            extra_data: Vec::new(),
            hooks,
            front: None,
            sockets,
        })
    }

    /// The shared state (readiness, sessions, limits…), e.g. to hand to engine-side tasks.
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Replaces the store health check behind `/readyz` (default: always reachable).
    pub fn store_health(&mut self, store: Arc<dyn StoreHealth>) -> &mut Self {
        self.state.store_health = web::Data::from(store);
        self
    }

    /// Replaces the payments sink of the Stripe webhook (default: log only).
    pub fn payments(&mut self, payments: Arc<dyn Payments>) -> &mut Self {
        let old = &self.state.stripe;
        self.state.stripe = web::Data::new(StripeWebhook {
            secret: old.secret.clone(),
            tolerance_secs: old.tolerance_secs,
            payments,
        });
        self
    }

    /// Makes `data` available to every handler (`web::Data<T>` extractor).
    pub fn app_data<T: Send + Sync + 'static>(&mut self, data: web::Data<T>) -> &mut Self {
        self.extra_data
            .push(Arc::new(move |cfg: &mut web::ServiceConfig| {
                cfg.app_data(data.clone());
            }));
        self
    }

    /// Adds routes (called once per worker). May be called several times.
    pub fn routes<F>(&mut self, f: F) -> &mut Self
    where
        F: Fn(&mut web::ServiceConfig) + Send + Sync + 'static,
    {
        let previous = self.routes.take();
        self.routes = Some(Arc::new(move |cfg: &mut web::ServiceConfig| {
            if let Some(previous) = &previous {
                previous(cfg);
            }
            f(cfg);
        }));
        self
    }

    /// Answers connections whose first request is the listen upgrade with `front` (see
    /// [`crate::listen::front`]); every other connection is actix-web's.
    pub fn listen_front(&mut self, front: Arc<ListenFront>) -> &mut Self {
        self.front = Some(front);
        self
    }

    /// Registers a drain hook (see [`crate::drain`] for the order).
    pub fn on_drain<F>(&mut self, phase: DrainPhase, name: &'static str, hook: F) -> &mut Self
    where
        F: FnOnce() -> BoxFuture<'static, ()> + Send + 'static,
    {
        self.hooks.add(phase, name, hook);
        self
    }

    /// Binds, starts the workers and the metrics upkeep, and turns readiness to `ready`.
    /// Must run inside an actix system (`#[actix_web::main]` or `actix_web::rt::System`).
    pub fn start(self) -> Result<RunningServer, ServeError> {
        let ServerBuilder {
            state,
            routes,
            extra_data,
            hooks,
            front,
            sockets,
        } = self;
        let cfg = state.config.clone();
        let extra: Option<RoutesFn> = {
            let extra_data = extra_data.clone();
            Some(Arc::new(move |c: &mut web::ServiceConfig| {
                for add in &extra_data {
                    add(c);
                }
                if let Some(routes) = &routes {
                    routes(c);
                }
            }))
        };
        // actix-web's `HttpServer`, assembled by hand so that a connection can go to the listen front door
        // before actix-http sees it (same settings: HttpServer's defaults).
        let mut builder = actix_server::Server::build()
            .workers(http_workers(cfg.workers))
            .disable_signals()
            .shutdown_timeout(cfg.drain_timeout_secs);
        let shutdown = builder.graceful_shutdown_signal();
        let mut bound = Vec::with_capacity(sockets.len());
        for socket in sockets {
            // A backlog of 1,024, as actix-web's HttpServer: a ramp of thousands of streams connects
            // faster than a 128 backlog drains.
            socket.listen(1024).map_err(ServeError::Server)?;
            let listener: std::net::TcpListener = socket.into();
            let local = listener.local_addr().map_err(ServeError::Server)?;
            bound.push(local);
            let connection = ConnectionService {
                state: state.clone(),
                routes: extra.clone(),
                front: front.clone(),
                shutdown: shutdown.clone(),
                addr: local,
            };
            builder = builder
                .listen("voicegate", listener, move || connection.factory())
                .map_err(|error| ServeError::Bind {
                    addr: local.to_string(),
                    error,
                })?;
        }
        let server = builder.run();
        let handle = server.handle();
        let join = actix_web::rt::spawn(server);
        actix_web::rt::spawn(prometheus::upkeep(state.metrics.get_ref().clone()));
        if state.auth.has_jwks() {
            actix_web::rt::spawn(reload_jwks_forever(state.auth.clone()));
        }
        state.readiness.set_ready();
        tracing::info!(message = "Listening.", addrs = ?bound);
        Ok(RunningServer {
            addrs: bound,
            handle,
            join,
            state,
            hooks,
        })
    }
}

/// A bound (not yet listening) socket as actix-web's `HttpServer` makes one: with address reuse.
fn bind_to(addr: SocketAddr) -> std::io::Result<socket2::Socket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    Ok(socket)
}

/// What one listener's connections are served with, on every worker.
#[derive(Clone)]
struct ConnectionService {
    state: AppState,
    routes: Option<RoutesFn>,
    front: Option<Arc<ListenFront>>,
    shutdown: actix_server::GracefulShutdownSignal,
    addr: SocketAddr,
}

impl ConnectionService {
    /// One worker's service: the listen front door for a connection whose first request is the listen
    /// upgrade, actix-http with the app for every other.
    fn factory(
        &self,
    ) -> impl actix_service::ServiceFactory<
        actix_web::rt::net::TcpStream,
        Config = (),
        Response = (),
        Error = actix_http::error::DispatchError,
        InitError = (),
    > + use<> {
        use actix_service::{IntoServiceFactory, Service, ServiceFactory, ServiceFactoryExt};
        let app = build_app(self.state.clone(), self.routes.clone())
            .into_factory()
            .map_err(|err: actix_web::Error| err.error_response());
        let signal = self.shutdown.clone();
        let header_timeout = self.state.config.request_timeouts().header;
        let http = actix_http::HttpService::build()
            .graceful_shutdown_signal(move || {
                let signal = signal.clone();
                async move { signal.notified().await }
            })
            .client_request_timeout(header_timeout)
            .client_disconnect_timeout(std::time::Duration::from_secs(1))
            .local_addr(self.addr)
            // The app's `AppConfig` host and address only serve URL generation (unused here) and the
            // connection-info fallback for a request without a `Host` header; actix-web's constructor
            // taking the real ones is crate-private, so the default stands in.
            .finish(actix_service::map_config(app, |_| {
                actix_web::dev::AppConfig::default()
            }))
            .tcp();
        let front = self.front.clone();
        actix_service::fn_factory(move || {
            let http = http.new_service(());
            let front = front.clone();
            async move {
                use crate::listen::front::{FirstRequest, answer_timeout, first_request};
                let http = std::rc::Rc::new(http.await?);
                // One per worker: it holds the worker's date-header timer.
                let h1_config = actix_http::ServiceConfig::default();
                Ok(actix_service::fn_service(
                    move |io: actix_web::rt::net::TcpStream| {
                        let (http, front, h1_config) =
                            (std::rc::Rc::clone(&http), front.clone(), h1_config.clone());
                        async move {
                            let Some(front) = front else {
                                return http.call(io).await;
                            };
                            let deadline = tokio::time::Instant::now() + header_timeout;
                            match first_request(&io, deadline).await {
                                FirstRequest::Listen => front.serve(io, deadline, &h1_config).await,
                                FirstRequest::TimedOut => answer_timeout(io, &h1_config).await,
                                FirstRequest::Other => return http.call(io).await,
                            }
                            Ok(())
                        }
                    },
                ))
            }
        })
    }
}

/// How often the JWKS file is re-read (Firebase rotates keys every few hours; tokens live an hour).
pub const JWKS_RELOAD_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

async fn reload_jwks_forever(auth: web::Data<Authenticator>) {
    let mut tick = tokio::time::interval(JWKS_RELOAD_INTERVAL);
    tick.tick().await; // the first tick is immediate; the keys were just loaded
    loop {
        tick.tick().await;
        let auth = auth.clone();
        match web::block(move || auth.reload_jwks()).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => {
                tracing::warn!(message = "JWKS reload failed; keeping the current keys.", %error)
            }
            Err(error) => tracing::warn!(message = "JWKS reload could not run.", %error),
        }
    }
}

fn announce(cfg: &ServeConfig, auth: &Authenticator) {
    if auth.is_dev() {
        tracing::warn!(
            message = "DEV AUTH MODE: no token verification configured; the bearer token is taken as the uid. \
                       Loopback bind only.",
            bind = %cfg.bind
        );
    } else {
        tracing::info!(
            message = "Token verification on.",
            rs256_jwks = cfg.jwks.is_some(),
            hs256 = cfg.jwt_hs256_secret.is_some(),
            audience = cfg.jwt_audience.as_deref().unwrap_or("-"),
            issuer = cfg.jwt_issuer.as_deref().unwrap_or("-")
        );
    }
    if cfg.redis_url.is_none() {
        tracing::warn!(
            message =
                "No VOICEGATE_REDIS_URL: embedded in-memory store, NOT DURABLE, SINGLE NODE only."
        );
    }
    if cfg.admin_key.as_deref().is_none_or(str::is_empty) {
        tracing::info!(message = "No ADMIN_KEY: admin routes answer 403.");
    }
    if cfg.stripe_webhook_secret.is_none() {
        tracing::info!(message = "No STRIPE_WEBHOOK_SECRET: the Stripe webhook answers 503.");
    }
}

/// A started server.
pub struct RunningServer {
    addrs: Vec<SocketAddr>,
    handle: actix_web::dev::ServerHandle,
    join: actix_web::rt::task::JoinHandle<std::io::Result<()>>,
    state: AppState,
    hooks: DrainHooks,
}

impl RunningServer {
    /// The bound addresses (useful with port 0).
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` resolves (or the server fails), then drains.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> Result<(), ServeError> {
        let RunningServer {
            handle,
            mut join,
            state,
            mut hooks,
            ..
        } = self;
        tokio::select! {
            res = &mut join => {
                return match res {
                    Ok(r) => r.map_err(ServeError::Server),
                    Err(e) => Err(ServeError::Server(std::io::Error::other(e.to_string()))),
                };
            }
            () = shutdown => {}
        }
        let deadlines = DrainDeadlines::new(Instant::now(), state.config.drain_timeout());
        state.readiness.set_draining();
        tracing::info!(
            message = "Draining.",
            timeout_s = state.config.drain_timeout_secs
        );
        let stop = async {
            handle.stop(true).await;
            let _ = (&mut join).await;
        };
        let sessions = hooks.run_phase(DrainPhase::Sessions, deadlines.sessions);
        let (unfinished, stopped) = tokio::join!(
            sessions,
            tokio::time::timeout_at(deadlines.sessions.into(), stop)
        );
        if stopped.is_err() {
            tracing::warn!(
                message = "HTTP requests still running at the drain deadline; forcing stop."
            );
            handle.stop(false).await;
        }
        let mut unfinished = unfinished;
        unfinished.extend(hooks.run_phase(DrainPhase::Flush, deadlines.end).await);
        let outcome = if unfinished.is_empty() && stopped.is_ok() {
            "complete"
        } else {
            "timed_out"
        };
        let elapsed = deadlines.started.elapsed();
        metrics::histogram!(DRAIN_DURATION_SECONDS, "outcome" => outcome)
            .record(elapsed.as_secs_f64());
        if unfinished.is_empty() {
            tracing::info!(
                message = "Drained.",
                elapsed_ms = elapsed.as_millis() as u64
            );
        } else {
            tracing::warn!(message = "Drain timed out.", unfinished = ?unfinished, elapsed_ms = elapsed.as_millis() as u64);
        }
        Ok(())
    }
}

/// Installs the `tracing` subscriber (`RUST_LOG`, default `info`) on standard output, coloured only
/// when that is a terminal (a log file or collector gets plain text). Safe to call twice.
pub fn init_logging() {
    use std::io::IsTerminal as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stdout().is_terminal())
        .try_init();
}

/// The `serve` subcommand for `main`: logging, an actix system, [`run`], and an exit code
/// (0 after a drain, 2 when the server cannot start or fails).
pub fn main(cfg: ServeConfig) -> std::process::ExitCode {
    init_logging();
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
    let engine = Engine::from_config(&server.state().config)?;
    mount_engine(server, &engine);
    Ok(engine)
}

/// Mounts an engine built by the caller (see [`wire_engine`]).
pub fn mount_engine(server: &mut ServerBuilder, engine: &Engine) {
    let listen = crate::listen::mount(
        &server.state().config,
        server.state().auth.clone(),
        server.state().sessions.get_ref().clone(),
        engine,
    );
    server
        .listen_front(listen.front)
        .app_data(listen.state)
        .routes(crate::listen::configure);
    let flush_limit = server.state().config.drain_timeout();
    let flushing = engine.clone();
    server
        .store_health(engine.health())
        .payments(engine.payments())
        .app_data(engine.data())
        .routes(crate::routes::configure)
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

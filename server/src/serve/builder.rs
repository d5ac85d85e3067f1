//! Startup: the configuration checked, the sockets bound, the keys loaded, the app state built
//! ([`ServerBuilder::new`]); the caller's wiring; then the acceptor and workers started
//! ([`ServerBuilder::start`]).

use std::net::SocketAddr;
use std::sync::Arc;
use voicegate_engine::outbound::Outbound;

use actix_web::web;
use futures_util::future::BoxFuture;

use super::app::{AppState, RoutesFn};
use super::connection::ConnectionService;
use super::running::RunningServer;
use super::{ServeError, http_workers};
use crate::admin::AdminKey;
use crate::admission::LoadGate;
use crate::auth::Authenticator;
use crate::config::ServeConfig;
use crate::drain::{DrainHooks, DrainPhase};
use crate::health::{AlwaysReachable, Readiness, StoreHealth};
use crate::listen::ListenFront;
use crate::prometheus;
use crate::sessions::SessionRegistry;
use crate::stripe::{LogOnlyPayments, Payments, StripeWebhook};
use crate::throttle::{AuthThrottle, ThrottleConfig};
use crate::upload::UploadLimits;
use crate::upload_slots::UploadSlots;

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
    /// The one outbound client (TLS, `VOICEGATE_TLS_CA_FILE`): providers, the JWKS URL, the classifier.
    outbound: Outbound,
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
        // The one outbound client (TLS, `VOICEGATE_TLS_CA_FILE`) every provider and the JWKS URL go through.
        let outbound = Outbound::new(cfg.tls_ca_file.as_deref())?;
        let auth = Authenticator::from_config(&cfg, &outbound)?.with_throttle(AuthThrottle::new(
            ThrottleConfig::from_config(&cfg),
            "token",
        ));
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
        let store_kind = if cfg.redis().is_some() {
            "redis"
        } else {
            "memory"
        };
        let store: Arc<dyn StoreHealth> = Arc::new(AlwaysReachable(store_kind));
        let stt = crate::stt::build(&cfg, &outbound)?;
        let admission = cfg.admission.config()?;
        let load = (admission.cpu_target.is_some() || admission.late_limit.is_some())
            .then(|| Arc::new(LoadGate::new(admission)));
        let sessions =
            SessionRegistry::with_load(cfg.ws_sessions_per_user, cfg.ws_max_sessions, load);
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
            admin_key: web::Data::new(AdminKey::new(cfg.admin_key.as_deref()).with_throttle(
                AuthThrottle::new(ThrottleConfig::from_config(&cfg), "admin_key"),
            )),
            upload_limits: web::Data::new(UploadLimits::from_config(&cfg)),
            upload_slots: web::Data::new(UploadSlots::new(
                cfg.sync_uploads_per_user,
                cfg.sync_max_uploads,
            )),
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
            outbound,
        })
    }

    /// With `VOICEGATE_JWKS` a URL: fetches it once (at most [`crate::auth::remote::FETCH_TIMEOUT`]), so that
    /// the node listens with its keys. A failure is logged and the node starts degraded (RS256 tokens
    /// answered 503 `auth_keys_unavailable` until the refresher started by [`start`](Self::start) succeeds).
    /// Without this call, that refresher fetches at once.
    pub async fn fetch_jwks_url(&self) {
        if let Some(Err(error)) = self.state.auth.refresh_jwks_url().await {
            tracing::error!(
                message = "The JWKS URL could not be fetched at startup; starting degraded (RS256 tokens are \
                           answered 503 auth_keys_unavailable) and retrying.",
                %error
            );
        }
    }

    /// The shared state (readiness, sessions, limits…), e.g. to hand to engine-side tasks.
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// The node's outbound client, for the engine's parts that call out (the fair-use classifier).
    pub fn outbound(&self) -> &Outbound {
        &self.outbound
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
            outbound: _,
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
        if cfg.heap_trim_secs > 0 {
            actix_web::rt::spawn(crate::heap::trim_forever(std::time::Duration::from_secs(
                cfg.heap_trim_secs,
            )));
        }
        if let Some(gate) = state.sessions.load_gate() {
            let sessions = state.sessions.get_ref().clone();
            actix_web::rt::spawn(Arc::clone(gate).run(move || sessions.active()));
        }
        if state.auth.has_jwks() {
            actix_web::rt::spawn(reload_jwks_forever(state.auth.clone()));
        }
        if state.auth.has_jwks_url() {
            actix_web::rt::spawn(crate::auth::remote::refresh_forever(
                state.auth.clone().into_inner(),
            ));
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
    if cfg.redis().is_none() {
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

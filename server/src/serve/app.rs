//! The app every HTTP worker runs: the shared state as `web::Data`, the built-in routes, the JSON error
//! answers of extractors, the middleware and the JSON 404.

use std::sync::Arc;

use actix_web::{App, HttpResponse, middleware, web};
use metrics_exporter_prometheus::PrometheusHandle;
use voicegate_engine::stt::SttProvider;

use crate::admin::AdminKey;
use crate::auth::Authenticator;
use crate::config::ServeConfig;
use crate::error::ApiError;
use crate::health::{self, Readiness, StoreHealth};
use crate::prometheus;
use crate::sessions::SessionRegistry;
use crate::stripe::{self, StripeWebhook};
use crate::upload::UploadLimits;
use crate::upload_slots::UploadSlots;

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
    /// Concurrent sync uploads, per user and on this node.
    pub upload_slots: web::Data<UploadSlots>,
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
            .app_data(self.upload_slots.clone())
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

//! One listener's connections: the listen front door for a connection whose first request is the listen
//! upgrade, actix-http with the app for every other.

use std::net::SocketAddr;
use std::sync::Arc;

use super::app::{AppState, RoutesFn, build_app};
use crate::listen::ListenFront;

/// What one listener's connections are served with, on every worker.
#[derive(Clone)]
pub(super) struct ConnectionService {
    pub(super) state: AppState,
    pub(super) routes: Option<RoutesFn>,
    pub(super) front: Option<Arc<ListenFront>>,
    pub(super) shutdown: actix_server::GracefulShutdownSignal,
    pub(super) addr: SocketAddr,
}

impl ConnectionService {
    /// One worker's service: the listen front door for a connection whose first request is the listen
    /// upgrade, actix-http with the app for every other.
    pub(super) fn factory(
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
            }));
        // As `HttpService::tcp`, over the socket wrapped so that actix-http's own head-level error
        // answers get the JSON error body (`super::head_errors`).
        let http = actix_service::fn_service(|io: actix_web::rt::net::TcpStream| {
            let peer = io.peer_addr().ok();
            std::future::ready(Ok::<_, actix_http::error::DispatchError>((
                super::head_errors::JsonHeadErrors::new(io),
                actix_http::Protocol::Http1,
                peer,
            )))
        })
        .and_then(http);
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

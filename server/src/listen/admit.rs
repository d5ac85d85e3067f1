//! The one admission of a listen upgrade, shared by the front door ([`super::front`]) and the actix-web
//! route ([`super::listen`]): the token (401, rejections counted by reason; 429 for an address with too many
//! failures), the session limits (429 per
//! user, 503 node-wide or draining), the websocket handshake (400 `ws_handshake`), then the query
//! parameters (refused after the upgrade, with a close code). Errors are [`ApiError`]s, answered with the
//! same status, headers and JSON body on both paths; the request's latency is recorded under [`ROUTE`]
//! (on the route by the metrics middleware, at the door by [`record_latency`]).

use actix_http::ws;
use actix_http::{RequestHead, ResponseBuilder};
use tokio::time::Instant;

use super::params::{ListenParams, ParamError};
use crate::auth::{Authenticator, authenticate_head};
use crate::error::ApiError;
use crate::prometheus::record_request;
use crate::sessions::{SessionGuard, SessionRegistry};

/// The route label of the request-latency metric.
pub const ROUTE: &str = "/v4/listen";

/// An admitted upgrade.
pub struct Admission {
    /// The user's session slot (given back when the session ends).
    pub guard: SessionGuard,
    /// The query parameters, or why the server cannot serve them (a 1008 close after the upgrade).
    pub params: Result<ListenParams, ParamError>,
    /// The 101 answer; each path chooses its body.
    pub upgrade: ResponseBuilder,
}

/// Admits (or refuses) the upgrade request `head` with query string `query` (the per-user limit may ask the
/// store: at most `VOICEGATE_LEASE_TIMEOUT_MS`).
pub async fn admit(
    auth: &Authenticator,
    sessions: &SessionRegistry,
    head: &RequestHead,
    query: &str,
) -> Result<Admission, ApiError> {
    let user = authenticate_head(auth, head)?;
    let guard = sessions.open(&user.uid).await?;
    let upgrade =
        ws::handshake(head).map_err(|e| ApiError::bad_request("ws_handshake", e.to_string()))?;
    Ok(Admission {
        guard,
        params: ListenParams::from_query(query),
        upgrade,
    })
}

/// Records the latency of an upgrade answered outside actix-web (the front door), as the middleware does.
pub fn record_latency(status: u16, started: Instant) {
    record_request(
        ROUTE.to_owned(),
        "GET",
        status,
        started.elapsed().as_secs_f64(),
    );
}

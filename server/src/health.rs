//! `/healthz` (liveness) and `/readyz` (readiness).
//!
//! Readiness fails only while starting or draining. The store's reachability is reported in the body and in the
//! `voicegate_store_up` gauge but never fails readiness: metering fails open (pending deltas are retried), so a
//! Redis outage must not take every pod out of the load balancer at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use actix_web::{HttpResponse, web};
use futures_util::future::BoxFuture;
use serde_json::json;
use voicegate_engine::telemetry::{SERVER_STATE, STORE_UP};

/// How long `/readyz` waits for the store before reporting it unreachable.
const STORE_CHECK_TIMEOUT: Duration = Duration::from_secs(1);

/// Where the server is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ServerState {
    Starting = 0,
    Ready = 1,
    Draining = 2,
}

impl ServerState {
    pub fn as_str(self) -> &'static str {
        match self {
            ServerState::Starting => "starting",
            ServerState::Ready => "ready",
            ServerState::Draining => "draining",
        }
    }
}

/// The shared, lock-free server state. Cloning shares it.
#[derive(Debug, Clone)]
pub struct Readiness(Arc<AtomicU8>);

impl Default for Readiness {
    fn default() -> Self {
        Self::new()
    }
}

impl Readiness {
    pub fn new() -> Self {
        metrics::gauge!(SERVER_STATE).set(f64::from(ServerState::Starting as u8));
        Readiness(Arc::new(AtomicU8::new(ServerState::Starting as u8)))
    }

    pub fn get(&self) -> ServerState {
        match self.0.load(Ordering::Acquire) {
            0 => ServerState::Starting,
            1 => ServerState::Ready,
            _ => ServerState::Draining,
        }
    }

    pub fn set_ready(&self) {
        // Never go back from draining to ready.
        let _ = self.0.compare_exchange(
            ServerState::Starting as u8,
            ServerState::Ready as u8,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        metrics::gauge!(SERVER_STATE).set(f64::from(self.get() as u8));
    }

    pub fn set_draining(&self) {
        self.0.store(ServerState::Draining as u8, Ordering::Release);
        metrics::gauge!(SERVER_STATE).set(f64::from(ServerState::Draining as u8));
    }

    pub fn is_draining(&self) -> bool {
        self.get() == ServerState::Draining
    }
}

/// Store reachability, as seen by `/readyz`. The engine implements it for Redis and the in-memory store.
pub trait StoreHealth: Send + Sync + 'static {
    /// A short name for the body (`redis`, `memory`).
    fn kind(&self) -> &'static str;
    /// Pings the store. The caller bounds it with a timeout.
    fn check(&self) -> BoxFuture<'_, Result<(), String>>;
}

/// A store that is always reachable (the embedded in-memory store, or nothing wired yet).
#[derive(Debug, Clone, Copy)]
pub struct AlwaysReachable(pub &'static str);

impl StoreHealth for AlwaysReachable {
    fn kind(&self) -> &'static str {
        self.0
    }
    fn check(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }
}

/// `GET /healthz`: the process is alive and serving.
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

/// `GET /readyz`: 200 when ready, 503 while starting or draining; the store's reachability in the body.
pub async fn readyz(
    readiness: web::Data<Readiness>,
    store: web::Data<dyn StoreHealth>,
) -> HttpResponse {
    let state = readiness.get();
    let checked = tokio::time::timeout(STORE_CHECK_TIMEOUT, store.check()).await;
    let error = match checked {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e),
        Err(_) => Some(format!(
            "no answer within {} ms",
            STORE_CHECK_TIMEOUT.as_millis()
        )),
    };
    metrics::gauge!(STORE_UP).set(if error.is_none() { 1.0 } else { 0.0 });
    let body = json!({
        "status": state.as_str(),
        "store": {"kind": store.kind(), "reachable": error.is_none(), "error": error},
    });
    if state == ServerState::Ready {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_moves_starting_ready_draining_and_never_back() {
        let r = Readiness::new();
        assert_eq!(r.get(), ServerState::Starting);
        r.set_ready();
        assert_eq!(r.get(), ServerState::Ready);
        r.set_draining();
        r.set_ready();
        assert_eq!(r.get(), ServerState::Draining);
    }
}

//! A started server: serving until the shutdown signal, then the drain (readiness off, sessions closed
//! while HTTP stops, then the flush hooks), all within the drain deadline.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Instant;

use voicegate_engine::telemetry::DRAIN_DURATION_SECONDS;

use super::ServeError;
use super::app::AppState;
use crate::drain::{DrainDeadlines, DrainHooks, DrainPhase};

/// A started server.
pub struct RunningServer {
    pub(super) addrs: Vec<SocketAddr>,
    pub(super) handle: actix_web::dev::ServerHandle,
    pub(super) join: actix_web::rt::task::JoinHandle<std::io::Result<()>>,
    pub(super) state: AppState,
    pub(super) hooks: DrainHooks,
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

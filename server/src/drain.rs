//! Graceful drain on SIGTERM/SIGINT.
//!
//! Order, all within `VOICEGATE_DRAIN_TIMEOUT_SECS`:
//! 1. readiness turns to `draining` (`/readyz` answers 503) and new listen sessions are refused;
//! 2. the listener stops accepting; in parallel, [`DrainPhase::Sessions`] hooks run (listen sessions close with
//!    1001 and meter what they had) and in-flight HTTP requests finish — this step gets at most 3/4 of the
//!    timeout so that
//! 3. [`DrainPhase::Flush`] hooks (meter write-behind flush) always get the rest.
//!
//! Hooks of one phase run concurrently. A hook that overruns is abandoned and logged, never awaited forever.

use std::time::{Duration, Instant};

use futures_util::future::{BoxFuture, join_all};

/// When a drain hook runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainPhase {
    /// Close long-lived sessions (websockets) so their connections end; runs while HTTP requests finish.
    Sessions,
    /// After every session and request is done: flush what they recorded (the meter).
    Flush,
}

type HookFn = Box<dyn FnOnce() -> BoxFuture<'static, ()> + Send>;

/// The hooks registered for the drain.
#[derive(Default)]
pub struct DrainHooks {
    hooks: Vec<(DrainPhase, &'static str, HookFn)>,
}

impl std::fmt::Debug for DrainHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.hooks.iter().map(|(phase, name, _)| (phase, name)))
            .finish()
    }
}

impl DrainHooks {
    /// Registers `hook` to run in `phase`; `name` appears in logs.
    pub fn add<F>(&mut self, phase: DrainPhase, name: &'static str, hook: F)
    where
        F: FnOnce() -> BoxFuture<'static, ()> + Send + 'static,
    {
        self.hooks.push((phase, name, Box::new(hook)));
    }

    /// Removes and returns the hooks of one phase.
    fn take(&mut self, phase: DrainPhase) -> Vec<(&'static str, HookFn)> {
        let (taken, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.hooks)
            .into_iter()
            .partition(|h| h.0 == phase);
        self.hooks = kept;
        taken
            .into_iter()
            .map(|(_, name, hook)| (name, hook))
            .collect()
    }

    /// Runs one phase's hooks concurrently until `deadline`. Returns the names of hooks that did not finish.
    pub async fn run_phase(&mut self, phase: DrainPhase, deadline: Instant) -> Vec<&'static str> {
        let hooks = self.take(phase);
        let names: Vec<&'static str> = hooks.iter().map(|(n, _)| *n).collect();
        let done = std::sync::Arc::new(std::sync::Mutex::new(Vec::<&'static str>::new()));
        let futures = hooks.into_iter().map(|(name, hook)| {
            let done = std::sync::Arc::clone(&done);
            async move {
                let started = Instant::now();
                hook().await;
                tracing::info!(
                    message = "Drain hook finished.",
                    hook = name,
                    elapsed_ms = started.elapsed().as_millis() as u64
                );
                done.lock().unwrap_or_else(|p| p.into_inner()).push(name);
            }
        });
        let remaining = deadline.saturating_duration_since(Instant::now());
        let _ = tokio::time::timeout(remaining, join_all(futures)).await;
        let done = done.lock().unwrap_or_else(|p| p.into_inner());
        names.into_iter().filter(|n| !done.contains(n)).collect()
    }
}

/// The deadlines of one drain.
#[derive(Debug, Clone, Copy)]
pub struct DrainDeadlines {
    pub started: Instant,
    /// End of step 2 (sessions closed, requests finished).
    pub sessions: Instant,
    /// End of the whole drain.
    pub end: Instant,
}

impl DrainDeadlines {
    pub fn new(started: Instant, timeout: Duration) -> Self {
        DrainDeadlines {
            started,
            sessions: started + timeout.mul_f64(0.75),
            end: started + timeout,
        }
    }
}

/// Resolves on the first SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!(message = "SIGTERM received."),
                    _ = tokio::signal::ctrl_c() => tracing::info!(message = "SIGINT received."),
                }
            }
            Err(error) => {
                tracing::warn!(message = "Cannot listen for SIGTERM; only SIGINT will drain.", %error);
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn phases_run_only_their_own_hooks() {
        let ran = Arc::new(AtomicUsize::new(0));
        let mut hooks = DrainHooks::default();
        for (phase, name) in [(DrainPhase::Sessions, "s"), (DrainPhase::Flush, "f")] {
            let ran = Arc::clone(&ran);
            hooks.add(phase, name, move || {
                Box::pin(async move {
                    ran.fetch_add(if name == "s" { 1 } else { 10 }, Ordering::SeqCst);
                })
            });
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        assert!(
            hooks
                .run_phase(DrainPhase::Sessions, deadline)
                .await
                .is_empty()
        );
        assert_eq!(ran.load(Ordering::SeqCst), 1);
        assert!(
            hooks
                .run_phase(DrainPhase::Flush, deadline)
                .await
                .is_empty()
        );
        assert_eq!(ran.load(Ordering::SeqCst), 11);
    }

    #[tokio::test]
    async fn a_hook_that_overruns_is_reported_and_abandoned() {
        let mut hooks = DrainHooks::default();
        hooks.add(DrainPhase::Flush, "stuck", || {
            Box::pin(std::future::pending())
        });
        hooks.add(DrainPhase::Flush, "quick", || Box::pin(async {}));
        let unfinished = hooks
            .run_phase(
                DrainPhase::Flush,
                Instant::now() + Duration::from_millis(30),
            )
            .await;
        assert_eq!(unfinished, vec!["stuck"]);
    }

    #[test]
    fn flush_always_gets_the_last_quarter() {
        let t0 = Instant::now();
        let d = DrainDeadlines::new(t0, Duration::from_secs(20));
        assert_eq!(d.sessions - t0, Duration::from_secs(15));
        assert_eq!(d.end - t0, Duration::from_secs(20));
    }
}

//! The pipeline threads: a fixed set of actix arbiters (one per core by default) that run live sessions:
//! each session reads its websocket on its own thread once per tick (the server's `listen::conn`), then
//! runs decode → resample → VAD; the HTTP workers only admit the upgrade and hand the socket over.
//! Sessions are assigned round-robin and stay on their thread for life (their pipeline state is not
//! `Send`-shared).

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};

use actix::Arbiter;

/// The pool was stopped (server shutting down).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the pipeline threads are stopped")]
pub struct PoolStopped;

/// Pipeline threads. Dropping the pool stops them.
pub struct PipelinePool {
    arbiters: Vec<Arbiter>,
    next: AtomicUsize,
}

impl PipelinePool {
    /// Starts `threads` arbiters (0 = one per available core). Must run inside an actix `System`.
    pub fn start(threads: usize) -> Self {
        let n = if threads == 0 {
            std::thread::available_parallelism().map_or(1, usize::from)
        } else {
            threads
        };
        PipelinePool {
            arbiters: (0..n)
                .map(|i| crate::threads::named_arbiter(&format!("vg-pipeline-{i}")))
                .collect(),
            next: AtomicUsize::new(0),
        }
    }

    pub fn threads(&self) -> usize {
        self.arbiters.len()
    }

    /// Runs the future `make` builds on the next thread (built there, so it need not be `Send`).
    pub fn spawn<F, Fut>(&self, make: F) -> Result<(), PoolStopped>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        if self.arbiters.is_empty() {
            return Err(PoolStopped);
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.arbiters.len();
        let spawned = self.arbiters[i].spawn_fn(move || {
            actix::spawn(make());
        });
        if spawned { Ok(()) } else { Err(PoolStopped) }
    }
}

impl Drop for PipelinePool {
    fn drop(&mut self) {
        for a in &self.arbiters {
            a.stop();
        }
    }
}

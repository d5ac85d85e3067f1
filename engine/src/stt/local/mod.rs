//! `local`: Moonshine base-en, embedded (docs/stt.md).
//!
//! - The C library and model come from the PyPI wheel `moonshine-cpp==0.1.4`, unpacked by
//!   `scripts/deps.sh`, and are loaded at run time ([`ffi`]), so nothing builds against them.
//! - Moonshine is batch-only and its memory grows with the clip: a stream's speech runs are cut into chunks
//!   at the VAD's pauses (end of run) and at most 10 s long ([`super::chunk`]); each chunk gives one final
//!   result. No interim results: re-running a growing chunk would multiply the compute.
//! - A bounded pool of worker threads (`VOICEGATE_STT_LOCAL_THREADS`), each owning one model, takes chunks
//!   from a bounded queue. The workers run at a lower scheduling priority than the pipeline threads, so under
//!   load transcription falls behind (counted: queue wait, late chunks, drops when the queue is full), never
//!   metering or speech events.

pub mod child;
mod config;
pub mod ffi;
mod pool;
mod priority;
mod stream;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::sync_channel;
use std::sync::{Arc, Mutex};
use std::time::Instant;

pub use self::config::LocalConfig;
use self::ffi::{EngineFiles, MoonshineLib};
pub use self::pool::BatchEngine;
use self::pool::StreamShared;
use self::pool::{Job, Pool, Workers, work};
#[cfg(target_os = "linux")]
pub use self::priority::current_niceness;
pub use self::priority::lower_priority;
use self::stream::{Chunk, LocalStream};
use super::provider::{
    BatchRequest, BatchTicket, ProviderKind, ResultSink, StreamHandle, StreamOptions, SttProvider,
    batch_ticket,
};
use super::types::SttError;

const KIND: ProviderKind = ProviderKind::Local;

/// The wheel version `scripts/deps.sh` installs; part of the default install folder's name.
pub const ENGINE_VERSION: &str = "0.1.4";

/// The provider: a handle on the worker pool. Dropping the last handle (provider and streams) stops the
/// workers once the queue is empty.
#[derive(Clone)]
pub struct LocalProvider {
    pool: Arc<Pool>,
}

impl std::fmt::Debug for LocalProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalProvider")
            .field("queued", &self.pool.depth.load(Ordering::Relaxed))
            .finish()
    }
}

impl LocalProvider {
    /// Loads the library and starts `threads` workers, each loading its own model; returns once every
    /// worker is ready (about 0.5 s per model), or the first failure.
    pub fn start(config: &LocalConfig) -> Result<LocalProvider, SttError> {
        if let Some(child) = &config.child {
            // The same early refusals as in-process (missing files, a CPU without AVX-512), without loading
            // the library into this process: the models live in the children.
            ffi::check_loadable(&EngineFiles::new(&config.dir))?;
            child::register_metrics();
            let (child, dir) = (child.clone(), config.dir.clone());
            return LocalProvider::start_with(config, move || {
                child::ChildEngine::start(child.clone(), &dir)
                    .map(|m| Box::new(m) as Box<dyn BatchEngine>)
            });
        }
        let lib = Arc::new(MoonshineLib::load(&EngineFiles::new(&config.dir))?);
        LocalProvider::start_with(config, move || {
            lib.load_model()
                .map(|m| Box::new(m) as Box<dyn BatchEngine>)
        })
    }

    /// The same pool over any batch engine: `make` runs once on each worker thread (after its priority is
    /// lowered) to build that worker's engine. Tests use it with engine doubles.
    pub fn start_with<F>(config: &LocalConfig, make: F) -> Result<LocalProvider, SttError>
    where
        F: Fn() -> Result<Box<dyn BatchEngine>, SttError> + Send + Sync + 'static,
    {
        let make = Arc::new(make);
        let threads = config.threads.max(1);
        let (tx, rx) = sync_channel::<Job>(config.queue_chunks.max(1));
        let rx = Arc::new(Mutex::new(rx));
        let pool = Arc::new(Pool {
            tx,
            depth: AtomicUsize::new(0),
            places: AtomicUsize::new(0),
            capacity: config.queue_chunks.max(1),
            late_after: config.late_after,
            workers: Workers::default(),
        });
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        for n in 0..threads {
            let (make, rx, ready) = (Arc::clone(&make), Arc::clone(&rx), ready_tx.clone());
            let weak = Arc::downgrade(&pool);
            let nice = config.nice;
            let handle = std::thread::Builder::new()
                .name(format!("vg-stt-{n}"))
                .spawn(move || {
                    // Lowered before the model loads: the engine's own threads inherit it.
                    if let Err(error) = lower_priority(nice) {
                        tracing::warn!(message = "could not lower the STT worker's priority", %error);
                    }
                    let model = match make() {
                        Ok(m) => m,
                        Err(e) => {
                            let _ = ready.send(Err(e));
                            return;
                        }
                    };
                    let _ = ready.send(Ok(()));
                    drop(ready);
                    work(model, &rx, &weak);
                })
                .map_err(|e| SttError::LoadFailed(format!("cannot start an STT worker: {e}")))?;
            pool.workers
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(handle);
        }
        drop(ready_tx);
        for _ in 0..threads {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    return Err(SttError::LoadFailed(
                        "an STT worker died while loading".into(),
                    ));
                }
            }
        }
        // The engine's failures are its one error reason (`pool::timed_transcribe`).
        super::provider::register_metrics(KIND, &["engine"]);
        Ok(LocalProvider { pool })
    }

    /// Chunks waiting for a worker now.
    pub fn queued(&self) -> usize {
        self.pool.depth.load(Ordering::Relaxed)
    }
}

impl SttProvider for LocalProvider {
    fn kind(&self) -> ProviderKind {
        KIND
    }

    fn open_stream(
        &self,
        _options: StreamOptions,
        results: ResultSink,
    ) -> Result<Box<dyn StreamHandle>, SttError> {
        let sink = results.for_provider(KIND);
        let counters = Arc::clone(sink.counters());
        Ok(Box::new(LocalStream {
            pool: Arc::clone(&self.pool),
            shared: Arc::new(StreamShared {
                sink,
                counters,
                progress: Mutex::new((0, false)),
            }),
            held: Vec::new(),
            held_start: 0,
            chunk: Chunk::Idle,
            closed: false,
        }))
    }

    fn transcribe_batch(&self, request: BatchRequest) -> Result<BatchTicket, SttError> {
        if !self.pool.take_place() {
            // Not counted as dropped here: the sync path offers the span again (transcribe.rs) and
            // counts it once if it gives up.
            return Err(SttError::QueueFull {
                dropped_samples: request.samples.len() as u64,
            });
        }
        let (reply, ticket) = batch_ticket();
        let job = Job::Batch {
            request,
            reply,
            enqueued: Instant::now(),
        };
        match self.pool.submit(job) {
            Ok(()) => Ok(ticket),
            // The workers are gone (the pool is shutting down).
            Err(_) => Err(SttError::Closed),
        }
    }
}

#[cfg(test)]
mod tests;

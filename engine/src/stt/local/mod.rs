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

pub mod ffi;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use self::ffi::{EngineFiles, Model, MoonshineLib};
use super::chunk::{CUT_SEARCH_SAMPLES, MAX_CHUNK_SAMPLES, batch_chunks, cut_point};
use super::provider::{
    BatchOutput, BatchReply, BatchRequest, BatchTicket, ProviderKind, ResultSink, StreamCounters,
    StreamHandle, StreamOptions, StreamStats, SttProvider, batch_ticket,
};
use super::types::{Pcm, ResultKind, SttError, SttEvent, SttResult, sample_to_ms};
use crate::telemetry;

const KIND: ProviderKind = ProviderKind::Local;

/// The wheel version `scripts/deps.sh` installs; part of the default install folder's name.
pub const ENGINE_VERSION: &str = "0.1.4";

/// Settings of the local provider (server flags in docs/stt.md).
#[derive(Debug, Clone)]
pub struct LocalConfig {
    /// The unpacked wheel folder (`VOICEGATE_STT_LOCAL_DIR`; default [`LocalConfig::default_dir`]).
    pub dir: PathBuf,
    /// Worker threads, one model each (`VOICEGATE_STT_LOCAL_THREADS`).
    pub threads: usize,
    /// Chunks waiting for a worker, at most. A full queue drops the chunk (counted).
    pub queue_chunks: usize,
    /// Niceness added to the workers (and the engine threads they start): 10 = well below the pipeline.
    pub nice: i32,
    /// A chunk that waited longer than this for a worker counts as late (`voicegate_stt_late_chunks_total`).
    pub late_after: Duration,
}

impl Default for LocalConfig {
    fn default() -> Self {
        LocalConfig {
            dir: LocalConfig::default_dir(),
            threads: 1,
            queue_chunks: 32,
            nice: 10,
            late_after: Duration::from_secs(2),
        }
    }
}

impl LocalConfig {
    /// `$VOICEGATE_STT_LOCAL_DIR`, else `$XDG_CACHE_HOME/voicegate/moonshine-cpp-0.1.4`, else
    /// `~/.cache/voicegate/moonshine-cpp-0.1.4`: where `scripts/deps.sh` unpacks the wheel.
    pub fn default_dir() -> PathBuf {
        if let Some(dir) = std::env::var_os("VOICEGATE_STT_LOCAL_DIR").filter(|d| !d.is_empty()) {
            return PathBuf::from(dir);
        }
        let cache = std::env::var_os("XDG_CACHE_HOME")
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .unwrap_or_else(|| PathBuf::from(".cache"));
        cache
            .join("voicegate")
            .join(format!("moonshine-cpp-{ENGINE_VERSION}"))
    }

    /// Whether the engine's files are all present in `dir` (no loading).
    pub fn is_installed(&self) -> bool {
        EngineFiles::new(&self.dir).missing().is_none()
    }
}

enum Job {
    Chunk {
        samples: Vec<f32>,
        /// Stream-time sample offset of `samples[0]`.
        start: u64,
        stream: Arc<StreamShared>,
        enqueued: Instant,
    },
    Batch {
        request: BatchRequest,
        reply: BatchReply,
        enqueued: Instant,
    },
}

/// The provider: a handle on the worker pool. Dropping the last handle (provider and streams) stops the
/// workers once the queue is empty.
#[derive(Clone)]
pub struct LocalProvider {
    pool: Arc<Pool>,
}

struct Pool {
    tx: SyncSender<Job>,
    depth: AtomicUsize,
    late_after: Duration,
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
            late_after: config.late_after,
        });
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        for n in 0..threads {
            let (make, rx, ready) = (Arc::clone(&make), Arc::clone(&rx), ready_tx.clone());
            let pool = Arc::downgrade(&pool);
            let nice = config.nice;
            std::thread::Builder::new()
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
                    work(model, &rx, &pool);
                })
                .map_err(|e| SttError::LoadFailed(format!("cannot start an STT worker: {e}")))?;
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
        Ok(LocalProvider { pool })
    }

    /// Chunks waiting for a worker now.
    pub fn queued(&self) -> usize {
        self.pool.depth.load(Ordering::Relaxed)
    }
}

impl Pool {
    fn submit(&self, job: Job) -> Result<(), Job> {
        // Counted before the send so a worker's decrement can never run first.
        let depth = self.depth.fetch_add(1, Ordering::Relaxed) + 1;
        match self.tx.try_send(job) {
            Ok(()) => {
                metrics::gauge!(telemetry::STT_QUEUE_DEPTH, "provider" => KIND.name())
                    .set(depth as f64);
                Ok(())
            }
            Err(TrySendError::Full(job) | TrySendError::Disconnected(job)) => {
                self.depth.fetch_sub(1, Ordering::Relaxed);
                Err(job)
            }
        }
    }

    fn took(&self, enqueued: Instant) -> Duration {
        let depth = self.depth.fetch_sub(1, Ordering::Relaxed).saturating_sub(1);
        metrics::gauge!(telemetry::STT_QUEUE_DEPTH, "provider" => KIND.name()).set(depth as f64);
        let waited = enqueued.elapsed();
        metrics::histogram!(telemetry::STT_QUEUE_WAIT_SECONDS, "provider" => KIND.name())
            .record(waited.as_secs_f64());
        if waited > self.late_after {
            metrics::counter!(telemetry::STT_LATE_CHUNKS_TOTAL, "provider" => KIND.name())
                .increment(1);
        }
        waited
    }
}

/// A batch-only speech-to-text engine: one call per chunk of 16 kHz mono floats.
pub trait BatchEngine: Send {
    fn transcribe(&mut self, pcm: &[f32]) -> Result<String, SttError>;
}

impl BatchEngine for Model {
    fn transcribe(&mut self, pcm: &[f32]) -> Result<String, SttError> {
        Model::transcribe(self, pcm)
    }
}

fn work(mut model: Box<dyn BatchEngine>, rx: &Mutex<Receiver<Job>>, pool: &std::sync::Weak<Pool>) {
    loop {
        // The lock is held only while waiting for the next job, never while transcribing.
        let job = match rx.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok(job) = job else { return };
        let Some(pool) = pool.upgrade() else { return };
        match job {
            Job::Chunk {
                samples,
                start,
                stream,
                enqueued,
            } => {
                let waited = pool.took(enqueued);
                if waited > pool.late_after {
                    stream.sink.send(SttEvent::Behind {
                        queued_ms: u64::try_from(waited.as_millis()).unwrap_or(u64::MAX),
                    });
                }
                transcribe_chunk(model.as_mut(), &samples, start, &stream);
                stream.job_done();
            }
            Job::Batch {
                request,
                reply,
                enqueued,
            } => {
                pool.took(enqueued);
                reply.send(transcribe_batch(model.as_mut(), &request));
            }
        }
    }
}

fn transcribe_chunk(
    model: &mut dyn BatchEngine,
    samples: &[f32],
    start: u64,
    stream: &StreamShared,
) {
    if stream.sink.is_closed() {
        // The session is gone: nobody would read the words, so nothing is sent (nor charged).
        stream
            .counters
            .dropped(KIND, "closed", samples.len() as u64);
        return;
    }
    stream.counters.forwarded(KIND, samples.len() as u64);
    match timed_transcribe(model, samples) {
        Ok(text) if text.is_empty() => {}
        Ok(text) => {
            stream.sink.result(final_result(text, start, samples.len()));
        }
        Err(e) => {
            stream.sink.send(SttEvent::Error {
                reason: e.code(),
                message: e.to_string(),
            });
        }
    }
}

fn transcribe_batch(
    model: &mut dyn BatchEngine,
    request: &BatchRequest,
) -> Result<BatchOutput, SttError> {
    let mut out = BatchOutput::default();
    for (s, e) in batch_chunks(&request.samples, &request.speech, MAX_CHUNK_SAMPLES) {
        let chunk = &request.samples[s..e];
        out.forwarded_samples += chunk.len() as u64;
        super::provider::count_forwarded(KIND, chunk.len() as u64);
        let text = timed_transcribe(model, chunk)?;
        if !text.is_empty() {
            out.results.push(final_result(text, s as u64, chunk.len()));
        }
    }
    Ok(out)
}

fn timed_transcribe(model: &mut dyn BatchEngine, samples: &[f32]) -> Result<String, SttError> {
    let began = Instant::now();
    let outcome = model.transcribe(samples);
    metrics::histogram!(telemetry::STT_ENGINE_DURATION_SECONDS, "provider" => KIND.name())
        .record(began.elapsed().as_secs_f64());
    if let Err(e) = &outcome {
        metrics::counter!(telemetry::STT_ERRORS_TOTAL, "provider" => KIND.name(), "reason" => e.code())
            .increment(1);
        tracing::warn!(message = "local transcription failed", error = %e, samples = samples.len());
    }
    outcome
}

fn final_result(text: String, start: u64, len: usize) -> SttResult {
    SttResult {
        kind: ResultKind::Final,
        text,
        start_ms: sample_to_ms(start),
        end_ms: sample_to_ms(start + len as u64),
        confidence: None,
        words: Vec::new(),
        speaker: None,
    }
}

/// What a stream's handle and the workers share.
struct StreamShared {
    sink: ResultSink,
    counters: Arc<StreamCounters>,
    /// (chunks queued or being transcribed, closed): `Closed` goes out when both say "done".
    progress: Mutex<(usize, bool)>,
}

impl StreamShared {
    fn job_done(&self) {
        let finished = match self.progress.lock() {
            Ok(mut p) => {
                p.0 = p.0.saturating_sub(1);
                p.0 == 0 && p.1
            }
            Err(_) => false,
        };
        if finished {
            self.sink.send(SttEvent::Closed);
        }
    }
}

struct LocalStream {
    pool: Arc<Pool>,
    shared: Arc<StreamShared>,
    /// The current run's samples not yet handed to the pool (at most one chunk's worth).
    held: Vec<f32>,
    held_start: u64,
    closed: bool,
}

impl LocalStream {
    /// Queues `held[..len]` as a chunk. Never blocks: a full queue drops it, counted.
    fn submit(&mut self, len: usize) -> Result<(), SttError> {
        if len == 0 {
            return Ok(());
        }
        let samples: Vec<f32> = self.held.drain(..len).collect();
        let start = self.held_start;
        self.held_start += len as u64;
        if let Ok(mut p) = self.shared.progress.lock() {
            p.0 += 1;
        }
        let job = Job::Chunk {
            samples,
            start,
            stream: Arc::clone(&self.shared),
            enqueued: Instant::now(),
        };
        match self.pool.submit(job) {
            Ok(()) => Ok(()),
            Err(_) => {
                let dropped = len as u64;
                self.shared.counters.dropped(KIND, "queue_full", dropped);
                self.shared.job_done();
                Err(SttError::QueueFull {
                    dropped_samples: dropped,
                })
            }
        }
    }

    fn flush(&mut self) -> Result<(), SttError> {
        let len = self.held.len();
        self.submit(len)
    }
}

/// Keeps the first error of several steps (each step still runs).
fn first_err(a: Result<(), SttError>, b: Result<(), SttError>) -> Result<(), SttError> {
    match (a, b) {
        (
            Err(SttError::QueueFull { dropped_samples: x }),
            Err(SttError::QueueFull { dropped_samples: y }),
        ) => Err(SttError::QueueFull {
            dropped_samples: x + y,
        }),
        (Err(e), _) | (Ok(()), Err(e)) => Err(e),
        (Ok(()), Ok(())) => Ok(()),
    }
}

impl StreamHandle for LocalStream {
    fn push(&mut self, start: u64, pcm: Pcm<'_>) -> Result<(), SttError> {
        if self.closed {
            return Err(SttError::Closed);
        }
        let mut outcome = Ok(());
        if !self.held.is_empty() && start != self.held_start + self.held.len() as u64 {
            outcome = self.flush();
        }
        if self.held.is_empty() {
            self.held_start = start;
        }
        pcm.extend_f32(&mut self.held);
        while self.held.len() >= MAX_CHUNK_SAMPLES {
            let cut = cut_point(&self.held, MAX_CHUNK_SAMPLES, CUT_SEARCH_SAMPLES);
            let step = self.submit(cut);
            outcome = first_err(outcome, step);
        }
        outcome
    }

    fn end_of_run(&mut self) -> Result<(), SttError> {
        if self.closed {
            return Err(SttError::Closed);
        }
        self.flush()
    }

    fn finalize(&mut self) -> Result<(), SttError> {
        self.end_of_run()
    }

    fn close(&mut self) {
        if self.closed {
            return;
        }
        // A drop here is already counted; close has nobody to report it to.
        let _ = self.flush();
        self.closed = true;
        let finished = match self.shared.progress.lock() {
            Ok(mut p) => {
                p.1 = true;
                p.0 == 0
            }
            Err(_) => false,
        };
        if finished {
            self.shared.sink.send(SttEvent::Closed);
        }
    }

    fn stats(&self) -> StreamStats {
        self.shared.counters.stats()
    }
}

impl Drop for LocalStream {
    fn drop(&mut self) {
        self.close();
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
            held: Vec::with_capacity(MAX_CHUNK_SAMPLES),
            held_start: 0,
            closed: false,
        }))
    }

    fn transcribe_batch(&self, request: BatchRequest) -> Result<BatchTicket, SttError> {
        let (reply, ticket) = batch_ticket();
        let job = Job::Batch {
            request,
            reply,
            enqueued: Instant::now(),
        };
        match self.pool.submit(job) {
            Ok(()) => Ok(ticket),
            Err(Job::Batch { request, .. }) => {
                let dropped = request.samples.len() as u64;
                metrics::counter!(telemetry::STT_DROPPED_SAMPLES_TOTAL, "provider" => KIND.name(), "reason" => "queue_full")
                    .increment(dropped);
                Err(SttError::QueueFull {
                    dropped_samples: dropped,
                })
            }
            Err(Job::Chunk { .. }) => Err(SttError::Closed),
        }
    }
}

/// Adds `nice` to the calling thread's niceness (Linux: niceness is per thread, and threads it starts
/// inherit it). Elsewhere a no-op.
pub fn lower_priority(nice: i32) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        if nice <= 0 {
            return Ok(());
        }
        // SAFETY: gettid has no preconditions; get/setpriority on our own thread id touch only this thread.
        unsafe {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            *libc::__errno_location() = 0;
            let current = libc::getpriority(libc::PRIO_PROCESS, tid);
            if current == -1 && *libc::__errno_location() != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let target = (current + nice).min(19);
            if libc::setpriority(libc::PRIO_PROCESS, tid, target) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = nice;
    Ok(())
}

/// The calling thread's niceness (Linux), for tests and diagnostics.
#[cfg(target_os = "linux")]
pub fn current_niceness() -> i32 {
    // SAFETY: as in `lower_priority`.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::getpriority(libc::PRIO_PROCESS, tid)
    }
}

#[cfg(test)]
mod tests;

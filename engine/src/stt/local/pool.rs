//! The worker pool's queue and work loop: each worker owns one batch engine and takes chunks (of streams)
//! and whole files (batches) from one bounded queue; [`StreamShared`] is what a stream's handle shares
//! with the workers.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::KIND;
use super::ffi::Model;
use crate::stt::chunk::{MAX_CHUNK_SAMPLES, batch_chunks};
use crate::stt::provider::{BatchOutput, BatchReply, BatchRequest, ResultSink, StreamCounters};
use crate::stt::types::{ResultKind, SttError, SttEvent, SttResult, sample_to_ms};
use crate::telemetry;

pub(super) enum Job {
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

pub(super) struct Pool {
    pub(super) tx: SyncSender<Job>,
    /// Jobs in the queue (the gauge).
    pub(super) depth: AtomicUsize,
    /// Places taken: a job in the queue, or a stream's chunk still being filled (its place is taken with
    /// its first sample, so a chunk whose audio was taken, and charged, is never refused at its end). At
    /// most `capacity`, the queue's own bound, so a job holding a place always fits in the queue.
    pub(super) places: AtomicUsize,
    pub(super) capacity: usize,
    pub(super) late_after: Duration,
    /// Declared after `tx`: dropped after it, so the workers see the channel closed, free their models and
    /// end before the pool's drop returns.
    pub(super) workers: Workers,
}

/// How long the pool's drop waits for its workers to end.
const WORKERS_JOIN_LIMIT: Duration = Duration::from_secs(5);

/// The worker threads, joined when the pool goes (its last provider or stream dropped). Without the join, a
/// worker freeing its model (ONNX Runtime) could still run while the process exits and the runtime's
/// static destructors run: a test process once died with SIGSEGV after its test had passed.
#[derive(Default)]
pub(super) struct Workers(pub(super) Mutex<Vec<std::thread::JoinHandle<()>>>);

impl Drop for Workers {
    fn drop(&mut self) {
        let handles = std::mem::take(
            &mut *self
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        let me = std::thread::current().id();
        // Bounded: a worker in the middle of a long batch (a 300 s span takes ~2 min on one core) is left to
        // finish on its own rather than hold a shutdown.
        let deadline = Instant::now() + WORKERS_JOIN_LIMIT;
        for handle in handles {
            // A worker holding the pool's last reference drops it on its own thread: it is ending anyway.
            if handle.thread().id() == me {
                continue;
            }
            while !handle.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if handle.is_finished() {
                let _ = handle.join();
            }
        }
    }
}

impl Pool {
    /// Takes a place in the queue, if one is free.
    pub(super) fn take_place(&self) -> bool {
        self.places
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.capacity).then_some(n + 1)
            })
            .is_ok()
    }

    pub(super) fn give_place(&self) {
        self.places.fetch_sub(1, Ordering::AcqRel);
    }

    /// Queues a job that holds a place ([`Pool::take_place`]); the worker that takes it gives the place
    /// back. Fails only when the workers are gone (the place is given back then).
    pub(super) fn submit(&self, job: Job) -> Result<(), Job> {
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
                self.give_place();
                Err(job)
            }
        }
    }

    fn took(&self, enqueued: Instant) -> Duration {
        self.give_place();
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

    /// Called between jobs, once a job's results are out (the child-process engine replaces its process
    /// here when it has grown past its limit, so neither the results nor the duration metric wait for it).
    fn between_jobs(&mut self) {}
}

impl BatchEngine for Model {
    fn transcribe(&mut self, pcm: &[f32]) -> Result<String, SttError> {
        Model::transcribe(self, pcm)
    }
}

pub(super) fn work(
    mut model: Box<dyn BatchEngine>,
    rx: &Mutex<Receiver<Job>>,
    pool: &std::sync::Weak<Pool>,
) {
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
                drop(samples);
                model.between_jobs();
            }
            Job::Batch {
                request,
                reply,
                enqueued,
            } => {
                pool.took(enqueued);
                reply.send(transcribe_batch(model.as_mut(), &request));
                drop(request);
                model.between_jobs();
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
    let mut out = BatchOutput {
        provider: Some(KIND),
        ..BatchOutput::default()
    };
    for (s, e) in batch_chunks(&request.samples, &request.speech, MAX_CHUNK_SAMPLES) {
        let chunk = &request.samples[s..e];
        out.forwarded_samples += chunk.len() as u64;
        crate::stt::provider::count_forwarded(KIND, chunk.len() as u64);
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
pub(super) struct StreamShared {
    pub(super) sink: ResultSink,
    pub(super) counters: Arc<StreamCounters>,
    /// (chunks queued or being transcribed, closed): `Closed` goes out when both say "done".
    pub(super) progress: Mutex<(usize, bool)>,
}

impl StreamShared {
    pub(super) fn job_done(&self) {
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

//! A stream's handle: holds the current speech run's samples and hands them to the pool in chunks cut at
//! pauses; sends `Closed` once the last chunk is transcribed.

use std::sync::Arc;
use std::time::Instant;

use super::KIND;
use super::pool::{Job, Pool, StreamShared};
use crate::stt::chunk::{CUT_SEARCH_SAMPLES, MAX_CHUNK_SAMPLES, cut_point};
use crate::stt::provider::{StreamHandle, StreamStats};
use crate::stt::types::{Pcm, SttError, SttEvent};

pub(super) struct LocalStream {
    pub(super) pool: Arc<Pool>,
    pub(super) shared: Arc<StreamShared>,
    /// The current run's samples not yet handed to the pool (at most one chunk's worth).
    pub(super) held: Vec<f32>,
    pub(super) held_start: u64,
    pub(super) closed: bool,
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

//! A stream's handle: holds the current speech run's samples and hands them to the pool in chunks cut at
//! pauses; sends `Closed` once the last chunk is transcribed.
//!
//! A chunk takes its place in the pool's queue with its first sample, so audio the stream takes (and the
//! session charges) is always transcribed: when the queue has no place, the audio is refused as it is
//! pushed ([`SttError::Refused`]: not taken, not charged, counted as dropped `queue_full`), never after
//! it was charged. A refused chunk stays refused until its run ends or a chunk's length of it went by.

use std::sync::Arc;
use std::time::Instant;

use super::KIND;
use super::pool::{Job, Pool, StreamShared};
use crate::stt::chunk::{CUT_SEARCH_SAMPLES, MAX_CHUNK_SAMPLES, cut_point};
use crate::stt::provider::{StreamHandle, StreamStats};
use crate::stt::types::{Pcm, SttError, SttEvent};

/// Where the stream is in its current chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Chunk {
    /// No chunk open: the next sample opens one.
    Idle,
    /// The chunk in `held` holds a place in the pool's queue.
    Filling,
    /// The queue had no place when this chunk opened: its samples are refused. `next`: the stream-time
    /// offset the run goes on at; `refused`: samples of this chunk refused so far.
    Refusing { next: u64, refused: usize },
}

pub(super) struct LocalStream {
    pub(super) pool: Arc<Pool>,
    pub(super) shared: Arc<StreamShared>,
    /// The current chunk's samples (at most one chunk's worth, plus the push that filled it). Allocated
    /// as it grows and handed to the worker with the chunk: a stream that is not speaking holds nothing.
    pub(super) held: Vec<f32>,
    pub(super) held_start: u64,
    pub(super) chunk: Chunk,
    pub(super) closed: bool,
}

impl LocalStream {
    /// Queues `held[..len]` as a chunk with the place the chunk holds. Never blocks; fails only when the
    /// workers are gone (shutting down).
    fn submit(&mut self, len: usize) -> Result<(), SttError> {
        if len == 0 {
            return Ok(());
        }
        let samples = if len >= self.held.len() {
            std::mem::take(&mut self.held)
        } else {
            let rest = self.held.split_off(len);
            std::mem::replace(&mut self.held, rest)
        };
        let start = self.held_start;
        self.held_start += samples.len() as u64;
        if let Ok(mut p) = self.shared.progress.lock() {
            p.0 += 1;
        }
        let n = samples.len() as u64;
        let job = Job::Chunk {
            samples,
            start,
            stream: Arc::clone(&self.shared),
            enqueued: Instant::now(),
        };
        match self.pool.submit(job) {
            Ok(()) => Ok(()),
            Err(_) => {
                self.shared.counters.dropped(KIND, "closed", n);
                self.shared.job_done();
                Err(SttError::Closed)
            }
        }
    }

    /// Ends the current chunk: a filled one is queued, a refused one says so (`Refused` of nothing new).
    fn flush(&mut self) -> Result<(), SttError> {
        let chunk = std::mem::replace(&mut self.chunk, Chunk::Idle);
        match chunk {
            Chunk::Idle => Ok(()),
            Chunk::Filling => {
                let len = self.held.len();
                if len == 0 {
                    self.pool.give_place();
                    return Ok(());
                }
                self.submit(len)
            }
            Chunk::Refusing { .. } => Err(SttError::Refused { samples: 0 }),
        }
    }

    /// Appends `pcm` to the filling chunk, queuing each full chunk; returns the samples of `pcm` refused
    /// (the queue had no place for the chunk after a full one).
    fn fill(&mut self, start: u64, pcm: Pcm<'_>) -> (u64, Result<(), SttError>) {
        // Where this push's samples begin in `held`: what is before it was taken (and charged) earlier.
        let mut own_from = self.held.len();
        grow(&mut self.held, pcm.len());
        pcm.extend_f32(&mut self.held);
        let mut outcome = Ok(());
        let mut refused = 0;
        while self.chunk == Chunk::Filling && self.held.len() >= MAX_CHUNK_SAMPLES {
            let cut = cut_point(&self.held, MAX_CHUNK_SAMPLES, CUT_SEARCH_SAMPLES);
            if cut >= self.held.len() {
                outcome = combine(outcome, self.flush());
            } else if self.pool.take_place() {
                // The chunk goes with its place; the one just taken is the rest's.
                outcome = combine(outcome, self.submit(cut));
                own_from = own_from.saturating_sub(cut);
            } else {
                // No place for the rest: the chunk goes with everything taken before this push (at most
                // a chunk: it was not full before), and the rest of this push is refused, whole (a
                // session's push is at most its 3.3 s ring, so never more than a chunk's length).
                let cut = cut.max(own_from);
                let rest = self.held.len() - cut;
                outcome = combine(outcome, self.submit(cut));
                self.held = Vec::new();
                refused += rest as u64;
                let next = start + pcm.len() as u64;
                self.chunk = refusing(next, rest);
            }
        }
        (refused, outcome)
    }
}

/// The refusing state after `refused` samples of a chunk, or none once a chunk's length went by (the
/// next sample tries for a place again).
fn refusing(next: u64, refused: usize) -> Chunk {
    if refused >= MAX_CHUNK_SAMPLES {
        Chunk::Idle
    } else {
        Chunk::Refusing { next, refused }
    }
}

/// Makes room for `add` more samples, growing by doubling but not past a chunk's length (plus the push
/// that fills it): a 10 s chunk never sits in a buffer of twice its size.
fn grow(held: &mut Vec<f32>, add: usize) {
    let need = held.len() + add;
    if need <= held.capacity() {
        return;
    }
    let target = need
        .max(held.capacity() * 2)
        .min(need.max(MAX_CHUNK_SAMPLES));
    held.reserve_exact(target - held.len());
}

/// Combines the outcomes of several steps: a refusal always comes through, adding up (the session gives
/// its charge back), else the first error.
fn combine(a: Result<(), SttError>, b: Result<(), SttError>) -> Result<(), SttError> {
    match (a, b) {
        (Err(SttError::Refused { samples: x }), Err(SttError::Refused { samples: y })) => {
            Err(SttError::Refused { samples: x + y })
        }
        (Err(e @ SttError::Refused { .. }), _) | (_, Err(e @ SttError::Refused { .. })) => Err(e),
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
        // A push that does not go on from the last one starts a new run.
        match self.chunk {
            Chunk::Filling if start != self.held_start + self.held.len() as u64 => {
                outcome = self.flush();
            }
            Chunk::Refusing { next, .. } if start != next => self.chunk = Chunk::Idle,
            _ => {}
        }
        let n = pcm.len();
        let mut at = 0;
        let mut refused = 0u64;
        while at < n {
            match self.chunk {
                Chunk::Idle => {
                    if self.pool.take_place() {
                        self.chunk = Chunk::Filling;
                        self.held_start = start + at as u64;
                    } else {
                        self.chunk = Chunk::Refusing {
                            next: start + at as u64,
                            refused: 0,
                        };
                    }
                }
                Chunk::Refusing { next, refused: r } => {
                    let take = (n - at).min(MAX_CHUNK_SAMPLES - r);
                    at += take;
                    refused += take as u64;
                    self.chunk = refusing(next + take as u64, r + take);
                }
                Chunk::Filling => {
                    let (r, step) = self.fill(start + at as u64, pcm.tail(at));
                    at = n;
                    refused += r;
                    outcome = combine(outcome, step);
                }
            }
        }
        if refused > 0 {
            self.shared.counters.dropped(KIND, "queue_full", refused);
            outcome = combine(outcome, Err(SttError::Refused { samples: refused }));
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
        // A refusal here is already counted; close has nobody to report it to.
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

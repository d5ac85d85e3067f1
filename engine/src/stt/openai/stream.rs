//! A session's stream: the handle holds the current speech run and cuts it into chunks (at the run's
//! end, the client's Finalize, or the 10 s cap at a quiet point: [`RunChunker`]); each chunk is one
//! request, made in order by the stream's task on the provider's runtime. The handle never waits: a chunk
//! without a place in the node's queue is dropped and counted.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::KIND;
use super::request::{self, Ctx, Places};
use crate::stt::chunk::{MAX_CHUNK_SAMPLES, RunChunker};
use crate::stt::provider::{ResultSink, StreamHandle, StreamStats};
use crate::stt::types::{Pcm, SttError, SttEvent};

/// Chunks one stream's channel holds (the node-wide queue bounds them first).
pub(super) const CHUNK_CAPACITY: usize = 64;

/// One chunk for the stream's task, holding its place in the node's queue.
pub(super) struct Chunk {
    start: u64,
    pcm: Vec<i16>,
    place: Places,
}

pub(super) struct OpenAiStream {
    pub(super) ctx: Arc<Ctx>,
    pub(super) tx: Option<mpsc::Sender<Chunk>>,
    pub(super) sink: ResultSink,
    pub(super) run: RunChunker,
    pub(super) closed: bool,
}

impl OpenAiStream {
    pub(super) fn new(ctx: Arc<Ctx>, tx: mpsc::Sender<Chunk>, sink: ResultSink) -> OpenAiStream {
        OpenAiStream {
            ctx,
            tx: Some(tx),
            sink,
            run: RunChunker::new(MAX_CHUNK_SAMPLES),
            closed: false,
        }
    }

    /// Hands one chunk to the task. Never blocks: no place, or a full channel, drops it (counted).
    fn submit(&mut self, start: u64, pcm: Vec<i16>) -> Result<(), SttError> {
        let n = pcm.len() as u64;
        let counters = Arc::clone(self.sink.counters());
        let Some(tx) = &self.tx else {
            counters.dropped(KIND, "closed", n);
            return Err(SttError::Closed);
        };
        let Some(place) = Places::take(&self.ctx, 1) else {
            counters.dropped(KIND, "queue_full", n);
            return Err(SttError::QueueFull { dropped_samples: n });
        };
        match tx.try_send(Chunk { start, pcm, place }) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                counters.dropped(KIND, "queue_full", n);
                Err(SttError::QueueFull { dropped_samples: n })
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                counters.dropped(KIND, "closed", n);
                Err(SttError::Closed)
            }
        }
    }

    fn flush(&mut self) -> Result<(), SttError> {
        match self.run.flush() {
            Some((start, pcm)) => self.submit(start, pcm),
            None => Ok(()),
        }
    }
}

/// Keeps the first error of several steps, adding up the audio dropped.
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

impl StreamHandle for OpenAiStream {
    fn push(&mut self, start: u64, pcm: Pcm<'_>) -> Result<(), SttError> {
        if self.closed {
            return Err(SttError::Closed);
        }
        let mut done = Vec::new();
        self.run.push(start, pcm, &mut done);
        // Every chunk is submitted (a drop of one does not stop the next); the first error is reported.
        let mut outcome = Ok(());
        for (s, p) in done {
            let step = self.submit(s, p);
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
        // The task sends `Closed` once the chunks before this are answered.
        self.tx = None;
    }

    fn stats(&self) -> StreamStats {
        self.sink.counters().stats()
    }
}

impl Drop for OpenAiStream {
    fn drop(&mut self) {
        self.close();
    }
}

/// One stream's task: its chunks in order, one request each; then [`SttEvent::Closed`].
pub(super) async fn run(
    ctx: Arc<Ctx>,
    mut rx: mpsc::Receiver<Chunk>,
    sink: ResultSink,
    language: Option<String>,
) {
    let counters = Arc::clone(sink.counters());
    // The last failure told to the session (each kind is told once until a result arrives).
    let mut told: Option<&'static str> = None;
    while let Some(Chunk { start, pcm, place }) = rx.recv().await {
        let n = pcm.len() as u64;
        if sink.is_closed() {
            // The session is gone: nobody would read the words, so nothing is sent (nor charged).
            counters.dropped(KIND, "closed", n);
            continue;
        }
        let outcome = request::transcribe(&ctx, &pcm, start, language.as_deref()).await;
        drop(place);
        if outcome.forwarded {
            counters.forwarded(KIND, n);
        } else {
            counters.dropped(KIND, "provider_down", n);
        }
        match outcome.results {
            Ok(results) => {
                for r in results {
                    told = None;
                    sink.result(r);
                }
            }
            Err(e) => {
                let reason = e.code();
                if told != Some(reason) {
                    told = Some(reason);
                    sink.send(SttEvent::Error {
                        reason,
                        message: e.to_string(),
                    });
                }
            }
        }
    }
    // `Closed` is the one event worth waiting for room for (the session reads on its ticks).
    for _ in 0..100 {
        if sink.send(SttEvent::Closed) || sink.is_closed() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

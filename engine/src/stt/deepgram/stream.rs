//! A session's handle on its Deepgram stream: commands go to the stream's connection task through a
//! bounded channel, never waiting (the pipeline thread calls these).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use tokio::sync::mpsc;

use super::KIND;
use crate::stt::provider::{ResultSink, StreamHandle, StreamStats};
use crate::stt::types::{Pcm, SttError};
use crate::telemetry;

/// Commands one stream's channel holds at most (audio is bounded by [`MAX_QUEUED_SAMPLES`] first).
pub(super) const CMD_CAPACITY: usize = 1_024;
/// Audio waiting for the connection task, at most: 10 s (320 KB). Past it pushes are dropped (counted).
pub(super) const MAX_QUEUED_SAMPLES: u64 = 10 * 16_000;

/// What the session tells its connection task, in order.
#[derive(Debug)]
pub(super) enum Cmd {
    Audio { start: u64, pcm: Vec<i16> },
    EndOfRun,
    Finalize,
    Close,
}

/// Audio chunks waiting in every stream's channel for its connection task: the provider's
/// `voicegate_stt_queue_depth` (one per provider, shared by its streams and their tasks).
#[derive(Debug, Default)]
pub(super) struct Depth(AtomicUsize);

impl Depth {
    /// One chunk more is waiting (counted before the send, so a task's [`Depth::took`] never runs first).
    pub(super) fn add(&self) {
        let depth = self.0.fetch_add(1, Ordering::Relaxed) + 1;
        Self::export(depth);
    }

    /// A chunk left the channel (taken by its task, dropped at the end, or never sent).
    pub(super) fn took(&self) {
        let depth = self.0.fetch_sub(1, Ordering::Relaxed).saturating_sub(1);
        Self::export(depth);
    }

    fn export(depth: usize) {
        metrics::gauge!(telemetry::STT_QUEUE_DEPTH, "provider" => KIND.name()).set(depth as f64);
    }
}

pub(super) struct DeepgramStream {
    pub(super) tx: Option<mpsc::Sender<Cmd>>,
    /// Samples in the channel (the task subtracts what it takes).
    pub(super) queued: Arc<AtomicU64>,
    pub(super) depth: Arc<Depth>,
    pub(super) sink: ResultSink,
    pub(super) closed: bool,
}

impl DeepgramStream {
    fn control(&mut self, cmd: Cmd) -> Result<(), SttError> {
        if self.closed {
            return Err(SttError::Closed);
        }
        let Some(tx) = &self.tx else {
            return Err(SttError::Closed);
        };
        match tx.try_send(cmd) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                Err(SttError::QueueFull { dropped_samples: 0 })
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(SttError::Closed),
        }
    }
}

impl StreamHandle for DeepgramStream {
    fn push(&mut self, start: u64, pcm: Pcm<'_>) -> Result<(), SttError> {
        if self.closed {
            return Err(SttError::Closed);
        }
        let n = pcm.len() as u64;
        if n == 0 {
            return Ok(());
        }
        let counters = Arc::clone(self.sink.counters());
        let Some(tx) = &self.tx else {
            return Err(SttError::Closed);
        };
        if self.queued.load(Ordering::Relaxed) + n > MAX_QUEUED_SAMPLES {
            counters.dropped(KIND, "queue_full", n);
            return Err(SttError::Refused { samples: n });
        }
        let mut samples = Vec::with_capacity(pcm.len());
        pcm.extend_i16(&mut samples);
        self.queued.fetch_add(n, Ordering::Relaxed);
        self.depth.add();
        match tx.try_send(Cmd::Audio {
            start,
            pcm: samples,
        }) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.queued.fetch_sub(n, Ordering::Relaxed);
                self.depth.took();
                let (reason, err) = match e {
                    mpsc::error::TrySendError::Full(_) => {
                        ("queue_full", SttError::Refused { samples: n })
                    }
                    mpsc::error::TrySendError::Closed(_) => ("closed", SttError::Closed),
                };
                counters.dropped(KIND, reason, n);
                Err(err)
            }
        }
    }

    fn end_of_run(&mut self) -> Result<(), SttError> {
        self.control(Cmd::EndOfRun)
    }

    fn finalize(&mut self) -> Result<(), SttError> {
        self.control(Cmd::Finalize)
    }

    fn close(&mut self) {
        if self.closed {
            return;
        }
        self.closed = true;
        // Dropping the sender ends the task's input as well, should the channel be full.
        if let Some(tx) = self.tx.take() {
            let _ = tx.try_send(Cmd::Close);
        }
    }

    fn stats(&self) -> StreamStats {
        self.sink.counters().stats()
    }
}

impl Drop for DeepgramStream {
    fn drop(&mut self) {
        self.close();
    }
}

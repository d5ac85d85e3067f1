//! Write-behind: every flush interval, take one batch from each dirty actor and send them all to the store
//! in pipelines (one script call per user), then hand each actor its answer.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use futures_util::future::join_all;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, MissedTickBehavior};

use super::actor::UserMeter;
use super::messages::{BatchDone, Envelope, Take, TakeBatch, UserMsg};
use super::registry::{Dirty, Shared};
use crate::store::{ApplyOutcome, Batch, StoreError, StoreTime};
use crate::telemetry;
use crate::time::Backoff;

/// What one flush round did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RoundReport {
    /// User batches sent to the store.
    pub batches_sent: usize,
    /// Batches the store acknowledged (applied, or already applied).
    pub batches_acked: usize,
    /// Speech ms in the acknowledged batches.
    pub speech_ms_acked: u64,
    /// Batches that failed and stay pending for a retry.
    pub batches_failed: usize,
    /// Actors still dirty after the round.
    pub dirty_left: usize,
}

/// What `Meter::shutdown` flushed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShutdownReport {
    pub rounds: u32,
    pub batches_acked: usize,
    pub speech_ms_flushed: u64,
    /// Users still holding unflushed speech when the deadline passed (0 on a clean shutdown).
    pub users_left: usize,
    /// Speech ms still pending when the deadline passed.
    pub pending_ms_left: u64,
    pub elapsed: Duration,
}

pub(crate) enum Command {
    FlushAll(oneshot::Sender<RoundReport>),
    Shutdown(Duration, oneshot::Sender<ShutdownReport>),
}

pub(crate) struct Flusher {
    shared: Arc<Shared>,
    dirty: HashMap<u64, Addr<UserMeter>>,
    dirty_rx: mpsc::UnboundedReceiver<Dirty>,
    cmd_rx: mpsc::UnboundedReceiver<Command>,
}

impl Flusher {
    pub(crate) fn new(
        shared: Arc<Shared>,
        dirty_rx: mpsc::UnboundedReceiver<Dirty>,
        cmd_rx: mpsc::UnboundedReceiver<Command>,
    ) -> Self {
        Self {
            shared,
            dirty: HashMap::new(),
            dirty_rx,
            cmd_rx,
        }
    }

    pub(crate) async fn run(mut self) {
        let mut tick = tokio::time::interval(self.shared.config.flush_interval);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    self.round(false).await;
                }
                dirty = self.dirty_rx.recv() => {
                    if let Some(d) = dirty {
                        self.dirty.insert(d.id, d.addr);
                    }
                }
                cmd = self.cmd_rx.recv() => match cmd {
                    None => return,
                    Some(Command::FlushAll(reply)) => {
                        let report = self.round(true).await;
                        let _ = reply.send(report);
                    }
                    Some(Command::Shutdown(limit, reply)) => {
                        let report = self.shutdown(limit).await;
                        let _ = reply.send(report);
                    }
                },
            }
        }
    }

    fn drain_registrations(&mut self) {
        while let Ok(d) = self.dirty_rx.try_recv() {
            self.dirty.insert(d.id, d.addr);
        }
    }

    fn publish_gauges(&self) {
        metrics::gauge!(telemetry::METER_LIVE_ACTORS).set(self.shared.live_actors() as f64);
        metrics::gauge!(telemetry::METER_PENDING_SPEECH_MS)
            .set(self.shared.pending_ms_total().max(0) as f64);
    }

    /// One flush round over every dirty actor. `force` ignores retry backoff.
    pub(crate) async fn round(&mut self, force: bool) -> RoundReport {
        self.drain_registrations();
        let mut report = RoundReport::default();
        let actors: Vec<(u64, Addr<UserMeter>)> =
            self.dirty.iter().map(|(&id, a)| (id, a.clone())).collect();
        let answers = join_all(
            actors
                .iter()
                .map(|(_, addr)| addr.send(TakeBatch { force })),
        )
        .await;
        let mut batches = Vec::new();
        let mut owners = Vec::new();
        for ((id, addr), answer) in actors.into_iter().zip(answers) {
            match answer {
                Ok(Take::Batch(batch)) => {
                    batches.push(batch);
                    owners.push(addr);
                }
                Ok(Take::NotNow) => {}
                Ok(Take::Clean) | Err(_) => {
                    self.dirty.remove(&id);
                }
            }
        }
        report.batches_sent = batches.len();
        if !batches.is_empty() {
            let now_ms = self.shared.clock.now_ms();
            let at = StoreTime {
                now_ms,
                retention_ms: self.shared.config.retention_ms(),
                keys_retention_ms: self.shared.config.keys_retention_ms(),
            };
            let started = Instant::now();
            let chunk = self.shared.config.max_pipeline.max(1);
            let mut chunks = Vec::new();
            while !batches.is_empty() {
                let rest = batches.split_off(chunk.min(batches.len()));
                chunks.push(std::mem::replace(&mut batches, rest));
            }
            let store = &self.shared.store;
            let limit = self.shared.config.store_timeout;
            let results = join_all(chunks.iter().map(|c| async move {
                match tokio::time::timeout(limit, store.apply(c, at)).await {
                    Err(_) => Err(StoreError::Timeout),
                    Ok(Ok(r)) if r.len() != c.len() => {
                        Err(StoreError::Protocol("reply count mismatch".into()))
                    }
                    Ok(r) => r,
                }
            }))
            .await;
            metrics::histogram!(telemetry::METER_FLUSH_DURATION_SECONDS)
                .record(started.elapsed().as_secs_f64());
            let mut owners = owners.into_iter();
            for (chunk, result) in chunks.into_iter().zip(results) {
                let per_batch: Vec<Result<ApplyOutcome, StoreError>> = match result {
                    Ok(r) => r,
                    Err(e) => vec![Err(e); chunk.len()],
                };
                for (batch, result) in chunk.into_iter().zip(per_batch) {
                    account(&mut report, &batch, &result);
                    if let Some(addr) = owners.next() {
                        addr.do_send(BatchDone { batch, result });
                    }
                }
            }
        }
        report.dirty_left = self.dirty.len();
        self.publish_gauges();
        report
    }

    async fn shutdown(&mut self, limit: Duration) -> ShutdownReport {
        let started = Instant::now();
        let mut report = ShutdownReport::default();
        // Between rounds that failed (the store is down): jittered, at most 250 ms so the limit is used.
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_millis(250));
        // Actors queue their pending deltas when they passivate; ask every registered one to flush.
        for addr in self.shared.all_actors() {
            addr.do_send(Envelope::new(UserMsg::Passivate, None));
        }
        loop {
            // Let BatchDone answers and registrations land before asking again.
            tokio::time::sleep(Duration::from_millis(5)).await;
            self.drain_registrations();
            let round = self.round(true).await;
            report.rounds += 1;
            report.batches_acked += round.batches_acked;
            report.speech_ms_flushed += round.speech_ms_acked;
            let clean = self.dirty.is_empty() && self.shared.pending_ms_total() <= 0;
            if clean || started.elapsed() >= limit {
                break;
            }
            if round.batches_failed > 0 {
                let left = limit.saturating_sub(started.elapsed());
                tokio::time::sleep(backoff.next_delay().min(left)).await;
            } else if round.batches_sent == 0 {
                // Nothing to send yet: answers or registrations are on their way.
                backoff.reset();
                tokio::time::sleep(Duration::from_millis(50)).await;
            } else {
                backoff.reset();
            }
        }
        report.users_left = self.dirty.len();
        report.pending_ms_left = self.shared.pending_ms_total().max(0) as u64;
        report.elapsed = started.elapsed();
        report
    }
}

fn account(report: &mut RoundReport, batch: &Batch, result: &Result<ApplyOutcome, StoreError>) {
    match result {
        Ok(ApplyOutcome::Applied { rejected_keys }) => {
            report.batches_acked += 1;
            let rejected: u64 = batch
                .keyed
                .iter()
                .filter(|k| rejected_keys.contains(&k.key))
                .map(|k| k.delta.bucket_ms())
                .sum();
            report.speech_ms_acked += batch.speech_ms() - rejected;
        }
        Ok(ApplyOutcome::Duplicate) => {
            report.batches_acked += 1;
        }
        Err(_) => report.batches_failed += 1,
    }
}

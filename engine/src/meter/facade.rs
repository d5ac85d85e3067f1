//! `Meter`: the handle the server holds. Cheap to clone; every call routes by uid to the user's actor.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use tokio::sync::{mpsc, oneshot};

use super::MeterConfig;
use super::flusher::{Command, Flusher, RoundReport, ShutdownReport};
use super::messages::{
    FlushReport, MeterError, RecordOutcome, RecordSpeech, TotalsAgainst, UsageTotals, UserMsg,
};
use super::registry::Shared;
use crate::store::Store;
use crate::time::Clock;

/// The metering engine: per-user actors plus the write-behind flusher.
#[derive(Clone)]
pub struct Meter {
    shared: Arc<Shared>,
    cmd_tx: mpsc::UnboundedSender<Command>,
    /// Keeps the shard arbiters alive as long as a handle exists.
    _arbiters: Arc<ArbiterSet>,
}

struct ArbiterSet(Vec<Arbiter>);

impl Drop for ArbiterSet {
    fn drop(&mut self) {
        for arbiter in &self.0 {
            arbiter.stop();
        }
    }
}

impl Meter {
    /// Starts the shard arbiters and the flusher. Must be called inside a running actix `System`; the
    /// flusher runs on the calling arbiter.
    pub fn start(config: MeterConfig, store: Arc<dyn Store>, clock: Arc<dyn Clock>) -> Self {
        let (arbiters, handles) = if config.shards == 0 {
            (Vec::new(), vec![Arbiter::current()])
        } else {
            let arbiters: Vec<Arbiter> = (0..config.shards)
                .map(|i| crate::threads::named_arbiter(&format!("vg-meter-{i}")))
                .collect();
            let handles = arbiters.iter().map(Arbiter::handle).collect();
            (arbiters, handles)
        };
        let (dirty_tx, dirty_rx) = mpsc::unbounded_channel();
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared::new(config, store, clock, handles, dirty_tx));
        actix::spawn(Flusher::new(Arc::clone(&shared), dirty_rx, cmd_rx).run());
        Self {
            shared,
            cmd_tx,
            _arbiters: Arc::new(ArbiterSet(arbiters)),
        }
    }

    pub fn config(&self) -> &MeterConfig {
        &self.shared.config
    }

    /// Meters speech without waiting for the answer: waits only while the user's mailbox is full
    /// (backpressure), never for the store.
    pub async fn record(&self, rec: RecordSpeech) {
        let uid = Arc::clone(&rec.uid);
        self.shared.send(&uid, UserMsg::Record(rec, None)).await;
    }

    /// Meters speech and returns its status with the user's totals after it (for cap checks).
    pub async fn record_and_read(&self, rec: RecordSpeech) -> Result<RecordOutcome, MeterError> {
        let (tx, rx) = oneshot::channel();
        let uid = Arc::clone(&rec.uid);
        self.shared.send(&uid, UserMsg::Record(rec, Some(tx))).await;
        rx.await.map_err(|_| MeterError::ActorGone)
    }

    /// The user's totals (store base + this node's pending speech). `known` is false while the store
    /// could not be read.
    pub async fn totals(&self, uid: &str) -> Result<UsageTotals, MeterError> {
        self.read_totals(uid, None).await
    }

    /// [`totals`](Self::totals), plus, when they exceed a cap in `against.caps`, the instant they fall back
    /// under every cap with no new speech (`under_caps_at_ms`), and likewise for the ceiling
    /// (`under_ceiling_at_ms`): what bounds a refusal's `Retry-After`.
    pub async fn totals_against(
        &self,
        uid: &str,
        against: TotalsAgainst,
    ) -> Result<UsageTotals, MeterError> {
        self.read_totals(uid, Some(against)).await
    }

    async fn read_totals(
        &self,
        uid: &str,
        against: Option<TotalsAgainst>,
    ) -> Result<UsageTotals, MeterError> {
        let (tx, rx) = oneshot::channel();
        self.shared
            .send(uid, UserMsg::ReadTotals(against, tx))
            .await;
        rx.await.map_err(|_| MeterError::ActorGone)
    }

    /// Flushes one user now (retrying the sealed batch first) and waits for the store's answer.
    pub async fn flush_user(&self, uid: &str) -> Result<FlushReport, MeterError> {
        let (tx, rx) = oneshot::channel();
        self.shared.send(uid, UserMsg::FlushNow(tx)).await;
        rx.await.map_err(|_| MeterError::ActorGone)?
    }

    /// Reloads one user's base from the store now (other writers' speech becomes visible).
    pub async fn refresh_user(&self, uid: &str) -> Result<(), MeterError> {
        let (tx, rx) = oneshot::channel();
        self.shared.send(uid, UserMsg::RefreshNow(tx)).await;
        rx.await.map_err(|_| MeterError::ActorGone)?
    }

    /// Asks a user's actor, if it runs, to flush and stop (what idleness does after `idle_passivation`).
    pub fn passivate_user(&self, uid: &str) {
        self.shared.send_control(uid, UserMsg::Passivate);
    }

    /// One flush round over every dirty user now, ignoring retry backoff.
    pub async fn flush_all(&self) -> RoundReport {
        let (tx, rx) = oneshot::channel();
        if self.cmd_tx.send(Command::FlushAll(tx)).is_err() {
            return RoundReport::default();
        }
        rx.await.unwrap_or_default()
    }

    /// Flushes every actor (retrying until clean or `limit` passes), stops them, and reports what it
    /// flushed. The server's drain calls this after its sessions finished.
    pub async fn shutdown(&self, limit: Duration) -> ShutdownReport {
        let (tx, rx) = oneshot::channel();
        if self.cmd_tx.send(Command::Shutdown(limit, tx)).is_err() {
            return ShutdownReport::default();
        }
        rx.await.unwrap_or_default()
    }

    /// Live user actors.
    pub fn live_actors(&self) -> usize {
        self.shared.live_actors().max(0) as usize
    }

    /// Sends that found a user's mailbox full and waited (backpressure) since the start.
    pub fn mailbox_blocked(&self) -> u64 {
        self.shared.mailbox_blocked()
    }

    /// User actors restarted in place after a panic since the start.
    pub fn actor_restarts(&self) -> u64 {
        self.shared.restarts()
    }

    /// Speech ms recorded on this node and not yet acknowledged by the store.
    pub fn pending_speech_ms(&self) -> u64 {
        self.shared.pending_ms_total().max(0) as u64
    }
}

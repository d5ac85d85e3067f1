//! The per-user meter actor: owns the user's view (store base + its own pending deltas), the pending
//! deltas, the sealed batch being flushed, and the idempotency keys it knows. Fair-use state (stage, case,
//! STT budget) is not here: it lives in the fair-use store, read and changed only through
//! [`crate::fair_use::FairUseLedger`].
//!
//! Store I/O is serialized per actor (one load or one flush at a time, [`Io`]), so a snapshot and a batch
//! never race: a loaded base plus the sealed batch plus pending is exact. Recording never waits for the
//! store.
//!
//! - **Lifecycle** ([`Lifecycle`]): `Active` → `Passivating` (idle, or asked) → `LeftRegistry` (once
//!   clean; `Retire` queued behind every message sent before) → `Stopping` (`Retire` seen; stops once
//!   clean). Activity turns `Passivating` back to `Active`. Hydration is its own enum ([`Hydration`]).
//! - **Mailbox**: bounded by the registry (see [`super::registry`]); a full one makes senders wait.
//! - **Supervision**: every handler and every store answer runs under `catch_unwind`. A panic replaces the
//!   actor's state in place (same address and mailbox, so nothing queued is lost) with a fresh one built
//!   from what it keeps outside that state ([`Kept`]: pending deltas, the sealed batch, writer id and
//!   sequence, waiters, the I/O in flight), which then re-hydrates from the store. Counted in
//!   `voicegate_meter_actor_restarts_total`. A store call that panics is a failed store call.

mod io;
mod record;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use actix::prelude::*;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::{debug, error, warn};

use super::MeterConfig;
use super::messages::{
    BatchDone, Envelope, FlushReport, MeterError, Retire, Take, TakeBatch, UserMsg,
};
use super::pending::Pending;
use super::window::MinuteWindow;
use crate::store::{Batch, Store, StoreError, StoreTime, WriterId};
use crate::telemetry;
use crate::time::{Backoff, Clock, MonthKey};

/// A sealed batch: sent, or waiting to be sent again. Never merged with newer deltas.
struct Sealed {
    /// `None` while the flusher (or a direct flush) holds it.
    batch: Option<Batch>,
    speech_ms: u64,
    entries: usize,
    /// Failed sends so far are `backoff.attempts()`.
    backoff: Backoff,
    retry_at: Option<Instant>,
}

/// The one store operation an actor may have in flight.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Io {
    Idle,
    Loading,
    Flushing,
}

/// Where the actor is in its life (see the module doc).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Lifecycle {
    Active,
    /// Leaves the registry once clean, unless a message (activity) comes first.
    Passivating,
    /// Out of the registry; its own `Retire` is queued behind every message sent before.
    LeftRegistry,
    /// `Retire` arrived: stops once clean.
    Stopping,
}

/// Whether the user's base is loaded.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Hydration {
    /// Not loaded yet (or lost in a restart): totals hold only this actor's own speech (`known: false`).
    Unknown {
        backoff: Backoff,
        next_at: Option<Instant>,
    },
    Known {
        last_refresh: Instant,
        /// The base must be read again (a batch came back as already applied).
        reload: bool,
    },
}

/// The pending-total check of the record path, cached (see `record_inner`).
struct TotalCheck {
    entries_at: usize,
    records_since: u32,
    over: bool,
}

/// What an actor needs from the registry that started it. The registry's shared state
/// ([`super::registry`]) implements it: the registry names the actor (it starts actors), the actor names
/// only this trait, so the two modules do not import each other.
pub(crate) trait Host: Send + Sync + 'static {
    fn config(&self) -> &MeterConfig;
    fn store(&self) -> &Arc<dyn Store>;
    fn clock(&self) -> &Arc<dyn Clock>;
    /// Adds to the pending gauges of the actor's shard.
    fn adjust_pending(&self, shard: usize, ms: i64, entries: i64);
    /// Pending entries over every actor (the global pending bound).
    fn pending_entries_total(&self) -> i64;
    fn actor_started(&self, shard: usize);
    fn actor_stopped(&self, shard: usize);
    /// Counts a restart after a panic.
    fn count_restart(&self);
    /// Joins the flusher's dirty set.
    fn register_dirty(&self, id: u64, addr: Addr<UserMeter>);
    /// Leaves the registry, if `addr` is still the actor registered for `uid`.
    fn leave_registry(&self, shard: usize, uid: &str, addr: &Addr<UserMeter>);
}

/// What survives a restart: the deltas not yet in the store, the identity that keeps their flush
/// idempotent, the callers waiting, and the I/O in flight (its answer still comes to this mailbox).
struct Kept {
    uid: Arc<str>,
    id: u64,
    shard: usize,
    shared: Arc<dyn Host>,
    writer: WriterId,
    next_seq: u64,
    pending: Pending,
    sealed: Option<Sealed>,
    /// Keys of the sealed batch (held or out at the store).
    in_flight_keys: Vec<Box<str>>,
    io: Io,
    lifecycle: Lifecycle,
    /// Registered with the flusher's dirty set.
    in_flush_set: bool,
    flush_waiters: Vec<oneshot::Sender<Result<FlushReport, MeterError>>>,
    flush_progress: FlushReport,
    last_flush_error: Option<StoreError>,
    refresh_waiters: Vec<oneshot::Sender<Result<(), MeterError>>>,
    /// What this actor added to its shard's pending gauges.
    accounted_ms: u64,
    accounted_entries: usize,
}

pub struct UserMeter {
    k: Kept,
    view: MinuteWindow,
    view_months: Vec<(MonthKey, u64)>,
    hydration: Hydration,
    /// Idempotency keys metered within the retention → unix ms they were learned.
    known_keys: HashMap<Box<str>, u64>,
    last_activity: Instant,
    total_check: TotalCheck,
    unreported_ms: [u64; 3],
}

impl UserMeter {
    pub(crate) fn new(uid: Arc<str>, id: u64, shard: usize, shared: Arc<dyn Host>) -> Self {
        Self::with(Kept {
            uid,
            id,
            shard,
            shared,
            writer: WriterId::random(),
            next_seq: 1,
            pending: Pending::default(),
            sealed: None,
            in_flight_keys: Vec::new(),
            io: Io::Idle,
            lifecycle: Lifecycle::Active,
            in_flush_set: false,
            flush_waiters: Vec::new(),
            flush_progress: FlushReport::default(),
            last_flush_error: None,
            refresh_waiters: Vec::new(),
            accounted_ms: 0,
            accounted_entries: 0,
        })
    }

    /// A fresh actor state around what was kept.
    fn with(k: Kept) -> Self {
        let backoff = k.shared.config().backoff();
        Self {
            k,
            view: MinuteWindow::new(),
            view_months: Vec::new(),
            hydration: Hydration::Unknown {
                backoff,
                next_at: None,
            },
            known_keys: HashMap::new(),
            last_activity: Instant::now(),
            total_check: TotalCheck {
                entries_at: usize::MAX,
                records_since: 0,
                over: false,
            },
            unreported_ms: [0; 3],
        }
    }

    /// Runs `f`; a panic in it restarts the actor (see the module doc).
    fn supervised(
        &mut self,
        ctx: &mut Context<Self>,
        f: impl FnOnce(&mut Self, &mut Context<Self>),
    ) {
        let ran = std::panic::catch_unwind(AssertUnwindSafe(|| f(self, ctx)));
        if ran.is_err() {
            self.restart(ctx);
        }
    }

    /// Replaces the state in place, keeping [`Kept`], and starts re-hydrating.
    fn restart(&mut self, ctx: &mut Context<Self>) {
        self.k.shared.count_restart();
        error!(uid = %self.k.uid, pending_ms = self.k.accounted_ms, "Meter actor panicked; restarted with its pending deltas, re-hydrating.");
        let identity = self.kept_identity();
        let kept = std::mem::replace(&mut self.k, identity);
        *self = Self::with(kept);
        // The view now holds nothing; the load (due now: `Unknown`) rebuilds it from the base, the sealed
        // batch and the pending deltas. A second panic here is counted by the next message's restart.
        let _ = std::panic::catch_unwind(AssertUnwindSafe(|| {
            self.sync_accounting();
            self.drive(ctx);
        }));
    }

    /// The identity fields of [`Kept`] (copied), with empty deltas and waiters.
    fn kept_identity(&self) -> Kept {
        Kept {
            uid: Arc::clone(&self.k.uid),
            id: self.k.id,
            shard: self.k.shard,
            shared: Arc::clone(&self.k.shared),
            writer: self.k.writer,
            next_seq: self.k.next_seq,
            pending: Pending::default(),
            sealed: None,
            in_flight_keys: Vec::new(),
            io: self.k.io,
            lifecycle: self.k.lifecycle,
            in_flush_set: self.k.in_flush_set,
            flush_waiters: Vec::new(),
            flush_progress: self.k.flush_progress,
            last_flush_error: None,
            refresh_waiters: Vec::new(),
            accounted_ms: self.k.accounted_ms,
            accounted_entries: self.k.accounted_entries,
        }
    }

    fn store_time(&self, now_ms: u64) -> StoreTime {
        StoreTime {
            now_ms,
            retention_ms: self.k.shared.config().retention_ms(),
            keys_retention_ms: self.k.shared.config().keys_retention_ms(),
        }
    }

    fn is_clean(&self) -> bool {
        self.k.pending.is_empty() && self.k.sealed.is_none()
    }

    /// Brings the shard's pending gauges in line with this actor's pending and sealed deltas.
    fn sync_accounting(&mut self) {
        let k = &mut self.k;
        let sealed_ms = k.sealed.as_ref().map_or(0, |s| s.speech_ms);
        let sealed_entries = k.sealed.as_ref().map_or(0, |s| s.entries);
        let ms = k.pending.speech_ms() + sealed_ms;
        let entries = k.pending.entries() + sealed_entries;
        k.shared.adjust_pending(
            k.shard,
            ms as i64 - k.accounted_ms as i64,
            entries as i64 - k.accounted_entries as i64,
        );
        k.accounted_ms = ms;
        k.accounted_entries = entries;
    }

    fn mark_dirty(&mut self, ctx: &mut Context<Self>) {
        if !self.k.in_flush_set {
            self.k.in_flush_set = true;
            self.k.shared.register_dirty(self.k.id, ctx.address());
        }
    }

    /// Starts whatever store I/O is due, answers waiters, and moves the lifecycle on when it may.
    fn drive(&mut self, ctx: &mut Context<Self>) {
        if self.k.io != Io::Idle {
            return;
        }
        if !self.k.flush_waiters.is_empty() {
            if self.is_clean() {
                let report = std::mem::take(&mut self.k.flush_progress);
                for w in self.k.flush_waiters.drain(..) {
                    let _ = w.send(Ok(report));
                }
            } else if let Some(e) = self.k.last_flush_error.take() {
                for w in self.k.flush_waiters.drain(..) {
                    let _ = w.send(Err(MeterError::Store(e.clone())));
                }
            } else {
                self.start_direct_flush(ctx);
                return;
            }
        }
        if self.load_due() {
            self.start_load(ctx, false);
            return;
        }
        if !self.is_clean() {
            return;
        }
        match self.k.lifecycle {
            Lifecycle::Passivating => {
                self.k.lifecycle = Lifecycle::LeftRegistry;
                self.k
                    .shared
                    .leave_registry(self.k.shard, &self.k.uid, &ctx.address());
                ctx.address().do_send(Retire);
            }
            Lifecycle::Stopping => ctx.stop(),
            Lifecycle::Active | Lifecycle::LeftRegistry => {}
        }
    }

    fn load_due(&self) -> bool {
        if !self.k.refresh_waiters.is_empty() {
            return true;
        }
        match self.hydration {
            Hydration::Unknown { next_at, .. } => next_at.is_none_or(|t| Instant::now() >= t),
            Hydration::Known {
                last_refresh,
                reload,
            } => {
                reload
                    || (self.last_activity > last_refresh
                        && last_refresh.elapsed() >= self.k.shared.config().refresh_interval)
            }
        }
    }

    fn on_tick(&mut self, ctx: &mut Context<Self>) {
        let now = self.k.shared.clock().now_ms();
        let cutoff = now.saturating_sub(self.k.shared.config().keys_retention_ms());
        self.known_keys.retain(|_, &mut at| at >= cutoff);
        if self.k.lifecycle == Lifecycle::Active
            && self.last_activity.elapsed() >= self.k.shared.config().idle_passivation
        {
            debug!(uid = %self.k.uid, "Meter actor idle: passivating.");
            self.k.lifecycle = Lifecycle::Passivating;
        }
        self.drive(ctx);
    }

    fn on_message(&mut self, msg: UserMsg, ctx: &mut Context<Self>) {
        self.last_activity = Instant::now();
        match (&msg, self.k.lifecycle) {
            (UserMsg::Passivate, Lifecycle::Active) => self.k.lifecycle = Lifecycle::Passivating,
            // Activity cancels a passivation that has not left the registry yet.
            (UserMsg::Passivate, _) => {}
            (_, Lifecycle::Passivating) => self.k.lifecycle = Lifecycle::Active,
            _ => {}
        }
        match msg {
            UserMsg::Record(rec, reply) => self.record(rec, reply, ctx),
            UserMsg::ReadTotals(against, reply) => {
                let now = self.k.shared.clock().now_ms();
                let mut totals = self.totals(now);
                if let Some(a) = against {
                    totals.under_caps_at_ms = self.under_caps_at(&a.caps, &totals, now);
                    if a.ceiling_ms > 0 {
                        let ceiling = crate::policy::SoftCaps::daily_only(a.ceiling_ms);
                        totals.under_ceiling_at_ms = self.under_caps_at(&ceiling, &totals, now);
                    }
                }
                let _ = reply.send(totals);
            }
            UserMsg::FlushNow(reply) => {
                self.k.flush_waiters.push(reply);
                self.drive(ctx);
            }
            UserMsg::RefreshNow(reply) => {
                self.k.refresh_waiters.push(reply);
                self.drive(ctx);
            }
            UserMsg::Passivate => self.drive(ctx),
        }
    }
}

impl Actor for UserMeter {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.k.shared.actor_started(self.k.shard);
        ctx.run_interval(self.k.shared.config().actor_tick(), |act, ctx| {
            act.supervised(ctx, Self::on_tick)
        });
        self.start_load(ctx, true);
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        if !self.is_clean() {
            metrics::counter!(telemetry::METER_RECORDS_DROPPED_TOTAL, "reason" => "stopped")
                .increment(1);
            warn!(uid = %self.k.uid, pending_ms = self.k.accounted_ms, "Meter actor stopped with unflushed speech.");
        }
        self.k.pending = Pending::default();
        self.k.sealed = None;
        self.sync_accounting();
        self.k.shared.actor_stopped(self.k.shard);
    }
}

impl Handler<Envelope> for UserMeter {
    type Result = ();

    fn handle(&mut self, env: Envelope, ctx: &mut Self::Context) {
        let Envelope { msg, slot } = env;
        self.supervised(ctx, |act, ctx| act.on_message(msg, ctx));
        // The mailbox slot is given back once the message is handled.
        drop(slot);
    }
}

impl Handler<TakeBatch> for UserMeter {
    type Result = MessageResult<TakeBatch>;

    fn handle(&mut self, msg: TakeBatch, ctx: &mut Self::Context) -> Self::Result {
        let mut take = Take::NotNow;
        self.supervised(ctx, |act, _| {
            take = act.take_batch(msg.force);
            act.sync_accounting();
        });
        MessageResult(take)
    }
}

impl Handler<BatchDone> for UserMeter {
    type Result = ();

    fn handle(&mut self, msg: BatchDone, ctx: &mut Self::Context) {
        self.supervised(ctx, |act, ctx| {
            act.on_batch_done(msg.batch, msg.result, ctx)
        });
    }
}

impl Handler<Retire> for UserMeter {
    type Result = ();

    fn handle(&mut self, _msg: Retire, ctx: &mut Self::Context) {
        self.supervised(ctx, |act, ctx| {
            act.k.lifecycle = Lifecycle::Stopping;
            act.drive(ctx);
        });
    }
}

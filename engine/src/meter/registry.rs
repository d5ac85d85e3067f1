//! Where user actors live: shards (one arbiter thread each) by uid hash, each split into lock stripes.
//!
//! A message to a user is enqueued (`do_send`) while its stripe's read lock is held; an actor leaves the
//! registry under the write lock and then queues `Retire` to itself. So every message sent to an actor is
//! in its mailbox before `Retire`, and none is lost to passivation. No global lock: a send takes one
//! stripe's read lock.
//!
//! **Bounded mailboxes.** Every facade message ([`UserMsg`]) takes one of its actor's
//! [`MAILBOX_CAPACITY`](super::messages::MAILBOX_CAPACITY) slots (a semaphore permit carried in the message, given back once the actor
//! handled it). A sender that finds the mailbox full waits for a slot outside the lock, then delivers:
//! backpressure, never a drop, and the wait is measured (`voicegate_meter_mailbox_blocked_seconds`, the
//! model being Quickwit's backpressure counter). The actor's internal messages are bounded by their
//! senders instead: the flusher awaits `TakeBatch` (actix's own bounded `send`) and sends one `BatchDone`
//! per batch it took (at most one per actor at a time); `Retire` is sent once per actor; `Passivate`
//! once per actor by a shutdown (and by an explicit [`super::Meter::passivate_user`]).

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use actix::prelude::*;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::Instant;

use super::MeterConfig;
use super::actor::{Host, UserMeter};
use super::messages::{Envelope, MAILBOX_CAPACITY, UserMsg};
use crate::store::Store;
use crate::telemetry;
use crate::time::Clock;

const STRIPES_PER_SHARD: usize = 64;

/// A registered actor: its address and the slots of its mailbox.
#[derive(Clone)]
pub(crate) struct Handle {
    pub addr: Addr<UserMeter>,
    room: Arc<Semaphore>,
}

type Stripe = RwLock<HashMap<Arc<str>, Handle>>;

/// Gauges of one shard, updated by its actors (one thread) and summed by the flusher. Aligned to its own
/// cache lines so two shards' threads never write the same line (false sharing on every record).
#[derive(Default)]
#[repr(align(128))]
pub(crate) struct ShardCounters {
    pending_ms: AtomicI64,
    pending_entries: AtomicI64,
    live: AtomicI64,
}

impl ShardCounters {
    pub(crate) fn adjust(&self, ms: i64, entries: i64) {
        if ms != 0 {
            self.pending_ms.fetch_add(ms, Ordering::Relaxed);
        }
        if entries != 0 {
            self.pending_entries.fetch_add(entries, Ordering::Relaxed);
        }
    }
}

pub(crate) struct Shard {
    arbiter: ArbiterHandle,
    stripes: Box<[Stripe]>,
    counters: ShardCounters,
}

/// Registration of a dirty actor with the flusher.
pub(crate) struct Dirty {
    pub id: u64,
    pub addr: Addr<UserMeter>,
}

/// State shared by the facade, the actors and the flusher.
pub(crate) struct Shared {
    pub config: MeterConfig,
    pub store: Arc<dyn Store>,
    pub clock: Arc<dyn Clock>,
    shards: Box<[Shard]>,
    dirty_tx: mpsc::UnboundedSender<Dirty>,
    next_id: AtomicU64,
    hasher: std::collections::hash_map::RandomState,
    /// Sends that found a mailbox full (also in the blocked-seconds histogram's count).
    mailbox_blocked: AtomicU64,
    /// Actors restarted after a panic (also `voicegate_meter_actor_restarts_total`).
    restarts: AtomicU64,
}

impl Shared {
    pub(crate) fn new(
        config: MeterConfig,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        arbiters: Vec<ArbiterHandle>,
        dirty_tx: mpsc::UnboundedSender<Dirty>,
    ) -> Self {
        let shards = arbiters
            .into_iter()
            .map(|arbiter| Shard {
                arbiter,
                stripes: (0..STRIPES_PER_SHARD)
                    .map(|_| RwLock::new(HashMap::new()))
                    .collect(),
                counters: ShardCounters::default(),
            })
            .collect();
        Self {
            config,
            store,
            clock,
            shards,
            dirty_tx,
            next_id: AtomicU64::new(1),
            hasher: std::collections::hash_map::RandomState::new(),
            mailbox_blocked: AtomicU64::new(0),
            restarts: AtomicU64::new(0),
        }
    }

    pub(crate) fn mailbox_blocked(&self) -> u64 {
        self.mailbox_blocked.load(Ordering::Relaxed)
    }

    pub(crate) fn restarts(&self) -> u64 {
        self.restarts.load(Ordering::Relaxed)
    }

    pub(crate) fn count_restart(&self) {
        self.restarts.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(telemetry::METER_ACTOR_RESTARTS_TOTAL, "reason" => "panic").increment(1);
    }

    fn locate(&self, uid: &str) -> (usize, usize) {
        let h = self.hasher.hash_one(uid);
        (
            (h % self.shards.len() as u64) as usize,
            ((h >> 32) % STRIPES_PER_SHARD as u64) as usize,
        )
    }

    pub(crate) fn shard_counters(&self, shard: usize) -> &ShardCounters {
        &self.shards[shard].counters
    }

    pub(crate) fn pending_entries_total(&self) -> i64 {
        self.shards
            .iter()
            .map(|s| s.counters.pending_entries.load(Ordering::Relaxed))
            .sum()
    }

    pub(crate) fn pending_ms_total(&self) -> i64 {
        self.shards
            .iter()
            .map(|s| s.counters.pending_ms.load(Ordering::Relaxed))
            .sum()
    }

    pub(crate) fn live_actors(&self) -> i64 {
        self.shards
            .iter()
            .map(|s| s.counters.live.load(Ordering::Relaxed))
            .sum()
    }

    pub(crate) fn actor_started(&self, shard: usize) {
        self.shards[shard]
            .counters
            .live
            .fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn actor_stopped(&self, shard: usize) {
        self.shards[shard]
            .counters
            .live
            .fetch_sub(1, Ordering::Relaxed);
    }

    pub(crate) fn register_dirty(&self, id: u64, addr: Addr<UserMeter>) {
        // The flusher only goes away with the meter; then nothing is left to flush to.
        let _ = self.dirty_tx.send(Dirty { id, addr });
    }

    /// Enqueues `msg` to the user's actor (creating it first if needed) in one of its mailbox slots,
    /// waiting for a slot while the mailbox is full.
    pub(crate) async fn send(self: &Arc<Self>, uid: &str, msg: UserMsg) {
        let mut msg = msg;
        loop {
            // Fast path: a free slot, taken and used under one read lock.
            let room = match self.try_deliver(uid, msg) {
                Ok(()) => return,
                Err((back, room)) => {
                    msg = back;
                    room
                }
            };
            self.mailbox_blocked.fetch_add(1, Ordering::Relaxed);
            let started = Instant::now();
            // Never closed: the semaphore lives as long as a handle to it.
            let Ok(permit) = room.clone().acquire_owned().await else {
                continue;
            };
            metrics::histogram!(telemetry::METER_MAILBOX_BLOCKED_SECONDS)
                .record(started.elapsed().as_secs_f64());
            match self.deliver_with(uid, &room, msg, permit) {
                Ok(()) => return,
                // The actor left the registry while we waited: its successor has its own mailbox.
                Err(back) => msg = back,
            }
        }
    }

    /// Delivers with a free slot of the registered (or a new) actor; otherwise hands the message back
    /// with the full mailbox's slots.
    fn try_deliver(
        self: &Arc<Self>,
        uid: &str,
        msg: UserMsg,
    ) -> Result<(), (UserMsg, Arc<Semaphore>)> {
        let (shard, stripe) = self.locate(uid);
        let lock = &self.shards[shard].stripes[stripe];
        {
            let map = lock.read().unwrap_or_else(|e| e.into_inner());
            if let Some(h) = map.get(uid) {
                return match Arc::clone(&h.room).try_acquire_owned() {
                    Ok(permit) => {
                        h.addr.do_send(Envelope::new(msg, Some(permit)));
                        Ok(())
                    }
                    Err(_) => Err((msg, Arc::clone(&h.room))),
                };
            }
        }
        let mut map = lock.write().unwrap_or_else(|e| e.into_inner());
        let h = map
            .entry(Arc::from(uid))
            .or_insert_with_key(|uid| self.start_actor(shard, uid.clone()));
        match Arc::clone(&h.room).try_acquire_owned() {
            Ok(permit) => {
                h.addr.do_send(Envelope::new(msg, Some(permit)));
                Ok(())
            }
            Err(_) => Err((msg, Arc::clone(&h.room))),
        }
    }

    /// Delivers with a slot taken from `room`, if `room` is still the registered actor's.
    fn deliver_with(
        &self,
        uid: &str,
        room: &Arc<Semaphore>,
        msg: UserMsg,
        permit: OwnedSemaphorePermit,
    ) -> Result<(), UserMsg> {
        let (shard, stripe) = self.locate(uid);
        let map = self.shards[shard].stripes[stripe]
            .read()
            .unwrap_or_else(|e| e.into_inner());
        match map.get(uid) {
            Some(h) if Arc::ptr_eq(&h.room, room) => {
                h.addr.do_send(Envelope::new(msg, Some(permit)));
                Ok(())
            }
            _ => Err(msg),
        }
    }

    /// A control message outside the mailbox bound (see the module doc), to the registered actor only.
    pub(crate) fn send_control(&self, uid: &str, msg: UserMsg) {
        let (shard, stripe) = self.locate(uid);
        let map = self.shards[shard].stripes[stripe]
            .read()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(h) = map.get(uid) {
            h.addr.do_send(Envelope::new(msg, None));
        }
    }

    fn start_actor(self: &Arc<Self>, shard: usize, uid: Arc<str>) -> Handle {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let shared = Arc::clone(self);
        let addr = UserMeter::start_in_arbiter(&self.shards[shard].arbiter, move |_| {
            UserMeter::new(uid, id, shard, shared)
        });
        Handle {
            addr,
            room: Arc::new(Semaphore::new(MAILBOX_CAPACITY)),
        }
    }

    /// Removes the actor from the registry if `addr` is still the one registered for `uid`.
    pub(crate) fn leave_registry(&self, shard: usize, uid: &str, addr: &Addr<UserMeter>) {
        let (_, stripe) = self.locate(uid);
        let mut map = self.shards[shard].stripes[stripe]
            .write()
            .unwrap_or_else(|e| e.into_inner());
        if map.get(uid).is_some_and(|h| &h.addr == addr) {
            map.remove(uid);
        }
    }

    /// Addresses of every registered actor (shutdown).
    pub(crate) fn all_actors(&self) -> Vec<Addr<UserMeter>> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            for stripe in shard.stripes.iter() {
                out.extend(
                    stripe
                        .read()
                        .unwrap_or_else(|e| e.into_inner())
                        .values()
                        .map(|h| h.addr.clone()),
                );
            }
        }
        out
    }
}

impl Host for Shared {
    fn config(&self) -> &MeterConfig {
        &self.config
    }

    fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    fn adjust_pending(&self, shard: usize, ms: i64, entries: i64) {
        self.shard_counters(shard).adjust(ms, entries);
    }

    fn pending_entries_total(&self) -> i64 {
        Shared::pending_entries_total(self)
    }

    fn actor_started(&self, shard: usize) {
        Shared::actor_started(self, shard);
    }

    fn actor_stopped(&self, shard: usize) {
        Shared::actor_stopped(self, shard);
    }

    fn count_restart(&self) {
        Shared::count_restart(self);
    }

    fn register_dirty(&self, id: u64, addr: Addr<UserMeter>) {
        Shared::register_dirty(self, id, addr);
    }

    fn leave_registry(&self, shard: usize, uid: &str, addr: &Addr<UserMeter>) {
        Shared::leave_registry(self, shard, uid, addr);
    }
}

//! Where user actors live: shards (one arbiter thread each) by uid hash, each split into lock stripes.
//!
//! A message to a user is enqueued (`do_send`) while its stripe's read lock is held; an actor leaves the
//! registry under the write lock and then queues `Retire` to itself. So every message sent to an actor is
//! in its mailbox before `Retire`, and none is lost to passivation. No global lock: a send takes one
//! stripe's read lock.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use actix::dev::ToEnvelope;
use actix::prelude::*;
use tokio::sync::mpsc;

use super::MeterConfig;
use super::actor::UserMeter;
use crate::store::Store;
use crate::time::Clock;

const STRIPES_PER_SHARD: usize = 64;

type Stripe = RwLock<HashMap<Arc<str>, Addr<UserMeter>>>;

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
        }
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

    /// Enqueues `msg` to the user's actor, creating it first if needed, under the stripe lock.
    pub(crate) fn send<M>(self: &Arc<Self>, uid: &str, msg: M)
    where
        M: Message + Send + 'static,
        M::Result: Send,
        UserMeter: Handler<M>,
        <UserMeter as Actor>::Context: ToEnvelope<UserMeter, M>,
    {
        let (shard, stripe) = self.locate(uid);
        let lock = &self.shards[shard].stripes[stripe];
        {
            let map = lock.read().unwrap_or_else(|e| e.into_inner());
            if let Some(addr) = map.get(uid) {
                addr.do_send(msg);
                return;
            }
        }
        let mut map = lock.write().unwrap_or_else(|e| e.into_inner());
        let addr = map.entry(Arc::from(uid)).or_insert_with_key(|uid| {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let (uid, shared) = (uid.clone(), Arc::clone(self));
            UserMeter::start_in_arbiter(&self.shards[shard].arbiter, move |_| {
                UserMeter::new(uid, id, shard, shared)
            })
        });
        addr.do_send(msg);
    }

    /// Removes the actor from the registry if `addr` is still the one registered for `uid`.
    pub(crate) fn leave_registry(&self, shard: usize, uid: &str, addr: &Addr<UserMeter>) {
        let (_, stripe) = self.locate(uid);
        let mut map = self.shards[shard].stripes[stripe]
            .write()
            .unwrap_or_else(|e| e.into_inner());
        if map.get(uid).is_some_and(|a| a == addr) {
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
                        .cloned(),
                );
            }
        }
        out
    }
}

//! The leases this node holds (DESIGN §3: every per-user limit counts across nodes through them).
//!
//! - [`Leases::acquire`] takes a slot of a limit in the store ([`crate::store::lease`]) and returns a
//!   [`LeaseGuard`]; dropping the guard gives the slot back (queued to the heartbeat task, bounded).
//! - The heartbeat task extends every held slot each `ttl / 3`, so a slot outlives its holder by at most
//!   `ttl`: a node that dies stops its heartbeat and its slots expire by themselves.
//! - Failure mode (DESIGN §4: per decision, so the caller's): an acquire the store does not answer within
//!   `timeout` is [`Acquired::Unavailable`] with a guard. Keep it to fail open (the heartbeat writes it,
//!   limit-checked, once the store answers) or drop it to fail closed.
//!
//! ```ignore
//! match leases.acquire(LeaseKey::user("sync_upload", uid), limit).await {
//!     Acquired::Granted(lease) => { /* hold `lease` while the upload runs */ }
//!     Acquired::Refused { held, limit } => { /* 429, the limit's code */ }
//!     Acquired::Unavailable { guard, error } => { /* keep `guard` (fail open) or drop it (fail closed) */ }
//! }
//! ```
//! Add a new limit's row (kind, scope, default, refusal, failure mode) to `docs/operations.md`
//! ("Per-user and per-address limits").

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{mpsc, watch};

use crate::store::StoreError;
use crate::store::lease::{LeaseKey, LeaseOutcome, LeaseStore};
use crate::telemetry::{
    LEASE_ACQUIRES_TOTAL, LEASE_REFRESHES_TOTAL, LEASE_RELEASES_TOTAL, LEASES_HELD,
};
use crate::time::Clock;

/// Releases waiting for the heartbeat task at most; beyond it a release is counted (`queue_full`) and its
/// slot expires within the TTL instead.
const RELEASE_QUEUE: usize = 8_192;
/// Store calls of one heartbeat round (or one batch of releases) in flight at once.
const CONCURRENCY: usize = 64;

/// How long slots live and how long a store call may take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseConfig {
    /// A slot not refreshed for this long expires (the heartbeat refreshes each `ttl / 3`).
    pub ttl: Duration,
    /// Longest wait for one store call; an acquire past it is [`Acquired::Unavailable`].
    pub timeout: Duration,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        LeaseConfig {
            ttl: Duration::from_secs(30),
            timeout: Duration::from_secs(1),
        }
    }
}

impl LeaseConfig {
    /// How often the heartbeat refreshes held slots: a third of the TTL, so two missed rounds still keep them.
    pub fn refresh_interval(&self) -> Duration {
        (self.ttl / 3).max(Duration::from_millis(1))
    }
}

/// What [`Leases::acquire`] got.
#[derive(Debug)]
pub enum Acquired {
    /// A slot is held until the guard drops.
    Granted(LeaseGuard),
    /// `held` live holders already fill the `limit`.
    Refused { held: u32, limit: u32 },
    /// The store did not answer. The guard is not backed by the store yet: keep it to fail open (the
    /// heartbeat takes the slot when the store answers, if one is free) or drop it to fail closed.
    Unavailable {
        guard: LeaseGuard,
        error: StoreError,
    },
}

/// The leases of this node. Cheap to clone.
#[derive(Clone)]
pub struct Leases {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn LeaseStore>,
    clock: Arc<dyn Clock>,
    config: LeaseConfig,
    /// This process's random id: the prefix of every holder id it writes.
    node: String,
    next: AtomicU64,
    held: Mutex<HashMap<u64, Arc<Held>>>,
    releases: mpsc::Sender<(LeaseKey, String)>,
    /// Heartbeat rounds completed.
    rounds: watch::Sender<u64>,
    /// Set by [`Leases::halt`] (tests: a crash stops heartbeats and releases).
    halted: Arc<AtomicBool>,
}

/// One held slot, as the heartbeat sees it.
struct Held {
    key: LeaseKey,
    holder: String,
    limit: u32,
    /// The store recorded this holder at the last answer (false while it never did, or after it was lost).
    backed: AtomicBool,
}

impl Leases {
    /// Starts the heartbeat task on the current tokio runtime; it ends when the last clone and guard are gone.
    pub fn start(store: Arc<dyn LeaseStore>, clock: Arc<dyn Clock>, config: LeaseConfig) -> Self {
        let (releases, rx) = mpsc::channel(RELEASE_QUEUE);
        let halted = Arc::new(AtomicBool::new(false));
        let releaser = Releaser {
            store: Arc::clone(&store),
            timeout: config.timeout,
            halted: Arc::clone(&halted),
        };
        let inner = Arc::new(Inner {
            store,
            clock,
            config,
            node: format!("{:016x}", rand::random::<u64>()),
            next: AtomicU64::new(1),
            held: Mutex::new(HashMap::new()),
            releases,
            rounds: watch::Sender::new(0),
            halted,
        });
        tokio::spawn(heartbeat(Arc::downgrade(&inner), rx, releaser, config));
        Leases { inner }
    }

    pub fn config(&self) -> LeaseConfig {
        self.inner.config
    }

    /// This process's holder-id prefix (logs).
    pub fn node_id(&self) -> &str {
        &self.inner.node
    }

    /// Takes one of `limit` slots of `key` (see [`Acquired`]).
    pub async fn acquire(&self, key: LeaseKey, limit: u32) -> Acquired {
        let this = &self.inner;
        let id = this.next.fetch_add(1, Ordering::Relaxed);
        let held = Arc::new(Held {
            holder: format!("{}-{id}", this.node),
            key,
            limit,
            backed: AtomicBool::new(false),
        });
        // Exists before the call: if the caller gives up while the call is in flight, its drop still
        // queues the release (sent after the acquire on the same connection).
        let mut guard = LeaseGuard {
            leases: Arc::clone(&self.inner),
            id,
            held: Arc::clone(&held),
            registered: false,
            release: true,
        };
        let kind = held.key.kind;
        let call = this.store.acquire(
            &held.key,
            &held.holder,
            limit,
            this.clock.now_ms(),
            ttl_ms(&this.config),
        );
        let outcome = match tokio::time::timeout(this.config.timeout, call).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Timeout),
        };
        match outcome {
            Ok(LeaseOutcome::Granted { .. }) => {
                count_acquire(kind, "granted");
                held.backed.store(true, Ordering::Release);
                guard.register();
                Acquired::Granted(guard)
            }
            Ok(LeaseOutcome::Refused { held }) => {
                count_acquire(kind, "refused");
                guard.release = false;
                Acquired::Refused { held, limit }
            }
            Err(error) => {
                count_acquire(kind, "unavailable");
                guard.register();
                Acquired::Unavailable { guard, error }
            }
        }
    }

    /// The live holders of `key` now, as the store says.
    pub async fn holders(&self, key: &LeaseKey) -> Result<Vec<String>, StoreError> {
        let now = self.inner.clock.now_ms();
        self.inner.store.holders(key, now).await
    }

    /// Slots this node holds (backed or not).
    pub fn held(&self) -> usize {
        self.inner
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Runs one heartbeat round now, on the caller's task (tests on a manual clock; the task runs its own).
    pub async fn refresh_now(&self) {
        refresh_round(&self.inner).await;
    }

    /// Heartbeat rounds completed so far (tests wait on it instead of sleeping).
    pub fn rounds(&self) -> watch::Receiver<u64> {
        self.inner.rounds.subscribe()
    }

    /// Stops heartbeats and releases, as a crash would: the slots stay in the store until they expire.
    #[cfg(any(test, feature = "test-util"))]
    pub fn halt(&self) {
        self.inner.halted.store(true, Ordering::SeqCst);
    }
}

fn ttl_ms(config: &LeaseConfig) -> u64 {
    u64::try_from(config.ttl.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

fn count_acquire(kind: &'static str, outcome: &'static str) {
    metrics::counter!(LEASE_ACQUIRES_TOTAL, "kind" => kind, "outcome" => outcome).increment(1);
}

/// What sends releases (kept by the heartbeat task itself, so the releases queued by the last guards are
/// sent after every handle is gone).
struct Releaser {
    store: Arc<dyn LeaseStore>,
    timeout: Duration,
    halted: Arc<AtomicBool>,
}

/// The heartbeat: a refresh round every `ttl / 3`, and the releases guards queue, in between. One task, so a
/// release queued during a round is sent after that round's refresh of the same slot. It ends once every
/// handle and guard is gone and the queued releases are sent.
async fn heartbeat(
    inner: Weak<Inner>,
    mut releases: mpsc::Receiver<(LeaseKey, String)>,
    releaser: Releaser,
    config: LeaseConfig,
) {
    let mut tick = tokio::time::interval(config.refresh_interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut batch = Vec::with_capacity(256);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                // Gone: only queued releases are left (the channel ends once they are read).
                if let Some(inner) = inner.upgrade() {
                    refresh_round(&inner).await;
                }
            }
            n = releases.recv_many(&mut batch, 256) => {
                if n == 0 {
                    return;
                }
                release_all(&releaser, std::mem::take(&mut batch)).await;
            }
        }
    }
}

async fn refresh_round(inner: &Inner) {
    if inner.halted.load(Ordering::SeqCst) {
        return;
    }
    let held: Vec<Arc<Held>> = inner
        .held
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .values()
        .cloned()
        .collect();
    let ttl = ttl_ms(&inner.config);
    futures_util::stream::iter(held)
        .map(|h| async move {
            let call = inner
                .store
                .acquire(&h.key, &h.holder, h.limit, inner.clock.now_ms(), ttl);
            let outcome = match tokio::time::timeout(inner.config.timeout, call).await {
                Ok(Ok(o)) => Some(o),
                Ok(Err(_)) | Err(_) => None,
            };
            let was_backed = h.backed.load(Ordering::Acquire);
            let label = match outcome {
                Some(LeaseOutcome::Granted { renewed: true, .. }) => "extended",
                // Not live in the store any more (it expired while the store was unreachable, or was never
                // written): taken again.
                Some(LeaseOutcome::Granted { renewed: false, .. }) => "restored",
                Some(LeaseOutcome::Refused { .. }) => "lost",
                None => "failed",
            };
            match outcome {
                Some(LeaseOutcome::Granted { .. }) => h.backed.store(true, Ordering::Release),
                Some(LeaseOutcome::Refused { .. }) => {
                    h.backed.store(false, Ordering::Release);
                    if was_backed {
                        tracing::warn!(
                            message = "A held lease expired in the store and its slot was taken.",
                            kind = h.key.kind,
                            uid = %h.key.uid,
                            holder = %h.holder
                        );
                    }
                }
                None => {}
            }
            metrics::counter!(LEASE_REFRESHES_TOTAL, "outcome" => label).increment(1);
        })
        .buffer_unordered(CONCURRENCY)
        .collect::<()>()
        .await;
    inner.rounds.send_modify(|n| *n += 1);
}

async fn release_all(releaser: &Releaser, batch: Vec<(LeaseKey, String)>) {
    if releaser.halted.load(Ordering::SeqCst) {
        return;
    }
    futures_util::stream::iter(batch)
        .map(|(key, holder)| async move {
            let call = releaser.store.release(&key, &holder);
            let outcome = match tokio::time::timeout(releaser.timeout, call).await {
                Ok(Ok(())) => "released",
                Ok(Err(_)) | Err(_) => "failed",
            };
            metrics::counter!(LEASE_RELEASES_TOTAL, "outcome" => outcome).increment(1);
        })
        .buffer_unordered(CONCURRENCY)
        .collect::<()>()
        .await;
}

/// One slot of a limit, held until dropped (the heartbeat refreshes it meanwhile).
pub struct LeaseGuard {
    leases: Arc<Inner>,
    id: u64,
    held: Arc<Held>,
    registered: bool,
    release: bool,
}

impl LeaseGuard {
    fn register(&mut self) {
        self.leases
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(self.id, Arc::clone(&self.held));
        self.registered = true;
        metrics::gauge!(LEASES_HELD, "kind" => self.held.key.kind).increment(1.0);
    }

    pub fn key(&self) -> &LeaseKey {
        &self.held.key
    }

    /// The holder id written in the store.
    pub fn holder(&self) -> &str {
        &self.held.holder
    }

    /// True while the store records this slot (false for a fail-open guard the store never answered for,
    /// or one whose slot expired and was taken while the store was unreachable).
    pub fn is_backed(&self) -> bool {
        self.held.backed.load(Ordering::Acquire)
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        if self.registered {
            self.leases
                .held
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&self.id);
            metrics::gauge!(LEASES_HELD, "kind" => self.held.key.kind).decrement(1.0);
        }
        if self.release
            && self
                .leases
                .releases
                .try_send((self.held.key.clone(), self.held.holder.clone()))
                .is_err()
        {
            metrics::counter!(LEASE_RELEASES_TOTAL, "outcome" => "queue_full").increment(1);
        }
    }
}

impl std::fmt::Debug for LeaseGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseGuard")
            .field("key", &self.held.key)
            .field("holder", &self.held.holder)
            .field("backed", &self.is_backed())
            .finish()
    }
}

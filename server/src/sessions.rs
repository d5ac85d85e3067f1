//! Admission and drain of realtime listen sessions.
//!
//! - [`SessionRegistry::open`] admits a session when the user is under `VOICEGATE_WS_SESSIONS_PER_USER`, the
//!   node under `VOICEGATE_WS_MAX_SESSIONS` and under the capacity it measures from its own load
//!   ([`crate::admission`], `VOICEGATE_ADMISSION_*`), and the server is not draining; the returned
//!   [`SessionGuard`] releases the slot when dropped.
//! - The per-user limit counts across every node sharing the store: each session holds a lease
//!   ([`voicegate_engine::lease`], kind [`LISTEN_SESSION_LEASE`]) once the engine is mounted
//!   ([`SessionRegistry::use_leases`]). The node's own count is checked first (no store call for a user
//!   already at the limit here). While the store does not answer, a session is admitted against the node's
//!   own count (fail open for audio, DESIGN §4) and its lease is written by the heartbeat once the store
//!   answers; so during an outage a user may hold the limit on each node.
//! - On drain, [`SessionRegistry::close_all`] tells every session to close (each one closes its socket with
//!   1001, meters what it had, then drops its guard) and waits until none is left.
//!
//! The per-user map takes a mutex only at connect and disconnect, never per frame.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use voicegate_engine::lease::{Acquired, LeaseGuard, Leases};
use voicegate_engine::store::lease::LeaseKey;
use voicegate_engine::telemetry::{LISTEN_SESSIONS_ACTIVE, LISTEN_SESSIONS_REFUSED_TOTAL};

use crate::admission::{LoadGate, Overload};
use crate::error::ApiError;

/// The lease kind of a listen session (the store key `vg:{uid}:lease:listen_session`, the metric label).
pub const LISTEN_SESSION_LEASE: &str = "listen_session";

/// The close reason sessions send while the server drains.
pub const DRAIN_CLOSE_REASON: &str = "server draining";

/// Why a session was not admitted.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SessionRefused {
    #[error(
        "at most {limit} concurrent listen sessions per user, on all servers together (VOICEGATE_WS_SESSIONS_PER_USER)"
    )]
    PerUserLimit { limit: usize },
    #[error("server is draining; reconnect to another instance")]
    Draining,
    #[error(
        "this server holds its most listen sessions ({limit}, VOICEGATE_WS_MAX_SESSIONS); reconnect later or to another instance"
    )]
    AtCapacity { limit: usize },
    /// The node's measured load (CPU or tick lag) admits no more sessions now.
    #[error("{0}")]
    Overloaded(Overload),
}

impl From<SessionRefused> for ApiError {
    fn from(e: SessionRefused) -> Self {
        match e {
            SessionRefused::PerUserLimit { .. } => {
                // A session of the user's ends at an unknown time: a short wait, then a new try.
                ApiError::too_many_requests(
                    "too_many_sessions",
                    e.to_string(),
                    crate::error::TRANSIENT_RETRY_AFTER_S,
                )
            }
            SessionRefused::Draining => {
                // Another node takes the session at once.
                ApiError::unavailable("draining", e.to_string())
                    .retry_after(crate::error::IMMEDIATE_RETRY_AFTER_S)
            }
            // Another node may have room now; this one may again once a session ends.
            SessionRefused::AtCapacity { .. } => {
                ApiError::unavailable("at_capacity", e.to_string())
                    .with_field("reason", "max_sessions")
            }
            SessionRefused::Overloaded(overload) => {
                ApiError::unavailable("at_capacity", e.to_string())
                    .with_field("reason", overload.reason())
            }
        }
    }
}

/// Every open listen session, by user. Cloning shares the registry.
#[derive(Clone)]
pub struct SessionRegistry {
    inner: Arc<Inner>,
}

struct Inner {
    per_user_limit: usize,
    total_limit: usize,
    per_user: Mutex<HashMap<String, usize>>,
    /// Set once the engine is mounted; without it the limit is this node's count alone.
    leases: OnceLock<Leases>,
    /// Admission by the node's measured load; `None`: only `total_limit`.
    load: Option<Arc<LoadGate>>,
    active: AtomicUsize,
    closing: watch::Sender<bool>,
    all_closed: Notify,
}

impl SessionRegistry {
    /// At most `per_user_limit` sessions per user and `total_limit` in all.
    pub fn new(per_user_limit: usize, total_limit: usize) -> Self {
        Self::with_load(per_user_limit, total_limit, None)
    }

    /// As [`new`](Self::new), and (with `load`) no session past what the node's measured load admits.
    pub fn with_load(
        per_user_limit: usize,
        total_limit: usize,
        load: Option<Arc<LoadGate>>,
    ) -> Self {
        SessionRegistry {
            inner: Arc::new(Inner {
                per_user_limit,
                total_limit,
                per_user: Mutex::new(HashMap::new()),
                leases: OnceLock::new(),
                load,
                active: AtomicUsize::new(0),
                closing: watch::Sender::new(false),
                all_closed: Notify::new(),
            }),
        }
    }

    /// The load gate, when admission by load is on (its sampler is started with the server).
    pub fn load_gate(&self) -> Option<&Arc<LoadGate>> {
        self.inner.load.as_ref()
    }

    /// Counts the per-user limit across nodes through `leases` from now on (once; later calls are ignored).
    pub fn use_leases(&self, leases: Leases) {
        if self.inner.leases.set(leases).is_err() {
            tracing::debug!(message = "Session leases were already set.");
        }
    }

    /// Admits one session for `uid`: the node's checks, then (with leases) a slot of the user's limit in the
    /// store.
    pub async fn open(&self, uid: &str) -> Result<SessionGuard, SessionRefused> {
        let mut guard = self.open_here(uid)?;
        let Some(leases) = self.inner.leases.get() else {
            return Ok(guard);
        };
        let limit = u32::try_from(self.inner.per_user_limit).unwrap_or(u32::MAX);
        match leases
            .acquire(LeaseKey::user(LISTEN_SESSION_LEASE, uid), limit)
            .await
        {
            Acquired::Granted(lease) => guard.lease = Some(lease),
            Acquired::Unavailable {
                guard: lease,
                error,
            } => {
                // Fail open (audio is admitted, DESIGN §4): this node's count still bounds the user here.
                tracing::debug!(
                    message = "Session lease not confirmed by the store; admitted on this node's count.",
                    uid,
                    %error
                );
                guard.lease = Some(lease);
            }
            Acquired::Refused { limit, .. } => {
                metrics::counter!(LISTEN_SESSIONS_REFUSED_TOTAL, "reason" => "per_user_limit")
                    .increment(1);
                // Dropping `guard` gives the node's slot back.
                return Err(SessionRefused::PerUserLimit {
                    limit: limit as usize,
                });
            }
        }
        Ok(guard)
    }

    /// The node's own checks: draining, capacity, the user's sessions on this node.
    fn open_here(&self, uid: &str) -> Result<SessionGuard, SessionRefused> {
        let this = &self.inner;
        let refused = |reason: &'static str, e: SessionRefused| {
            metrics::counter!(LISTEN_SESSIONS_REFUSED_TOTAL, "reason" => reason).increment(1);
            Err(e)
        };
        if *this.closing.borrow() {
            return refused("draining", SessionRefused::Draining);
        }
        // The node's slot is taken in one step (a burst of connects cannot pass the limit), and given
        // back when a later check refuses.
        let total = this.total_limit;
        let Ok(active) = this
            .active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < total).then_some(n + 1)
            })
        else {
            return refused("at_capacity", SessionRefused::AtCapacity { limit: total });
        };
        if let Some(Err(overload)) = this.load.as_ref().map(|gate| gate.check(active)) {
            self.unreserve();
            return refused(overload.reason(), SessionRefused::Overloaded(overload));
        }
        {
            let mut map = self
                .inner
                .per_user
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let count = map.entry(uid.to_owned()).or_insert(0);
            if *count >= this.per_user_limit {
                drop(map);
                self.unreserve();
                return refused(
                    "per_user_limit",
                    SessionRefused::PerUserLimit {
                        limit: this.per_user_limit,
                    },
                );
            }
            *count += 1;
        }
        // Incremented, not set from the count: two threads setting it could leave the older value.
        metrics::gauge!(LISTEN_SESSIONS_ACTIVE).increment(1.0);
        Ok(SessionGuard {
            registry: self.clone(),
            uid: uid.to_owned(),
            closing: this.closing.subscribe(),
            lease: None,
        })
    }

    /// Open sessions, all users.
    pub fn active(&self) -> usize {
        self.inner.active.load(Ordering::Acquire)
    }

    /// Open sessions of one user.
    pub fn active_for(&self, uid: &str) -> usize {
        let map = self
            .inner
            .per_user
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        map.get(uid).copied().unwrap_or(0)
    }

    /// Refuses new sessions, asks every open one to close, and waits (at most `timeout`) until all are gone.
    /// Returns how many were still open at the end.
    pub async fn close_all(&self, timeout: Duration) -> usize {
        self.inner.closing.send_replace(true);
        let wait = async {
            loop {
                let notified = self.inner.all_closed.notified();
                tokio::pin!(notified);
                // Register interest before checking, so a release between the check and the await is not lost.
                notified.as_mut().enable();
                if self.active() == 0 {
                    return;
                }
                notified.await;
            }
        };
        let _ = tokio::time::timeout(timeout, wait).await;
        self.active()
    }

    /// Gives back a node slot taken by [`open_here`](Self::open_here) for a session it then refused.
    fn unreserve(&self) {
        if self.inner.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.inner.all_closed.notify_waiters();
        }
    }

    fn release(&self, uid: &str) {
        let this = &self.inner;
        {
            let mut map = self
                .inner
                .per_user
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if let Some(count) = map.get_mut(uid) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    map.remove(uid);
                }
            }
        }
        let left = this.active.fetch_sub(1, Ordering::AcqRel).saturating_sub(1);
        metrics::gauge!(LISTEN_SESSIONS_ACTIVE).decrement(1.0);
        if left == 0 {
            this.all_closed.notify_waiters();
        }
    }
}

/// One admitted session. Hold it for the session's whole life; drop it after the session has metered its speech.
pub struct SessionGuard {
    registry: SessionRegistry,
    uid: String,
    closing: watch::Receiver<bool>,
    /// The session's slot of the user's limit in the store (given back after the node's, on drop).
    lease: Option<LeaseGuard>,
}

impl SessionGuard {
    pub fn uid(&self) -> &str {
        &self.uid
    }

    /// True when the session's slot is recorded in the store (false without leases, or while a session
    /// admitted during a store outage waits for its slot).
    pub fn lease_backed(&self) -> bool {
        self.lease.as_ref().is_some_and(LeaseGuard::is_backed)
    }

    /// True once the server has asked sessions to close.
    pub fn is_closing(&self) -> bool {
        *self.closing.borrow()
    }

    /// Resolves when the server asks sessions to close (drain): close the socket with 1001 and
    /// [`DRAIN_CLOSE_REASON`], meter what the session had, then drop the guard. Cancel-safe.
    pub async fn closing(&mut self) {
        // The sender lives in the registry, which this guard keeps alive, so `wait_for` cannot fail.
        let _ = self.closing.wait_for(|closing| *closing).await;
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.registry.release(&self.uid);
    }
}

impl std::fmt::Debug for SessionGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionGuard")
            .field("uid", &self.uid)
            .field("lease", &self.lease)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_user_over_the_limit_is_refused_and_a_released_slot_is_reusable() {
        let reg = SessionRegistry::new(2, 100);
        let a = reg.open("u").await;
        let b = reg.open("u").await;
        assert!(a.is_ok() && b.is_ok());
        assert_eq!(
            reg.open("u").await.err(),
            Some(SessionRefused::PerUserLimit { limit: 2 })
        );
        assert!(reg.open("other").await.is_ok(), "limits are per user");
        drop(a);
        assert!(reg.open("u").await.is_ok());
    }

    #[tokio::test]
    async fn the_node_wide_limit_refuses_every_user_until_a_slot_frees() {
        let reg = SessionRegistry::new(4, 2);
        let a = reg.open("a").await;
        let _b = reg.open("b").await;
        assert_eq!(
            reg.open("c").await.err(),
            Some(SessionRefused::AtCapacity { limit: 2 })
        );
        drop(a);
        assert!(reg.open("c").await.is_ok());
    }

    /// Two registries (two nodes) on one lease store: the limit is the user's, whichever node counts.
    #[tokio::test]
    async fn with_leases_the_per_user_limit_counts_the_sessions_of_every_node() {
        use voicegate_engine::lease::LeaseConfig;
        use voicegate_engine::store::lease::{LeaseStore, MemoryLeaseStore};
        use voicegate_engine::time::SystemClock;

        let store: Arc<dyn LeaseStore> = Arc::new(MemoryLeaseStore::new());
        let nodes = [SessionRegistry::new(2, 100), SessionRegistry::new(2, 100)];
        for node in &nodes {
            node.use_leases(Leases::start(
                Arc::clone(&store),
                Arc::new(SystemClock),
                LeaseConfig::default(),
            ));
        }
        let a = nodes[0].open("u").await;
        let b = nodes[1].open("u").await;
        assert!(a.as_ref().is_ok_and(SessionGuard::lease_backed));
        assert!(b.as_ref().is_ok_and(SessionGuard::lease_backed));
        for node in &nodes {
            assert_eq!(
                node.open("u").await.err(),
                Some(SessionRefused::PerUserLimit { limit: 2 })
            );
        }
        assert_eq!(
            nodes[0].active_for("u"),
            1,
            "the refused session left no slot behind"
        );
        assert!(nodes[1].open("v").await.is_ok(), "limits are per user");
        drop(a);
        // The release reaches the store through node 0's heartbeat task.
        let reopened = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                if let Ok(g) = nodes[1].open("u").await {
                    return g;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        assert!(
            reopened.is_ok(),
            "node 0's released slot was not free for node 1"
        );
    }

    #[tokio::test]
    async fn close_all_signals_sessions_and_waits_until_they_are_gone() {
        let reg = SessionRegistry::new(4, 100);
        let mut guard = match reg.open("u").await {
            Ok(g) => g,
            Err(e) => panic!("{e}"),
        };
        let session = tokio::spawn(async move {
            guard.closing().await;
            tokio::time::sleep(Duration::from_millis(20)).await;
            drop(guard);
        });
        let left = reg.close_all(Duration::from_secs(5)).await;
        assert_eq!(left, 0);
        assert_eq!(reg.open("u").await.err(), Some(SessionRefused::Draining));
        assert!(session.await.is_ok());
    }

    #[tokio::test]
    async fn close_all_gives_up_after_the_timeout() {
        let reg = SessionRegistry::new(4, 100);
        let _stuck = reg.open("u").await;
        assert_eq!(reg.close_all(Duration::from_millis(20)).await, 1);
    }
}

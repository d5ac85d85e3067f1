//! Admission of concurrent sync uploads (`POST /v1/sync-local-files`), before the body is read:
//! - at most `VOICEGATE_SYNC_MAX_UPLOADS` on this node, all users (each holds a descriptor and up to the
//!   request limit of temp storage): past it 503 `uploads_at_capacity`, `Retry-After` 5 s (another node
//!   may take it);
//! - at most `VOICEGATE_SYNC_UPLOADS_PER_USER` per user: past it 429 `too_many_uploads`, `Retry-After` 5 s
//!   (one of the user's uploads ends at a time nobody knows).
//!
//! The [`UploadSlot`] an admitted upload holds gives its place back when the request ends, on every path
//! (answered, refused later, timed out, cut by a drain: the handler's future is dropped with it).
//! The per-user limit counts across every node sharing the store once the engine is mounted
//! ([`UploadSlots::use_leases`]): each upload then holds a lease of kind [`SYNC_UPLOAD_LEASE`]
//! ([`voicegate_engine::lease`]), after the node's own count (a user at the limit here costs no store
//! call). While the store does not answer, an upload is admitted on the node's count (fail open: admitting
//! audio fails open, DESIGN §4) and the heartbeat writes its slot once the store answers.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use serde_json::json;
use voicegate_engine::lease::{Acquired, LeaseGuard, Leases};
use voicegate_engine::store::lease::LeaseKey;
use voicegate_engine::telemetry as t;

use crate::error::{ApiError, TRANSIENT_RETRY_AFTER_S};

/// The lease kind of a sync upload (the store key `vg:{uid}:lease:sync_upload`, the metric label).
pub const SYNC_UPLOAD_LEASE: &str = "sync_upload";

/// Why an upload was not admitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UploadRefused {
    #[error(
        "at most {limit} concurrent sync uploads per user, on all servers together (VOICEGATE_SYNC_UPLOADS_PER_USER); retry when one of yours has finished"
    )]
    PerUser { limit: usize },
    #[error(
        "this server holds its most concurrent sync uploads ({limit}, VOICEGATE_SYNC_MAX_UPLOADS); retry later or on another instance"
    )]
    AtCapacity { limit: usize },
}

impl UploadRefused {
    /// The metric's `reason` label.
    fn reason(&self) -> &'static str {
        match self {
            UploadRefused::PerUser { .. } => "per_user_limit",
            UploadRefused::AtCapacity { .. } => "at_capacity",
        }
    }
}

impl From<UploadRefused> for ApiError {
    /// Both retryable; the connection closes (the body the client is sending is not read).
    fn from(e: UploadRefused) -> Self {
        let err = match e {
            UploadRefused::PerUser { limit } => ApiError::too_many_requests(
                "too_many_uploads",
                e.to_string(),
                TRANSIENT_RETRY_AFTER_S,
            )
            .with_field("limit", "VOICEGATE_SYNC_UPLOADS_PER_USER")
            .with_field("limit_value", limit)
            // The reference's sync 429 shape.
            .with_field("new_memories", json!([]))
            .with_field("updated_memories", json!([])),
            UploadRefused::AtCapacity { limit } => {
                ApiError::unavailable("uploads_at_capacity", e.to_string())
                    .with_field("limit", "VOICEGATE_SYNC_MAX_UPLOADS")
                    .with_field("limit_value", limit)
            }
        };
        err.closing_connection()
    }
}

/// The uploads in progress, by user. Cloning shares them.
#[derive(Clone)]
pub struct UploadSlots {
    inner: Arc<Inner>,
}

struct Inner {
    per_user_limit: usize,
    total_limit: usize,
    per_user: Mutex<HashMap<String, usize>>,
    active: AtomicUsize,
    /// Set once the engine is mounted; without it the per-user limit is this node's count alone.
    leases: OnceLock<Leases>,
}

impl UploadSlots {
    pub fn new(per_user_limit: usize, total_limit: usize) -> Self {
        UploadSlots {
            inner: Arc::new(Inner {
                per_user_limit,
                total_limit,
                per_user: Mutex::new(HashMap::new()),
                active: AtomicUsize::new(0),
                leases: OnceLock::new(),
            }),
        }
    }

    /// Counts the per-user limit across nodes through `leases` from now on (once; later calls are ignored).
    pub fn use_leases(&self, leases: Leases) {
        if self.inner.leases.set(leases).is_err() {
            tracing::debug!(message = "Upload leases were already set.");
        }
    }

    /// Admits one upload of `uid`: the node's checks, then (with leases) a slot of the user's limit in the
    /// store (at most `VOICEGATE_LEASE_TIMEOUT_MS`). Refusals are counted by reason.
    pub async fn acquire(&self, uid: &str) -> Result<UploadSlot, UploadRefused> {
        let mut slot = self.acquire_here(uid)?;
        let Some(leases) = self.inner.leases.get() else {
            return Ok(slot);
        };
        let limit = u32::try_from(self.inner.per_user_limit).unwrap_or(u32::MAX);
        match leases
            .acquire(LeaseKey::user(SYNC_UPLOAD_LEASE, uid), limit)
            .await
        {
            Acquired::Granted(lease) => slot.lease = Some(lease),
            Acquired::Unavailable {
                guard: lease,
                error,
            } => {
                // Fail open: this node's count still bounds the user here.
                tracing::debug!(
                    message = "Upload lease not confirmed by the store; admitted on this node's count.",
                    uid,
                    %error
                );
                slot.lease = Some(lease);
            }
            Acquired::Refused { limit, .. } => {
                let e = UploadRefused::PerUser {
                    limit: limit as usize,
                };
                metrics::counter!(t::SYNC_UPLOADS_REFUSED_TOTAL, "reason" => e.reason())
                    .increment(1);
                // Dropping `slot` gives the node's place back.
                return Err(e);
            }
        }
        Ok(slot)
    }

    /// The node's own checks: its capacity, the user's uploads on this node.
    fn acquire_here(&self, uid: &str) -> Result<UploadSlot, UploadRefused> {
        let refused = |e: UploadRefused| {
            metrics::counter!(t::SYNC_UPLOADS_REFUSED_TOTAL, "reason" => e.reason()).increment(1);
            Err(e)
        };
        let this = &self.inner;
        // Taken, then checked: concurrent requests never pass the node's limit together.
        if this.active.fetch_add(1, Ordering::AcqRel) >= this.total_limit {
            this.active.fetch_sub(1, Ordering::AcqRel);
            return refused(UploadRefused::AtCapacity {
                limit: this.total_limit,
            });
        }
        {
            let mut map = this.per_user.lock().unwrap_or_else(|p| p.into_inner());
            let count = map.entry(uid.to_owned()).or_insert(0);
            if *count >= this.per_user_limit {
                drop(map);
                this.active.fetch_sub(1, Ordering::AcqRel);
                return refused(UploadRefused::PerUser {
                    limit: this.per_user_limit,
                });
            }
            *count += 1;
        }
        metrics::gauge!(t::SYNC_UPLOADS_ACTIVE).increment(1.0);
        Ok(UploadSlot {
            slots: self.clone(),
            uid: uid.to_owned(),
            lease: None,
        })
    }

    /// Uploads in progress on this node.
    pub fn active(&self) -> usize {
        self.inner.active.load(Ordering::Acquire)
    }

    fn release(&self, uid: &str) {
        {
            let mut map = self
                .inner
                .per_user
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if let Some(count) = map.get_mut(uid) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    map.remove(uid);
                }
            }
        }
        self.inner.active.fetch_sub(1, Ordering::AcqRel);
        metrics::gauge!(t::SYNC_UPLOADS_ACTIVE).decrement(1.0);
    }
}

/// One admitted upload; its place (and its lease) is given back when dropped.
pub struct UploadSlot {
    slots: UploadSlots,
    uid: String,
    /// The upload's slot of the user's limit in the store (given back after the node's, on drop).
    lease: Option<LeaseGuard>,
}

impl Drop for UploadSlot {
    fn drop(&mut self) {
        self.slots.release(&self.uid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn per_user_then_node_limits_refuse_and_a_release_admits_again() {
        let slots = UploadSlots::new(2, 3);
        let a1 = slots.acquire("a").await.unwrap_or_else(|e| panic!("{e}"));
        let _a2 = slots.acquire("a").await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            slots.acquire("a").await.err(),
            Some(UploadRefused::PerUser { limit: 2 })
        );
        let _b1 = slots.acquire("b").await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            slots.acquire("c").await.err(),
            Some(UploadRefused::AtCapacity { limit: 3 })
        );
        assert_eq!(slots.active(), 3, "refusals hold nothing");
        drop(a1);
        assert!(slots.acquire("a").await.is_ok());
        assert_eq!(slots.active(), 2, "the temporary slot was given back");
    }

    #[test]
    fn refusals_answer_with_their_code_retry_after_and_close() {
        let per_user = ApiError::from(UploadRefused::PerUser { limit: 2 });
        assert_eq!(per_user.status().as_u16(), 429);
        assert_eq!(per_user.code(), "too_many_uploads");
        assert_eq!(per_user.retry_after_s(), Some(TRANSIENT_RETRY_AFTER_S));
        assert_eq!(per_user.body()["limit_value"], 2);
        let node = ApiError::from(UploadRefused::AtCapacity { limit: 64 });
        assert_eq!(node.status().as_u16(), 503);
        assert_eq!(node.code(), "uploads_at_capacity");
        assert!(node.retryable());
    }
}

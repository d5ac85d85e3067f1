//! The classifier trait and its input: a snapshot of the user's recent usage.

use std::sync::Arc;

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::policy::{RollingTotals, Verdict};
use crate::store::fair_use::FairUseStore;

pub use crate::policy::{SessionLane, SessionSummary};

/// What a classifier looks at.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageSnapshot {
    pub uid: String,
    pub now_ms: u64,
    pub lookback_days: u64,
    pub totals: RollingTotals,
    /// The session evidence of the lookback, newest first (by end), at most [`MAX_SESSIONS`].
    pub sessions: Vec<SessionSummary>,
}

/// At most this many sessions go to a classifier: every session the store keeps for a user
/// ([`crate::store::fair_use::MAX_SESSIONS_PER_USER`]); the LLM classifier's prompt takes the newest
/// [`crate::fair_use::openai::PROMPT_SESSIONS`] of them.
pub const MAX_SESSIONS: usize = crate::store::fair_use::MAX_SESSIONS_PER_USER;

/// A classification that failed. Never turned into a benign verdict.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClassifierError {
    #[error("classifier transport failed: {0}")]
    Transport(String),
    #[error("classifier answered HTTP {0}")]
    Status(u16),
    #[error("classifier output is malformed: {0}")]
    Malformed(String),
    #[error("classifier is not configured: {0}")]
    NotConfigured(String),
    #[error("usage snapshot unavailable: {0}")]
    Snapshot(String),
}

impl ClassifierError {
    /// Stable machine-readable code (also the failure metric's `reason`, so only a few words).
    pub fn code(&self) -> &'static str {
        match self {
            ClassifierError::Transport(_) | ClassifierError::Status(_) => "error",
            ClassifierError::Malformed(_) => "malformed",
            ClassifierError::NotConfigured(_) => "not_configured",
            ClassifierError::Snapshot(_) => "snapshot",
        }
    }
}

/// Scores a user's recent usage. Implementations may fail; the supervisor also survives panics and hangs.
pub trait Classifier: Send + Sync + 'static {
    fn classify(
        &self,
        snapshot: UsageSnapshot,
    ) -> BoxFuture<'static, Result<Verdict, ClassifierError>>;
}

/// Where the supervisor gets a user's recent sessions (the session evidence in the fair-use store, in the
/// server: [`StoredSessions`]).
pub trait UsageSource: Send + Sync + 'static {
    fn recent_sessions(
        &self,
        uid: &str,
        since_ms: u64,
    ) -> BoxFuture<'static, Result<Vec<SessionSummary>, ClassifierError>>;
}

/// The session evidence the fair-use store keeps (what realtime sessions and sync files leave).
#[derive(Clone)]
pub struct StoredSessions(pub Arc<dyn FairUseStore>);

impl UsageSource for StoredSessions {
    fn recent_sessions(
        &self,
        uid: &str,
        since_ms: u64,
    ) -> BoxFuture<'static, Result<Vec<SessionSummary>, ClassifierError>> {
        let read = self.0.sessions(uid, since_ms, MAX_SESSIONS);
        Box::pin(async move {
            read.await
                .map_err(|e| ClassifierError::Snapshot(format!("{} ({})", e, e.code())))
        })
    }
}

/// No session history: classifiers see the rolling totals only (tests that do not need evidence).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoSessions;

impl UsageSource for NoSessions {
    fn recent_sessions(
        &self,
        _uid: &str,
        _since_ms: u64,
    ) -> BoxFuture<'static, Result<Vec<SessionSummary>, ClassifierError>> {
        Box::pin(async { Ok(Vec::new()) })
    }
}

impl<T: Classifier + ?Sized> Classifier for Arc<T> {
    fn classify(
        &self,
        snapshot: UsageSnapshot,
    ) -> BoxFuture<'static, Result<Verdict, ClassifierError>> {
        (**self).classify(snapshot)
    }
}

//! The fair-use ledger: every read and change of a user's fair-use state, as load → pure policy → atomic
//! compare-and-set commit (re-applied on conflict). The facade (reads for admission and status), the cap
//! supervisor (verdicts) and the admin routes call it concurrently; the version check keeps their changes
//! race-free on one node, across nodes and against admin calls. The state itself lives in the
//! [`FairUseStore`] (a Redis hash per user, or one mutex-guarded map in memory), never in a meter actor.
//! Decay steps that fell due are persisted (with their events) on the read that notices them.

use std::sync::Arc;

use futures_util::future::BoxFuture;
use rand::RngExt as _;

use crate::policy::{
    BreachContext, CaseRef, FairUseConfig, FairUseEvent, Stage, StageState, Verdict, admin_reset,
    admin_set_stage, decay_events, escalate,
};
use crate::store::fair_use::{CommitOutcome, FairUseStore, FairUseStoreError};

/// Commits retried this many times on version conflicts before giving up.
const MAX_CONFLICT_RETRIES: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error(transparent)]
    Store(#[from] FairUseStoreError),
    #[error("fair-use state of {uid} changed concurrently {attempts} times in a row")]
    Contended { uid: String, attempts: usize },
}

impl LedgerError {
    pub fn code(&self) -> &'static str {
        match self {
            LedgerError::Store(e) => e.code(),
            LedgerError::Contended { .. } => "state_contended",
        }
    }
}

/// A fresh random case ref (the edge where randomness enters).
pub fn new_case_ref() -> CaseRef {
    CaseRef::from_bits(rand::rng().random())
}

/// A user's state with the events of its last change.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    pub state: StageState,
    /// Decay events first, then the change's own event (if any).
    pub events: Vec<FairUseEvent>,
}

impl Applied {
    /// The change's own event (the last one), if any.
    pub fn event(&self) -> Option<&FairUseEvent> {
        self.events.last()
    }
}

/// Reads and changes fair-use state through a [`FairUseStore`].
#[derive(Clone)]
pub struct FairUseLedger {
    store: Arc<dyn FairUseStore>,
    cfg: Arc<FairUseConfig>,
}

impl FairUseLedger {
    pub fn new(store: Arc<dyn FairUseStore>, cfg: Arc<FairUseConfig>) -> Self {
        FairUseLedger { store, cfg }
    }

    pub fn config(&self) -> &FairUseConfig {
        &self.cfg
    }

    pub fn store(&self) -> &Arc<dyn FairUseStore> {
        &self.store
    }

    /// The state as of `now_ms`, persisting any decay that fell due.
    pub async fn read(&self, uid: &str, now_ms: u64) -> Result<StageState, LedgerError> {
        Ok(self.change(uid, now_ms, |_| None).await?.state)
    }

    /// Apply a successful classification: at most one step up, one event (plus any due decay).
    pub async fn apply_verdict(
        &self,
        uid: &str,
        verdict: &Verdict,
        breach: &BreachContext,
        now_ms: u64,
    ) -> Result<Applied, LedgerError> {
        let policy = self.cfg.stages;
        self.change(uid, now_ms, |s| {
            Some(escalate(
                s,
                &policy,
                verdict,
                breach,
                now_ms,
                new_case_ref(),
            ))
        })
        .await
    }

    /// Admin set-stage.
    pub async fn set_stage(
        &self,
        uid: &str,
        stage: Stage,
        admin: &str,
        now_ms: u64,
    ) -> Result<Applied, LedgerError> {
        let policy = self.cfg.stages;
        self.change(uid, now_ms, |s| {
            Some(admin_set_stage(
                s,
                &policy,
                stage,
                admin,
                now_ms,
                new_case_ref(),
            ))
        })
        .await
    }

    /// Admin reset.
    pub async fn reset(&self, uid: &str, admin: &str, now_ms: u64) -> Result<Applied, LedgerError> {
        self.change(uid, now_ms, |s| {
            Some(admin_reset(s, admin, now_ms, new_case_ref()))
        })
        .await
    }

    /// Newest first.
    pub async fn events(&self, uid: &str, limit: usize) -> Result<Vec<FairUseEvent>, LedgerError> {
        Ok(self.store.events(uid, limit).await?)
    }

    /// The uid and event of a case ref.
    pub async fn case(
        &self,
        case_ref: &CaseRef,
    ) -> Result<Option<(String, FairUseEvent)>, LedgerError> {
        let Some(uid) = self.store.find_case(case_ref).await? else {
            return Ok(None);
        };
        let events = self
            .store
            .events(&uid, crate::store::fair_use::MAX_EVENTS_PER_USER)
            .await?;
        Ok(events
            .into_iter()
            .find(|e| &e.case_ref == case_ref)
            .map(|e| (uid, e)))
    }

    /// Users not at stage none (optionally only `stage`).
    pub async fn flagged(
        &self,
        stage: Option<Stage>,
        limit: usize,
    ) -> Result<Vec<(String, Stage)>, LedgerError> {
        Ok(self.store.flagged(stage, limit).await?)
    }

    /// load → decay → `op` → commit, re-applied on version conflicts.
    async fn change(
        &self,
        uid: &str,
        now_ms: u64,
        op: impl Fn(&StageState) -> Option<(StageState, FairUseEvent)>,
    ) -> Result<Applied, LedgerError> {
        for _ in 0..MAX_CONFLICT_RETRIES {
            let loaded = self.store.load(uid).await?;
            let (decayed, steps) = loaded.state.decayed(&self.cfg.stages, now_ms);
            let mut events = decay_events(&steps, new_case_ref);
            let state = match op(&decayed) {
                Some((next, event)) => {
                    events.push(event);
                    next
                }
                None => decayed,
            };
            if events.is_empty() && state == loaded.state {
                return Ok(Applied { state, events });
            }
            match self
                .store
                .commit(uid, loaded.version, &state, &events)
                .await?
            {
                CommitOutcome::Committed { .. } => {
                    for e in events.iter().filter(|e| e.changed()) {
                        metrics::counter!(
                            crate::telemetry::FAIR_USE_STAGE_TRANSITIONS_TOTAL,
                            "to" => e.new_stage.as_str(),
                        )
                        .increment(1);
                    }
                    return Ok(Applied { state, events });
                }
                CommitOutcome::Conflict { .. } => continue,
            }
        }
        Err(LedgerError::Contended {
            uid: uid.to_owned(),
            attempts: MAX_CONFLICT_RETRIES,
        })
    }
}

/// Where the supervisor sends a successful verdict: the [`FairUseLedger`] in production (compare-and-set, so
/// concurrent verdicts and admin changes serialise on the state's version); tests substitute their own.
pub trait VerdictSink: Send + Sync + 'static {
    fn apply(
        &self,
        uid: String,
        verdict: Verdict,
        breach: BreachContext,
        now_ms: u64,
    ) -> BoxFuture<'static, Result<Applied, LedgerError>>;
}

impl VerdictSink for FairUseLedger {
    fn apply(
        &self,
        uid: String,
        verdict: Verdict,
        breach: BreachContext,
        now_ms: u64,
    ) -> BoxFuture<'static, Result<Applied, LedgerError>> {
        let ledger = self.clone();
        Box::pin(async move { ledger.apply_verdict(&uid, &verdict, &breach, now_ms).await })
    }
}

//! The engine behind the routes: meter, fair use, conversations, plans, and the offline pipeline settings,
//! built once from the configuration and shared with every handler as `web::Data<Engine>`.
//!
//! With `--redis-url` every part lives in Redis (durable, multi-node); without it, in process memory
//! (single node, not durable; the server says so at startup).

use std::sync::Arc;
use std::time::Duration;

use actix_web::web;
use futures_util::future::BoxFuture;
use voicegate_engine::conversation::{
    ConversationStore, MemoryConversationStore, RedisConversationStore,
};
use voicegate_engine::events::{ConversationEvents, Events};
use voicegate_engine::fair_use::classifier::StoredSessions;
use voicegate_engine::fair_use::{FairUse, FairUseParts, PlanRecord, classifier_from_config};
use voicegate_engine::lease::Leases;
use voicegate_engine::meter::{Meter, MeterConfig};
use voicegate_engine::outbound::Outbound;
use voicegate_engine::pipeline::stream::PipelineConfig;
use voicegate_engine::policy::FairUseConfig;
use voicegate_engine::policy::backfill::BackfillConfig;
use voicegate_engine::store::backfill::{
    BackfillLedger, MemoryBackfillLedger, RedisBackfillLedger,
};
use voicegate_engine::store::connection::RedisConnection;
use voicegate_engine::store::fair_use::{
    CooldownLock, FairUseStore, MemoryCooldownLock, MemoryFairUseStore,
};
use voicegate_engine::store::fair_use_redis::{RedisCooldownLock, RedisFairUseStore};
use voicegate_engine::store::lease::{LeaseStore, MemoryLeaseStore, RedisLeaseStore};
use voicegate_engine::store::plans::{
    MemoryPlanStore, PlanRecordValue, PlanSet, PlanStore, PlanStoreError, RedisPlanStore,
};
use voicegate_engine::store::sync_jobs::{MemorySyncJobStore, SyncJobStore};
use voicegate_engine::store::sync_jobs_redis::RedisSyncJobStore;
use voicegate_engine::store::{MemoryStore, RedisStore, Store};
use voicegate_engine::store::{ReplicaCheckError, check_replicas};
use voicegate_engine::telemetry::CONVERSATIONS_UNLOCKED_TOTAL;
use voicegate_engine::time::{Clock, SystemClock};

use crate::config::ServeConfig;
use crate::health::StoreHealth;
use crate::stripe::{PaymentEvent, PaymentOutcome, Payments, PaymentsError};

/// Why the engine could not be built.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("fair-use configuration: {0}")]
    FairUse(String),
    #[error("redis: {0}")]
    Redis(String),
}

/// A user's plan, as the entitlement resolver needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlanLookup {
    Known(Option<String>),
    Unavailable,
}

impl PlanLookup {
    pub fn as_record(&self) -> PlanRecord<'_> {
        match self {
            PlanLookup::Known(p) => PlanRecord::Known(p.as_deref()),
            PlanLookup::Unavailable => PlanRecord::Unavailable,
        }
    }
}

/// Bound of each connection and reply of the startup check of `VOICEGATE_REDIS_WAIT_REPLICAS`.
const REPLICA_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// Everything the routes use. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    pub meter: Meter,
    pub fair_use: FairUse,
    pub conversations: Arc<dyn ConversationStore>,
    pub plans: Arc<dyn PlanStore>,
    pub pipeline: PipelineConfig,
    /// The backfill decision's settings and its per-user, per-UTC-day ledger.
    pub backfill: BackfillConfig,
    pub backfill_ledger: Arc<dyn BackfillLedger>,
    /// The slots of per-user limits this node holds (sessions, …), counted across nodes in the store.
    pub leases: Leases,
    /// Sync v2 jobs (`crate::sync_v2`).
    pub sync_jobs: Arc<dyn SyncJobStore>,
    /// Downstream events (the Redis stream `vg:events`, or an in-process channel).
    pub events: Events,
    pub clock: Arc<dyn Clock>,
    /// Audio sent to the STT provider before each speech run (`VOICEGATE_STT_PREROLL_MS`), for sync spans.
    pub stt_preroll_ms: u64,
    /// `redis`, `redis_cluster` or `memory`.
    pub store_kind: &'static str,
    redis: Option<RedisConnection>,
    /// The thread the Redis connection's I/O task runs on (see [`redis_io_thread`]).
    _redis_io: Option<Arc<actix::Arbiter>>,
}

/// Entries the event stream keeps (about: `XADD MAXLEN ~`); at a few events per upload, days of traffic
/// for a consumer that was down.
pub const EVENTS_MAX_LEN: u64 = 100_000;

impl Engine {
    /// Builds every part from `cfg` (its metering and fair-use settings included). Must run inside an
    /// actix system: the meter and the cap supervisor are actors.
    pub fn from_config(cfg: &ServeConfig, outbound: &Outbound) -> Result<Engine, EngineError> {
        Self::with_configs(cfg, cfg.meter_config()?, cfg.fair_use_config()?, outbound)
    }

    /// [`Engine::from_config`] with explicit metering and fair-use settings (tests, embedding).
    pub fn with_configs(
        cfg: &ServeConfig,
        meter_cfg: MeterConfig,
        fair_cfg: FairUseConfig,
        outbound: &Outbound,
    ) -> Result<Engine, EngineError> {
        let classifier = classifier_from_config(&fair_cfg, outbound);
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let parts = match cfg.redis() {
            Some(redis_cfg) => {
                match check_replicas(&redis_cfg, REPLICA_CHECK_TIMEOUT) {
                    Ok(()) => {}
                    Err(e @ ReplicaCheckError::TooFew { .. }) => {
                        return Err(EngineError::Redis(e.to_string()));
                    }
                    // Redis may be down at startup (the node meters into memory meanwhile): flushes then fail
                    // as `not_replicated` until the replicas answer.
                    Err(e @ ReplicaCheckError::Unreachable(_)) => {
                        tracing::warn!(message = "VOICEGATE_REDIS_WAIT_REPLICAS could not be checked at startup.", error = %e);
                    }
                }
                let store =
                    RedisStore::new(&redis_cfg).map_err(|e| EngineError::Redis(e.to_string()))?;
                let conn = store.connection();
                Stores {
                    meter: Arc::new(store),
                    fair_use: Arc::new(RedisFairUseStore::new(conn.clone())),
                    lock: Arc::new(RedisCooldownLock::new(conn.clone())),
                    conversations: Arc::new(RedisConversationStore::with_clock(
                        conn.clone(),
                        Arc::clone(&clock),
                    )),
                    plans: Arc::new(RedisPlanStore::new(conn.clone())),
                    backfill: Arc::new(RedisBackfillLedger::new(conn.clone())),
                    leases: Arc::new(RedisLeaseStore::new(conn.clone())),
                    sync_jobs: Arc::new(RedisSyncJobStore::new(conn.clone())),
                    redis: Some(conn),
                    kind: if redis_cfg.cluster_nodes.is_empty() {
                        "redis"
                    } else {
                        "redis_cluster"
                    },
                }
            }
            None => Stores {
                meter: Arc::new(MemoryStore::new()),
                fair_use: Arc::new(MemoryFairUseStore::new()),
                lock: Arc::new(MemoryCooldownLock::new()),
                conversations: Arc::new(MemoryConversationStore::new(Arc::clone(&clock))),
                plans: Arc::new(MemoryPlanStore::default()),
                backfill: Arc::new(MemoryBackfillLedger::default()),
                leases: Arc::new(MemoryLeaseStore::new()),
                sync_jobs: Arc::new(MemorySyncJobStore::new()),
                redis: None,
                kind: "memory",
            },
        };
        let Stores {
            meter: store,
            fair_use: fu_store,
            lock,
            conversations,
            plans,
            backfill: backfill_ledger,
            leases,
            sync_jobs,
            redis,
            kind,
        } = parts;
        let leases = Leases::start(leases, Arc::clone(&clock), cfg.lease());
        let events = match &redis {
            Some(conn) => Events::redis(conn.clone(), EVENTS_MAX_LEN),
            None => Events::local(),
        };
        // Every conversation write path publishes through this one decorator.
        let conversations: Arc<dyn ConversationStore> = Arc::new(ConversationEvents::new(
            conversations,
            events.clone(),
            Arc::clone(&clock),
        ));
        let meter = Meter::start(meter_cfg, store, Arc::clone(&clock));
        let fair_use = FairUse::start(
            fair_cfg,
            meter.clone(),
            FairUseParts {
                sessions: Arc::new(StoredSessions(Arc::clone(&fu_store))),
                store: fu_store,
                lock,
                classifier,
                plans: Arc::clone(&plans),
                notifier: None,
                clock: Arc::clone(&clock),
            },
        );
        Ok(Engine {
            meter,
            fair_use,
            conversations,
            plans,
            pipeline: PipelineConfig::default(),
            backfill: cfg.backfill(),
            backfill_ledger,
            leases,
            sync_jobs,
            events,
            clock,
            stt_preroll_ms: cfg.stt_preroll_ms,
            store_kind: kind,
            _redis_io: redis.clone().map(|c| Arc::new(redis_io_thread(c))),
            redis,
        })
    }

    /// The user's plan record; a store error is `Unavailable` (no lock, paid STT closed), never "free".
    pub async fn plan(&self, uid: &str) -> PlanLookup {
        match self.plans.get(uid).await {
            Ok(p) => PlanLookup::Known(p),
            Err(error) => {
                tracing::warn!(message = "Reading the plan failed.", uid, %error);
                PlanLookup::Unavailable
            }
        }
    }

    /// The `/readyz` store check.
    pub fn health(&self) -> Arc<dyn StoreHealth> {
        Arc::new(EngineHealth {
            kind: self.store_kind,
            redis: self.redis.clone(),
        })
    }

    /// The Stripe webhook's sink.
    pub fn payments(&self) -> Arc<dyn Payments> {
        Arc::new(EnginePayments {
            engine: self.clone(),
        })
    }

    /// Registers the engine as app data.
    pub fn data(&self) -> web::Data<Engine> {
        web::Data::new(self.clone())
    }

    /// Drain: flush everything the meter holds, within `limit`.
    pub async fn flush(&self, limit: Duration) {
        let report = self.meter.shutdown(limit).await;
        tracing::info!(message = "Meter flushed.", report = ?report);
    }
}

/// The stores of one backend (Redis or memory).
struct Stores {
    meter: Arc<dyn Store>,
    fair_use: Arc<dyn FairUseStore>,
    lock: Arc<dyn CooldownLock>,
    conversations: Arc<dyn ConversationStore>,
    plans: Arc<dyn PlanStore>,
    backfill: Arc<dyn BackfillLedger>,
    leases: Arc<dyn LeaseStore>,
    sync_jobs: Arc<dyn SyncJobStore>,
    redis: Option<RedisConnection>,
    kind: &'static str,
}

struct EngineHealth {
    kind: &'static str,
    redis: Option<RedisConnection>,
}

impl StoreHealth for EngineHealth {
    fn kind(&self) -> &'static str {
        self.kind
    }

    fn check(&self) -> BoxFuture<'_, Result<(), String>> {
        let conn = self.redis.clone();
        Box::pin(async move {
            match conn {
                None => Ok(()),
                Some(mut conn) => redis::cmd("PING")
                    .query_async::<String>(&mut conn)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
            }
        })
    }
}

/// What a plan change did ([`Engine::set_plan`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanChange {
    pub outcome: PlanSet,
    pub paid: bool,
    /// Conversations unlocked by it.
    pub unlocked: u64,
    /// The user's fair-use stage was reset (`VOICEGATE_FAIR_USE_PAYMENT_CLEARS_STAGE`).
    pub stage_cleared: bool,
}

impl Engine {
    /// Sets `uid`'s plan: a verified payment, the admin set-plan route or a bulk-import line, in the order the
    /// changes happened (`source_at_ms`; an older one is `Stale` and changes nothing). A paid plan unlocks
    /// every conversation of the user (their credits become unlimited, so nothing new is locked either) and,
    /// when the operator set `VOICEGATE_FAIR_USE_PAYMENT_CLEARS_STAGE`, resets their fair-use stage (the
    /// reference's #6298). A free plan unlocks nothing and locks nothing again: content already unlocked stays
    /// unlocked; new content follows the free plan's credits. Idempotent on `event_id`: a redelivery stores
    /// nothing but unlocks again (a first delivery may have failed after the plan was stored).
    pub async fn set_plan(
        &self,
        uid: &str,
        plan: &str,
        event_id: &str,
        source_at_ms: u64,
        actor: &str,
    ) -> Result<PlanChange, String> {
        let value = PlanRecordValue {
            plan: plan.to_owned(),
            updated_at_ms: self.clock.now_ms(),
            event_id: event_id.to_owned(),
            source_at_ms,
        };
        let outcome = self
            .plans
            .set(uid, &value)
            .await
            .map_err(|PlanStoreError(e)| e)?;
        let cfg = self.fair_use.config();
        let paid = cfg.plans.plan(Some(plan)).paid;
        let unlocked = if paid && outcome != PlanSet::Stale {
            self.conversations
                .unlock_all(uid)
                .await
                .map_err(|e| e.to_string())?
        } else {
            0
        };
        metrics::counter!(CONVERSATIONS_UNLOCKED_TOTAL).increment(unlocked);
        let stage_cleared = paid && outcome == PlanSet::Stored && cfg.payment_clears_stage;
        if stage_cleared {
            self.fair_use
                .reset(uid, actor)
                .await
                .map_err(|e| e.to_string())?;
        }
        tracing::info!(
            message = "Plan set.",
            uid,
            plan,
            event_id,
            actor,
            outcome = ?outcome,
            paid,
            unlocked,
            stage_cleared
        );
        Ok(PlanChange {
            outcome,
            paid,
            unlocked,
            stage_cleared,
        })
    }
}

/// Applies verified payments through [`Engine::set_plan`].
struct EnginePayments {
    engine: Engine,
}

impl Payments for EnginePayments {
    fn apply(&self, event: PaymentEvent) -> BoxFuture<'_, Result<PaymentOutcome, PaymentsError>> {
        Box::pin(async move {
            let change = self
                .engine
                .set_plan(
                    &event.uid,
                    &event.plan,
                    &event.event_id,
                    event.created_ms,
                    "stripe",
                )
                .await
                .map_err(PaymentsError)?;
            Ok(match change.outcome {
                PlanSet::Stored => PaymentOutcome::Applied,
                PlanSet::Duplicate => PaymentOutcome::Duplicate,
                PlanSet::Stale => PaymentOutcome::Stale,
            })
        })
    }
}

/// Opens the (lazy) Redis connection from a thread of its own, so its I/O task lives there.
///
/// redis-rs spawns a multiplexed connection's reader/writer task on the runtime of whichever task first
/// uses the connection: `/readyz` on an HTTP worker, in practice. That worker also carries every
/// websocket; at 600 streams on 2 cores it queued Redis replies past the 2 s response timeout (meter
/// flushes and status reads failed for 18 s). The first use here happens before the server accepts.
/// (A reconnect after a Redis outage is spawned by the request that notices it, wherever that runs.)
fn redis_io_thread(mut conn: RedisConnection) -> actix::Arbiter {
    let arbiter = voicegate_engine::threads::named_arbiter("vg-redis-io");
    arbiter.spawn(async move {
        if let Err(error) = redis::cmd("PING").query_async::<String>(&mut conn).await {
            tracing::warn!(message = "Redis not reachable at start; the store reconnects on use.", %error);
        }
    });
    arbiter
}

//! The cap supervisor actor.
//!
//! The fair-use facade ([`crate::fair_use::FairUse`]) sends [`CapBreached`] after a record it forwarded to the
//! meter leaves a rolling total over a cap (at most once per user per report interval). The supervisor:
//! 1. skips users at restrict (nothing higher to reach: no lock, no classifier, E55);
//! 2. deduplicates per user: one job queued or running at a time, then nothing until the cooldown ends, which
//!    across nodes is the store's token lock (acquired before classifying, kept for the cooldown on success);
//! 3. runs at most `concurrency` jobs at once; the classifier runs in its own task under a timeout, so an
//!    error, a panic or a hang is caught;
//! 4. on failure: logs uid and reason, counts it, releases the lock (compare-and-delete) and retries later with
//!    jittered exponential [`Backoff`]. A failure is never a benign verdict and never changes the stage; after
//!    `max_failures` failures of the classifier itself (error, malformed output, timeout, panic) on one breach,
//!    the next run applies the [`HeuristicClassifier`]'s verdict instead, marked `classifier_failed` with the
//!    last failure (counted in `voicegate_fair_use_classifier_fallbacks_total`, logged at error);
//! 5. on success: sends the verdict to the [`VerdictSink`] (the [`FairUseLedger`]),
//!    which applies at most one step by compare-and-set and records the event; a stage change up sends a notice;
//! 6. **follows up**: when the cooldown after a classification ends (checked every [`FOLLOW_UP_EVERY`], or on
//!    [`FollowUp`]) and the user is below restrict, it reads the user's rolling totals ([`TotalsSource`]) and
//!    classifies again if they are still over a cap, new speech or not. A breach persists while the totals
//!    stay over the cap; without the follow-up a user who replays a long recording once a day would climb one
//!    step a day instead of one per cooldown, and one whose first breach came before the pattern showed
//!    (a TV on for 3 h looks like a long meeting) would wait for the next day's speech. At most one
//!    classification per cooldown still holds.
//!
//! Time: cooldowns compare the [`Clock`] (wall ms); tokio timers only schedule retries and time out tasks.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use futures_util::future::BoxFuture;
use rand::RngExt as _;

use crate::fair_use::classifier::{Classifier, MAX_SESSIONS, UsageSnapshot, UsageSource};
use crate::fair_use::heuristic::HeuristicClassifier;
use crate::fair_use::ledger::{Applied, FairUseLedger, VerdictSink};
use crate::fair_use::notifier::Notifier;
use crate::meter::Meter;
use crate::policy::notice::notice_for;
use crate::policy::{
    BreachContext, CapTrigger, ClassifierSettings, Enforcement, FairUseConfig, RollingTotals,
    SoftCaps, Stage, Verdict,
};
use crate::store::fair_use::CooldownLock;
use crate::store::plans::PlanStore;
use crate::telemetry;
use crate::time::{Backoff, Clock};

/// A record left a user's rolling totals over at least one cap.
#[derive(Debug, Clone, PartialEq, Message)]
#[rtype(result = "()")]
pub struct CapBreached {
    pub uid: String,
    /// The user's stage (after decay) as their actor sees it.
    pub stage: Stage,
    /// In the order daily, 3-day, weekly; never empty for a real breach.
    pub triggered: Vec<CapTrigger>,
    pub totals: RollingTotals,
    /// The caps of the user's plan, that `triggered` was computed against (recorded on the event).
    pub caps: SoftCaps,
}

/// Check the users whose cooldown after a violation ended (sent every [`FOLLOW_UP_EVERY`]; tests on virtual
/// time send it after moving the clock). Answers how many users it checks.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "usize")]
pub struct FollowUp;

/// Answers once nothing is queued, running or being checked (failed runs waiting for their retry do not
/// count): what simulations on virtual time wait for before they move the clock.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "()")]
pub struct WhenIdle;

/// How often the supervisor looks for follow-ups due.
pub const FOLLOW_UP_EVERY: Duration = Duration::from_secs(60);

/// What a follow-up reads of a user: the rolling totals, the stage now and the caps of their plan now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FollowUpRead {
    pub totals: RollingTotals,
    pub stage: Stage,
    pub caps: SoftCaps,
}

/// Where a follow-up reads a user's totals and stage (the meter and the ledger, in the facade).
pub trait TotalsSource: Send + Sync + 'static {
    /// `None` when either is unknown (the store is unreachable): no follow-up then.
    fn read(&self, uid: &str) -> BoxFuture<'static, Option<FollowUpRead>>;
}

/// The follow-ups' source in the server: the meter's totals, the ledger's stage (decayed to now) and the
/// caps of the user's plan (the plan store, read now: a payment since the breach moves the caps).
#[derive(Clone)]
pub struct MeterAndLedger {
    pub meter: Meter,
    pub ledger: FairUseLedger,
    pub plans: Arc<dyn PlanStore>,
    pub cfg: Arc<FairUseConfig>,
    pub clock: Arc<dyn Clock>,
}

impl TotalsSource for MeterAndLedger {
    fn read(&self, uid: &str) -> BoxFuture<'static, Option<FollowUpRead>> {
        let (meter, ledger, uid) = (self.meter.clone(), self.ledger.clone(), uid.to_owned());
        let (plans, cfg) = (Arc::clone(&self.plans), Arc::clone(&self.cfg));
        let now_ms = self.clock.now_ms();
        Box::pin(async move {
            let caps = match plans.get(&uid).await {
                Ok(record) => cfg.caps.for_plan(&cfg.plans.plan(record.as_deref())),
                Err(e) => {
                    tracing::warn!(message = "Reading the plan for a fair-use follow-up failed.", uid = %uid, error = %e);
                    return None;
                }
            };
            let totals = match meter.totals(&uid).await {
                Ok(t) if t.known => t.rolling,
                Ok(_) => return None,
                Err(e) => {
                    tracing::warn!(message = "Reading totals for a fair-use follow-up failed.", uid = %uid, error = %e);
                    return None;
                }
            };
            match ledger.read(&uid, now_ms).await {
                Ok(state) => Some(FollowUpRead {
                    totals,
                    stage: state.stage,
                    caps,
                }),
                Err(e) => {
                    tracing::warn!(message = "Reading the stage for a fair-use follow-up failed.", uid = %uid, error = %e);
                    None
                }
            }
        })
    }
}

/// Ask for the supervisor's observable state.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "SupervisorStats")]
pub struct GetSupervisorStats;

/// What the supervisor has done so far (supervision as observable state).
#[derive(Debug, Clone, Default, PartialEq, Eq, MessageResponse)]
pub struct SupervisorStats {
    pub in_flight: usize,
    pub max_in_flight: usize,
    pub queued: usize,
    pub started: u64,
    pub escalated: u64,
    pub unchanged: u64,
    /// Another node (or an earlier run) holds the user's cooldown lock.
    pub lock_held: u64,
    pub deduplicated: u64,
    pub skipped_restrict: u64,
    /// Follow-ups that found the user still over a cap and queued a classification.
    pub followed_up: u64,
    /// Failures by reason (`error`, `malformed`, `panic`, `timeout`, `lock`, `apply`, …).
    pub failed: BTreeMap<&'static str, u64>,
    /// Breaches whose classifier failed `max_failures` times: the heuristic's verdict was applied instead.
    pub fallbacks: u64,
    pub retries_scheduled: u64,
}

/// What the supervisor runs and talks to.
#[derive(Clone)]
pub struct SupervisorDeps {
    pub classifier: Arc<dyn Classifier>,
    pub lock: Arc<dyn CooldownLock>,
    pub sink: Arc<dyn VerdictSink>,
    pub notifier: Arc<dyn Notifier>,
    pub sessions: Arc<dyn UsageSource>,
    /// The totals a follow-up reads; `None` = no follow-ups.
    pub totals: Option<Arc<dyn TotalsSource>>,
    pub clock: Arc<dyn Clock>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UserEntry {
    Queued,
    Running,
    /// A failed run waits for its retry.
    Retrying,
    /// Classified (here or elsewhere): nothing until then.
    Cooling {
        until_ms: u64,
        /// Classified below restrict: check the totals again at `until_ms`.
        follow_up: bool,
    },
    /// A follow-up reads the user's totals.
    Checking,
}

#[derive(Debug, Clone)]
struct Job {
    uid: String,
    breach: BreachContext,
    /// The retries of this breach so far (`backoff.attempts()`) and their jittered delays.
    backoff: Backoff,
    /// Failures of the classifier itself on this breach.
    classifier_failures: u32,
    /// Set once they reach `max_failures`: the last failure; the heuristic classifies instead.
    fallback: Option<String>,
}

#[derive(Debug)]
enum Outcome {
    Applied(Applied),
    LockHeld,
    Failed { reason: &'static str, error: String },
}

/// The cap supervisor actor.
pub struct CapSupervisor {
    settings: ClassifierSettings,
    /// Who is under enforcement (fair use on, no kill switch, not exempt): what a follow-up checks, as the
    /// facade does before reporting a breach.
    cfg: Arc<FairUseConfig>,
    deps: SupervisorDeps,
    users: HashMap<String, UserEntry>,
    queue: VecDeque<Job>,
    stats: SupervisorStats,
    /// Follow-ups reading totals.
    checking: usize,
    /// [`WhenIdle`] askers.
    idle_waiters: Vec<tokio::sync::oneshot::Sender<()>>,
}

/// Mailbox capacity for awaited sends (`send`, e.g. [`GetSupervisorStats`]). [`CapBreached`] is delivered
/// with `do_send`, which actix does not hold to this bound: it is bounded by its sender instead (the facade
/// reports a user at most once per `BREACH_REPORT_INTERVAL_MS`, so at most one breach per breaching user
/// per minute is queued).
pub const MAILBOX_CAPACITY: usize = 4_096;
const SWEEP_EVERY: Duration = Duration::from_secs(600);

impl CapSupervisor {
    pub fn new(cfg: &FairUseConfig, deps: SupervisorDeps) -> Self {
        CapSupervisor {
            settings: cfg.classifier.clone(),
            cfg: Arc::new(cfg.clone()),
            deps,
            users: HashMap::new(),
            queue: VecDeque::new(),
            stats: SupervisorStats::default(),
            checking: 0,
            idle_waiters: Vec::new(),
        }
    }

    fn idle(&self) -> bool {
        self.stats.in_flight == 0 && self.queue.is_empty() && self.checking == 0
    }

    fn wake_if_idle(&mut self) {
        if self.idle() {
            for w in self.idle_waiters.drain(..) {
                let _ = w.send(());
            }
        }
    }

    fn dispatch(&mut self, ctx: &mut Context<Self>) {
        while self.stats.in_flight < self.settings.concurrency.max(1) {
            let Some(job) = self.queue.pop_front() else {
                break;
            };
            self.start(job, ctx);
        }
        self.stats.queued = self.queue.len();
        metrics::gauge!(telemetry::FAIR_USE_CLASSIFIER_QUEUED).set(gauge(self.queue.len()));
        metrics::gauge!(telemetry::FAIR_USE_CLASSIFIER_IN_FLIGHT).set(gauge(self.stats.in_flight));
        self.wake_if_idle();
    }

    fn start(&mut self, job: Job, ctx: &mut Context<Self>) {
        self.stats.in_flight += 1;
        self.stats.max_in_flight = self.stats.max_in_flight.max(self.stats.in_flight);
        self.stats.started += 1;
        self.users.insert(job.uid.clone(), UserEntry::Running);
        let run = run_job(
            self.deps.clone(),
            self.settings.clone(),
            job.uid.clone(),
            job.breach.clone(),
            job.fallback.clone(),
        );
        ctx.spawn(
            run.into_actor(self)
                .map(move |outcome, act, ctx| act.finish(job, outcome, ctx)),
        );
    }

    fn finish(&mut self, job: Job, outcome: Outcome, ctx: &mut Context<Self>) {
        self.stats.in_flight = self.stats.in_flight.saturating_sub(1);
        let until_ms = self
            .deps
            .clock
            .now_ms()
            .saturating_add(self.settings.cooldown_ms);
        let cooling = UserEntry::Cooling {
            until_ms,
            follow_up: false,
        };
        match outcome {
            Outcome::Applied(applied) => {
                let follow_up = self.deps.totals.is_some() && applied.state.stage < Stage::Restrict;
                self.users.insert(
                    job.uid.clone(),
                    UserEntry::Cooling {
                        until_ms,
                        follow_up,
                    },
                );
                let escalated = applied.event().filter(|e| e.new_stage > e.previous_stage);
                let result = if escalated.is_some() {
                    "escalated"
                } else {
                    "unchanged"
                };
                metrics::counter!(telemetry::FAIR_USE_CLASSIFICATIONS_TOTAL, "result" => result)
                    .increment(1);
                match escalated {
                    Some(e) => {
                        self.stats.escalated += 1;
                        if let Some(notice) = notice_for(e.new_stage, Some(&e.case_ref)) {
                            self.deps.notifier.notify(&job.uid, &notice);
                        }
                    }
                    None => self.stats.unchanged += 1,
                }
            }
            Outcome::LockHeld => {
                self.stats.lock_held += 1;
                self.users.insert(job.uid.clone(), cooling);
            }
            Outcome::Failed { reason, error } => {
                *self.stats.failed.entry(reason).or_default() += 1;
                self.stats.retries_scheduled += 1;
                metrics::counter!(telemetry::FAIR_USE_CLASSIFIER_FAILURES_TOTAL, "reason" => reason).increment(1);
                let mut job = job;
                let mut delay = job.backoff.next_delay();
                let attempt = job.backoff.attempts();
                if CLASSIFIER_FAILURES.contains(&reason) {
                    job.classifier_failures += 1;
                }
                if job.fallback.is_none() && job.classifier_failures >= self.settings.max_failures {
                    // The heuristic needs no network: try it at once.
                    self.stats.fallbacks += 1;
                    metrics::counter!(telemetry::FAIR_USE_CLASSIFIER_FALLBACKS_TOTAL, "reason" => reason)
                        .increment(1);
                    tracing::error!(
                        message = "Classifier failed too often; applying the heuristic's verdict instead.",
                        uid = %job.uid,
                        reason,
                        error = %error,
                        failures = job.classifier_failures,
                    );
                    job.fallback = Some(format!(
                        "{} failures, the last {reason}: {error}",
                        job.classifier_failures
                    ));
                    delay = Duration::ZERO;
                }
                tracing::warn!(
                    message = "Classifier run failed; lock released, will retry.",
                    uid = %job.uid,
                    reason,
                    error = %error,
                    attempt,
                    retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                );
                self.users.insert(job.uid.clone(), UserEntry::Retrying);
                let retry = job;
                ctx.run_later(delay, move |act, ctx| {
                    act.users.insert(retry.uid.clone(), UserEntry::Queued);
                    act.queue.push_back(retry);
                    act.dispatch(ctx);
                });
            }
        }
        self.dispatch(ctx);
    }

    fn sweep(&mut self) {
        let now = self.deps.clock.now_ms();
        self.users.retain(|_, e| {
            !matches!(e, UserEntry::Cooling { until_ms, follow_up: false } if *until_ms <= now)
        });
    }

    /// Starts the follow-ups due; returns how many.
    fn follow_up(&mut self, ctx: &mut Context<Self>) -> usize {
        let Some(totals) = self.deps.totals.clone() else {
            return 0;
        };
        let now = self.deps.clock.now_ms();
        let due: Vec<String> = self
            .users
            .iter()
            .filter(|(_, e)| {
                matches!(e, UserEntry::Cooling { until_ms, follow_up: true } if *until_ms <= now)
            })
            .map(|(uid, _)| uid.clone())
            .collect();
        let (due, off): (Vec<String>, Vec<String>) = due
            .into_iter()
            .partition(|uid| Enforcement::of(&self.cfg, uid).active());
        for uid in off {
            self.users.remove(&uid);
        }
        for uid in &due {
            self.users.insert(uid.clone(), UserEntry::Checking);
            self.checking += 1;
            let read = totals.read(uid);
            let uid = uid.clone();
            ctx.spawn(read.into_actor(self).map(move |read, act, ctx| {
                act.checking = act.checking.saturating_sub(1);
                act.users.remove(&uid);
                match read {
                    // Nothing higher to reach (an admin may have set it meanwhile): no classifier call.
                    Some(r) if r.stage == Stage::Restrict => {
                        act.stats.skipped_restrict += 1;
                    }
                    Some(r) => {
                        let triggered = r.caps.triggered(&r.totals);
                        if !triggered.is_empty() {
                            act.stats.followed_up += 1;
                            metrics::counter!(telemetry::FAIR_USE_BREACHES_TOTAL, "action" => "followed_up")
                                .increment(1);
                            act.enqueue(uid, &triggered, r.totals, r.caps, ctx);
                        }
                    }
                    None => {}
                }
                act.wake_if_idle();
            }));
        }
        due.len()
    }

    fn enqueue(
        &mut self,
        uid: String,
        triggered: &[CapTrigger],
        totals: RollingTotals,
        caps: SoftCaps,
        ctx: &mut Context<Self>,
    ) {
        let breach = BreachContext {
            trigger: triggered.first().map(|t| t.cap),
            totals,
            caps,
        };
        self.users.insert(uid.clone(), UserEntry::Queued);
        self.queue.push_back(Job {
            uid,
            breach,
            backoff: retry_backoff(&self.settings),
            classifier_failures: 0,
            fallback: None,
        });
        self.dispatch(ctx);
    }
}

impl Actor for CapSupervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(MAILBOX_CAPACITY);
        ctx.run_interval(SWEEP_EVERY, |act, _| act.sweep());
        ctx.run_interval(FOLLOW_UP_EVERY, |act, ctx| {
            act.follow_up(ctx);
        });
    }
}

impl Handler<CapBreached> for CapSupervisor {
    type Result = ();

    fn handle(&mut self, msg: CapBreached, ctx: &mut Context<Self>) {
        if msg.stage == Stage::Restrict {
            self.stats.skipped_restrict += 1;
            metrics::counter!(telemetry::FAIR_USE_BREACHES_TOTAL, "action" => "skipped_restrict")
                .increment(1);
            return;
        }
        let now = self.deps.clock.now_ms();
        let busy = match self.users.get(&msg.uid) {
            Some(
                UserEntry::Queued | UserEntry::Running | UserEntry::Retrying | UserEntry::Checking,
            ) => true,
            Some(UserEntry::Cooling { until_ms, .. }) => *until_ms > now,
            None => false,
        };
        if busy {
            self.stats.deduplicated += 1;
            metrics::counter!(telemetry::FAIR_USE_BREACHES_TOTAL, "action" => "deduplicated")
                .increment(1);
            return;
        }
        metrics::counter!(telemetry::FAIR_USE_BREACHES_TOTAL, "action" => "queued").increment(1);
        self.enqueue(msg.uid, &msg.triggered, msg.totals, msg.caps, ctx);
    }
}

impl Handler<WhenIdle> for CapSupervisor {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _: WhenIdle, _: &mut Context<Self>) -> Self::Result {
        if self.idle() {
            return Box::pin(async {});
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.idle_waiters.push(tx);
        Box::pin(async move {
            // A dropped sender (the actor stopped) also ends the wait.
            let _ = rx.await;
        })
    }
}

impl Handler<FollowUp> for CapSupervisor {
    type Result = usize;

    fn handle(&mut self, _: FollowUp, ctx: &mut Context<Self>) -> usize {
        self.follow_up(ctx)
    }
}

impl Handler<GetSupervisorStats> for CapSupervisor {
    type Result = SupervisorStats;

    fn handle(&mut self, _: GetSupervisorStats, _: &mut Context<Self>) -> SupervisorStats {
        self.stats.clone()
    }
}

/// The retry delays of a failed classifier run: from `retry_base_ms`, jittered, capped at `retry_max_ms`.
pub fn retry_backoff(settings: &ClassifierSettings) -> Backoff {
    Backoff::new(
        Duration::from_millis(settings.retry_base_ms),
        Duration::from_millis(settings.retry_max_ms),
    )
}

/// Failure reasons of the classifier itself (not of the store around it): these count toward the fallback.
const CLASSIFIER_FAILURES: [&str; 5] = ["error", "malformed", "not_configured", "timeout", "panic"];

/// Acquire the lock, classify (own task, timeout), apply (own task); release the lock on any failure.
/// With `fallback` (the configured classifier failed too often) the heuristic classifies instead.
async fn run_job(
    deps: SupervisorDeps,
    settings: ClassifierSettings,
    uid: String,
    breach: BreachContext,
    fallback: Option<String>,
) -> Outcome {
    let token = format!("{:032x}", rand::rng().random::<u128>());
    let started = tokio::time::Instant::now();
    let now = deps.clock.now_ms();
    match deps
        .lock
        .try_acquire(&uid, &token, now, settings.cooldown_ms)
        .await
    {
        Ok(true) => {}
        Ok(false) => return Outcome::LockHeld,
        Err(e) => {
            return Outcome::Failed {
                reason: "lock",
                error: e.to_string(),
            };
        }
    }
    let outcome = classify_and_apply(&deps, &settings, &uid, breach, fallback).await;
    metrics::histogram!(telemetry::FAIR_USE_CLASSIFIER_DURATION_SECONDS)
        .record(started.elapsed().as_secs_f64());
    if matches!(outcome, Outcome::Failed { .. }) {
        match deps.lock.release(&uid, &token).await {
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(message = "Releasing the classifier lock failed.", uid = %uid, error = %e)
            }
        }
    }
    outcome
}

async fn classify_and_apply(
    deps: &SupervisorDeps,
    settings: &ClassifierSettings,
    uid: &str,
    breach: BreachContext,
    fallback: Option<String>,
) -> Outcome {
    let now = deps.clock.now_ms();
    let since = now.saturating_sub(
        settings
            .lookback_days
            .saturating_mul(crate::policy::stage::DAY_MS),
    );
    let classifier: Arc<dyn Classifier> = match fallback {
        Some(_) => Arc::new(HeuristicClassifier),
        None => deps.classifier.clone(),
    };
    let sessions = deps.sessions.clone();
    let (task_uid, totals) = (uid.to_owned(), breach.totals);
    let lookback_days = settings.lookback_days;
    let mut task = tokio::spawn(async move {
        let mut recent = sessions.recent_sessions(&task_uid, since).await?;
        recent.truncate(MAX_SESSIONS);
        let snapshot = UsageSnapshot {
            uid: task_uid,
            now_ms: now,
            lookback_days,
            totals,
            sessions: recent,
        };
        classifier.classify(snapshot).await
    });
    let verdict =
        match tokio::time::timeout(Duration::from_millis(settings.timeout_ms), &mut task).await {
            Err(_) => {
                task.abort();
                return Outcome::Failed {
                    reason: "timeout",
                    error: format!("no verdict after {} ms", settings.timeout_ms),
                };
            }
            Ok(Err(join)) => {
                return Outcome::Failed {
                    reason: join_reason(&join),
                    error: join_message(join),
                };
            }
            Ok(Ok(Err(e))) => {
                return Outcome::Failed {
                    reason: e.code(),
                    error: e.to_string(),
                };
            }
            Ok(Ok(Ok(v))) => Verdict {
                classifier_failed: fallback,
                ..v.normalised()
            },
        };
    let apply = deps
        .sink
        .apply(uid.to_owned(), verdict, breach, deps.clock.now_ms());
    match tokio::spawn(apply).await {
        Ok(Ok(applied)) => Outcome::Applied(applied),
        Ok(Err(e)) => Outcome::Failed {
            reason: "apply",
            error: format!("{} ({})", e, e.code()),
        },
        Err(join) => Outcome::Failed {
            reason: "apply",
            error: join_message(join),
        },
    }
}

fn join_reason(e: &tokio::task::JoinError) -> &'static str {
    if e.is_panic() { "panic" } else { "cancelled" }
}

fn join_message(e: tokio::task::JoinError) -> String {
    if !e.is_panic() {
        return e.to_string();
    }
    let payload = e.into_panic();
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic with a non-string payload".to_owned())
}

#[allow(clippy::cast_precision_loss)] // small counts
fn gauge(n: usize) -> f64 {
    n as f64
}

//! `FairUse`: the handle the server holds for fair use. It composes the meter (rolling totals, month usage),
//! the ledger (stage state and events) and the cap supervisor, and answers the three callers with one
//! resolver: sync, realtime and status.
//!
//! Integration seam: breaches are detected here, after `Meter::record_and_read`, and reported to the
//! supervisor; verdicts are applied through the ledger (compare-and-set, so serial per user across nodes).
//! When the user meter actor owns the fair-use state, it takes over both steps behind the same API.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use actix::prelude::*;
use serde::Serialize;

use crate::fair_use::cap_supervisor::{
    CapBreached, CapSupervisor, MeterAndLedger, SupervisorDeps, WhenIdle,
};
use crate::fair_use::classifier::{Classifier, MAX_SESSIONS, UsageSource};
use crate::fair_use::heuristic::HeuristicClassifier;
use crate::fair_use::ledger::{Applied, FairUseLedger, LedgerError};
use crate::fair_use::notifier::{LogNotifier, Notifier};
use crate::fair_use::openai::OpenAiClassifier;
use crate::meter::{
    Meter, MeterError, RecordOutcome, RecordSpeech, RecordStatus, TotalsAgainst, UsageTotals,
};
use crate::outbound::Outbound;
use crate::policy::UsageType;
use crate::policy::notice::{
    Notice, ThresholdNotice, highest_per_window, status_message, threshold_key, thresholds_reached,
};
use crate::policy::stage::DAY_MS;
use crate::policy::{
    CaseRef, ClassifierKind, CreditLookup, Enforcement, Entitlement, EntitlementInput,
    FairUseConfig, FairUseEvent, InvalidStage, Mode, MonthUsage, SessionSummary, SoftCaps,
    SpeechMs, Stage, StageState, SttAllowance, SttUsage, resolve,
};
use crate::store::fair_use::{
    CooldownLock, FairUseStore, MAX_EVENTS_PER_USER, SttLedgerRow, SttParts, stt_total,
};
use crate::store::plans::PlanStore;
use crate::telemetry;
use crate::time::Clock;

/// A user over a cap is reported to the supervisor at most once per this interval (the supervisor
/// deduplicates anyway; this only saves store reads on a hot realtime path).
pub const BREACH_REPORT_INTERVAL_MS: u64 = 60_000;

/// The result of looking up a user's plan record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanRecord<'a> {
    /// Looked up: `None` = no record (the default plan, `VOICEGATE_DEFAULT_PLAN`).
    Known(Option<&'a str>),
    /// The lookup failed: credits are `Unavailable` (no lock, paid STT fails closed).
    Unavailable,
}

/// Errors of the admin operations.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(transparent)]
    InvalidStage(#[from] InvalidStage),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

impl AdminError {
    /// Stable code: `invalid_stage` (400) or a store code (503).
    pub fn code(&self) -> &'static str {
        match self {
            AdminError::InvalidStage(_) => InvalidStage::CODE,
            AdminError::Ledger(e) => e.code(),
        }
    }
}

/// Three numbers per window (hours or percent), rounded for display only.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PerWindow {
    pub daily: f64,
    pub three_day: f64,
    pub weekly: f64,
}

/// The status view (`GET /v1/fair-use/status`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FairUseStatus {
    pub stage: Stage,
    pub enforced_stage: Stage,
    pub enforcement: Enforcement,
    pub case_ref: Option<CaseRef>,
    pub message: String,
    pub speech_ms: SpeechMs,
    /// ms / 3 600 000, 2 decimals (the reference's `speech_hours_*`).
    pub speech_hours: PerWindow,
    /// The soft caps of the user's plan (the paid plans' or the free plan's; a plan that could not be read
    /// shows the higher).
    pub limits_hours: PerWindow,
    /// The hard ceiling on the rolling 24 h (every plan), 2 decimals; `None` when off.
    pub ceiling_hours: Option<f64>,
    /// The rolling 24 h is over the ceiling: sync refused (`speech_ceiling`), speech-to-text closed.
    pub over_ceiling: bool,
    /// 1 decimal.
    pub usage_pct: PerWindow,
    pub stt: SttAllowance,
    pub credits: CreditLookup,
    pub locked: bool,
    /// False while the meter could not read the store (totals are this node's pending speech only).
    pub totals_known: bool,
    pub notice: Option<Notice>,
    /// The usage thresholds reached (80 % / 100 % of a cap of the user's plan), the highest per window;
    /// empty while enforcement is off or the totals are unknown.
    pub thresholds: Vec<ThresholdNotice>,
}

/// One violation as the user sees it (`GET /v1/fair-use/violations`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ViolationCase {
    pub case_ref: CaseRef,
    pub at_ms: u64,
    /// The stage after it.
    pub stage: Stage,
    pub usage_type: Option<UsageType>,
}

/// A user's own fair-use record: what the stage is, when it ends, and the violations behind it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Violations {
    pub stage: Stage,
    /// When the stage decays one step (none: `None`).
    pub stage_ends_at_ms: Option<u64>,
    pub violations_7d: usize,
    pub violations_30d: usize,
    /// The violations of the last 30 days still in the event log, newest first, at most 20.
    pub cases: Vec<ViolationCase>,
    pub message: String,
}

/// Violations listed at most.
pub const MAX_LISTED_VIOLATIONS: usize = 20;

/// Everything an admin sees of one user.
#[derive(Debug, Clone, PartialEq)]
pub struct UserDetail {
    pub state: StageState,
    pub events: Vec<FairUseEvent>,
    /// The session evidence of the last 7 days, newest end first (what the classifiers read).
    pub sessions: Vec<SessionSummary>,
    pub totals: Option<UsageTotals>,
}

/// The fair-use handle. Cheap to clone.
#[derive(Clone)]
pub struct FairUse {
    cfg: Arc<FairUseConfig>,
    meter: Meter,
    plans: Arc<dyn PlanStore>,
    ledger: FairUseLedger,
    supervisor: Addr<CapSupervisor>,
    clock: Arc<dyn Clock>,
    notices: Option<LogNotifier>,
    reported: Arc<Mutex<HashMap<String, u64>>>,
    reports: Arc<ReportsInFlight>,
    /// The spend ceiling was seen reached (so the warning is logged once per trip).
    spend_tripped: Arc<std::sync::atomic::AtomicBool>,
}

/// Breach reports on their way to the supervisor (each reads the user's stage first).
#[derive(Debug, Default)]
struct ReportsInFlight {
    n: AtomicUsize,
    none: tokio::sync::Notify,
}

/// The classifier the configuration asks for; an LLM classifier calls through `outbound`.
pub fn classifier_from_config(cfg: &FairUseConfig, outbound: &Outbound) -> Arc<dyn Classifier> {
    match cfg.classifier.kind {
        ClassifierKind::Heuristic => Arc::new(HeuristicClassifier),
        ClassifierKind::OpenAi => Arc::new(OpenAiClassifier::new(
            &cfg.classifier,
            outbound.http().clone(),
        )),
    }
}

/// What [`FairUse::start`] needs besides the config and the meter.
pub struct FairUseParts {
    pub store: Arc<dyn FairUseStore>,
    pub lock: Arc<dyn CooldownLock>,
    pub classifier: Arc<dyn Classifier>,
    pub sessions: Arc<dyn UsageSource>,
    /// Users' plans: which caps apply to a breach.
    pub plans: Arc<dyn PlanStore>,
    /// `None` = a [`LogNotifier`], whose latest notice the status view shows.
    pub notifier: Option<Arc<dyn Notifier>>,
    pub clock: Arc<dyn Clock>,
}

impl FairUse {
    /// Starts the cap supervisor on the current arbiter (inside a running actix `System`).
    pub fn start(cfg: FairUseConfig, meter: Meter, parts: FairUseParts) -> FairUse {
        let cfg = Arc::new(cfg);
        let ledger = FairUseLedger::new(parts.store, Arc::clone(&cfg));
        let log_notifier = parts.notifier.is_none().then(LogNotifier::new);
        let notifier: Arc<dyn Notifier> = match (&parts.notifier, &log_notifier) {
            (Some(n), _) => Arc::clone(n),
            (None, Some(l)) => Arc::new(l.clone()),
            (None, None) => Arc::new(LogNotifier::new()),
        };
        let deps = SupervisorDeps {
            classifier: parts.classifier,
            lock: parts.lock,
            sink: Arc::new(ledger.clone()),
            notifier,
            sessions: parts.sessions,
            totals: Some(Arc::new(MeterAndLedger {
                meter: meter.clone(),
                ledger: ledger.clone(),
                plans: Arc::clone(&parts.plans),
                cfg: Arc::clone(&cfg),
                clock: Arc::clone(&parts.clock),
            })),
            clock: Arc::clone(&parts.clock),
        };
        let supervisor = CapSupervisor::new(&cfg, deps).start();
        if cfg.stt_spend_ceiling_ms > 0 {
            // Exported once, so an alert can compare today's spend with it.
            #[allow(clippy::cast_precision_loss)] // a gauge
            metrics::gauge!(telemetry::STT_SPEND_CEILING_SECONDS)
                .set(cfg.stt_spend_ceiling_ms as f64 / 1000.0);
        }
        FairUse {
            cfg,
            meter,
            plans: parts.plans,
            ledger,
            supervisor,
            clock: parts.clock,
            notices: log_notifier,
            reported: Arc::new(Mutex::new(HashMap::new())),
            reports: Arc::default(),
            spend_tripped: Arc::default(),
        }
    }

    pub fn config(&self) -> &FairUseConfig {
        &self.cfg
    }

    pub fn ledger(&self) -> &FairUseLedger {
        &self.ledger
    }

    pub fn supervisor(&self) -> &Addr<CapSupervisor> {
        &self.supervisor
    }

    /// Meters a record and, when the user is over a cap of their plan with enforcement active, reports the
    /// breach to the supervisor (in the background: the caller never waits for the stage and plan reads).
    pub async fn record(&self, rec: RecordSpeech) -> Result<RecordOutcome, MeterError> {
        let uid = rec.uid.to_string();
        let outcome = self.meter.record_and_read(rec).await?;
        if outcome.status == RecordStatus::Recorded && outcome.totals.known {
            self.maybe_report(uid, outcome.totals);
        }
        Ok(outcome)
    }

    fn maybe_report(&self, uid: String, totals: UsageTotals) {
        if !Enforcement::of(&self.cfg, &uid).active() {
            return;
        }
        // Under the lowest caps of every plan: under the user's, whatever their plan (no lookup).
        if self.cfg.caps.lowest().triggered(&totals.rolling).is_empty() {
            return;
        }
        let now = self.clock.now_ms();
        {
            // Whole-value inserts only: a poisoned map is still consistent.
            let mut reported = self
                .reported
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if reported
                .get(&uid)
                .is_some_and(|&at| now < at.saturating_add(BREACH_REPORT_INTERVAL_MS))
            {
                return;
            }
            reported.retain(|_, at| now < at.saturating_add(BREACH_REPORT_INTERVAL_MS));
            reported.insert(uid.clone(), now);
        }
        let (ledger, supervisor) = (self.ledger.clone(), self.supervisor.clone());
        let (plans, cfg) = (Arc::clone(&self.plans), Arc::clone(&self.cfg));
        let reports = Arc::clone(&self.reports);
        reports.n.fetch_add(1, Ordering::SeqCst);
        // `tokio::spawn`, not `actix::spawn`: speech is also recorded from tasks outside an actix arbiter's
        // local set (sync v2 job workers), where a local spawn panics.
        tokio::spawn(async move {
            match tokio::join!(ledger.read(&uid, now), plans.get(&uid)) {
                (Ok(state), Ok(record)) => {
                    let caps = cfg.caps.for_plan(&cfg.plans.plan(record.as_deref()));
                    let triggered = caps.triggered(&totals.rolling);
                    // `do_send` is unbounded in actix; the bound is the dedup above (one report per user
                    // per BREACH_REPORT_INTERVAL_MS), so the mailbox holds at most one breach per
                    // breaching user.
                    if !triggered.is_empty() {
                        supervisor.do_send(CapBreached {
                            uid,
                            stage: state.stage,
                            triggered,
                            totals: totals.rolling,
                            caps,
                        });
                    }
                }
                // The supervisor would only fail on the same store; the next record reports again.
                (Err(e), _) => {
                    tracing::warn!(message = "Reading fair-use state for a breach failed.", uid = %uid, error = %e)
                }
                (_, Err(e)) => {
                    tracing::warn!(message = "Reading the plan for a breach failed.", uid = %uid, error = %e)
                }
            }
            if reports.n.fetch_sub(1, Ordering::SeqCst) == 1 {
                reports.none.notify_waiters();
            }
        });
    }

    /// Returns once every breach report sent so far reached the supervisor and the supervisor is idle
    /// ([`WhenIdle`]): what a simulation on virtual time waits for before it moves the clock.
    pub async fn settled(&self) {
        loop {
            let none = self.reports.none.notified();
            tokio::pin!(none);
            none.as_mut().enable();
            if self.reports.n.load(Ordering::SeqCst) == 0 {
                break;
            }
            none.await;
        }
        // A stopped supervisor has nothing left to settle.
        let _ = self.supervisor.send(WhenIdle).await;
    }

    /// The entitlement of a user now: what sync, realtime and status all decide on.
    pub async fn entitlement(&self, uid: &str, mode: Mode, plan: PlanRecord<'_>) -> Entitlement {
        self.resolve_now(uid, mode, plan).await.0
    }

    /// Count the STT ms forwarded for `uid` today (UTC day), given by the provider that took the audio
    /// (`local`, `deepgram`, `openai`, `none`); returns today's total. The budgets of throttle and restrict
    /// are checked against the total by [`FairUse::entitlement`]; the parts go to the user's per-provider
    /// ledger ([`FairUse::stt_ledger`], billing reconciliation), in the same write. `paid`: the audio went
    /// to a paid provider, so it also counts toward the day's spend ceiling (all users together; a failure
    /// to count it is logged, and the next read of the ceiling finds the store as it is).
    pub async fn record_stt(
        &self,
        uid: &str,
        by_provider: SttParts<'_>,
        paid: bool,
    ) -> Result<u64, LedgerError> {
        let ms = stt_total(by_provider);
        let day = SttUsage::day_of(self.clock.now_ms());
        let store = self.ledger.store();
        if paid && self.cfg.stt_spend_ceiling_ms > 0 {
            match store.add_spend_ms(day, ms).await {
                Ok(total) => self.spend_seen(day, total),
                Err(e) => {
                    tracing::warn!(message = "Counting paid speech-to-text toward the spend ceiling failed.", uid, error = %e)
                }
            }
        }
        Ok(store.add_stt_ms(uid, day, by_provider).await?)
    }

    /// The user's STT ms per UTC day and provider for days `from..=to` (days since the epoch), as charged
    /// by [`FairUse::record_stt`]; kept [`crate::store::fair_use::STT_LEDGER_RETENTION_DAYS`] days.
    pub async fn stt_ledger(
        &self,
        uid: &str,
        from: u64,
        to: u64,
    ) -> Result<Vec<SttLedgerRow>, LedgerError> {
        Ok(self.ledger.store().stt_ledger(uid, from, to).await?)
    }

    /// Today's spend as last seen: the gauge, and a warning the first time it is at the ceiling.
    fn spend_seen(&self, day: u64, total_ms: u64) {
        #[allow(clippy::cast_precision_loss)] // gauges
        {
            metrics::gauge!(telemetry::STT_SPEND_TODAY_SECONDS).set(total_ms as f64 / 1000.0);
            // Which day that was: a node without paid traffic since midnight still shows yesterday's.
            metrics::gauge!(telemetry::STT_SPEND_DAY).set(day as f64);
        }
        let ceiling = self.cfg.stt_spend_ceiling_ms;
        if total_ms >= ceiling && !self.spend_tripped.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                message = "The daily spend ceiling on paid speech-to-text is reached: paid transcription is closed for everyone until the next UTC midnight.",
                spent_ms = total_ms,
                ceiling_ms = ceiling,
            );
        } else if total_ms < ceiling {
            self.spend_tripped.store(false, Ordering::Relaxed);
        }
    }

    /// Keeps a session's evidence (a realtime session as it goes and at its end, a sync file once metered)
    /// for the classifiers and the admin view. A failure is logged and counted
    /// (`voicegate_fair_use_evidence_errors_total{source}`) and answered `false`.
    pub async fn record_session(&self, uid: &str, session: &SessionSummary) -> bool {
        let written = self
            .ledger
            .store()
            .record_session(uid, session, self.clock.now_ms())
            .await;
        match written {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(message = "Writing session evidence failed.", uid, session = %session.id, error = %e);
                metrics::counter!(telemetry::FAIR_USE_EVIDENCE_ERRORS_TOTAL, "source" => session.lane.source())
                    .increment(1);
                false
            }
        }
    }

    async fn resolve_now(
        &self,
        uid: &str,
        mode: Mode,
        plan: PlanRecord<'_>,
    ) -> (Entitlement, UsageTotals, CreditLookup) {
        let now = self.clock.now_ms();
        let caps = self.caps_of(plan);
        // Realtime is never refused, so only the other modes need the moment the totals fall back under
        // the caps and the ceiling (a Retry-After bound); the meter computes it only when one is exceeded.
        let read = if mode == Mode::Realtime {
            self.meter.totals(uid).await
        } else {
            let against = TotalsAgainst {
                caps,
                ceiling_ms: self.cfg.ceiling_ms,
            };
            self.meter.totals_against(uid, against).await
        };
        let totals = match read {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(message = "Reading usage totals failed.", uid, error = %e);
                UsageTotals::default()
            }
        };
        let state = self.ledger.read(uid, now).await;
        let mut credits = match (plan, totals.known) {
            (PlanRecord::Known(record), true) => CreditLookup::Resolved(self.cfg.plans.credits(
                record,
                MonthUsage {
                    month_ms: totals.month_ms,
                },
            )),
            _ => CreditLookup::Unavailable,
        };
        let state = match state {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(message = "Reading fair-use state failed; admitting, STT closed.", uid, error = %e);
                credits = CreditLookup::Unavailable;
                StageState::default()
            }
        };
        let day = SttUsage::day_of(now);
        let stt_today = match self.ledger.store().stt_ms(uid, day).await {
            Ok(used_ms) => SttUsage { day, used_ms },
            Err(e) => {
                // An unknown STT count is an unknown entitlement: paid STT fails closed.
                tracing::warn!(message = "Reading today's STT usage failed; STT closed.", uid, error = %e);
                credits = CreditLookup::Unavailable;
                SttUsage { day, used_ms: 0 }
            }
        };
        // The spend ceiling: unreadable is unknown, and paid STT fails closed on an unknown entitlement.
        let spend_tripped = if self.cfg.stt_spend_ceiling_ms > 0 {
            match self.ledger.store().spend_ms(day).await {
                Ok(total) => {
                    self.spend_seen(day, total);
                    total >= self.cfg.stt_spend_ceiling_ms
                }
                Err(e) => {
                    tracing::warn!(message = "Reading today's paid speech-to-text spend failed; STT closed.", uid, error = %e);
                    credits = CreditLookup::Unavailable;
                    false
                }
            }
        } else {
            false
        };
        let input = EntitlementInput {
            uid,
            mode,
            credits: &credits,
            month: MonthUsage {
                month_ms: totals.month_ms,
            },
            stage: &state,
            totals: totals.rolling,
            totals_known: totals.known,
            caps,
            under_caps_at_ms: totals.under_caps_at_ms,
            under_ceiling_at_ms: totals.under_ceiling_at_ms,
            stt_today,
            spend_tripped,
            now_ms: now,
        };
        (resolve(&self.cfg, &input), totals, credits)
    }

    /// The soft caps of a user's plan; a plan that could not be read gets the highest of each window
    /// (admitting fails open: a lookup error never restricts a payer).
    pub fn caps_of(&self, plan: PlanRecord<'_>) -> SoftCaps {
        match plan {
            PlanRecord::Known(record) => self.cfg.caps.for_plan(&self.cfg.plans.plan(record)),
            PlanRecord::Unavailable => self.cfg.caps.highest(),
        }
    }

    /// The status view.
    pub async fn status(&self, uid: &str, plan: PlanRecord<'_>) -> FairUseStatus {
        let caps = self.caps_of(plan);
        let (e, totals, credits) = self.resolve_now(uid, Mode::Status, plan).await;
        let r = totals.rolling;
        FairUseStatus {
            stage: e.stage,
            enforced_stage: e.enforced_stage,
            enforcement: e.enforcement,
            case_ref: e.state.last_case_ref.clone(),
            message: status_message(e.stage, e.state.last_case_ref.as_ref()),
            speech_ms: SpeechMs {
                daily_ms: r.daily_ms,
                three_day_ms: r.three_day_ms,
                weekly_ms: r.weekly_ms,
                month_ms: totals.month_ms,
            },
            speech_hours: per_window([r.daily_ms, r.three_day_ms, r.weekly_ms], |ms| {
                round(hours(ms), 100.0)
            }),
            limits_hours: per_window([caps.daily_ms, caps.three_day_ms, caps.weekly_ms], |ms| {
                round(hours(ms), 100.0)
            }),
            ceiling_hours: (self.cfg.ceiling_ms > 0)
                .then(|| round(hours(self.cfg.ceiling_ms), 100.0)),
            over_ceiling: e.over_ceiling,
            usage_pct: usage_pct(&caps, &totals),
            stt: e.stt,
            locked: e.lock,
            credits,
            totals_known: totals.known,
            notice: self.notices.as_ref().and_then(|n| n.latest(uid)),
            thresholds: if e.enforcement.active() && totals.known {
                highest_per_window(thresholds_reached(&caps, &r))
            } else {
                Vec::new()
            },
        }
    }

    /// The thresholds of `status` not yet told to the user (across sessions and nodes: the store keeps the
    /// told ones, forgetting a level the usage fell back under), the highest per window; what a live session
    /// sends as `usage_threshold` events. Nothing while the totals are unknown (nothing is forgotten then
    /// either); a store error is logged and tells nothing (the next status read tries again).
    pub async fn claim_thresholds(
        &self,
        uid: &str,
        status: &FairUseStatus,
    ) -> Vec<ThresholdNotice> {
        if !status.totals_known {
            return Vec::new();
        }
        // Every level at or under each window's highest is reached.
        let reached: Vec<String> = status
            .thresholds
            .iter()
            .flat_map(|n| {
                crate::policy::notice::THRESHOLD_LEVELS
                    .into_iter()
                    .filter(move |&l| l <= n.level_pct)
                    .map(move |l| threshold_key(n.cap, l))
            })
            .collect();
        match self.ledger.store().claim_thresholds(uid, &reached).await {
            Ok(new) => status
                .thresholds
                .iter()
                .filter(|n| new.contains(&n.key()))
                .cloned()
                .collect(),
            Err(e) => {
                tracing::warn!(message = "Recording the usage thresholds told failed.", uid, error = %e);
                Vec::new()
            }
        }
    }

    /// The user's own violations view.
    pub async fn violations(&self, uid: &str) -> Result<Violations, AdminError> {
        let now = self.clock.now_ms();
        let state = self.ledger.read(uid, now).await?;
        let events = self.ledger.events(uid, MAX_EVENTS_PER_USER).await?;
        let since = |days: u64| now.saturating_sub(days.saturating_mul(DAY_MS));
        let count = |days: u64| {
            state
                .violations_ms
                .iter()
                .filter(|&&t| t >= since(days))
                .count()
        };
        let cases = events
            .iter()
            .filter(|e| e.violation && e.at_ms >= since(30))
            .take(MAX_LISTED_VIOLATIONS)
            .map(|e| ViolationCase {
                case_ref: e.case_ref.clone(),
                at_ms: e.at_ms,
                stage: e.new_stage,
                usage_type: e.classifier.as_ref().map(|v| v.usage_type),
            })
            .collect();
        Ok(Violations {
            stage: state.stage,
            stage_ends_at_ms: state.next_decay_at(&self.cfg.stages),
            violations_7d: count(7),
            violations_30d: count(30),
            cases,
            message: status_message(state.stage, state.last_case_ref.as_ref()),
        })
    }

    /// Admin set-stage (`stage` as given in the request; `invalid_stage` → 400).
    pub async fn set_stage(
        &self,
        uid: &str,
        stage: &str,
        admin: &str,
    ) -> Result<Applied, AdminError> {
        let stage: Stage = stage.parse()?;
        Ok(self
            .ledger
            .set_stage(uid, stage, admin, self.clock.now_ms())
            .await?)
    }

    /// Admin reset.
    pub async fn reset(&self, uid: &str, admin: &str) -> Result<Applied, AdminError> {
        Ok(self.ledger.reset(uid, admin, self.clock.now_ms()).await?)
    }

    /// Admin user detail: state (decayed, persisted), the newest 50 events, the session evidence of the
    /// classifier's lookback, current totals.
    pub async fn user_detail(&self, uid: &str) -> Result<UserDetail, AdminError> {
        let now = self.clock.now_ms();
        let state = self.ledger.read(uid, now).await?;
        let events = self.ledger.events(uid, 50).await?;
        let since = now.saturating_sub(
            self.cfg
                .classifier
                .lookback_days
                .saturating_mul(crate::policy::stage::DAY_MS),
        );
        let sessions = self
            .ledger
            .store()
            .sessions(uid, since, MAX_SESSIONS)
            .await
            .map_err(LedgerError::from)?;
        let totals = self.meter.totals(uid).await.ok();
        Ok(UserDetail {
            state,
            events,
            sessions,
            totals,
        })
    }

    /// Admin flagged list (limit capped at 200).
    pub async fn flagged(
        &self,
        stage: Option<Stage>,
        limit: usize,
    ) -> Result<Vec<(String, Stage)>, AdminError> {
        Ok(self.ledger.flagged(stage, limit.min(200)).await?)
    }

    /// Case lookup: the uid and event of a case ref.
    pub async fn case(
        &self,
        case_ref: &CaseRef,
    ) -> Result<Option<(String, FairUseEvent)>, AdminError> {
        Ok(self.ledger.case(case_ref).await?)
    }
}

#[allow(clippy::cast_precision_loss)] // display only
fn hours(ms: u64) -> f64 {
    ms as f64 / 3_600_000.0
}

fn round(x: f64, scale: f64) -> f64 {
    (x * scale).round() / scale
}

fn per_window(ms: [u64; 3], f: impl Fn(u64) -> f64) -> PerWindow {
    PerWindow {
        daily: f(ms[0]),
        three_day: f(ms[1]),
        weekly: f(ms[2]),
    }
}

#[allow(clippy::cast_precision_loss)] // display only
fn usage_pct(caps: &SoftCaps, totals: &UsageTotals) -> PerWindow {
    let pct = |used: u64, cap: u64| {
        if cap == 0 {
            0.0
        } else {
            round(used as f64 * 100.0 / cap as f64, 10.0)
        }
    };
    let r = totals.rolling;
    PerWindow {
        daily: pct(r.daily_ms, caps.daily_ms),
        three_day: pct(r.three_day_ms, caps.three_day_ms),
        weekly: pct(r.weekly_ms, caps.weekly_ms),
    }
}

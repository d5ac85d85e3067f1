//! Plan-aware caps and the hard ceiling, through the `FairUse` handle on the in-memory stores: which caps a
//! user's plan gives them (free and unknown 2/8/10 h, paid 4/16/20 h, an unreadable plan the higher), what
//! sync, realtime and status get for every plan × stage × usage level, the ceiling's refusal and its
//! Retry-After, and which breaches reach the classifier (with the caps they were judged on).

use crate::fair_use_support::{Scripted, Step};

use std::sync::Arc;

use voicegate_engine::fair_use::{
    FairUse, FairUseParts, FollowUp, GetSupervisorStats, NoSessions, PlanRecord,
};
use voicegate_engine::meter::{Meter, MeterConfig, RecordSpeech, SpeechAmount, SpeechSource};
use voicegate_engine::policy::{
    Admission, CaseRef, FairUseConfig, FairUseEvent, Mode, PlanCaps, RejectReason, SessionLane,
    SessionMeasures, SessionSummary, SoftCaps, Stage, StageState, SttAllowance, SttDenied,
};
use voicegate_engine::store::MemoryStore;
use voicegate_engine::store::fair_use::{
    CommitOutcome, FairUseFuture, FairUseStore, FairUseStoreError, MemoryCooldownLock,
    MemoryFairUseStore, SttLedgerRow, SttParts, VersionedState,
};
use voicegate_engine::store::plans::{
    MemoryPlanStore, PlanRecordValue, PlanSet, PlanStore, PlanStoreError,
};
use voicegate_engine::time::ManualClock;

const T0: u64 = 1_790_000_000_000;
const HOUR: u64 = 3_600_000;

struct World {
    fu: FairUse,
    plans: Arc<MemoryPlanStore>,
    classifier: Arc<Scripted>,
    clock: Arc<ManualClock>,
}

fn start(cfg: FairUseConfig) -> World {
    start_with(cfg, None)
}

/// `failing_plans`: the facade reads plans from that store instead (the world's own store is then unused).
fn start_with(cfg: FairUseConfig, failing_plans: Option<Arc<dyn PlanStore>>) -> World {
    let clock = ManualClock::new(T0);
    let meter = Meter::start(
        MeterConfig {
            shards: 0,
            ..MeterConfig::default()
        },
        Arc::new(MemoryStore::default()),
        clock.clone(),
    );
    let plans = Arc::new(MemoryPlanStore::default());
    let classifier = Scripted::new(vec![Step::Score(0.9)]);
    let fu = FairUse::start(
        cfg,
        meter,
        FairUseParts {
            store: Arc::new(MemoryFairUseStore::new()),
            lock: Arc::new(MemoryCooldownLock::new()),
            classifier: classifier.clone(),
            sessions: Arc::new(NoSessions),
            plans: failing_plans.unwrap_or_else(|| plans.clone()),
            notifier: None,
            clock: clock.clone(),
        },
    );
    World {
        fu,
        plans,
        classifier,
        clock,
    }
}

async fn set_plan(plans: &MemoryPlanStore, uid: &str, plan: &str) {
    let value = PlanRecordValue {
        plan: plan.to_owned(),
        updated_at_ms: T0,
        event_id: format!("test-{uid}"),
        source_at_ms: T0,
    };
    plans.set(uid, &value).await.unwrap();
}

/// `ms` of speech, the first hour of it spread over the last hour and the rest in the current minute (as
/// several devices or a sync upload can do): every rolling total is `ms`.
async fn speak(fu: &FairUse, uid: &str, ms: u64) {
    let rec = RecordSpeech::new(uid, SpeechAmount::Ms(ms), T0 - HOUR, SpeechSource::Sync);
    fu.record(rec).await.unwrap();
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum PlanCase {
    /// The free plan on record.
    Basic,
    /// No record, `VOICEGATE_DEFAULT_PLAN=unknown`.
    Unknown,
    /// A paid plan on record.
    Paid,
    /// The plan store failed.
    Unavailable,
}

impl PlanCase {
    fn record(self) -> PlanRecord<'static> {
        match self {
            PlanCase::Basic => PlanRecord::Known(Some("basic")),
            PlanCase::Unknown => PlanRecord::Known(None),
            PlanCase::Paid => PlanRecord::Known(Some("operator")),
            PlanCase::Unavailable => PlanRecord::Unavailable,
        }
    }

    fn caps(self) -> SoftCaps {
        match self {
            PlanCase::Basic | PlanCase::Unknown => SoftCaps::default(),
            PlanCase::Paid | PlanCase::Unavailable => SoftCaps::PAID,
        }
    }
}

#[actix::test]
async fn every_plan_stage_and_usage_level_resolves_to_its_plans_caps_and_the_ceiling() {
    let w = start(FairUseConfig::default());
    // Rolling totals (every window alike): under every cap; over the free daily cap only; over the free
    // daily and 3-day caps and the paid daily cap; over every cap and the 30 h ceiling.
    let levels = [HOUR + HOUR / 2, 3 * HOUR, 9 * HOUR, 31 * HOUR];
    let plans = [
        PlanCase::Basic,
        PlanCase::Unknown,
        PlanCase::Paid,
        PlanCase::Unavailable,
    ];
    let stages = [
        Stage::None,
        Stage::Warning,
        Stage::Throttle,
        Stage::Restrict,
    ];
    let mut rows = 0;
    for (li, &level) in levels.iter().enumerate() {
        for stage in stages {
            // One user per (level, stage): their usage and stage, resolved under each plan.
            let uid = format!("u{li}-{stage:?}");
            speak(&w.fu, &uid, level).await;
            if stage != Stage::None {
                w.fu.set_stage(&uid, stage.as_str(), "ops").await.unwrap();
            }
            for plan in plans {
                let ctx = format!("{plan:?} {stage:?} {}h", level as f64 / HOUR as f64);
                let caps = plan.caps();
                let expected: Vec<_> = caps
                    .triggered(&voicegate_engine::policy::RollingTotals {
                        daily_ms: level,
                        three_day_ms: level,
                        weekly_ms: level,
                    })
                    .into_iter()
                    .map(|t| t.cap)
                    .collect();
                let over_ceiling = level > 30 * HOUR;
                let sync = w.fu.entitlement(&uid, Mode::Sync, plan.record()).await;
                let got: Vec<_> = sync.caps_triggered.iter().map(|t| t.cap).collect();
                assert_eq!(got, expected, "caps: {ctx}");
                assert_eq!(sync.over_ceiling, over_ceiling, "ceiling: {ctx}");
                let restricted_over = stage == Stage::Restrict && !expected.is_empty();
                match (sync.admission, restricted_over, over_ceiling) {
                    (Admission::Admit, false, false) => {}
                    (Admission::Reject { reason, .. }, true, false) => {
                        assert_eq!(reason, RejectReason::RestrictedOverCap, "{ctx}")
                    }
                    // Both: the refusal that lasts longer is the answer. 31 h in the last hour stays over
                    // the weekly cap for 7 days and the restriction lasts 7: longer than the ceiling's day.
                    (Admission::Reject { reason, .. }, true, true) => {
                        assert_eq!(reason, RejectReason::RestrictedOverCap, "{ctx}")
                    }
                    (
                        Admission::Reject {
                            reason,
                            retry_after_s,
                        },
                        false,
                        true,
                    ) => {
                        assert_eq!(reason, RejectReason::SpeechCeiling, "{ctx}");
                        assert_eq!(reason.code(), "speech_ceiling");
                        // 30 h of it sits in the current minute: it leaves the 24 h window with it.
                        assert!(
                            (23 * 3_600..=24 * 3_600 + 60).contains(&retry_after_s),
                            "{ctx}: {retry_after_s}"
                        );
                    }
                    (a, r, c) => {
                        panic!("{ctx}: admission {a:?}, restricted over a cap {r}, ceiling {c}")
                    }
                }
                let rt = w.fu.entitlement(&uid, Mode::Realtime, plan.record()).await;
                assert_eq!(
                    rt.admission,
                    Admission::Admit,
                    "realtime is never refused: {ctx}"
                );
                let budget = match stage {
                    Stage::Throttle => Some(7_200_000),
                    Stage::Restrict => Some(1_800_000),
                    Stage::None | Stage::Warning => None,
                };
                match (&rt.stt, plan, over_ceiling, budget) {
                    (
                        SttAllowance::None {
                            reason: SttDenied::EntitlementUnknown,
                            ..
                        },
                        PlanCase::Unavailable,
                        _,
                        _,
                    ) => {}
                    (
                        SttAllowance::None {
                            reason: SttDenied::SpeechCeiling,
                            ..
                        },
                        _,
                        true,
                        _,
                    ) if plan != PlanCase::Unavailable => {}
                    (SttAllowance::Unlimited, _, false, None) if plan != PlanCase::Unavailable => {}
                    (SttAllowance::Remaining { daily_limit_ms, .. }, _, false, Some(b))
                        if plan != PlanCase::Unavailable =>
                    {
                        assert_eq!(*daily_limit_ms, b, "{ctx}")
                    }
                    (stt, ..) => panic!("{ctx}: stt {stt:?}"),
                }
                let st = w.fu.status(&uid, plan.record()).await;
                let h = |ms: u64| (ms as f64 / HOUR as f64 * 100.0).round() / 100.0;
                assert_eq!(
                    (
                        st.limits_hours.daily,
                        st.limits_hours.three_day,
                        st.limits_hours.weekly
                    ),
                    (h(caps.daily_ms), h(caps.three_day_ms), h(caps.weekly_ms)),
                    "status limits: {ctx}"
                );
                assert_eq!(
                    (st.ceiling_hours, st.over_ceiling),
                    (Some(30.0), over_ceiling),
                    "{ctx}"
                );
                rows += 1;
            }
        }
    }
    assert_eq!(rows, 64);
}

#[actix::test]
async fn the_ceiling_is_off_with_fair_use_at_zero_and_for_the_exempt_and_counts_only_past_it() {
    let at_ceiling = 30 * HOUR;
    for (what, cfg, total, refused) in [
        ("exactly at it", FairUseConfig::default(), at_ceiling, false),
        (
            "one ms past it",
            FairUseConfig::default(),
            at_ceiling + 1,
            true,
        ),
        (
            "ceiling 0 (off)",
            FairUseConfig {
                ceiling_ms: 0,
                ..FairUseConfig::default()
            },
            40 * HOUR,
            false,
        ),
        (
            "kill switch",
            FairUseConfig {
                kill_switch: true,
                ..FairUseConfig::default()
            },
            40 * HOUR,
            false,
        ),
        (
            "fair use disabled",
            FairUseConfig {
                enabled: false,
                ..FairUseConfig::default()
            },
            40 * HOUR,
            false,
        ),
        (
            "exempt",
            FairUseConfig {
                exempt_uids: ["u".to_owned()].into(),
                ..FairUseConfig::default()
            },
            40 * HOUR,
            false,
        ),
    ] {
        let w = start(cfg);
        speak(&w.fu, "u", total).await;
        let e =
            w.fu.entitlement("u", Mode::Sync, PlanRecord::Known(Some("operator")))
                .await;
        assert_eq!(e.over_ceiling, refused, "{what}");
        assert_eq!(
            matches!(
                e.admission,
                Admission::Reject {
                    reason: RejectReason::SpeechCeiling,
                    ..
                }
            ),
            refused,
            "{what}: {:?}",
            e.admission
        );
        assert_eq!(
            matches!(
                e.stt,
                SttAllowance::None {
                    reason: SttDenied::SpeechCeiling,
                    ..
                }
            ),
            refused,
            "{what}: {:?}",
            e.stt
        );
    }
}

#[actix::test]
async fn a_breach_is_judged_on_the_users_plan_and_the_event_records_those_caps() {
    let w = start(FairUseConfig::default());
    set_plan(&w.plans, "payer", "unlimited").await;
    set_plan(&w.plans, "free", "basic").await;
    // 3 h: over the free daily cap, under the paid one.
    speak(&w.fu, "payer", 3 * HOUR).await;
    speak(&w.fu, "free", 3 * HOUR).await;
    speak(&w.fu, "nobody", 3 * HOUR).await; // no record: unknown, the free plan's caps
    w.fu.settled().await;
    let mut classified: Vec<String> = w.classifier.calls.lock().unwrap().keys().cloned().collect();
    classified.sort();
    assert_eq!(
        classified,
        ["free", "nobody"],
        "the free and the unknown user are classified, the payer is not"
    );
    for uid in ["free", "nobody"] {
        let events = w.fu.ledger().events(uid, 10).await.unwrap();
        assert_eq!(events.len(), 1, "{uid}");
        assert_eq!(events[0].thresholds_ms, Some(SoftCaps::default()), "{uid}");
    }
    assert!(w.fu.ledger().events("payer", 10).await.unwrap().is_empty());
    // 5 h: over the paid daily cap too.
    let w2 = start(FairUseConfig::default());
    set_plan(&w2.plans, "payer", "architect").await;
    speak(&w2.fu, "payer", 5 * HOUR).await;
    w2.fu.settled().await;
    let events = w2.fu.ledger().events("payer", 10).await.unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].thresholds_ms, Some(SoftCaps::PAID));
}

#[test]
fn the_hot_path_prefilter_is_the_lowest_cap_of_each_window_and_an_unreadable_plan_gets_the_highest()
{
    let caps = PlanCaps {
        free: SoftCaps {
            daily_ms: 10,
            three_day_ms: 50,
            weekly_ms: 60,
        },
        paid: SoftCaps {
            daily_ms: 20,
            three_day_ms: 40,
            weekly_ms: 80,
        },
    };
    assert_eq!(
        caps.lowest(),
        SoftCaps {
            daily_ms: 10,
            three_day_ms: 40,
            weekly_ms: 60
        }
    );
    assert_eq!(
        caps.highest(),
        SoftCaps {
            daily_ms: 20,
            three_day_ms: 50,
            weekly_ms: 80
        }
    );
}

#[actix::test]
async fn thresholds_are_told_once_the_highest_per_window_and_never_for_the_exempt() {
    let cfg = FairUseConfig {
        exempt_uids: ["exempt".to_owned()].into(),
        ..FairUseConfig::default()
    };
    let w = start(cfg);
    // 2.5 h straight from nothing: past 100 % of the daily cap (2 h), 31 % of the 3-day one (8 h), 25 % of
    // the weekly one (10 h): only the daily 100 % is told, not its 80 %.
    speak(&w.fu, "u", 2 * HOUR + HOUR / 2).await;
    let status = w.fu.status("u", PlanRecord::Known(None)).await;
    let keys = |ns: &[voicegate_engine::policy::notice::ThresholdNotice]| {
        ns.iter().map(|n| n.key()).collect::<Vec<_>>()
    };
    assert_eq!(keys(&status.thresholds), ["daily:100"]);
    assert_eq!(
        keys(&w.fu.claim_thresholds("u", &status).await),
        ["daily:100"]
    );
    assert!(
        w.fu.claim_thresholds("u", &status).await.is_empty(),
        "told once"
    );
    // On a paid plan the same speech is 62.5 % of the daily cap (4 h): nothing reached.
    let paid = w.fu.status("u", PlanRecord::Known(Some("operator"))).await;
    assert!(paid.thresholds.is_empty(), "{:?}", paid.thresholds);
    // Fair use not enforced for the user: nothing shown, nothing told.
    speak(&w.fu, "exempt", 3 * HOUR).await;
    let exempt = w.fu.status("exempt", PlanRecord::Known(None)).await;
    assert!(exempt.thresholds.is_empty());
    assert!(w.fu.claim_thresholds("exempt", &exempt).await.is_empty());
}

#[actix::test]
async fn a_follow_up_reads_the_plan_again_so_a_payment_since_the_breach_moves_the_caps() {
    let w = start(FairUseConfig::default());
    // 3 h: over the free daily cap (the unknown plan's), under the paid one.
    speak(&w.fu, "u", 3 * HOUR).await;
    w.fu.settled().await;
    assert_eq!(w.classifier.calls.lock().unwrap().get("u"), Some(&1));
    // Paid meanwhile; when the cooldown ends, the follow-up finds the user under the paid caps.
    set_plan(&w.plans, "u", "unlimited").await;
    w.clock.advance(12 * HOUR);
    assert_eq!(
        w.fu.supervisor().send(FollowUp).await.unwrap(),
        1,
        "checked"
    );
    w.fu.settled().await;
    let stats = w.fu.supervisor().send(GetSupervisorStats).await.unwrap();
    assert_eq!(
        stats.followed_up, 0,
        "under the paid caps: not classified again"
    );
    assert_eq!(w.classifier.calls.lock().unwrap().get("u"), Some(&1));
}

/// A plan store that cannot be read.
struct DownPlans;

impl PlanStore for DownPlans {
    fn get<'a>(
        &'a self,
        _uid: &'a str,
    ) -> futures_util::future::BoxFuture<'a, Result<Option<String>, PlanStoreError>> {
        Box::pin(async { Err(PlanStoreError("down".into())) })
    }

    fn set<'a>(
        &'a self,
        _uid: &'a str,
        _value: &'a PlanRecordValue,
    ) -> futures_util::future::BoxFuture<'a, Result<PlanSet, PlanStoreError>> {
        Box::pin(async { Err(PlanStoreError("down".into())) })
    }
}

#[actix::test]
async fn with_the_plan_store_down_no_breach_is_reported_and_sync_gets_the_higher_caps() {
    let w = start_with(FairUseConfig::default(), Some(Arc::new(DownPlans)));
    // 3 h: over the free daily cap only; the plan cannot be read, so no breach is judged.
    speak(&w.fu, "u", 3 * HOUR).await;
    w.fu.settled().await;
    assert!(w.classifier.calls.lock().unwrap().is_empty());
    let stats = w.fu.supervisor().send(GetSupervisorStats).await.unwrap();
    assert_eq!(stats.started, 0);
    // 5 h: over the paid daily cap too; still no report while the plan store is down (the next record
    // after it returns reports).
    speak(&w.fu, "v", 5 * HOUR).await;
    w.fu.settled().await;
    assert!(w.classifier.calls.lock().unwrap().is_empty());
    // The resolver's callers pass `Unavailable`: the higher cap of each window (the paid 4 h here).
    let triggered = |uid: &'static str| {
        let fu = w.fu.clone();
        async move {
            fu.entitlement(uid, Mode::Sync, PlanRecord::Unavailable)
                .await
                .caps_triggered
                .len()
        }
    };
    assert_eq!(triggered("u").await, 0, "3 h is under the paid daily cap");
    assert_eq!(triggered("v").await, 1, "5 h is over it");
}

/// A fair-use store that cannot be reached (every call fails).
struct DownStore;

fn down<T: Send + 'static>() -> FairUseFuture<T> {
    Box::pin(async { Err(FairUseStoreError::Protocol("down".into())) })
}

impl FairUseStore for DownStore {
    fn load(&self, _: &str) -> FairUseFuture<VersionedState> {
        down()
    }
    fn commit(
        &self,
        _: &str,
        _: u64,
        _: &StageState,
        _: &[FairUseEvent],
    ) -> FairUseFuture<CommitOutcome> {
        down()
    }
    fn events(&self, _: &str, _: usize) -> FairUseFuture<Vec<FairUseEvent>> {
        down()
    }
    fn find_case(&self, _: &CaseRef) -> FairUseFuture<Option<String>> {
        down()
    }
    fn flagged(&self, _: Option<Stage>, _: usize) -> FairUseFuture<Vec<(String, Stage)>> {
        down()
    }
    fn add_stt_ms(&self, _: &str, _: u64, _: SttParts<'_>) -> FairUseFuture<u64> {
        down()
    }
    fn stt_ledger(&self, _: &str, _: u64, _: u64) -> FairUseFuture<Vec<SttLedgerRow>> {
        down()
    }
    fn stt_ms(&self, _: &str, _: u64) -> FairUseFuture<u64> {
        down()
    }
    fn record_session(&self, _: &str, _: &SessionSummary, _: u64) -> FairUseFuture<()> {
        down()
    }
    fn sessions(&self, _: &str, _: u64, _: usize) -> FairUseFuture<Vec<SessionSummary>> {
        down()
    }
    fn claim_thresholds(&self, _: &str, _: &[String]) -> FairUseFuture<Vec<String>> {
        down()
    }
    fn add_spend_ms(&self, _: u64, _: u64) -> FairUseFuture<u64> {
        down()
    }
    fn spend_ms(&self, _: u64) -> FairUseFuture<u64> {
        down()
    }
}

/// `docs/fair-use.md` §3: with the fair-use store down, a restricted user over every cap on the free plan
/// with no minutes left is admitted (the stage is unknown), nothing is locked (credits are not resolved),
/// paid STT is closed, no breach is classified, and no threshold is told.
#[actix::test]
async fn with_the_fair_use_store_down_audio_is_admitted_unlocked_and_paid_stt_is_closed() {
    let mut cfg = FairUseConfig::default();
    cfg.plans.free_minutes_per_month = 1;
    let clock = ManualClock::new(T0);
    let meter = Meter::start(
        MeterConfig {
            shards: 0,
            ..MeterConfig::default()
        },
        Arc::new(MemoryStore::default()),
        clock.clone(),
    );
    let classifier = Scripted::new(vec![Step::Score(0.9)]);
    let fu = FairUse::start(
        cfg,
        meter,
        FairUseParts {
            store: Arc::new(DownStore),
            lock: Arc::new(MemoryCooldownLock::new()),
            classifier: classifier.clone(),
            sessions: Arc::new(NoSessions),
            plans: Arc::new(MemoryPlanStore::default()),
            notifier: None,
            clock,
        },
    );
    speak(&fu, "u", 40 * HOUR).await; // over every cap and the ceiling; the month's minute long gone
    fu.settled().await;
    assert!(
        classifier.calls.lock().unwrap().is_empty(),
        "no stage: no breach judged"
    );
    assert!(fu.set_stage("u", "restrict", "ops").await.is_err());
    let e = fu
        .entitlement("u", Mode::Sync, PlanRecord::Known(Some("basic")))
        .await;
    assert_eq!(e.stage, Stage::None, "an unknown stage counts as none");
    assert!(!e.lock, "credits unavailable never lock");
    assert!(matches!(
        e.stt,
        SttAllowance::None {
            reason: SttDenied::EntitlementUnknown,
            ..
        }
    ));
    // The meter is up: the ceiling still holds (a known total), the restriction cannot (an unknown stage).
    assert!(matches!(
        e.admission,
        Admission::Reject {
            reason: RejectReason::SpeechCeiling,
            ..
        }
    ));
    let status = fu.status("u", PlanRecord::Known(Some("basic"))).await;
    assert!(fu.claim_thresholds("u", &status).await.is_empty());
    assert!(
        !fu.record_session(
            "u",
            &SessionSummary::new(
                "rt:x",
                SessionLane::Realtime,
                SessionMeasures {
                    started_at_ms: T0 - HOUR,
                    audio_ms: HOUR,
                    speech_ms: HOUR / 2,
                    longest_speech_ms: 10_000,
                    speech_runs: 10,
                },
                T0,
                false,
            )
        )
        .await,
        "a failed evidence write answers false (counted), the session goes on"
    );
}

/// A memory store on which another writer commits first, once: the next commit of the ledger finds its
/// version gone.
struct RacedStore {
    inner: MemoryFairUseStore,
    raced: std::sync::atomic::AtomicBool,
}

impl FairUseStore for RacedStore {
    fn load(&self, uid: &str) -> FairUseFuture<VersionedState> {
        self.inner.load(uid)
    }
    fn commit(
        &self,
        uid: &str,
        expected_version: u64,
        state: &StageState,
        events: &[FairUseEvent],
    ) -> FairUseFuture<CommitOutcome> {
        if !self.raced.swap(true, std::sync::atomic::Ordering::SeqCst) {
            // The other writer: an admin on another node sets warning first.
            let (other, event) = voicegate_engine::policy::admin_set_stage(
                &StageState::default(),
                &Default::default(),
                Stage::Warning,
                "other-node",
                T0,
                CaseRef::from_bits(7),
            );
            let inner = self.inner.clone();
            let (uid, state, events) = (uid.to_owned(), state.clone(), events.to_vec());
            return Box::pin(async move {
                let first = inner
                    .commit(&uid, expected_version, &other, &[event])
                    .await?;
                assert!(matches!(first, CommitOutcome::Committed { .. }));
                inner.commit(&uid, expected_version, &state, &events).await
            });
        }
        self.inner.commit(uid, expected_version, state, events)
    }
    fn events(&self, uid: &str, limit: usize) -> FairUseFuture<Vec<FairUseEvent>> {
        self.inner.events(uid, limit)
    }
    fn find_case(&self, case_ref: &CaseRef) -> FairUseFuture<Option<String>> {
        self.inner.find_case(case_ref)
    }
    fn flagged(&self, stage: Option<Stage>, limit: usize) -> FairUseFuture<Vec<(String, Stage)>> {
        self.inner.flagged(stage, limit)
    }
    fn add_stt_ms(&self, uid: &str, day: u64, parts: SttParts<'_>) -> FairUseFuture<u64> {
        self.inner.add_stt_ms(uid, day, parts)
    }
    fn stt_ledger(&self, uid: &str, from: u64, to: u64) -> FairUseFuture<Vec<SttLedgerRow>> {
        self.inner.stt_ledger(uid, from, to)
    }
    fn stt_ms(&self, uid: &str, day: u64) -> FairUseFuture<u64> {
        self.inner.stt_ms(uid, day)
    }
    fn record_session(&self, uid: &str, s: &SessionSummary, now_ms: u64) -> FairUseFuture<()> {
        self.inner.record_session(uid, s, now_ms)
    }
    fn sessions(&self, uid: &str, since: u64, limit: usize) -> FairUseFuture<Vec<SessionSummary>> {
        self.inner.sessions(uid, since, limit)
    }
    fn claim_thresholds(&self, uid: &str, reached: &[String]) -> FairUseFuture<Vec<String>> {
        self.inner.claim_thresholds(uid, reached)
    }
    fn add_spend_ms(&self, day: u64, ms: u64) -> FairUseFuture<u64> {
        self.inner.add_spend_ms(day, ms)
    }
    fn spend_ms(&self, day: u64) -> FairUseFuture<u64> {
        self.inner.spend_ms(day)
    }
}

/// `docs/fair-use.md` §1: the ledger loads, applies and commits by compare-and-set; a commit that finds
/// another writer first is re-read and re-applied, so neither change is lost.
#[actix::test]
async fn a_ledger_change_that_loses_a_race_is_reapplied_on_the_winners_state() {
    let store = Arc::new(RacedStore {
        inner: MemoryFairUseStore::new(),
        raced: std::sync::atomic::AtomicBool::new(false),
    });
    let ledger = voicegate_engine::fair_use::FairUseLedger::new(
        store.clone(),
        Arc::new(FairUseConfig::default()),
    );
    let applied = ledger
        .set_stage("u", Stage::Throttle, "ops", T0)
        .await
        .unwrap();
    assert_eq!(applied.state.stage, Stage::Throttle);
    let loaded = store.load("u").await.unwrap();
    assert_eq!((loaded.version, loaded.state.stage), (2, Stage::Throttle));
    let events = store.events("u", 10).await.unwrap();
    let actors: Vec<_> = events.iter().map(|e| e.actor.as_deref()).collect();
    assert_eq!(
        actors,
        [Some("ops"), Some("other-node")],
        "both, newest first"
    );
    assert_eq!(
        events[0].previous_stage,
        Stage::Warning,
        "re-applied on the winner's state"
    );
}

#[actix::test]
async fn the_spend_ceiling_trips_for_everyone_on_paid_audio_only_and_resets_at_midnight() {
    let cfg = FairUseConfig {
        stt_spend_ceiling_ms: 60_000,
        ..FairUseConfig::default()
    };
    let w = start(cfg);
    let stt = |uid: &'static str| {
        let fu = w.fu.clone();
        async move {
            fu.entitlement(uid, Mode::Realtime, PlanRecord::Known(None))
                .await
                .stt
        }
    };
    // Audio to a local engine costs nothing: it never counts.
    w.fu.record_stt("a", &[("local", 90_000)], false)
        .await
        .unwrap();
    assert_eq!(stt("b").await, SttAllowance::Unlimited);
    // 30 s + 30 s to a paid provider by one user: the ceiling closes paid STT for another user too.
    w.fu.record_stt("a", &[("deepgram", 30_000)], true)
        .await
        .unwrap();
    assert_eq!(stt("b").await, SttAllowance::Unlimited, "under the ceiling");
    w.fu.record_stt("a", &[("deepgram", 30_000)], true)
        .await
        .unwrap();
    let midnight = (T0 / 86_400_000 + 1) * 86_400_000;
    for uid in ["a", "b"] {
        let allowance = stt(uid).await;
        assert!(
            matches!(
                allowance,
                SttAllowance::None {
                    reason: SttDenied::SpendCeiling,
                    resets_at_ms: Some(at),
                    ..
                } if at == midnight
            ),
            "{uid}: {allowance:?}"
        );
    }
    // A new UTC day: open again.
    w.clock.set(midnight);
    assert_eq!(stt("b").await, SttAllowance::Unlimited);
}

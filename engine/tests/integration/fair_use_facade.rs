//! The `FairUse` handle end to end on the in-memory stores: a record over a cap reaches the supervisor and
//! escalates; sync, realtime and status resolve through the one resolver; admin set-stage/reset; the credit
//! lock follows the plan and month usage, and a failed plan lookup never locks.

use crate::fair_use_support;

use std::sync::Arc;
use std::time::Duration;

use fair_use_support::{Scripted, Step};
use voicegate_engine::fair_use::{
    FairUse, FairUseParts, FollowUp, GetSupervisorStats, NoSessions, PlanRecord, SupervisorStats,
};
use voicegate_engine::meter::{Meter, MeterConfig, RecordSpeech, SpeechAmount, SpeechSource};
use voicegate_engine::policy::{
    Admission, DefaultPlan, FairUseConfig, Mode, Stage, SttAllowance, SttDenied,
};
use voicegate_engine::store::MemoryStore;
use voicegate_engine::store::fair_use::{MemoryCooldownLock, MemoryFairUseStore};
use voicegate_engine::store::plans::MemoryPlanStore;
use voicegate_engine::time::ManualClock;

const T0: u64 = 1_790_000_000_000;
const HOUR: u64 = 3_600_000;

fn start(clock: Arc<ManualClock>, score: f64) -> FairUse {
    let meter = Meter::start(
        MeterConfig {
            shards: 0,
            ..MeterConfig::default()
        },
        Arc::new(MemoryStore::default()),
        clock.clone(),
    );
    // No plan record = the free plan here (`VOICEGATE_DEFAULT_PLAN=free`), as the lock tests assume.
    let mut cfg = FairUseConfig::default();
    cfg.plans.default_plan = DefaultPlan::Free;
    FairUse::start(
        cfg,
        meter,
        FairUseParts {
            store: Arc::new(MemoryFairUseStore::new()),
            lock: Arc::new(MemoryCooldownLock::new()),
            classifier: Scripted::new(vec![Step::Score(score)]),
            sessions: Arc::new(NoSessions),
            plans: Arc::new(MemoryPlanStore::default()),
            notifier: None,
            clock,
        },
    )
}

async fn speak(fu: &FairUse, uid: &str, ms: u64, at: u64) {
    let rec = RecordSpeech::new(uid, SpeechAmount::Ms(ms), at, SpeechSource::Sync);
    fu.record(rec).await.unwrap();
}

/// Waits (at most 2.5 s) until the supervisor's stats satisfy `done`; panics with `what` otherwise.
async fn until_stats(
    fu: &FairUse,
    what: &str,
    done: impl Fn(&SupervisorStats) -> bool,
) -> SupervisorStats {
    for _ in 0..500 {
        let s = fu.supervisor().send(GetSupervisorStats).await.unwrap();
        if done(&s) {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("the supervisor never {what}");
}

async fn until_classified(fu: &FairUse, n: u64) {
    until_stats(fu, "classified", |s| {
        s.escalated + s.unchanged >= n && s.in_flight == 0
    })
    .await;
}

#[actix::test]
async fn a_record_over_the_daily_cap_is_classified_and_the_status_shows_the_warning() {
    let clock = ManualClock::new(T0);
    let fu = start(clock.clone(), 0.9);
    speak(&fu, "u1", HOUR, T0 - 2 * HOUR).await;
    let under = fu.status("u1", PlanRecord::Known(None)).await;
    assert_eq!(
        (
            under.stage,
            under.speech_ms.daily_ms,
            under.speech_hours.daily
        ),
        (Stage::None, HOUR, 1.0)
    );
    speak(&fu, "u1", HOUR + 1, T0 - HOUR).await; // 2 h + 1 ms: strictly over the daily cap
    until_classified(&fu, 1).await;
    let st = fu.status("u1", PlanRecord::Known(None)).await;
    assert_eq!(st.stage, Stage::Warning);
    assert!(st.case_ref.is_some() && st.message.contains("personal conversations"));
    assert_eq!(
        st.notice.map(|n| n.title).as_deref(),
        Some("Fair Use Notice")
    );
    assert_eq!(st.usage_pct.daily, 100.0);
    assert!(!st.locked);
}

#[actix::test]
async fn restrict_over_a_cap_rejects_sync_with_retry_after_but_never_realtime() {
    let clock = ManualClock::new(T0);
    let fu = start(clock.clone(), 0.1);
    fu.set_stage("r", "restrict", "ops").await.unwrap();
    speak(&fu, "r", 3 * HOUR, T0 - 4 * HOUR).await;
    // On a paid plan 3 h is under the daily cap (4 h): admitted, restricted or not (the reference's hard
    // restriction used the free plan's caps for everyone, §8 #13).
    let paid = fu
        .entitlement("r", Mode::Sync, PlanRecord::Known(Some("unlimited")))
        .await;
    assert_eq!(paid.admission, Admission::Admit);
    assert!(paid.caps_triggered.is_empty());
    let sync = fu
        .entitlement("r", Mode::Sync, PlanRecord::Known(Some("basic")))
        .await;
    match sync.admission {
        Admission::Reject {
            reason,
            retry_after_s,
        } => {
            assert_eq!(reason.code(), "fair_use_restricted");
            // Not the restriction's 30 days: the daily total (3 h, still pending in the meter) is 1 h over
            // the 2 h cap, and that first hour has left the 24 h window 21 h from now. To the minute
            // bucket: T0 is 20 s into a minute, so the speech started 20 s into its first bucket, and the
            // bucket that completes the hour starts 20 s before T0 - 3 h and leaves 24 h + 1 ms after it.
            assert_eq!(T0 % 60_000, 20_000);
            assert_eq!(retry_after_s, 21 * 3_600 - 20 + 1);
        }
        Admission::Admit => panic!("restrict over cap must 429"),
    }
    let rt = fu
        .entitlement("r", Mode::Realtime, PlanRecord::Known(Some("unlimited")))
        .await;
    assert_eq!(rt.admission, Admission::Admit);
    assert!(matches!(
        rt.stt,
        SttAllowance::Remaining {
            remaining_ms: 1_800_000,
            ..
        }
    ));
    // STT forwarded today counts against the restrict budget (30 min), across calls and sessions.
    assert_eq!(
        fu.record_stt("r", &[("deepgram", 1_000_000)], true)
            .await
            .unwrap(),
        1_000_000
    );
    assert_eq!(
        fu.record_stt("r", &[("deepgram", 800_000)], true)
            .await
            .unwrap(),
        1_800_000
    );
    let rt = fu
        .entitlement("r", Mode::Realtime, PlanRecord::Known(Some("unlimited")))
        .await;
    assert!(matches!(
        rt.stt,
        SttAllowance::None {
            reason: SttDenied::BudgetExhausted,
            ..
        }
    ));
    assert_eq!(rt.admission, Admission::Admit, "realtime stays connected");
    // Restricted users are not classified again (E55): the breach reaches the supervisor, which skips it.
    let s = until_stats(&fu, "received the breach", |s| s.skipped_restrict >= 1).await;
    assert_eq!((s.skipped_restrict, s.started, s.queued), (1, 0, 0));
    // Admin reset: back to none, sync admitted.
    fu.reset("r", "ops").await.unwrap();
    let sync = fu
        .entitlement("r", Mode::Sync, PlanRecord::Known(Some("unlimited")))
        .await;
    assert_eq!(
        (sync.admission, sync.stage),
        (Admission::Admit, Stage::None)
    );
    assert_eq!(
        fu.set_stage("r", "ban", "ops").await.unwrap_err().code(),
        "invalid_stage"
    );
    let detail = fu.user_detail("r").await.unwrap();
    assert_eq!(detail.events.len(), 2, "set-stage and reset are audited");
}

#[actix::test]
async fn the_credit_lock_follows_plan_and_month_usage_and_an_unavailable_lookup_never_locks() {
    let clock = ManualClock::new(T0);
    let fu = start(clock.clone(), 0.1);
    // 20 h of speech this month = the free plan's 1 200 minutes. Caps trigger too, but caps never lock.
    for h in 0..20u64 {
        speak(&fu, "f", HOUR, T0 - 150 * HOUR + h * 7 * HOUR).await;
    }
    let free = fu
        .entitlement("f", Mode::Sync, PlanRecord::Known(None))
        .await;
    assert!(free.lock, "free plan exhausted locks");
    assert_eq!(free.admission, Admission::Admit, "exhaustion never rejects");
    let paid = fu
        .entitlement("f", Mode::Sync, PlanRecord::Known(Some("operator")))
        .await;
    assert!(!paid.lock, "a payment (paid plan) unlocks new content");
    let unknown = fu
        .entitlement("f", Mode::Realtime, PlanRecord::Unavailable)
        .await;
    assert!(!unknown.lock, "a failed lookup never locks");
    assert!(matches!(
        unknown.stt,
        SttAllowance::None {
            reason: SttDenied::EntitlementUnknown,
            ..
        }
    ));
}

#[actix::test]
async fn a_user_still_over_a_cap_when_the_cooldown_ends_is_classified_again_without_new_speech() {
    let clock = ManualClock::new(T0);
    let fu = start(clock.clone(), 0.9);
    // "over" stays over the daily cap for 24 h; "brief" falls back under it 13 h from now.
    speak(&fu, "over", 3 * HOUR, T0 - 3 * HOUR).await;
    speak(&fu, "brief", 2 * HOUR + 1, T0 - 12 * HOUR).await;
    fu.settled().await;
    let stats = fu.supervisor().send(GetSupervisorStats).await.unwrap();
    assert_eq!((stats.escalated, stats.followed_up), (2, 0));
    // Before the cooldown ends nothing is due.
    clock.advance(12 * HOUR - 1);
    assert_eq!(fu.supervisor().send(FollowUp).await.unwrap(), 0);
    clock.advance(1);
    assert_eq!(
        fu.supervisor().send(FollowUp).await.unwrap(),
        2,
        "both checked"
    );
    fu.settled().await;
    let stats = fu.supervisor().send(GetSupervisorStats).await.unwrap();
    assert_eq!(stats.followed_up, 1, "only the user still over a cap");
    assert_eq!(stats.escalated + stats.unchanged, 3);
    let over = fu.status("over", PlanRecord::Known(None)).await;
    let brief = fu.status("brief", PlanRecord::Known(None)).await;
    assert_eq!((over.stage, brief.stage), (Stage::Warning, Stage::Warning));
    let events = fu.ledger().events("over", 10).await.unwrap();
    assert_eq!(events.len(), 2, "two classifications of `over`: {events:?}");
    assert!(events.iter().all(|e| e.violation));

    // Restricted meanwhile (an admin): the next follow-up finds nothing higher to reach and calls no one.
    fu.set_stage("over", "restrict", "ops").await.unwrap();
    clock.advance(12 * HOUR);
    assert_eq!(fu.supervisor().send(FollowUp).await.unwrap(), 1);
    fu.settled().await;
    let stats = fu.supervisor().send(GetSupervisorStats).await.unwrap();
    assert_eq!((stats.skipped_restrict, stats.followed_up), (1, 1));
    let events = fu.ledger().events("over", 10).await.unwrap();
    assert_eq!(events.len(), 3, "the admin change only: {events:?}");
}

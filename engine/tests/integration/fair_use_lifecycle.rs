//! Lifecycle against real Redis: repeated breaches with high scores (the heuristic classifier on machine-like
//! volume) move a user none → warning → throttle → restrict, one step per cooldown; driven time then decays
//! them back to none. Events and case refs are recorded; cooldowns, untils and counts are decided from the
//! `now` of the clock, not from Redis TTLs (omi §7 G67, G72, F61; §8.10 fixed).

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use voicegate_engine::fair_use::{
    CapBreached, CapSupervisor, FairUseLedger, GetSupervisorStats, HeuristicClassifier,
    LogNotifier, NoSessions, SupervisorDeps,
};
use voicegate_engine::policy::stage::DAY_MS;
use voicegate_engine::policy::{
    CapKind, CapTrigger, CaseRef, EventKind, FairUseConfig, RollingTotals, Stage,
};
use voicegate_engine::store::fair_use_redis::{RedisCooldownLock, RedisFairUseStore, lock_key};
use voicegate_engine::store::test_redis::RedisServer;
use voicegate_engine::time::{Clock, ManualClock};

const T0: u64 = 1_790_000_000_000;
const HOUR: u64 = 3_600_000;

/// 13 h of speech in the last 24 h: volume and share of the day both say "machine".
fn heavy() -> RollingTotals {
    RollingTotals {
        daily_ms: 13 * HOUR,
        three_day_ms: 30 * HOUR,
        weekly_ms: 40 * HOUR,
    }
}

#[actix::test]
async fn repeated_high_scores_climb_to_restrict_and_time_decays_back_to_none() {
    let server = RedisServer::start().expect("redis-server");
    let client = redis::Client::open(server.url()).unwrap();
    let conn = redis::aio::ConnectionManager::new(client).await.unwrap();
    let cfg = FairUseConfig::default();
    let ledger = FairUseLedger::new(
        Arc::new(RedisFairUseStore::new(conn.clone())),
        Arc::new(cfg.clone()),
    );
    let clock = ManualClock::new(T0);
    let notifier = LogNotifier::new();
    let deps = SupervisorDeps {
        classifier: Arc::new(HeuristicClassifier),
        lock: Arc::new(RedisCooldownLock::new(conn)),
        sink: Arc::new(ledger.clone()),
        notifier: Arc::new(notifier.clone()),
        sessions: Arc::new(NoSessions),
        totals: None,
        clock: clock.clone(),
    };
    let sup = CapSupervisor::new(&cfg, deps).start();
    let uid = "heavy-user";

    let breach = |stage| CapBreached {
        uid: uid.to_owned(),
        stage,
        triggered: vec![CapTrigger {
            cap: CapKind::Daily,
            speech_ms: heavy().daily_ms,
            threshold_ms: cfg.caps.free.daily_ms,
        }],
        totals: heavy(),
        caps: cfg.caps.free,
    };
    let settle = || async {
        for _ in 0..2_000 {
            let s = sup.send(GetSupervisorStats).await.unwrap();
            if s.in_flight == 0 && s.queued == 0 {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("supervisor did not settle");
    };

    let mut seen = Vec::new();
    for round in 0..5 {
        let stage = ledger.read(uid, clock.now_ms()).await.unwrap().stage;
        sup.send(breach(stage)).await.unwrap();
        // A second breach in the same cooldown is deduplicated.
        sup.send(breach(stage)).await.unwrap();
        settle().await;
        seen.push(ledger.read(uid, clock.now_ms()).await.unwrap().stage);
        if round == 0 {
            // The Redis key still lives (real TTL 12 h), but once the clock passes the hold the lock is free:
            // the cooldown is decided from `now`.
            let ttl: i64 = server
                .command(&["PTTL", &lock_key(uid)])
                .unwrap()
                .trim()
                .trim_start_matches(':')
                .parse()
                .unwrap();
            assert!(ttl > 0, "{ttl}");
        }
        clock.advance(12 * HOUR + 1_000);
    }
    assert_eq!(
        seen,
        vec![
            Stage::Warning,
            Stage::Warning,
            Stage::Throttle,
            Stage::Restrict,
            Stage::Restrict
        ]
    );
    let stats = sup.send(GetSupervisorStats).await.unwrap();
    assert_eq!(
        (
            stats.started,
            stats.escalated,
            stats.unchanged,
            stats.skipped_restrict
        ),
        (4, 3, 1, 2)
    );
    assert_eq!(
        stats.deduplicated, 4,
        "the duplicate breach of each classified round"
    );
    assert_eq!(
        notifier.latest(uid).map(|n| n.title).as_deref(),
        Some("Transcription Limit Reached")
    );

    // Restrict started at round 3 (T0 + 3 × (12 h + 1 s)); decay is driven by the clock alone.
    let state = ledger.read(uid, clock.now_ms()).await.unwrap();
    let restrict_until = state.restrict_until_ms.expect("restrict_until");
    assert_eq!(restrict_until, T0 + 3 * (12 * HOUR + 1_000) + 30 * DAY_MS);
    clock.set(restrict_until - 1);
    assert_eq!(
        ledger.read(uid, clock.now_ms()).await.unwrap().stage,
        Stage::Restrict
    );
    clock.set(restrict_until);
    assert_eq!(
        ledger.read(uid, clock.now_ms()).await.unwrap().stage,
        Stage::Throttle
    );
    clock.set(restrict_until + 7 * DAY_MS);
    assert_eq!(
        ledger.read(uid, clock.now_ms()).await.unwrap().stage,
        Stage::Warning
    );
    clock.set(restrict_until + 37 * DAY_MS);
    assert_eq!(
        ledger.read(uid, clock.now_ms()).await.unwrap().stage,
        Stage::None
    );

    // Events (newest first): 3 decays, then 4 classifications; every case ref valid and unique.
    let events = ledger.events(uid, 50).await.unwrap();
    let path: Vec<(EventKind, Stage, Stage)> = events
        .iter()
        .rev()
        .map(|e| (e.kind, e.previous_stage, e.new_stage))
        .collect();
    assert_eq!(
        path,
        vec![
            (EventKind::Classification, Stage::None, Stage::Warning),
            (EventKind::Classification, Stage::Warning, Stage::Warning),
            (EventKind::Classification, Stage::Warning, Stage::Throttle),
            (EventKind::Classification, Stage::Throttle, Stage::Restrict),
            (EventKind::Decay, Stage::Restrict, Stage::Throttle),
            (EventKind::Decay, Stage::Throttle, Stage::Warning),
            (EventKind::Decay, Stage::Warning, Stage::None),
        ]
    );
    let mut refs: Vec<&CaseRef> = events.iter().map(|e| &e.case_ref).collect();
    assert!(refs.iter().all(|r| CaseRef::parse(r.as_str()).is_ok()));
    refs.sort();
    refs.dedup();
    assert_eq!(refs.len(), events.len());
    assert!(
        events
            .iter()
            .filter(|e| e.kind == EventKind::Classification)
            .all(|e| e.violation)
    );
    // The restrict escalation's case ref is findable (public case lookup).
    let restrict_event = events
        .iter()
        .find(|e| e.new_stage == Stage::Restrict && e.changed())
        .unwrap();
    let (found_uid, found) = ledger
        .case(&restrict_event.case_ref)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((found_uid.as_str(), &found), (uid, restrict_event));
    assert!(
        ledger.flagged(None, 10).await.unwrap().is_empty(),
        "back at none, no longer flagged"
    );
}

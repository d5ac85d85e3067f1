//! The cap supervisor on virtual time: classifiers that panic, hang or error are each logged with uid and
//! reason, counted, the lock released, retried later with backoff, and never change the stage (omi §7
//! D45–D49, E55–E56; §8.9 and §8.22 fixed).

use crate::fair_use_support;

use std::sync::Arc;
use std::time::Duration;

use fair_use_support::{HOUR_MS, Harness, Scripted, Step, breach, capture_logs};
use voicegate_engine::policy::{ClassifierSettings, FairUseConfig, Stage};
use voicegate_engine::store::fair_use::CooldownLock;

async fn failure_is_contained(step: Step, reason: &str) {
    tokio::time::pause();
    let (logs, _guard) = capture_logs();
    let classifier = Scripted::new(vec![step, Step::Score(0.9)]);
    let h = Harness::start(classifier.clone());

    h.addr.send(breach("user-7", Stage::None)).await.unwrap();
    let s = h.settle().await;
    assert_eq!(
        s.failed.get(reason),
        Some(&1),
        "counted under {reason}: {s:?}"
    );
    assert_eq!(s.retries_scheduled, 1);
    assert_eq!(classifier.calls("user-7"), 1);
    assert_eq!(h.lock.holder("user-7", h.now()), None, "lock released");
    assert_eq!(
        h.stage("user-7").await,
        Stage::None,
        "a failure is never a verdict"
    );
    assert!(
        h.ledger.events("user-7", 10).await.unwrap().is_empty(),
        "no event for a failure"
    );
    let text = logs.text();
    let line = text
        .lines()
        .find(|l| l.contains("Classifier run failed"))
        .unwrap_or_else(|| panic!("no log: {text}"));
    assert!(
        line.contains("uid=user-7") && line.contains(&format!("reason=\"{reason}\"")),
        "{line}"
    );

    // More breaches while the retry is pending are deduplicated, not run.
    h.addr.send(breach("user-7", Stage::None)).await.unwrap();
    assert_eq!(h.stats().await.deduplicated, 1);

    // The retry comes after the jittered backoff (first delay in [60 s, 120 s]), not the 12 h cooldown,
    // and succeeds.
    tokio::time::sleep(Duration::from_secs(59)).await;
    assert_eq!(classifier.calls("user-7"), 1, "not before the backoff");
    tokio::time::sleep(Duration::from_secs(62)).await;
    let s = h.settle().await;
    assert_eq!(classifier.calls("user-7"), 2);
    assert_eq!(s.escalated, 1);
    assert_eq!(h.stage("user-7").await, Stage::Warning);
    assert!(
        h.lock.holder("user-7", h.now()).is_some(),
        "a success keeps the lock as the cooldown"
    );
}

#[actix::test]
async fn panicking_classifier_is_logged_counted_released_and_retried() {
    failure_is_contained(Step::Panic, "panic").await;
}

#[actix::test]
async fn hanging_classifier_times_out_and_is_logged_counted_released_and_retried() {
    failure_is_contained(Step::Hang, "timeout").await;
}

#[actix::test]
async fn erroring_classifier_is_logged_counted_released_and_retried() {
    failure_is_contained(Step::Error, "error").await;
}

#[actix::test]
async fn repeated_failures_back_off_exponentially_up_to_the_cap() {
    tokio::time::pause();
    let classifier = Scripted::new(vec![Step::Error]);
    let h = Harness::start(classifier.clone());
    h.addr.send(breach("u", Stage::None)).await.unwrap();
    h.settle().await;
    // Retry n comes after a jittered delay in [60 s, 60 s × 2ⁿ] (the harness drifts by at most a second
    // per round): never before the floor, never after the ceiling, which doubles.
    for (n, calls) in [(1u32, 2), (2, 3), (3, 4)] {
        let started = tokio::time::Instant::now();
        tokio::time::sleep(Duration::from_secs(57)).await;
        assert_eq!(
            classifier.calls("u"),
            calls - 1,
            "not before 60 s (retry {n})"
        );
        let ceiling = Duration::from_secs(60 << n);
        while classifier.calls("u") < calls {
            assert!(
                started.elapsed() <= ceiling + Duration::from_secs(2),
                "retry {n} not within its ceiling {ceiling:?}"
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        h.settle().await;
        assert_eq!(classifier.calls("u"), calls);
    }
    assert_eq!(h.stage("u").await, Stage::None);
    assert_eq!(h.stats().await.failed.get("error"), Some(&4));
}

#[actix::test]
async fn simultaneous_failures_retry_at_spread_out_times() {
    tokio::time::pause();
    let classifier = Scripted::new(vec![Step::Error]);
    let h = Harness::start(classifier.clone());
    let uids: Vec<String> = (0..12).map(|i| format!("u{i}")).collect();
    for uid in &uids {
        h.addr.send(breach(uid, Stage::None)).await.unwrap();
    }
    h.settle().await;
    // Each user's first retry lands somewhere in [60 s, 120 s]: record the second it did.
    let started = tokio::time::Instant::now();
    let mut retried_at = std::collections::BTreeMap::new();
    while retried_at.len() < uids.len() {
        assert!(
            started.elapsed() <= Duration::from_secs(125),
            "{retried_at:?}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        for uid in &uids {
            if classifier.calls(uid) >= 2 {
                retried_at
                    .entry(uid.clone())
                    .or_insert(started.elapsed().as_secs());
            }
        }
    }
    let seconds: std::collections::BTreeSet<u64> = retried_at.values().copied().collect();
    assert!(
        seconds.iter().all(|s| (59..=122).contains(s)),
        "{retried_at:?}"
    );
    // Without jitter all twelve would retry in the same second.
    assert!(seconds.len() >= 4, "retries not spread: {retried_at:?}");
}

#[actix::test]
async fn a_restricted_user_is_never_classified_and_the_lock_is_untouched_e55() {
    tokio::time::pause();
    let classifier = Scripted::new(vec![Step::Score(1.0)]);
    let h = Harness::start(classifier.clone());
    h.addr.send(breach("r", Stage::Restrict)).await.unwrap();
    let s = h.settle().await;
    assert_eq!((s.skipped_restrict, s.started), (1, 0));
    assert_eq!(classifier.total_calls(), 0);
    assert_eq!(h.lock.holder("r", h.now()), None);
}

#[actix::test]
async fn throttle_warning_and_none_are_classified_exactly_once_e56() {
    tokio::time::pause();
    let classifier = Scripted::new(vec![Step::Score(0.1)]);
    let h = Harness::start(classifier.clone());
    for (uid, stage) in [
        ("t", Stage::Throttle),
        ("w", Stage::Warning),
        ("n", Stage::None),
    ] {
        h.addr.send(breach(uid, stage)).await.unwrap();
        h.addr.send(breach(uid, stage)).await.unwrap();
    }
    h.settle().await;
    for uid in ["t", "w", "n"] {
        assert_eq!(classifier.calls(uid), 1, "{uid}");
    }
}

#[actix::test]
async fn lock_held_elsewhere_runs_nothing_d46() {
    tokio::time::pause();
    let classifier = Scripted::new(vec![Step::Score(1.0)]);
    let h = Harness::start(classifier.clone());
    assert!(
        h.lock
            .try_acquire("busy", "other-node", h.now(), 12 * HOUR_MS)
            .await
            .unwrap()
    );
    h.addr.send(breach("busy", Stage::None)).await.unwrap();
    let s = h.settle().await;
    assert_eq!((s.lock_held, classifier.total_calls()), (1, 0));
    assert_eq!(
        h.lock.holder("busy", h.now()).as_deref(),
        Some("other-node"),
        "not released by us"
    );
}

#[actix::test]
async fn escalation_sends_a_notice_with_the_case_ref_and_a_benign_verdict_sends_none_d45_d47() {
    tokio::time::pause();
    let h = Harness::start(Scripted::new(vec![Step::Score(0.9)]));
    h.addr.send(breach("loud", Stage::None)).await.unwrap();
    h.settle().await;
    let notice = h.notifier.latest("loud").expect("notice");
    let event = h.ledger.events("loud", 1).await.unwrap().remove(0);
    assert_eq!(
        (notice.title.as_str(), notice.case_ref.as_ref()),
        ("Fair Use Notice", Some(&event.case_ref))
    );

    let quiet = Harness::start(Scripted::new(vec![Step::Score(0.2)]));
    quiet.addr.send(breach("quiet", Stage::None)).await.unwrap();
    let s = quiet.settle().await;
    assert_eq!((s.unchanged, s.escalated), (1, 0));
    assert!(quiet.notifier.latest("quiet").is_none());
    assert_eq!(
        quiet.ledger.events("quiet", 10).await.unwrap().len(),
        1,
        "benign runs are audited"
    );
}

#[actix::test]
async fn a_high_score_escalates_exactly_one_step() {
    tokio::time::pause();
    let h = Harness::start(Scripted::new(vec![Step::Score(1.0)]));
    // A user at warning with plenty of recent violations: one success moves them to throttle, not restrict.
    for i in 0..5 {
        h.ledger
            .apply_verdict(
                "v",
                &fair_use_support::verdict(1.0),
                &context(),
                h.now() - (i + 1) * HOUR_MS,
            )
            .await
            .unwrap();
    }
    assert_eq!(h.stage("v").await, Stage::Warning);
    h.addr.send(breach("v", Stage::Warning)).await.unwrap();
    h.settle().await;
    assert_eq!(h.stage("v").await, Stage::Throttle);
}

fn context() -> voicegate_engine::policy::BreachContext {
    voicegate_engine::policy::BreachContext {
        trigger: None,
        totals: Default::default(),
        caps: Default::default(),
    }
}

#[actix::test]
async fn a_lock_store_error_is_a_counted_failure_not_a_crash_d49() {
    use futures_util::future::BoxFuture;
    use voicegate_engine::store::fair_use::FairUseStoreError;

    struct Broken;
    impl CooldownLock for Broken {
        fn try_acquire(
            &self,
            _: &str,
            _: &str,
            _: u64,
            _: u64,
        ) -> BoxFuture<'static, Result<bool, FairUseStoreError>> {
            Box::pin(async { Err(FairUseStoreError::Protocol("SET refused".into())) })
        }
        fn release(&self, _: &str, _: &str) -> BoxFuture<'static, Result<bool, FairUseStoreError>> {
            Box::pin(async { Ok(false) })
        }
    }
    tokio::time::pause();
    let h = Harness::start(Scripted::new(vec![Step::Score(1.0)]));
    let cfg = h.cfg.clone();
    let deps = voicegate_engine::fair_use::SupervisorDeps {
        classifier: Arc::new(Scripted::new(vec![Step::Score(1.0)])),
        lock: Arc::new(Broken),
        sink: Arc::new(h.ledger.clone()),
        notifier: Arc::new(h.notifier.clone()),
        sessions: Arc::new(voicegate_engine::fair_use::NoSessions),
        totals: None,
        clock: h.clock.clone(),
    };
    use actix::Actor as _;
    let addr = voicegate_engine::fair_use::CapSupervisor::new(&cfg, deps).start();
    addr.send(breach("x", Stage::None)).await.unwrap();
    // Synchronised on the event: the failed lock attempt is counted (virtual time, 1 ms steps, 1 s at most).
    let mut s = voicegate_engine::fair_use::SupervisorStats::default();
    for _ in 0..1_000 {
        s = addr
            .send(voicegate_engine::fair_use::GetSupervisorStats)
            .await
            .unwrap();
        if s.failed.contains_key("lock") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(s.failed.get("lock"), Some(&1));
    assert_eq!(h.stage("x").await, Stage::None);
}

#[actix::test]
async fn a_classifier_failing_max_failures_times_is_replaced_by_the_heuristics_verdict() {
    tokio::time::pause();
    let classifier = Scripted::new(vec![Step::Error]);
    let cfg = FairUseConfig {
        classifier: ClassifierSettings {
            max_failures: 2,
            ..ClassifierSettings::default()
        },
        ..FairUseConfig::default()
    };
    let h = Harness::start_with(classifier.clone(), cfg);
    h.addr.send(breach("u", Stage::None)).await.unwrap();
    // The first failure waits for its retry (virtual time); the second is the last: the heuristic runs at
    // once and its verdict is applied, marked.
    let mut stats = h.settle().await;
    while stats.fallbacks == 0 || stats.unchanged + stats.escalated == 0 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        stats = h.settle().await;
    }
    assert_eq!(
        classifier.calls("u"),
        2,
        "the classifier is not called again"
    );
    assert_eq!(stats.failed.get("error"), Some(&2));
    assert_eq!((stats.fallbacks, stats.unchanged), (1, 1));
    let events = h.ledger.events("u", 10).await.unwrap();
    assert_eq!(events.len(), 1, "{events:?}");
    let verdict = events[0].classifier.as_ref().expect("the applied verdict");
    assert_eq!(verdict.model, voicegate_engine::fair_use::heuristic::MODEL);
    assert!(
        verdict
            .classifier_failed
            .as_deref()
            .is_some_and(|f| f.starts_with("2 failures, the last error")),
        "{verdict:?}"
    );
    // Nothing more is retried.
    tokio::time::sleep(Duration::from_secs(7_200)).await;
    assert_eq!(classifier.calls("u"), 2);
}

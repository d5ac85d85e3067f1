//! 1,000 users breaching at once on virtual time: never more than the concurrency limit in flight, and each
//! user classified once per cooldown.

use crate::fair_use_support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use fair_use_support::{HOUR_MS, Harness, Scripted, Step, breach};
use voicegate_engine::policy::Stage;

#[actix::test]
async fn a_thousand_breaching_users_stay_within_the_limit_and_are_classified_once_per_cooldown() {
    tokio::time::pause();
    let classifier = Scripted::with_work(vec![Step::Score(0.9)], Duration::from_secs(2));
    let h = Harness::start(classifier.clone());
    let limit = h.cfg.classifier.concurrency;
    assert_eq!(limit, 8);
    let uids: Vec<String> = (0..1_000).map(|i| format!("user-{i:04}")).collect();

    for uid in &uids {
        h.addr.do_send(breach(uid, Stage::None));
        h.addr.do_send(breach(uid, Stage::None));
    }
    let s = h.settle().await;
    assert_eq!(s.max_in_flight, limit, "{s:?}");
    assert!(classifier.peak.load(Ordering::SeqCst) <= limit);
    assert_eq!(s.started, 1_000);
    assert_eq!(s.deduplicated, 1_000);
    assert!(uids.iter().all(|u| classifier.calls(u) == 1));

    // Within the cooldown: nothing new runs.
    tokio::time::sleep(Duration::from_millis(HOUR_MS)).await;
    for uid in &uids {
        h.addr.do_send(breach(uid, Stage::Warning));
    }
    let s = h.settle().await;
    assert_eq!(s.started, 1_000);
    assert_eq!(classifier.total_calls(), 1_000);

    // After the cooldown: each once more, still within the limit.
    tokio::time::sleep(Duration::from_millis(12 * HOUR_MS)).await;
    for uid in &uids {
        h.addr.do_send(breach(uid, Stage::Warning));
    }
    let s = h.settle().await;
    assert_eq!(s.started, 2_000);
    assert!(uids.iter().all(|u| classifier.calls(u) == 2));
    assert!(classifier.peak.load(Ordering::SeqCst) <= limit);
    assert!(s.failed.is_empty(), "{s:?}");
}

//! Two nodes' cap supervisors on one Redis (each with its own connection, ledger and in-memory dedupe):
//! the same users breaching on both at once are classified once each, and the verdict is applied once.

use crate::fair_use_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use fair_use_support::{Scripted, Step, breach};
use voicegate_engine::fair_use::{
    CapSupervisor, FairUseLedger, GetSupervisorStats, LogNotifier, NoSessions, SupervisorDeps,
};
use voicegate_engine::policy::{FairUseConfig, Stage};
use voicegate_engine::store::fair_use_redis::{RedisCooldownLock, RedisFairUseStore};
use voicegate_engine::store::test_redis::RedisServer;
use voicegate_engine::time::{Clock, SystemClock};

/// One node: a supervisor on its own connection to `url`; returns it and its ledger.
async fn node(
    url: &str,
    classifier: Arc<Scripted>,
    cfg: &FairUseConfig,
) -> (Addr<CapSupervisor>, FairUseLedger) {
    let client = redis::Client::open(url).unwrap();
    let conn = redis::aio::ConnectionManager::new(client).await.unwrap();
    let ledger = FairUseLedger::new(
        Arc::new(RedisFairUseStore::new(conn.clone())),
        Arc::new(cfg.clone()),
    );
    let deps = SupervisorDeps {
        classifier,
        lock: Arc::new(RedisCooldownLock::new(conn)),
        sink: Arc::new(ledger.clone()),
        notifier: Arc::new(LogNotifier::new()),
        sessions: Arc::new(NoSessions),
        totals: None,
        clock: Arc::new(SystemClock),
    };
    (CapSupervisor::new(cfg, deps).start(), ledger)
}

/// Waits (real time: the locks live in Redis) until neither supervisor has anything queued or running.
async fn settle(nodes: &[&Addr<CapSupervisor>]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut busy = false;
        for n in nodes {
            let s = n.send(GetSupervisorStats).await.unwrap();
            busy |= s.in_flight > 0 || s.queued > 0;
        }
        if !busy {
            return;
        }
        assert!(Instant::now() < deadline, "supervisors did not settle");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[actix::test]
async fn a_breach_on_two_nodes_at_once_is_classified_once() {
    let redis = RedisServer::start().expect("redis-server");
    let cfg = FairUseConfig::default();
    // One classifier shared by both nodes, so its call count is the cluster-wide count; each call takes
    // 50 ms, so the two nodes' breaches overlap.
    let classifier = Scripted::with_work(vec![Step::Score(0.9)], Duration::from_millis(50));
    let (a, ledger) = node(&redis.url(), classifier.clone(), &cfg).await;
    let (b, _) = node(&redis.url(), classifier.clone(), &cfg).await;
    let uids: Vec<String> = (0..40).map(|i| format!("both-{i:02}")).collect();
    for uid in &uids {
        a.do_send(breach(uid, Stage::None));
        b.do_send(breach(uid, Stage::None));
    }
    settle(&[&a, &b]).await;
    for uid in &uids {
        assert_eq!(
            classifier.calls(uid),
            1,
            "{uid} classified once across both nodes"
        );
    }
    let now = SystemClock.now_ms();
    for uid in &uids {
        let stage = ledger.read(uid, now).await.unwrap().stage;
        assert_eq!(
            stage,
            Stage::Warning,
            "{uid}: the verdict applied once (one step up)"
        );
    }
    let (sa, sb) = (
        a.send(GetSupervisorStats).await.unwrap(),
        b.send(GetSupervisorStats).await.unwrap(),
    );
    // Each node started a task per user; for each user one of them took the store's lock and escalated,
    // the other found it held.
    assert_eq!(sa.escalated + sb.escalated, 40, "{sa:?} {sb:?}");
    assert_eq!(sa.lock_held + sb.lock_held, 40, "{sa:?} {sb:?}");
    assert!(
        sa.failed.is_empty() && sb.failed.is_empty(),
        "{sa:?} {sb:?}"
    );
}

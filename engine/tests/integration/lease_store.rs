//! The lease primitive (`store::lease`, `lease::Leases`) against a real `redis-server`: slots of a limit,
//! refresh, release, expiry of a holder that stops refreshing (a crashed node), the fail-open guard while
//! Redis is down, and agreement with the memory store.

use std::sync::Arc;
use std::time::Duration;

use voicegate_engine::lease::{Acquired, LeaseConfig, LeaseGuard, Leases};
use voicegate_engine::store::lease::{
    LeaseKey, LeaseOutcome, LeaseStore, MemoryLeaseStore, RedisLeaseStore,
};
use voicegate_engine::store::test_redis::RedisServer;
use voicegate_engine::store::{RedisStore, RedisStoreConfig};
use voicegate_engine::time::{Clock, ManualClock, SystemClock};

const T0: u64 = 1_795_737_600_000;
const TTL: u64 = 30_000;

fn redis() -> (RedisServer, RedisLeaseStore) {
    let server = RedisServer::start().unwrap_or_else(|e| panic!("redis-server: {e}"));
    let store = redis_lease_store(&server);
    (server, store)
}

fn redis_lease_store(server: &RedisServer) -> RedisLeaseStore {
    let config = RedisStoreConfig {
        response_timeout: Duration::from_millis(500),
        connect_timeout: Duration::from_millis(200),
        ..RedisStoreConfig::new(server.url())
    };
    let store = RedisStore::new(&config).unwrap_or_else(|e| panic!("{e}"));
    RedisLeaseStore::new(store.connection())
}

fn sessions(uid: &str) -> LeaseKey {
    LeaseKey::user("listen_session", uid)
}

async fn take(
    store: &dyn LeaseStore,
    key: &LeaseKey,
    holder: &str,
    limit: u32,
    now: u64,
) -> LeaseOutcome {
    store
        .acquire(key, holder, limit, now, TTL)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

fn granted(held: u32, renewed: bool) -> LeaseOutcome {
    LeaseOutcome::Granted { held, renewed }
}

/// The store-level contract, run on both implementations.
async fn slots_of_a_limit(store: &dyn LeaseStore) {
    let u = sessions("u1");
    assert_eq!(take(store, &u, "a", 2, T0).await, granted(1, false));
    assert_eq!(take(store, &u, "b", 2, T0 + 1).await, granted(2, false));
    assert_eq!(
        take(store, &u, "c", 2, T0 + 2).await,
        LeaseOutcome::Refused { held: 2 },
        "the limit is full"
    );
    assert_eq!(
        take(store, &u, "a", 2, T0 + 3).await,
        granted(2, true),
        "a holder refreshing its own slot is never refused nor counted twice"
    );
    assert_eq!(
        take(store, &sessions("u2"), "c", 2, T0 + 4).await,
        granted(1, false),
        "limits are per user"
    );
    let job = LeaseKey::job("sync_job", "u1", "j1");
    assert_eq!(take(store, &job, "a", 1, T0).await, granted(1, false));
    assert_eq!(
        take(store, &job, "b", 1, T0).await,
        LeaseOutcome::Refused { held: 1 }
    );
    assert_eq!(
        take(store, &LeaseKey::job("sync_job", "u1", "j2"), "b", 1, T0).await,
        granted(1, false),
        "per job"
    );

    store
        .release(&u, "b")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    store
        .release(&u, "nobody")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        store.holders(&u, T0 + 5).await.ok(),
        Some(vec!["a".to_owned()])
    );
    assert_eq!(
        take(store, &u, "c", 2, T0 + 5).await,
        granted(2, false),
        "a released slot is free"
    );

    // `b`'s slot was released; `a` refreshed at T0 + 3, `c` took its slot at T0 + 5: at T0 + 3 + TTL `a` has
    // expired (its expiry is not after now) and `c` has not.
    let later = T0 + 3 + TTL;
    assert_eq!(
        store.holders(&u, later).await.ok(),
        Some(vec!["c".to_owned()])
    );
    assert_eq!(take(store, &u, "d", 2, later).await, granted(2, false));
    assert_eq!(
        take(store, &u, "a", 2, later).await,
        LeaseOutcome::Refused { held: 2 }
    );
    assert_eq!(
        store.holders(&u, T0 + 5 + TTL).await.ok(),
        Some(vec!["d".to_owned()])
    );
}

#[tokio::test]
async fn redis_leases_count_slots_per_user_and_job_release_and_expire() {
    let (server, store) = redis();
    slots_of_a_limit(&store).await;
    // One key per limited thing, carrying the user's hash tag, with a TTL backstop.
    let ttl = server
        .command(&["PTTL", "vg:{u1}:lease:listen_session"])
        .unwrap_or_else(|e| panic!("{e}"));
    let ttl: i64 = ttl.trim_start_matches(':').trim().parse().unwrap_or(-9);
    assert!(ttl > 0, "PTTL {ttl}");
}

#[tokio::test]
async fn the_memory_store_has_the_same_lease_semantics() {
    slots_of_a_limit(&MemoryLeaseStore::new()).await;
}

fn leases(store: Arc<dyn LeaseStore>, clock: Arc<dyn Clock>, ttl_ms: u64) -> Leases {
    Leases::start(
        store,
        clock,
        LeaseConfig {
            ttl: Duration::from_millis(ttl_ms),
            timeout: Duration::from_millis(500),
        },
    )
}

fn granted_guard(a: Acquired) -> LeaseGuard {
    match a {
        Acquired::Granted(g) => g,
        other => panic!("expected a granted lease, got {other:?}"),
    }
}

#[tokio::test]
async fn a_crashed_nodes_lease_expires_and_a_refreshed_one_does_not() {
    let (_server, store) = redis();
    let store: Arc<dyn LeaseStore> = Arc::new(store);
    let clock = ManualClock::new(T0);
    let node_a = leases(Arc::clone(&store), clock.clone(), TTL);
    let node_b = leases(Arc::clone(&store), clock.clone(), TTL);
    let key = sessions("crash");

    let held = granted_guard(node_a.acquire(key.clone(), 1).await);
    assert!(held.is_backed());
    // Two thirds of a TTL, a heartbeat, two thirds more: past the first expiry, alive through the refresh.
    clock.advance(20_000);
    node_a.refresh_now().await;
    clock.advance(20_000);
    assert!(matches!(
        node_b.acquire(key.clone(), 1).await,
        Acquired::Refused { held: 1, limit: 1 }
    ));

    // Node A dies: no more heartbeats, no release. Its slot stays until its expiry (T0 + 20 s + TTL)...
    node_a.halt();
    std::mem::forget(held);
    clock.advance(9_999);
    assert!(matches!(
        node_b.acquire(key.clone(), 1).await,
        Acquired::Refused { .. }
    ));
    // ...and not a millisecond longer.
    clock.advance(1);
    let taken = granted_guard(node_b.acquire(key.clone(), 1).await);
    assert_eq!(
        node_b.holders(&key).await.ok(),
        Some(vec![taken.holder().to_owned()])
    );
}

#[tokio::test]
async fn the_heartbeat_keeps_a_lease_past_its_ttl_and_a_dropped_guard_frees_the_slot() {
    let (_server, store) = redis();
    let store: Arc<dyn LeaseStore> = Arc::new(store);
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    // A 900 ms TTL refreshed every 300 ms by the node's own task (600 ms of slack for a busy machine).
    let node_a = leases(Arc::clone(&store), Arc::clone(&clock), 900);
    let node_b = leases(Arc::clone(&store), Arc::clone(&clock), 900);
    let key = sessions("beat");
    let taken_at = clock.now_ms();
    let held = granted_guard(node_a.acquire(key.clone(), 1).await);
    // Wait for heartbeat rounds (an event), until twice the TTL has passed since the acquire.
    let mut rounds = node_a.rounds();
    let waited = tokio::time::timeout(Duration::from_secs(10), async {
        while clock.now_ms() < taken_at + 1_800 {
            let _ = rounds.changed().await;
        }
    })
    .await;
    assert!(waited.is_ok(), "heartbeat rounds stopped");
    assert!(
        matches!(
            node_b.acquire(key.clone(), 1).await,
            Acquired::Refused { .. }
        ),
        "alive {} ms after an acquire with a 900 ms TTL",
        clock.now_ms() - taken_at
    );
    assert!(held.is_backed());
    assert_eq!(node_a.held(), 1);
    drop(held);
    assert_eq!(node_a.held(), 0);
}

#[tokio::test]
async fn a_dropped_guard_gives_its_slot_back_long_before_the_ttl() {
    let (_server, store) = redis();
    let store: Arc<dyn LeaseStore> = Arc::new(store);
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let node_a = leases(Arc::clone(&store), Arc::clone(&clock), 600_000);
    let key = sessions("drop");
    let held = granted_guard(node_a.acquire(key.clone(), 1).await);
    drop(held);
    // The release goes through the heartbeat task: wait for it (a 10-minute TTL cannot be what frees it).
    let freed = tokio::time::timeout(Duration::from_secs(5), async {
        while node_a.holders(&key).await.ok().map(|h| h.is_empty()) != Some(true) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(freed.is_ok(), "the slot was not released");
    assert!(matches!(
        node_a.acquire(key.clone(), 1).await,
        Acquired::Granted(_)
    ));
}

#[tokio::test]
async fn concurrent_acquires_on_two_nodes_never_pass_the_limit() {
    let (_server, store) = redis();
    let store: Arc<dyn LeaseStore> = Arc::new(store);
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let nodes = [
        leases(Arc::clone(&store), Arc::clone(&clock), TTL),
        leases(Arc::clone(&store), Arc::clone(&clock), TTL),
    ];
    let key = sessions("burst");
    let tries = (0..20).map(|i| nodes[i % 2].acquire(key.clone(), 4));
    let results = futures_util::future::join_all(tries).await;
    let granted: Vec<&LeaseGuard> = results
        .iter()
        .filter_map(|a| match a {
            Acquired::Granted(g) => Some(g),
            _ => None,
        })
        .collect();
    assert_eq!(granted.len(), 4);
    let refused = results
        .iter()
        .filter(|a| matches!(a, Acquired::Refused { held: 4, limit: 4 }))
        .count();
    assert_eq!(refused, 16);
    assert_eq!(nodes[0].holders(&key).await.ok().map(|h| h.len()), Some(4));
}

#[tokio::test]
async fn while_redis_is_down_a_lease_is_unavailable_and_its_kept_guard_is_written_once_redis_is_back()
 {
    let (mut server, store) = redis();
    let store: Arc<dyn LeaseStore> = Arc::new(store);
    let clock = ManualClock::new(T0);
    let node = leases(Arc::clone(&store), clock.clone(), TTL);
    let key = sessions("outage");
    server.stop().unwrap_or_else(|e| panic!("{e}"));

    let guard = match node.acquire(key.clone(), 1).await {
        Acquired::Unavailable { guard, .. } => guard,
        other => panic!("expected unavailable, got {other:?}"),
    };
    assert!(!guard.is_backed());
    assert_eq!(node.held(), 1, "kept (fail open): the heartbeat owns it");
    node.refresh_now().await;
    assert!(!guard.is_backed(), "still down");

    server.resume().unwrap_or_else(|e| panic!("{e}"));
    // The connection comes back on use (a reconnect in the background): a few rounds.
    for _ in 0..200 {
        node.refresh_now().await;
        if guard.is_backed() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        guard.is_backed(),
        "the heartbeat wrote the slot once Redis answered"
    );
    assert_eq!(
        node.holders(&key).await.ok(),
        Some(vec![guard.holder().to_owned()])
    );
}

#[tokio::test]
async fn a_lease_that_expired_and_was_taken_meanwhile_is_reported_lost() {
    let (_server, store) = redis();
    let store: Arc<dyn LeaseStore> = Arc::new(store);
    let clock = ManualClock::new(T0);
    let node_a = leases(Arc::clone(&store), clock.clone(), TTL);
    let node_b = leases(Arc::clone(&store), clock.clone(), TTL);
    let key = LeaseKey::job("sync_job", "lost", "job-1");
    let a = granted_guard(node_a.acquire(key.clone(), 1).await);
    // Node A's heartbeat missed a whole TTL (a long stall): the slot expired, node B took it.
    clock.advance(TTL);
    let b = granted_guard(node_b.acquire(key.clone(), 1).await);
    node_a.refresh_now().await;
    assert!(!a.is_backed(), "node A learns it lost the job");
    assert!(b.is_backed());
    assert_eq!(
        node_b.holders(&key).await.ok(),
        Some(vec![b.holder().to_owned()])
    );
}

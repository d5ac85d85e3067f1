//! Two `voicegate serve` processes on one redis-server: a user's listen sessions count against one limit
//! whichever node they reach (leases in the store), a session closed on one node frees its slot for the
//! other, and the sessions of a node killed with SIGKILL stop counting once their leases expire. The limit
//! holds the same way with both nodes on a Redis Cluster (`VOICEGATE_REDIS_CLUSTER_NODES`).

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use tokio::time::Instant;
use voicegate_engine::store::test_redis::{RedisCluster, RedisServer};

use crate::listen_support::{Child, Ws, connect, free_port, wait_ready};

const QUERY: &str = "codec=opus&sample_rate=16000";
const UID: &str = "two-nodes";
/// Node 1's lease TTL (it is the one killed); node 2's is long, so only a release can free its slots.
const NODE1_TTL_S: u64 = 6;
const NODE2_TTL_S: u64 = 600;

fn serve(addr: SocketAddr, redis_url: &str, lease_ttl_s: u64) -> Child {
    serve_on(addr, ("VOICEGATE_REDIS_URL", redis_url), lease_ttl_s)
}

/// `voicegate serve` on `addr` with `store` (`VOICEGATE_REDIS_URL` or `VOICEGATE_REDIS_CLUSTER_NODES`).
fn serve_on(addr: SocketAddr, store: (&str, &str), lease_ttl_s: u64) -> Child {
    let child = Command::new(env!("CARGO_BIN_EXE_voicegate"))
        .arg("serve")
        .env("VOICEGATE_BIND", addr.to_string())
        // Admission by load off: a busy CI machine must not refuse the sessions this test counts.
        .env("VOICEGATE_ADMISSION_CPU_PERCENT", "0")
        .env("VOICEGATE_ADMISSION_LATE_PERCENT", "0")
        .env(store.0, store.1)
        .env("VOICEGATE_WS_SESSIONS_PER_USER", "4")
        .env("VOICEGATE_LEASE_TTL_SECS", lease_ttl_s.to_string())
        .env("VOICEGATE_WORKERS", "1")
        .env("VOICEGATE_LISTEN_THREADS", "1")
        .env("VOICEGATE_STT", "none")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn voicegate: {e}"));
    Child(child)
}

fn addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

async fn open(addr: SocketAddr) -> Result<Ws, u16> {
    connect(addr, Some(UID), QUERY).await
}

/// Opens a session on `addr` as soon as the user has a free slot (at most `limit`); returns how long it took.
async fn open_when_free(addr: SocketAddr, limit: Duration) -> (Ws, Duration) {
    let start = Instant::now();
    loop {
        match open(addr).await {
            Ok(ws) => return (ws, start.elapsed()),
            Err(429) => {}
            Err(status) => panic!("upgrade answered {status}"),
        }
        assert!(
            start.elapsed() < limit,
            "no slot freed within {limit:?} on {addr}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[actix_web::test]
async fn a_fifth_session_is_refused_on_either_node_and_a_killed_nodes_sessions_expire() {
    let redis = RedisServer::start().unwrap_or_else(|e| panic!("redis-server: {e}"));
    let (a1, a2) = (addr(), addr());
    let mut node1 = serve(a1, &redis.url(), NODE1_TTL_S);
    let _node2 = serve(a2, &redis.url(), NODE2_TTL_S);
    wait_ready(a1).await;
    wait_ready(a2).await;

    // Two sessions on each node: the user's limit (4) is full.
    let mut on1 = Vec::new();
    let mut on2 = Vec::new();
    for _ in 0..2 {
        on1.push(open(a1).await.unwrap_or_else(|s| panic!("node 1: {s}")));
        on2.push(open(a2).await.unwrap_or_else(|s| panic!("node 2: {s}")));
    }
    assert_eq!(open(a1).await.err(), Some(429), "fifth session, node 1");
    assert_eq!(open(a2).await.err(), Some(429), "fifth session, node 2");
    let other = connect(a2, Some("someone-else"), QUERY).await;
    assert!(other.is_ok(), "the limit is per user");

    // A session closed on node 2 gives its slot back (node 2's TTL is 10 minutes: only the release frees
    // it), and node 1 admits the user again.
    let mut closing = on2
        .pop()
        .unwrap_or_else(|| panic!("two sessions on node 2"));
    closing
        .close(None)
        .await
        .unwrap_or_else(|e| panic!("close: {e}"));
    let (ws, took) = open_when_free(a1, Duration::from_secs(20)).await;
    on1.push(ws);
    eprintln!("two nodes: a slot released on node 2 was taken on node 1 after {took:?}");
    assert_eq!(open(a2).await.err(), Some(429), "full again: 3 + 1");

    // Node 1 dies holding 3 sessions: their leases still count until they expire (TTL 6 s, refreshed
    // every 2 s), then node 2 admits the user up to the limit again, and no further.
    let killed = Command::new("kill")
        .args(["-KILL", &node1.0.id().to_string()])
        .status();
    assert!(killed.is_ok_and(|s| s.success()), "kill -KILL node 1");
    let _ = node1.0.wait();
    drop(on1);
    assert_eq!(
        open(a2).await.err(),
        Some(429),
        "the dead node's sessions count until their leases expire"
    );
    let (ws, took) = open_when_free(a2, Duration::from_secs(NODE1_TTL_S + 20)).await;
    eprintln!(
        "two nodes: node 1 killed with 3 sessions; node 2 admitted the user after {took:?} (lease TTL {NODE1_TTL_S} s)"
    );
    on2.push(ws);
    // The three leases were refreshed together but the last was taken later: allow its own expiry.
    for _ in 0..2 {
        on2.push(
            open_when_free(a2, Duration::from_secs(NODE1_TTL_S + 20))
                .await
                .0,
        );
    }
    assert_eq!(on2.len(), 4);
    assert_eq!(
        open(a2).await.err(),
        Some(429),
        "the limit holds on the survivor"
    );
}

#[actix_web::test]
async fn on_a_redis_cluster_a_fifth_session_is_refused_on_either_node() {
    let cluster = RedisCluster::start().unwrap_or_else(|e| panic!("redis cluster: {e}"));
    let seeds = cluster.urls()[..3].join(",");
    let (a1, a2) = (addr(), addr());
    let _node1 = serve_on(a1, ("VOICEGATE_REDIS_CLUSTER_NODES", &seeds), NODE2_TTL_S);
    let _node2 = serve_on(a2, ("VOICEGATE_REDIS_CLUSTER_NODES", &seeds), NODE2_TTL_S);
    wait_ready(a1).await;
    wait_ready(a2).await;
    let mut open_ws = Vec::new();
    for _ in 0..2 {
        open_ws.push(open(a1).await.unwrap_or_else(|s| panic!("node 1: {s}")));
        open_ws.push(open(a2).await.unwrap_or_else(|s| panic!("node 2: {s}")));
    }
    assert_eq!(open(a1).await.err(), Some(429), "fifth session, node 1");
    assert_eq!(open(a2).await.err(), Some(429), "fifth session, node 2");
    // The store health check talks to the cluster.
    let ready: serde_json::Value = reqwest::get(format!("http://{a1}/readyz"))
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .json()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ready["store"]["kind"], "redis_cluster", "{ready}");
    assert_eq!(ready["store"]["reachable"], true, "{ready}");
    let mut closing = open_ws.pop().unwrap_or_else(|| panic!("four sessions"));
    closing
        .close(None)
        .await
        .unwrap_or_else(|e| panic!("close: {e}"));
    let (_ws, took) = open_when_free(a1, Duration::from_secs(20)).await;
    eprintln!("cluster: a slot released on node 2 was taken on node 1 after {took:?}");
}

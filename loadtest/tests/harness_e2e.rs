//! The harness against a real server (in process, in-memory store, dev auth on loopback): a short
//! realtime run, a sync run and a mixed run each end with exit code 0 and a JSON report whose accounting
//! check passed, with every frame acknowledged. And against two nodes on one redis-server, then on a
//! 3-master Redis Cluster: a user streams on both nodes and syncs through the other, its status read on
//! either, and the accounting is exact.

use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;
use voicegate_engine::store::test_redis::{RedisCluster, RedisServer};
use voicegate_server::ServeConfig;
use voicegate_server::serve::{ServerBuilder, wire_engine};

/// Starts `voicegate serve` on a free loopback port in a thread of its own; returns its base URL.
/// The thread lives as long as the test process.
fn start_server() -> String {
    start_node(None, Vec::new())
}

/// Starts one node, on `redis_url` or the Redis Cluster of `cluster_nodes` when given (else the
/// in-memory store); returns its base URL.
fn start_node(redis_url: Option<String>, redis_cluster_nodes: Vec<String>) -> String {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        actix_web::rt::System::new().block_on(async move {
            let cfg = ServeConfig {
                bind: "127.0.0.1:0".into(),
                redis_url,
                redis_cluster_nodes,
                ..ServeConfig::default()
            };
            let mut builder = ServerBuilder::new(cfg).unwrap_or_else(|e| panic!("{e}"));
            wire_engine(&mut builder).unwrap_or_else(|e| panic!("{e}"));
            let running = builder.start().unwrap_or_else(|e| panic!("{e}"));
            let _ = tx.send(running.addrs()[0]);
            let _ = running.run_until(std::future::pending::<()>()).await;
        });
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("server did not start: {e}"));
    format!("http://{addr}")
}

/// Runs the harness with `args`; returns its exit code and JSON report.
fn harness(url: &str, args: &[&str]) -> (i32, Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_voicegate-loadtest"))
        .args(["--url", url, "--json", "--quiet", "--settle-secs", "20"])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "no JSON report ({e}); stderr:\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), report)
}

#[test]
fn realtime_sync_and_mixed_runs_pass_their_accounting_check() {
    let url = start_server();

    let (code, r) = harness(
        &url,
        &[
            "realtime",
            "--streams",
            "6",
            "--duration",
            "6",
            "--pace",
            "3",
            "--ramp",
            "0.5",
            // An objective no loopback run misses: the verdict is reported and the run still passes.
            "--max-p99-ms",
            "600000",
        ],
    );
    assert_eq!(code, 0, "{r:#}");
    let rt = &r["realtime"];
    assert_eq!(rt["latency_objective"]["met"], true, "{rt:#}");
    assert_eq!(rt["latency_objective"]["max_p99_ms"], 600000.0, "{rt:#}");
    assert_eq!(rt["streams_held"], 6, "{rt:#}");
    assert_eq!(rt["frames_sent"], 6 * 600, "{rt:#}");
    assert_eq!(rt["frames_acknowledged"], rt["frames_sent"], "{rt:#}");
    assert_eq!(rt["frames_lost"], 0, "{rt:#}");
    assert!(rt["latency"]["count"].as_u64().unwrap_or(0) > 0, "{rt:#}");
    let check = &r["accounting"];
    assert_eq!(check["passed"], true, "{check:#}");
    assert!(check["server_ms"].as_u64().unwrap_or(0) > 0, "{check:#}");

    let (code, r) = harness(&url, &["sync", "--uploaders", "2", "--files", "3"]);
    assert_eq!(code, 0, "{r:#}");
    assert_eq!(r["sync"]["files_ok"], 6, "{r:#}");
    assert_eq!(r["accounting"]["passed"], true, "{r:#}");

    let (code, r) = harness(
        &url,
        &[
            "mixed",
            "--streams",
            "3",
            "--duration",
            "4",
            "--pace",
            "4",
            "--uploaders",
            "2",
            "--files",
            "2",
        ],
    );
    assert_eq!(code, 0, "{r:#}");
    assert_eq!(r["realtime"]["frames_lost"], 0, "{r:#}");
    assert_eq!(r["sync"]["files_ok"], 4, "{r:#}");
    assert_eq!(r["accounting"]["passed"], true, "{r:#}");
}

#[test]
fn a_refused_upgrade_is_an_error_kind_and_a_failing_exit_code() {
    let url = start_server();
    // A codec the server does not serve: every stream is closed with 1008 right after the upgrade.
    let (code, r) = harness(
        &url,
        &[
            "--no-check",
            "realtime",
            "--streams",
            "2",
            "--duration",
            "1",
            "--query",
            "codec=aac",
        ],
    );
    assert_eq!(code, 2, "{r:#}");
    let errors = r["errors"].as_object().cloned().unwrap_or_default();
    assert!(
        errors.keys().any(|k| k.contains("1008")),
        "the 1008 close shows as an error kind: {errors:?}"
    );
}

#[test]
fn a_missed_latency_objective_fails_the_run_with_exit_code_4() {
    let url = start_server();
    // No event arrives within 1 µs of its frame (the server ticks every 50 ms): the objective is missed,
    // while traffic and accounting are fine.
    let (code, r) = harness(
        &url,
        &[
            "realtime",
            "--streams",
            "2",
            "--duration",
            "6",
            "--pace",
            "3",
            "--max-p99-ms",
            "0.001",
        ],
    );
    assert_eq!(code, 4, "{r:#}");
    let rt = &r["realtime"];
    assert_eq!(rt["frames_lost"], 0, "{rt:#}");
    assert_eq!(rt["latency_objective"]["met"], false, "{rt:#}");
    assert!(
        rt["latency_objective"]["p99_ms"].as_f64().unwrap_or(0.0) > 0.001,
        "{rt:#}"
    );
    assert_eq!(r["accounting"]["passed"], true, "{r:#}");
    assert_eq!(r["passed"], false, "{r:#}");
}

#[test]
fn two_nodes_on_one_redis_meter_a_user_spread_over_both_exactly() {
    let redis = RedisServer::start().unwrap_or_else(|e| panic!("redis-server: {e}"));
    let nodes = format!(
        "{},{}",
        start_node(Some(redis.url()), Vec::new()),
        start_node(Some(redis.url()), Vec::new())
    );
    two_nodes_meter_a_user_spread_over_both_exactly(&nodes);
}

#[test]
fn two_nodes_on_a_redis_cluster_meter_a_user_spread_over_both_exactly() {
    let cluster = RedisCluster::start().unwrap_or_else(|e| panic!("redis cluster: {e}"));
    let nodes = format!(
        "{},{}",
        start_node(None, cluster.urls()),
        start_node(None, cluster.urls())
    );
    two_nodes_meter_a_user_spread_over_both_exactly(&nodes);
}

fn two_nodes_meter_a_user_spread_over_both_exactly(nodes: &str) {
    // 4 streams of 2 users, 2 each: each user streams on node 0 and node 1 at once. The 2 uploaders are
    // those users (--shared-users) and upload through the node after their first stream's; the check reads
    // each user's status through another node than its uploads'.
    let (code, r) = harness(
        nodes,
        &[
            "mixed",
            "--shared-users",
            "--streams",
            "4",
            "--streams-per-user",
            "2",
            "--duration",
            "4",
            "--pace",
            "4",
            "--uploaders",
            "2",
            "--files",
            "2",
            "--rounds",
            "2",
        ],
    );
    assert_eq!(code, 0, "{r:#}");
    assert_eq!(r["url"], nodes, "{r:#}");
    assert_eq!(r["realtime"]["streams_held"], 4, "{r:#}");
    assert_eq!(r["realtime"]["frames_lost"], 0, "{r:#}");
    assert_eq!(r["sync"]["files_ok"], 8, "{r:#}");
    let check = &r["accounting"];
    assert_eq!(check["passed"], true, "{check:#}");
    assert_eq!(check["users"], 2, "{check:#}");
    assert_eq!(check["server_ms"], check["reported_ms"], "{check:#}");
    assert!(check["server_ms"].as_u64().unwrap_or(0) > 0, "{check:#}");
}

#[test]
fn a_node_list_with_a_bad_url_is_refused_by_name() {
    let out = Command::new(env!("CARGO_BIN_EXE_voicegate-loadtest"))
        .args(["--url", "http://127.0.0.1:1,127.0.0.1:2", "realtime"])
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("\"127.0.0.1:2\" is not an http"),
        "{stderr}"
    );
}

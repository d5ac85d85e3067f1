//! The harness against a real server (in process, in-memory store, dev auth on loopback): a short
//! realtime run, a sync run and a mixed run each end with exit code 0 and a JSON report whose accounting
//! check passed, with every frame acknowledged. And against two nodes on one redis-server, then on a
//! 3-master Redis Cluster: a user streams on both nodes and syncs through the other, its status read on
//! either, and the accounting is exact. And a retry storm (restricted users over a cap retrying a refused
//! upload) beside streams: every answer is 429 `fair_use_restricted`, and the report has its figures.

use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;
use voicegate_engine::policy::FairUseArgs;
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
    start_with(ServeConfig {
        bind: "127.0.0.1:0".into(),
        redis_url,
        redis_cluster_nodes,
        ..ServeConfig::default()
    })
}

/// Starts a node with `cfg` (bind it to `127.0.0.1:0`); returns its base URL.
fn start_with(cfg: ServeConfig) -> String {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        actix_web::rt::System::new().block_on(async move {
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

    // v2 as the app uses it: every round submitted at once, the jobs polled at the server's 3 s.
    let (code, r) = harness(
        &url,
        &[
            "sync",
            "--v2",
            "--pipeline",
            "--uploaders",
            "2",
            "--files",
            "2",
            "--rounds",
            "3",
        ],
    );
    assert_eq!(code, 0, "{r:#}");
    assert_eq!(r["sync"]["pipeline"], true, "{r:#}");
    assert_eq!(r["sync"]["uploads_ok"], 6, "{r:#}");
    assert_eq!(r["sync"]["files_ok"], 12, "{r:#}");
    assert_eq!(r["sync"]["latency"]["count"], 6, "{r:#}");
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
fn with_retry_refused_a_full_node_sheds_streams_that_come_back_after_retry_after_or_count_as_refused()
 {
    // A node that holds 2 sessions; 4 streams of 2 s start at once.
    let url = start_with(ServeConfig {
        bind: "127.0.0.1:0".into(),
        ws_max_sessions: 2,
        ..ServeConfig::default()
    });
    let run = |window: &str| {
        harness(
            &url,
            &[
                "realtime",
                "--streams",
                "4",
                "--duration",
                "2",
                "--retry-refused",
                window,
            ],
        )
    };
    // Retrying for 30 s: the 2 refused come back after Retry-After (5 s), when the first 2 have ended, and
    // every stream is held and metered exactly.
    let (code, r) = run("30");
    assert_eq!(code, 0, "{r:#}");
    let rt = &r["realtime"];
    assert_eq!(rt["streams_held"], 4, "{rt:#}");
    assert_eq!(rt["streams_refused"], 0, "{rt:#}");
    assert_eq!(rt["streams_admitted_after_refusal"], 2, "{rt:#}");
    assert!(rt["upgrade_refusals"].as_u64().unwrap_or(0) >= 2, "{rt:#}");
    assert_eq!(
        rt["refusal_retry_after_s"],
        serde_json::json!([5, 5]),
        "{rt:#}"
    );
    assert_eq!(r["accounting"]["passed"], true, "{r:#}");
    // Retrying for 3 s, less than the node's Retry-After: the 2 refused are never admitted. They are
    // counted as refused, not as errors, and the run of the 2 admitted passes.
    let (code, r) = run("3");
    assert_eq!(code, 0, "{r:#}");
    let rt = &r["realtime"];
    assert_eq!(rt["streams_held"], 2, "{rt:#}");
    assert_eq!(rt["streams_refused"], 2, "{rt:#}");
    assert_eq!(r["errors"], serde_json::json!({}), "{r:#}");
    assert_eq!(r["accounting"]["passed"], true, "{r:#}");
    // Without --retry-refused a refusal is an error, named by its status and code.
    let (code, r) = harness(&url, &["realtime", "--streams", "4", "--duration", "2"]);
    assert_eq!(code, 2, "{r:#}");
    assert_eq!(r["errors"]["upgrade_http_503_at_capacity"], 2, "{r:#}");
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

const ADMIN_KEY: &str = "storm-admin-key";
/// The storm's cap: one or two fixture files (19 s of speech or so each) take a user over it.
const STORM_CAP_MS: u64 = 20_000;

/// A node with the admin routes on and a 20 s daily speech cap.
fn start_storm_server() -> String {
    start_with(ServeConfig {
        bind: "127.0.0.1:0".into(),
        admin_key: Some(ADMIN_KEY.into()),
        fair_use: FairUseArgs {
            daily_speech_ms: STORM_CAP_MS,
            ..FairUseArgs::default()
        },
        ..ServeConfig::default()
    })
}

#[test]
fn a_retry_storm_beside_streams_is_refused_429_fair_use_restricted_every_time() {
    let url = start_storm_server();
    let pid = std::process::id().to_string();
    // Two storm clients of 50 retries each beside two streams; the server runs in this process, so its
    // CPU is this process's.
    let (code, r) = harness(
        &url,
        &[
            "--admin-key",
            ADMIN_KEY,
            "--server-pid",
            &pid,
            "--retry-storm",
            "50",
            "--storm-clients",
            "2",
            "realtime",
            "--streams",
            "2",
            "--duration",
            "4",
            "--pace",
            "4",
        ],
    );
    assert_eq!(code, 0, "{r:#}");
    let s = &r["storm"];
    assert_eq!(s["clients"], 2, "{s:#}");
    assert_eq!(s["retries_per_client"], 50, "{s:#}");
    assert_eq!(s["answers"], 100, "{s:#}");
    assert_eq!(s["refusals"], 100, "every retry is the refusal: {s:#}");
    assert_eq!(s["other_answers"], serde_json::json!({}), "{s:#}");
    assert_eq!(r["errors"], serde_json::json!({}), "{r:#}");
    assert_eq!(s["latency"]["count"], 100, "{s:#}");
    assert!(
        s["latency"]["p99_ms"].as_f64().unwrap_or(0.0) > 0.0,
        "{s:#}"
    );
    assert!(s["connections"].as_u64().unwrap_or(0) >= 1, "{s:#}");
    assert!(
        s["request_bytes"].as_u64().unwrap_or(0) > 10_000,
        "a real body: {s:#}"
    );
    // The refusing cap lies between the speech before the last accepted arming upload and the speech
    // when refused.
    let (above, at_most) = (
        s["cap_above_ms"].as_u64().unwrap_or(u64::MAX),
        s["cap_at_most_ms"].as_u64().unwrap_or(0),
    );
    assert!(above <= STORM_CAP_MS && STORM_CAP_MS < at_most, "{s:#}");
    assert!(s["first_retry_after_s"].as_u64().unwrap_or(0) > 0, "{s:#}");
    assert!(s["server_cpu_s"].as_f64().unwrap_or(0.0) > 0.0, "{s:#}");
    assert!(
        s["server_cpu_us_per_refusal"].as_f64().unwrap_or(0.0) > 0.0,
        "{s:#}"
    );
    assert!(s["wall_s"].as_f64().unwrap_or(0.0) > 0.0, "{s:#}");
    // The streams held, and the check (storm users included: their arming uploads, never the refused
    // retries) is exact.
    assert_eq!(r["realtime"]["streams_held"], 2, "{r:#}");
    let check = &r["accounting"];
    assert_eq!(check["passed"], true, "{check:#}");
    assert_eq!(check["users"], 4, "{check:#}");
    assert_eq!(check["server_ms"], check["reported_ms"], "{check:#}");
}

#[test]
fn a_retry_storm_alone_reports_its_refusals_in_the_table() {
    let url = start_storm_server();
    let out = Command::new(env!("CARGO_BIN_EXE_voicegate-loadtest"))
        .args([
            "--url",
            &url,
            "--quiet",
            "--no-check",
            "--admin-key",
            ADMIN_KEY,
        ])
        .args(["realtime", "--streams", "0", "--retry-storm", "20"])
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    let table = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{table}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        table.contains("answers 20  429 fair_use_restricted: 20  other 0"),
        "{table}"
    );
    assert!(table.contains("refusal latency"), "{table}");
    assert!(table.contains("server CPU: not measured"), "{table}");
}

#[test]
fn a_retry_storm_without_the_admin_routes_fails_loudly_before_any_traffic() {
    // Admin routes off (no ADMIN_KEY on the server): the storm users cannot be restricted.
    let url = start_server();
    let out = Command::new(env!("CARGO_BIN_EXE_voicegate-loadtest"))
        .args(["--url", &url, "--quiet", "--admin-key", "wrong"])
        .args(["realtime", "--streams", "1", "--retry-storm", "5"])
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(out.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("set-stage restrict") && stderr.contains("answered 403"),
        "{stderr}"
    );
    assert!(
        out.stdout.is_empty(),
        "no report: {}",
        String::from_utf8_lossy(&out.stdout)
    );

    let out = Command::new(env!("CARGO_BIN_EXE_voicegate-loadtest"))
        .args(["--url", &url, "--quiet"])
        .args(["realtime", "--streams", "1", "--retry-storm", "5"])
        .env_remove("ADMIN_KEY")
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(out.status.code(), Some(3));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("needs the server's admin key"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn backdated_uploads_past_the_allowance_are_refused_and_the_metered_ones_check_exactly() {
    // An allowance of 40 s of speech: the first uploads of files named 8-30 days old fit, the rest are
    // refused `backfill_allowance_exhausted` (one of them after its first files fitted).
    let url = start_with(ServeConfig {
        bind: "127.0.0.1:0".into(),
        backfill_allowance_ms: 40_000,
        ..ServeConfig::default()
    });
    let (code, r) = harness(
        &url,
        &[
            "sync",
            "--uploaders",
            "1",
            "--files",
            "3",
            "--rounds",
            "4",
            "--backdate-days",
            "8-30",
        ],
    );
    assert_eq!(code, 0, "{r:#}");
    let sync = &r["sync"];
    assert!(
        sync["uploads_refused_backfill"].as_u64().unwrap_or(0) >= 1,
        "{r:#}"
    );
    let refused = sync["files_refused_backfill"].as_u64().unwrap_or(0);
    let ok = sync["files_ok"].as_u64().unwrap_or(0);
    assert!(refused >= 1 && ok >= 1 && refused + ok == 12, "{r:#}");
    let check = &r["accounting"];
    assert_eq!(check["passed"], true, "{check:#}");
    let metered = check["server_ms"].as_u64().unwrap_or(0);
    assert!(metered > 0 && metered <= 40_000, "{check:#}");
}

/// A TCP proxy in front of a node that the test can cut: every connection through it broken at once and
/// new ones accepted and closed at once for a while, which is what clients see when the node dies.
struct CuttableProxy {
    addr: std::net::SocketAddr,
    state: std::sync::Arc<ProxyState>,
}

#[derive(Default)]
struct ProxyState {
    /// Both ends of every connection, and the bytes each carried towards the node.
    conns: std::sync::Mutex<Vec<(TcpStream, TcpStream, std::sync::Arc<AtomicU64>)>>,
    refuse_until: std::sync::Mutex<Option<std::time::Instant>>,
}

use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};

impl CuttableProxy {
    fn start(upstream: &str) -> Self {
        let upstream: std::net::SocketAddr = upstream
            .trim_start_matches("http://")
            .parse()
            .unwrap_or_else(|e| panic!("{upstream}: {e}"));
        let listener = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let state = std::sync::Arc::new(ProxyState::default());
        let st = state.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let refusing = st
                    .refuse_until
                    .lock()
                    .unwrap()
                    .is_some_and(|t| std::time::Instant::now() < t);
                if refusing {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue;
                };
                let up = std::sync::Arc::new(AtomicU64::new(0));
                let pipe = |mut from: TcpStream,
                            mut to: TcpStream,
                            count: Option<std::sync::Arc<AtomicU64>>| {
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16 * 1024];
                        loop {
                            match std::io::Read::read(&mut from, &mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    if std::io::Write::write_all(&mut to, &buf[..n]).is_err() {
                                        break;
                                    }
                                    if let Some(c) = &count {
                                        c.fetch_add(n as u64, Ordering::Relaxed);
                                    }
                                }
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Both);
                        let _ = from.shutdown(std::net::Shutdown::Both);
                    });
                };
                let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
                    continue;
                };
                pipe(c2, s2, Some(up.clone()));
                let (Ok(c3), Ok(s3)) = (client.try_clone(), server.try_clone()) else {
                    continue;
                };
                pipe(s3, c3, None);
                st.conns.lock().unwrap().push((client, server, up));
            }
        });
        CuttableProxy { addr, state }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Connections that carried at least `bytes` towards the node.
    fn busy_connections(&self, bytes: u64) -> usize {
        let conns = self.state.conns.lock().unwrap();
        conns
            .iter()
            .filter(|(_, _, up)| up.load(Ordering::Relaxed) >= bytes)
            .count()
    }

    /// Breaks every connection now, and closes new ones for `refuse`.
    fn cut(&self, refuse: Duration) {
        *self.state.refuse_until.lock().unwrap() = Some(std::time::Instant::now() + refuse);
        for (c, s, _) in self.state.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

#[test]
fn streams_and_uploads_survive_a_lost_node_and_the_check_judges_the_loss() {
    // Clients see the node vanish (every connection broken, new ones closed for 2.5 s): streams reconnect
    // and go on in a new session, uploads with no answer are sent again, and the node-loss check finds
    // nothing doubled and no more lost than the bound. (Behind the proxy the node itself lives on and
    // meters what reached it, so what is lost is only what was in flight.)
    let node = start_server();
    let proxy = CuttableProxy::start(&node);
    let child = Command::new(env!("CARGO_BIN_EXE_voicegate-loadtest"))
        .args([
            "--url",
            &proxy.url(),
            "--json",
            "--quiet",
            "--settle-secs",
            "20",
        ])
        .args([
            "--survive-node-loss",
            "mixed",
            "--streams",
            "4",
            "--duration",
            "10",
        ])
        .args([
            "--uploaders",
            "2",
            "--files",
            "2",
            "--rounds",
            "6",
            "--round-interval",
            "2",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    // The event to cut on: four streams that have each carried about 2 s of audio to the node.
    let waited = std::time::Instant::now();
    while proxy.busy_connections(12_000) < 4 {
        assert!(
            waited.elapsed() < Duration::from_secs(60),
            "the streams never got going"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    proxy.cut(Duration::from_millis(2_500));
    let out = child.wait_with_output().unwrap_or_else(|e| panic!("{e}"));
    let r: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "no JSON report ({e}); stderr:\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(out.status.code(), Some(0), "{r:#}");
    let rt = &r["realtime"];
    assert_eq!(
        rt["frames_sent"],
        4 * 1_000,
        "every stream sent all its audio: {rt:#}"
    );
    assert!(rt["sessions_broken"].as_u64().unwrap_or(0) >= 4, "{rt:#}");
    assert!(
        rt["reconnect_attempts"].as_u64().unwrap_or(0) >= 1,
        "refused while cut: {rt:#}"
    );
    assert_eq!(rt["streams_held"], 4, "{rt:#}");
    let sync = &r["sync"];
    assert_eq!(
        sync["files_ok"],
        2 * 2 * 6,
        "every upload answered in the end: {sync:#}"
    );
    assert!(
        sync["uploads_resent"].as_u64().unwrap_or(0) >= 1,
        "{sync:#}"
    );
    let check = &r["accounting"];
    assert_eq!(check["passed"], true, "{check:#}");
    let loss = &check["node_loss"];
    assert_eq!(loss["doubled_ms"], 0, "{loss:#}");
    assert_eq!(loss["files_unanswered"], 0, "{loss:#}");
    let lost = loss["lost_ms"].as_u64().unwrap_or(u64::MAX);
    assert!(
        lost <= loss["lost_bound_ms"].as_u64().unwrap_or(0),
        "{loss:#}"
    );
    assert!(check["server_ms"].as_u64().unwrap_or(0) > 0, "{check:#}");
}

#[test]
fn with_the_local_engine_the_audio_its_provider_received_equals_what_sessions_were_charged() {
    if let Some(why) = voicegate_engine::stt::local::ffi::cpu_unsupported() {
        eprintln!("NOT RUN on this machine: {why}");
        return;
    }
    let url = start_with(ServeConfig {
        bind: "127.0.0.1:0".into(),
        stt: Some("local".into()),
        ..ServeConfig::default()
    });
    let (code, r) = harness(
        &url,
        &[
            "realtime",
            "--streams",
            "3",
            "--duration",
            "8",
            "--pace",
            "2",
            "--check-stt",
        ],
    );
    assert_eq!(code, 0, "{r:#}");
    let stt = &r["stt"];
    assert_eq!(stt["passed"], true, "{stt:#}");
    assert_eq!(stt["sessions"], 3, "{stt:#}");
    let told = stt["told_ms"].as_u64().unwrap_or(0);
    assert!(told > 3_000, "speech was sent to the engine: {stt:#}");
    assert!(
        r["realtime"]["transcript_segments"].as_u64().unwrap_or(0) >= 3,
        "the words came back: {r:#}"
    );
    assert_eq!(r["accounting"]["passed"], true, "{r:#}");
}

/// Overloaded (one worker, one place in its queue, six streams at 4x): most of the speech finds no place
/// and is refused as it is handed over; none of it is charged, so what the engine received still equals
/// what the sessions were charged, and what fell behind is reported.
#[test]
fn with_the_local_engine_overloaded_the_refused_audio_is_not_charged_and_the_check_stays_exact() {
    if let Some(why) = voicegate_engine::stt::local::ffi::cpu_unsupported() {
        eprintln!("NOT RUN on this machine: {why}");
        return;
    }
    let url = start_with(ServeConfig {
        bind: "127.0.0.1:0".into(),
        stt: Some("local".into()),
        stt_local_queue_chunks: 1,
        ..ServeConfig::default()
    });
    let (code, r) = harness(
        &url,
        &[
            "realtime",
            "--streams",
            "6",
            "--duration",
            "8",
            "--pace",
            "4",
            "--check-stt",
        ],
    );
    assert_eq!(code, 0, "{r:#}");
    let stt = &r["stt"];
    assert_eq!(stt["passed"], true, "{stt:#}");
    assert_eq!(stt["sessions"], 6, "{stt:#}");
    assert!(
        stt["dropped_ms"].as_f64().unwrap_or(0.0) > 1_000.0,
        "the engine could not keep up, so audio was refused: {stt:#}"
    );
    assert!(stt["told_ms"].as_u64().unwrap_or(0) > 1_000, "{stt:#}");
    assert_eq!(r["accounting"]["passed"], true, "{r:#}");
}

/// `deepgram-double` (the standalone Deepgram protocol double `measure.sh` starts for load runs) serving
/// `VOICEGATE_STT=deepgram`: every session opens a stream on it, sends `Finalize` and `CloseStream`, and
/// the audio the double received equals what the server forwarded and what the sessions were charged.
#[test]
fn with_deepgram_against_the_standalone_double_the_audio_it_received_equals_the_charge() {
    use std::io::{BufRead, BufReader, Read};
    let mut double = Command::new(env!("CARGO_BIN_EXE_deepgram-double"))
        .args(["--bind", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    // Its first line says where it listens, once it does.
    let mut line = String::new();
    // Kept open until the double has stopped: it may still write to it.
    let mut stderr = BufReader::new(double.stderr.take().unwrap_or_else(|| panic!("no stderr")));
    stderr
        .read_line(&mut line)
        .unwrap_or_else(|e| panic!("{e}"));
    let ws = line
        .trim()
        .rsplit(' ')
        .next()
        .unwrap_or_default()
        .to_string();
    assert!(ws.starts_with("ws://127.0.0.1:"), "{line}");
    let mut cfg = ServeConfig {
        bind: "127.0.0.1:0".into(),
        stt: Some("deepgram".into()),
        ..ServeConfig::default()
    };
    cfg.deepgram.url = ws;
    cfg.deepgram.api_key = Some("load-test-placeholder-key".into());
    let url = start_with(cfg);
    let (code, r) = harness(
        &url,
        &[
            "realtime",
            "--streams",
            "3",
            "--duration",
            "8",
            "--pace",
            "2",
            "--check-stt",
        ],
    );
    let stopped = Command::new("kill")
        .args(["-TERM", &double.id().to_string()])
        .status()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(stopped.success());
    let mut out = String::new();
    double
        .stdout
        .take()
        .unwrap_or_else(|| panic!("no stdout"))
        .read_to_string(&mut out)
        .unwrap_or_else(|e| panic!("{e}"));
    let _ = double.wait();
    drop(stderr);
    assert_eq!(code, 0, "{r:#}");
    let stt = &r["stt"];
    assert_eq!(stt["passed"], true, "{stt:#}");
    let told = stt["told_ms"].as_u64().unwrap_or(0);
    assert!(told > 3_000, "speech was sent: {stt:#}");
    let seen: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(seen["connections"], 3, "{seen}");
    assert_eq!(seen["close_streams"], 3, "{seen}");
    assert!(seen["finalizes"].as_u64().unwrap_or(0) >= 3, "{seen}");
    let samples = seen["samples"].as_u64().unwrap_or(0);
    assert!(
        samples.abs_diff(told * 16) <= 3 * 16,
        "the double received {samples} samples, the sessions were charged {told} ms"
    );
    assert!(
        r["realtime"]["transcript_segments"].as_u64().unwrap_or(0) >= 3,
        "the double's words came back: {r:#}"
    );
}

#[test]
fn check_stt_is_refused_beside_sync() {
    let out = Command::new(env!("CARGO_BIN_EXE_voicegate-loadtest"))
        .args([
            "--url",
            "http://127.0.0.1:9",
            "mixed",
            "--check-stt",
            "--streams",
            "1",
        ])
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(out.status.code(), Some(3));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--check-stt needs the realtime scenario"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

//! Admission control by load (`VOICEGATE_ADMISSION_*`, docs/operations.md "Admission control"), end to end
//! on a real server: a node whose sessions run late, or whose CPU is past the capacity it measured from
//! itself, answers new upgrades `503 at_capacity` (with `reason`, `Retry-After`, `retryable: true`) while the
//! session it already admitted goes on to its `metadata`; a node that has not measured its capacity yet
//! admits at most its ramp of new sessions a second; refusals are counted by reason and the gauges the
//! decision reads are exported.

use crate::common;
use crate::listen_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::engine_server::{EngineServer, fair_use_on};
use common::refusal::Reply;
use listen_support::{connect, connect_or_refusal, fixture_packets, stream_packets};
use tokio::time::Instant;
use voicegate_server::config::AdmissionArgs;

/// Longest wait for the node to start refusing (its decision is renewed every second).
const REFUSAL_LIMIT: Duration = Duration::from_secs(20);

/// Asks for new sessions (each admitted one is closed at once; a new user each time, so the per-user limit
/// never answers first) until one is refused; returns the refusal.
async fn first_refusal(server: &EngineServer, uid: &str) -> Reply {
    let deadline = Instant::now() + REFUSAL_LIMIT;
    for n in 0.. {
        let uid = format!("{uid}-{n}");
        match connect_or_refusal(server.addr, Some(&uid), "codec=opus").await {
            Err(refusal) => return refusal,
            Ok(ws) => drop(ws),
        }
        assert!(
            Instant::now() < deadline,
            "the node never refused a session"
        );
        // The node renews its decision every second; ask a few times per renewal.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    unreachable!("the loop returns or panics")
}

/// A thread of this process that burns CPU until dropped (also when the test fails).
struct Burner {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Burner {
    fn start() -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::spawn({
            let stop = Arc::clone(&stop);
            move || {
                let mut x = 1u64;
                while !stop.load(Ordering::Relaxed) {
                    x = std::hint::black_box(
                        x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1),
                    );
                }
            }
        });
        Burner {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Burner {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn refused_count(metrics: &str, reason: &str) -> f64 {
    let prefix = format!("voicegate_listen_sessions_refused_total{{reason=\"{reason}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

#[actix_web::test]
async fn late_sessions_make_the_node_refuse_new_ones_while_the_admitted_one_finishes() {
    // Every session-second counts as late (objective 0 ms), one is enough: the tick-lag rule trips as
    // soon as the first session has run a second.
    let server = EngineServer::start(fair_use_on(), |c| {
        c.admission = AdmissionArgs {
            cpu_percent: 0,
            lag_ms: 0,
            late_percent: 1.0,
            window_secs: 2,
            min_sessions: 1,
            ramp_per_sec: 0,
        };
    })
    .await;
    let packets = fixture_packets("d01");
    let frames = packets.len().min(400);
    let first = connect(server.addr, Some("admitted"), "codec=opus")
        .await
        .unwrap_or_else(|status| panic!("the first session was refused: {status}"));
    let streaming = tokio::spawn(async move { stream_packets(first, &packets[..frames], 1).await });

    let refusal = first_refusal(&server, "newcomer").await;
    assert_eq!(refusal.status, 503, "{:?}", refusal.body);
    assert_eq!(refusal.assert_refusal("overloaded upgrade"), Some(5));
    assert_eq!(refusal.body["code"], "at_capacity", "{}", refusal.body);
    assert_eq!(refusal.body["reason"], "tick_lag", "{}", refusal.body);
    let message = refusal.body["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("VOICEGATE_ADMISSION_LATE_PERCENT"),
        "{message}"
    );

    // The admitted session is not touched: every frame it sent is received and metered.
    let (seen, _) = streaming.await.unwrap();
    let metadata = seen.metadata();
    assert_eq!(metadata["frames_received"], frames as u64, "{metadata}");
    assert_eq!(metadata["frames_dropped"], 0, "{metadata}");

    let metrics = server.metrics_text().await;
    assert!(refused_count(&metrics, "tick_lag") >= 1.0, "{metrics}");
    assert_eq!(refused_count(&metrics, "cpu"), 0.0);
    assert!(
        metrics
            .lines()
            .any(|l| l == "voicegate_listen_late_session_seconds_ratio 1"),
        "{metrics}"
    );
    server.shutdown().await;
}

#[actix_web::test]
async fn cpu_past_the_capacity_the_node_measured_refuses_with_reason_cpu() {
    // Sessions may use 1 % of the cores; a thread of this process then burns CPU (the server counts its
    // whole process, as it would a busy node): the capacity it measures falls below the one open session.
    let server = EngineServer::start(fair_use_on(), |c| {
        c.admission = AdmissionArgs {
            cpu_percent: 1,
            late_percent: 0.0,
            window_secs: 2,
            min_sessions: 1,
            ..AdmissionArgs::on()
        };
    })
    .await;
    let holder = connect(server.addr, Some("holder"), "codec=opus")
        .await
        .unwrap_or_else(|status| panic!("the first session was refused: {status}"));
    let burner = Burner::start();
    let refusal = first_refusal(&server, "newcomer").await;
    drop(burner);
    assert_eq!(refusal.status, 503, "{:?}", refusal.body);
    assert_eq!(refusal.assert_refusal("overloaded upgrade"), Some(5));
    assert_eq!(refusal.body["code"], "at_capacity", "{}", refusal.body);
    assert_eq!(refusal.body["reason"], "cpu", "{}", refusal.body);
    let message = refusal.body["message"].as_str().unwrap_or_default();
    assert!(message.contains("at 1 % of its CPU"), "{message}");

    let metrics = server.metrics_text().await;
    assert!(refused_count(&metrics, "cpu") >= 1.0, "{metrics}");
    let utilisation = metrics
        .lines()
        .find_map(|l| l.strip_prefix("voicegate_node_cpu_utilisation_ratio "))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no utilisation gauge: {metrics}"));
    assert!(utilisation > 0.0 && utilisation <= 1.5, "{utilisation}");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("voicegate_listen_capacity_sessions ")),
        "{metrics}"
    );
    drop(holder);
    server.shutdown().await;
}

#[actix_web::test]
async fn before_the_capacity_is_measured_the_ramp_caps_new_sessions_a_second() {
    // The CPU rule on, but never enough sessions to measure (1,000): the ramp of 2 a second applies. The
    // helper asks 10 times a second, so a third session within one second is refused.
    let server = EngineServer::start(fair_use_on(), |c| {
        c.admission = AdmissionArgs {
            late_percent: 0.0,
            min_sessions: 1_000,
            ramp_per_sec: 2,
            ..AdmissionArgs::on()
        };
    })
    .await;
    let refusal = first_refusal(&server, "storm").await;
    assert_eq!(refusal.status, 503, "{:?}", refusal.body);
    assert_eq!(refusal.assert_refusal("ramped upgrade"), Some(5));
    assert_eq!(refusal.body["code"], "at_capacity", "{}", refusal.body);
    assert_eq!(refusal.body["reason"], "ramp", "{}", refusal.body);
    let message = refusal.body["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("at most 2 new listen sessions a second")
            && message.contains("VOICEGATE_ADMISSION_RAMP_PER_SEC"),
        "{message}"
    );
    let metrics = server.metrics_text().await;
    assert!(refused_count(&metrics, "ramp") >= 1.0, "{metrics}");
    assert_eq!(
        refused_count(&metrics, "cpu"),
        0.0,
        "the capacity is unknown"
    );
    server.shutdown().await;
}

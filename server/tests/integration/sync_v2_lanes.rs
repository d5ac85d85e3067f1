//! Sync v2 lanes and fairness (issue #15), deterministic: the test holds user A's conversation writes on a
//! gate it controls, so A's first backfill job is stuck in its `processing` stage. User A queues 200
//! backdated files in 4 uploads of 50; user B then uploads 2 fresh files: B's job runs on the fresh
//! worker and completes while A has not one file settled. Released, A's backfill meets its daily
//! allowance: what does not fit is deferred, and the job's status says until when (the next UTC midnight).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::watch;

use crate::common;

use common::engine_server::{EngineServer, fair_use_on, fixtures, now_s, omi_name};
use common::gated::Gated;

const DAY_MS: u64 = 86_400_000;

/// `n` distinct device files (fixtures concatenated three at a time), recorded `ago_s` before now, a
/// minute apart.
fn files(n: usize, ago_s: u64, seed: usize) -> Vec<(String, Vec<u8>)> {
    let fx: Vec<Vec<u8>> = fixtures().into_iter().map(|(_, b)| b).collect();
    let k = fx.len();
    (0..n)
        .map(|j| {
            let i = seed + j;
            let bytes: Vec<u8> = [i % k, (i / k) % k, (i / (k * k)) % k]
                .iter()
                .flat_map(|&x| fx[x].iter().copied())
                .collect();
            (omi_name(ago_s - 60 * j as u64), bytes)
        })
        .collect()
}

async fn job(server: &EngineServer, uid: &str, id: &str) -> Value {
    let (code, job) = server.get(&format!("/v2/sync-local-files/{id}"), uid).await;
    assert_eq!(code, 200, "{job}");
    job
}

async fn submit(server: &EngineServer, uid: &str, files: &[(String, Vec<u8>)]) -> String {
    let (code, accepted, _) = server.post_files("/v2/sync-local-files", uid, files).await;
    assert_eq!(code, 202, "{accepted}");
    accepted["job_id"].as_str().unwrap().to_owned()
}

/// Polls (as a client) until `done`; at most 60 s.
async fn until(server: &EngineServer, uid: &str, id: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let j = job(server, uid, id).await;
        if done(&j) {
            return j;
        }
        assert!(Instant::now() < deadline, "stuck: {j}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[actix_web::test]
async fn fresh_uploads_pass_a_backlog_of_backfill_and_backfill_waits_for_its_allowance() {
    const ALLOWANCE_MS: u64 = 10 * 60_000;
    let spool = tempfile::tempdir().unwrap();
    let spool_dir = spool.path().to_path_buf();
    let (gate, open) = watch::channel(false);
    let server = EngineServer::start_with(
        fair_use_on(),
        move |c| {
            c.sync_jobs.spool_dir = Some(spool_dir);
            c.sync_jobs.workers = 2;
            c.sync_jobs.backfill_workers = 1;
            c.backfill_allowance_ms = ALLOWANCE_MS;
        },
        move |engine| {
            engine.conversations = Arc::new(Gated {
                inner: Arc::clone(&engine.conversations),
                uid: "backfiller",
                open,
            });
        },
    )
    .await;

    // B's solo latency first (another user, the same kind of upload).
    let fresh = files(2, 3_600, 0);
    let t = Instant::now();
    let solo = submit(&server, "solo", &fresh).await;
    until(&server, "solo", &solo, |j| j["status"] == "completed").await;
    let solo_latency = t.elapsed();

    // A: 200 files recorded 2 to 3 days ago, in 4 uploads of 50 (the per-request limit is 64).
    let mut a_jobs = Vec::new();
    for u in 0..4 {
        let batch = files(50, 3 * 86_400 - 3_000 * u as u64, 100 + 50 * u);
        a_jobs.push(submit(&server, "backfiller", &batch).await);
    }
    // A's first job reaches its conversation writes and is held there.
    let first = until(&server, "backfiller", &a_jobs[0], |j| {
        j["stage"] == "processing"
    })
    .await;
    assert_eq!(first["lanes"]["sync_backfill"]["files"], 50, "{first}");

    // B: 2 fresh files, another pair of contents.
    let fresh_b = files(2, 3_600, 2);
    let t = Instant::now();
    let b = submit(&server, "fresh-user", &fresh_b).await;
    let done = until(&server, "fresh-user", &b, |j| {
        j["status"] != "queued" && j["status"] != "running"
    })
    .await;
    let b_latency = t.elapsed();
    assert_eq!(done["status"], "completed", "{done}");
    // Not one of A's files is settled yet: B passed the whole backlog.
    for id in &a_jobs {
        let j = job(&server, "backfiller", id).await;
        assert_eq!(j["processed_files"], 0, "{j}");
    }
    // Only one of A's jobs runs (backfill: one job per user, one worker of two).
    let running: Vec<Value> = {
        let mut v = Vec::new();
        for id in &a_jobs {
            v.push(job(&server, "backfiller", id).await["status"].clone());
        }
        v
    };
    assert_eq!(
        running.iter().filter(|s| *s == "running").count(),
        1,
        "{running:?}"
    );
    println!(
        "B's 2 fresh files: {} ms behind A's 200 backdated files (solo: {} ms)",
        b_latency.as_millis(),
        solo_latency.as_millis()
    );

    // Released: A's first job settles what fits today's allowance and defers the rest to the next UTC
    // midnight.
    let _ = gate.send(true);
    let deferred = until(&server, "backfiller", &a_jobs[0], |j| {
        j["status"] == "queued" && !j["resumes_at_ms"].is_null()
    })
    .await;
    let midnight = (now_s() * 1000 / DAY_MS + 1) * DAY_MS;
    assert_eq!(deferred["resumes_at_ms"], midnight, "{deferred}");
    let lane = &deferred["lanes"]["sync_backfill"];
    assert!(lane["deferred"].as_u64().unwrap() > 0, "{deferred}");
    assert!(lane["done"].as_u64().unwrap() > 0, "{deferred}");
    let weekly = server.status_speech_ms("backfiller").await["weekly_ms"]
        .as_u64()
        .unwrap();
    assert!(
        weekly > 0 && weekly <= ALLOWANCE_MS,
        "backfill metered {weekly} ms, allowance {ALLOWANCE_MS}"
    );
    println!(
        "A's first job after the release: {} files settled, {} deferred to {midnight}; {weekly} ms metered of a {ALLOWANCE_MS} ms allowance",
        lane["done"], lane["deferred"]
    );
    server.shutdown().await;
}

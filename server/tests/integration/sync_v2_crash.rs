//! Sync v2 crash test (issue #15): `kill -9` of the real `voicegate serve` while a 20-file job runs; the job
//! resumes (on the restarted node, or on a second node sharing Redis and the spool) and completes with the
//! speech metered exactly (not one ms lost or doubled) and no conversation duplicated: the same
//! conversations as v1 makes of the same files.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::engine_server::{fixtures, multipart, now_s, offline_speech_ms, split};
use crate::listen_support::{Child, free_port, wait_ready};
use serde_json::Value;
use tokio::time::Instant;
use voicegate_engine::store::test_redis::RedisServer;

const FILES: usize = 20;

/// With `openai`: transcription through the OpenAI-compatible double at that base URL.
fn spawn_with(
    addr: SocketAddr,
    redis: &str,
    spool: &std::path::Path,
    openai: Option<&str>,
) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_voicegate"));
    match openai {
        Some(url) => cmd
            .env("VOICEGATE_STT", "openai")
            .env("VOICEGATE_OPENAI_BASE_URL", url)
            .env("OPENAI_API_KEY", "sk-test-openai-key"),
        None => cmd.env("VOICEGATE_STT", "none"),
    };
    let child = cmd
        .arg("serve")
        .env("VOICEGATE_BIND", addr.to_string())
        .env("VOICEGATE_REDIS_URL", redis)
        .env("VOICEGATE_SYNC_SPOOL_DIR", spool)
        // A dead node's job lease expires within this: the survivor (or the restart) resumes it then.
        .env("VOICEGATE_LEASE_TTL_SECS", "3")
        .env("VOICEGATE_SYNC_WORKERS", "1")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn voicegate: {e}"));
    Child(child)
}

async fn start(redis: &str, spool: &std::path::Path) -> (Child, SocketAddr) {
    start_with(redis, spool, None).await
}

async fn start_with(
    redis: &str,
    spool: &std::path::Path,
    openai: Option<&str>,
) -> (Child, SocketAddr) {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let child = spawn_with(addr, redis, spool, openai);
    wait_ready(addr).await;
    (child, addr)
}

/// 20 distinct device files of 3 to 3.5 minutes each (the fixtures' records concatenated in rotated
/// orders: the container is a plain sequence of length-prefixed packets), a minute apart, an hour ago.
fn files() -> Vec<(String, Vec<u8>)> {
    let fx: Vec<Vec<u8>> = fixtures().into_iter().map(|(_, b)| b).collect();
    (0..FILES)
        .map(|i| {
            let parts = if i < fx.len() { 6 } else { 7 };
            let bytes: Vec<u8> = (0..parts)
                .flat_map(|k| fx[(i + k) % fx.len()].iter().copied())
                .collect();
            let name = format!(
                "audio_omi_opus_16000_1_fs160_{}.bin",
                now_s() - 3_600 + 60 * i as u64
            );
            (name, bytes)
        })
        .collect()
}

async fn post(
    addr: SocketAddr,
    path: &str,
    uid: &str,
    files: &[(String, Vec<u8>)],
) -> (u16, Value) {
    let (ctype, body) = multipart(files);
    let resp = reqwest::Client::new()
        .post(format!("http://{addr}{path}"))
        .bearer_auth(uid)
        .header("content-type", ctype)
        .body(body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {path}: {e}"));
    split(resp).await
}

async fn get(addr: SocketAddr, path: &str, uid: &str) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .get(format!("http://{addr}{path}"))
        .bearer_auth(uid)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    split(resp).await
}

/// Polls the job (as its client does) until `done` says so; at most 90 s.
async fn poll_until(
    addr: SocketAddr,
    uid: &str,
    job_id: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let (code, job) = get(addr, &format!("/v2/sync-local-files/{job_id}"), uid).await;
        assert_eq!(code, 200, "{job}");
        if done(&job) {
            return job;
        }
        assert!(Instant::now() < deadline, "job stuck: {job}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn terminal(job: &Value) -> bool {
    ["completed", "partial_failure", "failed"].contains(&job["status"].as_str().unwrap_or(""))
}

/// The user's conversations as (start, end), sorted.
async fn conversations(addr: SocketAddr, uid: &str) -> Vec<(u64, u64)> {
    let (code, list) = get(addr, "/v1/conversations?limit=200", uid).await;
    assert_eq!(code, 200, "{list}");
    let mut out: Vec<(u64, u64)> = list["conversations"]
        .as_array()
        .unwrap_or_else(|| panic!("{list}"))
        .iter()
        .map(|c| {
            (
                c["started_at_ms"].as_u64().unwrap_or(0),
                c["finished_at_ms"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    out.sort();
    out
}

/// Mid-job: at least 2 files decoded, or settling (metering, conversations) under way.
fn mid_job(j: &Value) -> bool {
    terminal(j) || j["decoded_files"].as_u64().unwrap_or(0) >= 2 || j["stage"] == "processing"
}

/// Submits the job to `first`, SIGKILLs `first` mid-job, and returns the job id and its status then.
async fn submit_and_kill(
    first: &mut Child,
    addr: SocketAddr,
    uid: &str,
    files: &[(String, Vec<u8>)],
) -> (String, Value) {
    let (code, accepted) = post(addr, "/v2/sync-local-files", uid, files).await;
    assert_eq!(code, 202, "{accepted}");
    let job_id = accepted["job_id"].as_str().unwrap().to_owned();
    let running = poll_until(addr, uid, &job_id, mid_job).await;
    assert_eq!(
        running["status"], "running",
        "the job ended before the kill: {running}"
    );
    let _ = first.0.kill(); // SIGKILL
    let _ = first.0.wait();
    println!(
        "killed the node running job {job_id} at stage {} with {} of {FILES} files decoded",
        running["stage"], running["decoded_files"]
    );
    (job_id, running)
}

/// The finished job against the truth: `voicegate analyze`'s speech, metered exactly once, and the
/// conversations v1 makes of the same files (uploaded for `reference_uid`).
async fn check(
    addr: SocketAddr,
    uid: &str,
    job: &Value,
    expected: u64,
    reference_uid: &str,
    files: &[(String, Vec<u8>)],
) {
    assert_eq!(job["status"], "completed", "{job}");
    assert_eq!(job["processed_files"], FILES as u64, "{job}");
    assert!(job["attempts"].as_u64().unwrap_or(0) >= 2, "{job}");
    assert_eq!(job["result"]["speech_ms"], expected, "{job}");
    let (code, status) = get(addr, "/v1/fair-use/status", uid).await;
    assert_eq!(code, 200);
    assert_eq!(
        status["speech_ms"]["weekly_ms"], expected,
        "metered: {status}"
    );
    let (code, v1) = post(addr, "/v1/sync-local-files", reference_uid, files).await;
    assert_eq!(code, 200, "{v1}");
    assert_eq!(v1["speech_ms"], expected);
    let mine = conversations(addr, uid).await;
    assert!(!mine.is_empty());
    assert_eq!(
        mine,
        conversations(addr, reference_uid).await,
        "conversations differ from v1's"
    );
    println!(
        "job {}: {} ms of speech metered (analyze: {expected}), {} conversations as v1, attempts {}",
        job["job_id"],
        status["speech_ms"]["weekly_ms"],
        mine.len(),
        job["attempts"]
    );
}

#[actix_web::test]
async fn a_job_resumes_after_kill_9_on_the_restarted_node_and_on_another_node() {
    let redis = RedisServer::start().expect("redis-server");
    let spool = tempfile::tempdir().unwrap();
    let files = files();
    let expected: u64 = files.iter().map(|(n, b)| offline_speech_ms(n, b)).sum();
    println!("{FILES} files, {expected} ms of speech by the offline pipeline");

    // 1. The node restarts and resumes its own job.
    let (mut a, addr_a) = start(&redis.url(), spool.path()).await;
    let (job_id, _) = submit_and_kill(&mut a, addr_a, "crash-user", &files).await;
    let (a2, addr_a2) = start(&redis.url(), spool.path()).await;
    let job = poll_until(addr_a2, "crash-user", &job_id, terminal).await;
    check(addr_a2, "crash-user", &job, expected, "reference-1", &files).await;
    assert!(!spool.path().join(&job_id).exists(), "spool folder left");

    // 2. Two nodes: the one running the job dies, the other finishes it. Only B is up when the job is
    //    submitted (so B, not a poller on another node, runs it); C joins while B runs it.
    drop(a2);
    let (mut b, addr_b) = start(&redis.url(), spool.path()).await;
    let (code, accepted) = post(addr_b, "/v2/sync-local-files", "two-node-user", &files).await;
    assert_eq!(code, 202, "{accepted}");
    let job_id = accepted["job_id"].as_str().unwrap().to_owned();
    let (_c, addr_c) = start(&redis.url(), spool.path()).await;
    let running = poll_until(addr_c, "two-node-user", &job_id, mid_job).await;
    assert_eq!(running["status"], "running", "{running}");
    assert_eq!(running["attempts"], 1, "{running}");
    let _ = b.0.kill();
    let _ = b.0.wait();
    let job = poll_until(addr_c, "two-node-user", &job_id, terminal).await;
    check(
        addr_c,
        "two-node-user",
        &job,
        expected,
        "reference-2",
        &files,
    )
    .await;
}

/// The transcript segment ids of each of the user's conversations, by conversation start.
async fn segments(addr: SocketAddr, uid: &str) -> Vec<(u64, Vec<String>)> {
    let (_, list) = get(addr, "/v1/conversations?limit=200", uid).await;
    let mut out = Vec::new();
    for c in list["conversations"]
        .as_array()
        .cloned()
        .unwrap_or_default()
    {
        let id = c["id"].as_str().unwrap_or_default();
        let (code, conv) = get(addr, &format!("/v1/conversations/{id}"), uid).await;
        assert_eq!(code, 200, "{conv}");
        let mut ids: Vec<String> = conv["transcript_segments"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|s| s["id"].as_str().unwrap_or_default().to_owned())
            .collect();
        let n = ids.len();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), n, "duplicate segment ids in {id}");
        out.push((c["started_at_ms"].as_u64().unwrap_or(0), ids));
    }
    out.sort();
    out
}

#[actix_web::test]
async fn a_job_killed_while_its_spans_are_being_transcribed_resumes_without_duplicates() {
    use crate::stt_openai::{OpenAiDouble, Plan};
    let redis = RedisServer::start().expect("redis-server");
    let spool = tempfile::tempdir().unwrap();
    let files = files();
    let expected: u64 = files.iter().map(|(n, b)| offline_speech_ms(n, b)).sum();
    // The provider answers 3 requests, then hangs: the job is then past metering and the conversation
    // writes, transcribing.
    let double = OpenAiDouble::start(&[Plan::Serve, Plan::Serve, Plan::Serve, Plan::Hold]).await;
    let url = double.base_url();
    let (mut a, addr_a) = start_with(&redis.url(), spool.path(), Some(&url)).await;
    let (code, accepted) = post(addr_a, "/v2/sync-local-files", "stt-crash-user", &files).await;
    assert_eq!(code, 202, "{accepted}");
    let job_id = accepted["job_id"].as_str().unwrap().to_owned();
    let mut held = double.held();
    tokio::time::timeout(Duration::from_secs(90), held.wait_for(|n| *n >= 1))
        .await
        .expect("no transcription request reached the double")
        .expect("double gone");
    let (_, running) = get(
        addr_a,
        &format!("/v2/sync-local-files/{job_id}"),
        "stt-crash-user",
    )
    .await;
    assert_eq!(running["status"], "running", "{running}");
    assert_eq!(running["stage"], "processing", "{running}");
    let _ = a.0.kill();
    let _ = a.0.wait();
    println!("killed the node while it transcribed job {job_id}: {running}");

    double.set_plans(&[Plan::Serve]);
    let (_a2, addr) = start_with(&redis.url(), spool.path(), Some(&url)).await;
    let job = poll_until(addr, "stt-crash-user", &job_id, terminal).await;
    assert_eq!(job["result"]["transcript_status"], "done", "{job}");
    check(
        addr,
        "stt-crash-user",
        &job,
        expected,
        "stt-reference",
        &files,
    )
    .await;
    // Every span transcribed once: the same segments per conversation as v1 stored, none twice.
    let mine = segments(addr, "stt-crash-user").await;
    let reference = segments(addr, "stt-reference").await;
    let counts =
        |v: &[(u64, Vec<String>)]| v.iter().map(|(s, ids)| (*s, ids.len())).collect::<Vec<_>>();
    assert_eq!(counts(&mine), counts(&reference));
    assert!(mine.iter().all(|(_, ids)| !ids.is_empty()), "{mine:?}");
    println!(
        "transcript segments per conversation after the resume: {:?} (v1: {:?})",
        counts(&mine),
        counts(&reference)
    );
}

//! The sync v2 spool's bounds: the bytes of one user's unfinished jobs on all nodes
//! (`VOICEGATE_SYNC_SPOOL_BYTES_PER_USER`, 429 `sync_spool_user_quota`, released when a job ends), and the
//! spool's own room (`VOICEGATE_SYNC_SPOOL_MAX_BYTES` and the volume's `VOICEGATE_SYNC_SPOOL_MIN_FREE_BYTES`,
//! 507 `sync_spool_full` before the body is read). A user's first job is held in its `processing` stage
//! (its conversation writes wait on a gate the test opens), so its files stay spooled and the job open for
//! as long as the test needs, without sleeps.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::watch;
use voicegate_server::ServeConfig;

use crate::common;

use common::engine_server::{EngineServer, fair_use_on, fixtures, omi_name};
use common::gated::Gated;
use common::refusal::{Reply, header_str};

/// Two fresh device files with speech, and a bound that holds one such upload but not two.
fn upload_and_bound() -> (Vec<(String, Vec<u8>)>, u64) {
    let files: Vec<(String, Vec<u8>)> = fixtures()
        .into_iter()
        .take(2)
        .enumerate()
        .map(|(i, (_, bytes))| (omi_name(3_600 - 60 * i as u64), bytes))
        .collect();
    let bytes: u64 = files.iter().map(|(_, b)| b.len() as u64).sum();
    (files, bytes + bytes / 2)
}

/// A server whose conversation writes for `held` wait until the returned sender says `true`.
async fn start(
    held: &'static str,
    spool: &Path,
    tweak: impl FnOnce(&mut ServeConfig),
) -> (EngineServer, watch::Sender<bool>) {
    let (gate, open) = watch::channel(false);
    let spool_dir = spool.to_path_buf();
    let server = EngineServer::start_with(
        fair_use_on(),
        move |c| {
            c.sync_jobs.spool_dir = Some(spool_dir);
            // The machine's free space is not this test's subject (but the last test's).
            c.sync_jobs.spool_min_free_bytes = 0;
            tweak(c);
        },
        move |engine| {
            engine.conversations = Arc::new(Gated {
                inner: Arc::clone(&engine.conversations),
                uid: held,
                open,
            });
        },
    )
    .await;
    (server, gate)
}

/// Uploads `files` as a v2 job; its id.
async fn submit(server: &EngineServer, uid: &str, files: &[(String, Vec<u8>)]) -> String {
    let (code, accepted, _) = server.post_files("/v2/sync-local-files", uid, files).await;
    assert_eq!(code, 202, "{uid}: {accepted}");
    accepted["job_id"].as_str().unwrap().to_owned()
}

/// Polls the job (as its client would) until it reaches its held `processing` stage.
async fn until_held(server: &EngineServer, uid: &str, id: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (code, job) = server.get(&format!("/v2/sync-local-files/{id}"), uid).await;
        assert_eq!(code, 200, "{job}");
        if job["stage"] == "processing" {
            return;
        }
        assert_ne!(job["status"], "completed", "the job was not held: {job}");
        assert!(tokio::time::Instant::now() < deadline, "stuck: {job}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A refused v2 upload: its status, body and the refusal shape (`common::refusal`); returns the body and
/// its `retry_after_s`.
async fn refused(
    server: &EngineServer,
    uid: &str,
    files: &[(String, Vec<u8>)],
    status: u16,
) -> (Value, Option<u64>) {
    let (code, body, headers) = server.post_files("/v2/sync-local-files", uid, files).await;
    assert_eq!(code, status, "{uid}: {body}");
    let retry = Reply::new(code, header_str(&headers).as_deref(), body.clone())
        .assert_refusal(&format!("{uid}'s upload"));
    (body, retry)
}

/// Job folders in the spool owned by `uid` (a refused upload must leave none, and nothing in `incoming`).
fn folders_of(spool: &Path, uid: &str) -> usize {
    std::fs::read_dir(spool)
        .unwrap()
        .flatten()
        .filter(|e| std::fs::read_to_string(e.path().join("owner")).is_ok_and(|o| o == uid))
        .count()
}

fn incoming_is_empty(spool: &Path) -> bool {
    std::fs::read_dir(spool.join("incoming"))
        .map(|mut d| d.next().is_none())
        .unwrap_or(true)
}

#[actix_web::test]
async fn a_user_over_their_spool_bytes_gets_429_until_a_job_ends_while_another_user_is_accepted() {
    let spool = tempfile::tempdir().unwrap();
    let (files, bound) = upload_and_bound();
    let (server, gate) = start("heavy", spool.path(), |c| {
        c.upload_max_request_bytes = bound;
        c.sync_jobs.spool_bytes_per_user = bound;
    })
    .await;

    let first = submit(&server, "heavy", &files).await;
    until_held(&server, "heavy", &first).await;

    // A second upload of the same size passes the user's bytes (their first job still holds its files).
    let (body, retry) = refused(&server, "heavy", &files, 429).await;
    assert_eq!(body["code"], "sync_spool_user_quota", "{body}");
    assert_eq!(body["retryable"], true);
    assert_eq!(retry, Some(30), "{body}");
    assert_eq!(body["limit"], "VOICEGATE_SYNC_SPOOL_BYTES_PER_USER");
    assert_eq!(body["limit_value"], bound);
    // The refused upload left nothing in the spool.
    assert_eq!(folders_of(spool.path(), "heavy"), 1);
    assert!(incoming_is_empty(spool.path()));

    // Another user's bytes are their own.
    let other = submit(&server, "light", &files).await;
    let job = server
        .wait_job("light", &other, Duration::from_secs(60))
        .await;
    assert_eq!(job["status"], "completed", "{job}");

    // The first job ends: its bytes are released, the user uploads again.
    let _ = gate.send(true);
    let job = server
        .wait_job("heavy", &first, Duration::from_secs(60))
        .await;
    assert_eq!(job["status"], "completed", "{job}");
    let again = submit(&server, "heavy", &files).await;
    server
        .wait_job("heavy", &again, Duration::from_secs(60))
        .await;

    let text = server.metrics_text().await;
    assert!(
        text.contains(r#"voicegate_sync_uploads_refused_total{reason="spool_user_quota"} 1"#),
        "{text}"
    );
    server.shutdown().await;
}

#[actix_web::test]
async fn a_full_spool_answers_507_sync_spool_full_before_the_body_is_read() {
    let spool = tempfile::tempdir().unwrap();
    let (files, bound) = upload_and_bound();
    let (server, gate) = start("first", spool.path(), |c| {
        c.upload_max_request_bytes = bound;
        c.sync_jobs.spool_max_bytes = bound;
    })
    .await;

    let first = submit(&server, "first", &files).await;
    until_held(&server, "first", &first).await;

    // The spool holds the first job's files: another user's upload of the same size does not fit.
    let (body, retry) = refused(&server, "second", &files, 507).await;
    assert_eq!(body["code"], "sync_spool_full", "{body}");
    assert_eq!(retry, Some(30), "{body}");
    assert_eq!(body["limit"], "VOICEGATE_SYNC_SPOOL_MAX_BYTES");
    assert_eq!(body["limit_value"], bound);
    assert_eq!(folders_of(spool.path(), "second"), 0);
    assert!(incoming_is_empty(spool.path()));

    let text = server.metrics_text().await;
    assert!(
        text.contains(r#"voicegate_sync_uploads_refused_total{reason="spool_full"} 1"#),
        "{text}"
    );
    assert!(text.contains("voicegate_sync_spool_bytes "), "{text}");
    let _ = gate.send(true);
    server
        .wait_job("first", &first, Duration::from_secs(60))
        .await;
    server.shutdown().await;
}

#[actix_web::test]
async fn a_spool_volume_short_of_its_free_space_reserve_answers_sync_spool_full() {
    let spool = tempfile::tempdir().unwrap();
    let (files, _) = upload_and_bound();
    let (server, _gate) = start("nobody", spool.path(), |c| {
        // More than any disk has free.
        c.sync_jobs.spool_min_free_bytes = u64::MAX / 2;
    })
    .await;
    let (body, retry) = refused(&server, "u", &files, 507).await;
    assert_eq!(body["code"], "sync_spool_full", "{body}");
    assert_eq!(retry, Some(30), "{body}");
    assert_eq!(body["limit"], "VOICEGATE_SYNC_SPOOL_MIN_FREE_BYTES");
    assert_eq!(folders_of(spool.path(), "u"), 0);
    server.shutdown().await;
}

//! Sync v2 end to end against a real redis-server (issue #15): a job over the fixtures ends with what v1
//! answers for the same files (speech equal to `voicegate analyze`), a re-upload meters nothing, another
//! user's job is never revealed, v1 carries the deprecation headers.

use std::time::Duration;

use crate::common;

use common::engine_server::{EngineServer, fair_use_on, fixtures, offline_speech_ms, omi_name};
use serde_json::Value;

fn ids(v: &Value) -> Vec<String> {
    let mut out: Vec<String> = v
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

fn statuses(files: &Value) -> Vec<String> {
    files
        .as_array()
        .map(|a| {
            a.iter()
                .map(|f| f["status"].as_str().unwrap_or("?").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[actix_web::test]
async fn a_v2_job_ends_with_what_v1_answers_and_a_reupload_meters_nothing() {
    let spool = tempfile::tempdir().unwrap();
    let spool_dir = spool.path().to_path_buf();
    let server = EngineServer::start(fair_use_on(), move |c| {
        c.sync_jobs.spool_dir = Some(spool_dir);
    })
    .await;
    let files: Vec<(String, Vec<u8>)> = fixtures()
        .into_iter()
        .enumerate()
        .map(|(i, (_, bytes))| (omi_name(3_600 - 60 * i as u64), bytes))
        .collect();
    let expected: u64 = files.iter().map(|(n, b)| offline_speech_ms(n, b)).sum();

    // v1, for another user: the reference answer, with the deprecation headers.
    let (code, v1, headers) = server
        .post_files("/v1/sync-local-files", "v1-user", &files)
        .await;
    assert_eq!(code, 200, "{v1}");
    assert_eq!(headers["deprecation"], "true");
    assert_eq!(
        headers["link"],
        "</v2/sync-local-files>; rel=\"successor-version\""
    );
    assert_eq!(v1["speech_ms"], expected);

    // v2: 202 at once with the reference's body.
    let (code, accepted, headers) = server
        .post_files("/v2/sync-local-files", "v2-user", &files)
        .await;
    assert_eq!(code, 202, "{accepted}");
    assert_eq!(accepted["status"], "queued");
    assert_eq!(accepted["total_files"], 12);
    assert_eq!(accepted["total_segments"], 0);
    assert_eq!(accepted["poll_after_ms"], 3000);
    assert!(headers.get("deprecation").is_none());
    let job_id = accepted["job_id"].as_str().unwrap().to_owned();
    assert_eq!(
        headers["location"],
        format!("/v2/sync-local-files/{job_id}").as_str()
    );

    let job = server
        .wait_job("v2-user", &job_id, Duration::from_secs(60))
        .await;
    println!("v2 job: {job}");
    assert_eq!(job["status"], "completed", "{job}");
    let result = &job["result"];
    assert_eq!(result["speech_ms"], expected, "{job}");
    assert_eq!(result["metered_speech_ms"], expected);
    assert_eq!(result["locked"], v1["locked"]);
    assert_eq!(statuses(&result["files"]), statuses(&v1["files"]));
    assert_eq!(
        ids(&result["new_memories"]).len(),
        ids(&v1["new_memories"]).len()
    );
    assert_eq!(job["processed_files"], 12);
    assert_eq!(job["processed_segments"], job["total_segments"]);
    assert!(job["total_segments"].as_u64().unwrap() > 0, "{job}");
    assert_eq!(job["failed_segments"], 0);
    assert_eq!(job["lanes"]["sync_fresh"]["done"], 12);
    assert_eq!(job["attempts"], 1);
    assert_eq!(
        server.status_speech_ms("v2-user").await["daily_ms"],
        expected
    );
    // The job's spool folder is gone once it ended.
    assert!(!spool.path().join(&job_id).exists());

    // Downstream events in the Redis stream: the job's end and each conversation it created.
    let events = server
        .events_until(|evs| {
            evs.iter()
                .any(|e| e["type"] == "sync_job_ended" && e["id"] == job_id.as_str())
        })
        .await;
    let ended = events
        .iter()
        .find(|e| e["type"] == "sync_job_ended" && e["id"] == job_id.as_str())
        .unwrap();
    assert_eq!(ended["uid"], "v2-user");
    let data: Value = serde_json::from_str(ended["data"].as_str().unwrap()).unwrap();
    assert_eq!(data["status"], "completed");
    assert_eq!(data["speech_ms"], expected);
    for id in ids(&result["new_memories"]) {
        assert!(
            events.iter().any(|e| e["type"] == "conversation_created"
                && e["id"] == id.as_str()
                && e["uid"] == "v2-user"),
            "no conversation_created for {id}: {events:?}"
        );
    }

    // Never revealed to another user; unknown and malformed ids are the same 404.
    for (who, id) in [
        ("v1-user", job_id.as_str()),
        ("v2-user", "00000000-0000-4000-8000-000000000000"),
        ("v2-user", "..%2F..%2Fetc"),
    ] {
        let (code, body) = server.get(&format!("/v2/sync-local-files/{id}"), who).await;
        assert_eq!(code, 404, "{who} {id}: {body}");
        assert_eq!(body["code"], "sync_job_not_found");
        assert_eq!(body["retryable"], false);
    }

    // The same files again: every file a duplicate, nothing metered, the same conversations.
    let (code, again, _) = server
        .post_files("/v2/sync-local-files", "v2-user", &files)
        .await;
    assert_eq!(code, 202, "{again}");
    let again = server
        .wait_job(
            "v2-user",
            again["job_id"].as_str().unwrap(),
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(again["status"], "completed", "{again}");
    assert_eq!(again["result"]["metered_speech_ms"], 0);
    assert!(
        statuses(&again["result"]["files"])
            .iter()
            .all(|s| s == "duplicate"),
        "{again}"
    );
    assert_eq!(ids(&again["result"]["new_memories"]), Vec::<String>::new());
    assert_eq!(
        ids(&again["result"]["updated_memories"]),
        ids(&job["result"]["new_memories"])
    );
    assert_eq!(
        server.status_speech_ms("v2-user").await["daily_ms"],
        expected
    );
    server.shutdown().await;
}

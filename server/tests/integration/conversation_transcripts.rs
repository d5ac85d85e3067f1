//! Conversations carry their transcript, through `voicegate serve` with the real local engine (as
//! `listen_transcripts`; these tests FAIL rather than skip without it): the final segments a streamed session
//! sent the app are stored with the conversation it wrote (most of them arrive after the write, at the end
//! of the session, and are added by id) and served by `GET /v1/conversations/{id}`; a user out of credits is
//! still transcribed and the conversation locked (402: the transcript is the locked content). Deleting:
//! `DELETE /v1/conversations/{id}` by its owner only (another user's id is 404), and the admin route erases
//! all of a user's conversations and transcripts.

use std::sync::Arc;

use serde_json::Value;
use voicegate_engine::meter::{RecordSpeech, SpeechAmount, SpeechSource};

use crate::common;
use crate::listen_support;
use crate::listen_transcripts::{OPUS16, Session, local_stt, stream};

use common::engine_server::{ADMIN_KEY, EngineServer, fair_use_on, split};
use listen_support::{NORMAL, connect};

async fn delete(
    server: &EngineServer,
    path: &str,
    bearer: Option<&str>,
    admin: bool,
) -> (u16, Value) {
    let mut req = server.http.delete(server.url(path));
    if let Some(b) = bearer {
        req = req.bearer_auth(b);
    }
    if admin {
        req = req.header("X-Admin-Key", ADMIN_KEY);
    }
    split(
        req.send()
            .await
            .unwrap_or_else(|e| panic!("DELETE {path}: {e}")),
    )
    .await
}

/// Streams `d01` at 10x as `uid`; returns the session and the id of the one conversation it wrote.
async fn stream_d01(server: &EngineServer, uid: &str) -> (Session, String) {
    let ws = connect(server.addr, Some(uid), OPUS16)
        .await
        .unwrap_or_else(|s| panic!("upgrade {s}"));
    let s = stream(ws, "d01", 10).await;
    assert_eq!(s.close, Some(NORMAL));
    let closed = s.of_type("conversation_closed");
    assert_eq!(closed.len(), 1, "one conversation: {closed:?}");
    let id = closed[0]["conversation_id"].as_str().unwrap().to_owned();
    (s, id)
}

/// The app's final segments that carry words: (id, text), sorted.
fn seen_by_the_app(s: &Session) -> Vec<(String, String)> {
    let mut seen: Vec<(String, String)> = s
        .segments
        .iter()
        .filter(|g| !g.text.is_empty())
        .map(|g| (g.id.clone(), g.text.clone()))
        .collect();
    seen.sort();
    seen
}

#[actix_web::test]
async fn a_streamed_conversation_is_served_with_the_transcript_the_app_saw_and_deleted_by_its_owner()
 {
    if let Some(why) = voicegate_engine::stt::local::ffi::cpu_unsupported() {
        eprintln!("NOT RUN on this machine: {why}");
        return;
    }
    let server = EngineServer::start(fair_use_on(), local_stt).await;
    let (s, id) = stream_d01(&server, "alice").await;
    let path = format!("/v1/conversations/{id}");
    let (code, body) = server.get(&path, "alice").await;
    assert_eq!(code, 200, "{body}");
    let stored = body["transcript_segments"].as_array().unwrap();
    let mut kept: Vec<(String, String)> = stored
        .iter()
        .map(|g| {
            (
                g["id"].as_str().unwrap().to_owned(),
                g["text"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    kept.sort();
    assert!(kept.len() >= 3, "{body}");
    assert_eq!(kept, seen_by_the_app(&s), "every final segment, once");
    // In time order, in the app's format, `start`/`end` in seconds from the conversation's start: the
    // session's stream time minus the first speech run's start (the pre-roll clamped at 0).
    let first_run_ms = s.of_type("speech_started")[0]["at_ms"].as_u64().unwrap();
    let started_at = body["started_at_ms"].as_u64().unwrap();
    let mut last_start = 0.0;
    for g in stored {
        assert_eq!(g["speaker"], "SPEAKER_00", "{g}");
        assert_eq!(g["is_user"], false);
        assert!(
            g["person_id"].is_null() && g["translations"].is_array(),
            "{g}"
        );
        let start = g["start"].as_f64().unwrap();
        assert!(
            start >= last_start && g["end"].as_f64().unwrap() >= start,
            "{g}"
        );
        last_start = start;
        let app = s
            .segments
            .iter()
            .find(|a| g["id"] == a.id.as_str())
            .unwrap_or_else(|| panic!("{g}"));
        let expect_ms = app.start_ms.saturating_sub(first_run_ms);
        assert!(
            ((start * 1000.0).round() as u64).abs_diff(expect_ms) <= 2,
            "{g} vs the app's {app:?}"
        );
        assert_eq!(
            g["start_ms"].as_u64().unwrap().max(started_at) - started_at,
            (start * 1000.0).round() as u64
        );
    }

    // Another user's id is indistinguishable from a missing one, and deletes nothing.
    let (code, err) = delete(&server, &path, Some("mallory"), false).await;
    assert_eq!(
        (code, err["code"].as_str()),
        (404, Some("conversation_not_found"))
    );
    assert_eq!(server.get(&path, "alice").await.0, 200);
    let (code, _) = delete(&server, &path, None, false).await;
    assert_eq!(code, 401);
    // The owner deletes it with its transcript.
    let (code, body) = delete(&server, &path, Some("alice"), false).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["deleted"], true);
    assert_eq!(server.get(&path, "alice").await.0, 404);
    assert_eq!(delete(&server, &path, Some("alice"), false).await.0, 404);
    let left = server
        .engine
        .conversations
        .transcript("alice", &id)
        .await
        .unwrap();
    assert!(left.is_empty(), "{left:?}");
    server.shutdown().await;
}

#[actix_web::test]
async fn a_user_out_of_credits_is_transcribed_and_locked_until_an_admin_erases_the_conversations() {
    if let Some(why) = voicegate_engine::stt::local::ffi::cpu_unsupported() {
        eprintln!("NOT RUN on this machine: {why}");
        return;
    }
    let mut fair = fair_use_on();
    fair.plans.free_minutes_per_month = 1;
    let server = EngineServer::start(fair, local_stt).await;
    // 61 s of speech this month: carol's free minute is used up.
    let now_ms = common::engine_server::now_s() * 1000;
    server
        .engine
        .fair_use
        .record(RecordSpeech::new(
            Arc::<str>::from("carol"),
            SpeechAmount::Ms(61_000),
            now_ms,
            SpeechSource::Realtime,
        ))
        .await
        .unwrap();
    let (s, id) = stream_d01(&server, "carol").await;
    assert_eq!(s.of_type("conversation_closed")[0]["locked"], true);
    assert!(!seen_by_the_app(&s).is_empty(), "still transcribed");
    let path = format!("/v1/conversations/{id}");
    let (code, body) = server.get(&path, "carol").await;
    assert_eq!(code, 402, "{body}");
    assert_eq!(body["code"], "conversation_locked");
    assert!(body.get("transcript_segments").is_none());
    let stored = server
        .engine
        .conversations
        .transcript("carol", &id)
        .await
        .unwrap();
    assert_eq!(
        stored.len(),
        seen_by_the_app(&s).len(),
        "stored, behind the lock"
    );

    // The admin route: the admin key is required; then everything of carol's is gone.
    let admin_path = "/v1/admin/conversations/user/carol";
    assert_eq!(delete(&server, admin_path, None, false).await.0, 422);
    let (code, body) = delete(&server, admin_path, None, true).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["deleted_conversations"], 1);
    assert_eq!(server.get(&path, "carol").await.0, 404);
    let (_, list) = server.get("/v1/conversations", "carol").await;
    assert_eq!(list["conversations"], serde_json::json!([]));
    assert!(
        server
            .engine
            .conversations
            .transcript("carol", &id)
            .await
            .unwrap()
            .is_empty()
    );
    server.shutdown().await;
}

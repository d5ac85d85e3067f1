//! The websocket rows of the bad-input matrix (real server, real redis-server, token verification on): each
//! gets its documented HTTP status or close code, a session survives garbage, and none changes anyone's
//! metered speech.

use crate::common;
use crate::listen_support;

use std::time::Duration;

use common::engine_server::{EngineServer, fair_use_on};
use futures_util::{SinkExt, StreamExt};
use listen_support::{
    AWAY, NORMAL, POLICY, Seen, TOO_BIG, Ws, connect, connect_or_refusal, fixture_packets, read_all,
};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use voicegate_engine::meter::{RecordSpeech, SpeechAmount, SpeechSource};

const AUD: &str = "voicegate-test";
const OPUS16: &str = "codec=opus&sample_rate=16000";

fn token(uid: &str) -> String {
    common::hs256_token(json!({"sub": uid, "exp": common::now() + 600, "aud": AUD}))
}

/// Sends `msgs`, then reads until the server closes.
async fn exchange(ws: Ws, msgs: Vec<Message>) -> Seen {
    let (mut tx, rx) = ws.split();
    let reader = tokio::spawn(read_all(rx, Duration::from_secs(20)));
    for m in msgs {
        // The server may already have closed (e.g. after an oversized message): later sends may fail.
        if tx.send(m).await.is_err() {
            break;
        }
    }
    reader.await.unwrap_or_else(|e| panic!("{e}"))
}

async fn connected(server: &EngineServer, uid: &str, query: &str) -> Ws {
    connect(server.addr, Some(&token(uid)), query)
        .await
        .unwrap_or_else(|s| panic!("{uid}: upgrade answered {s}"))
}

fn close_of(seen: &Seen) -> (u16, String) {
    seen.close.clone().unwrap_or((0, String::new()))
}

#[actix_web::test]
async fn websocket_bad_inputs_get_their_documented_answers_and_meter_nothing() {
    let server = EngineServer::start(fair_use_on(), |c| {
        c.jwt_hs256_secret = Some(common::HS_SECRET.into());
        c.jwt_audience = Some(AUD.into());
        c.ws_max_message_bytes = 8 * 1024;
        c.ws_idle_timeout_secs = 1;
    })
    .await;
    // A bystander with speech on record: no bad input may change it.
    server
        .engine
        .fair_use
        .record(RecordSpeech::new(
            "victim",
            SpeechAmount::Ms(4_321),
            common::now() * 1000,
            SpeechSource::Realtime,
        ))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let victim_before = server.status_speech_ms(&token("victim")).await;

    // Upgrade refused before any socket exists: 401 in the one refusal shape, final.
    let expired = common::hs256_token(json!({"sub": "x", "exp": common::now() - 60, "aud": AUD}));
    let wrong_aud =
        common::hs256_token(json!({"sub": "x", "exp": common::now() + 60, "aud": "other"}));
    for (what, bearer, code) in [
        ("no token", None, "auth_missing"),
        ("expired token", Some(expired.as_str()), "token_expired"),
        (
            "wrong audience",
            Some(wrong_aud.as_str()),
            "token_wrong_audience",
        ),
        // A dev token is not accepted once verification is configured.
        ("dev token", Some("attacker"), "token_invalid"),
    ] {
        let Err(refusal) = connect_or_refusal(server.addr, bearer, OPUS16).await else {
            panic!("{what}: the upgrade was accepted");
        };
        assert_eq!(refusal.status, 401, "{what}: {:?}", refusal.body);
        assert_eq!(refusal.body["code"], code, "{what}");
        assert_eq!(refusal.assert_refusal(what), None, "{what}: final");
    }

    // Parameters the server cannot serve: 1008 with the reason, nothing else.
    for (query, needle) in [
        ("codec=aac&sample_rate=16000", "codec"),
        ("codec=lc3", "codec"),
        ("codec=opus&sample_rate=44100", "sample_rate"),
        ("codec=pcm16&sample_rate=11025", "sample_rate"),
        ("codec=opus&sample_rate=16000&channels=2", "channels"),
        (
            "codec=opus&sample_rate=16000&conversation_timeout=soon",
            "conversation_timeout",
        ),
        ("codec=opus&language=%3Cscript%3E", "language"),
    ] {
        let seen = exchange(connected(&server, "attacker", query).await, vec![]).await;
        let (code, reason) = close_of(&seen);
        assert_eq!(code, POLICY, "{query}: {reason}");
        assert!(reason.contains(needle), "{query}: {reason}");
        assert!(seen.events.is_empty(), "{query}: {:?}", seen.events);
    }

    // A message over VOICEGATE_WS_MAX_MESSAGE_BYTES: 1009, after the metadata of what came before.
    let packets = fixture_packets("d01");
    let seen = exchange(
        connected(&server, "attacker", OPUS16).await,
        vec![
            Message::binary(packets[0].clone()),
            Message::binary(vec![0u8; 9 * 1024]),
        ],
    )
    .await;
    let (code, reason) = close_of(&seen);
    assert_eq!(code, TOO_BIG, "{reason}");
    assert_eq!(seen.metadata()["frames_received"], 1);

    // Garbage text and corrupt Opus are ignored: the session goes on and ends normally on CloseStream.
    let mut msgs = vec![
        Message::text("hello"),
        Message::text(r#"{"type":"Nope"}"#),
        Message::text("[1,2,3]"),
        Message::text(r#"{"type":"KeepAlive"}"#),
        Message::binary(vec![0xFFu8; 200]),
        Message::binary(vec![1u8, 2]),
        Message::text(r#"{"type":"Finalize"}"#),
    ];
    msgs.extend(packets[..50].iter().map(|p| Message::binary(p.clone())));
    msgs.push(Message::text(r#"{"type":"CloseStream"}"#));
    let seen = exchange(connected(&server, "attacker", OPUS16).await, msgs).await;
    assert_eq!(close_of(&seen), (NORMAL, String::new()));
    let meta = seen.metadata();
    assert_eq!(meta["frames_received"], 52, "{meta}");
    assert_eq!(meta["frames_dropped"], 0, "{meta}");
    assert_eq!(
        meta["speech_ms"], 0,
        "the first 0.5 s of d01 is silence: {meta}"
    );

    // No message for VOICEGATE_WS_IDLE_TIMEOUT_SECS: 1001 "idle timeout", metadata first.
    let seen = exchange(connected(&server, "idler", OPUS16).await, vec![]).await;
    assert_eq!(close_of(&seen), (AWAY, "idle timeout".to_owned()));
    assert_eq!(seen.metadata()["audio_ms"], 0);

    for uid in ["attacker", "idler", "x"] {
        let s = server.status_speech_ms(&token(uid)).await;
        assert_eq!(s["daily_ms"], 0, "{uid}: {s}");
        assert_eq!(s["month_ms"], 0, "{uid}: {s}");
    }
    assert_eq!(
        server.status_speech_ms(&token("victim")).await,
        victim_before
    );
    server.shutdown().await;
}

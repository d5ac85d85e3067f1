//! The live wiring passes real session evidence to the classifier: a realtime session leaves its summary in
//! the store (Redis) when it ends, and when the user's next session crosses a cap the LLM classifier, reached
//! over HTTPS through the node's outbound client and its test CA, receives that session in its prompt.

use std::time::Duration;

use crate::common;
use crate::listen_support;

use common::engine_server::{ADMIN_KEY, EngineServer, fair_use_on, split};
use listen_support::{NORMAL, connect, fixture_packets, offline, stream_packets};
use serde_json::{Value, json};
use voicegate_engine::outbound::test_tls;
use voicegate_engine::policy::{
    ClassifierKind, ClassifierSettings, FairUseConfig, PlanCaps, SoftCaps, Stage,
};

#[actix_web::test]
async fn a_stream_over_a_cap_reaches_the_llm_classifier_with_the_users_session_evidence() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = test_tls::pki(dir.path());
    let (port, bodies) = test_tls::serve_json(&cert, &key, |_| {
        let content = r#"{"misuse_score":0.95,"usage_type":"audiobook","confidence":0.9,"evidence":[],"reasoning":"dense for a long time"}"#;
        json!({"choices": [{"message": {"role": "assistant", "content": content}}]}).to_string()
    })
    .await;
    let (first, second) = (fixture_packets("d01"), fixture_packets("d02"));
    let (speech1, speech2) = (offline(&first).speech_ms, offline(&second).speech_ms);
    // The first session stays under the caps; the second crosses them halfway.
    let cap = speech1 + speech2 / 2;
    let fair = FairUseConfig {
        caps: PlanCaps::uniform(SoftCaps {
            daily_ms: cap,
            three_day_ms: cap,
            weekly_ms: cap,
        }),
        classifier: ClassifierSettings {
            kind: ClassifierKind::OpenAi,
            base_url: format!("https://localhost:{port}/v1"),
            model: "gpt-test".into(),
            api_key: Some("sk-test".into()),
            timeout_ms: 10_000,
            ..ClassifierSettings::default()
        },
        ..fair_use_on()
    };
    let server = EngineServer::start(fair, |c| {
        c.listen_max_pace = 20.0;
        c.tls_ca_file = Some(ca.clone());
    })
    .await;

    let ws = connect(server.addr, Some("dense"), "codec=opus&sample_rate=16000")
        .await
        .unwrap_or_else(|s| panic!("upgrade refused with {s}"));
    let (seen1, _) = stream_packets(ws, &first, 10).await;
    assert_eq!(seen1.close, Some((NORMAL, String::new())));
    assert_eq!(seen1.metadata()["speech_ms"].as_u64(), Some(speech1));
    assert!(
        bodies.lock().unwrap().is_empty(),
        "under the caps: not classified"
    );

    let ws = connect(server.addr, Some("dense"), "codec=opus&sample_rate=16000")
        .await
        .unwrap_or_else(|s| panic!("upgrade refused with {s}"));
    let (seen2, _) = stream_packets(ws, &second, 10).await;
    assert_eq!(seen2.close, Some((NORMAL, String::new())));

    // The classification runs in the background: wait (bounded) until its event is in the admin view.
    let mut user = Value::Null;
    for _ in 0..200 {
        let resp = server
            .http
            .get(server.url("/v1/admin/fair-use/user/dense"))
            .header("X-Admin-Key", ADMIN_KEY)
            .send()
            .await
            .unwrap();
        let (code, body) = split(resp).await;
        assert_eq!(code, 200, "{body}");
        user = body;
        if user["events"].as_array().is_some_and(|e| !e.is_empty()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let events = user["events"].as_array().expect("events");
    assert_eq!(events.len(), 1, "{user}");
    assert_eq!(events[0]["classifier"]["model"], "gpt-test (vg-2)");
    assert_eq!(events[0]["new_stage"], json!(Stage::Warning));

    // What the classifier received: the first session, closed, with the speech its metadata reported.
    let bodies = bodies.lock().unwrap().clone();
    assert_eq!(bodies.len(), 1);
    let request: Value = serde_json::from_str(&bodies[0]).unwrap();
    assert_eq!(request["model"], "gpt-test");
    let snapshot: Value = serde_json::from_str(
        request["messages"][1]["content"]
            .as_str()
            .expect("the user message is the snapshot JSON"),
    )
    .unwrap();
    assert_eq!(snapshot["uid"], "dense");
    let sessions = snapshot["sessions"].as_array().expect("sessions");
    let closed: Vec<&Value> = sessions.iter().filter(|s| s["open"] == false).collect();
    assert_eq!(closed.len(), 1, "{sessions:?}");
    let s = closed[0];
    assert_eq!(s["lane"], "realtime");
    assert_eq!(s["source"], "realtime");
    assert_eq!(s["speech_ms"].as_u64(), Some(speech1));
    assert_eq!(
        s["audio_ms"].as_u64(),
        seen1.metadata()["audio_ms"].as_u64()
    );
    assert!(s["speech_density"].as_f64().is_some_and(|d| d > 0.3), "{s}");
    assert!(s["id"].as_str().is_some_and(|id| id.starts_with("rt:")));

    // The user's own view: one violation, its case ref, and when the warning ends (30 quiet days).
    let (code, v) = server.get("/v1/fair-use/violations", "dense").await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(
        (
            v["stage"].as_str(),
            v["violations_7d"].as_u64(),
            v["violations_30d"].as_u64()
        ),
        (Some("warning"), Some(1), Some(1)),
        "{v}"
    );
    assert_eq!(v["cases"][0]["case_ref"], events[0]["case_ref"]);
    assert_eq!(v["cases"][0]["usage_type"], "audiobook");
    assert_eq!(
        v["stage_ends_at_ms"].as_u64(),
        events[0]["at_ms"].as_u64().map(|at| at + 30 * 86_400_000),
        "{v}"
    );
    let (code, clean) = server.get("/v1/fair-use/violations", "someone-else").await;
    assert_eq!(code, 200);
    assert_eq!(
        (
            clean["stage"].as_str(),
            clean["violations_30d"].as_u64(),
            clean["stage_ends_at_ms"].is_null()
        ),
        (Some("none"), Some(0), true),
        "{clean}"
    );

    // Both sessions are in the admin view now, newest end first.
    let sessions = user["sessions"].as_array().expect("sessions");
    assert_eq!(sessions.len(), 2, "{user}");
    assert_eq!(
        sessions[0]["speech_ms"].as_u64(),
        seen2.metadata()["speech_ms"].as_u64()
    );
    assert_eq!(sessions[1]["id"], s["id"]);

    // Usage thresholds: the status shows the highest reached per window (all three over the one cap), and
    // a session tells each crossing once, whichever session saw it first: a third session after the
    // crossing tells only what the second had not.
    let (code, status) = server.get("/v1/fair-use/status", "dense").await;
    assert_eq!(code, 200, "{status}");
    let reached: Vec<(String, u64)> = status["thresholds"]
        .as_array()
        .expect("thresholds")
        .iter()
        .map(|t| {
            (
                t["cap"].as_str().unwrap().to_owned(),
                t["level_pct"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        reached,
        [
            ("daily".into(), 100),
            ("3day".into(), 100),
            ("weekly".into(), 100)
        ],
        "{status}"
    );
    let ws = connect(server.addr, Some("dense"), "codec=opus&sample_rate=16000")
        .await
        .unwrap_or_else(|s| panic!("upgrade refused with {s}"));
    let (seen3, _) = stream_packets(ws, &first[..first.len().min(50)], 10).await;
    let mut told: Vec<(String, u64)> = [&seen1, &seen2, &seen3]
        .iter()
        .flat_map(|seen| seen.of_type("usage_threshold"))
        .map(|e| {
            (
                e["cap"].as_str().unwrap().to_owned(),
                e["level_pct"].as_u64().unwrap(),
            )
        })
        .collect();
    assert!(
        seen1.of_type("usage_threshold").is_empty(),
        "under 80 % in the first session"
    );
    let hundreds: Vec<&(String, u64)> = told.iter().filter(|(_, l)| *l == 100).collect();
    assert_eq!(hundreds.len(), 3, "each window's 100 % told once: {told:?}");
    let n = told.len();
    told.sort();
    told.dedup();
    assert_eq!(told.len(), n, "no crossing told twice: {told:?}");
    server.shutdown().await;
}

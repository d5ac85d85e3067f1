//! The OpenAI-compatible classifier against a small fake chat-completions server on 127.0.0.1: a strict JSON
//! verdict parses; malformed output, an HTTP error or a dead server is a failure, never a benign score.

use std::sync::{Arc, Mutex};

use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use serde_json::{Value, json};
use voicegate_engine::fair_use::{Classifier, ClassifierError, OpenAiClassifier, UsageSnapshot};
use voicegate_engine::outbound::Outbound;
use voicegate_engine::outbound::test_tls;
use voicegate_engine::policy::{ClassifierSettings, RollingTotals, UsageType};

/// (authorization header, JSON body) of each request.
type Request = (Option<String>, Value);

#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<Request>>>);

/// Serves one canned reply per path prefix: `/ok`, `/fenced`, `/malformed`, `/status500`, `/empty`.
async fn start_fake() -> (String, Seen, actix_web::dev::ServerHandle) {
    let seen = Seen::default();
    let s = seen.clone();
    let server = HttpServer::new(move || {
        let s = s.clone();
        App::new().route(
            "/{mode}/chat/completions",
            web::post().to(move |req: HttpRequest, body: web::Json<Value>, mode: web::Path<String>| {
                let s = s.clone();
                async move {
                    let auth = req.headers().get("authorization").and_then(|v| v.to_str().ok()).map(str::to_owned);
                    s.0.lock().unwrap().push((auth, body.into_inner()));
                    let verdict = r#"{"misuse_score":0.91,"usage_type":"podcast","confidence":0.8,"evidence":[{"conversation_id":"c1","title":"Ep 12","reason":"scripted show"}],"reasoning":"many 45 min shows"}"#;
                    let content = match mode.as_str() {
                        "ok" => verdict.to_owned(),
                        "fenced" => format!("```json\n{verdict}\n```"),
                        "malformed" => "I think this user is fine.".to_owned(),
                        "status500" => return HttpResponse::InternalServerError().body("boom"),
                        _ => return HttpResponse::Ok().json(json!({"choices": []})),
                    };
                    HttpResponse::Ok().json(json!({"choices": [{"message": {"role": "assistant", "content": content}}]}))
                }
            }),
        )
    })
    .workers(1)
    .bind(("127.0.0.1", 0))
    .unwrap();
    let addr = server.addrs()[0];
    let server = server.run();
    let handle = server.handle();
    actix_web::rt::spawn(server);
    (format!("http://{addr}"), seen, handle)
}

fn settings(base_url: String) -> ClassifierSettings {
    ClassifierSettings {
        base_url,
        model: "gpt-test".into(),
        api_key: Some("sk-test".into()),
        timeout_ms: 5_000,
        ..ClassifierSettings::default()
    }
}

fn classifier(base: &str, mode: &str) -> OpenAiClassifier {
    let outbound = Outbound::new(None).unwrap_or_else(|e| panic!("{e}"));
    OpenAiClassifier::new(
        &settings(format!("{base}/{mode}/")),
        outbound.http().clone(),
    )
}

fn snapshot() -> UsageSnapshot {
    UsageSnapshot {
        uid: "u1".into(),
        now_ms: 1_790_000_000_000,
        lookback_days: 7,
        totals: RollingTotals {
            daily_ms: 1,
            three_day_ms: 2,
            weekly_ms: 3,
        },
        sessions: Vec::new(),
    }
}

#[actix_web::test]
async fn a_strict_json_verdict_is_parsed_and_the_request_carries_model_key_and_snapshot() {
    let (base, seen, server) = start_fake().await;
    for mode in ["ok", "fenced"] {
        let v = classifier(&base, mode).classify(snapshot()).await.unwrap();
        assert_eq!(
            (v.misuse_score, v.usage_type, v.evidence.len()),
            (0.91, UsageType::Podcast, 1)
        );
        assert!(v.model.starts_with("gpt-test"));
    }
    let (auth, body) = seen.0.lock().unwrap()[0].clone();
    assert_eq!(auth.as_deref(), Some("Bearer sk-test"));
    assert_eq!(body["model"], "gpt-test");
    assert_eq!(body["response_format"]["type"], "json_object");
    let user: Value =
        serde_json::from_str(body["messages"][1]["content"].as_str().unwrap()).unwrap();
    assert_eq!(user["uid"], "u1");
    server.stop(true).await;
}

#[actix_web::test]
async fn malformed_output_http_errors_and_empty_choices_are_failures() {
    let (base, _seen, server) = start_fake().await;
    let err = |mode: &'static str| {
        let c = classifier(&base, mode);
        async move { c.classify(snapshot()).await.unwrap_err() }
    };
    assert!(matches!(
        err("malformed").await,
        ClassifierError::Malformed(_)
    ));
    assert_eq!(err("status500").await, ClassifierError::Status(500));
    assert!(matches!(err("empty").await, ClassifierError::Malformed(_)));
    server.stop(true).await;
}

#[actix_web::test]
async fn an_unreachable_server_is_a_transport_failure() {
    // Bind then drop a listener: nothing listens on that port any more.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let e = classifier(&format!("http://127.0.0.1:{port}"), "ok")
        .classify(snapshot())
        .await
        .unwrap_err();
    assert!(matches!(e, ClassifierError::Transport(_)), "{e:?}");
    assert_eq!(e.code(), "error");
}

/// An HTTPS chat-completions double for `localhost` with a certificate of a private CA: answers every
/// request with a verdict (the protocol's `choices[0].message.content`); returns the port and the bodies read.
async fn start_https_fake(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> (u16, test_tls::Bodies) {
    test_tls::serve_json(cert, key, |_| {
        let content = r#"{"misuse_score":0.12,"usage_type":"none","confidence":0.9,"evidence":[],"reasoning":"meetings"}"#;
        json!({"choices": [{"message": {"role": "assistant", "content": content}}]}).to_string()
    })
    .await
}

#[tokio::test]
async fn an_https_classifier_is_reached_through_the_outbound_client_and_its_ca_setting() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = test_tls::pki(dir.path());
    let (port, served) = start_https_fake(&cert, &key).await;
    let base = format!("https://localhost:{port}/v1");
    // The compiled-in roots do not trust the private CA: a transport failure, nothing served.
    let public = Outbound::new(None).unwrap();
    let err = OpenAiClassifier::new(&settings(base.clone()), public.http().clone())
        .classify(snapshot())
        .await
        .unwrap_err();
    assert!(matches!(err, ClassifierError::Transport(_)), "{err:?}");
    assert_eq!(served.lock().unwrap().len(), 0);
    // With VOICEGATE_TLS_CA_FILE = that CA, the node's one client reaches it and the verdict parses.
    let private = Outbound::new(Some(&ca)).unwrap();
    let verdict = OpenAiClassifier::new(&settings(base), private.http().clone())
        .classify(snapshot())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!((verdict.misuse_score - 0.12).abs() < 1e-9, "{verdict:?}");
    assert_eq!(verdict.usage_type, UsageType::None);
    assert_eq!(served.lock().unwrap().len(), 1);
}

#[actix_web::test]
async fn the_prompt_carries_the_newest_30_sessions_newest_first() {
    use voicegate_engine::policy::{SessionLane, SessionMeasures, SessionSummary};
    let (base, seen, server) = start_fake().await;
    let mut snap = snapshot();
    // 40 sessions, newest end first (as the supervisor passes them).
    snap.sessions = (0..40u64)
        .map(|i| {
            SessionSummary::new(
                &format!("rt:{i}"),
                SessionLane::Realtime,
                SessionMeasures {
                    started_at_ms: snap.now_ms - (i + 1) * 3_600_000,
                    audio_ms: 1_800_000,
                    speech_ms: 900_000,
                    longest_speech_ms: 30_000,
                    speech_runs: 40,
                },
                snap.now_ms,
                false,
            )
        })
        .collect();
    classifier(&base, "ok").classify(snap).await.unwrap();
    let (_, body) = seen.0.lock().unwrap()[0].clone();
    let user: Value =
        serde_json::from_str(body["messages"][1]["content"].as_str().unwrap()).unwrap();
    let ids: Vec<&str> = user["sessions"]
        .as_array()
        .expect("sessions")
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 30, "{ids:?}");
    assert_eq!((ids[0], ids[29]), ("rt:0", "rt:29"), "the newest 30");
    server.stop(true).await;
}

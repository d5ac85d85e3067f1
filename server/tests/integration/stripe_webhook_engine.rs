//! The Stripe webhook against the engine on a real redis-server: uids follow the token rule, and a
//! redelivered event says it changed nothing (issue #17 item 4).

use crate::common;

use common::engine_server::{EngineServer, STRIPE_SECRET, fair_use_on};
use serde_json::{Value, json};

fn checkout(id: &str, uid: &str) -> Value {
    json!({"id": id, "type": "checkout.session.completed",
           "data": {"object": {"metadata": {"uid": uid, "plan": "unlimited"}}}})
}

#[actix_web::test]
async fn a_signed_event_with_a_uid_tokens_would_refuse_changes_nothing_and_says_why() {
    let server = EngineServer::start(fair_use_on(), |_| {}).await;
    for (i, uid) in [
        "a".repeat(300),
        "../../etc".to_owned(),
        "line\nbreak".to_owned(),
        "with space".to_owned(),
        "x}y{".to_owned(),
    ]
    .iter()
    .enumerate()
    {
        let (code, body) = server
            .webhook(&checkout(&format!("evt_bad{i}"), uid), STRIPE_SECRET)
            .await
            .pair();
        assert_eq!(code, 200, "{uid:?}: {body}");
        assert_eq!(body["applied"], false, "{uid:?}: {body}");
        assert_eq!(body["ignored"], "uid_invalid", "{uid:?}: {body}");
        let stored = server
            .engine
            .plans
            .get(uid)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(stored, None, "{uid:?}: a plan was written");
    }
    server.shutdown().await;
}

#[actix_web::test]
async fn a_replayed_event_answers_duplicate_not_applied() {
    let server = EngineServer::start(fair_use_on(), |_| {}).await;
    let event = checkout("evt_once", "payer");
    let (code, first) = server.webhook(&event, STRIPE_SECRET).await.pair();
    assert_eq!((code, &first["applied"]), (200, &json!(true)), "{first}");
    assert!(first.get("duplicate").is_none(), "{first}");
    let (code, replay) = server.webhook(&event, STRIPE_SECRET).await.pair();
    assert_eq!(code, 200, "{replay}");
    assert_eq!(replay["applied"], false, "{replay}");
    assert_eq!(replay["duplicate"], true, "{replay}");
    server.shutdown().await;
}

#[actix_web::test]
async fn an_oversized_webhook_body_gets_413_in_the_json_error_shape() {
    let server = EngineServer::start(fair_use_on(), |_| {}).await;
    let resp = server
        .http
        .post(server.url("/v1/stripe/webhook"))
        .header("Stripe-Signature", "t=1,v1=00")
        .body(vec![b'{'; 2 * 1024 * 1024])
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (code, body) = common::engine_server::split(resp).await;
    assert_eq!(code, 413, "{body}");
    assert_eq!(body["code"], "request_too_large", "{body}");
    assert_eq!(body["retryable"], false, "{body}");
    assert!(body["message"].is_string(), "{body}");
    server.shutdown().await;
}

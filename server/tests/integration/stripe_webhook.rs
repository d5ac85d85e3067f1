//! `POST /v1/stripe/webhook` through the real app, with a recording payments sink.

use crate::common;

use std::sync::{Arc, Mutex};

use actix_web::http::StatusCode;
use actix_web::test;
use futures_util::future::BoxFuture;
use serde_json::{Value, json};
use voicegate_server::ServeConfig;
use voicegate_server::serve::{ServerBuilder, build_app};
use voicegate_server::stripe::{
    PaymentEvent, PaymentEventKind, PaymentOutcome, Payments, PaymentsError, sign_payload,
};

const SECRET: &str = "whsec_test_secret";

#[derive(Default)]
struct Recorder {
    events: Mutex<Vec<PaymentEvent>>,
    fail: bool,
}

impl Payments for Recorder {
    fn apply(&self, event: PaymentEvent) -> BoxFuture<'_, Result<PaymentOutcome, PaymentsError>> {
        Box::pin(async move {
            if self.fail {
                return Err(PaymentsError("store down".into()));
            }
            self.events
                .lock()
                .map_err(|e| PaymentsError(e.to_string()))?
                .push(event);
            Ok(PaymentOutcome::Applied)
        })
    }
}

async fn deliver(
    cfg: ServeConfig,
    sink: Arc<Recorder>,
    payload: &[u8],
    signature: Option<String>,
) -> (StatusCode, Value) {
    let mut builder = ServerBuilder::new(cfg).unwrap_or_else(|e| panic!("{e}"));
    builder.payments(sink);
    let app = test::init_service(build_app(builder.state().clone(), None)).await;
    let mut req = test::TestRequest::post()
        .uri("/v1/stripe/webhook")
        .set_payload(payload.to_vec());
    if let Some(sig) = signature {
        req = req.insert_header(("Stripe-Signature", sig));
    }
    let resp = test::call_service(&app, req.to_request()).await;
    let status = resp.status();
    let retry_after = resp
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap_or("<not text>").to_owned());
    let body: Value = test::read_body_json(resp).await;
    if status.as_u16() >= 400 {
        crate::common::refusal::assert_refusal(
            "webhook refusal",
            status.as_u16(),
            retry_after.as_deref(),
            &body,
        );
    }
    (status, body)
}

fn cfg() -> ServeConfig {
    ServeConfig {
        stripe_webhook_secret: Some(SECRET.into()),
        ..common::config()
    }
}

fn checkout(uid: &str) -> Vec<u8> {
    json!({"id": "evt_42", "type": "checkout.session.completed",
           "data": {"object": {"metadata": {"uid": uid, "plan": "unlimited"}}}})
    .to_string()
    .into_bytes()
}

fn recorded(sink: &Recorder) -> Vec<PaymentEvent> {
    sink.events.lock().map(|e| e.clone()).unwrap_or_default()
}

#[actix_web::test]
async fn correctly_signed_checkout_applies_the_plan() {
    let sink = Arc::new(Recorder::default());
    let payload = checkout("u-paid");
    let sig = sign_payload(&payload, SECRET.as_bytes(), common::now());
    let (status, body) = deliver(cfg(), sink.clone(), &payload, Some(sig)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["applied"], true);
    assert_eq!(
        recorded(&sink),
        vec![PaymentEvent {
            event_id: "evt_42".into(),
            kind: PaymentEventKind::CheckoutCompleted,
            uid: "u-paid".into(),
            plan: "unlimited".into(),
            created_ms: 0,
        }]
    );
}

#[actix_web::test]
async fn badly_signed_webhook_answers_400_and_changes_nothing() {
    let sink = Arc::new(Recorder::default());
    let payload = checkout("u-attacker");
    let sig = sign_payload(&payload, b"whsec_guess", common::now());
    let (status, body) = deliver(cfg(), sink.clone(), &payload, Some(sig)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["code"], "stripe_signature_mismatch");
    assert!(recorded(&sink).is_empty());
}

#[actix_web::test]
async fn replayed_old_signature_answers_400() {
    let sink = Arc::new(Recorder::default());
    let payload = checkout("u1");
    let sig = sign_payload(&payload, SECRET.as_bytes(), common::now() - 3600);
    let (status, body) = deliver(cfg(), sink.clone(), &payload, Some(sig)).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("stripe_signature_expired"))
    );
    assert!(recorded(&sink).is_empty());
}

#[actix_web::test]
async fn missing_signature_answers_400() {
    let sink = Arc::new(Recorder::default());
    let (status, body) = deliver(cfg(), sink.clone(), &checkout("u1"), None).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("stripe_signature_missing"))
    );
    assert!(recorded(&sink).is_empty());
}

#[actix_web::test]
async fn signed_unhandled_event_answers_200_and_changes_nothing() {
    let sink = Arc::new(Recorder::default());
    let payload = json!({"id": "evt_9", "type": "invoice.paid", "data": {"object": {}}})
        .to_string()
        .into_bytes();
    let sig = sign_payload(&payload, SECRET.as_bytes(), common::now());
    let (status, body) = deliver(cfg(), sink.clone(), &payload, Some(sig)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["applied"], false);
    assert!(recorded(&sink).is_empty());
}

#[actix_web::test]
async fn sink_failure_answers_500_so_stripe_retries() {
    let sink = Arc::new(Recorder {
        fail: true,
        ..Recorder::default()
    });
    let payload = checkout("u1");
    let sig = sign_payload(&payload, SECRET.as_bytes(), common::now());
    let (status, body) = deliver(cfg(), sink, &payload, Some(sig)).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(body["code"], "payment_apply_failed");
}

#[actix_web::test]
async fn unconfigured_webhook_answers_503() {
    let sink = Arc::new(Recorder::default());
    let payload = checkout("u1");
    let sig = sign_payload(&payload, SECRET.as_bytes(), common::now());
    let (status, body) = deliver(common::config(), sink.clone(), &payload, Some(sig)).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Some("stripe_not_configured")
        )
    );
    assert!(recorded(&sink).is_empty());
}

//! `/healthz`, `/readyz` and `/metrics` through the real app.

use crate::common;

use std::sync::Arc;

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, test, web};
use futures_util::future::BoxFuture;
use serde_json::Value;
use voicegate_server::health::StoreHealth;
use voicegate_server::serve::{ServerBuilder, build_app};

struct DownStore;

impl StoreHealth for DownStore {
    fn kind(&self) -> &'static str {
        "redis"
    }
    fn check(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async { Err("connection refused".to_owned()) })
    }
}

async fn get(builder: &ServerBuilder, uri: &str) -> (StatusCode, String) {
    let routes = |cfg: &mut web::ServiceConfig| {
        cfg.route(
            "/v1/things/{id}",
            web::get().to(|| async { HttpResponse::Ok().finish() }),
        );
    };
    let app = test::init_service(build_app(builder.state().clone(), Some(Arc::new(routes)))).await;
    let resp = test::call_service(&app, test::TestRequest::get().uri(uri).to_request()).await;
    let status = resp.status();
    let body = test::read_body(resp).await;
    (status, String::from_utf8_lossy(&body).into_owned())
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

fn builder() -> ServerBuilder {
    ServerBuilder::new(common::config()).unwrap_or_else(|e| panic!("{e}"))
}

#[actix_web::test]
async fn healthz_is_always_ok() {
    let b = builder();
    assert_eq!(get(&b, "/healthz").await.0, StatusCode::OK);
    b.state().readiness.set_draining();
    assert_eq!(get(&b, "/healthz").await.0, StatusCode::OK);
}

#[actix_web::test]
async fn readyz_fails_while_starting_and_draining_only() {
    let b = builder();
    let (status, body) = get(&b, "/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(json(&body)["status"], "starting");
    b.state().readiness.set_ready();
    let (status, body) = get(&b, "/readyz").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json(&body)["store"]["reachable"], true);
    b.state().readiness.set_draining();
    let (status, body) = get(&b, "/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(json(&body)["status"], "draining");
}

#[actix_web::test]
async fn unreachable_store_is_reported_but_does_not_fail_readiness() {
    let mut b = builder();
    b.store_health(Arc::new(DownStore));
    b.state().readiness.set_ready();
    let (status, body) = get(&b, "/readyz").await;
    assert_eq!(
        status,
        StatusCode::OK,
        "metering fails open, so readiness must not fail: {body}"
    );
    let body = json(&body);
    assert_eq!(body["store"]["kind"], "redis");
    assert_eq!(body["store"]["reachable"], false);
    assert_eq!(body["store"]["error"], "connection refused");
    let (_, metrics) = get(&b, "/metrics").await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("voicegate_store_up") && l.ends_with(" 0")),
        "{metrics}"
    );
}

#[actix_web::test]
async fn unknown_route_answers_json_404() {
    let b = builder();
    let (status, body) = get(&b, "/nope").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(json(&body)["code"], "route_not_found");
}

#[actix_web::test]
async fn request_latency_is_labelled_by_route_pattern_never_by_raw_path() {
    let b = builder();
    get(&b, "/v1/things/secret-user-id-123").await;
    let (status, metrics) = get(&b, "/metrics").await;
    assert_eq!(status, StatusCode::OK);
    let bucket = metrics.lines().find(|l| {
        l.starts_with("voicegate_http_request_duration_seconds_bucket")
            && l.contains("route=\"/v1/things/{id}\"")
    });
    assert!(
        bucket.is_some(),
        "no bucket for the route pattern in:\n{metrics}"
    );
    assert!(
        !metrics.contains("secret-user-id-123"),
        "raw path leaked into metrics"
    );
    assert!(!metrics.contains("uid="), "no metric may carry a uid label");
}

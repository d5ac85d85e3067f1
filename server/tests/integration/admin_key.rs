//! The `X-Admin-Key` check through the real app: 422 missing, 403 wrong, 200 right.

use crate::common;

use std::sync::Arc;

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, test, web};
use serde_json::Value;
use voicegate_server::ServeConfig;
use voicegate_server::admin::Admin;
use voicegate_server::serve::{ServerBuilder, build_app};

async fn flagged(_admin: Admin) -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"users": []}))
}

async fn call(admin_key: Option<&str>, header: Option<&str>) -> (StatusCode, Value) {
    let cfg = ServeConfig {
        admin_key: admin_key.map(str::to_owned),
        ..common::config()
    };
    let builder = ServerBuilder::new(cfg).unwrap_or_else(|e| panic!("{e}"));
    let routes = |cfg: &mut web::ServiceConfig| {
        cfg.route("/v1/admin/fair-use/flagged", web::get().to(flagged));
    };
    let app = test::init_service(build_app(builder.state().clone(), Some(Arc::new(routes)))).await;
    let mut req = test::TestRequest::get().uri("/v1/admin/fair-use/flagged");
    if let Some(h) = header {
        req = req.insert_header(("X-Admin-Key", h));
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
            "admin key refusal",
            status.as_u16(),
            retry_after.as_deref(),
            &body,
        );
    }
    (status, body)
}

#[actix_web::test]
async fn right_admin_key_passes() {
    let (status, body) = call(Some("s3cret"), Some("s3cret")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[actix_web::test]
async fn missing_admin_key_answers_422() {
    let (status, body) = call(Some("s3cret"), None).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("admin_key_missing"))
    );
}

#[actix_web::test]
async fn wrong_admin_key_answers_403() {
    for wrong in ["s3cre", "s3cret ", "S3CRET", ""] {
        let (status, body) = call(Some("s3cret"), Some(wrong)).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (StatusCode::FORBIDDEN, Some("admin_key_invalid")),
            "{wrong:?}"
        );
    }
}

#[actix_web::test]
async fn admin_routes_are_closed_when_no_key_is_configured() {
    let (status, _) = call(None, Some("")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

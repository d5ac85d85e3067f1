//! Bearer-token authentication through the real app: HS256, RS256 via a JWKS file, and dev mode.

use crate::common;

use std::sync::Arc;

use actix_web::http::{StatusCode, header};
use actix_web::test;
use common::*;
use serde_json::{Value, json};
use voicegate_server::ServeConfig;
use voicegate_server::config::ConfigError;
use voicegate_server::serve::{ServeError, ServerBuilder, build_app};

async fn call(cfg: ServeConfig, authorization: Option<String>) -> (StatusCode, Value) {
    let builder = ServerBuilder::new(cfg).unwrap_or_else(|e| panic!("{e}"));
    let app = test::init_service(build_app(
        builder.state().clone(),
        Some(Arc::new(whoami_routes)),
    ))
    .await;
    let mut req = test::TestRequest::get().uri("/whoami");
    if let Some(value) = authorization {
        req = req.insert_header((header::AUTHORIZATION, value));
    }
    let resp = test::call_service(&app, req.to_request()).await;
    let status = resp.status();
    let retry_after = resp
        .headers()
        .get(header::RETRY_AFTER)
        .map(|v| v.to_str().unwrap_or("<not text>").to_owned());
    let body: Value = test::read_body_json(resp).await;
    if status.as_u16() >= 400 {
        crate::common::refusal::assert_refusal(
            "auth refusal",
            status.as_u16(),
            retry_after.as_deref(),
            &body,
        );
    }
    (status, body)
}

fn hs_config() -> ServeConfig {
    ServeConfig {
        jwt_hs256_secret: Some(HS_SECRET.into()),
        jwt_audience: Some("voicegate-test".into()),
        jwt_issuer: Some("https://issuer.test".into()),
        ..config()
    }
}

fn good_claims() -> Value {
    json!({"sub": "user-1", "exp": now() + 600, "aud": "voicegate-test", "iss": "https://issuer.test"})
}

fn with(mut claims: Value, key: &str, value: Value) -> Value {
    claims[key] = value;
    claims
}

fn without(mut claims: Value, key: &str) -> Value {
    if let Some(map) = claims.as_object_mut() {
        map.remove(key);
    }
    claims
}

async fn hs_status(claims: Value) -> (StatusCode, Value) {
    call(hs_config(), Some(format!("Bearer {}", hs256_token(claims)))).await
}

#[actix_web::test]
async fn valid_hs256_token_authenticates_its_subject() {
    let (status, body) = hs_status(good_claims()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["uid"], "user-1");
}

#[actix_web::test]
async fn no_token_answers_401_auth_missing() {
    let (status, body) = call(hs_config(), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["code"], "auth_missing");
    assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
}

#[actix_web::test]
async fn non_bearer_scheme_answers_401_auth_malformed() {
    let (status, body) = call(hs_config(), Some("Basic dXNlcjpwdw==".into())).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("auth_malformed"))
    );
}

#[actix_web::test]
async fn expired_token_answers_401_token_expired() {
    let (status, body) = hs_status(with(good_claims(), "exp", json!(now() - 3600))).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("token_expired"))
    );
}

#[actix_web::test]
async fn token_signed_with_another_secret_answers_401_bad_signature() {
    let forged = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &good_claims(),
        &jsonwebtoken::EncodingKey::from_secret(b"not-the-secret"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let (status, body) = call(hs_config(), Some(format!("Bearer {forged}"))).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("token_bad_signature"))
    );
}

#[actix_web::test]
async fn wrong_audience_answers_401_token_wrong_audience() {
    let (status, body) = hs_status(with(good_claims(), "aud", json!("someone-else"))).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("token_wrong_audience"))
    );
}

#[actix_web::test]
async fn missing_audience_is_refused_when_an_audience_is_configured() {
    let (status, body) = hs_status(without(good_claims(), "aud")).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("token_missing_claim"))
    );
}

#[actix_web::test]
async fn wrong_issuer_answers_401_token_wrong_issuer() {
    let (status, body) = hs_status(with(good_claims(), "iss", json!("https://evil.test"))).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("token_wrong_issuer"))
    );
}

#[actix_web::test]
async fn token_without_sub_or_exp_is_refused() {
    for claim in ["sub", "exp"] {
        let (status, body) = hs_status(without(good_claims(), claim)).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (StatusCode::UNAUTHORIZED, Some("token_missing_claim")),
            "{claim}"
        );
    }
}

#[actix_web::test]
async fn garbage_token_answers_401_token_invalid() {
    let (status, body) = call(hs_config(), Some("Bearer not.a.jwt".into())).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("token_invalid"))
    );
}

#[actix_web::test]
async fn uid_as_bearer_is_refused_when_verification_is_configured() {
    let (status, body) = call(hs_config(), Some("Bearer user-1".into())).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("token_invalid"))
    );
}

fn rs_config(jwks: &tempfile::NamedTempFile) -> ServeConfig {
    ServeConfig {
        jwks: Some(jwks.path().to_string_lossy().into_owned()),
        ..config()
    }
}

fn rs_claims() -> Value {
    json!({"sub": "firebase-uid-7", "exp": now() + 600})
}

#[actix_web::test]
async fn valid_rs256_token_from_the_jwks_authenticates() {
    let key = fixture("test_rsa_key.der");
    let jwks = jwks_file(&key, "k1");
    let token = rs256_token(&key, Some("k1"), rs_claims());
    let (status, body) = call(rs_config(&jwks), Some(format!("Bearer {token}"))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["uid"], "firebase-uid-7");
}

#[actix_web::test]
async fn rs256_token_signed_by_a_key_outside_the_jwks_answers_bad_signature() {
    let jwks = jwks_file(&fixture("test_rsa_key.der"), "k1");
    let forged = rs256_token(&fixture("other_rsa_key.der"), Some("k1"), rs_claims());
    let (status, body) = call(rs_config(&jwks), Some(format!("Bearer {forged}"))).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("token_bad_signature"))
    );
}

#[actix_web::test]
async fn rs256_token_with_unknown_kid_answers_token_unknown_key() {
    let key = fixture("test_rsa_key.der");
    let jwks = jwks_file(&key, "k1");
    let token = rs256_token(&key, Some("rotated-away"), rs_claims());
    let (status, body) = call(rs_config(&jwks), Some(format!("Bearer {token}"))).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("token_unknown_key"))
    );
}

#[actix_web::test]
async fn hs256_token_is_refused_when_only_a_jwks_is_configured() {
    // An attacker must not be able to pick HMAC and sign with something public.
    let jwks = jwks_file(&fixture("test_rsa_key.der"), "k1");
    let token = hs256_token(rs_claims());
    let (status, body) = call(rs_config(&jwks), Some(format!("Bearer {token}"))).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("token_wrong_algorithm"))
    );
}

#[actix_web::test]
async fn dev_mode_on_loopback_takes_the_bearer_as_uid() {
    let (status, body) = call(config(), Some("Bearer dev-user".into())).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["uid"], "dev-user");
}

#[actix_web::test]
async fn dev_mode_on_a_public_bind_refuses_to_start() {
    let cfg = ServeConfig {
        bind: "0.0.0.0:0".into(),
        ..config()
    };
    match ServerBuilder::new(cfg) {
        Err(ServeError::Config(ConfigError::DevAuthOnPublicBind { .. })) => {}
        Err(other) => panic!("wrong error: {other}"),
        Ok(_) => panic!("a public bind without verification must not start"),
    }
}

#[actix_web::test]
async fn missing_jwks_file_refuses_to_start() {
    let cfg = ServeConfig {
        jwks: Some("/nonexistent/jwks.json".into()),
        ..config()
    };
    assert!(matches!(ServerBuilder::new(cfg), Err(ServeError::Keys(_))));
}

#[actix_web::test]
async fn rotated_key_is_accepted_after_the_jwks_file_is_reloaded() {
    use voicegate_server::auth::{AuthError, Authenticator};
    let old_key = fixture("test_rsa_key.der");
    let new_key = fixture("other_rsa_key.der");
    let jwks = jwks_file(&old_key, "k1");
    let auth = Authenticator::from_config(&rs_config(&jwks), &outbound())
        .unwrap_or_else(|e| panic!("{e}"));
    let token = rs256_token(&new_key, Some("k2"), rs_claims());
    assert_eq!(auth.verify(&token), Err(AuthError::UnknownKey));

    let rotated = jwks_file(&new_key, "k2");
    std::fs::copy(rotated.path(), jwks.path()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(auth.reload_jwks().ok(), Some(1));
    assert_eq!(
        auth.verify(&token).map(|u| u.uid),
        Ok("firebase-uid-7".to_owned())
    );

    std::fs::write(jwks.path(), "garbage").unwrap_or_else(|e| panic!("{e}"));
    assert!(auth.reload_jwks().is_err());
    assert!(
        auth.verify(&token).is_ok(),
        "a failed reload keeps the keys in use"
    );
}

#[actix_web::test]
async fn a_token_not_valid_yet_answers_401_token_not_yet_valid() {
    // `nbf` an hour ahead: refused (it was ignored before).
    let (status, body) = hs_status(with(good_claims(), "nbf", json!(now() + 3_600))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body["code"], "token_not_yet_valid", "{body}");
    // `iat` an hour ahead: a token from the future is refused the same way.
    let (status, body) = hs_status(with(good_claims(), "iat", json!(now() + 3_600))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body["code"], "token_not_yet_valid", "{body}");
    // Within the documented 30 s clock skew both pass.
    let skewed = with(
        with(good_claims(), "nbf", json!(now() + 10)),
        "iat",
        json!(now() + 10),
    );
    let (status, body) = hs_status(skewed).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

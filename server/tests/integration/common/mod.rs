//! Helpers shared by the server's integration tests.
#![allow(dead_code)]

pub mod engine_server;
pub mod gated;
pub mod http_double;
pub mod refusal;

use std::time::{SystemTime, UNIX_EPOCH};

use actix_web::{HttpResponse, web};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
use voicegate_server::ServeConfig;
use voicegate_server::auth::AuthedUser;

pub const HS_SECRET: &str = "test-hs256-secret";

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// A config with every secret unset and the loopback bind of the defaults.
pub fn config() -> ServeConfig {
    ServeConfig {
        bind: "127.0.0.1:0".into(),
        ..ServeConfig::default()
    }
}

pub fn hs256_token(claims: serde_json::Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(HS_SECRET.as_bytes()),
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

pub fn rs256_token(key_der: &[u8], kid: Option<&str>, claims: serde_json::Value) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, &claims, &EncodingKey::from_rsa_der(key_der))
        .unwrap_or_else(|e| panic!("{e}"))
}

/// A JWK set holding the public half of `key_der` under `kid`.
pub fn jwks_json(key_der: &[u8], kid: &str) -> serde_json::Value {
    let key = EncodingKey::from_rsa_der(key_der);
    let mut jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&key, Algorithm::RS256)
        .unwrap_or_else(|e| panic!("{e}"));
    jwk.common.key_id = Some(kid.to_owned());
    json!({ "keys": [jwk] })
}

/// The shared outbound client with the built-in roots.
pub fn outbound() -> voicegate_engine::outbound::Outbound {
    voicegate_engine::outbound::Outbound::new(None).unwrap_or_else(|e| panic!("{e}"))
}

/// Writes a JWKS holding the public half of `key_der` under `kid`; returns the file.
pub fn jwks_file(key_der: &[u8], kid: &str) -> tempfile::NamedTempFile {
    let set = jwks_json(key_der, kid);
    let file = tempfile::NamedTempFile::new().unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(file.path(), set.to_string()).unwrap_or_else(|e| panic!("{e}"));
    file
}

/// A protected route: answers the caller's uid.
pub async fn whoami(user: AuthedUser) -> HttpResponse {
    HttpResponse::Ok().json(json!({ "uid": user.uid }))
}

pub fn whoami_routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/whoami", web::get().to(whoami));
}

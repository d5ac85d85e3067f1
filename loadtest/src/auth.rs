//! The `Authorization` header of each simulated user: dev bearer (the uid) or a minted HS256 JWT.

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;

#[derive(Debug, Clone)]
pub enum AuthMode {
    /// `Authorization: Bearer <uid>` (the server's dev mode: loopback bind, no verification configured).
    Dev,
    /// HS256 tokens signed with this secret (`VOICEGATE_JWT_HS256_SECRET` on the server).
    Hs256(String),
}

impl AuthMode {
    pub fn parse(s: &str) -> Result<AuthMode, String> {
        if s == "dev" {
            return Ok(AuthMode::Dev);
        }
        match s.strip_prefix("hs256:") {
            Some(secret) if !secret.is_empty() => Ok(AuthMode::Hs256(secret.to_owned())),
            _ => Err("expected `dev` or `hs256:<secret>`".into()),
        }
    }
}

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    iat: u64,
    exp: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
}

/// Mints headers; tokens live for `ttl_secs`.
#[derive(Debug, Clone)]
pub struct Authenticator {
    pub mode: AuthMode,
    pub audience: Option<String>,
    pub issuer: Option<String>,
    pub ttl_secs: u64,
}

impl Authenticator {
    /// The `Authorization` header value for `uid`.
    pub fn header(&self, uid: &str) -> Result<String, String> {
        match &self.mode {
            AuthMode::Dev => Ok(format!("Bearer {uid}")),
            AuthMode::Hs256(secret) => {
                let now = unix_now();
                let claims = Claims {
                    sub: uid,
                    iat: now,
                    exp: now + self.ttl_secs,
                    aud: self.audience.as_deref(),
                    iss: self.issuer.as_deref(),
                };
                jsonwebtoken::encode(
                    &Header::new(Algorithm::HS256),
                    &claims,
                    &EncodingKey::from_secret(secret.as_bytes()),
                )
                .map(|t| format!("Bearer {t}"))
                .map_err(|e| format!("minting a token failed: {e}"))
            }
        }
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_dev_and_hs256_and_rejects_the_rest() {
        assert!(matches!(AuthMode::parse("dev"), Ok(AuthMode::Dev)));
        assert!(matches!(AuthMode::parse("hs256:s3"), Ok(AuthMode::Hs256(s)) if s == "s3"));
        assert!(AuthMode::parse("hs256:").is_err());
        assert!(AuthMode::parse("rs256:x").is_err());
    }

    #[test]
    fn minted_token_verifies_with_the_secret_and_carries_the_uid() {
        let auth = Authenticator {
            mode: AuthMode::Hs256("k".into()),
            audience: Some("aud1".into()),
            issuer: None,
            ttl_secs: 60,
        };
        let header = auth.header("u7").unwrap();
        let token = header.strip_prefix("Bearer ").unwrap();
        let mut v = jsonwebtoken::Validation::new(Algorithm::HS256);
        v.set_audience(&["aud1"]);
        let data = jsonwebtoken::decode::<serde_json::Value>(
            token,
            &jsonwebtoken::DecodingKey::from_secret(b"k"),
            &v,
        )
        .unwrap();
        assert_eq!(data.claims["sub"], "u7");
    }
}

//! Bearer-token authentication for every user route and the websocket upgrade.
//!
//! - RS256 ID tokens (Firebase-compatible) verified against a JWKS, and/or HS256 tokens against a secret.
//!   Both require `sub` (the uid) and `exp`; `aud`/`iss` are required and checked when configured. The JWKS
//!   is a file (re-read every minute) or a URL kept fresh by [`remote`] (Cache-Control, unknown `kid`).
//! - Dev mode (bearer = uid) exists only when no verification is configured and the bind is loopback; the
//!   config refuses a public bind without verification, so dev mode can never face the network.
//! - Handlers take an [`AuthedUser`] argument; a rejection is a 401 with a stable `code`, except the two
//!   answers of a JWKS URL not (yet) holding the token's key: 503 `auth_keys_unavailable` (no key fetched
//!   yet) and 503 `token_key_refreshing` (an unknown `kid` is being looked up), both retryable.

pub mod remote;

use std::collections::HashSet;
use std::future::{Ready, ready};
use std::path::Path;
use std::sync::{Arc, RwLock};

use actix_web::http::header;
use actix_web::{FromRequest, HttpRequest, dev::Payload, web};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};
use serde::Deserialize;

use voicegate_engine::outbound::Outbound;

use crate::config::ServeConfig;
use crate::error::ApiError;
use crate::error::IMMEDIATE_RETRY_AFTER_S;
use crate::throttle::AuthThrottle;

/// Clock skew tolerated on `exp`, in seconds.
const LEEWAY_SECS: u64 = 30;
/// Longest accepted uid (Firebase uids are ≤ 128 characters).
const MAX_UID_LEN: usize = 128;

/// Why a request was not authenticated. Each variant's [`code`](AuthError::code) is stable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing Authorization header")]
    Missing,
    #[error("Authorization header must be `Bearer <token>`")]
    Malformed,
    #[error("token has expired")]
    Expired,
    #[error("token signature is invalid")]
    BadSignature,
    #[error("token audience does not match")]
    WrongAudience,
    #[error("token issuer does not match")]
    WrongIssuer,
    #[error("token is missing the required claim `{0}`")]
    MissingClaim(String),
    #[error("token was signed by an unknown key")]
    UnknownKey,
    #[error("token algorithm is not accepted")]
    WrongAlgorithm,
    #[error("token is not a valid JWT")]
    Invalid,
    #[error("uid must be 1-128 characters of [A-Za-z0-9_.:@-]")]
    BadUid,
    #[error("token is not valid yet (`nbf` or `iat` in the future beyond the 30 s clock skew)")]
    NotYetValid,
    #[error("the RS256 signing keys (VOICEGATE_JWKS URL) could not be fetched yet; retry shortly")]
    KeysUnavailable,
    #[error(
        "token was signed by a key not known yet; the key set is being refreshed, retry in a second"
    )]
    KeyRefreshing,
}

impl From<AuthError> for ApiError {
    /// 401 with the token's code and a `WWW-Authenticate: Bearer` challenge; the server-side misses of a
    /// JWKS URL are 503s, retryable.
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::KeysUnavailable => ApiError::unavailable(e.code(), e.to_string()),
            AuthError::KeyRefreshing => {
                ApiError::unavailable(e.code(), e.to_string()).retry_after(IMMEDIATE_RETRY_AFTER_S)
            }
            _ => ApiError::unauthorized(e.code(), e.to_string()),
        }
    }
}

impl AuthError {
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::Missing => "auth_missing",
            AuthError::Malformed => "auth_malformed",
            AuthError::Expired => "token_expired",
            AuthError::BadSignature => "token_bad_signature",
            AuthError::WrongAudience => "token_wrong_audience",
            AuthError::WrongIssuer => "token_wrong_issuer",
            AuthError::MissingClaim(_) => "token_missing_claim",
            AuthError::UnknownKey => "token_unknown_key",
            AuthError::WrongAlgorithm => "token_wrong_algorithm",
            AuthError::Invalid => "token_invalid",
            AuthError::BadUid => "uid_invalid",
            AuthError::NotYetValid => "token_not_yet_valid",
            AuthError::KeysUnavailable => "auth_keys_unavailable",
            AuthError::KeyRefreshing => "token_key_refreshing",
        }
    }

    /// True for the answers that are the server's miss, not the client's fault (not throttled).
    pub fn is_server_side(&self) -> bool {
        matches!(self, AuthError::KeysUnavailable | AuthError::KeyRefreshing)
    }
}

/// The JWKS or secret could not be loaded at startup.
#[derive(Debug, thiserror::Error)]
pub enum KeyLoadError {
    #[error(transparent)]
    Url(#[from] crate::config::ConfigError),
    #[error("cannot read JWKS file {path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("JWKS file {path} is not a JWK set: {error}")]
    Parse {
        path: String,
        error: serde_json::Error,
    },
    #[error("JWKS file {path} holds no usable RS256 key")]
    NoUsableKey { path: String },
    #[error("VOICEGATE_JWT_HS256_SECRET is empty")]
    EmptySecret,
}

/// The authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthedUser {
    pub uid: String,
}

#[derive(Deserialize)]
struct Claims {
    /// Optional here so a token without `sub` is reported as a missing claim, not as unparsable.
    sub: Option<String>,
    /// Issued-at: a token issued in the future (beyond the skew) is refused like an early `nbf`.
    iat: Option<u64>,
}

struct RsaKey {
    kid: Option<String>,
    key: DecodingKey,
}

enum Mode {
    /// Bearer = uid. Only constructed for a loopback bind with no verification configured.
    Dev,
    Verify(Box<Verifier>),
}

/// Where the RS256 keys come from.
enum JwksSource {
    File(String),
    Url(Box<remote::RemoteJwks>),
}

struct Verifier {
    /// Swapped whole by [`Authenticator::reload_jwks`] (a file) or [`remote`] (a URL); readers clone the
    /// `Arc` and never block a reload.
    rsa: RwLock<Arc<Vec<RsaKey>>>,
    jwks: Option<JwksSource>,
    hs256: Option<DecodingKey>,
    rs_validation: Validation,
    hs_validation: Validation,
}

/// Verifies bearer tokens. Built once at startup, shared by every worker.
pub struct Authenticator {
    mode: Mode,
    /// Failed authentications per client address ([`crate::throttle`]).
    throttle: AuthThrottle,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.is_dev() {
            "Authenticator(dev)"
        } else {
            "Authenticator(verify)"
        })
    }
}

impl Authenticator {
    /// Dev mode: the bearer token is the uid. Callers must have checked the bind is loopback
    /// ([`ServeConfig::validate`] does).
    pub fn dev() -> Self {
        Authenticator {
            mode: Mode::Dev,
            throttle: AuthThrottle::default(),
        }
    }

    /// Builds the verifier the configuration asks for: dev mode when nothing is configured. A JWKS file is
    /// read now; a JWKS URL starts with no key and is fetched through `outbound` by
    /// [`refresh_jwks_url`](Self::refresh_jwks_url) and [`remote::refresh_forever`].
    pub fn from_config(cfg: &ServeConfig, outbound: &Outbound) -> Result<Self, KeyLoadError> {
        if !cfg.has_token_verification() {
            return Ok(Self::dev());
        }
        let (rsa, jwks) = match (cfg.jwks_url()?, &cfg.jwks) {
            (Some(url), _) => {
                let remote = remote::RemoteJwks::new(
                    url,
                    outbound.http().clone(),
                    cfg.jwks_refresh_bounds(),
                );
                (Vec::new(), Some(JwksSource::Url(Box::new(remote))))
            }
            (None, Some(path)) => (load_jwks(path)?, Some(JwksSource::File(path.clone()))),
            (None, None) => (Vec::new(), None),
        };
        let hs256 = match &cfg.jwt_hs256_secret {
            Some(s) if s.is_empty() => return Err(KeyLoadError::EmptySecret),
            Some(s) => Some(DecodingKey::from_secret(s.as_bytes())),
            None => None,
        };
        let audience = cfg.jwt_audience.as_deref();
        let issuer = cfg.jwt_issuer.as_deref();
        Ok(Authenticator {
            mode: Mode::Verify(Box::new(Verifier {
                rsa: RwLock::new(Arc::new(rsa)),
                jwks,
                hs256,
                rs_validation: validation(Algorithm::RS256, audience, issuer),
                hs_validation: validation(Algorithm::HS256, audience, issuer),
            })),
            throttle: AuthThrottle::default(),
        })
    }

    /// Throttles failed authentications with `throttle` (the server's settings; the default otherwise).
    #[must_use]
    pub fn with_throttle(mut self, throttle: AuthThrottle) -> Self {
        self.throttle = throttle;
        self
    }

    pub fn is_dev(&self) -> bool {
        matches!(self.mode, Mode::Dev)
    }

    /// Authenticates the value of an `Authorization` header.
    pub fn authenticate_header(&self, value: Option<&str>) -> Result<AuthedUser, AuthError> {
        let value = value.ok_or(AuthError::Missing)?.trim();
        let (scheme, token) = value.split_once(' ').ok_or(AuthError::Malformed)?;
        let token = token.trim();
        if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
            return Err(AuthError::Malformed);
        }
        self.verify(token)
    }

    /// Verifies one bearer token and returns the caller.
    pub fn verify(&self, token: &str) -> Result<AuthedUser, AuthError> {
        let v = match &self.mode {
            Mode::Dev => return checked_uid(token),
            Mode::Verify(v) => v,
        };
        let head = decode_header(token).map_err(|_| AuthError::Invalid)?;
        let (key, validation) = match head.alg {
            Algorithm::RS256 => {
                let keys = Arc::clone(&v.rsa.read().unwrap_or_else(|p| p.into_inner()));
                return match pick_rsa_key(&keys, head.kid.as_deref()) {
                    Ok(key) => finish(decode::<Claims>(token, key, &v.rs_validation)),
                    Err(e) => Err(v.missing_key(&keys, head.kid.is_some(), e)),
                };
            }
            Algorithm::HS256 => (
                v.hs256.as_ref().ok_or(AuthError::WrongAlgorithm)?,
                &v.hs_validation,
            ),
            _ => return Err(AuthError::WrongAlgorithm),
        };
        finish(decode::<Claims>(token, key, validation))
    }

    /// Re-reads the JWKS file (Firebase rotates its keys; a sidecar refreshes the file). On error the keys in
    /// use are kept. Returns the number of keys now loaded; `Ok(0)` when no JWKS file is configured (a JWKS
    /// URL is refreshed by [`refresh_jwks_url`](Self::refresh_jwks_url)).
    pub fn reload_jwks(&self) -> Result<usize, KeyLoadError> {
        let Mode::Verify(v) = &self.mode else {
            return Ok(0);
        };
        let Some(JwksSource::File(path)) = &v.jwks else {
            return Ok(0);
        };
        let keys = load_jwks(path)?;
        let n = keys.len();
        *v.rsa.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(keys);
        Ok(n)
    }

    /// True when RS256 keys come from a JWKS file that [`reload_jwks`](Self::reload_jwks) can refresh.
    pub fn has_jwks(&self) -> bool {
        matches!(&self.mode, Mode::Verify(v) if matches!(v.jwks, Some(JwksSource::File(_))))
    }
}

fn finish(
    decoded: jsonwebtoken::errors::Result<jsonwebtoken::TokenData<Claims>>,
) -> Result<AuthedUser, AuthError> {
    let data = decoded.map_err(|e| map_jwt_error(e.kind()))?;
    let now = jsonwebtoken::get_current_timestamp();
    if data
        .claims
        .iat
        .is_some_and(|iat| iat > now.saturating_add(LEEWAY_SECS))
    {
        return Err(AuthError::NotYetValid);
    }
    let sub = data
        .claims
        .sub
        .ok_or_else(|| AuthError::MissingClaim("sub".to_owned()))?;
    checked_uid(&sub)
}

fn validation(alg: Algorithm, audience: Option<&str>, issuer: Option<&str>) -> Validation {
    let mut v = Validation::new(alg);
    v.leeway = LEEWAY_SECS;
    v.validate_nbf = true;
    // jsonwebtoken only checks aud/iss when the claim is present, so a configured check must also require it.
    let mut required = vec!["sub", "exp"];
    match audience {
        Some(aud) => {
            v.set_audience(&[aud]);
            required.push("aud");
        }
        None => v.validate_aud = false,
    }
    if let Some(iss) = issuer {
        v.set_issuer(&[iss]);
        required.push("iss");
    }
    v.required_spec_claims = required
        .into_iter()
        .map(str::to_owned)
        .collect::<HashSet<_>>();
    v
}

fn pick_rsa_key<'a>(keys: &'a [RsaKey], kid: Option<&str>) -> Result<&'a DecodingKey, AuthError> {
    match kid {
        Some(kid) => keys
            .iter()
            .find(|k| k.kid.as_deref() == Some(kid))
            .map(|k| &k.key),
        // A token without `kid` is only unambiguous when there is exactly one key.
        None if keys.len() == 1 => keys.first().map(|k| &k.key),
        None => None,
    }
    .ok_or(AuthError::UnknownKey)
}

fn map_jwt_error(kind: &ErrorKind) -> AuthError {
    match kind {
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::InvalidSignature => AuthError::BadSignature,
        ErrorKind::InvalidAudience => AuthError::WrongAudience,
        ErrorKind::InvalidIssuer => AuthError::WrongIssuer,
        ErrorKind::MissingRequiredClaim(c) => AuthError::MissingClaim(c.clone()),
        ErrorKind::InvalidAlgorithm => AuthError::WrongAlgorithm,
        _ => AuthError::Invalid,
    }
}

/// Whether `uid` may name a user: 1–128 characters of `[A-Za-z0-9_.:@-]`. A uid goes into store keys
/// (inside a `{uid}` hash tag) and logs, so every way in (tokens, the Stripe webhook) checks it here.
pub fn uid_is_valid(uid: &str) -> bool {
    !uid.is_empty()
        && uid.len() <= MAX_UID_LEN
        && uid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':' | b'@'))
}

fn checked_uid(uid: &str) -> Result<AuthedUser, AuthError> {
    if uid_is_valid(uid) {
        Ok(AuthedUser {
            uid: uid.to_owned(),
        })
    } else {
        Err(AuthError::BadUid)
    }
}

fn load_jwks(source: &str) -> Result<Vec<RsaKey>, KeyLoadError> {
    let text = std::fs::read_to_string(Path::new(source)).map_err(|error| KeyLoadError::Read {
        path: source.to_owned(),
        error,
    })?;
    parse_jwks(&text).map_err(|e| match e {
        JwksParseError::Json(error) => KeyLoadError::Parse {
            path: source.to_owned(),
            error,
        },
        JwksParseError::NoKey => KeyLoadError::NoUsableKey {
            path: source.to_owned(),
        },
    })
}

enum JwksParseError {
    Json(serde_json::Error),
    NoKey,
}

fn parse_jwks(text: &str) -> Result<Vec<RsaKey>, JwksParseError> {
    let set: JwkSet = serde_json::from_str(text).map_err(JwksParseError::Json)?;
    let keys: Vec<RsaKey> = set
        .keys
        .iter()
        .filter(|jwk| matches!(jwk.algorithm, AlgorithmParameters::RSA(_)))
        .filter_map(|jwk| {
            let key = DecodingKey::from_jwk(jwk).ok()?;
            Some(RsaKey {
                kid: jwk.common.key_id.clone(),
                key,
            })
        })
        .collect();
    if keys.is_empty() {
        Err(JwksParseError::NoKey)
    } else {
        Ok(keys)
    }
}

impl FromRequest for AuthedUser {
    type Error = ApiError;
    type Future = Ready<Result<Self, Self::Error>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(authenticate_request(req))
    }
}

/// Authenticates a request against the app's [`Authenticator`]; counts every rejection by reason.
pub fn authenticate_request(req: &HttpRequest) -> Result<AuthedUser, ApiError> {
    let Some(auth) = req.app_data::<web::Data<Authenticator>>() else {
        return Err(ApiError::internal(
            "auth_not_configured",
            "no Authenticator in app data",
        ));
    };
    authenticate_head(auth, req.head())
}

/// Authenticates the `Authorization` header of a request (also the listen websocket's own upgrade, which
/// is answered outside actix-web's extractors); counts every rejection by reason. A client address with
/// too many failures is answered 429 `too_many_auth_failures` before its token is looked at.
pub fn authenticate_head(
    auth: &Authenticator,
    head: &actix_web::dev::RequestHead,
) -> Result<AuthedUser, ApiError> {
    let client = auth.throttle.client(head);
    auth.throttle.admit(client)?;
    let value = head
        .headers
        .get(header::AUTHORIZATION)
        .map(|v| v.to_str().map_err(|_| AuthError::Malformed));
    let result = match value {
        None => auth.authenticate_header(None),
        Some(Err(e)) => Err(e),
        Some(Ok(v)) => auth.authenticate_header(Some(v)),
    };
    result.map_err(|e| {
        metrics::counter!(voicegate_engine::telemetry::AUTH_REJECTIONS_TOTAL, "reason" => e.code())
            .increment(1);
        if !e.is_server_side() {
            auth.throttle.failed(client);
        }
        ApiError::from(e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_mode_takes_the_uid_from_the_bearer() {
        let auth = Authenticator::dev();
        assert_eq!(
            auth.authenticate_header(Some("Bearer alice")),
            Ok(AuthedUser {
                uid: "alice".into()
            })
        );
        assert_eq!(
            auth.authenticate_header(Some("bearer  bob ")),
            Ok(AuthedUser { uid: "bob".into() })
        );
    }

    #[test]
    fn dev_mode_rejects_uids_that_could_break_store_keys() {
        let auth = Authenticator::dev();
        for bad in ["a{b}", "a b", &"x".repeat(129)] {
            assert_eq!(auth.verify(bad), Err(AuthError::BadUid), "{bad}");
        }
    }

    #[test]
    fn header_without_bearer_scheme_is_malformed() {
        let auth = Authenticator::dev();
        assert_eq!(
            auth.authenticate_header(Some("Basic abc")),
            Err(AuthError::Malformed)
        );
        assert_eq!(
            auth.authenticate_header(Some("Bearer")),
            Err(AuthError::Malformed)
        );
        assert_eq!(auth.authenticate_header(None), Err(AuthError::Missing));
    }

    #[test]
    fn jwks_without_rsa_keys_is_refused() {
        assert!(matches!(
            parse_jwks(r#"{"keys": []}"#),
            Err(JwksParseError::NoKey)
        ));
        assert!(matches!(
            parse_jwks("not json"),
            Err(JwksParseError::Json(_))
        ));
    }
}

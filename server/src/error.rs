//! The one place where a failure becomes an HTTP status.
//!
//! Every error a client can see has a stable machine-readable `code` (a low-cardinality word, also used as a
//! metric label) and a human `message`. The body is always `{"code": …, "message": …}`, plus extra fields for
//! the few errors that carry data (e.g. `retry_after_s` on 429). Clients branch on `code`, never on `message`.

use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpResponse, ResponseError};
use serde_json::{Map, Value};

use crate::auth::AuthError;
use crate::stripe::SignatureError;
use crate::upload::UploadError;

/// Everything a route can answer with that is not a success.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 401: missing, malformed, expired or forged bearer token.
    #[error(transparent)]
    Unauthorized(#[from] AuthError),
    /// 422: the `X-Admin-Key` header is absent (the reference answers 422 here, and clients rely on it).
    #[error("missing X-Admin-Key header")]
    AdminKeyMissing,
    /// 403: the `X-Admin-Key` header does not match `ADMIN_KEY`, or no admin key is configured.
    #[error("invalid admin key")]
    AdminKeyInvalid,
    /// 400 / 413: an upload that broke a limit or was not a usable multipart body.
    #[error(transparent)]
    Upload(#[from] UploadError),
    /// 400: the Stripe webhook signature did not verify; nothing was changed.
    #[error(transparent)]
    BadSignature(#[from] SignatureError),
    /// 400 with a route-specific code (`invalid_stage`, `invalid_query`, …).
    #[error("{message}")]
    BadRequest { code: &'static str, message: String },
    /// 402: the resource is locked behind a paid plan.
    #[error("{message}")]
    PaymentRequired { code: &'static str, message: String },
    /// 404: absent, or owned by another user (the two are indistinguishable on purpose).
    #[error("{message}")]
    NotFound { code: &'static str, message: String },
    /// 429: the caller must wait. `retry_after_s` becomes the `Retry-After` header and a body field; `extra`
    /// fields (e.g. the reference's `new_memories: []`) are merged into the body.
    #[error("{message}")]
    TooManyRequests {
        code: &'static str,
        message: String,
        retry_after_s: Option<u64>,
        extra: Map<String, Value>,
    },
    /// 503: the server cannot take this request now (draining, a dependency is required but down).
    #[error("{message}")]
    Unavailable { code: &'static str, message: String },
    /// 500: a bug or an unexpected dependency failure. The detail is logged, never sent to the client.
    #[error("internal error: {detail}")]
    Internal { code: &'static str, detail: String },
}

impl ApiError {
    /// The stable machine-readable code of this error.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Unauthorized(e) => e.code(),
            ApiError::AdminKeyMissing => "admin_key_missing",
            ApiError::AdminKeyInvalid => "admin_key_invalid",
            ApiError::Upload(e) => e.code(),
            ApiError::BadSignature(e) => e.code(),
            ApiError::BadRequest { code, .. }
            | ApiError::PaymentRequired { code, .. }
            | ApiError::NotFound { code, .. }
            | ApiError::TooManyRequests { code, .. }
            | ApiError::Unavailable { code, .. }
            | ApiError::Internal { code, .. } => code,
        }
    }

    /// The message sent to the client. Internal errors never leak their detail.
    pub fn public_message(&self) -> String {
        match self {
            ApiError::Internal { .. } => "internal server error".to_owned(),
            other => other.to_string(),
        }
    }

    /// The reference's wording for a locked conversation.
    pub fn conversation_locked() -> Self {
        ApiError::PaymentRequired {
            code: "conversation_locked",
            message: "A paid plan is required to access this conversation.".to_owned(),
        }
    }

    /// A 500 with its detail kept for the log.
    pub fn internal(code: &'static str, detail: impl std::fmt::Display) -> Self {
        ApiError::Internal {
            code,
            detail: detail.to_string(),
        }
    }

    /// The JSON body: `{code, message}` plus any extra fields.
    pub fn body(&self) -> Value {
        let mut body = Map::new();
        body.insert("code".to_owned(), Value::from(self.code()));
        body.insert("message".to_owned(), Value::from(self.public_message()));
        match self {
            ApiError::TooManyRequests {
                retry_after_s,
                extra,
                ..
            } => {
                if let Some(secs) = retry_after_s {
                    body.insert("retry_after_s".to_owned(), Value::from(*secs));
                }
                for (k, v) in extra {
                    body.entry(k.clone()).or_insert_with(|| v.clone());
                }
            }
            ApiError::Upload(e) => {
                if let Some(limit) = e.limit() {
                    body.insert("limit".to_owned(), Value::from(limit.name));
                    body.insert("limit_value".to_owned(), Value::from(limit.value));
                }
            }
            _ => {}
        }
        Value::Object(body)
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::AdminKeyMissing => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::AdminKeyInvalid => StatusCode::FORBIDDEN,
            ApiError::Upload(e) => e.status(),
            ApiError::BadSignature(_) | ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::PaymentRequired { .. } => StatusCode::PAYMENT_REQUIRED,
            ApiError::NotFound { .. } => StatusCode::NOT_FOUND,
            ApiError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        if let ApiError::Internal { code, detail } = self {
            tracing::error!(message = "Request failed.", code, error = %detail);
        }
        let mut resp = HttpResponse::build(self.status_code());
        match self {
            ApiError::Unauthorized(_) => {
                resp.insert_header((header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer")));
            }
            ApiError::TooManyRequests {
                retry_after_s: Some(secs),
                ..
            } => {
                resp.insert_header((header::RETRY_AFTER, secs.to_string()));
            }
            _ => {}
        }
        resp.json(self.body())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn too_many_requests_carries_retry_after_header_and_body_fields() {
        let mut extra = Map::new();
        extra.insert("new_memories".to_owned(), Value::Array(vec![]));
        extra.insert("code".to_owned(), Value::from("must_not_override"));
        let err = ApiError::TooManyRequests {
            code: "fair_use_restricted",
            message: "restricted".to_owned(),
            retry_after_s: Some(42),
            extra,
        };
        let resp = err.error_response();
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            resp.headers()
                .get(header::RETRY_AFTER)
                .map(|v| v.as_bytes()),
            Some(&b"42"[..])
        );
        let body = err.body();
        assert_eq!(body["code"], "fair_use_restricted");
        assert_eq!(body["retry_after_s"], 42);
        assert_eq!(body["new_memories"], Value::Array(vec![]));
    }

    #[test]
    fn internal_error_hides_its_detail_from_the_client() {
        let err = ApiError::internal("store_failed", "redis at 10.0.0.3 said NOAUTH");
        assert_eq!(err.status_code(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(err.body()["message"], "internal server error");
        assert_eq!(err.body()["code"], "store_failed");
    }

    #[test]
    fn admin_key_statuses_follow_the_reference() {
        assert_eq!(
            ApiError::AdminKeyMissing.status_code(),
            StatusCode::UNPROCESSABLE_ENTITY
        );
        assert_eq!(
            ApiError::AdminKeyInvalid.status_code(),
            StatusCode::FORBIDDEN
        );
    }
}

//! The server's one refusal type: every answer that is not a success, on every route and on the listen
//! upgrade, is an [`ApiError`], and this is the one place where it becomes an HTTP status, headers and body.
//!
//! Every refusal carries (DESIGN §3 "Errors"):
//! - a stable machine-readable `code` (a low-cardinality word, also used as a metric label) and a human
//!   `message` (may change; clients branch on `code`);
//! - `retryable`: whether the same request may succeed later;
//! - when retryable, a `Retry-After` (header and `retry_after_s` body field) bounded by the real reason
//!   (for a restricted user over a cap the earlier of the restriction's end and the moment the rolling
//!   totals fall back under the caps, the next UTC midnight for daily allowances, a short fixed wait for a
//!   transient condition whose end nobody knows).
//!
//! The body is `{"code", "message", "retryable"[, "retry_after_s"]}` plus the few fields some errors add
//! (413: `limit`, `limit_value`; the sync 429s: the reference's `new_memories`, …). A 500 never sends its
//! internal detail (it is logged).

use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpResponse, ResponseError};
use serde_json::{Map, Value};

use crate::upload::UploadError;

/// `Retry-After` of a transient server-side condition whose end is unknown (a dependency down, a busy
/// store): long enough not to feed a retry storm, short enough that a client barely notices.
pub const TRANSIENT_RETRY_AFTER_S: u64 = 5;
/// `Retry-After` of a refusal the client can repeat at once elsewhere or anew (a drain: another node
/// serves it; a request that timed out: send it again, faster).
pub const IMMEDIATE_RETRY_AFTER_S: u64 = 1;

/// A refusal: status, `code`, `message`, `retryable` / `Retry-After`, extra body fields.
///
/// Build one with the constructor named for its status ([`ApiError::bad_request`],
/// [`ApiError::too_many_requests`], …); each sets the usual retryability of its status, which
/// [`retry_after`](Self::retry_after) and [`not_retryable`](Self::not_retryable) override.
#[derive(Debug, Clone)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    /// `Some` exactly when the refusal is retryable: a retryable refusal always says when.
    retry_after_s: Option<u64>,
    fields: Map<String, Value>,
    /// 401s carry `WWW-Authenticate: Bearer`.
    bearer_challenge: bool,
    /// A 500's cause, logged when the answer is rendered, never sent.
    detail: Option<String>,
    /// The connection cannot carry another request (e.g. an unread body follows): `Connection: close`.
    close_connection: bool,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.detail {
            Some(detail) => write!(f, "{} ({}): {detail}", self.message, self.code),
            None => write!(f, "{} ({})", self.message, self.code),
        }
    }
}

impl std::error::Error for ApiError {}

impl ApiError {
    /// A refusal with `status`, not retryable (use the status-named constructors where one fits).
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after_s: None,
            fields: Map::new(),
            bearer_challenge: false,
            detail: None,
            close_connection: false,
        }
    }

    /// 400 with a route-specific code (`invalid_stage`, `invalid_query`, …). Not retryable.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 401 with a `WWW-Authenticate: Bearer` challenge (the auth module maps its `AuthError` here).
    pub fn unauthorized(code: &'static str, message: impl Into<String>) -> Self {
        let mut err = Self::new(StatusCode::UNAUTHORIZED, code, message);
        err.bearer_challenge = true;
        err
    }

    /// 402: the resource is locked behind a paid plan. Not retryable (a payment changes the answer).
    pub fn payment_required(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYMENT_REQUIRED, code, message)
    }

    /// 404: absent, or owned by another user (the two are indistinguishable on purpose).
    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }

    /// 408: the client did not send the request (or its body) in time. Retryable at once.
    pub fn request_timeout(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::REQUEST_TIMEOUT, code, message).retry_after(IMMEDIATE_RETRY_AFTER_S)
    }

    /// 429: the caller must wait `retry_after_s` (the real reason's end).
    pub fn too_many_requests(
        code: &'static str,
        message: impl Into<String>,
        retry_after_s: u64,
    ) -> Self {
        Self::new(StatusCode::TOO_MANY_REQUESTS, code, message).retry_after(retry_after_s)
    }

    /// 503: the server cannot take this request now (draining, a dependency down). Retryable after
    /// [`TRANSIENT_RETRY_AFTER_S`] unless [`retry_after`](Self::retry_after) says otherwise.
    pub fn unavailable(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, code, message)
            .retry_after(TRANSIENT_RETRY_AFTER_S)
    }

    /// 500: a bug or an unexpected dependency failure. The detail is logged, never sent to the client.
    /// Not retryable unless [`retry_after`](Self::retry_after) says the failure is transient.
    pub fn internal(code: &'static str, detail: impl std::fmt::Display) -> Self {
        let mut e = Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            code,
            "internal server error",
        );
        e.detail = Some(detail.to_string());
        e
    }

    /// 422: the `X-Admin-Key` header is absent (the reference answers 422 here, and clients rely on it).
    pub fn admin_key_missing() -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "admin_key_missing",
            "missing X-Admin-Key header",
        )
    }

    /// 403: the `X-Admin-Key` header does not match `ADMIN_KEY`, or no admin key is configured.
    pub fn admin_key_invalid() -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "admin_key_invalid",
            "invalid admin key",
        )
    }

    /// A request head the server could not take (408 not in time, 431 too large, else 400), in the JSON
    /// shape where actix-http answers with an empty body (`serve::head_errors`, the listen front door).
    pub fn request_head(status: StatusCode) -> Self {
        match status {
            StatusCode::REQUEST_TIMEOUT => Self::request_timeout(
                "request_head_timeout",
                "the request head did not arrive in time (VOICEGATE_HEADER_TIMEOUT_SECS)",
            ),
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => Self::new(
                status,
                "request_head_too_large",
                "the request head is too large",
            ),
            _ => Self::bad_request("bad_request", "the request head cannot be parsed"),
        }
    }

    /// The reference's wording for a locked conversation.
    pub fn conversation_locked() -> Self {
        Self::payment_required(
            "conversation_locked",
            "A paid plan is required to access this conversation.",
        )
    }

    /// Makes the refusal retryable after `secs` (header `Retry-After` and body `retry_after_s`).
    #[must_use]
    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after_s = Some(secs);
        self
    }

    /// Closes the connection after the answer (the rest of a body the client was sending is not read).
    #[must_use]
    pub fn closing_connection(mut self) -> Self {
        self.close_connection = true;
        self
    }

    /// Makes the refusal final: the same request will be refused again.
    #[must_use]
    pub fn not_retryable(mut self) -> Self {
        self.retry_after_s = None;
        self
    }

    /// Adds a body field (never overriding `code`, `message`, `retryable` or `retry_after_s`).
    #[must_use]
    pub fn with_field(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.fields.insert(key.to_owned(), value.into());
        self
    }

    /// Adds every field of `fields` (see [`with_field`](Self::with_field)).
    #[must_use]
    pub fn with_fields(mut self, fields: Map<String, Value>) -> Self {
        self.fields.extend(fields);
        self
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The stable machine-readable code of this error.
    pub fn code(&self) -> &'static str {
        self.code
    }

    /// The message sent to the client. Internal errors never leak their detail.
    pub fn public_message(&self) -> &str {
        &self.message
    }

    /// Whether the same request may succeed later.
    pub fn retryable(&self) -> bool {
        self.retry_after_s.is_some()
    }

    /// When to retry, in seconds (`Some` exactly when [`retryable`](Self::retryable)).
    pub fn retry_after_s(&self) -> Option<u64> {
        self.retry_after_s
    }

    /// The JSON body: `{code, message, retryable[, retry_after_s]}` plus any extra fields.
    pub fn body(&self) -> Value {
        let mut body = Map::new();
        body.insert("code".to_owned(), Value::from(self.code));
        body.insert("message".to_owned(), Value::from(self.message.as_str()));
        body.insert("retryable".to_owned(), Value::from(self.retryable()));
        if let Some(secs) = self.retry_after_s {
            body.insert("retry_after_s".to_owned(), Value::from(secs));
        }
        for (k, v) in &self.fields {
            body.entry(k.clone()).or_insert_with(|| v.clone());
        }
        Value::Object(body)
    }
}

impl From<UploadError> for ApiError {
    /// 400 / 413 (naming the limit) / 500 for temp storage (retryable: the disk may recover).
    fn from(e: UploadError) -> Self {
        let mut err = Self::new(e.status(), e.code(), e.to_string());
        if let Some(limit) = e.limit() {
            err = err
                .with_field("limit", limit.name)
                .with_field("limit_value", limit.value);
        }
        if let UploadError::Storage(detail) = &e {
            err.message = "temporary storage failed".to_owned();
            err.detail = Some(detail.clone());
            err = err.retry_after(TRANSIENT_RETRY_AFTER_S);
        }
        err
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        if let Some(detail) = &self.detail {
            tracing::error!(message = "Request failed.", code = self.code, error = %detail);
        }
        let mut resp = HttpResponse::build(self.status);
        if self.bearer_challenge {
            resp.insert_header((header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer")));
        }
        if let Some(secs) = self.retry_after_s {
            resp.insert_header((header::RETRY_AFTER, secs.to_string()));
        }
        if self.close_connection {
            resp.force_close();
        }
        resp.json(self.body())
    }
}

/// Middleware (`middleware::from_fn(error::json_bodies)`): an error the HTTP layer produced itself inside
/// the app (an extractor's 413 "payload reached size limit", a 400 from a body that is not what it
/// claims, a 405…) is answered in the one JSON shape, with a code named for its status. Answers that
/// already are an [`ApiError`] pass unchanged.
pub async fn json_bodies(
    req: actix_web::dev::ServiceRequest,
    next: actix_web::middleware::Next<impl actix_web::body::MessageBody + 'static>,
) -> Result<actix_web::dev::ServiceResponse<impl actix_web::body::MessageBody>, actix_web::Error> {
    use actix_web::body::EitherBody;
    let res = next.call(req).await?;
    let foreign = res
        .response()
        .error()
        .filter(|e| e.as_error::<ApiError>().is_none())
        .map(|e| (e.as_response_error().status_code(), e.to_string()));
    let Some((status, message)) = foreign else {
        return Ok(res.map_body(|_, b| EitherBody::left(b)));
    };
    let code = match status {
        StatusCode::PAYLOAD_TOO_LARGE => "request_too_large",
        StatusCode::REQUEST_TIMEOUT => "request_timeout",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => "request_head_too_large",
        s if s.is_server_error() => "internal",
        _ => "bad_request",
    };
    let mut err = if status.is_server_error() {
        let mut e = ApiError::internal(code, message);
        e.status = status;
        e
    } else {
        ApiError::new(status, code, message)
    };
    if status == StatusCode::REQUEST_TIMEOUT {
        err = err.retry_after(IMMEDIATE_RETRY_AFTER_S);
    }
    let (req, _) = res.into_parts();
    Ok(actix_web::dev::ServiceResponse::new(req, err.error_response()).map_into_right_body())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::AuthError;

    fn retry_after_header(resp: &HttpResponse) -> Option<&[u8]> {
        resp.headers()
            .get(header::RETRY_AFTER)
            .map(|v| v.as_bytes())
    }

    #[test]
    fn too_many_requests_carries_retry_after_header_and_body_fields() {
        let mut extra = Map::new();
        extra.insert("new_memories".to_owned(), Value::Array(vec![]));
        extra.insert("code".to_owned(), Value::from("must_not_override"));
        extra.insert("retryable".to_owned(), Value::from(false));
        let err =
            ApiError::too_many_requests("fair_use_restricted", "restricted", 42).with_fields(extra);
        let resp = err.error_response();
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(retry_after_header(&resp), Some(&b"42"[..]));
        let body = err.body();
        assert_eq!(body["code"], "fair_use_restricted");
        assert_eq!(body["retryable"], true);
        assert_eq!(body["retry_after_s"], 42);
        assert_eq!(body["new_memories"], Value::Array(vec![]));
    }

    #[test]
    fn a_final_refusal_says_not_retryable_and_sends_no_retry_after() {
        for err in [
            ApiError::bad_request("invalid_limit", "limit must be between 1 and 200"),
            ApiError::not_found("route_not_found", "no such route"),
            ApiError::from(AuthError::Expired),
            ApiError::admin_key_invalid(),
            ApiError::unavailable("x", "y").not_retryable(),
        ] {
            let resp = err.error_response();
            assert_eq!(retry_after_header(&resp), None, "{err}");
            assert_eq!(err.body()["retryable"], false, "{err}");
            assert!(err.body().get("retry_after_s").is_none(), "{err}");
        }
    }

    #[test]
    fn a_transient_refusal_is_retryable_with_a_retry_after() {
        for (err, secs) in [
            (
                ApiError::unavailable("draining", "d"),
                TRANSIENT_RETRY_AFTER_S,
            ),
            (
                ApiError::request_timeout("request_timeout", "t"),
                IMMEDIATE_RETRY_AFTER_S,
            ),
            (
                ApiError::internal("payment_apply_failed", "x").retry_after(60),
                60,
            ),
        ] {
            let resp = err.error_response();
            let expected = secs.to_string();
            assert_eq!(
                retry_after_header(&resp),
                Some(expected.as_bytes()),
                "{err}"
            );
            assert_eq!(err.body()["retryable"], true, "{err}");
            assert_eq!(err.body()["retry_after_s"], secs, "{err}");
        }
    }

    #[test]
    fn unauthorized_challenges_for_a_bearer_token() {
        let resp = ApiError::from(AuthError::Missing).error_response();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            resp.headers()
                .get(header::WWW_AUTHENTICATE)
                .map(|v| v.as_bytes()),
            Some(&b"Bearer"[..])
        );
    }

    #[test]
    fn internal_error_hides_its_detail_from_the_client() {
        let err = ApiError::internal("store_failed", "redis at 10.0.0.3 said NOAUTH");
        assert_eq!(err.status_code(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(err.body()["message"], "internal server error");
        assert_eq!(err.body()["code"], "store_failed");
        assert!(!err.body().to_string().contains("NOAUTH"));
        let storage = ApiError::from(UploadError::Storage("/var/tmp/x: EIO".into()));
        assert!(!storage.body().to_string().contains("EIO"));
        assert_eq!(storage.body()["retryable"], true);
    }

    #[test]
    fn admin_key_statuses_follow_the_reference() {
        assert_eq!(
            ApiError::admin_key_missing().status_code(),
            StatusCode::UNPROCESSABLE_ENTITY
        );
        assert_eq!(
            ApiError::admin_key_invalid().status_code(),
            StatusCode::FORBIDDEN
        );
    }
}

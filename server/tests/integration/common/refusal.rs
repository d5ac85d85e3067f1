//! The one shape of a refusal (DESIGN §3 "Errors", `server/src/error.rs`), asserted in one place for every
//! test that walks the server's refusals: a `code` and a `message`, `retryable` as a bool and, exactly when
//! retryable, a `Retry-After` header equal to the body's `retry_after_s` (at least 1).

use serde_json::Value;

/// What a refused request got back: its status, its `Retry-After` header (if any) and its JSON body.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub retry_after: Option<String>,
    pub body: Value,
}

impl Reply {
    pub fn new(status: u16, retry_after: Option<&str>, body: Value) -> Self {
        Reply {
            status,
            retry_after: retry_after.map(str::to_owned),
            body,
        }
    }

    /// Reads a reqwest response (status, `Retry-After`, body as JSON, or as a string when it is not).
    pub async fn of(resp: reqwest::Response) -> Self {
        let retry_after = header_str(resp.headers());
        let (status, body) = super::engine_server::split(resp).await;
        Reply {
            status,
            retry_after,
            body,
        }
    }

    /// The `(status, body)` pair most assertions look at.
    pub fn pair(&self) -> (u16, Value) {
        (self.status, self.body.clone())
    }

    /// Asserts the refusal shape ([`assert_refusal`]) and returns `retry_after_s` when retryable.
    #[track_caller]
    pub fn assert_refusal(&self, what: &str) -> Option<u64> {
        assert_refusal(what, self.status, self.retry_after.as_deref(), &self.body)
    }
}

/// The `Retry-After` header of a reqwest (or any `http` 1.x) header map, as text.
pub fn header_str(headers: &reqwest::header::HeaderMap) -> Option<String> {
    headers
        .get(reqwest::header::RETRY_AFTER)
        .map(|v| v.to_str().unwrap_or("<not text>").to_owned())
}

/// Asserts that an answer is a refusal in the one shape: status ≥ 400, `code` and `message` non-empty
/// strings, `retryable` a bool, and `retry_after_s` (≥ 1) with an equal `Retry-After` header exactly when
/// retryable (neither otherwise). Returns `retry_after_s` when retryable.
#[track_caller]
pub fn assert_refusal(
    what: &str,
    status: u16,
    retry_after: Option<&str>,
    body: &Value,
) -> Option<u64> {
    assert!(
        status >= 400,
        "{what}: status {status} is not a refusal: {body}"
    );
    for key in ["code", "message"] {
        assert!(
            body[key].as_str().is_some_and(|s| !s.is_empty()),
            "{what}: `{key}` must be a non-empty string: {body}"
        );
    }
    let Some(retryable) = body["retryable"].as_bool() else {
        panic!("{what}: `retryable` must be a bool: {body}");
    };
    if !retryable {
        assert!(
            body.get("retry_after_s").is_none(),
            "{what}: a final refusal carries no retry_after_s: {body}"
        );
        assert_eq!(
            retry_after, None,
            "{what}: a final refusal sends no Retry-After: {body}"
        );
        return None;
    }
    let Some(secs) = body["retry_after_s"].as_u64() else {
        panic!("{what}: a retryable refusal says when in `retry_after_s`: {body}");
    };
    assert!(secs >= 1, "{what}: retry_after_s {secs} invites a hot loop");
    let header =
        retry_after.unwrap_or_else(|| panic!("{what}: retryable without Retry-After: {body}"));
    assert_eq!(
        header.parse::<u64>().ok(),
        Some(secs),
        "{what}: Retry-After {header:?} must equal retry_after_s: {body}"
    );
    Some(secs)
}

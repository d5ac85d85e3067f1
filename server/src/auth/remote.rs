//! `VOICEGATE_JWKS` as a URL (Firebase's key URL): the RS256 keys fetched through the shared outbound
//! client ([`voicegate_engine::outbound::Outbound`]) and kept fresh.
//!
//! - **Schedule**: a fetched key set is kept for its `Cache-Control: max-age` (less its `Age`), an hour
//!   when the answer has none, always within `VOICEGATE_JWKS_REFRESH_MIN_SECS` ..
//!   `VOICEGATE_JWKS_REFRESH_MAX_SECS` (`no-cache`/`no-store` count as 0, i.e. the floor).
//! - **Unknown `kid`**: a token signed by a key the set lacks (Firebase rotated its keys) asks for a refresh
//!   at once, at most one per [`UNKNOWN_KID_REFRESH_INTERVAL`], so a flood of forged tokens cannot make us
//!   hammer the key URL. The request is not held on the network: it is answered 503
//!   `token_key_refreshing` (retryable, `Retry-After: 1`) while that refresh runs, and 401
//!   `token_unknown_key` when the kid is still unknown after it (or the rate limit holds).
//! - **Failures** keep the last good key set (logged, counted in `voicegate_jwks_refresh_total{result}`);
//!   the next attempt follows the shared jittered [`Backoff`] (1 s doubling to 5 min).
//! - **Startup**: `voicegate serve` waits for one fetch (at most [`FETCH_TIMEOUT`]) before it listens. When
//!   it fails, the node starts anyway, degraded: RS256 tokens are answered 503 `auth_keys_unavailable`
//!   (retryable; HS256 tokens still work) until a retry succeeds. It never exits over the key URL.
//! - **Bounds**: a body over [`MAX_BODY_BYTES`] is refused unread; a fetch taking longer than
//!   [`FETCH_TIMEOUT`] (connect to last byte) fails.

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, watch};
use voicegate_engine::telemetry::{JWKS_KEYS, JWKS_REFRESH_TOTAL};
use voicegate_engine::time::Backoff;

use super::{
    AuthError, Authenticator, JwksParseError, JwksSource, Mode, RsaKey, Verifier, parse_jwks,
};

/// At most one refresh asked for by an unknown `kid` per this interval (longer than [`FETCH_TIMEOUT`]).
pub const UNKNOWN_KID_REFRESH_INTERVAL: Duration = Duration::from_secs(30);
/// How long a key set is kept when its answer carries no `max-age` (then bounded by the settings).
pub const DEFAULT_FRESHNESS: Duration = Duration::from_secs(3_600);
/// Largest accepted JWKS body (Google's is ~2 KiB).
pub const MAX_BODY_BYTES: usize = 256 * 1024;
/// Longest one fetch may take, connect to last byte (also the longest startup wait for the keys).
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// The delay after the `n`th failed fetch in a row.
fn retry_backoff() -> Backoff {
    Backoff::new(Duration::from_secs(1), Duration::from_secs(300))
}

/// Why one fetch of the key URL failed (the keys in use are kept).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwksFetchError {
    #[error("the JWKS URL answered HTTP {0}")]
    Status(u16),
    #[error("the JWKS URL could not be fetched: {0}")]
    Unreachable(String),
    #[error("the JWKS URL's body is larger than {MAX_BODY_BYTES} bytes")]
    TooLarge,
    #[error("the JWKS URL's body is not a usable JWK set: {0}")]
    Invalid(String),
}

impl JwksFetchError {
    /// The `result` label of `voicegate_jwks_refresh_total`.
    pub fn result(&self) -> &'static str {
        match self {
            JwksFetchError::Status(_) => "status",
            JwksFetchError::Unreachable(_) => "unreachable",
            JwksFetchError::TooLarge => "too_large",
            JwksFetchError::Invalid(_) => "invalid",
        }
    }
}

/// Fetch attempts completed so far (a test or a probe can wait for the next one).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RefreshCounts {
    pub ok: u64,
    pub failed: u64,
}

impl RefreshCounts {
    pub fn total(&self) -> u64 {
        self.ok + self.failed
    }
}

/// A JWKS URL, its schedule and its refresh requests. Lives in the [`Authenticator`].
pub(super) struct RemoteJwks {
    url: reqwest::Url,
    http: reqwest::Client,
    min: Duration,
    max: Duration,
    state: Mutex<State>,
    wake: Notify,
    counts: watch::Sender<RefreshCounts>,
}

struct State {
    /// When the scheduled refresh is due (now at startup).
    due: Instant,
    backoff: Backoff,
    /// The last refresh asked for by an unknown `kid` (the rate limit).
    last_kid_refresh: Option<Instant>,
    /// A refresh asked for by an unknown `kid` has not completed yet.
    refreshing: bool,
}

impl RemoteJwks {
    pub(super) fn new(
        url: reqwest::Url,
        http: reqwest::Client,
        (min, max): (Duration, Duration),
    ) -> Self {
        RemoteJwks {
            url,
            http,
            min,
            max,
            state: Mutex::new(State {
                due: Instant::now(),
                backoff: retry_backoff(),
                last_kid_refresh: None,
                refreshing: false,
            }),
            wake: Notify::new(),
            counts: watch::channel(RefreshCounts::default()).0,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn counts(&self) -> watch::Receiver<RefreshCounts> {
        self.counts.subscribe()
    }

    /// An unknown `kid` (or no key at all) was seen: asks the refresher for a fetch now, unless one asked
    /// for this way ran within [`UNKNOWN_KID_REFRESH_INTERVAL`]. True while such a fetch is pending (the
    /// token may verify once it is done).
    pub(super) fn request_refresh(&self) -> bool {
        let mut state = self.state();
        let now = Instant::now();
        // A fetch takes at most FETCH_TIMEOUT, shorter than the interval: one still "pending" past the
        // interval had no refresher to run it, and a new request is made.
        if state
            .last_kid_refresh
            .is_some_and(|t| now.duration_since(t) < UNKNOWN_KID_REFRESH_INTERVAL)
        {
            return state.refreshing;
        }
        state.last_kid_refresh = Some(now);
        state.refreshing = true;
        drop(state);
        self.wake.notify_one();
        true
    }

    /// Fetches the key set once and swaps it into `keys` (kept as they are on failure).
    pub(super) async fn refresh(
        &self,
        keys: &RwLock<Arc<Vec<RsaKey>>>,
    ) -> Result<usize, JwksFetchError> {
        let result = self.fetch().await;
        let mut state = self.state();
        state.refreshing = false;
        let outcome = match result {
            Ok((fetched, fresh_for)) => {
                let n = fetched.len();
                *keys.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(fetched);
                state.backoff.reset();
                state.due = Instant::now() + fresh_for;
                metrics::gauge!(JWKS_KEYS).set(n as f64);
                tracing::info!(
                    message = "JWKS fetched.",
                    url = %self.url,
                    keys = n,
                    next_refresh_s = fresh_for.as_secs()
                );
                Ok(n)
            }
            Err(error) => {
                let retry_in = state.backoff.next_delay();
                state.due = Instant::now() + retry_in;
                let held = keys.read().unwrap_or_else(|p| p.into_inner()).len();
                metrics::gauge!(JWKS_KEYS).set(held as f64);
                tracing::warn!(
                    message = "JWKS fetch failed; keeping the keys in use.",
                    url = %self.url,
                    %error,
                    keys_kept = held,
                    retry_in_ms = retry_in.as_millis() as u64
                );
                Err(error)
            }
        };
        drop(state);
        let result = outcome
            .as_ref()
            .map_or_else(JwksFetchError::result, |_| "ok");
        metrics::counter!(JWKS_REFRESH_TOTAL, "result" => result).increment(1);
        let ok = outcome.is_ok();
        self.counts.send_modify(|c| {
            if ok {
                c.ok += 1;
            } else {
                c.failed += 1;
            }
        });
        outcome
    }

    async fn fetch(&self) -> Result<(Vec<RsaKey>, Duration), JwksFetchError> {
        let unreachable = |e: reqwest::Error| JwksFetchError::Unreachable(e.to_string());
        let mut response = self
            .http
            .get(self.url.clone())
            .header(reqwest::header::ACCEPT, "application/json")
            .timeout(FETCH_TIMEOUT)
            .send()
            .await
            .map_err(unreachable)?;
        let status = response.status();
        if !status.is_success() {
            return Err(JwksFetchError::Status(status.as_u16()));
        }
        if response
            .content_length()
            .is_some_and(|n| n > MAX_BODY_BYTES as u64)
        {
            return Err(JwksFetchError::TooLarge);
        }
        let header = |name| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let fresh_for = freshness(
            header(reqwest::header::CACHE_CONTROL).as_deref(),
            header(reqwest::header::AGE).as_deref(),
            (self.min, self.max),
        );
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(unreachable)? {
            if body.len() + chunk.len() > MAX_BODY_BYTES {
                return Err(JwksFetchError::TooLarge);
            }
            body.extend_from_slice(&chunk);
        }
        let text = std::str::from_utf8(&body)
            .map_err(|_| JwksFetchError::Invalid("not UTF-8".to_owned()))?;
        let keys = parse_jwks(text).map_err(|e| match e {
            JwksParseError::Json(e) => JwksFetchError::Invalid(e.to_string()),
            JwksParseError::NoKey => {
                JwksFetchError::Invalid("holds no usable RS256 key".to_owned())
            }
        })?;
        Ok((keys, fresh_for))
    }

    /// Waits until the scheduled refresh is due or an unknown `kid` asks for one.
    async fn wait(&self) {
        let due = self.state().due;
        let wait = due.saturating_duration_since(Instant::now());
        if wait.is_zero() {
            return;
        }
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = self.wake.notified() => {}
        }
    }
}

impl Authenticator {
    pub(super) fn remote(&self) -> Option<&RemoteJwks> {
        match &self.mode {
            Mode::Verify(v) => match &v.jwks {
                Some(JwksSource::Url(remote)) => Some(remote),
                _ => None,
            },
            Mode::Dev => None,
        }
    }

    /// True when RS256 keys come from a JWKS URL (see [`crate::auth::remote`]).
    pub fn has_jwks_url(&self) -> bool {
        self.remote().is_some()
    }

    /// Fetches the JWKS URL once now and swaps the keys in (kept on failure); `None` when `VOICEGATE_JWKS`
    /// is not a URL. Returns the number of keys fetched.
    pub async fn refresh_jwks_url(&self) -> Option<Result<usize, JwksFetchError>> {
        let Mode::Verify(v) = &self.mode else {
            return None;
        };
        let Some(JwksSource::Url(remote)) = &v.jwks else {
            return None;
        };
        Some(remote.refresh(&v.rsa).await)
    }

    /// The JWKS URL's completed fetches, to wait for the next one; `None` when it is not a URL.
    pub fn jwks_url_refreshes(&self) -> Option<tokio::sync::watch::Receiver<RefreshCounts>> {
        self.remote().map(RemoteJwks::counts)
    }
}

impl Verifier {
    /// The refusal of an RS256 token whose key is not in `keys`. With a JWKS URL: no key at all is 503
    /// `auth_keys_unavailable`; an unknown `kid` asks for a refresh (rate-limited) and is 503
    /// `token_key_refreshing` while it is pending, else 401 `token_unknown_key`.
    pub(super) fn missing_key(
        &self,
        keys: &[RsaKey],
        has_kid: bool,
        error: AuthError,
    ) -> AuthError {
        let Some(JwksSource::Url(remote)) = &self.jwks else {
            return error;
        };
        if keys.is_empty() {
            remote.request_refresh();
            AuthError::KeysUnavailable
        } else if has_kid && remote.request_refresh() {
            AuthError::KeyRefreshing
        } else {
            error
        }
    }
}

/// How long a key set answered with these headers is kept: `max-age` less `Age`, [`DEFAULT_FRESHNESS`]
/// without `max-age`, 0 with `no-cache`/`no-store`; always within `[min, max]`.
pub fn freshness(
    cache_control: Option<&str>,
    age: Option<&str>,
    (min, max): (Duration, Duration),
) -> Duration {
    let mut max_age = None;
    for directive in cache_control.unwrap_or_default().split(',') {
        let (name, value) = directive
            .split_once('=')
            .map_or((directive, None), |(n, v)| (n, Some(v)));
        let name = name.trim();
        if name.eq_ignore_ascii_case("no-cache") || name.eq_ignore_ascii_case("no-store") {
            max_age = Some(0);
            break;
        }
        if name.eq_ignore_ascii_case("max-age")
            && let Some(secs) = value.and_then(|v| v.trim().trim_matches('"').parse::<u64>().ok())
        {
            max_age = Some(secs);
        }
    }
    let age = age.and_then(|a| a.trim().parse::<u64>().ok()).unwrap_or(0);
    let fresh = max_age.map_or(DEFAULT_FRESHNESS, |secs| {
        Duration::from_secs(secs.saturating_sub(age))
    });
    fresh.clamp(min, max.max(min))
}

/// Keeps the key URL's set fresh for as long as the server runs (see the module docs); returns at once
/// when `VOICEGATE_JWKS` is not a URL. Spawned by [`crate::serve::ServerBuilder::start`].
pub async fn refresh_forever(auth: Arc<Authenticator>) {
    let Some(remote) = auth.remote() else {
        return;
    };
    loop {
        remote.wait().await;
        let _ = auth.refresh_jwks_url().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUNDS: (Duration, Duration) = (Duration::from_secs(60), Duration::from_secs(86_400));

    fn secs(cc: Option<&str>, age: Option<&str>) -> u64 {
        freshness(cc, age, BOUNDS).as_secs()
    }

    #[test]
    fn max_age_less_age_within_the_bounds() {
        // Google's header for its securetoken keys.
        let google = "public, max-age=21600, must-revalidate, no-transform";
        assert_eq!(secs(Some(google), None), 21_600);
        assert_eq!(secs(Some(google), Some("600")), 21_000);
        assert_eq!(secs(Some("max-age=5"), None), 60, "the floor");
        assert_eq!(secs(Some("max-age=9999999"), None), 86_400, "the ceiling");
        assert_eq!(secs(Some("MAX-AGE=\"120\""), None), 120);
    }

    #[test]
    fn no_max_age_is_an_hour_and_no_cache_is_the_floor() {
        assert_eq!(secs(None, None), 3_600);
        assert_eq!(secs(Some("public"), None), 3_600);
        assert_eq!(secs(Some("max-age=bogus"), None), 3_600);
        assert_eq!(secs(Some("no-cache, max-age=600"), None), 60);
        assert_eq!(secs(Some("no-store"), None), 60);
    }
}

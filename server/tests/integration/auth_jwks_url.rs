//! `VOICEGATE_JWKS` as a URL, against a local double of Google's key URL: the served key verifies tokens,
//! a rotated key is picked up by the unknown-`kid` refresh (rate-limited), a failing URL keeps the last
//! good keys (also against an oversized body), `Cache-Control: max-age` drives the schedule, and a node
//! whose first fetch fails starts degraded (the real `voicegate serve` too) and recovers.

use crate::common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::http::{StatusCode, header};
use actix_web::test;
use common::*;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::watch;
use voicegate_server::ServeConfig;
use voicegate_server::auth::remote::{JwksFetchError, MAX_BODY_BYTES, RefreshCounts};
use voicegate_server::auth::{AuthError, Authenticator};
use voicegate_server::config::ConfigError;
use voicegate_server::serve::{ServeError, ServerBuilder, build_app};

/// What the double answers.
struct Served {
    /// `None`: HTTP 500 (Google's front end failing).
    jwks: Option<Value>,
    max_age: u64,
}

/// A double of a JWKS URL such as Google's
/// `https://www.googleapis.com/service_accounts/v1/jwk/securetoken@system.gserviceaccount.com` (over plain
/// HTTP on loopback): every `GET` gets the JWK set it holds as `application/json` with
/// `Cache-Control: public, max-age=N, must-revalidate, no-transform`, as Google sends it, or a 500; it
/// counts the requests.
struct JwksDouble {
    addr: SocketAddr,
    served: Arc<Mutex<Served>>,
    fetches: watch::Receiver<u64>,
}

impl JwksDouble {
    async fn start(jwks: Value, max_age: u64) -> JwksDouble {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let served = Arc::new(Mutex::new(Served {
            jwks: Some(jwks),
            max_age,
        }));
        let (count_tx, fetches) = watch::channel(0u64);
        let state = Arc::clone(&served);
        actix_web::rt::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                if !head.starts_with(b"GET ") {
                    continue;
                }
                let response = {
                    let served = state.lock().unwrap_or_else(|p| p.into_inner());
                    match &served.jwks {
                        Some(jwks) => {
                            let body = jwks.to_string();
                            format!(
                                "HTTP/1.1 200 OK\r\ncontent-type: application/json; charset=UTF-8\r\n\
                                 cache-control: public, max-age={}, must-revalidate, no-transform\r\n\
                                 content-length: {}\r\nconnection: close\r\n\r\n{body}",
                                served.max_age,
                                body.len()
                            )
                        }
                        None => "HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\
                                 connection: close\r\n\r\n"
                            .to_owned(),
                    }
                };
                count_tx.send_modify(|n| *n += 1);
                let _ = tcp.write_all(response.as_bytes()).await;
                let _ = tcp.shutdown().await;
            }
        });
        JwksDouble {
            addr,
            served,
            fetches,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/service_accounts/v1/jwk/securetoken", self.addr)
    }

    fn serve(&self, jwks: Option<Value>, max_age: u64) {
        *self.served.lock().unwrap_or_else(|p| p.into_inner()) = Served { jwks, max_age };
    }

    fn fetches(&self) -> u64 {
        *self.fetches.borrow()
    }
}

fn url_config(double: &JwksDouble) -> ServeConfig {
    ServeConfig {
        jwks: Some(double.url()),
        ..config()
    }
}

fn claims() -> Value {
    json!({"sub": "firebase-uid-9", "exp": now() + 600})
}

fn token(key: &str, kid: &str) -> String {
    rs256_token(&fixture(key), Some(kid), claims())
}

const OLD: &str = "test_rsa_key.der";
const NEW: &str = "other_rsa_key.der";

/// Waits (at most 20 s) until the authenticator's completed fetches satisfy `done`.
async fn until(auth: &Authenticator, done: impl Fn(&RefreshCounts) -> bool) -> RefreshCounts {
    let mut rx = auth
        .jwks_url_refreshes()
        .unwrap_or_else(|| panic!("VOICEGATE_JWKS is not a URL"));
    let waited = tokio::time::timeout(Duration::from_secs(20), rx.wait_for(|c| done(c)))
        .await
        .map(|r| r.map(|c| *c));
    match waited {
        Ok(Ok(counts)) => counts,
        Ok(Err(e)) => panic!("{e}"),
        Err(_) => panic!("no such fetch within 20 s: {:?}", *rx.borrow()),
    }
}

/// An authenticator over the double's URL, its first fetch done, its refresher running.
async fn refreshing_auth(cfg: ServeConfig) -> Arc<Authenticator> {
    let auth =
        Arc::new(Authenticator::from_config(&cfg, &outbound()).unwrap_or_else(|e| panic!("{e}")));
    assert!(matches!(auth.refresh_jwks_url().await, Some(Ok(1))));
    actix_web::rt::spawn(voicegate_server::auth::remote::refresh_forever(Arc::clone(
        &auth,
    )));
    auth
}

async fn whoami_status(builder: &ServerBuilder, token: &str) -> (StatusCode, Value, bool) {
    let app = test::init_service(build_app(
        builder.state().clone(),
        Some(Arc::new(whoami_routes)),
    ))
    .await;
    let req = test::TestRequest::get()
        .uri("/whoami")
        .insert_header((header::AUTHORIZATION, format!("Bearer {token}")))
        .to_request();
    let resp = test::call_service(&app, req).await;
    let status = resp.status();
    let retry_after = resp
        .headers()
        .get(header::RETRY_AFTER)
        .map(|v| v.to_str().unwrap_or("<not text>").to_owned());
    let body: Value = test::read_body_json(resp).await;
    if status.as_u16() >= 400 {
        crate::common::refusal::assert_refusal(
            "whoami",
            status.as_u16(),
            retry_after.as_deref(),
            &body,
        );
    }
    (status, body, retry_after.is_some())
}

#[actix_web::test]
async fn a_token_signed_with_the_served_key_is_accepted() {
    let double = JwksDouble::start(jwks_json(&fixture(OLD), "k1"), 21_600).await;
    let builder = ServerBuilder::new(url_config(&double)).unwrap_or_else(|e| panic!("{e}"));
    builder.fetch_jwks_url().await;
    assert_eq!(double.fetches(), 1);
    let (status, body, _) = whoami_status(&builder, &token(OLD, "k1")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["uid"], "firebase-uid-9");
    // A token signed by another key under the served kid is still forged.
    let (status, body, _) = whoami_status(&builder, &token(NEW, "k1")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body["code"], "token_bad_signature");
    assert_eq!(double.fetches(), 1, "a known kid fetches nothing");
}

#[actix_web::test]
async fn a_rotated_key_is_picked_up_by_the_unknown_kid_refresh() {
    let double = JwksDouble::start(jwks_json(&fixture(OLD), "k1"), 21_600).await;
    let auth = refreshing_auth(url_config(&double)).await;
    // Google rotates: the URL now serves k2 only; a token signed with it arrives before any schedule.
    double.serve(Some(jwks_json(&fixture(NEW), "k2")), 21_600);
    assert_eq!(
        auth.verify(&token(NEW, "k2")),
        Err(AuthError::KeyRefreshing)
    );
    until(&auth, |c| c.ok >= 2).await;
    assert_eq!(
        auth.verify(&token(NEW, "k2")).map(|u| u.uid),
        Ok("firebase-uid-9".to_owned())
    );
    // k1 is gone from the set; within the rate limit its tokens are plainly unknown, with no fetch.
    assert_eq!(auth.verify(&token(OLD, "k1")), Err(AuthError::UnknownKey));
    assert_eq!(double.fetches(), 2);
}

#[actix_web::test]
async fn the_rate_limit_bounds_fetches_under_a_burst_of_unknown_kid_tokens() {
    let double = JwksDouble::start(jwks_json(&fixture(OLD), "k1"), 21_600).await;
    let auth = refreshing_auth(url_config(&double)).await;
    // A burst of forged tokens, each with a new kid: one refresh is asked for, and every token of the
    // burst is told to retry while it runs.
    for i in 0..200 {
        assert_eq!(
            auth.verify(&token(NEW, &format!("forged-{i}"))),
            Err(AuthError::KeyRefreshing)
        );
    }
    until(&auth, |c| c.total() >= 2).await;
    // Within the interval after it, further unknown kids ask for nothing: plain 401s.
    for i in 200..400 {
        assert_eq!(
            auth.verify(&token(NEW, &format!("forged-{i}"))),
            Err(AuthError::UnknownKey)
        );
    }
    assert_eq!(double.fetches(), 2, "the first fetch and one refresh");
    assert!(auth.verify(&token(OLD, "k1")).is_ok());
}

#[actix_web::test]
async fn a_failing_url_keeps_the_last_good_keys() {
    let double = JwksDouble::start(jwks_json(&fixture(OLD), "k1"), 1).await;
    let cfg = ServeConfig {
        jwks_refresh_min_secs: 1,
        ..url_config(&double)
    };
    let auth = refreshing_auth(cfg).await;
    double.serve(None, 1);
    // The schedule (max-age 1 s) fetches again and gets a 500, then retries after the backoff.
    let counts = until(&auth, |c| c.failed >= 2).await;
    assert_eq!(counts.ok, 1, "{counts:?}");
    assert!(
        auth.verify(&token(OLD, "k1")).is_ok(),
        "a failed fetch keeps the keys in use"
    );
    // An unknown kid while the URL fails: one refresh asked for, it fails, the keys stay.
    double.serve(Some(json!({"keys": []})), 1);
    let before = auth
        .jwks_url_refreshes()
        .map(|rx| *rx.borrow())
        .unwrap_or_default();
    let _ = auth.verify(&token(NEW, "k2"));
    until(&auth, |c| c.failed > before.failed).await;
    assert!(
        auth.verify(&token(OLD, "k1")).is_ok(),
        "an empty set is not taken"
    );
}

#[actix_web::test]
async fn a_body_over_the_bound_is_refused_and_the_keys_kept() {
    let double = JwksDouble::start(jwks_json(&fixture(OLD), "k1"), 21_600).await;
    let auth = Authenticator::from_config(&url_config(&double), &outbound())
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(matches!(auth.refresh_jwks_url().await, Some(Ok(1))));
    let mut huge = jwks_json(&fixture(NEW), "k2");
    huge["padding"] = json!("x".repeat(MAX_BODY_BYTES));
    double.serve(Some(huge), 21_600);
    assert_eq!(
        auth.refresh_jwks_url().await,
        Some(Err(JwksFetchError::TooLarge))
    );
    assert!(auth.verify(&token(OLD, "k1")).is_ok());
}

#[actix_web::test]
async fn max_age_drives_the_scheduled_refresh() {
    let double = JwksDouble::start(jwks_json(&fixture(OLD), "k1"), 1).await;
    let cfg = ServeConfig {
        jwks_refresh_min_secs: 1,
        ..url_config(&double)
    };
    let fetched = Instant::now();
    let auth = refreshing_auth(cfg).await;
    double.serve(Some(jwks_json(&fixture(NEW), "k2")), 3_600);
    // No token asks for anything: the next fetch is the schedule's, one max-age (1 s) later.
    until(&auth, |c| c.ok >= 2).await;
    assert!(
        fetched.elapsed() >= Duration::from_millis(900),
        "{:?}",
        fetched.elapsed()
    );
    assert!(auth.verify(&token(NEW, "k2")).is_ok());
    assert_eq!(double.fetches(), 2);
}

#[actix_web::test]
async fn a_node_whose_first_fetch_fails_starts_degraded_and_recovers() {
    let double = JwksDouble::start(jwks_json(&fixture(OLD), "k1"), 21_600).await;
    double.serve(None, 21_600);
    let builder = ServerBuilder::new(url_config(&double)).unwrap_or_else(|e| panic!("{e}"));
    builder.fetch_jwks_url().await;
    let auth = builder.state().auth.clone().into_inner();
    actix_web::rt::spawn(voicegate_server::auth::remote::refresh_forever(Arc::clone(
        &auth,
    )));
    // No key yet: the server's miss, a retryable 503 (not a 401 that would sign the user out).
    let (status, body, retry_after) = whoami_status(&builder, &token(OLD, "k1")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["code"], "auth_keys_unavailable");
    assert_eq!(body["retryable"], true);
    assert!(retry_after);
    // The URL comes back: the refresher (woken by that token, or its backoff) loads the keys.
    double.serve(Some(jwks_json(&fixture(OLD), "k1")), 21_600);
    until(&auth, |c| c.ok >= 1).await;
    let (status, body, _) = whoami_status(&builder, &token(OLD, "k1")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[actix_web::test]
async fn an_unknown_kid_answers_a_retryable_503_while_the_refresh_runs() {
    let double = JwksDouble::start(jwks_json(&fixture(OLD), "k1"), 21_600).await;
    let builder = ServerBuilder::new(url_config(&double)).unwrap_or_else(|e| panic!("{e}"));
    builder.fetch_jwks_url().await;
    let (status, body, retry_after) = whoami_status(&builder, &token(NEW, "k2")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["code"], "token_key_refreshing");
    assert!(retry_after);
}

#[actix_web::test]
async fn plain_http_to_a_host_that_is_not_loopback_refuses_to_start() {
    let cfg = ServeConfig {
        jwks: Some("http://www.googleapis.com/service_accounts/v1/jwk/x".into()),
        ..config()
    };
    match ServerBuilder::new(cfg) {
        Err(ServeError::Config(ConfigError::JwksPlainHttp(url))) => {
            assert!(url.contains("googleapis"))
        }
        Err(other) => panic!("wrong error: {other}"),
        Ok(_) => panic!("plain http to a public host must not start"),
    }
}

#[actix_web::test]
async fn serve_with_an_unreachable_jwks_url_starts_degraded_and_stays_up() {
    use crate::listen_support::{Child, free_port, wait_ready};
    use std::process::{Command, Stdio};
    // A loopback port nobody listens on: every fetch is refused at once.
    let dead = format!("http://127.0.0.1:{}/jwks", free_port());
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port())
        .parse()
        .unwrap_or_else(|e| panic!("{e}"));
    let child = Command::new(env!("CARGO_BIN_EXE_voicegate"))
        .arg("serve")
        .env("VOICEGATE_BIND", addr.to_string())
        // Admission by load off: a busy CI machine must not refuse the sessions this test counts.
        .env("VOICEGATE_ADMISSION_CPU_PERCENT", "0")
        .env("VOICEGATE_ADMISSION_LATE_PERCENT", "0")
        .env("VOICEGATE_STT", "none")
        .env("VOICEGATE_JWKS", &dead)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn voicegate: {e}"));
    let mut child = Child(child);
    wait_ready(addr).await;
    let resp = reqwest::Client::new()
        .get(format!("http://{addr}/v1/conversations"))
        .bearer_auth(token(OLD, "k1"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status().as_u16(), 503);
    let body: Value = resp.json().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(body["code"], "auth_keys_unavailable", "{body}");
    assert!(
        child
            .0
            .try_wait()
            .unwrap_or_else(|e| panic!("{e}"))
            .is_none(),
        "the server must not exit over its key URL"
    );
}

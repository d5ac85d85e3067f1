//! Failed authentication per client address (issue 17 item 5): past `VOICEGATE_AUTH_FAILURES_PER_MINUTE`
//! an address gets 429 `too_many_auth_failures` with `Retry-After`, on every route and on the listen
//! upgrade, before its credential is checked; wrong admin keys are counted apart; `X-Forwarded-For` names
//! the client only behind `VOICEGATE_TRUSTED_PROXIES`.

use serde_json::Value;

use crate::common::engine_server::{ADMIN_KEY, EngineServer, fair_use_on, split};
use crate::common::refusal::{Reply, assert_refusal};
use crate::listen_support::connect_or_refusal;

const BUDGET: u32 = 3;
/// Dev mode: the bearer is the uid, and a uid with a slash is refused 401 `uid_invalid`.
const BAD_TOKEN: &str = "not/a/uid";

async fn status(
    server: &EngineServer,
    bearer: &str,
    forwarded: Option<&str>,
) -> (u16, Value, Option<String>) {
    let mut req = server
        .http
        .get(server.url("/v1/fair-use/status"))
        .bearer_auth(bearer);
    if let Some(f) = forwarded {
        req = req.header("x-forwarded-for", f);
    }
    let resp = req.send().await.unwrap_or_else(|e| panic!("{e}"));
    let retry_after = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let (code, body) = split(resp).await;
    (code, body, retry_after)
}

async fn admin(server: &EngineServer, key: &str) -> Reply {
    let resp = server
        .http
        .get(server.url("/v1/admin/fair-use/flagged"))
        .header("x-admin-key", key)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    Reply::of(resp).await
}

#[actix_web::test]
async fn an_address_past_its_failures_gets_429_everywhere_and_forwarded_for_does_not_dodge_it() {
    let server = EngineServer::start(fair_use_on(), |c| c.auth_failures_per_minute = BUDGET).await;
    for i in 0..BUDGET {
        let (code, body, retry_after) = status(&server, BAD_TOKEN, None).await;
        assert_eq!(
            (code, body["code"].as_str()),
            (401, Some("uid_invalid")),
            "attempt {i}"
        );
        let final_401 = assert_refusal("bad token", code, retry_after.as_deref(), &body);
        assert_eq!(final_401, None, "attempt {i}: a bad token stays bad");
    }
    let (code, body, retry_after) = status(&server, BAD_TOKEN, None).await;
    assert_eq!(code, 429, "{body}");
    assert_eq!(body["code"], "too_many_auth_failures", "{body}");
    // 3 a minute: one more attempt in 20 s (header and body alike).
    let retry = assert_refusal("auth throttled", code, retry_after.as_deref(), &body);
    assert_eq!(retry, Some(20), "{body}");
    // Checked before the token: a right one waits too, and a forged X-Forwarded-For changes nothing
    // (no trusted proxy is configured).
    let (code, body, _) = status(&server, "alice", None).await;
    assert_eq!(
        (code, body["code"].as_str()),
        (429, Some("too_many_auth_failures"))
    );
    let (code, _, _) = status(&server, "alice", Some("203.0.113.50")).await;
    assert_eq!(code, 429);
    // The listen upgrade is answered the same.
    let Err(upgrade) =
        connect_or_refusal(server.addr, Some("alice"), "codec=opus&sample_rate=16000").await
    else {
        panic!("a throttled address was upgraded");
    };
    assert_eq!(
        (upgrade.status, upgrade.body["code"].as_str()),
        (429, Some("too_many_auth_failures")),
        "{:?}",
        upgrade.body
    );
    assert!(upgrade.assert_refusal("throttled upgrade").is_some());
    // Admin keys have their own budget.
    let (code, body) = admin(&server, ADMIN_KEY).await.pair();
    assert_eq!(code, 200, "{body}");
    for _ in 0..BUDGET {
        let reply = admin(&server, "guess").await;
        assert_eq!(
            (reply.status, reply.body["code"].as_str()),
            (403, Some("admin_key_invalid"))
        );
        assert_eq!(reply.assert_refusal("wrong admin key"), None);
    }
    let reply = admin(&server, ADMIN_KEY).await;
    assert_eq!(
        (reply.status, reply.body["code"].as_str()),
        (429, Some("too_many_auth_failures")),
        "{:?}",
        reply.body
    );
    assert!(reply.assert_refusal("admin key throttled").is_some());
    server.shutdown().await;
}

#[actix_web::test]
async fn behind_a_trusted_proxy_each_forwarded_client_has_its_own_budget() {
    let server = EngineServer::start(fair_use_on(), |c| {
        c.auth_failures_per_minute = BUDGET;
        c.trusted_proxies = vec!["127.0.0.0/8".to_owned()];
    })
    .await;
    // The proxy appends the client it saw; what the client claimed (on the left) is not believed.
    let attacker = "10.9.9.9, 198.51.100.7";
    for _ in 0..BUDGET {
        let (code, _, _) = status(&server, BAD_TOKEN, Some(attacker)).await;
        assert_eq!(code, 401);
    }
    let (code, body, _) = status(&server, BAD_TOKEN, Some(attacker)).await;
    assert_eq!(
        (code, body["code"].as_str()),
        (429, Some("too_many_auth_failures"))
    );
    let (code, _, _) = status(&server, "alice", Some("1.2.3.4, 198.51.100.7")).await;
    assert_eq!(code, 429, "the same client, whatever it claims");
    let (code, body, _) = status(&server, "alice", Some("198.51.100.8")).await;
    assert_eq!(code, 200, "another client behind the same proxy: {body}");
    let (code, body, _) = status(&server, "alice", None).await;
    assert_eq!(code, 200, "the proxy itself: {body}");
    server.shutdown().await;
}

#[test]
fn a_trusted_proxy_that_is_not_an_address_is_refused_at_startup() {
    let cfg = voicegate_server::ServeConfig {
        trusted_proxies: vec!["10.0.0.0/8".to_owned(), "proxy.internal".to_owned()],
        ..voicegate_server::ServeConfig::default()
    };
    let err = cfg
        .validate()
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.contains("VOICEGATE_TRUSTED_PROXIES") && err.contains("proxy.internal"),
        "{err}"
    );
}

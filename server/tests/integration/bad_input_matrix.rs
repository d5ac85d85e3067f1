//! The HTTP bad-input matrix end to end (real redis-server, token verification on): every case gets its
//! documented status and code, and none changes anyone's metered speech. The websocket rows live in the
//! listen tests.

use crate::common;

use common::engine_server::{ADMIN_KEY, EngineServer, fair_use_on, fixtures, now_s, omi_name};
use common::refusal::{Reply, header_str};
use serde_json::{Value, json};
use voicegate_server::ServeConfig;
use voicegate_server::serve::ServerBuilder;

const AUD: &str = "voicegate-test";

fn token(uid: &str) -> String {
    common::hs256_token(json!({"sub": uid, "exp": common::now() + 600, "aud": AUD}))
}

struct Case {
    name: &'static str,
    want_status: u16,
    want_code: &'static str,
    got: Reply,
}

fn code_of(body: &Value) -> String {
    body["files"][0]["code"]
        .as_str()
        .or_else(|| body["code"].as_str())
        .unwrap_or("")
        .to_owned()
}

#[actix_web::test]
async fn every_bad_input_gets_its_documented_answer_and_meters_nothing() {
    let server = EngineServer::start(fair_use_on(), |c| {
        c.jwt_hs256_secret = Some(common::HS_SECRET.into());
        c.jwt_audience = Some(AUD.into());
        c.upload_max_file_bytes = 200_000;
        c.upload_max_files = 3;
        c.upload_max_request_bytes = 500_000;
    })
    .await;
    let fx = fixtures();
    let good = |i: usize, ago: u64| (omi_name(ago), fx[i].1.clone());

    // The victim's speech and conversation, before.
    let victim = token("victim");
    let (code, up, _) = server.upload(&victim, "", &[good(0, 1_000)]).await;
    assert_eq!(code, 200, "{up}");
    let victim_conv = up["new_memories"][0].as_str().unwrap().to_owned();
    let victim_before = server.status_speech_ms(&victim).await;
    let victim_segments = up_segments(&server, &victim, &victim_conv).await;
    assert!(victim_segments.is_some());
    let attacker = token("attacker");

    let mut cases: Vec<Case> = Vec::new();
    let mut add = |name, want_status, want_code, got: Reply| {
        cases.push(Case {
            name,
            want_status,
            want_code,
            got,
        });
    };
    let upload = |bearer: String, files: Vec<(String, Vec<u8>)>| {
        let server = &server;
        async move {
            let (c, b, h) = server.upload(&bearer, "", &files).await;
            Reply::new(c, header_str(&h).as_deref(), b)
        }
    };
    let raw_post = |bearer: Option<String>, ctype: &'static str, body: Vec<u8>| {
        let server = &server;
        async move {
            let mut req = server
                .http
                .post(server.url("/v1/sync-local-files"))
                .header("content-type", ctype)
                .body(body);
            if let Some(b) = bearer {
                req = req.bearer_auth(b);
            }
            Reply::of(req.send().await.unwrap()).await
        }
    };

    // Tokens.
    add(
        "no token",
        401,
        "auth_missing",
        raw_post(
            None,
            "multipart/form-data; boundary=x",
            b"--x--\r\n".to_vec(),
        )
        .await,
    );
    add(
        "expired token",
        401,
        "token_expired",
        upload(
            common::hs256_token(
                json!({"sub": "attacker", "exp": common::now() - 3_600, "aud": AUD}),
            ),
            vec![good(1, 60)],
        )
        .await,
    );
    add("forged token (other secret)", 401, "token_bad_signature", {
        let forged = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &json!({"sub": "victim", "exp": common::now() + 600, "aud": AUD}),
            &jsonwebtoken::EncodingKey::from_secret(b"not-the-secret"),
        )
        .unwrap();
        upload(forged, vec![good(1, 60)]).await
    });
    add(
        "wrong audience",
        401,
        "token_wrong_audience",
        upload(
            common::hs256_token(
                json!({"sub": "attacker", "exp": common::now() + 600, "aud": "other"}),
            ),
            vec![good(1, 60)],
        )
        .await,
    );
    add(
        "no sub claim",
        401,
        "token_missing_claim",
        upload(
            common::hs256_token(json!({"exp": common::now() + 600, "aud": AUD})),
            vec![good(1, 60)],
        )
        .await,
    );
    add(
        "dev-style bearer (a bare uid) with verification on",
        401,
        "token_invalid",
        upload("victim".into(), vec![good(1, 60)]).await,
    );
    add("malformed Authorization header", 401, "auth_malformed", {
        let resp = server
            .http
            .get(server.url("/v1/fair-use/status"))
            .header("Authorization", "Basic abc")
            .send()
            .await
            .unwrap();
        Reply::of(resp).await
    });

    // Upload bodies and limits.
    add(
        "empty multipart",
        400,
        "upload_empty",
        raw_post(
            Some(attacker.clone()),
            "multipart/form-data; boundary=x",
            b"--x--\r\n".to_vec(),
        )
        .await,
    );
    add(
        "not multipart",
        400,
        "upload_not_multipart",
        raw_post(Some(attacker.clone()), "application/json", b"{}".to_vec()).await,
    );
    add("malformed multipart", 400, "upload_malformed", raw_post(Some(attacker.clone()), "multipart/form-data; boundary=x", b"--x\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.bin\"\r\n\r\ncut off before the boundary".to_vec()).await);
    add(
        "oversized file",
        413,
        "upload_file_too_large",
        upload(attacker.clone(), vec![(omi_name(60), vec![0u8; 250_000])]).await,
    );
    add(
        "too many files",
        413,
        "upload_too_many_files",
        upload(
            attacker.clone(),
            (0..4).map(|i| (omi_name(60 + i), vec![1u8; 100])).collect(),
        )
        .await,
    );
    add(
        "request too large",
        413,
        "upload_request_too_large",
        upload(
            attacker.clone(),
            (0..3)
                .map(|i| (omi_name(60 + i), vec![1u8; 190_000]))
                .collect(),
        )
        .await,
    );

    // Bad files: each fails itself; alone, the request is 400.
    add(
        "name without timestamp",
        400,
        "missing_timestamp",
        upload(
            attacker.clone(),
            vec![("audio.bin".into(), fx[1].1.clone())],
        )
        .await,
    );
    add(
        "non-integer timestamp",
        400,
        "invalid_timestamp",
        upload(
            attacker.clone(),
            vec![(
                "audio_omi_opus_16000_1_fs160_abc.bin".into(),
                fx[1].1.clone(),
            )],
        )
        .await,
    );
    add(
        "timestamp before 2024",
        400,
        "timestamp_too_old",
        upload(
            attacker.clone(),
            vec![(
                "audio_omi_opus_16000_1_fs160_1600000000.bin".into(),
                fx[1].1.clone(),
            )],
        )
        .await,
    );
    add(
        "timestamp in the future",
        400,
        "timestamp_in_future",
        upload(
            attacker.clone(),
            vec![(
                format!("audio_omi_opus_16000_1_fs160_{}.bin", now_s() + 86_400),
                fx[1].1.clone(),
            )],
        )
        .await,
    );
    add(
        "unknown codec in the name",
        400,
        "unknown_codec",
        upload(
            attacker.clone(),
            vec![(
                format!("audio_omi_aac_16000_1_{}.bin", now_s() - 60),
                fx[1].1.clone(),
            )],
        )
        .await,
    );
    add(
        "not a .bin",
        400,
        "invalid_file_format",
        upload(
            attacker.clone(),
            vec![(format!("audio_{}.wav", now_s() - 60), fx[1].1.clone())],
        )
        .await,
    );
    add(
        "empty file",
        400,
        "",
        upload(attacker.clone(), vec![(omi_name(60), Vec::new())]).await,
    );
    add(
        "random bytes as Opus",
        400,
        "",
        upload(
            attacker.clone(),
            vec![(
                omi_name(60),
                (0..50_000u32)
                    .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                    .collect(),
            )],
        )
        .await,
    );
    add(
        "length prefix over the bound",
        400,
        "",
        upload(
            attacker.clone(),
            vec![(omi_name(60), [0xff, 0xff, 0xff, 0x7f, 1, 2, 3].to_vec())],
        )
        .await,
    );
    add(
        "one bad name among good files",
        207,
        "",
        upload(
            attacker.clone(),
            vec![("bad.bin".into(), fx[1].1.clone()), good(2, 120)],
        )
        .await,
    );

    // Conversations and admin.
    add(
        "another user's conversation id",
        404,
        "conversation_not_found",
        server
            .get_reply(&format!("/v1/conversations/{victim_conv}"), &attacker)
            .await,
    );
    add(
        "garbage conversation id",
        404,
        "conversation_not_found",
        server
            .get_reply("/v1/conversations/..%2F..%2Fetc", &attacker)
            .await,
    );
    add(
        "conversation list limit 0",
        400,
        "invalid_limit",
        server
            .get_reply("/v1/conversations?limit=0", &attacker)
            .await,
    );
    add(
        "admin route without key",
        422,
        "admin_key_missing",
        server
            .get_reply("/v1/admin/fair-use/flagged", &attacker)
            .await,
    );
    add("admin route with a wrong key", 403, "admin_key_invalid", {
        let resp = server
            .http
            .get(server.url("/v1/admin/fair-use/user/victim"))
            .header("X-Admin-Key", "guess")
            .send()
            .await
            .unwrap();
        Reply::of(resp).await
    });
    add(
        "admin set-stage with an invalid stage",
        400,
        "invalid_stage",
        {
            let resp = server
                .http
                .post(server.url("/v1/admin/fair-use/user/victim/set-stage?stage=banned"))
                .header("X-Admin-Key", ADMIN_KEY)
                .send()
                .await
                .unwrap();
            Reply::of(resp).await
        },
    );
    for (what, query, code) in [
        (
            "admin STT ledger with a date that is not one",
            "?from=2026-13-01",
            "invalid_date",
        ),
        (
            "admin STT ledger with from after to",
            "?from=2026-12-06&to=2026-12-01",
            "invalid_range",
        ),
        (
            "admin STT ledger over its retention",
            "?from=2026-01-01&to=2026-12-01",
            "invalid_range",
        ),
        (
            "admin STT ledger with an unknown parameter",
            "?since=2026-12-01",
            "",
        ),
    ] {
        let resp = server
            .http
            .get(server.url(&format!("/v1/admin/stt/user/victim{query}")))
            .header("X-Admin-Key", ADMIN_KEY)
            .send()
            .await
            .unwrap();
        add(what, 400, code, Reply::of(resp).await);
    }
    add("stripe webhook without signature", 400, "", {
        let resp = server
            .http
            .post(server.url("/v1/stripe/webhook"))
            .body("{}")
            .send()
            .await
            .unwrap();
        Reply::of(resp).await
    });
    add("stripe webhook with a forged signature", 400, "", {
        let body = json!({"id": "evt_x", "type": "checkout.session.completed", "data": {"object": {"metadata": {"uid": "attacker", "plan": "unlimited"}}}}).to_string();
        let resp = server
            .http
            .post(server.url("/v1/stripe/webhook"))
            .header(
                "Stripe-Signature",
                format!("t={},v1={}", common::now(), "ab".repeat(32)),
            )
            .body(body)
            .send()
            .await
            .unwrap();
        Reply::of(resp).await
    });
    add(
        "unknown route",
        404,
        "route_not_found",
        server.get_reply("/v1/nope", &attacker).await,
    );

    // A sync upload that names the victim's conversation never touches it.
    let (code, body, _) = server
        .upload(
            &attacker,
            &format!("?conversation_id={victim_conv}"),
            &[good(3, 30)],
        )
        .await;
    assert_eq!(code, 200, "{body}");
    assert!(
        !body["updated_memories"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v == &json!(victim_conv))
    );

    println!("{:<52} {:>6} {:>6}  code", "case", "want", "got");
    let mut failures = Vec::new();
    for c in &cases {
        let code = code_of(&c.got.body);
        println!(
            "{:<52} {:>6} {:>6}  {code}",
            c.name, c.want_status, c.got.status
        );
        if c.got.status != c.want_status || (!c.want_code.is_empty() && code != c.want_code) {
            failures.push(format!(
                "{}: want {} {}, got {} {}",
                c.name, c.want_status, c.want_code, c.got.status, c.got.body
            ));
        }
        // Every refusal has the one shape (code, message, retryable, Retry-After exactly when retryable),
        // a per-file failure also names its code in files[]; and none of these can succeed on a retry.
        if c.got.status >= 400 {
            assert_eq!(c.got.assert_refusal(c.name), None, "{}: retryable", c.name);
        }
    }
    assert!(cases.len() >= 25, "{} cases", cases.len());
    assert!(failures.is_empty(), "{failures:#?}");

    // Nobody's metered speech moved: the victim's is what it was; the attacker has only the two good uploads.
    assert_eq!(server.status_speech_ms(&victim).await, victim_before);
    let (code, _) = server
        .get(&format!("/v1/conversations/{victim_conv}"), &victim)
        .await;
    assert_eq!(code, 200);
    assert_eq!(
        up_segments(&server, &victim, &victim_conv).await,
        victim_segments
    );
}

async fn up_segments(server: &EngineServer, bearer: &str, id: &str) -> Option<u64> {
    let (_, list) = server.get("/v1/conversations?limit=200", bearer).await;
    list["conversations"]
        .as_array()?
        .iter()
        .find(|c| c["id"] == id)?["segments"]
        .as_u64()
}

#[test]
fn dev_auth_on_a_public_bind_refuses_to_start() {
    let cfg = ServeConfig {
        bind: "0.0.0.0:0".into(),
        ..ServeConfig::default()
    };
    let err = ServerBuilder::new(cfg)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("0.0.0.0"), "{err}");
}

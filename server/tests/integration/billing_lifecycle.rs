//! The billing lifecycle end to end through signed webhooks: paid → cancelled → free, locked after the free
//! tier (paid-era content stays unlocked; locked speech starts its own conversations) → a late, older
//! `active` update changes nothing → paid again, everything unlocked; and a bulk import of 10,000 plans
//! takes effect without a restart.

use crate::common;

use common::engine_server::{
    ADMIN_KEY, EngineServer, STRIPE_SECRET, fair_use_on, fixtures, omi_name, split,
};
use serde_json::{Value, json};

fn subscription(id: &str, kind: &str, status: &str, created: u64) -> Value {
    json!({"id": id, "type": kind, "created": created,
           "data": {"object": {"status": status, "metadata": {"uid": "payer", "plan": "unlimited"}}}})
}

#[actix_web::test]
async fn cancelled_goes_free_and_locks_after_the_free_tier_and_paying_again_unlocks() {
    let mut fair = fair_use_on();
    fair.plans.free_minutes_per_month = 1; // 60 s of speech
    let server = EngineServer::start(fair, |_| {}).await;
    let t = common::now();
    let fx = fixtures();
    // Files an hour apart: each its own conversation.
    let file = |i: usize| vec![(omi_name(36_000 - 3_600 * i as u64), fx[i].1.clone())];

    let (code, body) = server
        .webhook(
            &subscription("evt_1", "customer.subscription.created", "active", t - 100),
            STRIPE_SECRET,
        )
        .await
        .pair();
    assert_eq!((code, &body["applied"]), (200, &json!(true)), "{body}");
    let (code, paid_era, _) = server.upload("payer", "", &file(0)).await;
    assert_eq!(code, 200, "{paid_era}");
    assert_eq!(paid_era["locked"], false);
    let paid_id = paid_era["new_memories"][0].as_str().unwrap().to_owned();

    // Cancelled: the free plan from now on.
    let (code, body) = server
        .webhook(
            &subscription("evt_2", "customer.subscription.deleted", "canceled", t - 50),
            STRIPE_SECRET,
        )
        .await
        .pair();
    assert_eq!((code, &body["applied"]), (200, &json!(true)), "{body}");
    let (_, status) = server.get("/v1/fair-use/status", "payer").await;
    assert_eq!(status["credits"]["plan"]["id"], "basic", "{status}");

    // A late delivery of an older `active` update does not undo the cancellation.
    let (code, body) = server
        .webhook(
            &subscription("evt_1b", "customer.subscription.updated", "active", t - 80),
            STRIPE_SECRET,
        )
        .await
        .pair();
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        (&body["applied"], &body["stale"]),
        (&json!(false), &json!(true)),
        "{body}"
    );

    // The month's speech passes the free minute: from then on new content is locked, in its own
    // conversations; the paid-era conversation stays unlocked.
    let mut locked_ids = Vec::new();
    for i in 1..6 {
        let (code, body, _) = server.upload("payer", "", &file(i)).await;
        assert_eq!(code, 200, "{body}");
        if body["locked"] == true {
            locked_ids.extend(
                body["new_memories"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_str().unwrap().to_owned()),
            );
        }
    }
    assert!(!locked_ids.is_empty(), "the free tier ran out");
    for id in &locked_ids {
        let reply = server
            .get_reply(&format!("/v1/conversations/{id}"), "payer")
            .await;
        assert_eq!(reply.status, 402, "{}", reply.body);
    }
    let (code, body) = server
        .get(&format!("/v1/conversations/{paid_id}"), "payer")
        .await;
    assert_eq!(code, 200, "downgrade never re-locks: {body}");
    assert_eq!(body["is_locked"], false);

    // Paid again: everything unlocked, new content unlocked.
    let (code, body) = server
        .webhook(
            &subscription("evt_3", "customer.subscription.updated", "active", t),
            STRIPE_SECRET,
        )
        .await
        .pair();
    assert_eq!((code, &body["applied"]), (200, &json!(true)), "{body}");
    for id in &locked_ids {
        let (code, body) = server
            .get(&format!("/v1/conversations/{id}"), "payer")
            .await;
        assert_eq!((code, &body["is_locked"]), (200, &json!(false)), "{body}");
    }
    let (code, body, _) = server.upload("payer", "", &file(6)).await;
    assert_eq!((code, &body["locked"]), (200, &json!(false)), "{body}");
    server.shutdown().await;
}

#[actix_web::test]
async fn a_bulk_import_of_10000_plans_takes_effect_without_a_restart() {
    let mut fair = fair_use_on();
    fair.plans.free_minutes_per_month = 1;
    let server = EngineServer::start(fair, |_| {}).await;
    let mut body = String::new();
    for i in 0..10_000 {
        let plan = if i % 2 == 0 { "unlimited" } else { "basic" };
        body.push_str(&format!(
            "{{\"uid\":\"imported-{i}\",\"plan\":\"{plan}\"}}\n"
        ));
    }
    body.push_str("{\"uid\":\"bad uid\",\"plan\":\"unlimited\"}\n\n{not json}\n");
    let import = |body: String| {
        server
            .http
            .post(server.url("/v1/admin/plans/import"))
            .header("X-Admin-Key", ADMIN_KEY)
            .body(body)
            .send()
    };
    let started = std::time::Instant::now();
    let (code, answer) = split(import(body.clone()).await.unwrap()).await;
    let took = started.elapsed();
    assert_eq!(code, 200, "{answer}");
    assert_eq!(
        (
            &answer["lines"],
            &answer["stored"],
            &answer["refused"],
            &answer["failed"]
        ),
        (&json!(10_002), &json!(10_000), &json!(2), &json!(0)),
        "{answer}"
    );
    let problems = answer["problems"].as_array().unwrap();
    assert_eq!(problems[0]["code"], "uid_invalid");
    assert_eq!(problems[1]["code"], "invalid_line");
    println!("imported 10,000 plans in {took:?}");
    // In effect at once, on the running node.
    for (uid, plan) in [
        ("imported-0", "unlimited"),
        ("imported-1", "basic"),
        ("imported-9998", "unlimited"),
    ] {
        let (_, status) = server.get("/v1/fair-use/status", uid).await;
        assert_eq!(status["credits"]["plan"]["id"], plan, "{uid}: {status}");
    }
    let (code, one) = split(
        server
            .http
            .get(server.url("/v1/admin/plans/user/imported-2"))
            .header("X-Admin-Key", ADMIN_KEY)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (code, &one["plan"], &one["paid"]),
        (200, &json!("unlimited"), &json!(true)),
        "{one}"
    );
    // The same file again changes nothing.
    let (code, again) = split(import(body).await.unwrap()).await;
    assert_eq!(
        (code, &again["stored"], &again["duplicate"]),
        (200, &json!(0), &json!(10_000)),
        "{again}"
    );
    // The admin set-plan route, and its refusals.
    let set = |uid: &str, body: Value| {
        server
            .http
            .put(server.url(&format!("/v1/admin/plans/user/{uid}")))
            .header("X-Admin-Key", ADMIN_KEY)
            .json(&body)
            .send()
    };
    let (code, r) = split(
        set("imported-1", json!({"plan": "operator"}))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (code, &r["outcome"], &r["paid"]),
        (200, &json!("stored"), &json!(true)),
        "{r}"
    );
    let (code, r) = split(set("imported-1", json!({"plan": "x y"})).await.unwrap()).await;
    assert_eq!((code, &r["code"]), (400, &json!("invalid_plan")), "{r}");
    let (code, r) = split(
        set("imported-1", json!({"plan": "basic", "at_ms": 1}))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (code, &r["outcome"]),
        (200, &json!("stale")),
        "an older change: {r}"
    );
    let (code, _) = split(
        server
            .http
            .put(server.url("/v1/admin/plans/user/imported-1"))
            .json(&json!({"plan": "basic"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        code, 422,
        "the admin key is required (422 without it, as the reference answers)"
    );
    server.shutdown().await;
}

#[actix_web::test]
async fn a_payment_clears_a_fair_use_stage_only_when_the_operator_says_so() {
    for clears in [false, true] {
        let mut fair = fair_use_on();
        fair.payment_clears_stage = clears;
        let server = EngineServer::start(fair, |_| {}).await;
        let (code, _) = split(
            server
                .http
                .post(server.url("/v1/admin/fair-use/user/payer/set-stage?stage=throttle"))
                .header("X-Admin-Key", ADMIN_KEY)
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(code, 200);
        let (code, body) = server
            .webhook(
                &subscription(
                    "evt_p",
                    "customer.subscription.created",
                    "active",
                    common::now(),
                ),
                STRIPE_SECRET,
            )
            .await
            .pair();
        assert_eq!((code, &body["applied"]), (200, &json!(true)), "{body}");
        let (_, status) = server.get("/v1/fair-use/status", "payer").await;
        let want = if clears { "none" } else { "throttle" };
        assert_eq!(status["stage"], want, "clears={clears}: {status}");
        // The reset is an audited event: `admin_reset` by `stripe`.
        let (code, user) = split(
            server
                .http
                .get(server.url("/v1/admin/fair-use/user/payer"))
                .header("X-Admin-Key", ADMIN_KEY)
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(code, 200, "{user}");
        let resets: Vec<&Value> = user["events"]
            .as_array()
            .expect("events")
            .iter()
            .filter(|e| e["kind"] == "admin_reset")
            .collect();
        assert_eq!(resets.len(), usize::from(clears), "{user}");
        if clears {
            assert_eq!(resets[0]["actor"], "stripe", "{user}");
        }
        server.shutdown().await;
    }
}

#[actix_web::test]
async fn a_user_no_source_named_is_on_the_unknown_plan_metered_and_never_locked_by_default() {
    let mut fair = voicegate_engine::policy::FairUseConfig::default();
    assert_eq!(
        fair.plans.default_plan,
        voicegate_engine::policy::DefaultPlan::Unknown
    );
    fair.plans.free_minutes_per_month = 1;
    let server = EngineServer::start(fair, |_| {}).await;
    let fx = fixtures();
    let files: Vec<_> = (0..6)
        .map(|i| (omi_name(36_000 - 3_600 * i as u64), fx[i].1.clone()))
        .collect();
    let (code, body, _) = server.upload("stranger", "", &files).await;
    assert_eq!(code, 200, "{body}");
    assert!(
        body["speech_ms"].as_u64().unwrap() > 60_000,
        "past the free minute: {body}"
    );
    let (code, body, _) = server
        .upload("stranger", "", &[(omi_name(600), fx[6].1.clone())])
        .await;
    assert_eq!((code, &body["locked"]), (200, &json!(false)), "{body}");
    let (_, status) = server.get("/v1/fair-use/status", "stranger").await;
    assert_eq!(status["credits"]["plan"]["id"], "unknown", "{status}");
    assert_eq!(status["locked"], false);
    assert!(
        status["speech_ms"]["month_ms"].as_u64().unwrap() > 60_000,
        "metered: {status}"
    );
    server.shutdown().await;
}

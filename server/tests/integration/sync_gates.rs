//! The gates of sync uploads end to end (real redis-server): restricted over a cap → 429 + Retry-After;
//! credits exhausted → 200 with locked conversations that answer 402; a signed payment unlocks them and a
//! badly signed one changes nothing; the restrict stage's used-up STT budget refuses nothing (200, metered,
//! conversations written; with no provider nothing is transcribed).

use crate::common;

use std::time::{SystemTime, UNIX_EPOCH};

use common::engine_server::{
    ADMIN_KEY, EngineServer, STRIPE_SECRET, fair_use_on, fixtures, now_s, omi_name,
};
use common::refusal::{Reply, header_str};
use serde_json::{Value, json};
use voicegate_engine::policy::{FairUseConfig, PlanCaps, SoftCaps};

fn one_fixture(i: usize, ago_s: u64) -> Vec<(String, Vec<u8>)> {
    let (_, bytes) = fixtures().swap_remove(i);
    vec![(omi_name(ago_s), bytes)]
}

async fn admin_post(server: &EngineServer, path: &str) -> (u16, Value) {
    let resp = server
        .http
        .post(server.url(path))
        .header("X-Admin-Key", ADMIN_KEY)
        .send()
        .await
        .unwrap();
    common::engine_server::split(resp).await
}

#[actix_web::test]
async fn restricted_over_a_cap_gets_429_with_retry_after_and_nothing_is_metered() {
    let fair = FairUseConfig {
        caps: PlanCaps::uniform(SoftCaps {
            daily_ms: 1_000,
            three_day_ms: 1_000,
            weekly_ms: 1_000,
        }),
        ..fair_use_on()
    };
    let server = EngineServer::start(fair, |_| {}).await;
    let (code, body, _) = server.upload("heavy", "", &one_fixture(0, 600)).await;
    assert_eq!(code, 200, "{body}");
    let before = server.status_speech_ms("heavy").await;
    assert!(before["daily_ms"].as_u64().unwrap() > 1_000);

    let (code, body) = admin_post(
        &server,
        "/v1/admin/fair-use/user/heavy/set-stage?stage=restrict",
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let (code, body, headers) = server.upload("heavy", "", &one_fixture(1, 300)).await;
    let refusal = Reply::new(code, header_str(&headers).as_deref(), body);
    let retry = refusal.assert_refusal("restricted over a cap");
    let body = refusal.body;
    assert_eq!(code, 429, "{body}");
    assert_eq!(body["code"], "fair_use_restricted");
    assert_eq!(body["new_memories"], json!([]));
    // Over all three caps: the weekly window holds the speech longest (168 h), well before the
    // restriction's 30 days end.
    let retry = retry.unwrap_or_else(|| panic!("a 429 is retryable: {body}"));
    assert!(
        (167 * 3_600..=168 * 3_600 + 1).contains(&retry),
        "Retry-After {retry}"
    );
    assert_eq!(
        server.status_speech_ms("heavy").await,
        before,
        "a refused upload meters nothing"
    );

    // Another user is not affected.
    let (code, body, _) = server.upload("light", "", &one_fixture(1, 300)).await;
    assert_eq!(code, 200, "{body}");
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[actix_web::test]
async fn sync_upload_over_cap_while_restricted_answers_429_with_retry_after_when_the_totals_fall_back_under()
 {
    // Over the daily cap only: 1 s of speech a day, the 3-day and weekly caps far away.
    let fair = FairUseConfig {
        caps: PlanCaps::uniform(SoftCaps {
            daily_ms: 1_000,
            three_day_ms: 36_000_000,
            weekly_ms: 36_000_000,
        }),
        ..fair_use_on()
    };
    let server = EngineServer::start(fair, |_| {}).await;
    // d01 (30 s) named at the start of a minute 2 h ago: all its speech lands in that one minute bucket,
    // which leaves the 24 h window 1 ms after its start + 24 h (a bucket counts while its start >= now -
    // 24 h). That is when the totals fall back under the caps, about 22 h from now.
    let d01 = format!("{}/../fixtures/d01.json", env!("CARGO_MANIFEST_DIR"));
    let d01: Value = serde_json::from_slice(&std::fs::read(&d01).unwrap()).unwrap();
    assert!(d01["duration_ms"].as_u64().unwrap() < 60_000, "{d01}");
    let minute_s = (now_s() - 2 * 3_600) / 60 * 60;
    let (name, bytes) = fixtures().swap_remove(0);
    assert_eq!(name, "d01.bin");
    let file = vec![(
        format!("audio_omi_opus_16000_1_fs160_{minute_s}.bin"),
        bytes,
    )];
    let (code, body, _) = server.upload("heavy", "", &file).await;
    assert_eq!(code, 200, "{body}");
    let speech = server.status_speech_ms("heavy").await;
    assert!(speech["daily_ms"].as_u64().unwrap() > 1_000, "{speech}");
    let falls_under_ms = minute_s * 1_000 + 24 * 3_600_000 + 1;

    let (code, body) = admin_post(
        &server,
        "/v1/admin/fair-use/user/heavy/set-stage?stage=restrict",
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let restrict_until_ms = body["state"]["restrict_until_ms"].as_u64().unwrap();
    assert!(
        restrict_until_ms > falls_under_ms + 28 * 86_400_000,
        "{body}"
    );

    let sent_ms = now_ms();
    let (code, body, headers) = server.upload("heavy", "", &one_fixture(1, 300)).await;
    let answered_ms = now_ms();
    let refusal = Reply::new(code, header_str(&headers).as_deref(), body);
    let retry = refusal.assert_refusal("restricted over the daily cap");
    let body = refusal.body;
    assert_eq!(code, 429, "{body}");
    assert_eq!(body["code"], "fair_use_restricted", "{body}");
    // The header equals the body (checked above) and both count whole seconds, rounded up, from the
    // server's now (somewhere between sending and the answer) to the fall-under moment.
    let retry = retry.unwrap_or_else(|| panic!("a 429 is retryable: {body}"));
    let earliest = (falls_under_ms - answered_ms).div_ceil(1_000);
    let latest = (falls_under_ms - sent_ms).div_ceil(1_000);
    assert!(
        (earliest..=latest).contains(&retry),
        "Retry-After {retry}, want {earliest}..={latest} (the restriction ends in {} s)",
        (restrict_until_ms - answered_ms) / 1_000
    );
    assert_eq!(server.status_speech_ms("heavy").await, speech);
}

#[actix_web::test]
async fn exhausted_credits_lock_and_a_signed_payment_unlocks() {
    let mut fair = fair_use_on();
    fair.plans.free_minutes_per_month = 1; // 60 s of speech
    let server = EngineServer::start(fair, |_| {}).await;
    // The first upload (credits left) is not locked; it uses up the minute.
    let files: Vec<(String, Vec<u8>)> = fixtures()
        .into_iter()
        .take(6)
        .enumerate()
        .map(|(i, (_, b))| (omi_name(7_200 + 600 * i as u64), b))
        .collect();
    let (code, first, _) = server.upload("free", "", &files).await;
    assert!(first["speech_ms"].as_u64().unwrap() > 60_000, "{first}");
    assert_eq!(code, 200, "{first}");
    assert_eq!(first["locked"], false);
    let (code, second, _) = server.upload("free", "", &one_fixture(7, 600)).await;
    assert_eq!(code, 200, "{second}");
    assert_eq!(second["locked"], true, "{second}");
    let locked_id = second["new_memories"][0].as_str().unwrap().to_owned();
    let locked = server
        .get_reply(&format!("/v1/conversations/{locked_id}"), "free")
        .await;
    assert_eq!(locked.status, 402, "{}", locked.body);
    assert_eq!(locked.body["code"], "conversation_locked");
    assert_eq!(
        locked.assert_refusal("locked conversation"),
        None,
        "a payment, not time, unlocks it"
    );
    let open_id = first["new_memories"][0].as_str().unwrap().to_owned();
    let (code, _) = server
        .get(&format!("/v1/conversations/{open_id}"), "free")
        .await;
    assert_eq!(code, 200);
    let (_, status) = server.get("/v1/fair-use/status", "free").await;
    assert_eq!(status["credits_remaining_ms"], 0, "{status}");

    let event = json!({
        "id": "evt_paid_1", "type": "checkout.session.completed",
        "data": {"object": {"metadata": {"uid": "free", "plan": "unlimited"}}}
    });
    // Badly signed: 400 (final) and still locked.
    let bad = server.webhook(&event, "whsec_wrong").await;
    assert_eq!(bad.status, 400, "{}", bad.body);
    assert_eq!(bad.assert_refusal("bad signature"), None);
    let (code, _) = server
        .get(&format!("/v1/conversations/{locked_id}"), "free")
        .await;
    assert_eq!(code, 402);
    // Correctly signed: unlocked, and new uploads are no longer locked.
    let (code, body) = server.webhook(&event, STRIPE_SECRET).await.pair();
    assert_eq!(code, 200, "{body}");
    let (code, body) = server
        .get(&format!("/v1/conversations/{locked_id}"), "free")
        .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["is_locked"], false);
    // Published downstream: the user's conversations were unlocked (one was locked).
    let events = server
        .events_until(|evs| evs.iter().any(|e| e["type"] == "conversations_unlocked"))
        .await;
    let unlocked = events
        .iter()
        .find(|e| e["type"] == "conversations_unlocked")
        .unwrap();
    assert_eq!(unlocked["uid"], "free");
    assert_eq!(unlocked["data"], "{\"count\":1}");
    let (code, third, _) = server.upload("free", "", &one_fixture(8, 300)).await;
    assert_eq!(code, 200, "{third}");
    assert_eq!(third["locked"], false);
    let (_, status) = server.get("/v1/fair-use/status", "free").await;
    assert_eq!(
        status["credits_remaining_ms"],
        Value::Null,
        "unlimited: {status}"
    );
}

#[actix_web::test]
async fn restrict_stage_with_the_stt_budget_used_up_still_answers_200_and_meters_once() {
    let mut fair = fair_use_on();
    fair.restrict_daily_stt_ms = 1_000;
    let server = EngineServer::start(fair, |_| {}).await;
    let (code, body) = admin_post(
        &server,
        "/v1/admin/fair-use/user/r/set-stage?stage=restrict",
    )
    .await;
    assert_eq!(code, 200, "{body}");
    server
        .engine
        .fair_use
        .record_stt("r", &[("none", 1_000)], false)
        .await
        .unwrap();
    let files = one_fixture(5, 900);
    let (code, body, _) = server.upload("r", "", &files).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["new_memories"].as_array().unwrap().len(), 1, "{body}");
    assert_eq!(body["stt_ms"], 0, "{body}");
    assert!(
        body.get("transcript_status").is_none(),
        "VOICEGATE_STT=none transcribes nothing: {body}"
    );
    let metered = server.status_speech_ms("r").await["daily_ms"].clone();
    assert_eq!(metered, body["speech_ms"], "the speech is metered");
    // A retry does not meter it twice.
    let (code, again, _) = server.upload("r", "", &files).await;
    assert_eq!(code, 200, "{again}");
    assert_eq!(again["files"][0]["status"], "duplicate");
    assert_eq!(server.status_speech_ms("r").await["daily_ms"], metered);
}

#[actix_web::test]
async fn over_the_speech_ceiling_a_paying_user_at_no_stage_gets_429_speech_ceiling_until_the_day_falls_back()
 {
    // The ceiling lowered to 2 s (a test setting; the default is 30 h, refused at startup below the daily
    // caps): one fixture's speech in one minute bucket 2 h ago passes it.
    let fair = FairUseConfig {
        ceiling_ms: 2_000,
        ..fair_use_on()
    };
    let server = EngineServer::start(fair, |_| {}).await;
    let minute_s = (now_s() - 2 * 3_600) / 60 * 60;
    let (name, bytes) = fixtures().swap_remove(0);
    assert_eq!(name, "d01.bin");
    let file = vec![(
        format!("audio_omi_opus_16000_1_fs160_{minute_s}.bin"),
        bytes,
    )];
    let resp = server
        .http
        .put(server.url("/v1/admin/plans/user/payer"))
        .header("X-Admin-Key", ADMIN_KEY)
        .json(&json!({"plan": "unlimited"}))
        .send()
        .await
        .unwrap();
    let (code, body) = common::engine_server::split(resp).await;
    assert_eq!(code, 200, "{body}");
    let (code, body, _) = server.upload("payer", "", &file).await;
    assert_eq!(code, 200, "{body}");
    let (code, status) = server.get("/v1/fair-use/status", "payer").await;
    assert_eq!(code, 200, "{status}");
    assert!(
        status["speech_ms"]["daily_ms"].as_u64().unwrap() > 2_000,
        "{status}"
    );
    assert_eq!(status["over_ceiling"], true, "{status}");
    assert_eq!(status["stage"], "none", "{status}");
    assert_eq!(
        status["limits"]["daily_hours"], 4.0,
        "the paid plan's caps: {status}"
    );
    assert_eq!(status["stt"]["reason"], "speech_ceiling", "{status}");
    let falls_under_ms = minute_s * 1_000 + 24 * 3_600_000 + 1;

    let sent_ms = now_ms();
    let (code, body, headers) = server.upload("payer", "", &one_fixture(1, 300)).await;
    let answered_ms = now_ms();
    let refusal = Reply::new(code, header_str(&headers).as_deref(), body);
    let retry = refusal.assert_refusal("over the speech ceiling");
    let body = refusal.body;
    assert_eq!(code, 429, "{body}");
    assert_eq!(body["code"], "speech_ceiling", "{body}");
    assert_eq!(body["stage"], "none", "{body}");
    let retry = retry.unwrap_or_else(|| panic!("a 429 is retryable: {body}"));
    let earliest = (falls_under_ms - answered_ms).div_ceil(1_000);
    let latest = (falls_under_ms - sent_ms).div_ceil(1_000);
    assert!(
        (earliest..=latest).contains(&retry),
        "Retry-After {retry}, want {earliest}..={latest}"
    );
    // Another user is not affected.
    let (code, body, _) = server.upload("light", "", &one_fixture(1, 300)).await;
    assert_eq!(code, 200, "{body}");
}

//! A user restricted over a cap: sync answers 429 with `Retry-After` while the realtime socket keeps
//! streaming and metering (fair use never closes or refuses the socket; the reference's §3.7 and §4.9).

use crate::common;
use crate::listen_support;

use common::engine_server::{ADMIN_KEY, EngineServer, fair_use_on, fixtures, omi_name, split};
use common::refusal::{Reply, header_str};
use listen_support::{NORMAL, connect, fixture_packets, stream_packets};
use voicegate_engine::policy::{FairUseConfig, PlanCaps, SoftCaps};

#[actix_web::test]
async fn restricted_over_a_cap_sync_gets_429_while_realtime_keeps_streaming() {
    let fair = FairUseConfig {
        caps: PlanCaps::uniform(SoftCaps {
            daily_ms: 1_000,
            three_day_ms: 1_000,
            weekly_ms: 1_000,
        }),
        ..fair_use_on()
    };
    // The stream runs at 10x, over the default intake limit of 4x.
    let server = EngineServer::start(fair, |c| c.listen_max_pace = 20.0).await;
    let fx = fixtures();
    let (code, body, _) = server
        .upload("heavy", "", &[(omi_name(900), fx[0].1.clone())])
        .await;
    assert_eq!(code, 200, "{body}");
    let resp = server
        .http
        .post(server.url("/v1/admin/fair-use/user/heavy/set-stage?stage=restrict"))
        .header("X-Admin-Key", ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(split(resp).await.0, 200);

    // The socket opens and streams a whole fixture while sync is refused.
    let ws = connect(server.addr, Some("heavy"), "codec=opus&sample_rate=16000")
        .await
        .unwrap_or_else(|s| panic!("upgrade refused with {s}"));
    let before = server.status_speech_ms("heavy").await["daily_ms"]
        .as_u64()
        .unwrap();
    let streaming = {
        let packets = fixture_packets("d02");
        tokio::spawn(async move { stream_packets(ws, &packets, 10).await })
    };
    let (code, body, headers) = server
        .upload("heavy", "", &[(omi_name(300), fx[1].1.clone())])
        .await;
    assert_eq!(code, 429, "{body}");
    assert_eq!(body["code"], "fair_use_restricted");
    let refusal = Reply::new(code, header_str(&headers).as_deref(), body);
    assert!(refusal.assert_refusal("restricted sync").is_some());

    let (seen, _) = streaming.await.unwrap();
    assert_eq!(
        seen.close,
        Some((NORMAL, String::new())),
        "{:?}",
        seen.events
    );
    let speech = seen.metadata()["speech_ms"].as_u64().unwrap();
    assert!(speech > 0);
    let after = server.status_speech_ms("heavy").await["daily_ms"]
        .as_u64()
        .unwrap();
    assert_eq!(
        after,
        before + speech,
        "realtime speech is metered while restricted"
    );
    server.shutdown().await;
}

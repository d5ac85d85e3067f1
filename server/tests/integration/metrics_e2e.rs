//! `/metrics` of a wired server after real traffic (uploads, status, errors): every exported VoiceGate metric
//! is documented in `docs/metrics.md`, none carries a uid (or any user) label, and the traffic shows up.

use crate::common;

use std::collections::BTreeSet;

use common::engine_server::{EngineServer, fair_use_on, fixtures, omi_name};

fn family(name: &str) -> &str {
    ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|s| name.strip_suffix(s))
        .unwrap_or(name)
}

#[actix_web::test]
async fn metrics_after_traffic_are_documented_and_never_per_user() {
    let server = EngineServer::start(fair_use_on(), |_| {}).await;
    let fx = fixtures();
    for (i, uid) in ["alice", "bob"].iter().enumerate() {
        let (code, body, _) = server
            .upload(uid, "", &[(omi_name(600 + i as u64), fx[i].1.clone())])
            .await;
        assert_eq!(code, 200, "{body}");
        let (code, _) = server.get("/v1/fair-use/status", uid).await;
        assert_eq!(code, 200);
    }
    let (code, _, _) = server
        .upload("alice", "", &[("bad.bin".into(), vec![1, 2, 3])])
        .await;
    assert_eq!(code, 400);
    // A sync upload's speech is flushed before it answers (a job's file is settled only once its speech
    // is in the store), so this round finds nothing left. The meter's gauges are set by its flusher at
    // the end of a round, and `flush_all` answers after the round: once it returns they are published.
    let round = server.engine.meter.flush_all().await;
    assert_eq!(
        (round.batches_failed, round.dirty_left),
        (0, 0),
        "alice's and bob's speech flushed: {round:?}"
    );

    let text = server.metrics_text().await;
    let doc = std::fs::read_to_string(format!("{}/../docs/metrics.md", env!("CARGO_MANIFEST_DIR")))
        .unwrap();
    let mut seen = BTreeSet::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let name = line.split(['{', ' ']).next().unwrap_or_default();
        if !name.starts_with("voicegate_") {
            continue;
        }
        let fam = family(name);
        assert!(
            doc.contains(&format!("`{fam}`")),
            "{fam} is exported but not in docs/metrics.md"
        );
        if let Some(labels) = line
            .split_once('{')
            .and_then(|(_, r)| r.split_once('}'))
            .map(|(l, _)| l)
        {
            for pair in labels.split(',').filter(|p| !p.is_empty()) {
                let key = pair.split('=').next().unwrap_or_default();
                assert!(!key.contains("uid") && !key.contains("user"), "{line}");
                assert!(
                    !pair.contains("alice") && !pair.contains("bob"),
                    "a user in a label: {line}"
                );
            }
        }
        seen.insert(fam.to_owned());
    }
    println!(
        "{} VoiceGate metric families exported: {seen:?}",
        seen.len()
    );
    for expected in [
        "voicegate_sync_requests_total",
        "voicegate_sync_files_total",
        "voicegate_sync_audio_seconds_total",
        "voicegate_sync_process_duration_seconds",
        "voicegate_http_request_duration_seconds",
        "voicegate_meter_speech_ms_total",
        "voicegate_meter_live_actors",
        "voicegate_meter_pending_speech_ms",
        "voicegate_server_state",
    ] {
        assert!(seen.contains(expected), "{expected} missing from /metrics");
    }
}

#[actix_web::test]
async fn the_daily_spend_ceiling_is_exported_at_startup_for_the_alerts() {
    let on = EngineServer::start(
        voicegate_engine::policy::FairUseConfig {
            stt_spend_ceiling_ms: 3_600_000,
            ..fair_use_on()
        },
        |_| {},
    )
    .await;
    let text = on.metrics_text().await;
    assert!(
        text.lines()
            .any(|l| l == "voicegate_stt_spend_ceiling_seconds 3600"),
        "{text}"
    );
    on.shutdown().await;
}

//! Transcripts of sync uploads with the real local engine (Moonshine, installed by `scripts/deps.sh`; this
//! test FAILS rather than skips without it): two English fixtures uploaded through `/v1/sync-local-files`
//! become conversations whose stored segments (`transcript_status: done`) match the labelled utterances;
//! what the user is charged as STT is what the engine received; a re-upload of the same content sends
//! nothing to the engine and charges nothing again.
//!
//! The WER is printed: run with `--no-capture`.

use serde_json::Value;
use voicegate_engine::stt::wer::Score;

use crate::common;
use crate::listen_transcripts::local_stt;

use common::engine_server::{EngineServer, fair_use_on, fixtures, now_s};

/// The labelled English text of fixture `id`, in order.
fn reference(id: &str) -> String {
    let path = format!("{}/../fixtures/{id}.json", env!("CARGO_MANIFEST_DIR"));
    let label: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let utterances = label["utterances"].as_array().unwrap();
    assert!(utterances.iter().all(|u| u["lang"] == "en"), "{id}");
    utterances
        .iter()
        .map(|u| u["text"].as_str().unwrap())
        .collect::<Vec<_>>()
        .join(" ")
}

const FORWARDED: &str = "voicegate_stt_forwarded_samples_total{provider=\"local\"}";

#[actix_web::test]
async fn uploaded_fixtures_get_stored_transcripts_and_a_reupload_transcribes_nothing_again() {
    if let Some(why) = voicegate_engine::stt::local::ffi::cpu_unsupported() {
        eprintln!("NOT RUN on this machine: {why}");
        return;
    }
    let server = EngineServer::start(fair_use_on(), |cfg| {
        local_stt(cfg);
        // The answer waits for the whole transcription here (the local engine on a loaded CI machine).
        cfg.sync_jobs.v1_transcript_wait_secs = 600;
    })
    .await;
    let all = fixtures();
    let now = now_s();
    // d01 and d05 (all English), recorded an hour apart: one conversation each.
    let picked = [("d01", 7_200), ("d05", 3_600)];
    let files: Vec<(String, Vec<u8>)> = picked
        .iter()
        .map(|(id, ago)| {
            let bytes = all
                .iter()
                .find(|(n, _)| n == &format!("{id}.bin"))
                .unwrap()
                .1
                .clone();
            (
                format!("audio_omi_opus_16000_1_fs160_{}.bin", now - ago),
                bytes,
            )
        })
        .collect();
    let (code, body, _) = server.upload("carol", "", &files).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["transcript_status"], "done", "{body}");
    let ids: Vec<String> = body["new_memories"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 2, "{body}");
    let charged = body["stt_ms"].as_u64().unwrap();
    let speech = body["speech_ms"].as_u64().unwrap();
    // The speech runs with their pre-roll and hangover: more than the metered speech, less than the files.
    let duration: u64 = body["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["duration_ms"].as_u64().unwrap())
        .sum();
    assert!(speech <= charged && charged < duration, "{body}");
    // What the user was charged is what the engine received (ms rounding: at most 1 ms a span).
    let engine_ms = server.metric_sum(FORWARDED).await / 16;
    assert!(
        engine_ms.abs_diff(charged) <= 4,
        "engine {engine_ms} ms, charged {charged} ms"
    );
    let today = server
        .engine
        .fair_use
        .record_stt("carol", &[], false)
        .await
        .unwrap();
    assert_eq!(today, charged, "the daily STT counter");

    let mut total = Score::default();
    for id in &ids {
        let (code, conv) = server
            .get(&format!("/v1/conversations/{id}"), "carol")
            .await;
        assert_eq!(code, 200, "{conv}");
        assert_eq!(conv["transcript_status"], "done", "{conv}");
        let started = conv["started_at_ms"].as_u64().unwrap();
        let (fixture, ago) = picked
            .iter()
            .find(|(_, ago)| (now - ago) * 1000 <= started && started < (now - ago + 40) * 1000)
            .unwrap_or_else(|| panic!("which file? {conv}"));
        let segments = conv["transcript_segments"].as_array().unwrap();
        assert!(!segments.is_empty(), "{conv}");
        let hypothesis: Vec<&str> = segments
            .iter()
            .map(|s| s["text"].as_str().unwrap())
            .collect();
        for s in segments {
            assert!(s["id"].as_str().unwrap().contains(':'), "{s}");
            eprintln!(
                "  {fixture} {:>6}-{:>6} ms  {}",
                s["start_ms"].as_u64().unwrap() - (now - ago) * 1000,
                s["end_ms"].as_u64().unwrap() - (now - ago) * 1000,
                s["text"]
            );
        }
        let score = Score::of(&reference(fixture), &hypothesis.join(" "));
        eprintln!(
            "{fixture}: WER {:.1}% ({} / {} words), {} segments",
            score.wer() * 100.0,
            score.errors,
            score.reference_words,
            segments.len()
        );
        total.add(score);
    }
    eprintln!(
        "total: WER {:.1}% ({} / {} words), {charged} ms of STT charged",
        total.wer() * 100.0,
        total.errors,
        total.reference_words
    );
    assert!(total.reference_words >= 50, "{total:?}");
    assert!(total.wer() <= 0.15, "WER {:.1}%", total.wer() * 100.0);

    // The same content again: a duplicate, nothing sent to the engine, nothing charged.
    let (code, again, _) = server.upload("carol", "", &files).await;
    assert_eq!(code, 200, "{again}");
    assert_eq!(again["files"][0]["status"], "duplicate", "{again}");
    assert_eq!(again["transcript_status"], "done", "{again}");
    assert_eq!(again["stt_ms"], 0, "{again}");
    assert_eq!(server.metric_sum(FORWARDED).await / 16, engine_ms);
    assert_eq!(
        server
            .engine
            .fair_use
            .record_stt("carol", &[], false)
            .await
            .unwrap(),
        charged
    );
    server.shutdown().await;
}

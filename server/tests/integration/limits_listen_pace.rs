//! The realtime intake limit (`VOICEGATE_LISTEN_MAX_PACE`, `VOICEGATE_LISTEN_BURST_MS`; issue 17 item 5):
//! a client streaming far faster than the pace is slowed by backpressure after its burst, nothing is
//! dropped, and what the pipeline processes (and meters) never runs ahead of the burst plus the pace.

use crate::common::engine_server::{EngineServer, fair_use_on};
use crate::listen_support::{NORMAL, connect, fixture_packets, offline, stream_packets};

const OPUS16: &str = "codec=opus&sample_rate=16000";
const PACE: f64 = 4.0;
const BURST_MS: u64 = 5_000;
/// One tick's refill at the pace (50 ms × 4), a packet of overdraft, and the connect before the clock.
const SLACK_MS: u64 = 600;
/// The frame queue (`VOICEGATE_LISTEN_BUFFER_MS`): at the stream's end the session processes what it holds
/// at once.
const BUFFER_MS: u64 = 500;

/// Audio the frame queue holds at most: it is sized in bytes for 64 kbit/s Opus (9 bytes per ms, the
/// server's `OPUS_RING_BYTES_PER_MS`), each packet with a 6-byte record header; a fixture's packets are
/// smaller, so the queue holds more of their audio.
fn queue_ms(packets: &[Vec<u8>]) -> u64 {
    let smallest = packets.iter().map(Vec::len).min().unwrap_or(1) as u64;
    BUFFER_MS * 9 / (smallest + 6) * 10 + 10
}

#[actix_web::test]
async fn a_client_streaming_at_100x_is_slowed_to_4x_after_its_burst_and_loses_nothing() {
    let server = EngineServer::start(fair_use_on(), |c| {
        c.listen_max_pace = PACE;
        c.listen_burst_ms = BURST_MS;
        c.listen_buffer_ms = BUFFER_MS;
    })
    .await;
    let packets = fixture_packets("d01");
    let audio_ms = packets.len() as u64 * 10;
    assert!(audio_ms > 2 * BURST_MS, "{audio_ms} ms of audio");
    let expect = offline(&packets);
    let queue = queue_ms(&packets);
    let ws = connect(server.addr, Some("racer"), OPUS16)
        .await
        .unwrap_or_else(|s| panic!("upgrade {s}"));
    // 100x: the client has sent everything within about 0.3 s.
    let (seen, sent) = stream_packets(ws, &packets, 100).await;

    assert_eq!(seen.close.as_ref().map(|c| c.0), Some(NORMAL), "{seen:?}");
    let meta = seen.metadata();
    assert_eq!(meta["frames_dropped"], 0, "{meta}");
    assert_eq!(meta["audio_ms"], audio_ms, "{meta}");
    let speech = meta["speech_ms"].as_u64().unwrap_or(0);
    let diff = speech.abs_diff(expect.speech_ms);
    assert!(
        diff * 100 <= expect.speech_ms,
        "speech {speech} ms, offline {}",
        expect.speech_ms
    );
    // Nothing the session reports runs ahead of the burst plus the pace × the wall time (plus, at the
    // end, the frame queue).
    let mut ahead_of_pace = 0;
    for (ev, arrived) in &seen.events {
        let Some(at_ms) = ev["at_ms"].as_u64() else {
            continue;
        };
        let allowed = BURST_MS + queue + (PACE * *arrived as f64) as u64 + SLACK_MS;
        assert!(
            at_ms <= allowed,
            "{ev} arrived at {arrived} ms: audio at {at_ms} ms, the pace allows {allowed}"
        );
        if at_ms as f64 > PACE * *arrived as f64 {
            ahead_of_pace += 1;
        }
    }
    // The burst was taken at once: events came faster than the sustained pace would allow.
    assert!(
        ahead_of_pace > 0,
        "no event inside the burst: {:?}",
        seen.events
    );
    // The whole stream took at least (audio - burst - queue) / pace of wall time.
    let finished = seen
        .events
        .iter()
        .find(|(e, _)| e["type"] == "metadata")
        .map_or(0, |(_, t)| *t);
    let min_wall = ((audio_ms - BURST_MS - queue) as f64 / PACE) as u64;
    assert!(
        finished + SLACK_MS >= min_wall,
        "metadata at {finished} ms, the pace needs {min_wall} ms"
    );
    // What was metered is the stream's speech, all of it.
    assert_eq!(server.status_speech_ms("racer").await["daily_ms"], speech);
    eprintln!(
        "pace {PACE}x, burst {BURST_MS} ms, queue up to {queue} ms: {audio_ms} ms of audio sent in {} ms, \
         processed by {finished} ms (at least {min_wall} ms at the pace), {ahead_of_pace} events inside the \
         burst, speech {speech} ms",
        sent.last().copied().unwrap_or(0)
    );
    server.shutdown().await;
}

#[test]
fn the_default_limit_is_4x_with_a_30_s_burst() {
    let cfg = voicegate_server::ServeConfig::default();
    assert_eq!(cfg.listen_max_pace, 4.0);
    assert_eq!(cfg.listen_burst_ms, 30_000);
    assert_eq!(
        cfg.listen_pace(),
        voicegate_engine::pipeline::live::PaceConfig::default()
    );
}

#[test]
fn a_pace_under_real_time_is_refused_at_startup() {
    for bad in [0.5, 0.0, f64::NAN, f64::INFINITY] {
        let cfg = voicegate_server::ServeConfig {
            listen_max_pace: bad,
            ..voicegate_server::ServeConfig::default()
        };
        let err = cfg
            .validate()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("VOICEGATE_LISTEN_MAX_PACE"), "{bad}: {err:?}");
    }
}

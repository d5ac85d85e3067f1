//! Transcripts over `/v4/listen` with the real local engine (Moonshine, installed by `scripts/deps.sh`;
//! these tests FAIL rather than skip without it): fixtures streamed as Opus packets come back as transcript
//! segments in the app's format whose words match the labelled English utterances; metering stays exact
//! with STT on, and what the session charged as STT is what the engine received.
//!
//! Figures (speech end → first transcript, WER) are printed: run with `--no-capture`.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use voicegate_engine::stt::wer::Score;

use crate::common;
use crate::listen_support;

use common::engine_server::{EngineServer, fair_use_on};
use listen_support::{NORMAL, Ws, connect, fixture_packets, offline};

pub(crate) const OPUS16: &str = "codec=opus&sample_rate=16000";
/// A result and an utterance that overlap by more than this are scored together.
const MIN_OVERLAP_MS: u64 = 100;

struct Utterance {
    start_ms: u64,
    end_ms: u64,
    english: bool,
    text: String,
}

fn utterances(id: &str) -> Vec<Utterance> {
    let path = format!("{}/../fixtures/{id}.json", env!("CARGO_MANIFEST_DIR"));
    let label: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    label["utterances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| Utterance {
            start_ms: u["start_ms"].as_u64().unwrap(),
            end_ms: u["end_ms"].as_u64().unwrap(),
            english: u["lang"] == "en",
            text: u["text"].as_str().unwrap().to_string(),
        })
        .collect()
}

/// A final transcript segment as the client last saw it, with when it first arrived.
#[derive(Debug, Clone)]
pub(crate) struct Seg {
    pub(crate) id: String,
    pub(crate) text: String,
    pub(crate) start_ms: u64,
    pub(crate) end_ms: u64,
    arrived_ms: u64,
}

/// What one streamed session gave the client.
#[derive(Debug, Default)]
pub(crate) struct Session {
    events: Vec<(Value, u64)>,
    pub(crate) segments: Vec<Seg>,
    /// `sent[i]`: ms after the start when packet `i` left.
    sent: Vec<u64>,
    pub(crate) close: Option<u16>,
}

impl Session {
    pub(crate) fn of_type(&self, t: &str) -> Vec<&Value> {
        self.events
            .iter()
            .map(|(v, _)| v)
            .filter(|v| v["type"] == t)
            .collect()
    }

    fn metadata(&self) -> &Value {
        let m = self.of_type("metadata");
        assert_eq!(m.len(), 1, "{:?}", self.events);
        m[0]
    }

    fn record(&mut self, text: &str, at: u64) {
        let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        let Some(array) = v.as_array() else {
            self.events.push((v, at));
            return;
        };
        for s in array {
            for field in [
                "id",
                "text",
                "speaker",
                "speaker_id",
                "is_user",
                "person_id",
            ] {
                assert!(s.get(field).is_some(), "segment without {field}: {s}");
            }
            assert!(s["translations"].is_array(), "{s}");
            assert_eq!(s["speaker"], "SPEAKER_00");
            let seg = Seg {
                id: s["id"].as_str().unwrap().to_string(),
                text: s["text"].as_str().unwrap().to_string(),
                start_ms: (s["start"].as_f64().unwrap() * 1000.0).round() as u64,
                end_ms: (s["end"].as_f64().unwrap() * 1000.0).round() as u64,
                arrived_ms: at,
            };
            match self.segments.iter_mut().find(|x| x.id == seg.id) {
                Some(old) => {
                    old.text = seg.text;
                    old.start_ms = seg.start_ms;
                    old.end_ms = seg.end_ms;
                }
                None => self.segments.push(seg),
            }
        }
    }

    /// The ends of the speech runs no segment covers (runs the engine heard no words in).
    fn runs_without_words(&self) -> Vec<u64> {
        self.of_type("speech_ended")
            .iter()
            .map(|e| e["at_ms"].as_u64().unwrap_or(0))
            .filter(|&end| {
                !self
                    .segments
                    .iter()
                    .any(|s| s.start_ms <= end && s.end_ms + 200 >= end)
            })
            .collect()
    }
}

/// Streams a fixture at `speed`x real time, one 10 ms packet per message, then `CloseStream`, and reads
/// until the close: the server sends the last transcripts before `metadata` (it waits for the engine).
pub(crate) async fn stream(ws: Ws, id: &str, speed: u32) -> Session {
    let packets = fixture_packets(id);
    let (mut tx, mut rx) = ws.split();
    let t0 = Instant::now();
    let step = Duration::from_micros(10_000 / u64::from(speed));
    let mut s = Session::default();
    let mut i = 0;
    loop {
        let next_send = t0 + step * i as u32;
        tokio::select! {
            msg = rx.next() => match msg {
                Some(Ok(Message::Text(t))) if t.as_str() != "ping" => {
                    s.record(t.as_str(), t0.elapsed().as_millis() as u64);
                }
                Some(Ok(Message::Close(frame))) => {
                    s.close = frame.map(|f| u16::from(f.code));
                    break;
                }
                None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
            () = tokio::time::sleep_until(next_send), if i <= packets.len() => {
                if i < packets.len() {
                    s.sent.push(t0.elapsed().as_millis() as u64);
                    tx.send(Message::binary(packets[i].clone())).await.unwrap();
                } else {
                    tx.send(Message::text(r#"{"type":"CloseStream"}"#)).await.unwrap();
                }
                i += 1;
            }
        }
        assert!(t0.elapsed() < Duration::from_secs(180), "session stuck");
    }
    s
}

/// Groups utterances and segments that overlap in time and scores the groups that are all English; a
/// segment overlapping no utterance counts as inserted words.
fn score(id: &str, segments: &[Seg]) -> (Score, usize) {
    let utts = utterances(id);
    let n = utts.len();
    let mut parent: Vec<usize> = (0..n + segments.len()).collect();
    fn root(p: &mut [usize], mut i: usize) -> usize {
        while p[i] != i {
            p[i] = p[p[i]];
            i = p[i];
        }
        i
    }
    for (r, seg) in segments.iter().enumerate() {
        for (u, utt) in utts.iter().enumerate() {
            let overlap = seg
                .end_ms
                .min(utt.end_ms)
                .saturating_sub(seg.start_ms.max(utt.start_ms));
            if overlap > MIN_OVERLAP_MS {
                let (a, b) = (root(&mut parent, u), root(&mut parent, n + r));
                parent[a] = b;
            }
        }
    }
    let mut groups: std::collections::BTreeMap<usize, (Vec<usize>, Vec<usize>)> =
        Default::default();
    for i in 0..n + segments.len() {
        let g = groups.entry(root(&mut parent, i)).or_default();
        if i < n { g.0.push(i) } else { g.1.push(i - n) }
    }
    let (mut total, mut excluded) = (Score::default(), 0);
    for (us, rs) in groups.values() {
        let reference: Vec<&str> = us.iter().map(|&u| utts[u].text.as_str()).collect();
        let hypothesis: Vec<&str> = rs.iter().map(|&r| segments[r].text.as_str()).collect();
        if us.iter().all(|&u| utts[u].english) {
            total.add(Score::of(&reference.join(" "), &hypothesis.join(" ")));
        } else {
            excluded += Score::of(&reference.join(" "), "").reference_words;
        }
    }
    (total, excluded)
}

/// ms from the moment the client sent the end of each speech run to the first transcript segment covering
/// it (real-time pace: packet `at_ms / 10` carries the run's end).
fn end_to_transcript_ms(s: &Session) -> Vec<u64> {
    let mut out = Vec::new();
    for e in s.of_type("speech_ended") {
        let end = e["at_ms"].as_u64().unwrap_or(0);
        let sent = s.sent[((end / 10) as usize).min(s.sent.len() - 1)];
        if let Some(seg) = s
            .segments
            .iter()
            .filter(|g| g.start_ms <= end && g.end_ms + 200 >= end)
            .min_by_key(|g| g.arrived_ms)
        {
            out.push(seg.arrived_ms.saturating_sub(sent));
        }
    }
    out.sort_unstable();
    out
}

pub(crate) fn local_stt(cfg: &mut voicegate_server::ServeConfig) {
    cfg.stt = Some("local".into());
    // The whole fixture fits: a lagging pipeline delays, never drops (as in listen_stream).
    cfg.listen_buffer_ms = 200_000;
    // The tests stream at up to 10x, over the default intake limit of 4x.
    cfg.listen_max_pace = 20.0;
}

#[actix_web::test]
async fn streamed_fixtures_come_back_as_transcript_segments_matching_their_utterances() {
    if let Some(why) = voicegate_engine::stt::local::ffi::cpu_unsupported() {
        eprintln!("NOT RUN on this machine: {why}");
        return;
    }
    let server = EngineServer::start(fair_use_on(), local_stt).await;
    let mut total = Score::default();
    let mut charged_ms = 0;
    for (id, speed) in [("d01", 1), ("d09", 10)] {
        let ws = connect(server.addr, Some("alice"), OPUS16)
            .await
            .unwrap_or_else(|s| panic!("upgrade {s}"));
        let s = stream(ws, id, speed).await;
        assert_eq!(s.close, Some(NORMAL), "{:?}", s.events);
        let kinds: Vec<&str> = s
            .events
            .iter()
            .filter_map(|(v, _)| v["type"].as_str())
            .collect();
        assert_eq!(
            kinds[..2],
            ["service_status", "service_status"],
            "{kinds:?}"
        );
        assert_eq!(s.events[0].0["status"], "stt_initiating");
        assert_eq!(s.events[1].0["status"], "ready");
        assert!(!kinds.contains(&"stt_unavailable"), "{kinds:?}");
        let (score, excluded) = score(id, &s.segments);
        let meta = s.metadata();
        charged_ms += meta["stt_forwarded_ms"].as_u64().unwrap();
        assert!(
            meta["stt_forwarded_ms"].as_u64().unwrap() >= meta["speech_ms"].as_u64().unwrap(),
            "the pre-roll and hangover go with the speech: {meta}"
        );
        for seg in &s.segments {
            eprintln!(
                "  {id} {:>6}-{:>6} ms  {}",
                seg.start_ms, seg.end_ms, seg.text
            );
        }
        eprintln!(
            "{id} at {speed}x: WER {:.1}% ({} / {} English words, {excluded} excluded), {} segments; runs without words (end ms): {:?}",
            score.wer() * 100.0,
            score.errors,
            score.reference_words,
            s.segments.len(),
            s.runs_without_words()
        );
        if speed == 1 {
            let lat = end_to_transcript_ms(&s);
            assert!(!lat.is_empty());
            let p95 = lat[(lat.len() * 95).div_ceil(100).saturating_sub(1)];
            eprintln!("{id} at 1x: speech end -> first transcript ms {lat:?}, p95 {p95} ms");
        }
        total.add(score);
    }
    eprintln!(
        "total: WER {:.1}% ({} / {} English words)",
        total.wer() * 100.0,
        total.errors,
        total.reference_words
    );
    assert!(total.reference_words >= 100, "{total:?}");
    assert!(total.wer() <= 0.15, "WER {:.1}%", total.wer() * 100.0);
    // What the sessions charged as STT is what the engine received (ms rounding: at most 1 ms a chunk).
    let engine_ms = server
        .metric_sum("voicegate_stt_forwarded_samples_total{provider=\"local\"}")
        .await
        / 16;
    let dropped = server
        .metric_sum("voicegate_stt_dropped_samples_total")
        .await;
    assert_eq!(dropped, 0, "no audio lost on the way to the engine");
    assert!(
        engine_ms.abs_diff(charged_ms) <= 40,
        "engine received {engine_ms} ms, sessions charged {charged_ms} ms"
    );
    server.shutdown().await;
}

#[actix_web::test]
async fn metering_stays_exact_with_transcription_on() {
    if let Some(why) = voicegate_engine::stt::local::ffi::cpu_unsupported() {
        eprintln!("NOT RUN on this machine: {why}");
        return;
    }
    let server = EngineServer::start(fair_use_on(), local_stt).await;
    let packets = fixture_packets("d01");
    let expect = offline(&packets);
    let ws = connect(server.addr, Some("bob"), OPUS16)
        .await
        .unwrap_or_else(|s| panic!("upgrade {s}"));
    let s = stream(ws, "d01", 10).await;
    let meta = s.metadata();
    let speech = meta["speech_ms"].as_u64().unwrap();
    assert_eq!(meta["frames_dropped"], 0);
    assert_eq!(meta["frames_received"], packets.len() as u64);
    assert!(
        speech.abs_diff(expect.speech_ms) <= expect.speech_ms / 100,
        "speech {speech} vs offline {}",
        expect.speech_ms
    );
    let ended: u64 = s
        .of_type("speech_ended")
        .iter()
        .map(|e| e["speech_ms"].as_u64().unwrap())
        .sum();
    assert!(ended.abs_diff(speech) <= expect.raw_segments_ms.len() as u64);
    let status = server.status_speech_ms("bob").await;
    assert_eq!(status["daily_ms"], speech, "metered exactly: {status}");
    assert!(!s.segments.is_empty(), "and transcribed");
    // Telemetry: the audio offered to the gate is all the session decoded, more than it sent; a latency
    // observation for each run whose final transcript came (a run the engine heard no words in gives
    // none); the engine's error reason and the queue depth exported from startup.
    let audio_in = server
        .metric_sum("voicegate_stt_audio_in_samples_total{provider=\"local\"}")
        .await;
    let audio_ms = meta["audio_ms"].as_u64().unwrap();
    assert!(
        audio_in.abs_diff(audio_ms * 16) <= 16 * 20,
        "audio in {audio_in} samples for {audio_ms} ms"
    );
    let sent = server
        .metric_sum("voicegate_stt_forwarded_samples_total{provider=\"local\"}")
        .await;
    assert!(sent > 0 && sent < audio_in, "sent {sent} of {audio_in}");
    let finals = server
        .metric_sum("voicegate_stt_final_latency_seconds_count{provider=\"local\"}")
        .await;
    let runs = s.of_type("speech_ended").len() as u64;
    assert!((1..=runs).contains(&finals), "{finals} for {runs} runs");
    let text = server.metrics_text().await;
    for series in [
        "voicegate_stt_errors_total{provider=\"local\",reason=\"engine\"} 0",
        "voicegate_stt_queue_depth{provider=\"local\"} 0",
    ] {
        assert!(text.lines().any(|l| l == series), "{series} in:\n{text}");
    }
    server.shutdown().await;
}

/// This test process's children: (pid, is a local engine process, is a zombie).
fn children() -> Vec<(i32, bool, bool)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let children = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        for pid in children
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let engine = cmdline.split(|&b| b == 0).any(|a| a == b"stt-engine");
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let zombie = stat
                .rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('Z'));
            out.push((pid, engine, zombie));
        }
    }
    out
}

/// The live local engine processes, after checking that no child of this process is left a zombie.
fn engine_children() -> Vec<i32> {
    let all = children();
    assert!(all.iter().all(|c| !c.2), "no unreaped child: {all:?}");
    all.iter().filter(|c| c.1).map(|c| c.0).collect()
}

/// Waits (events: the worker's metrics and processes, bounded) until every chunk's process was replaced.
async fn settled(server: &EngineServer) -> (u64, u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let chunks = server
            .metric_sum("voicegate_stt_engine_duration_seconds_count{provider=\"local\"}")
            .await;
        let replaced = server
            .metric_sum("voicegate_stt_engine_restarts_total{provider=\"local\",reason=\"memory\"}")
            .await;
        if (replaced == chunks && engine_children().len() == 1) || Instant::now() > deadline {
            return (chunks, replaced);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[actix_web::test]
async fn the_engine_runs_in_a_child_process_replaced_past_its_memory_limit_and_after_it_dies() {
    if let Some(why) = voicegate_engine::stt::local::ffi::cpu_unsupported() {
        eprintln!("NOT RUN on this machine: {why}");
        return;
    }
    let server = EngineServer::start(fair_use_on(), |cfg| {
        local_stt(cfg);
        cfg.stt_local_exe = Some(env!("CARGO_BIN_EXE_voicegate").into());
        // Below what a loaded model takes: the process is replaced after every chunk.
        cfg.stt_local_max_rss_mb = 1;
    })
    .await;
    let engines = engine_children();
    assert_eq!(
        engines.len(),
        1,
        "one worker, one engine process: {engines:?}"
    );
    let ws = connect(server.addr, Some("carol"), OPUS16)
        .await
        .unwrap_or_else(|s| panic!("upgrade {s}"));
    let s = stream(ws, "d01", 10).await;
    let (first, _) = score("d01", &s.segments);
    assert!(first.wer() <= 0.15, "transcribed as in-process: {first:?}");
    let (chunks, replaced) = settled(&server).await;
    assert!(chunks >= 2, "{chunks} chunks");
    assert_eq!(replaced, chunks, "each chunk left the process past 1 MB");
    let now = engine_children();
    assert_eq!(now.len(), 1, "the old processes are gone: {now:?}");
    assert!(!now.contains(&engines[0]), "a fresh process serves now");

    // The idle engine process dies (the kernel's OOM killer picks the largest process): the next chunk
    // finds it gone, starts a new one and loses nothing; the server lives on.
    // SAFETY: a signal to our own child process.
    assert_eq!(unsafe { libc::kill(now[0], libc::SIGKILL) }, 0);
    let ws = connect(server.addr, Some("carol"), OPUS16)
        .await
        .unwrap_or_else(|s| panic!("upgrade {s}"));
    let s = stream(ws, "d01", 10).await;
    let (second, _) = score("d01", &s.segments);
    assert!(
        second.wer() <= 0.15,
        "transcribed in full after the crash: {second:?}"
    );
    let exited = server
        .metric_sum("voicegate_stt_engine_restarts_total{provider=\"local\",reason=\"exited\"}")
        .await;
    let errors = server
        .metric_sum("voicegate_stt_errors_total{provider=\"local\",reason=\"engine\"}")
        .await;
    assert_eq!(
        (exited, errors),
        (1, 0),
        "found gone before a chunk: none lost"
    );
    settled(&server).await;
    server.shutdown().await;
}

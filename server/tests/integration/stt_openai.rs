//! `VOICEGATE_STT=openai` through `voicegate serve`, against [`OpenAiDouble`]: a local HTTP server in this
//! test suite that speaks the OpenAI audio transcriptions API as documented (OpenAI's API reference,
//! "Create transcription", cited in `engine/src/stt/openai/protocol.rs`): `POST /v1/audio/transcriptions`,
//! `Authorization: Bearer`, a `multipart/form-data` body with `file` (a WAV), `model`,
//! `response_format` and `language`; a `verbose_json` answer with `segments[]`, or an error status with
//! `{"error": {...}}`. It checks every request as the API would (a malformed one gets 400) and records the
//! samples of every WAV it read.
//!
//! What is checked: one request per utterance chunk (at most 10 s); the samples the double received equal
//! `voicegate_stt_forwarded_samples_total` exactly and are what the session charged; transcripts come
//! back in stream time; a sync upload's spans are transcribed (`transcript_status: done`) and charged
//! what was sent; a 401 or 500 is `stt_unavailable{provider_error}`, counted by reason, and the session
//! and its metering go on.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tokio::net::{TcpListener, TcpStream};

use crate::common;
use crate::listen_support;
use crate::stt_deepgram::{
    assert_metered_exactly, charged_ms, segments, stream, unavailable_reasons,
};

use common::engine_server::{EngineServer, fair_use_on, fixtures, now_s};
use common::http_double::{next_plan, read_request, write_json};
use listen_support::{NORMAL, connect, fixture_packets};

const KEY: &str = "sk-test-openai-key";
const OPUS16: &str = "codec=opus&sample_rate=16000&language=en";
const FORWARDED: &str = "voicegate_stt_forwarded_samples_total{provider=\"openai\"}";
/// Every reason (`queue_full`, `provider_down`, `closed`).
const DROPPED: &str = "voicegate_stt_dropped_samples_total{provider=\"openai\"";

/// What the double answers one request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Plan {
    /// `verbose_json`: one segment over the whole file, `utterance <n>`.
    Serve,
    /// This HTTP status with an OpenAI-style error body.
    Status(u16),
    /// No answer until [`OpenAiDouble::release`] (then as `Serve`): the connection is held open (a provider
    /// that hangs; `held` counts them).
    Hold,
}

/// One request as the double read it.
#[derive(Debug, Clone, Default)]
pub(crate) struct Request {
    path: String,
    authorization: String,
    model: String,
    response_format: String,
    language: Option<String>,
    /// 16-bit samples of the WAV `file` part.
    samples: u64,
    answered: u16,
}

/// An OpenAI transcriptions double (see the module docs). Requests take the plans in order; the last
/// one repeats.
pub(crate) struct OpenAiDouble {
    addr: SocketAddr,
    log: Arc<Mutex<Vec<Request>>>,
    plans: Arc<Mutex<VecDeque<Plan>>>,
    held: Arc<tokio::sync::watch::Sender<u64>>,
    released: Arc<tokio::sync::watch::Sender<bool>>,
}

impl OpenAiDouble {
    pub(crate) async fn start(plans: &[Plan]) -> OpenAiDouble {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let plans = Arc::new(Mutex::new(plans.iter().copied().collect::<VecDeque<_>>()));
        let shared = Arc::clone(&log);
        let held = Arc::new(tokio::sync::watch::Sender::new(0u64));
        let released = Arc::new(tokio::sync::watch::Sender::new(false));
        let (p, h, r) = (Arc::clone(&plans), Arc::clone(&held), Arc::clone(&released));
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(
                    stream,
                    Arc::clone(&p),
                    Arc::clone(&shared),
                    Arc::clone(&h),
                    r.subscribe(),
                ));
            }
        });
        OpenAiDouble {
            addr,
            log,
            plans,
            held,
            released,
        }
    }

    /// Answers the held requests (and any later `Hold`) as `Serve`.
    pub(crate) fn release(&self) {
        self.released.send_replace(true);
    }

    /// Replaces the plans of the requests to come.
    pub(crate) fn set_plans(&self, plans: &[Plan]) {
        *self.plans.lock().unwrap() = plans.iter().copied().collect();
    }

    /// Requests held unanswered so far (tests wait on it).
    pub(crate) fn held(&self) -> tokio::sync::watch::Receiver<u64> {
        self.held.subscribe()
    }

    pub(crate) fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub(crate) fn requests(&self) -> Vec<Request> {
        self.log.lock().unwrap().clone()
    }

    pub(crate) fn samples(&self) -> u64 {
        self.requests().iter().map(|r| r.samples).sum()
    }
}

/// Serves the requests of one connection (HTTP/1.1, `Content-Length` bodies, keep-alive).
async fn serve(
    mut stream: TcpStream,
    plans: Arc<Mutex<VecDeque<Plan>>>,
    log: Arc<Mutex<Vec<Request>>>,
    held: Arc<tokio::sync::watch::Sender<u64>>,
    mut released: tokio::sync::watch::Receiver<bool>,
) {
    let mut buf: Vec<u8> = Vec::new();
    while let Some(http) = read_request(&mut stream, &mut buf).await {
        let mut req = Request {
            path: http.target.clone(),
            authorization: http.header("authorization"),
            ..Request::default()
        };
        let (status, answer) = if http.method != "POST" {
            // The startup probe (a GET): the API allows POST only.
            (
                405,
                json!({"error": {"message": "method not allowed", "type": "invalid_request_error"}}),
            )
        } else {
            match read_form(&http.header("content-type"), &http.body, &mut req) {
                Err(why) => (
                    400,
                    json!({"error": {"message": why, "type": "invalid_request_error"}}),
                ),
                Ok(()) => {
                    let n = log
                        .lock()
                        .unwrap()
                        .iter()
                        .filter(|r| r.answered == 200)
                        .count()
                        + 1;
                    let mut plan = next_plan(&plans);
                    if plan == Plan::Hold {
                        held.send_modify(|n| *n += 1);
                        if released.wait_for(|r| *r).await.is_err() {
                            return; // the double is gone
                        }
                        plan = Plan::Serve;
                    }
                    match plan {
                        Plan::Serve | Plan::Hold => {
                            let secs = req.samples as f64 / 16_000.0;
                            (
                                200,
                                json!({
                                    "task": "transcribe", "language": "english", "duration": secs,
                                    "text": format!(" Utterance {n}."),
                                    "segments": [{"id": 0, "seek": 0, "start": 0.0, "end": secs,
                                        "text": format!(" Utterance {n}."), "tokens": [50364],
                                        "temperature": 0.0, "avg_logprob": -0.25,
                                        "compression_ratio": 1.1, "no_speech_prob": 0.01}]
                                }),
                            )
                        }
                        Plan::Status(s) => (
                            s,
                            json!({"error": {
                                "message": format!("the double answers {s}"),
                                "type": if s == 401 { "invalid_request_error" } else { "server_error" },
                                "code": if s == 401 { "invalid_api_key" } else { "server_error" }
                            }}),
                        ),
                    }
                }
            }
        };
        if http.method == "POST" {
            req.answered = status;
            log.lock().unwrap().push(req);
        }
        if !write_json(&mut stream, status, &answer).await {
            return;
        }
    }
}

/// Reads the multipart form as the API does; `Err` names what is wrong.
fn read_form(content_type: &str, body: &[u8], req: &mut Request) -> Result<(), String> {
    let boundary = content_type
        .strip_prefix("multipart/form-data; boundary=")
        .ok_or_else(|| format!("not multipart/form-data: {content_type}"))?;
    let delimiter = format!("\r\n--{boundary}");
    // The body starts with the first delimiter (without its CRLF) and ends with the closing one.
    let body = [b"\r\n".as_slice(), body].concat();
    let mut file = None;
    let mut rest = &body[..];
    loop {
        let at = find(rest, delimiter.as_bytes()).ok_or("a delimiter is missing")?;
        rest = &rest[at + delimiter.len()..];
        if rest.starts_with(b"--") {
            break;
        }
        rest = rest
            .strip_prefix(b"\r\n")
            .ok_or("no CRLF after a delimiter")?;
        let head_end = find(rest, b"\r\n\r\n").ok_or("a part has no header end")?;
        let head = String::from_utf8_lossy(&rest[..head_end]).into_owned();
        let content_end = find(rest, delimiter.as_bytes()).ok_or("a part is not closed")?;
        let content = &rest[head_end + 4..content_end];
        let name = head
            .split("name=\"")
            .nth(1)
            .and_then(|s| s.split('"').next())
            .ok_or("a part has no name")?;
        let text = || String::from_utf8_lossy(content).into_owned();
        match name {
            "model" => req.model = text(),
            "response_format" => req.response_format = text(),
            "language" => req.language = Some(text()),
            "file" => file = Some(content.to_vec()),
            other => return Err(format!("unknown field {other}")),
        }
        rest = &rest[content_end..];
    }
    let wav = file.ok_or("no file")?;
    let u16_at = |i: usize| u16::from_le_bytes([wav[i], wav[i + 1]]);
    let u32_at = |i: usize| u32::from_le_bytes([wav[i], wav[i + 1], wav[i + 2], wav[i + 3]]);
    if wav.len() < 44
        || &wav[0..4] != b"RIFF"
        || &wav[8..16] != b"WAVEfmt "
        || &wav[36..40] != b"data"
        || u32_at(4) as usize != wav.len() - 8
        || u16_at(20) != 1
        || u16_at(22) != 1
        || u32_at(24) != 16_000
        || u16_at(34) != 16
        || u32_at(40) as usize != wav.len() - 44
    {
        return Err("the file is not a 16 kHz mono 16-bit PCM WAV".into());
    }
    if req.model.is_empty() {
        return Err("model is required".into());
    }
    req.samples = (wav.len() as u64 - 44) / 2;
    Ok(())
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn openai(double: &OpenAiDouble) -> impl FnOnce(&mut voicegate_server::ServeConfig) {
    let url = double.base_url();
    move |cfg| {
        cfg.stt = Some("openai".into());
        cfg.openai.api_key = Some(KEY.into());
        cfg.openai.base_url = url;
        // The whole fixture fits: a lagging pipeline delays, never drops (as in listen_stream).
        cfg.listen_buffer_ms = 200_000;
    }
}

#[actix_web::test]
async fn a_live_session_gets_one_request_per_utterance_and_the_double_received_exactly_what_was_forwarded()
 {
    let double = OpenAiDouble::start(&[Plan::Serve]).await;
    let server = EngineServer::start(fair_use_on(), openai(&double)).await;
    let packets = fixture_packets("d01");
    let ws = connect(server.addr, Some("alice"), OPUS16).await.unwrap();
    let seen = stream(ws, &packets, 4, None).await;
    assert_eq!(
        seen.close.as_ref().map(|c| c.0),
        Some(NORMAL),
        "{:?}",
        seen.events
    );
    assert!(unavailable_reasons(&seen).is_empty(), "{:?}", seen.events);

    let requests = double.requests();
    let runs = seen.runs();
    assert!(
        requests.len() >= runs.len(),
        "a request per run at least: {} for {runs:?}",
        requests.len()
    );
    for r in &requests {
        assert_eq!(r.path, "/v1/audio/transcriptions");
        assert_eq!(r.authorization, format!("Bearer {KEY}"));
        assert_eq!(r.model, "whisper-1");
        assert_eq!(r.response_format, "verbose_json");
        assert_eq!(r.language.as_deref(), Some("en"));
        assert_eq!(r.answered, 200);
        assert!(r.samples > 0 && r.samples <= 160_000, "{r:?}");
    }
    // Exactly what was forwarded (and charged).
    let received = double.samples();
    assert!(received > 16_000 * 10, "received {received} samples");
    assert_eq!(server.metric_sum(FORWARDED).await, received);
    assert_eq!(server.metric_sum(DROPPED).await, 0);
    let meta = seen.metadata();
    assert_eq!(
        meta["stt_forwarded_ms"].as_u64().unwrap(),
        charged_ms(received),
        "{meta}"
    );
    // Every answer became a final segment in the session's time, on a speech run (with its pre-roll
    // and hangover).
    let segs = segments(&seen);
    assert_eq!(segs.len(), requests.len(), "{segs:?}");
    for (text, start, end) in &segs {
        assert!(text.starts_with("Utterance "), "{text}");
        assert!(
            runs.iter()
                .any(|r| *start + 450 >= r[0] && *end <= r[1] + 250 && *start < r[1]),
            "{text} [{start}, {end}] ms lies on no speech run of {runs:?}"
        );
    }
    assert_metered_exactly(&server, "alice", &seen, &packets).await;
    server.shutdown().await;
}

/// The double answers `first` for the first request(s), then serves. `errors` chunks failed for good
/// (counted under `reason`; the session is told `stt_unavailable{provider_error}`); every other failed
/// request was retried (`VOICEGATE_OPENAI_RETRIES`, 2). Transcripts come again afterwards; the user is charged once per
/// chunk, the audio of each further attempt counted as resent.
async fn a_failing_request(first: &[Plan], uid: &str, reason: &str, errors: u64) {
    let mut plans = first.to_vec();
    plans.push(Plan::Serve);
    let double = OpenAiDouble::start(&plans).await;
    let server = EngineServer::start(fair_use_on(), openai(&double)).await;
    let packets = fixture_packets("d01");
    let ws = connect(server.addr, Some(uid), OPUS16).await.unwrap();
    let seen = stream(ws, &packets, 4, None).await;
    assert_eq!(seen.close.as_ref().map(|c| c.0), Some(NORMAL));
    let kinds: Vec<String> = seen
        .events
        .iter()
        .filter_map(|(v, _)| v["type"].as_str().map(str::to_string))
        .collect();
    // Told once, while it lasts (a state, not one event per chunk).
    let expected: &[&str] = if errors > 0 { &["provider_error"] } else { &[] };
    assert_eq!(unavailable_reasons(&seen), expected, "{kinds:?}");
    if let Some(lost) = kinds.iter().position(|k| k == "stt_unavailable") {
        assert!(
            kinds[lost..].iter().any(|k| k == "stt_available"),
            "transcripts came back after the failure: {kinds:?}"
        );
    }
    let requests = double.requests();
    let failed = requests.iter().filter(|r| r.answered != 200).count();
    assert_eq!(failed, first.len(), "{requests:?}");
    let counted = format!("voicegate_stt_errors_total{{provider=\"openai\",reason=\"{reason}\"}}");
    assert_eq!(server.metric_sum(&counted).await, errors, "{counted}");
    let retried = server
        .metric_sum("voicegate_stt_retries_total{provider=\"openai\"")
        .await;
    assert_eq!(retried, first.len() as u64 - errors, "retries");
    assert_eq!(
        server
            .metric_sum("voicegate_stt_errors_total{provider=\"openai\"")
            .await,
        errors,
        "errors of every reason"
    );
    // Every request's audio was handed over (the double read it). The user is charged each chunk once:
    // a retry's audio is resent, not forwarded again. A chunk that failed for good has no transcript.
    let received = double.samples();
    let resent = server
        .metric_sum("voicegate_stt_resent_samples_total{provider=\"openai\"")
        .await;
    assert_eq!(server.metric_sum(FORWARDED).await, received - resent);
    assert_eq!(server.metric_sum(DROPPED).await, 0);
    assert_eq!(
        seen.metadata()["stt_forwarded_ms"].as_u64().unwrap(),
        charged_ms(received - resent)
    );
    assert_eq!(segments(&seen).len(), requests.len() - failed);
    assert_metered_exactly(&server, uid, &seen, &packets).await;
    server.shutdown().await;
}

#[actix_web::test]
async fn a_refused_key_is_provider_error_and_the_session_goes_on() {
    // 401 is not retried: a later attempt cannot fix a key.
    a_failing_request(&[Plan::Status(401)], "dave", "unauthorized", 1).await;
}

#[actix_web::test]
async fn a_server_error_is_retried_twice_then_provider_error_and_the_session_goes_on() {
    // Two chunks in a row fail all three attempts: the session hears of it while the chunks queued
    // behind the retries wait (a single failed chunk followed at once by a transcript would be told
    // and cleared on the same tick).
    let six = [Plan::Status(500); 6];
    a_failing_request(&six, "erin", "engine", 2).await;
}

#[actix_web::test]
async fn a_rate_limit_then_a_gateway_error_are_retried_and_the_chunk_is_transcribed() {
    a_failing_request(&[Plan::Status(429), Plan::Status(503)], "gina", "engine", 0).await;
}

#[actix_web::test]
async fn an_unreachable_server_drops_the_audio_counted_and_the_session_goes_on() {
    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let server = EngineServer::start(fair_use_on(), move |cfg| {
        cfg.stt = Some("openai".into());
        cfg.openai.base_url = url;
        cfg.listen_buffer_ms = 200_000;
    })
    .await;
    let packets = fixture_packets("d01");
    let ws = connect(server.addr, Some("frank"), OPUS16).await.unwrap();
    let seen = stream(ws, &packets[..1_000], 8, None).await;
    assert_eq!(seen.close.as_ref().map(|c| c.0), Some(NORMAL));
    assert_eq!(
        unavailable_reasons(&seen),
        ["provider_error"],
        "{:?}",
        seen.events
    );
    assert_eq!(server.metric_sum(FORWARDED).await, 0);
    let dropped = server.metric_sum(DROPPED).await;
    assert!(dropped > 0);
    assert!(
        server
            .metric_sum("voicegate_stt_errors_total{provider=\"openai\",reason=\"network\"}")
            .await
            >= 1
    );
    // What the session handed over was dropped (counted) and charged at hand-off, as with Deepgram.
    assert_eq!(
        seen.metadata()["stt_forwarded_ms"].as_u64().unwrap(),
        charged_ms(dropped)
    );
    assert_metered_exactly(&server, "frank", &seen, &packets[..1_000]).await;
    server.shutdown().await;
}

#[actix_web::test]
async fn a_sync_upload_gets_its_spans_transcribed_and_charged_what_was_sent() {
    let double = OpenAiDouble::start(&[Plan::Serve]).await;
    let server = EngineServer::start(fair_use_on(), openai(&double)).await;
    let files = d01_an_hour_ago();
    let (code, body, _) = server.upload("grace", "", &files).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["transcript_status"], "done", "{body}");
    let ids = body["new_memories"].as_array().unwrap();
    assert_eq!(ids.len(), 1, "{body}");
    let requests = double.requests();
    assert!(!requests.is_empty());
    assert!(
        requests
            .iter()
            .all(|r| r.answered == 200 && r.samples <= 160_000 && r.model == "whisper-1"),
        "{requests:?}"
    );
    let received = double.samples();
    assert_eq!(server.metric_sum(FORWARDED).await, received);
    // Charged what was sent (ms rounding: at most 1 ms a span).
    let charged = body["stt_ms"].as_u64().unwrap();
    assert!(
        (received / 16).abs_diff(charged) <= 4,
        "sent {} ms, charged {charged} ms",
        received / 16
    );
    let (code, conv) = server
        .get(
            &format!("/v1/conversations/{}", ids[0].as_str().unwrap()),
            "grace",
        )
        .await;
    assert_eq!(code, 200, "{conv}");
    assert_eq!(conv["transcript_status"], "done", "{conv}");
    let segments = conv["transcript_segments"].as_array().unwrap();
    assert_eq!(segments.len(), requests.len(), "{conv}");
    let started = conv["started_at_ms"].as_u64().unwrap();
    for s in segments {
        assert!(s["text"].as_str().unwrap().starts_with("Utterance "), "{s}");
        // In the conversation's time: a segment may start up to the pre-roll (300 ms) before its speech.
        let (start, end) = (
            s["start_ms"].as_u64().unwrap(),
            s["end_ms"].as_u64().unwrap(),
        );
        assert!(start + 300 >= started && start < end, "{s}");
    }
    server.shutdown().await;
}

/// A v1 upload runs as a job (issue #15): the answer comes once the speech is metered and in its
/// conversation, with `transcript_status: pending` and the `job_id` while the provider is still busy; the
/// job then finishes the transcription (the v2 status follows it to `done`).
#[actix_web::test]
async fn a_v1_upload_answers_pending_and_its_job_finishes_the_transcription() {
    // The first span's request is held until released: the answer cannot wait for it.
    let double = OpenAiDouble::start(&[Plan::Hold, Plan::Serve]).await;
    let with_double = openai(&double);
    let server = EngineServer::start(fair_use_on(), move |cfg| {
        with_double(cfg);
        cfg.sync_jobs.v1_transcript_wait_secs = 0;
    })
    .await;
    let files = d01_an_hour_ago();
    let (code, body, _) = server.upload("heidi", "", &files).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["transcript_status"], "pending", "{body}");
    assert_eq!(body["stt_ms"], 0, "{body}");
    assert!(body["speech_ms"].as_u64().unwrap() > 0, "{body}");
    assert_eq!(body["metered_speech_ms"], body["speech_ms"], "{body}");
    let ids = body["new_memories"].as_array().unwrap().clone();
    assert_eq!(ids.len(), 1, "{body}");
    let job_id = body["job_id"].as_str().unwrap().to_owned();
    // The job goes on after the answer: its first request reaches the double (and is held there).
    let mut held = double.held();
    tokio::time::timeout(Duration::from_secs(60), held.wait_for(|n| *n >= 1))
        .await
        .expect("no transcription request reached the double")
        .expect("double gone");
    let (code, running) = server
        .get(&format!("/v2/sync-local-files/{job_id}"), "heidi")
        .await;
    assert_eq!(code, 200, "{running}");
    assert_eq!(running["status"], "running", "{running}");
    assert_eq!(running["origin"], "v1", "{running}");

    double.release();
    let job = server
        .wait_job("heidi", &job_id, Duration::from_secs(60))
        .await;
    assert_eq!(job["status"], "completed", "{job}");
    assert_eq!(job["result"]["transcript_status"], "done", "{job}");
    assert_eq!(job["result"]["new_memories"], json!(ids), "{job}");
    let charged = job["result"]["stt_ms"].as_u64().unwrap();
    assert!(
        (double.samples() / 16).abs_diff(charged) <= 4,
        "sent {} ms, charged {charged} ms",
        double.samples() / 16
    );
    let (code, conv) = server
        .get(
            &format!("/v1/conversations/{}", ids[0].as_str().unwrap()),
            "heidi",
        )
        .await;
    assert_eq!(code, 200, "{conv}");
    assert_eq!(conv["transcript_status"], "done", "{conv}");
    assert_eq!(
        conv["transcript_segments"].as_array().unwrap().len(),
        double.requests().len(),
        "{conv}"
    );
    server.shutdown().await;
}

/// The d01 fixture as one device file recorded an hour ago (English speech, one conversation).
pub(crate) fn d01_an_hour_ago() -> Vec<(String, Vec<u8>)> {
    let bytes = fixtures()
        .into_iter()
        .find(|(n, _)| n == "d01.bin")
        .unwrap()
        .1;
    vec![(
        format!("audio_omi_opus_16000_1_fs160_{}.bin", now_s() - 3_600),
        bytes,
    )]
}

/// Streams `packets` of d02 for `uid` at 4x real time and checks what a closed STT gate means: the session
/// ends normally, is told `stt_unavailable{reason}` once, sends the provider nothing, and its speech is
/// detected and metered; returns the session's speech ms.
async fn told_closed_and_metered(
    server: &EngineServer,
    double: &OpenAiDouble,
    uid: &str,
    frames: usize,
    reason: &str,
) -> u64 {
    let before = double.requests().len();
    let packets = fixture_packets("d02");
    let ws = connect(server.addr, Some(uid), OPUS16).await.unwrap();
    let seen = stream(ws, &packets[..frames.min(packets.len())], 4, None).await;
    assert_eq!(
        seen.close.as_ref().map(|c| c.0),
        Some(NORMAL),
        "{:?}",
        seen.events
    );
    assert_eq!(unavailable_reasons(&seen), [reason], "{:?}", seen.events);
    assert!(!seen.runs().is_empty(), "speech still detected");
    assert_eq!(double.requests().len(), before, "nothing forwarded");
    assert_eq!(seen.metadata()["stt_forwarded_ms"].as_u64(), Some(0));
    let session_ms = seen.metadata()["speech_ms"].as_u64().unwrap();
    assert!(session_ms > 0, "speech metered");
    session_ms
}

/// Over the hard ceiling (lowered to 2 s for the test; 30 h by default): a live session is told
/// `stt_unavailable{speech_ceiling}`, nothing reaches the provider, and its speech is still metered exactly.
#[actix_web::test]
async fn over_the_speech_ceiling_a_live_session_is_told_and_sends_nothing_but_is_metered() {
    let double = OpenAiDouble::start(&[Plan::Serve]).await;
    let fair = voicegate_engine::policy::FairUseConfig {
        ceiling_ms: 2_000,
        ..fair_use_on()
    };
    let server = EngineServer::start(fair, openai(&double)).await;
    // A sync upload an hour ago passes the ceiling (admitted and transcribed under it: the job reads its
    // entitlement before its speech is metered).
    let (code, body, _) = server.upload("heavy", "", &d01_an_hour_ago()).await;
    assert_eq!(code, 200, "{body}");
    let session_ms =
        told_closed_and_metered(&server, &double, "heavy", usize::MAX, "speech_ceiling").await;
    // Metering goes on: the user's total is the upload's speech plus the session's, exactly.
    let uploaded_ms = body["speech_ms"].as_u64().unwrap();
    assert_eq!(
        server.status_speech_ms("heavy").await["daily_ms"].as_u64(),
        Some(uploaded_ms + session_ms)
    );
    server.shutdown().await;
}

/// The daily spend ceiling on paid STT (lowered to 2 s for the test) trips for everyone: after another
/// user's sync upload spent past it, a new live session is told `stt_unavailable{spend_ceiling}`, nothing
/// reaches the provider, and its speech is still metered exactly.
#[actix_web::test]
async fn past_the_daily_spend_ceiling_a_live_session_is_told_and_sends_nothing_but_is_metered() {
    let double = OpenAiDouble::start(&[Plan::Serve]).await;
    let fair = voicegate_engine::policy::FairUseConfig {
        stt_spend_ceiling_ms: 2_000,
        ..fair_use_on()
    };
    let server = EngineServer::start(fair, openai(&double)).await;
    // Another user's upload is sent under the ceiling (its entitlement was read before) and passes it.
    let (code, body, _) = server.upload("spender", "", &d01_an_hour_ago()).await;
    assert_eq!(code, 200, "{body}");
    assert!(body["stt_ms"].as_u64().unwrap() > 2_000, "{body}");
    // The bystander's first 30 s (speech in it).
    let session_ms =
        told_closed_and_metered(&server, &double, "bystander", 3_000, "spend_ceiling").await;
    assert_eq!(
        server.status_speech_ms("bystander").await["daily_ms"].as_u64(),
        Some(session_ms)
    );
    server.shutdown().await;
}

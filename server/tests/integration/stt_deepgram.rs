//! `VOICEGATE_STT=deepgram` through `voicegate serve`, against [`DeepgramDouble`]: a local websocket server
//! in this test suite that speaks Deepgram's documented live protocol (the pages are cited in
//! `engine/src/stt/deepgram/protocol.rs`): `Authorization: Token`, `/v1/listen` query parameters, binary
//! linear16 audio, `KeepAlive` / `Finalize` / `CloseStream` text messages, `Results` (interim, and final
//! with `from_finalize`), `Metadata` then the close after `CloseStream`; and its failures: a handshake
//! refused with 401, 402 or 429, a close mid-stream. On the same port, the pre-recorded API (sync spans):
//! `POST /v1/listen` with headerless linear16 audio, answered with `results.utterances[]` (one per second
//! of audio received) or refused with a status and Deepgram's `err_code` / `err_msg` body.
//!
//! What is checked: the message sequence; the samples the double received equal
//! `voicegate_stt_forwarded_samples_total` exactly (and, after a reconnect, forwarded + resent); the
//! session's STT charge is the audio it handed to the provider: forwarded, plus what the provider could
//! not deliver while failing (dropped, counted), never the resent; transcripts come back in stream time;
//! every failure is an `stt_unavailable` event, the session goes on and its metering stays exact.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::common;
use crate::listen_support;
use crate::stt_openai::{OpenAiDouble, Plan as OpenAiPlan, d01_an_hour_ago};

use common::engine_server::{EngineServer, fair_use_on};
use common::http_double::{next_plan, read_request, write_json};
use listen_support::{NORMAL, Seen, Ws, connect, fixture_packets, offline, read_all};

const KEY: &str = "test-deepgram-key";
const OPUS16: &str = "codec=opus&sample_rate=16000&language=en";

/// What the double does with one connection (a pre-recorded request: with one request).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Plan {
    /// Transcribes: an interim result every 0.5 s of audio, a final one on `Finalize` and `CloseStream`
    /// (pre-recorded: one utterance per second of audio).
    Serve,
    /// Answers the upgrade (or the request) with this HTTP status (401 bad key, 402 no balance, 429 rate
    /// limited, 503).
    Refuse(u16),
    /// Serves, then closes mid-stream (1011, as Deepgram does on a failure) once it has this many samples,
    /// reading what the client had already written until the client's close.
    CloseAfter(u64),
}

/// What the double saw on one connection, in order.
#[derive(Debug, Clone, PartialEq)]
enum Ev {
    Audio(u64),
    KeepAlive,
    Finalize,
    CloseStream,
    Other(String),
}

#[derive(Debug, Clone, Default)]
struct ConnLog {
    authorization: String,
    path_and_query: String,
    refused: Option<u16>,
    events: Vec<Ev>,
}

impl ConnLog {
    fn samples(&self) -> u64 {
        self.events
            .iter()
            .map(|e| if let Ev::Audio(n) = e { *n } else { 0 })
            .sum()
    }
}

/// One pre-recorded request as the double read it.
#[derive(Debug, Clone, Default)]
struct BatchLog {
    authorization: String,
    target: String,
    content_type: String,
    /// 16-bit samples of the body.
    samples: u64,
    answered: u16,
}

/// A Deepgram double (see the module docs). Websocket connections and pre-recorded requests take the
/// plans in order; the last one repeats.
struct DeepgramDouble {
    addr: SocketAddr,
    log: Arc<Mutex<Vec<ConnLog>>>,
    batch: Arc<Mutex<Vec<BatchLog>>>,
    /// Pre-recorded answers go out while this is `true` ([`DeepgramDouble::hold`] stops them).
    open: Arc<tokio::sync::watch::Sender<bool>>,
}

impl DeepgramDouble {
    async fn start(plans: &[Plan]) -> DeepgramDouble {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let batch = Arc::new(Mutex::new(Vec::new()));
        let plans = Arc::new(Mutex::new(
            plans.iter().copied().collect::<VecDeque<Plan>>(),
        ));
        let (shared, batch_log) = (Arc::clone(&log), Arc::clone(&batch));
        let open = Arc::new(tokio::sync::watch::Sender::new(true));
        let answers = Arc::clone(&open);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                // A websocket upgrade is a GET; the pre-recorded API a POST.
                let mut first = [0u8; 4];
                let mut peeked = 0;
                while peeked < 4 {
                    match stream.peek(&mut first).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => peeked = n,
                    }
                }
                if &first == b"POST" {
                    tokio::spawn(serve_prerecorded(
                        stream,
                        Arc::clone(&plans),
                        Arc::clone(&batch_log),
                        answers.subscribe(),
                    ));
                    continue;
                }
                let plan = next_plan(&plans);
                let idx = {
                    let mut l = shared.lock().unwrap();
                    l.push(ConnLog::default());
                    l.len() - 1
                };
                tokio::spawn(serve(stream, plan, Arc::clone(&shared), idx));
            }
        });
        DeepgramDouble {
            addr,
            log,
            batch,
            open,
        }
    }

    /// Pre-recorded requests are read but not answered until [`DeepgramDouble::release`].
    fn hold(&self) {
        self.open.send_replace(false);
    }

    fn release(&self) {
        self.open.send_replace(true);
    }

    fn requests(&self) -> Vec<BatchLog> {
        self.batch.lock().unwrap().clone()
    }

    fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    fn connections(&self) -> Vec<ConnLog> {
        self.log.lock().unwrap().clone()
    }
}

/// Serves pre-recorded requests (`POST /v1/listen`) on one connection.
async fn serve_prerecorded(
    mut stream: tokio::net::TcpStream,
    plans: Arc<Mutex<VecDeque<Plan>>>,
    log: Arc<Mutex<Vec<BatchLog>>>,
    mut open: tokio::sync::watch::Receiver<bool>,
) {
    let mut buf = Vec::new();
    while let Some(req) = read_request(&mut stream, &mut buf).await {
        if open.wait_for(|open| *open).await.is_err() {
            return;
        }
        let mut entry = BatchLog {
            authorization: req.header("authorization"),
            target: req.target.clone(),
            content_type: req.header("content-type"),
            samples: req.body.len() as u64 / 2,
            answered: 0,
        };
        let query_ok = req.target.starts_with("/v1/listen?")
            && req.target.contains("encoding=linear16")
            && req.target.contains("sample_rate=16000");
        let (status, answer) = match next_plan(&plans) {
            // Headerless audio without its encoding and sample rate cannot be decoded.
            _ if !query_ok || req.body.len() % 2 != 0 => (
                400,
                json!({"err_code": "Bad Request", "err_msg": "Bad Request: failed to process audio: corrupt or unsupported data", "request_id": "double"}),
            ),
            Plan::Refuse(code) => (
                code,
                json!({"err_code": format!("REFUSED_{code}"), "err_msg": format!("the double answers {code}"), "request_id": "double"}),
            ),
            Plan::Serve | Plan::CloseAfter(_) => (200, prerecorded_answer(entry.samples)),
        };
        entry.answered = status;
        log.lock().unwrap().push(entry);
        if !write_json(&mut stream, status, &answer).await {
            return;
        }
    }
}

/// A pre-recorded answer for `samples` of audio: one utterance per second of it.
fn prerecorded_answer(samples: u64) -> Value {
    let secs = |s: u64| s as f64 / 16_000.0;
    let utterances: Vec<Value> = (0..samples.div_ceil(16_000))
        .map(|k| {
            let (start, end) = (secs(k * 16_000), secs(((k + 1) * 16_000).min(samples)));
            json!({"start": start, "end": end, "confidence": 0.9, "channel": 0,
                   "transcript": format!("Second {}.", k + 1), "speaker": 0, "id": format!("u{k}"),
                   "words": [{"word": "second", "punctuated_word": "Second", "start": start, "end": end,
                              "confidence": 0.9, "speaker": 0}]})
        })
        .collect();
    json!({
        "metadata": {"request_id": "double", "duration": secs(samples), "channels": 1},
        "results": {
            "channels": [{"alternatives": [{"transcript": "second", "confidence": 0.9, "words": []}]}],
            "utterances": utterances
        }
    })
}

fn results(start: u64, end: u64, is_final: bool, from_finalize: bool, text: &str) -> String {
    let secs = |s: u64| s as f64 / 16_000.0;
    json!({
        "type": "Results",
        "channel_index": [0, 1],
        "start": secs(start),
        "duration": secs(end - start),
        "is_final": is_final,
        "speech_final": is_final,
        "from_finalize": from_finalize,
        "channel": {"alternatives": [{
            "transcript": text,
            "confidence": 0.9,
            "words": [{"word": "utterance", "punctuated_word": "Utterance", "start": secs(start),
                       "end": secs(end), "confidence": 0.9}]
        }]},
        "metadata": {"request_id": "double"}
    })
    .to_string()
}

async fn serve(
    stream: tokio::net::TcpStream,
    plan: Plan,
    log: Arc<Mutex<Vec<ConnLog>>>,
    idx: usize,
) {
    let handshake_log = Arc::clone(&log);
    // The signature is tungstenite's handshake callback's.
    #[allow(clippy::result_large_err)]
    let callback = move |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
        let mut l = handshake_log.lock().unwrap();
        let c = &mut l[idx];
        c.authorization = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        c.path_and_query = req.uri().to_string();
        if let Plan::Refuse(status) = plan {
            c.refused = Some(status);
            let mut r = ErrorResponse::new(Some(format!("{{\"err_code\":\"REFUSED_{status}\"}}")));
            *r.status_mut() = StatusCode::from_u16(status).unwrap();
            return Err(r);
        }
        Ok(resp)
    };
    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await else {
        return;
    };
    let record = |e: Ev| log.lock().unwrap()[idx].events.push(e);
    let (mut received, mut pending_from, mut next_interim, mut finals) = (0u64, 0u64, 8_000u64, 0);
    let mut closing = false;
    while let Some(Ok(msg)) = ws.next().await {
        let mut out = Vec::new();
        match msg {
            Message::Binary(b) => {
                let n = b.len() as u64 / 2;
                received += n;
                record(Ev::Audio(n));
                if closing {
                    continue;
                }
                if let Plan::CloseAfter(limit) = plan
                    && received >= limit
                {
                    closing = true;
                    let frame = CloseFrame {
                        code: CloseCode::Error,
                        reason: "NET-0000 the double drops the stream".into(),
                    };
                    let _ = ws.send(Message::Close(Some(frame))).await;
                    continue;
                }
                if received - pending_from >= next_interim {
                    next_interim += 8_000;
                    out.push(results(pending_from, received, false, false, "hearing"));
                }
            }
            Message::Text(t) => {
                let kind = serde_json::from_str::<Value>(t.as_str()).unwrap()["type"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                let done = kind == "CloseStream";
                match kind.as_str() {
                    "KeepAlive" => record(Ev::KeepAlive),
                    "Finalize" => record(Ev::Finalize),
                    "CloseStream" => record(Ev::CloseStream),
                    other => record(Ev::Other(other.to_string())),
                }
                if (kind == "Finalize" || done) && received > pending_from && !closing {
                    finals += 1;
                    out.push(results(
                        pending_from,
                        received,
                        true,
                        true,
                        &format!("utterance {finals}"),
                    ));
                    pending_from = received;
                    next_interim = 8_000;
                }
                if done && !closing {
                    out.push(
                        json!({"type": "Metadata", "request_id": "double", "sha256": "",
                               "created": "2026-12-04T00:00:00Z", "duration": received as f64 / 16_000.0,
                               "channels": 1})
                        .to_string(),
                    );
                }
                for text in out.drain(..) {
                    let _ = ws.send(Message::text(text)).await;
                }
                if done && !closing {
                    closing = true;
                    let _ = ws.send(Message::Close(None)).await;
                }
                continue;
            }
            Message::Close(_) => break,
            _ => {}
        }
        for text in out {
            let _ = ws.send(Message::text(text)).await;
        }
    }
}

fn deepgram(double: &DeepgramDouble) -> impl FnOnce(&mut voicegate_server::ServeConfig) {
    let url = double.url();
    move |cfg| {
        cfg.stt = Some("deepgram".into());
        cfg.deepgram.api_key = Some(KEY.into());
        cfg.deepgram.url = url;
        cfg.deepgram.keepalive_ms = 100;
        // The whole fixture fits: a lagging pipeline delays, never drops (as in listen_stream).
        cfg.listen_buffer_ms = 200_000;
    }
}

/// Streams `packets` at `speed`x real time, a client `Finalize` after packet `finalize_at` (if any), then
/// `CloseStream`; returns what the client saw.
pub(crate) async fn stream(
    ws: Ws,
    packets: &[Vec<u8>],
    speed: u32,
    finalize_at: Option<usize>,
) -> Seen {
    let (mut tx, rx) = ws.split();
    let limit = Duration::from_millis(packets.len() as u64 * 10 / u64::from(speed) + 40_000);
    let reader = tokio::spawn(read_all(rx, limit));
    let t0 = Instant::now();
    let step = Duration::from_micros(10_000 / u64::from(speed));
    for (i, p) in packets.iter().enumerate() {
        tokio::time::sleep_until(t0 + step * i as u32).await;
        tx.send(Message::binary(p.clone())).await.unwrap();
        if finalize_at == Some(i) {
            tx.send(Message::text(r#"{"type":"Finalize"}"#))
                .await
                .unwrap();
        }
    }
    tx.send(Message::text(r#"{"type":"CloseStream"}"#))
        .await
        .unwrap();
    reader.await.unwrap()
}

const FORWARDED: &str = "voicegate_stt_forwarded_samples_total{provider=\"deepgram\"}";
const RESENT: &str = "voicegate_stt_resent_samples_total{provider=\"deepgram\"}";
/// Every reason (`queue_full`, `provider_down`, `closed`).
const DROPPED: &str = "voicegate_stt_dropped_samples_total{provider=\"deepgram\"";

/// The session's STT charge for `samples` forwarded (ms, rounded half up, as the session converts).
pub(crate) fn charged_ms(samples: u64) -> u64 {
    (samples + 8) / 16
}

pub(crate) fn unavailable_reasons(seen: &Seen) -> Vec<String> {
    seen.of_type("stt_unavailable")
        .iter()
        .map(|e| e["reason"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// Final transcript segments as the client last saw them: (text, start ms, end ms).
pub(crate) fn segments(seen: &Seen) -> Vec<(String, u64, u64)> {
    let mut by_id: Vec<(String, (String, u64, u64))> = Vec::new();
    for (v, _) in &seen.events {
        let Some(array) = v.as_array() else { continue };
        for s in array {
            let seg = (
                s["text"].as_str().unwrap().to_string(),
                (s["start"].as_f64().unwrap() * 1000.0).round() as u64,
                (s["end"].as_f64().unwrap() * 1000.0).round() as u64,
            );
            let id = s["id"].as_str().unwrap().to_string();
            match by_id.iter_mut().find(|(i, _)| *i == id) {
                Some(old) => old.1 = seg,
                None => by_id.push((id, seg)),
            }
        }
    }
    by_id.into_iter().map(|(_, s)| s).collect()
}

/// Metering is what it is without STT: the offline analysis of the same packets, and the store.
pub(crate) async fn assert_metered_exactly(
    server: &EngineServer,
    uid: &str,
    seen: &Seen,
    packets: &[Vec<u8>],
) {
    let expect = offline(packets);
    let meta = seen.metadata();
    let speech = meta["speech_ms"].as_u64().unwrap();
    assert_eq!(meta["frames_received"], packets.len() as u64, "{meta}");
    assert_eq!(meta["frames_dropped"], 0, "{meta}");
    assert!(
        speech.abs_diff(expect.speech_ms) <= expect.speech_ms / 100,
        "speech {speech} vs offline {}",
        expect.speech_ms
    );
    let status = server.status_speech_ms(uid).await;
    assert_eq!(status["daily_ms"], speech, "metered exactly: {status}");
}

#[actix_web::test]
async fn the_stream_speaks_the_documented_protocol_and_the_double_received_exactly_what_was_forwarded()
 {
    let double = DeepgramDouble::start(&[Plan::Serve]).await;
    let server = EngineServer::start(fair_use_on(), deepgram(&double)).await;
    let packets = fixture_packets("d01");
    let ws = connect(server.addr, Some("alice"), OPUS16).await.unwrap();
    // The client's Finalize 1.5 s into the first utterance (598-2738 ms).
    let seen = stream(ws, &packets, 4, Some(150)).await;
    assert_eq!(
        seen.close.as_ref().map(|c| c.0),
        Some(NORMAL),
        "{:?}",
        seen.events
    );
    let statuses: Vec<&str> = seen
        .of_type("service_status")
        .iter()
        .map(|e| e["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["stt_initiating", "ready"]);
    assert!(unavailable_reasons(&seen).is_empty(), "{:?}", seen.events);

    let conns = double.connections();
    assert_eq!(conns.len(), 1, "one connection: {conns:?}");
    let c = &conns[0];
    assert_eq!(c.authorization, format!("Token {KEY}"));
    for param in [
        "/v1/listen?",
        "model=nova-3",
        "language=en",
        "encoding=linear16",
        "sample_rate=16000",
        "channels=1",
        "interim_results=true",
    ] {
        assert!(
            c.path_and_query.contains(param),
            "{param} in {}",
            c.path_and_query
        );
    }
    // The sequence: audio of each run, its Finalize; KeepAlive only in gated silence (after a Finalize,
    // before the next audio); the client's Finalize; CloseStream last.
    let runs = seen.runs();
    let finalizes = c.events.iter().filter(|e| **e == Ev::Finalize).count();
    assert_eq!(
        finalizes,
        runs.len() + 1,
        "a Finalize per run and the client's: {:?}",
        c.events
    );
    assert_eq!(c.events.last(), Some(&Ev::CloseStream), "{:?}", c.events);
    assert_eq!(
        c.events.iter().filter(|e| **e == Ev::CloseStream).count(),
        1
    );
    let mut idle = false;
    let mut keepalives_in_silence = 0;
    for e in &c.events {
        match e {
            Ev::Audio(_) => idle = false,
            Ev::Finalize => idle = true,
            Ev::KeepAlive if idle => keepalives_in_silence += 1,
            _ => {}
        }
    }
    assert!(keepalives_in_silence >= 1, "{:?}", c.events);
    assert!(
        !c.events.iter().any(|e| matches!(e, Ev::Other(_))),
        "{:?}",
        c.events
    );

    // Exactly what was forwarded (and charged), nothing resent.
    let received = c.samples();
    assert!(received > 16_000 * 10, "received {received} samples");
    assert_eq!(server.metric_sum(FORWARDED).await, received);
    assert_eq!(server.metric_sum(RESENT).await, 0);
    assert_eq!(server.metric_sum(DROPPED).await, 0);
    let meta = seen.metadata();
    assert_eq!(
        meta["stt_forwarded_ms"].as_u64().unwrap(),
        charged_ms(received),
        "{meta}"
    );

    // Transcripts come back in the session's time: each final segment lies on a speech run (with its
    // pre-roll and hangover), though the provider's clock skipped the gated silence.
    let segs: Vec<_> = segments(&seen)
        .into_iter()
        .filter(|s| s.0.starts_with("utterance"))
        .collect();
    assert!(segs.len() >= runs.len(), "{segs:?} for runs {runs:?}");
    for (text, start, end) in &segs {
        assert!(
            runs.iter()
                .any(|r| *start + 450 >= r[0] && *end <= r[1] + 250 && *start < r[1]),
            "{text} [{start}, {end}] ms lies on no speech run of {runs:?}"
        );
    }
    assert_metered_exactly(&server, "alice", &seen, &packets).await;
    server.shutdown().await;
}

#[actix_web::test]
async fn a_mid_stream_close_reconnects_and_resends_only_the_open_utterance_uncharged() {
    // Half a second into the first utterance the double drops the stream.
    let double = DeepgramDouble::start(&[Plan::CloseAfter(8_000), Plan::Serve]).await;
    let server = EngineServer::start(fair_use_on(), deepgram(&double)).await;
    let packets = fixture_packets("d01");
    let ws = connect(server.addr, Some("bob"), OPUS16).await.unwrap();
    // At 2x the reconnect (after 250-500 ms) comes while the first run (2.1 s) is still open.
    let seen = stream(ws, &packets, 2, None).await;
    assert_eq!(seen.close.as_ref().map(|c| c.0), Some(NORMAL));
    let kinds: Vec<String> = seen
        .events
        .iter()
        .filter_map(|(v, _)| v["type"].as_str().map(str::to_string))
        .collect();
    assert_eq!(unavailable_reasons(&seen), ["provider_error"], "{kinds:?}");
    let lost = kinds.iter().position(|k| k == "stt_unavailable").unwrap();
    assert!(
        kinds[lost..].iter().any(|k| k == "stt_available"),
        "transcripts came back after the reconnect: {kinds:?}"
    );

    let conns = double.connections();
    assert_eq!(conns.len(), 2, "{conns:?}");
    let (first, second) = (conns[0].samples(), conns[1].samples());
    let (forwarded, resent) = (
        server.metric_sum(FORWARDED).await,
        server.metric_sum(RESENT).await,
    );
    assert!(first >= 8_000, "{first}");
    assert_eq!(
        first + second,
        forwarded + resent,
        "every sample the double read is counted once"
    );
    assert!(
        resent > 0 && resent <= first,
        "resent {resent} of the {first} the lost stream had"
    );
    // The open utterance only: its start is in the first run, so at most the first run's audio.
    let runs = seen.runs();
    let first_run_samples = (runs[0][1] - runs[0][0] + 300 + 100) * 16;
    assert!(
        resent <= first_run_samples,
        "resent {resent} > first run {first_run_samples}"
    );
    let dropped = server.metric_sum(DROPPED).await;
    let meta = seen.metadata();
    assert_eq!(
        meta["stt_forwarded_ms"].as_u64().unwrap(),
        charged_ms(forwarded + dropped),
        "charged once, never for the resent audio: {meta}"
    );
    assert!(!segments(&seen).is_empty());
    assert_metered_exactly(&server, "bob", &seen, &packets).await;
    server.shutdown().await;
}

#[actix_web::test]
async fn a_reconnect_answered_402_tells_provider_payment_and_the_session_goes_on_metered_exactly() {
    let double = DeepgramDouble::start(&[Plan::CloseAfter(8_000), Plan::Refuse(402)]).await;
    let server = EngineServer::start(fair_use_on(), deepgram(&double)).await;
    let packets = fixture_packets("d01");
    let ws = connect(server.addr, Some("carol"), OPUS16).await.unwrap();
    let seen = stream(ws, &packets, 6, None).await;
    assert_eq!(seen.close.as_ref().map(|c| c.0), Some(NORMAL));
    let reasons = unavailable_reasons(&seen);
    assert_eq!(
        reasons.last().map(String::as_str),
        Some("provider_payment"),
        "{reasons:?}"
    );
    let conns = double.connections();
    assert!(
        conns.len() >= 2 && conns[1..].iter().all(|c| c.refused == Some(402)),
        "{conns:?}"
    );
    // What went before the close is all that was forwarded; nothing was resent; the rest was dropped
    // (counted) and charged at hand-off.
    let forwarded = server.metric_sum(FORWARDED).await;
    assert_eq!(forwarded, conns[0].samples());
    assert_eq!(server.metric_sum(RESENT).await, 0);
    let dropped = server.metric_sum(DROPPED).await;
    assert!(dropped > 16_000, "{dropped}");
    assert_eq!(
        seen.metadata()["stt_forwarded_ms"].as_u64().unwrap(),
        charged_ms(forwarded + dropped)
    );
    assert!(
        server
            .metric_sum("voicegate_stt_errors_total{provider=\"deepgram\",reason=\"payment\"}")
            .await
            >= 1
    );
    assert_metered_exactly(&server, "carol", &seen, &packets).await;
    server.shutdown().await;
}

/// `VOICEGATE_STT_FALLBACK=openai` (issue #14): after a dropped connection the reconnect is answered 402
/// (the account cannot pay: the primary is failing at once), which is told (`provider_payment`); the
/// stream moves to the fallback at its next audio, transcripts come again (`stt_available`), and what
/// each provider received is what the session charged, once.
#[actix_web::test]
async fn with_a_fallback_a_reconnect_answered_402_moves_the_stream_to_it_and_charges_each_sample_once()
 {
    let double = DeepgramDouble::start(&[Plan::CloseAfter(8_000), Plan::Refuse(402)]).await;
    let fallback = OpenAiDouble::start(&[OpenAiPlan::Serve]).await;
    let server = EngineServer::start(fair_use_on(), with_fallback(&double, &fallback)).await;
    let packets = fixture_packets("d01");
    let ws = connect(server.addr, Some("carol"), OPUS16).await.unwrap();
    let seen = stream(ws, &packets, 6, None).await;
    assert_eq!(seen.close.as_ref().map(|c| c.0), Some(NORMAL));
    // The dropped connection may be told first (`provider_error`: one is not an outage), then the 402;
    // the fallback's first transcript makes it available again.
    let reasons = unavailable_reasons(&seen);
    assert_eq!(
        reasons.last().map(String::as_str),
        Some("provider_payment"),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .all(|r| r == "provider_error" || r == "provider_payment"),
        "{reasons:?}"
    );
    let kinds: Vec<&str> = seen
        .events
        .iter()
        .filter_map(|(v, _)| v["type"].as_str())
        .filter(|t| t.starts_with("stt_"))
        .collect();
    assert_eq!(kinds.last(), Some(&"stt_available"), "{:?}", seen.events);
    let conns = double.connections();
    assert!(
        conns[1..].iter().all(|c| c.refused == Some(402)),
        "{conns:?}"
    );
    let deepgram = server.metric_sum(FORWARDED).await;
    assert_eq!(deepgram, conns[0].samples());
    let dropped = server.metric_sum(DROPPED).await;
    let received = fallback.samples();
    assert!(
        received > 16_000 * 5,
        "the fallback received {received} samples"
    );
    assert_eq!(
        server
            .metric_sum("voicegate_stt_forwarded_samples_total{provider=\"openai\"}")
            .await,
        received
    );
    assert_eq!(
        server
            .metric_sum("voicegate_stt_fallback_total{what=\"stream_switch\",to=\"openai\"}")
            .await,
        1
    );
    // Charged once: what Deepgram received or dropped while failing, and what the fallback received.
    assert_eq!(
        seen.metadata()["stt_forwarded_ms"].as_u64().unwrap(),
        charged_ms(deepgram + dropped + received)
    );
    let texts: Vec<String> = segments(&seen).into_iter().map(|s| s.0).collect();
    assert!(
        texts.iter().any(|t| t.starts_with("Utterance ")),
        "the fallback's transcripts reached the client: {texts:?}"
    );
    assert_metered_exactly(&server, "carol", &seen, &packets).await;
    // The admin ledger splits the session's charge by the provider that took the audio: exactly the
    // charge in all, the fallback's part what it received (ms rounding, at most 1 ms a record).
    let (code, ledger) = server.admin_get("/v1/admin/stt/user/carol").await;
    assert_eq!(code, 200, "{ledger}");
    let part = |p: &str| ledger["ms"][p].as_u64().unwrap_or(0);
    eprintln!(
        "deepgram forwarded {deepgram}, dropped {dropped}, fallback received {received} samples; ledger {ledger}"
    );
    assert_eq!(
        ledger["total_ms"].as_u64(),
        seen.metadata()["stt_forwarded_ms"].as_u64(),
        "{ledger}"
    );
    assert!(
        part("openai").abs_diff(received / 16) <= 5,
        "{ledger} vs {received} samples"
    );
    assert!(
        part("deepgram").abs_diff((deepgram + dropped) / 16) <= 5,
        "{ledger}"
    );
    assert_eq!(ledger["days"].as_array().map(Vec::len), Some(1), "{ledger}");
    // A new session while the primary is failing opens on the fallback at once.
    let ws = connect(server.addr, Some("dave"), OPUS16).await.unwrap();
    let seen = stream(ws, &packets[..1_500], 6, None).await;
    assert!(unavailable_reasons(&seen).is_empty(), "{:?}", seen.events);
    assert_eq!(double.connections().len(), conns.len());
    assert_eq!(
        server
            .metric_sum("voicegate_stt_fallback_total{what=\"stream_open\",to=\"openai\"}")
            .await,
        1
    );
    server.shutdown().await;
}

const ERRORS: &str = "voicegate_stt_errors_total{provider=\"deepgram\"";

/// Uploads d01 for `uid`; returns the answer and the conversation it made.
async fn upload_d01(server: &EngineServer, uid: &str) -> (Value, Value) {
    let (code, body, _) = server.upload(uid, "", &d01_an_hour_ago()).await;
    assert_eq!(code, 200, "{body}");
    let ids = body["new_memories"].as_array().unwrap();
    assert_eq!(ids.len(), 1, "{body}");
    let id = ids[0].as_str().unwrap();
    let (code, conv) = server.get(&format!("/v1/conversations/{id}"), uid).await;
    assert_eq!(code, 200, "{conv}");
    (body, conv)
}

/// More sync spans at once than the pre-recorded bound holds (1 request in flight, 4 spans held): the
/// spans refused `queue_full` are offered again by their jobs after a backoff, so every upload is
/// transcribed and charged once, none left `pending` for a re-upload.
#[actix_web::test]
async fn sync_spans_past_the_prerecorded_bound_wait_their_turn_and_are_all_transcribed() {
    let double = DeepgramDouble::start(&[Plan::Serve]).await;
    double.hold();
    let configure = deepgram(&double);
    let server = EngineServer::start(fair_use_on(), move |cfg| {
        configure(cfg);
        cfg.deepgram.batch_max_in_flight = 1;
    })
    .await;
    let users: Vec<String> = (0..6).map(|n| format!("burst{n}")).collect();
    let file = d01_an_hour_ago();
    let uploads =
        futures_util::future::join_all(users.iter().map(|uid| server.upload(uid, "", &file)));
    let opener = async {
        // The answers are held until two spans past the bound have been refused and are waiting.
        let deadline = Instant::now() + Duration::from_secs(60);
        while server.metric_sum(QUEUE_FULL_RETRIES).await < 2 {
            assert!(Instant::now() < deadline, "no span was refused queue_full");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        double.release();
    };
    let (answers, ()) = tokio::join!(uploads, opener);
    for (uid, (code, body, _)) in users.iter().zip(&answers) {
        assert_eq!(*code, 200, "{uid}: {body}");
        assert_eq!(body["transcript_status"], "done", "{uid}: {body}");
    }
    let requests = double.requests();
    assert_eq!(
        requests.len(),
        users.len(),
        "one request per span, none twice"
    );
    assert!(requests.iter().all(|r| r.answered == 200), "{requests:?}");
    let received: u64 = requests.iter().map(|r| r.samples).sum();
    assert_eq!(server.metric_sum(FORWARDED).await, received);
    // Each user charged what the double received for their span (the same file: the same audio).
    for (code, body, _) in &answers {
        let charged = body["stt_ms"].as_u64().unwrap();
        assert!(
            (requests[0].samples / 16).abs_diff(charged) <= 1,
            "{code}: {body}"
        );
    }
    assert!(server.metric_sum(QUEUE_FULL_RETRIES).await >= 2);
    assert_eq!(
        server
            .metric_sum(&format!("{DROPPED},reason=\"queue_full\"}}"))
            .await,
        0,
        "no span left behind"
    );
}

const QUEUE_FULL_RETRIES: &str =
    "voicegate_stt_retries_total{provider=\"deepgram\",reason=\"queue_full\"}";

/// A sync upload's spans go to the pre-recorded API: only their padded speech runs, once, as linear16 at
/// 16 kHz with utterances; the user is charged exactly what the double received; the utterances come back
/// on the span's speech (the pauses put back); a re-upload sends nothing.
#[actix_web::test]
async fn sync_spans_go_to_the_prerecorded_api_and_are_charged_exactly_what_it_received() {
    let double = DeepgramDouble::start(&[Plan::Serve]).await;
    let server = EngineServer::start(fair_use_on(), deepgram(&double)).await;
    let (body, conv) = upload_d01(&server, "ivan").await;
    assert_eq!(body["transcript_status"], "done", "{body}");
    let requests = double.requests();
    assert!(!requests.is_empty());
    for r in &requests {
        assert_eq!(r.answered, 200, "{r:?}");
        assert_eq!(r.authorization, format!("Token {KEY}"));
        assert_eq!(r.content_type, "application/octet-stream");
        for part in [
            "model=nova-3",
            "language=en",
            "encoding=linear16",
            "sample_rate=16000",
            "channels=1",
            "utterances=true",
        ] {
            assert!(r.target.contains(part), "{part} in {}", r.target);
        }
    }
    assert!(
        double.connections().is_empty(),
        "no websocket for a sync upload"
    );
    let received: u64 = requests.iter().map(|r| r.samples).sum();
    assert!(received > 16_000 * 5, "{received}");
    assert_eq!(server.metric_sum(FORWARDED).await, received);
    assert_eq!(server.metric_sum(RESENT).await, 0);
    let charged = body["stt_ms"].as_u64().unwrap();
    assert!(
        (received / 16).abs_diff(charged) <= requests.len() as u64,
        "sent {} ms, charged {charged} ms",
        received / 16
    );
    // One segment per second of audio sent, read back onto the speech: their extent is longer than the
    // audio sent (the pauses between the runs were not sent but are put back).
    let segments = conv["transcript_segments"].as_array().unwrap();
    eprintln!(
        "{} span request(s), {} ms of audio sent, {charged} ms charged, {} segments",
        requests.len(),
        received / 16,
        segments.len()
    );
    let expected: u64 = requests.iter().map(|r| r.samples.div_ceil(16_000)).sum();
    assert_eq!(segments.len() as u64, expected, "{conv}");
    let ms = |s: &Value, k: &str| s[k].as_u64().unwrap();
    let first = segments.iter().map(|s| ms(s, "start_ms")).min().unwrap();
    let last = segments.iter().map(|s| ms(s, "end_ms")).max().unwrap();
    assert!(
        last - first > received / 16,
        "{first}..{last} for {} ms sent",
        received / 16
    );
    eprintln!("segments cover {} ms of the recording", last - first);
    let spans = conv["spans"].as_array().unwrap();
    let (from, to) = (
        spans.iter().map(|s| ms(s, "start_ms")).min().unwrap(),
        spans.iter().map(|s| ms(s, "end_ms")).max().unwrap(),
    );
    for seg in segments {
        assert!(ms(seg, "end_ms") >= ms(seg, "start_ms"), "{seg}");
        // Within the conversation's speech, widened by the pre-roll (300 ms) and hangover (100 ms).
        assert!(
            ms(seg, "start_ms") + 300 >= from && ms(seg, "end_ms") <= to + 100,
            "{seg} outside {from}..{to}"
        );
        assert!(
            seg["text"].as_str().unwrap().starts_with("Second "),
            "{seg}"
        );
    }
    // The admin ledger has the charge under the provider that took it.
    let (code, ledger) = server.admin_get("/v1/admin/stt/user/ivan").await;
    assert_eq!(code, 200, "{ledger}");
    assert_eq!(ledger["ms"], json!({ "deepgram": charged }), "{ledger}");
    // A re-upload of the same content sends nothing and charges nothing.
    let (code, again, _) = server.upload("ivan", "", &d01_an_hour_ago()).await;
    assert_eq!(code, 200, "{again}");
    assert_eq!(double.requests().len(), requests.len());
    assert_eq!(again["stt_ms"].as_u64().unwrap_or(0), 0, "{again}");
    server.shutdown().await;
}

/// A 429 then a 503 are retried (the house backoff) and the span is transcribed, charged once; the
/// refused attempts' audio is counted as resent.
#[actix_web::test]
async fn a_prerecorded_429_then_503_are_retried_and_the_span_is_charged_once() {
    let double = DeepgramDouble::start(&[Plan::Refuse(429), Plan::Refuse(503), Plan::Serve]).await;
    let server = EngineServer::start(fair_use_on(), deepgram(&double)).await;
    let (body, _) = upload_d01(&server, "judy").await;
    assert_eq!(body["transcript_status"], "done", "{body}");
    let requests = double.requests();
    let answered: Vec<u16> = requests.iter().map(|r| r.answered).collect();
    assert_eq!(&answered[..3], &[429, 503, 200], "{answered:?}");
    assert_eq!(
        requests[0].samples, requests[2].samples,
        "the same span again"
    );
    let served: u64 = requests
        .iter()
        .filter(|r| r.answered == 200)
        .map(|r| r.samples)
        .sum();
    assert_eq!(server.metric_sum(FORWARDED).await, served);
    assert_eq!(server.metric_sum(RESENT).await, 2 * requests[0].samples);
    assert_eq!(
        server
            .metric_sum(
                "voicegate_stt_retries_total{provider=\"deepgram\",reason=\"rate_limited\"}"
            )
            .await,
        1
    );
    let charged = body["stt_ms"].as_u64().unwrap();
    assert!(
        (served / 16).abs_diff(charged) <= requests.len() as u64,
        "served {} ms, charged {charged} ms",
        served / 16
    );
    server.shutdown().await;
}

/// A refused key is not retried: the span is `failed`, charged nothing, counted `unauthorized`.
#[actix_web::test]
async fn a_prerecorded_401_leaves_the_span_failed_and_charges_nothing() {
    let double = DeepgramDouble::start(&[Plan::Refuse(401)]).await;
    let server = EngineServer::start(fair_use_on(), deepgram(&double)).await;
    let (body, conv) = upload_d01(&server, "kim").await;
    assert_eq!(body["transcript_status"], "failed", "{body}");
    assert_eq!(body["stt_ms"].as_u64().unwrap_or(0), 0, "{body}");
    assert!(conv["transcript_segments"].as_array().unwrap().is_empty());
    let requests = double.requests();
    assert!(requests.iter().all(|r| r.answered == 401), "{requests:?}");
    let spans = requests.len() as u64;
    assert_eq!(
        server
            .metric_sum(&format!("{ERRORS},reason=\"unauthorized\"}}"))
            .await,
        spans,
        "one error per span, no retry"
    );
    // The upload itself is metered as always.
    let status = server.status_speech_ms("kim").await;
    assert!(status["daily_ms"].as_u64().unwrap_or(0) > 0, "{status}");
    server.shutdown().await;
}

/// With a fallback, a span Deepgram refuses for the balance (402) is transcribed by the fallback and
/// charged what it received; nothing is charged for the refused request.
#[actix_web::test]
async fn with_a_fallback_a_span_refused_402_is_transcribed_by_it_and_charged_what_it_received() {
    let double = DeepgramDouble::start(&[Plan::Refuse(402)]).await;
    let fallback = OpenAiDouble::start(&[OpenAiPlan::Serve]).await;
    let server = EngineServer::start(fair_use_on(), with_fallback(&double, &fallback)).await;
    let (body, _) = upload_d01(&server, "erin").await;
    assert_eq!(body["transcript_status"], "done", "{body}");
    assert_eq!(double.requests()[0].answered, 402);
    let received = fallback.samples();
    assert!(received > 16_000 * 5, "{received}");
    let charged = body["stt_ms"].as_u64().unwrap();
    assert!(
        (received / 16).abs_diff(charged) <= 4,
        "sent {} ms, charged {charged} ms",
        received / 16
    );
    server.shutdown().await;
}

fn with_fallback(
    double: &DeepgramDouble,
    fallback: &OpenAiDouble,
) -> impl FnOnce(&mut voicegate_server::ServeConfig) {
    let primary = deepgram(double);
    let url = fallback.base_url();
    move |cfg| {
        primary(cfg);
        cfg.stt_fallback = Some("openai".into());
        cfg.openai.api_key = Some("test-openai-key".into());
        cfg.openai.base_url = url;
    }
}

/// A connect refused with `status` (every attempt): `provider_error`, counted under `reason`; the session
/// goes on, metered exactly.
async fn refused_at_connect(status: u16, uid: &str, reason: &str) {
    let double = DeepgramDouble::start(&[Plan::Refuse(status)]).await;
    let server = EngineServer::start(fair_use_on(), deepgram(&double)).await;
    let packets = fixture_packets("d01");
    let ws = connect(server.addr, Some(uid), OPUS16).await.unwrap();
    let seen = stream(ws, &packets[..1_000], 8, None).await;
    assert_eq!(seen.close.as_ref().map(|c| c.0), Some(NORMAL));
    assert_eq!(
        unavailable_reasons(&seen),
        ["provider_error"],
        "{status}: {:?}",
        seen.events
    );
    let conns = double.connections();
    assert!(
        !conns.is_empty() && conns.iter().all(|c| c.refused == Some(status)),
        "{conns:?}"
    );
    assert_eq!(conns[0].authorization, format!("Token {KEY}"));
    assert_eq!(server.metric_sum(FORWARDED).await, 0);
    let errors = format!("voicegate_stt_errors_total{{provider=\"deepgram\",reason=\"{reason}\"}}");
    assert!(server.metric_sum(&errors).await >= 1, "{errors}");
    // Nothing reached the provider; what the session handed over was dropped, counted, and charged.
    let dropped = server.metric_sum(DROPPED).await;
    assert_eq!(
        seen.metadata()["stt_forwarded_ms"].as_u64().unwrap(),
        charged_ms(dropped)
    );
    assert_metered_exactly(&server, uid, &seen, &packets[..1_000]).await;
    server.shutdown().await;
}

#[actix_web::test]
async fn a_refused_key_is_provider_error_and_the_session_goes_on() {
    refused_at_connect(401, "dave", "unauthorized").await;
}

#[actix_web::test]
async fn a_rate_limited_connect_is_provider_error_and_the_session_goes_on() {
    refused_at_connect(429, "erin", "rate_limited").await;
}

#[actix_web::test]
async fn telemetry_gives_audio_in_and_sent_one_final_latency_per_speech_end_errors_and_queue_depth()
{
    let double = DeepgramDouble::start(&[Plan::Serve]).await;
    let server = EngineServer::start(fair_use_on(), deepgram(&double)).await;
    // From startup, before any session: every error reason and the queue depth, at zero (an alert's
    // `rate()` then sees the first error).
    let text = server.metrics_text().await;
    for reason in [
        "unauthorized",
        "payment",
        "rate_limited",
        "network",
        "protocol",
        "bad_request",
    ] {
        let line =
            format!("voicegate_stt_errors_total{{provider=\"deepgram\",reason=\"{reason}\"}} 0");
        assert!(text.lines().any(|l| l == line), "{line} in:\n{text}");
    }
    assert!(
        text.lines()
            .any(|l| l == "voicegate_stt_queue_depth{provider=\"deepgram\"} 0"),
        "{text}"
    );

    let packets = fixture_packets("d01");
    let ws = connect(server.addr, Some("frank"), OPUS16).await.unwrap();
    let seen = stream(ws, &packets, 4, None).await;
    assert_eq!(seen.close.as_ref().map(|c| c.0), Some(NORMAL));
    assert!(unavailable_reasons(&seen).is_empty(), "{:?}", seen.events);
    let runs = seen.runs();
    assert!(runs.len() >= 3, "{runs:?}");

    // Audio in: all the session decoded (16 kHz); sent: what the double received; the rest is silence the
    // gate kept back (seconds saved = in - forwarded).
    let audio_in = server
        .metric_sum("voicegate_stt_audio_in_samples_total{provider=\"deepgram\"}")
        .await;
    let audio_ms = seen.metadata()["audio_ms"].as_u64().unwrap();
    assert!(
        audio_in.abs_diff(audio_ms * 16) <= 16 * 20,
        "audio in {audio_in} samples for {audio_ms} ms decoded"
    );
    let sent = server.metric_sum(FORWARDED).await;
    assert_eq!(sent, double.connections()[0].samples());
    assert!(
        sent > 0 && sent < audio_in,
        "sent {sent} of {audio_in}: the gate saved the silence"
    );

    // One latency observation per speech end: each run's Finalize brings the final covering its end.
    let text = server.metrics_text().await;
    let count = server
        .metric_sum("voicegate_stt_final_latency_seconds_count{provider=\"deepgram\"}")
        .await;
    assert_eq!(count, runs.len() as u64, "one per run {runs:?}:\n{text}");
    // Its own buckets (0.1 to 30 s), not the generic seconds ones.
    assert!(
        text.contains(
            "voicegate_stt_final_latency_seconds_bucket{provider=\"deepgram\",le=\"0.75\"}"
        ),
        "{text}"
    );
    // Every queued chunk was taken by the connection task.
    assert!(
        text.lines()
            .any(|l| l == "voicegate_stt_queue_depth{provider=\"deepgram\"} 0"),
        "{text}"
    );
    assert_metered_exactly(&server, "frank", &seen, &packets).await;
    server.shutdown().await;
}

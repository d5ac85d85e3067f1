//! `deepgram-double`: a local server that speaks Deepgram's live streaming protocol, for load runs of
//! `VOICEGATE_STT=deepgram` where the real service is out of reach (and must not be billed). It is a test
//! double, not a transcriber: it answers with placeholder words.
//!
//! The protocol as Deepgram documents it (the pages are cited in `engine/src/stt/deepgram/protocol.rs`):
//! a websocket upgrade on `/v1/listen` with `Authorization: Token <key>` and the query's
//! `encoding=linear16&sample_rate=16000`; binary frames of 16-bit little-endian audio; the text messages
//! `KeepAlive`, `Finalize` and `CloseStream`; `Results` messages back (an interim one every 0.5 s of audio
//! received, a final one with `from_finalize` on `Finalize` and `CloseStream`), then `Metadata` and the
//! close after `CloseStream`. An upgrade without the token header is refused 401, one without the
//! encoding or sample rate 400, as Deepgram does.
//!
//! It counts what it received and prints the totals as one JSON line on stdout when it gets SIGINT or
//! SIGTERM (`loadtest/measure.sh` compares the samples with the server's
//! `voicegate_stt_forwarded_samples_total{provider="deepgram"}`).
//!
//! ```sh
//! deepgram-double --bind 127.0.0.1:0 --addr-file /tmp/dg.addr
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;

#[derive(Debug, Parser)]
#[command(
    name = "deepgram-double",
    about = "A local server speaking Deepgram's live streaming protocol, for load runs (placeholder words)"
)]
struct Args {
    /// Address to listen on (port 0: any free port; the address is printed and written to --addr-file).
    #[arg(long, default_value = "127.0.0.1:0")]
    bind: SocketAddr,
    /// File the bound address is written to once the double accepts connections.
    #[arg(long)]
    addr_file: Option<std::path::PathBuf>,
}

/// Samples of audio per interim result.
const INTERIM_EVERY: u64 = 8_000;
const SAMPLE_RATE: f64 = 16_000.0;

/// What every connection received, for the summary.
#[derive(Default)]
struct Totals {
    connections: AtomicU64,
    /// Upgrades refused (no token, wrong path or format) or that failed.
    refused: AtomicU64,
    samples: AtomicU64,
    keepalives: AtomicU64,
    finalizes: AtomicU64,
    close_streams: AtomicU64,
    results: AtomicU64,
}

impl Totals {
    fn summary(&self) -> serde_json::Value {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        json!({
            "connections": get(&self.connections),
            "refused": get(&self.refused),
            "samples": get(&self.samples),
            "audio_s": get(&self.samples) as f64 / SAMPLE_RATE,
            "keepalives": get(&self.keepalives),
            "finalizes": get(&self.finalizes),
            "close_streams": get(&self.close_streams),
            "results": get(&self.results),
        })
    }
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("deepgram-double: cannot start the runtime: {e}");
            return std::process::ExitCode::from(3);
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("deepgram-double: {e}");
            std::process::ExitCode::from(3)
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    let listener = TcpListener::bind(args.bind)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.bind))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("no local address: {e}"))?;
    if let Some(path) = &args.addr_file {
        std::fs::write(path, addr.to_string())
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    eprintln!("deepgram-double: listening on ws://{addr}");
    let totals = Arc::new(Totals::default());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| format!("cannot watch SIGTERM: {e}"))?;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                match accepted {
                    Ok((stream, _)) => {
                        let _ = stream.set_nodelay(true);
                        tokio::spawn(serve(stream, Arc::clone(&totals)));
                    }
                    // Out of file descriptors and the like: the next accept may succeed.
                    Err(e) => eprintln!("deepgram-double: accept: {e}"),
                }
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        }
    }
    println!("{}", totals.summary());
    Ok(())
}

/// Refuses an upgrade the way Deepgram does: the status and a JSON body with `err_code` / `err_msg`.
fn refuse(status: StatusCode, code: &str, msg: &str) -> ErrorResponse {
    let mut r = ErrorResponse::new(Some(
        json!({"err_code": code, "err_msg": msg, "request_id": "double"}).to_string(),
    ));
    *r.status_mut() = status;
    r
}

/// The tungstenite handshake callback's signature returns the large `ErrorResponse` by value.
#[allow(clippy::result_large_err)]
fn check_upgrade(req: &Request, resp: Response) -> Result<Response, ErrorResponse> {
    let token = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("Token ") && v.len() > 6);
    if !token {
        return Err(refuse(
            StatusCode::UNAUTHORIZED,
            "INVALID_AUTH",
            "Invalid credentials.",
        ));
    }
    let query = req.uri().query().unwrap_or_default();
    if req.uri().path() != "/v1/listen"
        || !query.contains("encoding=linear16")
        || !query.contains("sample_rate=16000")
    {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            "Bad Request",
            "the double serves /v1/listen with encoding=linear16 and sample_rate=16000",
        ));
    }
    Ok(resp)
}

fn results(start: u64, end: u64, is_final: bool, text: &str) -> String {
    let secs = |s: u64| s as f64 / SAMPLE_RATE;
    json!({
        "type": "Results",
        "channel_index": [0, 1],
        "start": secs(start),
        "duration": secs(end - start),
        "is_final": is_final,
        "speech_final": is_final,
        "from_finalize": is_final,
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

async fn serve(stream: TcpStream, totals: Arc<Totals>) {
    let mut ws = match tokio_tungstenite::accept_hdr_async(stream, check_upgrade).await {
        Ok(ws) => ws,
        Err(_) => {
            totals.refused.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    totals.connections.fetch_add(1, Ordering::Relaxed);
    // Samples received; the start of the audio no final result covers yet; when the next interim is due.
    let (mut received, mut pending_from, mut next_interim, mut finals) =
        (0u64, 0u64, INTERIM_EVERY, 0u64);
    // After `CloseStream` the double only reads what the client still sends, until its close.
    let mut closing = false;
    while let Some(Ok(msg)) = ws.next().await {
        if closing {
            if let Message::Binary(b) = &msg {
                totals
                    .samples
                    .fetch_add(b.len() as u64 / 2, Ordering::Relaxed);
            }
            if matches!(msg, Message::Close(_)) {
                break;
            }
            continue;
        }
        let mut out = Vec::new();
        let mut close = false;
        match msg {
            Message::Binary(b) => {
                let n = b.len() as u64 / 2;
                received += n;
                totals.samples.fetch_add(n, Ordering::Relaxed);
                if received - pending_from >= next_interim {
                    next_interim += INTERIM_EVERY;
                    out.push(results(pending_from, received, false, "hearing"));
                }
            }
            Message::Text(t) => {
                let kind = serde_json::from_str::<serde_json::Value>(t.as_str())
                    .ok()
                    .and_then(|v| v["type"].as_str().map(str::to_owned))
                    .unwrap_or_default();
                match kind.as_str() {
                    "KeepAlive" => {
                        totals.keepalives.fetch_add(1, Ordering::Relaxed);
                    }
                    "Finalize" | "CloseStream" => {
                        close = kind == "CloseStream";
                        let counter = if close {
                            &totals.close_streams
                        } else {
                            &totals.finalizes
                        };
                        counter.fetch_add(1, Ordering::Relaxed);
                        if received > pending_from {
                            finals += 1;
                            out.push(results(
                                pending_from,
                                received,
                                true,
                                &format!("utterance {finals}"),
                            ));
                            pending_from = received;
                            next_interim = INTERIM_EVERY;
                        }
                        if close {
                            out.push(
                                json!({"type": "Metadata", "request_id": "double", "sha256": "",
                                       "created": "2026-12-06T00:00:00Z",
                                       "duration": received as f64 / SAMPLE_RATE, "channels": 1})
                                .to_string(),
                            );
                        }
                    }
                    _ => {}
                }
            }
            Message::Close(_) => break,
            _ => {}
        }
        let results = out.len() as u64 - u64::from(close);
        totals.results.fetch_add(results, Ordering::Relaxed);
        for text in out {
            if ws.send(Message::text(text)).await.is_err() {
                return;
            }
        }
        if close {
            closing = true;
            let _ = ws.send(Message::Close(None)).await;
        }
    }
}

//! One stream's connection task (on the provider's runtime, never on a pipeline thread): the websocket to
//! Deepgram, the open utterance kept for a reconnect, and the results read back into stream time.
//!
//! - Audio is written as it comes; `forwarded_samples` counts it when the socket write succeeds.
//! - The **open utterance** (the current run's audio not yet covered by a final result, at most
//!   [`MAX_UTTERANCE_SAMPLES`]) is kept. After a mid-stream close the task reconnects with the shared
//!   jittered [`Backoff`] (only while it has audio to send) and writes that utterance again: audio already
//!   forwarded counts as **resent** (`voicegate_stt_resent_samples_total`), never as forwarded again, so
//!   the user is never charged twice; audio that never went counts as forwarded then.
//! - `Finalize` at the end of every speech run and on the client's Finalize (gated silence is never sent,
//!   so without it a run's last words would wait for the next run; the reference sends one 300 ms into
//!   the hangover, omi §3.6); `KeepAlive` after `keepalive` without a write; `CloseStream` at the end,
//!   then the last results until the server closes (at most `close_timeout`).
//! - Failures are told to the session once each ([`SttEvent::Error`]; the session says
//!   `stt_unavailable`), counted by reason, and never stop the session.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::{HeaderValue, header::AUTHORIZATION};
use tokio_tungstenite::tungstenite::{self, Message};

use super::KIND;
use super::clock::TimeMap;
use super::config::DeepgramConfig;
use super::protocol::{self, CLOSE_STREAM, FINALIZE, KEEP_ALIVE, Results, ServerMessage};
use super::stream::{Cmd, Depth};
use crate::outbound::{Outbound, WsConnectError, WsStream};
use crate::stt::provider::{ResultSink, StreamCounters, StreamOptions};
use crate::stt::types::{ResultKind, SttError, SttEvent, SttResult, Word, sample_to_ms};
use crate::telemetry as t;
use crate::time::Backoff;

/// The open utterance kept for a reconnect, at most: 30 s (960 KB). Older audio is not resent.
pub(super) const MAX_UTTERANCE_SAMPLES: usize = 30 * 16_000;
/// Samples per binary frame when writing kept audio (0.5 s).
const WRITE_CHUNK: usize = 8_000;

/// What every stream of a provider shares.
pub(super) struct Ctx {
    pub cfg: DeepgramConfig,
    pub outbound: Outbound,
    /// Audio chunks waiting in all streams' channels (`voicegate_stt_queue_depth`).
    pub depth: Arc<Depth>,
}

struct Conn {
    ws: WsStream,
    map: TimeMap,
    last_write: Instant,
}

/// The current run's audio since its last final result.
#[derive(Debug, Default)]
struct Utterance {
    /// Stream time of `pcm[0]`.
    start: u64,
    pcm: Vec<i16>,
    /// `pcm[..forwarded]` was forwarded (charged) on some connection.
    forwarded: usize,
    /// `pcm[..written]` was written on the current connection.
    written: usize,
    /// The run ended (its `Finalize` is due or sent).
    ended: bool,
}

impl Utterance {
    fn unwritten(&self) -> usize {
        self.pcm.len() - self.written
    }

    /// Forgets the first `n` samples.
    fn drain_front(&mut self, n: usize) {
        let n = n.min(self.pcm.len());
        self.pcm.drain(..n);
        self.start += n as u64;
        self.forwarded = self.forwarded.saturating_sub(n);
        self.written = self.written.saturating_sub(n);
    }
}

struct Task {
    ctx: Arc<Ctx>,
    url: String,
    sink: ResultSink,
    counters: Arc<StreamCounters>,
    queued: Arc<AtomicU64>,
    conn: Option<Conn>,
    backoff: Backoff,
    /// After a failure: no new connection before this.
    retry_at: Option<Instant>,
    utt: Utterance,
    /// `CloseStream` sent (or the session gone): the deadline for the server's close.
    closing: Option<Instant>,
    /// The last failure told to the session (each kind is told once until a result arrives).
    told: Option<&'static str>,
}

/// Runs one stream until it is closed and every result is out, then sends [`SttEvent::Closed`].
pub(super) async fn run(
    ctx: Arc<Ctx>,
    options: StreamOptions,
    mut rx: mpsc::Receiver<Cmd>,
    queued: Arc<AtomicU64>,
    sink: ResultSink,
) {
    let url = protocol::listen_url(
        &ctx.cfg.url,
        &ctx.cfg.model,
        &options.language,
        options.interim_results,
    );
    let backoff = Backoff::new(ctx.cfg.reconnect_min, ctx.cfg.reconnect_max);
    let counters = Arc::clone(sink.counters());
    let mut task = Task {
        ctx,
        url,
        sink,
        counters,
        queued,
        conn: None,
        backoff,
        retry_at: None,
        utt: Utterance::default(),
        closing: None,
        told: None,
    };
    task.connect().await;
    task.run(&mut rx).await;
    task.finish(&mut rx).await;
}

async fn next_message(conn: &mut Option<Conn>) -> Option<Result<Message, tungstenite::Error>> {
    match conn {
        Some(c) => c.ws.next().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn write(conn: &mut Conn, msg: Message, timeout: Duration) -> Result<(), String> {
    match tokio::time::timeout(timeout, conn.ws.send(msg)).await {
        Ok(Ok(())) => {
            conn.last_write = Instant::now();
            Ok(())
        }
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("a write waited more than {timeout:?}")),
    }
}

impl Task {
    async fn run(&mut self, rx: &mut mpsc::Receiver<Cmd>) {
        loop {
            if self.conn.is_none() {
                if self.closing.is_some() {
                    return;
                }
                let due = self.retry_at.is_none_or(|at| Instant::now() >= at);
                if self.utt.unwritten() > 0 && due {
                    if self.connect().await {
                        self.flush().await;
                    }
                    continue;
                }
            }
            let keepalive_at = match (&self.conn, self.closing) {
                (Some(c), None) => Some(c.last_write + self.ctx.cfg.keepalive),
                _ => None,
            };
            let retry_at = match self.conn {
                None if self.utt.unwritten() > 0 => self.retry_at,
                _ => None,
            };
            let closing = self.closing;
            tokio::select! {
                cmd = rx.recv(), if closing.is_none() => match cmd {
                    Some(Cmd::Audio { start, pcm }) => {
                        self.queued.fetch_sub(pcm.len() as u64, Ordering::Relaxed);
                        self.ctx.depth.took();
                        self.audio(start, pcm).await;
                    }
                    Some(Cmd::EndOfRun) => {
                        self.utt.ended = true;
                        self.control(FINALIZE).await;
                    }
                    Some(Cmd::Finalize) => self.control(FINALIZE).await,
                    Some(Cmd::Close) | None => self.begin_close().await,
                },
                msg = next_message(&mut self.conn) => self.message(msg).await,
                () = sleep_until(keepalive_at) => self.control(KEEP_ALIVE).await,
                () = sleep_until(retry_at) => {}
                () = sleep_until(closing) => return,
            }
        }
    }

    /// Opens a connection (the key read now); false after a failure (told, counted, retry scheduled).
    async fn connect(&mut self) -> bool {
        let request = self.ctx.cfg.key.current().and_then(|key| {
            let mut req = self
                .url
                .as_str()
                .into_client_request()
                .map_err(|e| SttError::BadRequest(format!("{}: {e}", self.url)))?;
            let value = HeaderValue::from_str(&format!("Token {key}")).map_err(|_| {
                SttError::Unauthorized("the key is not a valid header value".into())
            })?;
            req.headers_mut().insert(AUTHORIZATION, value);
            Ok(req)
        });
        let outcome = match request {
            Ok(req) => match self
                .ctx
                .outbound
                .websocket(req, self.ctx.cfg.connect_timeout)
                .await
            {
                Ok(ws) => Ok(ws),
                Err(WsConnectError::Refused { status, body }) => {
                    Err(("refused", protocol::refused(status, &body)))
                }
                Err(e) => Err(("failed", SttError::Network(e.to_string()))),
            },
            Err(e) => Err(("failed", e)),
        };
        match outcome {
            Ok(ws) => {
                count_connection("opened");
                self.conn = Some(Conn {
                    ws,
                    map: TimeMap::default(),
                    last_write: Instant::now(),
                });
                self.utt.written = 0;
                self.backoff.reset();
                self.retry_at = None;
                true
            }
            Err((outcome, error)) => {
                count_connection(outcome);
                self.fail(error);
                self.retry_at = Some(Instant::now() + self.backoff.next_delay());
                false
            }
        }
    }

    /// Tells the session about a failure (once per kind until a result arrives) and counts it.
    fn fail(&mut self, error: SttError) {
        let reason = error.code();
        metrics::counter!(t::STT_ERRORS_TOTAL, "provider" => KIND.name(), "reason" => reason)
            .increment(1);
        tracing::warn!(message = "Deepgram stream failure; the session goes on.", reason, %error);
        if self.told != Some(reason) {
            self.told = Some(reason);
            self.sink.send(SttEvent::Error {
                reason,
                message: error.to_string(),
            });
        }
    }

    /// The connection is gone: told, counted, a reconnect scheduled (unless the stream is closing).
    fn lost(&mut self, why: String) {
        self.conn = None;
        self.utt.written = 0;
        if self.closing.is_some() {
            return;
        }
        count_connection("lost");
        self.fail(SttError::Network(why));
        self.retry_at = Some(Instant::now() + self.backoff.next_delay());
    }

    async fn audio(&mut self, start: u64, pcm: Vec<i16>) {
        let contiguous = start == self.utt.start + self.utt.pcm.len() as u64;
        if !self.utt.pcm.is_empty() && (self.utt.ended || !contiguous) {
            // A new run: the previous one's audio that never went is lost with it.
            self.drop_unforwarded();
            self.utt = Utterance::default();
        }
        if self.utt.pcm.is_empty() {
            self.utt = Utterance {
                start,
                ..Utterance::default()
            };
        }
        self.utt.pcm.extend_from_slice(&pcm);
        let excess = self.utt.pcm.len().saturating_sub(MAX_UTTERANCE_SAMPLES);
        if excess > 0 {
            let never_sent = excess.saturating_sub(self.utt.forwarded);
            if never_sent > 0 {
                self.counters
                    .dropped(KIND, "provider_down", never_sent as u64);
            }
            self.utt.drain_front(excess);
        }
        self.flush().await;
    }

    fn drop_unforwarded(&mut self) {
        let never_sent = self.utt.pcm.len() - self.utt.forwarded;
        if never_sent > 0 {
            self.counters
                .dropped(KIND, "provider_down", never_sent as u64);
        }
    }

    /// Writes the utterance's audio this connection has not had yet; after a run's end, its `Finalize`.
    async fn flush(&mut self) {
        let wrote_any = self.utt.unwritten() > 0;
        loop {
            let Some(conn) = self.conn.as_mut() else {
                return;
            };
            let from = self.utt.written;
            let to = (from + WRITE_CHUNK).min(self.utt.pcm.len());
            if from >= to {
                break;
            }
            let mut bytes = Vec::with_capacity((to - from) * 2);
            for s in &self.utt.pcm[from..to] {
                bytes.extend_from_slice(&s.to_le_bytes());
            }
            match write(conn, Message::binary(bytes), self.ctx.cfg.write_timeout).await {
                Ok(()) => {
                    let n = (to - from) as u64;
                    let resent = self.utt.forwarded.saturating_sub(from).min(to - from) as u64;
                    if resent > 0 {
                        metrics::counter!(t::STT_RESENT_SAMPLES_TOTAL, "provider" => KIND.name())
                            .increment(resent);
                    }
                    if n > resent {
                        self.counters.forwarded(KIND, n - resent);
                    }
                    conn.map.wrote(self.utt.start + from as u64, n);
                    self.utt.written = to;
                    self.utt.forwarded = self.utt.forwarded.max(to);
                }
                Err(e) => {
                    self.lost(e);
                    return;
                }
            }
        }
        if wrote_any && self.utt.ended {
            // A run that ended while the connection was down: its Finalize goes after its audio.
            self.control(FINALIZE).await;
        }
    }

    async fn control(&mut self, text: &'static str) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        if let Err(e) = write(conn, Message::text(text), self.ctx.cfg.write_timeout).await {
            self.lost(e);
        }
    }

    async fn begin_close(&mut self) {
        self.closing = Some(Instant::now() + self.ctx.cfg.close_timeout);
        self.control(CLOSE_STREAM).await;
    }

    async fn message(&mut self, msg: Option<Result<Message, tungstenite::Error>>) {
        match msg {
            Some(Ok(Message::Text(text))) => match protocol::parse(text.as_str()) {
                Ok(ServerMessage::Results(r)) => self.results(&r),
                Ok(ServerMessage::Metadata(m)) => {
                    tracing::debug!(message = "Deepgram metadata", request_id = %m.request_id, duration = m.duration);
                }
                Ok(ServerMessage::Other(_)) => {}
                Err(e) => self.fail(e),
            },
            Some(Ok(Message::Close(frame))) => {
                if let Some(conn) = self.conn.as_mut() {
                    // Sends tungstenite's queued reply to the close (best effort).
                    let _ = tokio::time::timeout(Duration::from_secs(1), conn.ws.flush()).await;
                }
                let why = frame.map_or_else(
                    || "closed by the server".to_string(),
                    |f| format!("closed by the server: {} {}", u16::from(f.code), f.reason),
                );
                self.lost(why);
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => self.lost(e.to_string()),
            None => self.lost("the connection ended".to_string()),
        }
    }

    /// One `Results` message: back into stream time, to the session; a final one settles the utterance.
    fn results(&mut self, r: &Results) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        let start_c = protocol::secs_to_samples(r.start);
        let end_c = protocol::secs_to_samples(r.start + r.duration);
        let start = conn.map.to_stream(start_c, false);
        let end = conn.map.to_stream(end_c, true).max(start);
        if let Some(alt) = r.channel.alternatives.first()
            && !alt.transcript.trim().is_empty()
        {
            let words: Vec<Word> = alt
                .words
                .iter()
                .map(|w| {
                    let ws = conn
                        .map
                        .to_stream(protocol::secs_to_samples(w.start), false);
                    let we = conn.map.to_stream(protocol::secs_to_samples(w.end), true);
                    Word {
                        text: w.punctuated_word.clone().unwrap_or_else(|| w.word.clone()),
                        start_ms: sample_to_ms(ws),
                        end_ms: sample_to_ms(we.max(ws)),
                        confidence: w.confidence,
                        speaker: w.speaker,
                    }
                })
                .collect();
            let speaker = alt.words.first().and_then(|w| w.speaker);
            self.told = None;
            self.sink.result(SttResult {
                kind: if r.is_final {
                    ResultKind::Final
                } else {
                    ResultKind::Interim
                },
                text: alt.transcript.trim().to_string(),
                start_ms: sample_to_ms(start),
                end_ms: sample_to_ms(end),
                confidence: alt.confidence,
                words,
                speaker,
            });
        }
        if r.is_final {
            conn.map.forget_before(end_c);
            // Audio up to the result's end is transcribed for good: not resent after a reconnect.
            let settled = end.saturating_sub(self.utt.start) as usize;
            let settled = settled.min(self.utt.written);
            if r.from_finalize && self.utt.ended && self.utt.written == self.utt.pcm.len() {
                self.utt = Utterance::default();
            } else if settled > 0 {
                self.utt.drain_front(settled);
            }
        }
    }

    /// The stream is over: audio that never went is counted, then [`SttEvent::Closed`].
    async fn finish(&mut self, rx: &mut mpsc::Receiver<Cmd>) {
        if let Some(mut conn) = self.conn.take() {
            let _ = tokio::time::timeout(Duration::from_secs(1), conn.ws.close(None)).await;
        }
        self.drop_unforwarded();
        rx.close();
        while let Ok(cmd) = rx.try_recv() {
            if let Cmd::Audio { pcm, .. } = cmd {
                self.queued.fetch_sub(pcm.len() as u64, Ordering::Relaxed);
                self.ctx.depth.took();
                self.counters.dropped(KIND, "closed", pcm.len() as u64);
            }
        }
        // `Closed` is the one event worth waiting for room for (the session reads on its ticks).
        for _ in 0..100 {
            if self.sink.send(SttEvent::Closed) || self.sink.is_closed() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn count_connection(outcome: &'static str) {
    metrics::counter!(t::STT_CONNECTIONS_TOTAL, "provider" => KIND.name(), "outcome" => outcome)
        .increment(1);
}

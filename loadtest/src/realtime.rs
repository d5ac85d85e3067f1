//! The realtime scenario: N simulated devices, each a distinct user, on `--threads` harness threads.
//!
//! Each thread runs a single-threaded runtime with its share of the streams: a [`Pacer`] writes every
//! stream's frames on their absolute deadlines, and each stream has a reader task for the server's events.
//! A stream connects to `/v4/listen`, sends its frames (one 10 ms Opus packet per websocket message) and a
//! `KeepAlive` every 10 s, and records when each frame left, so that an event carrying
//! `frames_received = N` gives the latency of frame N. At the end it sends `CloseStream` and waits for the
//! final `metadata`, whose `frames_received` is the number of frames acknowledged.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use serde::Deserialize;
use tokio::io::AsyncReadExt;
use tokio::net::tcp::OwnedReadHalf;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::corpus::FRAME_MS;
use crate::live::Live;
use crate::pacer::{Pacer, RealtimeCtx, StreamTx};
use crate::wsframe::{self, Parser, ServerMsg};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes asked of the socket per read (events are a few hundred bytes).
const READ_CHUNK: usize = 4096;

/// The server's final `metadata` event.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Metadata {
    pub frames_received: u64,
    pub frames_dropped: u64,
    pub audio_ms: u64,
    pub speech_ms: u64,
    pub stt_forwarded_ms: u64,
}

/// One connection of a stream: a session on the server.
#[derive(Debug, Clone, Copy)]
pub struct SessionPart {
    /// The stream's frame index of the session's first frame (0, or where a reconnect went on).
    pub first_frame: u64,
    /// Frames written on this connection.
    pub frames: u64,
    /// The session's final `metadata`, and when it arrived.
    pub metadata: Option<(Metadata, Instant)>,
    /// When the connection was seen to break before its metadata (`--survive-node-loss`).
    pub broken_at: Option<Instant>,
}

/// One stream's result.
#[derive(Debug, Default)]
pub struct StreamOutcome {
    pub user: String,
    pub start_clip: usize,
    pub setup_us: Option<u64>,
    pub frames_sent: u64,
    /// Its sessions, in order: one, or with `--survive-node-loss` one per connection.
    pub sessions: Vec<SessionPart>,
    /// Connection attempts that failed and were tried again (`--survive-node-loss`).
    pub reconnect_attempts: u64,
    /// Upgrades refused 503 and tried again after their `Retry-After` (`--retry-refused`).
    pub refusals: u64,
    /// The `Retry-After` of each of those refusals, s (absent: 0).
    pub refusal_retry_after_s: Vec<u64>,
    /// Never admitted within `--retry-refused` (not an error: the node shed it).
    pub refused: bool,
    /// The current connection's metadata, moved into its [`SessionPart`] when the connection ends.
    last_metadata: Option<(Metadata, Instant)>,
    /// Connected, sent every frame, and got `metadata`.
    pub held: bool,
    pub metadata: Option<Metadata>,
    /// Sum of `frames_dropped` reported in `frames_dropped` events.
    pub dropped_events: u64,
    /// Transcript messages (JSON arrays of segments, with a speech-to-text provider) and their segments.
    pub transcript_messages: u64,
    pub transcript_segments: u64,
    pub events: u64,
    /// Event receipt − send time of the frame it names, µs (`metadata` excluded).
    pub latencies_us: Vec<u64>,
    /// The event type of each entry of `latencies_us` (an index into [`EVENT_KINDS`]).
    pub latency_kinds: Vec<u8>,
    /// `CloseStream` sent → `metadata` received, µs.
    pub close_us: Option<u64>,
    pub errors: Vec<String>,
}

/// The event types the server documents (`docs/protocol.md`); anything else counts as `other`.
pub const EVENT_KINDS: [&str; 9] = [
    "speech_started",
    "speech_ended",
    "usage",
    "fair_use",
    "stt_budget_exhausted",
    "conversation_closed",
    "frames_dropped",
    "metadata",
    "other",
];

fn kind_index(kind: &str) -> u8 {
    let last = EVENT_KINDS.len() - 1;
    EVENT_KINDS[..last]
        .iter()
        .position(|k| *k == kind)
        .unwrap_or(last) as u8
}

impl StreamOutcome {
    fn error(&mut self, live: &Live, kind: impl Into<String>) {
        live.errors.fetch_add(1, Relaxed);
        self.errors.push(kind.into());
    }
}

#[derive(Deserialize)]
struct Event<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    #[serde(default)]
    frames_received: Option<u64>,
    #[serde(default)]
    frames_dropped: Option<u64>,
    #[serde(default)]
    audio_ms: Option<u64>,
    /// A number in `metadata` and `speech_ended`, an object of rolling totals in `usage`.
    #[serde(default)]
    speech_ms: Option<serde_json::Value>,
    #[serde(default)]
    stt_forwarded_ms: Option<u64>,
}

/// What the reader does after one server message.
enum Flow {
    Continue,
    Metadata,
    Closed(String),
}

/// How one connection ended.
enum End {
    /// The session ended (its metadata arrived), or an error was recorded in the outcome.
    Over,
    /// The connection broke before the session's metadata: the error kind, not yet recorded.
    Lost(String),
}

/// First wait before a reconnect (`--survive-node-loss`), doubled per failed attempt up to the next.
const RECONNECT_FIRST: Duration = Duration::from_millis(250);
const RECONNECT_MAX: Duration = Duration::from_secs(2);
/// Extra time a surviving stream may take beyond its audio and close timeout: outages and reconnects.
const SURVIVE_SLACK: Duration = Duration::from_secs(180);

/// Runs `n` streams (users `{prefix}0…`, `ctx.streams_per_user` streams each, stream i on node i mod N), their starts spread evenly over `ramp` seconds, on `threads`
/// harness threads; returns each stream's outcome, in order. Never panics: a thread or task that fails
/// leaves an outcome with the error.
pub async fn run_streams(
    ctx: Arc<RealtimeCtx>,
    n: usize,
    prefix: &str,
    ramp: f64,
    threads: usize,
) -> Vec<StreamOutcome> {
    let threads = threads.clamp(1, n.max(1));
    let ctx_users_div = ctx.streams_per_user.max(1);
    let (tx, mut rx) = mpsc::unbounded_channel::<(usize, StreamOutcome)>();
    for t in 0..threads {
        let ids: Vec<usize> = (t..n).step_by(threads).collect();
        let (ctx, tx, prefix) = (ctx.clone(), tx.clone(), prefix.to_owned());
        let spawned = std::thread::Builder::new()
            .name(format!("loadtest-rt-{t}"))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                match rt {
                    Ok(rt) => {
                        let local = tokio::task::LocalSet::new();
                        local.block_on(&rt, run_thread(ctx, ids, prefix, ramp, n, tx));
                    }
                    Err(e) => eprintln!("voicegate-loadtest: harness thread runtime: {e}"),
                }
            });
        if let Err(e) = spawned {
            eprintln!("voicegate-loadtest: harness thread: {e}");
        }
    }
    drop(tx);
    let mut outcomes: Vec<Option<StreamOutcome>> = (0..n).map(|_| None).collect();
    while let Some((i, o)) = rx.recv().await {
        if let Some(slot) = outcomes.get_mut(i) {
            *slot = Some(o);
        }
    }
    outcomes
        .into_iter()
        .enumerate()
        .map(|(i, o)| {
            o.unwrap_or_else(|| StreamOutcome {
                user: format!("{prefix}{}", i / ctx_users_div),
                errors: vec!["task_failed".into()],
                ..StreamOutcome::default()
            })
        })
        .collect()
}

/// One harness thread: its pacer and its streams.
async fn run_thread(
    ctx: Arc<RealtimeCtx>,
    ids: Vec<usize>,
    prefix: String,
    ramp: f64,
    n: usize,
    results: mpsc::UnboundedSender<(usize, StreamOutcome)>,
) {
    let pacer = Rc::new(Pacer::default());
    let sender = tokio::task::spawn_local(Rc::clone(&pacer).run(ctx.clone()));
    let mut streams = tokio::task::JoinSet::new();
    for i in ids {
        let delay = Duration::from_secs_f64(ramp.max(0.0) * i as f64 / n.max(1) as f64);
        let user = format!("{prefix}{}", i / ctx.streams_per_user.max(1));
        let (ctx, pacer) = (ctx.clone(), Rc::clone(&pacer));
        streams.spawn_local(async move { (i, run_stream(ctx, pacer, i, user, delay).await) });
    }
    while let Some(done) = streams.join_next().await {
        if let Ok(result) = done {
            let _ = results.send(result);
        }
    }
    sender.abort();
}

/// Runs one stream to the end; never panics, every failure is an error kind in the outcome. With
/// `--survive-node-loss` a connection that breaks before its metadata is replaced by a new one (to the
/// next node) that goes on from the next frame.
async fn run_stream(
    ctx: Arc<RealtimeCtx>,
    pacer: Rc<Pacer>,
    index: usize,
    user: String,
    start_delay: Duration,
) -> StreamOutcome {
    tokio::time::sleep(start_delay).await;
    let mut out = StreamOutcome {
        user,
        start_clip: index % ctx.corpus.clips.len(),
        ..StreamOutcome::default()
    };
    let started = Instant::now();
    // The whole stream is bounded: sending takes frames × interval, then the close timeout.
    let send_time = Duration::from_secs_f64(
        ctx.frames_per_stream as f64 * FRAME_MS as f64 / 1_000.0 / ctx.pace,
    );
    let mut bound = started + send_time + ctx.close_timeout + Duration::from_secs(30);
    if ctx.survive_node_loss {
        bound += SURVIVE_SLACK;
    }
    // A stream admitted late (after refusals) still sends all its audio.
    bound += ctx.retry_refused.unwrap_or_default();
    let header = match ctx.auth.header(&out.user) {
        Ok(h) => h,
        Err(kind) => {
            out.error(&ctx.live, kind);
            ctx.live.streams_done.fetch_add(1, Relaxed);
            return out;
        }
    };
    let seed = (index as u32).wrapping_mul(0x9e37_79b9) ^ 0x5bd1_e995;
    let mut previous: Option<Rc<RefCell<StreamTx>>> = None;
    let mut attempt = 0usize;
    let mut backoff = RECONNECT_FIRST;
    loop {
        let attempt_started = Instant::now();
        let connected = match ctx
            .targets
            .get((index + attempt) % ctx.targets.len().max(1))
        {
            Some(target) => wsframe::connect(target, &header, CONNECT_TIMEOUT).await,
            None => Err(wsframe::ConnectError::from("no_node".to_owned())),
        };
        attempt += 1;
        let (stream, leftover) = match connected {
            Ok(c) => c,
            Err(e) => {
                if let (Some(window), Some(refusal), true) =
                    (ctx.retry_refused, &e.refusal, out.sessions.is_empty())
                    && refusal.status == 503
                {
                    // As the app does with a full node: wait what the node asked (with a per-stream
                    // jitter of up to 19 %, so the refused do not come back in one wave), then try
                    // again, on the next node when there are several.
                    out.refusals += 1;
                    let after = refusal.retry_after_s.unwrap_or(0);
                    out.refusal_retry_after_s.push(after);
                    let wait = Duration::from_secs(after.max(1))
                        .mul_f64(1.0 + (index % 20) as f64 / 100.0);
                    if Instant::now() + wait < started + window {
                        tokio::time::sleep(wait).await;
                        continue;
                    }
                    out.refused = true;
                    break;
                }
                let kind = e.kind;
                if ctx.survive_node_loss && Instant::now() + backoff < bound {
                    out.reconnect_attempts += 1;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(RECONNECT_MAX);
                    continue;
                }
                out.error(&ctx.live, kind);
                break;
            }
        };
        backoff = RECONNECT_FIRST;
        if out.setup_us.is_none() {
            // The attempt that was admitted (waits after refusals are not setup time).
            out.setup_us = Some(attempt_started.elapsed().as_micros() as u64);
        }
        ctx.live.stream_opened();
        let (read, write) = stream.into_split();
        let tx = Rc::new(RefCell::new(match &previous {
            None => StreamTx::new(write, out.start_clip, seed, &ctx),
            Some(p) => p.borrow().reconnected(write),
        }));
        pacer.add(Rc::clone(&tx));
        let end = read_events(&ctx, &tx, read, leftover, &mut out, bound).await;
        let mut t = tx.borrow_mut();
        t.stop("done");
        out.frames_sent = t.sent;
        ctx.live.frames_sent.fetch_add(t.take_unreported(), Relaxed);
        ctx.live.stream_closed();
        let mut part = SessionPart {
            first_frame: t.base,
            frames: t.sent - t.base,
            metadata: out.last_metadata.take(),
            broken_at: None,
        };
        let more = t.sent < ctx.frames_per_stream;
        drop(t);
        match end {
            End::Lost(_) if ctx.survive_node_loss => {
                part.broken_at = Some(Instant::now());
                out.sessions.push(part);
                if !more || Instant::now() >= bound {
                    // Everything was sent: the stream is over, only its last session's end was lost.
                    break;
                }
                previous = Some(tx);
            }
            End::Lost(kind) => {
                out.sessions.push(part);
                out.error(&ctx.live, kind);
                break;
            }
            End::Over => {
                out.sessions.push(part);
                break;
            }
        }
    }
    out.metadata = out.sessions.last().and_then(|p| p.metadata.map(|(m, _)| m));
    ctx.live.streams_done.fetch_add(1, Relaxed);
    out
}

/// Reads every server message until the close after `metadata` (or an error or a timeout, recorded in
/// `out`, or the connection's loss, returned).
async fn read_events(
    ctx: &RealtimeCtx,
    tx: &Rc<RefCell<StreamTx>>,
    mut read: OwnedReadHalf,
    mut buf: Vec<u8>,
    out: &mut StreamOutcome,
    bound: Instant,
) -> End {
    let wake = Rc::clone(&tx.borrow().wake);
    let mut parser = Parser::default();
    let mut eof = false;
    loop {
        loop {
            let msg = match parser.next(&mut buf) {
                Ok(Some(msg)) => msg,
                Ok(None) if eof => ServerMsg::Close(0),
                Ok(None) => break,
                Err(_) => return End::Lost("read_failed".into()),
            };
            let closing = tx.borrow().closing_at;
            match on_message(ctx, msg, &mut tx.borrow_mut(), out, eof) {
                Flow::Continue => {}
                Flow::Metadata => match closing {
                    None => {
                        out.error(&ctx.live, "metadata_before_close");
                        return End::Over;
                    }
                    Some(at) => {
                        out.close_us = Some(at.elapsed().as_micros() as u64);
                        out.held = out.errors.is_empty();
                    }
                },
                Flow::Closed(kind) => {
                    if closing.is_none() {
                        return End::Lost(kind);
                    } else if out.last_metadata.is_none() {
                        out.held = false;
                        return End::Lost(format!("{kind}_before_metadata"));
                    } else if kind != "closed_1000" && kind != "eof" {
                        out.error(&ctx.live, format!("{kind}_after_metadata"));
                    }
                    return End::Over;
                }
            }
        }
        let (closing, stopped) = {
            let t = tx.borrow();
            (t.closing_at, t.stopped)
        };
        if let Some(why) = stopped {
            return End::Lost(why.into());
        }
        let deadline = match closing {
            Some(at) => (at + ctx.close_timeout).min(bound),
            None => bound,
        };
        buf.reserve(READ_CHUNK);
        tokio::select! {
            got = read.read_buf(&mut buf) => match got {
                Ok(0) => eof = true,
                Ok(_) => {}
                Err(_) => return End::Lost("read_failed".into()),
            },
            () = wake.notified() => {}
            () = tokio::time::sleep_until(deadline) => {
                let kind = match closing {
                    None => "session_timeout",
                    Some(_) if out.last_metadata.is_some() => "close_timeout",
                    Some(_) => "metadata_timeout",
                };
                out.error(&ctx.live, kind);
                return End::Over;
            }
        }
    }
}

fn on_message(
    ctx: &RealtimeCtx,
    msg: ServerMsg,
    tx: &mut StreamTx,
    out: &mut StreamOutcome,
    eof: bool,
) -> Flow {
    let received = Instant::now();
    let text = match msg {
        ServerMsg::Close(0) if eof => return Flow::Closed("eof".into()),
        ServerMsg::Close(code) => return Flow::Closed(format!("closed_{code}")),
        ServerMsg::Ping(payload) => {
            tx.pong(&payload);
            return Flow::Continue;
        }
        ServerMsg::Pong | ServerMsg::Binary => return Flow::Continue,
        ServerMsg::Text(t) => t,
    };
    if text == b"ping" {
        return Flow::Continue;
    }
    if text.first() == Some(&b'[') {
        // Transcript segments (docs/protocol.md): an array, no `type`, no `frames_received`.
        match serde_json::from_slice::<Vec<serde::de::IgnoredAny>>(&text) {
            Ok(segments) => {
                out.transcript_messages += 1;
                out.transcript_segments += segments.len() as u64;
            }
            Err(_) => out.error(&ctx.live, "unparsable_transcript"),
        }
        return Flow::Continue;
    }
    let Ok(event) = serde_json::from_slice::<Event>(&text) else {
        out.error(&ctx.live, "unparsable_event");
        return Flow::Continue;
    };
    out.events += 1;
    ctx.live.events.fetch_add(1, Relaxed);
    // Counted per session: a reconnected stream's new session starts at frame `tx.base`.
    let frames = event.frames_received.unwrap_or(0);
    if frames > tx.sent - tx.base {
        out.error(&ctx.live, "event_ahead_of_frames_sent");
    }
    match event.kind {
        "metadata" => {
            let metadata = Metadata {
                frames_received: frames,
                frames_dropped: event.frames_dropped.unwrap_or(0),
                audio_ms: event.audio_ms.unwrap_or(0),
                speech_ms: event.speech_ms.and_then(|v| v.as_u64()).unwrap_or(0),
                stt_forwarded_ms: event.stt_forwarded_ms.unwrap_or(0),
            };
            out.last_metadata = Some((metadata, received));
            return Flow::Metadata;
        }
        "frames_dropped" => {
            out.dropped_events += event.frames_dropped.unwrap_or(0);
            out.error(&ctx.live, "server_frames_dropped");
        }
        _ => {}
    }
    if (1..=tx.sent - tx.base).contains(&frames) {
        let sent = tx.sent_at(tx.base + frames - 1);
        let lat_us = received.saturating_duration_since(sent).as_micros() as u64;
        if let Some(limit) = slow_trace_us()
            && lat_us >= limit
        {
            eprintln!(
                "slow_event at={:.3} user={} kind={} frames={} sent={} latency_ms={:.1}",
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64()),
                out.user,
                event.kind,
                frames,
                tx.sent,
                lat_us as f64 / 1000.0
            );
        }
        out.latencies_us.push(lat_us);
        out.latency_kinds.push(kind_index(event.kind));
    }
    Flow::Continue
}

/// `VOICEGATE_LOADTEST_TRACE_SLOW_MS`: print every event at least this late to stderr (diagnosis).
fn slow_trace_us() -> Option<u64> {
    static LIMIT: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *LIMIT.get_or_init(|| {
        std::env::var("VOICEGATE_LOADTEST_TRACE_SLOW_MS")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .map(|ms| ms * 1000)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_documented_event_parses() {
        let usage = r#"{"type":"usage","frames_received":1,"session_speech_ms":2,"speech_ms":{"daily_ms":3,"three_day_ms":4,"weekly_ms":5,"month_ms":6},"stage":"warning"}"#;
        let e: Event = serde_json::from_str(usage).unwrap();
        assert_eq!((e.kind, e.frames_received), ("usage", Some(1)));
        let meta = r#"{"type":"metadata","frames_received":9,"frames_dropped":1,"audio_ms":90,"speech_ms":40,"stt_forwarded_ms":40}"#;
        let e: Event = serde_json::from_str(meta).unwrap();
        assert_eq!(e.speech_ms.and_then(|v| v.as_u64()), Some(40));
        let dropped = r#"{"type":"frames_dropped","frames_received":9,"frames_dropped":3,"reason":"ring_full"}"#;
        let e: Event = serde_json::from_str(dropped).unwrap();
        assert_eq!(e.frames_dropped, Some(3));
    }
}

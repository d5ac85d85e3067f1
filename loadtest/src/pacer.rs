//! The sender of one harness thread: every stream's frames leave on their absolute deadlines
//! (`t0 + n × 10 ms / pace`), from one task that wakes when the earliest deadline is due and writes every
//! frame due by then (~45 per wake-up at 900 streams on two threads), instead of one timer and one task
//! wake-up per frame. A late wake-up never shifts later frames: a stream catches up instead of drifting.
//! Writes never wait: what the socket does not take now is kept (bounded) and written with the next frame.

use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::auth::Authenticator;
use crate::corpus::Corpus;
use crate::live::Live;
use crate::wsframe::{OP_BINARY, OP_PONG, OP_TEXT, Target, encode};

/// What every stream shares.
pub struct RealtimeCtx {
    pub corpus: Arc<Corpus>,
    /// One per node; stream i connects to `targets[i % len]` (never empty).
    pub targets: Vec<Target>,
    /// Stream i belongs to user i / this.
    pub streams_per_user: usize,
    pub auth: Authenticator,
    pub pace: f64,
    pub frames_per_stream: u64,
    pub keepalive: Duration,
    pub close_timeout: Duration,
    /// `--survive-node-loss`: a broken connection is replaced, the stream goes on.
    pub survive_node_loss: bool,
    /// `--retry-refused`: how long after its first attempt a stream refused 503 keeps trying.
    pub retry_refused: Option<Duration>,
    pub live: Arc<Live>,
}

/// Send times kept per stream (20 s at real time); older frames fall back to their deadline.
pub const SEND_RING: usize = 2048;
/// Output a socket has not taken past which the stream fails (`send_backlog`): the server stopped reading.
const MAX_PENDING: usize = 256 * 1024;
/// Frames sent per stream per wake-up at most (a stalled harness catches up over several).
const MAX_CATCH_UP: u64 = 200;
/// How soon output left over after `CloseStream` (or a stream still catching up) is tried again.
const RETRY: Duration = Duration::from_millis(5);
/// Frames counted locally before the shared counter is bumped (keeps atomics off the per-frame path).
const LIVE_BATCH: u64 = 100;

/// One stream's sending side, shared with its reader (same thread).
pub struct StreamTx {
    write: OwnedWriteHalf,
    pending: Vec<u8>,
    mask: u32,
    pub start_clip: usize,
    pub t0: Instant,
    pub interval_ns: u64,
    /// Frames the stream sent so far, over all its connections.
    pub sent: u64,
    /// The stream's frame index of this connection's first frame (its session counts from here).
    pub base: u64,
    /// Send time of frame `i` (µs after `t0`) at `ring[i % SEND_RING]`.
    pub ring: Box<[u64]>,
    next_keepalive: Instant,
    unreported: u64,
    /// When `CloseStream` was queued.
    pub closing_at: Option<Instant>,
    /// Why sending stopped early (`send_failed`, `send_backlog`), or the reader is done with the stream.
    pub stopped: Option<&'static str>,
    /// Wakes the reader when `CloseStream` is queued or sending stops.
    pub wake: Rc<Notify>,
}

impl StreamTx {
    pub fn new(write: OwnedWriteHalf, start_clip: usize, seed: u32, ctx: &RealtimeCtx) -> Self {
        let t0 = Instant::now();
        StreamTx {
            write,
            pending: Vec::with_capacity(256),
            mask: seed | 1,
            start_clip,
            t0,
            interval_ns: (crate::corpus::FRAME_MS as f64 * 1e6 / ctx.pace)
                .round()
                .max(1.0) as u64,
            sent: 0,
            base: 0,
            ring: vec![0u64; SEND_RING].into_boxed_slice(),
            next_keepalive: t0 + ctx.keepalive,
            unreported: 0,
            closing_at: None,
            stopped: None,
            wake: Rc::new(Notify::new()),
        }
    }

    /// The sending side of the stream's next connection, after this one broke: the same schedule (frames
    /// that fell due during the outage leave at once, as a device sends what it buffered), from the frame
    /// that was next.
    pub fn reconnected(&self, write: OwnedWriteHalf) -> Self {
        StreamTx {
            write,
            pending: Vec::with_capacity(256),
            mask: self.mask,
            start_clip: self.start_clip,
            t0: self.t0,
            interval_ns: self.interval_ns,
            sent: self.sent,
            base: self.sent,
            ring: self.ring.clone(),
            next_keepalive: self.next_keepalive,
            unreported: 0,
            closing_at: None,
            stopped: None,
            wake: Rc::new(Notify::new()),
        }
    }

    /// When frame `frame_index` left (its deadline when the ring no longer holds it).
    pub fn sent_at(&self, frame_index: u64) -> Instant {
        self.t0
            + Duration::from_micros(send_offset_us(
                &self.ring,
                self.sent,
                self.interval_ns,
                frame_index,
            ))
    }

    fn deadline(&self, frame: u64) -> Instant {
        self.t0 + Duration::from_nanos(frame.saturating_mul(self.interval_ns))
    }

    fn next_mask(&mut self) -> [u8; 4] {
        // xorshift32: a fresh key per frame, no system randomness on the hot path.
        self.mask ^= self.mask << 13;
        self.mask ^= self.mask >> 17;
        self.mask ^= self.mask << 5;
        self.mask.to_be_bytes()
    }

    /// Queues one frame and writes what the socket takes now.
    pub fn send(&mut self, opcode: u8, payload: &[u8]) {
        let mask = self.next_mask();
        encode(&mut self.pending, opcode, payload, mask);
        self.flush();
    }

    /// Answers a server ping.
    pub fn pong(&mut self, payload: &[u8]) {
        self.send(OP_PONG, payload);
    }

    fn flush(&mut self) {
        while !self.pending.is_empty() && self.stopped.is_none() {
            match self.write.try_write(&self.pending) {
                Ok(0) => self.stop("send_failed"),
                Ok(n) => {
                    self.pending.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => self.stop("send_failed"),
            }
        }
        if self.pending.len() > MAX_PENDING {
            self.stop("send_backlog");
        }
    }

    pub fn stop(&mut self, why: &'static str) {
        if self.stopped.is_none() {
            self.stopped = Some(why);
            self.pending = Vec::new();
            self.wake.notify_one();
        }
    }

    /// Frames not yet added to the shared counter.
    pub fn take_unreported(&mut self) -> u64 {
        std::mem::take(&mut self.unreported)
    }

    /// Sends every frame due by `now` (and the keepalive, and `CloseStream` after the last frame).
    /// Returns when to come back, or `None` when the stream needs the sender no more.
    fn send_due(&mut self, ctx: &RealtimeCtx, now: Instant) -> Option<Instant> {
        if self.stopped.is_some() {
            return None;
        }
        if self.closing_at.is_some() {
            // Only leftover output of the close is still going out.
            self.flush();
            return (!self.pending.is_empty() && self.stopped.is_none()).then_some(now + RETRY);
        }
        let mut n = 0;
        while self.sent < ctx.frames_per_stream
            && self.deadline(self.sent) <= now
            && n < MAX_CATCH_UP
        {
            let frame = ctx.corpus.frame(self.start_clip, self.sent).clone();
            let mask = self.next_mask();
            encode(&mut self.pending, OP_BINARY, &frame, mask);
            self.ring[(self.sent % SEND_RING as u64) as usize] =
                now.saturating_duration_since(self.t0).as_micros() as u64;
            self.sent += 1;
            self.unreported += 1;
            n += 1;
        }
        if self.unreported >= LIVE_BATCH {
            ctx.live
                .frames_sent
                .fetch_add(self.take_unreported(), Relaxed);
        }
        if now >= self.next_keepalive {
            self.next_keepalive += ctx.keepalive;
            let mask = self.next_mask();
            encode(&mut self.pending, OP_TEXT, br#"{"type":"KeepAlive"}"#, mask);
        }
        if self.sent >= ctx.frames_per_stream {
            let mask = self.next_mask();
            encode(
                &mut self.pending,
                OP_TEXT,
                br#"{"type":"CloseStream"}"#,
                mask,
            );
            self.closing_at = Some(now);
            self.wake.notify_one();
            self.flush();
            return (!self.pending.is_empty() && self.stopped.is_none()).then_some(now + RETRY);
        }
        self.flush();
        if self.stopped.is_some() {
            return None;
        }
        if n == MAX_CATCH_UP {
            // Still behind: come back after every other stream due now had its turn.
            return Some(now + RETRY);
        }
        Some(self.deadline(self.sent))
    }
}

/// When frame `frame_index` left, in µs after the stream's start: from the ring while it still holds the
/// frame (`sent` frames went out so far), else the frame's deadline.
fn send_offset_us(ring: &[u64], sent: u64, interval_ns: u64, frame_index: u64) -> u64 {
    if sent - frame_index <= ring.len() as u64 {
        ring[(frame_index % ring.len() as u64) as usize]
    } else {
        frame_index * interval_ns / 1_000
    }
}

/// The sender of one thread's streams.
#[derive(Default)]
pub struct Pacer {
    due: RefCell<BinaryHeap<Reverse<(Instant, usize)>>>,
    streams: RefCell<Vec<Option<Rc<RefCell<StreamTx>>>>>,
    added: Notify,
}

impl Pacer {
    /// Starts sending for `tx` (its first frame is due at once).
    pub fn add(&self, tx: Rc<RefCell<StreamTx>>) {
        let at = tx.borrow().t0;
        let mut streams = self.streams.borrow_mut();
        let id = match streams.iter().position(Option::is_none) {
            Some(free) => {
                streams[free] = Some(tx);
                free
            }
            None => {
                streams.push(Some(tx));
                streams.len() - 1
            }
        };
        self.due.borrow_mut().push(Reverse((at, id)));
        self.added.notify_one();
    }

    /// Runs until aborted.
    pub async fn run(self: Rc<Self>, ctx: Arc<RealtimeCtx>) {
        loop {
            let next = self.due.borrow().peek().map(|Reverse((at, _))| *at);
            match next {
                None => self.added.notified().await,
                Some(at) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(at) => {}
                        () = self.added.notified() => continue,
                    }
                }
            }
            let now = Instant::now();
            loop {
                let top = {
                    let mut due = self.due.borrow_mut();
                    match due.peek() {
                        Some(Reverse((at, _))) if *at <= now => due.pop(),
                        _ => None,
                    }
                };
                let Some(Reverse((_, id))) = top else { break };
                let tx = self.streams.borrow().get(id).cloned().flatten();
                let Some(tx) = tx else { continue };
                let again = tx.borrow_mut().send_due(&ctx, now);
                match again {
                    Some(at) => self.due.borrow_mut().push(Reverse((at, id))),
                    None => {
                        if let Some(slot) = self.streams.borrow_mut().get_mut(id) {
                            *slot = None;
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_time_comes_from_the_ring_then_from_the_deadline() {
        let mut ring = vec![0u64; SEND_RING];
        ring[2] = 25_000;
        assert_eq!(send_offset_us(&ring, 3, 10_000_000, 2), 25_000);
        assert_eq!(
            send_offset_us(&ring, SEND_RING as u64 + 10, 10_000_000, 2),
            20_000,
            "overwritten in the ring: the deadline"
        );
    }
}

//! The listen websocket, spoken by its session's own pipeline thread once per tick.
//!
//! Every session's websocket runs here, on the pipeline thread of its session, over one of two [`Wire`]s:
//! - the socket itself ([`TcpStream`], non-blocking and registered with no reactor), when the connection
//!   came through the front door ([`super::front`]): the usual path;
//! - two bounded channels to an HTTP worker that moves the bytes of an actix-web upgrade ([`ChannelWire`]),
//!   when the upgrade came on a connection that already carried a request.
//!
//! [`WsConn`] is the session's [`Transport`]: every tick (50 ms) the session polls it before it drains its
//! frame queue: one read brings what the client sent since the last tick (a device: ~5 packets), the frames
//! are decoded (fragments joined, pings answered, text controls parsed) and the audio goes into the frame
//! queue. What the queue
//! cannot take waits in the socket, so a pipeline that falls behind slows its client down (TCP flow
//! control) and loses nothing. Events are written the moment the session produces them; what the wire does
//! not take at once waits (bounded) for the next tick.
//!
//! Why: read on an HTTP worker, each 10 ms packet cost a wake-up, a `read`, an ACK, the h1 dispatcher,
//! actix-ws and a cross-thread queue, about 7.5 µs of CPU (39 % of the server at 600 streams). Read per
//! tick, reads and ACKs come once per ~5 packets and nothing wakes per packet (`docs/performance.md`).

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::Duration;

use actix_codec::{Decoder, Encoder};
use actix_http::ws::{self, Frame, Item, ProtocolError};
use bytes::{Buf, Bytes, BytesMut};
use bytestring::ByteString;
use tokio::sync::mpsc;
use tokio::time::Instant;
use voicegate_engine::pipeline::live::{Control, DropReason, FrameCounts, FrameQueue, Transport};
use voicegate_engine::telemetry as t;

use super::{End, PING_INTERVAL, TextControl, close_message, control_of, declared_frame_len};
use crate::sessions::SessionGuard;

/// Bytes asked of the socket per `read` (a tick of a device's stream is ~0.5 KB).
const READ_CHUNK: usize = 4096;
/// Most bytes read in one tick; the rest waits in the socket.
const READ_BUDGET: usize = 256 * 1024;
/// Output not yet taken by the wire past which the client counts as gone (it stopped reading: ~1,000
/// events).
const MAX_PENDING_OUT: usize = 256 * 1024;
/// Longest websocket frame header (2, then 8 bytes of length, then the 4-byte mask).
const MAX_HEADER: usize = 14;
/// A buffer emptied by its tick keeps at most this much capacity.
const KEEP_CAPACITY: usize = 2048;
/// How long the close frame may take to leave, and then how long the client has to close its side.
const CLOSE_FLUSH: Duration = Duration::from_secs(2);
const CLOSE_LINGER: Duration = Duration::from_secs(1);
const CLOSE_POLL: Duration = Duration::from_millis(20);

/// How a read of the wire ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inflow {
    /// Nothing more for now.
    Open,
    /// The client closed its side (or the wire failed).
    Closed,
}

/// The bytes under a [`WsConn`]: non-blocking both ways.
pub trait Wire {
    /// Appends at most `budget` bytes of what arrived to `buf` (the rest waits).
    fn read_into(&mut self, buf: &mut BytesMut, budget: usize) -> Inflow;
    /// Takes what it can of `buf` now (`WouldBlock` when nothing).
    fn write(&mut self, buf: &[u8]) -> io::Result<usize>;
    /// Ends our side (after the close frame).
    fn shutdown(&mut self);
}

impl Wire for TcpStream {
    fn read_into(&mut self, buf: &mut BytesMut, budget: usize) -> Inflow {
        let mut chunk = [0u8; READ_CHUNK];
        let mut total = 0;
        while total < budget {
            let want = (budget - total).min(READ_CHUNK);
            match Read::read(self, &mut chunk[..want]) {
                Ok(0) => return Inflow::Closed,
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    total += n;
                    // A short read emptied the socket's queue: another read would only say so.
                    if n < want {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Inflow::Closed,
            }
        }
        Inflow::Open
    }

    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Write::write(self, buf)
    }

    fn shutdown(&mut self) {
        let _ = TcpStream::shutdown(self, Shutdown::Write);
    }
}

/// The wire of an upgrade served by actix-web: the HTTP worker sends the request payload's chunks in and
/// streams what comes out as the response body (the route `listen` in [`super`]). Both channels are bounded, so a
/// full one is backpressure, as a full socket is.
pub struct ChannelWire {
    from_client: mpsc::Receiver<Bytes>,
    /// A chunk only partly handed to the connection.
    part: Bytes,
    to_client: Option<mpsc::Sender<Bytes>>,
}

impl ChannelWire {
    pub fn new(from_client: mpsc::Receiver<Bytes>, to_client: mpsc::Sender<Bytes>) -> Self {
        ChannelWire {
            from_client,
            part: Bytes::new(),
            to_client: Some(to_client),
        }
    }
}

impl Wire for ChannelWire {
    fn read_into(&mut self, buf: &mut BytesMut, budget: usize) -> Inflow {
        let mut total = 0;
        while total < budget {
            if self.part.is_empty() {
                match self.from_client.try_recv() {
                    Ok(chunk) => self.part = chunk,
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => return Inflow::Closed,
                }
            }
            let take = self.part.len().min(budget - total);
            buf.extend_from_slice(&self.part.split_to(take));
            total += take;
        }
        Inflow::Open
    }

    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let Some(tx) = &self.to_client else {
            return Err(io::ErrorKind::BrokenPipe.into());
        };
        match tx.try_send(Bytes::copy_from_slice(buf)) {
            Ok(()) => Ok(buf.len()),
            Err(mpsc::error::TrySendError::Full(_)) => Err(io::ErrorKind::WouldBlock.into()),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(io::ErrorKind::BrokenPipe.into()),
        }
    }

    fn shutdown(&mut self) {
        // The response body ends; actix-web then closes the connection.
        self.to_client = None;
    }
}

/// A fragmented message being put together.
struct Partial {
    text: bool,
    data: BytesMut,
}

/// The websocket half of one listen session, owned by the session's pipeline thread.
pub struct WsConn<W: Wire> {
    wire: W,
    rbuf: BytesMut,
    wbuf: BytesMut,
    codec: ws::Codec,
    partial: Option<Partial>,
    max_message: usize,
    counts: FrameCounts,
    /// PCM may be split into several queue records; an Opus packet may not.
    splittable: bool,
    /// A received frame the queue had no room for (pushed first on the next tick).
    held: Option<(u32, Bytes)>,
    seq: u32,
    last_msg: Instant,
    next_ping: Instant,
    idle: Duration,
    guard: Option<SessionGuard>,
    /// Why the session stops, once it does (the wire is not read after that).
    end: Option<End>,
    /// Writing failed or the client stopped reading: events are no longer sent.
    broken: bool,
}

/// What [`WsConn::new`] needs besides the wire.
pub struct ConnParts {
    pub splittable: bool,
    pub max_message: usize,
    pub idle: Duration,
    pub guard: SessionGuard,
}

impl<W: Wire> WsConn<W> {
    /// `leftover` holds bytes read past the upgrade request (the first frames).
    pub fn new(wire: W, leftover: BytesMut, parts: ConnParts) -> Self {
        let now = Instant::now();
        WsConn {
            wire,
            rbuf: leftover,
            wbuf: BytesMut::new(),
            codec: ws::Codec::new().max_size(parts.max_message),
            partial: None,
            max_message: parts.max_message,
            counts: FrameCounts::default(),
            splittable: parts.splittable,
            held: None,
            seq: 0,
            last_msg: now,
            next_ping: now + PING_INTERVAL,
            idle: parts.idle,
            guard: Some(parts.guard),
            end: None,
            broken: false,
        }
    }

    /// Why the session stopped (`None` while it runs or when the pipeline stopped it).
    pub fn end(&self) -> Option<End> {
        self.end
    }

    /// Reads what arrived, queues its audio, answers its control frames, checks the idle timeout, the
    /// drain and the ping timer. Returns [`Control::Stop`] once (the session then processes what the queue
    /// holds and ends), a [`Control::Finalize`] the client asked for, or nothing. (A `Finalize` and a stop
    /// in one tick give the stop: the end of a session flushes the STT stream anyway.)
    pub fn poll_input(&mut self, frames: &mut FrameQueue) -> Option<Control> {
        if self.end.is_some() {
            return None;
        }
        let mut finalize = false;
        if self.push_held(frames) {
            self.read_and_decode(frames, &mut finalize);
        }
        let now = Instant::now();
        if self.end.is_none() {
            if self.guard.as_ref().is_some_and(SessionGuard::is_closing) {
                self.end = Some(End::Drain);
            } else if now.saturating_duration_since(self.last_msg) >= self.idle {
                self.end = Some(End::Idle);
            }
        }
        if self.end.is_none() && now >= self.next_ping {
            self.next_ping = now + PING_INTERVAL;
            self.queue(ws::Message::Text(ByteString::from_static("ping")));
            if self.broken {
                self.end = Some(End::ClientClosed);
            }
        }
        self.flush();
        self.trim();
        if self.end.is_some() {
            Some(Control::Stop)
        } else if finalize {
            Some(Control::Finalize)
        } else {
            None
        }
    }

    /// Reads as much as the frame queue has room for (but always enough to complete the largest allowed
    /// frame, so a frame bigger than the room left can still arrive and wait whole) and decodes it.
    fn read_and_decode(&mut self, frames: &mut FrameQueue, finalize: &mut bool) {
        let budget = frames
            .vacant()
            .min(READ_BUDGET)
            .max(self.max_message + MAX_HEADER)
            .saturating_sub(self.rbuf.len());
        let before = self.rbuf.len();
        let inflow = self.wire.read_into(&mut self.rbuf, budget);
        if self.rbuf.len() > before {
            // Bytes from the client: it is alive, even while the queue holds back their decoding.
            self.last_msg = Instant::now();
        }
        while self.end.is_none() && self.held.is_none() {
            match self.codec.decode(&mut self.rbuf) {
                Ok(Some(frame)) => self.on_frame(frames, frame, finalize),
                Ok(None) => {
                    // The codec waits for a whole frame before it checks its size: refuse one declared
                    // over the limit now, instead of buffering it.
                    if declared_frame_len(&self.rbuf).is_some_and(|n| n > self.max_message as u64) {
                        self.end = Some(End::TooLarge);
                    }
                    break;
                }
                Err(e) => self.end = Some(protocol_end(&e)),
            }
        }
        if self.end.is_none() && inflow == Inflow::Closed && self.held.is_none() {
            self.end = Some(End::ClientClosed);
        }
    }

    /// Pushes the frame held back on an earlier tick; false while the queue still has no room for it.
    fn push_held(&mut self, frames: &mut FrameQueue) -> bool {
        let Some((seq, bytes)) = self.held.take() else {
            return true;
        };
        self.push(frames, seq, bytes)
    }

    /// Queues one frame; keeps it (returns false) while the queue is full. Dropped (and counted) only when
    /// it could never fit: an Opus packet over the record limit, or a frame larger than the whole queue.
    fn push(&mut self, frames: &mut FrameQueue, seq: u32, bytes: Bytes) -> bool {
        match frames.push(seq, &bytes, self.splittable) {
            Ok(()) => true,
            Err(DropReason::RingFull) if frames.fits(bytes.len()) => {
                self.held = Some((seq, bytes));
                false
            }
            Err(reason) => {
                match reason {
                    DropReason::RingFull => self.counts.dropped_ring_full += 1,
                    DropReason::TooLarge => self.counts.dropped_too_large += 1,
                }
                metrics::counter!(t::LISTEN_FRAMES_DROPPED_TOTAL, "reason" => reason.as_str())
                    .increment(1);
                true
            }
        }
    }

    fn on_frame(&mut self, frames: &mut FrameQueue, frame: Frame, finalize: &mut bool) {
        match frame {
            Frame::Binary(bytes) => self.on_binary(frames, bytes),
            Frame::Text(bytes) => self.on_text(&bytes, finalize),
            Frame::Continuation(item) => self.on_continuation(frames, item, finalize),
            Frame::Ping(bytes) => {
                self.last_msg = Instant::now();
                self.queue(ws::Message::Pong(bytes));
            }
            Frame::Pong(_) => self.last_msg = Instant::now(),
            Frame::Close(_) => self.end = Some(End::ClientClosed),
        }
    }

    fn on_binary(&mut self, frames: &mut FrameQueue, bytes: Bytes) {
        self.last_msg = Instant::now();
        self.seq = self.seq.wrapping_add(1);
        self.counts.received = u64::from(self.seq);
        if bytes.len() <= 2 {
            return; // keepalive
        }
        self.push(frames, self.seq, bytes);
    }

    fn on_text(&mut self, bytes: &[u8], finalize: &mut bool) {
        self.last_msg = Instant::now();
        let Ok(text) = std::str::from_utf8(bytes) else {
            // Invalid UTF-8 in a text message breaks the protocol.
            self.end = Some(End::Protocol);
            return;
        };
        match control_of(text) {
            Ok(TextControl::KeepAlive) => {}
            Ok(TextControl::Finalize) => *finalize = true,
            Ok(TextControl::CloseStream) => self.end = Some(End::CloseStream),
            Err(reason) => {
                metrics::counter!(t::LISTEN_TEXT_IGNORED_TOTAL, "reason" => reason).increment(1);
            }
        }
    }

    fn on_continuation(&mut self, frames: &mut FrameQueue, item: Item, finalize: &mut bool) {
        // The codec refuses a continuation that was not started, or a new message inside one.
        let (first, last, bytes) = match item {
            Item::FirstText(b) => (Some(true), false, b),
            Item::FirstBinary(b) => (Some(false), false, b),
            Item::Continue(b) => (None, false, b),
            Item::Last(b) => (None, true, b),
        };
        if let Some(text) = first {
            self.partial = Some(Partial {
                text,
                data: BytesMut::new(),
            });
        }
        let Some(partial) = self.partial.as_mut() else {
            self.end = Some(End::Protocol);
            return;
        };
        if partial.data.len() + bytes.len() > self.max_message {
            self.end = Some(End::TooLarge);
            return;
        }
        partial.data.extend_from_slice(&bytes);
        if last && let Some(whole) = self.partial.take() {
            if whole.text {
                self.on_text(&whole.data, finalize);
            } else {
                self.on_binary(frames, whole.data.freeze());
            }
        }
    }

    /// Queues one message and writes what the wire takes now.
    fn queue(&mut self, msg: ws::Message) {
        if self.broken {
            return;
        }
        if self.codec.encode(msg, &mut self.wbuf).is_err() {
            // Only a message over the codec's size limit fails; the server never sends one.
            return;
        }
        self.flush();
        if self.wbuf.len() > MAX_PENDING_OUT {
            self.broken = true;
            self.wbuf = BytesMut::new();
        }
    }

    /// Sends one event; false once the client is gone or stopped reading.
    pub fn send_text(&mut self, text: String) -> bool {
        self.queue(ws::Message::Text(ByteString::from(text)));
        !self.broken
    }

    fn flush(&mut self) {
        while !self.wbuf.is_empty() && !self.broken {
            match self.wire.write(&self.wbuf) {
                Ok(0) => self.broken = true,
                Ok(n) => self.wbuf.advance(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => self.broken = true,
            }
        }
        if self.broken {
            self.wbuf = BytesMut::new();
        }
    }

    /// Hands back the capacity a burst grew the buffers to.
    fn trim(&mut self) {
        if self.rbuf.is_empty() && self.rbuf.capacity() > KEEP_CAPACITY {
            self.rbuf = BytesMut::new();
        }
        if self.wbuf.is_empty() && self.wbuf.capacity() > KEEP_CAPACITY {
            self.wbuf = BytesMut::new();
        }
    }

    /// Sends the close frame, waits (bounded) for it to leave, gives the session slot back (the session
    /// has metered everything it reported), ends our side, and lets the client close its own: reading to
    /// its end means the kernel never answers unread data with a reset, which could discard the close (and
    /// the `metadata` before it) on the client's side.
    pub async fn close(mut self, code: ws::CloseCode, description: Option<String>) {
        self.queue(close_message(code, description));
        let deadline = Instant::now() + CLOSE_FLUSH;
        while !self.wbuf.is_empty() && !self.broken && Instant::now() < deadline {
            tokio::time::sleep(CLOSE_POLL).await;
            self.flush();
        }
        // The drain may now flush the meter; the per-user slot is free for a reconnect.
        drop(self.guard.take());
        self.wire.shutdown();
        let deadline = Instant::now() + CLOSE_LINGER;
        while Instant::now() < deadline {
            self.rbuf.clear();
            if self.wire.read_into(&mut self.rbuf, READ_CHUNK) == Inflow::Closed {
                break;
            }
            if self.rbuf.is_empty() {
                tokio::time::sleep(CLOSE_POLL).await;
            }
        }
    }
}

impl<W: Wire> Transport for WsConn<W> {
    fn poll(&mut self, frames: &mut FrameQueue) -> Option<Control> {
        self.poll_input(frames)
    }

    fn send(&mut self, text: String) -> bool {
        self.send_text(text)
    }

    fn counts(&self) -> FrameCounts {
        self.counts
    }

    fn draining(&self) -> bool {
        self.guard.as_ref().is_some_and(SessionGuard::is_closing)
    }
}

/// A websocket protocol error as the way the session ends.
fn protocol_end(e: &ProtocolError) -> End {
    match e {
        ProtocolError::Overflow => End::TooLarge,
        _ => End::Protocol,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sessions::SessionRegistry;
    use std::net::TcpListener;

    const MAX: usize = 8192;

    /// A connected pair: the server end in a [`WsConn`], the client end as a plain blocking socket.
    fn pair(idle: Duration) -> (WsConn<TcpStream>, FrameQueue, TcpStream) {
        pair_with(idle, 16 * 1024)
    }

    fn pair_with(idle: Duration, queue: usize) -> (WsConn<TcpStream>, FrameQueue, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let frames = FrameQueue::new(queue);
        // Without leases the admission never waits.
        let guard = futures_util::FutureExt::now_or_never(SessionRegistry::new(4, 100).open("u"))
            .unwrap()
            .unwrap();
        let conn = WsConn::new(
            server,
            BytesMut::new(),
            ConnParts {
                splittable: false,
                max_message: MAX,
                idle,
                guard,
            },
        );
        (conn, frames, client)
    }

    /// A masked client frame.
    fn frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mask = [1u8, 2, 3, 4];
        let mut f = vec![if fin { 0x80 } else { 0 } | opcode];
        if payload.len() < 126 {
            f.push(0x80 | payload.len() as u8);
        } else {
            f.push(0x80 | 126);
            f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        }
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        f
    }

    /// Writes `frames` and waits until all of their bytes are readable on the server end.
    fn send(conn: &WsConn<TcpStream>, client: &mut TcpStream, frames: &[Vec<u8>]) {
        let bytes = frames.concat();
        client.write_all(&bytes).unwrap();
        wait_readable(&conn.wire, bytes.len());
    }

    /// Waits (on the socket's state, not a timer) until `want` bytes are queued on `socket`, or, with
    /// `want == 0`, until it reads as ended. Loopback usually delivers within the write call, so this
    /// rarely loops; the deadline only turns a bug into a failure instead of a hang.
    fn wait_readable(socket: &TcpStream, want: usize) {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut buf = vec![0u8; want.max(1)];
        loop {
            match socket.peek(&mut buf) {
                Ok(n) if n >= want => return,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("peek: {e}"),
            }
            assert!(Instant::now() < deadline, "{want} bytes never arrived");
            std::thread::yield_now();
        }
    }

    fn queued(consumer: &mut FrameQueue) -> Vec<(u32, Vec<u8>)> {
        let mut out = Vec::new();
        let mut buf = Vec::new();
        while let Some(seq) = consumer.pop(&mut buf) {
            out.push((seq, buf.clone()));
        }
        out
    }

    const IDLE: Duration = Duration::from_secs(60);

    #[test]
    fn frames_fragments_and_keepalives_reach_the_queue_in_order() {
        let (mut conn, mut q, mut client) = pair(IDLE);
        send(
            &conn,
            &mut client,
            &[
                frame(0x2, true, &[10, 11, 12]),
                frame(0x2, true, &[0]),
                frame(0x2, false, &[20, 21]),
                frame(0x9, true, b"p"),
                frame(0x0, false, &[22]),
                frame(0x0, true, &[23, 24]),
            ],
        );
        assert_eq!(conn.poll_input(&mut q), None);
        assert_eq!(
            queued(&mut q),
            vec![(1, vec![10, 11, 12]), (3, vec![20, 21, 22, 23, 24])],
            "the keepalive is counted (seq 2), not queued; fragments make one frame"
        );
        assert_eq!(conn.counts().received, 3);
        // The ping in the middle of the fragments was answered.
        let mut pong = [0u8; 3];
        client.read_exact(&mut pong).unwrap();
        assert_eq!(pong, [0x8A, 1, b'p']);
    }

    #[test]
    fn close_stream_stops_and_nothing_after_it_is_queued() {
        let (mut conn, mut q, mut client) = pair(IDLE);
        send(
            &conn,
            &mut client,
            &[
                frame(0x2, true, &[1, 2, 3]),
                frame(0x1, true, br#"{"type":"CloseStream"}"#),
                frame(0x2, true, &[4, 5, 6]),
            ],
        );
        assert_eq!(conn.poll_input(&mut q), Some(Control::Stop));
        assert_eq!(conn.end(), Some(End::CloseStream));
        assert_eq!(queued(&mut q), vec![(1, vec![1, 2, 3])]);
        assert_eq!(conn.poll_input(&mut q), None, "Stop is returned once");
    }

    #[test]
    fn finalize_is_returned_and_garbage_text_is_ignored() {
        let (mut conn, mut q, mut client) = pair(IDLE);
        send(
            &conn,
            &mut client,
            &[
                frame(0x1, true, b"hello"),
                frame(0x1, true, br#"{"type":"KeepAlive"}"#),
                frame(0x1, true, br#"{"type":"Finalize"}"#),
            ],
        );
        assert_eq!(conn.poll_input(&mut q), Some(Control::Finalize));
        assert_eq!(conn.end(), None);
    }

    #[test]
    fn protocol_breaks_end_the_session_with_their_reason() {
        let cases: Vec<(Vec<u8>, End)> = vec![
            // Unmasked client frame.
            (vec![0x82, 1, 7], End::Protocol),
            // Text that is not UTF-8.
            (frame(0x1, true, &[0xff, 0xfe]), End::Protocol),
            // A continuation nobody started.
            (frame(0x0, true, &[1]), End::Protocol),
            // One frame over the message limit.
            (frame(0x2, true, &vec![0u8; MAX + 1]), End::TooLarge),
            // Fragments adding up to more than the limit.
            (
                [
                    frame(0x2, false, &vec![0u8; MAX / 2 + 1]),
                    frame(0x0, true, &vec![0u8; MAX / 2 + 1]),
                ]
                .concat(),
                End::TooLarge,
            ),
            // A client close frame.
            (frame(0x8, true, &1000u16.to_be_bytes()), End::ClientClosed),
        ];
        for (bytes, end) in cases {
            let (mut conn, mut q, mut client) = pair(IDLE);
            send(&conn, &mut client, &[bytes]);
            assert_eq!(conn.poll_input(&mut q), Some(Control::Stop), "{end:?}");
            assert_eq!(conn.end(), Some(end));
        }
    }

    #[test]
    fn the_clients_end_and_the_idle_timeout_stop_the_session() {
        let (mut conn, mut q, client) = pair(IDLE);
        drop(client);
        wait_readable(&conn.wire, 0);
        assert_eq!(conn.poll_input(&mut q), Some(Control::Stop));
        assert_eq!(conn.end(), Some(End::ClientClosed));

        let (mut conn, mut q, _client) = pair(Duration::ZERO);
        assert_eq!(conn.poll_input(&mut q), Some(Control::Stop));
        assert_eq!(conn.end(), Some(End::Idle));
    }

    #[test]
    fn a_full_queue_holds_frames_back_in_the_socket_and_loses_none() {
        // Room for one 4 KB frame at a time.
        let (mut conn, mut q, mut client) = pair_with(IDLE, 4102);
        let frames: Vec<Vec<u8>> = (0..5u8).map(|i| frame(0x2, true, &vec![i; 4000])).collect();
        send(&conn, &mut client, &frames);
        let mut got = Vec::new();
        for _ in 0..10 {
            assert_eq!(conn.poll_input(&mut q), None);
            got.extend(queued(&mut q).into_iter().map(|(seq, b)| (seq, b[0])));
        }
        assert_eq!(
            got,
            (1..=5u32).map(|s| (s, (s - 1) as u8)).collect::<Vec<_>>()
        );
        assert_eq!(conn.counts().dropped_ring_full, 0);
    }

    #[test]
    fn a_frame_larger_than_the_whole_queue_is_dropped_and_counted() {
        let (mut conn, mut q, mut client) = pair_with(IDLE, 4102);
        let mut c = conn;
        c.splittable = true;
        conn = c;
        send(
            &conn,
            &mut client,
            &[frame(0x2, true, &vec![1; 5000]), frame(0x2, true, &[2; 10])],
        );
        assert_eq!(conn.poll_input(&mut q), None);
        assert_eq!(queued(&mut q), vec![(2, vec![2; 10])]);
        assert_eq!(conn.counts().dropped_ring_full, 1);
    }

    #[test]
    fn a_frame_declared_over_the_limit_ends_the_session_before_it_arrives() {
        let (mut conn, mut q, mut client) = pair(IDLE);
        let mut header = vec![0x82, 0x80 | 127];
        header.extend_from_slice(&(1u64 << 40).to_be_bytes());
        header.extend_from_slice(&[0, 0, 0, 0, 1, 2, 3]);
        send(&conn, &mut client, &[header]);
        assert_eq!(conn.poll_input(&mut q), Some(Control::Stop));
        assert_eq!(conn.end(), Some(End::TooLarge));
    }

    #[test]
    fn the_channel_wire_carries_both_ways_and_ends() {
        let (in_tx, in_rx) = mpsc::channel(4);
        let (out_tx, mut out_rx) = mpsc::channel(1);
        let mut wire = ChannelWire::new(in_rx, out_tx);
        in_tx.try_send(Bytes::from_static(b"abcdef")).unwrap();
        let mut buf = BytesMut::new();
        assert_eq!(wire.read_into(&mut buf, 4), Inflow::Open);
        assert_eq!(&buf[..], b"abcd", "the budget holds the rest back");
        assert_eq!(wire.read_into(&mut buf, 100), Inflow::Open);
        assert_eq!(&buf[..], b"abcdef");
        assert_eq!(wire.write(b"xy").unwrap(), 2);
        assert_eq!(
            wire.write(b"z").unwrap_err().kind(),
            io::ErrorKind::WouldBlock,
            "a full channel is backpressure"
        );
        assert_eq!(out_rx.try_recv().unwrap(), Bytes::from_static(b"xy"));
        drop(in_tx);
        assert_eq!(wire.read_into(&mut buf, 100), Inflow::Closed);
        wire.shutdown();
        assert!(wire.write(b"z").is_err());
    }

    #[tokio::test]
    async fn events_then_the_close_frame_reach_the_client() {
        let (mut conn, _, mut client) = pair(IDLE);
        assert!(conn.send_text("{\"type\":\"x\"}".to_owned()));
        conn.close(ws::CloseCode::Away, Some("idle timeout".to_owned()))
            .await;
        let mut got = Vec::new();
        client.read_to_end(&mut got).unwrap();
        let mut want = vec![0x81, 12];
        want.extend_from_slice(b"{\"type\":\"x\"}");
        want.extend_from_slice(&[0x88, 14, 0x03, 0xE9]);
        want.extend_from_slice(b"idle timeout");
        assert_eq!(got, want);
    }
}

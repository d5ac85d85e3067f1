//! The bounded byte queue between a session's websocket reader (producer) and its pipeline task (consumer).
//! Both run on the session's pipeline thread today (the pipeline thread reads the socket itself, see
//! `server/src/listen/conn.rs`); the queue still bounds the bytes read ahead of the decoder.
//!
//! Records are `[u16 LE length][u32 LE frame sequence][payload]`. A frame that does not fit under the
//! byte bound is dropped whole and the caller counts it with its reason. PCM frames larger than
//! [`MAX_RECORD`] are split into several records (PCM is a byte stream); an Opus packet cannot be split,
//! so a larger one is dropped as `too_large`.
//!
//! Memory follows the backlog, not the bound: a fixed ring of the bound (2 s of Opus = 18 KB) was the
//! largest allocation of an idle-ish stream, while a pipeline thread that drains every 50 ms leaves
//! ~5 frames (~250 bytes) queued. The queue grows by doubling while a backlog builds (never past twice
//! the bound: the bound is checked before every write), and hands its capacity back once drained. Both
//! ends take a mutex for one copy: the producer writes once per frame (100 times a second), the consumer
//! once per record on its tick, so the lock is uncontended in practice.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// Largest payload of one record (also the largest accepted Opus packet: `MAX_OPUS_RECORD`).
pub const MAX_RECORD: usize = crate::audio::container::MAX_OPUS_RECORD;
const HEADER: usize = 6;
/// A drained queue keeps at most this much capacity (a steady stream's few frames fit).
const KEEP_CAPACITY: usize = 1024;

/// Why a frame was dropped at the ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// The pipeline fell behind and the ring is full.
    RingFull,
    /// An Opus packet over [`MAX_RECORD`] bytes.
    TooLarge,
}

impl DropReason {
    /// The metric `reason` label and the `frames_dropped` event's reason.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::RingFull => "ring_full",
            DropReason::TooLarge => "too_large",
        }
    }
}

struct Shared {
    bytes: Mutex<VecDeque<u8>>,
    /// Most bytes queued at once.
    bound: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, VecDeque<u8>> {
        // Every write under the lock is a plain copy of already-validated bytes that cannot panic
        // half-way (allocation failure aborts), so a poisoned lock still guards whole records.
        self.bytes.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A queue of at most `capacity` bytes, split into its two ends.
pub fn frame_ring(capacity: usize) -> (FrameProducer, FrameConsumer) {
    let shared = Arc::new(Shared {
        bytes: Mutex::new(VecDeque::new()),
        bound: capacity.max(HEADER + MAX_RECORD),
    });
    (
        FrameProducer {
            shared: Arc::clone(&shared),
        },
        FrameConsumer { shared },
    )
}

/// The websocket side.
pub struct FrameProducer {
    shared: Arc<Shared>,
}

impl FrameProducer {
    /// Writes one frame (split into records when `splittable`), or nothing at all.
    pub fn push(&mut self, seq: u32, payload: &[u8], splittable: bool) -> Result<(), DropReason> {
        if !splittable && payload.len() > MAX_RECORD {
            return Err(DropReason::TooLarge);
        }
        let records = payload.len().div_ceil(MAX_RECORD).max(1);
        let mut q = self.shared.lock();
        if self.shared.bound.saturating_sub(q.len()) < payload.len() + records * HEADER {
            return Err(DropReason::RingFull);
        }
        let empty: &[&[u8]] = &[&[]];
        let chunks = payload.chunks(MAX_RECORD);
        let chunks = chunks.chain(empty.iter().copied().take(usize::from(payload.is_empty())));
        for chunk in chunks {
            // MAX_RECORD fits in u16 (checked at compile time below).
            let len = chunk.len() as u16;
            q.extend(len.to_le_bytes());
            q.extend(seq.to_le_bytes());
            q.extend(chunk);
        }
        Ok(())
    }

    /// Whether a frame of `len` bytes fits in the queue at all (when it is empty).
    pub fn fits(&self, len: usize) -> bool {
        len + len.div_ceil(MAX_RECORD).max(1) * HEADER <= self.shared.bound
    }

    /// Bytes free under the bound.
    pub fn vacant(&self) -> usize {
        self.shared.bound.saturating_sub(self.shared.lock().len())
    }
}

const _: () = assert!(MAX_RECORD <= u16::MAX as usize);

/// The pipeline side.
pub struct FrameConsumer {
    shared: Arc<Shared>,
}

impl FrameConsumer {
    /// Pops the next record into `buf` (cleared first) and returns its frame sequence.
    pub fn pop(&mut self, buf: &mut Vec<u8>) -> Option<u32> {
        let mut q = self.shared.lock();
        if q.len() < HEADER {
            return None;
        }
        let mut header = [0u8; HEADER];
        for (h, b) in header.iter_mut().zip(q.iter()) {
            *h = *b;
        }
        let len = usize::from(u16::from_le_bytes([header[0], header[1]]));
        // Records are written whole under the lock, so a header is always followed by its payload.
        let len = len.min(q.len() - HEADER);
        buf.clear();
        buf.extend(q.range(HEADER..HEADER + len));
        q.drain(..HEADER + len);
        if q.is_empty() && q.capacity() > KEEP_CAPACITY {
            q.shrink_to(KEEP_CAPACITY);
        }
        Some(u32::from_le_bytes([
            header[2], header[3], header[4], header[5],
        ]))
    }

    /// Bytes waiting.
    pub fn occupied(&self) -> usize {
        self.shared.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_come_out_in_order_with_their_sequence() {
        let (mut p, mut c) = frame_ring(64 * 1024);
        let mut buf = Vec::new();
        for round in 0..50u32 {
            for i in 0..20u32 {
                let seq = round * 20 + i;
                let payload = vec![seq as u8; (seq % 300) as usize];
                assert_eq!(p.push(seq, &payload, false), Ok(()));
            }
            for i in 0..20u32 {
                let seq = round * 20 + i;
                assert_eq!(c.pop(&mut buf), Some(seq));
                assert_eq!(buf, vec![seq as u8; (seq % 300) as usize]);
            }
        }
        assert_eq!(c.pop(&mut buf), None);
    }

    #[test]
    fn a_full_ring_drops_the_whole_frame_and_keeps_earlier_ones() {
        let (mut p, mut c) = frame_ring(HEADER + MAX_RECORD);
        assert_eq!(p.push(1, &[7; 4000], false), Ok(()));
        assert_eq!(p.push(2, &[8; 200], false), Err(DropReason::RingFull));
        let mut buf = Vec::new();
        assert_eq!(c.pop(&mut buf), Some(1));
        assert_eq!(buf.len(), 4000);
        assert_eq!(c.pop(&mut buf), None);
        assert_eq!(p.push(3, &[9; 200], false), Ok(()));
        assert_eq!(c.pop(&mut buf), Some(3));
    }

    #[test]
    fn large_pcm_is_split_and_large_opus_refused() {
        let (mut p, mut c) = frame_ring(64 * 1024);
        assert_eq!(p.push(0, &[1; 5000], false), Err(DropReason::TooLarge));
        assert_eq!(p.push(1, &[2; 10_000], true), Ok(()));
        let mut buf = Vec::new();
        let mut total = 0;
        while let Some(seq) = c.pop(&mut buf) {
            assert_eq!(seq, 1);
            total += buf.len();
        }
        assert_eq!(total, 10_000);
    }

    #[test]
    fn fits_tells_a_frame_that_could_never_be_queued() {
        let (p, _c) = frame_ring(10_000);
        assert!(p.fits(4000));
        assert!(
            p.fits(10_000 - 3 * HEADER),
            "split into 3 records of at most 4 KiB"
        );
        assert!(!p.fits(10_000 - 2 * HEADER));
        assert!(p.fits(0));
    }

    #[test]
    fn a_drained_queue_hands_its_capacity_back() {
        let (mut p, mut c) = frame_ring(64 * 1024);
        for seq in 0..1000u32 {
            assert_eq!(p.push(seq, &[3; 50], false), Ok(()));
        }
        assert!(c.shared.lock().capacity() >= 56_000);
        let mut buf = Vec::new();
        while c.pop(&mut buf).is_some() {}
        assert!(c.shared.lock().capacity() <= KEEP_CAPACITY);
        // Never past twice the bound, however full.
        while p.push(7, &[1; 100], false).is_ok() {}
        assert!(c.shared.lock().capacity() <= 2 * 64 * 1024);
        assert!(c.occupied() <= 64 * 1024);
    }

    #[test]
    fn producer_and_consumer_on_two_threads_lose_nothing_they_accepted() {
        let (mut p, mut c) = frame_ring(8 * 1024);
        let writer = std::thread::spawn(move || {
            let mut accepted = Vec::new();
            for seq in 0..20_000u32 {
                if p.push(seq, &seq.to_le_bytes(), false).is_ok() {
                    accepted.push(seq);
                }
                if seq % 64 == 0 {
                    std::thread::yield_now();
                }
            }
            accepted
        });
        let mut got = Vec::new();
        let mut buf = Vec::new();
        loop {
            match c.pop(&mut buf) {
                Some(seq) => {
                    assert_eq!(buf, seq.to_le_bytes());
                    got.push(seq);
                }
                None if writer.is_finished() && c.occupied() == 0 => break,
                None => std::thread::yield_now(),
            }
        }
        let accepted = writer.join().unwrap();
        assert_eq!(got, accepted);
    }
}

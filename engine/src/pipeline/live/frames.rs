//! The bounded byte queue between a session's transport and its pipeline, both on the session's pipeline
//! thread: on each tick the transport reads what arrived and queues its frames here, then the session
//! takes them all through decode → resample → VAD. Its bound is how much audio one tick may take in: what
//! does not fit waits in the socket, so a lagging pipeline slows its client down (TCP flow control).
//!
//! Records are `[u16 LE length][u32 LE frame sequence][payload]`. A frame that can never fit is dropped
//! whole and counted by the transport with its reason. PCM frames larger than [`MAX_RECORD`] are split
//! into several records (PCM is a byte stream); an Opus packet cannot be split, so a larger one is dropped
//! as `too_large`.
//!
//! Memory follows the backlog, not the bound: the queue grows by doubling while a tick's intake builds
//! (never past twice the bound: the bound is checked before every write), and hands its capacity back
//! once drained. One thread owns it: no lock, no shared pointer.

use std::collections::VecDeque;

/// Largest payload of one record (also the largest accepted Opus packet: `MAX_OPUS_RECORD`).
pub const MAX_RECORD: usize = crate::audio::container::MAX_OPUS_RECORD;
const HEADER: usize = 6;
/// A drained queue keeps at most this much capacity (a steady stream's few frames fit).
const KEEP_CAPACITY: usize = 1024;

/// Why a frame was dropped at the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// A frame larger than the whole queue.
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

/// A queue of at most `bound` bytes of records.
#[derive(Debug)]
pub struct FrameQueue {
    bytes: VecDeque<u8>,
    bound: usize,
}

impl FrameQueue {
    pub fn new(capacity: usize) -> Self {
        FrameQueue {
            bytes: VecDeque::new(),
            bound: capacity.max(HEADER + MAX_RECORD),
        }
    }

    /// Writes one frame (split into records when `splittable`), or nothing at all.
    pub fn push(&mut self, seq: u32, payload: &[u8], splittable: bool) -> Result<(), DropReason> {
        if !splittable && payload.len() > MAX_RECORD {
            return Err(DropReason::TooLarge);
        }
        let records = payload.len().div_ceil(MAX_RECORD).max(1);
        if self.vacant() < payload.len() + records * HEADER {
            return Err(DropReason::RingFull);
        }
        let q = &mut self.bytes;
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
        len + len.div_ceil(MAX_RECORD).max(1) * HEADER <= self.bound
    }

    /// Bytes free under the bound.
    pub fn vacant(&self) -> usize {
        self.bound.saturating_sub(self.bytes.len())
    }

    /// Pops the next record into `buf` (cleared first) and returns its frame sequence.
    pub fn pop(&mut self, buf: &mut Vec<u8>) -> Option<u32> {
        let q = &mut self.bytes;
        if q.len() < HEADER {
            return None;
        }
        let mut header = [0u8; HEADER];
        for (h, b) in header.iter_mut().zip(q.iter()) {
            *h = *b;
        }
        let len = usize::from(u16::from_le_bytes([header[0], header[1]]));
        // Records are written whole, so a header is always followed by its payload.
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
        self.bytes.len()
    }
}

const _: () = assert!(MAX_RECORD <= u16::MAX as usize);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_come_out_in_order_with_their_sequence() {
        let mut q = FrameQueue::new(64 * 1024);
        let mut buf = Vec::new();
        for round in 0..50u32 {
            for i in 0..20u32 {
                let seq = round * 20 + i;
                let payload = vec![seq as u8; (seq % 300) as usize];
                assert_eq!(q.push(seq, &payload, false), Ok(()));
            }
            for i in 0..20u32 {
                let seq = round * 20 + i;
                assert_eq!(q.pop(&mut buf), Some(seq));
                assert_eq!(buf, vec![seq as u8; (seq % 300) as usize]);
            }
        }
        assert_eq!(q.pop(&mut buf), None);
    }

    #[test]
    fn a_full_queue_refuses_the_whole_frame_and_keeps_earlier_ones() {
        let mut q = FrameQueue::new(HEADER + MAX_RECORD);
        assert_eq!(q.push(1, &[7; 4000], false), Ok(()));
        assert_eq!(q.push(2, &[8; 200], false), Err(DropReason::RingFull));
        let mut buf = Vec::new();
        assert_eq!(q.pop(&mut buf), Some(1));
        assert_eq!(buf.len(), 4000);
        assert_eq!(q.pop(&mut buf), None);
        assert_eq!(q.push(3, &[9; 200], false), Ok(()));
        assert_eq!(q.pop(&mut buf), Some(3));
    }

    #[test]
    fn large_pcm_is_split_and_large_opus_refused() {
        let mut q = FrameQueue::new(64 * 1024);
        assert_eq!(q.push(0, &[1; 5000], false), Err(DropReason::TooLarge));
        assert_eq!(q.push(1, &[2; 10_000], true), Ok(()));
        let mut buf = Vec::new();
        let mut total = 0;
        while let Some(seq) = q.pop(&mut buf) {
            assert_eq!(seq, 1);
            total += buf.len();
        }
        assert_eq!(total, 10_000);
    }

    #[test]
    fn fits_tells_a_frame_that_could_never_be_queued() {
        let q = FrameQueue::new(10_000);
        assert!(q.fits(4000));
        assert!(
            q.fits(10_000 - 3 * HEADER),
            "split into 3 records of at most 4 KiB"
        );
        assert!(!q.fits(10_000 - 2 * HEADER));
        assert!(q.fits(0));
    }

    #[test]
    fn a_drained_queue_hands_its_capacity_back() {
        let mut q = FrameQueue::new(64 * 1024);
        for seq in 0..1000u32 {
            assert_eq!(q.push(seq, &[3; 50], false), Ok(()));
        }
        assert!(q.bytes.capacity() >= 56_000);
        let mut buf = Vec::new();
        while q.pop(&mut buf).is_some() {}
        assert!(q.bytes.capacity() <= KEEP_CAPACITY);
        // Never past twice the bound, however full.
        while q.push(7, &[1; 100], false).is_ok() {}
        assert!(q.bytes.capacity() <= 2 * 64 * 1024);
        assert!(q.occupied() <= 64 * 1024);
    }
}

//! The bounded lock-free SPSC byte ring between a session's websocket reader (producer, on an I/O
//! worker) and its pipeline task (consumer, on a pipeline thread).
//!
//! Records are `[u16 LE length][u32 LE frame sequence][payload]`, written in place: no allocation per
//! frame. A frame that does not fit is dropped whole and the caller counts it with its reason; the ring
//! never grows. PCM frames larger than [`MAX_RECORD`] are split into several records (PCM is a byte
//! stream); an Opus packet cannot be split, so a larger one is dropped as `too_large`.

use ringbuf::traits::{Consumer, Observer, Producer, Split};
use ringbuf::{HeapCons, HeapProd, HeapRb};

/// Largest payload of one record (also the largest accepted Opus packet: `MAX_OPUS_RECORD`).
pub const MAX_RECORD: usize = crate::audio::container::MAX_OPUS_RECORD;
const HEADER: usize = 6;

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

/// A ring of `capacity` bytes, split into its two ends.
pub fn frame_ring(capacity: usize) -> (FrameProducer, FrameConsumer) {
    let (prod, cons) = HeapRb::<u8>::new(capacity.max(HEADER + MAX_RECORD)).split();
    (FrameProducer { prod }, FrameConsumer { cons })
}

/// The websocket side.
pub struct FrameProducer {
    prod: HeapProd<u8>,
}

impl FrameProducer {
    /// Writes one frame (split into records when `splittable`), or nothing at all.
    pub fn push(&mut self, seq: u32, payload: &[u8], splittable: bool) -> Result<(), DropReason> {
        if !splittable && payload.len() > MAX_RECORD {
            return Err(DropReason::TooLarge);
        }
        let records = payload.len().div_ceil(MAX_RECORD).max(1);
        if self.prod.vacant_len() < payload.len() + records * HEADER {
            return Err(DropReason::RingFull);
        }
        // Only this end adds bytes, so the space checked above stays available.
        let empty: &[&[u8]] = &[&[]];
        let chunks = payload.chunks(MAX_RECORD);
        let chunks = chunks.chain(empty.iter().copied().take(usize::from(payload.is_empty())));
        for chunk in chunks {
            // MAX_RECORD fits in u16 (checked at compile time below).
            let len = chunk.len() as u16;
            let mut header = [0u8; HEADER];
            header[..2].copy_from_slice(&len.to_le_bytes());
            header[2..].copy_from_slice(&seq.to_le_bytes());
            self.prod.push_slice(&header);
            self.prod.push_slice(chunk);
        }
        Ok(())
    }

    /// Bytes free.
    pub fn vacant(&self) -> usize {
        self.prod.vacant_len()
    }
}

const _: () = assert!(MAX_RECORD <= u16::MAX as usize);

/// The pipeline side.
pub struct FrameConsumer {
    cons: HeapCons<u8>,
}

impl FrameConsumer {
    /// Pops the next complete record into `buf` (cleared first) and returns its frame sequence. A record
    /// whose payload is not fully written yet stays in the ring for the next call.
    pub fn pop(&mut self, buf: &mut Vec<u8>) -> Option<u32> {
        let mut header = [0u8; HEADER];
        if self.cons.peek_slice(&mut header) < HEADER {
            return None;
        }
        let len = usize::from(u16::from_le_bytes([header[0], header[1]]));
        if self.cons.occupied_len() < HEADER + len {
            return None;
        }
        self.cons.skip(HEADER);
        buf.clear();
        buf.resize(len, 0);
        let got = self.cons.pop_slice(buf);
        debug_assert_eq!(got, len);
        Some(u32::from_le_bytes([
            header[2], header[3], header[4], header[5],
        ]))
    }

    /// Bytes waiting.
    pub fn occupied(&self) -> usize {
        self.cons.occupied_len()
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

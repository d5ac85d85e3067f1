//! [`TimeMap`]: from a connection's audio clock back to the session's stream time.
//!
//! Deepgram times its results in seconds of the audio *this connection* received. Gated silence is never
//! sent and a reconnect starts a new clock at 0 (a new map), so that clock runs behind the session's: each write is
//! recorded as a piece (connection offset, stream offset, length), and a result's times are read back
//! through the pieces (the reference's "wall-clock mapper", omi §3.6).

use std::collections::VecDeque;

/// Pieces kept at most (contiguous writes merge, so this is runs since the last final result; a new
/// piece past it forgets the oldest).
const MAX_PIECES: usize = 1_024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Piece {
    conn: u64,
    stream: u64,
    len: u64,
}

#[derive(Debug, Default)]
pub struct TimeMap {
    pieces: VecDeque<Piece>,
    /// Samples written on this connection.
    written: u64,
}

impl TimeMap {
    /// `len` samples of stream time `stream..stream + len` were written on the connection.
    pub fn wrote(&mut self, stream: u64, len: u64) {
        if len == 0 {
            return;
        }
        match self.pieces.back_mut() {
            Some(last) if last.stream + last.len == stream => last.len += len,
            _ => {
                if self.pieces.len() >= MAX_PIECES {
                    self.pieces.pop_front();
                }
                self.pieces.push_back(Piece {
                    conn: self.written,
                    stream,
                    len,
                });
            }
        }
        self.written += len;
    }

    /// The stream time of connection sample `at`. `end` reads a boundary between two pieces as the end of
    /// the earlier one (a result's end), otherwise as the start of the later one. Times outside every
    /// piece extend the nearest one.
    pub fn to_stream(&self, at: u64, end: bool) -> u64 {
        let Some(first) = self.pieces.front() else {
            return at;
        };
        // The last piece starting before `at` (at or before it for a start).
        let idx = self
            .pieces
            .partition_point(|p| if end { p.conn < at } else { p.conn <= at });
        match idx.checked_sub(1).and_then(|i| self.pieces.get(i)) {
            Some(p) => p.stream + (at - p.conn),
            None => first.stream.saturating_sub(first.conn - at),
        }
    }

    /// Forgets the pieces that end at or before connection sample `at` (their results are final).
    pub fn forget_before(&mut self, at: u64) {
        while self.pieces.len() > 1 && self.pieces.front().is_some_and(|p| p.conn + p.len <= at) {
            self.pieces.pop_front();
        }
    }

    /// Samples written on this connection so far.
    #[cfg(test)]
    fn written(&self) -> u64 {
        self.written
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gated_silence_between_runs_is_put_back() {
        let mut m = TimeMap::default();
        // Run 1: stream 16 000..24 000 in two contiguous writes; run 2: stream 80 000..88 000.
        m.wrote(16_000, 4_000);
        m.wrote(20_000, 4_000);
        m.wrote(80_000, 8_000);
        assert_eq!(m.written(), 16_000);
        assert_eq!(m.to_stream(0, false), 16_000);
        assert_eq!(m.to_stream(7_999, false), 23_999);
        // The boundary: the end of run 1, or the start of run 2.
        assert_eq!(m.to_stream(8_000, true), 24_000);
        assert_eq!(m.to_stream(8_000, false), 80_000);
        assert_eq!(m.to_stream(16_000, true), 88_000);
        // Past the end extends the last piece.
        assert_eq!(m.to_stream(16_100, true), 88_100);
    }

    #[test]
    fn a_reconnect_starts_a_new_clock_and_old_pieces_are_forgotten() {
        let mut m = TimeMap::default();
        m.wrote(1_000, 500);
        m.wrote(5_000, 500);
        m.forget_before(500);
        assert_eq!(m.to_stream(500, false), 5_000);
        assert_eq!(
            m.to_stream(400, false),
            4_900,
            "before the kept piece extends it"
        );
        m.forget_before(10_000);
        assert_eq!(
            m.to_stream(600, false),
            5_100,
            "the last piece is always kept"
        );
        // A new connection: a new map, its clock at 0.
        let mut m = TimeMap::default();
        assert_eq!(m.written(), 0);
        m.wrote(9_000, 100);
        assert_eq!(m.to_stream(0, false), 9_000);
        assert_eq!(m.to_stream(100, true), 9_100);
    }

    #[test]
    fn pieces_are_bounded() {
        let mut m = TimeMap::default();
        for i in 0..(MAX_PIECES as u64 + 10) {
            m.wrote(i * 100, 10);
        }
        assert_eq!(m.pieces.len(), MAX_PIECES);
        let last = (MAX_PIECES as u64 + 9) * 100;
        assert_eq!(m.to_stream(m.written() - 10, false), last);
    }
}

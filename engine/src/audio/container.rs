//! The device `.bin` container: records of `[u32 little-endian length N][N bytes]`, no header.
//!
//! The reader streams from any `Read`, never allocates more than the codec's record bound, and never
//! panics: a record longer than the bound, or one cut short by the end of the file, ends the file at that
//! record's byte offset. Everything before it is kept and the caller is told why and where it stopped.

use std::io::{self, Read};

/// Largest accepted Opus packet record (a real packet is at most 1,275 bytes per frame).
pub const MAX_OPUS_RECORD: usize = 4 * 1024;
/// Largest accepted PCM record.
pub const MAX_PCM_RECORD: usize = 64 * 1024;

/// Why a file stopped before its end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Truncation {
    /// Fewer than 4 bytes of length prefix at `offset`.
    PartialLength { offset: u64 },
    /// The record at `offset` declared `declared` bytes but only `available` were left.
    ShortRecord {
        offset: u64,
        declared: u32,
        available: u64,
    },
    /// The record at `offset` declared `declared` bytes, over the bound `max`.
    Oversized {
        offset: u64,
        declared: u32,
        max: usize,
    },
    /// A zero-length record at `offset` (corruption for PCM; a valid empty packet for nobody).
    Empty { offset: u64 },
}

impl Truncation {
    /// The stable code of this truncation (a file's status code in a sync answer).
    pub fn code(&self) -> &'static str {
        match self {
            Truncation::PartialLength { .. } => "truncated_length",
            Truncation::ShortRecord { .. } => "truncated_record",
            Truncation::Oversized { .. } => "record_too_large",
            Truncation::Empty { .. } => "empty_record",
        }
    }

    /// Byte offset of the record where the file was cut.
    pub fn offset(&self) -> u64 {
        match self {
            Truncation::PartialLength { offset }
            | Truncation::ShortRecord { offset, .. }
            | Truncation::Oversized { offset, .. }
            | Truncation::Empty { offset } => *offset,
        }
    }
}

impl std::fmt::Display for Truncation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Truncation::PartialLength { offset } => {
                write!(f, "truncated length prefix at byte {offset}")
            }
            Truncation::ShortRecord {
                offset,
                declared,
                available,
            } => write!(
                f,
                "truncated record at byte {offset}: {declared} bytes declared, {available} present"
            ),
            Truncation::Oversized {
                offset,
                declared,
                max,
            } => {
                write!(
                    f,
                    "record at byte {offset} declares {declared} bytes, over the {max}-byte bound"
                )
            }
            Truncation::Empty { offset } => write!(f, "empty record at byte {offset}"),
        }
    }
}

/// What one call to [`RecordReader::next_record`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// A whole record is in the buffer; it started at this byte offset.
    Record { offset: u64 },
    /// Clean end of file, on a record boundary.
    End,
    /// The file stops here (see [`Truncation`]); records before it were whole.
    Truncated(Truncation),
}

/// Streaming reader of `.bin` records with a bound on each record's length.
pub struct RecordReader<R> {
    inner: R,
    max_record: usize,
    offset: u64,
    done: bool,
}

impl<R: Read> RecordReader<R> {
    pub fn new(inner: R, max_record: usize) -> Self {
        RecordReader {
            inner,
            max_record,
            offset: 0,
            done: false,
        }
    }

    /// Bytes consumed so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Read the next record into `buf` (cleared first). I/O errors other than a short read are returned.
    pub fn next_record(&mut self, buf: &mut Vec<u8>) -> io::Result<Next> {
        buf.clear();
        if self.done {
            return Ok(Next::End);
        }
        let start = self.offset;
        let mut len = [0u8; 4];
        let got = read_full(&mut self.inner, &mut len)?;
        if got == 0 {
            self.done = true;
            return Ok(Next::End);
        }
        if got < 4 {
            self.done = true;
            return Ok(Next::Truncated(Truncation::PartialLength { offset: start }));
        }
        let declared = u32::from_le_bytes(len);
        if declared == 0 {
            self.done = true;
            return Ok(Next::Truncated(Truncation::Empty { offset: start }));
        }
        if declared as usize > self.max_record {
            self.done = true;
            return Ok(Next::Truncated(Truncation::Oversized {
                offset: start,
                declared,
                max: self.max_record,
            }));
        }
        // Bounded above: at most `max_record` bytes, never the untrusted length unchecked.
        buf.resize(declared as usize, 0);
        let got = read_full(&mut self.inner, buf)?;
        if got < buf.len() {
            self.done = true;
            buf.clear();
            return Ok(Next::Truncated(Truncation::ShortRecord {
                offset: start,
                declared,
                available: got as u64,
            }));
        }
        self.offset = start + 4 + u64::from(declared);
        Ok(Next::Record { offset: start })
    }
}

/// Read until `buf` is full or EOF; returns bytes read.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(payloads: &[&[u8]]) -> Vec<u8> {
        let mut v = Vec::new();
        for p in payloads {
            v.extend_from_slice(&(p.len() as u32).to_le_bytes());
            v.extend_from_slice(p);
        }
        v
    }

    fn all(bytes: &[u8], max: usize) -> (Vec<Vec<u8>>, Next) {
        let mut r = RecordReader::new(bytes, max);
        let mut buf = Vec::new();
        let mut out = Vec::new();
        loop {
            match r.next_record(&mut buf).unwrap() {
                Next::Record { .. } => out.push(buf.clone()),
                other => return (out, other),
            }
        }
    }

    #[test]
    fn reads_every_record_then_ends_cleanly() {
        let (recs, end) = all(&rec(&[b"ab", b"c", b"defg"]), 16);
        assert_eq!(recs, vec![b"ab".to_vec(), b"c".to_vec(), b"defg".to_vec()]);
        assert_eq!(end, Next::End);
    }

    #[test]
    fn empty_file_is_a_clean_end_with_no_records() {
        assert_eq!(all(&[], 16), (vec![], Next::End));
    }

    #[test]
    fn truncated_last_record_keeps_the_ones_before_and_names_its_offset() {
        let mut bytes = rec(&[b"ab", b"cd"]);
        bytes.extend_from_slice(&10u32.to_le_bytes());
        bytes.extend_from_slice(b"xyz");
        let (recs, end) = all(&bytes, 16);
        assert_eq!(recs.len(), 2);
        assert_eq!(
            end,
            Next::Truncated(Truncation::ShortRecord {
                offset: 12,
                declared: 10,
                available: 3
            })
        );
    }

    #[test]
    fn length_over_the_bound_stops_without_allocating_it() {
        let mut bytes = rec(&[b"ab"]);
        bytes.extend_from_slice(&u32::MAX.to_le_bytes());
        let (recs, end) = all(&bytes, MAX_OPUS_RECORD);
        assert_eq!(recs.len(), 1);
        assert_eq!(
            end,
            Next::Truncated(Truncation::Oversized {
                offset: 6,
                declared: u32::MAX,
                max: MAX_OPUS_RECORD
            })
        );
    }

    #[test]
    fn partial_length_prefix_is_reported() {
        let mut bytes = rec(&[b"ab"]);
        bytes.extend_from_slice(&[1, 0]);
        let (recs, end) = all(&bytes, 16);
        assert_eq!(recs.len(), 1);
        assert_eq!(
            end,
            Next::Truncated(Truncation::PartialLength { offset: 6 })
        );
    }

    #[test]
    fn zero_length_record_ends_the_file() {
        let mut bytes = rec(&[b"ab"]);
        bytes.extend_from_slice(&0u32.to_le_bytes());
        bytes.extend_from_slice(&rec(&[b"zz"]));
        let (recs, end) = all(&bytes, 16);
        assert_eq!(recs.len(), 1);
        assert_eq!(end, Next::Truncated(Truncation::Empty { offset: 6 }));
    }
}

//! A NUL byte in one multipart part's headers (a file name with `\0` in it) must fail that file, not the
//! whole upload. The multipart parser refuses a part header holding a NUL, and after that error the body
//! cannot be read on: so the upload stream is passed through [`NulInPartHeaders`] first, which turns a NUL
//! inside a part's header block (between a boundary line and the blank line that ends the headers) into
//! a tab, a byte header values may carry. The reader turns it back into NUL in the file name, which the
//! name check refuses (`invalid_file_name`) for that file alone. Part bodies (the audio) are never
//! touched, and chunks without such a NUL are passed on as they are.
//!
//! The scan is a byte state machine carried across chunks (no buffering): in a body it skips to each CR
//! looking for `CRLF--boundary`; in a header block it looks for `CRLF CRLF`.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use futures_util::Stream;

/// What stands for a NUL in a part header until the file name is read.
pub const NUL_STAND_IN: u8 = b'\t';
const HEADERS_END: &[u8] = b"\r\n\r\n";

/// The `boundary` parameter of a `multipart/form-data` content type.
pub fn boundary(content_type: &str) -> Option<&str> {
    content_type.split(';').skip(1).find_map(|param| {
        let (key, value) = param.split_once('=')?;
        key.trim()
            .eq_ignore_ascii_case("boundary")
            .then(|| value.trim().trim_matches('"'))
            .filter(|b| !b.is_empty())
    })
}

/// The stream adapter (see the module docs).
pub struct NulInPartHeaders<S> {
    inner: S,
    /// `CRLF--boundary`: a delimiter line (the first one may come without its CRLF).
    delimiter: Vec<u8>,
    in_headers: bool,
    /// Bytes of the pattern matched so far (the delimiter in a body, `HEADERS_END` in headers).
    matched: usize,
}

impl<S> NulInPartHeaders<S> {
    pub fn new(inner: S, boundary: &str) -> Self {
        let mut delimiter = b"\r\n--".to_vec();
        delimiter.extend_from_slice(boundary.as_bytes());
        NulInPartHeaders {
            inner,
            delimiter,
            in_headers: false,
            // The body starts as if after a CRLF: the first delimiter has none.
            matched: 2,
        }
    }

    /// Scans `chunk`, rewriting NULs of header blocks (copied only when there is one).
    fn scan(&mut self, chunk: Bytes) -> Bytes {
        let mut out: Option<BytesMut> = None;
        let mut i = 0;
        while i < chunk.len() {
            if !self.in_headers && self.matched == 0 {
                // Nothing matched: skip to the next CR (the only byte a delimiter can start with).
                match chunk[i..].iter().position(|&b| b == b'\r') {
                    Some(at) => i += at,
                    None => break,
                }
            }
            let b = chunk[i];
            if self.in_headers {
                if b == 0 {
                    out.get_or_insert_with(|| BytesMut::from(&chunk[..]))[i] = NUL_STAND_IN;
                }
                self.matched = step(HEADERS_END, self.matched, b);
                if self.matched == HEADERS_END.len() {
                    self.in_headers = false;
                    self.matched = 0;
                }
            } else {
                self.matched = step(&self.delimiter, self.matched, b);
                if self.matched == self.delimiter.len() {
                    // The rest of the delimiter line (`--` of the close, transport padding) is short and
                    // holds no CRLF CRLF: the header block's end is found from here.
                    self.in_headers = true;
                    self.matched = 0;
                }
            }
            i += 1;
        }
        out.map_or(chunk, BytesMut::freeze)
    }
}

/// Advances a match of `pattern` by `b`. Both patterns start with CR and hold no other CR after a
/// mismatch point that could restart them, so a mismatch restarts at 0, or at 1 on a CR.
fn step(pattern: &[u8], matched: usize, b: u8) -> usize {
    if pattern.get(matched) == Some(&b) {
        matched + 1
    } else if b == b'\r' {
        1
    } else {
        0
    }
}

impl<S, E> Stream for NulInPartHeaders<S>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
{
    type Item = Result<Bytes, E>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match Pin::new(&mut self.inner).poll_next(cx) {
            Poll::Ready(Some(Ok(chunk))) => Poll::Ready(Some(Ok(self.scan(chunk)))),
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body() -> Vec<u8> {
        let mut b = b"--xyz\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a\0b.bin\"\r\n\r\n"
            .to_vec();
        b.extend_from_slice(b"\0\0audio\r\n--x\0\r\n");
        b.extend_from_slice(b"\r\n--xyz\r\nContent-Disposition: form-data; name=\"files\"; filename=\"c.bin\"\r\n\r\n\0\r\n--xyz--\r\n");
        b
    }

    fn scan_in_chunks(body: &[u8], size: usize) -> Vec<u8> {
        let mut f =
            NulInPartHeaders::new(futures_util::stream::empty::<Result<Bytes, ()>>(), "xyz");
        body.chunks(size)
            .flat_map(|c| f.scan(Bytes::copy_from_slice(c)).to_vec())
            .collect()
    }

    #[test]
    fn a_nul_in_a_part_header_becomes_the_stand_in_and_bodies_are_untouched() {
        let body = body();
        let mut want = body.clone();
        let at = body.iter().position(|&b| b == 0).unwrap_or(0);
        want[at] = NUL_STAND_IN;
        for size in [1, 2, 3, 7, 64, body.len()] {
            assert_eq!(scan_in_chunks(&body, size), want, "chunks of {size}");
        }
    }

    #[test]
    fn the_boundary_is_read_from_the_content_type() {
        assert_eq!(boundary("multipart/form-data; boundary=xyz"), Some("xyz"));
        assert_eq!(
            boundary("multipart/form-data; charset=utf-8; BOUNDARY=\"a b\""),
            Some("a b")
        );
        assert_eq!(boundary("multipart/form-data"), None);
        assert_eq!(boundary("multipart/form-data; boundary="), None);
    }
}

//! A guard in front of the multipart parser (multer): it watches the bytes of
//! a `multipart/form-data` body as they pass and fails the body as soon as
//! its preamble or one part's header block runs past a limit.
//!
//! multer buffers a part's whole header block (and the preamble before the
//! first boundary) before it looks at either, and has no limit for them: a
//! 256 MiB header line cost 256 MiB of memory before the 8 KiB check after
//! parsing could refuse it. With the guard the parser never holds more than
//! the limit plus one chunk of header bytes.
//!
//! The guard only needs the framing: every `CRLF--boundary` in the body is a
//! delimiter (a part's bytes cannot contain it, RFC 2046 §5.1.1), a header
//! block runs from the delimiter to the first `CRLF CRLF`, and a delimiter
//! followed by `--` ends the form. It scans part bodies with `memmem` and
//! copies nothing but the few bytes a delimiter could straddle.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::Stream;
use memchr::memmem;

/// A preamble or a part's header block longer than the limit.
#[derive(Debug, thiserror::Error)]
#[error("a multipart part's headers (or the preamble) run past {limit} bytes")]
pub struct PartHeadersTooLarge {
    pub limit: usize,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body stream, passed through unchanged while every header block stays
/// within `limit`; an error item (then nothing) once one does not.
pub struct PartHeaderGuard<S> {
    inner: S,
    scan: Scan,
    failed: bool,
}

impl<S> PartHeaderGuard<S> {
    pub fn new(inner: S, boundary: &str, limit: usize) -> PartHeaderGuard<S> {
        PartHeaderGuard { inner, scan: Scan::new(boundary, limit), failed: false }
    }
}

impl<S, E> Stream for PartHeaderGuard<S>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: Into<BoxError>,
{
    type Item = Result<Bytes, BoxError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.failed {
            return Poll::Ready(None);
        }
        match Pin::new(&mut self.inner).poll_next(cx) {
            Poll::Ready(Some(Ok(chunk))) => match self.scan.feed(&chunk) {
                Ok(()) => Poll::Ready(Some(Ok(chunk))),
                Err(e) => {
                    self.failed = true;
                    Poll::Ready(Some(Err(Box::new(e))))
                }
            },
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before the first `--boundary`.
    Preamble,
    /// After a boundary, up to the `CRLF CRLF` that ends the part's headers.
    Headers,
    /// A part's bytes, up to the next `CRLF--boundary`.
    Body,
    /// After the closing `--boundary--`: the parser reads no further.
    Epilogue,
}

/// The framing scanner: states and the few bytes carried between chunks.
struct Scan {
    /// `--boundary`: the first boundary (the parser accepts it anywhere in the preamble).
    first: Vec<u8>,
    /// `CRLF--boundary`: every later boundary.
    delimiter: Vec<u8>,
    limit: usize,
    state: State,
    /// The bytes of the current preamble or header block (at most `limit` + 4 + boundary).
    region: Vec<u8>,
    /// In a body: its last `delimiter.len() - 1` bytes, where a delimiter could begin.
    tail: Vec<u8>,
}

const CRLF_CRLF: &[u8] = b"\r\n\r\n";

impl Scan {
    fn new(boundary: &str, limit: usize) -> Scan {
        let first = format!("--{boundary}").into_bytes();
        let delimiter = format!("\r\n--{boundary}").into_bytes();
        Scan { first, delimiter, limit, state: State::Preamble, region: Vec::new(), tail: Vec::new() }
    }

    fn feed(&mut self, mut chunk: &[u8]) -> Result<(), PartHeadersTooLarge> {
        while !chunk.is_empty() {
            chunk = match self.state {
                State::Epilogue => return Ok(()),
                State::Preamble | State::Headers => self.scan_region(chunk)?,
                State::Body => self.scan_body(chunk),
            };
        }
        Ok(())
    }

    /// Takes preamble or header bytes; returns what of `chunk` follows the region.
    fn scan_region<'c>(&mut self, chunk: &'c [u8]) -> Result<&'c [u8], PartHeadersTooLarge> {
        let pattern: &[u8] = if self.state == State::Preamble { &self.first } else { CRLF_CRLF };
        let cap = self.limit + pattern.len();
        let take = chunk.len().min(cap - self.region.len());
        let before = self.region.len();
        self.region.extend_from_slice(&chunk[..take]);
        if self.state == State::Headers && self.region.starts_with(b"--") {
            self.state = State::Epilogue;
            return Ok(&[]);
        }
        let from = before.saturating_sub(pattern.len() - 1);
        match memmem::find(&self.region[from..], pattern) {
            Some(at) => {
                let end = from + at + pattern.len();
                self.region.clear();
                self.state = if self.state == State::Preamble { State::Headers } else { State::Body };
                Ok(&chunk[end - before..])
            }
            None if self.region.len() >= cap => Err(PartHeadersTooLarge { limit: self.limit }),
            None => Ok(&chunk[take..]),
        }
    }

    /// Takes body bytes; returns what of `chunk` follows the next delimiter (empty if none).
    fn scan_body<'c>(&mut self, chunk: &'c [u8]) -> &'c [u8] {
        let d = self.delimiter.len();
        if !self.tail.is_empty() {
            // A delimiter that begins in the previous chunk.
            let mut joint = self.tail.clone();
            joint.extend_from_slice(&chunk[..chunk.len().min(d - 1)]);
            if let Some(at) = memmem::find(&joint, &self.delimiter) {
                let end = at + d - self.tail.len();
                self.tail.clear();
                self.state = State::Headers;
                return &chunk[end..];
            }
        }
        if let Some(at) = memmem::find(chunk, &self.delimiter) {
            self.tail.clear();
            self.state = State::Headers;
            return &chunk[at + d..];
        }
        if chunk.len() >= d - 1 {
            self.tail.clear();
            self.tail.extend_from_slice(&chunk[chunk.len() - (d - 1)..]);
        } else {
            self.tail.extend_from_slice(chunk);
            let extra = self.tail.len().saturating_sub(d - 1);
            self.tail.drain(..extra);
        }
        &[]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(header_pad: usize, body: &[u8]) -> Vec<u8> {
        let mut out = b"--XB\r\nContent-Disposition: form-data; name=\"id\"\r\n\r\nabc\r\n".to_vec();
        out.extend_from_slice(b"--XB\r\nContent-Disposition: form-data; name=\"file\"\r\nX-Pad: ");
        out.extend(std::iter::repeat_n(b'a', header_pad));
        out.extend_from_slice(b"\r\n\r\n");
        out.extend_from_slice(body);
        out.extend_from_slice(b"\r\n--XB--\r\n");
        out.extend(std::iter::repeat_n(b'e', 100_000)); // an epilogue is never a header
        out
    }

    /// Feeds `body` in chunks of `size`; true when every chunk passed.
    fn passes(body: &[u8], size: usize, limit: usize) -> bool {
        let mut scan = Scan::new("XB", limit);
        body.chunks(size).all(|c| scan.feed(c).is_ok())
    }

    #[test]
    fn header_blocks_within_the_limit_pass_at_any_chunking() {
        // A body full of near-delimiters and CRLFs that are not one.
        let body = b"\r\n--X\r\n-\r\n--XA\r\n\r\n\r\n--".repeat(5000);
        for size in [1, 2, 3, 5, 7, 64, 4096, usize::MAX] {
            assert!(passes(&form(1000, &body), size, 2048), "chunks of {size}");
        }
    }

    #[test]
    fn a_header_block_past_the_limit_fails_at_any_chunking() {
        for size in [1, 3, 7, 64, 4096, usize::MAX] {
            assert!(!passes(&form(5000, b"data"), size, 2048), "chunks of {size}");
        }
    }

    #[test]
    fn a_long_preamble_fails_and_a_short_one_passes() {
        let mut long = vec![b'p'; 5000];
        long.extend(form(10, b"x"));
        assert!(!passes(&long, 100, 2048));
        let mut short = b"preamble\r\n".to_vec();
        short.extend(form(10, b"x"));
        assert!(passes(&short, 3, 2048));
    }

    #[test]
    fn a_delimiter_split_across_chunks_starts_the_next_header_block() {
        // The second part's header is too long: only seen if the split delimiter is found.
        let body = form(5000, b"");
        let mut scan = Scan::new("XB", 2048);
        let split = memmem::find(&body[10..], b"\r\n--XB").unwrap() + 10 + 3;
        assert!(scan.feed(&body[..split]).is_ok());
        assert!(scan.feed(&body[split..]).is_err());
    }
}

//! HTTP/1.1 on the wire for the lean connection path ([`super::http1`]):
//! which request heads it takes, the request it hands the router, and the
//! response head and body framing it writes. Pure functions over byte
//! slices, no I/O, so the parser is fuzzed on its own
//! (`tests/fuzz_parsers.rs`).
//!
//! The lean path takes only the plain requests that make up nearly all of
//! the traffic (HTTP/1.1, no body or a `Content-Length` body of at most
//! [`LEAN_BODY_MAX`] bytes, no `Transfer-Encoding`, `Expect` or upgrade).
//! Everything else, malformed heads included, is [`Parsed::HandOver`]: hyper
//! serves the connection from that request on, so every rare or hostile
//! shape of HTTP/1 gets hyper's answers (400, 431, 100-continue, chunked
//! request bodies, WebSocket upgrades) exactly as before.

use bytes::{Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};

/// Most header lines the lean path parses; a request with more goes to hyper.
pub const MAX_HEADERS: usize = 64;

/// Largest request body the lean path reads (whole, before the router runs);
/// larger bodies, and bodies of unknown length, go to hyper, which streams them.
pub const LEAN_BODY_MAX: usize = 64 << 10;

/// What the bytes received so far hold.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Not a whole head yet.
    Partial,
    /// A request the lean path serves.
    Lean(Head),
    /// Hyper serves the connection from this request on.
    HandOver,
}

/// Where the parts of a request head lie in its bytes, and what it asks of the connection.
#[derive(Debug, PartialEq, Eq)]
pub struct Head {
    /// Bytes of the head, blank line included.
    pub len: usize,
    /// The body's length (`Content-Length`, 0 without one).
    pub body_len: usize,
    /// The client keeps the connection open after this request.
    pub keep_alive: bool,
    method: (usize, usize),
    target: (usize, usize),
    /// Name and value of each header line, as ranges of the head's bytes.
    headers: Vec<((usize, usize), (usize, usize))>,
}

fn range_in(whole: &[u8], part: &[u8]) -> (usize, usize) {
    let start = part.as_ptr() as usize - whole.as_ptr() as usize;
    (start, start + part.len())
}

/// Whether a `Connection` header's comma-separated tokens include `token`.
pub fn has_token(value: &[u8], token: &str) -> bool {
    value.split(|&b| b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// Reads the head at the start of `buf`, if it is whole.
pub fn parse_head(buf: &[u8]) -> Parsed {
    let mut lines = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut lines);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        // Malformed, or more header lines than `MAX_HEADERS`: hyper answers.
        Err(_) => return Parsed::HandOver,
    };
    let (Some(method), Some(target), Some(1)) = (req.method, req.path, req.version) else {
        return Parsed::HandOver;
    };
    let mut body_len = None;
    let mut keep_alive = true;
    let mut headers = Vec::with_capacity(req.headers.len());
    for line in req.headers.iter() {
        let name = line.name;
        if name.eq_ignore_ascii_case("content-length") {
            let digits = line.value.trim_ascii();
            let parsed = (!digits.is_empty() && digits.iter().all(u8::is_ascii_digit))
                .then(|| std::str::from_utf8(digits).ok()?.parse::<usize>().ok())
                .flatten();
            match (body_len, parsed) {
                (None, Some(n)) if n <= LEAN_BODY_MAX => body_len = Some(n),
                // Too large to take whole, malformed, or given twice.
                _ => return Parsed::HandOver,
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            || name.eq_ignore_ascii_case("expect")
            || name.eq_ignore_ascii_case("upgrade")
        {
            return Parsed::HandOver;
        } else if name.eq_ignore_ascii_case("connection") {
            if has_token(line.value, "upgrade") {
                return Parsed::HandOver;
            }
            if has_token(line.value, "close") {
                keep_alive = false;
            }
        }
        headers.push((range_in(buf, name.as_bytes()), range_in(buf, line.value)));
    }
    Parsed::Lean(Head {
        len,
        body_len: body_len.unwrap_or(0),
        keep_alive,
        method: range_in(buf, method.as_bytes()),
        target: range_in(buf, target.as_bytes()),
        headers,
    })
}

impl Head {
    /// The request for the router, its parts pointing into `head` (the bytes
    /// [`parse_head`] read), without copies. `None` where `http` refuses a
    /// part httparse let through; hyper then answers the request.
    pub fn request<B>(&self, head: &Bytes, body: B) -> Option<Request<B>> {
        let slice = |(start, end): (usize, usize)| head.slice(start..end);
        let method = Method::from_bytes(&head[self.method.0..self.method.1]).ok()?;
        let uri = Uri::from_maybe_shared(slice(self.target)).ok()?;
        // `Uri` takes `*` and authority forms too; the router serves paths only.
        uri.path_and_query()?;
        if uri.scheme().is_some() || !uri.path().starts_with('/') {
            return None;
        }
        let mut headers = HeaderMap::with_capacity(self.headers.len());
        for &(name, value) in &self.headers {
            let name = HeaderName::from_bytes(&head[name.0..name.1]).ok()?;
            let value = HeaderValue::from_maybe_shared(slice(value)).ok()?;
            headers.append(name, value);
        }
        let mut req = Request::new(body);
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        *req.version_mut() = Version::HTTP_11;
        *req.headers_mut() = headers;
        Some(req)
    }
}

/// How a response's body goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body at all (`HEAD`, 1xx, 204, 304): the head says what a body would have been, if anything.
    None,
    /// Exactly this many bytes follow the head.
    Length(u64),
    /// Chunks, then the last chunk: the length is not known ahead.
    Chunked,
}

/// Whether a response with this status never has a body (RFC 9110, 6.4.1).
pub fn status_has_no_body(status: StatusCode) -> bool {
    status.is_informational() || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED
}

/// How to frame `res`, answering a request whose method was `HEAD` or not,
/// given what its body says of its length.
pub fn framing<B>(res: &Response<B>, head_request: bool, exact_len: Option<u64>) -> Framing {
    if head_request || status_has_no_body(res.status()) {
        return Framing::None;
    }
    if let Some(declared) = declared_length(res.headers()) {
        return Framing::Length(declared);
    }
    match exact_len {
        Some(n) => Framing::Length(n),
        None => Framing::Chunked,
    }
}

/// The response's own `Content-Length`, if it has one.
pub fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(http::header::CONTENT_LENGTH)?.to_str().ok()?.trim().parse().ok()
}

/// Writes the status line and headers of `res` into `out`: its own headers
/// (any `Transfer-Encoding` or `Connection` of its own dropped: the framing and
/// the connection are the connection's to say), the framing's, `date`, and
/// `connection: close` when the connection closes after it.
pub fn write_head<B>(
    out: &mut Vec<u8>,
    res: &Response<B>,
    framing: Framing,
    exact_len: Option<u64>,
    date: &[u8],
    close: bool,
) {
    let status = res.status();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let headers = res.headers();
    for (name, value) in headers {
        if name == http::header::TRANSFER_ENCODING || name == http::header::CONNECTION {
            continue;
        }
        // None on 1xx and 204, and on 304 none but the 200's length (RFC 9110,
        // 8.6): the router sets `content-length: 0` on every empty answer.
        if name == http::header::CONTENT_LENGTH && status_has_no_body(status) {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let has_length = headers.contains_key(http::header::CONTENT_LENGTH);
    match framing {
        Framing::Length(n) if !has_length => push_length(out, n),
        Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        // A HEAD answer says the length a GET would have had, when it is known.
        Framing::None if !has_length && !status_has_no_body(status) => {
            if let Some(n) = exact_len.filter(|&n| n > 0) {
                push_length(out, n);
            }
        }
        _ => {}
    }
    out.extend_from_slice(b"date: ");
    out.extend_from_slice(date);
    out.extend_from_slice(b"\r\n");
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

fn push_length(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(b"content-length: ");
    out.extend_from_slice(itoa(n, &mut [0u8; 20]));
    out.extend_from_slice(b"\r\n");
}

fn itoa(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[at..];
        }
    }
}

/// The line that opens a chunk of `len` bytes (`<hex>\r\n`); the chunk ends with `\r\n`.
pub fn chunk_line(len: usize, out: &mut [u8; 18]) -> &[u8] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut at = out.len() - 2;
    out[at] = b'\r';
    out[at + 1] = b'\n';
    let mut n = len;
    loop {
        at -= 1;
        out[at] = HEX[n & 0xf];
        n >>= 4;
        if n == 0 {
            return &out[at..];
        }
    }
}

/// The last chunk of a chunked body, with no trailers.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// Bytes received but not yet read, handed to hyper ahead of the socket's.
pub fn rewind_prefix(head: Option<&Bytes>, rest: &BytesMut) -> Bytes {
    match head {
        None => Bytes::copy_from_slice(rest),
        Some(head) => {
            let mut all = BytesMut::with_capacity(head.len() + rest.len());
            all.extend_from_slice(head);
            all.extend_from_slice(rest);
            all.freeze()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lean(raw: &[u8]) -> Head {
        match parse_head(raw) {
            Parsed::Lean(head) => head,
            other => panic!("{other:?} for {}", String::from_utf8_lossy(raw)),
        }
    }

    #[test]
    fn a_plain_append_is_lean_with_its_body_length_and_keep_alive() {
        let raw =
            b"POST /s/a?x=1 HTTP/1.1\r\nHost: h\r\nContent-Type: application/json\r\nContent-Length: 12\r\n\r\n[1,2]";
        let head = lean(raw);
        assert_eq!(head.len, raw.len() - 5);
        assert_eq!(head.body_len, 12);
        assert!(head.keep_alive);
        let bytes = Bytes::copy_from_slice(raw);
        let req = head.request(&bytes, ()).unwrap();
        assert_eq!(req.method(), Method::POST);
        assert_eq!(req.uri().path(), "/s/a");
        assert_eq!(req.uri().query(), Some("x=1"));
        assert_eq!(req.headers()["content-type"], "application/json");
        assert_eq!(req.headers()["host"], "h");
    }

    #[test]
    fn a_head_split_anywhere_is_partial_until_its_blank_line() {
        let raw = b"GET /s HTTP/1.1\r\nHost: h\r\n\r\n";
        for cut in 0..raw.len() {
            assert_eq!(parse_head(&raw[..cut]), Parsed::Partial, "cut at {cut}");
        }
        assert_eq!(lean(raw).len, raw.len());
    }

    #[test]
    fn framing_upgrades_expectations_and_big_bodies_go_to_hyper() {
        for raw in [
            &b"POST /s HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            b"POST /s HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST /s HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n",
            b"POST /s HTTP/1.1\r\nContent-Length: +3\r\n\r\n",
            b"POST /s HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
            b"POST /s HTTP/1.1\r\nContent-Length: 65537\r\n\r\n",
            b"PUT /s HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n",
            b"GET /ws HTTP/1.1\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\n",
            b"GET /s HTTP/1.0\r\n\r\n",
            b"GET http://h/s HTTP/1.1\r\n\r\n",
            b"GET /s HTTP/1.1\r\nBad Header: x\r\n\r\n",
            b"G\0T /s HTTP/1.1\r\n\r\n",
        ] {
            let parsed = parse_head(raw);
            let handed = match &parsed {
                Parsed::HandOver => true,
                Parsed::Lean(head) => head.request(&Bytes::copy_from_slice(raw), ()).is_none(),
                Parsed::Partial => false,
            };
            assert!(handed, "{parsed:?} for {}", String::from_utf8_lossy(raw));
        }
    }

    #[test]
    fn connection_close_ends_keep_alive() {
        assert!(!lean(b"GET /s HTTP/1.1\r\nConnection: keep-alive, close\r\n\r\n").keep_alive);
        assert!(lean(b"GET /s HTTP/1.1\r\nConnection: keep-alive\r\n\r\n").keep_alive);
    }

    fn head_of(res: &Response<()>, framing: Framing, exact: Option<u64>, close: bool) -> String {
        let mut out = Vec::new();
        write_head(&mut out, res, framing, exact, b"Sun, 29 Nov 2026 03:00:00 GMT", close);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn a_response_head_carries_its_headers_its_framing_and_the_date() {
        let mut res = Response::new(());
        res.headers_mut().insert("stream-next-offset", HeaderValue::from_static("0_12"));
        res.headers_mut().insert("transfer-encoding", HeaderValue::from_static("gzip"));
        assert_eq!(framing(&res, false, Some(7)), Framing::Length(7));
        assert_eq!(
            head_of(&res, Framing::Length(7), Some(7), false),
            "HTTP/1.1 200 OK\r\nstream-next-offset: 0_12\r\ncontent-length: 7\r\ndate: Sun, 29 Nov 2026 03:00:00 GMT\r\n\r\n"
        );
        assert_eq!(framing(&res, false, None), Framing::Chunked);
        assert!(head_of(&res, Framing::Chunked, None, true).ends_with(
            "transfer-encoding: chunked\r\ndate: Sun, 29 Nov 2026 03:00:00 GMT\r\nconnection: close\r\n\r\n"
        ));
    }

    #[test]
    fn a_declared_length_wins_and_bodiless_answers_have_no_framing() {
        let mut res = Response::new(());
        res.headers_mut().insert("content-length", HeaderValue::from_static("42"));
        assert_eq!(framing(&res, false, None), Framing::Length(42));
        assert_eq!(head_of(&res, Framing::Length(42), None, false).matches("content-length").count(), 1);
        assert_eq!(framing(&res, true, None), Framing::None);
        *res.status_mut() = StatusCode::NO_CONTENT;
        assert_eq!(framing(&res, false, Some(0)), Framing::None);
        assert!(!head_of(&res, Framing::None, Some(0), false).contains("content-length"));
        let mut head_answer = Response::new(());
        assert!(head_of(&head_answer, Framing::None, Some(9), false).contains("content-length: 9\r\n"));
        *head_answer.status_mut() = StatusCode::NOT_MODIFIED;
        assert!(!head_of(&head_answer, Framing::None, Some(9), false).contains("content-length"));
    }

    #[test]
    fn chunk_lines_are_hex_lengths() {
        let mut buf = [0u8; 18];
        assert_eq!(chunk_line(0, &mut buf), b"0\r\n");
        assert_eq!(chunk_line(255, &mut buf), b"ff\r\n");
        assert_eq!(chunk_line(usize::MAX, &mut buf), b"ffffffffffffffff\r\n");
        assert_eq!(itoa(0, &mut [0; 20]), b"0");
        assert_eq!(itoa(u64::MAX, &mut [0; 20]), b"18446744073709551615");
    }
}

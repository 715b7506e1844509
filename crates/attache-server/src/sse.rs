//! Server-sent events, for every face that answers with them (stream reads,
//! `/_attache/events`): the event framing, and a response body that reads
//! its next batch only when the connection has room for it.
//!
//! A live reader's memory is bounded by what the connection buffers (a
//! bounded write buffer, see `conn`), plus one event of at most
//! [`EVENT_BYTES`] of stream data: a reader that stops reading stops the
//! reads, and the slow-reader timeout closes it.

use std::convert::Infallible;
use std::future::Future;

use axum::body::Body;
use axum::http::HeaderValue;
use axum::response::Response;
use bytes::Bytes;

/// Most stream bytes read for one SSE data event (fewer when `max_read_bytes` is lower).
pub const EVENT_BYTES: usize = 64 << 10;

/// One SSE event; every line of the payload gets its own `data:` line.
pub(crate) fn event(name: &str, payload: &str) -> Bytes {
    let mut out = String::with_capacity(payload.len() + 32);
    out.push_str("event: ");
    out.push_str(name);
    out.push('\n');
    for line in payload.split('\n') {
        // A reader strips one space after the colon: add one only when the line
        // itself starts with a space, so that space survives.
        out.push_str(if line.starts_with(' ') { "data: " } else { "data:" });
        out.push_str(line.strip_suffix('\r').unwrap_or(line));
        out.push('\n');
    }
    out.push('\n');
    Bytes::from(out)
}

/// Where a live SSE response gets its events.
pub(crate) trait Source: Send + 'static {
    /// The next events to send (waiting for them if need be); `None` ends the response.
    fn next(&mut self) -> impl Future<Output = Option<Bytes>> + Send;
}

/// A `text/event-stream` response whose body asks `source` for more only when
/// the connection has sent what it had.
pub(crate) fn response(source: impl Source) -> Response {
    let events = futures::stream::unfold(source, |mut source| async move {
        source.next().await.map(|bytes| (Ok::<_, Infallible>(bytes), source))
    });
    let mut res = Response::new(Body::from_stream(events));
    let hm = res.headers_mut();
    hm.insert("content-type", HeaderValue::from_static("text/event-stream"));
    hm.insert("cache-control", HeaderValue::from_static("no-cache"));
    hm.insert("x-accel-buffering", HeaderValue::from_static("no"));
    res
}

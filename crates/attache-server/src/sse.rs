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

/// The fields of a `control` event (PROTOCOL.md: SSE), as the protocol names them.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Control {
    pub next: attache_core::Offset,
    pub cursor: Option<attache_core::Cursor>,
    pub up_to_date: bool,
    pub closed: bool,
}

/// A `control` event, written directly: its JSON holds an offset and a
/// cursor (digits and `_`, never escaped) and two flags, keys in the order
/// a JSON object map gives them. Built through `serde_json::Value` it cost
/// ~7,000 instructions an event, a third of what 1,000 SSE subscribers
/// cost the server (callgrind, session 19); a test checks it is the JSON
/// that map would have made.
pub(crate) fn control(c: Control) -> Bytes {
    let mut out = String::with_capacity(128);
    out.push_str("event: control\ndata:{");
    if c.closed {
        out.push_str("\"streamClosed\":true,");
    }
    if let (Some(cursor), false) = (c.cursor, c.closed) {
        out.push_str("\"streamCursor\":\"");
        out.push_str(itoa::Buffer::new().format(cursor.0));
        out.push_str("\",");
    }
    out.push_str("\"streamNextOffset\":\"");
    c.next.push_to(&mut out);
    out.push('"');
    if c.up_to_date || c.closed {
        out.push_str(",\"upToDate\":true");
    }
    out.push_str("}\n\n");
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

/// The most data events [`SharedEvents`] keeps, and the largest it keeps.
const SHARED_EVENTS: usize = 64;
const SHARED_EVENT_BYTES: usize = 16 << 10;

/// Which bytes a data event carries: the same stream (ids are never reused),
/// the same range, the same encoding, hence the same event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct EventKey {
    pub stream: u64,
    pub start: u64,
    pub next: u64,
    pub base64: bool,
}

/// Data events formatted once for every SSE reader that reads the same bytes:
/// an append to a stream with 1,000 subscribers is read once (the store keeps
/// the read for live readers) and now framed once, not 1,000 times. Bounded:
/// at most [`SHARED_EVENTS`] events of at most [`SHARED_EVENT_BYTES`] each
/// (1 MiB), least recently used first out.
pub struct SharedEvents {
    events: parking_lot::Mutex<hashlink::LruCache<EventKey, Bytes>>,
}

impl Default for SharedEvents {
    fn default() -> Self {
        SharedEvents { events: parking_lot::Mutex::new(hashlink::LruCache::new(SHARED_EVENTS)) }
    }
}

impl SharedEvents {
    /// The event for `key`, framed by `frame` if no reader has framed it yet.
    pub(crate) fn get_or_frame(&self, key: EventKey, frame: impl FnOnce() -> Bytes) -> Bytes {
        if let Some(event) = self.events.lock().get(&key) {
            return event.clone();
        }
        let event = frame();
        if event.len() <= SHARED_EVENT_BYTES {
            self.events.lock().insert(key, event.clone());
        }
        event
    }

    pub fn len(&self) -> usize {
        self.events.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_is_framed_once_per_range_and_the_cache_stays_bounded() {
        let shared = SharedEvents::default();
        let key = EventKey { stream: 1, start: 0, next: 5, base64: false };
        let mut framed = 0;
        for _ in 0..3 {
            let event = shared.get_or_frame(key, || {
                framed += 1;
                event("data", "hello")
            });
            assert_eq!(&event[..], b"event: data\ndata:hello\n\n");
        }
        assert_eq!(framed, 1);
        // Another encoding of the same range is another event.
        shared.get_or_frame(EventKey { base64: true, ..key }, || event("data", "aGVsbG8="));
        assert_eq!(shared.len(), 2);
        for next in 0..(SHARED_EVENTS as u64 * 2) {
            shared.get_or_frame(EventKey { next, ..key }, || event("data", "x"));
        }
        assert_eq!(shared.len(), SHARED_EVENTS);
        // Too large to keep: framed every time.
        let big = "y".repeat(SHARED_EVENT_BYTES);
        let key = EventKey { stream: 2, start: 0, next: big.len() as u64, base64: false };
        let mut framed = 0;
        for _ in 0..2 {
            shared.get_or_frame(key, || {
                framed += 1;
                event("data", &big)
            });
        }
        assert_eq!(framed, 2);
    }
}

#[cfg(test)]
mod control_tests {
    use super::*;
    use attache_core::{Cursor, Offset};
    use proptest::prelude::*;

    /// The control event as it was built before: a JSON object map, shown.
    fn through_a_map(c: Control) -> Bytes {
        let mut map = serde_json::Map::new();
        map.insert("streamNextOffset".into(), c.next.to_string().into());
        if let (Some(cursor), false) = (c.cursor, c.closed) {
            map.insert("streamCursor".into(), cursor.to_string().into());
        }
        if c.up_to_date || c.closed {
            map.insert("upToDate".into(), true.into());
        }
        if c.closed {
            map.insert("streamClosed".into(), true.into());
        }
        event("control", &serde_json::Value::Object(map).to_string())
    }

    proptest! {
        #[test]
        fn a_control_event_is_the_json_a_map_of_its_fields_makes(
            next in any::<u64>(), cursor in proptest::option::of(any::<u64>()), up_to_date in any::<bool>(), closed in any::<bool>()
        ) {
            let c = Control { next: Offset(next), cursor: cursor.map(Cursor), up_to_date, closed };
            prop_assert_eq!(control(c), through_a_map(c));
        }
    }
}

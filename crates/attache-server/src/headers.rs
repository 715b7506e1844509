//! Protocol header names, and the layer that puts CORS and browser-security
//! headers on every response (PROTOCOL.md §12.7).

use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

pub const STREAM_NEXT_OFFSET: HeaderName = HeaderName::from_static("stream-next-offset");
pub const STREAM_CURSOR: HeaderName = HeaderName::from_static("stream-cursor");
pub const STREAM_UP_TO_DATE: HeaderName = HeaderName::from_static("stream-up-to-date");
pub const STREAM_CLOSED: HeaderName = HeaderName::from_static("stream-closed");
pub const STREAM_TTL: HeaderName = HeaderName::from_static("stream-ttl");
pub const STREAM_EXPIRES_AT: HeaderName = HeaderName::from_static("stream-expires-at");
pub const STREAM_SEQ: HeaderName = HeaderName::from_static("stream-seq");
pub const STREAM_FORKED_FROM: HeaderName = HeaderName::from_static("stream-forked-from");
pub const STREAM_FORK_OFFSET: HeaderName = HeaderName::from_static("stream-fork-offset");
pub const STREAM_FORK_SUB_OFFSET: HeaderName = HeaderName::from_static("stream-fork-sub-offset");
pub const SSE_DATA_ENCODING: HeaderName = HeaderName::from_static("stream-sse-data-encoding");
pub const PRODUCER_ID: HeaderName = HeaderName::from_static("producer-id");
pub const PRODUCER_EPOCH: HeaderName = HeaderName::from_static("producer-epoch");
pub const PRODUCER_SEQ: HeaderName = HeaderName::from_static("producer-seq");
pub const PRODUCER_EXPECTED_SEQ: HeaderName = HeaderName::from_static("producer-expected-seq");
pub const PRODUCER_RECEIVED_SEQ: HeaderName = HeaderName::from_static("producer-received-seq");

const EXPOSED: &str = "Stream-Next-Offset, Stream-Cursor, Stream-Up-To-Date, Stream-Closed, Stream-TTL, \
Stream-Expires-At, Stream-Sse-Data-Encoding, Producer-Epoch, Producer-Seq, Producer-Expected-Seq, \
Producer-Received-Seq, ETag, Location, Content-Type, Content-Length, Content-Range, Content-Disposition, Accept-Ranges";
const ALLOWED_HEADERS: &str = "Content-Type, Authorization, If-None-Match, If-Match, Range, Stream-Seq, Stream-TTL, \
Stream-Expires-At, Stream-Closed, Stream-Forked-From, Stream-Fork-Offset, Stream-Fork-Sub-Offset, Producer-Id, \
Producer-Epoch, Producer-Seq, Electric-Principal, Mcp-Session-Id, Mcp-Protocol-Version";
const ALLOWED_METHODS: &str = "GET, HEAD, POST, PUT, DELETE, OPTIONS";

/// Answers CORS preflights and stamps every response with CORS and security headers.
pub async fn cors_and_security(req: Request, next: Next) -> Response {
    let preflight = req.method() == Method::OPTIONS;
    let requested_headers = req.headers().get("access-control-request-headers").cloned();
    let mut res = if preflight { StatusCode::NO_CONTENT.into_response() } else { next.run(req).await };
    let h = res.headers_mut();
    h.insert("access-control-allow-origin", HeaderValue::from_static("*"));
    h.insert("access-control-expose-headers", HeaderValue::from_static(EXPOSED));
    h.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    h.insert("cross-origin-resource-policy", HeaderValue::from_static("cross-origin"));
    if preflight {
        h.insert("access-control-allow-methods", HeaderValue::from_static(ALLOWED_METHODS));
        // Echo what the browser asks for (it may be any header), after our own list.
        let allow = match requested_headers.as_ref().and_then(|v| v.to_str().ok()) {
            Some(asked) if !asked.is_empty() => format!("{ALLOWED_HEADERS}, {asked}"),
            _ => ALLOWED_HEADERS.to_owned(),
        };
        if let Ok(v) = HeaderValue::from_str(&allow) {
            h.insert("access-control-allow-headers", v);
        }
        h.insert("access-control-max-age", HeaderValue::from_static("86400"));
    }
    res
}

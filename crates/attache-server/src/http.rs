//! HTTP helpers every face shares, below the faces (none of them imports a
//! face): reading a bounded body or a JSON body, the entity a route names,
//! and setting a header from text. SSE framing is in `sse`, header names in
//! `headers`.

use attache_core::EntityUrl;
use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue};
use bytes::Bytes;
use http_body_util::BodyExt;

use crate::error::{ApiError, ApiResult};

/// Largest JSON body the entity routes accept.
pub const MAX_JSON_BODY: usize = 1 << 20;

/// The entity a route's `{type}/{id}` names, or 400.
pub fn entity_url(entity_type: &str, instance_id: &str) -> ApiResult<EntityUrl> {
    EntityUrl::new(entity_type, instance_id).map_err(ApiError::from)
}

/// Reads a JSON body (empty means `{}`), with a size limit and clear 400s.
pub async fn json_body<T: serde::de::DeserializeOwned>(headers: &HeaderMap, body: Body) -> ApiResult<T> {
    let bytes = read_body(body, headers, MAX_JSON_BODY).await?;
    let text = if bytes.iter().all(u8::is_ascii_whitespace) { &b"{}"[..] } else { &bytes[..] };
    serde_json::from_slice(text)
        .map_err(|e| ApiError::bad_request(format!("Request body does not match API schema: {e}")))
}

/// Reads a whole body of at most `limit` bytes; over it is a 413.
pub(crate) async fn read_body(body: Body, headers: &HeaderMap, limit: usize) -> ApiResult<Bytes> {
    let declared = headers.get("content-length").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::payload_too_large(limit));
    }
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
            Err(ApiError::payload_too_large(limit))
        }
        Err(e) => Err(ApiError::bad_request(format!("could not read the request body: {e}"))),
    }
}

/// Sets a header to `value` as text; a value that is not a valid header value is left out.
/// Formatted on the stack: offsets, lengths and tags cost one allocation (the value's), not two.
pub(crate) fn set(
    headers: &mut HeaderMap,
    name: impl axum::http::header::IntoHeaderName,
    value: impl std::fmt::Display,
) {
    use std::io::Write as _;
    let mut buf = [0u8; 96];
    let mut out = std::io::Cursor::new(&mut buf[..]);
    let formatted = match write!(out, "{value}") {
        Ok(()) => {
            let len = usize::try_from(out.position()).unwrap_or(0);
            HeaderValue::from_bytes(&buf[..len])
        }
        Err(_) => HeaderValue::from_str(&value.to_string()),
    };
    if let Ok(v) = formatted {
        headers.insert(name, v);
    }
}

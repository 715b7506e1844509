//! GET and HEAD .../attachments/{id} (whole or one byte range) and GET
//! .../attachments (the manifest, oldest first).

use attache_core::manifest::{AttachmentStatus, ManifestEntry};
use attache_core::{EntityUrl, Permission, PrincipalKey};
use attache_storage::{ReadFrom, StoreError, StreamInfo};
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};

use futures::StreamExt as _;

use crate::access::EntityRoute;
use crate::error::{ApiError, ApiResult};
use crate::http::set;
use crate::AppState;

use super::not_found;

/// The manifest entry `id` of the entity `route` names, for a caller that may `wanted` it.
async fn entry_for(state: &AppState, route: &EntityRoute, id: &str, wanted: Permission) -> ApiResult<ManifestEntry> {
    route.authorize(state, wanted).await?;
    let view = state.views.get(state.store.as_ref(), &route.url.main_stream()).await?;
    view.manifest.get(id).cloned().ok_or_else(not_found)
}

/// GET /_electric/entities/{type}/{id}/attachments [read]: the manifest, oldest first.
pub async fn list(State(state): State<AppState>, route: EntityRoute) -> ApiResult<Response> {
    let entity = &route.url;
    route.authorize(&state, Permission::Read).await?;
    let view = state.views.get(state.store.as_ref(), &entity.main_stream()).await?;
    let mut entries: Vec<std::borrow::Cow<ManifestEntry>> =
        view.manifest.values().map(|e| as_listed(entity, e)).collect();
    entries.sort_by(|a, b| a.created_at.cmp(&b.created_at).then_with(|| a.id.cmp(&b.id)));
    // Serialized from the entries themselves (a `json!` value copied every text value first).
    #[derive(serde::Serialize)]
    struct Listed<'a> {
        attachments: &'a [std::borrow::Cow<'a, ManifestEntry>],
    }
    crate::http::budgeted_json(&state.answers, &route.who, StatusCode::OK, &Listed { attachments: &entries })
}

/// An entry as the list shows it: one whose row names a stream other than
/// the one derived for it points at no bytes, so it is shown `failed`, with
/// the derived address.
pub(super) fn as_listed<'e>(entity: &EntityUrl, e: &'e ManifestEntry) -> std::borrow::Cow<'e, ManifestEntry> {
    if e.names_its_own_stream(entity) {
        return std::borrow::Cow::Borrowed(e);
    }
    let mut shown = e.clone();
    shown.stream_path = entity.attachment_stream(&e.id);
    shown.status = AttachmentStatus::Failed;
    shown.byte_length = None;
    shown.sha256 = None;
    shown.error = Some(UNOWNED_STREAM.into());
    std::borrow::Cow::Owned(shown)
}

/// Why a row that names a stream other than its own is not an attachment.
pub(super) const UNOWNED_STREAM: &str = "the manifest row names a stream that is not this attachment's";

/// `Content-Disposition` safe for any filename: an ASCII fallback plus RFC 5987 UTF-8.
pub fn content_disposition(filename: &str) -> String {
    let ascii: String = filename
        .chars()
        .map(|c| if c.is_ascii_graphic() && c != '"' && c != '\\' || c == ' ' { c } else { '_' })
        .collect();
    let mut encoded = String::new();
    for b in filename.bytes() {
        if b.is_ascii_alphanumeric() || b"!#$&+-.^_`|~".contains(&b) {
            encoded.push(b as char);
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    format!("attachment; filename=\"{ascii}\"; filename*=UTF-8''{encoded}")
}

/// A single byte range, resolved against a length.
#[derive(Debug, PartialEq, Eq)]
pub enum RangeRequest {
    Full,
    Partial(u64, u64),
    Unsatisfiable,
}

/// Parses `Range: bytes=a-b | a- | -n`. Several ranges, or other units, are
/// served whole (RFC 9110 lets a server ignore Range).
pub fn parse_range(header: Option<&str>, len: u64) -> RangeRequest {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else { return RangeRequest::Full };
    if spec.contains(',') {
        return RangeRequest::Full;
    }
    let Some((a, b)) = spec.trim().split_once('-') else { return RangeRequest::Unsatisfiable };
    // Digits only; a number past u64 stands for "past any end" (a valid
    // range such as `bytes=0-99999999999999999999999` is the whole blob, not 416).
    let num = |s: &str| match s.bytes().all(|c| c.is_ascii_digit()) && !s.is_empty() {
        true => Some(s.parse::<u64>().unwrap_or(u64::MAX)),
        false => None,
    };
    match (a.trim(), b.trim()) {
        ("", n) => match num(n) {
            Some(0) | None => RangeRequest::Unsatisfiable,
            Some(_) if len == 0 => RangeRequest::Unsatisfiable,
            Some(n) => RangeRequest::Partial(len.saturating_sub(n), len - 1),
        },
        (a, "") => match num(a) {
            Some(a) if a < len => RangeRequest::Partial(a, len - 1),
            _ => RangeRequest::Unsatisfiable,
        },
        (a, b) => match (num(a), num(b)) {
            (Some(a), Some(b)) if a <= b && a < len => RangeRequest::Partial(a, b.min(len - 1)),
            _ => RangeRequest::Unsatisfiable,
        },
    }
}

/// GET and HEAD /_electric/entities/{type}/{id}/attachments/{att} [read]
pub async fn read(
    State(state): State<AppState>,
    route: EntityRoute,
    Path((_, _, id)): Path<(String, String, String)>,
    method: Method,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let entity = &route.url;
    let entry = entry_for(&state, &route, &id, Permission::Read).await?;
    // A row naming a stream other than the one derived for it points at no bytes.
    let path = entry.bytes_path(entity).ok_or_else(not_found)?;
    if entry.status != AttachmentStatus::Complete {
        return Err(ApiError::new(StatusCode::CONFLICT, "NOT_COMPLETE", "Attachment is not complete"));
    }
    // A complete attachment without a length keeps no bytes (a task's JSON,
    // text or URL attachment, whose value is in its row): whatever stream is
    // at its address (the bytes of a version it replaced, left by releases
    // before session 14) is not its content.
    if entry.byte_length.is_none() {
        return Err(not_found());
    }
    let mut info = state.store.head(&path).await.map_err(|_| not_found())?;
    // This instance's view of the stream may be older than the complete row
    // (another instance of a shared store wrote both a moment ago: the row
    // was read from the database, the stream's tail is what this instance
    // last heard). Answered from that view, the read was a truncated file
    // with `200`, the row's hash as its ETag and an immutable cache header
    // (session 18). Asked of the store itself instead; a stream still
    // shorter than its row says is not served as the attachment.
    if entry.byte_length.is_some_and(|n| info.tail < n) {
        info = state.store.head_fresh(&path).await.map_err(|_| not_found())?;
        if let Some(n) = entry.byte_length.filter(|&n| info.tail < n) {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "ATTACHMENT_NOT_READABLE_YET",
                format!("the attachment's row records {n} bytes and its stream holds {} of them; retry", info.tail),
            )
            .with_header(axum::http::header::RETRY_AFTER, 1));
        }
    }
    let len = info.tail;
    // The content hash the store keeps for stored blobs; the row's only for resumable uploads.
    let sha256 = info.blob.as_ref().map(|b| b.sha256.as_str()).or(entry.sha256.as_deref());
    let etag = format!("\"{}\"", sha256.unwrap_or("none"));
    let mut res = if headers
        .get("if-none-match")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"))
    {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        let range = parse_range(headers.get("range").and_then(|v| v.to_str().ok()), len);
        let (status, start, end) = match range {
            RangeRequest::Full => (StatusCode::OK, 0, len),
            RangeRequest::Partial(a, b) => (StatusCode::PARTIAL_CONTENT, a, b + 1),
            RangeRequest::Unsatisfiable => {
                return Err(ApiError::new(
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    "RANGE_NOT_SATISFIABLE",
                    "range not satisfiable",
                )
                .with_header(axum::http::header::CONTENT_RANGE, format!("bytes */{len}")));
            }
        };
        // A HEAD answers the same headers and reads no byte. A read begun
        // while answers not yet sent hold the whole response budget would
        // only wait (`body_for`): answered 503 at once instead, before it
        // opens anything.
        if method != Method::HEAD
            && end - start >= crate::http::SEND_BUDGET_FROM as u64
            && state.answers.is_full(&route.who)
        {
            return Err(state.answers.exhausted());
        }
        let body = if method == Method::HEAD {
            Body::empty()
        } else {
            body_for(&state, &route.who, &info, start, end).await?
        };
        let mut res = Response::new(body);
        *res.status_mut() = status;
        let hm = res.headers_mut();
        set(hm, "content-length", end - start);
        if status == StatusCode::PARTIAL_CONTENT {
            set(hm, "content-range", format!("bytes {start}-{}/{len}", end - 1));
        }
        set(hm, "content-type", &entry.mime_type);
        res
    };
    let hm = res.headers_mut();
    set(hm, "etag", etag);
    set(hm, "accept-ranges", "bytes");
    set(hm, "cache-control", "private, max-age=31536000, immutable");
    set(hm, "content-disposition", content_disposition(entry.filename.as_deref().unwrap_or(&entry.id)));
    Ok(res)
}

/// The bytes `[start, end)` of an attachment stream, streamed from storage
/// (a stored blob's range is all the store reads, in bounded chunks), each
/// chunk within the response budget until it is sent (`http::paced`).
pub(super) async fn body_for(
    state: &AppState,
    who: &PrincipalKey,
    info: &StreamInfo,
    start: u64,
    end: u64,
) -> ApiResult<Body> {
    if let Some(blob) = &info.blob {
        let read = state.store.read_blob(&blob.sha256, start..end).await?;
        if read.range != (start..end) {
            // Headers promise `end - start` bytes: a blob shorter than its stream says is an error, not a short body.
            return Err(StoreError::Storage(format!(
                "blob {} holds {:?} of {start}..{end} (its length is {})",
                blob.sha256, read.range, read.len
            ))
            .into());
        }
        let chunks =
            crate::http::paced(state.answers.clone(), who.clone(), end - start, attache_storage::BLOB_CHUNK, read.body);
        return Ok(Body::from_stream(chunks));
    }
    // A resumable upload's bytes live in the stream's rows: read them in slices.
    let store = state.store.clone();
    let path = info.path.clone();
    let stream = futures::stream::try_unfold(start, move |pos| {
        let store = store.clone();
        let path = path.clone();
        async move {
            if pos >= end {
                return Ok::<_, std::io::Error>(None);
            }
            let want = ((end - pos) as usize).min(RESUMABLE_SLICE);
            let batch = store
                .read(&path, ReadFrom::At(attache_core::Offset(pos)), want)
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            let mut bytes = batch.body;
            bytes.truncate(want);
            if bytes.is_empty() {
                return Ok(None);
            }
            let next = pos + bytes.len() as u64;
            Ok(Some((bytes, next)))
        }
    });
    Ok(Body::from_stream(crate::http::paced(
        state.answers.clone(),
        who.clone(),
        end - start,
        RESUMABLE_SLICE,
        stream.boxed(),
    )))
}

/// The most of a resumable upload's rows one chunk of its read carries.
const RESUMABLE_SLICE: usize = 1 << 20;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_follow_rfc_9110() {
        assert_eq!(parse_range(None, 10), RangeRequest::Full);
        assert_eq!(parse_range(Some("bytes=0-4"), 10), RangeRequest::Partial(0, 4));
        assert_eq!(parse_range(Some("bytes=5-"), 10), RangeRequest::Partial(5, 9));
        assert_eq!(parse_range(Some("bytes=-3"), 10), RangeRequest::Partial(7, 9));
        assert_eq!(parse_range(Some("bytes=-30"), 10), RangeRequest::Partial(0, 9));
        assert_eq!(parse_range(Some("bytes=8-100"), 10), RangeRequest::Partial(8, 9));
        assert_eq!(parse_range(Some("bytes=10-"), 10), RangeRequest::Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=5-2"), 10), RangeRequest::Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=-0"), 10), RangeRequest::Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=0-0"), 0), RangeRequest::Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=0-1,3-4"), 10), RangeRequest::Full);
        assert_eq!(parse_range(Some("items=0-1"), 10), RangeRequest::Full);
        assert_eq!(parse_range(Some("bytes=x-1"), 10), RangeRequest::Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=2-99999999999999999999999"), 10), RangeRequest::Partial(2, 9));
        assert_eq!(parse_range(Some("bytes=-99999999999999999999999"), 10), RangeRequest::Partial(0, 9));
        assert_eq!(parse_range(Some("bytes=99999999999999999999999-"), 10), RangeRequest::Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=-"), 10), RangeRequest::Unsatisfiable);
    }

    #[test]
    fn content_disposition_is_safe_for_any_filename() {
        let d = content_disposition("r\u{e9}sum\u{e9} \"final\"\r\n.pdf");
        assert!(d.starts_with("attachment; filename=\"r_sum_ _final___.pdf\"; filename*=UTF-8''"));
        assert!(!d.contains('\r') && !d.contains('\n'));
        assert!(d.ends_with("r%C3%A9sum%C3%A9%20%22final%22%0D%0A.pdf"));
    }
}

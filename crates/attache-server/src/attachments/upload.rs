//! POST .../attachments (multipart/form-data): the streamed upload. The
//! bytes go to a staging file while SHA-256 and the length are computed.

use std::collections::HashSet;

use attache_core::manifest::{AttachmentStatus, ManifestEntry};
use attache_core::{ContentType, EntityUrl, Permission, StreamPath};
use attache_storage::{CreateStream, RowGuard, StagedBlob, StoreError};
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::access::{hold_life, EntityRoute};
use crate::error::{ApiError, ApiResult};
use crate::rows::{new_txid, not_running};
use crate::{AppState, StoreConfig};

use super::pace::{Paced, UploadStalled};
use super::pending::{begin, entry_append, reserve, with_subject, Pending};
use super::{duplicate, hold_meta, too_large, Fields, INTERRUPTED};

/// The answer to a broken or oversized form. `max` is the attachment limit:
/// a file over it gets the same answer whether its size was declared
/// (Content-Length) or found while streaming (chunked, or a form whose
/// other parts kept it under the declared bound).
pub(super) fn multipart_error(e: multer::Error, max: u64) -> ApiError {
    match e {
        multer::Error::StreamReadFailed(e) if e.is::<crate::multipart::PartHeadersTooLarge>() => {
            ApiError::new(StatusCode::BAD_REQUEST, "PART_HEADERS_TOO_LARGE", e.to_string())
        }
        multer::Error::StreamReadFailed(e) if e.is::<UploadStalled>() => match e.downcast_ref::<UploadStalled>() {
            Some(stalled) => stalled.refusal(),
            None => crate::http::body_read_timeout(e.to_string()),
        },
        multer::Error::FieldSizeExceeded { ref field_name, .. } if field_name.as_deref() == Some("file") => {
            too_large(max)
        }
        multer::Error::StreamSizeExceeded { .. } | multer::Error::FieldSizeExceeded { .. } => {
            ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "PAYLOAD_TOO_LARGE", format!("multipart part too large: {e}"))
        }
        multer::Error::IncompleteStream
        | multer::Error::IncompleteFieldData { .. }
        | multer::Error::IncompleteHeaders
        | multer::Error::StreamReadFailed(_) => {
            ApiError::new(StatusCode::BAD_REQUEST, INTERRUPTED, format!("the upload ended early: {e}"))
        }
        other => ApiError::bad_request(format!("Invalid multipart form data: {other}")),
    }
}

/// POST /_electric/entities/{type}/{id}/attachments (multipart/form-data) [write]
pub async fn upload(
    State(state): State<AppState>,
    route: EntityRoute,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let EntityRoute { who, url: entity } = &route;
    let record = route.authorize(&state, Permission::Write).await?;
    if !record.is_running() {
        return Err(not_running());
    }
    // Its stream will be the uploader's to hold: room for it before any byte is read.
    let _room = crate::streams::stream_room(&state, who, 1)?;
    let content_type = headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("");
    let boundary = multer::parse_boundary(content_type)
        .map_err(|_| ApiError::bad_request("Attachment uploads must use multipart/form-data"))?;
    let max = state.config.max_attachment_bytes;
    const FORM_OVERHEAD: u64 = 1 << 20;
    let declared = headers.get("content-length").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max + FORM_OVERHEAD) {
        return Err(too_large(max));
    }
    let constraints = multer::Constraints::new().size_limit(
        multer::SizeLimit::new().per_field(64 << 10).for_field("file", max + 1).whole_stream(max + FORM_OVERHEAD),
    );
    let limits = &state.config;
    // A place among the uploads in progress, within the caller's share, before any file is opened; held until the answer.
    let _slot = state.upload_slots.take(who, &state.metrics)?;
    let paced = Paced::new(body.into_data_stream(), limits.upload_idle_timeout, limits.upload_min_rate);
    let guarded = crate::multipart::PartHeaderGuard::new(paced, &boundary, limits.multipart_max_part_header_bytes);
    let mut form = multer::Multipart::with_constraints(guarded, boundary, constraints);
    let mut fields = Fields::default();
    let mut seen = HashSet::new();
    // The upload's guard: its reserved id and pending row, settled on every path (`Pending`).
    let mut pending: Option<Pending> = None;
    // What its `meta` holds, from the body budget, until the upload is answered.
    let mut meta_held = None;
    let outcome: ApiResult<Response> = async {
        let mut staged = None;
        while let Some(mut field) = form.next_field().await.map_err(|e| multipart_error(e, max))? {
            let name = field.name().unwrap_or("").to_owned();
            if name != "file" {
                if seen.len() >= limits.multipart_max_fields {
                    return Err(ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "TOO_MANY_FIELDS",
                        format!("a form has at most {} text fields", limits.multipart_max_fields),
                    ));
                }
                if !seen.insert(name.clone()) {
                    return Err(ApiError::bad_request(format!("field {name:?} is sent twice")));
                }
                let text = field.text().await.map_err(|e| multipart_error(e, max))?;
                if name == "meta" {
                    meta_held = Some(hold_meta(&state, who, &text)?);
                }
                fields.set(&name, text)?;
                continue;
            }
            if staged.is_some() {
                return Err(ApiError::bad_request("only one file may be uploaded per request"));
            }
            if field.file_name().is_some_and(|f| f.len() > 1024) {
                return Err(ApiError::bad_request("filename is at most 1024 bytes"));
            }
            let part_type = field.content_type().map(|m| m.to_string());
            if fields.filename.is_none() {
                fields.filename = field.file_name().map(str::to_owned);
            }
            // With its id and subject known before the bytes, the upload is
            // recorded as pending at once (a manifest row always names its
            // subject, as Electric's schema requires); otherwise its first
            // row is its outcome.
            if let (Some(id), Ok(Some(_))) = (fields.id.clone(), fields.subject()) {
                pending = Some(begin(&state, &record, entity, &id, &fields, who, part_type.as_deref()).await?);
            }
            fields.mime_type = fields.mime_type.take().or(part_type);
            let mut writer = state.store.stage_blob().await?;
            while let Some(chunk) = field.chunk().await.map_err(|e| multipart_error(e, max))? {
                if writer.len() + chunk.len() as u64 > max {
                    return Err(too_large(max));
                }
                writer.write(chunk).await?;
            }
            staged = Some(writer.finish().await?);
        }
        let blob = staged.ok_or_else(|| ApiError::bad_request("Missing file field"))?;
        // Fields after the file part complete the entry; checked before anything else is written.
        let id = pending.as_ref().map(|p| p.entry.id.clone()).or_else(|| fields.id.clone()).unwrap_or_else(new_txid);
        let fresh = with_subject(fields.entry(entity, &id, who, None)?)?;
        if pending.is_none() {
            pending = Some(reserve(&state, entity, fresh.clone()).await?);
        }
        let Some(upload) = pending.as_mut() else { return Err(ApiError::internal("an upload lost its reservation")) };
        let entry = complete(&upload.entry, fresh, &blob);
        let row = entry_append(entity, &entry, &upload.txid, !upload.row)?;
        // Purged (and perhaps spawned again by someone else) while the bytes
        // arrived: nothing of this upload may land in the entity's next life.
        // The life is held until the blob stream and its row commit, together.
        let _life = hold_life(&state, &record).await?;
        let stream = CreateStream {
            path: StreamPath::new(entry.stream_path.clone())?,
            content_type: ContentType::parse(&entry.mime_type).ok(),
            ttl: None,
            expires_at: None,
            closed: true,
            initial: Default::default(),
            fork: None,
            owner: Some(who.to_string()),
            take_kept_path: true,
        };
        let guard = commit_guard(&state, entity, upload).await?;
        crate::pause::at(&state, crate::pause::UPLOAD_COMMIT).await;
        state.store.create_blob_stream_and_append(stream, blob, row, guard).await.map_err(|e| match e {
            StoreError::ConfigMismatch(_) => duplicate(&entry.id),
            StoreError::Moved => taken_over(&entry.id),
            StoreError::Closed { .. } => not_running(),
            other => other.into(),
        })?;
        upload.settled();
        Ok((StatusCode::CREATED, Json(json!({ "txid": upload.txid, "attachment": entry }))).into_response())
    }
    .await;
    let err = match outcome {
        Ok(response) => return Ok(response),
        Err(err) => err,
    };
    if let Some(p) = pending {
        p.fail(&state, &record, &err).await;
    }
    drop(meta_held);
    Err(err)
}

/// What the commit of an upload is guarded by: on PostgreSQL, the id's row
/// as the upload left it (its own `pending` row; without one, none or a
/// `failed` attempt), read now and guarded from there (`RowGuard` on the
/// manifest key), so the blob stream and the `complete` row are written
/// only while no other write of the id came since. Another instance holds
/// none of our reservations: once the upload outlived `upload_expiry` it may
/// settle the `pending` row, delete the attachment, or begin an upload of
/// its own, and this commit then brought the attachment back after the
/// delete, or wrote over the other upload's row. Refused (409
/// [`taken_over`]) when the row is no longer the upload's. The embedded
/// store is one process: the reservation already keeps every other writer
/// of the id away, and a guard would only risk a refusal for nothing (its
/// forgotten keys), which would cost the staged bytes.
async fn commit_guard(state: &AppState, entity: &EntityUrl, upload: &Pending<'_>) -> ApiResult<Option<RowGuard>> {
    if state.config.store == StoreConfig::Embedded {
        return Ok(None);
    }
    let id = upload.entry.id.as_str();
    let view = state.views.get(state.store.as_ref(), &entity.main_stream()).await?;
    let current = view.manifest.get(id);
    let still_its_own = match upload.row {
        true => current == Some(&upload.entry),
        false => current.is_none_or(|e| e.status == AttachmentStatus::Failed),
    };
    if !still_its_own {
        return Err(taken_over(id));
    }
    Ok(Some(RowGuard { key: ManifestEntry::row_key(id), since: view.tail() }))
}

/// 409 `DUPLICATE_ID`: another request wrote the id while this upload ran
/// (through another instance: an upload of its own, or the settling and
/// delete of this one once it outlived `upload_expiry`); nothing was stored.
fn taken_over(id: &str) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "DUPLICATE_ID",
        format!("Attachment id \"{id}\" was taken by another request while this upload ran; nothing was stored"),
    )
}

/// The `complete` entry of an upload: what the form said (`fresh`), under
/// the id, address and creation the upload began with, and the blob's hash and length.
fn complete(begun: &ManifestEntry, fresh: ManifestEntry, blob: &StagedBlob) -> ManifestEntry {
    ManifestEntry {
        status: AttachmentStatus::Complete,
        sha256: Some(blob.sha256.clone()),
        byte_length: Some(blob.len),
        subject: fresh.subject,
        role: fresh.role,
        meta: fresh.meta,
        ext: fresh.ext,
        filename: fresh.filename,
        mime_type: fresh.mime_type,
        ..begun.clone()
    }
}

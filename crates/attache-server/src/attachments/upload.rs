//! POST .../attachments (multipart/form-data): the streamed upload. The
//! bytes go to a staging file while SHA-256 and the length are computed.

use std::collections::HashSet;

use attache_core::manifest::AttachmentStatus;
use attache_core::{ContentType, Permission, StreamPath};
use attache_storage::{CreateStream, StoreError};
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::access::{hold_life, EntityRoute};
use crate::error::{ApiError, ApiResult};
use crate::rows::{new_txid, not_running};
use crate::AppState;

use super::pending::{begin, retract, with_subject, write_entry, Pending};
use super::{duplicate, too_large, Fields, INTERRUPTED};

/// The answer to a broken or oversized form. `max` is the attachment limit:
/// a file over it gets the same answer whether its size was declared
/// (Content-Length) or found while streaming (chunked, or a form whose
/// other parts kept it under the declared bound).
pub(super) fn multipart_error(e: multer::Error, max: u64) -> ApiError {
    match e {
        multer::Error::StreamReadFailed(e) if e.is::<crate::multipart::PartHeadersTooLarge>() => {
            ApiError::new(StatusCode::BAD_REQUEST, "PART_HEADERS_TOO_LARGE", e.to_string())
        }
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
    let guarded = crate::multipart::PartHeaderGuard::new(
        body.into_data_stream(),
        &boundary,
        limits.multipart_max_part_header_bytes,
    );
    let mut form = multer::Multipart::with_constraints(guarded, boundary, constraints);
    let mut fields = Fields::default();
    let mut seen = HashSet::new();
    let mut pending: Option<Pending> = None;
    let mut staged = None;
    let outcome: ApiResult<()> = async {
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
            // recorded as pending at once; otherwise once every field is in
            // (a manifest row always names its subject, as Electric's schema requires).
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
        Ok(())
    }
    .await;
    let failure = match outcome {
        Ok(()) if staged.is_none() => Some(ApiError::bad_request("Missing file field")),
        Ok(()) => None,
        Err(e) => Some(e),
    };
    if let Some(err) = failure {
        if let Some(p) = pending.as_ref() {
            // Only into the life the upload began in (purged meanwhile: nowhere).
            if let Ok(_life) = hold_life(&state, &record).await {
                // A refused request changes nothing; an upload that broke off is recorded as failed.
                let refusal = err.refusal();
                if refusal.status.is_client_error() && refusal.code != INTERRUPTED {
                    retract(&state, entity, &p.entry.id, &p.txid).await;
                } else {
                    let mut failed = p.entry.clone();
                    failed.status = AttachmentStatus::Failed;
                    failed.error = Some(refusal.message);
                    let _ = write_entry(&state, entity, &failed, &p.txid).await;
                }
            }
        }
        return Err(err);
    }
    let Some(blob) = staged else { return Err(ApiError::bad_request("Missing file field")) };
    // Fields after the file part complete the entry; check them before anything else is written.
    let id = pending.as_ref().map(|p| p.entry.id.clone()).or_else(|| fields.id.clone()).unwrap_or_else(new_txid);
    let fresh = match fields.entry(entity, &id, who, None).and_then(with_subject) {
        Ok(entry) => entry,
        Err(err) => {
            if let Some(p) = &pending {
                retract(&state, entity, &p.entry.id, &p.txid).await;
            }
            return Err(err);
        }
    };
    let mut pending = match pending {
        Some(p) => p,
        None => begin(&state, &record, entity, &id, &fields, who, None).await?,
    };
    let mut entry = pending.entry.clone();
    entry.subject = fresh.subject;
    entry.role = fresh.role;
    entry.meta = fresh.meta;
    entry.ext = fresh.ext;
    entry.filename = fresh.filename;
    entry.mime_type = fresh.mime_type;
    let (sha256, len) = (blob.sha256.clone(), blob.len);
    let created = state
        .store
        .create_blob_stream(
            CreateStream {
                path: StreamPath::new(entry.stream_path.clone())?,
                content_type: ContentType::parse(&entry.mime_type).ok(),
                ttl: None,
                expires_at: None,
                closed: true,
                initial: Default::default(),
                fork: None,
                owner: Some(who.to_string()),
                take_kept_path: true,
            },
            blob,
        )
        .await;
    let created = match created {
        Ok(created) => created,
        Err(e) => {
            retract(&state, entity, &entry.id, &pending.txid).await;
            return Err(match e {
                StoreError::ConfigMismatch(_) => duplicate(&entry.id),
                other => other.into(),
            });
        }
    };
    entry.status = AttachmentStatus::Complete;
    entry.sha256 = Some(sha256);
    entry.byte_length = Some(len);
    // Purged (and perhaps spawned again by someone else) while the bytes
    // arrived: nothing of this upload may land in the entity's next life. The
    // life is held until the row is written, so a purge waits for it.
    let life = match hold_life(&state, &record).await {
        Ok(life) => life,
        Err(e) => {
            pending.settled();
            // The stream this upload made, never one the next life made at its path since.
            let _ = state.store.delete_id(&entry.stream_path, created.id).await;
            return Err(e);
        }
    };
    if let Err(e) = write_entry(&state, entity, &entry, &pending.txid).await {
        // The entity stopped meanwhile: the bytes go; the pending row stays as the record of the attempt.
        pending.settled();
        let _ = state.store.delete_id(&entry.stream_path, created.id).await;
        return Err(e);
    }
    drop(life);
    pending.settled();
    Ok((StatusCode::CREATED, Json(json!({ "txid": pending.txid, "attachment": entry }))).into_response())
}

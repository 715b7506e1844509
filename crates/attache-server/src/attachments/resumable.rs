//! PUT .../attachments/{id}: a resumable upload over an open attachment
//! stream (appends with producer headers, closed to finish), its size limit
//! and its finalization (hash, `complete` row).

use attache_core::manifest::{validate_new_attachment_id, AttachmentStatus};
use attache_core::{ContentType, Permission, StreamPath};
use attache_storage::{CreateStream, StoreError};
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::access::EntityRoute;
use crate::error::ApiResult;
use crate::http::json_body;
use crate::rows::not_running;
use crate::AppState;

use super::pending::{begin, retract, with_subject, OpenUpload};
use super::{duplicate, too_large, Fields};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ResumableBody {
    mime_type: Option<String>,
    filename: Option<String>,
    subject: Option<Value>,
    role: Option<String>,
    meta: Option<Map<String, Value>>,
    key: Option<String>,
}

/// PUT /_electric/entities/{type}/{id}/attachments/{att} [write]: starts a
/// resumable upload. The bytes are appended to the open attachment stream
/// (with idempotent-producer headers) and the stream is closed to finish.
pub async fn begin_resumable(
    State(state): State<AppState>,
    route: EntityRoute,
    Path((_, _, id)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let EntityRoute { who, url: entity } = &route;
    validate_new_attachment_id(&id)?;
    let (body, _tree): (ResumableBody, _) = json_body(&state.bodies, who, &headers, body).await?;
    let record = route.authorize(&state, Permission::Write).await?;
    if !record.is_running() {
        return Err(not_running());
    }
    let _room = crate::streams::stream_room(&state, who, 1)?;
    let mut fields = Fields::default();
    let subject = body.subject.map(|s| s.to_string());
    for (name, value) in [
        ("mimeType", body.mime_type),
        ("filename", body.filename),
        ("subject", subject),
        ("role", body.role),
        ("key", body.key),
    ] {
        if let Some(v) = value {
            fields.set(name, v)?;
        }
    }
    fields.set_meta(body.meta)?;
    with_subject(fields.entry(entity, &id, who, None)?)?;
    let path = entity.attachment_stream(&id);
    {
        let view = state.views.get(state.store.as_ref(), &entity.main_stream()).await?;
        if let Some(existing) = view.manifest.get(&id) {
            let same_upload = existing.status == AttachmentStatus::Pending
                && existing.created_by.as_deref() == Some(who.url().as_str())
                && state.store.head(&path).await.is_ok_and(|i| !i.closed);
            if same_upload {
                let mut existing = existing.clone();
                existing.stream_path = path.clone();
                return Ok((StatusCode::OK, Json(json!({ "attachment": existing }))).into_response());
            }
            if existing.status != AttachmentStatus::Failed {
                return Err(duplicate(&id));
            }
        }
    }
    let mut pending = begin(&state, &record, entity, &id, &fields, who, None).await?;
    let created = state
        .store
        .create(CreateStream {
            path: StreamPath::new(path.clone())?,
            // Bytes as uploaded, whatever the type: JSON mode would reframe them.
            content_type: ContentType::parse(&pending.entry.mime_type).ok().map(|t| t.stored_as_bytes()),
            ttl: None,
            expires_at: None,
            closed: false,
            initial: Default::default(),
            fork: None,
            owner: Some(who.to_string()),
            take_kept_path: true,
        })
        .await;
    // The upload goes on after this request, through the stream; expiry ends it if it is never closed.
    pending.settled();
    if let Err(e) = created {
        retract(&state, entity, &pending.entry, &pending.txid).await;
        return Err(match e {
            StoreError::ConfigMismatch(_) => duplicate(&id),
            other => other.into(),
        });
    }
    state.uploads.1.lock().insert(path, OpenUpload { entity: entity.clone(), id: id.clone() });
    Ok((StatusCode::CREATED, Json(json!({ "txid": pending.pending_txid, "attachment": pending.entry })))
        .into_response())
}

/// Checks that an append to a resumable attachment stream stays within the size limit.
pub async fn check_append_size(state: &AppState, path: &str, body_len: usize) -> ApiResult<()> {
    if let Ok(info) = state.store.head(path).await {
        if info.tail + body_len as u64 > state.config.max_attachment_bytes {
            return Err(too_large(state.config.max_attachment_bytes));
        }
    }
    Ok(())
}

//! DELETE .../attachments/{id}: the manifest delete row, then the bytes at
//! the address derived for them; 409 `UPLOAD_IN_PROGRESS` while the
//! attachment's upload runs (see [`super::hold_id`]).

use attache_core::manifest::{validate_attachment_id, ManifestEntry, MANIFEST};
use attache_core::state::{timestamp, ChangeEvent};
use attache_core::{EntityUrl, Permission};
use attache_storage::{EntityRecord, StoreError};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::access::{hold_life, now_ms, EntityRoute};
use crate::error::ApiResult;
use crate::rows::{append_rows, new_txid};
use crate::AppState;

use super::not_found;
use super::pending::hold_id;

/// DELETE /_electric/entities/{type}/{id}/attachments/{att} [write]: a manifest
/// delete row, then the bytes are released (kept while another attachment holds the same content).
pub async fn delete(
    State(state): State<AppState>,
    route: EntityRoute,
    Path((_, _, id)): Path<(String, String, String)>,
) -> ApiResult<Response> {
    let entity = &route.url;
    let record = route.authorize(&state, Permission::Write).await?;
    {
        let view = state.views.get(state.store.as_ref(), &entity.main_stream()).await?;
        view.manifest.get(&id).ok_or_else(not_found)?;
    }
    let txid = delete_entry(&state, &record, entity, &id).await?;
    Ok((StatusCode::OK, Json(json!({ "txid": txid }))).into_response())
}

/// Deletes the attachment `id`: its manifest row, then the bytes at the
/// address derived for it (never at a path a row names), both only in the
/// life of the entity `record` was read from (404 once it was purged: the
/// URL may hold someone else's entity, with an attachment of the same id).
/// While the upload of `id` runs, 409 `UPLOAD_IN_PROGRESS`: its final row
/// would bring the attachment back after a 200 ([`hold_id`], held until the
/// delete is done, so no upload of the id begins or commits meanwhile; the
/// row is read under it: a settled upload shows its outcome).
pub async fn delete_entry(state: &AppState, record: &EntityRecord, entity: &EntityUrl, id: &str) -> ApiResult<String> {
    validate_attachment_id(id)?;
    let _life = hold_life(state, record).await?;
    let _held = hold_id(state, entity, id).await?;
    let entry = {
        let view = state.views.get(state.store.as_ref(), &entity.main_stream()).await?;
        view.manifest.get(id).cloned().ok_or_else(not_found)?
    };
    // The stream at the derived address before the row goes: that one is
    // deleted after it, never one a new upload of the same id made since.
    let path = entry.bytes_path(entity).unwrap_or_else(|| entity.attachment_stream(id));
    let stream = match state.store.head(&path).await {
        Ok(info) => Some(info.id),
        Err(StoreError::NotFound) | Err(StoreError::Gone) => None,
        Err(e) => return Err(e.into()),
    };
    let txid = new_txid();
    let row = ChangeEvent::delete(MANIFEST, &ManifestEntry::row_key(id), &txid, &timestamp(now_ms()));
    append_rows(state.store.as_ref(), &entity.main_stream(), &[row], false).await?;
    let Some(stream) = stream else { return Ok(txid) };
    match state.store.delete_id(&path, stream).await {
        Ok(()) | Err(StoreError::NotFound) | Err(StoreError::Gone) => Ok(txid),
        Err(e) => Err(e.into()),
    }
}

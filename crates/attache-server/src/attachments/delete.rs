//! DELETE .../attachments/{id}: the manifest delete row and the bytes at the
//! address derived for them, in one commit conditioned on what the delete
//! read; 409 `UPLOAD_IN_PROGRESS` while the attachment's upload runs (see
//! [`super::hold_id`]), on this instance or another.

use attache_core::manifest::{validate_attachment_id, AttachmentStatus, ManifestEntry, MANIFEST};
use attache_core::state::{timestamp, ChangeEvent};
use attache_core::{EntityUrl, Permission};
use attache_storage::{EntityRecord, StoreError, StreamAt};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::access::{hold_life, now_ms, EntityRoute};
use crate::error::ApiResult;
use crate::rows::new_txid;
use crate::AppState;

use super::not_found;
use super::pending::{hold_id, is_pending, open_resumable, upload_in_progress, write_decided, Decided, WhileOpen};

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

/// Deletes the attachment `id`: its manifest row and the bytes at the
/// address derived for it (never at a path a row names), in one
/// conditional store call, both only in the life of the entity `record` was
/// read from (404 once it was purged: the URL may hold someone else's
/// entity, with an attachment of the same id). While the upload of `id`
/// runs, 409 `UPLOAD_IN_PROGRESS`: its final row would bring the attachment
/// back after a 200 ([`hold_id`], held until the delete is done, so no
/// upload of the id begins or commits on this instance meanwhile). A
/// resumable upload whose stream is still open when the delete is asked is
/// not waited for: the delete ends it, its row and its stream in one commit
/// (a chunk or a close sent after that is refused: 409 `USE_ENTITY_ROUTES`,
/// no upload there); an upload begun after the delete looked is 409.
///
/// Another instance (PostgreSQL) holds none of our reservations: an upload
/// of `id` may begin there between our reading the row and our writing its
/// delete. So the delete is written only against what it was decided from
/// ([`StreamStore::append_guarded`](attache_storage::StreamStore::append_guarded)):
/// no guarded row of the attachment's key past where it read (a new
/// upload's `pending` row, another delete), and the stream seen at the
/// address (no stream made there since). When either moved, the row is read
/// again and the delete decided again (409 if an upload now runs); a stream
/// another upload made at the address is never deleted, and no row is left
/// naming bytes that are gone.
pub async fn delete_entry(state: &AppState, record: &EntityRecord, entity: &EntityUrl, id: &str) -> ApiResult<String> {
    validate_attachment_id(id)?;
    let _life = hold_life(state, record).await?;
    let _held = hold_id(state, entity, id, WhileOpen::Abort).await?;
    // The resumable upload this delete ends, when the attachment is one still
    // open as it is asked: that upload only (its stream), never one begun
    // since (on PostgreSQL perhaps through another instance), which is 409.
    let ending = match is_pending(state, entity, id).await? {
        true => open_resumable(state, entity, id).await?,
        false => None,
    };
    let txid = new_txid();
    let row_txid = &txid;
    let pause = Some(crate::pause::ATTACHMENT_DELETE);
    let deleted = write_decided(state, entity, id, pause, move || async move {
        let (entry, tail) = {
            let view = state.views.get(state.store.as_ref(), &entity.main_stream()).await?;
            (view.manifest.get(id).cloned().ok_or_else(not_found)?, view.tail())
        };
        // An upload that began (elsewhere) since `hold_id` looked, unless it
        // is the resumable one still open that the delete ends.
        let aborting = entry.status == AttachmentStatus::Pending;
        if aborting && (ending.is_none() || open_resumable(state, entity, id).await? != ending) {
            return Err(upload_in_progress(id));
        }
        let path = match aborting {
            true => entity.attachment_stream(id),
            false => entry.bytes_path(entity).unwrap_or_else(|| entity.attachment_stream(id)),
        };
        let stream = match state.store.head(&path).await {
            Ok(info) => Some(info.id),
            Err(StoreError::NotFound) | Err(StoreError::Gone) => None,
            Err(e) => return Err(e.into()),
        };
        let row = ChangeEvent::delete(MANIFEST, &ManifestEntry::row_key(id), row_txid, &timestamp(now_ms()));
        Ok(Decided::Write { row, since: tail, bytes: Some(StreamAt { path, id: stream }), answer: () })
    })
    .await?;
    // After a few turns that each met another write of this attachment: 409, try again.
    deleted.map(|()| txid).ok_or_else(|| upload_in_progress(id))
}

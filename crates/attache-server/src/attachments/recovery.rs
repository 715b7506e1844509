//! Uploads no request holds any more: after a restart every `pending` row is
//! settled; resumable uploads never closed expire.

use attache_core::manifest::{validate_attachment_id, AttachmentStatus};
use attache_core::EntityUrl;
use attache_storage::{StoreError, StreamAt};

use crate::access::now_ms;
use crate::rows::new_txid;
use crate::AppState;

use super::pending::{manifest_row, settle, write_decided, Decided, OpenUpload};

/// After a restart: every `pending` row no upload holds is settled
/// ([`settle`]): uploads that were streaming when the server stopped are
/// marked `failed`, those whose bytes were stored are completed, and
/// resumable uploads whose stream was closed are finalized.
pub async fn recover(state: &AppState) {
    for record in state.registry.entities(None) {
        let Ok(entity) = EntityUrl::parse(&record.url) else { continue };
        let pending: Vec<String> = match state.views.get(state.store.as_ref(), &entity.main_stream()).await {
            Ok(view) => view
                .manifest
                .iter()
                .filter(|(_, e)| e.status == AttachmentStatus::Pending)
                .map(|(k, _)| k.clone())
                .collect(),
            Err(_) => continue,
        };
        for id in pending {
            if validate_attachment_id(&id).is_err() || state.uploads.0.lock().contains(&entity.attachment_stream(&id)) {
                continue;
            }
            settle(state, &entity, &id).await;
        }
    }
}

/// Ends resumable uploads never closed: every so often (a quarter of the
/// expiry, at most a minute), each open upload whose stream was created more
/// than `upload_expiry` ago gets a `failed` row saying why, and its stream is
/// deleted. Closed ones leave the list (the close completed them).
pub fn start_expiry(state: AppState) {
    let expiry = state.config.upload_expiry;
    let every = (expiry / 4).clamp(std::time::Duration::from_millis(50), std::time::Duration::from_secs(60));
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = state.shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            expire_uploads(&state, expiry).await;
        }
    });
}

pub(super) async fn expire_uploads(state: &AppState, expiry: std::time::Duration) {
    let open: Vec<(String, OpenUpload)> = state.uploads.1.lock().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let deadline = now_ms() - i64::try_from(expiry.as_millis()).unwrap_or(i64::MAX);
    for (path, upload) in open {
        let info = match state.store.head(&path).await {
            Ok(info) if !info.closed => info,
            // Closed (completed) or gone: nothing to expire.
            _ => {
                state.uploads.1.lock().remove(&path);
                continue;
            }
        };
        if info.created_at_ms > deadline {
            continue;
        }
        // Its `failed` row and the delete of the stream found above (never one
        // made at its path since) in one commit, only against the `pending`
        // row read: an upload's row another write replaced meanwhile is left.
        let (entity, id, stream) =
            (&upload.entity, upload.id.as_str(), StreamAt { path: path.clone(), id: Some(info.id) });
        let stream = &stream;
        let expired = write_decided(state, entity, id, None, move || async move {
            let (entry, tail) = {
                let view = state.views.get(state.store.as_ref(), &entity.main_stream()).await?;
                (view.manifest.get(id).filter(|e| e.status == AttachmentStatus::Pending).cloned(), view.tail())
            };
            let Some(mut failed) = entry else { return Ok(Decided::Answer(false)) };
            failed.stream_path = stream.path.clone();
            failed.status = AttachmentStatus::Failed;
            failed.error = Some(format!(
                "upload expired: a resumable upload must be closed within {} of its start",
                humanize(expiry)
            ));
            let row = manifest_row(&failed, &new_txid())?;
            Ok(Decided::Write { row, since: tail, bytes: Some(stream.clone()), answer: true })
        })
        .await;
        match expired {
            Ok(Some(true)) => {
                tracing::info!(entity = %entity, id, "a resumable upload expired");
                state.uploads.1.lock().remove(&path);
            }
            // No pending row of it: its stream goes alone.
            Ok(Some(false)) => match state.store.delete_id(&path, info.id).await {
                Ok(()) | Err(StoreError::NotFound) | Err(StoreError::Gone) => {
                    state.uploads.1.lock().remove(&path);
                }
                Err(e) => tracing::warn!(error = %e, path, "could not delete an expired upload's stream"),
            },
            // Tried again at the next sweep.
            Ok(None) => {
                tracing::warn!(entity = %entity, id, "could not expire an upload: other writes of its id kept coming")
            }
            Err(e) => tracing::warn!(error = %e, entity = %entity, id, "could not mark an expired upload failed"),
        }
    }
}

pub(super) fn humanize(d: std::time::Duration) -> String {
    let secs = d.as_secs();
    match secs {
        s if s >= 3600 && s % 3600 == 0 => format!("{}h", s / 3600),
        s if s >= 60 && s % 60 == 0 => format!("{}m", s / 60),
        s if s > 0 => format!("{s}s"),
        _ => format!("{}ms", d.as_millis()),
    }
}

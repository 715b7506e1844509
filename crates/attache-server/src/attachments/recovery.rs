//! Uploads no request holds any more: after a restart every `pending` row is
//! settled; resumable uploads never closed expire.

use attache_core::manifest::{validate_attachment_id, AttachmentStatus};
use attache_core::EntityUrl;
use attache_storage::StoreError;

use crate::access::now_ms;
use crate::rows::new_txid;
use crate::AppState;

use super::pending::{settle, write_entry, OpenUpload};

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
        let view = match state.views.get(state.store.as_ref(), &upload.entity.main_stream()).await {
            Ok(view) => view,
            Err(_) => continue,
        };
        let entry = view.manifest.get(&upload.id).filter(|e| e.status == AttachmentStatus::Pending).cloned();
        drop(view);
        if let Some(mut failed) = entry {
            failed.stream_path = path.clone();
            failed.status = AttachmentStatus::Failed;
            failed.error = Some(format!(
                "upload expired: a resumable upload must be closed within {} of its start",
                humanize(expiry)
            ));
            if let Err(e) = write_entry(state, &upload.entity, &failed, &new_txid()).await {
                tracing::warn!(error = %e, id = upload.id, "could not mark an expired upload failed");
                continue;
            }
            tracing::info!(entity = %upload.entity, id = upload.id, "a resumable upload expired");
        }
        // The upload's stream found above, never one made at its path since.
        match state.store.delete_id(&path, info.id).await {
            Ok(()) | Err(StoreError::NotFound) | Err(StoreError::Gone) => {
                state.uploads.1.lock().remove(&path);
            }
            Err(e) => tracing::warn!(error = %e, path, "could not delete an expired upload's stream"),
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

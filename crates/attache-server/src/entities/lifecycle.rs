//! The end of an entity's life: stop (`DELETE`), and purge (`?purge=true`,
//! or a deleted task), which deletes its streams, attachments and grants.

use attache_core::state::{timestamp, ChangeEvent, ENTITY_STOPPED};
use attache_core::{EntityUrl, Permission, PrincipalKey};
use attache_storage::{EntityRecord, StoreError};
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use crate::access::{entity_not_found, now_ms, same_incarnation, EntityRoute, Life};
use crate::error::{ApiError, ApiResult};
use crate::rows::{append_rows, new_txid};
use crate::AppState;

#[derive(Debug, Default, Deserialize)]
pub struct StopQuery {
    #[serde(default)]
    purge: Option<String>,
}

/// DELETE stops the entity (status `stopped`, main stream closed). With
/// `?purge=true` it also deletes its streams, attachments and grants for good.
pub async fn stop(
    State(state): State<AppState>,
    route: EntityRoute,
    Query(q): Query<StopQuery>,
) -> ApiResult<Response> {
    let EntityRoute { who, url } = &route;
    let purge = match q.purge.as_deref() {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => return Err(ApiError::bad_request(format!("purge must be true or false, got {other:?}"))),
    };
    let entity = route.authorize(&state, Permission::Delete).await?;
    // The life checked above, and only it: a purge and a new spawn meanwhile
    // (by anyone) made the URL another entity, which this request may not touch.
    let life = state.lives.exclusive(&entity.url).await;
    if !same_incarnation(&state, &entity).await {
        return Err(entity_not_found(&entity.url));
    }
    // From the closing rows to the registry (and through the purge), on a
    // task of its own holding the life: a request dropped midway no longer
    // leaves a closed main stream under a record still running, nor a purge
    // half done (`run_to_end`).
    let (state_, who, url) = (state.clone(), who.clone(), url.clone());
    let answer = super::run_to_end(&state, async move {
        let state = &state_;
        // A txid only when this stop wrote rows: a client would wait for it in vain otherwise.
        let mut answer = match stop_entity(state, &who, &entity).await? {
            Some(txid) => json!({ "txid": txid }),
            None => json!({}),
        };
        if purge {
            purge_held(state, &url, &life).await?;
            answer["purged"] = json!(true);
        } else {
            answer["status"] = json!("stopped");
        }
        drop(life);
        Ok(answer)
    })
    .await?;
    Ok((StatusCode::OK, Json(answer)).into_response())
}

/// Stops the entity; the txid of the rows that stopped it, or `None` when it
/// was stopped already (nothing written).
pub async fn stop_entity(state: &AppState, who: &PrincipalKey, entity: &EntityRecord) -> ApiResult<Option<String>> {
    stop_entity_with(state, who, entity, new_txid(), Vec::new()).await
}

/// Stops the entity; `leading` rows (a `signal` row) go in the same closing
/// append, before the `entity_stopped` row. Nothing is written to an entity
/// that is stopped already. The caller holds the entity's life exclusively:
/// a task change holds it shared from its decision to its write
/// (`tasks::writes::hold_task`), so no stop comes between the two. The
/// caller runs it on a task of its own holding that life (`run_to_end`):
/// awaited by a request that is dropped between the closing rows and the
/// registry write, it left the main stream closed under a record that still
/// said running, where a task change then passed its compare-and-set and had
/// its write refused.
pub(super) async fn stop_entity_with(
    state: &AppState,
    who: &PrincipalKey,
    entity: &EntityRecord,
    txid: String,
    mut leading: Vec<ChangeEvent>,
) -> ApiResult<Option<String>> {
    if !entity.is_running() {
        return Ok(None);
    }
    let mut wrote = true;
    {
        let now = now_ms();
        leading.push(ChangeEvent::insert(
            ENTITY_STOPPED,
            "entity-stopped",
            json!({ "timestamp": timestamp(now), "stopped_by": who.url() }),
            &txid,
            &timestamp(now),
        ));
        match append_rows(state.store.as_ref(), &format!("{}/main", entity.url), &leading, true).await {
            Ok(_) => {}
            // Closed already, by a stop that came first (this record was
            // read before it) or one that crashed before its registry
            // write, finished now: none of these rows was written, so no txid.
            Err(ApiError::NotRunning) => wrote = false,
            Err(e) => return Err(e),
        }
        crate::pause::at(state, crate::pause::STOP_RECORD).await;
        state
            .registry
            .update_entity(
                &entity.url,
                Box::new(move |e| {
                    e.status = "stopped".into();
                    e.updated_at_ms = now;
                    Ok(())
                }),
            )
            .await?;
    }
    Ok(wrote.then_some(txid))
}

/// Deletes every stream of the entity, then the entity and its grants,
/// holding its life exclusively: no write checked against this life lands
/// after it (`access::Lives`). Its callers (a deleted task's tombstone going,
/// at start-up or within `task.delete`) already run to their end on a task of
/// their own; `DELETE ?purge=true` runs [`purge_held`] on one (`run_to_end`).
pub async fn purge_entity(state: &AppState, url: &EntityUrl) -> ApiResult<()> {
    let life = state.lives.exclusive(&url.to_string()).await;
    purge_held(state, url, &life).await
}

/// [`purge_entity`] for a caller that holds the entity's life exclusively.
async fn purge_held(state: &AppState, url: &EntityUrl, _life: &Life) -> ApiResult<()> {
    let prefix = format!("{url}/attachments/");
    loop {
        let batch = state.store.list_prefix(&prefix, 256).await;
        if batch.is_empty() {
            break;
        }
        for info in batch {
            // The stream listed, not one made at its path since.
            match state.store.delete_id(&info.path, info.id).await {
                Ok(()) | Err(StoreError::NotFound) | Err(StoreError::Gone) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    match state.store.delete(&url.main_stream()).await {
        Ok(()) | Err(StoreError::NotFound) | Err(StoreError::Gone) => {}
        Err(e) => return Err(e.into()),
    }
    state.views.forget(&url.main_stream());
    crate::pause::at(state, crate::pause::PURGE_RECORD).await;
    state.registry.remove_entity(&url.to_string()).await?;
    Ok(())
}

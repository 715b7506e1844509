//! `POST`/`DELETE .../{type}/{id}/tags/{key}`: tags, in the registry and as
//! `tags` rows on the main stream.

use attache_core::state::{timestamp, ChangeEvent, TAGS};
use attache_core::{Permission, PrincipalKey};
use attache_storage::EntityRecord;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::access::{entity_not_found, now_ms, EntityRoute};
use crate::error::{ApiError, ApiResult};
use crate::http::json_body;
use crate::rows::{append_rows, new_txid, not_running};
use crate::AppState;

use super::{entity_json, json_size};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TagBody {
    value: Value,
}

fn tag_key(raw: &str) -> ApiResult<String> {
    if raw.is_empty() || raw.len() > 128 || raw.chars().any(char::is_control) {
        return Err(ApiError::bad_request("tag keys are 1 to 128 bytes, no control characters"));
    }
    Ok(raw.to_owned())
}

/// POST /_electric/entities/{type}/{id}/tags/{key} `{"value":"..."}` [write]:
/// sets a tag, then writes it as Electric does, a `tags` row (`insert` for a
/// new key, `update` for a changed value) on the main stream. The same value
/// again changes nothing and writes nothing. Answers as [`change_tag`] says.
pub async fn set_tag(
    State(state): State<AppState>,
    route: EntityRoute,
    Path((_, _, key)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let who = &route.who;
    let key = tag_key(&key)?;
    let (body, _tree): (TagBody, _) = json_body(&state.bodies, who, &headers, body).await?;
    let Value::String(value) = body.value else {
        return Err(ApiError::bad_request("Tag values must be strings"));
    };
    let entity = route.authorize(&state, Permission::Write).await?;
    change_tag(&state, who, &entity, key, Some(value)).await
}

/// DELETE /_electric/entities/{type}/{id}/tags/{key} [write]: removes a tag
/// (a `tags` `delete` row); removing an absent tag changes nothing.
pub async fn delete_tag(
    State(state): State<AppState>,
    route: EntityRoute,
    Path((_, _, key)): Path<(String, String, String)>,
) -> ApiResult<Response> {
    let who = &route.who;
    let key = tag_key(&key)?;
    let entity = route.authorize(&state, Permission::Write).await?;
    change_tag(&state, who, &entity, key, None).await
}

/// Answers the entity (and the row's `txid`) to a caller that may read it; a
/// write-only caller learns only its own write: the `txid`, or `{}` when
/// nothing changed (never the entity's args, tags or timestamps).
async fn change_tag(
    state: &AppState,
    who: &PrincipalKey,
    entity: &EntityRecord,
    key: String,
    value: Option<String>,
) -> ApiResult<Response> {
    let reader = crate::access::may(state, who, entity, Permission::Read);
    let answer = |entity: &EntityRecord, txid: Option<&str>| {
        let mut out = if reader { entity_json(entity) } else { json!({}) };
        if let Some(txid) = txid {
            out["txid"] = json!(txid);
        }
        Json(out).into_response()
    };
    if !entity.is_running() {
        return Err(not_running());
    }
    // Exclusive: two tag writes land in the registry and on the stream in one order.
    let life = state.lives.exclusive(&entity.url).await;
    let Some(current) = state.registry.entity(&entity.url).await.filter(|now| now.incarnation == entity.incarnation)
    else {
        return Err(entity_not_found(&entity.url));
    };
    if !current.is_running() {
        return Err(not_running());
    }
    let previous = current.tags.get(&key).cloned();
    if previous == value {
        return Ok(answer(&current, None));
    }
    let mut _room = None;
    if let Some(v) = &value {
        let held = state.registry.held_by(&current.created_by);
        _room = Some(super::data_room(state, &current.created_by, held, key.len() + v.len())?);
        let mut tags = current.tags.clone();
        tags.insert(key.clone(), v.clone());
        let max = state.config.max_entity_data_bytes;
        if json_size(&current.args) + json_size(&Some(tags)) > max {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "ENTITY_DATA_TOO_LARGE",
                format!("args and tags are at most {max} bytes of JSON together (max_entity_data_bytes)"),
            ));
        }
    }
    // From the registry write to the row, on a task of its own holding the
    // life: a request dropped in between (its client closed the connection)
    // no longer leaves the tag in the record with no row (`run_to_end`).
    let (state_, url) = (state.clone(), entity.url.clone());
    let (updated, txid) = super::run_to_end(state, async move {
        let state = &state_;
        let now = now_ms();
        let (k, v) = (key.clone(), value.clone());
        let updated = state
            .registry
            .update_entity(
                &url,
                Box::new(move |e| {
                    match v {
                        Some(v) => e.tags.insert(k, v),
                        None => e.tags.remove(&k),
                    };
                    e.updated_at_ms = now;
                    Ok(())
                }),
            )
            .await?;
        crate::pause::at(state, crate::pause::TAG_ROW).await;
        let txid = new_txid();
        let at = timestamp(now);
        let row = match (&previous, &value) {
            (_, None) => ChangeEvent::delete(TAGS, &key, &txid, &at),
            (None, Some(v)) => ChangeEvent::insert(TAGS, &key, json!({ "key": key, "value": v }), &txid, &at),
            (Some(_), Some(v)) => ChangeEvent::update(TAGS, &key, json!({ "key": key, "value": v }), &txid, &at),
        };
        append_rows(state.store.as_ref(), &format!("{url}/main"), &[row], false).await?;
        drop(life);
        Ok((updated, txid))
    })
    .await?;
    Ok(answer(&updated, Some(&txid)))
}

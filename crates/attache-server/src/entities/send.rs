//! `POST .../{type}/{id}/send`: inbox messages on the main stream.

use attache_core::state::{timestamp, ChangeEvent, INBOX};
use attache_core::{Permission, PrincipalKey};
use attache_storage::EntityRecord;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::access::{hold_life, now_ms, EntityRoute};
use crate::error::{ApiError, ApiResult};
use crate::http::json_body;
use crate::rows::{append_rows, new_txid, not_running};
use crate::AppState;

use super::generated_key;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendBody {
    #[serde(default)]
    payload: Option<Value>,
    #[serde(default)]
    key: Option<String>,
    #[serde(default, rename = "type")]
    message_type: Option<String>,
}

/// Appends an inbox row; returns (key, txid).
pub async fn send_message(
    state: &AppState,
    who: &PrincipalKey,
    entity: &EntityRecord,
    payload: Value,
    key: Option<String>,
    message_type: Option<String>,
) -> ApiResult<(String, String)> {
    if !entity.is_running() {
        return Err(not_running());
    }
    let key = match key {
        Some(k) if k.is_empty() || k.len() > 256 || k.chars().any(char::is_control) => {
            return Err(ApiError::bad_request("an inbox key is 1 to 256 printable characters"))
        }
        Some(k) => k,
        None => generated_key("msg-in"),
    };
    // Checked against this life, written only into it (404 once purged).
    let _life = hold_life(state, entity).await?;
    let main = format!("{}/main", entity.url);
    // Checked against the keys of the entity's latest `inbox_keys_per_entity`
    // messages, all its view keeps (`rows::InboxKeys`: a key older than those
    // is not checked, as Electric checks none, and its row replaces the old
    // one at that key), and against the sends of it not yet committed, which
    // the view cannot show yet: held until this row is.
    let duplicate =
        || ApiError::new(StatusCode::CONFLICT, "DUPLICATE_KEY", format!("an inbox message with key {key:?} exists"));
    let _sending = {
        let view = state.views.get(state.store.as_ref(), &main).await?;
        if view.inbox.contains(&key) {
            return Err(duplicate());
        }
        state.views.reserve_inbox_key(&main, &key).ok_or_else(duplicate)?
    };
    let now = timestamp(now_ms());
    let txid = new_txid();
    let mut value = json!({
        "from": who.url(),
        "from_principal": who.url(),
        "payload": payload,
        "timestamp": now,
        "mode": "immediate",
        "status": "processed",
        "processed_at": now,
    });
    if let Some(t) = message_type {
        value["message_type"] = json!(t);
    }
    append_rows(state.store.as_ref(), &main, &[ChangeEvent::insert(INBOX, &key, value, &txid, &now)], false).await?;
    Ok((key, txid))
}

pub async fn send(
    State(state): State<AppState>,
    route: EntityRoute,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let who = &route.who;
    let body: SendBody = json_body(&state.bodies, &headers, body).await?;
    let entity = route.authorize(&state, Permission::Write).await?;
    let (key, txid) =
        send_message(&state, who, &entity, body.payload.unwrap_or(Value::Null), body.key, body.message_type).await?;
    Ok((StatusCode::OK, Json(json!({ "txid": txid, "key": key }))).into_response())
}

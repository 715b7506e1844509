//! `POST .../{type}/{id}/send`: inbox messages on the main stream.

use attache_core::state::{timestamp, ChangeEvent, INBOX};
use attache_core::{Permission, PrincipalKey};
use attache_storage::{AppendRequest, EntityRecord, RowGuard, StoreError};
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::access::{hold_life, now_ms, EntityRoute, Life};
use crate::error::{ApiError, ApiResult};
use crate::http::json_body_held;
use crate::rows::{json_content_type, new_txid, not_running};
use crate::{AppState, StoreConfig};

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

/// Appends an inbox row; returns (key, txid). A key the client chose is
/// written once: a send of a key the entity's inbox holds (or that another
/// send is writing, on this instance or another) is 409 `DUPLICATE_KEY`.
pub async fn send_message(
    state: &AppState,
    who: &PrincipalKey,
    entity: &EntityRecord,
    payload: Value,
    key: Option<String>,
    message_type: Option<String>,
) -> ApiResult<(String, String)> {
    send_message_in(state, who, entity, payload, key, message_type, None).await
}

/// [`send_message`]; `held`: the entity's life, when the caller holds it
/// already (a spawn, exclusively, for its initial message); taken shared otherwise.
pub(super) async fn send_message_in(
    state: &AppState,
    who: &PrincipalKey,
    entity: &EntityRecord,
    payload: Value,
    key: Option<String>,
    message_type: Option<String>,
    held: Option<&Life>,
) -> ApiResult<(String, String)> {
    if !entity.is_running() {
        return Err(not_running());
    }
    let chosen = key.is_some();
    let key = match key {
        Some(k) if k.is_empty() || k.len() > 256 || k.chars().any(char::is_control) => {
            return Err(ApiError::bad_request("an inbox key is 1 to 256 printable characters"))
        }
        Some(k) => k,
        None => generated_key("msg-in"),
    };
    // Checked against this life, written only into it (404 once purged).
    let _life = match held {
        Some(_) => None,
        None => Some(hold_life(state, entity).await?),
    };
    let main = format!("{}/main", entity.url);
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
    let row = ChangeEvent::insert(INBOX, &key, value, &txid, &now);
    let message = serde_json::to_vec(&row).map_err(ApiError::internal)?;
    // The row is its text from here on: its tree (the payload's) goes now,
    // not after the write (a wide payload held both while it was written).
    drop(row);
    // Checked against the keys of the entity's latest `inbox_keys_per_entity`
    // messages, all its view keeps (`rows::InboxKeys`: a key older than those
    // is not checked, as Electric checks none, and its row replaces the old
    // one at that key), and against the sends of it not yet committed, which
    // the view cannot show yet: held until this row is. Another instance
    // (PostgreSQL) holds none of our reservations, so the row is written only
    // against the view it was checked in (`StreamStore::append_guarded`, the
    // guard `inbox:{key}`): a send of the key through another instance since
    // is seen, and this one reads again and is the duplicate. A key the
    // server made is unique (a random part): its row needs no guard; nor
    // does any on the embedded store, one process, where the reservation
    // suffices (and keyed sends would churn its 10,000 guarded keys).
    let guarded = chosen && state.config.store != StoreConfig::Embedded;
    let duplicate =
        || ApiError::new(StatusCode::CONFLICT, "DUPLICATE_KEY", format!("an inbox message with key {key:?} exists"));
    let mut sending = None;
    for attempt in 0..SEND_ATTEMPTS {
        let since = {
            let view = state.views.get(state.store.as_ref(), &main).await?;
            if view.inbox.contains(&key) {
                return Err(duplicate());
            }
            if sending.is_none() {
                sending = Some(state.views.reserve_inbox_key(&main, &key).ok_or_else(duplicate)?);
            }
            view.tail()
        };
        crate::pause::at(state, crate::pause::INBOX_WRITE).await;
        let append =
            AppendRequest::json_messages(main.clone(), json_content_type(), std::slice::from_ref(&message), false);
        let written = match guarded {
            true => state.store.append_guarded(append, RowGuard { key: format!("inbox:{key}"), since }, None).await,
            false => state.store.append(append).await,
        };
        match written {
            Ok(_) => return Ok((key, txid)),
            Err(StoreError::Moved) => tokio::time::sleep(std::time::Duration::from_millis(1 << attempt)).await,
            Err(StoreError::Closed { .. }) => return Err(not_running()),
            Err(e) => return Err(e.into()),
        }
    }
    // Other sends of the key kept coming between a read and a write: 409, try again.
    Err(StoreError::Moved.into())
}

/// How many times a send of a chosen key reads again after another send of
/// the key came between its check and its write (a quarter of a second of backoff in all).
const SEND_ATTEMPTS: u32 = 8;

pub async fn send(
    State(state): State<AppState>,
    route: EntityRoute,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let who = &route.who;
    // A send holds about twice its tree while it writes (measured, session
    // 18's third attack pass: 1 MiB payloads of nested arrays peaked at
    // 1.5-1.8× the tree charge on this route alone, the tree and the row
    // made from it living through the write): held twice.
    let (body, _tree): (SendBody, _) = json_body_held(&state.bodies, who, &headers, body, 2).await?;
    let entity = route.authorize(&state, Permission::Write).await?;
    let (key, txid) =
        send_message(&state, who, &entity, body.payload.unwrap_or(Value::Null), body.key, body.message_type).await?;
    Ok((StatusCode::OK, Json(json!({ "txid": txid, "key": key }))).into_response())
}

//! `POST .../{type}/{id}/signal`: Electric's signals, as stops or as
//! `signal` rows on the main stream.

use attache_core::entity::{Signal, SignalEffect};
use attache_core::state::{timestamp, ChangeEvent, SIGNAL};
use attache_core::{Permission, PrincipalKey};
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::access::{hold_life, hold_life_exclusive, now_ms, EntityRoute};
use crate::error::{ApiError, ApiResult};
use crate::http::json_object_body;
use crate::rows::{append_rows, new_txid, not_running};
use crate::AppState;

use super::generated_key;
use super::lifecycle::stop_entity_with;

#[derive(Debug, Deserialize)]
pub struct SignalBody {
    #[serde(default)]
    signal: Option<String>,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    payload: Option<Value>,
}

fn invalid_signal(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "INVALID_SIGNAL", message)
}

/// POST /_electric/entities/{type}/{id}/signal [signal]: SIGKILL and SIGTERM
/// stop the entity as DELETE does (idempotent on a stopped one); SIGINT,
/// SIGHUP and SIGUSR are recorded as an unhandled `signal` row for whatever
/// runtime reads the main stream; SIGSTOP and SIGCONT are refused (attache
/// has no paused state). The answer is Electric's: the states before and after.
/// Every row kept is bounded: `reason` and `payload` together at most
/// `max_signal_bytes` of JSON (413), and recorded signals at most
/// `signal_rate_limit` per entity per window (429 with `Retry-After`), so a
/// principal holding only `signal` cannot grow the main stream without bound.
pub async fn signal(
    State(state): State<AppState>,
    route: EntityRoute,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let EntityRoute { who, url } = &route;
    let (body, _tree): (SignalBody, _) = json_object_body(&state.bodies, who, &headers, body).await?;
    let entity = route.authorize(&state, Permission::Signal).await?;
    let name = body.signal.ok_or_else(|| invalid_signal(format!("signal is required: {}", Signal::NAMES)))?;
    let sig = Signal::parse(&name).map_err(|e| invalid_signal(e.to_string()))?;
    let effect = sig.effect();
    if effect == SignalEffect::Unsupported {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "SIGNAL_NOT_SUPPORTED",
            format!(
                "{} is not supported: attache entities have no paused state (SIGKILL or SIGTERM stop an entity; SIGINT, SIGHUP and SIGUSR are recorded on its main stream)",
                sig.as_str()
            ),
        ));
    }
    let held = super::json_size(&body.reason) + super::json_size(&body.payload);
    if held > state.config.max_signal_bytes {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "SIGNAL_TOO_LARGE",
            format!(
                "a signal's reason and payload are {held} bytes of JSON; at most {} (max_signal_bytes)",
                state.config.max_signal_bytes
            ),
        ));
    }
    if effect == SignalEffect::Recorded {
        if !entity.is_running() {
            return Err(not_running());
        }
        // Each recorded signal is a row kept on the main stream: a principal
        // holding only `signal` may not grow it without bound.
        if let Some(limit) = state.config.signal_rate_limit {
            let window = state.config.signal_rate_window;
            if let Err(wait_ms) = state.signal_limiter.hit(&entity.url, limit, window.as_millis() as u64) {
                return Err(ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "SIGNAL_RATE_LIMITED",
                    format!(
                        "{} records at most {limit} signals per {} s (signal_rate_limit); retry later (SIGKILL and SIGTERM are not limited)",
                        entity.url,
                        window.as_secs_f64()
                    ),
                )
                .with_header(axum::http::header::RETRY_AFTER, wait_ms.div_ceil(1000)));
            }
        }
    }
    let previous = entity.status.clone();
    let now = now_ms();
    let txid = new_txid();
    let mut value = json!({
        "signal": sig.as_str(),
        "sender": who.url(),
        "timestamp": timestamp(now),
    });
    if let Some(reason) = body.reason {
        value["reason"] = json!(reason);
    }
    if let Some(payload) = body.payload {
        value["payload"] = payload;
    }
    let key = generated_key("sig");
    // Only into the life checked above, as every entity write (`hold_life`);
    // a stop holds it exclusively, as `DELETE` does.
    let mut wrote = true;
    let new_state = match effect {
        SignalEffect::Stops => {
            let life = hold_life_exclusive(&state, &entity).await?;
            value["status"] = json!("handled");
            value["handled_at"] = json!(timestamp(now));
            value["handled_by"] = json!(PrincipalKey::server().url());
            value["outcome"] = json!("transitioned");
            value["previous_state"] = json!(previous);
            value["new_state"] = json!("stopped");
            let row = ChangeEvent::insert(SIGNAL, &key, value, &txid, &timestamp(now));
            // From the closing rows to the registry write, on a task of its
            // own holding the life, as `DELETE` (`super::run_to_end`).
            let (state_, who, entity, txid) = (state.clone(), who.clone(), entity.clone(), txid.clone());
            wrote = super::run_to_end(&state, async move {
                let stopped = stop_entity_with(&state_, &who, &entity, txid, vec![row]).await;
                drop(life);
                Ok(stopped?.is_some())
            })
            .await?;
            "stopped".to_owned()
        }
        _ => {
            // One write (the row; the rate count is memory): nothing to leave half done.
            let _life = hold_life(&state, &entity).await?;
            value["status"] = json!("unhandled");
            let row = ChangeEvent::insert(SIGNAL, &key, value, &txid, &timestamp(now));
            append_rows(state.store.as_ref(), &url.main_stream(), &[row], false).await?;
            previous.clone()
        }
    };
    let mut answer = json!({
        "url": entity.url,
        "signal": sig.as_str(),
        "previous_state": previous,
        "new_state": new_state,
        "created_at": now,
    });
    // Only when rows were written: a stop of a stopped entity writes none.
    if wrote {
        answer["txid"] = json!(txid);
    }
    Ok(Json(answer).into_response())
}

//! `GET /ws`: task events pushed over WebSocket, in ClaudeBench's protocol.
//!
//! Client → server: `{"action":"subscribe","events":["task.*"]}`,
//! `{"action":"unsubscribe","events":[..]}`, `{"action":"ping"}` and
//! `{"action":"execute","request":<JSON-RPC request>}`.
//! Server → client: `{"type":"connected","clientId"}`, `{"type":"subscribed","events"}`,
//! `{"type":"event","event":<type>,"data":<event>,"timestamp"}`, `{"type":"pong"}`,
//! JSON-RPC responses, and `{"type":"error","error":{code,message}}`.
//!
//! Patterns are exact event types, `prefix.*` or `*`. Events come from the
//! global events stream (so only durable ones), filtered to the tasks the
//! connection's principal may read; `"offset"` in a subscribe replays from there.

use attache_core::{Offset, PrincipalKey, ReadOffset};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::Response;
use serde_json::{json, Value};

use crate::access::now_ms;
use crate::auth::Caller;
use crate::events::{self, Visibility};
use crate::rpc;
use crate::AppState;

/// Does `pattern` (`task.*`, `*`, or an exact type) match `event_type`?
pub fn matches(pattern: &str, event_type: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => event_type.starts_with(prefix),
        None => pattern == event_type,
    }
}

/// GET /ws
pub async fn upgrade(State(state): State<AppState>, Caller(who): Caller, ws: WebSocketUpgrade) -> Response {
    ws.on_upgrade(move |socket| serve(state, who, socket))
}

fn text(v: Value) -> Message {
    Message::Text(v.to_string().into())
}

fn error(code: i64, message: &str) -> Message {
    text(json!({ "type": "error", "error": { "code": code, "message": message }, "timestamp": now_ms() }))
}

async fn serve(state: AppState, who: PrincipalKey, mut socket: WebSocket) {
    let _live = state.metrics.live_reader();
    let client_id = format!("ws-{}-{:08x}", now_ms(), rand::random::<u32>());
    if socket.send(text(json!({ "type": "connected", "clientId": client_id, "timestamp": now_ms() }))).await.is_err() {
        return;
    }
    let Ok(mut signal) = state.store.subscribe(events::EVENTS_PATH) else { return };
    let mut pos = match state.store.head(events::EVENTS_PATH) {
        Ok(info) => info.tail_offset(),
        Err(_) => return,
    };
    let mut patterns: Vec<String> = Vec::new();
    loop {
        // Decide first, act after: the futures in `select!` borrow `pos`.
        let step = tokio::select! {
            incoming = socket.recv() => Step::Incoming(incoming),
            batch = events::next_events(&state, &mut pos, &mut signal) => Step::Events(batch),
            _ = state.shutdown.cancelled() => Step::Shutdown,
        };
        match step {
            Step::Incoming(incoming) => {
                let msg = match incoming {
                    Some(Ok(Message::Text(t))) => t.to_string(),
                    Some(Ok(Message::Binary(b))) => String::from_utf8_lossy(&b).into_owned(),
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                    Some(Ok(_)) => continue,
                };
                for reply in on_message(&state, &who, &msg, &mut patterns, &mut pos).await {
                    if socket.send(reply).await.is_err() {
                        return;
                    }
                }
            }
            Step::Events(None) => return,
            Step::Events(Some(batch)) => {
                if patterns.is_empty() {
                    continue;
                }
                let mut vis = Visibility::new(&state, &who);
                for event in batch {
                    let kind = event.get("type").and_then(Value::as_str).unwrap_or("").to_owned();
                    if !patterns.iter().any(|p| matches(p, &kind)) || !vis.may_see(&event) {
                        continue;
                    }
                    let push = json!({ "type": "event", "event": kind, "data": event, "timestamp": now_ms() });
                    if socket.send(text(push)).await.is_err() {
                        return;
                    }
                }
            }
            Step::Shutdown => {
                let _ = socket.send(Message::Close(None)).await;
                return;
            }
        }
    }
}

enum Step {
    Incoming(Option<Result<Message, axum::Error>>),
    Events(Option<Vec<Value>>),
    Shutdown,
}

fn string_list(v: Option<&Value>) -> Option<Vec<String>> {
    v?.as_array()?.iter().map(|e| e.as_str().map(str::to_owned)).collect()
}

async fn on_message(
    state: &AppState,
    who: &PrincipalKey,
    raw: &str,
    patterns: &mut Vec<String>,
    pos: &mut Offset,
) -> Vec<Message> {
    let Ok(msg) = serde_json::from_str::<Value>(raw) else { return vec![error(-32700, "Parse error")] };
    match msg.get("action").and_then(Value::as_str) {
        Some("subscribe") => {
            let Some(wanted) = string_list(msg.get("events")) else {
                return vec![error(-32602, "subscribe needs events: an array of strings")];
            };
            if let Some(raw_offset) = msg.get("offset").and_then(Value::as_str) {
                let parsed = ReadOffset::parse(Some(raw_offset))
                    .ok()
                    .and_then(|o| events::start_offset(state.store.as_ref(), o).ok());
                match parsed {
                    Some(o) => *pos = o,
                    None => return vec![error(-32602, "offset is not a valid events offset")],
                }
            }
            for p in wanted {
                if !patterns.contains(&p) {
                    patterns.push(p);
                }
            }
            vec![text(json!({ "type": "subscribed", "events": patterns, "timestamp": now_ms() }))]
        }
        Some("unsubscribe") => {
            let Some(gone) = string_list(msg.get("events")) else {
                return vec![error(-32602, "unsubscribe needs events: an array of strings")];
            };
            patterns.retain(|p| !gone.contains(p));
            vec![text(json!({ "type": "unsubscribed", "events": gone, "timestamp": now_ms() }))]
        }
        Some("ping") => vec![text(json!({ "type": "pong", "timestamp": now_ms() }))],
        Some("execute") => match msg.get("request") {
            Some(request) => match rpc::handle_value(state, who, request.clone()).await {
                Some(answer) => vec![text(answer)],
                None => vec![],
            },
            None => vec![error(-32602, "execute needs request: a JSON-RPC request")],
        },
        _ => vec![error(-32600, "action must be subscribe, unsubscribe, ping or execute")],
    }
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn patterns_match_prefixes_and_exact_types() {
        assert!(matches("task.*", "task.created"));
        assert!(matches("task.*", "task.attachment_created"));
        assert!(matches("*", "task.created"));
        assert!(matches("task.attachment_created", "task.attachment_created"));
        assert!(!matches("task.attachment_created", "task.attachment_deleted"));
        assert!(!matches("task.created", "task.created.more"));
    }
}

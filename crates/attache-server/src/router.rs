//! Every route, its method, and (from the entities face on) the permission
//! it needs, on one screen. Streams live at any path outside the reserved
//! prefixes; a request there is dispatched by method in `streams`.

use attache_core::StreamPath;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Router;

use crate::error::ApiError;
use crate::{attachments, entities, events, mcp, metrics, origin, rpc, streams, ws, AppState};

/// Path prefixes that belong to attache's other faces, never to streams.
pub const RESERVED_PREFIXES: &[&str] =
    &["/_electric/", "/__ds/", "/_attache/", "/rpc", "/mcp", "/ws", "/healthz", "/metrics"];

/// Whether `path` is one of [`RESERVED_PREFIXES`] or lies under one (checked
/// on every request: by comparisons only, no search).
pub fn is_reserved(path: &str) -> bool {
    RESERVED_PREFIXES.iter().any(|prefix| {
        let bare = prefix.strip_suffix('/').unwrap_or(prefix);
        path.strip_prefix(bare).is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    })
}

/// 200 `ok` while the store's and the registry's writes succeed; 503 with what
/// fails, and since when, while they fail (a full or failing disk), so a load
/// balancer or an operator sees it. While the registry's writes fail, each
/// check (at most once a second) tries an empty durable write, so the answer
/// turns 200 again once space is freed, before any real write comes.
async fn healthz(State(state): State<AppState>) -> Response {
    let mut health = state.store.health();
    if health.is_ok() {
        state.registry.probe_writes().await;
        health = state.registry.health();
    }
    match health {
        attache_storage::WriteHealth::Ok => "ok".into_response(),
        attache_storage::WriteHealth::Failing(f) => {
            let since = chrono::DateTime::from_timestamp_millis(f.since_ms).map(|t| t.to_rfc3339());
            let body = serde_json::json!({
                "status": "failing",
                "writes": "failing",
                "since": since,
                "since_ms": f.since_ms,
                "disk_full": f.disk_full,
                "error": f.error,
            });
            (StatusCode::SERVICE_UNAVAILABLE, [(axum::http::header::RETRY_AFTER, "5")], axum::Json(body))
                .into_response()
        }
    }
}

pub fn build(state: AppState) -> Router {
    Router::new()
        // GET /healthz — anyone: 200 "ok" while writes succeed, 503 (JSON) while they fail.
        .route("/healthz", get(healthz))
        // Attachments: GET list [read] · POST multipart upload [write]
        .route(
            "/_electric/entities/{entity_type}/{instance_id}/attachments",
            get(attachments::list).post(attachments::upload),
        )
        // GET/HEAD bytes, ranges [read] · PUT start a resumable upload [write] · DELETE [write]
        .route(
            "/_electric/entities/{entity_type}/{instance_id}/attachments/{attachment_id}",
            get(attachments::read).put(attachments::begin_resumable).delete(attachments::delete),
        )
        // Any other path: a Durable Stream (GET, HEAD, PUT, POST, DELETE).
        // Entities (Electric Agents wire format). Permission in brackets, as Electric's
        // route table has it; 404 when the caller holds nothing on the entity, 403
        // when it holds some grant but not this permission (`access::EntityRoute::authorize`).
        // GET /_electric/entities: the entities the caller may read [read, per entity]; ?type, status, tag, limit, offset
        .route("/_electric/entities", get(entities::list))
        // PUT spawn [any principal] · GET/HEAD [read] · DELETE stop, ?purge=true deletes [delete]
        .route(
            "/_electric/entities/{entity_type}/{instance_id}",
            put(entities::spawn).get(entities::get_entity).delete(entities::stop),
        )
        // POST an inbox message [write]
        .route("/_electric/entities/{entity_type}/{instance_id}/send", post(entities::send))
        // POST a signal [signal]: SIGKILL/SIGTERM stop (as DELETE); SIGINT/SIGHUP/SIGUSR recorded; SIGSTOP/SIGCONT 400
        .route("/_electric/entities/{entity_type}/{instance_id}/signal", post(entities::signal))
        // POST fork into a new entity [fork]: main stream forked, attachments linked (`fork`)
        .route("/_electric/entities/{entity_type}/{instance_id}/fork", post(crate::fork::fork))
        // POST set a tag `{"value"}` · DELETE remove it [write]: a `tags` row on the main stream
        .route(
            "/_electric/entities/{entity_type}/{instance_id}/tags/{tag_key}",
            post(entities::set_tag).delete(entities::delete_tag),
        )
        // GET list, POST add [manage]
        .route(
            "/_electric/entities/{entity_type}/{instance_id}/grants",
            get(entities::list_grants).post(entities::add_grant),
        )
        // DELETE revoke [manage]
        .route(
            "/_electric/entities/{entity_type}/{instance_id}/grants/{grant_id}",
            axum::routing::delete(entities::remove_grant),
        )
        // Any other path: a Durable Stream (GET, HEAD, PUT, POST, DELETE).
        // /{type}/{id}/main and /{type}/{id}/attachments/{x} follow the entity's
        // permissions [GET/HEAD read, POST/PUT write]; other streams belong to their creator.
        // Tasks (ClaudeBench's task.* API). Each method checks the task's entity permissions:
        // task.create [any principal] · get, list, get_attachment, list_attachments,
        // get_attachments_batch [read] · update, assign, unassign, claim, complete,
        // create_attachment, delete_attachment [write] · delete [delete].
        // POST JSON-RPC 2.0, single or batch [authenticated]
        .route("/rpc", post(rpc::post_rpc))
        .route("/rpc/batch", post(rpc::post_rpc))
        // GET task events by offset, catch-up, long-poll or SSE [read, per task]
        .route("/_attache/events", get(events::get_events))
        // GET WebSocket: subscribe to task events by pattern [read, per task]; execute as /rpc
        .route("/ws", get(ws::upgrade))
        // POST/GET/DELETE MCP streamable HTTP: the task methods as tools [authenticated; as /rpc]
        .merge(mcp::routes(state.clone()))
        // GET Prometheus text [any authenticated principal]
        .route("/metrics", get(metrics::get_metrics))
        .fallback(stream_route)
        // Before anything else runs, the front door (one layer: each costs every request).
        .layer(axum::middleware::from_fn_with_state(state.clone(), front))
        .with_state(state)
}

/// The one middleware: outermost, a refusal's unread request body is drained
/// so ordinary clients read the answer (`drain`); then the Host and Origin
/// rules and the encoded-separator refusal (`origin`); then the route.
async fn front(State(state): State<AppState>, req: Request<Body>, next: axum::middleware::Next) -> Response {
    crate::drain::drain_refused(&state, req, |req| origin::guard(&state, req, |req| next.run(req))).await
}

async fn stream_route(State(state): State<AppState>, req: Request<Body>) -> Response {
    stream_request(state, req).await
}

/// The lean HTTP/1 path's way past the router (`conn::Direct`): a request
/// to a stream path (none of [`RESERVED_PREFIXES`], so the router would
/// answer it from its fallback, [`stream_route`]) whose body has been read
/// whole goes through the front door's Host and Origin rules and then to
/// the stream face, as through the router. What it skips is the router's
/// matching, its middleware's boxing and the refused-body drain, which has
/// nothing to do for a body already read whole: together about a tenth of
/// an append's instructions (callgrind, bench/RESULTS.md, session 18). Any
/// other request goes back to the router.
pub fn direct(state: AppState) -> crate::conn::Direct {
    std::sync::Arc::new(StreamsDirect(state))
}

struct StreamsDirect(AppState);

impl crate::conn::DirectRoute for StreamsDirect {
    fn takes(&self, path: &str) -> bool {
        !is_reserved(path)
    }

    fn answer(&self, req: Request<Body>) -> crate::conn::DirectAnswer {
        let state = self.0.clone();
        Box::pin(async move { origin::guard(&state, req, |req| stream_request(state.clone(), req)).await })
    }
}

/// A request at a stream path, past the front door: a Durable Stream's method.
async fn stream_request(state: AppState, req: Request<Body>) -> Response {
    let (parts, body) = req.into_parts();
    let raw_path = parts.uri.path();
    if raw_path.starts_with("/_electric/") || raw_path == "/_electric" {
        return ApiError::not_found(format!("no route for {} {raw_path}", parts.method)).into_response();
    }
    if is_reserved(raw_path) {
        return ApiError::new(StatusCode::NOT_FOUND, "NOT_FOUND", format!("no route for {raw_path}")).into_response();
    }
    let path = match StreamPath::new(raw_path) {
        Ok(p) => p,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let who = match state.auth.authenticate(&parts.headers) {
        Ok(who) => who,
        Err(e) => return e.into_response(),
    };
    streams::dispatch(state, who, parts.method, path, parts.uri.query().map(str::to_owned), parts.headers, body).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_prefixes_are_not_streams() {
        for p in ["/_electric/entities", "/_attache/events", "/rpc", "/mcp", "/ws", "/healthz", "/metrics", "/rpc/x"] {
            assert!(is_reserved(p), "{p}");
        }
        for p in ["/v1/stream/a", "/rpcx", "/task/t-1/main", "/wsx"] {
            assert!(!is_reserved(p), "{p}");
        }
    }
}

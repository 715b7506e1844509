//! Every route, its method, and (from the entities face on) the permission
//! it needs, on one screen. Streams live at any path outside the reserved
//! prefixes; a request there is dispatched by method in `streams`.

use attache_core::StreamPath;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::error::ApiError;
use crate::{headers, streams, AppState};

/// Path prefixes that belong to attache's other faces, never to streams.
pub const RESERVED_PREFIXES: &[&str] = &[
    "/_electric/",
    "/_attache/",
    "/rpc",
    "/mcp",
    "/ws",
    "/healthz",
    "/metrics",
];

pub fn is_reserved(path: &str) -> bool {
    RESERVED_PREFIXES.iter().any(|prefix| {
        let bare = prefix.trim_end_matches('/');
        path == bare
            || path.starts_with(prefix)
            || (!prefix.ends_with('/') && path.starts_with(&format!("{bare}/")))
    })
}

pub fn build(state: AppState) -> Router {
    Router::new()
        // GET /healthz — anyone: 200 once the server serves.
        .route("/healthz", get(|| async { "ok" }))
        // Any other path: a Durable Stream (GET, HEAD, PUT, POST, DELETE).
        .fallback(stream_route)
        .layer(axum::middleware::from_fn(headers::cors_and_security))
        .with_state(state)
}

async fn stream_route(State(state): State<AppState>, req: Request<Body>) -> Response {
    let (parts, body) = req.into_parts();
    let raw_path = parts.uri.path();
    if is_reserved(raw_path) {
        return ApiError::new(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            format!("no route for {raw_path}"),
        )
        .into_response();
    }
    let path = match StreamPath::new(raw_path) {
        Ok(p) => p,
        Err(e) => return ApiError::from(e).into_response(),
    };
    streams::dispatch(
        state,
        parts.method,
        path,
        parts.uri.query().map(str::to_owned),
        parts.headers,
        body,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_prefixes_are_not_streams() {
        for p in [
            "/_electric/entities",
            "/_attache/events",
            "/rpc",
            "/mcp",
            "/ws",
            "/healthz",
            "/metrics",
            "/rpc/x",
        ] {
            assert!(is_reserved(p), "{p}");
        }
        for p in ["/v1/stream/a", "/rpcx", "/task/t-1/main", "/wsx"] {
            assert!(!is_reserved(p), "{p}");
        }
    }
}

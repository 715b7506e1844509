//! MCP at `/mcp` (streamable HTTP, the official Rust SDK `rmcp`): every task
//! method as a tool, named with `__` for the dot (`task__create_attachment`),
//! with a JSON schema of its params. A tool call runs the same function as
//! the JSON-RPC method, as the principal of the HTTP request that carried it;
//! a refusal comes back as a tool error whose content is the JSON-RPC error object.
//!
//! Sessions are bounded: one idle for `mcp_session_idle_ttl` ends (its id then
//! answers 404, and the client initializes again, as MCP says), and while
//! `mcp_max_sessions` are open a new one is refused with 503 and `Retry-After`
//! (refused rather than evicting the oldest: an open session may be in use,
//! and a client that opens many must not close others' sessions); one
//! principal holds at most `mcp_max_sessions_per_principal` (429 past it), so
//! one client cannot take every place.

use std::sync::Arc;

use attache_core::task::ATTACHMENT_KINDS;
use attache_core::PrincipalKey;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, ErrorData, Implementation, ListToolsResult,
    PaginatedRequestParams, ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::RequestContext;
use rmcp::transport::streamable_http_server::session::local::{LocalSessionManager, SessionConfig};
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{RoleServer, ServerHandler};
use serde_json::{json, Map, Value};

use crate::error::ApiError;
use crate::rpc::{error_object, RpcError};
use crate::tasks;
use crate::AppState;

/// The MCP tool name of a method: `task.create` → `task__create`.
pub fn tool_name(method: &str) -> String {
    method.replace('.', "__")
}

fn method_of(tool: &str) -> Option<&'static str> {
    tasks::METHODS.iter().copied().find(|m| tool_name(m) == tool)
}

fn s(description: &str) -> Value {
    json!({ "type": "string", "description": description })
}

fn int(min: i64, max: i64, description: &str) -> Value {
    json!({ "type": "integer", "minimum": min, "maximum": max, "description": description })
}

fn object(properties: Value, required: &[&str]) -> Map<String, Value> {
    let mut out = Map::new();
    out.insert("type".into(), json!("object"));
    out.insert("properties".into(), properties);
    out.insert("required".into(), json!(required));
    out
}

const STATUSES: [&str; 4] = ["pending", "in_progress", "completed", "failed"];

/// Description and params schema of each method.
pub fn schema(method: &str) -> (&'static str, Map<String, Value>) {
    let status = json!({ "type": "string", "enum": STATUSES });
    match method {
        "task.create" => (
            "Create a task (pending). Returns {id, text, status, priority, createdAt}.",
            object(
                json!({
                    "text": { "type": "string", "minLength": 1, "maxLength": 500, "description": "What to do" },
                    "priority": int(0, 100, "Higher runs first (default 50)"),
                    "metadata": { "type": "object", "description": "Free-form fields" },
                    "id": s("Optional id of the form t-…; generated when absent"),
                }),
                &["text"],
            ),
        ),
        "task.get" => ("Get a task with its attachment count.", object(json!({ "id": s("Task id") }), &["id"])),
        "task.update" => (
            "Update text, status, priority or metadata (merged). Statuses go pending → in_progress → completed|failed.",
            object(
                json!({
                    "id": s("Task id"),
                    "updates": {
                        "type": "object",
                        "properties": {
                            "text": { "type": "string", "minLength": 1, "maxLength": 500 },
                            "status": status,
                            "priority": int(0, 100, "Priority"),
                            "metadata": { "type": "object" },
                        },
                    },
                }),
                &["id", "updates"],
            ),
        ),
        "task.list" => (
            "List the tasks you may read. Returns {tasks, totalCount, hasMore}.",
            object(
                json!({
                    "status": status,
                    "assignedTo": s("Worker or instance id"),
                    "priority": int(0, 100, "Exact priority"),
                    "limit": int(1, 1000, "Page size (default 100)"),
                    "offset": { "type": "integer", "minimum": 0 },
                    "orderBy": { "type": "string", "enum": ["createdAt", "updatedAt", "completedAt", "priority", "status", "assignedTo"] },
                    "order": { "type": "string", "enum": ["asc", "desc"] },
                }),
                &[],
            ),
        ),
        "task.assign" => (
            "Assign a task to an instance.",
            object(json!({ "taskId": s("Task id"), "instanceId": s("Instance id") }), &["taskId", "instanceId"]),
        ),
        "task.unassign" => ("Unassign a task (back to pending).", object(json!({ "taskId": s("Task id") }), &["taskId"])),
        "task.claim" => (
            "Atomically claim the highest-priority, oldest pending task. Returns {claimed, taskId?, task?}.",
            object(json!({ "workerId": s("Worker id"), "maxTasks": int(1, 10, "Ignored: one task per call") }), &["workerId"]),
        ),
        "task.complete" => (
            "Complete an assigned task (pending or in progress); the result is stored as attachment `result`. No result: failed.",
            object(json!({ "id": s("Task id"), "taskId": s("Task id (alias)"), "workerId": s("Worker id"), "result": {} }), &[]),
        ),
        "task.delete" => ("Delete a task.", object(json!({ "id": s("Task id") }), &["id"])),
        "task.create_attachment" => (
            "Create or replace (by key) a task attachment: json needs value (any JSON), markdown/text need content, url needs url (http/https), binary may carry mimeType, size, url or base64 data.",
            object(
                json!({
                    "taskId": s("Task id"),
                    "key": { "type": "string", "minLength": 1, "maxLength": 100 },
                    "type": { "type": "string", "enum": ATTACHMENT_KINDS },
                    "value": { "description": "Any JSON value (json type)" },
                    "content": s("Text (markdown and text types)"),
                    "url": { "type": "string", "format": "uri", "description": "http(s) URL, never fetched" },
                    "mimeType": s("Media type"),
                    "size": { "type": "integer", "minimum": 1 },
                    "data": { "type": "string", "contentEncoding": "base64", "description": "Small binary content" },
                }),
                &["taskId", "key", "type"],
            ),
        ),
        "task.get_attachment" => (
            "Get one attachment of a task by key.",
            object(json!({ "taskId": s("Task id"), "key": s("Attachment key") }), &["taskId", "key"]),
        ),
        "task.list_attachments" => (
            "List a task's attachments, oldest first. Returns {attachments, totalCount, hasMore}.",
            object(
                json!({
                    "taskId": s("Task id"),
                    "type": { "type": "string", "enum": ATTACHMENT_KINDS },
                    "limit": int(1, 100, "Page size (default 50)"),
                    "offset": { "type": "integer", "minimum": 0 },
                }),
                &["taskId"],
            ),
        ),
        "task.get_attachments_batch" => (
            "Get up to 100 attachments in request order; fails naming every missing one.",
            object(
                json!({
                    "requests": {
                        "type": "array", "minItems": 1, "maxItems": 100,
                        "items": { "type": "object", "properties": { "taskId": { "type": "string" }, "key": { "type": "string" } }, "required": ["taskId", "key"] },
                    },
                }),
                &["requests"],
            ),
        ),
        "task.delete_attachment" => (
            "Delete one attachment of a task by key.",
            object(json!({ "taskId": s("Task id"), "key": s("Attachment key") }), &["taskId", "key"]),
        ),
        _ => ("", object(json!({}), &[])),
    }
}

/// The tools, one per task method.
pub fn tools() -> Vec<Tool> {
    tasks::METHODS
        .iter()
        .map(|m| {
            let (description, input) = schema(m);
            Tool::new(tool_name(m), description, Arc::new(input))
        })
        .collect()
}

/// One MCP session's handler; it serves whoever each HTTP request authenticates as.
#[derive(Clone)]
pub struct McpFace {
    state: AppState,
}

impl McpFace {
    fn caller(&self, context: &RequestContext<RoleServer>) -> Result<PrincipalKey, ErrorData> {
        let parts = context
            .extensions
            .get::<axum::http::request::Parts>()
            .ok_or_else(|| ErrorData::internal_error("no HTTP request behind this call", None))?;
        self.state.auth.authenticate(&parts.headers).map_err(|e| ErrorData::invalid_request(e.refusal().message, None))
    }
}

impl ServerHandler for McpFace {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("attache", env!("CARGO_PKG_VERSION")))
            .with_instructions(
                "Tasks and their attachments, kept durably by attache. Tools mirror the task.* JSON-RPC methods.",
            )
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        Ok(ListToolsResult::with_all_items(tools()))
    }

    fn get_tool(&self, name: &str) -> Option<Tool> {
        tools().into_iter().find(|t| t.name == name)
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let Some(method) = method_of(&request.name) else {
            return Err(ErrorData::invalid_params(format!("unknown tool {}", request.name), None));
        };
        let who = self.caller(&context)?;
        let params = Value::Object(request.arguments.unwrap_or_default());
        let limits = &self.state.config;
        // Each byte of the answer is taken from the response budget as it is
        // counted: a read that would pass it is refused as it is built.
        let budget = crate::rpc::response_budget(&self.state, &who);
        let outcome = match crate::rpc::check_rate(
            &self.state.rate_limiter,
            &who,
            limits.rpc_rate_limit,
            limits.rpc_rate_window.as_millis() as u64,
        ) {
            Err(e) => Err(e),
            Ok(()) => tasks::call(&self.state, &who, method, params, &budget).await,
        };
        // The answer holds its size of the response budget until the HTTP
        // response carrying it is sent (or dropped with its connection): the
        // slot `require_auth` gave the request, kept by that response's body.
        if let (Ok(text), Some(slot)) = (
            &outcome,
            context.extensions.get::<axum::http::request::Parts>().and_then(|p| p.extensions.get::<AnswerSlot>()),
        ) {
            *slot.0.lock() = budget.into_permit(text.get().len());
        }
        // rmcp's result carries the answer as a tree (and as text beside it):
        // made from the answer's text, which the budget counted.
        let outcome = outcome.and_then(|text| serde_json::from_str(text.get()).map_err(ApiError::internal));
        Ok(match outcome {
            Ok(result) => CallToolResult::structured(result).into(),
            Err(e) => {
                let error = error_object(&RpcError::Call(e));
                let mut out = CallToolResult::error(vec![ContentBlock::text(error.to_string())]);
                out.structured_content = Some(json!({ "error": error }));
                out.into()
            }
        })
    }
}

/// `/mcp` behind authentication: a request without valid credentials gets
/// the same 401 as every other route, before MCP sees it.
pub fn routes(state: AppState) -> axum::Router<AppState> {
    let sessions = Arc::new(Sessions {
        manager: Arc::new(session_manager(&state.config)),
        owners: parking_lot::Mutex::new(std::collections::HashMap::new()),
        opening: parking_lot::Mutex::new(std::collections::HashMap::new()),
    });
    axum::Router::new()
        .nest_service("/mcp", service(state.clone(), sessions.manager.clone()))
        .layer(axum::middleware::from_fn_with_state((state, sessions), require_auth))
}

/// Where a tool call puts the share of the response budget its answer holds;
/// the body of the HTTP response that carries the answer keeps it.
#[derive(Clone, Default)]
struct AnswerSlot(Arc<parking_lot::Mutex<Option<crate::http::SendPermit>>>);

/// The open sessions (rmcp's manager) and who opened each, for the caps.
struct Sessions {
    manager: Arc<LocalSessionManager>,
    /// Session id → the principal that opened it; pruned to the live sessions
    /// whenever a session is about to be opened, so never larger than the cap.
    owners: parking_lot::Mutex<std::collections::HashMap<String, PrincipalKey>>,
    /// Sessions being opened now (admitted, not yet recorded in `owners`),
    /// by principal: counted by the caps, so opens racing each other cannot
    /// all pass them (400 concurrent `initialize`s of one principal opened 396
    /// sessions past its cap of 100).
    opening: parking_lot::Mutex<std::collections::HashMap<PrincipalKey, usize>>,
}

/// One admitted session open in progress; leaves `Sessions::opening` on drop.
struct Opening<'a> {
    sessions: &'a Sessions,
    who: PrincipalKey,
}

impl Drop for Opening<'_> {
    fn drop(&mut self) {
        let mut opening = self.sessions.opening.lock();
        if let Some(n) = opening.get_mut(&self.who) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                opening.remove(&self.who);
            }
        }
    }
}

impl Sessions {
    /// Refuses a new session for `who` when the server or `who` holds its most.
    async fn admit(&self, who: &PrincipalKey, config: &crate::config::ServerConfig) -> Result<Opening<'_>, ApiError> {
        let live = self.manager.sessions.read().await;
        let mut owners = self.owners.lock();
        owners.retain(|id, _| live.contains_key(id.as_str()));
        let mut opening = self.opening.lock();
        let max = config.mcp_max_sessions;
        if live.len() + opening.values().sum::<usize>() >= max {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "TOO_MANY_SESSIONS",
                format!("the server holds its most MCP sessions ({max}, mcp_max_sessions); retry later"),
            )
            .with_header(axum::http::header::RETRY_AFTER, 10));
        }
        let mine = config.mcp_max_sessions_per_principal;
        let opening_mine = opening.get(who).copied().unwrap_or(0);
        if owners.values().filter(|o| *o == who).count() + opening_mine >= mine {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "TOO_MANY_SESSIONS",
                format!("a principal holds at most {mine} MCP sessions (mcp_max_sessions_per_principal); close one (DELETE /mcp) or let one idle out"),
            )
            .with_header(axum::http::header::RETRY_AFTER, 10));
        }
        *opening.entry(who.clone()).or_default() += 1;
        Ok(Opening { sessions: self, who: who.clone() })
    }
}

/// Sessions that end after `mcp_session_idle_ttl` without a message.
fn session_manager(config: &crate::config::ServerConfig) -> LocalSessionManager {
    let mut session_config = SessionConfig::default();
    session_config.keep_alive = Some(config.mcp_session_idle_ttl);
    let mut manager = LocalSessionManager::default();
    manager.session_config = session_config;
    manager
}

async fn require_auth(
    axum::extract::State((state, sessions)): axum::extract::State<(AppState, Arc<Sessions>)>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let who = match state.auth.authenticate(req.headers()) {
        Ok(who) => who,
        Err(e) => return e.into_response(),
    };
    // A session id is no credential: a session is used (read, written, closed)
    // only by the principal that opened it; anyone else finds no such session.
    if let Some(id) = req.headers().get("mcp-session-id").and_then(|v| v.to_str().ok()) {
        if sessions.owners.lock().get(id).is_some_and(|owner| *owner != who) {
            return ApiError::not_found("no such MCP session").into_response();
        }
    }
    // A POST's body is read here, as every other route reads its body: within
    // the body budget and read timeout (408 / 503 / 413 with JSON-RPC's size
    // limit). Left to rmcp, a stalled 4 MiB body was held past every timeout,
    // outside the budget (200 of them: +830 MB).
    // A POST without a session id opens a session (it carries `initialize`):
    // rmcp keeps its params as a JSON tree for the session's life, ~11 times
    // their size (4 MB of small members held 45 MB a session: 100 sessions of
    // one principal, 4.5 GB), so its body is held to `mcp_max_initialize_bytes`.
    let opens_session = req.method() == axum::http::Method::POST && !req.headers().contains_key("mcp-session-id");
    let limit = match opens_session {
        true => state.config.mcp_max_initialize_bytes.min(state.config.rpc_max_body_bytes),
        false => state.config.rpc_max_body_bytes,
    };
    // The message as rmcp's tree of values, held in the body budget until
    // its answer is sent (rmcp keeps it until the tool has answered): as a
    // call on /rpc (before, session 16's second attack pass, one 3.5 MB
    // message of nested arrays peaked at +470 MB, eight sessions at 1.6 GB).
    let mut tree = None;
    let req = if req.method() == axum::http::Method::POST {
        let (parts, body) = req.into_parts();
        match crate::http::read_body(&state.bodies, body, &parts.headers, limit).await {
            Ok(bytes) => {
                let (values, cost) = crate::http::json_tree_cost(&bytes, crate::http::MCP_VALUE_COST);
                match crate::http::OwnedHold::take(
                    &state,
                    &who,
                    cost,
                    &format_args!("a message of {values} JSON values"),
                ) {
                    Ok(hold) => tree = Some(hold),
                    Err(e) => return e.into_response(),
                }
                axum::extract::Request::from_parts(parts, axum::body::Body::from(bytes))
            }
            Err(e) if opens_session && e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE => {
                let message = format!(
                    "a request that opens an MCP session (initialize) is at most {limit} bytes \
                     (mcp_max_initialize_bytes): its params are kept for the session's life"
                );
                return ApiError::new(axum::http::StatusCode::PAYLOAD_TOO_LARGE, "PAYLOAD_TOO_LARGE", message)
                    .into_response();
            }
            Err(e) => return e.into_response(),
        }
    } else {
        req
    };
    if !opens_session {
        if req.method() != axum::http::Method::POST {
            return next.run(req).await;
        }
        // A message in a session (a tool call): as a call on /rpc, refused
        // before it runs while answers not yet sent hold the whole response
        // budget, and its answer holds its size of the budget until sent.
        if state.answers.is_full(&who) {
            return state.answers.exhausted().into_response();
        }
        let slot = AnswerSlot::default();
        let mut req = req;
        req.extensions_mut().insert(slot.clone());
        return next.run(req).await.map(|body| crate::http::holding(body, (slot, tree)));
    }
    let opening = match sessions.admit(&who, &state.config).await {
        Ok(opening) => opening,
        Err(e) => return e.into_response(),
    };
    let res = next.run(req).await;
    if let Some(id) = res.headers().get("mcp-session-id").and_then(|v| v.to_str().ok()) {
        sessions.owners.lock().insert(id.to_owned(), who);
    }
    drop(opening);
    res.map(|body| crate::http::holding(body, tree))
}

/// The `/mcp` service. Its own Host check is off: the Host and Origin rules
/// of every route (`origin::guard`) already ran before a request gets here.
pub fn service(
    state: AppState,
    sessions: Arc<LocalSessionManager>,
) -> StreamableHttpService<McpFace, LocalSessionManager> {
    let config = StreamableHttpServerConfig::default()
        .with_sse_keep_alive(None)
        .with_cancellation_token(state.shutdown.child_token())
        .disable_allowed_hosts();
    StreamableHttpService::new(move || Ok(McpFace { state: state.clone() }), sessions, config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_method_is_a_tool_with_an_object_schema() {
        let tools = tools();
        assert_eq!(tools.len(), tasks::METHODS.len());
        for t in &tools {
            assert!(!t.name.contains('.'), "{}", t.name);
            assert_eq!(t.input_schema.get("type"), Some(&json!("object")), "{}", t.name);
            assert!(t.description.as_deref().is_some_and(|d| !d.is_empty()), "{}", t.name);
            assert!(method_of(&t.name).is_some());
        }
        assert_eq!(tool_name("task.create_attachment"), "task__create_attachment");
    }
}

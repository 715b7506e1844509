//! `POST /rpc`: JSON-RPC 2.0 over HTTP, with batches and notifications, in
//! front of the task face. The mapping from errors to JSON-RPC codes lives
//! here, once ([`error_object`]); MCP and WebSocket reuse it.
//!
//! Limits: the body size (`rpc_max_body_bytes`), the batch length
//! (`rpc_max_batch`, 100; counted while the batch is read, so a longer one
//! is refused after reading `rpc_max_batch + 1` items), an optional per-principal rate limit
//! (`rpc_rate_limit` calls per `rpc_rate_window`), answered with -32000, and
//! the bytes one answer carries (`rpc_max_response_bytes`, for a single
//! request and a whole batch alike; a call that would pass it is answered
//! -32000, or for `task.list` cut short with `hasMore`, and earlier calls of
//! its batch keep their answers). Each call's answer is kept as its JSON
//! text from the moment it is made (`tasks::Answer`), so a batch holds about
//! that many bytes of answers.

use attache_core::PrincipalKey;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::rate::RateLimiter;
use crate::tasks::{self, Answer, ResponseBudget};
use crate::AppState;
use attache_storage::StoreError;

/// What can go wrong with one JSON-RPC message.
#[derive(Debug, Clone, PartialEq)]
pub enum RpcError {
    /// The body is not JSON (-32700).
    Parse,
    /// Not a JSON-RPC 2.0 request, an empty or oversized batch, or an oversized body (-32600).
    InvalidRequest(String),
    /// The method ran and refused, or failed (its own code).
    Call(ApiError),
}

/// Refusals of a per-principal quota a task method can meet.
const QUOTA_CODES: [&str; 2] = [crate::streams::TOO_MANY_STREAMS, crate::entities::TOO_MANY_ENTITIES];

/// The one mapping from errors to JSON-RPC error objects `{code, message, data?}`.
pub fn error_object(e: &RpcError) -> Value {
    let (code, message, data): (i64, String, Option<Value>) = match e {
        RpcError::Parse => (-32700, "Parse error".into(), None),
        RpcError::InvalidRequest(why) => (-32600, "Invalid Request".into(), Some(json!({ "reason": why }))),
        RpcError::Call(ApiError::InvalidParams { validation, field }) => {
            let mut data = json!({ "validation": validation });
            if let Some(f) = field {
                data["field"] = json!(f);
            }
            (-32602, "Invalid params".into(), Some(data))
        }
        RpcError::Call(ApiError::Rejected { message, data }) => {
            (-32602, message.clone(), (!data.is_null()).then(|| data.clone()))
        }
        // The write found the task's entity stopped (a signal, or DELETE on it).
        RpcError::Call(ApiError::NotRunning) => (-32602, tasks::STOPPED.into(), Some(json!({}))),
        RpcError::Call(ApiError::NotPermitted { message }) => (-32002, message.clone(), None),
        RpcError::Call(ApiError::RateLimited { limit, window_ms }) => (
            -32000,
            format!("Rate limit exceeded: {limit} requests per {window_ms}ms"),
            Some(json!({ "limit": limit, "windowMs": window_ms })),
        ),
        RpcError::Call(ApiError::ResponseTooLarge { limit }) => (
            -32000,
            format!(
                "Response too large: one response (a request or a whole batch) carries at most {limit} bytes \
                 (rpc_max_response_bytes, or one principal's share of response_buffer_bytes if smaller); ask for less (task.list with a smaller limit, fewer calls in a batch) \
                 or fetch attachments one at a time with task.get_attachment"
            ),
            Some(json!({ "limit": limit })),
        ),
        RpcError::Call(ApiError::MethodNotFound { method }) => (-32601, format!("Method not found: {method}"), None),
        // A read whose answer, as it was built, would pass the response
        // budget (or the caller's share of it): as a call refused before it
        // runs while the budget is full (`refused_while_full`).
        RpcError::Call(ApiError::Refused(r)) if r.code == crate::http::RESPONSE_BUDGET_EXHAUSTED => {
            (-32600, "Invalid Request".into(), Some(json!({ "reason": r.message })))
        }
        // The store refused for a while (a full disk, a disk error, a
        // shutdown): nothing was written, and the same call may succeed
        // later. Said as such, with the refusal's fixed sentence (never the
        // store's own detail), as the HTTP faces say it with 507/503.
        RpcError::Call(
            e @ ApiError::Store(StoreError::StorageFull(_) | StoreError::Unavailable(_) | StoreError::ShuttingDown),
        ) => {
            let r = e.refusal();
            let retry = r.headers.iter().find(|(n, _)| *n == axum::http::header::RETRY_AFTER);
            let retry_after = retry.and_then(|(_, v)| v.to_str().ok()?.parse::<u64>().ok()).unwrap_or(1);
            let data =
                json!({ "code": r.code, "reason": r.message, "retryable": true, "retryAfterSeconds": retry_after });
            (-32603, "Internal error".into(), Some(data))
        }
        // A quota of the caller's (streams, grants): said with its code and sentence.
        RpcError::Call(ApiError::Refused(r)) if QUOTA_CODES.contains(&r.code) => {
            (-32602, r.message.clone(), Some(json!({ "code": r.code })))
        }
        // A fault, or a refusal no task method answers with (the task face
        // looks its tasks up itself): the detail went to the log
        // (`tasks::call`); the caller learns only that the fault is ours.
        RpcError::Call(
            ApiError::Internal { .. }
            | ApiError::Store(_)
            | ApiError::EntityNotFound { .. }
            | ApiError::DuplicateUrl { .. }
            | ApiError::Refused(_),
        ) => (-32603, "Internal error".into(), None),
    };
    let mut out = json!({ "code": code, "message": message });
    if let Some(d) = data {
        out["data"] = d;
    }
    out
}

fn outcome_label(e: &RpcError) -> String {
    error_object(e)["code"].as_i64().map(|c| c.to_string()).unwrap_or_default()
}

fn error_response(id: Value, e: &RpcError) -> Value {
    json!({ "jsonrpc": "2.0", "error": error_object(e), "id": id })
}

/// A JSON-RPC response around an answer kept as text.
#[derive(Serialize)]
struct Reply<'a> {
    jsonrpc: &'static str,
    result: &'a RawValue,
    id: &'a Value,
}

/// One message's response as text: what a batch holds until it is sent.
fn as_text(v: &impl Serialize) -> Box<RawValue> {
    // Serializing a tree or text already checked as JSON cannot fail; `null` if it did.
    serde_json::value::to_raw_value(v).unwrap_or_else(|_| RawValue::NULL.to_owned())
}

/// Counts one JSON-RPC or MCP call of `who` against `rpc_rate_limit`.
pub fn check_rate(
    limiter: &RateLimiter,
    who: &PrincipalKey,
    limit: Option<u32>,
    window_ms: u64,
) -> Result<(), ApiError> {
    let Some(limit) = limit else { return Ok(()) };
    limiter.hit(&who.to_string(), limit, window_ms).map_err(|_| ApiError::RateLimited { limit, window_ms })
}

/// A well-formed request: its id (`None` for a notification), method and params.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub id: Option<Value>,
    pub method: String,
    pub params: Value,
}

/// Reads one JSON-RPC 2.0 request; an error carries the id to answer with.
pub fn parse_request(msg: Value) -> Result<Request, (Value, RpcError)> {
    let Value::Object(mut obj) = msg else {
        return Err((Value::Null, RpcError::InvalidRequest("a request is a JSON object".into())));
    };
    let id = obj.remove("id");
    let id_ok = matches!(id, None | Some(Value::Null | Value::String(_) | Value::Number(_)));
    let reply_id = if id_ok { id.clone().unwrap_or(Value::Null) } else { Value::Null };
    let invalid = |why: &str| Err((reply_id.clone(), RpcError::InvalidRequest(why.into())));
    if !id_ok {
        return invalid("id must be a string, a number or null");
    }
    if obj.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return invalid("jsonrpc must be \"2.0\"");
    }
    let method = match obj.remove("method") {
        Some(Value::String(m)) => m,
        _ => return invalid("method must be a string"),
    };
    let params = obj.remove("params").unwrap_or(Value::Null);
    match params {
        Value::Null | Value::Object(_) => {}
        Value::Array(_) => {
            return Err((reply_id, RpcError::Call(ApiError::invalid("params", "params must be an object (named)"))))
        }
        _ => return invalid("params must be an object"),
    }
    Ok(Request { id, method, params })
}

/// Runs one message, its answer taken from `budget`; `None` for a notification.
async fn handle_one(
    state: &AppState,
    who: &PrincipalKey,
    msg: Value,
    budget: &ResponseBudget,
) -> Option<Box<RawValue>> {
    let req = match parse_request(msg) {
        Ok(r) => r,
        Err((id, e)) => {
            state.metrics.rpc_call("", &outcome_label(&e));
            return Some(as_text(&error_response(id, &e)));
        }
    };
    let limits = &state.config;
    let outcome =
        match check_rate(&state.rate_limiter, who, limits.rpc_rate_limit, limits.rpc_rate_window.as_millis() as u64) {
            Err(e) => Err(RpcError::Call(e)),
            Ok(()) => tasks::call(state, who, &req.method, req.params, budget).await.map_err(RpcError::Call),
        };
    match &outcome {
        Ok(_) => state.metrics.rpc_call(&req.method, "ok"),
        Err(e) => state.metrics.rpc_call(&req.method, &outcome_label(e)),
    }
    let id = req.id?;
    Some(match outcome {
        Ok(result) => reply(&result, &id),
        Err(e) => as_text(&error_response(id, &e)),
    })
}

fn reply(result: &Answer, id: &Value) -> Box<RawValue> {
    as_text(&Reply { jsonrpc: "2.0", result, id })
}

/// Runs a parsed body: one request or a batch. `None`: nothing to answer (notifications only).
/// (The WebSocket face's `execute`, whose message size is bounded by the socket.)
pub async fn handle_value(
    state: &AppState,
    who: &PrincipalKey,
    body: Value,
    budget: &ResponseBudget,
) -> Option<Box<RawValue>> {
    match body {
        Value::Array(items) => {
            let max = state.config.rpc_max_batch;
            if items.len() > max {
                return Some(as_text(&error_response(Value::Null, &too_large_batch(max))));
            }
            handle_batch(state, who, items, budget).await
        }
        single => handle_one(state, who, single, budget).await,
    }
}

/// While answers not yet sent hold the whole response budget: the error a
/// call (or batch) gets before it runs, -32600 whose reason names
/// `response_buffer_bytes`, and the HTTP refusal (503, `Retry-After`).
pub(crate) fn refused_while_full(state: &AppState, who: &PrincipalKey) -> Option<(RpcError, crate::error::Refusal)> {
    if !state.answers.is_full(who) {
        return None;
    }
    let refusal = state.answers.exhausted().refusal();
    let err = RpcError::InvalidRequest(refusal.message.clone());
    state.metrics.rpc_call("", &outcome_label(&err));
    Some((err, refusal))
}

/// [`handle_value`] for a face that sends its answers itself (`/ws`
/// `execute`): refused whole while the response budget is full, and its
/// answer's text with the share of the budget it holds until sent (taken as
/// the answer was counted, [`response_budget`]).
pub(crate) async fn handle_value_within_budget(
    state: &AppState,
    who: &PrincipalKey,
    body: Value,
) -> Option<(String, Option<crate::http::SendPermit>)> {
    let text = match refused_while_full(state, who) {
        Some((err, _)) => {
            let id = body.get("id").filter(|id| matches!(id, Value::String(_) | Value::Number(_))).cloned();
            String::from(Box::<str>::from(as_text(&error_response(id.unwrap_or(Value::Null), &err))))
        }
        None => {
            crate::pause::at(state, crate::pause::RPC_CALL).await;
            let budget = response_budget(state, who);
            let text = String::from(Box::<str>::from(handle_value(state, who, body, &budget).await?));
            let permit = budget.into_permit(text.len());
            return Some((text, permit));
        }
    };
    Some((text, None))
}

/// What one answer (a request or a whole batch) to `who` may carry: at most
/// `rpc_max_response_bytes`, and never more than one principal's share of
/// the process's budget of answers not yet sent (`response_buffer_bytes` ×
/// `budget_share_per_principal`), each byte also taken from that budget as it
/// is counted, so a read is refused as it is built rather than held past the
/// budget once made. Before, with `--rpc-max-response-bytes` set above the
/// share, one answer alone could hold more than its principal may.
pub(crate) fn response_budget(state: &AppState, who: &PrincipalKey) -> ResponseBudget {
    let share = u64::try_from(state.answers.share()).unwrap_or(u64::MAX);
    ResponseBudget::within(state.config.rpc_max_response_bytes.min(share), &state.answers, who)
}

/// Runs the items of a batch in order, sharing one budget; `None` when all were notifications.
async fn handle_batch<I: Into<Value>>(
    state: &AppState,
    who: &PrincipalKey,
    items: Vec<I>,
    budget: &ResponseBudget,
) -> Option<Box<RawValue>> {
    if items.is_empty() {
        return Some(as_text(&error_response(Value::Null, &RpcError::InvalidRequest("Batch cannot be empty".into()))));
    }
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        if let Some(res) = handle_one(state, who, item.into(), budget).await {
            out.push(res);
        }
    }
    (!out.is_empty()).then(|| join(out))
}

/// The responses of a batch as one array, each dropped once copied.
fn join(items: Vec<Box<RawValue>>) -> Box<RawValue> {
    let mut text = String::with_capacity(items.iter().map(|i| i.get().len() + 1).sum::<usize>() + 1);
    text.push('[');
    for (i, item) in items.into_iter().enumerate() {
        if i > 0 {
            text.push(',');
        }
        text.push_str(item.get());
    }
    text.push(']');
    RawValue::from_string(text).unwrap_or_else(|_| RawValue::NULL.to_owned())
}

fn too_large_batch(max: usize) -> RpcError {
    RpcError::InvalidRequest(format!("Batch too large: at most {max} requests (rpc_max_batch)"))
}

/// A request body as read at the edge: one message, or the items of a batch
/// still as raw JSON (each becomes a `Value` only when its turn comes).
#[derive(Debug)]
pub enum Body {
    Single(Value),
    Batch(Vec<BatchItem>),
}

/// One item of a batch, kept as the JSON text it was sent as.
#[derive(Debug)]
pub struct BatchItem(Box<serde_json::value::RawValue>);

impl From<BatchItem> for Value {
    fn from(item: BatchItem) -> Value {
        // The text was checked as JSON when the batch was read.
        serde_json::from_str(item.0.get()).unwrap_or(Value::Null)
    }
}

/// Reads a body; a batch of more than `max` items is refused as soon as its
/// `max + 1`th item is read, so an oversized batch costs O(`max`) memory,
/// not a `Value` tree of every item.
pub fn parse_body(bytes: &[u8], max: usize) -> Result<Body, RpcError> {
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'[') {
        return serde_json::from_slice(bytes).map(Body::Single).map_err(|_| RpcError::Parse);
    }
    let mut over = false;
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let items = serde::de::DeserializeSeed::deserialize(BatchSeed { max, over: &mut over }, &mut de)
        .and_then(|items| de.end().map(|()| items));
    match items {
        Ok(items) => Ok(Body::Batch(items)),
        Err(_) if over => Err(too_large_batch(max)),
        Err(_) => Err(RpcError::Parse),
    }
}

/// Reads the items of a batch up to `max`; sets `over` (and fails) on one more.
struct BatchSeed<'a> {
    max: usize,
    over: &'a mut bool,
}

impl<'de> serde::de::DeserializeSeed<'de> for BatchSeed<'_> {
    type Value = Vec<BatchItem>;

    fn deserialize<D: serde::Deserializer<'de>>(self, de: D) -> Result<Self::Value, D::Error> {
        de.deserialize_seq(self)
    }
}

impl<'de> serde::de::Visitor<'de> for BatchSeed<'_> {
    type Value = Vec<BatchItem>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON-RPC batch (an array of requests)")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Box<serde_json::value::RawValue>>()? {
            if items.len() == self.max {
                *self.over = true;
                return Err(serde::de::Error::custom("batch too large"));
            }
            items.push(BatchItem(item));
        }
        Ok(items)
    }
}

fn respond(status: StatusCode, body: &impl Serialize) -> Response {
    let mut bytes = Vec::with_capacity(512);
    if serde_json::to_writer(&mut bytes, body).is_err() {
        bytes.clear();
    }
    let mut res = (status, bytes).into_response();
    res.headers_mut().insert("content-type", HeaderValue::from_static("application/json"));
    res
}

/// A body refused before any call ran (too large, past the body budget):
/// the refusal's status and headers, error -32600 with its reason.
fn body_refused(state: &AppState, e: &ApiError) -> Response {
    let refusal = e.refusal();
    let err = RpcError::InvalidRequest(refusal.message);
    state.metrics.rpc_call("", &outcome_label(&err));
    let mut res = respond(refusal.status, &error_response(Value::Null, &err));
    res.headers_mut().extend(refusal.headers);
    res
}

/// POST /rpc (and /rpc/batch): always 200 for answered calls, 204 when only
/// notifications came; 401 for missing credentials, 413 for an oversized body.
pub async fn post_rpc(State(state): State<AppState>, req: axum::extract::Request) -> Response {
    // The request taken whole: the `HeaderMap` extractor would clone the headers.
    let (parts, body) = req.into_parts();
    let headers = &parts.headers;
    let who = match state.auth.authenticate(headers) {
        Ok(who) => who,
        Err(e) => {
            let refusal = e.refusal();
            // A malformed request (two Authorization headers) is -32600, as a
            // malformed body is; missing or refused credentials are -32002.
            let err = if refusal.status == StatusCode::BAD_REQUEST {
                RpcError::InvalidRequest(refusal.message)
            } else {
                RpcError::Call(ApiError::NotPermitted { message: refusal.message })
            };
            state.metrics.rpc_call("", &outcome_label(&err));
            let mut res = respond(refusal.status, &error_response(Value::Null, &err));
            res.headers_mut().extend(refusal.headers);
            return res;
        }
    };
    let bytes = match crate::http::read_body(&state.bodies, body, headers, state.config.rpc_max_body_bytes).await {
        Ok(b) => b,
        Err(e) => return body_refused(&state, &e),
    };
    // Answers not yet sent hold the response budget (a client that reads
    // nothing, an HTTP/2 stream with no window): while it is full, calls are
    // refused before they run, so nothing they would do is hidden by a
    // refusal. 100 callers that read nothing of 15 MiB answers held 1.5 GB.
    if let Some((err, refusal)) = refused_while_full(&state, &who) {
        // As a body the budget refuses: 503 with Retry-After, error -32600 with the reason.
        let mut res = respond(refusal.status, &error_response(Value::Null, &err));
        res.headers_mut().extend(refusal.headers);
        return res;
    }
    // The body as a tree of values costs ~64 B a value besides its text (4 MiB
    // of `[1,1,...]` took +140 MB): held from the body budget while the call
    // runs, so calls that arrive together cannot hold more than it.
    let (values, tree) = crate::http::json_tree_cost(&bytes, crate::http::JSON_VALUE_COST);
    let _tree = match state.bodies.hold(&who, tree, &format_args!("a body of {values} JSON values")) {
        Ok(hold) => hold,
        Err(e) => return body_refused(&state, &e),
    };
    crate::pause::at(&state, crate::pause::RPC_CALL).await;
    let budget = response_budget(&state, &who);
    let answer = match parse_body(&bytes, state.config.rpc_max_batch) {
        Ok(Body::Single(v)) => handle_one(&state, &who, v, &budget).await,
        Ok(Body::Batch(items)) => handle_batch(&state, &who, items, &budget).await,
        Err(e) => {
            state.metrics.rpc_call("", &outcome_label(&e));
            return respond(StatusCode::OK, &error_response(Value::Null, &e));
        }
    };
    match answer {
        // The batch's text is the body as it is: not copied again.
        Some(answer) => {
            let text = bytes::Bytes::from(String::from(Box::<str>::from(answer)));
            // What the answer took as it was counted, held until it is sent.
            let permit = budget.into_permit(text.len());
            let mut res = Response::new(crate::http::held_body(text, permit));
            res.headers_mut().insert("content-type", HeaderValue::from_static("application/json"));
            res
        }
        None => StatusCode::NO_CONTENT.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_has_its_code() {
        let code = |e: RpcError| error_object(&e)["code"].as_i64().unwrap();
        assert_eq!(code(RpcError::Parse), -32700);
        assert_eq!(code(RpcError::InvalidRequest("x".into())), -32600);
        assert_eq!(code(RpcError::Call(ApiError::MethodNotFound { method: "x".into() })), -32601);
        assert_eq!(code(RpcError::Call(ApiError::invalid("f", "bad"))), -32602);
        assert_eq!(code(RpcError::Call(ApiError::NotPermitted { message: "no".into() })), -32002);
        assert_eq!(code(RpcError::Call(ApiError::RateLimited { limit: 1, window_ms: 1000 })), -32000);
        assert_eq!(code(RpcError::Call(ApiError::ResponseTooLarge { limit: 1 })), -32000);
        assert_eq!(code(RpcError::Call(ApiError::Internal { message: "disk".into() })), -32603);
        let internal = error_object(&RpcError::Call(ApiError::Internal { message: "disk on fire".into() }));
        assert!(!internal.to_string().contains("disk"), "internal details stay in the log");
    }

    #[test]
    fn a_batch_is_refused_at_its_first_item_over_the_limit() {
        let batch = |n: usize| format!("[{}]", vec![r#"{"jsonrpc":"2.0","method":"x","id":1}"#; n].join(","));
        assert!(matches!(parse_body(batch(3).as_bytes(), 3), Ok(Body::Batch(items)) if items.len() == 3));
        assert!(matches!(parse_body(batch(4).as_bytes(), 3), Err(RpcError::InvalidRequest(_))));
        // Items past the limit are never read: what follows them does not matter.
        assert!(matches!(parse_body(b"[1,2,3,4,not json", 3), Err(RpcError::InvalidRequest(_))));
        assert!(matches!(parse_body(b"[1,2,not json", 3), Err(RpcError::Parse)));
        assert!(matches!(parse_body(b" []", 3), Ok(Body::Batch(items)) if items.is_empty()));
        assert!(matches!(parse_body(b"[1] x", 3), Err(RpcError::Parse)));
        assert!(matches!(parse_body(br#"{"a":1}"#, 3), Ok(Body::Single(_))));
    }

    #[test]
    fn rate_limit_counts_per_principal_and_window() {
        let rl = RateLimiter::default();
        let a = PrincipalKey::parse("user:a").unwrap();
        let b = PrincipalKey::parse("user:b").unwrap();
        assert!(check_rate(&rl, &a, None, 1000).is_ok());
        assert!(check_rate(&rl, &a, Some(2), 60_000).is_ok());
        assert!(check_rate(&rl, &a, Some(2), 60_000).is_ok());
        assert!(check_rate(&rl, &a, Some(2), 60_000).is_err());
        assert!(check_rate(&rl, &b, Some(2), 60_000).is_ok());
    }
}

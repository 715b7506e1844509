//! JSON-RPC helpers for the task-face tests (used with `tests/common`).

#![allow(dead_code)]

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::common::TestServer;

pub const ALICE: &str = "user:alice";
pub const BOB: &str = "user:bob";

/// POSTs a raw body to /rpc as `principal`; returns the status and the JSON body (`Null` when empty).
pub async fn rpc_raw(s: &TestServer, principal: &str, body: impl Into<String>) -> (StatusCode, Value) {
    let res = s
        .client
        .post(s.url("/rpc"))
        .header("content-type", "application/json")
        .header("electric-principal", principal)
        .body(body.into())
        .send()
        .await
        .expect("/rpc answers");
    let status = res.status();
    let bytes = res.bytes().await.expect("the body arrives");
    let body = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).expect("a JSON answer") };
    (status, body)
}

/// Sends one call as `principal` over a connection of its own (raw
/// HTTP/1.1), waits until it is held at `pause`, then closes the connection
/// as a client that goes away does, and waits until the server has dropped
/// the request (it closes its side, unanswered). The pause is left to the caller to release.
pub async fn call_dropped_at(
    s: &TestServer,
    principal: &str,
    method: &str,
    params: &Value,
    pause: &attache_server::pause::Pause,
) {
    let body = json!({ "jsonrpc": "2.0", "method": method, "params": params, "id": 1 });
    crate::common::request_dropped_at(s, reqwest::Method::POST, "/rpc", principal, Some(&body), pause).await;
}

/// One call; the whole response object.
pub async fn call(s: &TestServer, principal: &str, method: &str, params: Value) -> Value {
    let body = json!({ "jsonrpc": "2.0", "method": method, "params": params, "id": 1 });
    let (status, res) = rpc_raw(s, principal, body.to_string()).await;
    assert_eq!(status, StatusCode::OK, "{method}: {res}");
    assert_eq!(res["jsonrpc"], "2.0");
    assert_eq!(res["id"], 1);
    res
}

/// The result of a call that must succeed.
pub async fn ok(s: &TestServer, principal: &str, method: &str, params: Value) -> Value {
    let res = call(s, principal, method, params).await;
    assert!(res.get("error").is_none(), "{method} failed: {res}");
    res["result"].clone()
}

/// The error object of a call that must fail.
pub async fn err(s: &TestServer, principal: &str, method: &str, params: Value) -> Value {
    let res = call(s, principal, method, params).await;
    assert!(res.get("result").is_none(), "{method} should have failed: {res}");
    res["error"].clone()
}

pub async fn create_task(s: &TestServer, principal: &str, text: &str, priority: i64) -> String {
    let r = ok(s, principal, "task.create", json!({ "text": text, "priority": priority })).await;
    r["id"].as_str().expect("a task id").to_owned()
}

/// Creates `n` tasks of `principal` whose text is `text`, in JSON-RPC
/// batches of 50 (a long event log to scan: each is a `task.created` event).
pub async fn create_tasks(s: &TestServer, principal: &str, n: usize, text: &str) {
    for first in (0..n).step_by(50) {
        let batch: Vec<Value> = (first..n.min(first + 50))
            .map(|i| json!({ "jsonrpc": "2.0", "method": "task.create", "params": { "text": text }, "id": i }))
            .collect();
        let res = s.client.post(s.url("/rpc")).header("electric-principal", principal).json(&batch).send().await;
        let answers: Vec<Value> = res.expect("/rpc answers").json().await.expect("a JSON batch answer");
        assert!(answers.iter().all(|a| a.get("result").is_some()), "{answers:?}");
    }
}

/// Creates a task with a chosen id (the spec pages' `t-1234567890`).
pub async fn create_task_with_id(s: &TestServer, principal: &str, id: &str) {
    ok(
        s,
        principal,
        "task.create",
        json!({ "id": id, "text": "Review and optimize database queries", "priority": 75 }),
    )
    .await;
}

/// Is `s` an RFC 3339 UTC timestamp with milliseconds?
pub fn is_timestamp(v: &Value) -> bool {
    v.as_str().is_some_and(|s| chrono::DateTime::parse_from_rfc3339(s).is_ok() && s.ends_with('Z'))
}

/// `prefix-<ms>-<n base36>`
pub fn is_id(v: &Value, prefix: &str, suffix_len: usize) -> bool {
    let Some(s) = v.as_str() else { return false };
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() == 3
        && parts[0] == prefix
        && parts[1].len() >= 13
        && parts[1].bytes().all(|b| b.is_ascii_digit())
        && parts[2].len() == suffix_len
        && parts[2].bytes().all(|b| b.is_ascii_digit() || b.is_ascii_lowercase())
}

/// Asserts that every field of `expected` is in `actual` with the same value.
pub fn assert_fields(actual: &Value, expected: &Value) {
    for (k, v) in expected.as_object().expect("expected is an object") {
        assert_eq!(&actual[k], v, "field {k} of {actual}");
    }
}

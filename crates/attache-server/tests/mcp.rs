//! MCP at `/mcp`, driven by the official Rust SDK's streamable HTTP client.

mod common;
mod task_helpers;

use std::collections::HashMap;

use common::TestServer;
use http::{HeaderName, HeaderValue};
use rmcp::model::{CallToolRequestParams, CallToolResult, ClientConfig};
use rmcp::service::RunningService;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::{RoleClient, ServiceExt};
use serde_json::{json, Value};
use task_helpers::*;

async fn connect(s: &TestServer, principal: &str) -> RunningService<RoleClient, ClientConfig> {
    let mut headers = HashMap::new();
    headers.insert(HeaderName::from_static("electric-principal"), HeaderValue::from_str(principal).unwrap());
    let config = StreamableHttpClientTransportConfig::with_uri(s.url("/mcp")).custom_headers(headers);
    ClientConfig::default().serve(StreamableHttpClientTransport::from_config(config)).await.expect("MCP initializes")
}

async fn tool(client: &RunningService<RoleClient, ClientConfig>, name: &str, args: Value) -> CallToolResult {
    let Value::Object(map) = args else { panic!("arguments are an object") };
    client.call_tool(CallToolRequestParams::new(name.to_owned()).with_arguments(map)).await.expect("the tool answers")
}

fn structured(r: &CallToolResult) -> Value {
    assert_ne!(r.is_error, Some(true), "tool error: {r:?}");
    r.structured_content.clone().expect("structured content")
}

#[tokio::test]
async fn the_task_methods_are_tools_with_json_schemas() {
    let s = TestServer::start().await;
    let client = connect(&s, ALICE).await;
    let info = client.peer_info().expect("server info");
    assert_eq!(info.server_info.as_ref().map(|i| i.name.as_str()), Some("attache"));
    let tools = client.list_all_tools().await.unwrap();
    let mut names: Vec<&str> = tools.iter().map(|t| t.name.as_ref()).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "task__assign",
            "task__claim",
            "task__complete",
            "task__create",
            "task__create_attachment",
            "task__delete",
            "task__delete_attachment",
            "task__get",
            "task__get_attachment",
            "task__get_attachments_batch",
            "task__list",
            "task__list_attachments",
            "task__unassign",
            "task__update"
        ]
    );
    let create = tools.iter().find(|t| t.name == "task__create_attachment").unwrap();
    let schema = Value::Object((*create.input_schema).clone());
    assert_eq!(schema["type"], "object");
    assert_eq!(schema["required"], json!(["taskId", "key", "type"]));
    assert_eq!(schema["properties"]["type"]["enum"], json!(["json", "markdown", "text", "url", "binary"]));
    assert_eq!(schema["properties"]["key"]["maxLength"], 100);
    client.cancel().await.unwrap();
}

#[tokio::test]
async fn tools_create_and_read_attachments_as_the_caller() {
    let s = TestServer::start().await;
    let client = connect(&s, ALICE).await;
    let task = structured(&tool(&client, "task__create", json!({"text": "via MCP", "priority": 80})).await);
    let t = task["id"].as_str().unwrap().to_owned();
    assert!(is_id(&task["id"], "t", 6));
    let a = structured(
        &tool(
            &client,
            "task__create_attachment",
            json!({"taskId": t, "key": "analysis", "type": "json", "value": false}),
        )
        .await,
    );
    assert!(is_id(&a["id"], "ta", 9));
    let got = structured(&tool(&client, "task__get_attachment", json!({"taskId": t, "key": "analysis"})).await);
    assert_eq!(got["value"], false);
    assert_eq!(got["createdBy"], ALICE);
    // The JSON-RPC face sees the same attachment: one store.
    assert_eq!(ok(&s, ALICE, "task.get_attachment", json!({"taskId": t, "key": "analysis"})).await["id"], a["id"]);

    // Refusals are tool errors carrying the JSON-RPC error object.
    let missing = tool(&client, "task__get_attachment", json!({"taskId": t, "key": "nope"})).await;
    assert_eq!(missing.is_error, Some(true));
    let error = &missing.structured_content.as_ref().unwrap()["error"];
    assert_eq!(error["code"], -32602);
    assert_eq!(error["data"], json!({"taskId": t, "key": "nope"}));
    let bad =
        tool(&client, "task__create_attachment", json!({"taskId": t, "key": "k", "type": "url", "url": "ftp://x"}))
            .await;
    assert_eq!(bad.structured_content.as_ref().unwrap()["error"]["data"]["field"], "url");
    assert!(client.call_tool(CallToolRequestParams::new("task__nope")).await.is_err(), "unknown tools are refused");
    client.cancel().await.unwrap();

    // Another principal sees nothing of alice's task.
    let bob = connect(&s, BOB).await;
    let hidden = tool(&bob, "task__get", json!({"id": t})).await;
    assert_eq!(hidden.structured_content.as_ref().unwrap()["error"]["code"], -32602);
    bob.cancel().await.unwrap();
}

#[tokio::test]
async fn mcp_without_credentials_is_refused_in_token_mode() {
    let s = TestServer::start_with(|c| c.auth = Some(attache_server::auth::AuthMode::Token)).await;
    let res = s
        .client
        .post(s.url("/mcp"))
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .body(r#"{"jsonrpc":"2.0","method":"initialize","params":{"protocolVersion":"2025-03-26","capabilities":{},"clientInfo":{"name":"t","version":"1"}},"id":1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), reqwest::StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn a_tool_call_past_rpc_max_response_bytes_is_a_32000_tool_error_and_each_call_has_its_own_budget() {
    let s = TestServer::start_with(|c| c.rpc_max_response_bytes = 1 << 20).await;
    let t = create_task(&s, ALICE, "big", 50).await;
    let content = "x".repeat(300 << 10);
    ok(&s, ALICE, "task.create_attachment", json!({"taskId": t, "key": "a", "type": "text", "content": content})).await;
    let client = connect(&s, ALICE).await;
    let same = |n: usize| json!({"requests": vec![json!({"taskId": t, "key": "a"}); n]});
    let over = tool(&client, "task__get_attachments_batch", same(4)).await;
    assert_eq!(over.is_error, Some(true));
    let error = &over.structured_content.as_ref().unwrap()["error"];
    assert_eq!((&error["code"], &error["data"]), (&json!(-32000), &json!({"limit": 1 << 20})));
    assert!(error["message"].as_str().unwrap().contains("task.get_attachment"), "{error}");
    for _ in 0..2 {
        let three = structured(&tool(&client, "task__get_attachments_batch", same(3)).await);
        assert_eq!(three["attachments"].as_array().map(Vec::len), Some(3));
    }
    client.cancel().await.unwrap();
}

//! The task face over `POST /rpc`: every method's happy path and every
//! error code, each spec-page example request sent verbatim with its answer
//! checked field by field, concurrent claims and upserts, upserts across types.
//!
//! Why one file of this size: each file under tests/ is its own test binary (one more link of the
//! server and all its dependencies), and this one is one face's suite: its fixtures and helpers at
//! the top, then tests that each start their own server and read alone. The spec pages' examples
//! are checked in the pages' order.

mod common;
mod entity_support;
mod task_helpers;

use base64::Engine;
use common::TestServer;
use reqwest::StatusCode;
use serde_json::{json, Value};
use task_helpers::*;

/// The spec pages' task id.
const SPEC_TASK: &str = "t-1234567890";

async fn verbatim(s: &TestServer, body: &str) -> Value {
    let (status, res) = rpc_raw(s, ALICE, body).await;
    assert_eq!(status, StatusCode::OK, "{res}");
    res
}

// ---- the spec pages' examples, verbatim ----

#[tokio::test]
async fn create_example_answers_like_the_spec_page() {
    let s = TestServer::start().await;
    let res = verbatim(&s, r#"{"jsonrpc": "2.0", "method": "task.create", "params": {"text": "Review and optimize database queries", "priority": 75, "metadata": {"category": "optimization", "estimated_hours": 3}}, "id": "req-001"}"#).await;
    assert_eq!(res["id"], "req-001");
    let r = &res["result"];
    assert!(is_id(&r["id"], "t", 6), "{r}");
    assert_fields(
        r,
        &json!({"text": "Review and optimize database queries", "status": "pending", "priority": 75, "metadata": {"category": "optimization", "estimated_hours": 3}}),
    );
    assert!(is_timestamp(&r["createdAt"]));
}

#[tokio::test]
async fn create_with_text_out_of_range_answers_the_spec_error() {
    let s = TestServer::start().await;
    for text in [json!(""), json!("x".repeat(501))] {
        let e = err(&s, ALICE, "task.create", json!({ "text": text })).await;
        assert_eq!(e["code"], -32602);
        assert_eq!(e["message"], "Invalid params");
        assert_eq!(e["data"]["validation"], "Text must be between 1 and 500 characters");
    }
    let e = err(&s, ALICE, "task.create", json!({ "text": "a", "priority": 101 })).await;
    assert_eq!(e["code"], -32602);
    assert_eq!(e["data"]["field"], "priority");
    // Text of another type is said to be of the wrong type, not of the wrong length.
    let e = err(&s, ALICE, "task.create", json!({ "text": 5 })).await;
    assert_eq!(
        (e["code"].as_i64(), e["data"]["validation"].as_str()),
        (Some(-32602), Some("text must be a string")),
        "{e}"
    );
    let made = ok(&s, ALICE, "task.create", json!({ "text": "a" })).await;
    let e = err(&s, ALICE, "task.update", json!({ "id": made["id"], "updates": { "text": ["x"] } })).await;
    assert_eq!(e["data"]["validation"], "text must be a string", "{e}");
}

#[tokio::test]
async fn update_example_answers_like_the_spec_page() {
    let s = TestServer::start().await;
    let body = r#"{"jsonrpc": "2.0", "method": "task.update", "params": {"id": "t-1234567890", "updates": {"status": "in_progress", "priority": 85, "metadata": {"progress": "50%", "notes": "Started optimization work"}}}, "id": "req-003"}"#;
    let res = verbatim(&s, body).await;
    assert_eq!(
        res,
        json!({"jsonrpc": "2.0", "error": {"code": -32602, "message": "Task not found: t-1234567890", "data": {"taskId": "t-1234567890"}}, "id": "req-003"})
    );

    ok(&s, ALICE, "task.create", json!({"id": SPEC_TASK, "text": "Review and optimize database queries", "priority": 75, "metadata": {"category": "optimization"}})).await;
    let res = verbatim(&s, body).await;
    let r = &res["result"];
    assert_fields(
        r,
        &json!({"id": "t-1234567890", "text": "Review and optimize database queries", "status": "in_progress", "priority": 85}),
    );
    assert!(is_timestamp(&r["createdAt"]) && is_timestamp(&r["updatedAt"]));
    let task = ok(&s, ALICE, "task.get", json!({ "id": SPEC_TASK })).await;
    assert_eq!(
        task["metadata"],
        json!({"category": "optimization", "progress": "50%", "notes": "Started optimization work"}),
        "metadata is merged"
    );
}

#[tokio::test]
async fn complete_examples_answer_like_the_spec_page() {
    let s = TestServer::start().await;
    let body = r#"{"jsonrpc": "2.0", "method": "task.complete", "params": {"id": "t-1234567890", "workerId": "worker-001", "result": {"documentsReviewed": 15, "issuesFound": 3, "timeSpent": "2h 30m", "optimizations": ["Added index on user_id column", "Optimized JOIN query in reports", "Reduced connection pool size"]}}, "id": "req-004"}"#;
    let res = verbatim(&s, body).await;
    assert_eq!(
        res,
        json!({"jsonrpc": "2.0", "error": {"code": -32602, "message": "Task not found: t-1234567890", "data": {"taskId": "t-1234567890"}}, "id": "req-004"})
    );

    create_task_with_id(&s, ALICE, SPEC_TASK).await;
    ok(&s, ALICE, "task.claim", json!({ "workerId": "worker-001" })).await;
    let res = verbatim(&s, body).await;
    assert_eq!(res["id"], "req-004");
    assert_fields(&res["result"], &json!({"id": "t-1234567890", "status": "completed"}));
    assert!(is_timestamp(&res["result"]["completedAt"]));
    let stored = ok(&s, ALICE, "task.get_attachment", json!({"taskId": SPEC_TASK, "key": "result"})).await;
    assert_eq!(stored["type"], "json");
    assert_eq!(stored["value"]["documentsReviewed"], 15);

    // The simple completion (no result) fails the task.
    let other = create_task(&s, ALICE, "second", 50).await;
    ok(&s, ALICE, "task.claim", json!({ "workerId": "worker-001" })).await;
    let simple = r#"{"jsonrpc": "2.0", "method": "task.complete", "params": {"taskId": "TASK"}, "id": "req-005"}"#
        .replace("TASK", &other);
    let res = verbatim(&s, &simple).await;
    assert_fields(&res["result"], &json!({"id": other, "status": "failed"}));
    let row = ok(&s, ALICE, "task.get", json!({ "id": other })).await;
    assert_eq!(row["status"], "failed");
    assert!(row["completedAt"].is_string());
}

#[tokio::test]
async fn claim_examples_answer_like_the_spec_page() {
    let s = TestServer::start().await;
    let body = r#"{"jsonrpc": "2.0", "method": "task.claim", "params": {"workerId": "worker-001", "maxTasks": 1}, "id": "req-002"}"#;
    assert_eq!(verbatim(&s, body).await, json!({"jsonrpc": "2.0", "result": {"claimed": false}, "id": "req-002"}));

    ok(&s, ALICE, "task.create", json!({"id": SPEC_TASK, "text": "Review and optimize database queries", "priority": 75, "metadata": {"category": "optimization", "estimated_hours": 3}})).await;
    let res = verbatim(&s, body).await;
    let r = &res["result"];
    assert_fields(r, &json!({"claimed": true, "taskId": "t-1234567890"}));
    assert_fields(
        &r["task"],
        &json!({"id": "t-1234567890", "text": "Review and optimize database queries", "priority": 75, "status": "in_progress", "assignedTo": "worker-001", "metadata": {"category": "optimization", "estimated_hours": 3}, "result": null, "error": null, "completedAt": null}),
    );
    assert!(is_timestamp(&r["task"]["createdAt"]) && is_timestamp(&r["task"]["updatedAt"]));
}

#[tokio::test]
async fn assign_and_unassign_examples_answer_like_the_spec_pages() {
    let s = TestServer::start().await;
    let assign = r#"{"jsonrpc": "2.0", "method": "task.assign", "params": {"taskId": "t-1234567890", "instanceId": "worker-001"}, "id": "req-008"}"#;
    let unassign =
        r#"{"jsonrpc": "2.0", "method": "task.unassign", "params": {"taskId": "t-1234567890"}, "id": "req-009"}"#;
    assert_eq!(verbatim(&s, assign).await["error"]["data"], json!({"taskId": "t-1234567890"}));

    create_task_with_id(&s, ALICE, SPEC_TASK).await;
    let res = verbatim(&s, unassign).await;
    assert_eq!(
        res,
        json!({"jsonrpc": "2.0", "error": {"code": -32602, "message": "Task t-1234567890 is not currently assigned", "data": {"taskId": "t-1234567890"}}, "id": "req-009"})
    );
    let res = verbatim(&s, assign).await;
    assert_fields(&res["result"], &json!({"taskId": "t-1234567890", "instanceId": "worker-001"}));
    assert!(is_timestamp(&res["result"]["assignedAt"]));
    assert_eq!(
        ok(&s, ALICE, "task.get", json!({"id": SPEC_TASK})).await["status"],
        "pending",
        "assigning keeps pending"
    );
    // Re-assigning to the same instance is allowed; to another is not.
    verbatim(&s, assign).await["result"].as_object().expect("same instance again");
    let e = err(&s, ALICE, "task.assign", json!({"taskId": SPEC_TASK, "instanceId": "worker-002"})).await;
    assert_eq!(
        e,
        json!({"code": -32602, "message": "Task t-1234567890 is already assigned to worker-001.", "data": {"taskId": "t-1234567890", "currentAssignment": "worker-001"}})
    );
    let res = verbatim(&s, unassign).await;
    assert_fields(&res["result"], &json!({"taskId": "t-1234567890", "previousAssignment": "worker-001"}));
    assert!(is_timestamp(&res["result"]["unassignedAt"]));
}

#[tokio::test]
async fn list_examples_answer_like_the_spec_page() {
    let s = TestServer::start().await;
    let a = create_task(&s, ALICE, "Review and optimize database queries", 85).await;
    let b = create_task(&s, ALICE, "Update API documentation", 75).await;
    let c = create_task(&s, ALICE, "Pending one", 90).await;
    ok(&s, ALICE, "task.update", json!({"id": a, "updates": {"status": "in_progress"}})).await;
    ok(&s, ALICE, "task.update", json!({"id": b, "updates": {"status": "in_progress"}})).await;
    ok(&s, ALICE, "task.create_attachment", json!({"taskId": a, "key": "k1", "type": "text", "content": "x"})).await;

    let res = verbatim(&s, r#"{"jsonrpc": "2.0", "method": "task.list", "params": {"status": "in_progress", "orderBy": "priority", "order": "desc", "limit": 25, "offset": 0}, "id": "req-006"}"#).await;
    let r = &res["result"];
    assert_eq!(r["totalCount"], 2);
    assert_eq!(r["hasMore"], false);
    let tasks = r["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 2);
    assert_fields(
        &tasks[0],
        &json!({"id": a, "status": "in_progress", "priority": 85, "attachmentCount": 1, "result": null, "error": null, "completedAt": null}),
    );
    assert_fields(&tasks[1], &json!({"id": b, "priority": 75, "attachmentCount": 0}));

    let res = verbatim(&s, r#"{"jsonrpc": "2.0", "method": "task.list", "params": {}, "id": "req-007"}"#).await;
    let ids: Vec<&str> = res["result"]["tasks"].as_array().unwrap().iter().map(|t| t["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [c.as_str(), b.as_str(), a.as_str()], "newest first by default");

    // The pages' parameter examples.
    let r = ok(&s, ALICE, "task.list", json!({"status": "pending", "priority": 90, "limit": 10})).await;
    assert_eq!(r["totalCount"], 1);
    assert_eq!(r["tasks"][0]["id"], c.as_str());
    let r = ok(
        &s,
        ALICE,
        "task.list",
        json!({"status": "completed", "orderBy": "completedAt", "order": "desc", "limit": 50}),
    )
    .await;
    assert_eq!(r, json!({"tasks": [], "totalCount": 0, "hasMore": false}));
    ok(&s, ALICE, "task.assign", json!({"taskId": c, "instanceId": "worker-001"})).await;
    let r =
        ok(&s, ALICE, "task.list", json!({"assignedTo": "worker-001", "orderBy": "updatedAt", "order": "asc"})).await;
    assert_eq!(r["totalCount"], 1);
}

#[tokio::test]
async fn list_pages_with_an_exact_total_and_stable_order() {
    let s = TestServer::start().await;
    let mut ids = Vec::new();
    for i in 0..7 {
        ids.push(create_task(&s, ALICE, &format!("task {i}"), 50).await);
    }
    let mut seen = Vec::new();
    for offset in [0, 3, 6] {
        let r = ok(&s, ALICE, "task.list", json!({"limit": 3, "offset": offset, "order": "asc"})).await;
        assert_eq!(r["totalCount"], 7);
        assert_eq!(r["hasMore"], offset + 3 < 7);
        seen.extend(r["tasks"].as_array().unwrap().iter().map(|t| t["id"].as_str().unwrap().to_owned()));
    }
    assert_eq!(seen, ids);
    let e = err(&s, ALICE, "task.list", json!({"limit": 1001})).await;
    assert_eq!(e["code"], -32602);
    let e = err(&s, ALICE, "task.list", json!({"orderBy": "bogus"})).await;
    assert_eq!(e["code"], -32602);
}

#[tokio::test]
async fn delete_example_answers_like_the_spec_page() {
    let s = TestServer::start().await;
    let body = r#"{"jsonrpc": "2.0", "method": "task.delete", "params": {"id": "t-123456"}, "id": "req-001"}"#;
    let res = verbatim(&s, body).await;
    assert_eq!(res["error"]["code"], -32602);
    assert_eq!(res["error"]["data"], json!({"taskId": "t-123456"}));

    create_task_with_id(&s, ALICE, "t-123456").await;
    ok(
        &s,
        ALICE,
        "task.create_attachment",
        json!({"taskId": "t-123456", "key": "b", "type": "binary", "data": "AAEC"}),
    )
    .await;
    let res = verbatim(&s, body).await;
    assert_eq!(res["id"], "req-001");
    assert_fields(&res["result"], &json!({"id": "t-123456", "deleted": true}));
    assert!(is_timestamp(&res["result"]["deletedAt"]));
    assert_eq!(err(&s, ALICE, "task.get", json!({"id": "t-123456"})).await["code"], -32602);
    assert_eq!(ok(&s, ALICE, "task.list", json!({})).await["totalCount"], 0);
    let e = err(
        &s,
        ALICE,
        "task.create_attachment",
        json!({"taskId": "t-123456", "key": "k", "type": "text", "content": "x"}),
    )
    .await;
    assert_eq!(e["message"], "Task t-123456 not found");
    assert_eq!(verbatim(&s, body).await["error"]["code"], -32602, "deleting twice");
}

const CREATE_JSON: &str = r#"{"jsonrpc": "2.0", "method": "task.create_attachment", "params": {"taskId": "t-1234567890", "key": "analysis", "type": "json", "value": {"complexity": "high", "estimatedHours": 8, "dependencies": ["auth", "database"], "risks": ["Database migration required", "Potential downtime during deployment"]}}, "id": "req-009"}"#;
const CREATE_MARKDOWN: &str = r###"{"jsonrpc": "2.0", "method": "task.create_attachment", "params": {"taskId": "t-1234567890", "key": "implementation_notes", "type": "markdown", "content": "## Implementation Details\n\n- Use Redis for caching query results\n- Implement rate limiting on API endpoints\n- Add indexes on frequently queried columns\n\n### Performance Targets\n- < 100ms average response time\n- Support 1000 concurrent users"}, "id": "req-010"}"###;
const CREATE_URL: &str = r#"{"jsonrpc": "2.0", "method": "task.create_attachment", "params": {"taskId": "t-1234567890", "key": "reference_doc", "type": "url", "url": "https://docs.example.com/database-optimization-guide"}, "id": "req-011"}"#;
const GET_ATTACHMENT: &str = r#"{"jsonrpc": "2.0", "method": "task.get_attachment", "params": {"taskId": "t-1234567890", "key": "analysis"}, "id": "req-012"}"#;

#[tokio::test]
async fn create_attachment_examples_answer_like_the_spec_page() {
    let s = TestServer::start().await;
    for (body, id) in [(CREATE_JSON, "req-009"), (CREATE_MARKDOWN, "req-010"), (CREATE_URL, "req-011")] {
        assert_eq!(
            verbatim(&s, body).await,
            json!({"jsonrpc": "2.0", "error": {"code": -32602, "message": "Task t-1234567890 not found", "data": {"taskId": "t-1234567890"}}, "id": id})
        );
    }
    create_task_with_id(&s, ALICE, SPEC_TASK).await;
    for (body, id, key, kind) in [
        (CREATE_JSON, "req-009", "analysis", "json"),
        (CREATE_MARKDOWN, "req-010", "implementation_notes", "markdown"),
        (CREATE_URL, "req-011", "reference_doc", "url"),
    ] {
        let res = verbatim(&s, body).await;
        assert_eq!(res["id"], id);
        let r = &res["result"];
        assert!(is_id(&r["id"], "ta", 9), "{r}");
        assert_fields(r, &json!({"taskId": "t-1234567890", "key": key, "type": kind}));
        assert!(is_timestamp(&r["createdAt"]));
        assert_eq!(r.as_object().unwrap().len(), 5, "exactly id, taskId, key, type, createdAt: {r}");
    }
}

#[tokio::test]
async fn get_attachment_examples_answer_like_the_spec_page() {
    let s = TestServer::start().await;
    assert_eq!(
        verbatim(&s, GET_ATTACHMENT).await,
        json!({"jsonrpc": "2.0", "error": {"code": -32602, "message": "Attachment with key 'analysis' not found for task t-1234567890", "data": {"taskId": "t-1234567890", "key": "analysis"}}, "id": "req-012"})
    );
    create_task_with_id(&s, ALICE, SPEC_TASK).await;
    assert_eq!(verbatim(&s, GET_ATTACHMENT).await["error"]["code"], -32602, "task exists, attachment does not");
    let created = verbatim(&s, CREATE_JSON).await["result"].clone();
    verbatim(&s, CREATE_MARKDOWN).await;
    verbatim(&s, CREATE_URL).await;
    ok(&s, ALICE, "task.create_attachment", json!({"taskId": SPEC_TASK, "key": "performance_report", "type": "binary", "size": 2048576, "mimeType": "application/pdf"})).await;

    let res = verbatim(&s, GET_ATTACHMENT).await;
    assert_eq!(res["id"], "req-012");
    let r = &res["result"];
    assert_fields(
        r,
        &json!({"id": created["id"], "taskId": "t-1234567890", "key": "analysis", "type": "json", "value": {"complexity": "high", "estimatedHours": 8, "dependencies": ["auth", "database"], "risks": ["Database migration required", "Potential downtime during deployment"]}, "createdBy": ALICE, "createdAt": created["createdAt"], "updatedAt": created["createdAt"]}),
    );
    let keys: Vec<&String> = r.as_object().unwrap().keys().collect();
    assert_eq!(keys.len(), 8, "no fields beyond the spec's: {keys:?}");

    let md = ok(&s, ALICE, "task.get_attachment", json!({"taskId": SPEC_TASK, "key": "implementation_notes"})).await;
    assert_fields(
        &md,
        &json!({"type": "markdown", "content": "## Implementation Details\n\n- Use Redis for caching query results\n- Implement rate limiting on API endpoints\n- Add indexes on frequently queried columns\n\n### Performance Targets\n- < 100ms average response time\n- Support 1000 concurrent users", "createdBy": ALICE}),
    );
    assert!(md.get("value").is_none() && md.get("url").is_none());
    let url = ok(&s, ALICE, "task.get_attachment", json!({"taskId": SPEC_TASK, "key": "reference_doc"})).await;
    assert_fields(&url, &json!({"type": "url", "url": "https://docs.example.com/database-optimization-guide"}));
    let bin = ok(&s, ALICE, "task.get_attachment", json!({"taskId": SPEC_TASK, "key": "performance_report"})).await;
    assert_fields(
        &bin,
        &json!({"key": "performance_report", "type": "binary", "size": 2048576, "mimeType": "application/pdf", "createdBy": ALICE}),
    );
}

#[tokio::test]
async fn list_attachments_examples_answer_like_the_spec_page() {
    let s = TestServer::start().await;
    let all = r#"{"jsonrpc": "2.0", "method": "task.list_attachments", "params": {"taskId": "t-1234567890"}, "id": "req-013"}"#;
    let filtered = r#"{"jsonrpc": "2.0", "method": "task.list_attachments", "params": {"taskId": "t-1234567890", "type": "json", "limit": 10, "offset": 0}, "id": "req-014"}"#;
    assert_eq!(verbatim(&s, all).await["error"]["data"], json!({"taskId": "t-1234567890"}));
    create_task_with_id(&s, ALICE, SPEC_TASK).await;
    assert_eq!(
        verbatim(&s, all).await,
        json!({"jsonrpc": "2.0", "result": {"attachments": [], "totalCount": 0, "hasMore": false}, "id": "req-013"})
    );
    verbatim(&s, CREATE_JSON).await;
    verbatim(&s, CREATE_MARKDOWN).await;
    verbatim(&s, CREATE_URL).await;
    ok(&s, ALICE, "task.create_attachment", json!({"taskId": SPEC_TASK, "key": "performance_report", "type": "binary", "size": 2048576, "mimeType": "application/pdf"})).await;

    let r = verbatim(&s, all).await["result"].clone();
    assert_eq!(r["totalCount"], 4);
    assert_eq!(r["hasMore"], false);
    let keys: Vec<&str> = r["attachments"].as_array().unwrap().iter().map(|a| a["key"].as_str().unwrap()).collect();
    assert_eq!(keys, ["analysis", "implementation_notes", "reference_doc", "performance_report"], "creation order");
    assert_fields(&r["attachments"][3], &json!({"type": "binary", "size": 2048576, "mimeType": "application/pdf"}));

    let r = verbatim(&s, filtered).await["result"].clone();
    assert_eq!(r["totalCount"], 1);
    assert_eq!(r["attachments"][0]["key"], "analysis");
    for (params, total) in [
        (json!({"taskId": SPEC_TASK, "type": "json"}), 1),
        (json!({"taskId": SPEC_TASK, "limit": 20, "offset": 0}), 4),
        (json!({"taskId": SPEC_TASK, "type": "markdown"}), 1),
    ] {
        assert_eq!(ok(&s, ALICE, "task.list_attachments", params).await["totalCount"], total);
    }
    let page = ok(&s, ALICE, "task.list_attachments", json!({"taskId": SPEC_TASK, "limit": 3, "offset": 2})).await;
    assert_eq!(page["totalCount"], 4);
    assert_eq!(page["attachments"].as_array().unwrap().len(), 2);
    assert_eq!(page["hasMore"], false);
    let page = ok(&s, ALICE, "task.list_attachments", json!({"taskId": SPEC_TASK, "limit": 1})).await;
    assert_eq!(page["hasMore"], true);
    assert_eq!(
        err(&s, ALICE, "task.list_attachments", json!({"taskId": SPEC_TASK, "limit": 101})).await["code"],
        -32602
    );
}

#[tokio::test]
async fn get_attachments_batch_example_answers_like_the_spec_page() {
    let s = TestServer::start().await;
    let body = r#"{"jsonrpc": "2.0", "method": "task.get_attachments_batch", "params": {"requests": [{"taskId": "t-123456", "key": "analysis"}, {"taskId": "t-123456", "key": "implementation_notes"}, {"taskId": "t-789012", "key": "test_results"}]}, "id": "req-batch-001"}"#;
    let res = verbatim(&s, body).await;
    assert_eq!(res["error"]["code"], -32602);
    assert_eq!(res["error"]["message"], "Attachment not found: t-123456/analysis");
    assert_eq!(res["error"]["data"]["missing"].as_array().unwrap().len(), 3, "every missing item is named");

    create_task_with_id(&s, ALICE, "t-123456").await;
    create_task_with_id(&s, ALICE, "t-789012").await;
    ok(&s, ALICE, "task.create_attachment", json!({"taskId": "t-123456", "key": "analysis", "type": "json", "value": {"complexity": "high", "estimatedHours": 8}})).await;
    ok(&s, ALICE, "task.create_attachment", json!({"taskId": "t-123456", "key": "implementation_notes", "type": "markdown", "content": "## Implementation Details\n\n- Use Redis for caching"})).await;
    let res = verbatim(&s, body).await;
    assert_eq!(
        res["error"],
        json!({"code": -32602, "message": "Attachment not found: t-789012/test_results", "data": {"taskId": "t-789012", "key": "test_results", "missing": [{"taskId": "t-789012", "key": "test_results"}]}})
    );

    ok(&s, ALICE, "task.create_attachment", json!({"taskId": "t-789012", "key": "test_results", "type": "json", "value": {"passed": 45, "failed": 2, "skipped": 3}})).await;
    let res = verbatim(&s, body).await;
    assert_eq!(res["id"], "req-batch-001");
    let items = res["result"]["attachments"].as_array().unwrap();
    assert_eq!(items.len(), 3);
    assert_fields(
        &items[0],
        &json!({"taskId": "t-123456", "key": "analysis", "type": "json", "value": {"complexity": "high", "estimatedHours": 8}}),
    );
    assert_fields(
        &items[1],
        &json!({"taskId": "t-123456", "key": "implementation_notes", "type": "markdown", "content": "## Implementation Details\n\n- Use Redis for caching"}),
    );
    assert_fields(
        &items[2],
        &json!({"taskId": "t-789012", "key": "test_results", "type": "json", "value": {"passed": 45, "failed": 2, "skipped": 3}}),
    );
    for item in items {
        assert!(is_id(&item["id"], "ta", 9) && is_timestamp(&item["createdAt"]) && is_timestamp(&item["updatedAt"]));
    }
    for bad in
        [json!({"requests": []}), json!({"requests": vec![json!({"taskId": "t-1", "key": "k"}); 101]}), json!({})]
    {
        assert_eq!(err(&s, ALICE, "task.get_attachments_batch", bad).await["code"], -32602);
    }
}

#[tokio::test]
async fn delete_attachment_examples_answer_like_the_spec_page() {
    let s = TestServer::start().await;
    let body = r#"{"jsonrpc": "2.0", "method": "task.delete_attachment", "params": {"taskId": "t-1234567890", "key": "analysis"}, "id": "req-012"}"#;
    let git = r#"{"jsonrpc": "2.0", "method": "task.delete_attachment", "params": {"taskId": "t-1234567890", "key": "git-commit-abc123d"}, "id": "req-013"}"#;
    let not_found = json!({"jsonrpc": "2.0", "error": {"code": -32602, "message": "Attachment 'analysis' not found for task t-1234567890", "data": {"taskId": "t-1234567890", "key": "analysis"}}, "id": "req-012"});
    assert_eq!(verbatim(&s, body).await, not_found);
    create_task_with_id(&s, ALICE, SPEC_TASK).await;
    assert_eq!(verbatim(&s, body).await, not_found);
    let created = verbatim(&s, CREATE_JSON).await["result"].clone();
    ok(
        &s,
        ALICE,
        "task.create_attachment",
        json!({"taskId": SPEC_TASK, "key": "git-commit-abc123d", "type": "text", "content": "abc123d"}),
    )
    .await;

    let res = verbatim(&s, body).await;
    assert_eq!(res["id"], "req-012");
    assert_fields(
        &res["result"],
        &json!({"id": created["id"], "taskId": "t-1234567890", "key": "analysis", "deleted": true}),
    );
    assert!(is_timestamp(&res["result"]["deletedAt"]));
    assert_eq!(verbatim(&s, GET_ATTACHMENT).await["error"]["code"], -32602);
    assert_eq!(verbatim(&s, body).await, not_found, "deleting twice");
    assert_eq!(verbatim(&s, git).await["result"]["key"], "git-commit-abc123d");
    let list = ok(&s, ALICE, "task.list_attachments", json!({"taskId": SPEC_TASK})).await;
    assert_eq!(list["totalCount"], 0);
}

// ---- attachment semantics ----

#[tokio::test]
async fn json_attachments_keep_falsy_values() {
    let s = TestServer::start().await;
    let t = create_task(&s, ALICE, "falsy", 0).await;
    assert_eq!(ok(&s, ALICE, "task.get", json!({"id": t})).await["priority"], 0, "priority 0 stays 0");
    for (key, value) in [("zero", json!(0)), ("no", json!(false)), ("empty", json!("")), ("nothing", json!(null))] {
        ok(&s, ALICE, "task.create_attachment", json!({"taskId": t, "key": key, "type": "json", "value": value})).await;
        let got = ok(&s, ALICE, "task.get_attachment", json!({"taskId": t, "key": key})).await;
        assert_eq!(got["value"], value, "{key}");
        assert!(got.as_object().unwrap().contains_key("value"), "{key}: value is present even when null");
    }
    let e = err(&s, ALICE, "task.create_attachment", json!({"taskId": t, "key": "k", "type": "json"})).await;
    assert_eq!(e["data"]["validation"], "JSON attachments require a value field");
}

#[tokio::test]
async fn attachment_params_are_validated() {
    let s = TestServer::start().await;
    let t = create_task(&s, ALICE, "validation", 50).await;
    let cases = [
        (json!({"taskId": t, "key": "", "type": "text", "content": "x"}), "key"),
        (json!({"taskId": t, "key": "k".repeat(101), "type": "text", "content": "x"}), "key"),
        (json!({"taskId": t, "key": "k", "type": "pdf", "content": "x"}), "type"),
        (json!({"taskId": t, "key": "k", "type": "markdown"}), "content"),
        (json!({"taskId": t, "key": "k", "type": "url"}), "url"),
        (json!({"taskId": t, "key": "k", "type": "url", "url": "ftp://example.com/x"}), "url"),
        (json!({"taskId": t, "key": "k", "type": "url", "url": "javascript:alert(1)"}), "url"),
        (json!({"taskId": t, "key": "k", "type": "text", "content": "x", "value": 1}), "value"),
        (json!({"taskId": t, "key": "k", "type": "binary", "size": 0}), "size"),
        (json!({"taskId": t, "key": "k", "type": "binary", "data": "!!!"}), "data"),
        (json!({"taskId": t, "key": "k", "type": "binary", "data": "AAEC", "size": 4}), "size"),
        (json!({"key": "k", "type": "text", "content": "x"}), "taskId"),
    ];
    for (params, field) in cases {
        let e = err(&s, ALICE, "task.create_attachment", params.clone()).await;
        assert_eq!(e["code"], -32602, "{params}");
        assert_eq!(e["message"], "Invalid params", "{params}");
        assert_eq!(e["data"]["field"], field, "{params}: {e}");
    }
    assert_eq!(ok(&s, ALICE, "task.list_attachments", json!({"taskId": t})).await["totalCount"], 0);
}

#[tokio::test]
async fn upsert_across_types_keeps_id_and_created_at_and_drops_old_fields() {
    let s = TestServer::start().await;
    let t = create_task(&s, ALICE, "upserts", 50).await;
    let first =
        ok(&s, ALICE, "task.create_attachment", json!({"taskId": t, "key": "k", "type": "json", "value": {"a": 1}}))
            .await;
    let steps = [
        (
            json!({"type": "markdown", "content": "# md"}),
            json!({"type": "markdown", "content": "# md"}),
            &["value", "url", "size", "mimeType"][..],
        ),
        (
            json!({"type": "url", "url": "https://example.com/a"}),
            json!({"type": "url", "url": "https://example.com/a"}),
            &["value", "content", "size"][..],
        ),
        (
            json!({"type": "binary", "size": 10, "mimeType": "image/png"}),
            json!({"type": "binary", "size": 10, "mimeType": "image/png"}),
            &["value", "content", "url"][..],
        ),
        (
            json!({"type": "text", "content": "plain"}),
            json!({"type": "text", "content": "plain"}),
            &["value", "url", "size", "mimeType"][..],
        ),
        (
            json!({"type": "json", "value": [1, 2]}),
            json!({"type": "json", "value": [1, 2]}),
            &["content", "url", "size", "mimeType"][..],
        ),
    ];
    let mut last_updated = first["createdAt"].clone();
    for (params, expected, absent) in steps {
        let mut p = params.clone();
        p["taskId"] = json!(t);
        p["key"] = json!("k");
        let r = ok(&s, ALICE, "task.create_attachment", p).await;
        assert_eq!(r["id"], first["id"], "the id survives {params}");
        assert_eq!(r["createdAt"], first["createdAt"], "createdAt survives {params}");
        let got = ok(&s, ALICE, "task.get_attachment", json!({"taskId": t, "key": "k"})).await;
        assert_fields(&got, &expected);
        for field in absent {
            assert!(got.get(*field).is_none(), "{field} is stale in {got}");
        }
        assert!(got["updatedAt"].as_str() >= last_updated.as_str());
        last_updated = got["updatedAt"].clone();
    }
    let list = ok(&s, ALICE, "task.list_attachments", json!({"taskId": t})).await;
    assert_eq!(list["totalCount"], 1, "one key, one attachment");
}

#[tokio::test]
async fn concurrent_upserts_of_one_key_share_one_id() {
    let s = TestServer::start().await;
    let t = create_task(&s, ALICE, "race", 50).await;
    let calls = (0..24).map(|i| {
        let s = &s;
        let t = t.clone();
        async move {
            ok(s, ALICE, "task.create_attachment", json!({"taskId": t, "key": "shared", "type": "json", "value": i}))
                .await
        }
    });
    let results = futures::future::join_all(calls).await;
    let ids: std::collections::HashSet<&str> = results.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 1, "{ids:?}");
    let list = ok(&s, ALICE, "task.list_attachments", json!({"taskId": t})).await;
    assert_eq!(list["totalCount"], 1);
    assert_eq!(list["attachments"][0]["id"], *ids.iter().next().unwrap());
}

#[tokio::test]
async fn binary_data_is_stored_as_bytes_and_readable() {
    let s = TestServer::start().await;
    let t = create_task(&s, ALICE, "bytes", 50).await;
    let bytes: Vec<u8> = (0..=255).collect();
    let b64 = base64::engine::general_purpose::STANDARD.encode(&bytes);
    let r = ok(
        &s,
        ALICE,
        "task.create_attachment",
        json!({"taskId": t, "key": "blob", "type": "binary", "data": b64, "mimeType": "application/octet-stream"}),
    )
    .await;
    let got = ok(&s, ALICE, "task.get_attachment", json!({"taskId": t, "key": "blob"})).await;
    assert_fields(&got, &json!({"id": r["id"], "type": "binary", "size": 256, "mimeType": "application/octet-stream"}));
    assert!(got.get("data").is_none(), "bytes are not echoed inline");
    let path = got["streamPath"].as_str().expect("the bytes' stream path").to_owned();
    let res = s.client.get(s.url(&path)).header("electric-principal", ALICE).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.bytes().await.unwrap().to_vec(), bytes);
    let other = s.client.get(s.url(&path)).header("electric-principal", BOB).send().await.unwrap();
    assert_eq!(other.status(), StatusCode::NOT_FOUND, "the bytes follow the task's permissions");

    // Replacing the bytes keeps the id; the old bytes go.
    ok(&s, ALICE, "task.create_attachment", json!({"taskId": t, "key": "blob", "type": "binary", "data": "AQID"}))
        .await;
    let again = ok(&s, ALICE, "task.get_attachment", json!({"taskId": t, "key": "blob"})).await;
    assert_eq!(again["id"], r["id"]);
    assert_eq!(again["size"], 3);
    let new_path = again["streamPath"].as_str().unwrap();
    assert_ne!(new_path, path);
    let res = s.client.get(s.url(new_path)).header("electric-principal", ALICE).send().await.unwrap();
    assert_eq!(res.bytes().await.unwrap().to_vec(), vec![1, 2, 3]);
    let res = s.client.get(s.url(&path)).header("electric-principal", ALICE).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
}

/// A binary attachment replaced by one of another type (JSON, text, a URL)
/// keeps none of its bytes: before, the new entry's nominal stream path was
/// the old bytes' own address, so they stayed readable there (through the
/// entity route, under the new content type, and through the raw stream
/// route) even after `task.delete_attachment`, and forks copied them.
#[tokio::test]
async fn a_binary_attachment_replaced_by_another_type_keeps_no_bytes_readable() {
    let s = TestServer::start().await;
    let t = create_task(&s, ALICE, "replace bytes", 50).await;
    for replacement in [
        json!({"type": "json", "value": {"a": 1}}),
        json!({"type": "text", "content": "plain"}),
        json!({"type": "url", "url": "https://example.com/x"}),
    ] {
        let mut put = json!({"taskId": t, "key": "k", "type": "binary", "data": "U0VDUkVU"});
        let made = ok(&s, ALICE, "task.create_attachment", put.clone()).await;
        let id = made["id"].as_str().expect("an id").to_owned();
        let raw = format!("/task/{t}/attachments/{id}");
        let entity_read = format!("/_electric/entities/task/{t}/attachments/{id}");
        let read = |path: String| {
            let s = &s;
            async move {
                let res = s.client.get(s.url(&path)).header("electric-principal", ALICE).send().await.unwrap();
                (res.status(), res.bytes().await.unwrap())
            }
        };
        assert_eq!(read(entity_read.clone()).await, (StatusCode::OK, bytes::Bytes::from_static(b"SECRET")));

        put.as_object_mut().unwrap().remove("data");
        for (k, v) in replacement.as_object().unwrap() {
            put[k] = v.clone();
        }
        ok(&s, ALICE, "task.create_attachment", put).await;
        assert_eq!(read(entity_read.clone()).await.0, StatusCode::NOT_FOUND, "after {replacement}");
        assert_eq!(read(raw.clone()).await.0, StatusCode::NOT_FOUND, "after {replacement}");
        ok(&s, ALICE, "task.delete_attachment", json!({"taskId": t, "key": "k"})).await;
        assert_eq!(read(raw).await.0, StatusCode::NOT_FOUND, "after the delete");
    }
}

#[tokio::test]
async fn task_attachments_are_manifest_rows_on_the_task_main_stream() {
    let s = TestServer::start().await;
    let t = create_task(&s, ALICE, "rows", 50).await;
    let r = ok(
        &s,
        ALICE,
        "task.create_attachment",
        json!({"taskId": t, "key": "analysis", "type": "json", "value": {"a": 1}}),
    )
    .await;
    let res = s
        .client
        .get(s.url(&format!("/task/{t}/main")))
        .query(&[("offset", "-1")])
        .header("electric-principal", ALICE)
        .send()
        .await
        .unwrap();
    let rows: Vec<Value> = res.json().await.unwrap();
    let manifest: Vec<&Value> = rows.iter().filter(|r| r["type"] == "manifest").collect();
    assert_eq!(manifest.len(), 1);
    let m = manifest[0];
    assert_eq!(m["key"], format!("attachment:{}", r["id"].as_str().unwrap()));
    assert_eq!(m["headers"]["operation"], "insert");
    assert_fields(
        &m["value"],
        &json!({"kind": "attachment", "id": r["id"], "status": "complete", "name": "analysis", "taskType": "json", "value": {"a": 1}, "streamPath": format!("/task/{t}/attachments/{}", r["id"].as_str().unwrap())}),
    );
    let events: Vec<&str> =
        rows.iter().filter(|r| r["type"] == "event").map(|r| r["value"]["type"].as_str().unwrap()).collect();
    assert_eq!(events, ["task.created", "task.attachment_created"]);
}

#[tokio::test]
async fn an_upload_with_a_key_is_a_task_attachment() {
    let s = TestServer::start().await;
    let t = create_task(&s, ALICE, "upload", 50).await;
    // A multipart upload of `parts` (name, filename, content type, value) to the task's entity route.
    let upload = |parts: &[(&str, Option<&str>, Option<&str>, &str)]| {
        let mut body = String::new();
        for (name, filename, mime, value) in parts {
            body.push_str(&format!("--XyZ\r\nContent-Disposition: form-data; name=\"{name}\""));
            if let Some(f) = filename {
                body.push_str(&format!("; filename=\"{f}\""));
            }
            if let Some(m) = mime {
                body.push_str(&format!("\r\nContent-Type: {m}"));
            }
            body.push_str(&format!("\r\n\r\n{value}\r\n"));
        }
        body.push_str("--XyZ--\r\n");
        s.client
            .post(s.url(&format!("/_electric/entities/task/{t}/attachments")))
            .header("electric-principal", ALICE)
            .header("content-type", "multipart/form-data; boundary=XyZ")
            .body(body)
            .send()
    };
    let res = upload(&[
        ("key", None, None, "report"),
        ("subject", None, None, r#"{"type":"context","key":"report"}"#),
        ("file", Some("r.pdf"), Some("application/pdf"), "%PDF-1"),
    ])
    .await
    .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED, "{}", res.text().await.unwrap_or_default());
    let got = ok(&s, ALICE, "task.get_attachment", json!({"taskId": t, "key": "report"})).await;
    assert_fields(
        &got,
        &json!({"key": "report", "type": "binary", "size": 6, "mimeType": "application/pdf", "createdBy": ALICE}),
    );
    let list = ok(&s, ALICE, "task.list_attachments", json!({"taskId": t, "type": "binary"})).await;
    assert_eq!(list["totalCount"], 1);
    // A `key` alone names its subject: context for the task, as the task face writes it.
    let res =
        upload(&[("key", None, None, "keyed"), ("file", Some("k.txt"), Some("text/plain"), "hello")]).await.unwrap();
    assert_eq!(res.status(), StatusCode::CREATED, "{}", res.text().await.unwrap_or_default());
    let got = ok(&s, ALICE, "task.get_attachment", json!({"taskId": t, "key": "keyed"})).await;
    assert_fields(&got, &json!({"key": "keyed", "type": "binary", "size": 5}));
    // And the other way: the entity route lists what the task face wrote.
    ok(&s, ALICE, "task.create_attachment", json!({"taskId": t, "key": "note", "type": "text", "content": "hi"})).await;
    let res = s
        .client
        .get(s.url(&format!("/_electric/entities/task/{t}/attachments")))
        .header("electric-principal", ALICE)
        .send()
        .await
        .unwrap();
    let text = res.text().await.unwrap();
    assert!(text.contains("\"note\""), "{text}");
}

// ---- task lifecycle ----

#[tokio::test]
async fn tasks_created_at_once_get_distinct_ids() {
    let s = TestServer::start().await;
    let creates = (0..30).map(|i| {
        let s = &s;
        async move { create_task(s, ALICE, &format!("t{i}"), 50).await }
    });
    let ids: std::collections::HashSet<String> = futures::future::join_all(creates).await.into_iter().collect();
    assert_eq!(ids.len(), 30);
    let e = err(&s, ALICE, "task.create", json!({"id": ids.iter().next().unwrap(), "text": "again"})).await;
    assert_eq!(e["code"], -32602);
}

#[tokio::test]
async fn get_returns_the_full_row() {
    let s = TestServer::start().await;
    let t = create_task(&s, ALICE, "row", 42).await;
    let row = ok(&s, ALICE, "task.get", json!({"id": t})).await;
    assert_fields(
        &row,
        &json!({"id": t, "text": "row", "status": "pending", "priority": 42, "assignedTo": null, "metadata": null, "result": null, "error": null, "completedAt": null, "attachmentCount": 0}),
    );
    assert_eq!(err(&s, ALICE, "task.get", json!({"id": "t-nope"})).await["message"], "Task not found: t-nope");
}

#[tokio::test]
async fn illegal_status_transitions_are_rejected() {
    let s = TestServer::start().await;
    let t = create_task(&s, ALICE, "transitions", 50).await;
    let e = err(&s, ALICE, "task.update", json!({"id": t, "updates": {"status": "completed"}})).await;
    assert_eq!(e["code"], -32602);
    assert_eq!(e["data"], json!({"taskId": t, "status": "pending", "requested": "completed"}));
    let e = err(&s, ALICE, "task.complete", json!({"id": t, "result": 1})).await;
    assert_eq!(e["code"], -32602, "an unassigned pending task cannot complete");
    assert_eq!(e["message"], format!("Task {t} is not assigned"));
    ok(&s, ALICE, "task.update", json!({"id": t, "updates": {"status": "in_progress"}})).await;
    ok(&s, ALICE, "task.update", json!({"id": t, "updates": {"status": "completed"}})).await;
    for next in ["pending", "in_progress", "failed", "completed"] {
        let e = err(&s, ALICE, "task.update", json!({"id": t, "updates": {"status": next}})).await;
        assert_eq!(e["code"], -32602, "completed → {next}");
    }
    let e = err(&s, ALICE, "task.update", json!({"id": t, "updates": {"status": "done"}})).await;
    assert_eq!(e["data"]["field"], "status");
    assert_eq!(err(&s, ALICE, "task.assign", json!({"taskId": t, "instanceId": "w"})).await["code"], -32602);
    assert_eq!(err(&s, ALICE, "task.unassign", json!({"taskId": t})).await["code"], -32602);
}

#[tokio::test]
async fn concurrent_claims_never_share_a_task() {
    let s = TestServer::start().await;
    for i in 0..8 {
        create_task(&s, ALICE, &format!("job {i}"), 50).await;
    }
    let claims = (0..20).map(|w| {
        let s = &s;
        async move { ok(s, ALICE, "task.claim", json!({"workerId": format!("worker-{w}")})).await }
    });
    let results = futures::future::join_all(claims).await;
    let won: Vec<&Value> = results.iter().filter(|r| r["claimed"] == true).collect();
    assert_eq!(won.len(), 8);
    let ids: std::collections::HashSet<&str> = won.iter().map(|r| r["taskId"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 8, "no task is claimed twice");
    for r in &won {
        let row = ok(&s, ALICE, "task.get", json!({"id": r["taskId"]})).await;
        assert_eq!(row["assignedTo"], r["task"]["assignedTo"]);
        assert_eq!(row["status"], "in_progress");
    }
    assert_eq!(results.iter().filter(|r| r == &&json!({"claimed": false})).count(), 12);
}

#[tokio::test]
async fn claim_takes_highest_priority_then_oldest_and_brings_attachments() {
    let s = TestServer::start().await;
    let low = create_task(&s, ALICE, "low", 10).await;
    let old = create_task(&s, ALICE, "old high", 90).await;
    let new = create_task(&s, ALICE, "new high", 90).await;
    let mine = create_task(&s, ALICE, "assigned elsewhere", 100).await;
    ok(&s, ALICE, "task.assign", json!({"taskId": mine, "instanceId": "someone-else"})).await;
    ok(&s, ALICE, "task.create_attachment", json!({"taskId": old, "key": "spec", "type": "text", "content": "do it"}))
        .await;
    let order: Vec<String> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            let r = ok(&s, ALICE, "task.claim", json!({"workerId": "w1"})).await;
            v.push(r["taskId"].as_str().unwrap().to_owned());
            if v.len() == 1 {
                assert_eq!(r["task"]["attachmentCount"], 1);
                assert_fields(
                    &r["task"]["attachments"]["spec"],
                    &json!({"type": "text", "content": "do it", "key": "spec"}),
                );
            }
        }
        v
    };
    assert_eq!(order, [old, new, low]);
    assert_eq!(ok(&s, ALICE, "task.claim", json!({"workerId": "w1"})).await, json!({"claimed": false}));
    let r = ok(&s, ALICE, "task.claim", json!({"workerId": "someone-else"})).await;
    assert_eq!(r["taskId"], mine.as_str(), "a task assigned to a worker is claimable by it");
    assert_eq!(err(&s, ALICE, "task.claim", json!({})).await["code"], -32602);
}

#[tokio::test]
async fn complete_checks_the_worker_and_keeps_falsy_results() {
    let s = TestServer::start().await;
    let t = create_task(&s, ALICE, "work", 50).await;
    ok(&s, ALICE, "task.claim", json!({"workerId": "w1"})).await;
    let e = err(&s, ALICE, "task.complete", json!({"id": t, "workerId": "w2", "result": 1})).await;
    assert_eq!(e["data"]["currentAssignment"], "w1");
    let r = ok(&s, ALICE, "task.complete", json!({"taskId": t, "workerId": "w1", "result": 0})).await;
    assert_eq!(r["status"], "completed", "0 is a result");
    assert_eq!(ok(&s, ALICE, "task.get_attachment", json!({"taskId": t, "key": "result"})).await["value"], 0);
    assert_eq!(ok(&s, ALICE, "task.get", json!({"id": t})).await["result"], 0);
    let e = err(&s, ALICE, "task.complete", json!({"id": t, "result": 1})).await;
    assert_eq!(e["code"], -32602, "completing twice");
    let e = err(&s, ALICE, "task.complete", json!({})).await;
    assert_eq!(e["data"]["validation"], "Either 'id' or 'taskId' must be provided");
}

#[tokio::test]
async fn complete_on_an_assigned_pending_task_is_accepted_as_claudebench_does() {
    // ClaudeBench's task.complete contract test: create, assign (the task stays pending), complete.
    let s = TestServer::start().await;
    let t = create_task(&s, ALICE, "assigned, not claimed", 50).await;
    ok(&s, ALICE, "task.assign", json!({"taskId": t, "instanceId": "worker-complete-test"})).await;
    assert_eq!(ok(&s, ALICE, "task.get", json!({"id": t})).await["status"], "pending");
    let e = err(&s, ALICE, "task.complete", json!({"id": t, "workerId": "someone-else", "result": 1})).await;
    assert_eq!((e["code"].as_i64(), &e["data"]["currentAssignment"]), (Some(-32602), &json!("worker-complete-test")));
    let r = ok(&s, ALICE, "task.complete", json!({"id": t, "result": {"success": true}})).await;
    assert_eq!(r["status"], "completed");
    let row = ok(&s, ALICE, "task.get", json!({"id": t})).await;
    assert_eq!((row["status"].as_str(), row["result"]["success"].as_bool()), (Some("completed"), Some(true)));
    assert_eq!(err(&s, ALICE, "task.complete", json!({"id": t, "result": 2})).await["code"], -32602, "twice");
    // The event names the assignee as the one who completed it, as ClaudeBench's does.
    let events = s
        .client
        .get(s.url("/_attache/events"))
        .query(&[("offset", "-1"), ("taskId", t.as_str())])
        .header("electric-principal", ALICE)
        .send()
        .await
        .unwrap()
        .json::<Vec<Value>>()
        .await
        .unwrap();
    let completed = events.iter().find(|e| e["type"] == "task.completed").expect("a task.completed event");
    assert_eq!(completed["metadata"]["completedBy"], "worker-complete-test");

    // Without a result it fails, as ClaudeBench's "should fail task without result".
    let f = create_task(&s, ALICE, "fails", 50).await;
    ok(&s, ALICE, "task.assign", json!({"taskId": f, "instanceId": "worker-complete-test"})).await;
    let r = ok(&s, ALICE, "task.complete", json!({"id": f, "workerId": "worker-complete-test"})).await;
    assert_eq!(r["status"], "failed");
    // An unassigned task cannot complete.
    let u = create_task(&s, ALICE, "unassigned", 50).await;
    let e = err(&s, ALICE, "task.complete", json!({"id": u, "result": 1})).await;
    assert_eq!((e["code"].as_i64(), e["data"]["status"].as_str()), (Some(-32602), Some("pending")));
}

// ---- permissions ----

#[tokio::test]
async fn other_principals_see_nothing_without_grants_and_get_32002_without_write() {
    let s = TestServer::start().await;
    let t = create_task(&s, ALICE, "private", 50).await;
    ok(&s, ALICE, "task.create_attachment", json!({"taskId": t, "key": "k", "type": "text", "content": "secret"}))
        .await;
    assert_eq!(err(&s, BOB, "task.get", json!({"id": t})).await["message"], format!("Task not found: {t}"));
    assert_eq!(err(&s, BOB, "task.get_attachment", json!({"taskId": t, "key": "k"})).await["code"], -32602);
    assert_eq!(ok(&s, BOB, "task.list", json!({})).await["totalCount"], 0);
    assert_eq!(ok(&s, BOB, "task.claim", json!({"workerId": "bob"})).await["claimed"], false);

    let res = s
        .client
        .post(s.url(&format!("/_electric/entities/task/{t}/grants")))
        .header("electric-principal", ALICE)
        .json(&json!({"subject_kind": "principal", "subject_value": BOB, "permission": "read"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(ok(&s, BOB, "task.get_attachment", json!({"taskId": t, "key": "k"})).await["content"], "secret");
    for (method, params) in [
        ("task.create_attachment", json!({"taskId": t, "key": "k2", "type": "text", "content": "x"})),
        ("task.delete_attachment", json!({"taskId": t, "key": "k"})),
        ("task.update", json!({"id": t, "updates": {"priority": 1}})),
        ("task.assign", json!({"taskId": t, "instanceId": "bob"})),
        ("task.delete", json!({"id": t})),
    ] {
        let e = err(&s, BOB, method, params).await;
        assert_eq!(e["code"], -32002, "{method}: {e}");
    }
    assert_eq!(ok(&s, BOB, "task.claim", json!({"workerId": "bob"})).await["claimed"], false, "claiming needs write");
}

/// Grants `permission` on task `t` to `subject_value` (a principal, or a kind with `kind`); the grant's id.
async fn grant_on_task(s: &TestServer, t: &str, subject_kind: &str, subject_value: &str, permission: &str) -> u64 {
    let res = s
        .client
        .post(s.url(&format!("/_electric/entities/task/{t}/grants")))
        .header("electric-principal", ALICE)
        .json(&json!({"subject_kind": subject_kind, "subject_value": subject_value, "permission": permission}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    res.json::<Value>().await.unwrap()["id"].as_u64().expect("a grant id")
}

/// The ids `task.list` answers `who`, sorted, after checking its count.
async fn listed_ids(s: &TestServer, who: &str) -> Vec<String> {
    let r = ok(s, who, "task.list", json!({"limit": 1000})).await;
    let mut ids: Vec<String> =
        r["tasks"].as_array().unwrap().iter().map(|t| t["id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(r["totalCount"], ids.len(), "{who}: {r}");
    ids.sort();
    ids
}

/// The ids among `all` that `task.get` answers `who` (the permission check of one task, by itself).
async fn gettable_ids(s: &TestServer, who: &str, all: &[&String]) -> Vec<String> {
    let mut ids = Vec::new();
    for t in all {
        if call(s, who, "task.get", json!({"id": t})).await.get("result").is_some() {
            ids.push((*t).clone());
        }
    }
    ids.sort();
    ids
}

/// `task.list` and `task.claim` start from the tasks each caller may possibly
/// see (its own, those granted to it or to its kind), not from every
/// principal's: what they answer is what a check of each task answers, for
/// the owner, a principal grantee, a kind grantee and a stranger, before and
/// after a revoke.
#[tokio::test]
async fn task_list_and_claim_answer_each_caller_its_own_and_granted_tasks_and_no_others() {
    const CAROL: &str = "agent:carol";
    const DAVE: &str = "user:dave";
    const ZED: &str = "service:zed";
    let s = TestServer::start().await;
    let bob_read = create_task(&s, ALICE, "bob reads", 10).await;
    let bob_manages = create_task(&s, ALICE, "bob manages", 20).await;
    let agents_read = create_task(&s, ALICE, "agents read", 30).await;
    let agents_manage = create_task(&s, ALICE, "agents manage", 40).await;
    let users_read = create_task(&s, ALICE, "users read", 50).await;
    let private = create_task(&s, ALICE, "private", 60).await;
    let bobs_own = create_task(&s, BOB, "bob's own", 5).await;
    let revoked = grant_on_task(&s, &bob_read, "principal", BOB, "read").await;
    grant_on_task(&s, &bob_manages, "principal", BOB, "manage").await;
    grant_on_task(&s, &agents_read, "principal_kind", "agent", "read").await;
    grant_on_task(&s, &agents_manage, "principal_kind", "agent", "manage").await;
    grant_on_task(&s, &users_read, "principal_kind", "user", "read").await;

    let all = [&bob_read, &bob_manages, &agents_read, &agents_manage, &users_read, &private, &bobs_own];
    let sorted = |ids: &[&String]| {
        let mut v: Vec<String> = ids.iter().map(|t| (*t).clone()).collect();
        v.sort();
        v
    };
    let expected = [
        (ALICE, sorted(&[&bob_read, &bob_manages, &agents_read, &agents_manage, &users_read, &private])),
        (BOB, sorted(&[&bob_read, &bob_manages, &users_read, &bobs_own])),
        (CAROL, sorted(&[&agents_read, &agents_manage])),
        (DAVE, sorted(&[&users_read])),
        (ZED, Vec::new()),
    ];
    for (who, ids) in &expected {
        assert_eq!(&listed_ids(&s, who).await, ids, "{who}'s list");
        assert_eq!(&gettable_ids(&s, who, &all).await, ids, "{who}'s tasks one by one");
    }

    // Revoked: gone from BOB's list, still on ALICE's.
    let res = s
        .client
        .delete(s.url(&format!("/_electric/entities/task/{bob_read}/grants/{revoked}")))
        .header("electric-principal", ALICE)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    let bobs = sorted(&[&bob_manages, &users_read, &bobs_own]);
    assert_eq!(listed_ids(&s, BOB).await, bobs);
    assert_eq!(gettable_ids(&s, BOB, &all).await, bobs);
    assert!(listed_ids(&s, ALICE).await.contains(&bob_read));

    // Claims need read and write: a manage grant or ownership, highest priority first.
    let claimed = |r: Value| r["claimed"].as_bool().unwrap().then(|| r["taskId"].as_str().unwrap().to_owned());
    let claim = |who: &'static str| {
        let s = &s;
        async move { claimed(ok(s, who, "task.claim", json!({"workerId": who})).await) }
    };
    assert_eq!(claim(BOB).await, Some(bob_manages.clone()));
    assert_eq!(claim(BOB).await, Some(bobs_own.clone()));
    assert_eq!(claim(BOB).await, None, "bob may only read the rest");
    assert_eq!(claim(CAROL).await, Some(agents_manage.clone()));
    assert_eq!(claim(CAROL).await, None);
    assert_eq!(claim(DAVE).await, None);
    assert_eq!(claim(ZED).await, None);
    assert_eq!(claim(ALICE).await, Some(private.clone()), "alice's highest pending task");
}

#[tokio::test]
async fn token_mode_without_credentials_is_answered_with_32002() {
    let s = TestServer::start_with(|c| c.auth = Some(attache_server::auth::AuthMode::Token)).await;
    let res =
        s.client.post(s.url("/rpc")).body(r#"{"jsonrpc":"2.0","method":"task.list","id":1}"#).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], -32002);
    assert_eq!(body["id"], Value::Null);
}

// ---- the envelope and the limits ----

#[tokio::test]
async fn malformed_envelopes_get_their_codes() {
    let s = TestServer::start().await;
    let (status, res) = rpc_raw(&s, ALICE, "{not json").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(res, json!({"jsonrpc": "2.0", "error": {"code": -32700, "message": "Parse error"}, "id": null}));
    for (body, id) in [
        (r#"{"method":"task.list","id":7}"#, json!(7)),
        (r#"{"jsonrpc":"1.0","method":"task.list","id":"a"}"#, json!("a")),
        (r#"{"jsonrpc":"2.0","method":5,"id":8}"#, json!(8)),
        (r#"{"jsonrpc":"2.0","method":"task.list","id":{"x":1}}"#, Value::Null),
        (r#"{"jsonrpc":"2.0","method":"task.list","params":3,"id":9}"#, json!(9)),
        (r#"42"#, Value::Null),
    ] {
        let (_, res) = rpc_raw(&s, ALICE, body).await;
        assert_eq!(res["error"]["code"], -32600, "{body}");
        assert_eq!(res["id"], id, "{body}");
    }
    let (_, res) = rpc_raw(&s, ALICE, r#"{"jsonrpc":"2.0","method":"task.nope","id":1}"#).await;
    assert_eq!(res["error"], json!({"code": -32601, "message": "Method not found: task.nope"}));
    let (_, res) = rpc_raw(&s, ALICE, r#"{"jsonrpc":"2.0","method":"task.list","params":[1],"id":1}"#).await;
    assert_eq!(res["error"]["code"], -32602, "positional params");
}

#[tokio::test]
async fn batches_answer_in_order_and_skip_notifications() {
    let s = TestServer::start().await;
    let body = json!([
        {"jsonrpc": "2.0", "method": "task.create", "params": {"text": "one"}, "id": "a"},
        {"jsonrpc": "2.0", "method": "task.create", "params": {"text": "silent"}},
        {"jsonrpc": "2.0", "method": "task.nope", "id": "b"},
        {"foo": 1},
        {"jsonrpc": "2.0", "method": "task.list", "params": {}, "id": "c"},
    ]);
    let (status, res) = rpc_raw(&s, ALICE, body.to_string()).await;
    assert_eq!(status, StatusCode::OK);
    let items = res.as_array().unwrap();
    assert_eq!(items.len(), 4);
    assert_eq!(items[0]["id"], "a");
    assert_eq!(items[1]["error"]["code"], -32601);
    assert_eq!(items[2]["error"]["code"], -32600);
    assert_eq!(items[3]["id"], "c");
    assert_eq!(items[3]["result"]["totalCount"], 2, "the notification ran");

    let (status, res) = rpc_raw(&s, ALICE, r#"{"jsonrpc":"2.0","method":"task.create","params":{"text":"n"}}"#).await;
    assert_eq!((status, res), (StatusCode::NO_CONTENT, Value::Null), "a lone notification gets no body");
    let only_notes = json!([{"jsonrpc": "2.0", "method": "task.list"}, {"jsonrpc": "2.0", "method": "task.list"}]);
    assert_eq!(rpc_raw(&s, ALICE, only_notes.to_string()).await.0, StatusCode::NO_CONTENT);

    let (_, res) = rpc_raw(&s, ALICE, "[]").await;
    assert_eq!(res["error"]["code"], -32600);
    let big: Vec<Value> = (0..101).map(|i| json!({"jsonrpc": "2.0", "method": "task.list", "id": i})).collect();
    let (_, res) = rpc_raw(&s, ALICE, serde_json::to_string(&big).unwrap()).await;
    assert_eq!(res["error"]["code"], -32600);
    assert!(res["error"]["data"]["reason"].as_str().unwrap().contains("at most 100"));
    let hundred: Vec<Value> = (0..100).map(|i| json!({"jsonrpc": "2.0", "method": "task.list", "id": i})).collect();
    let (_, res) = rpc_raw(&s, ALICE, serde_json::to_string(&hundred).unwrap()).await;
    assert_eq!(res.as_array().unwrap().len(), 100);
}

#[tokio::test]
async fn oversized_bodies_are_refused_with_413() {
    let s = TestServer::start_with(|c| c.rpc_max_body_bytes = 1024).await;
    let text = "x".repeat(2000);
    let (status, res) = rpc_raw(
        &s,
        ALICE,
        json!({"jsonrpc": "2.0", "method": "task.create", "params": {"text": text}, "id": 1}).to_string(),
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(res["error"]["code"], -32600);
    assert_eq!(ok(&s, ALICE, "task.list", json!({})).await["totalCount"], 0);
}

#[tokio::test]
async fn rate_limited_principals_get_32000() {
    let s = TestServer::start_with(|c| {
        c.rpc_rate_limit = Some(3);
        c.rpc_rate_window = std::time::Duration::from_secs(3600);
    })
    .await;
    for _ in 0..3 {
        ok(&s, ALICE, "task.list", json!({})).await;
    }
    let e = err(&s, ALICE, "task.list", json!({})).await;
    assert_eq!(e["code"], -32000);
    assert_eq!(e["data"], json!({"limit": 3, "windowMs": 3_600_000}));
    ok(&s, BOB, "task.list", json!({})).await;
}

/// A task with `n` text attachments `a0`.. of 300 KiB each (307,202 bytes as JSON).
async fn task_with_big_attachments(s: &TestServer, n: usize) -> String {
    let t = create_task(s, ALICE, "big", 50).await;
    for i in 0..n {
        let params = json!({"taskId": t, "key": format!("a{i}"), "type": "text", "content": "x".repeat(300 << 10)});
        ok(s, ALICE, "task.create_attachment", params).await;
    }
    t
}

fn is_response_too_large(e: &Value) -> bool {
    let message = e["message"].as_str().unwrap_or("");
    e["code"] == -32000
        && e["data"] == json!({"limit": 1 << 20})
        && message.contains("1048576 bytes")
        && message.contains("task.get_attachment")
}

#[tokio::test]
async fn attachment_reads_past_rpc_max_response_bytes_are_refused_with_32000() {
    let s = TestServer::start_with(|c| c.rpc_max_response_bytes = 1 << 20).await;
    let t = task_with_big_attachments(&s, 4).await;
    // The same attachment asked for four times would be 1.2 MB of values.
    let same = |n: usize| json!({"requests": vec![json!({"taskId": t, "key": "a0"}); n]});
    let e = err(&s, ALICE, "task.get_attachments_batch", same(4)).await;
    assert!(is_response_too_large(&e), "{e}");
    let three = ok(&s, ALICE, "task.get_attachments_batch", same(3)).await;
    assert_eq!(three["attachments"].as_array().map(Vec::len), Some(3));

    let e = err(&s, ALICE, "task.list_attachments", json!({"taskId": t})).await;
    assert!(is_response_too_large(&e), "{e}");
    let page = ok(&s, ALICE, "task.list_attachments", json!({"taskId": t, "limit": 3})).await;
    assert_eq!((page["attachments"].as_array().map(Vec::len), &page["totalCount"]), (Some(3), &json!(4)));
    assert_eq!(ok(&s, ALICE, "task.get_attachment", json!({"taskId": t, "key": "a3"})).await["key"], "a3");
}

#[tokio::test]
async fn a_claim_skips_a_task_whose_attachments_pass_rpc_max_response_bytes_and_claims_nothing_when_none_fit() {
    let s = TestServer::start_with(|c| c.rpc_max_response_bytes = 1 << 20).await;
    // Priority 50 with 1.2 MB of values; a smaller task below it, priority 10.
    let big = task_with_big_attachments(&s, 4).await;
    let small = create_task(&s, ALICE, "small", 10).await;
    ok(&s, ALICE, "task.create_attachment", json!({"taskId": small, "key": "k", "type": "json", "value": [1, 2]}))
        .await;

    let r = ok(&s, ALICE, "task.claim", json!({"workerId": "w1"})).await;
    assert_eq!((r["claimed"].as_bool(), r["taskId"].as_str()), (Some(true), Some(small.as_str())), "{r}");
    assert_eq!(r["task"]["attachments"]["k"]["value"], json!([1, 2]));
    // Only the big one is left: refused, and it is not claimed.
    let e = err(&s, ALICE, "task.claim", json!({"workerId": "w1"})).await;
    assert!(is_response_too_large(&e), "{e}");
    let t = ok(&s, ALICE, "task.get", json!({"id": big})).await;
    assert_eq!((t["status"].as_str(), &t["assignedTo"]), (Some("pending"), &Value::Null), "{t}");
    // Within the budget it is claimed whole.
    ok(&s, ALICE, "task.delete_attachment", json!({"taskId": big, "key": "a3"})).await;
    let r = ok(&s, ALICE, "task.claim", json!({"workerId": "w1"})).await;
    assert_eq!(r["taskId"], big, "{r}");
    assert_eq!(r["task"]["attachmentCount"], 3);
}

#[tokio::test]
async fn a_jsonrpc_batch_shares_one_response_budget_and_keeps_the_answers_before_it() {
    let s = TestServer::start_with(|c| c.rpc_max_response_bytes = 1 << 20).await;
    let t = task_with_big_attachments(&s, 4).await;
    let get = |i: usize| json!({"jsonrpc": "2.0", "method": "task.get_attachment", "params": {"taskId": t, "key": format!("a{i}")}, "id": i});
    let body = json!([get(0), get(1), get(2), get(3), get(0), {"jsonrpc": "2.0", "method": "task.get", "params": {"id": t}, "id": "task"}]);
    let (status, res) = rpc_raw(&s, ALICE, body.to_string()).await;
    assert_eq!(status, StatusCode::OK);
    let items = res.as_array().unwrap();
    assert_eq!(items.len(), 6);
    for (i, item) in items[..3].iter().enumerate() {
        assert_eq!(item["result"]["key"], format!("a{i}"), "{i}");
    }
    for item in &items[3..5] {
        assert!(is_response_too_large(&item["error"]), "{item}");
    }
    assert_eq!(items[5]["result"]["id"], t, "a call carrying no attachment values is still answered");
}

/// Metadata of `members` small members: about 13 bytes of JSON each.
fn wide_metadata(members: usize) -> Value {
    Value::Object((0..members).map(|i| (format!("m{i:05}"), json!(i))).collect())
}

#[tokio::test]
async fn a_batch_of_task_lists_over_large_metadata_is_answered_within_rpc_max_response_bytes() {
    const LIMIT: usize = 256 << 10;
    let s = TestServer::start_with(|c| c.rpc_max_response_bytes = LIMIT as u64).await;
    // 20 tasks of ~20 KB of metadata each: ~400 KB of records, more than the limit.
    let mut ids = Vec::new();
    for i in 0..20 {
        let r = ok(&s, ALICE, "task.create", json!({"text": format!("t{i}"), "metadata": wide_metadata(1500)})).await;
        ids.push(r["id"].as_str().unwrap().to_owned());
    }
    let list = |id: usize| json!({"jsonrpc": "2.0", "method": "task.list", "params": {"limit": 1000}, "id": id});
    let mut batch: Vec<Value> = (0..10).map(list).collect();
    batch.push(json!({"jsonrpc": "2.0", "method": "task.get", "params": {"id": ids[0]}, "id": "get"}));
    let res = s
        .client
        .post(s.url("/rpc"))
        .header("content-type", "application/json")
        .header("electric-principal", ALICE)
        .body(Value::Array(batch).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let body = res.bytes().await.unwrap();
    // Before, every list answered all 20 tasks: 4 MB.
    assert!(body.len() <= LIMIT + 4096, "the batch's answer is {} bytes, over the limit of {LIMIT}", body.len());
    let items: Vec<Value> = serde_json::from_slice(&body).unwrap();
    assert_eq!(items.len(), 11);
    // The first list answers the rows that fit, newest first, and says there are more.
    let first = &items[0]["result"];
    let rows = first["tasks"].as_array().unwrap();
    assert!((1..20).contains(&rows.len()), "{} rows", rows.len());
    assert_eq!((&first["totalCount"], &first["hasMore"]), (&json!(20), &json!(true)));
    assert_eq!(rows[0]["id"], ids[19]);
    assert_eq!(rows[0]["metadata"], wide_metadata(1500), "rows are whole");
    // The budget is spent: the later lists, and a task.get of one such task, are refused.
    for item in &items[1..] {
        let e = &item["error"];
        assert_eq!((&e["code"], &e["data"]["limit"]), (&json!(-32000), &json!(LIMIT)), "{item}");
        assert!(e["message"].as_str().unwrap().contains("Response too large"), "{e}");
    }
    // The next page starts after the rows answered and ends the list.
    let answered = rows.len();
    let rest = ok(&s, ALICE, "task.list", json!({"limit": 1000, "offset": answered})).await;
    let rest_rows = rest["tasks"].as_array().unwrap();
    assert_eq!((rest_rows.len(), &rest["hasMore"]), (20 - answered, &json!(false)));
    assert_eq!(rest_rows.last().unwrap()["id"], ids[0]);
}

#[tokio::test]
async fn a_task_record_over_rpc_max_response_bytes_is_refused_before_it_is_written_or_read() {
    let s = TestServer::start_with(|c| c.rpc_max_response_bytes = 8 << 10).await;
    let wide = wide_metadata(1500);
    // task.create answers its metadata: one that would not fit is refused before it writes.
    let e = err(&s, ALICE, "task.create", json!({"text": "wide", "metadata": wide})).await;
    assert_eq!((&e["code"], &e["data"]["limit"]), (&json!(-32000), &json!(8 << 10)), "{e}");
    assert_eq!(ok(&s, ALICE, "task.list", json!({})).await["totalCount"], 0, "nothing written");
    // task.update answers no metadata; then the task's row passes the limit.
    let t = create_task(&s, ALICE, "wide", 50).await;
    ok(&s, ALICE, "task.update", json!({"id": t, "updates": {"metadata": wide}})).await;
    for (method, params) in [("task.list", json!({})), ("task.get", json!({"id": t}))] {
        let e = err(&s, ALICE, method, params).await;
        assert_eq!(e["code"], -32000, "{method}: a row over the whole limit is refused, never cut to nothing: {e}");
    }
    // task.claim skips it (it stays pending) and answers that it found none that fits.
    let e = err(&s, ALICE, "task.claim", json!({"workerId": "w1"})).await;
    assert_eq!(e["code"], -32000, "{e}");
    let listed = ok(&s, ALICE, "task.list", json!({"status": "in_progress"})).await;
    assert_eq!(listed["totalCount"], 0, "not claimed");
}

#[tokio::test]
async fn metrics_count_calls_attachments_and_appends() {
    let s = TestServer::start().await;
    let t = create_task(&s, ALICE, "metrics", 50).await;
    ok(&s, ALICE, "task.create_attachment", json!({"taskId": t, "key": "k", "type": "json", "value": [1]})).await;
    err(&s, ALICE, "task.get", json!({"id": "t-none"})).await;
    let text = s.client.get(s.url("/metrics")).send().await.unwrap().text().await.unwrap();
    for line in [
        "attache_rpc_requests_total{method=\"task.create\",status=\"ok\"} 1",
        "attache_rpc_requests_total{method=\"task.get\",status=\"-32602\"} 1",
        "attache_attachments_created_total{type=\"json\"} 1",
        "attache_attachment_bytes_total 3",
        "attache_live_readers 0",
    ] {
        assert!(text.contains(line), "{line} missing from\n{text}");
    }
    assert!(text.contains("attache_stream_appends_total "));
}

fn appends_total(metrics: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("attache_stream_appends_total "))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no appends counter in\n{metrics}"))
}

#[tokio::test]
async fn metrics_count_every_faces_appends_but_not_producer_retries() {
    let s = TestServer::start().await;
    let scrape =
        || async { appends_total(&s.client.get(s.url("/metrics")).send().await.unwrap().text().await.unwrap()) };
    let before = scrape().await;
    s.create("/plain/log", "text/plain").await;
    s.append("/plain/log", "text/plain", "one").await;
    assert_eq!(scrape().await, before + 1, "a raw stream append counts");
    let produce = || {
        s.request(reqwest::Method::POST, "/plain/log")
            .header("content-type", "text/plain")
            .header("producer-id", "p1")
            .header("producer-epoch", "0")
            .header("producer-seq", "0")
            .body("two")
            .send()
    };
    assert!(produce().await.unwrap().status().is_success());
    assert!(produce().await.unwrap().status().is_success(), "the retry is answered");
    assert_eq!(scrape().await, before + 2, "the retry wrote nothing and is not counted");
    create_task(&s, ALICE, "metrics", 50).await;
    assert!(scrape().await >= before + 4, "task.create appends to the task stream and the events stream");
}

#[tokio::test]
async fn tasks_attachments_and_events_survive_a_restart() {
    let mut s = TestServer::start().await;
    let t = create_task(&s, ALICE, "durable", 70).await;
    let a =
        ok(&s, ALICE, "task.create_attachment", json!({"taskId": t, "key": "k", "type": "json", "value": {"x": 1}}))
            .await;
    ok(&s, ALICE, "task.claim", json!({"workerId": "w1"})).await;
    s.restart().await;
    let row = ok(&s, ALICE, "task.get", json!({"id": t})).await;
    assert_fields(&row, &json!({"status": "in_progress", "assignedTo": "w1", "priority": 70, "attachmentCount": 1}));
    let got = ok(&s, ALICE, "task.get_attachment", json!({"taskId": t, "key": "k"})).await;
    assert_eq!((got["id"].clone(), got["value"].clone()), (a["id"].clone(), json!({"x": 1})));
    let again =
        ok(&s, ALICE, "task.create_attachment", json!({"taskId": t, "key": "k", "type": "text", "content": "y"})).await;
    assert_eq!(again["id"], a["id"], "the upsert after a restart keeps the id");
    let res = s
        .client
        .get(s.url("/_attache/events"))
        .query(&[("offset", "-1")])
        .header("electric-principal", ALICE)
        .send()
        .await
        .unwrap();
    let events: Vec<Value> = res.json().await.unwrap();
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["task.created", "task.attachment_created", "task.claimed", "task.attachment_created"]);
}

#[tokio::test]
async fn metrics_need_a_valid_token_in_token_mode() {
    let s = TestServer::start_with(|c| c.auth = Some(attache_server::auth::AuthMode::Token)).await;
    let anonymous = s.client.get(s.url("/metrics")).send().await.unwrap();
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    let bad = s.client.get(s.url("/metrics")).bearer_auth("att_nope_nope").send().await.unwrap();
    assert_eq!(bad.status(), StatusCode::UNAUTHORIZED);
    let (_, token) =
        attache_storage::tokens::TokenStore::new(&s.config.data_dir).create("service:prometheus", None).unwrap();
    let scraped = s.client.get(s.url("/metrics")).bearer_auth(token).send().await.unwrap();
    assert_eq!(scraped.status(), StatusCode::OK);
    assert!(scraped.text().await.unwrap().contains("# TYPE"));
}

// ---- what deleted tasks leave in memory ----

/// Creates a task with an attachment, reads it (so its view is built),
/// writes one more attachment it does not read back, and deletes it.
async fn create_use_and_delete(s: &TestServer, i: usize) {
    let id = create_task(s, ALICE, &format!("short-lived {i}"), 50).await;
    ok(s, ALICE, "task.create_attachment", json!({"taskId": id, "key": "k", "type": "text", "content": "x"})).await;
    ok(s, ALICE, "task.list_attachments", json!({"taskId": id})).await;
    ok(s, ALICE, "task.create_attachment", json!({"taskId": id, "key": "j", "type": "json", "value": {"n": 1}})).await;
    ok(s, ALICE, "task.delete", json!({"id": id})).await;
}

#[tokio::test]
async fn deleted_tasks_leave_no_state_in_memory() {
    let s = TestServer::start_with(|c| c.deleted_tasks_kept = 3).await;
    let live = create_task(&s, ALICE, "stays", 50).await;
    let baseline = s.memory_counts().await;
    for i in 0..20 {
        create_use_and_delete(&s, i).await;
    }
    let after = s.memory_counts().await;
    assert_eq!(after.task_cells, 0, "no task is being written to: {after:?}");
    assert_eq!(after.tombstones, 3, "only the last deleted_tasks_kept tombstones stay: {after:?}");
    assert_eq!(
        after.registry_entities,
        baseline.registry_entities + 3,
        "each kept tombstone is one record; the purged ones leave none: {after:?}"
    );
    assert_eq!(after.streams, baseline.streams + 3, "a kept tombstone keeps only its closed main stream: {after:?}");
    assert!(after.views <= baseline.views, "deleted tasks' views are dropped: {baseline:?} -> {after:?}");
    assert_eq!(after.view_offers, 0, "their rows were read back, or went with their views: {after:?}");
    // The live task is untouched, and task.list counts only live tasks.
    let listed = ok(&s, ALICE, "task.list", json!({})).await;
    assert_eq!(listed["totalCount"], 1, "{listed}");
    assert_eq!(listed["tasks"][0]["id"], live.as_str());
}

#[tokio::test]
async fn an_attachment_refused_by_a_full_disk_leaves_no_key_lock_or_task_cell_behind() {
    let plan = attache_storage::FaultPlan::new();
    let s = TestServer::start_with(|c| c.fault_plan = Some(plan.clone())).await;
    let id = create_task(&s, ALICE, "the disk fills", 50).await;
    let data = base64::engine::general_purpose::STANDARD.encode(b"inline bytes");
    let put = json!({"taskId": id, "key": "k", "type": "binary", "data": data});
    plan.disk_full();
    // The bytes are written with the key lock held; their refusal returns early.
    let refused = err(&s, ALICE, "task.create_attachment", put.clone()).await;
    assert_eq!(refused["code"], -32603, "{refused}");
    let after = s.memory_counts().await;
    assert_eq!(after.task_cells, 0, "the refused write gave back its key lock, so its task cell went: {after:?}");
    plan.clear();
    ok(&s, ALICE, "task.create_attachment", put).await;
    assert_eq!(s.memory_counts().await.task_cells, 0);
}

#[tokio::test]
async fn the_id_of_a_purged_tombstone_can_be_created_again_without_its_old_events() {
    let s = TestServer::start_with(|c| c.deleted_tasks_kept = 1).await;
    create_task_with_id(&s, ALICE, "t-reborn").await;
    ok(&s, ALICE, "task.delete", json!({"id": "t-reborn"})).await;
    let err_ = err(&s, ALICE, "task.create", json!({"id": "t-reborn", "text": "again"})).await;
    assert!(err_["message"].as_str().is_some_and(|m| m.contains("already exists")), "kept tombstone: {err_}");
    // One more deletion pushes t-reborn's tombstone out.
    let other = create_task(&s, ALICE, "other", 50).await;
    ok(&s, ALICE, "task.delete", json!({"id": other})).await;
    ok(&s, ALICE, "task.create", json!({"id": "t-reborn", "text": "again"})).await;
    let events = events_seen_by(&s, ALICE).await;
    let reborn: Vec<&Value> = events.as_array().unwrap().iter().filter(|e| e["taskId"] == "t-reborn").collect();
    assert_eq!(reborn.len(), 1, "only the new life's task.created, not the purged life's events: {reborn:?}");
    assert_eq!(reborn[0]["type"], "task.created", "{reborn:?}");
}

#[tokio::test]
async fn tombstones_past_the_limit_are_purged_at_startup() {
    let mut s = TestServer::start_with(|c| c.deleted_tasks_kept = 10).await;
    let baseline = s.memory_counts().await;
    for i in 0..6 {
        create_use_and_delete(&s, i).await;
    }
    assert_eq!(s.memory_counts().await.tombstones, 6);
    s.config.deleted_tasks_kept = 2;
    s.restart().await;
    let after = s.memory_counts().await;
    assert_eq!(after.tombstones, 2, "{after:?}");
    assert_eq!(after.registry_entities, baseline.registry_entities + 2, "{after:?}");
    assert_eq!(after.streams, baseline.streams + 2, "{after:?}");
}

/// `--deleted-tasks-kept` bounds each principal's tombstones: a principal
/// deleting tasks of its own evicts its own oldest tombstones, never
/// another's, so it can neither erase another's history nor take its task
/// ids. Before, the bound was one budget for all, taken from "the principal
/// holding the most": alice holding 4 of 4, one deletion of mallory's
/// purged alice's oldest, her events of it went, and its id was mallory's to create.
#[tokio::test]
async fn another_principals_deletions_never_evict_your_tombstones() {
    let s = TestServer::start_with(|c| c.deleted_tasks_kept = 4).await;
    for i in 1..=4 {
        create_task_with_id(&s, ALICE, &format!("t-al{i}")).await;
        ok(&s, ALICE, "task.delete", json!({"id": format!("t-al{i}")})).await;
    }
    for i in 1..=6 {
        create_task_with_id(&s, BOB, &format!("t-m{i}")).await;
        ok(&s, BOB, "task.delete", json!({"id": format!("t-m{i}")})).await;
    }
    assert_eq!(task_events_seen_by(&s, ALICE, "t-al1").await.len(), 2, "task.created and task.deleted stay alice's");
    let taken = err(&s, BOB, "task.create", json!({"id": "t-al1", "text": "mine now"})).await;
    assert!(taken["message"].as_str().is_some_and(|m| m.contains("already exists")), "{taken}");
    assert_eq!(s.memory_counts().await.tombstones, 8, "each principal keeps its own 4");
    // Bob's own oldest went.
    ok(&s, BOB, "task.create", json!({"id": "t-m1", "text": "again"})).await;
    // Alice's fifth deletion pushes out her own oldest.
    create_task_with_id(&s, ALICE, "t-al5").await;
    ok(&s, ALICE, "task.delete", json!({"id": "t-al5"})).await;
    assert_eq!(task_events_seen_by(&s, ALICE, "t-al1").await.len(), 0, "her oldest tombstone was purged");
    assert_eq!(task_events_seen_by(&s, ALICE, "t-al2").await.len(), 2);
}

/// The events of task `id` that `who` may see, from the start of the events stream.
async fn task_events_seen_by(s: &TestServer, who: &str, id: &str) -> Vec<Value> {
    let res = s
        .request(reqwest::Method::GET, &format!("/_attache/events?offset=-1&taskId={id}"))
        .header("electric-principal", who)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    res.json::<Vec<Value>>().await.unwrap()
}

/// Every event `who` may see, from the start of the events stream.
async fn events_seen_by(s: &TestServer, who: &str) -> Value {
    s.request(reqwest::Method::GET, "/_attache/events?offset=-1")
        .header("electric-principal", who)
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap()
}

/// Stopping is one rule on every face (docs/SECURITY.md, "Stopping and
/// erasing"): as in Electric, `signal` stops an entity through `/signal`
/// (SIGKILL, SIGTERM) and `delete` through `DELETE`; erasing (purge,
/// `task.delete`) needs `delete`. A task is an entity: one stopped by a
/// signal refuses every change on the task face with one answer, and its
/// owner can still delete it.
#[tokio::test]
async fn a_signal_grant_stops_a_task_as_in_electric_and_the_task_face_answers_it_consistently() {
    let s = TestServer::start().await;
    let t = create_task(&s, ALICE, "stoppable", 50).await;
    ok(&s, ALICE, "task.create_attachment", json!({"taskId": t, "key": "k", "type": "text", "content": "x"})).await;
    let entity = format!("/_electric/entities/task/{t}");
    let res = s
        .client
        .post(s.url(&format!("{entity}/grants")))
        .header("electric-principal", ALICE)
        .json(&json!({"subject_kind": "principal", "subject_value": BOB, "permission": "signal"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);

    // Signal alone: no stop through DELETE, no erasing, nothing on the task face.
    let as_bob = |rb: reqwest::RequestBuilder| rb.header("electric-principal", BOB);
    for url in [entity.clone(), format!("{entity}?purge=true")] {
        let res = as_bob(s.client.delete(s.url(&url))).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::FORBIDDEN, "DELETE {url}");
    }
    assert_eq!(err(&s, BOB, "task.delete", json!({"id": t})).await["code"], -32602);
    let res = as_bob(s.client.post(s.url(&format!("{entity}/signal"))))
        .json(&json!({"signal": "SIGKILL"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK, "signal stops it");

    // Stopped: readable, every change refused alike, and its owner may delete it.
    let got = ok(&s, ALICE, "task.get", json!({"id": t})).await;
    assert_eq!(got["id"], json!(t));
    let stopped = json!({"code": -32602, "message": format!("Task {t} is stopped and accepts no more changes"), "data": {"taskId": t}});
    for (method, params) in [
        ("task.update", json!({"id": t, "updates": {"priority": 1}})),
        ("task.assign", json!({"taskId": t, "instanceId": "w"})),
        ("task.complete", json!({"id": t})),
        ("task.create_attachment", json!({"taskId": t, "key": "k2", "type": "text", "content": "y"})),
        ("task.delete_attachment", json!({"taskId": t, "key": "k"})),
    ] {
        assert_eq!(err(&s, ALICE, method, params).await, stopped, "{method}");
    }
    assert_eq!(
        ok(&s, ALICE, "task.claim", json!({"workerId": "w"})).await["claimed"],
        false,
        "a stopped task is not claimed"
    );
    assert_eq!(ok(&s, ALICE, "task.get", json!({"id": t})).await["status"], "pending", "nothing changed");

    let deleted = ok(&s, ALICE, "task.delete", json!({"id": t})).await;
    assert_eq!(deleted["deleted"], true);
    assert_eq!(err(&s, ALICE, "task.get", json!({"id": t})).await["code"], -32602);
    let res = s
        .client
        .head(s.url(&format!("/task/{t}/attachments/k")))
        .header("electric-principal", ALICE)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::NOT_FOUND, "its attachments went with it");
}

/// Concurrent upserts of one key are serialized, last writer wins: none is
/// refused as if an upload of the key were running (a write's hold on the
/// key's id goes before the key's lock lets the next write in).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_of_one_attachment_key_all_succeed() {
    let s = TestServer::start().await;
    let t = create_task(&s, ALICE, "upserts", 50).await;
    ok(&s, ALICE, "task.create_attachment", json!({"taskId": t, "key": "k", "type": "json", "value": {"n": 0}})).await;
    for round in 0..25 {
        let writes = (0..64).map(|i| {
            let (s, t) = (&s, t.clone());
            async move {
                let params = json!({"taskId": t, "key": "k", "type": "json", "value": {"round": round, "n": i}});
                call(s, ALICE, "task.create_attachment", params).await
            }
        });
        for res in futures::future::join_all(writes).await {
            assert!(res.get("error").is_none(), "round {round}: {res}");
        }
    }
}

/// Completions of one task racing: one wins, the others are refused before
/// they write anything, so the `result` attachment is the winner's result
/// and carries one `task.attachment_created` event. Before, a losing
/// completion replaced the winner's result attachment (and published its
/// event) before its refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_completions_leave_the_winners_result_and_nothing_of_the_losers() {
    let s = TestServer::start().await;
    for round in 0..10 {
        let t = create_task(&s, ALICE, "race to complete", 50).await;
        ok(&s, ALICE, "task.assign", json!({"taskId": t, "instanceId": "worker-001"})).await;
        let completions = (0..8).map(|i| {
            let (s, t) = (&s, t.clone());
            async move { call(s, ALICE, "task.complete", json!({"id": t, "result": {"by": i}})).await }
        });
        let answers = futures::future::join_all(completions).await;
        let won: Vec<_> = answers.iter().filter(|r| r.get("result").is_some()).collect();
        assert_eq!(won.len(), 1, "round {round}: one completion wins: {answers:?}");
        let task = ok(&s, ALICE, "task.get", json!({"id": t})).await;
        let attachment = ok(&s, ALICE, "task.get_attachment", json!({"taskId": t, "key": "result"})).await;
        assert_eq!(attachment["value"], task["result"], "round {round}: the result attachment is the winner's");
        let rows = entity_support::rows_as(&s, &format!("/task/{t}/main"), Some(ALICE)).await;
        let created =
            rows.iter().filter(|r| r["type"] == "event" && r["value"]["type"] == "task.attachment_created").count();
        assert_eq!(created, 1, "round {round}: one result attachment written");
    }
}

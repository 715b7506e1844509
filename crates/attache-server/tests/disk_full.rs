//! A full disk over HTTP: appends are refused with 507 and `/healthz` says
//! writes are failing; once space is freed, appends succeed again within 5 s
//! and `/healthz` answers 200, with no restart. Nothing acknowledged is lost.

mod common;

use std::time::{Duration, Instant};

use attache_storage::{Fault, FaultPlan, FaultPoint};
use common::TestServer;
use reqwest::{Method, StatusCode};

const STREAM: &str = "/disk/full";

async fn post(server: &TestServer, body: &str) -> reqwest::Response {
    server
        .request(Method::POST, STREAM)
        .header("content-type", "text/plain")
        .body(body.to_owned())
        .send()
        .await
        .unwrap()
}

async fn healthz(server: &TestServer) -> (StatusCode, String) {
    let res = server.request(Method::GET, "/healthz").send().await.unwrap();
    (res.status(), res.text().await.unwrap())
}

#[tokio::test]
async fn a_full_disk_answers_507_and_writes_resume_once_space_is_freed() {
    let plan = FaultPlan::new();
    let server = TestServer::start_with(|c| c.fault_plan = Some(plan.clone())).await;
    server.create(STREAM, "text/plain").await;
    let mut acked = String::new();
    for i in 0..5 {
        let body = format!("before-{i};");
        assert!(post(&server, &body).await.status().is_success());
        acked.push_str(&body);
    }
    assert_eq!(healthz(&server).await, (StatusCode::OK, "ok".to_owned()));

    plan.disk_full();
    let res = post(&server, "lost;").await;
    assert_eq!(res.status(), StatusCode::INSUFFICIENT_STORAGE);
    assert!(res.headers().contains_key("retry-after"));
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "STORAGE_FULL");
    let (status, text) = healthz(&server).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{text}");
    let health: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(health["writes"], "failing");
    assert_eq!(health["disk_full"], true);
    assert!(health["since"].is_string(), "{health}");
    // Still full: still refused, never a silent loss.
    assert_eq!(post(&server, "lost again;").await.status(), StatusCode::INSUFFICIENT_STORAGE);
    // The task face says so too, as a retryable refusal (before: a bare "Internal error").
    let call = serde_json::json!({ "jsonrpc": "2.0", "method": "task.create", "params": { "text": "t" }, "id": 1 });
    let res = server.request(Method::POST, "/rpc").json(&call).send().await.unwrap();
    let answer: serde_json::Value = res.json().await.unwrap();
    let error = &answer["error"];
    assert_eq!(
        (error["code"].as_i64(), error["data"]["code"].as_str()),
        (Some(-32603), Some("STORAGE_FULL")),
        "{answer}"
    );
    assert_eq!(
        (error["data"]["retryable"].as_bool(), error["data"]["retryAfterSeconds"].as_u64()),
        (Some(true), Some(5))
    );

    plan.clear();
    let freed = Instant::now();
    loop {
        let res = post(&server, "after;").await;
        if res.status().is_success() {
            acked.push_str("after;");
            break;
        }
        assert!(freed.elapsed() < Duration::from_secs(5), "appends still fail 5 s after space was freed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    loop {
        if healthz(&server).await == (StatusCode::OK, "ok".to_owned()) {
            break;
        }
        assert!(freed.elapsed() < Duration::from_secs(5), "/healthz still fails 5 s after space was freed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(server.read_all(STREAM).await, acked.as_bytes());
}

#[tokio::test]
async fn an_io_error_answers_503_with_retry_after_and_the_next_append_succeeds() {
    let plan = FaultPlan::new();
    let server = TestServer::start_with(|c| c.fault_plan = Some(plan.clone())).await;
    server.create(STREAM, "text/plain").await;
    assert!(post(&server, "kept;").await.status().is_success());
    plan.fail_nth(FaultPoint::LogSync, 1, Fault::Io);
    let res = post(&server, "lost;").await;
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(res.headers().get("retry-after").unwrap(), "1");
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "STORAGE_UNAVAILABLE");
    assert!(post(&server, "next;").await.status().is_success());
    assert_eq!(server.read_all(STREAM).await, &b"kept;next;"[..]);
}

/// `registry.redb` meets a full disk: a spawn (a registry write) answers 507
/// and leaves no entity; once space is back the same spawn succeeds, with no
/// restart, and the entity takes writes.
#[tokio::test]
async fn a_spawn_that_meets_a_full_registry_disk_answers_507_and_succeeds_once_space_is_freed() {
    let plan = FaultPlan::new();
    let server = TestServer::start_with(|c| c.fault_plan = Some(plan.clone())).await;
    let entity = "/_electric/entities/chat/registry-full";
    plan.fail_all(FaultPoint::RegistryWrite, Fault::NoSpace);
    plan.fail_all(FaultPoint::RegistrySync, Fault::NoSpace);
    let res = server.request(Method::PUT, entity).json(&serde_json::json!({})).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::INSUFFICIENT_STORAGE);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "STORAGE_FULL");
    assert_eq!(server.request(Method::GET, entity).send().await.unwrap().status(), StatusCode::NOT_FOUND);
    assert!(plan.injected(FaultPoint::RegistryWrite) + plan.injected(FaultPoint::RegistrySync) > 0);

    plan.clear();
    let res = server.request(Method::PUT, entity).json(&serde_json::json!({})).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::CREATED, "{}", res.text().await.unwrap());
    let res = server
        .request(Method::POST, &format!("{entity}/send"))
        .json(&serde_json::json!({ "payload": "after" }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
}

/// While `registry.redb`'s writes fail, `/healthz` says so (503, `disk_full`);
/// once space is back it answers 200 again within 5 s by itself, before any
/// real registry write has come.
#[tokio::test]
async fn healthz_reports_a_failing_registry_disk_and_turns_200_once_space_is_freed() {
    let plan = FaultPlan::new();
    let server = TestServer::start_with(|c| c.fault_plan = Some(plan.clone())).await;
    assert_eq!(healthz(&server).await.0, StatusCode::OK);
    plan.fail_all(FaultPoint::RegistryWrite, Fault::NoSpace);
    plan.fail_all(FaultPoint::RegistrySync, Fault::NoSpace);
    let res = server
        .request(Method::PUT, "/_electric/entities/chat/health-probe")
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::INSUFFICIENT_STORAGE);
    let (status, body) = healthz(&server).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["writes"], "failing");
    assert_eq!(body["disk_full"], true);

    plan.clear();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, body) = healthz(&server).await;
        if status == StatusCode::OK {
            break;
        }
        assert!(Instant::now() < deadline, "still failing 5 s after space was freed: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

//! The trust boundary of rows: a value read from a row a client could write
//! is data, never an address or a permission (docs/SECURITY.md, "Rows and
//! paths"). Dev mode; principals are named by the `electric-principal` header.
//!
//! Forged manifest rows are planted straight into the store while the server
//! is stopped: that is how rows written before the raw routes refused them
//! (or by any other means) look to the server, and the server must not follow
//! them whichever way they got there.

mod common;
mod entity_support;
mod task_helpers;

use std::time::Duration;

use attache_core::ContentType;
use attache_storage::embedded::{EmbeddedConfig, EmbeddedStore};
use attache_storage::{AppendRequest, StreamStore};
use common::TestServer;
use entity_support::{api, as_principal, error_of, eventually, sha256_hex, Form};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

const ALICE: &str = "user:alice";
const MALLORY: &str = "user:mallory";

const SECRET: &[u8] = b"alice's secret attachment bytes";
const DIARY: &str = "alice's private diary line";
const TASK_TEXT: &str = "alice's private task text";

/// Appends rows to a stream by opening the store while the server is stopped.
async fn plant(ts: &mut TestServer, path: &str, rows: &[Value]) {
    let dir = ts.pause().await;
    let store = EmbeddedStore::open(EmbeddedConfig::new(&dir)).expect("the store opens");
    let messages: Vec<Vec<u8>> = rows.iter().map(|r| serde_json::to_vec(r).expect("a row serializes")).collect();
    let ct = ContentType::parse("application/json").expect("a content type");
    store.append(AppendRequest::json_messages(path.to_owned(), ct, &messages, false)).await.expect("rows appended");
    store.close().await;
    drop(store);
    ts.resume().await;
}

/// A manifest row as a client could write it, naming `stream_path` for attachment `id`.
fn forged_manifest(id: &str, stream_path: &str, status: &str, name: Option<&str>) -> Value {
    let mut value = json!({
        "key": format!("attachment:{id}"),
        "kind": "attachment",
        "id": id,
        "streamPath": stream_path,
        "status": status,
        "role": "input",
        "mimeType": "application/octet-stream",
        "createdAt": "2026-01-01T00:00:00.000Z",
        "createdBy": "/principal/user%3Amallory",
    });
    if status == "complete" {
        value["byteLength"] = json!(SECRET.len());
        value["sha256"] = json!(sha256_hex(SECRET));
    }
    if let Some(name) = name {
        value["name"] = json!(name);
        value["taskType"] = json!("binary");
    }
    json!({ "type": "manifest", "key": format!("attachment:{id}"), "value": value, "headers": { "operation": "insert" } })
}

async fn spawn_as(ts: &TestServer, who: &str, entity: &str) {
    let res = as_principal(ts.request(Method::PUT, &api(entity)), Some(who)).send().await.expect("spawn answered");
    assert_eq!(res.status(), StatusCode::CREATED, "spawning {entity} as {who}");
}

async fn upload_as(ts: &TestServer, who: &str, entity: &str, id: &str, bytes: &[u8]) {
    let form = Form::new().field("id", id).file(Some("f.bin"), Some("application/octet-stream"), bytes).finish();
    let res = as_principal(ts.request(Method::POST, &format!("{}/attachments", api(entity))), Some(who))
        .header("content-type", Form::content_type())
        .body(form)
        .send()
        .await
        .expect("upload answered");
    assert_eq!(res.status(), StatusCode::CREATED, "uploading {id} to {entity}");
}

/// GET of an attachment as `who`: status and body.
async fn read_as(ts: &TestServer, who: &str, entity: &str, id: &str) -> (StatusCode, Vec<u8>) {
    let res = as_principal(ts.request(Method::GET, &format!("{}/attachments/{id}", api(entity))), Some(who))
        .send()
        .await
        .expect("read answered");
    let status = res.status();
    (status, res.bytes().await.expect("the body arrives").to_vec())
}

/// A raw stream read from the start as `who`: status and body.
async fn raw_read_as(ts: &TestServer, who: &str, path: &str) -> (StatusCode, String) {
    let res = as_principal(ts.request(Method::GET, path).query(&[("offset", "-1")]), Some(who))
        .send()
        .await
        .expect("read answered");
    let status = res.status();
    (status, res.text().await.expect("the body arrives"))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Alice's data that a forged row may name: an attachment, a main stream, a
/// plain stream, and (through her task) the global events stream.
struct Victim {
    attachment: &'static str,
    main: &'static str,
    plain: &'static str,
}

async fn victim(ts: &TestServer) -> Victim {
    spawn_as(ts, ALICE, "/chat/victim").await;
    upload_as(ts, ALICE, "/chat/victim", "secret", SECRET).await;
    let res = as_principal(ts.request(Method::POST, &format!("{}/send", api("/chat/victim"))), Some(ALICE))
        .json(&json!({ "payload": DIARY }))
        .send()
        .await
        .expect("send answered");
    assert_eq!(res.status(), StatusCode::OK);
    let res = as_principal(ts.request(Method::PUT, "/alice/diary"), Some(ALICE))
        .header("content-type", "text/plain")
        .body(DIARY)
        .send()
        .await
        .expect("PUT answered");
    assert_eq!(res.status(), StatusCode::CREATED);
    task_helpers::ok(ts, ALICE, "task.create", json!({ "text": TASK_TEXT })).await;
    Victim { attachment: "/chat/victim/attachments/secret", main: "/chat/victim/main", plain: "/alice/diary" }
}

/// Alice still reads everything a forged row named.
async fn victim_is_intact(ts: &TestServer, v: &Victim) {
    assert_eq!(read_as(ts, ALICE, "/chat/victim", "secret").await, (StatusCode::OK, SECRET.to_vec()));
    let (status, body) = raw_read_as(ts, ALICE, v.attachment).await;
    assert_eq!((status, body.as_bytes()), (StatusCode::OK, SECRET));
    let (status, body) = raw_read_as(ts, ALICE, v.main).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains(DIARY), "alice's main stream lost her message: {body}");
    assert_eq!(raw_read_as(ts, ALICE, v.plain).await, (StatusCode::OK, DIARY.to_owned()));
    let events = ts.request(Method::GET, "/_attache/events").header("electric-principal", ALICE).send().await.unwrap();
    assert_eq!(events.status(), StatusCode::OK);
    assert!(events.text().await.unwrap().contains(TASK_TEXT), "alice's task events are gone");
}

/// A manifest row on mallory's entity naming `target` reaches none of its
/// bytes, and deleting that attachment deletes nothing of alice's.
async fn forged_row_reaches_nothing(target: &str, marker: &[u8]) {
    let mut ts = TestServer::start().await;
    let v = victim(&ts).await;
    spawn_as(&ts, MALLORY, "/chat/mine").await;
    plant(&mut ts, "/chat/mine/main", &[forged_manifest("x", target, "complete", None)]).await;

    let (status, body) = read_as(&ts, MALLORY, "/chat/mine", "x").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "a forged row naming {target} is followed");
    assert!(!contains(&body, marker), "the victim's bytes leaked through {target}");
    let head = as_principal(ts.request(Method::HEAD, &format!("{}/attachments/x", api("/chat/mine"))), Some(MALLORY))
        .send()
        .await
        .expect("HEAD answered");
    assert_eq!(head.status(), StatusCode::NOT_FOUND);

    // The list shows the row as pointing at no bytes, at the address derived for it.
    let listed = as_principal(ts.request(Method::GET, &format!("{}/attachments", api("/chat/mine"))), Some(MALLORY))
        .send()
        .await
        .expect("list answered");
    let listed: Value = listed.json().await.expect("a JSON list");
    let entry = &listed["attachments"][0];
    assert_eq!(entry["status"], "failed", "{listed}");
    assert_eq!(entry["streamPath"], "/chat/mine/attachments/x", "{listed}");

    let res = as_principal(ts.request(Method::DELETE, &format!("{}/attachments/x", api("/chat/mine"))), Some(MALLORY))
        .send()
        .await
        .expect("DELETE answered");
    assert_eq!(res.status(), StatusCode::OK, "mallory may delete her own attachment row");
    victim_is_intact(&ts, &v).await;
    // The events stream still takes events.
    task_helpers::ok(&ts, ALICE, "task.create", json!({ "text": "after the delete" })).await;
    ts.stop().await;
}

#[tokio::test]
async fn forged_manifest_row_cannot_reach_another_entitys_attachment() {
    forged_row_reaches_nothing("/chat/victim/attachments/secret", SECRET).await;
}

#[tokio::test]
async fn forged_manifest_row_cannot_reach_another_entitys_main_stream() {
    forged_row_reaches_nothing("/chat/victim/main", DIARY.as_bytes()).await;
}

#[tokio::test]
async fn forged_manifest_row_cannot_reach_a_plain_stream() {
    forged_row_reaches_nothing("/alice/diary", DIARY.as_bytes()).await;
}

#[tokio::test]
async fn forged_manifest_row_cannot_reach_the_events_stream() {
    forged_row_reaches_nothing("/_attache/events", TASK_TEXT.as_bytes()).await;
}

#[tokio::test]
async fn forged_manifest_row_cannot_reach_a_sibling_path_of_its_own_entity() {
    // Even within its own entity a row is not an address: only the path derived for its id counts.
    let mut ts = TestServer::start().await;
    spawn_as(&ts, MALLORY, "/chat/mine").await;
    upload_as(&ts, MALLORY, "/chat/mine", "real", b"real bytes").await;
    plant(&mut ts, "/chat/mine/main", &[forged_manifest("x", "/chat/mine/attachments/real", "complete", None)]).await;
    assert_eq!(read_as(&ts, MALLORY, "/chat/mine", "x").await.0, StatusCode::NOT_FOUND);
    let res = as_principal(ts.request(Method::DELETE, &format!("{}/attachments/x", api("/chat/mine"))), Some(MALLORY))
        .send()
        .await
        .expect("DELETE answered");
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(read_as(&ts, MALLORY, "/chat/mine", "real").await, (StatusCode::OK, b"real bytes".to_vec()));
    ts.stop().await;
}

/// Mallory's task with a keyed manifest row (key `k`) naming `target`.
async fn task_with_forged_row(ts: &mut TestServer, target: &str) -> String {
    let created = task_helpers::ok(ts, MALLORY, "task.create", json!({ "text": "mallory's task" })).await;
    let task_id = created["id"].as_str().expect("a task id").to_owned();
    plant(ts, &format!("/task/{task_id}/main"), &[forged_manifest("ta-1-forged", target, "complete", Some("k"))]).await;
    task_id
}

#[tokio::test]
async fn task_delete_attachment_does_not_delete_what_a_forged_row_names() {
    for target in ["/chat/victim/attachments/secret", "/chat/victim/main", "/alice/diary", "/_attache/events"] {
        let mut ts = TestServer::start().await;
        let v = victim(&ts).await;
        let task_id = task_with_forged_row(&mut ts, target).await;
        // The row points at no bytes: the task face does not show it as an attachment.
        let missing =
            task_helpers::err(&ts, MALLORY, "task.get_attachment", json!({ "taskId": task_id, "key": "k" })).await;
        assert_eq!(missing["code"], -32602, "{target}: {missing}");
        let listed = task_helpers::ok(&ts, MALLORY, "task.list_attachments", json!({ "taskId": task_id })).await;
        assert_eq!(listed["totalCount"], 0, "{target}: {listed}");
        task_helpers::call(&ts, MALLORY, "task.delete_attachment", json!({ "taskId": task_id, "key": "k" })).await;
        victim_is_intact(&ts, &v).await;
        task_helpers::ok(&ts, MALLORY, "task.create", json!({ "text": "task.create still works" })).await;
        ts.stop().await;
    }
}

#[tokio::test]
async fn task_attachment_replacement_does_not_delete_what_a_forged_row_names() {
    for target in ["/chat/victim/attachments/secret", "/alice/diary", "/_attache/events"] {
        let mut ts = TestServer::start().await;
        let v = victim(&ts).await;
        let task_id = task_with_forged_row(&mut ts, target).await;
        // Replacing key `k` releases the old version's bytes: only at the derived address.
        task_helpers::ok(
            &ts,
            MALLORY,
            "task.create_attachment",
            json!({ "taskId": task_id, "key": "k", "type": "binary", "data": "AAEC" }),
        )
        .await;
        victim_is_intact(&ts, &v).await;
        let got = task_helpers::ok(&ts, MALLORY, "task.get_attachment", json!({ "taskId": task_id, "key": "k" })).await;
        let path = got["streamPath"].as_str().expect("binary data has a stream path");
        assert!(path.starts_with(&format!("/task/{task_id}/attachments/ta-1-forged")), "{got}");
        ts.stop().await;
    }
}

#[tokio::test]
async fn forged_pending_row_is_not_completed_from_another_stream_at_recovery() {
    let mut ts = TestServer::start().await;
    let _v = victim(&ts).await;
    // A closed plain stream without a blob: recovery would hash and "complete" it.
    let res = as_principal(ts.request(Method::POST, "/alice/diary"), Some(ALICE))
        .header("stream-closed", "true")
        .send()
        .await
        .expect("close answered");
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    spawn_as(&ts, MALLORY, "/chat/mine").await;
    plant(&mut ts, "/chat/mine/main", &[forged_manifest("y", "/alice/diary", "pending", None)]).await;
    // Recovery runs after start: wait until it has decided about the pending row.
    let entry = eventually(Duration::from_secs(10), "recovery to settle the pending row", || async {
        let res = as_principal(ts.request(Method::GET, &format!("{}/attachments", api("/chat/mine"))), Some(MALLORY))
            .send()
            .await
            .ok()?;
        let listed: Value = res.json().await.ok()?;
        let entry = listed["attachments"].as_array()?.iter().find(|e| e["id"] == "y")?.clone();
        (entry["status"] != "pending").then_some(entry)
    })
    .await;
    assert_eq!(entry["status"], "failed", "{entry}");
    assert_eq!(entry["streamPath"], "/chat/mine/attachments/y", "{entry}");
    let (status, body) = read_as(&ts, MALLORY, "/chat/mine", "y").await;
    assert_ne!(status, StatusCode::OK);
    assert!(!contains(&body, DIARY.as_bytes()));
    ts.stop().await;
}

#[tokio::test]
async fn a_stranger_cannot_read_through_a_forged_row_on_an_entity_it_may_read() {
    // Bob may read mallory's entity, not alice's: a row there naming alice's attachment gives bob nothing.
    let mut ts = TestServer::start().await;
    let _v = victim(&ts).await;
    spawn_as(&ts, MALLORY, "/chat/mine").await;
    let grant = as_principal(ts.request(Method::POST, &format!("{}/grants", api("/chat/mine"))), Some(MALLORY))
        .json(&json!({ "subject_kind": "principal", "subject_value": "user:bob", "permission": "read" }))
        .send()
        .await
        .expect("grant answered");
    assert_eq!(grant.status(), StatusCode::CREATED);
    plant(&mut ts, "/chat/mine/main", &[forged_manifest("x", "/chat/victim/attachments/secret", "complete", None)])
        .await;
    let (status, body) = read_as(&ts, "user:bob", "/chat/mine", "x").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(!contains(&body, SECRET));
    let (code_status, code, _) = error_of(
        as_principal(ts.request(Method::GET, &format!("{}/attachments/x", api("/chat/mine"))), Some("user:bob"))
            .send()
            .await
            .expect("read answered"),
    )
    .await;
    assert_eq!((code_status, code.as_str()), (StatusCode::NOT_FOUND, "NOT_FOUND"));
    ts.stop().await;
}

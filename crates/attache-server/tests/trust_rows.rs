//! The trust boundary of rows: a value read from a row a client could write
//! is data, never an address or a permission (docs/SECURITY.md, "Rows and
//! paths"). Dev mode; principals are named by the `electric-principal` header.
//!
//! Built-in system principals are held to the same raw-route rules; the token
//! mode matrix (tests/permissions.rs, actor "built-in system") checks that.
//!
//! Forged manifest rows are planted straight into the store while the server
//! is stopped: that is how rows written before the raw routes refused them
//! (or by any other means) look to the server, and the server must not follow
//! them whichever way they got there.
//!
//! Why one file of this size: each file under tests/ is its own test binary (one more link of the
//! server and all its dependencies), and this one is one face's suite: its fixtures and helpers at
//! the top, then tests that each start their own server and read alone. Every test here shares the
//! stop-plant-restart fixture.

mod common;
mod entity_support;
mod task_helpers;

use std::time::Duration;

use attache_core::ContentType;
use attache_storage::embedded::{EmbeddedConfig, EmbeddedRegistry, EmbeddedStore};
use attache_storage::{AppendRequest, Registry, StreamStore};
use common::TestServer;
use entity_support::{api, as_principal, error_of, eventually, sha256_hex, Form, DEFAULT_SUBJECT};
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

// ------------------------------------------------------------ raw routes on entity streams

/// Alice's entity `/chat/shared`, on which mallory holds read and write.
async fn shared_with_a_writer(ts: &TestServer) -> &'static str {
    let e = "/chat/shared";
    spawn_as(ts, ALICE, e).await;
    for permission in ["read", "write"] {
        let res = as_principal(ts.request(Method::POST, &format!("{}/grants", api(e))), Some(ALICE))
            .json(&json!({ "subject_kind": "principal", "subject_value": MALLORY, "permission": permission }))
            .send()
            .await
            .expect("grant answered");
        assert_eq!(res.status(), StatusCode::CREATED);
    }
    e
}

fn row(collection: &str, key: &str) -> Value {
    json!({ "type": collection, "key": key, "value": { "from": "/principal/user%3Aalice" }, "headers": { "operation": "insert" } })
}

async fn raw_as(
    ts: &TestServer,
    who: &str,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<reqwest::Body>,
) -> (StatusCode, String, Value) {
    let mut rb = as_principal(ts.request(method, path), Some(who));
    for (name, value) in headers {
        rb = rb.header(*name, *value);
    }
    error_of(rb.body(body).send().await.expect("raw request answered")).await
}

async fn tail_as(ts: &TestServer, who: &str, path: &str) -> Option<String> {
    let res = as_principal(ts.request(Method::HEAD, path), Some(who)).send().await.expect("HEAD answered");
    common::header(&res, common::NEXT_OFFSET)
}

#[tokio::test]
async fn a_writer_cannot_close_an_entitys_main_stream() {
    let ts = TestServer::start().await;
    let e = shared_with_a_writer(&ts).await;
    let main = format!("{e}/main");
    let tail = tail_as(&ts, ALICE, &main).await;
    let attempts: [(Method, &str); 3] =
        [(Method::POST, ""), (Method::POST, r#"{"type":"note","key":"n"}"#), (Method::PUT, "")];
    for (method, body) in attempts {
        for who in [MALLORY, ALICE] {
            let json = [("content-type", "application/json"), ("stream-closed", "true")];
            let (status, code, body) = raw_as(&ts, who, method.clone(), &main, &json, body).await;
            assert_eq!(
                (status, code.as_str()),
                (StatusCode::CONFLICT, "USE_ENTITY_ROUTES"),
                "{method} as {who}: {body}"
            );
            assert!(body["error"]["message"].as_str().unwrap_or("").contains("DELETE /_electric/entities/chat/shared"));
        }
    }
    assert_eq!(tail_as(&ts, ALICE, &main).await, tail, "the refused closes wrote nothing");
    assert!(tail_as(&ts, ALICE, &main).await.is_some());
    let head = as_principal(ts.request(Method::HEAD, &main), Some(ALICE)).send().await.unwrap();
    assert!(common::header(&head, common::CLOSED).is_none(), "the main stream is still open");
    let entity: Value =
        as_principal(ts.request(Method::GET, &api(e)), Some(ALICE)).send().await.unwrap().json().await.unwrap();
    assert_eq!(entity["status"], "idle", "the entity still runs");
    let sent = as_principal(ts.request(Method::POST, &format!("{}/send", api(e))), Some(ALICE))
        .json(&json!({ "payload": "still open" }))
        .send()
        .await
        .unwrap();
    assert_eq!(sent.status(), StatusCode::OK);
    // Forking onto a main stream is no way around it.
    let fork = [("content-type", "application/json"), ("stream-forked-from", main.as_str())];
    let (status, code, _) = raw_as(&ts, ALICE, Method::PUT, &main, &fork, "").await;
    assert_eq!((status, code.as_str()), (StatusCode::CONFLICT, "USE_ENTITY_ROUTES"));
}

#[tokio::test]
async fn no_client_appends_server_owned_rows_to_a_main_stream() {
    let ts = TestServer::start().await;
    let e = shared_with_a_writer(&ts).await;
    let main = format!("{e}/main");
    let tail = tail_as(&ts, ALICE, &main).await;
    let json = [("content-type", "application/json")];
    let owned = ["manifest", "inbox", "entity_created", "entity_stopped", "event", "tags", "signal", "grant"];
    for collection in owned {
        for who in [MALLORY, ALICE] {
            let body = row(collection, "forged").to_string();
            let (status, code, answer) = raw_as(&ts, who, Method::POST, &main, &json, body).await;
            assert_eq!((status, code.as_str()), (StatusCode::FORBIDDEN, "SERVER_OWNED_ROW"), "{collection} as {who}");
            assert!(answer["error"]["message"].as_str().unwrap_or("").contains(collection), "{answer}");
        }
        // One owned row among client rows refuses the whole append.
        let batch = json!([row("note", "fine"), row(collection, "forged")]).to_string();
        let (status, code, _) = raw_as(&ts, MALLORY, Method::POST, &main, &json, batch).await;
        assert_eq!((status, code.as_str()), (StatusCode::FORBIDDEN, "SERVER_OWNED_ROW"));
    }
    // Written with escapes, a type names the same collection.
    let escaped = r#"{"type":"\u0069nbox","key":"m","value":{},"headers":{"operation":"insert"}}"#;
    let (status, code, _) = raw_as(&ts, MALLORY, Method::POST, &main, &json, escaped).await;
    assert_eq!((status, code.as_str()), (StatusCode::FORBIDDEN, "SERVER_OWNED_ROW"));
    assert_eq!(tail_as(&ts, ALICE, &main).await, tail, "no refused row was appended");

    // The issue's example: a manifest row naming alice's attachment, on mallory's own entity.
    upload_as(&ts, ALICE, e, "secret", SECRET).await;
    spawn_as(&ts, MALLORY, "/chat/mine").await;
    let forged = forged_manifest("x", &format!("{e}/attachments/secret"), "complete", None).to_string();
    let (status, code, _) = raw_as(&ts, MALLORY, Method::POST, "/chat/mine/main", &json, forged).await;
    assert_eq!((status, code.as_str()), (StatusCode::FORBIDDEN, "SERVER_OWNED_ROW"));
    assert_eq!(read_as(&ts, MALLORY, "/chat/mine", "x").await.0, StatusCode::NOT_FOUND);
    // An initial body on PUT is held to the same rule.
    let (status, code, _) =
        raw_as(&ts, MALLORY, Method::PUT, "/chat/mine/main", &json, row("inbox", "i").to_string()).await;
    assert_eq!((status, code.as_str()), (StatusCode::FORBIDDEN, "SERVER_OWNED_ROW"));
}

#[tokio::test]
async fn main_streams_take_only_state_protocol_rows() {
    let ts = TestServer::start().await;
    let e = shared_with_a_writer(&ts).await;
    let main = format!("{e}/main");
    let tail = tail_as(&ts, ALICE, &main).await;
    let json = [("content-type", "application/json")];
    for bad in ["1", r#""manifest""#, "[[1]]", "{}", r#"{"type":1}"#, r#"{"type":"note","type":"inbox"}"#, "[{}]"] {
        let (status, code, body) = raw_as(&ts, MALLORY, Method::POST, &main, &json, bad).await;
        assert_eq!((status, code.as_str()), (StatusCode::BAD_REQUEST, "NOT_A_ROW"), "{bad}: {body}");
    }
    assert_eq!(tail_as(&ts, ALICE, &main).await, tail);
}

#[tokio::test]
async fn client_rows_such_as_the_runtimes_errors_still_append() {
    let ts = TestServer::start().await;
    let e = shared_with_a_writer(&ts).await;
    let main = format!("{e}/main");
    let json = [("content-type", "application/json")];
    // The row attache-client's runtime writes when a handler fails.
    let errors = json!({
        "type": "errors",
        "key": "handler-msg-1-1",
        "value": { "source": "handler", "handler": "h", "inbox_key": "msg-1", "message": "boom", "timestamp": "2026-01-01T00:00:00.000Z" },
        "headers": { "operation": "insert", "timestamp": "2026-01-01T00:00:00.000Z", "txid": "t1" },
    });
    for who in [MALLORY, ALICE] {
        let (status, _, body) = raw_as(&ts, who, Method::POST, &main, &json, errors.to_string()).await;
        assert_eq!(status, StatusCode::NO_CONTENT, "{who}: {body}");
    }
    let batch = json!([row("run", "r1"), row("text", "t1")]).to_string();
    let producer =
        [("content-type", "application/json"), ("producer-id", "p1"), ("producer-epoch", "0"), ("producer-seq", "0")];
    let (status, _, _) = raw_as(&ts, MALLORY, Method::POST, &main, &producer, batch.clone()).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, _) = raw_as(&ts, MALLORY, Method::POST, &main, &producer, batch).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "a retried producer append is a duplicate");
    let (_, body) = raw_read_as(&ts, ALICE, &main).await;
    let rows: Vec<Value> = serde_json::from_str(&body).expect("a JSON page");
    let types: Vec<&str> = rows.iter().filter_map(|r| r["type"].as_str()).collect();
    assert_eq!(types, ["entity_created", "errors", "errors", "run", "text"]);
    // An idempotent PUT of the existing main stream still answers 200.
    let (status, _, _) = raw_as(&ts, MALLORY, Method::PUT, &main, &json, "").await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn attachment_streams_are_created_by_the_attachment_routes_only() {
    let ts = TestServer::start().await;
    let e = shared_with_a_writer(&ts).await;
    for who in [MALLORY, ALICE] {
        let path = format!("{e}/attachments/raw-{}", who.replace(':', "-"));
        let (status, code, body) =
            raw_as(&ts, who, Method::PUT, &path, &[("content-type", "application/octet-stream")], "bytes").await;
        assert_eq!((status, code.as_str()), (StatusCode::CONFLICT, "USE_ENTITY_ROUTES"), "{who}: {body}");
        assert_eq!(tail_as(&ts, ALICE, &path).await, None, "{path} was not created");
    }
}

#[tokio::test]
async fn raw_appends_reach_only_an_open_resumable_upload() {
    let ts = TestServer::start().await;
    let e = shared_with_a_writer(&ts).await;
    upload_as(&ts, ALICE, e, "done", SECRET).await;
    let begun = as_principal(ts.request(Method::PUT, &format!("{}/attachments/r1", api(e))), Some(ALICE))
        .json(&json!({ "mimeType": "text/plain", "subject": {"type": "context", "key": "test"} }))
        .send()
        .await
        .expect("resumable begun");
    assert_eq!(begun.status(), StatusCode::CREATED);
    let text = [("content-type", "text/plain")];
    // A writer may append to the open upload, and closing it completes the attachment.
    let (status, _, _) = raw_as(&ts, MALLORY, Method::POST, &format!("{e}/attachments/r1"), &text, "part one, ").await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let closing = [("content-type", "text/plain"), ("stream-closed", "true")];
    let (status, _, _) = raw_as(&ts, ALICE, Method::POST, &format!("{e}/attachments/r1"), &closing, "part two").await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(read_as(&ts, ALICE, e, "r1").await, (StatusCode::OK, b"part one, part two".to_vec()));
    // No manifest entry, or a versioned sibling path: nothing to append to.
    for path in [format!("{e}/attachments/nothing"), format!("{e}/attachments/done-abcdef")] {
        let (status, code, _) = raw_as(&ts, ALICE, Method::POST, &path, &text, "bytes").await;
        assert_eq!((status, code.as_str()), (StatusCode::CONFLICT, "USE_ENTITY_ROUTES"), "{path}");
    }
    // A stored upload stays as stored.
    let octets = [("content-type", "application/octet-stream")];
    let (status, _, _) = raw_as(&ts, MALLORY, Method::POST, &format!("{e}/attachments/done"), &octets, "more").await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(read_as(&ts, ALICE, e, "done").await, (StatusCode::OK, SECRET.to_vec()));
}

// ------------------------------------------------------------ events and task incarnations

const PURGED_TEXT: &str = "alice's purged task text";

/// Alice's task `t-reused-1`, with a few events, purged; then mallory creates a task with the same id.
async fn purged_and_recreated(ts: &TestServer) -> &'static str {
    let id = "t-reused-1";
    task_helpers::ok(ts, ALICE, "task.create", json!({ "id": id, "text": PURGED_TEXT })).await;
    task_helpers::ok(ts, ALICE, "task.update", json!({ "id": id, "updates": { "text": PURGED_TEXT, "priority": 9 } }))
        .await;
    let res =
        as_principal(ts.request(Method::DELETE, &format!("{}?purge=true", api(&format!("/task/{id}")))), Some(ALICE))
            .send()
            .await
            .expect("purge answered");
    assert_eq!(res.status(), StatusCode::OK, "alice purges her task");
    task_helpers::ok(ts, MALLORY, "task.create", json!({ "id": id, "text": "mallory's task" })).await;
    id
}

fn assert_only_mallorys(events: &[Value], id: &str, how: &str) {
    assert!(
        events
            .iter()
            .any(|e| e["type"] == "task.created" && e["taskId"] == id && e["payload"]["text"] == "mallory's task"),
        "{how}: mallory sees her own task's events: {events:?}"
    );
    for e in events {
        assert!(!e.to_string().contains(PURGED_TEXT), "{how}: the purged task's event reached mallory: {e}");
    }
}

#[tokio::test]
async fn events_of_a_purged_task_are_not_read_by_whoever_creates_its_id_again() {
    let ts = TestServer::start().await;
    let id = purged_and_recreated(&ts).await;

    // Catch-up, with and without the task filter.
    for query in [vec![("offset", "-1")], vec![("offset", "-1"), ("taskId", id)]] {
        let res = as_principal(ts.request(Method::GET, "/_attache/events").query(&query), Some(MALLORY))
            .send()
            .await
            .expect("events answered");
        assert_eq!(res.status(), StatusCode::OK);
        let events: Vec<Value> = res.json().await.expect("a JSON array");
        assert_only_mallorys(&events, id, &format!("catch-up {query:?}"));
    }

    // Long-poll from the start answers at once with what is there.
    let res = as_principal(
        ts.request(Method::GET, "/_attache/events").query(&[("offset", "-1"), ("live", "long-poll")]),
        Some(MALLORY),
    )
    .send()
    .await
    .expect("long-poll answered");
    assert_eq!(res.status(), StatusCode::OK);
    let events: Vec<Value> = res.json().await.expect("a JSON array");
    assert_only_mallorys(&events, id, "long-poll");

    // SSE from the start, up to the first up-to-date control event.
    let res = as_principal(
        ts.request(Method::GET, "/_attache/events").query(&[("offset", "-1"), ("live", "sse")]),
        Some(MALLORY),
    )
    .send()
    .await
    .expect("SSE answered");
    assert_eq!(res.status(), StatusCode::OK);
    let mut body = res.bytes_stream();
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !text.contains("\"upToDate\":true") {
        use futures::StreamExt;
        let chunk = tokio::time::timeout_at(deadline, body.next()).await.expect("SSE in time").expect("open").unwrap();
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    let mut events = Vec::new();
    for line in text.lines().filter_map(|l| l.strip_prefix("data:")) {
        if let Ok(Value::Array(batch)) = serde_json::from_str::<Value>(line) {
            events.extend(batch);
        }
    }
    assert_only_mallorys(&events, id, "SSE");

    // A WebSocket subscription replaying from the start, up to an event mallory causes now.
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;
    let mut req = ts.url("/ws").replace("http://", "ws://").into_client_request().expect("a ws request");
    req.headers_mut().insert("electric-principal", MALLORY.parse().expect("a header value"));
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.expect("the WebSocket opens");
    let subscribe = json!({ "action": "subscribe", "events": ["*"], "offset": "-1" }).to_string();
    ws.send(Message::Text(subscribe.into())).await.expect("subscribe sent");
    task_helpers::ok(&ts, MALLORY, "task.update", json!({ "id": id, "updates": { "priority": 1 } })).await;
    let mut events = Vec::new();
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next()).await.expect("ws in time").expect("open").unwrap();
        let Message::Text(t) = msg else { continue };
        let v: Value = serde_json::from_str(&t).expect("JSON");
        if v["type"] != "event" {
            continue;
        }
        let done = v["event"] == "task.updated" && v["data"]["payload"]["priority"] == 1;
        events.push(v["data"].clone());
        if done {
            break;
        }
    }
    assert_only_mallorys(&events, id, "WebSocket");
}

#[tokio::test]
async fn events_from_before_incarnations_count_only_from_their_tasks_creation_on() {
    // A task and its events as a server before incarnations left them: no
    // stamp on the record, none on the events. An older life of the same id
    // (events before the record's creation) stays hidden.
    let mut ts = TestServer::start().await;
    let id = "t-legacy-1";
    task_helpers::ok(&ts, ALICE, "task.create", json!({ "id": id, "text": "this life" })).await;
    let dir = ts.pause().await;
    let created_at = {
        let registry = EmbeddedRegistry::open(&dir).expect("the registry opens");
        let record = registry
            .update_entity(
                &format!("/task/{id}"),
                Box::new(|e| {
                    e.incarnation = None;
                    Ok(())
                }),
            )
            .await
            .expect("the record is unstamped");
        record.created_at_ms
    };
    let legacy = |text: &str, at: i64| {
        serde_json::to_vec(&json!({
            "id": format!("evt-legacy-{at}"),
            "metadata": {},
            "payload": { "text": text },
            "taskId": id,
            "timestamp": at,
            "type": "task.updated",
        }))
        .expect("an event serializes")
    };
    let store = EmbeddedStore::open(EmbeddedConfig::new(&dir)).expect("the store opens");
    let ct = ContentType::parse("application/json").expect("a content type");
    let events = [legacy("an older life", created_at - 1_000), legacy("this life, before stamps", created_at + 1)];
    store.append(AppendRequest::json_messages("/_attache/events".into(), ct, &events, false)).await.expect("appended");
    store.close().await;
    drop(store);
    ts.resume().await;

    let res = as_principal(
        ts.request(Method::GET, "/_attache/events").query(&[("offset", "-1"), ("taskId", id)]),
        Some(ALICE),
    )
    .send()
    .await
    .expect("events answered");
    let events: Vec<Value> = res.json().await.expect("a JSON array");
    let texts: Vec<&str> = events.iter().filter_map(|e| e["payload"]["text"].as_str()).collect();
    assert!(texts.contains(&"this life, before stamps"), "{texts:?}");
    assert!(!texts.contains(&"an older life"), "{texts:?}");
    ts.stop().await;
}

// ------------------------------------------------------------ MCP session ids

async fn mcp(ts: &TestServer, who: &str, method: Method, session: Option<&str>, body: &str) -> reqwest::Response {
    let mut rb = as_principal(ts.request(method, "/mcp"), Some(who))
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream");
    if let Some(id) = session {
        rb = rb.header("mcp-session-id", id);
    }
    rb.body(body.to_owned()).send().await.expect("/mcp answers")
}

#[tokio::test]
async fn an_mcp_session_id_is_usable_only_by_the_principal_that_opened_it() {
    let ts = TestServer::start().await;
    let init = r#"{"jsonrpc":"2.0","method":"initialize","params":{"protocolVersion":"2025-03-26","capabilities":{},"clientInfo":{"name":"t","version":"1"}},"id":1}"#;
    let res = mcp(&ts, ALICE, Method::POST, None, init).await;
    assert_eq!(res.status(), StatusCode::OK);
    let session = common::header(&res, "mcp-session-id").expect("a session id");
    let initialized = r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#;
    assert!(mcp(&ts, ALICE, Method::POST, Some(&session), initialized).await.status().is_success());

    // Mallory, holding alice's session id, can neither use nor close it.
    let list = r#"{"jsonrpc":"2.0","method":"tools/list","id":2}"#;
    assert_eq!(mcp(&ts, MALLORY, Method::POST, Some(&session), list).await.status(), StatusCode::NOT_FOUND);
    assert_eq!(mcp(&ts, MALLORY, Method::GET, Some(&session), "").await.status(), StatusCode::NOT_FOUND);
    assert_eq!(mcp(&ts, MALLORY, Method::DELETE, Some(&session), "").await.status(), StatusCode::NOT_FOUND);
    let res = mcp(&ts, ALICE, Method::POST, Some(&session), list).await;
    assert_eq!(res.status(), StatusCode::OK, "alice's session is still open");
    assert!(res.text().await.expect("a body").contains("task__create"));
}

/// An upload still arriving when its entity is purged and spawned again by
/// someone else lands nowhere: not in the new entity's manifest, not at its
/// attachment path.
#[tokio::test]
async fn an_upload_in_flight_across_a_purge_never_lands_in_the_next_entity_at_that_url() {
    let ts = TestServer::start().await;
    let entity = "/chat/race";
    spawn_as(&ts, ALICE, entity).await;
    let mut bytes = SECRET.to_vec();
    bytes.extend(std::iter::repeat_n(b'x', 256 << 10));
    // The id and subject before the file: the pending row is written before the bytes arrive.
    let body = Form::new()
        .field("id", "sec")
        .field("subject", DEFAULT_SUBJECT)
        .file(Some("s.bin"), Some("application/octet-stream"), &bytes)
        .finish();
    let (first, rest) = body.split_at(body.len() / 2);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(2);
    tx.send(Ok(first.to_vec())).await.expect("the first half is queued");
    let stream = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
    let upload = tokio::spawn(
        as_principal(ts.request(Method::POST, &format!("{}/attachments", api(entity))), Some(ALICE))
            .header("content-type", Form::content_type())
            .body(reqwest::Body::wrap_stream(stream))
            .send(),
    );
    // The upload has begun: its pending row is on alice's manifest.
    eventually(Duration::from_secs(10), "the pending row", || async {
        let (_, main) = raw_read_as(&ts, ALICE, &format!("{entity}/main")).await;
        main.contains("attachment:sec").then_some(())
    })
    .await;
    let res = as_principal(ts.request(Method::DELETE, &format!("{}?purge=true", api(entity))), Some(ALICE))
        .send()
        .await
        .expect("purge answered");
    assert_eq!(res.status(), StatusCode::OK);
    spawn_as(&ts, MALLORY, entity).await;
    tx.send(Ok(rest.to_vec())).await.expect("the rest is queued");
    drop(tx);
    let res = upload.await.expect("the upload task").expect("the upload is answered");
    assert_eq!(res.status(), StatusCode::NOT_FOUND, "the upload's entity is gone");

    let (status, got) = read_as(&ts, MALLORY, entity, "sec").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(!contains(&got, SECRET));
    let (_, raw) = raw_read_as(&ts, MALLORY, &format!("{entity}/attachments/sec")).await;
    assert!(!raw.contains("alice's secret"), "raw attachment stream: {raw}");
    let (_, main) = raw_read_as(&ts, MALLORY, &format!("{entity}/main")).await;
    assert!(!main.contains("manifest"), "mallory's main stream holds no row of alice's upload: {main}");
}

// ------------------------------------------------------------ writes across a purge

/// A server started with pause points a test can arm (`attache_server::pause`).
async fn start_with_pauses() -> (TestServer, attache_server::pause::Pauses) {
    let pauses = attache_server::pause::Pauses::default();
    let given = pauses.clone();
    (TestServer::start_with(move |c| c.pauses = Some(given)).await, pauses)
}

/// Waits (10 s at most) until a request waits at the pause.
async fn reached(pause: &attache_server::pause::Pause, what: &str) {
    tokio::time::timeout(Duration::from_secs(10), pause.reached())
        .await
        .unwrap_or_else(|_| panic!("{what} never reached its pause point"));
}

async fn purge_as(ts: &TestServer, who: &str, entity: &str) {
    let res = as_principal(ts.request(Method::DELETE, &format!("{}?purge=true", api(entity))), Some(who))
        .send()
        .await
        .expect("purge answered");
    assert_eq!(res.status(), StatusCode::OK, "{who} purges {entity}");
}

const SENT: &str = "alice's message sent across a purge";

/// A send whose permission was checked against alice's entity, and which
/// reaches its append only after alice purged it and mallory spawned a new
/// entity at the URL, writes nothing into mallory's entity and answers 404.
#[tokio::test]
async fn a_send_checked_before_a_purge_never_lands_in_the_next_entity_at_that_url() {
    let (ts, pauses) = start_with_pauses().await;
    let entity = "/chat/send-race";
    spawn_as(&ts, ALICE, entity).await;
    let pause = pauses.arm(attache_server::pause::ENTITY_WRITE);
    let send = as_principal(ts.request(Method::POST, &format!("{}/send", api(entity))), Some(ALICE))
        .json(&json!({ "payload": SENT, "key": "m-1" }))
        .send();
    let meanwhile = async {
        reached(&pause, "the send").await;
        purge_as(&ts, ALICE, entity).await;
        spawn_as(&ts, MALLORY, entity).await;
        pause.release();
    };
    let (res, ()) = tokio::join!(send, meanwhile);
    let (status, code, body) = error_of(res.expect("the send is answered")).await;
    assert_eq!((status, code.as_str()), (StatusCode::NOT_FOUND, "NOT_FOUND"), "{body}");
    let (_, main) = raw_read_as(&ts, MALLORY, &format!("{entity}/main")).await;
    assert!(!main.contains(SENT), "alice's message landed in mallory's entity: {main}");
    assert!(!main.contains("\"inbox\""), "mallory's main stream holds no inbox row: {main}");
    // Mallory's own send with the same key is not taken for a duplicate.
    let res = as_principal(ts.request(Method::POST, &format!("{}/send", api(entity))), Some(MALLORY))
        .json(&json!({ "payload": "mallory's", "key": "m-1" }))
        .send()
        .await
        .expect("mallory's send answered");
    assert_eq!(res.status(), StatusCode::OK);
}

/// A signal checked against alice's entity, reaching its write only after
/// alice purged it and mallory spawned a new entity at the URL, neither
/// records a signal row in mallory's entity nor stops it, and answers 404.
#[tokio::test]
async fn a_signal_checked_before_a_purge_never_reaches_the_next_entity_at_that_url() {
    let (ts, pauses) = start_with_pauses().await;
    for (i, signal) in ["SIGINT", "SIGKILL"].into_iter().enumerate() {
        let entity = format!("/chat/signal-race-{i}");
        spawn_as(&ts, ALICE, &entity).await;
        let pause = pauses.arm(attache_server::pause::ENTITY_WRITE);
        let send = as_principal(ts.request(Method::POST, &format!("{}/signal", api(&entity))), Some(ALICE))
            .json(&json!({ "signal": signal, "reason": "across a purge" }))
            .send();
        let meanwhile = async {
            reached(&pause, "the signal").await;
            purge_as(&ts, ALICE, &entity).await;
            spawn_as(&ts, MALLORY, &entity).await;
            pause.release();
        };
        let (res, ()) = tokio::join!(send, meanwhile);
        let (status, code, body) = error_of(res.expect("the signal is answered")).await;
        assert_eq!((status, code.as_str()), (StatusCode::NOT_FOUND, "NOT_FOUND"), "{signal}: {body}");
        let (_, main) = raw_read_as(&ts, MALLORY, &format!("{entity}/main")).await;
        assert!(!main.contains("across a purge"), "{signal} landed in mallory's entity: {main}");
        assert!(!main.contains("entity_stopped"), "{signal} stopped mallory's entity: {main}");
    }
}

/// An attachment DELETE checked against alice's entity, reaching its write
/// only after alice purged it and mallory spawned a new entity at the URL
/// with an attachment of the same id, deletes neither mallory's row nor her
/// bytes, and answers 404.
#[tokio::test]
async fn an_attachment_delete_checked_before_a_purge_never_touches_the_next_entity_at_that_url() {
    let (ts, pauses) = start_with_pauses().await;
    let entity = "/chat/delete-race";
    spawn_as(&ts, ALICE, entity).await;
    upload_as(&ts, ALICE, entity, "doc", SECRET).await;
    let pause = pauses.arm(attache_server::pause::ENTITY_WRITE);
    let delete =
        as_principal(ts.request(Method::DELETE, &format!("{}/attachments/doc", api(entity))), Some(ALICE)).send();
    let mallorys: &[u8] = b"mallory's own document";
    let meanwhile = async {
        reached(&pause, "the attachment delete").await;
        purge_as(&ts, ALICE, entity).await;
        spawn_as(&ts, MALLORY, entity).await;
        upload_as(&ts, MALLORY, entity, "doc", mallorys).await;
        pause.release();
    };
    let (res, ()) = tokio::join!(delete, meanwhile);
    let (status, code, body) = error_of(res.expect("the delete is answered")).await;
    assert_eq!((status, code.as_str()), (StatusCode::NOT_FOUND, "NOT_FOUND"), "{body}");
    let (status, got) = read_as(&ts, MALLORY, entity, "doc").await;
    assert_eq!(status, StatusCode::OK, "mallory's attachment is still there");
    assert_eq!(got, mallorys);
    let (_, main) = raw_read_as(&ts, MALLORY, &format!("{entity}/main")).await;
    assert!(!main.contains("\"delete\""), "no delete row landed in mallory's entity: {main}");
}

/// A purge (by the entity route, which does not wait for the task face's
/// own lock) that comes while a task.update is between its compare-and-set
/// and its write waits for the write (the update holds the task's life), so
/// the update is written into alice's task and goes with it, never into the
/// next task at the id; the id is free for the next task.
#[tokio::test]
async fn a_purge_during_a_task_update_waits_for_it_and_the_next_task_holds_nothing_of_it() {
    let (ts, pauses) = start_with_pauses().await;
    let id = "t-update-race";
    task_helpers::ok(&ts, ALICE, "task.create", json!({ "id": id, "text": "alice's task" })).await;
    let pause = pauses.arm(attache_server::pause::TASK_WRITE);
    let update = task_helpers::call(&ts, ALICE, "task.update", json!({ "id": id, "updates": { "text": PURGED_TEXT } }));
    let meanwhile = async {
        reached(&pause, "the update").await;
        let entity = format!("/task/{id}");
        let purge = purge_as(&ts, ALICE, &entity);
        let release = async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            pause.release();
        };
        tokio::join!(purge, release);
    };
    let (res, ()) = tokio::join!(update, meanwhile);
    assert!(res.get("error").is_none(), "written before the purge: {res}");

    task_helpers::ok(&ts, MALLORY, "task.create", json!({ "id": id, "text": "mallory's task" })).await;
    let got = task_helpers::ok(&ts, MALLORY, "task.get", json!({ "id": id })).await;
    assert_eq!(got["text"], "mallory's task");
    let (_, main) = raw_read_as(&ts, MALLORY, &format!("/task/{id}/main")).await;
    assert!(!main.contains(PURGED_TEXT), "alice's update landed in mallory's task: {main}");
}

/// Sends a request's head and all but the last byte of its body, and holds
/// it: the server has checked it and waits for the rest.
async fn stalled_write(
    ts: &TestServer,
    method: &str,
    path: &str,
    principal: &str,
    extra: &str,
    body: &[u8],
) -> Stalled {
    use tokio::io::AsyncWriteExt;
    let addr = ts.url.trim_start_matches("http://").to_owned();
    let mut sock = tokio::net::TcpStream::connect(&addr).await.expect("a connection");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nelectric-principal: {principal}\r\n{extra}\
         Content-Length: {}\r\n\r\n",
        body.len()
    );
    sock.write_all(head.as_bytes()).await.expect("the head");
    sock.write_all(&body[..body.len() - 1]).await.expect("most of the body");
    // Let the server read the head and run its first check.
    tokio::time::sleep(Duration::from_millis(300)).await;
    Stalled { sock, last: body[body.len() - 1] }
}

struct Stalled {
    sock: tokio::net::TcpStream,
    last: u8,
}

impl Stalled {
    /// Sends the last byte; the answer's status line.
    async fn finish(mut self) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        self.sock.write_all(&[self.last]).await.expect("the last byte");
        let mut answer = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), self.sock.read(&mut answer))
            .await
            .expect("an answer")
            .expect("read");
        String::from_utf8_lossy(&answer[..n]).lines().next().unwrap_or_default().to_owned()
    }
}

#[tokio::test]
async fn a_raw_write_is_checked_again_against_what_holds_the_path_when_its_body_has_arrived() {
    let ts = TestServer::start().await;
    let json = "Content-Type: application/json\r\n";

    // An append checked while the path was free, finished after alice created her stream there.
    let append = stalled_write(&ts, "POST", "/alice/inbox", MALLORY, json, br#"[{"from":"MALLORY"}]"#).await;
    // A fork of a path that did not exist yet, finished after alice wrote her secret there.
    let fork = stalled_write(
        &ts,
        "PUT",
        "/mallory/f",
        MALLORY,
        "Content-Type: application/json\r\nStream-Forked-From: /alice/secret\r\n",
        b"[]",
    )
    .await;
    for path in ["/alice/inbox", "/alice/secret"] {
        let res = as_principal(ts.request(Method::PUT, path), Some(ALICE))
            .header("content-type", "application/json")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::CREATED);
    }
    let res = as_principal(ts.request(Method::POST, "/alice/secret"), Some(ALICE))
        .header("content-type", "application/json")
        .body(format!(r#"[{{"diary":"{DIARY}"}}]"#))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    assert!(append.finish().await.contains(" 404 "), "mallory's append into alice's new stream is refused");
    assert!(fork.finish().await.contains(" 404 "), "mallory's fork of alice's new stream is refused");
    let inbox = ts.read_all_as("/alice/inbox", Some(ALICE)).await;
    assert!(!String::from_utf8_lossy(&inbox).contains("MALLORY"), "{}", String::from_utf8_lossy(&inbox));
    let res = as_principal(ts.request(Method::GET, "/mallory/f?offset=-1"), Some(MALLORY)).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::NOT_FOUND, "no fork was made");

    // An entity: mallory's grant is checked, then alice purges and spawns the URL again without it.
    spawn_as(&ts, ALICE, "/chat/c1").await;
    let res = as_principal(ts.request(Method::POST, &format!("{}/grants", api("/chat/c1"))), Some(ALICE))
        .json(&json!({ "subject_kind": "principal", "subject_value": MALLORY, "permission": "write" }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    let row = br#"[{"type":"notes","key":"n1","value":{"by":"MALLORY"},"headers":{"operation":"insert"}}]"#;
    let append = stalled_write(&ts, "POST", "/chat/c1/main", MALLORY, json, row).await;
    let res = as_principal(ts.request(Method::DELETE, &format!("{}?purge=true", api("/chat/c1"))), Some(ALICE))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    spawn_as(&ts, ALICE, "/chat/c1").await;
    assert!(append.finish().await.contains(" 404 "), "mallory's append lands in no life of /chat/c1");
    let main = ts.read_all_as("/chat/c1/main", Some(ALICE)).await;
    assert!(!String::from_utf8_lossy(&main).contains("MALLORY"), "{}", String::from_utf8_lossy(&main));
}

#[tokio::test]
async fn a_live_reader_of_an_entity_stream_gets_nothing_written_after_its_grant_is_revoked() {
    use futures::StreamExt;
    let ts = TestServer::start().await;
    let e = "/chat/revoked";
    spawn_as(&ts, ALICE, e).await;
    let res = as_principal(ts.request(Method::POST, &format!("{}/grants", api(e))), Some(ALICE))
        .json(&json!({ "subject_kind": "principal", "subject_value": MALLORY, "permission": "read" }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    let grant = res.json::<Value>().await.unwrap()["id"].as_u64().expect("a grant id");
    let head = as_principal(ts.request(Method::HEAD, &format!("{e}/main")), Some(ALICE)).send().await.unwrap();
    let tail = head.headers()["stream-next-offset"].to_str().unwrap().to_owned();

    // Mallory follows the main stream live, by SSE and by long-poll, from its tail.
    let sse = as_principal(ts.request(Method::GET, &format!("{e}/main")), Some(MALLORY))
        .query(&[("offset", tail.as_str()), ("live", "sse")])
        .send()
        .await
        .unwrap();
    assert_eq!(sse.status(), StatusCode::OK);
    let poll = tokio::spawn(
        as_principal(ts.request(Method::GET, &format!("{e}/main")), Some(MALLORY))
            .query(&[("offset", tail.as_str()), ("live", "long-poll")])
            .send(),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;

    let res = as_principal(ts.request(Method::DELETE, &format!("{}/grants/{grant}", api(e))), Some(ALICE))
        .send()
        .await
        .unwrap();
    assert!(res.status().is_success(), "revoke: {}", res.status());
    let res = as_principal(ts.request(Method::POST, &format!("{}/send", api(e))), Some(ALICE))
        .json(&json!({ "payload": { "text": DIARY } }))
        .send()
        .await
        .unwrap();
    assert!(res.status().is_success());

    let polled =
        tokio::time::timeout(Duration::from_secs(10), poll).await.expect("the long-poll ends").unwrap().unwrap();
    let status = polled.status();
    let body = polled.text().await.unwrap();
    assert!(!body.contains(DIARY), "long-poll after revocation ({status}): {body}");
    let mut seen = String::new();
    let mut body = sse.bytes_stream();
    // The SSE answer ends (or sends nothing more) without the new message.
    let _ = tokio::time::timeout(Duration::from_secs(3), async {
        while let Some(chunk) = body.next().await {
            match chunk {
                Ok(c) => seen.push_str(&String::from_utf8_lossy(&c)),
                Err(_) => break,
            }
        }
    })
    .await;
    assert!(!seen.contains(DIARY), "SSE after revocation: {seen}");
}

/// A raw `DELETE` checked against alice's plain stream, which reaches its
/// delete only after that stream was deleted and mallory created her own at
/// the path, deletes nothing of mallory's: it deletes the stream it checked
/// (by id), which is gone, and answers 404.
#[tokio::test]
async fn a_raw_delete_checked_before_the_path_changed_hands_never_deletes_the_new_stream() {
    let (ts, pauses) = start_with_pauses().await;
    let path = "/plain/delete-race";
    let put = |who: &'static str| {
        as_principal(ts.request(Method::PUT, path), Some(who)).header("content-type", "text/plain").send()
    };
    assert_eq!(put(ALICE).await.unwrap().status(), StatusCode::CREATED);
    let pause = pauses.arm(attache_server::pause::STREAM_DELETE);
    let delete = as_principal(ts.request(Method::DELETE, path), Some(ALICE)).send();
    let meanwhile = async {
        reached(&pause, "alice's delete").await;
        // Alice's stream goes (her second delete passes the pause), and mallory takes the path.
        let second = as_principal(ts.request(Method::DELETE, path), Some(ALICE)).send().await.unwrap();
        assert_eq!(second.status(), StatusCode::NO_CONTENT);
        assert_eq!(put(MALLORY).await.unwrap().status(), StatusCode::CREATED);
        let res = as_principal(ts.request(Method::POST, path), Some(MALLORY))
            .header("content-type", "text/plain")
            .body("mallory's line")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::NO_CONTENT);
        pause.release();
    };
    let (res, ()) = tokio::join!(delete, meanwhile);
    let (status, code, body) = error_of(res.expect("the delete is answered")).await;
    assert_eq!((status, code.as_str()), (StatusCode::NOT_FOUND, "NOT_FOUND"), "{body}");
    let (status, text) = raw_read_as(&ts, MALLORY, path).await;
    assert_eq!((status, text.as_str()), (StatusCode::OK, "mallory's line"), "mallory's stream is whole");
}

//! Forking an entity over HTTP (`POST /_electric/entities/{type}/{id}/fork`,
//! dev mode): the main stream is forked, the attachments the fork can see
//! are carried by reference to the same content-addressed bytes (no copy),
//! each manifest row is rewritten to the fork's own stream, and every bad
//! request is a 4xx that writes nothing.

mod common;
mod entity_support;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use common::{request_dropped_at, TestServer};
use entity_support::{
    api, as_principal, error_of, eventually, files_under, get_bytes, listed, manifest, pattern, rows_as, sha256_hex,
    spawn, stored_blobs, upload,
};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

const ANN: &str = "user:ann";
const SAM: &str = "user:sam";

/// Bytes the data dir takes on disk (allocated blocks, not apparent sizes).
fn disk_usage(dir: &Path) -> u64 {
    files_under(dir).iter().filter_map(|f| std::fs::metadata(f).ok()).map(|m| m.blocks() * 512).sum()
}

async fn fork(ts: &TestServer, who: Option<&str>, entity: &str, body: Value) -> reqwest::Response {
    as_principal(ts.request(Method::POST, &format!("{}/fork", api(entity))), who)
        .json(&body)
        .send()
        .await
        .expect("fork answered")
}

async fn delete_attachment(ts: &TestServer, entity: &str, id: &str) {
    let res = ts.request(Method::DELETE, &format!("{}/attachments/{id}", api(entity))).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK, "deleting {id} of {entity}");
}

#[tokio::test]
async fn forking_an_entity_with_a_100_mib_attachment_links_its_bytes_instead_of_copying_them() {
    let ts = TestServer::start().await;
    spawn(&ts, None, "/chat/big").await;
    let bytes = pattern(100 << 20, 7);
    let sha = sha256_hex(&bytes);
    upload(&ts, "/chat/big", "movie", "video/mp4", &bytes).await;
    let dir = ts.config.data_dir.clone();
    let before = disk_usage(&dir);

    let res = fork(&ts, None, "/chat/big", json!({ "instance_id": "big-fork" })).await;
    assert_eq!(res.status(), StatusCode::CREATED);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["root"]["url"], "/chat/big-fork", "{body}");
    assert_eq!(body["entities"], json!([body["root"]]));

    let after = disk_usage(&dir);
    let grown = after.saturating_sub(before);
    println!("data dir before the fork {before} B, after {after} B: grew {grown} B for a 100 MiB attachment");
    assert!(grown < 4 << 20, "forking grew the data dir by {grown} bytes: the attachment was copied");
    assert_eq!(stored_blobs(&dir).len(), 1, "one blob file for both");

    let entry = &listed(&ts, "/chat/big-fork").await["movie"];
    assert_eq!(entry["streamPath"], "/chat/big-fork/attachments/movie", "{entry}");
    assert_eq!(entry["sha256"], sha.as_str());
    assert_eq!(manifest(&ts, "/chat/big-fork").await["movie"]["streamPath"], "/chat/big-fork/attachments/movie");
    assert_eq!(manifest(&ts, "/chat/big").await["movie"]["streamPath"], "/chat/big/attachments/movie");
    for entity in ["/chat/big", "/chat/big-fork"] {
        let (status, got) = get_bytes(&ts, entity, "movie").await;
        assert_eq!(status, StatusCode::OK, "{entity}");
        assert!(got == bytes, "{entity} reads the attachment back byte for byte");
    }

    // The original goes: the fork keeps its bytes.
    delete_attachment(&ts, "/chat/big", "movie").await;
    assert_eq!(get_bytes(&ts, "/chat/big", "movie").await.0, StatusCode::NOT_FOUND);
    let (status, got) = get_bytes(&ts, "/chat/big-fork", "movie").await;
    assert!(status == StatusCode::OK && got == bytes, "the fork's copy outlives the original's");
    assert_eq!(stored_blobs(&dir).len(), 1);

    // Both gone: the blob is freed.
    delete_attachment(&ts, "/chat/big-fork", "movie").await;
    eventually(Duration::from_secs(10), "the blob to be freed once neither holds it", || {
        let left = stored_blobs(&dir);
        async move { left.is_empty().then_some(()) }
    })
    .await;
}

#[tokio::test]
async fn a_fork_carries_complete_attachments_at_its_own_paths_and_drops_pending_ones() {
    let ts = TestServer::start().await;
    let e = "/chat/src";
    spawn(&ts, None, e).await;
    let small = pattern(70_000, 1);
    upload(&ts, e, "blob", "text/plain", &small).await;
    // A finished resumable upload: its stream is a closed stream, not a blob.
    let begin = |id: &str| {
        ts.request(Method::PUT, &format!("{}/attachments/{id}", api(e)))
            .json(&json!({ "subject": { "type": "context", "key": "k" } }))
    };
    assert_eq!(begin("res").send().await.unwrap().status(), StatusCode::CREATED);
    let resumed = pattern(5_000, 2);
    let res = ts
        .request(Method::POST, &format!("{e}/attachments/res"))
        .header("content-type", "application/octet-stream")
        .header("stream-closed", "true")
        .body(resumed.clone())
        .send()
        .await
        .unwrap();
    assert!(res.status().is_success(), "closing the resumable upload: {}", res.status());
    eventually(Duration::from_secs(5), "the resumable upload to complete", || {
        let ts = &ts;
        async move { (manifest(ts, e).await["res"]["status"] == "complete").then_some(()) }
    })
    .await;
    // Still pending: not carried.
    assert_eq!(begin("open").send().await.unwrap().status(), StatusCode::CREATED);

    let res = fork(&ts, None, e, json!({ "instance_id": "dst", "anchor": "latest_completed_run" })).await;
    assert_eq!(res.status(), StatusCode::CREATED);
    let carried = manifest(&ts, "/chat/dst").await;
    assert_eq!(carried.keys().collect::<Vec<_>>(), ["blob", "res"], "{carried:?}");
    for id in ["blob", "res"] {
        assert_eq!(carried[id]["streamPath"], format!("/chat/dst/attachments/{id}"));
        assert_eq!(carried[id]["status"], "complete");
    }
    assert_eq!(get_bytes(&ts, "/chat/dst", "blob").await, (StatusCode::OK, small.clone()));
    assert_eq!(get_bytes(&ts, "/chat/dst", "res").await, (StatusCode::OK, resumed.clone()));
    assert_eq!(ts.head("/chat/dst/attachments/open").await.status(), StatusCode::NOT_FOUND);
    // The source is unchanged, its pending upload still open.
    assert_eq!(manifest(&ts, e).await["open"]["status"], "pending");
    assert_eq!(get_bytes(&ts, e, "blob").await, (StatusCode::OK, small));
    assert_eq!(get_bytes(&ts, e, "res").await, (StatusCode::OK, resumed));
}

#[tokio::test]
async fn a_fork_pointer_forks_the_history_up_to_it_with_only_the_attachments_seen_there() {
    let ts = TestServer::start().await;
    let e = "/chat/early";
    spawn(&ts, None, e).await;
    upload(&ts, e, "first", "text/plain", b"one").await;
    let at = ts.tail(&format!("{e}/main")).await;
    upload(&ts, e, "second", "text/plain", b"two").await;
    let res =
        fork(&ts, None, e, json!({ "instance_id": "then", "fork_pointer": { "offset": at, "sub_offset": 0 } })).await;
    assert_eq!(res.status(), StatusCode::CREATED);
    let carried = manifest(&ts, "/chat/then").await;
    assert_eq!(carried.keys().collect::<Vec<_>>(), ["first"]);
    assert_eq!(get_bytes(&ts, "/chat/then", "first").await, (StatusCode::OK, b"one".to_vec()));
    assert_eq!(ts.head("/chat/then/attachments/second").await.status(), StatusCode::NOT_FOUND);
}

/// What a refused fork must leave as it was: no entity, no stream, no blob.
async fn nothing_written(ts: &TestServer, fork_url: &str, blobs: usize) {
    let res = ts.request(Method::GET, &api(fork_url)).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::NOT_FOUND, "no entity at {fork_url}");
    assert_eq!(ts.head(&format!("{fork_url}/main")).await.status(), StatusCode::NOT_FOUND, "no main stream");
    assert_eq!(ts.head(&format!("{fork_url}/attachments/a")).await.status(), StatusCode::NOT_FOUND);
    assert_eq!(stored_blobs(&ts.config.data_dir).len(), blobs);
}

#[tokio::test]
async fn bad_forks_are_4xx_with_a_clear_error_and_write_nothing() {
    let ts = TestServer::start().await;
    let e = "/chat/orig";
    spawn(&ts, Some(ANN), e).await;
    let res = as_principal(ts.request(Method::POST, &format!("{}/attachments", api(e))), Some(ANN))
        .header("content-type", entity_support::Form::content_type())
        .body(entity_support::Form::new().field("id", "a").file(Some("a.txt"), Some("text/plain"), b"bytes").finish())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    let grant = |permission: &str| {
        as_principal(ts.request(Method::POST, &format!("{}/grants", api(e))), Some(ANN))
            .json(&json!({ "subject_kind": "principal", "subject_value": SAM, "permission": permission }))
    };

    let cases: Vec<(Option<&str>, Value, StatusCode, &str)> = vec![
        // Past the tail.
        (
            Some(ANN),
            json!({ "instance_id": "f", "fork_pointer": { "offset": "0000000000000000_0000000099999999", "sub_offset": 0 } }),
            StatusCode::BAD_REQUEST,
            "INVALID_REQUEST",
        ),
        (
            Some(ANN),
            json!({ "instance_id": "f", "fork_pointer": { "offset": "soon", "sub_offset": 0 } }),
            StatusCode::BAD_REQUEST,
            "INVALID_REQUEST",
        ),
        (
            Some(ANN),
            json!({ "instance_id": "f", "anchor": "latest_completed_run", "fork_pointer": { "offset": null, "sub_offset": 0 } }),
            StatusCode::BAD_REQUEST,
            "INVALID_REQUEST",
        ),
        (Some(ANN), json!({ "instance_id": "f", "anchor": "yesterday" }), StatusCode::BAD_REQUEST, "INVALID_REQUEST"),
        (Some(ANN), json!({ "instance_id": "f", "colour": "blue" }), StatusCode::BAD_REQUEST, "INVALID_REQUEST"),
        (Some(ANN), json!({ "instance_id": "no/slash" }), StatusCode::BAD_REQUEST, "INVALID_REQUEST"),
        // Holding nothing on the source: it does not exist for the caller.
        (Some(SAM), json!({ "instance_id": "f" }), StatusCode::NOT_FOUND, "NOT_FOUND"),
    ];
    for (who, body, status, code) in &cases {
        let (got, got_code, err) = error_of(fork(&ts, *who, e, body.clone()).await).await;
        assert_eq!((got, got_code.as_str()), (*status, *code), "{body}: {err}");
        assert!(!err["error"]["message"].as_str().unwrap_or("").is_empty(), "{err}");
        nothing_written(&ts, "/chat/f", 1).await;
    }

    // Holding read but not fork: 403.
    assert_eq!(grant("read").send().await.unwrap().status(), StatusCode::CREATED);
    let (status, code, err) = error_of(fork(&ts, Some(SAM), e, json!({ "instance_id": "f" })).await).await;
    assert_eq!((status, code.as_str()), (StatusCode::FORBIDDEN, "FORBIDDEN"), "{err}");
    nothing_written(&ts, "/chat/f", 1).await;
    // With fork granted it works, and the fork is the forker's.
    assert_eq!(grant("fork").send().await.unwrap().status(), StatusCode::CREATED);
    let res = fork(&ts, Some(SAM), e, json!({ "instance_id": "sams" })).await;
    assert_eq!(res.status(), StatusCode::CREATED);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["root"]["created_by"], "/principal/user%3Asam", "{body}");

    // A taken instance id: 409, the existing entity untouched.
    let before = rows_as(&ts, "/chat/sams/main", Some(SAM)).await;
    let (status, code, err) = error_of(fork(&ts, Some(ANN), e, json!({ "instance_id": "sams" })).await).await;
    assert_eq!((status, code.as_str()), (StatusCode::CONFLICT, "DUPLICATE_URL"), "{err}");
    assert_eq!(rows_as(&ts, "/chat/sams/main", Some(SAM)).await, before);

    // A stopped source: 409 NOT_RUNNING.
    let res = as_principal(ts.request(Method::DELETE, &api(e)), Some(ANN)).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let (status, code, err) = error_of(fork(&ts, Some(ANN), e, json!({ "instance_id": "f" })).await).await;
    assert_eq!((status, code.as_str()), (StatusCode::CONFLICT, "NOT_RUNNING"), "{err}");
    nothing_written(&ts, "/chat/f", 1).await;
}

#[tokio::test]
async fn a_fork_with_a_parent_is_its_child_and_needs_spawn_there() {
    let ts = TestServer::start().await;
    spawn(&ts, Some(ANN), "/chat/orig").await;
    spawn(&ts, Some(ANN), "/team/root").await;
    let grant = |entity: &str, permission: &str| {
        as_principal(ts.request(Method::POST, &format!("{}/grants", api(entity))), Some(ANN))
            .json(&json!({ "subject_kind": "principal", "subject_value": SAM, "permission": permission }))
    };
    assert_eq!(grant("/chat/orig", "fork").send().await.unwrap().status(), StatusCode::CREATED);
    let body = json!({ "instance_id": "f", "parent": "/team/root" });
    let (status, code, err) = error_of(fork(&ts, Some(SAM), "/chat/orig", body.clone()).await).await;
    assert_eq!((status, code.as_str()), (StatusCode::NOT_FOUND, "NOT_FOUND"), "{err}");
    nothing_written(&ts, "/chat/f", 0).await;
    assert_eq!(grant("/team/root", "read").send().await.unwrap().status(), StatusCode::CREATED);
    let (status, code, err) = error_of(fork(&ts, Some(SAM), "/chat/orig", body.clone()).await).await;
    assert_eq!((status, code.as_str()), (StatusCode::FORBIDDEN, "FORBIDDEN"), "{err}");
    nothing_written(&ts, "/chat/f", 0).await;
    assert_eq!(grant("/team/root", "spawn").send().await.unwrap().status(), StatusCode::CREATED);
    let res = fork(&ts, Some(SAM), "/chat/orig", body).await;
    assert_eq!(res.status(), StatusCode::CREATED);
    let out: Value = res.json().await.unwrap();
    assert_eq!(out["root"]["parent"], "/team/root", "{out}");
}

/// A spawn at a fork's URL while the fork has made its streams and not yet
/// its record (paused there) waits for the fork (which holds the URL's life)
/// and is then 409 `DUPLICATE_URL`: it never adopts the fork's main stream.
/// The fork succeeds whole. Before, the spawn took the fork's stream (201,
/// holding the forker's history), the fork answered 409, and its undo
/// deleted that stream by path: the spawner's entity had no main stream for
/// ever (send 404).
#[tokio::test]
async fn a_spawn_at_the_url_of_a_fork_in_flight_is_409_and_the_fork_stays_whole() {
    let pauses = attache_server::pause::Pauses::default();
    let given = pauses.clone();
    let ts = TestServer::start_with(move |c| c.pauses = Some(given)).await;
    spawn(&ts, None, "/chat/source").await;
    upload(&ts, "/chat/source", "a", "text/plain", b"the forker's attachment").await;

    let pause = pauses.arm(attache_server::pause::FORK_RECORD);
    let forked = fork(&ts, None, "/chat/source", json!({ "instance_id": "target" }));
    let meanwhile = async {
        tokio::time::timeout(Duration::from_secs(10), pause.reached()).await.expect("the fork reached its pause");
        let spawned = as_principal(ts.request(Method::PUT, &api("/chat/target")), Some(SAM)).send();
        tokio::pin!(spawned);
        let early = tokio::time::timeout(Duration::from_millis(300), &mut spawned).await;
        assert!(early.is_err(), "sam's spawn answered while the fork held its URL: {early:?}");
        pause.release();
        error_of(spawned.await.unwrap()).await
    };
    let (res, (status, code, err)) = tokio::join!(forked, meanwhile);
    assert_eq!((status, code.as_str()), (StatusCode::CONFLICT, "DUPLICATE_URL"), "sam's spawn: {err}");
    assert_eq!(err["error"]["message"], "Entity already exists at URL \"/chat/target\"", "it says only that");
    assert_eq!(res.status(), StatusCode::CREATED, "the fork");

    // The fork is whole: its main stream, its attachment, and sends land.
    assert_eq!(get_bytes(&ts, "/chat/target", "a").await, (StatusCode::OK, b"the forker's attachment".to_vec()));
    let res = ts
        .request(Method::POST, &format!("{}/send", api("/chat/target")))
        .json(&json!({ "payload": "after the race", "key": "m-1" }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK, "a send to the fork");
    let main = serde_json::to_string(&rows_as(&ts, "/chat/target/main", None).await).unwrap();
    assert!(main.contains("after the race"), "{main}");
    // Sam holds nothing there.
    let res = as_principal(ts.request(Method::GET, &api("/chat/target")), Some(SAM)).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
}

/// Whatever of a fork `/chat/{id}` of ann's `/chat/source` under
/// `/team/root` is missing: its record (with its parent), its main stream
/// with the source's history, its attachment's bytes, the grant to sam it
/// copies from its parent. Empty when the fork is whole.
async fn fork_missing(ts: &TestServer, fork_url: &str) -> Vec<String> {
    let mut missing = Vec::new();
    let res = as_principal(ts.request(Method::GET, &api(fork_url)), Some(ANN)).send().await.unwrap();
    let status = res.status();
    let record: Value = res.json().await.unwrap_or(Value::Null);
    if status != StatusCode::OK || record["parent"] != "/team/root" {
        missing.push(format!("the record ({status}: {record})"));
    }
    let main = as_principal(ts.request(Method::GET, &format!("{fork_url}/main")), Some(ANN)).query(&[("offset", "-1")]);
    let res = main.send().await.unwrap();
    let status = res.status();
    let main = res.text().await.unwrap_or_default();
    if status != StatusCode::OK || !main.contains("before the fork") {
        missing.push(format!("the main stream with the source's history ({status}: {main})"));
    }
    let bytes = as_principal(ts.request(Method::GET, &format!("{}/attachments/a", api(fork_url))), Some(ANN));
    let res = bytes.send().await.unwrap();
    let status = res.status();
    if status != StatusCode::OK || res.bytes().await.unwrap().as_ref() != b"the source's attachment" {
        missing.push(format!("the attachment's stream ({status})"));
    }
    let res = as_principal(ts.request(Method::GET, &api(fork_url)), Some(SAM)).send().await.unwrap();
    if res.status() != StatusCode::OK {
        missing.push(format!("the grant copied from the parent (sam reads the fork: {})", res.status()));
    }
    missing
}

/// A fork whose request is dropped (the client closes its connection)
/// midway is finished all the same, held between its streams and its
/// record (`fork_record`) or between its record and the grants it copies
/// from its parent (`fork_grants`), then released: it has its record, its
/// main stream with the source's history, its attachment and the parent's
/// `copy_to_children` grant. Before, the dropped request took the rest with
/// it: held at `fork_record`, its streams were undone and no fork was left
/// for the 201 nobody read (streams with no record, had the undo failed);
/// held at `fork_grants`, the record stood without the copied grant.
#[tokio::test]
async fn a_fork_whose_request_is_dropped_midway_is_finished_whole() {
    let pauses = attache_server::pause::Pauses::default();
    let given = pauses.clone();
    let ts = TestServer::start_with(move |c| c.pauses = Some(given)).await;
    spawn(&ts, Some(ANN), "/chat/source").await;
    spawn(&ts, Some(ANN), "/team/root").await;
    let res = as_principal(ts.request(Method::POST, &format!("{}/send", api("/chat/source"))), Some(ANN))
        .json(&json!({ "payload": "before the fork", "key": "m-1" }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let form = entity_support::Form::new().field("id", "a").file(
        Some("a.txt"),
        Some("text/plain"),
        b"the source's attachment",
    );
    let res = as_principal(ts.request(Method::POST, &format!("{}/attachments", api("/chat/source"))), Some(ANN))
        .header("content-type", entity_support::Form::content_type())
        .body(form.finish())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    let res = as_principal(ts.request(Method::POST, &format!("{}/grants", api("/team/root"))), Some(ANN))
        .json(&json!({ "subject_kind": "principal", "subject_value": SAM, "permission": "read", "copy_to_children": true }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);

    let mut wrong = Vec::new();
    for (point, id) in
        [(attache_server::pause::FORK_RECORD, "at-record"), (attache_server::pause::FORK_GRANTS, "at-grants")]
    {
        let pause = pauses.arm(point);
        let body = json!({ "instance_id": id, "parent": "/team/root" });
        let path = format!("{}/fork", api("/chat/source"));
        request_dropped_at(&ts, Method::POST, &path, ANN, Some(&body), &pause).await;
        pause.release();
        let fork_url = format!("/chat/{id}");
        let mut missing = fork_missing(&ts, &fork_url).await;
        for _ in 0..50 {
            if missing.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            missing = fork_missing(&ts, &fork_url).await;
        }
        if !missing.is_empty() {
            wrong.push(format!("dropped at {point}, the fork is missing {}", missing.join("; ")));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

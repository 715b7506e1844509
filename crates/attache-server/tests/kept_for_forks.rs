//! A stream deleted while forks read through it is kept for them (PROTOCOL.md
//! §4.2, "soft-deleted"). A path is a name and a stream's data has an
//! identity: such a stream must never hold a name the server gives out again
//! (an entity's main stream, an attachment, a task), and a principal that may
//! not see it must find the path as if it never existed (docs/SECURITY.md,
//! "Streams kept for their forks"). Each scenario runs on the embedded store
//! and on PostgreSQL, and across a restart.

mod common;
mod entity_support;
mod task_helpers;

use attache_storage::postgres::test_cluster::TestCluster;
use common::TestServer;
use entity_support::{api, get_bytes, spawn, upload, PRINCIPAL};
use reqwest::{Method, RequestBuilder, StatusCode};
use serde_json::{json, Value};

const ALICE: &str = "user:alice";
const MALLORY: &str = "user:mallory";

fn as_(rb: RequestBuilder, who: &str) -> RequestBuilder {
    rb.header(PRINCIPAL, who.to_owned())
}

/// `PUT path` as `who`, forking `source` at its tail.
async fn fork_as(ts: &TestServer, who: &str, path: &str, source: &str) -> StatusCode {
    as_(ts.request(Method::PUT, path), who).header("stream-forked-from", source).send().await.unwrap().status()
}

async fn status_as(ts: &TestServer, who: &str, method: Method, path: &str) -> StatusCode {
    let mut rb = as_(ts.request(method.clone(), path), who);
    if method == Method::POST || method == Method::PUT {
        rb = rb.header("content-type", "text/plain").body("x");
    }
    rb.send().await.unwrap().status()
}

/// The entity-created rows on a main stream (a fresh life has exactly one).
async fn lives(ts: &TestServer, entity: &str) -> usize {
    entity_support::rows_as(ts, &format!("{entity}/main"), Some(ALICE))
        .await
        .iter()
        .filter(|r| r["type"] == "entity_created")
        .count()
}

/// An entity forked (through the raw route, by a principal allowed to read
/// it) and then purged gives its URL back: spawning it again is a new,
/// readable entity with a fresh main stream, and the fork still reads the old one.
async fn a_purged_entity_whose_main_stream_was_forked_can_be_spawned_again(ts: &mut TestServer) {
    let entity = "/chat/victim";
    spawn(ts, Some(ALICE), entity).await;
    let res = as_(ts.request(Method::POST, &format!("{entity}/main")), ALICE)
        .header("content-type", "application/json")
        .body(r#"{"type":"text","key":"t1","value":{"text":"old life"},"headers":{"operation":"insert"}}"#)
        .send()
        .await
        .unwrap();
    assert!(res.status().is_success(), "append: {}", res.status());
    assert_eq!(fork_as(ts, ALICE, "/plain/victim-fork", &format!("{entity}/main")).await, StatusCode::CREATED);
    let res = as_(ts.request(Method::DELETE, &format!("{}?purge=true", api(entity))), ALICE).send().await.unwrap();
    assert!(res.status().is_success(), "purge: {}", res.status());

    // The URL is free: a read finds nothing, a spawn makes a new entity.
    assert_eq!(status_as(ts, ALICE, Method::GET, &format!("{entity}/main")).await, StatusCode::NOT_FOUND);
    spawn(ts, Some(ALICE), entity).await;
    for _ in 0..2 {
        let res = as_(ts.request(Method::GET, &api(entity)), ALICE).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::OK, "the new entity answers");
        assert_eq!(lives(ts, entity).await, 1, "a fresh main stream, not the old one");
        let main = String::from_utf8(ts.read_all_as(&format!("{entity}/main"), Some(ALICE)).await.to_vec()).unwrap();
        assert!(!main.contains("old life"), "{main}");
        let fork = String::from_utf8(ts.read_all_as("/plain/victim-fork", Some(ALICE)).await.to_vec()).unwrap();
        assert!(fork.contains("old life"), "the fork still reads the old stream: {fork}");
        ts.restart().await;
    }
}

/// Attachments are not forked (their bytes are one stored blob, not rows a
/// fork reads through), so a deleted attachment's id is always free again.
async fn attachments_are_not_forked_and_a_deleted_id_can_be_uploaded_again(ts: &mut TestServer) {
    let entity = "/chat/files";
    spawn(ts, None, entity).await;
    upload(ts, entity, "doc", "text/plain", b"first bytes").await;
    let res = ts
        .request(Method::PUT, "/plain/doc-fork")
        .header("stream-forked-from", format!("{entity}/attachments/doc"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CONFLICT);
    assert_eq!(common::error_code(res).await, "USE_ENTITY_ROUTES");
    assert_eq!(ts.request(Method::HEAD, "/plain/doc-fork").send().await.unwrap().status(), StatusCode::NOT_FOUND);
    let res = ts.request(Method::DELETE, &format!("{}/attachments/doc", api(entity))).send().await.unwrap();
    assert!(res.status().is_success(), "delete: {}", res.status());

    upload(ts, entity, "doc", "text/plain", b"second bytes").await;
    for _ in 0..2 {
        assert_eq!(get_bytes(ts, entity, "doc").await, (StatusCode::OK, b"second bytes".to_vec()));
        ts.restart().await;
    }
}

/// A task purged while a fork reads its stream: its id can be created again,
/// and `task.list` keeps working for everyone.
async fn a_task_purged_while_forked_can_be_created_again_and_listing_works(ts: &mut TestServer) {
    let id = "t-forked";
    task_helpers::create_task_with_id(ts, ALICE, id).await;
    assert_eq!(fork_as(ts, ALICE, "/plain/task-fork", &format!("/task/{id}/main")).await, StatusCode::CREATED);
    let res = as_(ts.request(Method::DELETE, &format!("{}?purge=true", api(&format!("/task/{id}")))), ALICE)
        .send()
        .await
        .unwrap();
    assert!(res.status().is_success(), "purge: {}", res.status());

    task_helpers::create_task_with_id(ts, MALLORY, id).await;
    for _ in 0..2 {
        let got = task_helpers::ok(ts, MALLORY, "task.get", json!({ "id": id })).await;
        assert_eq!(got["id"], id);
        for who in [ALICE, MALLORY] {
            let listed = task_helpers::ok(ts, who, "task.list", json!({})).await;
            let ids: Vec<&Value> = listed["tasks"].as_array().unwrap().iter().map(|t| &t["id"]).collect();
            assert_eq!(ids.contains(&&json!(id)), who == MALLORY, "{who}: {listed}");
        }
        ts.restart().await;
    }
}

/// A plain stream deleted while forked: its owner gets the protocol's
/// answers (410, and 409 for a create); anyone else gets exactly what a path
/// that never existed gets (404, and a create takes the path).
async fn a_kept_plain_stream_is_gone_to_its_owner_and_never_existed_to_others(ts: &mut TestServer) {
    let res = as_(ts.request(Method::PUT, "/plain/kept"), ALICE)
        .header("content-type", "text/plain")
        .body("alice's bytes")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(fork_as(ts, ALICE, "/plain/kept-fork", "/plain/kept").await, StatusCode::CREATED);
    assert_eq!(status_as(ts, ALICE, Method::DELETE, "/plain/kept").await, StatusCode::NO_CONTENT);

    for method in [Method::GET, Method::HEAD, Method::POST, Method::DELETE] {
        assert_eq!(status_as(ts, ALICE, method.clone(), "/plain/kept").await, StatusCode::GONE, "owner {method}");
        let never = status_as(ts, MALLORY, method.clone(), "/plain/never").await;
        assert_eq!(never, StatusCode::NOT_FOUND);
        assert_eq!(status_as(ts, MALLORY, method.clone(), "/plain/kept").await, never, "stranger {method}");
    }
    // A method streams never take is 405 at every path, the kept one and
    // alice's live fork included (before, session 17's attack pass: 404
    // there, 405 at a free path).
    for path in ["/plain/kept", "/plain/kept-fork", "/plain/never"] {
        assert_eq!(status_as(ts, MALLORY, Method::PATCH, path).await, StatusCode::METHOD_NOT_ALLOWED, "{path}");
    }
    assert_eq!(status_as(ts, ALICE, Method::PUT, "/plain/kept").await, StatusCode::CONFLICT);
    assert_eq!(fork_as(ts, ALICE, "/plain/f2", "/plain/kept").await, StatusCode::CONFLICT);
    assert_eq!(
        fork_as(ts, MALLORY, "/plain/f3", "/plain/kept").await,
        fork_as(ts, MALLORY, "/plain/f4", "/plain/never").await
    );

    // For the stranger the path is free: its create makes a new stream.
    let res = as_(ts.request(Method::PUT, "/plain/kept"), MALLORY)
        .header("content-type", "text/plain")
        .body("mallory's bytes")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    for _ in 0..2 {
        assert_eq!(ts.read_all_as("/plain/kept", Some(MALLORY)).await, "mallory's bytes");
        assert_eq!(status_as(ts, ALICE, Method::GET, "/plain/kept").await, StatusCode::NOT_FOUND);
        assert_eq!(ts.read_all_as("/plain/kept-fork", Some(ALICE)).await, "alice's bytes");
        ts.restart().await;
    }
    // The old data goes with its last fork; the new stream stays.
    assert_eq!(status_as(ts, ALICE, Method::DELETE, "/plain/kept-fork").await, StatusCode::NO_CONTENT);
    assert_eq!(ts.read_all_as("/plain/kept", Some(MALLORY)).await, "mallory's bytes");
}

async fn embedded() -> TestServer {
    TestServer::start().await
}

/// A server over a fresh PostgreSQL database, or `None` (skipped, said why).
async fn postgres() -> Option<(TestCluster, TestServer)> {
    TestServer::start_postgres(|_| {}).await
}

#[tokio::test]
async fn embedded_a_purged_entity_whose_main_stream_was_forked_can_be_spawned_again() {
    a_purged_entity_whose_main_stream_was_forked_can_be_spawned_again(&mut embedded().await).await;
}

#[tokio::test]
async fn embedded_attachments_are_not_forked_and_a_deleted_id_can_be_uploaded_again() {
    attachments_are_not_forked_and_a_deleted_id_can_be_uploaded_again(&mut embedded().await).await;
}

#[tokio::test]
async fn embedded_a_task_purged_while_forked_can_be_created_again_and_listing_works() {
    a_task_purged_while_forked_can_be_created_again_and_listing_works(&mut embedded().await).await;
}

#[tokio::test]
async fn embedded_a_kept_plain_stream_is_gone_to_its_owner_and_never_existed_to_others() {
    a_kept_plain_stream_is_gone_to_its_owner_and_never_existed_to_others(&mut embedded().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_streams_kept_for_forks_hold_no_name_or_skip_without_postgres() {
    let Some((_cluster, mut ts)) = postgres().await else { return };
    a_purged_entity_whose_main_stream_was_forked_can_be_spawned_again(&mut ts).await;
    attachments_are_not_forked_and_a_deleted_id_can_be_uploaded_again(&mut ts).await;
    a_task_purged_while_forked_can_be_created_again_and_listing_works(&mut ts).await;
    a_kept_plain_stream_is_gone_to_its_owner_and_never_existed_to_others(&mut ts).await;
}

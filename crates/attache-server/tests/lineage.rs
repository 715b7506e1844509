//! Lineage as Electric has it (dev mode): an entity spawned with `parent`
//! is that entity's child (the spawner needs `spawn` on the parent), a grant
//! with `propagation: "descendants"` applies to every descendant while the
//! ancestor that holds it lives, and `copy_to_children` copies a grant to
//! each child when it is spawned.

mod common;
mod entity_support;

use common::TestServer;
use entity_support::{api, as_principal, error_of, get_json_as, spawn};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

const ANN: &str = "user:ann";
const SAM: &str = "user:sam";
const BOB: &str = "user:bob";
const EVE: &str = "user:eve";

async fn spawn_under(ts: &TestServer, who: &str, entity: &str, parent: &str) -> reqwest::Response {
    as_principal(ts.request(Method::PUT, &api(entity)), Some(who))
        .json(&json!({ "parent": parent }))
        .send()
        .await
        .expect("spawn answered")
}

async fn grant(ts: &TestServer, who: &str, entity: &str, body: Value) -> Value {
    let res = as_principal(ts.request(Method::POST, &format!("{}/grants", api(entity))), Some(who))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED, "grant on {entity}");
    res.json().await.unwrap()
}

async fn get_as(ts: &TestServer, who: &str, entity: &str) -> StatusCode {
    as_principal(ts.request(Method::GET, &api(entity)), Some(who)).send().await.unwrap().status()
}

async fn grants_of(ts: &TestServer, who: &str, entity: &str) -> Vec<Value> {
    let res = as_principal(ts.request(Method::GET, &format!("{}/grants", api(entity))), Some(who)).send().await;
    let body: Value = res.unwrap().json().await.unwrap();
    body["grants"].as_array().cloned().unwrap_or_default()
}

#[tokio::test]
async fn a_child_records_its_parent_and_the_list_finds_children_by_parent() {
    let ts = TestServer::start().await;
    spawn(&ts, Some(ANN), "/team/root").await;
    let res = spawn_under(&ts, ANN, "/worker/w1", "/team/root").await;
    assert_eq!(res.status(), StatusCode::CREATED);
    let child: Value = res.json().await.unwrap();
    assert_eq!(child["parent"], "/team/root", "{child}");
    spawn(&ts, Some(ANN), "/worker/loner").await;
    let got = get_json_as(&ts, &api("/worker/w1"), Some(ANN)).await;
    assert_eq!(got["parent"], "/team/root");
    let list: Vec<Value> = as_principal(ts.request(Method::GET, "/_electric/entities?parent=/team/root"), Some(ANN))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let urls: Vec<&str> = list.iter().filter_map(|e| e["url"].as_str()).collect();
    assert_eq!(urls, ["/worker/w1"]);
}

/// Nothing at `entity`: no record, no main stream.
async fn not_spawned(ts: &TestServer, entity: &str) {
    assert_eq!(get_as(ts, ANN, entity).await, StatusCode::NOT_FOUND, "{entity}");
    assert_eq!(get_as(ts, SAM, entity).await, StatusCode::NOT_FOUND, "{entity}");
    assert_eq!(ts.head(&format!("{entity}/main")).await.status(), StatusCode::NOT_FOUND, "{entity}/main");
}

#[tokio::test]
async fn spawning_under_a_parent_needs_spawn_there_and_every_refusal_writes_nothing() {
    let ts = TestServer::start().await;
    spawn(&ts, Some(ANN), "/team/root").await;
    let cases = [
        // Holds nothing on the parent: it does not exist for SAM.
        ("/team/root", StatusCode::NOT_FOUND, "NOT_FOUND"),
        ("/team/nobody", StatusCode::NOT_FOUND, "NOT_FOUND"),
        ("team-root", StatusCode::BAD_REQUEST, "INVALID_REQUEST"),
        ("/team/root/extra", StatusCode::BAD_REQUEST, "INVALID_REQUEST"),
    ];
    for (parent, status, code) in cases {
        let (got, got_code, body) = error_of(spawn_under(&ts, SAM, "/worker/w1", parent).await).await;
        assert_eq!((got, got_code.as_str()), (status, code), "parent {parent}: {body}");
        not_spawned(&ts, "/worker/w1").await;
    }
    let (_, _, body) = error_of(spawn_under(&ts, SAM, "/worker/w1", "/team/nobody").await).await;
    assert!(body["error"]["message"].as_str().unwrap().contains("Parent entity not found"), "{body}");
    // Holding read, not spawn: 403.
    grant(&ts, ANN, "/team/root", json!({ "subject_kind": "principal", "subject_value": SAM, "permission": "read" }))
        .await;
    let (status, code, body) = error_of(spawn_under(&ts, SAM, "/worker/w1", "/team/root").await).await;
    assert_eq!((status, code.as_str()), (StatusCode::FORBIDDEN, "FORBIDDEN"), "{body}");
    not_spawned(&ts, "/worker/w1").await;
    // With spawn: a child, SAM's.
    grant(&ts, ANN, "/team/root", json!({ "subject_kind": "principal", "subject_value": SAM, "permission": "spawn" }))
        .await;
    let res = spawn_under(&ts, SAM, "/worker/w1", "/team/root").await;
    assert_eq!(res.status(), StatusCode::CREATED);
    let child: Value = res.json().await.unwrap();
    assert_eq!(
        (child["parent"].as_str(), child["created_by"].as_str()),
        (Some("/team/root"), Some("/principal/user%3Asam"))
    );
}

#[tokio::test]
async fn descendants_grants_reach_children_and_grandchildren_and_self_grants_do_not() {
    let ts = TestServer::start().await;
    spawn(&ts, Some(ANN), "/team/root").await;
    assert_eq!(spawn_under(&ts, ANN, "/worker/child", "/team/root").await.status(), StatusCode::CREATED);
    assert_eq!(spawn_under(&ts, ANN, "/worker/grandchild", "/worker/child").await.status(), StatusCode::CREATED);
    let inherited = grant(
        &ts,
        ANN,
        "/team/root",
        json!({ "subject_kind": "principal", "subject_value": SAM, "permission": "read", "propagation": "descendants" }),
    )
    .await;
    grant(&ts, ANN, "/team/root", json!({ "subject_kind": "principal", "subject_value": BOB, "permission": "manage" }))
        .await;
    for e in ["/team/root", "/worker/child", "/worker/grandchild"] {
        assert_eq!(get_as(&ts, SAM, e).await, StatusCode::OK, "SAM's descendants grant reaches {e}");
    }
    assert_eq!(get_as(&ts, BOB, "/team/root").await, StatusCode::OK);
    for e in ["/worker/child", "/worker/grandchild"] {
        assert_eq!(get_as(&ts, BOB, e).await, StatusCode::NOT_FOUND, "BOB's self grant stays on the root, not {e}");
    }
    // Read only: not write, on a descendant either (403: SAM may know it exists).
    let res = as_principal(ts.request(Method::POST, &format!("{}/send", api("/worker/grandchild"))), Some(SAM))
        .json(&json!({ "payload": "hi" }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    // A child spawned later is covered too; revoking the grant uncovers them all.
    assert_eq!(spawn_under(&ts, ANN, "/worker/late", "/team/root").await.status(), StatusCode::CREATED);
    assert_eq!(get_as(&ts, SAM, "/worker/late").await, StatusCode::OK);
    let id = inherited["id"].as_u64().unwrap();
    let res = as_principal(ts.request(Method::DELETE, &format!("{}/grants/{id}", api("/team/root"))), Some(ANN));
    assert_eq!(res.send().await.unwrap().status(), StatusCode::NO_CONTENT);
    for e in ["/worker/child", "/worker/grandchild", "/worker/late"] {
        assert_eq!(get_as(&ts, SAM, e).await, StatusCode::NOT_FOUND, "{e}");
    }
}

#[tokio::test]
async fn copy_to_children_copies_a_grant_to_each_child_spawned_afterwards() {
    let ts = TestServer::start().await;
    spawn(&ts, Some(ANN), "/team/root").await;
    grant(
        &ts,
        ANN,
        "/team/root",
        json!({ "subject_kind": "principal", "subject_value": SAM, "permission": "write", "copy_to_children": true }),
    )
    .await;
    grant(&ts, ANN, "/team/root", json!({ "subject_kind": "principal", "subject_value": BOB, "permission": "write" }))
        .await;
    grant(
        &ts,
        ANN,
        "/team/root",
        json!({ "subject_kind": "principal", "subject_value": EVE, "permission": "read", "copy_to_children": true,
                "expires_at": "2001-01-01T00:00:00Z" }),
    )
    .await;
    assert_eq!(spawn_under(&ts, ANN, "/worker/child", "/team/root").await.status(), StatusCode::CREATED);
    assert_eq!(spawn_under(&ts, ANN, "/worker/grandchild", "/worker/child").await.status(), StatusCode::CREATED);
    for e in ["/worker/child", "/worker/grandchild"] {
        let grants = grants_of(&ts, ANN, e).await;
        assert_eq!(grants.len(), 1, "only the unexpired grant marked copy_to_children is copied to {e}: {grants:?}");
        let g = &grants[0];
        assert_eq!(
            (g["subject_value"].as_str(), g["permission"].as_str(), g["propagation"].as_str()),
            (Some("/principal/user%3Asam"), Some("write"), Some("self")),
            "{g}"
        );
        assert_eq!((g["entity_url"].as_str(), g["copy_to_children"].as_bool()), (Some(e), Some(true)));
        assert_eq!(g["created_by"], "/principal/user%3Aann");
        let res = as_principal(ts.request(Method::POST, &format!("{}/send", api(e))), Some(SAM))
            .json(&json!({ "payload": "hi" }))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK, "SAM writes to {e}");
    }
}

/// ANN purges `/team/root`; EVE spawns its URL again and grants herself
/// everything below it (`manage`, to descendants).
async fn eve_takes_the_purged_root(ts: &TestServer) {
    let res = as_principal(ts.request(Method::DELETE, &format!("{}?purge=true", api("/team/root"))), Some(ANN));
    assert_eq!(res.send().await.unwrap().status(), StatusCode::OK);
    spawn(ts, Some(EVE), "/team/root").await;
    grant(
        ts,
        EVE,
        "/team/root",
        json!({ "subject_kind": "principal", "subject_value": EVE, "permission": "manage", "propagation": "descendants" }),
    )
    .await;
}

#[tokio::test]
async fn a_purged_parents_url_spawned_again_grants_nothing_on_the_old_children() {
    let ts = TestServer::start().await;
    spawn(&ts, Some(ANN), "/team/root").await;
    assert_eq!(spawn_under(&ts, ANN, "/worker/child", "/team/root").await.status(), StatusCode::CREATED);
    eve_takes_the_purged_root(&ts).await;
    assert_eq!(
        get_as(&ts, EVE, "/worker/child").await,
        StatusCode::NOT_FOUND,
        "another life's grants reach no old child"
    );
    assert_eq!(get_as(&ts, ANN, "/worker/child").await, StatusCode::OK);
}

/// The URLs `GET /_electric/entities` lists for `who`, newest first.
async fn listed_as(ts: &TestServer, who: &str) -> Vec<String> {
    let res = as_principal(ts.request(Method::GET, "/_electric/entities?limit=1000"), Some(who)).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let list: Vec<Value> = res.json().await.unwrap();
    list.iter().map(|e| e["url"].as_str().unwrap().to_owned()).collect()
}

/// The entity list starts from the entities each caller may possibly see
/// (its own, those granted to it or its kind, those under an ancestor whose
/// grant reaches descendants), not from every principal's: it lists what a
/// check of each entity allows, for the owner, a grantee through a parent's
/// `descendants` grant, a `self` grantee, a kind grantee and a stranger, and
/// not the children of a purged parent whose URL another principal took.
#[tokio::test]
async fn the_entity_list_shows_each_caller_its_own_granted_and_inherited_entities_and_no_others() {
    const AGENT: &str = "agent:ada";
    let ts = TestServer::start().await;
    spawn(&ts, Some(ANN), "/team/root").await;
    assert_eq!(spawn_under(&ts, ANN, "/worker/child", "/team/root").await.status(), StatusCode::CREATED);
    assert_eq!(spawn_under(&ts, ANN, "/worker/grandchild", "/worker/child").await.status(), StatusCode::CREATED);
    spawn(&ts, Some(ANN), "/worker/loner").await;
    spawn(&ts, Some(BOB), "/worker/bobs").await;
    grant(
        &ts,
        ANN,
        "/team/root",
        json!({ "subject_kind": "principal", "subject_value": SAM, "permission": "read", "propagation": "descendants" }),
    )
    .await;
    grant(&ts, ANN, "/team/root", json!({ "subject_kind": "principal", "subject_value": BOB, "permission": "read" }))
        .await;
    grant(
        &ts,
        ANN,
        "/worker/loner",
        json!({ "subject_kind": "principal_kind", "subject_value": "agent", "permission": "read" }),
    )
    .await;
    let all = ["/team/root", "/worker/child", "/worker/grandchild", "/worker/loner", "/worker/bobs"];
    let expected: [(&str, &[&str]); 5] = [
        (ANN, &["/team/root", "/worker/child", "/worker/grandchild", "/worker/loner"]),
        (SAM, &["/team/root", "/worker/child", "/worker/grandchild"]),
        (BOB, &["/team/root", "/worker/bobs"]),
        (AGENT, &["/worker/loner"]),
        (EVE, &[]),
    ];
    for (who, urls) in expected {
        let mut listed = listed_as(&ts, who).await;
        listed.sort();
        let mut urls: Vec<String> = urls.iter().map(|u| u.to_string()).collect();
        urls.sort();
        assert_eq!(listed, urls, "{who}'s list");
        let mut readable = Vec::new();
        for e in all {
            if get_as(&ts, who, e).await == StatusCode::OK {
                readable.push(e.to_owned());
            }
        }
        readable.sort();
        assert_eq!(readable, urls, "{who}'s entities one by one");
    }

    // The parent purged and its URL taken by EVE, with a descendants grant to herself: the old children stay hidden from her.
    eve_takes_the_purged_root(&ts).await;
    assert_eq!(listed_as(&ts, EVE).await, ["/team/root"]);
    assert!(listed_as(&ts, SAM).await.is_empty(), "SAM's grant went with the purged parent");
}

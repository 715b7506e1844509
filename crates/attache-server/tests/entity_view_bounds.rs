//! One entity's view, which a request holds whole, stays bounded whatever a
//! client with `write` puts in it (docs/SECURITY.md, "Input bounds and
//! caches"): what it uploads, and what it sends.

mod common;
mod entity_support;

use common::TestServer;
use entity_support::{api, as_principal, error_of, listed, materialize_as, spawn, upload_raw, Form};
use reqwest::{Method, StatusCode};
use serde_json::{json, Map, Value};

/// A `meta` object of `members` tiny members: ~10 bytes of JSON each, and
/// about a hundred in memory (a tree slot and a key of its own).
fn tiny_members(members: usize) -> Map<String, Value> {
    (0..members).map(|n| (format!("m{n}"), json!(0))).collect()
}

async fn begin_resumable(s: &TestServer, entity: &str, id: &str, body: Value) -> reqwest::Response {
    s.request(Method::PUT, &format!("{}/attachments/{id}", api(entity))).json(&body).send().await.expect("answered")
}

/// An upload's `meta` is kept in its manifest row, so in the entity's view:
/// it counts against `max_inline_bytes_per_entity` beside task attachments'
/// values, and one resumable upload's `meta` is at most 64 KiB of JSON, as a
/// form field is. Before, `meta` counted nowhere and a resumable upload took
/// up to its whole 1 MiB body of it: twelve such uploads of a tiny file (12
/// MB sent) made one `GET …/attachments` allocate 236 MB, and the 10,000 an
/// entity may hold, GiBs, held whole by every request on that entity.
#[tokio::test]
async fn an_upload_whose_meta_would_pass_the_entitys_inline_byte_bound_is_409_and_writes_nothing() {
    const LIMIT: usize = 400_000;
    let s = TestServer::start_with(|c| c.max_inline_bytes_per_entity = LIMIT).await;
    let entity = "/doc/metas";
    spawn(&s, None, entity).await;
    let subject = json!({ "type": "context", "key": "test" });

    // A resumable upload's meta is bounded as a form field is.
    let big = tiny_members(8_000);
    assert!(serde_json::to_vec(&big).unwrap().len() > 64 << 10);
    let res = begin_resumable(&s, entity, "huge", json!({ "subject": subject, "meta": big })).await;
    let (status, _, body) = error_of(res).await;
    let message = body["error"]["message"].as_str().unwrap_or("").to_owned();
    assert_eq!(status, StatusCode::BAD_REQUEST, "{message}");
    assert!(message.contains("meta is at most"), "{message}");

    // Each of these holds ~2,500 members (~25 KB of JSON, ~250 KB in memory):
    // one fits in the bound, a second does not.
    let meta = tiny_members(2_500);
    let meta_text = serde_json::to_string(&meta).unwrap();
    let form = Form::new().field("id", "first").field("meta", &meta_text).file(Some("f"), None, b"tiny").finish();
    assert_eq!(upload_raw(&s, entity, form).await.status(), StatusCode::CREATED);
    let before = listed(&s, entity).await;
    let res = begin_resumable(&s, entity, "second", json!({ "subject": subject, "meta": meta })).await;
    let (status, code, body) = error_of(res).await;
    assert_eq!((status, code.as_str()), (StatusCode::CONFLICT, "TOO_MANY_ATTACHMENT_BYTES"), "{}", body["error"]);
    let message = body["error"]["message"].as_str().unwrap_or("");
    assert!(message.contains("max_inline_bytes_per_entity") && message.contains(&LIMIT.to_string()), "{message}");
    let form = Form::new().field("id", "third").field("meta", &meta_text).file(Some("t"), None, b"tiny").finish();
    let (status, code, body) = error_of(upload_raw(&s, entity, form).await).await;
    assert_eq!((status, code.as_str()), (StatusCode::CONFLICT, "TOO_MANY_ATTACHMENT_BYTES"), "{}", body["error"]);
    assert_eq!(listed(&s, entity).await, before, "the refusals wrote nothing");
    let counts = s.memory_counts().await;
    assert!(counts.view_bytes < LIMIT + (64 << 10), "{} bytes of views", counts.view_bytes);

    // Uploads with a small meta, or none, go on; a delete frees the bytes.
    let form = Form::new().field("id", "small").field("meta", r#"{"a":1}"#).file(Some("s"), None, b"tiny").finish();
    assert_eq!(upload_raw(&s, entity, form).await.status(), StatusCode::CREATED);
    let res = s.request(Method::DELETE, &format!("{}/attachments/first", api(entity))).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let form = Form::new().field("id", "third").field("meta", &meta_text).file(Some("t"), None, b"tiny").finish();
    assert_eq!(upload_raw(&s, entity, form).await.status(), StatusCode::CREATED);
}

/// A media type is kept in the row and served as `Content-Type`: at most
/// 255 bytes, as on the task face, from a form field, a part's header or a
/// resumable upload's body.
#[tokio::test]
async fn an_upload_with_a_media_type_over_255_bytes_is_400() {
    let s = TestServer::start().await;
    let entity = "/doc/mimes";
    spawn(&s, None, entity).await;
    let long = format!("text/plain; p={}", "x".repeat(300));
    let form = Form::new().field("id", "a").field("mimeType", &long).file(Some("a"), None, b"x").finish();
    assert_eq!(upload_raw(&s, entity, form).await.status(), StatusCode::BAD_REQUEST);
    let form = Form::new().field("id", "b").file(Some("b"), Some(&long), b"x").finish();
    assert_eq!(upload_raw(&s, entity, form).await.status(), StatusCode::BAD_REQUEST);
    let body = json!({ "subject": { "type": "context", "key": "test" }, "mimeType": long });
    assert_eq!(begin_resumable(&s, entity, "c", body).await.status(), StatusCode::BAD_REQUEST);
    assert!(listed(&s, entity).await.is_empty());
    let form = Form::new().field("id", "d").field("mimeType", "text/plain; charset=utf-8").file(None, None, b"x");
    assert_eq!(upload_raw(&s, entity, form.finish()).await.status(), StatusCode::CREATED);
}

const ALICE: &str = "user:alice";
const BOB: &str = "user:bob";

/// Sends `key` to `entity` as `who`; the status.
async fn send_as(s: &TestServer, who: &str, entity: &str, key: &str, payload: Value) -> StatusCode {
    as_principal(s.request(Method::POST, &format!("{}/send", api(entity))), Some(who))
        .json(&json!({ "key": key, "payload": payload }))
        .send()
        .await
        .expect("send answered")
        .status()
}

/// An entity's inbox keeps the keys of its latest messages only (a window of
/// `inbox_keys_per_entity`), and a key forgotten may be sent again, its row
/// replacing the first one where clients materialize the inbox. Past the
/// window the key forgotten is the oldest of the sender holding the most, so
/// a grantee with `write` cannot push the owner's keys out by sending, and
/// then replace the owner's message with its own: before, it sent as many
/// messages as the window holds, then the owner's key, and every
/// `MaterializedState` showed its message in place of the owner's. A view
/// rebuilt from the stream decides the same.
#[tokio::test]
async fn a_sender_cannot_push_another_senders_inbox_keys_out_of_the_window() {
    for rebuilt in [false, true] {
        let s = TestServer::start_with(|c| {
            c.inbox_keys_per_entity = 4;
            if rebuilt {
                c.view_cache_bytes = 1;
            }
        })
        .await;
        let entity = "/chat/window";
        spawn(&s, Some(ALICE), entity).await;
        let grant = json!({ "subject_kind": "principal", "subject_value": BOB, "permission": "write" });
        let res = as_principal(s.request(Method::POST, &format!("{}/grants", api(entity))), Some(ALICE))
            .json(&grant)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::CREATED);
        assert_eq!(send_as(&s, ALICE, entity, "order-1", json!("buy")).await, StatusCode::OK);
        for n in 0..10 {
            assert_eq!(send_as(&s, BOB, entity, &format!("fill-{n}"), json!(n)).await, StatusCode::OK);
        }
        assert_eq!(send_as(&s, BOB, entity, "order-1", json!("sell")).await, StatusCode::CONFLICT, "{rebuilt}");
        let inbox = materialize_as(&s, entity, Some(ALICE)).await;
        let row = &inbox[&("inbox".to_owned(), "order-1".to_owned())];
        assert_eq!((row["payload"].clone(), row["from"].clone()), (json!("buy"), json!("/principal/user%3Aalice")));
        // The window still turns over: bob's own oldest keys are forgotten.
        assert_eq!(send_as(&s, BOB, entity, "fill-0", json!("again")).await, StatusCode::OK, "{rebuilt}");
        assert_eq!(send_as(&s, BOB, entity, "fill-9", json!("again")).await, StatusCode::CONFLICT);
    }
}

/// Sends of one key at once: one is written, the others are 409
/// `DUPLICATE_KEY`. Before, each found the key free in the view (the others'
/// rows not committed yet) and most of them were written.
#[tokio::test]
async fn sends_of_one_key_at_once_write_it_once() {
    let s = TestServer::start().await;
    let entity = "/chat/at-once";
    spawn(&s, None, entity).await;
    for round in 0..10 {
        let key = format!("k{round}");
        let sends = (0..16).map(|n| {
            let (s, key) = (&s, key.clone());
            async move {
                s.request(Method::POST, &format!("{}/send", api(entity)))
                    .json(&json!({ "key": key, "payload": n }))
                    .send()
                    .await
                    .expect("send answered")
                    .status()
            }
        });
        let statuses = futures::future::join_all(sends).await;
        let written = statuses.iter().filter(|s| **s == StatusCode::OK).count();
        assert_eq!(written, 1, "round {round}: {statuses:?}");
        assert!(statuses.iter().all(|s| *s == StatusCode::OK || *s == StatusCode::CONFLICT), "{statuses:?}");
    }
    let rows = entity_support::rows(&s, &format!("{entity}/main")).await;
    assert_eq!(rows.iter().filter(|r| r["type"] == "inbox").count(), 10, "one row a key");
}

//! Where a fork may diverge. A JSON stream is a sequence of messages, so a
//! fork of one (a Durable Streams `PUT` with `Stream-Forked-From`, or an
//! entity fork with a `fork_pointer`) at an offset inside a message would
//! inherit half a message: it is refused with 400 and nothing is created
//! (PROTOCOL.md §6, "Fork offset validity", lets a server refuse such an
//! offset). A message boundary, the tail and any byte of a binary stream
//! stay valid fork points. Each scenario runs on the embedded store and on
//! PostgreSQL.

mod common;
mod entity_support;

use attache_storage::postgres::test_cluster::TestCluster;
use common::TestServer;
use entity_support::{api, error_of, spawn};
use reqwest::{Method, RequestBuilder, StatusCode};
use serde_json::{json, Value};

const JSON: &str = "application/json";
const TEXT: &str = "text/plain";

fn offset(position: u64) -> String {
    format!("0000000000000000_{position:016}")
}

fn position(offset: &str) -> u64 {
    offset.split_once('_').and_then(|(_, p)| p.parse().ok()).expect("a server-minted offset")
}

fn fork(ts: &TestServer, path: &str, source: &str, at: u64) -> RequestBuilder {
    ts.request(Method::PUT, path).header("stream-forked-from", source).header("stream-fork-offset", offset(at))
}

/// The messages of a JSON stream: every catch-up page must be a JSON array.
async fn messages(ts: &TestServer, path: &str) -> Vec<Value> {
    let bytes = ts.read_all(path).await;
    let text = String::from_utf8(bytes.to_vec()).expect("JSON is text");
    let mut out = Vec::new();
    for page in serde_json::Deserializer::from_str(&text).into_iter::<Vec<Value>>() {
        out.extend(page.unwrap_or_else(|e| panic!("{path} reads as JSON arrays ({e}): {text}")));
    }
    out
}

/// A refused fork: 400 saying why, and no stream at `path`.
async fn refused(ts: &TestServer, path: &str, req: RequestBuilder, why: &str) {
    let (status, code, body) = error_of(req.send().await.expect("PUT is answered")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{why}: {body}");
    assert_eq!(code, "INVALID_REQUEST", "{why}: {body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("inside a JSON message"), "{why}: {message}");
    assert_eq!(ts.head(path).await.status(), StatusCode::NOT_FOUND, "{why}: nothing at {path}");
}

/// `/j` holds four messages: `{"n":1}`, then `{"n":2}` and `{"n":3}` in one
/// append, then `{"n":4}`; `/jf` forks it after the first and adds `{"n":5}`.
/// A fork of either at an offset inside any of their messages (their own, or
/// an ancestor's read through the fork point) is 400, also with a sub-offset.
async fn a_json_fork_inside_a_message_is_400_and_creates_nothing(ts: &TestServer) {
    ts.create("/j", JSON).await;
    let first = position(&ts.append("/j", JSON, r#"{"n":1}"#).await);
    let batch = position(&ts.append("/j", JSON, r#"[{"n":2},{"n":3}]"#).await);
    let tail = position(&ts.append("/j", JSON, r#"{"n":4}"#).await);
    let res = fork(ts, "/jf", "/j", first).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    let jf_tail = position(&ts.append("/jf", JSON, r#"{"n":5}"#).await);
    let before = (ts.snapshot("/j").await, ts.snapshot("/jf").await);

    let inside_second_of_batch = batch - 3;
    for (source, at, why) in [
        ("/j", 1, "inside the first message"),
        ("/j", first + 2, "inside the first message of an append of two"),
        ("/j", inside_second_of_batch, "inside the second message of an append of two"),
        ("/j", tail - 1, "inside the last message"),
        ("/jf", 3, "inside a message the fork reads from its source"),
        ("/jf", first + 1, "inside the fork's own message"),
        ("/jf", jf_tail - 1, "just before the fork's tail"),
    ] {
        refused(ts, "/x", fork(ts, "/x", source, at), why).await;
        let sub = fork(ts, "/x", source, at).header("stream-fork-sub-offset", "1");
        refused(ts, "/x", sub, &format!("{why}, with a sub-offset")).await;
    }
    assert_eq!((ts.snapshot("/j").await, ts.snapshot("/jf").await), before, "the sources are unchanged");

    // The source gained no fork: deleting it removes it (404), not kept for forks (410).
    ts.create("/lone", JSON).await;
    let lone = position(&ts.append("/lone", JSON, r#"{"n":1}"#).await);
    refused(ts, "/x", fork(ts, "/x", "/lone", lone - 2), "inside the only message").await;
    let res = ts.request(Method::DELETE, "/lone").send().await.unwrap();
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    assert_eq!(ts.head("/lone").await.status(), StatusCode::NOT_FOUND, "no fork pins /lone");
}

/// Message boundaries, the start, the tail (named or implied), a boundary
/// refined by a sub-offset and the fork point of a fork are valid, and each
/// fork reads whole messages.
async fn a_json_fork_at_a_boundary_or_the_tail_reads_whole_messages(ts: &TestServer) {
    ts.create("/b", JSON).await;
    let first = position(&ts.append("/b", JSON, r#"{"n":1}"#).await);
    let batch = position(&ts.append("/b", JSON, r#"[{"n":2},{"n":3}]"#).await);
    let res = fork(ts, "/bf", "/b", first).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    ts.append("/bf", JSON, r#"{"n":5}"#).await;

    let n = |ns: &[u64]| ns.iter().map(|n| json!({ "n": n })).collect::<Vec<_>>();
    let cases = [
        ("/at0", fork(ts, "/at0", "/b", 0), n(&[])),
        ("/at1", fork(ts, "/at1", "/b", first), n(&[1])),
        ("/tail", fork(ts, "/tail", "/b", batch), n(&[1, 2, 3])),
        ("/implied", ts.request(Method::PUT, "/implied").header("stream-forked-from", "/b"), n(&[1, 2, 3])),
        ("/sub", fork(ts, "/sub", "/b", first).header("stream-fork-sub-offset", "1"), n(&[1, 2])),
        ("/chain", fork(ts, "/chain", "/bf", first), n(&[1])),
        ("/chain-own", fork(ts, "/chain-own", "/bf", first).header("stream-fork-sub-offset", "1"), n(&[1, 5])),
    ];
    for (path, req, expected) in cases {
        let res = req.send().await.unwrap();
        assert_eq!(res.status(), StatusCode::CREATED, "forking {path}");
        ts.append(path, JSON, r#"{"n":9}"#).await;
        let mut expected = expected;
        expected.push(json!({ "n": 9 }));
        assert_eq!(messages(ts, path).await, expected, "{path}");
    }
}

/// A binary stream has no messages: any byte offset up to the tail forks.
async fn a_binary_fork_at_any_byte_works(ts: &TestServer) {
    ts.create("/bin", TEXT).await;
    ts.append("/bin", TEXT, "hello ").await;
    ts.append("/bin", TEXT, "world").await;
    for (at, expected) in [(0, ""), (3, "hel"), (8, "hello wo"), (11, "hello world")] {
        let path = format!("/bin-{at}");
        let res = fork(ts, &path, "/bin", at).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::CREATED, "forking at {at}");
        assert_eq!(ts.read_all(&path).await, expected.as_bytes(), "fork at {at}");
    }
    let res = fork(ts, "/bin-sub", "/bin", 7).header("stream-fork-sub-offset", "2").send().await.unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(ts.read_all("/bin-sub").await, "hello wor".as_bytes());
}

/// An entity's main stream is JSON: a `fork_pointer` inside one of its rows
/// is 400 naming the pointer, and no entity or stream is created; a pointer
/// at a row boundary forks.
async fn an_entity_fork_pointer_inside_a_row_is_400_and_creates_nothing(ts: &TestServer) {
    let e = "/chat/src";
    spawn(ts, None, e).await;
    let res = ts
        .request(Method::POST, &format!("{e}/main"))
        .header("content-type", JSON)
        .body(r#"{"type":"text","key":"t1","value":{"text":"hi"},"headers":{"operation":"insert"}}"#)
        .send()
        .await
        .unwrap();
    assert!(res.status().is_success(), "append: {}", res.status());
    let tail = position(&ts.tail(&format!("{e}/main")).await);
    let fork_entity = |at: u64, id: &str| {
        ts.request(Method::POST, &format!("{}/fork", api(e)))
            .json(&json!({ "instance_id": id, "fork_pointer": { "offset": offset(at), "sub_offset": 0 } }))
    };
    for at in [1, tail - 2] {
        let (status, code, body) = error_of(fork_entity(at, "f").send().await.unwrap()).await;
        assert_eq!((status, code.as_str()), (StatusCode::BAD_REQUEST, "INVALID_REQUEST"), "at {at}: {body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("fork_pointer.offset") && message.contains("inside a message"), "{message}");
        let res = ts.request(Method::GET, &api("/chat/f")).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::NOT_FOUND, "no entity");
        assert_eq!(ts.head("/chat/f/main").await.status(), StatusCode::NOT_FOUND, "no main stream");
    }
    let res = fork_entity(tail, "f").send().await.unwrap();
    assert_eq!(res.status(), StatusCode::CREATED, "a pointer at the tail forks");
    let rows = messages(ts, "/chat/f/main").await;
    assert!(rows.iter().any(|r| r["key"] == "t1"), "the fork has the source's rows: {rows:?}");
}

/// A read stitches a fork's bytes from its lineage (the fork, its source,
/// that source's source, ...), at most 64 streams. A fork whose lineage would
/// hold more is 400 and nothing is made; every stream of a lineage of 64
/// reads whole. Before (session 15's attack pass), the 65th fork was made
/// (201) and every read of it, and of forks of it, answered 500.
async fn a_fork_past_64_streams_of_lineage_is_400_and_the_lineage_reads_whole(ts: &TestServer) {
    ts.create("/chain/0", TEXT).await;
    ts.append("/chain/0", TEXT, "root;").await;
    for i in 1..64 {
        let (path, source) = (format!("/chain/{i}"), format!("/chain/{}", i - 1));
        let res = ts.request(Method::PUT, &path).header("stream-forked-from", &source).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::CREATED, "fork {i}");
        ts.append(&path, TEXT, format!("{i};")).await;
    }
    let whole: String = std::iter::once("root;".to_owned()).chain((1..64).map(|i| format!("{i};"))).collect();
    assert_eq!(ts.read_all("/chain/63").await, whole.as_bytes(), "a lineage of 64 reads whole");
    let req = ts.request(Method::PUT, "/chain/64").header("stream-forked-from", "/chain/63");
    let (status, code, body) = error_of(req.send().await.unwrap()).await;
    assert_eq!((status, code.as_str()), (StatusCode::BAD_REQUEST, "INVALID_REQUEST"), "{body}");
    assert!(body["error"]["message"].as_str().unwrap_or_default().contains("at most 64 streams"), "{body}");
    assert_eq!(ts.head("/chain/64").await.status(), StatusCode::NOT_FOUND, "nothing made");
    let res = ts.request(Method::PUT, "/chain/x").header("stream-forked-from", "/chain/5").send().await.unwrap();
    assert_eq!(res.status(), StatusCode::CREATED, "a fork nearer the root is made");
}

#[tokio::test]
async fn embedded_a_fork_past_64_streams_of_lineage_is_400_and_the_lineage_reads_whole() {
    a_fork_past_64_streams_of_lineage_is_400_and_the_lineage_reads_whole(&TestServer::start().await).await;
}

async fn postgres() -> Option<(TestCluster, TestServer)> {
    TestServer::start_postgres(|_| {}).await
}

#[tokio::test]
async fn embedded_a_json_fork_inside_a_message_is_400_and_creates_nothing() {
    a_json_fork_inside_a_message_is_400_and_creates_nothing(&TestServer::start().await).await;
}

#[tokio::test]
async fn embedded_a_json_fork_at_a_boundary_or_the_tail_reads_whole_messages() {
    a_json_fork_at_a_boundary_or_the_tail_reads_whole_messages(&TestServer::start().await).await;
}

#[tokio::test]
async fn embedded_a_binary_fork_at_any_byte_works() {
    a_binary_fork_at_any_byte_works(&TestServer::start().await).await;
}

#[tokio::test]
async fn embedded_an_entity_fork_pointer_inside_a_row_is_400_and_creates_nothing() {
    an_entity_fork_pointer_inside_a_row_is_400_and_creates_nothing(&TestServer::start().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_forks_diverge_only_between_json_messages_or_skip_without_postgres() {
    let Some((_cluster, ts)) = postgres().await else { return };
    a_json_fork_inside_a_message_is_400_and_creates_nothing(&ts).await;
    a_json_fork_at_a_boundary_or_the_tail_reads_whole_messages(&ts).await;
    a_binary_fork_at_any_byte_works(&ts).await;
    an_entity_fork_pointer_inside_a_row_is_400_and_creates_nothing(&ts).await;
    a_fork_past_64_streams_of_lineage_is_400_and_the_lineage_reads_whole(&ts).await;
}

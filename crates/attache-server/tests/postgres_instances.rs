//! Two attache servers over one PostgreSQL database and one object store
//! serve the same streams: an append through one wakes a long-poll waiting
//! on the other, and both read the same bytes. Runs on a throwaway
//! PostgreSQL cluster (or `ATTACHE_TEST_PG_URL`); without any PostgreSQL
//! installed it prints why and passes.

mod common;
mod entity_support;
mod task_helpers;

use std::time::Duration;

use attache_server::pause::{
    Pauses, ATTACHMENT_DELETE, ENTITY_WRITE, FINALIZE_WRITE, INBOX_WRITE, SETTLE_WRITE, TASK_ATTACHMENT_WRITE,
    TASK_WRITE, UPLOAD_COMMIT, UPLOAD_SETTLED,
};
use attache_server::{ServerConfig, StoreConfig};
use attache_storage::postgres::test_cluster::TestCluster;
use common::*;
use reqwest::{Method, StatusCode};

const JSON: &str = "application/json";

/// Two servers over one fresh database and one object store (a throwaway
/// cluster, or `ATTACHE_TEST_PG_URL`); `None` (after saying why) without PostgreSQL.
struct Instances {
    a: TestServer,
    b: TestServer,
    _objects: tempfile::TempDir,
    _cluster: TestCluster,
}

async fn two_instances() -> Option<Instances> {
    two_instances_pausing(None).await
}

/// [`two_instances`], with `pauses` armable on the first (`a`).
async fn two_instances_pausing(pauses: Option<Pauses>) -> Option<Instances> {
    two_instances_with(pauses, |_| {}).await
}

/// [`two_instances_pausing`], with `tweak_b` adjusting the second's configuration.
async fn two_instances_with(pauses: Option<Pauses>, tweak_b: fn(&mut ServerConfig)) -> Option<Instances> {
    let cluster = match TestCluster::start(false) {
        Ok(c) => c,
        Err(why) => {
            attache_storage::postgres::test_cluster::missing_service("PostgreSQL", &why);
            return None;
        }
    };
    let url = cluster.fresh_database().await.expect("a test database");
    let objects = tempfile::tempdir().unwrap();
    let store = StoreConfig::Postgres { url, object_store_url: Some(format!("file://{}", objects.path().display())) };
    let start = |store: StoreConfig, pauses: Option<Pauses>, tweak: fn(&mut ServerConfig)| {
        TestServer::start_with(move |c| {
            c.store = store;
            c.long_poll_timeout = Duration::from_secs(20);
            c.pauses = pauses;
            tweak(c);
        })
    };
    let a = start(store.clone(), pauses, |_| {}).await;
    let b = start(store, None, tweak_b).await;
    Some(Instances { a, b, _objects: objects, _cluster: cluster })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_over_one_database_serve_the_same_streams_or_skip_without_postgres() {
    let Some(Instances { a, b, _objects, _cluster }) = two_instances().await else { return };

    a.create("/shared/chat", JSON).await;
    let tail = a.append("/shared/chat", JSON, r#"{"from":"a","n":1}"#).await;
    // Another instance learns of an append through PostgreSQL's NOTIFY, a few
    // milliseconds after it is acknowledged: b sees the tail soon, not at once.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let seen = b.tail("/shared/chat").await;
        if seen == tail {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "b sees a's append within 5 s (still at {seen}, a at {tail})");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A long-poll on b, at the tail; the append goes through a.
    let waiting = tokio::spawn(
        b.request(Method::GET, "/shared/chat").query(&[("offset", tail.as_str()), ("live", "long-poll")]).send(),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let new_tail = a.append("/shared/chat", JSON, r#"{"from":"a","n":2}"#).await;
    let res = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("b's long-poll answers soon after a's append")
        .unwrap()
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(header(&res, NEXT_OFFSET), Some(new_tail));
    assert_eq!(res.bytes().await.unwrap(), r#"[{"from":"a","n":2}]"#);

    // Appends through both, then both read the same bytes.
    for i in 0..10 {
        let s = if i % 2 == 0 { &a } else { &b };
        s.append("/shared/chat", JSON, format!(r#"{{"n":{}}}"#, i + 3)).await;
    }
    let on_a = a.read_all("/shared/chat").await;
    let on_b = b.read_all("/shared/chat").await;
    let on_b = if on_b == on_a {
        on_b
    } else {
        // The last append through a reaches b's cached tail by NOTIFY, as above.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let seen = b.read_all("/shared/chat").await;
            if seen == on_a || tokio::time::Instant::now() >= deadline {
                break seen;
            }
        }
    };
    assert_eq!(on_a, on_b);
    let messages: Vec<serde_json::Value> = serde_json::from_slice(&on_a).unwrap();
    assert_eq!(messages.len(), 12);

    // A delete through b is a 404 through a.
    let res = b.request(Method::DELETE, "/shared/chat").send().await.unwrap();
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    let mut gone = false;
    for _ in 0..50 {
        if a.head("/shared/chat").await.status() == StatusCode::NOT_FOUND {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(gone, "a hears of b's delete");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_through_one_instance_leaves_no_view_of_the_old_life_on_another() {
    let Some(Instances { a, b, _objects, _cluster }) = two_instances().await else { return };
    let e = "/chat/lives";
    entity_support::spawn(&a, None, e).await;
    entity_support::upload(&a, e, "old-life", "text/plain", b"the old life's attachment").await;
    assert!(entity_support::listed(&a, e).await.contains_key("old-life"), "a has built its view");

    // Purged and spawned again through b, with enough rows that the new
    // stream is longer than what a's view applied.
    let res = b.request(Method::DELETE, &format!("{}?purge=true", entity_support::api(e))).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    entity_support::spawn(&b, None, e).await;
    for n in 0..20 {
        let res = b
            .request(Method::POST, &format!("{}/send", entity_support::api(e)))
            .json(&serde_json::json!({ "payload": { "n": n, "pad": "x".repeat(200) } }))
            .send()
            .await
            .unwrap();
        assert!(res.status().is_success(), "send {n}: {}", res.status());
    }
    let listed = entity_support::listed(&a, e).await;
    assert!(listed.is_empty(), "a shows the new life's attachments, none of the old: {listed:?}");
}

/// Bytes and files under `dir`.
fn disk_use(dir: &std::path::Path) -> (u64, usize) {
    let (mut bytes, mut files) = (0, 0);
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let meta = entry.metadata().unwrap();
            if meta.is_dir() {
                todo.push(entry.path());
            } else {
                bytes += meta.len();
                files += 1;
            }
        }
    }
    (bytes, files)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranged_attachment_reads_on_another_instance_fetch_only_the_range() {
    let Some(Instances { a, b, _objects, _cluster }) = two_instances().await else { return };
    let e = "/chat/ranges";
    entity_support::spawn(&a, None, e).await;
    let bytes = entity_support::pattern(3 << 20, 7);
    entity_support::upload(&a, e, "big", "application/octet-stream", &bytes).await;
    let path = format!("{}/attachments/big", entity_support::api(e));
    let len = bytes.len();
    let cache_b = b.config.data_dir.join("blob-cache");

    for (range, start, end) in [
        ("bytes=0-99".to_owned(), 0, 99),
        (format!("bytes={}-{}", len / 2, len / 2 + 300_000), len / 2, len / 2 + 300_000),
        ("bytes=-10".to_owned(), len - 10, len - 1),
        (format!("bytes={}-{}", len - 5, len + 1000), len - 5, len - 1),
    ] {
        let res = b.request(Method::GET, &path).header("range", &range).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::PARTIAL_CONTENT, "{range}");
        assert_eq!(header(&res, "content-range"), Some(format!("bytes {start}-{end}/{len}")), "{range}");
        assert_eq!(header(&res, "content-length"), Some((end - start + 1).to_string()), "{range}");
        assert!(res.bytes().await.unwrap() == bytes[start..=end], "{range}: the bytes written");
        assert_eq!(disk_use(&cache_b), (0, 0), "{range}: a partial read copies nothing to b's disk");
    }
    let res = b.request(Method::GET, &path).header("range", format!("bytes={len}-")).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(header(&res, "content-range"), Some(format!("bytes */{len}")));
    let res = b.request(Method::HEAD, &path).header("range", "bytes=10-19").send().await.unwrap();
    assert_eq!(res.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(header(&res, "content-length").as_deref(), Some("10"));

    let res = b.request(Method::GET, &path).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(res.bytes().await.unwrap() == bytes, "the whole attachment, from the object store");
    let res = a.request(Method::GET, &path).header("range", "bytes=1000-1999").send().await.unwrap();
    assert_eq!(res.status(), StatusCode::PARTIAL_CONTENT);
    assert!(res.bytes().await.unwrap() == bytes[1000..2000], "a range on the uploading instance");
}

/// An upload in flight on one instance is not an interrupted one to another
/// instance: an upload of the same id through the other (a client's retry
/// through another instance, or someone else) is refused 409 and changes
/// nothing; the first completes with its own bytes. Before, the second
/// instance took the pending row for one left by a crash: it marked it
/// failed, uploaded its own bytes (201), and the first upload's refusal
/// (409: the path was taken) then retracted the row, so the manifest lost
/// the attachment a 201 had been answered for, and its stream was orphaned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_in_flight_on_one_instance_keeps_its_id_against_an_upload_through_another() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Some(Instances { a, b, _objects, _cluster }) = two_instances().await else { return };
    let e = "/chat/racing";
    entity_support::spawn(&a, None, e).await;
    let first = entity_support::pattern(100_000, 1);
    let second = entity_support::pattern(50_000, 2);
    // The id and subject come before the file: the pending row is written at once.
    let form = entity_support::Form::new()
        .field("subject", entity_support::DEFAULT_SUBJECT)
        .field("id", "same")
        .file(Some("f"), Some("application/octet-stream"), &first)
        .finish();
    let (sent, rest) = form.split_at(form.len() - 60_000);
    let mut conn = tokio::net::TcpStream::connect(a.url.trim_start_matches("http://")).await.unwrap();
    let head = format!(
        "POST {}/attachments HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: {}\r\ncontent-length: {}\r\n\r\n",
        entity_support::api(e),
        entity_support::Form::content_type(),
        form.len()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(sent).await.unwrap();
    entity_support::eventually(Duration::from_secs(10), "b sees a's pending row", || async {
        let m = entity_support::listed(&b, e).await;
        m.get("same").filter(|r| r["status"] == "pending").map(|_| ())
    })
    .await;

    let form = entity_support::Form::new().field("id", "same").file(Some("g"), None, &second).finish();
    let res = entity_support::upload_raw(&b, e, form).await;
    let (status, code, _) = entity_support::error_of(res).await;
    assert_eq!((status, code.as_str()), (StatusCode::CONFLICT, "DUPLICATE_ID"), "the id is a's upload's");

    conn.write_all(rest).await.unwrap();
    let mut answer = Vec::new();
    let mut buf = vec![0u8; 8192];
    while !String::from_utf8_lossy(&answer).contains("\"attachment\"") {
        let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "a's upload answered: {}", String::from_utf8_lossy(&answer));
        answer.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 201"), "{}", String::from_utf8_lossy(&answer));
    for server in [&a, &b] {
        let row = entity_support::eventually(Duration::from_secs(10), "the row is complete", || async {
            entity_support::listed(server, e).await.get("same").filter(|r| r["status"] == "complete").cloned()
        })
        .await;
        assert_eq!(row["sha256"], entity_support::sha256_hex(&first));
        let (status, bytes) = entity_support::get_bytes(server, e, "same").await;
        assert_eq!(status, StatusCode::OK);
        assert!(bytes == first, "a's bytes");
    }
}

/// The delete rule holds across instances: while an upload streams through
/// one instance, a `DELETE` of it through another (which does not hold its
/// reservation, only sees its young `pending` row) is 409
/// `UPLOAD_IN_PROGRESS`; the upload completes; a `DELETE` after it removes
/// the row and the bytes for both. Before, the `DELETE` answered 200 and the
/// upload's `complete` row brought the attachment back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_through_one_instance_of_an_upload_streaming_through_another_is_409() {
    let Some(Instances { a, b, _objects, _cluster }) = two_instances().await else { return };
    let e = "/chat/delete-racing";
    entity_support::spawn(&a, None, e).await;
    let bytes = entity_support::pattern(200_000, 3);
    let stalled = entity_support::StalledUpload::start(&a, None, e, &[("id", "doc")], &bytes).await;
    entity_support::eventually(Duration::from_secs(10), "b sees a's pending row", || async {
        let m = entity_support::listed(&b, e).await;
        m.get("doc").filter(|r| r["status"] == "pending").map(|_| ())
    })
    .await;
    let path = format!("{}/attachments/doc", entity_support::api(e));
    let res = b.request(Method::DELETE, &path).send().await.unwrap();
    let (status, code, body) = entity_support::error_of(res).await;
    assert_eq!((status, code.as_str()), (StatusCode::CONFLICT, "UPLOAD_IN_PROGRESS"), "{body}");

    let (status, answer) = stalled.finish().await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    entity_support::eventually(Duration::from_secs(10), "b sees the complete row", || async {
        entity_support::listed(&b, e).await.get("doc").filter(|r| r["status"] == "complete").map(|_| ())
    })
    .await;
    assert_eq!(b.request(Method::DELETE, &path).send().await.unwrap().status(), StatusCode::OK);
    for server in [&a, &b] {
        entity_support::eventually(Duration::from_secs(10), "the attachment is gone", || async {
            (!entity_support::listed(server, e).await.contains_key("doc")).then_some(())
        })
        .await;
        assert_eq!(entity_support::get_bytes(server, e, "doc").await.0, StatusCode::NOT_FOUND);
    }
    // Another instance learns of the stream's delete through NOTIFY, a moment later.
    for server in [&a, &b] {
        entity_support::eventually(Duration::from_secs(10), "no stream at the attachment's path", || async {
            (server.head(&format!("{e}/attachments/doc")).await.status() == StatusCode::NOT_FOUND).then_some(())
        })
        .await;
    }
}

/// An upload of `id` on `entity` through `server` that breaks off mid-file:
/// its row ends `failed` (an attempt an upload may take the id over from).
async fn failed_attempt(server: &TestServer, entity: &str, id: &str) {
    let stalled =
        entity_support::StalledUpload::start(server, None, entity, &[("id", id)], &entity_support::pattern(100_000, 9))
            .await;
    entity_support::eventually(Duration::from_secs(10), "the attempt's pending row", || async {
        entity_support::listed(server, entity).await.get(id).filter(|r| r["status"] == "pending").map(|_| ())
    })
    .await;
    drop(stalled);
    entity_support::eventually(Duration::from_secs(10), "the attempt to end failed", || async {
        entity_support::listed(server, entity).await.get(id).filter(|r| r["status"] == "failed").map(|_| ())
    })
    .await;
}

/// A delete is written only against what it read, whatever another instance
/// did since. A `DELETE` of a `failed` attachment through `a`, held between
/// its reading the row (and no stream at the address) and its write, while
/// a resumable upload of the same id begins through `b` (its `pending` row,
/// its open stream): the delete reads again and answers 409
/// `UPLOAD_IN_PROGRESS`, and the upload completes with its bytes on both
/// instances. Before, the delete answered 200 and its row took away the new
/// upload's `pending` row: the upload `b` had answered 201 for could take
/// no more bytes (409), its open stream named by no row until it expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_held_across_a_new_upload_through_another_instance_reads_again_and_is_409() {
    let pauses = Pauses::default();
    let Some(Instances { a, b, _objects, _cluster }) = two_instances_pausing(Some(pauses.clone())).await else {
        return;
    };
    let e = "/chat/delete-meets-new-upload";
    entity_support::spawn(&a, None, e).await;
    failed_attempt(&a, e, "doc").await;

    let held = pauses.arm(ATTACHMENT_DELETE);
    let path = format!("{}/attachments/doc", entity_support::api(e));
    let delete = tokio::spawn(a.request(Method::DELETE, &path).send());
    held.reached().await;

    let res =
        b.request(Method::PUT, &path).json(&serde_json::json!({ "subject": { "type": "context", "key": "test" } }));
    let res = res.send().await.unwrap();
    assert_eq!(res.status(), StatusCode::CREATED, "b begins a new upload of the failed id");
    entity_support::eventually(Duration::from_secs(10), "a sees b's pending row", || async {
        entity_support::listed(&a, e).await.get("doc").filter(|r| r["status"] == "pending").map(|_| ())
    })
    .await;
    held.release();
    let res = delete.await.unwrap().unwrap();
    let (status, code, body) = entity_support::error_of(res).await;
    assert_eq!((status, code.as_str()), (StatusCode::CONFLICT, "UPLOAD_IN_PROGRESS"), "{body}");

    let bytes = entity_support::pattern(70_000, 4);
    let res = b
        .request(Method::POST, &format!("{e}/attachments/doc"))
        .header("content-type", "application/octet-stream")
        .header("stream-closed", "true")
        .body(bytes.clone())
        .send()
        .await
        .unwrap();
    assert!(res.status().is_success(), "the upload's bytes and close: {}", res.status());
    for server in [&a, &b] {
        let row = entity_support::eventually(Duration::from_secs(10), "the new upload is complete", || async {
            entity_support::listed(server, e).await.get("doc").filter(|r| r["status"] == "complete").cloned()
        })
        .await;
        assert_eq!(row["sha256"], entity_support::sha256_hex(&bytes));
        let (status, got) = entity_support::get_bytes(server, e, "doc").await;
        assert_eq!(status, StatusCode::OK);
        let first_difference = got.iter().zip(&bytes).position(|(g, w)| g != w);
        assert!(
            got == bytes,
            "the new upload's bytes: got {} bytes, want {}, first difference at {first_difference:?}",
            got.len(),
            bytes.len()
        );
    }
}

/// The `pending` row of an upload is written only against a view in which
/// its id is free. An upload through `a` that found the id free (a `failed`
/// attempt), held just before writing its `pending` row, while an upload of
/// the same id through `b` writes its own: `a`'s reads again and is refused
/// 409 `DUPLICATE_ID`, writing nothing; `b`'s completes, row and bytes.
/// Before, `a` wrote its row over `b`'s and won the stream (201); `b`'s
/// commit then met `a`'s stream (409) and retracted the id's row: the
/// manifest lost the attachment `a` had answered 201 for, its bytes left
/// with no row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_held_before_its_pending_row_yields_to_one_begun_through_another_instance() {
    let pauses = Pauses::default();
    let Some(Instances { a, b, _objects, _cluster }) = two_instances_pausing(Some(pauses.clone())).await else {
        return;
    };
    let e = "/chat/uploads-racing";
    entity_support::spawn(&a, None, e).await;
    failed_attempt(&a, e, "doc").await;

    let first = entity_support::pattern(30_000, 1);
    let form = entity_support::Form::new()
        .field("subject", entity_support::DEFAULT_SUBJECT)
        .field("id", "doc")
        .file(Some("f"), None, &first)
        .finish();
    let held = pauses.arm(ENTITY_WRITE);
    let through_a = {
        let a = a.request(Method::POST, &format!("{}/attachments", entity_support::api(e)));
        tokio::spawn(a.header("content-type", entity_support::Form::content_type()).body(form).send())
    };
    held.reached().await;

    // Past the lean path's whole-body read (64 KiB), so b streams it and writes its pending row at once.
    let second = entity_support::pattern(200_000, 2);
    let stalled = entity_support::StalledUpload::start(&b, None, e, &[("id", "doc")], &second).await;
    entity_support::eventually(Duration::from_secs(10), "a sees b's pending row", || async {
        let row = entity_support::listed(&a, e).await.get("doc").cloned();
        row.filter(|r| r["status"] == "pending").map(|_| ())
    })
    .await;
    held.release();
    let (status, code, body) = entity_support::error_of(through_a.await.unwrap().unwrap()).await;
    assert_eq!((status, code.as_str()), (StatusCode::CONFLICT, "DUPLICATE_ID"), "{body}");

    let (status, answer) = stalled.finish().await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    for server in [&a, &b] {
        let row = entity_support::eventually(Duration::from_secs(10), "b's upload is complete", || async {
            entity_support::listed(server, e).await.get("doc").filter(|r| r["status"] == "complete").cloned()
        })
        .await;
        assert_eq!(row["sha256"], entity_support::sha256_hex(&second));
        let (status, got) = entity_support::get_bytes(server, e, "doc").await;
        assert_eq!(status, StatusCode::OK);
        assert!(got == second, "b's bytes");
    }
}

/// `b` takes a `pending` row for one an interrupted upload left once it is
/// older than this: as if `a`'s upload had been running for a day.
fn expiring_at_once(c: &mut ServerConfig) {
    c.upload_expiry = Duration::from_millis(1);
}

/// An upload's own rows are written only over its own row. An upload
/// through `a`, held after its `pending` row and before its commit, outlives
/// the upload expiry of `b`, which takes the id over for an upload of its
/// own (201). `a`'s commit then meets `b`'s stream (409 `DUPLICATE_ID`),
/// and its refusal's retraction finds that the id's row is no longer its
/// own: `b`'s attachment keeps its row and its bytes on both instances.
/// Before, the retraction deleted whatever row the id had: `b`'s 201'd
/// attachment was left with bytes and no row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_upload_retracts_only_its_own_row_not_one_another_instance_wrote_since() {
    let pauses = Pauses::default();
    let Some(Instances { a, b, _objects, _cluster }) = two_instances_with(Some(pauses.clone()), expiring_at_once).await
    else {
        return;
    };
    let e = "/chat/retract-only-mine";
    entity_support::spawn(&a, None, e).await;
    let first = entity_support::pattern(20_000, 1);
    let form = entity_support::Form::new()
        .field("subject", entity_support::DEFAULT_SUBJECT)
        .field("id", "doc")
        .file(Some("f"), None, &first)
        .finish();
    let at_row = pauses.arm(ENTITY_WRITE);
    let through_a = {
        let a = a.request(Method::POST, &format!("{}/attachments", entity_support::api(e)));
        tokio::spawn(a.header("content-type", entity_support::Form::content_type()).body(form).send())
    };
    at_row.reached().await;
    let at_commit = pauses.arm(ENTITY_WRITE);
    at_row.release();
    at_commit.reached().await;
    entity_support::eventually(Duration::from_secs(10), "b sees a's pending row", || async {
        entity_support::listed(&b, e).await.get("doc").filter(|r| r["status"] == "pending").map(|_| ())
    })
    .await;

    let second = entity_support::pattern(30_000, 2);
    let form = entity_support::Form::new().field("id", "doc").file(Some("g"), None, &second).finish();
    let res = entity_support::upload_raw(&b, e, form).await;
    assert_eq!(res.status(), StatusCode::CREATED, "b takes the id of an upload older than its expiry");
    at_commit.release();
    let (status, code, body) = entity_support::error_of(through_a.await.unwrap().unwrap()).await;
    assert_eq!((status, code.as_str()), (StatusCode::CONFLICT, "DUPLICATE_ID"), "{body}");

    for server in [&a, &b] {
        let row = entity_support::eventually(Duration::from_secs(10), "b's upload is complete", || async {
            entity_support::listed(server, e).await.get("doc").filter(|r| r["status"] == "complete").cloned()
        })
        .await;
        assert_eq!(row["sha256"], entity_support::sha256_hex(&second));
        let (status, got) = entity_support::get_bytes(server, e, "doc").await;
        assert_eq!(status, StatusCode::OK);
        assert!(got == second, "b's bytes");
    }
}

/// A multipart upload's blob stream and `complete` row are written only
/// while the id's row is still the upload's own. An upload through `a`,
/// held after reading that its `pending` row is still there and before its
/// commit, outlives the upload expiry of `b`, where the attachment is
/// deleted (`b` settles the abandoned-looking upload as `failed`, then
/// deletes it: 200). `a`'s commit then finds that another write of the id
/// came since and is 409 `DUPLICATE_ID`, storing nothing: the attachment
/// stays deleted, row and bytes, on both instances. Before, the commit
/// (unguarded) made the stream and wrote the `complete` row after the
/// delete's 200: the attachment came back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multipart_commit_held_across_a_delete_through_another_instance_brings_nothing_back() {
    let pauses = Pauses::default();
    let Some(Instances { a, b, _objects, _cluster }) = two_instances_with(Some(pauses.clone()), expiring_at_once).await
    else {
        return;
    };
    let e = "/chat/commit-meets-delete";
    entity_support::spawn(&a, None, e).await;
    let bytes = entity_support::pattern(20_000, 5);
    let form = entity_support::Form::new()
        .field("subject", entity_support::DEFAULT_SUBJECT)
        .field("id", "doc")
        .file(Some("f"), None, &bytes)
        .finish();
    let held = pauses.arm(UPLOAD_COMMIT);
    let through_a = {
        let a = a.request(Method::POST, &format!("{}/attachments", entity_support::api(e)));
        tokio::spawn(a.header("content-type", entity_support::Form::content_type()).body(form).send())
    };
    held.reached().await;
    entity_support::eventually(Duration::from_secs(10), "b sees a's pending row", || async {
        entity_support::listed(&b, e).await.get("doc").filter(|r| r["status"] == "pending").map(|_| ())
    })
    .await;
    let res = b.request(Method::DELETE, &format!("{}/attachments/doc", entity_support::api(e))).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK, "b deletes an upload older than its expiry");
    held.release();
    let (status, code, body) = entity_support::error_of(through_a.await.unwrap().unwrap()).await;
    assert_eq!((status, code.as_str()), (StatusCode::CONFLICT, "DUPLICATE_ID"), "{body}");

    for server in [&a, &b] {
        entity_support::eventually(Duration::from_secs(10), "the attachment stays deleted", || async {
            (!entity_support::listed(server, e).await.contains_key("doc")).then_some(())
        })
        .await;
        assert_eq!(entity_support::get_bytes(server, e, "doc").await.0, StatusCode::NOT_FOUND);
        let head = server.head(&format!("{e}/attachments/doc")).await;
        assert_eq!(head.status(), StatusCode::NOT_FOUND, "no stream at the attachment's address");
    }
}

/// The settling of an interrupted upload writes its `failed` row only while
/// no stream is at the attachment's address and nothing else wrote the id:
/// an upload through `a` cancelled before its commit is settled in the
/// background, held between finding no stream and writing; meanwhile `b`
/// (the upload being older than its expiry) takes the id and stores a new
/// upload (201). The settling then reads again and leaves `b`'s attachment
/// alone. Before, it had written `failed` and then deleted the stream at
/// the path: `b`'s 201'd attachment lost its bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settling_held_across_a_new_upload_through_another_instance_leaves_its_bytes() {
    use tokio::io::AsyncWriteExt;
    let pauses = Pauses::default();
    let Some(Instances { a, b, _objects, _cluster }) = two_instances_with(Some(pauses.clone()), expiring_at_once).await
    else {
        return;
    };
    let e = "/chat/settle-meets-new-upload";
    entity_support::spawn(&a, None, e).await;
    // Small enough for the lean path, which cancels a request whose client leaves.
    let form = entity_support::Form::new()
        .field("subject", entity_support::DEFAULT_SUBJECT)
        .field("id", "doc")
        .file(Some("f"), None, &entity_support::pattern(10_000, 1))
        .finish();
    let head = format!(
        "POST {}/attachments HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: {}\r\ncontent-length: {}\r\n\r\n",
        entity_support::api(e),
        entity_support::Form::content_type(),
        form.len()
    );
    let at_row = pauses.arm(ENTITY_WRITE);
    let mut conn = tokio::net::TcpStream::connect(a.url.trim_start_matches("http://")).await.unwrap();
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(&form).await.unwrap();
    at_row.reached().await;
    let at_commit = pauses.arm(ENTITY_WRITE);
    at_row.release();
    at_commit.reached().await;

    // The client goes away: the row is settled in the background, held before its write.
    let at_settle = pauses.arm(SETTLE_WRITE);
    let settled = pauses.arm(UPLOAD_SETTLED);
    drop(conn);
    at_settle.reached().await;
    at_commit.release();

    let second = entity_support::pattern(30_000, 2);
    let form = entity_support::Form::new().field("id", "doc").file(Some("g"), None, &second).finish();
    let res = entity_support::upload_raw(&b, e, form).await;
    assert_eq!(res.status(), StatusCode::CREATED, "b takes the id of an upload older than its expiry");
    at_settle.release();
    settled.reached().await;
    settled.release();

    for server in [&a, &b] {
        let row = entity_support::eventually(Duration::from_secs(10), "b's upload is complete", || async {
            entity_support::listed(server, e).await.get("doc").filter(|r| r["status"] == "complete").cloned()
        })
        .await;
        assert_eq!(row["sha256"], entity_support::sha256_hex(&second));
        let (status, got) = entity_support::get_bytes(server, e, "doc").await;
        assert_eq!(status, StatusCode::OK, "b's attachment keeps its bytes");
        assert!(got == second, "b's bytes");
    }
}

/// A resumable upload's `complete` row is written only against the
/// `pending` row its closing read: the close through `a`, held between
/// hashing the bytes and writing the row, while a `DELETE` through `b`
/// completes the attachment and deletes it (200). The close then reads
/// again and writes nothing: the attachment stays deleted on both
/// instances. Before, the close wrote its `complete` row after the delete:
/// the attachment was listed `complete` with its bytes gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumable_close_held_across_a_delete_through_another_instance_brings_nothing_back() {
    let pauses = Pauses::default();
    let Some(Instances { a, b, _objects, _cluster }) = two_instances_pausing(Some(pauses.clone())).await else {
        return;
    };
    let e = "/chat/close-meets-delete";
    entity_support::spawn(&a, None, e).await;
    let path = format!("{}/attachments/doc", entity_support::api(e));
    let res =
        a.request(Method::PUT, &path).json(&serde_json::json!({ "subject": { "type": "context", "key": "test" } }));
    assert_eq!(res.send().await.unwrap().status(), StatusCode::CREATED);

    let held = pauses.arm(FINALIZE_WRITE);
    let close = tokio::spawn(
        a.request(Method::POST, &format!("{e}/attachments/doc"))
            .header("content-type", "application/octet-stream")
            .header("stream-closed", "true")
            .body(entity_support::pattern(5_000, 3))
            .send(),
    );
    held.reached().await;
    entity_support::eventually(Duration::from_secs(10), "b sees the closed stream", || async {
        (b.head(&format!("{e}/attachments/doc")).await.headers().get(CLOSED).is_some()).then_some(())
    })
    .await;
    let res = b.request(Method::DELETE, &path).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK, "b completes the closed upload and deletes it");
    held.release();
    let res = close.await.unwrap().unwrap();
    assert!(res.status().is_success(), "the close was committed: {}", res.status());

    for server in [&a, &b] {
        entity_support::eventually(Duration::from_secs(10), "the attachment stays deleted", || async {
            (!entity_support::listed(server, e).await.contains_key("doc")).then_some(())
        })
        .await;
        assert_eq!(entity_support::get_bytes(server, e, "doc").await.0, StatusCode::NOT_FOUND);
    }
}

/// The attachment ids the manifest rows of a task's main stream name for `key`.
async fn task_attachment_ids(server: &TestServer, task: &str, key: &str) -> std::collections::BTreeSet<String> {
    let rows = entity_support::rows_as(server, &format!("/task/{task}/main"), Some(task_helpers::ALICE)).await;
    rows.iter()
        .filter(|r| r["type"] == "manifest" && r["value"]["name"] == key)
        .filter_map(|r| r["value"]["id"].as_str().map(str::to_owned))
        .collect()
}

/// `task.create_attachment` of one new key through two instances at once:
/// `a`'s, held between deciding from its view (the key is free) and its
/// write, while `b` creates the key, reads again and becomes a replacement
/// of `b`'s attachment (same id). One attachment under the key, with `a`'s
/// value, the same through both instances. Before, both wrote an `insert`
/// with an id of their own: two attachments named by one key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_attachment_creations_of_one_key_through_two_instances_make_one_attachment() {
    use task_helpers::{create_task, ok, ALICE};
    let pauses = Pauses::default();
    let Some(Instances { a, b, _objects, _cluster }) = two_instances_pausing(Some(pauses.clone())).await else {
        return;
    };
    let task = create_task(&a, ALICE, "one key, two instances", 1).await;
    let params = |from: &str| {
        serde_json::json!({
            "jsonrpc": "2.0", "method": "task.create_attachment", "id": 1,
            "params": { "taskId": task, "key": "result", "type": "json", "value": { "from": from } },
        })
    };
    let held = pauses.arm(TASK_ATTACHMENT_WRITE);
    let first = tokio::spawn(
        a.client
            .post(a.url("/rpc"))
            .header("electric-principal", ALICE)
            .header("content-type", "application/json")
            .body(params("a").to_string())
            .send(),
    );
    held.reached().await;
    let by_b = ok(&b, ALICE, "task.create_attachment", params("b")["params"].clone()).await;
    held.release();
    let res: serde_json::Value = first.await.unwrap().unwrap().json().await.unwrap();
    let by_a = res.get("result").unwrap_or_else(|| panic!("a's create succeeds: {res}"));
    assert_eq!(by_a["id"], by_b["id"], "a's write became a replacement of b's attachment");
    for server in [&a, &b] {
        let ids = entity_support::eventually(Duration::from_secs(10), "both rows reach the instance", || async {
            let got =
                ok(server, ALICE, "task.get_attachment", serde_json::json!({ "taskId": task, "key": "result" })).await;
            (got["value"]["from"] == "a").then_some(())
        })
        .await;
        let _: () = ids;
        let ids = task_attachment_ids(server, &task, "result").await;
        assert_eq!(ids.len(), 1, "one attachment under the key: {ids:?}");
    }
}

/// A send of an inbox key through `a`, held between finding the key free in
/// its view (and reserving it there) and its write, while a send of the
/// same key through `b` is written: `a`'s reads again and gets the answer a
/// duplicate send gets through one instance, 409 `DUPLICATE_KEY`, writing
/// nothing; the entity holds one message of the key, the same through both
/// instances. Before, both were written (the check and the reservation are
/// one instance's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_of_one_inbox_key_through_two_instances_write_it_once() {
    let pauses = Pauses::default();
    let Some(Instances { a, b, _objects, _cluster }) = two_instances_pausing(Some(pauses.clone())).await else {
        return;
    };
    let e = "/chat/one-inbox-key";
    entity_support::spawn(&a, None, e).await;
    let send = |server: &TestServer, from: &str| {
        server
            .request(Method::POST, &format!("{}/send", entity_support::api(e)))
            .json(&serde_json::json!({ "key": "order-1", "payload": { "from": from } }))
            .send()
    };
    let held = pauses.arm(INBOX_WRITE);
    let through_a = tokio::spawn(send(&a, "a"));
    held.reached().await;
    let res = send(&b, "b").await.unwrap();
    assert_eq!(res.status(), StatusCode::OK, "b's send is written");
    held.release();
    let refused = entity_support::error_of(through_a.await.unwrap().unwrap()).await;
    let duplicate = entity_support::error_of(send(&b, "b, again").await.unwrap()).await;
    assert_eq!((duplicate.0, duplicate.1.as_str()), (StatusCode::CONFLICT, "DUPLICATE_KEY"), "{}", duplicate.2);
    assert_eq!(refused, duplicate, "a's send is answered as a duplicate through one instance is");

    for server in [&a, &b] {
        let rows = entity_support::eventually(Duration::from_secs(10), "b's row reaches the instance", || async {
            let rows = entity_support::rows_as(server, &format!("{e}/main"), None).await;
            let mine: Vec<serde_json::Value> =
                rows.into_iter().filter(|r| r["type"] == "inbox" && r["key"] == "order-1").collect();
            (!mine.is_empty()).then_some(mine)
        })
        .await;
        assert_eq!(rows.len(), 1, "one message of the key: {rows:?}");
        assert_eq!(rows[0]["value"]["payload"]["from"], "b");
    }
}

/// A change of the task record through `a` whose request is dropped (the
/// client closes its connection) while the change is between its
/// compare-and-set in PostgreSQL and its write (held at the `task_write`
/// pause) is written all the same: read through `b`, its event is
/// published and the record shows it. Before, the record kept the change
/// with no event and no row on the task's main stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_change_whose_request_is_dropped_after_its_decision_is_written_with_its_event() {
    use serde_json::{json, Value};
    use task_helpers::{call_dropped_at, create_task, ok, ALICE};
    let pauses = Pauses::default();
    let Some(Instances { a, b, _objects, _cluster }) = two_instances_pausing(Some(pauses.clone())).await else {
        return;
    };
    // The claim first: it takes the one pending task there is.
    let cases = [
        ("task.claim", "task.claimed", json!({ "workerId": "w1" }), "status", json!("in_progress")),
        ("task.update", "task.updated", json!({ "updates": { "priority": 60 } }), "priority", json!(60)),
    ];
    for (method, event, params, field, changed) in cases {
        let task = create_task(&a, ALICE, "dropped meanwhile", 50).await;
        let mut params = params;
        if method == "task.update" {
            params["id"] = json!(task);
        }
        let pause = pauses.arm(TASK_WRITE);
        call_dropped_at(&a, ALICE, method, &params, &pause).await;
        pause.release();
        entity_support::eventually(Duration::from_secs(10), "the dropped change's event", || async {
            let res = b
                .client
                .get(b.url("/_attache/events"))
                .query(&[("offset", "-1")])
                .header("electric-principal", ALICE)
                .send()
                .await
                .unwrap();
            let events: Vec<Value> = res.json().await.unwrap();
            events.iter().any(|e| e["taskId"] == task.as_str() && e["type"] == event).then_some(())
        })
        .await;
        // `b` learns of the record's change through PostgreSQL, a little after the write.
        let record = entity_support::eventually(Duration::from_secs(10), "the change in the record", || async {
            let record = ok(&b, ALICE, "task.get", json!({ "id": task })).await;
            (record[field] == changed).then_some(record)
        })
        .await;
        assert_eq!(record[field], changed, "{method}: the record shows the change its event tells of: {record}");
    }
}

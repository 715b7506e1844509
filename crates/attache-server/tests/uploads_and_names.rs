//! Uploads, expiry and stored settings at their edges (issue 10, item 9):
//! an upload interrupted after its bytes were stored, resumable uploads never
//! closed, a TTL past any sane range, the length of a resumable JSON
//! attachment, and who may read the tokens file.

mod common;
mod entity_support;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use attache_core::ContentType;
use attache_server::auth::AuthMode;
use attache_storage::embedded::{EmbeddedConfig, EmbeddedStore};
use attache_storage::tokens::TokenStore;
use attache_storage::{AppendRequest, StreamStore};
use common::TestServer;
use entity_support::{api, eventually, get_bytes, manifest, rows, spawn, upload};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

const CHAT: &str = "/chat/uploads";

/// Appends `chunks` to a resumable upload's `stream` as one producer would, closing it with the last.
async fn upload_in_chunks(ts: &TestServer, stream: &str, content_type: &str, chunks: &[&[u8]]) {
    for (seq, chunk) in chunks.iter().enumerate() {
        let mut rb = ts
            .request(Method::POST, stream)
            .header("content-type", content_type)
            .header("producer-id", "up")
            .header("producer-epoch", "0")
            .header("producer-seq", seq.to_string())
            .body(chunk.to_vec());
        if seq + 1 == chunks.len() {
            rb = rb.header("stream-closed", "true");
        }
        let res = rb.send().await.unwrap();
        assert!(res.status().is_success(), "chunk {seq}: {}", res.status());
    }
}

#[tokio::test]
async fn a_ttl_past_one_hundred_years_is_refused_with_400_not_accepted_and_lost() {
    let ts = TestServer::start().await;
    for ttl in ["18446744073709551615", "3153600001"] {
        let res = ts
            .request(Method::PUT, "/ttl/huge")
            .header("content-type", "text/plain")
            .header("stream-ttl", ttl)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::BAD_REQUEST, "Stream-TTL {ttl}");
        assert_eq!(ts.request(Method::HEAD, "/ttl/huge").send().await.unwrap().status(), StatusCode::NOT_FOUND);
    }
    let res = ts
        .request(Method::PUT, "/ttl/huge")
        .header("content-type", "text/plain")
        .header("stream-ttl", "3153600000")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(ts.request(Method::HEAD, "/ttl/huge").send().await.unwrap().status(), StatusCode::OK);
}

#[tokio::test]
async fn a_resumable_json_attachment_reads_back_byte_exact_with_its_true_length() {
    let ts = TestServer::start().await;
    spawn(&ts, None, CHAT).await;
    let res = ts
        .request(Method::PUT, &format!("{}/attachments/doc", api(CHAT)))
        .json(&json!({ "mimeType": "application/json", "filename": "doc.json", "subject": {"type": "context", "key": "test"} }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    // A JSON document in two chunks that each split it mid-value.
    let whole = br#"[{"a":1}, {"b":[2,3]}]"#;
    let (first, second) = whole.split_at(9);
    upload_in_chunks(&ts, &format!("{CHAT}/attachments/doc"), "application/json", &[first, second]).await;
    let entry = manifest(&ts, CHAT).await["doc"].clone();
    assert_eq!(entry["status"], "complete", "{entry}");
    assert_eq!(entry["byteLength"], whole.len());
    let res = ts.request(Method::GET, &format!("{}/attachments/doc", api(CHAT))).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["content-type"], "application/json");
    assert_eq!(res.headers()["content-length"], whole.len().to_string().as_str());
    assert_eq!(res.bytes().await.unwrap(), &whole[..]);
}

/// A Durable Streams client learns a stream's mode from its `Content-Type`:
/// told `application/json`, it framed each chunk of a JSON file as an array
/// (`[chunk]`), which the upload's stream stored as it came, and the
/// attachment completed with bytes that were not the file. The stream of a
/// JSON attachment (resumable or uploaded whole) is advertised as
/// `application/octet-stream`, and takes appends of that type.
#[tokio::test]
async fn a_json_attachments_stream_is_advertised_as_bytes_so_stream_clients_upload_the_file_unchanged() {
    let ts = TestServer::start().await;
    spawn(&ts, None, CHAT).await;
    let res = ts
        .request(Method::PUT, &format!("{}/attachments/data", api(CHAT)))
        .json(&json!({ "mimeType": "application/json", "filename": "data.json", "subject": {"type": "context", "key": "t"} }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    let stream = format!("{CHAT}/attachments/data");
    let head = ts.request(Method::HEAD, &stream).send().await.unwrap();
    assert_eq!(head.headers()["content-type"], "application/octet-stream");
    // What a client in binary mode sends: the file's bytes, in two chunks, as the advertised type.
    let file = br#"{"rows":[1,2,3],"note":"a json file"}"#;
    let (first, second) = file.split_at(12);
    upload_in_chunks(&ts, &stream, "application/octet-stream", &[first, second]).await;
    let entry = manifest(&ts, CHAT).await["data"].clone();
    assert_eq!((entry["status"].as_str(), entry["byteLength"].as_u64()), (Some("complete"), Some(file.len() as u64)));
    assert_eq!(get_bytes(&ts, CHAT, "data").await, (StatusCode::OK, file.to_vec()));
    let raw = ts.request(Method::GET, &format!("{stream}?offset=-1")).send().await.unwrap();
    assert_eq!(raw.headers()["content-type"], "application/octet-stream");
    assert_eq!(raw.bytes().await.unwrap(), &file[..]);

    // An attachment uploaded whole: its stream says the same.
    upload(&ts, CHAT, "whole", "application/json", file).await;
    let head = ts.request(Method::HEAD, &format!("{CHAT}/attachments/whole")).send().await.unwrap();
    assert_eq!(head.headers()["content-type"], "application/octet-stream");
    // A JSON-mode stream still takes only JSON.
    let res = ts.request(Method::PUT, "/plain/json").header("content-type", "application/json").send().await.unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    let res = ts
        .request(Method::POST, "/plain/json")
        .header("content-type", "application/octet-stream")
        .body("[1]")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CONFLICT);
}

#[tokio::test]
async fn the_tokens_file_is_owner_only_and_an_older_readable_one_is_tightened_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens.jsonl");
    std::fs::write(&file, b"").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let data_dir = dir.path().to_path_buf();
    let ts = TestServer::start_with(|c| {
        c.data_dir = data_dir;
        c.auth = Some(AuthMode::Token);
    })
    .await;
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "an existing world-readable tokens file is made owner-only when the server starts");
    let (_, secret) = TokenStore::new(dir.path()).create("user:alice", None).unwrap();
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let res = ts.request(Method::PUT, "/tok/ok").header("authorization", format!("Bearer {secret}")).send().await;
    assert_eq!(res.unwrap().status(), StatusCode::CREATED, "the token still works");

    let fresh = tempfile::tempdir().unwrap();
    TokenStore::new(fresh.path()).create("user:bob", None).unwrap();
    let mode = std::fs::metadata(fresh.path().join("tokens.jsonl")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "a new tokens file is created owner-only");
}

/// An upload whose blob stream committed but whose `complete` row never
/// came (the server stopped in between) used to stay `pending` for ever,
/// and its id was refused. After a restart it is completed from the stored bytes.
#[tokio::test]
async fn an_upload_interrupted_after_its_bytes_were_stored_is_completed_not_left_pending() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().to_path_buf();
    let start = |data_dir: std::path::PathBuf| TestServer::start_with(move |c| c.data_dir = data_dir);
    let ts = start(data_dir.clone()).await;
    spawn(&ts, None, CHAT).await;
    let bytes = b"stored before the interruption".to_vec();
    upload(&ts, CHAT, "doc", "text/plain", &bytes).await;
    // The state an interruption leaves: the same row, still pending.
    let main = format!("{CHAT}/main");
    let mut row = rows(&ts, &main)
        .await
        .into_iter()
        .rfind(|r| r["type"] == "manifest" && r["key"] == "attachment:doc")
        .expect("the upload wrote its manifest row");
    row["value"]["status"] = json!("pending");
    row["value"].as_object_mut().unwrap().remove("sha256");
    row["value"].as_object_mut().unwrap().remove("byteLength");
    ts.stop().await;
    let store = EmbeddedStore::open(EmbeddedConfig::new(&data_dir)).unwrap();
    let json = ContentType::parse("application/json").unwrap();
    let body = serde_json::to_vec(&row).unwrap();
    store.append(AppendRequest::json_messages(main.clone(), json, &[body], false)).await.unwrap();
    store.close().await;
    drop(store);

    let ts = start(data_dir.clone()).await;
    let entry: Value = eventually(Duration::from_secs(5), "the interrupted upload to be settled", || {
        let ts = &ts;
        async move {
            let entry = manifest(ts, CHAT).await.remove("doc")?;
            (entry["status"] != "pending").then_some(entry)
        }
    })
    .await;
    assert_eq!(entry["status"], "complete", "{entry}");
    assert_eq!(entry["byteLength"], bytes.len());
    assert_eq!(get_bytes(&ts, CHAT, "doc").await, (StatusCode::OK, bytes));
}

/// A resumable upload begun and never closed used to stay `pending` for
/// ever, its stream kept. Past `upload_expiry` its row fails with the reason
/// and its stream is deleted; the id can then be used again.
#[tokio::test]
async fn a_resumable_upload_never_closed_expires_failed_and_its_stream_is_deleted() {
    let ts = TestServer::start_with(|c| c.upload_expiry = Duration::from_millis(300)).await;
    spawn(&ts, None, CHAT).await;
    let begin = || {
        ts.request(Method::PUT, &format!("{}/attachments/slow", api(CHAT)))
            .json(&json!({"subject": {"type": "context", "key": "test"}}))
            .send()
    };
    assert_eq!(begin().await.unwrap().status(), StatusCode::CREATED);
    let stream = format!("{CHAT}/attachments/slow");
    let res = ts
        .request(Method::POST, &stream)
        .header("content-type", "application/octet-stream")
        .body(b"part of it".to_vec())
        .send()
        .await
        .unwrap();
    assert!(res.status().is_success());
    let entry: Value = eventually(Duration::from_secs(5), "the open upload to expire", || {
        let ts = &ts;
        async move {
            let entry = manifest(ts, CHAT).await.remove("slow")?;
            (entry["status"] == "failed").then_some(entry)
        }
    })
    .await;
    assert!(entry["error"].as_str().is_some_and(|e| e.contains("expired")), "{entry}");
    eventually(Duration::from_secs(5), "the expired upload's stream to be deleted", || {
        let ts = &ts;
        let stream = stream.clone();
        async move {
            let status = ts.request(Method::HEAD, &stream).send().await.unwrap().status();
            (status == StatusCode::NOT_FOUND).then_some(())
        }
    })
    .await;
    assert_eq!(begin().await.unwrap().status(), StatusCode::CREATED, "the id is free again");
}

/// Names (entity URLs, plain stream paths, task ids) are one namespace per
/// server: a create on a name another principal holds must fail, so it says
/// 409 where a read says 404. It says only that the name is taken: not who
/// holds it, nor anything of what is there (docs/SECURITY.md, "Uploads and names").
#[tokio::test]
async fn a_create_on_a_name_another_principal_holds_says_only_that_it_is_taken() {
    let ts = TestServer::start().await;
    let as_ = |rb: reqwest::RequestBuilder, who: &str| rb.header(entity_support::PRINCIPAL, who.to_owned());
    let res = as_(ts.request(Method::PUT, "/names/plans"), "user:alice")
        .header("content-type", "application/x-alice-private")
        .body("the content")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    spawn(&ts, Some("user:alice"), "/chat/private-1").await;

    let read = as_(ts.request(Method::GET, "/names/plans"), "user:mallory").send().await.unwrap();
    assert_eq!(read.status(), StatusCode::NOT_FOUND);
    let read = as_(ts.request(Method::GET, &api("/chat/private-1")), "user:mallory").send().await.unwrap();
    assert_eq!(read.status(), StatusCode::NOT_FOUND);

    let put = as_(ts.request(Method::PUT, "/names/plans"), "user:mallory")
        .header("content-type", "application/x-alice-private")
        .send()
        .await
        .unwrap();
    let spawned = as_(ts.request(Method::PUT, &api("/chat/private-1")), "user:mallory").send().await.unwrap();
    for res in [put, spawned] {
        assert_eq!(res.status(), StatusCode::CONFLICT);
        let headers = format!("{:?}", res.headers());
        let body = res.text().await.unwrap();
        for secret in ["alice", "x-alice-private", "the content", "createdAt", "created_by"] {
            assert!(!body.contains(secret) && !headers.contains(secret), "a 409 reveals {secret:?}: {body} {headers}");
        }
    }
}

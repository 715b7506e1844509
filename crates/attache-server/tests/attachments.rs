//! Entity attachments over HTTP (dev mode): byte-exact round trips, multipart
//! edge cases built by hand, refusals that change nothing, ranged and
//! conditional reads, delete, content-addressed dedupe, resumable uploads.
//!
//! Why one file of this size: each file under tests/ is its own test binary (one more link of the
//! server and all its dependencies), and this one is one face's suite: its fixtures and helpers at
//! the top, then tests that each start their own server and read alone.

mod common;
mod entity_support;

use std::collections::BTreeMap;
use std::time::Duration;

use attache_storage::{Fault, FaultPlan, FaultPoint};
use common::{header, TestServer, CLOSED};
use entity_support::{
    api, as_principal, error_of, eventually, get_bytes, listed, manifest, materialize_as, pattern, rows, sha256_hex,
    spawn, staged_blobs, stored_blobs, upload, upload_raw, Form, StalledUpload, BOUNDARY, DEFAULT_SUBJECT,
};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

const CHAT: &str = "/chat/files";

async fn server_with_entity() -> TestServer {
    let ts = TestServer::start().await;
    spawn(&ts, None, CHAT).await;
    ts
}

/// What must not change when a request is refused: the manifest (listed and
/// as the main stream materializes it) and the stored blobs.
async fn attachment_state(ts: &TestServer, entity: &str) -> (BTreeMap<String, Value>, BTreeMap<String, Value>, usize) {
    (listed(ts, entity).await, manifest(ts, entity).await, stored_blobs(&ts.config.data_dir).len())
}

/// The staging dir empties once a refused or broken upload has been cleaned up.
async fn staging_is_empty(ts: &TestServer, why: &str) {
    let dir = ts.config.data_dir.clone();
    eventually(Duration::from_secs(5), &format!("blobs/tmp to be empty after {why}"), || {
        let left = staged_blobs(&dir);
        async move { left.is_empty().then_some(()) }
    })
    .await;
}

fn percent_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).expect("a hex escape"));
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

#[tokio::test]
async fn uploads_round_trip_byte_exact_at_boundary_sizes() {
    let ts = server_with_entity().await;
    for size in [0usize, 1, 65_535, 65_536, 65_537, 10 << 20] {
        let bytes = pattern(size, size as u64 + 7);
        let id = format!("s{size}");
        let entry = upload(&ts, CHAT, &id, "application/x-test", &bytes).await;
        let sha = sha256_hex(&bytes);
        assert_eq!(entry["status"], "complete", "{size}: {entry}");
        assert_eq!(entry["byteLength"], size as u64, "{size}");
        assert_eq!(entry["sha256"], sha.as_str(), "{size}");
        assert_eq!(entry["kind"], "attachment");
        assert_eq!(entry["id"], id.as_str());
        assert_eq!(entry["key"], format!("attachment:{id}"));
        assert_eq!(entry["streamPath"], format!("{CHAT}/attachments/{id}"));
        assert_eq!(entry["mimeType"], "application/x-test");
        assert_eq!(entry["filename"], format!("{id}.bin"));
        assert_eq!(entry["role"], "input");
        assert_eq!(entry["createdBy"], "/principal/user%3Aanonymous");
        assert!(entry["createdAt"].is_string());

        let res = ts.request(Method::GET, &format!("{}/attachments/{id}", api(CHAT))).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{size}");
        assert_eq!(header(&res, "content-length"), Some(size.to_string()), "{size}");
        assert_eq!(header(&res, "etag"), Some(format!("\"{sha}\"")));
        let got = res.bytes().await.unwrap();
        assert!(got.len() == size && sha256_hex(&got) == sha, "{size}: read back {} bytes that differ", got.len());
        let raw = ts.read_all(&format!("{CHAT}/attachments/{id}")).await;
        assert!(raw[..] == bytes[..], "{size}: the raw attachment stream differs");

        // The manifest row on the main stream is the answered entry.
        assert_eq!(manifest(&ts, CHAT).await[&id], entry, "{size}");
        assert_eq!(listed(&ts, CHAT).await[&id], entry, "{size}");
        let statuses: Vec<Value> = rows(&ts, &format!("{CHAT}/main"))
            .await
            .into_iter()
            .filter(|r| r["type"] == "manifest" && r["key"] == format!("attachment:{id}"))
            .map(|r| r["value"]["status"].clone())
            .collect();
        // `upload` sends the subject after the file: no pending row, the first row is the outcome.
        assert_eq!(statuses, vec![json!("complete")], "{size}: one row, complete");
    }
}

#[tokio::test]
async fn file_bytes_that_look_like_the_boundary_survive() {
    let ts = server_with_entity().await;
    let mut bytes = Vec::new();
    for chunk in [
        format!("\r\n--{}", &BOUNDARY[..BOUNDARY.len() - 1]),
        format!("--{BOUNDARY}x"),
        "\r\n--\r\n\r\n".to_owned(),
        format!("\r\n-{BOUNDARY}--\r\n"),
        "\r".to_owned(),
    ] {
        bytes.extend_from_slice(chunk.as_bytes());
        bytes.extend_from_slice(&pattern(1000, bytes.len() as u64));
    }
    bytes.extend_from_slice(b"\r\n--");
    let entry = upload(&ts, CHAT, "lookalike", "application/octet-stream", &bytes).await;
    assert_eq!(entry["sha256"], sha256_hex(&bytes).as_str());
    assert_eq!(get_bytes(&ts, CHAT, "lookalike").await, (StatusCode::OK, bytes));
}

#[tokio::test]
async fn fields_after_the_file_complete_the_entry() {
    let ts = server_with_entity().await;
    let bytes = b"a,b\n1,2\n".to_vec();
    let form = Form::new()
        .file(Some("part-name.bin"), Some("image/png"), &bytes)
        .field("id", "late")
        .field("mimeType", "text/csv")
        .field("filename", "report.csv")
        .field("subject", r#"{"type":"inbox","key":"m1"}"#)
        .field("role", "output")
        .field("meta", r#"{"pages":2,"tags":["x"]}"#)
        .finish();
    let res = upload_raw(&ts, CHAT, form).await;
    assert_eq!(res.status(), StatusCode::CREATED);
    let entry = res.json::<Value>().await.unwrap()["attachment"].clone();
    assert_eq!(entry["id"], "late");
    assert_eq!(entry["mimeType"], "text/csv");
    assert_eq!(entry["filename"], "report.csv");
    assert_eq!(entry["subject"], json!({ "type": "inbox", "key": "m1" }));
    assert_eq!(entry["role"], "output");
    assert_eq!(entry["meta"], json!({ "pages": 2, "tags": ["x"] }));
    assert_eq!(entry["status"], "complete");
    assert_eq!(manifest(&ts, CHAT).await["late"], entry);
    let res = ts.request(Method::GET, &format!("{}/attachments/late", api(CHAT))).send().await.unwrap();
    assert_eq!(header(&res, "content-type").as_deref(), Some("text/csv"));
    assert_eq!(res.bytes().await.unwrap(), bytes);

    // subjectType + subjectKey after the file, too.
    let form = Form::new()
        .file(None, None, b"x")
        .field("id", "late2")
        .field("subjectType", "tool_call")
        .field("subjectKey", "call-1")
        .finish();
    let res = upload_raw(&ts, CHAT, form).await;
    assert_eq!(res.status(), StatusCode::CREATED);
    let entry = res.json::<Value>().await.unwrap()["attachment"].clone();
    assert_eq!(entry["subject"], json!({ "type": "tool_call", "key": "call-1" }));
}

#[tokio::test]
async fn mime_type_and_filename_fall_back_to_the_file_part_then_to_defaults() {
    let ts = server_with_entity().await;
    let res =
        upload_raw(&ts, CHAT, Form::new().field("id", "typed").file(Some("p.png"), Some("image/png"), b"p").finish())
            .await;
    let entry = res.json::<Value>().await.unwrap()["attachment"].clone();
    assert_eq!((entry["mimeType"].as_str(), entry["filename"].as_str()), (Some("image/png"), Some("p.png")));
    let res = upload_raw(&ts, CHAT, Form::new().field("id", "bare").file(None, None, b"p").finish()).await;
    let entry = res.json::<Value>().await.unwrap()["attachment"].clone();
    assert_eq!(entry["mimeType"], "application/octet-stream");
    // No id: one is generated.
    let res = upload_raw(&ts, CHAT, Form::new().file(None, None, b"anon").finish()).await;
    assert_eq!(res.status(), StatusCode::CREATED);
    let entry = res.json::<Value>().await.unwrap()["attachment"].clone();
    let id = entry["id"].as_str().expect("a generated id").to_owned();
    assert!(!id.is_empty());
    assert_eq!(get_bytes(&ts, CHAT, &id).await, (StatusCode::OK, b"anon".to_vec()));
}

#[tokio::test]
async fn an_upload_without_a_file_is_400_and_changes_nothing() {
    let ts = server_with_entity().await;
    let before = attachment_state(&ts, CHAT).await;
    let tail = ts.tail(&format!("{CHAT}/main")).await;
    for form in [
        Form::new().field("id", "nofile").field("mimeType", "text/plain").finish(),
        Form::new().field("id", "nofile").field("files", "not the file field").finish(),
        Form::new().finish(),
    ] {
        let (status, code, body) = error_of(upload_raw(&ts, CHAT, form).await).await;
        assert_eq!((status, code.as_str()), (StatusCode::BAD_REQUEST, "INVALID_REQUEST"), "{body}");
    }
    assert_eq!(attachment_state(&ts, CHAT).await, before);
    assert_eq!(ts.tail(&format!("{CHAT}/main")).await, tail, "not even a pending row");
}

#[tokio::test]
async fn two_files_are_400_and_nothing_stays() {
    let ts = server_with_entity().await;
    let before = attachment_state(&ts, CHAT).await;
    for form in [
        Form::new().field("id", "two").file(Some("a"), None, b"first").file(Some("b"), None, b"second").finish(),
        Form::new().file(Some("a"), None, b"first").file(Some("b"), None, b"second").field("id", "two").finish(),
        Form::new().file(Some("a"), None, b"first").file(Some("b"), None, b"second").finish(),
    ] {
        let (status, code, body) = error_of(upload_raw(&ts, CHAT, form).await).await;
        assert_eq!((status, code.as_str()), (StatusCode::BAD_REQUEST, "INVALID_REQUEST"), "{body}");
    }
    assert_eq!(attachment_state(&ts, CHAT).await, before);
    assert_eq!(get_bytes(&ts, CHAT, "two").await.0, StatusCode::NOT_FOUND);
    staging_is_empty(&ts, "two-file uploads").await;
    // The id was never taken.
    upload(&ts, CHAT, "two", "text/plain", b"one file").await;
}

#[tokio::test]
async fn a_huge_part_header_is_400_and_changes_nothing() {
    let ts = server_with_entity().await;
    let before = attachment_state(&ts, CHAT).await;
    let padding = "a".repeat(1 << 20);
    let mut failures = Vec::new();
    for (what, headers) in [
        (
            "a 1 MiB extra header line",
            format!("Content-Disposition: form-data; name=\"file\"; filename=\"a.bin\"\r\nX-Padding: {padding}"),
        ),
        ("a 1 MiB filename", format!("Content-Disposition: form-data; name=\"file\"; filename=\"{padding}\"")),
        ("a 1 MiB field name", format!("Content-Disposition: form-data; name=\"{padding}\"")),
    ] {
        let form = Form::new().field("id", "huge-header").part(&headers, b"bytes").finish();
        let (status, code, body) = error_of(upload_raw(&ts, CHAT, form).await).await;
        if status != StatusCode::BAD_REQUEST {
            let body: String = body.to_string().chars().take(200).collect();
            failures.push(format!("  {what}: got {status} {code} {body}"));
        }
        let now = attachment_state(&ts, CHAT).await;
        if now != before {
            failures.push(format!("  {what}: the manifest or the blobs changed"));
            let _ = ts.request(Method::DELETE, &format!("{}/attachments/huge-header", api(CHAT))).send().await;
        }
    }
    assert!(failures.is_empty(), "huge part headers must be refused with 400:\n{}", failures.join("\n"));
    staging_is_empty(&ts, "huge part headers").await;
}

#[tokio::test]
async fn a_truncated_form_never_leaves_a_complete_attachment() {
    let ts = server_with_entity().await;
    let bytes = pattern(100_000, 3);
    // The body ends inside the file part: no closing delimiter.
    let mut form = Form::new().field("id", "cut").unfinished();
    form.extend_from_slice(
        format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"c\"\r\n\r\n").as_bytes(),
    );
    form.extend_from_slice(&bytes);
    let res = upload_raw(&ts, CHAT, form).await;
    assert!(res.status().is_client_error(), "a truncated form is refused: {}", res.status());
    let entry = manifest(&ts, CHAT).await.remove("cut");
    assert!(entry.as_ref().is_none_or(|e| e["status"] == "failed"), "cut: {entry:?}");
    assert!(listed(&ts, CHAT).await.get("cut").is_none_or(|e| e["status"] == "failed"));
    assert_ne!(get_bytes(&ts, CHAT, "cut").await.0, StatusCode::OK);
    assert!(stored_blobs(&ts.config.data_dir).is_empty());
    staging_is_empty(&ts, "a truncated form").await;
}

#[tokio::test]
async fn a_connection_dropped_mid_upload_leaves_the_attachment_failed() {
    let ts = server_with_entity().await;
    let addr = ts.url.trim_start_matches("http://").to_owned();
    let mut sock = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST {}/attachments HTTP/1.1\r\nHost: {addr}\r\nContent-Type: {}\r\nContent-Length: {}\r\n\r\n",
        api(CHAT),
        Form::content_type(),
        50 << 20
    );
    sock.write_all(head.as_bytes()).await.unwrap();
    let mut body = Form::new().field("id", "dropped").unfinished();
    body.extend_from_slice(
        format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"d\"\r\n\r\n").as_bytes(),
    );
    body.extend_from_slice(&pattern(1 << 20, 9));
    sock.write_all(&body).await.unwrap();
    sock.flush().await.unwrap();
    // The server is mid-upload once the pending row is there.
    eventually(Duration::from_secs(10), "the pending row of the upload", || async {
        manifest(&ts, CHAT).await.get("dropped").filter(|e| e["status"] == "pending").map(|_| ())
    })
    .await;
    drop(sock);
    let entry = eventually(Duration::from_secs(10), "the dropped upload to leave pending", || async {
        manifest(&ts, CHAT).await.get("dropped").filter(|e| e["status"] != "pending").cloned()
    })
    .await;
    assert_eq!(entry["status"], "failed", "{entry}");
    assert!(entry["error"].is_string(), "a failed entry says why: {entry}");
    assert_eq!(get_bytes(&ts, CHAT, "dropped").await.0, StatusCode::CONFLICT, "not readable");
    assert!(stored_blobs(&ts.config.data_dir).is_empty());
    staging_is_empty(&ts, "a dropped connection").await;
    // A failed id may be tried again.
    upload(&ts, CHAT, "dropped", "text/plain", b"second try").await;
}

#[tokio::test]
async fn a_duplicate_id_is_409_and_the_first_stays_byte_identical() {
    let ts = server_with_entity().await;
    let first = pattern(200_000, 1);
    let entry = upload(&ts, CHAT, "dup", "text/plain", &first).await;
    let before = attachment_state(&ts, CHAT).await;
    let second = pattern(200_000, 2);
    for form in [
        Form::new().field("id", "dup").file(Some("b"), Some("image/png"), &second).finish(),
        Form::new().file(Some("b"), Some("image/png"), &second).field("id", "dup").finish(),
        Form::new().field("id", "dup").file(Some("b"), Some("text/plain"), &first).finish(),
    ] {
        let (status, code, body) = error_of(upload_raw(&ts, CHAT, form).await).await;
        assert_eq!(status, StatusCode::CONFLICT, "{code}: {body}");
    }
    let res = ts
        .request(Method::PUT, &format!("{}/attachments/dup", api(CHAT)))
        .json(&json!({"subject": {"type": "context", "key": "test"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CONFLICT, "a resumable upload cannot take a used id either");
    assert_eq!(attachment_state(&ts, CHAT).await, before);
    assert_eq!(manifest(&ts, CHAT).await["dup"], entry);
    assert_eq!(get_bytes(&ts, CHAT, "dup").await, (StatusCode::OK, first.clone()));
    assert_eq!(ts.read_all(&format!("{CHAT}/attachments/dup")).await, first);
    staging_is_empty(&ts, "duplicate uploads").await;
}

/// Each bad field, before and after the file part, on its own request.
#[tokio::test]
async fn bad_ids_subjects_roles_and_meta_are_400_invalid_request_and_change_nothing() {
    let ts = server_with_entity().await;
    upload(&ts, CHAT, "keep", "text/plain", b"kept").await;
    let before = attachment_state(&ts, CHAT).await;
    let long = "x".repeat(129);
    let cases: Vec<Vec<(&str, &str)>> = vec![
        vec![("id", "")],
        vec![("id", ".hidden")],
        vec![("id", "a/b")],
        vec![("id", "a\\b")],
        vec![("id", "a\u{1}b")],
        vec![("id", "a\u{7f}b")],
        vec![("id", &long)],
        vec![("subject", r#"{"type":"mail","key":"k"}"#)],
        vec![("subject", r#"{"type":"inbox"}"#)],
        vec![("subject", r#"{"type":"inbox","key":""}"#)],
        vec![("subject", "not json")],
        vec![("subject", "[]")],
        vec![("subjectType", "bogus"), ("subjectKey", "k")],
        vec![("subjectType", "inbox")],
        vec![("subjectKey", "k")],
        vec![("role", "owner")],
        vec![("role", "INPUT")],
        vec![("meta", "[1]")],
        vec![("meta", "nope")],
        vec![("meta", "\"text\"")],
        vec![("meta", "42")],
        vec![("meta", "null")],
    ];
    let mut failures = Vec::new();
    let mut staged = staged_blobs(&ts.config.data_dir);
    for (n, fields) in cases.iter().enumerate() {
        for after_the_file in [false, true] {
            let id = format!("bad-{n}-{after_the_file}");
            let mut form = Form::new();
            let carries_id = fields.iter().any(|(k, _)| *k == "id");
            if !carries_id {
                form = form.field("id", &id);
            }
            if after_the_file {
                form = form.file(Some("f"), None, b"payload");
            }
            for (k, v) in fields {
                form = form.field(k, v);
            }
            if !after_the_file {
                form = form.file(Some("f"), None, b"payload");
            }
            let (status, code, body) = error_of(upload_raw(&ts, CHAT, form.finish()).await).await;
            let place = if after_the_file { "after" } else { "before" };
            if (status, code.as_str()) != (StatusCode::BAD_REQUEST, "INVALID_REQUEST") {
                failures.push(format!("  {fields:?} {place} the file: got {status} {code} {body}"));
            }
            let now = attachment_state(&ts, CHAT).await;
            if now != before {
                let new: Vec<_> = now.1.iter().filter(|(k, _)| !before.1.contains_key(*k)).collect();
                failures.push(format!("  {fields:?} {place} the file changed the manifest or blobs: {new:?}"));
                // Undo, so the next case is judged on its own.
                for (id, _) in now.0.iter().filter(|(k, _)| !before.0.contains_key(*k)) {
                    let _ = ts.request(Method::DELETE, &format!("{}/attachments/{id}", api(CHAT))).send().await;
                }
            }
            let now_staged = staged_blobs(&ts.config.data_dir);
            if now_staged.len() > staged.len() {
                failures.push(format!("  {fields:?} {place} the file left a file in blobs/tmp"));
            }
            staged = now_staged;
        }
    }
    assert!(failures.is_empty(), "{} bad-field cases misbehaved:\n{}", failures.len(), failures.join("\n"));
}

#[tokio::test]
async fn a_stopped_entity_refuses_uploads_with_409_not_running() {
    let ts = server_with_entity().await;
    upload(&ts, CHAT, "before-stop", "text/plain", b"kept").await;
    assert_eq!(ts.request(Method::DELETE, &api(CHAT)).send().await.unwrap().status(), StatusCode::OK);
    let before = attachment_state(&ts, CHAT).await;
    let form = Form::new().field("id", "after-stop").file(None, None, b"refused").finish();
    let (status, code, body) = error_of(upload_raw(&ts, CHAT, form).await).await;
    assert_eq!((status, code.as_str()), (StatusCode::CONFLICT, "NOT_RUNNING"), "{body}");
    assert_eq!(attachment_state(&ts, CHAT).await, before);
    assert_eq!(get_bytes(&ts, CHAT, "before-stop").await, (StatusCode::OK, b"kept".to_vec()), "still readable");
    staging_is_empty(&ts, "an upload to a stopped entity").await;
}

#[tokio::test]
async fn a_request_that_is_not_multipart_is_400() {
    let ts = server_with_entity().await;
    let before = attachment_state(&ts, CHAT).await;
    let path = format!("{}/attachments", api(CHAT));
    for (content_type, body) in [
        (Some("application/json"), r#"{"file":"x"}"#.to_owned()),
        (Some("text/plain"), "just bytes".to_owned()),
        (Some("multipart/form-data"), String::from_utf8(Form::new().file(None, None, b"x").finish()).unwrap()),
        (Some("application/x-www-form-urlencoded"), "file=x".to_owned()),
        (None, "x".to_owned()),
    ] {
        let mut rb = ts.request(Method::POST, &path).body(body);
        if let Some(ct) = content_type {
            rb = rb.header("content-type", ct);
        }
        let (status, code, body) = error_of(rb.send().await.unwrap()).await;
        assert_eq!((status, code.as_str()), (StatusCode::BAD_REQUEST, "INVALID_REQUEST"), "{content_type:?}: {body}");
    }
    assert_eq!(attachment_state(&ts, CHAT).await, before);
}

#[tokio::test]
async fn an_upload_over_max_attachment_bytes_is_413_and_leaves_nothing() {
    const MAX: usize = 64 << 10;
    let ts = TestServer::start_with(|c| c.max_attachment_bytes = MAX as u64).await;
    spawn(&ts, None, CHAT).await;
    upload(&ts, CHAT, "fits", "application/octet-stream", &pattern(MAX, 1)).await;
    let before = attachment_state(&ts, CHAT).await;
    assert_eq!(before.2, 1);

    // Over by one byte; far over (refused on Content-Length); and streamed without a length.
    // Each the same answer, naming the limit, however the size came to light.
    let said = format!("Attachment exceeds maximum size of {MAX} bytes");
    for (id, size) in [("over-by-one", MAX + 1), ("far-over", 4 << 20)] {
        let form = Form::new().field("id", id).file(None, None, &pattern(size, 2)).finish();
        let (status, code, body) = error_of(upload_raw(&ts, CHAT, form).await).await;
        assert_eq!((status, code.as_str()), (StatusCode::PAYLOAD_TOO_LARGE, "PAYLOAD_TOO_LARGE"), "{id}: {body}");
        assert!(body.to_string().contains(&said), "{id}: {body}");
    }
    let mut streamed = Form::new().field("id", "streamed").unfinished();
    streamed.extend_from_slice(
        format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"s\"\r\n\r\n").as_bytes(),
    );
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        std::iter::once(Ok(streamed)).chain((0..8).map(|i| Ok(pattern(16 << 10, i)))).collect();
    let res = ts
        .request(Method::POST, &format!("{}/attachments", api(CHAT)))
        .header("content-type", Form::content_type())
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    let (status, _, body) = error_of(res).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "a streamed upload crossing the limit");
    assert!(body.to_string().contains(&said), "streamed: {body}");

    // Resumable uploads have the same limit.
    let res = ts
        .request(Method::PUT, &format!("{}/attachments/resumable", api(CHAT)))
        .json(&json!({"subject": {"type": "context", "key": "test"}}))
        .send()
        .await;
    assert_eq!(res.unwrap().status(), StatusCode::CREATED);
    let stream = format!("{CHAT}/attachments/resumable");
    let append = |bytes: Vec<u8>| {
        ts.request(Method::POST, &stream).header("content-type", "application/octet-stream").body(bytes).send()
    };
    assert_eq!(append(pattern(MAX - 10, 3)).await.unwrap().status(), StatusCode::NO_CONTENT);
    assert_eq!(append(pattern(11, 4)).await.unwrap().status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(append(pattern(10, 4)).await.unwrap().status(), StatusCode::NO_CONTENT, "exactly at the limit");

    let after = attachment_state(&ts, CHAT).await;
    let ids: Vec<&String> = after.1.keys().collect();
    assert_eq!(ids, vec!["fits", "resumable"], "refused uploads left no manifest entries");
    assert_eq!(stored_blobs(&ts.config.data_dir).len(), 1, "only the blob that fits");
    staging_is_empty(&ts, "uploads over the limit").await;
    assert!(ts.config.data_dir.join("blobs").join("tmp").is_dir());
}

#[tokio::test]
async fn ranges_heads_and_conditional_reads_follow_rfc_9110() {
    let ts = server_with_entity().await;
    let bytes = pattern(1000, 5);
    let entry = upload(&ts, CHAT, "ranged", "text/plain; charset=utf-8", &bytes).await;
    let etag = format!("\"{}\"", entry["sha256"].as_str().unwrap());
    let path = format!("{}/attachments/ranged", api(CHAT));
    let get = |range: Option<&str>| {
        let mut rb = ts.request(Method::GET, &path);
        if let Some(r) = range {
            rb = rb.header("range", r);
        }
        rb.send()
    };

    let res = get(None).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(header(&res, "content-type").as_deref(), Some("text/plain; charset=utf-8"));
    assert_eq!(header(&res, "x-content-type-options").as_deref(), Some("nosniff"));
    assert_eq!(header(&res, "cache-control").as_deref(), Some("private, max-age=31536000, immutable"));
    assert_eq!(header(&res, "etag"), Some(etag.clone()));
    assert_eq!(header(&res, "accept-ranges").as_deref(), Some("bytes"));
    assert_eq!(header(&res, "content-length").as_deref(), Some("1000"));

    for (range, start, end) in [
        ("bytes=0-9", 0, 9),
        ("bytes=990-", 990, 999),
        ("bytes=-10", 990, 999),
        ("bytes=-5000", 0, 999),
        ("bytes=995-2000", 995, 999),
        ("bytes=500-500", 500, 500),
    ] {
        let res = get(Some(range)).await.unwrap();
        assert_eq!(res.status(), StatusCode::PARTIAL_CONTENT, "{range}");
        assert_eq!(header(&res, "content-range"), Some(format!("bytes {start}-{end}/1000")), "{range}");
        assert_eq!(header(&res, "content-length"), Some((end - start + 1).to_string()), "{range}");
        assert_eq!(res.bytes().await.unwrap(), bytes[start..=end], "{range}");
    }
    for range in ["bytes=1000-", "bytes=5-2", "bytes=-0", "bytes=abc"] {
        let res = get(Some(range)).await.unwrap();
        assert_eq!(res.status(), StatusCode::RANGE_NOT_SATISFIABLE, "{range}");
        assert_eq!(header(&res, "content-range").as_deref(), Some("bytes */1000"), "{range}");
    }

    let res = ts.request(Method::HEAD, &path).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(header(&res, "content-length").as_deref(), Some("1000"));
    assert_eq!(header(&res, "etag"), Some(etag.clone()));
    assert!(res.bytes().await.unwrap().is_empty());

    for inm in [etag.clone(), format!("\"other\", {etag}"), "*".to_owned()] {
        let res = ts.request(Method::GET, &path).header("if-none-match", &inm).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::NOT_MODIFIED, "{inm}");
        assert_eq!(header(&res, "etag"), Some(etag.clone()));
        assert!(res.bytes().await.unwrap().is_empty());
    }
    let res = ts.request(Method::GET, &path).header("if-none-match", "\"other\"").send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);

    // An empty attachment has no satisfiable range.
    upload(&ts, CHAT, "empty", "text/plain", b"").await;
    let res = ts
        .request(Method::GET, &format!("{}/attachments/empty", api(CHAT)))
        .header("range", "bytes=0-0")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::RANGE_NOT_SATISFIABLE);
}

/// A range whose last byte (or suffix length) is past 2^64 is still a valid,
/// satisfiable range (RFC 9110 14.1.1: a last-pos past the end means the end);
/// before, a number too big for u64 made any such range 416.
#[tokio::test]
async fn a_range_whose_numbers_overflow_u64_is_cut_at_the_end_not_refused() {
    let ts = server_with_entity().await;
    let bytes = pattern(1000, 7);
    upload(&ts, CHAT, "huge-ranges", "application/octet-stream", &bytes).await;
    let path = format!("{}/attachments/huge-ranges", api(CHAT));
    for (range, start) in [("bytes=10-99999999999999999999999", 10), ("bytes=-99999999999999999999999", 0)] {
        let res = ts.request(Method::GET, &path).header("range", range).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::PARTIAL_CONTENT, "{range}");
        assert_eq!(header(&res, "content-range"), Some(format!("bytes {start}-999/1000")), "{range}");
        assert_eq!(res.bytes().await.unwrap(), bytes[start..], "{range}");
    }
    // A first byte past 2^64 is past the end: unsatisfiable, as any first byte past the end.
    let res = ts.request(Method::GET, &path).header("range", "bytes=99999999999999999999999-").send().await.unwrap();
    assert_eq!(res.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(header(&res, "content-range").as_deref(), Some("bytes */1000"));
}

#[tokio::test]
async fn content_disposition_is_safe_for_any_filename() {
    let ts = server_with_entity().await;
    let names = [
        "plain.txt",
        "quo\"te\".txt",
        "line\r\nbreak.txt",
        "x\r\nSet-Cookie: stolen=1",
        "r\u{e9}sum\u{e9} \u{6771}\u{4eac}.pdf",
        "back\\slash; semi=colon.txt",
        "%41 percent.txt",
        "tab\there.txt",
    ];
    for (i, name) in names.iter().enumerate() {
        let id = format!("n{i}");
        let form = Form::new().field("id", &id).field("filename", name).file(Some("ignored"), None, b"x").finish();
        let res = upload_raw(&ts, CHAT, form).await;
        assert_eq!(res.status(), StatusCode::CREATED, "{name:?}");
        let entry = res.json::<Value>().await.unwrap()["attachment"].clone();
        assert_eq!(entry["filename"], *name, "the manifest keeps the filename as sent");

        let res = ts.request(Method::GET, &format!("{}/attachments/{id}", api(CHAT))).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{name:?}");
        assert!(res.headers().get("set-cookie").is_none(), "{name:?} injected a header");
        let cd = header(&res, "content-disposition").unwrap_or_else(|| panic!("{name:?}: no Content-Disposition"));
        assert!(cd.is_ascii() && !cd.contains('\r') && !cd.contains('\n'), "{name:?}: {cd}");
        let rest = cd.strip_prefix("attachment; filename=\"").unwrap_or_else(|| panic!("{name:?}: {cd}"));
        let (fallback, encoded) = rest.split_once("\"; filename*=UTF-8''").unwrap_or_else(|| panic!("{name:?}: {cd}"));
        assert!(!fallback.contains('"') && !fallback.contains('\\'), "{name:?}: fallback {fallback:?}");
        assert!(encoded.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$&+-.^_`|~%".contains(&b)), "{cd}");
        assert_eq!(percent_decode(encoded), name.as_bytes(), "{name:?}: filename* decodes back");
    }
}

#[tokio::test]
async fn an_upload_answers_with_the_txid_of_its_complete_row_not_of_its_pending_row() {
    // A client that waits for the answer's txid in the main stream (as
    // Electric's clients do) must then see the upload complete, not pending.
    let ts = server_with_entity().await;
    // Its id and subject before the bytes: recorded pending while they
    // stream. After them: the first row is the outcome (its bytes and row
    // commit together).
    let early = Form::new().field("id", "t1").field("subject", DEFAULT_SUBJECT);
    let late = Form::new().field("id", "t2");
    for (id, form, want) in [
        ("t1", early, &[("pending", false, "insert"), ("complete", true, "update")][..]),
        ("t2", late, &[("complete", true, "insert")][..]),
    ] {
        let res = upload_raw(&ts, CHAT, form.file(Some("t.bin"), Some("text/plain"), b"abc").finish()).await;
        assert_eq!(res.status(), StatusCode::CREATED);
        let txid = res.json::<Value>().await.unwrap()["txid"].as_str().expect("a txid").to_owned();
        let key = format!("attachment:{id}");
        let mine: Vec<Value> =
            rows(&ts, &format!("{CHAT}/main")).await.into_iter().filter(|r| r["key"] == key.as_str()).collect();
        let statuses: Vec<(&str, bool, &str)> = mine
            .iter()
            .map(|r| {
                let status = r["value"]["status"].as_str().unwrap_or("?");
                (status, r["headers"]["txid"] == txid.as_str(), r["headers"]["operation"].as_str().unwrap_or("?"))
            })
            .collect();
        assert_eq!(statuses, want, "{mine:?}");
    }
}

/// Whichever durable commit of an upload fails (its pending row, its bytes
/// and complete row, or whatever comes next), once the upload is answered
/// its row is never `pending`: absent or `failed` after an error, `complete`
/// (its bytes readable) after 201. Before, the blob stream and the complete
/// row were two commits, and a failure between them left the row `pending`
/// until a restart (here: the third commit).
#[tokio::test]
async fn a_commit_that_fails_at_any_step_of_an_upload_leaves_no_pending_row() {
    let plan = FaultPlan::new();
    let ts = TestServer::start_with(|c| c.fault_plan = Some(plan.clone())).await;
    spawn(&ts, None, CHAT).await;
    for n in 1..=4u64 {
        let id = format!("fault-{n}");
        let bytes = pattern(50_000, n);
        let form = Form::new().field("id", &id).field("subject", DEFAULT_SUBJECT);
        plan.fail_nth(FaultPoint::LogSync, n, Fault::Io);
        let res = upload_raw(&ts, CHAT, form.file(Some("f.bin"), Some("text/plain"), &bytes).finish()).await;
        let status = res.status();
        plan.clear();
        let entry = manifest(&ts, CHAT).await.remove(&id);
        let row = entry.as_ref().map(|e| e["status"].as_str().unwrap_or("?").to_owned());
        if status == StatusCode::CREATED {
            assert_eq!(row.as_deref(), Some("complete"), "commit {n} failing: answered 201");
            assert_eq!(get_bytes(&ts, CHAT, &id).await, (StatusCode::OK, bytes.clone()));
        } else {
            assert!(status.is_server_error(), "commit {n} failing: answered {status}");
            assert!(
                matches!(row.as_deref(), None | Some("failed")),
                "commit {n} failing: answered {status}, row {row:?}"
            );
            // The id may be tried again.
            upload(&ts, CHAT, &id, "text/plain", &bytes).await;
        }
    }
    assert!(plan.injected(FaultPoint::LogSync) >= 2, "the faults met the upload's commits");
    staging_is_empty(&ts, "uploads that met failing commits").await;
}

#[tokio::test]
async fn a_deleted_attachment_is_404_afterwards_and_its_bytes_are_reclaimed() {
    let ts = server_with_entity().await;
    upload(&ts, CHAT, "gone", "text/plain", b"soon gone").await;
    upload(&ts, CHAT, "stays", "text/plain", b"still here").await;
    let path = format!("{}/attachments/gone", api(CHAT));
    let res = ts.request(Method::DELETE, &path).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let txid = res.json::<Value>().await.unwrap()["txid"].as_str().expect("a txid").to_owned();

    assert_eq!(get_bytes(&ts, CHAT, "gone").await.0, StatusCode::NOT_FOUND);
    assert_eq!(ts.request(Method::HEAD, &path).send().await.unwrap().status(), StatusCode::NOT_FOUND);
    assert_eq!(ts.request(Method::DELETE, &path).send().await.unwrap().status(), StatusCode::NOT_FOUND);
    assert_eq!(ts.head(&format!("{CHAT}/attachments/gone")).await.status(), StatusCode::NOT_FOUND);
    assert!(!listed(&ts, CHAT).await.contains_key("gone"));
    assert!(!manifest(&ts, CHAT).await.contains_key("gone"));
    let delete_rows: Vec<Value> = rows(&ts, &format!("{CHAT}/main"))
        .await
        .into_iter()
        .filter(|r| r["type"] == "manifest" && r["headers"]["operation"] == "delete")
        .collect();
    assert_eq!(delete_rows.len(), 1, "{delete_rows:?}");
    assert_eq!(delete_rows[0]["key"], "attachment:gone");
    assert_eq!(delete_rows[0]["headers"]["txid"], txid.as_str());
    assert_eq!(get_bytes(&ts, CHAT, "stays").await, (StatusCode::OK, b"still here".to_vec()));
    let dir = ts.config.data_dir.clone();
    eventually(Duration::from_secs(5), "the deleted bytes to be reclaimed", || {
        let n = stored_blobs(&dir).len();
        async move { (n == 1).then_some(()) }
    })
    .await;
    let res = ts.request(Method::DELETE, &format!("{}/attachments/never", api(CHAT))).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn identical_content_is_stored_once_and_kept_until_its_last_holder_goes() {
    let ts = server_with_entity().await;
    spawn(&ts, None, "/chat/other").await;
    let bytes = pattern(1 << 20, 42);
    let sha = sha256_hex(&bytes);
    upload(&ts, CHAT, "c1", "application/octet-stream", &bytes).await;
    upload(&ts, CHAT, "c2", "text/plain", &bytes).await;
    upload(&ts, "/chat/other", "c3", "image/png", &bytes).await;
    let blobs = stored_blobs(&ts.config.data_dir);
    assert_eq!(blobs.len(), 1, "one file for three copies: {blobs:?}");
    assert!(blobs[0].file_name().unwrap().to_string_lossy().contains(&sha), "named by its sha256: {blobs:?}");

    let holders = [(CHAT, "c1"), (CHAT, "c2"), ("/chat/other", "c3")];
    for (i, (entity, id)) in holders.iter().enumerate() {
        let res = ts.request(Method::DELETE, &format!("{}/attachments/{id}", api(entity))).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        for (other_entity, other) in &holders[i + 1..] {
            assert_eq!(get_bytes(&ts, other_entity, other).await, (StatusCode::OK, bytes.clone()), "{other}");
        }
        if i + 1 < holders.len() {
            assert_eq!(stored_blobs(&ts.config.data_dir), blobs, "kept while {} copies remain", holders.len() - i - 1);
        }
    }
    let dir = ts.config.data_dir.clone();
    eventually(Duration::from_secs(5), "the last copy's file to be removed", || {
        let left = stored_blobs(&dir);
        async move { left.is_empty().then_some(()) }
    })
    .await;
}

#[tokio::test]
async fn a_resumable_upload_completes_on_close_with_the_right_sha256() {
    let ts = server_with_entity().await;
    let path = format!("{}/attachments/res", api(CHAT));
    let stream = format!("{CHAT}/attachments/res");
    let res = ts
        .request(Method::PUT, &path)
        .json(&json!({ "mimeType": "application/octet-stream", "filename": "r.bin", "role": "output",
                       "subject": { "type": "run", "key": "run-1" }, "meta": { "chunks": 3 } }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    let started = res.json::<Value>().await.unwrap();
    assert_eq!(started["attachment"]["status"], "pending");
    assert_eq!(manifest(&ts, CHAT).await["res"]["status"], "pending");
    assert_eq!(get_bytes(&ts, CHAT, "res").await.0, StatusCode::CONFLICT, "a pending attachment is not readable yet");
    // Starting again (a client that lost the answer) resumes the same upload.
    let res = ts
        .request(Method::PUT, &path)
        .json(&json!({"subject": {"type": "context", "key": "test"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.json::<Value>().await.unwrap()["attachment"]["status"], "pending");

    let chunks: Vec<Vec<u8>> = (0..3).map(|i| pattern(300_000 + i, i as u64)).collect();
    let append = |seq: usize, close: bool| {
        let mut rb = ts
            .request(Method::POST, &stream)
            .header("content-type", "application/octet-stream")
            .header("producer-id", "uploader-1")
            .header("producer-epoch", "0")
            .header("producer-seq", seq.to_string())
            .body(chunks[seq].clone());
        if close {
            rb = rb.header("stream-closed", "true");
        }
        rb.send()
    };
    assert_eq!(append(0, false).await.unwrap().status(), StatusCode::OK);
    assert_eq!(append(1, false).await.unwrap().status(), StatusCode::OK);
    let retry = append(1, false).await.unwrap();
    assert_eq!(retry.status(), StatusCode::NO_CONTENT, "a retried chunk is acknowledged, not appended again");
    assert_eq!(manifest(&ts, CHAT).await["res"]["status"], "pending", "still pending while open");
    let closed = append(2, true).await.unwrap();
    assert_eq!(closed.status(), StatusCode::OK);
    assert_eq!(header(&closed, CLOSED).as_deref(), Some("true"));

    let whole: Vec<u8> = chunks.concat();
    let entry = manifest(&ts, CHAT).await["res"].clone();
    assert_eq!(entry["status"], "complete", "{entry}");
    assert_eq!(entry["byteLength"], whole.len() as u64);
    assert_eq!(entry["sha256"], sha256_hex(&whole).as_str());
    assert_eq!(entry["filename"], "r.bin");
    assert_eq!(entry["role"], "output");
    assert_eq!(entry["subject"], json!({ "type": "run", "key": "run-1" }));
    assert_eq!(entry["meta"], json!({ "chunks": 3 }));
    assert_eq!(listed(&ts, CHAT).await["res"], entry);
    assert_eq!(get_bytes(&ts, CHAT, "res").await, (StatusCode::OK, whole.clone()));
    let res = ts.request(Method::GET, &path).header("range", "bytes=-10").send().await.unwrap();
    assert_eq!(res.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(res.bytes().await.unwrap(), whole[whole.len() - 10..]);
    let res = ts.request(Method::GET, &path).header("if-none-match", format!("\"{}\"", sha256_hex(&whole))).send();
    assert_eq!(res.await.unwrap().status(), StatusCode::NOT_MODIFIED);

    // Closed means finished: no more bytes, and the id is taken.
    let res = ts
        .request(Method::POST, &stream)
        .header("content-type", "application/octet-stream")
        .body("late")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CONFLICT);
    assert_eq!(
        ts.request(Method::PUT, &path)
            .json(&json!({"subject": {"type": "context", "key": "test"}}))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::CONFLICT
    );
    assert_eq!(get_bytes(&ts, CHAT, "res").await.1, whole);
}

/// The error message of a refused request, with its status and code.
async fn refusal(res: reqwest::Response) -> (StatusCode, String, String) {
    let (status, code, body) = error_of(res).await;
    (status, code, body["error"]["message"].as_str().unwrap_or("").to_owned())
}

#[tokio::test]
async fn an_upload_without_a_subject_is_400_subject_required_and_changes_nothing() {
    let ts = server_with_entity().await;
    let before = attachment_state(&ts, CHAT).await;
    for (why, form) in [
        // Electric's UI sends the file part first, then the fields.
        (
            "file first",
            Form::new().file(Some("a.txt"), Some("text/plain"), b"x").field("id", "s1").finish_without_subject(),
        ),
        // An id before the file writes a pending row early; it is taken back.
        ("id first", Form::new().field("id", "s2").file(Some("a.txt"), None, b"x").finish_without_subject()),
        ("no fields", Form::new().file(None, None, b"x").finish_without_subject()),
        ("half a subject", Form::new().field("subjectType", "inbox").file(None, None, b"x").finish_without_subject()),
    ] {
        let (status, code, message) = refusal(upload_raw(&ts, CHAT, form).await).await;
        let expected = if why == "half a subject" {
            "attachment subject requires type and key"
        } else {
            "attachment subject is required"
        };
        assert_eq!(
            (status, code.as_str(), message.as_str()),
            (StatusCode::BAD_REQUEST, "INVALID_REQUEST", expected),
            "{why}"
        );
    }
    // A resumable upload is an upload too.
    let res = ts.request(Method::PUT, &format!("{}/attachments/r1", api(CHAT))).json(&json!({})).send().await.unwrap();
    let (status, _, message) = refusal(res).await;
    assert_eq!((status, message.as_str()), (StatusCode::BAD_REQUEST, "attachment subject is required"));
    assert_eq!(attachment_state(&ts, CHAT).await, before);
    for id in ["s1", "s2", "r1"] {
        assert_eq!(get_bytes(&ts, CHAT, id).await.0, StatusCode::NOT_FOUND, "{id}");
        let res = ts.request(Method::HEAD, &format!("{CHAT}/attachments/{id}")).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::NOT_FOUND, "no stream for {id}");
    }
    staging_is_empty(&ts, "uploads without a subject").await;
}

#[tokio::test]
async fn unknown_subject_types_and_roles_are_400_naming_the_allowed_values() {
    let ts = server_with_entity().await;
    let before = attachment_state(&ts, CHAT).await;
    let types = "inbox, run, text, tool_call, context";
    for (form, allowed) in [
        (Form::new().field("subject", r#"{"type":"mail","key":"m1"}"#).file(None, None, b"x").finish(), types),
        (Form::new().file(None, None, b"x").field("subjectType", "mail").field("subjectKey", "m1").finish(), types),
        (Form::new().field("role", "observer").file(None, None, b"x").finish(), "input, output"),
    ] {
        let (status, code, message) = refusal(upload_raw(&ts, CHAT, form).await).await;
        assert_eq!((status, code.as_str()), (StatusCode::BAD_REQUEST, "INVALID_REQUEST"), "{message}");
        assert!(message.ends_with(&format!("expected one of {allowed}")), "{message}");
    }
    for (body, allowed) in [
        (json!({"subject": {"type": "mail", "key": "m1"}}), types),
        (json!({"subject": {"type": "inbox", "key": "m1"}, "role": "observer"}), "input, output"),
    ] {
        let res = ts.request(Method::PUT, &format!("{}/attachments/r1", api(CHAT))).json(&body).send().await.unwrap();
        let (status, _, message) = refusal(res).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{message}");
        assert!(message.ends_with(&format!("expected one of {allowed}")), "{message}");
    }
    assert_eq!(attachment_state(&ts, CHAT).await, before);
}

#[tokio::test]
async fn the_default_attachment_limit_is_1_gib_and_every_document_says_so() {
    // The server, as started without --max-attachment-bytes: a form declaring
    // more than 1 GiB (and the form's 1 MiB of room) is refused before its body.
    let ts = server_with_entity().await;
    assert_eq!(ts.config.max_attachment_bytes, 1 << 30);
    let addr = ts.url.trim_start_matches("http://").to_owned();
    let mut sock = tokio::net::TcpStream::connect(&addr).await.expect("a connection");
    let head = format!(
        "POST {}/attachments HTTP/1.1\r\nHost: {addr}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        api(CHAT),
        Form::content_type(),
        (1u64 << 30) + (1 << 20) + 1
    );
    sock.write_all(head.as_bytes()).await.expect("the head is sent");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tokio::io::AsyncReadExt::read_to_end(&mut sock, &mut answer))
        .await
        .expect("answered without the body")
        .expect("read");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("maximum size of 1073741824 bytes"), "{answer}");

    // Every document that names the default names this one.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let read = |p: &str| std::fs::read_to_string(root.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
    let readme = read("README.md");
    assert!(
        readme.lines().any(|l| l.contains("`--max-attachment-bytes`") && l.contains("1 GiB")),
        "README.md's table of flags"
    );
    let guide = read("docs/guides/attachments.md");
    assert!(guide.contains("`attache serve --max-attachment-bytes`, 1 GiB by default"), "docs/guides/attachments.md");
    assert!(read("crates/attache-cli/src/serve.rs").contains("[default: 1073741824, 1 GiB]"), "attache serve --help");
    for doc in
        ["README.md", "docs/guides/attachments.md", "docs/guides/cli.md", "docs/ARCHITECTURE.md", "docs/SECURITY.md"]
    {
        for line in read(doc).lines().filter(|l| l.contains("max-attachment-bytes")) {
            assert!(!line.contains("25 MiB") || line.contains("Electric"), "{doc}: {line}");
        }
    }
}

/// An upload cancelled before its commit (an HTTP/2 client resets the
/// stream) keeps its id reserved until its row is settled in the
/// background. Before, the id was free at once: a new upload of it went
/// ahead while the settling ran, and the settling's delete of the path
/// (meant for a create sent before the cancel) deleted the new upload's
/// stream after it had answered 201: its row said complete, its bytes were gone.
#[tokio::test]
async fn an_upload_of_an_id_being_settled_after_a_cancel_is_refused_or_keeps_its_bytes() {
    let pauses = attache_server::pause::Pauses::default();
    let given = pauses.clone();
    let ts = TestServer::start_with(move |c| c.pauses = Some(given)).await;
    spawn(&ts, None, CHAT).await;
    let path = format!("{}/attachments", api(CHAT));
    let first = Form::new()
        .field("subject", DEFAULT_SUBJECT)
        .field("id", "x")
        .file(Some("f"), None, &pattern(10_000, 1))
        .finish();

    // The first upload over HTTP/2: held at its pending row's write, then at its commit.
    let addr = ts.url.trim_start_matches("http://").to_owned();
    let io = hyper_util::rt::TokioIo::new(tokio::net::TcpStream::connect(&addr).await.unwrap());
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io).await.unwrap();
    tokio::spawn(conn);
    let at_row = pauses.arm(attache_server::pause::ENTITY_WRITE);
    let req = http::Request::post(ts.url(&path))
        .header("content-type", Form::content_type())
        .body(http_body_util::Full::new(bytes::Bytes::from(first)))
        .unwrap();
    let answer = tokio::spawn(sender.send_request(req));
    at_row.reached().await;
    let at_commit = pauses.arm(attache_server::pause::ENTITY_WRITE);
    at_row.release();
    at_commit.reached().await;
    assert_eq!(listed(&ts, CHAT).await["x"]["status"], "pending");

    // Cancelled there: the row is settled in the background, held before its write.
    let at_delete = pauses.arm(attache_server::pause::SETTLE_WRITE);
    let settled = pauses.arm(attache_server::pause::UPLOAD_SETTLED);
    answer.abort();
    drop(sender);
    at_delete.reached().await;

    let second = pattern(20_000, 2);
    let form = Form::new().field("id", "x").file(Some("g"), None, &second).finish();
    let res = upload_raw(&ts, CHAT, form).await;
    let status = res.status();
    at_delete.release();
    // The settling is over (its row written, its delete done, the id given
    // back): waited for as an event, not for a while.
    settled.reached().await;
    settled.release();
    if status == StatusCode::CREATED {
        // Answered 201: its bytes must stay, whatever the settling did after.
        let (got, bytes) = get_bytes(&ts, CHAT, "x").await;
        assert_eq!(got, StatusCode::OK, "an upload answered 201 has its bytes");
        assert!(bytes == second);
    } else {
        assert_eq!(status, StatusCode::CONFLICT, "the id is busy while it is settled");
        // Once settled (failed), the id is free again.
        assert_eq!(listed(&ts, CHAT).await["x"]["status"], "failed", "the cancelled upload settled");
        let form = Form::new().field("id", "x").file(Some("g"), None, &second).finish();
        assert_eq!(upload_raw(&ts, CHAT, form).await.status(), StatusCode::CREATED);
        let (got, bytes) = get_bytes(&ts, CHAT, "x").await;
        assert_eq!(got, StatusCode::OK);
        assert!(bytes == second);
    }
}

/// The manifest entries of `entity`'s main stream as `principal` reads them (none: user:anonymous).
async fn manifest_as(ts: &TestServer, principal: Option<&str>, entity: &str) -> BTreeMap<String, Value> {
    materialize_as(ts, entity, principal)
        .await
        .into_iter()
        .filter(|((t, _), _)| t == "manifest")
        .map(|((_, k), v)| (k.strip_prefix("attachment:").unwrap_or(&k).to_owned(), v))
        .collect()
}

/// Waits until the upload of `id` to `entity` has written its `pending` row.
async fn upload_is_pending(ts: &TestServer, principal: Option<&str>, entity: &str, id: &str) {
    eventually(Duration::from_secs(10), &format!("the pending row of {id}"), || async {
        manifest_as(ts, principal, entity).await.get(id).filter(|e| e["status"] == "pending").map(|_| ())
    })
    .await;
}

/// Nothing of attachment `id` of `entity` is reachable: no row, no bytes at
/// the attachment route or at its stream, and (once reclaimed) no blob file.
async fn attachment_is_gone(ts: &TestServer, entity: &str, id: &str) {
    assert!(!manifest(ts, entity).await.contains_key(id), "no row of {id}");
    assert!(!listed(ts, entity).await.contains_key(id), "{id} is not listed");
    assert_eq!(get_bytes(ts, entity, id).await.0, StatusCode::NOT_FOUND, "no bytes of {id}");
    assert_eq!(ts.head(&format!("{entity}/attachments/{id}")).await.status(), StatusCode::NOT_FOUND);
    let dir = ts.config.data_dir.clone();
    eventually(Duration::from_secs(5), "the deleted bytes to be reclaimed", || {
        let left = stored_blobs(&dir);
        async move { left.is_empty().then_some(()) }
    })
    .await;
}

/// A DELETE of an attachment whose upload is still streaming is refused
/// with 409 `UPLOAD_IN_PROGRESS` (docs/SECURITY.md), and the upload then
/// completes. Before, the DELETE answered 200 and the upload's `complete`
/// row brought the attachment back.
#[tokio::test]
async fn deleting_an_attachment_while_its_upload_streams_is_409_and_the_upload_completes() {
    let ts = server_with_entity().await;
    let bytes = pattern(256 << 10, 31);
    let stalled = StalledUpload::start(&ts, None, CHAT, &[("id", "racing")], &bytes).await;
    upload_is_pending(&ts, None, CHAT, "racing").await;

    let path = format!("{}/attachments/racing", api(CHAT));
    let (status, code, body) = error_of(ts.request(Method::DELETE, &path).send().await.unwrap()).await;
    assert_eq!((status, code.as_str()), (StatusCode::CONFLICT, "UPLOAD_IN_PROGRESS"), "{body}");
    assert_eq!(manifest(&ts, CHAT).await["racing"]["status"], "pending", "the refused DELETE changed nothing");

    let (status, answer) = stalled.finish().await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    assert_eq!(manifest(&ts, CHAT).await["racing"]["status"], "complete");
    assert_eq!(get_bytes(&ts, CHAT, "racing").await, (StatusCode::OK, bytes));

    // Once the upload is done, the delete goes through and nothing of it stays reachable.
    assert_eq!(ts.request(Method::DELETE, &path).send().await.unwrap().status(), StatusCode::OK);
    attachment_is_gone(&ts, CHAT, "racing").await;
}

/// A resumable upload runs until its stream is closed, and a DELETE
/// meanwhile ends it: 200, its row and its stream gone in one commit, a
/// chunk or a close sent after it refused (409 `USE_ENTITY_ROUTES`: no
/// upload there), and the id free for a new upload,
/// which completes with its own bytes only. Before (session 14), the DELETE
/// was 409 `UPLOAD_IN_PROGRESS` until the client closed the stream or
/// `--upload-expiry` ended it: an upload given up could not be cancelled.
/// (Before session 8, the DELETE answered 200 while the stream stayed open
/// for appends.)
#[tokio::test]
async fn deleting_a_resumable_upload_while_its_stream_is_open_ends_it() {
    let ts = server_with_entity().await;
    let path = format!("{}/attachments/open", api(CHAT));
    let stream = format!("{CHAT}/attachments/open");
    let begin =
        || ts.request(Method::PUT, &path).json(&json!({ "subject": { "type": "context", "key": "test" } })).send();
    assert_eq!(begin().await.unwrap().status(), StatusCode::CREATED);
    let append = |body: &'static [u8], close: bool| {
        let mut rb = ts.request(Method::POST, &stream).header("content-type", "application/octet-stream").body(body);
        if close {
            rb = rb.header("stream-closed", "true");
        }
        rb.send()
    };
    assert!(append(b"first ", false).await.unwrap().status().is_success());
    assert_eq!(manifest(&ts, CHAT).await["open"]["status"], "pending");

    assert_eq!(ts.request(Method::DELETE, &path).send().await.unwrap().status(), StatusCode::OK);
    assert!(!manifest(&ts, CHAT).await.contains_key("open"), "the upload's row is gone");
    assert_eq!(ts.head(&stream).await.status(), StatusCode::NOT_FOUND, "and its stream");
    assert_eq!(get_bytes(&ts, CHAT, "open").await.0, StatusCode::NOT_FOUND);
    // No upload at the address any more: nothing to append to (the raw route's rule).
    for (body, close) in [(&b"late"[..], false), (b"last", true)] {
        let (status, code, body) = error_of(append(body, close).await.unwrap()).await;
        assert_eq!((status, code.as_str()), (StatusCode::CONFLICT, "USE_ENTITY_ROUTES"), "close {close}: {body}");
    }
    assert!(!manifest(&ts, CHAT).await.contains_key("open"), "nothing brought it back");

    // The id is free again: a new upload of it completes with its own bytes.
    assert_eq!(begin().await.unwrap().status(), StatusCode::CREATED);
    assert!(append(b"again", true).await.unwrap().status().is_success());
    assert_eq!(manifest(&ts, CHAT).await["open"]["status"], "complete");
    assert_eq!(get_bytes(&ts, CHAT, "open").await, (StatusCode::OK, b"again".to_vec()));
    assert_eq!(ts.request(Method::DELETE, &path).send().await.unwrap().status(), StatusCode::OK);
    assert_eq!(ts.head(&stream).await.status(), StatusCode::NOT_FOUND);
}

/// One JSON-RPC call as `principal`; the whole response object.
async fn rpc(ts: &TestServer, principal: &str, method: &str, params: Value) -> Value {
    let res = ts
        .request(Method::POST, "/rpc")
        .header("electric-principal", principal)
        .json(&json!({ "jsonrpc": "2.0", "method": method, "params": params, "id": 1 }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    res.json().await.unwrap()
}

/// The task face meets the same rule: while a keyed upload of a task's
/// attachment streams, `task.delete_attachment` and `task.create_attachment`
/// of its key are refused (-32602, `data.code` `UPLOAD_IN_PROGRESS`) and the
/// upload completes; a delete after it removes the row and the bytes.
/// Before, the delete answered success and the upload brought the attachment back.
#[tokio::test]
async fn task_writes_of_a_key_being_uploaded_are_refused_and_the_upload_completes() {
    let ts = TestServer::start().await;
    const ALICE: &str = "user:alice";
    let created = rpc(&ts, ALICE, "task.create", json!({ "text": "race", "priority": 50 })).await;
    let task = created["result"]["id"].as_str().expect("a task id").to_owned();
    let entity = format!("/task/{task}");
    let bytes = pattern(256 << 10, 32);
    let stalled = StalledUpload::start(&ts, Some(ALICE), &entity, &[("id", "up1"), ("key", "report")], &bytes).await;
    upload_is_pending(&ts, Some(ALICE), &entity, "up1").await;

    for (method, params) in [
        ("task.delete_attachment", json!({ "taskId": task, "key": "report" })),
        ("task.create_attachment", json!({ "taskId": task, "key": "report", "type": "text", "content": "x" })),
    ] {
        let res = rpc(&ts, ALICE, method, params).await;
        assert_eq!(res["error"]["code"], -32602, "{method}: {res}");
        assert_eq!(res["error"]["data"]["code"], "UPLOAD_IN_PROGRESS", "{method}: {res}");
    }
    assert_eq!(
        manifest_as(&ts, Some(ALICE), &entity).await["up1"]["status"],
        "pending",
        "the refused calls changed nothing"
    );

    let (status, answer) = stalled.finish().await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    let got = rpc(&ts, ALICE, "task.get_attachment", json!({ "taskId": task, "key": "report" })).await;
    assert_eq!(got["result"]["size"], bytes.len() as u64, "{got}");
    let read = |path: String| as_principal(ts.request(Method::GET, &path), Some(ALICE)).send();
    let res = read(format!("{}/attachments/up1", api(&entity))).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.bytes().await.unwrap().to_vec(), bytes);

    let deleted = rpc(&ts, ALICE, "task.delete_attachment", json!({ "taskId": task, "key": "report" })).await;
    assert_eq!(deleted["result"]["deleted"], true, "{deleted}");
    assert!(!manifest_as(&ts, Some(ALICE), &entity).await.contains_key("up1"));
    let res = read(format!("{}/attachments/up1", api(&entity))).await.unwrap();
    assert_eq!(res.status(), StatusCode::NOT_FOUND, "no bytes through the attachment route");
    let res = read(format!("{entity}/attachments/up1")).await.unwrap();
    assert_eq!(res.status(), StatusCode::NOT_FOUND, "no bytes at the attachment's stream");
}

// ------------------------------------------------------------ attachment ids

#[tokio::test]
async fn new_attachment_ids_outside_the_unreserved_characters_are_400_on_upload_and_resumable_start() {
    // Before: an upload with id "r s" was stored at `/chat/files/attachments/r s`,
    // which no client can ask for; a resumable one stayed pending, since its
    // appends (`POST /chat/files/attachments/r%20s`) reached no upload.
    let ts = server_with_entity().await;
    let before = attachment_state(&ts, CHAT).await;
    for id in ["x y", "x!y", "caf\u{e9}", "x:y", "x'y", "x(y)", "x@y", "x+y"] {
        let form = Form::new().field("id", id).file(Some("f.bin"), Some("application/octet-stream"), b"bytes").finish();
        let (status, _, body) = error_of(upload_raw(&ts, CHAT, form).await).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "upload {id:?}: {body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("A-Z") && message.contains("'~'"), "upload {id:?}: {body}");
    }
    for spelled in ["r%20s", "r!s", "r%3As", "caf%C3%A9"] {
        let begin = ts.request(Method::PUT, &format!("{}/attachments/{spelled}", api(CHAT)));
        let begin = begin.json(&json!({ "mimeType": "text/plain", "subject": { "type": "inbox", "key": "m1" } }));
        let (status, _, body) = error_of(begin.send().await.unwrap()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "resumable {spelled}: {body}");
        assert!(body["error"]["message"].as_str().is_some_and(|m| m.contains("'~'")), "{body}");
    }
    assert_eq!(attachment_state(&ts, CHAT).await, before);
    // The unreserved characters make an id, and its stream has that one spelling.
    upload(&ts, CHAT, "A-z_0.9~", "text/plain", b"one spelling").await;
    let raw = ts.request(Method::GET, &format!("{CHAT}/attachments/A-z_0.9~?offset=-1")).send().await.unwrap();
    assert_eq!((raw.status(), raw.bytes().await.unwrap().to_vec()), (StatusCode::OK, b"one spelling".to_vec()));
}

#[tokio::test]
async fn an_attachment_an_older_release_stored_under_another_id_stays_readable_and_deletable() {
    use attache_storage::embedded::{EmbeddedConfig, EmbeddedStore};
    use attache_storage::{AppendRequest, CreateStream, StreamStore};
    let mut ts = server_with_entity().await;
    let bytes = b"stored by an older release";
    let dir = ts.pause().await;
    let store = EmbeddedStore::open(EmbeddedConfig::new(&dir)).expect("the store opens");
    let octets = attache_core::ContentType::parse("application/octet-stream").unwrap();
    let create = CreateStream {
        path: attache_core::StreamPath::new(format!("{CHAT}/attachments/old id")).unwrap(),
        content_type: Some(octets.stored_as_bytes()),
        ttl: None,
        expires_at: None,
        closed: true,
        initial: bytes.to_vec().into(),
        fork: None,
        owner: Some("user:anonymous".into()),
        take_kept_path: false,
    };
    store.create(create).await.expect("the attachment's stream is planted");
    let row = json!({ "type": "manifest", "key": "attachment:old id", "headers": { "operation": "insert" }, "value": {
        "key": "attachment:old id", "kind": "attachment", "id": "old id",
        "streamPath": format!("{CHAT}/attachments/old id"), "status": "complete", "role": "input",
        "mimeType": "application/octet-stream", "createdAt": "2026-01-01T00:00:00.000Z",
        "createdBy": "/principal/user%3Aanonymous", "subject": { "type": "inbox", "key": "m1" },
        "byteLength": bytes.len(), "sha256": sha256_hex(bytes) } });
    let json_type = attache_core::ContentType::parse("application/json").unwrap();
    let append =
        AppendRequest::json_messages(format!("{CHAT}/main"), json_type, &[serde_json::to_vec(&row).unwrap()], false);
    store.append(append).await.expect("its manifest row is planted");
    store.close().await;
    drop(store);
    ts.resume().await;
    assert_eq!(get_bytes(&ts, CHAT, "old%20id").await, (StatusCode::OK, bytes.to_vec()));
    assert!(listed(&ts, CHAT).await.contains_key("old id"));
    let delete = ts.request(Method::DELETE, &format!("{}/attachments/old%20id", api(CHAT))).send().await.unwrap();
    assert_eq!(delete.status(), StatusCode::OK);
    assert_eq!(get_bytes(&ts, CHAT, "old%20id").await.0, StatusCode::NOT_FOUND);
}

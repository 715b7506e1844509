//! The real binary killed (SIGKILL) in the middle of an attachment upload:
//! after a restart the attachment is `failed` (or was never visible), never
//! `complete`; the staging dir is empty, no blob file is left that no
//! complete attachment names, and attachments completed before are intact.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{client, closing, field, file_head, upload, ServerProcess, BOUNDARY};
use reqwest::StatusCode;
use serde_json::Value;
use tokio::io::AsyncWriteExt;

const ENTITY: &str = "/crash/uploads";
/// What the killed upload declares it will send.
const BIG: usize = 200 << 20;
/// How much of it is sent before the kill.
const SENT_BEFORE_KILL: usize = 24 << 20;

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The manifest as the server lists it, by id.
async fn manifest(server: &ServerProcess) -> std::collections::BTreeMap<String, Value> {
    let res = client()
        .get(server.url(&format!("/_electric/entities{ENTITY}/attachments")))
        .send()
        .await
        .expect("the list is answered");
    assert_eq!(res.status(), StatusCode::OK);
    let body: Value = res.json().await.expect("JSON");
    body["attachments"]
        .as_array()
        .expect("an array")
        .iter()
        .map(|e| (e["id"].as_str().expect("an id").to_owned(), e.clone()))
        .collect()
}

/// Every manifest row the main stream ever carried for `id`, in order.
async fn manifest_rows(server: &ServerProcess, id: &str) -> Vec<Value> {
    let mut offset = "-1".to_owned();
    let mut out = Vec::new();
    loop {
        let res = client()
            .get(server.url(&format!("{ENTITY}/main")))
            .query(&[("offset", offset.as_str())])
            .send()
            .await
            .expect("the read is answered");
        assert_eq!(res.status(), StatusCode::OK);
        let up_to_date = res.headers().contains_key("stream-up-to-date");
        offset = res.headers()["stream-next-offset"].to_str().expect("ASCII").to_owned();
        let rows: Vec<Value> = res.json().await.expect("a JSON array");
        out.extend(rows.into_iter().filter(|r| r["type"] == "manifest" && r["key"] == format!("attachment:{id}")));
        if up_to_date {
            return out;
        }
    }
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

async fn poll<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Starts a 200 MiB upload over a raw socket, sends part of it, waits until
/// the server is visibly mid-upload, and SIGKILLs it. With `id_first` the id
/// and subject precede the file, so a pending row exists when the server dies.
async fn kill_mid_upload(server: &mut ServerProcess, data_dir: &Path, id: &str, id_first: bool) {
    let (mut body_head, body_tail) = if id_first {
        let mut head = field("id", id);
        head.extend(field("subject", r#"{"type":"context","key":"crash"}"#));
        head.extend(file_head());
        (head, closing())
    } else {
        let mut tail = closing();
        tail.truncate(2); // "\r\n" ends the file part; the id field follows.
        tail.extend(field("id", id));
        tail.extend(field("subject", r#"{"type":"context","key":"crash"}"#));
        tail.extend(format!("--{BOUNDARY}--\r\n").into_bytes());
        (file_head(), tail)
    };
    let length = body_head.len() + BIG + body_tail.len();
    let mut sock = tokio::net::TcpStream::connect(&server.addr).await.expect("a connection");
    let head = format!(
        "POST /_electric/entities{ENTITY}/attachments HTTP/1.1\r\nHost: {}\r\n\
         Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {length}\r\n\r\n",
        server.addr
    );
    sock.write_all(head.as_bytes()).await.expect("the request head is sent");
    sock.write_all(&body_head).await.expect("the form head is sent");
    body_head.clear();
    let chunk = pattern(1 << 20, 99);
    for _ in 0..SENT_BEFORE_KILL >> 20 {
        sock.write_all(&chunk).await.expect("a chunk is sent");
    }
    sock.flush().await.expect("flushed");

    // Mid-upload: bytes are being staged (and, with the id first, the pending row is written).
    let tmp = data_dir.join("blobs").join("tmp");
    poll(Duration::from_secs(30), "staged bytes of the big upload", || {
        let staged: u64 = files_under(&tmp).iter().filter_map(|p| p.metadata().ok()).map(|m| m.len()).sum();
        async move { (staged >= 8 << 20).then_some(()) }
    })
    .await;
    if id_first {
        let entry = manifest(server).await.remove(id).expect("a pending row while the upload runs");
        assert_eq!(entry["status"], "pending", "{entry}");
    }
    server.sigkill();
    drop(sock);
}

/// After the restart: `id` is failed or absent, never complete; no staged
/// files; every blob file is named by a complete attachment's sha256.
async fn check_recovered(server: &ServerProcess, data_dir: &Path, id: &str) {
    let entry = poll(Duration::from_secs(10), "recovery to settle the interrupted upload", || async {
        match manifest(server).await.remove(id) {
            None => Some(None),
            Some(e) if e["status"] == "pending" => None,
            Some(e) => Some(Some(e)),
        }
    })
    .await;
    if let Some(e) = &entry {
        assert_eq!(e["status"], "failed", "an interrupted upload is failed, never complete: {e}");
        assert!(e["error"].is_string(), "a failed entry says why: {e}");
    }
    let rows = manifest_rows(server, id).await;
    assert!(!rows.iter().any(|r| r["value"]["status"] == "complete"), "a complete row for {id}: {rows:?}");
    let res = client().get(server.url(&format!("/_electric/entities{ENTITY}/attachments/{id}"))).send().await.unwrap();
    assert_ne!(res.status(), StatusCode::OK, "{id} is not readable");

    let staged = files_under(&data_dir.join("blobs").join("tmp"));
    assert!(staged.is_empty(), "staging files survived recovery: {staged:?}");
    let complete: BTreeSet<String> = manifest(server)
        .await
        .values()
        .filter(|e| e["status"] == "complete")
        .map(|e| e["sha256"].as_str().expect("a complete entry has a sha256").to_owned())
        .collect();
    let tmp = data_dir.join("blobs").join("tmp");
    let stored: BTreeSet<String> = files_under(&data_dir.join("blobs"))
        .into_iter()
        .filter(|p| !p.starts_with(&tmp))
        .map(|p| p.file_name().expect("a file name").to_string_lossy().into_owned())
        .collect();
    assert_eq!(stored, complete, "blob files are exactly the complete attachments' contents");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_mid_upload_restarts_with_the_upload_failed_and_no_orphaned_bytes() {
    let dir = tempfile::tempdir().expect("a temporary dir");
    let data_dir = dir.path().join("data");
    let log = dir.path().join("server.log");
    let mut server = ServerProcess::start(&data_dir, &log, &[]).await;
    let res = client().put(server.url(&format!("/_electric/entities{ENTITY}"))).send().await.expect("spawn");
    assert_eq!(res.status(), StatusCode::CREATED);
    let kept_bytes = pattern(3 << 20, 1);
    let kept = upload(&server, ENTITY, "kept", &kept_bytes).await;
    assert_eq!(kept["status"], "complete");

    for (round, id_first) in [(1, true), (2, false)] {
        let id = format!("big-{round}");
        kill_mid_upload(&mut server, &data_dir, &id, id_first).await;
        server = ServerProcess::start(&data_dir, &log, &[]).await;
        check_recovered(&server, &data_dir, &id).await;

        // What completed before the crash is intact: bytes and manifest entry.
        assert_eq!(manifest(&server).await["kept"], kept, "round {round}; log:\n{}", server.log_text());
        let res = client().get(server.url(&format!("/_electric/entities{ENTITY}/attachments/kept"))).send().await;
        let res = res.expect("the read is answered");
        assert_eq!(res.status(), StatusCode::OK);
        assert!(res.bytes().await.expect("the body") == kept_bytes, "round {round}: kept bytes differ");

        // The interrupted id can be used again.
        let again = upload(&server, ENTITY, &id, b"second try").await;
        assert_eq!(again["status"], "complete");
    }
}

//! What a multipart upload may hold, and for how long (docs/SECURITY.md,
//! "Connections and live readers"): a body that stops coming is answered 408
//! after `--upload-idle-timeout` and recorded `failed`, its staging file
//! removed; a slow body that keeps coming is not cut; and past
//! `--max-concurrent-uploads` (HTTP/1 uploads and HTTP/2 streams alike) a new
//! upload is answered 503 at once, before it opens a file, as is one past
//! its principal's share of them (`--budget-share-per-principal`). The stalling
//! clients speak HTTP over raw sockets, so that they can stall where a
//! library would not.

mod common;
mod entity_support;

use std::time::Duration;

use common::{connect, read_until_closed, TestServer};
use reqwest::StatusCode;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Longer than any wait in these tests should take; a wait that runs into it fails the test.
const PATIENCE: Duration = Duration::from_secs(15);

const ENTITY: &str = "/_electric/entities/chat/c1";

async fn spawn_entity(s: &TestServer) {
    entity_support::spawn(s, Some("user:alice"), "/chat/c1").await;
}

/// The form's parts up to the file's bytes: its subject and `id` come first, so its `pending` row is written.
fn form_head(id: &str) -> String {
    format!(
        "--B\r\ncontent-disposition: form-data; name=\"subject\"\r\n\r\n{{\"type\":\"inbox\",\"key\":\"m1\"}}\r\n\
         --B\r\ncontent-disposition: form-data; name=\"id\"\r\n\r\n{id}\r\n\
         --B\r\ncontent-disposition: form-data; name=\"file\"; filename=\"f\"\r\n\r\n"
    )
}

const FORM_TAIL: &str = "\r\n--B--\r\n";

/// Sends an upload's head, its form up to the file and 4 KiB of the file
/// (of 1 MiB declared), then stalls (as user:alice, to `ENTITY`).
async fn stall_an_upload(s: &TestServer, id: &str) -> TcpStream {
    stall_an_upload_as(s, "user:alice", ENTITY, id).await
}

/// As [`stall_an_upload`], as `principal` to `entity`.
async fn stall_an_upload_as(s: &TestServer, principal: &str, entity: &str, id: &str) -> TcpStream {
    let part = form_head(id);
    let mut conn = connect(s).await;
    let head = format!(
        "POST {entity}/attachments HTTP/1.1\r\nhost: 127.0.0.1\r\n\
         electric-principal: {principal}\r\ncontent-type: multipart/form-data; boundary=B\r\n\
         content-length: {}\r\n\r\n{part}",
        part.len() + (1 << 20)
    );
    conn.write_all(head.as_bytes()).await.expect("the head and the first parts are sent");
    conn.write_all(&[b'x'; 4096]).await.expect("some of the file is sent");
    conn
}

/// The attachments listed for the entity, as JSON text.
async fn listed(s: &TestServer) -> serde_json::Value {
    let res = s
        .request(reqwest::Method::GET, &format!("{ENTITY}/attachments"))
        .header("electric-principal", "user:alice")
        .send()
        .await
        .expect("the manifest answers");
    res.json().await.expect("a manifest")
}

/// The status of attachment `id` in the listing, if listed.
async fn status_of(s: &TestServer, id: &str) -> Option<String> {
    let all = listed(s).await;
    let rows = all.get("attachments").and_then(|a| a.as_array()).cloned().unwrap_or_default();
    rows.iter().find(|r| r["id"] == id).and_then(|r| r["status"].as_str().map(str::to_owned))
}

/// Files in the store's staging directory.
fn staging_files(s: &TestServer) -> usize {
    std::fs::read_dir(s.config.data_dir.join("blobs").join("tmp")).map(|d| d.count()).unwrap_or(0)
}

/// The `attache_uploads_in_progress` gauge.
async fn uploads_in_progress(s: &TestServer) -> u64 {
    let client = reqwest::Client::builder().pool_max_idle_per_host(0).timeout(PATIENCE).build().expect("a client");
    let text = client.get(s.url("/metrics")).send().await.expect("/metrics answers").text().await.expect("a body");
    text.lines()
        .find_map(|l| l.strip_prefix("attache_uploads_in_progress "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no attache_uploads_in_progress in /metrics"))
}

/// Polls the gauge until it reads `want` (panics after `PATIENCE`).
async fn uploads_in_progress_reach(s: &TestServer, want: u64) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let now = uploads_in_progress(s).await;
        if now == want {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "attache_uploads_in_progress stayed {now}, not {want}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A whole upload of `bytes` as attachment `id`, over a fresh connection (as user:alice, to `ENTITY`).
async fn upload(s: &TestServer, id: &str, bytes: &[u8]) -> reqwest::Response {
    upload_as(s, "user:alice", ENTITY, id, bytes).await
}

/// As [`upload`], as `principal` to `entity`.
async fn upload_as(s: &TestServer, principal: &str, entity: &str, id: &str, bytes: &[u8]) -> reqwest::Response {
    let mut body = form_head(id).into_bytes();
    body.extend_from_slice(bytes);
    body.extend_from_slice(FORM_TAIL.as_bytes());
    post_form(s, principal, entity, body).await
}

/// A whole multipart `body` POSTed to `entity`'s attachments as `principal`, over a fresh connection.
async fn post_form(s: &TestServer, principal: &str, entity: &str, body: Vec<u8>) -> reqwest::Response {
    let client = reqwest::Client::builder().pool_max_idle_per_host(0).timeout(PATIENCE).build().expect("a client");
    client
        .post(s.url(&format!("{entity}/attachments")))
        .header("electric-principal", principal)
        .header("content-type", "multipart/form-data; boundary=B")
        .body(body)
        .send()
        .await
        .expect("the upload is answered")
}

/// An upload whose body stops (after part of its file, or a chunked one
/// that sends no body at all) is answered 408 `BODY_READ_TIMEOUT` after the
/// upload idle timeout and its connection closed; its `pending` row becomes
/// `failed`, as an interrupted upload's does, and its staging file is gone.
/// Before, nothing ended it: it held its connection and a staging file's
/// descriptor past every timeout (45 of them took a server with
/// `--max-connections 50`).
#[tokio::test]
async fn an_upload_whose_body_stops_is_answered_408_after_the_upload_idle_timeout_and_recorded_failed() {
    let s = TestServer::start_with(|c| {
        c.upload_idle_timeout = Duration::from_millis(500);
        c.idle_timeout = Duration::from_secs(600);
    })
    .await;
    spawn_entity(&s).await;

    let started = std::time::Instant::now();
    let mut stalled = stall_an_upload(&s, "stalled").await;
    let answer = read_until_closed(&mut stalled).await.expect("the stalled upload is answered and closed");
    let answer = String::from_utf8_lossy(&answer).to_ascii_lowercase();
    assert!(answer.starts_with("http/1.1 408"), "{answer}");
    assert!(answer.contains("\r\nconnection: close\r\n"), "{answer}");
    assert!(answer.contains("\"code\":\"body_read_timeout\""), "{answer}");
    assert!(started.elapsed() >= Duration::from_millis(450), "cut before its idle time: {:?}", started.elapsed());
    assert_eq!(status_of(&s, "stalled").await.as_deref(), Some("failed"), "{}", listed(&s).await);
    assert_eq!(staging_files(&s), 0, "the staging file is removed");
    assert_eq!(uploads_in_progress(&s).await, 0);

    // Chunked, with a head and no body at all: the same.
    let mut conn = connect(&s).await;
    let head = format!(
        "POST {ENTITY}/attachments HTTP/1.1\r\nhost: 127.0.0.1\r\nelectric-principal: user:alice\r\n\
         content-type: multipart/form-data; boundary=B\r\ntransfer-encoding: chunked\r\n\r\n"
    );
    conn.write_all(head.as_bytes()).await.expect("a head is sent");
    let answer = read_until_closed(&mut conn).await.expect("the bodiless upload is answered and closed");
    let answer = String::from_utf8_lossy(&answer).to_ascii_lowercase();
    assert!(answer.starts_with("http/1.1 408"), "{answer}");
    assert!(answer.contains("\"code\":\"body_read_timeout\""), "{answer}");

    // The id is free again.
    assert_eq!(upload(&s, "stalled", b"hello").await.status(), StatusCode::CREATED);
}

/// A slow upload whose bytes keep coming (a byte every 100 ms, for four
/// times the idle timeout) is not cut by the idle timeout: it completes.
#[tokio::test]
async fn a_slow_upload_whose_bytes_keep_coming_is_not_cut_by_the_upload_idle_timeout() {
    let s = TestServer::start_with(|c| {
        c.upload_idle_timeout = Duration::from_millis(500);
        c.upload_min_rate = 1;
    })
    .await;
    spawn_entity(&s).await;
    let file = b"twenty bytes, slowly";
    let part = form_head("slow");
    let mut conn = connect(&s).await;
    let head = format!(
        "POST {ENTITY}/attachments HTTP/1.1\r\nhost: 127.0.0.1\r\n\
         electric-principal: user:alice\r\ncontent-type: multipart/form-data; boundary=B\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n{part}",
        part.len() + file.len() + FORM_TAIL.len()
    );
    conn.write_all(head.as_bytes()).await.expect("the head is sent");
    for byte in file {
        tokio::time::sleep(Duration::from_millis(100)).await;
        conn.write_all(&[*byte]).await.expect("a byte of the file is sent");
    }
    conn.write_all(FORM_TAIL.as_bytes()).await.expect("the form's end is sent");
    let answer = read_until_closed(&mut conn).await.expect("the upload is answered");
    let answer = String::from_utf8_lossy(&answer).to_ascii_lowercase();
    assert!(answer.starts_with("http/1.1 201"), "{answer}");
    assert_eq!(status_of(&s, "slow").await.as_deref(), Some("complete"));
}

/// Past `--max-concurrent-uploads` a new upload is answered 503
/// `TOO_MANY_UPLOADS` with `Retry-After` at once, and opens no staging file;
/// an HTTP/2 stream takes a place as an HTTP/1 upload does; a place freed
/// (its client gone) takes an upload again. Before, there was no cap: every
/// stalled upload held a descriptor the open-file budget did not count
/// (560 of them, or six HTTP/2 connections of 200 streams, exhausted a
/// process under `ulimit -n 1024`).
#[tokio::test]
async fn uploads_past_max_concurrent_uploads_are_answered_503_at_once_and_http2_streams_count() {
    let s = TestServer::start_with(|c| {
        c.max_concurrent_uploads = Some(2);
        // One principal takes both places here; its share is tested below.
        c.budget_share_per_principal = 100;
        c.upload_idle_timeout = Duration::from_secs(600);
        c.idle_timeout = Duration::from_secs(600);
    })
    .await;
    spawn_entity(&s).await;

    // One stalled over HTTP/1, one over HTTP/2.
    let http1 = stall_an_upload(&s, "one").await;
    let io = hyper_util::rt::TokioIo::new(connect(&s).await);
    let (mut sender, conn) = hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
        .await
        .expect("an HTTP/2 handshake");
    tokio::spawn(conn);
    let (tx, rx) = futures::channel::mpsc::unbounded::<bytes::Bytes>();
    tx.unbounded_send(bytes::Bytes::from(form_head("two"))).expect("the form's head is queued");
    tx.unbounded_send(bytes::Bytes::from(vec![b'y'; 4096])).expect("some of the file is queued");
    let body = http_body_util::StreamBody::new(futures::StreamExt::map(rx, |b| {
        Ok::<_, std::convert::Infallible>(http_body::Frame::data(b))
    }));
    let req = http::Request::post(s.url(&format!("{ENTITY}/attachments")))
        .header("electric-principal", "user:alice")
        .header("content-type", "multipart/form-data; boundary=B")
        .body(body)
        .expect("a request");
    let http2 = tokio::spawn(sender.send_request(req));
    uploads_in_progress_reach(&s, 2).await;
    // Each has opened its staging file (its place is taken just before).
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while staging_files(&s) < 2 {
        assert!(tokio::time::Instant::now() < deadline, "the stalled uploads never staged their files");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let started = std::time::Instant::now();
    let refused = upload(&s, "three", b"hello").await;
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.headers().get("retry-after").and_then(|v| v.to_str().ok()), Some("5"));
    assert!(started.elapsed() < PATIENCE / 2, "answered after {:?}", started.elapsed());
    let text = refused.text().await.expect("a body");
    assert!(text.contains("\"code\":\"TOO_MANY_UPLOADS\""), "{text}");
    assert_eq!(staging_files(&s), 2, "the refused upload opened no file");
    assert_eq!(status_of(&s, "three").await, None, "the refused upload wrote nothing");

    // The HTTP/1 client goes away: its place is given back, and an upload takes it.
    drop(http1);
    uploads_in_progress_reach(&s, 1).await;
    assert_eq!(upload(&s, "four", b"hello").await.status(), StatusCode::CREATED);
    // The HTTP/2 stream still holds its place.
    assert_eq!(upload(&s, "five", b"hello").await.status(), StatusCode::CREATED);
    assert_eq!(uploads_in_progress(&s).await, 1);
    drop(tx);
    let _ = http2.await;
}

/// One principal's uploads hold at most its share of
/// `--max-concurrent-uploads` (`--budget-share-per-principal`, 25%: 2 of 8):
/// mallory's third stalled upload is answered 503 `TOO_MANY_UPLOADS` with
/// `Retry-After` as soon as its body stops (the drain's idle gap), before
/// it takes a place, its message naming the flag, while alice's upload still
/// goes through; a place mallory gives back is hers again. Before, the places
/// were shared by all: one principal's 1,024 stalled uploads, each kept
/// alive by a byte now and then, answered every other principal's upload 503.
#[tokio::test]
async fn one_principals_stalled_uploads_hold_at_most_its_share_of_max_concurrent_uploads() {
    const MALLORYS: &str = "/_electric/entities/chat/m1";
    let s = with_mallorys_entity(|c| c.max_concurrent_uploads = Some(8)).await;

    let first = stall_an_upload_as(&s, "user:mallory", MALLORYS, "m-one").await;
    let _second = stall_an_upload_as(&s, "user:mallory", MALLORYS, "m-two").await;
    uploads_in_progress_reach(&s, 2).await;

    let started = std::time::Instant::now();
    let mut third = stall_an_upload_as(&s, "user:mallory", MALLORYS, "m-three").await;
    let answer = read_until_closed(&mut third).await.expect("mallory's third upload is answered and closed");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.to_ascii_lowercase().contains("\r\nretry-after: 5\r\n"), "{answer}");
    assert!(answer.contains("\"code\":\"TOO_MANY_UPLOADS\""), "{answer}");
    assert!(answer.contains("budget_share_per_principal"), "the message names the flag: {answer}");
    assert!(started.elapsed() < Duration::from_secs(6), "answered after {:?}", started.elapsed());
    assert_eq!(uploads_in_progress(&s).await, 2, "the refused upload holds no place");

    // Another principal still uploads.
    assert_eq!(upload(&s, "alices", b"hello").await.status(), StatusCode::CREATED);

    // A place mallory gives back is hers again.
    drop(first);
    uploads_in_progress_reach(&s, 1).await;
    assert_eq!(upload_as(&s, "user:mallory", MALLORYS, "m-four", b"hello").await.status(), StatusCode::CREATED);
}

/// A refused upload whose client stalls mid-body hears its 503 within the
/// drain's idle gap (2 s), not after the whole drain time (30 s): the
/// refusal's body is drained only while it keeps coming.
#[tokio::test]
async fn a_refused_upload_that_stalls_hears_its_503_within_the_drain_idle_gap() {
    let s = TestServer::start_with(|c| {
        c.max_concurrent_uploads = Some(1);
        c.upload_idle_timeout = Duration::from_secs(600);
        c.idle_timeout = Duration::from_secs(600);
    })
    .await;
    spawn_entity(&s).await;
    let _held = stall_an_upload(&s, "one").await;
    uploads_in_progress_reach(&s, 1).await;
    let started = std::time::Instant::now();
    let mut refused = stall_an_upload(&s, "two").await;
    let answer = read_until_closed(&mut refused).await.expect("the refused upload's connection is closed");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("TOO_MANY_UPLOADS") && answer.contains("\r\nconnection: close\r\n"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(6), "answered after {:?}", started.elapsed());
}

/// A `meta` object of `members` small members (`{"m0000":0,...}`), ~10 bytes of JSON each.
fn many_member_meta(members: usize) -> String {
    let body: Vec<String> = (0..members).map(|i| format!("\"m{i:04}\":0")).collect();
    format!("{{{}}}", body.join(","))
}

/// [`form_head`] with a `meta` field before the file.
fn form_head_with_meta(id: &str, meta: &str) -> String {
    format!("--B\r\ncontent-disposition: form-data; name=\"meta\"\r\n\r\n{meta}\r\n{}", form_head(id))
}

/// A server where stalled uploads wait (upload and idle timeouts of ten
/// minutes), one principal holds a quarter of each budget, and both the
/// test's entity and mallory's `/chat/m1` exist; `tweak` sets the rest.
async fn with_mallorys_entity(tweak: impl FnOnce(&mut attache_server::config::ServerConfig)) -> TestServer {
    let s = TestServer::start_with(|c| {
        c.budget_share_per_principal = 25;
        c.upload_idle_timeout = Duration::from_secs(600);
        c.idle_timeout = Duration::from_secs(600);
        tweak(c);
    })
    .await;
    spawn_entity(&s).await;
    entity_support::spawn(&s, Some("user:mallory"), "/chat/m1").await;
    s
}

/// An upload's `meta` is held, as a tree in its pending entry, for as long
/// as the upload runs: it is taken from the body budget and its principal's
/// share (`--body-buffer-bytes`, `--budget-share-per-principal`) until the
/// upload is answered. An upload whose `meta` would take its principal past
/// its share is answered 503 `BODY_BUDGET_EXHAUSTED`, while another
/// principal's goes through, and what a stalled upload held is given back
/// when it ends. Before, nothing counted it: 256 stalled uploads each
/// holding a 64 KB `meta` of 5,900 members took +437 MB.
#[tokio::test]
async fn stalled_uploads_hold_their_meta_within_their_principals_share_of_the_body_budget() {
    const MALLORYS: &str = "/_electric/entities/chat/m1";
    // A share of 3 MiB: two uploads' meta of ~1.2 MB each (5,900 members, ~59 KB of text).
    let s = with_mallorys_entity(|c| c.body_buffer_bytes = 12 << 20).await;
    let meta = many_member_meta(5_900);

    let stall = |id: &'static str| {
        let part = form_head_with_meta(id, &meta);
        let s = &s;
        async move {
            let mut conn = connect(s).await;
            let head = format!(
                "POST {MALLORYS}/attachments HTTP/1.1\r\nhost: 127.0.0.1\r\n\
                 electric-principal: user:mallory\r\ncontent-type: multipart/form-data; boundary=B\r\n\
                 content-length: {}\r\n\r\n{part}",
                part.len() + (1 << 20)
            );
            conn.write_all(head.as_bytes()).await.expect("the head and the first parts are sent");
            conn.write_all(&[b'x'; 4096]).await.expect("some of the file is sent");
            conn
        }
    };
    let first = stall("m-one").await;
    let _second = stall("m-two").await;
    uploads_in_progress_reach(&s, 2).await;

    let whole = |id: &str| {
        let mut body = form_head_with_meta(id, &meta).into_bytes();
        body.extend_from_slice(b"hello");
        body.extend_from_slice(FORM_TAIL.as_bytes());
        body
    };
    let send = |principal: &'static str, entity: &'static str, body: Vec<u8>| post_form(&s, principal, entity, body);
    let refused = send("user:mallory", MALLORYS, whole("m-three")).await;
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(refused.headers().contains_key("retry-after"));
    let text = refused.text().await.expect("a body");
    assert!(text.contains("\"code\":\"BODY_BUDGET_EXHAUSTED\"") && text.contains("meta"), "{text}");

    // Another principal still uploads the same meta.
    assert_eq!(send("user:alice", ENTITY, whole("alices")).await.status(), StatusCode::CREATED);

    // What a stalled upload held is given back when it ends.
    drop(first);
    uploads_in_progress_reach(&s, 1).await;
    assert_eq!(send("user:mallory", MALLORYS, whole("m-four")).await.status(), StatusCode::CREATED);
}

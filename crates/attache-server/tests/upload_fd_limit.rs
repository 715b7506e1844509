//! Under a low open-file limit, stalled uploads cannot take the server's
//! descriptors: `--max-concurrent-uploads` is lowered at start to fit beside
//! connections and open segment files (`conn::fd_budget`), so an upload past
//! it is answered 503 before it opens its staging file, and writes and
//! `/healthz` keep answering. Its own test binary: it lowers this process's
//! limit for good.

mod common;

use std::time::Duration;

use common::TestServer;
use reqwest::StatusCode;

const PATIENCE: Duration = Duration::from_secs(30);
/// The server keeps 256 for itself; of the 64 left, uploads get an eighth (8).
const FD_LIMIT: u64 = 320;
const UPLOADS_AT_ONCE: u64 = 8;
/// HTTP/2 connections, and upload streams on each: more staging files than the limit allows.
const CONNECTIONS: usize = 4;
const STREAMS: usize = 100;

fn lower_fd_limit(to: u64) {
    let lim = libc::rlimit { rlim_cur: to as libc::rlim_t, rlim_max: to as libc::rlim_t };
    // SAFETY: setrlimit only reads the struct passed.
    let done = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    assert_eq!(done, 0, "the test may lower its own open-file limit");
}

/// The `attache_uploads_in_progress` gauge.
async fn uploads_in_progress(client: &reqwest::Client, s: &TestServer) -> u64 {
    let text = client.get(s.url("/metrics")).send().await.expect("/metrics answers").text().await.expect("a body");
    text.lines()
        .find_map(|l| l.strip_prefix("attache_uploads_in_progress "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no attache_uploads_in_progress in /metrics"))
}

/// 400 uploads that stall after part of their file, as HTTP/2 streams on
/// four connections: 8 hold a place (and a staging file), the others are
/// answered 503 `TOO_MANY_UPLOADS` at once; `/healthz` and writes keep
/// answering. Before, each stalled upload held a staging file's descriptor
/// nothing counted: 560 of them under `ulimit -n 1024` (or six HTTP/2
/// connections of 200 streams) left no descriptor, accepts failed with
/// EMFILE, and every write answered 503 `STORAGE_UNAVAILABLE`.
#[tokio::test]
async fn stalled_uploads_under_a_low_open_file_limit_take_no_more_than_their_share_of_descriptors() {
    lower_fd_limit(FD_LIMIT);
    let s = TestServer::start_with(|c| {
        // One principal sends every upload here; its share is tested in upload_limits.
        c.budget_share_per_principal = 100;
        c.upload_idle_timeout = Duration::from_secs(600);
        c.idle_timeout = Duration::from_secs(600);
    })
    .await;
    let client = reqwest::Client::builder().pool_max_idle_per_host(0).timeout(PATIENCE).build().expect("a client");
    let created = client
        .put(s.url("/_electric/entities/chat/c1"))
        .header("electric-principal", "user:alice")
        .body("{}")
        .send()
        .await
        .expect("the entity is created");
    assert!(created.status().is_success(), "{}", created.status());

    let addr = s.url.trim_start_matches("http://").to_owned();
    let mut held = Vec::new();
    let mut answers = Vec::new();
    for c in 0..CONNECTIONS {
        let io = hyper_util::rt::TokioIo::new(tokio::net::TcpStream::connect(&addr).await.expect("a connection"));
        let (sender, conn) = hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
            .await
            .expect("an HTTP/2 handshake");
        tokio::spawn(conn);
        for i in 0..STREAMS {
            let form = format!(
                "--B\r\ncontent-disposition: form-data; name=\"subject\"\r\n\r\n{{\"type\":\"inbox\",\"key\":\"m1\"}}\r\n\
                 --B\r\ncontent-disposition: form-data; name=\"id\"\r\n\r\nu-{c}-{i}\r\n\
                 --B\r\ncontent-disposition: form-data; name=\"file\"; filename=\"f\"\r\n\r\n"
            );
            let (tx, rx) = futures::channel::mpsc::unbounded::<bytes::Bytes>();
            tx.unbounded_send(bytes::Bytes::from(form)).expect("the form's head is queued");
            tx.unbounded_send(bytes::Bytes::from(vec![b'x'; 1024])).expect("some of the file is queued");
            held.push(tx);
            let body = http_body_util::StreamBody::new(futures::StreamExt::map(rx, |b| {
                Ok::<_, std::convert::Infallible>(http_body::Frame::data(b))
            }));
            let req = http::Request::post(s.url("/_electric/entities/chat/c1/attachments"))
                .header("electric-principal", "user:alice")
                .header("content-type", "multipart/form-data; boundary=B")
                .body(body)
                .expect("a request");
            let mut sender = sender.clone();
            answers.push(tokio::spawn(async move {
                sender.ready().await.ok()?;
                let res = sender.send_request(req).await.ok()?;
                Some(res.status())
            }));
        }
    }

    // All but the uploads holding a place are answered 503, at once.
    let refused = answers.len() - UPLOADS_AT_ONCE as usize;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while answers.iter().filter(|a| a.is_finished()).count() < refused {
        assert!(tokio::time::Instant::now() < deadline, "uploads past the cap were not all answered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut statuses = Vec::new();
    for answer in answers.iter_mut().filter(|a| a.is_finished()) {
        statuses.push(answer.await.expect("the request task").expect("an answer"));
    }
    assert_eq!(statuses.len(), refused, "every upload past the cap is answered");
    assert!(statuses.iter().all(|s| *s == StatusCode::SERVICE_UNAVAILABLE), "{statuses:?}");
    assert_eq!(uploads_in_progress(&client, &s).await, UPLOADS_AT_ONCE);
    let staged = std::fs::read_dir(s.config.data_dir.join("blobs").join("tmp")).map(|d| d.count()).unwrap_or(0);
    assert!(staged as u64 <= UPLOADS_AT_ONCE, "{staged} staging files");

    // The server still answers, and still writes.
    let health = client.get(s.url("/healthz")).send().await.expect("/healthz answers");
    assert_eq!(health.status(), StatusCode::OK);
    let written = client
        .put(s.url("/plain/after"))
        .header("electric-principal", "user:alice")
        .header("content-type", "text/plain")
        .body("still writing")
        .send()
        .await
        .expect("a write is answered");
    assert!(written.status().is_success(), "{}", written.status());
    drop(held);
}

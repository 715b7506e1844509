//! `--blocking-threads` bounds the threads the process runs for file work:
//! a burst of concurrent uploads and reads never takes the process past the
//! threads it had at rest plus that bound, while the same burst under a
//! generous bound does start more (so the burst really reaches the pool).

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{client, upload, ServerProcess};
use reqwest::StatusCode;

const ENTITY: &str = "/threads/burst";
const UPLOADS: usize = 24;

fn threads_of(pid: u32) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("Threads:")).and_then(|n| n.trim().parse().ok()).unwrap_or(0)
}

/// The most threads the server ran during a burst of concurrent uploads and
/// reads of 1 MiB attachments, and the threads it ran at rest just before.
async fn threads_during_a_burst(bound: &str) -> (usize, usize) {
    let dir = tempfile::tempdir().expect("a temp dir");
    let log = dir.path().join("server.log");
    let server = ServerProcess::start(&dir.path().join("data"), &log, &["--blocking-threads", bound]).await;
    let res = client().put(server.url(&format!("/_electric/entities{ENTITY}"))).send().await.expect("spawn");
    assert_eq!(res.status(), StatusCode::CREATED);
    // Settle: start-up work done, nothing in flight.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let at_rest = threads_of(server.pid());

    let most = Arc::new(AtomicUsize::new(at_rest));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (most, done, pid) = (most.clone(), done.clone(), server.pid());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                most.fetch_max(threads_of(pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    let server = Arc::new(server);
    let bytes = Arc::new(vec![7u8; 1 << 20]);
    let burst: Vec<_> = (0..UPLOADS)
        .map(|i| {
            let (server, bytes) = (server.clone(), bytes.clone());
            tokio::spawn(async move {
                let id = format!("a{i}");
                upload(&server, ENTITY, &id, &bytes).await;
                for _ in 0..2 {
                    let url = server.url(&format!("/_electric/entities{ENTITY}/attachments/{id}"));
                    let res = client().get(url).send().await.expect("a read");
                    assert_eq!(res.status(), StatusCode::OK);
                    assert_eq!(res.bytes().await.expect("the bytes").len(), 1 << 20);
                }
            })
        })
        .collect();
    for task in burst {
        task.await.expect("the upload task");
    }
    done.store(true, Ordering::Relaxed);
    sampler.join().expect("the sampler");
    let most = most.load(Ordering::Relaxed);
    eprintln!("--blocking-threads {bound}: {at_rest} threads at rest, at most {most} during the burst");
    (at_rest, most)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_of_file_work_runs_on_at_most_blocking_threads_more_threads() {
    let (at_rest, most) = threads_during_a_burst("2").await;
    assert!(most <= at_rest + 2, "with --blocking-threads 2: {at_rest} threads at rest, {most} during the burst");

    // The same burst with room for many: it does start more than two, so the
    // bound above is what held it.
    let (at_rest, most) = threads_during_a_burst("256").await;
    assert!(most > at_rest + 2, "with --blocking-threads 256: {at_rest} threads at rest, {most} during the burst");
}

#[tokio::test]
async fn uploads_whose_clients_stall_hold_no_thread_so_reads_go_on() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().expect("a temp dir");
    let log = dir.path().join("server.log");
    let server = ServerProcess::start(&dir.path().join("data"), &log, &["--blocking-threads", "2"]).await;
    let res = client().put(server.url(&format!("/_electric/entities{ENTITY}"))).send().await.expect("spawn");
    assert_eq!(res.status(), StatusCode::CREATED);
    let kept = vec![5u8; 1 << 20];
    upload(&server, ENTITY, "kept", &kept).await;

    // Four uploads that send their head and part of the file, then stall.
    let mut stalled = Vec::new();
    for i in 0..4 {
        let mut head = common::field("id", &format!("stalled-{i}"));
        head.extend(common::field("subject", r#"{"type":"context","key":"test"}"#));
        head.extend(common::file_head());
        head.extend(vec![1u8; 600 * 1024]);
        let request = format!(
            "POST /_electric/entities{ENTITY}/attachments HTTP/1.1\r\nHost: {}\r\n\
             Content-Type: multipart/form-data; boundary={}\r\nContent-Length: {}\r\n\r\n",
            server.addr,
            common::BOUNDARY,
            head.len() + (64 << 20)
        );
        let mut sock = tokio::net::TcpStream::connect(&server.addr).await.expect("a connection");
        sock.write_all(request.as_bytes()).await.expect("the request head");
        sock.write_all(&head).await.expect("part of the body");
        stalled.push(sock);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Reads need the blocking pool: they are answered while the uploads wait on their clients.
    let url = server.url(&format!("/_electric/entities{ENTITY}/attachments/kept"));
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        let res = client().get(url).send().await.expect("a read");
        (res.status(), res.bytes().await.expect("the bytes").to_vec())
    })
    .await
    .expect("a read is answered while uploads stall (no thread waits on a client)");
    assert_eq!(read, (StatusCode::OK, kept));
    drop(stalled);
}

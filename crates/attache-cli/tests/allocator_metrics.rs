//! The release binary's allocator (jemalloc, the default feature) reports what
//! it holds on `GET /metrics`, so a soak can tell live memory from pages the
//! allocator keeps.

#![cfg(feature = "jemalloc")]

mod common;

use common::{client, ServerProcess};
use reqwest::StatusCode;

fn gauge(text: &str, name: &str) -> Option<u64> {
    text.lines().find(|l| l.split_whitespace().next() == Some(name))?.split_whitespace().nth(1)?.parse().ok()
}

#[tokio::test]
async fn metrics_report_the_allocators_live_and_resident_bytes() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let server = ServerProcess::start(&dir.path().join("data"), &dir.path().join("server.log"), &[]).await;
    let res = client().get(server.url("/metrics")).send().await.expect("/metrics answers");
    assert_eq!(res.status(), StatusCode::OK);
    let text = res.text().await.expect("the metrics");
    let allocated = gauge(&text, "attache_allocator_allocated_bytes").expect("allocated bytes are reported");
    let active = gauge(&text, "attache_allocator_active_bytes").expect("active bytes are reported");
    let resident = gauge(&text, "attache_allocator_resident_bytes").expect("resident bytes are reported");
    assert!(gauge(&text, "attache_allocator_retained_bytes").is_some(), "retained bytes are reported: {text}");
    assert!(gauge(&text, "attache_allocator_metadata_bytes").is_some(), "metadata bytes are reported: {text}");
    // A running server holds something, and what it holds sits in pages jemalloc keeps resident.
    assert!(allocated > 0, "{text}");
    assert!(
        allocated <= active && active <= resident,
        "allocated {allocated} <= active {active} <= resident {resident}"
    );
}

async fn allocated(server: &ServerProcess) -> u64 {
    let text = client().get(server.url("/metrics")).send().await.expect("/metrics").text().await.expect("the metrics");
    gauge(&text, "attache_allocator_allocated_bytes").expect("allocated bytes are reported")
}

/// What an open, kept-alive HTTP/1 connection costs the server between
/// requests: its task and its timers, and no buffer (the lean HTTP/1 path
/// reads into a buffer only while bytes arrive). hyper's connection held an
/// 8 KiB read buffer and an 8 KiB write buffer (~22 KiB a connection in all;
/// ~29 KiB before its protocol detection was replaced by a peek).
#[tokio::test]
async fn an_idle_kept_alive_connection_holds_under_12_kib() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const CONNECTIONS: usize = 200;
    let dir = tempfile::tempdir().expect("a temp dir");
    let server = ServerProcess::start(&dir.path().join("data"), &dir.path().join("server.log"), &[]).await;
    let addr = server.url("").trim_start_matches("http://").trim_end_matches('/').to_owned();
    // A first round grows what grows once (the list of open connections, the
    // runtime's and the allocator's caches); the second is what each costs.
    for round in 0..2 {
        let before = allocated(&server).await;
        let mut open = Vec::with_capacity(CONNECTIONS);
        for _ in 0..CONNECTIONS {
            let mut conn = tokio::net::TcpStream::connect(&addr).await.expect("a connection");
            conn.write_all(b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n").await.expect("a request");
            let mut answer = [0u8; 512];
            let n = conn.read(&mut answer).await.expect("an answer");
            assert!(answer[..n].starts_with(b"HTTP/1.1 200"), "{:?}", String::from_utf8_lossy(&answer[..n]));
            open.push(conn);
        }
        let after = allocated(&server).await;
        let each = after.saturating_sub(before) / CONNECTIONS as u64;
        eprintln!("round {round}: heap per idle connection: {each} bytes");
        if round == 1 {
            assert!(each < 12 << 10, "an idle connection holds {each} bytes of heap");
        }
        drop(open);
        // The server has closed them all before the next round measures.
        while open_connections(&server).await > 1 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

async fn open_connections(server: &ServerProcess) -> u64 {
    let text = client().get(server.url("/metrics")).send().await.expect("/metrics").text().await.expect("the metrics");
    gauge(&text, "attache_connections_open").expect("open connections are reported")
}

/// What a live SSE subscriber waiting for the next append costs: its
/// connection, its reader and its response body. Through hyper it held
/// ~25 KiB (hyper's two buffers, a read buffer kept alive by the request's
/// header values, and the permission check's future inside every body).
#[tokio::test]
async fn a_waiting_sse_subscriber_holds_under_16_kib() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const SUBSCRIBERS: usize = 200;
    let dir = tempfile::tempdir().expect("a temp dir");
    let server = ServerProcess::start(&dir.path().join("data"), &dir.path().join("server.log"), &[]).await;
    let created = client()
        .put(server.url("/mem/sse"))
        .header("content-type", "text/plain")
        .header("electric-principal", "user:mem")
        .send()
        .await
        .expect("the stream is created");
    assert!(created.status().is_success(), "{}", created.status());
    let addr = server.url("").trim_start_matches("http://").trim_end_matches('/').to_owned();
    let before = allocated(&server).await;
    let mut open = Vec::with_capacity(SUBSCRIBERS);
    for _ in 0..SUBSCRIBERS {
        let mut conn = tokio::net::TcpStream::connect(&addr).await.expect("a connection");
        let request =
            "GET /mem/sse?offset=-1&live=sse HTTP/1.1\r\nhost: 127.0.0.1\r\nelectric-principal: user:mem\r\n\r\n";
        conn.write_all(request.as_bytes()).await.expect("a request");
        // The first control event says the subscriber is up to date and waiting.
        let mut seen = Vec::new();
        let mut buf = [0u8; 1024];
        while !String::from_utf8_lossy(&seen).contains("event: control") {
            let n = conn.read(&mut buf).await.expect("the response");
            assert!(n > 0, "closed early: {:?}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&buf[..n]);
        }
        open.push(conn);
    }
    let after = allocated(&server).await;
    let each = after.saturating_sub(before) / SUBSCRIBERS as u64;
    eprintln!("heap per waiting SSE subscriber: {each} bytes");
    assert!(each < 16 << 10, "a waiting SSE subscriber holds {each} bytes of heap");
    drop(open);
}

/// SSE readers that read nothing wait for room in `--response-buffer-bytes`
/// holding no read of their own: each used to read its next batch (here a
/// 2 MiB message) before waiting, and 200 readers of a 15 MiB message held
/// 3 GB while the budget's gauge read 60 MiB.
#[tokio::test]
async fn sse_readers_waiting_for_the_response_budget_hold_no_read() {
    use tokio::io::AsyncWriteExt;
    const READERS: usize = 12;
    let dir = tempfile::tempdir().expect("a temp dir");
    let server = ServerProcess::start(
        &dir.path().join("data"),
        &dir.path().join("server.log"),
        &["--response-buffer-bytes", "3145728", "--slow-reader-timeout", "600s"],
    )
    .await;
    let url = server.url("/big/sse");
    let res = client().put(&url).header("content-type", "application/json").send().await.expect("a create");
    assert_eq!(res.status(), StatusCode::CREATED);
    let message = format!("[\"{}\"]", "x".repeat(2 << 20));
    let res =
        client().post(&url).header("content-type", "application/json").body(message).send().await.expect("an append");
    assert!(res.status().is_success());
    let addr = server.url("").trim_start_matches("http://").trim_end_matches('/').to_owned();
    let before = allocated(&server).await;
    let mut readers = Vec::with_capacity(READERS);
    for _ in 0..READERS {
        let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
        socket.set_recv_buffer_size(4096).expect("a small receive buffer");
        let mut conn = socket.connect(addr.parse().expect("an address")).await.expect("connected");
        conn.write_all(b"GET /big/sse?offset=-1&live=sse HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
            .await
            .expect("a request");
        readers.push(conn);
    }
    // The readers read nothing: this wait is the behaviour under test (each would read its batch by now).
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let grown = allocated(&server).await.saturating_sub(before);
    eprintln!("heap grown with {READERS} waiting SSE readers of a 2 MiB message: {grown} bytes");
    // One reader's event (and its read while it is framed) fits; twelve reads do not.
    assert!(grown < 10 << 20, "waiting readers hold their reads: +{grown} bytes");
    drop(readers);
}

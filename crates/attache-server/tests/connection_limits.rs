//! Connections the server closes or refuses (docs/SECURITY.md, "Connections
//! and live readers"): stalled headers, the connection cap, idle keep-alive
//! connections and clients that never read a live response. The clients here
//! speak HTTP over raw sockets, so that they can stall where a library would not.

mod common;

use std::time::Duration;

use common::TestServer;
use reqwest::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longer than any wait in these tests should take; a wait that runs into it fails the test.
const PATIENCE: Duration = Duration::from_secs(15);

async fn connect(s: &TestServer) -> TcpStream {
    let addr = s.url.trim_start_matches("http://");
    TcpStream::connect(addr).await.expect("the server accepts a connection")
}

/// Reads until the server closes the connection; returns what it sent, or
/// `None` when it was still open after `PATIENCE`.
async fn read_until_closed(conn: &mut TcpStream) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match tokio::time::timeout_at(deadline, conn.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// Reads until `needle` has arrived (panics after `PATIENCE` or at EOF); returns all read so far.
async fn read_until(conn: &mut TcpStream, seen: &mut Vec<u8>, needle: &str) {
    let mut buf = vec![0u8; 64 << 10];
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !String::from_utf8_lossy(seen).contains(needle) {
        match tokio::time::timeout_at(deadline, conn.read(&mut buf)).await {
            Err(_) => panic!("{needle:?} did not arrive; got {:?}", String::from_utf8_lossy(seen)),
            Ok(Ok(0)) | Ok(Err(_)) => panic!("closed before {needle:?}; got {:?}", String::from_utf8_lossy(seen)),
            Ok(Ok(n)) => seen.extend_from_slice(&buf[..n]),
        }
    }
}

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
}

/// A fresh client (no pooled connection) asks /healthz.
async fn healthz(s: &TestServer) -> reqwest::Result<StatusCode> {
    let client = reqwest::Client::builder().pool_max_idle_per_host(0).timeout(PATIENCE).build()?;
    Ok(client.get(s.url("/healthz")).send().await?.status())
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed_after_the_header_read_timeout() {
    let s = TestServer::start_with(|c| c.header_read_timeout = Duration::from_millis(300)).await;
    let mut silent = connect(&s).await;
    let sent = read_until_closed(&mut silent).await.expect("the server closes a silent connection");
    assert!(sent.is_empty(), "nothing was asked, nothing is answered: {:?}", String::from_utf8_lossy(&sent));
    assert_eq!(healthz(&s).await.expect("/healthz answers"), StatusCode::OK);
}

#[tokio::test]
async fn half_a_request_header_is_closed_after_the_header_read_timeout() {
    let s = TestServer::start_with(|c| c.header_read_timeout = Duration::from_millis(300)).await;
    let mut slow = connect(&s).await;
    slow.write_all(b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\nx-slow: ").await.expect("half a header is sent");
    let sent = read_until_closed(&mut slow).await.expect("the server closes a connection stuck in its header");
    assert!(sent.is_empty(), "an incomplete request is not answered: {:?}", String::from_utf8_lossy(&sent));
    assert_eq!(healthz(&s).await.expect("/healthz answers"), StatusCode::OK);
}

#[tokio::test]
async fn a_kept_alive_connection_that_starts_a_request_and_stalls_is_closed() {
    let s = TestServer::start_with(|c| {
        c.header_read_timeout = Duration::from_millis(300);
        c.idle_timeout = Duration::from_secs(600);
    })
    .await;
    let mut conn = connect(&s).await;
    conn.write_all(get("/healthz").as_bytes()).await.expect("a request is sent");
    let mut seen = Vec::new();
    read_until(&mut conn, &mut seen, "\r\n\r\nok").await;
    // The idle timeout is long; the header timeout starts with the next request's first byte.
    conn.write_all(b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\n").await.expect("half a header is sent");
    let sent = read_until_closed(&mut conn).await.expect("the server closes the stalled request");
    assert!(sent.is_empty(), "{:?}", String::from_utf8_lossy(&sent));
}

#[tokio::test]
async fn connections_over_the_cap_are_answered_503_with_retry_after_until_one_frees() {
    let s = TestServer::start_with(|c| {
        c.max_connections = 3;
        c.header_read_timeout = Duration::from_secs(600);
    })
    .await;
    let mut stalled = Vec::new();
    for _ in 0..3 {
        stalled.push(connect(&s).await);
    }
    // Connections are accepted in order: this one is the fourth.
    let mut over = connect(&s).await;
    over.write_all(get("/healthz").as_bytes()).await.expect("a request is sent");
    let answer = read_until_closed(&mut over).await.expect("the server answers and closes");
    let answer = String::from_utf8_lossy(&answer).to_ascii_lowercase();
    assert!(answer.starts_with("http/1.1 503"), "{answer}");
    assert!(answer.contains("\r\nretry-after: 1\r\n"), "{answer}");
    assert!(answer.contains("\"code\":\"too_many_connections\""), "{answer}");

    // Still over the cap: a client library sees the same answer.
    assert_eq!(healthz(&s).await.expect("/healthz answers"), StatusCode::SERVICE_UNAVAILABLE);

    // One stalled connection goes away; its place is free once the server sees it close.
    drop(stalled.remove(0));
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match healthz(&s).await {
            Ok(StatusCode::OK) => break,
            Ok(StatusCode::SERVICE_UNAVAILABLE) if tokio::time::Instant::now() < deadline => {}
            other => panic!("/healthz after a connection freed: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn an_idle_kept_alive_connection_is_closed_but_an_open_sse_response_is_not() {
    let s = TestServer::start_with(|c| {
        c.idle_timeout = Duration::from_millis(500);
        c.header_read_timeout = Duration::from_secs(600);
        c.sse_max_duration = Duration::from_secs(600);
    })
    .await;
    s.create("/idle/s", "text/plain").await;

    let mut sse = connect(&s).await;
    sse.write_all(get("/idle/s?offset=-1&live=sse").as_bytes()).await.expect("the SSE request is sent");
    let mut events = Vec::new();
    read_until(&mut sse, &mut events, "event: control").await;

    // Opened after the SSE response began; closed once idle for the timeout.
    let mut idle = connect(&s).await;
    idle.write_all(get("/healthz").as_bytes()).await.expect("a request is sent");
    let answer = read_until_closed(&mut idle).await.expect("the server closes an idle kept-alive connection");
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"), "{:?}", String::from_utf8_lossy(&answer));

    // The SSE response has now been quiet for longer than the idle timeout; it still delivers.
    s.append("/idle/s", "text/plain", "still-here").await;
    read_until(&mut sse, &mut events, "still-here").await;
}

#[tokio::test]
async fn http2_with_prior_knowledge_is_still_served() {
    let s = TestServer::start().await;
    let io = hyper_util::rt::TokioIo::new(connect(&s).await);
    let (mut sender, conn) = hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
        .await
        .expect("an HTTP/2 handshake");
    tokio::spawn(conn);
    let req = http::Request::get(s.url("/healthz")).body(http_body_util::Empty::<bytes::Bytes>::new()).unwrap();
    let res = sender.send_request(req).await.expect("/healthz answers over HTTP/2");
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.version(), http::Version::HTTP_2);
}

#[tokio::test]
async fn a_client_that_never_reads_its_sse_response_is_disconnected_and_the_server_keeps_serving() {
    let slow_reader_timeout = Duration::from_millis(500);
    let s = TestServer::start_with(|c| {
        c.slow_reader_timeout = slow_reader_timeout;
        c.sse_max_duration = Duration::from_secs(600);
    })
    .await;
    s.create("/slow/s", "text/plain").await;

    // A small receive window, so that the server's writes block after little data.
    let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
    socket.set_recv_buffer_size(4096).expect("a small receive buffer");
    let mut reader = socket.connect(s.url.trim_start_matches("http://").parse().unwrap()).await.expect("connected");
    reader.write_all(get("/slow/s?offset=-1&live=sse").as_bytes()).await.expect("the SSE request is sent");

    let appended = 16usize << 20;
    for _ in 0..16 {
        s.append("/slow/s", "text/plain", "x".repeat(1 << 20)).await;
    }
    // The client reads nothing for a while: this is the behaviour under test, not a wait for the server.
    tokio::time::sleep(slow_reader_timeout * 6).await;

    let got =
        read_until_closed(&mut reader).await.expect("the server closed the connection of a reader that read nothing");
    assert!(got.len() < appended, "the reader was cut off before the end ({} bytes)", got.len());
    assert!(String::from_utf8_lossy(&got[..64.min(got.len())]).starts_with("HTTP/1.1 200"));

    assert_eq!(healthz(&s).await.expect("/healthz answers"), StatusCode::OK);
    // A new reader resumes from where it likes; the stream is whole.
    let res = s.request(reqwest::Method::GET, "/slow/s").query(&[("offset", "-1")]).send().await.expect("a read");
    assert_eq!(res.status(), StatusCode::OK);
}

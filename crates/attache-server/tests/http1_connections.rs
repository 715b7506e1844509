//! HTTP/1 on one connection, as clients send it: plain requests served by
//! the lean path and the rest (chunked and large bodies, `Expect`, upgrades,
//! HTTP/1.0, malformed or oversized heads) by hyper, on the same connection,
//! in order (docs/ARCHITECTURE.md, "The lean HTTP/1 path"). The clients here
//! speak over raw sockets so that each test controls what goes on the wire.

mod common;

use std::time::Duration;

use common::{connect, TestServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longer than any wait in these tests should take; a wait that runs into it fails the test.
const PATIENCE: Duration = Duration::from_secs(15);

/// One response read off the wire: status, headers (lower-case names) and body.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// Reads exactly one response from `conn` (`pending` holds bytes read ahead),
/// framed by its `content-length`, its chunks, or the end of the connection.
async fn read_answer(conn: &mut TcpStream, pending: &mut Vec<u8>, head_request: bool) -> Answer {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut buf = vec![0u8; 16 << 10];
    let mut more = async |conn: &mut TcpStream, pending: &mut Vec<u8>| -> bool {
        match tokio::time::timeout_at(deadline, conn.read(&mut buf)).await {
            Err(_) => panic!("no whole response within {PATIENCE:?}; got {:?}", String::from_utf8_lossy(pending)),
            Ok(Ok(0)) | Ok(Err(_)) => false,
            Ok(Ok(n)) => {
                pending.extend_from_slice(&buf[..n]);
                true
            }
        }
    };
    let head_end = loop {
        if let Some(at) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        assert!(more(conn, pending).await, "closed before a response head: {:?}", String::from_utf8_lossy(pending));
    };
    let head = String::from_utf8(pending[..head_end].to_vec()).expect("a response head is text");
    pending.drain(..head_end);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    assert!(status_line.starts_with("HTTP/1.1 "), "{status_line}");
    let status = status_line[9..12].parse().expect("a status code");
    let headers: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (n, v) = l.split_once(':').expect("a header line");
            (n.trim().to_ascii_lowercase(), v.trim().to_string())
        })
        .collect();
    let mut answer = Answer { status, headers, body: Vec::new() };
    if head_request || status < 200 || status == 204 || status == 304 {
        return answer;
    }
    if let Some(len) = answer.header("content-length") {
        let len: usize = len.parse().expect("a length");
        while pending.len() < len {
            assert!(more(conn, pending).await, "closed inside a body");
        }
        answer.body = pending.drain(..len).collect();
    } else if answer.header("transfer-encoding") == Some("chunked") {
        loop {
            let line_end = loop {
                if let Some(at) = pending.windows(2).position(|w| w == b"\r\n") {
                    break at;
                }
                assert!(more(conn, pending).await, "closed inside a chunk line");
            };
            let size = usize::from_str_radix(std::str::from_utf8(&pending[..line_end]).expect("hex"), 16).expect("hex");
            pending.drain(..line_end + 2);
            while pending.len() < size + 2 {
                assert!(more(conn, pending).await, "closed inside a chunk");
            }
            answer.body.extend(pending.drain(..size));
            assert_eq!(pending.drain(..2).collect::<Vec<_>>(), b"\r\n");
            if size == 0 {
                break;
            }
        }
    } else {
        while more(conn, pending).await {}
        answer.body = std::mem::take(pending);
    }
    answer
}

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
}

fn post(path: &str, body: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
}

#[tokio::test]
async fn requests_pipelined_in_one_write_are_answered_in_order() {
    let s = TestServer::start().await;
    s.create("/h1/order", "text/plain").await;
    let mut conn = connect(&s).await;
    let batch = format!(
        "{}{}{}{}",
        post("/h1/order", "one"),
        post("/h1/order", "two"),
        get("/h1/order?offset=-1"),
        get("/healthz")
    );
    conn.write_all(batch.as_bytes()).await.expect("the batch is sent");
    let mut pending = Vec::new();
    assert_eq!(read_answer(&mut conn, &mut pending, false).await.status, 204);
    assert_eq!(read_answer(&mut conn, &mut pending, false).await.status, 204);
    let read = read_answer(&mut conn, &mut pending, false).await;
    assert_eq!((read.status, read.body.as_slice()), (200, &b"onetwo"[..]));
    let health = read_answer(&mut conn, &mut pending, false).await;
    assert_eq!((health.status, health.body.as_slice()), (200, &b"ok"[..]));
    assert!(pending.is_empty(), "nothing more: {:?}", String::from_utf8_lossy(&pending));
}

#[tokio::test]
async fn a_chunked_append_and_an_expect_continue_append_after_plain_requests_are_served_on_the_same_connection() {
    let s = TestServer::start().await;
    s.create("/h1/mixed", "text/plain").await;
    let mut conn = connect(&s).await;
    let mut pending = Vec::new();
    conn.write_all(post("/h1/mixed", "plain;").as_bytes()).await.expect("sent");
    assert_eq!(read_answer(&mut conn, &mut pending, false).await.status, 204);
    let chunked = "POST /h1/mixed HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n4\r\nchun\r\n4\r\nked;\r\n0\r\n\r\n";
    conn.write_all(chunked.as_bytes()).await.expect("sent");
    assert_eq!(read_answer(&mut conn, &mut pending, false).await.status, 204);
    let expect = "POST /h1/mixed HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: text/plain\r\nexpect: 100-continue\r\ncontent-length: 8\r\n\r\n";
    conn.write_all(expect.as_bytes()).await.expect("sent");
    let cont = read_answer(&mut conn, &mut pending, false).await;
    assert_eq!(cont.status, 100, "{cont:?}");
    conn.write_all(b"expected").await.expect("sent");
    assert_eq!(read_answer(&mut conn, &mut pending, false).await.status, 204);
    conn.write_all(get("/h1/mixed?offset=-1").as_bytes()).await.expect("sent");
    let read = read_answer(&mut conn, &mut pending, false).await;
    assert_eq!(String::from_utf8_lossy(&read.body), "plain;chunked;expected");
}

#[tokio::test]
async fn an_append_larger_than_the_lean_path_takes_whole_is_stored_whole_and_the_connection_serves_on() {
    let s = TestServer::start().await;
    s.create("/h1/large", "text/plain").await;
    let large = "x".repeat(200 << 10);
    let mut conn = connect(&s).await;
    let mut pending = Vec::new();
    conn.write_all(format!("{}{}", get("/healthz"), post("/h1/large", &large)).as_bytes()).await.expect("sent");
    assert_eq!(read_answer(&mut conn, &mut pending, false).await.status, 200);
    assert_eq!(read_answer(&mut conn, &mut pending, false).await.status, 204);
    conn.write_all(get("/h1/large?offset=-1").as_bytes()).await.expect("sent");
    let read = read_answer(&mut conn, &mut pending, false).await;
    assert_eq!(read.body.len(), large.len());
}

#[tokio::test]
async fn a_head_request_answers_the_length_of_the_read_without_its_body_and_the_connection_serves_on() {
    let s = TestServer::start().await;
    s.create("/h1/head", "text/plain").await;
    s.append("/h1/head", "text/plain", "twelve bytes").await;
    let mut conn = connect(&s).await;
    let mut pending = Vec::new();
    conn.write_all(format!("HEAD /h1/head HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n{}", get("/healthz")).as_bytes())
        .await
        .expect("sent");
    let head = read_answer(&mut conn, &mut pending, true).await;
    assert_eq!(head.status, 200);
    assert!(head.header("stream-next-offset").is_some(), "{head:?}");
    let health = read_answer(&mut conn, &mut pending, false).await;
    assert_eq!((health.status, health.body.as_slice()), (200, &b"ok"[..]), "no body came between: {head:?}");
}

#[tokio::test]
async fn a_websocket_upgrade_after_plain_requests_on_one_connection_is_switched() {
    let s = TestServer::start().await;
    let mut conn = connect(&s).await;
    let mut pending = Vec::new();
    conn.write_all(get("/healthz").as_bytes()).await.expect("sent");
    assert_eq!(read_answer(&mut conn, &mut pending, false).await.status, 200);
    let upgrade = "GET /ws HTTP/1.1\r\nhost: 127.0.0.1\r\nelectric-principal: user:h1\r\nconnection: Upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    conn.write_all(upgrade.as_bytes()).await.expect("sent");
    let switched = read_answer(&mut conn, &mut pending, false).await;
    assert_eq!(switched.status, 101, "{switched:?}");
    assert_eq!(switched.header("sec-websocket-accept"), Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="));
}

#[tokio::test]
async fn an_http10_request_is_answered_and_its_connection_closed() {
    let s = TestServer::start().await;
    let mut conn = connect(&s).await;
    conn.write_all(b"GET /healthz HTTP/1.0\r\nhost: 127.0.0.1\r\n\r\n").await.expect("sent");
    let mut got = Vec::new();
    tokio::time::timeout(PATIENCE, conn.read_to_end(&mut got)).await.expect("closed in time").expect("read");
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("HTTP/1.0 200") || got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(got.ends_with("ok"), "{got}");
}

#[tokio::test]
async fn a_request_head_over_the_connection_buffer_is_answered_431_and_a_malformed_one_400() {
    let s = TestServer::start().await;
    let mut conn = connect(&s).await;
    let huge = format!("GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\nx-big: {}\r\n\r\n", "a".repeat(80 << 10));
    // The server may answer and close before it has read all of it.
    let _ = conn.write_all(huge.as_bytes()).await;
    let mut pending = Vec::new();
    assert_eq!(read_answer(&mut conn, &mut pending, false).await.status, 431);
    let mut conn = connect(&s).await;
    conn.write_all(b"GET /healthz HTTP/1.1\r\nbad header\r\n\r\n").await.expect("sent");
    let mut pending = Vec::new();
    assert_eq!(read_answer(&mut conn, &mut pending, false).await.status, 400);
}

#[tokio::test]
async fn a_client_that_closes_its_connection_during_a_long_poll_is_let_go_at_once() {
    let s = TestServer::start_with(|c| c.long_poll_timeout = Duration::from_secs(600)).await;
    s.create("/h1/gone", "text/plain").await;
    let mut conn = connect(&s).await;
    conn.write_all(get("/h1/gone?offset=now&live=long-poll").as_bytes()).await.expect("sent");
    let open = async || {
        let res = s
            .request(reqwest::Method::GET, "/metrics")
            .header("electric-principal", "user:h1")
            .send()
            .await
            .expect("/metrics answers");
        let text = res.text().await.expect("a body");
        text.lines()
            .find_map(|l| l.strip_prefix("attache_connections_open "))
            .and_then(|v| v.trim().parse::<i64>().ok())
            .expect("attache_connections_open")
    };
    // The long-poll's connection and the one asking.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while open().await < 2 {
        assert!(tokio::time::Instant::now() < deadline, "the long-poll's connection never counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(conn);
    while open().await > 1 {
        assert!(tokio::time::Instant::now() < deadline, "the long-poll outlived its client");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// RFC 9110, 8.6: no `Content-Length` on a 204, and on a 304 none but the
/// length of the 200 it stands for. The router sets `content-length: 0` on
/// every empty answer; hyper dropped it on these, the lean path sent it.
#[tokio::test]
async fn answers_204_and_304_carry_no_content_length() {
    let s = TestServer::start().await;
    s.create("/h1/bodiless", "text/plain").await;
    s.append("/h1/bodiless", "text/plain", "twelve bytes").await;
    let mut conn = connect(&s).await;
    let mut pending = Vec::new();
    conn.write_all(post("/h1/bodiless", "more").as_bytes()).await.expect("sent");
    let appended = read_answer(&mut conn, &mut pending, false).await;
    assert_eq!(appended.status, 204, "{appended:?}");
    assert_eq!(appended.header("content-length"), None, "{appended:?}");
    conn.write_all(get("/h1/bodiless?offset=-1").as_bytes()).await.expect("sent");
    let read = read_answer(&mut conn, &mut pending, false).await;
    let etag = read.header("etag").expect("a read has an etag").to_string();
    let again = format!("GET /h1/bodiless?offset=-1 HTTP/1.1\r\nhost: 127.0.0.1\r\nif-none-match: {etag}\r\n\r\n");
    conn.write_all(format!("{again}{}", get("/healthz")).as_bytes()).await.expect("sent");
    let unchanged = read_answer(&mut conn, &mut pending, false).await;
    assert_eq!(unchanged.status, 304, "{unchanged:?}");
    assert_ne!(unchanged.header("content-length"), Some("0"), "{unchanged:?}");
    let health = read_answer(&mut conn, &mut pending, false).await;
    assert_eq!((health.status, health.body.as_slice()), (200, &b"ok"[..]));
}

/// A client that sends its requests and then shuts down its writing half
/// (`shutdown(SHUT_WR)`) still reads the answers to all it sent, as with
/// hyper, which takes an end of stream behind requests it holds unanswered
/// for a half-close. The lean path took it for a client gone and dropped the
/// request in flight about half the time.
#[tokio::test]
async fn requests_sent_before_the_client_half_closes_are_all_answered() {
    let s = TestServer::start().await;
    s.create("/h1/half", "text/plain").await;
    s.append("/h1/half", "text/plain", "kept").await;
    const SENT: usize = 8;
    let mut conn = connect(&s).await;
    let mut batch = String::new();
    for _ in 0..SENT / 2 {
        batch.push_str(&get("/h1/half?offset=-1"));
        batch.push_str(&get("/healthz"));
    }
    conn.write_all(batch.as_bytes()).await.expect("sent");
    conn.shutdown().await.expect("the writing half is shut");
    let mut got = Vec::new();
    tokio::time::timeout(PATIENCE, conn.read_to_end(&mut got)).await.expect("closed in time").expect("read");
    let got = String::from_utf8_lossy(&got);
    assert_eq!(got.matches("HTTP/1.1 200 OK\r\n").count(), SENT, "{got}");
    assert_eq!(got.matches("kept").count(), SENT / 2, "{got}");
}

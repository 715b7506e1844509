//! Large catch-up reads sent from segment files: the lean HTTP/1 path
//! writes them with `sendfile`, every other path (hyper after a hand-over,
//! HTTP/2) reads the same range in chunks (docs/ARCHITECTURE.md, "Large
//! reads leave by sendfile"). Each test compares what a client receives with
//! what the copied read (a server whose store leaves no read in its file)
//! answers, and counts the responses that went by `sendfile` in `/metrics`.

mod common;

use std::time::Duration;

use common::{connect, read_until_closed, TestServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longer than any wait in these tests should take; a wait that runs into it fails the test.
const PATIENCE: Duration = Duration::from_secs(15);

/// Bytes of the big streams: more than one read takes (`max_read_bytes`, 1 MiB).
const BIG: usize = (1 << 20) + 300_000;

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32).map(|i| (i.wrapping_mul(seed) % 251) as u8).collect()
}

fn offset(n: usize) -> String {
    format!("0000000000000000_{n:016}")
}

/// A binary stream holding `bytes`, written as appends of 64 KiB (as the benchmark fills it).
async fn fill(s: &TestServer, path: &str, bytes: &[u8]) {
    s.create(path, "application/octet-stream").await;
    for chunk in bytes.chunks(64 << 10) {
        s.append(path, "application/octet-stream", chunk.to_vec()).await;
    }
}

/// A server that copies every read, as before reads were sent from files.
async fn copying() -> TestServer {
    TestServer::start_with(|c| c.store_file_body_min = Some(u64::MAX)).await
}

/// A `/metrics` counter.
async fn counter(s: &TestServer, name: &str) -> u64 {
    let client = reqwest::Client::builder().pool_max_idle_per_host(0).timeout(PATIENCE).build().expect("a client");
    let text = client.get(s.url("/metrics")).send().await.expect("/metrics answers").text().await.expect("a body");
    let prefix = format!("{name} ");
    text.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
}

async fn sendfiles(s: &TestServer) -> u64 {
    counter(s, "attache_sendfile_responses_total").await
}

/// A connection whose receive buffer is small, so the server's writes block after little data.
async fn connect_small(s: &TestServer) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
    socket.set_recv_buffer_size(4096).expect("a small receive buffer");
    socket.connect(s.url.trim_start_matches("http://").parse().expect("an address")).await.expect("connected")
}

fn get(target: &str) -> String {
    format!("GET {target} HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
}

/// One response off the wire: status, headers (lower-case names, in order) and body.
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

    /// The headers but `date`, which differs between two servers.
    fn headers_but_date(&self) -> Vec<(String, String)> {
        self.headers.iter().filter(|(n, _)| n != "date").cloned().collect()
    }
}

/// Reads bytes into `pending` until it holds a whole head; returns the head's length.
async fn read_head(conn: &mut TcpStream, pending: &mut Vec<u8>) -> usize {
    let mut buf = vec![0u8; 16 << 10];
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Some(at) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            return at + 4;
        }
        match tokio::time::timeout_at(deadline, conn.read(&mut buf)).await {
            Err(_) => panic!("no response head within {PATIENCE:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => panic!("closed before a response head: {:?}", String::from_utf8_lossy(pending)),
            Ok(Ok(n)) => pending.extend_from_slice(&buf[..n]),
        }
    }
}

fn parse_head(head: &[u8]) -> (u16, Vec<(String, String)>) {
    let head = String::from_utf8(head.to_vec()).expect("a response head is text");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    assert!(status_line.starts_with("HTTP/1.1 ") || status_line.starts_with("HTTP/1.0 "), "{status_line}");
    let status = status_line[9..12].parse().expect("a status code");
    let headers = lines
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (n, v) = l.split_once(':').expect("a header line");
            (n.trim().to_ascii_lowercase(), v.trim().to_string())
        })
        .collect();
    (status, headers)
}

/// Reads one response framed by its `content-length` (or, without one, by the end of the connection).
async fn read_answer(conn: &mut TcpStream, pending: &mut Vec<u8>) -> Answer {
    let head_len = read_head(conn, pending).await;
    let (status, headers) = parse_head(&pending[..head_len]);
    pending.drain(..head_len);
    let mut answer = Answer { status, headers, body: Vec::new() };
    if status == 204 || status == 304 {
        return answer;
    }
    let len: Option<usize> = answer.header("content-length").map(|l| l.parse().expect("a length"));
    assert!(answer.header("transfer-encoding").is_none(), "a read's length is known: {:?}", answer.headers);
    let mut buf = vec![0u8; 256 << 10];
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while len.is_none_or(|len| pending.len() < len) {
        match tokio::time::timeout_at(deadline, conn.read(&mut buf)).await {
            Err(_) => panic!("no whole body within {PATIENCE:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => {
                assert!(len.is_none(), "closed inside a body of {len:?} bytes after {}", pending.len());
                break;
            }
            Ok(Ok(n)) => pending.extend_from_slice(&buf[..n]),
        }
    }
    answer.body = match len {
        Some(len) => pending.drain(..len).collect(),
        None => std::mem::take(pending),
    };
    answer
}

/// `request` on a new connection, and its answer.
async fn exchange(s: &TestServer, request: &str) -> Answer {
    let mut conn = connect(s).await;
    conn.write_all(request.as_bytes()).await.expect("the request is sent");
    read_answer(&mut conn, &mut Vec::new()).await
}

#[tokio::test]
async fn large_reads_on_the_lean_path_go_out_by_sendfile_with_the_bytes_and_headers_of_a_copied_read() {
    let (s, copied) = (TestServer::start().await, copying().await);
    let bytes = pattern(BIG, 7);
    let messages: Vec<String> = (0..30).map(|i| format!("{{\"i\":{i},\"pad\":\"{}\"}}", "p".repeat(5000))).collect();
    for server in [&s, &copied] {
        fill(server, "/big/b", &bytes).await;
        server.create("/big/j", "application/json").await;
        for pair in messages.chunks(2) {
            server.append("/big/j", "application/json", format!("[{}]", pair.join(","))).await;
        }
    }
    let tail = bytes.len();
    // (offset, the bytes the read answers, whether it is sent from the file)
    let reads: [(String, &[u8], bool); 6] = [
        ("-1".into(), &bytes[..1 << 20], true),
        (offset(12_345), &bytes[12_345..12_345 + (1 << 20)], true),
        (offset(1 << 20), &bytes[1 << 20..], true),
        (offset(tail - 70_000), &bytes[tail - 70_000..], true),
        (offset(tail - 1000), &bytes[tail - 1000..], false),
        ("now".into(), b"", false),
    ];
    let before = sendfiles(&s).await;
    let mut sent = 0;
    for (at, want, from_file) in reads {
        let target = format!("/big/b?offset={at}");
        let (got, old) = (exchange(&s, &get(&target)).await, exchange(&copied, &get(&target)).await);
        assert_eq!(got.status, 200, "{target}");
        assert_eq!(got.headers_but_date(), old.headers_but_date(), "{target}");
        assert_eq!(got.body.len(), want.len(), "{target}");
        assert!(got.body == want, "{target}: the bytes differ");
        assert_eq!(old.body, got.body, "{target}");
        sent += u64::from(from_file);
        assert_eq!(sendfiles(&s).await, before + sent, "{target} sent from its file: {from_file}");
    }
    // A JSON stream read whole from its start: `[`, the file, `]`.
    let (got, old) = (exchange(&s, &get("/big/j?offset=-1")).await, exchange(&copied, &get("/big/j?offset=-1")).await);
    assert_eq!(got.headers_but_date(), old.headers_but_date());
    assert_eq!(got.body, format!("[{}]", messages.join(",")).into_bytes());
    assert_eq!(got.body, old.body);
    assert_eq!(sendfiles(&s).await, before + sent + 1);
    // A cached copy is still confirmed by its ETag, without a body.
    let etag = exchange(&s, &get("/big/b?offset=-1")).await.header("etag").expect("an etag").to_owned();
    let again = format!("GET /big/b?offset=-1 HTTP/1.1\r\nhost: 127.0.0.1\r\nif-none-match: {etag}\r\n\r\n");
    let (got, old) = (exchange(&s, &again).await, exchange(&copied, &again).await);
    assert_eq!((got.status, got.headers_but_date()), (old.status, old.headers_but_date()));
    assert_eq!(got.status, 304);
    assert_eq!(sendfiles(&copied).await, 0, "the copying server sends nothing from files");
    // Several reads on one kept-alive connection, one after the other.
    let mut conn = connect(&s).await;
    let mut pending = Vec::new();
    for at in ["-1", &offset(1 << 20), "-1"] {
        conn.write_all(get(&format!("/big/b?offset={at}")).as_bytes()).await.expect("sent");
        let got = read_answer(&mut conn, &mut pending).await;
        let want = if at == "-1" { &bytes[..1 << 20] } else { &bytes[1 << 20..] };
        assert!(got.body == want, "offset {at} on a kept-alive connection");
    }
}

#[tokio::test]
async fn a_large_read_that_spans_a_fork_point_is_copied_and_one_above_it_is_sent_from_the_forks_file() {
    let s = TestServer::start().await;
    let source = pattern(600_000, 3);
    fill(&s, "/src", &source).await;
    let res = s
        .request(reqwest::Method::PUT, "/fork")
        .header("stream-forked-from", "/src")
        .header("stream-fork-offset", offset(400_000))
        .send()
        .await
        .expect("the fork is answered");
    assert_eq!(res.status(), 201);
    let own = pattern(500_000, 5);
    s.append("/fork", "application/octet-stream", own.clone()).await;
    let before = sendfiles(&s).await;
    let across = exchange(&s, &get("/fork?offset=-1")).await;
    let mut want = source[..400_000].to_vec();
    want.extend_from_slice(&own);
    assert!(across.body == want, "the fork's source bytes, then its own");
    assert_eq!(sendfiles(&s).await, before, "a read over two files is copied");
    let above = exchange(&s, &get(&format!("/fork?offset={}", offset(450_000)))).await;
    assert!(above.body == own[50_000..], "the fork's own bytes");
    assert_eq!(above.header("stream-next-offset"), Some(offset(900_000).as_str()));
    assert_eq!(sendfiles(&s).await, before + 1);
}

#[tokio::test]
async fn large_reads_handed_to_hyper_or_over_http2_carry_the_same_bytes_and_headers() {
    let s = TestServer::start().await;
    let bytes = pattern(BIG, 11);
    fill(&s, "/big/h", &bytes).await;
    let lean = exchange(&s, &get("/big/h?offset=-1")).await;
    assert!(lean.body == bytes[..1 << 20]);
    let before = sendfiles(&s).await;
    let same = ["content-type", "content-length", "etag", "stream-next-offset", "stream-up-to-date", "cache-control"];
    let picked = |a: &Answer| same.map(|n| a.header(n).map(str::to_owned));
    for request in [
        // HTTP/1.0, `Expect` and a chunked request body: the lean path hands these to hyper.
        "GET /big/h?offset=-1 HTTP/1.0\r\nhost: 127.0.0.1\r\n\r\n",
        "GET /big/h?offset=-1 HTTP/1.1\r\nhost: 127.0.0.1\r\nexpect: 100-continue\r\n\r\n",
        "GET /big/h?offset=-1 HTTP/1.1\r\nhost: 127.0.0.1\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
    ] {
        let got = exchange(&s, request).await;
        assert_eq!(got.status, 200, "{request}");
        assert_eq!(picked(&got), picked(&lean), "{request}");
        assert!(got.body == bytes[..1 << 20], "{request}: the bytes differ");
    }
    // HTTP/2 with prior knowledge: hyper's connection, the body read in chunks.
    let io = hyper_util::rt::TokioIo::new(connect(&s).await);
    let (mut sender, conn) = hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
        .await
        .expect("an HTTP/2 handshake");
    tokio::spawn(conn);
    for (at, want) in [("-1", &bytes[..1 << 20]), (offset(1 << 20).as_str(), &bytes[1 << 20..])] {
        let req = http::Request::get(s.url(&format!("/big/h?offset={at}")))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .expect("a request");
        let res = sender.send_request(req).await.expect("answered over HTTP/2");
        assert_eq!(res.version(), http::Version::HTTP_2);
        assert_eq!(res.status(), 200);
        let next = res.headers()["stream-next-offset"].to_str().expect("text").to_owned();
        let length = res.headers().get("content-length").map(|v| v.to_str().expect("text").to_owned());
        let body = http_body_util::BodyExt::collect(res.into_body()).await.expect("the body arrives").to_bytes();
        assert!(body == want, "offset {at} over HTTP/2");
        assert_eq!(length, Some(want.len().to_string()));
        if at == "-1" {
            assert_eq!(Some(next.as_str()), lean.header("stream-next-offset"));
        }
    }
    assert_eq!(sendfiles(&s).await, before, "none of these went by sendfile");
}

#[tokio::test]
async fn a_stream_appended_to_or_deleted_while_a_large_read_goes_out_still_sends_the_bytes_the_read_saw() {
    let s = TestServer::start().await;
    let bytes = pattern(1 << 20, 13);
    fill(&s, "/grow", &bytes).await;
    fill(&s, "/gone", &bytes).await;
    let before = sendfiles(&s).await;

    let mut reader = connect_small(&s).await;
    reader.write_all(get("/grow?offset=-1").as_bytes()).await.expect("sent");
    let mut pending = Vec::new();
    let head_len = read_head(&mut reader, &mut pending).await;
    let (status, headers) = parse_head(&pending[..head_len]);
    assert_eq!(status, 200);
    // The read is under way and the client has taken little of it: the stream grows behind it.
    let more = pattern(300_000, 17);
    s.append("/grow", "application/octet-stream", more.clone()).await;
    let got = read_answer_after_head(&mut reader, pending.split_off(head_len), &headers).await;
    assert!(got == bytes, "the read's bytes, not the ones appended while it went out");
    let next = headers.iter().find(|(n, _)| n == "stream-next-offset").map(|(_, v)| v.clone());
    assert_eq!(next, Some(offset(1 << 20)));
    let rest = exchange(&s, &get(&format!("/grow?offset={}", offset(1 << 20)))).await;
    assert!(rest.body == more, "the next read starts where this one ended");

    let mut reader = connect_small(&s).await;
    reader.write_all(get("/gone?offset=-1").as_bytes()).await.expect("sent");
    let mut pending = Vec::new();
    let head_len = read_head(&mut reader, &mut pending).await;
    let (_, headers) = parse_head(&pending[..head_len]);
    let res = s.request(reqwest::Method::DELETE, "/gone").send().await.expect("DELETE is answered");
    assert_eq!(res.status(), 204);
    let got = read_answer_after_head(&mut reader, pending.split_off(head_len), &headers).await;
    assert!(got == bytes, "a stream deleted during the read: its reader still gets what it asked for");
    assert_eq!(exchange(&s, &get("/gone?offset=-1")).await.status, 404);
    // Both went by sendfile (the third read, of 300,000 bytes, too).
    assert_eq!(sendfiles(&s).await, before + 3);
}

/// The body after a head already read (`headers`), starting with `pending`.
async fn read_answer_after_head(conn: &mut TcpStream, mut pending: Vec<u8>, headers: &[(String, String)]) -> Vec<u8> {
    let len: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .map(|(_, v)| v.parse().expect("a length"))
        .expect("a length");
    let mut buf = vec![0u8; 64 << 10];
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while pending.len() < len {
        match tokio::time::timeout_at(deadline, conn.read(&mut buf)).await {
            Err(_) => panic!("no whole body within {PATIENCE:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => panic!("closed inside a body after {} of {len} bytes", pending.len()),
            Ok(Ok(n)) => pending.extend_from_slice(&buf[..n]),
        }
    }
    pending.truncate(len);
    pending
}

#[tokio::test]
async fn a_client_that_stops_reading_a_large_read_is_disconnected_after_the_slow_reader_timeout() {
    let slow_reader_timeout = Duration::from_millis(500);
    let s = TestServer::start_with(|c| c.slow_reader_timeout = slow_reader_timeout).await;
    let bytes = pattern(1 << 20, 19);
    fill(&s, "/slow", &bytes).await;
    let before = (sendfiles(&s).await, counter(&s, "attache_connections_closed_total{reason=\"slow_reader\"}").await);

    let mut reader = connect_small(&s).await;
    reader.write_all(get("/slow?offset=-1").as_bytes()).await.expect("sent");
    // The client reads nothing for a while: this is the behaviour under test, not a wait for the server.
    tokio::time::sleep(slow_reader_timeout * 6).await;
    let got =
        read_until_closed(&mut reader).await.expect("the server closed the connection of a reader that read nothing");
    assert!(String::from_utf8_lossy(&got[..64.min(got.len())]).starts_with("HTTP/1.1 200"));
    assert!(got.len() < bytes.len(), "cut off before the end ({} bytes)", got.len());
    let closed = counter(&s, "attache_connections_closed_total{reason=\"slow_reader\"}").await;
    assert_eq!(closed, before.1 + 1, "closed as a slow reader");
    assert_eq!(sendfiles(&s).await, before.0, "an unfinished send is not counted");
    // The server serves on, from the file again.
    let whole = s.request(reqwest::Method::GET, "/slow").query(&[("offset", "-1")]).send().await.expect("a read");
    assert!(whole.bytes().await.expect("a body") == bytes);
    assert_eq!(sendfiles(&s).await, before.0 + 1);
}

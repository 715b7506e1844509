//! Input bounds: every buffer a client fills has a limit, and a client over
//! it gets its documented answer quickly while the server keeps serving
//! others (docs/SECURITY.md, "Input bounds and caches").

mod common;
mod entity_support;
mod task_helpers;

use std::time::{Duration, Instant};

use common::TestServer;
use entity_support::{
    api, as_principal, error_of, eventually, get_bytes, listed, spawn, upload, upload_raw, Form, BOUNDARY,
};
use futures::{SinkExt, StreamExt};
use reqwest::StatusCode;
use serde_json::{json, Value};
use task_helpers::{rpc_raw, ALICE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::Message;

/// `/healthz` answers at once: the server was not stalled by what a test sent.
async fn assert_responsive(s: &TestServer) {
    let started = Instant::now();
    let res = s.client.get(s.url("/healthz")).send().await.expect("/healthz answers");
    assert_eq!(res.status(), StatusCode::OK);
    assert!(started.elapsed() < Duration::from_secs(2), "/healthz took {:?}", started.elapsed());
}

fn batch_of(n: usize) -> String {
    format!("[{}]", vec![r#"{"jsonrpc":"2.0","method":"task.get","params":{"id":"t-x"},"id":1}"#; n].join(","))
}

#[tokio::test]
async fn a_batch_over_the_limit_is_refused_with_32600_naming_the_limit() {
    let s = TestServer::start().await;
    // Small items, so the body stays under the 4 MiB body limit.
    let body = format!("[{}]", vec![r#"{"id":1}"#; 100_000].join(","));
    let (status, res) = rpc_raw(&s, ALICE, body).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(res["error"]["code"], -32600, "{res}");
    assert!(res["error"]["data"]["reason"].as_str().unwrap_or("").contains("at most 100"), "{res}");
    assert_responsive(&s).await;
}

/// The batch is counted as it is read: the items after the limit are never
/// parsed, so what follows them cannot matter (the old code parsed the whole
/// body into a tree first and answered this with -32700). Memory itself is
/// measured in the report, not here.
#[tokio::test]
async fn a_batch_is_refused_as_soon_as_it_passes_the_limit() {
    let s = TestServer::start_with(|c| c.rpc_max_batch = 10).await;
    let body = format!("{},{}", &batch_of(11)[..batch_of(11).len() - 1], "not json at all");
    let (_, res) = rpc_raw(&s, ALICE, body).await;
    assert_eq!(res["error"]["code"], -32600, "{res}");
    let (_, res) = rpc_raw(&s, ALICE, batch_of(10)).await;
    assert_eq!(res.as_array().map(Vec::len), Some(10), "{res}");
    let (_, res) = rpc_raw(&s, ALICE, "[1,2,").await;
    assert_eq!(res["error"]["code"], -32700, "{res}");
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn ws_connect(s: &TestServer) -> Ws {
    let mut req = s.url("/ws").replace("http://", "ws://").into_client_request().unwrap();
    req.headers_mut().insert("electric-principal", ALICE.parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.expect("the WebSocket opens");
    assert_eq!(ws_next(&mut ws).await["type"], "connected");
    ws
}

/// The next text message as JSON, or `{"closed": code, "reason": ..}` when the server closes.
async fn ws_next(ws: &mut Ws) -> Value {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("a message in time");
        match msg.expect("the socket is open").expect("no error") {
            Message::Text(t) => return serde_json::from_str(&t).unwrap(),
            Message::Close(frame) => {
                let (code, reason) = frame.map(|f| (u16::from(f.code), f.reason.to_string())).unwrap_or_default();
                return json!({ "closed": code, "reason": reason });
            }
            _ => continue,
        }
    }
}

async fn ws_send(ws: &mut Ws, text: String) {
    ws.send(Message::Text(text.into())).await.expect("the message is sent");
}

#[tokio::test]
async fn a_websocket_message_over_the_limit_closes_with_1009() {
    // Small sizes: the whole message fits the socket buffers, so the client's
    // send completes whatever the server does with it.
    let s = TestServer::start_with(|c| c.ws_max_message_bytes = 16 << 10).await;
    let mut ws = ws_connect(&s).await;
    ws_send(&mut ws, format!(r#"{{"action":"ping","pad":"{}"}}"#, "x".repeat(24 << 10))).await;
    let closed = ws_next(&mut ws).await;
    assert_eq!(closed["closed"], 1009, "{closed}");
    assert!(closed["reason"].as_str().unwrap_or("").contains("16384"), "{closed}");
    assert_responsive(&s).await;
}

/// A WebSocket's messages are not a request head: the header budget
/// (`--header-buffer-bytes`, for unfinished HTTP heads) takes none of them.
/// Before (session 16's second attack pass), every byte a socket read after
/// its upgrade was counted as a head and never given back: after ~16 MiB an
/// honest socket was closed (1002), and while it stayed open, every other
/// client's large head or WebSocket message was refused.
#[tokio::test]
async fn websocket_traffic_takes_nothing_from_the_header_budget() {
    let s = TestServer::start_with(|c| c.header_buffer_bytes = 16 << 10).await;
    let mut ws = ws_connect(&s).await;
    for i in 0..20 {
        ws_send(&mut ws, format!(r#"{{"action":"ping","pad":"{}"}}"#, "x".repeat(4 << 10))).await;
        let answer = ws_next(&mut ws).await;
        assert_eq!(answer["type"], "pong", "message {i}: {answer}");
    }
    // A large head from another client still fits the budget.
    let res = s.request(reqwest::Method::GET, "/healthz").header("x-pad", "p".repeat(20 << 10)).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
}

/// Fragments count together: many small frames of one message pass the
/// limit as surely as one big frame (the old limit was tungstenite's 64 MiB).
#[tokio::test]
async fn a_fragmented_websocket_message_over_the_limit_closes_with_1009() {
    let s = TestServer::start_with(|c| c.ws_max_message_bytes = 64 << 10).await;
    let mut ws = ws_connect(&s).await;
    // A message just under the limit, in fragments, still works.
    let mut fragments = vec![Frame::message(r#"{"action":"ping","pad":""#, OpCode::Data(Data::Text), false)];
    fragments.extend((0..7).map(|_| Frame::message("x".repeat(8 << 10), OpCode::Data(Data::Continue), false)));
    fragments.push(Frame::message(r#""}"#, OpCode::Data(Data::Continue), true));
    for f in fragments {
        ws.send(Message::Frame(f)).await.expect("a fragment is sent");
    }
    assert_eq!(ws_next(&mut ws).await["type"], "pong");
    // Twelve fragments of 8 KiB: 96 KiB in one message.
    ws.send(Message::Frame(Frame::message(r#"{"action":"ping","pad":""#, OpCode::Data(Data::Text), false)))
        .await
        .unwrap();
    for _ in 0..12 {
        let f = Frame::message("x".repeat(8 << 10), OpCode::Data(Data::Continue), false);
        if ws.send(Message::Frame(f)).await.is_err() {
            break; // the server closed already
        }
    }
    let closed = ws_next(&mut ws).await;
    assert_eq!(closed["closed"], 1009, "{closed}");
}

/// Session 13's attack: a message begun and never finished held its bytes for
/// as long as the client answered pings (pongs kept the connection from
/// idling). It must end within `--body-read-timeout`, pongs or not.
#[tokio::test]
async fn a_websocket_message_left_unfinished_is_closed_with_1008_at_the_body_read_timeout_though_pongs_arrive() {
    let s = TestServer::start_with(|c| {
        c.body_read_timeout = Duration::from_secs(1);
        c.idle_timeout = Duration::from_secs(2);
    })
    .await;
    let mut ws = ws_connect(&s).await;
    let first = Frame::message(r#"{"action":"ping","pad":""#, OpCode::Data(Data::Text), false);
    ws.send(Message::Frame(first)).await.expect("a fragment is sent");
    let started = Instant::now();
    let closed = loop {
        assert!(started.elapsed() < Duration::from_secs(8), "the unfinished message was never cut off");
        match tokio::time::timeout(Duration::from_millis(200), ws.next()).await {
            Ok(Some(Ok(Message::Close(frame)))) => break frame.expect("a close frame with a code"),
            Ok(Some(Ok(_))) => {}
            Ok(other) => panic!("the socket ended without a close frame: {other:?}"),
            // A pong every 200 ms: the connection is never idle.
            Err(_) => ws.send(Message::Pong(Default::default())).await.expect("a pong is sent"),
        }
    };
    assert_eq!(u16::from(closed.code), 1008, "{closed:?}");
    assert!(closed.reason.contains("body_read_timeout"), "{closed:?}");
    assert!(started.elapsed() < Duration::from_secs(3), "closed after {:?}", started.elapsed());
    assert_responsive(&s).await;
}

/// No WebSocket opens over HTTP/2: the server offers no extended CONNECT
/// (RFC 8441), so every WebSocket is an HTTP/1.1 connection that
/// `--max-connections` counts. (Offered for part of session 14, up to 100
/// sockets shared one counted connection, and the tunnel was cut by the
/// header timeout.)
#[tokio::test]
async fn a_websocket_does_not_open_over_http2() {
    let s = TestServer::start().await;
    let io = hyper_util::rt::TokioIo::new(common::connect(&s).await);
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io).await.expect("HTTP/2");
    tokio::spawn(conn);
    let mut req = http::Request::connect(s.url("/ws"))
        .header("sec-websocket-version", "13")
        .header("electric-principal", ALICE)
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    req.extensions_mut().insert(hyper::ext::Protocol::from_static("websocket"));
    // The client refuses to send it (the server did not enable the protocol), or the server refuses it.
    if let Ok(res) = sender.send_request(req).await {
        assert!(!res.status().is_success(), "{}", res.status());
    }
    // A GET upgrade over HTTP/2 is no handshake either.
    let res =
        s.client.get(s.url("/ws")).version(http::Version::HTTP_2).header("electric-principal", ALICE).send().await;
    if let Ok(res) = res {
        assert!(!res.status().is_success(), "{}", res.status());
    }
}

/// What an HTTP/2 client may send that no handler reads is RFC 9113's initial
/// window, 64 KiB a stream and a connection, not hyper's 1 MiB: bytes sent
/// with a long-poll (whose handler reads no body) sat in that window
/// outside every budget (200 connections: 182 MiB, session 14).
#[tokio::test]
async fn http2_request_bytes_no_handler_reads_stay_within_a_64_kib_window() {
    let s = TestServer::start().await;
    s.create("/h2/window", "text/plain").await;
    let io = hyper_util::rt::TokioIo::new(common::connect(&s).await);
    let (mut sender, conn) = hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .max_send_buf_size(16 << 10)
        .handshake(io)
        .await
        .expect("HTTP/2");
    tokio::spawn(conn);
    let taken = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = taken.clone();
    // 2 MiB in 16 KiB chunks, counted as the client's HTTP/2 layer takes them.
    let chunks = futures::stream::iter((0..128).map(move |_| {
        counted.fetch_add(16 << 10, std::sync::atomic::Ordering::Relaxed);
        Ok::<_, std::convert::Infallible>(http_body::Frame::data(bytes::Bytes::from(vec![b'x'; 16 << 10])))
    }));
    let req = http::Request::get(s.url("/h2/window?offset=now&live=long-poll"))
        .header("electric-principal", ALICE)
        .body(http_body_util::StreamBody::new(chunks))
        .unwrap();
    let answer = tokio::spawn(sender.send_request(req));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let sent = taken.load(std::sync::atomic::Ordering::Relaxed);
    // The window, plus what the client buffers (16 KiB) and the chunk in hand.
    assert!(sent <= 160 << 10, "the server let {sent} bytes in");
    answer.abort();
}

/// A client that floods pings and reads nothing is not read from once the
/// server's answers to it wait: its sends stall. Before, tungstenite queued a
/// pong for every ping while the server read on, and one such connection grew
/// the server by ~900 MiB in 10 s (session 14).
#[tokio::test]
async fn a_ping_flood_from_a_client_that_reads_nothing_stalls_instead_of_queueing_pongs() {
    let s = TestServer::start().await;
    let mut conn = raw_ws(&s).await;
    // 500 masked pings of 125 bytes each: 65.5 KB a write.
    let mut ping = vec![0x89, 0x80 | 125, 1, 2, 3, 4];
    ping.extend_from_slice(&[0u8; 125]);
    let batch: Vec<u8> = ping.iter().copied().cycle().take(ping.len() * 500).collect();
    let started = Instant::now();
    let mut sent = 0usize;
    let stalled = loop {
        if started.elapsed() > Duration::from_secs(20) {
            break false;
        }
        match tokio::time::timeout(Duration::from_secs(1), conn.write_all(&batch)).await {
            Ok(Ok(())) => sent += batch.len(),
            Ok(Err(e)) => panic!("the server closed the flood after {sent} bytes: {e}"),
            Err(_) => break true,
        }
    };
    assert!(stalled, "the server read {sent} bytes of pings from a client that read none of its pongs");
    assert_responsive(&s).await;
}

/// A control frame carries at most 125 bytes (RFC 6455 5.5); one declaring
/// more closes the socket with 1002 at its header. Before, tungstenite
/// reserved the declared length (up to the message limit) first, and a ping
/// declaring 1 MiB, never finished, held it uncharged (300 sockets: 325 MiB).
#[tokio::test]
async fn a_control_frame_declaring_more_than_125_bytes_closes_the_socket_with_1002() {
    let s = TestServer::start().await;
    let mut conn = raw_ws(&s).await;
    let mut ping = vec![0x89, 0x80 | 127];
    ping.extend_from_slice(&(1u64 << 20).to_be_bytes());
    ping.extend_from_slice(&[1, 2, 3, 4, 0, 0]);
    conn.write_all(&ping).await.unwrap();
    let sent = common::read_until_closed(&mut conn).await.expect("the socket is closed");
    assert_eq!(close_code_in(&sent), Some(1002), "{:?}", String::from_utf8_lossy(&sent));
}

/// A data frame that would take its message past `--ws-max-message-bytes`
/// closes the socket with 1009 at its header. tungstenite checks the
/// message's size only once a frame is whole: a first fragment of almost the
/// limit and a second frame declaring as much, never finished, held twice what
/// the body budget was charged (session 14's second attack pass).
#[tokio::test]
async fn a_fragment_that_would_pass_the_message_limit_closes_the_socket_at_its_header() {
    let s = TestServer::start_with(|c| c.ws_max_message_bytes = 64 << 10).await;
    let mut conn = raw_ws(&s).await;
    // A first fragment of 60 KiB, whole.
    let mut first = vec![0x01, 0x80 | 126];
    first.extend_from_slice(&(60u16 << 10).to_be_bytes());
    first.extend_from_slice(&[0, 0, 0, 0]);
    first.extend_from_slice(&[b' '; 60 << 10]);
    conn.write_all(&first).await.unwrap();
    // Then only the header of a continuation declaring 60 KiB more.
    let mut second = vec![0x80, 0x80 | 126];
    second.extend_from_slice(&(60u16 << 10).to_be_bytes());
    second.extend_from_slice(&[0, 0, 0, 0]);
    conn.write_all(&second).await.unwrap();
    let sent = common::read_until_closed(&mut conn).await.expect("the socket is closed at the header");
    assert_eq!(close_code_in(&sent), Some(1009), "{:?}", String::from_utf8_lossy(&sent));
}

/// Each request in flight on an HTTP/2 connection beyond its first takes a
/// place of `--max-connections` of its own, so waiting requests cost places
/// however they arrive. Before, 100 long-polls shared one HTTP/2 connection's
/// single place: 1,000 connections held 100,000 of them, 1.2 GiB, with
/// nothing counted (session 14's second attack pass).
type Waiting = Vec<tokio::task::JoinHandle<Result<StatusCode, hyper::Error>>>;

/// `n` long-polls of `path` as `who` over one HTTP/2 connection, 20 ms apart;
/// how many were refused at once (503, within 300 ms), the connection's
/// driver, the ones still waiting and the sender that keeps it open.
async fn h2_long_polls(
    s: &TestServer,
    path: &str,
    who: &str,
    n: usize,
) -> (
    usize,
    tokio::task::JoinHandle<Result<(), hyper::Error>>,
    Waiting,
    hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>,
) {
    let io = hyper_util::rt::TokioIo::new(common::connect(s).await);
    let (sender, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io).await.expect("HTTP/2");
    let driver = tokio::spawn(conn);
    let mut waiting = Vec::new();
    for _ in 0..n {
        let req = http::Request::get(s.url(&format!("{path}?offset=now&live=long-poll")))
            .header("electric-principal", who)
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let mut sender = sender.clone();
        waiting.push(tokio::spawn(async move { sender.send_request(req).await.map(|r| r.status()) }));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut refused = 0;
    for w in &mut waiting {
        if let Ok(Ok(Ok(status))) = tokio::time::timeout(Duration::from_millis(300), &mut *w).await {
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
            refused += 1;
        }
    }
    (refused, driver, waiting, sender)
}

#[tokio::test]
async fn http2_requests_in_flight_beyond_the_first_take_places_of_max_connections() {
    let s = TestServer::start_with(|c| {
        c.max_connections = 6;
        c.long_poll_timeout = Duration::from_secs(5);
        // One principal: no share of the places (the test below has shares).
        c.budget_share_per_principal = 100;
    })
    .await;
    // Created over a connection that closes after it: no idle one holds a place (a new
    // connection at the cap would take the place of an idle one, closing it).
    let once = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let created = once.put(s.url("/h2/places")).header("content-type", "text/plain").send().await.unwrap();
    assert!(created.status().is_success());
    // The connection's place and the five others: four long-polls are refused at once
    // (five if the create's connection has not closed yet).
    let (refused, driver, waiting, sender) = h2_long_polls(&s, "/h2/places", "user:anonymous", 10).await;
    assert!((4..=5).contains(&refused), "{refused} requests refused of 10 with 6 places");
    // Every place is taken by a request in flight: a new connection is over the cap too.
    let fresh = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let res = fresh.get(s.url("/healthz")).send().await.expect("an answer");
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    // The HTTP/2 connection goes: its places come back once its requests end (a
    // long-poll at its timeout: hyper runs each stream's request as a task of its own).
    driver.abort();
    drop((waiting, sender));
    entity_support::eventually(Duration::from_secs(15), "the places to come back", || async {
        let client = reqwest::Client::builder().pool_max_idle_per_host(0).build().ok()?;
        let res = client.get(s.url("/healthz")).send().await.ok()?;
        (res.status() == StatusCode::OK).then_some(())
    })
    .await;
}

/// An HTTP/2 stream whose client opens no flow-control window is a slow
/// reader: hyper never asks its response body for a byte, so no write ever
/// blocks, and each such stream held a place of `--max-connections` for as
/// long as the client kept the connection (session 15's attack pass: 42
/// connections that send nothing after their requests, 401s included, held
/// all 4,096 places and every client, `/healthz` too, was answered 503). A
/// response body not asked for more within four `--slow-reader-timeout`s now
/// closes its connection, and the places come back.
#[tokio::test]
async fn http2_streams_whose_client_opens_no_window_are_cut_as_slow_readers() {
    let s = TestServer::start_with(|c| {
        c.max_connections = 8;
        c.slow_reader_timeout = Duration::from_millis(500);
    })
    .await;
    s.create("/h2/stalled", "text/plain").await;
    s.append("/h2/stalled", "text/plain", "x".repeat(20_000)).await;
    let io = hyper_util::rt::TokioIo::new(common::connect(&s).await);
    let (sender, conn) = hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .initial_stream_window_size(0)
        .adaptive_window(false)
        .handshake(io)
        .await
        .expect("HTTP/2");
    let driver = tokio::spawn(conn);
    let mut heads = Vec::new();
    for path in ["/h2/stalled?offset=-1", "/h2/stalled?offset=-1", "/h2/stalled?offset=-1", "/no/such/stream"] {
        let req = http::Request::get(s.url(path)).body(http_body_util::Empty::<bytes::Bytes>::new()).unwrap();
        let mut sender = sender.clone();
        heads.push(tokio::spawn(async move { sender.send_request(req).await }));
    }
    // Their heads come (a head needs no window); no body byte can.
    let mut responses = Vec::new();
    for head in heads {
        let res =
            tokio::time::timeout(Duration::from_secs(5), head).await.expect("a head").unwrap().expect("a response");
        responses.push(res);
    }
    let started = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(10), driver).await;
    assert!(ended.is_ok(), "the server closes the connection of streams that take no byte");
    let waited = started.elapsed();
    assert!(waited < Duration::from_secs(5), "closed {waited:?} after the heads: four 0.5 s slow-reader timeouts");
    drop((responses, sender));
    let metrics = s.request(reqwest::Method::GET, "/metrics").send().await.unwrap().text().await.unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("attache_connections_closed_total{reason=\"slow_reader\"}") && !l.ends_with(" 0")),
        "counted as a slow reader: {metrics}"
    );
    // Every place is back: a round of fresh connections is served.
    for _ in 0..7 {
        let fresh = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
        assert_eq!(fresh.get(s.url("/healthz")).send().await.unwrap().status(), StatusCode::OK);
    }
}

/// The places HTTP/2 requests take count to their principal, within
/// `--budget-share-per-principal` of `--max-connections`, as the budgets do:
/// one principal's (or the unauthenticated clients') waiting requests over
/// one connection hold at most its share, and everyone else still connects.
/// Before (session 15's second attack pass), any client could take every
/// place with the requests of a few HTTP/2 connections (401s answered to
/// unauthenticated ones included, the connections opened again as they were
/// cut), and every other client, `/healthz` too, was answered 503.
#[tokio::test]
async fn one_principals_http2_requests_hold_at_most_its_share_of_the_places() {
    let s = TestServer::start_with(|c| {
        c.max_connections = 12;
        c.long_poll_timeout = Duration::from_secs(5);
    })
    .await;
    let made = s.request(reqwest::Method::PUT, "/h2/shared").header("electric-principal", "user:mallory");
    assert!(made.header("content-type", "text/plain").send().await.unwrap().status().is_success());
    // The connection's own place and a quarter of 12 (3) beyond it: six are refused at once.
    let (refused, driver, _waiting, _sender) = h2_long_polls(&s, "/h2/shared", "user:mallory", 10).await;
    assert_eq!(refused, 6, "mallory's requests beyond its share of the places are refused");
    // Others still find places: fresh connections are served.
    for _ in 0..4 {
        let fresh = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
        let res = fresh.get(s.url("/healthz")).header("electric-principal", ALICE).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }
    driver.abort();
}

/// A client's close frame is answered with the server's (RFC 6455 5.5.1), so
/// a client closing normally sees a clean close, not 1006. Before, the server
/// dropped the socket with the reply still queued.
#[tokio::test]
async fn a_websocket_closed_by_its_client_is_answered_with_a_close_frame() {
    let s = TestServer::start().await;
    let mut ws = ws_connect(&s).await;
    ws.close(None).await.expect("the close frame is sent");
    match tokio::time::timeout(Duration::from_secs(5), ws.next()).await.expect("an answer in time") {
        Some(Ok(Message::Close(_))) => {}
        other => panic!("expected the server's close frame, got {other:?}"),
    }
}

/// A raw `/ws` connection, upgraded, its `connected` message read.
async fn raw_ws(s: &TestServer) -> tokio::net::TcpStream {
    raw_ws_as(s, ALICE).await
}

/// [`raw_ws`] as `principal`.
async fn raw_ws_as(s: &TestServer, principal: &str) -> tokio::net::TcpStream {
    let mut conn = common::connect(s).await;
    let upgrade = format!(
        "GET /ws HTTP/1.1\r\nhost: 127.0.0.1\r\nelectric-principal: {principal}\r\nconnection: Upgrade\r\n\
         upgrade: websocket\r\nsec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    conn.write_all(upgrade.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") {
        conn.read_exact(&mut byte).await.expect("the upgrade is answered");
        got.push(byte[0]);
    }
    assert!(got.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&got));
    // The `connected` message: a short unmasked text frame.
    let mut head = [0u8; 2];
    conn.read_exact(&mut head).await.expect("the connected message");
    assert_eq!((head[0], head[1] < 126), (0x81, true), "a short text frame first");
    let mut connected = vec![0u8; head[1] as usize];
    conn.read_exact(&mut connected).await.expect("the connected message");
    assert!(String::from_utf8_lossy(&connected).contains("connected"));
    conn
}

/// The close code of the server's close frame among `frames` (server frames are unmasked).
fn close_code_in(mut frames: &[u8]) -> Option<u16> {
    while frames.len() >= 2 {
        let (len, at) = match frames[1] & 0x7f {
            126 => (u16::from_be_bytes([frames[2], frames[3]]) as usize, 4),
            127 => (u64::from_be_bytes(frames[2..10].try_into().ok()?) as usize, 10),
            n => (n as usize, 2),
        };
        let payload = frames.get(at..at + len)?;
        if frames[0] & 0x0f == 8 {
            return Some(u16::from_be_bytes([*payload.first()?, *payload.get(1)?]));
        }
        frames = &frames[at + len..];
    }
    None
}

/// tungstenite reserves a frame's declared length when it reads the header:
/// 14 bytes sent cost the server the whole frame. Messages in progress hold
/// their declared bytes of the body budget, and one that would pass it ends
/// its socket with 1013 (try again later).
#[tokio::test]
async fn websocket_messages_in_progress_hold_the_body_budget_and_one_past_it_closes_with_1013() {
    let s = TestServer::start_with(|c| {
        c.body_buffer_bytes = 1 << 20;
        // The whole budget, not one principal's share of it (the next test).
        c.budget_share_per_principal = 100;
        c.ws_max_message_bytes = 600 << 10;
    })
    .await;
    let started = frame_begun(500 << 10);
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut conn = raw_ws(&s).await;
        conn.write_all(&started).await.unwrap();
        held.push(conn);
    }
    let mut third = raw_ws(&s).await;
    third.write_all(&started).await.unwrap();
    let sent = common::read_until_closed(&mut third).await.expect("the third socket is closed");
    assert_eq!(close_code_in(&sent), Some(1013), "{:?}", String::from_utf8_lossy(&sent));
    // The two within the budget are still open; once one goes, its bytes come back.
    for conn in &mut held {
        let mut byte = [0u8; 1];
        let still = tokio::time::timeout(Duration::from_millis(100), conn.read(&mut byte)).await;
        assert!(still.is_err(), "a socket within the budget stays open: {still:?}");
    }
    held.pop();
    let again = eventually(Duration::from_secs(5), "the budget to take a message again", || async {
        let mut conn = raw_ws(&s).await;
        conn.write_all(&started).await.unwrap();
        let mut byte = [0u8; 64];
        match tokio::time::timeout(Duration::from_millis(200), conn.read(&mut byte)).await {
            Err(_) => Some(conn),
            Ok(_) => None,
        }
    })
    .await;
    drop((again, held));
    assert_responsive(&s).await;
}

/// A masked text frame's header declaring `len` bytes, and 10 bytes of it.
fn frame_begun(len: u64) -> Vec<u8> {
    let mut started = vec![0x81, 0x80 | 127];
    started.extend_from_slice(&len.to_be_bytes());
    started.extend_from_slice(&[1, 2, 3, 4]);
    started.extend_from_slice(&[b'x'; 10]);
    started
}

/// Messages in progress count to their principal's share of the body budget
/// (`--budget-share-per-principal`), as its HTTP bodies do: one principal's
/// unfinished messages cannot hold the budget every other principal needs.
#[tokio::test]
async fn one_principals_websocket_messages_in_progress_hold_at_most_its_share_of_the_body_budget() {
    let s = TestServer::start_with(|c| {
        c.body_buffer_bytes = 1 << 20;
        c.budget_share_per_principal = 25;
        c.ws_max_message_bytes = 600 << 10;
    })
    .await;
    let started = frame_begun(200 << 10);
    // Mallory's first message takes 200 KiB of her 256 KiB share; her second would pass it.
    let mut first = raw_ws_as(&s, "user:mallory").await;
    first.write_all(&started).await.unwrap();
    let mut second = raw_ws_as(&s, "user:mallory").await;
    second.write_all(&started).await.unwrap();
    let sent = common::read_until_closed(&mut second).await.expect("mallory's second socket is closed");
    assert_eq!(close_code_in(&sent), Some(1013), "{:?}", String::from_utf8_lossy(&sent));
    assert!(String::from_utf8_lossy(&sent).contains("budget_share_per_principal"));
    // Alice still finds room.
    let mut alice = raw_ws_as(&s, ALICE).await;
    alice.write_all(&started).await.unwrap();
    let mut byte = [0u8; 1];
    let still = tokio::time::timeout(Duration::from_millis(300), alice.read(&mut byte)).await;
    assert!(still.is_err(), "alice's message within her share keeps its socket open: {still:?}");
    drop((first, alice));
}

#[tokio::test]
async fn a_subscribe_with_100000_patterns_is_refused_at_once() {
    let s = TestServer::start().await;
    let mut ws = ws_connect(&s).await;
    let patterns: Vec<String> = (0..100_000).map(|i| format!("p{i}")).collect();
    let started = Instant::now();
    ws_send(&mut ws, json!({ "action": "subscribe", "events": patterns }).to_string()).await;
    let refused = ws_next(&mut ws).await;
    assert_eq!(refused["type"], "error", "{refused}");
    assert_eq!(refused["error"]["code"], -32602, "{refused}");
    assert!(refused["error"]["message"].as_str().unwrap_or("").contains("at most 100"), "{refused}");
    assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
    assert_responsive(&s).await;
    // Nothing of the refused list was kept; the connection goes on.
    ws_send(&mut ws, json!({ "action": "subscribe", "events": ["task.*"] }).to_string()).await;
    let ok = ws_next(&mut ws).await;
    assert_eq!(ok["events"], json!(["task.*"]), "{ok}");
}

#[tokio::test]
async fn patterns_are_capped_per_connection_across_subscribes() {
    let s = TestServer::start_with(|c| c.ws_max_patterns = 3).await;
    let mut ws = ws_connect(&s).await;
    ws_send(&mut ws, json!({ "action": "subscribe", "events": ["a", "b", "a"] }).to_string()).await;
    assert_eq!(ws_next(&mut ws).await["events"], json!(["a", "b"]));
    ws_send(&mut ws, json!({ "action": "subscribe", "events": ["c", "d"] }).to_string()).await;
    let refused = ws_next(&mut ws).await;
    assert_eq!(refused["error"]["code"], -32602, "{refused}");
    ws_send(&mut ws, json!({ "action": "unsubscribe", "events": ["a"] }).to_string()).await;
    assert_eq!(ws_next(&mut ws).await["type"], "unsubscribed");
    ws_send(&mut ws, json!({ "action": "subscribe", "events": ["c", "d"] }).to_string()).await;
    assert_eq!(ws_next(&mut ws).await["events"], json!(["b", "c", "d"]));
}

/// Every `subscribed` reply echoes the patterns held: with patterns of any
/// length, a hundred subscribes of 1 MiB made the hundredth reply 100 MiB
/// (4.9 GB sent back to one connection). A pattern is at most 256 bytes.
#[tokio::test]
async fn a_pattern_longer_than_256_bytes_is_refused_and_replies_stay_small() {
    let s = TestServer::start().await;
    let mut ws = ws_connect(&s).await;
    let long = format!("task.{}", "a".repeat(300 << 10));
    ws_send(&mut ws, json!({ "action": "subscribe", "events": ["task.created", long] }).to_string()).await;
    let refused = ws_next(&mut ws).await;
    assert_eq!(refused["error"]["code"], -32602, "{refused}");
    assert!(refused["error"]["message"].as_str().unwrap_or("").contains("256 bytes"), "{refused}");
    let at_most = format!("task.{}", "b".repeat(251));
    ws_send(&mut ws, json!({ "action": "subscribe", "events": [at_most] }).to_string()).await;
    assert_eq!(ws_next(&mut ws).await["events"], json!([at_most]), "nothing of the refused subscribe was kept");
}

const FILES: &str = "/chat/bounds";

/// Sends the start of an upload that declares 300 MiB, with one part header
/// that never ends, and returns what the server answers within 10 s. The
/// old parser buffered the header until it ended; this one answers after at
/// most the limit.
async fn answer_to_endless_part_header(s: &TestServer, header_bytes: usize) -> String {
    let addr = s.url.trim_start_matches("http://").to_owned();
    let mut sock = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST {}/attachments HTTP/1.1\r\nHost: {addr}\r\nelectric-principal: {ALICE}\r\nContent-Type: {}\r\nContent-Length: {}\r\n\r\n",
        api(FILES),
        Form::content_type(),
        300u64 << 20
    );
    sock.write_all(head.as_bytes()).await.unwrap();
    let mut body = Form::new().field("id", "endless").unfinished();
    body.extend_from_slice(
        format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"\r\nX-Pad: ").as_bytes(),
    );
    body.extend(std::iter::repeat_n(b'a', header_bytes));
    // The server may stop reading (and answer) before all of this is written.
    let _ = sock.write_all(&body).await;
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
            match sock.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "no answer within 10 s to a part header that never ends");
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn an_endless_part_header_is_refused_after_the_limit_while_the_server_serves_others() {
    let s = TestServer::start().await;
    spawn(&s, Some(ALICE), FILES).await;
    let answer = answer_to_endless_part_header(&s, 1 << 20).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert_responsive(&s).await;
    // A header within the limit still works.
    let form = Form::new().field("id", "fine").file(Some("a.txt"), Some("text/plain"), b"bytes").finish();
    let res = as_principal(s.request(reqwest::Method::POST, &format!("{}/attachments", api(FILES))), Some(ALICE))
        .header("content-type", Form::content_type())
        .body(form)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
}

#[tokio::test]
async fn a_part_header_past_the_limit_is_400_part_headers_too_large() {
    let s = TestServer::start_with(|c| c.multipart_max_part_header_bytes = 1024).await;
    spawn(&s, Some(ALICE), FILES).await;
    let padded = format!("Content-Disposition: form-data; name=\"file\"\r\nX-Pad: {}", "a".repeat(2000));
    let form = Form::new().field("id", "padded").part(&padded, b"bytes").finish();
    let res = as_principal(s.request(reqwest::Method::POST, &format!("{}/attachments", api(FILES))), Some(ALICE))
        .header("content-type", Form::content_type())
        .body(form)
        .send()
        .await
        .unwrap();
    let (status, code, body) = error_of(res).await;
    assert_eq!((status, code.as_str()), (StatusCode::BAD_REQUEST, "PART_HEADERS_TOO_LARGE"), "{body}");
}

#[tokio::test]
async fn a_form_with_too_many_text_fields_is_400_too_many_fields() {
    let s = TestServer::start().await;
    spawn(&s, Some(ALICE), FILES).await;
    let post = |form: Vec<u8>| {
        as_principal(s.request(reqwest::Method::POST, &format!("{}/attachments", api(FILES))), Some(ALICE))
            .header("content-type", Form::content_type())
            .body(form)
            .send()
    };
    let mut form = Form::new().field("id", "many");
    for i in 0..64 {
        form = form.field(&format!("unknown{i}"), "x");
    }
    let res = post(form.file(Some("a.txt"), Some("text/plain"), b"bytes").finish()).await.unwrap();
    let (status, code, body) = error_of(res).await;
    assert_eq!((status, code.as_str()), (StatusCode::BAD_REQUEST, "TOO_MANY_FIELDS"), "{body}");
    // 64 text fields in all (the id, the subject and 62 more) are fine.
    let mut form = Form::new().field("id", "enough").field("subject", r#"{"type":"context","key":"k"}"#);
    for i in 0..62 {
        form = form.field(&format!("unknown{i}"), "x");
    }
    let res = post(form.file(Some("a.txt"), Some("text/plain"), b"bytes").finish()).await.unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
}

/// POSTs `initialize` to `/mcp` as alice; the status and the new session's id.
async fn mcp_initialize(s: &TestServer) -> (StatusCode, Option<String>) {
    mcp_initialize_as(s, ALICE).await
}

async fn mcp_initialize_as(s: &TestServer, principal: &str) -> (StatusCode, Option<String>) {
    let res = s
        .client
        .post(s.url("/mcp"))
        .header("electric-principal", principal)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .body(r#"{"jsonrpc":"2.0","method":"initialize","params":{"protocolVersion":"2025-03-26","capabilities":{},"clientInfo":{"name":"t","version":"1"}},"id":1}"#)
        .send()
        .await
        .expect("/mcp answers");
    (res.status(), common::header(&res, "mcp-session-id"))
}

/// The registry keeps every entity in memory, so one principal holds at
/// most `--max-entities-per-principal` of them (tasks included): past it a
/// spawn, an entity fork and `task.create` are refused (409
/// `TOO_MANY_ENTITIES`; -32602 with `data.code` on the task face) and nothing
/// is made, while other principals go on and a purge makes room. Before
/// (session 15's attack pass), 3,000 entities with 60 KB of args took
/// +280 MB, kept across restarts, with nothing to stop more.
#[tokio::test]
async fn one_principal_holds_at_most_its_entity_quota_and_a_purge_makes_room() {
    let s = TestServer::start_with(|c| c.max_entities_per_principal = 3).await;
    const MALLORY: &str = "user:mallory";
    for e in ["/chat/q1", "/chat/q2"] {
        entity_support::spawn(&s, Some(MALLORY), e).await;
    }
    task_helpers::ok(&s, MALLORY, "task.create", json!({ "id": "t-q3", "text": "third" })).await;
    let refused = |res: reqwest::Response| async move {
        let (status, code, body) = entity_support::error_of(res).await;
        assert_eq!((status, code.as_str()), (StatusCode::CONFLICT, "TOO_MANY_ENTITIES"), "{body}");
        assert!(body.to_string().contains("max_entities_per_principal"), "{body}");
    };
    let spawn = |e: &str| {
        entity_support::as_principal(s.request(reqwest::Method::PUT, &entity_support::api(e)), Some(MALLORY)).send()
    };
    refused(spawn("/chat/q4").await.unwrap()).await;
    let fork = entity_support::as_principal(
        s.request(reqwest::Method::POST, &format!("{}/fork", entity_support::api("/chat/q1"))),
        Some(MALLORY),
    )
    .json(&json!({ "instance_id": "q1-copy" }));
    refused(fork.send().await.unwrap()).await;
    let err = task_helpers::err(&s, MALLORY, "task.create", json!({ "id": "t-q4", "text": "fourth" })).await;
    assert_eq!(
        (err["code"].as_i64(), err["data"]["code"].as_str()),
        (Some(-32602), Some("TOO_MANY_ENTITIES")),
        "{err}"
    );
    assert_eq!(err["data"]["limit"], 3, "{err}");
    // Nothing of the refused ones was made; spawning one it holds again is no new entity.
    for e in ["/chat/q4", "/chat/q1-copy", "/task/t-q4"] {
        let res = entity_support::as_principal(s.request(reqwest::Method::GET, &entity_support::api(e)), Some(MALLORY));
        assert_eq!(res.send().await.unwrap().status(), StatusCode::NOT_FOUND, "{e}");
    }
    assert_eq!(spawn("/chat/q1").await.unwrap().status(), StatusCode::OK, "its own entity again");
    // Another principal is not held back.
    entity_support::spawn(&s, Some(ALICE), "/chat/alices").await;
    // A purge makes room.
    let purge = entity_support::as_principal(
        s.request(reqwest::Method::DELETE, &format!("{}?purge=true", entity_support::api("/chat/q2"))),
        Some(MALLORY),
    );
    assert!(purge.send().await.unwrap().status().is_success());
    entity_support::spawn(&s, Some(MALLORY), "/chat/q4").await;
}

/// The registry keeps every entity's client data in memory (spawn args,
/// tags, task metadata: up to `--max-entity-data-bytes` each), so what one
/// principal's entities keep together is bounded by
/// `--max-entity-data-bytes-per-principal`: past it a spawn, a tag or a
/// task's new metadata is refused (409 `TOO_MANY_ENTITIES`, -32602 with
/// `data.code` on the task face) and nothing changes. Before (session 16's
/// attack pass), 26,641 entities with 60 KB args took +900 MB, kept across
/// restarts.
#[tokio::test]
async fn what_one_principals_entities_keep_is_bounded_by_its_data_quota() {
    let s = TestServer::start_with(|c| c.max_entity_data_bytes_per_principal = 100_000).await;
    const MALLORY: &str = "user:mallory";
    let spawn_with = |e: &str, pad: usize| {
        let body = json!({ "args": { "pad": "a".repeat(pad) } });
        entity_support::as_principal(s.request(reqwest::Method::PUT, &entity_support::api(e)), Some(MALLORY))
            .json(&body)
            .send()
    };
    assert_eq!(spawn_with("/chat/d1", 60_000).await.unwrap().status(), StatusCode::CREATED);
    let (status, code, body) = entity_support::error_of(spawn_with("/chat/d2", 60_000).await.unwrap()).await;
    assert_eq!((status, code.as_str()), (StatusCode::CONFLICT, "TOO_MANY_ENTITIES"), "{body}");
    assert!(body.to_string().contains("max_entity_data_bytes_per_principal"), "{body}");
    // Small ones still fit; the principal's tags and task metadata count too.
    assert_eq!(spawn_with("/chat/d3", 10).await.unwrap().status(), StatusCode::CREATED);
    let tag = entity_support::as_principal(
        s.request(reqwest::Method::POST, &format!("{}/tags/big", entity_support::api("/chat/d3"))),
        Some(MALLORY),
    )
    .json(&json!({ "value": "t".repeat(50_000) }));
    let (status, code, body) = entity_support::error_of(tag.send().await.unwrap()).await;
    assert_eq!((status, code.as_str()), (StatusCode::CONFLICT, "TOO_MANY_ENTITIES"), "{body}");
    let task = task_helpers::ok(&s, MALLORY, "task.create", json!({ "text": "small" })).await;
    let err = task_helpers::err(
        &s,
        MALLORY,
        "task.update",
        json!({ "id": task["id"], "updates": { "metadata": { "pad": "m".repeat(50_000) } } }),
    )
    .await;
    assert_eq!(
        (err["code"].as_i64(), err["data"]["code"].as_str()),
        (Some(-32602), Some("TOO_MANY_ENTITIES")),
        "{err}"
    );
    // A task's result is kept with it too: bounded per task, and counted to its creator.
    let finish = |result: Value| json!({ "id": task["id"], "workerId": "w1", "result": result });
    task_helpers::ok(&s, MALLORY, "task.assign", json!({ "taskId": task["id"], "instanceId": "w1" })).await;
    let err = task_helpers::err(&s, MALLORY, "task.complete", finish(json!({ "pad": "r".repeat(70_000) }))).await;
    assert_eq!((err["code"].as_i64(), err["data"]["field"].as_str()), (Some(-32602), Some("result")), "{err}");
    let err = task_helpers::err(&s, MALLORY, "task.complete", finish(json!({ "pad": "r".repeat(50_000) }))).await;
    assert_eq!(
        (err["code"].as_i64(), err["data"]["code"].as_str()),
        (Some(-32602), Some("TOO_MANY_ENTITIES")),
        "{err}"
    );
    let done = task_helpers::ok(&s, MALLORY, "task.complete", finish(json!({ "ok": true }))).await;
    assert_eq!(done["status"], "completed", "{done}");
    // Another principal is not held back.
    let res = entity_support::as_principal(
        s.request(reqwest::Method::PUT, &entity_support::api("/chat/alices-d")),
        Some(ALICE),
    )
    .json(&json!({ "args": { "pad": "a".repeat(60_000) } }))
    .send()
    .await
    .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
}

/// What a stream or a grant keeps of a header or field as text is short:
/// a content type (256 bytes), an expiry timestamp (64), a `Stream-Seq`
/// (256). Before (session 16's third attack pass), a 60 KB `Content-Type` or
/// `Stream-Expires-At` (chrono takes any number of fractional digits) was
/// kept per stream, 2,000 streams +290 MB in a second and kept across
/// restarts, and a grant's `expires_at` of ~1 MiB per grant.
#[tokio::test]
async fn long_header_texts_a_stream_or_grant_would_keep_are_refused() {
    let s = TestServer::start().await;
    let put = |path: &'static str, name: &'static str, value: String| {
        s.request(reqwest::Method::PUT, path).header("content-type", "text/plain").header(name, value).send()
    };
    let long_ct = format!("text/plain; x={}", "a".repeat(60_000));
    let res = s.request(reqwest::Method::PUT, "/long/ct").header("content-type", long_ct).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    let body = res.text().await.unwrap();
    assert!(body.contains("at most 256") && body.len() < 1_000, "the refusal names the limit, not the input");
    let long_at = format!("2099-01-01T00:00:00.{}Z", "0".repeat(60_000));
    assert_eq!(put("/long/at", "stream-expires-at", long_at.clone()).await.unwrap().status(), StatusCode::BAD_REQUEST);
    for p in ["/long/ct", "/long/at"] {
        assert_eq!(s.head(p).await.status(), StatusCode::NOT_FOUND, "nothing made at {p}");
    }
    s.create("/long/seq", "text/plain").await;
    let res = s
        .request(reqwest::Method::POST, "/long/seq")
        .header("content-type", "text/plain")
        .header("stream-seq", "s".repeat(300))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    entity_support::spawn(&s, Some(ALICE), "/chat/long-grant").await;
    let grant = json!({ "subject_kind": "principal", "subject_value": "user:ann", "permission": "read",
        "expires_at": format!("2099-01-01T00:00:00.{}Z", "0".repeat(100_000)) });
    let res = entity_support::as_principal(
        s.request(reqwest::Method::POST, &format!("{}/grants", entity_support::api("/chat/long-grant"))),
        Some(ALICE),
    )
    .json(&grant)
    .send()
    .await
    .unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
}

/// Grants are data their entity's creator keeps in memory (~750 B each),
/// so they count to its `--max-entity-data-bytes-per-principal`: the
/// per-entity bound alone let 200 entities take 179,426 grants in 60 s
/// (+73 MB after a restart, session 16's second attack pass).
#[tokio::test]
async fn grants_count_to_their_entity_creators_data_quota() {
    let s = TestServer::start_with(|c| c.max_entity_data_bytes_per_principal = 2_900).await;
    entity_support::spawn(&s, Some(ALICE), "/chat/granting").await;
    let grants = format!("{}/grants", entity_support::api("/chat/granting"));
    let grant = |i: usize| {
        let body = json!({ "subject_kind": "principal", "subject_value": format!("user:g{i}"), "permission": "read" });
        entity_support::as_principal(s.request(reqwest::Method::POST, &grants), Some(ALICE)).json(&body).send()
    };
    for i in 0..3 {
        assert_eq!(grant(i).await.unwrap().status(), StatusCode::CREATED, "grant {i}");
    }
    let (status, code, body) = entity_support::error_of(grant(3).await.unwrap()).await;
    assert_eq!((status, code.as_str()), (StatusCode::CONFLICT, "TOO_MANY_ENTITIES"), "{body}");
    assert!(body.to_string().contains("max_entity_data_bytes_per_principal"), "{body}");
}

/// A JSON body of many tiny messages costs its rows, not its bytes (a 15 MiB
/// `[1,1,...]`, 7.8 million messages, held 1 GB while it was written: session
/// 16's attack pass), so one append carries at most `--max-append-messages`:
/// past it, 413 `TOO_MANY_MESSAGES` and nothing is appended, on plain streams
/// and entity main streams alike.
#[tokio::test]
async fn a_json_append_of_more_messages_than_allowed_is_413_and_appends_nothing() {
    let s = TestServer::start_with(|c| c.max_append_messages = 3).await;
    s.create("/j/many", "application/json").await;
    let post = |body: &'static str| {
        s.request(reqwest::Method::POST, "/j/many").header("content-type", "application/json").body(body).send()
    };
    assert!(post("[1,2,3]").await.unwrap().status().is_success());
    let (status, code, body) = entity_support::error_of(post("[4,5,6,7]").await.unwrap()).await;
    assert_eq!((status, code.as_str()), (StatusCode::PAYLOAD_TOO_LARGE, "TOO_MANY_MESSAGES"), "{body}");
    assert!(body.to_string().contains("max_append_messages"), "{body}");
    assert_eq!(s.read_all("/j/many").await, &b"[1,2,3]"[..], "nothing of the refused append");
    // Malformed JSON is still answered as malformed.
    assert_eq!(post("[1,").await.unwrap().status(), StatusCode::BAD_REQUEST);
    // An entity's main stream takes the same bound through the raw route.
    entity_support::spawn(&s, None, "/chat/many").await;
    let rows: Vec<Value> = (0..4)
        .map(|i| json!({ "type": "note", "key": format!("k{i}"), "value": {}, "headers": { "operation": "insert" } }))
        .collect();
    let res = s
        .request(reqwest::Method::POST, "/chat/many/main")
        .header("content-type", "application/json")
        .json(&rows)
        .send()
        .await
        .unwrap();
    let (status, code, body) = entity_support::error_of(res).await;
    assert_eq!((status, code.as_str()), (StatusCode::PAYLOAD_TOO_LARGE, "TOO_MANY_MESSAGES"), "{body}");
}

/// A create's first messages (a JSON `PUT` with a body) take the same bound
/// as an append: before (session 17's attack pass), a 15 MiB `[1,1,...]`
/// `PUT` of a plain stream was 201 and held 1 GB while it was written, where
/// the same body `POST`ed was 413.
#[tokio::test]
async fn a_json_create_with_more_first_messages_than_allowed_is_413_and_makes_nothing() {
    let s = TestServer::start_with(|c| c.max_append_messages = 3).await;
    let put = |path: &'static str, body: &'static str| {
        s.request(reqwest::Method::PUT, path).header("content-type", "application/json").body(body).send()
    };
    let (status, code, body) = entity_support::error_of(put("/j/put-many", "[1,2,3,4]").await.unwrap()).await;
    assert_eq!((status, code.as_str()), (StatusCode::PAYLOAD_TOO_LARGE, "TOO_MANY_MESSAGES"), "{body}");
    assert_eq!(
        s.request(reqwest::Method::HEAD, "/j/put-many").send().await.unwrap().status(),
        StatusCode::NOT_FOUND,
        "nothing was made"
    );
    assert_eq!(put("/j/put-few", "[1,2,3]").await.unwrap().status(), StatusCode::CREATED);
    assert_eq!(s.read_all("/j/put-few").await, &b"[1,2,3]"[..]);
    // Malformed JSON is still answered as malformed.
    assert_eq!(put("/j/put-bad", "[1,").await.unwrap().status(), StatusCode::BAD_REQUEST);
    // A fork that names no type takes its JSON source's, and the same bound
    // (before, session 17's second attack pass: 201, and 1 GB for 15 MiB).
    let fork = |path: &'static str, body: &'static str| {
        s.request(reqwest::Method::PUT, path).header("stream-forked-from", "/j/put-few").body(body).send()
    };
    let (status, code, body) = entity_support::error_of(fork("/j/fork-many", "[1,2,3,4]").await.unwrap()).await;
    assert_eq!((status, code.as_str()), (StatusCode::PAYLOAD_TOO_LARGE, "TOO_MANY_MESSAGES"), "{body}");
    assert_eq!(fork("/j/fork-few", "[4,5]").await.unwrap().status(), StatusCode::CREATED);
}

/// The registry keeps every grant in memory, so an entity holds at most
/// `--max-grants-per-entity` of them: past it a grant is 409
/// `TOO_MANY_GRANTS` and nothing is added; a revoke makes room. Before
/// (session 16's attack pass), 25,700 grants on one entity in 30 s, kept
/// across restarts.
#[tokio::test]
async fn an_entity_holds_at_most_its_grant_quota_and_a_revoke_makes_room() {
    let s = TestServer::start_with(|c| c.max_grants_per_entity = 2).await;
    entity_support::spawn(&s, Some(ALICE), "/chat/granted").await;
    let grants = format!("{}/grants", entity_support::api("/chat/granted"));
    let grant = |who: &str| {
        let body = json!({ "subject_kind": "principal", "subject_value": who, "permission": "read" });
        entity_support::as_principal(s.request(reqwest::Method::POST, &grants), Some(ALICE)).json(&body).send()
    };
    let first: Value = grant("user:ann").await.unwrap().json().await.unwrap();
    assert_eq!(grant("user:bob").await.unwrap().status(), StatusCode::CREATED);
    let (status, code, body) = entity_support::error_of(grant("user:cy").await.unwrap()).await;
    assert_eq!((status, code.as_str()), (StatusCode::CONFLICT, "TOO_MANY_GRANTS"), "{body}");
    assert!(body.to_string().contains("max_grants_per_entity: 2"), "{body}");
    let listed = entity_support::get_json_as(&s, &grants, Some(ALICE)).await;
    assert_eq!(listed["grants"].as_array().map(Vec::len), Some(2), "nothing was added: {listed}");
    let revoke = format!("{grants}/{}", first["id"]);
    let res =
        entity_support::as_principal(s.request(reqwest::Method::DELETE, &revoke), Some(ALICE)).send().await.unwrap();
    assert!(res.status().is_success(), "{}", res.status());
    assert_eq!(grant("user:cy").await.unwrap().status(), StatusCode::CREATED);
}

/// The request that opens an MCP session carries `initialize`, whose params
/// rmcp keeps as a JSON tree for the session's life (~11 times their size:
/// one 4 MB `initialize` of small members held 45 MB, and a principal's 100
/// sessions 4.5 GB, session 15's attack pass). Its body is held to
/// `--mcp-max-initialize-bytes` (16 KiB): past it, 413 naming the limit and
/// no session; a client's usual `initialize` is well under it, and messages
/// in a session keep the JSON-RPC body limit.
#[tokio::test]
async fn an_mcp_initialize_past_its_limit_is_413_and_opens_no_session() {
    let s = TestServer::start().await;
    let big = json!({ "jsonrpc": "2.0", "method": "initialize", "id": 1, "params": {
        "protocolVersion": "2025-03-26",
        "capabilities": { "experimental": (0..2_000).map(|i| (format!("k{i}"), json!(i))).collect::<serde_json::Map<_, _>>() },
        "clientInfo": { "name": "t", "version": "1" } } });
    let res = s
        .client
        .post(s.url("/mcp"))
        .header("electric-principal", ALICE)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .body(big.to_string())
        .send()
        .await
        .expect("/mcp answers");
    assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert!(common::header(&res, "mcp-session-id").is_none(), "no session opened");
    let body: Value = res.json().await.unwrap();
    assert!(body.to_string().contains("mcp_max_initialize_bytes"), "{body}");
    let (status, id) = mcp_initialize(&s).await;
    assert_eq!(status, StatusCode::OK, "an ordinary initialize opens a session");
    assert!(id.is_some());
}

/// Opens racing each other are counted by the caps while they run: the
/// session's owner was recorded only once its open returned, so 400
/// concurrent `initialize`s of one principal opened 396 sessions past its
/// cap of 100, enough to fill the server's for everyone.
#[tokio::test]
async fn concurrent_mcp_opens_of_one_principal_stop_at_its_cap() {
    let s = TestServer::start_with(|c| c.mcp_max_sessions_per_principal = 3).await;
    let opens = futures::future::join_all((0..24).map(|_| mcp_initialize(&s))).await;
    let opened = opens.iter().filter(|(status, id)| *status == StatusCode::OK && id.is_some()).count();
    assert!(opened <= 3, "{opened} sessions opened past the cap of 3: {opens:?}");
    assert!(opened >= 1, "{opens:?}");
    assert!(
        opens.iter().all(|(status, _)| matches!(*status, StatusCode::OK | StatusCode::TOO_MANY_REQUESTS)),
        "{opens:?}"
    );
}

#[tokio::test]
async fn mcp_sessions_past_the_cap_are_refused_with_503_until_one_closes() {
    let s = TestServer::start_with(|c| c.mcp_max_sessions = 3).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let (status, id) = mcp_initialize(&s).await;
        assert_eq!(status, StatusCode::OK);
        ids.push(id.expect("a session id"));
    }
    let res = s
        .client
        .post(s.url("/mcp"))
        .header("electric-principal", ALICE)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(common::header(&res, "retry-after").is_some());
    assert_eq!(common::error_code(res).await, "TOO_MANY_SESSIONS");
    let closed = s
        .client
        .delete(s.url("/mcp"))
        .header("electric-principal", ALICE)
        .header("mcp-session-id", &ids[0])
        .send()
        .await
        .unwrap();
    assert!(closed.status().is_success(), "{}", closed.status());
    let (status, _) = mcp_initialize(&s).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn an_idle_mcp_session_ends_after_its_ttl_and_frees_its_place() {
    let s = TestServer::start_with(|c| {
        c.mcp_max_sessions = 1;
        c.mcp_session_idle_ttl = Duration::from_millis(500);
    })
    .await;
    let (status, first) = mcp_initialize(&s).await;
    assert_eq!(status, StatusCode::OK);
    // The cap holds while the first session lives; once it has been idle for
    // its TTL it ends, and a new session takes its place (waited for, up to 10 s).
    let (status, _) = mcp_initialize(&s).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    eventually(Duration::from_secs(10), "the idle session to end", || async {
        (mcp_initialize(&s).await.0 == StatusCode::OK).then_some(())
    })
    .await;
    let res = s
        .client
        .post(s.url("/mcp"))
        .header("electric-principal", ALICE)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-session-id", first.expect("a session id"))
        .body(r#"{"jsonrpc":"2.0","method":"ping","id":2}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::NOT_FOUND, "the expired session's id is gone");
}

#[tokio::test]
async fn spawn_args_past_the_limit_are_413_and_nothing_is_spawned() {
    let s = TestServer::start_with(|c| c.max_entity_data_bytes = 1024).await;
    let spawn_with = |args: Value| {
        as_principal(s.request(reqwest::Method::PUT, &api("/chat/big-args")), Some(ALICE))
            .json(&json!({ "args": args }))
            .send()
    };
    let res = spawn_with(json!({ "pad": "x".repeat(2000) })).await.unwrap();
    let (status, code, body) = error_of(res).await;
    assert_eq!((status, code.as_str()), (StatusCode::PAYLOAD_TOO_LARGE, "ENTITY_DATA_TOO_LARGE"), "{body}");
    let res = as_principal(s.request(reqwest::Method::GET, &api("/chat/big-args")), Some(ALICE)).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    let res = spawn_with(json!({ "pad": "x".repeat(500) })).await.unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
}

/// Task metadata is merged on update, so each update could add to what the
/// registry keeps; the bound holds for the merged whole.
#[tokio::test]
async fn task_metadata_past_the_limit_is_refused_on_create_and_on_a_merging_update() {
    let s = TestServer::start_with(|c| c.max_entity_data_bytes = 1024).await;
    let big = json!({ "text": "t", "metadata": { "pad": "x".repeat(2000) } });
    let res = task_helpers::call(&s, ALICE, "task.create", big).await;
    assert_eq!(res["error"]["code"], -32602, "{res}");
    assert_eq!(res["error"]["data"]["field"], "metadata", "{res}");
    let created =
        task_helpers::call(&s, ALICE, "task.create", json!({ "text": "t", "metadata": { "a": "x".repeat(600) } }))
            .await;
    let id = created["result"]["id"].as_str().expect("a task id").to_owned();
    let more = json!({ "id": id, "updates": { "metadata": { "b": "x".repeat(600) } } });
    let res = task_helpers::call(&s, ALICE, "task.update", more).await;
    assert_eq!(res["error"]["code"], -32602, "{res}");
    let got = task_helpers::call(&s, ALICE, "task.get", json!({ "id": id })).await;
    assert!(got["result"]["metadata"].get("b").is_none(), "the refused update changed nothing: {got}");
}

#[tokio::test]
async fn one_principal_cannot_take_every_mcp_session() {
    let s = TestServer::start_with(|c| {
        c.mcp_max_sessions = 10;
        c.mcp_max_sessions_per_principal = 2;
    })
    .await;
    for _ in 0..2 {
        assert_eq!(mcp_initialize(&s).await.0, StatusCode::OK);
    }
    assert_eq!(mcp_initialize(&s).await.0, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(mcp_initialize_as(&s, task_helpers::BOB).await.0, StatusCode::OK, "others still get sessions");
}

/// A resumable upload of `id` begun on `entity` (dev mode, user:anonymous).
async fn begin_resumable(s: &TestServer, entity: &str, id: &str) -> reqwest::Response {
    s.request(reqwest::Method::PUT, &format!("{}/attachments/{id}", api(entity)))
        .json(&json!({ "subject": { "type": "context", "key": "test" } }))
        .send()
        .await
        .expect("answered")
}

/// A multipart upload of `id` whose body ends inside its file: recorded `failed`.
async fn cut_upload(s: &TestServer, entity: &str, id: &str) {
    let mut body = Form::new().field("id", id).unfinished();
    body.extend_from_slice(
        format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"c\"\r\n\r\nhalf a fil")
            .as_bytes(),
    );
    let (status, code, _) = error_of(upload_raw(s, entity, body).await).await;
    assert_eq!((status, code.as_str()), (StatusCode::BAD_REQUEST, "UPLOAD_INTERRUPTED"));
    assert_eq!(listed(s, entity).await[id]["status"], "failed");
}

/// One entity's view grows with every attachment id it holds, failed and
/// pending rows included, so their number is bounded per entity. At the
/// bound a new id is refused (multipart and resumable), and what the entity
/// holds still reads, is replaced and deletes; a delete frees a place.
#[tokio::test]
async fn an_entity_at_its_attachment_cap_refuses_a_new_id_with_409_and_a_delete_frees_a_place() {
    let s = TestServer::start_with(|c| c.max_attachments_per_entity = 3).await;
    let entity = "/chat/capped";
    spawn(&s, None, entity).await;
    upload(&s, entity, "done", "text/plain", b"kept bytes").await;
    assert_eq!(begin_resumable(&s, entity, "open").await.status(), StatusCode::CREATED);
    cut_upload(&s, entity, "cut").await;
    let before = listed(&s, entity).await;
    assert_eq!(before.len(), 3, "{before:?}");

    let form = Form::new().field("id", "more").file(Some("m"), None, b"more bytes").finish();
    let (status, code, body) = error_of(upload_raw(&s, entity, form).await).await;
    assert_eq!((status, code.as_str()), (StatusCode::CONFLICT, "TOO_MANY_ATTACHMENTS"), "{body}");
    let message = body["error"]["message"].as_str().unwrap_or("");
    assert!(message.contains("at most 3") && message.contains("DELETE"), "{message}");
    // An id chosen by the server (none in the form) takes a place too.
    let form = Form::new().file(Some("m"), None, b"more bytes").finish();
    assert_eq!(error_of(upload_raw(&s, entity, form).await).await.1, "TOO_MANY_ATTACHMENTS");
    let (status, code, _) = error_of(begin_resumable(&s, entity, "more").await).await;
    assert_eq!((status, code.as_str()), (StatusCode::CONFLICT, "TOO_MANY_ATTACHMENTS"));
    assert_eq!(listed(&s, entity).await, before, "the refusals wrote nothing");

    // What it holds: read, the failed id uploaded again, the open upload finished.
    assert_eq!(get_bytes(&s, entity, "done").await, (StatusCode::OK, b"kept bytes".to_vec()));
    upload(&s, entity, "cut", "text/plain", b"second try").await;
    let stream = format!("{entity}/attachments/open");
    let res = s
        .request(reqwest::Method::POST, &stream)
        .header("content-type", "application/octet-stream")
        .header("stream-closed", "true")
        .body("resumed")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    eventually(Duration::from_secs(10), "the resumable upload to complete", || async {
        (listed(&s, entity).await["open"]["status"] == "complete").then_some(())
    })
    .await;
    assert_eq!(get_bytes(&s, entity, "open").await, (StatusCode::OK, b"resumed".to_vec()));

    // A delete frees one place, and only one.
    let res = s.request(reqwest::Method::DELETE, &format!("{}/attachments/done", api(entity))).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    upload(&s, entity, "more", "text/plain", b"more bytes").await;
    let form = Form::new().field("id", "one-too-many").file(Some("m"), None, b"x").finish();
    assert_eq!(error_of(upload_raw(&s, entity, form).await).await.1, "TOO_MANY_ATTACHMENTS");
    assert_eq!(get_bytes(&s, entity, "more").await, (StatusCode::OK, b"more bytes".to_vec()));
}

/// The task face counts the same rows (a task is an entity): a new key past
/// the cap is -32602 with `data.code` `TOO_MANY_ATTACHMENTS`, like its
/// `UPLOAD_IN_PROGRESS` refusal; replacing, reading and deleting go on.
#[tokio::test]
async fn a_task_at_its_attachment_cap_refuses_a_new_key_with_32602_and_a_delete_frees_a_place() {
    let s = TestServer::start_with(|c| c.max_attachments_per_entity = 3).await;
    let task = task_helpers::create_task(&s, ALICE, "capped", 50).await;
    let put = |key: &str, value: Value| json!({ "taskId": task, "key": key, "type": "json", "value": value });
    for key in ["a", "b"] {
        task_helpers::ok(&s, ALICE, "task.create_attachment", put(key, json!({ "v": key }))).await;
    }
    // An upload's failed row, through the entity face, counts as well.
    let entity = format!("/task/{task}");
    let mut body = Form::new().field("id", "cut").unfinished();
    body.extend_from_slice(
        format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"c\"\r\n\r\nhalf").as_bytes(),
    );
    let res = as_principal(s.request(reqwest::Method::POST, &format!("{}/attachments", api(&entity))), Some(ALICE))
        .header("content-type", Form::content_type())
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);

    let error = task_helpers::err(&s, ALICE, "task.create_attachment", put("c", json!(1))).await;
    assert_eq!(error["code"], -32602, "{error}");
    assert_eq!(error["data"]["code"], "TOO_MANY_ATTACHMENTS", "{error}");
    assert_eq!(error["data"]["limit"], 3, "{error}");
    assert_eq!(error["data"]["key"], "c", "{error}");
    let listed = task_helpers::ok(&s, ALICE, "task.list_attachments", json!({ "taskId": task })).await;
    assert_eq!(listed["totalCount"], 2, "nothing written: {listed}");
    // The entity face answers its own refusal for the same task.
    let form = Form::new().field("id", "up").file(Some("u"), None, b"x").finish();
    let res = as_principal(s.request(reqwest::Method::POST, &format!("{}/attachments", api(&entity))), Some(ALICE))
        .header("content-type", Form::content_type())
        .body(form)
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(res).await.1, "TOO_MANY_ATTACHMENTS");

    // Replacing a key takes no new place; reads and deletes go on.
    task_helpers::ok(&s, ALICE, "task.create_attachment", put("a", json!({ "v": "a2" }))).await;
    let got = task_helpers::ok(&s, ALICE, "task.get_attachment", json!({ "taskId": task, "key": "a" })).await;
    assert_eq!(got["value"], json!({ "v": "a2" }));
    task_helpers::ok(&s, ALICE, "task.delete_attachment", json!({ "taskId": task, "key": "b" })).await;
    task_helpers::ok(&s, ALICE, "task.create_attachment", put("c", json!(1))).await;
    let error = task_helpers::err(&s, ALICE, "task.create_attachment", put("d", json!(1))).await;
    assert_eq!(error["data"]["code"], "TOO_MANY_ATTACHMENTS", "{error}");
}

/// The views the server keeps (an entity's manifest, names and inbox keys)
/// are bounded in bytes as well as in number: past `view_cache_bytes` the
/// least recently used go, a view larger than the bound is not kept once
/// answered, and every answer is what a view rebuilt from the stream says.
#[tokio::test]
async fn entity_views_past_the_byte_bound_are_dropped_and_rebuilt_with_the_same_answers() {
    const BOUND: usize = 64 << 10;
    let s = TestServer::start_with(|c| c.view_cache_bytes = BOUND).await;
    let mut tasks = Vec::new();
    for n in 0..8 {
        let task = task_helpers::create_task(&s, ALICE, "big values", 50).await;
        let value = json!({ "n": n, "pad": "v".repeat(20 << 10) });
        let params = json!({ "taskId": task, "key": "k", "type": "json", "value": value });
        task_helpers::ok(&s, ALICE, "task.create_attachment", params).await;
        tasks.push(task);
    }
    for _ in 0..2 {
        for (n, task) in tasks.iter().enumerate() {
            let got = task_helpers::ok(&s, ALICE, "task.get_attachment", json!({ "taskId": task, "key": "k" })).await;
            assert_eq!(got["value"]["n"], n, "rebuilt from its stream");
            let counts = s.memory_counts().await;
            assert!(counts.view_bytes <= BOUND, "{n}: {} bytes of views kept", counts.view_bytes);
        }
    }
    // Eight views of 20 KiB and more: at most three fit.
    let counts = s.memory_counts().await;
    assert!(counts.views <= 3, "{} views kept", counts.views);
    // One view larger than the bound on its own: answered, then not kept.
    let task = task_helpers::create_task(&s, ALICE, "huge", 50).await;
    for key in ["a", "b", "c", "d"] {
        let params = json!({ "taskId": task, "key": key, "type": "json", "value": "h".repeat(20 << 10) });
        task_helpers::ok(&s, ALICE, "task.create_attachment", params).await;
    }
    let listed = task_helpers::ok(&s, ALICE, "task.list_attachments", json!({ "taskId": task })).await;
    assert_eq!(listed["totalCount"], 4);
    assert_eq!(listed["attachments"][3]["value"], "h".repeat(20 << 10));
    let counts = s.memory_counts().await;
    assert!(counts.view_bytes <= BOUND, "{} bytes of views kept", counts.view_bytes);
}

/// A task's inline values (JSON `value`, text `content`, `url`) live in its
/// view, which a request holds whole: together they are bounded per entity.
/// Past `max_inline_bytes_per_entity` a `task.create_attachment` is -32602
/// with `data.code` `TOO_MANY_ATTACHMENT_BYTES` (as its other refusals) and
/// nothing is written; a replacement counts what it adds, a smaller value
/// always fits, a delete frees its bytes, and bytes kept in their own stream
/// (binary `data`) do not count.
#[tokio::test]
async fn a_task_past_its_inline_byte_bound_refuses_a_value_with_32602_and_a_delete_or_a_smaller_value_makes_room() {
    const LIMIT: usize = 10_000;
    let s = TestServer::start_with(|c| c.max_inline_bytes_per_entity = LIMIT).await;
    let task = task_helpers::create_task(&s, ALICE, "inline bytes", 50).await;
    let text =
        |key: &str, len: usize| json!({ "taskId": task, "key": key, "type": "text", "content": "t".repeat(len) });
    let create = |params: Value| task_helpers::call(&s, ALICE, "task.create_attachment", params);
    let refused = |res: Value| {
        let error = &res["error"];
        assert_eq!(error["code"], -32602, "{res}");
        assert_eq!(error["data"]["code"], "TOO_MANY_ATTACHMENT_BYTES", "{res}");
        assert_eq!(error["data"]["limit"], LIMIT, "{res}");
        error["data"].clone()
    };
    let listed = || async {
        let listed = task_helpers::ok(&s, ALICE, "task.list_attachments", json!({ "taskId": task })).await;
        let mut sizes: Vec<(String, usize)> = listed["attachments"]
            .as_array()
            .expect("a list")
            .iter()
            .map(|a| (a["key"].as_str().unwrap_or("").to_owned(), a["content"].as_str().map_or(0, str::len)))
            .collect();
        sizes.sort();
        sizes
    };
    task_helpers::ok(&s, ALICE, "task.create_attachment", text("a", 4_000)).await;
    task_helpers::ok(&s, ALICE, "task.create_attachment", text("b", 4_000)).await;

    let data = refused(create(text("c", 4_000)).await);
    assert_eq!(
        (data["key"].clone(), data["held"].clone(), data["size"].clone()),
        (json!("c"), json!(8_000), json!(4_000))
    );
    let res = create(text("c", 4_000)).await;
    let message = res["error"]["message"].as_str().unwrap_or("");
    assert!(message.contains("max_inline_bytes_per_entity") && message.contains("at most 10000"), "{message}");
    // A JSON value counts as held: a string its length.
    let value = json!({ "taskId": task, "key": "v", "type": "json", "value": "v".repeat(2_001) });
    assert_eq!(refused(create(value).await)["size"], 2_001);
    let url = format!("https://example.com/{}", "u".repeat(2_000));
    refused(create(json!({ "taskId": task, "key": "u", "type": "url", "url": url })).await);
    assert_eq!(listed().await, [("a".into(), 4_000), ("b".into(), 4_000)], "the refusals wrote nothing");

    // Bytes kept in their own stream are not held in the view.
    let data = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, vec![7u8; 6_000]);
    let binary = json!({ "taskId": task, "key": "bin", "type": "binary", "data": data });
    task_helpers::ok(&s, ALICE, "task.create_attachment", binary).await;
    // A replacement counts what it adds: 4,000 more for a fills the bound, one byte more passes it.
    refused(create(text("a", 6_001)).await);
    task_helpers::ok(&s, ALICE, "task.create_attachment", text("a", 6_000)).await;
    refused(create(text("d", 1)).await);
    // A smaller value always fits, and gives back what it shrinks by.
    task_helpers::ok(&s, ALICE, "task.create_attachment", text("b", 1_000)).await;
    task_helpers::ok(&s, ALICE, "task.create_attachment", text("c", 3_000)).await;
    refused(create(text("d", 1)).await);
    // A delete frees its bytes.
    task_helpers::ok(&s, ALICE, "task.delete_attachment", json!({ "taskId": task, "key": "a" })).await;
    task_helpers::ok(&s, ALICE, "task.create_attachment", text("d", 6_000)).await;
    assert_eq!(
        listed().await,
        [("b".into(), 1_000), ("bin".into(), 0), ("c".into(), 3_000), ("d".into(), 6_000)],
        "every answer held"
    );
}

/// Sends `key` to `entity` (dev mode, user:anonymous); the status and body.
async fn send_keyed(s: &TestServer, entity: &str, key: &str, payload: Value) -> (StatusCode, Value) {
    let res = s
        .request(reqwest::Method::POST, &format!("{}/send", api(entity)))
        .json(&json!({ "payload": payload, "key": key }))
        .send()
        .await
        .expect("send answered");
    let status = res.status();
    (status, res.json().await.unwrap_or(Value::Null))
}

/// Every message sent to an entity used to leave its key in the entity's
/// view for good. The view keeps the keys of its latest
/// `inbox_keys_per_entity` messages only (as digests, whatever their
/// length): a send reusing one of them is 409 `DUPLICATE_KEY`, an older key
/// is no longer checked (Electric checks none) and its row replaces the old
/// one at that key, and a view rebuilt from the stream (a byte bound of 1
/// drops every view once answered) decides the same.
#[tokio::test]
async fn a_send_is_checked_against_the_latest_keys_only_and_the_view_keeps_no_more() {
    for rebuilt in [false, true] {
        let s = TestServer::start_with(|c| {
            c.inbox_keys_per_entity = 3;
            if rebuilt {
                c.view_cache_bytes = 1;
            }
        })
        .await;
        let entity = "/chat/inbox-window";
        spawn(&s, None, entity).await;
        let send = |key: &'static str, n: u32| send_keyed(&s, entity, key, json!(n));
        for key in ["k1", "k2", "k3"] {
            assert_eq!(send(key, 1).await.0, StatusCode::OK, "{rebuilt}");
        }
        let (status, body) = send("k1", 2).await;
        assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("DUPLICATE_KEY")), "{body}");
        assert_eq!(send("k4", 1).await.0, StatusCode::OK);
        // k1 was the oldest of four: forgotten, so sent again, its row replacing the first.
        assert_eq!(send("k1", 2).await.0, StatusCode::OK, "rebuilt: {rebuilt}");
        let state = entity_support::materialize(&s, entity).await;
        assert_eq!(state[&("inbox".to_owned(), "k1".to_owned())]["payload"], 2);
        // The window now holds k3, k4, k1.
        assert_eq!(send("k3", 3).await.0, StatusCode::CONFLICT);
        assert_eq!(send("k1", 3).await.0, StatusCode::CONFLICT);
        assert_eq!(send("k2", 3).await.0, StatusCode::OK);

        // However many messages, and however long their keys, the view holds three keys.
        let long = |n: usize| format!("{n:0>256}");
        for n in 0..300 {
            let (status, body) = send_keyed(&s, entity, &long(n), json!(n)).await;
            assert_eq!(status, StatusCode::OK, "{body}");
        }
        assert_eq!(send_keyed(&s, entity, &long(299), json!(0)).await.0, StatusCode::CONFLICT);
        assert_eq!(send_keyed(&s, entity, &long(296), json!(0)).await.0, StatusCode::OK);
        let counts = s.memory_counts().await;
        if rebuilt {
            assert_eq!(counts.views, 0, "a view over the byte bound is dropped once answered");
        } else {
            // An empty view with three keys: well under 1 KiB (300 keys of 256 bytes held ~90 KB).
            assert!(counts.view_bytes < 1024, "{} bytes of views kept", counts.view_bytes);
        }
    }
}

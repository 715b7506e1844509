//! One way to run attache in a test: the real server, in-process, on
//! `127.0.0.1:0` with a temporary data dir, plus the few HTTP helpers the
//! stream tests share.

// Each test binary that includes this module uses a different subset of it.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use attache_server::{Server, ServerConfig};
use bytes::Bytes;
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use tempfile::TempDir;

/// The header names of the protocol, as the tests send and read them.
pub const NEXT_OFFSET: &str = "stream-next-offset";
pub const UP_TO_DATE: &str = "stream-up-to-date";
pub const CLOSED: &str = "stream-closed";

/// A running server with its own data dir; stopped (and the dir removed) on drop.
pub struct TestServer {
    /// `http://127.0.0.1:PORT`, no trailing slash.
    pub url: String,
    pub client: reqwest::Client,
    pub config: ServerConfig,
    server: Option<Server>,
    dir: TempDir,
}

impl TestServer {
    /// A server with a short long-poll timeout (1s), so tests that wait for
    /// a timeout stay fast.
    pub async fn start() -> TestServer {
        TestServer::start_with(|_| {}).await
    }

    /// A server whose configuration `tweak` adjusts before it starts.
    pub async fn start_with(tweak: impl FnOnce(&mut ServerConfig)) -> TestServer {
        let dir = tempfile::tempdir().expect("a temporary data dir");
        let mut config = ServerConfig::new(any_port(), dir.path());
        config.long_poll_timeout = Duration::from_secs(1);
        tweak(&mut config);
        let server = Server::start(config.clone()).await.expect("the server starts");
        TestServer {
            url: format!("http://{}", server.addr),
            client: reqwest::Client::builder().timeout(Duration::from_secs(30)).build().expect("an HTTP client"),
            config,
            server: Some(server),
            dir,
        }
    }

    /// A server over a fresh PostgreSQL database (objects in a temporary
    /// directory), `tweak` adjusting the rest; `None` when no PostgreSQL can
    /// be had (said why, and a failure where services are required).
    pub async fn start_postgres(
        tweak: impl FnOnce(&mut ServerConfig),
    ) -> Option<(attache_storage::postgres::test_cluster::TestCluster, TestServer)> {
        use attache_storage::postgres::test_cluster::{missing_service, TestCluster};
        let cluster = match TestCluster::start(false) {
            Ok(c) => c,
            Err(why) => {
                missing_service("PostgreSQL", &why);
                return None;
            }
        };
        let url = cluster.fresh_database().await.expect("a test database");
        let objects = tempfile::tempdir().expect("a temporary object dir").keep();
        let store = attache_server::StoreConfig::Postgres {
            url,
            object_store_url: Some(format!("file://{}", objects.display())),
        };
        let ts = TestServer::start_with(move |c| {
            c.store = store;
            tweak(c);
        })
        .await;
        Some((cluster, ts))
    }

    /// Stops the server (flushing the store) and starts a new one on the same
    /// data dir and configuration. The port changes; `url` follows it.
    pub async fn restart(&mut self) {
        self.pause().await;
        self.resume().await;
    }

    /// Stops the server (flushing and closing the store) and keeps its data
    /// dir, so a test can open the store itself; `resume` starts it again.
    pub async fn pause(&mut self) -> std::path::PathBuf {
        if let Some(server) = self.server.take() {
            server.stop().await;
        }
        self.dir.path().to_path_buf()
    }

    /// Starts the server again on the same data dir and configuration (a new port).
    pub async fn resume(&mut self) {
        let mut config = self.config.clone();
        config.listen = any_port();
        config.data_dir = self.dir.path().to_path_buf();
        let server = Server::start(config).await.expect("the server restarts");
        self.url = format!("http://{}", server.addr);
        self.server = Some(server);
    }

    pub async fn stop(mut self) {
        if let Some(server) = self.server.take() {
            server.stop().await;
        }
    }

    /// How many entries the server's in-memory structures hold right now.
    pub async fn memory_counts(&self) -> attache_server::MemoryCounts {
        self.server.as_ref().expect("the server is running").memory_counts().await
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.url, path)
    }

    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.client.request(method, self.url(path))
    }

    /// Creates a stream and insists it is new.
    pub async fn create(&self, path: &str, content_type: &str) {
        let res =
            self.request(Method::PUT, path).header("content-type", content_type).send().await.expect("PUT is answered");
        assert_eq!(res.status(), StatusCode::CREATED, "creating {path}");
    }

    /// Appends and insists it succeeded; returns the new tail offset.
    pub async fn append(&self, path: &str, content_type: &str, body: impl Into<Bytes>) -> String {
        let res = self
            .request(Method::POST, path)
            .header("content-type", content_type)
            .body(body.into())
            .send()
            .await
            .expect("POST is answered");
        assert_eq!(res.status(), StatusCode::NO_CONTENT, "appending to {path}");
        header(&res, NEXT_OFFSET).expect("an append answers its next offset")
    }

    /// The tail offset from HEAD (panics unless the stream exists).
    pub async fn tail(&self, path: &str) -> String {
        let res = self.head(path).await;
        assert_eq!(res.status(), StatusCode::OK, "HEAD {path}");
        header(&res, NEXT_OFFSET).expect("HEAD answers the tail offset")
    }

    pub async fn head(&self, path: &str) -> Response {
        self.request(Method::HEAD, path).send().await.expect("HEAD is answered")
    }

    /// The whole stream from the start, following catch-up pages until the
    /// server says the reader is up to date.
    pub async fn read_all(&self, path: &str) -> Bytes {
        self.read_all_as(path, None).await
    }

    /// `read_all` as `principal` (dev mode; none: user:anonymous).
    pub async fn read_all_as(&self, path: &str, principal: Option<&str>) -> Bytes {
        let mut offset = "-1".to_owned();
        let mut out = Vec::new();
        for _ in 0..10_000 {
            let mut req = self.request(Method::GET, path).query(&[("offset", offset.as_str())]);
            if let Some(p) = principal {
                req = req.header("electric-principal", p);
            }
            let res = req.send().await.expect("GET is answered");
            assert_eq!(res.status(), StatusCode::OK, "reading {path} at {offset}");
            let up_to_date = header(&res, UP_TO_DATE).is_some();
            offset = header(&res, NEXT_OFFSET).expect("a read answers its next offset");
            out.extend_from_slice(&res.bytes().await.expect("the body arrives"));
            if up_to_date {
                return Bytes::from(out);
            }
        }
        panic!("reading {path} never caught up");
    }

    /// What a client can observe of a stream: HEAD's status and headers,
    /// and the bytes a catch-up read returns. Two equal snapshots mean
    /// nothing observable changed in between.
    pub async fn snapshot(&self, path: &str) -> Snapshot {
        let head = self.head(path).await;
        let status = head.status();
        let next_offset = header(&head, NEXT_OFFSET);
        let closed = header(&head, CLOSED).is_some();
        let content_type = header(&head, "content-type");
        let body = if status == StatusCode::OK { Some(self.read_all(path).await) } else { None };
        Snapshot { status, next_offset, closed, content_type, body }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        // A test that panicked never reached `stop`; cancel the server so the
        // runtime can drop its task (the store closes with it).
        if let Some(server) = self.server.take() {
            server.trigger_shutdown();
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub status: StatusCode,
    pub next_offset: Option<String>,
    pub closed: bool,
    pub content_type: Option<String>,
    pub body: Option<Bytes>,
}

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().expect("a literal address")
}

/// A response header as text, if present.
pub fn header(res: &Response, name: &str) -> Option<String> {
    res.headers().get(name).map(|v| v.to_str().expect("visible ASCII header").to_owned())
}

/// The `error.code` of an `{"error":{"code","message"}}` body.
pub async fn error_code(res: Response) -> String {
    let body: serde_json::Value = res.json().await.expect("an error body is JSON");
    body["error"]["code"].as_str().unwrap_or_else(|| panic!("no error.code in {body}")).to_owned()
}

/// Sends one request (`method` on `path`, with a JSON `body` when given) as
/// `principal` over a connection of its own (raw HTTP/1.1), waits until it
/// is held at `pause`, then closes the connection as a client that goes away
/// does, and waits until the server has dropped the request (it closes its
/// side, unanswered). The pause is left to the caller to release.
pub async fn request_dropped_at(
    ts: &TestServer,
    method: Method,
    path: &str,
    principal: &str,
    body: Option<&serde_json::Value>,
    pause: &attache_server::pause::Pause,
) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let body = body.map(serde_json::Value::to_string).unwrap_or_default();
    let addr = ts.url.trim_start_matches("http://");
    let mut conn = tokio::net::TcpStream::connect(addr).await.expect("the server accepts");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
         electric-principal: {principal}\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(request.as_bytes()).await.expect("the request is sent");
    tokio::time::timeout(Duration::from_secs(10), pause.reached()).await.expect("the request pauses");
    conn.shutdown().await.expect("the client closes its side");
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut answer)).await;
    let read = read.expect("the server closes the connection");
    assert!(read.is_err() || answer.is_empty(), "{method} {path}: answered, not dropped: {answer:?}");
}

/// Longer than any wait on a raw connection should take; a wait that runs into it fails the test.
pub const RAW_PATIENCE: Duration = Duration::from_secs(15);

/// A raw TCP connection to the server (for what an HTTP client would not send).
pub async fn connect(s: &TestServer) -> tokio::net::TcpStream {
    tokio::net::TcpStream::connect(s.url.trim_start_matches("http://")).await.expect("the server accepts a connection")
}

/// Reads until the server closes the connection; returns what it sent, or
/// `None` when it was still open after [`RAW_PATIENCE`].
pub async fn read_until_closed(conn: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt as _;
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    let deadline = tokio::time::Instant::now() + RAW_PATIENCE;
    loop {
        match tokio::time::timeout_at(deadline, conn.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

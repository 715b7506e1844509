//! Under a low open-file limit, idle sockets cannot stop the server from
//! accepting: the connection cap is lowered to fit under the limit, so a
//! connection past it is answered at once (in the place of the idle socket
//! quiet longest, which is closed) instead of waiting in the backlog for a
//! descriptor, and the stalled ones are closed by the header-read timeout.
//! Its own test binary: it lowers this process's limit for good.

mod common;

use std::time::Duration;

use common::TestServer;
use reqwest::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PATIENCE: Duration = Duration::from_secs(15);
/// Low enough that a few hundred sockets exhaust it; the server keeps 256 for itself.
const FD_LIMIT: u64 = 320;

fn lower_fd_limit(to: u64) {
    let lim = libc::rlimit { rlim_cur: to as libc::rlim_t, rlim_max: to as libc::rlim_t };
    // SAFETY: setrlimit only reads the struct passed.
    let done = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    assert_eq!(done, 0, "the test may lower its own open-file limit");
}

#[tokio::test]
async fn idle_sockets_under_a_low_open_file_limit_do_not_stop_accepts() {
    lower_fd_limit(FD_LIMIT);
    let s = TestServer::start_with(|c| c.header_read_timeout = Duration::from_secs(2)).await;
    let addr = s.url.trim_start_matches("http://").to_owned();

    // More idle sockets than the lowered cap (FD_LIMIT - 256 = 64) leaves room for.
    let mut idle = Vec::new();
    for _ in 0..80 {
        idle.push(TcpStream::connect(&addr).await.expect("the server accepts"));
    }
    // Past the cap: an answer at once, not a wait for a descriptor.
    let mut over = TcpStream::connect(&addr).await.expect("the server accepts");
    over.write_all(b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n")
        .await
        .expect("a request is sent");
    let mut answer = Vec::new();
    tokio::time::timeout(PATIENCE, over.read_to_end(&mut answer))
        .await
        .expect("a connection past the cap is answered, not left in the backlog")
        .expect("the answer is read");
    let answer = String::from_utf8_lossy(&answer).to_ascii_lowercase();
    assert!(answer.starts_with("http/1.1 200"), "served in an idle socket's place: {answer}");

    // The idle sockets are closed by the header-read timeout; then /healthz answers again.
    let client = reqwest::Client::builder().pool_max_idle_per_host(0).timeout(PATIENCE).build().unwrap();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match client.get(s.url("/healthz")).send().await.map(|r| r.status()) {
            Ok(StatusCode::OK) => break,
            other if tokio::time::Instant::now() >= deadline => panic!("/healthz never answered 200: {other:?}"),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    drop(idle);
}

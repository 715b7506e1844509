//! The real `attache` binary as a child process, for the tests that need a
//! process (crashes, signals, threads): started on a free loopback port in
//! dev mode, waited for until `/healthz` answers, killed on drop so a failing
//! test leaks nothing.
#![allow(dead_code)] // each test file uses its own part of this

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;

/// The binary under test: `ATTACHE_BIN` if set, else the one Cargo built.
pub fn binary() -> PathBuf {
    std::env::var_os("ATTACHE_BIN").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_attache")))
}

fn free_port() -> u16 {
    // Bound and released at once; the server binds it a moment later.
    TcpListener::bind("127.0.0.1:0").expect("a free port").local_addr().expect("its address").port()
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(30)).build().expect("an HTTP client")
}

/// One `attache serve` process; killed on drop.
pub struct ServerProcess {
    child: Child,
    /// `127.0.0.1:port`
    pub addr: String,
    log: PathBuf,
}

impl ServerProcess {
    /// Starts `attache serve` on `data_dir` with `extra` flags; its stderr goes to `log`.
    pub async fn start(data_dir: &Path, log: &Path, extra: &[&str]) -> ServerProcess {
        let addr = format!("127.0.0.1:{}", free_port());
        let log_file = std::fs::OpenOptions::new().create(true).append(true).open(log).expect("a log file");
        let child = Command::new(binary())
            .args(["serve", "--listen", &addr, "--data-dir"])
            .arg(data_dir)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("the attache binary starts");
        let server = ServerProcess { child, addr, log: log.to_path_buf() };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let health = client().get(server.url("/healthz")).send().await;
            if health.is_ok_and(|r| r.status() == StatusCode::OK) {
                return server;
            }
            assert!(Instant::now() < deadline, "the server never became healthy; log:\n{}", server.log_text());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `http://addr` followed by `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn sigkill(&mut self) {
        // On Unix, `Child::kill` is SIGKILL: no shutdown code runs.
        self.child.kill().expect("SIGKILL is delivered");
        self.child.wait().expect("the process is reaped");
    }

    pub fn sigterm(&self) {
        let status = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status().expect("kill(1) runs");
        assert!(status.success());
    }

    /// The exit status, if the process ends within `limit`.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("the child can be waited for") {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Multipart bodies built by hand, so a test can also send part of one.
pub const BOUNDARY: &str = "attache-cli-test-boundary-q8Zr";

pub fn field(name: &str, value: &str) -> Vec<u8> {
    format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n").into_bytes()
}

pub fn file_head() -> Vec<u8> {
    format!(
        "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.bin\"\r\n\
         Content-Type: application/octet-stream\r\n\r\n"
    )
    .into_bytes()
}

pub fn closing() -> Vec<u8> {
    format!("\r\n--{BOUNDARY}--\r\n").into_bytes()
}

/// Uploads `bytes` as attachment `id` of `entity`; insists on 201 and returns the manifest entry.
pub async fn upload(server: &ServerProcess, entity: &str, id: &str, bytes: &[u8]) -> Value {
    let mut body = field("id", id);
    body.extend(field("subject", r#"{"type":"context","key":"test"}"#));
    body.extend(file_head());
    body.extend_from_slice(bytes);
    body.extend(closing());
    let res = client()
        .post(server.url(&format!("/_electric/entities{entity}/attachments")))
        .header("content-type", format!("multipart/form-data; boundary={BOUNDARY}"))
        .body(body)
        .send()
        .await
        .expect("the upload is answered");
    assert_eq!(res.status(), StatusCode::CREATED, "uploading {id}");
    res.json::<Value>().await.expect("JSON")["attachment"].clone()
}

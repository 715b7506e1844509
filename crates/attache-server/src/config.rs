//! Server settings. The CLI fills them from flags, environment and a config file.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// How long a long-poll waits for data before answering 204.
    pub long_poll_timeout: Duration,
    /// How long one SSE response stays open before the client reconnects (PROTOCOL.md §10.2).
    pub sse_max_duration: Duration,
    /// Largest append or create body on the stream routes (413 beyond).
    pub max_append_bytes: usize,
    /// Largest body returned by one catch-up read.
    pub max_read_bytes: usize,
    /// Sync before acknowledging (the default).
    pub durable: bool,
    /// Largest attachment, multipart or resumable (413 beyond).
    pub max_attachment_bytes: u64,
    /// Dev (trust `electric-principal`) or token; `None` picks dev on loopback, token elsewhere.
    pub auth: Option<crate::auth::AuthMode>,
    /// Largest JSON-RPC request body (`/rpc`; a batch counts whole).
    pub rpc_max_body_bytes: usize,
    /// Most requests in one JSON-RPC batch.
    pub rpc_max_batch: usize,
    /// Calls one principal may make per `rpc_rate_window` (JSON-RPC and MCP); `None`: no limit.
    pub rpc_rate_limit: Option<u32>,
    pub rpc_rate_window: Duration,
    /// Where task events are PUBLISHed, one channel per event type (`redis://127.0.0.1:6379`).
    pub redis_url: Option<String>,
}

impl ServerConfig {
    pub fn new(listen: SocketAddr, data_dir: impl Into<PathBuf>) -> ServerConfig {
        ServerConfig {
            listen,
            data_dir: data_dir.into(),
            long_poll_timeout: Duration::from_secs(30),
            sse_max_duration: Duration::from_secs(60),
            max_append_bytes: 16 << 20,
            max_read_bytes: 1 << 20,
            durable: true,
            max_attachment_bytes: 1 << 30,
            auth: None,
            rpc_max_body_bytes: 4 << 20,
            rpc_max_batch: 100,
            rpc_rate_limit: None,
            rpc_rate_window: Duration::from_secs(60),
            redis_url: None,
        }
    }
}

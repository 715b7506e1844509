//! Counters for `GET /metrics`, in the Prometheus text format: JSON-RPC
//! requests by method and outcome, task attachments created by type, bytes
//! they hold, appends committed to streams, live event readers, open
//! connections and why the server closed others, and, when the binary
//! registered one ([`set_allocator_probe`]), what its memory allocator holds.
//!
//! Counters are plain atomics indexed by fixed tables (the method list and
//! the error codes are closed sets), so counting costs no lock on the hot path.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use attache_core::task::{ATTACHMENT_KINDS, METHODS};
use axum::extract::State;
use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};

use crate::AppState;

/// The allocator's own figures, in bytes: `(metric name, help, value)`, read
/// at each scrape. The binary chooses the allocator, so it provides the probe.
pub type AllocatorProbe = fn() -> Vec<(&'static str, &'static str, u64)>;

static ALLOCATOR_PROBE: OnceLock<AllocatorProbe> = OnceLock::new();

/// Registers the process's allocator probe for `/metrics` (the first call wins).
pub fn set_allocator_probe(probe: AllocatorProbe) {
    let _ = ALLOCATOR_PROBE.set(probe);
}

/// Outcomes a JSON-RPC call is counted under.
pub const OUTCOMES: &[&str] = &["ok", "-32700", "-32600", "-32601", "-32602", "-32000", "-32002", "-32603"];

pub struct Metrics {
    /// `[method index][outcome index]`; the last method row counts unknown methods.
    rpc: Vec<[AtomicU64; 8]>,
    attachments_created: [AtomicU64; 5],
    attachment_bytes: AtomicU64,
    events_published: AtomicU64,
    live_readers: AtomicI64,
    connections_open: AtomicI64,
    /// Multipart uploads in progress (`attachments::UploadSlots`).
    uploads_in_progress: AtomicI64,
    /// Indexed by `Closed as usize`.
    connections_closed: [AtomicU64; 7],
    /// Responses whose body went out with `sendfile`, and the file bytes they sent.
    file_sends: AtomicU64,
    file_sent_bytes: AtomicU64,
}

/// Why the server closed (or refused) a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// Accepted over `--max-connections`: answered 503 or closed at once.
    OverCap = 0,
    /// No complete request header within `--header-read-timeout`.
    HeaderTimeout = 1,
    /// Nothing in flight for `--idle-timeout`.
    IdleTimeout = 2,
    /// Writes blocked for `--slow-reader-timeout`.
    SlowReader = 3,
    /// A WebSocket message begun and not finished within `--body-read-timeout`.
    MessageTimeout = 4,
    /// Its unfinished request head grew past what `--header-buffer-bytes` had left.
    HeadBudget = 5,
    /// Closed to make room for a new connection at `--max-connections`:
    /// quiet (nothing in flight), or its client taking nothing of an answer.
    Evicted = 6,
}

impl Closed {
    const ALL: [Closed; 7] = [
        Closed::OverCap,
        Closed::HeaderTimeout,
        Closed::IdleTimeout,
        Closed::SlowReader,
        Closed::MessageTimeout,
        Closed::HeadBudget,
        Closed::Evicted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Closed::OverCap => "over_cap",
            Closed::HeaderTimeout => "header_timeout",
            Closed::IdleTimeout => "idle_timeout",
            Closed::SlowReader => "slow_reader",
            Closed::MessageTimeout => "message_timeout",
            Closed::HeadBudget => "head_budget",
            Closed::Evicted => "evicted",
        }
    }
}

/// Holds one open connection in the gauge for as long as it lives.
pub struct OpenConnection(Arc<Metrics>);

impl OpenConnection {
    pub fn new(metrics: Arc<Metrics>) -> OpenConnection {
        metrics.connections_open.fetch_add(1, Ordering::Relaxed);
        OpenConnection(metrics)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.connections_open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            rpc: (0..=METHODS.len()).map(|_| Default::default()).collect(),
            attachments_created: Default::default(),
            attachment_bytes: AtomicU64::new(0),
            events_published: AtomicU64::new(0),
            live_readers: AtomicI64::new(0),
            connections_open: AtomicI64::new(0),
            uploads_in_progress: AtomicI64::new(0),
            connections_closed: Default::default(),
            file_sends: AtomicU64::new(0),
            file_sent_bytes: AtomicU64::new(0),
        }
    }
}

/// Holds one multipart upload in the `attache_uploads_in_progress` gauge for as long as it lives.
pub struct UploadInProgress(Arc<Metrics>);

impl Drop for UploadInProgress {
    fn drop(&mut self) {
        self.0.uploads_in_progress.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Holds one live reader in the gauge for as long as it lives.
pub struct LiveReader(Arc<Metrics>);

impl Drop for LiveReader {
    fn drop(&mut self) {
        self.0.live_readers.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Metrics {
    pub fn rpc_call(&self, method: &str, outcome: &str) {
        let m = METHODS.iter().position(|name| *name == method).unwrap_or(METHODS.len());
        let o = OUTCOMES.iter().position(|name| *name == outcome).unwrap_or(OUTCOMES.len() - 1);
        if let Some(row) = self.rpc.get(m) {
            row[o].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn attachment_created(&self, kind: &str, bytes: u64) {
        if let Some(i) = ATTACHMENT_KINDS.iter().position(|t| *t == kind) {
            self.attachments_created[i].fetch_add(1, Ordering::Relaxed);
        }
        self.attachment_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn published(&self) {
        self.events_published.fetch_add(1, Ordering::Relaxed);
    }

    /// Holds one upload in progress in the gauge for as long as the guard lives.
    pub fn upload_in_progress(self: &Arc<Self>) -> UploadInProgress {
        self.uploads_in_progress.fetch_add(1, Ordering::Relaxed);
        UploadInProgress(self.clone())
    }

    pub fn live_reader(self: &Arc<Self>) -> LiveReader {
        self.live_readers.fetch_add(1, Ordering::Relaxed);
        LiveReader(self.clone())
    }

    pub fn connection_closed(&self, why: Closed) {
        self.connections_closed[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// A response's body went out with `sendfile`: `bytes` of a file, none copied by the server.
    pub fn file_sent(&self, bytes: u64) {
        self.file_sends.fetch_add(1, Ordering::Relaxed);
        self.file_sent_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn live_readers(&self) -> i64 {
        self.live_readers.load(Ordering::Relaxed)
    }

    /// The Prometheus text exposition of every counter.
    /// `stream_appends` comes from the store, which sees every face's appends;
    /// `body_buffer_bytes` from `http::BodyBudget`.
    pub fn render(&self, stream_appends: u64, body_buffer_bytes: usize, response_buffer_bytes: usize) -> String {
        let mut out = String::with_capacity(4096);
        out.push_str("# HELP attache_rpc_requests_total JSON-RPC calls by method and outcome (ok or error code).\n");
        out.push_str("# TYPE attache_rpc_requests_total counter\n");
        for (m, row) in self.rpc.iter().enumerate() {
            let method = METHODS.get(m).copied().unwrap_or("unknown");
            for (o, counter) in row.iter().enumerate() {
                let n = counter.load(Ordering::Relaxed);
                if n > 0 {
                    let _ = writeln!(
                        out,
                        "attache_rpc_requests_total{{method=\"{method}\",status=\"{}\"}} {n}",
                        OUTCOMES[o]
                    );
                }
            }
        }
        out.push_str("# HELP attache_attachments_created_total Task attachments created or replaced, by type.\n");
        out.push_str("# TYPE attache_attachments_created_total counter\n");
        for (i, kind) in ATTACHMENT_KINDS.iter().enumerate() {
            let n = self.attachments_created[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "attache_attachments_created_total{{type=\"{kind}\"}} {n}");
        }
        let scalar = |out: &mut String, name: &str, kind: &str, help: &str, value: String| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
        };
        scalar(
            &mut out,
            "attache_attachment_bytes_total",
            "counter",
            "Bytes written into task attachments (values, contents, binary data).",
            self.attachment_bytes.load(Ordering::Relaxed).to_string(),
        );
        scalar(
            &mut out,
            "attache_stream_appends_total",
            "counter",
            "Appends committed to streams, by every face (retries answered from producer state not counted).",
            stream_appends.to_string(),
        );
        scalar(
            &mut out,
            "attache_events_published_total",
            "counter",
            "Events PUBLISHed to Redis.",
            self.events_published.load(Ordering::Relaxed).to_string(),
        );
        scalar(
            &mut out,
            "attache_live_readers",
            "gauge",
            "Event readers currently connected (long-poll, SSE, WebSocket).",
            self.live_readers().to_string(),
        );
        scalar(
            &mut out,
            "attache_uploads_in_progress",
            "gauge",
            "Multipart uploads in progress, each holding a staging file (bounded by --max-concurrent-uploads).",
            self.uploads_in_progress.load(Ordering::Relaxed).to_string(),
        );
        scalar(
            &mut out,
            "attache_connections_open",
            "gauge",
            "Client connections open (WebSocket included), not counting those refused over the cap.",
            self.connections_open.load(Ordering::Relaxed).to_string(),
        );
        scalar(
            &mut out,
            "attache_body_buffer_bytes",
            "gauge",
            "Bytes held by request bodies being received into memory (bounded by --body-buffer-bytes).",
            body_buffer_bytes.to_string(),
        );
        scalar(
            &mut out,
            "attache_response_buffer_bytes",
            "gauge",
            "Bytes held by large answers made and not yet sent (bounded by --response-buffer-bytes).",
            response_buffer_bytes.to_string(),
        );
        scalar(
            &mut out,
            "attache_sendfile_responses_total",
            "counter",
            "Responses (large catch-up reads) whose body went from a file to the socket with sendfile, uncopied.",
            self.file_sends.load(Ordering::Relaxed).to_string(),
        );
        scalar(
            &mut out,
            "attache_sendfile_bytes_total",
            "counter",
            "File bytes those responses sent.",
            self.file_sent_bytes.load(Ordering::Relaxed).to_string(),
        );
        out.push_str("# HELP attache_connections_closed_total Connections the server closed or refused, by reason.\n");
        out.push_str("# TYPE attache_connections_closed_total counter\n");
        for why in Closed::ALL {
            let n = self.connections_closed[why as usize].load(Ordering::Relaxed);
            let _ = writeln!(out, "attache_connections_closed_total{{reason=\"{}\"}} {n}", why.as_str());
        }
        if let Some(probe) = ALLOCATOR_PROBE.get() {
            for (name, help, bytes) in probe() {
                scalar(&mut out, name, "gauge", help, bytes.to_string());
            }
        }
        out
    }
}

/// GET /metrics. Any authenticated principal may scrape (in token mode: any
/// valid token); the counters say how busy the server is, not what it holds.
/// `GET /metrics`: in token mode, for principals of kind `service` or
/// `system` only (an operator's scraper holds a service token): the counters
/// are the whole server's, and a tenant read in them the exact sizes and
/// times of other principals' attachments and calls (session 18's attack
/// pass: `attache_attachment_bytes_total` went 0 → 12345 as alice attached
/// 12,345 bytes, seen by mallory). Others: 403 `NOT_PERMITTED`. In dev mode,
/// where every caller names its own principal, any caller.
pub async fn get_metrics(State(state): State<AppState>, crate::auth::Caller(who): crate::auth::Caller) -> Response {
    use attache_core::PrincipalKind;
    if state.auth.mode == crate::auth::AuthMode::Token
        && !matches!(who.kind(), PrincipalKind::Service | PrincipalKind::System)
    {
        return crate::error::ApiError::NotPermitted {
            message: format!(
                "{} may not read /metrics: in token mode it is for principals of kind service or system \
                 (an operator's scraper: attache token create --principal service:<name>)",
                who.url()
            ),
        }
        .into_response();
    }
    let mut res = state
        .metrics
        .render(state.store.appends_committed(), state.bodies.held(), state.answers.held())
        .into_response();
    res.headers_mut().insert("content-type", HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
    res
}

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
    /// Origins (`scheme://host[:port]`) allowed to make cross-origin requests
    /// (`--cors-origin`). Empty: none in dev mode, any (`*`) in token mode.
    pub cors_origins: Vec<String>,
    /// Host names dev mode answers besides loopback ones (`--allow-host`).
    pub allowed_hosts: Vec<String>,
    /// Largest JSON-RPC request body (`/rpc`; a batch counts whole).
    pub rpc_max_body_bytes: usize,
    /// Most requests in one JSON-RPC batch (-32600 beyond, refused as the batch is read).
    pub rpc_max_batch: usize,
    /// Calls one principal may make per `rpc_rate_window` (JSON-RPC and MCP); `None`: no limit.
    pub rpc_rate_limit: Option<u32>,
    /// Most bytes of attachment values one JSON-RPC answer carries (a request
    /// or a whole batch; an MCP tool call; a `/ws` execute): a call past it is -32000.
    pub rpc_max_response_bytes: u64,
    pub rpc_rate_window: Duration,
    /// Where task events are PUBLISHed, one channel per event type (`redis://127.0.0.1:6379`).
    pub redis_url: Option<String>,
    /// Which backend holds streams, the registry and blobs.
    pub store: StoreConfig,
    /// Largest WebSocket message on `/ws`, all its fragments together (close 1009 beyond).
    pub ws_max_message_bytes: usize,
    /// How much of a refused request's unread body is read and discarded so
    /// the client can read the refusal (`drain`); past it, `Connection: close`.
    pub refused_body_drain_bytes: u64,
    /// How long that draining may take.
    pub refused_body_drain_time: Duration,
    /// Most event patterns one `/ws` connection holds (a subscribe past it: -32602).
    pub ws_max_patterns: usize,
    /// Most `/ws` WebSockets one principal holds open at once; one more is
    /// refused before the upgrade (429 `TOO_MANY_WEBSOCKETS` with `Retry-After`).
    pub max_websockets_per_principal: usize,
    /// Most `/ws` WebSockets open at once, all principals together; one more
    /// is refused before the upgrade (503 `TOO_MANY_WEBSOCKETS` with
    /// `Retry-After`). `None`: half of `max_connections` (as lowered at start
    /// to fit the open-file limit), so sockets that stay open never take
    /// every connection.
    pub max_websockets: Option<usize>,
    /// Largest header block of one multipart part (and preamble), read before refusing (400).
    pub multipart_max_part_header_bytes: usize,
    /// Most text fields in one multipart upload (400 beyond).
    pub multipart_max_fields: usize,
    /// An MCP session without a message for this long ends (its id then answers 404).
    pub mcp_session_idle_ttl: Duration,
    /// Most MCP sessions open at once (a new one: 503 with Retry-After).
    pub mcp_max_sessions: usize,
    /// Most MCP sessions one principal holds at once (a new one: 429 with Retry-After).
    pub mcp_max_sessions_per_principal: usize,
    /// Largest body of a request that opens an MCP session (its `initialize`,
    /// whose params rmcp keeps for the session's life): 413 past it.
    pub mcp_max_initialize_bytes: usize,
    /// Most materialized entity views kept in memory (least recently used dropped; rebuilt on use).
    pub view_cache_entries: usize,
    /// Most bytes (estimated) the views kept in memory hold together; past it
    /// the least recently used are dropped too, and a larger view is not kept.
    pub view_cache_bytes: usize,
    /// Most manifest entries (attachments in any status: pending, complete,
    /// failed) one entity holds; an upload or task attachment of a new id
    /// past it is refused (409 `TOO_MANY_ATTACHMENTS`, -32602 on the task face).
    pub max_attachments_per_entity: usize,
    /// Most bytes of inline values (task attachments' JSON `value`, text
    /// `content`, `url`; uploads' `meta`) one entity's attachments hold
    /// together, counted as its view holds them (`rows::inline_bytes`); a
    /// `task.create_attachment` past it is refused (-32602, `data.code`
    /// `TOO_MANY_ATTACHMENT_BYTES`), an upload 409 `TOO_MANY_ATTACHMENT_BYTES`.
    pub max_inline_bytes_per_entity: usize,
    /// How many of an entity's latest inbox keys its view keeps, and a send
    /// checks for duplicates (409 `DUPLICATE_KEY`); older keys are forgotten.
    pub inbox_keys_per_entity: usize,
    /// The embedded store's page cache, in bytes; `None` keeps the engine's default.
    pub store_cache_bytes: Option<usize>,
    /// Most segment files the embedded store keeps open (one per stream being
    /// read or written; least recently used closed first). Shares the
    /// open-file limit with connections (`conn::fd_budget`).
    pub store_open_files: usize,
    /// Most embedded-store reads running at once on blocking threads (those
    /// that need the index or a file not in the page cache); further ones wait.
    pub store_read_threads: usize,
    /// Most bytes the embedded store keeps of the newest writes to streams
    /// with live readers, all streams together (`embedded/tail.rs`).
    pub store_tail_cache_bytes: usize,
    /// Most idempotent producers whose state the embedded store keeps in
    /// memory besides those changed since its last checkpoint; the rest are
    /// read from disk when they write again (`embedded/producers.rs`).
    pub store_producer_cache: usize,
    /// With the PostgreSQL store: most bytes of whole blobs cached on local
    /// disk beside the object store (least recently used evicted first; 0: none).
    pub blob_cache_bytes: u64,
    /// With the PostgreSQL store: most bytes of blobs all uploads hold in
    /// memory at once on their way to the object store (at least one 8 MiB
    /// part); an upload past it waits for room.
    pub object_store_upload_buffer_bytes: u64,
    /// Most deleted tasks of one principal (their creator) whose tombstones
    /// (record, grants, closed main stream) are kept so their owners can still
    /// read their events; that principal's older ones are purged.
    pub deleted_tasks_kept: usize,
    /// Largest client data the registry keeps in memory with an entity: spawn
    /// args and tags together, a task's metadata (413 / -32602 beyond).
    pub max_entity_data_bytes: usize,
    /// Most entities (tasks included) one principal may have created and not
    /// purged: the registry keeps every entity in memory (409 beyond).
    pub max_entities_per_principal: usize,
    /// Most client data (spawn args, tags, task metadata) the entities one
    /// principal created may keep in the registry's memory together (409 beyond).
    pub max_entity_data_bytes_per_principal: usize,
    /// Most plain streams (made through the raw stream routes, at paths that
    /// are no entity's) one principal may hold: each keeps its metadata in
    /// memory (409 beyond).
    pub max_streams_per_principal: usize,
    /// Most grants one entity may hold: the registry keeps every grant in memory (409 beyond).
    pub max_grants_per_entity: usize,
    /// Most messages one JSON-mode append may carry: each becomes a row with
    /// its own boundary (~130 B of memory while it is written), whatever its
    /// size (413 beyond).
    pub max_append_messages: usize,
    /// A resumable upload not closed this long after it began is ended: its
    /// manifest row becomes `failed` (with the reason) and its stream is deleted.
    pub upload_expiry: Duration,
    /// Tests only: disk faults injected into the embedded store's file I/O
    /// (never set by the CLI; `None` costs one branch per write or sync).
    #[doc(hidden)]
    pub fault_plan: Option<attache_storage::FaultPlan>,
    /// Tests only: points where a request waits until the test lets it go
    /// (never set by the CLI; `None` costs one branch per point).
    #[doc(hidden)]
    pub pauses: Option<crate::pause::Pauses>,
    /// Tests only: the smallest catch-up read the embedded store may leave
    /// in its segment file, sent with `sendfile` (never set by the CLI;
    /// `None` keeps the engine's 64 KiB, `Some(u64::MAX)` copies every read,
    /// as before there were file bodies: what tests compare against).
    #[doc(hidden)]
    pub store_file_body_min: Option<u64>,
    /// Most client connections open at once (WebSockets included); beyond it a
    /// new connection is answered 503 with `Retry-After` and closed. Lowered at
    /// start to leave room under the process's open-file limit.
    pub max_connections: usize,
    /// Bytes of unfinished request heads past 8 KiB a connection that all
    /// connections may hold together (a connection whose head grows past it is closed).
    pub header_buffer_bytes: usize,
    /// How long a client has to send a whole request header, from connecting
    /// (or, on a kept-alive connection, from the first byte of the next request).
    pub header_read_timeout: Duration,
    /// How long a kept-alive connection with no request in flight stays open.
    pub idle_timeout: Duration,
    /// How long a response may wait on a client that reads nothing before the
    /// connection is closed (the client resumes from its last offset).
    pub slow_reader_timeout: Duration,
    /// At shutdown, how long requests in flight have to finish (a body still
    /// arriving, a response still being read) before their connections are
    /// closed: a client that stalls an upload's body cannot hold the process open.
    pub shutdown_grace: Duration,
    /// Most bytes all request bodies being collected into memory hold at once
    /// (stream appends and creates, `/rpc`, JSON bodies); a body that would go
    /// past it is answered 503 with `Retry-After` at once.
    pub body_buffer_bytes: usize,
    /// How long a body collected into memory has to arrive, all of it, once
    /// its handler starts reading it (408 and the connection closed beyond).
    pub body_read_timeout: Duration,
    /// Most bytes large answers (64 KiB and more) made and not yet sent hold
    /// at once, all requests together (`http::SendBudget`); a read past it is
    /// answered 503 with `Retry-After`, an SSE reader waits for room.
    pub response_buffer_bytes: usize,
    /// The most of `body_buffer_bytes`, of `response_buffer_bytes` and of
    /// `max_concurrent_uploads` one principal holds, in percent of each
    /// (`http::Shares`; always one upload): past it its request is answered
    /// as past the whole budget, while other principals still have room.
    /// 100: no share.
    pub budget_share_per_principal: u8,
    /// How long a multipart upload's body may bring no byte at all, counted
    /// while the server waits for it (408 `BODY_READ_TIMEOUT` and the
    /// connection closed beyond; the upload is recorded `failed`).
    pub upload_idle_timeout: Duration,
    /// The slowest a multipart upload's body may arrive on average, in bytes
    /// per second of the time the server waits for it, once the first
    /// `upload_idle_timeout` of waiting is over (408 beyond); 0: no floor.
    pub upload_min_rate: u64,
    /// Most multipart uploads in progress at once (each holds a staging file
    /// and a connection or an HTTP/2 stream), one principal's at most
    /// `budget_share_per_principal` of them; past it a new one is answered
    /// 503 `TOO_MANY_UPLOADS` with `Retry-After` before it opens any file.
    /// `None`: half of `max_connections`, at most 1,024. Lowered at start to
    /// fit the open-file limit (`conn::fd_budget`).
    pub max_concurrent_uploads: Option<usize>,
    /// Largest `reason` and `payload` of one signal together, counted as JSON
    /// (413 `SIGNAL_TOO_LARGE` beyond): each is kept in a row of the main stream.
    pub max_signal_bytes: usize,
    /// Most signals recorded as rows (SIGINT, SIGHUP, SIGUSR) on one entity
    /// per `signal_rate_window`, whoever sends them (429 with `Retry-After`
    /// beyond); `None`: no limit. Stops (SIGKILL, SIGTERM) are not counted.
    pub signal_rate_limit: Option<u32>,
    pub signal_rate_window: Duration,
}

/// Which backend holds streams, the registry and blobs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum StoreConfig {
    /// redb files and blob files in `data_dir`: one instance.
    #[default]
    Embedded,
    /// PostgreSQL (`postgres://...`) and an object store (`s3://bucket/prefix`,
    /// `file:///path`; default `file://{data_dir}/objects`): many instances
    /// over one database. `data_dir` keeps only scratch files and tokens.
    Postgres { url: String, object_store_url: Option<String> },
}

impl StoreConfig {
    /// `embedded`, or a `postgres://` / `postgresql://` URL.
    pub fn parse(store: &str, object_store_url: Option<String>) -> Result<StoreConfig, String> {
        if store == "embedded" {
            if object_store_url.is_some() {
                return Err("--object-store needs --store postgres://...".into());
            }
            return Ok(StoreConfig::Embedded);
        }
        if store.starts_with("postgres://") || store.starts_with("postgresql://") {
            return Ok(StoreConfig::Postgres { url: store.to_owned(), object_store_url });
        }
        Err(format!("--store must be embedded or a postgres:// URL, got {:?}", redact(store)))
    }

    /// What to call the store in messages (without a password).
    pub fn describe(&self, data_dir: &std::path::Path) -> String {
        match self {
            StoreConfig::Embedded => data_dir.display().to_string(),
            StoreConfig::Postgres { url, .. } => redact(url),
        }
    }
}

/// A URL with its password replaced by `***`.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// The default of `--max-attachment-bytes`: 1 GiB. Uploads stream to disk,
/// so the limit bounds disk, not memory (Electric buffers each upload and
/// stops at 25 MiB). README.md, docs/guides/attachments.md and
/// `attache serve --help` say this number; tests/attachments.rs checks them.
pub const DEFAULT_MAX_ATTACHMENT_BYTES: u64 = 1 << 30;

/// The default of `--upload-min-rate`, in bytes per second: Apache's
/// `mod_reqtimeout` asks request bodies for 500. Slower than any real link
/// (4 kbit/s), it only stops a client that trickles bytes to keep an upload
/// (its staging file, its connection) open.
pub const DEFAULT_UPLOAD_MIN_RATE: u64 = 512;

/// The most uploads in progress at once when `--max-concurrent-uploads` is not given.
pub const DEFAULT_MAX_CONCURRENT_UPLOADS: usize = 1024;

/// The default of `--max-websockets-per-principal`: a browser opens one `/ws`
/// per tab, an agent one per worker.
pub const DEFAULT_MAX_WEBSOCKETS_PER_PRINCIPAL: usize = 32;

impl ServerConfig {
    /// `--max-websockets`, or its default: half of `max_connections` (the
    /// cap in force, perhaps lowered at start), at least 1.
    pub fn websockets(&self, max_connections: usize) -> usize {
        self.max_websockets.unwrap_or(max_connections / 2).max(1)
    }

    /// `--max-concurrent-uploads`, or its default: half of `max_connections`
    /// (so stalled uploads never take every connection), at most
    /// [`DEFAULT_MAX_CONCURRENT_UPLOADS`], at least 1.
    pub fn concurrent_uploads(&self) -> usize {
        self.max_concurrent_uploads
            .unwrap_or_else(|| (self.max_connections / 2).min(DEFAULT_MAX_CONCURRENT_UPLOADS))
            .max(1)
    }

    pub fn new(listen: SocketAddr, data_dir: impl Into<PathBuf>) -> ServerConfig {
        ServerConfig {
            listen,
            data_dir: data_dir.into(),
            long_poll_timeout: Duration::from_secs(30),
            sse_max_duration: Duration::from_secs(60),
            max_append_bytes: 16 << 20,
            max_read_bytes: 1 << 20,
            durable: true,
            max_attachment_bytes: DEFAULT_MAX_ATTACHMENT_BYTES,
            auth: None,
            cors_origins: Vec::new(),
            allowed_hosts: Vec::new(),
            rpc_max_body_bytes: 4 << 20,
            rpc_max_batch: 100,
            rpc_rate_limit: None,
            rpc_max_response_bytes: 16 << 20,
            rpc_rate_window: Duration::from_secs(60),
            redis_url: None,
            store: StoreConfig::Embedded,
            ws_max_message_bytes: 1 << 20,
            refused_body_drain_bytes: 128 << 20,
            refused_body_drain_time: Duration::from_secs(30),
            ws_max_patterns: 100,
            max_websockets_per_principal: DEFAULT_MAX_WEBSOCKETS_PER_PRINCIPAL,
            max_websockets: None,
            multipart_max_part_header_bytes: 8 << 10,
            multipart_max_fields: 64,
            mcp_session_idle_ttl: Duration::from_secs(30 * 60),
            mcp_max_sessions: 1000,
            mcp_max_sessions_per_principal: 100,
            mcp_max_initialize_bytes: 16 << 10,
            view_cache_entries: 10_000,
            view_cache_bytes: 64 << 20,
            max_attachments_per_entity: 10_000,
            max_inline_bytes_per_entity: 64 << 20,
            inbox_keys_per_entity: 10_000,
            store_cache_bytes: None,
            store_open_files: 4096,
            store_read_threads: 16,
            store_tail_cache_bytes: 16 << 20,
            store_producer_cache: 20_000,
            blob_cache_bytes: attache_storage::postgres::DEFAULT_BLOB_CACHE_BYTES,
            object_store_upload_buffer_bytes: attache_storage::postgres::DEFAULT_UPLOAD_BUFFER_BYTES,
            deleted_tasks_kept: 200,
            max_entity_data_bytes: 64 << 10,
            max_entities_per_principal: 100_000,
            max_entity_data_bytes_per_principal: 64 << 20,
            max_streams_per_principal: 100_000,
            max_grants_per_entity: 1_000,
            max_append_messages: 100_000,
            upload_expiry: Duration::from_secs(24 * 3600),
            fault_plan: None,
            pauses: None,
            store_file_body_min: None,
            max_connections: 4096,
            header_buffer_bytes: 16 << 20,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            slow_reader_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(30),
            body_buffer_bytes: 256 << 20,
            body_read_timeout: Duration::from_secs(60),
            response_buffer_bytes: 64 << 20,
            budget_share_per_principal: 25,
            upload_idle_timeout: Duration::from_secs(30),
            upload_min_rate: DEFAULT_UPLOAD_MIN_RATE,
            max_concurrent_uploads: None,
            max_signal_bytes: 16 << 10,
            signal_rate_limit: Some(60),
            signal_rate_window: Duration::from_secs(60),
        }
    }
}

//! `attache serve`: settings from flags, then environment, then a TOML
//! config file, then defaults; runs until SIGTERM or SIGINT.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use attache_server::{Server, ServerConfig};
use serde::Deserialize;

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Address to listen on [default: 127.0.0.1:4437]
    #[arg(long, env = "ATTACHE_LISTEN")]
    listen: Option<SocketAddr>,
    /// Where the embedded store keeps its files [default: ./attache-data]
    #[arg(long, env = "ATTACHE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// How long a long-poll read waits for data, e.g. 30s or 1500ms [default: 30s]
    #[arg(long, env = "ATTACHE_LONG_POLL_TIMEOUT", value_parser = humantime::parse_duration)]
    long_poll_timeout: Option<Duration>,
    /// Largest body of a stream append or create, in bytes [default: 16777216]
    #[arg(long, env = "ATTACHE_MAX_APPEND_BYTES")]
    max_append_bytes: Option<usize>,
    /// Most bytes one stream read answers (a catch-up or long-poll read, a page of task events);
    /// whole JSON messages, and always at least one [default: 1048576, 1 MiB]
    #[arg(long, env = "ATTACHE_MAX_READ_BYTES")]
    max_read_bytes: Option<usize>,
    /// Largest attachment, in bytes; uploads stream to disk [default: 1073741824, 1 GiB]
    #[arg(long, env = "ATTACHE_MAX_ATTACHMENT_BYTES")]
    max_attachment_bytes: Option<u64>,
    /// Do not sync the write-ahead log before acknowledging a write (faster; a crashed process loses
    /// nothing, a power loss up to the last checkpoint: about a second)
    #[arg(long, env = "ATTACHE_NO_FSYNC")]
    no_fsync: bool,
    /// Who is asking: `dev` trusts the electric-principal header (loopback only),
    /// `token` requires Authorization: Bearer [default: dev on loopback, token elsewhere]
    #[arg(long, env = "ATTACHE_AUTH", value_parser = ["dev", "token"])]
    auth: Option<String>,
    /// An origin (scheme://host[:port]) allowed to call from a browser, e.g. a UI at
    /// http://localhost:5173; repeat for more [default: none in dev mode, any in token mode]
    #[arg(long = "cors-origin", env = "ATTACHE_CORS_ORIGIN", value_delimiter = ',')]
    cors_origin: Vec<String>,
    /// Dev mode: a Host name answered besides loopback names (localhost, *.localhost,
    /// 127.x.y.z, [::1]); repeat for more [default: loopback names only]
    #[arg(long = "allow-host", env = "ATTACHE_ALLOW_HOST", value_delimiter = ',')]
    allow_host: Vec<String>,
    /// Also PUBLISH every task event to this Redis, on a channel named after its type
    #[arg(long, env = "ATTACHE_REDIS_URL")]
    redis_url: Option<String>,
    /// JSON-RPC and MCP calls one principal may make per --rpc-rate-window [default: unlimited]
    #[arg(long, env = "ATTACHE_RPC_RATE_LIMIT")]
    rpc_rate_limit: Option<u32>,
    /// The rate limit's window, e.g. 60s [default: 60s]
    #[arg(long, env = "ATTACHE_RPC_RATE_WINDOW", value_parser = humantime::parse_duration)]
    rpc_rate_window: Option<Duration>,
    /// Largest JSON-RPC request body, in bytes [default: 4194304]
    #[arg(long, env = "ATTACHE_RPC_MAX_BODY_BYTES")]
    rpc_max_body_bytes: Option<usize>,
    /// Most requests in one JSON-RPC batch; a longer batch is answered -32600 [default: 100]
    #[arg(long, env = "ATTACHE_RPC_MAX_BATCH")]
    rpc_max_batch: Option<usize>,
    /// Most bytes of attachment values one JSON-RPC answer (a request or a whole batch), MCP tool call
    /// or /ws execute carries; a call past it is answered -32000 [default: 16777216]
    #[arg(long, env = "ATTACHE_RPC_MAX_RESPONSE_BYTES")]
    rpc_max_response_bytes: Option<u64>,
    /// Largest WebSocket message on /ws, fragments together; beyond it the socket closes with 1009 [default: 1048576]
    #[arg(long, env = "ATTACHE_WS_MAX_MESSAGE_BYTES")]
    ws_max_message_bytes: Option<usize>,
    /// Most event patterns one /ws connection holds; a subscribe past it is refused with -32602 [default: 100]
    #[arg(long, env = "ATTACHE_WS_MAX_PATTERNS")]
    ws_max_patterns: Option<usize>,
    /// Most /ws WebSockets one principal holds open at once; past it the upgrade is refused with
    /// 429 TOO_MANY_WEBSOCKETS [default: 32]
    #[arg(long, env = "ATTACHE_MAX_WEBSOCKETS_PER_PRINCIPAL")]
    max_websockets_per_principal: Option<usize>,
    /// Most /ws WebSockets open at once, all principals together; past it the upgrade is refused
    /// with 503 TOO_MANY_WEBSOCKETS [default: half of --max-connections]
    #[arg(long, env = "ATTACHE_MAX_WEBSOCKETS")]
    max_websockets: Option<usize>,
    /// Most bytes of a refused request's unread body read and discarded so the client can read the refusal;
    /// past it (or declared larger) the answer closes the connection [default: 134217728, 128 MiB]
    #[arg(long, env = "ATTACHE_REFUSED_BODY_DRAIN_BYTES")]
    refused_body_drain_bytes: Option<u64>,
    /// Largest header block of one multipart part, in bytes; past it an upload is refused with 400 [default: 8192]
    #[arg(long, env = "ATTACHE_MULTIPART_MAX_PART_HEADER_BYTES")]
    multipart_max_part_header_bytes: Option<usize>,
    /// Most text fields in one multipart upload; past it the upload is refused with 400 [default: 64]
    #[arg(long, env = "ATTACHE_MULTIPART_MAX_FIELDS")]
    multipart_max_fields: Option<usize>,
    /// An MCP session idle this long ends, e.g. 30m [default: 30m]
    #[arg(long, env = "ATTACHE_MCP_SESSION_IDLE_TTL", value_parser = humantime::parse_duration)]
    mcp_session_idle_ttl: Option<Duration>,
    /// A resumable upload not closed this long after it began fails and its bytes are deleted, e.g. 24h [default: 24h]
    #[arg(long, env = "ATTACHE_UPLOAD_EXPIRY", value_parser = humantime::parse_duration)]
    upload_expiry: Option<Duration>,
    /// Most MCP sessions open at once; past it a new session is refused with 503 [default: 1000]
    #[arg(long, env = "ATTACHE_MCP_MAX_SESSIONS")]
    mcp_max_sessions: Option<usize>,
    /// Most materialized entity views kept in memory; the least recently used is dropped and rebuilt on use [default: 10000]
    #[arg(long, env = "ATTACHE_VIEW_CACHE_ENTRIES")]
    view_cache_entries: Option<usize>,
    /// Most bytes (estimated) the entity views kept in memory hold together; past it the least
    /// recently used are dropped, and a larger view is not kept [default: 67108864, 64 MiB]
    #[arg(long, env = "ATTACHE_VIEW_CACHE_BYTES")]
    view_cache_bytes: Option<usize>,
    /// Most attachments one entity (or task) holds, counting pending and failed uploads' rows;
    /// an upload of a new id past it is refused with 409 TOO_MANY_ATTACHMENTS [default: 10000]
    #[arg(long, env = "ATTACHE_MAX_ATTACHMENTS_PER_ENTITY")]
    max_attachments_per_entity: Option<usize>,
    /// Most bytes of inline attachment values (task attachments' JSON value, text content, url;
    /// uploads' meta) one entity holds together, counted as held in memory; a
    /// task.create_attachment past it is refused with -32602, data.code TOO_MANY_ATTACHMENT_BYTES,
    /// an upload with 409 TOO_MANY_ATTACHMENT_BYTES [default: 67108864, 64 MiB]
    #[arg(long, env = "ATTACHE_MAX_INLINE_BYTES_PER_ENTITY")]
    max_inline_bytes_per_entity: Option<usize>,
    /// How many of an entity's latest inbox message keys are kept and checked for duplicates
    /// (409 DUPLICATE_KEY); a key older than that is no longer checked [default: 10000]
    #[arg(long, env = "ATTACHE_INBOX_KEYS_PER_ENTITY")]
    inbox_keys_per_entity: Option<usize>,
    /// The embedded store's page cache (redb: stream metadata and indexes), in bytes [default: 4194304]
    #[arg(long, env = "ATTACHE_STORE_CACHE_BYTES")]
    store_cache_bytes: Option<usize>,
    /// Most stream segment files the embedded store keeps open (least recently used closed
    /// first; lowered at start to fit the open-file limit beside --max-connections) [default: 4096]
    #[arg(long, env = "ATTACHE_STORE_OPEN_FILES")]
    store_open_files: Option<usize>,
    /// Most threads for blocking work (file reads and writes, store reads, hashing); work past it
    /// waits its turn. Threads idle for a minute exit [default: 32]
    #[arg(long, env = "ATTACHE_BLOCKING_THREADS")]
    blocking_threads: Option<usize>,
    /// Most embedded-store reads running at once on blocking threads (reads that need the
    /// index or a file not in the page cache; the rest wait their turn) [default: 16]
    #[arg(long, env = "ATTACHE_STORE_READ_THREADS")]
    store_read_threads: Option<usize>,
    /// Most bytes the embedded store keeps in memory of the newest writes to streams with
    /// live readers, all streams together (at most 64 KiB served per stream) [default: 16777216]
    #[arg(long, env = "ATTACHE_STORE_TAIL_CACHE_BYTES")]
    store_tail_cache_bytes: Option<usize>,
    /// Most idempotent producers the embedded store keeps in memory (~150 B each, ~800 B with 256-byte ids) besides those changed since its last checkpoint; the others are read from disk when they write again [default: 20000]
    #[arg(long, env = "ATTACHE_STORE_PRODUCER_CACHE")]
    store_producer_cache: Option<usize>,
    /// Most deleted tasks kept as tombstones per principal (the tasks' creator; their owners can still read their events); past it that principal's oldest are purged for good [default: 200]
    #[arg(long, env = "ATTACHE_DELETED_TASKS_KEPT")]
    deleted_tasks_kept: Option<usize>,
    /// Largest client data kept in memory with an entity (spawn args and tags together, a task's metadata), in bytes of JSON [default: 65536]
    #[arg(long, env = "ATTACHE_MAX_ENTITY_DATA_BYTES")]
    max_entity_data_bytes: Option<usize>,
    /// Most entities (tasks included) one principal may hold, kept in memory by the registry; past it a spawn, fork or task.create is refused with 409 TOO_MANY_ENTITIES [default: 100000]
    #[arg(long, env = "ATTACHE_MAX_ENTITIES_PER_PRINCIPAL")]
    max_entities_per_principal: Option<usize>,
    /// Most plain streams (made by PUT at paths that are no entity's) one principal may hold, each kept in memory; past it a create is refused with 409 TOO_MANY_STREAMS [default: 100000]
    #[arg(long, env = "ATTACHE_MAX_STREAMS_PER_PRINCIPAL")]
    max_streams_per_principal: Option<usize>,
    /// Most bytes of client data (spawn args, tags, task metadata) one principal's entities keep in memory together; past it a spawn, fork, task.create or an update that grows them is refused with 409 TOO_MANY_ENTITIES [default: 67108864]
    #[arg(long, env = "ATTACHE_MAX_ENTITY_DATA_BYTES_PER_PRINCIPAL")]
    max_entity_data_bytes_per_principal: Option<usize>,
    /// Most grants one entity may hold, each kept in memory; past it a grant is refused with 409 TOO_MANY_GRANTS [default: 1000]
    #[arg(long, env = "ATTACHE_MAX_GRANTS_PER_ENTITY")]
    max_grants_per_entity: Option<usize>,
    /// Most messages one JSON-mode append may carry (a JSON array's items); past it the append is refused with 413 TOO_MANY_MESSAGES [default: 100000]
    #[arg(long, env = "ATTACHE_MAX_APPEND_MESSAGES")]
    max_append_messages: Option<usize>,
    /// Most MCP sessions one principal holds at once; past it a new session is refused with 429 [default: 100]
    #[arg(long, env = "ATTACHE_MCP_MAX_SESSIONS_PER_PRINCIPAL")]
    mcp_max_sessions_per_principal: Option<usize>,
    /// Largest body of a request that opens an MCP session (its `initialize`, kept for the session's life), in bytes; past it: 413 [default: 16384]
    #[arg(long, env = "ATTACHE_MCP_MAX_INITIALIZE_BYTES")]
    mcp_max_initialize_bytes: Option<usize>,
    /// Where streams, entities and blobs live: `embedded` (files in --data-dir, one instance)
    /// or `postgres://user:pass@host/db` (many instances over one database) [default: embedded]
    #[arg(long, env = "ATTACHE_STORE")]
    store: Option<String>,
    /// With --store postgres://...: where blob bytes go: `s3://bucket/prefix` (AWS_* variables
    /// for credentials, AWS_ENDPOINT for other S3-compatible stores) or `file:///shared/dir`
    /// [default: file://<data-dir>/objects, usable only by instances sharing that directory]
    #[arg(long, env = "ATTACHE_OBJECT_STORE")]
    object_store: Option<String>,
    /// With --store postgres://...: most bytes of whole blobs kept on local disk
    /// (<data-dir>/blob-cache) to serve reads without the object store; least recently used
    /// evicted first; 0 caches nothing [default: 1073741824, 1 GiB]
    #[arg(long, env = "ATTACHE_BLOB_CACHE_BYTES")]
    blob_cache_bytes: Option<u64>,
    /// With --store postgres://...: most bytes of blobs all uploads hold in memory at once while
    /// they are sent to the object store (read from local staging a part at a time); an upload
    /// past it waits for room; below one 8 MiB part counts as one part [default: 33554432, 32 MiB]
    #[arg(long, env = "ATTACHE_OBJECT_STORE_UPLOAD_BUFFER_BYTES")]
    object_store_upload_buffer_bytes: Option<u64>,
    /// Most client connections open at once, WebSockets included; beyond it a new connection
    /// is answered 503 with Retry-After (lowered at start to fit the open-file limit) [default: 4096]
    #[arg(long, env = "ATTACHE_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// Bytes of unfinished request headers past 8 KiB a connection that all connections may hold together; a connection whose header grows past it is closed [default: 16777216]
    #[arg(long, env = "ATTACHE_HEADER_BUFFER_BYTES")]
    header_buffer_bytes: Option<usize>,
    /// How long a client has to send a whole request header, e.g. 10s [default: 10s]
    #[arg(long, env = "ATTACHE_HEADER_READ_TIMEOUT", value_parser = humantime::parse_duration)]
    header_read_timeout: Option<Duration>,
    /// How long a kept-alive connection with no request in flight stays open, and a WebSocket
    /// from which no frame arrives (it is pinged every half of this), e.g. 60s [default: 60s]
    #[arg(long, env = "ATTACHE_IDLE_TIMEOUT", value_parser = humantime::parse_duration)]
    idle_timeout: Option<Duration>,
    /// How long a response (or a WebSocket message) may wait on a client that reads nothing
    /// before the connection is closed, e.g. 30s [default: 30s]
    #[arg(long, env = "ATTACHE_SLOW_READER_TIMEOUT", value_parser = humantime::parse_duration)]
    slow_reader_timeout: Option<Duration>,
    /// At shutdown (SIGTERM), how long requests in flight have to finish before their
    /// connections are closed, e.g. 30s [default: 30s]
    #[arg(long, env = "ATTACHE_SHUTDOWN_GRACE", value_parser = humantime::parse_duration)]
    shutdown_grace: Option<Duration>,
    /// Most bytes all request bodies being received into memory hold at once (stream appends and
    /// creates, /rpc, JSON bodies); a body past it is answered 503 with Retry-After [default: 268435456, 256 MiB]
    #[arg(long, env = "ATTACHE_BODY_BUFFER_BYTES")]
    body_buffer_bytes: Option<usize>,
    /// How long such a body has to arrive, all of it; a slower one is answered 408 and its
    /// connection closed, e.g. 60s [default: 60s]
    #[arg(long, env = "ATTACHE_BODY_READ_TIMEOUT", value_parser = humantime::parse_duration)]
    body_read_timeout: Option<Duration>,
    /// Most bytes large answers (64 KiB and more: stream reads and SSE events) waiting for
    /// their clients to read them hold at once; a read past it is answered 503
    /// with Retry-After, an SSE reader waits for room [default: 67108864, 64 MiB]
    #[arg(long, env = "ATTACHE_RESPONSE_BUFFER_BYTES")]
    response_buffer_bytes: Option<usize>,
    /// The most of --body-buffer-bytes, of --response-buffer-bytes and of --max-concurrent-uploads
    /// one principal holds, in percent of each (always one upload); past it its request is
    /// answered as past the whole budget (503), while others still have room. 100: no share
    /// [default: 25]
    #[arg(long, env = "ATTACHE_BUDGET_SHARE_PER_PRINCIPAL", value_parser = clap::value_parser!(u8).range(1..=100))]
    budget_share_per_principal: Option<u8>,
    /// Largest reason and payload of one signal together, in bytes of JSON; a larger signal
    /// is refused with 413 [default: 16384]
    #[arg(long, env = "ATTACHE_MAX_SIGNAL_BYTES")]
    max_signal_bytes: Option<usize>,
    /// Most signals recorded as rows (SIGINT, SIGHUP, SIGUSR) on one entity per --signal-rate-window,
    /// whoever sends them; past it 429 with Retry-After. 0: no limit [default: 60]
    #[arg(long, env = "ATTACHE_SIGNAL_RATE_LIMIT")]
    signal_rate_limit: Option<u32>,
    /// The signal rate limit's window, e.g. 60s [default: 60s]
    #[arg(long, env = "ATTACHE_SIGNAL_RATE_WINDOW", value_parser = humantime::parse_duration)]
    signal_rate_window: Option<Duration>,
    /// How long a multipart upload's body may bring no byte at all; past it the upload is
    /// answered 408, its connection closed and it is recorded failed, e.g. 30s [default: 30s]
    #[arg(long, env = "ATTACHE_UPLOAD_IDLE_TIMEOUT", value_parser = humantime::parse_duration)]
    upload_idle_timeout: Option<Duration>,
    /// The slowest a multipart upload's body may arrive on average, in bytes per second, once
    /// its first --upload-idle-timeout is over; a slower one is answered 408. 0: no floor [default: 512]
    #[arg(long, env = "ATTACHE_UPLOAD_MIN_RATE")]
    upload_min_rate: Option<u64>,
    /// Most multipart uploads in progress at once (HTTP/2 streams count one each), one principal's
    /// at most --budget-share-per-principal of them; past it a new one is answered 503
    /// TOO_MANY_UPLOADS with Retry-After. Lowered at start to fit the open-file limit
    /// [default: half of --max-connections, at most 1024]
    #[arg(long, env = "ATTACHE_MAX_CONCURRENT_UPLOADS")]
    max_concurrent_uploads: Option<usize>,
    /// A TOML file with any of the settings above, each named as its flag with underscores
    /// (max_attachments_per_entity = 5000, long_poll_timeout = "30s", no_fsync = true); cors_origins
    /// and allow_hosts are lists. A flag or its environment variable wins over the file
    #[arg(long, env = "ATTACHE_CONFIG")]
    config: Option<PathBuf>,
}

/// The config file: the same settings as the flags.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    long_poll_timeout: Option<String>,
    max_append_bytes: Option<usize>,
    max_read_bytes: Option<usize>,
    max_attachment_bytes: Option<u64>,
    no_fsync: Option<bool>,
    auth: Option<String>,
    cors_origins: Option<Vec<String>>,
    allow_hosts: Option<Vec<String>>,
    redis_url: Option<String>,
    rpc_rate_limit: Option<u32>,
    rpc_rate_window: Option<String>,
    rpc_max_body_bytes: Option<usize>,
    rpc_max_batch: Option<usize>,
    rpc_max_response_bytes: Option<u64>,
    ws_max_message_bytes: Option<usize>,
    ws_max_patterns: Option<usize>,
    max_websockets_per_principal: Option<usize>,
    max_websockets: Option<usize>,
    refused_body_drain_bytes: Option<u64>,
    multipart_max_part_header_bytes: Option<usize>,
    multipart_max_fields: Option<usize>,
    mcp_session_idle_ttl: Option<String>,
    upload_expiry: Option<String>,
    mcp_max_sessions: Option<usize>,
    view_cache_entries: Option<usize>,
    view_cache_bytes: Option<usize>,
    max_attachments_per_entity: Option<usize>,
    max_inline_bytes_per_entity: Option<usize>,
    inbox_keys_per_entity: Option<usize>,
    store_cache_bytes: Option<usize>,
    store_open_files: Option<usize>,
    blocking_threads: Option<usize>,
    store_read_threads: Option<usize>,
    store_tail_cache_bytes: Option<usize>,
    store_producer_cache: Option<usize>,
    deleted_tasks_kept: Option<usize>,
    max_entity_data_bytes: Option<usize>,
    max_entities_per_principal: Option<usize>,
    max_streams_per_principal: Option<usize>,
    max_entity_data_bytes_per_principal: Option<usize>,
    max_grants_per_entity: Option<usize>,
    max_append_messages: Option<usize>,
    mcp_max_sessions_per_principal: Option<usize>,
    mcp_max_initialize_bytes: Option<usize>,
    store: Option<String>,
    object_store: Option<String>,
    blob_cache_bytes: Option<u64>,
    object_store_upload_buffer_bytes: Option<u64>,
    max_connections: Option<usize>,
    header_buffer_bytes: Option<usize>,
    header_read_timeout: Option<String>,
    idle_timeout: Option<String>,
    slow_reader_timeout: Option<String>,
    shutdown_grace: Option<String>,
    body_buffer_bytes: Option<usize>,
    body_read_timeout: Option<String>,
    response_buffer_bytes: Option<usize>,
    budget_share_per_principal: Option<u8>,
    max_signal_bytes: Option<usize>,
    signal_rate_limit: Option<u32>,
    signal_rate_window: Option<String>,
    upload_idle_timeout: Option<String>,
    upload_min_rate: Option<u64>,
    max_concurrent_uploads: Option<usize>,
}

/// A setting from its flag, else from the config file, else unchanged.
fn setting<T>(flag: Option<T>, file: Option<T>, into: &mut T) {
    if let Some(v) = flag.or(file) {
        *into = v;
    }
}

/// A duration from its flag, else from the config file (`name` there, refused
/// with `example` as a duration it would take), else unchanged.
fn duration(
    flag: Option<Duration>,
    file: Option<String>,
    name: &str,
    example: &str,
    into: &mut Duration,
) -> anyhow::Result<()> {
    if let Some(d) = flag {
        *into = d;
    } else if let Some(text) = file {
        *into = humantime::parse_duration(&text)
            .with_context(|| format!("{name} {text:?} is not a duration like {example}"))?;
    }
    Ok(())
}

/// Settings of the process rather than of the server: read before the
/// runtime that runs the server starts.
struct Process {
    blocking_threads: usize,
}

/// The default of `--blocking-threads`: enough for the store's read permits
/// (16) beside uploads, blob hashing and registry writes. Tokio's own default
/// (512) lets a burst of file work start hundreds of threads, each with its
/// stack and allocator caches: memory that a long run only ever gains.
const DEFAULT_BLOCKING_THREADS: usize = 32;

fn resolve(args: ServeArgs) -> anyhow::Result<(ServerConfig, Process)> {
    let file: FileConfig = match &args.config {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).with_context(|| format!("cannot read config file {}", path.display()))?;
            toml::from_str(&text).with_context(|| format!("config file {} is not valid", path.display()))?
        }
        None => FileConfig::default(),
    };
    let listen = args.listen.or(file.listen).unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 4437)));
    let data_dir = args.data_dir.or(file.data_dir).unwrap_or_else(|| PathBuf::from("./attache-data"));
    let mut config = ServerConfig::new(listen, data_dir);
    duration(args.long_poll_timeout, file.long_poll_timeout, "long_poll_timeout", "2s", &mut config.long_poll_timeout)?;
    setting(args.max_append_bytes, file.max_append_bytes, &mut config.max_append_bytes);
    setting(args.max_read_bytes, file.max_read_bytes, &mut config.max_read_bytes);
    anyhow::ensure!(config.max_read_bytes > 0, "max_read_bytes must be at least 1");
    setting(args.max_attachment_bytes, file.max_attachment_bytes, &mut config.max_attachment_bytes);
    config.durable = !(args.no_fsync || file.no_fsync.unwrap_or(false));
    config.cors_origins =
        if args.cors_origin.is_empty() { file.cors_origins.unwrap_or_default() } else { args.cors_origin };
    config.allowed_hosts =
        if args.allow_host.is_empty() { file.allow_hosts.unwrap_or_default() } else { args.allow_host };
    config.redis_url = args.redis_url.or(file.redis_url);
    config.rpc_rate_limit = args.rpc_rate_limit.or(file.rpc_rate_limit);
    duration(args.rpc_rate_window, file.rpc_rate_window, "rpc_rate_window", "60s", &mut config.rpc_rate_window)?;
    setting(args.rpc_max_body_bytes, file.rpc_max_body_bytes, &mut config.rpc_max_body_bytes);
    setting(args.rpc_max_batch, file.rpc_max_batch, &mut config.rpc_max_batch);
    setting(args.rpc_max_response_bytes, file.rpc_max_response_bytes, &mut config.rpc_max_response_bytes);
    setting(args.ws_max_message_bytes, file.ws_max_message_bytes, &mut config.ws_max_message_bytes);
    setting(args.refused_body_drain_bytes, file.refused_body_drain_bytes, &mut config.refused_body_drain_bytes);
    setting(args.ws_max_patterns, file.ws_max_patterns, &mut config.ws_max_patterns);
    if let Some(n) = args.max_websockets_per_principal.or(file.max_websockets_per_principal) {
        anyhow::ensure!(n > 0, "max_websockets_per_principal must be at least 1");
        config.max_websockets_per_principal = n;
    }
    if let Some(n) = args.max_websockets.or(file.max_websockets) {
        anyhow::ensure!(n > 0, "max_websockets must be at least 1");
        config.max_websockets = Some(n);
    }
    setting(
        args.multipart_max_part_header_bytes,
        file.multipart_max_part_header_bytes,
        &mut config.multipart_max_part_header_bytes,
    );
    setting(args.multipart_max_fields, file.multipart_max_fields, &mut config.multipart_max_fields);
    duration(
        args.mcp_session_idle_ttl,
        file.mcp_session_idle_ttl,
        "mcp_session_idle_ttl",
        "30m",
        &mut config.mcp_session_idle_ttl,
    )?;
    duration(args.upload_expiry, file.upload_expiry, "upload_expiry", "24h", &mut config.upload_expiry)?;
    setting(args.mcp_max_sessions, file.mcp_max_sessions, &mut config.mcp_max_sessions);
    setting(args.view_cache_entries, file.view_cache_entries, &mut config.view_cache_entries);
    setting(args.view_cache_bytes, file.view_cache_bytes, &mut config.view_cache_bytes);
    if let Some(n) = args.max_attachments_per_entity.or(file.max_attachments_per_entity) {
        anyhow::ensure!(n > 0, "max_attachments_per_entity must be at least 1");
        config.max_attachments_per_entity = n;
    }
    if let Some(n) = args.max_inline_bytes_per_entity.or(file.max_inline_bytes_per_entity) {
        anyhow::ensure!(n > 0, "max_inline_bytes_per_entity must be at least 1");
        config.max_inline_bytes_per_entity = n;
    }
    if let Some(n) = args.inbox_keys_per_entity.or(file.inbox_keys_per_entity) {
        anyhow::ensure!(n > 0, "inbox_keys_per_entity must be at least 1");
        config.inbox_keys_per_entity = n;
    }
    if let Some(n) = args.store_cache_bytes.or(file.store_cache_bytes) {
        config.store_cache_bytes = Some(n);
    }
    if let Some(n) = args.store_open_files.or(file.store_open_files) {
        anyhow::ensure!(n > 0, "store_open_files must be at least 1");
        config.store_open_files = n;
    }
    let blocking_threads = args.blocking_threads.or(file.blocking_threads).unwrap_or(DEFAULT_BLOCKING_THREADS);
    anyhow::ensure!(blocking_threads > 0, "blocking_threads must be at least 1");
    if let Some(n) = args.store_read_threads.or(file.store_read_threads) {
        anyhow::ensure!(n > 0, "store_read_threads must be at least 1");
        config.store_read_threads = n;
    }
    setting(args.store_tail_cache_bytes, file.store_tail_cache_bytes, &mut config.store_tail_cache_bytes);
    setting(args.store_producer_cache, file.store_producer_cache, &mut config.store_producer_cache);
    setting(args.blob_cache_bytes, file.blob_cache_bytes, &mut config.blob_cache_bytes);
    setting(
        args.object_store_upload_buffer_bytes,
        file.object_store_upload_buffer_bytes,
        &mut config.object_store_upload_buffer_bytes,
    );
    setting(args.deleted_tasks_kept, file.deleted_tasks_kept, &mut config.deleted_tasks_kept);
    setting(args.max_entity_data_bytes, file.max_entity_data_bytes, &mut config.max_entity_data_bytes);
    setting(args.max_entities_per_principal, file.max_entities_per_principal, &mut config.max_entities_per_principal);
    setting(args.max_streams_per_principal, file.max_streams_per_principal, &mut config.max_streams_per_principal);
    setting(args.max_grants_per_entity, file.max_grants_per_entity, &mut config.max_grants_per_entity);
    setting(
        args.max_entity_data_bytes_per_principal,
        file.max_entity_data_bytes_per_principal,
        &mut config.max_entity_data_bytes_per_principal,
    );
    setting(args.max_append_messages, file.max_append_messages, &mut config.max_append_messages);
    setting(
        args.mcp_max_sessions_per_principal,
        file.mcp_max_sessions_per_principal,
        &mut config.mcp_max_sessions_per_principal,
    );
    setting(args.mcp_max_initialize_bytes, file.mcp_max_initialize_bytes, &mut config.mcp_max_initialize_bytes);
    setting(args.header_buffer_bytes, file.header_buffer_bytes, &mut config.header_buffer_bytes);
    if let Some(n) = args.max_connections.or(file.max_connections) {
        anyhow::ensure!(n > 0, "max_connections must be at least 1");
        config.max_connections = n;
    }
    duration(
        args.header_read_timeout,
        file.header_read_timeout,
        "header_read_timeout",
        "10s",
        &mut config.header_read_timeout,
    )?;
    duration(args.idle_timeout, file.idle_timeout, "idle_timeout", "10s", &mut config.idle_timeout)?;
    duration(
        args.slow_reader_timeout,
        file.slow_reader_timeout,
        "slow_reader_timeout",
        "10s",
        &mut config.slow_reader_timeout,
    )?;
    duration(args.shutdown_grace, file.shutdown_grace, "shutdown_grace", "30s", &mut config.shutdown_grace)?;
    setting(args.body_buffer_bytes, file.body_buffer_bytes, &mut config.body_buffer_bytes);
    setting(args.response_buffer_bytes, file.response_buffer_bytes, &mut config.response_buffer_bytes);
    setting(
        args.budget_share_per_principal,
        file.budget_share_per_principal.map(|p| p.clamp(1, 100)),
        &mut config.budget_share_per_principal,
    );
    duration(
        args.body_read_timeout,
        file.body_read_timeout,
        "body_read_timeout",
        "10s",
        &mut config.body_read_timeout,
    )?;
    setting(args.max_signal_bytes, file.max_signal_bytes, &mut config.max_signal_bytes);
    if let Some(n) = args.signal_rate_limit.or(file.signal_rate_limit) {
        config.signal_rate_limit = (n > 0).then_some(n);
    }
    duration(
        args.signal_rate_window,
        file.signal_rate_window,
        "signal_rate_window",
        "10s",
        &mut config.signal_rate_window,
    )?;
    anyhow::ensure!(!config.signal_rate_window.is_zero(), "signal_rate_window must be longer than 0");
    duration(
        args.upload_idle_timeout,
        file.upload_idle_timeout,
        "upload_idle_timeout",
        "30s",
        &mut config.upload_idle_timeout,
    )?;
    anyhow::ensure!(!config.upload_idle_timeout.is_zero(), "upload_idle_timeout must be longer than 0");
    setting(args.upload_min_rate, file.upload_min_rate, &mut config.upload_min_rate);
    if let Some(n) = args.max_concurrent_uploads.or(file.max_concurrent_uploads) {
        anyhow::ensure!(n > 0, "max_concurrent_uploads must be at least 1");
        config.max_concurrent_uploads = Some(n);
    }
    let store = args.store.or(file.store).unwrap_or_else(|| "embedded".into());
    config.store = attache_server::StoreConfig::parse(&store, args.object_store.or(file.object_store))
        .map_err(anyhow::Error::msg)?;
    if let Some(mode) = args.auth.or(file.auth) {
        config.auth = Some(
            attache_server::auth::AuthMode::parse(&mode)
                .with_context(|| format!("auth must be dev or token, got {mode:?}"))?,
        );
    }
    Ok((config, Process { blocking_threads }))
}

/// Runs the server until SIGTERM or SIGINT, on a runtime built for it.
pub fn main(args: ServeArgs) -> anyhow::Result<()> {
    let (config, process) = resolve(args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .max_blocking_threads(process.blocking_threads)
        .thread_keep_alive(Duration::from_secs(60))
        .enable_all()
        .build()?;
    runtime.block_on(run(config))
}

async fn run(config: ServerConfig) -> anyhow::Result<()> {
    if !config.durable {
        tracing::warn!(
            "--no-fsync: writes are acknowledged before they are on disk (a power loss can take the last second)"
        );
    }
    let server = Server::start(config).await?;
    shutdown_signal().await;
    tracing::info!("shutting down");
    server.stop().await;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_setting_takes_its_flag_over_the_config_file_and_keeps_its_default_without_either() {
        let mut value = 1;
        setting(None, None, &mut value);
        assert_eq!(value, 1);
        setting(None, Some(2), &mut value);
        assert_eq!(value, 2);
        setting(Some(3), Some(4), &mut value);
        assert_eq!(value, 3);
    }

    #[test]
    fn a_duration_takes_its_flag_over_the_config_file_and_refuses_file_text_naming_the_setting() {
        let mut value = Duration::from_secs(1);
        duration(None, Some("2m".into()), "upload_expiry", "24h", &mut value).unwrap();
        assert_eq!(value, Duration::from_secs(120));
        duration(Some(Duration::from_secs(3)), Some("2m".into()), "upload_expiry", "24h", &mut value).unwrap();
        assert_eq!(value, Duration::from_secs(3));
        let err = duration(None, Some("soon".into()), "upload_expiry", "24h", &mut value).unwrap_err();
        assert_eq!(err.to_string(), r#"upload_expiry "soon" is not a duration like 24h"#);
        assert_eq!(value, Duration::from_secs(3));
    }
}

//! attache's HTTP server: every face over one store.
//!
//! `router` lists every route; each face lives in its own module and keeps
//! its handlers thin: parse at the edge, call the store, map the result.

pub mod access;
pub mod attachments;
pub mod auth;
pub mod config;
pub mod conn;
pub mod drain;
pub mod entities;
pub mod error;
pub mod events;
pub mod fork;
pub mod headers;
pub mod http;
pub mod mcp;
pub mod metrics;
pub mod multipart;
pub mod origin;
pub mod pause;
pub mod quota;
pub mod rate;
pub mod router;
pub mod rows;
pub mod rpc;
pub mod sse;
pub mod streams;
pub mod tasks;
pub mod ws;

use std::net::SocketAddr;
use std::sync::Arc;

use attache_storage::embedded::{EmbeddedConfig, EmbeddedRegistry, EmbeddedStore};
use attache_storage::postgres::PgConfig;
use attache_storage::tokens::TokenStore;
use attache_storage::{Registry, StreamStore};
use tokio_util::sync::CancellationToken;

pub use config::{ServerConfig, StoreConfig};
pub use error::ApiError;

/// What every handler can reach. One `Arc`: axum clones the state for every
/// extractor and middleware of every request, and a clone is then one atomic
/// increment instead of one per field (docs/ARCHITECTURE.md, "request path").
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// The server's shared parts, behind [`AppState`].
pub struct Shared {
    pub store: Arc<dyn StreamStore>,
    pub registry: Arc<dyn Registry>,
    pub auth: Arc<auth::Auth>,
    pub views: Arc<rows::Views>,
    /// Per-entity life locks: a server write checked against one life of an
    /// entity never lands in the next one (`access::Lives`).
    pub lives: Arc<access::Lives>,
    /// Attachment uploads in flight (their ids are taken).
    pub uploads: Arc<attachments::Reservations>,
    /// Places for multipart uploads in progress (`--max-concurrent-uploads`).
    pub upload_slots: attachments::UploadSlots,
    pub config: Arc<ServerConfig>,
    /// Cancelled at shutdown: live readers finish their responses at once.
    pub shutdown: CancellationToken,
    /// The task face's per-task write ordering.
    pub tasks: Arc<tasks::Writers>,
    pub metrics: Arc<metrics::Metrics>,
    /// Per-principal call counts for the JSON-RPC and MCP rate limit.
    pub rate_limiter: Arc<rate::RateLimiter>,
    /// Per-entity counts of signals recorded as rows (`--signal-rate-limit`).
    pub signal_limiter: Arc<rate::RateLimiter>,
    /// Host and Origin rules for browsers (`origin`).
    pub browser: Arc<origin::BrowserPolicy>,
    /// Bytes held by request bodies being collected, and their read timeout (`http::read_body`).
    pub bodies: http::BodyBudget,
    /// Bytes held by large answers not yet sent (`http::SendBudget`).
    pub answers: Arc<http::SendBudget>,
    /// SSE data events framed once for all the readers of the same bytes (`sse`).
    pub sse_events: sse::SharedEvents,
    /// Creates in flight, counted to their principal's quotas until they commit (`quota`).
    pub in_flight: Arc<quota::InFlight>,
    /// The `/ws` sockets open, all together and by principal (`ws::slots`).
    pub websockets: ws::slots::Slots,
}

/// Errors that stop the server from starting.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot open the store at {dir}")]
    Store { dir: String, source: attache_storage::StoreError },
    #[error(
        "dev auth trusts a request header and is allowed only on loopback addresses; {addr} is not: use --auth token"
    )]
    DevAuthNotLoopback { addr: SocketAddr },
    #[error("cannot listen on {addr}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("{0}")]
    Browser(String),
    #[error("invalid --redis-url {url:?}: {reason}")]
    RedisUrl { url: String, reason: String },
}

/// A running server: its address, and the handle that stops it.
pub struct Server {
    pub addr: SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    state: AppState,
}

/// How many entries the server's in-memory structures hold (tests and
/// diagnostics: what state deleted tasks leave behind).
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryCounts {
    pub registry_entities: usize,
    pub streams: usize,
    pub views: usize,
    /// What the cached views hold, estimated (bounded by `view_cache_bytes`).
    pub view_bytes: usize,
    /// Manifest rows offered to the views and not read back yet (`rows::Views::offer`).
    pub view_offers: usize,
    pub task_cells: usize,
    pub tombstones: usize,
}

impl Server {
    /// Opens the store, binds the listener and starts serving in the background.
    pub async fn start(config: ServerConfig) -> Result<Server, StartError> {
        let mut store_config = EmbeddedConfig::new(&config.data_dir);
        store_config.durable = config.durable;
        store_config.fault_plan = config.fault_plan.clone();
        if let Some(bytes) = config.store_cache_bytes {
            store_config.cache_bytes = bytes;
        }
        // Connections, open segment files and uploads' staging files share the
        // open-file limit (raised to its hard limit first).
        let fd_limit = conn::raise_fd_limit();
        let uploads_asked = config.concurrent_uploads();
        let shares = conn::fd_budget(config.max_connections, config.store_open_files, uploads_asked, fd_limit);
        let (max_connections, open_files) = (shares.connections, shares.open_files);
        if shares.uploads < uploads_asked {
            tracing::warn!(
                uploads = shares.uploads,
                asked = uploads_asked,
                fd_limit,
                "the open-file limit is too low for --max-concurrent-uploads: lowered it; raise `ulimit -n` to lift it"
            );
        }
        if open_files < config.store_open_files {
            tracing::warn!(
                open_files,
                asked = config.store_open_files,
                fd_limit,
                "the open-file limit is too low for --store-open-files: lowered it; raise `ulimit -n` to lift it"
            );
        }
        store_config.segment_handles = open_files;
        store_config.read_threads = config.store_read_threads.max(1);
        store_config.tail_cache_bytes = config.store_tail_cache_bytes;
        store_config.producer_cache = config.store_producer_cache;
        if let Some(min) = config.store_file_body_min {
            store_config.file_body_min = min;
        }
        let loopback = config.listen.ip().is_loopback();
        let mode = config.auth.unwrap_or(if loopback { auth::AuthMode::Dev } else { auth::AuthMode::Token });
        if mode == auth::AuthMode::Dev && !loopback {
            return Err(StartError::DevAuthNotLoopback { addr: config.listen });
        }
        let browser = origin::BrowserPolicy::new(mode, &config).map_err(StartError::Browser)?;
        let store_err = |source| StartError::Store { dir: config.store.describe(&config.data_dir), source };
        let (store, registry): (Arc<dyn StreamStore>, Arc<dyn Registry>) = match &config.store {
            StoreConfig::Embedded => {
                let store = EmbeddedStore::open(store_config).map_err(store_err)?;
                let registry = EmbeddedRegistry::open_with_faults(&config.data_dir, config.fault_plan.clone())
                    .map_err(store_err)?;
                (Arc::new(store), Arc::new(registry))
            }
            StoreConfig::Postgres { url, object_store_url } => {
                let mut pg = PgConfig::new(url.clone(), &config.data_dir);
                pg.object_store_url = object_store_url.clone();
                pg.blob_cache_bytes = config.blob_cache_bytes;
                pg.upload_buffer_bytes = config.object_store_upload_buffer_bytes;
                pg.durable = config.durable;
                let backend = attache_storage::postgres::open(pg).await.map_err(store_err)?;
                (Arc::new(backend.store), Arc::new(backend.registry))
            }
        };
        let auth = auth::Auth { mode, tokens: TokenStore::new(&config.data_dir) };
        let mut limits = conn::Limits::of(&config);
        limits.max_connections = max_connections;
        if limits.max_connections < config.max_connections {
            tracing::warn!(
                max_connections = limits.max_connections,
                asked = config.max_connections,
                fd_limit,
                "the open-file limit is too low for --max-connections: lowered it; raise `ulimit -n` to lift it"
            );
        }
        let listener =
            conn::listen(config.listen).map_err(|source| StartError::Listen { addr: config.listen, source })?;
        let addr = listener.local_addr().map_err(|source| StartError::Listen { addr: config.listen, source })?;
        let shutdown = CancellationToken::new();
        let auth = Arc::new(auth);
        let share = config.budget_share_per_principal;
        let bodies = http::BodyBudget::new(config.body_buffer_bytes, config.body_read_timeout, share, auth.clone());
        let answers = http::SendBudget::new(config.response_buffer_bytes, share);
        let websockets =
            ws::slots::Slots::new(config.websockets(limits.max_connections), config.max_websockets_per_principal);
        let state = AppState(Arc::new(Shared {
            store,
            registry,
            auth,
            views: Arc::new(rows::Views::new(
                config.view_cache_entries,
                config.view_cache_bytes,
                config.inbox_keys_per_entity,
            )),
            lives: Arc::new(access::Lives::default()),
            uploads: Arc::new(attachments::Reservations::default()),
            upload_slots: attachments::UploadSlots::new(shares.uploads, share),
            config: Arc::new(config),
            shutdown: shutdown.clone(),
            tasks: Arc::new(tasks::Writers::default()),
            metrics: Arc::new(metrics::Metrics::default()),
            rate_limiter: Arc::new(rate::RateLimiter::default()),
            signal_limiter: Arc::new(rate::RateLimiter::default()),
            browser: Arc::new(browser),
            bodies,
            answers,
            sse_events: sse::SharedEvents::default(),
            in_flight: Arc::default(),
            websockets,
        }));
        events::ensure_stream(state.store.as_ref())
            .await
            .map_err(|source| StartError::Store { dir: state.config.store.describe(&state.config.data_dir), source })?;
        if let Some(url) = state.config.redis_url.clone() {
            let client = events::check_redis_url(&url).map_err(|reason| StartError::RedisUrl { url, reason })?;
            events::start_redis_publisher(state.clone(), client);
        }
        if let Err(e) = tasks::load_tombstones(&state).await {
            // Not fatal: the next task.delete purges the excess.
            tracing::warn!(err = ?e, "could not purge the tombstones of deleted tasks past --deleted-tasks-kept");
        }
        let app = router::build(state.clone());
        let direct = router::direct(state.clone());
        // Marking interrupted uploads failed assumes no other instance has uploads
        // in flight: only the embedded store (one instance) can know that.
        if state.config.store == StoreConfig::Embedded {
            let recovering = state.clone();
            tokio::spawn(async move { attachments::recover(&recovering).await });
        }
        attachments::start_expiry(state.clone());
        let stop = shutdown.clone();
        let held = state.clone();
        let task = tokio::spawn(async move {
            let places = conn::PlaceShares::new(state.auth.clone(), state.config.budget_share_per_principal);
            conn::serve(listener, app, direct, limits, places, state.metrics.clone(), stop).await;
            state.tasks.finish_detached(state.config.shutdown_grace).await;
            state.store.close().await;
            tracing::info!("store closed");
        });
        tracing::info!(%addr, "attache serving");
        Ok(Server { addr, shutdown, task, state: held })
    }

    /// Stops accepting, releases live readers, lets in-flight requests finish, closes the store.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }

    /// Waits until the server stops (after `trigger_shutdown` or a fatal error).
    pub async fn wait(self) {
        let _ = self.task.await;
    }

    #[doc(hidden)]
    pub async fn memory_counts(&self) -> MemoryCounts {
        let s = &self.state;
        MemoryCounts {
            registry_entities: s.registry.entities(None).len(),
            streams: s.store.list_prefix("/", usize::MAX).await.len(),
            views: s.views.len(),
            view_bytes: s.views.bytes(),
            view_offers: s.views.offers_len(),
            task_cells: s.tasks.cells_len(),
            tombstones: s.tasks.tombstones_len(),
        }
    }

    pub fn trigger_shutdown(&self) {
        self.shutdown.cancel();
    }
}

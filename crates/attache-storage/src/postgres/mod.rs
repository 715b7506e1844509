//! The scale-out backend: stream metadata, bytes, producer state and the
//! registry in PostgreSQL, blob bytes in an object store (S3-compatible, or a
//! directory), and live fan-out through `LISTEN/NOTIFY`. Many instances of
//! the same binary can run over one database.
//!
//! - **Writes** go through one writer task per instance that drains its queue
//!   and applies the whole batch in one transaction (group commit: one
//!   commit, one WAL flush for many appends). Writers of different instances
//!   serialize per stream in the database: transaction-scoped advisory locks
//!   on every path a batch names (taken in one sorted order, so two batches
//!   never wait on each other in a cycle), then `SELECT ... FOR UPDATE` on
//!   the stream rows. The rules are [`crate::rules`], the same as the
//!   embedded writer's.
//! - **Reads** see committed rows only. Every instance keeps every stream's
//!   metadata in memory (as the embedded engine does) and refreshes it from
//!   `NOTIFY attache_changes` (sent by the committing transaction, so it
//!   arrives after the commit); `read` re-reads the stream's row first, so a
//!   read on one instance sees what another committed before it.
//! - All database I/O runs on a small runtime of its own; the seam's calls
//!   await their queries there (they never need the caller's runtime to
//!   drive the pool, so the store works under any), and no call blocks the
//!   caller's thread on a query.
//!
//! Why one file of this size: the shared state (`Shared`, the stream cache),
//! connecting, `LISTEN`, the expiry sweep and the `StreamStore` impl; reads,
//! writes, blobs and the registry are their own files. Connecting, listening and
//! the sweep are the next cut, after the engine work of issue 11 lands.

mod blob_cache;
mod blobs;
mod order;
mod reader;
pub mod registry;
pub mod test_cluster;
mod upload_budget;
mod writer;

pub use registry::PgRegistry;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::{Mutex, RwLock};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::error::{StoreError, StoreResult};
use crate::model::*;
use crate::rules::PreparedAppend;
use crate::StreamStore;

/// Where committed stream changes are announced; the payload is `<stream id>:<instance>`.
pub(crate) const CHANGES: &str = "attache_changes";
/// Where registry changes are announced; the payload is the entity URL.
pub(crate) const REGISTRY_CHANGES: &str = "attache_registry";
const SCHEMA: &str = include_str!("schema.sql");
/// Serializes schema creation between instances starting together.
const SCHEMA_LOCK: i64 = 0x0061_7474_6163_6865;

/// The local blob cache's bound unless configured: 1 GiB of scratch disk.
pub const DEFAULT_BLOB_CACHE_BYTES: u64 = 1 << 30;

/// The bound on blob bytes all uploads hold in memory on their way to the
/// object store unless configured: 32 MiB, four 8 MiB parts (as many as one
/// upload sends at once). 64 MiB raised the peak RSS of ten concurrent 40 MB
/// uploads by another ~30 MB and made them no faster (docs/SECURITY.md).
pub const DEFAULT_UPLOAD_BUFFER_BYTES: u64 = 32 << 20;

/// How the scale-out backend is opened.
#[derive(Debug, Clone)]
pub struct PgConfig {
    /// `postgres://user:pass@host:port/db`.
    pub url: String,
    /// `s3://bucket/prefix` (credentials and endpoint from the usual `AWS_*`
    /// variables), `file:///path`, or `memory://`; `None`: `file://{data_dir}/objects`,
    /// which only instances sharing that directory can use.
    pub object_store_url: Option<String>,
    /// Local scratch: blob staging and a cache of blobs read from the object store.
    pub data_dir: PathBuf,
    /// Most bytes the local cache of whole blobs holds (least recently used
    /// evicted first; 0 caches nothing): `blob_cache.rs`.
    pub blob_cache_bytes: u64,
    /// Most bytes of blobs all uploads hold in memory at once while they are
    /// sent to the object store (at least one 8 MiB part): `upload_budget.rs`.
    pub upload_buffer_bytes: u64,
    /// Most commands one group commit takes.
    pub max_batch: usize,
    /// Database connections per instance (the writer and the listener take one each).
    pub pool_size: u32,
    /// How often expired streams are looked for and sliding-TTL access times flushed.
    pub sweep_interval: Duration,
    /// How long an unreferenced blob survives (uploads in flight pin theirs this long).
    pub blob_grace: Duration,
    /// Acknowledge only what PostgreSQL has flushed (`synchronous_commit = on`, the
    /// default); off trades the last moments before a database crash for speed.
    pub durable: bool,
}

impl PgConfig {
    pub fn new(url: impl Into<String>, data_dir: impl Into<PathBuf>) -> PgConfig {
        PgConfig {
            url: url.into(),
            object_store_url: None,
            data_dir: data_dir.into(),
            blob_cache_bytes: DEFAULT_BLOB_CACHE_BYTES,
            upload_buffer_bytes: DEFAULT_UPLOAD_BUFFER_BYTES,
            max_batch: 1024,
            pool_size: 8,
            sweep_interval: Duration::from_secs(1),
            blob_grace: Duration::from_secs(3600),
            durable: true,
        }
    }
}

/// The database's own runtime. Seam calls await their queries on it;
/// dropping it from async code is allowed (its threads are let go, not joined).
pub(crate) struct Io {
    rt: Option<tokio::runtime::Runtime>,
}

impl Io {
    fn new() -> StoreResult<Io> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("attache-pg")
            .enable_all()
            .build()?;
        Ok(Io { rt: Some(rt) })
    }

    pub(crate) fn handle(&self) -> &tokio::runtime::Handle {
        self.rt.as_ref().expect("the runtime lives as long as Io").handle()
    }

    /// Runs `fut` on the database runtime and awaits it from the caller's.
    pub(crate) async fn run<T: Send + 'static>(
        &self,
        fut: impl Future<Output = StoreResult<T>> + Send + 'static,
    ) -> StoreResult<T> {
        self.handle().spawn(fut).await.map_err(|e| StoreError::Storage(format!("database task failed: {e}")))?
    }
}

impl Drop for Io {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// A database error as a storage error. Deadlocks and serialization failures
/// are `Contention`, so a whole batch can be retried (`StoreError::is_retryable`).
pub(crate) fn db_err(e: sqlx::Error) -> StoreError {
    let code = match &e {
        sqlx::Error::Database(d) => d.code().map(|c| c.into_owned()),
        _ => None,
    };
    match code.as_deref() {
        Some("40P01" | "40001") => return StoreError::Contention(format!("postgres: {e}")),
        // disk_full: the database's disk.
        Some("53100") => return StoreError::StorageFull(format!("postgres: {e}")),
        // Other resource limits, connection failures, an administrator's shutdown: transient.
        Some(c) if c.starts_with("53") || c.starts_with("08") || c.starts_with("57P") || c == "58030" => {
            return StoreError::Unavailable(format!("postgres: {e}"))
        }
        _ => {}
    }
    match e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::WorkerCrashed => {
            StoreError::Unavailable(format!("postgres: {e}"))
        }
        e => StoreError::Storage(format!("postgres: {e}")),
    }
}
pub(crate) use crate::now_ms;

pub(crate) fn decode_info(json: &str) -> StoreResult<StreamInfo> {
    serde_json::from_str(json).map_err(|e| StoreError::Storage(format!("corrupt stream metadata: {e}")))
}

/// One stream as this instance last saw it committed.
pub(crate) struct StreamEntry {
    /// (row version, metadata): only a newer version replaces it.
    meta: RwLock<(i64, Arc<StreamInfo>)>,
    signal: watch::Sender<u64>,
    /// Last read or write seen here, or flushed by any instance.
    pub(crate) last_access_ms: AtomicI64,
    /// What this instance last wrote to the database for the sliding TTL.
    flushed_access_ms: AtomicI64,
}

impl StreamEntry {
    fn new(version: i64, info: StreamInfo, last_access_ms: i64) -> Arc<StreamEntry> {
        Arc::new(StreamEntry {
            meta: RwLock::new((version, Arc::new(info))),
            signal: watch::channel(0).0,
            last_access_ms: AtomicI64::new(last_access_ms),
            flushed_access_ms: AtomicI64::new(last_access_ms),
        })
    }

    pub(crate) fn info(&self) -> Arc<StreamInfo> {
        self.meta.read().1.clone()
    }

    pub(crate) fn version(&self) -> i64 {
        self.meta.read().0
    }

    /// Replaces the metadata if `version` is newer, and wakes live readers.
    fn publish(&self, version: i64, info: StreamInfo) -> bool {
        {
            let mut meta = self.meta.write();
            if version <= meta.0 {
                return false;
            }
            *meta = (version, Arc::new(info));
        }
        self.wake();
        true
    }

    fn wake(&self) {
        self.signal.send_modify(|v| *v = v.wrapping_add(1));
    }

    pub(crate) fn expired(&self, info: &StreamInfo, now_ms: i64) -> bool {
        crate::rules::expired(info, self.last_access_ms.load(Ordering::Relaxed), now_ms)
    }

    pub(crate) fn touch(&self) {
        self.last_access_ms.fetch_max(now_ms(), Ordering::Relaxed);
    }
}

impl crate::rules::CommittedStream for StreamEntry {
    fn committed(&self) -> Arc<StreamInfo> {
        self.info()
    }
    fn last_access_ms(&self) -> i64 {
        self.last_access_ms.load(Ordering::Relaxed)
    }
}

#[derive(Default)]
pub(crate) struct Index {
    by_path: BTreeMap<Arc<str>, Arc<StreamEntry>>,
    pub(crate) by_id: HashMap<u64, Arc<StreamEntry>>,
    /// Streams per owner, of those in `by_id`.
    owned: crate::rules::OwnedStreams,
}

/// A committed stream row as read from the database.
pub(crate) struct StreamRow {
    pub(crate) version: i64,
    pub(crate) info: StreamInfo,
    pub(crate) last_access_ms: i64,
}

pub(crate) const STREAM_COLUMNS: &str = "id, info, version, last_access_ms";

pub(crate) fn stream_row((_id, info, version, last_access_ms): (i64, String, i64, i64)) -> StoreResult<StreamRow> {
    Ok(StreamRow { version, info: decode_info(&info)?, last_access_ms })
}

pub(crate) struct Shared {
    pub(crate) pool: PgPool,
    /// Tags this instance's notifications, which it need not re-read.
    instance: String,
    pub(crate) index: RwLock<Index>,
    pub(crate) blobs: blobs::Blobs,
    pub(crate) registry: Arc<registry::Cache>,
    /// Failing while batches fail on the database's disk or connection; a
    /// committed batch (or the sweep's probe) clears it.
    pub(crate) health: Arc<crate::health::Health>,
}

impl Shared {
    /// Applies a committed row: newer metadata replaces older, and live readers wake.
    pub(crate) fn apply(&self, row: StreamRow) -> Arc<StreamEntry> {
        let id = row.info.id;
        let existing = self.index.read().by_id.get(&id).cloned();
        let unlinked = row.info.unlinked.then(|| row.info.path.clone());
        if let Some(entry) = existing {
            entry.last_access_ms.fetch_max(row.last_access_ms, Ordering::Relaxed);
            entry.publish(row.version, row.info);
            if let Some(path) = unlinked {
                self.unname(&path, &entry);
            }
            return entry;
        }
        let mut index = self.index.write();
        if let Some(entry) = index.by_id.get(&id).cloned() {
            drop(index);
            entry.publish(row.version, row.info);
            if let Some(path) = unlinked {
                self.unname(&path, &entry);
            }
            return entry;
        }
        let path = row.info.path.clone();
        let entry = StreamEntry::new(row.version, row.info, row.last_access_ms.max(now_ms()));
        index.owned.add(&entry.info());
        if unlinked.is_some() {
            // Kept for its forks under its id only: it names no path.
            index.by_id.insert(id, entry.clone());
            return entry;
        }
        // Paths are unique among committed rows: whatever held this one is gone.
        if let Some(old) = index.by_path.insert(path, entry.clone()) {
            let old_info = old.info();
            if index.by_id.remove(&old_info.id).is_some() {
                index.owned.remove(&old_info);
            }
            old.wake();
        }
        index.by_id.insert(id, entry.clone());
        entry
    }

    /// A stream whose path was taken no longer answers for it.
    fn unname(&self, path: &str, entry: &Arc<StreamEntry>) {
        let mut index = self.index.write();
        if index.by_path.get(path).is_some_and(|e| Arc::ptr_eq(e, entry)) {
            index.by_path.remove(path);
        }
    }

    /// Forgets a stream whose row is gone (ids are never reused), waking its readers.
    pub(crate) fn forget(&self, id: u64) {
        let mut index = self.index.write();
        if let Some(entry) = index.by_id.remove(&id) {
            index.owned.remove(&entry.info());
            let path = entry.info().path.clone();
            if index.by_path.get(&path).is_some_and(|e| Arc::ptr_eq(e, &entry)) {
                index.by_path.remove(&path);
            }
            entry.wake();
        }
    }

    /// Applies rows read from `attache_streams`; answers the ids they hold.
    fn apply_rows(&self, rows: Vec<(i64, String, i64, i64)>) -> StoreResult<std::collections::HashSet<u64>> {
        let mut seen = std::collections::HashSet::with_capacity(rows.len());
        for row in rows {
            seen.insert(row.0 as u64);
            self.apply(stream_row(row)?);
        }
        Ok(seen)
    }

    /// Re-reads the given streams (after notifications).
    async fn refresh(&self, ids: Vec<u64>) -> StoreResult<()> {
        let wanted: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
        let rows: Vec<(i64, String, i64, i64)> =
            sqlx::query_as(&format!("SELECT {STREAM_COLUMNS} FROM attache_streams WHERE id = ANY($1)"))
                .bind(&wanted)
                .fetch_all(&self.pool)
                .await
                .map_err(db_err)?;
        let seen = self.apply_rows(rows)?;
        for id in ids {
            if !seen.contains(&id) {
                self.forget(id);
            }
        }
        Ok(())
    }

    /// Re-reads every stream (at start, and whenever notifications may have been missed).
    async fn refresh_all(&self) -> StoreResult<()> {
        let rows: Vec<(i64, String, i64, i64)> =
            sqlx::query_as(&format!("SELECT {STREAM_COLUMNS} FROM attache_streams"))
                .fetch_all(&self.pool)
                .await
                .map_err(db_err)?;
        let seen = self.apply_rows(rows)?;
        let cached: Vec<u64> = self.index.read().by_id.keys().copied().collect();
        for id in cached {
            if !seen.contains(&id) {
                self.forget(id);
            }
        }
        // Whatever was missed, every waiting reader looks again.
        for entry in self.index.read().by_id.values() {
            entry.wake();
        }
        Ok(())
    }

    /// The stream at `path` straight from the database (a path this instance has not heard of yet).
    async fn load_path(self: Arc<Self>, path: String) -> StoreResult<Option<Arc<StreamEntry>>> {
        let row: Option<(i64, String, i64, i64)> =
            sqlx::query_as(&format!("SELECT {STREAM_COLUMNS} FROM attache_streams WHERE path = $1"))
                .bind(&path)
                .fetch_optional(&self.pool)
                .await
                .map_err(db_err)?;
        match row {
            Some(row) => Ok(Some(self.apply(stream_row(row)?))),
            None => Ok(None),
        }
    }
}

pub(crate) enum Command {
    Create(CreateStream, oneshot::Sender<StoreResult<CreateOutcome>>),
    CreateBlob(CreateStream, BlobRef, oneshot::Sender<StoreResult<StreamInfo>>),
    /// A blob stream and an append to another stream, both or neither (`create_blob_stream_and_append`).
    CreateBlobWithRow(Box<(CreateStream, BlobRef, PreparedAppend, Option<RowGuard>)>, oneshot::Sender<BlobWithRow>),
    /// A blob stream over the blob of the stream at the given path (`link_blob_stream`).
    LinkBlob(CreateStream, String, oneshot::Sender<StoreResult<StreamInfo>>),
    Append(PreparedAppend, oneshot::Sender<StoreResult<AppendOutcome>>),
    Delete(String, oneshot::Sender<StoreResult<()>>),
    /// Deletes the stream at the path only while it has the id (`delete_id`).
    DeleteId(String, u64, oneshot::Sender<StoreResult<()>>),
    /// An append while no other of its key landed since the guard's offset,
    /// and a delete at a path while it holds the given stream, both or
    /// neither (`append_guarded`).
    AppendIf(Box<(PreparedAppend, RowGuard, Option<StreamAt>)>, oneshot::Sender<StoreResult<AppendOutcome>>),
    /// Two appends to two streams, both or neither, the first perhaps guarded
    /// (`append_in_order_with`); answers the first's outcome.
    AppendPair(Box<(PreparedAppend, PreparedAppend, Option<RowGuard>)>, oneshot::Sender<StoreResult<AppendOutcome>>),
    /// Deletes a stream found expired, if it still is (fire and forget).
    Expire(u64),
}

/// The answer of [`Command::CreateBlobWithRow`].
pub(crate) type BlobWithRow = StoreResult<Box<(StreamInfo, AppendOutcome)>>;

/// Both seams of the scale-out backend, sharing one pool and one listener.
pub struct PgBackend {
    pub store: PgStore,
    pub registry: PgRegistry,
}

/// Opens (creating the schema if needed) the scale-out backend.
pub async fn open(config: PgConfig) -> StoreResult<PgBackend> {
    let io = Arc::new(Io::new()?);
    let cfg = config.clone();
    let shared = io.run(async move { connect(cfg).await }).await?;
    let stop = CancellationToken::new();
    let (tx, rx) = mpsc::unbounded_channel();
    let mut tasks = Vec::new();
    let handle = io.handle();
    tasks.push(handle.spawn(writer::run(shared.clone(), rx, config.max_batch)));
    let (listening_tx, listening) = oneshot::channel();
    tasks.push(handle.spawn(listen(shared.clone(), stop.clone(), listening_tx)));
    tasks.push(handle.spawn(sweep(shared.clone(), tx.clone(), stop.clone(), config.sweep_interval)));
    // Serve only once changes made elsewhere are heard.
    let _ = tokio::time::timeout(Duration::from_secs(10), listening).await;
    let store = PgStore {
        shared: shared.clone(),
        io: io.clone(),
        commands: Mutex::new(Some(tx)),
        stop,
        tasks: Mutex::new(tasks),
        appends: Arc::default(),
        lines: Arc::default(),
    };
    let registry = PgRegistry::new(shared, io);
    Ok(PgBackend { store, registry })
}

async fn connect(config: PgConfig) -> StoreResult<Arc<Shared>> {
    let options: PgConnectOptions =
        config.url.parse().map_err(|e| StoreError::Invalid(format!("invalid PostgreSQL URL: {e}")))?;
    let commit = if config.durable { "on" } else { "off" };
    let pool = PgPoolOptions::new()
        .max_connections(config.pool_size.max(3))
        .acquire_timeout(Duration::from_secs(30))
        // A ping before every use would cost each group commit a round trip.
        .test_before_acquire(false)
        .connect_with(options.options([("synchronous_commit", commit)]))
        .await
        .map_err(db_err)?;
    {
        let mut tx = pool.begin().await.map_err(db_err)?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(SCHEMA_LOCK).execute(&mut *tx).await.map_err(db_err)?;
        for statement in SCHEMA.split(';').filter(|s| s.lines().any(|l| !l.trim().is_empty() && !l.starts_with("--"))) {
            sqlx::query(statement).execute(&mut *tx).await.map_err(db_err)?;
        }
        tx.commit().await.map_err(db_err)?;
    }
    let blobs = blobs::Blobs::open(&config)?;
    let registry = Arc::new(registry::Cache::default());
    let shared = Arc::new(Shared {
        pool,
        instance: format!("{:016x}", rand::random::<u64>()),
        index: RwLock::new(Index::default()),
        blobs,
        registry,
        health: Arc::default(),
    });
    shared.refresh_all().await?;
    shared.registry.load_all(&shared.pool).await?;
    tracing::info!(streams = shared.index.read().by_id.len(), "postgres store opened");
    Ok(shared)
}

/// Hears committed changes from every instance and refreshes what they touched.
async fn listen(shared: Arc<Shared>, stop: CancellationToken, listening: oneshot::Sender<()>) {
    let mut listening = Some(listening);
    loop {
        let connected = async {
            let mut listener = PgListener::connect_with(&shared.pool).await.map_err(db_err)?;
            listener.listen_all([CHANGES, REGISTRY_CHANGES]).await.map_err(db_err)?;
            // Anything committed before we listened is read now.
            shared.refresh_all().await?;
            shared.registry.load_all(&shared.pool).await?;
            Ok::<_, StoreError>(listener)
        };
        let mut listener = tokio::select! {
            _ = stop.cancelled() => return,
            l = connected => match l {
                Ok(l) => l,
                Err(err) => {
                    tracing::warn!(%err, "cannot listen for changes; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            }
        };
        if let Some(tx) = listening.take() {
            let _ = tx.send(());
        }
        loop {
            let next = tokio::select! {
                _ = stop.cancelled() => return,
                n = listener.try_recv() => n,
            };
            let first = match next {
                Ok(Some(n)) => n,
                // The connection dropped: notifications may be lost, so start over.
                Ok(None) | Err(_) => break,
            };
            if first.channel() == REGISTRY_CHANGES {
                shared.registry.pause(registry::NOTIFIED).await;
            } else {
                shared.registry.pause(registry::STREAMS_NOTIFIED).await;
            }
            let mut streams = Vec::new();
            let mut entities = std::collections::HashSet::new();
            for n in std::iter::once(first).chain(std::iter::from_fn(|| listener.next_buffered())) {
                if n.channel() == REGISTRY_CHANGES {
                    // Heard before it is read again: a read of it in flight must not install what it found.
                    shared.registry.heard(n.payload());
                    entities.insert(n.payload().to_owned());
                    continue;
                }
                let Some((id, instance)) = n.payload().split_once(':') else { continue };
                if instance != shared.instance {
                    if let Ok(id) = id.parse::<u64>() {
                        streams.push(id);
                    }
                }
            }
            // Grants and entities first: a live reader woken by the streams
            // checks its permission again, against what this batch changed
            // (a revoke committed before an append is applied before the
            // append wakes anyone).
            for url in entities {
                if let Err(err) = shared.registry.refresh(&shared.pool, &url).await {
                    tracing::warn!(%err, "cannot refresh an entity after a notification");
                }
            }
            if !streams.is_empty() {
                if let Err(err) = shared.refresh(streams).await {
                    tracing::warn!(%err, "cannot refresh streams after a notification");
                }
            }
        }
        tracing::warn!("lost the change listener; reconnecting");
    }
}

/// Expires streams, shares sliding-TTL access times, collects unreferenced blobs.
async fn sweep(
    shared: Arc<Shared>,
    commands: mpsc::UnboundedSender<Command>,
    stop: CancellationToken,
    interval: Duration,
) {
    let mut ticks = 0u64;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        ticks += 1;
        if shared.health.is_failing() {
            // The probe of a failing database: a transaction that takes an id commits a WAL record.
            match sqlx::query("SELECT txid_current()").execute(&shared.pool).await {
                Ok(_) => shared.health.recovered(crate::health::Source::Db),
                Err(e) => shared.health.fail(crate::health::Source::Db, &db_err(e)),
            }
        }
        let now = now_ms();
        let mut expired = Vec::new();
        let mut accessed: (Vec<i64>, Vec<i64>) = (Vec::new(), Vec::new());
        for (id, entry) in shared.index.read().by_id.iter() {
            let info = entry.info();
            if info.soft_deleted {
                continue;
            }
            if entry.expired(&info, now) {
                expired.push(*id);
            } else if info.ttl_secs.is_some() {
                let last = entry.last_access_ms.load(Ordering::Relaxed);
                if entry.flushed_access_ms.swap(last, Ordering::Relaxed) < last {
                    accessed.0.push(*id as i64);
                    accessed.1.push(last);
                }
            }
        }
        for id in expired {
            let _ = commands.send(Command::Expire(id));
        }
        if !accessed.0.is_empty() {
            let flushed = sqlx::query(
                "UPDATE attache_streams s SET last_access_ms = GREATEST(s.last_access_ms, u.at) \
                 FROM UNNEST($1::int8[], $2::int8[]) AS u(id, at) WHERE s.id = u.id",
            )
            .bind(&accessed.0)
            .bind(&accessed.1)
            .execute(&shared.pool)
            .await;
            if let Err(err) = flushed {
                tracing::warn!(%err, "cannot share stream access times");
            }
        }
        if ticks.is_multiple_of(30) {
            if let Err(err) = shared.blobs.collect_garbage(&shared.pool).await {
                tracing::warn!(%err, "blob collection failed");
            }
        }
    }
}

/// The scale-out stream store. Cheap to share behind an `Arc`.
pub struct PgStore {
    shared: Arc<Shared>,
    io: Arc<Io>,
    commands: Mutex<Option<mpsc::UnboundedSender<Command>>>,
    stop: CancellationToken,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    appends: Arc<crate::AppendCounter>,
    /// The per-stream FIFO of `append_in_order` (`order.rs`).
    lines: Arc<order::Lines>,
}

impl PgStore {
    fn send(&self, cmd: Command) -> StoreResult<()> {
        let guard = self.commands.lock();
        let tx = guard.as_ref().ok_or(StoreError::ShuttingDown)?;
        tx.send(cmd).map_err(|_| StoreError::ShuttingDown)
    }

    async fn call<T>(&self, make: impl FnOnce(oneshot::Sender<StoreResult<T>>) -> Command) -> StoreResult<T> {
        let (tx, rx) = oneshot::channel();
        self.send(make(tx))?;
        rx.await.map_err(|_| StoreError::ShuttingDown)?
    }

    /// The stream at `path`, from memory or (if this instance has not heard
    /// of it yet) from the database; expired streams are reported missing.
    async fn entry(&self, path: &str) -> StoreResult<Arc<StreamEntry>> {
        let entry = self.lookup(path).await?;
        self.live(entry)
    }

    /// The entry `path` names, from memory or the database, unchecked.
    async fn lookup(&self, path: &str) -> StoreResult<Arc<StreamEntry>> {
        let cached = self.shared.index.read().by_path.get(path).cloned();
        match cached {
            Some(entry) => Ok(entry),
            None => {
                let shared = self.shared.clone();
                let path = path.to_owned();
                self.io.run(shared.load_path(path)).await?.ok_or(StoreError::NotFound)
            }
        }
    }

    /// The stream at `path` if this instance knows it (memory only).
    fn cached(&self, path: &str) -> StoreResult<Arc<StreamEntry>> {
        let entry = self.shared.index.read().by_path.get(path).cloned().ok_or(StoreError::NotFound)?;
        self.live(entry)
    }

    /// `entry` unless it is soft-deleted (410) or expired (missing, its deletion queued).
    fn live(&self, entry: Arc<StreamEntry>) -> StoreResult<Arc<StreamEntry>> {
        let entry = self.named_entry(entry)?;
        if entry.info().soft_deleted {
            return Err(StoreError::Gone);
        }
        Ok(entry)
    }

    /// `entry` if its path still names it (even deleted but kept for its forks)
    /// and it has not expired (missing, its deletion queued).
    fn named_entry(&self, entry: Arc<StreamEntry>) -> StoreResult<Arc<StreamEntry>> {
        named_entry(entry, |cmd| {
            let _ = self.send(cmd);
        })
    }

    /// This instance's id in notifications (for tests and logs).
    pub fn instance(&self) -> &str {
        &self.shared.instance
    }

    /// The most bytes of blobs uploads have held in memory at once on their
    /// way to the object store since the store opened (for tests; never
    /// above [`PgConfig::upload_buffer_bytes`]).
    pub fn upload_buffer_high_water(&self) -> u64 {
        self.shared.blobs.upload_buffer_high_water()
    }
}

/// `entry` if its path still names it and it has not expired (then its deletion goes to `send`).
fn named_entry(entry: Arc<StreamEntry>, send: impl FnOnce(Command)) -> StoreResult<Arc<StreamEntry>> {
    let info = entry.info();
    if info.unlinked {
        return Err(StoreError::NotFound);
    }
    if !info.soft_deleted && entry.expired(&info, now_ms()) {
        send(Command::Expire(info.id));
        return Err(StoreError::NotFound);
    }
    Ok(entry)
}

/// `entry` unless it is soft-deleted, unlinked or expired.
fn live_entry(entry: Arc<StreamEntry>, send: impl FnOnce(Command)) -> StoreResult<Arc<StreamEntry>> {
    let entry = named_entry(entry, send)?;
    if entry.info().soft_deleted {
        return Err(StoreError::Gone);
    }
    Ok(entry)
}

/// An append handed to the writer: its streams, and where its answer comes.
type Sent = (Vec<Arc<StreamEntry>>, oneshot::Receiver<StoreResult<AppendOutcome>>);

/// Prepares `reqs` (one append, or the two of `append_in_order_with`, the
/// first under `guard`) against their streams and puts them in the writer's
/// channel as one command.
fn send_appends(
    commands: &mpsc::UnboundedSender<Command>,
    entries: Vec<StoreResult<Arc<StreamEntry>>>,
    reqs: Vec<AppendRequest>,
    guard: Option<RowGuard>,
) -> StoreResult<Sent> {
    let entries = entries.into_iter().collect::<StoreResult<Vec<_>>>()?;
    let mut prepared = Vec::with_capacity(reqs.len());
    for (req, entry) in reqs.into_iter().zip(&entries) {
        prepared.push(PreparedAppend::prepare(req, &entry.info())?);
    }
    let (tx, rx) = oneshot::channel();
    let cmd = match <[PreparedAppend; 2]>::try_from(prepared) {
        Ok([first, second]) => Command::AppendPair(Box::new((first, second, guard)), tx),
        Err(mut one) => Command::Append(one.pop().ok_or(StoreError::Invalid("nothing to append".into()))?, tx),
    };
    commands.send(cmd).map_err(|_| StoreError::ShuttingDown)?;
    Ok((entries, rx))
}

/// The answer to a sent append, once the writer has it.
async fn answer(sent: StoreResult<Sent>, appends: Arc<crate::AppendCounter>) -> StoreResult<AppendOutcome> {
    let (entries, rx) = sent?;
    let outcome = rx.await.unwrap_or(Err(StoreError::ShuttingDown));
    for entry in entries {
        entry.touch();
        appends.record(&outcome);
    }
    outcome
}

impl PgStore {
    /// `append_in_order` of one append, or of the two of
    /// `append_in_order_with` as one command. When every stream is known
    /// here and none has a line, the command goes into the writer's channel
    /// now; otherwise it takes a turn in each stream's line (`order.rs`),
    /// all taken at once under the lines' lock, so no two calls wait on each
    /// other in a circle.
    fn in_order(&self, reqs: Vec<AppendRequest>, guard: Option<RowGuard>) -> crate::InOrderAppend {
        let Some(commands) = self.commands.lock().clone() else {
            return Box::pin(futures::future::ready(Err(StoreError::ShuttingDown)));
        };
        let appends = self.appends.clone();
        let mut lines = self.lines.lock();
        if reqs.iter().all(|r| !lines.has_line(&r.path)) {
            let known: Option<Vec<_>> = {
                let index = self.shared.index.read();
                reqs.iter().map(|r| index.by_path.get(r.path.as_str()).cloned()).collect()
            };
            if let Some(known) = known {
                let entries = known.into_iter().map(|e| live_entry(e, |cmd| drop(commands.send(cmd)))).collect();
                let sent = send_appends(&commands, entries, reqs, guard);
                drop(lines);
                return Box::pin(answer(sent, appends));
            }
        }
        let mut turns: Vec<_> = reqs.iter().map(|r| lines.take_turn(&r.path)).collect();
        drop(lines);
        let shared = self.shared.clone();
        // On the database's runtime: the append goes ahead whether or not the caller polls.
        let task = self.io.handle().spawn(async move {
            let mut entries = Vec::with_capacity(reqs.len());
            for ((_, before), req) in turns.iter_mut().zip(&reqs) {
                if let Some(before) = before.take() {
                    let _ = before.await;
                }
                entries.push(match shared.clone().load_path(req.path.clone()).await {
                    Ok(Some(entry)) => live_entry(entry, |cmd| drop(commands.send(cmd))),
                    Ok(None) => Err(StoreError::NotFound),
                    Err(e) => Err(e),
                });
            }
            let sent = send_appends(&commands, entries, reqs, guard);
            drop(turns);
            answer(sent, appends).await
        });
        Box::pin(async move { task.await.map_err(|e| StoreError::Storage(format!("database task failed: {e}")))? })
    }
}

#[async_trait]
impl StreamStore for PgStore {
    async fn create(&self, req: CreateStream) -> StoreResult<CreateOutcome> {
        self.call(|tx| Command::Create(req, tx)).await
    }

    async fn append(&self, req: AppendRequest) -> StoreResult<AppendOutcome> {
        let entry = self.entry(&req.path).await?;
        let prepared = PreparedAppend::prepare(req, &entry.info())?;
        let outcome = self.call(|tx| Command::Append(prepared, tx)).await;
        entry.touch();
        self.appends.record(&outcome);
        outcome
    }

    /// A stream known here goes into the writer's channel now; one that must
    /// be looked up first takes a turn in its stream's line (`order.rs`).
    fn append_in_order(&self, req: AppendRequest) -> crate::InOrderAppend {
        self.in_order(vec![req], None)
    }

    fn append_in_order_with(
        &self,
        req: AppendRequest,
        then: AppendRequest,
        guard: Option<RowGuard>,
    ) -> crate::InOrderAppend {
        if let Err(e) = crate::rules::check_paired_appends(&req, &then) {
            return Box::pin(futures::future::ready(Err(e)));
        }
        self.in_order(vec![req, then], guard)
    }

    async fn delete(&self, path: &str) -> StoreResult<()> {
        let path = path.to_owned();
        self.call(|tx| Command::Delete(path, tx)).await
    }

    async fn delete_id(&self, path: &str, id: u64) -> StoreResult<()> {
        let path = path.to_owned();
        self.call(|tx| Command::DeleteId(path, id, tx)).await
    }

    async fn append_guarded(
        &self,
        row: AppendRequest,
        guard: RowGuard,
        bytes: Option<StreamAt>,
    ) -> StoreResult<AppendOutcome> {
        crate::rules::check_conditional_row(&row, bytes.as_ref())?;
        let entry = self.entry(&row.path).await?;
        let prepared = PreparedAppend::prepare(row, &entry.info())?;
        let outcome = self.call(|tx| Command::AppendIf(Box::new((prepared, guard, bytes)), tx)).await;
        entry.touch();
        self.appends.record(&outcome);
        outcome
    }

    async fn head(&self, path: &str) -> StoreResult<StreamInfo> {
        Ok((*self.entry(path).await?.info()).clone())
    }

    async fn head_fresh(&self, path: &str) -> StoreResult<StreamInfo> {
        let entry = self.entry(path).await?;
        let shared = self.shared.clone();
        self.io.run(reader::head_fresh(shared, entry)).await
    }

    async fn named(&self, path: &str) -> StoreResult<StreamInfo> {
        let entry = self.lookup(path).await?;
        Ok((*self.named_entry(entry)?.info()).clone())
    }

    async fn read(&self, path: &str, from: ReadFrom, max_bytes: usize) -> StoreResult<ReadBatch> {
        let entry = self.entry(path).await?;
        entry.touch();
        let shared = self.shared.clone();
        self.io.run(reader::read(shared, entry, from, max_bytes)).await
    }

    async fn subscribe(&self, path: &str) -> StoreResult<ChangeSignal> {
        Ok(self.entry(path).await?.signal.subscribe())
    }

    fn touch(&self, path: &str) {
        if let Ok(entry) = self.cached(path) {
            entry.touch();
        }
    }

    async fn list_prefix(&self, prefix: &str, limit: usize) -> Vec<StreamInfo> {
        crate::rules::list_prefix(&self.shared.index.read().by_path, prefix, limit, now_ms())
    }

    async fn create_blob_stream(&self, req: CreateStream, blob: StagedBlob) -> StoreResult<StreamInfo> {
        let blob_ref = BlobRef { sha256: blob.sha256.clone(), len: blob.len };
        let shared = self.shared.clone();
        self.io.run(async move { shared.blobs.publish(&shared.pool, blob).await }).await?;
        self.call(|tx| Command::CreateBlob(req, blob_ref, tx)).await
    }

    async fn create_blob_stream_and_append(
        &self,
        req: CreateStream,
        blob: StagedBlob,
        row: AppendRequest,
        guard: Option<RowGuard>,
    ) -> StoreResult<(StreamInfo, AppendOutcome)> {
        crate::rules::check_blob_row(&req, &row)?;
        let entry = self.entry(&row.path).await?;
        let prepared = PreparedAppend::prepare(row, &entry.info())?;
        let blob_ref = BlobRef { sha256: blob.sha256.clone(), len: blob.len };
        let shared = self.shared.clone();
        self.io.run(async move { shared.blobs.publish(&shared.pool, blob).await }).await?;
        let outcome = self
            .call(|tx| Command::CreateBlobWithRow(Box::new((req, blob_ref, prepared, guard)), tx))
            .await
            .map(|b| *b);
        entry.touch();
        if let Ok((_, appended)) = &outcome {
            self.appends.count(appended);
        }
        outcome
    }

    async fn link_blob_stream(&self, req: CreateStream, source: &str) -> StoreResult<StreamInfo> {
        // The source's row is locked by the batch, so no delete of it (on any
        // instance) drops the blob's last reference before this one is counted.
        let source = source.to_owned();
        self.call(|tx| Command::LinkBlob(req, source, tx)).await
    }

    async fn stage_blob(&self) -> StoreResult<crate::BlobWriter> {
        self.shared.blobs.stage().await
    }

    async fn read_blob(&self, sha256: &str, range: std::ops::Range<u64>) -> StoreResult<crate::BlobRead> {
        if !crate::blob::is_blob_name(sha256) {
            return Err(StoreError::NotFound);
        }
        // On the database runtime: the fetch it starts (if any) runs there too.
        let shared = self.shared.clone();
        let sha = sha256.to_owned();
        self.io.run(async move { shared.blobs.read(&sha, range).await }).await
    }

    fn appends_committed(&self) -> u64 {
        self.appends.get()
    }

    fn streams_owned_by(&self, owner: &str) -> usize {
        self.shared.index.read().owned.held(owner)
    }

    fn health(&self) -> crate::WriteHealth {
        self.shared.health.snapshot()
    }

    async fn close(&self) {
        // Dropping the sender ends the writer once its queue is drained.
        self.commands.lock().take();
        self.stop.cancel();
        let tasks = std::mem::take(&mut *self.tasks.lock());
        for task in tasks {
            let _ = task.await;
        }
        let pool = self.shared.pool.clone();
        let _ = self
            .io
            .run(async move {
                pool.close().await;
                Ok(())
            })
            .await;
    }
}

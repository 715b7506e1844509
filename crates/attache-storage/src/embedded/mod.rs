//! The embedded engine: each stream's bytes in its own segment file, exactly
//! as readers receive them (`segments.rs`), one redb file for stream
//! metadata, producer state and message boundaries (`marks.rs`), written by a
//! single writer thread that commits in groups and makes each group durable
//! through a write-ahead log (`wal.rs`); redb gets the log's changes at each
//! checkpoint. The data dir's layout is versioned (`format.rs`).
//!
//! Why this shape (numbers in docs/ARCHITECTURE.md): a sync per append would
//! cap throughput at the disk's sync rate. The writer thread takes every
//! command waiting in its queue, applies them all to its working copy,
//! syncs one log record holding the batch's changes, and only then
//! publishes the new boundaries and metadata, wakes live readers and
//! answers the callers. Many appends share one sync; nobody hears "ok" before
//! the sync; no reader sees data a crash could take away. Producer state,
//! metadata and bytes change in the same log record, so recovery
//! (the last durable redb commit plus the log's replay) restores whatever was
//! acknowledged byte for byte, and nothing else. Segment files are written
//! unsynced (their bytes ride in the log record too) and synced by each
//! checkpoint before redb's durable commit; at start they are cut back to
//! their streams' recovered tails.
//!
//! Why one file of this size: the `StreamStore` impl is the seam's one front for
//! the engine (reads, writes, blobs and the registry live in their own files);
//! it is being changed by the engine work of issue 11 and is split after it.

mod format;
mod marks;
mod producers;
mod queue;
mod reader;
mod registry;
mod segments;
mod tail;
mod wal;
mod writer;

pub use registry::EmbeddedRegistry;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::RwLock;
use redb::{Database, TableDefinition};
use tokio::sync::{oneshot, watch};

use attache_core::Offset;

use crate::error::{StoreError, StoreResult};
use crate::health::Health;
use crate::model::*;
use crate::{StreamStore, WriteHealth};

/// id → JSON-encoded [`StreamInfo`].
pub(crate) const STREAMS: TableDefinition<u64, &[u8]> = TableDefinition::new("streams");
/// (stream id, producer id) → (epoch, last seq).
pub(crate) const PRODUCERS: TableDefinition<(u64, &str), (u64, u64)> = TableDefinition::new("producers");
/// Blob sha256 → how many streams hold it.
pub(crate) const BLOB_REFS: TableDefinition<&str, u64> = TableDefinition::new("blob_refs");
/// Named counters (the next stream id).
pub(crate) const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");

/// Largest read kept for the live readers that follow it.
const RECENT_MAX: usize = 64 << 10;

/// A stream idle this long loses its kept read (the writer's sweep drops it).
const RECENT_IDLE_MS: i64 = 5_000;

/// Flag on a mark: this message ends the append that wrote it.
pub(crate) const ROW_ENDS_APPEND: u8 = 1;

/// How the embedded store is opened.
#[derive(Debug, Clone)]
pub struct EmbeddedConfig {
    pub data_dir: PathBuf,
    /// Sync every batch (its log record) before answering (the default). Off
    /// leaves the log unsynced: a crashed process loses nothing, a power loss
    /// up to a checkpoint interval; the user chooses it explicitly.
    pub durable: bool,
    /// Most commands one group commit takes.
    pub max_batch: usize,
    /// redb page cache (metadata and message boundaries only: stream bytes are in segment files).
    pub cache_bytes: usize,
    /// Most segment files kept open (least recently used closed first). The
    /// server sets it from `--store-open-files`, within its file-descriptor budget.
    pub segment_handles: usize,
    /// Most reads running at once on blocking threads (redb and segment
    /// files); further reads wait their turn on the async side. Reads served
    /// from memory or from the page cache never take one.
    pub read_threads: usize,
    /// Most bytes all streams' tail caches hold together (the newest bytes
    /// of streams with live readers, kept by the writer: `tail.rs`).
    pub tail_cache_bytes: usize,
    /// Smallest read [`StreamStore::read_sendable`] may answer with a range
    /// of a segment file instead of a copy (64 KiB); `u64::MAX`: never.
    pub file_body_min: u64,
    /// How often expired streams are looked for.
    pub sweep_interval: Duration,
    /// Most bytes the write-ahead log holds between checkpoints; 0 turns the
    /// log off (every batch is then a durable redb commit).
    pub wal_bytes: u64,
    /// How long a batch may live only in the log before a checkpoint.
    pub checkpoint_interval: Duration,
    /// Most idempotent producers whose state redb holds that memory keeps too
    /// (those changed since the last checkpoint are kept besides); the rest
    /// are read from redb when they write again (`producers.rs`).
    pub producer_cache: usize,
    /// Tests only: disk faults injected into the store's file I/O. `None`
    /// (always, outside tests) costs one branch per write or sync.
    #[doc(hidden)]
    pub fault_plan: Option<crate::FaultPlan>,
}

impl EmbeddedConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        EmbeddedConfig {
            data_dir: data_dir.into(),
            durable: true,
            max_batch: 1024,
            cache_bytes: 4 << 20,
            segment_handles: 4096,
            read_threads: 16,
            tail_cache_bytes: 16 << 20,
            file_body_min: reader::FILE_BODY_MIN,
            sweep_interval: Duration::from_secs(1),
            wal_bytes: 32 << 20,
            checkpoint_interval: Duration::from_secs(3),
            producer_cache: 20_000,
            fault_plan: None,
        }
    }
}

/// What readers share: the committed view of every stream.
pub(crate) struct StreamEntry {
    pub(crate) meta: RwLock<Arc<StreamInfo>>,
    pub(crate) signal: watch::Sender<u64>,
    pub(crate) last_access_ms: AtomicI64,
    pub(crate) removed: AtomicBool,
    /// The last small read that reached the tail: live readers woken by the
    /// same append ask for the same bytes, and are served by one read.
    pub(crate) recent: parking_lot::Mutex<Option<ReadBatch>>,
    /// The newest bytes written while live readers wait (kept by the writer).
    pub(crate) tail: parking_lot::Mutex<tail::TailCache>,
    /// Message boundaries logged since the last checkpoint, not yet in redb (`marks.rs`).
    pub(crate) pending: parking_lot::Mutex<marks::Pending>,
}

impl StreamEntry {
    fn new(info: StreamInfo, now_ms: i64) -> Arc<StreamEntry> {
        Arc::new(StreamEntry {
            meta: RwLock::new(Arc::new(info)),
            signal: watch::channel(0).0,
            last_access_ms: AtomicI64::new(now_ms),
            removed: AtomicBool::new(false),
            recent: parking_lot::Mutex::new(None),
            tail: parking_lot::Mutex::new(tail::TailCache::default()),
            pending: parking_lot::Mutex::new(marks::Pending::default()),
        })
    }

    pub(crate) fn info(&self) -> Arc<StreamInfo> {
        self.meta.read().clone()
    }

    /// Drops the read kept for live readers once the stream has been idle for
    /// `RECENT_IDLE_MS`: the readers it served have moved on.
    pub(crate) fn drop_idle_read(&self, now_ms: i64, tails: &tail::TailBudget) {
        if now_ms - self.last_access_ms.load(Ordering::Relaxed) >= RECENT_IDLE_MS {
            *self.recent.lock() = None;
            self.drop_tail(tails);
        }
    }

    /// Drops the tail cache (the stream is idle or gone) and gives its bytes back to the budget.
    pub(crate) fn drop_tail(&self, tails: &tail::TailBudget) {
        let dropped = std::mem::take(&mut *self.tail.lock());
        tails.change(-(dropped.held() as isize));
    }

    /// Keeps `batch` for the other live readers of the stream, who will ask for the same bytes.
    fn keep_for_readers(&self, from: ReadFrom, batch: &ReadBatch) {
        if matches!(from, ReadFrom::At(_))
            && !batch.is_empty()
            && batch.up_to_date()
            && batch.byte_len() <= RECENT_MAX
            && self.signal.receiver_count() > 1
        {
            *self.recent.lock() = Some(batch.clone());
        }
    }

    /// The read kept for live readers, when it is the one asked for.
    fn kept_read(&self, from: ReadFrom, info: &StreamInfo, max_bytes: usize) -> Option<ReadBatch> {
        let ReadFrom::At(at) = from else { return None };
        let recent = self.recent.lock();
        recent
            .as_ref()
            .filter(|b| {
                b.start == at && b.info.tail == info.tail && b.info.closed == info.closed && b.byte_len() <= max_bytes
            })
            .cloned()
    }

    /// A read or write resets a sliding TTL.
    pub(crate) fn touch(&self) {
        self.last_access_ms.store(now_ms(), Ordering::Relaxed);
    }

    pub(crate) fn publish(&self, info: StreamInfo) {
        *self.meta.write() = Arc::new(info);
        self.signal.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Expired streams behave as deleted from the instant they expire.
    pub(crate) fn expired(&self, info: &StreamInfo, now_ms: i64) -> bool {
        crate::rules::expired(info, self.last_access_ms.load(Ordering::Relaxed), now_ms)
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
    pub(crate) by_path: BTreeMap<Arc<str>, Arc<StreamEntry>>,
    pub(crate) by_id: crate::IdMap<Arc<StreamEntry>>,
    /// Streams per owner, of those in `by_id`.
    pub(crate) owned: crate::rules::OwnedStreams,
}

pub(crate) struct Shared {
    /// The stream database; empty while the writer reopens it after a disk
    /// error (redb refuses every operation after one until it is reopened).
    db: RwLock<Option<Arc<Database>>>,
    pub(crate) db_path: PathBuf,
    pub(crate) blobs: BlobDir,
    pub(crate) segments: segments::Segments,
    pub(crate) index: RwLock<Index>,
    pub(crate) health: Arc<Health>,
    pub(crate) faults: Option<crate::FaultPlan>,
    cache_bytes: usize,
    /// What the tail caches hold together.
    pub(crate) tails: tail::TailBudget,
    /// Moves each time a checkpoint takes boundaries out of the pending lists
    /// (redb has them): a reader that saw it move looks again (`marks.rs`).
    pub(crate) marks_gen: std::sync::atomic::AtomicU64,
    /// Entries the writer's guarded keys (`writer::RowKeys`) hold after its
    /// last batch: keys and floors together (tests and diagnostics).
    pub(crate) row_keys_held: std::sync::atomic::AtomicUsize,
    /// Producers whose state the writer holds in memory, as of its last batch or checkpoint.
    pub(crate) producers_held: std::sync::atomic::AtomicUsize,
}

/// The writer's sweep: the kept reads of idle streams go, so they cost
/// memory only while live readers use them.
pub(crate) fn drop_idle_reads(shared: &Shared) {
    let now = now_ms();
    for entry in shared.index.read().by_id.values() {
        entry.drop_idle_read(now, &shared.tails);
    }
}

impl Shared {
    /// The open stream database, or why there is none right now.
    pub(crate) fn db(&self) -> StoreResult<Arc<Database>> {
        self.db
            .read()
            .clone()
            .ok_or_else(|| StoreError::Unavailable("the store is reopening after a disk error".into()))
    }

    /// Opens `streams.redb` (through the fault seam when a test asked for one).
    pub(crate) fn open_db(&self) -> StoreResult<Database> {
        open_db(&self.db_path, self.cache_bytes, self.faults.as_ref())
    }

    /// Closes the database for a reopen: it is gone once no reader holds it.
    /// Readers hold it for one read, so this waits at most a moment.
    pub(crate) fn close_db(&self) -> StoreResult<()> {
        let mut slot = self.db.write();
        let Some(db) = slot.take() else { return Ok(()) };
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        let mut db = db;
        loop {
            match Arc::try_unwrap(db) {
                Ok(db) => {
                    // redb's close tries a last commit; after a disk error it fails, and says so.
                    drop(db);
                    return Ok(());
                }
                Err(shared) if std::time::Instant::now() < deadline => {
                    db = shared;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(shared) => {
                    *slot = Some(shared);
                    return Err(StoreError::Unavailable("readers still hold the database; reopening later".into()));
                }
            }
        }
    }

    pub(crate) fn install_db(&self, db: Database) {
        *self.db.write() = Some(Arc::new(db));
    }
}

fn open_db(path: &Path, cache_bytes: usize, faults: Option<&crate::FaultPlan>) -> StoreResult<Database> {
    let mut builder = Database::builder();
    builder.set_cache_size(cache_bytes);
    let Some(plan) = faults else {
        return Ok(builder.create(path)?);
    };
    let backend =
        crate::fault::FaultyBackend::open(path, plan, (crate::FaultPoint::DbWrite, crate::FaultPoint::DbSync))?;
    Ok(builder.create_with_backend(backend)?)
}

pub(crate) use crate::now_ms;

/// Where blob files live: `blobs/ab/abcdef…` by SHA-256, `blobs/tmp/` while staging.
pub(crate) struct BlobDir {
    root: PathBuf,
}

impl BlobDir {
    pub(crate) fn path(&self, sha256: &str) -> PathBuf {
        let fan = sha256.get(0..2).unwrap_or("xx");
        self.root.join(fan).join(sha256)
    }
    fn tmp(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// Moves a staged blob to its content address (durably), unless identical
    /// bytes are already there; either way the staging file is gone afterwards.
    /// Says whether the file is new at its address.
    pub(crate) fn adopt(&self, staged: &StagedBlob) -> StoreResult<bool> {
        let target = self.path(&staged.sha256);
        if target.exists() {
            std::fs::remove_file(&staged.path)?;
            return Ok(false);
        }
        let dir = target.parent().ok_or_else(|| StoreError::Storage("blob path has no parent".into()))?;
        std::fs::create_dir_all(dir)?;
        std::fs::rename(&staged.path, &target)?;
        std::fs::File::open(dir)?.sync_all()?;
        Ok(true)
    }

    /// Startup: staging files belong to uploads that never finished, and blob
    /// files no stream holds are leftovers of a crash; both go.
    fn collect_garbage(&self, referenced: &std::collections::HashSet<String>) -> StoreResult<usize> {
        let mut removed = 0;
        let _ = std::fs::remove_dir_all(self.tmp());
        std::fs::create_dir_all(self.tmp())?;
        for fan in std::fs::read_dir(&self.root)? {
            let fan = fan?;
            if fan.file_name() == "tmp" || !fan.file_type()?.is_dir() {
                continue;
            }
            for file in std::fs::read_dir(fan.path())? {
                let file = file?;
                if !referenced.contains(file.file_name().to_string_lossy().as_ref()) {
                    std::fs::remove_file(file.path())?;
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }
}

pub(crate) enum Command {
    Create(CreateStream, oneshot::Sender<StoreResult<CreateOutcome>>),
    CreateBlob(CreateStream, StagedBlob, oneshot::Sender<StoreResult<StreamInfo>>),
    /// A blob stream and an append to another stream, both or neither (`create_blob_stream_and_append`).
    CreateBlobWithRow(
        Box<(CreateStream, StagedBlob, writer::PreparedAppend, Option<RowGuard>)>,
        oneshot::Sender<BlobWithRow>,
    ),
    /// A blob stream over the blob of the stream at the given path (`link_blob_stream`).
    LinkBlob(CreateStream, String, oneshot::Sender<StoreResult<StreamInfo>>),
    Append(writer::PreparedAppend, oneshot::Sender<StoreResult<AppendOutcome>>),
    Delete(String, oneshot::Sender<StoreResult<()>>),
    /// Deletes the stream at the path only while it has the id (`delete_id`).
    DeleteId(String, u64, oneshot::Sender<StoreResult<()>>),
    /// An append while no other of its key landed since the guard's offset,
    /// and a delete at a path while it holds the given stream, both or
    /// neither (`append_guarded`).
    AppendIf(Box<(writer::PreparedAppend, RowGuard, Option<StreamAt>)>, oneshot::Sender<StoreResult<AppendOutcome>>),
    /// Two appends to two streams, both or neither, the first perhaps guarded
    /// (`append_in_order_with`); answers the first's outcome.
    AppendPair(
        Box<(writer::PreparedAppend, writer::PreparedAppend, Option<RowGuard>)>,
        oneshot::Sender<StoreResult<AppendOutcome>>,
    ),
    /// Deletes a stream found expired (fire and forget).
    Expire(u64),
}

/// Where the writer's answer to an append comes.
type AppendAnswer = oneshot::Receiver<StoreResult<AppendOutcome>>;

/// The answer to appends sent to the writer, once it has decided them. Any
/// write, even a retried one, resets its streams' sliding TTLs.
async fn answered<const N: usize>(
    sent: StoreResult<([Arc<StreamEntry>; N], AppendAnswer)>,
    appends: Arc<crate::AppendCounter>,
) -> StoreResult<AppendOutcome> {
    let (entries, rx) = sent?;
    let outcome = rx.await.unwrap_or(Err(StoreError::ShuttingDown));
    for entry in entries {
        entry.touch();
        appends.record(&outcome);
    }
    outcome
}

/// The answer of [`Command::CreateBlobWithRow`].
pub(crate) type BlobWithRow = StoreResult<Box<(StreamInfo, AppendOutcome)>>;

/// Damage found at start: the file, where in it, and what was done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    pub file: PathBuf,
    pub offset: u64,
    pub what: String,
}

/// The embedded store. Cheap to share behind an `Arc`.
pub struct EmbeddedStore {
    shared: Arc<Shared>,
    commands: Arc<queue::CommandQueue<Command>>,
    writer: parking_lot::Mutex<Option<std::thread::JoinHandle<()>>>,
    appends: Arc<crate::AppendCounter>,
    damage: Vec<Damage>,
    /// Read permits: the one `spawn_blocking` boundary of the read path is
    /// crossed by at most `read_threads` reads at once.
    reads: Arc<tokio::sync::Semaphore>,
    /// One per file body alive ([`crate::FILE_BODIES_MAX`]).
    file_bodies: Arc<tokio::sync::Semaphore>,
    file_body_min: u64,
}

impl EmbeddedStore {
    /// Opens (creating if needed) the store in `config.data_dir`, recovering
    /// everything that committed before the last stop or crash.
    pub fn open(config: EmbeddedConfig) -> StoreResult<EmbeddedStore> {
        std::fs::create_dir_all(&config.data_dir)?;
        let dir = Path::new(&config.data_dir);
        let segments =
            segments::Segments::open(dir.join("segments"), config.segment_handles, config.fault_plan.clone())?;
        format::prepare(dir, config.cache_bytes, &segments)?;
        let db_path: PathBuf = dir.join("streams.redb");
        let db = open_db(&db_path, config.cache_bytes, config.fault_plan.as_ref())?;
        writer::create_tables(&db)?;
        let wal_path = dir.join("streams.wal");
        let (mut wal, replayed, torn) = writer::recover(&db, &segments, &wal_path, &config)?;
        let mut damage = Vec::new();
        for (file, offset) in torn {
            let what = "a damaged log record (cut short, or its checksum fails): recovered every record before it; \
                        its batch was never acknowledged"
                .to_owned();
            tracing::warn!(file = %file.display(), offset, "{what}");
            damage.push(Damage { file, offset, what });
        }
        let mut state = writer::WriterState::load(&db)?;
        for short in writer::reconcile_segments(&db, &segments, &mut wal, &mut state)? {
            let info = &state.streams[&short.id];
            let what = format!(
                "segment file of {} ends at offset {}: the stream is cut back from position {} to {}, the last whole \
                 {} before the damage",
                info.path,
                short.file_len,
                short.old_tail,
                short.new_tail,
                if info.is_json() { "message" } else { "byte" }
            );
            tracing::error!(file = %segments.path(short.id).display(), offset = short.file_len, "{what}");
            damage.push(Damage { file: segments.path(short.id), offset: short.file_len, what });
        }
        let journal = writer::Journal::new(wal, &config, replayed);
        let blobs = BlobDir { root: Path::new(&config.data_dir).join("blobs") };
        std::fs::create_dir_all(&blobs.root)?;
        let removed = blobs.collect_garbage(&state.blob_refs.keys().cloned().collect())?;
        if removed > 0 {
            tracing::info!(removed, "removed blob files no stream holds (left by a crash)");
        }
        let now = now_ms();
        let mut index = Index::default();
        for info in state.streams.values() {
            index.owned.add(info);
            index.by_id.insert(info.id, StreamEntry::new(info.clone(), now));
        }
        for (path, id) in state.named() {
            if let Some(entry) = index.by_id.get(id) {
                index.by_path.insert(path.clone(), entry.clone());
            }
        }
        tracing::info!(streams = index.by_id.len(), path = %db_path.display(), "embedded store opened");
        let shared = Arc::new(Shared {
            db: RwLock::new(Some(Arc::new(db))),
            db_path,
            blobs,
            segments,
            index: RwLock::new(index),
            health: Arc::new(Health::default()),
            faults: config.fault_plan.clone(),
            cache_bytes: config.cache_bytes,
            tails: tail::TailBudget::new(config.tail_cache_bytes),
            marks_gen: std::sync::atomic::AtomicU64::new(0),
            row_keys_held: std::sync::atomic::AtomicUsize::new(0),
            producers_held: std::sync::atomic::AtomicUsize::new(0),
        });
        let reads = Arc::new(tokio::sync::Semaphore::new(config.read_threads.max(1)));
        let file_body_min = config.file_body_min;
        let commands = Arc::new(queue::CommandQueue::new());
        let (thread_shared, taken) = (shared.clone(), commands.clone());
        let writer = std::thread::Builder::new()
            .name("attache-writer".into())
            .spawn(move || writer::run(thread_shared, state, taken, config, journal))?;
        Ok(EmbeddedStore {
            shared,
            commands,
            writer: parking_lot::Mutex::new(Some(writer)),
            appends: Arc::default(),
            damage,
            reads,
            file_bodies: Arc::new(tokio::sync::Semaphore::new(crate::FILE_BODIES_MAX)),
            file_body_min,
        })
    }

    /// Damage the last start found (and recovered around), for operators and tests.
    pub fn damage(&self) -> &[Damage] {
        &self.damage
    }

    /// How many guarded keys and floors the writer holds in memory, as of its
    /// last committed batch (tests and diagnostics).
    #[doc(hidden)]
    pub fn guarded_keys_held(&self) -> usize {
        self.shared.row_keys_held.load(Ordering::Acquire)
    }

    /// How many idempotent producers' state the writer holds in memory, as of
    /// its last batch or checkpoint (tests and diagnostics).
    #[doc(hidden)]
    pub fn producers_held(&self) -> usize {
        self.shared.producers_held.load(Ordering::Acquire)
    }

    fn send(&self, cmd: Command) -> StoreResult<()> {
        self.commands.push(cmd).map_err(|_| StoreError::ShuttingDown)
    }

    async fn call<T>(&self, make: impl FnOnce(oneshot::Sender<StoreResult<T>>) -> Command) -> StoreResult<T> {
        let (tx, rx) = oneshot::channel();
        self.send(make(tx))?;
        rx.await.map_err(|_| StoreError::ShuttingDown)?
    }

    /// The committed entry at `path`, or why there is none. Expired streams
    /// are reported missing at once and their deletion is queued.
    pub(crate) fn entry(&self, path: &str) -> StoreResult<Arc<StreamEntry>> {
        let entry = self.named_entry(path)?;
        if entry.info().soft_deleted {
            return Err(StoreError::Gone);
        }
        Ok(entry)
    }

    /// The committed entry `path` names, even one deleted but kept for its forks.
    fn named_entry(&self, path: &str) -> StoreResult<Arc<StreamEntry>> {
        let entry = self.shared.index.read().by_path.get(path).cloned().ok_or(StoreError::NotFound)?;
        let info = entry.info();
        if info.unlinked {
            return Err(StoreError::NotFound);
        }
        // The clock is read only for a stream that can expire (most have neither a TTL nor an expiry).
        let can_expire = info.expires_at_ms.is_some() || info.ttl_secs.is_some();
        if can_expire && !info.soft_deleted && entry.expired(&info, now_ms()) {
            let _ = self.send(Command::Expire(info.id));
            return Err(StoreError::NotFound);
        }
        Ok(entry)
    }

    /// A read of `entry` (found and touched by the caller).
    async fn read_entry(&self, entry: Arc<StreamEntry>, from: ReadFrom, max_bytes: usize) -> StoreResult<ReadBatch> {
        let info = entry.info();
        // From memory where it can: nothing past the tail, or the read kept for live readers.
        let start = crate::rules::read_start(from, info.tail)?;
        if start >= info.tail && info.blob.is_none() {
            return Ok(ReadBatch::from_pieces((*info).clone(), Offset(start), Offset(start), info.is_json(), &[]));
        }
        if let Some(hit) = entry.kept_read(from, &info, max_bytes) {
            return Ok(hit);
        }
        // Bytes just written while live readers wait, or page-cached bytes that need no index: on
        // this worker, at memory speed (neither waits for the disk).
        let hit = entry.tail.lock().read(&info, start, max_bytes);
        if let Some(batch) = hit.or_else(|| reader::read_cached(&self.shared, &info, start, max_bytes)) {
            entry.keep_for_readers(from, &batch);
            return Ok(batch);
        }
        // The rest reads redb and segment files: on a blocking thread, never on an async worker.
        let _permit = self.reads.acquire().await.map_err(|_| StoreError::ShuttingDown)?;
        // Another live reader may have read the same bytes meanwhile.
        if let Some(hit) = entry.kept_read(from, &info, max_bytes) {
            return Ok(hit);
        }
        let shared = self.shared.clone();
        let batch = tokio::task::spawn_blocking(move || reader::read(&shared, &info, from, max_bytes))
            .await
            .map_err(|e| StoreError::Storage(format!("read task failed: {e}")))??;
        entry.keep_for_readers(from, &batch);
        Ok(batch)
    }
}

#[async_trait]
impl StreamStore for EmbeddedStore {
    async fn create(&self, req: CreateStream) -> StoreResult<CreateOutcome> {
        self.call(|tx| Command::Create(req, tx)).await
    }

    async fn append(&self, req: AppendRequest) -> StoreResult<AppendOutcome> {
        self.append_in_order(req).await
    }

    /// The writer takes commands from one queue and commits them in the
    /// order they arrive (batches in turn, each in its order), so the send,
    /// made here before returning, fixes the append's place.
    fn append_in_order(&self, req: AppendRequest) -> crate::InOrderAppend {
        let sent = (|| -> StoreResult<_> {
            let entry = self.entry(&req.path)?;
            let prepared = writer::PreparedAppend::prepare(req, &entry.info())?;
            let (tx, rx) = oneshot::channel();
            self.send(Command::Append(prepared, tx))?;
            Ok(([entry], rx))
        })();
        Box::pin(answered(sent, self.appends.clone()))
    }

    /// Both appends go to the writer in one command, sent before this returns.
    fn append_in_order_with(
        &self,
        req: AppendRequest,
        then: AppendRequest,
        guard: Option<RowGuard>,
    ) -> crate::InOrderAppend {
        let sent = (|| -> StoreResult<_> {
            crate::rules::check_paired_appends(&req, &then)?;
            let (entry, other) = (self.entry(&req.path)?, self.entry(&then.path)?);
            let first = writer::PreparedAppend::prepare(req, &entry.info())?;
            let second = writer::PreparedAppend::prepare(then, &other.info())?;
            let (tx, rx) = oneshot::channel();
            self.send(Command::AppendPair(Box::new((first, second, guard)), tx))?;
            Ok(([entry, other], rx))
        })();
        Box::pin(answered(sent, self.appends.clone()))
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
        let entry = self.entry(&row.path)?;
        let prepared = writer::PreparedAppend::prepare(row, &entry.info())?;
        let outcome = self.call(|tx| Command::AppendIf(Box::new((prepared, guard, bytes)), tx)).await;
        entry.touch();
        self.appends.record(&outcome);
        outcome
    }

    async fn head(&self, path: &str) -> StoreResult<StreamInfo> {
        Ok((*self.entry(path)?.info()).clone())
    }

    async fn named(&self, path: &str) -> StoreResult<StreamInfo> {
        Ok((*self.named_entry(path)?.info()).clone())
    }

    async fn read(&self, path: &str, from: ReadFrom, max_bytes: usize) -> StoreResult<ReadBatch> {
        let entry = self.entry(path)?;
        entry.touch();
        self.read_entry(entry, from, max_bytes).await
    }

    /// A large read of one segment file whose bytes are in the page cache
    /// is left there, for the server to send without copying it (`reader::file_body`).
    async fn read_sendable(&self, path: &str, from: ReadFrom, max_bytes: usize) -> StoreResult<SendableRead> {
        let entry = self.entry(path)?;
        entry.touch();
        let info = entry.info();
        let start = crate::rules::read_start(from, info.tail)?;
        // Past the bound on bodies alive, the read is copied.
        if let Ok(held) = self.file_bodies.clone().try_acquire_owned() {
            if let Some(range) = reader::file_body(&self.shared, &info, start, max_bytes, self.file_body_min) {
                let reader::FileRange { file, at, len, framing, next } = range;
                let body = crate::FileBody::new(file, at, len, framing, Some(self.reads.clone()), held);
                return Ok(SendableRead {
                    json: info.is_json(),
                    info: (*info).clone(),
                    start: Offset(start),
                    next: Offset(next),
                    body: ReadBody::File(body),
                });
            }
        }
        Ok(self.read_entry(entry, from, max_bytes).await?.into())
    }

    async fn subscribe(&self, path: &str) -> StoreResult<ChangeSignal> {
        Ok(self.entry(path)?.signal.subscribe())
    }

    /// The writer publishes a batch's metadata, then moves each touched
    /// stream's signal (`writer::publish`), then answers its callers.
    fn signal_covers_commits(&self) -> bool {
        true
    }

    fn touch(&self, path: &str) {
        if let Ok(entry) = self.entry(path) {
            entry.touch();
        }
    }

    async fn list_prefix(&self, prefix: &str, limit: usize) -> Vec<StreamInfo> {
        crate::rules::list_prefix(&self.shared.index.read().by_path, prefix, limit, now_ms())
    }

    async fn create_blob_stream(&self, req: CreateStream, blob: StagedBlob) -> StoreResult<StreamInfo> {
        self.call(|tx| Command::CreateBlob(req, blob, tx)).await
    }

    async fn create_blob_stream_and_append(
        &self,
        req: CreateStream,
        blob: StagedBlob,
        row: AppendRequest,
        guard: Option<RowGuard>,
    ) -> StoreResult<(StreamInfo, AppendOutcome)> {
        crate::rules::check_blob_row(&req, &row)?;
        let entry = self.entry(&row.path)?;
        let prepared = writer::PreparedAppend::prepare(row, &entry.info())?;
        let outcome =
            self.call(|tx| Command::CreateBlobWithRow(Box::new((req, blob, prepared, guard)), tx)).await.map(|b| *b);
        entry.touch();
        if let Ok((_, appended)) = &outcome {
            self.appends.count(appended);
        }
        outcome
    }

    async fn link_blob_stream(&self, req: CreateStream, source: &str) -> StoreResult<StreamInfo> {
        let source = source.to_owned();
        self.call(|tx| Command::LinkBlob(req, source, tx)).await
    }

    async fn stage_blob(&self) -> StoreResult<crate::BlobWriter> {
        let name = format!("{}-{:016x}", now_ms(), rand::random::<u64>());
        let path = self.shared.blobs.tmp().join(name);
        crate::BlobWriter::create_with(path, self.shared.faults.clone(), Some(self.shared.health.clone())).await
    }

    async fn read_blob(&self, sha256: &str, range: std::ops::Range<u64>) -> StoreResult<crate::BlobRead> {
        if !crate::blob::is_blob_name(sha256) {
            return Err(StoreError::NotFound);
        }
        // Opening and sizing the file touch the disk: behind a read permit, on a blocking thread.
        let path = self.shared.blobs.path(sha256);
        let opened = {
            let _permit = self.reads.acquire().await.map_err(|_| StoreError::ShuttingDown)?;
            tokio::task::spawn_blocking(move || {
                let file = std::fs::File::open(path)?;
                let len = file.metadata()?.len();
                Ok::<_, std::io::Error>((file, len))
            })
            .await
            .map_err(|e| StoreError::Storage(format!("read task failed: {e}")))?
        };
        let (file, len) = match opened {
            Ok(opened) => opened,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(StoreError::NotFound),
            Err(e) => return Err(e.into()),
        };
        let range = crate::blob::clamp_range(&range, len);
        let body = crate::blob::file_range(Arc::new(file), range.clone(), Some(self.reads.clone()));
        Ok(crate::BlobRead { len, range, body })
    }

    fn appends_committed(&self) -> u64 {
        self.appends.get()
    }

    fn streams_owned_by(&self, owner: &str) -> usize {
        self.shared.index.read().owned.held(owner)
    }

    fn health(&self) -> WriteHealth {
        self.shared.health.snapshot()
    }

    async fn close(&self) {
        // The writer loop ends once the closed queue is drained.
        self.commands.close();
        let handle = self.writer.lock().take();
        if let Some(handle) = handle {
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod read_cache_tests {
    use super::*;

    /// A store with one binary stream `/s` holding `b"abc"`.
    async fn store_with_stream() -> (tempfile::TempDir, EmbeddedStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(EmbeddedConfig::new(dir.path())).unwrap();
        let req = CreateStream { initial: bytes::Bytes::from_static(b"abc"), ..CreateStream::for_tests("/s", None) };
        store.create(req).await.unwrap();
        (dir, store)
    }

    fn json() -> Option<attache_core::stream::ContentType> {
        Some(attache_core::stream::ContentType::parse("application/json").unwrap())
    }

    #[tokio::test]
    async fn reads_served_from_memory_match_the_segment_file_at_every_offset_and_limit() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(EmbeddedConfig::new(dir.path())).unwrap();
        let req = CreateStream::for_tests("/j", Some("application/json"));
        store.create(req).await.unwrap();
        // A live reader: the writer keeps the newest bytes for it.
        let _live = store.subscribe("/j").await.unwrap();
        for i in 0..700 {
            // Messages of varied sizes, every third append carrying two.
            let pad = "y".repeat(i * 13 % 500);
            let body = if i % 3 == 0 {
                format!("[{{\"i\":{i},\"p\":\"{pad}\"}},{i}]")
            } else {
                format!("{{\"i\":{i},\"p\":\"{pad}\"}}")
            };
            let req = AppendRequest {
                path: "/j".into(),
                content_type: json(),
                body: bytes::Bytes::from(body),
                close: false,
                seq: None,
                producer: None,
                messages: None,
            };
            store.append(req).await.unwrap();
        }
        let entry = store.entry("/j").unwrap();
        let info = entry.info();
        let whole = reader::read(&store.shared, &info, ReadFrom::At(Offset(0)), usize::MAX).unwrap();
        let mut starts = vec![];
        let mut pos = 0u64;
        for m in whole.messages() {
            starts.push(pos);
            pos += m.len() as u64 + 1;
        }
        assert_eq!(pos, info.tail);
        let held = entry.tail.lock().held();
        assert!(held > 0 && held <= 2 * tail::TAIL_MAX, "the live reader's stream has a bounded tail cache");
        let cached: Vec<u64> =
            starts.iter().copied().filter(|&p| entry.tail.lock().read(&info, p, 1 << 20).is_some()).collect();
        assert!(cached.len() > 20 && cached[0] > 0, "the cache holds only the newest messages");
        for &at in &cached {
            for max in [0usize, 1, 100, 700, 5_000, 1 << 20] {
                let want = reader::read(&store.shared, &info, ReadFrom::At(Offset(at)), max).unwrap();
                let got = entry.tail.lock().read(&info, at, max).expect("served from the tail cache");
                assert_eq!((&got.body, got.next, got.start), (&want.body, want.next, want.start), "at {at}, max {max}");
            }
            // Inside a message: never served from memory.
            assert!(entry.tail.lock().read(&info, at + 1, 1 << 20).is_none());
        }
        // The whole stream from its start needs no index: served from the page cache, the same bytes.
        let got = reader::read_cached(&store.shared, &info, 0, 1 << 20).expect("page-cached whole-stream read");
        assert_eq!((&got.body, got.next), (&whole.body, whole.next));
        assert!(reader::read_cached(&store.shared, &info, starts[1], 1 << 20).is_none(), "needs the index");

        // Through the store, the answer is the segment file's.
        let want = reader::read(&store.shared, &info, ReadFrom::At(Offset(starts[5])), 900).unwrap();
        assert_eq!(store.read("/j", ReadFrom::At(Offset(starts[5])), 900).await.unwrap().body, want.body);
        // Deleting the stream gives its cache back to the budget.
        drop(entry);
        assert!(store.shared.tails.held() > 0);
        store.delete("/j").await.unwrap();
        assert_eq!(store.shared.tails.held(), 0);
    }

    #[tokio::test]
    async fn only_reads_up_to_the_inline_bound_are_copied_on_the_asking_worker() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(EmbeddedConfig::new(dir.path())).unwrap();
        let bytes: Vec<u8> = (0..300u32 << 10).map(|i| (i % 251) as u8).collect();
        let req = CreateStream { initial: bytes::Bytes::from(bytes.clone()), ..CreateStream::for_tests("/b", None) };
        store.create(req).await.unwrap();
        let info = store.entry("/b").unwrap().info();
        let small = reader::read_cached(&store.shared, &info, 1000, 100 << 10).expect("a hot small read");
        assert_eq!(&small.body[..], &bytes[1000..1000 + (100 << 10)]);
        assert!(
            reader::read_cached(&store.shared, &info, 0, 1 << 20).is_none(),
            "a read larger than INLINE_READ_MAX is copied on a blocking thread"
        );
        assert_eq!(&store.read("/b", ReadFrom::At(Offset(0)), 1 << 20).await.unwrap().body[..], &bytes[..]);
    }

    /// The bytes of a sendable read, however it holds them.
    async fn body_of(read: &SendableRead) -> Vec<u8> {
        use futures::StreamExt as _;
        match &read.body {
            ReadBody::Bytes(b) => b.to_vec(),
            ReadBody::File(f) => f.chunks().map(|c| c.unwrap()).collect::<Vec<_>>().await.concat(),
        }
    }

    fn is_file(read: &SendableRead) -> bool {
        matches!(read.body, ReadBody::File(_))
    }

    #[tokio::test]
    async fn large_hot_reads_of_one_file_are_left_in_it_with_the_bytes_and_positions_of_a_copied_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(EmbeddedConfig::new(dir.path())).unwrap();
        let bytes: Vec<u8> = (0..(1u32 << 20) + 5000).map(|i| (i % 251) as u8).collect();
        let req = CreateStream { initial: bytes::Bytes::from(bytes.clone()), ..CreateStream::for_tests("/b", None) };
        store.create(req).await.unwrap();
        let json = Some("application/json");
        let messages: Vec<String> = (0..40).map(|i| format!("{{\"i\":{i},\"p\":\"{}\"}}", "z".repeat(3000))).collect();
        let initial = bytes::Bytes::from(format!("[{}]", messages.join(",")));
        store.create(CreateStream { initial, ..CreateStream::for_tests("/j", json) }).await.unwrap();
        let tail = bytes.len() as u64;
        // (start, max): file bodies where at least 64 KiB of the file are asked, else copies.
        for (start, max, file) in [
            (0, 1 << 20, true),
            (12_345, 1 << 20, true),
            (tail - 70_000, 1 << 20, true),
            (tail - 1000, 1 << 20, false),
            (0, 1000, false),
            (0, usize::MAX, true),
        ] {
            let from = ReadFrom::At(Offset(start));
            let got = store.read_sendable("/b", from, max).await.unwrap();
            let want = store.read("/b", from, max).await.unwrap();
            assert_eq!(is_file(&got), file, "from {start}, max {max}");
            assert_eq!((got.start, got.next, got.json), (want.start, want.next, want.json), "from {start}");
            assert_eq!(got.body.len(), want.body.len() as u64);
            assert_eq!(body_of(&got).await, want.body.to_vec(), "from {start}, max {max}");
        }
        // JSON: the whole file from its first message is `[` + the file + `]`; any other read is copied.
        let whole = store.read_sendable("/j", ReadFrom::Start, 1 << 20).await.unwrap();
        assert!(is_file(&whole));
        let want = store.read("/j", ReadFrom::Start, 1 << 20).await.unwrap();
        assert_eq!(body_of(&whole).await, want.body.to_vec());
        assert_eq!(whole.next, want.next);
        assert_eq!(want.messages().len(), 40);
        let cut = store.read_sendable("/j", ReadFrom::Start, 100_000).await.unwrap();
        assert!(!is_file(&cut), "a read cut short needs the index");
        assert_eq!(body_of(&cut).await, store.read("/j", ReadFrom::Start, 100_000).await.unwrap().body.to_vec());

        // A fork: below its fork point the bytes are its source's, read by copying; above, its own file.
        let fork = CreateStream {
            fork: Some(ForkSpec {
                source: attache_core::StreamPath::new("/b").unwrap(),
                offset: Some(Offset(500_000)),
                sub_offset: 0,
            }),
            content_type: None,
            ..CreateStream::for_tests("/f", None)
        };
        store.create(fork).await.unwrap();
        let more: Vec<u8> = (0..300_000u32).map(|i| (i % 241) as u8).collect();
        let append = AppendRequest {
            path: "/f".into(),
            content_type: Some(attache_core::stream::ContentType::octet_stream()),
            body: bytes::Bytes::from(more.clone()),
            close: false,
            seq: None,
            producer: None,
            messages: None,
        };
        store.append(append).await.unwrap();
        let across = store.read_sendable("/f", ReadFrom::Start, 1 << 20).await.unwrap();
        assert!(!is_file(&across));
        let mut want = bytes[..500_000].to_vec();
        want.extend_from_slice(&more);
        assert_eq!(body_of(&across).await, want);
        let own = store.read_sendable("/f", ReadFrom::At(Offset(500_000 + 7)), 1 << 20).await.unwrap();
        assert!(is_file(&own));
        assert_eq!(body_of(&own).await, more[7..].to_vec());
        assert_eq!(own.next, Offset(800_000));
    }

    #[tokio::test]
    async fn file_bodies_alive_at_once_are_bounded_and_past_the_bound_reads_are_copied() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(EmbeddedConfig::new(dir.path())).unwrap();
        let bytes: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
        let req = CreateStream { initial: bytes::Bytes::from(bytes.clone()), ..CreateStream::for_tests("/b", None) };
        store.create(req).await.unwrap();
        let mut alive = Vec::new();
        for _ in 0..crate::FILE_BODIES_MAX {
            let read = store.read_sendable("/b", ReadFrom::Start, 1 << 20).await.unwrap();
            assert!(is_file(&read));
            alive.push(read);
        }
        let past = store.read_sendable("/b", ReadFrom::Start, 1 << 20).await.unwrap();
        assert!(!is_file(&past), "past the bound: copied");
        assert_eq!(body_of(&past).await, bytes);
        alive.pop();
        assert!(
            is_file(&store.read_sendable("/b", ReadFrom::Start, 1 << 20).await.unwrap()),
            "a body gone frees its place"
        );
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_read_whose_bytes_are_not_in_the_page_cache_is_copied_and_a_deleted_streams_body_still_reads() {
        use std::os::fd::AsRawFd;
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(EmbeddedConfig::new(dir.path())).unwrap();
        let bytes: Vec<u8> = (0..300_000u32).map(|i| (i % 249) as u8).collect();
        let req = CreateStream { initial: bytes::Bytes::from(bytes.clone()), ..CreateStream::for_tests("/b", None) };
        store.create(req).await.unwrap();
        let id = store.entry("/b").unwrap().info().id;
        let file = store.shared.segments.open_file(id).unwrap();
        file.sync_all().unwrap();
        let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: statfs and advice on an open file.
        assert_eq!(unsafe { libc::fstatfs(file.as_raw_fd(), &mut fs) }, 0);
        if fs.f_type != libc::TMPFS_MAGIC {
            assert_eq!(unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) }, 0);
            let cold = store.read_sendable("/b", ReadFrom::Start, 1 << 20).await.unwrap();
            assert!(
                !is_file(&cold),
                "bytes on disk only: copied on a blocking thread, never sent from an async worker"
            );
            assert_eq!(body_of(&cold).await, bytes);
        }
        let hot = store.read_sendable("/b", ReadFrom::Start, 1 << 20).await.unwrap();
        assert!(is_file(&hot), "read back in: sent from the file");
        store.delete("/b").await.unwrap();
        assert!(!store.shared.segments.path(id).exists());
        assert_eq!(body_of(&hot).await, bytes, "the open file keeps the bytes the read saw");
    }

    fn kept(store: &EmbeddedStore) -> bool {
        store.entry("/s").unwrap().recent.lock().is_some()
    }

    #[tokio::test]
    async fn a_read_is_kept_only_while_live_readers_wait_and_goes_once_idle() {
        let (_dir, store) = store_with_stream().await;
        let start = ReadFrom::At(attache_core::Offset(0));
        store.read("/s", start, 1 << 20).await.unwrap();
        assert!(!kept(&store), "no live reader: nothing kept");
        let (_a, _b) = (store.subscribe("/s").await.unwrap(), store.subscribe("/s").await.unwrap());
        store.read("/s", start, 1 << 20).await.unwrap();
        assert!(kept(&store), "kept for the live readers");
        let entry = store.entry("/s").unwrap();
        let last = entry.last_access_ms.load(Ordering::Relaxed);
        entry.drop_idle_read(last + RECENT_IDLE_MS - 1, &store.shared.tails);
        assert!(kept(&store), "kept while the stream is in use");
        entry.drop_idle_read(last + RECENT_IDLE_MS, &store.shared.tails);
        assert!(!kept(&store), "dropped once the stream is idle");
    }
}

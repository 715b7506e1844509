//! The storage seam and its backends.
//!
//! Everything above this crate talks to [`StreamStore`] (stream metadata and
//! stream bytes, one transactional seam because an idempotent producer's
//! state must commit atomically with the append it guards) and to the change
//! signals it hands out. Which engine runs underneath — the embedded one in
//! [`embedded`] by default — is invisible to the server.

pub mod blob;
pub mod embedded;
pub mod error;
pub mod fault;
pub mod file_body;
pub(crate) mod health;
pub mod model;
pub mod postgres;
pub(crate) mod records;
pub mod registry;
pub(crate) mod rules;
pub mod tokens;

use async_trait::async_trait;

pub use blob::{BlobRead, BlobWriter, BLOB_CHUNK};
pub use error::{StoreError, StoreResult};
pub use fault::{Fault, FaultPlan, FaultPoint};
pub use file_body::{FileBody, FILE_BODIES_MAX};
pub use health::{WriteFailure, WriteHealth};
pub use model::*;
pub use registry::{Ancestor, EntityRecord, EntityUpdate, GrantRecord, Holdings, NewGrant, RawJson, Registry};

/// A map keyed by stream ids, which the store assigns (never a client):
/// hashed with foldhash rather than SipHash, which the writer's per-append
/// lookups paid for (callgrind, issue 11).
pub(crate) type IdMap<V> = std::collections::HashMap<u64, V, foldhash::fast::RandomState>;
/// A set of stream ids (see [`IdMap`]).
pub(crate) type IdSet = std::collections::HashSet<u64, foldhash::fast::RandomState>;

/// Durable, append-only streams: metadata, bytes and change notification.
///
/// Every mutating call returns only after its effect is durable (unless the
/// store was opened with durability off), and readers never observe a write
/// before it is durable.
///
/// Every call that may wait on I/O is `async`, and no backend blocks the
/// caller's async worker thread on it: the embedded backend runs its blocking
/// reads (redb, segment files) behind one `spawn_blocking` boundary, bounded
/// by its read permits, and answers from memory where it can (metadata, the
/// read kept for live readers); the PostgreSQL backend awaits its queries.
/// The synchronous calls left (`touch`, `health`, `appends_committed`) only
/// look at memory.
#[async_trait]
pub trait StreamStore: Send + Sync + 'static {
    /// Creates a stream (or a fork), or confirms an identical one exists.
    async fn create(&self, req: CreateStream) -> StoreResult<CreateOutcome>;

    /// Appends to (and/or closes) a stream. Its place in the stream's order
    /// is decided when it reaches the backend's writer, at some await of the
    /// returned future: two of these in flight at once commit in either
    /// order. A caller that needs an order uses [`append_in_order`](StreamStore::append_in_order).
    async fn append(&self, req: AppendRequest) -> StoreResult<AppendOutcome>;

    /// Appends to (and/or closes) a stream, its place in the stream's commit
    /// order fixed before this returns. **The ordering contract:** of two
    /// calls of `append_in_order` on this store for the same stream, where
    /// one returned before the other was made (one task making them in
    /// sequence, or several taking turns under a lock), the first commits
    /// first: the second's bytes are never visible, and never acknowledged,
    /// before the first's outcome is decided, and when both commit the
    /// first's bytes come first in the stream. A call that fails (a refusal,
    /// a failed commit) takes only itself out: the calls after it still
    /// commit, in order.
    ///
    /// The append goes ahead whether or not the returned future is polled;
    /// the future only answers (once the append is durable, or refused), and
    /// dropping it drops the answer, not the append. No order is promised
    /// between streams, between calls made concurrently, between store
    /// instances (PostgreSQL: other processes on the same database), or
    /// against [`append`](StreamStore::append).
    fn append_in_order(&self, req: AppendRequest) -> InOrderAppend;

    /// [`append_in_order`](StreamStore::append_in_order) of `req`, and of
    /// `then` to another stream, in one commit: both or neither. Each takes
    /// its place in its own stream's order before this returns, under the
    /// same ordering contract (for that contract this call counts as one
    /// call on each stream). A refusal of either (a stream missing, closed
    /// or of another type) commits nothing, and the answer is that refusal;
    /// so is a failed commit. The answer on success is `req`'s outcome.
    /// Neither may carry producer headers, and the two must name different
    /// streams (`Invalid`).
    ///
    /// With `guard`, `req` is also conditional, as the row of
    /// [`append_guarded`](StreamStore::append_guarded) is (without its
    /// stream condition): written only while no other guarded append of
    /// `guard.key` landed on its stream at or past `guard.since`, and then
    /// recorded as the key's newest; otherwise neither is written and the
    /// answer is [`StoreError::Moved`].
    ///
    /// This is how a change and its announcement stay one fact: a task's
    /// rows on its main stream and its events on the global events stream
    /// share one durable commit, and the events exist exactly when the
    /// change does (one fdatasync per change, not two in a row).
    fn append_in_order_with(&self, req: AppendRequest, then: AppendRequest, guard: Option<RowGuard>) -> InOrderAppend;

    /// Deletes a stream; a stream with live forks is soft-deleted (410
    /// afterwards) and keeps its path until a create takes it
    /// ([`CreateStream::take_kept_path`]).
    async fn delete(&self, path: &str) -> StoreResult<()>;

    /// [`delete`](StreamStore::delete) of the stream at `path` only while it
    /// is the stream `id`, decided in the same write that deletes it: a
    /// caller that checked one stream (its owner, that it created it) never
    /// deletes another made at the same path since. `NotFound` when the
    /// path holds another stream, or none.
    async fn delete_id(&self, path: &str, id: u64) -> StoreResult<()>;

    /// The seam's compare-and-set over the rows of one key: appends `row`
    /// only while no other guarded append of the same `guard.key` landed on
    /// its stream at or past `guard.since` (the caller read the stream up to
    /// there and decided from what it read), and, with `bytes`, deletes the
    /// live stream at `bytes.path` in the same commit, only while that is the
    /// stream `bytes.id` (`None`: only while no live stream is there, and
    /// nothing is deleted). The append is recorded as the key's newest.
    ///
    /// **The contract:** both or neither, and only against the state the
    /// caller saw. When a condition no longer holds, nothing is written and
    /// the answer is [`StoreError::Moved`]: the caller reads again and
    /// decides again. Conditions are checked in the commit that writes:
    /// against every guarded append and every create or delete at
    /// `bytes.path`, from any task, or on PostgreSQL any instance on the same
    /// database (embedded: the one writer orders them; PostgreSQL: the row
    /// lock of the row's stream, which every append to it takes, and the
    /// advisory lock of `bytes.path`, which every create there takes).
    /// Appends of other keys, and unguarded appends, do not move the guard:
    /// a busy stream does not starve a guarded write (a guard on the whole
    /// tail refused a third of attachment deletes on an entity taking 800
    /// sends a second). So every write whose interleaving matters must be
    /// guarded, or change `bytes.path`. A backend may refuse more than this
    /// (never less): the embedded store forgets a key after a minute once it
    /// tracks 10,000, and then guards a write on it by the whole tail.
    ///
    /// This is what keeps a decision made from an entity's main stream (a
    /// manifest row: "no upload of this id runs", "this id is free") true
    /// when it is written: see docs/ARCHITECTURE.md (Attachment writes are
    /// conditional). `row` takes no producer headers (`Invalid`).
    async fn append_guarded(
        &self,
        row: AppendRequest,
        guard: RowGuard,
        bytes: Option<StreamAt>,
    ) -> StoreResult<AppendOutcome>;

    /// The committed metadata of a stream, without touching its TTL. A
    /// backend shared by several instances may answer what this instance
    /// last heard (another instance's commit arrives a moment later).
    async fn head(&self, path: &str) -> StoreResult<StreamInfo>;

    /// [`head`](StreamStore::head) as the store's source of truth has it now,
    /// including what other instances committed a moment ago (a query to
    /// PostgreSQL); the default is `head`, which one instance always has
    /// current. For a caller that must not act on a view older than a row it
    /// read (an attachment whose complete row records more bytes than `head`
    /// says its stream holds).
    async fn head_fresh(&self, path: &str) -> StoreResult<StreamInfo> {
        self.head(path).await
    }

    /// The stream `path` names, even one deleted but kept for its forks
    /// (`soft_deleted`): who may learn that it exists is the caller's rule.
    async fn named(&self, path: &str) -> StoreResult<StreamInfo>;

    /// Reads committed data from `from`, at most about `max_bytes`; resets a sliding TTL.
    async fn read(&self, path: &str, from: ReadFrom, max_bytes: usize) -> StoreResult<ReadBatch>;

    /// [`read`](StreamStore::read), for a response that goes out as it is:
    /// the same positions and the same body bytes, but a backend may leave a
    /// large body where it lies, as a range of a file ([`ReadBody::File`]),
    /// for the server to send without copying it (`sendfile`). The default
    /// answers [`read`](StreamStore::read)'s bytes (PostgreSQL).
    ///
    /// The embedded store names a file range when the read is at least
    /// 64 KiB of one segment file that is open and wholly in the page cache
    /// (binary; JSON when the read takes the file whole, so needs no index),
    /// and fewer than [`FILE_BODIES_MAX`] such bodies are alive; a file
    /// range is only ever of committed bytes, as a read's bytes are.
    async fn read_sendable(&self, path: &str, from: ReadFrom, max_bytes: usize) -> StoreResult<SendableRead> {
        Ok(self.read(path, from, max_bytes).await?.into())
    }

    /// A signal that changes after every committed change to the stream.
    async fn subscribe(&self, path: &str) -> StoreResult<ChangeSignal>;

    /// Whether every commit a read of a stream can see has moved the stream's
    /// [`subscribe`](StreamStore::subscribe) signal before any writer of it
    /// is answered, and nothing else (another instance) commits to it: then a
    /// reader that marked the signal seen before its last read, and finds it
    /// unmoved, knows every acknowledged write is in what it read, and may
    /// skip the read (the server's entity views do). The signal moves on a
    /// delete or unlink too; a stream with a TTL or an expiry time can still
    /// vanish without it. Embedded: yes (one writer publishes, then moves the
    /// signal, then answers). PostgreSQL: no (a read sees another instance's
    /// commit before its `NOTIFY` moves the signal here).
    fn signal_covers_commits(&self) -> bool {
        false
    }

    /// Resets a sliding TTL, as a read or write does (live reads call it when
    /// they start). Memory only: a stream this instance has not loaded yet is
    /// touched by the read that loads it.
    fn touch(&self, path: &str);

    /// Streams whose path starts with `prefix`, in path order (for listings and maintenance).
    async fn list_prefix(&self, prefix: &str, limit: usize) -> Vec<StreamInfo>;

    /// Creates a closed stream whose bytes are `blob` (moved into the blob
    /// store, or dropped if identical bytes are stored already: content addressing).
    async fn create_blob_stream(&self, req: CreateStream, blob: StagedBlob) -> StoreResult<StreamInfo>;

    /// Creates a closed stream at `req.path` over the blob of the blob-backed
    /// stream at `source`: no byte is copied, the blob gains one reference,
    /// so deleting either stream leaves the other's bytes, and the bytes go
    /// with the last stream that holds them. `req.content_type` defaults to
    /// the source's. `NotFound` when `source` is absent or expired, `Gone`
    /// when it is kept only for its forks, `Invalid` when it holds no blob,
    /// `ConfigMismatch` when a stream exists at `req.path`. (Forking a blob
    /// stream as a Durable Streams fork would read through the source's id;
    /// this gives the new stream a life of its own.)
    async fn link_blob_stream(&self, req: CreateStream, source: &str) -> StoreResult<StreamInfo>;

    /// [`create_blob_stream`](StreamStore::create_blob_stream) and an append
    /// to another stream, in one commit: both or neither (an upload's blob
    /// stream and its `complete` manifest row). A refusal of either (a stream
    /// at `req.path`: `ConfigMismatch`; `row`'s stream missing, closed or of
    /// another type) commits nothing and drops the staged blob; `row` takes
    /// no producer headers (`Invalid`) and must name another stream.
    ///
    /// With `guard`, `row` is also conditional, as the row of
    /// [`append_guarded`](StreamStore::append_guarded) is (without its
    /// stream condition): both are written only while no other guarded
    /// append of `guard.key` landed on `row`'s stream at or past
    /// `guard.since`, and the row is then recorded as the key's newest;
    /// otherwise nothing is written, the staged blob is dropped, and the
    /// answer is [`StoreError::Moved`].
    async fn create_blob_stream_and_append(
        &self,
        req: CreateStream,
        blob: StagedBlob,
        row: AppendRequest,
        guard: Option<RowGuard>,
    ) -> StoreResult<(StreamInfo, AppendOutcome)>;

    /// A new staging file for blob bytes; it disappears unless handed to `create_blob_stream`.
    async fn stage_blob(&self) -> StoreResult<BlobWriter>;

    /// Bytes `range` of the stored blob `sha256` (the hash a stream's
    /// [`BlobRef`] names), as a stream of bounded chunks ([`BlobRead`]): the
    /// range is cut at the blob's end, and one that starts at or past it (or
    /// is empty) reads nothing. Only the asked bytes are read: the embedded
    /// store reads them from the blob's file by positioned reads behind its
    /// read permits, the PostgreSQL store from its local cache when it holds
    /// the whole blob, else by a ranged GET of the object store. Memory is
    /// bounded by a few chunks per read whatever the range; a consumer that
    /// stops polling stops the reading. `NotFound` when no such blob is
    /// stored (or `sha256` is not 64 hex digits). There is no call that
    /// hands out a file: nothing above the store needs one, and the
    /// PostgreSQL store may have no local copy.
    async fn read_blob(&self, sha256: &str, range: std::ops::Range<u64>) -> StoreResult<BlobRead>;

    /// Flushes and stops the writer; later calls fail with `ShuttingDown`.
    async fn close(&self);

    /// Whether writes are failing (a full or failing disk), and since when.
    fn health(&self) -> WriteHealth {
        WriteHealth::Ok
    }

    /// How many streams `owner` created and holds, from memory: plain
    /// streams, entities' main streams and attachments, soft-deleted ones
    /// kept for their forks included (the server bounds them per principal,
    /// `--max-streams-per-principal`). It counts committed streams, so
    /// creates in flight are not in it yet.
    fn streams_owned_by(&self, owner: &str) -> usize;

    /// Appends this store committed since it opened (retries answered from
    /// producer state not counted), for `/metrics`.
    fn appends_committed(&self) -> u64;
}

/// The answer of an [`StreamStore::append_in_order`]: an append already in
/// its place, completing once it is durable (or refused).
pub type InOrderAppend = futures::future::BoxFuture<'static, StoreResult<AppendOutcome>>;

pub(crate) use attache_core::now_ms;

/// Counts committed appends; each backend holds one and feeds it every append's outcome.
#[derive(Debug, Default)]
pub struct AppendCounter(std::sync::atomic::AtomicU64);

impl AppendCounter {
    pub fn record(&self, outcome: &StoreResult<AppendOutcome>) {
        if let Ok(o) = outcome {
            self.count(o);
        }
    }

    /// Counts one committed append (not a retry answered from producer state).
    pub fn count(&self, outcome: &AppendOutcome) {
        if !outcome.duplicate {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    pub fn get(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

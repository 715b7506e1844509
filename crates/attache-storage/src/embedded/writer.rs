//! The single writer: group commit over the segment files, made durable by
//! the log; redb follows at checkpoints.
//!
//! It owns the working copy of all metadata and producer state, applies a
//! batch of commands against it (stream bytes go to their segment files at
//! once, unsynced, and every change into the log record), makes the batch
//! durable (one synced log record), and only then publishes to readers and
//! answers callers. redb gets the batch's changes from the log at the next
//! checkpoint (the checkpoint thread applies the sealed log file in one
//! durable commit); until then the working copy, the streams' pending
//! boundary lists (`marks.rs`) and the log hold them.
//!
//! Why one file of this size: the batch loop, start-up recovery, the journal and
//! the checkpoint thread share `WriterState`, `Tables` and `Journal`, and the
//! engine work of issue 11 changes them together; the split along those seams
//! (tables, recovery, checkpoint, batch) waits until that work has landed.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use crate::{IdMap, IdSet};
use attache_core::Offset;
use bytes::Bytes;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, Table, WriteTransaction};

use super::marks::{self, cut_runs, drop_runs, put_runs, MarkIndex, Runs, MARK_RUNS};
use super::producers::{self, Producers};
use tokio::sync::oneshot;

use super::segments::{DirtySet, Segments};
use super::wal::{LogDamage, LogRecords, Logs, Op};
use super::{
    now_ms, BlobWithRow, Command, EmbeddedConfig, Shared, StreamEntry, BLOB_REFS, COUNTERS, PRODUCERS, ROW_ENDS_APPEND,
    STREAMS,
};
use crate::error::{StoreError, StoreResult};
use crate::health::Source;
use crate::model::*;
use crate::rules::{self, AppendDecision, AtPath};

pub(crate) use crate::rules::PreparedAppend;

/// The writer's working copy of everything mutable.
pub(crate) struct WriterState {
    pub(crate) streams: IdMap<StreamInfo>,
    paths: HashMap<Arc<str>, u64>,
    /// Idempotent producers' state: what redb has not yet, and a bounded cache of the rest (`producers.rs`).
    pub(crate) producers: Producers,
    /// How many streams hold each blob.
    pub(crate) blob_refs: HashMap<String, u64>,
    next_id: u64,
    /// Where the newest guarded append of each key began (memory only: kept
    /// across the reload after a failed batch, empty at open, when no caller
    /// holds an offset read before).
    pub(crate) row_keys: RowKeys,
}

/// The newest guarded append of each (stream, key) (`StreamStore::append_guarded`)
/// written in the last minute, at most [`RowKeys::MAX`] of them: older keys
/// are forgotten (swept every [`RowKeys::SWEEP`]; past the bound, all of
/// them at once if half are younger), and a guard on a forgotten key of that
/// stream falls back to the whole tail (refusing more, never less: only a
/// guard read before the forgotten write, a minute or more ago, is refused
/// and reads again). A guard is read and written within a request, so a
/// minute is ample; kept until the bound instead, the keys of a busy entity
/// filled 10,000 entries over half an hour of steady uploads (~1.2 MB, the
/// largest growth of a soak's heap after its warm-up, bench/RESULTS.md). A
/// stream removed for good takes its keys and its floor with it once its
/// removal is committed ([`RowKeys::forget_streams`]), so the floors never
/// outnumber the streams that exist. Keys are held as 128-bit digests
/// ([`key_digest`]): every key costs the same, and a lookup allocates nothing.
#[derive(Default)]
pub(crate) struct RowKeys {
    last: HashMap<(u64, KeyDigest), (u64, Instant)>,
    /// Per stream, past the newest position forgotten.
    floor: IdMap<u64>,
    /// When keys older than [`RowKeys::KEEP`] were last forgotten.
    swept: Option<Instant>,
}

/// A guard key's 128-bit digest: two SipHash-1-3 hashes of it (std's
/// `RandomState`) under keys drawn at random when the process starts. Two
/// keys sharing one only make a guard on either refuse a write the other
/// made: more, never less; and a client cannot choose keys that collide
/// without knowing the hash keys, which live in this process's memory only
/// (as the digests do). A SHA-256 per lookup and per record cost ~7k
/// instructions of each task-face write on the writer thread.
type KeyDigest = [u8; 16];

fn key_digest(key: &str) -> KeyDigest {
    use std::hash::BuildHasher as _;
    static HASHERS: std::sync::LazyLock<[std::collections::hash_map::RandomState; 2]> =
        std::sync::LazyLock::new(Default::default);
    let mut digest = [0u8; 16];
    for (half, hasher) in digest.chunks_exact_mut(8).zip(HASHERS.iter()) {
        half.copy_from_slice(&hasher.hash_one(key).to_le_bytes());
    }
    digest
}

impl RowKeys {
    const MAX: usize = 10_000;
    /// How long a key is kept after its write.
    const KEEP: std::time::Duration = std::time::Duration::from_secs(60);
    /// How often keys past [`RowKeys::KEEP`] are looked for.
    const SWEEP: std::time::Duration = std::time::Duration::from_secs(10);

    /// Where the newest guarded append of `key` to `stream` began, as far as
    /// a guard read at `since` on a stream now at `tail` must know: a
    /// forgotten key counts as written at `since` unless the stream has not moved.
    fn last(&self, stream: u64, key: &str, since: u64, tail: u64) -> Option<u64> {
        match self.last.get(&(stream, key_digest(key))) {
            Some((pos, _)) => Some(*pos),
            None => self.floor.get(&stream).filter(|floor| since < **floor && tail != since).map(|_| since),
        }
    }

    fn record(&mut self, stream: u64, key: &str, pos: u64) {
        self.record_at(stream, key, pos, Instant::now());
    }

    fn record_at(&mut self, stream: u64, key: &str, pos: u64, now: Instant) {
        self.last.insert((stream, key_digest(key)), (pos, now));
        if self.swept.is_none_or(|at| now.duration_since(at) >= Self::SWEEP) {
            self.swept = Some(now);
            self.forget(|at| now.duration_since(*at) >= Self::KEEP);
        }
        if self.last.len() > Self::MAX {
            self.forget(|at| now.duration_since(*at) >= Self::KEEP);
            // Still full (10,000 keys in a minute): all go, so pruning stays rare.
            if self.last.len() > Self::MAX / 2 {
                self.forget(|_| true);
            }
        }
    }

    /// Keys and floors held.
    fn held(&self) -> usize {
        self.last.len() + self.floor.len()
    }

    /// Forgets everything about `ids`, streams whose removal is committed
    /// (ids are never reused, so nothing will ask about them again). Not
    /// before the commit: a batch that fails leaves them, and their keys, in place.
    fn forget_streams(&mut self, ids: &[u64]) {
        if ids.is_empty() {
            return;
        }
        let ids: HashSet<u64> = ids.iter().copied().collect();
        for id in &ids {
            self.floor.remove(id);
        }
        self.last.retain(|(stream, _), _| !ids.contains(stream));
    }

    /// Forgets the keys `old` says, raising their streams' floors past them.
    fn forget(&mut self, old: impl Fn(&Instant) -> bool) {
        let floor = &mut self.floor;
        self.last.retain(|(stream, _), (pos, at)| {
            let keep = !old(at);
            if !keep {
                let f = floor.entry(*stream).or_default();
                *f = (*f).max(*pos + 1);
            }
            keep
        });
        // A burst's table is not kept for the quiet minutes after it.
        if self.last.capacity() > 4 * self.last.len() + 64 {
            self.last.shrink_to(2 * self.last.len());
        }
    }
}

/// Creates the tables up front (once, at open), so readers and `load` can open them unconditionally.
pub(crate) fn create_tables(db: &Database) -> StoreResult<()> {
    let txn = db.begin_write()?;
    {
        txn.open_table(STREAMS)?;
        txn.open_table(MARK_RUNS)?;
        txn.open_table(PRODUCERS)?;
        txn.open_table(COUNTERS)?;
        txn.open_table(BLOB_REFS)?;
    }
    txn.commit()?;
    Ok(())
}

impl WriterState {
    /// This state, reloaded after a failed batch, with the guarded keys of
    /// `old`: callers may hold offsets they read before the failure.
    /// The fresh state after a reload or reopen, keeping what only memory
    /// held of `old`: the guarded keys, and the producer state (its failed
    /// batch's changes taken back by the caller).
    fn keeping(mut self, old: &mut WriterState) -> WriterState {
        self.row_keys = std::mem::take(&mut old.row_keys);
        self.producers = std::mem::take(&mut old.producers);
        self
    }

    /// The id each path names (streams kept for forks after their path was taken are not named).
    pub(crate) fn named(&self) -> impl Iterator<Item = (&Arc<str>, &u64)> {
        self.paths.iter()
    }

    /// The committed state, read (never written: this runs after a failed
    /// commit too, when the disk may refuse writes).
    pub(crate) fn load(db: &Database) -> StoreResult<WriterState> {
        let txn = db.begin_read()?;
        WriterState::from_tables(&txn.open_table(STREAMS)?, &txn.open_table(BLOB_REFS)?, &txn.open_table(COUNTERS)?)
    }

    /// The state the tables hold (a read transaction's, or a write
    /// transaction's that is never committed: `reload`).
    fn from_tables(
        streams: &impl ReadableTable<u64, &'static [u8]>,
        blob_refs: &impl ReadableTable<&'static str, u64>,
        counters: &impl ReadableTable<&'static str, u64>,
    ) -> StoreResult<WriterState> {
        let mut state = WriterState {
            streams: IdMap::default(),
            paths: HashMap::new(),
            producers: Producers::default(),
            blob_refs: HashMap::new(),
            next_id: 1,
            row_keys: RowKeys::default(),
        };
        for row in streams.iter()? {
            let (_, value) = row?;
            let info: StreamInfo = serde_json::from_slice(value.value())
                .map_err(|e| StoreError::Storage(format!("corrupt stream metadata: {e}")))?;
            // A stream kept for its forks after its path was taken is named by its id only.
            if (!info.soft_deleted || info.fork_refs > 0) && !info.unlinked {
                state.paths.insert(info.path.clone(), info.id);
            }
            state.streams.insert(info.id, info);
        }
        for row in blob_refs.iter()? {
            let (key, value) = row?;
            state.blob_refs.insert(key.value().to_owned(), value.value());
        }
        if let Some(next) = counters.get("next_stream_id")?.map(|v| v.value()) {
            state.next_id = next;
        }
        Ok(state)
    }
}

/// A batch's changes, encoded for the write-ahead log, and (when applying
/// logged records to redb: a checkpoint, a replay, or a batch committed
/// straight to redb) the tables they go to. A group commit runs without
/// tables: redb gets its changes from the log at the next checkpoint
/// (`marks.rs` says why), so every change goes through the methods below,
/// which encode it and, with tables, apply it.
pub(crate) struct Tables<'t> {
    db: Option<DbTables<'t>>,
    /// The database as committed, for producer state not in memory (a batch's; `producers.rs`).
    read_db: Option<Arc<Database>>,
    /// This transaction's changes, as log ops.
    log: Vec<u8>,
    segments: &'t Segments,
    /// A segment file refused a write (the batch fails; the database is fine).
    segment_failed: bool,
    /// The bytes this transaction writes to segment files (at its end,
    /// `flush_segments`: one write per stream), kept for the tail caches too.
    fresh: Vec<Fresh>,
    /// JSON message starts of `fresh` writes.
    fresh_marks: Vec<u64>,
    /// Without tables: the boundaries this batch logged, (stream id, packed),
    /// for the streams' pending lists once the record is durable.
    pending: Vec<(u64, u64)>,
    /// With tables: boundaries per stream, written as runs by `finish`.
    runs: std::collections::BTreeMap<u64, Vec<u64>>,
    /// With tables: the last value each key was given (`None`: removed),
    /// written once by `finish`. A checkpoint applies seconds of records in
    /// which a hot stream's metadata changed tens of thousands of times; only
    /// the last change reaches redb (every op is a blind write, so the last one decides).
    last: LastWrites,
    /// Replayed segment writes and drops touch the files (start-up, reopen),
    /// or not (a checkpoint: the writer already did).
    touch_files: bool,
}

#[derive(Default)]
struct LastWrites {
    streams: IdMap<Option<Vec<u8>>>,
    /// Tails logged by [`Op::StreamTail`] after a stream's last metadata in
    /// `streams` (or in redb): merged into it by `finish`.
    tails: IdMap<u64>,
    producers: HashMap<(u64, String), (u64, u64)>,
    counters: HashMap<String, u64>,
    blob_refs: HashMap<String, Option<u64>>,
}

struct DbTables<'t> {
    streams: Table<'t, u64, &'static [u8]>,
    mark_runs: Table<'t, (u64, u64), &'static [u8]>,
    producers: Table<'t, (u64, &'static str), (u64, u64)>,
    counters: Table<'t, &'static str, u64>,
    blob_refs: Table<'t, &'static str, u64>,
}

/// Bytes a batch writes to a stream: `log[bytes]` at position `pos` (file
/// offset `at`), with its message starts `fresh_marks[marks]` (JSON).
pub(crate) struct Fresh {
    id: u64,
    pos: u64,
    at: u64,
    bytes: std::ops::Range<usize>,
    marks: std::ops::Range<usize>,
}

impl<'t> Tables<'t> {
    /// A group commit's changes: logged only.
    pub(crate) fn batch(segments: &'t Segments) -> Tables<'t> {
        Tables {
            db: None,
            read_db: None,
            log: Vec::new(),
            segments,
            segment_failed: false,
            fresh: Vec::new(),
            fresh_marks: Vec::new(),
            pending: Vec::new(),
            runs: Default::default(),
            last: LastWrites::default(),
            touch_files: true,
        }
    }

    /// Changes applied to the tables of `txn` (and encoded, unused, for the log).
    pub(crate) fn open(txn: &'t WriteTransaction, segments: &'t Segments) -> StoreResult<Tables<'t>> {
        let mut t = Tables::batch(segments);
        t.db = Some(DbTables {
            streams: txn.open_table(STREAMS)?,
            mark_runs: txn.open_table(MARK_RUNS)?,
            producers: txn.open_table(PRODUCERS)?,
            counters: txn.open_table(COUNTERS)?,
            blob_refs: txn.open_table(BLOB_REFS)?,
        });
        Ok(t)
    }

    /// Writes what an apply gathered: each key's last value, and the
    /// boundaries as runs (one row per stream and apply).
    pub(crate) fn finish(&mut self) -> StoreResult<()> {
        let Some(db) = self.db.as_mut() else { return Ok(()) };
        let mut last = std::mem::take(&mut self.last);
        for (id, tail) in last.tails.drain() {
            let stored = match last.streams.get(&id) {
                Some(Some(meta)) => Some(meta.clone()),
                // Removed after its tail moved: nothing to merge into.
                Some(None) => continue,
                None => db.streams.get(id)?.map(|meta| meta.value().to_vec()),
            };
            let Some(stored) = stored else {
                // A tail op always follows its stream's first metadata in the
                // log; a stream with none is one a later op dropped.
                tracing::warn!(id, "the log moves the tail of a stream it holds no metadata for");
                continue;
            };
            let mut info: StreamInfo =
                serde_json::from_slice(&stored).map_err(|e| StoreError::Storage(format!("stream {id}: {e}")))?;
            info.tail = info.tail.max(tail);
            last.streams.insert(id, Some(encode(&info)?));
        }
        for (id, meta) in last.streams {
            match meta {
                Some(meta) => db.streams.insert(id, meta.as_slice()).map(drop)?,
                None => db.streams.remove(id).map(drop)?,
            }
        }
        for ((id, producer), value) in last.producers {
            db.producers.insert((id, producer.as_str()), value)?;
        }
        for (name, value) in last.counters {
            db.counters.insert(name.as_str(), value)?;
        }
        for (sha, count) in last.blob_refs {
            match count {
                Some(count) => db.blob_refs.insert(sha.as_str(), count).map(drop)?,
                None => db.blob_refs.remove(sha.as_str()).map(drop)?,
            }
        }
        for (id, marks) in std::mem::take(&mut self.runs) {
            put_runs(&mut db.mark_runs, id, &marks)?;
        }
        Ok(())
    }

    /// Adds `op` to the batch's log record. Applying to redb (a checkpoint,
    /// a replay) writes no record: encoding its ops there only grew a buffer
    /// as large as the log file being applied (a 16 MiB allocation, grown by
    /// copies, on every checkpoint under load).
    fn log_op(&mut self, op: Op<'_>) {
        if self.db.is_none() {
            op.encode(&mut self.log);
        }
    }

    fn put_stream(&mut self, id: u64, meta: &[u8]) -> StoreResult<()> {
        if self.db.is_some() {
            self.last.streams.insert(id, Some(meta.to_vec()));
            self.last.tails.remove(&id);
        }
        self.log_op(Op::StreamPut { id, meta });
        Ok(())
    }

    /// Stream `id` ends at `tail` now, its metadata otherwise unchanged.
    fn put_tail(&mut self, id: u64, tail: u64) {
        if self.db.is_some() {
            self.last.tails.insert(id, tail);
        }
        self.log_op(Op::StreamTail { id, tail });
    }

    fn remove_stream(&mut self, id: u64) -> StoreResult<()> {
        if self.db.is_some() {
            self.last.streams.insert(id, None);
            self.last.tails.remove(&id);
        }
        self.log_op(Op::StreamRemove { id });
        Ok(())
    }

    fn put_mark(&mut self, id: u64, pos: u64, flags: u8) -> StoreResult<()> {
        let packed = marks::pack(pos, flags);
        if self.db.is_some() {
            self.runs.entry(id).or_default().push(packed);
        } else {
            self.pending.push((id, packed));
        }
        self.log_op(Op::MarkPut { id, pos, flags });
        Ok(())
    }

    /// Encodes `rows` (each followed by `,` in a JSON stream) into the log
    /// record as a write at file offset `at` of stream `id`'s segment file;
    /// `flush_segments` writes them to the file from the record's own bytes
    /// (one copy). Returns where those bytes are in the record (`None`: nothing to write).
    fn write_segment(
        &mut self,
        id: u64,
        at: u64,
        rows: &[Bytes],
        json: bool,
    ) -> StoreResult<Option<std::ops::Range<usize>>> {
        let len: usize = rows.iter().map(|r| r.len() + usize::from(json)).sum();
        if len == 0 {
            return Ok(None);
        }
        let len32 = u32::try_from(len).map_err(|_| StoreError::Invalid("an append is too large".into()))?;
        let from = Op::seg_write_header(&mut self.log, id, at, len32);
        for row in rows {
            self.log.extend_from_slice(row);
            if json {
                self.log.push(b',');
            }
        }
        Ok(Some(from..self.log.len()))
    }

    /// Writes the batch's segment bytes: each stream's run of appends in one
    /// vectored write (a batch of appends to one stream costs one syscall, not one each).
    fn flush_segments(&mut self) -> StoreResult<()> {
        let mut order: Vec<usize> = (0..self.fresh.len()).collect();
        // Stable: a stream's writes keep their order (ascending, back to back).
        order.sort_by_key(|&i| self.fresh[i].id);
        let mut i = 0;
        let mut pieces: Vec<&[u8]> = Vec::new();
        while i < order.len() {
            let first = &self.fresh[order[i]];
            let mut end = first.at;
            pieces.clear();
            while let Some(f) = order.get(i).map(|&k| &self.fresh[k]) {
                if f.id != first.id || f.at != end {
                    break;
                }
                pieces.push(&self.log[f.bytes.clone()]);
                end += f.bytes.len() as u64;
                i += 1;
            }
            if let Err(err) = self.segments.write_run(first.id, first.at, &pieces) {
                self.segment_failed = true;
                return Err(err);
            }
        }
        Ok(())
    }

    /// Drops every boundary of stream `id`; its segment file goes after the commit (`Changes::dropped`).
    fn drop_stream(&mut self, id: u64) -> StoreResult<()> {
        if let Some(db) = self.db.as_mut() {
            drop_runs(&mut db.mark_runs, id)?;
            self.runs.remove(&id);
        }
        self.pending.retain(|(i, _)| *i != id);
        self.log_op(Op::StreamDrop { id });
        Ok(())
    }

    fn put_producer(&mut self, id: u64, producer: &str, epoch: u64, last_seq: u64) -> StoreResult<()> {
        if self.db.is_some() {
            self.last.producers.insert((id, producer.to_owned()), (epoch, last_seq));
        }
        self.log_op(Op::ProducerPut { id, producer, epoch, last_seq });
        Ok(())
    }

    fn clear_producers(&mut self, id: u64) -> StoreResult<()> {
        if let Some(db) = self.db.as_mut() {
            // What redb holds goes now; what this apply gathered goes with it.
            db.producers.retain_in((id, "")..(id + 1, ""), |_, _| false)?;
            self.last.producers.retain(|(i, _), _| *i != id);
        }
        self.log_op(Op::ProducersClear { id });
        Ok(())
    }

    fn put_counter(&mut self, name: &str, value: u64) -> StoreResult<()> {
        if self.db.is_some() {
            self.last.counters.insert(name.to_owned(), value);
        }
        self.log_op(Op::CounterPut { name, value });
        Ok(())
    }

    fn put_blob_ref(&mut self, sha256: &str, count: u64) -> StoreResult<()> {
        if self.db.is_some() {
            self.last.blob_refs.insert(sha256.to_owned(), Some(count));
        }
        self.log_op(Op::BlobRefPut { sha256, count });
        Ok(())
    }

    fn remove_blob_ref(&mut self, sha256: &str) -> StoreResult<()> {
        if self.db.is_some() {
            self.last.blob_refs.insert(sha256.to_owned(), None);
        }
        self.log_op(Op::BlobRefRemove { sha256 });
        Ok(())
    }

    /// Applies one logged change (segment bytes are written again at their
    /// offsets, a dropped stream's file goes at once: both idempotent; a
    /// checkpoint, whose files already hold them, skips both).
    fn apply(&mut self, op: &Op) -> StoreResult<()> {
        match *op {
            Op::StreamPut { id, meta } => self.put_stream(id, meta),
            Op::StreamRemove { id } => self.remove_stream(id),
            Op::StreamTail { id, tail } => {
                self.put_tail(id, tail);
                Ok(())
            }
            Op::SegWrite { id, at, bytes } => {
                if self.touch_files {
                    self.segments.write(id, at, bytes)?;
                }
                Ok(())
            }
            Op::MarkPut { id, pos, flags } => self.put_mark(id, pos, flags),
            Op::StreamDrop { id } => {
                self.drop_stream(id)?;
                if self.touch_files {
                    self.segments.remove(id)?;
                }
                Ok(())
            }
            Op::ChunkPut { .. } | Op::ChunksClear { .. } => {
                Err(StoreError::Storage("write-ahead log: a format-1 op in a format-2 log".into()))
            }
            Op::ProducerPut { id, producer, epoch, last_seq } => self.put_producer(id, producer, epoch, last_seq),
            Op::ProducersClear { id } => self.clear_producers(id),
            Op::CounterPut { name, value } => self.put_counter(name, value),
            Op::BlobRefPut { sha256, count } => self.put_blob_ref(sha256, count),
            Op::BlobRefRemove { sha256 } => self.remove_blob_ref(sha256),
        }
    }

    /// Applies every op of a logged record's payload.
    fn apply_record(&mut self, payload: &[u8]) -> StoreResult<()> {
        for op in Op::decode_all(payload)? {
            self.apply(&op)?;
        }
        Ok(())
    }
}

/// Applies logged records (`payloads`, in seq order) to redb in one write
/// transaction of the given durability, recording `upto` as the last record
/// it covers when asked. `touch_files`: replayed segment writes and drops
/// reach the files too (start-up, reopen), or not (a checkpoint).
pub(crate) fn apply_logged(
    db: &Database,
    segments: &Segments,
    durability: Durability,
    touch_files: bool,
    upto: Option<u64>,
    each: impl FnOnce(&mut dyn FnMut(&[u8]) -> StoreResult<()>) -> StoreResult<()>,
) -> StoreResult<()> {
    let mut txn = db.begin_write()?;
    txn.set_durability(durability).map_err(|e| StoreError::Storage(e.to_string()))?;
    if matches!(durability, Durability::Immediate) {
        // The allocator state is saved with each durable commit, so reopening after a disk error is quick.
        txn.set_quick_repair(true);
    }
    {
        let mut t = Tables::open(&txn, segments)?;
        t.touch_files = touch_files;
        each(&mut |payload| t.apply_record(payload))?;
        t.finish()?;
        if let (Some(upto), Some(db)) = (upto, t.db.as_mut()) {
            db.counters.insert(WAL_SEQ, upto)?;
        }
    }
    txn.commit()?;
    Ok(())
}

/// The redb counter naming the last log record a durable commit covers.
const WAL_SEQ: &str = "wal_seq";

/// Opens the log beside `db` and replays what it holds past the last
/// checkpoint. Returns the log, ready for new records, whether it replayed
/// anything (the writer's first tick then checkpoints it), and the damaged
/// records found (file, offset).
pub(crate) fn recover(
    db: &Database,
    segments: &Segments,
    path: &std::path::Path,
    config: &EmbeddedConfig,
) -> StoreResult<(Logs, bool, Vec<LogDamage>)> {
    let checkpointed = checkpointed_seq(db)?;
    let (wal, recovered) = Logs::open(path, config.wal_bytes, config.durable, checkpointed, config.fault_plan.clone())?;
    replay(db, segments, &recovered.records)?;
    if let Some((last, _)) = recovered.records.last() {
        tracing::info!(records = recovered.records.len(), last_seq = *last, "replayed the write-ahead log");
    }
    Ok((wal, !recovered.records.is_empty(), recovered.damage))
}

/// The last log record a durable commit covers.
pub(crate) fn checkpointed_seq(db: &Database) -> StoreResult<u64> {
    let txn = db.begin_read()?;
    let value = txn.open_table(COUNTERS)?.get(WAL_SEQ)?.map(|v| v.value());
    Ok(value.unwrap_or(0))
}

/// A stream whose segment file is shorter than its committed bytes (found at start).
pub(crate) struct ShortSegment {
    pub(crate) id: u64,
    /// Where the file ends: the first position it cannot serve.
    pub(crate) file_len: u64,
    /// Where the stream now ends: the last whole message (or byte) before the damage.
    pub(crate) new_tail: u64,
    pub(crate) old_tail: u64,
}

/// Startup, after the log's replay: every segment file is cut to its
/// stream's committed bytes (dropping bytes of batches never acknowledged),
/// files of streams that no longer exist go, and a file shorter than its
/// stream's committed bytes (damage from outside: files are synced before
/// the checkpoint that stops the log covering them) cuts the stream back to
/// the last whole message before the damage, durably, and is reported.
pub(crate) fn reconcile_segments(
    db: &Database,
    segments: &Segments,
    wal: &mut Logs,
    state: &mut WriterState,
) -> StoreResult<Vec<ShortSegment>> {
    let mut short = Vec::new();
    let live: HashSet<u64> = state.streams.keys().copied().collect();
    for id in segments.ids_on_disk()? {
        if !live.contains(&id) {
            segments.remove(id)?;
        }
    }
    let mut ids: Vec<u64> = state.streams.iter().filter(|(_, i)| i.blob.is_none()).map(|(id, _)| *id).collect();
    ids.sort_unstable();
    let txn = db.begin_read()?;
    let runs = Runs(txn.open_table(MARK_RUNS)?);
    for id in ids {
        let info = &state.streams[&id];
        let base = super::reader::base(info);
        let want = info.tail - base;
        let len = segments.len(id)?;
        if len > want {
            segments.truncate(id, want)?;
        } else if len < want {
            let end = base + len;
            let new_tail = if info.is_json() {
                // The last message that starts at or before the damage starts the lost part.
                marks::last_in(&runs, id, base, end)?.unwrap_or(base)
            } else {
                end
            };
            short.push(ShortSegment { id, file_len: len, new_tail, old_tail: info.tail });
        }
    }
    drop(runs);
    drop(txn);
    if short.is_empty() {
        return Ok(short);
    }
    // Everything replayed is made durable with the repair, so the log cannot bring the lost part back.
    segments.sync_dirty()?;
    let txn = db.begin_write()?;
    {
        let mut t = Tables::open(&txn, segments)?;
        for s in &short {
            let Some(mut info) = state.streams.get(&s.id).cloned() else { continue };
            info.tail = s.new_tail;
            if let Some(db) = t.db.as_mut() {
                cut_runs(&mut db.mark_runs, s.id, s.new_tail)?;
            }
            t.put_stream(s.id, &encode(&info)?)?;
            state.streams.insert(s.id, info);
            let base = state.streams.get(&s.id).map_or(0, super::reader::base);
            segments.truncate(s.id, s.new_tail - base)?;
        }
        t.finish()?;
        if let Some(db) = t.db.as_mut() {
            db.counters.insert(WAL_SEQ, wal.last_seq())?;
        }
    }
    txn.commit()?;
    wal.reset();
    Ok(short)
}

/// Applies logged records in one commit without a sync: they stay in the
/// log, which keeps them durable until the next checkpoint. Writing nothing
/// durable here is what lets a reopen succeed on a full disk.
fn replay(db: &Database, segments: &Segments, records: &[(u64, Vec<u8>)]) -> StoreResult<()> {
    if records.is_empty() {
        return Ok(());
    }
    apply_logged(db, segments, Durability::None, true, None, |f| records.iter().try_for_each(|(_, payload)| f(payload)))
}

/// How a batch becomes durable: by a log record (redb then commits without a
/// sync) or by a durable redb commit, the checkpoint, which also lets the log
/// start over. Without a log every commit is a checkpoint.
pub(crate) struct Journal {
    wal: Option<Logs>,
    /// The checkpoint thread (started by `run`), which syncs segment files beside the writer.
    syncer: Option<Syncer>,
    /// The seq the checkpoint in progress covers (its segment syncs are running).
    in_flight: Option<u64>,
    durable: bool,
    interval: std::time::Duration,
    last_checkpoint: Instant,
    /// The next tick checkpoints (shutdown, a replayed log, or the log failed).
    force: bool,
    /// Why the database is lost, if it is: it refused a commit (redb then
    /// refuses everything until it is reopened), and the writer reopens it
    /// before the next batch; batches meanwhile are refused with this error.
    lost: Option<StoreError>,
    /// Most producers whose state redb holds that stay in memory too (`producers.rs`).
    producer_cache: usize,
    /// The last batch's record buffer, emptied, for the next batch to encode
    /// into (grown from empty, a busy batch's record was reallocated about ten
    /// times); not kept past [`RECORD_BUFFER_KEPT`].
    spare: Vec<u8>,
}

/// Largest record buffer kept from one batch for the next.
const RECORD_BUFFER_KEPT: usize = 256 << 10;

impl Journal {
    pub(crate) fn new(wal: Logs, config: &EmbeddedConfig, replayed: bool) -> Journal {
        Journal {
            wal: (config.wal_bytes > 0).then_some(wal),
            syncer: None,
            in_flight: None,
            durable: config.durable,
            interval: config.checkpoint_interval,
            last_checkpoint: Instant::now(),
            force: replayed,
            lost: None,
            spare: Vec::new(),
            producer_cache: config.producer_cache,
        }
    }

    /// Something is logged and only the log holds it, for longer than the
    /// interval (or a checkpoint is forced, or the active log file is half full).
    fn checkpoint_due(&self) -> bool {
        self.wal.as_ref().is_some_and(|w| {
            !w.is_empty() && (self.force || self.last_checkpoint.elapsed() >= self.interval || w.half_full())
        })
    }

    /// Starts a checkpoint beside the writer: seals the active log file (or
    /// retries the sealed one) and hands the segment files written so far,
    /// and the sealed file's records, to the checkpoint thread, which syncs
    /// the files and then applies the records to redb in one durable commit.
    /// `finish_checkpoint` completes it.
    fn start_checkpoint(&mut self, shared: &Shared) -> bool {
        if self.in_flight.is_some() {
            return false;
        }
        let (Some(wal), Some(syncer)) = (self.wal.as_mut(), self.syncer.as_ref()) else {
            return false;
        };
        let Some(upto) = wal.sealed().or_else(|| wal.rotate()) else {
            return false;
        };
        let records = match wal.sealed_records() {
            Ok(Some(records)) => records,
            Ok(None) => return false,
            Err(err) => {
                tracing::warn!(%err, "checkpoint: cannot read the sealed log file back; retrying later");
                return false;
            }
        };
        let set = shared.segments.take_dirty();
        if let Err(std::sync::mpsc::SendError(job)) = syncer.jobs.send(SyncJob { upto, set, records }) {
            // The checkpoint thread is gone (it panicked): the synchronous checkpoints still work.
            tracing::error!("the checkpoint thread is gone; checkpoints run on the writer");
            shared.segments.restore(job.set);
            self.syncer = None;
            return false;
        }
        self.in_flight = Some(upto);
        self.last_checkpoint = Instant::now();
        self.force = false;
        true
    }

    /// Seals a full active log file so the batch's record goes to the other
    /// one, when that one is free (and writes are not failing).
    fn make_room(&mut self, shared: &Shared, record_len: usize) {
        if !shared.health.is_failing() && self.wal.as_ref().is_some_and(|w| !w.fits(record_len) && w.sealed().is_none())
        {
            self.start_checkpoint(shared);
        }
    }
}

/// The checkpoint thread: syncs the segment files a checkpoint covers, then
/// applies the sealed log file's records to redb in one durable commit,
/// while the writer goes on appending (the syncs are an `fdatasync` per
/// file written since the last checkpoint, and the commit writes every
/// stream's metadata and boundaries once per checkpoint instead of once per batch).
struct Syncer {
    jobs: std::sync::mpsc::Sender<SyncJob>,
    done: std::sync::mpsc::Receiver<SyncDone>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct SyncJob {
    upto: u64,
    set: DirtySet,
    records: LogRecords,
}

struct SyncDone {
    upto: u64,
    /// What failed: the segment syncs, or redb's commit.
    result: Result<(), (Source, StoreError)>,
}

impl Syncer {
    fn spawn(shared: Arc<Shared>) -> std::io::Result<Syncer> {
        let (jobs, rx) = std::sync::mpsc::channel::<SyncJob>();
        let (tx, done) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new().name("attache-checkpoint".into()).spawn(move || {
            for job in rx {
                // On error the files not synced are dirty again (`sync_set`).
                let result = shared.segments.sync_set(job.set).map_err(|e| (Source::Segment, e)).and_then(|()| {
                    let db = shared.db().map_err(|e| (Source::Db, e))?;
                    apply_logged(&db, &shared.segments, Durability::Immediate, false, Some(job.upto), |f| {
                        job.records.for_each(f)
                    })
                    .map_err(|e| (Source::Db, e))
                });
                if tx.send(SyncDone { upto: job.upto, result }).is_err() {
                    break;
                }
            }
        })?;
        Ok(Syncer { jobs, done, thread: Some(thread) })
    }

    fn stop(mut self) {
        let Syncer { jobs, thread, .. } = &mut self;
        drop(std::mem::replace(jobs, std::sync::mpsc::channel().0));
        if let Some(thread) = thread.take() {
            if thread.join().is_err() {
                tracing::error!("the checkpoint thread panicked");
            }
        }
    }
}

/// Completes the checkpoint in progress once the checkpoint thread is done
/// with it (`wait`: block until it is): the sealed log file is free, and
/// the boundaries it held leave memory (redb has them). Without `wait`,
/// returns at once while the thread still works.
fn finish_checkpoint(shared: &Shared, journal: &mut Journal, state: &mut WriterState, wait: bool) {
    let Some(syncer) = journal.syncer.as_ref() else {
        return;
    };
    if journal.in_flight.is_none() {
        return;
    }
    let done = if wait {
        syncer.done.recv().ok()
    } else {
        match syncer.done.try_recv() {
            Ok(done) => Some(done),
            Err(std::sync::mpsc::TryRecvError::Empty) => return,
            Err(std::sync::mpsc::TryRecvError::Disconnected) => None,
        }
    };
    journal.in_flight = None;
    let Some(SyncDone { upto, result }) = done else {
        tracing::error!("the checkpoint thread is gone; checkpoints run on the writer");
        journal.syncer = None;
        return;
    };
    match result {
        Ok(()) => {
            if let Some(wal) = journal.wal.as_mut() {
                wal.trim(upto);
            }
            applied(shared, upto);
            state.producers.checkpointed(upto, journal.producer_cache);
            shared.producers_held.store(state.producers.len(), Ordering::Release);
        }
        Err((Source::Segment, err)) => {
            tracing::warn!(%err, "checkpoint: a segment file cannot sync; the log still holds every acknowledged batch");
            shared.health.fail(Source::Segment, &err);
        }
        Err((_, err)) => checkpoint_failed(shared, journal, state, err),
    }
}

/// A durable redb commit now holds every record up to `upto`: their
/// boundaries leave the streams' pending lists. Readers that looked at both
/// while this ran see the generation move and look again (`marks.rs`).
fn applied(shared: &Shared, upto: u64) {
    shared.marks_gen.fetch_add(1, Ordering::AcqRel);
    for entry in shared.index.read().by_id.values() {
        entry.pending.lock().drop_upto(upto);
    }
}

/// What a batch changed, to publish after the commit.
#[derive(Default)]
struct Changes {
    touched: IdSet,
    /// Of `touched`, the streams whose metadata changed beyond their tail
    /// (the rest, appended to, log only their new tail).
    reshaped: IdSet,
    removed: Vec<(u64, Arc<str>)>,
    /// Blob files no stream holds any more, deleted after the commit.
    unlink: Vec<String>,
    /// Blob files this batch moved to their content address (removed again if it fails).
    adopted: Vec<String>,
    /// Streams deleted for good: their segment files go after the commit.
    dropped: Vec<u64>,
}

/// Why a batch failed, and what to clean up after it.
struct Failed {
    err: StoreError,
    adopted: Vec<String>,
}

impl Failed {
    /// Reports the failure to the write-health signal (before any caller hears of it).
    fn new(shared: &Shared, err: StoreError, source: Source, changes: &mut Changes) -> Failed {
        shared.health.fail(source, &err);
        Failed { err, adopted: std::mem::take(&mut changes.adopted) }
    }
}

/// Answers a command that never reached the transaction.
fn refuse(cmd: Command, err: &StoreError) {
    match cmd {
        Command::Create(_, tx) => drop(tx.send(Err(err.clone()))),
        Command::CreateBlob(_, _, tx) | Command::LinkBlob(_, _, tx) => drop(tx.send(Err(err.clone()))),
        Command::CreateBlobWithRow(_, tx) => drop(tx.send(Err(err.clone()))),
        Command::Append(_, tx) => drop(tx.send(Err(err.clone()))),
        Command::Delete(_, tx) | Command::DeleteId(_, _, tx) => drop(tx.send(Err(err.clone()))),
        Command::AppendIf(_, tx) | Command::AppendPair(_, tx) => drop(tx.send(Err(err.clone()))),
        Command::Expire(_) => {}
    }
}

enum Reply {
    Create(oneshot::Sender<StoreResult<CreateOutcome>>, StoreResult<CreateOutcome>),
    CreateBlob(oneshot::Sender<StoreResult<StreamInfo>>, StoreResult<StreamInfo>),
    CreateBlobWithRow(oneshot::Sender<BlobWithRow>, BlobWithRow),
    Append(oneshot::Sender<StoreResult<AppendOutcome>>, StoreResult<AppendOutcome>),
    Delete(oneshot::Sender<StoreResult<()>>, StoreResult<()>),
}

impl Reply {
    fn send(self) {
        // A caller that went away no longer needs its answer.
        match self {
            Reply::Create(tx, r) => drop(tx.send(r)),
            Reply::CreateBlob(tx, r) => drop(tx.send(r)),
            Reply::CreateBlobWithRow(tx, r) => drop(tx.send(r)),
            Reply::Append(tx, r) => drop(tx.send(r)),
            Reply::Delete(tx, r) => drop(tx.send(r)),
        }
    }

    fn fail(self, err: StoreError) {
        match self {
            Reply::Create(tx, _) => drop(tx.send(Err(err))),
            Reply::CreateBlob(tx, _) => drop(tx.send(Err(err))),
            Reply::CreateBlobWithRow(tx, _) => drop(tx.send(Err(err))),
            Reply::Append(tx, _) => drop(tx.send(Err(err))),
            Reply::Delete(tx, _) => drop(tx.send(Err(err))),
        }
    }
}

pub(crate) fn run(
    shared: Arc<Shared>,
    mut state: WriterState,
    commands: Arc<super::queue::CommandQueue<Command>>,
    config: EmbeddedConfig,
    mut journal: Journal,
) {
    // However the writer ends (a panic too), callers still queued hear
    // `ShuttingDown` and new ones are refused, rather than wait for ever.
    struct Abandon(Arc<super::queue::CommandQueue<Command>>);
    impl Drop for Abandon {
        fn drop(&mut self) {
            self.0.abandon();
        }
    }
    let _abandon = Abandon(commands.clone());
    let mut last_sweep = Instant::now();
    let mut last_probe = Instant::now();
    // The writer wakes at least every second: the probe of a failing disk runs on its tick.
    let probe_interval = config.checkpoint_interval.min(std::time::Duration::from_secs(1));
    let wait = config.sweep_interval.min(probe_interval);
    if journal.wal.is_some() {
        match Syncer::spawn(shared.clone()) {
            Ok(syncer) => journal.syncer = Some(syncer),
            Err(err) => tracing::error!(%err, "cannot start the checkpoint thread; checkpoints run on the writer"),
        }
    }
    loop {
        let mut batch: Vec<Command> = Vec::new();
        if !commands.take(&mut batch, config.max_batch, wait) {
            break;
        }
        if last_sweep.elapsed() >= config.sweep_interval {
            last_sweep = Instant::now();
            batch.extend(expired_streams(&shared).into_iter().map(Command::Expire));
            super::drop_idle_reads(&shared);
        }
        if journal.lost.is_some() {
            finish_checkpoint(&shared, &mut journal, &mut state, true);
            match reopen(&shared, &mut journal, &mut state) {
                Ok(fresh) => state = fresh.keeping(&mut state),
                Err(err) => tracing::warn!(%err, "the stream database cannot be reopened yet"),
            }
        }
        // A checkpoint commits on its own: what it makes durable is already in
        // the log, so when it fails no caller does. Its segment syncs run on
        // the checkpoint thread while batches go on into the other log file.
        // While writes are failing, it runs here instead, as the probe that
        // finds the disk writable again.
        finish_checkpoint(&shared, &mut journal, &mut state, false);
        let failing = shared.health.is_failing();
        let probe = failing && last_probe.elapsed() >= probe_interval;
        if (failing || journal.syncer.is_none()) && (journal.checkpoint_due() || probe) {
            last_probe = Instant::now();
            run_checkpoint(&shared, &mut journal, &mut state);
        } else if !failing && journal.checkpoint_due() {
            journal.start_checkpoint(&shared);
        }
        if let Some(err) = &journal.lost {
            shared.health.fail(Source::Db, err);
            for cmd in batch {
                refuse(cmd, err);
            }
            continue;
        }
        if batch.is_empty() {
            continue;
        }
        let count = batch.len();
        if let Err(failed) = commit_batch(&shared, &mut state, batch, &mut journal) {
            tracing::error!(err = %failed.err, count, "group commit failed; its callers hear why");
            recover_from(&shared, &mut journal, &mut state, failed);
        }
    }
    // A clean stop leaves nothing for the next start to replay.
    journal.force = true;
    if journal.checkpoint_due() && journal.lost.is_none() {
        if let Err(err) = checkpoint(&shared, &mut journal, &mut state) {
            tracing::error!(%err, "final checkpoint failed; the log will be replayed at the next start");
        }
    }
    if let Some(syncer) = journal.syncer.take() {
        syncer.stop();
    }
    tracing::debug!("writer stopped");
}

/// Makes everything logged durable in redb (one durable commit applying
/// every record no checkpoint covers yet), then lets the log start over.
fn checkpoint(shared: &Shared, journal: &mut Journal, state: &mut WriterState) -> StoreResult<()> {
    // A checkpoint in progress completes first (or hands its files back); this one covers everything.
    finish_checkpoint(shared, journal, state, true);
    // The checkpoint that just finished may have failed and lost the database
    // (its reopen failing too): its error says why, not "reopening".
    if let Some(err) = &journal.lost {
        return Err(err.clone());
    }
    // The segment files first: once redb says the log is redundant, they must hold every byte it held.
    if let Err(err) = shared.segments.sync_dirty() {
        shared.health.fail(Source::Segment, &err);
        return Err(err);
    }
    let db = shared.db()?;
    match &journal.wal {
        Some(wal) => {
            let upto = wal.last_seq();
            apply_logged(&db, &shared.segments, Durability::Immediate, false, Some(upto), |f| {
                wal.for_each_unapplied(f)
            })?;
            if let Some(wal) = journal.wal.as_mut() {
                wal.reset();
            }
            applied(shared, upto);
            state.producers.checkpointed(upto, journal.producer_cache);
            shared.producers_held.store(state.producers.len(), Ordering::Release);
        }
        // Without a log every batch commits to redb: this commit only probes the disk.
        None => {
            let durability = if journal.durable { Durability::Immediate } else { Durability::None };
            apply_logged(&db, &shared.segments, durability, false, None, |_| Ok(()))?;
        }
    }
    journal.last_checkpoint = Instant::now();
    journal.force = false;
    Ok(())
}

/// A checkpoint on the writer's tick, and the probe of a failing disk.
fn run_checkpoint(shared: &Shared, journal: &mut Journal, state: &mut WriterState) {
    finish_checkpoint(shared, journal, state, true);
    // A segment file that cannot sync leaves the database alone: the log keeps holding its bytes.
    if let Err(err) = shared.segments.sync_dirty() {
        tracing::warn!(%err, "checkpoint: a segment file cannot sync; the log still holds every acknowledged batch");
        shared.health.fail(Source::Segment, &err);
        return;
    }
    match checkpoint(shared, journal, state) {
        Ok(()) => {
            shared.health.recovered(Source::Db);
            shared.health.recovered(Source::Blob);
            shared.health.recovered(Source::Segment);
            if shared.health.source_failing(Source::Log) {
                if let Some(wal) = journal.wal.as_mut() {
                    match wal.probe() {
                        Ok(()) => shared.health.recovered(Source::Log),
                        Err(err) => shared.health.fail(Source::Log, &err),
                    }
                }
            }
        }
        Err(err) => checkpoint_failed(shared, journal, state, err),
    }
}

/// A checkpoint's durable commit failed: the log still holds every
/// acknowledged batch. After a disk error redb refuses everything until the
/// file is reopened, so it is reopened (and the log replayed) now.
fn checkpoint_failed(shared: &Shared, journal: &mut Journal, state: &mut WriterState, err: StoreError) {
    tracing::warn!(%err, "checkpoint failed; the log still holds every acknowledged batch");
    shared.health.fail(Source::Db, &err);
    if err.is_io() {
        journal.lost = Some(err);
        match reopen(shared, journal, state) {
            Ok(fresh) => *state = fresh.keeping(state),
            Err(err) => tracing::warn!(%err, "the stream database cannot be reopened yet"),
        }
    }
}

/// Closes and reopens the stream database after a disk error, then replays
/// the log records since the last checkpoint (without a sync: the log keeps
/// them durable), so the database holds exactly what was acknowledged.
/// The checkpoint thread must be idle (`finish_checkpoint` with `wait`).
fn reopen(shared: &Shared, journal: &mut Journal, old: &mut WriterState) -> StoreResult<WriterState> {
    let reopened = (|| -> StoreResult<WriterState> {
        shared.close_db()?;
        let db = shared.open_db()?;
        if let Some(wal) = &journal.wal {
            apply_logged(&db, &shared.segments, Durability::None, true, None, |f| wal.for_each_unapplied(f))?;
        }
        let state = WriterState::load(&db)?;
        // redb now holds every acknowledged batch: a failed batch's producers read back from it.
        old.producers.take_back_batch(None, |id, name| producers::read_committed(&db, id, name))?;
        shared.install_db(db);
        Ok(state)
    })();
    match &reopened {
        Ok(_) => {
            journal.lost = None;
            tracing::info!("reopened the stream database after a disk error");
        }
        Err(err) => journal.lost = Some(err.clone()),
    }
    reopened
}

/// The state every acknowledged batch left: redb's (which lags the log
/// between checkpoints) with the log's records since the last checkpoint
/// applied, without a sync. The checkpoint thread must be idle.
fn reload(shared: &Shared, journal: &Journal, old: &mut WriterState) -> StoreResult<WriterState> {
    let db = shared.db()?;
    let Some(wal) = &journal.wal else {
        // Every batch commits to redb itself: it holds every acknowledged one.
        old.producers.take_back_batch(None, |id, name| producers::read_committed(&db, id, name))?;
        return WriterState::load(&db);
    };
    // Applied in a transaction that is never committed: redb is left as the
    // last checkpoint wrote it (a failed batch writes nothing to it).
    let txn = db.begin_write()?;
    let state = {
        let mut t = Tables::open(&txn, &shared.segments)?;
        t.touch_files = false;
        wal.for_each_unapplied(&mut |payload| t.apply_record(payload))?;
        t.finish()?;
        let db_tables = t.db.as_ref().ok_or_else(|| StoreError::Storage("tables are open".into()))?;
        // The failed batch's producers, as the log's records since the last
        // checkpoint left them (dirty until the next checkpoint).
        old.producers
            .take_back_batch(Some(wal.last_seq()), |id, name| producers::read_in(&db_tables.producers, id, name))?;
        WriterState::from_tables(&db_tables.streams, &db_tables.blob_refs, &db_tables.counters)?
    };
    txn.abort()?;
    Ok(state)
}

/// After a failed batch: report it, and get the committed state back (the
/// batch changed the working copy before it failed).
fn recover_from(shared: &Shared, journal: &mut Journal, state: &mut WriterState, failed: Failed) {
    finish_checkpoint(shared, journal, state, true);
    let fresh = if journal.lost.is_some() { reopen(shared, journal, state) } else { reload(shared, journal, state) };
    match fresh {
        Ok(fresh) => *state = fresh.keeping(state),
        Err(err) => {
            // The next batch reopens (and reloads) first.
            tracing::warn!(%err, "cannot reload the committed state yet");
            shared.health.fail(Source::Db, &err);
            journal.lost = Some(err);
            return;
        }
    }
    for sha in failed.adopted {
        if !state.blob_refs.contains_key(&sha) {
            let _ = std::fs::remove_file(shared.blobs.path(&sha));
        }
    }
}

fn expired_streams(shared: &Shared) -> Vec<u64> {
    let now = now_ms();
    let index = shared.index.read();
    index
        .by_id
        .iter()
        .filter(|(_, e)| {
            let info = e.info();
            !info.soft_deleted && e.expired(&info, now)
        })
        .map(|(id, _)| *id)
        .collect()
}

fn commit_batch(
    shared: &Shared,
    state: &mut WriterState,
    batch: Vec<Command>,
    journal: &mut Journal,
) -> Result<(), Failed> {
    let started = Instant::now();
    let size = batch.len();
    let mut changes = Changes::default();
    if let Err(err) = shared.db() {
        let failed = Failed::new(shared, err, Source::Db, &mut changes);
        for cmd in batch {
            refuse(cmd, &failed.err);
        }
        return Err(failed);
    }
    let mut replies = Vec::with_capacity(batch.len());
    let mut commands = batch.into_iter();
    let mut t = Tables::batch(&shared.segments);
    t.read_db = shared.db().ok();
    t.log = std::mem::take(&mut journal.spare);
    let outcome = (|| -> StoreResult<()> {
        let result = (|| -> StoreResult<()> {
            for cmd in commands.by_ref() {
                match cmd {
                    // A disk error fails the whole batch; its own caller hears it with the others.
                    Command::Create(req, tx) => match escalate(state.create(&mut t, &mut changes, shared, req)) {
                        Ok(r) => replies.push(Reply::Create(tx, r)),
                        Err(e) => {
                            replies.push(Reply::Create(tx, Err(e.clone())));
                            return Err(e);
                        }
                    },
                    Command::CreateBlob(req, blob, tx) => {
                        match escalate(state.create_blob(&mut t, &mut changes, shared, req, blob)) {
                            Ok(r) => replies.push(Reply::CreateBlob(tx, r)),
                            Err(e) => {
                                replies.push(Reply::CreateBlob(tx, Err(e.clone())));
                                return Err(e);
                            }
                        }
                    }
                    Command::CreateBlobWithRow(parts, tx) => {
                        let (req, blob, row, guard) = *parts;
                        match escalate(state.create_blob_with_row(&mut t, &mut changes, shared, req, blob, row, guard))
                        {
                            Ok(r) => replies.push(Reply::CreateBlobWithRow(tx, r)),
                            Err(e) => {
                                replies.push(Reply::CreateBlobWithRow(tx, Err(e.clone())));
                                return Err(e);
                            }
                        }
                    }
                    Command::LinkBlob(req, source, tx) => {
                        match escalate(state.link_blob(&mut t, &mut changes, shared, req, &source)) {
                            Ok(r) => replies.push(Reply::CreateBlob(tx, r)),
                            Err(e) => {
                                replies.push(Reply::CreateBlob(tx, Err(e.clone())));
                                return Err(e);
                            }
                        }
                    }
                    Command::Append(prepared, tx) => match escalate(state.append(&mut t, &mut changes, prepared)) {
                        Ok(r) => replies.push(Reply::Append(tx, r)),
                        Err(e) => {
                            replies.push(Reply::Append(tx, Err(e.clone())));
                            return Err(e);
                        }
                    },
                    Command::DeleteId(path, id, tx) => {
                        match escalate(state.delete_id(&mut t, &mut changes, shared, &path, id)) {
                            Ok(r) => replies.push(Reply::Delete(tx, r)),
                            Err(e) => {
                                replies.push(Reply::Delete(tx, Err(e.clone())));
                                return Err(e);
                            }
                        }
                    }
                    Command::AppendIf(parts, tx) => {
                        let (row, guard, bytes) = *parts;
                        match escalate(state.append_if(&mut t, &mut changes, shared, row, guard, bytes)) {
                            Ok(r) => replies.push(Reply::Append(tx, r)),
                            Err(e) => {
                                replies.push(Reply::Append(tx, Err(e.clone())));
                                return Err(e);
                            }
                        }
                    }
                    Command::AppendPair(pair, tx) => {
                        let (first, second, guard) = *pair;
                        match escalate(state.append_pair(&mut t, &mut changes, shared, first, second, guard)) {
                            Ok(r) => replies.push(Reply::Append(tx, r)),
                            Err(e) => {
                                replies.push(Reply::Append(tx, Err(e.clone())));
                                return Err(e);
                            }
                        }
                    }
                    Command::Delete(path, tx) => match escalate(state.delete(&mut t, &mut changes, shared, &path)) {
                        Ok(r) => replies.push(Reply::Delete(tx, r)),
                        Err(e) => {
                            replies.push(Reply::Delete(tx, Err(e.clone())));
                            return Err(e);
                        }
                    },
                    Command::Expire(id) => {
                        let expired = shared.index.read().by_id.get(&id).is_some_and(|e| {
                            let info = e.info();
                            !info.soft_deleted && e.expired(&info, now_ms())
                        });
                        if expired && state.streams.contains_key(&id) {
                            state.remove(&mut t, &mut changes, id)?;
                        }
                    }
                }
            }
            Ok(())
        })();
        result.and_then(|()| t.flush_segments())?;
        // Each touched stream's metadata is logged once per batch, however many appends it took.
        flush_metadata(&mut t, state, &changes)
    })();
    if let Err(err) = outcome {
        // A segment file that refuses a write fails the batch; the database did nothing wrong.
        let source = if t.segment_failed { Source::Segment } else { Source::Db };
        let failed = Failed::new(shared, err, source, &mut changes);
        for cmd in commands {
            refuse(cmd, &failed.err);
        }
        fail_batch(replies, failed.err.clone());
        return Err(failed);
    }
    let Tables { log: record, fresh, fresh_marks, pending, .. } = t;
    // The record is synced to the log (redb gets it at the next checkpoint);
    // one the log cannot take, even after a checkpoint empties it, and every
    // batch of a store without a log, commits straight to redb.
    let mut logged = None;
    let mut direct = false;
    if !record.is_empty() {
        if journal.wal.is_some() {
            journal.make_room(shared, record.len());
            if !journal.wal.as_ref().is_some_and(|w| w.fits(record.len())) {
                // Both files are taken: everything logged goes to redb now, which empties the log.
                if let Err(err) = checkpoint(shared, journal, state) {
                    if err.is_io() {
                        journal.lost = Some(err.clone());
                    }
                    let failed = Failed::new(shared, err, Source::Db, &mut changes);
                    fail_batch(replies, failed.err.clone());
                    return Err(failed);
                }
            }
            match journal.wal.as_mut().filter(|w| w.fits(record.len())) {
                Some(wal) => match wal.append(&record) {
                    Ok(seq) => logged = Some(seq),
                    Err(err) => {
                        // The next tick checkpoints, which lets the log start over.
                        journal.force = true;
                        let failed = Failed::new(shared, err, Source::Log, &mut changes);
                        fail_batch(replies, failed.err.clone());
                        return Err(failed);
                    }
                },
                None => direct = true,
            }
        } else {
            direct = true;
        }
    }
    if direct {
        if let Err((source, err)) = commit_direct(shared, journal, &record) {
            if source == Source::Db && err.is_io() {
                // redb refuses everything after a failed commit until it is reopened.
                journal.lost = Some(err.clone());
            }
            let failed = Failed::new(shared, err, source, &mut changes);
            fail_batch(replies, failed.err.clone());
            return Err(failed);
        }
    }
    let applied_at = started.elapsed();
    // The batch's producer state is durable: in its log record, or in redb itself.
    state.producers.batch_committed(if direct { None } else { logged });
    shared.producers_held.store(state.producers.len(), Ordering::Release);
    if state.producers.len() > journal.producer_cache.saturating_mul(2) {
        // Producer state only the log holds cannot leave memory: a checkpoint lets it.
        journal.force = true;
    }
    if logged.is_some() {
        shared.health.recovered(Source::Log);
    }
    if direct && journal.durable {
        shared.health.recovered(Source::Db);
    }
    shared.health.recovered(Source::Segment);
    state.row_keys.forget_streams(&changes.dropped);
    shared.row_keys_held.store(state.row_keys.held(), Ordering::Release);
    for id in &changes.dropped {
        if let Err(err) = shared.segments.remove(*id) {
            // A leftover file is removed at the next start.
            tracing::warn!(%err, id, "could not delete a deleted stream's segment file");
        }
    }
    for sha in &changes.unlink {
        if let Err(err) = std::fs::remove_file(shared.blobs.path(sha)) {
            // A leftover file is collected at the next start.
            tracing::warn!(%err, sha, "could not delete an unreferenced blob");
        }
    }
    tracing::trace!(
        size,
        logged = logged.is_some(),
        direct,
        apply_us = applied_at.as_micros() as u64,
        total_us = started.elapsed().as_micros() as u64,
        "group commit"
    );
    feed_tails(shared, &record, &fresh, &fresh_marks);
    // Boundaries of a batch committed straight to redb are there already.
    let pending = logged.map(|seq| (seq, pending));
    publish(shared, state, changes, pending);
    for reply in replies {
        reply.send();
    }
    if record.capacity() <= RECORD_BUFFER_KEPT {
        let mut record = record;
        record.clear();
        journal.spare = record;
    }
    Ok(())
}

/// Commits one batch's record straight to redb: the segment files are
/// synced first (when the store is durable), so redb never names bytes a
/// crash could take back.
fn commit_direct(shared: &Shared, journal: &Journal, record: &[u8]) -> Result<(), (Source, StoreError)> {
    let durable = journal.durable || journal.wal.is_some();
    if durable {
        shared.segments.sync_dirty().map_err(|e| (Source::Segment, e))?;
    }
    let db = shared.db().map_err(|e| (Source::Db, e))?;
    let durability = if durable { Durability::Immediate } else { Durability::None };
    apply_logged(&db, &shared.segments, durability, false, None, |f| f(record)).map_err(|e| (Source::Db, e))
}

/// After the commit, before readers are woken: the bytes just made durable
/// go into the tail caches of the streams that live readers wait on.
fn feed_tails(shared: &Shared, record: &[u8], fresh: &[Fresh], marks: &[u64]) {
    if fresh.is_empty() {
        return;
    }
    let index = shared.index.read();
    for f in fresh {
        // A stream created in this batch has no reader yet.
        let Some(entry) = index.by_id.get(&f.id) else { continue };
        if entry.signal.receiver_count() == 0 {
            continue;
        }
        let (Some(bytes), Some(marks)) = (record.get(f.bytes.clone()), marks.get(f.marks.clone())) else { continue };
        let mut cache = entry.tail.lock();
        let delta = cache.extend(f.pos, bytes, marks);
        if !shared.tails.change(delta) {
            // Over the budget: this stream's readers go to its segment file.
            let held = std::mem::take(&mut *cache).held();
            shared.tails.change(-(held as isize));
        }
    }
}

fn fail_batch(replies: Vec<Reply>, err: StoreError) {
    for reply in replies {
        reply.fail(err.clone());
    }
}

/// Domain errors answer one command; storage and disk errors abort the whole batch.
fn escalate<T>(r: StoreResult<T>) -> StoreResult<StoreResult<T>> {
    match r {
        Err(e @ (StoreError::Storage(_) | StoreError::StorageFull(_) | StoreError::Unavailable(_))) => Err(e),
        other => Ok(other),
    }
}

/// After the commit: readers see the batch's boundaries (logged by record
/// `seq`, not yet in redb), then the new metadata; then waiters wake. The
/// index is write-locked only when streams come, go or lose their name:
/// readers of existing streams are not held up by a batch of appends.
fn publish(shared: &Shared, state: &WriterState, changes: Changes, pending: Option<(u64, Vec<(u64, u64)>)>) {
    let now = now_ms();
    let mut by_stream: HashMap<u64, Vec<u64>> = HashMap::new();
    let mut seq = 0;
    if let Some((s, marks)) = pending {
        seq = s;
        for (id, m) in marks {
            by_stream.entry(id).or_default().push(m);
        }
    }
    // Streams this batch created, and existing ones that lost their name.
    let mut fresh: Vec<Arc<StreamEntry>> = Vec::new();
    let mut unnamed: Vec<Arc<StreamEntry>> = Vec::new();
    {
        let index = shared.index.read();
        for (id, marks) in by_stream.iter_mut() {
            if let Some(entry) = index.by_id.get(id) {
                entry.pending.lock().push(seq, std::mem::take(marks));
            }
        }
        for id in &changes.touched {
            let Some(info) = state.streams.get(id) else {
                continue;
            };
            match index.by_id.get(id) {
                Some(entry) => {
                    entry.last_access_ms.store(now, Ordering::Relaxed);
                    entry.publish(info.clone());
                    if info.unlinked && index.by_path.get(&info.path).is_some_and(|e| Arc::ptr_eq(e, entry)) {
                        unnamed.push(entry.clone());
                    }
                }
                None => {
                    // Created by this batch: made with its boundaries before anyone can find it.
                    let entry = StreamEntry::new(info.clone(), now);
                    if let Some(marks) = by_stream.get_mut(id) {
                        entry.pending.lock().push(seq, std::mem::take(marks));
                    }
                    fresh.push(entry);
                }
            }
        }
    }
    if fresh.is_empty() && unnamed.is_empty() && changes.removed.is_empty() {
        return;
    }
    let mut index = shared.index.write();
    for entry in unnamed {
        let path = entry.info().path.clone();
        if index.by_path.get(&path).is_some_and(|e| Arc::ptr_eq(e, &entry)) {
            index.by_path.remove(&path);
        }
    }
    for entry in fresh {
        let info = entry.info();
        if !info.unlinked {
            index.by_path.insert(info.path.clone(), entry.clone());
        }
        if index.by_id.insert(info.id, entry).is_none() {
            index.owned.add(&info);
        }
    }
    for (id, path) in changes.removed {
        if let Some(entry) = index.by_id.remove(&id) {
            index.owned.remove(&entry.info());
            if index.by_path.get(&path).is_some_and(|e| Arc::ptr_eq(e, &entry)) {
                index.by_path.remove(&path);
            }
            entry.removed.store(true, Ordering::Release);
            entry.drop_tail(&shared.tails);
            entry.signal.send_modify(|v| *v = v.wrapping_add(1));
        }
    }
}

fn flush_metadata(t: &mut Tables, state: &WriterState, changes: &Changes) -> StoreResult<()> {
    for id in &changes.touched {
        if let Some(info) = state.streams.get(id) {
            if changes.reshaped.contains(id) {
                t.put_stream(*id, &encode(info)?)?;
            } else {
                t.put_tail(*id, info.tail);
            }
        }
    }
    Ok(())
}

fn encode(info: &StreamInfo) -> StoreResult<Vec<u8>> {
    serde_json::to_vec(info).map_err(|e| StoreError::Storage(e.to_string()))
}

/// Runs `f` over every boundary the writer knows: redb's runs, the
/// streams' pending lists and this batch's own (the writer alone moves
/// boundaries from memory to redb, so its view needs no retry).
fn with_marks<R>(shared: &Shared, t: &Tables, f: impl FnOnce(&dyn MarkIndex) -> StoreResult<R>) -> StoreResult<R> {
    let db = shared.db()?;
    let txn = db.begin_read()?;
    let runs = Runs(txn.open_table(MARK_RUNS)?);
    let memory = marks::Both(&marks::PendingIndex(shared), &marks::BatchMarks(&t.pending));
    f(&marks::Both(&runs, &memory))
}

/// Writes an append's rows at the stream's tail (`base`: where its segment
/// file starts) and marks where each message (JSON) or the append (binary) starts.
fn write_rows(t: &mut Tables, id: u64, base: u64, tail: &mut u64, rows: &[Bytes], json: bool) -> StoreResult<()> {
    let start = *tail;
    // Placed whole first: a domain error must leave nothing written.
    let placed = rules::place_rows(tail, rows, json)?;
    if let Some(bytes) = t.write_segment(id, start - base, rows, json)? {
        let from = t.fresh_marks.len();
        if json {
            t.fresh_marks.extend(placed.iter().map(|(pos, _)| *pos));
        }
        t.fresh.push(Fresh { id, pos: start, at: start - base, bytes, marks: from..t.fresh_marks.len() });
    }
    for (pos, ends) in placed {
        t.put_mark(id, pos, if ends { ROW_ENDS_APPEND } else { 0 })?;
    }
    Ok(())
}

impl WriterState {
    /// Records new metadata for a stream; it is written once per batch, in `flush_metadata`.
    fn save(&mut self, _t: &mut Tables, changes: &mut Changes, info: StreamInfo) -> StoreResult<()> {
        changes.touched.insert(info.id);
        changes.reshaped.insert(info.id);
        self.streams.insert(info.id, info);
        Ok(())
    }

    /// As [`save`](Self::save), for metadata that differs from the stream's
    /// only in its tail (an append that neither closes the stream nor sets
    /// `Stream-Seq`): the batch logs the tail alone.
    fn save_tail(&mut self, changes: &mut Changes, info: StreamInfo) {
        changes.touched.insert(info.id);
        self.streams.insert(info.id, info);
    }

    /// How many streams `src`'s lineage holds (itself and its sources), counted up to one past [`rules::MAX_LINEAGE`].
    fn lineage_len(&self, src: &StreamInfo) -> usize {
        let mut len = 1;
        let mut next = src.fork.as_ref().map(|f| f.source_id);
        while let Some(id) = next.filter(|_| len <= rules::MAX_LINEAGE) {
            len += 1;
            next = self.streams.get(&id).and_then(|s| s.fork.as_ref().map(|f| f.source_id));
        }
        len
    }

    fn expired(&self, shared: &Shared, id: u64) -> bool {
        shared.index.read().by_id.get(&id).is_some_and(|e| {
            let info = e.info();
            e.expired(&info, now_ms())
        })
    }

    fn create(
        &mut self,
        t: &mut Tables,
        changes: &mut Changes,
        shared: &Shared,
        req: CreateStream,
    ) -> StoreResult<CreateOutcome> {
        if let Some(&id) = self.paths.get(req.path.as_str()) {
            match rules::at_path(&self.streams[&id], self.expired(shared, id), &req) {
                AtPath::Holds => return self.confirm_existing(id, &req),
                AtPath::Remove => self.remove(t, changes, id)?,
                AtPath::Unlink => self.unlink(t, changes, id)?,
            }
        }
        let source = match &req.fork {
            Some(spec) => match self.paths.get(spec.source.as_str()) {
                Some(&src_id) => {
                    let src = self.streams.get(&src_id).cloned().ok_or(StoreError::ForkSourceNotFound)?;
                    let expired = self.expired(shared, src_id);
                    Some((src, expired))
                }
                None => None,
            },
            None => None,
        };
        let plan = rules::plan_create(&req, source.as_ref().map(|(s, e)| (s, *e)))?;
        let mut tail = 0;
        let mut fork_info = None;
        let mut fork_source = None;
        if let (Some(spec), Some((src, _)), Some(anchor)) = (&req.fork, source, plan.anchor) {
            rules::check_fork_lineage(self.lineage_len(&src))?;
            self.check_message_start(shared, t, &src, anchor)?;
            let position = self.resolve_sub_offset(shared, t, &src, anchor, spec.sub_offset)?;
            tail = position;
            fork_info = Some(rules::fork_info(&src, position, anchor, spec.sub_offset));
            fork_source = Some(src);
        }
        let (rows, json) = rules::initial_rows(&req, &plan.content_type)?;
        // Everything is valid: only now does the source learn of its new fork.
        if let Some(mut src) = fork_source {
            src.fork_refs += 1;
            self.save(t, changes, src)?;
        }
        let id = self.next_id;
        self.next_id += 1;
        t.put_counter("next_stream_id", self.next_id)?;
        let base = tail;
        write_rows(t, id, base, &mut tail, &rows, json)?;
        let info = rules::new_stream(id, &req, plan, tail, fork_info);
        self.paths.insert(info.path.clone(), id);
        self.save(t, changes, info.clone())?;
        Ok(CreateOutcome::Created(info))
    }

    /// A closed stream holding one blob. The staged file is adopted here, in the
    /// writer, so a concurrent delete of the last holder cannot unlink it meanwhile.
    fn create_blob(
        &mut self,
        t: &mut Tables,
        changes: &mut Changes,
        shared: &Shared,
        req: CreateStream,
        blob: StagedBlob,
    ) -> StoreResult<StreamInfo> {
        if let Some(&id) = self.paths.get(req.path.as_str()) {
            match rules::at_path(&self.streams[&id], self.expired(shared, id), &req) {
                AtPath::Holds => {
                    let _ = std::fs::remove_file(&blob.path);
                    return Err(StoreError::ConfigMismatch("a stream already exists at this path".into()));
                }
                AtPath::Remove => self.remove(t, changes, id)?,
                AtPath::Unlink => self.unlink(t, changes, id)?,
            }
        }
        // The same bytes may have lost their last holder earlier in this batch; keep the file.
        changes.unlink.retain(|sha| sha != &blob.sha256);
        if shared.blobs.adopt(&blob)? {
            changes.adopted.push(blob.sha256.clone());
        }
        self.add_blob_stream(t, changes, &req, BlobRef { sha256: blob.sha256.clone(), len: blob.len })
    }

    /// `create_blob` and an append to another stream, in this batch's one
    /// record: both or neither (`StreamStore::create_blob_stream_and_append`),
    /// the append perhaps guarded (as `append_if`'s row). The append and the
    /// guard are checked before anything changes, so once the blob stream is
    /// made nothing but a disk error (which fails the whole batch) can stop
    /// the append.
    #[allow(clippy::too_many_arguments)]
    fn create_blob_with_row(
        &mut self,
        t: &mut Tables,
        changes: &mut Changes,
        shared: &Shared,
        req: CreateStream,
        blob: StagedBlob,
        row: PreparedAppend,
        guard: Option<RowGuard>,
    ) -> BlobWithRow {
        self.check_append(t, &row)?;
        let stream = row.stream_id;
        let start = self.streams.get(&stream).ok_or(StoreError::NotFound)?.tail;
        if let Some(guard) = &guard {
            let last = self.row_keys.last(stream, &guard.key, guard.since.0, start);
            rules::check_conditions(last, guard, None, None)?;
        }
        let info = self.create_blob(t, changes, shared, req, blob)?;
        // Recorded once the stream is made (a refused create writes nothing)
        // and before the append, which only a disk error can stop then.
        if let Some(guard) = &guard {
            self.row_keys.record(stream, &guard.key, start);
        }
        let outcome =
            self.append(t, changes, row).map_err(|e| rules::checked_then_refused(e, "the append of a blob stream"))?;
        Ok(Box::new((info, outcome)))
    }

    /// `StreamStore::append_guarded`: every condition is checked before
    /// anything changes, so once the row is written only a disk error (which
    /// fails the whole batch) can stop the delete.
    fn append_if(
        &mut self,
        t: &mut Tables,
        changes: &mut Changes,
        shared: &Shared,
        row: PreparedAppend,
        guard: RowGuard,
        bytes: Option<StreamAt>,
    ) -> StoreResult<AppendOutcome> {
        self.check_append(t, &row)?;
        let live = bytes.as_ref().and_then(|at| {
            let id = *self.paths.get(at.path.as_str())?;
            let info = self.streams.get(&id)?;
            (!info.soft_deleted && !self.expired(shared, id)).then_some(id)
        });
        let stream = row.stream_id;
        let start = self.streams.get(&stream).ok_or(StoreError::NotFound)?.tail;
        let last = self.row_keys.last(stream, &guard.key, guard.since.0, start);
        rules::check_conditions(last, &guard, bytes.as_ref(), live)?;
        // Recorded before the write: a batch that fails after leaves a key
        // that refuses more, never one that lets a conflicting write through.
        self.row_keys.record(stream, &guard.key, start);
        let outcome =
            self.append(t, changes, row).map_err(|e| rules::checked_then_refused(e, "a conditional append"))?;
        if let Some(StreamAt { path, id: Some(_) }) = bytes {
            match self.delete(t, changes, shared, &path) {
                Ok(()) | Err(StoreError::NotFound) => {}
                // Checked live above: a refusal now would leave the row without the delete.
                Err(e) => return Err(rules::checked_then_refused(e, "a conditional delete")),
            }
        }
        Ok(outcome)
    }

    /// Two appends to two streams, both or neither, the first perhaps
    /// guarded (`StreamStore::append_in_order_with`): both are checked (and
    /// the guard's condition) before anything changes, so once the first is
    /// written only a disk error (which fails the whole batch) can stop the second.
    fn append_pair(
        &mut self,
        t: &mut Tables,
        changes: &mut Changes,
        shared: &Shared,
        first: PreparedAppend,
        second: PreparedAppend,
        guard: Option<RowGuard>,
    ) -> StoreResult<AppendOutcome> {
        self.check_append(t, &second)?;
        let outcome = match guard {
            Some(guard) => self.append_if(t, changes, shared, first, guard, None)?,
            None => {
                self.check_append(t, &first)?;
                self.append(t, changes, first).map_err(|e| rules::checked_then_refused(e, "an append"))?
            }
        };
        self.append(t, changes, second)
            .map_err(|e| rules::checked_then_refused(e, "the append paired with another"))?;
        Ok(outcome)
    }

    /// Would [`append`](Self::append) take `p` now? Changes nothing.
    fn check_append(&self, t: &Tables, p: &PreparedAppend) -> StoreResult<()> {
        let id = *self.paths.get(p.req.path.as_str()).ok_or(StoreError::NotFound)?;
        if id != p.stream_id {
            return Err(StoreError::NotFound);
        }
        let info = self.streams.get(&id).ok_or(StoreError::NotFound)?;
        let state = match &p.req.producer {
            Some(pr) => self.producers.peek(read_db(t)?, id, &pr.id)?,
            None => None,
        };
        match rules::decide_append(info, &p.req, state)? {
            AppendDecision::Write { .. } => rules::place_rows(&mut info.tail.clone(), &p.rows, p.json).map(drop),
            AppendDecision::Answer(_) => Err(StoreError::Invalid(
                "a row committed with another change must write: no retry, no close of a closed stream".into(),
            )),
        }
    }

    /// A new closed stream at `req`'s path over `blob`, which gains a holder.
    fn add_blob_stream(
        &mut self,
        t: &mut Tables,
        changes: &mut Changes,
        req: &CreateStream,
        blob: BlobRef,
    ) -> StoreResult<StreamInfo> {
        let refs = self.blob_refs.get(&blob.sha256).copied().unwrap_or(0) + 1;
        t.put_blob_ref(&blob.sha256, refs)?;
        self.blob_refs.insert(blob.sha256.clone(), refs);
        let id = self.next_id;
        self.next_id += 1;
        t.put_counter("next_stream_id", self.next_id)?;
        let info = rules::new_blob_stream(id, req, blob);
        self.paths.insert(info.path.clone(), id);
        self.save(t, changes, info.clone())?;
        Ok(info)
    }

    /// A closed stream over the blob of the blob-backed stream at `source`:
    /// one more reference, no byte copied (`StreamStore::link_blob_stream`).
    fn link_blob(
        &mut self,
        t: &mut Tables,
        changes: &mut Changes,
        shared: &Shared,
        mut req: CreateStream,
        source: &str,
    ) -> StoreResult<StreamInfo> {
        let src_id = *self.paths.get(source).ok_or(StoreError::NotFound)?;
        let src = self.streams.get(&src_id).ok_or(StoreError::NotFound)?;
        let blob = rules::plan_link(src, self.expired(shared, src_id), &mut req)?;
        if let Some(&id) = self.paths.get(req.path.as_str()) {
            match rules::at_path(&self.streams[&id], self.expired(shared, id), &req) {
                AtPath::Holds => return Err(StoreError::ConfigMismatch("a stream already exists at this path".into())),
                AtPath::Remove => self.remove(t, changes, id)?,
                AtPath::Unlink => self.unlink(t, changes, id)?,
            }
        }
        // The source holds the blob, so it cannot have lost its last holder; kept as create_blob keeps it.
        changes.unlink.retain(|sha| sha != &blob.sha256);
        let info = self.add_blob_stream(t, changes, &req, blob)?;
        Ok(info)
    }

    /// PUT on an existing path: 200 when the configuration matches, 409 when not.
    fn confirm_existing(&self, id: u64, req: &CreateStream) -> StoreResult<CreateOutcome> {
        rules::confirm_existing(&self.streams[&id], req)
    }

    /// Refines a fork point by `sub` messages (JSON) or bytes (otherwise) past
    /// `anchor`, within the one append that starts at the anchor.
    /// Refuses a fork of a JSON stream at an offset inside a message: the
    /// rows holding `anchor` (the source's own, or an ancestor's below a fork
    /// point) must have a message start there.
    fn check_message_start(&self, shared: &Shared, t: &Tables, src: &StreamInfo, anchor: u64) -> StoreResult<()> {
        if !rules::fork_needs_message_start(src, anchor) {
            return Ok(());
        }
        let segs = super::reader::segments(shared, src, anchor, src.tail)?;
        let starts = match segs.first() {
            Some(seg) => with_marks(shared, t, |ix| marks::is_start(ix, seg.id, anchor))?,
            None => false,
        };
        if starts {
            Ok(())
        } else {
            Err(StoreError::ForkOffsetInsideMessage { offset: Offset(anchor) })
        }
    }

    fn resolve_sub_offset(
        &self,
        shared: &Shared,
        t: &Tables,
        src: &StreamInfo,
        anchor: u64,
        sub: u64,
    ) -> StoreResult<u64> {
        if rules::sub_offset_is_anchor(src, anchor, sub)? {
            return Ok(anchor);
        }
        // The stream whose own rows hold `anchor`, and where its own bytes end.
        let segs = super::reader::segments(shared, src, anchor, src.tail)?;
        let seg = segs.first().copied().ok_or_else(rules::sub_offset_overshoot)?;
        let owner_tail = self.streams.get(&seg.id).map_or(seg.hi, |s| s.tail);
        with_marks(shared, t, |ix| {
            if src.is_json() {
                let rows = marks::between(ix, seg.id, anchor, seg.hi, owner_tail)
                    .map(|row| row.map(|(start, end, flags)| (start, end - start - 1, flags & ROW_ENDS_APPEND != 0)));
                rules::json_sub_offset(rows, sub)
            } else {
                let row = match ix.prev_upto(seg.id, anchor)? {
                    Some((start, _)) => {
                        let next = ix.next_from(seg.id, start + 1)?.map(|(p, _)| p);
                        Some((start, next.unwrap_or(owner_tail) - start))
                    }
                    None => None,
                };
                rules::binary_sub_offset(row, seg.hi, anchor, sub)
            }
        })
    }

    fn append(&mut self, t: &mut Tables, changes: &mut Changes, p: PreparedAppend) -> StoreResult<AppendOutcome> {
        let req = &p.req;
        let id = *self.paths.get(req.path.as_str()).ok_or(StoreError::NotFound)?;
        if id != p.stream_id {
            return Err(StoreError::NotFound);
        }
        let state = match &req.producer {
            Some(pr) => self.producers.get(read_db(t)?, id, &pr.id)?,
            None => None,
        };
        let info = self.streams.get(&id).ok_or(StoreError::NotFound)?;
        let producer_next = match rules::decide_append(info, req, state)? {
            AppendDecision::Answer(outcome) => return Ok(*outcome),
            AppendDecision::Write { producer_next } => producer_next,
        };
        let mut info = info.clone();
        let base = super::reader::base(&info);
        write_rows(t, id, base, &mut info.tail, &p.rows, p.json)?;
        let tail_only = rules::append_moves_only_tail(req);
        rules::finish_append(&mut info, req);
        if let (Some(pr), Some(next)) = (&req.producer, producer_next) {
            t.put_producer(id, &pr.id, next.epoch, next.last_seq)?;
            self.producers.set(id, &pr.id, next);
        }
        if tail_only {
            self.save_tail(changes, info.clone());
        } else {
            self.save(t, changes, info.clone())?;
        }
        Ok(AppendOutcome { info, producer: producer_next, duplicate: false })
    }

    fn delete(&mut self, t: &mut Tables, changes: &mut Changes, shared: &Shared, path: &str) -> StoreResult<()> {
        let id = *self.paths.get(path).ok_or(StoreError::NotFound)?;
        let info = self.streams.get(&id).ok_or(StoreError::NotFound)?;
        if info.soft_deleted {
            return Err(StoreError::Gone);
        }
        let expired = self.expired(shared, id);
        self.remove(t, changes, id)?;
        if expired {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    /// [`delete`](Self::delete) only while `path` holds the stream `id`.
    fn delete_id(
        &mut self,
        t: &mut Tables,
        changes: &mut Changes,
        shared: &Shared,
        path: &str,
        id: u64,
    ) -> StoreResult<()> {
        if self.paths.get(path) != Some(&id) {
            return Err(StoreError::NotFound);
        }
        self.delete(t, changes, shared, path)
    }

    /// A stream kept for its forks gives up its path: it stays under its id
    /// until its last fork goes (`remove` then drops it).
    fn unlink(&mut self, t: &mut Tables, changes: &mut Changes, id: u64) -> StoreResult<()> {
        let Some(mut info) = self.streams.get(&id).cloned() else {
            return Ok(());
        };
        if self.paths.get(&info.path) == Some(&id) {
            self.paths.remove(&info.path);
        }
        info.unlinked = true;
        self.save(t, changes, info)
    }

    /// Deletes a stream: soft while forks read through it, otherwise for good,
    /// releasing its source (and that source, if it was waiting only on this fork).
    fn remove(&mut self, t: &mut Tables, changes: &mut Changes, id: u64) -> StoreResult<()> {
        let Some(mut info) = self.streams.get(&id).cloned() else {
            return Ok(());
        };
        if info.fork_refs > 0 {
            info.soft_deleted = true;
            return self.save(t, changes, info);
        }
        t.drop_stream(id)?;
        changes.dropped.push(id);
        if let Some(blob) = &info.blob {
            let left = self.blob_refs.get(&blob.sha256).copied().unwrap_or(1).saturating_sub(1);
            if left == 0 {
                t.remove_blob_ref(&blob.sha256)?;
                self.blob_refs.remove(&blob.sha256);
                changes.unlink.push(blob.sha256.clone());
            } else {
                t.put_blob_ref(&blob.sha256, left)?;
                self.blob_refs.insert(blob.sha256.clone(), left);
            }
        }
        t.clear_producers(id)?;
        t.remove_stream(id)?;
        self.streams.remove(&id);
        if self.paths.get(&info.path) == Some(&id) {
            self.paths.remove(&info.path);
        }
        self.producers.forget_stream(id);
        changes.touched.remove(&id);
        changes.reshaped.remove(&id);
        changes.removed.push((id, info.path.clone()));
        if let Some(fork) = info.fork {
            if let Some(mut src) = self.streams.get(&fork.source_id).cloned() {
                src.fork_refs = src.fork_refs.saturating_sub(1);
                let cascade = src.soft_deleted && src.fork_refs == 0;
                self.save(t, changes, src)?;
                if cascade {
                    self.remove(t, changes, fork.source_id)?;
                }
            }
        }
        Ok(())
    }
}

/// The committed database a batch reads producer state from.
fn read_db<'a>(t: &'a Tables) -> StoreResult<&'a Database> {
    t.read_db.as_deref().ok_or_else(|| StoreError::Unavailable("the store is reopening after a disk error".into()))
}

#[cfg(test)]
mod tests {
    use super::RowKeys;
    use std::time::{Duration, Instant};

    #[test]
    fn applying_logged_records_to_redb_builds_no_log_record_of_its_own() {
        use super::super::wal::Op;
        let dir = tempfile::tempdir().unwrap();
        let db = redb::Database::create(dir.path().join("t.redb")).unwrap();
        super::create_tables(&db).unwrap();
        let segments = super::Segments::open(dir.path().join("segments"), 16, None).unwrap();
        let mut payload = Vec::new();
        for pos in 0..1_000u64 {
            Op::MarkPut { id: 7, pos: pos * 10, flags: 0 }.encode(&mut payload);
        }
        Op::StreamPut { id: 7, meta: b"{}" }.encode(&mut payload);
        let txn = db.begin_write().unwrap();
        let mut t = super::Tables::open(&txn, &segments).unwrap();
        t.touch_files = false;
        t.apply_record(&payload).unwrap();
        assert_eq!(t.log.capacity(), 0, "a checkpoint's apply encoded its ops again into a record nobody writes");
        t.finish().unwrap();
        drop(t);
        txn.commit().unwrap();
    }

    /// Applies each payload in a durable commit of its own (a checkpoint
    /// each) and returns stream `id`'s tail as redb then holds it.
    fn tail_after_checkpoints(payloads: &[Vec<u8>], id: u64) -> Option<u64> {
        use redb::ReadableDatabase;
        let dir = tempfile::tempdir().unwrap();
        let db = redb::Database::create(dir.path().join("t.redb")).unwrap();
        super::create_tables(&db).unwrap();
        let segments = super::Segments::open(dir.path().join("segments"), 16, None).unwrap();
        for payload in payloads {
            super::apply_logged(&db, &segments, redb::Durability::Immediate, false, None, |f| f(payload)).unwrap();
        }
        let txn = db.begin_read().unwrap();
        let table = txn.open_table(super::STREAMS).unwrap();
        let meta = table.get(id).unwrap()?;
        Some(serde_json::from_slice::<super::StreamInfo>(meta.value()).unwrap().tail)
    }

    fn meta(id: u64, tail: u64) -> Vec<u8> {
        serde_json::to_vec(&super::StreamInfo { id, ..super::StreamInfo::for_tests(tail, true) }).unwrap()
    }

    #[test]
    fn a_logged_tail_moves_the_metadata_it_follows_in_the_same_checkpoint_or_an_earlier_one() {
        use super::super::wal::Op;
        let ops = |ops: &[Op]| {
            let mut out = Vec::new();
            for op in ops {
                op.encode(&mut out);
            }
            out
        };
        let m = meta(7, 3);
        let put = Op::StreamPut { id: 7, meta: &m };
        let tail = |t| Op::StreamTail { id: 7, tail: t };
        assert_eq!(tail_after_checkpoints(&[ops(&[put.clone(), tail(10), tail(25)])], 7), Some(25), "one checkpoint");
        assert_eq!(
            tail_after_checkpoints(&[ops(std::slice::from_ref(&put)), ops(&[tail(10)]), ops(&[tail(40)])], 7),
            Some(40),
            "metadata in redb from an earlier checkpoint"
        );
        let m9 = meta(7, 9);
        assert_eq!(
            tail_after_checkpoints(&[ops(&[put.clone(), tail(50), Op::StreamPut { id: 7, meta: &m9 }])], 7),
            Some(9),
            "metadata put after a tail is the whole truth"
        );
        assert_eq!(
            tail_after_checkpoints(&[ops(&[put.clone(), tail(10), Op::StreamRemove { id: 7 }])], 7),
            None,
            "a removed stream stays removed"
        );
        assert_eq!(
            tail_after_checkpoints(&[ops(&[put, tail(10)]), ops(&[Op::StreamRemove { id: 7 }, tail(90)])], 7),
            None,
            "a tail of a stream removed before it brings nothing back"
        );
    }

    #[test]
    fn a_forgotten_guard_key_refuses_more_never_less() {
        let mut keys = RowKeys::default();
        keys.record(1, "attachment:a", 100);
        assert_eq!(keys.last(1, "attachment:a", 50, 200), Some(100), "written past a read at 50");
        assert_eq!(keys.last(1, "attachment:b", 50, 200), None, "another key never written");
        // Past the bound with every key young: all are forgotten, floors raised past them.
        for n in 0..RowKeys::MAX as u64 {
            keys.record(1, &format!("attachment:{n}"), 1_000 + n);
        }
        assert!(keys.last.len() <= RowKeys::MAX / 2);
        // A read before a forgotten write now falls back to the whole tail:
        // refused while the stream moved, let through while it did not.
        assert_eq!(keys.last(1, "attachment:a", 50, 20_000), Some(50));
        assert_eq!(keys.last(1, "attachment:a", 20_000, 20_000), None);
        assert_eq!(keys.last(1, "attachment:a", 20_000, 20_100), None, "read after every forgotten write");
        assert_eq!(keys.last(2, "attachment:a", 50, 20_000), None, "another stream forgot nothing");
    }

    #[test]
    fn a_guard_key_is_forgotten_a_minute_after_its_write_however_few_keys_there_are() {
        let start = Instant::now();
        let mut keys = RowKeys::default();
        keys.record_at(1, "attachment:a", 100, start);
        keys.record_at(1, "attachment:b", 200, start + Duration::from_secs(30));
        assert_eq!(keys.last.len(), 2, "both younger than a minute");
        keys.record_at(2, "attachment:c", 10, start + Duration::from_secs(61));
        assert_eq!(keys.last.len(), 2, "a's minute is over, b's is not");
        assert_eq!(keys.last(1, "attachment:b", 150, 300), Some(200));
        // a is forgotten: a guard read before its write is refused, one read after is not.
        assert_eq!(keys.last(1, "attachment:a", 50, 300), Some(50));
        assert_eq!(keys.last(1, "attachment:a", 150, 300), None);
        keys.record_at(2, "attachment:d", 20, start + Duration::from_secs(95));
        assert_eq!(keys.last.len(), 2, "b went at its minute too");
    }
}

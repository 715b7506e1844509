//! The data dir's format version, and the upgrades from older ones.
//!
//! `FORMAT` in the data dir names the layout (`attache-embedded-format 4`).
//! Format 2 kept a redb row per message boundary (format 3: runs of them);
//! format 4 adds one log op, an append's new tail without the rest of its
//! stream's metadata (`wal::Op::StreamTail`), so a format-3 dir is format 4
//! once restamped, and a format-3 release refuses a format-4 dir rather than
//! replay a log it cannot read.
//! Format 1 (no `FORMAT` file, written by releases before segment files)
//! kept every JSON message and every binary append as a row of redb's
//! `chunks` table, behind a log of `AWL1` records. The first start of this
//! build on such a dir upgrades it in place:
//!
//! 1. replays the format-1 log into redb (as format 1 did at every start);
//! 2. writes each stream's rows to its segment file (JSON: each message and
//!    `,`), at the same positions, and syncs the files and their directory;
//! 3. in one durable redb commit: marks in place of rows, the `chunks` table
//!    dropped, the log marked consumed; then removes the format-1 log;
//! 4. writes `FORMAT` (through a synced temporary file and a rename).
//!
//! A crash anywhere before 4 leaves a dir that the next start upgrades
//! again: step 2 rewrites whole files from rows, and after step 3 there are
//! no rows left to rewrite. Every offset a client holds stays valid: a
//! position is the same byte count in both formats.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use redb::{Database, Durability, ReadableTable, TableDefinition};

use super::marks::{pack, put_runs, MARK_RUNS};
use super::segments::Segments;
use super::wal::{Op, Wal, MAGIC_V1};
use super::{BLOB_REFS, COUNTERS, PRODUCERS, STREAMS};
use crate::error::{StoreError, StoreResult};
use crate::model::StreamInfo;

/// The layout this build writes.
pub(crate) const CURRENT: u32 = 4;
const FILE: &str = "FORMAT";
const PREFIX: &str = "attache-embedded-format ";

/// Format 2: (stream id, position) → flags, a row per message boundary
/// (format 3 keeps them as runs, `marks.rs`).
const MARKS: TableDefinition<(u64, u64), u8> = TableDefinition::new("marks");

/// Format 1: (stream id, start position) → a flags byte, then the row's bytes.
const CHUNKS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("chunks");

/// What `prepare` did.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Upgrade {
    pub(crate) streams: usize,
    pub(crate) bytes: u64,
}

/// Makes the data dir hold format [`CURRENT`]: a new dir is stamped, a
/// format-1 dir upgraded, a newer format refused with what to do.
pub(crate) fn prepare(dir: &Path, cache_bytes: usize, segments: &Segments) -> StoreResult<Option<Upgrade>> {
    let stamp = dir.join(FILE);
    match std::fs::read_to_string(&stamp) {
        Ok(text) => {
            let version =
                text.trim().strip_prefix(PREFIX).and_then(|v| v.parse::<u32>().ok()).ok_or_else(|| {
                    StoreError::Storage(format!("{} does not name a format: {text:?}", stamp.display()))
                })?;
            if version == 2 {
                let runs = upgrade_v2(dir, cache_bytes)?;
                tracing::info!(runs, dir = %dir.display(), "upgraded the data dir from format 2 to format {CURRENT}");
                write_stamp(dir)?;
                return Ok(Some(Upgrade::default()));
            }
            if version == 3 {
                // Format 4 only adds a log op (`Op::StreamTail`) that format 3
                // never wrote: its files are format 4 as they are. The stamp
                // keeps a format-3 release from replaying a log it cannot read.
                write_stamp(dir)?;
                tracing::info!(dir = %dir.display(), "upgraded the data dir from format 3 to format {CURRENT}");
                return Ok(Some(Upgrade::default()));
            }
            if version != CURRENT {
                return Err(StoreError::Storage(format!(
                    "the data dir {} holds format {version}, written by another release of attache; this build \
                     reads format {CURRENT}: run the release that wrote it, or one that upgrades it",
                    dir.display()
                )));
            }
            Ok(None)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let upgraded = if dir.join("streams.redb").exists() {
                let done = upgrade_v1(dir, cache_bytes, segments)?;
                upgrade_v2(dir, cache_bytes)?;
                tracing::info!(
                    streams = done.streams,
                    bytes = done.bytes,
                    dir = %dir.display(),
                    "upgraded the data dir from format 1 to format {CURRENT}"
                );
                Some(done)
            } else {
                None
            };
            write_stamp(dir)?;
            Ok(upgraded)
        }
        Err(e) => Err(e.into()),
    }
}

fn write_stamp(dir: &Path) -> StoreResult<()> {
    let tmp = dir.join(format!("{FILE}.tmp"));
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(format!("{PREFIX}{CURRENT}\n").as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, dir.join(FILE))?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

fn upgrade_v1(dir: &Path, cache_bytes: usize, segments: &Segments) -> StoreResult<Upgrade> {
    let db_path = dir.join("streams.redb");
    let wal_path = dir.join("streams.wal");
    let mut builder = Database::builder();
    builder.set_cache_size(cache_bytes);
    let db = builder.create(&db_path)?;
    // 1. The format-1 log, replayed as format 1 did.
    let checkpointed = {
        let txn = db.begin_write()?;
        let seq = txn.open_table(COUNTERS)?.get("wal_seq")?.map(|v| v.value()).unwrap_or(0);
        txn.open_table(CHUNKS)?;
        txn.open_table(MARKS)?;
        txn.commit()?;
        seq
    };
    let mut last_seq = checkpointed;
    if wal_path.exists() {
        let len = std::fs::metadata(&wal_path)?.len();
        let (_, recovered) = Wal::open_format(&wal_path, MAGIC_V1, len, false, checkpointed, None)?;
        if let Some(at) = recovered.torn_at {
            tracing::warn!(file = %wal_path.display(), offset = at, "the format-1 log ends in a damaged record; upgrading what precedes it");
        }
        let mut txn = db.begin_write()?;
        txn.set_durability(Durability::None).map_err(|e| StoreError::Storage(e.to_string()))?;
        for (seq, payload) in &recovered.records {
            for op in Op::decode_all(payload)? {
                apply_v1(&txn, &op)?;
            }
            last_seq = *seq;
        }
        txn.commit()?;
    }
    // 2. Rows to segment files.
    let mut done = Upgrade::default();
    let mut txn = db.begin_write()?;
    txn.set_durability(Durability::Immediate).map_err(|e| StoreError::Storage(e.to_string()))?;
    {
        let streams: HashMap<u64, StreamInfo> = {
            let table = txn.open_table(STREAMS)?;
            let mut out = HashMap::new();
            for row in table.iter()? {
                let (k, v) = row?;
                let info: StreamInfo = serde_json::from_slice(v.value())
                    .map_err(|e| StoreError::Storage(format!("corrupt stream metadata: {e}")))?;
                out.insert(k.value(), info);
            }
            out
        };
        let chunks = txn.open_table(CHUNKS)?;
        let mut marks = txn.open_table(MARKS)?;
        let mut ids: Vec<u64> = streams.keys().copied().collect();
        ids.sort_unstable();
        for id in ids {
            let info = &streams[&id];
            let base = super::reader::base(info);
            let json = info.is_json();
            let mut rows = chunks.range((id, 0)..=(id, u64::MAX))?.peekable();
            if rows.peek().is_none() {
                continue;
            }
            let path = segments.path(id);
            let mut out = std::io::BufWriter::with_capacity(1 << 16, std::fs::File::create(&path)?);
            let mut pos = base;
            for row in rows {
                let (k, v) = row?;
                let (at, value) = (k.value().1, v.value());
                let (flags, bytes) =
                    value.split_first().ok_or_else(|| StoreError::Storage("an empty format-1 row".into()))?;
                if at != pos {
                    return Err(StoreError::Storage(format!(
                        "format-1 stream {} has a row at {at} where {pos} was expected; not upgraded",
                        info.path
                    )));
                }
                out.write_all(bytes)?;
                if json {
                    out.write_all(b",")?;
                }
                pos += bytes.len() as u64 + u64::from(json);
                marks.insert((id, at), *flags)?;
            }
            if pos != info.tail {
                return Err(StoreError::Storage(format!(
                    "format-1 stream {} holds rows up to {pos} but its tail is {}; not upgraded",
                    info.path, info.tail
                )));
            }
            out.into_inner().map_err(|e| StoreError::from(e.into_error()))?.sync_all()?;
            done.streams += 1;
            done.bytes += pos - base;
        }
        std::fs::File::open(segments.dir())?.sync_all()?;
        drop(chunks);
        // 3. One durable commit: marks in, rows out, the log consumed.
        txn.delete_table(CHUNKS)?;
        txn.open_table(COUNTERS)?.insert("wal_seq", last_seq)?;
        // Tables every later start opens.
        txn.open_table(PRODUCERS)?;
        txn.open_table(BLOB_REFS)?;
    }
    txn.commit()?;
    drop(db);
    match std::fs::remove_file(&wal_path) {
        Ok(()) => std::fs::File::open(dir)?.sync_all()?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    Ok(done)
}

/// Format 2 to 3: the boundary rows become runs, in one durable commit
/// (a crash before it leaves format 2 to upgrade again; after it, nothing
/// is left to convert). The log's records are the same in both formats.
/// Returns how many runs were written.
fn upgrade_v2(dir: &Path, cache_bytes: usize) -> StoreResult<usize> {
    let mut builder = Database::builder();
    builder.set_cache_size(cache_bytes);
    let db = builder.create(dir.join("streams.redb"))?;
    let mut txn = db.begin_write()?;
    txn.set_durability(Durability::Immediate).map_err(|e| StoreError::Storage(e.to_string()))?;
    let mut written = 0;
    {
        let rows = txn.open_table(MARKS)?;
        let mut runs = txn.open_table(MARK_RUNS)?;
        let mut current: Option<u64> = None;
        let mut marks: Vec<u64> = Vec::new();
        for row in rows.iter()? {
            let (k, v) = row?;
            let (id, pos) = k.value();
            if current != Some(id) {
                if let Some(prev) = current {
                    put_runs(&mut runs, prev, &marks)?;
                    written += marks.len().div_ceil(super::marks::RUN_MAX);
                }
                current = Some(id);
                marks.clear();
            }
            marks.push(pack(pos, v.value()));
        }
        if let Some(prev) = current {
            put_runs(&mut runs, prev, &marks)?;
            written += marks.len().div_ceil(super::marks::RUN_MAX);
        }
    }
    txn.delete_table(MARKS)?;
    txn.commit()?;
    Ok(written)
}

/// One format-1 log op, applied as format 1 applied it.
fn apply_v1(txn: &redb::WriteTransaction, op: &Op) -> StoreResult<()> {
    match *op {
        Op::StreamPut { id, meta } => {
            txn.open_table(STREAMS)?.insert(id, meta)?;
        }
        Op::StreamRemove { id } => {
            txn.open_table(STREAMS)?.remove(id)?;
        }
        Op::ChunkPut { id, pos, row } => {
            txn.open_table(CHUNKS)?.insert((id, pos), row)?;
        }
        Op::ChunksClear { id } => {
            txn.open_table(CHUNKS)?.retain_in((id, 0)..=(id, u64::MAX), |_, _| false)?;
        }
        Op::ProducerPut { id, producer, epoch, last_seq } => {
            txn.open_table(PRODUCERS)?.insert((id, producer), (epoch, last_seq))?;
        }
        Op::ProducersClear { id } => {
            txn.open_table(PRODUCERS)?.retain_in((id, "")..(id + 1, ""), |_, _| false)?;
        }
        Op::CounterPut { name, value } => {
            txn.open_table(COUNTERS)?.insert(name, value)?;
        }
        Op::BlobRefPut { sha256, count } => {
            txn.open_table(BLOB_REFS)?.insert(sha256, count)?;
        }
        Op::BlobRefRemove { sha256 } => {
            txn.open_table(BLOB_REFS)?.remove(sha256)?;
        }
        Op::SegWrite { .. } | Op::MarkPut { .. } | Op::StreamDrop { .. } | Op::StreamTail { .. } => {
            return Err(StoreError::Storage("a format-2 op in a format-1 log".into()));
        }
    }
    Ok(())
}

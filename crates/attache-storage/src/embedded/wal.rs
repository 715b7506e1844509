//! The write-ahead log in front of redb.
//!
//! Why it exists (numbers in docs/ARCHITECTURE.md): a durable redb commit
//! writes every B-tree page the batch touched, copy-on-write, and syncs them:
//! for a batch of small appends that is ~24× the payload, scattered over the
//! file. The log instead writes the batch's changes once, sequentially, into a
//! file whose blocks already exist (so `fdatasync` flushes data and no
//! metadata), and syncs that, which makes the batch visible to readers; redb
//! gets nothing per batch. Every 3 s, and whenever a log file is half full, a
//! *checkpoint* applies the logged records to redb in one durable commit
//! (`writer.rs`), and the log file it covered starts over at its beginning.
//!
//! A record is one batch: `magic "AWL2" | payload length u32 | seq u64 | crc32
//! of (seq, payload) u32 | payload`, little-endian. The payload is a list of
//! [`Op`]s, each a blind write (a whole value put, or a removal), so applying a
//! record twice leaves what applying it once did. Records carry consecutive
//! seqs; a checkpoint stores the last seq it covers in redb (`wal_seq`).
//! Recovery reads from the start of the file while each record is whole, has
//! the next seq and checks out: stale records of an earlier round have smaller
//! seqs, a torn one fails its crc, and zeroes fail the magic. A record whose
//! magic is right but whose crc fails, or that runs past the end of the file,
//! is damage: recovery reports it (file and offset) and stops before it.
//!
//! Format 2 (magic `AWL2`) carries stream bytes as [`Op::SegWrite`] (the
//! bytes a segment file gets at an offset) and message boundaries as
//! [`Op::MarkPut`]; format 1 (`AWL1`, the rows of the old CHUNKS table) is
//! read only by the upgrade of a format-1 data dir.
//!
//! Why one file of this size: about 740 lines are the log (framing, the two
//! files and their rotation, replay); the rest is its unit tests (torn tails,
//! damaged records, rotation), kept beside what they test.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::error::{StoreError, StoreResult};
use crate::fault::{self, FaultPlan, FaultPoint};

/// The magic of a format-2 log record.
pub(crate) const MAGIC: &[u8; 4] = b"AWL2";
/// The magic of a format-1 log record (read only by the upgrade).
pub(crate) const MAGIC_V1: &[u8; 4] = b"AWL1";
const HEADER: usize = 4 + 4 + 8 + 4;
/// The file grows in steps of zeroes written ahead of use (never by appending
/// records, which would make each sync also write the inode), on a thread
/// of their own while the writer goes on ([`Wal::grow_ahead`]).
const GROW_STEP: u64 = 4 << 20;
/// Zeroes written ahead are pushed to the disk this many bytes at a time, so
/// a record's `fdatasync` meanwhile never has more than this of them to write.
const ZERO_CHUNK: usize = 256 << 10;

/// One change to a table of the stream database. Replaying a record applies these in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Op<'a> {
    StreamPut {
        id: u64,
        meta: &'a [u8],
    },
    StreamRemove {
        id: u64,
    },
    /// Format 1 only: one row of the old CHUNKS table.
    ChunkPut {
        id: u64,
        pos: u64,
        row: &'a [u8],
    },
    /// Format 1 only: every chunk of stream `id`.
    ChunksClear {
        id: u64,
    },
    /// `bytes` at file offset `at` of stream `id`'s segment file.
    SegWrite {
        id: u64,
        at: u64,
        bytes: &'a [u8],
    },
    /// A message (JSON) or append (binary) starts at `pos` of stream `id`.
    MarkPut {
        id: u64,
        pos: u64,
        flags: u8,
    },
    /// Every mark of stream `id`, and its segment file.
    StreamDrop {
        id: u64,
    },
    ProducerPut {
        id: u64,
        producer: &'a str,
        epoch: u64,
        last_seq: u64,
    },
    /// Every producer of stream `id`.
    ProducersClear {
        id: u64,
    },
    CounterPut {
        name: &'a str,
        value: u64,
    },
    BlobRefPut {
        sha256: &'a str,
        count: u64,
    },
    BlobRefRemove {
        sha256: &'a str,
    },
    /// Stream `id` now ends at `tail`, and nothing else of its metadata
    /// changed since its last [`Op::StreamPut`] (format 4: an append's change,
    /// 17 bytes where its whole metadata was ~260 of JSON).
    StreamTail {
        id: u64,
        tail: u64,
    },
}

impl Op<'_> {
    /// Starts a [`Op::SegWrite`] of `len` bytes in `out`; the caller appends
    /// exactly those bytes. Returns where they start in `out`.
    pub(crate) fn seg_write_header(out: &mut Vec<u8>, id: u64, at: u64, len: u32) -> usize {
        out.reserve(21 + len as usize);
        out.push(10);
        out.extend_from_slice(&id.to_le_bytes());
        out.extend_from_slice(&at.to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
        out.len()
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        let bytes = |out: &mut Vec<u8>, b: &[u8]| {
            out.extend_from_slice(&(b.len() as u32).to_le_bytes());
            out.extend_from_slice(b);
        };
        let int = |out: &mut Vec<u8>, v: u64| out.extend_from_slice(&v.to_le_bytes());
        match *self {
            Op::StreamPut { id, meta } => {
                out.push(1);
                int(out, id);
                bytes(out, meta);
            }
            Op::StreamRemove { id } => {
                out.push(2);
                int(out, id);
            }
            Op::ChunkPut { id, pos, row } => {
                out.push(3);
                int(out, id);
                int(out, pos);
                bytes(out, row);
            }
            Op::ChunksClear { id } => {
                out.push(4);
                int(out, id);
            }
            Op::ProducerPut { id, producer, epoch, last_seq } => {
                out.push(5);
                int(out, id);
                bytes(out, producer.as_bytes());
                int(out, epoch);
                int(out, last_seq);
            }
            Op::ProducersClear { id } => {
                out.push(6);
                int(out, id);
            }
            Op::CounterPut { name, value } => {
                out.push(7);
                bytes(out, name.as_bytes());
                int(out, value);
            }
            Op::BlobRefPut { sha256, count } => {
                out.push(8);
                bytes(out, sha256.as_bytes());
                int(out, count);
            }
            Op::BlobRefRemove { sha256 } => {
                out.push(9);
                bytes(out, sha256.as_bytes());
            }
            Op::SegWrite { id, at, bytes: b } => {
                out.push(10);
                int(out, id);
                int(out, at);
                bytes(out, b);
            }
            Op::MarkPut { id, pos, flags } => {
                out.push(11);
                int(out, id);
                int(out, pos);
                out.push(flags);
            }
            Op::StreamDrop { id } => {
                out.push(12);
                int(out, id);
            }
            Op::StreamTail { id, tail } => {
                out.push(13);
                int(out, id);
                int(out, tail);
            }
        }
    }

    /// Every op of a record's payload, or why it is not one (never a panic).
    pub(crate) fn decode_all(mut payload: &[u8]) -> StoreResult<Vec<Op<'_>>> {
        let mut ops = Vec::new();
        while !payload.is_empty() {
            ops.push(Op::decode(&mut payload)?);
        }
        Ok(ops)
    }

    fn decode<'a>(input: &mut &'a [u8]) -> StoreResult<Op<'a>> {
        fn take<'a>(input: &mut &'a [u8], n: usize) -> StoreResult<&'a [u8]> {
            if input.len() < n {
                return Err(corrupt("an op runs past the end of its record"));
            }
            let (head, rest) = input.split_at(n);
            *input = rest;
            Ok(head)
        }
        fn int(input: &mut &[u8]) -> StoreResult<u64> {
            let b = take(input, 8)?;
            Ok(u64::from_le_bytes(b.try_into().map_err(|_| corrupt("short integer"))?))
        }
        fn bytes<'a>(input: &mut &'a [u8]) -> StoreResult<&'a [u8]> {
            let b = take(input, 4)?;
            let len = u32::from_le_bytes(b.try_into().map_err(|_| corrupt("short length"))?) as usize;
            take(input, len)
        }
        fn text<'a>(input: &mut &'a [u8]) -> StoreResult<&'a str> {
            std::str::from_utf8(bytes(input)?).map_err(|_| corrupt("a name is not UTF-8"))
        }
        let tag = take(input, 1)?[0];
        Ok(match tag {
            1 => Op::StreamPut { id: int(input)?, meta: bytes(input)? },
            2 => Op::StreamRemove { id: int(input)? },
            3 => Op::ChunkPut { id: int(input)?, pos: int(input)?, row: bytes(input)? },
            4 => Op::ChunksClear { id: int(input)? },
            5 => Op::ProducerPut { id: int(input)?, producer: text(input)?, epoch: int(input)?, last_seq: int(input)? },
            6 => Op::ProducersClear { id: int(input)? },
            7 => Op::CounterPut { name: text(input)?, value: int(input)? },
            8 => Op::BlobRefPut { sha256: text(input)?, count: int(input)? },
            9 => Op::BlobRefRemove { sha256: text(input)? },
            10 => Op::SegWrite { id: int(input)?, at: int(input)?, bytes: bytes(input)? },
            11 => Op::MarkPut { id: int(input)?, pos: int(input)?, flags: take(input, 1)?[0] },
            12 => Op::StreamDrop { id: int(input)? },
            13 => Op::StreamTail { id: int(input)?, tail: int(input)? },
            other => return Err(corrupt(&format!("unknown op {other}"))),
        })
    }
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Storage(format!("write-ahead log: {what}"))
}

fn checksum(seq: u64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&seq.to_le_bytes());
    h.update(payload);
    h.finalize()
}

/// The log file, written only by the writer thread.
pub(crate) struct Wal {
    file: File,
    magic: &'static [u8; 4],
    /// Where the next record goes.
    pos: u64,
    /// Bytes of the file that exist (zeroes or records).
    allocated: u64,
    /// Most bytes the file may hold; a batch that does not fit is checkpointed instead.
    capacity: u64,
    /// The seq the next record carries.
    next_seq: u64,
    /// Where the last record written starts, until the log starts over.
    /// The seq of the first record since the last checkpoint.
    round_start: u64,
    sync: bool,
    faults: Option<FaultPlan>,
    /// Zeroes being written past `allocated` on another thread: where they
    /// will end. Nothing else writes there until it is joined.
    growing: Option<std::thread::JoinHandle<std::io::Result<u64>>>,
}

/// What recovery found in the log.
pub(crate) struct Recovered {
    /// Each whole record after the last checkpoint, in order, with its seq.
    pub(crate) records: Vec<(u64, Vec<u8>)>,
    /// Where a damaged record (right magic, wrong checksum or cut short) ends the log.
    pub(crate) torn_at: Option<u64>,
}

impl Wal {
    /// Opens (creating) the log and reads the records that follow checkpoint
    /// `checkpointed`. They stay in the log (the next checkpoint covers them);
    /// new records follow them.
    #[cfg(test)]
    pub(crate) fn open(
        path: &Path,
        capacity: u64,
        sync: bool,
        checkpointed: u64,
        faults: Option<FaultPlan>,
    ) -> StoreResult<(Wal, Recovered)> {
        Wal::open_format(path, MAGIC, capacity, sync, checkpointed, faults)
    }

    /// [`Wal::open`] for records carrying `magic` (the upgrade reads format 1 this way).
    pub(crate) fn open_format(
        path: &Path,
        magic: &'static [u8; 4],
        capacity: u64,
        sync: bool,
        checkpointed: u64,
        faults: Option<FaultPlan>,
    ) -> StoreResult<(Wal, Recovered)> {
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
        let allocated = file.metadata()?.len();
        let mut records = Vec::new();
        let mut pos = 0u64;
        let mut expected = checkpointed + 1;
        let mut torn_at = None;
        loop {
            match read_record(&file, magic, pos, allocated)? {
                Read::Record(seq, payload, len) if seq == expected => {
                    records.push((seq, payload));
                    pos += len;
                    expected += 1;
                }
                Read::Record(..) | Read::End => break,
                Read::Damaged => {
                    torn_at = Some(pos);
                    break;
                }
            }
        }
        let wal = Wal {
            file,
            magic,
            pos,
            allocated,
            capacity: capacity.max(pos),
            next_seq: expected,
            round_start: checkpointed + 1,
            sync,
            faults,
            growing: None,
        };
        Ok((wal, Recovered { records, torn_at }))
    }

    /// The records written since the last checkpoint, read back from the
    /// file: what a reopened database must replay. Only records that were
    /// written and synced whole count (a failed append never moved `pos`).
    #[cfg(test)]
    pub(crate) fn read_back(&self) -> StoreResult<Vec<(u64, Vec<u8>)>> {
        let mut records = Vec::new();
        let mut at = 0;
        let mut expected = self.round_start;
        while at < self.pos {
            match read_record(&self.file, self.magic, at, self.pos)? {
                Read::Record(seq, payload, len) if seq == expected => {
                    records.push((seq, payload));
                    at += len;
                    expected += 1;
                }
                _ => return Err(corrupt("a record written since the last checkpoint does not read back")),
            }
        }
        Ok(records)
    }

    /// A reader of the records written since the last checkpoint, as they are
    /// now (records appended later are not in it).
    pub(crate) fn records(&self) -> StoreResult<LogRecords> {
        Ok(LogRecords { file: self.file.try_clone()?, magic: self.magic, end: self.pos, first: self.round_start })
    }

    /// The seq of the last record written (what a checkpoint now covers).
    pub(crate) fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }

    /// Whether any record was written since the last checkpoint.
    pub(crate) fn is_empty(&self) -> bool {
        self.pos == 0
    }

    /// Whether a record of `payload_len` bytes fits before the log must be checkpointed.
    pub(crate) fn fits(&self, payload_len: usize) -> bool {
        self.pos + (HEADER + payload_len) as u64 <= self.capacity
    }

    /// Writes one record (synced when the log syncs) and returns its seq. On error the
    /// position does not move: the next record overwrites whatever part was written.
    pub(crate) fn append(&mut self, payload: &[u8]) -> StoreResult<u64> {
        let len = (HEADER + payload.len()) as u64;
        let payload_len = u32::try_from(payload.len()).map_err(|_| corrupt("record too large"))?;
        if self.pos + len > self.capacity {
            return Err(corrupt("record does not fit; checkpoint first"));
        }
        let seq = self.next_seq;
        let mut record = Vec::with_capacity(len as usize);
        record.extend_from_slice(self.magic);
        record.extend_from_slice(&payload_len.to_le_bytes());
        record.extend_from_slice(&seq.to_le_bytes());
        record.extend_from_slice(&checksum(seq, payload).to_le_bytes());
        record.extend_from_slice(payload);
        if let Err(err) = self.write_record(&record) {
            // Whatever part of it landed must not read as a record at the next start (best effort:
            // the callers hear of a failure, and the next record overwrites it anyway).
            if self.pos + 4 <= self.allocated {
                let _ = fault::write_all_at(self.faults.as_ref(), FaultPoint::LogWrite, &self.file, &[0; 4], self.pos);
            }
            return Err(err);
        }
        self.pos += len;
        self.next_seq += 1;
        self.grow_ahead();
        Ok(seq)
    }

    fn write_record(&mut self, record: &[u8]) -> StoreResult<()> {
        self.grow_to(self.pos + record.len() as u64)?;
        fault::write_all_at(self.faults.as_ref(), FaultPoint::LogWrite, &self.file, record, self.pos)?;
        if self.sync {
            fault::sync(self.faults.as_ref(), FaultPoint::LogSync, || self.file.sync_data())?;
        }
        Ok(())
    }

    /// Checks that the log takes a write and a sync where the next record goes
    /// (zeroes there already mean "the log ends here").
    pub(crate) fn probe(&mut self) -> StoreResult<()> {
        if self.pos + 4 > self.allocated {
            self.grow_to(self.pos + 4)?;
        }
        fault::write_all_at(self.faults.as_ref(), FaultPoint::LogWrite, &self.file, &[0; 4], self.pos)?;
        fault::sync(self.faults.as_ref(), FaultPoint::LogSync, || self.file.sync_data())?;
        Ok(())
    }

    /// After a durable checkpoint covering [`Wal::last_seq`]: the log starts over.
    pub(crate) fn reset(&mut self) {
        self.pos = 0;
        self.round_start = self.next_seq;
    }

    /// This file becomes the one records go to, starting over at its
    /// beginning with seq `next_seq` (the other file holds the seqs before).
    fn continue_from(&mut self, next_seq: u64) {
        self.pos = 0;
        self.next_seq = next_seq;
        self.round_start = next_seq;
    }

    /// Makes the file hold at least `end` bytes (zeroes where no record is),
    /// so records never extend it: takes the zeroes written ahead, or writes
    /// (and syncs) them here when those do not reach.
    fn grow_to(&mut self, end: u64) -> StoreResult<()> {
        if end <= self.allocated {
            return Ok(());
        }
        self.join_growth();
        if end <= self.allocated {
            return Ok(());
        }
        let target = end.div_ceil(GROW_STEP).saturating_mul(GROW_STEP).min(self.capacity.max(end));
        zero_fill(&self.file, self.faults.as_ref(), self.allocated, target)?;
        self.allocated = target;
        Ok(())
    }

    /// Waits for the zeroes being written ahead, and takes them when they were
    /// (a failure leaves the file as it was to the writer, which then writes
    /// its own zeroes there and meets the fault itself).
    fn join_growth(&mut self) {
        let Some(growing) = self.growing.take() else {
            return;
        };
        match growing.join() {
            Ok(Ok(end)) => self.allocated = self.allocated.max(end),
            Ok(Err(err)) => tracing::debug!(%err, "the log's zeroes written ahead failed; the writer writes them"),
            Err(_) => tracing::error!("the thread writing the log's zeroes ahead panicked"),
        }
    }

    /// Starts writing the next step of zeroes on a thread of its own when
    /// less than half a step is left. Written on the writer, 4 MiB of zeroes
    /// (copied into the page cache, then synced) stalled every appender for
    /// 10-20 ms, several times a second while a new server's log grew
    /// (bench/RESULTS.md, session 13).
    pub(crate) fn grow_ahead(&mut self) {
        if self.growing.is_some() || self.allocated >= self.capacity || self.allocated - self.pos >= GROW_STEP / 2 {
            return;
        }
        let Ok(file) = self.file.try_clone() else {
            return;
        };
        let (faults, from) = (self.faults.clone(), self.allocated);
        let to = from.saturating_add(GROW_STEP).min(self.capacity);
        let spawned = std::thread::Builder::new()
            .name("attache-log-grow".into())
            .spawn(move || zero_fill(&file, faults.as_ref(), from, to).map(|()| to));
        match spawned {
            Ok(handle) => self.growing = Some(handle),
            Err(err) => tracing::debug!(%err, "cannot start a thread to grow the log; the writer grows it"),
        }
    }
}

impl Drop for Wal {
    /// A log reopened in this process (a store closed and opened again) must
    /// not meet zeroes still being written where it puts records.
    fn drop(&mut self) {
        self.join_growth();
    }
}

/// Writes zeroes over `[from, to)` of `file`, a chunk at a time, each pushed
/// to the disk before the next, then syncs the file (its new size too).
fn zero_fill(file: &File, faults: Option<&FaultPlan>, from: u64, to: u64) -> std::io::Result<()> {
    let zeroes = vec![0u8; ((to - from) as usize).min(ZERO_CHUNK)];
    let mut at = from;
    while at < to {
        let n = (to - at).min(zeroes.len() as u64) as usize;
        fault::write_all_at(faults, FaultPoint::LogWrite, file, &zeroes[..n], at)?;
        write_out(file, at, n);
        at += n as u64;
    }
    fault::sync(faults, FaultPoint::LogSync, || file.sync_all())
}

/// Starts and waits for the write-back of `[at, at + len)` (no sync of
/// metadata: the final `sync_all` does that); best effort.
#[cfg(target_os = "linux")]
fn write_out(file: &File, at: u64, len: usize) {
    use std::os::fd::AsRawFd as _;
    let (Ok(offset), Ok(nbytes)) = (libc::off64_t::try_from(at), libc::off64_t::try_from(len)) else {
        return;
    };
    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WRITE | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    // SAFETY: a valid open descriptor and a range of it; the call only starts and waits for I/O.
    unsafe { libc::sync_file_range(file.as_raw_fd(), offset, nbytes, flags) };
}

#[cfg(not(target_os = "linux"))]
fn write_out(_file: &File, _at: u64, _len: usize) {}

/// The write-ahead log as two files (`streams.wal`, `streams.wal.1`), so a
/// checkpoint can run beside the writer: records go to the *active* file;
/// a checkpoint *seals* it (the other file, already free, becomes active),
/// syncs the segment files on its own thread while appends go on into the
/// new active file, then commits redb durably with `wal_seq` = the sealed
/// file's last seq, which frees the sealed file. The log is never trimmed
/// past what the segment files and redb durably hold.
///
/// Recovery reads each file's run of consecutive records from its start
/// (stale records of an earlier round have smaller seqs and end a run),
/// keeps the records past the checkpoint, and replays them in seq order.
pub(crate) struct Logs {
    files: [Wal; 2],
    active: usize,
    /// The other file holds records up to this seq that no durable commit covers yet.
    sealed: Option<u64>,
}

/// A file's run of records: `(seq, payload, where the record ends)`.
type Run = Vec<(u64, Vec<u8>, u64)>;

/// A damaged log record: the file, and where the record starts.
pub(crate) type LogDamage = (std::path::PathBuf, u64);

/// What recovery found in the two files.
pub(crate) struct LogsRecovered {
    /// Each record past the last checkpoint, in seq order.
    pub(crate) records: Vec<(u64, Vec<u8>)>,
    /// Damaged records (file, offset where the record starts).
    pub(crate) damage: Vec<LogDamage>,
}

impl Logs {
    /// The two files of the log whose first file is `path`.
    pub(crate) fn paths(path: &Path) -> [std::path::PathBuf; 2] {
        let mut second = path.as_os_str().to_owned();
        second.push(".1");
        [path.to_owned(), second.into()]
    }

    /// Opens (creating) both files and reads the records past checkpoint `checkpointed`.
    pub(crate) fn open(
        path: &Path,
        capacity: u64,
        sync: bool,
        checkpointed: u64,
        faults: Option<FaultPlan>,
    ) -> StoreResult<(Logs, LogsRecovered)> {
        let paths = Logs::paths(path);
        let mut created = false;
        let mut scans = Vec::with_capacity(2);
        let mut damage = Vec::new();
        for path in &paths {
            created |= !path.exists();
            let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
            let allocated = file.metadata()?.len();
            let (run, torn_at) = scan(&file, MAGIC, allocated)?;
            // Damage after a run the checkpoint already covers ends a round nobody needs.
            if let Some(at) = torn_at.filter(|_| run.last().is_none_or(|(seq, ..)| *seq > checkpointed)) {
                damage.push((path.clone(), at));
            }
            scans.push((file, allocated, run));
        }
        if created {
            // A new file's name must survive a power loss before records in it count.
            if let Some(dir) = path.parent() {
                fault::sync(faults.as_ref(), FaultPoint::LogSync, || File::open(dir)?.sync_all())?;
            }
        }
        // The files holding records past the checkpoint, oldest first.
        let mut live: Vec<usize> = (0..2).filter(|&i| scans[i].2.iter().any(|(seq, ..)| *seq > checkpointed)).collect();
        live.sort_by_key(|&i| scans[i].2.iter().find(|(seq, ..)| *seq > checkpointed).map(|(seq, ..)| *seq));
        let mut records = Vec::new();
        let mut expected = checkpointed + 1;
        // Per file: (first seq of its run, where its taken records end, last seq taken).
        let mut taken: [Option<(u64, u64, u64)>; 2] = [None, None];
        'files: for &i in &live {
            let first = scans[i].2.first().map_or(0, |(seq, ..)| *seq);
            for (seq, payload, end) in std::mem::take(&mut scans[i].2) {
                if seq <= checkpointed {
                    continue;
                }
                if seq != expected {
                    tracing::warn!(file = %paths[i].display(), seq, expected, "the log's seqs skip; replaying only what precedes the gap");
                    break 'files;
                }
                records.push((seq, payload));
                taken[i] = Some((first, end, seq));
                expected += 1;
            }
        }
        let next_seq = expected;
        let active = match (taken[0], taken[1]) {
            (Some(a), Some(b)) => usize::from(b.2 > a.2),
            (None, Some(_)) => 1,
            _ => 0,
        };
        let other = 1 - active;
        let sealed = taken[other].map(|(_, _, last)| last);
        let [(f0, a0, _), (f1, a1, _)]: [(File, u64, Run); 2] =
            scans.try_into().map_err(|_| corrupt("two log files"))?;
        let mut files = [(f0, a0), (f1, a1)].map(|(file, allocated)| Wal {
            file,
            magic: MAGIC,
            pos: 0,
            allocated,
            capacity,
            next_seq,
            round_start: next_seq,
            sync,
            faults: faults.clone(),
            growing: None,
        });
        for i in 0..2 {
            if let Some((first, end, last)) = taken[i] {
                let f = &mut files[i];
                f.pos = end;
                f.capacity = capacity.max(end);
                f.round_start = first;
                f.next_seq = last + 1;
            }
        }
        files[active].next_seq = next_seq;
        files[active].grow_ahead();
        Ok((Logs { files, active, sealed }, LogsRecovered { records, damage }))
    }

    fn active(&self) -> &Wal {
        &self.files[self.active]
    }

    fn active_mut(&mut self) -> &mut Wal {
        &mut self.files[self.active]
    }

    /// The seq of the last record written.
    pub(crate) fn last_seq(&self) -> u64 {
        self.active().last_seq()
    }

    /// Nothing was written since the last checkpoint.
    pub(crate) fn is_empty(&self) -> bool {
        self.active().is_empty() && self.sealed.is_none()
    }

    /// The active file is more than half full (a checkpoint should start before it fills).
    pub(crate) fn half_full(&self) -> bool {
        let f = self.active();
        f.pos.saturating_mul(2) > f.capacity
    }

    /// Whether a record of `payload_len` bytes fits in the active file.
    pub(crate) fn fits(&self, payload_len: usize) -> bool {
        self.active().fits(payload_len)
    }

    /// The last seq of the sealed file, which a checkpoint must cover before it is free.
    pub(crate) fn sealed(&self) -> Option<u64> {
        self.sealed
    }

    /// Seals the active file (when it holds records and the other file is
    /// free); records go to the other file from now on. Returns the seq a
    /// checkpoint must cover to free the sealed file.
    pub(crate) fn rotate(&mut self) -> Option<u64> {
        if self.sealed.is_some() || self.active().is_empty() {
            return None;
        }
        let last = self.last_seq();
        let next = self.active().next_seq;
        self.active = 1 - self.active;
        self.active_mut().continue_from(next);
        self.active_mut().grow_ahead();
        self.sealed = Some(last);
        Some(last)
    }

    /// A durable commit covers every seq up to `upto`: a sealed file holding no later seq is free.
    pub(crate) fn trim(&mut self, upto: u64) {
        if self.sealed.is_some_and(|s| s <= upto) {
            self.sealed = None;
            let other = 1 - self.active;
            self.files[other].reset();
        }
    }

    /// A durable commit covers [`Logs::last_seq`]: both files start over.
    pub(crate) fn reset(&mut self) {
        self.sealed = None;
        let other = 1 - self.active;
        self.files[other].reset();
        self.active_mut().reset();
    }

    pub(crate) fn append(&mut self, payload: &[u8]) -> StoreResult<u64> {
        self.active_mut().append(payload)
    }

    pub(crate) fn probe(&mut self) -> StoreResult<()> {
        self.active_mut().probe()
    }

    /// The sealed file's records (what the checkpoint in progress applies to redb).
    pub(crate) fn sealed_records(&self) -> StoreResult<Option<LogRecords>> {
        match self.sealed {
            Some(_) => Ok(Some(self.files[1 - self.active].records()?)),
            None => Ok(None),
        }
    }

    /// Every record no durable commit covers, in seq order (sealed file first), one at a time.
    pub(crate) fn for_each_unapplied(&self, f: &mut dyn FnMut(&[u8]) -> StoreResult<()>) -> StoreResult<()> {
        if let Some(sealed) = self.sealed_records()? {
            sealed.for_each(f)?;
        }
        self.active().records()?.for_each(f)
    }

    /// Every record no durable commit covers, in seq order (sealed file first).
    #[cfg(test)]
    pub(crate) fn read_back(&self) -> StoreResult<Vec<(u64, Vec<u8>)>> {
        let mut records = Vec::new();
        if self.sealed.is_some() {
            records.extend(self.files[1 - self.active].read_back()?);
        }
        records.extend(self.active().read_back()?);
        Ok(records)
    }
}

/// The records of one log file from its start up to where it stood when
/// the reader was made, read one at a time (on the checkpoint thread too,
/// while the writer appends to the other file).
pub(crate) struct LogRecords {
    file: File,
    magic: &'static [u8; 4],
    end: u64,
    first: u64,
}

impl LogRecords {
    /// Calls `f` with each record's payload, in seq order.
    pub(crate) fn for_each(&self, f: &mut dyn FnMut(&[u8]) -> StoreResult<()>) -> StoreResult<()> {
        let mut at = 0;
        let mut expected = self.first;
        while at < self.end {
            match read_record(&self.file, self.magic, at, self.end)? {
                Read::Record(seq, payload, len) if seq == expected => {
                    f(&payload)?;
                    at += len;
                    expected += 1;
                }
                _ => return Err(corrupt("a record written since the last checkpoint does not read back")),
            }
        }
        Ok(())
    }
}

/// A file's run of consecutive records from its start (whatever seq it
/// starts at), each with where it ends, and where a damaged record ends it.
fn scan(file: &File, magic: &[u8; 4], allocated: u64) -> StoreResult<(Run, Option<u64>)> {
    let mut run: Run = Vec::new();
    let mut pos = 0u64;
    loop {
        match read_record(file, magic, pos, allocated)? {
            Read::Record(seq, payload, len) if run.last().is_none_or(|(last, ..)| seq == last + 1) => {
                pos += len;
                run.push((seq, payload, pos));
            }
            Read::Record(..) | Read::End => return Ok((run, None)),
            Read::Damaged => return Ok((run, Some(pos))),
        }
    }
}

/// What the log holds at a position.
enum Read {
    /// `(seq, payload, its length on disk)`.
    Record(u64, Vec<u8>, u64),
    /// Zeroes, the end of the file, or no record at all: the log ends here.
    End,
    /// A record's magic, but its checksum fails or it runs past the end of the file.
    Damaged,
}

/// The record at `pos`.
fn read_record(file: &File, magic: &[u8; 4], pos: u64, file_len: u64) -> StoreResult<Read> {
    if pos + 4 <= file_len && pos + HEADER as u64 > file_len {
        let mut head = [0u8; 4];
        file.read_exact_at(&mut head, pos)?;
        return Ok(if &head == magic { Read::Damaged } else { Read::End });
    }
    if pos + HEADER as u64 > file_len {
        return Ok(Read::End);
    }
    let mut header = [0u8; HEADER];
    file.read_exact_at(&mut header, pos)?;
    if &header[0..4] != magic {
        return Ok(Read::End);
    }
    let field = |at: usize, n: usize| &header[at..at + n];
    let payload_len = u32::from_le_bytes(field(4, 4).try_into().unwrap_or([0; 4])) as u64;
    let seq = u64::from_le_bytes(field(8, 8).try_into().unwrap_or([0; 8]));
    let crc = u32::from_le_bytes(field(16, 4).try_into().unwrap_or([0; 4]));
    let end = pos + HEADER as u64 + payload_len;
    if end > file_len {
        return Ok(Read::Damaged);
    }
    let mut payload = vec![0u8; payload_len as usize];
    file.read_exact_at(&mut payload, pos + HEADER as u64)?;
    if checksum(seq, &payload) != crc {
        return Ok(Read::Damaged);
    }
    Ok(Read::Record(seq, payload, end - pos))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample_ops() -> Vec<Op<'static>> {
        vec![
            Op::StreamPut { id: 7, meta: b"{\"path\":\"/a\"}" },
            Op::ChunkPut { id: 7, pos: 0, row: b"\x01hello" },
            Op::SegWrite { id: 7, at: 3, bytes: b"\"x\"," },
            Op::MarkPut { id: 7, pos: 3, flags: 1 },
            Op::StreamDrop { id: 7 },
            Op::StreamTail { id: 7, tail: 1 << 40 },
            Op::ProducerPut { id: 7, producer: "p-1", epoch: 2, last_seq: 9 },
            Op::CounterPut { name: "next_stream_id", value: 8 },
            Op::BlobRefPut { sha256: "ab", count: 2 },
            Op::BlobRefRemove { sha256: "ab" },
            Op::ProducersClear { id: 7 },
            Op::ChunksClear { id: 7 },
            Op::StreamRemove { id: 7 },
        ]
    }

    fn payload(ops: &[Op]) -> Vec<u8> {
        let mut out = Vec::new();
        for op in ops {
            op.encode(&mut out);
        }
        out
    }

    #[test]
    fn a_segment_write_started_by_its_header_decodes_as_one() {
        let mut out = Vec::new();
        let from = Op::seg_write_header(&mut out, 3, 9, 4);
        out.extend_from_slice(b"1,2,");
        assert_eq!(&out[from..], b"1,2,");
        assert_eq!(Op::decode_all(&out).unwrap(), vec![Op::SegWrite { id: 3, at: 9, bytes: b"1,2," }]);
    }

    #[test]
    fn every_op_decodes_to_what_was_encoded() {
        let ops = sample_ops();
        let bytes = payload(&ops);
        assert_eq!(Op::decode_all(&bytes).unwrap(), ops);
    }

    #[test]
    fn records_after_the_checkpoint_are_recovered_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal");
        let (mut wal, rec) = Wal::open(&path, 1 << 20, true, 0, None).unwrap();
        assert!(rec.records.is_empty());
        for i in 0..5u8 {
            assert_eq!(wal.append(&[i; 10]).unwrap(), u64::from(i) + 1);
        }
        drop(wal);
        let (wal, rec) = Wal::open(&path, 1 << 20, true, 2, None).unwrap();
        // Checkpoint 2 covers seqs 1 and 2; the log itself starts at seq 1, so nothing follows it.
        assert!(rec.records.is_empty());
        assert_eq!(wal.last_seq(), 2);
        let (_, rec) = Wal::open(&path, 1 << 20, true, 0, None).unwrap();
        let seqs: Vec<u64> = rec.records.iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs, vec![1, 2, 3, 4, 5]);
        assert_eq!(rec.records[3].1, vec![3u8; 10]);
    }

    #[test]
    fn stale_records_of_an_earlier_round_end_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal");
        let (mut wal, _) = Wal::open(&path, 1 << 20, true, 0, None).unwrap();
        for _ in 0..4 {
            wal.append(&[1; 100]).unwrap();
        }
        // Checkpoint at seq 4, then one new (shorter) record at the start.
        wal.reset();
        wal.append(&[2; 10]).unwrap();
        drop(wal);
        let (wal, rec) = Wal::open(&path, 1 << 20, true, 4, None).unwrap();
        assert_eq!(rec.records, vec![(5, vec![2u8; 10])]);
        assert_eq!(wal.last_seq(), 5);
    }

    #[test]
    fn a_torn_record_ends_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal");
        let (mut wal, _) = Wal::open(&path, 1 << 20, true, 0, None).unwrap();
        wal.append(&[1; 50]).unwrap();
        wal.append(&[2; 50]).unwrap();
        drop(wal);
        // Damage one byte of the second record's payload.
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&[9], (HEADER + 50 + HEADER + 3) as u64).unwrap();
        let (_, rec) = Wal::open(&path, 1 << 20, true, 0, None).unwrap();
        assert_eq!(rec.records.len(), 1);
        assert_eq!(rec.torn_at, Some((HEADER + 50) as u64), "the damage is reported where it starts");
    }

    #[test]
    fn a_record_cut_short_by_the_end_of_the_file_is_reported_as_damage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal");
        let (mut wal, _) = Wal::open(&path, 1 << 20, true, 0, None).unwrap();
        wal.append(&[1; 50]).unwrap();
        wal.append(&[2; 50]).unwrap();
        drop(wal);
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len((HEADER + 50 + HEADER + 10) as u64).unwrap();
        let (_, rec) = Wal::open(&path, 1 << 20, true, 0, None).unwrap();
        assert_eq!(rec.records.len(), 1);
        assert_eq!(rec.torn_at, Some((HEADER + 50) as u64));
    }

    #[test]
    fn the_log_grows_ahead_of_its_records_on_another_thread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal");
        let plan = FaultPlan::new();
        let (mut wal, _) = Wal::open(&path, 64 << 20, true, 0, Some(plan.clone())).unwrap();
        // The first record waits for its room (nothing was written ahead yet).
        wal.append(&[1; 50]).unwrap();
        assert_eq!(wal.allocated, GROW_STEP);
        // Less than half a step left: the next step is being written ahead.
        let record = vec![2u8; (GROW_STEP / 2) as usize];
        wal.append(&record).unwrap();
        let growing = wal.growing.take().expect("zeroes are written ahead");
        assert_eq!(growing.join().unwrap().unwrap(), 2 * GROW_STEP);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 2 * GROW_STEP, "synced by that thread, not the writer");
        wal.allocated = 2 * GROW_STEP;
        let syncs = plan.calls(FaultPoint::LogSync);
        wal.append(&record).unwrap();
        assert_eq!(
            plan.calls(FaultPoint::LogSync),
            syncs + 1,
            "a record that fits in the room written ahead syncs only itself"
        );
        drop(wal);
        let (_, rec) = Wal::open(&path, 64 << 20, true, 0, None).unwrap();
        assert_eq!((rec.records.len(), rec.torn_at), (3, None), "the zeroes past the records read as the end");
    }

    #[test]
    fn zeroes_ahead_that_fail_are_written_by_the_writer_when_it_needs_them() {
        let dir = tempfile::tempdir().unwrap();
        let plan = FaultPlan::new();
        let (mut wal, _) = Wal::open(&dir.path().join("wal"), 64 << 20, true, 0, Some(plan.clone())).unwrap();
        wal.append(&[1; 50]).unwrap();
        // The record's write is the next call; the thread writing zeroes ahead makes the one after.
        plan.fail_nth(FaultPoint::LogWrite, 2, crate::fault::Fault::NoSpace);
        let record = vec![2u8; (GROW_STEP / 2) as usize];
        wal.append(&record).unwrap();
        wal.join_growth();
        assert_eq!(plan.injected(FaultPoint::LogWrite), 1, "the zeroes ahead met the fault");
        assert_eq!(wal.allocated, GROW_STEP, "and were not taken");
        wal.append(&record).unwrap();
        assert!(wal.allocated >= 2 * GROW_STEP, "the writer wrote its own");
        drop(wal);
        let (_, rec) = Wal::open(&dir.path().join("wal"), 64 << 20, true, 0, None).unwrap();
        assert_eq!((rec.records.len(), rec.torn_at), (3, None));
    }

    #[test]
    fn a_log_that_ends_in_zeroes_has_no_damage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal");
        let (mut wal, _) = Wal::open(&path, 1 << 20, true, 0, None).unwrap();
        wal.append(&[1; 50]).unwrap();
        drop(wal);
        let (_, rec) = Wal::open(&path, 1 << 20, true, 0, None).unwrap();
        assert_eq!((rec.records.len(), rec.torn_at), (1, None));
    }

    #[test]
    fn a_full_log_refuses_the_record_and_moves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(&dir.path().join("wal"), 100, false, 0, None).unwrap();
        assert!(wal.fits(50));
        assert!(!wal.fits(81));
        assert!(wal.append(&[0; 81]).is_err());
        assert!(wal.is_empty());
        wal.append(&[0; 80]).unwrap();
        assert!(!wal.is_empty());
    }

    fn seqs(records: &[(u64, Vec<u8>)]) -> Vec<u64> {
        records.iter().map(|(s, _)| *s).collect()
    }

    #[test]
    fn records_in_both_files_are_recovered_in_seq_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("streams.wal");
        let (mut logs, rec) = Logs::open(&path, 1 << 20, true, 0, None).unwrap();
        assert!(rec.records.is_empty());
        for i in 0..3u8 {
            logs.append(&[i; 10]).unwrap();
        }
        assert_eq!(logs.rotate(), Some(3), "the first file is sealed at seq 3");
        assert_eq!(logs.rotate(), None, "no second seal while the first is not checkpointed");
        logs.append(&[3; 10]).unwrap();
        logs.append(&[4; 10]).unwrap();
        assert_eq!(seqs(&logs.read_back().unwrap()), vec![1, 2, 3, 4, 5]);
        drop(logs);
        // A crash before the checkpoint: both files are replayed, the sealed one first.
        let (logs, rec) = Logs::open(&path, 1 << 20, true, 0, None).unwrap();
        assert_eq!(seqs(&rec.records), vec![1, 2, 3, 4, 5]);
        assert_eq!(rec.records[3].1, vec![3u8; 10]);
        assert_eq!((logs.last_seq(), logs.sealed()), (5, Some(3)));
        drop(logs);
        // A crash after the checkpoint covering the sealed file: only the active file's records.
        let (mut logs, rec) = Logs::open(&path, 1 << 20, true, 3, None).unwrap();
        assert_eq!(seqs(&rec.records), vec![4, 5]);
        assert_eq!(logs.sealed(), None);
        assert_eq!(logs.append(&[5; 10]).unwrap(), 6);
    }

    #[test]
    fn a_freed_file_is_reused_and_its_stale_records_never_come_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("streams.wal");
        let (mut logs, _) = Logs::open(&path, 1 << 20, true, 0, None).unwrap();
        for _ in 0..4 {
            logs.append(&[1; 100]).unwrap();
        }
        assert_eq!(logs.rotate(), Some(4));
        logs.append(&[2; 10]).unwrap();
        logs.trim(4);
        assert_eq!(logs.sealed(), None);
        assert_eq!(logs.rotate(), Some(5), "the second file is sealed; the first, free, takes records again");
        assert_eq!(logs.append(&[3; 10]).unwrap(), 6);
        drop(logs);
        // Checkpoint 4 is durable: seq 5 (second file) and 6 (first file, before its stale records).
        let (mut logs, rec) = Logs::open(&path, 1 << 20, true, 4, None).unwrap();
        assert_eq!(rec.records, vec![(5, vec![2u8; 10]), (6, vec![3u8; 10])]);
        assert!(rec.damage.is_empty());
        assert_eq!(logs.sealed(), Some(5));
        assert_eq!(logs.append(&[4; 10]).unwrap(), 7, "records go on in the file that held the last one");
        logs.reset();
        assert!(logs.is_empty());
    }

    #[test]
    fn a_data_dir_with_one_log_file_opens_with_its_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("streams.wal");
        let (mut wal, _) = Wal::open(&path, 1 << 20, true, 0, None).unwrap();
        wal.append(&[1; 10]).unwrap();
        wal.append(&[2; 10]).unwrap();
        drop(wal);
        let (mut logs, rec) = Logs::open(&path, 1 << 20, true, 1, None).unwrap();
        assert_eq!(rec.records, vec![(2, vec![2u8; 10])]);
        assert_eq!(logs.append(&[3; 10]).unwrap(), 3);
        assert!(Logs::paths(&path)[1].exists());
    }

    #[test]
    fn a_torn_record_in_the_second_file_is_reported_there() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("streams.wal");
        let (mut logs, _) = Logs::open(&path, 1 << 20, true, 0, None).unwrap();
        logs.append(&[1; 50]).unwrap();
        logs.rotate();
        logs.append(&[2; 50]).unwrap();
        logs.append(&[3; 50]).unwrap();
        drop(logs);
        let second = &Logs::paths(&path)[1];
        let file = std::fs::OpenOptions::new().write(true).open(second).unwrap();
        file.write_all_at(&[9], (HEADER + 50 + HEADER + 3) as u64).unwrap();
        let (_, rec) = Logs::open(&path, 1 << 20, true, 0, None).unwrap();
        assert_eq!(seqs(&rec.records), vec![1, 2]);
        assert_eq!(rec.damage, vec![(second.clone(), (HEADER + 50) as u64)]);
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Op::decode_all(&bytes);
        }

        #[test]
        fn a_truncated_payload_decodes_to_an_error_or_a_prefix_of_its_ops(cut in 0usize..200) {
            let ops = sample_ops();
            let bytes = payload(&ops);
            let cut = cut.min(bytes.len());
            if let Ok(decoded) = Op::decode_all(&bytes[..cut]) {
                prop_assert_eq!(&ops[..decoded.len()], &decoded[..]);
                prop_assert!(cut == bytes.len() || decoded.len() < ops.len());
            }
        }
    }
}

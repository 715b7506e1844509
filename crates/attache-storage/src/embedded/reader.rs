//! Reads: committed bytes only, as byte ranges of segment files stitched
//! across fork lineage, into one buffer that is the response body.

use std::mem::MaybeUninit;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use redb::ReadableDatabase;

use super::marks::{first_in, last_in, Both, MarkIndex, PendingIndex, Runs, MARK_RUNS};
use super::Shared;
use crate::error::{StoreError, StoreResult};
use crate::model::{BlobRef, ReadBatch, ReadFrom, StreamInfo};
use attache_core::Offset;

pub(crate) use crate::rules::Segment;

/// Which streams serve `[lo, hi)` of `info`: its sources below each fork point,
/// itself above.
pub(crate) fn segments(shared: &Shared, info: &StreamInfo, lo: u64, hi: u64) -> StoreResult<Vec<Segment>> {
    crate::rules::segments(info, lo, hi, &mut |id| stream(shared, id))
}

fn stream(shared: &Shared, id: u64) -> StoreResult<StreamInfo> {
    shared
        .index
        .read()
        .by_id
        .get(&id)
        .map(|e| (*e.info()).clone())
        .ok_or_else(|| StoreError::Storage(format!("fork source {id} is missing")))
}

/// The first position of a stream's own bytes in its segment file (a fork's divergence point).
pub(crate) fn base(info: &StreamInfo) -> u64 {
    info.fork.as_ref().map_or(0, |f| f.offset)
}

/// One pread: `[lo, hi)` of stream `id`, whose file starts at position `base`.
struct Range {
    id: u64,
    base: u64,
    lo: u64,
    hi: u64,
}

pub(crate) fn read(shared: &Shared, info: &StreamInfo, from: ReadFrom, max_bytes: usize) -> StoreResult<ReadBatch> {
    let tail = info.tail;
    let start = crate::rules::read_start(from, tail)?;
    if let Some(blob) = &info.blob {
        return read_blob(shared, info, blob, start, max_bytes);
    }
    let json = info.is_json();
    let (ranges, next) = if start >= tail {
        (Vec::new(), start)
    } else if !json {
        plan(shared, info, start, max_bytes, None)?
    } else {
        // Boundaries are in redb or in memory; a checkpoint moving them from
        // one to the other while this looked makes it look again (`marks.rs`).
        loop {
            let generation = shared.marks_gen.load(Ordering::Acquire);
            let db = shared.db()?;
            let txn = db.begin_read()?;
            let runs = Runs(txn.open_table(MARK_RUNS)?);
            let both = Both(&runs, &PendingIndex(shared));
            let planned = plan(shared, info, start, max_bytes, Some(&both))?;
            if shared.marks_gen.load(Ordering::Acquire) == generation {
                break planned;
            }
        }
    };
    let body = fill(shared, &ranges, json)?;
    Ok(ReadBatch::new(info.clone(), Offset(start), Offset(next), body, json))
}

/// The byte ranges a read of `info` from `start` takes (whole messages only
/// when `marks` is given: JSON), and where the next read starts.
fn plan(
    shared: &Shared,
    info: &StreamInfo,
    start: u64,
    max_bytes: usize,
    marks: Option<&dyn MarkIndex>,
) -> StoreResult<(Vec<Range>, u64)> {
    let tail = info.tail;
    let mut ranges = Vec::new();
    let mut next = start;
    let segs = segments(shared, info, start, tail)?;
    let mut room = max_bytes as u64;
    for seg in segs {
        let owner_base = if seg.id == info.id { base(info) } else { base(&stream(shared, seg.id)?) };
        let (lo, hi) = match marks {
            None => {
                // Binary: any byte range.
                if room == 0 {
                    break;
                }
                (seg.lo, seg.hi.min(seg.lo.saturating_add(room)))
            }
            Some(ix) => {
                // JSON: whole messages only. A start inside a message moves to the next one.
                let lo = first_in(ix, seg.id, seg.lo, seg.hi)?.unwrap_or(seg.hi);
                if lo >= seg.hi {
                    next = seg.hi;
                    continue;
                }
                let limit = lo.saturating_add(room);
                let hi = if limit >= seg.hi {
                    seg.hi
                } else {
                    // The last message start at or before the limit ends the range; a read
                    // always carries at least one message.
                    match last_in(ix, seg.id, lo + 1, limit)? {
                        Some(end) => end,
                        None if ranges.is_empty() => first_in(ix, seg.id, lo + 1, seg.hi)?.unwrap_or(seg.hi),
                        None => break,
                    }
                };
                (lo, hi)
            }
        };
        if hi > lo {
            ranges.push(Range { id: seg.id, base: owner_base, lo, hi });
            room = room.saturating_sub(hi - lo);
        }
        next = hi;
        if hi < seg.hi {
            break;
        }
    }
    Ok((ranges, next))
}

/// Most bytes a read fills on the async worker that asked for it. A larger
/// read is copied on a blocking thread even when its bytes are in the page
/// cache, so its copy runs beside the worker's socket writes instead of
/// before them: on this 2-core machine, 1 MiB reads copied on the worker ran
/// at a third of the rate of the same reads on the blocking pool, at the same
/// CPU per read (docs/ARCHITECTURE.md).
pub(crate) const INLINE_READ_MAX: u64 = 256 << 10;

/// A read that needs neither the index nor the disk, answered where it is
/// asked (an async worker): binary byte ranges, and JSON reads that start at
/// the first message of a segment file and take all of it (`offset=-1` of a
/// stream that fits one read), at most [`INLINE_READ_MAX`] bytes, filled only
/// from open files whose bytes are in the page cache. `None` whenever
/// anything else would be needed; the blocking path (`read`) then answers,
/// with the same result.
pub(crate) fn read_cached(shared: &Shared, info: &StreamInfo, start: u64, max_bytes: usize) -> Option<ReadBatch> {
    let tail = info.tail;
    if info.blob.is_some() || start >= tail {
        return None;
    }
    let json = info.is_json();
    let mut ranges = Vec::new();
    let mut next = start;
    let mut room = max_bytes as u64;
    for seg in segments(shared, info, start, tail).ok()? {
        let owner_base = if seg.id == info.id { base(info) } else { base(&stream(shared, seg.id).ok()?) };
        let (lo, hi) = if json {
            // Only a segment's first position is a message start known without the index,
            // and only a range that takes the segment whole needs no index for its end.
            if seg.lo != owner_base || seg.lo.saturating_add(room) < seg.hi {
                return None;
            }
            (seg.lo, seg.hi)
        } else {
            if room == 0 {
                break;
            }
            (seg.lo, seg.hi.min(seg.lo.saturating_add(room)))
        };
        if hi > lo {
            ranges.push(Range { id: seg.id, base: owner_base, lo, hi });
            room = room.saturating_sub(hi - lo);
        }
        next = hi;
        if hi < seg.hi {
            break;
        }
    }
    if ranges.iter().map(|r| r.hi - r.lo).sum::<u64>() > INLINE_READ_MAX {
        return None;
    }
    let body = fill_with(&ranges, json, |r, buf| shared.segments.read_cached(r.id, r.lo - r.base, buf).then_some(()))?;
    Some(ReadBatch::new(info.clone(), Offset(start), Offset(next), body, json))
}

/// Smallest read left in its file ([`file_body`]): below it a copy costs
/// little, and the page-cache check and the extra system calls of sending
/// from a file are a larger share of the read.
pub(crate) const FILE_BODY_MIN: u64 = 64 << 10;

/// A read answered as a range of one segment file, decided on the asking
/// async worker without any I/O: the read is one range of the stream's own
/// file (not of a fork's source), at least `min` bytes, the file is open
/// and every byte of the range is in the page cache (so sending it never
/// waits for the disk). Binary: any range. JSON: only a read that starts at
/// the file's first message and takes the file whole (no index needed); the
/// body is `[`, the range without its last `,`, then `]`. Returns the file,
/// its offset and length in the file, the framing, and where the next read
/// starts; `None` whenever anything else holds, and the read is copied as
/// [`read`] does it (the same bytes).
pub(crate) fn file_body(
    shared: &Shared,
    info: &StreamInfo,
    start: u64,
    max_bytes: usize,
    min: u64,
) -> Option<FileRange> {
    let tail = info.tail;
    let base = base(info);
    if info.blob.is_some() || start >= tail || start < base {
        return None;
    }
    let room = max_bytes as u64;
    let (hi, framing): (u64, (&'static [u8], &'static [u8])) = if info.is_json() {
        // Whole file only: its first position is a message start, its end a message end.
        if start != base || start.saturating_add(room) < tail {
            return None;
        }
        (tail, (b"[", b"]"))
    } else {
        (tail.min(start.saturating_add(room)), (b"", b""))
    };
    let len = hi - start;
    if len < min.max(1) {
        return None;
    }
    let file = shared.segments.open_file(info.id)?;
    let at = start - base;
    if !super::segments::resident(&file, at, len) {
        return None;
    }
    // JSON: the range's last byte is the `,` that ends its last message; `]` replaces it.
    let file_len = if info.is_json() { len - 1 } else { len };
    Some(FileRange { file, at, len: file_len, framing, next: hi })
}

/// What [`file_body`] found.
pub(crate) struct FileRange {
    pub(crate) file: std::sync::Arc<std::fs::File>,
    pub(crate) at: u64,
    pub(crate) len: u64,
    pub(crate) framing: (&'static [u8], &'static [u8]),
    pub(crate) next: u64,
}

/// One buffer holding every range: for JSON, `[` first and the last `,` turned into `]`.
fn fill(shared: &Shared, ranges: &[Range], json: bool) -> StoreResult<Bytes> {
    let mut failed = None;
    let body = fill_with(ranges, json, |r, buf| match shared.segments.read(r.id, r.lo - r.base, buf) {
        Ok(()) => Some(()),
        Err(err) => {
            failed = Some(err);
            None
        }
    });
    match (body, failed) {
        (Some(body), _) => Ok(body),
        (None, Some(err)) => Err(err),
        (None, None) => Err(StoreError::Storage("a segment read failed".into())),
    }
}

/// [`fill`] with the reads done by `read` (`None`: give up).
fn fill_with(
    ranges: &[Range],
    json: bool,
    mut read: impl FnMut(&Range, &mut [MaybeUninit<u8>]) -> Option<()>,
) -> Option<Bytes> {
    let len: u64 = ranges.iter().map(|r| r.hi - r.lo).sum();
    let extra = usize::from(json);
    let total = len as usize + extra;
    // Not zeroed first: every byte is written below (a 1 MiB read spent a
    // tenth of its time zeroing the buffer the file then overwrote).
    let mut buf: Vec<u8> = Vec::with_capacity(total + extra);
    let spare = &mut buf.spare_capacity_mut()[..total];
    let mut at = extra;
    for r in ranges {
        let n = (r.hi - r.lo) as usize;
        read(r, &mut spare[at..at + n])?;
        at += n;
    }
    if json {
        spare[0].write(b'[');
    }
    // SAFETY: `read` filled every byte of `[extra, total)` (it returns `None`
    // otherwise, and the buffer is dropped unread), and `[0, extra)` was just written.
    unsafe { buf.set_len(total) };
    if json {
        match buf.last_mut() {
            Some(last) if len > 0 => *last = b']',
            _ => buf.push(b']'),
        }
    }
    Some(Bytes::from(buf))
}

/// A blob-backed stream reads straight from its file.
fn read_blob(
    shared: &Shared,
    info: &StreamInfo,
    blob: &BlobRef,
    start: u64,
    max_bytes: usize,
) -> StoreResult<ReadBatch> {
    use std::os::unix::fs::FileExt;
    let end = blob.len.min(start.saturating_add(max_bytes as u64));
    let mut body = Bytes::new();
    if end > start {
        let file = std::fs::File::open(shared.blobs.path(&blob.sha256))?;
        let mut buf = vec![0u8; (end - start) as usize];
        file.read_exact_at(&mut buf, start)?;
        body = Bytes::from(buf);
    }
    Ok(ReadBatch::new(info.clone(), Offset(start), Offset(end), body, false))
}

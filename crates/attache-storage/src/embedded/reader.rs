//! Reads: committed bytes only, as byte ranges of segment files stitched
//! across fork lineage, into one buffer that is the response body.

use bytes::Bytes;
use redb::{ReadableDatabase, ReadableTable};

use super::{Shared, MARKS};
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
    let mut ranges = Vec::new();
    let mut next = start;
    if start < tail {
        let segs = segments(shared, info, start, tail)?;
        let mut room = max_bytes as u64;
        let db = if json { Some(shared.db()?) } else { None };
        let txn = db.as_ref().map(|db| db.begin_read()).transpose()?;
        let marks = txn.as_ref().map(|t| t.open_table(MARKS)).transpose()?;
        for seg in segs {
            let owner_base = if seg.id == info.id { base(info) } else { base(&stream(shared, seg.id)?) };
            let (lo, hi) = match &marks {
                None => {
                    // Binary: any byte range.
                    if room == 0 {
                        break;
                    }
                    (seg.lo, seg.hi.min(seg.lo.saturating_add(room)))
                }
                Some(marks) => {
                    // JSON: whole messages only. A start inside a message moves to the next one.
                    let lo = match marks.get((seg.id, seg.lo))? {
                        Some(_) => seg.lo,
                        None => marks
                            .range((seg.id, seg.lo)..(seg.id, seg.hi))?
                            .next()
                            .transpose()?
                            .map_or(seg.hi, |(k, _)| k.value().1),
                    };
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
                        let last = marks.range((seg.id, lo + 1)..=(seg.id, limit))?.next_back().transpose()?;
                        match last.map(|(k, _)| k.value().1) {
                            Some(end) => end,
                            None if ranges.is_empty() => {
                                let after = marks.range((seg.id, lo + 1)..(seg.id, seg.hi))?.next().transpose()?;
                                after.map_or(seg.hi, |(k, _)| k.value().1)
                            }
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
    }
    let body = fill(shared, &ranges, json)?;
    Ok(ReadBatch { info: info.clone(), start: Offset(start), next: Offset(next), body, json })
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
    Some(ReadBatch { info: info.clone(), start: Offset(start), next: Offset(next), body, json })
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
fn fill_with(ranges: &[Range], json: bool, mut read: impl FnMut(&Range, &mut [u8]) -> Option<()>) -> Option<Bytes> {
    let len: u64 = ranges.iter().map(|r| r.hi - r.lo).sum();
    let extra = usize::from(json);
    let mut buf = vec![0u8; len as usize + extra];
    let mut at = extra;
    for r in ranges {
        let n = (r.hi - r.lo) as usize;
        read(r, &mut buf[at..at + n])?;
        at += n;
    }
    if json {
        buf[0] = b'[';
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
    Ok(ReadBatch { info: info.clone(), start: Offset(start), next: Offset(end), body, json: false })
}

/// The marks of stream `id` in `[lo, hi)`, each with its end (the next mark,
/// or `end` for the last): `(start, end, flags)`.
pub(crate) fn marks_between<T: ReadableTable<(u64, u64), u8>>(
    marks: &T,
    id: u64,
    lo: u64,
    hi: u64,
    end: u64,
) -> StoreResult<Vec<(u64, u64, u8)>> {
    let mut out: Vec<(u64, u64, u8)> = Vec::new();
    for row in marks.range((id, lo)..(id, hi))? {
        let (k, v) = row?;
        let pos = k.value().1;
        if let Some(last) = out.last_mut() {
            last.1 = pos;
        }
        out.push((pos, end, v.value()));
    }
    if let Some(last) = out.last_mut() {
        if let Some(row) = marks.range((id, hi)..(id, u64::MAX))?.next() {
            last.1 = row?.0.value().1;
        }
    }
    Ok(out)
}

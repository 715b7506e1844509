//! Reads: committed rows only, stitched across fork lineage, bounded in size.

use bytes::Bytes;
use redb::ReadableDatabase;

use super::{Shared, CHUNKS};
use crate::error::{StoreError, StoreResult};
use crate::model::{BlobRef, ReadBatch, ReadFrom, StreamInfo};
use attache_core::Offset;

pub(crate) use crate::rules::Segment;

/// Which streams serve `[lo, hi)` of `info`: its sources below each fork point,
/// itself above.
pub(crate) fn segments(shared: &Shared, info: &StreamInfo, lo: u64, hi: u64) -> StoreResult<Vec<Segment>> {
    crate::rules::segments(info, lo, hi, &mut |id| {
        shared
            .index
            .read()
            .by_id
            .get(&id)
            .map(|e| (*e.info()).clone())
            .ok_or_else(|| StoreError::Storage(format!("fork source {id} is missing")))
    })
}

pub(crate) fn read(shared: &Shared, info: &StreamInfo, from: ReadFrom, max_bytes: usize) -> StoreResult<ReadBatch> {
    let tail = info.tail;
    let start = match from {
        ReadFrom::Start => 0,
        ReadFrom::Tail => tail,
        ReadFrom::At(Offset(o)) => o,
    };
    if start > tail {
        return Err(StoreError::Invalid("offset is beyond the end of the stream".into()));
    }
    if let Some(blob) = &info.blob {
        return read_blob(shared, info, blob, start, max_bytes);
    }
    let json = info.is_json();
    let mut chunks = Vec::new();
    let mut pos = start;
    if start < tail {
        let txn = shared.db.begin_read()?;
        let table = txn.open_table(CHUNKS)?;
        let mut bytes = 0usize;
        'segments: for seg in segments(shared, info, start, tail)? {
            if json {
                for row in table.range((seg.id, seg.lo)..(seg.id, seg.hi))? {
                    let (key, value) = row?;
                    let msg = &value.value()[1..];
                    if !chunks.is_empty() && bytes + msg.len() > max_bytes {
                        break 'segments;
                    }
                    bytes += msg.len();
                    chunks.push(Bytes::copy_from_slice(msg));
                    pos = key.value().1 + msg.len() as u64 + 1;
                }
            } else {
                // The row holding `lo` may start before it (a fork point or offset inside a row).
                let mut first = seg.lo;
                if let Some(row) = table.range((seg.id, 0)..=(seg.id, seg.lo))?.next_back() {
                    let (key, value) = row?;
                    let row_start = key.value().1;
                    if row_start + (value.value().len() as u64 - 1) > seg.lo {
                        first = row_start;
                    }
                }
                for row in table.range((seg.id, first)..(seg.id, seg.hi))? {
                    let (key, value) = row?;
                    let row_start = key.value().1;
                    let data = &value.value()[1..];
                    let row_end = row_start + data.len() as u64;
                    let a = (seg.lo.max(row_start) - row_start) as usize;
                    let b = (seg.hi.min(row_end) - row_start) as usize;
                    if a >= b {
                        continue;
                    }
                    let room = max_bytes.saturating_sub(bytes);
                    if room == 0 {
                        break 'segments;
                    }
                    let take = (b - a).min(room);
                    chunks.push(Bytes::copy_from_slice(&data[a..a + take]));
                    bytes += take;
                    pos = row_start + (a + take) as u64;
                    if take < b - a {
                        break 'segments;
                    }
                }
            }
            pos = seg.hi;
        }
    }
    Ok(ReadBatch { info: info.clone(), start: Offset(start), next: Offset(pos), chunks, json })
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
    let mut chunks = Vec::new();
    if end > start {
        let file = std::fs::File::open(shared.blobs.path(&blob.sha256))?;
        let mut buf = vec![0u8; (end - start) as usize];
        file.read_exact_at(&mut buf, start)?;
        chunks.push(Bytes::from(buf));
    }
    Ok(ReadBatch { info: info.clone(), start: Offset(start), next: Offset(end), chunks, json: false })
}

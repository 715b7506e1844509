//! Reads: committed rows only, stitched across fork lineage, bounded in size.

use bytes::Bytes;
use redb::ReadableDatabase;

use super::{Shared, CHUNKS};
use crate::error::{StoreError, StoreResult};
use crate::model::{BlobRef, ReadBatch, ReadFrom, StreamInfo};
use crate::rules::{Page, Room};
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
    let start = crate::rules::read_start(from, tail)?;
    if let Some(blob) = &info.blob {
        return read_blob(shared, info, blob, start, max_bytes);
    }
    let json = info.is_json();
    let mut page = Page::new(json, max_bytes, start);
    if start < tail {
        let db = shared.db()?;
        let txn = db.begin_read()?;
        let table = txn.open_table(CHUNKS)?;
        'segments: for seg in segments(shared, info, start, tail)? {
            // A binary row holding `lo` may start before it (a fork point or an offset inside a row).
            let mut first = seg.lo;
            if !json {
                if let Some(row) = table.range((seg.id, 0)..=(seg.id, seg.lo))?.next_back() {
                    let (key, value) = row?;
                    let row_start = key.value().1;
                    if row_start + (value.value().len() as u64 - 1) > seg.lo {
                        first = row_start;
                    }
                }
            }
            for row in table.range((seg.id, first)..(seg.id, seg.hi))? {
                let (key, value) = row?;
                if page.push(key.value().1, &value.value()[1..], seg.lo, seg.hi) == Room::Full {
                    break 'segments;
                }
            }
            page.finish_segment(seg.hi);
        }
    }
    let (next, chunks) = (page.pos, page.chunks);
    Ok(ReadBatch { info: info.clone(), start: Offset(start), next: Offset(next), chunks, json })
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

//! Reads: the stream's committed row first (so a read here sees what another
//! instance committed before it), then its rows, stitched across fork
//! lineage and bounded in size, as the embedded reader does.

use std::collections::HashMap;
use std::sync::Arc;

use attache_core::Offset;
use bytes::Bytes;
use sqlx::PgConnection;

use super::{db_err, decode_info, stream_row, Shared, StreamEntry, STREAM_COLUMNS};
use crate::error::{StoreError, StoreResult};
use crate::model::{BlobRef, ReadBatch, ReadFrom, StreamInfo};
use crate::rules::{self, Page, Room, Segment};

/// Rows fetched per query while filling a read.
const PAGE_ROWS: i64 = 512;

/// Which streams serve `[lo, hi)` of `info`. Fork lineage never changes once
/// created, so sources come from `known`, this instance's index, or the database.
pub(crate) async fn segments(
    shared: &Shared,
    conn: &mut PgConnection,
    info: &StreamInfo,
    lo: u64,
    hi: u64,
    known: &mut HashMap<u64, StreamInfo>,
) -> StoreResult<Vec<Segment>> {
    // Gather the lineage first (async), then let the shared rule cut it.
    let mut next = info.fork.as_ref().map(|f| f.source_id);
    let mut depth = 0;
    while let Some(id) = next {
        depth += 1;
        if depth > 64 {
            break;
        }
        if let std::collections::hash_map::Entry::Vacant(slot) = known.entry(id) {
            let cached = shared.index.read().by_id.get(&id).map(|e| (*e.info()).clone());
            let source = match cached {
                Some(info) => info,
                None => {
                    let row: Option<(String,)> = sqlx::query_as("SELECT info FROM attache_streams WHERE id = $1")
                        .bind(id as i64)
                        .fetch_optional(&mut *conn)
                        .await
                        .map_err(db_err)?;
                    let (json,) = row.ok_or_else(|| StoreError::Storage(format!("fork source {id} is missing")))?;
                    decode_info(&json)?
                }
            };
            slot.insert(source);
        }
        next = known[&id].fork.as_ref().map(|f| f.source_id);
    }
    rules::segments(info, lo, hi, &mut |id| {
        known.get(&id).cloned().ok_or_else(|| StoreError::Storage(format!("fork source {id} is missing")))
    })
}

/// The stream's committed row as the database has it now, put in this
/// instance's cache when it is newer than what the cache holds (notifications
/// from other instances arrive a moment after their commits).
async fn committed(shared: &Arc<Shared>, conn: &mut PgConnection, entry: &StreamEntry) -> StoreResult<StreamInfo> {
    let id = entry.info().id;
    let row: Option<(i64, String, i64, i64)> =
        sqlx::query_as(&format!("SELECT {STREAM_COLUMNS} FROM attache_streams WHERE id = $1"))
            .bind(id as i64)
            .fetch_optional(&mut *conn)
            .await
            .map_err(db_err)?;
    let Some(row) = row else {
        shared.forget(id);
        return Err(StoreError::NotFound);
    };
    let row = stream_row(row)?;
    let version = row.version;
    let info = if version > entry.version() { shared.apply(row).info() } else { entry.info() };
    if info.soft_deleted {
        return Err(StoreError::Gone);
    }
    Ok((*info).clone())
}

/// [`committed`], on a connection of its own: `StreamStore::head_fresh`.
pub(crate) async fn head_fresh(shared: Arc<Shared>, entry: Arc<StreamEntry>) -> StoreResult<StreamInfo> {
    let mut conn = shared.pool.acquire().await.map_err(db_err)?;
    committed(&shared, &mut conn, &entry).await
}

pub(crate) async fn read(
    shared: Arc<Shared>,
    entry: Arc<StreamEntry>,
    from: ReadFrom,
    max_bytes: usize,
) -> StoreResult<ReadBatch> {
    let mut conn = shared.pool.acquire().await.map_err(db_err)?;
    let info = committed(&shared, &mut conn, &entry).await?;
    let tail = info.tail;
    let start = crate::rules::read_start(from, tail)?;
    if let Some(blob) = &info.blob {
        let blob = blob.clone();
        drop(conn);
        return read_blob(&shared, info, &blob, start, max_bytes).await;
    }
    let json = info.is_json();
    let mut page = Page::new(json, max_bytes, start);
    if start < tail {
        let mut known = HashMap::new();
        let segs = segments(&shared, &mut conn, &info, start, tail, &mut known).await?;
        'segments: for seg in segs {
            // The row holding `lo` may start before it (a fork point or offset inside a row).
            let mut cursor = if json {
                seg.lo as i64
            } else {
                let row: Option<(i64,)> = sqlx::query_as(
                    "SELECT pos FROM attache_chunks WHERE stream_id = $1 AND pos <= $2 ORDER BY pos DESC LIMIT 1",
                )
                .bind(seg.id as i64)
                .bind(seg.lo as i64)
                .fetch_optional(&mut *conn)
                .await
                .map_err(db_err)?;
                row.map(|r| r.0).unwrap_or(seg.lo as i64)
            };
            loop {
                // Sizes first, then only the rows that can fit: a row may be megabytes.
                let sizes: Vec<(i64, i32)> = sqlx::query_as(
                    "SELECT pos, length(data) FROM attache_chunks WHERE stream_id = $1 AND pos >= $2 AND pos < $3 \
                     ORDER BY pos LIMIT $4",
                )
                .bind(seg.id as i64)
                .bind(cursor)
                .bind(seg.hi as i64)
                .bind(PAGE_ROWS)
                .fetch_all(&mut *conn)
                .await
                .map_err(db_err)?;
                let last_page = (sizes.len() as i64) < PAGE_ROWS;
                let Some(&(first, _)) = sizes.first() else { break };
                let room = page.room();
                let mut budget = 0usize;
                let mut upto = first;
                for (p, len) in &sizes {
                    upto = *p;
                    budget += *len as usize;
                    if budget >= room {
                        break;
                    }
                }
                let rows: Vec<(i64, Vec<u8>)> = sqlx::query_as(
                    "SELECT pos, data FROM attache_chunks WHERE stream_id = $1 AND pos >= $2 AND pos <= $3 \
                     ORDER BY pos",
                )
                .bind(seg.id as i64)
                .bind(first)
                .bind(upto)
                .fetch_all(&mut *conn)
                .await
                .map_err(db_err)?;
                let last_page = last_page && upto == sizes.last().map(|s| s.0).unwrap_or(upto);
                for (row_start, data) in rows {
                    cursor = row_start + 1;
                    if page.push(row_start as u64, &data, seg.lo, seg.hi) == Room::Full {
                        break 'segments;
                    }
                }
                if last_page {
                    break;
                }
            }
            page.finish_segment(seg.hi);
        }
    }
    Ok(ReadBatch::from_pieces(info, Offset(start), Offset(page.pos), json, &page.chunks))
}

/// A blob-backed stream reads the bytes asked for (at most `max_bytes`, so
/// gathering them is bounded) from the blob store: cache or ranged fetch.
async fn read_blob(
    shared: &Shared,
    info: StreamInfo,
    blob: &BlobRef,
    start: u64,
    max_bytes: usize,
) -> StoreResult<ReadBatch> {
    use futures::TryStreamExt;
    let end = blob.len.min(start.saturating_add(max_bytes as u64));
    let mut chunks = Vec::new();
    if end > start {
        let read = shared.blobs.read(&blob.sha256, start..end).await?;
        chunks = read.body.try_collect().await?;
        let got: u64 = chunks.iter().map(|c: &Bytes| c.len() as u64).sum();
        if got != end - start {
            return Err(StoreError::Storage(format!(
                "blob {} holds {got} bytes at {start}, its stream says {}",
                blob.sha256,
                end - start
            )));
        }
    }
    Ok(ReadBatch::from_pieces(info, Offset(start), Offset(end), false, &chunks))
}

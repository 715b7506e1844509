//! The stream engine's decisions, shared by every backend.
//!
//! Each backend owns how it locks, reads and writes; what an append, a create
//! or a fork *means* lives here once, as functions of committed metadata and
//! the request. A backend calls them inside its write transaction, in the same
//! order as the embedded writer: check everything first, then write, so a
//! domain error leaves nothing behind.
//!
//! Why one file of this size: about 550 lines are the rules; the rest is their
//! unit tests, kept beside them so both backends' shared decisions are tested
//! in one place.

use attache_core::json::{split_messages, JsonBodyUse};
use attache_core::{ContentType, Offset, ProducerCheck, ProducerState, Ttl};
use bytes::Bytes;

use crate::error::{StoreError, StoreResult};
use crate::model::*;

/// An append whose body was split and checked before it reached the writer,
/// so the writer spends its time committing, not parsing.
pub(crate) struct PreparedAppend {
    pub(crate) req: AppendRequest,
    /// The stream it was prepared for: a stream re-created meanwhile is another stream.
    pub(crate) stream_id: u64,
    pub(crate) rows: Vec<Bytes>,
    pub(crate) json: bool,
}

impl PreparedAppend {
    pub(crate) fn prepare(req: AppendRequest, info: &StreamInfo) -> StoreResult<PreparedAppend> {
        if req.body.is_empty() && !req.close {
            return Err(StoreError::Invalid("an append needs a body (or Stream-Closed: true to close)".into()));
        }
        let json = info.is_json();
        let mut rows = Vec::new();
        if !req.body.is_empty() {
            let type_matches = req.content_type.as_ref().is_some_and(|ct| ct.matches_raw(&info.content_type));
            if json && type_matches && !info.closed {
                match &req.messages {
                    Some(messages) if !messages.is_empty() => rows.extend(messages.iter().cloned()),
                    _ => {
                        for msg in split_messages(&req.body, JsonBodyUse::Append)? {
                            rows.push(req.body.slice_ref(msg));
                        }
                    }
                }
            } else {
                rows.push(req.body.clone());
            }
        }
        Ok(PreparedAppend { req, stream_id: info.id, rows, json })
    }
}

/// The row a blob stream is created with (`StreamStore::create_blob_stream_and_append`):
/// written to another stream, and never a retry (no producer, a body).
pub(crate) fn check_blob_row(req: &CreateStream, row: &AppendRequest) -> StoreResult<()> {
    if row.path == req.path.as_str() {
        return Err(StoreError::Invalid("a blob stream's row goes to another stream".into()));
    }
    if row.producer.is_some() || row.body.is_empty() {
        return Err(StoreError::Invalid("a blob stream's row has a body and no producer".into()));
    }
    Ok(())
}

/// The two appends of `StreamStore::append_in_order_with`: never retries
/// (no producer), to two different streams.
pub(crate) fn check_paired_appends(req: &AppendRequest, then: &AppendRequest) -> StoreResult<()> {
    if req.producer.is_some() || then.producer.is_some() {
        return Err(StoreError::Invalid("appends committed together carry no producer".into()));
    }
    if req.path == then.path {
        return Err(StoreError::Invalid("appends committed together go to two different streams".into()));
    }
    Ok(())
}

/// The error of a write refused after the checks before it said it would go
/// (the second half of a both-or-neither command): a storage error stays
/// itself (it fails the whole batch), anything else becomes one, since half
/// of the command may already be written.
pub(crate) fn checked_then_refused(e: StoreError, what: &str) -> StoreError {
    if e.fails_batch() {
        e
    } else {
        StoreError::Storage(format!("{what} checked before was refused after: {e}"))
    }
}

/// The row of a conditional write (`StreamStore::append_guarded`): never a
/// retry (no producer), and not to the stream it may delete.
pub(crate) fn check_conditional_row(row: &AppendRequest, bytes: Option<&StreamAt>) -> StoreResult<()> {
    if row.producer.is_some() || row.body.is_empty() {
        return Err(StoreError::Invalid("a conditional row has a body and no producer".into()));
    }
    if bytes.is_some_and(|at| at.path == row.path) {
        return Err(StoreError::Invalid("a conditional row goes to another stream than the one it deletes".into()));
    }
    Ok(())
}

/// Do the conditions of a conditional write hold? `last` is where the
/// newest guarded append of the guard's key to the row's stream began (if
/// the backend knows one); `live` the live stream at `bytes.path` (none when
/// absent, soft-deleted or expired), as of the writer's commit.
pub(crate) fn check_conditions(
    last: Option<u64>,
    guard: &RowGuard,
    bytes: Option<&StreamAt>,
    live: Option<u64>,
) -> StoreResult<()> {
    if last.is_some_and(|pos| pos >= guard.since.0) || bytes.is_some_and(|at| at.id != live) {
        return Err(StoreError::Moved);
    }
    Ok(())
}

/// What to do with an append, decided against the stream's committed state.
pub(crate) enum AppendDecision {
    /// Nothing to write: answer with this (a retry, or a close of a closed stream).
    Answer(Box<AppendOutcome>),
    /// Write the rows, then store `producer_next` (if any) and call [`finish_append`].
    Write { producer_next: Option<ProducerState> },
}

/// Checks an append against the stream it targets. `producer` is the stored
/// state of the request's producer (if the request names one).
pub(crate) fn decide_append(
    info: &StreamInfo,
    req: &AppendRequest,
    producer: Option<ProducerState>,
) -> StoreResult<AppendDecision> {
    if info.soft_deleted {
        return Err(StoreError::Gone);
    }
    if info.closed {
        if let Some(pr) = &req.producer {
            if info.closed_by.as_ref() == Some(&(pr.id.clone(), pr.epoch, pr.seq)) {
                return Ok(AppendDecision::Answer(Box::new(AppendOutcome {
                    info: info.clone(),
                    producer,
                    duplicate: true,
                })));
            }
        }
        if req.body.is_empty() && req.close {
            return Ok(AppendDecision::Answer(Box::new(AppendOutcome {
                info: info.clone(),
                producer: None,
                duplicate: true,
            })));
        }
        return Err(StoreError::Closed { next: Offset(info.tail) });
    }
    if !req.body.is_empty() {
        match &req.content_type {
            None => return Err(StoreError::MissingContentType),
            Some(ct) if !ct.matches_raw(&info.content_type) => {
                return Err(StoreError::ContentTypeMismatch {
                    expected: info.content_type.to_string(),
                    got: ct.as_str().to_owned(),
                })
            }
            Some(_) => {}
        }
    }
    let mut producer_next = None;
    if let Some(pr) = &req.producer {
        match ProducerCheck::decide(producer, pr) {
            ProducerCheck::Accept { next } => producer_next = Some(next),
            ProducerCheck::Duplicate { state } => {
                return Ok(AppendDecision::Answer(Box::new(AppendOutcome {
                    info: info.clone(),
                    producer: Some(state),
                    duplicate: true,
                })))
            }
            ProducerCheck::StaleEpoch { current } => return Err(StoreError::StaleEpoch { current }),
            ProducerCheck::EpochMustStartAtZero => return Err(StoreError::EpochMustStartAtZero),
            ProducerCheck::Gap { expected, received } => return Err(StoreError::ProducerGap { expected, received }),
        }
    }
    if let (Some(seq), Some(last)) = (&req.seq, &info.last_seq) {
        if seq.as_bytes() <= last.as_bytes() {
            return Err(StoreError::SeqRegression { last: last.clone(), got: seq.clone() });
        }
    }
    Ok(AppendDecision::Write { producer_next })
}

/// Whether an accepted append changes nothing of a stream's metadata but
/// its tail: [`finish_append`] leaves it as it is.
pub(crate) fn append_moves_only_tail(req: &AppendRequest) -> bool {
    !req.close && req.seq.is_none()
}

/// The metadata changes an accepted append makes besides moving the tail.
pub(crate) fn finish_append(info: &mut StreamInfo, req: &AppendRequest) {
    if req.close {
        info.closed = true;
        info.closed_by = req.producer.as_ref().map(|pr| (pr.id.clone(), pr.epoch, pr.seq));
    }
    if let Some(seq) = &req.seq {
        info.last_seq = Some(seq.clone());
    }
}

/// Where each row of an append lands, starting at `tail`, and whether it ends
/// the append; `tail` moves past them. Checked whole first: a stream that would
/// overflow gets nothing.
pub(crate) fn place_rows(tail: &mut u64, rows: &[Bytes], json: bool) -> StoreResult<Vec<(u64, bool)>> {
    let total: u64 = rows.iter().map(|r| r.len() as u64 + u64::from(json)).sum();
    if tail.saturating_add(total) > Offset::MAX {
        return Err(StoreError::Invalid("the stream is full: positions are exhausted".into()));
    }
    let mut out = Vec::with_capacity(rows.len());
    for (i, row) in rows.iter().enumerate() {
        out.push((*tail, i + 1 == rows.len()));
        *tail += row.len() as u64 + u64::from(json);
    }
    Ok(out)
}

/// The end of a row stored at `start` holding `len` bytes.
pub(crate) fn row_end(start: u64, len: u64, json: bool) -> u64 {
    start + len + u64::from(json)
}

/// What a create does with the stream its path names now.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum AtPath {
    /// It holds the path: confirm it (200) or refuse (409), as [`confirm_existing`] says.
    Holds,
    /// It has expired: delete it, then create.
    Remove,
    /// It is deleted and kept only for its forks, and the create takes its
    /// path: it lives on under its id, unnamed ([`StreamInfo::unlinked`]).
    Unlink,
}

/// A path is a name, a stream's data has an identity: a stream deleted while
/// forks read through it gives up its name to a create that asks for it, and
/// its data stays for the forks until the last one goes.
pub(crate) fn at_path(info: &StreamInfo, expired: bool, req: &CreateStream) -> AtPath {
    if info.soft_deleted {
        if req.take_kept_path {
            AtPath::Unlink
        } else {
            AtPath::Holds
        }
    } else if expired {
        AtPath::Remove
    } else {
        AtPath::Holds
    }
}

/// PUT on an existing path: 200 when the configuration matches, 409 when not.
pub(crate) fn confirm_existing(info: &StreamInfo, req: &CreateStream) -> StoreResult<CreateOutcome> {
    if info.soft_deleted {
        return Err(StoreError::ConfigMismatch("a deleted stream still holds this path for its forks".into()));
    }
    let mismatch = |what: &str| Err(StoreError::ConfigMismatch(format!("{what} differs from the existing stream")));
    let requested_type = req.content_type.clone().unwrap_or_else(|| match &req.fork {
        Some(_) => info.content_type(),
        None => ContentType::octet_stream(),
    });
    if !requested_type.matches_raw(&info.content_type) {
        return mismatch("content type");
    }
    match (&req.fork, &info.fork) {
        (None, None) => {
            if req.ttl.map(|t| t.0) != info.ttl_secs {
                return mismatch("Stream-TTL");
            }
            if req.expires_at.as_ref().map(|e| e.unix_ms) != info.expires_at_ms {
                return mismatch("Stream-Expires-At");
            }
        }
        (Some(spec), Some(fork)) => {
            let same_offset = spec.offset.is_none_or(|o| o.0 == fork.requested_offset);
            if spec.source.as_str() != fork.source_path || !same_offset || spec.sub_offset != fork.requested_sub_offset
            {
                return mismatch("fork source or offset");
            }
            if req.ttl.is_some() && req.ttl.map(|t| t.0) != info.ttl_secs {
                return mismatch("Stream-TTL");
            }
            if req.expires_at.is_some() && req.expires_at.as_ref().map(|e| e.unix_ms) != info.expires_at_ms {
                return mismatch("Stream-Expires-At");
            }
        }
        _ => return mismatch("fork lineage"),
    }
    if req.closed != info.closed {
        return mismatch("closed state");
    }
    Ok(CreateOutcome::Existed(info.clone()))
}

/// A new stream's type, lifetime and (for a fork) where it diverges, before
/// any sub-offset refinement.
pub(crate) struct CreatePlan {
    pub(crate) content_type: ContentType,
    pub(crate) ttl_secs: Option<u64>,
    pub(crate) expires: Option<(String, i64)>,
    /// For a fork: the requested anchor in the source (its tail by default).
    pub(crate) anchor: Option<u64>,
}

/// Checks a create against its fork source (committed, and whether it has expired).
pub(crate) fn plan_create(req: &CreateStream, source: Option<(&StreamInfo, bool)>) -> StoreResult<CreatePlan> {
    let mut ttl_secs = req.ttl.map(|t| t.0);
    let mut expires = req.expires_at.clone().map(|e| (e.raw, e.unix_ms));
    let Some(spec) = &req.fork else {
        let content_type = req.content_type.clone().unwrap_or_else(ContentType::octet_stream);
        return Ok(CreatePlan { content_type, ttl_secs, expires, anchor: None });
    };
    let (src, src_expired) = source.ok_or(StoreError::ForkSourceNotFound)?;
    if src.soft_deleted {
        return Err(StoreError::ForkSourceGone);
    }
    if src_expired {
        return Err(StoreError::ForkSourceNotFound);
    }
    if src.blob.is_some() {
        // Its bytes are a blob file, not rows a fork could read through.
        return Err(StoreError::Invalid("a stream stored as one blob (an attachment's bytes) cannot be forked".into()));
    }
    let src_type = src.content_type();
    if let Some(ct) = &req.content_type {
        if !ct.matches(&src_type) {
            return Err(StoreError::ConfigMismatch(format!(
                "content type {} differs from the source's {}",
                ct.as_str(),
                src_type.as_str()
            )));
        }
    }
    let anchor = spec.offset.map(|o| o.0).unwrap_or(src.tail);
    if anchor > src.tail {
        return Err(StoreError::Invalid("Stream-Fork-Offset is beyond the source's tail".into()));
    }
    if ttl_secs.is_none() && expires.is_none() {
        ttl_secs = src.ttl_secs;
        expires = src.expires_at.clone().zip(src.expires_at_ms);
    }
    Ok(CreatePlan {
        content_type: req.content_type.clone().unwrap_or(src_type),
        ttl_secs,
        expires,
        anchor: Some(anchor),
    })
}

/// A create's initial body as rows (JSON mode splits it into messages).
pub(crate) fn initial_rows(req: &CreateStream, content_type: &ContentType) -> StoreResult<(Vec<Bytes>, bool)> {
    let json = attache_core::stream::is_json_media(content_type.as_str());
    let rows = if json {
        split_messages(&req.initial, JsonBodyUse::Create)?.into_iter().map(|m| req.initial.slice_ref(m)).collect()
    } else if req.initial.is_empty() {
        Vec::new()
    } else {
        vec![req.initial.clone()]
    };
    Ok((rows, json))
}

/// Where a read of a stream whose tail is `tail` starts.
pub(crate) fn read_start(from: ReadFrom, tail: u64) -> StoreResult<u64> {
    let start = match from {
        ReadFrom::Start => 0,
        ReadFrom::Tail => tail,
        ReadFrom::At(Offset(o)) => o,
    };
    if start > tail {
        return Err(StoreError::Invalid("offset is beyond the end of the stream".into()));
    }
    Ok(start)
}

/// The most streams one lineage holds (a fork, its source, that source's
/// source, ...): a read stitches at most this many ([`segments`]).
pub(crate) const MAX_LINEAGE: usize = 64;

/// A fork of a stream whose lineage holds `source_lineage` streams (itself
/// and its sources, counted up to one past [`MAX_LINEAGE`]): refused when the
/// fork's own lineage would pass [`MAX_LINEAGE`], which reads could not
/// stitch (before, such a fork was made and every read of it failed).
pub(crate) fn check_fork_lineage(source_lineage: usize) -> StoreResult<()> {
    if source_lineage >= MAX_LINEAGE {
        return Err(StoreError::Invalid(format!(
            "a fork's lineage holds at most {MAX_LINEAGE} streams (the fork, its source, that source's source, ...); \
             this source's holds {source_lineage}: fork a stream nearer the root of its lineage"
        )));
    }
    Ok(())
}

/// How many streams each principal owns (created): plain streams, entities'
/// main streams and attachments alike, each keeping its metadata in memory
/// whatever it is; the server bounds them per principal
/// (`--max-streams-per-principal`, [`StreamStore::streams_owned_by`](crate::StreamStore::streams_owned_by)).
/// Kept beside each backend's index of committed streams, so it counts what
/// is committed, soft-deleted streams kept for their forks included (they
/// hold memory until their last fork goes).
#[derive(Default)]
pub(crate) struct OwnedStreams(std::collections::HashMap<String, usize>);

impl OwnedStreams {
    fn owner(info: &StreamInfo) -> Option<&str> {
        info.owner.as_deref()
    }

    /// A stream entered the index.
    pub(crate) fn add(&mut self, info: &StreamInfo) {
        if let Some(owner) = Self::owner(info) {
            *self.0.entry(owner.to_owned()).or_default() += 1;
        }
    }

    /// A stream left the index.
    pub(crate) fn remove(&mut self, info: &StreamInfo) {
        if let Some(owner) = Self::owner(info) {
            if let Some(n) = self.0.get_mut(owner) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.0.remove(owner);
                }
            }
        }
    }

    pub(crate) fn held(&self, owner: &str) -> usize {
        self.0.get(owner).copied().unwrap_or(0)
    }
}

/// The lineage of a fork of `src` that diverges at `position` (the requested
/// offset `anchor`, refined by `sub_offset`).
pub(crate) fn fork_info(src: &StreamInfo, position: u64, anchor: u64, sub_offset: u64) -> ForkInfo {
    ForkInfo {
        source_id: src.id,
        source_path: src.path.to_string(),
        offset: position,
        requested_offset: anchor,
        requested_sub_offset: sub_offset,
    }
}

/// Whether a fork of `src` at `anchor` must be checked to start a message:
/// a JSON stream forks only between messages (its tail is always between).
/// A binary stream forks at any byte.
pub(crate) fn fork_needs_message_start(src: &StreamInfo, anchor: u64) -> bool {
    src.is_json() && anchor < src.tail
}

/// Whether a fork at `anchor` + `sub` is at `anchor` itself (no sub-offset);
/// a sub-offset from the tail or past it is refused. Otherwise the backend
/// looks up the append at `anchor`.
pub(crate) fn sub_offset_is_anchor(src: &StreamInfo, anchor: u64, sub: u64) -> StoreResult<bool> {
    if sub == 0 {
        return Ok(true);
    }
    if anchor >= src.tail {
        return Err(sub_offset_overshoot());
    }
    Ok(false)
}

pub(crate) fn sub_offset_overshoot() -> StoreError {
    StoreError::Invalid("Stream-Fork-Sub-Offset is past the end of the append at the fork offset".into())
}

/// A fork point `sub` messages past `anchor`, given the rows from `anchor` on
/// (start, byte length, ends its append) of the stream that holds them.
pub(crate) fn json_sub_offset(
    rows: impl IntoIterator<Item = StoreResult<(u64, u64, bool)>>,
    sub: u64,
) -> StoreResult<u64> {
    let mut taken = 0u64;
    for row in rows {
        let (start, len, ends) = row?;
        taken += 1;
        if taken == sub {
            return Ok(row_end(start, len, true));
        }
        if ends {
            break;
        }
    }
    Err(sub_offset_overshoot())
}

/// A fork point `sub` bytes past `anchor`, given the row that holds `anchor`
/// (start, byte length) and the end of the segment it belongs to.
pub(crate) fn binary_sub_offset(row: Option<(u64, u64)>, segment_end: u64, anchor: u64, sub: u64) -> StoreResult<u64> {
    let (start, len) = row.ok_or_else(sub_offset_overshoot)?;
    let end = (start + len).min(segment_end);
    if end <= anchor || anchor + sub > end {
        return Err(sub_offset_overshoot());
    }
    Ok(anchor + sub)
}

/// A new stream's metadata.
pub(crate) fn new_stream(
    id: u64,
    req: &CreateStream,
    plan: CreatePlan,
    tail: u64,
    fork: Option<ForkInfo>,
) -> StreamInfo {
    StreamInfo {
        ttl_secs: plan.ttl_secs,
        expires_at: plan.expires.as_ref().map(|e| e.0.clone()),
        expires_at_ms: plan.expires.map(|e| e.1),
        tail,
        fork,
        ..fresh_stream(id, req, &plan.content_type)
    }
}

/// What every stream `req` creates starts as, created now: open as asked,
/// empty, and without expiry, fork or blob.
pub(crate) fn fresh_stream(id: u64, req: &CreateStream, content_type: &ContentType) -> StreamInfo {
    StreamInfo {
        id,
        path: req.path.as_str().into(),
        content_type: content_type.as_str().into(),
        ttl_secs: None,
        expires_at: None,
        expires_at_ms: None,
        created_at_ms: chrono::Utc::now().timestamp_millis(),
        closed: req.closed,
        tail: 0,
        fork: None,
        fork_refs: 0,
        soft_deleted: false,
        unlinked: false,
        last_seq: None,
        closed_by: None,
        owner: req.owner.as_deref().map(std::sync::Arc::from),
        blob: None,
    }
}

/// What `link_blob_stream` links to: the blob of `src`, refused when the
/// source is gone, expired or holds no blob. The new stream takes the
/// source's content type unless `req` names one.
pub(crate) fn plan_link(src: &StreamInfo, expired: bool, req: &mut CreateStream) -> StoreResult<BlobRef> {
    if src.soft_deleted {
        return Err(StoreError::Gone);
    }
    if expired {
        return Err(StoreError::NotFound);
    }
    let blob = src.blob.clone().ok_or_else(|| {
        StoreError::Invalid("the source stream holds no blob (only attachment streams can be linked)".into())
    })?;
    if req.content_type.is_none() {
        req.content_type = Some(src.content_type());
    }
    Ok(blob)
}

pub(crate) fn new_blob_stream(id: u64, req: &CreateStream, blob: BlobRef) -> StreamInfo {
    let content_type = req.content_type.clone().unwrap_or_else(ContentType::octet_stream);
    StreamInfo { closed: true, tail: blob.len, blob: Some(blob), ..fresh_stream(id, req, &content_type) }
}

/// Whether a stream has expired, given when it was last used.
pub(crate) fn expired(info: &StreamInfo, last_access_ms: i64, now_ms: i64) -> bool {
    if let Some(at) = info.expires_at_ms {
        return now_ms >= at;
    }
    match info.ttl_secs {
        Some(ttl) => now_ms >= last_access_ms.saturating_add(Ttl(ttl).as_millis()),
        None => false,
    }
}

/// A run of positions `[lo, hi)` served by the rows of stream `id`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Segment {
    pub(crate) id: u64,
    pub(crate) lo: u64,
    pub(crate) hi: u64,
}

/// Which streams serve `[lo, hi)` of `info`: its sources below each fork point,
/// itself above. `source` looks up a stream's committed metadata by id.
pub(crate) fn segments(
    info: &StreamInfo,
    lo: u64,
    hi: u64,
    source: &mut dyn FnMut(u64) -> StoreResult<StreamInfo>,
) -> StoreResult<Vec<Segment>> {
    let mut out = Vec::new();
    let mut upper = Vec::new();
    let mut current = info.clone();
    let mut hi = hi;
    for _ in 0..=MAX_LINEAGE {
        match &current.fork {
            Some(fork) if lo < fork.offset => {
                if hi > fork.offset {
                    upper.push(Segment { id: current.id, lo: fork.offset, hi });
                }
                hi = hi.min(fork.offset);
                current = source(fork.source_id)?;
            }
            _ => {
                out.push(Segment { id: current.id, lo, hi });
                out.extend(upper.into_iter().rev());
                return Ok(out);
            }
        }
    }
    Err(StoreError::Storage(format!("fork chain deeper than {MAX_LINEAGE}")))
}

/// One read's result, assembled row by row by either backend: whole JSON
/// messages, binary rows sliced to the segment, stopping near `max_bytes`
/// (a JSON read always carries at least one message).
pub(crate) struct Page {
    json: bool,
    max_bytes: usize,
    bytes: usize,
    pub(crate) chunks: Vec<bytes::Bytes>,
    /// The position right after what the page holds.
    pub(crate) pos: u64,
}

/// Whether a page can take more rows.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Room {
    More,
    Full,
}

impl Page {
    pub(crate) fn new(json: bool, max_bytes: usize, start: u64) -> Page {
        Page { json, max_bytes, bytes: 0, chunks: Vec::new(), pos: start }
    }

    /// Adds the part of the row at `row_start` that lies in `[lo, hi)`.
    pub(crate) fn push(&mut self, row_start: u64, data: &[u8], lo: u64, hi: u64) -> Room {
        if self.json {
            if !self.chunks.is_empty() && self.bytes + data.len() > self.max_bytes {
                return Room::Full;
            }
            self.bytes += data.len();
            self.pos = row_end(row_start, data.len() as u64, true);
            self.chunks.push(bytes::Bytes::copy_from_slice(data));
            return Room::More;
        }
        let row_end = row_start + data.len() as u64;
        let a = (lo.max(row_start) - row_start) as usize;
        let b = (hi.min(row_end).max(row_start) - row_start) as usize;
        if a >= b {
            return Room::More;
        }
        let room = self.max_bytes.saturating_sub(self.bytes);
        if room == 0 {
            return Room::Full;
        }
        let take = (b - a).min(room);
        self.chunks.push(bytes::Bytes::copy_from_slice(&data[a..a + take]));
        self.bytes += take;
        self.pos = row_start + (a + take) as u64;
        if take < b - a {
            Room::Full
        } else {
            Room::More
        }
    }

    /// Bytes still allowed before the page is full.
    pub(crate) fn room(&self) -> usize {
        self.max_bytes.saturating_sub(self.bytes)
    }

    /// The whole segment ending at `hi` was read.
    pub(crate) fn finish_segment(&mut self, hi: u64) {
        self.pos = hi;
    }
}

/// What both backends' in-memory indexes keep per stream: its committed metadata and last access.
pub(crate) trait CommittedStream {
    fn committed(&self) -> std::sync::Arc<StreamInfo>;
    fn last_access_ms(&self) -> i64;
}

/// `list_prefix` over either backend's index: live streams under `prefix`, in path order.
pub(crate) fn list_prefix<E: CommittedStream>(
    by_path: &std::collections::BTreeMap<std::sync::Arc<str>, std::sync::Arc<E>>,
    prefix: &str,
    limit: usize,
    now_ms: i64,
) -> Vec<StreamInfo> {
    by_path
        .range::<str, _>((std::ops::Bound::Included(prefix), std::ops::Bound::Unbounded))
        .take_while(|(p, _)| p.starts_with(prefix))
        .map(|(_, e)| (e.committed(), e.last_access_ms()))
        .filter(|(info, last)| !info.soft_deleted && !expired(info, *last, now_ms))
        .take(limit)
        .map(|(info, _)| (*info).clone())
        .collect()
}

#[cfg(test)]
mod tests {
    //! The rules both backends share, checked on their own (no store, no I/O):
    //! what an append, a create, a fork and a read position mean.
    use super::*;
    use attache_core::{ProducerHeaders, StreamPath};

    fn stream(content_type: &str) -> StreamInfo {
        let req = CreateStream::for_tests("/s", Some(content_type));
        let plan = plan_create(&req, None).expect("a plain create");
        new_stream(1, &req, plan, 0, None)
    }

    fn append(body: &str, content_type: Option<&str>) -> AppendRequest {
        AppendRequest {
            path: "/s".into(),
            content_type: content_type.map(|c| ContentType::parse(c).expect("a valid type")),
            body: Bytes::copy_from_slice(body.as_bytes()),
            close: false,
            seq: None,
            producer: None,
            messages: None,
        }
    }

    fn with_producer(mut req: AppendRequest, epoch: u64, seq: u64) -> AppendRequest {
        req.producer = Some(ProducerHeaders { id: "p".into(), epoch, seq });
        req
    }

    fn writes(decision: StoreResult<AppendDecision>) -> Option<ProducerState> {
        match decision {
            Ok(AppendDecision::Write { producer_next }) => producer_next,
            Ok(AppendDecision::Answer(_)) => panic!("expected a write, got an answer"),
            Err(err) => panic!("expected a write, got {err}"),
        }
    }

    fn answered_duplicate(decision: StoreResult<AppendDecision>) -> bool {
        matches!(decision, Ok(AppendDecision::Answer(outcome)) if outcome.duplicate)
    }

    #[test]
    fn an_append_to_an_open_stream_of_its_type_is_written() {
        let info = stream("text/plain");
        assert!(writes(decide_append(&info, &append("x", Some("text/plain")), None)).is_none());
    }

    #[test]
    fn an_append_without_or_with_another_content_type_is_refused() {
        let info = stream("text/plain");
        assert!(matches!(decide_append(&info, &append("x", None), None), Err(StoreError::MissingContentType)));
        assert!(matches!(
            decide_append(&info, &append("{}", Some("application/json")), None),
            Err(StoreError::ContentTypeMismatch { .. })
        ));
    }

    #[test]
    fn a_closed_stream_refuses_appends_but_answers_a_repeated_close_and_its_closing_producer() {
        let mut info = stream("text/plain");
        let mut closing = with_producer(append("last", Some("text/plain")), 0, 3);
        closing.close = true;
        finish_append(&mut info, &closing);
        assert!(info.closed);
        assert!(matches!(decide_append(&info, &append("x", Some("text/plain")), None), Err(StoreError::Closed { .. })));
        // The producer that closed it, retrying the same request: the same success.
        assert!(answered_duplicate(decide_append(&info, &closing, Some(ProducerState { epoch: 0, last_seq: 3 }))));
        // A bare close of a closed stream succeeds without writing.
        let mut close = append("", None);
        close.close = true;
        assert!(answered_duplicate(decide_append(&info, &close, None)));
    }

    #[test]
    fn a_soft_deleted_stream_is_gone_for_appends() {
        let mut info = stream("text/plain");
        info.soft_deleted = true;
        assert!(matches!(decide_append(&info, &append("x", Some("text/plain")), None), Err(StoreError::Gone)));
    }

    #[test]
    fn a_stream_kept_for_forks_gives_up_its_path_only_to_a_create_that_takes_it() {
        let mut info = stream("text/plain");
        let mut req = CreateStream::for_tests("/s", Some("text/plain"));
        assert_eq!(at_path(&info, false, &req), AtPath::Holds);
        assert_eq!(at_path(&info, true, &req), AtPath::Remove);
        info.soft_deleted = true;
        assert_eq!(at_path(&info, false, &req), AtPath::Holds, "the protocol's 409");
        assert_eq!(at_path(&info, true, &req), AtPath::Holds, "a kept stream does not expire");
        req.take_kept_path = true;
        assert_eq!(at_path(&info, false, &req), AtPath::Unlink);
        info.soft_deleted = false;
        assert_eq!(at_path(&info, false, &req), AtPath::Holds, "a live stream is never unlinked");
    }

    #[test]
    fn producers_are_accepted_in_order_deduplicated_fenced_and_refused_on_a_gap() {
        let info = stream("text/plain");
        let body = || append("x", Some("text/plain"));
        let first = writes(decide_append(&info, &with_producer(body(), 0, 0), None));
        assert_eq!(first, Some(ProducerState { epoch: 0, last_seq: 0 }));
        let state = first;
        assert_eq!(
            writes(decide_append(&info, &with_producer(body(), 0, 1), state)),
            Some(ProducerState { epoch: 0, last_seq: 1 })
        );
        assert!(answered_duplicate(decide_append(&info, &with_producer(body(), 0, 0), state)));
        assert!(matches!(
            decide_append(&info, &with_producer(body(), 0, 5), state),
            Err(StoreError::ProducerGap { expected: 1, received: 5 })
        ));
        let bumped = Some(ProducerState { epoch: 2, last_seq: 0 });
        assert!(matches!(
            decide_append(&info, &with_producer(body(), 1, 0), bumped),
            Err(StoreError::StaleEpoch { current: 2 })
        ));
        assert!(matches!(
            decide_append(&info, &with_producer(body(), 3, 1), bumped),
            Err(StoreError::EpochMustStartAtZero)
        ));
    }

    #[test]
    fn stream_seq_must_grow_bytewise() {
        let mut info = stream("text/plain");
        let mut req = append("x", Some("text/plain"));
        req.seq = Some("b".into());
        finish_append(&mut info, &req);
        assert_eq!(info.last_seq.as_deref(), Some("b"));
        for stale in ["a", "b"] {
            req.seq = Some(stale.into());
            assert!(matches!(decide_append(&info, &req, None), Err(StoreError::SeqRegression { .. })), "{stale}");
        }
        req.seq = Some("c".into());
        assert!(writes(decide_append(&info, &req, None)).is_none());
    }

    #[test]
    fn json_rows_take_one_position_more_than_their_bytes_and_binary_rows_exactly_theirs() {
        let rows = [Bytes::from_static(b"{}"), Bytes::from_static(b"[1,2]")];
        let mut tail = 10;
        assert_eq!(place_rows(&mut tail, &rows, true).expect("room"), vec![(10, false), (13, true)]);
        assert_eq!(tail, 19);
        assert_eq!(row_end(13, 5, true), 19);
        let mut tail = 10;
        assert_eq!(place_rows(&mut tail, &rows, false).expect("room"), vec![(10, false), (12, true)]);
        assert_eq!(tail, 17);
    }

    #[test]
    fn rows_that_would_exhaust_positions_are_refused_whole() {
        let mut tail = Offset::MAX - 2;
        let rows = [Bytes::from_static(b"a"), Bytes::from_static(b"bcd")];
        assert!(matches!(place_rows(&mut tail, &rows, false), Err(StoreError::Invalid(_))));
        assert_eq!(tail, Offset::MAX - 2, "nothing placed");
    }

    #[test]
    fn a_read_starts_at_the_start_the_tail_or_an_offset_not_past_the_tail() {
        assert_eq!(read_start(ReadFrom::Start, 7).expect("start"), 0);
        assert_eq!(read_start(ReadFrom::Tail, 7).expect("tail"), 7);
        assert_eq!(read_start(ReadFrom::At(Offset(7)), 7).expect("at the tail"), 7);
        assert!(matches!(read_start(ReadFrom::At(Offset(8)), 7), Err(StoreError::Invalid(_))));
    }

    #[test]
    fn recreating_a_stream_matches_only_the_same_configuration() {
        let info = stream("text/plain");
        assert!(matches!(
            confirm_existing(&info, &CreateStream::for_tests("/s", Some("text/plain"))),
            Ok(CreateOutcome::Existed(_))
        ));
        assert!(matches!(
            confirm_existing(&info, &CreateStream::for_tests("/s", Some("application/json"))),
            Err(StoreError::ConfigMismatch(_))
        ));
        let mut ttl = CreateStream::for_tests("/s", Some("text/plain"));
        ttl.ttl = Some(Ttl(60));
        assert!(matches!(confirm_existing(&info, &ttl), Err(StoreError::ConfigMismatch(_))));
        let mut closed = CreateStream::for_tests("/s", Some("text/plain"));
        closed.closed = true;
        assert!(matches!(confirm_existing(&info, &closed), Err(StoreError::ConfigMismatch(_))));
    }

    #[test]
    fn a_stream_stored_as_a_blob_is_not_forked() {
        let mut src = stream("text/plain");
        src.blob = Some(BlobRef { sha256: "0".repeat(64), len: 3 });
        src.tail = 3;
        let mut req = CreateStream::for_tests("/f", None);
        req.fork = Some(ForkSpec { source: StreamPath::new("/s").expect("path"), offset: None, sub_offset: 0 });
        assert!(matches!(plan_create(&req, Some((&src, false))), Err(StoreError::Invalid(_))));
    }

    #[test]
    fn a_fork_inherits_type_and_lifetime_and_may_not_anchor_past_the_source_tail() {
        let mut src = stream("application/json");
        src.tail = 40;
        src.ttl_secs = Some(3600);
        let mut req = CreateStream::for_tests("/f", None);
        req.fork = Some(ForkSpec { source: StreamPath::new("/s").expect("path"), offset: None, sub_offset: 0 });
        let plan = plan_create(&req, Some((&src, false))).expect("a fork of a live source");
        assert_eq!(plan.content_type.as_str(), "application/json");
        assert_eq!(plan.ttl_secs, Some(3600));
        assert_eq!(plan.anchor, Some(40), "the source's tail by default");

        req.fork =
            Some(ForkSpec { source: StreamPath::new("/s").expect("path"), offset: Some(Offset(41)), sub_offset: 0 });
        assert!(matches!(plan_create(&req, Some((&src, false))), Err(StoreError::Invalid(_))));
        assert!(matches!(plan_create(&req, None), Err(StoreError::ForkSourceNotFound)));
        assert!(matches!(plan_create(&req, Some((&src, true))), Err(StoreError::ForkSourceNotFound)));
        src.soft_deleted = true;
        assert!(matches!(plan_create(&req, Some((&src, false))), Err(StoreError::ForkSourceGone)));
    }

    #[test]
    fn a_fork_with_another_content_type_than_its_source_is_refused() {
        let src = stream("application/json");
        let mut req = CreateStream::for_tests("/f", Some("text/plain"));
        req.fork = Some(ForkSpec { source: StreamPath::new("/s").expect("path"), offset: None, sub_offset: 0 });
        assert!(matches!(plan_create(&req, Some((&src, false))), Err(StoreError::ConfigMismatch(_))));
    }

    #[test]
    fn a_json_sub_offset_counts_messages_within_one_append_only() {
        let rows = || vec![Ok((10, 2, false)), Ok((13, 4, true)), Ok((18, 1, true))];
        assert_eq!(json_sub_offset(rows(), 1).expect("first message"), 13);
        assert_eq!(json_sub_offset(rows(), 2).expect("second message"), 18);
        assert!(matches!(json_sub_offset(rows(), 3), Err(StoreError::Invalid(_))), "past the append's end");
    }

    #[test]
    fn a_binary_sub_offset_stays_inside_the_row_at_the_anchor() {
        assert_eq!(binary_sub_offset(Some((10, 8)), 100, 12, 3).expect("inside"), 15);
        assert_eq!(binary_sub_offset(Some((10, 8)), 100, 12, 6).expect("to the row's end"), 18);
        assert!(binary_sub_offset(Some((10, 8)), 100, 12, 7).is_err());
        assert!(binary_sub_offset(Some((10, 8)), 14, 12, 3).is_err(), "the segment ends first");
        assert!(binary_sub_offset(None, 100, 12, 1).is_err());
    }

    #[test]
    fn a_stream_expires_at_its_deadline_or_ttl_after_last_use() {
        let mut info = stream("text/plain");
        assert!(!expired(&info, 0, i64::MAX), "no lifetime: never");
        info.ttl_secs = Some(10);
        assert!(!expired(&info, 1_000, 10_999));
        assert!(expired(&info, 1_000, 11_000));
        info.ttl_secs = Some(u64::MAX);
        assert!(!expired(&info, 1_000, i64::MAX - 1), "saturates instead of overflowing");
        info.expires_at_ms = Some(5_000);
        assert!(expired(&info, 4_999, 5_000), "a fixed deadline wins over the TTL");
    }

    #[test]
    fn a_read_of_a_fork_is_served_by_its_sources_below_each_fork_point() {
        let mut base = stream("text/plain");
        base.tail = 100;
        let mut fork = stream("text/plain");
        fork.id = 2;
        fork.tail = 150;
        fork.fork = Some(fork_info(&base, 60, 60, 0));
        let mut lookup = |id: u64| if id == 1 { Ok(base.clone()) } else { Err(StoreError::NotFound) };
        let segs = segments(&fork, 10, 150, &mut lookup).expect("a two-level lineage");
        let spans: Vec<_> = segs.iter().map(|s| (s.id, s.lo, s.hi)).collect();
        assert_eq!(spans, vec![(1, 10, 60), (2, 60, 150)]);
        let above: Vec<_> =
            segments(&fork, 70, 150, &mut lookup).expect("above").iter().map(|s| (s.id, s.lo, s.hi)).collect();
        assert_eq!(above, vec![(2, 70, 150)]);
    }

    #[test]
    fn a_json_page_holds_whole_messages_and_at_least_one() {
        let mut page = Page::new(true, 4, 0);
        assert_eq!(page.push(0, b"123456", 0, 100), Room::More, "the first message always fits");
        assert_eq!(page.push(7, b"1", 0, 100), Room::Full);
        assert_eq!(page.chunks.len(), 1);
        assert_eq!(page.pos, 7);
    }

    #[test]
    fn a_binary_page_slices_rows_to_the_range_and_stops_at_its_size() {
        let mut page = Page::new(false, 5, 2);
        assert_eq!(page.push(0, b"abcdef", 2, 100), Room::More);
        assert_eq!(page.chunks, vec![Bytes::from_static(b"cdef")]);
        assert_eq!(page.push(6, b"ghij", 2, 100), Room::Full);
        assert_eq!(page.chunks[1], Bytes::from_static(b"g"));
        assert_eq!(page.pos, 7);
        assert_eq!(page.room(), 0);
    }
}

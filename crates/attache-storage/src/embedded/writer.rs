//! The single writer: group commit over redb.
//!
//! It owns the working copy of all metadata and producer state, applies a
//! batch of commands against it inside one write transaction, commits (one
//! sync), and only then publishes to readers and answers callers.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::Instant;

use attache_core::json::{split_messages, JsonBodyUse};
use attache_core::{ContentType, Offset, ProducerCheck, ProducerState};
use bytes::Bytes;
use redb::{Database, Durability, ReadableTable, Table, WriteTransaction};
use tokio::sync::oneshot;

use super::{
    now_ms, Command, EmbeddedConfig, Shared, StreamEntry, BLOB_REFS, CHUNKS, COUNTERS, PRODUCERS, ROW_ENDS_APPEND,
    STREAMS,
};
use crate::error::{StoreError, StoreResult};
use crate::model::*;

/// An append whose body was split and checked before it reached the writer,
/// so the writer thread spends its time committing, not parsing.
pub(crate) struct PreparedAppend {
    req: AppendRequest,
    /// The stream it was prepared for: a stream re-created meanwhile is another stream.
    stream_id: u64,
    rows: Vec<Bytes>,
    json: bool,
}

impl PreparedAppend {
    pub(crate) fn prepare(req: AppendRequest, info: &StreamInfo) -> StoreResult<PreparedAppend> {
        if req.body.is_empty() && !req.close {
            return Err(StoreError::Invalid("an append needs a body (or Stream-Closed: true to close)".into()));
        }
        let json = info.is_json();
        let mut rows = Vec::new();
        if !req.body.is_empty() {
            let type_matches = req.content_type.as_ref().is_some_and(|ct| ct.matches(&info.content_type()));
            if json && type_matches && !info.closed {
                for msg in split_messages(&req.body, JsonBodyUse::Append)? {
                    rows.push(req.body.slice_ref(msg));
                }
            } else {
                rows.push(req.body.clone());
            }
        }
        Ok(PreparedAppend { req, stream_id: info.id, rows, json })
    }
}

/// The writer's working copy of everything mutable.
pub(crate) struct WriterState {
    pub(crate) streams: HashMap<u64, StreamInfo>,
    paths: HashMap<String, u64>,
    producers: HashMap<(u64, String), ProducerState>,
    /// How many streams hold each blob.
    pub(crate) blob_refs: HashMap<String, u64>,
    next_id: u64,
}

impl WriterState {
    pub(crate) fn load(db: &Database) -> StoreResult<WriterState> {
        // Creating the tables up front lets readers open them unconditionally.
        let txn = db.begin_write()?;
        {
            txn.open_table(STREAMS)?;
            txn.open_table(CHUNKS)?;
            txn.open_table(PRODUCERS)?;
            txn.open_table(COUNTERS)?;
            txn.open_table(BLOB_REFS)?;
        }
        txn.commit()?;
        let txn = db.begin_write()?;
        let mut state = WriterState {
            streams: HashMap::new(),
            paths: HashMap::new(),
            producers: HashMap::new(),
            blob_refs: HashMap::new(),
            next_id: 1,
        };
        {
            let streams = txn.open_table(STREAMS)?;
            for row in streams.iter()? {
                let (_, value) = row?;
                let info: StreamInfo = serde_json::from_slice(value.value())
                    .map_err(|e| StoreError::Storage(format!("corrupt stream metadata: {e}")))?;
                if !info.soft_deleted || info.fork_refs > 0 {
                    state.paths.insert(info.path.clone(), info.id);
                }
                state.streams.insert(info.id, info);
            }
            let producers = txn.open_table(PRODUCERS)?;
            for row in producers.iter()? {
                let (key, value) = row?;
                let (id, producer) = key.value();
                let (epoch, last_seq) = value.value();
                state.producers.insert((id, producer.to_owned()), ProducerState { epoch, last_seq });
            }
            let blob_refs = txn.open_table(BLOB_REFS)?;
            for row in blob_refs.iter()? {
                let (key, value) = row?;
                state.blob_refs.insert(key.value().to_owned(), value.value());
            }
            let counters = txn.open_table(COUNTERS)?;
            let next = counters.get("next_stream_id")?.map(|v| v.value());
            if let Some(next) = next {
                state.next_id = next;
            }
        }
        txn.abort()?;
        Ok(state)
    }
}

/// The tables of one write transaction.
struct Tables<'t> {
    streams: Table<'t, u64, &'static [u8]>,
    chunks: Table<'t, (u64, u64), &'static [u8]>,
    producers: Table<'t, (u64, &'static str), (u64, u64)>,
    counters: Table<'t, &'static str, u64>,
    blob_refs: Table<'t, &'static str, u64>,
}

impl<'t> Tables<'t> {
    fn open(txn: &'t WriteTransaction) -> StoreResult<Tables<'t>> {
        Ok(Tables {
            streams: txn.open_table(STREAMS)?,
            chunks: txn.open_table(CHUNKS)?,
            producers: txn.open_table(PRODUCERS)?,
            counters: txn.open_table(COUNTERS)?,
            blob_refs: txn.open_table(BLOB_REFS)?,
        })
    }
}

/// What a batch changed, to publish after the commit.
#[derive(Default)]
struct Changes {
    touched: HashSet<u64>,
    removed: Vec<(u64, String)>,
    /// Blob files no stream holds any more, deleted after the commit.
    unlink: Vec<String>,
}

enum Reply {
    Create(oneshot::Sender<StoreResult<CreateOutcome>>, StoreResult<CreateOutcome>),
    CreateBlob(oneshot::Sender<StoreResult<StreamInfo>>, StoreResult<StreamInfo>),
    Append(oneshot::Sender<StoreResult<AppendOutcome>>, StoreResult<AppendOutcome>),
    Delete(oneshot::Sender<StoreResult<()>>, StoreResult<()>),
}

impl Reply {
    fn send(self) {
        // A caller that went away no longer needs its answer.
        match self {
            Reply::Create(tx, r) => drop(tx.send(r)),
            Reply::CreateBlob(tx, r) => drop(tx.send(r)),
            Reply::Append(tx, r) => drop(tx.send(r)),
            Reply::Delete(tx, r) => drop(tx.send(r)),
        }
    }

    fn fail(self, err: StoreError) {
        match self {
            Reply::Create(tx, _) => drop(tx.send(Err(err))),
            Reply::CreateBlob(tx, _) => drop(tx.send(Err(err))),
            Reply::Append(tx, _) => drop(tx.send(Err(err))),
            Reply::Delete(tx, _) => drop(tx.send(Err(err))),
        }
    }
}

pub(crate) fn run(shared: Arc<Shared>, mut state: WriterState, rx: Receiver<Command>, config: EmbeddedConfig) {
    let mut last_sweep = Instant::now();
    loop {
        let first = match rx.recv_timeout(config.sweep_interval) {
            Ok(cmd) => Some(cmd),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let mut batch: Vec<Command> = first.into_iter().collect();
        while batch.len() < config.max_batch {
            match rx.try_recv() {
                Ok(cmd) => batch.push(cmd),
                Err(_) => break,
            }
        }
        if last_sweep.elapsed() >= config.sweep_interval {
            last_sweep = Instant::now();
            batch.extend(expired_streams(&shared).into_iter().map(Command::Expire));
        }
        if batch.is_empty() {
            continue;
        }
        let count = batch.len();
        if let Err(err) = commit_batch(&shared, &mut state, batch, config.durable) {
            tracing::error!(%err, count, "group commit failed; reloading committed state");
            match WriterState::load(&shared.db) {
                Ok(fresh) => state = fresh,
                Err(err) => {
                    tracing::error!(%err, "cannot reload state after a failed commit; the writer stops");
                    break;
                }
            }
        }
    }
    tracing::debug!("writer stopped");
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

fn commit_batch(shared: &Shared, state: &mut WriterState, batch: Vec<Command>, durable: bool) -> StoreResult<()> {
    let started = Instant::now();
    let size = batch.len();
    let mut txn = shared.db.begin_write()?;
    txn.set_durability(if durable { Durability::Immediate } else { Durability::None })
        .map_err(|e| StoreError::Storage(e.to_string()))?;
    let mut changes = Changes::default();
    let mut replies = Vec::with_capacity(batch.len());
    let outcome = (|| -> StoreResult<()> {
        let mut t = Tables::open(&txn)?;
        for cmd in batch {
            match cmd {
                Command::Create(req, tx) => {
                    let r = state.create(&mut t, &mut changes, shared, req);
                    let r = escalate(r)?;
                    replies.push(Reply::Create(tx, r));
                }
                Command::CreateBlob(req, blob, tx) => {
                    let r = escalate(state.create_blob(&mut t, &mut changes, shared, req, blob))?;
                    replies.push(Reply::CreateBlob(tx, r));
                }
                Command::Append(prepared, tx) => {
                    let r = escalate(state.append(&mut t, &mut changes, prepared))?;
                    replies.push(Reply::Append(tx, r));
                }
                Command::Delete(path, tx) => {
                    let r = escalate(state.delete(&mut t, &mut changes, shared, &path))?;
                    replies.push(Reply::Delete(tx, r));
                }
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
        // Each touched stream's metadata is written once per batch, however many appends it took.
        flush_metadata(&mut t, state, &changes)
    })();
    if let Err(err) = outcome {
        for reply in replies {
            reply.fail(err.clone());
        }
        let _ = txn.abort();
        return Err(err);
    }
    let applied = started.elapsed();
    if let Err(err) = txn.commit() {
        let err = StoreError::from(err);
        for reply in replies {
            reply.fail(err.clone());
        }
        return Err(err);
    }
    for sha in &changes.unlink {
        if let Err(err) = std::fs::remove_file(shared.blobs.path(sha)) {
            // A leftover file is collected at the next start.
            tracing::warn!(%err, sha, "could not delete an unreferenced blob");
        }
    }
    tracing::trace!(
        size,
        apply_us = applied.as_micros() as u64,
        total_us = started.elapsed().as_micros() as u64,
        "group commit"
    );
    publish(shared, state, changes);
    for reply in replies {
        reply.send();
    }
    Ok(())
}

/// Domain errors answer one command; storage errors abort the whole batch.
fn escalate<T>(r: StoreResult<T>) -> StoreResult<StoreResult<T>> {
    match r {
        Err(e @ StoreError::Storage(_)) => Err(e),
        other => Ok(other),
    }
}

/// After the commit: readers see the new metadata, then waiters wake.
fn publish(shared: &Shared, state: &WriterState, changes: Changes) {
    let now = now_ms();
    let mut index = shared.index.write();
    for id in &changes.touched {
        let Some(info) = state.streams.get(id) else {
            continue;
        };
        match index.by_id.get(id) {
            Some(entry) => {
                entry.last_access_ms.store(now, Ordering::Relaxed);
                entry.publish(info.clone());
            }
            None => {
                let entry = StreamEntry::new(info.clone(), now);
                index.by_path.insert(info.path.clone(), entry.clone());
                index.by_id.insert(*id, entry);
            }
        }
    }
    for (id, path) in changes.removed {
        if let Some(entry) = index.by_id.remove(&id) {
            if index.by_path.get(&path).is_some_and(|e| Arc::ptr_eq(e, &entry)) {
                index.by_path.remove(&path);
            }
            entry.removed.store(true, Ordering::Release);
            entry.signal.send_modify(|v| *v = v.wrapping_add(1));
        }
    }
}

fn flush_metadata(t: &mut Tables, state: &WriterState, changes: &Changes) -> StoreResult<()> {
    for id in &changes.touched {
        if let Some(info) = state.streams.get(id) {
            t.streams.insert(*id, encode(info)?.as_slice())?;
        }
    }
    Ok(())
}

fn encode(info: &StreamInfo) -> StoreResult<Vec<u8>> {
    serde_json::to_vec(info).map_err(|e| StoreError::Storage(e.to_string()))
}

fn write_rows(t: &mut Tables, id: u64, tail: &mut u64, rows: &[Bytes], json: bool) -> StoreResult<()> {
    // Check the whole append first: a domain error must leave nothing written.
    let total: u64 = rows.iter().map(|r| r.len() as u64 + u64::from(json)).sum();
    if tail.saturating_add(total) > Offset::MAX {
        return Err(StoreError::Invalid("the stream is full: positions are exhausted".into()));
    }
    let mut buf = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        buf.clear();
        buf.push(if i + 1 == rows.len() { ROW_ENDS_APPEND } else { 0 });
        buf.extend_from_slice(row);
        t.chunks.insert((id, *tail), buf.as_slice())?;
        *tail += row.len() as u64 + u64::from(json);
    }
    Ok(())
}

impl WriterState {
    /// Records new metadata for a stream; it is written once per batch, in `flush_metadata`.
    fn save(&mut self, _t: &mut Tables, changes: &mut Changes, info: StreamInfo) -> StoreResult<()> {
        changes.touched.insert(info.id);
        self.streams.insert(info.id, info);
        Ok(())
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
        let path = req.path.as_str().to_owned();
        if let Some(&id) = self.paths.get(&path) {
            if self.expired(shared, id) && !self.streams[&id].soft_deleted {
                self.remove(t, changes, id)?;
            } else {
                return self.confirm_existing(id, &req);
            }
        }
        let mut tail = 0;
        let mut ttl_secs = req.ttl.map(|t| t.0);
        let mut expires = req.expires_at.clone().map(|e| (e.raw, e.unix_ms));
        let mut fork_info = None;
        let mut fork_source = None;
        let content_type = match &req.fork {
            Some(spec) => {
                let src_id = *self.paths.get(spec.source.as_str()).ok_or(StoreError::ForkSourceNotFound)?;
                let src = self.streams.get(&src_id).cloned().ok_or(StoreError::ForkSourceNotFound)?;
                if src.soft_deleted {
                    return Err(StoreError::ForkSourceGone);
                }
                if self.expired(shared, src_id) {
                    return Err(StoreError::ForkSourceNotFound);
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
                let position = self.resolve_sub_offset(shared, t, &src, anchor, spec.sub_offset)?;
                if ttl_secs.is_none() && expires.is_none() {
                    ttl_secs = src.ttl_secs;
                    expires = src.expires_at.clone().zip(src.expires_at_ms);
                }
                tail = position;
                fork_info = Some(ForkInfo {
                    source_id: src_id,
                    source_path: src.path.clone(),
                    offset: position,
                    requested_offset: anchor,
                    requested_sub_offset: spec.sub_offset,
                });
                fork_source = Some(src);
                req.content_type.clone().unwrap_or(src_type)
            }
            None => req.content_type.clone().unwrap_or_else(ContentType::octet_stream),
        };
        let json = attache_core::stream::is_json_media(content_type.as_str());
        let rows: Vec<Bytes> = if json {
            split_messages(&req.initial, JsonBodyUse::Create)?.into_iter().map(|m| req.initial.slice_ref(m)).collect()
        } else if req.initial.is_empty() {
            Vec::new()
        } else {
            vec![req.initial.clone()]
        };
        // Everything is valid: only now does the source learn of its new fork.
        if let Some(mut src) = fork_source {
            src.fork_refs += 1;
            self.save(t, changes, src)?;
        }
        let id = self.next_id;
        self.next_id += 1;
        t.counters.insert("next_stream_id", self.next_id)?;
        write_rows(t, id, &mut tail, &rows, json)?;
        let info = StreamInfo {
            id,
            path: path.clone(),
            content_type: content_type.as_str().to_owned(),
            ttl_secs,
            expires_at: expires.as_ref().map(|e| e.0.clone()),
            expires_at_ms: expires.map(|e| e.1),
            created_at_ms: now_ms(),
            closed: req.closed,
            tail,
            fork: fork_info,
            fork_refs: 0,
            soft_deleted: false,
            last_seq: None,
            closed_by: None,
            owner: req.owner.clone(),
            blob: None,
        };
        self.paths.insert(path, id);
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
        let path = req.path.as_str().to_owned();
        if let Some(&id) = self.paths.get(&path) {
            if !self.expired(shared, id) || self.streams[&id].soft_deleted {
                let _ = std::fs::remove_file(&blob.path);
                return Err(StoreError::ConfigMismatch("a stream already exists at this path".into()));
            }
            self.remove(t, changes, id)?;
        }
        // The same bytes may have lost their last holder earlier in this batch; keep the file.
        changes.unlink.retain(|sha| sha != &blob.sha256);
        shared.blobs.adopt(&blob)?;
        let refs = self.blob_refs.get(&blob.sha256).copied().unwrap_or(0) + 1;
        t.blob_refs.insert(blob.sha256.as_str(), refs)?;
        self.blob_refs.insert(blob.sha256.clone(), refs);
        let id = self.next_id;
        self.next_id += 1;
        t.counters.insert("next_stream_id", self.next_id)?;
        let content_type = req.content_type.clone().unwrap_or_else(ContentType::octet_stream);
        let info = StreamInfo {
            id,
            path: path.clone(),
            content_type: content_type.as_str().to_owned(),
            ttl_secs: None,
            expires_at: None,
            expires_at_ms: None,
            created_at_ms: now_ms(),
            closed: true,
            tail: blob.len,
            fork: None,
            fork_refs: 0,
            soft_deleted: false,
            last_seq: None,
            closed_by: None,
            owner: req.owner.clone(),
            blob: Some(BlobRef { sha256: blob.sha256.clone(), len: blob.len }),
        };
        self.paths.insert(path, id);
        self.save(t, changes, info.clone())?;
        Ok(info)
    }

    /// PUT on an existing path: 200 when the configuration matches, 409 when not.
    fn confirm_existing(&self, id: u64, req: &CreateStream) -> StoreResult<CreateOutcome> {
        let info = &self.streams[&id];
        if info.soft_deleted {
            return Err(StoreError::ConfigMismatch("a deleted stream still holds this path for its forks".into()));
        }
        let mismatch = |what: &str| Err(StoreError::ConfigMismatch(format!("{what} differs from the existing stream")));
        let requested_type = req.content_type.clone().unwrap_or_else(|| match &req.fork {
            Some(_) => info.content_type(),
            None => ContentType::octet_stream(),
        });
        if !requested_type.matches(&info.content_type()) {
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
                if spec.source.as_str() != fork.source_path
                    || !same_offset
                    || spec.sub_offset != fork.requested_sub_offset
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

    /// Refines a fork point by `sub` messages (JSON) or bytes (otherwise) past
    /// `anchor`, within the one append that starts at the anchor.
    fn resolve_sub_offset(
        &self,
        shared: &Shared,
        t: &Tables,
        src: &StreamInfo,
        anchor: u64,
        sub: u64,
    ) -> StoreResult<u64> {
        if sub == 0 {
            return Ok(anchor);
        }
        let overshoot =
            || StoreError::Invalid("Stream-Fork-Sub-Offset is past the end of the append at the fork offset".into());
        if anchor >= src.tail {
            return Err(overshoot());
        }
        // The stream whose own rows hold `anchor`.
        let segs = super::reader::segments(shared, src, anchor, src.tail)?;
        let seg = segs.first().copied().ok_or_else(overshoot)?;
        if src.is_json() {
            let mut taken = 0u64;
            for row in t.chunks.range((seg.id, anchor)..(seg.id, seg.hi))? {
                let (key, value) = row?;
                let v = value.value();
                taken += 1;
                let end = key.value().1 + (v.len() as u64 - 1) + 1;
                if taken == sub {
                    return Ok(end);
                }
                if v[0] & ROW_ENDS_APPEND != 0 {
                    break;
                }
            }
            Err(overshoot())
        } else {
            let row = t.chunks.range((seg.id, 0)..=(seg.id, anchor))?.next_back().transpose()?;
            let (start, len) = row.map(|(k, v)| (k.value().1, v.value().len() as u64 - 1)).ok_or_else(overshoot)?;
            let end = (start + len).min(seg.hi);
            if end <= anchor || anchor + sub > end {
                return Err(overshoot());
            }
            Ok(anchor + sub)
        }
    }

    fn append(&mut self, t: &mut Tables, changes: &mut Changes, p: PreparedAppend) -> StoreResult<AppendOutcome> {
        let req = &p.req;
        let id = *self.paths.get(&req.path).ok_or(StoreError::NotFound)?;
        if id != p.stream_id {
            return Err(StoreError::NotFound);
        }
        let info = self.streams.get(&id).ok_or(StoreError::NotFound)?;
        if info.soft_deleted {
            return Err(StoreError::Gone);
        }
        if info.closed {
            if let Some(pr) = &req.producer {
                if info.closed_by.as_ref() == Some(&(pr.id.clone(), pr.epoch, pr.seq)) {
                    let state = self.producers.get(&(id, pr.id.clone())).copied();
                    return Ok(AppendOutcome { info: info.clone(), producer: state, duplicate: true });
                }
            }
            if req.body.is_empty() && req.close {
                return Ok(AppendOutcome { info: info.clone(), producer: None, duplicate: true });
            }
            return Err(StoreError::Closed { next: Offset(info.tail) });
        }
        if !req.body.is_empty() {
            match &req.content_type {
                None => return Err(StoreError::MissingContentType),
                Some(ct) if !ct.matches(&info.content_type()) => {
                    return Err(StoreError::ContentTypeMismatch {
                        expected: info.content_type.clone(),
                        got: ct.as_str().to_owned(),
                    })
                }
                Some(_) => {}
            }
        }
        let mut producer_next = None;
        if let Some(pr) = &req.producer {
            let state = self.producers.get(&(id, pr.id.clone())).copied();
            match ProducerCheck::decide(state, pr) {
                ProducerCheck::Accept { next } => producer_next = Some(next),
                ProducerCheck::Duplicate { state } => {
                    return Ok(AppendOutcome { info: info.clone(), producer: Some(state), duplicate: true })
                }
                ProducerCheck::StaleEpoch { current } => return Err(StoreError::StaleEpoch { current }),
                ProducerCheck::EpochMustStartAtZero => return Err(StoreError::EpochMustStartAtZero),
                ProducerCheck::Gap { expected, received } => {
                    return Err(StoreError::ProducerGap { expected, received })
                }
            }
        }
        if let (Some(seq), Some(last)) = (&req.seq, &info.last_seq) {
            if seq.as_bytes() <= last.as_bytes() {
                return Err(StoreError::SeqRegression { last: last.clone(), got: seq.clone() });
            }
        }
        let mut info = info.clone();
        write_rows(t, id, &mut info.tail, &p.rows, p.json)?;
        if req.close {
            info.closed = true;
            info.closed_by = req.producer.as_ref().map(|pr| (pr.id.clone(), pr.epoch, pr.seq));
        }
        if let Some(seq) = &req.seq {
            info.last_seq = Some(seq.clone());
        }
        if let (Some(pr), Some(next)) = (&req.producer, producer_next) {
            t.producers.insert((id, pr.id.as_str()), (next.epoch, next.last_seq))?;
            self.producers.insert((id, pr.id.clone()), next);
        }
        self.save(t, changes, info.clone())?;
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
        t.chunks.retain_in((id, 0)..=(id, u64::MAX), |_, _| false)?;
        if let Some(blob) = &info.blob {
            let left = self.blob_refs.get(&blob.sha256).copied().unwrap_or(1).saturating_sub(1);
            if left == 0 {
                t.blob_refs.remove(blob.sha256.as_str())?;
                self.blob_refs.remove(&blob.sha256);
                changes.unlink.push(blob.sha256.clone());
            } else {
                t.blob_refs.insert(blob.sha256.as_str(), left)?;
                self.blob_refs.insert(blob.sha256.clone(), left);
            }
        }
        t.producers.retain_in((id, "")..(id + 1, ""), |_, _| false)?;
        t.streams.remove(id)?;
        self.streams.remove(&id);
        if self.paths.get(&info.path) == Some(&id) {
            self.paths.remove(&info.path);
        }
        self.producers.retain(|(sid, _), _| *sid != id);
        changes.touched.remove(&id);
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

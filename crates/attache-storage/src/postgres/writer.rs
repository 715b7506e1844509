//! The writer task: group commit over PostgreSQL.
//!
//! It drains its queue, applies the batch inside one transaction and commits
//! once; only then does it publish the new metadata here, and the same
//! commit delivers `NOTIFY attache_changes` to every other instance. Across
//! instances, writes to one stream serialize on its row (`FOR UPDATE`) and
//! creates of one path on a transaction-scoped advisory lock. A batch that
//! deadlocks with another instance's is rolled back and run again whole:
//! nothing of it was visible or acknowledged.
//!
//! Why one file of this size: one batch's transaction (locks, rules, rows,
//! NOTIFY) and its retry on deadlock read best together, and the engine work
//! of issue 11 is changing them.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use attache_core::{Offset, ProducerState};
use bytes::Bytes;
use sha2::{Digest, Sha256};
use sqlx::{Postgres, Transaction};
use tokio::sync::mpsc;

use super::{db_err, now_ms, stream_row, Command, Shared, StreamRow, CHANGES, STREAM_COLUMNS};
use crate::error::{StoreError, StoreResult};
use crate::model::*;
use crate::rules::{self, AppendDecision, AtPath, PreparedAppend};

pub(crate) async fn run(shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<Command>, max_batch: usize) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(cmd) => batch.push(cmd),
                Err(_) => break,
            }
        }
        commit_batch(&shared, batch).await;
    }
    tracing::debug!("postgres writer stopped");
}

/// One command's answer, held until the batch commits.
enum Answer {
    Create(StoreResult<CreateOutcome>),
    CreateBlob(StoreResult<StreamInfo>),
    CreateBlobWithRow(super::BlobWithRow),
    Append(StoreResult<AppendOutcome>),
    Delete(StoreResult<()>),
    None,
}

async fn commit_batch(shared: &Shared, batch: Vec<Command>) {
    let started = std::time::Instant::now();
    let mut attempt = 0;
    let result = loop {
        match apply_batch(shared, &batch).await {
            Err(err) if err.is_retryable() && attempt < 8 => {
                attempt += 1;
                tracing::debug!(%err, attempt, "batch met another instance's; running it again");
                tokio::time::sleep(std::time::Duration::from_millis(rand::random::<u64>() % (5 << attempt))).await;
            }
            other => break other,
        }
    };
    let size = batch.len();
    match result {
        Ok((answers, work)) => {
            shared.health.recovered(crate::health::Source::Db);
            publish(shared, work);
            for (cmd, answer) in batch.into_iter().zip(answers) {
                reply(cmd, answer);
            }
        }
        Err(err) => {
            tracing::error!(%err, size, "group commit failed");
            shared.health.fail(crate::health::Source::Db, &err);
            for cmd in batch {
                fail(cmd, err.clone());
            }
        }
    }
    tracing::trace!(size, total_us = started.elapsed().as_micros() as u64, "group commit");
}

fn reply(cmd: Command, answer: Answer) {
    // A caller that went away no longer needs its answer.
    match (cmd, answer) {
        (Command::Create(_, tx), Answer::Create(r)) => drop(tx.send(r)),
        (Command::CreateBlob(_, _, tx), Answer::CreateBlob(r)) => drop(tx.send(r)),
        (Command::LinkBlob(_, _, tx), Answer::CreateBlob(r)) => drop(tx.send(r)),
        (Command::CreateBlobWithRow(_, tx), Answer::CreateBlobWithRow(r)) => drop(tx.send(r)),
        (Command::Append(_, tx), Answer::Append(r)) => drop(tx.send(r)),
        (Command::Delete(_, tx) | Command::DeleteId(_, _, tx), Answer::Delete(r)) => drop(tx.send(r)),
        (Command::AppendIf(_, tx) | Command::AppendPair(_, tx), Answer::Append(r)) => drop(tx.send(r)),
        _ => {}
    }
}

fn fail(cmd: Command, err: StoreError) {
    match cmd {
        Command::Create(_, tx) => drop(tx.send(Err(err))),
        Command::CreateBlob(_, _, tx) | Command::LinkBlob(_, _, tx) => drop(tx.send(Err(err))),
        Command::CreateBlobWithRow(_, tx) => drop(tx.send(Err(err))),
        Command::Append(_, tx) => drop(tx.send(Err(err))),
        Command::Delete(_, tx) | Command::DeleteId(_, _, tx) => drop(tx.send(Err(err))),
        Command::AppendIf(_, tx) | Command::AppendPair(_, tx) => drop(tx.send(Err(err))),
        Command::Expire(_) => {}
    }
}

/// Domain errors answer one command; storage errors abort the whole batch.
fn escalate<T>(r: StoreResult<T>) -> StoreResult<StoreResult<T>> {
    match r {
        Err(e) if e.fails_batch() => Err(e),
        other => Ok(other),
    }
}

/// A stream row locked by this batch, with its changes so far.
struct Locked {
    info: StreamInfo,
    /// The committed version (0: created in this batch).
    version: i64,
    last_access_ms: i64,
}

/// The batch's working set: rows it locked and what it will write.
struct Work {
    tx: Transaction<'static, Postgres>,
    streams: HashMap<u64, Locked>,
    /// Path → stream id, as of this batch (`None`: no stream there).
    paths: HashMap<Arc<str>, Option<u64>>,
    producers: HashMap<(u64, String), Option<ProducerState>>,
    dirty: BTreeSet<u64>,
    dirty_producers: BTreeSet<(u64, String)>,
    removed: Vec<(u64, Arc<str>)>,
    chunks: Vec<(u64, u64, bool, Bytes)>,
    blob_refs: BTreeMap<String, i64>,
    /// Streams whose committed row is published here though unchanged: a
    /// conditional write found this instance's copy behind (`append_if`).
    refresh: Vec<u64>,
    /// Guarded keys (`append_guarded`) as of this batch: where the newest
    /// append of each began (`None`: none recorded), and which to write.
    row_keys: HashMap<(u64, String), Option<u64>>,
    dirty_row_keys: BTreeSet<(u64, String)>,
}

/// What publishing needs once the batch committed.
struct Committed {
    rows: Vec<StreamRow>,
    removed: Vec<u64>,
}

/// The advisory-lock key of a path (the first 8 bytes of its SHA-256).
fn path_key(path: &str) -> i64 {
    let digest = Sha256::digest(path.as_bytes());
    i64::from_be_bytes(digest[..8].try_into().expect("a SHA-256 digest has 8 bytes"))
}

async fn apply_batch(shared: &Shared, batch: &[Command]) -> StoreResult<(Vec<Answer>, Committed)> {
    let tx = shared.pool.begin().await.map_err(db_err)?;
    let mut w = Work {
        tx,
        streams: HashMap::new(),
        paths: HashMap::new(),
        producers: HashMap::new(),
        dirty: BTreeSet::new(),
        dirty_producers: BTreeSet::new(),
        removed: Vec::new(),
        chunks: Vec::new(),
        blob_refs: BTreeMap::new(),
        refresh: Vec::new(),
        row_keys: HashMap::new(),
        dirty_row_keys: BTreeSet::new(),
    };
    // Every path the batch names is read (and its row locked) once, up front.
    // Paths it may create are locked first, in one order, in a statement of
    // their own: the read that follows must see a create that committed
    // while this batch waited (each statement reads a fresh snapshot).
    let mut paths: Vec<String> = Vec::new();
    let mut ids: Vec<i64> = Vec::new();
    let mut keys: Vec<i64> = Vec::new();
    for cmd in batch {
        match cmd {
            Command::Create(req, _) => {
                paths.push(req.path.as_str().to_owned());
                keys.push(path_key(req.path.as_str()));
                if let Some(spec) = &req.fork {
                    paths.push(spec.source.as_str().to_owned());
                }
            }
            Command::CreateBlob(req, _, _) => {
                paths.push(req.path.as_str().to_owned());
                keys.push(path_key(req.path.as_str()));
            }
            Command::CreateBlobWithRow(parts, _) => {
                let (req, _, row, _) = &**parts;
                paths.push(req.path.as_str().to_owned());
                keys.push(path_key(req.path.as_str()));
                paths.push(row.req.path.clone());
            }
            Command::LinkBlob(req, source, _) => {
                paths.push(req.path.as_str().to_owned());
                keys.push(path_key(req.path.as_str()));
                paths.push(source.clone());
            }
            Command::Append(p, _) => paths.push(p.req.path.clone()),
            Command::AppendPair(pair, _) => {
                paths.push(pair.0.req.path.clone());
                paths.push(pair.1.req.path.clone());
            }
            Command::AppendIf(parts, _) => {
                let (row, _, bytes) = &**parts;
                paths.push(row.req.path.clone());
                if let Some(at) = bytes {
                    // Taken by every create at the path too: "no stream there" stays true until this commits.
                    paths.push(at.path.clone());
                    keys.push(path_key(&at.path));
                }
            }
            Command::Delete(path, _) | Command::DeleteId(path, _, _) => paths.push(path.clone()),
            Command::Expire(id) => ids.push(*id as i64),
        }
    }
    paths.sort();
    paths.dedup();
    keys.sort_unstable();
    keys.dedup();
    if !keys.is_empty() {
        sqlx::query("SELECT pg_advisory_xact_lock(k) FROM UNNEST($1::int8[]) AS k")
            .bind(&keys)
            .execute(&mut *w.tx)
            .await
            .map_err(db_err)?;
    }
    let rows: Vec<(i64, String, i64, i64)> = sqlx::query_as(&format!(
        "SELECT {STREAM_COLUMNS} FROM attache_streams WHERE path = ANY($1) OR id = ANY($2) ORDER BY id FOR UPDATE"
    ))
    .bind(&paths)
    .bind(&ids)
    .fetch_all(&mut *w.tx)
    .await
    .map_err(db_err)?;
    for path in paths {
        w.paths.insert(path.into(), None);
    }
    for row in rows {
        w.hold(stream_row(row)?);
    }
    // And the state of every producer the batch's appends name, in one query.
    let (mut pr_ids, mut pr_names) = (Vec::new(), Vec::new());
    for cmd in batch {
        if let Command::Append(p, _) = cmd {
            if let (Some(pr), Some(Some(id))) = (&p.req.producer, w.paths.get(p.req.path.as_str())) {
                if w.producers.insert((*id, pr.id.clone()), None).is_none() {
                    pr_ids.push(*id as i64);
                    pr_names.push(pr.id.clone());
                }
            }
        }
    }
    if !pr_ids.is_empty() {
        let states: Vec<(i64, String, i64, i64)> = sqlx::query_as(
            "SELECT p.stream_id, p.producer, p.epoch, p.last_seq FROM attache_producers p \
             JOIN UNNEST($1::int8[], $2::text[]) AS u(id, name) ON p.stream_id = u.id AND p.producer = u.name",
        )
        .bind(&pr_ids)
        .bind(&pr_names)
        .fetch_all(&mut *w.tx)
        .await
        .map_err(db_err)?;
        for (id, name, epoch, last_seq) in states {
            let state = ProducerState { epoch: epoch as u64, last_seq: last_seq as u64 };
            w.producers.insert((id as u64, name), Some(state));
        }
    }
    let mut answers = Vec::with_capacity(batch.len());
    for cmd in batch {
        let answer = match cmd {
            Command::Create(req, _) => Answer::Create(escalate(w.create(shared, req).await)?),
            Command::CreateBlob(req, blob, _) => Answer::CreateBlob(escalate(w.create_blob(shared, req, blob).await)?),
            Command::CreateBlobWithRow(parts, _) => {
                let (req, blob, row, guard) = &**parts;
                Answer::CreateBlobWithRow(escalate(
                    w.create_blob_with_row(shared, req, blob, row, guard.as_ref()).await,
                )?)
            }
            Command::LinkBlob(req, source, _) => {
                Answer::CreateBlob(escalate(w.link_blob(shared, req.clone(), source).await)?)
            }
            Command::Append(p, _) => Answer::Append(escalate(w.append(p).await)?),
            Command::AppendPair(pair, _) => {
                let (first, second, guard) = &**pair;
                Answer::Append(escalate(w.append_pair(shared, first, second, guard.as_ref()).await)?)
            }
            Command::AppendIf(parts, _) => {
                let (row, guard, bytes) = &**parts;
                Answer::Append(escalate(w.append_if(shared, row, guard, bytes.as_ref()).await)?)
            }
            Command::Delete(path, _) => Answer::Delete(escalate(w.delete(shared, path, None).await)?),
            Command::DeleteId(path, id, _) => Answer::Delete(escalate(w.delete(shared, path, Some(*id)).await)?),
            Command::Expire(id) => {
                if let Some(s) = w.stream(*id).await? {
                    if !s.soft_deleted && w.expired(shared, *id) {
                        w.remove(*id).await?;
                    }
                }
                Answer::None
            }
        };
        answers.push(answer);
    }
    let committed = w.flush(shared).await?;
    Ok((answers, committed))
}

/// After the commit: readers here see the new metadata, then waiters wake.
fn publish(shared: &Shared, committed: Committed) {
    let now = now_ms();
    for row in committed.rows {
        let entry = shared.apply(row);
        entry.last_access_ms.fetch_max(now, Ordering::Relaxed);
    }
    for id in committed.removed {
        shared.forget(id);
    }
}

impl Work {
    fn hold(&mut self, row: StreamRow) {
        let id = row.info.id;
        if !row.info.unlinked {
            self.paths.insert(row.info.path.clone(), Some(id));
        }
        self.streams.insert(id, Locked { info: row.info, version: row.version, last_access_ms: row.last_access_ms });
    }

    /// The stream with this id as of this batch, locking its row if not yet held.
    async fn stream(&mut self, id: u64) -> StoreResult<Option<StreamInfo>> {
        if let Some(s) = self.streams.get(&id) {
            return Ok(Some(s.info.clone()));
        }
        if self.removed.iter().any(|(r, _)| *r == id) {
            return Ok(None);
        }
        let row: Option<(i64, String, i64, i64)> =
            sqlx::query_as(&format!("SELECT {STREAM_COLUMNS} FROM attache_streams WHERE id = $1 FOR UPDATE"))
                .bind(id as i64)
                .fetch_optional(&mut *self.tx)
                .await
                .map_err(db_err)?;
        match row {
            Some(row) => {
                let row = stream_row(row)?;
                let info = row.info.clone();
                self.hold(row);
                Ok(Some(info))
            }
            None => Ok(None),
        }
    }

    /// The id of the stream at `path` as of this batch.
    async fn id_at(&mut self, path: &str) -> StoreResult<Option<u64>> {
        if let Some(id) = self.paths.get(path) {
            return Ok(*id);
        }
        let row: Option<(i64, String, i64, i64)> =
            sqlx::query_as(&format!("SELECT {STREAM_COLUMNS} FROM attache_streams WHERE path = $1 FOR UPDATE"))
                .bind(path)
                .fetch_optional(&mut *self.tx)
                .await
                .map_err(db_err)?;
        match row {
            Some(row) => {
                let row = stream_row(row)?;
                let id = row.info.id;
                self.hold(row);
                Ok(Some(id))
            }
            None => {
                self.paths.insert(path.into(), None);
                Ok(None)
            }
        }
    }

    /// Expired streams behave as deleted: by the latest access any instance shared, or this one saw.
    fn expired(&self, shared: &Shared, id: u64) -> bool {
        let Some(s) = self.streams.get(&id) else { return false };
        let local = shared.index.read().by_id.get(&id).map(|e| e.last_access_ms.load(Ordering::Relaxed));
        let last = local.unwrap_or(0).max(s.last_access_ms);
        rules::expired(&s.info, last, now_ms())
    }

    fn save(&mut self, info: StreamInfo) {
        let id = info.id;
        match self.streams.get_mut(&id) {
            Some(s) => s.info = info,
            None => {
                self.streams.insert(id, Locked { info, version: 0, last_access_ms: now_ms() });
            }
        }
        self.dirty.insert(id);
    }

    async fn producer(&mut self, id: u64, name: &str) -> StoreResult<Option<ProducerState>> {
        let key = (id, name.to_owned());
        if let Some(state) = self.producers.get(&key) {
            return Ok(*state);
        }
        let row: Option<(i64, i64)> =
            sqlx::query_as("SELECT epoch, last_seq FROM attache_producers WHERE stream_id = $1 AND producer = $2")
                .bind(id as i64)
                .bind(name)
                .fetch_optional(&mut *self.tx)
                .await
                .map_err(db_err)?;
        let state = row.map(|(epoch, last_seq)| ProducerState { epoch: epoch as u64, last_seq: last_seq as u64 });
        self.producers.insert(key, state);
        Ok(state)
    }

    async fn next_id(&mut self) -> StoreResult<u64> {
        let (id,): (i64,) =
            sqlx::query_as("SELECT nextval('attache_stream_ids')").fetch_one(&mut *self.tx).await.map_err(db_err)?;
        Ok(id as u64)
    }

    fn push_rows(&mut self, id: u64, tail: &mut u64, rows: &[Bytes], json: bool) -> StoreResult<()> {
        let placed = rules::place_rows(tail, rows, json)?;
        for (row, (pos, ends)) in rows.iter().zip(placed) {
            self.chunks.push((id, pos, ends, row.clone()));
        }
        Ok(())
    }

    /// Writes pending rows now, so queries in this transaction see them.
    async fn flush_chunks(&mut self) -> StoreResult<()> {
        if self.chunks.is_empty() {
            return Ok(());
        }
        let chunks = std::mem::take(&mut self.chunks);
        let mut ids = Vec::with_capacity(chunks.len());
        let mut positions = Vec::with_capacity(chunks.len());
        let mut ends = Vec::with_capacity(chunks.len());
        let mut data: Vec<&[u8]> = Vec::with_capacity(chunks.len());
        for (id, pos, end, bytes) in &chunks {
            ids.push(*id as i64);
            positions.push(*pos as i64);
            ends.push(*end);
            data.push(bytes.as_ref());
        }
        sqlx::query(
            "INSERT INTO attache_chunks (stream_id, pos, ends_append, data) \
             SELECT * FROM UNNEST($1::int8[], $2::int8[], $3::bool[], $4::bytea[])",
        )
        .bind(&ids)
        .bind(&positions)
        .bind(&ends)
        .bind(&data)
        .execute(&mut *self.tx)
        .await
        .map_err(db_err)?;
        Ok(())
    }

    async fn create(&mut self, shared: &Shared, req: &CreateStream) -> StoreResult<CreateOutcome> {
        let path = req.path.as_str();
        if let Some(id) = self.id_at(path).await? {
            let info = self.stream(id).await?.ok_or(StoreError::NotFound)?;
            match rules::at_path(&info, self.expired(shared, id), req) {
                AtPath::Holds => return rules::confirm_existing(&info, req),
                AtPath::Remove => self.remove(id).await?,
                AtPath::Unlink => self.unlink(info),
            }
        }
        let source = match &req.fork {
            Some(spec) => match self.id_at(spec.source.as_str()).await? {
                Some(src_id) => {
                    let src = self.stream(src_id).await?.ok_or(StoreError::ForkSourceNotFound)?;
                    let expired = self.expired(shared, src_id);
                    Some((src, expired))
                }
                None => None,
            },
            None => None,
        };
        let plan = rules::plan_create(req, source.as_ref().map(|(s, e)| (s, *e)))?;
        let mut tail = 0;
        let mut fork_info = None;
        let mut fork_source = None;
        if let (Some(spec), Some((src, _)), Some(anchor)) = (&req.fork, source, plan.anchor) {
            let mut lineage = 1;
            let mut next = src.fork.as_ref().map(|f| f.source_id);
            while let Some(id) = next.filter(|_| lineage <= rules::MAX_LINEAGE) {
                lineage += 1;
                next = self.stream(id).await?.and_then(|s| s.fork.map(|f| f.source_id));
            }
            rules::check_fork_lineage(lineage)?;
            self.check_message_start(shared, &src, anchor).await?;
            let position = self.resolve_sub_offset(shared, &src, anchor, spec.sub_offset).await?;
            tail = position;
            fork_info = Some(rules::fork_info(&src, position, anchor, spec.sub_offset));
            fork_source = Some(src);
        }
        let (rows, json) = rules::initial_rows(req, &plan.content_type)?;
        let id = self.next_id().await?;
        self.push_rows(id, &mut tail, &rows, json)?;
        // Everything is valid: only now does the source learn of its new fork.
        if let Some(mut src) = fork_source {
            src.fork_refs += 1;
            self.save(src);
        }
        let info = rules::new_stream(id, req, plan, tail, fork_info);
        self.paths.insert(info.path.clone(), Some(id));
        self.save(info.clone());
        Ok(CreateOutcome::Created(info))
    }

    async fn create_blob(&mut self, shared: &Shared, req: &CreateStream, blob: &BlobRef) -> StoreResult<StreamInfo> {
        let path = req.path.as_str();
        if let Some(id) = self.id_at(path).await? {
            let info = self.stream(id).await?.ok_or(StoreError::NotFound)?;
            match rules::at_path(&info, self.expired(shared, id), req) {
                AtPath::Holds => return Err(StoreError::ConfigMismatch("a stream already exists at this path".into())),
                AtPath::Remove => self.remove(id).await?,
                AtPath::Unlink => self.unlink(info),
            }
        }
        *self.blob_refs.entry(blob.sha256.clone()).or_default() += 1;
        let id = self.next_id().await?;
        let info = rules::new_blob_stream(id, req, blob.clone());
        self.paths.insert(info.path.clone(), Some(id));
        self.save(info.clone());
        Ok(info)
    }

    /// `create_blob` and an append to another stream, both or neither
    /// (`StreamStore::create_blob_stream_and_append`), the append perhaps
    /// guarded (as `append_if`'s row, under the same row lock): the append
    /// and the guard are checked before anything changes, so once the blob
    /// stream is made nothing but a database error (which rolls the whole
    /// batch back) can stop it.
    async fn create_blob_with_row(
        &mut self,
        shared: &Shared,
        req: &CreateStream,
        blob: &BlobRef,
        row: &PreparedAppend,
        guard: Option<&RowGuard>,
    ) -> super::BlobWithRow {
        self.check_append(row).await?;
        let id = self.id_at(&row.req.path).await?.ok_or(StoreError::NotFound)?;
        let start = self.stream(id).await?.ok_or(StoreError::NotFound)?.tail;
        if let Some(guard) = guard {
            let last = self.row_key(id, &guard.key).await?;
            if let Err(moved) = rules::check_conditions(last, guard, None, None) {
                // The caller reads again: from the committed state, not a cache NOTIFY has yet to update.
                self.refresh.push(id);
                return Err(moved);
            }
        }
        let info = self.create_blob(shared, req, blob).await?;
        if let Some(guard) = guard {
            self.row_keys.insert((id, guard.key.clone()), Some(start));
            self.dirty_row_keys.insert((id, guard.key.clone()));
        }
        let outcome =
            self.append(row).await.map_err(|e| rules::checked_then_refused(e, "the append of a blob stream"))?;
        Ok(Box::new((info, outcome)))
    }

    /// `StreamStore::append_guarded`: every condition is checked before
    /// anything changes, under the row lock of the row's stream (which also
    /// orders the guarded keys in `attache_row_keys`) and the advisory lock
    /// of the deleted path, so once the row is written only a database error
    /// (which rolls the whole batch back) can stop the delete.
    async fn append_if(
        &mut self,
        shared: &Shared,
        row: &PreparedAppend,
        guard: &RowGuard,
        bytes: Option<&StreamAt>,
    ) -> StoreResult<AppendOutcome> {
        self.check_append(row).await?;
        let id = self.id_at(&row.req.path).await?.ok_or(StoreError::NotFound)?;
        let start = self.stream(id).await?.ok_or(StoreError::NotFound)?.tail;
        let last = self.row_key(id, &guard.key).await?;
        let live = match bytes {
            Some(at) => match self.id_at(&at.path).await? {
                Some(id) => match self.stream(id).await? {
                    Some(info) if !info.soft_deleted && !self.expired(shared, id) => Some(id),
                    _ => None,
                },
                None => None,
            },
            None => None,
        };
        if let Err(moved) = rules::check_conditions(last, guard, bytes, live) {
            // The caller reads again: from the committed state, not a cache NOTIFY has yet to update.
            self.refresh.push(id);
            return Err(moved);
        }
        let outcome = self.append(row).await.map_err(|e| rules::checked_then_refused(e, "a conditional append"))?;
        self.row_keys.insert((id, guard.key.clone()), Some(start));
        self.dirty_row_keys.insert((id, guard.key.clone()));
        if let Some(StreamAt { path, id: Some(only) }) = bytes {
            match self.delete(shared, path, Some(*only)).await {
                Ok(()) | Err(StoreError::NotFound) => {}
                // Checked live above: a refusal now would leave the row without the delete.
                Err(e) => return Err(rules::checked_then_refused(e, "a conditional delete")),
            }
        }
        Ok(outcome)
    }

    /// Two appends to two streams, both or neither, the first perhaps
    /// guarded (`StreamStore::append_in_order_with`): both are checked (and
    /// the guard's condition, and their streams' rows locked) before anything
    /// changes, so once the first is written only a database error (which
    /// rolls the batch back) can stop the second.
    async fn append_pair(
        &mut self,
        shared: &Shared,
        first: &PreparedAppend,
        second: &PreparedAppend,
        guard: Option<&RowGuard>,
    ) -> StoreResult<AppendOutcome> {
        self.check_append(second).await?;
        let outcome = match guard {
            Some(guard) => self.append_if(shared, first, guard, None).await?,
            None => {
                self.check_append(first).await?;
                self.append(first).await.map_err(|e| rules::checked_then_refused(e, "an append"))?
            }
        };
        self.append(second).await.map_err(|e| rules::checked_then_refused(e, "the append paired with another"))?;
        Ok(outcome)
    }

    /// Where the newest guarded append of `key` to stream `id` began, as of
    /// this batch (read under the stream's row lock, which every append to
    /// it takes, so no other instance records one meanwhile).
    async fn row_key(&mut self, id: u64, key: &str) -> StoreResult<Option<u64>> {
        let k = (id, key.to_owned());
        if let Some(pos) = self.row_keys.get(&k) {
            return Ok(*pos);
        }
        let row: Option<(i64,)> = sqlx::query_as("SELECT pos FROM attache_row_keys WHERE stream_id = $1 AND key = $2")
            .bind(id as i64)
            .bind(key)
            .fetch_optional(&mut *self.tx)
            .await
            .map_err(db_err)?;
        let pos = row.map(|(pos,)| pos as u64);
        self.row_keys.insert(k, pos);
        Ok(pos)
    }

    /// Would [`append`](Self::append) take `p` now? Changes nothing (but locks the stream's row).
    async fn check_append(&mut self, p: &PreparedAppend) -> StoreResult<()> {
        let req = &p.req;
        let id = self.id_at(&req.path).await?.ok_or(StoreError::NotFound)?;
        let info = self.stream(id).await?.ok_or(StoreError::NotFound)?;
        let rows = if id == p.stream_id { p.rows.clone() } else { PreparedAppend::prepare(req.clone(), &info)?.rows };
        let state = match &req.producer {
            Some(pr) => self.producer(id, &pr.id).await?,
            None => None,
        };
        match rules::decide_append(&info, req, state)? {
            AppendDecision::Write { .. } => rules::place_rows(&mut info.tail.clone(), &rows, p.json).map(drop),
            AppendDecision::Answer(_) => Err(StoreError::Invalid(
                "a row committed with another change must write: no retry, no close of a closed stream".into(),
            )),
        }
    }

    /// A closed stream over the blob of the blob-backed stream at `source`:
    /// one more reference, no byte copied (`StreamStore::link_blob_stream`).
    async fn link_blob(&mut self, shared: &Shared, mut req: CreateStream, source: &str) -> StoreResult<StreamInfo> {
        let src_id = self.id_at(source).await?.ok_or(StoreError::NotFound)?;
        let src = self.stream(src_id).await?.ok_or(StoreError::NotFound)?;
        let blob = rules::plan_link(&src, self.expired(shared, src_id), &mut req)?;
        self.create_blob(shared, &req, &blob).await
    }

    /// Refuses a fork of a JSON stream at an offset inside a message: the
    /// rows holding `anchor` (the source's own, or an ancestor's below a fork
    /// point) must have a message (one `attache_chunks` row) start there.
    async fn check_message_start(&mut self, shared: &Shared, src: &StreamInfo, anchor: u64) -> StoreResult<()> {
        if !rules::fork_needs_message_start(src, anchor) {
            return Ok(());
        }
        self.flush_chunks().await?;
        let mut known: HashMap<u64, StreamInfo> = self.streams.iter().map(|(id, s)| (*id, s.info.clone())).collect();
        let segs = super::reader::segments(shared, &mut self.tx, src, anchor, src.tail, &mut known).await?;
        let starts = match segs.first() {
            Some(seg) => {
                let (found,): (bool,) =
                    sqlx::query_as("SELECT EXISTS (SELECT 1 FROM attache_chunks WHERE stream_id = $1 AND pos = $2)")
                        .bind(seg.id as i64)
                        .bind(anchor as i64)
                        .fetch_one(&mut *self.tx)
                        .await
                        .map_err(db_err)?;
                found
            }
            None => false,
        };
        if starts {
            Ok(())
        } else {
            Err(StoreError::ForkOffsetInsideMessage { offset: Offset(anchor) })
        }
    }

    /// Refines a fork point by `sub` messages (JSON) or bytes past `anchor`,
    /// within the one append that starts at the anchor.
    async fn resolve_sub_offset(
        &mut self,
        shared: &Shared,
        src: &StreamInfo,
        anchor: u64,
        sub: u64,
    ) -> StoreResult<u64> {
        if rules::sub_offset_is_anchor(src, anchor, sub)? {
            return Ok(anchor);
        }
        self.flush_chunks().await?;
        let mut known: HashMap<u64, StreamInfo> = self.streams.iter().map(|(id, s)| (*id, s.info.clone())).collect();
        let segs = super::reader::segments(shared, &mut self.tx, src, anchor, src.tail, &mut known).await?;
        let seg = segs.first().copied().ok_or_else(rules::sub_offset_overshoot)?;
        if src.is_json() {
            let rows: Vec<(i64, i32, bool)> = sqlx::query_as(
                "SELECT pos, length(data), ends_append FROM attache_chunks \
                 WHERE stream_id = $1 AND pos >= $2 AND pos < $3 ORDER BY pos LIMIT $4",
            )
            .bind(seg.id as i64)
            .bind(anchor as i64)
            .bind(seg.hi as i64)
            .bind(sub.min(i64::MAX as u64) as i64)
            .fetch_all(&mut *self.tx)
            .await
            .map_err(db_err)?;
            rules::json_sub_offset(rows.into_iter().map(|(p, l, e)| Ok((p as u64, l as u64, e))), sub)
        } else {
            let row: Option<(i64, i32)> = sqlx::query_as(
                "SELECT pos, length(data) FROM attache_chunks WHERE stream_id = $1 AND pos <= $2 \
                 ORDER BY pos DESC LIMIT 1",
            )
            .bind(seg.id as i64)
            .bind(anchor as i64)
            .fetch_optional(&mut *self.tx)
            .await
            .map_err(db_err)?;
            rules::binary_sub_offset(row.map(|(p, l)| (p as u64, l as u64)), seg.hi, anchor, sub)
        }
    }

    async fn append(&mut self, p: &PreparedAppend) -> StoreResult<AppendOutcome> {
        let req = &p.req;
        let id = self.id_at(&req.path).await?.ok_or(StoreError::NotFound)?;
        let info = self.stream(id).await?.ok_or(StoreError::NotFound)?;
        // Prepared against this instance's view: a stream re-created elsewhere
        // meanwhile is prepared again against the one that is there now.
        let reprepared;
        let p = if id == p.stream_id {
            p
        } else {
            reprepared = PreparedAppend::prepare(req.clone(), &info)?;
            &reprepared
        };
        let state = match &req.producer {
            Some(pr) => self.producer(id, &pr.id).await?,
            None => None,
        };
        let producer_next = match rules::decide_append(&info, req, state)? {
            AppendDecision::Answer(outcome) => return Ok(*outcome),
            AppendDecision::Write { producer_next } => producer_next,
        };
        let mut info = info;
        self.push_rows(id, &mut info.tail, &p.rows, p.json)?;
        rules::finish_append(&mut info, req);
        if let (Some(pr), Some(next)) = (&req.producer, producer_next) {
            self.producers.insert((id, pr.id.clone()), Some(next));
            self.dirty_producers.insert((id, pr.id.clone()));
        }
        self.save(info.clone());
        Ok(AppendOutcome { info, producer: producer_next, duplicate: false })
    }

    /// Deletes the stream at `path`; with `only`, only while it is that stream.
    async fn delete(&mut self, shared: &Shared, path: &str, only: Option<u64>) -> StoreResult<()> {
        let id = self.id_at(path).await?.ok_or(StoreError::NotFound)?;
        if only.is_some_and(|only| only != id) {
            return Err(StoreError::NotFound);
        }
        let info = self.stream(id).await?.ok_or(StoreError::NotFound)?;
        if info.soft_deleted {
            return Err(StoreError::Gone);
        }
        let expired = self.expired(shared, id);
        self.remove(id).await?;
        if expired {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    /// A stream kept for its forks gives up its path: its row stays, unnamed
    /// (path NULL), until its last fork goes (`remove` then drops it).
    fn unlink(&mut self, mut info: StreamInfo) {
        if self.paths.get(&info.path) == Some(&Some(info.id)) {
            self.paths.insert(info.path.clone(), None);
        }
        info.unlinked = true;
        self.save(info);
    }

    /// Deletes a stream: soft while forks read through it, otherwise for good,
    /// releasing its source (and that source, if it was waiting only on this fork).
    async fn remove(&mut self, id: u64) -> StoreResult<()> {
        let mut next = Some(id);
        while let Some(id) = next.take() {
            let Some(mut info) = self.stream(id).await? else { return Ok(()) };
            if info.fork_refs > 0 {
                info.soft_deleted = true;
                self.save(info);
                return Ok(());
            }
            if let Some(blob) = &info.blob {
                *self.blob_refs.entry(blob.sha256.clone()).or_default() -= 1;
            }
            self.streams.remove(&id);
            if self.paths.get(&info.path) == Some(&Some(id)) {
                self.paths.insert(info.path.clone(), None);
            }
            self.dirty.remove(&id);
            self.chunks.retain(|c| c.0 != id);
            self.producers.retain(|(sid, _), _| *sid != id);
            self.dirty_producers.retain(|(sid, _)| *sid != id);
            self.removed.push((id, info.path.clone()));
            if let Some(fork) = info.fork {
                if let Some(mut src) = self.stream(fork.source_id).await? {
                    src.fork_refs = src.fork_refs.saturating_sub(1);
                    let cascade = src.soft_deleted && src.fork_refs == 0;
                    let src_id = src.id;
                    self.save(src);
                    if cascade {
                        next = Some(src_id);
                    }
                }
            }
        }
        Ok(())
    }

    /// Writes everything, announces it and commits.
    async fn flush(mut self, shared: &Shared) -> StoreResult<Committed> {
        let removed: HashSet<u64> = self.removed.iter().map(|(id, _)| *id).collect();
        self.chunks.retain(|c| !removed.contains(&c.0));
        if !removed.is_empty() {
            // Before the upsert below: a path freed here may be taken again in this batch.
            let gone: Vec<i64> = removed.iter().map(|&id| id as i64).collect();
            sqlx::query(
                "WITH c AS (DELETE FROM attache_chunks WHERE stream_id = ANY($1)), \
                 p AS (DELETE FROM attache_producers WHERE stream_id = ANY($1)), \
                 k AS (DELETE FROM attache_row_keys WHERE stream_id = ANY($1)) \
                 DELETE FROM attache_streams WHERE id = ANY($1)",
            )
            .bind(&gone)
            .execute(&mut *self.tx)
            .await
            .map_err(db_err)?;
        }
        let unlinked: Vec<i64> =
            self.dirty.iter().filter(|id| self.streams[*id].info.unlinked).map(|&id| id as i64).collect();
        if !unlinked.is_empty() {
            // Before the upsert below too: the path given up here is taken in this batch.
            sqlx::query("UPDATE attache_streams SET path = NULL WHERE id = ANY($1)")
                .bind(&unlinked)
                .execute(&mut *self.tx)
                .await
                .map_err(db_err)?;
        }
        let now = now_ms();
        let mut rows = Vec::with_capacity(self.dirty.len());
        let chunks = std::mem::take(&mut self.chunks);
        let mut c = (Vec::new(), Vec::new(), Vec::new(), Vec::<&[u8]>::new());
        for (id, pos, end, bytes) in &chunks {
            c.0.push(*id as i64);
            c.1.push(*pos as i64);
            c.2.push(*end);
            c.3.push(bytes.as_ref());
        }
        let mut s = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for id in &self.dirty {
            let l = &self.streams[id];
            s.0.push(*id as i64);
            s.1.push((!l.info.unlinked).then(|| l.info.path.to_string()));
            s.2.push(serde_json::to_string(&l.info).map_err(|e| StoreError::Storage(e.to_string()))?);
            s.3.push(l.version + 1);
            s.4.push(now);
            rows.push(StreamRow { version: l.version + 1, info: l.info.clone(), last_access_ms: now });
        }
        for id in &self.refresh {
            if let Some(l) = self.streams.get(id).filter(|l| l.version > 0 && !self.dirty.contains(id)) {
                rows.push(StreamRow { version: l.version, info: l.info.clone(), last_access_ms: l.last_access_ms });
            }
        }
        let mut p = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for key in &self.dirty_producers {
            if let Some(Some(state)) = self.producers.get(key) {
                p.0.push(key.0 as i64);
                p.1.push(key.1.clone());
                p.2.push(state.epoch as i64);
                p.3.push(state.last_seq as i64);
            }
        }
        let payloads: Vec<String> = self
            .dirty
            .iter()
            .copied()
            .chain(removed.iter().copied())
            .map(|id| format!("{id}:{}", shared.instance))
            .collect();
        // Rows, metadata, producer state and the announcement: one round trip.
        sqlx::query(
            "WITH c AS (INSERT INTO attache_chunks (stream_id, pos, ends_append, data) \
                 SELECT * FROM UNNEST($1::int8[], $2::int8[], $3::bool[], $4::bytea[])), \
             s AS (INSERT INTO attache_streams (id, path, info, version, last_access_ms) \
                 SELECT * FROM UNNEST($5::int8[], $6::text[], $7::text[], $8::int8[], $9::int8[]) \
                 ON CONFLICT (id) DO UPDATE SET info = EXCLUDED.info, version = EXCLUDED.version, \
                 last_access_ms = GREATEST(attache_streams.last_access_ms, EXCLUDED.last_access_ms)), \
             p AS (INSERT INTO attache_producers (stream_id, producer, epoch, last_seq) \
                 SELECT * FROM UNNEST($10::int8[], $11::text[], $12::int8[], $13::int8[]) \
                 ON CONFLICT (stream_id, producer) DO UPDATE SET epoch = EXCLUDED.epoch, last_seq = EXCLUDED.last_seq) \
             SELECT pg_notify($14, x) FROM UNNEST($15::text[]) AS x",
        )
        .bind(&c.0)
        .bind(&c.1)
        .bind(&c.2)
        .bind(&c.3)
        .bind(&s.0)
        .bind(&s.1)
        .bind(&s.2)
        .bind(&s.3)
        .bind(&s.4)
        .bind(&p.0)
        .bind(&p.1)
        .bind(&p.2)
        .bind(&p.3)
        .bind(CHANGES)
        .bind(&payloads)
        .execute(&mut *self.tx)
        .await
        .map_err(db_err)?;
        let (mut k_ids, mut k_keys, mut k_pos) = (Vec::new(), Vec::new(), Vec::new());
        for key in &self.dirty_row_keys {
            if let (false, Some(Some(pos))) = (removed.contains(&key.0), self.row_keys.get(key)) {
                k_ids.push(key.0 as i64);
                k_keys.push(key.1.clone());
                k_pos.push(*pos as i64);
            }
        }
        if !k_ids.is_empty() {
            sqlx::query(
                "INSERT INTO attache_row_keys (stream_id, key, pos) \
                 SELECT * FROM UNNEST($1::int8[], $2::text[], $3::int8[]) \
                 ON CONFLICT (stream_id, key) DO UPDATE SET pos = EXCLUDED.pos",
            )
            .bind(&k_ids)
            .bind(&k_keys)
            .bind(&k_pos)
            .execute(&mut *self.tx)
            .await
            .map_err(db_err)?;
        }
        self.blob_refs.retain(|_, d| *d != 0);
        if !self.blob_refs.is_empty() {
            let shas: Vec<String> = self.blob_refs.keys().cloned().collect();
            let deltas: Vec<i64> = self.blob_refs.values().copied().collect();
            let updated = sqlx::query(
                "UPDATE attache_blobs b SET refs = GREATEST(b.refs + u.d, 0) \
                 FROM UNNEST($1::text[], $2::int8[]) AS u(sha, d) WHERE b.sha256 = u.sha",
            )
            .bind(&shas)
            .bind(&deltas)
            .execute(&mut *self.tx)
            .await
            .map_err(db_err)?;
            if updated.rows_affected() != shas.len() as u64 {
                return Err(StoreError::Storage("a blob's reference count is missing".into()));
            }
        }
        self.tx.commit().await.map_err(db_err)?;
        Ok(Committed { rows, removed: removed.into_iter().collect() })
    }
}

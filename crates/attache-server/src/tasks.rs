//! The task face: ClaudeBench's `task.*` methods on attache's one store.
//!
//! A task is an entity `/task/{taskId}` owned by the principal that created
//! it; its fields live in the entity record's `extra` (changed only through
//! the registry's compare-and-set, which makes `task.claim` atomic). Each
//! task attachment is a manifest row on `/task/{taskId}/main` whose
//! `ext["name"]` is its key, so the entity attachment routes see it and a
//! keyed upload is a task attachment. Every event is appended to the task's
//! main stream (collection `event`) and to the global events stream.
//!
//! Writes to one task are ordered by a per-task lock that is held only while
//! the write is *queued*, not while it syncs: see [`Writers`].

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::sync::Arc;

use attache_core::manifest::{
    versioned_attachment_stream, AttachmentStatus, ManifestEntry, Role, Subject, BYTES_VERSION_LEN, MANIFEST,
};
use attache_core::state::timestamp;
use attache_core::{ContentType, EntityUrl, Permission, PrincipalKey, StreamPath};
use attache_storage::{AppendRequest, CreateStream, EntityRecord, StoreError};
use axum::http::StatusCode;
use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use crate::access::{may, now_ms};
use crate::error::ApiError;
use crate::events;
use crate::rows::{json_content_type, new_txid, not_running, MainView};
use crate::AppState;

pub const TASK_TYPE: &str = "task";

/// Every method of the face, in the order metrics and MCP list them.
pub const METHODS: &[&str] = &[
    "task.create",
    "task.get",
    "task.update",
    "task.list",
    "task.assign",
    "task.unassign",
    "task.claim",
    "task.complete",
    "task.delete",
    "task.create_attachment",
    "task.get_attachment",
    "task.list_attachments",
    "task.get_attachments_batch",
    "task.delete_attachment",
];

/// Largest inline JSON value, markdown or text content (bytes as serialized).
pub const MAX_INLINE_BYTES: usize = 1 << 20;
/// Largest binary sent inline as base64 `data`; larger files go through the upload route.
pub const MAX_INLINE_BINARY: usize = 1 << 20;

/// What went wrong, in the face's words. `rpc::error_object` maps each to its JSON-RPC code, once.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskError {
    /// The params fail validation (-32602, message "Invalid params").
    InvalidParams { validation: String, field: Option<String> },
    /// A task, attachment or precondition the caller named does not hold (-32602 with `data`).
    Rejected { message: String, data: Value },
    /// The caller may see the task but not do this (-32002).
    Unauthorized { message: String },
    /// The caller exceeded its rate limit (-32000).
    RateLimited { limit: u32, window_ms: u64 },
    /// No such method (-32601).
    MethodNotFound { method: String },
    /// A real fault of the server or its store (-32603).
    Internal { message: String },
}

pub type TaskResult<T> = Result<T, TaskError>;

impl TaskError {
    pub fn invalid(field: &str, validation: impl Into<String>) -> TaskError {
        TaskError::InvalidParams { validation: validation.into(), field: Some(field.to_owned()) }
    }
    fn rejected(message: impl Into<String>, data: Value) -> TaskError {
        TaskError::Rejected { message: message.into(), data }
    }
    fn internal(e: impl std::fmt::Display) -> TaskError {
        tracing::error!(error = %e, "task face internal fault");
        TaskError::Internal { message: e.to_string() }
    }
}

impl From<StoreError> for TaskError {
    fn from(e: StoreError) -> TaskError {
        TaskError::internal(e)
    }
}

impl From<ApiError> for TaskError {
    fn from(e: ApiError) -> TaskError {
        match e.status {
            StatusCode::FORBIDDEN => TaskError::Unauthorized { message: e.message },
            StatusCode::CONFLICT if e.code == "NOT_RUNNING" => {
                TaskError::rejected("Task was deleted and accepts no more changes", json!({}))
            }
            _ => TaskError::internal(e.message),
        }
    }
}

// ---------------------------------------------------------------- the task record

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Pending,
    InProgress,
    Completed,
    Failed,
}

impl Status {
    pub fn parse(s: &str) -> Option<Status> {
        match s {
            "pending" => Some(Status::Pending),
            "in_progress" => Some(Status::InProgress),
            "completed" => Some(Status::Completed),
            "failed" => Some(Status::Failed),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::InProgress => "in_progress",
            Status::Completed => "completed",
            Status::Failed => "failed",
        }
    }
    pub fn is_final(self) -> bool {
        matches!(self, Status::Completed | Status::Failed)
    }
    /// pending → in_progress → completed | failed; in_progress may go back to
    /// pending (unassign). Final statuses never change; staying put is allowed otherwise.
    pub fn may_become(self, next: Status) -> bool {
        use Status::*;
        match (self, next) {
            (from, _) if from.is_final() => false,
            (from, to) if from == to => true,
            (Pending, InProgress) => true,
            (InProgress, Completed | Failed | Pending) => true,
            _ => false,
        }
    }
}

/// A task's fields, as kept in `EntityRecord.extra`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskRecord {
    pub text: String,
    pub status: Status,
    pub priority: u8,
    #[serde(default)]
    pub metadata: Option<Map<String, Value>>,
    #[serde(default)]
    pub assigned_to: Option<String>,
    #[serde(default)]
    pub result: Option<Value>,
    #[serde(default)]
    pub error: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
    #[serde(default)]
    pub completed_at: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleted_at: Option<i64>,
}

impl TaskRecord {
    pub fn of(entity: &EntityRecord) -> Option<TaskRecord> {
        if entity.entity_type != TASK_TYPE {
            return None;
        }
        let task: TaskRecord = serde_json::from_value(entity.extra.clone()?).ok()?;
        task.deleted_at.is_none().then_some(task)
    }

    fn to_extra(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }

    /// The full row: what `task.get`, `task.list` and `task.claim` show.
    fn row(&self, id: &str) -> Value {
        json!({
            "id": id,
            "text": self.text,
            "status": self.status.as_str(),
            "priority": self.priority,
            "assignedTo": self.assigned_to,
            "metadata": self.metadata,
            "result": self.result,
            "error": self.error,
            "createdAt": timestamp(self.created_at),
            "updatedAt": timestamp(self.updated_at),
            "completedAt": self.completed_at.map(timestamp),
        })
    }
}

// ---------------------------------------------------------------- params

/// The `params` object of a call, read field by field with exact validation messages.
pub struct Params<'a>(&'a Map<String, Value>);

impl<'a> Params<'a> {
    fn present(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }
    fn get(&self, name: &str) -> Option<&'a Value> {
        self.0.get(name)
    }
    fn opt_str(&self, name: &str) -> TaskResult<Option<&'a str>> {
        match self.0.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(TaskError::invalid(name, format!("{name} must be a string"))),
        }
    }
    /// A required string of 1 to `max` characters.
    fn string(&self, name: &str, max: usize) -> TaskResult<&'a str> {
        let s = self.opt_str(name)?.ok_or_else(|| TaskError::invalid(name, format!("{name} is required")))?;
        let n = s.chars().count();
        if n == 0 || n > max {
            return Err(TaskError::invalid(name, format!("{name} must be between 1 and {max} characters")));
        }
        Ok(s)
    }
    fn opt_string(&self, name: &str, max: usize) -> TaskResult<Option<&'a str>> {
        if self.opt_str(name)?.is_none() {
            return Ok(None);
        }
        self.string(name, max).map(Some)
    }
    fn opt_int(&self, name: &str, min: i64, max: i64) -> TaskResult<Option<i64>> {
        match self.0.get(name) {
            None => Ok(None),
            Some(v) => match v.as_i64() {
                Some(n) if (min..=max).contains(&n) => Ok(Some(n)),
                _ => Err(TaskError::invalid(name, format!("{name} must be an integer from {min} to {max}"))),
            },
        }
    }
    fn opt_object(&self, name: &str) -> TaskResult<Option<&'a Map<String, Value>>> {
        match self.0.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Object(m)) => Ok(Some(m)),
            Some(_) => Err(TaskError::invalid(name, format!("{name} must be an object"))),
        }
    }
    fn opt_enum<T>(&self, name: &str, parse: impl Fn(&str) -> Option<T>, allowed: &str) -> TaskResult<Option<T>> {
        match self.opt_str(name)? {
            None => Ok(None),
            Some(s) => {
                parse(s).map(Some).ok_or_else(|| TaskError::invalid(name, format!("{name} must be one of {allowed}")))
            }
        }
    }
}

/// Params must be an object; absent or null means `{}`.
pub fn params_object(params: Value) -> TaskResult<Map<String, Value>> {
    match params {
        Value::Null => Ok(Map::new()),
        Value::Object(m) => Ok(m),
        _ => Err(TaskError::InvalidParams { validation: "params must be an object".into(), field: None }),
    }
}

// ---------------------------------------------------------------- ids

fn radix36(mut n: u64, width: usize) -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = vec![b'0'; width];
    for slot in out.iter_mut().rev() {
        *slot = DIGITS[(n % 36) as usize];
        n /= 36;
    }
    String::from_utf8(out).unwrap_or_default()
}

/// `t-<ms>-<6 base36>`: unlike `t-<ms>`, two tasks created in one millisecond get different ids.
pub fn new_task_id() -> String {
    format!("t-{}-{}", now_ms(), radix36(rand::random::<u64>(), 6))
}

/// `ta-<ms>-<9 base36>`, as ClaudeBench mints them.
pub fn new_attachment_id() -> String {
    format!("ta-{}-{}", now_ms(), radix36(rand::random::<u64>(), 9))
}

fn new_event_id() -> String {
    format!("evt-{}-{}", now_ms(), radix36(rand::random::<u64>(), 9))
}

fn task_url(task_id: &str) -> Option<EntityUrl> {
    EntityUrl::new(TASK_TYPE, task_id).ok()
}

fn main_path(task_id: &str) -> String {
    format!("/{TASK_TYPE}/{task_id}/main")
}

// ---------------------------------------------------------------- per-task write ordering

/// Writes not yet visible in the materialized view: key → the entry being
/// written (`None`: being deleted), tagged with the write's sequence number.
#[derive(Default)]
pub struct Pending {
    next: u64,
    by_key: HashMap<String, (u64, Option<ManifestEntry>)>,
}

/// Write ordering for one task. A write holds its locks while it is decided
/// and *queued*, and releases them before it syncs: the embedded store queues
/// an append on its first poll and commits its queue in order, so this keeps
/// the writes in order while many of them share one group commit.
///
/// Task changes (status, assignment, deletion) take `order` exclusively.
/// Attachment writes share `order` and serialize per key only, so writes of
/// different keys proceed in parallel. Until a queued write is visible in the
/// view, [`Pending`] remembers it, so a second upsert of the same key reuses
/// the id the first one chose.
#[derive(Default)]
pub struct TaskCell {
    order: tokio::sync::RwLock<()>,
    keys: parking_lot::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    pending: parking_lot::Mutex<Pending>,
}

impl TaskCell {
    fn key_lock(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.keys.lock().entry(key.to_owned()).or_default().clone()
    }

    /// Drops the lock of a key nobody else is writing.
    fn release_key(&self, key: &str, lock: Arc<tokio::sync::Mutex<()>>) {
        let mut keys = self.keys.lock();
        // Two references: the map's and ours; nobody can clone it while we hold the map.
        if Arc::strong_count(&lock) == 2 {
            keys.remove(key);
        }
    }

    /// The entry a queued write of `key` is writing, if one is in flight.
    fn pending(&self, key: &str) -> Option<Option<ManifestEntry>> {
        self.pending.lock().by_key.get(key).map(|(_, e)| e.clone())
    }

    fn record(&self, key: &str, entry: Option<ManifestEntry>) -> u64 {
        let mut p = self.pending.lock();
        p.next += 1;
        let seq = p.next;
        p.by_key.insert(key.to_owned(), (seq, entry));
        seq
    }

    fn settle(&self, key: &str, seq: u64) {
        let mut p = self.pending.lock();
        if p.by_key.get(key).is_some_and(|(s, _)| *s == seq) {
            p.by_key.remove(key);
        }
    }
}

#[derive(Default)]
pub struct Writers {
    cells: parking_lot::Mutex<HashMap<String, Arc<TaskCell>>>,
    /// Deleted tasks whose tombstones are kept, oldest first.
    tombstones: parking_lot::Mutex<VecDeque<Tombstone>>,
}

/// A task's cell, released when dropped (on every path, errors included), so
/// the map holds only the cells of tasks being written to.
pub struct CellRef<'a> {
    writers: &'a Writers,
    task_id: String,
    cell: Option<Arc<TaskCell>>,
}

impl std::ops::Deref for CellRef<'_> {
    type Target = TaskCell;
    fn deref(&self) -> &TaskCell {
        // Present until drop.
        self.cell.as_deref().unwrap_or_else(|| unreachable!("a CellRef holds its cell until dropped"))
    }
}

impl Drop for CellRef<'_> {
    fn drop(&mut self) {
        if let Some(cell) = self.cell.take() {
            self.writers.release(&self.task_id, cell);
        }
    }
}

impl Writers {
    fn cell(&self, task_id: &str) -> CellRef<'_> {
        let cell = self.cells.lock().entry(task_id.to_owned()).or_default().clone();
        CellRef { writers: self, task_id: task_id.to_owned(), cell: Some(cell) }
    }

    /// Drops the cell of a task nobody is writing to (keeps the map small).
    fn release(&self, task_id: &str, cell: Arc<TaskCell>) {
        let mut cells = self.cells.lock();
        if Arc::strong_count(&cell) == 2 && cell.keys.lock().is_empty() && cell.pending.lock().by_key.is_empty() {
            cells.remove(task_id);
        }
    }

    /// How many task cells are held (tests and diagnostics).
    #[doc(hidden)]
    pub fn cells_len(&self) -> usize {
        self.cells.lock().len()
    }

    /// How many deleted tasks keep a tombstone (tests and diagnostics).
    #[doc(hidden)]
    pub fn tombstones_len(&self) -> usize {
        self.tombstones.lock().len()
    }
}

/// Polls a write once (which queues it), so it can be finished after the task lock is released.
async fn queue<F: Future + Send>(fut: F) -> std::pin::Pin<Box<futures::future::MaybeDone<F>>> {
    let mut started = Box::pin(futures::future::maybe_done(fut));
    let _ = futures::poll!(started.as_mut());
    started
}

async fn finish<F: Future + Send>(mut started: std::pin::Pin<Box<futures::future::MaybeDone<F>>>) -> Option<F::Output> {
    started.as_mut().await;
    started.as_mut().take_output()
}

// ---------------------------------------------------------------- events

/// One event, as stored on the global stream and as rows of collection `event`.
pub struct Event {
    pub kind: &'static str,
    pub task_id: String,
    pub payload: Value,
    pub metadata: Value,
}

impl Event {
    fn new(kind: &'static str, task_id: &str, payload: Value, metadata: Value) -> Event {
        Event { kind, task_id: task_id.to_owned(), payload, metadata }
    }

    fn envelope<'a>(&'a self, id: &'a str, incarnation: Option<&'a str>, now: i64) -> Envelope<'a> {
        Envelope {
            id,
            incarnation,
            kind: self.kind,
            task_id: &self.task_id,
            payload: &self.payload,
            metadata: &self.metadata,
            timestamp: now,
        }
    }
}

/// An event as stored: serialized straight from its parts (keys in the order
/// the stored JSON has always had: sorted).
#[derive(Serialize)]
struct Envelope<'a> {
    id: &'a str,
    /// The incarnation of the task entity the event is about (see
    /// [`events::Visibility`]): events outlive a purged task, and must not be
    /// read as the events of a task later created with the same id.
    #[serde(skip_serializing_if = "Option::is_none")]
    incarnation: Option<&'a str>,
    metadata: &'a Value,
    payload: &'a Value,
    #[serde(rename = "taskId")]
    task_id: &'a str,
    timestamp: i64,
    #[serde(rename = "type")]
    kind: &'a str,
}

/// Serialized into a buffer sized for a typical row: growing from empty costs ~7 reallocations.
fn row_bytes<T: Serialize + ?Sized>(value: &T) -> serde_json::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(768);
    serde_json::to_writer(&mut out, value)?;
    Ok(out)
}

/// A manifest row a write appends to the task's main stream.
enum Row {
    /// Insert (new key) or update (same id, full replacement).
    Upsert {
        entry: Box<ManifestEntry>,
        insert: bool,
    },
    Delete {
        row_key: String,
    },
}

#[derive(Serialize)]
struct RowOut<'a, V: Serialize + ?Sized> {
    #[serde(rename = "type")]
    collection: &'a str,
    key: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<&'a V>,
    headers: HeadersOut<'a>,
}

#[derive(Serialize)]
struct HeadersOut<'a> {
    operation: &'a str,
    timestamp: &'a str,
    txid: &'a str,
}

/// Appends `rows` plus one `event` row per event to the task's main stream,
/// and the events to the global events stream: queued now (in order), finished
/// by the returned future. Each event is serialized once for both streams.
/// Only into the life `incarnation` names: it holds the task's life lock
/// shared until the writes finish (`access::Lives`), and a task purged
/// meanwhile (and perhaps created again, by anyone) is "not found" (-32602),
/// whatever the compare-and-set before it saw.
async fn write_task(
    state: &AppState,
    task_id: &str,
    incarnation: Option<&str>,
    rows: Vec<Row>,
    evts: Vec<Event>,
    close: bool,
) -> impl Future<Output = TaskResult<()>> + Send + 'static {
    crate::pause::at(state, crate::pause::TASK_WRITE).await;
    let url = format!("/{TASK_TYPE}/{task_id}");
    let life = state.lives.shared(&url).await;
    if state.registry.entity_shared(&url).await.is_none_or(|e| e.incarnation.as_deref() != incarnation) {
        return futures::future::Either::Left(futures::future::ready(Err(task_missing(Missing::TaskColon, task_id))));
    }
    let now = now_ms();
    let txid = new_txid();
    let ts = timestamp(now);
    let headers = |operation| HeadersOut { operation, timestamp: &ts, txid: &txid };
    let mut main_rows = Vec::with_capacity(rows.len() + evts.len());
    let mut envelopes = Vec::with_capacity(evts.len());
    let serialized = (|| -> serde_json::Result<()> {
        for row in &rows {
            main_rows.push(match row {
                Row::Upsert { entry, insert } => row_bytes(&RowOut {
                    collection: MANIFEST,
                    key: &entry.key,
                    value: Some(&**entry),
                    headers: headers(if *insert { "insert" } else { "update" }),
                })?,
                Row::Delete { row_key } => row_bytes(&RowOut::<Value> {
                    collection: MANIFEST,
                    key: row_key,
                    value: None,
                    headers: headers("delete"),
                })?,
            });
        }
        for e in &evts {
            let id = new_event_id();
            let envelope = row_bytes(&e.envelope(&id, incarnation, now))?;
            let raw: &serde_json::value::RawValue = serde_json::from_slice(&envelope)?;
            main_rows.push(row_bytes(&RowOut {
                collection: events::EVENT_COLLECTION,
                key: &id,
                value: Some(raw),
                headers: headers("insert"),
            })?);
            envelopes.push(envelope);
        }
        Ok(())
    })();
    if let Err(e) = serialized {
        return futures::future::Either::Left(futures::future::ready(Err(TaskError::internal(e))));
    }
    let store = state.store.clone();
    let main_req = AppendRequest::json_messages(main_path(task_id), json_content_type(), &main_rows, close);
    let main_write = queue(async move {
        store.append(main_req).await.map(|_| ()).map_err(|e| match e {
            StoreError::Closed { .. } => TaskError::from(not_running()),
            other => TaskError::from(other),
        })
    })
    .await;
    let global_write = if envelopes.is_empty() {
        None
    } else {
        let store = state.store.clone();
        Some(
            queue(async move { events::append_events(store.as_ref(), &envelopes).await.map_err(TaskError::from) })
                .await,
        )
    };
    futures::future::Either::Right(async move {
        let _life = life;
        let main = finish(main_write).await;
        let global = match global_write {
            Some(w) => finish(w).await,
            None => Some(Ok(())),
        };
        match (main, global) {
            (Some(Ok(())), Some(Ok(()))) => Ok(()),
            (Some(Err(e)), _) | (_, Some(Err(e))) => Err(e),
            _ => Err(TaskError::internal("a queued write vanished")),
        }
    })
}

// ---------------------------------------------------------------- dispatch

/// Calls one method for `who`. Every face (JSON-RPC, MCP, WebSocket) comes through here.
pub async fn call(state: &AppState, who: &PrincipalKey, method: &str, params: Value) -> TaskResult<Value> {
    let map = params_object(params)?;
    let p = Params(&map);
    match method {
        "task.create" => create(state, who, &p).await,
        "task.get" => get(state, who, &p).await,
        "task.update" => update(state, who, &p).await,
        "task.list" => list(state, who, &p).await,
        "task.assign" => assign(state, who, &p).await,
        "task.unassign" => unassign(state, who, &p).await,
        "task.claim" => claim(state, who, &p).await,
        "task.complete" => complete(state, who, &p).await,
        "task.delete" => delete(state, who, &p).await,
        "task.create_attachment" => create_attachment(state, who, &p).await,
        "task.get_attachment" => get_attachment(state, who, &p).await,
        "task.list_attachments" => list_attachments(state, who, &p).await,
        "task.get_attachments_batch" => get_attachments_batch(state, who, &p).await,
        "task.delete_attachment" => delete_attachment(state, who, &p).await,
        other => Err(TaskError::MethodNotFound { method: other.to_owned() }),
    }
}

/// "Task not found: t-1" (task methods) or "Task t-1 not found" (attachment methods), as the spec pages say.
#[derive(Clone, Copy)]
enum Missing {
    TaskColon,
    TaskNotFound,
}

fn task_missing(style: Missing, task_id: &str) -> TaskError {
    let message = match style {
        Missing::TaskColon => format!("Task not found: {task_id}"),
        Missing::TaskNotFound => format!("Task {task_id} not found"),
    };
    TaskError::rejected(message, json!({ "taskId": task_id }))
}

/// The task `who` may act on with `wanted`; a task it may not read does not exist for it.
async fn task_for(
    state: &AppState,
    who: &PrincipalKey,
    task_id: &str,
    wanted: Permission,
    style: Missing,
) -> TaskResult<(Arc<EntityRecord>, TaskRecord)> {
    let entity = task_entity(state, who, task_id, wanted, style).await?;
    let task = TaskRecord::of(&entity).ok_or_else(|| task_missing(style, task_id))?;
    Ok((entity, task))
}

/// A live (not deleted) task, by its record alone: cheaper than parsing it.
fn is_live_task(e: &EntityRecord) -> bool {
    e.entity_type == TASK_TYPE
        && e.extra
            .as_ref()
            .and_then(Value::as_object)
            .is_some_and(|x| x.contains_key("status") && x.get("deletedAt").is_none_or(Value::is_null))
}

/// May `who` read the entity, and may it do `wanted`? (One look at the grants.)
fn permitted(state: &AppState, who: &PrincipalKey, entity: &EntityRecord, wanted: Permission) -> (bool, bool) {
    if who.is_built_in_system() || entity.created_by == who.url() {
        return (true, true);
    }
    let grants = state.registry.grants(&entity.url);
    let now = now_ms();
    let check = |p| {
        attache_core::entity::permits(
            who,
            Some(&entity.created_by),
            grants.iter().map(|g| (&g.subject, g.permission, g.expires_at_ms)),
            p,
            now,
        )
    };
    (check(Permission::Read), wanted == Permission::Read || check(wanted))
}

/// The entity of a live task `who` may act on with `wanted`; a task it may
/// not read does not exist for it (-32602), one it may read but not change is -32002.
async fn task_entity(
    state: &AppState,
    who: &PrincipalKey,
    task_id: &str,
    wanted: Permission,
    style: Missing,
) -> TaskResult<Arc<EntityRecord>> {
    let missing = || task_missing(style, task_id);
    let url = task_url(task_id).ok_or_else(missing)?;
    let entity =
        state.registry.entity_shared(&url.to_string()).await.filter(|e| is_live_task(e)).ok_or_else(missing)?;
    match permitted(state, who, &entity, wanted) {
        (false, _) => Err(missing()),
        (true, false) => {
            Err(TaskError::Unauthorized { message: format!("{who} may not {} task {task_id}", wanted.as_str()) })
        }
        (true, true) => Ok(entity),
    }
}

/// Applies `change` to the task under the registry's compare-and-set; a
/// rejection from `change` comes back as is. `incarnation` is the one the
/// caller checked its permission against: a task purged and created again
/// meanwhile (by anyone) is another task, and is missing for this change.
async fn change_task(
    state: &AppState,
    task_id: &str,
    incarnation: Option<&str>,
    change: impl FnOnce(&mut TaskRecord) -> TaskResult<()> + Send + 'static,
) -> TaskResult<TaskRecord> {
    let url = format!("/{TASK_TYPE}/{task_id}");
    let rejection: Arc<parking_lot::Mutex<Option<TaskError>>> = Arc::default();
    let slot = rejection.clone();
    let id = task_id.to_owned();
    let expected = incarnation.map(str::to_owned);
    let outcome = state
        .registry
        .update_entity(
            &url,
            Box::new(move |entity| {
                let same = entity.incarnation == expected;
                let Some(mut task) = TaskRecord::of(entity).filter(|_| same) else {
                    *slot.lock() = Some(task_missing(Missing::TaskColon, &id));
                    return Err(StoreError::NotFound);
                };
                if let Err(e) = change(&mut task) {
                    *slot.lock() = Some(e);
                    return Err(StoreError::Invalid("rejected".into()));
                }
                entity.updated_at_ms = task.updated_at;
                if task.deleted_at.is_some() {
                    entity.status = "stopped".into();
                }
                entity.extra = Some(task.to_extra());
                Ok(())
            }),
        )
        .await;
    match outcome {
        Ok(entity) => {
            let extra = entity.extra.unwrap_or(Value::Null);
            serde_json::from_value(extra).map_err(TaskError::internal)
        }
        Err(e) => match rejection.lock().take() {
            Some(rejected) => Err(rejected),
            None if e == StoreError::NotFound => Err(task_missing(Missing::TaskColon, task_id)),
            None => Err(e.into()),
        },
    }
}

fn illegal(task_id: &str, from: Status, to: Status) -> TaskError {
    TaskError::rejected(
        format!("Cannot change status of task {task_id} from {} to {}", from.as_str(), to.as_str()),
        json!({ "taskId": task_id, "status": from.as_str(), "requested": to.as_str() }),
    )
}

// ---------------------------------------------------------------- task methods

/// A task's metadata lives in the registry's memory with the task: bounded
/// by `max_entity_data_bytes` (after an update's merge too).
fn check_metadata_size(state: &AppState, metadata: &Option<Map<String, Value>>) -> TaskResult<()> {
    let max = state.config.max_entity_data_bytes;
    if crate::entities::json_size(metadata) > max {
        return Err(metadata_too_large(max));
    }
    Ok(())
}

fn metadata_too_large(max: usize) -> TaskError {
    TaskError::invalid("metadata", format!("metadata is at most {max} bytes of JSON (max_entity_data_bytes)"))
}

async fn create(state: &AppState, who: &PrincipalKey, p: &Params<'_>) -> TaskResult<Value> {
    let text =
        p.string("text", 500).map_err(|_| TaskError::invalid("text", "Text must be between 1 and 500 characters"))?;
    let priority = p.opt_int("priority", 0, 100)?.unwrap_or(50) as u8;
    let metadata = p.opt_object("metadata")?.cloned();
    check_metadata_size(state, &metadata)?;
    let id = match p.opt_string("id", 128)? {
        Some(id) => {
            if !id.starts_with("t-") || task_url(id).is_none() {
                return Err(TaskError::invalid("id", "id must start with t- and be a valid entity id"));
            }
            id.to_owned()
        }
        None => new_task_id(),
    };
    let url = task_url(&id).ok_or_else(|| TaskError::invalid("id", "invalid task id"))?;
    if state.registry.entity(&url.to_string()).await.is_some() {
        return Err(TaskError::rejected(format!("Task already exists: {id}"), json!({ "taskId": id })));
    }
    let now = now_ms();
    let task = TaskRecord {
        text: text.to_owned(),
        status: Status::Pending,
        priority,
        metadata,
        assigned_to: None,
        result: None,
        error: None,
        created_at: now,
        updated_at: now,
        completed_at: None,
        deleted_at: None,
    };
    let cell = state.tasks.cell(&id);
    let guard = cell.order.write().await;
    let spawned = crate::entities::spawn_entity(state, who, &url, None, BTreeMap::new(), Some(task.to_extra())).await;
    let incarnation = match spawned {
        Ok((record, true, _)) => record.incarnation,
        Ok((_, false, _)) => {
            return Err(TaskError::rejected(format!("Task already exists: {id}"), json!({ "taskId": id })))
        }
        Err(e) if e.code == "DUPLICATE_URL" => {
            return Err(TaskError::rejected(format!("Task already exists: {id}"), json!({ "taskId": id })))
        }
        Err(e) => return Err(e.into()),
    };
    let mut out = json!({
        "id": id,
        "text": task.text,
        "status": task.status.as_str(),
        "priority": task.priority,
        "createdAt": timestamp(now),
    });
    let event = Event::new("task.created", &id, out.clone(), json!({ "createdBy": who.to_string() }));
    let written = write_task(state, &id, incarnation.as_deref(), vec![], vec![event], false).await;
    drop(guard);
    written.await?;
    drop(cell);
    if let Some(m) = &task.metadata {
        out["metadata"] = Value::Object(m.clone());
    }
    Ok(out)
}

async fn attachment_count(state: &AppState, task_id: &str) -> TaskResult<usize> {
    let view = state.views.get(state.store.as_ref(), &main_path(task_id)).await?;
    Ok(keyed(&view, task_id).count())
}

async fn get(state: &AppState, who: &PrincipalKey, p: &Params<'_>) -> TaskResult<Value> {
    let id = p.string("id", 128)?;
    let (_, task) = task_for(state, who, id, Permission::Read, Missing::TaskColon).await?;
    let mut row = task.row(id);
    row["attachmentCount"] = json!(attachment_count(state, id).await?);
    Ok(row)
}

async fn update(state: &AppState, who: &PrincipalKey, p: &Params<'_>) -> TaskResult<Value> {
    let id = p.string("id", 128)?;
    let updates = p.opt_object("updates")?.ok_or_else(|| TaskError::invalid("updates", "updates is required"))?;
    let u = Params(updates);
    let text = u
        .opt_string("text", 500)
        .map_err(|_| TaskError::invalid("text", "Text must be between 1 and 500 characters"))?
        .map(str::to_owned);
    let status = u.opt_enum("status", Status::parse, "pending, in_progress, completed, failed")?;
    let priority = u.opt_int("priority", 0, 100)?;
    let metadata = u.opt_object("metadata")?.cloned();
    let changes: Vec<&str> =
        ["text", "status", "priority", "metadata"].into_iter().filter(|k| updates.contains_key(*k)).collect();
    let entity = task_entity(state, who, id, Permission::Write, Missing::TaskColon).await?;
    let incarnation = entity.incarnation.as_deref();
    let cell = state.tasks.cell(id);
    let guard = cell.order.write().await;
    let task_id = id.to_owned();
    let now = now_ms();
    let max_metadata = state.config.max_entity_data_bytes;
    let task = change_task(state, id, incarnation, move |t| {
        if let Some(s) = status {
            if !t.status.may_become(s) {
                return Err(illegal(&task_id, t.status, s));
            }
            if s.is_final() && t.completed_at.is_none() {
                t.completed_at = Some(now);
            }
            if s == Status::Pending {
                t.assigned_to = None;
            }
            t.status = s;
        }
        if let Some(text) = text {
            t.text = text;
        }
        if let Some(pr) = priority {
            t.priority = pr as u8;
        }
        if let Some(m) = metadata {
            t.metadata.get_or_insert_with(Map::new).extend(m);
            // Merged, it must still fit (a rejected change is not stored).
            if crate::entities::json_size(&t.metadata) > max_metadata {
                return Err(metadata_too_large(max_metadata));
            }
        }
        t.updated_at = now;
        Ok(())
    })
    .await?;
    let out = json!({
        "id": id,
        "text": task.text,
        "status": task.status.as_str(),
        "priority": task.priority,
        "createdAt": timestamp(task.created_at),
        "updatedAt": timestamp(task.updated_at),
    });
    let event =
        Event::new("task.updated", id, out.clone(), json!({ "updatedBy": who.to_string(), "changes": changes }));
    let written = write_task(state, id, incarnation, vec![], vec![event], false).await;
    drop(guard);
    written.await?;
    drop(cell);
    Ok(out)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum OrderBy {
    CreatedAt,
    UpdatedAt,
    CompletedAt,
    Priority,
    Status,
    AssignedTo,
}

impl OrderBy {
    fn parse(s: &str) -> Option<OrderBy> {
        Some(match s {
            "createdAt" => OrderBy::CreatedAt,
            "updatedAt" => OrderBy::UpdatedAt,
            "completedAt" => OrderBy::CompletedAt,
            "priority" => OrderBy::Priority,
            "status" => OrderBy::Status,
            "assignedTo" => OrderBy::AssignedTo,
            _ => return None,
        })
    }
}

/// The tasks `who` may read (and do `wanted` on), newest first, with the incarnation of each.
fn visible_tasks_of<'a>(
    state: &'a AppState,
    who: &'a PrincipalKey,
    wanted: Permission,
) -> impl Iterator<Item = (String, TaskRecord, Option<String>)> + 'a {
    state
        .registry
        .entities(Some(TASK_TYPE))
        .into_iter()
        .filter(is_live_task)
        .filter(move |e| {
            may(state, who, e, Permission::Read) && (wanted == Permission::Read || may(state, who, e, wanted))
        })
        .filter_map(|e| TaskRecord::of(&e).map(|t| (e.instance_id, t, e.incarnation)))
}

/// The tasks `who` may read, newest first.
fn visible_tasks(state: &AppState, who: &PrincipalKey, wanted: Permission) -> Vec<(String, TaskRecord)> {
    visible_tasks_of(state, who, wanted).map(|(id, t, _)| (id, t)).collect()
}

async fn list(state: &AppState, who: &PrincipalKey, p: &Params<'_>) -> TaskResult<Value> {
    let status = p.opt_enum("status", Status::parse, "pending, in_progress, completed, failed")?;
    let assigned = p.opt_string("assignedTo", 256)?;
    let priority = p.opt_int("priority", 0, 100)?;
    let limit = p.opt_int("limit", 1, 1000)?.unwrap_or(100) as usize;
    let offset = p.opt_int("offset", 0, i64::MAX)?.unwrap_or(0) as usize;
    let order_by = p
        .opt_enum("orderBy", OrderBy::parse, "createdAt, updatedAt, completedAt, priority, status, assignedTo")?
        .unwrap_or(OrderBy::CreatedAt);
    let desc = p.opt_enum("order", |s| matches!(s, "asc" | "desc").then(|| s == "desc"), "asc, desc")?.unwrap_or(true);
    let mut tasks: Vec<(String, TaskRecord)> = visible_tasks(state, who, Permission::Read)
        .into_iter()
        .filter(|(_, t)| status.is_none_or(|s| t.status == s))
        .filter(|(_, t)| assigned.is_none_or(|a| t.assigned_to.as_deref() == Some(a)))
        .filter(|(_, t)| priority.is_none_or(|pr| i64::from(t.priority) == pr))
        .collect();
    // Ties break on creation time, then id, so pages are stable.
    tasks.sort_by(|(ia, a), (ib, b)| {
        let primary = match order_by {
            OrderBy::CreatedAt => a.created_at.cmp(&b.created_at),
            OrderBy::UpdatedAt => a.updated_at.cmp(&b.updated_at),
            OrderBy::CompletedAt => a.completed_at.cmp(&b.completed_at),
            OrderBy::Priority => a.priority.cmp(&b.priority),
            OrderBy::Status => a.status.as_str().cmp(b.status.as_str()),
            OrderBy::AssignedTo => a.assigned_to.cmp(&b.assigned_to),
        };
        let ord = primary.then_with(|| a.created_at.cmp(&b.created_at)).then_with(|| ia.cmp(ib));
        if desc {
            ord.reverse()
        } else {
            ord
        }
    });
    let total = tasks.len();
    let mut rows = Vec::with_capacity(limit.min(total));
    for (id, t) in tasks.iter().skip(offset).take(limit) {
        let mut row = t.row(id);
        row["attachmentCount"] = json!(attachment_count(state, id).await?);
        rows.push(row);
    }
    Ok(json!({ "tasks": rows, "totalCount": total, "hasMore": offset.saturating_add(limit) < total }))
}

async fn assign(state: &AppState, who: &PrincipalKey, p: &Params<'_>) -> TaskResult<Value> {
    let task_id = p.string("taskId", 128)?;
    let instance = p.string("instanceId", 256)?.to_owned();
    let entity = task_entity(state, who, task_id, Permission::Write, Missing::TaskColon).await?;
    let incarnation = entity.incarnation.as_deref();
    let cell = state.tasks.cell(task_id);
    let guard = cell.order.write().await;
    let previous: Arc<parking_lot::Mutex<Option<String>>> = Arc::default();
    let (prev_slot, id, inst) = (previous.clone(), task_id.to_owned(), instance.clone());
    let now = now_ms();
    change_task(state, task_id, incarnation, move |t| {
        if t.status.is_final() {
            return Err(TaskError::rejected(
                format!("Cannot assign task {id} with status {}", t.status.as_str()),
                json!({ "taskId": id, "status": t.status.as_str() }),
            ));
        }
        match &t.assigned_to {
            Some(current) if *current != inst => {
                return Err(TaskError::rejected(
                    format!("Task {id} is already assigned to {current}."),
                    json!({ "taskId": id, "currentAssignment": current }),
                ))
            }
            _ => {}
        }
        *prev_slot.lock() = t.assigned_to.replace(inst);
        t.updated_at = now;
        Ok(())
    })
    .await?;
    let previous = previous.lock().take();
    let event = Event::new(
        "task.assigned",
        task_id,
        json!({ "taskId": task_id, "instanceId": instance, "previousAssignment": previous }),
        json!({ "assignedBy": who.to_string() }),
    );
    let written = write_task(state, task_id, incarnation, vec![], vec![event], false).await;
    drop(guard);
    written.await?;
    drop(cell);
    Ok(json!({ "taskId": task_id, "instanceId": instance, "assignedAt": timestamp(now) }))
}

async fn unassign(state: &AppState, who: &PrincipalKey, p: &Params<'_>) -> TaskResult<Value> {
    let task_id = p.string("taskId", 128)?;
    let entity = task_entity(state, who, task_id, Permission::Write, Missing::TaskColon).await?;
    let incarnation = entity.incarnation.as_deref();
    let cell = state.tasks.cell(task_id);
    let guard = cell.order.write().await;
    let previous: Arc<parking_lot::Mutex<Option<String>>> = Arc::default();
    let (prev_slot, id) = (previous.clone(), task_id.to_owned());
    let now = now_ms();
    change_task(state, task_id, incarnation, move |t| {
        if t.status.is_final() {
            return Err(TaskError::rejected(
                format!("Cannot unassign task {id} with status {}", t.status.as_str()),
                json!({ "taskId": id, "status": t.status.as_str() }),
            ));
        }
        let Some(prev) = t.assigned_to.take() else {
            return Err(TaskError::rejected(format!("Task {id} is not currently assigned"), json!({ "taskId": id })));
        };
        *prev_slot.lock() = Some(prev);
        t.status = Status::Pending;
        t.updated_at = now;
        Ok(())
    })
    .await?;
    let previous = previous.lock().take();
    let event = Event::new(
        "task.unassigned",
        task_id,
        json!({ "taskId": task_id, "previousAssignment": previous }),
        json!({ "unassignedBy": who.to_string(), "unassignedAt": timestamp(now) }),
    );
    let written = write_task(state, task_id, incarnation, vec![], vec![event], false).await;
    drop(guard);
    written.await?;
    drop(cell);
    Ok(json!({ "taskId": task_id, "previousAssignment": previous, "unassignedAt": timestamp(now) }))
}

/// Highest priority first, then the oldest, then the smallest id; only
/// pending tasks that are unassigned or assigned to this worker.
async fn claim(state: &AppState, who: &PrincipalKey, p: &Params<'_>) -> TaskResult<Value> {
    let worker = p.string("workerId", 256)?.to_owned();
    p.opt_int("maxTasks", 1, 10)?;
    let mut candidates: Vec<(String, TaskRecord, Option<String>)> = visible_tasks_of(state, who, Permission::Write)
        .filter(|(_, t, _)| t.status == Status::Pending && t.assigned_to.as_ref().is_none_or(|a| *a == worker))
        .collect();
    candidates.sort_by(|(ia, a, _), (ib, b, _)| {
        b.priority.cmp(&a.priority).then_with(|| a.created_at.cmp(&b.created_at)).then_with(|| ia.cmp(ib))
    });
    for (task_id, _, incarnation) in candidates {
        let incarnation = incarnation.as_deref();
        let cell = state.tasks.cell(&task_id);
        let guard = cell.order.write().await;
        let w = worker.clone();
        let now = now_ms();
        let won = change_task(state, &task_id, incarnation, move |t| {
            if t.status != Status::Pending || t.assigned_to.as_ref().is_some_and(|a| *a != w) {
                return Err(TaskError::rejected("taken", Value::Null));
            }
            t.status = Status::InProgress;
            t.assigned_to = Some(w);
            t.updated_at = now;
            Ok(())
        })
        .await;
        let task = match won {
            Ok(task) => task,
            Err(TaskError::Rejected { .. }) => {
                drop(guard);
                continue;
            }
            Err(e) => return Err(e),
        };
        let event = Event::new(
            "task.claimed",
            &task_id,
            json!({ "taskId": task_id, "workerId": worker }),
            json!({ "claimedAt": timestamp(now), "claimedBy": who.to_string() }),
        );
        let written = write_task(state, &task_id, incarnation, vec![], vec![event], false).await;
        drop(guard);
        written.await?;
        drop(cell);
        let mut row = task.row(&task_id);
        let view = state.views.get(state.store.as_ref(), &main_path(&task_id)).await?;
        let mut attachments = Map::new();
        for (key, entry) in keyed(&view, &task_id) {
            attachments.insert(key.to_owned(), attachment_json(&task_id, key, entry));
        }
        row["attachmentCount"] = json!(attachments.len());
        row["attachments"] = Value::Object(attachments);
        return Ok(json!({ "claimed": true, "taskId": task_id, "task": row }));
    }
    Ok(json!({ "claimed": false }))
}

/// Absent, null, "", [] and {} are empty: the task failed. 0 and false are results.
fn is_empty_result(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::Null) => true,
        Some(Value::String(s)) => s.is_empty(),
        Some(Value::Array(a)) => a.is_empty(),
        Some(Value::Object(o)) => o.is_empty(),
        Some(_) => false,
    }
}

async fn complete(state: &AppState, who: &PrincipalKey, p: &Params<'_>) -> TaskResult<Value> {
    let task_id = match (p.opt_string("id", 128)?, p.opt_string("taskId", 128)?) {
        (Some(id), _) | (None, Some(id)) => id,
        (None, None) => return Err(TaskError::invalid("id", "Either 'id' or 'taskId' must be provided")),
    };
    let worker = p.opt_string("workerId", 256)?.map(str::to_owned);
    let result = p.get("result").cloned();
    let failed = is_empty_result(result.as_ref());
    let (entity, task) = task_for(state, who, task_id, Permission::Write, Missing::TaskColon).await?;
    let incarnation = entity.incarnation.as_deref();
    let next = if failed { Status::Failed } else { Status::Completed };
    may_complete(task_id, &task, next, worker.as_deref())?;
    if let (false, Some(value)) = (failed, &result) {
        let input = AttachmentInput {
            task_id: task_id.to_owned(),
            key: "result".into(),
            kind: AttachmentKind::Json,
            value: Some(value.clone()),
            content: None,
            url: None,
            mime_type: None,
            size: None,
            data: None,
        };
        put_attachment(state, who, input).await?;
    }
    let cell = state.tasks.cell(task_id);
    let guard = cell.order.write().await;
    let now = now_ms();
    let (id, stored, by) = (task_id.to_owned(), if failed { None } else { result }, worker.clone());
    let task = change_task(state, task_id, incarnation, move |t| {
        may_complete(&id, t, next, by.as_deref())?;
        t.status = next;
        t.error = failed.then(|| "No result provided".to_owned());
        t.result = stored;
        t.completed_at = Some(now);
        t.updated_at = now;
        Ok(())
    })
    .await?;
    let event = Event::new(
        "task.completed",
        task_id,
        json!({ "id": task_id, "status": next.as_str(), "duration": now - task.created_at }),
        // As ClaudeBench: the worker named, else the assignee.
        json!({ "completedBy": worker.clone().or_else(|| task.assigned_to.clone()).unwrap_or_else(|| who.to_string()) }),
    );
    let written = write_task(state, task_id, incarnation, vec![], vec![event], false).await;
    drop(guard);
    written.await?;
    drop(cell);
    Ok(json!({ "id": task_id, "status": next.as_str(), "completedAt": timestamp(now) }))
}

/// ClaudeBench's rule for `task.complete`: the task has an assignee and is
/// not final, so an assigned task completes whether it is still `pending`
/// (`task.assign` leaves it there) or `in_progress` (claimed). A worker,
/// when given, must be the assignee.
fn may_complete(task_id: &str, task: &TaskRecord, next: Status, worker: Option<&str>) -> TaskResult<()> {
    if task.status.is_final() {
        return Err(illegal(task_id, task.status, next));
    }
    let Some(assignee) = &task.assigned_to else {
        return Err(TaskError::rejected(
            format!("Task {task_id} is not assigned"),
            json!({ "taskId": task_id, "status": task.status.as_str() }),
        ));
    };
    match worker {
        Some(w) if w != assignee => Err(TaskError::rejected(
            format!("Task {task_id} is assigned to {assignee}, not {w}"),
            json!({ "taskId": task_id, "currentAssignment": assignee }),
        )),
        _ => Ok(()),
    }
}

/// Marks the task deleted (a tombstone keeps its grants, so readers of the
/// events stream can still be told who may see its past events), closes its
/// main stream with the `task.deleted` event, and deletes its attachment bytes.
async fn delete(state: &AppState, who: &PrincipalKey, p: &Params<'_>) -> TaskResult<Value> {
    let id = p.string("id", 128)?;
    let entity = task_entity(state, who, id, Permission::Delete, Missing::TaskColon).await?;
    let incarnation = entity.incarnation.as_deref();
    let cell = state.tasks.cell(id);
    let _guard = cell.order.write().await;
    let now = now_ms();
    change_task(state, id, incarnation, move |t| {
        t.deleted_at = Some(now);
        t.updated_at = now;
        Ok(())
    })
    .await?;
    let event = Event::new(
        "task.deleted",
        id,
        json!({ "id": id, "deletedAt": timestamp(now), "deletedBy": who.to_string() }),
        json!({ "instanceId": who.to_string() }),
    );
    write_task(state, id, incarnation, vec![], vec![event], true).await.await?;
    let prefix = format!("/{TASK_TYPE}/{id}/attachments/");
    for info in state.store.list_prefix(&prefix, usize::MAX).await {
        match state.store.delete(&info.path).await {
            Ok(()) | Err(StoreError::NotFound) | Err(StoreError::Gone) => {}
            Err(e) => return Err(e.into()),
        }
    }
    // Nothing reads a deleted task's view again: it goes now, not when the LRU reaches it.
    state.views.forget(&main_path(id));
    drop(_guard);
    drop(cell);
    let over = {
        let mut kept = state.tasks.tombstones.lock();
        kept.push_back(Tombstone {
            id: id.to_owned(),
            incarnation: entity.incarnation.clone(),
            owner: entity.created_by.clone(),
        });
        evict_tombstones(&mut kept, state.config.deleted_tasks_kept, &entity.created_by)
    };
    for old in over {
        drop_tombstone(state, &old.id, old.incarnation.as_deref()).await?;
    }
    Ok(json!({ "id": id, "deleted": true, "deletedAt": timestamp(now) }))
}

/// A deleted task whose record is kept (so its id stays taken and its events
/// stay visible to those who could see it), and who created it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tombstone {
    id: String,
    incarnation: Option<String>,
    owner: String,
}

/// Takes the tombstones past `budget` out of `kept`, each the oldest of the
/// principal holding the most (the deleter first among equals): one
/// principal's deletions never push out the tombstones of a principal that
/// holds fewer than it does, so no one can erase another's history (and take
/// its ids) by deleting tasks of its own; the total stays within `budget`.
fn evict_tombstones(kept: &mut VecDeque<Tombstone>, budget: usize, deleter: &str) -> Vec<Tombstone> {
    let mut out = Vec::new();
    if kept.len() <= budget {
        return out;
    }
    let mut counts: HashMap<String, usize> = HashMap::new();
    for t in kept.iter() {
        *counts.entry(t.owner.clone()).or_default() += 1;
    }
    while kept.len() > budget {
        let most = counts.values().copied().max().unwrap_or(0);
        let heaviest = if counts.get(deleter).copied() == Some(most) {
            deleter.to_owned()
        } else {
            let first = kept.iter().find(|t| counts.get(&t.owner).copied() == Some(most));
            first.map(|t| t.owner.clone()).unwrap_or_default()
        };
        let Some(gone) = kept.iter().position(|t| t.owner == heaviest).and_then(|at| kept.remove(at)) else { break };
        if let Some(n) = counts.get_mut(&gone.owner) {
            *n -= 1;
        }
        out.push(gone);
    }
    out
}

/// Purges the tombstone of a deleted task (its record, grants and closed main
/// stream), unless the id now names another life of the task. Past
/// `deleted_tasks_kept` tombstones the oldest go, so deleted tasks cost
/// nothing for good; their events stay on the events stream, shown to no one
/// but the system principal from then on (visibility comes from the record).
async fn drop_tombstone(state: &AppState, task_id: &str, incarnation: Option<&str>) -> TaskResult<()> {
    let Some(url) = task_url(task_id) else { return Ok(()) };
    let cell = state.tasks.cell(task_id);
    let _guard = cell.order.write().await;
    let still_this_tombstone =
        state.registry.entity_shared(&url.to_string()).await.is_some_and(|e| {
            e.incarnation.as_deref() == incarnation && e.entity_type == TASK_TYPE && !is_live_task(&e)
        });
    if still_this_tombstone {
        crate::entities::purge_entity(state, &url).await?;
    }
    Ok(())
}

/// Startup: the tombstones of tasks deleted before, oldest deletion first;
/// those past `deleted_tasks_kept` are purged now.
pub async fn load_tombstones(state: &AppState) -> TaskResult<()> {
    let mut deleted: Vec<(i64, Tombstone)> = state
        .registry
        .entities(Some(TASK_TYPE))
        .into_iter()
        .filter_map(|e| {
            let deleted_at = e.extra.as_ref()?.get("deletedAt")?.as_i64()?;
            Some((deleted_at, Tombstone { id: e.instance_id, incarnation: e.incarnation, owner: e.created_by }))
        })
        .collect();
    deleted.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.id.cmp(&b.1.id)));
    let mut kept: VecDeque<Tombstone> = deleted.into_iter().map(|(_, t)| t).collect();
    let over = evict_tombstones(&mut kept, state.config.deleted_tasks_kept, "");
    for old in over {
        drop_tombstone(state, &old.id, old.incarnation.as_deref()).await?;
    }
    state.tasks.tombstones.lock().extend(kept);
    Ok(())
}

// ---------------------------------------------------------------- attachments

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachmentKind {
    Json,
    Markdown,
    Text,
    Url,
    Binary,
}

impl AttachmentKind {
    pub fn parse(s: &str) -> Option<AttachmentKind> {
        Some(match s {
            "json" => AttachmentKind::Json,
            "markdown" => AttachmentKind::Markdown,
            "text" => AttachmentKind::Text,
            "url" => AttachmentKind::Url,
            "binary" => AttachmentKind::Binary,
            _ => return None,
        })
    }
    pub fn as_str(self) -> &'static str {
        match self {
            AttachmentKind::Json => "json",
            AttachmentKind::Markdown => "markdown",
            AttachmentKind::Text => "text",
            AttachmentKind::Url => "url",
            AttachmentKind::Binary => "binary",
        }
    }
    fn default_mime(self) -> &'static str {
        match self {
            AttachmentKind::Json => "application/json",
            AttachmentKind::Markdown => "text/markdown",
            AttachmentKind::Text => "text/plain",
            AttachmentKind::Url => "text/uri-list",
            AttachmentKind::Binary => ContentType::OCTET_STREAM,
        }
    }
}

const TYPES: &str = "json, markdown, text, url, binary";

/// A validated `task.create_attachment` request.
pub struct AttachmentInput {
    task_id: String,
    key: String,
    kind: AttachmentKind,
    value: Option<Value>,
    content: Option<String>,
    url: Option<String>,
    mime_type: Option<String>,
    size: Option<u64>,
    data: Option<Vec<u8>>,
}

/// http(s) URLs with a host; never fetched.
fn valid_url(s: &str) -> bool {
    match s.parse::<axum::http::Uri>() {
        Ok(uri) => {
            matches!(uri.scheme_str(), Some("http" | "https"))
                && uri.host().is_some_and(|h| !h.is_empty())
                && !s.chars().any(char::is_whitespace)
        }
        Err(_) => false,
    }
}

fn parse_attachment(p: &Params<'_>) -> TaskResult<AttachmentInput> {
    let task_id = p.string("taskId", 128)?.to_owned();
    let key = p.string("key", 100)?.to_owned();
    if key.chars().any(char::is_control) {
        return Err(TaskError::invalid("key", "key must not contain control characters"));
    }
    let kind = p
        .opt_enum("type", AttachmentKind::parse, TYPES)?
        .ok_or_else(|| TaskError::invalid("type", format!("type is required: one of {TYPES}")))?;
    let mime_type = p.opt_string("mimeType", 255)?.map(str::to_owned);
    if let Some(m) = &mime_type {
        ContentType::parse(m).map_err(|_| TaskError::invalid("mimeType", format!("invalid mimeType {m:?}")))?;
    }
    let size = match p.get("size") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .filter(|n| *n > 0)
                .ok_or_else(|| TaskError::invalid("size", "size must be a positive integer"))?,
        ),
    };
    let content = p.opt_str("content")?.map(str::to_owned);
    let url = p.opt_str("url")?.map(str::to_owned);
    let data = match p.opt_str("data")? {
        None => None,
        Some(b64) => {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .map_err(|_| TaskError::invalid("data", "data must be base64"))?;
            if bytes.len() > MAX_INLINE_BINARY {
                return Err(TaskError::invalid(
                    "data",
                    format!(
                        "data is over {MAX_INLINE_BINARY} bytes: upload it to /_electric/entities/task/{task_id}/attachments with a key field"
                    ),
                ));
            }
            Some(bytes)
        }
    };
    let value = p.present("value").then(|| p.get("value").cloned().unwrap_or(Value::Null));
    // Each field belongs to the types that use it; one meant for another type is a mistake worth reporting.
    let misplaced = |field: &str, kinds: &[AttachmentKind]| -> TaskResult<()> {
        if p.present(field) && !kinds.contains(&kind) {
            return Err(TaskError::invalid(field, format!("{field} is not used by {} attachments", kind.as_str())));
        }
        Ok(())
    };
    misplaced("value", &[AttachmentKind::Json])?;
    misplaced("content", &[AttachmentKind::Markdown, AttachmentKind::Text])?;
    misplaced("url", &[AttachmentKind::Url, AttachmentKind::Binary])?;
    misplaced("data", &[AttachmentKind::Binary])?;
    match kind {
        AttachmentKind::Json => {
            let v =
                value.as_ref().ok_or_else(|| TaskError::invalid("value", "JSON attachments require a value field"))?;
            if serde_json::to_vec(v).map(|b| b.len()).unwrap_or(usize::MAX) > MAX_INLINE_BYTES {
                return Err(TaskError::invalid("value", format!("value is over {MAX_INLINE_BYTES} bytes")));
            }
        }
        AttachmentKind::Markdown | AttachmentKind::Text => {
            let c = content.as_ref().ok_or_else(|| {
                TaskError::invalid("content", format!("{} attachments require a content field", kind.as_str()))
            })?;
            if c.len() > MAX_INLINE_BYTES {
                return Err(TaskError::invalid("content", format!("content is over {MAX_INLINE_BYTES} bytes")));
            }
        }
        AttachmentKind::Url => {
            url.as_ref().ok_or_else(|| TaskError::invalid("url", "URL attachments require a url field"))?;
        }
        AttachmentKind::Binary => {}
    }
    if let Some(u) = &url {
        if !valid_url(u) {
            return Err(TaskError::invalid("url", "url must be an http or https URL"));
        }
    }
    if let (Some(bytes), Some(declared)) = (&data, size) {
        if bytes.len() as u64 != declared {
            return Err(TaskError::invalid("size", format!("size is {declared} but data holds {} bytes", bytes.len())));
        }
    }
    Ok(AttachmentInput { task_id, key, kind, value, content, url, mime_type, size, data })
}

/// The keyed, complete attachments of task `task_id`'s view: key → entry.
/// An entry naming a stream other than the one derived for it is no attachment.
fn keyed<'v>(view: &'v MainView, task_id: &str) -> impl Iterator<Item = (&'v str, &'v ManifestEntry)> {
    let url = task_url(task_id);
    view.by_name.iter().filter_map(move |(name, id)| {
        let url = url.as_ref()?;
        view.manifest.get(id).filter(|e| usable(url, e)).map(|e| (name.as_str(), e))
    })
}

/// Complete, and pointing at its own bytes (see [`ManifestEntry::bytes_path`]).
fn usable(url: &EntityUrl, e: &ManifestEntry) -> bool {
    e.status == AttachmentStatus::Complete && e.names_its_own_stream(url)
}

/// `/principal/user%3Aalice` → `user:alice` (the form the task API shows).
fn principal_key_of(url: &str) -> String {
    url.strip_prefix("/principal/")
        .and_then(|encoded| attache_core::principal::percent_decode_strict(encoded).ok())
        .unwrap_or_else(|| url.to_owned())
}

/// An attachment as the task API shows it. Uploads (no `taskType`) are binary.
pub fn attachment_json(task_id: &str, key: &str, e: &ManifestEntry) -> Value {
    let kind =
        e.ext.get("taskType").and_then(Value::as_str).and_then(AttachmentKind::parse).unwrap_or(AttachmentKind::Binary);
    let mut out = Map::new();
    out.insert("id".into(), json!(e.id));
    out.insert("taskId".into(), json!(task_id));
    out.insert("key".into(), json!(key));
    out.insert("type".into(), json!(kind.as_str()));
    match kind {
        AttachmentKind::Json => {
            out.insert("value".into(), e.ext.get("value").cloned().unwrap_or(Value::Null));
        }
        AttachmentKind::Markdown | AttachmentKind::Text => {
            out.insert("content".into(), e.ext.get("content").cloned().unwrap_or(json!("")));
        }
        AttachmentKind::Url | AttachmentKind::Binary => {
            if let Some(u) = e.ext.get("url") {
                out.insert("url".into(), u.clone());
            }
        }
    }
    if let Some(size) = e.ext.get("size").cloned().or_else(|| e.byte_length.map(|n| json!(n))) {
        out.insert("size".into(), size);
    }
    if kind == AttachmentKind::Binary || e.mime_type != kind.default_mime() {
        out.insert("mimeType".into(), json!(e.mime_type));
    }
    if e.byte_length.is_some() {
        out.insert("streamPath".into(), json!(e.stream_path));
        if let Some(sha) = &e.sha256 {
            out.insert("sha256".into(), json!(sha));
        }
    }
    if let Some(by) = &e.created_by {
        out.insert("createdBy".into(), json!(principal_key_of(by)));
    }
    out.insert("createdAt".into(), json!(e.created_at));
    out.insert("updatedAt".into(), e.ext.get("updatedAt").cloned().unwrap_or_else(|| json!(e.created_at)));
    Value::Object(out)
}

/// Writes `bytes` as the closed attachment stream at `path`.
async fn write_bytes(state: &AppState, who: &PrincipalKey, path: &str, mime: &str, bytes: Vec<u8>) -> TaskResult<()> {
    state
        .store
        .create(CreateStream {
            path: StreamPath::new(path).map_err(TaskError::internal)?,
            content_type: ContentType::parse(mime).ok(),
            ttl: None,
            expires_at: None,
            closed: true,
            initial: bytes.into(),
            fork: None,
            owner: Some(who.to_string()),
        })
        .await?;
    Ok(())
}

/// Creates or replaces the attachment `input.key` of a task. A replacement
/// keeps the id and createdAt and rewrites every other field, so nothing of
/// the old type survives. Returns the entry as written.
async fn put_attachment(state: &AppState, who: &PrincipalKey, input: AttachmentInput) -> TaskResult<ManifestEntry> {
    let task_id = input.task_id.as_str();
    let entity = task_entity(state, who, task_id, Permission::Write, Missing::TaskNotFound).await?;
    if !entity.is_running() {
        return Err(task_missing(Missing::TaskNotFound, task_id));
    }
    let main = main_path(task_id);
    let cell = state.tasks.cell(task_id);
    let shared = cell.order.read().await;
    // A deletion may have finished while we waited for the lock.
    let incarnation = entity.incarnation.as_deref();
    // A deletion may have finished while we waited for the lock (or the task been purged and created anew).
    if !state
        .registry
        .entity_shared(&entity.url)
        .await
        .is_some_and(|e| e.is_running() && e.incarnation == entity.incarnation)
    {
        drop(shared);
        drop(cell);
        return Err(task_missing(Missing::TaskNotFound, task_id));
    }
    let key_lock = cell.key_lock(&input.key);
    let key_guard = key_lock.lock().await;
    let existing = match cell.pending(&input.key) {
        Some(entry) => entry,
        None => {
            let view = state.views.get(state.store.as_ref(), &main).await?;
            view.by_name.get(&input.key).and_then(|id| view.manifest.get(id)).cloned()
        }
    };
    let now = now_ms();
    let (id, created_at) = match &existing {
        Some(e) => (e.id.clone(), e.created_at.clone()),
        None => (new_attachment_id(), timestamp(now)),
    };
    let mime = input.mime_type.clone().unwrap_or_else(|| input.kind.default_mime().to_owned());
    let mut ext = Map::new();
    ext.insert("name".into(), json!(input.key));
    ext.insert("taskType".into(), json!(input.kind.as_str()));
    ext.insert("updatedAt".into(), json!(timestamp(now)));
    let mut stored_bytes = 0u64;
    if let Some(v) = &input.value {
        stored_bytes += serde_json::to_vec(v).map(|b| b.len() as u64).unwrap_or(0);
        ext.insert("value".into(), v.clone());
    }
    if let Some(c) = &input.content {
        stored_bytes += c.len() as u64;
        ext.insert("content".into(), json!(c));
    }
    if let Some(u) = &input.url {
        ext.insert("url".into(), json!(u));
    }
    if let Some(s) = input.size {
        ext.insert("size".into(), json!(s));
    }
    let url = EntityUrl::new(TASK_TYPE, task_id).map_err(TaskError::internal)?;
    // The old version's bytes, at the address derived for them (a row naming another is followed nowhere).
    let old_bytes = existing.as_ref().filter(|e| e.byte_length.is_some()).and_then(|e| e.bytes_path(&url));
    let mut entry = ManifestEntry {
        key: ManifestEntry::row_key(&id),
        kind: "attachment".into(),
        id: id.clone(),
        stream_path: url.attachment_stream(&id),
        status: AttachmentStatus::Complete,
        // Electric's manifest rows always name a subject; a task attachment is context for its task.
        subject: Some(Subject { kind: "context".into(), key: input.key.clone() }),
        role: Role::Output,
        mime_type: mime.clone(),
        filename: None,
        byte_length: None,
        sha256: None,
        created_at,
        created_by: Some(who.url()),
        error: None,
        meta: None,
        ext,
    };
    if let Some(bytes) = input.data {
        // A new version of the bytes gets its own stream; the old one goes once the row points away from it.
        if old_bytes.as_deref() == Some(entry.stream_path.as_str())
            || state.store.head(&entry.stream_path).await.is_ok()
        {
            let version = radix36(rand::random::<u64>(), BYTES_VERSION_LEN);
            entry.stream_path = versioned_attachment_stream(&url, &id, &version)
                .ok_or_else(|| TaskError::internal("a bytes version is base-36 digits"))?;
        }
        stored_bytes += bytes.len() as u64;
        entry.byte_length = Some(bytes.len() as u64);
        entry.sha256 = Some(hex::encode(Sha256::digest(&bytes)));
        write_bytes(state, who, &entry.stream_path, &mime, bytes).await?;
    }
    let row = Row::Upsert { entry: Box::new(entry.clone()), insert: existing.is_none() };
    let event = Event::new(
        "task.attachment_created",
        task_id,
        json!({
            "taskId": task_id,
            "key": input.key,
            "type": input.kind.as_str(),
            "attachmentId": id,
            "instanceId": who.to_string(),
            "timestamp": now,
        }),
        json!({ "createdBy": who.to_string() }),
    );
    let written = write_task(state, task_id, incarnation, vec![row], vec![event], false).await;
    let seq = cell.record(&input.key, Some(entry.clone()));
    drop(key_guard);
    drop(shared);
    let outcome = written.await;
    cell.settle(&input.key, seq);
    cell.release_key(&input.key, key_lock);
    drop(cell);
    outcome?;
    if let Some(old) = old_bytes.filter(|old| *old != entry.stream_path) {
        let _ = state.store.delete(&old).await;
    }
    state.metrics.attachment_created(input.kind.as_str(), stored_bytes);
    Ok(entry)
}

async fn create_attachment(state: &AppState, who: &PrincipalKey, p: &Params<'_>) -> TaskResult<Value> {
    let input = parse_attachment(p)?;
    let (task_id, key, kind) = (input.task_id.clone(), input.key.clone(), input.kind);
    let entry = put_attachment(state, who, input).await?;
    Ok(json!({
        "id": entry.id,
        "taskId": task_id,
        "key": key,
        "type": kind.as_str(),
        "createdAt": entry.created_at,
    }))
}

/// The attachment `key` of a task `who` may read, or `None`.
async fn find_attachment(state: &AppState, who: &PrincipalKey, task_id: &str, key: &str) -> TaskResult<Option<Value>> {
    if task_entity(state, who, task_id, Permission::Read, Missing::TaskNotFound).await.is_err() {
        return Ok(None);
    }
    let Some(url) = task_url(task_id) else { return Ok(None) };
    let view = state.views.get(state.store.as_ref(), &main_path(task_id)).await?;
    Ok(view
        .by_name
        .get(key)
        .and_then(|id| view.manifest.get(id))
        .filter(|e| usable(&url, e))
        .map(|e| attachment_json(task_id, key, e)))
}

async fn get_attachment(state: &AppState, who: &PrincipalKey, p: &Params<'_>) -> TaskResult<Value> {
    let task_id = p.string("taskId", 128)?;
    let key = p.string("key", 100)?;
    match find_attachment(state, who, task_id, key).await? {
        Some(found) => Ok(found),
        None => Err(TaskError::rejected(
            format!("Attachment with key '{key}' not found for task {task_id}"),
            json!({ "taskId": task_id, "key": key }),
        )),
    }
}

/// Ordered by creation time, then id: stable across calls and upserts (an upsert keeps createdAt).
async fn list_attachments(state: &AppState, who: &PrincipalKey, p: &Params<'_>) -> TaskResult<Value> {
    let task_id = p.string("taskId", 128)?;
    let kind = p.opt_enum("type", AttachmentKind::parse, TYPES)?;
    let limit = p.opt_int("limit", 1, 100)?.unwrap_or(50) as usize;
    let offset = p.opt_int("offset", 0, i64::MAX)?.unwrap_or(0) as usize;
    task_entity(state, who, task_id, Permission::Read, Missing::TaskNotFound).await?;
    let view = state.views.get(state.store.as_ref(), &main_path(task_id)).await?;
    let mut all: Vec<Value> = keyed(&view, task_id)
        .map(|(key, e)| attachment_json(task_id, key, e))
        .filter(|a| kind.is_none_or(|k| a["type"] == k.as_str()))
        .collect();
    drop(view);
    all.sort_by(|a, b| {
        let (ca, cb) = (a["createdAt"].as_str().unwrap_or(""), b["createdAt"].as_str().unwrap_or(""));
        ca.cmp(cb).then_with(|| a["id"].as_str().cmp(&b["id"].as_str()))
    });
    let total = all.len();
    let page: Vec<Value> = all.into_iter().skip(offset).take(limit).collect();
    Ok(json!({ "attachments": page, "totalCount": total, "hasMore": offset.saturating_add(limit) < total }))
}

/// All or nothing: when any item is missing (or its task is not readable),
/// the call fails with -32602 naming the first missing item in `data.taskId`
/// and `data.key`, and every missing item in `data.missing`.
async fn get_attachments_batch(state: &AppState, who: &PrincipalKey, p: &Params<'_>) -> TaskResult<Value> {
    let requests = match p.get("requests") {
        Some(Value::Array(items)) if !items.is_empty() && items.len() <= 100 => items,
        _ => return Err(TaskError::invalid("requests", "requests must be an array of 1 to 100 {taskId, key} items")),
    };
    let mut wanted = Vec::with_capacity(requests.len());
    for item in requests {
        let Value::Object(m) = item else {
            return Err(TaskError::invalid("requests", "each request is an object {taskId, key}"));
        };
        let ip = Params(m);
        wanted.push((ip.string("taskId", 128)?.to_owned(), ip.string("key", 100)?.to_owned()));
    }
    let mut found = Vec::with_capacity(wanted.len());
    let mut missing = Vec::new();
    for (task_id, key) in &wanted {
        match find_attachment(state, who, task_id, key).await? {
            Some(attachment) => found.push(attachment),
            None => missing.push(json!({ "taskId": task_id, "key": key })),
        }
    }
    if let Some(first) = missing.first() {
        let (t, k) = (first["taskId"].as_str().unwrap_or(""), first["key"].as_str().unwrap_or(""));
        return Err(TaskError::rejected(
            format!("Attachment not found: {t}/{k}"),
            json!({ "taskId": t, "key": k, "missing": missing }),
        ));
    }
    Ok(json!({ "attachments": found }))
}

async fn delete_attachment(state: &AppState, who: &PrincipalKey, p: &Params<'_>) -> TaskResult<Value> {
    let task_id = p.string("taskId", 128)?;
    let key = p.string("key", 100)?;
    let not_found = || {
        TaskError::rejected(
            format!("Attachment '{key}' not found for task {task_id}"),
            json!({ "taskId": task_id, "key": key }),
        )
    };
    let entity =
        task_entity(state, who, task_id, Permission::Write, Missing::TaskNotFound).await.map_err(|e| match e {
            TaskError::Rejected { .. } => not_found(),
            other => other,
        })?;
    if !entity.is_running() {
        return Err(not_found());
    }
    let cell = state.tasks.cell(task_id);
    let shared = cell.order.read().await;
    let incarnation = entity.incarnation.as_deref();
    // A deletion may have finished while we waited for the lock (or the task been purged and created anew).
    if !state
        .registry
        .entity_shared(&entity.url)
        .await
        .is_some_and(|e| e.is_running() && e.incarnation == entity.incarnation)
    {
        drop(shared);
        drop(cell);
        return Err(not_found());
    }
    let key_lock = cell.key_lock(key);
    let key_guard = key_lock.lock().await;
    let existing = match cell.pending(key) {
        Some(entry) => entry,
        None => {
            let view = state.views.get(state.store.as_ref(), &main_path(task_id)).await?;
            view.by_name.get(key).and_then(|id| view.manifest.get(id)).cloned()
        }
    };
    let Some(entry) = existing else {
        drop(key_guard);
        drop(shared);
        cell.release_key(key, key_lock);
        drop(cell);
        return Err(not_found());
    };
    let now = now_ms();
    let row = Row::Delete { row_key: ManifestEntry::row_key(&entry.id) };
    let event = Event::new(
        // ClaudeBench's delete handler emits this type (with a dot), its create handler `task.attachment_created`.
        "task.attachment.deleted",
        task_id,
        json!({ "taskId": task_id, "key": key, "attachmentId": entry.id }),
        json!({ "deletedBy": who.to_string(), "deletedAt": timestamp(now) }),
    );
    let written = write_task(state, task_id, incarnation, vec![row], vec![event], false).await;
    let seq = cell.record(key, None);
    drop(key_guard);
    drop(shared);
    let outcome = written.await;
    cell.settle(key, seq);
    cell.release_key(key, key_lock);
    drop(cell);
    outcome?;
    // Only the address derived for the bytes is deleted, never a path the row names.
    if let Some(path) = entry.byte_length.and(task_url(task_id)).and_then(|url| entry.bytes_path(&url)) {
        let _ = state.store.delete(&path).await;
    }
    Ok(json!({ "id": entry.id, "taskId": task_id, "key": key, "deleted": true, "deletedAt": timestamp(now) }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_move_forward_only() {
        use Status::*;
        assert!(Pending.may_become(InProgress));
        assert!(InProgress.may_become(Completed));
        assert!(InProgress.may_become(Failed));
        assert!(InProgress.may_become(Pending));
        assert!(Pending.may_become(Pending));
        assert!(!Pending.may_become(Completed));
        assert!(!Pending.may_become(Failed));
        for s in [Pending, InProgress, Completed, Failed] {
            assert!(!Completed.may_become(s));
            assert!(!Failed.may_become(s));
        }
    }

    #[test]
    fn ids_are_unique_within_a_millisecond() {
        let ids: std::collections::HashSet<String> = (0..1000).map(|_| new_task_id()).collect();
        assert_eq!(ids.len(), 1000);
        let a = new_attachment_id();
        let parts: Vec<&str> = a.split('-').collect();
        assert_eq!(parts[0], "ta");
        assert!(parts[1].parse::<i64>().is_ok());
        assert_eq!(parts[2].len(), 9);
    }

    #[test]
    fn only_http_urls_are_accepted() {
        assert!(valid_url("https://docs.example.com/database-optimization-guide"));
        assert!(valid_url("http://localhost:8080/x?y=1"));
        for bad in ["ftp://x.org/a", "javascript:alert(1)", "file:///etc/passwd", "https://", "not a url", "/relative"]
        {
            assert!(!valid_url(bad), "{bad}");
        }
    }

    #[test]
    fn empty_results_fail_but_falsy_values_do_not() {
        assert!(is_empty_result(None));
        for v in [json!(null), json!(""), json!([]), json!({})] {
            assert!(is_empty_result(Some(&v)), "{v}");
        }
        for v in [json!(0), json!(false), json!("x"), json!([0])] {
            assert!(!is_empty_result(Some(&v)), "{v}");
        }
    }
}

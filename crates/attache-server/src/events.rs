//! Task events: the global events stream `/_attache/events`, its filtered
//! read face (`GET /_attache/events`, catch-up, long-poll and SSE), and the
//! Redis publisher.
//!
//! Every event is one JSON message `{id, type, taskId, payload, metadata,
//! timestamp}` on the global stream (and a row of collection `event` on its
//! task's main stream). Readers see only the events of tasks they may read;
//! the offsets they get are the global stream's, so a reader that goes away
//! resumes where it stopped and misses nothing. WebSocket pushes and Redis
//! publishes tail the same stream, so they carry only durable events, in order.

use std::collections::HashMap;

use attache_core::{ContentType, Offset, Permission, PrincipalKey, ReadOffset, StreamPath};
use attache_storage::{AppendRequest, CreateStream, ReadFrom, StoreError, StreamStore};
use axum::extract::{RawQuery, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use serde_json::Value;

use crate::access::may;
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::headers as h;
use crate::http::set_offset;
use crate::sse::event as sse_event;
use crate::AppState;

/// The global events stream.
pub const EVENTS_PATH: &str = "/_attache/events";
/// The collection of event rows on a task's main stream.
pub const EVENT_COLLECTION: &str = attache_core::state::EVENT;
/// The principal that owns the events stream.
pub const OWNER: &str = "system:attache";

/// Creates the events stream unless it exists.
pub async fn ensure_stream(store: &dyn StreamStore) -> Result<(), StoreError> {
    let created = store
        .create(CreateStream {
            path: StreamPath::new(EVENTS_PATH).map_err(|e| StoreError::Invalid(e.to_string()))?,
            content_type: ContentType::parse("application/json").ok(),
            ttl: None,
            expires_at: None,
            closed: false,
            initial: Bytes::new(),
            fork: None,
            owner: Some(OWNER.into()),
            take_kept_path: true,
        })
        .await;
    match created {
        Ok(_) | Err(StoreError::ConfigMismatch(_)) => Ok(()),
        Err(e) => Err(e),
    }
}

/// The append of events (serialized envelopes, one message each) to the global stream.
pub fn events_append(envelopes: &[Vec<u8>]) -> AppendRequest {
    AppendRequest::json_messages(EVENTS_PATH.into(), crate::rows::json_content_type(), envelopes, false)
}

/// Events read from the global stream, each with `offset`: where to resume after it.
pub struct Batch {
    pub events: Vec<Value>,
    pub next: Offset,
    pub up_to_date: bool,
}

/// Reads committed events from `from`. Each event gets the offset just past
/// it (JSON messages take `len + 1` positions; when a batch does not add up,
/// only its last event is stamped, with the batch's end).
///
/// Large pages of the log are split and parsed a few at a time, all
/// readers together ([`turns`]): a reader waits its turn (first come, first
/// served) rather than every reader parsing at once. A reader scanning the
/// log ([`SCAN_FROM`] or more behind its tail) first takes room for the page
/// and its parse from the response budget, within its principal's share
/// (`who`; `None`: the server's own reader), before it reads anything
/// ([`scan_room`]): readers in line for a turn hold no page, and one
/// principal's scans hold at most its share. Session 21's attack pass: each
/// reader read its page, then waited for a turn holding it; a principal that
/// may see nothing held 1 MiB per connection (3,000 long-polls: 3 GB) and
/// everyone's event reads waited behind its pages.
pub async fn read(
    state: &AppState,
    who: Option<&PrincipalKey>,
    from: Offset,
    max_bytes: usize,
    room: Room,
) -> ApiResult<Batch> {
    let store = state.store.as_ref();
    let behind = store.head(EVENTS_PATH).await?.tail.saturating_sub(from.0);
    let page = usize::try_from(behind).unwrap_or(usize::MAX).min(max_bytes);
    // Scanning: far enough behind the tail to read a page of the log, not
    // only what was just appended. Whatever its page size (an SSE reader's is
    // at most 64 KiB), a scan takes room and a turn: 2,000 SSE readers that
    // may see nothing, scanning a 20 MB log in small pages, took neither and
    // held alice's own read for seconds (session 21's second attack pass).
    let scanning = page >= SCAN_FROM;
    let _room = match scanning {
        true => {
            let held = scan_room(state, who, page.saturating_mul(SCAN_HOLD_FACTOR), room).await?;
            crate::pause::at(state, crate::pause::EVENTS_SCAN).await;
            held
        }
        false => None,
    };
    let batch = store.read(EVENTS_PATH, ReadFrom::At(from), max_bytes).await?;
    let heavy = batch.byte_len() >= crate::access::CPU_HEAVY_BYTES;
    // Only a scan waits (a live reader's page at the tail is small).
    // The semaphore is never closed; were it, the page would go on without a turn.
    let _turn = match scanning || heavy {
        true => turns().acquire().await.ok(),
        false => None,
    };
    let messages = crate::access::cpu_heavy(heavy, || batch.messages());
    Ok(parse_page(&messages, batch.start, batch.next, batch.up_to_date()))
}

/// How far behind the log's tail a reader scans ([`read`]): what one
/// answer of the response budget's smallest counted size holds.
const SCAN_FROM: usize = crate::http::SEND_BUDGET_FROM;

/// What a large page of the log holds while it is read and parsed, in times
/// its bytes: the page, and its events' trees (about twice the JSON).
const SCAN_HOLD_FACTOR: usize = 3;

/// What a reader does when the response budget has no room for its page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Room {
    /// Answer 503 `RESPONSE_BUDGET_EXHAUSTED` (a catch-up, a long-poll).
    Refuse,
    /// Wait for room, holding nothing (an SSE or WebSocket reader, the Redis
    /// publisher): it ends only at shutdown.
    Wait,
}

/// `bytes` of the response budget for a page a reader is about to scan,
/// within `who`'s share.
async fn scan_room(
    state: &AppState,
    who: Option<&PrincipalKey>,
    bytes: usize,
    room: Room,
) -> ApiResult<Option<crate::http::SendPermit>> {
    loop {
        match state.answers.try_take(who, bytes) {
            Ok(permit) => return Ok(permit),
            Err(_) if room == Room::Wait => tokio::select! {
                _ = tokio::time::sleep(std::time::Duration::from_millis(50)) => {}
                _ = state.shutdown.cancelled() => return Err(state.answers.exhausted()),
            },
            Err(_) => return Err(state.answers.exhausted()),
        }
    }
}

/// Large pages of the log (from [`CPU_HEAVY_BYTES`](crate::access::CPU_HEAVY_BYTES))
/// being split and parsed at once, process-wide: half the CPUs (at least
/// one). Every reader of the log (catch-up, long-poll, SSE, `/ws`, Redis)
/// reads it a page at a time, and a page is up to `max_read_bytes` of JSON:
/// readers that scan a long log together (32 `/ws` replays over a 16.5 MB
/// log, issue 10) took every CPU, so `/healthz` waited behind them. With
/// turns, their parsing (and so the checks of what each reader may see,
/// which follow at its pace) takes at most half the CPUs, and they wait in
/// line for the rest.
fn turns() -> &'static tokio::sync::Semaphore {
    static TURNS: std::sync::OnceLock<tokio::sync::Semaphore> = std::sync::OnceLock::new();
    TURNS.get_or_init(|| {
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        tokio::sync::Semaphore::new((cpus / 2).max(1))
    })
}

/// The events of one page of the log, `messages` read from `start` up to
/// `next`. A page is up to `max_read_bytes` (1 MiB) of events, some 3,000
/// trees of values: from [`CPU_HEAVY_BYTES`](crate::access::CPU_HEAVY_BYTES)
/// on it is parsed as heavy work ([`crate::access::cpu_heavy`]), so the
/// worker's other tasks move to another thread meanwhile. Before (issue 10),
/// 32 WebSockets replaying a 16.5 MB log parsed their pages on the async
/// workers and `/healthz` waited 0.6 s (median) to 2.1 s (p95).
pub fn parse_page(messages: &[Bytes], start: Offset, next: Offset, up_to_date: bool) -> Batch {
    let bytes: usize = messages.iter().map(Bytes::len).sum();
    crate::access::cpu_heavy(bytes >= crate::access::CPU_HEAVY_BYTES, || {
        let adds_up = start.0 + messages.iter().map(|c| c.len() as u64 + 1).sum::<u64>() == next.0;
        let mut pos = start.0;
        let last = messages.len().saturating_sub(1);
        let mut events = Vec::with_capacity(messages.len());
        for (i, chunk) in messages.iter().enumerate() {
            pos += chunk.len() as u64 + 1;
            let Ok(Value::Object(mut event)) = serde_json::from_slice::<Value>(chunk) else { continue };
            if adds_up || i == last {
                let at = if adds_up { Offset(pos) } else { next };
                event.insert("offset".into(), Value::String(at.to_string()));
            }
            events.push(Value::Object(event));
        }
        Batch { events, next, up_to_date }
    })
}

/// Remembers, for one reader, which tasks it may read (grants change rarely;
/// a reader re-checks per request or per batch), and which incarnation of
/// each: a task purged and created again under the same id is another task,
/// and its predecessor's events stay with the predecessor.
pub struct Visibility<'a> {
    state: &'a AppState,
    who: &'a PrincipalKey,
    seen: HashMap<String, Option<Incarnation>>,
    /// Events checked since the last yield to the runtime.
    checked: usize,
}

/// Events [`Visibility::may_see`] checks between yields to the runtime: a
/// page of the log holds some 3,000, each a registry lookup, and a reader
/// checked them all without letting the worker's other tasks run.
const CHECKS_PER_YIELD: usize = 256;

/// The life of a task entity whose events a reader may see.
struct Incarnation {
    id: Option<String>,
    created_at_ms: i64,
}

impl<'a> Visibility<'a> {
    pub fn new(state: &'a AppState, who: &'a PrincipalKey) -> Visibility<'a> {
        Visibility { state, who, seen: HashMap::new(), checked: 0 }
    }

    /// The events of `events` that `keep` wants and the caller may see, in order.
    pub async fn filter(&mut self, events: Vec<Value>, keep: impl Fn(&Value) -> bool) -> Vec<Value> {
        let mut out = Vec::with_capacity(events.len());
        for event in events {
            if keep(&event) && self.may_see(&event).await {
                out.push(event);
            }
        }
        out
    }

    pub async fn may_see(&mut self, event: &Value) -> bool {
        self.checked += 1;
        if self.checked >= CHECKS_PER_YIELD {
            self.checked = 0;
            tokio::task::yield_now().await;
        }
        if self.who.is_built_in_system() {
            return true;
        }
        let Some(task_id) = event.get("taskId").and_then(Value::as_str) else { return false };
        if !self.seen.contains_key(task_id) {
            let url = format!("/{}/{task_id}", attache_core::task::TASK_TYPE);
            let readable = self
                .state
                .registry
                .entity_shared(&url)
                .await
                .filter(|entity| may(self.state, self.who, entity, Permission::Read))
                .map(|entity| Incarnation { id: entity.incarnation.clone(), created_at_ms: entity.created_at_ms });
            self.seen.insert(task_id.to_owned(), readable);
        }
        match self.seen.get(task_id) {
            Some(Some(current)) => of_incarnation(event, current.id.as_deref(), current.created_at_ms),
            _ => false,
        }
    }

    /// Forgets what it learnt (call between batches of a long-lived reader).
    pub fn refresh(&mut self) {
        self.seen.clear();
    }
}

/// Is `event` about this life of its task? The server stamps every event
/// with the incarnation of the task entity it is about. An event without a
/// stamp was written before incarnations existed: it counts only for a task
/// entity that has none either (created before them too), and only from that
/// entity's creation on, so a purge and re-creation before the upgrade does
/// not hand the older task's events to the newer one.
pub fn of_incarnation(event: &Value, incarnation: Option<&str>, created_at_ms: i64) -> bool {
    match (event.get("incarnation").and_then(Value::as_str), incarnation) {
        (Some(stamp), Some(current)) => stamp == current,
        (None, None) => event.get("timestamp").and_then(Value::as_i64).is_some_and(|at| at >= created_at_ms),
        _ => false,
    }
}

/// Where a reader starts: `-1` the beginning, `now` the tail, else an offset.
pub async fn start_offset(store: &dyn StreamStore, offset: ReadOffset) -> Result<Offset, StoreError> {
    Ok(match offset {
        ReadOffset::Start => Offset::ZERO,
        ReadOffset::Now => store.head(EVENTS_PATH).await?.tail_offset(),
        ReadOffset::At(o) => o,
    })
}

struct Query {
    offset: ReadOffset,
    offset_given: bool,
    live: Option<bool>,
    task_id: Option<String>,
}

fn parse_query(raw: Option<&str>) -> ApiResult<Query> {
    let mut q = Query { offset: ReadOffset::Start, offset_given: false, live: None, task_id: None };
    for (k, v) in attache_core::query::form_pairs(raw.unwrap_or("")) {
        match k.as_str() {
            "offset" => {
                q.offset = ReadOffset::parse(Some(&v))?;
                q.offset_given = true;
            }
            "live" => {
                q.live = Some(match v.as_str() {
                    "long-poll" => false,
                    "sse" => true,
                    other => {
                        return Err(ApiError::bad_request(format!("live must be long-poll or sse, got {other:?}")))
                    }
                })
            }
            "taskId" => q.task_id = Some(v),
            _ => {}
        }
    }
    Ok(q)
}

/// A page of events as JSON, held within the response budget until it is
/// sent (`http::budgeted_json`): a catch-up page is up to `max_read_bytes` of
/// the log, and a reader that reads nothing kept it in memory uncounted
/// (session 17's "left" list).
fn json_response(
    state: &AppState,
    who: &PrincipalKey,
    events: &[Value],
    next: Offset,
    up_to_date: bool,
) -> ApiResult<Response> {
    let mut res = crate::http::budgeted_json(&state.answers, who, StatusCode::OK, &events)?;
    let hm = res.headers_mut();
    hm.insert("cache-control", HeaderValue::from_static("no-store"));
    set_offset(hm, h::STREAM_NEXT_OFFSET, next);
    if up_to_date {
        hm.insert(h::STREAM_UP_TO_DATE, HeaderValue::from_static("true"));
    }
    Ok(res)
}

/// Keeps the events of one task, when the reader asked for one.
fn wanted(task_id: &Option<String>, event: &Value) -> bool {
    task_id.as_deref().is_none_or(|t| event.get("taskId").and_then(Value::as_str) == Some(t))
}

/// GET /_attache/events?offset=..&live=long-poll|sse&taskId=..
pub async fn get_events(
    State(state): State<AppState>,
    Caller(who): Caller,
    RawQuery(raw): RawQuery,
) -> ApiResult<Response> {
    let q = parse_query(raw.as_deref())?;
    if q.live.is_some() && !q.offset_given {
        return Err(ApiError::bad_request("live reads need an offset"));
    }
    let store = state.store.clone();
    let from = start_offset(store.as_ref(), q.offset).await?;
    // Validate the offset before waiting or answering 200.
    store.read(EVENTS_PATH, ReadFrom::At(from), 0).await?;
    match q.live {
        None => {
            if q.offset == ReadOffset::Now {
                return json_response(&state, &who, &[], from, true);
            }
            let batch = read(&state, Some(&who), from, state.config.max_read_bytes, Room::Refuse).await?;
            let mut vis = Visibility::new(&state, &who);
            let events = vis.filter(batch.events, |e| wanted(&q.task_id, e)).await;
            json_response(&state, &who, &events, batch.next, batch.up_to_date)
        }
        Some(false) => long_poll(&state, &who, from, &q.task_id).await,
        Some(true) => sse(state, who, from, q.task_id).await,
    }
}

/// Pages of the event log one long-poll reads without finding an event its
/// reader may see, before it answers an empty page.
const SCAN_PAGES: usize = 16;

async fn long_poll(
    state: &AppState,
    who: &PrincipalKey,
    from: Offset,
    task_id: &Option<String>,
) -> ApiResult<Response> {
    let _live = state.metrics.live_reader();
    let store = state.store.clone();
    let mut signal = store.subscribe(EVENTS_PATH).await?;
    let deadline = tokio::time::Instant::now() + state.config.long_poll_timeout;
    let mut pos = from;
    let mut pages = 0;
    loop {
        let batch = read(state, Some(who), pos, state.config.max_read_bytes, Room::Refuse).await?;
        pos = batch.next;
        let mut vis = Visibility::new(state, who);
        let events = vis.filter(batch.events, |e| wanted(task_id, e)).await;
        if !events.is_empty() {
            return json_response(state, who, &events, pos, batch.up_to_date);
        }
        if !batch.up_to_date {
            pages += 1;
            if pages < SCAN_PAGES {
                continue;
            }
            // Nothing this reader may see in that much of the log: answer an
            // empty page where the scan stopped (the reader goes on from
            // there), instead of one request reading the whole log.
            return json_response(state, who, &[], pos, false);
        }
        tokio::select! {
            changed = signal.changed() => {
                if changed.is_err() {
                    signal = store.subscribe(EVENTS_PATH).await?;
                }
            }
            _ = tokio::time::sleep_until(deadline) => break,
            _ = state.shutdown.cancelled() => break,
        }
    }
    let mut res = StatusCode::NO_CONTENT.into_response();
    let hm = res.headers_mut();
    set_offset(hm, h::STREAM_NEXT_OFFSET, pos);
    hm.insert(h::STREAM_UP_TO_DATE, HeaderValue::from_static("true"));
    hm.insert("cache-control", HeaderValue::from_static("no-store"));
    Ok(res)
}

fn sse_control(next: Offset, up_to_date: bool) -> Bytes {
    crate::sse::control(crate::sse::Control { next, up_to_date, ..Default::default() })
}

async fn sse(state: AppState, who: PrincipalKey, from: Offset, task_id: Option<String>) -> ApiResult<Response> {
    let signal = state.store.subscribe(EVENTS_PATH).await?;
    let deadline = tokio::time::Instant::now() + state.config.sse_max_duration;
    let live = state.metrics.live_reader();
    Ok(crate::sse::response(SseReader {
        state,
        who,
        task_id,
        pos: from,
        shown: from,
        signal,
        deadline,
        announced: false,
        told_up_to_date: false,
        _live: live,
    }))
}

/// One SSE reader of the events stream: reads its next batch when the connection asks for more.
///
/// Its control events tell nothing of events it may not see: a control goes
/// out with the reader's first batch, after each data event, and when the
/// reader has newly caught up, never because only others' events were
/// appended; its `streamNextOffset` is just past the last event it was sent
/// (or where it started), not past the others' events read after it. A
/// control at every move of the log told a reader when, and by how many
/// bytes, another principal's tasks changed (session 17's attack pass).
/// Resuming from that offset reads those others' events again and filters
/// them out again: nothing the reader may see is skipped.
struct SseReader {
    state: AppState,
    who: PrincipalKey,
    task_id: Option<String>,
    /// Where the next read starts.
    pos: Offset,
    /// The offset the reader is told: just past the last event sent to it.
    shown: Offset,
    signal: attache_storage::ChangeSignal,
    deadline: tokio::time::Instant,
    /// A control event has been sent.
    announced: bool,
    /// The last control event said `upToDate`.
    told_up_to_date: bool,
    _live: crate::metrics::LiveReader,
}

impl crate::sse::Source for SseReader {
    async fn next(&mut self) -> Option<Bytes> {
        let max_read = self.state.config.max_read_bytes.min(crate::sse::EVENT_BYTES);
        loop {
            let batch = match read(&self.state, Some(&self.who), self.pos, max_read, Room::Wait).await {
                Ok(b) => b,
                Err(err) => {
                    tracing::warn!(%err, "events sse read failed");
                    return None;
                }
            };
            self.pos = batch.next;
            let mut vis = Visibility::new(&self.state, &self.who);
            let events = vis.filter(batch.events, |e| wanted(&self.task_id, e)).await;
            let mut out = BytesMut::new();
            if let Some(last) = events.last() {
                // Each event carries the offset just past it; without one
                // (a batch whose sizes do not add up), the batch's end.
                let past_last = last.get("offset").and_then(Value::as_str).and_then(|o| Offset::parse(o).ok());
                self.shown = past_last.unwrap_or(batch.next);
                out.extend_from_slice(&sse_event("data", &Value::Array(events).to_string()));
            }
            let caught_up = batch.up_to_date && !self.told_up_to_date;
            if !out.is_empty() || !self.announced || caught_up {
                out.extend_from_slice(&sse_control(self.shown, batch.up_to_date));
                self.announced = true;
                self.told_up_to_date = batch.up_to_date;
                return Some(out.freeze());
            }
            if !batch.up_to_date {
                continue;
            }
            tokio::select! {
                changed = self.signal.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                }
                _ = tokio::time::sleep_until(self.deadline) => return None,
                _ = self.state.shutdown.cancelled() => return None,
            }
        }
    }
}

/// Waits for and returns the next events after `pos` (advancing it); `None`
/// at shutdown. Reads one page at most ([`next_page`]): the events may be
/// none, when the page held none (the caller comes back for the next).
pub async fn next_events(
    state: &AppState,
    pos: &mut Offset,
    signal: &mut attache_storage::ChangeSignal,
) -> Option<Vec<Value>> {
    next_page(state, None, pos, signal).await.map(|batch| batch.events)
}

/// The next page of the log after `pos` (advancing it), read as soon as
/// there is one: while `pos` is behind the tail, each call reads one page
/// (up to `max_read_bytes`) and returns it, events or none, so a reader
/// catching up over a long log (a `/ws` replay from an offset) does one
/// page of work per call and takes turns with everything else between
/// pages; at the tail it waits for the log to change. `None` at shutdown or
/// when the log cannot be read.
pub async fn next_page(
    state: &AppState,
    who: Option<&PrincipalKey>,
    pos: &mut Offset,
    signal: &mut attache_storage::ChangeSignal,
) -> Option<Batch> {
    loop {
        match read(state, who, *pos, state.config.max_read_bytes, Room::Wait).await {
            Ok(batch) => {
                let advanced = batch.next != *pos;
                *pos = batch.next;
                if !batch.events.is_empty() || advanced {
                    return Some(batch);
                }
            }
            Err(err) => {
                tracing::warn!(%err, "events read failed");
                return None;
            }
        }
        tokio::select! {
            changed = signal.changed() => {
                if changed.is_err() {
                    *signal = state.store.subscribe(EVENTS_PATH).await.ok()?;
                }
            }
            _ = state.shutdown.cancelled() => return None,
        }
    }
}

/// Checks a Redis URL without connecting.
pub fn check_redis_url(url: &str) -> Result<redis::Client, String> {
    redis::Client::open(url).map_err(|e| e.to_string())
}

/// Publishes every new event on the Redis channel named after its type
/// (`task.attachment_created`, ...), from the events stream's tail at start.
/// Events wait (in the durable stream) while Redis is unreachable.
pub fn start_redis_publisher(state: AppState, client: redis::Client) {
    tokio::spawn(async move {
        let Ok(mut pos) = state.store.head(EVENTS_PATH).await.map(|i| i.tail_offset()) else { return };
        let Ok(mut signal) = state.store.subscribe(EVENTS_PATH).await else { return };
        let mut conn: Option<redis::aio::MultiplexedConnection> = None;
        while let Some(events) = next_events(&state, &mut pos, &mut signal).await {
            for event in events {
                let channel = event.get("type").and_then(Value::as_str).unwrap_or("task.unknown").to_owned();
                let message = event.to_string();
                loop {
                    if conn.is_none() {
                        match client.get_multiplexed_async_connection().await {
                            Ok(c) => conn = Some(c),
                            Err(err) => tracing::warn!(%err, "cannot reach Redis; events wait"),
                        }
                    }
                    if let Some(c) = conn.as_mut() {
                        let sent: redis::RedisResult<i64> =
                            redis::cmd("PUBLISH").arg(&channel).arg(&message).query_async(c).await;
                        match sent {
                            Ok(_) => {
                                state.metrics.published();
                                break;
                            }
                            Err(err) => {
                                tracing::warn!(%err, "Redis PUBLISH failed; reconnecting");
                                conn = None;
                            }
                        }
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
                        _ = state.shutdown.cancelled() => return,
                    }
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::of_incarnation;
    use serde_json::json;

    /// A large page of the log is parsed as heavy work: on a runtime of one
    /// worker, a task spawned while the page is being parsed runs before
    /// the parse ends (inline, it waited for all of it).
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_large_page_of_events_is_parsed_while_the_workers_other_tasks_run() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        use std::time::Instant;

        let messages: Vec<bytes::Bytes> = (0..20_000)
            .map(|i| {
                let event = json!({ "id": format!("evt-{i}"), "type": "task.created", "taskId": format!("t-{i}"),
                    "payload": { "id": format!("t-{i}"), "text": "x".repeat(100), "priority": 50 },
                    "metadata": {}, "timestamp": 1 });
                bytes::Bytes::from(event.to_string())
            })
            .collect();
        let end = attache_core::Offset(messages.iter().map(|m| m.len() as u64 + 1).sum());
        let started = Arc::new(AtomicBool::new(false));
        let parse = tokio::spawn({
            let started = started.clone();
            async move {
                started.store(true, Ordering::SeqCst);
                let batch = super::parse_page(&messages, attache_core::Offset(0), end, true);
                (batch.events.len(), Instant::now())
            }
        });
        while !started.load(Ordering::SeqCst) {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        let ping = tokio::spawn(async { Instant::now() }).await.expect("the ping ran");
        let (parsed, done) = parse.await.expect("the page was parsed");
        assert_eq!(parsed, 20_000);
        assert!(ping < done, "the ping waited for the parse to end");
    }

    #[test]
    fn events_belong_to_the_incarnation_that_wrote_them() {
        let stamped = json!({ "taskId": "t-1", "incarnation": "a", "timestamp": 50 });
        assert!(of_incarnation(&stamped, Some("a"), 10));
        assert!(!of_incarnation(&stamped, Some("b"), 10));
        assert!(!of_incarnation(&stamped, None, 10));
        // Before incarnations: only an unstamped entity, and only from its creation on.
        let legacy = json!({ "taskId": "t-1", "timestamp": 50 });
        assert!(of_incarnation(&legacy, None, 50));
        assert!(!of_incarnation(&legacy, None, 51));
        assert!(!of_incarnation(&legacy, Some("a"), 10));
        assert!(!of_incarnation(&json!({ "taskId": "t-1" }), None, 0));
    }
}

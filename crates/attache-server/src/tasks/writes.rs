//! What a change writes: manifest rows and `event` rows on the task's main
//! stream, the same events on the global events stream, in one commit placed
//! in both streams' commit order (`StreamStore::append_in_order_with`) while
//! the task lock is held and awaited after it is released (`write_task`),
//! within the task's life held shared (`hold_task`). A change of the task
//! record runs from its compare-and-set to that write on a task of its own
//! (`change_and_write`), so a dropped request never leaves one half done.

use std::future::Future;

use attache_core::manifest::{ManifestEntry, MANIFEST};
use attache_core::state::{timestamp, HeadersRef, RowRef};
use attache_storage::{AppendRequest, RowGuard, StoreError};
use serde::Serialize;
use serde_json::Value;

use tokio::sync::{OwnedMutexGuard, OwnedRwLockWriteGuard};

use super::dispatch::{change_task, task_missing, Missing};
use super::ids::{main_path, new_event_id};
use super::{ApiError, ApiResult, CellRef, TaskRecord, TASK_TYPE};
use crate::access::{now_ms, Life};
use crate::events;
use crate::rows::{json_content_type, new_txid, not_running, OfferToken, Views};
use crate::AppState;

/// One event, as stored on the global stream and as rows of collection `event`.
pub struct Event {
    pub kind: &'static str,
    pub task_id: String,
    pub payload: Value,
    pub metadata: Value,
}

impl Event {
    pub(super) fn new(kind: &'static str, task_id: &str, payload: Value, metadata: Value) -> Event {
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
pub(super) struct Envelope<'a> {
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
pub(super) fn row_bytes<T: Serialize + ?Sized>(value: &T) -> serde_json::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(768);
    serde_json::to_writer(&mut out, value)?;
    Ok(out)
}

/// The `event` row of an event whose envelope is `envelope` (JSON the
/// server wrote): the bytes `RowRef { value: Some(envelope), .. }` writes,
/// with the envelope copied in as it is (read back as a `RawValue` first, it
/// was scanned once more for nothing).
fn event_row(id: &str, envelope: &[u8], headers: HeadersRef<'_>) -> serde_json::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(envelope.len() + 160);
    out.extend_from_slice(br#"{"type":"#);
    serde_json::to_writer(&mut out, events::EVENT_COLLECTION)?;
    out.extend_from_slice(br#","key":"#);
    serde_json::to_writer(&mut out, id)?;
    out.extend_from_slice(br#","value":"#);
    out.extend_from_slice(envelope);
    out.extend_from_slice(br#","headers":"#);
    serde_json::to_writer(&mut out, &headers)?;
    out.push(b'}');
    Ok(out)
}

/// A manifest row a write appends to the task's main stream.
pub(super) enum Row {
    /// Insert (new key) or update (same id, full replacement).
    Upsert {
        entry: Box<ManifestEntry>,
        insert: bool,
    },
    Delete {
        row_key: String,
    },
}

/// What a task write does to the task's main stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum MainWrite {
    /// Appends the rows and event rows.
    Append,
    /// Appends them and closes the stream (`task.delete`).
    AppendAndClose,
    /// Nothing: the stream was closed before the change (a stopped task
    /// being deleted); the change is the registry's, and its events go to
    /// the global stream only.
    Closed,
}

/// Holds the task's life shared (`access::Lives`) while it is still the life
/// `incarnation` names ("not found", -32602, once purged). A change of the
/// task record takes it before its compare-and-set and keeps it until its
/// write is durable ([`write_task`]): a stop (`DELETE` on the entity, a
/// stopping signal) and a purge hold the life exclusively, so one either
/// comes before the decision, which then sees the task stopped (or missing)
/// and changes nothing, or waits until the change is written. Without it a
/// stop between the two closed the main stream under a change the registry
/// already showed, and the call answered "stopped" leaving it there.
pub(super) async fn hold_task(state: &AppState, task_id: &str, incarnation: Option<&str>) -> ApiResult<Life> {
    let url = ["/", TASK_TYPE, "/", task_id].concat();
    let life = state.lives.shared(&url).await;
    if state.registry.entity_shared(&url).await.is_none_or(|e| e.incarnation.as_deref() != incarnation) {
        return Err(task_missing(Missing::TaskColon, task_id));
    }
    Ok(life)
}

/// What a change of the task record holds from before its decision until its
/// rows and events are durable, taken in this order by the request: the
/// task's cell, its lock exclusively (the change is decided and placed in its
/// streams' commit order under it) and its life, shared ([`hold_task`]).
/// Owned, so the change can take it along to the task it runs on
/// ([`super::Writers::run_to_end`]).
pub(super) struct Held {
    pub(super) life: Life,
    pub(super) order: OwnedRwLockWriteGuard<()>,
    /// `task.complete`'s hold on the task's completions, kept to the end.
    pub(super) completing: Option<OwnedMutexGuard<()>>,
    pub(super) cell: CellRef,
}

impl Held {
    /// Takes the lock of `cell`'s task, then its life while it is still the
    /// life `incarnation` names ("not found" once purged).
    pub(super) async fn take(
        state: &AppState,
        cell: CellRef,
        task_id: &str,
        incarnation: Option<&str>,
    ) -> ApiResult<Held> {
        let order = cell.lock_order().await;
        let life = hold_task(state, task_id, incarnation).await?;
        Ok(Held { life, order, completing: None, cell })
    }
}

/// Applies `change` to the task record under the registry's compare-and-set
/// ([`change_task`]) and writes the event `event` makes of the changed record
/// ([`write_task`], on the main stream and the events stream), answering what
/// `event` gives with it. From the compare-and-set to the durable write it
/// runs on a task of its own ([`super::Writers::run_to_end`]), holding
/// `held`: a request dropped in between (its client closed the connection)
/// no longer leaves the change in the record with no row and no event; the
/// change is written all the same, only its answer goes nowhere. A refused
/// change writes nothing and comes back as `change` refused it.
pub(super) async fn change_and_write<T: Send + 'static>(
    state: &AppState,
    held: Held,
    task_id: &str,
    incarnation: Option<&str>,
    change: impl FnOnce(&mut TaskRecord) -> ApiResult<()> + Send + 'static,
    event: impl FnOnce(&TaskRecord) -> (Event, T) + Send + 'static,
) -> ApiResult<T> {
    let (state_, task_id, incarnation) = (state.clone(), task_id.to_owned(), incarnation.map(str::to_owned));
    state
        .tasks
        .run_to_end(async move {
            let state = &state_;
            let Held { life, order, completing, cell } = held;
            let task = change_task(state, &task_id, incarnation.as_deref(), change).await?;
            let (event, answer) = event(&task);
            let written = write_task(
                state,
                &task_id,
                incarnation.as_deref(),
                Some(life),
                vec![],
                vec![event],
                MainWrite::Append,
                None,
            )
            .await;
            drop(order);
            written.await?;
            drop(completing);
            drop(cell);
            Ok(answer)
        })
        .await
}

/// Appends `rows` plus one `event` row per event to the task's main stream,
/// and the events to the global events stream, in one commit: both or
/// neither (`StreamStore::append_in_order_with`), so an event is published
/// exactly when its change is acknowledged, never for a change refused or
/// failed (a closed stream, a failed disk write), and a change costs one
/// durable commit, not two in a row. Both appends are placed in their
/// streams' commit order before this returns (the caller holds the task's
/// lock, so the task's writes, and their events, commit in the order they
/// were decided), durable when the returned future completes. Each event is
/// serialized once for both streams. The write goes ahead whether or not the
/// future is awaited: a caller that goes away takes only the answer with it.
///
/// Only into the life `incarnation` names, held shared until the writes
/// finish: `held` when the caller took it before deciding ([`hold_task`]:
/// every change of the task record), else taken here, and a task purged
/// meanwhile (and perhaps created again, by anyone) is "not found" (-32602),
/// whatever the decision before it saw (attachment writes, decided from the
/// task's view: a stop meanwhile refuses the write, which leaves nothing).
#[allow(clippy::too_many_arguments)]
pub(super) async fn write_task(
    state: &AppState,
    task_id: &str,
    incarnation: Option<&str>,
    held: Option<Life>,
    rows: Vec<Row>,
    evts: Vec<Event>,
    main: MainWrite,
    guard: Option<RowGuard>,
) -> impl Future<Output = ApiResult<()>> + Send + 'static {
    crate::pause::at(state, crate::pause::TASK_WRITE).await;
    let life = match held {
        Some(life) => life,
        None => match hold_task(state, task_id, incarnation).await {
            Ok(life) => life,
            Err(e) => return futures::future::Either::Left(futures::future::ready(Err(e))),
        },
    };
    let now = now_ms();
    let txid = new_txid();
    let ts = timestamp(now);
    let headers = |operation| HeadersRef::new(operation, &ts, &txid);
    let mut main_rows = Vec::with_capacity(rows.len() + evts.len());
    let mut envelopes = Vec::with_capacity(evts.len());
    let serialized = (|| -> serde_json::Result<()> {
        for row in &rows {
            main_rows.push(match row {
                Row::Upsert { entry, insert } => row_bytes(&RowRef {
                    collection: MANIFEST,
                    key: &entry.key,
                    value: Some(&**entry),
                    headers: headers(if *insert { "insert" } else { "update" }),
                })?,
                Row::Delete { row_key } => row_bytes(&RowRef::<Value> {
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
            main_rows.push(event_row(&id, &envelope, headers("insert"))?);
            envelopes.push(envelope);
        }
        Ok(())
    })();
    if let Err(e) = serialized {
        return futures::future::Either::Left(futures::future::ready(Err(ApiError::internal(e))));
    }
    let main_req = (main != MainWrite::Closed).then(|| {
        AppendRequest::json_messages(
            main_path(task_id),
            json_content_type(),
            &main_rows,
            main == MainWrite::AppendAndClose,
        )
    });
    // The entries go to the view with their rows before the append is placed,
    // so the catch-up that reads them back need not parse them (`Views::offer`).
    let offered = match &main_req {
        Some(req) => offer_entries(&state.views, rows, req),
        None => Vec::new(),
    };
    let events_req = (!envelopes.is_empty()).then(|| events::events_append(&envelopes));
    let has_main = main_req.is_some();
    let write = match (main_req, events_req) {
        (Some(main), Some(events)) => Some(state.store.append_in_order_with(main, events, guard)),
        (Some(only), None) | (None, Some(only)) => Some(state.store.append_in_order(only)),
        (None, None) => None,
    };
    let views = state.views.clone();
    futures::future::Either::Right(async move {
        let _life = life;
        let written = match write {
            Some(w) => w.await.map(drop).map_err(|e| match e {
                StoreError::Closed { .. } if has_main => not_running(),
                StoreError::Moved => super::attachments::moved(),
                other => ApiError::from(other),
            }),
            None => Ok(()),
        };
        if written.is_err() {
            for token in offered {
                views.withdraw(token);
            }
        }
        written
    })
}

/// Offers the view each upserted entry with its row's bytes in `req` (the
/// append of `rows`, in their order, then the event rows).
fn offer_entries(views: &Views, rows: Vec<Row>, req: &AppendRequest) -> Vec<OfferToken> {
    let Some(messages) = &req.messages else { return Vec::new() };
    rows.into_iter()
        .zip(messages)
        .filter_map(|(row, bytes)| match row {
            Row::Upsert { entry, .. } => views.offer(&req.path, bytes.clone(), *entry),
            Row::Delete { .. } => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_row_is_the_row_its_parts_serialize_to() {
        let envelope =
            br#"{"id":"evt-1-a\"b","metadata":{},"payload":{"n":[1,2]},"taskId":"t-1","timestamp":1,"type":"x"}"#;
        let headers = HeadersRef::new("insert", "2026-01-01T00:00:00.000Z", "tx\"1");
        let raw: &serde_json::value::RawValue = serde_json::from_slice(envelope).unwrap();
        let row = RowRef { collection: events::EVENT_COLLECTION, key: "evt-1-a\"b", value: Some(raw), headers };
        assert_eq!(event_row("evt-1-a\"b", envelope, headers).unwrap(), serde_json::to_vec(&row).unwrap());
    }
}

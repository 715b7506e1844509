//! The `task.*` methods on the task record (create, get, update, list,
//! assign, unassign, claim, complete, delete) and the tombstones deleted
//! tasks leave, bounded by `deleted_tasks_kept`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use attache_core::state::timestamp;
use attache_core::{EntityUrl, Permission, PrincipalKey};
use attache_storage::{EntityRecord, StoreError};
use serde_json::{json, Map, Value};

use super::attachments::{attachment_json, keyed, put_attachment, AttachmentInput};
use super::budget::json_bytes;
use super::dispatch::{change_task, illegal, is_live_task, task_entity, task_for, Missing};
use super::ids::{main_path, new_task_id, task_url};
use super::record::{deleted_at, TaskView};
use super::writes::{change_and_write, write_task, Event, Held, MainWrite};
use super::AttachmentKind;
use super::{ApiError, ApiResult, Params, ResponseBudget, Status, TaskRecord, TASK_TYPE};
use crate::access::{may, now_ms, scan_step};
use crate::AppState;

/// A task's metadata lives in the registry's memory with the task: bounded
/// by `max_entity_data_bytes` (after an update's merge too).
pub(super) fn check_metadata_size(state: &AppState, metadata: &Option<Map<String, Value>>) -> ApiResult<()> {
    let max = state.config.max_entity_data_bytes;
    if crate::entities::json_size(metadata) > max {
        return Err(metadata_too_large(max));
    }
    Ok(())
}

/// [`crate::entities::data_room`] for `size` more bytes kept with a task,
/// counted to its creator, refused as the task face refuses (-32602 with
/// `data.code`); held until the write has committed.
fn data_room(state: &AppState, entity: &EntityRecord, task_id: &str, size: usize) -> ApiResult<crate::quota::Reserved> {
    let held = state.registry.held_by(&entity.created_by);
    crate::entities::data_room(state, &entity.created_by, held, size).map_err(|e| match e {
        ApiError::Refused(r) => ApiError::rejected(
            r.message.clone(),
            json!({ "code": r.code, "taskId": task_id, "limit": state.config.max_entity_data_bytes_per_principal }),
        ),
        e => e,
    })
}

pub(super) fn metadata_too_large(max: usize) -> ApiError {
    ApiError::invalid("metadata", format!("metadata is at most {max} bytes of JSON (max_entity_data_bytes)"))
}

/// The answer echoes the metadata: taken from `budget` before anything is written.
pub(super) async fn create(
    state: &AppState,
    who: &PrincipalKey,
    p: &Params<'_>,
    budget: &ResponseBudget,
) -> ApiResult<Value> {
    p.opt_str("text")?; // another type is "text must be a string", not a length
    let text =
        p.string("text", 500).map_err(|_| ApiError::invalid("text", "Text must be between 1 and 500 characters"))?;
    let priority = p.opt_int("priority", 0, 100)?.unwrap_or(50) as u8;
    let metadata = p.opt_object("metadata")?.cloned();
    check_metadata_size(state, &metadata)?;
    budget.take_bytes(json_bytes(&metadata))?;
    let id = match p.opt_string("id", 128)? {
        Some(id) => {
            if !id.starts_with("t-") {
                return Err(ApiError::invalid("id", "id must start with t- and be a valid entity id"));
            }
            // A task is the entity /task/{id}: its id is a new entity's name.
            EntityUrl::for_new_entity(TASK_TYPE, id).map_err(|e| ApiError::invalid("id", e.to_string()))?;
            id.to_owned()
        }
        None => new_task_id(),
    };
    let url = task_url(&id).ok_or_else(|| ApiError::invalid("id", "invalid task id"))?;
    if state.registry.entity(&url.to_string()).await.is_some() {
        return Err(ApiError::rejected(format!("Task already exists: {id}"), json!({ "taskId": id })));
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
    let order = cell.lock_order().await;
    // Held from before the spawn: a stop of the new task waits for its `task.created`.
    let life = state.lives.shared(&url.to_string()).await;
    // From the spawn to its event, on a task of its own: a dropped request
    // never leaves a task that has no `task.created` (`Writers::run_to_end`).
    let (state_, who) = (state.clone(), who.clone());
    let (mut out, metadata) = state
        .tasks
        .run_to_end(async move {
            let state = &state_;
            let extra = Some(task.to_extra());
            let spawned = crate::entities::spawn_entity(state, &who, &url, None, BTreeMap::new(), extra).await;
            let incarnation = match spawned {
                Ok((record, true, _)) => record.incarnation,
                Ok((_, false, _)) | Err(ApiError::DuplicateUrl { .. }) => {
                    return Err(ApiError::rejected(format!("Task already exists: {id}"), json!({ "taskId": id })))
                }
                Err(ApiError::Refused(r)) if r.code == crate::entities::TOO_MANY_ENTITIES => {
                    let limit = state.config.max_entities_per_principal;
                    let data = json!({ "code": r.code, "limit": limit, "taskId": id });
                    return Err(ApiError::rejected(r.message, data));
                }
                Err(e) => return Err(e),
            };
            let out = json!({
                "id": id,
                "text": task.text,
                "status": task.status.as_str(),
                "priority": task.priority,
                "createdAt": timestamp(now),
            });
            let event = Event::new("task.created", &id, out.clone(), json!({ "createdBy": who.to_string() }));
            let inc = incarnation.as_deref();
            let written = write_task(state, &id, inc, Some(life), vec![], vec![event], MainWrite::Append, None).await;
            drop(order);
            written.await?;
            drop(cell);
            Ok((out, task.metadata))
        })
        .await?;
    if let Some(m) = metadata {
        out["metadata"] = Value::Object(m);
    }
    Ok(out)
}

pub(super) async fn attachment_count(state: &AppState, task_id: &str) -> ApiResult<usize> {
    let view = state.views.get(state.store.as_ref(), &main_path(task_id)).await?;
    Ok(keyed(&view, task_id).count())
}

pub(super) async fn get(state: &AppState, who: &PrincipalKey, p: &Params<'_>) -> ApiResult<Value> {
    let id = p.string("id", 128)?;
    let (_, task) = task_for(state, who, id, Permission::Read, Missing::TaskColon).await?;
    let mut row = task.row(id);
    row["attachmentCount"] = json!(attachment_count(state, id).await?);
    Ok(row)
}

pub(super) async fn update(state: &AppState, who: &PrincipalKey, p: &Params<'_>) -> ApiResult<Value> {
    let id = p.string("id", 128)?;
    let updates = p.opt_object("updates")?.ok_or_else(|| ApiError::invalid("updates", "updates is required"))?;
    let u = Params(updates);
    u.opt_str("text")?;
    let text = u
        .opt_string("text", 500)
        .map_err(|_| ApiError::invalid("text", "Text must be between 1 and 500 characters"))?
        .map(str::to_owned);
    let status = u.opt_enum("status", Status::parse, "pending, in_progress, completed, failed")?;
    let priority = u.opt_int("priority", 0, 100)?;
    let metadata = u.opt_object("metadata")?.cloned();
    let changes: Vec<&str> =
        ["text", "status", "priority", "metadata"].into_iter().filter(|k| updates.contains_key(*k)).collect();
    let entity = task_entity(state, who, id, Permission::Write, Missing::TaskColon).await?;
    // New metadata counts to the task's creator's data in memory (the old is not subtracted: a bound, not a tally).
    let _room = match &metadata {
        Some(m) => Some(data_room(state, &entity, id, crate::entities::json_size(m))?),
        None => None,
    };
    let incarnation = entity.incarnation.as_deref();
    let held = Held::take(state, state.tasks.cell(id), id, incarnation).await?;
    let (task_id, by) = (id.to_owned(), who.to_string());
    let now = now_ms();
    let max_metadata = state.config.max_entity_data_bytes;
    let change = move |t: &mut TaskRecord| {
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
    };
    let id_ = id.to_owned();
    change_and_write(state, held, id, incarnation, change, move |task| {
        let out = json!({
            "id": id_,
            "text": task.text,
            "status": task.status.as_str(),
            "priority": task.priority,
            "createdAt": timestamp(task.created_at),
            "updatedAt": timestamp(task.updated_at),
        });
        let event = Event::new("task.updated", &id_, out.clone(), json!({ "updatedBy": by, "changes": changes }));
        (event, out)
    })
    .await
}

/// The tasks among `entities` (the registry's tasks `who` may possibly see,
/// [`Registry::entities_for`](attache_storage::Registry::entities_for), newest first) `who` may
/// read (and do `wanted` on) and `keep` keeps, as views of their records
/// (metadata left as text), with the incarnation of each.
///
/// The scan once went over every principal's tasks (40,000 of another
/// principal's tasks: ~90 ms a call); it now goes over the caller's
/// candidates only, which may still be many (its own, or a kind grant's).
/// So a task's record is parsed only once `who` is known to see it, and the
/// scan yields to the runtime every [`SCAN_STEP`](crate::access::SCAN_STEP) entities: a batch of 100 such
/// calls no longer holds a worker for seconds (`/healthz` waited up to 5 s
/// behind two, session 15's attack pass).
pub(super) async fn visible_tasks_of<'a>(
    state: &AppState,
    who: &PrincipalKey,
    wanted: Permission,
    entities: &'a [std::sync::Arc<EntityRecord>],
    keep: impl Fn(&TaskView<'a>) -> bool,
) -> Vec<(String, TaskView<'a>, Option<String>)> {
    let mut visible = Vec::new();
    for (i, e) in entities.iter().enumerate() {
        scan_step(i).await;
        if e.entity_type != TASK_TYPE {
            continue;
        }
        let permitted =
            may(state, who, e, Permission::Read) && (wanted == Permission::Read || may(state, who, e, wanted));
        if let Some(task) = permitted.then(|| TaskView::of(e)).flatten().filter(&keep) {
            visible.push((e.instance_id.clone(), task, e.incarnation.clone()));
        }
    }
    visible
}

pub(super) async fn assign(state: &AppState, who: &PrincipalKey, p: &Params<'_>) -> ApiResult<Value> {
    let task_id = p.string("taskId", 128)?;
    let instance = p.string("instanceId", 256)?.to_owned();
    let entity = task_entity(state, who, task_id, Permission::Write, Missing::TaskColon).await?;
    let incarnation = entity.incarnation.as_deref();
    let held = Held::take(state, state.tasks.cell(task_id), task_id, incarnation).await?;
    let previous: Arc<parking_lot::Mutex<Option<String>>> = Arc::default();
    let (prev_slot, id, inst) = (previous.clone(), task_id.to_owned(), instance.clone());
    let now = now_ms();
    let change = move |t: &mut TaskRecord| {
        if t.status.is_final() {
            return Err(ApiError::rejected(
                format!("Cannot assign task {id} with status {}", t.status.as_str()),
                json!({ "taskId": id, "status": t.status.as_str() }),
            ));
        }
        match &t.assigned_to {
            Some(current) if *current != inst => {
                return Err(ApiError::rejected(
                    format!("Task {id} is already assigned to {current}."),
                    json!({ "taskId": id, "currentAssignment": current }),
                ))
            }
            _ => {}
        }
        *prev_slot.lock() = t.assigned_to.replace(inst);
        t.updated_at = now;
        Ok(())
    };
    let (id, by) = (task_id.to_owned(), who.to_string());
    change_and_write(state, held, task_id, incarnation, change, move |_| {
        let previous = previous.lock().take();
        let event = Event::new(
            "task.assigned",
            &id,
            json!({ "taskId": id, "instanceId": instance, "previousAssignment": previous }),
            json!({ "assignedBy": by }),
        );
        (event, json!({ "taskId": id, "instanceId": instance, "assignedAt": timestamp(now) }))
    })
    .await
}

pub(super) async fn unassign(state: &AppState, who: &PrincipalKey, p: &Params<'_>) -> ApiResult<Value> {
    let task_id = p.string("taskId", 128)?;
    let entity = task_entity(state, who, task_id, Permission::Write, Missing::TaskColon).await?;
    let incarnation = entity.incarnation.as_deref();
    let held = Held::take(state, state.tasks.cell(task_id), task_id, incarnation).await?;
    let previous: Arc<parking_lot::Mutex<Option<String>>> = Arc::default();
    let (prev_slot, id) = (previous.clone(), task_id.to_owned());
    let now = now_ms();
    let change = move |t: &mut TaskRecord| {
        if t.status.is_final() {
            return Err(ApiError::rejected(
                format!("Cannot unassign task {id} with status {}", t.status.as_str()),
                json!({ "taskId": id, "status": t.status.as_str() }),
            ));
        }
        let Some(prev) = t.assigned_to.take() else {
            return Err(ApiError::rejected(format!("Task {id} is not currently assigned"), json!({ "taskId": id })));
        };
        *prev_slot.lock() = Some(prev);
        t.status = Status::Pending;
        t.updated_at = now;
        Ok(())
    };
    let (id, by) = (task_id.to_owned(), who.to_string());
    change_and_write(state, held, task_id, incarnation, change, move |_| {
        let previous = previous.lock().take();
        let event = Event::new(
            "task.unassigned",
            &id,
            json!({ "taskId": id, "previousAssignment": previous }),
            json!({ "unassignedBy": by, "unassignedAt": timestamp(now) }),
        );
        (event, json!({ "taskId": id, "previousAssignment": previous, "unassignedAt": timestamp(now) }))
    })
    .await
}

/// Highest priority first, then the oldest, then the smallest id; only
/// pending tasks that are unassigned or assigned to this worker. The answer
/// carries the claimed task's row (its metadata) and attachments, values
/// included, taken from `budget` before the claim: a task that does not fit
/// is skipped (it stays pending, for a claim with room), and a claim that
/// skipped one and found nothing else answers `ResponseTooLarge`, having
/// claimed nothing.
pub(super) async fn claim(
    state: &AppState,
    who: &PrincipalKey,
    p: &Params<'_>,
    budget: &ResponseBudget,
) -> ApiResult<Value> {
    let worker = p.string("workerId", 256)?.to_owned();
    p.opt_int("maxTasks", 1, 10)?;
    let entities = state.registry.entities_for(who, Some(TASK_TYPE));
    let keep = |t: &TaskView| t.status == Status::Pending && t.assigned_to.as_ref().is_none_or(|a| *a == worker);
    let mut candidates = visible_tasks_of(state, who, Permission::Write, &entities, keep).await;
    candidates.sort_by(|(ia, a, _), (ib, b, _)| {
        b.priority.cmp(&a.priority).then_with(|| a.created_at.cmp(&b.created_at)).then_with(|| ia.cmp(ib))
    });
    let mut too_large = None;
    for (task_id, listed, incarnation) in candidates {
        let incarnation = incarnation.as_deref();
        let held = match Held::take(state, state.tasks.cell(&task_id), &task_id, incarnation).await {
            Ok(held) => held,
            // Purged since it was listed: not a candidate any more.
            Err(ApiError::Rejected { .. }) => continue,
            Err(e) => return Err(e),
        };
        // Attachment writes wait for this guard: what is read here is what
        // the task holds when it is claimed, and what the answer carries.
        let attachments = {
            let view = state.views.get(state.store.as_ref(), &main_path(&task_id)).await?;
            let entries: Vec<_> = keyed(&view, &task_id).collect();
            // With the task's row (its metadata), as listed: a few bytes
            // it gains by the claim are counted with the answer.
            let row = json_bytes(&listed.row(&task_id));
            if let Err(e) = budget.take_all(row, entries.iter().map(|(_, entry)| *entry)) {
                too_large = Some(e);
                drop(held);
                continue;
            }
            let mut attachments = Map::new();
            for (key, entry) in entries {
                attachments.insert(key.to_owned(), attachment_json(&task_id, key, entry));
            }
            attachments
        };
        let w = worker.clone();
        let now = now_ms();
        let change = move |t: &mut TaskRecord| {
            if t.status != Status::Pending || t.assigned_to.as_ref().is_some_and(|a| *a != w) {
                return Err(ApiError::rejected("taken", Value::Null));
            }
            t.status = Status::InProgress;
            t.assigned_to = Some(w);
            t.updated_at = now;
            Ok(())
        };
        let (id, w, by) = (task_id.clone(), worker.clone(), who.to_string());
        let won = change_and_write(state, held, &task_id, incarnation, change, move |task| {
            let event = Event::new(
                "task.claimed",
                &id,
                json!({ "taskId": id, "workerId": w }),
                json!({ "claimedAt": timestamp(now), "claimedBy": by }),
            );
            (event, task.clone())
        })
        .await;
        let task = match won {
            Ok(task) => task,
            // Taken (or stopped, or purged) meanwhile; nothing written (the
            // write, guarded by nothing, refuses no other way). Its values
            // were taken for nothing; they stay counted, as for any call
            // that loaded them (`ResponseBudget::take`).
            Err(ApiError::Rejected { .. }) => continue,
            Err(e) => return Err(e),
        };
        let mut row = task.row(&task_id);
        row["attachmentCount"] = json!(attachments.len());
        row["attachments"] = Value::Object(attachments);
        return Ok(json!({ "claimed": true, "taskId": task_id, "task": row }));
    }
    match too_large {
        Some(e) => Err(e),
        None => Ok(json!({ "claimed": false })),
    }
}

/// Absent, null, "", [] and {} are empty: the task failed. 0 and false are results.
pub(super) fn is_empty_result(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::Null) => true,
        Some(Value::String(s)) => s.is_empty(),
        Some(Value::Array(a)) => a.is_empty(),
        Some(Value::Object(o)) => o.is_empty(),
        Some(_) => false,
    }
}

pub(super) async fn complete(state: &AppState, who: &PrincipalKey, p: &Params<'_>) -> ApiResult<Value> {
    let task_id = match (p.opt_string("id", 128)?, p.opt_string("taskId", 128)?) {
        (Some(id), _) | (None, Some(id)) => id,
        (None, None) => return Err(ApiError::invalid("id", "Either 'id' or 'taskId' must be provided")),
    };
    let worker = p.opt_string("workerId", 256)?.map(str::to_owned);
    let result = p.get("result").cloned();
    let failed = is_empty_result(result.as_ref());
    let cell = state.tasks.cell(task_id);
    // One completion of a task at a time: the next reads the task after this
    // one, so a completion that loses is refused before it writes its result
    // attachment (which would replace the winner's, with its event). Held
    // to the end of the write, wherever that runs.
    let completing = cell.lock_completing().await;
    let (entity, task) = task_for(state, who, task_id, Permission::Write, Missing::TaskColon).await?;
    let incarnation = entity.incarnation.as_deref();
    let next = if failed { Status::Failed } else { Status::Completed };
    may_complete(task_id, &task, next, worker.as_deref())?;
    let mut _room = None;
    if let (false, Some(value)) = (failed, &result) {
        // The result is kept with the task in the registry's memory, as its
        // metadata is: bounded by `max_entity_data_bytes`, and counted to the
        // task's creator (before, session 16's second attack pass, 300
        // completions with 900 KB results took +579 MB, 361 MB after a restart).
        let size = crate::entities::json_size(value);
        let max = state.config.max_entity_data_bytes;
        if size > max {
            return Err(ApiError::invalid(
                "result",
                format!(
                    "result is at most {max} bytes of JSON (max_entity_data_bytes); attach a larger result with \
                     task.create_attachment"
                ),
            ));
        }
        _room = Some(data_room(state, &entity, task_id, size)?);
    }
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
    let mut held = Held::take(state, cell, task_id, incarnation).await?;
    held.completing = Some(completing);
    let now = now_ms();
    let (id, stored, by) = (task_id.to_owned(), if failed { None } else { result }, worker.clone());
    let change = move |t: &mut TaskRecord| {
        may_complete(&id, t, next, by.as_deref())?;
        t.status = next;
        t.error = failed.then(|| "No result provided".to_owned());
        t.result = stored;
        t.completed_at = Some(now);
        t.updated_at = now;
        Ok(())
    };
    let (id, who) = (task_id.to_owned(), who.to_string());
    change_and_write(state, held, task_id, incarnation, change, move |task| {
        let event = Event::new(
            "task.completed",
            &id,
            json!({ "id": id, "status": next.as_str(), "duration": now - task.created_at }),
            // As ClaudeBench: the worker named, else the assignee.
            json!({ "completedBy": worker.or_else(|| task.assigned_to.clone()).unwrap_or(who) }),
        );
        (event, json!({ "id": id, "status": next.as_str(), "completedAt": timestamp(now) }))
    })
    .await
}

/// ClaudeBench's rule for `task.complete`: the task has an assignee and is
/// not final, so an assigned task completes whether it is still `pending`
/// (`task.assign` leaves it there) or `in_progress` (claimed). A worker,
/// when given, must be the assignee.
pub(super) fn may_complete(task_id: &str, task: &TaskRecord, next: Status, worker: Option<&str>) -> ApiResult<()> {
    if task.status.is_final() {
        return Err(illegal(task_id, task.status, next));
    }
    let Some(assignee) = &task.assigned_to else {
        return Err(ApiError::rejected(
            format!("Task {task_id} is not assigned"),
            json!({ "taskId": task_id, "status": task.status.as_str() }),
        ));
    };
    match worker {
        Some(w) if w != assignee => Err(ApiError::rejected(
            format!("Task {task_id} is assigned to {assignee}, not {w}"),
            json!({ "taskId": task_id, "currentAssignment": assignee }),
        )),
        _ => Ok(()),
    }
}

/// Marks the task deleted (a tombstone keeps its grants, so readers of the
/// events stream can still be told who may see its past events), closes its
/// main stream with the `task.deleted` event, and deletes its attachment bytes.
pub(super) async fn delete(state: &AppState, who: &PrincipalKey, p: &Params<'_>) -> ApiResult<Value> {
    let id = p.string("id", 128)?;
    let entity = task_entity(state, who, id, Permission::Delete, Missing::TaskColon).await?;
    let held = Held::take(state, state.tasks.cell(id), id, entity.incarnation.as_deref()).await?;
    // From the compare-and-set to the tombstone, on a task of its own: a
    // dropped request never leaves a deletion without its event, its
    // attachments' bytes or its place among the tombstones (`Writers::run_to_end`).
    let (state_, id, by) = (state.clone(), id.to_owned(), who.to_string());
    state.tasks.run_to_end(async move { finish_delete(&state_, held, &id, &entity, &by).await }).await
}

/// `task.delete` from its compare-and-set on, holding `held`.
async fn finish_delete(state: &AppState, held: Held, id: &str, entity: &EntityRecord, who: &str) -> ApiResult<Value> {
    let Held { life, order, completing: _, cell } = held;
    let incarnation = entity.incarnation.as_deref();
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
        json!({ "id": id, "deletedAt": timestamp(now), "deletedBy": who }),
        json!({ "instanceId": who }),
    );
    // Stopped before (a signal, or DELETE on its entity): its main stream is
    // closed and takes no event row; the event still reaches the events
    // stream (the deletion is the registry's, done above), and the rest goes.
    let main = if entity.is_running() { MainWrite::AppendAndClose } else { MainWrite::Closed };
    write_task(state, id, incarnation, Some(life), vec![], vec![event], main, None).await.await?;
    let prefix = format!("/{TASK_TYPE}/{id}/attachments/");
    for info in state.store.list_prefix(&prefix, usize::MAX).await {
        // The stream listed, not one made at its path since.
        match state.store.delete_id(&info.path, info.id).await {
            Ok(()) | Err(StoreError::NotFound) | Err(StoreError::Gone) => {}
            Err(e) => return Err(e.into()),
        }
    }
    // Nothing reads a deleted task's view again: it goes now, not when the LRU reaches it.
    state.views.forget(&main_path(id));
    drop(order);
    drop(cell);
    let tombstone =
        Tombstone { id: id.to_owned(), incarnation: entity.incarnation.clone(), owner: entity.created_by.clone() };
    let over = keep_tombstone(&mut state.tasks.tombstones.lock(), tombstone, state.config.deleted_tasks_kept);
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

/// The tombstones kept, each principal's (the creator of the deleted task) oldest first.
pub(super) type Tombstones = HashMap<String, VecDeque<Tombstone>>;

/// Keeps `tombstone` among its owner's and takes out of `kept` the owner's
/// oldest past `per_principal`: a principal's deletions push out only its own
/// tombstones, so no one can erase another's history (and take its ids) by
/// deleting tasks of its own. Each principal keeps at most `per_principal`;
/// a tombstone is one of its owner's entities, so the whole stays within
/// what `max_entities_per_principal` lets principals hold anyway.
pub(super) fn keep_tombstone(kept: &mut Tombstones, tombstone: Tombstone, per_principal: usize) -> Vec<Tombstone> {
    let owner = tombstone.owner.clone();
    let mine = kept.entry(owner.clone()).or_default();
    mine.push_back(tombstone);
    let over = mine.len().saturating_sub(per_principal);
    let gone: Vec<Tombstone> = mine.drain(..over).collect();
    if mine.is_empty() {
        kept.remove(&owner);
    }
    gone
}

/// Purges the tombstone of a deleted task (its record, grants and closed main
/// stream), unless the id now names another life of the task. Past
/// `deleted_tasks_kept` tombstones of a principal its oldest go, so deleted tasks cost
/// nothing for good; their events stay on the events stream, shown to no one
/// but the system principal from then on (visibility comes from the record).
pub(super) async fn drop_tombstone(state: &AppState, task_id: &str, incarnation: Option<&str>) -> ApiResult<()> {
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
/// those past `deleted_tasks_kept` of a principal are purged now, its oldest first.
pub async fn load_tombstones(state: &AppState) -> ApiResult<()> {
    let mut deleted: Vec<(i64, Tombstone)> = state
        .registry
        .entities(Some(TASK_TYPE))
        .into_iter()
        .filter_map(|e| {
            let deleted_at = deleted_at(&e)?;
            Some((
                deleted_at,
                Tombstone {
                    id: e.instance_id.clone(),
                    incarnation: e.incarnation.clone(),
                    owner: e.created_by.clone(),
                },
            ))
        })
        .collect();
    deleted.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.id.cmp(&b.1.id)));
    let mut kept = Tombstones::new();
    let mut over = Vec::new();
    for (_, tombstone) in deleted {
        over.extend(keep_tombstone(&mut kept, tombstone, state.config.deleted_tasks_kept));
    }
    for old in over {
        drop_tombstone(state, &old.id, old.incarnation.as_deref()).await?;
    }
    *state.tasks.tombstones.lock() = kept;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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

//! The method table every face calls through (`call`), and what the methods
//! share: finding a task `who` may act on, the compare-and-set change of a
//! task record, and the face's "not found" and "illegal change" refusals.

use std::sync::Arc;

use attache_core::{Permission, PrincipalKey};
use attache_storage::{EntityRecord, StoreError};
use serde_json::{json, Value};

use super::attachments::{
    create_attachment, delete_attachment, get_attachment, get_attachments_batch, list_attachments,
};
use super::budget::Answer;
use super::ids::task_url;
use super::list::list;
use super::methods::{assign, claim, complete, create, delete, get, unassign, update};
use super::record::TaskView;
use super::{params_object, ApiError, ApiResult, Params, ResponseBudget, Status, TaskRecord, TASK_TYPE};
use crate::access::now_ms;
use crate::AppState;

/// Calls one method for `who`. Every face (JSON-RPC, MCP, WebSocket) comes
/// through here; the answer, as text, is taken from `budget` whole.
pub async fn call(
    state: &AppState,
    who: &PrincipalKey,
    method: &str,
    params: Value,
    budget: &ResponseBudget,
) -> ApiResult<Answer> {
    let answer = match method {
        // Written row by row, each taken as it is written.
        "task.list" => match params_object(params) {
            Ok(map) => list(state, who, &Params(&map), budget).await,
            Err(e) => Err(e),
        },
        _ => {
            let reads = matches!(
                method,
                "task.get" | "task.get_attachment" | "task.list_attachments" | "task.get_attachments_batch"
            );
            // Boxed: the methods' futures are kilobytes (~5.5 KiB), and held inline
            // every future above this one (the budget's, the face's, the router's
            // box) carried them and was copied whole as it was built.
            budget.counted(!reads, Box::pin(run(state, who, method, params, budget))).await
        }
    };
    if let Err(e) = &answer {
        // Logged once here, for every face; the caller is told only that the fault is ours.
        e.log_fault("tasks");
    }
    answer
}

async fn run(
    state: &AppState,
    who: &PrincipalKey,
    method: &str,
    params: Value,
    budget: &ResponseBudget,
) -> ApiResult<Value> {
    let map = params_object(params)?;
    let p = Params(&map);
    match method {
        "task.create" => create(state, who, &p, budget).await,
        "task.get" => get(state, who, &p).await,
        "task.update" => update(state, who, &p).await,
        "task.assign" => assign(state, who, &p).await,
        "task.unassign" => unassign(state, who, &p).await,
        "task.claim" => claim(state, who, &p, budget).await,
        "task.complete" => complete(state, who, &p).await,
        "task.delete" => delete(state, who, &p).await,
        "task.create_attachment" => create_attachment(state, who, &p).await,
        "task.get_attachment" => get_attachment(state, who, &p, budget).await,
        "task.list_attachments" => list_attachments(state, who, &p, budget).await,
        "task.get_attachments_batch" => get_attachments_batch(state, who, &p, budget).await,
        "task.delete_attachment" => delete_attachment(state, who, &p).await,
        other => Err(ApiError::MethodNotFound { method: other.to_owned() }),
    }
}

/// "Task not found: t-1" (task methods) or "Task t-1 not found" (attachment methods), as the spec pages say.
#[derive(Clone, Copy)]
pub(super) enum Missing {
    TaskColon,
    TaskNotFound,
}

pub(super) fn task_missing(style: Missing, task_id: &str) -> ApiError {
    let message = match style {
        Missing::TaskColon => format!("Task not found: {task_id}"),
        Missing::TaskNotFound => format!("Task {task_id} not found"),
    };
    ApiError::rejected(message, json!({ "taskId": task_id }))
}

/// What a change to a task stopped by a signal or by `DELETE` on its entity
/// answers (a stopped task is read and deleted, never changed). The text
/// when the write itself finds the task stopped, without its id.
pub const STOPPED: &str = "Task is stopped and accepts no more changes";

pub(super) fn task_stopped(task_id: &str) -> ApiError {
    ApiError::rejected(format!("Task {task_id} is stopped and accepts no more changes"), json!({ "taskId": task_id }))
}

/// The task `who` may act on with `wanted`; a task it may not read does not exist for it.
pub(super) async fn task_for(
    state: &AppState,
    who: &PrincipalKey,
    task_id: &str,
    wanted: Permission,
    style: Missing,
) -> ApiResult<(Arc<EntityRecord>, TaskRecord)> {
    let entity = task_entity(state, who, task_id, wanted, style).await?;
    let task = TaskRecord::of(&entity).ok_or_else(|| task_missing(style, task_id))?;
    Ok((entity, task))
}

/// A live (not deleted) task, read as a view (its metadata left as text).
pub(super) fn is_live_task(e: &EntityRecord) -> bool {
    TaskView::of(e).is_some()
}

/// May `who` read the entity, and may it do `wanted`? (One look at the grants.)
pub(super) fn permitted(
    state: &AppState,
    who: &PrincipalKey,
    entity: &EntityRecord,
    wanted: Permission,
) -> (bool, bool) {
    if who.is_built_in_system() || entity.created_by == who.url() {
        return (true, true);
    }
    let grants = crate::access::grants_for(state, who, entity);
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
pub(super) async fn task_entity(
    state: &AppState,
    who: &PrincipalKey,
    task_id: &str,
    wanted: Permission,
    style: Missing,
) -> ApiResult<Arc<EntityRecord>> {
    let missing = || task_missing(style, task_id);
    let url = task_url(task_id).ok_or_else(missing)?;
    let entity = state.registry.entity_shared(&url.path()).await.filter(|e| is_live_task(e)).ok_or_else(missing)?;
    match permitted(state, who, &entity, wanted) {
        (false, _) => Err(missing()),
        (true, false) => {
            Err(ApiError::NotPermitted { message: format!("{who} may not {} task {task_id}", wanted.as_str()) })
        }
        // A change to a stopped task is refused before any of the method's own rules.
        (true, true) if wanted == Permission::Write && !entity.is_running() => Err(task_stopped(task_id)),
        (true, true) => Ok(entity),
    }
}

/// Applies `change` to the task under the registry's compare-and-set; a
/// rejection from `change` comes back as is. `incarnation` is the one the
/// caller checked its permission against: a task purged and created again
/// meanwhile (by anyone) is another task, and is missing for this change.
pub(super) async fn change_task(
    state: &AppState,
    task_id: &str,
    incarnation: Option<&str>,
    change: impl FnOnce(&mut TaskRecord) -> ApiResult<()> + Send + 'static,
) -> ApiResult<TaskRecord> {
    let url = format!("/{TASK_TYPE}/{task_id}");
    let rejection: Arc<parking_lot::Mutex<Option<ApiError>>> = Arc::default();
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
                let changed = change(&mut task);
                // Stopped (a signal or DELETE on its entity): deleting it is
                // the only change left, whatever else the change would say.
                if !entity.is_running() && task.deleted_at.is_none() {
                    *slot.lock() = Some(task_stopped(&id));
                    return Err(StoreError::Invalid("stopped".into()));
                }
                if let Err(e) = changed {
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
        Ok(entity) => match &entity.extra {
            Some(extra) => extra.parse().map_err(ApiError::internal),
            None => Err(ApiError::internal("a changed task without its record")),
        },
        Err(e) => match rejection.lock().take() {
            Some(rejected) => Err(rejected),
            None if e == StoreError::NotFound => Err(task_missing(Missing::TaskColon, task_id)),
            None => Err(e.into()),
        },
    }
}

pub(super) fn illegal(task_id: &str, from: Status, to: Status) -> ApiError {
    ApiError::rejected(
        format!("Cannot change status of task {task_id} from {} to {}", from.as_str(), to.as_str()),
        json!({ "taskId": task_id, "status": from.as_str(), "requested": to.as_str() }),
    )
}

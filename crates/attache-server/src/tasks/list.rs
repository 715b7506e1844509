//! `task.list`: the tasks a caller may read, filtered, ordered and paged,
//! written row by row into the answer's text, each row taken from the
//! response budget before it is written. A page that would pass the budget
//! is cut short: it answers the rows that fit, with `hasMore` (ClaudeBench's
//! own "more" signal) true, so the next page starts at `offset` plus the
//! rows answered; a page whose first row does not fit answers
//! `ResponseTooLarge`.

use std::io::Write as _;

use super::budget::{json_bytes, Answer};
use super::methods::{attachment_count, visible_tasks_of};
use super::record::TaskView;
use super::{ApiError, ApiResult, Params, ResponseBudget, Status, TASK_TYPE};
use crate::AppState;
use attache_core::{Permission, PrincipalKey};

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

pub(super) async fn list(
    state: &AppState,
    who: &PrincipalKey,
    p: &Params<'_>,
    budget: &ResponseBudget,
) -> ApiResult<Answer> {
    let status = p.opt_enum("status", Status::parse, "pending, in_progress, completed, failed")?;
    let assigned = p.opt_string("assignedTo", 256)?;
    let priority = p.opt_int("priority", 0, 100)?;
    let limit = p.opt_int("limit", 1, 1000)?.unwrap_or(100) as usize;
    let offset = p.opt_int("offset", 0, i64::MAX)?.unwrap_or(0) as usize;
    let order_by = p
        .opt_enum("orderBy", OrderBy::parse, "createdAt, updatedAt, completedAt, priority, status, assignedTo")?
        .unwrap_or(OrderBy::CreatedAt);
    let desc = p.opt_enum("order", |s| matches!(s, "asc" | "desc").then(|| s == "desc"), "asc, desc")?.unwrap_or(true);
    // Only the tasks the caller may possibly see: not every principal's.
    let entities = state.registry.entities_for(who, Some(TASK_TYPE));
    let keep = |t: &TaskView| {
        status.is_none_or(|s| t.status == s)
            && assigned.is_none_or(|a| t.assigned_to.as_deref() == Some(a))
            && priority.is_none_or(|pr| i64::from(t.priority) == pr)
    };
    let mut tasks: Vec<(String, TaskView)> = visible_tasks_of(state, who, Permission::Read, &entities, keep)
        .await
        .into_iter()
        .map(|(id, t, _)| (id, t))
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
    // The text around the rows, taken first (`hasMore` at its longest).
    let frame = format!(r#"{{"tasks":[],"totalCount":{total},"hasMore":false}}"#);
    budget.take_bytes(frame.len() as u64)?;
    let mut text: Vec<u8> = br#"{"tasks":["#.to_vec();
    let mut answered = 0usize;
    for (id, t) in tasks.iter().skip(offset).take(limit) {
        let mut row = t.row(id);
        // One task whose stream cannot be read must not fail the list for
        // everyone who sees it: it is listed, counted as having no attachments.
        let count = attachment_count(state, id).await.unwrap_or_else(|e| {
            tracing::warn!(task = %id, error = ?e, "task.list: the task's stream could not be read");
            0
        });
        row.attachment_count = Some(count);
        let comma = u64::from(answered > 0);
        match budget.take_bytes(json_bytes(&row) + comma) {
            Ok(()) => {}
            // Not even one row: nothing to page on from here.
            Err(e) if answered == 0 => return Err(e),
            Err(_) => break,
        }
        if answered > 0 {
            text.push(b',');
        }
        serde_json::to_writer(&mut text, &row).map_err(ApiError::internal)?;
        answered += 1;
    }
    let more = offset.saturating_add(answered) < total;
    write!(text, r#"],"totalCount":{total},"hasMore":{more}}}"#).map_err(ApiError::internal)?;
    let text = String::from_utf8(text).map_err(ApiError::internal)?;
    serde_json::value::RawValue::from_string(text).map_err(ApiError::internal)
}

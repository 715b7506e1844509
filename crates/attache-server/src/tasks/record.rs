//! The task record: a task's fields as kept in its entity's `extra` (JSON
//! text, `RawJson`), read whole ([`TaskRecord`]) to change or show one task,
//! or as a [`TaskView`] that leaves its metadata and result as text to sort,
//! filter and list many; the status machine (`Status::may_become`) and the
//! row `task.get`, `task.list` and `task.claim` show.

use std::borrow::Cow;

use attache_core::state::timestamp;
use attache_storage::{EntityRecord, RawJson};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};

use super::TASK_TYPE;

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
        let task: TaskRecord = entity.extra.as_ref()?.parse().ok()?;
        task.deleted_at.is_none().then_some(task)
    }

    pub(super) fn to_extra(&self) -> RawJson {
        // Strings, numbers and JSON values (string keys only): it serializes.
        RawJson::of(self).unwrap_or_else(|_| RawJson::null())
    }

    /// The full row: what `task.get`, `task.list` and `task.claim` show.
    pub(super) fn row(&self, id: &str) -> Value {
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

/// A task's record read from its text without building its metadata and
/// result, which stay text borrowed from the record: what `task.list` and
/// `task.claim` read of every task they may consider, and the rows
/// `task.list` writes, at no more memory than the text they borrow.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct TaskView<'a> {
    #[serde(borrow)]
    pub text: Cow<'a, str>,
    pub status: Status,
    pub priority: u8,
    #[serde(default, borrow)]
    pub metadata: Option<&'a RawValue>,
    #[serde(default)]
    pub assigned_to: Option<String>,
    #[serde(default, borrow)]
    pub result: Option<&'a RawValue>,
    #[serde(default)]
    pub error: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
    #[serde(default)]
    pub completed_at: Option<i64>,
    #[serde(default)]
    pub deleted_at: Option<i64>,
}

impl<'a> TaskView<'a> {
    /// The live (not deleted) task `entity` holds.
    pub fn of(entity: &'a EntityRecord) -> Option<TaskView<'a>> {
        if entity.entity_type != TASK_TYPE {
            return None;
        }
        let task: TaskView = entity.extra.as_ref()?.parse().ok()?;
        task.deleted_at.is_none().then_some(task)
    }

    /// The row [`TaskRecord::row`] shows, written from the text.
    pub(super) fn row<'r>(&'r self, id: &'r str) -> Row<'r> {
        Row {
            id,
            text: &self.text,
            status: self.status.as_str(),
            priority: self.priority,
            assigned_to: self.assigned_to.as_deref(),
            metadata: self.metadata,
            result: self.result,
            error: self.error.as_deref(),
            created_at: timestamp(self.created_at),
            updated_at: timestamp(self.updated_at),
            completed_at: self.completed_at.map(timestamp),
            attachment_count: None,
        }
    }
}

/// A task's row as `task.list` writes it.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Row<'r> {
    id: &'r str,
    text: &'r str,
    status: &'static str,
    priority: u8,
    assigned_to: Option<&'r str>,
    metadata: Option<&'r RawValue>,
    result: Option<&'r RawValue>,
    error: Option<&'r str>,
    created_at: String,
    updated_at: String,
    completed_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attachment_count: Option<usize>,
}

/// When the task `entity` holds was deleted (`None`: not deleted, or no task).
pub(super) fn deleted_at(entity: &EntityRecord) -> Option<i64> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Deleted {
        #[serde(default)]
        deleted_at: Option<i64>,
    }
    entity.extra.as_ref()?.parse::<Deleted>().ok()?.deleted_at
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_view_writes_the_row_the_record_shows() {
        let mut task = TaskRecord {
            text: "a \"quoted\" text".into(),
            status: Status::InProgress,
            priority: 7,
            metadata: Some(json!({"b": [1, {"c": null}], "a": "x"}).as_object().cloned().unwrap()),
            assigned_to: Some("w1".into()),
            result: Some(json!({"r": 1})),
            error: None,
            created_at: 1,
            updated_at: 2,
            completed_at: Some(3),
            deleted_at: None,
        };
        let mut entity = EntityRecord {
            url: "/task/t-1".into(),
            entity_type: TASK_TYPE.into(),
            instance_id: "t-1".into(),
            status: "idle".into(),
            tags: Default::default(),
            args: None,
            created_by: "/_principal/user/a".into(),
            created_at_ms: 1,
            updated_at_ms: 2,
            extra: Some(task.to_extra()),
            incarnation: None,
            parent: None,
            ancestors: Vec::new(),
        };
        let view = TaskView::of(&entity).unwrap();
        assert_eq!(serde_json::to_value(view.row("t-1")).unwrap(), task.row("t-1"));
        task.metadata = None;
        task.result = None;
        entity.extra = Some(task.to_extra());
        let view = TaskView::of(&entity).unwrap();
        assert_eq!(serde_json::to_value(view.row("t-1")).unwrap(), task.row("t-1"));
        task.deleted_at = Some(4);
        entity.extra = Some(task.to_extra());
        assert!(TaskView::of(&entity).is_none() && TaskRecord::of(&entity).is_none());
        assert_eq!(deleted_at(&entity), Some(4));
    }

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
}

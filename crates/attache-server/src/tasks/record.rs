//! The task record: a task's fields as kept in its entity's `extra`, the
//! status machine (`Status::may_become`) and the row `task.get`, `task.list`
//! and `task.claim` show.

use attache_core::state::timestamp;
use attache_storage::EntityRecord;
use serde::{Deserialize, Serialize};
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
        let task: TaskRecord = serde_json::from_value(entity.extra.clone()?).ok()?;
        task.deleted_at.is_none().then_some(task)
    }

    pub(super) fn to_extra(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
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
}

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
//!
//! One file per part: `budget` (the bytes of attachment values one
//! response may carry), `dispatch` (the method table and the checks every
//! method shares), `record` (the task's fields and status rules), `params`
//! (reading a call's params), `ids`, `ordering` (the per-task and per-key
//! locks), `writes` (rows and events appended for a change), `methods`
//! (the `task.*` methods and tombstones) and `attachments` (the
//! `task.*_attachment*` methods).

mod attachments;
mod budget;
mod dispatch;
mod ids;
mod methods;
mod ordering;
mod params;
mod record;
mod writes;

use attache_storage::StoreError;
use axum::http::StatusCode;
use serde_json::{json, Value};

use crate::error::ApiError;

pub use attache_core::task::AttachmentKind;
pub use attachments::{attachment_json, AttachmentInput};
pub use budget::ResponseBudget;
pub use dispatch::call;
pub use ids::{new_attachment_id, new_task_id};
pub use methods::{load_tombstones, Tombstone};
pub use ordering::{CellRef, Pending, TaskCell, Writers};
pub use params::{params_object, Params};
pub use record::{Status, TaskRecord};
pub use writes::Event;

pub use attache_core::task::{METHODS, TASK_TYPE};

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
    /// The response would carry more than `limit` bytes of attachment values (-32000).
    ResponseTooLarge { limit: u64 },
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
            StatusCode::CONFLICT if e.code == "NOT_RUNNING" => TaskError::rejected(dispatch::STOPPED, json!({})),
            _ => TaskError::internal(e.message),
        }
    }
}

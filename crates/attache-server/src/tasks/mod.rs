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
//! the write is decided and *placed* in its streams' commit order
//! (`StreamStore::append_in_order`), not while it syncs: see [`Writers`].
//!
//! One file per part: `budget` (the bytes one response may carry),
//! `dispatch` (the method table and the checks every method shares),
//! `record` (the task's fields and status rules), `params` (reading a
//! call's params), `ids`, `list` (`task.list`), `ordering` (the per-task and
//! per-key locks), `writes` (rows and events appended for a change),
//! `methods` (the other `task.*` methods and tombstones) and `attachments`
//! (the `task.*_attachment*` methods).

mod attachments;
mod budget;
mod dispatch;
mod ids;
mod list;
mod methods;
mod ordering;
mod params;
mod record;
mod writes;

use crate::error::{ApiError, ApiResult};

pub use attache_core::task::AttachmentKind;
pub use attachments::{attachment_json, AttachmentInput};
pub use budget::{Answer, ResponseBudget};
pub use dispatch::{call, STOPPED};
pub use ids::{new_attachment_id, new_task_id};
pub use methods::{load_tombstones, Tombstone};
pub use ordering::{CellRef, TaskCell, Writers};
pub use params::{params_object, Params};
pub use record::{Status, TaskRecord};
pub use writes::Event;

pub use attache_core::task::{METHODS, TASK_TYPE};

/// Largest inline JSON value, markdown or text content (bytes as serialized).
pub const MAX_INLINE_BYTES: usize = 1 << 20;
/// Largest binary sent inline as base64 `data`; larger files go through the upload route.
pub const MAX_INLINE_BINARY: usize = 1 << 20;

// Errors: the server's one `ApiError` (`crate::error`); the task face's
// outcomes are its `InvalidParams`, `Rejected`, `NotPermitted`, ... variants,
// mapped to JSON-RPC codes once, in `rpc::error_object`.

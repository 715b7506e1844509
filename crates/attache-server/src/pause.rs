//! Pause points, for tests: a request that reaches an armed point waits
//! there until the test lets it go, so a test can put another request
//! (a purge, a re-spawn) exactly inside a window that is otherwise a few
//! microseconds wide, and check what the first request does then.
//!
//! Production runs without [`Pauses`] (`ServerConfig::pauses` is `None`):
//! each point costs one `Option` check.

use std::collections::HashMap;
use std::sync::Arc;

use crate::AppState;

/// Between the permission check of a server write to an entity's main
/// stream (send, attachment delete, upload rows) and the write.
pub const ENTITY_WRITE: &str = "entity_write";
/// Between a grant's permission check (`manage`) and its write.
pub const GRANT_WRITE: &str = "grant_write";
/// Between a reader's taking room in the response budget for a page of the
/// event log it scans (`events::read`) and its reading the page.
pub const EVENTS_SCAN: &str = "events_scan";
/// Between a task write's decision and the write of its rows and events
/// (every task method that writes). A change of the task record (create,
/// update, assign, claim, complete, delete) waits here after its
/// compare-and-set in the registry, holding the task's life, so a stop or a
/// purge waits for it; an attachment write waits here before taking it.
pub const TASK_WRITE: &str = "task_write";

/// Between a send's check of its chosen inbox key against the entity's view
/// (and its reservation of the key) and its guarded write.
pub const INBOX_WRITE: &str = "inbox_write";

/// Between a task-face attachment write's decision from the task's view
/// (`task.create_attachment`, `task.delete_attachment`) and its guarded write.
pub const TASK_ATTACHMENT_WRITE: &str = "task_attachment_write";

/// Between a fork's creating its streams (main and attachments) and its
/// registry record: the window in which the fork's URL has streams and no entity.
pub const FORK_RECORD: &str = "fork_record";

/// Between a fork's registry record and the grants it copies from its
/// parent (Electric's `copy_to_children`), when it names one.
pub const FORK_GRANTS: &str = "fork_grants";

/// Between a raw `DELETE` of a plain stream's check (the caller owns the
/// stream there) and the delete.
pub const STREAM_DELETE: &str = "stream_delete";

/// Between the settling of a `pending` row no upload holds deciding its
/// outcome from the store (`failed`: no stream at its path; `complete`: its
/// bytes stored) and writing it (only while nothing of the id moved since).
pub const SETTLE_WRITE: &str = "settle_write";

/// Between the finalizing of a closed resumable upload's hashing its bytes
/// (and reading its `pending` row) and writing its `complete` row.
pub const FINALIZE_WRITE: &str = "finalize_write";

/// After a cancelled upload's background settling has settled its `pending`
/// row and given its id back (a test waits here for the settling to be over).
pub const UPLOAD_SETTLED: &str = "upload_settled";

/// Between a multipart upload's reading that its id's row is still its own
/// (its `pending` row, or none) and its commit of the blob stream with the
/// `complete` row.
pub const UPLOAD_COMMIT: &str = "upload_commit";

/// Between a delete of an attachment's reading its manifest row and the
/// stream at its address and its writing the delete (row and stream, one
/// conditional store call).
pub const ATTACHMENT_DELETE: &str = "attachment_delete";

/// Between a tag change's registry write and its `tags` row on the main
/// stream (`entities::tags`; the change runs on a task of its own from there).
pub const TAG_ROW: &str = "tag_row";

/// Between a stop's closing rows on the main stream (DELETE, SIGKILL or
/// SIGTERM) and its registry write of the status `stopped`.
pub const STOP_RECORD: &str = "stop_record";

/// Between a purge's deleting the entity's streams and its removing the
/// entity's record and grants from the registry.
pub const PURGE_RECORD: &str = "purge_record";

/// Between a spawn's registry record and what the spawn adds to it: the
/// grants copied from its parent and given in its body, its initial message.
pub const SPAWN_REST: &str = "spawn_rest";

/// Between a JSON-RPC request's look at the response budget (refused while
/// it is full) and its calls' running: the window in which calls that
/// arrive together all pass the look.
pub const RPC_CALL: &str = "rpc_call";

/// The points armed by a test, by name.
#[derive(Debug, Clone, Default)]
pub struct Pauses(Arc<parking_lot::Mutex<HashMap<&'static str, Arc<Pause>>>>);

/// One armed point: the first request to reach it waits for [`Pause::release`].
#[derive(Debug)]
pub struct Pause {
    reached: tokio::sync::watch::Sender<bool>,
    go: tokio::sync::Semaphore,
}

impl Pauses {
    /// The next request to reach `point` waits there until the returned
    /// pause is released; requests after it pass.
    pub fn arm(&self, point: &'static str) -> Arc<Pause> {
        let pause =
            Arc::new(Pause { reached: tokio::sync::watch::Sender::new(false), go: tokio::sync::Semaphore::new(0) });
        self.0.lock().insert(point, pause.clone());
        pause
    }

    async fn at(&self, point: &str) {
        let armed = self.0.lock().remove(point);
        if let Some(pause) = armed {
            pause.reached.send_replace(true);
            // Closed never; released by the test (or the pause is dropped with the server).
            let _ = pause.go.acquire().await.map(tokio::sync::SemaphorePermit::forget);
        }
    }
}

impl Pause {
    /// Waits until a request waits at the point.
    pub async fn reached(&self) {
        let _ = self.reached.subscribe().wait_for(|reached| *reached).await;
    }

    /// Lets the waiting request (or the next to arrive) go on.
    pub fn release(&self) {
        self.go.add_permits(1);
    }
}

/// Waits at `point` if a test armed it.
pub async fn at(state: &AppState, point: &str) {
    if let Some(pauses) = &state.config.pauses {
        pauses.at(point).await;
    }
}

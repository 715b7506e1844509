//! Per-task write ordering: the task lock and the per-key attachment locks. Every lock and map entry is held
//! by a guard that gives it back on drop, so no early return leaks one.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedMutexGuard, OwnedRwLockWriteGuard};
use tokio_util::task::TaskTracker;

use super::methods::Tombstones;
use super::{ApiError, ApiResult};

/// Write ordering for one task. A write holds its locks while it is decided
/// and *placed* in its streams' commit order (`StreamStore::append_in_order`,
/// whose contract is that appends placed in sequence commit in that
/// sequence), and releases them before it syncs: so the writes stay in order
/// while many of them share one group commit.
///
/// Task changes (status, assignment, deletion) take `order` exclusively.
/// Attachment writes share `order` and serialize per key only, so writes of
/// different keys proceed in parallel. An attachment write holds its key's
/// lock until it is durable (not only placed): the next write of the key
/// decides from a view that shows it, which its guard needs
/// (`tasks/attachments.rs`, `StreamStore::append_in_order_with`).
///
/// A change of the task record holds `order` (and `task.complete` its
/// `completing`) by owned guards: from its compare-and-set on it runs on a
/// task of its own ([`Writers::run_to_end`]), which takes them along.
#[derive(Default)]
pub struct TaskCell {
    pub(super) order: Arc<tokio::sync::RwLock<()>>,
    pub(super) keys: parking_lot::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Held by `task.complete` from its first read of the task to its write.
    pub(super) completing: Arc<tokio::sync::Mutex<()>>,
}

impl TaskCell {
    /// Takes `order` exclusively, for a change of the task record.
    pub(super) async fn lock_order(&self) -> OwnedRwLockWriteGuard<()> {
        self.order.clone().write_owned().await
    }

    /// Takes `completing`, for `task.complete`.
    pub(super) async fn lock_completing(&self) -> OwnedMutexGuard<()> {
        self.completing.clone().lock_owned().await
    }

    /// Claims `key` for a write: the key's lock stays in the map while the
    /// claim lives and leaves it when the last claim is dropped.
    pub(super) fn claim_key(&self, key: &str) -> KeyClaim<'_> {
        let lock = self.keys.lock().entry(key.to_owned()).or_default().clone();
        KeyClaim { cell: self, key: key.to_owned(), lock }
    }
}

/// A writer's claim on one attachment key of a task. Dropping it (on every
/// path, early returns and errors included) removes the key's lock from the
/// map when no other writer claims it, so the task's cell can go too.
pub struct KeyClaim<'c> {
    cell: &'c TaskCell,
    key: String,
    lock: Arc<tokio::sync::Mutex<()>>,
}

impl KeyClaim<'_> {
    /// Waits for the writers of this key before us; hold the guard while the write is decided and queued.
    pub(super) async fn lock(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.lock.lock().await
    }
}

impl Drop for KeyClaim<'_> {
    fn drop(&mut self) {
        let mut keys = self.cell.keys.lock();
        // Two references: the map's and ours; nobody can clone it while we hold the map.
        if Arc::strong_count(&self.lock) == 2 {
            keys.remove(&self.key);
        }
    }
}

#[derive(Default)]
pub struct Writers {
    cells: parking_lot::Mutex<HashMap<String, Arc<TaskCell>>>,
    /// Deleted tasks whose tombstones are kept, by principal, oldest first.
    pub(super) tombstones: parking_lot::Mutex<Tombstones>,
    /// The changes (of tasks and of entities) running to their end on tasks of their own ([`Writers::run_to_end`]).
    detached: TaskTracker,
}

/// A task's cell, released when dropped (on every path, errors included), so
/// the map holds only the cells of tasks being written to. Owned (it holds
/// the map by `Arc`), so a change running on a task of its own keeps it.
pub struct CellRef {
    writers: Arc<Writers>,
    task_id: String,
    cell: Option<Arc<TaskCell>>,
}

impl std::ops::Deref for CellRef {
    type Target = TaskCell;
    fn deref(&self) -> &TaskCell {
        // Present until drop.
        self.cell.as_deref().unwrap_or_else(|| unreachable!("a CellRef holds its cell until dropped"))
    }
}

impl Drop for CellRef {
    fn drop(&mut self) {
        if let Some(cell) = self.cell.take() {
            self.writers.release(&self.task_id, cell);
        }
    }
}

impl Writers {
    pub(super) fn cell(self: &Arc<Self>, task_id: &str) -> CellRef {
        let cell = self.cells.lock().entry(task_id.to_owned()).or_default().clone();
        CellRef { writers: self.clone(), task_id: task_id.to_owned(), cell: Some(cell) }
    }

    /// Runs `step` to its end on a task of its own and waits for its answer.
    /// A change of the task record goes through here from its compare-and-set
    /// in the registry to its durable write, taking along the task's lock and
    /// life (taken before, by the request: so at most one such step per task
    /// is deciding at a time, and a client that resets its connections piles
    /// up no work beyond what its requests hold). Awaited inline, a request
    /// dropped in between (its client closed the connection) took the write
    /// with it, and the record kept a change with no row and no event. A step
    /// that panicked answers an internal error. The entity face runs its
    /// changes of an entity (a tag, a stop, a purge, a spawn) here too, from
    /// under the entity's life lock (`entities::run_to_end`), so shutdown
    /// waits for them as for task changes ([`Writers::finish_detached`]).
    pub(crate) async fn run_to_end<T: Send + 'static>(
        &self,
        step: impl Future<Output = ApiResult<T>> + Send + 'static,
    ) -> ApiResult<T> {
        match self.detached.spawn(step).await {
            Ok(answer) => answer,
            Err(e) => Err(ApiError::internal(format_args!("a change failed to run to its end: {e}"))),
        }
    }

    /// At shutdown, once no request is left: waits up to `within` for the
    /// changes still running on their own, so they write before the store closes.
    pub async fn finish_detached(&self, within: Duration) {
        self.detached.close();
        if tokio::time::timeout(within, self.detached.wait()).await.is_err() {
            tracing::warn!(left = self.detached.len(), "task and entity changes still running at shutdown");
        }
    }

    /// Drops the cell of a task nobody is writing to (keeps the map small).
    fn release(&self, task_id: &str, cell: Arc<TaskCell>) {
        let mut cells = self.cells.lock();
        if Arc::strong_count(&cell) == 2 && cell.keys.lock().is_empty() {
            cells.remove(task_id);
        }
    }

    /// How many task cells are held (tests and diagnostics).
    #[doc(hidden)]
    pub fn cells_len(&self) -> usize {
        self.cells.lock().len()
    }

    /// How many deleted tasks keep a tombstone (tests and diagnostics).
    #[doc(hidden)]
    pub fn tombstones_len(&self) -> usize {
        self.tombstones.lock().values().map(std::collections::VecDeque::len).sum()
    }
}

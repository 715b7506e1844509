//! Whether the store's writes are failing: the signal `/healthz` reports.
//!
//! A disk error (no space, an I/O error) fails the batch or upload it hit
//! and marks its source failing; the source turns healthy again when a
//! write of the same kind succeeds, or when the writer's probe (a durable
//! checkpoint and a synced log write, tried every tick while anything is
//! failing) does. The signal is "failing since T, because of E".

use serde::Serialize;

use crate::error::StoreError;

/// What the store says about its writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "writes", rename_all = "snake_case")]
pub enum WriteHealth {
    Ok,
    Failing(WriteFailure),
}

impl WriteHealth {
    pub fn is_ok(&self) -> bool {
        matches!(self, WriteHealth::Ok)
    }
}

/// Since when writes fail, and the last error seen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WriteFailure {
    /// When the first failure of this run of failures happened (ms since the epoch).
    pub since_ms: i64,
    /// The last error, as a message.
    pub error: String,
    /// The last error was "no space left" (or a quota).
    pub disk_full: bool,
}

/// Where a write failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// The write-ahead log.
    Log,
    /// The database file (a commit or a checkpoint), or reopening it.
    Db,
    /// Blob staging files.
    Blob,
    /// Segment files (a stream's bytes).
    Segment,
    /// The registry's database file (entities, grants).
    Registry,
}

#[derive(Debug, Default)]
struct State {
    failing: [bool; 5],
    failure: Option<WriteFailure>,
}

/// The shared write-health state of one store.
#[derive(Debug, Default)]
pub(crate) struct Health(parking_lot::Mutex<State>);

impl Health {
    pub(crate) fn snapshot(&self) -> WriteHealth {
        match &self.0.lock().failure {
            None => WriteHealth::Ok,
            Some(f) => WriteHealth::Failing(f.clone()),
        }
    }

    pub(crate) fn is_failing(&self) -> bool {
        self.0.lock().failure.is_some()
    }

    pub(crate) fn source_failing(&self, source: Source) -> bool {
        self.0.lock().failing[source as usize]
    }

    /// Records a failed write; errors that are not the disk's are ignored.
    pub(crate) fn fail(&self, source: Source, err: &StoreError) {
        if !err.is_io() {
            return;
        }
        let mut state = self.0.lock();
        if state.failure.is_none() {
            tracing::error!(%err, ?source, "writes are failing");
        }
        state.failing[source as usize] = true;
        let since_ms = state.failure.as_ref().map_or_else(crate::now_ms, |f| f.since_ms);
        state.failure = Some(WriteFailure {
            since_ms,
            error: err.to_string(),
            disk_full: matches!(err, StoreError::StorageFull(_)),
        });
    }

    /// A write from `source` succeeded.
    pub(crate) fn recovered(&self, source: Source) {
        let mut state = self.0.lock();
        if !state.failing[source as usize] {
            return;
        }
        state.failing[source as usize] = false;
        if state.failing.iter().all(|f| !f) {
            if let Some(f) = state.failure.take() {
                tracing::info!(since_ms = f.since_ms, "writes succeed again");
            }
        }
    }
}

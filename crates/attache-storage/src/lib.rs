//! The storage seam and its backends.
//!
//! Everything above this crate talks to [`StreamStore`] (stream metadata and
//! stream bytes, one transactional seam because an idempotent producer's
//! state must commit atomically with the append it guards) and to the change
//! signals it hands out. Which engine runs underneath — the embedded one in
//! [`embedded`] by default — is invisible to the server.

pub mod embedded;
pub mod error;
pub mod model;
pub mod registry;
pub mod tokens;

use async_trait::async_trait;

pub use error::{StoreError, StoreResult};
pub use model::*;
pub use registry::{EntityRecord, EntityUpdate, GrantRecord, NewGrant, Registry};

/// Durable, append-only streams: metadata, bytes and change notification.
///
/// Every mutating call returns only after its effect is durable (unless the
/// store was opened with durability off), and readers never observe a write
/// before it is durable.
#[async_trait]
pub trait StreamStore: Send + Sync + 'static {
    /// Creates a stream (or a fork), or confirms an identical one exists.
    async fn create(&self, req: CreateStream) -> StoreResult<CreateOutcome>;

    /// Appends to (and/or closes) a stream.
    async fn append(&self, req: AppendRequest) -> StoreResult<AppendOutcome>;

    /// Deletes a stream; a stream with live forks is soft-deleted (410 afterwards).
    async fn delete(&self, path: &str) -> StoreResult<()>;

    /// The committed metadata of a stream, without touching its TTL.
    fn head(&self, path: &str) -> StoreResult<StreamInfo>;

    /// Reads committed data from `from`, at most about `max_bytes`; resets a sliding TTL.
    fn read(&self, path: &str, from: ReadFrom, max_bytes: usize) -> StoreResult<ReadBatch>;

    /// A signal that changes after every committed change to the stream.
    fn subscribe(&self, path: &str) -> StoreResult<ChangeSignal>;

    /// Resets a sliding TTL, as a read or write does (live reads call it when they start).
    fn touch(&self, path: &str);

    /// Streams whose path starts with `prefix`, in path order (for listings and maintenance).
    fn list_prefix(&self, prefix: &str, limit: usize) -> Vec<StreamInfo>;

    /// Flushes and stops the writer; later calls fail with `ShuttingDown`.
    async fn close(&self);
}

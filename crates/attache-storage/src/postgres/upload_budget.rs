//! The bound on blob bytes held in memory on their way to the object store,
//! all uploads of this instance together (`--object-store-upload-buffer-bytes`).
//!
//! An upload reads its staged file into memory one part (or one whole small
//! blob) at a time, and the object store keeps that buffer until the part is
//! sent. Before it reads a part, an upload takes the part's bytes from a
//! semaphore of bytes; they come back when the part's send has finished (or
//! failed, or the upload was dropped). An upload that finds no room waits its
//! turn (the semaphore is fair): its bytes are already on local disk, so
//! waiting costs the client time, not the server memory, and each wait is as
//! long as the sends ahead of it, which the object store client times out.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::{StoreError, StoreResult};

pub(crate) struct UploadBudget {
    room: Arc<Semaphore>,
    /// The bound in bytes: at least one part, so every part fits.
    bytes: usize,
    meter: Arc<Meter>,
}

/// Bytes held now and the most ever held at once (tests and diagnostics).
#[derive(Default)]
struct Meter {
    held: AtomicU64,
    high_water: AtomicU64,
}

/// Room for `len` bytes of one part, given back when dropped.
pub(crate) struct Held {
    _permit: OwnedSemaphorePermit,
    len: u64,
    meter: Arc<Meter>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.meter.held.fetch_sub(self.len, Ordering::Relaxed);
    }
}

impl UploadBudget {
    /// A budget of `bytes`, raised to `min_bytes` (one part) if below it.
    pub(crate) fn new(bytes: u64, min_bytes: usize) -> UploadBudget {
        let bytes = usize::try_from(bytes).unwrap_or(usize::MAX).clamp(min_bytes, Semaphore::MAX_PERMITS);
        UploadBudget { room: Arc::new(Semaphore::new(bytes)), bytes, meter: Arc::default() }
    }

    /// Waits for room for `len` bytes (at most the whole budget is asked for).
    pub(crate) async fn take(&self, len: usize) -> StoreResult<Held> {
        let ask = u32::try_from(len.min(self.bytes)).unwrap_or(u32::MAX);
        let permit = self
            .room
            .clone()
            .acquire_many_owned(ask)
            .await
            .map_err(|_| StoreError::Storage("the upload budget is closed".into()))?;
        let len = len as u64;
        let held = self.meter.held.fetch_add(len, Ordering::Relaxed) + len;
        self.meter.high_water.fetch_max(held, Ordering::Relaxed);
        Ok(Held { _permit: permit, len, meter: self.meter.clone() })
    }

    /// The most bytes held at once since the store opened.
    pub(crate) fn high_water(&self) -> u64 {
        self.meter.high_water.load(Ordering::Relaxed)
    }
}

//! Storage errors, named after what went wrong in the stream's life.

use attache_core::Offset;
use thiserror::Error;

pub type StoreResult<T> = Result<T, StoreError>;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum StoreError {
    #[error("stream not found")]
    NotFound,
    #[error("stream was deleted and is kept only for its forks")]
    Gone,
    #[error("a stream exists here with a different configuration: {0}")]
    ConfigMismatch(String),
    #[error("stream is closed")]
    Closed { next: Offset },
    #[error("content type {got:?} does not match the stream's {expected:?}")]
    ContentTypeMismatch { expected: String, got: String },
    #[error("a Content-Type header is required with a body")]
    MissingContentType,
    #[error("Stream-Seq {got:?} is not greater than the last one, {last:?}")]
    SeqRegression { last: String, got: String },
    #[error("producer epoch is stale; the current epoch is {current}")]
    StaleEpoch { current: u64 },
    #[error("a new producer epoch must start at Producer-Seq 0")]
    EpochMustStartAtZero,
    #[error("producer sequence gap: expected {expected}, received {received}")]
    ProducerGap { expected: u64, received: u64 },
    #[error("fork source stream not found")]
    ForkSourceNotFound,
    #[error("fork source stream was deleted")]
    ForkSourceGone,
    /// A JSON stream forks only between messages: an offset inside one
    /// would give the fork half a message (PROTOCOL.md §6 lets a server
    /// refuse such an offset with 400 instead of leaving reads undefined).
    #[error(
        "the fork offset {offset} falls inside a JSON message of the source stream: \
         a JSON stream forks only at a message boundary (an offset the server returned)"
    )]
    ForkOffsetInsideMessage { offset: Offset },
    /// A conditional write's condition no longer holds: another guarded
    /// append of the same key landed past where the caller read, or a path
    /// holds another stream than the caller saw. Nothing was written; the
    /// caller reads again and decides again
    /// ([`StreamStore::append_guarded`](crate::StreamStore::append_guarded)).
    #[error("the stream changed since it was read; nothing was written")]
    Moved,
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Rule(#[from] attache_core::Error),
    #[error("storage failure: {0}")]
    Storage(String),
    /// The database aborted the transaction for another's (a deadlock, a
    /// serialization failure): nothing was written, and the same work run
    /// again may succeed ([`StoreError::is_retryable`]).
    #[error("storage failure (contention, retryable): {0}")]
    Contention(String),
    /// The disk (or the quota) is full: the write did not happen. Writes
    /// succeed again once space is freed, without a restart.
    #[error("no space left for this write: {0}")]
    StorageFull(String),
    /// An I/O error (EIO, a short write, a failed sync): the write was not
    /// acknowledged. A retry may succeed once the store has recovered.
    #[error("the store could not complete this write or read: {0}")]
    Unavailable(String),
    #[error("the store is shutting down")]
    ShuttingDown,
}

impl StoreError {
    /// Whether this error comes from the disk (full, or failing) rather than
    /// from the request: it fails the batch it hit, never the store.
    pub fn is_io(&self) -> bool {
        matches!(self, StoreError::StorageFull(_) | StoreError::Unavailable(_))
    }

    /// Whether the same work, run again as a whole, may succeed: the
    /// database aborted it for contention with another transaction.
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Contention(_))
    }

    /// Whether this error fails a whole write batch (the store or its disk
    /// failed, or the batch met contention) rather than answering the one
    /// command it came from.
    pub fn fails_batch(&self) -> bool {
        matches!(
            self,
            StoreError::Storage(_)
                | StoreError::Contention(_)
                | StoreError::StorageFull(_)
                | StoreError::Unavailable(_)
        )
    }
}

/// Whether an I/O error means "no space" (disk full or quota exceeded).
pub(crate) fn is_no_space(e: &std::io::Error) -> bool {
    matches!(e.kind(), std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded)
}

impl From<std::io::Error> for StoreError {
    fn from(e: std::io::Error) -> Self {
        if is_no_space(&e) {
            StoreError::StorageFull(e.to_string())
        } else {
            StoreError::Unavailable(e.to_string())
        }
    }
}

impl From<redb::Error> for StoreError {
    fn from(e: redb::Error) -> Self {
        match e {
            redb::Error::Io(io) => io.into(),
            // redb refuses every operation after an I/O error until the file is reopened.
            redb::Error::PreviousIo => StoreError::Unavailable("an earlier I/O error; the store is reopening".into()),
            redb::Error::DatabaseClosed => StoreError::Unavailable("the store is reopening".into()),
            redb::Error::DatabaseAlreadyOpen => StoreError::Storage(
                "the data dir is in use by another attache process (its database is locked): stop that one \
                 (after a kill -9, wait for it to exit), or give this one another --data-dir"
                    .into(),
            ),
            other => StoreError::Storage(other.to_string()),
        }
    }
}

macro_rules! redb_errors {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self { redb::Error::from(e).into() }
        }
    )*};
}
redb_errors!(redb::StorageError, redb::TableError, redb::TransactionError, redb::CommitError, redb::DatabaseError);

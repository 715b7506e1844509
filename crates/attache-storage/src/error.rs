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
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Rule(#[from] attache_core::Error),
    #[error("storage failure: {0}")]
    Storage(String),
    #[error("the store is shutting down")]
    ShuttingDown,
}

impl From<redb::Error> for StoreError {
    fn from(e: redb::Error) -> Self {
        StoreError::Storage(e.to_string())
    }
}

macro_rules! redb_errors {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self { StoreError::Storage(e.to_string()) }
        }
    )*};
}
redb_errors!(
    redb::StorageError,
    redb::TableError,
    redb::TransactionError,
    redb::CommitError,
    redb::DatabaseError,
    std::io::Error
);

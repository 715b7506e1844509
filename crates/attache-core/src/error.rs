//! The errors of attache's rules. Each variant names what went wrong in the
//! domain; the HTTP and JSON-RPC faces map them to status codes at the edge.

use thiserror::Error;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum Error {
    #[error("malformed offset {0:?}")]
    MalformedOffset(String),
    #[error("invalid Stream-TTL {0:?}: expected a non-negative decimal integer without sign or leading zeros")]
    InvalidTtl(String),
    #[error("Stream-TTL {0:?} is out of range: at most 3153600000 seconds (100 years); set no TTL for a stream that never expires")]
    TtlOutOfRange(String),
    #[error("invalid Stream-Expires-At {0:?}: expected an RFC 3339 timestamp")]
    InvalidExpiresAt(String),
    #[error("Stream-TTL and Stream-Expires-At cannot both be set")]
    TtlAndExpiresAt,
    #[error("invalid content type {0:?}")]
    InvalidContentType(String),
    #[error("invalid producer headers: {0}")]
    InvalidProducer(String),
    #[error("invalid JSON body: {0}")]
    InvalidJson(String),
    #[error("an empty JSON array appends nothing")]
    EmptyJsonArray,
    /// A JSON array of more messages than one body may carry: each becomes a
    /// row with its own boundary, so the count, not the bytes, is the cost.
    #[error("a JSON body carries at most {max} messages (max_append_messages); split it into several appends")]
    TooManyMessages { max: usize },
    #[error("invalid stream path {0:?}: {1}")]
    InvalidPath(String, &'static str),
    /// A new entity's type or instance id outside the characters it may use.
    #[error("{0}")]
    InvalidEntityName(String),
    #[error("{0}")]
    Invalid(String),
}

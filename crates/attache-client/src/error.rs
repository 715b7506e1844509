//! The SDK's errors. A server answer that is not a success becomes
//! [`Error::Api`] with the server's own `{"error":{"code","message"}}`
//! mapped to [`ErrorCode`]; JSON-RPC errors keep their numeric code.

use std::fmt;

use thiserror::Error;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The server's error codes (`error.code` in an error body).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    NotFound,
    Unauthorized,
    Forbidden,
    InvalidRequest,
    NotRunning,
    DuplicateUrl,
    DuplicateKey,
    /// An attachment with this id exists.
    DuplicateId,
    /// The attachment's bytes are not all there yet (pending or failed).
    NotComplete,
    /// An upload's body ended early.
    UploadInterrupted,
    Conflict,
    StreamClosed,
    ContentTypeMismatch,
    SequenceConflict,
    SequenceGap,
    StaleEpoch,
    PayloadTooLarge,
    RangeNotSatisfiable,
    Gone,
    UseEntityRoutes,
    MethodNotAllowed,
    ShuttingDown,
    Internal,
    /// A code this SDK does not know yet, kept as sent.
    Other(String),
}

impl ErrorCode {
    pub fn parse(code: &str) -> ErrorCode {
        match code {
            "NOT_FOUND" | "UNKNOWN_ENTITY_TYPE" => ErrorCode::NotFound,
            "UNAUTHORIZED" => ErrorCode::Unauthorized,
            "FORBIDDEN" => ErrorCode::Forbidden,
            "INVALID_REQUEST" | "BAD_REQUEST" => ErrorCode::InvalidRequest,
            "NOT_RUNNING" => ErrorCode::NotRunning,
            "DUPLICATE_URL" => ErrorCode::DuplicateUrl,
            "DUPLICATE_KEY" => ErrorCode::DuplicateKey,
            "DUPLICATE_ID" => ErrorCode::DuplicateId,
            "NOT_COMPLETE" => ErrorCode::NotComplete,
            "UPLOAD_INTERRUPTED" => ErrorCode::UploadInterrupted,
            "CONFLICT" => ErrorCode::Conflict,
            "STREAM_CLOSED" => ErrorCode::StreamClosed,
            "CONTENT_TYPE_MISMATCH" => ErrorCode::ContentTypeMismatch,
            "SEQUENCE_CONFLICT" => ErrorCode::SequenceConflict,
            "SEQUENCE_GAP" => ErrorCode::SequenceGap,
            "STALE_EPOCH" => ErrorCode::StaleEpoch,
            "PAYLOAD_TOO_LARGE" => ErrorCode::PayloadTooLarge,
            "RANGE_NOT_SATISFIABLE" => ErrorCode::RangeNotSatisfiable,
            "GONE" => ErrorCode::Gone,
            "USE_ENTITY_ROUTES" => ErrorCode::UseEntityRoutes,
            "METHOD_NOT_ALLOWED" => ErrorCode::MethodNotAllowed,
            "SHUTTING_DOWN" | "SERVER_STOPPING" => ErrorCode::ShuttingDown,
            "INTERNAL" | "INTERNAL_SERVER_ERROR" => ErrorCode::Internal,
            other => ErrorCode::Other(other.to_owned()),
        }
    }

    /// The code for a bodyless answer (HEAD, or a proxy's page), from its status.
    pub fn from_status(status: u16) -> ErrorCode {
        match status {
            400 => ErrorCode::InvalidRequest,
            401 => ErrorCode::Unauthorized,
            403 => ErrorCode::Forbidden,
            404 => ErrorCode::NotFound,
            405 => ErrorCode::MethodNotAllowed,
            409 => ErrorCode::Conflict,
            410 => ErrorCode::Gone,
            413 => ErrorCode::PayloadTooLarge,
            416 => ErrorCode::RangeNotSatisfiable,
            503 => ErrorCode::ShuttingDown,
            _ => ErrorCode::Other(format!("HTTP_{status}")),
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            ErrorCode::NotFound => "NOT_FOUND",
            ErrorCode::Unauthorized => "UNAUTHORIZED",
            ErrorCode::Forbidden => "FORBIDDEN",
            ErrorCode::InvalidRequest => "INVALID_REQUEST",
            ErrorCode::NotRunning => "NOT_RUNNING",
            ErrorCode::DuplicateUrl => "DUPLICATE_URL",
            ErrorCode::DuplicateKey => "DUPLICATE_KEY",
            ErrorCode::DuplicateId => "DUPLICATE_ID",
            ErrorCode::NotComplete => "NOT_COMPLETE",
            ErrorCode::UploadInterrupted => "UPLOAD_INTERRUPTED",
            ErrorCode::Conflict => "CONFLICT",
            ErrorCode::StreamClosed => "STREAM_CLOSED",
            ErrorCode::ContentTypeMismatch => "CONTENT_TYPE_MISMATCH",
            ErrorCode::SequenceConflict => "SEQUENCE_CONFLICT",
            ErrorCode::SequenceGap => "SEQUENCE_GAP",
            ErrorCode::StaleEpoch => "STALE_EPOCH",
            ErrorCode::PayloadTooLarge => "PAYLOAD_TOO_LARGE",
            ErrorCode::RangeNotSatisfiable => "RANGE_NOT_SATISFIABLE",
            ErrorCode::Gone => "GONE",
            ErrorCode::UseEntityRoutes => "USE_ENTITY_ROUTES",
            ErrorCode::MethodNotAllowed => "METHOD_NOT_ALLOWED",
            ErrorCode::ShuttingDown => "SHUTTING_DOWN",
            ErrorCode::Internal => "INTERNAL",
            ErrorCode::Other(s) => s,
        };
        f.write_str(s)
    }
}

/// A JSON-RPC error object.
#[derive(Debug, Clone, PartialEq)]
pub struct RpcError {
    pub code: i64,
    pub message: String,
    pub data: Option<serde_json::Value>,
}

#[derive(Debug, Error)]
pub enum Error {
    /// The server answered with an error.
    #[error("{method} {path} failed with {status} {code}: {message}")]
    Api { method: String, path: String, status: u16, code: ErrorCode, message: String },
    /// A JSON-RPC call returned an error object.
    #[error("{method} failed with JSON-RPC error {}: {}", .error.code, .error.message)]
    Rpc { method: String, error: RpcError },
    /// The server could not be reached, or the connection broke.
    #[error("cannot reach the server at {url}: {source}")]
    Transport { url: String, source: reqwest::Error },
    /// The server answered something this SDK cannot understand.
    #[error("unexpected answer from the server: {0}")]
    Protocol(String),
    /// The caller's input is not valid.
    #[error("{0}")]
    Invalid(String),
    /// A resumable upload cannot go on with this input: the bytes the server
    /// holds for it, or the bytes it completed with, are not this input's (another
    /// file under the same id, or the file changed). Nothing more was appended,
    /// and the reason says what state the upload was left in.
    #[error("resumable upload {id:?} does not match this input: {reason}")]
    UploadMismatch { id: String, reason: String },
    #[error(transparent)]
    Core(#[from] attache_core::Error),
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
    /// A handler or hydration step failed for a reason of its own.
    #[error("{0}")]
    Other(String),
}

impl Error {
    /// The server's error code, when the server answered with one.
    pub fn code(&self) -> Option<&ErrorCode> {
        match self {
            Error::Api { code, .. } => Some(code),
            _ => None,
        }
    }

    /// The HTTP status, when the server answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    pub fn is_not_found(&self) -> bool {
        self.code() == Some(&ErrorCode::NotFound)
    }

    /// Whether trying again later (from the same offset) may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Transport { .. } => true,
            Error::Api { status, .. } => *status >= 500 || *status == 429,
            _ => false,
        }
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io { context: context.into(), source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_codes_round_trip_through_their_names() {
        for code in ["NOT_FOUND", "STREAM_CLOSED", "STALE_EPOCH", "SEQUENCE_GAP", "NOT_RUNNING", "DUPLICATE_URL"] {
            assert_eq!(ErrorCode::parse(code).to_string(), code);
        }
        assert_eq!(ErrorCode::parse("SOMETHING_NEW"), ErrorCode::Other("SOMETHING_NEW".into()));
        assert_eq!(ErrorCode::from_status(416), ErrorCode::RangeNotSatisfiable);
    }
}

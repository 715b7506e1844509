//! The server's one error type, [`ApiError`], for every face: what went
//! wrong in the domain's words. It is mapped to the wire in two places only:
//! to HTTP here ([`ApiError::refusal`], used by the single `IntoResponse`:
//! a status, protocol headers where the protocol asks for them, and
//! `{"error":{"code","message"}}`), and to JSON-RPC in `rpc::error_object`.

use attache_storage::StoreError;
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use crate::headers as h;

/// What went wrong. The domain variants say what a request met; the task
/// face's outcomes are in JSON-RPC's words; [`ApiError::Refused`] carries the
/// other refusals of the HTTP faces with the status and code their protocol
/// gives them.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ApiError {
    /// The entity does not exist for the caller: none at the URL, it holds
    /// nothing on it (existence does not leak), or it was purged meanwhile.
    #[error("Entity not found at {url}")]
    EntityNotFound { url: String },
    /// The caller holds something on the entity (or the task) but not the permission this needs.
    #[error("{message}")]
    NotPermitted { message: String },
    /// The entity is stopped: its main stream takes no more writes.
    #[error("Entity is stopped and accepts no more writes")]
    NotRunning,
    /// Another entity (or another's spawn or fork in flight) holds the URL.
    #[error("Entity already exists at URL \"{url}\"")]
    DuplicateUrl { url: String },
    /// The store refused or failed; its HTTP answer is the store error's own.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A task method's params fail validation.
    #[error("Invalid params: {validation}")]
    InvalidParams { validation: String, field: Option<String> },
    /// A task, attachment or precondition a task method named does not hold.
    #[error("{message}")]
    Rejected { message: String, data: Value },
    /// The caller exceeded its JSON-RPC rate limit.
    #[error("Rate limit exceeded: {limit} requests per {window_ms}ms")]
    RateLimited { limit: u32, window_ms: u64 },
    /// A task answer would carry more than `limit` bytes of attachment values.
    #[error("Response too large: attachment values in one response are limited to {limit} bytes")]
    ResponseTooLarge { limit: u64 },
    /// No such task method.
    #[error("Method not found: {method}")]
    MethodNotFound { method: String },
    /// A fault of the server (the detail is for the log, not the caller).
    #[error("internal error: {message}")]
    Internal { message: String },
    /// Any other refusal of an HTTP face, as its protocol answers it.
    #[error("{}", .0.message)]
    Refused(Box<Refusal>),
}

/// An HTTP answer to a failed request: what [`ApiError::refusal`] maps every error to.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Protocol headers the answer carries (e.g. `Stream-Closed`); few, so a list.
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

impl Refusal {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Refusal {
        Refusal { status, code, message: message.into(), headers: Vec::new() }
    }

    fn with_header(mut self, name: HeaderName, value: impl ToString) -> Refusal {
        if let Ok(v) = HeaderValue::from_str(&value.to_string()) {
            self.headers.push((name, v));
        }
        self
    }
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::Refused(Box::new(Refusal::new(status, code, message)))
    }
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "INVALID_REQUEST", message)
    }
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "NOT_FOUND", message)
    }
    pub fn payload_too_large(limit: usize) -> ApiError {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "PAYLOAD_TOO_LARGE",
            format!("the body is over the limit of {limit} bytes"),
        )
    }
    /// A task method's params fail validation at `field`.
    pub fn invalid(field: &str, validation: impl Into<String>) -> ApiError {
        ApiError::InvalidParams { validation: validation.into(), field: Some(field.to_owned()) }
    }
    pub fn rejected(message: impl Into<String>, data: Value) -> ApiError {
        ApiError::Rejected { message: message.into(), data }
    }
    /// A fault of the server; logged where the call that met it is answered.
    pub fn internal(e: impl std::fmt::Display) -> ApiError {
        ApiError::Internal { message: e.to_string() }
    }

    /// The same answer with one more header (as its HTTP refusal).
    pub fn with_header(self, name: HeaderName, value: impl ToString) -> ApiError {
        ApiError::Refused(Box::new(self.refusal().with_header(name, value)))
    }

    /// The HTTP status this error is answered with.
    pub fn status(&self) -> StatusCode {
        self.refusal().status
    }

    /// The mapping to HTTP, the one place each error gets its status, code,
    /// message and headers. Pure: [`IntoResponse`] logs the faults.
    pub fn refusal(&self) -> Refusal {
        let msg = self.to_string();
        match self {
            ApiError::EntityNotFound { .. } | ApiError::MethodNotFound { .. } => {
                Refusal::new(StatusCode::NOT_FOUND, "NOT_FOUND", msg)
            }
            ApiError::NotPermitted { .. } => Refusal::new(StatusCode::FORBIDDEN, "FORBIDDEN", msg),
            ApiError::NotRunning => Refusal::new(StatusCode::CONFLICT, "NOT_RUNNING", msg),
            ApiError::DuplicateUrl { .. } => Refusal::new(StatusCode::CONFLICT, "DUPLICATE_URL", msg),
            ApiError::Store(e) => store_refusal(e),
            ApiError::InvalidParams { .. } => Refusal::new(StatusCode::BAD_REQUEST, "INVALID_REQUEST", msg),
            ApiError::Rejected { .. } => Refusal::new(StatusCode::CONFLICT, "REJECTED", msg),
            ApiError::RateLimited { .. } => Refusal::new(StatusCode::TOO_MANY_REQUESTS, "RATE_LIMITED", msg),
            ApiError::ResponseTooLarge { .. } => {
                Refusal::new(StatusCode::INTERNAL_SERVER_ERROR, "RESPONSE_TOO_LARGE", msg)
            }
            ApiError::Internal { .. } => Refusal::new(StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL", "internal error"),
            ApiError::Refused(r) => (**r).clone(),
        }
    }

    /// Logs a fault of the server or its store (a refusal of the request is
    /// not one): what a caller is told is only that the fault is ours.
    pub fn log_fault(&self, face: &'static str) {
        match self {
            ApiError::Store(e @ StoreError::StorageFull(_)) => {
                tracing::warn!(error = %e, face, "a write met a full disk")
            }
            ApiError::Store(e @ StoreError::Unavailable(_)) => {
                tracing::warn!(error = %e, face, "a request met a disk error")
            }
            ApiError::Store(e @ (StoreError::Storage(_) | StoreError::Contention(_))) => {
                tracing::error!(error = %e, face, "storage failure")
            }
            ApiError::Internal { message } => tracing::error!(error = %message, face, "internal fault"),
            _ => {}
        }
    }
}

/// The HTTP answer to a store error.
fn store_refusal(e: &StoreError) -> Refusal {
    let msg = e.to_string();
    match e {
        StoreError::NotFound | StoreError::ForkSourceNotFound => Refusal::new(StatusCode::NOT_FOUND, "NOT_FOUND", msg),
        StoreError::Gone => Refusal::new(StatusCode::GONE, "GONE", msg),
        StoreError::ConfigMismatch(_) | StoreError::ForkSourceGone | StoreError::Moved => {
            Refusal::new(StatusCode::CONFLICT, "CONFLICT", msg)
        }
        StoreError::Closed { next } => Refusal::new(StatusCode::CONFLICT, "STREAM_CLOSED", msg)
            .with_header(h::STREAM_CLOSED, "true")
            .with_header(h::STREAM_NEXT_OFFSET, next),
        StoreError::ContentTypeMismatch { .. } => Refusal::new(StatusCode::CONFLICT, "CONTENT_TYPE_MISMATCH", msg),
        StoreError::MissingContentType => Refusal::new(StatusCode::BAD_REQUEST, "INVALID_REQUEST", msg),
        StoreError::SeqRegression { .. } => Refusal::new(StatusCode::CONFLICT, "SEQUENCE_CONFLICT", msg),
        StoreError::StaleEpoch { current } => {
            Refusal::new(StatusCode::FORBIDDEN, "STALE_EPOCH", msg).with_header(h::PRODUCER_EPOCH, current)
        }
        StoreError::EpochMustStartAtZero => Refusal::new(StatusCode::BAD_REQUEST, "INVALID_REQUEST", msg),
        StoreError::ProducerGap { expected, received } => Refusal::new(StatusCode::CONFLICT, "SEQUENCE_GAP", msg)
            .with_header(h::PRODUCER_EXPECTED_SEQ, expected)
            .with_header(h::PRODUCER_RECEIVED_SEQ, received),
        StoreError::Invalid(_) | StoreError::Rule(_) | StoreError::ForkOffsetInsideMessage { .. } => {
            Refusal::new(StatusCode::BAD_REQUEST, "INVALID_REQUEST", msg)
        }
        StoreError::ShuttingDown => Refusal::new(StatusCode::SERVICE_UNAVAILABLE, "SHUTTING_DOWN", msg),
        StoreError::StorageFull(_) => Refusal::new(
            StatusCode::INSUFFICIENT_STORAGE,
            "STORAGE_FULL",
            "the server's disk is full: this write was not made (nothing acknowledged is lost); retry once space is freed",
        )
        .with_header(axum::http::header::RETRY_AFTER, 5),
        StoreError::Unavailable(_) => Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "STORAGE_UNAVAILABLE",
            "the server could not complete this on its disk (an I/O error): it was not acknowledged; retry shortly",
        )
        .with_header(axum::http::header::RETRY_AFTER, 1),
        StoreError::Storage(_) | StoreError::Contention(_) => {
            Refusal::new(StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL", "storage failure")
        }
    }
}

impl From<attache_core::Error> for ApiError {
    fn from(e: attache_core::Error) -> ApiError {
        match e {
            attache_core::Error::InvalidEntityName(message) => {
                ApiError::new(StatusCode::BAD_REQUEST, "INVALID_ENTITY_NAME", message)
            }
            e @ attache_core::Error::TooManyMessages { .. } => {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "TOO_MANY_MESSAGES", e.to_string())
            }
            e => ApiError::bad_request(e.to_string()),
        }
    }
}

impl From<attache_core::state::RowRefusal> for ApiError {
    fn from(e: attache_core::state::RowRefusal) -> ApiError {
        use attache_core::state::RowRefusal;
        match e {
            RowRefusal::NotARow(_) => ApiError::new(StatusCode::BAD_REQUEST, "NOT_A_ROW", e.to_string()),
            RowRefusal::ServerOwned(_) => ApiError::new(StatusCode::FORBIDDEN, "SERVER_OWNED_ROW", e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.log_fault("http");
        self.refusal().into_response()
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": { "code": self.code, "message": self.message } });
        let mut res = (self.status, axum::Json(body)).into_response();
        res.headers_mut().extend(self.headers);
        res
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_errors_keep_their_http_status_and_code() {
        let cases = [
            (ApiError::EntityNotFound { url: "/a/b".into() }, StatusCode::NOT_FOUND, "NOT_FOUND"),
            (ApiError::NotPermitted { message: "no".into() }, StatusCode::FORBIDDEN, "FORBIDDEN"),
            (ApiError::NotRunning, StatusCode::CONFLICT, "NOT_RUNNING"),
            (ApiError::DuplicateUrl { url: "/a/b".into() }, StatusCode::CONFLICT, "DUPLICATE_URL"),
            (ApiError::Store(StoreError::Gone), StatusCode::GONE, "GONE"),
            (ApiError::Store(StoreError::Contention("deadlock".into())), StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL"),
        ];
        for (e, status, code) in cases {
            let r = e.refusal();
            assert_eq!((r.status, r.code), (status, code), "{e:?}");
        }
        assert_eq!(ApiError::EntityNotFound { url: "/a/b".into() }.refusal().message, "Entity not found at /a/b");
        assert_eq!(
            ApiError::DuplicateUrl { url: "/a/b".into() }.refusal().message,
            "Entity already exists at URL \"/a/b\""
        );
    }

    #[test]
    fn a_storage_fault_tells_the_caller_nothing_of_its_detail() {
        let r = ApiError::Store(StoreError::Storage("disk on fire at /var/x".into())).refusal();
        assert_eq!(r.message, "storage failure");
        let r = ApiError::internal("secret detail").refusal();
        assert_eq!(r.message, "internal error");
    }
}

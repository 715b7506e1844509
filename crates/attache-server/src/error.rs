//! The one place where errors become HTTP responses: a status, protocol
//! headers where the protocol asks for them, and `{"error":{"code","message"}}`.

use attache_storage::StoreError;
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::headers as h;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Protocol headers the answer carries (e.g. `Stream-Closed`); few, so a list.
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, code, message: message.into(), headers: Vec::new() }
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
    pub fn with_header(mut self, name: HeaderName, value: impl ToString) -> ApiError {
        if let Ok(v) = HeaderValue::from_str(&value.to_string()) {
            self.headers.push((name, v));
        }
        self
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        let msg = e.to_string();
        match e {
            StoreError::NotFound => ApiError::new(StatusCode::NOT_FOUND, "NOT_FOUND", msg),
            StoreError::ForkSourceNotFound => ApiError::new(StatusCode::NOT_FOUND, "NOT_FOUND", msg),
            StoreError::Gone => ApiError::new(StatusCode::GONE, "GONE", msg),
            StoreError::ConfigMismatch(_) | StoreError::ForkSourceGone => {
                ApiError::new(StatusCode::CONFLICT, "CONFLICT", msg)
            }
            StoreError::Closed { next } => ApiError::new(StatusCode::CONFLICT, "STREAM_CLOSED", msg)
                .with_header(h::STREAM_CLOSED, "true")
                .with_header(h::STREAM_NEXT_OFFSET, next),
            StoreError::ContentTypeMismatch { .. } => ApiError::new(StatusCode::CONFLICT, "CONTENT_TYPE_MISMATCH", msg),
            StoreError::MissingContentType => ApiError::bad_request(msg),
            StoreError::SeqRegression { .. } => ApiError::new(StatusCode::CONFLICT, "SEQUENCE_CONFLICT", msg),
            StoreError::StaleEpoch { current } => {
                ApiError::new(StatusCode::FORBIDDEN, "STALE_EPOCH", msg).with_header(h::PRODUCER_EPOCH, current)
            }
            StoreError::EpochMustStartAtZero => ApiError::bad_request(msg),
            StoreError::ProducerGap { expected, received } => ApiError::new(StatusCode::CONFLICT, "SEQUENCE_GAP", msg)
                .with_header(h::PRODUCER_EXPECTED_SEQ, expected)
                .with_header(h::PRODUCER_RECEIVED_SEQ, received),
            StoreError::Invalid(_) | StoreError::Rule(_) => ApiError::bad_request(msg),
            StoreError::ShuttingDown => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "SHUTTING_DOWN", msg),
            StoreError::StorageFull(_) => {
                tracing::warn!(error = %msg, "a write met a full disk");
                ApiError::new(
                    StatusCode::INSUFFICIENT_STORAGE,
                    "STORAGE_FULL",
                    "the server's disk is full: this write was not made (nothing acknowledged is lost); retry once space is freed",
                )
                .with_header(axum::http::header::RETRY_AFTER, 5)
            }
            StoreError::Unavailable(_) => {
                tracing::warn!(error = %msg, "a request met a disk error");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "STORAGE_UNAVAILABLE",
                    "the server could not complete this on its disk (an I/O error): it was not acknowledged; retry shortly",
                )
                .with_header(axum::http::header::RETRY_AFTER, 1)
            }
            StoreError::Storage(_) => {
                tracing::error!(error = %msg, "storage failure");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL", "storage failure")
            }
        }
    }
}

impl From<attache_core::Error> for ApiError {
    fn from(e: attache_core::Error) -> ApiError {
        ApiError::bad_request(e.to_string())
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
        let body = serde_json::json!({ "error": { "code": self.code, "message": self.message } });
        let mut res = (self.status, axum::Json(body)).into_response();
        res.headers_mut().extend(self.headers);
        res
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

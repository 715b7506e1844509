//! Refused requests stay readable: when a handler answers an error without
//! reading the request body (a 403, 404, 409 or 413 decided from the headers),
//! the rest of the body is read and discarded, up to
//! `ServerConfig::refused_body_drain_bytes` and `refused_body_drain_time`,
//! before the answer goes out. Closing with unread bytes in the socket makes
//! the kernel reset the connection, and Node's fetch (undici), still sending,
//! then fails with EPIPE ("fetch failed") instead of showing the status.
//! Past either bound, or when the declared length is past it (answered at
//! once), the answer carries `Connection: close`. A request sent
//! with `Expect: 100-continue` is not drained: its client sends no body
//! unless asked to (curl does this for bodies over 1 MiB).
//!
//! A drain also stops once nothing has come for [`DRAIN_IDLE`]: a client that
//! sends its whole body before it reads sends without pause, and one that
//! stalls (a refused upload that stopped sending) gets its answer then,
//! with `Connection: close`, instead of after the whole drain time.
//!
//! Bounded twice more: at most [`DRAINING_AT_ONCE`] refused bodies are
//! drained at once in the whole process (past it a refusal is answered at once
//! with `Connection: close`), and only HTTP/1 requests are drained: over
//! HTTP/2 a refused stream ends with the answer and the rest of its body is
//! refused by the protocol itself (no connection is torn down), so many
//! streams on one connection never hold a drain each.

use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::{Body, BodyDataStream, Bytes};
use axum::extract::Request;
use axum::http::{header, HeaderValue};
use axum::response::Response;
use futures::{Stream, StreamExt};
use tokio::sync::{oneshot, Semaphore};

use crate::AppState;

/// The request body as the handler sees it; dropped unfinished, it hands
/// what is left back to [`drain_refused`].
struct Returning {
    inner: Option<BodyDataStream>,
    finished: bool,
    back: Option<oneshot::Sender<BodyDataStream>>,
}

impl Stream for Returning {
    type Item = Result<Bytes, axum::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let Some(inner) = self.inner.as_mut() else { return Poll::Ready(None) };
        let polled = inner.poll_next_unpin(cx);
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            self.finished = true;
        }
        polled
    }
}

impl Drop for Returning {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        if let (Some(inner), Some(back)) = (self.inner.take(), self.back.take()) {
            let _ = back.send(inner);
        }
    }
}

/// A drain that receives nothing for this long stops (a stalled client,
/// not one sending its body before it reads).
pub const DRAIN_IDLE: std::time::Duration = std::time::Duration::from_secs(2);

/// Refused bodies drained at the same time, in the whole process.
pub const DRAINING_AT_ONCE: usize = 256;
static DRAINING: Semaphore = Semaphore::const_new(DRAINING_AT_ONCE);

/// The outermost step of the front door (`router::front`), so refusals of every later step are drained.
pub async fn drain_refused<F, Fut>(state: &AppState, req: Request, next: F) -> Response
where
    F: FnOnce(Request) -> Fut,
    Fut: std::future::Future<Output = Response>,
{
    // A client that asked `Expect: 100-continue` sends no body unless told to: nothing to drain.
    if req.headers().contains_key(header::EXPECT)
        || matches!(req.version(), axum::http::Version::HTTP_2 | axum::http::Version::HTTP_3)
    {
        return next(req).await;
    }
    let declared =
        req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    let (parts, body) = req.into_parts();
    // No body (a GET, a HEAD, an empty POST): nothing could be left unread.
    if http_body::Body::is_end_stream(&body) {
        return next(Request::from_parts(parts, body)).await;
    }
    let (tx, mut rx) = oneshot::channel();
    let wrapped =
        Body::from_stream(Returning { inner: Some(body.into_data_stream()), finished: false, back: Some(tx) });
    let mut res = next(Request::from_parts(parts, wrapped)).await;
    // A refusal that closes the connection itself (a body out of time or
    // out of budget: `http::read_body`) is not waited on.
    if res.status().is_success()
        || res.status().is_informational()
        || res.headers().get(header::CONNECTION).is_some_and(|v| v == "close")
    {
        return res;
    }
    let Ok(mut rest) = rx.try_recv() else { return res };
    let bound = state.config.refused_body_drain_bytes;
    // A body declared larger than the bound would be cut anyway: answer at once.
    if declared.is_some_and(|n| n > bound) {
        res.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        return res;
    }
    let Ok(_draining) = DRAINING.try_acquire() else {
        tracing::debug!("too many refused bodies draining at once; closing the connection instead");
        res.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        return res;
    };
    let deadline = tokio::time::Instant::now() + state.config.refused_body_drain_time;
    let mut drained = 0u64;
    let whole = loop {
        let wait_until = deadline.min(tokio::time::Instant::now() + DRAIN_IDLE);
        match tokio::time::timeout_at(wait_until, rest.next()).await {
            Ok(None) => break true,
            Ok(Some(Ok(chunk))) => {
                drained += chunk.len() as u64;
                if drained > bound {
                    break false;
                }
            }
            Ok(Some(Err(_))) | Err(_) => break false,
        }
    };
    if !whole {
        tracing::debug!(drained, "a refused request's body was not read to its end; closing the connection");
        res.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    res
}

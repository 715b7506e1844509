//! What a multipart upload may hold, and for how long: a place among
//! `--max-concurrent-uploads` ([`UploadSlots`]), within its principal's share
//! of them, taken before the upload opens its staging file, and a body that keeps coming ([`Paced`]): no byte for
//! `--upload-idle-timeout`, or slower on average than `--upload-min-rate`, is
//! a 408 and the upload is recorded `failed`.
//!
//! Without them a client that sent an upload's head and then nothing held
//! its connection (or HTTP/2 stream) and a staging file's descriptor past
//! every timeout: 45 such uploads took a server with `--max-connections 50`,
//! and 560 (or six HTTP/2 connections of 200 streams) every descriptor of a
//! process under `ulimit -n 1024`, after which accepts failed with EMFILE
//! and every write with 503.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::http::{header, StatusCode};
use bytes::Bytes;
use futures::Stream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

use attache_core::PrincipalKey;

use crate::error::{ApiError, ApiResult};
use crate::http::Shares;
use crate::metrics::{Metrics, UploadInProgress};

/// The refusal code of an upload past `--max-concurrent-uploads`, or past its principal's share of it.
pub const TOO_MANY_UPLOADS: &str = "TOO_MANY_UPLOADS";

/// How long a client refused for [`TOO_MANY_UPLOADS`] is asked to wait.
const RETRY_AFTER_SECS: u64 = 5;

/// The places for multipart uploads in progress, and what each principal
/// holds of them: at most its share (`--budget-share-per-principal`, as the
/// body and response budgets), so that one principal's stalled uploads
/// cannot take every place and lock every other principal's uploads out.
pub struct UploadSlots {
    places: Arc<Semaphore>,
    max: usize,
    shares: Arc<Shares>,
}

/// One upload's place, its count in its principal's share and in
/// `attache_uploads_in_progress`; given back on drop.
pub struct UploadSlot {
    _place: OwnedSemaphorePermit,
    _counted: UploadInProgress,
    shares: Arc<Shares>,
    who: PrincipalKey,
}

impl Drop for UploadSlot {
    fn drop(&mut self) {
        self.shares.give_back(&self.who, 1);
    }
}

impl UploadSlots {
    /// `max` places, of which one principal holds at most `share_percent`
    /// percent (and always one, when it holds none).
    pub fn new(max: usize, share_percent: u8) -> UploadSlots {
        let max = max.clamp(1, Semaphore::MAX_PERMITS);
        UploadSlots { places: Arc::new(Semaphore::new(max)), max, shares: Arc::new(Shares::new(max, share_percent)) }
    }

    /// Uploads in progress now.
    pub fn in_progress(&self) -> usize {
        self.max.saturating_sub(self.places.available_permits())
    }

    /// A place for one more upload of `who`, or 503 `TOO_MANY_UPLOADS` at
    /// once (never a wait) when every place is taken or `who` holds its share.
    pub fn take(&self, who: &PrincipalKey, metrics: &Arc<Metrics>) -> ApiResult<UploadSlot> {
        let place = self.places.clone().try_acquire_owned().map_err(|_| {
            too_many(format!(
                "{} uploads are in progress, as many as the server takes at once (max_concurrent_uploads); retry later",
                self.max
            ))
        })?;
        if !self.shares.take(who, 1, 0) {
            return Err(too_many(format!(
                "uploads of {who} in progress hold its share of the {} the server takes at once: {} \
                 (budget_share_per_principal of max_concurrent_uploads); retry later",
                self.max,
                self.shares.most().max(1)
            )));
        }
        Ok(UploadSlot {
            _place: place,
            _counted: metrics.upload_in_progress(),
            shares: self.shares.clone(),
            who: who.clone(),
        })
    }
}

fn too_many(message: String) -> ApiError {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, TOO_MANY_UPLOADS, message)
        .with_header(header::RETRY_AFTER, RETRY_AFTER_SECS)
}

/// An upload body that stopped coming, or came too slowly.
#[derive(Debug, thiserror::Error)]
pub enum UploadStalled {
    #[error("no byte of the upload arrived for {0:?} (upload_idle_timeout)")]
    Idle(Duration),
    #[error(
        "the upload arrived at {received} bytes in {waited:?}, slower than {rate} bytes/s (upload_min_rate) \
         after the first {grace:?}"
    )]
    Slow { received: u64, waited: Duration, rate: u64, grace: Duration },
}

impl UploadStalled {
    /// 408 `BODY_READ_TIMEOUT`, as a body read into memory that does not arrive in time; the connection is closed.
    pub fn refusal(&self) -> ApiError {
        crate::http::body_read_timeout(format!("the upload's body stopped: {self}"))
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// An upload's body, passed through while it keeps coming. Only the time the
/// server spends waiting for the next chunk counts (not its own disk writes
/// or store calls): a wait longer than `idle`, or a total wait longer than
/// `idle` plus what the bytes received so far buy at `min_rate` bytes/s,
/// ends the body with an [`UploadStalled`] error (then nothing).
pub struct Paced<S> {
    inner: S,
    idle: Duration,
    min_rate: u64,
    received: u64,
    /// Time spent waiting for the client, before the current wait.
    waited: Duration,
    /// When the current wait began.
    waiting_since: Option<Instant>,
    /// The current wait's deadline, and what passing it means.
    timer: Pin<Box<Sleep>>,
    idle_deadline: bool,
    failed: bool,
}

impl<S> Paced<S> {
    pub fn new(inner: S, idle: Duration, min_rate: u64) -> Paced<S> {
        Paced {
            inner,
            idle,
            min_rate,
            received: 0,
            waited: Duration::ZERO,
            waiting_since: None,
            timer: Box::pin(tokio::time::sleep(idle)),
            idle_deadline: true,
            failed: false,
        }
    }

    /// How much longer the client may make the server wait from now: the
    /// idle time, or what is left of its allowance at the minimum rate,
    /// whichever is shorter; and whether it is the idle time.
    fn allowance(&self) -> (Duration, bool) {
        if self.min_rate == 0 {
            return (self.idle, true);
        }
        let bought = Duration::from_secs_f64(self.received as f64 / self.min_rate as f64);
        let left = (self.idle + bought).saturating_sub(self.waited);
        if left < self.idle {
            (left, false)
        } else {
            (self.idle, true)
        }
    }

    fn stalled(&self) -> UploadStalled {
        match self.idle_deadline {
            true => UploadStalled::Idle(self.idle),
            false => UploadStalled::Slow {
                received: self.received,
                waited: self.waited + self.waiting_since.map_or(Duration::ZERO, |at| at.elapsed()),
                rate: self.min_rate,
                grace: self.idle,
            },
        }
    }
}

impl<S, E> Stream for Paced<S>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: Into<BoxError>,
{
    type Item = Result<Bytes, BoxError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.failed {
            return Poll::Ready(None);
        }
        let now = Instant::now();
        if self.waiting_since.is_none() {
            let (left, idle) = self.allowance();
            self.waiting_since = Some(now);
            self.idle_deadline = idle;
            self.timer.as_mut().reset(now + left);
        }
        match Pin::new(&mut self.inner).poll_next(cx) {
            Poll::Ready(item) => {
                if let Some(since) = self.waiting_since.take() {
                    self.waited += now.saturating_duration_since(since);
                }
                Poll::Ready(item.map(|r| match r {
                    Ok(chunk) => {
                        self.received += chunk.len() as u64;
                        Ok(chunk)
                    }
                    Err(e) => Err(e.into()),
                }))
            }
            Poll::Pending => match self.timer.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    let stalled = self.stalled();
                    self.failed = true;
                    Poll::Ready(Some(Err(Box::new(stalled))))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt as _;

    /// A body that yields `chunks` of `size` bytes, one every `every`, then ends.
    fn trickle(
        chunks: usize,
        size: usize,
        every: Duration,
    ) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Unpin {
        Box::pin(futures::stream::unfold(0, move |n| async move {
            if n == chunks {
                return None;
            }
            tokio::time::sleep(every).await;
            Some((Ok(Bytes::from(vec![b'x'; size])), n + 1))
        }))
    }

    async fn outcome(
        mut body: Paced<impl Stream<Item = Result<Bytes, std::io::Error>> + Unpin>,
    ) -> Result<u64, String> {
        let mut got = 0;
        while let Some(item) = body.next().await {
            match item {
                Ok(chunk) => got += chunk.len() as u64,
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(got)
    }

    const MS: Duration = Duration::from_millis(1);

    #[tokio::test]
    async fn a_body_that_keeps_coming_passes_however_long_it_takes() {
        // A byte every 50 ms for a second, under an idle time of 300 ms and a floor of 1 byte/s.
        let body = Paced::new(trickle(20, 1, 50 * MS), 300 * MS, 1);
        assert_eq!(outcome(body).await, Ok(20));
    }

    #[tokio::test]
    async fn a_body_that_stops_fails_after_the_idle_time() {
        let started = Instant::now();
        let body = Paced::new(trickle(1, 10, Duration::from_secs(3600)), 200 * MS, 0);
        let err = outcome(body).await.expect_err("a stalled body fails");
        assert!(err.contains("no byte"), "{err}");
        let took = started.elapsed();
        assert!(took >= 200 * MS && took < 2000 * MS, "{took:?}");
    }

    #[tokio::test]
    async fn a_trickle_below_the_minimum_rate_fails_once_its_allowance_is_spent() {
        // A byte every 100 ms against a floor of 512 bytes/s: no wait is
        // idle for 400 ms, but once 400 ms of waiting (plus what a few bytes
        // buy) are spent, it is cut.
        let started = Instant::now();
        let body = Paced::new(trickle(1000, 1, 100 * MS), 400 * MS, 512);
        let err = outcome(body).await.expect_err("a trickle fails");
        assert!(err.contains("slower than 512"), "{err}");
        let took = started.elapsed();
        assert!(took >= 400 * MS && took < 2000 * MS, "{took:?}");
    }

    #[test]
    fn places_are_refused_past_the_cap_and_given_back_on_drop() {
        let metrics = Arc::new(Metrics::default());
        let slots = UploadSlots::new(2, 100);
        let alice = PrincipalKey::parse("user:alice").expect("a principal");
        let a = slots.take(&alice, &metrics).expect("a first place");
        let _b = slots.take(&alice, &metrics).expect("a second place");
        assert_eq!(slots.in_progress(), 2);
        let refused = slots.take(&alice, &metrics).err().expect("no third place");
        assert_eq!(refused.refusal().code, TOO_MANY_UPLOADS);
        drop(a);
        assert_eq!(slots.in_progress(), 1);
        assert!(slots.take(&alice, &metrics).is_ok());
    }

    #[test]
    fn one_principal_holds_at_most_its_share_and_always_one_place() {
        let metrics = Arc::new(Metrics::default());
        let slots = UploadSlots::new(8, 25);
        let [alice, mallory] = ["user:alice", "user:mallory"].map(|p| PrincipalKey::parse(p).expect("a principal"));
        let held =
            [slots.take(&mallory, &metrics), slots.take(&mallory, &metrics)].map(|s| s.expect("within the share"));
        let refused = slots.take(&mallory, &metrics).err().expect("past the share");
        assert_eq!(refused.refusal().code, TOO_MANY_UPLOADS);
        assert_eq!(slots.in_progress(), 2, "a refused upload holds no place");
        assert!(slots.take(&alice, &metrics).is_ok());
        drop(held);
        assert!(slots.take(&mallory, &metrics).is_ok(), "its places given back, the share is free again");

        // A share below one upload still lets a principal holding none take one.
        let slots = UploadSlots::new(2, 1);
        let first = slots.take(&mallory, &metrics).expect("one place, always");
        assert!(slots.take(&mallory, &metrics).is_err());
        assert!(slots.take(&alice, &metrics).is_ok());
        drop(first);
    }
}

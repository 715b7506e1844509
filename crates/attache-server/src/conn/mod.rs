//! Connections: the accept loop, the cap on open connections, and the timers
//! that close a connection nobody is using.
//!
//! Every accepted socket is wrapped in [`Watched`], which holds one of
//! `max_connections` permits for as long as the socket lives (an upgraded
//! WebSocket keeps its permit) and notes when bytes arrive and whether writes
//! are blocked. [`Tracked`] counts the requests in flight on the connection:
//! a request is in flight from its header until its response body ends, so a
//! long-poll or an SSE response in progress is never idle. The connection's
//! task closes it at the first deadline that passes (it looks every quarter
//! of the shortest timeout, at most every second, and requests only update
//! atomics, so a busy connection pays no timer work per request):
//!
//! - header read: a new connection must deliver its first request header
//!   within `header_read_timeout`; so must a kept-alive one once the first
//!   byte of its next request has arrived (slowloris), counted on HTTP/1 from
//!   when it arrives even if the client pipelines it behind a response still
//!   going out ([`RequestBody`] tells the next header from a request body);
//! - idle: a kept-alive connection with nothing in flight, `idle_timeout`
//!   after its last response;
//! - slow reader: writes blocked (the client reads nothing) for
//!   `slow_reader_timeout`. The client resumes from its last offset. While
//!   writes are blocked this is the only deadline: a response handed to
//!   hyper whole is still going out, and neither the idle deadline nor the
//!   header deadline of a request pipelined behind it cuts it short.
//!
//! - shutdown: once the server stops, a request still in flight after
//!   `shutdown_grace` (a stalled upload body, a response read slowly) has its
//!   connection closed, so no client holds the process open.
//!
//! The header and idle deadlines of each connection are stretched by its own
//! random 0-10% ([`JITTER_PERMILLE`]): connections opened together (a burst of
//! clients, or a reconnect storm) are not all closed in the same instant and
//! do not all reconnect in the same instant, so the work spreads instead of
//! stalling the accept loop for everyone else (`bench/stall.sh`).
//!
//! HTTP/1 connections are served by the lean path ([`http1`], its wire code
//! in [`wire`]), which hands a connection to hyper at its first request that
//! is not plain; HTTP/2 connections are hyper's.
//!
//! Beyond the cap a connection is still accepted (the backlog never fills).
//! It takes the place of the connection quiet longest, which is closed
//! ([`Live::evict_one`]: nothing in flight, not a WebSocket), or else of
//! one whose client has taken nothing of an answer for a second; when every
//! connection is busy it is answered `503` with `Retry-After`. Both by a
//! small, bounded set of tasks; when those are busy too, it is closed at once.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::Router;
use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use attache_core::PrincipalKey;
use tokio_util::task::TaskTracker;
use tower::ServiceExt as _;

use crate::metrics::{Closed, Metrics};

mod http1;
pub mod wire;

/// Connections over the cap answered 503 at once; beyond these, closed unanswered.
const REJECTING_AT_ONCE: usize = 64;
/// How long a connection over the cap may take to send its request and read the 503.
const REJECT_WITHIN: Duration = Duration::from_secs(2);
/// First and longest pause after an accept error such as EMFILE.
const ACCEPT_BACKOFF: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(1));

/// A way past the router for requests the lean HTTP/1 path has read whole. The server's is
/// `router::direct` (plain stream requests: issue 11, an append's trip
/// through the router's matching, its middleware and the refused-body drain
/// cost more than the append's own checks).
pub type Direct = Arc<dyn DirectRoute>;

/// See [`Direct`].
pub trait DirectRoute: Send + Sync {
    /// Whether a request to `path` goes this way rather than through the router.
    fn takes(&self, path: &str) -> bool;
    /// The answer to a request it takes.
    fn answer(&self, req: Request<Body>) -> DirectAnswer;
}

/// A [`Direct`] route's answer.
pub type DirectAnswer = Pin<Box<dyn Future<Output = Response<Body>> + Send>>;

/// The bounds one connection lives under.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub slow_reader_timeout: Duration,
    pub shutdown_grace: Duration,
    /// Bytes of unfinished request heads past [`HEAD_FREE_BYTES`] a connection, all connections together.
    pub header_buffer_bytes: usize,
}

/// What every connection may hold of an unfinished request head without
/// taking from `--header-buffer-bytes`: nearly every head is smaller.
pub const HEAD_FREE_BYTES: usize = 8 << 10;

/// The bytes of unfinished request heads past [`HEAD_FREE_BYTES`] that all
/// connections hold together. A head may be as large as a connection's
/// buffer (64 KiB, 431 beyond), and a client that sends most of one and
/// stalls keeps it there until `--header-read-timeout`: 2,000 such
/// connections held 158 MB, 4,000 306 MB (session 16's attack pass). Past
/// this budget, a connection whose head grows further is closed. A finished
/// head stays counted (what of it is past [`HEAD_FREE_BYTES`]) until its
/// request ends: a request holds its head while it runs, and 2,000
/// long-polls with 60 KB heads held 180 MB (session 17's attack pass).
#[derive(Debug)]
pub struct HeadBudget {
    held: AtomicUsize,
    capacity: usize,
}

impl HeadBudget {
    pub fn new(capacity: usize) -> HeadBudget {
        HeadBudget { held: AtomicUsize::new(0), capacity }
    }

    fn take(&self, n: usize) -> bool {
        n == 0
            || self
                .held
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |h| h.checked_add(n).filter(|&t| t <= self.capacity))
                .is_ok()
    }

    fn give_back(&self, n: usize) {
        if n > 0 {
            self.held.fetch_sub(n, Ordering::AcqRel);
        }
    }

    /// Counts `n` bytes already read within the budget (a finished head, no
    /// larger than what its reading took).
    fn take_over(&self, n: usize) {
        if n > 0 {
            self.held.fetch_add(n, Ordering::AcqRel);
        }
    }

    /// Bytes held now (for `/metrics` and tests).
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }
}

impl Limits {
    pub fn of(config: &crate::ServerConfig) -> Limits {
        Limits {
            max_connections: config.max_connections,
            header_read_timeout: config.header_read_timeout,
            idle_timeout: config.idle_timeout,
            slow_reader_timeout: config.slow_reader_timeout,
            shutdown_grace: config.shutdown_grace,
            header_buffer_bytes: config.header_buffer_bytes,
        }
    }
}

/// The most a connection's header and idle deadlines are stretched, in thousandths.
const JITTER_PERMILLE: u64 = 100;

/// Connections the kernel holds for the accept loop (capped by `net.core.somaxconn`):
/// room for a burst of reconnects, so that a new client is not left retrying its SYN.
const LISTEN_BACKLOG: u32 = 4096;

/// Binds the listening socket, with a backlog for bursts of connections.
pub fn listen(addr: std::net::SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    // As `TcpListener::bind` does: a restart can bind while old connections linger in TIME_WAIT.
    #[cfg(unix)]
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Accepts until `shutdown`, then waits for the open connections to finish.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    direct: Direct,
    limits: Limits,
    shares: PlaceShares,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let rejecting = Arc::new(Semaphore::new(REJECTING_AT_ONCE));
    let opener = Opener {
        permits: Arc::new(Semaphore::new(limits.max_connections)),
        shares: Arc::new(shares.sized(limits.max_connections)),
        connections: TaskTracker::new(),
        live: Arc::new(Live::default()),
        heads: Arc::new(HeadBudget::new(limits.header_buffer_bytes)),
        next_id: Arc::new(AtomicU64::new(0)),
        app,
        direct,
        limits,
        metrics: metrics.clone(),
    };
    let mut backoff = ACCEPT_BACKOFF.0;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.cancelled() => break,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => {
                backoff = ACCEPT_BACKOFF.0;
                tune(&stream);
                stream
            }
            Err(err) if is_connection_error(&err) => continue,
            Err(err) => {
                // EMFILE and the like: the pending connection stays in the
                // backlog; give closing connections a moment, then retry.
                tracing::error!(%err, pause = ?backoff, "accept failed");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.cancelled() => break,
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF.1);
                continue;
            }
        };
        match opener.permits.clone().try_acquire_owned() {
            Ok(permit) => opener.open(stream, permit),
            Err(_) => match rejecting.clone().try_acquire_owned() {
                // The quietest connection makes room: this one takes its place once it has closed.
                Ok(waiting) if opener.live.evict_one() => {
                    let opener_ = opener.clone();
                    opener.connections.spawn(async move {
                        let place = tokio::time::timeout(EVICTED_WITHIN, opener_.permits.clone().acquire_owned());
                        match place.await {
                            Ok(Ok(permit)) => {
                                drop(waiting);
                                opener_.open(stream, permit);
                            }
                            // The evicted connection had a request begin first: no place came.
                            _ => {
                                opener_.metrics.connection_closed(Closed::OverCap);
                                reject(stream, opener_.limits.max_connections, waiting).await;
                            }
                        }
                    });
                }
                Ok(permit) => {
                    metrics.connection_closed(Closed::OverCap);
                    opener.connections.spawn(reject(stream, limits.max_connections, permit));
                }
                // Dropped here, closed unanswered.
                Err(_) => metrics.connection_closed(Closed::OverCap),
            },
        }
    }
    drop(listener);
    opener.live.stop_all();
    opener.connections.close();
    opener.connections.wait().await;
}

/// How long a connection's client must have taken nothing of an answer for
/// the connection to give its place to a new one at the cap ([`Activity::eviction_rank`]).
const STALLED_MS: u64 = 1_000;

/// How long a connection accepted at the cap waits for the place of the
/// connection it evicted ([`Live::evict_one`]) before it is answered 503.
const EVICTED_WITHIN: Duration = Duration::from_secs(1);

/// What a connection given a place needs: the accept loop's, and a task's
/// that waited for the place an evicted connection gave back.
#[derive(Clone)]
struct Opener {
    permits: Arc<Semaphore>,
    shares: Arc<SizedShares>,
    connections: TaskTracker,
    live: Arc<Live>,
    heads: Arc<HeadBudget>,
    next_id: Arc<AtomicU64>,
    app: Router,
    direct: Direct,
    limits: Limits,
    metrics: Arc<Metrics>,
}

impl Opener {
    /// Serves `stream` in the place `permit` holds, on a task of its own.
    fn open(&self, stream: TcpStream, permit: OwnedSemaphorePermit) {
        let activity = Arc::new(Activity::new(self.metrics.clone(), self.heads.clone()));
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let listed = self.live.add(id, activity.clone());
        let io =
            Watched { io: stream, activity: activity.clone(), _permit: permit, unread: Bytes::new(), frames: None };
        let places =
            Places { permits: self.permits.clone(), max: self.limits.max_connections, shares: self.shares.clone() };
        self.connections.spawn(serve_connection(
            io,
            activity,
            (self.app.clone(), self.direct.clone()),
            self.limits,
            listed,
            places,
        ));
    }
}

/// The open connections, so that a shutdown can tell each one. (Each
/// connection polling one shared `CancellationToken` took that token's lock
/// on every wake-up, from both workers: under load a worker waited on it for
/// milliseconds whenever its holder was preempted, the append p99's tail.)
#[derive(Default)]
struct Live {
    connections: parking_lot::Mutex<std::collections::HashMap<u64, Arc<Activity>>>,
}

impl Live {
    fn add(self: &Arc<Self>, id: u64, activity: Arc<Activity>) -> Listed {
        self.connections.lock().insert(id, activity);
        Listed { live: self.clone(), id }
    }

    /// Closes one connection to make room for a new one at
    /// `--max-connections`, the first by [`Activity::eviction_rank`]: the
    /// one quiet longest (nothing in flight: kept alive between requests, or
    /// still sending its first head), else the one whose client has taken
    /// nothing of an answer longest; `false` when every connection has a
    /// request going on (or is a WebSocket). Idle places are the cheapest to
    /// give back: an HTTP client reopens a kept-alive connection the server
    /// closed. Without it, one client holding every place with idle
    /// keep-alives (reopened each idle timeout) had every other client
    /// answered 503 (session 21's attack pass).
    fn evict_one(&self) -> bool {
        let victim = {
            let connections = self.connections.lock();
            connections
                .values()
                .filter(|a| !a.evict.load(Ordering::Acquire))
                .filter_map(|a| a.eviction_rank().map(|rank| (rank, a)))
                .min_by_key(|(rank, _)| *rank)
                .map(|(_, a)| a.clone())
        };
        let Some(victim) = victim else { return false };
        victim.evict.store(true, Ordering::Release);
        victim.stopping.notify_one();
        true
    }

    /// Tells every open connection to finish its requests and close.
    fn stop_all(&self) {
        for activity in self.connections.lock().values() {
            activity.stop.store(true, Ordering::Release);
            activity.stopping.notify_one();
        }
    }
}

/// A connection's place in [`Live`], given back when the connection ends.
struct Listed {
    live: Arc<Live>,
    id: u64,
}

impl Drop for Listed {
    fn drop(&mut self) {
        self.live.connections.lock().remove(&self.id);
    }
}

/// Most response bytes the kernel holds unsent for one connection (beyond
/// what the client's receive window has taken): writes wait once this much
/// is queued. Without it the kernel's send buffer grows to megabytes per
/// socket, and a burst of readers that do not read (or read slowly) makes the
/// server copy megabytes into each socket before it notices (`bench/stall.sh`:
/// 200 such SSE readers opened at once held `/healthz` for half a second).
pub const SOCKET_UNSENT_BYTES: usize = 64 << 10;

/// Requests one HTTP/2 connection may have open at once (RFC 9113 asks for
/// at least 100; hyper's default is 200). Each may hold an answer its client
/// never opens a window for: `--response-buffer-bytes` bounds their bytes.
const HTTP2_MAX_STREAMS: u32 = 100;

/// What an HTTP/2 client may send before the server reads it, per stream and
/// per connection: RFC 9113's initial 65,535, not hyper's 1 MiB. Bytes sent on
/// a request whose handler never reads them (a long-poll, an SSE read) sat in
/// that window outside every budget: 200 connections held 182 MiB (session 14).
/// No extended CONNECT (RFC 8441) is offered: WebSockets open over HTTP/1.1
/// only, each a connection `--max-connections` counts (up to 100 of them
/// could share one HTTP/2 connection, uncounted, and an HTTP/2 connection
/// whose only work is a tunnel was cut by the header timeout).
const HTTP2_RECEIVE_WINDOW: u32 = 65_535;

/// Per-socket options: answers go out as soon as they are written (no Nagle
/// delay between an SSE event and the next), and the unsent queue is bounded.
fn tune(stream: &TcpStream) {
    if let Err(err) = stream.set_nodelay(true) {
        tracing::debug!(%err, "cannot set TCP_NODELAY");
    }
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd as _;
        let lowat = libc::c_int::try_from(SOCKET_UNSENT_BYTES).unwrap_or(libc::c_int::MAX);
        // SAFETY: a valid socket descriptor, an option of type int, its size.
        let rc = unsafe {
            libc::setsockopt(
                stream.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_NOTSENT_LOWAT,
                std::ptr::addr_of!(lowat).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            tracing::debug!(err = %io::Error::last_os_error(), "cannot set TCP_NOTSENT_LOWAT");
        }
    }
}

/// Errors about one incoming connection, not about the listener.
fn is_connection_error(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    )
}

/// What a connection buffers on its own: its read buffer (so also the largest
/// request header, 431 beyond) and the response bytes queued for a client
/// that reads slowly. Response bodies wait for this room before producing more.
pub const CONNECTION_BUFFER_BYTES: usize = 64 << 10;

/// The largest request header list an HTTP/2 client may send (decoded, RFC
/// 9113's SETTINGS_MAX_HEADER_LIST_SIZE), as Node's default. hyper's own is
/// 16 MiB, and a header block arriving in HEADERS and CONTINUATION frames is
/// held until it ends: 2,000 connections, each with a long-poll in flight and
/// ~31 KB of a second header block sent and stalled, held 113 MB more than
/// the long-polls alone, outside the header budget, which counts HTTP/1 heads
/// only (session 16's attack pass).
const HTTP2_MAX_HEADER_LIST: u32 = 16 << 10;

/// The HTTP/2 connection preface (RFC 9113, 3.4): how a client that speaks
/// HTTP/2 with prior knowledge starts.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What a connection's first bytes say it speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Http1,
    Http2,
    /// Part of the HTTP/2 preface so far: hyper_util's auto builder reads on
    /// and decides (a peek would only see the same bytes again).
    Undecided,
}

/// What the client speaks, told from its first bytes without reading them,
/// so that hyper's HTTP/1 read buffer gets the whole request in its first
/// read. (hyper_util's auto builder reads the first 24 bytes itself and hands
/// them over alone; the read that followed grew each connection's 8 KiB read
/// buffer to 16 KiB: 8 KiB more for every open connection.)
async fn protocol(socket: &TcpStream) -> io::Result<Protocol> {
    let mut first = [0u8; H2_PREFACE.len()];
    let n = socket.peek(&mut first).await?;
    Ok(if n == 0 || first[..n] != H2_PREFACE[..n] {
        Protocol::Http1
    } else if n == H2_PREFACE.len() {
        Protocol::Http2
    } else {
        Protocol::Undecided
    })
}

/// An HTTP/1 or HTTP/2 connection being served.
trait Serving: Future<Output = Result<(), Self::Error>> {
    type Error: std::fmt::Display;
    fn graceful_shutdown(self: Pin<&mut Self>);
}

impl Serving for hyper_util::server::conn::auto::UpgradeableConnection<'_, TokioIo<Watched>, Tracked, TokioExecutor> {
    type Error = Box<dyn std::error::Error + Send + Sync>;
    fn graceful_shutdown(self: Pin<&mut Self>) {
        hyper_util::server::conn::auto::UpgradeableConnection::graceful_shutdown(self);
    }
}

impl Serving for hyper::server::conn::http2::Connection<TokioIo<Watched>, Tracked, TokioExecutor> {
    type Error = hyper::Error;
    fn graceful_shutdown(self: Pin<&mut Self>) {
        hyper::server::conn::http2::Connection::graceful_shutdown(self);
    }
}

/// How hyper serves the HTTP/1 connections the lean path hands it.
fn http1_builder() -> hyper::server::conn::http1::Builder {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.max_buf_size(CONNECTION_BUFFER_BYTES);
    builder
}

/// Boxed: hyper's connections are large, and held inline they would size
/// every connection's task for the largest of them, lean HTTP/1 ones included.
impl<S: Serving + ?Sized> Serving for Pin<Box<S>> {
    type Error = S::Error;
    fn graceful_shutdown(self: Pin<&mut Self>) {
        self.get_mut().as_mut().graceful_shutdown();
    }
}

async fn serve_connection(
    io: Watched,
    activity: Arc<Activity>,
    (app, direct): (Router, Direct),
    limits: Limits,
    _listed: Listed,
    places: Places,
) {
    let header_deadline = activity.deadline(&limits).map_or_else(Instant::now, |(at, _)| at);
    let protocol = tokio::select! {
        protocol = protocol(&io.io) => match protocol {
            Ok(protocol) => protocol,
            Err(err) => {
                tracing::debug!(%err, "connection failed before its first request");
                return;
            }
        },
        _ = tokio::time::sleep_until(header_deadline) => {
            activity.metrics.connection_closed(Closed::HeaderTimeout);
            return;
        }
        // The server is stopping, or the connection is evicted: with no request yet, it closes now.
        _ = activity.stopping.notified() => {
            if activity.evict.load(Ordering::Acquire) {
                activity.metrics.connection_closed(Closed::Evicted);
            }
            return;
        }
    };
    match protocol {
        Protocol::Http1 => {
            drive(http1::serve(io, activity.clone(), app, direct, limits.header_read_timeout), activity, limits).await
        }
        Protocol::Http2 => {
            let mut io = io;
            io.frames = Some(H2Frames::new());
            let service = Tracked { app, activity: activity.clone(), places: Some(places) };
            let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
            builder
                .max_send_buf_size(CONNECTION_BUFFER_BYTES)
                .initial_stream_window_size(HTTP2_RECEIVE_WINDOW)
                .initial_connection_window_size(HTTP2_RECEIVE_WINDOW)
                .max_header_list_size(HTTP2_MAX_HEADER_LIST)
                .max_concurrent_streams(HTTP2_MAX_STREAMS);
            drive(Box::pin(builder.serve_connection(TokioIo::new(io), service)), activity, limits).await;
        }
        Protocol::Undecided => {
            // Perhaps HTTP/2 whose preface came in pieces: watched as HTTP/2 until its bytes say otherwise.
            let mut io = io;
            io.frames = Some(H2Frames::new());
            let service = Tracked { app, activity: activity.clone(), places: Some(places) };
            let mut builder = Builder::new(TokioExecutor::new());
            builder.http1().max_buf_size(CONNECTION_BUFFER_BYTES);
            builder
                .http2()
                .max_send_buf_size(CONNECTION_BUFFER_BYTES)
                .initial_stream_window_size(HTTP2_RECEIVE_WINDOW)
                .initial_connection_window_size(HTTP2_RECEIVE_WINDOW)
                .max_header_list_size(HTTP2_MAX_HEADER_LIST)
                .max_concurrent_streams(HTTP2_MAX_STREAMS);
            drive(Box::pin(builder.serve_connection_with_upgrades(TokioIo::new(io), service)), activity, limits).await;
        }
    }
}

/// Serves a connection until it ends or one of its deadlines passes.
async fn drive(conn: impl Serving, activity: Arc<Activity>, limits: Limits) {
    tokio::pin!(conn);
    // The timer is checked every `period` (and at the deadline, when that is
    // sooner), not re-armed per request: requests only update atomics, so a
    // busy kept-alive connection costs its task no extra wake-ups.
    let period = check_period(&limits);
    let check = tokio::time::sleep_until(next_check(&activity, &limits, period));
    tokio::pin!(check);
    // Shutting down: when the requests in flight lose their grace.
    let mut stopping: Option<Instant> = None;
    loop {
        tokio::select! {
            served = conn.as_mut() => {
                if let Err(err) = served {
                    tracing::debug!(%err, "connection ended with an error");
                }
                return;
            }
            _ = &mut check => {
                let now = Instant::now();
                if stopping.is_some_and(|cut| cut <= now) {
                    // A body that stalls (an upload has no body deadline) or a
                    // response read slowly must not hold the process open.
                    tracing::info!("closing a connection whose request outlived the shutdown grace");
                    return;
                }
                if let Some((at, why)) = activity.deadline(&limits) {
                    if at <= now {
                        activity.metrics.connection_closed(why);
                        tracing::debug!(reason = why.as_str(), "closing connection");
                        return;
                    }
                }
                let next = next_check(&activity, &limits, period);
                check.as_mut().reset(stopping.map_or(next, |cut| cut.min(next)));
            }
            // The server is stopping (`Live::stop_all`), or, once it is, a
            // request ended; or the connection is evicted (`Live::evict_one`).
            _ = activity.stopping.notified() => {
                if activity.evict.load(Ordering::Acquire) {
                    if activity.eviction_rank().is_some() {
                        activity.metrics.connection_closed(Closed::Evicted);
                        tracing::debug!(reason = Closed::Evicted.as_str(), "closing connection");
                        return;
                    }
                    // A request began first (or its client read again): busy, not evicted.
                    activity.evict.store(false, Ordering::Release);
                }
                if stopping.is_none() && activity.stop.load(Ordering::Acquire) {
                    let cut = Instant::now() + limits.shutdown_grace;
                    stopping = Some(cut);
                    conn.as_mut().graceful_shutdown();
                    if cut < check.deadline() {
                        check.as_mut().reset(cut);
                    }
                }
            }
        }
        // Shutting down: a connection with no request in flight (even one
        // halfway through a header) closes now; the others finish theirs
        // within the shutdown grace.
        if stopping.is_some() && activity.in_flight.load(Ordering::Acquire) == 0 {
            return;
        }
    }
}

/// How often a connection looks at its deadlines: a deadline is kept to
/// within a quarter of the shortest timeout (at most a second late).
fn check_period(limits: &Limits) -> Duration {
    let shortest = limits.header_read_timeout.min(limits.idle_timeout).min(limits.slow_reader_timeout);
    (shortest / 4).clamp(Duration::from_millis(10), Duration::from_secs(1))
}

/// The next look: the deadline in force, or one period from now if that is sooner.
fn next_check(activity: &Activity, limits: &Limits, period: Duration) -> Instant {
    let soon = Instant::now() + period;
    match activity.deadline(limits) {
        Some((at, _)) if at < soon => at,
        _ => soon,
    }
}

/// The 503 of a connection, or an HTTP/2 request, past `--max-connections`.
fn over_cap(max_connections: usize) -> Response<Body> {
    let body = serde_json::json!({"error": {
        "code": "too_many_connections",
        "message": format!("the server holds its maximum of {max_connections} connections; retry shortly"),
    }});
    let mut res = Response::new(Body::from(body.to_string()));
    *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    let hm = res.headers_mut();
    hm.insert("retry-after", HeaderValue::from_static("1"));
    hm.insert("content-type", HeaderValue::from_static("application/json"));
    res
}

/// Answers every request on a connection over the cap with 503, then closes it.
async fn reject(stream: TcpStream, max_connections: usize, _permit: OwnedSemaphorePermit) {
    let service = hyper::service::service_fn(move |_req: Request<Incoming>| async move {
        let mut res = over_cap(max_connections);
        res.headers_mut().insert("connection", HeaderValue::from_static("close"));
        Ok::<_, Infallible>(res)
    });
    let mut builder = Builder::new(TokioExecutor::new());
    builder.http1().keep_alive(false);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    let _ = tokio::time::timeout(REJECT_WITHIN, conn).await;
}

/// What one connection's timers look at; shared by its socket, its requests and its task.
struct Activity {
    opened: Instant,
    /// This connection's stretch of its header and idle deadlines, in thousandths.
    jitter_permille: u64,
    /// Requests whose response body has not ended.
    in_flight: AtomicUsize,
    /// A request has arrived on this connection.
    served: AtomicBool,
    /// Milliseconds after `opened`: when the last response ended.
    idle_since: AtomicU64,
    /// Milliseconds after `opened`: the first byte of a next request header
    /// (read while idle, or on HTTP/1 after every request body in flight has
    /// ended, a pipelined one); `NEVER` when none.
    reading_since: AtomicU64,
    /// Request bodies on this connection not yet read to their end.
    open_bodies: AtomicUsize,
    /// HTTP/2: bytes read while a request is in flight may belong to any stream.
    multiplexed: AtomicBool,
    /// Milliseconds after `opened`: since when writes are blocked; `NEVER` when they are not.
    blocked_since: AtomicU64,
    /// HTTP/2: the response bodies hyper has not asked for their next frame
    /// since they gave their last one (or since they began), by body, with
    /// since when (milliseconds after `opened`). hyper asks a body for more
    /// only once its stream's flow-control window has room, so a body
    /// waiting here is a stream the client lets no more bytes into: the
    /// HTTP/2 form of a blocked write ([`Activity::deadline`]).
    unasked: parking_lot::Mutex<std::collections::HashMap<u64, u64>>,
    next_body: AtomicU64,
    /// The server is shutting down (`Live::stop_all` sets it and wakes the
    /// task; from then on the last request to end wakes it too).
    stop: AtomicBool,
    /// Chosen to make room for a new connection at the cap
    /// ([`Live::evict_one`]; `stopping` wakes the task): it closes at
    /// once unless a request has begun meanwhile.
    evict: AtomicBool,
    stopping: Notify,
    /// Bytes read of the request head being read (from its first byte to the request's start).
    head_read: AtomicUsize,
    /// What of them past [`HEAD_FREE_BYTES`] this connection holds of `heads`.
    head_held: AtomicUsize,
    /// The connection was upgraded (a WebSocket): no request head comes again.
    upgraded: AtomicBool,
    /// HTTP/2: milliseconds after `opened` when the header block in progress began; `NEVER` when none.
    header_block_since: AtomicU64,
    heads: Arc<HeadBudget>,
    metrics: Arc<Metrics>,
    _open: crate::metrics::OpenConnection,
}

const NEVER: u64 = u64::MAX;

impl Drop for Activity {
    /// A connection closed in the middle of a head gives its bytes back.
    fn drop(&mut self) {
        self.heads.give_back(*self.head_held.get_mut());
    }
}

impl Activity {
    fn new(metrics: Arc<Metrics>, heads: Arc<HeadBudget>) -> Activity {
        Activity {
            opened: Instant::now(),
            jitter_permille: rand::random_range(0..=JITTER_PERMILLE),
            in_flight: AtomicUsize::new(0),
            served: AtomicBool::new(false),
            idle_since: AtomicU64::new(0),
            reading_since: AtomicU64::new(NEVER),
            open_bodies: AtomicUsize::new(0),
            multiplexed: AtomicBool::new(false),
            blocked_since: AtomicU64::new(NEVER),
            unasked: parking_lot::Mutex::new(std::collections::HashMap::new()),
            next_body: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            evict: AtomicBool::new(false),
            stopping: Notify::new(),
            head_read: AtomicUsize::new(0),
            head_held: AtomicUsize::new(0),
            upgraded: AtomicBool::new(false),
            header_block_since: AtomicU64::new(NEVER),
            heads,
            _open: crate::metrics::OpenConnection::new(metrics.clone()),
            metrics,
        }
    }

    /// Whether this connection may give its place to a new one at the cap,
    /// and how soon: quiet ones first (nothing in flight: kept alive after
    /// an answer, or still sending a head), the one quiet longest first;
    /// then those whose client has taken nothing of an answer for
    /// [`STALLED_MS`] (a blocked write, or an HTTP/2 body the client opens
    /// no window for), the one stalled longest first. `None`: a request in
    /// flight that is going on, a WebSocket, or a server stopping. A request
    /// whose answer the client never reads (a 401 or a `/healthz` over a
    /// zero window, or pipelined behind a full socket) held its place until
    /// the slow-reader timeout, and such connections held every place
    /// (session 21's second attack pass).
    fn eviction_rank(&self) -> Option<(u8, Instant)> {
        if self.upgraded.load(Ordering::Acquire) || self.stop.load(Ordering::Acquire) {
            return None;
        }
        if self.in_flight.load(Ordering::Acquire) == 0 {
            let reading = self.reading_since.load(Ordering::Acquire);
            let ms = if !self.served.load(Ordering::Acquire) {
                0
            } else if reading != NEVER {
                reading
            } else {
                self.idle_since.load(Ordering::Acquire)
            };
            return Some((0, self.opened + Duration::from_millis(ms)));
        }
        let blocked = self.blocked_since.load(Ordering::Acquire);
        let unasked = self.unasked.lock().values().copied().min().unwrap_or(NEVER);
        let stalled = blocked.min(unasked);
        (stalled != NEVER && self.now_ms().saturating_sub(stalled) >= STALLED_MS)
            .then(|| (1, self.opened + Duration::from_millis(stalled)))
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(NEVER - 1)
    }

    fn at(&self, ms: u64, plus: Duration) -> Instant {
        self.opened + Duration::from_millis(ms) + plus
    }

    /// A header or idle timeout stretched by this connection's jitter.
    fn stretched(&self, timeout: Duration) -> Duration {
        let permille = u32::try_from(self.jitter_permille).unwrap_or(0);
        timeout.saturating_add(timeout.saturating_mul(permille) / 1000)
    }

    /// The earliest deadline now in force, and what closing there would be for.
    fn deadline(&self, limits: &Limits) -> Option<(Instant, Closed)> {
        let blocked = self.blocked_since.load(Ordering::Acquire);
        let blocked = (blocked != NEVER).then(|| self.at(blocked, limits.slow_reader_timeout));
        // HTTP/2: a response body not asked for more within four slow-reader
        // timeouts. Longer than for a blocked write: a client grants window
        // in steps (often half of it at a time), so a steady reader may leave
        // a stream unasked for a while (a 6 MiB window read at 60 KB/s: 50 s).
        let unasked = self.unasked.lock().values().copied().min();
        let unasked =
            unasked.map(|since| self.at(since, limits.slow_reader_timeout.saturating_mul(H2_UNASKED_TIMEOUTS)));
        let slow = blocked.into_iter().chain(unasked).min().map(|at| (at, Closed::SlowReader));
        // HTTP/2: a header block in progress has the header read timeout, whatever else is in flight.
        let block = self.header_block_since.load(Ordering::Acquire);
        let block = (block != NEVER).then(|| (self.at(block, limits.header_read_timeout), Closed::HeaderTimeout));
        let slow = match (slow, block) {
            (Some(s), Some(b)) => Some(if b.0 < s.0 { b } else { s }),
            (s, b) => s.or(b),
        };
        // A response still going out (in flight, or handed to hyper whole and
        // waiting for the client to take it) keeps the connection busy: only
        // the slow-reader deadline runs. (Else the header deadline of a request
        // pipelined behind it, or the idle one, cut the response short.)
        if self.in_flight.load(Ordering::Acquire) > 0 || slow.is_some() {
            return slow;
        }
        let reading = self.reading_since.load(Ordering::Acquire);
        let quiet = if !self.served.load(Ordering::Acquire) {
            (self.at(0, self.stretched(limits.header_read_timeout)), Closed::HeaderTimeout)
        } else if reading != NEVER {
            (self.at(reading, self.stretched(limits.header_read_timeout)), Closed::HeaderTimeout)
        } else {
            let idle_since = self.idle_since.load(Ordering::Acquire);
            (self.at(idle_since, self.stretched(limits.idle_timeout)), Closed::IdleTimeout)
        };
        Some(match slow {
            Some(slow) if slow.0 < quiet.0 => slow,
            _ => quiet,
        })
    }

    /// HTTP/2: a header block began (`true`) or ended.
    fn header_block(&self, open: bool) {
        let since = if open { self.now_ms() } else { NEVER };
        self.header_block_since.store(since, Ordering::Release);
    }

    /// The connection became a WebSocket: what its head held goes back, and
    /// its bytes are not counted as a head again (`ws` keeps its own bounds).
    fn upgraded(&self) {
        self.upgraded.store(true, Ordering::Release);
        self.head_read.store(0, Ordering::Release);
        self.heads.give_back(self.head_held.swap(0, Ordering::AcqRel));
    }

    /// A request whose head took `head_len` bytes starts: what the reading
    /// took goes back, and what of the head is past [`HEAD_FREE_BYTES`] stays
    /// counted until the request ends (the request holds its head).
    fn request_started(self: &Arc<Self>, head_len: usize) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.served.store(true, Ordering::Release);
        self.reading_since.store(NEVER, Ordering::Release);
        self.head_read.store(0, Ordering::Release);
        let kept = head_len.saturating_sub(HEAD_FREE_BYTES);
        self.heads.take_over(kept);
        self.heads.give_back(self.head_held.swap(0, Ordering::AcqRel));
        InFlight(self.clone(), kept)
    }

    /// Bytes arrived. Between requests, or on HTTP/1 once every request body
    /// has been read while a response still goes out (the client pipelines its
    /// next request), they start the next header and its deadline.
    ///
    /// `n` bytes of a head past [`HEAD_FREE_BYTES`] are taken from the
    /// server's head budget until the request starts; `Err` when it has no
    /// more room (the connection is then closed).
    fn read_some(&self, n: usize) -> io::Result<()> {
        if self.upgraded.load(Ordering::Acquire) {
            return Ok(());
        }
        if self.reading_since.load(Ordering::Acquire) == NEVER {
            let between = self.in_flight.load(Ordering::Acquire) == 0
                || (self.open_bodies.load(Ordering::Acquire) == 0 && !self.multiplexed.load(Ordering::Acquire));
            if !between {
                return Ok(());
            }
            self.reading_since.store(self.now_ms(), Ordering::Release);
        }
        let read = self.head_read.fetch_add(n, Ordering::AcqRel) + n;
        let want = read.saturating_sub(HEAD_FREE_BYTES);
        let held = self.head_held.load(Ordering::Acquire);
        if want > held {
            if !self.heads.take(want - held) {
                self.metrics.connection_closed(Closed::HeadBudget);
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "unfinished request heads hold the server's header budget (header_buffer_bytes)",
                ));
            }
            self.head_held.store(want, Ordering::Release);
        }
        Ok(())
    }

    /// A response ended with bytes of the next request already received (in
    /// the same read as the request before, perhaps): its header deadline runs
    /// from now.
    fn header_waiting(&self) {
        if self.reading_since.load(Ordering::Acquire) == NEVER {
            self.reading_since.store(self.now_ms(), Ordering::Release);
        }
    }

    fn write_blocked(&self, blocked: bool) {
        let was = self.blocked_since.load(Ordering::Acquire);
        if blocked && was == NEVER {
            self.blocked_since.store(self.now_ms(), Ordering::Release);
        } else if !blocked && was != NEVER {
            self.blocked_since.store(NEVER, Ordering::Release);
        }
    }
}

/// One request in flight; the connection is idle again when the last one drops.
/// A request in flight on its connection, and what of its head it holds of the head budget.
struct InFlight(Arc<Activity>, usize);

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.0;
        a.heads.give_back(self.1);
        a.idle_since.store(a.now_ms(), Ordering::Release);
        if a.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 && a.stop.load(Ordering::Acquire) {
            a.stopping.notify_one();
        }
    }
}

/// The router, counting its requests in flight until their response bodies end.
#[derive(Clone)]
struct Tracked {
    app: Router,
    activity: Arc<Activity>,
    /// The places of `--max-connections`, for the requests of an HTTP/2 connection beyond its first.
    places: Option<Places>,
}

/// The places of `--max-connections`. Each request in flight on an HTTP/2
/// connection beyond its first takes one of its own, so that a waiting
/// request costs a place however it arrives: 100 long-polls on one HTTP/2
/// connection cost ~1.2 MiB, and 1,000 such connections took the server to
/// 1.2 GiB with nothing counted (session 14's second attack pass), where the
/// same requests over HTTP/1 take 100 connections.
#[derive(Clone)]
pub(crate) struct Places {
    permits: Arc<Semaphore>,
    max: usize,
    /// What each principal's HTTP/2 requests hold of them.
    shares: Arc<SizedShares>,
}

/// Who an HTTP/2 request's place counts to, and the share of the places
/// one principal may hold (`--budget-share-per-principal`): a request that
/// names no principal (none, or credentials that name none) counts to
/// `user:anonymous`, all such requests together. Without it, any client
/// (401s of unauthenticated requests included) could take every place with
/// the requests of 42 HTTP/2 connections, open them again as they were cut,
/// and keep every other client out (session 15's second attack pass).
pub struct PlaceShares {
    auth: Arc<crate::auth::Auth>,
    percent: u8,
}

impl PlaceShares {
    pub fn new(auth: Arc<crate::auth::Auth>, percent: u8) -> PlaceShares {
        PlaceShares { auth, percent }
    }

    fn sized(self, max_connections: usize) -> SizedShares {
        SizedShares { auth: self.auth, shares: crate::http::Shares::new(max_connections, self.percent) }
    }
}

struct SizedShares {
    auth: Arc<crate::auth::Auth>,
    shares: crate::http::Shares,
}

/// A place of `--max-connections` an HTTP/2 request beyond its connection's
/// first holds, and its principal's count of them; both given back on drop.
struct Place {
    _permit: OwnedSemaphorePermit,
    shares: Arc<SizedShares>,
    who: PrincipalKey,
}

impl Drop for Place {
    fn drop(&mut self) {
        self.shares.shares.give_back(&self.who, 1);
    }
}

impl Places {
    /// A place for a request with `headers`, within its principal's share; `None` past the cap or the share.
    /// The principal is the one its credentials prove (a token's secret checked, as every route
    /// checks it): a token's id alone, which `attache token list` shows, would charge its
    /// principal's share without the secret (session 15's last pass).
    fn take(&self, headers: &http::HeaderMap) -> Option<Place> {
        let who = place_owner(&self.shares.auth, headers);
        let permit = self.permits.clone().try_acquire_owned().ok()?;
        if !self.shares.shares.take(&who, 1, 0) {
            return None;
        }
        Some(Place { _permit: permit, shares: self.shares.clone(), who })
    }
}

/// About what a request's head holds as hyper parsed it: its target and each header's name and value.
fn head_size<B>(req: &Request<B>) -> usize {
    let target = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
    req.headers().iter().fold(target, |n, (name, value)| n + name.as_str().len() + value.len() + 4)
}

type TrackedFuture = Pin<Box<dyn Future<Output = Result<Response<TrackedBody>, Infallible>> + Send>>;

impl hyper::service::Service<Request<Incoming>> for Tracked {
    type Response = Response<TrackedBody>;
    type Error = Infallible;
    type Future = TrackedFuture;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let in_flight = self.activity.request_started(head_size(&req));
        let mut place = None;
        if req.version() == http::Version::HTTP_2 {
            self.activity.multiplexed.store(true, Ordering::Release);
            // The connection's own place covers one request; each other in flight takes one.
            if let Some(places) = self.places.as_ref().filter(|_| self.activity.in_flight.load(Ordering::Acquire) > 1) {
                match places.take(req.headers()) {
                    Some(taken) => place = Some(taken),
                    None => {
                        self.activity.metrics.connection_closed(Closed::OverCap);
                        let res = over_cap(places.max);
                        let h2 = Some(self.activity.clone());
                        return Box::pin(
                            async move { Ok(res.map(|body| TrackedBody::new(body, in_flight, None, h2))) },
                        );
                    }
                }
            }
        }
        let activity = &self.activity;
        let h2 = (req.version() == http::Version::HTTP_2).then(|| activity.clone());
        let req = req.map(|body| RequestBody::new(body, activity));
        let answer = self.app.clone().oneshot(req);
        let upgrading = activity.clone();
        Box::pin(async move {
            let res = answer.await?;
            if res.status() == http::StatusCode::SWITCHING_PROTOCOLS {
                // A WebSocket from here on: its bytes are messages, never a request head.
                upgrading.upgraded();
            }
            Ok(res.map(|body| TrackedBody::new(body, in_flight, place, h2)))
        })
    }
}

/// A request body, counted among its connection's open bodies until it ends or is dropped.
struct RequestBody {
    body: Incoming,
    open: Option<Arc<Activity>>,
}

impl RequestBody {
    fn new(body: Incoming, activity: &Arc<Activity>) -> RequestBody {
        use http_body::Body as _;
        let open = (!body.is_end_stream()).then(|| {
            activity.open_bodies.fetch_add(1, Ordering::AcqRel);
            activity.clone()
        });
        RequestBody { body, open }
    }

    fn ended(&mut self) {
        if let Some(activity) = self.open.take() {
            activity.open_bodies.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        self.ended();
    }
}

impl http_body::Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) || self.body.is_end_stream() {
            self.ended();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Whom an HTTP/2 request's place counts to: the principal its credentials
/// prove, or `user:anonymous` (no credentials, or ones that prove none).
fn place_owner(auth: &crate::auth::Auth, headers: &http::HeaderMap) -> PrincipalKey {
    auth.authenticate(headers).unwrap_or_else(|_| PrincipalKey::anonymous())
}

/// How many `--slow-reader-timeout`s an HTTP/2 response body may wait to be
/// asked for its next frame before its connection is closed ([`Activity::deadline`]).
const H2_UNASKED_TIMEOUTS: u32 = 4;

/// The largest frame an HTTP/2 response body hands hyper at a time (the
/// protocol's default frame size). hyper asks a body for its next frame only
/// once the one before has gone out; in small frames, a client that reads
/// slowly but steadily asks often enough not to be taken for a stalled one,
/// however large the answer.
pub(crate) const HTTP2_BODY_FRAME: usize = 16 << 10;

/// A response body that keeps its request in flight until it ends or is dropped.
struct TrackedBody {
    body: Body,
    _in_flight: InFlight,
    /// The place of `--max-connections` an HTTP/2 request beyond its connection's first holds.
    _place: Option<Place>,
    /// HTTP/2: the connection whose `unasked` bodies this one joins, and its key there.
    h2: Option<(Arc<Activity>, u64)>,
    /// HTTP/2: the rest of a data frame larger than [`HTTP2_BODY_FRAME`].
    rest: Bytes,
}

impl TrackedBody {
    fn new(body: Body, in_flight: InFlight, place: Option<Place>, h2: Option<Arc<Activity>>) -> Self {
        use http_body::Body as _;
        // A body that is over before it starts is sent with its header; hyper never asks it.
        let h2 = h2.filter(|_| !body.is_end_stream()).map(|activity| {
            let key = activity.next_body.fetch_add(1, Ordering::Relaxed);
            activity.unasked.lock().insert(key, activity.now_ms());
            (activity, key)
        });
        TrackedBody { body, _in_flight: in_flight, _place: place, h2, rest: Bytes::new() }
    }

    /// hyper asked for a frame (`asked`), or this body gave one and waits to be asked again.
    fn unasked(&self, waiting: bool) {
        if let Some((activity, key)) = &self.h2 {
            let mut unasked = activity.unasked.lock();
            match waiting {
                true => unasked.insert(*key, activity.now_ms()),
                false => unasked.remove(key),
            };
        }
    }
}

impl Drop for TrackedBody {
    fn drop(&mut self) {
        self.unasked(false);
    }
}

impl http_body::Body for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        if self.h2.is_none() {
            return Pin::new(&mut self.body).poll_frame(cx);
        }
        self.unasked(false);
        let polled = if self.rest.is_empty() {
            match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        self.rest = data;
                        let n = self.rest.len().min(HTTP2_BODY_FRAME);
                        Poll::Ready(Some(Ok(http_body::Frame::data(self.rest.split_to(n)))))
                    }
                    Err(frame) => Poll::Ready(Some(Ok(frame))),
                },
                other => other,
            }
        } else {
            let n = self.rest.len().min(HTTP2_BODY_FRAME);
            Poll::Ready(Some(Ok(http_body::Frame::data(self.rest.split_to(n)))))
        };
        if matches!(polled, Poll::Ready(Some(Ok(_)))) {
            self.unasked(true);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        let inner = self.body.size_hint();
        let rest = self.rest.len() as u64;
        let mut hint = http_body::SizeHint::new();
        hint.set_lower(inner.lower().saturating_add(rest));
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper.saturating_add(rest));
        }
        hint
    }
}

/// An accepted socket that holds its connection permit and reports reads and blocked writes.
struct Watched {
    io: TcpStream,
    activity: Arc<Activity>,
    _permit: OwnedSemaphorePermit,
    /// Bytes already read off the socket and handed back (the lean HTTP/1
    /// path's, when it hands the connection to hyper): read again first.
    unread: Bytes,
    /// HTTP/2 with prior knowledge: the frame headers read, for header blocks in progress.
    frames: Option<H2Frames>,
}

/// Where the frames of an HTTP/2 connection begin and end, read from its
/// bytes as they arrive (the 9-byte frame headers only): a header block in
/// progress (a HEADERS frame without END_HEADERS, until the CONTINUATION
/// that ends it) has until the header read timeout from its start, though
/// other streams are in flight. hyper holds such a block until it ends and
/// gives no deadline: 2,000 connections, each with a long-poll in flight and
/// a block stalled in its CONTINUATION frames, stayed open past every
/// timeout and held 194 MB (session 16's third attack pass).
struct H2Frames {
    /// Bytes of the client preface still to pass.
    preface: usize,
    /// The connection's first bytes were not the HTTP/2 preface (an undecided
    /// connection that turned out to speak HTTP/1): nothing more is read.
    off: bool,
    header: [u8; 9],
    have: usize,
    /// Payload bytes of the current frame still to pass.
    payload: usize,
}

impl H2Frames {
    const HEADERS: u8 = 0x1;
    const CONTINUATION: u8 = 0x9;
    const END_HEADERS: u8 = 0x4;

    fn new() -> H2Frames {
        H2Frames { preface: H2_PREFACE.len(), off: false, header: [0; 9], have: 0, payload: 0 }
    }

    fn feed(&mut self, mut bytes: &[u8], activity: &Activity) {
        while !bytes.is_empty() && !self.off {
            if self.preface > 0 {
                let n = self.preface.min(bytes.len());
                let at = H2_PREFACE.len() - self.preface;
                self.off = bytes[..n] != H2_PREFACE[at..at + n];
                self.preface -= n;
                bytes = &bytes[n..];
            } else if self.payload > 0 {
                let n = self.payload.min(bytes.len());
                self.payload -= n;
                bytes = &bytes[n..];
            } else {
                let n = (9 - self.have).min(bytes.len());
                self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
                self.have += n;
                bytes = &bytes[n..];
                if self.have == 9 {
                    self.have = 0;
                    let h = self.header;
                    self.payload = (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
                    let (kind, flags) = (h[3], h[4]);
                    let ends = flags & Self::END_HEADERS != 0;
                    match kind {
                        Self::HEADERS if !ends => activity.header_block(true),
                        Self::HEADERS | Self::CONTINUATION if ends => activity.header_block(false),
                        _ => {}
                    }
                }
            }
        }
    }
}

impl Watched {
    /// This socket, with `unread` to be read before what the socket has.
    fn with_unread(mut self, unread: Bytes) -> Watched {
        self.unread = unread;
        self
    }

    /// Writes are blocked while the socket takes nothing; any progress unblocks them.
    fn wrote<T>(&self, polled: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        self.activity.write_blocked(polled.is_pending());
        polled
    }
}

impl AsyncRead for Watched {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if !self.unread.is_empty() {
            use bytes::Buf as _;
            let n = self.unread.len().min(buf.remaining());
            buf.put_slice(&self.unread[..n]);
            self.unread.advance(n);
            if self.unread.is_empty() {
                // An emptied `Bytes` still holds its whole allocation: a
                // WebSocket whose 60 KB upgrade head was handed to hyper kept
                // it for the socket's life (session 17's attack pass).
                self.unread = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        let this = &mut *self;
        if let Some(frames) = this.frames.as_mut() {
            frames.feed(&buf.filled()[before..], &this.activity);
        }
        if matches!(polled, Poll::Ready(Ok(()))) && read > 0 {
            if let Err(err) = self.activity.read_some(read) {
                return Poll::Ready(Err(err));
            }
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        self.wrote(polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.wrote(polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // A socket's flush is a no-op: it says nothing about whether the client reads.
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Raises this process's soft limit on open files to its hard limit, and
/// returns the limit then in force (`None` where it cannot be known).
#[cfg(unix)]
pub fn raise_fd_limit() -> Option<u64> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return None;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
    }
    // rlim_t is u64 on the targets we build for; the conversion is for the others.
    #[allow(clippy::useless_conversion)]
    Some(u64::try_from(lim.rlim_cur).unwrap_or(u64::MAX))
}

#[cfg(not(unix))]
pub fn raise_fd_limit() -> Option<u64> {
    None
}

/// File descriptors kept for everything but client connections, open
/// segment files and multipart uploads' staging files (the store's database
/// and log files, blobs being read, connections over the cap being answered).
pub const FDS_KEPT: u64 = 256;

/// The fewest segment files kept open when the open-file limit is too low for both asks.
pub const MIN_OPEN_FILES: usize = 16;

/// How the open-file limit is shared ([`fd_budget`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdShares {
    /// Client connections open at once (`--max-connections`).
    pub connections: usize,
    /// Segment files the embedded store keeps open (`--store-open-files`).
    pub open_files: usize,
    /// Multipart uploads in progress at once, each holding its staging file
    /// (`--max-concurrent-uploads`).
    pub uploads: usize,
}

/// How the open-file limit is shared between connections, segment files and
/// uploads in progress (each holds one staging file).
///
/// `FDS_KEPT` descriptors stay free; when all three asks fit in the rest they
/// are granted whole. Otherwise segment files get at most a quarter of the
/// rest (at least `MIN_OPEN_FILES`), uploads at most an eighth (at least
/// one) and connections what remains, so the process never holds more than
/// `fd_limit` descriptors: the caps are reached first.
pub fn fd_budget(max_connections: usize, open_files: usize, uploads: usize, fd_limit: Option<u64>) -> FdShares {
    let open_files = open_files.max(1);
    let uploads = uploads.clamp(1, Semaphore::MAX_PERMITS);
    let Some(limit) = fd_limit else {
        return FdShares { connections: max_connections.clamp(1, Semaphore::MAX_PERMITS), open_files, uploads };
    };
    let room = usize::try_from(limit.saturating_sub(FDS_KEPT)).unwrap_or(usize::MAX);
    if max_connections.saturating_add(open_files).saturating_add(uploads) <= room {
        return FdShares { connections: max_connections.clamp(1, Semaphore::MAX_PERMITS), open_files, uploads };
    }
    let files = open_files.min(room / 4).max(MIN_OPEN_FILES.min(open_files));
    let uploads = uploads.min(room / 8).max(1);
    let connections =
        max_connections.min(room.saturating_sub(files).saturating_sub(uploads)).clamp(1, Semaphore::MAX_PERMITS);
    FdShares { connections, open_files: files, uploads }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_place_counts_to_the_principal_a_token_proves_and_a_tokens_id_alone_to_anonymous() {
        let dir = tempfile::tempdir().unwrap();
        let tokens = attache_storage::tokens::TokenStore::new(dir.path());
        let (_, token) = tokens.create("user:alice", None).unwrap();
        let auth = crate::auth::Auth { mode: crate::auth::AuthMode::Token, tokens };
        let bearer = |t: &str| {
            let mut h = http::HeaderMap::new();
            h.insert(http::header::AUTHORIZATION, format!("Bearer {t}").parse().unwrap());
            h
        };
        assert_eq!(place_owner(&auth, &bearer(&token)).to_string(), "user:alice");
        // The id part of alice's token (what `attache token list` shows) with a wrong secret.
        let (id_part, _) = token.rsplit_once('_').unwrap();
        let forged = format!("{id_part}_{}", "0".repeat(64));
        assert_eq!(place_owner(&auth, &bearer(&forged)), PrincipalKey::anonymous());
        assert_eq!(place_owner(&auth, &http::HeaderMap::new()), PrincipalKey::anonymous());
    }

    #[test]
    fn connections_open_files_and_uploads_share_the_open_file_limit() {
        let shares = |connections, open_files, uploads| FdShares { connections, open_files, uploads };
        // Room for all: all granted.
        assert_eq!(fd_budget(4096, 4096, 1024, Some(20_000)), shares(4096, 4096, 1024));
        assert_eq!(fd_budget(4096, 4096, 1024, Some(1 << 20)), shares(4096, 4096, 1024));
        // Too little: files get a quarter of what is left after FDS_KEPT,
        // uploads an eighth, connections the rest.
        assert_eq!(fd_budget(4096, 4096, 1024, Some(1024)), shares(768 - 192 - 96, 192, 96));
        let got = fd_budget(4096, 4096, 1024, Some(1024));
        assert!((got.connections + got.open_files + got.uploads) as u64 + FDS_KEPT <= 1024);
        // An ask below its share is granted whole, and leaves the rest to connections.
        assert_eq!(fd_budget(4096, 4096, 10, Some(1024)), shares(768 - 192 - 10, 192, 10));
        // A tiny limit still leaves one connection, a few files and one upload.
        assert_eq!(fd_budget(4096, 4096, 1024, Some(10)), shares(1, MIN_OPEN_FILES, 1));
        assert_eq!(fd_budget(usize::MAX, 4096, 1024, None), shares(Semaphore::MAX_PERMITS, 4096, 1024));
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn accepted_sockets_send_at_once_and_bound_their_unsent_bytes() {
        use std::os::fd::AsRawFd as _;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        tune(&accepted);
        assert!(accepted.nodelay().unwrap());
        let mut lowat: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: a valid socket, an int-sized option and its size.
        let rc = unsafe {
            libc::getsockopt(
                accepted.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_NOTSENT_LOWAT,
                std::ptr::addr_of_mut!(lowat).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0);
        assert_eq!(usize::try_from(lowat).unwrap(), SOCKET_UNSENT_BYTES);
    }

    #[test]
    fn connections_opened_together_get_spread_header_deadlines_within_a_tenth() {
        let limits = Limits {
            max_connections: 10,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            slow_reader_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(30),
            header_buffer_bytes: 1 << 20,
        };
        let metrics = Arc::new(Metrics::default());
        let mut stretches = std::collections::BTreeSet::new();
        for _ in 0..200 {
            let a = Activity::new(metrics.clone(), Arc::new(HeadBudget::new(limits.header_buffer_bytes)));
            let (at, why) = a.deadline(&limits).expect("a quiet connection has a deadline");
            assert_eq!(why, Closed::HeaderTimeout);
            let stretch = at - a.opened;
            assert!(stretch >= limits.header_read_timeout, "{stretch:?}");
            assert!(stretch <= limits.header_read_timeout + limits.header_read_timeout / 10, "{stretch:?}");
            stretches.insert(stretch);
        }
        // 200 draws from 101 values: many distinct deadlines, not one instant for all.
        assert!(stretches.len() > 20, "{}", stretches.len());
    }
}

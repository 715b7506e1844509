//! The lean HTTP/1 connection: plain requests are read, routed and answered
//! here, straight on the socket; the first request that is not plain hands
//! the connection to hyper for the rest of its life.
//!
//! Why (issue 11; docs/ARCHITECTURE.md, "The lean HTTP/1 path"): nearly all
//! of the traffic is small requests on kept-alive connections (appends,
//! reads, long-polls, SSE subscriptions), and for those hyper's connection
//! held 16 KiB of buffers per open connection, idle or not (its CPU turned
//! out to be ~3% of an append). Here a connection holds a read buffer
//! only while bytes are arriving and a response head only while it goes out:
//! an idle connection, a waiting long-poll and an SSE subscriber hold none.
//!
//! Which requests are plain is [`wire::parse_head`]'s to say (HTTP/1.1, a
//! body of at most [`wire::LEAN_BODY_MAX`] bytes with a `Content-Length`, no
//! `Transfer-Encoding`, `Expect` or upgrade). Every request, lean or not, goes
//! through the same router, so the same handlers, front door and trust rules
//! answer it. Hyper answers all the rest (malformed and oversized heads,
//! chunked and large bodies, `100-continue`, WebSocket upgrades), given the
//! bytes already read ahead of the socket's (`Watched::unread`).
//!
//! The connection's deadlines stay with [`super::drive`]; this loop tells its
//! [`Activity`] what happens: bytes arriving, a request in flight from its
//! head until its response's last byte, writes blocked, and bytes of a next
//! request already received when a response ends (their header deadline runs
//! from then, even when they came in the same segment as the request before).
//! While a request is in flight the socket is still watched: a client that
//! closes its connection cancels its request at once (a long-poll or an SSE
//! subscriber that went away does not wait for its timeout), as with hyper.

use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::Router;
use bytes::{Buf as _, Bytes, BytesMut};
use futures::FutureExt as _;
use http_body::Body as _;
use http_body_util::BodyExt as _;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tower::ServiceExt as _;

use attache_storage::FileBody;

use super::wire::{self, Framing, Parsed};
use super::{
    Activity, Direct, DirectAnswer, HeadBudget, Serving, Tracked, Watched, CONNECTION_BUFFER_BYTES, HEAD_FREE_BYTES,
};
use crate::http::SendFile;

/// What a read asks the socket for at least: a request head and a small body fit.
const READ_CHUNK: usize = 8 << 10;

/// A lean HTTP/1 connection being served.
pub(super) struct Lean {
    served: Pin<Box<dyn Future<Output = io::Result<()>> + Send>>,
    shutdown: Arc<Shutdown>,
}

/// The server asked the connection to finish its request and close.
#[derive(Default)]
struct Shutdown {
    asked: AtomicBool,
    notify: Notify,
}

impl Shutdown {
    fn asked(&self) -> bool {
        self.asked.load(Ordering::Acquire)
    }
}

impl Future for Lean {
    type Output = io::Result<()>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.served.as_mut().poll(cx)
    }
}

impl Serving for Lean {
    type Error = io::Error;
    fn graceful_shutdown(self: Pin<&mut Self>) {
        self.shutdown.asked.store(true, Ordering::Release);
        self.shutdown.notify.notify_one();
    }
}

/// Serves `io`, whose first bytes are HTTP/1 (or nothing yet).
/// `body_wait`: how long the rest of a plain request's body may take to
/// arrive after its head before hyper reads it instead.
pub(super) fn serve(io: Watched, activity: Arc<Activity>, app: Router, direct: Direct, body_wait: Duration) -> Lean {
    let shutdown = Arc::new(Shutdown::default());
    Lean { served: Box::pin(run(io, activity, (app, direct), shutdown.clone(), body_wait)), shutdown }
}

async fn run(
    mut io: Watched,
    activity: Arc<Activity>,
    (app, direct): (Router, Direct),
    shutdown: Arc<Shutdown>,
    body_wait: Duration,
) -> io::Result<()> {
    let mut buf = BytesMut::new();
    loop {
        let head = loop {
            match wire::parse_head(&buf) {
                Parsed::Partial if buf.len() < CONNECTION_BUFFER_BYTES => {
                    if !fill(&io.io, &mut buf, &activity).await? {
                        return Ok(());
                    }
                }
                // Past the largest head, or not plain: hyper answers (431, 400, ...).
                Parsed::Partial | Parsed::HandOver => {
                    let prefix = wire::rewind_prefix(None, &buf);
                    return hand_over(io, prefix, activity, app, shutdown).await;
                }
                Parsed::Lean(head) => break head,
            }
        };
        // Copied out to its own small allocation: the request's header values
        // and path point into it, and a long-poll or an SSE response holds
        // them for as long as it lasts; sliced from the read buffer, they would
        // keep all of it alive with them.
        let head_bytes = Bytes::copy_from_slice(&buf[..head.len]);
        buf.advance(head.len);
        let Some(req) = head.request(&head_bytes, ()) else {
            let prefix = wire::rewind_prefix(Some(&head_bytes), &buf);
            return hand_over(io, prefix, activity, app, shutdown).await;
        };
        let in_flight = activity.request_started(head.len);
        // What the body held of the head budget while it arrived (below).
        let mut body_hold = None;
        if buf.len() < head.body_len {
            // A body still arriving is held here before any handler has seen who
            // sent it: what of it is past the connection's free head bytes comes
            // from the head budget, as an unfinished head's bytes do (3,000
            // connections each sending 64 KiB less one byte held 219 MB outside
            // every budget: session 20's attack pass). With no room, hyper reads
            // the body instead, as the handler asks for it.
            let charge = head.body_len.saturating_sub(HEAD_FREE_BYTES.saturating_sub(head.len));
            if !activity.heads.take(charge) {
                drop(in_flight);
                let prefix = wire::rewind_prefix(Some(&head_bytes), &buf);
                return hand_over(io, prefix, activity, app, shutdown).await;
            }
            body_hold = Some(BodyHold { heads: activity.heads.clone(), bytes: charge });
            // What arrives now is this request's body, not a next header.
            activity.open_bodies.fetch_add(1, Ordering::AcqRel);
            let arrived = tokio::time::timeout(body_wait, fill_to(&io.io, &mut buf, head.body_len, &activity)).await;
            activity.open_bodies.fetch_sub(1, Ordering::AcqRel);
            match arrived {
                Ok(whole) => {
                    if !whole? {
                        return Ok(());
                    }
                }
                // The request is in flight, so no connection deadline runs
                // while its body is awaited: a body this slow goes to hyper,
                // which hands it to the handler as it comes, under the
                // handler's own body read timeout (408), as a large body does.
                Err(_slow) => {
                    drop(in_flight);
                    // The body goes to hyper with what the budget held: hyper's
                    // connection may live long after (session 20's second attack
                    // pass: held, it took the budget for as long as it lived).
                    drop(body_hold.take());
                    let prefix = wire::rewind_prefix(Some(&head_bytes), &buf);
                    return hand_over(io, prefix, activity, app, shutdown).await;
                }
            }
        }
        // Copied too: stores may keep a body's bytes (a stream's tail cache).
        let body = match head.body_len {
            0 => Body::empty(),
            n => {
                let body = Bytes::copy_from_slice(&buf[..n]);
                buf.advance(n);
                Body::from(body)
            }
        };
        drop(head_bytes);
        if buf.is_empty() {
            // Nothing of a next request: the buffer goes until bytes arrive.
            buf = BytesMut::new();
        } else if body_hold.is_some() {
            // Bytes of a next request came behind a body that was waited for:
            // they move to a buffer of their own size (the body's, 64 KiB or
            // more, would stay with the connection, counted by nothing), and
            // count as that request's head, as bytes pipelined behind a
            // request do (session 20's second attack pass: one pipelined byte
            // kept 3,000 connections' bodies, 391 MB).
            buf = BytesMut::from(&buf[..]);
            activity.read_some(buf.len())?;
        }
        // The body is whole and handed on: what it held of the head budget goes back.
        drop(body_hold.take());
        let req = req.map(|()| body);
        let head_request = req.method() == http::Method::HEAD;
        // The body is whole: a direct route may take it past the router.
        // Boxed either way: the router's future is large, and held inline it
        // would size every connection's task for it, idle ones included.
        let answer: DirectAnswer = if direct.takes(req.uri().path()) {
            direct.answer(req)
        } else {
            Box::pin(app.clone().oneshot(req).map(|res| match res {
                Ok(res) => res,
                Err(never) => match never {},
            }))
        };
        // Biased: an answer ready at once goes out even when the client has
        // already half-closed (its end of stream is seen by `watch` too).
        let res = tokio::select! {
            biased;
            res = answer => res,
            closed = watch(&io.io, &mut buf, &activity) => return closed,
        };
        let close = !head.keep_alive || shutdown.asked() || asks_close(&res);
        if !respond(&io.io, &activity, &mut buf, res, head_request, close).await? || close || shutdown.asked() {
            drop(in_flight);
            // A FIN after the last byte, so the client reads the whole answer.
            let _ = io.io.shutdown().await;
            return Ok(());
        }
        drop(in_flight);
        if buf.is_empty() {
            buf = BytesMut::new();
        } else {
            activity.header_waiting();
        }
    }
}

/// Head-budget bytes a request body held while it arrived; given back once
/// the body is handed on (or the request ends on any other path).
struct BodyHold {
    heads: Arc<HeadBudget>,
    bytes: usize,
}

impl Drop for BodyHold {
    fn drop(&mut self) {
        self.heads.give_back(self.bytes);
    }
}

/// Whether the response itself says the connection closes after it.
fn asks_close<B>(res: &http::Response<B>) -> bool {
    res.headers().get_all(http::header::CONNECTION).iter().any(|v| wire::has_token(v.as_bytes(), "close"))
}

/// Reads what the socket has into `buf`; `false` at the end of the stream.
/// Takes a buffer only once bytes are there, so a quiet connection holds none.
async fn fill(io: &TcpStream, buf: &mut BytesMut, activity: &Activity) -> io::Result<bool> {
    loop {
        io.readable().await?;
        if buf.capacity() - buf.len() < READ_CHUNK / 4 {
            buf.reserve(READ_CHUNK);
        }
        match read_draining(io, buf) {
            Ok(0) => return Ok(false),
            Ok(n) => {
                activity.read_some(n)?;
                return Ok(true);
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
            Err(err) => return Err(err),
        }
    }
}

/// `try_read_buf`, that also tells tokio the socket is drained when the read
/// came up short of the room it had, as tokio's own `poll_read` does: the
/// next wait then goes straight to epoll, not through a `recv` that answers
/// EAGAIN. Without it every request cost that extra `recv` (two per request
/// where hyper and the Rust Durable Streams server make one, strace -c under
/// bench/ab.sh's load; issue 11). Readiness is cleared only as of the event
/// the read was made under, so bytes arriving meanwhile still wake the next
/// wait.
fn read_draining(io: &TcpStream, buf: &mut BytesMut) -> io::Result<usize> {
    let mut got = 0;
    let drained = || io::Error::from(io::ErrorKind::WouldBlock);
    let read = io.try_io(tokio::io::Interest::READABLE, || {
        let room = buf.capacity() - buf.len();
        got = io.try_read_buf(buf)?;
        if got > 0 && got < room {
            return Err(drained());
        }
        Ok(got)
    });
    match read {
        Err(err) if err.kind() == io::ErrorKind::WouldBlock && got > 0 => Ok(got),
        other => other,
    }
}

/// Reads until `buf` holds `len` bytes; `false` if the stream ends first.
async fn fill_to(io: &TcpStream, buf: &mut BytesMut, len: usize, activity: &Activity) -> io::Result<bool> {
    while buf.len() < len {
        if !fill(io, buf, activity).await? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Watches the socket while a request is in flight: resolves when the client
/// has gone (end of stream or an error), taking what it pipelines meanwhile
/// into `buf` until that holds a whole buffer's worth (then it waits its turn).
/// An end of stream behind pipelined bytes is a half-close, as hyper takes it:
/// the client waits for the answers to all it sent, so this one goes on.
async fn watch(io: &TcpStream, buf: &mut BytesMut, activity: &Activity) -> io::Result<()> {
    loop {
        if buf.len() >= CONNECTION_BUFFER_BYTES {
            return std::future::pending().await;
        }
        if !fill(io, buf, activity).await? {
            if !buf.is_empty() {
                return std::future::pending().await;
            }
            return Ok(());
        }
    }
}

/// Writes every byte of `parts`, noting when the socket takes nothing.
async fn write_all(io: &TcpStream, activity: &Activity, parts: &mut [IoSlice<'_>]) -> io::Result<()> {
    let mut parts = parts;
    IoSlice::advance_slices(&mut parts, 0);
    while !parts.is_empty() {
        match io.try_write_vectored(parts) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                activity.write_blocked(false);
                IoSlice::advance_slices(&mut parts, n);
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                activity.write_blocked(true);
                io.writable().await?;
            }
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

/// Sends `file`'s range with `sendfile(2)`: from the page cache into the
/// socket, with no copy in this process and no buffer of its own. Waits for
/// the socket as [`write_all`] does (so a client that reads nothing is cut
/// off by the slow-reader deadline, as for any response); where the kernel
/// cannot send from the file, the rest is copied in bounded chunks instead.
async fn send_file(io: &TcpStream, activity: &Activity, file: &FileBody) -> io::Result<()> {
    use std::os::fd::AsFd as _;
    let len = file.file_len();
    let mut sent = 0u64;
    while sent < len {
        match io.try_io(tokio::io::Interest::WRITABLE, || file.send_to(io.as_fd(), sent)) {
            Ok(0) => {
                // The file ended before the range did: what was promised cannot be sent.
                tracing::warn!(sent, len, "a segment file ended inside a read being sent; closing the connection");
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            Ok(n) => {
                activity.write_blocked(false);
                sent += n as u64;
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                activity.write_blocked(true);
                io.writable().await?;
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) if err.kind() == io::ErrorKind::Unsupported => {
                tracing::debug!(%err, "sendfile refused; copying the rest of the read");
                return copy_file_chunks(io, activity, file, sent).await;
            }
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

/// The rest of `file`'s range from `sent` on, read in bounded chunks and written.
async fn copy_file_chunks(io: &TcpStream, activity: &Activity, file: &FileBody, sent: u64) -> io::Result<()> {
    use futures::StreamExt as _;
    let mut chunks = file.file_chunks(sent);
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(io::Error::other)?;
        write_all(io, activity, &mut [IoSlice::new(&chunk)]).await?;
    }
    Ok(())
}

/// Writes the response; `false` when the connection cannot carry another
/// request after it (the client left, or the body failed or broke its length).
async fn respond(
    io: &TcpStream,
    activity: &Activity,
    buf: &mut BytesMut,
    mut res: http::Response<Body>,
    head_request: bool,
    close: bool,
) -> io::Result<bool> {
    let file = res.extensions_mut().remove::<SendFile>();
    let exact = res.body().size_hint().exact();
    let framing = wire::framing(&res, head_request, exact);
    let mut head = Vec::with_capacity(256 + 32 * res.headers().len());
    wire::write_head(&mut head, &res, framing, exact, &http_date(), close);
    let mut body = res.into_body();
    if let (Some(SendFile(file)), Framing::Length(n)) = (file, framing) {
        // Only while the body is still the file's (nothing replaced it on the way out).
        if exact == Some(n) && n == file.len() {
            drop(body);
            write_all(io, activity, &mut [IoSlice::new(&head), IoSlice::new(file.prefix())]).await?;
            send_file(io, activity, &file).await?;
            write_all(io, activity, &mut [IoSlice::new(file.suffix())]).await?;
            activity.metrics.file_sent(file.file_len());
            return Ok(true);
        }
    }
    let (chunked, length) = match framing {
        Framing::None => {
            write_all(io, activity, &mut [IoSlice::new(&head)]).await?;
            return Ok(true);
        }
        Framing::Chunked => (true, None),
        Framing::Length(n) => (false, Some(n)),
    };
    let mut unsent_head = Some(head);
    let mut sent = 0u64;
    loop {
        // While the head is unsent, a frame ready now goes out with it in one write.
        let next = match unsent_head.as_ref() {
            Some(head) => match body.frame().now_or_never() {
                Some(next) => next,
                None => {
                    write_all(io, activity, &mut [IoSlice::new(head)]).await?;
                    unsent_head = None;
                    continue;
                }
            },
            None => tokio::select! {
                next = body.frame() => next,
                closed = watch(io, buf, activity) => {
                    closed?;
                    return Ok(false);
                }
            },
        };
        let head = unsent_head.take().unwrap_or_default();
        let data = match next {
            None => {
                let last: &[u8] = if chunked { wire::LAST_CHUNK } else { b"" };
                write_all(io, activity, &mut [IoSlice::new(&head), IoSlice::new(last)]).await?;
                // A body shorter than its declared length cannot be told from a cut one.
                return Ok(length.is_none_or(|n| n == sent));
            }
            Some(Err(err)) => {
                tracing::debug!(%err, "response body failed; closing the connection");
                write_all(io, activity, &mut [IoSlice::new(&head)]).await?;
                return Ok(false);
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => data,
                Err(_trailers) => Bytes::new(),
            },
        };
        if let Some(n) = length {
            if sent + data.len() as u64 > n {
                tracing::debug!(declared = n, "response body longer than its length; closing the connection");
                let room = usize::try_from(n - sent).unwrap_or(usize::MAX);
                write_all(io, activity, &mut [IoSlice::new(&head), IoSlice::new(&data[..room])]).await?;
                return Ok(false);
            }
        }
        sent += data.len() as u64;
        if chunked && !data.is_empty() {
            let mut line = [0u8; 18];
            let line = wire::chunk_line(data.len(), &mut line);
            write_all(
                io,
                activity,
                &mut [IoSlice::new(&head), IoSlice::new(line), IoSlice::new(&data), IoSlice::new(b"\r\n")],
            )
            .await?;
        } else {
            write_all(io, activity, &mut [IoSlice::new(&head), IoSlice::new(&data)]).await?;
        }
    }
}

/// The `date` header's value, formatted once a second per thread.
fn http_date() -> [u8; 29] {
    use std::cell::Cell;
    use std::time::{SystemTime, UNIX_EPOCH};
    thread_local! {
        static DATE: Cell<(u64, [u8; 29])> = const { Cell::new((u64::MAX, [0; 29])) };
    }
    let now = SystemTime::now();
    let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    DATE.with(|cached| {
        let (at, date) = cached.get();
        if at == second {
            return date;
        }
        let mut date = [b' '; 29];
        let formatted = httpdate::fmt_http_date(now);
        let n = formatted.len().min(date.len());
        date[..n].copy_from_slice(&formatted.as_bytes()[..n]);
        cached.set((second, date));
        date
    })
}

/// Hyper serves the connection from here on, reading `prefix` first.
async fn hand_over(
    io: Watched,
    prefix: Bytes,
    activity: Arc<Activity>,
    app: Router,
    shutdown: Arc<Shutdown>,
) -> io::Result<()> {
    let service = Tracked { app, activity, places: None };
    let conn = super::http1_builder().serve_connection(TokioIo::new(io.with_unread(prefix)), service).with_upgrades();
    tokio::pin!(conn);
    let mut shutting = false;
    loop {
        if !shutting && shutdown.asked() {
            shutting = true;
            conn.as_mut().graceful_shutdown();
        }
        tokio::select! {
            served = conn.as_mut() => return served.map_err(io::Error::other),
            _ = shutdown.notify.notified() => {}
        }
    }
}

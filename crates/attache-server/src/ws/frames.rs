//! What a WebSocket client's message in progress holds, read from the frame
//! headers in the bytes it sends, before tungstenite assembles them.
//!
//! tungstenite reserves a frame's whole declared payload when it reads the
//! frame's header, and keeps a fragmented message's pieces until its last
//! fragment: a client that starts a message and never finishes it (answering
//! pings meanwhile, so the connection is not idle) held up to
//! `ws_max_message_bytes` for as long as it liked (300 such connections: 599 MB,
//! session 13). The socket's bytes pass through [`Watched`], which follows
//! the frame headers (RFC 6455 section 5.2) with [`FrameWatch`] and
//!
//! - charges the declared bytes of the data message in progress to the body
//!   budget (`--body-buffer-bytes`), as a request body being read is charged:
//!   past the budget (or the principal's share of it,
//!   `--budget-share-per-principal`) the read fails with [`BudgetFull`] and
//!   `/ws` closes with 1013 (try again later);
//! - notes when that message began ([`MessageClock`]): `/ws` closes a message
//!   not finished within `--body-read-timeout` with 1008.
//!
//! Control frames (ping, pong, close: at most 125 bytes each) may come
//! between fragments and are not counted. A stream tungstenite would refuse
//! (reserved opcodes, oversized frames) is refused by tungstenite; the
//! watch only needs to stay in step with the bytes, which the frame lengths
//! alone decide.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

use crate::http::BodyBudget;

/// The longest frame header: 2 bytes, an 8-byte extended length, a 4-byte mask.
const MAX_HEADER: usize = 14;

/// The longest control frame's payload (RFC 6455 5.5).
const MAX_CONTROL_PAYLOAD: u8 = 125;

/// A frame refused at its header, before tungstenite reserves its declared length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// A control frame (ping, pong, close) declared more than 125 bytes: the
    /// socket closes with 1002 (protocol error).
    #[error("a WebSocket control frame carries at most 125 bytes")]
    ControlFrameTooLong,
    /// A data frame would take its message past `ws_max_message_bytes`: the
    /// socket closes with 1009. tungstenite checks the message's size only
    /// once a frame is whole, so a first fragment of almost the limit and a
    /// second frame declaring as much held twice what was charged.
    #[error("a WebSocket message is at most ws_max_message_bytes")]
    MessageTooBig,
}

/// Follows frame boundaries in a client's byte stream.
#[derive(Debug)]
pub struct FrameWatch {
    header: [u8; MAX_HEADER],
    /// Header bytes read so far (0 between frames).
    have: usize,
    /// Payload bytes of the current frame still to come.
    left: u64,
    /// The current frame (header read) is a data frame, and is its message's last.
    data: bool,
    fin: bool,
    /// A data message has begun and not ended.
    open: bool,
    /// Declared payload bytes of that message so far, at most `cap`.
    held: usize,
    cap: usize,
}

impl FrameWatch {
    /// `cap`: the largest message (`ws_max_message_bytes`); nothing larger is
    /// ever held (tungstenite refuses it first), so nothing larger is charged.
    pub fn new(cap: usize) -> FrameWatch {
        FrameWatch { header: [0; MAX_HEADER], have: 0, left: 0, data: false, fin: false, open: false, held: 0, cap }
    }

    /// Declared bytes of the data message in progress (0 when none is).
    pub fn held(&self) -> usize {
        self.held
    }

    /// Has a data message begun and not ended?
    pub fn open(&self) -> bool {
        self.open
    }

    /// Follows `bytes`, the next bytes of the stream; returns how many data
    /// messages ended in them, or why a frame is refused at its header: a
    /// control frame that declares more than 125 bytes (RFC 6455 5.5;
    /// tungstenite reserves a frame's declared length before it checks that
    /// rule, so a ping declaring 1 MiB held 1 MiB uncharged until the idle
    /// timeout), or a data frame that would take its message past the cap.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Result<usize, Refused> {
        let mut ended = 0;
        while !bytes.is_empty() {
            if self.have == 0 && self.left > 0 {
                let n = self.left.min(bytes.len() as u64);
                self.left -= n;
                bytes = &bytes[n as usize..];
                if self.left == 0 {
                    ended += self.frame_done();
                }
                continue;
            }
            // A header, byte by byte (at most 14 of them per frame).
            self.header[self.have] = bytes[0];
            self.have += 1;
            bytes = &bytes[1..];
            if self.have == 1 && self.header[0] & 0x0f < 8 {
                // The first byte of a data frame: its message is in progress from here.
                self.open = true;
            }
            if self.have == 2 && self.header[0] & 0x0f >= 8 && self.header[1] & 0x7f > MAX_CONTROL_PAYLOAD {
                return Err(Refused::ControlFrameTooLong);
            }
            if let Some(len) = self.header_len().filter(|&need| need == self.have).map(|_| self.payload_len()) {
                self.have = 0;
                self.data = self.header[0] & 0x0f < 8;
                self.fin = self.header[0] & 0x80 != 0;
                if self.data {
                    let len = usize::try_from(len).unwrap_or(usize::MAX);
                    if self.held.saturating_add(len) > self.cap {
                        return Err(Refused::MessageTooBig);
                    }
                    self.held += len;
                }
                self.left = len;
                if len == 0 {
                    ended += self.frame_done();
                }
            }
        }
        Ok(ended)
    }

    /// The whole header's length, once its first two bytes are known.
    fn header_len(&self) -> Option<usize> {
        if self.have < 2 {
            return None;
        }
        let extended = match self.header[1] & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let mask = if self.header[1] & 0x80 != 0 { 4 } else { 0 };
        Some(2 + extended + mask)
    }

    fn payload_len(&self) -> u64 {
        match self.header[1] & 0x7f {
            126 => u64::from(u16::from_be_bytes([self.header[2], self.header[3]])),
            127 => {
                let mut be = [0u8; 8];
                be.copy_from_slice(&self.header[2..10]);
                u64::from_be_bytes(be)
            }
            n => u64::from(n),
        }
    }

    /// A frame's payload has all come: a data frame marked last ends its message.
    fn frame_done(&mut self) -> usize {
        if self.data && self.fin {
            self.open = false;
            self.held = 0;
            1
        } else {
            0
        }
    }
}

/// When the data message in progress began, for the connection's loop.
#[derive(Debug)]
pub struct MessageClock {
    origin: Instant,
    /// Milliseconds after `origin` plus one when a message began; 0: none in progress.
    began: AtomicU64,
    /// Woken when a message begins, so the loop sets its deadline at once.
    began_signal: Notify,
    /// The last write to the client found its socket full (it reads nothing).
    output_blocked: AtomicBool,
}

impl MessageClock {
    fn new() -> MessageClock {
        MessageClock {
            origin: Instant::now(),
            began: AtomicU64::new(0),
            began_signal: Notify::new(),
            output_blocked: AtomicBool::new(false),
        }
    }

    /// When the message in progress began (`None`: none is).
    pub fn began(&self) -> Option<Instant> {
        match self.began.load(Ordering::Acquire) {
            0 => None,
            ms => Some(self.origin + Duration::from_millis(ms - 1)),
        }
    }

    /// Did the last write to the client find its socket full? Then `/ws`
    /// reads nothing more until what waits is written: tungstenite answers
    /// each ping with a pong it queues, and reading on while they waited grew
    /// the queue without bound (a ping flood that read nothing: 900 MiB in
    /// 10 s, session 14).
    pub fn output_blocked(&self) -> bool {
        self.output_blocked.load(Ordering::Acquire)
    }

    /// Resolves when a message begins (or has begun since the last call).
    pub async fn message_began(&self) {
        self.began_signal.notified().await
    }

    fn mark(&self, began: Option<Instant>) {
        let ms = began.map_or(0, |at| at.duration_since(self.origin).as_millis() as u64 + 1);
        if self.began.swap(ms, Ordering::AcqRel) == 0 && ms != 0 {
            self.began_signal.notify_one();
        }
    }
}

/// The error a read returns when the message in progress would take the
/// body budget past its capacity: `/ws` closes with 1013.
#[derive(Debug, thiserror::Error)]
#[error(
    "a WebSocket message in progress would pass the server's buffer budget of {capacity} bytes, or its principal's \
     share of it (body_buffer_bytes, budget_share_per_principal)"
)]
pub struct BudgetFull {
    pub capacity: usize,
}

/// A client's connection with its incoming frames watched.
pub struct Watched<T> {
    io: T,
    watch: FrameWatch,
    /// Bytes taken from `budget` for the message in progress.
    charged: usize,
    budget: crate::AppState,
    /// Whose share of the budget the message takes.
    who: attache_core::PrincipalKey,
    clock: Arc<MessageClock>,
}

impl<T> Watched<T> {
    pub(crate) fn new(
        io: T,
        budget: crate::AppState,
        who: attache_core::PrincipalKey,
        max_message: usize,
    ) -> (Watched<T>, Arc<MessageClock>) {
        let clock = Arc::new(MessageClock::new());
        (Watched { io, watch: FrameWatch::new(max_message), charged: 0, budget, who, clock: clock.clone() }, clock)
    }

    fn bodies(&self) -> &BodyBudget {
        &self.budget.bodies
    }

    /// Follows newly read bytes: charges or gives back budget, moves the clock.
    fn follow(&mut self, bytes: &[u8]) -> io::Result<()> {
        let was_open = self.watch.open();
        let ended = self.watch.feed(bytes).map_err(io::Error::other)?;
        let held = self.watch.held();
        if held > self.charged {
            if !self.bodies().try_hold(&self.who, held - self.charged, self.charged) {
                let capacity = self.bodies().capacity();
                return Err(io::Error::other(BudgetFull { capacity }));
            }
        } else {
            self.bodies().give_back(&self.who, self.charged - held);
        }
        self.charged = held;
        if !self.watch.open() {
            self.clock.mark(None);
        } else if !was_open || ended > 0 {
            // A message began in these bytes (perhaps after others ended).
            self.clock.mark(None);
            self.clock.mark(Some(Instant::now()));
        }
        Ok(())
    }
}

impl<T> Drop for Watched<T> {
    fn drop(&mut self) {
        self.budget.bodies.give_back(&self.who, self.charged);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => Poll::Ready(this.follow(&buf.filled()[before..])),
            other => other,
        }
    }
}

impl<T> Watched<T> {
    /// Notes whether a write found the socket full.
    fn wrote<R>(&self, polled: Poll<R>) -> Poll<R> {
        self.clock.output_blocked.store(polled.is_pending(), Ordering::Release);
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
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
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::FrameWatch;

    fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![if fin { 0x80 } else { 0 } | opcode];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n <= 0xffff => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&[1, 2, 3, 4]);
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn a_fragmented_message_is_held_across_pongs_until_its_last_fragment() {
        let mut w = FrameWatch::new(1 << 20);
        assert_eq!(w.feed(&frame(false, 1, &[b'a'; 200])), Ok(0));
        assert!(w.open());
        assert_eq!(w.held(), 200);
        assert_eq!(w.feed(&frame(true, 0xA, b"pong")), Ok(0), "a control frame between fragments ends nothing");
        assert_eq!(w.held(), 200);
        assert_eq!(w.feed(&frame(false, 0, &[b'b'; 70_000])), Ok(0));
        assert_eq!(w.held(), 70_200);
        assert_eq!(w.feed(&frame(true, 0, b"end")), Ok(1));
        assert!(!w.open());
        assert_eq!(w.held(), 0);
    }

    #[test]
    fn a_declared_length_is_held_from_the_header_on_and_a_message_past_the_cap_is_refused_there() {
        let mut w = FrameWatch::new(10_000);
        let whole = frame(true, 2, &[7; 5000]);
        assert_eq!(w.feed(&whole[..10]), Ok(0));
        assert_eq!(w.held(), 5000, "charged as declared, before the payload comes");
        assert_eq!(w.feed(&whole[10..]), Ok(1));
        assert_eq!(w.held(), 0);
        // A first fragment of most of the cap, then a second frame declaring as much.
        assert_eq!(w.feed(&frame(false, 1, &[1; 9000])), Ok(0));
        let second = frame(true, 0, &[2; 9000]);
        assert_eq!(w.feed(&second[..8]), Err(super::Refused::MessageTooBig));
    }

    #[test]
    fn a_control_frame_declaring_more_than_125_bytes_is_refused_at_its_second_byte() {
        let mut w = FrameWatch::new(1 << 20);
        let ping = frame(true, 9, &[0; 126]);
        assert_eq!(w.feed(&ping[..1]), Ok(0));
        assert_eq!(w.feed(&ping[1..2]), Err(super::Refused::ControlFrameTooLong));
        let mut w = FrameWatch::new(1 << 20);
        assert_eq!(w.feed(&frame(true, 9, &[0; 125])), Ok(0), "125 bytes is a control frame's most");
    }

    #[test]
    fn bytes_split_anywhere_give_the_same_boundaries() {
        let mut stream = Vec::new();
        stream.extend(frame(true, 1, b"hello"));
        stream.extend(frame(false, 2, &[0; 300]));
        stream.extend(frame(true, 9, b""));
        stream.extend(frame(true, 0, &[0; 10]));
        stream.extend(frame(true, 1, b""));
        for cut in 0..stream.len() {
            let mut w = FrameWatch::new(1 << 20);
            let ended = w.feed(&stream[..cut]).unwrap() + w.feed(&stream[cut..]).unwrap();
            assert_eq!(ended, 3, "cut at {cut}");
            assert!(!w.open());
        }
    }
}

//! `soak`: a long mixed load against one attache server, with its memory sampled.
//!
//!   soak --url http://127.0.0.1:PORT --pid PID [--duration 30m] [--warmup 5m] [--report FILE] ...
//!
//! What runs at once, until `--duration` has passed (every loop checks the stop flag, every
//! request has a timeout, and whatever is still running is aborted a few seconds after it):
//!
//! - appends: one writer per JSON stream (1-5 messages per POST, idempotent producer
//!   headers, every message numbered so readers can check for gaps and duplicates), one per
//!   binary stream (64 B - 16 KiB), and a "firehose" binary stream (fixed size, faster);
//! - entity attachment uploads: multipart POSTs of 1 KiB - 4 MiB (log-uniform), each
//!   uploader keeps its last 8 and deletes older ones, and reads one back half the time;
//! - uploads cut off mid-body: half-closed (the answer is read), closed, or reset;
//! - JSON-RPC: task.create (a window of 20 live tasks per worker; the oldest is deleted),
//!   task.create_attachment (json, markdown, small binary), task.get_attachment, task.list;
//! - live readers: long-poll and SSE, alternating, on the plain streams, the upload
//!   entities' main streams and /_attache/events; they follow Stream-Next-Offset and
//!   Stream-Cursor (SSE: streamNextOffset/streamCursor, reconnecting when the server ends
//!   the response), on keep-alive connections;
//! - slow readers: raw SSE connections with a 4 KiB receive buffer that either read a few
//!   bytes a second or stop reading after the response head, each held for a while and
//!   then replaced;
//! - a sampler: the server's VmRSS/VmHWM/threads/open fds every `--sample` seconds.
//!
//! Every response's status is counted per kind of request; transport failures and other
//! outcomes are counted beside them. The report (markdown) ends with the verdict:
//! RSS flat (the largest sample at or after the warm-up vs the first sample at or after it,
//! within `--rss-limit-pct`) and zero 5xx, with the server still alive.
//!
//! Only talks to the address given (meant for loopback).

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::header::HeaderMap;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinSet;
use tokio::time::Instant;

type Sender = SendRequest<Full<Bytes>>;
type BoxErr = Box<dyn std::error::Error + Send + Sync>;

const PRINCIPAL: &str = "electric-principal";
const BOUNDARY: &str = "soak-boundary-7d1f0c";

// ------------------------------------------------------------------------------ arguments

#[derive(Clone, Debug)]
struct Args {
    url: String,
    pid: u32,
    duration: Duration,
    warmup: Duration,
    sample: Duration,
    readers: usize,
    slow_readers: usize,
    slow_hold: Duration,
    json_streams: usize,
    binary_streams: usize,
    append_interval: Duration,
    firehose_interval: Duration,
    firehose_bytes: usize,
    uploaders: usize,
    upload_interval: Duration,
    upload_min: u64,
    upload_max: u64,
    aborters: usize,
    abort_interval: Duration,
    rpc_workers: usize,
    rpc_interval: Duration,
    /// Share of JSON-RPC calls that create a task (and delete the oldest beyond the window).
    rpc_create_pct: u64,
    long_poll_wait: Duration,
    rss_limit_pct: f64,
    report: Option<String>,
    server_log: Option<String>,
    notes: Vec<String>,
}

fn usage() -> ! {
    eprintln!(
        "usage: fanout soak --url http://127.0.0.1:PORT --pid PID [--duration 30m] [--warmup 5m] [--sample 10s]\n  \
         [--readers 1000] [--slow-readers 100] [--slow-hold 120s] [--json-streams 8] [--binary-streams 4]\n  \
         [--append-interval 500ms] [--firehose-interval 250ms] [--firehose-bytes 8192]\n  \
         [--uploaders 2] [--upload-interval 300ms] [--upload-min 1024] [--upload-max 4194304]\n  \
         [--aborters 1] [--abort-interval 2s] [--rpc-workers 2] [--rpc-interval 50ms] [--rpc-create-pct 10] [--long-poll-wait 45s]\n  \
         [--rss-limit-pct 10] [--report FILE.md] [--server-log FILE] [--note TEXT]..."
    );
    std::process::exit(2)
}

/// `250ms`, `10s`, `5m`, `1h`, or plain seconds.
fn parse_duration(s: &str) -> Option<Duration> {
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: f64 = num.parse().ok()?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return None,
    };
    (secs >= 0.0 && secs.is_finite()).then(|| Duration::from_secs_f64(secs))
}

fn parse_args(raw: Vec<String>) -> Args {
    let mut a = Args {
        url: String::new(),
        pid: 0,
        duration: Duration::from_secs(30 * 60),
        warmup: Duration::from_secs(5 * 60),
        sample: Duration::from_secs(10),
        readers: 1000,
        slow_readers: 100,
        slow_hold: Duration::from_secs(120),
        json_streams: 8,
        binary_streams: 4,
        append_interval: Duration::from_millis(500),
        firehose_interval: Duration::from_millis(250),
        firehose_bytes: 8192,
        uploaders: 2,
        upload_interval: Duration::from_millis(300),
        upload_min: 1024,
        upload_max: 4 << 20,
        aborters: 1,
        abort_interval: Duration::from_secs(2),
        rpc_workers: 2,
        rpc_interval: Duration::from_millis(50),
        rpc_create_pct: 10,
        long_poll_wait: Duration::from_secs(45),
        rss_limit_pct: 10.0,
        report: None,
        server_log: None,
        notes: Vec::new(),
    };
    let mut it = raw.into_iter();
    while let Some(k) = it.next() {
        let mut v = || it.next().unwrap_or_else(|| usage());
        let dur = |s: String| parse_duration(&s).unwrap_or_else(|| usage());
        let num = |s: String| s.parse::<usize>().unwrap_or_else(|_| usage());
        match k.as_str() {
            "--url" => a.url = v(),
            "--pid" => a.pid = v().parse().unwrap_or_else(|_| usage()),
            "--duration" => a.duration = dur(v()),
            "--warmup" => a.warmup = dur(v()),
            "--sample" => a.sample = dur(v()),
            "--readers" => a.readers = num(v()),
            "--slow-readers" => a.slow_readers = num(v()),
            "--slow-hold" => a.slow_hold = dur(v()),
            "--json-streams" => a.json_streams = num(v()).max(1),
            "--binary-streams" => a.binary_streams = num(v()),
            "--append-interval" => a.append_interval = dur(v()),
            "--firehose-interval" => a.firehose_interval = dur(v()),
            "--firehose-bytes" => a.firehose_bytes = num(v()).max(1),
            "--uploaders" => a.uploaders = num(v()),
            "--upload-interval" => a.upload_interval = dur(v()),
            "--upload-min" => a.upload_min = num(v()).max(1) as u64,
            "--upload-max" => a.upload_max = num(v()).max(1) as u64,
            "--aborters" => a.aborters = num(v()),
            "--abort-interval" => a.abort_interval = dur(v()),
            "--rpc-workers" => a.rpc_workers = num(v()),
            "--rpc-interval" => a.rpc_interval = dur(v()),
            "--rpc-create-pct" => a.rpc_create_pct = num(v()).min(100) as u64,
            "--long-poll-wait" => a.long_poll_wait = dur(v()),
            "--rss-limit-pct" => a.rss_limit_pct = v().parse().unwrap_or_else(|_| usage()),
            "--report" => a.report = Some(v()),
            "--server-log" => a.server_log = Some(v()),
            "--note" => a.notes.push(v()),
            _ => usage(),
        }
    }
    if a.url.is_empty() || a.pid == 0 || a.sample.is_zero() {
        usage()
    }
    a.upload_max = a.upload_max.max(a.upload_min);
    a
}

// ------------------------------------------------------------------------------ randomness

/// xorshift64*: enough for sizes, choices and payload bytes.
struct Rng(u64);

impl Rng {
    fn new() -> Rng {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        let s = SEQ.fetch_add(1, Ordering::Relaxed);
        Rng((t ^ s.wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    /// Inclusive.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi.saturating_sub(lo) + 1)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn log_uniform(&mut self, lo: u64, hi: u64) -> u64 {
        let (lo, hi) = (lo.max(1) as f64, hi.max(lo) as f64);
        (lo * (hi / lo).powf(self.unit())).round() as u64
    }
    /// `d` scaled by a factor in [0.5, 1.5).
    fn jitter(&mut self, d: Duration) -> Duration {
        d.mul_f64(0.5 + self.unit())
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.fill(&mut v);
        v
    }
}

fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n =
            (u32::from(c[0]) << 16) | (u32::from(*c.get(1).unwrap_or(&0)) << 8) | u32::from(*c.get(2).unwrap_or(&0));
        out.push(T[(n >> 18) as usize & 63] as char);
        out.push(T[(n >> 12) as usize & 63] as char);
        out.push(if c.len() > 1 { T[(n >> 6) as usize & 63] as char } else { '=' });
        out.push(if c.len() > 2 { T[n as usize & 63] as char } else { '=' });
    }
    out
}

// ------------------------------------------------------------------------------ counters

#[derive(Default)]
struct KindStats {
    statuses: BTreeMap<u16, u64>,
    /// Outcomes without an HTTP status: transport errors, timeouts, client-side closes.
    other: BTreeMap<String, u64>,
    /// JSON-RPC errors inside 200 answers, by code.
    rpc_errors: BTreeMap<i64, u64>,
    lat_us: Vec<u32>,
}

#[derive(Default)]
struct Stats {
    kinds: Mutex<BTreeMap<&'static str, KindStats>>,
    responses: AtomicU64,
    server_errors: AtomicU64,
}

impl Stats {
    fn with<R>(&self, kind: &'static str, f: impl FnOnce(&mut KindStats) -> R) -> R {
        let mut g = self.kinds.lock().unwrap_or_else(|e| e.into_inner());
        f(g.entry(kind).or_default())
    }
    fn status(&self, kind: &'static str, status: u16, latency: Option<Duration>) {
        self.responses.fetch_add(1, Ordering::Relaxed);
        if status >= 500 {
            self.server_errors.fetch_add(1, Ordering::Relaxed);
        }
        self.with(kind, |k| {
            *k.statuses.entry(status).or_default() += 1;
            if let Some(l) = latency {
                k.lat_us.push(l.as_micros().min(u32::MAX as u128) as u32);
            }
        });
    }
    fn other(&self, kind: &'static str, what: impl Into<String>) {
        let what = what.into();
        self.with(kind, |k| *k.other.entry(what).or_default() += 1);
    }
    fn rpc_error(&self, kind: &'static str, code: i64) {
        self.with(kind, |k| *k.rpc_errors.entry(code).or_default() += 1);
    }
}

#[derive(Default)]
struct LiveStats {
    /// 200 answers with data (long-poll) and `data` events (SSE).
    deliveries: AtomicU64,
    /// JSON messages in them (plain JSON streams only).
    messages: AtomicU64,
    gaps: AtomicU64,
    missing: AtomicU64,
    duplicates: AtomicU64,
    unparsable: AtomicU64,
    /// Long-poll 204s (the wait ran out).
    timeouts: AtomicU64,
    /// SSE responses the server ended (the client went on from the last control event).
    sse_ended: AtomicU64,
    /// New connections after a failed one.
    reconnects: AtomicU64,
}

#[derive(Default)]
struct SlowStats {
    sessions: AtomicU64,
    bytes: AtomicU64,
    closed_by_server: AtomicU64,
    held_to_end: AtomicU64,
}

#[derive(Default)]
struct AbortStats {
    started: AtomicU64,
    bytes_sent: AtomicU64,
}

struct Ctx {
    args: Args,
    addr: String,
    stop: AtomicBool,
    stats: Stats,
    live: LiveStats,
    slow: SlowStats,
    aborts: AbortStats,
    open_conns: AtomicI64,
    peak_conns: AtomicI64,
    /// Entities and streams made during the run (memory that grows with them shows per item).
    tasks_created: AtomicU64,
    uploads_done: AtomicU64,
}

impl Ctx {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
    /// Sleeps `d`, or less when the run stops. Returns false when it has stopped.
    async fn pause(&self, d: Duration) -> bool {
        let end = Instant::now() + d;
        while Instant::now() < end {
            if self.stopped() {
                return false;
            }
            tokio::time::sleep((end - Instant::now()).min(Duration::from_millis(250))).await;
        }
        !self.stopped()
    }
}

/// Counts an open client connection while it lives.
struct ConnGuard(Arc<Ctx>);

impl ConnGuard {
    fn new(ctx: &Arc<Ctx>) -> ConnGuard {
        let n = ctx.open_conns.fetch_add(1, Ordering::Relaxed) + 1;
        ctx.peak_conns.fetch_max(n, Ordering::Relaxed);
        ConnGuard(ctx.clone())
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.open_conns.fetch_sub(1, Ordering::Relaxed);
    }
}

fn principal(n: usize) -> String {
    format!("user:soak-{n}")
}

fn describe_err(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        let t = inner.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = inner.source();
    }
    if s.len() > 90 {
        let mut cut = 90;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

// ------------------------------------------------------------------------------ HTTP

/// One keep-alive client connection, reopened when it fails.
struct Conn {
    ctx: Arc<Ctx>,
    sender: Option<Sender>,
}

impl Conn {
    fn new(ctx: &Arc<Ctx>) -> Conn {
        Conn { ctx: ctx.clone(), sender: None }
    }

    async fn open(&mut self) -> Result<&mut Sender, BoxErr> {
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
            self.sender = None;
            let stream = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(&self.ctx.addr))
                .await
                .map_err(|_| "connect timed out")??;
            stream.set_nodelay(true)?;
            let guard = ConnGuard::new(&self.ctx);
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(async move {
                let _guard = guard;
                let _ = conn.await;
            });
            self.sender = Some(sender);
        }
        self.sender.as_mut().ok_or_else(|| "no connection".into())
    }

    async fn send(&mut self, req: Request<Full<Bytes>>) -> Result<Response<Incoming>, BoxErr> {
        let s = self.open().await?;
        if let Err(e) = s.ready().await {
            self.sender = None;
            return Err(e.into());
        }
        match s.send_request(req).await {
            Ok(r) => Ok(r),
            Err(e) => {
                self.sender = None;
                Err(e.into())
            }
        }
    }

    /// Sends, reads the whole answer, counts its status under `kind`. None on a transport
    /// failure or timeout (counted too; the connection is dropped).
    async fn exchange(
        &mut self,
        kind: &'static str,
        req: Request<Full<Bytes>>,
        timeout: Duration,
        latency: bool,
    ) -> Option<(StatusCode, HeaderMap, Bytes)> {
        let t0 = Instant::now();
        let fut = async {
            let res = self.send(req).await?;
            let (parts, body) = res.into_parts();
            let bytes = body.collect().await?.to_bytes();
            Ok::<_, BoxErr>((parts.status, parts.headers, bytes))
        };
        let out = tokio::time::timeout(timeout, fut).await;
        match out {
            Ok(Ok((status, headers, body))) => {
                self.ctx.stats.status(kind, status.as_u16(), latency.then(|| t0.elapsed()));
                Some((status, headers, body))
            }
            Ok(Err(e)) => {
                self.sender = None;
                self.ctx.stats.other(kind, describe_err(e.as_ref()));
                None
            }
            Err(_) => {
                self.sender = None;
                self.ctx.stats.other(kind, format!("no answer within {}s", timeout.as_secs()));
                None
            }
        }
    }
}

fn request(ctx: &Ctx, method: Method, path: &str, who: &str) -> hyper::http::request::Builder {
    Request::builder().method(method).uri(path).header("host", &ctx.addr).header(PRINCIPAL, who)
}

fn header(h: &HeaderMap, name: &str) -> Option<String> {
    h.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
}

// ------------------------------------------------------------------------------ streams

struct StreamSpec {
    path: String,
    who: String,
    json: bool,
}

fn json_message(stream: usize, seq: u64, bytes: usize) -> String {
    let head = format!("{{\"w\":{stream},\"seq\":{seq},\"pad\":\"");
    let pad = bytes.saturating_sub(head.len() + 2);
    format!("{head}{}\"}}", "x".repeat(pad))
}

/// JSON appends with idempotent producer headers; a failed append is retried with the
/// same body and sequence number, so the stream's messages are numbered without gaps.
async fn json_writer(ctx: Arc<Ctx>, idx: usize, s: Arc<StreamSpec>) {
    let mut conn = Conn::new(&ctx);
    let mut rng = Rng::new();
    let (mut seq, mut producer_seq) = (0u64, 0u64);
    while !ctx.stopped() {
        let n = rng.range(1, 5);
        let items: Vec<String> = (0..n).map(|k| json_message(idx, seq + k, rng.range(100, 2048) as usize)).collect();
        let body = Bytes::from(format!("[{}]", items.join(",")));
        loop {
            let req = request(&ctx, Method::POST, &s.path, &s.who)
                .header("content-type", "application/json")
                .header("producer-id", format!("soak-json-{idx}"))
                .header("producer-epoch", "0")
                .header("producer-seq", producer_seq.to_string())
                .body(Full::new(body.clone()));
            let Ok(req) = req else { return };
            match conn.exchange("append json", req, Duration::from_secs(30), true).await {
                Some((st, _, _)) if st.is_success() => break,
                Some(_) => {
                    if !ctx.pause(Duration::from_secs(1)).await {
                        return;
                    }
                }
                None => {
                    if !ctx.pause(Duration::from_millis(200)).await {
                        return;
                    }
                }
            }
        }
        seq += n;
        producer_seq += 1;
        if !ctx.pause(rng.jitter(ctx.args.append_interval)).await {
            return;
        }
    }
}

/// Binary appends, no producer headers. `fixed`: every append that size (the firehose).
async fn binary_writer(ctx: Arc<Ctx>, s: Arc<StreamSpec>, fixed: Option<usize>, interval: Duration) {
    let mut conn = Conn::new(&ctx);
    let mut rng = Rng::new();
    while !ctx.stopped() {
        let size = fixed.unwrap_or_else(|| rng.log_uniform(64, 16 << 10) as usize);
        let req = request(&ctx, Method::POST, &s.path, &s.who)
            .header("content-type", "application/octet-stream")
            .body(Full::new(Bytes::from(rng.bytes(size))));
        let Ok(req) = req else { return };
        conn.exchange("append binary", req, Duration::from_secs(30), true).await;
        if !ctx.pause(rng.jitter(interval)).await {
            return;
        }
    }
}

// ------------------------------------------------------------------------------ live readers

struct LiveTarget {
    path: String,
    who: String,
    /// Check the `seq` numbers of the messages (the plain JSON streams).
    seq_check: bool,
    /// SSE data is base64 (binary streams): not parsed.
    binary: bool,
}

#[derive(Default)]
struct SeqCheck {
    last: Option<u64>,
}

impl SeqCheck {
    fn feed(&mut self, body: &[u8], live: &LiveStats) {
        let Ok(items) = serde_json::from_slice::<Vec<Value>>(body) else {
            live.unparsable.fetch_add(1, Ordering::Relaxed);
            return;
        };
        live.messages.fetch_add(items.len() as u64, Ordering::Relaxed);
        for it in items {
            let Some(seq) = it.get("seq").and_then(Value::as_u64) else {
                live.unparsable.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            match self.last {
                Some(last) if seq <= last => {
                    live.duplicates.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                Some(last) if seq > last + 1 => {
                    live.gaps.fetch_add(1, Ordering::Relaxed);
                    live.missing.fetch_add(seq - last - 1, Ordering::Relaxed);
                }
                _ => {}
            }
            self.last = Some(seq);
        }
    }
}

fn live_query(path: &str, offset: &str, mode: &str, cursor: &Option<String>) -> String {
    let sep = if path.contains('?') { '&' } else { '?' };
    let mut q = format!("{path}{sep}offset={offset}&live={mode}");
    if let Some(c) = cursor {
        q.push_str("&cursor=");
        q.push_str(c);
    }
    q
}

async fn long_poll_reader(ctx: Arc<Ctx>, t: Arc<LiveTarget>) {
    let mut conn = Conn::new(&ctx);
    let mut offset = "now".to_string();
    let mut cursor: Option<String> = None;
    let mut check = SeqCheck::default();
    let mut backoff = Duration::from_millis(100);
    while !ctx.stopped() {
        let q = live_query(&t.path, &offset, "long-poll", &cursor);
        let Ok(req) = request(&ctx, Method::GET, &q, &t.who).body(Full::new(Bytes::new())) else { return };
        match conn.exchange("live long-poll", req, ctx.args.long_poll_wait, false).await {
            Some((st, h, body)) if st == StatusCode::OK || st == StatusCode::NO_CONTENT => {
                backoff = Duration::from_millis(100);
                if st == StatusCode::OK {
                    ctx.live.deliveries.fetch_add(1, Ordering::Relaxed);
                    if t.seq_check {
                        check.feed(&body, &ctx.live);
                    }
                } else {
                    ctx.live.timeouts.fetch_add(1, Ordering::Relaxed);
                }
                match header(&h, "stream-next-offset") {
                    Some(next) => offset = next,
                    None => {
                        ctx.stats.other("live long-poll", "answer without Stream-Next-Offset");
                        if !ctx.pause(Duration::from_secs(1)).await {
                            return;
                        }
                    }
                }
                cursor = header(&h, "stream-cursor");
            }
            Some(_) => {
                if !ctx.pause(backoff).await {
                    return;
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            None => {
                ctx.live.reconnects.fetch_add(1, Ordering::Relaxed);
                if !ctx.pause(backoff).await {
                    return;
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Splits an SSE byte stream into (event, data) pairs.
#[derive(Default)]
struct SseParser {
    buf: Vec<u8>,
}

impl SseParser {
    fn push(&mut self, chunk: &[u8], out: &mut Vec<(String, String)>) -> Result<(), &'static str> {
        self.buf.extend_from_slice(chunk);
        while let Some(pos) = self.buf.windows(2).position(|w| w == b"\n\n") {
            let block: Vec<u8> = self.buf.drain(..pos + 2).collect();
            let text = String::from_utf8_lossy(&block);
            let (mut event, mut data) = (String::new(), Vec::new());
            for line in text.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    event = v.trim().to_owned();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push(v.strip_prefix(' ').unwrap_or(v));
                }
            }
            if !event.is_empty() || !data.is_empty() {
                out.push((event, data.join("\n")));
            }
        }
        if self.buf.len() > 16 << 20 {
            return Err("SSE event over 16 MiB");
        }
        Ok(())
    }
}

async fn sse_reader(ctx: Arc<Ctx>, t: Arc<LiveTarget>) {
    const KIND: &str = "live sse";
    let mut conn = Conn::new(&ctx);
    let mut offset = "now".to_string();
    let mut cursor: Option<String> = None;
    let mut check = SeqCheck::default();
    let mut backoff = Duration::from_millis(100);
    while !ctx.stopped() {
        let q = live_query(&t.path, &offset, "sse", &cursor);
        let Ok(req) = request(&ctx, Method::GET, &q, &t.who).body(Full::new(Bytes::new())) else { return };
        let res = match tokio::time::timeout(Duration::from_secs(30), conn.send(req)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                ctx.stats.other(KIND, describe_err(e.as_ref()));
                ctx.live.reconnects.fetch_add(1, Ordering::Relaxed);
                if !ctx.pause(backoff).await {
                    return;
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
            Err(_) => {
                conn.sender = None;
                ctx.stats.other(KIND, "no response head within 30s");
                ctx.live.reconnects.fetch_add(1, Ordering::Relaxed);
                continue;
            }
        };
        let status = res.status();
        ctx.stats.status(KIND, status.as_u16(), None);
        let mut body = res.into_body();
        if status != StatusCode::OK {
            let _ = tokio::time::timeout(Duration::from_secs(10), body.collect()).await;
            if !ctx.pause(backoff).await {
                return;
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
            continue;
        }
        backoff = Duration::from_millis(100);
        let mut parser = SseParser::default();
        let mut events = Vec::new();
        loop {
            if ctx.stopped() {
                return;
            }
            match tokio::time::timeout(Duration::from_secs(150), body.frame()).await {
                Ok(Some(Ok(frame))) => {
                    let Some(data) = frame.data_ref() else { continue };
                    if let Err(e) = parser.push(data, &mut events) {
                        ctx.stats.other(KIND, e);
                        conn.sender = None;
                        break;
                    }
                    for (event, data) in events.drain(..) {
                        match event.as_str() {
                            "data" => {
                                ctx.live.deliveries.fetch_add(1, Ordering::Relaxed);
                                if t.seq_check && !t.binary {
                                    check.feed(data.as_bytes(), &ctx.live);
                                }
                            }
                            "control" => match serde_json::from_str::<Value>(&data) {
                                Ok(c) => {
                                    if let Some(o) = c.get("streamNextOffset").and_then(Value::as_str) {
                                        offset = o.to_owned();
                                    }
                                    cursor = c.get("streamCursor").and_then(Value::as_str).map(str::to_owned);
                                }
                                Err(_) => ctx.stats.other(KIND, "unparsable control event"),
                            },
                            other => ctx.stats.other(KIND, format!("unexpected event {other:?}")),
                        }
                    }
                }
                Ok(Some(Err(e))) => {
                    ctx.stats.other(KIND, format!("body: {}", describe_err(&e)));
                    conn.sender = None;
                    ctx.live.reconnects.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Ok(None) => {
                    ctx.live.sse_ended.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Err(_) => {
                    ctx.stats.other(KIND, "no event for 150s");
                    conn.sender = None;
                    break;
                }
            }
        }
    }
}

// ------------------------------------------------------------------------------ slow readers

/// Connects with a small receive buffer, sends one SSE request and reads the response
/// head. Returns the socket and the status.
async fn raw_sse(ctx: &Arc<Ctx>, path: &str, who: &str) -> Result<(TcpStream, u16, ConnGuard), BoxErr> {
    let addr: std::net::SocketAddr = ctx.addr.parse()?;
    let sock = TcpSocket::new_v4()?;
    sock.set_recv_buffer_size(4096)?;
    let mut s =
        tokio::time::timeout(Duration::from_secs(10), sock.connect(addr)).await.map_err(|_| "connect timed out")??;
    let guard = ConnGuard::new(ctx);
    let head =
        format!("GET {path} HTTP/1.1\r\nhost: {}\r\n{PRINCIPAL}: {who}\r\naccept: text/event-stream\r\n\r\n", ctx.addr);
    s.write_all(head.as_bytes()).await?;
    let mut buf = Vec::with_capacity(1024);
    let status = tokio::time::timeout(Duration::from_secs(30), async {
        let mut chunk = [0u8; 256];
        loop {
            // Small reads, so little of the body is taken with the head.
            let n = s.read(&mut chunk).await?;
            if n == 0 {
                return Err::<u16, BoxErr>("closed before the response head".into());
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]);
                let code =
                    head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or("malformed status line")?;
                return Ok(code);
            }
            if buf.len() > 16 << 10 {
                return Err("response head over 16 KiB".into());
            }
        }
    })
    .await
    .map_err(|_| "no response head within 30s")??;
    Ok((s, status, guard))
}

/// Reads what is buffered without waiting (at most 1 MiB): true when that ends in the end of
/// the stream or a reset, i.e. the server closed the connection.
fn server_closed(s: &TcpStream) -> bool {
    let mut buf = [0u8; 16 << 10];
    let mut total = 0usize;
    while total < 1 << 20 {
        match s.try_read(&mut buf) {
            Ok(0) => return true,
            Ok(n) => total += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
    false
}

/// Even `i`: reads 4-64 bytes a second. Odd: stops reading after the head. Each
/// connection is held for about `--slow-hold`, then dropped and replaced.
async fn slow_reader(ctx: Arc<Ctx>, i: usize, path: String, who: String) {
    const KIND: &str = "slow sse";
    let mut rng = Rng::new();
    let trickle = i.is_multiple_of(2);
    let offset = if trickle || (i / 2).is_multiple_of(2) { "-1" } else { "now" };
    let q = format!("{path}?offset={offset}&live=sse");
    while !ctx.stopped() {
        let hold = rng.jitter(ctx.args.slow_hold);
        let (mut s, status, guard) = match raw_sse(&ctx, &q, &who).await {
            Ok(v) => v,
            Err(e) => {
                ctx.stats.other(KIND, describe_err(e.as_ref()));
                if !ctx.pause(Duration::from_secs(1)).await {
                    return;
                }
                continue;
            }
        };
        ctx.stats.status(KIND, status, None);
        ctx.slow.sessions.fetch_add(1, Ordering::Relaxed);
        let end = Instant::now() + hold;
        let mut closed = false;
        while Instant::now() < end && !ctx.stopped() {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if !trickle {
                continue;
            }
            let mut buf = vec![0u8; rng.range(4, 64) as usize];
            match tokio::time::timeout(Duration::from_millis(500), s.read(&mut buf)).await {
                Ok(Ok(0)) => closed = true,
                Ok(Ok(n)) => {
                    ctx.slow.bytes.fetch_add(n as u64, Ordering::Relaxed);
                }
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => closed = true,
                Ok(Err(e)) => {
                    ctx.stats.other(KIND, describe_err(&e));
                    closed = true;
                }
                Err(_) => {} // nothing to read this second
            }
            if closed {
                break;
            }
        }
        // A stalled reader learns only now whether the server gave up on it: what is
        // buffered, then the end of the stream (or a reset) if it did.
        if !closed {
            closed = server_closed(&s);
        }
        if closed {
            ctx.slow.closed_by_server.fetch_add(1, Ordering::Relaxed);
        } else {
            ctx.slow.held_to_end.fetch_add(1, Ordering::Relaxed);
        }
        drop(s);
        drop(guard);
        if !ctx.pause(Duration::from_secs(1)).await {
            return;
        }
    }
}

// ------------------------------------------------------------------------------ uploads

fn multipart(id: &str, data: &[u8]) -> Vec<u8> {
    let mut body = multipart_head(id);
    body.extend_from_slice(data);
    body.extend_from_slice(multipart_tail().as_bytes());
    body
}

fn multipart_head(id: &str) -> Vec<u8> {
    format!(
        "--{BOUNDARY}\r\ncontent-disposition: form-data; name=\"id\"\r\n\r\n{id}\r\n\
         --{BOUNDARY}\r\ncontent-disposition: form-data; name=\"subject\"\r\n\r\n\
         {{\"type\":\"context\",\"key\":\"{id}\"}}\r\n\
         --{BOUNDARY}\r\ncontent-disposition: form-data; name=\"file\"; filename=\"{id}.bin\"\r\n\
         content-type: application/octet-stream\r\n\r\n"
    )
    .into_bytes()
}

fn multipart_tail() -> String {
    format!("\r\n--{BOUNDARY}--\r\n")
}

async fn uploader(ctx: Arc<Ctx>, j: usize, entity: String, who: String) {
    let mut conn = Conn::new(&ctx);
    let mut rng = Rng::new();
    let mut kept: VecDeque<(String, u64)> = VecDeque::new();
    let mut n = 0u64;
    while !ctx.stopped() {
        let size = rng.log_uniform(ctx.args.upload_min, ctx.args.upload_max);
        let id = format!("u{j}-{n}");
        n += 1;
        let body = multipart(&id, &rng.bytes(size as usize));
        let req = request(&ctx, Method::POST, &format!("{entity}/attachments"), &who)
            .header("content-type", format!("multipart/form-data; boundary={BOUNDARY}"))
            .body(Full::new(Bytes::from(body)));
        let Ok(req) = req else { return };
        if let Some((st, _, _)) = conn.exchange("upload", req, Duration::from_secs(120), true).await {
            if st == StatusCode::CREATED {
                kept.push_back((id, size));
                ctx.uploads_done.fetch_add(1, Ordering::Relaxed);
            }
        }
        while kept.len() > 8 {
            let Some((old, _)) = kept.pop_front() else { break };
            let Ok(req) = request(&ctx, Method::DELETE, &format!("{entity}/attachments/{old}"), &who)
                .body(Full::new(Bytes::new()))
            else {
                return;
            };
            conn.exchange("attachment delete", req, Duration::from_secs(30), true).await;
        }
        if rng.below(2) == 0 && !kept.is_empty() {
            let (id, size) = kept[rng.below(kept.len() as u64) as usize].clone();
            let ranged = rng.below(2) == 0;
            let mut b = request(&ctx, Method::GET, &format!("{entity}/attachments/{id}"), &who);
            if ranged {
                b = b.header("range", "bytes=0-1023");
            }
            let Ok(req) = b.body(Full::new(Bytes::new())) else { return };
            if let Some((st, _, body)) = conn.exchange("attachment get", req, Duration::from_secs(60), true).await {
                let want = if ranged { size.min(1024) } else { size };
                if st.is_success() && body.len() as u64 != want {
                    ctx.stats.other("attachment get", "body length differs from the upload");
                }
            }
        }
        if !ctx.pause(rng.jitter(ctx.args.upload_interval)).await {
            return;
        }
    }
}

/// Uploads cut off mid-body, in turn: half-closed (then the answer is read), closed, reset.
async fn aborter(ctx: Arc<Ctx>, j: usize, entity: String, who: String) {
    let mut rng = Rng::new();
    let mut n = 0u64;
    while !ctx.stopped() {
        let variant = n % 3;
        let kind: &'static str = match variant {
            0 => "upload cut: half-close",
            1 => "upload cut: close",
            _ => "upload cut: reset",
        };
        let id = format!("a{j}-{n}");
        n += 1;
        let declared = rng.log_uniform(64 << 10, ctx.args.upload_max.max(64 << 10));
        let head = multipart_head(&id);
        let tail = multipart_tail();
        let total = head.len() as u64 + declared + tail.len() as u64;
        let send = declared * rng.range(10, 90) / 100;
        let r = async {
            let s = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(&ctx.addr))
                .await
                .map_err(|_| "connect timed out")??;
            let guard = ConnGuard::new(&ctx);
            let mut s = s;
            let req_head = format!(
                "POST {entity}/attachments HTTP/1.1\r\nhost: {}\r\n{PRINCIPAL}: {who}\r\n\
                 content-type: multipart/form-data; boundary={BOUNDARY}\r\ncontent-length: {total}\r\n\r\n",
                ctx.addr
            );
            s.write_all(req_head.as_bytes()).await?;
            s.write_all(&head).await?;
            let mut left = send;
            let mut chunk = vec![0u8; 64 << 10];
            while left > 0 {
                let k = left.min(chunk.len() as u64) as usize;
                rng.fill(&mut chunk[..k]);
                s.write_all(&chunk[..k]).await?;
                left -= k as u64;
            }
            ctx.aborts.bytes_sent.fetch_add(send, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(rng.range(50, 1000))).await;
            Ok::<_, BoxErr>((s, guard))
        };
        ctx.aborts.started.fetch_add(1, Ordering::Relaxed);
        match tokio::time::timeout(Duration::from_secs(60), r).await {
            Ok(Ok((mut s, guard))) => {
                match variant {
                    0 => {
                        let answer = async {
                            s.shutdown().await?;
                            let mut buf = Vec::new();
                            let mut chunk = [0u8; 1024];
                            loop {
                                let k = s.read(&mut chunk).await?;
                                if k == 0 {
                                    break;
                                }
                                buf.extend_from_slice(&chunk[..k]);
                                if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.len() > 16 << 10 {
                                    break;
                                }
                            }
                            Ok::<_, BoxErr>(buf)
                        };
                        match tokio::time::timeout(Duration::from_secs(15), answer).await {
                            Ok(Ok(buf)) if !buf.is_empty() => {
                                let head = String::from_utf8_lossy(&buf);
                                match head.split_whitespace().nth(1).and_then(|c| c.parse::<u16>().ok()) {
                                    Some(code) => ctx.stats.status(kind, code, None),
                                    None => ctx.stats.other(kind, "malformed answer"),
                                }
                            }
                            Ok(Ok(_)) => ctx.stats.other(kind, "closed without an answer"),
                            Ok(Err(e)) => ctx.stats.other(kind, describe_err(e.as_ref())),
                            Err(_) => ctx.stats.other(kind, "no answer within 15s"),
                        }
                    }
                    1 => ctx.stats.other(kind, "closed by the client (by design)"),
                    _ => {
                        let _ = s.set_zero_linger();
                        ctx.stats.other(kind, "reset by the client (by design)");
                    }
                }
                drop(s);
                drop(guard);
            }
            Ok(Err(e)) => ctx.stats.other(kind, format!("while sending: {}", describe_err(e.as_ref()))),
            Err(_) => ctx.stats.other(kind, "sending took over 60s"),
        }
        if !ctx.pause(rng.jitter(ctx.args.abort_interval)).await {
            return;
        }
    }
}

// ------------------------------------------------------------------------------ JSON-RPC

struct RpcTask {
    id: String,
    keys: Vec<String>,
}

async fn rpc_call(
    ctx: &Arc<Ctx>,
    conn: &mut Conn,
    who: &str,
    kind: &'static str,
    method: &str,
    params: Value,
    id: u64,
) -> Option<Value> {
    let body = json!({"jsonrpc": "2.0", "method": method, "params": params, "id": id}).to_string();
    let req = request(ctx, Method::POST, "/rpc", who)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .ok()?;
    let (st, _, body) = conn.exchange(kind, req, Duration::from_secs(30), true).await?;
    if st != StatusCode::OK {
        return None;
    }
    let v: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(_) => {
            ctx.stats.other(kind, "unparsable JSON-RPC answer");
            return None;
        }
    };
    if let Some(e) = v.get("error") {
        ctx.stats.rpc_error(kind, e.get("code").and_then(Value::as_i64).unwrap_or(0));
        return None;
    }
    v.get("result").cloned()
}

async fn rpc_worker(ctx: Arc<Ctx>, who: String) {
    let mut conn = Conn::new(&ctx);
    let mut rng = Rng::new();
    let mut tasks: VecDeque<RpcTask> = VecDeque::new();
    let mut id = 0u64;
    while !ctx.stopped() {
        id += 1;
        // Past the create share, the rest splits 35:35:20 between create_attachment,
        // get_attachment and list.
        let c = ctx.args.rpc_create_pct;
        let r = rng.below(100);
        let rest = |share: u64| c + (100 - c) * share / 90;
        if tasks.is_empty() || r < c || (c == 0 && tasks.len() < 20) {
            let params =
                json!({"text": format!("soak task {id}"), "priority": rng.range(0, 100), "metadata": {"soak": true}});
            if let Some(res) = rpc_call(&ctx, &mut conn, &who, "rpc task.create", "task.create", params, id).await {
                if let Some(tid) = res.get("id").and_then(Value::as_str) {
                    tasks.push_back(RpcTask { id: tid.to_owned(), keys: Vec::new() });
                    ctx.tasks_created.fetch_add(1, Ordering::Relaxed);
                }
            }
            while tasks.len() > 20 {
                let Some(old) = tasks.pop_front() else { break };
                rpc_call(&ctx, &mut conn, &who, "rpc task.delete", "task.delete", json!({"id": old.id}), id).await;
            }
        } else if r < rest(35) || tasks.iter().all(|t| t.keys.is_empty()) {
            let ti = rng.below(tasks.len() as u64) as usize;
            let key = format!("k{}", rng.below(16));
            let size = rng.log_uniform(50, 8192) as usize;
            let task_id = tasks[ti].id.clone();
            let params = match rng.below(10) {
                0..=6 => json!({"taskId": task_id, "key": key, "type": "json",
                                 "value": {"n": id, "pad": "y".repeat(size)}}),
                7 | 8 => json!({"taskId": task_id, "key": key, "type": "markdown",
                                "content": format!("# soak {id}\n\n{}", "z".repeat(size))}),
                _ => json!({"taskId": task_id, "key": key, "type": "binary", "mimeType": "application/octet-stream",
                            "data": base64(&rng.bytes(size))}),
            };
            let kind = "rpc task.create_attachment";
            if rpc_call(&ctx, &mut conn, &who, kind, "task.create_attachment", params, id).await.is_some() {
                let t = &mut tasks[ti];
                if !t.keys.contains(&key) {
                    t.keys.push(key);
                }
            }
        } else if r < rest(70) {
            let with_keys: Vec<usize> = (0..tasks.len()).filter(|&i| !tasks[i].keys.is_empty()).collect();
            let t = &tasks[with_keys[rng.below(with_keys.len() as u64) as usize]];
            let key = t.keys[rng.below(t.keys.len() as u64) as usize].clone();
            let params = json!({"taskId": t.id, "key": key});
            rpc_call(&ctx, &mut conn, &who, "rpc task.get_attachment", "task.get_attachment", params, id).await;
        } else {
            let params = json!({"limit": 25, "orderBy": "createdAt", "order": "desc"});
            rpc_call(&ctx, &mut conn, &who, "rpc task.list", "task.list", params, id).await;
        }
        if !ctx.pause(rng.jitter(ctx.args.rpc_interval)).await {
            return;
        }
    }
}

// ------------------------------------------------------------------------------ sampling

#[derive(Clone, Debug)]
struct Sample {
    t: Duration,
    rss_kb: u64,
    hwm_kb: u64,
    threads: u64,
    fds: u64,
    client_conns: i64,
    responses: u64,
    server_errors: u64,
    tasks_created: u64,
    uploads_done: u64,
    /// jemalloc's figures from `/metrics` (None when the server does not report them).
    alloc: Option<Allocator>,
}

/// What the server's allocator says it holds, in KiB (`attache_allocator_*_bytes`).
#[derive(Clone, Copy, Debug)]
struct Allocator {
    allocated_kb: u64,
    resident_kb: u64,
    retained_kb: u64,
}

async fn allocator(ctx: &Ctx, conn: &mut Conn) -> Option<Allocator> {
    let req = request(ctx, Method::GET, "/metrics", "user:soak-sampler").body(Full::new(Bytes::new())).ok()?;
    let (status, _, body) = conn.exchange("metrics", req, Duration::from_secs(5), false).await?;
    if !status.is_success() {
        return None;
    }
    let text = String::from_utf8_lossy(&body);
    let kb = |name: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.split_whitespace().next() == Some(name))?;
        Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? / 1024)
    };
    Some(Allocator {
        allocated_kb: kb("attache_allocator_allocated_bytes")?,
        resident_kb: kb("attache_allocator_resident_bytes")?,
        retained_kb: kb("attache_allocator_retained_bytes")?,
    })
}

fn proc_status(pid: u32) -> Option<(u64, u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        s.lines().find(|l| l.starts_with(name))?.split_whitespace().nth(1)?.parse().ok()
    };
    Some((field("VmRSS:")?, field("VmHWM:").unwrap_or(0), field("Threads:").unwrap_or(0)))
}

fn proc_fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count() as u64).unwrap_or(0)
}

/// Samples every `--sample` from `start` through `--duration`. Returns the samples and,
/// if the server went away, when.
async fn sampler(ctx: Arc<Ctx>, start: Instant) -> (Vec<Sample>, Option<Duration>) {
    let mut out = Vec::new();
    let mut last_responses = 0u64;
    let mut k = 0u32;
    let mut metrics = Conn::new(&ctx);
    loop {
        let at = start + ctx.args.sample * k;
        if at - start > ctx.args.duration {
            return (out, None);
        }
        tokio::time::sleep_until(at).await;
        let t = at - start;
        let Some((rss_kb, hwm_kb, threads)) = proc_status(ctx.args.pid) else {
            eprintln!("[soak] t={}s: the server (pid {}) is gone", t.as_secs(), ctx.args.pid);
            return (out, Some(t));
        };
        let alloc = allocator(&ctx, &mut metrics).await;
        let responses = ctx.stats.responses.load(Ordering::Relaxed);
        let s = Sample {
            t,
            rss_kb,
            hwm_kb,
            threads,
            fds: proc_fds(ctx.args.pid),
            client_conns: ctx.open_conns.load(Ordering::Relaxed),
            responses,
            server_errors: ctx.stats.server_errors.load(Ordering::Relaxed),
            tasks_created: ctx.tasks_created.load(Ordering::Relaxed),
            uploads_done: ctx.uploads_done.load(Ordering::Relaxed),
            alloc,
        };
        eprintln!(
            "[soak] t={:>5}s rss={:>7.1}MiB hwm={:>7.1}MiB heap={} fds={:>5} client_conns={:>5} responses=+{:<6} 5xx={} live_deliveries={}",
            t.as_secs(),
            rss_kb as f64 / 1024.0,
            hwm_kb as f64 / 1024.0,
            alloc.map_or("-".to_string(), |a| format!("{:.1}MiB", mib(a.allocated_kb))),
            s.fds,
            s.client_conns,
            responses - last_responses,
            s.server_errors,
            ctx.live.deliveries.load(Ordering::Relaxed),
        );
        last_responses = responses;
        out.push(s);
        k += 1;
    }
}

// ------------------------------------------------------------------------------ the run

async fn setup(
    ctx: &Arc<Ctx>,
    method: Method,
    path: &str,
    who: &str,
    ct: Option<&str>,
    body: &str,
) -> Result<(), BoxErr> {
    let mut conn = Conn::new(ctx);
    let mut b = request(ctx, method.clone(), path, who);
    if let Some(ct) = ct {
        b = b.header("content-type", ct);
    }
    let req = b.body(Full::new(Bytes::from(body.to_owned())))?;
    match conn.exchange("setup", req, Duration::from_secs(30), true).await {
        Some((st, _, _)) if st.is_success() => Ok(()),
        Some((st, _, body)) => Err(format!("{method} {path} -> {st}: {}", String::from_utf8_lossy(&body)).into()),
        None => Err(format!("{method} {path}: no answer").into()),
    }
}

/// Attachment statuses on an entity, after the run.
async fn manifest_statuses(ctx: &Arc<Ctx>, entity: &str, who: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let mut conn = Conn::new(ctx);
    let Ok(req) = request(ctx, Method::GET, &format!("{entity}/attachments"), who).body(Full::new(Bytes::new())) else {
        return out;
    };
    if let Some((st, _, body)) = conn.exchange("after the run", req, Duration::from_secs(30), true).await {
        if st == StatusCode::OK {
            if let Ok(v) = serde_json::from_slice::<Value>(&body) {
                for a in v.get("attachments").and_then(Value::as_array).into_iter().flatten() {
                    let s = a.get("status").and_then(Value::as_str).unwrap_or("?");
                    *out.entry(s.to_owned()).or_default() += 1;
                }
            }
        }
    }
    out
}

pub fn main(raw: Vec<String>) -> i32 {
    let args = parse_args(raw);
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: tokio runtime: {e}");
            return 1;
        }
    };
    match rt.block_on(run(args)) {
        Ok(pass) => {
            if pass {
                0
            } else {
                1
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            2
        }
    }
}

async fn run(args: Args) -> Result<bool, BoxErr> {
    let addr = args.url.strip_prefix("http://").ok_or("only http:// URLs")?.trim_end_matches('/').to_owned();
    let ctx = Arc::new(Ctx {
        args: args.clone(),
        addr,
        stop: AtomicBool::new(false),
        stats: Stats::default(),
        live: LiveStats::default(),
        slow: SlowStats::default(),
        aborts: AbortStats::default(),
        open_conns: AtomicI64::new(0),
        peak_conns: AtomicI64::new(0),
        tasks_created: AtomicU64::new(0),
        uploads_done: AtomicU64::new(0),
    });
    let started_at = std::time::SystemTime::now();

    // Principals: streams 1.., uploaders 100.., aborters 200.., RPC workers 300..
    let mut streams: Vec<Arc<StreamSpec>> = Vec::new();
    for i in 0..args.json_streams {
        streams.push(Arc::new(StreamSpec { path: format!("/soak/json-{i}"), who: principal(1 + i), json: true }));
    }
    for i in 0..args.binary_streams {
        let n = 1 + args.json_streams + i;
        streams.push(Arc::new(StreamSpec { path: format!("/soak/bin-{i}"), who: principal(n), json: false }));
    }
    let firehose = Arc::new(StreamSpec {
        path: "/soak/firehose".into(),
        who: principal(1 + args.json_streams + args.binary_streams),
        json: false,
    });
    let uploaders: Vec<(String, String)> =
        (0..args.uploaders).map(|j| (format!("/_electric/entities/soakup/{j}"), principal(100 + j))).collect();
    let aborters: Vec<(String, String)> =
        (0..args.aborters).map(|j| (format!("/_electric/entities/soakcut/{j}"), principal(200 + j))).collect();
    let rpc_who: Vec<String> = (0..args.rpc_workers).map(|j| principal(300 + j)).collect();

    eprintln!("[soak] setting up streams and entities");
    for s in streams.iter().chain(std::iter::once(&firehose)) {
        let ct = if s.json { "application/json" } else { "application/octet-stream" };
        setup(&ctx, Method::PUT, &s.path, &s.who, Some(ct), "").await?;
    }
    for (e, who) in uploaders.iter().chain(aborters.iter()) {
        setup(&ctx, Method::PUT, e, who, Some("application/json"), "{}").await?;
    }

    // Who reads what: 80% of the live readers on the plain streams, 10% on the upload
    // entities' main streams, 10% on /_attache/events (as the RPC workers' principals).
    let mut targets: Vec<Arc<LiveTarget>> = Vec::new();
    for i in 0..args.readers {
        let slot = i % 10;
        let t = if slot == 8 && !uploaders.is_empty() {
            let j = (i / 10) % uploaders.len();
            LiveTarget {
                path: format!("/soakup/{j}/main"),
                who: uploaders[j].1.clone(),
                seq_check: false,
                binary: false,
            }
        } else if slot == 9 && !rpc_who.is_empty() {
            let who = rpc_who[(i / 10) % rpc_who.len()].clone();
            LiveTarget { path: "/_attache/events".into(), who, seq_check: false, binary: false }
        } else {
            let s = &streams[i % streams.len()];
            LiveTarget { path: s.path.clone(), who: s.who.clone(), seq_check: s.json, binary: !s.json }
        };
        targets.push(Arc::new(t));
    }

    let start = Instant::now();
    eprintln!(
        "[soak] load for {}s: {} live readers, {} slow readers, {} json + {} binary streams + firehose, {} uploaders, {} cutters, {} rpc workers",
        args.duration.as_secs(),
        args.readers,
        args.slow_readers,
        args.json_streams,
        args.binary_streams,
        args.uploaders,
        args.aborters,
        args.rpc_workers
    );
    let sampler_task = tokio::spawn(sampler(ctx.clone(), start));
    let mut set = JoinSet::new();
    for (i, s) in streams.iter().enumerate() {
        if s.json {
            set.spawn(json_writer(ctx.clone(), i, s.clone()));
        } else {
            set.spawn(binary_writer(ctx.clone(), s.clone(), None, args.append_interval));
        }
    }
    set.spawn(binary_writer(ctx.clone(), firehose.clone(), Some(args.firehose_bytes), args.firehose_interval));
    for (j, (e, who)) in uploaders.iter().enumerate() {
        set.spawn(uploader(ctx.clone(), j, e.clone(), who.clone()));
    }
    for (j, (e, who)) in aborters.iter().enumerate() {
        set.spawn(aborter(ctx.clone(), j, e.clone(), who.clone()));
    }
    for who in &rpc_who {
        set.spawn(rpc_worker(ctx.clone(), who.clone()));
    }
    // Readers join over the first seconds (5 ms apart), not all at once.
    for (i, t) in targets.into_iter().enumerate() {
        let c = ctx.clone();
        set.spawn(async move {
            tokio::time::sleep(Duration::from_millis(5 * i as u64)).await;
            if i % 2 == 0 {
                long_poll_reader(c, t).await
            } else {
                sse_reader(c, t).await
            }
        });
    }
    for i in 0..args.slow_readers {
        let (path, who) = if i % 3 == 2 {
            let s = &streams[i % args.json_streams.min(streams.len()).max(1)];
            (s.path.clone(), s.who.clone())
        } else {
            (firehose.path.clone(), firehose.who.clone())
        };
        let c = ctx.clone();
        set.spawn(async move {
            tokio::time::sleep(Duration::from_millis(20 * i as u64)).await;
            slow_reader(c, i, path, who).await
        });
    }

    let (samples, gone_at) = sampler_task.await?;
    ctx.stop.store(true, Ordering::Relaxed);
    let ran_for = start.elapsed();
    eprintln!("[soak] stopping the load");
    let _ = tokio::time::timeout(Duration::from_secs(5), async { while set.join_next().await.is_some() {} }).await;
    set.abort_all();
    while set.join_next().await.is_some() {}

    // After the run: is the server still there, and what became of the cut uploads?
    let mut after = Vec::new();
    let alive = gone_at.is_none() && proc_status(args.pid).is_some();
    if alive {
        let mut conn = Conn::new(&ctx);
        if let Ok(req) = request(&ctx, Method::GET, "/healthz", &principal(0)).body(Full::new(Bytes::new())) {
            let t0 = Instant::now();
            let r = conn.exchange("after the run", req, Duration::from_secs(10), true).await;
            after.push(format!(
                "`GET /healthz` after the run: {} in {:.1} ms",
                r.map(|(s, _, _)| s.as_u16().to_string()).unwrap_or_else(|| "no answer".into()),
                t0.elapsed().as_secs_f64() * 1e3
            ));
        }
        for (e, who) in &aborters {
            let m = manifest_statuses(&ctx, e, who).await;
            after.push(format!("manifest of the cut uploads on `{e}`: {}", fmt_counts(&m)));
        }
        for (e, who) in &uploaders {
            let m = manifest_statuses(&ctx, e, who).await;
            after.push(format!("manifest of `{e}` (last 8 kept, older deleted): {}", fmt_counts(&m)));
        }
    }

    let log_summary = args.server_log.as_deref().map(summarize_log);
    let verdict = verdict(&args, &samples, &ctx, alive, gone_at);
    let report = render(&ctx, &args, started_at, ran_for, &samples, &verdict, &after, log_summary.as_ref());
    if let Some(path) = &args.report {
        std::fs::write(path, &report)?;
        eprintln!("[soak] wrote {path}");
    }
    println!("{}", verdict.line);
    Ok(verdict.pass)
}

fn fmt_counts(m: &BTreeMap<String, u64>) -> String {
    if m.is_empty() {
        return "none".into();
    }
    m.iter().map(|(k, v)| format!("{v} {k}")).collect::<Vec<_>>().join(", ")
}

// ------------------------------------------------------------------------------ verdict & report

struct Verdict {
    pass: bool,
    line: String,
    detail: Vec<String>,
}

fn mib(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

fn verdict(args: &Args, samples: &[Sample], ctx: &Ctx, alive: bool, gone_at: Option<Duration>) -> Verdict {
    let mut detail = Vec::new();
    let post: Vec<&Sample> = samples.iter().filter(|s| s.t >= args.warmup).collect();
    let fivexx = ctx.stats.server_errors.load(Ordering::Relaxed);
    let responses = ctx.stats.responses.load(Ordering::Relaxed);
    let (rss_ok, rss_text) = match (post.first(), post.iter().map(|s| s.rss_kb).max()) {
        (Some(base), Some(max)) if post.len() >= 2 => {
            let growth = 100.0 * (max as f64 - base.rss_kb as f64) / base.rss_kb.max(1) as f64;
            let ok = growth <= args.rss_limit_pct;
            detail.push(format!(
                "RSS: the first sample at or after the {}s warm-up (t={}s) is {:.1} MiB; the largest of the {} samples \
                 from then on is {:.1} MiB: growth = (max - first) / first = {:+.1}% (limit {:.0}%) → {}",
                args.warmup.as_secs(),
                base.t.as_secs(),
                mib(base.rss_kb),
                post.len(),
                mib(max),
                growth,
                args.rss_limit_pct,
                if ok { "flat" } else { "NOT flat" }
            ));
            if let (Some(first), Some(last)) = (post.first(), post.last()) {
                let tasks = last.tasks_created.saturating_sub(first.tasks_created);
                if tasks > 0 {
                    detail.push(format!(
                        "from t={}s to t={}s RSS moved {:+.1} MiB while {} tasks were created (and as many beyond each \
                         worker's window of 20 deleted): at most {:+.1} KiB per task created, if all of it were per task \
                         (information, not judged)",
                        first.t.as_secs(),
                        last.t.as_secs(),
                        mib(last.rss_kb) - mib(first.rss_kb),
                        tasks,
                        (last.rss_kb as f64 - first.rss_kb as f64) / tasks as f64
                    ));
                }
            }
            let heap: Vec<(u64, Allocator)> = post.iter().filter_map(|s| s.alloc.map(|a| (s.t.as_secs(), a))).collect();
            if let (Some((t0, first)), Some(max)) = (heap.first(), heap.iter().map(|(_, a)| a.allocated_kb).max()) {
                let resident = heap.iter().map(|(_, a)| a.resident_kb).max().unwrap_or(0);
                detail.push(format!(
                    "allocator (jemalloc, from /metrics): live allocations {:.1} MiB at t={t0}s, largest after it {:.1} MiB \
                     ({:+.1} MiB); resident pages {:.1} → max {:.1} MiB; retained (unmapped, not in RSS) at the end \
                     {:.1} MiB; RSS beyond resident is code, stacks and kernel-side mappings (information, not judged)",
                    mib(first.allocated_kb),
                    mib(max),
                    mib(max) - mib(first.allocated_kb),
                    mib(first.resident_kb),
                    mib(resident),
                    heap.last().map_or(0.0, |(_, a)| mib(a.retained_kb))
                ));
            }
            if let Some(slope) = slope_mib_per_hour(&post) {
                detail.push(format!(
                    "RSS trend after warm-up (least squares): {slope:+.1} MiB/hour (information, not judged)"
                ));
            }
            (ok, format!("RSS {growth:+.1}% after warm-up ({:.1} → max {:.1} MiB)", mib(base.rss_kb), mib(max)))
        }
        _ => {
            detail.push("RSS: fewer than two samples after the warm-up; cannot judge".into());
            (false, "RSS not judged (too few samples after warm-up)".into())
        }
    };
    let peak = samples.iter().map(|s| s.hwm_kb).max().unwrap_or(0);
    detail.push(format!("peak RSS (VmHWM) over the run: {:.1} MiB (information, not judged)", mib(peak)));
    detail.push(format!(
        "5xx answers: {fivexx} of {responses} responses → {}",
        if fivexx == 0 { "none" } else { "FAIL" }
    ));
    let alive_text = match gone_at {
        Some(t) => format!("the server DIED (gone at t={}s)", t.as_secs()),
        None if alive => "the server is alive at the end".into(),
        None => "the server is GONE at the end".into(),
    };
    detail.push(alive_text.clone());
    let pass = rss_ok && fivexx == 0 && alive;
    let line = format!(
        "soak verdict: {} — {rss_text}, {fivexx} 5xx of {responses} responses, {alive_text}",
        if pass { "PASS" } else { "FAIL" }
    );
    Verdict { pass, line, detail }
}

fn slope_mib_per_hour(post: &[&Sample]) -> Option<f64> {
    if post.len() < 3 {
        return None;
    }
    let n = post.len() as f64;
    let xs: Vec<f64> = post.iter().map(|s| s.t.as_secs_f64() / 3600.0).collect();
    let ys: Vec<f64> = post.iter().map(|s| mib(s.rss_kb)).collect();
    let (mx, my) = (xs.iter().sum::<f64>() / n, ys.iter().sum::<f64>() / n);
    let sxx: f64 = xs.iter().map(|x| (x - mx) * (x - mx)).sum();
    let sxy: f64 = xs.iter().zip(&ys).map(|(x, y)| (x - mx) * (y - my)).sum();
    (sxx > 0.0).then(|| sxy / sxx)
}

struct LogSummary {
    lines: usize,
    warn: usize,
    error: usize,
    panics: usize,
    /// WARN/ERROR/panic lines without their timestamps, counted, in order of first sight.
    distinct: Vec<(String, usize)>,
}

/// Drops ANSI colour sequences (`ESC [ ... letter`).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn summarize_log(path: &str) -> LogSummary {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut s = LogSummary { lines: 0, warn: 0, error: 0, panics: 0, distinct: Vec::new() };
    for raw in text.lines() {
        s.lines += 1;
        let line = strip_ansi(raw);
        let (w, e, p) = (line.contains(" WARN "), line.contains(" ERROR "), line.contains("panicked"));
        s.warn += usize::from(w);
        s.error += usize::from(e);
        s.panics += usize::from(p);
        if !(w || e || p) {
            continue;
        }
        // `2026-11-28T05:15:45.927234Z ERROR target: message`: drop the timestamp.
        let mut msg = match line.split_once(' ') {
            Some((ts, rest)) if ts.contains('T') && ts.ends_with('Z') => rest.trim().to_owned(),
            _ => line.trim().to_owned(),
        };
        if msg.len() > 240 {
            let mut cut = 240;
            while !msg.is_char_boundary(cut) {
                cut -= 1;
            }
            msg.truncate(cut);
            msg.push('…');
        }
        if let Some(i) = s.distinct.iter().position(|(m, _)| *m == msg) {
            s.distinct[i].1 += 1;
        } else if s.distinct.len() < 20 {
            s.distinct.push((msg, 1));
        }
    }
    s
}

/// What a kind of request is expected to answer; anything else is listed as unexpected.
fn expected(kind: &str, status: u16) -> bool {
    match kind {
        "append json" | "append binary" => matches!(status, 200 | 204),
        "upload" | "setup" => matches!(status, 200 | 201),
        "attachment get" => matches!(status, 200 | 206),
        "attachment delete" | "after the run" | "live sse" | "slow sse" | "metrics" => status == 200,
        "live long-poll" => matches!(status, 200 | 204),
        "upload cut: half-close" => status == 400,
        k if k.starts_with("rpc ") => status == 200,
        _ => false,
    }
}

fn pct(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize] as f64 / 1000.0
}

#[allow(clippy::too_many_arguments)]
fn render(
    ctx: &Ctx,
    args: &Args,
    started_at: std::time::SystemTime,
    ran_for: Duration,
    samples: &[Sample],
    v: &Verdict,
    after: &[String],
    log: Option<&LogSummary>,
) -> String {
    let mut o = String::new();
    let started = started_at.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let _ = writeln!(o, "# attache soak\n");
    let _ = writeln!(o, "**{}**\n", v.line);
    let _ = writeln!(
        o,
        "Started at unix time {started}; load ran {:.0} s. Written by `bench/soak.sh` (see bench/README.md).\n",
        ran_for.as_secs_f64()
    );
    for n in &args.notes {
        let _ = writeln!(o, "- {n}");
    }
    let _ = writeln!(
        o,
        "- load: {} live readers (long-poll and SSE, half each; 80% on plain streams, 10% on entity main streams, \
         10% on /_attache/events), {} slow SSE readers (half read 4-64 B/s, half stop reading; held ~{}s each), \
         {} JSON + {} binary streams appended every ~{} ms, a firehose of {} B every ~{} ms, {} uploaders \
         ({}-{} B, every ~{} ms), {} upload cutter(s) (every ~{} ms), {} JSON-RPC workers (every ~{} ms)",
        args.readers,
        args.slow_readers,
        args.slow_hold.as_secs(),
        args.json_streams,
        args.binary_streams,
        args.append_interval.as_millis(),
        args.firehose_bytes,
        args.firehose_interval.as_millis(),
        args.uploaders,
        args.upload_min,
        args.upload_max,
        args.upload_interval.as_millis(),
        args.aborters,
        args.abort_interval.as_millis(),
        args.rpc_workers,
        args.rpc_interval.as_millis()
    );
    let _ = writeln!(
        o,
        "- client connections open at once: peak {} (the tool's own count)\n",
        ctx.peak_conns.load(Ordering::Relaxed)
    );

    let _ = writeln!(o, "## Verdict\n");
    for d in &v.detail {
        let _ = writeln!(o, "- {d}");
    }

    let _ = writeln!(o, "\n## Responses per kind of request\n");
    let _ = writeln!(o, "| kind | responses | statuses | unexpected statuses | JSON-RPC errors | other outcomes | p50 ms | p99 ms | max ms |");
    let _ = writeln!(o, "|---|---:|---|---|---|---|---:|---:|---:|");
    let mut kinds = ctx.stats.kinds.lock().unwrap_or_else(|e| e.into_inner());
    for (kind, k) in kinds.iter_mut() {
        k.lat_us.sort_unstable();
        let total: u64 = k.statuses.values().sum();
        let statuses = k.statuses.iter().map(|(s, n)| format!("{s}: {n}")).collect::<Vec<_>>().join(", ");
        let unexpected: u64 = k.statuses.iter().filter(|(s, _)| !expected(kind, **s)).map(|(_, n)| n).sum();
        let rpc = k.rpc_errors.iter().map(|(c, n)| format!("{c}: {n}")).collect::<Vec<_>>().join(", ");
        let other = k.other.iter().map(|(w, n)| format!("{w}: {n}")).collect::<Vec<_>>().join("; ");
        let lat = |p: f64| if k.lat_us.is_empty() { "–".to_string() } else { format!("{:.1}", pct(&k.lat_us, p)) };
        let _ = writeln!(
            o,
            "| {kind} | {total} | {} | {unexpected} | {} | {} | {} | {} | {} |",
            if statuses.is_empty() { "–".into() } else { statuses },
            if rpc.is_empty() { "–".into() } else { rpc },
            if other.is_empty() { "–".into() } else { other.replace('|', "\\|") },
            lat(0.5),
            lat(0.99),
            lat(1.0)
        );
    }
    drop(kinds);
    let _ = writeln!(
        o,
        "\nExpected statuses: appends 200/204, uploads 201, attachment reads 200/206, deletes 200, RPC 200 \
         (JSON-RPC errors counted beside), long-poll 200/204, SSE 200, a half-closed cut upload 400 \
         (`UPLOAD_INTERRUPTED`). Cut uploads that are closed or reset get no answer by design. Latency is \
         request-to-last-byte for non-live requests.\n"
    );

    let l = &ctx.live;
    let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let _ = writeln!(o, "## Live and slow readers\n");
    let _ = writeln!(
        o,
        "- live: {} deliveries (long-poll 200s with data + SSE data events), {} JSON messages checked: \
         {} gaps ({} messages missing), {} duplicates, {} unparsable; {} long-poll 204s; {} SSE responses \
         ended by the server and resumed; {} reconnects after a failure",
        g(&l.deliveries),
        g(&l.messages),
        g(&l.gaps),
        g(&l.missing),
        g(&l.duplicates),
        g(&l.unparsable),
        g(&l.timeouts),
        g(&l.sse_ended),
        g(&l.reconnects)
    );
    let s = &ctx.slow;
    let _ = writeln!(
        o,
        "- slow: {} sessions, {} bytes read in total, {} closed by the server, {} held until the client dropped them",
        g(&s.sessions),
        g(&s.bytes),
        g(&s.closed_by_server),
        g(&s.held_to_end)
    );
    let _ = writeln!(
        o,
        "- cut uploads: {} started, {:.1} MiB sent before the cut",
        g(&ctx.aborts.started),
        g(&ctx.aborts.bytes_sent) as f64 / 1048576.0
    );
    for a in after {
        let _ = writeln!(o, "- {a}");
    }

    if let Some(log) = log {
        let _ = writeln!(o, "\n## Server log\n");
        let _ = writeln!(o, "{} lines: {} WARN, {} ERROR, {} panics.", log.lines, log.warn, log.error, log.panics);
        if !log.distinct.is_empty() {
            let _ = writeln!(
                o,
                "\nDistinct WARN/ERROR/panic lines (timestamps dropped; at most 20 kinds), with counts:\n\n```"
            );
            for (m, n) in &log.distinct {
                let _ = writeln!(o, "{n:>6} × {m}");
            }
            let _ = writeln!(o, "```");
        }
    }

    let _ = writeln!(o, "\n## Server memory, every {} s\n", args.sample.as_secs());
    let _ = writeln!(
        o,
        "| t (s) | VmRSS MiB | VmHWM MiB | heap MiB | allocator resident MiB | threads | server fds | client conns | responses in interval | 5xx so far | tasks created so far | uploads so far |"
    );
    let _ = writeln!(o, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut prev = 0u64;
    for s in samples {
        let mark = if s.t >= args.warmup && samples.iter().find(|x| x.t >= args.warmup).is_some_and(|x| x.t == s.t) {
            " ← first after warm-up"
        } else {
            ""
        };
        let _ = writeln!(
            o,
            "| {}{mark} | {:.1} | {:.1} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            s.t.as_secs(),
            mib(s.rss_kb),
            mib(s.hwm_kb),
            s.alloc.map_or("-".to_string(), |a| format!("{:.1}", mib(a.allocated_kb))),
            s.alloc.map_or("-".to_string(), |a| format!("{:.1}", mib(a.resident_kb))),
            s.threads,
            s.fds,
            s.client_conns,
            s.responses - prev,
            s.server_errors,
            s.tasks_created,
            s.uploads_done
        );
        prev = s.responses;
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_lose_colours_and_timestamps() {
        let dir = std::env::temp_dir().join(format!("soak-log-test-{}", std::process::id()));
        let line = "\u{1b}[2m2026-11-28T05:15:45.927234Z\u{1b}[0m \u{1b}[31mERROR\u{1b}[0m x: disk full";
        std::fs::write(&dir, format!("{line}\n{line}\nplain INFO line\n")).unwrap();
        let s = summarize_log(dir.to_str().unwrap());
        let _ = std::fs::remove_file(&dir);
        assert_eq!((s.lines, s.error, s.warn), (3, 2, 0));
        assert_eq!(s.distinct, vec![("ERROR x: disk full".to_string(), 2)]);
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("30m"), Some(Duration::from_secs(1800)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("90"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_duration("5x"), None);
    }

    #[test]
    fn base64_matches_the_standard_alphabet() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn sse_parser_splits_events_across_chunks() {
        let mut p = SseParser::default();
        let mut out = Vec::new();
        p.push(b"event: data\ndata:[1,\ndata:2]\n\nevent: con", &mut out).unwrap();
        assert_eq!(out, vec![("data".to_string(), "[1,\n2]".to_string())]);
        out.clear();
        p.push(b"trol\ndata:{\"streamNextOffset\":\"x\"}\n\n", &mut out).unwrap();
        assert_eq!(out, vec![("control".to_string(), "{\"streamNextOffset\":\"x\"}".to_string())]);
    }

    #[test]
    fn seq_check_counts_gaps_and_duplicates() {
        let live = LiveStats::default();
        let mut c = SeqCheck::default();
        c.feed(br#"[{"seq":5},{"seq":6}]"#, &live);
        c.feed(br#"[{"seq":6},{"seq":9}]"#, &live);
        assert_eq!(live.duplicates.load(Ordering::Relaxed), 1);
        assert_eq!(live.gaps.load(Ordering::Relaxed), 1);
        assert_eq!(live.missing.load(Ordering::Relaxed), 2);
        assert_eq!(live.messages.load(Ordering::Relaxed), 4);
    }
}

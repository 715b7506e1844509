//! The Durable Streams client (PROTOCOL.md): create, append, close, read,
//! delete, and [`Tail`], a live reader by long-poll or SSE that resumes from
//! the last offset it delivered after a disconnect; plus [`IdempotentProducer`].

use std::time::Duration;

use attache_core::StreamPath;
use base64::Engine;
use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};
use reqwest::{Method, Response, StatusCode};
use serde_json::Value;

use crate::client::{api_error, content_type_header, header, RuntimeServerClient};
use crate::error::{Error, ErrorCode, Result};

pub const NEXT_OFFSET: &str = "stream-next-offset";
pub const UP_TO_DATE: &str = "stream-up-to-date";
pub const CLOSED: &str = "stream-closed";
pub const CURSOR: &str = "stream-cursor";
pub const SSE_DATA_ENCODING: &str = "stream-sse-data-encoding";

/// The offset that means "from the start".
pub const START: &str = "-1";
/// The offset that means "from the current tail".
pub const NOW: &str = "now";

fn stream_path(path: &str) -> Result<String> {
    Ok(StreamPath::new(path)?.as_str().to_owned())
}

/// How a new stream is configured.
#[derive(Debug, Clone, Default)]
pub struct CreateStream {
    pub content_type: Option<String>,
    pub ttl_secs: Option<u64>,
    pub expires_at: Option<String>,
    /// Create it closed (with `body` as its whole content).
    pub closed: bool,
    pub body: Option<Bytes>,
}

impl CreateStream {
    pub fn json() -> CreateStream {
        CreateStream { content_type: Some("application/json".into()), ..CreateStream::default() }
    }
    pub fn with_content_type(content_type: &str) -> CreateStream {
        CreateStream { content_type: Some(content_type.into()), ..CreateStream::default() }
    }
}

/// A stream's metadata (HEAD).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamInfo {
    pub content_type: Option<String>,
    pub next_offset: String,
    pub closed: bool,
}

/// What an append answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    pub next_offset: String,
    pub closed: bool,
    /// A producer append the server had already accepted (204 to a producer).
    pub duplicate: bool,
}

/// One piece of a stream as a reader receives it.
#[derive(Debug, Clone, PartialEq)]
pub struct Chunk {
    /// The bytes: a JSON array's text for JSON streams, raw bytes otherwise.
    pub data: Bytes,
    /// Where the next read starts.
    pub next_offset: String,
    pub up_to_date: bool,
    /// The stream is closed and this is its end.
    pub closed: bool,
    pub json: bool,
}

impl Chunk {
    /// The messages of a JSON stream's chunk (an empty chunk has none).
    pub fn json_items(&self) -> Result<Vec<Value>> {
        if self.data.iter().all(u8::is_ascii_whitespace) {
            return Ok(Vec::new());
        }
        match serde_json::from_slice::<Value>(&self.data)
            .map_err(|e| Error::Protocol(format!("a JSON stream chunk is not JSON: {e}")))?
        {
            Value::Array(items) => Ok(items),
            other => Ok(vec![other]),
        }
    }
}

fn is_json(content_type: Option<&str>) -> bool {
    content_type.is_some_and(|c| c.split(';').next().unwrap_or("").trim().eq_ignore_ascii_case("application/json"))
}

impl RuntimeServerClient {
    /// `PUT {path}`: creates a stream (an identical existing one is fine). Returns its tail offset.
    pub async fn create_stream(&self, path: &str, options: &CreateStream) -> Result<StreamInfo> {
        let path = stream_path(path)?;
        let mut rb = self.request(Method::PUT, &path);
        if let Some(ct) = &options.content_type {
            rb = rb.header("content-type", content_type_header(ct)?);
        }
        if let Some(ttl) = options.ttl_secs {
            rb = rb.header("stream-ttl", ttl.to_string());
        }
        if let Some(at) = &options.expires_at {
            rb = rb.header("stream-expires-at", at.as_str());
        }
        if options.closed {
            rb = rb.header(CLOSED, "true");
        }
        if let Some(body) = &options.body {
            rb = rb.body(body.clone());
        }
        let res = self.send(rb, &Method::PUT, &path).await?;
        Ok(info_of(&res))
    }

    /// `HEAD {path}`.
    pub async fn head_stream(&self, path: &str) -> Result<StreamInfo> {
        let path = stream_path(path)?;
        let res = self.send(self.request(Method::HEAD, &path), &Method::HEAD, &path).await?;
        Ok(info_of(&res))
    }

    /// `POST {path}`: appends `body` (for JSON streams, a value or an array of values).
    pub async fn append(&self, path: &str, content_type: &str, body: impl Into<Bytes>) -> Result<Appended> {
        self.append_with(path, content_type, body.into(), &AppendOptions::default()).await
    }

    /// Appends one JSON value (an array appends its items as separate messages).
    pub async fn append_json(&self, path: &str, value: &Value) -> Result<Appended> {
        let body = serde_json::to_vec(value).map_err(|e| Error::Invalid(e.to_string()))?;
        self.append(path, "application/json", body).await
    }

    /// Appends with optional `Stream-Seq`, producer headers and close.
    pub async fn append_with(
        &self,
        path: &str,
        content_type: &str,
        body: Bytes,
        options: &AppendOptions,
    ) -> Result<Appended> {
        let path = stream_path(path)?;
        let mut rb = self.request(Method::POST, &path).header("content-type", content_type_header(content_type)?);
        if let Some(seq) = &options.seq {
            rb = rb.header("stream-seq", seq.as_str());
        }
        if let Some((id, epoch, seq)) = &options.producer {
            rb = rb
                .header("producer-id", id.as_str())
                .header("producer-epoch", epoch.to_string())
                .header("producer-seq", seq.to_string());
        }
        if options.close {
            rb = rb.header(CLOSED, "true");
        }
        let res = self.send(rb.body(body), &Method::POST, &path).await?;
        Ok(Appended {
            next_offset: header(&res, NEXT_OFFSET).unwrap_or_default(),
            closed: header(&res, CLOSED).is_some_and(|v| v.eq_ignore_ascii_case("true")),
            duplicate: options.producer.is_some() && res.status() == StatusCode::NO_CONTENT,
        })
    }

    /// Closes a stream: no more appends.
    pub async fn close_stream(&self, path: &str) -> Result<Appended> {
        let options = AppendOptions { close: true, ..AppendOptions::default() };
        self.append_with(path, "application/octet-stream", Bytes::new(), &options).await
    }

    /// `DELETE {path}`.
    pub async fn delete_stream(&self, path: &str) -> Result<()> {
        let path = stream_path(path)?;
        self.send(self.request(Method::DELETE, &path), &Method::DELETE, &path).await?;
        Ok(())
    }

    /// One catch-up read from `offset` (`-1` for the start, `now` for the tail).
    pub async fn read_stream(&self, path: &str, offset: &str) -> Result<Chunk> {
        let path = stream_path(path)?;
        let rb = self.request(Method::GET, &path).query(&[("offset", offset)]);
        let res = self.send(rb, &Method::GET, &path).await?;
        self.chunk_of(res).await
    }

    /// Everything in the stream from `offset` until up to date, as one chunk.
    pub async fn read_all(&self, path: &str, offset: &str) -> Result<Chunk> {
        let mut offset = offset.to_owned();
        let mut data = BytesMut::new();
        let mut items: Vec<Value> = Vec::new();
        loop {
            let chunk = self.read_stream(path, &offset).await?;
            if chunk.json {
                items.extend(chunk.json_items()?);
            } else {
                data.extend_from_slice(&chunk.data);
            }
            let progressed = chunk.next_offset != offset;
            offset = chunk.next_offset.clone();
            if chunk.up_to_date || chunk.closed || !progressed {
                let data = if chunk.json {
                    Bytes::from(serde_json::to_vec(&items).map_err(|e| Error::Protocol(e.to_string()))?)
                } else {
                    data.freeze()
                };
                return Ok(Chunk { data, ..chunk });
            }
        }
    }

    async fn chunk_of(&self, res: Response) -> Result<Chunk> {
        let next_offset = header(&res, NEXT_OFFSET)
            .ok_or_else(|| Error::Protocol("a read answered without Stream-Next-Offset".into()))?;
        let up_to_date = header(&res, UP_TO_DATE).is_some_and(|v| v.eq_ignore_ascii_case("true"));
        let closed = header(&res, CLOSED).is_some_and(|v| v.eq_ignore_ascii_case("true"));
        let json = is_json(header(&res, "content-type").as_deref());
        let data = res.bytes().await.map_err(|e| self.transport(e))?;
        Ok(Chunk { data, next_offset, up_to_date, closed, json })
    }

    /// A live reader of `path` from `options.offset`.
    pub fn tail(&self, path: &str, options: TailOptions) -> Result<Tail> {
        Ok(Tail {
            client: self.clone(),
            path: stream_path(path)?,
            offset: options.offset.clone(),
            cursor: None,
            caught_up: false,
            json: false,
            done: false,
            sse: None,
            failures: 0,
            options,
        })
    }
}

fn info_of(res: &Response) -> StreamInfo {
    StreamInfo {
        content_type: header(res, "content-type"),
        next_offset: header(res, NEXT_OFFSET).unwrap_or_default(),
        closed: header(res, CLOSED).is_some_and(|v| v.eq_ignore_ascii_case("true")),
    }
}

/// Extra headers of an append.
#[derive(Debug, Clone, Default)]
pub struct AppendOptions {
    /// `Stream-Seq`: the writer's own ordering token.
    pub seq: Option<String>,
    /// `(Producer-Id, Producer-Epoch, Producer-Seq)`.
    pub producer: Option<(String, u64, u64)>,
    /// `Stream-Closed: true`.
    pub close: bool,
}

/// How a live read waits for new data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LiveMode {
    #[default]
    LongPoll,
    Sse,
}

/// How a [`Tail`] reads.
#[derive(Debug, Clone)]
pub struct TailOptions {
    /// Where to start: `-1`, `now`, or an offset a previous read returned.
    pub offset: String,
    pub live: LiveMode,
    /// End once caught up, instead of waiting for more.
    pub stop_when_up_to_date: bool,
    /// The first wait after a failed connection; it doubles up to `max_backoff`.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Give up after this many failures in a row (`None`: never).
    pub max_retries: Option<u32>,
}

impl Default for TailOptions {
    fn default() -> TailOptions {
        TailOptions {
            offset: START.to_owned(),
            live: LiveMode::LongPoll,
            stop_when_up_to_date: false,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            max_retries: None,
        }
    }
}

impl TailOptions {
    pub fn from_offset(offset: impl Into<String>) -> TailOptions {
        TailOptions { offset: offset.into(), ..TailOptions::default() }
    }
    pub fn live(mut self, live: LiveMode) -> TailOptions {
        self.live = live;
        self
    }
    pub fn catch_up_only(mut self) -> TailOptions {
        self.stop_when_up_to_date = true;
        self
    }
}

/// A live reader. It first catches up with plain reads, then waits for new
/// data by long-poll or SSE. Every chunk it yields carries the offset to resume
/// from; after a broken connection or a server restart it reconnects from the
/// last offset it yielded, so nothing is skipped or repeated.
pub struct Tail {
    client: RuntimeServerClient,
    path: String,
    offset: String,
    cursor: Option<String>,
    caught_up: bool,
    /// Whether the stream is JSON (learned from the catch-up reads).
    json: bool,
    done: bool,
    sse: Option<SseConnection>,
    failures: u32,
    options: TailOptions,
}

impl Tail {
    /// The offset the next read starts from (save it to resume later).
    pub fn offset(&self) -> &str {
        &self.offset
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    /// The next chunk; `None` once the stream is closed and read to its end
    /// (or caught up, with `stop_when_up_to_date`).
    pub async fn next(&mut self) -> Option<Result<Chunk>> {
        loop {
            if self.done {
                return None;
            }
            match self.step().await {
                Ok(Some(chunk)) => {
                    self.failures = 0;
                    self.offset = chunk.next_offset.clone();
                    if chunk.closed || (chunk.up_to_date && self.options.stop_when_up_to_date) {
                        self.done = true;
                    }
                    return Some(Ok(chunk));
                }
                Ok(None) => {
                    self.failures = 0;
                }
                Err(err) if err.is_transient() => {
                    self.sse = None;
                    self.failures += 1;
                    if self.options.max_retries.is_some_and(|max| self.failures > max) {
                        self.done = true;
                        return Some(Err(err));
                    }
                    let exp = self.failures.saturating_sub(1).min(16);
                    let wait = self.options.initial_backoff.saturating_mul(1 << exp).min(self.options.max_backoff);
                    tracing::debug!(path = %self.path, offset = %self.offset, %err, ?wait, "tail reconnecting");
                    tokio::time::sleep(wait).await;
                }
                Err(err) => {
                    self.done = true;
                    return Some(Err(err));
                }
            }
        }
    }

    /// The chunks as a `Stream`.
    pub fn into_stream(self) -> impl Stream<Item = Result<Chunk>> {
        futures::stream::unfold(self, |mut tail| async move { tail.next().await.map(|item| (item, tail)) })
    }

    /// One request's worth: `Ok(None)` when it ended without news (a long-poll timeout, an SSE reconnect).
    async fn step(&mut self) -> Result<Option<Chunk>> {
        if !self.caught_up {
            let chunk = self.client.read_stream(&self.path, &self.offset).await?;
            self.json = chunk.json;
            if chunk.up_to_date || chunk.closed {
                self.caught_up = true;
            }
            return Ok(Some(chunk));
        }
        match self.options.live {
            LiveMode::LongPoll => self.long_poll().await,
            LiveMode::Sse => self.sse_step().await,
        }
    }

    async fn long_poll(&mut self) -> Result<Option<Chunk>> {
        let mut rb = self
            .client
            .request(Method::GET, &self.path)
            .query(&[("offset", self.offset.as_str()), ("live", "long-poll")]);
        if let Some(c) = &self.cursor {
            rb = rb.query(&[("cursor", c.as_str())]);
        }
        let res = rb.send().await.map_err(|e| self.client.transport(e))?;
        if let Some(c) = header(&res, CURSOR) {
            self.cursor = Some(c);
        }
        match res.status() {
            StatusCode::NO_CONTENT => {
                let closed = header(&res, CLOSED).is_some_and(|v| v.eq_ignore_ascii_case("true"));
                if closed {
                    let next_offset = header(&res, NEXT_OFFSET).unwrap_or_else(|| self.offset.clone());
                    return Ok(Some(Chunk {
                        data: Bytes::new(),
                        next_offset,
                        up_to_date: true,
                        closed,
                        json: self.json,
                    }));
                }
                Ok(None)
            }
            s if s.is_success() => self.client.chunk_of(res).await.map(Some),
            _ => Err(api_error(&Method::GET, &self.path, res).await),
        }
    }

    async fn sse_step(&mut self) -> Result<Option<Chunk>> {
        if self.sse.is_none() {
            let mut rb = self
                .client
                .request(Method::GET, &self.path)
                .query(&[("offset", self.offset.as_str()), ("live", "sse")]);
            if let Some(c) = &self.cursor {
                rb = rb.query(&[("cursor", c.as_str())]);
            }
            let res = rb.send().await.map_err(|e| self.client.transport(e))?;
            if !res.status().is_success() {
                return Err(api_error(&Method::GET, &self.path, res).await);
            }
            let base64 = header(&res, SSE_DATA_ENCODING).is_some_and(|v| v.eq_ignore_ascii_case("base64"));
            // A JSON stream's data events are JSON array text; the SSE answer
            // itself is text/event-stream, so the catch-up said which it is.
            self.sse = Some(SseConnection {
                body: Box::pin(res.bytes_stream()),
                parser: SseParser::default(),
                base64,
                json: self.json,
                pending: BytesMut::new(),
                json_items: Vec::new(),
            });
        }
        let Some(conn) = self.sse.as_mut() else { return Ok(None) };
        loop {
            while let Some(event) = conn.parser.next_event() {
                match event.name.as_str() {
                    "data" => conn.take_data(&event.data)?,
                    "control" => {
                        let control: Value = serde_json::from_str(&event.data)
                            .map_err(|e| Error::Protocol(format!("an SSE control event is not JSON: {e}")))?;
                        let next_offset = control
                            .get("streamNextOffset")
                            .and_then(Value::as_str)
                            .ok_or_else(|| Error::Protocol("an SSE control event has no streamNextOffset".into()))?
                            .to_owned();
                        if let Some(c) = control.get("streamCursor").and_then(Value::as_str) {
                            self.cursor = Some(c.to_owned());
                        }
                        let closed = control.get("streamClosed").and_then(Value::as_bool).unwrap_or(false);
                        let up_to_date = closed || control.get("upToDate").and_then(Value::as_bool).unwrap_or(false);
                        let (data, json) = conn.take_pending()?;
                        if data.is_empty() && !closed && next_offset == self.offset {
                            continue;
                        }
                        if closed {
                            self.sse = None;
                        }
                        return Ok(Some(Chunk { data, next_offset, up_to_date, closed, json }));
                    }
                    _ => {}
                }
            }
            match conn.body.next().await {
                Some(Ok(bytes)) => conn.parser.push(&bytes),
                Some(Err(e)) => {
                    self.sse = None;
                    return Err(self.client.transport(e));
                }
                None => {
                    // The server ends SSE answers now and then; data after the last
                    // control event is dropped and read again from the saved offset.
                    self.sse = None;
                    return Ok(None);
                }
            }
        }
    }
}

type ByteStream = std::pin::Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>;

struct SseConnection {
    body: ByteStream,
    parser: SseParser,
    base64: bool,
    json: bool,
    /// Data received since the last control event (bytes streams).
    pending: BytesMut,
    /// Messages received since the last control event (JSON streams).
    json_items: Vec<Value>,
}

impl SseConnection {
    fn take_data(&mut self, data: &str) -> Result<()> {
        if self.base64 {
            let compact: String = data.chars().filter(|c| *c != '\n' && *c != '\r').collect();
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(compact)
                .map_err(|e| Error::Protocol(format!("an SSE data event is not base64: {e}")))?;
            self.pending.extend_from_slice(&bytes);
            return Ok(());
        }
        if !self.json {
            self.pending.extend_from_slice(data.as_bytes());
            return Ok(());
        }
        match serde_json::from_str::<Value>(data)
            .map_err(|e| Error::Protocol(format!("an SSE data event of a JSON stream is not JSON: {e}")))?
        {
            Value::Array(items) => self.json_items.extend(items),
            other => self.json_items.push(other),
        }
        Ok(())
    }

    fn take_pending(&mut self) -> Result<(Bytes, bool)> {
        if self.json {
            if self.json_items.is_empty() {
                return Ok((Bytes::new(), true));
            }
            let items = std::mem::take(&mut self.json_items);
            let bytes = serde_json::to_vec(&items).map_err(|e| Error::Protocol(e.to_string()))?;
            return Ok((Bytes::from(bytes), true));
        }
        Ok((self.pending.split().freeze(), false))
    }
}

/// One Server-Sent Event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SseEvent {
    pub name: String,
    pub data: String,
}

/// An incremental `text/event-stream` parser (the WHATWG rules for the fields attache uses).
#[derive(Debug, Default)]
pub(crate) struct SseParser {
    buf: Vec<u8>,
    name: Option<String>,
    data: Vec<String>,
}

impl SseParser {
    pub(crate) fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    pub(crate) fn next_event(&mut self) -> Option<SseEvent> {
        while let Some(nl) = self.buf.iter().position(|b| *b == b'\n') {
            let mut line: Vec<u8> = self.buf.drain(..=nl).collect();
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            let line = String::from_utf8_lossy(&line).into_owned();
            if line.is_empty() {
                if self.data.is_empty() && self.name.is_none() {
                    continue;
                }
                let event = SseEvent {
                    name: self.name.take().unwrap_or_else(|| "message".to_owned()),
                    data: std::mem::take(&mut self.data).join("\n"),
                };
                return Some(event);
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((f, v)) => (f.to_owned(), v.strip_prefix(' ').unwrap_or(v).to_owned()),
                None => (line.clone(), String::new()),
            };
            match field.as_str() {
                "event" => self.name = Some(value),
                "data" => self.data.push(value),
                _ => {}
            }
        }
        None
    }
}

/// An idempotent producer (PROTOCOL.md §5.2.1): appends carry
/// `(Producer-Id, Producer-Epoch, Producer-Seq)`, so a retried append is
/// written once. A broken connection is retried with the same sequence number.
pub struct IdempotentProducer {
    client: RuntimeServerClient,
    path: String,
    content_type: String,
    id: String,
    epoch: u64,
    next_seq: u64,
    /// On a stale epoch, take over with the server's epoch + 1 (for producers that keep no state).
    pub auto_claim: bool,
    pub max_retries: u32,
}

impl IdempotentProducer {
    pub fn new(
        client: &RuntimeServerClient,
        path: &str,
        content_type: &str,
        producer_id: &str,
        epoch: u64,
    ) -> Result<IdempotentProducer> {
        if producer_id.is_empty() {
            return Err(Error::Invalid("a producer id must not be empty".into()));
        }
        Ok(IdempotentProducer {
            client: client.clone(),
            path: stream_path(path)?,
            content_type: content_type.to_owned(),
            id: producer_id.to_owned(),
            epoch,
            next_seq: 0,
            auto_claim: false,
            max_retries: 5,
        })
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The sequence number the next append will carry.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Appends `body` exactly once.
    pub async fn append(&mut self, body: impl Into<Bytes>) -> Result<Appended> {
        self.send(body.into(), false).await
    }

    /// Appends `body` (may be empty) and closes the stream, exactly once.
    pub async fn close(&mut self, body: impl Into<Bytes>) -> Result<Appended> {
        self.send(body.into(), true).await
    }

    async fn send(&mut self, body: Bytes, close: bool) -> Result<Appended> {
        let mut failures = 0;
        let mut claimed = false;
        loop {
            match self.attempt(&body, close).await {
                Ok(appended) => {
                    self.next_seq += 1;
                    return Ok(appended);
                }
                Err((err, _)) if err.is_transient() && failures < self.max_retries => {
                    failures += 1;
                    tokio::time::sleep(Duration::from_millis(50u64 << failures.min(6))).await;
                }
                Err((err, Some(current)))
                    if err.code() == Some(&ErrorCode::StaleEpoch) && self.auto_claim && !claimed =>
                {
                    self.epoch = current + 1;
                    self.next_seq = 0;
                    claimed = true;
                }
                Err((err, _)) => return Err(err),
            }
        }
    }

    /// One request; a failure carries the server's epoch when it named one (stale epoch).
    async fn attempt(&self, body: &Bytes, close: bool) -> std::result::Result<Appended, (Error, Option<u64>)> {
        let ct = content_type_header(&self.content_type).map_err(|e| (e, None))?;
        let mut rb = self
            .client
            .request(Method::POST, &self.path)
            .header("content-type", ct)
            .header("producer-id", self.id.as_str())
            .header("producer-epoch", self.epoch.to_string())
            .header("producer-seq", self.next_seq.to_string());
        if close {
            rb = rb.header(CLOSED, "true");
        }
        let res = rb.body(body.clone()).send().await.map_err(|e| (self.client.transport(e), None))?;
        if res.status().is_success() {
            return Ok(Appended {
                next_offset: header(&res, NEXT_OFFSET).unwrap_or_default(),
                closed: header(&res, CLOSED).is_some_and(|v| v.eq_ignore_ascii_case("true")),
                duplicate: res.status() == StatusCode::NO_CONTENT,
            });
        }
        let server_epoch = header(&res, "producer-epoch").and_then(|e| e.parse().ok());
        Err((api_error(&Method::POST, &self.path, res).await, server_epoch))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_events_are_split_on_blank_lines_and_joined_by_newlines() {
        let mut p = SseParser::default();
        p.push(b"event: data\ndata:[1,\ndata:2]\n\nevent: control\r\ndata:{\"streamNextOffset\":\"x\"}\r\n");
        assert_eq!(p.next_event(), Some(SseEvent { name: "data".into(), data: "[1,\n2]".into() }));
        assert_eq!(p.next_event(), None, "an event is not complete before its blank line");
        p.push(b"\r\n: a comment\n\n");
        assert_eq!(p.next_event().map(|e| e.name), Some("control".into()));
        assert_eq!(p.next_event(), None);
    }

    #[test]
    fn json_chunks_yield_their_messages() {
        let chunk = Chunk {
            data: Bytes::from_static(b"[{\"a\":1},2]"),
            next_offset: "o".into(),
            up_to_date: true,
            closed: false,
            json: true,
        };
        assert_eq!(chunk.json_items().unwrap().len(), 2);
        let empty = Chunk { data: Bytes::new(), ..chunk };
        assert!(empty.json_items().unwrap().is_empty());
    }
}

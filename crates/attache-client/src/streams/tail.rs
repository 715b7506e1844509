//! [`Tail`]: a live reader that catches up with plain reads, then waits by
//! long-poll or SSE, and reconnects from the last offset it yielded.

use std::time::Duration;

use base64::Engine;
use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};
use reqwest::{Method, StatusCode};
use serde_json::Value;

use super::sse::SseParser;
use super::{stream_path, Chunk, CLOSED, CURSOR, NEXT_OFFSET, SSE_DATA_ENCODING, START};
use crate::error::{Error, Result};
use crate::transport::{api_error, header, RuntimeServerClient};

impl RuntimeServerClient {
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

    /// A live read from the current offset (`live` is `long-poll` or `sse`),
    /// carrying the cursor the server last gave.
    async fn live_read(&mut self, live: &str) -> Result<reqwest::Response> {
        let mut rb =
            self.client.request(Method::GET, &self.path).query(&[("offset", self.offset.as_str()), ("live", live)]);
        if let Some(c) = &self.cursor {
            rb = rb.query(&[("cursor", c.as_str())]);
        }
        rb.send().await.map_err(|e| self.client.transport(e))
    }

    async fn long_poll(&mut self) -> Result<Option<Chunk>> {
        let res = self.live_read("long-poll").await?;
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
            let res = self.live_read("sse").await?;
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

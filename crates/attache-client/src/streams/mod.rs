//! The Durable Streams client (PROTOCOL.md): create, append, close, read,
//! delete (here), and [`Tail`], a live reader by long-poll or SSE that
//! resumes from the last offset it delivered after a disconnect (`tail`,
//! with the SSE parser in `sse`); plus [`IdempotentProducer`] (`producer`).

mod producer;
mod sse;
mod tail;

pub use producer::IdempotentProducer;
pub use tail::{LiveMode, Tail, TailOptions};

use attache_core::StreamPath;
use bytes::{Bytes, BytesMut};
use reqwest::{Method, Response, StatusCode};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::transport::{content_type_header, header, RuntimeServerClient};

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
    pub async fn append_json<T: serde::Serialize + ?Sized>(&self, path: &str, value: &T) -> Result<Appended> {
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

#[cfg(test)]
mod tests {
    use super::*;

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

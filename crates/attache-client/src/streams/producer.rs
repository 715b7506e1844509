//! [`IdempotentProducer`]: appends carrying producer id, epoch and sequence,
//! so a retried append is written once.

use std::time::Duration;

use bytes::Bytes;
use reqwest::{Method, StatusCode};

use super::{stream_path, Appended, CLOSED, NEXT_OFFSET};
use crate::error::{Error, ErrorCode, Result};
use crate::transport::{api_error, content_type_header, header, RuntimeServerClient};

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

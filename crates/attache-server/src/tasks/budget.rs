//! The bytes one response may carry (`rpc_max_response_bytes`): one budget
//! per JSON-RPC request or batch, MCP tool call or WebSocket `execute`.
//! Every answer counts whole, as the JSON text it is sent as: attachment
//! values are taken as each is loaded and `task.list` takes each row as it
//! is written, so an answer over the limit is refused (or, for `task.list`,
//! cut short) before it is built; what else an answer holds (one task's
//! record at most) is taken once it is built ([`ResponseBudget::counted`]).
//! An answer is kept as text from then on ([`Answer`]), so a batch holds
//! about the limit of answers, not a tree of values several times larger.
//!
//! The same counting takes from the process's budget of answers not yet
//! sent (`--response-buffer-bytes`, [`SendBudget`], and the caller's share
//! of it) once an answer reaches [`SEND_BUDGET_FROM`]: a read whose answer
//! would pass it is refused as it is built ([`SendBudget::exhausted`]), a
//! write's answer is taken whatever is held. Before, the budget was looked
//! at before a call ran and taken once its answer was made, so calls that
//! came together all passed the look and each then held an answer: 60
//! calls of 15 MiB answers from clients that read nothing held 900 MB
//! against a budget of 64 MiB.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use attache_core::manifest::ManifestEntry;
use attache_core::PrincipalKey;
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::Value;

use super::{ApiError, ApiResult};
use crate::http::{SendBudget, SendPermit, SEND_BUDGET_FROM};

/// One call's answer, as the JSON text it is sent as.
pub type Answer = Box<RawValue>;

/// What one response may still carry.
#[derive(Debug)]
pub struct ResponseBudget {
    limit: u64,
    used: AtomicU64,
    /// What the answer holds of the process's [`SendBudget`], grown as it is
    /// counted (nothing until it reaches [`SEND_BUDGET_FROM`]); `None` for a
    /// budget that counts this response alone.
    held: Option<parking_lot::Mutex<SendPermit>>,
}

impl ResponseBudget {
    /// A budget of `limit` bytes for one response, counted against nothing else.
    pub fn new(limit: u64) -> ResponseBudget {
        ResponseBudget { limit, used: AtomicU64::new(0), held: None }
    }

    /// A budget of `limit` bytes for one response to `who`, whose bytes are
    /// also taken from `answers` (and `who`'s share of it) as they are counted.
    pub(crate) fn within(limit: u64, answers: &Arc<SendBudget>, who: &PrincipalKey) -> ResponseBudget {
        ResponseBudget {
            limit,
            used: AtomicU64::new(0),
            held: Some(parking_lot::Mutex::new(SendPermit::empty(answers, who))),
        }
    }

    /// What the response, once its text is `n` bytes, holds of the process's
    /// budget until it is sent: exactly `n` (the envelope a face wraps the
    /// answers in is taken whatever is held), or nothing below [`SEND_BUDGET_FROM`].
    pub(crate) fn into_permit(self, n: usize) -> Option<SendPermit> {
        self.held.and_then(|held| held.into_inner().settle(n))
    }

    /// Holds `used` bytes of the process's budget, the response's count so
    /// far: refused (taking nothing) past the budget or the caller's share
    /// unless `over`.
    fn hold(&self, used: u64, over: bool) -> ApiResult<()> {
        let Some(held) = &self.held else { return Ok(()) };
        let used = usize::try_from(used).unwrap_or(usize::MAX);
        if used < SEND_BUDGET_FROM {
            return Ok(());
        }
        let mut permit = held.lock();
        let more = used.saturating_sub(permit.bytes());
        match (more, over) {
            (0, _) => Ok(()),
            (more, true) => {
                permit.grow_over(more);
                Ok(())
            }
            // 503 `RESPONSE_BUDGET_EXHAUSTED`; the JSON-RPC faces answer it as
            // error -32600 naming `response_buffer_bytes` (`rpc::error_object`).
            (more, false) => permit.try_grow(more).map_err(|_| permit.budget().exhausted()),
        }
    }

    /// Takes the bytes of `e`'s value, or refuses (taking nothing) when the
    /// response would pass the limit. What a call took stays taken even if
    /// the call then fails: each value is loaded at most once per answer, and
    /// once the budget is spent a later call fails at its first value.
    pub(super) fn take(&self, e: &ManifestEntry) -> ApiResult<()> {
        self.take_all(0, std::iter::once(e))
    }

    /// Takes `besides` and the bytes of all of `entries`' values together,
    /// or refuses taking none of them: what a claim carries of the task it
    /// claims (its row, its attachments).
    pub(super) fn take_all<'e>(&self, besides: u64, entries: impl Iterator<Item = &'e ManifestEntry>) -> ApiResult<()> {
        self.take_bytes(entries.map(value_bytes).fold(besides, u64::saturating_add))
    }

    /// Takes `n` bytes, or refuses taking none.
    /// Refused past the limit, or past what the process's budget (or the
    /// caller's share of it) has left.
    pub(super) fn take_bytes(&self, n: u64) -> ApiResult<()> {
        let limit = self.limit;
        let before = self
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| used.checked_add(n).filter(|t| *t <= limit))
            .map_err(|_| ApiError::ResponseTooLarge { limit })?;
        self.hold(before + n, false).inspect_err(|_| {
            self.used.fetch_sub(n, Ordering::Relaxed);
        })
    }

    fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Takes `n` bytes even past the limit: what a call that changed
    /// something answers is counted, never refused once it is written.
    fn take_over(&self, n: u64) {
        // `fetch_update` with a closure that always answers cannot fail.
        let before = self.used.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| Some(used.saturating_add(n)));
        let before = before.unwrap_or_else(|used| used);
        // Taken whatever is held: a refusal here could only hide the change.
        let _ = self.hold(before.saturating_add(n), true);
    }

    /// Runs one call whose answer is built as a tree, then takes what the
    /// answer's text holds beyond what the call took while building it, and
    /// keeps the text. Such an answer is small or holds one task's record
    /// (bounded by `max_entity_data_bytes`) besides the attachment values it
    /// took as it loaded them, so building it before it is counted costs a
    /// bounded amount. A read (`writes` false) over the budget is refused; a
    /// write's answer is counted but not refused (its change is made; what it
    /// carries of a task, `task.create`'s metadata and `task.claim`'s task, it
    /// took before it wrote), so a batch passes the limit by at most one such
    /// answer. Calls of one budget run one after another (a batch is
    /// answered in order), so what was taken meanwhile is this call's.
    pub(super) async fn counted(
        &self,
        writes: bool,
        call: impl Future<Output = ApiResult<Value>>,
    ) -> ApiResult<Answer> {
        let before = self.used();
        let answer = serde_json::value::to_raw_value(&call.await?).map_err(ApiError::internal)?;
        let rest = (answer.get().len() as u64).saturating_sub(self.used().saturating_sub(before));
        match writes {
            false => self.take_bytes(rest)?,
            true => self.take_over(rest),
        }
        Ok(answer)
    }
}

/// The bytes `v` takes as JSON, counted without building the text.
pub(super) fn json_bytes(v: &impl Serialize) -> u64 {
    let mut count = Count(0);
    // Writing to a counter cannot fail; a value that could not be written counts as what was written.
    let _ = serde_json::to_writer(&mut count, v);
    count.0
}

/// The bytes an attachment's value or content takes as JSON, counted without building it.
fn value_bytes(e: &ManifestEntry) -> u64 {
    ["value", "content"].into_iter().filter_map(|field| e.ext.get(field)).map(json_bytes).sum()
}

struct Count(u64);

impl std::io::Write for Count {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;

    fn entry() -> ManifestEntry {
        ManifestEntry {
            key: ManifestEntry::row_key("a"),
            kind: "attachment".into(),
            id: "a".into(),
            stream_path: "/task/t/attachments/a".into(),
            status: attache_core::manifest::AttachmentStatus::Complete,
            subject: None,
            role: attache_core::manifest::Role::Output,
            mime_type: "text/plain".into(),
            filename: None,
            byte_length: None,
            sha256: None,
            created_at: "t".into(),
            created_by: None,
            error: None,
            meta: None,
            ext: serde_json::Map::new(),
        }
    }

    #[test]
    fn values_are_taken_until_the_next_would_pass_the_limit() {
        let budget = ResponseBudget::new(10);
        let mut entry = entry();
        entry.ext.insert("content".into(), Value::String("ab\n".into())); // 6 bytes as JSON: "ab\n"
        budget.take(&entry).unwrap();
        assert_eq!(budget.take(&entry), Err(ApiError::ResponseTooLarge { limit: 10 }));
        entry.ext.insert("content".into(), Value::String("ab".into())); // 4 bytes
        budget.take(&entry).unwrap();
        assert_eq!(budget.take(&entry), Err(ApiError::ResponseTooLarge { limit: 10 }), "10 taken: nothing more");
    }

    #[test]
    fn values_taken_together_are_taken_whole_or_not_at_all() {
        let budget = ResponseBudget::new(10);
        let mut entry = entry();
        entry.ext.insert("content".into(), Value::String("ab\n".into())); // 6 bytes as JSON
        let two = [entry.clone(), entry.clone()];
        assert_eq!(budget.take_all(0, two.iter()), Err(ApiError::ResponseTooLarge { limit: 10 }));
        budget.take_all(0, two[..1].iter()).unwrap();
        budget.take_all(4, std::iter::empty()).unwrap();
    }

    #[tokio::test]
    async fn an_answer_counts_whole_a_read_past_the_limit_is_refused_and_a_write_is_counted() {
        let ten = || async { Ok(Value::String("0123456789".into())) }; // 12 bytes as JSON
        let budget = ResponseBudget::new(20);
        assert_eq!(budget.counted(false, ten()).await.unwrap().get(), r#""0123456789""#);
        let refused = budget.counted(false, ten()).await;
        assert!(matches!(refused, Err(ApiError::ResponseTooLarge { limit: 20 })), "{refused:?}");
        budget.counted(true, ten()).await.unwrap();
        assert_eq!(budget.take_bytes(0), Err(ApiError::ResponseTooLarge { limit: 20 }), "24 taken: spent");
        // What a call took while it built its answer counts toward it, not twice.
        let budget = ResponseBudget::new(12);
        budget
            .counted(false, async { budget.take_bytes(10).map(|()| Value::String("0123456789".into())) })
            .await
            .unwrap();
    }
}

//! The bytes of attachment values one response may carry
//! (`rpc_max_response_bytes`): one budget per JSON-RPC request or batch,
//! MCP tool call or WebSocket `execute`, taken from as each value is loaded,
//! so an answer over it is refused before it is built.

use std::sync::atomic::{AtomicU64, Ordering};

use attache_core::manifest::ManifestEntry;

use super::{ApiError, ApiResult};

/// What one response may still carry of attachment values.
#[derive(Debug)]
pub struct ResponseBudget {
    limit: u64,
    used: AtomicU64,
}

impl ResponseBudget {
    pub fn new(limit: u64) -> ResponseBudget {
        ResponseBudget { limit, used: AtomicU64::new(0) }
    }

    /// Takes the bytes of `e`'s value, or refuses (taking nothing) when the
    /// response would pass the limit. What a call took stays taken even if
    /// the call then fails: each value is loaded at most once per answer, and
    /// once the budget is spent a later call fails at its first value.
    pub(super) fn take(&self, e: &ManifestEntry) -> ApiResult<()> {
        self.take_all(std::iter::once(e))
    }

    /// Takes the bytes of all of `entries`' values together, or refuses
    /// taking none of them: what a claim carries of the task it claims.
    pub(super) fn take_all<'e>(&self, entries: impl Iterator<Item = &'e ManifestEntry>) -> ApiResult<()> {
        let n = entries.map(value_bytes).fold(0u64, u64::saturating_add);
        let limit = self.limit;
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| used.checked_add(n).filter(|t| *t <= limit))
            .map(|_| ())
            .map_err(|_| ApiError::ResponseTooLarge { limit })
    }
}

/// The bytes an attachment's value or content takes as JSON, counted without building it.
fn value_bytes(e: &ManifestEntry) -> u64 {
    let mut count = Count(0);
    for field in ["value", "content"] {
        if let Some(v) = e.ext.get(field) {
            // Writing to a counter cannot fail; a value that could not be written counts as nothing here.
            let _ = serde_json::to_writer(&mut count, v);
        }
    }
    count.0
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
        assert_eq!(budget.take_all(two.iter()), Err(ApiError::ResponseTooLarge { limit: 10 }));
        budget.take_all(two[..1].iter()).unwrap();
        budget.take_all(std::iter::empty()).unwrap();
    }
}

//! The tail cache: the last bytes written to a stream someone follows (a
//! live reader waiting on it, or a cached entity view holding its change
//! signal), kept in memory by the writer as it commits them, so the readers
//! woken by an append are answered without the index or a segment file (and
//! without the blocking-thread hop those need).
//!
//! Bounded twice: at most [`TAIL_MAX`] bytes per stream are served (up to
//! twice that are held between compactions, which keeps trimming linear in
//! the bytes written), and all streams' caches together hold at most the
//! store's `tail_cache_bytes` (a stream whose cache would pass it has none).
//! Only streams with a subscriber to their change signal get one, and the writer's sweep drops the
//! cache of a stream idle for a few seconds (with its kept read).

use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;

use crate::model::{ReadBatch, StreamInfo};
use attache_core::Offset;

/// Most bytes of a stream's tail kept for its live readers.
pub(crate) const TAIL_MAX: usize = 64 << 10;

/// The newest bytes of one stream, exactly as they are in its segment file.
#[derive(Default)]
pub(crate) struct TailCache {
    /// The position of `bytes[0]`.
    start: u64,
    bytes: Vec<u8>,
    /// JSON: where each message in `bytes` starts, ascending.
    marks: Vec<u64>,
}

impl TailCache {
    fn end(&self) -> u64 {
        self.start + self.bytes.len() as u64
    }

    /// Bytes held (what counts against the budget).
    pub(crate) fn held(&self) -> usize {
        self.bytes.len()
    }

    /// Adds bytes written at `pos` (with their message starts, JSON). A
    /// write that does not continue the cache starts it over. Returns the
    /// change in bytes held.
    pub(crate) fn extend(&mut self, pos: u64, bytes: &[u8], marks: &[u64]) -> isize {
        let before = self.bytes.len() as isize;
        if pos != self.end() || self.bytes.is_empty() {
            self.start = pos;
            self.bytes.clear();
            self.marks.clear();
        }
        self.bytes.extend_from_slice(bytes);
        self.marks.extend_from_slice(marks);
        if self.bytes.len() > 2 * TAIL_MAX {
            // Keep the last TAIL_MAX bytes, from a message start (JSON).
            let want = self.end() - TAIL_MAX as u64;
            let cut = if self.marks.is_empty() {
                want
            } else {
                let i = self.marks.partition_point(|&m| m < want);
                let Some(&at) = self.marks.get(i) else {
                    // One message larger than the cache: nothing worth keeping.
                    *self = TailCache::default();
                    return -before;
                };
                self.marks.drain(..i);
                at
            };
            self.bytes.drain(..(cut - self.start) as usize);
            self.start = cut;
        }
        self.bytes.len() as isize - before
    }

    /// The read `[at, …)` of `info` (at most `max_bytes`, whole messages for
    /// JSON, at least one), when the cache holds it up to the tail `info`
    /// names; `None` sends the reader to the segment file.
    pub(crate) fn read(&self, info: &StreamInfo, at: u64, max_bytes: usize) -> Option<ReadBatch> {
        let tail = info.tail;
        if at < self.start || at >= tail || self.end() < tail || info.blob.is_some() {
            return None;
        }
        let json = info.is_json();
        let limit = at.saturating_add(max_bytes as u64);
        let hi = if !json {
            tail.min(limit)
        } else {
            // `at` must start a message; the read ends at the last message start within the
            // limit (or the tail), and always carries at least one message.
            let first = self.marks.binary_search(&at).ok()?;
            if limit >= tail {
                tail
            } else {
                let upto = self.marks.partition_point(|&m| m <= limit);
                match self.marks.get(first + 1..upto).and_then(<[u64]>::last) {
                    Some(&end) => end,
                    None => self.marks.get(first + 1).copied().filter(|&m| m < tail).unwrap_or(tail),
                }
            }
        };
        let from = (at - self.start) as usize;
        let to = (hi - self.start) as usize;
        let range = self.bytes.get(from..to)?;
        if !json {
            return Some(ReadBatch::new(info.clone(), Offset(at), Offset(hi), Bytes::copy_from_slice(range), false));
        }
        let mut out = Vec::with_capacity(range.len() + 1);
        out.push(b'[');
        out.extend_from_slice(range);
        match out.last_mut() {
            Some(last) if !range.is_empty() => *last = b']',
            _ => out.push(b']'),
        }
        // The messages' starts are known here, so whoever splits the read never scans it for them.
        let first = self.marks.partition_point(|&m| m < at);
        let end = self.marks.partition_point(|&m| m < hi);
        let starts =
            ReadBatch::starts_of(self.marks.get(first..end)?.iter().map(|&m| (m - at) as usize + 1), out.len());
        let mut batch = ReadBatch::new(info.clone(), Offset(at), Offset(hi), Bytes::from(out), true);
        batch.starts = starts;
        Some(batch)
    }
}

/// What all tail caches hold together, against the store's budget.
pub(crate) struct TailBudget {
    limit: usize,
    held: AtomicUsize,
}

impl TailBudget {
    pub(crate) fn new(limit: usize) -> TailBudget {
        TailBudget { limit, held: AtomicUsize::new(0) }
    }

    /// Records a change; `false` when the caches would hold more than the limit.
    pub(crate) fn change(&self, delta: isize) -> bool {
        if delta <= 0 {
            self.held.fetch_sub(delta.unsigned_abs(), Ordering::Relaxed);
            return true;
        }
        let add = delta.unsigned_abs();
        let now = self.held.fetch_add(add, Ordering::Relaxed) + add;
        now <= self.limit
    }

    #[cfg(test)]
    pub(crate) fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(tail: u64, json: bool) -> StreamInfo {
        StreamInfo::for_tests(tail, json)
    }

    /// JSON messages `m` (each followed by `,`) written from position `pos`: bytes and starts.
    fn messages(pos: u64, m: &[&str]) -> (Vec<u8>, Vec<u64>) {
        let mut bytes = Vec::new();
        let mut marks = Vec::new();
        for msg in m {
            marks.push(pos + bytes.len() as u64);
            bytes.extend_from_slice(msg.as_bytes());
            bytes.push(b',');
        }
        (bytes, marks)
    }

    #[test]
    fn json_reads_from_a_message_start_take_whole_messages_within_the_limit() {
        let mut cache = TailCache::default();
        let (b, m) = messages(10, &["1", "22", "333"]);
        cache.extend(10, &b, &m);
        let info = info(10 + b.len() as u64, true);
        assert_eq!(&cache.read(&info, 10, 1 << 20).unwrap().body[..], b"[1,22,333]");
        assert_eq!(&cache.read(&info, 12, 1 << 20).unwrap().body[..], b"[22,333]");
        // A limit inside the second message stops after the first; a zero limit still carries one.
        assert_eq!(&cache.read(&info, 10, 3).unwrap().body[..], b"[1]");
        assert_eq!(&cache.read(&info, 10, 0).unwrap().body[..], b"[1]");
        assert_eq!(cache.read(&info, 10, 3).unwrap().next, Offset(12));
        // Each read knows where its messages start, and says the same as a scan of its body.
        for at in [10, 12] {
            let batch = cache.read(&info, at, 1 << 20).unwrap();
            assert!(batch.starts.is_some());
            let scanned = ReadBatch { starts: None, ..batch.clone() };
            assert_eq!(batch.messages(), scanned.messages());
        }
        assert_eq!(cache.read(&info, 12, 1 << 20).unwrap().messages(), ["22", "333"]);
        // Not a message start, before the cache, or a tail the cache does not reach: not served here.
        assert!(cache.read(&info, 11, 1 << 20).is_none());
        assert!(cache.read(&info, 9, 1 << 20).is_none());
        assert!(cache.read(&self::info(info.tail + 4, true), 10, 1 << 20).is_none());
    }

    #[test]
    fn a_read_stops_at_the_tail_its_caller_saw_even_when_the_cache_has_more() {
        let mut cache = TailCache::default();
        let (b, m) = messages(0, &["1", "22"]);
        cache.extend(0, &b, &m);
        let batch = cache.read(&info(2, true), 0, 1 << 20).unwrap();
        assert_eq!((&batch.body[..], batch.next), (&b"[1]"[..], Offset(2)));
        let mut bin = TailCache::default();
        bin.extend(5, b"abcdef", &[]);
        let batch = bin.read(&info(9, false), 6, 2).unwrap();
        assert_eq!((&batch.body[..], batch.next), (&b"bc"[..], Offset(8)));
    }

    #[test]
    fn the_cache_stays_bounded_and_keeps_its_newest_bytes_from_a_message_start() {
        let mut cache = TailCache::default();
        let msg = "x".repeat(999);
        let mut pos = 0;
        let mut held = 0isize;
        for _ in 0..1000 {
            let (b, m) = messages(pos, &[&msg]);
            held += cache.extend(pos, &b, &m);
            pos += b.len() as u64;
            assert!(cache.held() <= 2 * TAIL_MAX);
            assert_eq!(held, cache.held() as isize);
        }
        assert!(cache.held() >= TAIL_MAX);
        let info = info(pos, true);
        let from = cache.start;
        let batch = cache.read(&info, from, 1 << 20).unwrap();
        assert_eq!(batch.messages().len() as u64, (pos - from) / 1000);
        // A write that does not continue the cache starts it over.
        let (b, m) = messages(pos + 7, &["1"]);
        cache.extend(pos + 7, &b, &m);
        assert_eq!(cache.held(), 2);
    }

    #[test]
    fn the_budget_refuses_growth_past_its_limit_and_takes_back_what_is_freed() {
        let budget = TailBudget::new(100);
        assert!(budget.change(60));
        assert!(!budget.change(60));
        assert!(budget.change(-60));
        assert!(budget.change(-60));
        assert_eq!(budget.held(), 0);
    }
}

//! `append_in_order` over PostgreSQL: a per-stream FIFO in this process.
//!
//! The writer task commits its channel in order (batches in turn, each in
//! its order; a batch that meets another instance's is rolled back and run
//! again whole, in the same order), so an append's place is fixed once it is
//! in the channel. A call for a stream this instance knows puts it there
//! before it returns. A call for a stream it has not heard of yet (created
//! by another instance a moment ago) must look it up in the database first,
//! so it cannot; it takes a *turn* in its stream's line instead: it waits for
//! the call before it (if any) to reach the channel, and every call after
//! it, even one that could go at once, waits for it in turn. Only streams
//! with such a call in progress have a line; the last turn out removes it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard};
use tokio::sync::oneshot;

/// The lines of streams whose calls wait for a lookup, by path: the newest turn of each.
#[derive(Default)]
pub(crate) struct Lines {
    last: Mutex<HashMap<String, Last>>,
    next_id: AtomicU64,
}

struct Last {
    id: u64,
    /// Fires (or is dropped) once that turn's append is in the writer's channel.
    sent: oneshot::Receiver<()>,
}

/// A call's place in its stream's line; dropping it (sent, refused, or the
/// task gone) lets the next call go and leaves the line if it is the last.
pub(crate) struct Turn {
    lines: Arc<Lines>,
    path: String,
    id: u64,
    sent: Option<oneshot::Sender<()>>,
}

impl Drop for Turn {
    fn drop(&mut self) {
        if let Some(sent) = self.sent.take() {
            let _ = sent.send(());
        }
        let mut last = self.lines.last.lock();
        if last.get(&self.path).is_some_and(|l| l.id == self.id) {
            last.remove(&self.path);
        }
    }
}

/// The lines, locked: one call decides its place while no other call can.
pub(crate) struct Locked<'a> {
    lines: &'a Arc<Lines>,
    last: MutexGuard<'a, HashMap<String, Last>>,
}

impl Lines {
    pub(crate) fn lock(self: &Arc<Self>) -> Locked<'_> {
        Locked { lines: self, last: self.last.lock() }
    }
}

impl Locked<'_> {
    /// Whether a call for `path` waits in a line (so the next one must too).
    pub(crate) fn has_line(&self, path: &str) -> bool {
        self.last.contains_key(path)
    }

    /// Takes the next turn in `path`'s line: the turn, and what to wait for before sending.
    pub(crate) fn take_turn(&mut self, path: &str) -> (Turn, Option<oneshot::Receiver<()>>) {
        let id = self.lines.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let before = self.last.insert(path.to_owned(), Last { id, sent: rx }).map(|l| l.sent);
        let turn = Turn { lines: self.lines.clone(), path: path.to_owned(), id, sent: Some(tx) };
        (turn, before)
    }
}

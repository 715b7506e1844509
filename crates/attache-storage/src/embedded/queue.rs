//! The writer's queue of commands: callers push under a short lock, and the
//! writer takes everything queued at once, one lock a batch.
//!
//! Why not `std::sync::mpsc` (issue 11, callgrind of appends): its list
//! channel allocates and zeroes a block of 31 slots (272 B each) every 31
//! messages and takes a second lock beside it, ~500 instructions an append
//! for what is a push onto a deque whose buffer stays. Order is the
//! channel's: first pushed, first committed (the store's ordering contract,
//! `StreamStore::append_in_order`).
//!
//! Bounded by its callers: every command is a request in flight, which the
//! server's connection, body and response budgets bound. Once closed (the
//! store closes, or the writer is gone) a push is refused, and what is still
//! queued when the writer goes is dropped, so each caller hears `ShuttingDown`
//! instead of waiting for an answer that cannot come.

use std::collections::VecDeque;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

/// A queue the writer empties slowly shrinks back: a burst of 100,000
/// queued appends does not keep its buffer for ever.
const KEEP_CAPACITY: usize = 4096;

pub(crate) struct CommandQueue<T> {
    state: Mutex<State<T>>,
    ready: Condvar,
}

struct State<T> {
    items: VecDeque<T>,
    closed: bool,
    /// The writer sleeps on `ready`: a push wakes it (and only then, so a
    /// busy writer costs its callers no wake-up).
    sleeping: bool,
}

impl<T> CommandQueue<T> {
    pub(crate) fn new() -> CommandQueue<T> {
        CommandQueue {
            state: Mutex::new(State { items: VecDeque::new(), closed: false, sleeping: false }),
            ready: Condvar::new(),
        }
    }

    /// Queues `item` behind every item pushed before it; gives it back once closed.
    pub(crate) fn push(&self, item: T) -> Result<(), T> {
        let mut state = self.state.lock();
        if state.closed {
            return Err(item);
        }
        state.items.push_back(item);
        let wake = std::mem::take(&mut state.sleeping);
        drop(state);
        if wake {
            self.ready.notify_one();
        }
        Ok(())
    }

    /// Refuses pushes from now on; the items queued are still taken.
    pub(crate) fn close(&self) {
        self.state.lock().closed = true;
        self.ready.notify_all();
    }

    /// Closes the queue and drops what it holds (the writer is gone).
    pub(crate) fn abandon(&self) {
        let items = {
            let mut state = self.state.lock();
            state.closed = true;
            std::mem::take(&mut state.items)
        };
        drop(items);
    }

    /// Waits up to `wait` for an item, then moves up to `max` of the queued
    /// items, in order, into `batch`. `false` once closed with nothing left.
    pub(crate) fn take(&self, batch: &mut Vec<T>, max: usize, wait: Duration) -> bool {
        let mut state = self.state.lock();
        if state.items.is_empty() && !state.closed {
            state.sleeping = true;
            let _ = self.ready.wait_for(&mut state, wait);
            state.sleeping = false;
        }
        if state.items.is_empty() {
            if state.items.capacity() > KEEP_CAPACITY {
                state.items.shrink_to(KEEP_CAPACITY);
            }
            return !state.closed;
        }
        let n = state.items.len().min(max.max(1));
        batch.extend(state.items.drain(..n));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn items_are_taken_in_the_order_they_were_pushed_at_most_max_at_a_time() {
        let q = CommandQueue::new();
        for i in 0..10 {
            q.push(i).unwrap();
        }
        let mut batch = Vec::new();
        assert!(q.take(&mut batch, 4, Duration::ZERO));
        assert_eq!(batch, [0, 1, 2, 3]);
        batch.clear();
        assert!(q.take(&mut batch, 100, Duration::ZERO));
        assert_eq!(batch, [4, 5, 6, 7, 8, 9]);
    }

    #[test]
    fn a_closed_queue_refuses_pushes_but_gives_up_what_it_holds() {
        let q = CommandQueue::new();
        q.push(1).unwrap();
        q.close();
        assert_eq!(q.push(2), Err(2));
        let mut batch = Vec::new();
        assert!(q.take(&mut batch, 10, Duration::ZERO));
        assert_eq!(batch, [1]);
        assert!(!q.take(&mut batch, 10, Duration::ZERO));
    }

    #[test]
    fn an_abandoned_queue_drops_what_it_holds() {
        let q = CommandQueue::new();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        q.push(tx).unwrap();
        q.abandon();
        assert!(rx.blocking_recv().is_err(), "the waiting caller hears the writer is gone");
        assert!(q.push(tokio::sync::oneshot::channel().0).is_err());
    }

    #[test]
    fn a_push_wakes_a_sleeping_taker() {
        let q = Arc::new(CommandQueue::new());
        let taker = {
            let q = q.clone();
            std::thread::spawn(move || {
                let mut batch = Vec::new();
                let started = std::time::Instant::now();
                while batch.is_empty() && started.elapsed() < Duration::from_secs(30) {
                    q.take(&mut batch, 10, Duration::from_secs(30));
                }
                batch
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        q.push(7).unwrap();
        assert_eq!(taker.join().unwrap(), [7]);
    }

    #[test]
    fn a_close_wakes_a_sleeping_taker() {
        let q: Arc<CommandQueue<u8>> = Arc::new(CommandQueue::new());
        let taker = {
            let q = q.clone();
            std::thread::spawn(move || q.take(&mut Vec::new(), 10, Duration::from_secs(30)))
        };
        std::thread::sleep(Duration::from_millis(50));
        q.close();
        assert!(!taker.join().unwrap());
    }
}

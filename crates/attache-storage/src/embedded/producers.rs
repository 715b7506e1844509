//! Idempotent producers' state (PROTOCOL.md §5.2.1), kept as long as the
//! stream lives, as the protocol asks of persistent stores, but not all of it
//! in memory: redb holds every producer, and the writer keeps those changed
//! since the last checkpoint plus at most `--store-producer-cache` others.
//!
//! Why: before, the writer held every (stream, `Producer-Id`) pair it had ever
//! seen, reloaded them all at start and never let one go. One client sending
//! a new `Producer-Id` with each append grew the server by ~155 B an append
//! (1.55 million appends in a minute: 19 MB to 261 MB, 278 MB after a
//! restart; session 16's attack pass). Evicting state instead would break
//! idempotence (a retry of an evicted producer would be taken as new data),
//! so only state redb already holds leaves memory, and a lookup that misses
//! reads redb.
//!
//! An entry is *dirty* from the batch that changes it until a checkpoint
//! covering that batch's log record has committed to redb (or at once, when
//! the batch commits to redb itself); only clean entries are evicted. A
//! failed batch's changes are taken back by re-reading their keys from the
//! state every acknowledged batch left ([`Producers::take_back_batch`]).

use std::collections::HashMap;

use attache_core::ProducerState;
use redb::{ReadableDatabase, ReadableTable};

use super::PRODUCERS;
use crate::error::StoreResult;

/// Where an entry's newest state is durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    /// Changed by the batch being applied: not acknowledged yet.
    InBatch,
    /// In the log record of this seq, not yet in redb.
    Logged(u64),
    /// In redb: a lookup that misses finds it there.
    Clean,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    state: ProducerState,
    held: Held,
}

/// The writer's producer state: a map over redb's `producers` table.
#[derive(Debug, Default)]
pub(crate) struct Producers {
    map: HashMap<(u64, String), Entry>,
    /// Keys the batch being applied changed.
    batch: Vec<(u64, String)>,
}

impl Producers {
    /// The state of `producer` on stream `id`: from memory, else from redb
    /// (kept in memory, clean, for the appends that follow).
    pub(crate) fn get(&mut self, db: &redb::Database, id: u64, producer: &str) -> StoreResult<Option<ProducerState>> {
        let key = (id, producer.to_owned());
        if let Some(e) = self.map.get(&key) {
            return Ok(Some(e.state));
        }
        let found = read(db, id, producer)?;
        if let Some(state) = found {
            self.map.insert(key, Entry { state, held: Held::Clean });
        }
        Ok(found)
    }

    /// As [`get`](Self::get), changing nothing (a check before a write).
    pub(crate) fn peek(&self, db: &redb::Database, id: u64, producer: &str) -> StoreResult<Option<ProducerState>> {
        match self.map.get(&(id, producer.to_owned())) {
            Some(e) => Ok(Some(e.state)),
            None => read(db, id, producer),
        }
    }

    /// The batch being applied sets `producer`'s state.
    pub(crate) fn set(&mut self, id: u64, producer: &str, state: ProducerState) {
        let key = (id, producer.to_owned());
        self.batch.push(key.clone());
        self.map.insert(key, Entry { state, held: Held::InBatch });
    }

    /// Stream `id` is gone: its producers with it (redb's go at the next checkpoint).
    pub(crate) fn forget_stream(&mut self, id: u64) {
        self.map.retain(|(sid, _), _| *sid != id);
        self.batch.retain(|(sid, _)| *sid != id);
    }

    /// The batch is durable: in the log record `seq`, or (`None`) in redb itself.
    pub(crate) fn batch_committed(&mut self, seq: Option<u64>) {
        let held = seq.map_or(Held::Clean, Held::Logged);
        for key in self.batch.drain(..) {
            if let Some(e) = self.map.get_mut(&key) {
                if e.held == Held::InBatch {
                    e.held = held;
                }
            }
        }
    }

    /// A checkpoint committed every log record up to `upto` to redb: their
    /// entries are clean, and clean ones past `keep` leave memory.
    pub(crate) fn checkpointed(&mut self, upto: u64, keep: usize) {
        let mut clean = 0;
        for e in self.map.values_mut() {
            if matches!(e.held, Held::Logged(seq) if seq <= upto) {
                e.held = Held::Clean;
            }
            clean += usize::from(e.held == Held::Clean);
        }
        let mut evict = clean.saturating_sub(keep);
        if evict > 0 {
            self.map.retain(|_, e| {
                let go = evict > 0 && e.held == Held::Clean;
                evict -= usize::from(go);
                !go
            });
        }
    }

    /// Entries redb does not hold yet (none of them may leave memory).
    #[cfg(test)]
    pub(crate) fn dirty(&self) -> usize {
        self.map.values().filter(|e| e.held != Held::Clean).count()
    }

    /// Entries in memory.
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    /// After a failed batch: its changes are taken back. Each key it changed
    /// gets the state every acknowledged batch left (`committed`: redb with
    /// the log's records since the last checkpoint applied), dirty until the
    /// checkpoint after log record `last_logged` (clean: `None`); everything
    /// else stays. On an error the keys not yet taken back stay marked, for
    /// the next try.
    pub(crate) fn take_back_batch(
        &mut self,
        last_logged: Option<u64>,
        committed: impl Fn(u64, &str) -> StoreResult<Option<ProducerState>>,
    ) -> StoreResult<()> {
        while let Some(key) = self.batch.last().cloned() {
            if self.map.get(&key).is_some_and(|e| e.held == Held::InBatch) {
                match committed(key.0, &key.1)? {
                    Some(state) => {
                        let held = last_logged.map_or(Held::Clean, Held::Logged);
                        self.map.insert(key, Entry { state, held });
                    }
                    None => {
                        self.map.remove(&key);
                    }
                }
            }
            self.batch.pop();
        }
        Ok(())
    }
}

/// A producer's state as redb has committed it.
pub(crate) fn read_committed(db: &redb::Database, id: u64, producer: &str) -> StoreResult<Option<ProducerState>> {
    read(db, id, producer)
}

fn read(db: &redb::Database, id: u64, producer: &str) -> StoreResult<Option<ProducerState>> {
    let txn = db.begin_read()?;
    let table = txn.open_table(PRODUCERS)?;
    Ok(table.get((id, producer))?.map(|v| {
        let (epoch, last_seq) = v.value();
        ProducerState { epoch, last_seq }
    }))
}

/// A producer's state as a table holds it (a write transaction's view in `reload`).
pub(crate) fn read_in(
    table: &impl ReadableTable<(u64, &'static str), (u64, u64)>,
    id: u64,
    producer: &str,
) -> StoreResult<Option<ProducerState>> {
    Ok(table.get((id, producer))?.map(|v| {
        let (epoch, last_seq) = v.value();
        ProducerState { epoch, last_seq }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(last_seq: u64) -> ProducerState {
        ProducerState { epoch: 0, last_seq }
    }

    #[test]
    fn only_state_a_checkpoint_wrote_leaves_memory() {
        let mut p = Producers::default();
        p.set(1, "a", state(0));
        p.set(1, "b", state(0));
        p.batch_committed(Some(7));
        p.set(1, "c", state(0));
        p.batch_committed(Some(8));
        // The checkpoint covers record 7 only: "c" stays whatever the bound.
        p.checkpointed(7, 0);
        assert_eq!((p.len(), p.dirty()), (1, 1));
        p.checkpointed(8, 0);
        assert_eq!(p.len(), 0);
    }

    #[test]
    fn a_failed_batch_gets_back_what_was_acknowledged() {
        let mut p = Producers::default();
        p.set(1, "a", state(4));
        p.batch_committed(Some(3));
        p.set(1, "a", state(5));
        p.set(1, "new", state(0));
        p.take_back_batch(Some(3), |_, name| Ok((name == "a").then(|| state(4)))).expect("the committed state reads");
        assert_eq!(p.map.get(&(1, "a".to_owned())).map(|e| (e.state, e.held)), Some((state(4), Held::Logged(3))));
        assert!(!p.map.contains_key(&(1, "new".to_owned())), "a producer the failed batch made is gone");
    }
}

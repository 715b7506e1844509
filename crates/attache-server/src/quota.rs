//! Creates in flight, counted to their principal's quotas until they commit.
//!
//! The quotas (`--max-streams-per-principal`, `--max-entities-per-principal`,
//! `--max-entity-data-bytes-per-principal`) are checked against what the
//! store and the registry hold, and a create is counted there only once it
//! has committed. Checked alone, every create of a burst saw the same count:
//! 1,000 concurrent spawns against a data quota with room for 16 made 465
//! entities (session 17's attack pass). So a check also counts what the
//! principal's creates still in flight will add, and takes its own share of
//! it under the same lock; the [`Reserved`] it returns gives it back when the
//! request ends, by which time the store or registry counts what was made.
//! Between the commit and the end of the request a create counts twice, which
//! only ever refuses a create early, never lets one past.
//!
//! One instance sees only its own creates: instances sharing PostgreSQL may
//! still pass a quota together by as many creates as they run at once.

use std::collections::HashMap;
use std::sync::Arc;

use crate::error::ApiResult;

/// What a principal's creates in flight will add.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pending {
    pub streams: usize,
    pub entities: usize,
    pub data_bytes: usize,
}

impl Pending {
    fn add(&mut self, other: Pending) {
        self.streams += other.streams;
        self.entities += other.entities;
        self.data_bytes += other.data_bytes;
    }

    fn sub(&mut self, other: Pending) {
        self.streams = self.streams.saturating_sub(other.streams);
        self.entities = self.entities.saturating_sub(other.entities);
        self.data_bytes = self.data_bytes.saturating_sub(other.data_bytes);
    }

    fn is_empty(&self) -> bool {
        *self == Pending::default()
    }
}

/// Creates in flight per principal (keyed as each quota names its
/// principal: the store by its key, the registry by its URL).
#[derive(Debug, Default)]
pub struct InFlight {
    held: parking_lot::Mutex<HashMap<String, Pending>>,
}

impl InFlight {
    /// Runs `check` with what `who`'s creates in flight will add, and when
    /// it passes, counts `adding` with them until the returned guard drops.
    pub fn reserve(
        self: &Arc<Self>,
        who: &str,
        adding: Pending,
        check: impl FnOnce(Pending) -> ApiResult<()>,
    ) -> ApiResult<Reserved> {
        let mut held = self.held.lock();
        check(held.get(who).copied().unwrap_or_default())?;
        if !adding.is_empty() {
            held.entry(who.to_owned()).or_default().add(adding);
        }
        Ok(Reserved { table: self.clone(), who: who.to_owned(), adding })
    }
}

/// A create's share of its principal's quotas, counted until it drops.
#[must_use = "a reservation counts only while it is held: keep it until the create has committed"]
#[derive(Debug)]
pub struct Reserved {
    table: Arc<InFlight>,
    who: String,
    adding: Pending,
}

impl Drop for Reserved {
    fn drop(&mut self) {
        if self.adding.is_empty() {
            return;
        }
        let mut held = self.table.held.lock();
        if let Some(pending) = held.get_mut(&self.who) {
            pending.sub(self.adding);
            if pending.is_empty() {
                held.remove(&self.who);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ApiError;

    #[test]
    fn a_reservation_is_seen_by_later_checks_until_it_drops() {
        let table = Arc::new(InFlight::default());
        let one = Pending { streams: 1, ..Pending::default() };
        let first = table.reserve("p", one, |p| {
            assert_eq!(p, Pending::default());
            Ok(())
        });
        let first = first.expect("room");
        let quota = |p: Pending| if p.streams >= 1 { Err(ApiError::bad_request("full")) } else { Ok(()) };
        assert!(table.reserve("p", one, quota).is_err(), "the first create in flight counts");
        assert!(table.reserve("q", one, quota).is_ok(), "another principal's does not");
        drop(first);
        assert!(table.reserve("p", one, quota).is_ok(), "given back when it drops");
    }
}

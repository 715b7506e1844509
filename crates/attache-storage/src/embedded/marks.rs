//! Message boundaries: where each JSON message (or binary append) of a
//! stream starts, and whether it ends the append that wrote it.
//!
//! Why runs and why in memory first (numbers in docs/ARCHITECTURE.md): a
//! row per boundary, inserted by every group commit, cost half of an
//! append's instructions (redb rebuilds a leaf page per insert). Now a group
//! commit only logs its boundaries and hands them to the stream's
//! [`Pending`] list, which readers consult; the checkpoint thread writes them
//! to redb as *runs* (one row holding up to [`RUN_MAX`] boundaries of one
//! stream, keyed by its first position) in the same durable commit that
//! frees the log holding them, and only then are they dropped from memory.
//! A reader consults both (redb and memory) and retries when a checkpoint
//! moved boundaries from one to the other while it looked (`Shared::marks_gen`).
//!
//! A boundary is packed into one `u64`: the position, with
//! [`super::ROW_ENDS_APPEND`] in the top bit.

use std::collections::VecDeque;

use redb::{ReadableTable, Table, TableDefinition};

use crate::error::StoreResult;

/// (stream id, first position of the run) → the run's boundaries, packed, little-endian.
pub(crate) const MARK_RUNS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("mark_runs");

/// Most boundaries one run row holds.
pub(crate) const RUN_MAX: usize = 1024;

const FLAG_BIT: u64 = 1 << 63;

/// A boundary packed with its flags.
pub(crate) fn pack(pos: u64, flags: u8) -> u64 {
    pos | if flags & super::ROW_ENDS_APPEND != 0 { FLAG_BIT } else { 0 }
}

/// (position, flags) of a packed boundary.
pub(crate) fn unpack(m: u64) -> (u64, u8) {
    (m & !FLAG_BIT, if m & FLAG_BIT != 0 { super::ROW_ENDS_APPEND } else { 0 })
}

fn pos_of(m: u64) -> u64 {
    m & !FLAG_BIT
}

/// Where boundaries are looked up: redb's runs, a stream's pending list, or both.
pub(crate) trait MarkIndex {
    /// The first boundary of stream `id` at or after `pos`: (position, flags).
    fn next_from(&self, id: u64, pos: u64) -> StoreResult<Option<(u64, u8)>>;
    /// The last boundary of stream `id` at or before `pos`.
    fn prev_upto(&self, id: u64, pos: u64) -> StoreResult<Option<(u64, u8)>>;
}

/// Whether a message starts at `pos`.
pub(crate) fn is_start(ix: &dyn MarkIndex, id: u64, pos: u64) -> StoreResult<bool> {
    Ok(ix.next_from(id, pos)?.is_some_and(|(p, _)| p == pos))
}

/// The first boundary in `[lo, hi)`.
pub(crate) fn first_in(ix: &dyn MarkIndex, id: u64, lo: u64, hi: u64) -> StoreResult<Option<u64>> {
    Ok(ix.next_from(id, lo)?.map(|(p, _)| p).filter(|&p| p < hi))
}

/// The last boundary in `[lo, hi]`.
pub(crate) fn last_in(ix: &dyn MarkIndex, id: u64, lo: u64, hi: u64) -> StoreResult<Option<u64>> {
    Ok(ix.prev_upto(id, hi)?.map(|(p, _)| p).filter(|&p| p >= lo))
}

/// The boundaries of stream `id` in `[lo, hi)`, each with its end (the next
/// boundary, or `end` for the last): `(start, end, flags)`. Lazy: a caller
/// that stops early (a fork's sub-offset stops at the end of one append)
/// looks up only what it takes.
pub(crate) fn between<'a>(
    ix: &'a dyn MarkIndex,
    id: u64,
    lo: u64,
    hi: u64,
    end: u64,
) -> impl Iterator<Item = StoreResult<(u64, u64, u8)>> + 'a {
    let mut current = Some(ix.next_from(id, lo));
    std::iter::from_fn(move || {
        let (pos, flags) = match current.take()? {
            Ok(Some((pos, flags))) if pos < hi => (pos, flags),
            Ok(_) => return None,
            Err(e) => return Some(Err(e)),
        };
        match ix.next_from(id, pos + 1) {
            Ok(following) => {
                let row_end = following.map_or(end, |(p, _)| p);
                current = Some(Ok(following));
                Some(Ok((pos, row_end, flags)))
            }
            Err(e) => Some(Err(e)),
        }
    })
}

/// Runs in a redb table (a read transaction's, or a write transaction's).
pub(crate) struct Runs<T>(pub(crate) T);

fn decode(bytes: &[u8]) -> impl Iterator<Item = u64> + '_ {
    bytes.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
}

fn nth(bytes: &[u8], i: usize) -> u64 {
    bytes.get(i * 8..i * 8 + 8).map_or(0, |c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
}

/// Index of the first packed boundary whose position is not `below(pos)`.
fn partition(bytes: &[u8], below: impl Fn(u64) -> bool) -> usize {
    let (mut lo, mut hi) = (0, bytes.len() / 8);
    while lo < hi {
        let mid = (lo + hi) / 2;
        if below(pos_of(nth(bytes, mid))) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo
}

impl<T: ReadableTable<(u64, u64), &'static [u8]>> MarkIndex for Runs<T> {
    fn next_from(&self, id: u64, pos: u64) -> StoreResult<Option<(u64, u8)>> {
        if let Some(row) = self.0.range((id, 0)..=(id, pos))?.next_back() {
            let (_, run) = row?;
            let run = run.value();
            let i = partition(run, |p| p < pos);
            if i < run.len() / 8 {
                return Ok(Some(unpack(nth(run, i))));
            }
        }
        if pos == u64::MAX {
            return Ok(None);
        }
        match self.0.range((id, pos + 1)..=(id, u64::MAX))?.next() {
            Some(row) => {
                let (_, run) = row?;
                let first = decode(run.value()).next().map(unpack);
                Ok(first)
            }
            None => Ok(None),
        }
    }

    fn prev_upto(&self, id: u64, pos: u64) -> StoreResult<Option<(u64, u8)>> {
        let Some(row) = self.0.range((id, 0)..=(id, pos))?.next_back() else { return Ok(None) };
        let (_, run) = row?;
        let run = run.value();
        let i = partition(run, |p| p <= pos);
        Ok(i.checked_sub(1).map(|i| unpack(nth(run, i))))
    }
}

/// Writes `marks` (packed, ascending) of stream `id` as runs of at most [`RUN_MAX`].
///
/// Runs of a stream never overlap: the lookups above read only the run
/// with the greatest first position at or before where they look. The same
/// records can reach redb twice from different starting points (a replay at
/// start, a reload or a reopen applies both log files in one commit; the
/// checkpoint after it applies the sealed file alone, then the active one),
/// so runs already holding a position in `marks`' span are merged with them
/// and written again. A checkpoint that only adds later boundaries finds none.
pub(crate) fn put_runs(table: &mut Table<(u64, u64), &[u8]>, id: u64, marks: &[u64]) -> StoreResult<()> {
    let (Some(&first), Some(&last)) = (marks.first(), marks.last()) else { return Ok(()) };
    let (lo, hi) = (pos_of(first), pos_of(last));
    let mut overlapped: Vec<(u64, Vec<u8>)> = Vec::new();
    if let Some(row) = table.range((id, 0)..(id, lo))?.next_back() {
        let (k, run) = row?;
        let run = run.value();
        if run.len() >= 8 && pos_of(nth(run, run.len() / 8 - 1)) >= lo {
            overlapped.push((k.value().1, run.to_vec()));
        }
    }
    for row in table.range((id, lo)..=(id, hi))? {
        let (k, run) = row?;
        overlapped.push((k.value().1, run.value().to_vec()));
    }
    if overlapped.is_empty() {
        return write_runs(table, id, marks);
    }
    // Position → packed boundary; `marks` win over what was there.
    let mut merged: std::collections::BTreeMap<u64, u64> = std::collections::BTreeMap::new();
    for (key, run) in &overlapped {
        table.remove((id, *key))?;
        merged.extend(decode(run).map(|m| (pos_of(m), m)));
    }
    merged.extend(marks.iter().map(|&m| (pos_of(m), m)));
    let merged: Vec<u64> = merged.into_values().collect();
    write_runs(table, id, &merged)
}

/// Writes `marks` (packed, ascending, overlapping no run) as runs of at most [`RUN_MAX`].
fn write_runs(table: &mut Table<(u64, u64), &[u8]>, id: u64, marks: &[u64]) -> StoreResult<()> {
    let mut buf = Vec::with_capacity(marks.len().min(RUN_MAX) * 8);
    for run in marks.chunks(RUN_MAX) {
        buf.clear();
        for m in run {
            buf.extend_from_slice(&m.to_le_bytes());
        }
        table.insert((id, pos_of(run[0])), buf.as_slice())?;
    }
    Ok(())
}

/// Drops every boundary of stream `id` at or after `from` (a run holding
/// `from` is cut, later runs go).
pub(crate) fn cut_runs(table: &mut Table<(u64, u64), &[u8]>, id: u64, from: u64) -> StoreResult<()> {
    let holding = match table.range((id, 0)..(id, from))?.next_back() {
        Some(row) => {
            let (k, run) = row?;
            let run = run.value();
            let keep = partition(run, |p| p < from);
            (keep < run.len() / 8).then(|| (k.value().1, run[..keep * 8].to_vec()))
        }
        None => None,
    };
    table.retain_in((id, from)..=(id, u64::MAX), |_, _| false)?;
    if let Some((first, kept)) = holding {
        table.insert((id, first), kept.as_slice())?;
    }
    Ok(())
}

/// Drops every boundary of stream `id`.
pub(crate) fn drop_runs(table: &mut Table<(u64, u64), &[u8]>, id: u64) -> StoreResult<()> {
    table.retain_in((id, 0)..=(id, u64::MAX), |_, _| false)?;
    Ok(())
}

/// A stream's boundaries written since the checkpoint that last covered it:
/// logged, not yet in redb. Grouped by the log record that holds them, so a
/// checkpoint drops exactly what it wrote.
#[derive(Default)]
pub(crate) struct Pending {
    marks: VecDeque<u64>,
    /// (log record seq, how many of `marks` it holds), oldest first.
    records: VecDeque<(u64, usize)>,
}

impl Pending {
    /// Adds the boundaries (packed, ascending, after every boundary held) that record `seq` logged.
    pub(crate) fn push(&mut self, seq: u64, marks: impl IntoIterator<Item = u64>) {
        let before = self.marks.len();
        self.marks.extend(marks);
        let added = self.marks.len() - before;
        if added == 0 {
            return;
        }
        match self.records.back_mut() {
            Some((last, n)) if *last == seq => *n += added,
            _ => self.records.push_back((seq, added)),
        }
    }

    /// Forgets the boundaries of records up to `seq` (a durable redb commit now holds them).
    pub(crate) fn drop_upto(&mut self, seq: u64) {
        while let Some(&(s, n)) = self.records.front() {
            if s > seq {
                break;
            }
            self.records.pop_front();
            self.marks.drain(..n.min(self.marks.len()));
        }
        if self.marks.is_empty() {
            self.marks = VecDeque::new();
            self.records = VecDeque::new();
        }
    }

    pub(crate) fn next_from(&self, pos: u64) -> Option<(u64, u8)> {
        let i = self.marks.partition_point(|&m| pos_of(m) < pos);
        self.marks.get(i).copied().map(unpack)
    }

    pub(crate) fn prev_upto(&self, pos: u64) -> Option<(u64, u8)> {
        let i = self.marks.partition_point(|&m| pos_of(m) <= pos);
        i.checked_sub(1).and_then(|i| self.marks.get(i)).copied().map(unpack)
    }

    /// How many boundaries are held.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.marks.len()
    }
}

/// Two indexes as one (boundaries may be in either, or briefly in both).
pub(crate) struct Both<'a>(pub(crate) &'a dyn MarkIndex, pub(crate) &'a dyn MarkIndex);

impl MarkIndex for Both<'_> {
    fn next_from(&self, id: u64, pos: u64) -> StoreResult<Option<(u64, u8)>> {
        let (a, b) = (self.0.next_from(id, pos)?, self.1.next_from(id, pos)?);
        Ok(match (a, b) {
            (Some(a), Some(b)) => Some(if b.0 < a.0 { b } else { a }),
            (a, b) => a.or(b),
        })
    }

    fn prev_upto(&self, id: u64, pos: u64) -> StoreResult<Option<(u64, u8)>> {
        let (a, b) = (self.0.prev_upto(id, pos)?, self.1.prev_upto(id, pos)?);
        Ok(match (a, b) {
            (Some(a), Some(b)) => Some(if b.0 > a.0 { b } else { a }),
            (a, b) => a.or(b),
        })
    }
}

/// The pending lists of every stream (looked up by id in the store's index).
pub(crate) struct PendingIndex<'a>(pub(crate) &'a super::Shared);

impl PendingIndex<'_> {
    fn with<R>(&self, id: u64, f: impl FnOnce(&Pending) -> R) -> Option<R> {
        let entry = self.0.index.read().by_id.get(&id).cloned()?;
        let pending = entry.pending.lock();
        Some(f(&pending))
    }
}

impl MarkIndex for PendingIndex<'_> {
    fn next_from(&self, id: u64, pos: u64) -> StoreResult<Option<(u64, u8)>> {
        Ok(self.with(id, |p| p.next_from(pos)).flatten())
    }
    fn prev_upto(&self, id: u64, pos: u64) -> StoreResult<Option<(u64, u8)>> {
        Ok(self.with(id, |p| p.prev_upto(pos)).flatten())
    }
}

/// The boundaries a batch has logged so far, (stream id, packed), in order.
pub(crate) struct BatchMarks<'a>(pub(crate) &'a [(u64, u64)]);

impl MarkIndex for BatchMarks<'_> {
    fn next_from(&self, id: u64, pos: u64) -> StoreResult<Option<(u64, u8)>> {
        Ok(self.0.iter().filter(|(i, m)| *i == id && pos_of(*m) >= pos).map(|(_, m)| unpack(*m)).min())
    }
    fn prev_upto(&self, id: u64, pos: u64) -> StoreResult<Option<(u64, u8)>> {
        Ok(self.0.iter().filter(|(i, m)| *i == id && pos_of(*m) <= pos).map(|(_, m)| unpack(*m)).max())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_boundaries_are_found_and_dropped_by_the_record_that_logged_them() {
        let mut p = Pending::default();
        p.push(1, [pack(0, 0), pack(10, 1)]);
        p.push(2, [pack(20, 0)]);
        assert_eq!(p.next_from(11), Some((20, 0)));
        assert_eq!(p.prev_upto(19), Some((10, 1)));
        assert_eq!(p.next_from(21), None);
        p.drop_upto(1);
        assert_eq!(p.len(), 1);
        assert_eq!(p.prev_upto(19), None);
        assert_eq!(p.next_from(0), Some((20, 0)));
    }

    #[test]
    fn runs_and_pending_answer_as_one_index() {
        let dir = tempfile::tempdir().unwrap();
        let db = redb::Database::create(dir.path().join("t.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut t = txn.open_table(MARK_RUNS).unwrap();
            put_runs(&mut t, 7, &[pack(0, 0), pack(5, 1), pack(9, 0)]).unwrap();
            put_runs(&mut t, 7, &[pack(12, 0), pack(20, 1)]).unwrap();
            put_runs(&mut t, 8, &[pack(0, 0)]).unwrap();
        }
        txn.commit().unwrap();
        let read = redb::ReadableDatabase::begin_read(&db).unwrap();
        let runs = Runs(read.open_table(MARK_RUNS).unwrap());
        assert_eq!(runs.next_from(7, 6).unwrap(), Some((9, 0)));
        assert_eq!(runs.next_from(7, 10).unwrap(), Some((12, 0)));
        assert_eq!(runs.next_from(7, 21).unwrap(), None);
        assert_eq!(runs.prev_upto(7, 11).unwrap(), Some((9, 0)));
        assert_eq!(runs.prev_upto(7, 25).unwrap(), Some((20, 1)));
        assert!(is_start(&runs, 7, 5).unwrap());
        assert!(!is_start(&runs, 7, 6).unwrap());
        assert_eq!(
            between(&runs, 7, 5, 20, 30).collect::<StoreResult<Vec<_>>>().unwrap(),
            vec![(5, 9, ROW_FLAG), (9, 12, 0), (12, 20, 0)]
        );
        struct P(Pending);
        impl MarkIndex for P {
            fn next_from(&self, _: u64, pos: u64) -> StoreResult<Option<(u64, u8)>> {
                Ok(self.0.next_from(pos))
            }
            fn prev_upto(&self, _: u64, pos: u64) -> StoreResult<Option<(u64, u8)>> {
                Ok(self.0.prev_upto(pos))
            }
        }
        let mut pending = Pending::default();
        pending.push(3, [pack(20, 1), pack(30, 0)]);
        let p = P(pending);
        let both = Both(&runs, &p);
        assert_eq!(both.next_from(7, 21).unwrap(), Some((30, 0)));
        assert_eq!(last_in(&both, 7, 0, 35).unwrap(), Some(30));
        assert_eq!(first_in(&both, 7, 13, 20).unwrap(), None);
        drop(read);
        let txn = db.begin_write().unwrap();
        {
            let mut t = txn.open_table(MARK_RUNS).unwrap();
            cut_runs(&mut t, 7, 9).unwrap();
        }
        txn.commit().unwrap();
        let read = redb::ReadableDatabase::begin_read(&db).unwrap();
        let runs = Runs(read.open_table(MARK_RUNS).unwrap());
        assert_eq!(runs.prev_upto(7, 100).unwrap(), Some((5, 1)));
        assert_eq!(runs.next_from(7, 6).unwrap(), None);
        assert_eq!(runs.next_from(8, 0).unwrap(), Some((0, 0)));
    }

    /// `runs` answers every lookup of stream 7 as `truth` (packed, ascending) does.
    fn assert_answers_like(runs: &dyn MarkIndex, truth: &[u64], why: &str) {
        let end = truth.last().map_or(0, |&m| pos_of(m)) + 10;
        for pos in 0..end {
            let next = truth.iter().copied().find(|&m| pos_of(m) >= pos).map(unpack);
            let prev = truth.iter().copied().rev().find(|&m| pos_of(m) <= pos).map(unpack);
            assert_eq!(runs.next_from(7, pos).unwrap(), next, "{why}: next boundary from {pos}");
            assert_eq!(runs.prev_upto(7, pos).unwrap(), prev, "{why}: last boundary up to {pos}");
        }
    }

    #[test]
    fn boundaries_applied_again_from_another_start_are_all_found() {
        // A crash with a checkpoint in flight: the replay at start applies
        // both log files in one commit (1,030 boundaries: a full run and a
        // short one), the checkpoint after it the sealed file alone (the
        // first 10), the next one the active file, which has grown since.
        let dir = tempfile::tempdir().unwrap();
        let db = redb::Database::create(dir.path().join("t.redb")).unwrap();
        let all: Vec<u64> = (0..1200).map(|i| pack(i * 10, if i % 2 == 0 { ROW_FLAG } else { 0 })).collect();
        let apply = |marks: &[u64]| {
            let txn = db.begin_write().unwrap();
            put_runs(&mut txn.open_table(MARK_RUNS).unwrap(), 7, marks).unwrap();
            txn.commit().unwrap();
        };
        let check = |truth: &[u64], why: &str| {
            let read = redb::ReadableDatabase::begin_read(&db).unwrap();
            assert_answers_like(&Runs(read.open_table(MARK_RUNS).unwrap()), truth, why);
        };
        apply(&all[..1030]);
        apply(&all[..10]);
        check(&all[..1030], "after the sealed file's checkpoint");
        apply(&all[10..]);
        check(&all, "after the active file's checkpoint");
        // A reload applies from the middle again; a cut still cuts everything after it.
        apply(&all[500..700]);
        check(&all, "after a reload");
        let txn = db.begin_write().unwrap();
        cut_runs(&mut txn.open_table(MARK_RUNS).unwrap(), 7, 6005).unwrap();
        txn.commit().unwrap();
        check(&all[..601], "after a cut");
    }

    const ROW_FLAG: u8 = super::super::ROW_ENDS_APPEND;
}

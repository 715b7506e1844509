//! Disk faults on demand, for tests: the seam every write and sync of the
//! store's files goes through (the write-ahead log, redb's files through
//! their `StorageBackend`: `streams.redb` and `registry.redb`, blob files).
//!
//! Production opens the store without a plan: each seam call is then one
//! `Option` check before the plain system call. A test hands the store a
//! [`FaultPlan`] at open and, while the store runs, makes chosen calls fail
//! with "no space left", an I/O error, or a short write (part of the buffer
//! written, then an error), to check that the failing call answers a clean
//! error, that nothing acknowledged is lost, and that writes succeed again
//! once the fault clears, without reopening.

use std::fs::File;
use std::io::{self, ErrorKind};
use std::ops::Bound;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

/// A place where the store writes or syncs a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultPoint {
    /// A write to the write-ahead log (a record, the zeroes that grow it, a retraction).
    LogWrite,
    /// A sync of the write-ahead log.
    LogSync,
    /// A write to `streams.redb` (its pages, or growing the file).
    DbWrite,
    /// A sync of `streams.redb` (a checkpoint, or a commit that is one).
    DbSync,
    /// A write to a blob staging file.
    BlobWrite,
    /// The sync of a blob staging file.
    BlobSync,
    /// A write to a stream's segment file (its wire bytes).
    SegmentWrite,
    /// A sync of a segment file (at a checkpoint).
    SegmentSync,
    /// A write to `registry.redb` (its pages, or growing the file).
    RegistryWrite,
    /// A sync of `registry.redb` (every registry commit is durable).
    RegistrySync,
}

const POINTS: usize = 10;

impl FaultPoint {
    fn index(self) -> usize {
        self as usize
    }
}

/// What an injected fault looks like to the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// `ENOSPC`: nothing is written.
    NoSpace,
    /// `EIO`: nothing is written (a sync: nothing is made durable).
    Io,
    /// Half of the buffer is written, then the write fails (a sync fails as `Io` does).
    ShortWrite,
}

impl Fault {
    fn error(self) -> io::Error {
        match self {
            Fault::NoSpace => io::Error::new(ErrorKind::StorageFull, "injected: no space left on device"),
            Fault::Io => io::Error::other("injected: input/output error"),
            Fault::ShortWrite => io::Error::new(ErrorKind::WriteZero, "injected: short write"),
        }
    }
}

#[derive(Debug)]
struct Rule {
    point: FaultPoint,
    fault: Fault,
    /// Calls at `point` to let through before this rule fires.
    skip: u64,
    /// Fires once, or on every call until cleared.
    once: bool,
}

#[derive(Debug, Default)]
struct PlanState {
    rules: Vec<Rule>,
    calls: [u64; POINTS],
    injected: [u64; POINTS],
}

/// Which calls fail, shared between a test and the store it opened. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct FaultPlan(Arc<parking_lot::Mutex<PlanState>>, Arc<parking_lot::RwLock<()>>);

impl FaultPlan {
    pub fn new() -> FaultPlan {
        FaultPlan::default()
    }

    /// The `n`th call at `point` from now (1 = the next one) fails with `fault`, once.
    pub fn fail_nth(&self, point: FaultPoint, n: u64, fault: Fault) {
        self.0.lock().rules.push(Rule { point, fault, skip: n.saturating_sub(1), once: true });
    }

    /// Every call at `point` fails with `fault` until [`FaultPlan::clear`].
    pub fn fail_all(&self, point: FaultPoint, fault: Fault) {
        self.0.lock().rules.push(Rule { point, fault, skip: 0, once: false });
    }

    /// The disk is full: every write and sync of every file fails with `ENOSPC` until cleared.
    pub fn disk_full(&self) {
        for point in [
            FaultPoint::LogWrite,
            FaultPoint::LogSync,
            FaultPoint::DbWrite,
            FaultPoint::DbSync,
            FaultPoint::BlobWrite,
            FaultPoint::BlobSync,
            FaultPoint::SegmentWrite,
            FaultPoint::SegmentSync,
            FaultPoint::RegistryWrite,
            FaultPoint::RegistrySync,
        ] {
            self.fail_all(point, Fault::NoSpace);
        }
    }

    /// No call fails any more (space was freed, the disk came back).
    pub fn clear(&self) {
        self.0.lock().rules.clear();
    }

    /// Runs `f` while no write or sync of the store's files is in progress
    /// and none starts: what `f` sees of the files (e.g. a copy of them) is
    /// what a process killed at that instant would leave, every write issued
    /// before it whole and none after it. Each seam call holds the other
    /// side of this lock for its duration.
    pub fn frozen<T>(&self, f: impl FnOnce() -> T) -> T {
        let _no_io = self.1.write();
        f()
    }

    /// How many calls reached `point` since the plan was made.
    pub fn calls(&self, point: FaultPoint) -> u64 {
        self.0.lock().calls[point.index()]
    }

    /// How many faults were injected at `point`.
    pub fn injected(&self, point: FaultPoint) -> u64 {
        self.0.lock().injected[point.index()]
    }

    /// Counts a call at `point` and says whether it fails, and how.
    fn hit(&self, point: FaultPoint) -> Option<Fault> {
        let mut state = self.0.lock();
        state.calls[point.index()] += 1;
        let mut fired = None;
        let mut spent = None;
        for (i, rule) in state.rules.iter_mut().enumerate().filter(|(_, r)| r.point == point) {
            if rule.skip > 0 {
                rule.skip -= 1;
                continue;
            }
            if fired.is_none() {
                fired = Some(rule.fault);
                if rule.once {
                    spent = Some(i);
                }
            }
        }
        if let Some(i) = spent {
            state.rules.remove(i);
        }
        if fired.is_some() {
            state.injected[point.index()] += 1;
        }
        fired
    }
}

/// The fault (if any) a call at `point` meets.
fn fault_at(plan: Option<&FaultPlan>, point: FaultPoint) -> Option<Fault> {
    plan.and_then(|p| p.hit(point))
}

/// Holds off [`FaultPlan::frozen`] for the length of one seam call.
fn in_progress(plan: Option<&FaultPlan>) -> Option<parking_lot::RwLockReadGuard<'_, ()>> {
    plan.map(|p| p.1.read())
}

/// `write` through the seam: `write(buf)` runs unless a fault says otherwise
/// (a short write runs it on the first half of `buf`).
pub(crate) fn write(
    plan: Option<&FaultPlan>,
    point: FaultPoint,
    buf: &[u8],
    write: impl FnOnce(&[u8]) -> io::Result<()>,
) -> io::Result<()> {
    let _io = in_progress(plan);
    match fault_at(plan, point) {
        None => write(buf),
        Some(Fault::ShortWrite) => {
            write(&buf[..buf.len() / 2])?;
            Err(Fault::ShortWrite.error())
        }
        Some(fault) => Err(fault.error()),
    }
}

/// `sync` through the seam: a faulted sync does not run (nothing is made durable).
pub(crate) fn sync(
    plan: Option<&FaultPlan>,
    point: FaultPoint,
    sync: impl FnOnce() -> io::Result<()>,
) -> io::Result<()> {
    let _io = in_progress(plan);
    match fault_at(plan, point) {
        None => sync(),
        Some(Fault::ShortWrite) => Err(Fault::Io.error()),
        Some(fault) => Err(fault.error()),
    }
}

/// `File::write_all_at` through the seam.
pub(crate) fn write_all_at(
    plan: Option<&FaultPlan>,
    point: FaultPoint,
    file: &File,
    buf: &[u8],
    offset: u64,
) -> io::Result<()> {
    write(plan, point, buf, |b| file.write_all_at(b, offset))
}

/// A redb file, through the seam (used only when a test gave a plan).
#[derive(Debug)]
pub(crate) struct FaultyBackend {
    pub(crate) inner: redb::backends::FileBackend,
    pub(crate) plan: FaultPlan,
    /// Where its writes and syncs count: `DbWrite`/`DbSync` for
    /// `streams.redb`, `RegistryWrite`/`RegistrySync` for `registry.redb`.
    pub(crate) points: (FaultPoint, FaultPoint),
}

impl FaultyBackend {
    /// `path`'s redb file through the seam, its calls counted at `points` (write, sync).
    pub(crate) fn open(
        path: &std::path::Path,
        plan: &FaultPlan,
        points: (FaultPoint, FaultPoint),
    ) -> crate::error::StoreResult<FaultyBackend> {
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
        let inner = redb::backends::FileBackend::new(file)?;
        Ok(FaultyBackend { inner, plan: plan.clone(), points })
    }
}

impl redb::StorageBackend for FaultyBackend {
    fn len(&self) -> Result<u64, io::Error> {
        self.inner.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        self.inner.read(offset, out)
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        // Growing the file is where a real full disk says no first; a short write makes no sense here.
        let _io = in_progress(Some(&self.plan));
        match fault_at(Some(&self.plan), self.points.0) {
            None => self.inner.set_len(len),
            Some(Fault::NoSpace) => Err(Fault::NoSpace.error()),
            Some(_) => Err(Fault::Io.error()),
        }
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        sync(Some(&self.plan), self.points.1, || self.inner.sync_data())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        write(Some(&self.plan), self.points.0, data, |b| self.inner.write(offset, b))
    }

    fn close(&self) -> Result<(), io::Error> {
        self.inner.close()
    }

    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, redb::BackendError> {
        self.inner.try_lock_range(start, end)
    }

    fn try_lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, redb::BackendError> {
        self.inner.try_lock_shared_range(start, end)
    }

    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), redb::BackendError> {
        self.inner.lock_range(start, end)
    }

    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), redb::BackendError> {
        self.inner.lock_shared_range(start, end)
    }

    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), redb::BackendError> {
        self.inner.unlock_range(start, end)
    }

    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, redb::BackendError> {
        self.inner.query_lock_range(start, end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nth_call_fails_once_and_others_pass() {
        let plan = FaultPlan::new();
        plan.fail_nth(FaultPoint::LogSync, 2, Fault::Io);
        let ok = || Ok(());
        assert!(sync(Some(&plan), FaultPoint::LogSync, ok).is_ok());
        assert!(sync(Some(&plan), FaultPoint::LogSync, ok).is_err());
        assert!(sync(Some(&plan), FaultPoint::LogSync, ok).is_ok());
        assert!(sync(Some(&plan), FaultPoint::DbSync, ok).is_ok());
        assert_eq!(plan.calls(FaultPoint::LogSync), 3);
        assert_eq!(plan.injected(FaultPoint::LogSync), 1);
    }

    #[test]
    fn a_short_write_writes_half_then_fails() {
        let plan = FaultPlan::new();
        plan.fail_all(FaultPoint::BlobWrite, Fault::ShortWrite);
        let mut written = Vec::new();
        let r = write(Some(&plan), FaultPoint::BlobWrite, b"abcdef", |b| {
            written.extend_from_slice(b);
            Ok(())
        });
        assert_eq!(r.unwrap_err().kind(), ErrorKind::WriteZero);
        assert_eq!(written, b"abc");
        plan.clear();
        assert!(write(Some(&plan), FaultPoint::BlobWrite, b"x", |_| Ok(())).is_ok());
    }
}

//! Segment files: each stream's bytes exactly as a reader receives them.
//!
//! `segments/<id>.seg` holds the positions `[base, tail)` of stream `id`
//! (`base` is a fork's divergence point, else 0) at file offset
//! `position - base`. A binary stream's file is its bytes; a JSON stream's
//! file is each message followed by `,`, which is exactly how positions are
//! counted (a message of `n` bytes takes `n + 1` positions), so a read of any
//! run of whole messages is one byte range, and `[` + that range with its last
//! `,` turned into `]` is the response body.
//!
//! The writer writes the files without syncing them: the log record of the
//! batch carries the same bytes and is the durability point. A checkpoint
//! syncs every file written since the last one before redb commits durably,
//! and recovery rewrites from the log what the files may have lost, then
//! truncates every file to its stream's recovered tail.
//!
//! Open handles are bounded: an LRU of at most `capacity` files, shared by
//! the writer and readers (`pread` needs no lock). The server sizes it from
//! its file-descriptor budget (`--store-open-files`, 4,096 by default), so a
//! working set of thousands of live streams never reopens a file per append.

use std::fs::File;
use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::error::{StoreError, StoreResult};
use crate::fault::{self, FaultPlan, FaultPoint};
use crate::{IdMap, IdSet};

pub(crate) struct Segments {
    dir: PathBuf,
    capacity: usize,
    open: Mutex<Lru>,
    /// Streams whose files were written since the last checkpoint (writer only).
    dirty: Mutex<Dirty>,
    faults: Option<FaultPlan>,
    /// Files opened so far (each LRU miss opens one).
    opens: AtomicU64,
}

#[derive(Default)]
struct Lru {
    files: IdMap<(Arc<File>, u64)>,
    tick: u64,
}

#[derive(Default)]
struct Dirty {
    ids: IdSet,
    /// A file was created or removed: the directory must be synced too.
    dir: bool,
}

/// Files written since a point in time, taken by a checkpoint to sync.
#[derive(Default, Debug)]
pub(crate) struct DirtySet {
    ids: IdSet,
    dir: bool,
}

impl Segments {
    pub(crate) fn open(dir: PathBuf, capacity: usize, faults: Option<FaultPlan>) -> StoreResult<Segments> {
        std::fs::create_dir_all(&dir)?;
        Ok(Segments {
            dir,
            capacity: capacity.max(1),
            open: Mutex::new(Lru::default()),
            dirty: Mutex::new(Dirty::default()),
            faults,
            opens: AtomicU64::new(0),
        })
    }

    pub(crate) fn path(&self, id: u64) -> PathBuf {
        segment_path(&self.dir, id)
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// The open file of stream `id`; created when `create` (and missing).
    fn file(&self, id: u64, create: bool) -> StoreResult<Arc<File>> {
        {
            let mut lru = self.open.lock();
            lru.tick += 1;
            let tick = lru.tick;
            if let Some((file, used)) = lru.files.get_mut(&id) {
                *used = tick;
                return Ok(file.clone());
            }
        }
        let path = self.path(id);
        let file = match std::fs::OpenOptions::new().read(true).write(true).create(create).truncate(false).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StoreError::Storage(format!("segment file {} is missing", path.display())))
            }
            Err(e) => return Err(e.into()),
        };
        self.opens.fetch_add(1, Ordering::Relaxed);
        if create {
            self.dirty.lock().dir = true;
        }
        let file = Arc::new(file);
        let mut lru = self.open.lock();
        if lru.files.len() >= self.capacity {
            // The least recently used handle goes (an O(capacity) scan, only on a miss).
            if let Some(oldest) = lru.files.iter().min_by_key(|(_, (_, used))| *used).map(|(id, _)| *id) {
                lru.files.remove(&oldest);
            }
        }
        lru.tick += 1;
        let tick = lru.tick;
        lru.files.insert(id, (file.clone(), tick));
        Ok(file)
    }

    /// Writes `bytes` at file offset `at` of stream `id`'s file (unsynced).
    pub(crate) fn write(&self, id: u64, at: u64, bytes: &[u8]) -> StoreResult<()> {
        let file = self.file(id, true)?;
        self.dirty.lock().ids.insert(id);
        fault::write_all_at(self.faults.as_ref(), FaultPoint::SegmentWrite, &file, bytes, at)?;
        Ok(())
    }

    /// Writes `pieces`, one after the other, from file offset `at` of stream
    /// `id`'s file (unsynced): the appends one batch made to one stream, in
    /// one `pwritev` (a piece at a time when a test injects faults).
    pub(crate) fn write_run(&self, id: u64, at: u64, pieces: &[&[u8]]) -> StoreResult<()> {
        if let [one] = pieces {
            return self.write(id, at, one);
        }
        let file = self.file(id, true)?;
        self.dirty.lock().ids.insert(id);
        if self.faults.is_some() {
            let mut at = at;
            for piece in pieces {
                fault::write_all_at(self.faults.as_ref(), FaultPoint::SegmentWrite, &file, piece, at)?;
                at += piece.len() as u64;
            }
            return Ok(());
        }
        write_all_vectored_at(&file, at, pieces)?;
        Ok(())
    }

    /// Reads exactly `buf.len()` bytes at file offset `at` of stream `id`'s file.
    pub(crate) fn read(&self, id: u64, at: u64, buf: &mut [MaybeUninit<u8>]) -> StoreResult<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let file = self.file(id, false)?;
        let mut done = 0usize;
        while done < buf.len() {
            match pread_uninit(&file, at + done as u64, &mut buf[done..]) {
                Ok(0) => {
                    return Err(StoreError::Storage(format!(
                        "segment file {} ends before offset {}",
                        self.path(id).display(),
                        at + buf.len() as u64
                    )))
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Reads exactly `buf.len()` bytes at file offset `at` of stream `id`'s
    /// file only if that costs no disk I/O: the file is already open and
    /// every byte is in the page cache (`preadv2` with `RWF_NOWAIT`). Returns
    /// `false` otherwise (the caller then reads on a blocking thread, which
    /// also reports any error): this is what lets a hot read run on an async
    /// worker without ever waiting for the disk there.
    pub(crate) fn read_cached(&self, id: u64, at: u64, buf: &mut [MaybeUninit<u8>]) -> bool {
        if buf.is_empty() {
            return true;
        }
        let Some(file) = self.open.lock().files.get(&id).map(|(f, _)| f.clone()) else {
            return false;
        };
        read_nowait(&file, at, buf)
    }

    /// Stream `id`'s file if it is open (no I/O: `None` otherwise), counted as used.
    pub(crate) fn open_file(&self, id: u64) -> Option<Arc<File>> {
        let mut lru = self.open.lock();
        lru.tick += 1;
        let tick = lru.tick;
        let (file, used) = lru.files.get_mut(&id)?;
        *used = tick;
        Some(file.clone())
    }

    /// Removes stream `id`'s file (a deleted stream).
    pub(crate) fn remove(&self, id: u64) -> StoreResult<()> {
        self.open.lock().files.remove(&id);
        self.dirty.lock().ids.remove(&id);
        match std::fs::remove_file(self.path(id)) {
            Ok(()) => {
                self.dirty.lock().dir = true;
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Syncs every file written since the last call (and the directory, if
    /// files came or went). On error the files stay dirty for the next try.
    pub(crate) fn sync_dirty(&self) -> StoreResult<()> {
        self.sync_set(self.take_dirty())
    }

    /// Takes the set of files written since the last call: a checkpoint
    /// syncs them (`sync_set`) while the writer goes on writing (and marking
    /// files dirty again).
    pub(crate) fn take_dirty(&self) -> DirtySet {
        let mut d = self.dirty.lock();
        DirtySet { ids: std::mem::take(&mut d.ids), dir: std::mem::take(&mut d.dir) }
    }

    /// Syncs the files of `set` (a file removed meanwhile needs nothing). On
    /// error, what was not synced is dirty again, for the next checkpoint.
    pub(crate) fn sync_set(&self, set: DirtySet) -> StoreResult<()> {
        let DirtySet { mut ids, dir } = set;
        let mut todo: Vec<u64> = ids.iter().copied().collect();
        todo.sort_unstable();
        for id in todo {
            if let Err(err) = self.sync_file(id) {
                self.restore(DirtySet { ids, dir });
                return Err(err);
            }
            ids.remove(&id);
        }
        if dir {
            if let Err(err) =
                fault::sync(self.faults.as_ref(), FaultPoint::SegmentSync, || File::open(&self.dir)?.sync_all())
            {
                self.restore(DirtySet { ids, dir });
                return Err(err.into());
            }
        }
        Ok(())
    }

    /// Puts a set that could not be synced back among the dirty files.
    pub(crate) fn restore(&self, set: DirtySet) {
        let mut d = self.dirty.lock();
        d.ids.extend(set.ids);
        d.dir |= set.dir;
    }

    /// Syncs stream `id`'s file through its open handle, or (not kept open:
    /// a checkpoint runs beside the writer) through one opened for the sync
    /// and closed after it, so a file deleted meanwhile is never kept open.
    fn sync_file(&self, id: u64) -> StoreResult<()> {
        let kept = self.open.lock().files.get(&id).map(|(f, _)| f.clone());
        let file = match kept {
            Some(f) => f,
            None => match File::open(self.path(id)) {
                Ok(f) => Arc::new(f),
                // Removed since it was written: nothing to sync.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(e.into()),
            },
        };
        fault::sync(self.faults.as_ref(), FaultPoint::SegmentSync, || file.sync_data())?;
        Ok(())
    }

    /// Startup: the length of stream `id`'s file (0 when there is none).
    pub(crate) fn len(&self, id: u64) -> StoreResult<u64> {
        match std::fs::metadata(self.path(id)) {
            Ok(m) => Ok(m.len()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(e.into()),
        }
    }

    /// Startup: cuts stream `id`'s file to `len` bytes (synced), dropping
    /// bytes of batches that were never acknowledged.
    pub(crate) fn truncate(&self, id: u64, len: u64) -> StoreResult<()> {
        let file = self.file(id, true)?;
        file.set_len(len)?;
        file.sync_all()?;
        Ok(())
    }

    /// Startup: the stream ids that have a file.
    pub(crate) fn ids_on_disk(&self) -> StoreResult<Vec<u64>> {
        let mut ids = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let name = entry?.file_name();
            let name = name.to_string_lossy();
            if let Some(id) = name.strip_suffix(".seg").and_then(|hex| u64::from_str_radix(hex, 16).ok()) {
                ids.push(id);
            }
        }
        Ok(ids)
    }

    #[cfg(test)]
    pub(crate) fn open_handles(&self) -> usize {
        self.open.lock().files.len()
    }

    /// Files opened so far (a working set larger than the LRU reopens files).
    #[cfg(test)]
    pub(crate) fn opens(&self) -> u64 {
        self.opens.load(Ordering::Relaxed)
    }
}

/// `pwritev` of every piece from `at`, resumed after short writes.
#[cfg(target_os = "linux")]
fn write_all_vectored_at(file: &File, mut at: u64, pieces: &[&[u8]]) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // At most IOV_MAX (1,024) pieces a call.
    for chunk in pieces.chunks(1024) {
        let mut iov: Vec<libc::iovec> =
            chunk.iter().map(|p| libc::iovec { iov_base: p.as_ptr() as *mut libc::c_void, iov_len: p.len() }).collect();
        let mut first = 0;
        while first < iov.len() {
            let offset = libc::off_t::try_from(at).map_err(|_| std::io::Error::other("segment offset too large"))?;
            let count = (iov.len() - first) as libc::c_int;
            // SAFETY: every iovec points into a piece borrowed for this call; the fd is open (held by `file`).
            let n = unsafe { libc::pwritev(file.as_raw_fd(), iov[first..].as_ptr(), count, offset) };
            if n < 0 {
                let err = std::io::Error::last_os_error();
                if err.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            let mut n = n as usize;
            at += n as u64;
            // Skip what was written: whole pieces, then the start of a partly written one.
            while first < iov.len() && n >= iov[first].iov_len {
                n -= iov[first].iov_len;
                first += 1;
            }
            if n > 0 {
                // SAFETY: `n` is less than this piece's length, so the pointer stays inside it.
                iov[first].iov_base = unsafe { iov[first].iov_base.cast::<u8>().add(n).cast() };
                iov[first].iov_len -= n;
            }
        }
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn write_all_vectored_at(file: &File, mut at: u64, pieces: &[&[u8]]) -> std::io::Result<()> {
    for piece in pieces {
        file.write_all_at(piece, at)?;
        at += piece.len() as u64;
    }
    Ok(())
}

/// Fills `buf` from file offset `at` without blocking on the disk: `false`
/// as soon as a byte is not in the page cache (or on any error, or the end of
/// the file, which the blocking path reports properly).
/// One `pread` into memory that need not be initialized; the bytes it
/// reports read are initialized afterwards.
fn pread_uninit(file: &File, at: u64, buf: &mut [MaybeUninit<u8>]) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    let offset = libc::off_t::try_from(at).map_err(|_| std::io::Error::other("offset out of range"))?;
    // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`, which
    // outlives the call; the fd is open (held by `file`).
    let n = unsafe { libc::pread(file.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), offset) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n as usize)
}

#[cfg(target_os = "linux")]
fn read_nowait(file: &File, at: u64, buf: &mut [MaybeUninit<u8>]) -> bool {
    use std::os::fd::AsRawFd;
    let mut done = 0usize;
    while done < buf.len() {
        let rest = &mut buf[done..];
        let iov = libc::iovec { iov_base: rest.as_mut_ptr().cast(), iov_len: rest.len() };
        let Ok(offset) = libc::off_t::try_from(at + done as u64) else { return false };
        // SAFETY: `iov` points into `buf`, which outlives the call; the fd is open (held by `file`).
        let n = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, offset, libc::RWF_NOWAIT) };
        if n <= 0 {
            return false;
        }
        done += n as usize;
    }
    true
}

#[cfg(not(target_os = "linux"))]
fn read_nowait(_file: &File, _at: u64, _buf: &mut [MaybeUninit<u8>]) -> bool {
    false
}

/// Whether every byte of `[at, at + len)` of `file` is in the page cache,
/// learnt without reading any (`mincore` of a mapping that is never
/// touched): a read that will be sent from the file later, with no copy to
/// check it by, is handed out on an async worker only when sending it
/// cannot wait for the disk there. `false` on any error.
#[cfg(target_os = "linux")]
pub(crate) fn resident(file: &File, at: u64, len: u64) -> bool {
    use std::os::fd::AsRawFd;
    if len == 0 {
        return true;
    }
    let page = page_size();
    let first = at / page * page;
    let Ok(span) = usize::try_from(at + len - first) else { return false };
    let Ok(offset) = libc::off_t::try_from(first) else { return false };
    // SAFETY: a new read-only mapping of an open file; nothing reads through
    // it, it is only asked about and unmapped below.
    let map =
        unsafe { libc::mmap(std::ptr::null_mut(), span, libc::PROT_READ, libc::MAP_SHARED, file.as_raw_fd(), offset) };
    if map == libc::MAP_FAILED {
        return false;
    }
    const PAGES_A_CALL: usize = 512;
    let mut vec = [0u8; PAGES_A_CALL];
    let page = page as usize;
    let mut done = 0usize;
    let mut all = true;
    while all && done < span {
        let n = (span - done).min(PAGES_A_CALL * page);
        // SAFETY: `[done, done + n)` lies inside the mapping, `done` is a
        // multiple of the page size, and `vec` has room for one byte per page of it.
        let rc = unsafe { libc::mincore(map.cast::<u8>().add(done).cast(), n, vec.as_mut_ptr()) };
        all = rc == 0 && vec[..n.div_ceil(page)].iter().all(|b| b & 1 == 1);
        done += n;
    }
    // SAFETY: the mapping made above, unmapped once.
    unsafe { libc::munmap(map, span) };
    all
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn resident(_file: &File, _at: u64, _len: u64) -> bool {
    false
}

#[cfg(target_os = "linux")]
fn page_size() -> u64 {
    static PAGE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    // SAFETY: sysconf only reads a system value.
    *PAGE.get_or_init(|| u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096).max(1))
}

pub(crate) fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:016x}.seg"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `len` bytes read at `at`, through the same read as a response's.
    fn read_bytes(segs: &Segments, id: u64, at: u64, len: usize) -> StoreResult<Vec<u8>> {
        let mut buf = vec![MaybeUninit::<u8>::uninit(); len];
        segs.read(id, at, &mut buf)?;
        Ok(buf.into_iter().map(|b| unsafe { b.assume_init() }).collect())
    }

    fn read_cached_bytes(segs: &Segments, id: u64, at: u64, len: usize) -> Option<Vec<u8>> {
        let mut buf = vec![MaybeUninit::<u8>::uninit(); len];
        segs.read_cached(id, at, &mut buf).then(|| buf.into_iter().map(|b| unsafe { b.assume_init() }).collect())
    }

    #[test]
    fn open_handles_stay_within_the_bound_and_every_file_still_reads() {
        let dir = tempfile::tempdir().unwrap();
        let segs = Segments::open(dir.path().join("segments"), 3, None).unwrap();
        for id in 0..10u64 {
            segs.write(id, 0, &id.to_le_bytes()).unwrap();
            assert!(segs.open_handles() <= 3);
        }
        for id in 0..10u64 {
            let buf = read_bytes(&segs, id, 0, 8).unwrap();
            assert_eq!(u64::from_le_bytes(buf.try_into().unwrap()), id);
            assert!(segs.open_handles() <= 3);
        }
        segs.sync_dirty().unwrap();
        let mut ids = segs.ids_on_disk().unwrap();
        ids.sort();
        assert_eq!(ids, (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn a_working_set_within_the_bound_opens_each_file_once() {
        let dir = tempfile::tempdir().unwrap();
        let segs = Segments::open(dir.path().join("segments"), 1000, None).unwrap();
        // 1,000 streams appended to round-robin, three times over, then read.
        for round in 0..3u64 {
            for id in 0..1000u64 {
                segs.write(id, round * 8, &id.to_le_bytes()).unwrap();
            }
        }
        for id in 0..1000u64 {
            let buf = read_bytes(&segs, id, 16, 8).unwrap();
            assert_eq!(u64::from_le_bytes(buf.try_into().unwrap()), id);
        }
        assert_eq!(segs.opens(), 1000, "no file is reopened");
        // One stream more than the bound: round-robin use then misses every time.
        let small = Segments::open(dir.path().join("small"), 999, None).unwrap();
        for _ in 0..2 {
            for id in 0..1000u64 {
                small.write(id, 0, &id.to_le_bytes()).unwrap();
            }
        }
        assert_eq!(small.opens(), 2000);
    }

    #[test]
    fn a_run_of_pieces_lands_back_to_back_as_one_write_would() {
        let dir = tempfile::tempdir().unwrap();
        let segs = Segments::open(dir.path().to_owned(), 4, None).unwrap();
        segs.write(3, 0, b"ab").unwrap();
        let pieces: Vec<Vec<u8>> = (0..2000u32).map(|i| i.to_string().into_bytes()).collect();
        let refs: Vec<&[u8]> = pieces.iter().map(Vec::as_slice).collect();
        segs.write_run(3, 2, &refs).unwrap();
        let want: Vec<u8> = b"ab".iter().copied().chain(pieces.concat()).collect();
        assert_eq!(read_bytes(&segs, 3, 0, want.len()).unwrap(), want);
        let cached = read_cached_bytes(&segs, 3, 0, want.len());
        assert_eq!(cached, Some(want), "just written: in the page cache");
        assert!(read_cached_bytes(&segs, 4, 0, 1).is_none(), "no open file: not served without blocking");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn bytes_just_written_are_resident_and_dropped_ones_are_not() {
        use std::os::fd::AsRawFd;
        let dir = tempfile::tempdir().unwrap();
        let segs = Segments::open(dir.path().to_owned(), 4, None).unwrap();
        let bytes = vec![7u8; 3 << 20];
        segs.write(1, 0, &bytes).unwrap();
        let file = segs.open_file(1).expect("written: open");
        assert!(segs.open_file(2).is_none(), "never opened: no I/O to open it");
        assert!(resident(&file, 0, 3 << 20));
        assert!(resident(&file, 4095, 2_000_001), "unaligned ranges");
        // Out of the page cache (synced first: dirty pages cannot be dropped).
        file.sync_all().unwrap();
        // SAFETY: advice on an open file.
        let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(rc, 0);
        // SAFETY: statfs of an open file into a zeroed struct.
        let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::fstatfs(file.as_raw_fd(), &mut fs) }, 0);
        if fs.f_type == libc::TMPFS_MAGIC {
            return; // tmpfs keeps its pages: nothing can be dropped there.
        }
        assert!(!resident(&file, 1 << 20, 1 << 20), "dropped from the page cache");
        let _ = read_bytes(&segs, 1, 1 << 20, 1 << 20).unwrap();
        assert!(resident(&file, 1 << 20, 1 << 20), "read back in");
    }

    #[test]
    fn a_read_past_the_end_of_a_file_names_the_file_and_offset() {
        let dir = tempfile::tempdir().unwrap();
        let segs = Segments::open(dir.path().to_owned(), 4, None).unwrap();
        segs.write(7, 0, b"abc").unwrap();
        let err = read_bytes(&segs, 7, 0, 5).unwrap_err().to_string();
        assert!(err.contains("0000000000000007.seg") && err.contains("offset 5"), "{err}");
    }
}

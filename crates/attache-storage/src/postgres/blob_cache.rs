//! The local cache of whole blobs an instance keeps beside the object store,
//! bounded in bytes (`--blob-cache-bytes`), least recently used evicted first.
//!
//! What it holds: only whole blobs, each at its content address
//! (`blob-cache/<aa>/<sha256>`), so a cached copy is never stale. A blob gets
//! in when this instance uploaded it (the staged file moves in, no copy) or
//! when a read of the whole blob streamed it past (written beside the reader,
//! synced, then moved in); a read of part of a blob fetches that part from
//! the object store and leaves the cache alone. A blob larger than the bound
//! is never cached. Each blob is charged at least [`MIN_CHARGE`] bytes, so
//! the entries are bounded in number too.
//!
//! The index is in memory, rebuilt at start from the files (oldest modified
//! first) and trimmed to the bound. A file evicted while a reader has it open
//! stays readable through that reader's handle; a reader that finds a file
//! gone after looking it up forgets the entry and reads the object store.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use parking_lot::Mutex;

use crate::blob::is_blob_name;
use crate::error::StoreResult;

/// The least a cached blob is charged: a file costs a block and an entry whatever its length.
pub(crate) const MIN_CHARGE: u64 = 4096;

pub(crate) struct BlobCache {
    dir: PathBuf,
    bound: u64,
    index: Mutex<Index>,
}

#[derive(Default)]
struct Index {
    /// sha256 → (charge, last use).
    entries: HashMap<String, (u64, u64)>,
    /// last use → sha256: the eviction order.
    by_use: BTreeMap<u64, String>,
    /// The charges of all entries together; at most the bound between calls.
    held: u64,
    clock: u64,
}

impl Index {
    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    fn remove(&mut self, sha256: &str) -> bool {
        match self.entries.remove(sha256) {
            Some((charge, used)) => {
                self.by_use.remove(&used);
                self.held -= charge;
                true
            }
            None => false,
        }
    }

    fn insert(&mut self, sha256: &str, charge: u64) {
        self.remove(sha256);
        let now = self.tick();
        self.entries.insert(sha256.to_owned(), (charge, now));
        self.by_use.insert(now, sha256.to_owned());
        self.held += charge;
    }

    /// Drops least recently used entries until `held` is within `bound`; says which.
    fn trim(&mut self, bound: u64) -> Vec<String> {
        let mut gone = Vec::new();
        while self.held > bound {
            let Some((_, sha)) = self.by_use.pop_first() else { break };
            if let Some((charge, _)) = self.entries.remove(&sha) {
                self.held -= charge;
            }
            gone.push(sha);
        }
        gone
    }
}

fn charge(len: u64) -> u64 {
    len.max(MIN_CHARGE)
}

impl BlobCache {
    /// The cache in `dir` (created if needed), holding at most `bound` bytes:
    /// the files already there are indexed, oldest first, and trimmed to it.
    pub(crate) fn open(dir: PathBuf, bound: u64) -> StoreResult<BlobCache> {
        std::fs::create_dir_all(&dir)?;
        let mut found = Vec::new();
        for fan in std::fs::read_dir(&dir)? {
            let fan = fan?;
            if !fan.file_type()?.is_dir() {
                let _ = std::fs::remove_file(fan.path());
                continue;
            }
            for file in std::fs::read_dir(fan.path())? {
                let file = file?;
                let name = file.file_name().to_string_lossy().into_owned();
                let meta = file.metadata()?;
                if !is_blob_name(&name) || !meta.is_file() {
                    let _ = std::fs::remove_file(file.path());
                    continue;
                }
                let modified = meta.modified().unwrap_or(std::time::SystemTime::UNIX_EPOCH);
                found.push((modified, name, meta.len()));
            }
        }
        found.sort();
        let cache = BlobCache { dir, bound, index: Mutex::new(Index::default()) };
        let gone = {
            let mut index = cache.index.lock();
            for (_, sha, len) in &found {
                index.insert(sha, charge(*len));
            }
            index.trim(bound)
        };
        for sha in gone {
            let _ = std::fs::remove_file(cache.path(&sha));
        }
        Ok(cache)
    }

    pub(crate) fn path(&self, sha256: &str) -> PathBuf {
        self.dir.join(sha256.get(0..2).unwrap_or("xx")).join(sha256)
    }

    /// Whether a blob of `len` bytes may be cached at all.
    pub(crate) fn admits(&self, len: u64) -> bool {
        charge(len) <= self.bound
    }

    /// The cached copy of `sha256`, if any; counts as a use.
    pub(crate) fn lookup(&self, sha256: &str) -> Option<PathBuf> {
        let mut index = self.index.lock();
        let index = &mut *index;
        let now = index.clock + 1;
        let entry = index.entries.get_mut(sha256)?;
        let before = std::mem::replace(&mut entry.1, now);
        index.clock = now;
        index.by_use.remove(&before);
        index.by_use.insert(now, sha256.to_owned());
        Some(self.path(sha256))
    }

    /// Forgets `sha256` (its file turned out to be gone).
    pub(crate) fn forget(&self, sha256: &str) {
        self.index.lock().remove(sha256);
    }

    /// Moves the complete, synced file `src` holding blob `sha256` (`len`
    /// bytes) into the cache, evicting least recently used blobs to make
    /// room; a blob the cache cannot admit, or one it holds already, leaves
    /// `src` where it is (the caller removes it).
    pub(crate) async fn adopt(&self, sha256: &str, len: u64, src: &Path) -> StoreResult<()> {
        if !self.admits(len) || self.index.lock().entries.contains_key(sha256) {
            return Ok(());
        }
        let target = self.path(sha256);
        if let Some(dir) = target.parent() {
            tokio::fs::create_dir_all(dir).await?;
        }
        tokio::fs::rename(src, &target).await?;
        let gone = {
            let mut index = self.index.lock();
            index.insert(sha256, charge(len));
            index.trim(self.bound)
        };
        for sha in gone {
            let _ = tokio::fs::remove_file(self.path(&sha)).await;
        }
        Ok(())
    }

    /// Removes `sha256` from the cache (its blob was collected).
    pub(crate) async fn remove(&self, sha256: &str) {
        if self.index.lock().remove(sha256) {
            let _ = tokio::fs::remove_file(self.path(sha256)).await;
        }
    }

    /// The bytes charged for the blobs cached now.
    #[cfg(test)]
    pub(crate) fn held(&self) -> u64 {
        self.index.lock().held
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(n: u8) -> String {
        format!("{n:02x}").repeat(32)
    }

    async fn put(cache: &BlobCache, dir: &Path, n: u8, len: usize) {
        let src = dir.join(format!("staged-{n}"));
        std::fs::write(&src, vec![n; len]).unwrap();
        cache.adopt(&sha(n), len as u64, &src).await.unwrap();
    }

    #[tokio::test]
    async fn the_least_recently_used_blob_goes_first_and_the_bound_holds() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = BlobCache::open(tmp.path().join("cache"), 3 * 10_000).unwrap();
        for n in 1..=3 {
            put(&cache, tmp.path(), n, 10_000).await;
        }
        assert!(cache.lookup(&sha(1)).is_some(), "a use makes 1 the most recent");
        put(&cache, tmp.path(), 4, 10_000).await;
        assert!(cache.held() <= 30_000);
        assert!(cache.lookup(&sha(2)).is_none(), "2 was the least recently used");
        assert!(!cache.path(&sha(2)).exists());
        for n in [1, 3, 4] {
            assert!(cache.path(&sha(n)).exists(), "{n} is kept");
        }
        // Too big to cache at all: left where it was.
        put(&cache, tmp.path(), 5, 30_001).await;
        assert!(cache.lookup(&sha(5)).is_none());
        assert!(tmp.path().join("staged-5").exists());
        // Reopened smaller: trimmed to the new bound, oldest first.
        drop(cache);
        let cache = BlobCache::open(tmp.path().join("cache"), 10_000).unwrap();
        assert_eq!(cache.held(), 10_000);
    }
}

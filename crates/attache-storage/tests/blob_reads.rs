//! `read_blob` on both backends: every kind of range (start, middle, end,
//! the whole blob, empty, past the end, an empty blob) reads exactly the
//! bytes written, in bounded chunks; the object-store backend fetches only
//! the asked range (a partial read caches nothing) and keeps its local cache
//! within `blob_cache_bytes`, evicting the least recently used blob. The
//! PostgreSQL half runs on a throwaway cluster (or `ATTACHE_TEST_PG_URL`);
//! without PostgreSQL it prints why and passes (`ATTACHE_REQUIRE_SERVICES=1`
//! makes that a failure).

use std::ops::Range;
use std::path::Path;

use attache_storage::embedded::{EmbeddedConfig, EmbeddedStore};
use attache_storage::postgres::test_cluster::TestCluster;
use attache_storage::postgres::{self, PgConfig};
use attache_storage::{StoreError, StreamStore, BLOB_CHUNK};
use bytes::Bytes;
use futures::TryStreamExt;

mod blobs;
use blobs::{blob_stream, pattern};

/// Stores `bytes` as the blob of a new stream at `path`; its sha256.
async fn store_blob(store: &dyn StreamStore, path: &str, bytes: &[u8]) -> String {
    let mut writer = store.stage_blob().await.unwrap();
    for chunk in bytes.chunks(100_000) {
        writer.write(Bytes::copy_from_slice(chunk)).await.unwrap();
    }
    let staged = writer.finish().await.unwrap();
    let info = store.create_blob_stream(blob_stream(path), staged).await.unwrap();
    info.blob.unwrap().sha256
}

/// Reads `range` of `sha` and checks it against `bytes` (the blob's content):
/// the length, the served range, the bytes, and that no chunk is empty or over the bound.
async fn check_range(store: &dyn StreamStore, sha: &str, bytes: &[u8], range: Range<u64>, what: &str) {
    let read = store.read_blob(sha, range.clone()).await.unwrap_or_else(|e| panic!("{what}: {e}"));
    let len = bytes.len() as u64;
    assert_eq!(read.len, len, "{what}: length");
    let end = range.end.min(len);
    let expected = if range.start < end { range.start..end } else { len..len };
    assert_eq!(read.range, expected, "{what}: served range");
    let chunks: Vec<Bytes> = read.body.try_collect().await.unwrap_or_else(|e| panic!("{what}: {e}"));
    for chunk in &chunks {
        assert!(!chunk.is_empty() && chunk.len() <= BLOB_CHUNK, "{what}: a chunk of {} bytes", chunk.len());
    }
    assert!(
        chunks.concat() == bytes[expected.start as usize..expected.end as usize],
        "{what}: bytes differ from those written"
    );
}

/// Every kind of range against a blob of `bytes`.
async fn every_range(store: &dyn StreamStore, sha: &str, bytes: &[u8], who: &str) {
    let len = bytes.len() as u64;
    let cases: Vec<(Range<u64>, &str)> = vec![
        (0..10, "the first bytes"),
        (len / 3..len / 3 + 1, "one byte in the middle"),
        (len / 2 - 5000..len / 2 + 300_000, "a middle range crossing chunk bounds"),
        (len - 7..len, "the last bytes"),
        (len - 7..len + 1000, "a range running past the end"),
        (len..len + 10, "a range starting at the end"),
        (len + 5..len + 10, "a range starting past the end"),
        (100..100, "an empty range"),
        #[allow(clippy::reversed_empty_ranges)]
        (200..100, "a backwards range"),
        (0..len, "the whole blob"),
        (0..u64::MAX, "everything"),
    ];
    for (range, what) in cases {
        check_range(store, sha, bytes, range, &format!("{who}, {what}")).await;
    }
}

async fn absent_blobs_are_not_found(store: &dyn StreamStore) {
    for name in ["0".repeat(64), "../../etc/passwd".into(), "ab".into(), "g".repeat(64)] {
        assert!(matches!(store.read_blob(&name, 0..10).await, Err(StoreError::NotFound)), "{name}: not found");
    }
}

#[tokio::test]
async fn embedded_ranged_blob_reads_return_exactly_the_asked_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(EmbeddedConfig::new(dir.path())).unwrap();
    let bytes = pattern(1_000_003, 1);
    let sha = store_blob(&store, "/blob/big", &bytes).await;
    every_range(&store, &sha, &bytes, "embedded").await;
    let empty = store_blob(&store, "/blob/empty", b"").await;
    for range in [0..0, 0..10, 5..10] {
        check_range(&store, &empty, b"", range.clone(), &format!("embedded, empty blob, {range:?}")).await;
    }
    absent_blobs_are_not_found(&store).await;
    store.close().await;
}

fn cluster() -> Option<TestCluster> {
    match TestCluster::start(false) {
        Ok(c) => Some(c),
        Err(why) => {
            postgres::test_cluster::missing_service("PostgreSQL", &why);
            None
        }
    }
}

/// A PostgreSQL store over `objects` with its own scratch dir `scratch`.
async fn pg_store(url: &str, objects: &Path, scratch: &Path, cache_bytes: u64) -> postgres::PgBackend {
    let mut config = PgConfig::new(url.to_owned(), scratch);
    config.object_store_url = Some(format!("file://{}", objects.display()));
    config.blob_cache_bytes = cache_bytes;
    postgres::open(config).await.expect("open a postgres store")
}

/// The bytes of the files under `dir`, and how many there are.
fn disk_use(dir: &Path) -> (u64, usize) {
    let (mut bytes, mut files) = (0, 0);
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let meta = entry.metadata().unwrap();
            if meta.is_dir() {
                todo.push(entry.path());
            } else {
                bytes += meta.len();
                files += 1;
            }
        }
    }
    (bytes, files)
}

#[test]
fn postgres_ranged_blob_reads_fetch_only_the_asked_bytes() {
    let Some(cluster) = cluster() else { return };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let url = cluster.fresh_database().await.unwrap();
        let objects = tempfile::tempdir().unwrap();
        let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        // `a` uploads (and so caches); `b` has never seen the blob.
        let a = pg_store(&url, objects.path(), dir_a.path(), 64 << 20).await.store;
        let b = pg_store(&url, objects.path(), dir_b.path(), 64 << 20).await.store;
        let bytes = pattern(1_000_003, 2);
        let sha = store_blob(&a, "/blob/big", &bytes).await;
        let empty = store_blob(&a, "/blob/empty", b"").await;
        let cache_b = dir_b.path().join("blob-cache");

        every_range(&a, &sha, &bytes, "postgres, from the uploader's cache").await;
        // Every range but the whole blob: `b` fetches just those bytes and caches nothing.
        for (range, what) in [(0..10, "start"), (400_000..700_000, "middle"), (bytes.len() as u64 - 3..u64::MAX, "end")]
        {
            check_range(&b, &sha, &bytes, range, &format!("postgres, object store, {what}")).await;
            assert_eq!(disk_use(&cache_b), (0, 0), "a partial read ({what}) leaves the cache empty");
        }
        // The stream read path reads a range too.
        let batch = b.read("/blob/big", attache_storage::ReadFrom::At(attache_core::Offset(999_000)), 500).await;
        assert_eq!(batch.unwrap().body, bytes[999_000..999_500]);
        assert_eq!(disk_use(&cache_b), (0, 0), "a stream read of part of a blob leaves the cache empty");
        for range in [0..0, 0..10, 5..10] {
            check_range(&b, &empty, b"", range.clone(), &format!("postgres, empty blob, {range:?}")).await;
        }
        absent_blobs_are_not_found(&b).await;

        // A whole read fills `b`'s cache once the reader has all of it.
        check_range(&b, &sha, &bytes, 0..u64::MAX, "postgres, object store, whole").await;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while disk_use(&cache_b) != (bytes.len() as u64, 1) {
            assert!(std::time::Instant::now() < deadline, "the whole read is cached: {:?}", disk_use(&cache_b));
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        every_range(&b, &sha, &bytes, "postgres, from the reader's cache").await;
        a.close().await;
        b.close().await;
    });
}

#[test]
fn postgres_blob_cache_stays_within_its_bound_and_evicts_the_least_recently_used() {
    let Some(cluster) = cluster() else { return };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let url = cluster.fresh_database().await.unwrap();
        let objects = tempfile::tempdir().unwrap();
        let scratch = tempfile::tempdir().unwrap();
        const BLOB: usize = 100_000;
        const BOUND: u64 = 3 * BLOB as u64 + 50_000;
        let store = pg_store(&url, objects.path(), scratch.path(), BOUND).await.store;
        let cache = scratch.path().join("blob-cache");
        let mut blobs = Vec::new();
        for n in 0..8u32 {
            let bytes = pattern(BLOB, 10 + n);
            let sha = store_blob(&store, &format!("/blob/{n}"), &bytes).await;
            blobs.push((sha, bytes));
            // Blob 0 is read after every upload: the most recently used, it stays.
            check_range(&store, &blobs[0].0, &blobs[0].1, 0..u64::MAX, "blob 0").await;
            let (held, files) = disk_use(&cache);
            assert!(held <= BOUND, "after {} uploads the cache holds {held} bytes, over its bound {BOUND}", n + 1);
            assert!(files <= 3, "after {} uploads the cache holds {files} blobs", n + 1);
        }
        assert!(cache.join(&blobs[0].0[..2]).join(&blobs[0].0).exists(), "the blob read all along is kept");
        assert!(!cache.join(&blobs[1].0[..2]).join(&blobs[1].0).exists(), "an old unread blob was evicted");
        // Evicted blobs still read, from the object store.
        for (n, (sha, bytes)) in blobs.iter().enumerate() {
            check_range(&store, sha, bytes, 1000..2000, &format!("blob {n} after evictions")).await;
        }
        store.close().await;

        // Reopened with a smaller bound, the cache is trimmed to it.
        let store = pg_store(&url, objects.path(), scratch.path(), BLOB as u64).await.store;
        assert!(disk_use(&cache).0 <= BLOB as u64, "reopened smaller: {:?}", disk_use(&cache));
        check_range(&store, &blobs[3].0, &blobs[3].1, 5..50, "after reopening").await;
        store.close().await;
    });
}

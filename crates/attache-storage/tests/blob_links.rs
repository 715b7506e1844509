//! `link_blob_stream` on both backends: a new blob stream over the bytes of
//! another, with no byte copied; the bytes stay while either holds them and
//! go with the last. Refusals (no source, a source that holds no blob, a
//! taken path) change nothing. The PostgreSQL half runs on a throwaway
//! cluster (or `ATTACHE_TEST_PG_URL`); without PostgreSQL it prints why and passes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use attache_core::{ContentType, StreamPath};
use attache_storage::embedded::{EmbeddedConfig, EmbeddedStore};
use attache_storage::postgres::test_cluster::TestCluster;
use attache_storage::postgres::{self, PgConfig};
use attache_storage::{CreateStream, ReadFrom, StoreError, StreamStore};
use bytes::Bytes;

fn blob_stream(path: &str, content_type: Option<&str>) -> CreateStream {
    CreateStream {
        path: StreamPath::new(path).unwrap(),
        content_type: content_type.map(|t| ContentType::parse(t).unwrap()),
        ttl: None,
        expires_at: None,
        closed: true,
        initial: Bytes::new(),
        fork: None,
        owner: Some("user:alice".into()),
        take_kept_path: false,
    }
}

async fn read_all(store: &dyn StreamStore, path: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let mut from = ReadFrom::Start;
    loop {
        let batch = store.read(path, from, 1 << 20).await.unwrap();
        out.extend_from_slice(&batch.body);
        if batch.up_to_date() {
            return out;
        }
        from = ReadFrom::At(batch.next);
    }
}

/// Every file under `dir` whose name is `sha` (the blob, wherever the backend keeps it).
fn copies_of(dir: &Path, sha: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                todo.push(path);
            } else if path.file_name().is_some_and(|n| n == sha) {
                found.push(path);
            }
        }
    }
    found
}

async fn until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The same story on either backend; `bytes_dir` is where its blob files live.
async fn a_linked_stream_shares_the_bytes_until_the_last_holder_goes(store: &dyn StreamStore, bytes_dir: &Path) {
    let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let mut writer = store.stage_blob().await.unwrap();
    for chunk in payload.chunks(256 << 10) {
        writer.write(Bytes::copy_from_slice(chunk)).await.unwrap();
    }
    let staged = writer.finish().await.unwrap();
    let source = store.create_blob_stream(blob_stream("/e/a/attachments/x", Some("image/png")), staged).await.unwrap();
    let sha = source.blob.clone().unwrap().sha256;
    assert_eq!(copies_of(bytes_dir, &sha).len(), 1);

    // Refusals first: each changes nothing.
    let none = store.link_blob_stream(blob_stream("/e/b/attachments/x", None), "/e/a/attachments/nope").await;
    assert_eq!(none.unwrap_err(), StoreError::NotFound);
    let mut plain = blob_stream("/e/a/main", Some("application/json"));
    plain.closed = false;
    store.create(plain).await.unwrap();
    let not_blob = store.link_blob_stream(blob_stream("/e/b/attachments/x", None), "/e/a/main").await;
    assert!(matches!(not_blob, Err(StoreError::Invalid(_))), "{not_blob:?}");
    let taken = store.link_blob_stream(blob_stream("/e/a/main", None), "/e/a/attachments/x").await;
    assert!(matches!(taken, Err(StoreError::ConfigMismatch(_))), "{taken:?}");
    assert_eq!(store.head("/e/b/attachments/x").await.unwrap_err(), StoreError::NotFound);

    let linked = store.link_blob_stream(blob_stream("/e/b/attachments/x", None), "/e/a/attachments/x").await.unwrap();
    assert_eq!(linked.blob, source.blob, "the same content address");
    assert_eq!(&*linked.content_type, "image/png", "the source's type by default");
    assert!(linked.closed);
    assert_eq!(linked.tail, payload.len() as u64);
    assert_eq!(linked.owner.as_deref(), Some("user:alice"));
    assert_eq!(read_all(store, "/e/b/attachments/x").await, payload);
    assert_eq!(copies_of(bytes_dir, &sha).len(), 1, "no byte copied");

    // The source goes: the link keeps the bytes.
    store.delete("/e/a/attachments/x").await.unwrap();
    assert_eq!(store.head("/e/a/attachments/x").await.unwrap_err(), StoreError::NotFound);
    assert_eq!(read_all(store, "/e/b/attachments/x").await, payload);
    assert_eq!(copies_of(bytes_dir, &sha).len(), 1);

    // The last holder goes: so do the bytes.
    store.delete("/e/b/attachments/x").await.unwrap();
    until("the blob to be freed", || copies_of(bytes_dir, &sha).is_empty()).await;
}

#[tokio::test]
async fn embedded_a_linked_blob_stream_shares_its_bytes_until_the_last_holder_goes() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(EmbeddedConfig::new(dir.path())).unwrap();
    a_linked_stream_shares_the_bytes_until_the_last_holder_goes(&store, &dir.path().join("blobs")).await;
    store.close().await;
}

#[test]
fn postgres_a_linked_blob_stream_shares_its_bytes_until_the_last_holder_goes_or_skip_without_postgres() {
    let cluster = match TestCluster::start(false) {
        Ok(c) => c,
        Err(why) => {
            attache_storage::postgres::test_cluster::missing_service("PostgreSQL", &why);
            return;
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let url = cluster.fresh_database().await.expect("create a test database");
        let scratch = tempfile::tempdir().unwrap();
        let objects = tempfile::tempdir().unwrap();
        let mut config = PgConfig::new(url, scratch.path());
        config.object_store_url = Some(format!("file://{}", objects.path().display()));
        // Unreferenced blobs are collected at once (every 30 sweeps).
        config.blob_grace = Duration::ZERO;
        config.sweep_interval = Duration::from_millis(20);
        let backend = postgres::open(config).await.expect("open the backend");
        a_linked_stream_shares_the_bytes_until_the_last_holder_goes(&backend.store, objects.path()).await;
        backend.store.close().await;
    });
}

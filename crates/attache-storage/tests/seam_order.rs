//! Two promises of the seam, on both backends:
//! - `append_in_order`: appends placed in sequence (by one task, or by
//!   several taking turns under a lock, as the task face does) commit in that
//!   sequence, whenever (and in whatever order) their futures are awaited,
//!   and a refused one takes only itself out;
//! - `create_blob_stream_and_append`: an upload's blob stream and its row
//!   commit together or not at all;
//! - `signal_covers_commits` (embedded): a write's signal has moved before
//!   its writer is answered.
//!
//! The PostgreSQL half runs on a throwaway cluster (or `ATTACHE_TEST_PG_URL`);
//! without PostgreSQL it prints why and passes.

use std::sync::Arc;
use std::time::Duration;

use attache_core::{ContentType, StreamPath};
use attache_storage::embedded::{EmbeddedConfig, EmbeddedStore};
use attache_storage::postgres::test_cluster::{missing_service, TestCluster};
use attache_storage::postgres::{self, PgConfig};
use attache_storage::{AppendRequest, CreateStream, InOrderAppend, ReadFrom, StoreError, StreamStore};
use bytes::Bytes;

fn stream(path: &str, content_type: &str) -> CreateStream {
    CreateStream {
        path: StreamPath::new(path).unwrap(),
        content_type: Some(ContentType::parse(content_type).unwrap()),
        ttl: None,
        expires_at: None,
        closed: false,
        initial: Bytes::new(),
        fork: None,
        owner: None,
        take_kept_path: false,
    }
}

fn json() -> ContentType {
    ContentType::parse("application/json").unwrap()
}

fn numbered(path: &str, n: u64) -> AppendRequest {
    AppendRequest::json_messages(path.into(), json(), &[n.to_string().into_bytes()], false)
}

/// Every message of a JSON stream, parsed as a number.
async fn numbers(store: &dyn StreamStore, path: &str) -> Vec<u64> {
    let mut out = Vec::new();
    let mut from = ReadFrom::Start;
    loop {
        let batch = store.read(path, from, 1 << 20).await.unwrap();
        for m in batch.messages() {
            out.push(std::str::from_utf8(&m).unwrap().parse().unwrap());
        }
        if batch.up_to_date() {
            return out;
        }
        from = ReadFrom::At(batch.next);
    }
}

const TASKS: u64 = 4;
const EACH: u64 = 150;

/// Several tasks take turns under one lock, each placing an append of the
/// next number (as the task face does under its task lock) and awaiting
/// nothing until the end, then all of its answers newest first. Between
/// turns they yield, so the writer commits batches meanwhile. Every tenth
/// turn also places an append that is refused (a wrong content type).
async fn interleaved_appends_commit_in_the_order_they_were_placed(store: Arc<dyn StreamStore>, path: &str) {
    store.create(stream(path, "application/json")).await.unwrap();
    let turn = Arc::new(tokio::sync::Mutex::new(0u64));
    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        let (store, turn, path) = (store.clone(), turn.clone(), path.to_owned());
        tasks.push(tokio::spawn(async move {
            let mut placed: Vec<(u64, InOrderAppend)> = Vec::new();
            let mut refused = Vec::new();
            for _ in 0..EACH {
                {
                    let mut next = turn.lock().await;
                    if *next % 10 == 3 {
                        let mut wrong = numbered(&path, u64::MAX);
                        wrong.content_type = Some(ContentType::parse("text/plain").unwrap());
                        refused.push(store.append_in_order(wrong));
                    }
                    placed.push((*next, store.append_in_order(numbered(&path, *next))));
                    *next += 1;
                }
                tokio::task::yield_now().await;
            }
            for (n, answer) in placed.into_iter().rev() {
                let outcome = answer.await.unwrap_or_else(|e| panic!("append {n}: {e}"));
                assert!(!outcome.duplicate);
            }
            for answer in refused {
                assert!(matches!(answer.await, Err(StoreError::ContentTypeMismatch { .. })));
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let got = numbers(store.as_ref(), path).await;
    let want: Vec<u64> = (0..TASKS * EACH).collect();
    assert_eq!(got.len(), want.len(), "every append committed once");
    let first_wrong = got.iter().zip(&want).position(|(g, w)| g != w);
    assert_eq!(first_wrong, None, "committed out of order from message {first_wrong:?}: {got:?}");
}

/// An append placed and never awaited (its future dropped at once) still
/// commits, before the ones placed after it.
async fn a_dropped_answer_does_not_drop_the_append(store: &dyn StreamStore, path: &str) {
    store.create(stream(path, "application/json")).await.unwrap();
    for n in 0..20 {
        drop(store.append_in_order(numbered(path, n)));
    }
    store.append_in_order(numbered(path, 20)).await.unwrap();
    assert_eq!(numbers(store, path).await, (0..=20).collect::<Vec<_>>());
}

fn blob_stream(path: &str) -> CreateStream {
    CreateStream { closed: true, owner: Some("user:alice".into()), ..stream(path, "image/png") }
}

async fn staged(store: &dyn StreamStore, bytes: &[u8]) -> attache_storage::StagedBlob {
    let mut writer = store.stage_blob().await.unwrap();
    writer.write(Bytes::copy_from_slice(bytes)).await.unwrap();
    writer.finish().await.unwrap()
}

/// Both commit, or neither: a refused row leaves no blob stream (and no
/// blob), a taken path leaves the row unwritten.
async fn a_blob_stream_and_its_row_commit_together_or_not_at_all(store: &dyn StreamStore) {
    store.create(stream("/e/a/main", "application/json")).await.unwrap();
    let row = |n| numbered("/e/a/main", n);

    let (info, appended) = store
        .create_blob_stream_and_append(blob_stream("/e/a/attachments/x"), staged(store, b"xx").await, row(1), None)
        .await
        .unwrap();
    assert_eq!(info.blob.as_ref().map(|b| b.len), Some(2));
    assert!(info.closed);
    assert_eq!(appended.info.tail, store.head("/e/a/main").await.unwrap().tail);
    assert_eq!(numbers(store, "/e/a/main").await, [1]);
    let bytes = store.read("/e/a/attachments/x", ReadFrom::Start, 1 << 20).await.unwrap().body;
    assert_eq!(&bytes[..], b"xx");

    // The path is taken: no row.
    let taken = store
        .create_blob_stream_and_append(blob_stream("/e/a/attachments/x"), staged(store, b"yy").await, row(2), None)
        .await;
    assert!(matches!(taken, Err(StoreError::ConfigMismatch(_))), "{taken:?}");
    assert_eq!(numbers(store, "/e/a/main").await, [1]);

    // The row is refused (its stream closed, or missing): no blob stream.
    let close = AppendRequest { close: true, body: Bytes::new(), messages: None, ..row(0) };
    store.append(close).await.unwrap();
    let closed = store
        .create_blob_stream_and_append(blob_stream("/e/a/attachments/y"), staged(store, b"zz").await, row(3), None)
        .await;
    assert!(matches!(closed, Err(StoreError::Closed { .. })), "{closed:?}");
    assert_eq!(store.head("/e/a/attachments/y").await.unwrap_err(), StoreError::NotFound);
    let missing = store
        .create_blob_stream_and_append(
            blob_stream("/e/b/attachments/y"),
            staged(store, b"zz").await,
            numbered("/e/b/main", 4),
            None,
        )
        .await;
    assert_eq!(missing.unwrap_err(), StoreError::NotFound);
    assert_eq!(store.head("/e/b/attachments/y").await.unwrap_err(), StoreError::NotFound);
    assert_eq!(numbers(store, "/e/a/main").await, [1]);
}

fn embedded() -> (tempfile::TempDir, Arc<EmbeddedStore>) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = EmbeddedConfig::new(dir.path());
    // Small batches: the appends of one run span many group commits.
    config.max_batch = 8;
    let store = Arc::new(EmbeddedStore::open(config).unwrap());
    (dir, store)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_appends_placed_in_order_commit_in_that_order() {
    let (_dir, store) = embedded();
    interleaved_appends_commit_in_the_order_they_were_placed(store.clone(), "/order/a").await;
    a_dropped_answer_does_not_drop_the_append(store.as_ref(), "/order/b").await;
    store.close().await;
}

/// `signal_covers_commits`: every commit has moved its stream's signal by
/// the time its caller is answered, whichever call made it and however many
/// writers share its group commit. Each writer marks its own receiver seen
/// before it writes, and finds it moved once answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_a_write_has_moved_its_streams_signal_before_it_is_answered() {
    let (_dir, store) = embedded();
    assert!(store.signal_covers_commits());
    store.create(stream("/signal/rows", "application/json")).await.unwrap();
    store.create(stream("/signal/events", "application/json")).await.unwrap();
    let mut writers = Vec::new();
    for w in 0..4u64 {
        let store = store.clone();
        writers.push(tokio::spawn(async move {
            let mut rows = store.subscribe("/signal/rows").await.unwrap();
            let mut events = store.subscribe("/signal/events").await.unwrap();
            for n in 0..100 {
                rows.borrow_and_update();
                events.borrow_and_update();
                if n % 2 == 0 {
                    store.append_in_order(numbered("/signal/rows", w * 1000 + n)).await.unwrap();
                } else {
                    let pair = (numbered("/signal/rows", n), numbered("/signal/events", n));
                    store.append_in_order_with(pair.0, pair.1, None).await.unwrap();
                    assert!(events.has_changed().unwrap(), "writer {w}, paired append {n}: events");
                }
                assert!(rows.has_changed().unwrap(), "writer {w}, append {n}: rows");
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    // A delete moves it too (the receiver then finds its stream gone).
    let mut rows = store.subscribe("/signal/rows").await.unwrap();
    rows.borrow_and_update();
    store.delete("/signal/rows").await.unwrap();
    assert!(rows.has_changed().is_err() || rows.has_changed().unwrap());
    store.close().await;
}

#[tokio::test]
async fn embedded_a_blob_stream_and_its_row_commit_together_or_not_at_all() {
    let (dir, store) = embedded();
    a_blob_stream_and_its_row_commit_together_or_not_at_all(store.as_ref()).await;
    let blobs = dir.path().join("blobs");
    let stored: Vec<_> = walk(&blobs).into_iter().filter(|p| !p.starts_with(blobs.join("tmp"))).collect();
    assert_eq!(stored.len(), 1, "only the committed blob is stored: {stored:?}");
    store.close().await;
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(walk(&path));
        } else {
            found.push(path);
        }
    }
    found
}

/// Runs `body` against two fresh backends (instances) over one new database.
fn with_postgres<F, Fut>(body: F)
where
    F: FnOnce(postgres::PgBackend, postgres::PgBackend) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let cluster = match TestCluster::start(false) {
        Ok(c) => c,
        Err(why) => return missing_service("PostgreSQL", &why),
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let url = cluster.fresh_database().await.expect("create a test database");
        let scratch = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let objects = tempfile::tempdir().unwrap();
        let open = |dir: &std::path::Path| {
            let mut config = PgConfig::new(url.clone(), dir);
            config.object_store_url = Some(format!("file://{}", objects.path().display()));
            config.max_batch = 8;
            postgres::open(config)
        };
        let a = open(scratch.0.path()).await.expect("open instance a");
        let b = open(scratch.1.path()).await.expect("open instance b");
        body(a, b).await;
    });
}

#[test]
fn postgres_appends_placed_in_order_commit_in_that_order_or_skip_without_postgres() {
    with_postgres(|a, b| async move {
        let store: Arc<dyn StreamStore> = Arc::new(a.store);
        interleaved_appends_commit_in_the_order_they_were_placed(store.clone(), "/order/a").await;
        a_dropped_answer_does_not_drop_the_append(store.as_ref(), "/order/b").await;
        // Streams created by another instance a moment ago: the first appends
        // here must look them up in the database before they can be placed;
        // the ones placed after them wait their turn.
        for round in 0..20 {
            let path = format!("/order/elsewhere-{round}");
            b.store.create(stream(&path, "application/json")).await.unwrap();
            let placed: Vec<InOrderAppend> = (0..30).map(|n| store.append_in_order(numbered(&path, n))).collect();
            for answer in placed.into_iter().rev() {
                answer.await.unwrap();
            }
            assert_eq!(numbers(store.as_ref(), &path).await, (0..30).collect::<Vec<_>>(), "round {round}");
        }
        // A stream nobody made: refused, and the line it queued in goes.
        let refused = store.append_in_order(numbered("/order/nowhere", 0));
        assert_eq!(
            tokio::time::timeout(Duration::from_secs(10), refused).await.unwrap().unwrap_err(),
            StoreError::NotFound
        );
        store.close().await;
        b.store.close().await;
    });
}

#[test]
fn postgres_a_blob_stream_and_its_row_commit_together_or_not_at_all_or_skip_without_postgres() {
    with_postgres(|a, b| async move {
        a_blob_stream_and_its_row_commit_together_or_not_at_all(&a.store).await;
        a.store.close().await;
        b.store.close().await;
    });
}

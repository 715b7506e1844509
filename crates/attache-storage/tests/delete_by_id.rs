//! `delete_id` on both backends: a caller that identified one stream
//! deletes that stream, never another made at the same path since. The
//! PostgreSQL half runs on a throwaway cluster (or `ATTACHE_TEST_PG_URL`);
//! without PostgreSQL it prints why and passes.

use attache_core::{ContentType, StreamPath};
use attache_storage::embedded::{EmbeddedConfig, EmbeddedStore};
use attache_storage::postgres::test_cluster::TestCluster;
use attache_storage::postgres::{self, PgConfig};
use attache_storage::{CreateOutcome, CreateStream, ReadFrom, StoreError, StreamStore};
use bytes::Bytes;

fn stream(path: &str, initial: &'static str) -> CreateStream {
    CreateStream {
        path: StreamPath::new(path).unwrap(),
        content_type: Some(ContentType::parse("text/plain").unwrap()),
        ttl: None,
        expires_at: None,
        closed: false,
        initial: Bytes::from_static(initial.as_bytes()),
        fork: None,
        owner: Some("user:alice".into()),
        take_kept_path: false,
    }
}

async fn create(store: &dyn StreamStore, path: &str, initial: &'static str) -> u64 {
    match store.create(stream(path, initial)).await.unwrap() {
        CreateOutcome::Created(info) => info.id,
        CreateOutcome::Existed(info) => panic!("{path} existed: {info:?}"),
    }
}

async fn a_delete_by_id_deletes_only_the_stream_with_that_id(store: &dyn StreamStore) {
    let first = create(store, "/p/x", "first").await;
    store.delete("/p/x").await.unwrap();
    let second = create(store, "/p/x", "second").await;
    assert_ne!(first, second);

    // The first stream's id no longer names what is at the path: nothing goes.
    assert_eq!(store.delete_id("/p/x", first).await, Err(StoreError::NotFound));
    let batch = store.read("/p/x", ReadFrom::Start, 1 << 20).await.unwrap();
    assert_eq!(&batch.body[..], b"second");
    // An id from another path deletes nothing here either.
    let other = create(store, "/p/y", "other").await;
    assert_eq!(store.delete_id("/p/x", other).await, Err(StoreError::NotFound));
    assert_eq!(store.delete_id("/p/none", second).await, Err(StoreError::NotFound));
    assert_eq!(store.head("/p/x").await.unwrap().id, second);

    // Its own id deletes it.
    store.delete_id("/p/x", second).await.unwrap();
    assert_eq!(store.head("/p/x").await.unwrap_err(), StoreError::NotFound);
    assert_eq!(store.head("/p/y").await.unwrap().id, other);
}

#[tokio::test]
async fn embedded_a_delete_by_id_deletes_only_the_stream_with_that_id() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(EmbeddedConfig::new(dir.path())).unwrap();
    a_delete_by_id_deletes_only_the_stream_with_that_id(&store).await;
    store.close().await;
}

#[test]
fn postgres_a_delete_by_id_deletes_only_the_stream_with_that_id_or_skip_without_postgres() {
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
        let backend = postgres::open(PgConfig::new(url, scratch.path())).await.expect("open the backend");
        a_delete_by_id_deletes_only_the_stream_with_that_id(&backend.store).await;
        backend.store.close().await;
    });
}

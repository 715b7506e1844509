//! `append_guarded` on both backends: a row is written (and a stream
//! deleted with it) only against the state its caller read (no guarded row
//! of its key since, the stream it saw at the path), both or neither;
//! otherwise `Moved` and nothing changes. Rows of other keys do not refuse it. On PostgreSQL the other
//! write comes from a second store on the same database (another instance).
//! The PostgreSQL half runs on a throwaway cluster (or
//! `ATTACHE_TEST_PG_URL`); without PostgreSQL it prints why and passes.

mod support;

use attache_core::ContentType;
use attache_storage::embedded::{EmbeddedConfig, EmbeddedStore};
use attache_storage::{AppendRequest, CreateOutcome, ReadFrom, RowGuard, StoreError, StreamAt, StreamStore};
use support::{on_two_postgres_instances, stream};

async fn create(store: &dyn StreamStore, path: &str, content_type: &str) -> u64 {
    match store.create(stream(path, content_type, Some("user:alice"))).await.unwrap() {
        CreateOutcome::Created(info) => info.id,
        CreateOutcome::Existed(info) => panic!("{path} existed: {info:?}"),
    }
}

fn row(n: u32) -> AppendRequest {
    let message = format!(r#"{{"n":{n}}}"#).into_bytes();
    AppendRequest::json_messages("/e/main".into(), ContentType::parse("application/json").unwrap(), &[message], false)
}

async fn rows(store: &dyn StreamStore) -> Vec<u8> {
    store.read("/e/main", ReadFrom::Start, 1 << 20).await.unwrap().body.to_vec()
}

fn guard(key: &str, since: u64) -> RowGuard {
    RowGuard { key: key.into(), since: attache_core::Offset(since) }
}

/// `mine` decides and writes; `other` is another writer (the same store, or
/// another instance on the same database).
async fn a_guarded_write_lands_only_on_the_state_it_was_decided_from(mine: &dyn StreamStore, other: &dyn StreamStore) {
    create(mine, "/e/main", "application/json").await;
    let bytes = create(mine, "/e/bytes", "application/octet-stream").await;
    mine.append(row(1)).await.unwrap();
    let read = mine.head("/e/main").await.unwrap().tail;

    // A guarded row of the same key came between the read and the write: nothing written.
    other.append_guarded(row(2), guard("k", read), None).await.unwrap();
    let at = StreamAt { path: "/e/bytes".into(), id: Some(bytes) };
    let moved = mine.append_guarded(row(3), guard("k", read), Some(at.clone())).await;
    assert_eq!(moved.unwrap_err(), StoreError::Moved);
    assert_eq!(rows(mine).await, br#"[{"n":1},{"n":2}]"#, "no row of the refused write");
    assert_eq!(mine.head("/e/bytes").await.unwrap().id, bytes, "and its stream is still there");

    // Read again (the refusal left this store's copy up to date). Rows of other
    // keys, and unguarded rows, since then do not refuse it...
    let read = mine.head("/e/main").await.unwrap().tail;
    other.append(row(3)).await.unwrap();
    other.append_guarded(row(4), guard("other key", read), None).await.unwrap();
    // ...but a path holding another stream than the one seen does,
    let wrong = StreamAt { path: "/e/bytes".into(), id: Some(bytes + 1000) };
    assert_eq!(mine.append_guarded(row(5), guard("k", read), Some(wrong)).await.unwrap_err(), StoreError::Moved);
    // and so does a stream made where none was seen.
    other.create(stream("/e/new", "application/octet-stream", Some("user:alice"))).await.unwrap();
    let none = StreamAt { path: "/e/new".into(), id: None };
    assert_eq!(mine.append_guarded(row(5), guard("k", read), Some(none)).await.unwrap_err(), StoreError::Moved);
    assert_eq!(rows(mine).await, br#"[{"n":1},{"n":2},{"n":3},{"n":4}]"#);

    // As read: the row and the delete, in one commit.
    let outcome = mine.append_guarded(row(5), guard("k", read), Some(at)).await.unwrap();
    assert!(outcome.info.tail > read);
    assert_eq!(rows(mine).await, br#"[{"n":1},{"n":2},{"n":3},{"n":4},{"n":5}]"#);
    assert_eq!(mine.head("/e/bytes").await.unwrap_err(), StoreError::NotFound);
    // That write is now the key's newest: a guard read before it is refused,
    let stale = other.append_guarded(row(6), guard("k", read), None).await;
    assert_eq!(stale.unwrap_err(), StoreError::Moved);
    // one read after it is not. No stream expected and none there: the row alone.
    let none = StreamAt { path: "/e/bytes".into(), id: None };
    other.append_guarded(row(6), guard("k", outcome.info.tail), Some(none)).await.unwrap();
    assert_eq!(rows(mine).await, br#"[{"n":1},{"n":2},{"n":3},{"n":4},{"n":5},{"n":6}]"#);
}

async fn staged(store: &dyn StreamStore, bytes: &'static [u8]) -> attache_storage::StagedBlob {
    let mut writer = store.stage_blob().await.unwrap();
    writer.write(bytes::Bytes::from_static(bytes)).await.unwrap();
    writer.finish().await.unwrap()
}

fn blob_stream(path: &str) -> attache_storage::CreateStream {
    attache_storage::CreateStream { closed: true, ..stream(path, "application/octet-stream", Some("user:alice")) }
}

/// An upload's blob stream and its `complete` row, guarded by the row's key
/// (`create_blob_stream_and_append` with a guard): neither is written when a
/// guarded row of the key landed since the read, both are when none did,
/// and the row is then the key's newest.
async fn a_guarded_blob_stream_and_row_land_only_on_the_state_they_were_decided_from(
    mine: &dyn StreamStore,
    other: &dyn StreamStore,
) {
    create(mine, "/e/main", "application/json").await;
    mine.append(row(1)).await.unwrap();
    let read = mine.head("/e/main").await.unwrap().tail;

    other.append_guarded(row(2), guard("attachment:x", read), None).await.unwrap();
    let moved = mine
        .create_blob_stream_and_append(
            blob_stream("/e/attachments/x"),
            staged(mine, b"xx").await,
            row(3),
            Some(guard("attachment:x", read)),
        )
        .await;
    assert_eq!(moved.unwrap_err(), StoreError::Moved);
    assert_eq!(rows(mine).await, br#"[{"n":1},{"n":2}]"#, "no row of the refused write");
    assert_eq!(mine.head("/e/attachments/x").await.unwrap_err(), StoreError::NotFound, "and no blob stream");

    // Read again: rows of other keys since do not refuse it.
    let read = mine.head("/e/main").await.unwrap().tail;
    other.append_guarded(row(3), guard("attachment:y", read), None).await.unwrap();
    let (info, outcome) = mine
        .create_blob_stream_and_append(
            blob_stream("/e/attachments/x"),
            staged(mine, b"xx").await,
            row(4),
            Some(guard("attachment:x", read)),
        )
        .await
        .unwrap();
    assert_eq!(info.blob.map(|b| b.len), Some(2));
    assert_eq!(rows(mine).await, br#"[{"n":1},{"n":2},{"n":3},{"n":4}]"#);
    // Now the key's newest: a guard read before it is refused.
    let stale = other.append_guarded(row(5), guard("attachment:x", read), None).await;
    assert_eq!(stale.unwrap_err(), StoreError::Moved);
    other.append_guarded(row(5), guard("attachment:x", outcome.info.tail), None).await.unwrap();
}

#[tokio::test]
async fn embedded_a_guarded_blob_stream_and_row_land_only_on_the_state_they_were_decided_from() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(EmbeddedConfig::new(dir.path())).unwrap();
    a_guarded_blob_stream_and_row_land_only_on_the_state_they_were_decided_from(&store, &store).await;
    store.close().await;
}

#[test]
fn postgres_a_guarded_blob_stream_and_row_land_only_on_the_state_another_instance_left_or_skip_without_postgres() {
    on_two_postgres_instances(|one, two| {
        Box::pin(a_guarded_blob_stream_and_row_land_only_on_the_state_they_were_decided_from(one, two))
    });
}

/// A task's main stream takes guarded rows (one key per attachment) and is
/// deleted with the task: the writer forgets a deleted stream's keys, so
/// what it holds does not grow with the streams ever written (the soak's
/// slow heap drift, ~8-13 MiB/hour, included these).
#[tokio::test]
async fn embedded_a_deleted_streams_guarded_keys_are_forgotten() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(EmbeddedConfig::new(dir.path())).unwrap();
    for n in 0..50 {
        create(&store, "/e/main", "application/json").await;
        for key in ["attachment:a", "attachment:b"] {
            let read = store.head("/e/main").await.unwrap().tail;
            store.append_guarded(row(n), guard(key, read), None).await.unwrap();
        }
        store.delete("/e/main").await.unwrap();
    }
    assert_eq!(store.guarded_keys_held(), 0, "50 streams written and deleted leave no guarded key behind");
    create(&store, "/e/main", "application/json").await;
    store.append_guarded(row(0), guard("attachment:a", 0), None).await.unwrap();
    assert_eq!(store.guarded_keys_held(), 1, "a live stream's key is held");
    store.close().await;
}

#[tokio::test]
async fn embedded_a_guarded_write_lands_only_on_the_state_it_was_decided_from() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(EmbeddedConfig::new(dir.path())).unwrap();
    a_guarded_write_lands_only_on_the_state_it_was_decided_from(&store, &store).await;
    store.close().await;
}

#[test]
fn postgres_a_guarded_write_lands_only_on_the_state_another_instance_left_or_skip_without_postgres() {
    on_two_postgres_instances(|one, two| {
        Box::pin(a_guarded_write_lands_only_on_the_state_it_was_decided_from(one, two))
    });
}

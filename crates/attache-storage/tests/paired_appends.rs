//! `append_in_order_with` on both backends: two appends to two streams in
//! one commit, both or neither. A refusal of either (its stream closed,
//! missing or of another type) writes nothing to the other; each keeps its
//! place in its own stream's order; bad pairs are `Invalid`. On PostgreSQL
//! the second stream is one another instance created (so the call must look
//! it up: the path through `order.rs`'s lines). The PostgreSQL half runs on
//! a throwaway cluster (or `ATTACHE_TEST_PG_URL`); without PostgreSQL it
//! prints why and passes (CI sets ATTACHE_REQUIRE_SERVICES and fails instead).

mod support;

use attache_core::{ContentType, ProducerHeaders};
use attache_storage::embedded::{EmbeddedConfig, EmbeddedStore};
use attache_storage::{AppendRequest, ReadFrom, RowGuard, StoreError, StreamStore};
use support::{on_two_postgres_instances, stream};

fn rows(path: &str, from: u32, to: u32, close: bool) -> AppendRequest {
    let messages: Vec<Vec<u8>> = (from..to).map(|n| format!(r#"{{"n":{n}}}"#).into_bytes()).collect();
    AppendRequest::json_messages(path.into(), ContentType::parse("application/json").unwrap(), &messages, close)
}

async fn body(store: &dyn StreamStore, path: &str) -> String {
    let batch = store.read(path, ReadFrom::Start, 1 << 20).await.unwrap();
    String::from_utf8(batch.body.to_vec()).unwrap()
}

/// `mine` makes the calls; `other` made `/events` (the same store, or another instance).
async fn two_appends_commit_together_or_not_at_all(mine: &dyn StreamStore, other: &dyn StreamStore) {
    mine.create(stream("/task/main", "application/json", None)).await.unwrap();
    other.create(stream("/events", "application/json", None)).await.unwrap();
    mine.create(stream("/bytes", "application/octet-stream", None)).await.unwrap();
    mine.create(stream("/task/main2", "application/json", None)).await.unwrap();

    // Many pairs placed in sequence, none awaited until all are placed: each
    // stream holds them in placement order.
    let placed: Vec<_> = (0..20)
        .map(|n| mine.append_in_order_with(rows("/task/main", n, n + 1, false), rows("/events", n, n + 1, false), None))
        .collect();
    for (n, answer) in placed.into_iter().enumerate().rev() {
        let outcome = answer.await.unwrap_or_else(|e| panic!("pair {n}: {e}"));
        assert!(!outcome.duplicate);
    }
    let expected: String = format!("[{}]", (0..20).map(|n| format!(r#"{{"n":{n}}}"#)).collect::<Vec<_>>().join(","));
    assert_eq!(body(mine, "/task/main").await, expected);
    assert_eq!(body(mine, "/events").await, expected);
    let answer =
        mine.append_in_order_with(rows("/task/main", 20, 22, false), rows("/events", 20, 21, false), None).await;
    assert_eq!(answer.unwrap().info.path.as_ref(), "/task/main", "the answer is the first append's");

    // The second refused (a stream of another type): the first is not written either.
    let before = body(mine, "/task/main").await;
    let refused =
        mine.append_in_order_with(rows("/task/main", 100, 101, false), rows("/bytes", 0, 1, false), None).await;
    assert!(refused.is_err(), "a JSON row to a binary stream is refused: {refused:?}");
    assert_eq!(body(mine, "/task/main").await, before, "no row of a pair whose second half was refused");
    // The second missing: the same.
    let missing =
        mine.append_in_order_with(rows("/task/main", 100, 101, false), rows("/nowhere", 0, 1, false), None).await;
    assert_eq!(missing.unwrap_err(), StoreError::NotFound);
    assert_eq!(body(mine, "/task/main").await, before);

    // The first closes its stream with its rows; then a pair whose first is refused (closed) writes no event.
    mine.append_in_order_with(rows("/task/main", 22, 23, true), rows("/events", 22, 23, false), None).await.unwrap();
    let events = body(mine, "/events").await;
    let closed =
        mine.append_in_order_with(rows("/task/main", 23, 24, false), rows("/events", 23, 24, false), None).await;
    assert!(matches!(closed, Err(StoreError::Closed { .. })), "{closed:?}");
    assert_eq!(body(mine, "/events").await, events, "no event for a change that was refused");
    assert!(events.ends_with(r#"{"n":22}]"#), "{events}");

    // Guarded: a guarded append of the key landed since the caller read, so neither is written.
    let (main_before, events_before) = (body(mine, "/task/main2").await, body(mine, "/events").await);
    let read = mine.head("/task/main2").await.unwrap().tail;
    let guard = |since| Some(RowGuard { key: "k".into(), since: attache_core::Offset(since) });
    other
        .append_in_order_with(rows("/task/main2", 0, 1, false), rows("/events", 30, 31, false), guard(read))
        .await
        .unwrap();
    let moved =
        mine.append_in_order_with(rows("/task/main2", 1, 2, false), rows("/events", 31, 32, false), guard(read)).await;
    assert_eq!(moved.unwrap_err(), StoreError::Moved);
    assert_eq!(body(mine, "/task/main2").await, main_before.replace("[]", r#"[{"n":0}]"#));
    assert_eq!(body(mine, "/events").await, events_before.replace(r#"{"n":22}]"#, r#"{"n":22},{"n":30}]"#));
    // Read again: it goes; a guard of another key never stands in its way.
    let read = mine.head("/task/main2").await.unwrap().tail;
    other
        .append_in_order_with(
            rows("/task/main2", 9, 10, false),
            rows("/events", 32, 33, false),
            Some(RowGuard { key: "other".into(), since: attache_core::Offset(read) }),
        )
        .await
        .unwrap();
    mine.append_in_order_with(rows("/task/main2", 1, 2, false), rows("/events", 33, 34, false), guard(read))
        .await
        .unwrap();
    assert_eq!(body(mine, "/task/main2").await, r#"[{"n":0},{"n":9},{"n":1}]"#);
    let events = body(mine, "/events").await;

    // Bad pairs: one stream twice, producer headers.
    let same = mine.append_in_order_with(rows("/events", 0, 1, false), rows("/events", 1, 2, false), None).await;
    assert!(matches!(same, Err(StoreError::Invalid(_))), "{same:?}");
    let mut retry = rows("/events", 0, 1, false);
    retry.producer = Some(ProducerHeaders { id: "p".into(), epoch: 0, seq: 0 });
    let producer = mine.append_in_order_with(rows("/task/other", 0, 1, false), retry, None).await;
    assert!(matches!(producer, Err(StoreError::Invalid(_))), "{producer:?}");
    assert_eq!(body(mine, "/events").await, events);
}

#[tokio::test]
async fn embedded_two_appends_commit_together_or_not_at_all() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(EmbeddedConfig::new(dir.path())).unwrap();
    two_appends_commit_together_or_not_at_all(&store, &store).await;
    store.close().await;
}

#[test]
fn postgres_two_appends_commit_together_or_not_at_all_or_skip_without_postgres() {
    on_two_postgres_instances(|one, two| Box::pin(two_appends_commit_together_or_not_at_all(one, two)));
}

//! A registry write whose caller goes away (a cancelled request: the client
//! disconnected while the write's transaction ran) is finished anyway, and
//! leaves the registry whole for the next writer.

mod support;

use std::time::Duration;

use attache_storage::embedded::EmbeddedRegistry;
use attache_storage::Registry;
use support::entity;

/// Starts an update of `/task/t`'s `updated_at_ms` to `at` and drops it at
/// its first wait, as a cancelled request drops it.
async fn update_then_drop(registry: &EmbeddedRegistry, at: i64) {
    let mut update = Box::pin(registry.update_entity(
        "/task/t",
        Box::new(move |e| {
            e.updated_at_ms = at;
            Ok(())
        }),
    ));
    assert!(futures::poll!(&mut update).is_pending(), "the update waits for its transaction");
    drop(update);
}

/// Before, a dropped write never put the file handle back nor updated the
/// cache: the writes that came next failed ("Database already open") while
/// its transaction ran, and the cache missed the change its file held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_write_dropped_by_its_caller_is_finished_and_the_next_writes_go_ahead() {
    let root = tempfile::tempdir().expect("a temporary dir");
    let registry = EmbeddedRegistry::open(root.path()).expect("the registry opens");
    registry.insert_entity(entity("/task/t")).await.expect("the entity");

    for i in 0..20 {
        update_then_drop(&registry, 100 + i).await;
        // Another principal's write, at once.
        registry.insert_entity(entity(&format!("/chat/c{i}"))).await.unwrap_or_else(|e| {
            panic!("round {i}: a write after a dropped one fails: {e:?}");
        });
    }

    // A dropped write with no write after it: the cache shows it once done.
    update_then_drop(&registry, 7).await;
    let mut shown = None;
    for _ in 0..100 {
        shown = registry.entity("/task/t").await.map(|e| e.updated_at_ms);
        if shown == Some(7) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(shown, Some(7), "the dropped update is shown");
    let running: Vec<(String, i64)> =
        registry.entities(None).into_iter().map(|e| (e.url.clone(), e.updated_at_ms)).collect();
    drop(registry);
    tokio::time::sleep(Duration::from_millis(100)).await;

    let reopened = EmbeddedRegistry::open(root.path()).expect("the registry reopens");
    let stored: Vec<(String, i64)> =
        reopened.entities(None).into_iter().map(|e| (e.url.clone(), e.updated_at_ms)).collect();
    assert_eq!(stored, running, "the running registry showed what its file holds");
}

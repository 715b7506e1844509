//! Idempotent producers' state is kept as long as its stream lives (as
//! PROTOCOL.md asks of persistent stores), but memory holds only those
//! changed since the last checkpoint and `producer_cache` others: the rest
//! are read back from redb when they write again. Before (session 16's attack
//! pass), a new `Producer-Id` with each append grew the server by ~155 B an
//! append, without end and across restarts (1.55 million appends: 19 MB to
//! 261 MB). Idempotence holds for a producer that left memory, and across a
//! restart.

mod support;

use std::time::Duration;

use attache_core::{ContentType, ProducerHeaders};
use attache_storage::embedded::{EmbeddedConfig, EmbeddedStore};
use attache_storage::{AppendRequest, StreamStore};
use bytes::Bytes;

const PRODUCERS: usize = 200;

fn append(producer: usize, seq: u64) -> AppendRequest {
    AppendRequest {
        path: "/p".into(),
        content_type: Some(ContentType::parse("text/plain").unwrap()),
        body: Bytes::from(format!("{producer}:{seq};")),
        close: false,
        seq: None,
        producer: Some(ProducerHeaders { id: format!("producer-{producer}"), epoch: 0, seq }),
        messages: None,
    }
}

fn config(dir: &std::path::Path) -> EmbeddedConfig {
    let mut config = EmbeddedConfig::new(dir);
    config.producer_cache = 10;
    config.checkpoint_interval = Duration::from_millis(50);
    config
}

/// Waits until the writer holds at most `most` producers (a checkpoint lets
/// clean ones go), plus the probe's own producer read back.
async fn until_held_at_most(store: &EmbeddedStore, most: usize) {
    for _ in 0..200 {
        if store.producers_held() <= most + 1 {
            return;
        }
        // A batch after the checkpoint publishes the count.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let _ = store.append(append(0, 0)).await;
    }
    panic!("the writer still holds {} producers", store.producers_held());
}

#[tokio::test]
async fn producers_that_left_memory_are_still_idempotent_and_memory_holds_a_bounded_few() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(config(dir.path())).unwrap();
    store.create(support::stream("/p", "text/plain", None)).await.unwrap();
    for p in 0..PRODUCERS {
        let outcome = store.append(append(p, 0)).await.unwrap();
        assert!(!outcome.duplicate, "producer {p}'s first append is new data");
    }
    until_held_at_most(&store, 10).await;
    let tail = store.head("/p").await.unwrap().tail;
    // Every retry of an acknowledged append is a duplicate, read back from disk.
    for p in 0..PRODUCERS {
        let outcome = store.append(append(p, 0)).await.unwrap();
        assert!(outcome.duplicate, "producer {p}'s retry was taken as new data");
    }
    assert_eq!(store.head("/p").await.unwrap().tail, tail, "no retry wrote anything");
    // And the next seq of each is new data.
    for p in 0..PRODUCERS {
        assert!(!store.append(append(p, 1)).await.unwrap().duplicate, "producer {p}'s seq 1");
    }
    until_held_at_most(&store, 10).await;
    store.close().await;
    drop(store);

    let store = EmbeddedStore::open(config(dir.path())).unwrap();
    assert_eq!(store.producers_held(), 0, "nothing is loaded at start");
    for p in 0..PRODUCERS {
        assert!(store.append(append(p, 1)).await.unwrap().duplicate, "producer {p}'s retry after a restart");
    }
    let gap = store.append(append(7, 5)).await;
    assert!(gap.is_err(), "a gap is still a gap: {gap:?}");
}

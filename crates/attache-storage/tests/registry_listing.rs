//! Listing the registry hands out the records it keeps, not copies: a
//! `task.list` or `task.claim` once listed every task (whoever owned it)
//! before it kept those the caller may see, and a copy of each held as many
//! bytes as the registry itself for the call's length.

mod support;

use std::sync::Arc;

use attache_storage::embedded::EmbeddedRegistry;
use attache_storage::Registry;
use support::entity;

#[tokio::test]
async fn listing_entities_shares_the_records_the_registry_keeps() {
    let root = tempfile::tempdir().expect("a temporary dir");
    let registry = EmbeddedRegistry::open(root.path()).expect("the registry opens");
    for i in 0..3 {
        registry.insert_entity(entity(&format!("/task/t{i}"))).await.expect("the entity");
    }
    let (first, second) = (registry.entities(Some("task")), registry.entities(Some("task")));
    assert_eq!(first.len(), 3);
    for (a, b) in first.iter().zip(&second) {
        assert!(Arc::ptr_eq(a, b), "{} was copied", a.url);
    }
    let shared = registry.entity_shared("/task/t0").await.expect("t0");
    assert!(first.iter().any(|e| Arc::ptr_eq(e, &shared)), "the listing holds the record a lookup shares");
}

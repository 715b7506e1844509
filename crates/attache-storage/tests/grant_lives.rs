//! A grant is stored only into the life of the entity it was decided for
//! (`NewGrant::incarnation`), in both backends: once that entity is removed,
//! or removed and spawned again at its URL by someone else, the grant is
//! `NotFound` and nothing is stored. Session 21's attack pass: a grant whose
//! write came just after a purge was kept, and the next entity spawned at
//! the URL gave its grantee `manage`. On PostgreSQL the removal and the new
//! entity come through another instance, whose change the granting instance
//! may not have heard yet: the database decides, not its cache.

mod support;

use attache_core::{GrantSubject, Permission, Propagation};
use attache_storage::embedded::EmbeddedRegistry;
use attache_storage::{EntityRecord, NewGrant, Registry, StoreError, StreamStore};

fn manage_for_bob(entity: &EntityRecord) -> NewGrant {
    NewGrant {
        entity_url: entity.url.clone(),
        incarnation: entity.incarnation.clone(),
        subject: GrantSubject::Principal("/principal/user%3Abob".into()),
        permission: Permission::Manage,
        expires_at: None,
        expires_at_ms: None,
        created_by: "/principal/user%3Abob".into(),
        propagation: Propagation::Own,
        copy_to_children: false,
    }
}

/// The entity at `url` in another life (spawned again after a purge).
fn respawned(url: &str) -> EntityRecord {
    let mut next = support::entity(url);
    next.incarnation = Some(format!("{url}@next"));
    next.created_by = "/principal/user%3Aalice".into();
    next
}

/// `granting` adds grants; `changing` removes and spawns (the same registry,
/// or another instance of it).
async fn a_grant_lands_only_in_its_own_life(granting: &dyn Registry, changing: &dyn Registry) {
    let url = "/chat/trap";
    let first = support::entity(url);
    assert!(changing.insert_entity(first.clone()).await.expect("spawn").1);
    let kept = granting.add_grant(manage_for_bob(&first)).await.expect("a grant into the current life");

    changing.remove_entity(url).await.expect("purge");
    let after_purge = granting.add_grant(manage_for_bob(&first)).await;
    assert!(matches!(after_purge, Err(StoreError::NotFound)), "a grant for a purged life: {after_purge:?}");

    let next = respawned(url);
    assert!(changing.insert_entity(next.clone()).await.expect("spawn again").1);
    let into_next = granting.add_grant(manage_for_bob(&first)).await;
    assert!(matches!(into_next, Err(StoreError::NotFound)), "a grant for the old life on the new one: {into_next:?}");

    let grants = changing.grants(url);
    assert!(grants.iter().all(|g| g.id != kept.id), "the purge took the first life's grant: {grants:?}");
    assert!(grants.is_empty(), "nothing of the first life reaches the next: {grants:?}");
    // Another instance hears the purge by notification, a moment later.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while !granting.grants(url).is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "the granting instance still shows {:?}", granting.grants(url));
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    granting.add_grant(manage_for_bob(&next)).await.expect("a grant into the new life");
}

#[tokio::test]
async fn the_embedded_registry_stores_a_grant_only_in_the_life_it_was_decided_for() {
    let root = tempfile::tempdir().expect("a temporary dir");
    let registry = EmbeddedRegistry::open(root.path()).expect("the registry opens");
    a_grant_lands_only_in_its_own_life(&registry, &registry).await;
}

#[test]
fn a_postgres_instance_stores_a_grant_only_in_the_life_it_was_decided_for_whatever_its_cache_heard() {
    support::on_two_postgres_backends(|a, b| async move {
        // b grants, a purges and spawns: b's cache may still show the first life.
        a_grant_lands_only_in_its_own_life(&b.registry, &a.registry).await;
        a.store.close().await;
        b.store.close().await;
    });
}

/// A grant left without its entity by an earlier version (a grant that raced
/// a purge was kept by URL alone) is removed when the registry opens: the
/// next entity spawned at its URL starts with no grant.
#[tokio::test]
async fn an_orphan_grant_left_by_an_earlier_version_is_removed_at_open() {
    const GRANTS: redb::TableDefinition<(&str, u64), &[u8]> = redb::TableDefinition::new("grants");
    let root = tempfile::tempdir().expect("a temporary dir");
    let url = "/chat/trap";
    {
        let registry = EmbeddedRegistry::open(root.path()).expect("the registry opens");
        let kept = support::entity("/chat/kept");
        registry.insert_entity(kept.clone()).await.expect("spawn");
        registry.add_grant(manage_for_bob(&kept)).await.expect("a grant with its entity");
    }
    {
        // What an earlier version could leave: a grant at a URL with no entity.
        let db = redb::Database::open(root.path().join("registry.redb")).expect("the registry file");
        let txn = db.begin_write().expect("a write");
        let orphan = manage_for_bob(&support::entity(url)).into_record(9_999);
        let bytes = serde_json::to_vec(&orphan).expect("a grant record");
        txn.open_table(GRANTS).expect("grants").insert((url, 9_999), bytes.as_slice()).expect("insert");
        txn.commit().expect("commit");
    }
    let registry = EmbeddedRegistry::open(root.path()).expect("the registry reopens");
    assert!(registry.grants(url).is_empty(), "the orphan is gone: {:?}", registry.grants(url));
    assert!(registry.insert_entity(respawned(url)).await.expect("spawn at its URL").1);
    assert!(registry.grants(url).is_empty(), "the new entity starts with no grant");
    assert_eq!(registry.grants("/chat/kept").len(), 1, "a grant whose entity is there stays");
}

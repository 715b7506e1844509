//! The registry cache of a PostgreSQL instance never takes an older read over
//! a change it has heard of: a lookup of an entity the instance had not
//! cached yet, which read the entity and its grants before a change committed
//! through another instance and puts them in the cache after the instance
//! applied that change's notification, reads again instead. Before, the
//! lookup's older read won: a revoked grant (or a removed entity) came back on
//! that instance and stayed until the entity changed again.
//!
//! Held at the registry's test pauses: the listener of instance b waits
//! (`NOTIFIED`) so the entity is not in b's cache yet, the lookup waits
//! between its read and its install (`LOOKUP_INSTALL`). Runs on a throwaway
//! PostgreSQL cluster (or `ATTACHE_TEST_PG_URL`); without any PostgreSQL
//! installed it prints why and passes.

mod support;

use std::sync::Arc;
use std::time::Duration;

use attache_storage::postgres::registry::{LOOKUP_INSTALL, NOTIFIED};
use attache_storage::postgres::PgRegistry;
use attache_storage::{EntityRecord, NewGrant, Registry};
use support::on_two_postgres_backends;

fn entity(url: &str) -> EntityRecord {
    EntityRecord {
        url: url.into(),
        entity_type: "task".into(),
        instance_id: url.rsplit('/').next().unwrap().into(),
        status: "idle".into(),
        tags: Default::default(),
        args: None,
        created_by: "/_principal/user/alice".into(),
        created_at_ms: 1,
        updated_at_ms: 1,
        extra: None,
        incarnation: Some("i1".into()),
        parent: None,
        ancestors: Vec::new(),
    }
}

fn read_grant_to_bob(url: &str) -> NewGrant {
    NewGrant {
        entity_url: url.into(),
        incarnation: Some("i1".into()),
        subject: attache_core::GrantSubject::Principal("/_principal/user/bob".into()),
        permission: attache_core::Permission::Read,
        expires_at: None,
        expires_at_ms: None,
        created_by: "/_principal/user/alice".into(),
        propagation: Default::default(),
        copy_to_children: false,
    }
}

/// Waits until `b`'s cache holds `marker` (inserted through another instance
/// after the changes of interest): notifications come in commit order, so b's
/// listener has applied those changes by then.
async fn until_heard(b: &PgRegistry, marker: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !b.entities(None).iter().any(|e| e.url == marker) {
        assert!(tokio::time::Instant::now() < deadline, "b never heard of {marker}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Instance b's listener held on the notification of `url`'s insert, and a
/// lookup of `url` on b held after its read (which found what `before` made);
/// then `change` runs through instance a, b's listener applies it, and the
/// lookup is let go. Answers b's registry once all is done.
async fn lookup_across_a_change<F, Fut>(
    a: Arc<PgRegistry>,
    b: Arc<PgRegistry>,
    url: &str,
    before: impl std::future::Future<Output = ()>,
    change: F,
) -> Arc<PgRegistry>
where
    F: FnOnce(Arc<PgRegistry>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let listener = b.pauses().arm(NOTIFIED);
    a.insert_entity(entity(url)).await.unwrap();
    before.await;
    listener.reached().await;
    assert!(b.entities(None).is_empty(), "b's listener has not applied the insert yet");

    let lookup = b.pauses().arm(LOOKUP_INSTALL);
    let looking = tokio::spawn({
        let (b, url) = (b.clone(), url.to_owned());
        async move { b.entity(&url).await }
    });
    lookup.reached().await;

    change(a.clone()).await;
    listener.release();
    a.insert_entity(entity("/task/marker")).await.unwrap();
    until_heard(&b, "/task/marker").await;

    lookup.release();
    looking.await.unwrap();
    b
}

#[test]
fn a_lookup_that_read_a_grant_before_its_revoke_through_another_instance_does_not_bring_it_back() {
    on_two_postgres_backends(|a, b| async move {
        let (a, b) = (Arc::new(a.registry), Arc::new(b.registry));
        let url = "/task/t1";
        let granted = Arc::new(parking_lot::Mutex::new(None));
        let before = {
            let (a, granted) = (a.clone(), granted.clone());
            async move {
                *granted.lock() = Some(a.add_grant(read_grant_to_bob(url)).await.unwrap().id);
            }
        };
        let id = || granted.lock().expect("granted");
        let b = lookup_across_a_change(a, b, url, before, |a| async move {
            assert!(a.remove_grant(url, id()).await.unwrap());
        })
        .await;

        assert!(b.entity(url).await.is_some());
        assert!(
            b.grants(url).iter().all(|g| g.id != id()),
            "the revoked grant is back in b's cache: {:?}",
            b.grants(url)
        );
    });
}

#[test]
fn a_lookup_that_read_an_entity_before_its_removal_through_another_instance_does_not_bring_it_back() {
    on_two_postgres_backends(|a, b| async move {
        let (a, b) = (Arc::new(a.registry), Arc::new(b.registry));
        let url = "/task/t1";
        let b = lookup_across_a_change(a, b, url, async {}, |a| async move {
            assert!(a.remove_entity(url).await.unwrap());
        })
        .await;

        assert!(
            b.entities(None).iter().all(|e| e.url != url),
            "the removed entity is back in b's cache: {:?}",
            b.entities(None)
        );
        assert!(!b.is_current(url, Some("i1")));
    });
}

//! `Registry::entities_for` (what `task.list`, `task.claim` and the entity
//! list start from) gives, in both backends, the entities a brute-force scan
//! of every record finds for the principal: those it created, those holding a
//! grant for it or for its kind, and those under an ancestor whose grant for
//! it reaches descendants; all of them for a built-in system principal. Over
//! a seeded random run of spawns, updates (new owner, new ancestors),
//! removals, grants and revokes, checked after every change, after a reopen
//! (the embedded cache reloaded from its file), on a second PostgreSQL
//! instance that heard the changes by notification, and on a third that
//! loaded everything at its start. The PostgreSQL half runs on a throwaway
//! cluster (or `ATTACHE_TEST_PG_URL`); without PostgreSQL it prints why and
//! passes.

mod support;

use std::time::Duration;

use attache_core::{GrantSubject, Permission, PrincipalKey, PrincipalKind, Propagation};
use attache_storage::embedded::EmbeddedRegistry;
use attache_storage::postgres::{self, PgConfig};
use attache_storage::{Ancestor, EntityRecord, NewGrant, Registry, StoreError, StreamStore};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const URLS: usize = 12;
const STEPS: usize = 150;

fn principals() -> Vec<PrincipalKey> {
    let mut all: Vec<PrincipalKey> = [
        (PrincipalKind::User, "alice"),
        (PrincipalKind::User, "bob"),
        (PrincipalKind::Agent, "carol"),
        (PrincipalKind::Service, "dave"),
        (PrincipalKind::System, "eve"),
    ]
    .into_iter()
    .map(|(kind, id)| PrincipalKey::new(kind, id).unwrap())
    .collect();
    all.push(PrincipalKey::parse(PrincipalKey::DEV_LOCAL).unwrap());
    all
}

fn url(i: usize) -> String {
    format!("/{}/e{i}", if i.is_multiple_of(3) { "chat" } else { "task" })
}

fn record(u: usize, by: &PrincipalKey, at: i64, ancestors: &[usize]) -> EntityRecord {
    let url = url(u);
    let (entity_type, instance_id) = url[1..].split_once('/').unwrap();
    EntityRecord {
        url: url.clone(),
        entity_type: entity_type.to_owned(),
        instance_id: instance_id.to_owned(),
        status: "idle".into(),
        tags: Default::default(),
        args: None,
        created_by: by.url(),
        created_at_ms: at,
        updated_at_ms: at,
        extra: None,
        incarnation: Some(format!("{url}@{at}")),
        parent: ancestors.first().map(|a| self::url(*a)),
        ancestors: ancestors.iter().map(|a| Ancestor { url: self::url(*a), incarnation: None }).collect(),
    }
}

/// What `who` may possibly see in `registry`, by scanning every record.
fn scanned(registry: &dyn Registry, who: &PrincipalKey, type_filter: Option<&str>) -> Vec<String> {
    let matching = |url: &str, below: bool| {
        registry
            .grants(url)
            .iter()
            .any(|g| g.subject.matches(who) && (!below || g.propagation == Propagation::Descendants))
    };
    registry
        .entities(type_filter)
        .into_iter()
        .filter(|e| {
            who.is_built_in_system()
                || e.created_by == who.url()
                || matching(&e.url, false)
                || e.ancestors.iter().any(|a| matching(&a.url, true))
        })
        .map(|e| e.url.clone())
        .collect()
}

/// `entities_for` equals the scan for every principal and type filter.
fn check(registry: &dyn Registry, when: &str) {
    let mut seen = 0;
    for who in principals() {
        for type_filter in [None, Some("task"), Some("chat")] {
            let found: Vec<String> = registry.entities_for(&who, type_filter).iter().map(|e| e.url.clone()).collect();
            assert_eq!(found, scanned(registry, &who, type_filter), "{when}: {who}, type {type_filter:?}");
            seen += found.len();
        }
    }
    assert!(seen > 0 || registry.entities(None).is_empty(), "{when}: nothing seen by anyone");
}

/// A seeded random run of changes through `registry`, checked after each one
/// unless `settle`: a PostgreSQL instance also applies the notifications of
/// its own changes, re-read from the database a moment later, so its cache
/// is checked once it has settled (below), not between two changes.
async fn random_changes(registry: &dyn Registry, seed: u64, settle: bool) {
    let mut rng = StdRng::seed_from_u64(seed);
    let who = principals();
    for step in 0..STEPS {
        let u = rng.random_range(0..URLS);
        let target = url(u);
        match rng.random_range(0..10) {
            0..=2 => {
                let ancestors: Vec<usize> = (0..rng.random_range(0..3)).map(|_| rng.random_range(0..URLS)).collect();
                let by = &who[rng.random_range(0..who.len())];
                registry.insert_entity(record(u, by, rng.random_range(0..5), &ancestors)).await.unwrap();
            }
            3 => {
                // A new owner and new ancestors for a stored entity: its place in the indexes moves.
                let ancestors: Vec<usize> = (0..rng.random_range(0..3)).map(|_| rng.random_range(0..URLS)).collect();
                let by = who[rng.random_range(0..who.len())].url();
                let changed = registry
                    .update_entity(
                        &target,
                        Box::new(move |e| {
                            e.created_by = by;
                            e.ancestors =
                                ancestors.iter().map(|a| Ancestor { url: url(*a), incarnation: None }).collect();
                            Ok(())
                        }),
                    )
                    .await;
                assert!(changed.is_ok() || registry.entity(&target).await.is_none(), "{changed:?}");
            }
            4 => {
                registry.remove_entity(&target).await.unwrap();
            }
            5..=7 => {
                let to = &who[rng.random_range(0..who.len())];
                let subject = if rng.random_bool(0.3) {
                    GrantSubject::PrincipalKind(to.kind().as_str().to_owned())
                } else {
                    GrantSubject::Principal(to.url())
                };
                let propagation = if rng.random_bool(0.5) { Propagation::Descendants } else { Propagation::Own };
                // A grant is stored only into the life of an entity that is there.
                let life = registry.entity(&target).await.map(|e| e.incarnation);
                let added = registry
                    .add_grant(NewGrant {
                        entity_url: target.clone(),
                        incarnation: life.clone().flatten(),
                        subject,
                        permission: Permission::Read,
                        expires_at: None,
                        expires_at_ms: None,
                        created_by: who[0].url(),
                        propagation,
                        copy_to_children: false,
                    })
                    .await;
                match life {
                    Some(_) => drop(added.unwrap()),
                    None => assert!(matches!(added, Err(StoreError::NotFound)), "{added:?}"),
                }
            }
            _ => {
                let grants = registry.grants(&target);
                if !grants.is_empty() {
                    let id = grants[rng.random_range(0..grants.len())].id;
                    assert!(registry.remove_grant(&target, id).await.unwrap());
                }
            }
        }
        if !settle {
            check(registry, &format!("step {step}"));
        }
    }
}

#[tokio::test]
async fn the_embedded_registry_lists_for_a_principal_what_a_scan_of_every_entity_finds() {
    let root = tempfile::tempdir().unwrap();
    for seed in 0..4 {
        let dir = root.path().join(format!("r{seed}"));
        {
            let registry = EmbeddedRegistry::open(&dir).unwrap();
            random_changes(&registry, seed, false).await;
        }
        let reopened = EmbeddedRegistry::open(&dir).unwrap();
        check(&reopened, "reopened");
    }
}

/// Every entity (owner, ancestors) and its grants, as `registry` holds them.
fn snapshot(registry: &dyn Registry) -> Vec<(String, String, Vec<Ancestor>, Vec<u64>)> {
    let mut all: Vec<_> = registry
        .entities(None)
        .iter()
        .map(|e| {
            (
                e.url.clone(),
                e.created_by.clone(),
                e.ancestors.clone(),
                registry.grants(&e.url).iter().map(|g| g.id).collect(),
            )
        })
        .collect();
    all.sort_by(|x, y| x.0.cmp(&y.0));
    all
}

#[test]
fn every_postgres_instance_lists_for_a_principal_what_a_scan_of_every_entity_finds() {
    let Some(cluster) = support::postgres_cluster() else { return };
    let objects = tempfile::tempdir().unwrap();
    support::runtime().block_on(async {
        let url = cluster.fresh_database().await.expect("create a test database");
        let mut dirs = Vec::new();
        let mut open = || {
            let dir = tempfile::tempdir().unwrap();
            let mut config = PgConfig::new(url.clone(), dir.path());
            config.object_store_url = Some(format!("file://{}", objects.path().display()));
            dirs.push(dir);
            postgres::open(config)
        };
        let a = open().await.expect("open instance a");
        let b = open().await.expect("open instance b");
        random_changes(&a.registry, 7, true).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        check(&a.registry, "instance a");

        // b hears every change by notification.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while snapshot(&b.registry) != snapshot(&a.registry) {
            assert!(tokio::time::Instant::now() < deadline, "b never heard of every change");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        check(&b.registry, "instance b");

        // A third instance loads everything at its start.
        let c = open().await.expect("open instance c");
        assert_eq!(snapshot(&c.registry), snapshot(&a.registry));
        check(&c.registry, "instance c");
        for instance in [a, b, c] {
            instance.store.close().await;
        }
    });
}

//! What the storage tests share: a stream and an entity to create, and the
//! PostgreSQL harness (a throwaway cluster, or `ATTACHE_TEST_PG_URL`; without
//! PostgreSQL it says why and the test passes, unless
//! `ATTACHE_REQUIRE_SERVICES` makes that a failure, as in CI).
#![allow(dead_code)] // each test binary uses its own part of this

use std::future::Future;
use std::path::Path;

use attache_core::{ContentType, StreamPath};
use attache_storage::postgres::test_cluster::{missing_service, TestCluster};
use attache_storage::postgres::{self, PgBackend, PgConfig};
use attache_storage::{CreateStream, EntityRecord, StreamStore};
use bytes::Bytes;
use futures::future::BoxFuture;

/// A new open stream at `path` of `content_type`, created by `owner`.
pub fn stream(path: &str, content_type: &str, owner: Option<&str>) -> CreateStream {
    CreateStream {
        path: StreamPath::new(path).unwrap(),
        content_type: Some(ContentType::parse(content_type).unwrap()),
        ttl: None,
        expires_at: None,
        closed: false,
        initial: Bytes::new(),
        fork: None,
        owner: owner.map(str::to_owned),
        take_kept_path: false,
    }
}

/// An idle entity at `url` (`/type/id`), created by alice, whose incarnation is its url.
pub fn entity(url: &str) -> EntityRecord {
    let (entity_type, instance_id) = url.trim_start_matches('/').split_once('/').expect("/type/id");
    EntityRecord {
        url: url.to_owned(),
        entity_type: entity_type.to_owned(),
        instance_id: instance_id.to_owned(),
        status: "idle".into(),
        tags: Default::default(),
        args: None,
        created_by: "/principal/user%3Aalice".into(),
        created_at_ms: 1,
        updated_at_ms: 1,
        extra: None,
        incarnation: Some(url.to_owned()),
        parent: None,
        ancestors: Vec::new(),
    }
}

/// A multi-threaded runtime of two workers (the machine has two cores).
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// The PostgreSQL cluster to test on, or `None` (having said why) without one.
pub fn postgres_cluster() -> Option<TestCluster> {
    match TestCluster::start(false) {
        Ok(c) => Some(c),
        Err(why) => {
            missing_service("PostgreSQL", &why);
            None
        }
    }
}

/// Two instances (each with its own scratch directory) over one fresh
/// database of `cluster` and one object store in `objects`.
pub async fn two_instances(cluster: &TestCluster, objects: &Path) -> (PgBackend, PgBackend, Vec<tempfile::TempDir>) {
    let url = cluster.fresh_database().await.expect("create a test database");
    let mut dirs = Vec::new();
    let mut open = || {
        let dir = tempfile::tempdir().unwrap();
        let mut config = PgConfig::new(url.clone(), dir.path());
        config.object_store_url = Some(format!("file://{}", objects.display()));
        dirs.push(dir);
        postgres::open(config)
    };
    let a = open().await.expect("open instance a");
    let b = open().await.expect("open instance b");
    (a, b, dirs)
}

/// Runs `scenario` with two instances from `two_instances` on a fresh
/// database, or only says why not without PostgreSQL.
pub fn on_two_postgres_backends<F: Future<Output = ()>>(scenario: impl FnOnce(PgBackend, PgBackend) -> F) {
    let Some(cluster) = postgres_cluster() else { return };
    let objects = tempfile::tempdir().unwrap();
    runtime().block_on(async {
        let (a, b, _dirs) = two_instances(&cluster, objects.path()).await;
        scenario(a, b).await;
    });
}

/// Runs `scenario` with two store instances on one fresh PostgreSQL database
/// (two processes of a scale-out deployment), then closes both.
pub fn on_two_postgres_instances(
    scenario: impl for<'a> FnOnce(&'a dyn StreamStore, &'a dyn StreamStore) -> BoxFuture<'a, ()>,
) {
    let Some(cluster) = postgres_cluster() else { return };
    runtime().block_on(async {
        let url = cluster.fresh_database().await.expect("create a test database");
        let (s1, s2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let one = postgres::open(PgConfig::new(url.clone(), s1.path())).await.expect("open the first instance");
        let two = postgres::open(PgConfig::new(url, s2.path())).await.expect("open the second instance");
        scenario(&one.store, &two.store).await;
        one.store.close().await;
        two.store.close().await;
    });
}

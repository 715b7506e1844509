//! What the storage tests that run one scenario on both backends share: a
//! stream to create, and the PostgreSQL harness (a throwaway cluster, or
//! `ATTACHE_TEST_PG_URL`; without PostgreSQL it says why and the test passes,
//! unless `ATTACHE_REQUIRE_SERVICES` makes that a failure, as in CI).
#![allow(dead_code)] // each test binary uses its own part of this

use attache_core::{ContentType, StreamPath};
use attache_storage::postgres::test_cluster::{missing_service, TestCluster};
use attache_storage::postgres::{self, PgConfig};
use attache_storage::{CreateStream, StreamStore};
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

/// Runs `scenario` with two store instances on one fresh PostgreSQL database
/// (two processes of a scale-out deployment), then closes both.
pub fn on_two_postgres_instances(
    scenario: impl for<'a> FnOnce(&'a dyn StreamStore, &'a dyn StreamStore) -> BoxFuture<'a, ()>,
) {
    let cluster = match TestCluster::start(false) {
        Ok(c) => c,
        Err(why) => {
            missing_service("PostgreSQL", &why);
            return;
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let url = cluster.fresh_database().await.expect("create a test database");
        let (s1, s2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let one = postgres::open(PgConfig::new(url.clone(), s1.path())).await.expect("open the first instance");
        let two = postgres::open(PgConfig::new(url, s2.path())).await.expect("open the second instance");
        scenario(&one.store, &two.store).await;
        one.store.close().await;
        two.store.close().await;
    });
}

//! The scale-out backend against the same model as the embedded engine
//! (`model/mod.rs`): every case runs on a fresh database of a throwaway
//! PostgreSQL cluster (or `ATTACHE_TEST_PG_URL`), and `Restart` reopens the
//! store over the same database.

mod model;
mod support;

use attache_storage::postgres::test_cluster::TestCluster;
use attache_storage::postgres::{self, PgConfig};
use attache_storage::StreamStore;
use model::*;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

/// A fresh database, opened (and reopened after restarts) as a `PgStore`.
fn postgres_store(cluster: &TestCluster) -> Opener {
    let url = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(cluster.fresh_database())
        .expect("create a test database");
    let dir = tempfile::tempdir().unwrap();
    Box::new(move || {
        let mut config = PgConfig::new(url.clone(), dir.path());
        config.object_store_url = Some("memory://".into());
        Box::pin(async move {
            Box::new(postgres::open(config).await.expect("open the postgres store").store) as Box<dyn StreamStore>
        })
    })
}

#[test]
fn postgres_store_behaves_like_the_model_or_skips_without_postgres() {
    let Some(cluster) = support::postgres_cluster() else { return };
    run_with(&model::a_fork_that_fails_does_not_keep_its_source_alive(), postgres_store(&cluster));
    run_with(&model::fork_chains_read_through_deleted_sources_across_restarts(), postgres_store(&cluster));
    let cases = std::env::var("ATTACHE_PG_MODEL_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(24);
    let mut runner = TestRunner::new(Config { cases, failure_persistence: None, ..Config::default() });
    runner
        .run(&prop::collection::vec(op(), 1..40), |ops| {
            run_with(&ops, postgres_store(&cluster));
            Ok(())
        })
        .unwrap();
}

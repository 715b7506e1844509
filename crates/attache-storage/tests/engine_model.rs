//! The embedded engine against the model in `model/mod.rs`.

mod model;

use attache_storage::embedded::{EmbeddedConfig, EmbeddedStore};
use attache_storage::StreamStore;
use model::*;
use proptest::prelude::*;

/// An embedded store in a temporary directory that outlives its restarts.
fn embedded() -> Opener {
    let dir = tempfile::tempdir().unwrap();
    Box::new(move || {
        let store = EmbeddedStore::open(EmbeddedConfig::new(dir.path())).unwrap();
        Box::pin(async move { Box::new(store) as Box<dyn StreamStore> })
    })
}

fn run(ops: &[Op]) {
    run_with(ops, embedded());
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 64,
        // A failure prints its shrunk case; nothing is written beside the tests.
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn embedded_store_behaves_like_the_model(ops in prop::collection::vec(op(), 1..50)) {
        run(&ops);
    }
}

#[test]
fn a_fork_that_fails_does_not_keep_its_source_alive() {
    run(&model::a_fork_that_fails_does_not_keep_its_source_alive());
}

#[test]
fn fork_chains_read_through_deleted_sources_across_restarts() {
    run(&model::fork_chains_read_through_deleted_sources_across_restarts());
}

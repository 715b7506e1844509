//! The embedded engine against the model in `model/mod.rs`.

mod model;

use attache_storage::embedded::{EmbeddedConfig, EmbeddedStore};
use attache_storage::{FaultPlan, StreamStore};
use model::*;
use proptest::prelude::*;

/// An embedded store in a temporary directory that outlives its restarts.
fn embedded() -> Opener {
    let dir = tempfile::tempdir().unwrap();
    Box::new(move || {
        let mut config = EmbeddedConfig::new(dir.path());
        // Every read of a hot file left in it, however small: the model checks those too.
        config.file_body_min = 1;
        let store = EmbeddedStore::open(config).unwrap();
        Box::pin(async move { Box::new(store) as Box<dyn StreamStore> })
    })
}

fn run(ops: &[Op]) {
    run_with(ops, embedded());
}

/// An embedded store that crashes at every restart: the next store opens a
/// copy of the files as they are on disk while the previous one still runs
/// (no close, so no final checkpoint). Checkpoints are an hour apart, so
/// everything since the first open lives in the write-ahead log, and recovery
/// is the log's replay.
fn embedded_crashing() -> Opener {
    crashing_with(|config| config.checkpoint_interval = std::time::Duration::from_secs(3600))
}

/// Like `embedded_crashing`, but checkpoints every millisecond and the log's
/// files are small, so a crash lands in every phase of a checkpoint: a log
/// file sealed, its segment files syncing on the checkpoint thread while
/// batches go on into the other file, the durable commit that frees it.
fn embedded_crashing_mid_checkpoint() -> Opener {
    crashing_with(|config| {
        config.checkpoint_interval = std::time::Duration::from_millis(1);
        config.wal_bytes = 2 << 10;
    })
}

/// An embedded store, configured by `configure`, that crashes at every
/// restart: each open takes a copy of the previous generation's files while
/// that store still runs.
fn crashing_with(configure: impl Fn(&mut EmbeddedConfig) + Send + 'static) -> Opener {
    let root = tempfile::tempdir().unwrap();
    let mut generation = 0u32;
    // The running generation's files go through this plan (no faults), so a
    // copy of them can be taken between two writes, as a kill would leave
    // them: a copy taken during a write would hold a state no crash can.
    let mut running: Option<FaultPlan> = None;
    Box::new(move || {
        let from = root.path().join(generation.to_string());
        generation += 1;
        let to = root.path().join(generation.to_string());
        std::fs::create_dir_all(&to).unwrap();
        if from.exists() {
            match &running {
                Some(plan) => plan.frozen(|| copy_dir(&from, &to)),
                None => copy_dir(&from, &to),
            }
        }
        let mut config = EmbeddedConfig::new(&to);
        config.file_body_min = 1;
        configure(&mut config);
        let plan = FaultPlan::new();
        config.fault_plan = Some(plan.clone());
        running = Some(plan);
        let store = EmbeddedStore::open(config).unwrap();
        Box::pin(async move { Box::new(store) as Box<dyn StreamStore> })
    })
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            std::fs::create_dir_all(&target).unwrap();
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
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

    #[test]
    fn embedded_store_recovers_from_crashes_like_the_model(ops in prop::collection::vec(op(), 1..50)) {
        run_with_crashes(&ops, embedded_crashing());
    }

    #[test]
    fn embedded_store_recovers_from_crashes_mid_checkpoint_like_the_model(ops in prop::collection::vec(op(), 1..50)) {
        run_with_crashes(&ops, embedded_crashing_mid_checkpoint());
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

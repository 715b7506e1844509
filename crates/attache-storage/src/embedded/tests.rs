//! The engine's memory for boundaries not yet in redb (`marks.rs`).

use std::time::{Duration, Instant};

use bytes::Bytes;

use super::*;
use crate::{Fault, FaultPlan, FaultPoint};

/// Boundaries held in the streams' pending lists.
fn pending(store: &EmbeddedStore) -> usize {
    store.shared.index.read().by_id.values().map(|e| e.pending.lock().len()).sum()
}

fn append(body: &str) -> AppendRequest {
    AppendRequest {
        path: "/s".to_owned(),
        content_type: Some(attache_core::stream::ContentType::parse("application/json").unwrap()),
        body: Bytes::copy_from_slice(body.as_bytes()),
        close: false,
        seq: None,
        producer: None,
        messages: None,
    }
}

async fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !ok() {
        assert!(Instant::now() < deadline, "{what}: not within 5 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// While checkpoints fail (a segment file that cannot sync: the log is
/// never freed), appends go on into the log until both of its files are
/// full, then are refused: the pending lists never hold more boundaries than
/// the log does (each is an 18-byte op there). The first checkpoint that
/// succeeds empties them.
#[tokio::test]
async fn pending_boundaries_are_bounded_by_the_log_while_checkpoints_fail_and_leave_at_the_next_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let plan = FaultPlan::new();
    let mut config = EmbeddedConfig::new(dir.path());
    config.wal_bytes = 16 << 10;
    config.checkpoint_interval = Duration::from_millis(20);
    config.sweep_interval = Duration::from_secs(3600);
    config.fault_plan = Some(plan.clone());
    let store = EmbeddedStore::open(config.clone()).unwrap();
    let req = CreateStream::for_tests("/s", Some("application/json"));
    store.create(req).await.unwrap();
    plan.fail_all(FaultPoint::SegmentSync, Fault::Io);
    // Many small messages per append: boundaries, not bytes, fill the log.
    let body = format!("[{}]", vec!["1"; 64].join(","));
    let mut acked = 0;
    let mut refused = false;
    for _ in 0..10_000 {
        match store.append(append(&body)).await {
            Ok(_) => acked += 1,
            Err(err) => {
                assert!(err.is_io(), "{err:?} is a clean disk error");
                refused = true;
                break;
            }
        }
    }
    assert!(refused, "appends are refused once the log is full and cannot be checkpointed");
    assert!(plan.injected(FaultPoint::SegmentSync) > 0, "checkpoints met the fault");
    let held = pending(&store);
    assert!(held >= acked * 64 / 2, "{held} boundaries pending after {acked} appends: most are only in the log");
    let bound = (2 * config.wal_bytes / 18) as usize;
    assert!(held <= bound, "{held} pending boundaries: more than the log's two files can hold ({bound})");
    // Failing checkpoints and refused appends add nothing.
    for _ in 0..20 {
        assert!(store.append(append(&body)).await.is_err(), "the log is still full");
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(pending(&store), held, "refused appends and failed checkpoints leave the pending lists alone");
    plan.clear();
    wait_for("a checkpoint succeeds and empties the pending lists", || pending(&store) == 0).await;
    store.append(append(&body)).await.unwrap();
    wait_for("the next checkpoint takes the new boundaries too", || pending(&store) == 0).await;
    store.close().await;
}

//! The release binary's allocator (jemalloc, the default feature) reports what
//! it holds on `GET /metrics`, so a soak can tell live memory from pages the
//! allocator keeps.

#![cfg(feature = "jemalloc")]

mod common;

use common::{client, ServerProcess};
use reqwest::StatusCode;

fn gauge(text: &str, name: &str) -> Option<u64> {
    text.lines().find(|l| l.split_whitespace().next() == Some(name))?.split_whitespace().nth(1)?.parse().ok()
}

#[tokio::test]
async fn metrics_report_the_allocators_live_and_resident_bytes() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let server = ServerProcess::start(&dir.path().join("data"), &dir.path().join("server.log"), &[]).await;
    let res = client().get(server.url("/metrics")).send().await.expect("/metrics answers");
    assert_eq!(res.status(), StatusCode::OK);
    let text = res.text().await.expect("the metrics");
    let allocated = gauge(&text, "attache_allocator_allocated_bytes").expect("allocated bytes are reported");
    let active = gauge(&text, "attache_allocator_active_bytes").expect("active bytes are reported");
    let resident = gauge(&text, "attache_allocator_resident_bytes").expect("resident bytes are reported");
    assert!(gauge(&text, "attache_allocator_retained_bytes").is_some(), "retained bytes are reported: {text}");
    assert!(gauge(&text, "attache_allocator_metadata_bytes").is_some(), "metadata bytes are reported: {text}");
    // A running server holds something, and what it holds sits in pages jemalloc keeps resident.
    assert!(allocated > 0, "{text}");
    assert!(
        allocated <= active && active <= resident,
        "allocated {allocated} <= active {active} <= resident {resident}"
    );
}

//! Input bounds: every buffer a client fills has a limit, and a client over
//! it gets its documented answer quickly while the server keeps serving
//! others (docs/SECURITY.md, "Input bounds and caches").

mod common;
mod task_helpers;

use std::time::{Duration, Instant};

use common::TestServer;
use reqwest::StatusCode;
use serde_json::Value;
use task_helpers::{rpc_raw, ALICE};

/// `/healthz` answers at once: the server was not stalled by what a test sent.
async fn assert_responsive(s: &TestServer) {
    let started = Instant::now();
    let res = s.client.get(s.url("/healthz")).send().await.expect("/healthz answers");
    assert_eq!(res.status(), StatusCode::OK);
    assert!(started.elapsed() < Duration::from_secs(2), "/healthz took {:?}", started.elapsed());
}

fn batch_of(n: usize) -> String {
    format!("[{}]", vec![r#"{"jsonrpc":"2.0","method":"task.get","params":{"id":"t-x"},"id":1}"#; n].join(","))
}

#[tokio::test]
async fn a_batch_over_the_limit_is_refused_with_32600_naming_the_limit() {
    let s = TestServer::start().await;
    // Small items, so the body stays under the 4 MiB body limit.
    let body = format!("[{}]", vec![r#"{"id":1}"#; 100_000].join(","));
    let (status, res) = rpc_raw(&s, ALICE, body).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(res["error"]["code"], -32600, "{res}");
    assert!(res["error"]["data"]["reason"].as_str().unwrap_or("").contains("at most 100"), "{res}");
    assert_responsive(&s).await;
}

/// The batch is counted as it is read: the items after the limit are never
/// parsed, so what follows them cannot matter (the old code parsed the whole
/// body into a tree first and answered this with -32700). Memory itself is
/// measured in the report, not here.
#[tokio::test]
async fn a_batch_is_refused_as_soon_as_it_passes_the_limit() {
    let s = TestServer::start_with(|c| c.rpc_max_batch = 10).await;
    let body = format!("{},{}", &batch_of(11)[..batch_of(11).len() - 1], "not json at all");
    let (_, res) = rpc_raw(&s, ALICE, body).await;
    assert_eq!(res["error"]["code"], -32600, "{res}");
    let (_, res) = rpc_raw(&s, ALICE, batch_of(10)).await;
    assert_eq!(res.as_array().map(Vec::len), Some(10), "{res}");
    let (_, res) = rpc_raw(&s, ALICE, "[1,2,").await;
    assert_eq!(res["error"]["code"], -32700, "{res}");
    let _: Value = res;
}

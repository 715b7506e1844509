//! What a task costs the server's memory, counted by this binary's global
//! allocator (live bytes: allocated less freed). A binary of its own: the
//! counter sees every allocation of the process, so nothing else may run
//! beside a test (they take turns).

mod common;
mod task_helpers;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use common::TestServer;
use serde_json::{json, Value};
use task_helpers::*;

struct Counting;

static LIVE: AtomicI64 = AtomicI64::new(0);
static PEAK: AtomicI64 = AtomicI64::new(0);

fn grew(by: i64) {
    let now = LIVE.fetch_add(by, Ordering::Relaxed) + by;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

// SAFETY: every call goes to `System` as it came; only the count is added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            grew(layout.size() as i64);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            grew(layout.size() as i64);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        grew(-(layout.size() as i64));
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            grew(new_size as i64 - layout.size() as i64);
        }
        p
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

/// The counter sees the whole process: this binary's tests run one at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Live bytes once the server has settled (its writes synced, its answers freed).
async fn settled() -> i64 {
    tokio::time::sleep(Duration::from_millis(300)).await;
    LIVE.load(Ordering::Relaxed)
}

/// Metadata just under `max_entity_data_bytes` (64 KiB), in ~4,600 small
/// members: the shape that costs most as a tree of values.
fn wide_metadata() -> Value {
    Value::Object((0..4600).map(|i| (format!("m{i:05}"), json!(i))).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_held_by_the_server_costs_about_its_json_size_not_a_tree_of_it() {
    const TASKS: i64 = 40;
    let _alone = ONE_AT_A_TIME.lock().await;
    let s = TestServer::start().await;
    let metadata = wide_metadata();
    let text_bytes = metadata.to_string().len() as i64;
    // One first, so what the server sets up once is not counted.
    ok(&s, ALICE, "task.create", json!({"text": "warm", "metadata": metadata})).await;
    ok(&s, ALICE, "task.list", json!({"limit": 1})).await;
    let before = settled().await;
    for i in 0..TASKS {
        ok(&s, ALICE, "task.create", json!({"text": format!("t{i}"), "metadata": metadata})).await;
    }
    let after = settled().await;
    let per_task = (after - before) / TASKS;
    // A list of them all: what it holds while it answers, beyond what was held.
    PEAK.store(LIVE.load(Ordering::Relaxed), Ordering::Relaxed);
    let base = LIVE.load(Ordering::Relaxed);
    let body = json!({"jsonrpc": "2.0", "method": "task.list", "params": {"limit": 1000}, "id": 1}).to_string();
    let res = s.client.post(s.url("/rpc")).header("electric-principal", ALICE).body(body).send().await.unwrap();
    let bytes = res.bytes().await.unwrap();
    // Read before this test parses the answer (a tree of its own).
    let list_peak = PEAK.load(Ordering::Relaxed) - base;
    let listed: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(listed["result"]["totalCount"], TASKS + 1);
    eprintln!(
        "metadata {text_bytes} bytes of JSON; held per task {per_task} bytes ({:.1}x); \
         a task.list of {} tasks peaked at {list_peak} bytes over what was held ({:.1}x their metadata)",
        per_task as f64 / text_bytes as f64,
        TASKS + 1,
        list_peak as f64 / ((TASKS + 1) * text_bytes) as f64,
    );
    // The record as text (~1x), the store's page cache of the record it
    // wrote (~1x) and the rest of a task; as a tree the metadata alone was ~10x.
    assert!(per_task < 4 * text_bytes, "a task holds {per_task} bytes for {text_bytes} bytes of metadata");
}

/// Spawn args are kept as their JSON text too: as a tree of values, 64 KiB of
/// `[0,0,...]` cost ~1 MB per entity for as long as it lived (300 spawns took
/// a server from 14 to 334 MB, and a restart loaded it all again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entity_held_by_the_server_costs_about_its_spawn_args_json_size() {
    const ENTITIES: i64 = 20;
    let _alone = ONE_AT_A_TIME.lock().await;
    let s = TestServer::start().await;
    let args = Value::Array(vec![json!(0); 30_000]);
    let text_bytes = args.to_string().len() as i64;
    let spawn = |i: i64| {
        let body = json!({ "args": args }).to_string();
        s.client
            .put(s.url(&format!("/_electric/entities/chat/wide-{i}")))
            .header("electric-principal", ALICE)
            .body(body)
            .send()
    };
    assert_eq!(spawn(-1).await.unwrap().status(), reqwest::StatusCode::CREATED);
    let before = settled().await;
    for i in 0..ENTITIES {
        assert_eq!(spawn(i).await.unwrap().status(), reqwest::StatusCode::CREATED);
    }
    let per_entity = (settled().await - before) / ENTITIES;
    eprintln!("per entity: {per_entity} bytes for {text_bytes} bytes of spawn args");
    assert!(per_entity < 3 * text_bytes, "an entity holds {per_entity} bytes for {text_bytes} bytes of spawn args");
}

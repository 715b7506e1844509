//! Measures durable append throughput of the embedded engine without HTTP:
//! N concurrent writers append ~150-byte JSON messages to one stream.
//!
//!   cargo run --release -p attache-storage --example append_load -- [writers] [seconds]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use attache_core::{ContentType, StreamPath};
use attache_storage::embedded::{EmbeddedConfig, EmbeddedStore};
use attache_storage::{AppendRequest, CreateStream, StreamStore};

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let writers: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(32);
    let seconds: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(5);
    let dir = std::env::temp_dir().join(format!("attache-append-load-{}", std::process::id()));
    let store = Arc::new(EmbeddedStore::open(EmbeddedConfig::new(&dir)).expect("open store"));
    let json = ContentType::parse("application/json").expect("valid content type");
    store
        .create(CreateStream {
            path: StreamPath::new("/load").expect("valid path"),
            content_type: Some(json.clone()),
            ttl: None,
            expires_at: None,
            closed: false,
            initial: Default::default(),
            fork: None,
            owner: None,
        })
        .await
        .expect("create");
    let body = bytes::Bytes::from_static(br#"{"type":"event","id":"evt-000000001","ts":"2026-01-01T00:00:00.000Z","user":"alice","action":"click","target":"button#submit","value":42}"#);
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for _ in 0..writers {
        let (store, done, body, json) = (store.clone(), done.clone(), body.clone(), json.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                store
                    .append(AppendRequest {
                        path: "/load".into(),
                        content_type: Some(json.clone()),
                        body: body.clone(),
                        close: false,
                        seq: None,
                        producer: None,
                    })
                    .await
                    .expect("append");
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer");
    }
    let n = done.load(Ordering::Relaxed);
    println!("{writers} writers, {seconds}s: {n} durable appends, {:.0}/s", n as f64 / seconds as f64);
    store.close().await;
    let _ = std::fs::remove_dir_all(&dir);
}

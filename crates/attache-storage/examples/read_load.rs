//! Measures catch-up reads without HTTP: S streams of M ~150-byte JSON
//! messages each, read whole from the start (`offset=-1`) by R concurrent
//! readers for a number of seconds; reports bytes/s, reads/s and the RSS.
//!
//!   cargo run --release -p attache-storage --example read_load -- [streams] [messages] [readers] [seconds]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use attache_core::{ContentType, StreamPath};
use attache_storage::embedded::{EmbeddedConfig, EmbeddedStore};
use attache_storage::{AppendRequest, CreateStream, ReadFrom, StreamStore};

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let mut next = |d: u64| args.next().and_then(|a| a.parse().ok()).unwrap_or(d);
    let (streams, messages, readers, seconds) = (next(1000), next(250), next(32), next(5));
    let dir = std::env::temp_dir().join(format!("attache-read-load-{}", std::process::id()));
    let store = Arc::new(EmbeddedStore::open(EmbeddedConfig::new(&dir)).expect("open store"));
    let json = ContentType::parse("application/json").expect("valid content type");
    let body = bytes::Bytes::from_static(br#"{"type":"event","id":"evt-000000001","ts":"2026-01-01T00:00:00.000Z","user":"alice","action":"click","target":"button#submit","value":42}"#);
    let loaded = Instant::now();
    let mut tasks = Vec::new();
    for s in 0..streams {
        let (store, json, body) = (store.clone(), json.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let path = format!("/r/{s}");
            store
                .create(CreateStream {
                    path: StreamPath::new(path.clone()).expect("valid path"),
                    content_type: Some(json.clone()),
                    ttl: None,
                    expires_at: None,
                    closed: false,
                    initial: Default::default(),
                    fork: None,
                    owner: None,
                    take_kept_path: false,
                })
                .await
                .expect("create");
            for _ in 0..messages {
                let req = AppendRequest {
                    path: path.clone(),
                    content_type: Some(json.clone()),
                    body: body.clone(),
                    close: false,
                    seq: None,
                    producer: None,
                    messages: None,
                };
                store.append(req).await.expect("append");
            }
        }));
    }
    for t in tasks {
        t.await.expect("loader");
    }
    println!(
        "loaded {streams} streams x {messages} messages in {:.1}s; RSS {} KiB",
        loaded.elapsed().as_secs_f64(),
        rss_kib()
    );
    let bytes = Arc::new(AtomicU64::new(0));
    let reads = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for r in 0..readers {
        let (store, bytes, reads) = (store.clone(), bytes.clone(), reads.clone());
        tasks.push(tokio::spawn(async move {
            let mut s = r;
            while Instant::now() < deadline {
                let path = format!("/r/{}", s % streams);
                let batch = store.read(&path, ReadFrom::Start, 1 << 20).await.expect("read");
                bytes.fetch_add(batch.byte_len() as u64, Ordering::Relaxed);
                reads.fetch_add(1, Ordering::Relaxed);
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407) >> 1;
                tokio::task::yield_now().await;
            }
        }));
    }
    for t in tasks {
        t.await.expect("reader");
    }
    let (b, n) = (bytes.load(Ordering::Relaxed), reads.load(Ordering::Relaxed));
    println!(
        "{readers} readers, {seconds}s: {n} catch-up reads, {:.0}/s, {:.0} MB/s; RSS after {} KiB",
        n as f64 / seconds as f64,
        b as f64 / seconds as f64 / 1e6,
        rss_kib()
    );
    store.close().await;
    let _ = std::fs::remove_dir_all(&dir);
}

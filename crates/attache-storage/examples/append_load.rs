//! Measures durable append throughput without HTTP: N concurrent writers
//! append ~150-byte JSON messages to one stream.
//!
//!   cargo run --release -p attache-storage --example append_load -- [writers] [seconds]
//!   ... -- [writers] [seconds] --postgres            # the scale-out backend, on a throwaway
//!                                                     # cluster (fsync on) from the installed binaries
//!   ... -- [writers] [seconds] --postgres=URL        # the scale-out backend on that database

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use attache_core::{ContentType, StreamPath};
use attache_storage::embedded::{EmbeddedConfig, EmbeddedStore};
use attache_storage::postgres::test_cluster::TestCluster;
use attache_storage::postgres::{self, PgConfig};
use attache_storage::{AppendRequest, CreateStream, StreamStore};

#[tokio::main]
async fn main() {
    let (flags, args): (Vec<String>, Vec<String>) = std::env::args().skip(1).partition(|a| a.starts_with("--"));
    let mut args = args.into_iter();
    let writers: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(32);
    let seconds: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(5);
    let dir = std::env::temp_dir().join(format!("attache-append-load-{}", std::process::id()));
    let postgres = flags.iter().find_map(|f| f.strip_prefix("--postgres")).map(|u| u.trim_start_matches('='));
    // Kept alive (and stopped on drop) for the run.
    let mut _cluster = None;
    let store: Arc<dyn StreamStore> = match postgres {
        None => Arc::new(EmbeddedStore::open(EmbeddedConfig::new(&dir)).expect("open store")),
        Some(url) => {
            let url = if url.is_empty() {
                let cluster = TestCluster::start(true).expect("a throwaway PostgreSQL cluster");
                let url = cluster.fresh_database().await.expect("a database");
                _cluster = Some(cluster);
                url
            } else {
                url.to_owned()
            };
            let mut config = PgConfig::new(url, &dir);
            config.object_store_url = Some("memory://".into());
            Arc::new(postgres::open(config).await.expect("open the postgres store").store)
        }
    };
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
            take_kept_path: false,
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
                        messages: None,
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
    let backend = if postgres.is_some() { "postgres" } else { "embedded" };
    println!("{backend}: {writers} writers, {seconds}s: {n} durable appends, {:.0}/s", n as f64 / seconds as f64);
    store.close().await;
    let _ = std::fs::remove_dir_all(&dir);
}

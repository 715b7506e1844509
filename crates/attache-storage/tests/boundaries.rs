//! Message boundaries move from memory to the database at each checkpoint
//! (`embedded/marks.rs`); readers must see every one of them all the time.
//! With a checkpoint every millisecond and a tiny log, readers read from
//! every message start they know, with reads cut small, while a writer
//! appends: each read starts where it was asked to, holds whole messages
//! only, and they are the ones written there.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use attache_core::{ContentType, Offset, StreamPath};
use attache_storage::embedded::{EmbeddedConfig, EmbeddedStore};
use attache_storage::{AppendRequest, CreateStream, ForkSpec, ReadFrom, StreamStore};
use bytes::Bytes;
use parking_lot::Mutex;

const JSON: &str = "application/json";

fn create(path: &str, fork: Option<(&str, u64)>) -> CreateStream {
    CreateStream {
        path: StreamPath::new(path).unwrap(),
        content_type: Some(ContentType::parse(JSON).unwrap()),
        ttl: None,
        expires_at: None,
        closed: false,
        initial: Bytes::new(),
        fork: fork.map(|(source, at)| ForkSpec {
            source: StreamPath::new(source).unwrap(),
            offset: Some(Offset(at)),
            sub_offset: 0,
        }),
        owner: None,
        take_kept_path: false,
    }
}

fn append(path: &str, body: String) -> AppendRequest {
    AppendRequest {
        path: path.to_owned(),
        content_type: Some(ContentType::parse(JSON).unwrap()),
        body: Bytes::from(body),
        close: false,
        seq: None,
        producer: None,
        messages: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reads_find_every_message_start_while_checkpoints_move_boundaries_to_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = EmbeddedConfig::new(dir.path());
    config.checkpoint_interval = Duration::from_millis(1);
    config.wal_bytes = 4 << 10;
    let store = Arc::new(EmbeddedStore::open(config).unwrap());
    let streams = ["/a", "/b", "/c"];
    for s in streams {
        store.create(create(s, None)).await.unwrap();
    }
    // Position → message, per stream, as acknowledged.
    let written: Arc<Mutex<BTreeMap<&str, BTreeMap<u64, String>>>> = Arc::default();
    let deadline = Instant::now() + Duration::from_millis(1500);
    let writer = {
        let (store, written) = (store.clone(), written.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < deadline {
                let path = streams[(n % 3) as usize];
                // Messages of varied sizes, two per append every third time.
                let one = format!(r#"{{"n":{n},"pad":"{}"}}"#, "x".repeat((n % 17) as usize));
                let body = if n.is_multiple_of(3) { format!("[{one},{one}]") } else { one.clone() };
                let out = store.append(append(path, body)).await.unwrap();
                let count = if n.is_multiple_of(3) { 2 } else { 1 };
                let mut end = out.info.tail;
                let mut map = written.lock();
                let stream = map.entry(path).or_default();
                for _ in 0..count {
                    let at = end - one.len() as u64 - 1;
                    stream.insert(at, one.clone());
                    end = at;
                }
                n += 1;
            }
            n
        })
    };
    let mut readers = Vec::new();
    for r in 0..3u64 {
        let (store, written) = (store.clone(), written.clone());
        readers.push(tokio::spawn(async move {
            let mut checked = 0u64;
            let mut k = r;
            while Instant::now() < deadline {
                let path = streams[(k % 3) as usize];
                let known: Vec<(u64, String)> = written
                    .lock()
                    .get(path)
                    .map(|m| m.iter().map(|(a, b)| (*a, b.clone())).collect())
                    .unwrap_or_default();
                if known.is_empty() {
                    tokio::task::yield_now().await;
                    k += 1;
                    continue;
                }
                let i = (k as usize * 7919) % known.len();
                let (at, _) = &known[i];
                // A small read: it must end on a boundary too.
                let batch = store.read(path, ReadFrom::At(Offset(*at)), 96).await.unwrap();
                assert_eq!(batch.start, Offset(*at), "{path}: a read from a message start starts there");
                let mut pos = *at;
                let msgs = batch.messages();
                assert!(!msgs.is_empty(), "{path}@{at}: a read carries at least one message");
                for (j, m) in msgs.iter().enumerate() {
                    // Messages appended after `known` was taken are checked by later reads.
                    if let Some((want_at, want)) = known.get(i + j) {
                        assert_eq!(pos, *want_at, "{path}: message positions");
                        assert_eq!(&m[..], want.as_bytes(), "{path}@{pos}: the message written there");
                    }
                    pos += m.len() as u64 + 1;
                }
                assert_eq!(batch.next, Offset(pos), "{path}: the next read starts after the last whole message");
                // A fork at a boundary is accepted; one inside a message is not.
                if k.is_multiple_of(50) {
                    let fork = format!("/fork-{r}-{k}");
                    store.create(create(&fork, Some((path, *at)))).await.unwrap();
                    assert!(store.create(create(&format!("{fork}-bad"), Some((path, *at + 1)))).await.is_err());
                }
                checked += 1;
                k += 1;
            }
            checked
        }));
    }
    let appended = writer.await.unwrap();
    let mut checked = 0;
    for r in readers {
        checked += r.await.unwrap();
    }
    assert!(appended > 100 && checked > 100, "appended {appended}, checked {checked}: too little ran to mean anything");
    // And after a restart every boundary is in the database.
    let map = written.lock().clone();
    Arc::try_unwrap(store).ok().expect("one owner").close().await;
    let store = EmbeddedStore::open(EmbeddedConfig::new(dir.path())).unwrap();
    for (path, messages) in map {
        let all = store.read(path, ReadFrom::Start, usize::MAX).await.unwrap();
        let got: Vec<String> = all.messages().iter().map(|m| String::from_utf8(m.to_vec()).unwrap()).collect();
        let want: Vec<String> = messages.values().cloned().collect();
        assert_eq!(got, want, "{path} after a restart");
        for (at, msg) in messages.iter().step_by(5) {
            let b = store.read(path, ReadFrom::At(Offset(*at)), 1).await.unwrap();
            assert_eq!(b.messages().first().map(|m| m.to_vec()), Some(msg.as_bytes().to_vec()), "{path}@{at}");
        }
    }
    store.close().await;
}

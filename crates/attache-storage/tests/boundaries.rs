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
use attache_storage::{AppendRequest, CreateStream, Fault, FaultPlan, FaultPoint, ForkSpec, ReadFrom, StreamStore};
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

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

async fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !ok() {
        assert!(Instant::now() < deadline, "{what}: not within 5 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A crash while a checkpoint is in flight leaves records in both log
/// files. The next start replays both in one commit (their boundaries go to
/// the database only: no pending list holds them), and its first checkpoint
/// applies the sealed file alone, writing that file's boundaries again.
/// Every message start must still be found, until the next checkpoint and after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_starts_logged_after_a_checkpoint_in_flight_at_a_crash_are_found_after_the_restart() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("store");
    let plan = FaultPlan::new();
    let mut config = EmbeddedConfig::new(&dir);
    config.checkpoint_interval = Duration::from_millis(20);
    config.sweep_interval = Duration::from_secs(3600);
    config.fault_plan = Some(plan.clone());
    let store = EmbeddedStore::open(config).unwrap();
    let synced = plan.calls(FaultPoint::DbSync);
    store.create(create("/s", None)).await.unwrap();
    wait_for("the stream's creation is checkpointed", || plan.calls(FaultPoint::DbSync) > synced).await;
    // From now on a checkpoint seals the log file it covers, then fails: that file stays sealed.
    plan.fail_all(FaultPoint::SegmentSync, Fault::Io);
    let mut messages: Vec<(u64, String)> = Vec::new();
    let mut tail = 0;
    for n in 0..20 {
        let msg = format!(r#"{{"n":{n}}}"#);
        let out = store.append(append("/s", msg.clone())).await.unwrap();
        messages.push((tail, msg));
        tail = out.info.tail;
        if n == 4 {
            wait_for("a checkpoint seals the log file and fails", || plan.injected(FaultPoint::SegmentSync) > 0).await;
        }
    }
    let copy = tempfile::tempdir().unwrap();
    // A crash: the files as they are between two writes.
    plan.frozen(|| copy_dir(&dir, copy.path()));
    store.close().await;
    let plan = FaultPlan::new();
    let mut config = EmbeddedConfig::new(copy.path());
    // The first tick checkpoints the replayed log's sealed file; the active one waits an hour.
    config.checkpoint_interval = Duration::from_secs(3600);
    config.sweep_interval = Duration::from_secs(3600);
    config.fault_plan = Some(plan.clone());
    let store = EmbeddedStore::open(config).unwrap();
    let synced = plan.calls(FaultPoint::DbSync);
    wait_for("the sealed file is checkpointed", || plan.calls(FaultPoint::DbSync) > synced).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    for (at, msg) in &messages {
        let batch = store.read("/s", ReadFrom::At(Offset(*at)), 1).await.unwrap();
        assert_eq!(batch.start, Offset(*at), "a read from a message start starts there");
        let got = batch.messages().first().map(|m| String::from_utf8(m.to_vec()).unwrap());
        assert_eq!(got.as_deref(), Some(msg.as_str()), "the message at {at}");
        store.create(create(&format!("/fork{at}"), Some(("/s", *at)))).await.unwrap();
    }
    store.close().await;
}

/// Crashes at any moment of a busy store (checkpoints every millisecond, a
/// log holding thousands of boundaries, so runs span more than one row and
/// the replay and the checkpoints after it write them from different
/// starts): after each restart, once its first checkpoint is done (the
/// replayed log's sealed file, if the crash left one), and again after a
/// clean restart, every acknowledged message is found from its own start,
/// and a read from the start returns them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_start_survives_crashes_at_any_moment_of_a_busy_store() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("store");
    let plan = FaultPlan::new();
    let mut config = EmbeddedConfig::new(&dir);
    config.checkpoint_interval = Duration::from_millis(1);
    config.wal_bytes = 64 << 10;
    config.sweep_interval = Duration::from_secs(3600);
    config.fault_plan = Some(plan.clone());
    let store = EmbeddedStore::open(config).unwrap();
    store.create(create("/s", None)).await.unwrap();
    let mut messages: Vec<(u64, String)> = Vec::new();
    let mut tail = 0;
    let mut n = 0u64;
    let check = |store: EmbeddedStore, messages: Vec<(u64, String)>, why: String| async move {
        for (at, msg) in messages.iter().step_by(7) {
            let batch = store.read("/s", ReadFrom::At(Offset(*at)), 1).await.unwrap();
            let got = batch.messages().first().map(|m| String::from_utf8(m.to_vec()).unwrap());
            assert_eq!(got.as_deref(), Some(msg.as_str()), "{why}: the message at {at}");
        }
        let all = store.read("/s", ReadFrom::Start, usize::MAX).await.unwrap();
        let got: Vec<String> = all.messages().iter().map(|m| String::from_utf8(m.to_vec()).unwrap()).collect();
        let want: Vec<String> = messages.iter().map(|(_, m)| m.clone()).collect();
        assert!(got == want, "{why}: every message, in order");
        store.close().await;
    };
    for round in 0..4 {
        for _ in 0..20 + round * 9 {
            let batch: Vec<String> = (0..64).map(|i| (n * 64 + i).to_string()).collect();
            n += 1;
            let out = store.append(append("/s", format!("[{}]", batch.join(",")))).await.unwrap();
            for m in batch {
                let len = m.len() as u64;
                messages.push((tail, m));
                tail += len + 1;
            }
            assert_eq!(tail, out.info.tail, "message positions");
        }
        let copy = root.path().join(format!("crash{round}"));
        plan.frozen(|| copy_dir(&dir, &copy));
        let restart_plan = FaultPlan::new();
        let mut config = EmbeddedConfig::new(&copy);
        // Only the first checkpoint runs (at the first tick), until the clean stop.
        config.checkpoint_interval = Duration::from_secs(3600);
        config.sweep_interval = Duration::from_secs(3600);
        config.fault_plan = Some(restart_plan.clone());
        let restarted = EmbeddedStore::open(config).unwrap();
        let synced = restart_plan.calls(FaultPoint::DbSync);
        wait_for("the first checkpoint after the crash", || restart_plan.calls(FaultPoint::DbSync) > synced).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        check(restarted, messages.clone(), format!("round {round}, after the crash")).await;
        let reopened = EmbeddedStore::open(EmbeddedConfig::new(&copy)).unwrap();
        check(reopened, messages.clone(), format!("round {round}, after a clean restart")).await;
    }
    store.close().await;
}

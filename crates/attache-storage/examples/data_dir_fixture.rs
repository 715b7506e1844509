//! Writes a small data dir holding every kind of stream (JSON, binary,
//! forks of each, closed, producer state, a deleted stream), then copies the
//! data dir while the store still runs with batches only in its log (what a
//! crash leaves), and writes what every stream must read back as
//! `expected.json` beside it. Run on the format-1 engine (the release before
//! segment files), it made `tests/fixtures/format1`, which the upgrade test
//! replays.
//!
//!   cargo run -p attache-storage --example data_dir_fixture -- OUT_DIR

use std::time::Duration;

use attache_core::{ContentType, Offset, ProducerHeaders, StreamPath};
use attache_storage::embedded::{EmbeddedConfig, EmbeddedStore};
use attache_storage::{AppendRequest, CreateStream, ForkSpec, ReadFrom, StreamStore};
use bytes::Bytes;

fn create(path: &str, ct: Option<&str>, initial: &[u8], fork: Option<(&str, u64, u64)>, closed: bool) -> CreateStream {
    CreateStream {
        path: StreamPath::new(path.to_owned()).expect("path"),
        content_type: ct.map(|c| ContentType::parse(c).expect("type")),
        ttl: None,
        expires_at: None,
        closed,
        initial: Bytes::copy_from_slice(initial),
        fork: fork.map(|(s, o, sub)| ForkSpec {
            source: StreamPath::new(s.to_owned()).expect("path"),
            offset: Some(Offset(o)),
            sub_offset: sub,
        }),
        owner: Some("user:alice".into()),
        take_kept_path: false,
    }
}

fn append(path: &str, ct: &str, body: &[u8], producer: Option<(u64, u64)>) -> AppendRequest {
    AppendRequest {
        path: path.into(),
        content_type: Some(ContentType::parse(ct).expect("type")),
        body: Bytes::copy_from_slice(body),
        close: false,
        seq: None,
        producer: producer.map(|(epoch, seq)| ProducerHeaders { id: "p1".into(), epoch, seq }),
        messages: None,
    }
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir") {
        let e = e.expect("entry");
        let target = to.join(e.file_name());
        if e.file_type().expect("type").is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).expect("copy");
        }
    }
}

#[tokio::main]
async fn main() {
    let out = std::path::PathBuf::from(std::env::args().nth(1).expect("usage: data_dir_fixture OUT_DIR"));
    let work = std::env::temp_dir().join(format!("attache-fixture-{}", std::process::id()));
    let j = "application/json";
    let b = "application/octet-stream";
    // Round 1: checkpointed into the database by a clean close.
    {
        let store = EmbeddedStore::open(EmbeddedConfig::new(&work)).expect("open");
        store.create(create("/json", Some(j), br#"[{"a":1},"two",[3,",]"]]"#, None, false)).await.expect("c");
        store.append(append("/json", j, br#"[{"b":"x,y"},4.5]"#, Some((0, 0)))).await.expect("a");
        store.append(append("/json", j, br#"{"c":null}"#, Some((0, 1)))).await.expect("a");
        store.create(create("/bin", Some(b), b"hello ", None, false)).await.expect("c");
        store.append(append("/bin", b, b"binary ", None)).await.expect("a");
        store.append(append("/bin", b, b"world", None)).await.expect("a");
        store.create(create("/gone", Some(j), br#"[1,2]"#, None, false)).await.expect("c");
        store.delete("/gone").await.expect("d");
        store.create(create("/closed", Some(j), br#"["last"]"#, None, true)).await.expect("c");
        store.close().await;
    }
    // Round 2: only in the log when the copy is taken.
    let mut config = EmbeddedConfig::new(&work);
    config.checkpoint_interval = Duration::from_secs(3600);
    let store = EmbeddedStore::open(config).expect("reopen");
    let json_tail = store.head("/json").await.expect("head").tail;
    // A fork of /json two messages in, a fork of /bin in the middle of an append.
    store.create(create("/json-fork", None, b"", Some(("/json", 0, 2)), false)).await.expect("fork");
    store.append(append("/json-fork", j, br#"["fork-own"]"#, None)).await.expect("a");
    store.create(create("/bin-fork", None, b"", Some(("/bin", 6, 3)), false)).await.expect("fork");
    store.append(append("/bin-fork", b, b"+fork", None)).await.expect("a");
    store.append(append("/json", j, br#"["after-fork",{"d":[1,2,3]}]"#, Some((0, 2)))).await.expect("a");
    store.append(append("/bin", b, b"!", None)).await.expect("a");
    assert!(store.head("/json").await.expect("head").tail > json_tail);
    copy_dir(&work, &out.join("data"));
    let mut expected = Vec::new();
    for path in ["/json", "/bin", "/closed", "/json-fork", "/bin-fork"] {
        let info = store.head(path).await.expect("head");
        let batch = store.read(path, ReadFrom::Start, usize::MAX).await.expect("read");
        let mut at = 0u64;
        let mut pieces = Vec::new();
        for c in &batch.messages() {
            pieces.push(serde_json::json!([at, String::from_utf8_lossy(c)]));
            at += c.len() as u64 + u64::from(batch.json);
        }
        // A fork's positions start where its lineage says; reads say where each piece is.
        expected.push(serde_json::json!({
            "path": path,
            "tail": info.tail,
            "closed": info.closed,
            "json": batch.json,
            "content_type": info.content_type,
            "next": batch.next.0,
            "pieces": pieces,
        }));
    }
    std::fs::write(out.join("expected.json"), serde_json::to_vec_pretty(&expected).expect("json")).expect("write");
    let _ = std::fs::remove_dir_all(&work);
    // No close: the copy is what a crash leaves, and so is this exit.
    std::process::exit(0);
}

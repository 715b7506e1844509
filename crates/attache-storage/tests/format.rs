//! The embedded store's data dir format: a dir written by the format-1
//! engine (a fixture made by it, `examples/data_dir_fixture.rs` run on the
//! release before segment files, copied while it ran with batches only in its
//! log) upgrades itself with every stream, offset and producer state intact;
//! a newer format is refused with what to do; damage found at start (a torn
//! segment file, a torn log record) is reported with its file and offset, the
//! store recovers everything before it and serves nothing past it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use attache_core::{ContentType, Offset, ProducerHeaders, StreamPath};
use attache_storage::embedded::{EmbeddedConfig, EmbeddedStore};
use attache_storage::{AppendRequest, CreateStream, ReadFrom, StoreError, StreamStore};
use bytes::Bytes;

fn fixture() -> PathBuf {
    fixture_of(1)
}

fn fixture_of(format: u32) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/format{format}"))
}

fn copy_dir(from: &Path, to: &Path) {
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

fn create(path: &str, ct: &str) -> CreateStream {
    CreateStream {
        path: StreamPath::new(path).unwrap(),
        content_type: Some(ContentType::parse(ct).unwrap()),
        ttl: None,
        expires_at: None,
        closed: false,
        initial: Bytes::new(),
        fork: None,
        owner: None,
        take_kept_path: false,
    }
}

fn append(path: &str, ct: &str, body: &[u8], producer: Option<(u64, u64)>) -> AppendRequest {
    AppendRequest {
        path: path.to_owned(),
        content_type: Some(ContentType::parse(ct).unwrap()),
        body: Bytes::copy_from_slice(body),
        close: false,
        seq: None,
        producer: producer.map(|(epoch, seq)| ProducerHeaders { id: "p1".into(), epoch, seq }),
        messages: None,
    }
}

/// Every piece of a stream from `from` on, as `(position, bytes)`: JSON messages, or binary bytes in one piece.
async fn pieces_from(store: &EmbeddedStore, path: &str, from: u64) -> Vec<(u64, Vec<u8>)> {
    let batch = store.read(path, ReadFrom::At(Offset(from)), usize::MAX).await.unwrap();
    assert!(batch.up_to_date());
    let mut at = from;
    let mut out = Vec::new();
    for m in batch.messages() {
        out.push((at, m.to_vec()));
        at += m.len() as u64 + u64::from(batch.json);
    }
    assert_eq!(at, batch.next.0, "{path}: the pieces add up to the read's end");
    out
}

/// The expected pieces of the fixture's stream from `from` on (binary pieces joined, cut at `from`).
fn expected_from(stream: &serde_json::Value, from: u64) -> Vec<(u64, Vec<u8>)> {
    let pieces: Vec<(u64, Vec<u8>)> = stream["pieces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_u64().unwrap(), p[1].as_str().unwrap().as_bytes().to_vec()))
        .collect();
    if stream["json"].as_bool().unwrap() {
        return pieces.into_iter().filter(|(at, _)| *at >= from).collect();
    }
    let start = pieces.first().map_or(0, |p| p.0);
    let all: Vec<u8> = pieces.into_iter().flat_map(|p| p.1).collect();
    let rest = all[(from - start) as usize..].to_vec();
    if rest.is_empty() {
        Vec::new()
    } else {
        vec![(from, rest)]
    }
}

async fn check_fixture_streams(store: &EmbeddedStore, expected: &[serde_json::Value], why: &str) {
    for stream in expected {
        let path = stream["path"].as_str().unwrap();
        let info = store.head(path).await.unwrap_or_else(|e| panic!("{why}: {path}: {e}"));
        assert_eq!(info.tail, stream["tail"].as_u64().unwrap(), "{why}: {path} tail");
        assert_eq!(info.closed, stream["closed"].as_bool().unwrap(), "{why}: {path} closed");
        assert_eq!(&*info.content_type, stream["content_type"].as_str().unwrap(), "{why}: {path} type");
        // From every offset a reader could hold: the same pieces at the same positions.
        let mut offsets: Vec<u64> =
            stream["pieces"].as_array().unwrap().iter().map(|p| p[0].as_u64().unwrap()).collect();
        offsets.push(info.tail);
        for from in offsets {
            assert_eq!(pieces_from(store, path, from).await, expected_from(stream, from), "{why}: {path} from {from}");
        }
    }
    assert_eq!(store.head("/gone").await.unwrap_err(), StoreError::NotFound, "{why}: a deleted stream stays deleted");
}

#[tokio::test]
async fn a_format_1_data_dir_upgrades_itself_on_first_start_with_every_offset_intact() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("data");
    copy_dir(&fixture().join("data"), &dir);
    let expected: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(fixture().join("expected.json")).unwrap()).unwrap();
    assert!(!dir.join("FORMAT").exists(), "the fixture is format 1");
    let store = EmbeddedStore::open(EmbeddedConfig::new(&dir)).unwrap();
    assert!(store.damage().is_empty(), "{:?}", store.damage());
    let stamp = std::fs::read_to_string(dir.join("FORMAT")).unwrap();
    assert_eq!(stamp.trim(), "attache-embedded-format 4");
    check_fixture_streams(&store, &expected, "upgraded").await;
    // Producer state came along: the last request of p1 is a duplicate, the next one appends.
    let retry =
        store.append(append("/json", "application/json", br#"["after-fork",{"d":[1,2,3]}]"#, Some((0, 2)))).await;
    assert!(retry.unwrap().duplicate, "a retry of the last producer request is a duplicate");
    let next = store.append(append("/json", "application/json", br#"{"e":5}"#, Some((0, 3)))).await.unwrap();
    assert!(!next.duplicate);
    let tail = expected[0]["tail"].as_u64().unwrap();
    assert_eq!(pieces_from(&store, "/json", tail).await, vec![(tail, br#"{"e":5}"#.to_vec())]);
    // Forks still read through their sources, and take appends.
    store.append(append("/bin-fork", "application/octet-stream", b"?", None)).await.unwrap();
    store.close().await;
    drop(store);
    // The second start finds format 4 and changes nothing.
    let store = EmbeddedStore::open(EmbeddedConfig::new(&dir)).unwrap();
    assert!(store.damage().is_empty());
    assert_eq!(pieces_from(&store, "/json", tail).await, vec![(tail, br#"{"e":5}"#.to_vec())]);
    let bin_fork = store.read("/bin-fork", ReadFrom::Start, usize::MAX).await.unwrap();
    assert_eq!(&bin_fork.body[..], b"hello bin+fork?");
    store.close().await;
}

/// A copy of fixture `format`'s data dir, opened (which upgrades it) and
/// checked: stamped format 4, nothing damaged, every stream and producer as
/// the fixture's engine left it. Returns the copy's root, its data dir, the
/// fixture's expected streams and the open store.
async fn upgraded_fixture(format: u32) -> (tempfile::TempDir, PathBuf, Vec<serde_json::Value>, EmbeddedStore) {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("data");
    copy_dir(&fixture_of(format).join("data"), &dir);
    let expected: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(fixture_of(format).join("expected.json")).unwrap()).unwrap();
    let stamp = format!("attache-embedded-format {format}");
    assert_eq!(std::fs::read_to_string(dir.join("FORMAT")).unwrap().trim(), stamp);
    let store = EmbeddedStore::open(EmbeddedConfig::new(&dir)).unwrap();
    assert!(store.damage().is_empty(), "{:?}", store.damage());
    assert_eq!(std::fs::read_to_string(dir.join("FORMAT")).unwrap().trim(), "attache-embedded-format 4");
    check_fixture_streams(&store, &expected, &format!("upgraded from format {format}")).await;
    let retry =
        store.append(append("/json", "application/json", br#"["after-fork",{"d":[1,2,3]}]"#, Some((0, 2)))).await;
    assert!(retry.unwrap().duplicate, "a retry of the last producer request is a duplicate");
    (root, dir, expected, store)
}

#[tokio::test]
async fn a_format_2_data_dir_upgrades_itself_with_every_boundary_and_its_log_intact() {
    // Made by `examples/data_dir_fixture.rs` on the format-2 engine (a boundary
    // row per message in redb), copied while batches were only in its log.
    let (_root, dir, expected, store) = upgraded_fixture(2).await;
    let tail = expected[0]["tail"].as_u64().unwrap();
    store.append(append("/json", "application/json", br#"{"e":5}"#, Some((0, 3)))).await.unwrap();
    store.close().await;
    drop(store);
    let store = EmbeddedStore::open(EmbeddedConfig::new(&dir)).unwrap();
    assert!(store.damage().is_empty());
    check_fixture_streams(&store, &expected[1..], "reopened").await;
    assert_eq!(pieces_from(&store, "/json", tail).await, vec![(tail, br#"{"e":5}"#.to_vec())]);
    store.close().await;
}

#[tokio::test]
async fn a_format_3_data_dir_is_restamped_and_keeps_every_stream_and_its_log() {
    // Made by `examples/data_dir_fixture.rs` on the format-3 engine (session
    // 14's release), copied while batches were only in its log.
    let (_root, dir, expected, store) = upgraded_fixture(3).await;
    let tail = expected[0]["tail"].as_u64().unwrap();
    // Appends after the upgrade log only their tails; the close's checkpoint
    // folds them into the metadata the format-3 log and redb hold.
    store.append(append("/json", "application/json", br#"{"e":5}"#, None)).await.unwrap();
    store.append(append("/bin", "application/octet-stream", b"??", None)).await.unwrap();
    store.close().await;
    drop(store);
    let store = EmbeddedStore::open(EmbeddedConfig::new(&dir)).unwrap();
    assert!(store.damage().is_empty());
    check_fixture_streams(&store, &expected[2..], "reopened").await;
    assert_eq!(pieces_from(&store, "/json", tail).await, vec![(tail, br#"{"e":5}"#.to_vec())]);
    let bin_tail = expected[1]["tail"].as_u64().unwrap();
    assert_eq!(store.head("/bin").await.unwrap().tail, bin_tail + 2);
    store.close().await;
}

#[test]
fn a_data_dir_of_another_format_is_refused_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("FORMAT"), "attache-embedded-format 5\n").unwrap();
    let err = EmbeddedStore::open(EmbeddedConfig::new(dir.path())).err().expect("refused").to_string();
    assert!(err.contains("format 5") && err.contains("run the release that wrote it"), "{err}");
}

fn segment_file(dir: &Path, id: u64) -> PathBuf {
    dir.join("segments").join(format!("{id:016x}.seg"))
}

#[tokio::test]
async fn a_torn_segment_file_is_reported_and_its_stream_recovers_up_to_the_damage() {
    let dir = tempfile::tempdir().unwrap();
    let (json, bin) = ("application/json", "application/octet-stream");
    let store = EmbeddedStore::open(EmbeddedConfig::new(dir.path())).unwrap();
    store.create(create("/j", json)).await.unwrap();
    store.create(create("/b", bin)).await.unwrap();
    for m in ["\"one\"", "\"two\"", "\"three\"", "\"four\"", "\"five\""] {
        store.append(append("/j", json, m.as_bytes(), None)).await.unwrap();
        store.append(append("/b", bin, m.as_bytes(), None)).await.unwrap();
    }
    let (jid, bid) = (store.head("/j").await.unwrap().id, store.head("/b").await.unwrap().id);
    // A clean stop: everything is in the segment files, synced, and the log is empty.
    store.close().await;
    drop(store);
    // `"one","two","three","fo` and 20 bytes of the binary stream survive.
    let cut_json = "\"one\",\"two\",\"three\",\"fo".len() as u64;
    std::fs::OpenOptions::new().write(true).open(segment_file(dir.path(), jid)).unwrap().set_len(cut_json).unwrap();
    std::fs::OpenOptions::new().write(true).open(segment_file(dir.path(), bid)).unwrap().set_len(20).unwrap();

    let store = EmbeddedStore::open(EmbeddedConfig::new(dir.path())).unwrap();
    let mut damage = store.damage().to_vec();
    damage.sort_by_key(|d| d.file.clone());
    let files: Vec<(PathBuf, u64)> = damage.iter().map(|d| (d.file.clone(), d.offset)).collect();
    let mut want = vec![(segment_file(dir.path(), jid), cut_json), (segment_file(dir.path(), bid), 20)];
    want.sort();
    assert_eq!(files, want, "each damaged file is reported with where it ends");
    let messages: Vec<Vec<u8>> =
        store.read("/j", ReadFrom::Start, usize::MAX).await.unwrap().messages().iter().map(|m| m.to_vec()).collect();
    assert_eq!(
        messages,
        vec![b"\"one\"".to_vec(), b"\"two\"".to_vec(), b"\"three\"".to_vec()],
        "whole messages before the damage"
    );
    assert_eq!(store.head("/j").await.unwrap().tail, "\"one\",\"two\",\"three\",".len() as u64);
    assert_eq!(&store.read("/b", ReadFrom::Start, usize::MAX).await.unwrap().body[..], b"\"one\"\"two\"\"three\"\"fo");
    assert_eq!(store.head("/b").await.unwrap().tail, 20);
    // The streams go on from there, and the next start finds nothing wrong.
    store.append(append("/j", json, b"\"six\"", None)).await.unwrap();
    store.close().await;
    drop(store);
    let store = EmbeddedStore::open(EmbeddedConfig::new(dir.path())).unwrap();
    assert!(store.damage().is_empty(), "{:?}", store.damage());
    let body = store.read("/j", ReadFrom::Start, usize::MAX).await.unwrap().body;
    assert_eq!(&body[..], br#"["one","two","three","six"]"#);
    store.close().await;
}

#[tokio::test]
async fn a_torn_log_record_is_reported_and_nothing_past_it_is_served() {
    let root = tempfile::tempdir().unwrap();
    let live = root.path().join("live");
    let json = "application/json";
    let mut config = EmbeddedConfig::new(&live);
    // No checkpoint while the test runs: the appends live only in the log (and unsynced segment files).
    config.checkpoint_interval = Duration::from_secs(3600);
    let store = EmbeddedStore::open(config).unwrap();
    store.create(create("/j", json)).await.unwrap();
    store.append(append("/j", json, b"\"kept\"", None)).await.unwrap();
    store.append(append("/j", json, b"\"torn\"", None)).await.unwrap();
    let id = store.head("/j").await.unwrap().id;
    // A crash: the files as they are now, the store never stopped.
    let crashed = root.path().join("crashed");
    copy_dir(&live, &crashed);
    // Tear the last record: its last byte changes, so its checksum fails.
    let wal = crashed.join("streams.wal");
    let mut bytes = std::fs::read(&wal).unwrap();
    let last = bytes.iter().rposition(|&b| b != 0).unwrap();
    bytes[last] ^= 0x55;
    std::fs::write(&wal, &bytes).unwrap();
    assert!(
        std::fs::metadata(segment_file(&crashed, id)).unwrap().len() > "\"kept\",".len() as u64,
        "the torn batch's bytes reached the segment file"
    );

    let reopened = EmbeddedStore::open(EmbeddedConfig::new(&crashed)).unwrap();
    let damage = reopened.damage();
    assert_eq!(damage.len(), 1, "{damage:?}");
    assert_eq!(damage[0].file, wal);
    assert!(damage[0].offset > 0 && damage[0].offset < last as u64, "the record's start: {}", damage[0].offset);
    let body = reopened.read("/j", ReadFrom::Start, usize::MAX).await.unwrap().body;
    assert_eq!(&body[..], br#"["kept"]"#, "everything before the damage, nothing past it");
    assert_eq!(
        std::fs::metadata(segment_file(&crashed, id)).unwrap().len(),
        "\"kept\",".len() as u64,
        "the segment file is cut to the recovered tail"
    );
    reopened.append(append("/j", json, b"\"next\"", None)).await.unwrap();
    assert_eq!(&reopened.read("/j", ReadFrom::Start, usize::MAX).await.unwrap().body[..], br#"["kept","next"]"#);
    reopened.close().await;
    store.close().await;
}

#[tokio::test]
async fn a_json_read_bounded_by_size_ends_on_a_message_boundary_and_carries_at_least_one() {
    let dir = tempfile::tempdir().unwrap();
    let json = "application/json";
    let store = EmbeddedStore::open(EmbeddedConfig::new(dir.path())).unwrap();
    store.create(create("/j", json)).await.unwrap();
    store.append(append("/j", json, br#"["aaaa","bb",["c,]"],"dddddddddddddddddddd"]"#, None)).await.unwrap();
    // `"aaaa",` is 7 bytes, `"bb",` 5, `["c,]"],` 8, the last 23.
    let page = async |from: u64, max: usize| {
        let b = store.read("/j", ReadFrom::At(Offset(from)), max).await.unwrap();
        (String::from_utf8(b.body.to_vec()).unwrap(), b.next.0)
    };
    assert_eq!(page(0, 12).await, (r#"["aaaa","bb"]"#.to_owned(), 12));
    assert_eq!(page(0, 11).await, (r#"["aaaa"]"#.to_owned(), 7));
    assert_eq!(page(0, 1).await, (r#"["aaaa"]"#.to_owned(), 7), "at least one message");
    assert_eq!(page(12, 8).await, (r#"[["c,]"]]"#.to_owned(), 20));
    assert_eq!(page(12, 1 << 20).await, (r#"[["c,]"],"dddddddddddddddddddd"]"#.to_owned(), 43));
    assert_eq!(page(43, 10).await, ("[]".to_owned(), 43));
    store.close().await;
}

//! Every client call against a real server: entities, grants, attachments
//! (bytes, files, readers, ranges, resumable), Durable Streams, producers,
//! tails that resume, and the live materializer.

mod common;

use std::time::Duration;

use attache_client::client::{ByteRange, NewGrant};
use attache_client::streams::{AppendOptions, CreateStream, LiveMode, TailOptions, NOW, START};
use attache_client::{
    AttachmentInput, AttachmentStatus, EntityUrl, ErrorCode, ForkOptions, ForkPointer, IdempotentProducer, LiveState,
    PrincipalKey, Role, SendMessage, SpawnOptions, Subject,
};
use bytes::Bytes;
use common::{image_bytes, spawn, TestServer};
use serde_json::{json, Map};

#[tokio::test]
async fn entities_spawn_read_send_grant_and_stop_round_trip() {
    let server = TestServer::start().await;
    let sam = server.client_as("user:sam");
    let entity = spawn(&sam, "/chat/one").await;
    let got = sam.get_entity(&entity).await.unwrap();
    assert_eq!(
        (got.url.as_str(), got.status.as_str(), got.streams.main.as_str()),
        ("/chat/one", "idle", "/chat/one/main")
    );
    assert_eq!(got.created_by.as_deref(), Some("/principal/user%3Asam"));

    let receipt = sam.send_message(&entity, &SendMessage::text("hello").key("m1")).await.unwrap();
    assert_eq!(receipt.key, "m1");
    assert!(!receipt.txid.is_empty());

    let ann = server.client_as("user:ann");
    let hidden = ann.get_entity(&entity).await.unwrap_err();
    assert_eq!(hidden.code(), Some(&ErrorCode::NotFound), "another principal cannot see it: {hidden}");
    let grant =
        sam.add_grant(&entity, &NewGrant::principal(&PrincipalKey::parse("user:ann").unwrap(), "read")).await.unwrap();
    assert_eq!(grant.permission, "read");
    assert_eq!(ann.get_entity(&entity).await.unwrap().url, "/chat/one");
    assert_eq!(sam.list_grants(&entity).await.unwrap().len(), 1);
    let listed = ann.list_entities(Some("chat")).await.unwrap();
    assert_eq!(listed.len(), 1);
    sam.remove_grant(&entity, grant.id).await.unwrap();
    assert!(ann.get_entity(&entity).await.unwrap_err().is_not_found());

    sam.stop_entity(&entity, false).await.unwrap();
    assert_eq!(sam.get_entity(&entity).await.unwrap().status, "stopped");
    let refused = sam.send_message(&entity, &SendMessage::text("late")).await.unwrap_err();
    assert_eq!(refused.code(), Some(&ErrorCode::NotRunning));
    sam.stop_entity(&entity, true).await.unwrap();
    assert!(sam.get_entity(&entity).await.unwrap_err().is_not_found());
}

#[tokio::test]
async fn an_entity_spawns_under_a_parent_and_forks_at_a_pointer_with_what_it_held_there() {
    let server = TestServer::start().await;
    let sam = server.client_as("user:sam");
    let parent = spawn(&sam, "/chat/parent").await;
    let child = EntityUrl::parse("/chat/child").unwrap();
    let options = SpawnOptions { parent: Some(parent.clone()), ..SpawnOptions::default() };
    let spawned = sam.spawn_entity(&child, &options).await.unwrap();
    assert_eq!(spawned.parent.as_deref(), Some("/chat/parent"));
    let nowhere = SpawnOptions { parent: Some(EntityUrl::parse("/chat/nowhere").unwrap()), ..SpawnOptions::default() };
    let orphan = sam.spawn_entity(&EntityUrl::parse("/chat/orphan").unwrap(), &nowhere).await.unwrap_err();
    assert!(orphan.is_not_found(), "a parent that does not exist: {orphan}");

    let early = |id: &str| AttachmentInput::bytes(&b"bytes"[..]).id(id).inbox("m1").unwrap();
    sam.create_attachment(&child, early("first")).await.unwrap();
    let at = sam.head_stream(&child.main_stream()).await.unwrap().next_offset;
    sam.create_attachment(&child, early("second")).await.unwrap();

    let mut options = ForkOptions {
        instance_id: Some("then".into()),
        fork_pointer: Some(ForkPointer::at(at.clone())),
        parent: Some(parent.clone()),
        ..ForkOptions::default()
    };
    options.tags.insert("k".into(), "v".into());
    let forked = sam.fork_entity(&child, &options).await.unwrap();
    assert_eq!(forked.root.url, "/chat/then");
    assert_eq!(forked.root.parent.as_deref(), Some("/chat/parent"));
    assert_eq!(forked.root.tags.get("k").map(String::as_str), Some("v"));
    assert_eq!(forked.entities.iter().map(|e| e.url.as_str()).collect::<Vec<_>>(), ["/chat/then"]);
    assert!(!forked.txid.is_empty());
    let then = EntityUrl::parse("/chat/then").unwrap();
    let carried = sam.list_attachments(&then).await.unwrap();
    assert_eq!(carried.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(), ["first"]);
    assert_eq!(sam.read_attachment(&then, "first").await.unwrap(), Bytes::from_static(b"bytes"));

    // No options: the tail, named by the server.
    let whole = sam.fork_entity(&child, &ForkOptions::default()).await.unwrap();
    assert!(whole.root.url.starts_with("/chat/child-fork-"), "{}", whole.root.url);
    assert_eq!(whole.root.parent, None);

    // Refusals: a pointer inside a message (400), a taken id (409), a stranger (404).
    let inside = ForkOptions {
        instance_id: Some("bad".into()),
        fork_pointer: Some(ForkPointer { offset: Some("0000000000000000_0000000000000001".into()), sub_offset: 0 }),
        ..ForkOptions::default()
    };
    let refused = sam.fork_entity(&child, &inside).await.unwrap_err();
    assert_eq!(refused.status(), Some(400), "{refused}");
    assert!(refused.to_string().contains("inside a message"), "{refused}");
    assert!(sam.get_entity(&EntityUrl::parse("/chat/bad").unwrap()).await.unwrap_err().is_not_found());
    let taken = sam.fork_entity(&child, &options).await.unwrap_err();
    assert_eq!(taken.status(), Some(409), "{taken}");
    let ann = server.client_as("user:ann");
    assert!(ann.fork_entity(&child, &ForkOptions::default()).await.unwrap_err().is_not_found());
}

#[tokio::test]
async fn attachments_upload_list_read_range_and_delete_round_trip() {
    let server = TestServer::start().await;
    let client = server.client_as("user:sam");
    let entity = spawn(&client, "/chat/att").await;
    let bytes = image_bytes(1000, 7);
    let mut meta = Map::new();
    meta.insert("caption".into(), json!("a cat"));
    let entry = client
        .create_attachment(
            &entity,
            AttachmentInput::bytes(bytes.clone())
                .id("cat")
                .mime_type("image/png")
                .filename("cat.png")
                .inbox("m1")
                .unwrap()
                .meta(meta),
        )
        .await
        .unwrap();
    assert_eq!(entry.id, "cat");
    assert_eq!(entry.status, AttachmentStatus::Complete);
    assert_eq!(entry.byte_length, Some(1000));
    assert_eq!(entry.subject, Some(Subject::new("inbox", "m1").unwrap()));
    assert_eq!(entry.role, Role::Input);
    assert_eq!(entry.meta.as_ref().and_then(|m| m.get("caption")), Some(&json!("a cat")));

    let listed = client.list_attachments(&entity).await.unwrap();
    assert_eq!(listed.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(), ["cat"]);
    assert_eq!(client.read_attachment(&entity, "cat").await.unwrap(), Bytes::from(bytes.clone()));

    let mut part = Vec::new();
    let n =
        client.read_attachment_to(&entity, "cat", Some(ByteRange::parse("10-19").unwrap()), &mut part).await.unwrap();
    assert_eq!((n, part.as_slice()), (10, &bytes[10..20]));
    let mut tail = Vec::new();
    client.read_attachment_to(&entity, "cat", Some(ByteRange::parse("990-").unwrap()), &mut tail).await.unwrap();
    assert_eq!(tail, &bytes[990..]);
    let beyond = client
        .read_attachment_to(&entity, "cat", Some(ByteRange::parse("5000-6000").unwrap()), &mut Vec::new())
        .await
        .unwrap_err();
    assert_eq!(beyond.status(), Some(416));

    let dup = client.create_attachment(&entity, AttachmentInput::bytes(&b"x"[..]).id("cat").inbox("m1").unwrap()).await;
    assert_eq!(dup.unwrap_err().status(), Some(409));

    client.delete_attachment(&entity, "cat").await.unwrap();
    assert!(client.list_attachments(&entity).await.unwrap().is_empty());
    assert!(client.read_attachment(&entity, "cat").await.unwrap_err().is_not_found());
}

#[tokio::test]
async fn files_and_readers_stream_up_and_downloads_stream_to_files() {
    let server = TestServer::start().await;
    let client = server.client();
    let entity = spawn(&client, "/chat/files").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("photo.jpg");
    let bytes = image_bytes(300_000, 3);
    std::fs::write(&path, &bytes).unwrap();

    let from_file = client.create_attachment(&entity, AttachmentInput::file(&path).inbox("m").unwrap()).await.unwrap();
    assert_eq!(from_file.filename.as_deref(), Some("photo.jpg"));
    assert_eq!(from_file.mime_type, "image/jpeg", "the type is guessed from the extension");
    assert_eq!(from_file.byte_length, Some(300_000));

    let reader = tokio::fs::File::open(&path).await.unwrap();
    let unsized_reader =
        AttachmentInput::reader(reader, None).mime_type("application/octet-stream").inbox("m").unwrap();
    let from_reader = client.create_attachment(&entity, unsized_reader).await.unwrap();
    assert_eq!(from_reader.byte_length, Some(300_000));
    assert_eq!(from_reader.sha256, from_file.sha256);

    let out = dir.path().join("copy.bin");
    let n = client.read_attachment_to_file(&entity, &from_reader.id, None, &out).await.unwrap();
    assert_eq!(n, 300_000);
    assert_eq!(std::fs::read(&out).unwrap(), bytes);
}

#[tokio::test]
async fn resumable_uploads_complete_and_a_rerun_continues_where_the_server_stopped() {
    let server = TestServer::start().await;
    let client = server.client();
    let entity = spawn(&client, "/chat/resume").await;
    let bytes = image_bytes(10_000, 9);
    let input = || AttachmentInput::bytes(bytes.clone()).id("big").mime_type("image/png").inbox("m").unwrap();

    // A first run that dies after 4000 bytes: begin, append two chunks, never close.
    let pending = client.begin_resumable_upload(&entity, "big", &input()).await.unwrap();
    assert_eq!(pending.status, AttachmentStatus::Pending);
    let mut producer = IdempotentProducer::new(&client, &pending.stream_path, "image/png", "dying", 0).unwrap();
    producer.append(Bytes::from(bytes[..2000].to_vec())).await.unwrap();
    producer.append(Bytes::from(bytes[2000..4000].to_vec())).await.unwrap();

    let done = client.upload_attachment_resumable(&entity, input(), 3000).await.unwrap();
    assert_eq!(done.status, AttachmentStatus::Complete);
    assert_eq!(done.byte_length, Some(10_000));
    assert_eq!(client.read_attachment(&entity, "big").await.unwrap(), Bytes::from(bytes));
}

/// A first run of an upload that died after its first chunk: begun as the SDK
/// begins it, 4000 bytes of `first` appended, never closed. Returns the
/// stream's path and the offset it stopped at.
async fn an_upload_that_died_after_one_chunk(
    client: &attache_client::RuntimeServerClient,
    entity: &EntityUrl,
    begun_with: AttachmentInput,
    first: &[u8],
) -> (String, String) {
    let pending = client.begin_resumable_upload(entity, "big", &begun_with).await.unwrap();
    assert_eq!(pending.status, AttachmentStatus::Pending);
    let mut producer = IdempotentProducer::new(client, &pending.stream_path, &pending.mime_type, "dying", 0).unwrap();
    producer.append(Bytes::from(first[..4000].to_vec())).await.unwrap();
    let held = client.head_stream(&pending.stream_path).await.unwrap().next_offset;
    (pending.stream_path, held)
}

async fn assert_refused_and_nothing_appended(
    client: &attache_client::RuntimeServerClient,
    entity: &EntityUrl,
    input: AttachmentInput,
    (path, held): &(String, String),
) {
    let err = client.upload_attachment_resumable(entity, input, 3000).await.unwrap_err();
    assert!(matches!(&err, attache_client::Error::UploadMismatch { id, .. } if id == "big"), "{err}");
    assert_eq!(&client.head_stream(path).await.unwrap().next_offset, held, "nothing appended: {err}");
    let entry = client.get_attachment(entity, "big").await.unwrap().unwrap();
    assert_eq!(entry.status, AttachmentStatus::Pending, "{err}");
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn resuming_an_upload_with_another_file_is_refused_and_appends_nothing() {
    let server = TestServer::start().await;
    let client = server.client();
    let entity = spawn(&client, "/chat/resume-other").await;
    let dir = tempfile::tempdir().unwrap();
    let a = image_bytes(10_000, 9);
    let b = image_bytes(10_000, 10);
    let (file_a, file_b, short) = (dir.path().join("a.bin"), dir.path().join("b.bin"), dir.path().join("s.bin"));
    std::fs::write(&file_a, &a).unwrap();
    std::fs::write(&file_b, &b).unwrap();
    std::fs::write(&short, &a[..1000]).unwrap();
    let input = |p: &std::path::Path| AttachmentInput::file(p).id("big").inbox("m").unwrap();

    let died = an_upload_that_died_after_one_chunk(&client, &entity, input(&file_a), &a).await;
    // Another file of the same size, a file shorter than what the server holds,
    // and A edited after the first run (its first bytes unchanged): refused.
    assert_refused_and_nothing_appended(&client, &entity, input(&file_b), &died).await;
    assert_refused_and_nothing_appended(&client, &entity, input(&short), &died).await;
    let mut edited = a.clone();
    edited[9_000] ^= 0xff;
    assert_refused_and_nothing_appended(
        &client,
        &entity,
        AttachmentInput::bytes(edited).id("big").inbox("m").unwrap(),
        &died,
    )
    .await;

    // A itself resumes and completes with A's bytes; its fingerprint stays in meta.
    let done = client.upload_attachment_resumable(&entity, input(&file_a), 3000).await.unwrap();
    assert_eq!(done.status, AttachmentStatus::Complete);
    assert_eq!((done.byte_length, done.sha256.as_deref()), (Some(10_000), Some(sha256_hex(&a).as_str())));
    assert_eq!(client.read_attachment(&entity, "big").await.unwrap(), Bytes::from(a.clone()));
    let recorded = &done.meta.as_ref().unwrap()[attache_client::client::UPLOAD_FINGERPRINT_KEY];
    assert_eq!(recorded, &json!({"size": 10_000, "sha256": sha256_hex(&a)}));
}

#[tokio::test]
async fn resuming_an_upload_that_recorded_no_fingerprint_compares_the_bytes_the_server_holds() {
    let server = TestServer::start().await;
    let client = server.client();
    let entity = spawn(&client, "/chat/resume-reader").await;
    let a = image_bytes(10_000, 9);
    let b = image_bytes(10_000, 10);
    let reader = |bytes: &[u8]| {
        AttachmentInput::reader(std::io::Cursor::new(bytes.to_vec()), None).id("big").inbox("m").unwrap()
    };

    // Begun from a reader (a pipe): nothing records which input the bytes are.
    let died = an_upload_that_died_after_one_chunk(&client, &entity, reader(&a), &a).await;
    assert_eq!(client.get_attachment(&entity, "big").await.unwrap().unwrap().meta, None);
    assert_refused_and_nothing_appended(&client, &entity, reader(&b), &died).await;
    assert_refused_and_nothing_appended(
        &client,
        &entity,
        AttachmentInput::bytes(b.clone()).id("big").inbox("m").unwrap(),
        &died,
    )
    .await;

    let done = client.upload_attachment_resumable(&entity, reader(&a), 3000).await.unwrap();
    assert_eq!((done.byte_length, done.sha256.as_deref()), (Some(10_000), Some(sha256_hex(&a).as_str())));
}

#[tokio::test]
async fn streams_create_append_read_close_and_delete() {
    let server = TestServer::start().await;
    let client = server.client();
    client.create_stream("/logs/a", &CreateStream::with_content_type("text/plain")).await.unwrap();
    client.append("/logs/a", "text/plain", "hello ").await.unwrap();
    client.append("/logs/a", "text/plain", "world").await.unwrap();
    let all = client.read_all("/logs/a", START).await.unwrap();
    assert_eq!(all.data, Bytes::from_static(b"hello world"));
    assert!(all.up_to_date);
    let info = client.head_stream("/logs/a").await.unwrap();
    assert_eq!(info.next_offset, all.next_offset);
    let closed = client.close_stream("/logs/a").await.unwrap();
    assert!(closed.closed);
    let late = client.append("/logs/a", "text/plain", "!").await.unwrap_err();
    assert_eq!(late.code(), Some(&ErrorCode::StreamClosed));
    client.delete_stream("/logs/a").await.unwrap();
    assert!(client.head_stream("/logs/a").await.unwrap_err().is_not_found());

    client.create_stream("/events/j", &CreateStream::json()).await.unwrap();
    client.append_json("/events/j", &json!([{"n": 1}, {"n": 2}])).await.unwrap();
    let items = client.read_all("/events/j", START).await.unwrap().json_items().unwrap();
    assert_eq!(items, [json!({"n": 1}), json!({"n": 2})]);
    let seq = AppendOptions { seq: Some("b".into()), ..AppendOptions::default() };
    client.append_with("/events/j", "application/json", Bytes::from_static(b"3"), &seq).await.unwrap();
    let older = AppendOptions { seq: Some("a".into()), ..AppendOptions::default() };
    let refused = client.append_with("/events/j", "application/json", Bytes::from_static(b"4"), &older).await;
    assert_eq!(refused.unwrap_err().code(), Some(&ErrorCode::SequenceConflict));
}

#[tokio::test]
async fn an_idempotent_producer_writes_each_append_once_and_is_fenced_by_a_newer_epoch() {
    let server = TestServer::start().await;
    let client = server.client();
    client.create_stream("/p/s", &CreateStream::with_content_type("text/plain")).await.unwrap();
    let mut old = IdempotentProducer::new(&client, "/p/s", "text/plain", "writer", 0).unwrap();
    assert!(!old.append("a").await.unwrap().duplicate);
    // A retry of seq 0 (as after a lost answer) is recognised as a duplicate.
    let retry = AppendOptions { producer: Some(("writer".into(), 0, 0)), ..AppendOptions::default() };
    assert!(client.append_with("/p/s", "text/plain", Bytes::from_static(b"a"), &retry).await.unwrap().duplicate);
    let mut new = IdempotentProducer::new(&client, "/p/s", "text/plain", "writer", 1).unwrap();
    new.append("b").await.unwrap();
    let fenced = old.append("zombie").await.unwrap_err();
    assert_eq!(fenced.code(), Some(&ErrorCode::StaleEpoch));
    let mut claimer = IdempotentProducer::new(&client, "/p/s", "text/plain", "writer", 0).unwrap();
    claimer.auto_claim = true;
    claimer.close("c").await.unwrap();
    assert_eq!(claimer.epoch(), 2);
    assert_eq!(client.read_all("/p/s", START).await.unwrap().data, Bytes::from_static(b"abc"));
}

async fn tail_resumes_after_a_restart(live: LiveMode) {
    let mut server = TestServer::start().await;
    let client = server.client();
    client.create_stream("/t/s", &CreateStream::json()).await.unwrap();
    client.append_json("/t/s", &json!({"n": 1})).await.unwrap();
    let options =
        TailOptions { initial_backoff: Duration::from_millis(50), ..TailOptions::from_offset(START).live(live) };
    let mut tail = client.tail("/t/s", options).unwrap();
    let mut seen = Vec::new();
    async fn next(tail: &mut attache_client::Tail) -> Option<attache_client::Result<attache_client::Chunk>> {
        tokio::time::timeout(Duration::from_secs(20), tail.next()).await.expect("the tail moves")
    }
    while seen.is_empty() {
        seen.extend(next(&mut tail).await.unwrap().unwrap().json_items().unwrap());
    }
    // Live now: the server goes away and comes back on the same port.
    server.restart().await;
    client.append_json("/t/s", &json!({"n": 2})).await.unwrap();
    client.append_json("/t/s", &json!({"n": 3})).await.unwrap();
    client.close_stream("/t/s").await.unwrap();
    while let Some(chunk) = next(&mut tail).await {
        seen.extend(chunk.unwrap().json_items().unwrap());
    }
    assert_eq!(seen, [json!({"n": 1}), json!({"n": 2}), json!({"n": 3})], "nothing skipped, nothing repeated");
}

#[tokio::test]
async fn a_long_poll_tail_resumes_from_its_last_offset_after_the_server_restarts() {
    tail_resumes_after_a_restart(LiveMode::LongPoll).await;
}

#[tokio::test]
async fn an_sse_tail_resumes_from_its_last_offset_after_the_server_restarts() {
    tail_resumes_after_a_restart(LiveMode::Sse).await;
}

#[tokio::test]
async fn an_sse_tail_of_a_binary_stream_decodes_base64_and_survives_server_reconnects() {
    let server = TestServer::start().await;
    let client = server.client();
    client.create_stream("/bin/s", &CreateStream::with_content_type("application/octet-stream")).await.unwrap();
    let mut tail = client.tail("/bin/s", TailOptions::from_offset(NOW).live(LiveMode::Sse)).unwrap();
    let first = tail.next().await.unwrap().unwrap();
    assert!(first.up_to_date && first.data.is_empty());
    let writer = client.clone();
    tokio::spawn(async move {
        // Longer than the server's SSE answer lasts (2s), so the tail reconnects in between.
        for b in [0u8, 255, 10] {
            tokio::time::sleep(Duration::from_millis(1200)).await;
            writer.append("/bin/s", "application/octet-stream", vec![b, b'\n', b]).await.unwrap();
        }
        writer.close_stream("/bin/s").await.unwrap();
    });
    let mut got = Vec::new();
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(20), tail.next()).await.unwrap() {
        got.extend_from_slice(&chunk.unwrap().data);
    }
    assert_eq!(got, [0, b'\n', 0, 255, b'\n', 255, 10, b'\n', 10]);
}

#[tokio::test]
async fn a_live_state_materializes_the_manifest_and_inbox_and_follows_new_rows() {
    let server = TestServer::start().await;
    let client = server.client();
    let entity = spawn(&client, "/chat/live").await;
    let live = LiveState::entity(&client, &entity).unwrap();
    live.caught_up(Duration::from_secs(5)).await.unwrap();
    assert!(live.inbox().is_empty());
    let receipt = client.send_message(&entity, &SendMessage::text("hi").key("k1")).await.unwrap();
    let up = client
        .upload_attachment(&entity, AttachmentInput::bytes(&b"abc"[..]).id("a1").inbox("k1").unwrap())
        .await
        .unwrap();
    live.wait_for_txids(&[receipt.txid, up.txid], Duration::from_secs(10)).await.unwrap();
    let inbox = live.inbox();
    assert_eq!(inbox.len(), 1);
    assert_eq!((inbox[0].key.as_str(), inbox[0].text()), ("k1", Some("hi")));
    let manifest = live.manifest();
    assert_eq!(manifest.len(), 1);
    assert_eq!((manifest[0].id.as_str(), manifest[0].status), ("a1", AttachmentStatus::Complete));
    client.delete_attachment(&entity, "a1").await.unwrap();
    live.wait_until(Duration::from_secs(10), |s| s.manifest().is_empty()).await.unwrap();
}

#[tokio::test]
async fn errors_say_what_the_server_said() {
    let server = TestServer::start().await;
    let client = server.client();
    let missing = EntityUrl::parse("/chat/none").unwrap();
    let err = client.get_entity(&missing).await.unwrap_err();
    assert_eq!((err.status(), err.code()), (Some(404), Some(&ErrorCode::NotFound)));
    assert!(err.to_string().contains("Entity not found at /chat/none"), "{err}");
    let nowhere = attache_client::RuntimeServerClient::new("http://127.0.0.1:9").unwrap();
    let down = nowhere.health().await.unwrap_err();
    assert!(down.is_transient() && down.status().is_none(), "{down}");
}

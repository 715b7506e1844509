//! Two instances of the scale-out backend over one database: they agree on
//! every stream, serialize writes to one stream between them, wake each
//! other's live readers, share blobs and compare-and-set entities atomically.
//! Runs on a throwaway PostgreSQL cluster (or `ATTACHE_TEST_PG_URL`); without
//! any PostgreSQL installed it prints why and passes.

mod support;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use attache_core::{ContentType, ProducerHeaders, StreamPath};
use attache_storage::{
    AppendRequest, CreateOutcome, CreateStream, EntityRecord, ReadFrom, Registry, StoreError, StreamStore,
};
use bytes::Bytes;
use support::on_two_postgres_backends;

fn json_stream(path: &str) -> CreateStream {
    CreateStream {
        path: StreamPath::new(path).unwrap(),
        content_type: Some(ContentType::parse("application/json").unwrap()),
        ttl: None,
        expires_at: None,
        closed: false,
        initial: Bytes::new(),
        fork: None,
        owner: None,
        take_kept_path: false,
    }
}

fn json_append(path: &str, body: String) -> AppendRequest {
    AppendRequest {
        path: path.into(),
        content_type: Some(ContentType::parse("application/json").unwrap()),
        body: Bytes::from(body),
        close: false,
        seq: None,
        producer: None,
        messages: None,
    }
}

async fn read_all(store: &dyn StreamStore, path: &str) -> Vec<Bytes> {
    let mut out = Vec::new();
    let mut from = ReadFrom::Start;
    loop {
        let batch = store.read(path, from, 1 << 16).await.unwrap();
        out.extend(batch.messages().iter().cloned());
        if batch.up_to_date() {
            return out;
        }
        from = ReadFrom::At(batch.next);
    }
}

#[test]
fn two_instances_share_streams_and_wake_each_others_readers_or_skip_without_postgres() {
    on_two_postgres_backends(|a, b| async move {
        let (a, b): (Arc<dyn StreamStore>, Arc<dyn StreamStore>) = (Arc::new(a.store), Arc::new(b.store));

        // A stream created on one instance is there on the other at once (asked of the database).
        a.create(json_stream("/shared/log")).await.unwrap();
        assert_eq!(b.head("/shared/log").await.unwrap().tail, 0);
        assert!(matches!(b.create(json_stream("/shared/log")).await.unwrap(), CreateOutcome::Existed(_)));

        // A reader waiting on b wakes when a commits.
        let mut signal = b.subscribe("/shared/log").await.unwrap();
        let before = b.read("/shared/log", ReadFrom::Tail, 1 << 20).await.unwrap().next;
        a.append(json_append("/shared/log", r#"{"n":"first"}"#.into())).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), signal.changed()).await.expect("b hears a's commit").unwrap();
        let got = b.read("/shared/log", ReadFrom::At(before), 1 << 20).await.unwrap();
        assert_eq!(got.messages(), vec![Bytes::from_static(br#"{"n":"first"}"#)]);

        // Concurrent writers on both instances: one order, no position given twice.
        let mut tasks = Vec::new();
        for w in 0..8 {
            let store = if w % 2 == 0 { a.clone() } else { b.clone() };
            tasks.push(tokio::spawn(async move {
                for i in 0..40 {
                    store.append(json_append("/shared/log", format!(r#"{{"w":{w},"i":{i}}}"#))).await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let on_a = read_all(a.as_ref(), "/shared/log").await;
        let on_b = read_all(b.as_ref(), "/shared/log").await;
        assert_eq!(on_a.len(), 1 + 8 * 40);
        assert_eq!(on_a, on_b, "both instances read the same messages in the same order");
        let unique: HashSet<&Bytes> = on_a.iter().collect();
        assert_eq!(unique.len(), on_a.len());
        // Each writer's messages keep their order.
        let mut last: BTreeMap<u64, i64> = BTreeMap::new();
        for m in &on_a[1..] {
            let v: serde_json::Value = serde_json::from_slice(m).unwrap();
            let (w, i) = (v["w"].as_u64().unwrap(), v["i"].as_i64().unwrap());
            assert!(last.insert(w, i).unwrap_or(-1) < i);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(a.head("/shared/log").await.unwrap().tail, b.head("/shared/log").await.unwrap().tail);

        // An idempotent producer is deduplicated whichever instance the retry reaches.
        let mut req = json_append("/shared/log", r#"{"p":0}"#.into());
        req.producer = Some(ProducerHeaders { id: "p1".into(), epoch: 0, seq: 0 });
        assert!(!a.append(req.clone()).await.unwrap().duplicate);
        assert!(b.append(req).await.unwrap().duplicate);

        // Both instances creating one path at once: exactly one creates it.
        let (x, y) = tokio::join!(a.create(json_stream("/shared/race")), b.create(json_stream("/shared/race")));
        let created = [x.unwrap(), y.unwrap()].iter().filter(|o| matches!(o, CreateOutcome::Created(_))).count();
        assert_eq!(created, 1);

        // A delete on one instance is seen by the other's readers.
        let mut signal = b.subscribe("/shared/race").await.unwrap();
        a.delete("/shared/race").await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), signal.changed()).await.expect("b hears the delete").unwrap();
        assert_eq!(b.head("/shared/race").await.unwrap_err(), StoreError::NotFound);

        // A blob uploaded through one instance is read through the other.
        let mut writer = a.stage_blob().await.unwrap();
        let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        writer.write(bytes::Bytes::from(payload.clone())).await.unwrap();
        let staged = writer.finish().await.unwrap();
        let mut req = json_stream("/shared/blob");
        req.content_type = Some(ContentType::octet_stream());
        let info = a.create_blob_stream(req, staged).await.unwrap();
        let sha = info.blob.as_ref().unwrap().sha256.clone();
        let got: Vec<u8> = read_all(b.as_ref(), "/shared/blob").await.concat();
        assert_eq!(got, payload);
        let read = b.read_blob(&sha, 0..u64::MAX).await.unwrap();
        assert_eq!(read.len, payload.len() as u64);
        let chunks: Vec<Bytes> = futures::TryStreamExt::try_collect(read.body).await.unwrap();
        assert_eq!(chunks.concat(), payload);

        a.close().await;
        b.close().await;
    });
}

fn entity(url: &str) -> EntityRecord {
    EntityRecord {
        url: url.into(),
        entity_type: "task".into(),
        instance_id: "t1".into(),
        status: "idle".into(),
        tags: Default::default(),
        args: None,
        created_by: "/_principal/user/alice".into(),
        created_at_ms: 1,
        updated_at_ms: 1,
        extra: Some(count(0)),
        incarnation: Some("i1".into()),
        parent: None,
        ancestors: Vec::new(),
    }
}

fn count(n: u64) -> attache_storage::RawJson {
    attache_storage::RawJson::of(&serde_json::json!({ "count": n })).unwrap()
}

fn count_of(extra: &attache_storage::RawJson) -> u64 {
    extra.parse::<serde_json::Value>().unwrap()["count"].as_u64().unwrap()
}

#[test]
fn entity_updates_from_two_instances_are_compare_and_set_or_skip_without_postgres() {
    on_two_postgres_backends(|a, b| async move {
        let (a, b): (Arc<dyn Registry>, Arc<dyn Registry>) = (Arc::new(a.registry), Arc::new(b.registry));
        assert!(a.insert_entity(entity("/task/t1")).await.unwrap().1);
        assert!(!b.insert_entity(entity("/task/t1")).await.unwrap().1, "b sees a's entity");
        let mut tasks = Vec::new();
        for n in 0..6 {
            let reg = if n % 2 == 0 { a.clone() } else { b.clone() };
            tasks.push(tokio::spawn(async move {
                for _ in 0..20 {
                    reg.update_entity(
                        "/task/t1",
                        Box::new(|e| {
                            let n = e.extra.as_ref().map_or(0, count_of);
                            e.extra = Some(count(n + 1));
                            Ok(())
                        }),
                    )
                    .await
                    .unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let final_a = a.update_entity("/task/t1", Box::new(|_| Ok(()))).await.unwrap();
        assert_eq!(count_of(&final_a.extra.unwrap()), 120, "no update was lost");
        // Grants made on one instance reach the other's cache through notifications.
        let grant = a
            .add_grant(attache_storage::NewGrant {
                entity_url: "/task/t1".into(),
                incarnation: Some("i1".into()),
                subject: attache_core::GrantSubject::Principal("/_principal/user/bob".into()),
                permission: attache_core::Permission::Read,
                expires_at: None,
                expires_at_ms: None,
                created_by: "/_principal/user/alice".into(),
                propagation: Default::default(),
                copy_to_children: false,
            })
            .await
            .unwrap();
        let mut seen = false;
        for _ in 0..50 {
            if b.grants("/task/t1").iter().any(|g| g.id == grant.id) {
                seen = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(seen, "b learns of a's grant");
        assert_eq!(count_of(&b.entity("/task/t1").await.unwrap().extra.unwrap()), 120);
    });
}

/// `head` on an instance answers what it last heard of a stream; another
/// instance's commit reaches it a moment later, through a notification.
/// `head_fresh` answers what the database holds now, and the instance keeps
/// it. An attachment read relies on this: its complete row, read from the
/// database, may record bytes this instance has not heard of yet, and served
/// from `head` such a read was a truncated file answered `200`.
#[test]
fn head_fresh_sees_another_instances_commit_before_its_notification_arrives() {
    use attache_storage::postgres::registry::STREAMS_NOTIFIED;
    on_two_postgres_backends(|a, b| async move {
        let path = "/shared/fresh";
        a.store.create(json_stream(path)).await.unwrap();
        assert_eq!(b.store.head(path).await.unwrap().tail, 0, "b knows the stream, empty");

        let listener = b.registry.pauses().arm(STREAMS_NOTIFIED);
        let tail = a.store.append(json_append(path, r#"{"n":1}"#.into())).await.unwrap().info.tail;
        assert!(tail > 0);
        listener.reached().await;
        assert_eq!(b.store.head(path).await.unwrap().tail, 0, "b has not heard of the append yet");
        assert_eq!(b.store.head_fresh(path).await.unwrap().tail, tail, "the database has it");
        assert_eq!(b.store.head(path).await.unwrap().tail, tail, "and b keeps what it found");
        listener.release();
    });
}

//! The agent-facing SDK against a real server: the handler runtime and
//! `ctx.attachments`, send with attachments and its rollback, and image
//! hydration of a real entity.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use attache_client::hydrate::HydrationLimits;
use attache_client::runtime::{errors_of, AttachmentFilter, RuntimeOptions};
use attache_client::streams::START;
use attache_client::{
    AttachmentInput, EntityUrl, ErrorCode, HandlerContext, HandlerResult, MaterializedState, NewGrant, PrincipalKey,
    Role, Runtime, SendMessage, SpawnOptions,
};
use common::{image_bytes, spawn, TestServer};

/// The principal the handler runtime of the first test runs as.
const RUNTIME: &str = "agent:runtime";
use serde_json::json;

fn quick() -> RuntimeOptions {
    RuntimeOptions { discovery_interval: Duration::from_millis(100), ..RuntimeOptions::default() }
}

async fn main_state(
    client: &attache_client::RuntimeServerClient,
    entity: &attache_client::EntityUrl,
) -> MaterializedState {
    let chunk = client.read_all(&entity.main_stream(), START).await.unwrap();
    let mut state = MaterializedState::new();
    state.apply_all(chunk.json_items().unwrap().iter());
    state
}

/// (message key, its input ids, the first input's bytes, outputs listed after creating one, images hydrated)
type Seen = (String, Vec<String>, Vec<u8>, usize, Vec<String>);

#[tokio::test]
async fn the_runtime_hands_each_new_message_to_the_handler_with_its_attachments_as_the_sender() {
    let server = TestServer::start().await;
    let sam = server.client_as("user:sam");
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let record = seen.clone();
    let handler = move |ctx: HandlerContext| {
        let record = record.clone();
        async move {
            let inputs = ctx.attachments.inputs();
            let ids: Vec<String> = inputs.iter().map(|e| e.id.clone()).collect();
            let first = match inputs.first() {
                Some(e) => ctx.attachments.read(&e.id).await?.to_vec(),
                None => Vec::new(),
            };
            let out = ctx
                .attachments
                .create(
                    AttachmentInput::bytes(format!("seen {}", ids.len()))
                        .mime_type("text/plain")
                        .role(Role::Output)
                        .inbox(&ctx.message.key)?,
                )
                .await?;
            assert_eq!(ctx.attachments.get(&out.id).map(|e| e.role), Some(Role::Output), "created is listed at once");
            let outputs = ctx.attachments.list(&AttachmentFilter::role(Role::Output)).len();
            let hydrated = ctx.hydrate(&HydrationLimits::default()).await?;
            let images: Vec<String> = hydrated.image_ids().into_iter().map(str::to_owned).collect();
            record.lock().unwrap().push((ctx.message.key.clone(), ids, first, outputs, images));
            HandlerResult::Ok(())
        }
    };
    // The runtime watches the entities its principal may read: sam grants it hers.
    let runtime = Runtime::new(server.client_as(RUNTIME), "chat", handler).options(quick()).start();
    let entity = EntityUrl::parse("/chat/rt").unwrap();
    let grant = NewGrant::principal(&PrincipalKey::parse(RUNTIME).unwrap(), "read");
    sam.spawn_entity(&entity, &SpawnOptions { grants: vec![grant], ..SpawnOptions::default() }).await.unwrap();
    assert!(runtime.wait_for(Duration::from_secs(10), |s| s.entities() == 1).await);
    let img = image_bytes(64, 1);
    sam.send_with_attachments(
        &entity,
        SendMessage::text("look").key("m1"),
        vec![AttachmentInput::bytes(img.clone()).id("img1").mime_type("image/png")],
    )
    .await
    .unwrap();
    sam.send_message(&entity, &SendMessage::text("again").key("m2")).await.unwrap();
    assert!(runtime.wait_for(Duration::from_secs(15), |s| s.handled() == 2).await, "both messages are handled");
    runtime.stop().await;

    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen[0], ("m1".to_owned(), vec!["img1".to_owned()], img, 1, vec!["img1".to_owned()]));
    assert_eq!((seen[1].0.as_str(), seen[1].1.len(), seen[1].3), ("m2", 0, 2));
    assert_eq!(seen[1].4, ["img1"], "the conversation up to m2 still carries m1's image");
    // The outputs were written as the sender, not as the runtime's own principal.
    let outputs: Vec<_> =
        sam.list_attachments(&entity).await.unwrap().into_iter().filter(|e| e.role == Role::Output).collect();
    assert_eq!(outputs.len(), 2);
    assert!(outputs.iter().all(|e| e.created_by.as_deref() == Some("/principal/user%3Asam")));
}

#[tokio::test]
async fn a_failing_handler_is_reported_as_an_errors_row_and_the_runtime_keeps_going() {
    let server = TestServer::start().await;
    let client = server.client();
    let handler = |ctx: HandlerContext| async move {
        match ctx.message.text() {
            Some("fail") => Err("the model refused".into()),
            Some("panic") => panic!("handler exploded"),
            _ => HandlerResult::Ok(()),
        }
    };
    let runtime = Runtime::new(client.clone(), "bot", handler).options(quick()).start();
    let entity = spawn(&client, "/bot/b1").await;
    assert!(runtime.wait_for(Duration::from_secs(10), |s| s.entities() == 1).await);
    for (key, text) in [("k1", "fail"), ("k2", "panic"), ("k3", "fine")] {
        client.send_message(&entity, &SendMessage::text(text).key(key)).await.unwrap();
    }
    assert!(runtime.wait_for(Duration::from_secs(15), |s| s.handled() == 1 && s.failed() == 2).await);
    runtime.stop().await;
    let errors = errors_of(&main_state(&client, &entity).await);
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert_eq!(
        (errors[0]["inbox_key"].as_str(), errors[0]["message"].as_str()),
        (Some("k1"), Some("the model refused"))
    );
    assert_eq!(errors[1]["inbox_key"], "k2");
    assert!(errors[1]["message"].as_str().unwrap().contains("handler exploded"));
}

#[tokio::test]
async fn the_runtime_skips_old_messages_of_existing_entities_unless_asked_to_replay() {
    let server = TestServer::start().await;
    let client = server.client();
    let entity = spawn(&client, "/old/o1").await;
    client.send_message(&entity, &SendMessage::text("before").key("b")).await.unwrap();
    let count = |replay| {
        let client = client.clone();
        async move {
            let options = RuntimeOptions { replay_existing: replay, ..quick() };
            let runtime = Runtime::new(client, "old", |_ctx: HandlerContext| async { HandlerResult::Ok(()) })
                .options(options)
                .start();
            runtime.wait_for(Duration::from_secs(2), |s| s.handled() > 0).await;
            let n = runtime.stats().handled();
            runtime.stop().await;
            n
        }
    };
    assert_eq!(count(false).await, 0);
    assert_eq!(count(true).await, 1);
}

#[tokio::test]
async fn send_with_attachments_uploads_with_client_ids_then_sends_naming_them_as_subject() {
    let server = TestServer::start().await;
    let client = server.client_as("user:sam");
    let entity = spawn(&client, "/chat/send").await;
    let sent = client
        .send_with_attachments(
            &entity,
            SendMessage::text("two files"),
            vec![
                AttachmentInput::bytes(&b"one"[..]).filename("1.txt").mime_type("text/plain"),
                AttachmentInput::bytes(&b"two"[..]).id("chosen").filename("2.txt").mime_type("text/plain"),
            ],
        )
        .await
        .unwrap();
    assert!(sent.receipt.key.starts_with("client-"));
    assert_eq!(sent.attachments.len(), 2);
    assert_eq!(sent.attachments[1].id, "chosen");
    assert_eq!(sent.attachments[0].id.len(), 36, "a client-chosen UUID");
    let state = main_state(&client, &entity).await;
    assert!(state.inbox_message(&sent.receipt.key).is_some());
    for e in state.manifest() {
        assert_eq!(
            e.subject.as_ref().map(|s| (s.kind.as_str(), s.key.as_str())),
            Some(("inbox", sent.receipt.key.as_str()))
        );
        assert_eq!(e.role, Role::Input);
    }
}

#[tokio::test]
async fn a_failed_send_deletes_the_uploads_and_returns_the_first_error() {
    let server = TestServer::start().await;
    let client = server.client();
    let entity = spawn(&client, "/chat/rollback").await;
    client.send_message(&entity, &SendMessage::text("taken").key("dup")).await.unwrap();
    let err = client
        .send_with_attachments(
            &entity,
            SendMessage::text("again").key("dup"),
            vec![AttachmentInput::bytes(&b"a"[..]).id("r1"), AttachmentInput::bytes(&b"b"[..]).id("r2")],
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&ErrorCode::DuplicateKey), "{err}");
    assert!(client.list_attachments(&entity).await.unwrap().is_empty(), "both uploads were rolled back");
}

#[tokio::test]
async fn a_failed_upload_deletes_the_earlier_uploads_and_sends_nothing() {
    let server = TestServer::start_with(|c| c.max_attachment_bytes = 1000).await;
    let client = server.client();
    let entity = spawn(&client, "/chat/toobig").await;
    let err = client
        .send_with_attachments(
            &entity,
            SendMessage::text("with a big one").key("k"),
            vec![AttachmentInput::bytes(vec![1u8; 10]).id("small"), AttachmentInput::bytes(vec![2u8; 5000]).id("big")],
        )
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(413), "{err}");
    assert!(client.list_attachments(&entity).await.unwrap().is_empty());
    assert!(main_state(&client, &entity).await.inbox().is_empty(), "the message was not sent");
}

#[tokio::test]
async fn hydration_of_a_real_entity_sends_the_newest_images_within_limits_and_describes_the_rest() {
    let server = TestServer::start().await;
    let client = server.client();
    let entity = spawn(&client, "/chat/hydrate").await;
    let send = |key: &'static str, files: Vec<AttachmentInput>| {
        let client = client.clone();
        let entity = entity.clone();
        async move { client.send_with_attachments(&entity, SendMessage::text(key).key(key), files).await.unwrap() }
    };
    send(
        "m1",
        vec![AttachmentInput::bytes(image_bytes(300, 1)).id("old-small").mime_type("image/png").filename("old.png")],
    )
    .await;
    send(
        "m2",
        vec![
            AttachmentInput::bytes(image_bytes(900, 2)).id("mid-big").mime_type("image/jpeg").filename("big.jpg"),
            AttachmentInput::bytes(&b"%PDF"[..]).id("doc").mime_type("application/pdf").filename("report.pdf"),
        ],
    )
    .await;
    send("m3", vec![AttachmentInput::bytes(image_bytes(500, 3)).id("new").mime_type("image/png").filename("new.png")])
        .await;
    // An output attachment about m3 is not an input of it.
    client
        .create_attachment(
            &entity,
            AttachmentInput::bytes(image_bytes(10, 4)).mime_type("image/png").role(Role::Output).inbox("m3").unwrap(),
        )
        .await
        .unwrap();
    client
        .send_message(&entity, &SendMessage::new(json!({"text": "m4", "attachments": ["nope"]})).key("m4"))
        .await
        .unwrap();

    let conversation = client.hydrate_entity(&entity, &HydrationLimits::new(4, 1000)).await.unwrap();
    assert_eq!(
        conversation.image_ids(),
        ["old-small", "new"],
        "the big one is skipped; the older small one still fits"
    );
    let anthropic = conversation.to_anthropic();
    let texts: Vec<String> = anthropic
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|m| m["content"].as_array().unwrap().clone())
        .filter_map(|b| b["text"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(
        texts,
        [
            "m1",
            "m2",
            "[attachment not sent to model: big.jpg, reason=image attachment prompt limit]",
            "[attachment: report.pdf, type=application/pdf, size=4]",
            "m3",
            "m4",
            "[attachment missing: id=nope]",
        ]
    );
    assert_eq!(anthropic[2]["content"][1]["source"]["media_type"], "image/png");
    let openai = conversation.to_openai();
    assert!(openai[0]["content"][1]["image_url"]["url"].as_str().unwrap().starts_with("data:image/png;base64,"));
    let one = client.hydrate_entity(&entity, &HydrationLimits::new(1, 10_000)).await.unwrap();
    assert_eq!(one.image_ids(), ["new"], "with room for one image, the newest wins");
}

#[tokio::test]
async fn a_runtime_that_waits_by_sse_handles_messages_too() {
    let server = TestServer::start().await;
    let client = server.client();
    let options = RuntimeOptions { live: attache_client::LiveMode::Sse, ..quick() };
    let runtime = Runtime::new(client.clone(), "sse", |_ctx: HandlerContext| async { HandlerResult::Ok(()) })
        .options(options)
        .start();
    let entity = spawn(&client, "/sse/s1").await;
    assert!(runtime.wait_for(Duration::from_secs(10), |s| s.entities() == 1).await);
    // Spaced out past the server's SSE answer length (2s), so the runtime reconnects in between.
    client.send_message(&entity, &SendMessage::text("one")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    client.send_message(&entity, &SendMessage::text("two")).await.unwrap();
    assert!(
        runtime.wait_for(Duration::from_secs(15), |s| s.handled() == 2).await,
        "handled {}",
        runtime.stats().handled()
    );
    runtime.stop().await;
}

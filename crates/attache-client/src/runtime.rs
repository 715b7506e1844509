//! The handler runtime: watches every entity of one type, keeps each one's
//! main stream materialized, and calls a handler for each new inbox message
//! with a [`HandlerContext`]. `ctx.attachments` lists and gets from the live
//! manifest, and reads and creates over HTTP as the principal the message
//! came from. A handler that fails (or panics) is reported on the entity's
//! main stream as an `errors` row, and the runtime goes on.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use attache_core::manifest::{ManifestEntry, Role, Subject, MANIFEST};
use attache_core::state::ChangeEvent;
use attache_core::{now_ms, EntityUrl};
use bytes::Bytes;
use serde_json::{json, Value};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::client::{AttachmentInput, RuntimeServerClient};
use crate::error::{Error, Result};
use crate::hydrate::{hydrate, messages_of, Conversation, HttpSource, HydrationLimits};
use crate::state::{Applied, InboxMessage, MaterializedState, INBOX};
use crate::streams::{LiveMode, TailOptions, START};

/// The collection failed handlers are reported in.
pub const ERRORS: &str = "errors";

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type HandlerResult = std::result::Result<(), BoxError>;

/// Something that handles one inbox message. Any `async fn(HandlerContext) -> HandlerResult` is one.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, ctx: HandlerContext) -> Pin<Box<dyn Future<Output = HandlerResult> + Send>>;
}

impl<F, Fut> Handler for F
where
    F: Fn(HandlerContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send + 'static,
{
    fn handle(&self, ctx: HandlerContext) -> Pin<Box<dyn Future<Output = HandlerResult> + Send>> {
        Box::pin(self(ctx))
    }
}

type SharedState = Arc<RwLock<MaterializedState>>;

fn read_state<T>(state: &SharedState, f: impl FnOnce(&MaterializedState) -> T) -> T {
    match state.read() {
        Ok(s) => f(&s),
        Err(poisoned) => f(&poisoned.into_inner()),
    }
}

fn write_state<T>(state: &SharedState, f: impl FnOnce(&mut MaterializedState) -> T) -> T {
    match state.write() {
        Ok(mut s) => f(&mut s),
        Err(poisoned) => f(&mut poisoned.into_inner()),
    }
}

/// Which attachments `ctx.attachments.list` returns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AttachmentFilter {
    pub role: Option<Role>,
    pub subject: Option<Subject>,
}

impl AttachmentFilter {
    pub fn role(role: Role) -> AttachmentFilter {
        AttachmentFilter { role: Some(role), subject: None }
    }
    pub fn subject(mut self, subject: Subject) -> AttachmentFilter {
        self.subject = Some(subject);
        self
    }
    fn matches(&self, e: &ManifestEntry) -> bool {
        self.role.is_none_or(|r| e.role == r) && self.subject.as_ref().is_none_or(|s| e.subject.as_ref() == Some(s))
    }
}

/// `ctx.attachments`: the entity's attachments.
#[derive(Clone)]
pub struct Attachments {
    entity: EntityUrl,
    message_key: String,
    state: SharedState,
    client: RuntimeServerClient,
}

impl Attachments {
    /// Manifest entries that match `filter`, in the order they were recorded (from the live manifest).
    pub fn list(&self, filter: &AttachmentFilter) -> Vec<ManifestEntry> {
        read_state(&self.state, |s| s.manifest().into_iter().filter(|e| filter.matches(e)).collect())
    }

    /// One manifest entry (from the live manifest).
    pub fn get(&self, id: &str) -> Option<ManifestEntry> {
        read_state(&self.state, |s| s.attachment(id))
    }

    /// The complete input attachments of the message being handled.
    pub fn inputs(&self) -> Vec<ManifestEntry> {
        read_state(&self.state, |s| {
            s.manifest().into_iter().filter(|e| crate::hydrate::belongs_to(e, &self.message_key)).collect()
        })
    }

    /// An attachment's bytes, over HTTP as the message's sender.
    pub async fn read(&self, id: &str) -> Result<Bytes> {
        self.client.read_attachment(&self.entity, id).await
    }

    /// Creates an attachment, over HTTP as the message's sender; it is in
    /// the local manifest as soon as this returns.
    pub async fn create(&self, input: AttachmentInput) -> Result<ManifestEntry> {
        let receipt = self.client.upload_attachment(&self.entity, input).await?;
        let value = serde_json::to_value(&receipt.attachment).map_err(|e| Error::Protocol(e.to_string()))?;
        let now = attache_core::state::timestamp(now_ms());
        let row = ChangeEvent::update(MANIFEST, &receipt.attachment.key, value, &receipt.txid, &now);
        let row = serde_json::to_value(&row).map_err(|e| Error::Protocol(e.to_string()))?;
        write_state(&self.state, |s| s.apply(&row));
        Ok(receipt.attachment)
    }
}

/// What a handler gets for one message.
#[derive(Clone)]
pub struct HandlerContext {
    pub entity: EntityUrl,
    pub message: InboxMessage,
    pub attachments: Attachments,
    client: RuntimeServerClient,
    state: SharedState,
}

impl HandlerContext {
    /// A client acting as the message's sender.
    pub fn client(&self) -> &RuntimeServerClient {
        &self.client
    }

    /// A copy of the entity's materialized state now.
    pub fn state(&self) -> MaterializedState {
        read_state(&self.state, Clone::clone)
    }

    /// The entity's messages up to and including this one, hydrated for a model.
    pub async fn hydrate(&self, limits: &HydrationLimits) -> Result<Conversation> {
        let mut messages = read_state(&self.state, messages_of);
        if let Some(at) = messages.iter().position(|m| m.key == self.message.key) {
            messages.truncate(at + 1);
        }
        let source = HttpSource { client: &self.client, entity: &self.entity };
        Ok(hydrate(&messages, &source, limits).await)
    }
}

/// How the runtime finds entities and messages.
#[derive(Debug, Clone)]
pub struct RuntimeOptions {
    /// How often the entity list is checked for new entities of the type.
    pub discovery_interval: Duration,
    pub live: LiveMode,
    /// Also handle messages that were in the inbox of entities that existed
    /// when the runtime started (entities spawned later are always handled
    /// from their first message).
    pub replay_existing: bool,
    /// Read and create attachments as the message's sender (dev-mode
    /// credentials only; a bearer token always acts as itself).
    pub act_as_sender: bool,
}

impl Default for RuntimeOptions {
    fn default() -> RuntimeOptions {
        RuntimeOptions {
            discovery_interval: Duration::from_secs(1),
            live: LiveMode::LongPoll,
            replay_existing: false,
            act_as_sender: true,
        }
    }
}

/// Counters of a running runtime.
#[derive(Debug, Default)]
pub struct RuntimeStats {
    handled: AtomicU64,
    failed: AtomicU64,
    entities: AtomicUsize,
    changed: Notify,
}

impl RuntimeStats {
    /// Messages whose handler succeeded.
    pub fn handled(&self) -> u64 {
        self.handled.load(Ordering::Relaxed)
    }
    /// Messages whose handler failed or panicked.
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }
    /// Entities being watched.
    pub fn entities(&self) -> usize {
        self.entities.load(Ordering::Relaxed)
    }
}

/// Handles the inbox messages of every entity of one type.
pub struct Runtime {
    client: RuntimeServerClient,
    entity_type: String,
    handler: Arc<dyn Handler>,
    options: RuntimeOptions,
}

impl Runtime {
    pub fn new(client: RuntimeServerClient, entity_type: &str, handler: impl Handler) -> Runtime {
        Runtime {
            client,
            entity_type: entity_type.to_owned(),
            handler: Arc::new(handler),
            options: RuntimeOptions::default(),
        }
    }

    pub fn options(mut self, options: RuntimeOptions) -> Runtime {
        self.options = options;
        self
    }

    /// Starts the runtime in the background.
    pub fn start(self) -> RuntimeHandle {
        let stop = CancellationToken::new();
        let stats = Arc::new(RuntimeStats::default());
        let task = tokio::spawn(supervise(self, stop.clone(), stats.clone()));
        RuntimeHandle { stop, stats, task }
    }

    /// Runs until `stop` is cancelled.
    pub async fn run(self, stop: CancellationToken) {
        supervise(self, stop, Arc::new(RuntimeStats::default())).await
    }
}

/// A started runtime.
pub struct RuntimeHandle {
    stop: CancellationToken,
    stats: Arc<RuntimeStats>,
    task: tokio::task::JoinHandle<()>,
}

impl RuntimeHandle {
    pub fn stats(&self) -> &RuntimeStats {
        &self.stats
    }

    /// Waits until `done(stats)` holds; false on timeout.
    pub async fn wait_for(&self, timeout: Duration, done: impl Fn(&RuntimeStats) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.stats.changed.notified();
            if done(&self.stats) {
                return true;
            }
            tokio::select! {
                _ = changed => {}
                _ = tokio::time::sleep_until(deadline) => return done(&self.stats),
            }
        }
    }

    /// Stops watching; a handler already running is allowed to finish.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

async fn supervise(runtime: Runtime, stop: CancellationToken, stats: Arc<RuntimeStats>) {
    let runtime = Arc::new(runtime);
    let mut known: HashSet<String> = HashSet::new();
    let mut watchers = JoinSet::new();
    let mut first_pass = true;
    loop {
        match runtime.client.list_entities(Some(&runtime.entity_type)).await {
            Ok(entities) => {
                for e in entities {
                    if e.entity_type != runtime.entity_type || !known.insert(e.url.clone()) {
                        continue;
                    }
                    if matches!(e.status.as_str(), "stopped" | "killed") {
                        continue;
                    }
                    let Ok(url) = EntityUrl::parse(&e.url) else { continue };
                    let handle_existing = !first_pass || runtime.options.replay_existing;
                    stats.entities.fetch_add(1, Ordering::Relaxed);
                    stats.changed.notify_waiters();
                    watchers.spawn(watch_entity(runtime.clone(), url, handle_existing, stop.clone(), stats.clone()));
                }
                first_pass = false;
            }
            Err(err) => tracing::warn!(entity_type = %runtime.entity_type, %err, "listing entities failed"),
        }
        // Reap finished watchers without waiting.
        while watchers.try_join_next().is_some() {}
        tokio::select! {
            _ = tokio::time::sleep(runtime.options.discovery_interval) => {}
            _ = stop.cancelled() => break,
        }
    }
    while watchers.join_next().await.is_some() {}
}

/// Follows one entity's main stream and feeds its new inbox messages to the handler, one at a time.
async fn watch_entity(
    runtime: Arc<Runtime>,
    entity: EntityUrl,
    handle_existing: bool,
    stop: CancellationToken,
    stats: Arc<RuntimeStats>,
) {
    let state: SharedState = Arc::new(RwLock::new(MaterializedState::new()));
    let (tx, mut rx) = mpsc::unbounded_channel::<InboxMessage>();
    let worker = {
        let (runtime, entity, state, stop, stats) =
            (runtime.clone(), entity.clone(), state.clone(), stop.clone(), stats.clone());
        tokio::spawn(async move {
            loop {
                let message = tokio::select! {
                    m = rx.recv() => m,
                    _ = stop.cancelled() => None,
                };
                let Some(message) = message else { return };
                run_handler(&runtime, &entity, &state, message, &stats).await;
            }
        })
    };
    let options = TailOptions { live: runtime.options.live, ..TailOptions::from_offset(START) };
    let mut tail = match runtime.client.tail(&entity.main_stream(), options) {
        Ok(t) => t,
        Err(err) => {
            tracing::warn!(%entity, %err, "cannot follow the entity");
            return;
        }
    };
    let mut caught_up = false;
    loop {
        let next = tokio::select! {
            n = tail.next() => n,
            _ = stop.cancelled() => break,
        };
        let chunk = match next {
            Some(Ok(chunk)) => chunk,
            Some(Err(err)) => {
                tracing::warn!(%entity, %err, "following the entity stopped");
                break;
            }
            None => break,
        };
        let items = match chunk.json_items() {
            Ok(items) => items,
            Err(err) => {
                tracing::warn!(%entity, %err, "the main stream is not JSON");
                break;
            }
        };
        for item in &items {
            let applied = write_state(&state, |s| s.apply(item));
            if let Applied::Upserted { collection, key, fresh: true } = applied {
                if collection == INBOX && (caught_up || handle_existing) {
                    if let Some(m) = read_state(&state, |s| s.inbox_message(&key)) {
                        let _ = tx.send(m);
                    }
                }
            }
        }
        caught_up |= chunk.up_to_date;
    }
    drop(tx);
    let _ = worker.await;
    stats.entities.fetch_sub(1, Ordering::Relaxed);
    stats.changed.notify_waiters();
}

async fn run_handler(
    runtime: &Runtime,
    entity: &EntityUrl,
    state: &SharedState,
    message: InboxMessage,
    stats: &RuntimeStats,
) {
    let client = match (runtime.options.act_as_sender, message.sender()) {
        (true, Some(sender)) => runtime.client.acting_as(&sender),
        _ => runtime.client.clone(),
    };
    let ctx = HandlerContext {
        entity: entity.clone(),
        attachments: Attachments {
            entity: entity.clone(),
            message_key: message.key.clone(),
            state: state.clone(),
            client: client.clone(),
        },
        message: message.clone(),
        client,
        state: state.clone(),
    };
    // The handler runs in its own task so that a panic is caught and reported like an error.
    let outcome = tokio::spawn(runtime.handler.handle(ctx)).await;
    let failure = match outcome {
        Ok(Ok(())) => None,
        Ok(Err(err)) => Some(err.to_string()),
        Err(join) if join.is_panic() => {
            let payload = join.into_panic();
            let text = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Some(format!("the handler panicked: {text}"))
        }
        Err(_) => Some("the handler was cancelled".into()),
    };
    match failure {
        None => {
            stats.handled.fetch_add(1, Ordering::Relaxed);
        }
        Some(why) => {
            tracing::warn!(%entity, key = %message.key, error = %why, "handler failed");
            if let Err(err) = report_failure(&runtime.client, entity, &runtime.entity_type, &message, &why).await {
                tracing::warn!(%entity, %err, "could not write the errors row");
            }
            stats.failed.fetch_add(1, Ordering::Relaxed);
        }
    }
    stats.changed.notify_waiters();
}

/// Appends `{"type":"errors", ...}` to the entity's main stream.
pub async fn report_failure(
    client: &RuntimeServerClient,
    entity: &EntityUrl,
    handler: &str,
    message: &InboxMessage,
    error: &str,
) -> Result<()> {
    let now = now_ms();
    let timestamp = attache_core::state::timestamp(now);
    let value = json!({
        "source": "handler",
        "handler": handler,
        "inbox_key": message.key,
        "message": error,
        "timestamp": timestamp,
    });
    let key = format!("handler-{}-{now}", message.key);
    let row = ChangeEvent::insert(ERRORS, &key, value, &crate::ids::new_uuid(), &timestamp);
    client.append_json(&entity.main_stream(), &row).await.map(|_| ())
}

/// The `errors` rows of a materialized stream.
pub fn errors_of(state: &MaterializedState) -> Vec<Value> {
    state.rows(ERRORS).into_iter().map(|(_, v)| v.clone()).collect()
}

//! The State Protocol materializer: applies an entity's main-stream rows, in
//! stream order, into collections (`type` → `key` → value), with typed views
//! of the two the SDK reads (`manifest`, `inbox`). [`LiveState`] keeps one
//! up to date from a live tail.
//!
//! Semantics follow `@durable-streams/state`: insert, update and upsert
//! replace the whole value; delete removes; a `reset` control clears.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use attache_core::manifest::{ManifestEntry, MANIFEST};
use attache_core::PrincipalKey;
use serde_json::Value;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::client::RuntimeServerClient;
use crate::error::{Error, Result};
use crate::streams::TailOptions;

pub const INBOX: &str = "inbox";

/// What applying one row did.
#[derive(Debug, Clone, PartialEq)]
pub enum Applied {
    /// A row was stored; `fresh` when its key was not there before.
    Upserted {
        collection: String,
        key: String,
        fresh: bool,
    },
    Deleted {
        collection: String,
        key: String,
    },
    /// A `reset` control: everything was cleared.
    Reset,
    /// A row this materializer does not understand (ignored).
    Ignored,
}

#[derive(Debug, Clone, Default)]
struct Collection {
    /// key → (arrival order, value)
    rows: HashMap<String, (u64, Value)>,
}

/// Collections materialized from State Protocol rows.
#[derive(Debug, Clone, Default)]
pub struct MaterializedState {
    collections: BTreeMap<String, Collection>,
    seq: u64,
    txids: HashSet<String>,
}

/// An inbox message, as a handler sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct InboxMessage {
    pub key: String,
    pub payload: Value,
    /// The sender's principal URL (`/principal/user%3Asam`).
    pub from: Option<String>,
    pub message_type: Option<String>,
    pub timestamp: Option<String>,
    /// The whole row value.
    pub value: Value,
}

impl InboxMessage {
    pub fn from_row(key: &str, value: &Value) -> InboxMessage {
        let text = |k: &str| value.get(k).and_then(Value::as_str).map(str::to_owned);
        InboxMessage {
            key: key.to_owned(),
            payload: value.get("payload").cloned().unwrap_or(Value::Null),
            from: text("from_principal").or_else(|| text("from")),
            message_type: text("message_type"),
            timestamp: text("timestamp"),
            value: value.clone(),
        }
    }

    /// The sender as a principal key, when the row names a valid one.
    pub fn sender(&self) -> Option<PrincipalKey> {
        self.from.as_deref().and_then(|f| PrincipalKey::parse(f).ok())
    }

    /// The message's text: a string payload, or the payload's `text` field.
    pub fn text(&self) -> Option<&str> {
        self.payload.as_str().or_else(|| self.payload.get("text").and_then(Value::as_str))
    }
}

impl MaterializedState {
    pub fn new() -> MaterializedState {
        MaterializedState::default()
    }

    /// Applies one message (a change row or a control row).
    pub fn apply(&mut self, row: &Value) -> Applied {
        let Some(headers) = row.get("headers") else { return Applied::Ignored };
        if let Some(control) = headers.get("control").and_then(Value::as_str) {
            if control == "reset" {
                self.clear();
                return Applied::Reset;
            }
            return Applied::Ignored;
        }
        let (Some(collection), Some(key), Some(op)) = (
            row.get("type").and_then(Value::as_str),
            row.get("key").and_then(Value::as_str),
            headers.get("operation").and_then(Value::as_str),
        ) else {
            return Applied::Ignored;
        };
        if let Some(txid) = headers.get("txid").and_then(Value::as_str) {
            self.txids.insert(txid.to_owned());
        }
        match op {
            "insert" | "update" | "upsert" => {
                let Some(value) = row.get("value") else { return Applied::Ignored };
                self.seq += 1;
                let seq = self.seq;
                let rows = &mut self.collections.entry(collection.to_owned()).or_default().rows;
                let fresh = match rows.get_mut(key) {
                    // A replaced row keeps its place in arrival order.
                    Some(existing) => {
                        existing.1 = value.clone();
                        false
                    }
                    None => {
                        rows.insert(key.to_owned(), (seq, value.clone()));
                        true
                    }
                };
                Applied::Upserted { collection: collection.to_owned(), key: key.to_owned(), fresh }
            }
            "delete" => {
                if let Some(c) = self.collections.get_mut(collection) {
                    c.rows.remove(key);
                }
                Applied::Deleted { collection: collection.to_owned(), key: key.to_owned() }
            }
            _ => Applied::Ignored,
        }
    }

    pub fn apply_all<'a>(&mut self, rows: impl IntoIterator<Item = &'a Value>) -> Vec<Applied> {
        rows.into_iter().map(|r| self.apply(r)).collect()
    }

    pub fn clear(&mut self) {
        self.collections.clear();
        self.txids.clear();
    }

    pub fn get(&self, collection: &str, key: &str) -> Option<&Value> {
        self.collections.get(collection)?.rows.get(key).map(|(_, v)| v)
    }

    /// The rows of a collection in the order their keys first arrived.
    pub fn rows(&self, collection: &str) -> Vec<(&str, &Value)> {
        let Some(c) = self.collections.get(collection) else { return Vec::new() };
        let mut rows: Vec<(u64, &str, &Value)> = c.rows.iter().map(|(k, (s, v))| (*s, k.as_str(), v)).collect();
        rows.sort_by_key(|(s, _, _)| *s);
        rows.into_iter().map(|(_, k, v)| (k, v)).collect()
    }

    pub fn collections(&self) -> Vec<&str> {
        self.collections.keys().map(String::as_str).collect()
    }

    /// Whether a row with this transaction id has been applied.
    pub fn has_txid(&self, txid: &str) -> bool {
        self.txids.contains(txid)
    }

    /// The attachments of the manifest, in the order they were first recorded.
    pub fn manifest(&self) -> Vec<ManifestEntry> {
        self.rows(MANIFEST)
            .into_iter()
            .filter_map(|(_, v)| serde_json::from_value::<ManifestEntry>(v.clone()).ok())
            .filter(|e| e.kind == "attachment")
            .collect()
    }

    pub fn attachment(&self, id: &str) -> Option<ManifestEntry> {
        let v = self.get(MANIFEST, &ManifestEntry::row_key(id))?;
        serde_json::from_value::<ManifestEntry>(v.clone()).ok().filter(|e| e.kind == "attachment")
    }

    /// The inbox in stream order.
    pub fn inbox(&self) -> Vec<InboxMessage> {
        self.rows(INBOX).into_iter().map(|(k, v)| InboxMessage::from_row(k, v)).collect()
    }

    pub fn inbox_message(&self, key: &str) -> Option<InboxMessage> {
        self.get(INBOX, key).map(|v| InboxMessage::from_row(key, v))
    }
}

/// A materialized main stream kept live by a background tail.
#[derive(Clone)]
pub struct LiveState {
    state: Arc<RwLock<MaterializedState>>,
    /// (offset applied so far, caught up at least once, ended with this error)
    progress: watch::Receiver<Progress>,
    stop: CancellationToken,
    /// Stops the background tail when the last clone is dropped.
    _guard: Arc<tokio_util::sync::DropGuard>,
}

#[derive(Debug, Clone, Default)]
struct Progress {
    offset: String,
    caught_up: bool,
    ended: Option<String>,
}

impl LiveState {
    /// Starts following `stream_path` from its start.
    pub fn follow(client: &RuntimeServerClient, stream_path: &str, options: TailOptions) -> Result<LiveState> {
        let mut tail = client.tail(stream_path, options)?;
        let state = Arc::new(RwLock::new(MaterializedState::new()));
        let (tx, rx) = watch::channel(Progress::default());
        let stop = CancellationToken::new();
        let (task_state, task_stop) = (state.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    next = tail.next() => next,
                    _ = task_stop.cancelled() => return,
                };
                match next {
                    Some(Ok(chunk)) => {
                        let items = match chunk.json_items() {
                            Ok(items) => items,
                            Err(e) => {
                                tx.send_modify(|p| p.ended = Some(e.to_string()));
                                return;
                            }
                        };
                        if let Ok(mut s) = task_state.write() {
                            s.apply_all(items.iter());
                        }
                        tx.send_modify(|p| {
                            p.offset = chunk.next_offset.clone();
                            p.caught_up |= chunk.up_to_date;
                            if chunk.closed {
                                p.ended = Some("the stream is closed".into());
                            }
                        });
                    }
                    Some(Err(e)) => {
                        tx.send_modify(|p| p.ended = Some(e.to_string()));
                        return;
                    }
                    None => {
                        tx.send_modify(|p| {
                            p.ended.get_or_insert_with(|| "the stream ended".into());
                        });
                        return;
                    }
                }
            }
        });
        let guard = Arc::new(stop.clone().drop_guard());
        Ok(LiveState { state, progress: rx, stop, _guard: guard })
    }

    /// Follows an entity's main stream.
    pub fn entity(client: &RuntimeServerClient, entity: &attache_core::EntityUrl) -> Result<LiveState> {
        LiveState::follow(client, &entity.main_stream(), TailOptions::default())
    }

    /// Runs `f` on the current state.
    pub fn read<T>(&self, f: impl FnOnce(&MaterializedState) -> T) -> T {
        match self.state.read() {
            Ok(s) => f(&s),
            Err(poisoned) => f(&poisoned.into_inner()),
        }
    }

    pub fn snapshot(&self) -> MaterializedState {
        self.read(Clone::clone)
    }

    pub fn manifest(&self) -> Vec<ManifestEntry> {
        self.read(MaterializedState::manifest)
    }

    pub fn inbox(&self) -> Vec<InboxMessage> {
        self.read(MaterializedState::inbox)
    }

    /// The offset applied so far.
    pub fn offset(&self) -> String {
        self.progress.borrow().offset.clone()
    }

    /// Waits until `done(state)` holds, or fails after `timeout` or when the stream ends without it.
    pub async fn wait_until(&self, timeout: Duration, mut done: impl FnMut(&MaterializedState) -> bool) -> Result<()> {
        let mut progress = self.progress.clone();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.read(&mut done) {
                return Ok(());
            }
            if let Some(why) = progress.borrow().ended.clone() {
                return Err(Error::Other(format!("the state stopped following its stream: {why}")));
            }
            tokio::select! {
                changed = progress.changed() => {
                    if changed.is_err() {
                        return Err(Error::Other("the state stopped following its stream".into()));
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(Error::Other(format!("timed out after {timeout:?} waiting for the stream")));
                }
            }
        }
    }

    /// Waits until the first catch-up is done.
    pub async fn caught_up(&self, timeout: Duration) -> Result<()> {
        let progress = self.progress.clone();
        self.wait_until(timeout, move |_| progress.borrow().caught_up).await
    }

    /// Waits until rows with each of `txids` have been applied.
    pub async fn wait_for_txids(&self, txids: &[String], timeout: Duration) -> Result<()> {
        self.wait_until(timeout, |s| txids.iter().all(|t| s.has_txid(t))).await
    }

    /// Stops following now (dropping the last clone does it too).
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn row(t: &str, k: &str, op: &str, v: Option<Value>) -> Value {
        let mut r = json!({"type": t, "key": k, "headers": {"operation": op, "txid": format!("tx-{k}-{op}")}});
        if let Some(v) = v {
            r["value"] = v;
        }
        r
    }

    #[test]
    fn updates_replace_whole_values_and_keep_arrival_order() {
        let mut s = MaterializedState::new();
        s.apply(&row("inbox", "b", "insert", Some(json!({"payload": 1}))));
        s.apply(&row("inbox", "a", "insert", Some(json!({"payload": 2}))));
        let applied = s.apply(&row("inbox", "b", "update", Some(json!({"status": "x"}))));
        assert_eq!(applied, Applied::Upserted { collection: "inbox".into(), key: "b".into(), fresh: false });
        let keys: Vec<_> = s.inbox().into_iter().map(|m| m.key).collect();
        assert_eq!(keys, ["b", "a"]);
        assert_eq!(s.get("inbox", "b"), Some(&json!({"status": "x"})), "update replaces, it does not merge");
        assert!(s.has_txid("tx-a-insert"));
    }

    #[test]
    fn deletes_and_resets_remove_rows() {
        let mut s = MaterializedState::new();
        s.apply(&row("manifest", "attachment:x", "upsert", Some(json!({}))));
        s.apply(&row("manifest", "attachment:x", "delete", None));
        assert!(s.get("manifest", "attachment:x").is_none());
        s.apply(&row("inbox", "k", "insert", Some(json!({}))));
        assert_eq!(s.apply(&json!({"headers": {"control": "reset"}})), Applied::Reset);
        assert!(s.collections().is_empty());
    }

    #[test]
    fn unknown_operations_and_malformed_rows_are_ignored() {
        let mut s = MaterializedState::new();
        assert_eq!(s.apply(&row("inbox", "k", "merge", Some(json!({})))), Applied::Ignored);
        assert_eq!(s.apply(&json!({"type": "inbox"})), Applied::Ignored);
        assert_eq!(s.apply(&json!({"headers": {"control": "snapshot-start"}})), Applied::Ignored);
        assert!(s.collections().is_empty());
    }

    #[test]
    fn inbox_messages_name_their_sender_and_text() {
        let m = InboxMessage::from_row(
            "k",
            &json!({"from": "/principal/user%3Asam", "payload": {"text": "hi"}, "message_type": "chat"}),
        );
        assert_eq!(m.sender().map(|p| p.to_string()), Some("user:sam".into()));
        assert_eq!(m.text(), Some("hi"));
        assert_eq!(m.message_type.as_deref(), Some("chat"));
    }
}

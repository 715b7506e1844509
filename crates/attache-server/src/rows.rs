//! Writing State Protocol rows to an entity's main stream, and the
//! materialized view of that stream the server keeps per entity.
//!
//! The views are a cache (the stream is the truth): at most
//! `view_cache_entries` of them, the least recently used dropped first, and
//! each keeps only what the server asks of it (manifest entries, names, inbox
//! keys; never inbox payloads).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use attache_core::manifest::{ManifestEntry, MANIFEST};
use attache_core::state::ChangeEvent;
use attache_core::ContentType;
use attache_storage::{AppendOutcome, AppendRequest, ReadFrom, StoreError, StreamStore};
use bytes::Bytes;
use serde_json::Value;

use crate::error::{ApiError, ApiResult};

/// A transaction id for the rows one request writes (a random UUID, as Electric sends).
pub fn new_txid() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40; // version 4
    b[8] = (b[8] & 0x3f) | 0x80; // RFC 4122 variant
    let h = hex::encode(b);
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

pub fn json_content_type() -> ContentType {
    // Parsed once: this runs on every task write.
    static JSON: std::sync::LazyLock<ContentType> = std::sync::LazyLock::new(|| {
        ContentType::parse("application/json").unwrap_or_else(|_| ContentType::octet_stream())
    });
    JSON.clone()
}

/// Serializes rows as one JSON array (one append, flattened into one message per row).
pub fn rows_body(rows: &[ChangeEvent]) -> ApiResult<Bytes> {
    serde_json::to_vec(rows)
        .map(Bytes::from)
        .map_err(|e| ApiError::new(axum::http::StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL", e.to_string()))
}

/// Appends rows to a main stream; a closed stream means the entity stopped.
pub async fn append_rows(
    store: &dyn StreamStore,
    main: &str,
    rows: &[ChangeEvent],
    close: bool,
) -> ApiResult<AppendOutcome> {
    let messages = rows
        .iter()
        .map(serde_json::to_vec)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ApiError::new(axum::http::StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL", e.to_string()))?;
    let req = AppendRequest::json_messages(main.to_owned(), json_content_type(), &messages, close);
    store.append(req).await.map_err(|e| match e {
        StoreError::Closed { .. } => not_running(),
        other => other.into(),
    })
}

pub fn not_running() -> ApiError {
    ApiError::NotRunning
}

/// The collections of one main stream that the server itself reads:
/// manifest entries by attachment id, and the keys of inbox rows.
#[derive(Debug, Default, PartialEq)]
pub struct MainView {
    /// The stream the view was built from: another instance may purge the
    /// entity and a new life may create a new stream at the same path, so a
    /// view is only caught up from the stream it started on.
    stream: Option<u64>,
    applied: u64,
    pub manifest: BTreeMap<String, ManifestEntry>,
    /// attache's key-value name → attachment id (task attachments, keyed uploads).
    pub by_name: HashMap<String, String>,
    /// Keys of the inbox rows (what a send checks for duplicates); payloads stay on the stream.
    pub inbox: HashSet<String>,
}

impl MainView {
    /// Where the stream ended when the view was caught up: a write decided
    /// from this view is conditioned on it (`StreamStore::append_guarded`).
    pub fn tail(&self) -> attache_core::Offset {
        attache_core::Offset(self.applied)
    }

    /// Folds one row of the main stream into the view. Rows come from clients
    /// too: any bytes are read without panicking, and a row that is not a
    /// well-formed State Protocol row changes nothing.
    pub fn apply(&mut self, row: &[u8]) {
        // Event rows, half of a task's stream, start so as the server writes them;
        // a row that merely could be one is parsed below and ignored the same way.
        if row.starts_with(br#"{"type":"event","#) {
            return;
        }
        // Manifest rows as the server writes them are read in one pass; any row
        // that does not parse so takes the general path below.
        if row.starts_with(br#"{"type":"manifest","#) {
            if let Ok(m) = serde_json::from_slice::<ManifestRow>(row) {
                self.apply_manifest(&m.key, &m.headers.operation, m.value);
                return;
            }
        }
        // Most other rows (runs, text) are not for this view either: read only the
        // collection, key and operation, and leave the value as raw JSON.
        let Ok(event) = serde_json::from_slice::<RowHead>(row) else { return };
        match (event.collection.as_ref(), event.headers.operation.as_ref()) {
            (MANIFEST, op) => {
                let entry = match event.value {
                    Some(v) if op != "delete" => match serde_json::from_str::<ManifestEntry>(v.get()) {
                        Ok(entry) => Some(entry),
                        Err(_) => return,
                    },
                    _ => None,
                };
                self.apply_manifest(&event.key, op, entry);
            }
            ("inbox", "delete") => {
                self.inbox.remove(event.key.as_ref());
            }
            // A row without a value was never an inbox message.
            ("inbox", _) if event.value.is_some() => {
                self.inbox.insert(event.key.into_owned());
            }
            _ => {}
        }
    }
}

impl MainView {
    fn apply_manifest(&mut self, key: &str, operation: &str, entry: Option<ManifestEntry>) {
        if operation == "delete" {
            if let Some(id) = key.strip_prefix("attachment:") {
                if let Some(old) = self.manifest.remove(id) {
                    if let Some(name) = old.ext.get("name").and_then(Value::as_str) {
                        if self.by_name.get(name).map(String::as_str) == Some(id) {
                            self.by_name.remove(name);
                        }
                    }
                }
            }
            return;
        }
        let Some(entry) = entry else { return };
        if let Some(name) = entry.ext.get("name").and_then(Value::as_str) {
            self.by_name.insert(name.to_owned(), entry.id.clone());
        }
        self.manifest.insert(entry.id.clone(), entry);
    }
}

/// Drops the least recently used entries nobody else holds until `map` has
/// at most `capacity` (entries in use stay, so it may stay over for a while).
pub(crate) fn evict_unused<V>(map: &mut hashlink::LinkedHashMap<String, Arc<V>>, capacity: usize) {
    while map.len() > capacity {
        let Some(key) = map.iter().find(|(_, v)| Arc::strong_count(v) == 1).map(|(k, _)| k.clone()) else { return };
        map.remove(&key);
    }
}

/// A manifest row, read whole in one pass.
#[derive(serde::Deserialize)]
struct ManifestRow<'a> {
    #[serde(borrow)]
    key: std::borrow::Cow<'a, str>,
    #[serde(default)]
    value: Option<ManifestEntry>,
    #[serde(borrow)]
    headers: HeadersHead<'a>,
}

/// The parts of a State Protocol row a view looks at first.
#[derive(serde::Deserialize)]
struct RowHead<'a> {
    #[serde(rename = "type", borrow)]
    collection: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    key: std::borrow::Cow<'a, str>,
    #[serde(borrow, default)]
    value: Option<&'a serde_json::value::RawValue>,
    #[serde(borrow)]
    headers: HeadersHead<'a>,
}

#[derive(serde::Deserialize)]
struct HeadersHead<'a> {
    #[serde(borrow)]
    operation: std::borrow::Cow<'a, str>,
}

/// Per-entity views, caught up from the stream on each use (only the new
/// tail is read), at most `capacity` of them: past it the least recently used
/// view that nobody holds is dropped (it is rebuilt from its stream if asked
/// for again). A view in use is never dropped, so its lock keeps meaning
/// "the only view of this stream".
pub struct Views {
    views: parking_lot::Mutex<hashlink::LinkedHashMap<String, Arc<tokio::sync::Mutex<MainView>>>>,
    capacity: usize,
}

impl Views {
    pub fn new(capacity: usize) -> Views {
        Views { views: Default::default(), capacity }
    }

    /// The cell of `main`'s view, made the most recently used.
    fn cell(&self, main: &str) -> Arc<tokio::sync::Mutex<MainView>> {
        let mut views = self.views.lock();
        // Looked up before inserting: the common case allocates no key.
        if let Some(cell) = views.to_back(main) {
            return cell.clone();
        }
        let cell: Arc<tokio::sync::Mutex<MainView>> = Arc::default();
        views.insert(main.to_owned(), cell.clone());
        evict_unused(&mut views, self.capacity);
        cell
    }

    pub fn len(&self) -> usize {
        self.views.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The view of `main`, caught up with everything committed so far.
    pub async fn get(&self, store: &dyn StreamStore, main: &str) -> ApiResult<tokio::sync::OwnedMutexGuard<MainView>> {
        let mut view = self.cell(main).lock_owned().await;
        loop {
            let batch = match store.read(main, ReadFrom::At(attache_core::Offset(view.applied)), 4 << 20).await {
                Ok(b) => b,
                Err(StoreError::NotFound) => {
                    *view = MainView::default();
                    return Ok(view);
                }
                // Shorter than what the view applied: not the stream it was built from.
                Err(StoreError::Invalid(_)) if view.applied > 0 => {
                    *view = MainView::default();
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            if view.stream.is_some_and(|id| id != batch.info.id) {
                // A new stream at this path (a purge and a new life, perhaps through another instance).
                *view = MainView::default();
                continue;
            }
            view.stream = Some(batch.info.id);
            for row in &batch.messages() {
                view.apply(row);
            }
            view.applied = batch.next.0;
            if batch.up_to_date() {
                return Ok(view);
            }
        }
    }

    pub fn forget(&self, main: &str) {
        self.views.lock().remove(main);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn past_the_capacity_the_least_recently_used_unheld_entry_goes() {
        let views = Views::new(3);
        let a = views.cell("/a");
        drop(views.cell("/b"));
        drop(views.cell("/c"));
        drop(views.cell("/b")); // b is now more recent than c
        drop(views.cell("/d")); // over: the oldest is a, but a is held; c goes
        let keys: Vec<String> = views.views.lock().keys().cloned().collect();
        assert_eq!(keys, ["/a", "/b", "/d"]);
        drop(a);
        drop(views.cell("/e")); // now a is the oldest and free
        let keys: Vec<String> = views.views.lock().keys().cloned().collect();
        assert_eq!(keys, ["/b", "/d", "/e"]);
        assert_eq!(views.len(), 3);
    }

    #[test]
    fn the_view_keeps_inbox_keys_not_payloads() {
        let mut view = MainView::default();
        let row = |op: &str, value: &str| {
            format!(r#"{{"type":"inbox","key":"m1","value":{value},"headers":{{"operation":"{op}"}}}}"#)
        };
        view.apply(row("insert", &format!(r#"{{"payload":"{}"}}"#, "x".repeat(10_000))).as_bytes());
        assert!(view.inbox.contains("m1"));
        view.apply(row("delete", "null").as_bytes());
        assert!(view.inbox.is_empty());
    }
}

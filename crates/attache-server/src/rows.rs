//! Writing State Protocol rows to an entity's main stream, and the
//! materialized view of that stream the server keeps per entity.
//!
//! The views are a cache (the stream is the truth): at most
//! `view_cache_entries` of them and `view_cache_bytes` of them together (an
//! estimate), the least recently used dropped first, and each keeps only
//! what the server asks of it (manifest entries, names, inbox keys; never
//! inbox payloads). One view is bounded too: its manifest by
//! `max_attachments_per_entity` (the upload routes and the task face refuse
//! a new id past it), the inline values of its task attachments by
//! `max_inline_bytes_per_entity` (the task face refuses a value past it),
//! and its inbox keys by `inbox_keys_per_entity` (only the keys of the
//! latest messages are kept, as digests).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use attache_core::manifest::{ManifestEntry, MANIFEST};
use attache_core::state::ChangeEvent;
use attache_core::ContentType;
use attache_storage::{AppendOutcome, AppendRequest, ReadFrom, StoreError, StreamStore};
use bytes::Bytes;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::error::{ApiError, ApiResult};

/// A transaction id for the rows one request writes (a random UUID, as Electric sends).
pub fn new_txid() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40; // version 4
    b[8] = (b[8] & 0x3f) | 0x80; // RFC 4122 variant
                                 // 8-4-4-4-12 hex digits, written in place (every task write mints one).
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [b'-'; 36];
    let mut at = 0;
    for (i, byte) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            at += 1;
        }
        out[at] = HEX[usize::from(byte >> 4)];
        out[at + 1] = HEX[usize::from(byte & 0xf)];
        at += 2;
    }
    out.iter().map(|&c| char::from(c)).collect()
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
    /// What the collections below hold, estimated (see [`MainView::estimated_bytes`]).
    bytes: usize,
    /// The stream the view was built from: another instance may purge the
    /// entity and a new life may create a new stream at the same path, so a
    /// view is only caught up from the stream it started on.
    stream: Option<u64>,
    applied: u64,
    pub manifest: BTreeMap<String, ManifestEntry>,
    /// The inline values of the manifest's entries together ([`inline_bytes`]).
    inline: usize,
    /// attache's key-value name → attachment id (task attachments, keyed uploads).
    pub by_name: HashMap<String, String>,
    /// The keys of the latest inbox rows (what a send checks for duplicates); payloads stay on the stream.
    pub inbox: InboxKeys,
    /// The stream's change signal, held while the view is: the store keeps
    /// the newest bytes of a stream someone follows in memory (the embedded
    /// store's tail cache, bounded by its budget), so catching the view up
    /// with the rows written since it last read is answered from there,
    /// without the index, a segment file or a blocking-thread hop.
    follow: Follow,
}

/// A view's hold on its stream's change signal (compares equal always: it is not part of what the view says).
#[derive(Default)]
struct Follow {
    signal: Option<attache_storage::ChangeSignal>,
    /// The signal was marked seen before the view's last read, that read
    /// reached the tail, the store's signal moves for every commit before its
    /// writer is answered (`StreamStore::signal_covers_commits`), and the
    /// stream cannot expire: while the signal stays where it was marked,
    /// nothing was committed that the view lacks, and a catch-up reads nothing.
    settled: bool,
}

impl Follow {
    /// Marks the signal seen (before a read); `false` when there is none to mark.
    fn mark_seen(&mut self) -> bool {
        self.settled = false;
        match &mut self.signal {
            Some(signal) => {
                signal.borrow_and_update();
                true
            }
            None => false,
        }
    }

    /// Nothing committed to the stream since the view's last read (see `settled`).
    fn unchanged(&self) -> bool {
        self.settled && self.signal.as_ref().is_some_and(|s| s.has_changed().is_ok_and(|moved| !moved))
    }
}

impl PartialEq for Follow {
    fn eq(&self, _: &Follow) -> bool {
        true
    }
}

impl std::fmt::Debug for Follow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.signal.is_some() { "Follow(held)" } else { "Follow(none)" })
    }
}

impl MainView {
    /// Where the stream ended when the view was caught up: a write decided
    /// from this view is conditioned on it (`StreamStore::append_guarded`).
    pub fn tail(&self) -> attache_core::Offset {
        attache_core::Offset(self.applied)
    }

    /// The memory this view holds, estimated: the lengths of its strings and
    /// JSON values plus a fixed cost per entry and per map slot. Kept up to
    /// date as rows are applied, so reading it costs nothing.
    pub fn estimated_bytes(&self) -> usize {
        std::mem::size_of::<MainView>() + self.bytes + self.inbox.heap_bytes()
    }

    /// The inline values (JSON `value`, text `content`, `url`) of the
    /// attachments the view holds, together: see [`inline_bytes`].
    pub fn inline_bytes(&self) -> usize {
        self.inline
    }

    /// Folds one row of the main stream into the view, keeping the keys of
    /// the latest `inbox_window` inbox rows. Rows come from clients too: any
    /// bytes are read without panicking, and a row that is not a well-formed
    /// State Protocol row changes nothing.
    pub fn apply(&mut self, row: &[u8], inbox_window: usize) {
        // Event rows, half of a task's stream, start so as the server writes them;
        // a row that merely could be one is parsed below and ignored the same way.
        if row.starts_with(br#"{"type":"event","#) {
            return;
        }
        // Manifest rows as the server writes them are read in one pass; any row
        // that does not parse so takes the general path below.
        if row.starts_with(MANIFEST_ROW) {
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
            ("inbox", "delete") => self.inbox.remove(&event.key),
            // A row without a value was never an inbox message.
            ("inbox", _) => {
                if let Some(value) = event.value {
                    // The sender as the server wrote it; a row without one counts as one unnamed sender's.
                    let from = serde_json::from_str::<InboxFrom>(value.get()).ok().and_then(|v| v.from);
                    self.inbox.insert(&event.key, from.as_deref().unwrap_or(""), inbox_window);
                }
            }
            _ => {}
        }
    }
}

/// How a manifest row starts as the server writes it.
const MANIFEST_ROW: &[u8] = br#"{"type":"manifest","#;

impl MainView {
    fn apply_manifest(&mut self, key: &str, operation: &str, entry: Option<ManifestEntry>) {
        if operation == "delete" {
            if let Some(id) = key.strip_prefix("attachment:") {
                if let Some(old) = self.manifest.remove(id) {
                    self.bytes = self.bytes.saturating_sub(entry_bytes(&old));
                    self.inline = self.inline.saturating_sub(inline_bytes(&old));
                    if let Some(name) = old.ext.get("name").and_then(Value::as_str) {
                        if self.by_name.get(name).map(String::as_str) == Some(id) {
                            self.by_name.remove(name);
                            self.bytes = self.bytes.saturating_sub(SLOT + name.len() + id.len());
                        }
                    }
                }
            }
            return;
        }
        if let Some(entry) = entry {
            self.insert_entry(entry);
        }
    }

    /// An `insert` or `update` row's entry, in place of the one of its id.
    fn insert_entry(&mut self, entry: ManifestEntry) {
        if let Some(name) = entry.ext.get("name").and_then(Value::as_str) {
            self.bytes += SLOT + name.len() + entry.id.len();
            if let Some(old) = self.by_name.insert(name.to_owned(), entry.id.clone()) {
                self.bytes = self.bytes.saturating_sub(SLOT + name.len() + old.len());
            }
        }
        self.bytes += entry_bytes(&entry);
        self.inline += inline_bytes(&entry);
        if let Some(old) = self.manifest.insert(entry.id.clone(), entry) {
            self.bytes = self.bytes.saturating_sub(entry_bytes(&old));
            self.inline = self.inline.saturating_sub(inline_bytes(&old));
        }
    }
}

/// What the view keeps of an inbox key: the first 128 bits of its SHA-256,
/// so every key costs the same whatever its length (up to 256 bytes). Two
/// keys of one entity's window share a digest with probability about
/// n²/2¹²⁹ (n keys in the window: below 10⁻²⁹ for 10⁵ of them); finding
/// such a pair on purpose takes about 2⁶⁴ hashes. A collision could only
/// refuse a new key as a duplicate, never accept a duplicate.
pub type KeyDigest = [u8; 16];

fn key_digest(key: &str) -> KeyDigest {
    let full = Sha256::digest(key.as_bytes());
    let mut digest = [0u8; 16];
    digest.copy_from_slice(&full[..16]);
    digest
}

/// Who sent an inbox message, as the first 128 bits of the SHA-256 of the
/// row's `from` (the sender's principal URL, written by the server).
type SenderDigest = [u8; 16];

/// The keys of an entity's latest inbox messages, as [`KeyDigest`]s, each
/// with its sender: at most `inbox_keys_per_entity` of them, so a view holds
/// well under a MiB however many messages its entity receives. Past the
/// window the key forgotten is the oldest of the sender holding the most
/// keys: a sender's messages push out another sender's keys only while that
/// one holds more than it, so each sender's latest `window / senders` keys
/// stay checked whatever the others send (with two senders, its latest half
/// of the window), and a sender that sends more only forgets its own. A forgotten key is no
/// longer checked: a send reusing it is written (as Electric writes every
/// send, keys never checked), its row replacing the old one at that key in
/// the materialized inbox. Before, the window was the entity's latest
/// messages whoever sent them, and a grantee with `write` that sent as many
/// messages as the window holds could then replace any earlier message of
/// another sender (`entity_view_bounds::a_sender_cannot_push_another_senders_inbox_keys_out_of_the_window`).
#[derive(Debug, Default)]
pub struct InboxKeys {
    /// Each key kept: its sender, and its place in that sender's queue.
    keys: HashMap<KeyDigest, (SenderDigest, u64)>,
    /// Per sender: its keys, oldest first, and how many are still kept (an
    /// entry whose key has since gone or been sent again is skipped when met).
    senders: HashMap<SenderDigest, SenderKeys>,
    /// Senders by how many keys they hold, so the one holding the most is found at once.
    by_count: std::collections::BTreeSet<(usize, SenderDigest)>,
    /// The next place in a queue.
    next: u64,
}

#[derive(Debug, Default)]
struct SenderKeys {
    queue: std::collections::VecDeque<(KeyDigest, u64)>,
    kept: usize,
}

impl PartialEq for InboxKeys {
    /// The same keys, from the same senders, in the same order per sender.
    fn eq(&self, other: &InboxKeys) -> bool {
        self.keys.len() == other.keys.len() && self.kept_in_order() == other.kept_in_order()
    }
}

impl InboxKeys {
    /// Is `key` the key of one of the latest messages kept?
    pub fn contains(&self, key: &str) -> bool {
        self.keys.contains_key(&key_digest(key))
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Records a message at `key` from `from`, forgetting past `window` (see [`InboxKeys`]).
    fn insert(&mut self, key: &str, from: &str, window: usize) {
        let (digest, sender) = (key_digest(key), key_digest(from));
        let place = self.next;
        self.next += 1;
        if let Some((was, _)) = self.keys.insert(digest, (sender, place)) {
            self.count(was, -1);
        }
        self.count(sender, 1);
        let keys = self.senders.entry(sender).or_default();
        keys.queue.push_back((digest, place));
        // Entries of keys sent again or deleted are dropped now and then, so a queue stays near its count.
        if keys.queue.len() > 2 * keys.kept + 16 {
            let kept = &self.keys;
            keys.queue.retain(|(d, p)| kept.get(d).is_some_and(|&(s, q)| s == sender && q == *p));
        }
        while self.keys.len() > window {
            if !self.forget_one() {
                break;
            }
        }
    }

    /// Forgets the oldest key of the sender holding the most.
    fn forget_one(&mut self) -> bool {
        let Some(&(_, sender)) = self.by_count.last() else { return false };
        let Some(keys) = self.senders.get_mut(&sender) else { return false };
        while let Some((digest, place)) = keys.queue.pop_front() {
            if self.keys.get(&digest) == Some(&(sender, place)) {
                self.keys.remove(&digest);
                self.count(sender, -1);
                return true;
            }
        }
        false
    }

    fn remove(&mut self, key: &str) {
        if let Some((sender, _)) = self.keys.remove(&key_digest(key)) {
            self.count(sender, -1);
        }
    }

    /// `sender` keeps one key more (`+1`) or one fewer (`-1`); a sender keeping none is forgotten.
    fn count(&mut self, sender: SenderDigest, by: isize) {
        let keys = self.senders.entry(sender).or_default();
        self.by_count.remove(&(keys.kept, sender));
        keys.kept = keys.kept.saturating_add_signed(by);
        if keys.kept == 0 {
            self.senders.remove(&sender);
        } else {
            self.by_count.insert((keys.kept, sender));
        }
    }

    /// Each sender's kept keys, oldest first.
    fn kept_in_order(&self) -> BTreeMap<SenderDigest, Vec<KeyDigest>> {
        self.senders
            .iter()
            .map(|(sender, keys)| {
                let kept = keys.queue.iter().filter(|(d, p)| self.keys.get(d) == Some(&(*sender, *p)));
                (*sender, kept.map(|(d, _)| *d).collect())
            })
            .collect()
    }

    /// What the maps allocate, estimated: the tables' slots (an entry and a
    /// control byte each, a table at most 7/8 full in a power of two of
    /// buckets; the key table's capacity stays at the most keys held), the
    /// queues' entries (as allocated), and per sender its place in the count
    /// order (tree nodes about half full).
    fn heap_bytes(&self) -> usize {
        const SLOT: usize = std::mem::size_of::<(KeyDigest, (SenderDigest, u64))>() + 1;
        const ENTRY: usize = std::mem::size_of::<(KeyDigest, u64)>();
        const SENDER: usize = std::mem::size_of::<(SenderDigest, SenderKeys)>() + 1;
        const ORDER: usize = 2 * std::mem::size_of::<(usize, SenderDigest)>();
        let buckets = |capacity: usize| if capacity == 0 { 0 } else { (capacity * 8 / 7).next_power_of_two() };
        buckets(self.keys.capacity()) * SLOT
            + self.senders.values().map(|k| k.queue.capacity() * ENTRY).sum::<usize>()
            + buckets(self.senders.capacity()) * SENDER
            + self.by_count.len() * ORDER
    }
}

/// The bytes of an attachment's inline values that count against
/// `max_inline_bytes_per_entity`: its JSON `value`, its text `content` and
/// its `url` (task attachments), and an upload's `meta` object, as the view
/// holds them (what [`MainView::estimated_bytes`] counts for them). Text
/// counts its length, and so does a JSON string; a JSON array or object
/// counts its members' slots too, so one of many small members counts up to
/// ~16 times its JSON text. An upload's other fields are short (bounded
/// each) and not counted.
pub fn inline_bytes(e: &ManifestEntry) -> usize {
    INLINE_FIELDS.iter().filter_map(|f| e.ext.get(*f)).map(value_bytes).sum::<usize>()
        + e.meta.as_ref().map_or(0, map_bytes)
}

/// The fields of a task attachment that hold its value inline.
const INLINE_FIELDS: [&str; 3] = ["value", "content", "url"];

/// What one slot of the name map costs beside its strings:
/// the table's slot, with room to grow, and allocation headers.
const SLOT: usize = 48;

/// The estimated memory of a manifest entry held in a view, its key in the
/// map included: what [`MainView::estimated_bytes`] counts it for. Checked
/// against the allocations a view makes (10,000 upload entries: 1,729 bytes
/// each allocated, 1,758 estimated; with a 1 KiB task value, 2,753 and
/// 2,782), tree nodes being about half full.
fn entry_bytes(e: &ManifestEntry) -> usize {
    let opt = |s: &Option<String>| s.as_ref().map_or(0, String::len);
    2 * (std::mem::size_of::<String>() + std::mem::size_of::<ManifestEntry>())
        + 2 * e.id.len()
        + e.key.len()
        + e.kind.len()
        + e.stream_path.len()
        + e.subject.as_ref().map_or(0, |s| s.kind.len() + s.key.len())
        + e.mime_type.len()
        + opt(&e.filename)
        + opt(&e.sha256)
        + e.created_at.len()
        + opt(&e.created_by)
        + opt(&e.error)
        + e.meta.as_ref().map_or(0, map_bytes)
        + map_bytes(&e.ext)
}

/// A JSON object: tree nodes of 11 slots, about half full, and what its keys and values hold.
fn map_bytes(m: &serde_json::Map<String, Value>) -> usize {
    const NODE: usize = 11 * (std::mem::size_of::<String>() + std::mem::size_of::<Value>()) + 16;
    m.len().div_ceil(6) * NODE + m.iter().map(|(k, v)| k.len() + value_bytes(v)).sum::<usize>()
}

/// What a JSON value holds beyond its own slot (its depth is bounded by the parser's recursion limit).
fn value_bytes(v: &Value) -> usize {
    match v {
        Value::String(s) => s.len(),
        Value::Array(items) => items.iter().map(|v| std::mem::size_of::<Value>() + value_bytes(v)).sum(),
        Value::Object(m) => map_bytes(m),
        Value::Null | Value::Bool(_) | Value::Number(_) => 0,
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

/// Who sent an inbox row (the rest of its value, the payload too, is skipped unread).
#[derive(serde::Deserialize)]
struct InboxFrom<'a> {
    #[serde(borrow, default)]
    from: Option<std::borrow::Cow<'a, str>>,
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
/// tail is read), at most `max_entries` of them and `max_bytes` of them
/// together ([`MainView::estimated_bytes`]): past either the least recently
/// used views that nobody holds are dropped (rebuilt from their streams if
/// asked for again), and a view larger than `max_bytes` on its own is
/// dropped as soon as nobody holds it, before any other. A view in use is
/// never dropped, so its lock keeps meaning "the only view of this stream";
/// the cache is then over its bounds until the view is given back, and the
/// last guard given back trims it ([`ViewGuard`]).
pub struct Views {
    cache: parking_lot::Mutex<Cache>,
    /// Manifest rows being appended by this instance, each with the entry it
    /// was written from ([`Views::offer`]).
    offers: parking_lot::Mutex<Offers>,
    /// Inbox keys of sends checked but not yet committed, by main stream
    /// ([`Views::reserve_inbox_key`]).
    sending: parking_lot::Mutex<std::collections::HashSet<(String, KeyDigest)>>,
    /// Set while the cache is over a bound because the views past it are held.
    over: std::sync::atomic::AtomicBool,
    max_entries: usize,
    max_bytes: usize,
    /// The inbox keys each view keeps (`inbox_keys_per_entity`).
    inbox_window: usize,
}

type Cell = Arc<tokio::sync::Mutex<MainView>>;

/// Most manifest rows offered at once ([`Views::offer`]), and most bytes of
/// them together; past either, the oldest offer goes (its row is parsed
/// when read, as any other). A row larger than [`OFFER_ROW_MAX`] is not offered.
const OFFERS_MAX: usize = 256;
const OFFERS_MAX_BYTES: usize = 1 << 20;
const OFFER_ROW_MAX: usize = 16 << 10;

/// Manifest rows this instance is appending, with the entries they were
/// written from, oldest first: a catch-up that reads one of them back takes
/// its entry instead of parsing it. Matched by the row's bytes, which name
/// the attachment, its entity and the write's transaction id, and from
/// which the entry is what a parse would give ([`ManifestEntry::reads_back_as_itself`]).
#[derive(Default)]
struct Offers {
    list: std::collections::VecDeque<Offer>,
    /// The offered rows' bytes, twice (the entry holds about as much again).
    bytes: usize,
    next: u64,
}

struct Offer {
    token: u64,
    /// The main stream the row is appended to.
    main: String,
    row: Bytes,
    entry: ManifestEntry,
}

/// Names an offer, to withdraw it when its append fails ([`Views::withdraw`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OfferToken(u64);

impl Offers {
    fn charge(row: &Bytes) -> usize {
        2 * row.len() + std::mem::size_of::<Offer>()
    }

    fn push(&mut self, main: &str, row: Bytes, entry: ManifestEntry) -> OfferToken {
        self.next += 1;
        let token = self.next;
        self.bytes += Self::charge(&row);
        self.list.push_back(Offer { token, main: main.to_owned(), row, entry });
        while self.list.len() > OFFERS_MAX || self.bytes > OFFERS_MAX_BYTES {
            let Some(old) = self.list.pop_front() else { break };
            self.bytes -= Self::charge(&old.row);
        }
        OfferToken(token)
    }

    /// The entry offered with exactly these bytes, taken.
    fn take(&mut self, row: &[u8]) -> Option<ManifestEntry> {
        let at = self.list.iter().position(|o| o.row.len() == row.len() && o.row[..] == *row)?;
        let offer = self.list.remove(at)?;
        self.bytes -= Self::charge(&offer.row);
        Some(offer.entry)
    }

    fn withdraw(&mut self, token: OfferToken) {
        self.retain(|o| o.token != token.0);
    }

    fn retain(&mut self, keep: impl Fn(&Offer) -> bool) {
        let mut freed = 0;
        self.list.retain(|o| {
            keep(o) || {
                freed += Self::charge(&o.row);
                false
            }
        });
        self.bytes -= freed;
    }
}

#[derive(Default)]
struct Cache {
    /// Least recently used first; each view with what it was last charged.
    views: hashlink::LinkedHashMap<String, (Cell, usize)>,
    /// The charges together.
    bytes: usize,
    /// The views charged more than the byte bound on their own (rare: a few at most).
    oversized: Vec<String>,
}

impl Cache {
    /// `main`'s view was charged `was` and now holds `now`.
    fn charge(&mut self, main: &str, was: usize, now: usize, max_bytes: usize) {
        self.bytes = self.bytes.saturating_sub(was) + now;
        match (was > max_bytes, now > max_bytes) {
            (false, true) => self.oversized.push(main.to_owned()),
            (true, false) => self.oversized.retain(|k| k != main),
            _ => {}
        }
    }

    fn remove(&mut self, main: &str, max_bytes: usize) {
        if let Some((_, charge)) = self.views.remove(main) {
            self.charge(main, charge, 0, max_bytes);
        }
    }

    /// Drops views nobody holds until the cache is within both bounds: first
    /// any view over the byte bound on its own (it never fits), then the least
    /// recently used. Says whether it is within them (else what is over is held).
    fn trim(&mut self, max_entries: usize, max_bytes: usize) -> bool {
        let unused = |cell: &Cell| Arc::strong_count(cell) == 1;
        let never_fit: Vec<String> = self
            .oversized
            .iter()
            .filter(|k| self.views.get(k.as_str()).is_some_and(|(cell, _)| unused(cell)))
            .cloned()
            .collect();
        for main in never_fit {
            self.remove(&main, max_bytes);
        }
        // Views over the byte bound still held go once given back: the rest
        // is held to the bound without them, not emptied for them.
        let held_oversized: usize =
            self.oversized.iter().filter_map(|k| self.views.get(k.as_str())).map(|(_, charge)| *charge).sum();
        while self.views.len() > max_entries || self.bytes.saturating_sub(held_oversized) > max_bytes {
            let Some(victim) = self.views.iter().find(|(_, (cell, _))| unused(cell)).map(|(k, _)| k.clone()) else {
                return false;
            };
            self.remove(&victim, max_bytes);
        }
        // Held views over the byte bound go once they are given back.
        self.oversized.is_empty()
    }
}

/// A send's hold on its inbox key until its row is committed ([`Views::reserve_inbox_key`]).
pub struct InboxKeyReservation<'v> {
    views: &'v Views,
    held: (String, KeyDigest),
}

impl Drop for InboxKeyReservation<'_> {
    fn drop(&mut self) {
        self.views.sending.lock().remove(&self.held);
    }
}

/// A view, locked for its caller and caught up ([`Views::get`]). Given back
/// on drop; when the cache is over its bounds, the last one given back trims it.
pub struct ViewGuard<'v> {
    guard: Option<tokio::sync::OwnedMutexGuard<MainView>>,
    views: &'v Views,
}

impl std::ops::Deref for ViewGuard<'_> {
    type Target = MainView;
    fn deref(&self) -> &MainView {
        // Present until drop.
        self.guard.as_deref().unwrap_or_else(|| unreachable!("a ViewGuard holds its view until dropped"))
    }
}

impl Drop for ViewGuard<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        if self.views.over.load(std::sync::atomic::Ordering::Relaxed) {
            self.views.trim(&mut self.views.cache.lock());
        }
    }
}

impl Views {
    pub fn new(max_entries: usize, max_bytes: usize, inbox_window: usize) -> Views {
        Views {
            cache: Default::default(),
            offers: Default::default(),
            sending: Default::default(),
            over: Default::default(),
            max_entries,
            max_bytes,
            inbox_window,
        }
    }

    /// Reserves inbox key `key` of `main` for a send that found it free in
    /// the view and now writes it: call it while holding that view. `None`
    /// when another send holds it, whose row is not committed yet, so the
    /// view does not show it: this send is a duplicate of that one. The
    /// reservation goes when dropped, once the send's row is committed (or
    /// refused). Before, two sends of one key at once both found it free
    /// and both were written.
    pub fn reserve_inbox_key(&self, main: &str, key: &str) -> Option<InboxKeyReservation<'_>> {
        let held = (main.to_owned(), key_digest(key));
        if !self.sending.lock().insert(held.clone()) {
            return None;
        }
        Some(InboxKeyReservation { views: self, held })
    }

    fn trim(&self, cache: &mut Cache) {
        let within = cache.trim(self.max_entries, self.max_bytes);
        self.over.store(!within, std::sync::atomic::Ordering::Relaxed);
    }

    /// The cell of `main`'s view, made the most recently used.
    fn cell(&self, main: &str) -> Cell {
        let mut cache = self.cache.lock();
        // Looked up before inserting: the common case allocates no key.
        if let Some((cell, _)) = cache.views.to_back(main) {
            return cell.clone();
        }
        let cell: Cell = Arc::default();
        let charge = MainView::default().estimated_bytes();
        cache.views.insert(main.to_owned(), (cell.clone(), charge));
        cache.charge(main, 0, charge, self.max_bytes);
        self.trim(&mut cache);
        cell
    }

    /// Records what `main`'s view (`cell`, still the one cached) holds now.
    fn recharge(&self, main: &str, cell: &Cell, now: usize) {
        let mut cache = self.cache.lock();
        let Some((cached, charge)) = cache.views.get_mut(main) else { return };
        if !Arc::ptr_eq(cached, cell) || *charge == now {
            return;
        }
        let was = std::mem::replace(charge, now);
        cache.charge(main, was, now, self.max_bytes);
        self.trim(&mut cache);
    }

    /// Offers `entry`, about to be appended (`insert` or `update`) as the
    /// manifest row `row` (its bytes as the stream will hold them) by a
    /// caller that has not placed the append yet: the catch-up that reads
    /// the row back applies the entry as it is instead of parsing the row.
    /// `None` when it is not offered: an entry a parse of its row would not
    /// give back exactly ([`ManifestEntry::reads_back_as_itself`]), or a row
    /// over [`OFFER_ROW_MAX`] bytes. An offer whose append fails is withdrawn
    /// ([`Views::withdraw`]); one never read back goes with the oldest, past
    /// [`OFFERS_MAX`] offers or [`OFFERS_MAX_BYTES`].
    pub fn offer(&self, main: &str, row: Bytes, entry: ManifestEntry) -> Option<OfferToken> {
        if row.len() > OFFER_ROW_MAX || !row.starts_with(MANIFEST_ROW) || !entry.reads_back_as_itself() {
            return None;
        }
        Some(self.offers.lock().push(main, row, entry))
    }

    /// Withdraws an offer whose row was not appended.
    pub fn withdraw(&self, token: OfferToken) {
        self.offers.lock().withdraw(token);
    }

    /// Rows offered and not yet read back (tests and diagnostics).
    #[doc(hidden)]
    pub fn offers_len(&self) -> usize {
        self.offers.lock().list.len()
    }

    pub fn len(&self) -> usize {
        self.cache.lock().views.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The estimated bytes of the views cached now.
    pub fn bytes(&self) -> usize {
        self.cache.lock().bytes
    }

    /// The view of `main`, caught up with everything committed so far.
    pub async fn get(&self, store: &dyn StreamStore, main: &str) -> ApiResult<ViewGuard<'_>> {
        let cell = self.cell(main);
        let mut view = cell.clone().lock_owned().await;
        let before = view.estimated_bytes();
        let caught_up = self.catch_up(store, main, &mut view).await;
        let now = view.estimated_bytes();
        if now != before {
            self.recharge(main, &cell, now);
        }
        drop(cell);
        caught_up.map(|()| ViewGuard { guard: Some(view), views: self })
    }

    async fn catch_up(&self, store: &dyn StreamStore, main: &str, view: &mut MainView) -> ApiResult<()> {
        let inbox_window = self.inbox_window;
        // Most calls of a task write ask for the view several times; only the first reads.
        if view.follow.unchanged() {
            return Ok(());
        }
        loop {
            // Marked before the read: whatever commits after it moves the signal again.
            let marked = view.follow.mark_seen();
            let batch = match store.read(main, ReadFrom::At(attache_core::Offset(view.applied)), 4 << 20).await {
                Ok(b) => b,
                Err(StoreError::NotFound) => {
                    *view = MainView::default();
                    return Ok(());
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
            if view.stream.is_none() {
                // Followed from its first read on, so the bytes written next are kept for it
                // (subscribed after this read: it settles at the next one).
                view.follow = Follow { signal: store.subscribe(main).await.ok(), settled: false };
            }
            view.stream = Some(batch.info.id);
            crate::access::cpu_heavy(batch.byte_len() >= crate::access::CPU_HEAVY_BYTES, || {
                for row in &batch.messages() {
                    // A row this instance offered as it appended it is applied as the entry it was written from.
                    let offered = match row.starts_with(MANIFEST_ROW) {
                        true => self.offers.lock().take(row),
                        false => None,
                    };
                    match offered {
                        Some(entry) => view.insert_entry(entry),
                        None => view.apply(row, inbox_window),
                    }
                }
            });
            view.applied = batch.next.0;
            if batch.up_to_date() {
                let info = &batch.info;
                view.follow.settled =
                    marked && store.signal_covers_commits() && info.ttl_secs.is_none() && info.expires_at_ms.is_none();
                return Ok(());
            }
        }
    }

    /// Drops `main`'s view, and the rows offered for it (its entity is gone).
    pub fn forget(&self, main: &str) {
        self.cache.lock().remove(main, self.max_bytes);
        self.offers.lock().retain(|o| o.main != main);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task_entry(id: &str, name: &str, value: Value) -> ManifestEntry {
        let mut ext = serde_json::Map::new();
        ext.insert("name".into(), Value::from(name));
        ext.insert("taskType".into(), Value::from("json"));
        ext.insert("value".into(), value);
        ManifestEntry {
            key: ManifestEntry::row_key(id),
            kind: "attachment".into(),
            id: id.into(),
            stream_path: format!("/task/t-1/attachments/{id}"),
            status: attache_core::manifest::AttachmentStatus::Complete,
            subject: None,
            role: attache_core::manifest::Role::Output,
            mime_type: "application/json".into(),
            filename: None,
            byte_length: None,
            sha256: None,
            created_at: "2026-01-01T00:00:00.000Z".into(),
            created_by: Some("/principal/user%3Asam".into()),
            error: None,
            meta: None,
            ext,
        }
    }

    /// The row the task face writes for `entry`.
    fn upsert_row(entry: &ManifestEntry, operation: &'static str) -> Bytes {
        let txid = new_txid();
        let row = attache_core::state::RowRef {
            collection: MANIFEST,
            key: &entry.key,
            value: Some(entry),
            headers: attache_core::state::HeadersRef::new(operation, "2026-01-01T00:00:00.000Z", &txid),
        };
        Bytes::from(serde_json::to_vec(&row).unwrap())
    }

    #[test]
    fn an_offered_entry_applied_in_place_of_its_row_leaves_the_view_a_parse_would() {
        let views = Views::new(10, usize::MAX, 10);
        let (mut parsed, mut offered) = (MainView::default(), MainView::default());
        for (n, operation) in [(1, "insert"), (2, "update"), (3, "insert")] {
            let entry = task_entry(&format!("a{}", n % 2), &format!("k{}", n % 2), serde_json::json!({"n": n}));
            let row = upsert_row(&entry, operation);
            assert!(views.offer("/task/t-1/main", row.clone(), entry).is_some());
            parsed.apply(&row, 10);
            offered.insert_entry(views.offers.lock().take(&row).expect("the row's bytes find its offer"));
        }
        assert_eq!(offered, parsed);
        assert_eq!(offered.estimated_bytes(), parsed.estimated_bytes());
        assert_eq!(offered.inline_bytes(), parsed.inline_bytes());
        assert_eq!(views.offers_len(), 0, "each offer is taken once");
    }

    #[test]
    fn offers_are_withdrawn_refused_when_inexact_and_bounded() {
        let views = Views::new(10, usize::MAX, 10);
        let entry = task_entry("a", "k", serde_json::json!(1));
        let row = upsert_row(&entry, "insert");
        let token = views.offer("/task/t-1/main", row.clone(), entry.clone()).unwrap();
        // Bytes that differ by one find nothing.
        let mut other = row.to_vec();
        *other.last_mut().unwrap() = b' ';
        assert!(views.offers.lock().take(&other).is_none());
        views.withdraw(token);
        assert!(views.offers.lock().take(&row).is_none());
        // A float could read back one step away: parsed, not offered.
        let float = task_entry("b", "k", serde_json::json!(0.1));
        assert!(views.offer("/task/t-1/main", upsert_row(&float, "insert"), float).is_none());
        // Past the bound the oldest offers go.
        for n in 0..OFFERS_MAX + 10 {
            let e = task_entry(&format!("a{n}"), "k", serde_json::json!(n));
            views.offer(&format!("/task/t-{}/main", n % 2), upsert_row(&e, "insert"), e).unwrap();
        }
        assert_eq!(views.offers_len(), OFFERS_MAX);
        assert!(views.offers.lock().bytes <= OFFERS_MAX_BYTES);
        // A forgotten stream's offers go with its view.
        views.forget("/task/t-0/main");
        assert_eq!(views.offers_len(), OFFERS_MAX / 2);
        views.forget("/task/t-1/main");
        assert_eq!((views.offers_len(), views.offers.lock().bytes), (0, 0));
    }

    #[test]
    fn a_txid_is_a_version_4_uuid_in_its_usual_form() {
        let id = new_txid();
        let groups: Vec<&str> = id.split('-').collect();
        assert_eq!(groups.iter().map(|g| g.len()).collect::<Vec<_>>(), [8, 4, 4, 4, 12], "{id}");
        assert!(id.chars().all(|c| c == '-' || c.is_ascii_hexdigit() && !c.is_ascii_uppercase()), "{id}");
        assert!(groups[2].starts_with('4') && matches!(&groups[3][..1], "8" | "9" | "a" | "b"), "{id}");
        assert_ne!(new_txid(), id);
    }

    #[test]
    fn past_the_capacity_the_least_recently_used_unheld_entry_goes() {
        let views = Views::new(3, usize::MAX, 10);
        let a = views.cell("/a");
        drop(views.cell("/b"));
        drop(views.cell("/c"));
        drop(views.cell("/b")); // b is now more recent than c
        drop(views.cell("/d")); // over: the oldest is a, but a is held; c goes
        let keys = views.keys();
        assert_eq!(keys, ["/a", "/b", "/d"]);
        drop(a);
        drop(views.cell("/e")); // now a is the oldest and free
        let keys = views.keys();
        assert_eq!(keys, ["/b", "/d", "/e"]);
        assert_eq!(views.len(), 3);
    }

    impl Views {
        fn keys(&self) -> Vec<String> {
            self.cache.lock().views.keys().cloned().collect()
        }
    }

    fn manifest_row(id: &str, name: &str, content_bytes: usize) -> String {
        format!(
            r#"{{"type":"manifest","key":"attachment:{id}","value":{{"key":"attachment:{id}","kind":"attachment","id":"{id}","streamPath":"/t/x/attachments/{id}","status":"complete","role":"output","mimeType":"text/plain","createdAt":"2025-01-01T00:00:00Z","name":"{name}","content":"{}"}},"headers":{{"operation":"upsert"}}}}"#,
            "c".repeat(content_bytes)
        )
    }

    #[test]
    fn a_view_estimate_follows_its_rows_and_returns_to_empty_when_they_go() {
        let mut view = MainView::default();
        let empty = view.estimated_bytes();
        view.apply(manifest_row("a", "k", 10).as_bytes(), 10);
        let one = view.estimated_bytes();
        assert!(one > empty + 10, "{one} {empty}");
        assert_eq!(view.inline_bytes(), 10);
        // A bigger value is counted as such; replacing the row replaces its charge.
        view.apply(manifest_row("a", "k", 100_000).as_bytes(), 10);
        assert!(view.estimated_bytes() >= one + 99_990);
        assert_eq!(view.inline_bytes(), 100_000);
        view.apply(manifest_row("b", "l", 5).as_bytes(), 10);
        assert_eq!(view.inline_bytes(), 100_005);
        view.apply(manifest_row("a", "k", 10).as_bytes(), 10);
        assert_eq!(view.inline_bytes(), 15);
        view.apply(r#"{"type":"manifest","key":"attachment:b","headers":{"operation":"delete"}}"#.as_bytes(), 10);
        assert_eq!(view.estimated_bytes(), one);
        view.apply(r#"{"type":"manifest","key":"attachment:a","headers":{"operation":"delete"}}"#.as_bytes(), 10);
        assert_eq!(view.estimated_bytes(), empty);
        assert_eq!(view.inline_bytes(), 0);
        assert!(view.by_name.is_empty() && view.manifest.is_empty());
    }

    fn inbox_row(key: &str) -> String {
        format!(r#"{{"type":"inbox","key":"{key}","value":{{}},"headers":{{"operation":"insert"}}}}"#)
    }

    #[test]
    fn the_view_keeps_the_keys_of_the_latest_messages_only_whatever_their_length() {
        let mut view = MainView::default();
        for n in 0..1000 {
            view.apply(inbox_row(&format!("{n:0>200}")).as_bytes(), 100);
        }
        assert_eq!(view.inbox.len(), 100);
        assert!(view.inbox.contains(&format!("{:0>200}", 999)) && view.inbox.contains(&format!("{:0>200}", 900)));
        assert!(!view.inbox.contains(&format!("{:0>200}", 899)));
        // 100 keys of 200 bytes, held in a few KiB: a digest, its sender and a
        // place in a slot or two of the key table, and a queue entry, each.
        let held = view.estimated_bytes() - MainView::default().estimated_bytes();
        assert!(held < 100 * 160, "{held}");
        // A key sent again moves to the back of the window; a deleted key is free again.
        view.apply(inbox_row(&format!("{:0>200}", 900)).as_bytes(), 100);
        view.apply(inbox_row("new").as_bytes(), 100);
        assert!(view.inbox.contains(&format!("{:0>200}", 900)) && !view.inbox.contains(&format!("{:0>200}", 901)));
        view.apply(r#"{"type":"inbox","key":"new","headers":{"operation":"delete"}}"#.as_bytes(), 100);
        assert!(!view.inbox.contains("new"));
        assert_eq!(view.inbox.len(), 99);
    }

    #[test]
    fn past_the_byte_bound_the_least_recently_used_unheld_views_go() {
        let empty = MainView::default().estimated_bytes();
        let views = Views::new(100, 8 * empty, 10);
        // Three views growing to 3 empty views' worth each: 3, 6, then 9 of 8.
        let a = views.cell("/a");
        views.recharge("/a", &a, 3 * empty);
        let b = views.cell("/b");
        views.recharge("/b", &b, 3 * empty);
        drop(b);
        let c = views.cell("/c");
        views.recharge("/c", &c, 3 * empty);
        // a is the oldest but held, so b goes.
        assert_eq!(views.keys(), ["/a", "/c"]);
        assert_eq!(views.bytes(), 6 * empty);
        views.forget("/c");
        assert_eq!(views.bytes(), 3 * empty);
        drop((a, c));
    }

    #[test]
    fn a_view_larger_than_the_byte_bound_goes_as_soon_as_it_is_given_back_and_alone() {
        let empty = MainView::default().estimated_bytes();
        let views = Views::new(100, 10 * empty, 10);
        drop(views.cell("/small"));
        let big = views.cell("/big");
        views.recharge("/big", &big, 11 * empty);
        // Held: kept, and the small view, which fits beside the bound, stays too.
        assert_eq!(views.keys(), ["/small", "/big"]);
        assert!(views.over.load(std::sync::atomic::Ordering::Relaxed));
        drop(big);
        // The next guard given back (here: the next trim) drops it, and only it.
        let mut cache = views.cache.lock();
        views.trim(&mut cache);
        drop(cache);
        assert_eq!(views.keys(), ["/small"]);
        assert_eq!(views.bytes(), empty);
        assert!(!views.over.load(std::sync::atomic::Ordering::Relaxed));
    }

    #[test]
    fn the_view_keeps_inbox_keys_not_payloads() {
        let mut view = MainView::default();
        let row = |op: &str, value: &str| {
            format!(r#"{{"type":"inbox","key":"m1","value":{value},"headers":{{"operation":"{op}"}}}}"#)
        };
        view.apply(row("insert", &format!(r#"{{"payload":"{}"}}"#, "x".repeat(10_000))).as_bytes(), 10);
        assert!(view.inbox.contains("m1"));
        assert!(view.estimated_bytes() < MainView::default().estimated_bytes() + 1024);
        view.apply(row("delete", "null").as_bytes(), 10);
        assert!(view.inbox.is_empty());
    }
}

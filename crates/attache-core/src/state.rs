//! State Protocol change events (STATE-PROTOCOL.md of `@durable-streams/state`):
//! the rows entity main streams are made of.

use serde::{Deserialize, Serialize, Serializer};
use serde_json::Value;

/// A row borrowed from its parts and serialized straight to bytes (no
/// `Value` is built): the one place the shape of a State Protocol row is
/// written. [`ChangeEvent`], the owned row, serializes through it; writers
/// on a hot path (the task face) serialize it directly.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct RowRef<'a, V: Serialize + ?Sized = Value> {
    #[serde(rename = "type")]
    pub collection: &'a str,
    pub key: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<&'a V>,
    pub headers: HeadersRef<'a>,
}

/// The `headers` of a [`RowRef`].
#[derive(Debug, Clone, Copy, Serialize)]
pub struct HeadersRef<'a> {
    pub operation: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub txid: Option<&'a str>,
}

impl<'a> HeadersRef<'a> {
    /// Headers of a written row: its operation, when, and in which transaction.
    pub fn new(operation: &'a str, timestamp: &'a str, txid: &'a str) -> HeadersRef<'a> {
        HeadersRef { operation, timestamp: Some(timestamp), txid: Some(txid) }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ChangeHeaders {
    pub operation: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub txid: Option<String>,
}

/// `{type, key, value?, headers: {operation, timestamp, txid}}`
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ChangeEvent {
    #[serde(rename = "type")]
    pub collection: String,
    pub key: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<Value>,
    pub headers: ChangeHeaders,
}

impl ChangeHeaders {
    fn as_ref(&self) -> HeadersRef<'_> {
        HeadersRef { operation: &self.operation, timestamp: self.timestamp.as_deref(), txid: self.txid.as_deref() }
    }
}

impl Serialize for ChangeHeaders {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.as_ref().serialize(s)
    }
}

impl Serialize for ChangeEvent {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.as_row().serialize(s)
    }
}

impl ChangeEvent {
    /// The row, borrowed (what it serializes as).
    pub fn as_row(&self) -> RowRef<'_> {
        RowRef {
            collection: &self.collection,
            key: &self.key,
            value: self.value.as_ref(),
            headers: self.headers.as_ref(),
        }
    }

    fn new(
        operation: &str,
        collection: &str,
        key: &str,
        value: Option<Value>,
        txid: &str,
        timestamp: &str,
    ) -> ChangeEvent {
        ChangeEvent {
            collection: collection.to_owned(),
            key: key.to_owned(),
            value,
            headers: ChangeHeaders {
                operation: operation.to_owned(),
                timestamp: Some(timestamp.to_owned()),
                txid: Some(txid.to_owned()),
            },
        }
    }
    pub fn insert(collection: &str, key: &str, value: Value, txid: &str, timestamp: &str) -> ChangeEvent {
        ChangeEvent::new("insert", collection, key, Some(value), txid, timestamp)
    }
    /// A full replacement of the row (State Protocol `update` replaces, it does not merge).
    pub fn update(collection: &str, key: &str, value: Value, txid: &str, timestamp: &str) -> ChangeEvent {
        ChangeEvent::new("update", collection, key, Some(value), txid, timestamp)
    }
    pub fn delete(collection: &str, key: &str, txid: &str, timestamp: &str) -> ChangeEvent {
        ChangeEvent::new("delete", collection, key, None, txid, timestamp)
    }
}

/// The collections (row `type`s) of an entity's main stream that only the
/// server writes, through the routes that validate them: the manifest of
/// attachments, the inbox, the entity's lifecycle rows, the task face's
/// events, the signals sent to it, its tags (`POST`/`DELETE .../tags/:key`), and the name kept for grant rows.
/// A client request never writes these, whoever it claims to be.
pub const SERVER_OWNED_COLLECTIONS: &[&str] =
    &[crate::manifest::MANIFEST, INBOX, ENTITY_CREATED, ENTITY_STOPPED, EVENT, SIGNAL, TAGS, "grant"];

pub const INBOX: &str = "inbox";
pub const ENTITY_CREATED: &str = "entity_created";
pub const ENTITY_STOPPED: &str = "entity_stopped";
/// Signals sent to the entity (`POST .../signal`), one row each.
pub const SIGNAL: &str = "signal";
/// The entity's tags, one row per tag (key: the tag's key; value `{key, value}`), as Electric writes them.
pub const TAGS: &str = "tags";
/// The task face's events, one row per event on the task's main stream.
pub const EVENT: &str = "event";

pub fn is_server_owned(collection: &str) -> bool {
    SERVER_OWNED_COLLECTIONS.contains(&collection)
}

/// Why a message a client appends to a main stream is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RowRefusal {
    /// Not a JSON object with a string `type` (or `type` given twice).
    #[error(
        "a main stream holds State Protocol rows: each message must be a JSON object with a string \"type\" ({0})"
    )]
    NotARow(String),
    /// A row of a collection only the server writes.
    #[error("rows of type {0:?} are written by the server only; use the entity routes")]
    ServerOwned(String),
}

/// The part of a row the check reads: `type` alone (other fields are skipped
/// without being kept; a duplicate `type` is an error, so no reader can see
/// another one).
#[derive(Deserialize)]
struct RowType<'a> {
    #[serde(rename = "type", borrow)]
    collection: std::borrow::Cow<'a, str>,
}

/// May a client append `message` (one JSON message, already split from its
/// body) to an entity's main stream? One pass over its bytes.
pub fn check_client_row(message: &[u8]) -> Result<(), RowRefusal> {
    let row: RowType = serde_json::from_slice(message).map_err(|e| RowRefusal::NotARow(e.to_string()))?;
    if is_server_owned(&row.collection) {
        return Err(RowRefusal::ServerOwned(row.collection.into_owned()));
    }
    Ok(())
}

/// An RFC 3339 timestamp with milliseconds, UTC.
pub fn timestamp(unix_ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(unix_ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_serializes_the_same_owned_or_borrowed_with_its_fields_in_protocol_order() {
        let owned = ChangeEvent::insert("manifest", "k", serde_json::json!({"a": 1}), "tx", "2026-01-01T00:00:00.000Z");
        let text = serde_json::to_string(&owned).unwrap();
        assert_eq!(
            text,
            r#"{"type":"manifest","key":"k","value":{"a":1},"headers":{"operation":"insert","timestamp":"2026-01-01T00:00:00.000Z","txid":"tx"}}"#
        );
        let value = serde_json::json!({"a": 1});
        let borrowed = RowRef {
            collection: "manifest",
            key: "k",
            value: Some(&value),
            headers: HeadersRef::new("insert", "2026-01-01T00:00:00.000Z", "tx"),
        };
        assert_eq!(serde_json::to_string(&borrowed).unwrap(), text);
        let deleted = ChangeEvent::delete("manifest", "k", "tx", "t");
        assert_eq!(
            serde_json::to_string(&deleted).unwrap(),
            r#"{"type":"manifest","key":"k","headers":{"operation":"delete","timestamp":"t","txid":"tx"}}"#
        );
        assert_eq!(serde_json::from_str::<ChangeEvent>(&text).unwrap(), owned);
    }

    #[test]
    fn clients_append_their_own_rows_only() {
        assert_eq!(
            check_client_row(br#"{"type":"errors","key":"e1","value":{},"headers":{"operation":"insert"}}"#),
            Ok(())
        );
        assert_eq!(check_client_row(br#"{"key":"n","type":"note"}"#), Ok(()));
        for owned in SERVER_OWNED_COLLECTIONS {
            let row = format!(r#"{{"type":"{owned}","key":"k","value":{{}},"headers":{{"operation":"insert"}}}}"#);
            assert_eq!(check_client_row(row.as_bytes()), Err(RowRefusal::ServerOwned((*owned).to_owned())));
        }
        // Escapes name the same collection.
        assert_eq!(
            check_client_row(br#"{"type":"\u006danifest","key":"k"}"#),
            Err(RowRefusal::ServerOwned("manifest".into()))
        );
        for bad in [&b"[1]"[..], b"\"manifest\"", b"3", b"{}", br#"{"type":1}"#, br#"{"type":"a","type":"manifest"}"#] {
            assert!(matches!(check_client_row(bad), Err(RowRefusal::NotARow(_))), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn the_server_owns_what_it_writes() {
        for c in ["manifest", "inbox", "entity_created", "entity_stopped", "event", "tags", "signal", "grant"] {
            assert!(is_server_owned(c), "{c}");
        }
        for c in ["errors", "run", "text", "tool_call", "context", "note"] {
            assert!(!is_server_owned(c), "{c}");
        }
    }
}

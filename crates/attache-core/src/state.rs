//! State Protocol change events (STATE-PROTOCOL.md of `@durable-streams/state`):
//! the rows entity main streams are made of.

use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChangeHeaders {
    pub operation: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub txid: Option<String>,
}

/// `{type, key, value?, headers: {operation, timestamp, txid}}`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChangeEvent {
    #[serde(rename = "type")]
    pub collection: String,
    pub key: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<Value>,
    pub headers: ChangeHeaders,
}

impl ChangeEvent {
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

/// An RFC 3339 timestamp with milliseconds, UTC.
pub fn timestamp(unix_ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(unix_ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

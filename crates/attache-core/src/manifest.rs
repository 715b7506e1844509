//! Manifest rows: the record of each attachment on its entity's main stream
//! (`type: "manifest"`, key `attachment:{id}`), in the wire format of
//! Electric Agents' `ManifestAttachmentEntry`, plus attache's extensions.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::entity::EntityUrl;
use crate::error::{Error, Result};

pub const MANIFEST: &str = "manifest";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachmentStatus {
    Pending,
    Complete,
    Failed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Input,
    Output,
}

impl Role {
    pub fn parse(s: &str) -> Result<Role> {
        match s {
            "input" => Ok(Role::Input),
            "output" => Ok(Role::Output),
            other => {
                Err(Error::Invalid(format!("invalid attachment role {other:?}: expected one of {}", ROLES.join(", "))))
            }
        }
    }
}

/// The roles an attachment may have, as Electric names them.
pub const ROLES: &[&str] = &["input", "output"];

/// The subject types an attachment may have, as Electric names them.
pub const SUBJECT_TYPES: &[&str] = &["inbox", "run", "text", "tool_call", "context"];

/// Electric's answer to an upload that names no subject (its wording).
pub const SUBJECT_REQUIRED: &str = "attachment subject is required";

/// What an attachment is about: `{type, key}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subject {
    #[serde(rename = "type")]
    pub kind: String,
    pub key: String,
}

impl Subject {
    pub fn new(kind: &str, key: &str) -> Result<Subject> {
        if !SUBJECT_TYPES.contains(&kind) {
            return Err(Error::Invalid(format!(
                "invalid attachment subject type {kind:?}: expected one of {}",
                SUBJECT_TYPES.join(", ")
            )));
        }
        if key.is_empty() || key.len() > 256 || key.chars().any(|c| c.is_control()) {
            return Err(Error::Invalid("attachment subject key must be 1 to 256 printable characters".into()));
        }
        Ok(Subject { kind: kind.to_owned(), key: key.to_owned() })
    }

    /// Parses the `subject` form field: a JSON object `{"type","key"}`.
    pub fn parse_json(raw: &str) -> Result<Subject> {
        let value: Value =
            serde_json::from_str(raw).map_err(|_| Error::Invalid("Invalid JSON field: subject".into()))?;
        let obj = value.as_object().ok_or_else(|| Error::Invalid("attachment subject must be an object".into()))?;
        match (obj.get("type").and_then(Value::as_str), obj.get("key").and_then(Value::as_str)) {
            (Some(t), Some(k)) => Subject::new(t, k),
            _ => Err(Error::Invalid("attachment subject requires type and key".into())),
        }
    }
}

/// Validates a client-chosen attachment id.
pub fn validate_attachment_id(id: &str) -> Result<()> {
    if id.is_empty()
        || id.len() > 128
        || id.starts_with('.')
        || id.contains('/')
        || id.contains('\\')
        || id.chars().any(|c| c.is_control())
        || id.contains('%')
    {
        return Err(Error::Invalid(
            "attachment id must be 1 to 128 bytes, must not start with '.', and must not contain '/', '\\', '%' or control characters".into(),
        ));
    }
    Ok(())
}

/// Validates the id of a new attachment (an upload's `id`, a resumable
/// upload's URL): [`validate_attachment_id`]'s rules, and spelled with
/// [`crate::entity::NAME_CHARS`] only, as a new entity's name is. Its bytes
/// live at `/{type}/{instance}/attachments/{id}`, which every client must
/// address by one path (a resumable upload's appends go there): an id with a
/// space left an upload no client could append to. Attachments stored under
/// other ids by older releases are still read and deleted
/// ([`validate_attachment_id`]).
pub fn validate_new_attachment_id(id: &str) -> Result<()> {
    validate_attachment_id(id)?;
    crate::entity::check_name_chars("attachment id", id).map_err(Error::Invalid)
}

/// One attachment's manifest entry. Deserialized by hand (below): serde's
/// `flatten` buffers every field before reading it, which made parsing these
/// rows a tenth of the task face's CPU.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ManifestEntry {
    pub key: String,
    pub kind: String,
    pub id: String,
    pub stream_path: String,
    pub status: AttachmentStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<Subject>,
    pub role: Role,
    pub mime_type: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filename: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub byte_length: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    pub created_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub meta: Option<Map<String, Value>>,
    /// attache extensions (the task face's key-value fields), kept as given.
    #[serde(flatten)]
    pub ext: Map<String, Value>,
}

impl ManifestEntry {
    pub fn row_key(id: &str) -> String {
        ["attachment:", id].concat()
    }

    /// The stream holding this entry's bytes, derived from what the server
    /// owns: the entity whose main stream holds the row, and the attachment
    /// id. A manifest row is data (a client may have written it): its
    /// `streamPath` is compared with the derived address, never followed.
    /// `None` when the row names any other stream, or its id is not a valid
    /// attachment id: such a row points at no bytes.
    pub fn bytes_path(&self, entity: &EntityUrl) -> Option<String> {
        self.names_its_own_stream(entity).then(|| self.stream_path.clone())
    }

    /// Is `streamPath` one of the addresses derived for this entry
    /// (`{entity}/attachments/{id}`, or a version of it)? No allocation: the
    /// task face asks this of every entry it lists.
    pub fn names_its_own_stream(&self, entity: &EntityUrl) -> bool {
        if validate_attachment_id(&self.id).is_err() {
            return false;
        }
        let rest = self
            .stream_path
            .strip_prefix('/')
            .and_then(|r| r.strip_prefix(entity.entity_type()))
            .and_then(|r| r.strip_prefix('/'))
            .and_then(|r| r.strip_prefix(entity.instance_id()))
            .and_then(|r| r.strip_prefix("/attachments/"))
            .and_then(|r| r.strip_prefix(self.id.as_str()));
        matches!(rest, Some(suffix) if suffix.is_empty() || is_version_suffix(suffix))
    }
}

/// Length of the version the task face appends to an attachment's stream
/// when it replaces the bytes (`{id}-{version}`: a new stream per version).
pub const BYTES_VERSION_LEN: usize = 6;

/// `-` and [`BYTES_VERSION_LEN`] lowercase base-36 digits.
fn is_version_suffix(s: &str) -> bool {
    s.len() == BYTES_VERSION_LEN + 1
        && s.starts_with('-')
        && s.bytes().skip(1).all(|b| b.is_ascii_digit() || b.is_ascii_lowercase())
}

/// The stream of version `version` of attachment `id`'s bytes: one of the
/// addresses [`ManifestEntry::bytes_path`] accepts, or `None` when `version`
/// is not [`BYTES_VERSION_LEN`] lowercase base-36 digits.
pub fn versioned_attachment_stream(entity: &EntityUrl, id: &str, version: &str) -> Option<String> {
    let suffix = format!("-{version}");
    is_version_suffix(&suffix).then(|| format!("{}{suffix}", entity.attachment_stream(id)))
}

/// The names [`ManifestEntry`]'s own fields have in its JSON object.
const FIELDS: &[&str] = &[
    "key",
    "kind",
    "id",
    "streamPath",
    "status",
    "subject",
    "role",
    "mimeType",
    "filename",
    "byteLength",
    "sha256",
    "createdAt",
    "createdBy",
    "error",
    "meta",
];

impl ManifestEntry {
    /// Whether this entry, written as JSON and read back, is this entry
    /// again, so a reader of its row may be handed the entry instead of
    /// parsing the row. True unless a number in its extensions or `meta` is
    /// a float (serde_json reads a float's shortest text back to the nearest
    /// double only within a bound, and may land one step away) or an
    /// extension is named as one of the entry's own fields (written twice, it
    /// would be read back as the field).
    pub fn reads_back_as_itself(&self) -> bool {
        fn exact(v: &Value) -> bool {
            match v {
                Value::Number(n) => !n.is_f64(),
                Value::Array(items) => items.iter().all(exact),
                Value::Object(map) => map.values().all(exact),
                Value::Null | Value::Bool(_) | Value::String(_) => true,
            }
        }
        self.ext.iter().all(|(k, v)| !FIELDS.contains(&k.as_str()) && exact(v))
            && self.meta.as_ref().is_none_or(|m| m.values().all(exact))
    }
}

impl<'de> Deserialize<'de> for ManifestEntry {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_map(EntryVisitor)
    }
}

/// One pass over the object: known fields into their types, any other into `ext`.
struct EntryVisitor;

impl<'de> serde::de::Visitor<'de> for EntryVisitor {
    type Value = ManifestEntry;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a manifest entry object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> std::result::Result<ManifestEntry, A::Error> {
        use serde::de::Error as _;
        let (mut key, mut kind, mut id, mut stream_path, mut status, mut role) = (None, None, None, None, None, None);
        let (mut mime_type, mut created_at) = (None, None);
        let mut e = ManifestEntry {
            key: String::new(),
            kind: String::new(),
            id: String::new(),
            stream_path: String::new(),
            status: AttachmentStatus::Pending,
            subject: None,
            role: Role::Output,
            mime_type: String::new(),
            filename: None,
            byte_length: None,
            sha256: None,
            created_at: String::new(),
            created_by: None,
            error: None,
            meta: None,
            ext: Map::new(),
        };
        while let Some(field) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            match field.as_ref() {
                "key" => key = Some(map.next_value()?),
                "kind" => kind = Some(map.next_value()?),
                "id" => id = Some(map.next_value()?),
                "streamPath" => stream_path = Some(map.next_value()?),
                "status" => status = Some(map.next_value()?),
                "subject" => e.subject = map.next_value()?,
                "role" => role = Some(map.next_value()?),
                "mimeType" => mime_type = Some(map.next_value()?),
                "filename" => e.filename = map.next_value()?,
                "byteLength" => e.byte_length = map.next_value()?,
                "sha256" => e.sha256 = map.next_value()?,
                "createdAt" => created_at = Some(map.next_value()?),
                "createdBy" => e.created_by = map.next_value()?,
                "error" => e.error = map.next_value()?,
                "meta" => e.meta = map.next_value()?,
                other => {
                    let value: Value = map.next_value()?;
                    e.ext.insert(other.to_owned(), value);
                }
            }
        }
        e.key = key.ok_or_else(|| A::Error::missing_field("key"))?;
        e.kind = kind.ok_or_else(|| A::Error::missing_field("kind"))?;
        e.id = id.ok_or_else(|| A::Error::missing_field("id"))?;
        e.stream_path = stream_path.ok_or_else(|| A::Error::missing_field("streamPath"))?;
        e.status = status.ok_or_else(|| A::Error::missing_field("status"))?;
        e.role = role.ok_or_else(|| A::Error::missing_field("role"))?;
        e.mime_type = mime_type.ok_or_else(|| A::Error::missing_field("mimeType"))?;
        e.created_at = created_at.ok_or_else(|| A::Error::missing_field("createdAt"))?;
        Ok(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ManifestEntry {
        let mut ext = Map::new();
        ext.insert("name".into(), Value::from("result"));
        ext.insert("value".into(), serde_json::json!({"n": [1, 2], "ok": false}));
        ManifestEntry {
            key: "attachment:a1".into(),
            kind: "attachment".into(),
            id: "a1".into(),
            stream_path: "/task/t-1/attachments/a1".into(),
            status: AttachmentStatus::Complete,
            subject: Some(Subject { kind: "inbox".into(), key: "m1".into() }),
            role: Role::Input,
            mime_type: "image/png".into(),
            filename: Some("a \"b\".png".into()),
            byte_length: Some(7),
            sha256: Some("ab".repeat(32)),
            created_at: "2026-01-01T00:00:00.000Z".into(),
            created_by: Some("/principal/user%3Asam".into()),
            error: None,
            meta: Some(Map::new()),
            ext,
        }
    }

    #[test]
    fn entries_round_trip_with_their_extensions() {
        let entry = sample();
        let text = serde_json::to_string(&entry).unwrap();
        assert_eq!(serde_json::from_str::<ManifestEntry>(&text).unwrap(), entry);
        assert!(entry.reads_back_as_itself());
    }

    #[test]
    fn an_entry_reads_back_as_itself_unless_it_holds_a_float_or_an_extension_named_as_a_field() {
        let read_back = |e: &ManifestEntry| serde_json::from_slice::<ManifestEntry>(&serde_json::to_vec(e).unwrap());
        let mut floats = sample();
        floats.ext.insert("value".into(), serde_json::json!({"n": [1, 2.5e-300]}));
        assert!(!floats.reads_back_as_itself());
        let mut in_meta = sample();
        in_meta.meta = Some(serde_json::json!({"x": 0.1}).as_object().unwrap().clone());
        assert!(!in_meta.reads_back_as_itself());
        // An extension named as a field is written twice and read back as the field.
        let mut named = sample();
        named.ext.insert("id".into(), Value::from("other"));
        assert!(!named.reads_back_as_itself());
        assert_ne!(read_back(&named).unwrap(), named);
        // Integers of every size, strings with escapes, nulls and nesting read back exactly.
        let mut exact = sample();
        exact.ext.insert(
            "value".into(),
            serde_json::json!({"big": u64::MAX, "neg": i64::MIN, "s": "\"\u{1}\u{2028}é\\", "z": null, "a": [[{}]]}),
        );
        assert!(exact.reads_back_as_itself());
        assert_eq!(read_back(&exact).unwrap(), exact);
    }

    #[test]
    fn null_optionals_read_as_absent_and_missing_required_fields_are_errors() {
        let mut v = serde_json::to_value(sample()).unwrap();
        v["filename"] = Value::Null;
        v["subject"] = Value::Null;
        let e: ManifestEntry = serde_json::from_value(v.clone()).unwrap();
        assert_eq!((e.filename, e.subject), (None, None));
        for required in ["key", "kind", "id", "streamPath", "status", "role", "mimeType", "createdAt"] {
            let mut w = v.clone();
            w.as_object_mut().unwrap().remove(required);
            let err = serde_json::from_value::<ManifestEntry>(w).unwrap_err().to_string();
            assert!(err.contains(required), "{required}: {err}");
        }
        assert!(serde_json::from_str::<ManifestEntry>("[1]").is_err());
    }

    #[test]
    fn subjects_and_ids_are_validated() {
        assert!(Subject::parse_json(r#"{"type":"inbox","key":"m1"}"#).is_ok());
        assert!(Subject::parse_json(r#"{"type":"mail","key":"m1"}"#).is_err());
        assert!(Subject::parse_json(r#"{"type":"inbox"}"#).is_err());
        assert!(Subject::parse_json("[]").is_err());
        assert!(Subject::parse_json("{").is_err());
        for bad in ["", ".x", "a/b", "a\nb", &"x".repeat(129)] {
            assert!(validate_attachment_id(bad).is_err(), "{bad:?}");
        }
        assert!(validate_attachment_id(&"x".repeat(128)).is_ok());
        // A new attachment's id is spelled one way in a URL path; one stored by an older release is still valid.
        for id in ["a1", "ta-1795967306688-0a1b2c3d4", "A-z_0.9~", "0e8c1f4a-3b5d-4c6e-9f7a-2b4d6f8a0c1e"] {
            assert!(validate_new_attachment_id(id).is_ok(), "{id:?}");
        }
        for id in ["x y", "x!y", "caf\u{e9}", "x'y", "x:y", "x?y", "x#y", "x+y"] {
            let refused = validate_new_attachment_id(id).unwrap_err().to_string();
            assert!(refused.contains("'~'"), "{id:?}: {refused}");
            assert!(validate_attachment_id(id).is_ok(), "{id:?}");
        }
        assert!(validate_new_attachment_id(".x").is_err() && validate_new_attachment_id("").is_err());
    }

    #[test]
    fn bytes_paths_are_derived_from_the_entity_and_the_id() {
        let mine = EntityUrl::new("task", "t-1").unwrap();
        let mut e = sample();
        assert_eq!(e.bytes_path(&mine).as_deref(), Some("/task/t-1/attachments/a1"));
        let versioned = versioned_attachment_stream(&mine, "a1", "0az9bc").unwrap();
        e.stream_path = versioned.clone();
        assert_eq!(e.bytes_path(&mine), Some(versioned));
        for forged in [
            "/chat/victim/attachments/a1",
            "/task/t-1/attachments/secret",
            "/task/t-1/attachments/a1x",
            "/task/t-1/attachments/a1-ABCDEF",
            "/task/t-1/attachments/a1-abcdefg",
            "/task/t-1/attachments/a1/../../victim",
            "/task/t-1/main",
            "/_attache/events",
            "/plain/stream",
            "",
        ] {
            e.stream_path = forged.into();
            assert_eq!(e.bytes_path(&mine), None, "{forged}");
        }
        let other = EntityUrl::new("task", "t-2").unwrap();
        e.stream_path = "/task/t-1/attachments/a1".into();
        assert_eq!(e.bytes_path(&other), None);
        e.id = "../x".into();
        e.stream_path = "/task/t-1/attachments/../x".into();
        assert_eq!(e.bytes_path(&mine), None);
        assert_eq!(versioned_attachment_stream(&mine, "a1", "x/y"), None);
    }

    #[test]
    fn entries_serialize_in_the_electric_shape() {
        let e = ManifestEntry {
            key: ManifestEntry::row_key("a1"),
            kind: "attachment".into(),
            id: "a1".into(),
            stream_path: "/chat/x/attachments/a1".into(),
            status: AttachmentStatus::Complete,
            subject: Some(Subject::new("inbox", "m1").unwrap()),
            role: Role::Input,
            mime_type: "image/png".into(),
            filename: Some("a.png".into()),
            byte_length: Some(3),
            sha256: Some("ab".into()),
            created_at: "2026-01-01T00:00:00.000Z".into(),
            created_by: Some("/principal/user%3Asam".into()),
            error: None,
            meta: None,
            ext: Map::new(),
        };
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["streamPath"], "/chat/x/attachments/a1");
        assert_eq!(v["byteLength"], 3);
        assert_eq!(v["status"], "complete");
        assert_eq!(v["subject"]["type"], "inbox");
        let back: ManifestEntry = serde_json::from_value(v).unwrap();
        assert_eq!(back, e);
    }
}

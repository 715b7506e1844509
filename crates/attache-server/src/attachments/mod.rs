//! Entity attachments: streamed multipart upload, ranged reads, delete,
//! listing, and resumable uploads over an open attachment stream.
//!
//! The bytes of an upload stream straight to a staging file while SHA-256
//! and the length are computed; nothing holds the whole body. The manifest
//! row on the entity's main stream goes `pending` (when the id and subject
//! come before the bytes) → `complete` (committed with the blob stream that
//! holds the bytes, in one store call) or `failed`. A rejected request (bad
//! field, too large, duplicate id) retracts its pending row, so it changes
//! nothing.
//!
//! One file per operation, as Garage's `api/s3/{put,get,...}`: `upload`
//! (multipart), `resumable` (PUT, append, close, finalize), `read` (GET,
//! HEAD, list), `delete`, `recovery` (settling uploads a restart or an
//! expiry left pending); `pending` is the machinery an upload in progress
//! shares (reserved ids, the pending row and its settling); here, what all
//! of them use: the form's descriptive fields and the refusals.

mod delete;
mod pace;
mod pending;
mod read;
mod recovery;
mod resumable;
mod upload;

use attache_core::manifest::{
    validate_attachment_id, validate_new_attachment_id, AttachmentStatus, ManifestEntry, Role, Subject,
};
use attache_core::state::timestamp;
use attache_core::{ContentType, EntityUrl, PrincipalKey};
use axum::http::StatusCode;
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};

use crate::access::now_ms;
use crate::error::{ApiError, ApiResult};
use crate::rows::{inline_bytes, MainView};

pub use delete::{delete, delete_entry};
pub use pace::{UploadSlot, UploadSlots, UploadStalled, TOO_MANY_UPLOADS};
pub use pending::{
    finalize, finalize_closed, hold_id, settle, upload_in_progress, OpenUpload, Reservation, Reservations, WhileOpen,
    UPLOAD_IN_PROGRESS,
};
pub use read::{content_disposition, list, parse_range, read, RangeRequest};
pub use recovery::{recover, start_expiry};
pub use resumable::{begin_resumable, check_append_size, ResumableBody};
pub use upload::upload;

/// The error code of an upload whose body ended early (recorded as `failed`).
const INTERRUPTED: &str = "UPLOAD_INTERRUPTED";

/// Longest attache key-value name an attachment may carry.
pub const MAX_NAME_LEN: usize = 100;

fn not_found() -> ApiError {
    ApiError::not_found("Attachment not found")
}

fn duplicate(id: &str) -> ApiError {
    ApiError::new(StatusCode::CONFLICT, "DUPLICATE_ID", format!("Attachment already exists at id \"{id}\""))
}

/// The refusal code of an upload of a new id to an entity holding
/// `max_attachments_per_entity` attachments.
pub const TOO_MANY_ATTACHMENTS: &str = "TOO_MANY_ATTACHMENTS";

/// Whether `view` has room for attachment `id`: one it holds already (in any
/// status) takes no new place; a new one needs the entity to hold fewer than
/// `max` (every manifest entry counts: pending, complete and failed).
pub fn has_room(view: &MainView, id: &str, max: usize) -> bool {
    view.manifest.len() < max || view.manifest.contains_key(id)
}

/// The refusal code of an upload whose `meta` would take the entity's
/// inline values past `max_inline_bytes_per_entity` (the task face's code
/// for the same bound).
pub const TOO_MANY_ATTACHMENT_BYTES: &str = "TOO_MANY_ATTACHMENT_BYTES";

/// Whether `entry`'s inline values ([`inline_bytes`]: an upload's `meta`)
/// fit in `view` beside the entity's others within `limit`, those of the row
/// it replaces given back first; an entry holding no more than the row it
/// replaces always fits. Else 409 `TOO_MANY_ATTACHMENT_BYTES`: without it a
/// client could make one entity's view, which a request holds whole, as
/// large as 10,000 uploads' `meta` (GiBs), by uploading tiny files.
fn bytes_fit(view: &MainView, entity: &EntityUrl, entry: &ManifestEntry, limit: usize) -> ApiResult<()> {
    let size = inline_bytes(entry);
    let replaced = view.manifest.get(&entry.id).map_or(0, inline_bytes);
    let others = view.inline_bytes().saturating_sub(replaced);
    if size <= replaced || others.saturating_add(size) <= limit {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::CONFLICT,
        TOO_MANY_ATTACHMENT_BYTES,
        format!(
            "{entity}'s other attachments hold {others} bytes of inline values (task attachments' values, \
             uploads' meta) and this upload's meta {size}; one entity holds at most {limit} together \
             (max_inline_bytes_per_entity): send a smaller meta, or delete attachments \
             (DELETE /_electric/entities{entity}/attachments/{{id}}) to make room"
        ),
    ))
}

/// The longest `mimeType` an attachment may carry (as the task face's).
const MAX_MIME_TYPE_LEN: usize = 255;

/// The longest text field of an upload form or a resumable upload's body
/// (a multipart text field is bounded by the same figure as it is read),
/// `meta` counted as JSON text.
const MAX_FIELD_BYTES: usize = 64 << 10;

/// 409 `TOO_MANY_ATTACHMENTS`: the entity holds as many attachments as one may.
fn too_many(entity: &EntityUrl, held: usize, max: usize) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        TOO_MANY_ATTACHMENTS,
        format!(
            "{entity} holds {held} attachments; one entity holds at most {max} (max_attachments_per_entity), \
             rows of failed or interrupted uploads count too: delete attachments it no longer needs \
             (DELETE /_electric/entities{entity}/attachments/{{id}}) to make room"
        ),
    )
}

/// A valid media type of at most [`MAX_MIME_TYPE_LEN`] bytes (it is kept in
/// the manifest row, so in the entity's view, and served as `Content-Type`).
fn check_mime_type(value: &str) -> ApiResult<()> {
    if value.len() > MAX_MIME_TYPE_LEN || ContentType::parse(value).is_err() {
        return Err(ApiError::bad_request(format!(
            "invalid mimeType {value:?}: a media type of at most {MAX_MIME_TYPE_LEN} bytes"
        )));
    }
    Ok(())
}

fn too_large(max: u64) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "PAYLOAD_TOO_LARGE",
        format!("Attachment exceeds maximum size of {max} bytes"),
    )
}

/// [`json_tree_cost`](crate::http::json_tree_cost)'s bytes a value for an
/// upload's `meta`: its pending entry holds it as a tree of values for as
/// long as the upload runs, as `/rpc` holds a body's. A 64,901-byte `meta`
/// of 5,900 members counts 11,801 values (keys too): 1.2 MB charged.
const META_VALUE_COST: usize = crate::http::JSON_VALUE_COST;

/// Takes from the body budget, within `who`'s share, what an upload's `meta`
/// holds while the upload runs (its text, then its tree in the pending
/// entry), given back when the upload is answered: 503
/// `BODY_BUDGET_EXHAUSTED` with `Retry-After` past it. Before (session 17's
/// attack pass), nothing counted it: 1,024 stalled uploads, each with a 64 KB
/// `meta` of 5,900 members and a byte of its file every 5 s, held 1.7 GB.
fn hold_meta<'a>(state: &'a crate::AppState, who: &'a PrincipalKey, text: &str) -> ApiResult<crate::http::Hold<'a>> {
    let (values, bytes) = crate::http::json_tree_cost(text.as_bytes(), META_VALUE_COST);
    state.bodies.hold(who, bytes, &format_args!("an upload's meta of {values} JSON values"))
}

/// The descriptive fields of an attachment, as sent.
#[derive(Debug, Default, Clone)]
struct Fields {
    id: Option<String>,
    mime_type: Option<String>,
    filename: Option<String>,
    subject: Option<Subject>,
    role: Option<Role>,
    /// As sent (a JSON object, checked), held as text: parsed only into the
    /// entries made of these fields, as a tree of many small members costs
    /// ~10 times its text ([`META_VALUE_COST`]).
    meta: Option<Box<RawValue>>,
    name: Option<String>,
    subject_type: Option<String>,
    subject_key: Option<String>,
}

impl Fields {
    /// Takes one text field; an empty value counts as absent.
    fn set(&mut self, field: &str, value: String) -> ApiResult<()> {
        if value.len() > MAX_FIELD_BYTES {
            return Err(ApiError::bad_request(format!("{field} is at most {MAX_FIELD_BYTES} bytes")));
        }
        let value = value.trim().to_owned();
        if value.is_empty() {
            // An empty text field counts as absent, except an id: naming none is an error.
            return match field {
                "id" => Err(validate_attachment_id("")
                    .err()
                    .map(ApiError::from)
                    .unwrap_or_else(|| ApiError::bad_request("empty id"))),
                _ => Ok(()),
            };
        }
        match field {
            "id" => {
                // A new attachment: its id becomes its stream's path segment.
                validate_new_attachment_id(&value)?;
                self.id = Some(value);
            }
            "mimeType" => {
                check_mime_type(&value)?;
                self.mime_type = Some(value);
            }
            "filename" => {
                if value.len() > 1024 {
                    return Err(ApiError::bad_request("filename is at most 1024 bytes"));
                }
                self.filename = Some(value);
            }
            "subject" => self.subject = Some(Subject::parse_json(&value)?),
            "subjectType" => self.subject_type = Some(value),
            "subjectKey" => self.subject_key = Some(value),
            "role" => self.role = Some(Role::parse(&value)?),
            "meta" => {
                let raw: Box<RawValue> =
                    serde_json::from_str(&value).map_err(|_| ApiError::bad_request("Invalid JSON field: meta"))?;
                if !raw.get().starts_with('{') {
                    return Err(ApiError::bad_request("attachment meta must be an object"));
                }
                self.meta = Some(raw);
            }
            "key" => {
                if value.len() > MAX_NAME_LEN || value.chars().any(char::is_control) {
                    return Err(ApiError::bad_request("key is 1 to 100 printable characters"));
                }
                self.name = Some(value);
            }
            _ => {}
        }
        Ok(())
    }

    /// Takes a resumable upload's `meta` object, bounded as a form's text field is.
    fn set_meta(&mut self, meta: Option<Map<String, Value>>) -> ApiResult<()> {
        let Some(m) = meta else {
            self.meta = None;
            return Ok(());
        };
        let raw = serde_json::value::to_raw_value(&m).map_err(ApiError::internal)?;
        if raw.get().len() > MAX_FIELD_BYTES {
            return Err(ApiError::bad_request(format!("meta is at most {MAX_FIELD_BYTES} bytes of JSON")));
        }
        self.meta = Some(raw);
        Ok(())
    }

    /// The `meta` object, parsed (checked when it was taken).
    fn meta(&self) -> ApiResult<Option<Map<String, Value>>> {
        self.meta.as_deref().map(|raw| serde_json::from_str(raw.get())).transpose().map_err(ApiError::internal)
    }

    fn subject(&self) -> ApiResult<Option<Subject>> {
        match (&self.subject, &self.subject_type, &self.subject_key) {
            (Some(s), _, _) => Ok(Some(s.clone())),
            (None, Some(t), Some(k)) => Ok(Some(Subject::new(t, k)?)),
            // A keyed (task) attachment is context for its entity, as the task face writes it.
            (None, None, None) => match &self.name {
                Some(key) => Ok(Some(Subject::new("context", key)?)),
                None => Ok(None),
            },
            _ => Err(ApiError::bad_request("attachment subject requires type and key")),
        }
    }

    fn entry(
        &self,
        entity: &EntityUrl,
        id: &str,
        who: &PrincipalKey,
        part_type: Option<&str>,
    ) -> ApiResult<ManifestEntry> {
        let mime_type = self
            .mime_type
            .clone()
            .or_else(|| part_type.map(str::to_owned))
            .unwrap_or_else(|| ContentType::OCTET_STREAM.into());
        check_mime_type(&mime_type)?;
        let mut ext = Map::new();
        if let Some(name) = &self.name {
            ext.insert("name".into(), json!(name));
        }
        Ok(ManifestEntry {
            key: ManifestEntry::row_key(id),
            kind: "attachment".into(),
            id: id.to_owned(),
            stream_path: entity.attachment_stream(id),
            status: AttachmentStatus::Pending,
            subject: self.subject()?,
            role: self.role.unwrap_or(Role::Input),
            mime_type,
            filename: self.filename.clone(),
            byte_length: None,
            sha256: None,
            created_at: timestamp(now_ms()),
            created_by: Some(who.url()),
            error: None,
            meta: self.meta()?,
            ext,
        })
    }
}

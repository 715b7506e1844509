//! Entity attachments: streamed multipart upload, ranged reads, delete,
//! listing, and resumable uploads over an open attachment stream.
//!
//! The bytes of an upload stream straight to a staging file while SHA-256
//! and the length are computed; nothing holds the whole body. The manifest
//! row on the entity's main stream goes `pending` (as soon as the id is
//! known) → `complete` (after the bytes are durable under their content
//! address) or `failed`. A rejected request (bad field, too large, duplicate
//! id) retracts its pending row, so it changes nothing.

use std::collections::{HashMap, HashSet};

use attache_core::manifest::{
    validate_attachment_id, AttachmentStatus, ManifestEntry, Role, Subject, MANIFEST, SUBJECT_REQUIRED,
};
use attache_core::state::{timestamp, ChangeEvent};
use attache_core::{ContentType, EntityUrl, Permission, PrincipalKey, StreamPath};
use attache_storage::{CreateStream, EntityRecord, ReadFrom, StoreError, StreamInfo};
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use crate::access::{entity_for, hold_life, now_ms};
use crate::auth::Caller;
use crate::entities::{entity_url, json_body};
use crate::error::{ApiError, ApiResult};
use crate::rows::{append_rows, new_txid, not_running};
use crate::AppState;

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

/// Upload ids in flight, by attachment stream path: a second upload of the
/// same id is refused while the first runs.
#[derive(Default)]
pub struct Reservations(parking_lot::Mutex<HashSet<String>>, parking_lot::Mutex<HashMap<String, OpenUpload>>);

/// A resumable upload begun here (or found open at start-up) and not closed
/// yet, by stream path: what the expiry sweep looks at.
#[derive(Debug, Clone)]
pub struct OpenUpload {
    entity: EntityUrl,
    id: String,
}

struct Reservation<'a> {
    set: &'a Reservations,
    key: String,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.set.0.lock().remove(&self.key);
    }
}

impl Reservations {
    fn take(&self, key: &str) -> Option<Reservation<'_>> {
        self.0.lock().insert(key.to_owned()).then(|| Reservation { set: self, key: key.to_owned() })
    }
}

/// The descriptive fields of an attachment, as sent.
#[derive(Debug, Default, Clone)]
struct Fields {
    id: Option<String>,
    mime_type: Option<String>,
    filename: Option<String>,
    subject: Option<Subject>,
    role: Option<Role>,
    meta: Option<Map<String, Value>>,
    name: Option<String>,
    subject_type: Option<String>,
    subject_key: Option<String>,
}

impl Fields {
    /// Takes one text field; an empty value counts as absent.
    fn set(&mut self, field: &str, value: String) -> ApiResult<()> {
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
                validate_attachment_id(&value)?;
                self.id = Some(value);
            }
            "mimeType" => {
                ContentType::parse(&value).map_err(|_| ApiError::bad_request(format!("invalid mimeType {value:?}")))?;
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
                let parsed: Value =
                    serde_json::from_str(&value).map_err(|_| ApiError::bad_request("Invalid JSON field: meta"))?;
                match parsed {
                    Value::Object(map) => self.meta = Some(map),
                    _ => return Err(ApiError::bad_request("attachment meta must be an object")),
                }
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

    fn subject(&self) -> ApiResult<Option<Subject>> {
        match (&self.subject, &self.subject_type, &self.subject_key) {
            (Some(s), _, _) => Ok(Some(s.clone())),
            (None, Some(t), Some(k)) => Ok(Some(Subject::new(t, k)?)),
            (None, None, None) => Ok(None),
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
            meta: self.meta.clone(),
            ext,
        })
    }
}

/// An upload names what it is about, as Electric requires (its wording):
/// the entry as it will be written, or 400 `attachment subject is required`.
/// Checked once every field has arrived (a form may send the file first).
fn with_subject(entry: ManifestEntry) -> ApiResult<ManifestEntry> {
    if entry.subject.is_none() {
        return Err(ApiError::bad_request(SUBJECT_REQUIRED));
    }
    Ok(entry)
}

fn manifest_row(entry: &ManifestEntry, txid: &str) -> ApiResult<ChangeEvent> {
    let value = serde_json::to_value(entry).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let now = timestamp(now_ms());
    Ok(match entry.status {
        AttachmentStatus::Pending => ChangeEvent::insert(MANIFEST, &entry.key, value, txid, &now),
        _ => ChangeEvent::update(MANIFEST, &entry.key, value, txid, &now),
    })
}

/// Writes a manifest entry (pending, complete or failed) as an upsert row.
pub async fn write_entry(state: &AppState, entity: &EntityUrl, entry: &ManifestEntry, txid: &str) -> ApiResult<()> {
    append_rows(state.store.as_ref(), &entity.main_stream(), &[manifest_row(entry, txid)?], false).await.map(|_| ())
}

async fn retract(state: &AppState, entity: &EntityUrl, id: &str, txid: &str) {
    let row = ChangeEvent::delete(MANIFEST, &ManifestEntry::row_key(id), txid, &timestamp(now_ms()));
    if let Err(e) = append_rows(state.store.as_ref(), &entity.main_stream(), &[row], false).await {
        tracing::warn!(error = %e.message, id, "could not retract a pending attachment row");
    }
}

/// Can `id` be (re)used? Free, or only a failed attempt is recorded.
async fn id_is_free(state: &AppState, entity: &EntityUrl, id: &str) -> ApiResult<bool> {
    let view = state.views.get(state.store.as_ref(), &entity.main_stream()).await?;
    Ok(match view.manifest.get(id) {
        None => true,
        Some(e) => e.status == AttachmentStatus::Failed,
    })
}

/// An upload in progress: reserved id, pending row written. Dropped without
/// [`Pending::settled`] (the request was cancelled, e.g. its client went
/// away, at any await), it settles its row in the background: complete when
/// the bytes committed, failed (and the stream removed) when they did not.
/// Without it such a row stayed `pending` for ever and its id was refused.
struct Pending<'a> {
    _reservation: Reservation<'a>,
    entry: ManifestEntry,
    /// The txid of the row that settles the upload (complete, failed or
    /// retracted), the one a one-shot upload answers with: a client waiting
    /// for it sees the final status, never only `pending`.
    txid: String,
    /// The txid of the `pending` row, what a resumable upload answers with
    /// (its bytes come later, through the stream).
    pending_txid: String,
    /// Set once the handler itself answered for the row.
    settled: Option<(AppState, EntityUrl)>,
}

impl Pending<'_> {
    /// The handler wrote the row's outcome (or handed the upload on): nothing to clean up.
    fn settled(&mut self) {
        self.settled = None;
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        let Some((state, entity)) = self.settled.take() else { return };
        let id = self.entry.id.clone();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move { settle(&state, &entity, &id).await });
        }
    }
}

/// Settles a `pending` row no upload holds any more, from what the store
/// holds at the derived path: a closed blob stream completes it, a closed
/// resumable stream is finalized, an open one is a resumable upload still
/// going (left alone), and no stream at all fails it. Idempotent.
pub async fn settle(state: &AppState, entity: &EntityUrl, id: &str) {
    let Ok(view) = state.views.get(state.store.as_ref(), &entity.main_stream()).await else { return };
    let Some(entry) = view.manifest.get(id).cloned() else { return };
    drop(view);
    if entry.status != AttachmentStatus::Pending || validate_attachment_id(id).is_err() {
        return;
    }
    // The upload's stream is derived, never taken from the row.
    let path = entity.attachment_stream(id);
    match state.store.head(&path).await {
        Ok(info) if info.closed => match &info.blob {
            Some(blob) => {
                let mut done = entry;
                done.stream_path = path;
                done.status = AttachmentStatus::Complete;
                done.sha256 = Some(blob.sha256.clone());
                done.byte_length = Some(blob.len);
                if write_entry(state, entity, &done, &new_txid()).await.is_ok() {
                    tracing::info!(entity = %entity, id, "completed an upload interrupted after its bytes were stored");
                }
            }
            None => {
                let _ = finalize(state, entity, id).await;
            }
        },
        // A resumable upload still going: the expiry sweep ends it if it is never closed.
        Ok(_) => {
            state.uploads.1.lock().insert(path, OpenUpload { entity: entity.clone(), id: id.to_owned() });
        }
        Err(_) => {
            let mut failed = entry;
            failed.stream_path = path.clone();
            failed.status = AttachmentStatus::Failed;
            failed.error = Some("upload interrupted: the bytes were not stored".into());
            if write_entry(state, entity, &failed, &new_txid()).await.is_ok() {
                tracing::info!(entity = %entity, id, "marked an interrupted upload failed");
            }
            // A create sent before the interruption commits before this delete (one writer, in order).
            let _ = state.store.delete(&path).await;
        }
    }
}

async fn begin<'s>(
    state: &'s AppState,
    record: &EntityRecord,
    entity: &EntityUrl,
    id: &str,
    fields: &Fields,
    who: &PrincipalKey,
    part_type: Option<&str>,
) -> ApiResult<Pending<'s>> {
    let entry = fields.entry(entity, id, who, part_type)?;
    let reservation = state.uploads.take(&entry.stream_path).ok_or_else(|| duplicate(id))?;
    if !id_is_free(state, entity, id).await? {
        // A pending row no upload holds (we hold the id now) was left by an
        // interrupted upload: settle it, then look again.
        settle(state, entity, id).await;
        if !id_is_free(state, entity, id).await? {
            return Err(duplicate(id));
        }
    }
    let pending_txid = new_txid();
    {
        // The row goes only into the life the upload was authorized against.
        let _life = hold_life(state, record).await?;
        write_entry(state, entity, &entry, &pending_txid).await?;
    }
    Ok(Pending {
        _reservation: reservation,
        entry,
        txid: new_txid(),
        pending_txid,
        settled: Some((state.clone(), entity.clone())),
    })
}

fn multipart_error(e: multer::Error) -> ApiError {
    match e {
        multer::Error::StreamReadFailed(e) if e.is::<crate::multipart::PartHeadersTooLarge>() => {
            ApiError::new(StatusCode::BAD_REQUEST, "PART_HEADERS_TOO_LARGE", e.to_string())
        }
        multer::Error::StreamSizeExceeded { .. } | multer::Error::FieldSizeExceeded { .. } => {
            ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "PAYLOAD_TOO_LARGE", format!("multipart part too large: {e}"))
        }
        multer::Error::IncompleteStream
        | multer::Error::IncompleteFieldData { .. }
        | multer::Error::IncompleteHeaders
        | multer::Error::StreamReadFailed(_) => {
            ApiError::new(StatusCode::BAD_REQUEST, INTERRUPTED, format!("the upload ended early: {e}"))
        }
        other => ApiError::bad_request(format!("Invalid multipart form data: {other}")),
    }
}

/// POST /_electric/entities/{type}/{id}/attachments (multipart/form-data) [write]
pub async fn upload(
    State(state): State<AppState>,
    Caller(who): Caller,
    Path((entity_type, instance_id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let entity = entity_url(&entity_type, &instance_id)?;
    let record = entity_for(&state, &who, &entity, Permission::Write).await?;
    if !record.is_running() {
        return Err(not_running());
    }
    let content_type = headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("");
    let boundary = multer::parse_boundary(content_type)
        .map_err(|_| ApiError::bad_request("Attachment uploads must use multipart/form-data"))?;
    let max = state.config.max_attachment_bytes;
    const FORM_OVERHEAD: u64 = 1 << 20;
    let declared = headers.get("content-length").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max + FORM_OVERHEAD) {
        return Err(too_large(max));
    }
    let constraints = multer::Constraints::new().size_limit(
        multer::SizeLimit::new().per_field(64 << 10).for_field("file", max + 1).whole_stream(max + FORM_OVERHEAD),
    );
    let limits = &state.config;
    let guarded = crate::multipart::PartHeaderGuard::new(
        body.into_data_stream(),
        &boundary,
        limits.multipart_max_part_header_bytes,
    );
    let mut form = multer::Multipart::with_constraints(guarded, boundary, constraints);
    let mut fields = Fields::default();
    let mut seen = HashSet::new();
    let mut pending: Option<Pending> = None;
    let mut staged = None;
    let outcome: ApiResult<()> = async {
        while let Some(mut field) = form.next_field().await.map_err(multipart_error)? {
            let name = field.name().unwrap_or("").to_owned();
            if name != "file" {
                if seen.len() >= limits.multipart_max_fields {
                    return Err(ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "TOO_MANY_FIELDS",
                        format!("a form has at most {} text fields", limits.multipart_max_fields),
                    ));
                }
                if !seen.insert(name.clone()) {
                    return Err(ApiError::bad_request(format!("field {name:?} is sent twice")));
                }
                let text = field.text().await.map_err(multipart_error)?;
                fields.set(&name, text)?;
                continue;
            }
            if staged.is_some() {
                return Err(ApiError::bad_request("only one file may be uploaded per request"));
            }
            if field.file_name().is_some_and(|f| f.len() > 1024) {
                return Err(ApiError::bad_request("filename is at most 1024 bytes"));
            }
            let part_type = field.content_type().map(|m| m.to_string());
            if fields.filename.is_none() {
                fields.filename = field.file_name().map(str::to_owned);
            }
            // With its id and subject known before the bytes, the upload is
            // recorded as pending at once; otherwise once every field is in
            // (a manifest row always names its subject, as Electric's schema requires).
            if let (Some(id), Ok(Some(_))) = (fields.id.clone(), fields.subject()) {
                pending = Some(begin(&state, &record, &entity, &id, &fields, &who, part_type.as_deref()).await?);
            }
            fields.mime_type = fields.mime_type.take().or(part_type);
            let mut writer = state.store.stage_blob().await?;
            while let Some(chunk) = field.chunk().await.map_err(multipart_error)? {
                if writer.len() + chunk.len() as u64 > max {
                    return Err(too_large(max));
                }
                writer.write(chunk).await?;
            }
            staged = Some(writer.finish().await?);
        }
        Ok(())
    }
    .await;
    let failure = match outcome {
        Ok(()) if staged.is_none() => Some(ApiError::bad_request("Missing file field")),
        Ok(()) => None,
        Err(e) => Some(e),
    };
    if let Some(err) = failure {
        if let Some(p) = pending.as_ref() {
            // Only into the life the upload began in (purged meanwhile: nowhere).
            if let Ok(_life) = hold_life(&state, &record).await {
                // A refused request changes nothing; an upload that broke off is recorded as failed.
                if err.status.is_client_error() && err.code != INTERRUPTED {
                    retract(&state, &entity, &p.entry.id, &p.txid).await;
                } else {
                    let mut failed = p.entry.clone();
                    failed.status = AttachmentStatus::Failed;
                    failed.error = Some(err.message.clone());
                    let _ = write_entry(&state, &entity, &failed, &p.txid).await;
                }
            }
        }
        return Err(err);
    }
    let Some(blob) = staged else { return Err(ApiError::bad_request("Missing file field")) };
    // Fields after the file part complete the entry; check them before anything else is written.
    let id = pending.as_ref().map(|p| p.entry.id.clone()).or_else(|| fields.id.clone()).unwrap_or_else(new_txid);
    let fresh = match fields.entry(&entity, &id, &who, None).and_then(with_subject) {
        Ok(entry) => entry,
        Err(err) => {
            if let Some(p) = &pending {
                retract(&state, &entity, &p.entry.id, &p.txid).await;
            }
            return Err(err);
        }
    };
    let mut pending = match pending {
        Some(p) => p,
        None => begin(&state, &record, &entity, &id, &fields, &who, None).await?,
    };
    let mut entry = pending.entry.clone();
    entry.subject = fresh.subject;
    entry.role = fresh.role;
    entry.meta = fresh.meta;
    entry.ext = fresh.ext;
    entry.filename = fresh.filename;
    entry.mime_type = fresh.mime_type;
    let (sha256, len) = (blob.sha256.clone(), blob.len);
    let created = state
        .store
        .create_blob_stream(
            CreateStream {
                path: StreamPath::new(entry.stream_path.clone())?,
                content_type: ContentType::parse(&entry.mime_type).ok(),
                ttl: None,
                expires_at: None,
                closed: true,
                initial: Default::default(),
                fork: None,
                owner: Some(who.to_string()),
                take_kept_path: true,
            },
            blob,
        )
        .await;
    if let Err(e) = created {
        retract(&state, &entity, &entry.id, &pending.txid).await;
        return Err(match e {
            StoreError::ConfigMismatch(_) => duplicate(&entry.id),
            other => other.into(),
        });
    }
    entry.status = AttachmentStatus::Complete;
    entry.sha256 = Some(sha256);
    entry.byte_length = Some(len);
    // Purged (and perhaps spawned again by someone else) while the bytes
    // arrived: nothing of this upload may land in the entity's next life. The
    // life is held until the row is written, so a purge waits for it.
    let life = match hold_life(&state, &record).await {
        Ok(life) => life,
        Err(e) => {
            pending.settled();
            let _ = state.store.delete(&entry.stream_path).await;
            return Err(e);
        }
    };
    if let Err(e) = write_entry(&state, &entity, &entry, &pending.txid).await {
        // The entity stopped meanwhile: the bytes go; the pending row stays as the record of the attempt.
        pending.settled();
        let _ = state.store.delete(&entry.stream_path).await;
        return Err(e);
    }
    drop(life);
    pending.settled();
    Ok((StatusCode::CREATED, Json(json!({ "txid": pending.txid, "attachment": entry }))).into_response())
}

fn too_large(max: u64) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "PAYLOAD_TOO_LARGE",
        format!("Attachment exceeds maximum size of {max} bytes"),
    )
}

/// The manifest entry of a readable attachment.
async fn entry_for(
    state: &AppState,
    who: &PrincipalKey,
    entity: &EntityUrl,
    id: &str,
    wanted: Permission,
) -> ApiResult<ManifestEntry> {
    entity_for(state, who, entity, wanted).await?;
    let view = state.views.get(state.store.as_ref(), &entity.main_stream()).await?;
    view.manifest.get(id).cloned().ok_or_else(not_found)
}

/// GET /_electric/entities/{type}/{id}/attachments [read]: the manifest, oldest first.
pub async fn list(
    State(state): State<AppState>,
    Caller(who): Caller,
    Path((entity_type, instance_id)): Path<(String, String)>,
) -> ApiResult<Response> {
    let entity = entity_url(&entity_type, &instance_id)?;
    entity_for(&state, &who, &entity, Permission::Read).await?;
    let view = state.views.get(state.store.as_ref(), &entity.main_stream()).await?;
    let mut entries: Vec<std::borrow::Cow<ManifestEntry>> =
        view.manifest.values().map(|e| as_listed(&entity, e)).collect();
    entries.sort_by(|a, b| a.created_at.cmp(&b.created_at).then_with(|| a.id.cmp(&b.id)));
    Ok(Json(json!({ "attachments": entries })).into_response())
}

/// An entry as the list shows it: one whose row names a stream other than
/// the one derived for it points at no bytes, so it is shown `failed`, with
/// the derived address.
fn as_listed<'e>(entity: &EntityUrl, e: &'e ManifestEntry) -> std::borrow::Cow<'e, ManifestEntry> {
    if e.names_its_own_stream(entity) {
        return std::borrow::Cow::Borrowed(e);
    }
    let mut shown = e.clone();
    shown.stream_path = entity.attachment_stream(&e.id);
    shown.status = AttachmentStatus::Failed;
    shown.byte_length = None;
    shown.sha256 = None;
    shown.error = Some(UNOWNED_STREAM.into());
    std::borrow::Cow::Owned(shown)
}

/// Why a row that names a stream other than its own is not an attachment.
const UNOWNED_STREAM: &str = "the manifest row names a stream that is not this attachment's";

/// `Content-Disposition` safe for any filename: an ASCII fallback plus RFC 5987 UTF-8.
pub fn content_disposition(filename: &str) -> String {
    let ascii: String = filename
        .chars()
        .map(|c| if c.is_ascii_graphic() && c != '"' && c != '\\' || c == ' ' { c } else { '_' })
        .collect();
    let mut encoded = String::new();
    for b in filename.bytes() {
        if b.is_ascii_alphanumeric() || b"!#$&+-.^_`|~".contains(&b) {
            encoded.push(b as char);
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    format!("attachment; filename=\"{ascii}\"; filename*=UTF-8''{encoded}")
}

/// A single byte range, resolved against a length.
#[derive(Debug, PartialEq, Eq)]
pub enum RangeRequest {
    Full,
    Partial(u64, u64),
    Unsatisfiable,
}

/// Parses `Range: bytes=a-b | a- | -n`. Several ranges, or other units, are
/// served whole (RFC 9110 lets a server ignore Range).
pub fn parse_range(header: Option<&str>, len: u64) -> RangeRequest {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else { return RangeRequest::Full };
    if spec.contains(',') {
        return RangeRequest::Full;
    }
    let Some((a, b)) = spec.trim().split_once('-') else { return RangeRequest::Unsatisfiable };
    let num = |s: &str| if s.bytes().all(|c| c.is_ascii_digit()) { s.parse::<u64>().ok() } else { None };
    match (a.trim(), b.trim()) {
        ("", n) => match num(n) {
            Some(0) | None => RangeRequest::Unsatisfiable,
            Some(_) if len == 0 => RangeRequest::Unsatisfiable,
            Some(n) => RangeRequest::Partial(len.saturating_sub(n), len - 1),
        },
        (a, "") => match num(a) {
            Some(a) if a < len => RangeRequest::Partial(a, len - 1),
            _ => RangeRequest::Unsatisfiable,
        },
        (a, b) => match (num(a), num(b)) {
            (Some(a), Some(b)) if a <= b && a < len => RangeRequest::Partial(a, b.min(len - 1)),
            _ => RangeRequest::Unsatisfiable,
        },
    }
}

/// GET and HEAD /_electric/entities/{type}/{id}/attachments/{att} [read]
pub async fn read(
    State(state): State<AppState>,
    Caller(who): Caller,
    Path((entity_type, instance_id, id)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let entity = entity_url(&entity_type, &instance_id)?;
    let entry = entry_for(&state, &who, &entity, &id, Permission::Read).await?;
    // A row naming a stream other than the one derived for it points at no bytes.
    let path = entry.bytes_path(&entity).ok_or_else(not_found)?;
    if entry.status != AttachmentStatus::Complete {
        return Err(ApiError::new(StatusCode::CONFLICT, "NOT_COMPLETE", "Attachment is not complete"));
    }
    let info = state.store.head(&path).await.map_err(|_| not_found())?;
    let len = info.tail;
    // The content hash the store keeps for stored blobs; the row's only for resumable uploads.
    let sha256 = info.blob.as_ref().map(|b| b.sha256.as_str()).or(entry.sha256.as_deref());
    let etag = format!("\"{}\"", sha256.unwrap_or("none"));
    let mut res = if headers
        .get("if-none-match")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"))
    {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        let range = parse_range(headers.get("range").and_then(|v| v.to_str().ok()), len);
        let (status, start, end) = match range {
            RangeRequest::Full => (StatusCode::OK, 0, len),
            RangeRequest::Partial(a, b) => (StatusCode::PARTIAL_CONTENT, a, b + 1),
            RangeRequest::Unsatisfiable => {
                return Err(ApiError::new(
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    "RANGE_NOT_SATISFIABLE",
                    "range not satisfiable",
                )
                .with_header(axum::http::header::CONTENT_RANGE, format!("bytes */{len}")));
            }
        };
        let mut res = Response::new(body_for(&state, &info, start, end).await?);
        *res.status_mut() = status;
        let hm = res.headers_mut();
        set(hm, "content-length", end - start);
        if status == StatusCode::PARTIAL_CONTENT {
            set(hm, "content-range", format!("bytes {start}-{}/{len}", end - 1));
        }
        set(hm, "content-type", &entry.mime_type);
        res
    };
    let hm = res.headers_mut();
    set(hm, "etag", etag);
    set(hm, "accept-ranges", "bytes");
    set(hm, "cache-control", "private, max-age=31536000, immutable");
    set(hm, "content-disposition", content_disposition(entry.filename.as_deref().unwrap_or(&entry.id)));
    Ok(res)
}

fn set(hm: &mut HeaderMap, name: &'static str, value: impl ToString) {
    if let Ok(v) = HeaderValue::from_str(&value.to_string()) {
        hm.insert(name, v);
    }
}

/// The bytes `[start, end)` of an attachment stream, streamed from storage.
async fn body_for(state: &AppState, info: &StreamInfo, start: u64, end: u64) -> ApiResult<Body> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    if let Some(blob) = &info.blob {
        let mut file = state.store.open_blob(&blob.sha256).await?;
        file.seek(std::io::SeekFrom::Start(start)).await.map_err(StoreError::from)?;
        let reader = file.take(end - start);
        return Ok(Body::from_stream(tokio_util::io::ReaderStream::with_capacity(reader, 256 << 10)));
    }
    // A resumable upload's bytes live in the stream's rows: read them in slices.
    let store = state.store.clone();
    let path = info.path.clone();
    let stream = futures::stream::try_unfold(start, move |pos| {
        let store = store.clone();
        let path = path.clone();
        async move {
            if pos >= end {
                return Ok::<_, std::io::Error>(None);
            }
            let want = ((end - pos) as usize).min(1 << 20);
            let batch = store
                .read(&path, ReadFrom::At(attache_core::Offset(pos)), want)
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            let mut bytes = batch.body;
            bytes.truncate(want);
            if bytes.is_empty() {
                return Ok(None);
            }
            let next = pos + bytes.len() as u64;
            Ok(Some((bytes, next)))
        }
    });
    Ok(Body::from_stream(stream))
}

/// DELETE /_electric/entities/{type}/{id}/attachments/{att} [write]: a manifest
/// delete row, then the bytes are released (kept while another attachment holds the same content).
pub async fn delete(
    State(state): State<AppState>,
    Caller(who): Caller,
    Path((entity_type, instance_id, id)): Path<(String, String, String)>,
) -> ApiResult<Response> {
    let entity = entity_url(&entity_type, &instance_id)?;
    let record = entity_for(&state, &who, &entity, Permission::Write).await?;
    let entry = {
        let view = state.views.get(state.store.as_ref(), &entity.main_stream()).await?;
        view.manifest.get(&id).cloned().ok_or_else(not_found)?
    };
    let txid = delete_entry(&state, &record, &entity, &id, &entry).await?;
    Ok((StatusCode::OK, Json(json!({ "txid": txid }))).into_response())
}

/// Deletes the attachment `id`: its manifest row, then the bytes at the
/// address derived for it (never at a path a row names), both only in the
/// life of the entity `record` was read from (404 once it was purged: the
/// URL may hold someone else's entity, with an attachment of the same id).
pub async fn delete_entry(
    state: &AppState,
    record: &EntityRecord,
    entity: &EntityUrl,
    id: &str,
    entry: &ManifestEntry,
) -> ApiResult<String> {
    validate_attachment_id(id)?;
    let _life = hold_life(state, record).await?;
    let txid = new_txid();
    let row = ChangeEvent::delete(MANIFEST, &ManifestEntry::row_key(id), &txid, &timestamp(now_ms()));
    append_rows(state.store.as_ref(), &entity.main_stream(), &[row], false).await?;
    let path = entry.bytes_path(entity).unwrap_or_else(|| entity.attachment_stream(id));
    match state.store.delete(&path).await {
        Ok(()) | Err(StoreError::NotFound) | Err(StoreError::Gone) => Ok(txid),
        Err(e) => Err(e.into()),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ResumableBody {
    mime_type: Option<String>,
    filename: Option<String>,
    subject: Option<Value>,
    role: Option<String>,
    meta: Option<Map<String, Value>>,
    key: Option<String>,
}

/// PUT /_electric/entities/{type}/{id}/attachments/{att} [write]: starts a
/// resumable upload. The bytes are appended to the open attachment stream
/// (with idempotent-producer headers) and the stream is closed to finish.
pub async fn begin_resumable(
    State(state): State<AppState>,
    Caller(who): Caller,
    Path((entity_type, instance_id, id)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let entity = entity_url(&entity_type, &instance_id)?;
    validate_attachment_id(&id)?;
    let body: ResumableBody = json_body(&headers, body).await?;
    let record = entity_for(&state, &who, &entity, Permission::Write).await?;
    if !record.is_running() {
        return Err(not_running());
    }
    let mut fields = Fields::default();
    let subject = body.subject.map(|s| s.to_string());
    for (name, value) in [
        ("mimeType", body.mime_type),
        ("filename", body.filename),
        ("subject", subject),
        ("role", body.role),
        ("key", body.key),
    ] {
        if let Some(v) = value {
            fields.set(name, v)?;
        }
    }
    fields.meta = body.meta;
    with_subject(fields.entry(&entity, &id, &who, None)?)?;
    let path = entity.attachment_stream(&id);
    {
        let view = state.views.get(state.store.as_ref(), &entity.main_stream()).await?;
        if let Some(existing) = view.manifest.get(&id) {
            let same_upload = existing.status == AttachmentStatus::Pending
                && existing.created_by.as_deref() == Some(who.url().as_str())
                && state.store.head(&path).await.is_ok_and(|i| !i.closed);
            if same_upload {
                let mut existing = existing.clone();
                existing.stream_path = path.clone();
                return Ok((StatusCode::OK, Json(json!({ "attachment": existing }))).into_response());
            }
            if existing.status != AttachmentStatus::Failed {
                return Err(duplicate(&id));
            }
        }
    }
    let mut pending = begin(&state, &record, &entity, &id, &fields, &who, None).await?;
    let created = state
        .store
        .create(CreateStream {
            path: StreamPath::new(path.clone())?,
            // Bytes as uploaded, whatever the type: JSON mode would reframe them.
            content_type: ContentType::parse(&pending.entry.mime_type).ok().map(|t| t.stored_as_bytes()),
            ttl: None,
            expires_at: None,
            closed: false,
            initial: Default::default(),
            fork: None,
            owner: Some(who.to_string()),
            take_kept_path: true,
        })
        .await;
    // The upload goes on after this request, through the stream; expiry ends it if it is never closed.
    pending.settled();
    if let Err(e) = created {
        retract(&state, &entity, &id, &pending.txid).await;
        return Err(match e {
            StoreError::ConfigMismatch(_) => duplicate(&id),
            other => other.into(),
        });
    }
    state.uploads.1.lock().insert(path, OpenUpload { entity: entity.clone(), id: id.clone() });
    Ok((StatusCode::CREATED, Json(json!({ "txid": pending.pending_txid, "attachment": pending.entry })))
        .into_response())
}

/// Completes a resumable upload whose stream is closed: hashes the bytes and
/// writes the `complete` row. Idempotent; called after the closing append and at recovery.
pub async fn finalize(state: &AppState, entity: &EntityUrl, id: &str) -> ApiResult<Option<ManifestEntry>> {
    let view = state.views.get(state.store.as_ref(), &entity.main_stream()).await?;
    let Some(entry) = view.manifest.get(id).cloned() else { return Ok(None) };
    drop(view);
    if entry.status != AttachmentStatus::Pending {
        return Ok(Some(entry));
    }
    // A resumable upload's bytes are at the attachment's own stream, whatever the row says.
    validate_attachment_id(id)?;
    let path = entity.attachment_stream(id);
    let info = state.store.head(&path).await?;
    if !info.closed {
        return Ok(Some(entry));
    }
    let mut hasher = Sha256::new();
    let mut pos = 0;
    while pos < info.tail {
        let batch = state.store.read(&path, ReadFrom::At(attache_core::Offset(pos)), 4 << 20).await?;
        hasher.update(&batch.body);
        if batch.next.0 <= pos {
            break;
        }
        pos = batch.next.0;
    }
    let mut done = entry;
    done.stream_path = path;
    done.status = AttachmentStatus::Complete;
    done.byte_length = Some(info.tail);
    done.sha256 = Some(hex::encode(hasher.finalize()));
    write_entry(state, entity, &done, &new_txid()).await?;
    Ok(Some(done))
}

/// After a restart: every `pending` row no upload holds is settled
/// ([`settle`]): uploads that were streaming when the server stopped are
/// marked `failed`, those whose bytes were stored are completed, and
/// resumable uploads whose stream was closed are finalized.
pub async fn recover(state: &AppState) {
    for record in state.registry.entities(None) {
        let Ok(entity) = EntityUrl::parse(&record.url) else { continue };
        let pending: Vec<String> = match state.views.get(state.store.as_ref(), &entity.main_stream()).await {
            Ok(view) => view
                .manifest
                .iter()
                .filter(|(_, e)| e.status == AttachmentStatus::Pending)
                .map(|(k, _)| k.clone())
                .collect(),
            Err(_) => continue,
        };
        for id in pending {
            if validate_attachment_id(&id).is_err() || state.uploads.0.lock().contains(&entity.attachment_stream(&id)) {
                continue;
            }
            settle(state, &entity, &id).await;
        }
    }
}

/// Ends resumable uploads never closed: every so often (a quarter of the
/// expiry, at most a minute), each open upload whose stream was created more
/// than `upload_expiry` ago gets a `failed` row saying why, and its stream is
/// deleted. Closed ones leave the list (the close completed them).
pub fn start_expiry(state: AppState) {
    let expiry = state.config.upload_expiry;
    let every = (expiry / 4).clamp(std::time::Duration::from_millis(50), std::time::Duration::from_secs(60));
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = state.shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            expire_uploads(&state, expiry).await;
        }
    });
}

async fn expire_uploads(state: &AppState, expiry: std::time::Duration) {
    let open: Vec<(String, OpenUpload)> = state.uploads.1.lock().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let deadline = now_ms() - i64::try_from(expiry.as_millis()).unwrap_or(i64::MAX);
    for (path, upload) in open {
        let info = match state.store.head(&path).await {
            Ok(info) if !info.closed => info,
            // Closed (completed) or gone: nothing to expire.
            _ => {
                state.uploads.1.lock().remove(&path);
                continue;
            }
        };
        if info.created_at_ms > deadline {
            continue;
        }
        let view = match state.views.get(state.store.as_ref(), &upload.entity.main_stream()).await {
            Ok(view) => view,
            Err(_) => continue,
        };
        let entry = view.manifest.get(&upload.id).filter(|e| e.status == AttachmentStatus::Pending).cloned();
        drop(view);
        if let Some(mut failed) = entry {
            failed.stream_path = path.clone();
            failed.status = AttachmentStatus::Failed;
            failed.error = Some(format!(
                "upload expired: a resumable upload must be closed within {} of its start",
                humanize(expiry)
            ));
            if let Err(e) = write_entry(state, &upload.entity, &failed, &new_txid()).await {
                tracing::warn!(error = %e.message, id = upload.id, "could not mark an expired upload failed");
                continue;
            }
            tracing::info!(entity = %upload.entity, id = upload.id, "a resumable upload expired");
        }
        match state.store.delete(&path).await {
            Ok(()) | Err(StoreError::NotFound) | Err(StoreError::Gone) => {
                state.uploads.1.lock().remove(&path);
            }
            Err(e) => tracing::warn!(error = %e, path, "could not delete an expired upload's stream"),
        }
    }
}

fn humanize(d: std::time::Duration) -> String {
    let secs = d.as_secs();
    match secs {
        s if s >= 3600 && s % 3600 == 0 => format!("{}h", s / 3600),
        s if s >= 60 && s % 60 == 0 => format!("{}m", s / 60),
        s if s > 0 => format!("{s}s"),
        _ => format!("{}ms", d.as_millis()),
    }
}

/// Checks that an append to a resumable attachment stream stays within the size limit.
pub async fn check_append_size(state: &AppState, path: &str, body_len: usize) -> ApiResult<()> {
    if let Ok(info) = state.store.head(path).await {
        if info.tail + body_len as u64 > state.config.max_attachment_bytes {
            return Err(too_large(state.config.max_attachment_bytes));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_follow_rfc_9110() {
        assert_eq!(parse_range(None, 10), RangeRequest::Full);
        assert_eq!(parse_range(Some("bytes=0-4"), 10), RangeRequest::Partial(0, 4));
        assert_eq!(parse_range(Some("bytes=5-"), 10), RangeRequest::Partial(5, 9));
        assert_eq!(parse_range(Some("bytes=-3"), 10), RangeRequest::Partial(7, 9));
        assert_eq!(parse_range(Some("bytes=-30"), 10), RangeRequest::Partial(0, 9));
        assert_eq!(parse_range(Some("bytes=8-100"), 10), RangeRequest::Partial(8, 9));
        assert_eq!(parse_range(Some("bytes=10-"), 10), RangeRequest::Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=5-2"), 10), RangeRequest::Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=-0"), 10), RangeRequest::Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=0-0"), 0), RangeRequest::Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=0-1,3-4"), 10), RangeRequest::Full);
        assert_eq!(parse_range(Some("items=0-1"), 10), RangeRequest::Full);
        assert_eq!(parse_range(Some("bytes=x-1"), 10), RangeRequest::Unsatisfiable);
    }

    #[test]
    fn content_disposition_is_safe_for_any_filename() {
        let d = content_disposition("r\u{e9}sum\u{e9} \"final\"\r\n.pdf");
        assert!(d.starts_with("attachment; filename=\"r_sum_ _final___.pdf\"; filename*=UTF-8''"));
        assert!(!d.contains('\r') && !d.contains('\n'));
        assert!(d.ends_with("r%C3%A9sum%C3%A9%20%22final%22%0D%0A.pdf"));
    }
}

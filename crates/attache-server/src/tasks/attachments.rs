//! Task attachments: the `task.*_attachment*` methods. Each attachment is a
//! manifest row on the task's main stream keyed by `ext["name"]`; inline
//! bytes go to a closed stream at the address derived from the attachment
//! id. Writes of one key are serialized by its key lock (see `ordering`).

use attache_core::manifest::{
    validate_attachment_id, versioned_attachment_stream, AttachmentStatus, ManifestEntry, Role, Subject,
    BYTES_VERSION_LEN,
};
use attache_core::state::timestamp;
use attache_core::task::{AttachmentKind, ATTACHMENT_KINDS};
use attache_core::{ContentType, EntityUrl, Permission, PrincipalKey, StreamPath};
use attache_storage::{CreateStream, EntityRecord, RowGuard};
use base64::Engine;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use super::dispatch::{task_entity, task_missing, task_stopped, Missing};
use super::ids::{main_path, new_attachment_id, radix36, task_url};
use super::writes::{write_task, Event, MainWrite, Row};
use super::{ApiError, ApiResult, Params, ResponseBudget, MAX_INLINE_BINARY, MAX_INLINE_BYTES, TASK_TYPE};
use crate::access::now_ms;
use crate::attachments::{has_room, Reservation, TOO_MANY_ATTACHMENTS, UPLOAD_IN_PROGRESS};
use crate::rows::{inline_bytes, MainView};
use crate::AppState;

/// The `data.code` of a `task.create_attachment` refused because the task's
/// inline values would pass `max_inline_bytes_per_entity` together.
pub const TOO_MANY_ATTACHMENT_BYTES: &str = "TOO_MANY_ATTACHMENT_BYTES";

/// "json, markdown, text, url, binary": the kinds, as refusals name them.
fn kinds() -> String {
    ATTACHMENT_KINDS.join(", ")
}

/// A validated `task.create_attachment` request.
pub struct AttachmentInput {
    pub(super) task_id: String,
    pub(super) key: String,
    pub(super) kind: AttachmentKind,
    pub(super) value: Option<Value>,
    pub(super) content: Option<String>,
    pub(super) url: Option<String>,
    pub(super) mime_type: Option<String>,
    pub(super) size: Option<u64>,
    pub(super) data: Option<Vec<u8>>,
}

/// http(s) URLs with a host; never fetched.
pub(super) fn valid_url(s: &str) -> bool {
    match s.parse::<axum::http::Uri>() {
        Ok(uri) => {
            matches!(uri.scheme_str(), Some("http" | "https"))
                && uri.host().is_some_and(|h| !h.is_empty())
                && !s.chars().any(char::is_whitespace)
        }
        Err(_) => false,
    }
}

pub(super) fn parse_attachment(p: &Params<'_>) -> ApiResult<AttachmentInput> {
    let task_id = p.string("taskId", 128)?.to_owned();
    let key = p.string("key", 100)?.to_owned();
    if key.chars().any(char::is_control) {
        return Err(ApiError::invalid("key", "key must not contain control characters"));
    }
    let kind = p
        .opt_enum("type", AttachmentKind::parse, &kinds())?
        .ok_or_else(|| ApiError::invalid("type", format!("type is required: one of {}", kinds())))?;
    let mime_type = p.opt_string("mimeType", 255)?.map(str::to_owned);
    if let Some(m) = &mime_type {
        ContentType::parse(m).map_err(|_| ApiError::invalid("mimeType", format!("invalid mimeType {m:?}")))?;
    }
    let size = match p.get("size") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .filter(|n| *n > 0)
                .ok_or_else(|| ApiError::invalid("size", "size must be a positive integer"))?,
        ),
    };
    let content = p.opt_str("content")?.map(str::to_owned);
    let url = p.opt_str("url")?.map(str::to_owned);
    let data = match p.opt_str("data")? {
        None => None,
        Some(b64) => {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .map_err(|_| ApiError::invalid("data", "data must be base64"))?;
            if bytes.len() > MAX_INLINE_BINARY {
                return Err(ApiError::invalid(
                    "data",
                    format!(
                        "data is over {MAX_INLINE_BINARY} bytes: upload it to /_electric/entities/task/{task_id}/attachments with a key field"
                    ),
                ));
            }
            Some(bytes)
        }
    };
    let value = p.present("value").then(|| p.get("value").cloned().unwrap_or(Value::Null));
    // Each field belongs to the types that use it; one meant for another type is a mistake worth reporting.
    let misplaced = |field: &str, kinds: &[AttachmentKind]| -> ApiResult<()> {
        if p.present(field) && !kinds.contains(&kind) {
            return Err(ApiError::invalid(field, format!("{field} is not used by {} attachments", kind.as_str())));
        }
        Ok(())
    };
    misplaced("value", &[AttachmentKind::Json])?;
    misplaced("content", &[AttachmentKind::Markdown, AttachmentKind::Text])?;
    misplaced("url", &[AttachmentKind::Url, AttachmentKind::Binary])?;
    misplaced("data", &[AttachmentKind::Binary])?;
    match kind {
        AttachmentKind::Json => {
            let v =
                value.as_ref().ok_or_else(|| ApiError::invalid("value", "JSON attachments require a value field"))?;
            // Counted as it would be written, without writing it.
            if super::budget::json_bytes(v) > MAX_INLINE_BYTES as u64 {
                return Err(ApiError::invalid("value", format!("value is over {MAX_INLINE_BYTES} bytes")));
            }
        }
        AttachmentKind::Markdown | AttachmentKind::Text => {
            let c = content.as_ref().ok_or_else(|| {
                ApiError::invalid("content", format!("{} attachments require a content field", kind.as_str()))
            })?;
            if c.len() > MAX_INLINE_BYTES {
                return Err(ApiError::invalid("content", format!("content is over {MAX_INLINE_BYTES} bytes")));
            }
        }
        AttachmentKind::Url => {
            url.as_ref().ok_or_else(|| ApiError::invalid("url", "URL attachments require a url field"))?;
        }
        AttachmentKind::Binary => {}
    }
    if let Some(u) = &url {
        if !valid_url(u) {
            return Err(ApiError::invalid("url", "url must be an http or https URL"));
        }
    }
    if let (Some(bytes), Some(declared)) = (&data, size) {
        if bytes.len() as u64 != declared {
            return Err(ApiError::invalid("size", format!("size is {declared} but data holds {} bytes", bytes.len())));
        }
    }
    Ok(AttachmentInput { task_id, key, kind, value, content, url, mime_type, size, data })
}

/// The keyed, complete attachments of task `task_id`'s view: key → entry.
/// An entry naming a stream other than the one derived for it is no attachment.
pub(super) fn keyed<'v>(view: &'v MainView, task_id: &str) -> impl Iterator<Item = (&'v str, &'v ManifestEntry)> {
    let url = task_url(task_id);
    view.by_name.iter().filter_map(move |(name, id)| {
        let url = url.as_ref()?;
        view.manifest.get(id).filter(|e| usable(url, e)).map(|e| (name.as_str(), e))
    })
}

/// Complete, and pointing at its own bytes (see [`ManifestEntry::bytes_path`]).
pub(super) fn usable(url: &EntityUrl, e: &ManifestEntry) -> bool {
    e.status == AttachmentStatus::Complete && e.names_its_own_stream(url)
}

/// `/principal/user%3Aalice` → `user:alice` (the form the task API shows).
pub(super) fn principal_key_of(url: &str) -> String {
    url.strip_prefix("/principal/")
        .and_then(|encoded| attache_core::principal::percent_decode_strict(encoded).ok())
        .unwrap_or_else(|| url.to_owned())
}

/// An attachment as the task API shows it. Uploads (no `taskType`) are binary.
pub fn attachment_json(task_id: &str, key: &str, e: &ManifestEntry) -> Value {
    let kind = kind_of(e);
    let mut out = Map::new();
    out.insert("id".into(), json!(e.id));
    out.insert("taskId".into(), json!(task_id));
    out.insert("key".into(), json!(key));
    out.insert("type".into(), json!(kind.as_str()));
    match kind {
        AttachmentKind::Json => {
            out.insert("value".into(), e.ext.get("value").cloned().unwrap_or(Value::Null));
        }
        AttachmentKind::Markdown | AttachmentKind::Text => {
            out.insert("content".into(), e.ext.get("content").cloned().unwrap_or(json!("")));
        }
        AttachmentKind::Url | AttachmentKind::Binary => {
            if let Some(u) = e.ext.get("url") {
                out.insert("url".into(), u.clone());
            }
        }
    }
    if let Some(size) = e.ext.get("size").cloned().or_else(|| e.byte_length.map(|n| json!(n))) {
        out.insert("size".into(), size);
    }
    if kind == AttachmentKind::Binary || e.mime_type != kind.default_mime() {
        out.insert("mimeType".into(), json!(e.mime_type));
    }
    if e.byte_length.is_some() {
        out.insert("streamPath".into(), json!(e.stream_path));
        if let Some(sha) = &e.sha256 {
            out.insert("sha256".into(), json!(sha));
        }
    }
    if let Some(by) = &e.created_by {
        out.insert("createdBy".into(), json!(principal_key_of(by)));
    }
    out.insert("createdAt".into(), json!(e.created_at));
    out.insert("updatedAt".into(), e.ext.get("updatedAt").cloned().unwrap_or_else(|| json!(e.created_at)));
    Value::Object(out)
}

/// The attachment's type; uploads (no `taskType`) are binary.
fn kind_of(e: &ManifestEntry) -> AttachmentKind {
    e.ext.get("taskType").and_then(Value::as_str).and_then(AttachmentKind::parse).unwrap_or(AttachmentKind::Binary)
}

/// Writes `bytes` as the closed attachment stream at `path`.
pub(super) async fn write_bytes(
    state: &AppState,
    who: &PrincipalKey,
    path: &str,
    mime: &str,
    bytes: Vec<u8>,
) -> ApiResult<()> {
    state
        .store
        .create(CreateStream {
            path: StreamPath::new(path).map_err(ApiError::internal)?,
            content_type: ContentType::parse(mime).ok(),
            ttl: None,
            expires_at: None,
            closed: true,
            initial: bytes.into(),
            fork: None,
            owner: Some(who.to_string()),
            take_kept_path: true,
        })
        .await?;
    Ok(())
}

/// Is the task still the running life we checked? A deletion may have
/// finished while we waited for the task lock (or the task been purged and created anew).
async fn still_running(state: &AppState, entity: &EntityRecord) -> bool {
    state
        .registry
        .entity_shared(&entity.url)
        .await
        .is_some_and(|e| e.is_running() && e.incarnation == entity.incarnation)
}

/// The entry `key` names in the task's view, and where the view ends: a
/// write decided from it is guarded from there (`write_task`). Only for a
/// caller that holds the key's lock (no write of the key is in flight).
async fn current_entry_at(
    state: &AppState,
    task_id: &str,
    key: &str,
) -> ApiResult<(Option<ManifestEntry>, attache_core::Offset)> {
    let view = state.views.get(state.store.as_ref(), &main_path(task_id)).await?;
    Ok((view.by_name.get(key).and_then(|id| view.manifest.get(id)).cloned(), view.tail()))
}

/// The id of the entry `key` names in the task's view (no copy of the entry).
async fn current_id(state: &AppState, task_id: &str, key: &str) -> ApiResult<Option<String>> {
    let view = state.views.get(state.store.as_ref(), &main_path(task_id)).await?;
    Ok(view.by_name.get(key).filter(|id| view.manifest.contains_key(*id)).cloned())
}

/// Holds the attachment id behind `key` while a task-face write of it is
/// decided and placed, with the key's lock (`attachments::hold_id`): no
/// upload of that id begins or commits meanwhile, and while one runs (a
/// keyed upload through the entity routes) the write is refused (-32602,
/// `data.code` `UPLOAD_IN_PROGRESS`): its final row would undo the write.
/// Given back with the key's lock, before the sync: the next write of the
/// key waits for the lock, never meets this hold. `None` for an id no
/// upload can have (not one the server derives an address for).
async fn hold_key<'s>(state: &'s AppState, task_id: &str, key: &str, id: &str) -> ApiResult<Option<Reservation<'s>>> {
    if validate_attachment_id(id).is_err() {
        return Ok(None);
    }
    let url = EntityUrl::new(TASK_TYPE, task_id).map_err(ApiError::internal)?;
    match crate::attachments::hold_id(state, &url, id, crate::attachments::WhileOpen::Refuse).await {
        Ok(held) => Ok(Some(held)),
        Err(e) if e.refusal().code == UPLOAD_IN_PROGRESS => Err(upload_in_progress(task_id, key)),
        Err(e) => Err(e),
    }
}

/// Room in the task for `entry`, decided against its view (nothing written
/// when there is none). A new attachment (for a key the task does not hold)
/// needs the task to hold fewer than `max_attachments_per_entity`
/// attachments (every manifest entry counts, uploads' pending and failed
/// rows too): else -32602, `data.code` `TOO_MANY_ATTACHMENTS`. And its inline
/// values ([`inline_bytes`]) must fit beside the task's others in
/// `max_inline_bytes_per_entity`, a replaced version's given back first:
/// else -32602, `data.code` `TOO_MANY_ATTACHMENT_BYTES`. A value no larger
/// than the one it replaces always fits, so a task over the bound (a lower
/// bound at a restart) can shrink.
async fn room_for(state: &AppState, task_id: &str, key: &str, entry: &ManifestEntry, new_key: bool) -> ApiResult<()> {
    let view = state.views.get(state.store.as_ref(), &main_path(task_id)).await?;
    let max = state.config.max_attachments_per_entity;
    if new_key && !has_room(&view, &entry.id, max) {
        return Err(ApiError::rejected(
            format!(
                "Task {task_id} holds {} attachments; a task holds at most {max} (max_attachments_per_entity): \
                 delete attachments it no longer needs (task.delete_attachment, or DELETE \
                 /_electric/entities/task/{task_id}/attachments/{{id}} for failed uploads) to make room",
                view.manifest.len()
            ),
            json!({ "taskId": task_id, "key": key, "code": TOO_MANY_ATTACHMENTS, "limit": max }),
        ));
    }
    let limit = state.config.max_inline_bytes_per_entity;
    let size = inline_bytes(entry);
    let replaced = view.manifest.get(&entry.id).map_or(0, inline_bytes);
    let others = view.inline_bytes().saturating_sub(replaced);
    if size <= replaced || others.saturating_add(size) <= limit {
        return Ok(());
    }
    Err(ApiError::rejected(
        format!(
            "Task {task_id}'s other attachments hold {others} bytes of inline values and this one {size}; \
             a task holds at most {limit} together (max_inline_bytes_per_entity): delete attachments or \
             replace them with smaller values to make room, or send large content as bytes (type binary \
             with data, or an upload to /_electric/entities/task/{task_id}/attachments), which is kept \
             in its own stream and not counted"
        ),
        json!({
            "taskId": task_id,
            "key": key,
            "code": TOO_MANY_ATTACHMENT_BYTES,
            "limit": limit,
            "held": others,
            "size": size,
        }),
    ))
}

/// Creates or replaces the attachment `input.key` of a task. A replacement
/// keeps the id and createdAt and rewrites every other field, so nothing of
/// the old type survives. Returns what the caller needs of the entry written.
pub(super) async fn put_attachment(state: &AppState, who: &PrincipalKey, input: AttachmentInput) -> ApiResult<Written> {
    let task_id = input.task_id.as_str();
    let entity = task_entity(state, who, task_id, Permission::Write, Missing::TaskNotFound).await?;
    if !entity.is_running() {
        return Err(task_stopped(task_id));
    }
    let cell = state.tasks.cell(task_id);
    let shared = cell.order.read().await;
    let incarnation = entity.incarnation.as_deref();
    if !still_running(state, &entity).await {
        drop(shared);
        drop(cell);
        return Err(task_missing(Missing::TaskNotFound, task_id));
    }
    // Released on drop, on every path: an early return leaves no lock entry behind.
    let claim = cell.claim_key(&input.key);
    // Held until the write is durable: the next write of the key decides from
    // a view that shows this one, so its guard (below) never meets it.
    let key_guard = claim.lock().await;
    // A replacement of an attachment being uploaded waits for the upload; read again (below) under the hold.
    let held_id = current_id(state, task_id, &input.key).await?;
    let held = match &held_id {
        Some(id) => hold_key(state, task_id, &input.key, id).await?,
        None => None,
    };
    let url = EntityUrl::new(TASK_TYPE, task_id).map_err(ApiError::internal)?;
    let mime = input.mime_type.clone().unwrap_or_else(|| input.kind.default_mime().to_owned());
    // The bytes, once written: the id they were written for and the stream that holds them.
    let mut written_bytes: Option<(String, String, u64)> = None;
    let mut attempt = 0;
    let outcome = loop {
        let (existing, since) = match current_entry_at(state, task_id, &input.key).await {
            Ok(read) => read,
            Err(e) => break Err(e),
        };
        // The key now names another attachment than the one held (another instance replaced it).
        if held_id.is_some() && existing.as_ref().map(|e| &e.id) != held_id.as_ref() {
            break Err(write_conflict(task_id, &input.key));
        }
        // An upload of the id began (through another instance) since the check.
        if existing.as_ref().is_some_and(|e| e.status == AttachmentStatus::Pending) {
            break Err(upload_in_progress(task_id, &input.key));
        }
        let decided = decide_put(state, who, &input, &url, &mime, existing.as_ref(), &mut written_bytes).await;
        let (entry, old_bytes, guard_key, stored_bytes) = match decided {
            Ok(d) => d,
            Err(e) => break Err(e),
        };
        // The entry goes to the write (and then to the view); what the answer needs is kept.
        let written = Written {
            id: entry.id.clone(),
            created_at: entry.created_at.clone(),
            bytes_stream: entry.byte_length.map(|_| entry.stream_path.clone()),
        };
        let row = Row::Upsert { entry: Box::new(entry), insert: existing.is_none() };
        let event = Event::new(
            "task.attachment_created",
            task_id,
            json!({
                "taskId": task_id,
                "key": input.key,
                "type": input.kind.as_str(),
                "attachmentId": written.id,
                "instanceId": who.to_string(),
                "timestamp": now_ms(),
            }),
            json!({ "createdBy": who.to_string() }),
        );
        let guard = RowGuard { key: guard_key, since };
        match write_guarded(state, task_id, &input.key, incarnation, row, event, guard, &mut attempt).await {
            Ok(true) => break Ok((written, old_bytes, stored_bytes)),
            Ok(false) => {}
            Err(e) => break Err(e),
        }
    };
    drop(held);
    drop(key_guard);
    drop(shared);
    drop(claim);
    drop(cell);
    let (written, old_bytes, stored_bytes) = match outcome {
        Ok(done) => done,
        Err(e) => {
            // Bytes no row names go with the refusal.
            if let Some((_, path, id)) = written_bytes {
                let _ = state.store.delete_id(&path, id).await;
            }
            return Err(e);
        }
    };
    // The old version's bytes go once the row points away from them: to a new
    // version's stream, or to none (a JSON, text or URL attachment keeps no
    // bytes, and its nominal stream path is the old bytes' own address:
    // kept, they stayed readable there after the replacement and its delete).
    if let Some((old, id)) = old_bytes.filter(|(old, _)| written.bytes_stream.as_ref() != Some(old)) {
        let _ = state.store.delete_id(&old, id).await;
    }
    state.metrics.attachment_created(input.kind.as_str(), stored_bytes);
    Ok(written)
}

/// What a put wrote, as far as its caller needs it: the attachment's id and
/// creation time (`task.create_attachment` answers them) and its bytes'
/// stream (`None`: the attachment keeps no bytes).
pub(super) struct Written {
    pub(super) id: String,
    pub(super) created_at: String,
    bytes_stream: Option<String>,
}

/// What a put of `input` writes, decided against `existing` (the entry its
/// key names now): the entry, the old version's bytes to delete once the
/// row points away from them (their address and the stream there now), the
/// key its write is guarded by (the entry's row key, or for a new key its
/// name, so that two creations of one name on two instances meet), and the
/// bytes it stores. The bytes of `input.data` are written once, for the id
/// first decided (`written`); a later decision for another id (another
/// instance created the key meanwhile) is a write conflict.
async fn decide_put(
    state: &AppState,
    who: &PrincipalKey,
    input: &AttachmentInput,
    url: &EntityUrl,
    mime: &str,
    existing: Option<&ManifestEntry>,
    written: &mut Option<(String, String, u64)>,
) -> ApiResult<(ManifestEntry, Option<(String, u64)>, String, u64)> {
    let task_id = input.task_id.as_str();
    let now = now_ms();
    let (id, created_at) = match existing {
        Some(e) => (e.id.clone(), e.created_at.clone()),
        None => match written {
            // Bytes already written for a new id: keep it.
            Some((id, _, _)) => (id.clone(), timestamp(now)),
            None => (new_attachment_id(), timestamp(now)),
        },
    };
    if written.as_ref().is_some_and(|(wid, _, _)| *wid != id) {
        return Err(write_conflict(task_id, &input.key));
    }
    let mut ext = Map::new();
    ext.insert("name".into(), json!(input.key));
    ext.insert("taskType".into(), json!(input.kind.as_str()));
    ext.insert("updatedAt".into(), json!(timestamp(now)));
    let mut stored_bytes = 0u64;
    if let Some(v) = &input.value {
        stored_bytes += super::budget::json_bytes(v);
        ext.insert("value".into(), v.clone());
    }
    if let Some(c) = &input.content {
        stored_bytes += c.len() as u64;
        ext.insert("content".into(), json!(c));
    }
    if let Some(u) = &input.url {
        ext.insert("url".into(), json!(u));
    }
    if let Some(s) = input.size {
        ext.insert("size".into(), json!(s));
    }
    // The old version's bytes, at the address derived for them (a row naming another is followed nowhere).
    let old_bytes = existing.filter(|e| e.byte_length.is_some()).and_then(|e| e.bytes_path(url));
    // Which stream holds them now: that one goes once the row points away, never one made at its path since.
    let old_bytes = match old_bytes {
        Some(path) => state.store.head(&path).await.ok().map(|info| (path, info.id)),
        None => None,
    };
    let mut entry = ManifestEntry {
        key: ManifestEntry::row_key(&id),
        kind: "attachment".into(),
        id: id.clone(),
        stream_path: url.attachment_stream(&id),
        status: AttachmentStatus::Complete,
        // Electric's manifest rows always name a subject; a task attachment is context for its task.
        subject: Some(Subject { kind: "context".into(), key: input.key.clone() }),
        role: Role::Output,
        mime_type: mime.to_owned(),
        filename: None,
        byte_length: None,
        sha256: None,
        created_at,
        created_by: Some(who.url()),
        error: None,
        meta: None,
        ext,
    };
    room_for(state, task_id, &input.key, &entry, existing.is_none()).await?;
    // Binary values get a stream of their own (the old one goes after): the caller's to hold.
    let _room = match input.data {
        Some(_) => Some(crate::streams::stream_room(state, who, 1)?),
        None => None,
    };
    if let Some(bytes) = &input.data {
        stored_bytes += bytes.len() as u64;
        entry.byte_length = Some(bytes.len() as u64);
        entry.sha256 = Some(hex::encode(Sha256::digest(bytes)));
        match written {
            Some((_, path, _)) => entry.stream_path = path.clone(),
            None => {
                // A new version of the bytes gets its own stream; the old one goes once the row points away from it.
                if old_bytes.as_ref().is_some_and(|(old, _)| *old == entry.stream_path)
                    || state.store.head(&entry.stream_path).await.is_ok()
                {
                    let version = radix36(rand::random::<u64>(), BYTES_VERSION_LEN);
                    entry.stream_path = versioned_attachment_stream(url, &id, &version)
                        .ok_or_else(|| ApiError::internal("a bytes version is base-36 digits"))?;
                }
                write_bytes(state, who, &entry.stream_path, mime, bytes.clone()).await?;
                let stream = state.store.head(&entry.stream_path).await?.id;
                *written = Some((id.clone(), entry.stream_path.clone(), stream));
            }
        }
    }
    let guard_key = match existing {
        Some(e) => ManifestEntry::row_key(&e.id),
        None => format!("task-key:{}", input.key),
    };
    Ok((entry, old_bytes, guard_key, stored_bytes))
}

/// A task-face write of `key` met another write of it that came between its
/// decision and its commit (on PostgreSQL, through another instance), again
/// and again; nothing was written. -32602 with `data.code` `WRITE_CONFLICT`:
/// the client may try again.
fn write_conflict(task_id: &str, key: &str) -> ApiError {
    ApiError::rejected(
        format!("Attachment '{key}' of task {task_id} was changed by another request meanwhile; try again"),
        json!({ "taskId": task_id, "key": key, "code": WRITE_CONFLICT }),
    )
}

/// -32602 `UPLOAD_IN_PROGRESS`: an upload of the attachment `key` names runs
/// (or its delete does); its final row would undo this write.
fn upload_in_progress(task_id: &str, key: &str) -> ApiError {
    ApiError::rejected(
        format!("Attachment '{key}' of task {task_id} is being uploaded (or deleted); try again once that is done"),
        json!({ "taskId": task_id, "key": key, "code": UPLOAD_IN_PROGRESS }),
    )
}

/// One guarded write of a task attachment's row and its event, decided from
/// the view up to `guard.since`: `Ok(true)` written; `Ok(false)` another
/// write of the key came between, so the caller reads and decides again
/// (after a backoff); past [`CONDITIONAL_ATTEMPTS`] that is -32602
/// `WRITE_CONFLICT`. `attempt` counts the tries. Tests hold a request
/// between its decision and this write (`pause::TASK_ATTACHMENT_WRITE`).
#[allow(clippy::too_many_arguments)]
async fn write_guarded(
    state: &AppState,
    task_id: &str,
    key: &str,
    incarnation: Option<&str>,
    row: Row,
    event: Event,
    guard: RowGuard,
    attempt: &mut u32,
) -> ApiResult<bool> {
    crate::pause::at(state, crate::pause::TASK_ATTACHMENT_WRITE).await;
    let written =
        write_task(state, task_id, incarnation, None, vec![row], vec![event], MainWrite::Append, Some(guard)).await;
    match written.await {
        Ok(()) => Ok(true),
        Err(e) if e == moved() => {
            *attempt += 1;
            if *attempt == CONDITIONAL_ATTEMPTS {
                return Err(write_conflict(task_id, key));
            }
            tokio::time::sleep(std::time::Duration::from_millis(1 << *attempt)).await;
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// What `write_task` answers when its guard found another write of the key
/// since the decision (`StoreError::Moved`): the caller reads and decides again.
pub(super) fn moved() -> ApiError {
    ApiError::rejected("moved", json!({ "code": WRITE_CONFLICT }))
}

/// The code of [`write_conflict`].
pub const WRITE_CONFLICT: &str = "WRITE_CONFLICT";

/// How often a task-face write of an attachment reads and decides again when another write of its key came between.
const CONDITIONAL_ATTEMPTS: u32 = 8;

pub(super) async fn create_attachment(state: &AppState, who: &PrincipalKey, p: &Params<'_>) -> ApiResult<Value> {
    let input = parse_attachment(p)?;
    let (task_id, key, kind) = (input.task_id.clone(), input.key.clone(), input.kind);
    let entry = put_attachment(state, who, input).await?;
    Ok(json!({
        "id": entry.id,
        "taskId": task_id,
        "key": key,
        "type": kind.as_str(),
        "createdAt": entry.created_at,
    }))
}

/// The attachment `key` of a task `who` may read, or `None`; its value is
/// taken from `budget` before it is copied (refused when over it).
pub(super) async fn find_attachment(
    state: &AppState,
    who: &PrincipalKey,
    task_id: &str,
    key: &str,
    budget: &ResponseBudget,
) -> ApiResult<Option<Value>> {
    if task_entity(state, who, task_id, Permission::Read, Missing::TaskNotFound).await.is_err() {
        return Ok(None);
    }
    let Some(url) = task_url(task_id) else { return Ok(None) };
    let view = state.views.get(state.store.as_ref(), &main_path(task_id)).await?;
    let Some(entry) = view.by_name.get(key).and_then(|id| view.manifest.get(id)).filter(|e| usable(&url, e)) else {
        return Ok(None);
    };
    budget.take(entry)?;
    Ok(Some(attachment_json(task_id, key, entry)))
}

pub(super) async fn get_attachment(
    state: &AppState,
    who: &PrincipalKey,
    p: &Params<'_>,
    budget: &ResponseBudget,
) -> ApiResult<Value> {
    let task_id = p.string("taskId", 128)?;
    let key = p.string("key", 100)?;
    match find_attachment(state, who, task_id, key, budget).await? {
        Some(found) => Ok(found),
        None => Err(ApiError::rejected(
            format!("Attachment with key '{key}' not found for task {task_id}"),
            json!({ "taskId": task_id, "key": key }),
        )),
    }
}

/// Ordered by creation time, then id: stable across calls and upserts (an
/// upsert keeps createdAt). Only the page asked for is copied, each value
/// taken from `budget` first.
pub(super) async fn list_attachments(
    state: &AppState,
    who: &PrincipalKey,
    p: &Params<'_>,
    budget: &ResponseBudget,
) -> ApiResult<Value> {
    let task_id = p.string("taskId", 128)?;
    let kind = p.opt_enum("type", AttachmentKind::parse, &kinds())?;
    let limit = p.opt_int("limit", 1, 100)?.unwrap_or(50) as usize;
    let offset = p.opt_int("offset", 0, i64::MAX)?.unwrap_or(0) as usize;
    task_entity(state, who, task_id, Permission::Read, Missing::TaskNotFound).await?;
    let view = state.views.get(state.store.as_ref(), &main_path(task_id)).await?;
    let mut all: Vec<(&str, &ManifestEntry)> =
        keyed(&view, task_id).filter(|(_, e)| kind.is_none_or(|k| kind_of(e) == k)).collect();
    all.sort_by(|(_, a), (_, b)| a.created_at.cmp(&b.created_at).then_with(|| a.id.cmp(&b.id)));
    let total = all.len();
    let mut page = Vec::with_capacity(limit.min(total));
    for (key, e) in all.into_iter().skip(offset).take(limit) {
        budget.take(e)?;
        page.push(attachment_json(task_id, key, e));
    }
    Ok(json!({ "attachments": page, "totalCount": total, "hasMore": offset.saturating_add(limit) < total }))
}

/// All or nothing: when any item is missing (or its task is not readable),
/// the call fails with -32602 naming the first missing item in `data.taskId`
/// and `data.key`, and every missing item in `data.missing`. Values are
/// taken from `budget` as they are loaded: the first over it fails the call.
pub(super) async fn get_attachments_batch(
    state: &AppState,
    who: &PrincipalKey,
    p: &Params<'_>,
    budget: &ResponseBudget,
) -> ApiResult<Value> {
    let requests = match p.get("requests") {
        Some(Value::Array(items)) if !items.is_empty() && items.len() <= 100 => items,
        _ => return Err(ApiError::invalid("requests", "requests must be an array of 1 to 100 {taskId, key} items")),
    };
    let mut wanted = Vec::with_capacity(requests.len());
    for item in requests {
        let Value::Object(m) = item else {
            return Err(ApiError::invalid("requests", "each request is an object {taskId, key}"));
        };
        let ip = Params(m);
        wanted.push((ip.string("taskId", 128)?.to_owned(), ip.string("key", 100)?.to_owned()));
    }
    let mut found = Vec::with_capacity(wanted.len());
    let mut missing = Vec::new();
    for (task_id, key) in &wanted {
        match find_attachment(state, who, task_id, key, budget).await? {
            Some(attachment) => found.push(attachment),
            None => missing.push(json!({ "taskId": task_id, "key": key })),
        }
    }
    if let Some(first) = missing.first() {
        let (t, k) = (first["taskId"].as_str().unwrap_or(""), first["key"].as_str().unwrap_or(""));
        return Err(ApiError::rejected(
            format!("Attachment not found: {t}/{k}"),
            json!({ "taskId": t, "key": k, "missing": missing }),
        ));
    }
    Ok(json!({ "attachments": found }))
}

pub(super) async fn delete_attachment(state: &AppState, who: &PrincipalKey, p: &Params<'_>) -> ApiResult<Value> {
    let task_id = p.string("taskId", 128)?;
    let key = p.string("key", 100)?;
    let not_found = || {
        ApiError::rejected(
            format!("Attachment '{key}' not found for task {task_id}"),
            json!({ "taskId": task_id, "key": key }),
        )
    };
    let entity = task_entity(state, who, task_id, Permission::Write, Missing::TaskNotFound).await.map_err(|e| {
        if e == task_missing(Missing::TaskNotFound, task_id) {
            not_found()
        } else {
            e
        }
    })?;
    if !entity.is_running() {
        return Err(task_stopped(task_id));
    }
    let cell = state.tasks.cell(task_id);
    let shared = cell.order.read().await;
    let incarnation = entity.incarnation.as_deref();
    if !still_running(state, &entity).await {
        drop(shared);
        drop(cell);
        return Err(not_found());
    }
    let claim = cell.claim_key(key);
    // Held until the delete is durable: the next write of the key decides from a view that shows it.
    let key_guard = claim.lock().await;
    let Some(found) = current_entry_at(state, task_id, key).await?.0 else {
        return Err(not_found());
    };
    // A delete of an attachment being uploaded is refused: the upload's final
    // row would bring it back. Held until the delete row is committed; read again under the hold.
    let held = hold_key(state, task_id, key, &found.id).await?;
    let now = now_ms();
    let mut attempt = 0;
    let outcome = loop {
        let (entry, since) = match current_entry_at(state, task_id, key).await {
            // An upload of the id began (through another instance) since the check.
            Ok((Some(entry), _)) if entry.id == found.id && entry.status == AttachmentStatus::Pending => {
                break Err(upload_in_progress(task_id, key))
            }
            Ok((Some(entry), since)) if entry.id == found.id => (entry, since),
            // Deleted, or replaced by another attachment, through another instance meanwhile.
            Ok((Some(_), _)) => break Err(write_conflict(task_id, key)),
            Ok((None, _)) => break Err(not_found()),
            Err(e) => break Err(e),
        };
        // Only the address derived for the bytes is deleted, never a path the row
        // names; and only the stream there now, never one made at it after the row.
        // An attachment with no bytes may still have a stream at its own address:
        // the bytes of a binary version it replaced, kept by releases before
        // session 14; they go with it.
        let url = task_url(task_id);
        let path = match entry.byte_length {
            Some(_) => url.and_then(|url| entry.bytes_path(&url)),
            None => url.map(|url| url.attachment_stream(&entry.id)),
        };
        let bytes = match path {
            Some(path) => state.store.head(&path).await.ok().map(|info| (path, info.id)),
            None => None,
        };
        let row = Row::Delete { row_key: ManifestEntry::row_key(&entry.id) };
        let event = Event::new(
            // ClaudeBench's delete handler emits this type (with a dot), its create handler `task.attachment_created`.
            "task.attachment.deleted",
            task_id,
            json!({ "taskId": task_id, "key": key, "attachmentId": entry.id }),
            json!({ "deletedBy": who.to_string(), "deletedAt": timestamp(now) }),
        );
        let guard = RowGuard { key: ManifestEntry::row_key(&entry.id), since };
        match write_guarded(state, task_id, key, incarnation, row, event, guard, &mut attempt).await {
            Ok(true) => break Ok((entry, bytes)),
            Ok(false) => {}
            Err(e) => break Err(e),
        }
    };
    drop(held);
    drop(key_guard);
    drop(shared);
    drop(claim);
    drop(cell);
    let (entry, bytes) = outcome?;
    if let Some((path, id)) = bytes {
        let _ = state.store.delete_id(&path, id).await;
    }
    Ok(json!({ "id": entry.id, "taskId": task_id, "key": key, "deleted": true, "deletedAt": timestamp(now) }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_http_urls_are_accepted() {
        assert!(valid_url("https://docs.example.com/database-optimization-guide"));
        assert!(valid_url("http://localhost:8080/x?y=1"));
        for bad in ["ftp://x.org/a", "javascript:alert(1)", "file:///etc/passwd", "https://", "not a url", "/relative"]
        {
            assert!(!valid_url(bad), "{bad}");
        }
    }
}

//! An upload in progress: its id reserved (a second upload of the same id
//! waits its turn or is refused), its `pending` manifest row written as soon
//! as the id and subject are known before the bytes, and settled on every
//! path by one guard ([`Pending`]): the handler's success marks it settled,
//! any failure goes through [`Pending::fail`] (the refusal's row), and a
//! cancelled request (its client went away, at any await) leaves it to the
//! guard's drop, which settles the row in the background.

use std::collections::{HashMap, HashSet};

use attache_core::manifest::{validate_attachment_id, AttachmentStatus, ManifestEntry, MANIFEST, SUBJECT_REQUIRED};
use attache_core::state::{timestamp, ChangeEvent};
use attache_core::Offset;
use attache_core::{EntityUrl, PrincipalKey};
use attache_storage::{AppendRequest, EntityRecord, ReadFrom, RowGuard, StoreError, StreamAt};
use sha2::{Digest, Sha256};

use crate::access::{hold_life, now_ms};
use crate::error::{ApiError, ApiResult};
use crate::rows::{json_content_type, new_txid, not_running};
use crate::{AppState, StoreConfig};

use super::{bytes_fit, duplicate, has_room, too_many, Fields, INTERRUPTED};

/// Upload ids in flight, by attachment stream path: a second upload of the
/// same id is refused while the first runs, and so is a delete of it (or a
/// task-face write of its key): see [`hold_id`]. The `Notify` wakes the
/// closing of a resumable upload waiting for its id ([`Reservations::take_wait`]).
#[derive(Default)]
pub struct Reservations(
    pub(super) parking_lot::Mutex<HashSet<String>>,
    pub(super) parking_lot::Mutex<HashMap<String, OpenUpload>>,
    tokio::sync::Notify,
);

/// A resumable upload begun here (or found open at start-up) and not closed
/// yet, by stream path: what the expiry sweep looks at.
#[derive(Debug, Clone)]
pub struct OpenUpload {
    pub(super) entity: EntityUrl,
    pub(super) id: String,
}

/// An attachment id taken (by an upload, a delete, a task-face write of its
/// key, or the closing of a resumable upload), given back on drop.
pub struct Reservation<'a> {
    set: &'a Reservations,
    /// `None` once handed on ([`Reservation::hand_on`]).
    key: Option<String>,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if let Some(key) = &self.key {
            self.set.give_back(key);
        }
    }
}

impl Reservation<'_> {
    /// The reserved key, kept taken after this is dropped: the caller gives
    /// it back ([`Reservations::give_back`]) when it is done with the id.
    fn hand_on(&mut self) -> Option<String> {
        self.key.take()
    }
}

impl Reservations {
    pub(super) fn take(&self, key: &str) -> Option<Reservation<'_>> {
        self.0.lock().insert(key.to_owned()).then(|| Reservation { set: self, key: Some(key.to_owned()) })
    }

    /// Takes `key`, waiting for its holder to give it back: for a change
    /// that must happen (the closing of a resumable upload completes it) and
    /// that every holder lets through soon (a delete, a settling, an upload
    /// refused because the id is taken).
    pub(super) async fn take_wait(&self, key: &str) -> Reservation<'_> {
        loop {
            let given_back = self.2.notified();
            tokio::pin!(given_back);
            // Registered before the check: a give-back between the two is not missed.
            given_back.as_mut().enable();
            if let Some(reservation) = self.take(key) {
                return reservation;
            }
            given_back.await;
        }
    }

    fn give_back(&self, key: &str) {
        self.0.lock().remove(key);
        self.2.notify_waiters();
    }
}

/// 409 `UPLOAD_IN_PROGRESS`: the attachment is being uploaded (or another
/// request holds its id for a moment); a delete or a task-face write of it
/// waits for the upload to end.
pub fn upload_in_progress(id: &str) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::CONFLICT,
        UPLOAD_IN_PROGRESS,
        format!("Attachment \"{id}\" is being uploaded (or changed by another request); try again once it is done"),
    )
}

/// The refusal code of [`upload_in_progress`].
pub const UPLOAD_IN_PROGRESS: &str = "UPLOAD_IN_PROGRESS";

/// Takes attachment `id` of `entity` for a change that is not its upload (a
/// delete; a task-face write of its key): while the returned reservation
/// lives, no upload of `id` begins or commits on this instance, and no
/// resumable upload of it completes. Refused with [`upload_in_progress`]
/// while one runs: here (its id taken), or a `pending` row that is an upload
/// still going (on PostgreSQL, maybe on another instance: younger than
/// `upload_expiry`; a resumable upload whose stream is open). A `pending`
/// row an interrupted upload left, or whose bytes are all in (a closed
/// stream), is settled first, and the change then sees its outcome.
///
/// With [`WhileOpen::Abort`] (a `DELETE`), a resumable upload whose stream
/// is open is not refused: the caller ends it ([`open_resumable`]).
///
/// The rule this keeps: a delete never answers 200 for an attachment whose
/// upload then brings it back.
pub async fn hold_id<'s>(
    state: &'s AppState,
    entity: &EntityUrl,
    id: &str,
    open: WhileOpen,
) -> ApiResult<Reservation<'s>> {
    validate_attachment_id(id)?;
    let path = entity.attachment_stream(id);
    let reservation = state.uploads.take(&path).ok_or_else(|| upload_in_progress(id))?;
    if is_pending(state, entity, id).await? {
        let bytes_in = state.store.head(&path).await.is_ok_and(|info| info.closed);
        if bytes_in || abandoned(state, entity, id).await? {
            settle(state, entity, id).await;
        }
        if is_pending(state, entity, id).await? {
            if open == WhileOpen::Abort && open_resumable(state, entity, id).await?.is_some() {
                return Ok(reservation);
            }
            return Err(upload_in_progress(id));
        }
    }
    Ok(reservation)
}

/// What [`hold_id`] does with a resumable upload of the id whose stream is still open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhileOpen {
    /// 409 `UPLOAD_IN_PROGRESS`, as for any upload running (a task-face write of its key).
    Refuse,
    /// Let the caller end it (`DELETE`: its row and its stream go in one commit).
    Abort,
}

/// The stream of a resumable upload of attachment `id` not yet closed, if
/// there is one: a stream at the attachment's own address that takes
/// appends. Only a resumable upload makes one before its bytes are all in (a
/// multipart upload's stream is made with its `complete` row, in one commit).
pub async fn open_resumable(state: &AppState, entity: &EntityUrl, id: &str) -> ApiResult<Option<u64>> {
    match state.store.head(&entity.attachment_stream(id)).await {
        Ok(info) => Ok((!info.closed && info.blob.is_none()).then_some(info.id)),
        Err(StoreError::NotFound | StoreError::Gone) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

pub(super) async fn is_pending(state: &AppState, entity: &EntityUrl, id: &str) -> ApiResult<bool> {
    let view = state.views.get(state.store.as_ref(), &entity.main_stream()).await?;
    Ok(view.manifest.get(id).is_some_and(|e| e.status == AttachmentStatus::Pending))
}

/// An upload names what it is about, as Electric requires (its wording):
/// the entry as it will be written, or 400 `attachment subject is required`.
/// Checked once every field has arrived (a form may send the file first).
pub(super) fn with_subject(entry: ManifestEntry) -> ApiResult<ManifestEntry> {
    if entry.subject.is_none() {
        return Err(ApiError::bad_request(SUBJECT_REQUIRED));
    }
    Ok(entry)
}

pub(super) fn manifest_row(entry: &ManifestEntry, txid: &str) -> ApiResult<ChangeEvent> {
    let value = serde_json::to_value(entry).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let now = timestamp(now_ms());
    Ok(match entry.status {
        AttachmentStatus::Pending => ChangeEvent::insert(MANIFEST, &entry.key, value, txid, &now),
        _ => ChangeEvent::update(MANIFEST, &entry.key, value, txid, &now),
    })
}

/// The append of `entry` as an `insert` row (`first`: no row of this upload
/// before it) or an `update`, for a store call that writes it with other
/// changes (`create_blob_stream_and_append`).
pub(super) fn entry_append(
    entity: &EntityUrl,
    entry: &ManifestEntry,
    txid: &str,
    first: bool,
) -> ApiResult<AppendRequest> {
    let value = serde_json::to_value(entry).map_err(ApiError::internal)?;
    let now = timestamp(now_ms());
    let row = match first {
        true => ChangeEvent::insert(MANIFEST, &entry.key, value, txid, &now),
        false => ChangeEvent::update(MANIFEST, &entry.key, value, txid, &now),
    };
    let message = serde_json::to_vec(&row).map_err(ApiError::internal)?;
    Ok(AppendRequest::json_messages(entity.main_stream(), json_content_type(), &[message], false))
}

/// What a manifest write decided from the store's state does ([`write_decided`]).
pub(super) enum Decided<T> {
    /// Nothing to write: the answer is `T`.
    Answer(T),
    /// Write `row` only against what it was decided from: no other guarded
    /// write of its key at or past `since` (the tail of the view it was
    /// decided from) and, with `bytes`, the live stream at that path as seen
    /// (deleted in the same commit when it names one). Then the answer is `T`.
    Write { row: ChangeEvent, since: Offset, bytes: Option<StreamAt>, answer: T },
}

/// The compare-and-set loop of every manifest write decided from what the
/// store holds (a delete, an upload's rows, their settling): `decide` reads
/// (the view, the stream at the attachment's address) and says what to
/// write, and the row is written only against that
/// ([`StreamStore::append_guarded`](attache_storage::StreamStore::append_guarded),
/// guarded by the attachment's manifest key). When another write of the key
/// (on PostgreSQL perhaps through another instance), or a stream made or
/// deleted at the address, came between, it reads and decides again: at most
/// [`CONDITIONAL_ATTEMPTS`] times (a quarter of a second of backoff in all),
/// then `Ok(None)` and the caller answers 409 or leaves the row as it is.
/// `pause` (tests) holds the request between a decision and its write.
pub(super) async fn write_decided<T, Decide, Decision>(
    state: &AppState,
    entity: &EntityUrl,
    id: &str,
    pause: Option<&'static str>,
    mut decide: Decide,
) -> ApiResult<Option<T>>
where
    Decide: FnMut() -> Decision,
    Decision: std::future::Future<Output = ApiResult<Decided<T>>>,
{
    for attempt in 0..CONDITIONAL_ATTEMPTS {
        let (row, since, bytes, answer) = match decide().await? {
            Decided::Answer(answer) => return Ok(Some(answer)),
            Decided::Write { row, since, bytes, answer } => (row, since, bytes, answer),
        };
        if let Some(point) = pause {
            crate::pause::at(state, point).await;
        }
        let message = serde_json::to_vec(&row).map_err(ApiError::internal)?;
        let append = AppendRequest::json_messages(entity.main_stream(), json_content_type(), &[message], false);
        let guard = RowGuard { key: ManifestEntry::row_key(id), since };
        match state.store.append_guarded(append, guard, bytes).await {
            Ok(_) => return Ok(Some(answer)),
            Err(StoreError::Moved) => tokio::time::sleep(std::time::Duration::from_millis(1 << attempt)).await,
            Err(StoreError::Closed { .. }) => return Err(not_running()),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(None)
}

/// Settles the row this upload wrote (`mine`, its `pending` entry) with
/// `row` (its failed entry, or a retraction): only while the row of its id
/// is still that one. An instance that took the id over meanwhile (on
/// PostgreSQL, once this upload outlived `upload_expiry`) wrote its own row,
/// which is left as it is. Says whether the row is settled (written, or
/// found to be another upload's).
async fn settle_mine(state: &AppState, entity: &EntityUrl, mine: &ManifestEntry, row: ChangeEvent) -> bool {
    let row = &row;
    let written = write_decided(state, entity, &mine.id, None, move || async move {
        let view = state.views.get(state.store.as_ref(), &entity.main_stream()).await?;
        if view.manifest.get(&mine.id) != Some(mine) {
            return Ok(Decided::Answer(()));
        }
        Ok(Decided::Write { row: row.clone(), since: view.tail(), bytes: None, answer: () })
    })
    .await;
    match written {
        Ok(Some(())) => true,
        Ok(None) => {
            tracing::warn!(id = mine.id, "could not settle an upload's row: other writes of its id kept coming");
            false
        }
        Err(e) => {
            tracing::warn!(error = %e, id = mine.id, "could not settle an upload's row");
            false
        }
    }
}

/// Retracts the `pending` row `mine` of a refused upload (a delete row), if it is still its id's row.
pub(super) async fn retract(state: &AppState, entity: &EntityUrl, mine: &ManifestEntry, txid: &str) -> bool {
    let row = ChangeEvent::delete(MANIFEST, &mine.key, txid, &timestamp(now_ms()));
    settle_mine(state, entity, mine, row).await
}

/// Can `entry`'s id be (re)used? Free, or only a failed attempt is
/// recorded. A new id on an entity that holds `max_attachments_per_entity`
/// attachments is refused (409 `TOO_MANY_ATTACHMENTS`), and so is a `meta`
/// that does not fit in `max_inline_bytes_per_entity` (409 `TOO_MANY_ATTACHMENT_BYTES`).
pub(super) async fn id_is_free(state: &AppState, entity: &EntityUrl, entry: &ManifestEntry) -> ApiResult<bool> {
    let id = entry.id.as_str();
    let view = state.views.get(state.store.as_ref(), &entity.main_stream()).await?;
    let max = state.config.max_attachments_per_entity;
    if !has_room(&view, id, max) {
        return Err(too_many(entity, view.manifest.len(), max));
    }
    bytes_fit(&view, entity, entry, state.config.max_inline_bytes_per_entity)?;
    Ok(match view.manifest.get(id) {
        None => true,
        Some(e) => e.status == AttachmentStatus::Failed,
    })
}

/// An upload in progress: reserved id, and (`row`) its pending row written.
/// Dropped without [`Pending::settled`] or [`Pending::fail`] (the request was
/// cancelled, e.g. its client went away, at any await), it settles its row
/// in the background: complete when the bytes committed, failed (and the
/// stream removed) when they did not. Without it such a row stayed `pending`
/// for ever and its id was refused.
pub(super) struct Pending<'a> {
    reservation: Reservation<'a>,
    pub(super) entry: ManifestEntry,
    /// Whether the `pending` row was written (else the upload's first row is its outcome).
    pub(super) row: bool,
    /// The txid of the row that settles the upload (complete, failed or
    /// retracted), the one a one-shot upload answers with: a client waiting
    /// for it sees the final status, never only `pending`.
    pub(super) txid: String,
    /// The txid of the `pending` row, what a resumable upload answers with
    /// (its bytes come later, through the stream).
    pub(super) pending_txid: String,
    /// Set once the handler itself answered for the row.
    settled: Option<(AppState, EntityUrl)>,
}

impl Pending<'_> {
    /// The handler wrote the row's outcome (or handed the upload on): nothing to clean up.
    pub(super) fn settled(&mut self) {
        self.settled = None;
    }

    /// The upload failed with `err`: its pending row (if written) is settled
    /// as the refusal says, in the life the upload began in (purged
    /// meanwhile: nowhere). A refused request changes nothing (the row is
    /// retracted); an upload that broke off, or that the store failed, is
    /// recorded as `failed`, saying why. A row that cannot be written now is
    /// left to the drop guard (settled in the background).
    pub(super) async fn fail(mut self, state: &AppState, record: &EntityRecord, err: &ApiError) {
        let Some((_, entity)) = self.settled.clone() else { return };
        if !self.row {
            self.settled();
            return;
        }
        let Ok(_life) = hold_life(state, record).await else {
            self.settled();
            return;
        };
        let refusal = err.refusal();
        // A body that broke off or stopped coming (408) is an interrupted upload, not a refusal.
        let interrupted = refusal.code == INTERRUPTED || refusal.code == crate::http::BODY_READ_TIMEOUT;
        if refusal.status.is_client_error() && !interrupted {
            retract(state, &entity, &self.entry, &self.txid).await;
            self.settled();
            return;
        }
        let mut failed = self.entry.clone();
        failed.status = AttachmentStatus::Failed;
        failed.error = Some(refusal.message);
        let Ok(row) = manifest_row(&failed, &self.txid) else { return };
        if settle_mine(state, &entity, &self.entry, row).await {
            self.settled();
        }
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        let Some((state, entity)) = self.settled.take() else { return };
        if !self.row {
            return;
        }
        let id = self.entry.id.clone();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            // The id stays reserved until its row is settled: a new upload
            // of it meanwhile would be settled too (its row failed, its
            // fresh stream deleted by this settling's delete of the path).
            let key = self.reservation.hand_on();
            handle.spawn(async move {
                settle(&state, &entity, &id).await;
                if let Some(key) = key {
                    state.uploads.give_back(&key);
                }
                crate::pause::at(&state, crate::pause::UPLOAD_SETTLED).await;
            });
        }
    }
}

/// Settles a `pending` row no upload holds any more, from what the store
/// holds at the derived path: a closed blob stream completes it, a closed
/// resumable stream is finalized, an open one is a resumable upload still
/// going (left alone), and no stream at all fails it. Each outcome row is
/// written only against what it was decided from ([`write_decided`]): the
/// `failed` row only while no stream is at the path (a create sent before
/// an interruption that commits first, or a new upload's stream, makes it
/// decide again, and sees that stream), never over a row another write of
/// the id put there since. Idempotent.
pub async fn settle(state: &AppState, entity: &EntityUrl, id: &str) {
    /// What a settling found.
    enum Settled {
        Nothing,
        Completed,
        Failed,
        Closed,
        Open,
    }
    if validate_attachment_id(id).is_err() {
        return;
    }
    // The upload's stream is derived, never taken from the row.
    let path = &entity.attachment_stream(id);
    let settled = write_decided(state, entity, id, Some(crate::pause::SETTLE_WRITE), move || async move {
        let (entry, tail) = {
            let view = state.views.get(state.store.as_ref(), &entity.main_stream()).await?;
            (view.manifest.get(id).cloned(), view.tail())
        };
        let Some(entry) = entry.filter(|e| e.status == AttachmentStatus::Pending) else {
            return Ok(Decided::Answer(Settled::Nothing));
        };
        Ok(match state.store.head(path).await {
            Ok(info) if info.closed => match &info.blob {
                Some(blob) => {
                    let mut done = entry;
                    done.stream_path = path.clone();
                    done.status = AttachmentStatus::Complete;
                    done.sha256 = Some(blob.sha256.clone());
                    done.byte_length = Some(blob.len);
                    let row = manifest_row(&done, &new_txid())?;
                    Decided::Write { row, since: tail, bytes: None, answer: Settled::Completed }
                }
                None => Decided::Answer(Settled::Closed),
            },
            Ok(_) => Decided::Answer(Settled::Open),
            Err(_) => {
                let mut failed = entry;
                failed.stream_path = path.clone();
                failed.status = AttachmentStatus::Failed;
                failed.error = Some("upload interrupted: the bytes were not stored".into());
                let row = manifest_row(&failed, &new_txid())?;
                // Only while no live stream is at the path: nothing to delete after.
                let bytes = Some(StreamAt { path: path.clone(), id: None });
                Decided::Write { row, since: tail, bytes, answer: Settled::Failed }
            }
        })
    })
    .await;
    match settled {
        Ok(Some(Settled::Nothing)) => {}
        Ok(Some(Settled::Completed)) => {
            tracing::info!(entity = %entity, id, "completed an upload interrupted after its bytes were stored")
        }
        Ok(Some(Settled::Failed)) => tracing::info!(entity = %entity, id, "marked an interrupted upload failed"),
        Ok(Some(Settled::Closed)) => {
            let _ = finalize(state, entity, id).await;
        }
        // A resumable upload still going: the expiry sweep ends it if it is never closed.
        Ok(Some(Settled::Open)) => {
            state.uploads.1.lock().insert(path.clone(), OpenUpload { entity: entity.clone(), id: id.to_owned() });
        }
        Ok(None) => {
            tracing::warn!(entity = %entity, id, "could not settle an upload: other writes of its id kept coming")
        }
        Err(e) => tracing::warn!(error = %e, entity = %entity, id, "could not settle an upload"),
    }
}

/// Is the `pending` row of `id`, which no upload on this instance holds, one
/// an interrupted upload left? On the embedded store (one instance) it is. On
/// PostgreSQL another instance may be streaming that upload right now (our
/// reservations are in this process), so only a row older than
/// `upload_expiry` is taken for abandoned: settling a live one marked it
/// failed and deleted its path, and when that upload then finished it either
/// lost its 201'd row (retracted by the second upload's refusal) or its bytes.
async fn abandoned(state: &AppState, entity: &EntityUrl, id: &str) -> ApiResult<bool> {
    if state.config.store == StoreConfig::Embedded {
        return Ok(true);
    }
    let view = state.views.get(state.store.as_ref(), &entity.main_stream()).await?;
    let Some(entry) = view.manifest.get(id) else { return Ok(true) };
    let expiry = i64::try_from(state.config.upload_expiry.as_millis()).unwrap_or(i64::MAX);
    Ok(match chrono::DateTime::parse_from_rfc3339(&entry.created_at) {
        Ok(at) => at.timestamp_millis().saturating_add(expiry) <= now_ms(),
        // Rows are written with the server's timestamps; one that is not one is nobody's upload.
        Err(_) => true,
    })
}

/// Begins an upload: reserves its id and writes its `pending` row.
pub(super) async fn begin<'s>(
    state: &'s AppState,
    record: &EntityRecord,
    entity: &EntityUrl,
    id: &str,
    fields: &Fields,
    who: &PrincipalKey,
    part_type: Option<&str>,
) -> ApiResult<Pending<'s>> {
    let entry = fields.entry(entity, id, who, part_type)?;
    let mut pending = reserve(state, entity, entry).await?;
    {
        // The row goes only into the life the upload was authorized against.
        let _life = hold_life(state, record).await?;
        write_pending(state, entity, &pending).await?;
    }
    pending.row = true;
    Ok(pending)
}

/// Writes the `pending` row of an upload only against a view of the main
/// stream in which its id is free, guarded by its key from where that view
/// ends ([`StreamStore::append_guarded`](attache_storage::StreamStore::append_guarded)):
/// an upload of the same id that began on another instance meanwhile (its
/// `pending` row), or a delete, is seen before this row is written, never
/// after. 409 `DUPLICATE_ID` when the id is taken by then.
async fn write_pending(state: &AppState, entity: &EntityUrl, pending: &Pending<'_>) -> ApiResult<()> {
    let id = pending.entry.id.as_str();
    let written = write_decided(state, entity, id, None, move || async move {
        let view = state.views.get(state.store.as_ref(), &entity.main_stream()).await?;
        if view.manifest.get(id).is_some_and(|e| e.status != AttachmentStatus::Failed) {
            return Err(duplicate(id));
        }
        let max = state.config.max_attachments_per_entity;
        if !has_room(&view, id, max) {
            return Err(too_many(entity, view.manifest.len(), max));
        }
        bytes_fit(&view, entity, &pending.entry, state.config.max_inline_bytes_per_entity)?;
        let row = manifest_row(&pending.entry, &pending.pending_txid)?;
        Ok(Decided::Write { row, since: view.tail(), bytes: None, answer: () })
    })
    .await?;
    written.ok_or_else(|| upload_in_progress(id))
}

/// How many times a guarded write reads again after another write of its
/// key came between its read and its write (a quarter of a second of backoff in all).
pub(super) const CONDITIONAL_ATTEMPTS: u32 = 8;

/// Reserves the id of the upload of `entry`, writing no row: an upload
/// whose bytes are all in before its id is known writes only its outcome.
pub(super) async fn reserve<'s>(
    state: &'s AppState,
    entity: &EntityUrl,
    entry: ManifestEntry,
) -> ApiResult<Pending<'s>> {
    let id = entry.id.clone();
    let id = id.as_str();
    let reservation = state.uploads.take(&entry.stream_path).ok_or_else(|| duplicate(id))?;
    if !id_is_free(state, entity, &entry).await? {
        // A pending row no upload here holds (we hold the id now) may have
        // been left by an interrupted upload: settle it, then look again.
        if abandoned(state, entity, id).await? {
            settle(state, entity, id).await;
        }
        if !id_is_free(state, entity, &entry).await? {
            return Err(duplicate(id));
        }
    }
    Ok(Pending {
        reservation,
        entry,
        row: false,
        txid: new_txid(),
        pending_txid: new_txid(),
        settled: Some((state.clone(), entity.clone())),
    })
}

/// Completes the resumable upload `id` whose stream a client just closed,
/// holding its id meanwhile (waiting for a delete or a settling that holds
/// it): a delete then sees either the `pending` row (and answers 409) or the
/// `complete` one, never a `complete` row written after its delete row.
pub async fn finalize_closed(state: &AppState, entity: &EntityUrl, id: &str) -> ApiResult<Option<ManifestEntry>> {
    validate_attachment_id(id)?;
    let _held = state.uploads.take_wait(&entity.attachment_stream(id)).await;
    finalize(state, entity, id).await
}

/// Completes a resumable upload whose stream is closed: hashes the bytes and
/// writes the `complete` row, only against the `pending` row it read
/// ([`write_decided`]): a delete of the attachment meanwhile (on PostgreSQL
/// perhaps through another instance) is seen, and no `complete` row then
/// names bytes that are gone. Idempotent; called after the closing append
/// and at recovery. 409 `UPLOAD_IN_PROGRESS` when other writes of the id
/// kept coming.
pub async fn finalize(state: &AppState, entity: &EntityUrl, id: &str) -> ApiResult<Option<ManifestEntry>> {
    // A resumable upload's bytes are at the attachment's own stream, whatever the row says.
    validate_attachment_id(id)?;
    let path = &entity.attachment_stream(id);
    let done = write_decided(state, entity, id, Some(crate::pause::FINALIZE_WRITE), move || async move {
        let (entry, tail) = {
            let view = state.views.get(state.store.as_ref(), &entity.main_stream()).await?;
            (view.manifest.get(id).cloned(), view.tail())
        };
        let Some(entry) = entry else { return Ok(Decided::Answer(None)) };
        if entry.status != AttachmentStatus::Pending {
            return Ok(Decided::Answer(Some(entry)));
        }
        let info = state.store.head(path).await?;
        if !info.closed {
            return Ok(Decided::Answer(Some(entry)));
        }
        let mut hasher = Sha256::new();
        let mut pos = 0;
        while pos < info.tail {
            let batch = state.store.read(path, ReadFrom::At(attache_core::Offset(pos)), 4 << 20).await?;
            hasher.update(&batch.body);
            if batch.next.0 <= pos {
                break;
            }
            pos = batch.next.0;
        }
        let mut done = entry;
        done.stream_path = path.clone();
        done.status = AttachmentStatus::Complete;
        done.byte_length = Some(info.tail);
        done.sha256 = Some(hex::encode(hasher.finalize()));
        let row = manifest_row(&done, &new_txid())?;
        Ok(Decided::Write { row, since: tail, bytes: None, answer: Some(done) })
    })
    .await?;
    done.ok_or_else(|| upload_in_progress(id))
}

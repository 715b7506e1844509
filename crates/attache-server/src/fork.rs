//! The entities face's fork route: `POST /_electric/entities/{type}/{id}/fork`.
//!
//! A fork is a new entity whose main stream is a Durable Streams fork of the
//! source's (its history up to the fork point, then its own), and whose
//! attachments are those the fork's manifest shows complete at that point,
//! each at the fork's own address. Blob-backed attachment streams are linked
//! (`StreamStore::link_blob_stream`: one more reference to the same
//! content-addressed bytes, nothing copied); the few attachment streams that
//! are not blobs (finished resumable uploads) are Durable Streams forks of
//! their closed source. Each carried manifest row is rewritten so its
//! `streamPath` is the fork's stream, derived from the fork's URL and the
//! attachment id, never read from the row. Pending and failed attachments
//! are not carried: the fork's manifest gets a `delete` row for each.

use std::collections::BTreeMap;

use attache_core::manifest::{AttachmentStatus, ManifestEntry, MANIFEST};
use attache_core::state::{timestamp, ChangeEvent};
use attache_core::{EntityUrl, Offset, Permission, PrincipalKey, StreamPath};
use attache_storage::{CreateOutcome, CreateStream, EntityRecord, ForkSpec, StoreError, StreamInfo, StreamStore};
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use crate::access::{hold_life, now_ms, EntityRoute};
use crate::entities::{copy_grants_to_child, entity_json, json_size, lineage_under, Lineage};
use crate::error::{ApiError, ApiResult};
use crate::http::json_object_body;
use crate::rows::{append_rows, new_txid, not_running};
use crate::AppState;

/// Electric's fork pointer: a position on the source's main stream.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForkPointer {
    /// A Durable Streams offset; `null` is the start of the stream.
    offset: Option<String>,
    #[serde(default)]
    sub_offset: u64,
}

/// The body Electric's fork takes. `waitTimeoutMs` is accepted and has
/// nothing to wait for here (no runs); `parent` makes the fork its child.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForkBody {
    #[serde(default)]
    instance_id: Option<String>,
    #[serde(default)]
    fork_pointer: Option<ForkPointer>,
    #[serde(default)]
    anchor: Option<String>,
    #[serde(default)]
    parent: Option<String>,
    #[serde(default)]
    tags: Option<BTreeMap<String, String>>,
    #[serde(default, rename = "waitTimeoutMs")]
    _wait_timeout_ms: Option<f64>,
}

/// The one named anchor Electric has; attache keeps no runs, so it is the tail.
const LATEST_COMPLETED_RUN: &str = "latest_completed_run";

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::bad_request(message)
}

fn duplicate(url: &str) -> ApiError {
    ApiError::DuplicateUrl { url: url.to_owned() }
}

/// Where on the source's main stream the fork starts: `None` is its tail.
fn fork_point(body: &ForkBody) -> ApiResult<(Option<Offset>, u64)> {
    match (&body.fork_pointer, body.anchor.as_deref()) {
        (Some(_), Some(_)) => Err(invalid("fork_pointer and anchor are mutually exclusive")),
        (None, Some(LATEST_COMPLETED_RUN)) | (None, None) => Ok((None, 0)),
        (None, Some(other)) => Err(invalid(format!("unknown anchor {other:?}: expected {LATEST_COMPLETED_RUN:?}"))),
        (Some(p), None) => {
            let offset = match p.offset.as_deref() {
                None | Some("-1") => Offset::ZERO,
                Some(raw) => Offset::parse(raw)
                    .map_err(|_| invalid(format!("fork_pointer.offset {raw:?} is not a stream offset")))?,
            };
            Ok((Some(offset), p.sub_offset))
        }
    }
}

/// POST /_electric/entities/{type}/{id}/fork [fork]: forks a running entity
/// into a new one at `/{type}/{instance_id}`, owned by the caller. Answers
/// 201 `{root, entities, txid}` as Electric does (one entity: attache forks
/// the entity alone, not its children). Everything the request can get wrong is refused before
/// anything is written.
pub async fn fork(
    State(state): State<AppState>,
    route: EntityRoute,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let EntityRoute { who, url: source_url } = &route;
    let (body, _tree): (ForkBody, _) = json_object_body(&state.bodies, who, &headers, body).await?;
    let (offset, sub_offset) = fork_point(&body)?;
    let fork_id = match body.instance_id.as_deref() {
        Some(id) => id.to_owned(),
        None => format!("{}-fork-{}", source_url.instance_id(), &new_txid()[..8]),
    };
    let fork_url = EntityUrl::for_new_entity(source_url.entity_type(), &fork_id)?;
    let source = route.authorize(&state, Permission::Fork).await?;
    if !source.is_running() {
        return Err(not_running());
    }
    let mut tags = source.tags.clone();
    for (key, value) in body.tags.unwrap_or_default() {
        if key.is_empty() || key.len() > 128 {
            return Err(invalid("tag keys are 1 to 128 bytes"));
        }
        tags.insert(key, value);
    }
    let max = state.config.max_entity_data_bytes;
    if json_size(&source.args) + json_size(&Some(&tags)) > max {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "ENTITY_DATA_TOO_LARGE",
            format!("args and tags are at most {max} bytes of JSON together (max_entity_data_bytes)"),
        ));
    }
    // The source's own URL apart: were the source purged since it was read,
    // the fork would wait below for a life it holds itself.
    if fork_url == *source_url || state.registry.entity(&fork_url.to_string()).await.is_some() {
        return Err(duplicate(&fork_url.to_string()));
    }
    let args_len = source.args.as_ref().map_or(0, |a| a.get().len());
    let adding = attache_storage::registry::data_bytes(args_len, source.extra.as_ref(), &tags);
    // Held by the step that makes the fork, which runs to its end though the request is dropped.
    let rooms = (crate::entities::entity_room(&state, who, adding)?, crate::streams::stream_room(&state, who, 1)?);
    // Electric's `parent`: the fork is a child of it (the caller needs `spawn` there).
    let lineage = match body.parent.as_deref() {
        Some(parent) => Some(lineage_under(&state, who, parent).await?),
        None => None,
    };
    // The fork's URL's life exclusively (one spawn or fork of it at a time,
    // none during its purge) and the source's shared (a purge of the source
    // waits for the fork), taken in the URLs' order so two forks each of the
    // other's URL cannot wait for each other.
    let (life, source_life) = if fork_url < *source_url {
        let life = state.lives.exclusive(&fork_url.to_string()).await;
        (life, hold_life(&state, &source).await?)
    } else {
        let source_life = hold_life(&state, &source).await?;
        (state.lives.exclusive(&fork_url.to_string()).await, source_life)
    };
    let source_main = state.store.head(&source_url.main_stream()).await?;
    if source_main.closed {
        return Err(not_running());
    }
    if let Some(at) = offset {
        if at.0 > source_main.tail {
            return Err(invalid(format!(
                "fork_pointer.offset {at} is past the source's tail {}",
                source_main.tail_offset()
            )));
        }
    }
    // From its streams through its record to its copied grants, on a task of
    // its own holding both lives: a request dropped midway (its client closed
    // the connection) leaves the whole fork, or, when a step fails, none of
    // its streams (`entities::run_to_end`). Awaited inline, a dropped request
    // left the record without the grants copied from its parent.
    let plan =
        Plan { who: who.clone(), source, source_url: source_url.clone(), fork_url, offset, sub_offset, tags, lineage };
    let state_ = state.clone();
    let (root, txid) = crate::entities::run_to_end(&state, async move {
        let _rooms = rooms;
        let state = &state_;
        let mut made = Made { state, streams: Vec::new(), done: false };
        let forked = make_fork(state, &plan, &mut made).await;
        if forked.is_err() {
            // Awaited here, within the step: the streams are gone before the answer.
            made.undo().await;
        }
        drop((life, source_life));
        forked
    })
    .await?;
    Ok((StatusCode::CREATED, Json(json!({ "root": root, "entities": [root], "txid": txid }))).into_response())
}

/// What a fork's request decided and checked: [`make_fork`] carries it out,
/// holding the fork's URL's life exclusively and the source's shared.
struct Plan {
    who: PrincipalKey,
    source: EntityRecord,
    source_url: EntityUrl,
    fork_url: EntityUrl,
    offset: Option<Offset>,
    sub_offset: u64,
    tags: BTreeMap<String, String>,
    lineage: Option<Lineage>,
}

/// Makes the fork `plan` describes: its main stream, its attachments' streams
/// and their manifest rows, its registry record, the grants copied from its
/// parent; answers its entity JSON and its txid. Each stream it creates is in
/// `made`, for the caller to undo when this fails before the record.
async fn make_fork(state: &AppState, plan: &Plan, made: &mut Made<'_>) -> ApiResult<(serde_json::Value, String)> {
    let Plan { who, source, source_url, fork_url, offset, sub_offset, tags, lineage } = plan;
    let created = state
        .store
        .create(CreateStream {
            path: StreamPath::new(fork_url.main_stream())?,
            content_type: None,
            ttl: None,
            expires_at: None,
            closed: false,
            initial: Default::default(),
            fork: Some(ForkSpec {
                source: StreamPath::new(source_url.main_stream())?,
                offset: *offset,
                sub_offset: *sub_offset,
            }),
            owner: Some(who.to_string()),
            // The server's own create: a stream kept for its forks gives the path up (as a spawn's does).
            take_kept_path: true,
        })
        .await;
    match created {
        Ok(CreateOutcome::Created(info)) => made.streams.push((fork_url.main_stream(), info.id)),
        // Someone else's stream (a crashed spawn's, say; no spawn runs meanwhile): theirs, not undone.
        Ok(CreateOutcome::Existed(_)) | Err(StoreError::ConfigMismatch(_)) => {
            return Err(duplicate(&fork_url.to_string()))
        }
        Err(StoreError::ForkOffsetInsideMessage { offset }) => {
            return Err(invalid(format!(
                "fork_pointer.offset {offset} falls inside a message of the source's main stream: \
                 fork at a message boundary (an offset the server returned)"
            )))
        }
        Err(e) => return Err(e.into()),
    }
    let txid = new_txid();
    let rows = carry_attachments(state, source_url, fork_url, who, &txid, made).await?;
    if !rows.is_empty() {
        append_rows(state.store.as_ref(), &fork_url.main_stream(), &rows, false).await?;
    }
    let now = now_ms();
    let record = EntityRecord {
        url: fork_url.to_string(),
        entity_type: fork_url.entity_type().to_owned(),
        instance_id: fork_url.instance_id().to_owned(),
        status: "idle".into(),
        tags: tags.clone(),
        args: source.args.clone(),
        created_by: who.url(),
        created_at_ms: now,
        updated_at_ms: now,
        extra: None,
        incarnation: Some(hex::encode(rand::random::<[u8; 16]>())),
        parent: lineage.as_ref().map(|l| l.parent.url.clone()),
        ancestors: lineage.as_ref().map(|l| l.ancestors.clone()).unwrap_or_default(),
    };
    crate::pause::at(state, crate::pause::FORK_RECORD).await;
    let (stored, fresh) = state.registry.insert_entity(record).await?;
    if !fresh {
        return Err(duplicate(&stored.url));
    }
    made.done = true;
    crate::pause::at(state, crate::pause::FORK_GRANTS).await;
    if let Some(lineage) = lineage {
        copy_grants_to_child(state, who, &lineage.parent, &stored).await?;
    }
    Ok((entity_json(&stored), txid))
}

/// Streams this fork created, by path and id, deleted again unless it
/// succeeds: by [`Made::undo`] when it fails, else (a panic) by the guard
/// on drop, in a task (a guard cannot await). Only the stream this fork
/// created goes: one another request put at the path since has another id
/// and stays.
struct Made<'a> {
    state: &'a AppState,
    streams: Vec<(String, u64)>,
    done: bool,
}

impl Made<'_> {
    /// Deletes the streams made so far, now.
    async fn undo(&mut self) {
        if self.done {
            return;
        }
        let streams = std::mem::take(&mut self.streams);
        undo_streams(self.state.store.as_ref(), &self.state.views, streams).await;
    }
}

impl Drop for Made<'_> {
    fn drop(&mut self) {
        if self.done || self.streams.is_empty() {
            return;
        }
        let store = self.state.store.clone();
        let views = self.state.views.clone();
        let streams = std::mem::take(&mut self.streams);
        tokio::spawn(async move { undo_streams(store.as_ref(), &views, streams).await });
    }
}

/// Deletes a failed fork's `streams` (path and id), attachments first, the
/// main stream last (it is what makes the fork visible).
async fn undo_streams(store: &dyn StreamStore, views: &crate::rows::Views, streams: Vec<(String, u64)>) {
    for (path, id) in streams.iter().rev() {
        if let Err(e) = undo_stream(store, path, *id).await {
            tracing::warn!(error = %e, path, "could not undo a failed fork's stream");
        }
        // What the fork read there is no one's now (a cache: whoever holds the path reloads).
        views.forget(path);
    }
}

/// Deletes the stream at `path` if it is still the one with `id` (the one
/// this request created), never another's stream at the same path: the
/// store decides that in the write that deletes (`delete_id`).
async fn undo_stream(store: &dyn StreamStore, path: &str, id: u64) -> Result<(), StoreError> {
    match store.delete_id(path, id).await {
        Ok(()) | Err(StoreError::NotFound) | Err(StoreError::Gone) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Gives the fork its own stream for each attachment its manifest shows
/// complete, and answers the rows that make its manifest say so: the entry
/// with `streamPath` at the fork, or `delete` for what is not carried.
async fn carry_attachments(
    state: &AppState,
    source: &EntityUrl,
    fork: &EntityUrl,
    who: &PrincipalKey,
    txid: &str,
    made: &mut Made<'_>,
) -> ApiResult<Vec<ChangeEvent>> {
    let entries: Vec<ManifestEntry> = {
        let view = state.views.get(state.store.as_ref(), &fork.main_stream()).await?;
        view.manifest.values().cloned().collect()
    };
    // Each complete attachment is a stream of the fork's, the forker's to hold.
    let copies = entries.iter().filter(|e| e.status == AttachmentStatus::Complete).count();
    let _room = crate::streams::stream_room(state, who, copies)?;
    let at = timestamp(now_ms());
    let mut rows = Vec::with_capacity(entries.len());
    for entry in entries {
        let carried = match entry.status {
            AttachmentStatus::Complete => carry_one(state, source, fork, who, &entry, made).await?,
            AttachmentStatus::Pending | AttachmentStatus::Failed => None,
        };
        let row = match carried {
            Some(entry) => {
                let value = serde_json::to_value(&entry).map_err(|e| invalid(e.to_string()))?;
                ChangeEvent::update(MANIFEST, &entry.key, value, txid, &at)
            }
            None => ChangeEvent::delete(MANIFEST, &entry.key, txid, &at),
        };
        rows.push(row);
    }
    Ok(rows)
}

/// The fork's copy of one complete attachment, or `None` when its bytes are
/// no longer at the source (deleted, or replaced by other bytes since the fork point).
async fn carry_one(
    state: &AppState,
    source: &EntityUrl,
    fork: &EntityUrl,
    who: &PrincipalKey,
    entry: &ManifestEntry,
    made: &mut Made<'_>,
) -> ApiResult<Option<ManifestEntry>> {
    // Derived from the entity and the id; the row's own `streamPath` is only compared.
    let Some(from) = entry.bytes_path(source) else { return Ok(None) };
    let suffix = &from[source.to_string().len()..];
    let to = format!("{fork}{suffix}");
    let info = match state.store.head(&from).await {
        Ok(info) if info.closed => info,
        Ok(_) | Err(StoreError::NotFound) | Err(StoreError::Gone) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    if !same_bytes(entry, &info) {
        return Ok(None);
    }
    let req = CreateStream {
        path: StreamPath::new(to.clone())?,
        content_type: None,
        ttl: None,
        expires_at: None,
        closed: true,
        initial: Default::default(),
        fork: None,
        owner: Some(who.to_string()),
        take_kept_path: true,
    };
    let linked = if info.blob.is_some() {
        state.store.link_blob_stream(req, &from).await
    } else {
        let spec = ForkSpec { source: StreamPath::new(from.clone())?, offset: None, sub_offset: 0 };
        state.store.create(CreateStream { fork: Some(spec), ..req }).await.and_then(|o| match o {
            CreateOutcome::Created(info) => Ok(info),
            CreateOutcome::Existed(_) => Err(StoreError::ConfigMismatch("a stream already exists at this path".into())),
        })
    };
    let linked = match linked {
        Ok(linked) => linked,
        // Deleted between the look and the link: not carried.
        Err(StoreError::NotFound) | Err(StoreError::Gone) | Err(StoreError::ForkSourceNotFound) => return Ok(None),
        Err(StoreError::ForkSourceGone) => return Ok(None),
        // A stream already at the fork's attachment path is not the fork's: never adopted.
        Err(StoreError::ConfigMismatch(_)) => return Err(duplicate(&fork.to_string())),
        Err(e) => return Err(e.into()),
    };
    if !same_bytes(entry, &linked) {
        // Replaced between the look and the link: the new stream goes again.
        undo_stream(state.store.as_ref(), &to, linked.id).await?;
        return Ok(None);
    }
    made.streams.push((to.clone(), linked.id));
    let mut carried = entry.clone();
    carried.stream_path = to;
    Ok(Some(carried))
}

/// Does the stream hold the bytes the entry describes (its hash, else its length)?
fn same_bytes(entry: &ManifestEntry, info: &StreamInfo) -> bool {
    match (&info.blob, &entry.sha256) {
        (Some(blob), Some(sha)) => &blob.sha256 == sha,
        _ => entry.byte_length.is_none_or(|len| len == info.tail),
    }
}

//! The Durable Streams face (PROTOCOL.md): PUT, POST, GET (catch-up,
//! long-poll, SSE), HEAD and DELETE on any stream path.
//!
//! Why one file of this size: the protocol's methods share `authorize`, the entity-stream rules and
//! the live reader, which is why they were kept together; the next cut is a `streams/` folder
//! (`write`, `read`, `live`), after the fork offset work in flight on `put`'s fork headers lands.

use std::time::Duration;

use attache_core::{
    ContentType, Cursor, EntityStream, EntityUrl, ExpiresAt, Offset, Permission, PrincipalKey, ProducerHeaders,
    ReadOffset, StreamPath, Ttl,
};
use attache_storage::{
    AppendRequest, CreateOutcome, CreateStream, ForkSpec, ReadBatch, ReadBody, ReadFrom, StoreError, StreamInfo,
};
use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use bytes::{Bytes, BytesMut};

use attache_core::json::{split_messages_at_most, JsonBodyUse};
use attache_core::manifest::AttachmentStatus;
use attache_core::query::form_pairs;
use attache_core::state::check_client_row;

use crate::access::{entity_for, hold_life, owns_stream, Life};
use crate::error::{ApiError, ApiResult};
use crate::headers as h;
use crate::http::{read_body, set, set_offset, set_text};
use crate::rows::not_running;
use crate::AppState;

/// Request headers, read once.
pub(crate) struct Req<'a>(pub(crate) &'a HeaderMap);

impl<'a> Req<'a> {
    /// By a `HeaderName` (a `&str` name is parsed again at every lookup).
    pub(crate) fn get(&self, name: &HeaderName) -> ApiResult<Option<&'a str>> {
        match self.0.get(name) {
            None => Ok(None),
            Some(v) => {
                v.to_str().map(Some).map_err(|_| ApiError::bad_request(format!("header {name} is not visible ASCII")))
            }
        }
    }

    /// `Stream-Closed` counts only when it is exactly `true` (any case).
    fn closed(&self) -> bool {
        self.0
            .get(h::STREAM_CLOSED)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
    }

    /// The one `Content-Type` (RFC 9110 8.3: a singleton field). Two are
    /// 400, as two `Host`s are: which one a proxy and this server each took
    /// could differ (session 19's attack pass: the first won).
    fn content_type(&self) -> ApiResult<Option<ContentType>> {
        let name = &axum::http::header::CONTENT_TYPE;
        crate::origin::single(self.0, name, "Content-Type")?;
        self.get(name)?.map(ContentType::parse).transpose().map_err(ApiError::from)
    }
}

/// The stream-state headers shared by PUT, HEAD and reads.
fn stream_headers(headers: &mut HeaderMap, info: &StreamInfo) {
    set_text(headers, header::CONTENT_TYPE, info.advertised_content_type());
    set_offset(headers, h::STREAM_NEXT_OFFSET, info.tail_offset());
    if info.closed {
        headers.insert(h::STREAM_CLOSED, HeaderValue::from_static("true"));
    }
}

/// What the caller may do at a path it is allowed to touch.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Access {
    /// The path's stream, if any, is the caller's to see (the protocol's answers).
    Visible,
    /// The path names a stream deleted but kept for its forks that the caller
    /// may not see: for it the path is free, so its `PUT` takes the path.
    KeptForOthers,
}

/// Who may touch a stream path: entity-owned streams follow the entity's
/// permissions; plain streams belong to their creator. A plain stream another
/// principal owns is, to the caller, a path that never existed (404), except
/// that a live one holds its name (a `PUT` is 409); one deleted but kept for
/// its forks holds nothing the caller can see.
async fn authorize(state: &AppState, who: &PrincipalKey, method: &Method, path: &StreamPath) -> ApiResult<Access> {
    if let Some((entity, which)) = EntityUrl::owning(path.as_str()) {
        let wanted = match *method {
            Method::POST | Method::PUT => Permission::Write,
            Method::DELETE => Permission::Delete,
            _ => Permission::Read,
        };
        let record = entity_for(state, who, &entity, wanted).await?;
        if matches!(*method, Method::POST | Method::PUT) && !record.is_running() {
            return Err(not_running());
        }
        if *method == Method::DELETE {
            let hint = match which {
                EntityStream::Main => {
                    format!(
                        "an entity's main stream goes with the entity: DELETE /_electric/entities{entity}?purge=true"
                    )
                }
                EntityStream::Attachment(id) => {
                    format!("delete attachments through DELETE /_electric/entities{entity}/attachments/{id}")
                }
            };
            return Err(ApiError::new(StatusCode::CONFLICT, "USE_ENTITY_ROUTES", hint));
        }
        return Ok(Access::Visible);
    }
    // No plain stream is created at another spelling of an entity's stream
    // path: to a client that decodes URLs, `/chat/a%20b/main` is the entity
    // `/chat/a b`'s main stream (and to a proxy that merges slashes,
    // `/chat//c1/main` is `/chat/c1`'s). One made by an older release stays readable,
    // appendable and deletable by its owner. Said from the path alone.
    if *method == Method::PUT {
        if let Some(entity) = EntityUrl::respelled_by(path.as_str()) {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "ENTITY_PATH_ESCAPED",
                format!(
                    "{path} is the entity {entity}'s stream path spelled another way (percent-escapes or empty \
                     segments): no stream may be created there. Entity types and ids are spelled with {} only",
                    attache_core::entity::NAME_CHARS
                ),
            ));
        }
    }
    match state.store.named(path.as_str()).await {
        Ok(info) if !owns_stream(who, &info) => match *method {
            Method::PUT if info.soft_deleted => Ok(Access::KeptForOthers),
            Method::PUT => Err(ApiError::new(
                StatusCode::CONFLICT,
                "CONFLICT",
                "a stream owned by another principal exists at this path",
            )),
            _ => Err(ApiError::from(StoreError::NotFound)),
        },
        _ => Ok(Access::Visible),
    }
}

/// What the raw routes may write on the streams an entity owns. The entity
/// routes validate what they write; here a client writes only its own rows:
/// - a main stream is closed only by stopping the entity, is created only by
///   spawning it (no fork), and takes State Protocol rows of collections
///   clients own (checked in [`post`] and [`put`] against the messages);
/// - an attachment stream is created only by the attachment routes, and
///   takes appends only while the manifest records a resumable upload there.
async fn entity_stream_rules(
    state: &AppState,
    method: &Method,
    entity: &EntityUrl,
    which: &EntityStream,
    req: &Req<'_>,
) -> ApiResult<()> {
    let use_entity_routes = |hint: String| ApiError::new(StatusCode::CONFLICT, "USE_ENTITY_ROUTES", hint);
    match (which, method) {
        (EntityStream::Main, &Method::POST | &Method::PUT) => {
            if req.closed() {
                return Err(use_entity_routes(format!(
                    "an entity's main stream closes when the entity stops: DELETE /_electric/entities{entity}"
                )));
            }
            if *method == Method::PUT && req.get(&h::STREAM_FORKED_FROM)?.is_some() {
                return Err(use_entity_routes(format!(
                    "an entity's main stream is created by spawning it: PUT /_electric/entities{entity}"
                )));
            }
            Ok(())
        }
        (EntityStream::Attachment(id), &Method::PUT) => Err(use_entity_routes(format!(
            "attachments are uploaded through POST /_electric/entities{entity}/attachments \
             or PUT /_electric/entities{entity}/attachments/{id} (resumable)"
        ))),
        (EntityStream::Attachment(id), &Method::POST) => {
            let view = state.views.get(state.store.as_ref(), &entity.main_stream()).await?;
            // A resumable upload at this very stream: pending, or complete (a retried closing append).
            let resumable = view.manifest.get(id.as_str()).is_some_and(|e| {
                matches!(e.status, AttachmentStatus::Pending | AttachmentStatus::Complete)
                    && e.bytes_path(entity).is_some_and(|p| p == entity.attachment_stream(id))
            });
            if !resumable {
                return Err(use_entity_routes(format!(
                    "only an open resumable upload takes appends here; start one with PUT /_electric/entities{entity}/attachments/{id}"
                )));
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// The messages of a client's append to a main stream, each a State Protocol
/// row of a collection clients own. The body is split once; the store reuses
/// the split (it does not parse the body again).
fn client_rows(body: &Bytes, usage: JsonBodyUse, max: usize) -> ApiResult<Vec<Bytes>> {
    let messages = split_messages_at_most(body, usage, max)?;
    let mut rows = Vec::with_capacity(messages.len());
    for message in messages {
        check_client_row(message)?;
        rows.push(body.slice_ref(message));
    }
    Ok(rows)
}

pub async fn dispatch(
    state: AppState,
    who: PrincipalKey,
    method: Method,
    path: StreamPath,
    query: Option<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    // Said before anything about the path: a method streams never take is
    // 405 at every path, so it tells nothing of what a path holds (before,
    // another principal's stream answered 404 where a free path was 405:
    // session 17's attack pass).
    if !matches!(method, Method::PUT | Method::POST | Method::GET | Method::HEAD | Method::DELETE) {
        return ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "METHOD_NOT_ALLOWED",
            "streams take GET, HEAD, PUT, POST and DELETE",
        )
        .into_response();
    }
    let mut result = authorize(&state, &who, &method, &path).await;
    if let (Ok(_), Some((entity, which))) = (&result, EntityUrl::owning(path.as_str())) {
        result = entity_stream_rules(&state, &method, &entity, &which, &Req(&headers)).await.map(|()| Access::Visible);
    }
    let result = match result {
        Err(e) => Err(e),
        // Each method's future boxed on its own: held inline, the largest
        // (a live read's) would size every request's future, and each layer
        // of the router moves it (callgrind, appends: issue 11).
        Ok(access) => match method {
            Method::PUT | Method::POST => Box::pin(write(&state, &who, &method, &path, &headers, body, access)).await,
            Method::GET => Box::pin(get(&state, &who, &path, query.as_deref(), &headers)).await,
            Method::HEAD => head(&state, &path).await,
            Method::DELETE => Box::pin(delete(&state, &who, &path)).await,
            _ => Err(ApiError::internal("a stream method past the method check")),
        },
    };
    match result {
        Ok(res) => res,
        Err(err) if method == Method::HEAD => {
            // HEAD answers carry no body.
            err.log_fault("http");
            let refusal = err.refusal();
            let mut res = refusal.status.into_response();
            res.headers_mut().extend(refusal.headers);
            res
        }
        Err(err) => err.into_response(),
    }
}

/// PUT and POST. The body is read, then the caller is checked again against
/// what holds the path now: the check made before the body says nothing
/// about a stream created, or an entity purged and spawned again, while a
/// client took its time sending the body (it may stall it at will). A plain
/// stream's body that was all there at once is not checked again: no client
/// could stretch that moment (session 16: one named lookup less an append). For an
/// entity's streams the entity's life is held from that check through the
/// write, as the entity routes hold it (`hold_life`).
async fn write(
    state: &AppState,
    who: &PrincipalKey,
    method: &Method,
    path: &StreamPath,
    headers: &HeaderMap,
    body: Body,
    checked: Access,
) -> ApiResult<Response> {
    // Whether the body was all there at once (every body of the lean HTTP/1
    // path, read before the handler ran): then nothing can have changed under
    // the request that the check before it did not see, as far as the client
    // could arrange, and a plain stream's owner is not looked at again.
    let mut reading = std::pin::pin!(read_body(&state.bodies, body, headers, state.config.max_append_bytes));
    let (body, waited) = match futures::poll!(reading.as_mut()) {
        std::task::Poll::Ready(body) => (body?, false),
        std::task::Poll::Pending => (reading.await?, true),
    };
    let life = match EntityUrl::owning(path.as_str()) {
        Some((entity, which)) => {
            // `authorize`'s check for a write, on the record whose life is then held.
            let record = entity_for(state, who, &entity, Permission::Write).await?;
            if !record.is_running() {
                return Err(not_running());
            }
            entity_stream_rules(state, method, &entity, &which, &Req(headers)).await?;
            Some(hold_life(state, &record).await?)
        }
        None if !waited => None,
        None => {
            if authorize(state, who, method, path).await? != checked {
                // What the path holds changed under the request (a kept stream's name taken, or freed).
                return Err(ApiError::from(StoreError::NotFound));
            }
            None
        }
    };
    match *method {
        Method::PUT => Box::pin(put(state, who, path, headers, body, checked, life)).await,
        _ => post(state, who, path, headers, body, life).await,
    }
}

/// Memory one message of an append holds while it is written (its row, its
/// boundary, its place in the batch), measured: a body of 7.8 million tiny
/// messages peaked at ~130 B a message alone, and ~200 B a message with ten
/// such appends in flight (session 16's attack passes).
const ROW_COST: usize = 200;

/// The longest `Stream-Seq` a stream keeps (the last one accepted).
const MAX_STREAM_SEQ: usize = 256;

/// The refusal code of [`stream_room`].
pub const TOO_MANY_STREAMS: &str = "TOO_MANY_STREAMS";

/// 409 `TOO_MANY_STREAMS` when `who` would hold more than
/// `max_streams_per_principal` streams with `new` more: plain streams,
/// entities' main streams and attachments alike. Every stream keeps its
/// metadata in memory (about 2.5 KB a small one: 20,000 one-byte plain
/// streams took +49 MB, 40,000 one-byte attachments +107 MB, session 15 and
/// 16's attack passes), so one principal's creates must not grow it without
/// end. Checked before anything is written, against committed streams and
/// the principal's creates still in flight (`quota`); the caller holds the
/// returned reservation until its create has committed.
pub fn stream_room(state: &AppState, who: &PrincipalKey, new: usize) -> ApiResult<crate::quota::Reserved> {
    let key = who.to_string();
    let adding = crate::quota::Pending { streams: new, ..Default::default() };
    state.in_flight.reserve(&key, adding, |pending| {
        let max = state.config.max_streams_per_principal;
        let held = state.store.streams_owned_by(&key).saturating_add(pending.streams);
        if held.saturating_add(new) <= max {
            return Ok(());
        }
        Err(too_many_streams(who, held, new, max))
    })
}

fn too_many_streams(who: &PrincipalKey, held: usize, new: usize, max: usize) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        TOO_MANY_STREAMS,
        format!(
            "{who} holds {held} streams (plain streams, entities' main streams and attachments) and may hold \
             at most {max} (max_streams_per_principal: {max}){}; delete some (a stream, an attachment, or purge \
             an entity) to make room",
            if new > 1 { format!(", and this would make {new}") } else { String::new() }
        ),
    )
}

/// Parses a strict non-negative integer header (no sign, no leading zeros).
fn strict_uint(name: &str, raw: &str) -> ApiResult<u64> {
    Ttl::parse(raw)
        .map(|t| t.0)
        .map_err(|_| ApiError::bad_request(format!("{name} must be a non-negative integer, got {raw:?}")))
}

async fn put(
    state: &AppState,
    who: &PrincipalKey,
    path: &StreamPath,
    headers: &HeaderMap,
    initial: Bytes,
    access: Access,
    _life: Option<Life>,
) -> ApiResult<Response> {
    let req = Req(headers);
    let content_type = req.content_type()?;
    let ttl = req.get(&h::STREAM_TTL)?.map(Ttl::parse).transpose()?;
    let expires_at = req.get(&h::STREAM_EXPIRES_AT)?.map(ExpiresAt::parse).transpose()?;
    if ttl.is_some() && expires_at.is_some() {
        return Err(attache_core::Error::TtlAndExpiresAt.into());
    }
    let forked_from = req.get(&h::STREAM_FORKED_FROM)?;
    let fork_offset = req.get(&h::STREAM_FORK_OFFSET)?;
    let sub_offset = req.get(&h::STREAM_FORK_SUB_OFFSET)?;
    let fork = match forked_from {
        Some(source) => Some(ForkSpec {
            source: {
                let source = StreamPath::new(source)?;
                // Forking reads the source: the caller must be able to read it.
                authorize(state, who, &Method::GET, &source).await.map_err(|e| match e.status() {
                    StatusCode::NOT_FOUND | StatusCode::FORBIDDEN => ApiError::from(StoreError::ForkSourceNotFound),
                    _ => e,
                })?;
                if let Some((entity, EntityStream::Attachment(id))) = EntityUrl::owning(source.as_str()) {
                    return Err(ApiError::new(
                        StatusCode::CONFLICT,
                        "USE_ENTITY_ROUTES",
                        format!("attachments are not forked; read one through GET /_electric/entities{entity}/attachments/{id}"),
                    ));
                }
                source
            },
            offset: fork_offset.map(Offset::parse).transpose()?,
            sub_offset: sub_offset.map(|s| strict_uint("Stream-Fork-Sub-Offset", s)).transpose()?.unwrap_or(0),
        }),
        None if fork_offset.is_some() || sub_offset.is_some() => {
            return Err(ApiError::bad_request("Stream-Fork-Offset and Stream-Fork-Sub-Offset need Stream-Forked-From"))
        }
        None => None,
    };
    let max = state.config.max_append_messages;
    // A fork that names no type takes its source's (the store decides it):
    // its first messages are JSON when the source's are. Before (session
    // 17's second attack pass), such a fork's 15 MiB `[1,1,...]` was counted
    // as no messages, 201 and 1 GB.
    let json = match (&content_type, &fork) {
        (Some(ct), _) => ct.is_json(),
        (None, Some(spec)) if !initial.is_empty() => state
            .store
            .head(spec.source.as_str())
            .await
            .is_ok_and(|src| attache_core::stream::is_json_media(&src.content_type)),
        (None, _) => false,
    };
    let rows = if matches!(EntityUrl::owning(path.as_str()), Some((_, EntityStream::Main))) {
        client_rows(&initial, JsonBodyUse::Create, max)?.len()
    } else if !initial.is_empty() && json {
        // A create's first messages are bounded and held for as they are
        // appended (`post`): a 15 MiB `[1,1,...]` PUT held 1 GB before (session 17's attack pass).
        match split_messages_at_most(&initial, JsonBodyUse::Create, max) {
            Ok(messages) => messages.len(),
            Err(e @ attache_core::Error::TooManyMessages { .. }) => return Err(e.into()),
            // Not JSON the store takes: it answers (400).
            Err(_) => 0,
        }
    } else {
        0
    };
    let _rows = state.bodies.hold(who, rows.saturating_mul(ROW_COST), &format_args!("a create of {rows} messages"))?;
    // A PUT that confirms a stream the path holds makes nothing.
    let _room = match stream_room(state, who, 1) {
        Ok(room) => Some(room),
        Err(full) if state.store.head(path.as_str()).await.is_err() => return Err(full),
        Err(_) => None,
    };
    let outcome = state
        .store
        .create(CreateStream {
            path: path.clone(),
            content_type,
            ttl,
            expires_at,
            closed: req.closed(),
            initial,
            fork,
            owner: Some(who.to_string()),
            take_kept_path: access == Access::KeptForOthers,
        })
        .await?;
    let (status, info) = match &outcome {
        CreateOutcome::Created(info) => (StatusCode::CREATED, info),
        CreateOutcome::Existed(info) => (StatusCode::OK, info),
    };
    let mut res = status.into_response();
    stream_headers(res.headers_mut(), info);
    if status == StatusCode::CREATED {
        let host = headers.get("host").and_then(|v| v.to_str().ok()).unwrap_or("localhost");
        set(res.headers_mut(), "location", format!("http://{host}{path}"));
    }
    Ok(res)
}

async fn post(
    state: &AppState,
    who: &PrincipalKey,
    path: &StreamPath,
    headers: &HeaderMap,
    body: Bytes,
    life: Option<Life>,
) -> ApiResult<Response> {
    let req = Req(headers);
    let producer =
        ProducerHeaders::parse(req.get(&h::PRODUCER_ID)?, req.get(&h::PRODUCER_EPOCH)?, req.get(&h::PRODUCER_SEQ)?)?;
    let seq = req.get(&h::STREAM_SEQ)?.map(str::to_owned);
    // The last one is kept with the stream: a short opaque token, not a 60 KB one.
    if let Some(seq) = seq.as_ref().filter(|s| s.len() > MAX_STREAM_SEQ) {
        return Err(ApiError::bad_request(format!(
            "Stream-Seq is at most {MAX_STREAM_SEQ} bytes (got {}): it is kept with the stream",
            seq.len()
        )));
    }
    // A close-only request may carry any Content-Type; it is not looked at.
    let content_type = if body.is_empty() { req.content_type().ok().flatten() } else { req.content_type()? };
    let appended = !body.is_empty();
    let owner = EntityUrl::owning(path.as_str());
    let max = state.config.max_append_messages;
    let messages = match &owner {
        Some((_, EntityStream::Main)) if appended => Some(client_rows(&body, JsonBodyUse::Append, max)?),
        // Split here, at most `max_append_messages`: a body of many tiny
        // messages costs its rows, not its bytes (a 15 MiB `[1,1,...]` held
        // 1 GB while it was written). One the store would not split (another
        // stream type) or that is not JSON is left for the store to answer.
        _ if appended && content_type.as_ref().is_some_and(ContentType::is_json) => {
            match split_messages_at_most(&body, JsonBodyUse::Append, max) {
                Ok(messages) => Some(messages.into_iter().map(|m| body.slice_ref(m)).collect()),
                Err(e @ attache_core::Error::TooManyMessages { .. }) => return Err(e.into()),
                Err(_) => None,
            }
        }
        _ => None,
    };
    // What the rows cost while they are written, from the body budget (and the
    // sender's share), as the body's bytes are: many small appends of many
    // messages each cannot together hold more than the budget.
    let rows = messages.as_ref().map_or(0, Vec::len);
    let _rows = state.bodies.hold(who, rows.saturating_mul(ROW_COST), &format_args!("an append of {rows} messages"))?;
    let attachment = match owner {
        Some((entity, EntityStream::Attachment(id))) => Some((entity, id)),
        _ => None,
    };
    if attachment.is_some() {
        crate::attachments::check_append_size(state, path.as_str(), body.len()).await?;
    }
    let outcome = state
        .store
        .append(AppendRequest {
            path: path.to_string(),
            content_type,
            body,
            close: req.closed(),
            seq,
            producer: producer.clone(),
            messages,
        })
        .await?;
    // The write is in; completing an attachment below takes the life itself.
    drop(life);
    // 200 says "new data from this producer"; everything else (plain appends,
    // closes, duplicates) is 204.
    let status = match (&producer, outcome.duplicate, appended) {
        (Some(_), false, true) => StatusCode::OK,
        _ => StatusCode::NO_CONTENT,
    };
    if let (Some((entity, id)), true) = (&attachment, outcome.info.closed) {
        // Closing a resumable upload's stream completes the attachment.
        crate::attachments::finalize_closed(state, entity, id).await?;
    }
    let mut res = status.into_response();
    let hm = res.headers_mut();
    set_offset(hm, h::STREAM_NEXT_OFFSET, outcome.info.tail_offset());
    if outcome.info.closed {
        hm.insert(h::STREAM_CLOSED, HeaderValue::from_static("true"));
    }
    if let (Some(req_producer), Some(state)) = (&producer, outcome.producer) {
        set(hm, h::PRODUCER_EPOCH, state.epoch.max(req_producer.epoch));
        set(hm, h::PRODUCER_SEQ, state.last_seq);
    }
    Ok(res)
}

async fn head(state: &AppState, path: &StreamPath) -> ApiResult<Response> {
    let info = state.store.head(path.as_str()).await?;
    let mut res = StatusCode::OK.into_response();
    let hm = res.headers_mut();
    stream_headers(hm, &info);
    if let Some(ttl) = info.ttl_secs {
        set(hm, h::STREAM_TTL, ttl);
    }
    if let Some(at) = &info.expires_at {
        set(hm, h::STREAM_EXPIRES_AT, at);
    }
    hm.insert("cache-control", HeaderValue::from_static("no-store"));
    Ok(res)
}

/// Deletes the caller's stream at `path`: the one checked here, by id, so a
/// stream someone else made at the path after the check (the caller's own
/// deleted meanwhile) is never the one deleted. Entity streams never get
/// here (`authorize`: 409 `USE_ENTITY_ROUTES`).
async fn delete(state: &AppState, who: &PrincipalKey, path: &StreamPath) -> ApiResult<Response> {
    let info = state.store.named(path.as_str()).await?;
    if !owns_stream(who, &info) {
        return Err(StoreError::NotFound.into());
    }
    crate::pause::at(state, crate::pause::STREAM_DELETE).await;
    state.store.delete_id(path.as_str(), info.id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// The query of a read.
struct ReadQuery {
    offset: ReadOffset,
    offset_given: bool,
    live: Option<Live>,
    cursor: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Live {
    LongPoll,
    Sse,
}

fn parse_query(query: Option<&str>) -> ApiResult<ReadQuery> {
    let mut offset = None;
    let mut live = None;
    let mut cursor = None;
    for (key, value) in form_pairs(query.unwrap_or("")) {
        match key.as_str() {
            "offset" => offset = Some(value),
            "live" => {
                live = Some(match value.as_str() {
                    "long-poll" => Live::LongPoll,
                    "sse" => Live::Sse,
                    other => {
                        return Err(ApiError::bad_request(format!("live must be long-poll or sse, got {other:?}")))
                    }
                })
            }
            "cursor" => cursor = Some(value),
            _ => {}
        }
    }
    let parsed = ReadOffset::parse(offset.as_deref())?;
    Ok(ReadQuery { offset: parsed, offset_given: offset.is_some(), live, cursor })
}

fn read_from(offset: ReadOffset) -> ReadFrom {
    match offset {
        ReadOffset::Start => ReadFrom::Start,
        ReadOffset::Now => ReadFrom::Tail,
        ReadOffset::At(o) => ReadFrom::At(o),
    }
}

fn cursor_for(echoed: Option<&str>) -> Cursor {
    // Seconds since the epoch without a calendar date (chrono's `Utc::now`
    // builds one): SSE readers ask for a cursor with every event.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    Cursor::next(now, echoed, rand::random_range(1..=3600))
}

async fn get(
    state: &AppState,
    who: &PrincipalKey,
    path: &StreamPath,
    query: Option<&str>,
    headers: &HeaderMap,
) -> ApiResult<Response> {
    let q = parse_query(query)?;
    match q.live {
        None => catch_up(state, who, path, &q, headers).await,
        Some(_) if !q.offset_given => Err(ApiError::bad_request("live reads need an offset")),
        Some(Live::LongPoll) => long_poll(state, path, &q, &LiveReader::of(state, who, path)).await,
        Some(Live::Sse) => sse(state, path, &q, LiveReader::of(state, who, path)).await,
    }
}

/// Who reads an entity's stream live, to be checked again before each
/// batch it is sent (SSE) or that arrives after a wait (long-poll): a grant
/// revoked (or the entity purged) while a reader waits, or while it is still
/// catching up, ends what that reader is sent, as on `/_attache/events`.
/// Plain streams need no second look: their owner does not change, and a
/// deleted stream ends its readers.
#[derive(Clone)]
struct LiveReader {
    state: AppState,
    who: PrincipalKey,
    entity: Option<EntityUrl>,
}

impl LiveReader {
    fn of(state: &AppState, who: &PrincipalKey, path: &StreamPath) -> LiveReader {
        LiveReader {
            state: state.clone(),
            who: who.clone(),
            entity: EntityUrl::owning(path.as_str()).map(|(entity, _)| entity),
        }
    }

    async fn may_still_read(&self) -> bool {
        match &self.entity {
            // Boxed: held inline, this check would size every live reader's body
            // (SSE) for the whole permission lookup, while it runs once per wake-up.
            Some(entity) => Box::pin(entity_for(&self.state, &self.who, entity, Permission::Read)).await.is_ok(),
            None => true,
        }
    }
}

/// The body of a batch: a JSON array in JSON mode, the bytes otherwise (the
/// store reads it as one buffer: no copy here).
fn batch_body(batch: &ReadBatch) -> Bytes {
    batch.body.clone()
}

/// The ETag of a read of `info` from `start` to `next`. The stream is named
/// by [`stream_tag`], not by its id: ids count every stream the server
/// makes, and a reader of its own streams read from their tags how many
/// other principals had made, and when (session 21's attack pass).
fn etag(info: &StreamInfo, start: Offset, next: Offset) -> String {
    let closed = if at_closed_end(info, next) { ":c" } else { "" };
    format!("\"{:016x}:{}:{}{}\"", stream_tag(info.id), start.0, next.0, closed)
}

/// Stream `id` under a key drawn when the process starts (SipHash-1-3,
/// std's `RandomState`): a stream made again at a path has another tag, and
/// nothing about other streams can be read from it. A tag another process
/// (a restart, another instance) gave does not match: that read is answered
/// 200 rather than 304.
fn stream_tag(id: u64) -> u64 {
    use std::hash::BuildHasher as _;
    static KEY: std::sync::LazyLock<std::collections::hash_map::RandomState> =
        std::sync::LazyLock::new(Default::default);
    KEY.hash_one(id)
}

/// A read that ends at `next` has reached the closed end of the stream.
fn at_closed_end(info: &StreamInfo, next: Offset) -> bool {
    info.closed && next.0 >= info.tail
}

/// The headers of a read of `info` that ends at `next`.
fn read_headers(hm: &mut HeaderMap, info: &StreamInfo, next: Offset) {
    set_text(hm, header::CONTENT_TYPE, info.advertised_content_type());
    set_offset(hm, h::STREAM_NEXT_OFFSET, next);
    if next.0 >= info.tail {
        hm.insert(h::STREAM_UP_TO_DATE, HeaderValue::from_static("true"));
    }
    if at_closed_end(info, next) {
        hm.insert(h::STREAM_CLOSED, HeaderValue::from_static("true"));
    }
}

/// A catch-up read. Its body is the store's buffer, or the range of a
/// segment file the store left it in (`StreamStore::read_sendable`), which
/// the lean HTTP/1 path sends with `sendfile` and any other path reads in
/// bounded chunks (`http::file_response`).
async fn catch_up(
    state: &AppState,
    who: &PrincipalKey,
    path: &StreamPath,
    q: &ReadQuery,
    headers: &HeaderMap,
) -> ApiResult<Response> {
    let read = state.store.read_sendable(path.as_str(), read_from(q.offset), state.config.max_read_bytes).await?;
    if q.offset == ReadOffset::Now {
        let body = if read.json { Bytes::from_static(b"[]") } else { Bytes::new() };
        let mut res = Response::new(Body::from(body));
        let hm = res.headers_mut();
        read_headers(hm, &read.info, read.next);
        hm.insert(h::STREAM_UP_TO_DATE, HeaderValue::from_static("true"));
        if read.info.closed {
            hm.insert(h::STREAM_CLOSED, HeaderValue::from_static("true"));
        }
        hm.insert("cache-control", HeaderValue::from_static("no-store"));
        return Ok(res);
    }
    let tag = etag(&read.info, read.start, read.next);
    let matches = headers
        .get("if-none-match")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == tag || t.trim() == "*"));
    let (info, next) = (read.info, read.next);
    let mut res = match read.body {
        _ if matches => StatusCode::NOT_MODIFIED.into_response(),
        ReadBody::Bytes(bytes) => {
            let permit = state.answers.take_as(Some(who), bytes.len())?;
            Response::new(crate::http::held_body(bytes, permit))
        }
        ReadBody::File(file) => crate::http::file_response(file, &state.answers, who),
    };
    let hm = res.headers_mut();
    if !matches {
        read_headers(hm, &info, next);
    } else {
        set_offset(hm, h::STREAM_NEXT_OFFSET, next);
    }
    set(hm, "etag", tag);
    hm.insert("cache-control", HeaderValue::from_static("private, max-age=60, stale-while-revalidate=300"));
    Ok(res)
}

async fn long_poll(state: &AppState, path: &StreamPath, q: &ReadQuery, reader: &LiveReader) -> ApiResult<Response> {
    let store = &state.store;
    let mut signal = store.subscribe(path.as_str()).await?;
    store.touch(path.as_str());
    let from = match q.offset {
        ReadOffset::Now => store.head(path.as_str()).await?.tail_offset(),
        ReadOffset::Start => Offset::ZERO,
        ReadOffset::At(o) => o,
    };
    let deadline = tokio::time::Instant::now() + state.config.long_poll_timeout;
    let cursor = cursor_for(q.cursor.as_deref());
    let mut waited = false;
    loop {
        let batch = store.read(path.as_str(), ReadFrom::At(from), state.config.max_read_bytes).await?;
        if waited && !reader.may_still_read().await {
            return Err(ApiError::from(StoreError::NotFound));
        }
        if !batch.is_empty() {
            let permit = state.answers.take_as(Some(&reader.who), batch.body.len())?;
            let mut res = Response::new(crate::http::held_body(batch_body(&batch), permit));
            let hm = res.headers_mut();
            read_headers(hm, &batch.info, batch.next);
            set(hm, "etag", etag(&batch.info, batch.start, batch.next));
            if !batch.at_closed_end() {
                set(hm, h::STREAM_CURSOR, cursor);
            }
            hm.insert("cache-control", HeaderValue::from_static("private, max-age=60, stale-while-revalidate=300"));
            return Ok(res);
        }
        if batch.at_closed_end() {
            let mut res = StatusCode::NO_CONTENT.into_response();
            let hm = res.headers_mut();
            read_headers(hm, &batch.info, batch.next);
            hm.insert("cache-control", HeaderValue::from_static("no-store"));
            return Ok(res);
        }
        tokio::select! {
            changed = signal.changed() => {
                if changed.is_err() {
                    // The stream was removed; the next read says so (or finds its successor).
                    signal = store.subscribe(path.as_str()).await?;
                }
            }
            _ = tokio::time::sleep_until(deadline) => break,
            _ = state.shutdown.cancelled() => break,
        }
        waited = true;
    }
    let info = store.head(path.as_str()).await?;
    let mut res = StatusCode::NO_CONTENT.into_response();
    let hm = res.headers_mut();
    set_offset(hm, h::STREAM_NEXT_OFFSET, from);
    hm.insert(h::STREAM_UP_TO_DATE, HeaderValue::from_static("true"));
    if info.closed && info.tail == from.0 {
        hm.insert(h::STREAM_CLOSED, HeaderValue::from_static("true"));
    } else {
        set(hm, h::STREAM_CURSOR, cursor);
    }
    hm.insert("cache-control", HeaderValue::from_static("no-store"));
    Ok(res)
}

/// A text stream's SSE event carries text: a read that more bytes follow and
/// that ends inside a UTF-8 character ends before it instead, so the next
/// event begins with the whole character (cut, each half would decode to
/// U+FFFD). Bytes that end the stream mid-character, or a read holding no
/// whole character, are sent as they are.
fn end_on_char_boundary(mut batch: ReadBatch) -> ReadBatch {
    if batch.json || batch.up_to_date() {
        return batch;
    }
    let cut = unfinished_char_len(&batch.body);
    if cut > 0 && cut < batch.body.len() {
        batch.body.truncate(batch.body.len() - cut);
        batch.next = Offset(batch.next.0 - cut as u64);
    }
    batch
}

/// How many bytes at the end of `bytes` begin a UTF-8 character they do not finish (0-3).
fn unfinished_char_len(bytes: &[u8]) -> usize {
    for back in 1..=bytes.len().min(3) {
        let b = bytes[bytes.len() - back];
        if b & 0xC0 == 0x80 {
            continue; // a continuation byte: the character began earlier
        }
        let len = match b {
            0xC2..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF4 => 4,
            _ => return 0,
        };
        return if back < len { back } else { 0 };
    }
    0
}

fn sse_data(batch: &ReadBatch, base64: bool) -> Bytes {
    let body = batch_body(batch);
    let text = if base64 {
        base64::engine::general_purpose::STANDARD.encode(&body)
    } else {
        String::from_utf8_lossy(&body).replace("\r\n", "\n").replace('\r', "\n")
    };
    crate::sse::event("data", &text)
}

fn sse_control(next: Offset, cursor: Option<Cursor>, up_to_date: bool, closed: bool) -> Bytes {
    crate::sse::control(crate::sse::Control { next, cursor, up_to_date, closed })
}

async fn sse(state: &AppState, path: &StreamPath, q: &ReadQuery, live: LiveReader) -> ApiResult<Response> {
    let store = state.store.clone();
    let signal = store.subscribe(path.as_str()).await?;
    store.touch(path.as_str());
    let info = store.head(path.as_str()).await?;
    let base64 = !ContentType::parse(info.advertised_content_type()).is_ok_and(|t| t.is_sse_text());
    let pos = match q.offset {
        ReadOffset::Now => info.tail_offset(),
        ReadOffset::Start => Offset::ZERO,
        ReadOffset::At(o) => o,
    };
    // Validate the offset before answering 200.
    store.read(path.as_str(), ReadFrom::At(pos), 0).await?;
    let reader = SseReader {
        state: state.clone(),
        store,
        path: path.as_str().to_owned(),
        pos,
        base64,
        max_read: state.config.max_read_bytes.min(crate::sse::EVENT_BYTES),
        signal,
        deadline: tokio::time::Instant::now() + state.config.sse_max_duration,
        shutdown: state.shutdown.clone(),
        echoed: q.cursor.clone(),
        announced: false,
        done: false,
        live,
        stream: None,
        sent: None,
    };
    let mut res = crate::sse::response(reader);
    if base64 {
        res.headers_mut().insert(h::SSE_DATA_ENCODING, HeaderValue::from_static("base64"));
    }
    Ok(res)
}

/// One SSE reader of a stream: reads its next batch when the connection asks for more.
struct SseReader {
    state: AppState,
    store: std::sync::Arc<dyn attache_storage::StreamStore>,
    path: String,
    pos: Offset,
    base64: bool,
    max_read: usize,
    signal: attache_storage::ChangeSignal,
    deadline: tokio::time::Instant,
    shutdown: tokio_util::sync::CancellationToken,
    echoed: Option<String>,
    /// A control event has been sent.
    announced: bool,
    /// The stream's closed end has been sent.
    done: bool,
    /// Who reads, checked again before each batch.
    live: LiveReader,
    /// The id of the stream the first batch came from.
    stream: Option<u64>,
    /// The last large event's share of the response budget: held until the
    /// connection asks for the next event, which it does once it sent this one.
    sent: Option<crate::http::SendPermit>,
}

impl SseReader {
    /// Waits until the response budget has room for an event of about
    /// `bytes` (a reader that cannot have it yet is not refused: it waits for
    /// readers that do not read to be cut off); `None` when the response
    /// ends first. The reader holds no read meanwhile.
    async fn wait_for_room(&self, bytes: usize) -> Option<()> {
        while !self.state.answers.has_room(Some(&self.live.who), bytes) {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                _ = tokio::time::sleep_until(self.deadline) => return None,
                _ = self.shutdown.cancelled() => return None,
            }
        }
        Some(())
    }
}

impl crate::sse::Source for SseReader {
    async fn next(&mut self) -> Option<Bytes> {
        // Asked for more: the event before has been sent.
        self.sent = None;
        while !self.done {
            let batch = match self.store.read(&self.path, ReadFrom::At(self.pos), self.max_read).await {
                Ok(b) if self.base64 => b,
                Ok(b) => end_on_char_boundary(b),
                Err(StoreError::NotFound | StoreError::Gone) => return None,
                Err(err) => {
                    tracing::warn!(%err, path = self.path, "sse read failed");
                    return None;
                }
            };
            // Before every batch, not only after a wait: a reader still catching
            // up never waits, and a revoked one was sent what came after its
            // revoke until it caught up (session 21's attack pass).
            if !self.live.may_still_read().await {
                return None;
            }
            // The stream this response began on: one made at its path since
            // (a purge and a new spawn) is another stream, with other readers.
            if *self.stream.get_or_insert(batch.info.id) != batch.info.id {
                return None;
            }
            let closed = batch.at_closed_end();
            let cursor = Some(cursor_for(self.echoed.as_deref()));
            self.done = closed;
            if !batch.is_empty() {
                // Framed as base64 (4/3 of the bytes) or text, and a control event.
                let framed = if self.base64 { batch.body.len() / 3 * 4 + 4 } else { batch.body.len() } + 256;
                match self.state.answers.try_take(Some(&self.live.who), framed) {
                    Ok(permit) => self.sent = permit,
                    Err(_) => {
                        // No room: the read is let go, so a waiting reader holds
                        // none of it (it did: 200 readers of a 15 MiB message
                        // waiting with their reads took 3 GB), and made again
                        // once there is room.
                        drop(batch);
                        self.done = false;
                        Box::pin(self.wait_for_room(framed)).await?;
                        continue;
                    }
                }
                let key = crate::sse::EventKey {
                    stream: batch.info.id,
                    start: batch.start.0,
                    next: batch.next.0,
                    base64: self.base64,
                };
                let data = self.state.sse_events.get_or_frame(key, || sse_data(&batch, self.base64));
                self.pos = batch.next;
                self.announced = true;
                let control = sse_control(self.pos, cursor, batch.up_to_date(), closed);
                let mut out = BytesMut::with_capacity(data.len() + control.len());
                out.extend_from_slice(&data);
                out.extend_from_slice(&control);
                return Some(out.freeze());
            }
            if !self.announced || closed {
                self.announced = true;
                return Some(sse_control(self.pos, cursor, true, closed));
            }
            tokio::select! {
                changed = self.signal.changed() => {
                    if changed.is_err() {
                        self.signal = self.store.subscribe(&self.path).await.ok()?;
                    }
                }
                _ = tokio::time::sleep_until(self.deadline) => return None,
                _ = self.shutdown.cancelled() => return None,
            }
        }
        None
    }
}

/// How long to wait, as humantime text (for logs and config echo).
pub fn describe(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

#[cfg(test)]
mod tests {
    use super::unfinished_char_len;

    #[test]
    fn an_unfinished_character_is_measured_and_anything_else_is_zero() {
        let text = "aé€😀".as_bytes();
        // Every cut of the text: what is left of a character it cuts.
        let unfinished: Vec<usize> = (0..=text.len()).map(|end| unfinished_char_len(&text[..end])).collect();
        assert_eq!(unfinished, [0, 0, 1, 0, 1, 2, 0, 1, 2, 3, 0]);
        // Not UTF-8 at the end (a lone continuation byte, 0xFF, an overlong lead): nothing to hold back.
        for bytes in [&b"a\x80"[..], b"a\xff", b"a\xc0", b"\x80\x80\x80", b""] {
            assert_eq!(unfinished_char_len(bytes), 0, "{bytes:?}");
        }
    }
}

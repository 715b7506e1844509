//! The entities face, in the wire format of Electric Agents
//! (`/_electric/entities`): spawn, read, stop, list, send, grants.

use std::collections::BTreeMap;

use attache_core::entity::{Signal, SignalEffect};
use attache_core::state::{timestamp, ChangeEvent, ENTITY_CREATED, ENTITY_STOPPED, INBOX, SIGNAL, TAGS};
use attache_core::{EntityUrl, ExpiresAt, GrantSubject, Permission, PrincipalKey, Propagation};
use attache_storage::{Ancestor, CreateOutcome, CreateStream, EntityRecord, GrantRecord, NewGrant, StoreError};
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::access::{entity_for, entity_not_found, hold_life, may, now_ms, same_incarnation, Life};
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::http::{entity_url, json_body, json_object_body};
use crate::rows::{append_rows, json_content_type, new_txid, not_running, rows_body};
use crate::AppState;

/// How many bytes `v` takes as JSON, counted without writing them anywhere.
pub fn json_size<T: serde::Serialize + ?Sized>(v: &T) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Writing to a counter cannot fail; a value that cannot be JSON counts what was written.
    let _ = serde_json::to_writer(&mut count, v);
    count.0
}

/// The public JSON of an entity.
pub fn entity_json(e: &EntityRecord) -> Value {
    let mut v = json!({
        "url": e.url,
        "type": e.entity_type,
        "instance_id": e.instance_id,
        "status": e.status,
        "streams": { "main": format!("{}/main", e.url) },
        "tags": e.tags,
        "created_by": e.created_by,
        "created_at": e.created_at_ms,
        "updated_at": e.updated_at_ms,
    });
    if let Some(args) = &e.args {
        v["spawn_args"] = args.clone();
    }
    if let Some(parent) = &e.parent {
        v["parent"] = json!(parent);
    }
    v
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantBody {
    subject_kind: String,
    subject_value: String,
    permission: String,
    #[serde(default)]
    propagation: Option<String>,
    #[serde(default)]
    copy_to_children: Option<bool>,
    #[serde(default)]
    expires_at: Option<String>,
}

impl GrantBody {
    fn into_new(self, entity_url: &str, created_by: &PrincipalKey) -> ApiResult<NewGrant> {
        let subject = GrantSubject::parse(&self.subject_kind, &self.subject_value)?;
        let permission = Permission::parse(&self.permission)?;
        let propagation = self.propagation.as_deref().map(Propagation::parse).transpose()?.unwrap_or_default();
        let expires = self.expires_at.as_deref().map(ExpiresAt::parse).transpose()?;
        Ok(NewGrant {
            entity_url: entity_url.to_owned(),
            subject,
            permission,
            expires_at_ms: expires.as_ref().map(|e| e.unix_ms),
            expires_at: expires.map(|e| e.raw),
            created_by: created_by.url(),
            propagation,
            copy_to_children: self.copy_to_children.unwrap_or(false),
        })
    }
}

pub fn grant_json(g: &GrantRecord) -> Value {
    let (kind, value) = match &g.subject {
        GrantSubject::Principal(v) => ("principal", v),
        GrantSubject::PrincipalKind(v) => ("principal_kind", v),
    };
    let mut out = json!({
        "id": g.id,
        "entity_url": g.entity_url,
        "permission": g.permission.as_str(),
        "subject_kind": kind,
        "subject_value": value,
        "propagation": g.propagation.as_str(),
        "copy_to_children": g.copy_to_children,
        "created_by": g.created_by,
        "created_at": timestamp(g.created_at_ms),
        "updated_at": timestamp(g.updated_at_ms.unwrap_or(g.created_at_ms)),
    });
    if let Some(at) = &g.expires_at {
        out["expires_at"] = json!(at);
    }
    out
}

#[derive(Debug, Default, Deserialize)]
pub struct SpawnBody {
    #[serde(default)]
    args: Option<Value>,
    #[serde(default)]
    tags: Option<BTreeMap<String, String>>,
    #[serde(default, rename = "initialMessage")]
    initial_message: Option<Value>,
    #[serde(default, rename = "initialMessageType")]
    initial_message_type: Option<String>,
    #[serde(default)]
    grants: Option<Vec<GrantBody>>,
    /// Electric's `parent`: the entity this one is spawned under (`/type/id`).
    #[serde(default)]
    parent: Option<String>,
}

/// Most ancestors an entity may have: every permission check on it looks at
/// each one's grants, so a spawn (or fork) deeper than this is refused.
pub const MAX_LINEAGE_DEPTH: usize = 32;

/// Where a child goes in the lineage: its parent's record, and its ancestors.
pub struct Lineage {
    pub parent: EntityRecord,
    pub ancestors: Vec<Ancestor>,
}

/// Resolves Electric's `parent` for a spawn or a fork: it must be an entity
/// the caller may `spawn` under (`404` when it does not exist for the
/// caller, `403` when the caller holds something on it but not `spawn`), and
/// not at the lineage's depth limit. Writes nothing.
pub async fn lineage_under(state: &AppState, who: &PrincipalKey, parent: &str) -> ApiResult<Lineage> {
    let url = EntityUrl::parse(parent)
        .map_err(|e| ApiError::bad_request(format!("parent {parent:?} is not an entity URL (/type/id): {e}")))?;
    let record = match entity_for(state, who, &url, Permission::Spawn).await {
        Ok(record) => record,
        Err(e) if e.status == StatusCode::NOT_FOUND => {
            return Err(ApiError::not_found(format!("Parent entity not found at {url}")))
        }
        Err(e) if e.status == StatusCode::FORBIDDEN => {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "FORBIDDEN",
                format!("{} may not spawn children under {url}", who.url()),
            ))
        }
        Err(e) => return Err(e),
    };
    if record.ancestors.len() >= MAX_LINEAGE_DEPTH {
        return Err(ApiError::bad_request(format!(
            "{url} is {MAX_LINEAGE_DEPTH} generations deep: no entity may be spawned under it"
        )));
    }
    let mut ancestors = Vec::with_capacity(record.ancestors.len() + 1);
    ancestors.push(Ancestor { url: record.url.clone(), incarnation: record.incarnation.clone() });
    ancestors.extend(record.ancestors.iter().cloned());
    Ok(Lineage { parent: record, ancestors })
}

/// Electric's `copy_to_children`: the parent's unexpired grants so marked are
/// copied to a new child, as `self` grants still marked (so they go on to
/// its children), made by the spawner.
pub async fn copy_grants_to_child(
    state: &AppState,
    who: &PrincipalKey,
    parent: &EntityRecord,
    child: &str,
) -> ApiResult<()> {
    let now = now_ms();
    for g in state.registry.grants(&parent.url) {
        if !g.copy_to_children || g.expires_at_ms.is_some_and(|at| now >= at) {
            continue;
        }
        state
            .registry
            .add_grant(NewGrant {
                entity_url: child.to_owned(),
                subject: g.subject,
                permission: g.permission,
                expires_at: g.expires_at,
                expires_at_ms: g.expires_at_ms,
                created_by: who.url(),
                propagation: Propagation::Own,
                copy_to_children: true,
            })
            .await?;
    }
    Ok(())
}

/// Spawns an entity for `who`. Used by the HTTP route and by other faces (tasks).
pub async fn spawn_entity(
    state: &AppState,
    who: &PrincipalKey,
    url: &EntityUrl,
    args: Option<Value>,
    tags: BTreeMap<String, String>,
    extra: Option<Value>,
) -> ApiResult<(EntityRecord, bool, String)> {
    spawn_entity_under(state, who, url, args, tags, extra, None).await
}

/// A create on a taken entity URL: says that it is taken, nothing more.
fn duplicate_url(url: &str) -> ApiError {
    ApiError::new(StatusCode::CONFLICT, "DUPLICATE_URL", format!("Entity already exists at URL \"{url}\""))
}

/// [`spawn_entity`], as a child of `lineage`'s parent when given.
async fn spawn_entity_under(
    state: &AppState,
    who: &PrincipalKey,
    url: &EntityUrl,
    args: Option<Value>,
    tags: BTreeMap<String, String>,
    extra: Option<Value>,
    lineage: Option<&Lineage>,
) -> ApiResult<(EntityRecord, bool, String)> {
    let key = url.to_string();
    if let Some(existing) = state.registry.entity(&key).await {
        return if existing.created_by == who.url() {
            Ok((existing, false, String::new()))
        } else {
            Err(duplicate_url(&key))
        };
    }
    let now = now_ms();
    let txid = new_txid();
    let created = ChangeEvent::insert(
        ENTITY_CREATED,
        "entity-created",
        json!({ "entity_type": url.entity_type(), "timestamp": timestamp(now), "args": args.clone().unwrap_or(json!({})) }),
        &txid,
        &timestamp(now),
    );
    // The stream first: a crash before the registry write leaves an orphan
    // stream that no one can reach and that the same caller's retried spawn
    // adopts. Any other stream at the path (another's spawn, or a fork, in
    // flight) holds the name: 409, as for a taken name.
    let outcome = state
        .store
        .create(CreateStream {
            path: attache_core::StreamPath::new(url.main_stream())?,
            content_type: Some(json_content_type()),
            ttl: None,
            expires_at: None,
            closed: false,
            initial: rows_body(&[created])?,
            fork: None,
            owner: Some(who.to_string()),
            take_kept_path: true,
        })
        .await;
    match outcome {
        Ok(CreateOutcome::Created(_)) => {}
        // Identical configuration (not a fork, open, JSON), and this caller's: a crashed spawn of its own.
        Ok(CreateOutcome::Existed(info)) if info.owner.as_deref() == Some(who.to_string().as_str()) => {}
        Ok(CreateOutcome::Existed(_)) | Err(StoreError::ConfigMismatch(_)) => return Err(duplicate_url(&key)),
        Err(e) => return Err(e.into()),
    }
    let record = EntityRecord {
        url: key.clone(),
        entity_type: url.entity_type().to_owned(),
        instance_id: url.instance_id().to_owned(),
        status: "idle".into(),
        tags,
        args,
        created_by: who.url(),
        created_at_ms: now,
        updated_at_ms: now,
        extra,
        incarnation: Some(hex::encode(rand::random::<[u8; 16]>())),
        parent: lineage.map(|l| l.parent.url.clone()),
        ancestors: lineage.map(|l| l.ancestors.clone()).unwrap_or_default(),
    };
    let (stored, fresh) = state.registry.insert_entity(record).await?;
    if !fresh && stored.created_by != who.url() {
        return Err(duplicate_url(&key));
    }
    Ok((stored, fresh, txid))
}

pub async fn spawn(
    State(state): State<AppState>,
    Caller(who): Caller,
    Path((entity_type, instance_id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let url = entity_url(&entity_type, &instance_id)?;
    let body: SpawnBody = json_body(&state.bodies, &headers, body).await?;
    // Validate everything before anything is written.
    let grants = body
        .grants
        .unwrap_or_default()
        .into_iter()
        .map(|g| g.into_new(&url.to_string(), &who))
        .collect::<ApiResult<Vec<_>>>()?;
    for key in body.tags.iter().flat_map(|t| t.keys()) {
        if key.is_empty() || key.len() > 128 {
            return Err(ApiError::bad_request("tag keys are 1 to 128 bytes"));
        }
    }
    // Args and tags live in the registry's memory for the entity's life: bounded.
    let max = state.config.max_entity_data_bytes;
    if json_size(&body.args) + json_size(&body.tags) > max {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "ENTITY_DATA_TOO_LARGE",
            format!("spawn args and tags are at most {max} bytes of JSON together (max_entity_data_bytes)"),
        ));
    }
    let lineage = match body.parent.as_deref() {
        Some(parent) => Some(lineage_under(&state, &who, parent).await?),
        None => None,
    };
    let (entity, fresh, txid) =
        spawn_entity_under(&state, &who, &url, body.args, body.tags.unwrap_or_default(), None, lineage.as_ref())
            .await?;
    if !fresh {
        return Ok((StatusCode::OK, Json(entity_json(&entity))).into_response());
    }
    if let Some(lineage) = &lineage {
        copy_grants_to_child(&state, &who, &lineage.parent, &entity.url).await?;
    }
    for grant in grants {
        state.registry.add_grant(grant).await?;
    }
    if let Some(payload) = body.initial_message {
        send_message(&state, &who, &entity, payload, None, body.initial_message_type).await?;
    }
    let mut out = entity_json(&entity);
    out["txid"] = json!(txid);
    Ok((StatusCode::CREATED, Json(out)).into_response())
}

pub async fn get_entity(
    State(state): State<AppState>,
    Caller(who): Caller,
    Path((entity_type, instance_id)): Path<(String, String)>,
) -> ApiResult<Response> {
    let url = entity_url(&entity_type, &instance_id)?;
    let entity = entity_for(&state, &who, &url, Permission::Read).await?;
    Ok(Json(entity_json(&entity)).into_response())
}

#[derive(Debug, Default, Deserialize)]
pub struct StopQuery {
    #[serde(default)]
    purge: Option<String>,
}

/// DELETE stops the entity (status `stopped`, main stream closed). With
/// `?purge=true` it also deletes its streams, attachments and grants for good.
pub async fn stop(
    State(state): State<AppState>,
    Caller(who): Caller,
    Path((entity_type, instance_id)): Path<(String, String)>,
    Query(q): Query<StopQuery>,
) -> ApiResult<Response> {
    let url = entity_url(&entity_type, &instance_id)?;
    let purge = match q.purge.as_deref() {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => return Err(ApiError::bad_request(format!("purge must be true or false, got {other:?}"))),
    };
    let entity = entity_for(&state, &who, &url, Permission::Delete).await?;
    // The life checked above, and only it: a purge and a new spawn meanwhile
    // (by anyone) made the URL another entity, which this request may not touch.
    let life = state.lives.exclusive(&entity.url).await;
    if !same_incarnation(&state, &entity).await {
        return Err(entity_not_found(&entity.url));
    }
    // A txid only when this stop wrote rows: a client would wait for it in vain otherwise.
    let mut answer = match stop_entity(&state, &who, &entity).await? {
        Some(txid) => json!({ "txid": txid }),
        None => json!({}),
    };
    if purge {
        purge_held(&state, &url, &life).await?;
        answer["purged"] = json!(true);
    } else {
        answer["status"] = json!("stopped");
    }
    Ok((StatusCode::OK, Json(answer)).into_response())
}

/// Stops the entity; the txid of the rows that stopped it, or `None` when it
/// was stopped already (nothing written).
pub async fn stop_entity(state: &AppState, who: &PrincipalKey, entity: &EntityRecord) -> ApiResult<Option<String>> {
    stop_entity_with(state, who, entity, new_txid(), Vec::new()).await
}

/// Stops the entity; `leading` rows (a `signal` row) go in the same closing
/// append, before the `entity_stopped` row. Nothing is written to an entity
/// that is stopped already.
async fn stop_entity_with(
    state: &AppState,
    who: &PrincipalKey,
    entity: &EntityRecord,
    txid: String,
    mut leading: Vec<ChangeEvent>,
) -> ApiResult<Option<String>> {
    if !entity.is_running() {
        return Ok(None);
    }
    {
        let now = now_ms();
        leading.push(ChangeEvent::insert(
            ENTITY_STOPPED,
            "entity-stopped",
            json!({ "timestamp": timestamp(now), "stopped_by": who.url() }),
            &txid,
            &timestamp(now),
        ));
        match append_rows(state.store.as_ref(), &format!("{}/main", entity.url), &leading, true).await {
            Ok(_) => {}
            // Closed already: a stop that crashed before its registry write is finished now.
            Err(e) if e.code == "NOT_RUNNING" => {}
            Err(e) => return Err(e),
        }
        state
            .registry
            .update_entity(
                &entity.url,
                Box::new(move |e| {
                    e.status = "stopped".into();
                    e.updated_at_ms = now;
                    Ok(())
                }),
            )
            .await?;
    }
    Ok(Some(txid))
}

#[derive(Debug, Deserialize)]
pub struct SignalBody {
    #[serde(default)]
    signal: Option<String>,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    payload: Option<Value>,
}

fn invalid_signal(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "INVALID_SIGNAL", message)
}

/// POST /_electric/entities/{type}/{id}/signal [signal]: SIGKILL and SIGTERM
/// stop the entity as DELETE does (idempotent on a stopped one); SIGINT,
/// SIGHUP and SIGUSR are recorded as an unhandled `signal` row for whatever
/// runtime reads the main stream; SIGSTOP and SIGCONT are refused (attache
/// has no paused state). The answer is Electric's: the states before and after.
pub async fn signal(
    State(state): State<AppState>,
    Caller(who): Caller,
    Path((entity_type, instance_id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let url = entity_url(&entity_type, &instance_id)?;
    let body: SignalBody = json_object_body(&state.bodies, &headers, body).await?;
    let entity = entity_for(&state, &who, &url, Permission::Signal).await?;
    let name = body.signal.ok_or_else(|| invalid_signal(format!("signal is required: {}", Signal::NAMES)))?;
    let sig = Signal::parse(&name).map_err(|e| invalid_signal(e.to_string()))?;
    let effect = sig.effect();
    if effect == SignalEffect::Unsupported {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "SIGNAL_NOT_SUPPORTED",
            format!(
                "{} is not supported: attache entities have no paused state (SIGKILL or SIGTERM stop an entity; SIGINT, SIGHUP and SIGUSR are recorded on its main stream)",
                sig.as_str()
            ),
        ));
    }
    let previous = entity.status.clone();
    let now = now_ms();
    let txid = new_txid();
    let mut value = json!({
        "signal": sig.as_str(),
        "sender": who.url(),
        "timestamp": timestamp(now),
    });
    if let Some(reason) = body.reason {
        value["reason"] = json!(reason);
    }
    if let Some(payload) = body.payload {
        value["payload"] = payload;
    }
    let key = generated_key("sig");
    // Only into the life checked above, as every entity write (`hold_life`).
    let _life = hold_life(&state, &entity).await?;
    let mut wrote = true;
    let new_state = match effect {
        SignalEffect::Stops => {
            value["status"] = json!("handled");
            value["handled_at"] = json!(timestamp(now));
            value["handled_by"] = json!(PrincipalKey::server().url());
            value["outcome"] = json!("transitioned");
            value["previous_state"] = json!(previous);
            value["new_state"] = json!("stopped");
            let row = ChangeEvent::insert(SIGNAL, &key, value, &txid, &timestamp(now));
            wrote = stop_entity_with(&state, &who, &entity, txid.clone(), vec![row]).await?.is_some();
            "stopped".to_owned()
        }
        _ => {
            if !entity.is_running() {
                return Err(not_running());
            }
            value["status"] = json!("unhandled");
            let row = ChangeEvent::insert(SIGNAL, &key, value, &txid, &timestamp(now));
            append_rows(state.store.as_ref(), &url.main_stream(), &[row], false).await?;
            previous.clone()
        }
    };
    let mut answer = json!({
        "url": entity.url,
        "signal": sig.as_str(),
        "previous_state": previous,
        "new_state": new_state,
        "created_at": now,
    });
    // Only when rows were written: a stop of a stopped entity writes none.
    if wrote {
        answer["txid"] = json!(txid);
    }
    Ok(Json(answer).into_response())
}

/// Deletes every stream of the entity, then the entity and its grants,
/// holding its life exclusively: no write checked against this life lands
/// after it (`access::Lives`).
pub async fn purge_entity(state: &AppState, url: &EntityUrl) -> ApiResult<()> {
    let life = state.lives.exclusive(&url.to_string()).await;
    purge_held(state, url, &life).await
}

/// [`purge_entity`] for a caller that holds the entity's life exclusively.
async fn purge_held(state: &AppState, url: &EntityUrl, _life: &Life) -> ApiResult<()> {
    let prefix = format!("{url}/attachments/");
    loop {
        let batch = state.store.list_prefix(&prefix, 256).await;
        if batch.is_empty() {
            break;
        }
        for info in batch {
            match state.store.delete(&info.path).await {
                Ok(()) | Err(StoreError::NotFound) | Err(StoreError::Gone) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    match state.store.delete(&url.main_stream()).await {
        Ok(()) | Err(StoreError::NotFound) | Err(StoreError::Gone) => {}
        Err(e) => return Err(e.into()),
    }
    state.views.forget(&url.main_stream());
    state.registry.remove_entity(&url.to_string()).await?;
    Ok(())
}

#[derive(Debug, Default, Deserialize)]
pub struct ListQuery {
    #[serde(default, rename = "type")]
    entity_type: Option<String>,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    limit: Option<String>,
    #[serde(default)]
    offset: Option<String>,
    /// `KEY:VALUE` (that tag with that value) or `KEY` (that tag, any value).
    #[serde(default)]
    tag: Option<String>,
    /// The children of this entity (`/type/id`), as Electric's list takes it.
    #[serde(default)]
    parent: Option<String>,
}

/// GET /_electric/entities: a JSON array of the entities the caller may read,
/// newest first, filtered by `type`, `status`, `parent` (its children) and `tag`
/// (`KEY:VALUE`, or `KEY` for any value); `limit` (1-1000, default 100) and `offset` page through it,
/// and `X-Total-Count` / `X-Next-Offset` say how many there are and where the next page starts.
pub async fn list(
    State(state): State<AppState>,
    Caller(who): Caller,
    Query(q): Query<ListQuery>,
) -> ApiResult<Response> {
    let limit = match q.limit.as_deref() {
        None => 100,
        Some(s) => s
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=1000).contains(n))
            .ok_or_else(|| ApiError::bad_request("limit must be 1 to 1000"))?,
    };
    let offset = match q.offset.as_deref() {
        None => 0,
        Some(s) => s.parse::<usize>().map_err(|_| ApiError::bad_request("offset must be a non-negative integer"))?,
    };
    let visible: Vec<EntityRecord> = state
        .registry
        .entities(q.entity_type.as_deref())
        .into_iter()
        .filter(|e| q.status.as_deref().is_none_or(|s| e.status == s))
        .filter(|e| q.parent.as_deref().is_none_or(|p| e.parent.as_deref() == Some(p)))
        .filter(|e| match q.tag.as_deref().map(|t| t.split_once(':').unwrap_or((t, ""))) {
            None => true,
            Some((key, "")) => e.tags.contains_key(key),
            Some((key, value)) => e.tags.get(key).is_some_and(|v| v == value),
        })
        .filter(|e| may(&state, &who, e, Permission::Read))
        .collect();
    let total = visible.len();
    let page: Vec<Value> = visible.iter().skip(offset).take(limit).map(entity_json).collect();
    let mut res = Json(page).into_response();
    let hm = res.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&total.to_string()) {
        hm.insert("x-total-count", v);
    }
    if offset + limit < total {
        if let Ok(v) = HeaderValue::from_str(&(offset + limit).to_string()) {
            hm.insert("x-next-offset", v);
        }
    }
    Ok(res)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendBody {
    #[serde(default)]
    payload: Option<Value>,
    #[serde(default)]
    key: Option<String>,
    #[serde(default, rename = "type")]
    message_type: Option<String>,
}

fn generated_key(prefix: &str) -> String {
    let n: u32 = rand::random();
    format!("{prefix}-{}-{}", now_ms(), radix36(n as u64))
}

fn radix36(mut n: u64) -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).unwrap_or_default()
}

/// Appends an inbox row; returns (key, txid).
pub async fn send_message(
    state: &AppState,
    who: &PrincipalKey,
    entity: &EntityRecord,
    payload: Value,
    key: Option<String>,
    message_type: Option<String>,
) -> ApiResult<(String, String)> {
    if !entity.is_running() {
        return Err(not_running());
    }
    let key = match key {
        Some(k) if k.is_empty() || k.len() > 256 || k.chars().any(char::is_control) => {
            return Err(ApiError::bad_request("an inbox key is 1 to 256 printable characters"))
        }
        Some(k) => k,
        None => generated_key("msg-in"),
    };
    // Checked against this life, written only into it (404 once purged).
    let _life = hold_life(state, entity).await?;
    let main = format!("{}/main", entity.url);
    {
        let view = state.views.get(state.store.as_ref(), &main).await?;
        if view.inbox.contains(&key) {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "DUPLICATE_KEY",
                format!("an inbox message with key {key:?} exists"),
            ));
        }
    }
    let now = timestamp(now_ms());
    let txid = new_txid();
    let mut value = json!({
        "from": who.url(),
        "from_principal": who.url(),
        "payload": payload,
        "timestamp": now,
        "mode": "immediate",
        "status": "processed",
        "processed_at": now,
    });
    if let Some(t) = message_type {
        value["message_type"] = json!(t);
    }
    append_rows(state.store.as_ref(), &main, &[ChangeEvent::insert(INBOX, &key, value, &txid, &now)], false).await?;
    Ok((key, txid))
}

pub async fn send(
    State(state): State<AppState>,
    Caller(who): Caller,
    Path((entity_type, instance_id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let url = entity_url(&entity_type, &instance_id)?;
    let body: SendBody = json_body(&state.bodies, &headers, body).await?;
    let entity = entity_for(&state, &who, &url, Permission::Write).await?;
    let (key, txid) =
        send_message(&state, &who, &entity, body.payload.unwrap_or(Value::Null), body.key, body.message_type).await?;
    Ok((StatusCode::OK, Json(json!({ "txid": txid, "key": key }))).into_response())
}

pub async fn list_grants(
    State(state): State<AppState>,
    Caller(who): Caller,
    Path((entity_type, instance_id)): Path<(String, String)>,
) -> ApiResult<Response> {
    let url = entity_url(&entity_type, &instance_id)?;
    let entity = entity_for(&state, &who, &url, Permission::Manage).await?;
    let grants: Vec<Value> = state.registry.grants(&entity.url).iter().map(grant_json).collect();
    Ok(Json(json!({ "grants": grants })).into_response())
}

pub async fn add_grant(
    State(state): State<AppState>,
    Caller(who): Caller,
    Path((entity_type, instance_id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let url = entity_url(&entity_type, &instance_id)?;
    let body: GrantBody = json_body(&state.bodies, &headers, body).await?;
    let entity = entity_for(&state, &who, &url, Permission::Manage).await?;
    let grant = body.into_new(&entity.url, &who)?;
    let stored = state.registry.add_grant(grant).await?;
    Ok((StatusCode::CREATED, Json(grant_json(&stored))).into_response())
}

pub async fn remove_grant(
    State(state): State<AppState>,
    Caller(who): Caller,
    Path((entity_type, instance_id, grant_id)): Path<(String, String, String)>,
) -> ApiResult<Response> {
    let url = entity_url(&entity_type, &instance_id)?;
    let id =
        grant_id.parse::<u64>().ok().filter(|n| *n > 0).ok_or_else(|| ApiError::bad_request("Invalid grant id"))?;
    let entity = entity_for(&state, &who, &url, Permission::Manage).await?;
    if !state.registry.remove_grant(&entity.url, id).await? {
        return Err(ApiError::not_found("Grant not found"));
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TagBody {
    value: Value,
}

fn tag_key(raw: &str) -> ApiResult<String> {
    if raw.is_empty() || raw.len() > 128 || raw.chars().any(char::is_control) {
        return Err(ApiError::bad_request("tag keys are 1 to 128 bytes, no control characters"));
    }
    Ok(raw.to_owned())
}

/// POST /_electric/entities/{type}/{id}/tags/{key} `{"value":"..."}` [write]:
/// sets a tag, then writes it as Electric does, a `tags` row (`insert` for a
/// new key, `update` for a changed value) on the main stream. The same value
/// again changes nothing and writes nothing. Answers as [`change_tag`] says.
pub async fn set_tag(
    State(state): State<AppState>,
    Caller(who): Caller,
    Path((entity_type, instance_id, key)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let url = entity_url(&entity_type, &instance_id)?;
    let key = tag_key(&key)?;
    let body: TagBody = json_body(&state.bodies, &headers, body).await?;
    let Value::String(value) = body.value else {
        return Err(ApiError::bad_request("Tag values must be strings"));
    };
    let entity = entity_for(&state, &who, &url, Permission::Write).await?;
    change_tag(&state, &who, &entity, key, Some(value)).await
}

/// DELETE /_electric/entities/{type}/{id}/tags/{key} [write]: removes a tag
/// (a `tags` `delete` row); removing an absent tag changes nothing.
pub async fn delete_tag(
    State(state): State<AppState>,
    Caller(who): Caller,
    Path((entity_type, instance_id, key)): Path<(String, String, String)>,
) -> ApiResult<Response> {
    let url = entity_url(&entity_type, &instance_id)?;
    let key = tag_key(&key)?;
    let entity = entity_for(&state, &who, &url, Permission::Write).await?;
    change_tag(&state, &who, &entity, key, None).await
}

/// Answers the entity (and the row's `txid`) to a caller that may read it; a
/// write-only caller learns only its own write: the `txid`, or `{}` when
/// nothing changed (never the entity's args, tags or timestamps).
async fn change_tag(
    state: &AppState,
    who: &PrincipalKey,
    entity: &EntityRecord,
    key: String,
    value: Option<String>,
) -> ApiResult<Response> {
    let reader = crate::access::may(state, who, entity, Permission::Read);
    let answer = |entity: &EntityRecord, txid: Option<&str>| {
        let mut out = if reader { entity_json(entity) } else { json!({}) };
        if let Some(txid) = txid {
            out["txid"] = json!(txid);
        }
        Json(out).into_response()
    };
    if !entity.is_running() {
        return Err(not_running());
    }
    // Exclusive: two tag writes land in the registry and on the stream in one order.
    let _life = state.lives.exclusive(&entity.url).await;
    let Some(current) = state.registry.entity(&entity.url).await.filter(|now| now.incarnation == entity.incarnation)
    else {
        return Err(entity_not_found(&entity.url));
    };
    if !current.is_running() {
        return Err(not_running());
    }
    let previous = current.tags.get(&key).cloned();
    if previous == value {
        return Ok(answer(&current, None));
    }
    if let Some(v) = &value {
        let mut tags = current.tags.clone();
        tags.insert(key.clone(), v.clone());
        let max = state.config.max_entity_data_bytes;
        if json_size(&current.args) + json_size(&Some(tags)) > max {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "ENTITY_DATA_TOO_LARGE",
                format!("args and tags are at most {max} bytes of JSON together (max_entity_data_bytes)"),
            ));
        }
    }
    let now = now_ms();
    let (k, v) = (key.clone(), value.clone());
    let updated = state
        .registry
        .update_entity(
            &entity.url,
            Box::new(move |e| {
                match v {
                    Some(v) => e.tags.insert(k, v),
                    None => e.tags.remove(&k),
                };
                e.updated_at_ms = now;
                Ok(())
            }),
        )
        .await?;
    let txid = new_txid();
    let at = timestamp(now);
    let row = match (&previous, &value) {
        (_, None) => ChangeEvent::delete(TAGS, &key, &txid, &at),
        (None, Some(v)) => ChangeEvent::insert(TAGS, &key, json!({ "key": key, "value": v }), &txid, &at),
        (Some(_), Some(v)) => ChangeEvent::update(TAGS, &key, json!({ "key": key, "value": v }), &txid, &at),
    };
    append_rows(state.store.as_ref(), &format!("{}/main", entity.url), &[row], false).await?;
    Ok(answer(&updated, Some(&txid)))
}

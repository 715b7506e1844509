//! Spawning an entity (`PUT /_electric/entities/{type}/{id}`), and the
//! lineage a spawn or a fork puts a child under.

use std::collections::BTreeMap;

use attache_core::state::{timestamp, ChangeEvent, ENTITY_CREATED};
use attache_core::{EntityUrl, Permission, PrincipalKey, Propagation};
use attache_storage::{Ancestor, CreateOutcome, CreateStream, EntityRecord, NewGrant, RawJson, StoreError};
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::access::{entity_for, now_ms, EntityRoute};
use crate::error::{ApiError, ApiResult};
use crate::http::json_body;
use crate::rows::{json_content_type, new_txid, rows_body};
use crate::AppState;

use super::grants::GrantBody;
use super::send::send_message_in;
use super::{entity_json, json_size};

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
        Err(ApiError::EntityNotFound { .. }) => {
            return Err(ApiError::not_found(format!("Parent entity not found at {url}")))
        }
        Err(ApiError::NotPermitted { .. }) => {
            return Err(ApiError::NotPermitted { message: format!("{} may not spawn children under {url}", who.url()) })
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
    child: &EntityRecord,
) -> ApiResult<()> {
    let now = now_ms();
    // The parent's grants in the life its lineage was checked against: read,
    // then that life checked to be the current one still (lives never come
    // back, so grants read before a check that passes are that life's; no
    // lock, which the caller may hold already). Purged and spawned again by
    // someone else meanwhile, its grants are another entity's: 404.
    let grants = state.registry.grants(&parent.url);
    if !crate::access::same_incarnation(state, parent).await {
        return Err(crate::access::entity_not_found(&parent.url));
    }
    for g in grants {
        if !g.copy_to_children || g.expires_at_ms.is_some_and(|at| now >= at) {
            continue;
        }
        state
            .registry
            .add_grant(NewGrant {
                entity_url: child.url.clone(),
                incarnation: child.incarnation.clone(),
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
    extra: Option<RawJson>,
) -> ApiResult<(EntityRecord, bool, String)> {
    spawn_entity_under(state, who, url, args, tags, extra, None).await
}

/// The refusal code of [`entity_room`].
pub const TOO_MANY_ENTITIES: &str = "TOO_MANY_ENTITIES";

/// 409 `TOO_MANY_ENTITIES` when `who` holds `max_entities_per_principal`
/// entities already (tasks are entities; a tombstone of a deleted task
/// counts until it is purged), or when their client data (spawn args, tags,
/// task metadata) with `adding` more bytes would pass
/// `max_entity_data_bytes_per_principal`. The registry keeps every entity in
/// memory, so one principal's spawns (40,000 small tasks: +140 MB; 3,000
/// entities with 60 KB of args: +280 MB, session 15's attack pass; 26,641 of
/// them: +900 MB, session 16's) must not grow it without end. Checked before
/// anything is written; spawns racing on one principal may pass it by as
/// many as are in flight together.
pub fn entity_room(state: &AppState, who: &PrincipalKey, adding: usize) -> ApiResult<crate::quota::Reserved> {
    let owner = who.url();
    let new = crate::quota::Pending { entities: 1, data_bytes: adding, streams: 0 };
    state.in_flight.reserve(&owner, new, |pending| {
        let mut held = state.registry.held_by(&owner);
        held.entities += pending.entities;
        held.data_bytes += pending.data_bytes;
        entity_room_beside(state, who, held, adding)
    })
}

/// [`entity_room`]'s rule, against `held` (the registry's count and the creates in flight).
fn entity_room_beside(
    state: &AppState,
    who: &PrincipalKey,
    held: attache_storage::Holdings,
    adding: usize,
) -> ApiResult<()> {
    let max = state.config.max_entities_per_principal;
    if held.entities >= max {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            TOO_MANY_ENTITIES,
            format!(
                "{who} holds {} entities, the most one principal may (max_entities_per_principal: {max}); \
                 purge some (DELETE /_electric/entities/{{type}}/{{id}}?purge=true) to make room",
                held.entities
            ),
        ));
    }
    data_room_beside(state, &who.url(), held, adding)
}

/// 409 `TOO_MANY_ENTITIES` when `adding` more bytes of client data would take
/// what the entities of `owner` (a principal's URL) keep past
/// `max_entity_data_bytes_per_principal` (`held`: what the registry says it holds).
pub fn data_room(
    state: &AppState,
    owner: &str,
    held: attache_storage::Holdings,
    adding: usize,
) -> ApiResult<crate::quota::Reserved> {
    let new = crate::quota::Pending { data_bytes: adding, ..Default::default() };
    state.in_flight.reserve(owner, new, |pending| {
        let held = attache_storage::Holdings { data_bytes: held.data_bytes + pending.data_bytes, ..held };
        data_room_beside(state, owner, held, adding)
    })
}

/// [`data_room`]'s rule, against `held` (the registry's count and the creates in flight).
fn data_room_beside(state: &AppState, owner: &str, held: attache_storage::Holdings, adding: usize) -> ApiResult<()> {
    let max = state.config.max_entity_data_bytes_per_principal;
    if adding > 0 && held.data_bytes.saturating_add(adding) > max {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            TOO_MANY_ENTITIES,
            format!(
                "the entities of {owner} keep {} bytes of spawn args, tags and task metadata, and {adding} more \
                 would pass the most one principal's may keep (max_entity_data_bytes_per_principal: {max}); \
                 purge entities or make their data smaller",
                held.data_bytes
            ),
        ));
    }
    Ok(())
}

/// A create on a taken entity URL: says that it is taken, nothing more.
fn duplicate_url(url: &str) -> ApiError {
    ApiError::DuplicateUrl { url: url.to_owned() }
}

/// [`spawn_entity`], as a child of `lineage`'s parent when given.
async fn spawn_entity_under(
    state: &AppState,
    who: &PrincipalKey,
    url: &EntityUrl,
    args: Option<Value>,
    tags: BTreeMap<String, String>,
    extra: Option<RawJson>,
    lineage: Option<&Lineage>,
) -> ApiResult<(EntityRecord, bool, String)> {
    // Refused whether or not an entity (of an older release) holds the name: the answer says nothing of it.
    EntityUrl::for_new_entity(url.entity_type(), url.instance_id())?;
    let key = url.to_string();
    if let Some(existing) = state.registry.entity(&key).await {
        return if existing.created_by == who.url() {
            Ok((existing, false, String::new()))
        } else {
            Err(duplicate_url(&key))
        };
    }
    let adding = attache_storage::registry::data_bytes(json_size(&args), extra.as_ref(), &tags);
    let _rooms = (entity_room(state, who, adding)?, crate::streams::stream_room(state, who, 1)?);
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
        args: args.as_ref().map(attache_storage::registry::RawJson::of).transpose().map_err(ApiError::internal)?,
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
    route: EntityRoute,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let EntityRoute { who, url } = &route;
    let (body, _tree): (SpawnBody, _) = json_body(&state.bodies, who, &headers, body).await?;
    // Validate everything before anything is written.
    let grants = body
        .grants
        .unwrap_or_default()
        .into_iter()
        .map(|g| g.into_new(&url.to_string(), None, who))
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
        Some(parent) => Some(lineage_under(&state, who, parent).await?),
        None => None,
    };
    // The URL's life, exclusively (one spawn of it at a time, none during a
    // purge of it), and from the main stream's creation through the grants
    // and the initial message on a task of its own holding it: a request
    // dropped midway no longer leaves the entity without the grants or the
    // initial message its spawn gave (a retried spawn answers 200 with the
    // entity as it is, and would not add them; `super::run_to_end`).
    let life = state.lives.exclusive(&url.to_string()).await;
    let (state_, who, url) = (state.clone(), who.clone(), url.clone());
    let (status, out) = super::run_to_end(&state, async move {
        let state = &state_;
        let tags = body.tags.unwrap_or_default();
        let (entity, fresh, txid) =
            spawn_entity_under(state, &who, &url, body.args, tags, None, lineage.as_ref()).await?;
        if !fresh {
            return Ok((StatusCode::OK, entity_json(&entity)));
        }
        crate::pause::at(state, crate::pause::SPAWN_REST).await;
        if let Some(lineage) = &lineage {
            copy_grants_to_child(state, &who, &lineage.parent, &entity).await?;
        }
        for mut grant in grants {
            grant.incarnation = entity.incarnation.clone();
            state.registry.add_grant(grant).await?;
        }
        if let Some(payload) = body.initial_message {
            send_message_in(state, &who, &entity, payload, None, body.initial_message_type, Some(&life)).await?;
        }
        drop(life);
        let mut out = entity_json(&entity);
        out["txid"] = json!(txid);
        Ok((StatusCode::CREATED, out))
    })
    .await?;
    Ok((status, Json(out)).into_response())
}

//! Grants on an entity: Electric's grant body and JSON, and the routes
//! that list, add and revoke them [manage].

use attache_core::state::timestamp;
use attache_core::{ExpiresAt, GrantSubject, Permission, PrincipalKey, Propagation};
use attache_storage::{GrantRecord, NewGrant};
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::access::{entity_not_found, hold_life, EntityRoute};
use crate::error::{ApiError, ApiResult};
use crate::http::json_body;
use crate::AppState;

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
    /// The grant this body asks for on the entity at `entity_url`, in its
    /// life `incarnation` (the registry stores it only while that lasts).
    pub(super) fn into_new(
        self,
        entity_url: &str,
        incarnation: Option<&str>,
        created_by: &PrincipalKey,
    ) -> ApiResult<NewGrant> {
        let subject = GrantSubject::parse(&self.subject_kind, &self.subject_value)?;
        let permission = Permission::parse(&self.permission)?;
        let propagation = self.propagation.as_deref().map(Propagation::parse).transpose()?.unwrap_or_default();
        let expires = self.expires_at.as_deref().map(ExpiresAt::parse).transpose()?;
        Ok(NewGrant {
            entity_url: entity_url.to_owned(),
            incarnation: incarnation.map(str::to_owned),
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

/// 409 `TOO_MANY_GRANTS` when the entity holds `max_grants_per_entity`
/// grants already: the registry keeps every grant in memory (~750 B each),
/// and before (session 16's attack pass) nothing bounded them: 25,700 grants
/// on one entity in 30 s, kept across restarts, made a 10 MB grants list.
/// Counted as this instance knows them: grants racing on one entity may
/// pass it by as many as are in flight together.
fn grant_room(state: &AppState, entity: &attache_storage::EntityRecord) -> ApiResult<crate::quota::Reserved> {
    let entity_url = entity.url.as_str();
    // Every grant is data its entity's creator keeps in memory: 200 entities
    // took 179,426 grants in 60 s past the per-entity bound (+73 MB after a
    // restart: session 16's second attack pass).
    let holdings = state.registry.held_by(&entity.created_by);
    let room = super::data_room(state, &entity.created_by, holdings, attache_storage::registry::GRANT_BYTES)?;
    let max = state.config.max_grants_per_entity;
    let held = state.registry.grants(entity_url).len();
    if held >= max {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "TOO_MANY_GRANTS",
            format!(
                "{entity_url} holds {held} grants, the most an entity may (max_grants_per_entity: {max}); \
                 revoke some (DELETE /_electric/entities{entity_url}/grants/{{id}}) to make room"
            ),
        ));
    }
    Ok(room)
}

pub async fn list_grants(State(state): State<AppState>, route: EntityRoute) -> ApiResult<Response> {
    let entity = route.authorize(&state, Permission::Manage).await?;
    let grants: Vec<Value> = state.registry.grants(&entity.url).iter().map(grant_json).collect();
    crate::http::budgeted_json(&state.answers, &route.who, StatusCode::OK, &json!({ "grants": grants }))
}

pub async fn add_grant(
    State(state): State<AppState>,
    route: EntityRoute,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let who = &route.who;
    let (body, _tree): (GrantBody, _) = json_body(&state.bodies, who, &headers, body).await?;
    let entity = route.authorize(&state, Permission::Manage).await?;
    let grant = body.into_new(&entity.url, entity.incarnation.as_deref(), who)?;
    let _room = grant_room(&state, &entity)?;
    crate::pause::at(&state, crate::pause::GRANT_WRITE).await;
    // Into the life checked above only, as every entity write: a purge between
    // the check and the write makes this a 404, not a grant on whatever is
    // spawned at the URL next (the registry checks the life again, for other instances).
    let _life = hold_life(&state, &entity).await?;
    let stored = state.registry.add_grant(grant).await.map_err(|e| match e {
        attache_storage::StoreError::NotFound => entity_not_found(&entity.url),
        e => e.into(),
    })?;
    Ok((StatusCode::CREATED, Json(grant_json(&stored))).into_response())
}

pub async fn remove_grant(
    State(state): State<AppState>,
    route: EntityRoute,
    Path((_, _, grant_id)): Path<(String, String, String)>,
) -> ApiResult<Response> {
    let id =
        grant_id.parse::<u64>().ok().filter(|n| *n > 0).ok_or_else(|| ApiError::bad_request("Invalid grant id"))?;
    let entity = route.authorize(&state, Permission::Manage).await?;
    // Only from the life checked above: a revoke racing a purge and a new
    // spawn must not take a grant of the next entity at the URL.
    let _life = hold_life(&state, &entity).await?;
    if !state.registry.remove_grant(&entity.url, id).await? {
        return Err(ApiError::not_found("Grant not found"));
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

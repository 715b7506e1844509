//! Permission checks for every path that touches an entity or a stream.
//! 404 when the caller may not read (existence does not leak), 403 when it
//! may read but not do this.

use attache_core::entity::permits;
use attache_core::{EntityUrl, Permission, PrincipalKey};
use attache_storage::{EntityRecord, StreamInfo};
use axum::http::StatusCode;

use crate::error::{ApiError, ApiResult};
use crate::AppState;

pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

pub fn entity_not_found(url: &str) -> ApiError {
    ApiError::not_found(format!("Entity not found at {url}"))
}

/// May `who` do `wanted` on `entity`?
pub fn may(state: &AppState, who: &PrincipalKey, entity: &EntityRecord, wanted: Permission) -> bool {
    let grants = state.registry.grants(&entity.url);
    permits(
        who,
        Some(&entity.created_by),
        grants.iter().map(|g| (&g.subject, g.permission, g.expires_at_ms)),
        wanted,
        now_ms(),
    )
}

/// Looks up an entity the caller may act on, or answers 404/403.
pub fn entity_for(
    state: &AppState,
    who: &PrincipalKey,
    url: &EntityUrl,
    wanted: Permission,
) -> ApiResult<EntityRecord> {
    let key = url.to_string();
    let entity = state.registry.entity(&key).ok_or_else(|| entity_not_found(&key))?;
    if !may(state, who, &entity, Permission::Read) {
        return Err(entity_not_found(&key));
    }
    if !may(state, who, &entity, wanted) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "FORBIDDEN",
            format!("{} may not {} {key}", who.url(), wanted.as_str()),
        ));
    }
    Ok(entity)
}

/// Plain streams belong to their creator; built-in system principals may do anything.
pub fn owns_stream(who: &PrincipalKey, info: &StreamInfo) -> bool {
    who.is_built_in_system()
        || info
            .owner
            .as_deref()
            .and_then(|o| o.split_once(':'))
            .is_some_and(|(kind, id)| kind == who.kind().as_str() && id == who.id())
}

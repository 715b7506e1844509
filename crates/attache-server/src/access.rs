//! Permission checks for every path that touches an entity or a stream.
//! On the entity routes, 404 when the caller holds nothing on the entity
//! (existence does not leak), 403 when it holds something but not the
//! permission the route needs.

use attache_core::entity::{access, permits, Access};
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

/// Looks up an entity the caller may act on, or answers 404 (it holds nothing
/// on the entity: the entity does not exist for it) or 403 (it holds
/// something, not this permission). The route table in `router.rs` says which
/// permission each route wants (Electric's: a write-only principal may upload).
pub fn entity_for(
    state: &AppState,
    who: &PrincipalKey,
    url: &EntityUrl,
    wanted: Permission,
) -> ApiResult<EntityRecord> {
    let key = url.to_string();
    let entity = state.registry.entity(&key).ok_or_else(|| entity_not_found(&key))?;
    let grants = state.registry.grants(&entity.url);
    let grants = grants.iter().map(|g| (&g.subject, g.permission, g.expires_at_ms));
    match access(who, Some(&entity.created_by), grants, wanted, now_ms()) {
        Access::Allowed => Ok(entity),
        Access::Hidden => Err(entity_not_found(&key)),
        Access::Forbidden => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "FORBIDDEN",
            format!("{} may not {} {key}", who.url(), wanted.as_str()),
        )),
    }
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

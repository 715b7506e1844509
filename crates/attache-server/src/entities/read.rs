//! Reading entities: one (`GET .../{type}/{id}`) and the list the caller
//! may read (`GET /_electric/entities`).

use attache_core::Permission;
use attache_storage::EntityRecord;
use axum::extract::{Query, State};
use axum::http::HeaderValue;
use axum::response::Response;
use serde::Deserialize;

use crate::access::{may, EntityRoute};
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::AppState;

use super::entity_json;

pub async fn get_entity(State(state): State<AppState>, route: EntityRoute) -> ApiResult<Response> {
    let entity = route.authorize(&state, Permission::Read).await?;
    // Up to --max-entity-data-bytes of spawn args and tags: held within the response budget as the lists are.
    crate::http::budgeted_json(&state.answers, &route.who, axum::http::StatusCode::OK, &entity_json(&entity))
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
    let mut visible: Vec<std::sync::Arc<EntityRecord>> = Vec::new();
    // Only the entities the caller may possibly see (not every principal's), each checked.
    for (i, e) in state.registry.entities_for(&who, q.entity_type.as_deref()).into_iter().enumerate() {
        crate::access::scan_step(i).await;
        let wanted = q.status.as_deref().is_none_or(|s| e.status == s)
            && q.parent.as_deref().is_none_or(|p| e.parent.as_deref() == Some(p))
            && match q.tag.as_deref().map(|t| t.split_once(':').unwrap_or((t, ""))) {
                None => true,
                Some((key, "")) => e.tags.contains_key(key),
                Some((key, value)) => e.tags.get(key).is_some_and(|v| v == value),
            };
        if wanted && may(&state, &who, &e, Permission::Read) {
            visible.push(e);
        }
    }
    let total = visible.len();
    // Each entity's JSON made as it is written, not the page's first (1,000
    // entities with large spawn args are tens of MB of values).
    struct Page<'a>(&'a [std::sync::Arc<EntityRecord>]);
    impl serde::Serialize for Page<'_> {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.collect_seq(self.0.iter().map(|e| entity_json(e)))
        }
    }
    let page = &visible[offset.min(total)..(offset.saturating_add(limit)).min(total)];
    // Held until sent, within the response budget (a page of 1,000 entities
    // with large spawn args is tens of MB, and a client that reads nothing
    // kept it: 50 such over one HTTP/2 connection held 1.3 GB).
    let mut res = crate::http::budgeted_json(&state.answers, &who, axum::http::StatusCode::OK, &Page(page))?;
    drop(visible);
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

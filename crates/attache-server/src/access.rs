//! Permission checks for every path that touches an entity or a stream.
//! On the entity routes, 404 when the caller holds nothing on the entity
//! (existence does not leak), 403 when it holds something but not the
//! permission the route needs. Every entity route starts from one
//! [`EntityRoute`] (the caller and the entity its URL names) and checks its
//! permission with [`EntityRoute::authorize`].

use std::collections::HashMap;
use std::sync::Arc;

use attache_core::entity::{access, permits, Access};
use attache_core::{EntityUrl, Permission, PrincipalKey, Propagation};
use attache_storage::{EntityRecord, GrantRecord, StreamInfo};
use axum::extract::{FromRequestParts, Path};
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};

use crate::error::{ApiError, ApiResult};
use crate::AppState;

pub use attache_core::now_ms;

pub fn entity_not_found(url: &str) -> ApiError {
    ApiError::EntityNotFound { url: url.to_owned() }
}

/// The grants that apply to `entity` for `who`: its own (whatever their
/// propagation), and the `descendants` grants of each ancestor whose life is
/// still the one it was spawned under (a purged ancestor's URL spawned again
/// by anyone is another entity, and its grants reach no one's old children),
/// each of them only if its subject is `who` (its URL or its kind), the only
/// ones a check of `who` looks at. Memory only. Before (session 18's attack
/// pass), every check copied every grant of the entity and of its up to 32
/// ancestors: a chain of 32 entities with 1,000 grants each took another
/// principal's entity list from 0.46 to 20 ms.
pub fn grants_for(state: &AppState, who: &PrincipalKey, entity: &EntityRecord) -> Vec<GrantRecord> {
    let mut grants = state.registry.grants_to(&entity.url, who);
    for ancestor in &entity.ancestors {
        if state.registry.is_current(&ancestor.url, ancestor.incarnation.as_deref()) {
            let inherited = state.registry.grants_to(&ancestor.url, who);
            grants.extend(inherited.into_iter().filter(|g| g.propagation == Propagation::Descendants));
        }
    }
    grants
}

/// How many entities a scan of a caller's candidate entities (`task.list`,
/// `task.claim`, the entity list, each from `Registry::entities_for`) looks
/// at between two yields to the runtime: the candidates may be many (a
/// principal's own thousands of tasks, or everything granted to its kind),
/// and the scan must not hold a worker while others wait.
pub const SCAN_STEP: usize = 256;

/// Yields to the runtime once every [`SCAN_STEP`] entities of a scan (`i`: the entity's place in it).
pub async fn scan_step(i: usize) {
    if i % SCAN_STEP == SCAN_STEP - 1 {
        tokio::task::yield_now().await;
    }
}

/// Runs `work`, synchronous work that may take long (parsing megabytes of
/// rows, writing a large answer), on the async worker it is called from;
/// when `heavy`, tells the runtime first, so the worker's other tasks move to
/// another thread meanwhile. Before (session 17's attack pass), 64 concurrent
/// `task.get` of large tasks held both workers parsing their views and
/// `/healthz` waited 5 to 9 s. (A runtime of one thread, as in tests, runs it inline.)
pub fn cpu_heavy<T>(heavy: bool, work: impl FnOnce() -> T) -> T {
    let multi = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    if heavy && multi {
        tokio::task::block_in_place(work)
    } else {
        work()
    }
}

/// Bytes of work past which [`cpu_heavy`] hands the worker's other tasks on.
pub const CPU_HEAVY_BYTES: usize = 256 << 10;

/// May `who` do `wanted` on `entity`?
pub fn may(state: &AppState, who: &PrincipalKey, entity: &EntityRecord, wanted: Permission) -> bool {
    let grants = grants_for(state, who, entity);
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
pub async fn entity_for(
    state: &AppState,
    who: &PrincipalKey,
    url: &EntityUrl,
    wanted: Permission,
) -> ApiResult<EntityRecord> {
    let key = url.to_string();
    let entity = state.registry.entity(&key).await.ok_or_else(|| entity_not_found(&key))?;
    let grants = grants_for(state, who, &entity);
    let grants = grants.iter().map(|g| (&g.subject, g.permission, g.expires_at_ms));
    match access(who, Some(&entity.created_by), grants, wanted, now_ms()) {
        Access::Allowed => Ok(entity),
        Access::Hidden => Err(entity_not_found(&key)),
        Access::Forbidden => {
            Err(ApiError::NotPermitted { message: format!("{} may not {} {key}", who.url(), wanted.as_str()) })
        }
    }
}

/// What every entity route (`/_electric/entities/{entity_type}/{instance_id}/...`)
/// starts from, as an extractor: the authenticated caller (401 first, as
/// [`crate::auth::Caller`]), then the entity URL the route names (400 when it
/// is not one). The entity itself is looked up by [`EntityRoute::authorize`],
/// which a route calls once it has refused what it can refuse without it, so
/// each route keeps its order of checks.
#[derive(Debug, Clone)]
pub struct EntityRoute {
    pub who: PrincipalKey,
    pub url: EntityUrl,
}

/// The entity part of an entity route's path; the route's other parameters
/// (an attachment id, a grant id, a tag key) are extracted by the route.
#[derive(serde::Deserialize)]
struct EntityPathParams {
    entity_type: String,
    instance_id: String,
}

impl FromRequestParts<AppState> for EntityRoute {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<EntityRoute, Response> {
        let who = state.auth.authenticate(&parts.headers).map_err(IntoResponse::into_response)?;
        let Path(params) =
            Path::<EntityPathParams>::from_request_parts(parts, state).await.map_err(IntoResponse::into_response)?;
        let url =
            crate::http::entity_url(&params.entity_type, &params.instance_id).map_err(IntoResponse::into_response)?;
        Ok(EntityRoute { who, url })
    }
}

impl EntityRoute {
    /// The entity, for a caller that may do `wanted` on it: 404 when it holds
    /// nothing on it, 403 when it holds something else ([`entity_for`]).
    pub async fn authorize(&self, state: &AppState, wanted: Permission) -> ApiResult<EntityRecord> {
        entity_for(state, &self.who, &self.url, wanted).await
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

/// Per-entity life locks. An entity URL is reused: after a purge anyone may
/// spawn a new entity there, with a new `incarnation`. A server write to an
/// entity's main stream is authorized against one life (the record the
/// permission check read); it holds that entity's lock shared while it checks
/// that the life is still the current one and writes ([`hold_life`]), and a
/// purge holds it exclusively from before it deletes anything until the
/// record is gone, so a write checked against one life never lands in the
/// next one. Entries go as soon as nobody holds them.
#[derive(Debug, Default)]
pub struct Lives(parking_lot::Mutex<HashMap<String, Arc<tokio::sync::RwLock<()>>>>);

/// A held life lock (shared or exclusive); released, and its entry dropped
/// when unused, on drop.
pub struct Life {
    guard: Option<LifeGuard>,
    lock: Arc<tokio::sync::RwLock<()>>,
    lives: Arc<Lives>,
    url: String,
}

#[allow(dead_code)] // the guards are held for their Drop
enum LifeGuard {
    Shared(tokio::sync::OwnedRwLockReadGuard<()>),
    Exclusive(tokio::sync::OwnedRwLockWriteGuard<()>),
}

impl Lives {
    fn lock_of(&self, url: &str) -> Arc<tokio::sync::RwLock<()>> {
        self.0.lock().entry(url.to_owned()).or_default().clone()
    }

    /// Holds `url`'s life shared (writes checked against a life).
    pub async fn shared(self: &Arc<Self>, url: &str) -> Life {
        let lock = self.lock_of(url);
        let guard = LifeGuard::Shared(lock.clone().read_owned().await);
        Life { guard: Some(guard), lock, lives: self.clone(), url: url.to_owned() }
    }

    /// Holds `url`'s life exclusively (a purge, a stop).
    pub async fn exclusive(self: &Arc<Self>, url: &str) -> Life {
        let lock = self.lock_of(url);
        let guard = LifeGuard::Exclusive(lock.clone().write_owned().await);
        Life { guard: Some(guard), lock, lives: self.clone(), url: url.to_owned() }
    }

    /// How many entities have a life lock entry (tests and diagnostics).
    pub fn len(&self) -> usize {
        self.0.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for Life {
    fn drop(&mut self) {
        self.guard.take();
        let mut map = self.lives.0.lock();
        // The map's reference and ours: nobody else holds or waits for it.
        if Arc::strong_count(&self.lock) == 2 {
            map.remove(&self.url);
        }
    }
}

/// Is `record`'s life still the one at its URL (same incarnation; purged and
/// spawned again, by anyone, it is another entity)?
pub async fn same_incarnation(state: &AppState, record: &EntityRecord) -> bool {
    state.registry.entity_shared(&record.url).await.is_some_and(|now| now.incarnation == record.incarnation)
}

/// Holds the life of the entity `record` was read from, shared, for a write
/// authorized against it; 404 (as for a missing entity) when it was purged
/// meanwhile, whether or not something else holds the URL now.
pub async fn hold_life(state: &AppState, record: &EntityRecord) -> ApiResult<Life> {
    crate::pause::at(state, crate::pause::ENTITY_WRITE).await;
    let life = state.lives.shared(&record.url).await;
    if !same_incarnation(state, record).await {
        return Err(entity_not_found(&record.url));
    }
    Ok(life)
}

/// [`hold_life`], exclusively: for a write that stops the entity, so that no
/// write decided while it ran (a task change, `tasks::writes::hold_task`)
/// straddles the stop.
pub async fn hold_life_exclusive(state: &AppState, record: &EntityRecord) -> ApiResult<Life> {
    crate::pause::at(state, crate::pause::ENTITY_WRITE).await;
    let life = state.lives.exclusive(&record.url).await;
    if !same_incarnation(state, record).await {
        return Err(entity_not_found(&record.url));
    }
    Ok(life)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    /// While one task's heavy work runs, the other tasks of its worker go on
    /// elsewhere: on a runtime of one worker, a ping answers long before the
    /// work ends (inline, it waited for all of it).
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn heavy_work_lets_the_workers_other_tasks_run() {
        let started = Instant::now();
        let work = tokio::spawn(async {
            super::cpu_heavy(true, || std::thread::sleep(Duration::from_millis(800)));
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let ping = tokio::spawn(async { Instant::now() }).await.expect("the ping ran");
        assert!(ping.duration_since(started) < Duration::from_millis(600), "{:?}", ping.duration_since(started));
        work.await.expect("the work ran");
    }
}

//! The registry in PostgreSQL: entities and grants, cached whole in every
//! instance (permission checks run on every request) and refreshed from
//! `NOTIFY attache_registry`. Each write is one transaction; `update_entity`
//! locks the entity's row (`SELECT ... FOR UPDATE`) for its compare-and-set,
//! so two instances claiming one task cannot both win.
//!
//! The cache never takes what a read found over something newer it heard of
//! meanwhile. Whatever reads an entity and its grants to put them in the
//! cache (a lookup of an entity not cached yet, the listener after a
//! notification, a write of this instance) holds a [`Ticket`] from before its
//! read; every change of the URL this instance hears of (a notification
//! taken from the listening connection, a write of its own committed, a
//! reload of everything) is counted on the tickets held for it, and a read
//! whose ticket counted one reads again instead of installing. A change the
//! read missed and the instance has not heard of yet will be heard: its
//! notification arrives after its commit, and the listener reads the URL
//! again then. Before, a lookup that read a grant before its revoke (through
//! another instance) and installed after the listener had applied the
//! revoke put the grant back, for as long as the entity did not change again.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use parking_lot::{Mutex, RwLock};
use sqlx::PgPool;

use super::{db_err, Io, Shared, REGISTRY_CHANGES};
use crate::error::{StoreError, StoreResult};
use crate::records::Records;
use crate::registry::{EntityRecord, EntityUpdate, GrantRecord, NewGrant, Registry};

/// How many times a refresh reads again when changes keep being heard while it
/// reads; then it installs nothing (the change it heard brings a read of its own).
const REFRESH_ATTEMPTS: usize = 4;

fn json<T: serde::Serialize>(v: &T) -> StoreResult<String> {
    serde_json::to_string(v).map_err(|e| StoreError::Storage(e.to_string()))
}

fn parse<T: serde::de::DeserializeOwned>(s: &str) -> StoreResult<T> {
    serde_json::from_str(s).map_err(|e| StoreError::Storage(format!("corrupt registry record: {e}")))
}

#[derive(Default)]
struct State {
    /// Every entity (with its row version) and grant, with the indexes
    /// `entities_for` reads; every change of the cache goes through it.
    records: Records,
    /// URLs being read or written now, each with the changes heard of it
    /// since the oldest ticket for it was taken. An entry lives as long as
    /// its tickets, so this holds no more than the reads and writes in flight.
    reading: HashMap<String, Reading>,
    /// Whole reloads of the registry (after the listening connection was
    /// lost, when notifications may have been missed).
    reloads: u64,
}

#[derive(Default)]
struct Reading {
    tickets: usize,
    changes: u64,
}

impl State {
    /// A change of `url` was heard: reads of it in flight must not install what they found.
    fn heard(&mut self, url: &str) {
        if let Some(reading) = self.reading.get_mut(url) {
            reading.changes += 1;
        }
    }
}

/// Taken before a read (or write) of one URL; [`Ticket::unchanged`] says
/// whether the cache heard of no change of the URL since.
struct Ticket<'a> {
    cache: &'a Cache,
    url: String,
    changes: u64,
    reloads: u64,
}

impl Ticket<'_> {
    fn unchanged(&self, state: &State) -> bool {
        state.reloads == self.reloads && state.reading.get(&self.url).is_some_and(|r| r.changes == self.changes)
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        let mut state = self.cache.state.write();
        if let Some(reading) = state.reading.get_mut(&self.url) {
            reading.tickets -= 1;
            if reading.tickets == 0 {
                state.reading.remove(&self.url);
            }
        }
    }
}

/// What this instance knows of the registry.
#[derive(Default)]
pub(crate) struct Cache {
    state: RwLock<State>,
    pauses: Pauses,
}

impl Cache {
    pub(crate) async fn load_all(&self, pool: &PgPool) -> StoreResult<()> {
        let entities: Vec<(String, String, i64)> = sqlx::query_as("SELECT url, record, version FROM attache_entities")
            .fetch_all(pool)
            .await
            .map_err(db_err)?;
        let grants: Vec<(String,)> =
            sqlx::query_as("SELECT record FROM attache_grants ORDER BY id").fetch_all(pool).await.map_err(db_err)?;
        // Indexed as it is read, outside the lock; installed whole.
        let mut loaded = Records::default();
        for (_, record, version) in entities {
            loaded.put(version, Arc::new(parse(&record)?));
        }
        for (record,) in grants {
            let g: GrantRecord = parse(&record)?;
            let url = g.entity_url.clone();
            loaded.change_grants(&url, |list| list.push(g));
        }
        let mut state = self.state.write();
        state.records = loaded;
        // Reads in flight may have missed a change no notification will tell of.
        state.reloads += 1;
        Ok(())
    }

    fn ticket(&self, url: &str) -> Ticket<'_> {
        let mut state = self.state.write();
        let reloads = state.reloads;
        let reading = state.reading.entry(url.to_owned()).or_default();
        reading.tickets += 1;
        Ticket { cache: self, url: url.to_owned(), changes: reading.changes, reloads }
    }

    /// Waits at `point` if a test armed it.
    pub(crate) async fn pause(&self, point: &str) {
        self.pauses.at(point).await;
    }

    /// Notes a change of `url` announced by a notification (before it is read again).
    pub(crate) fn heard(&self, url: &str) {
        self.state.write().heard(url);
    }

    /// Re-reads one entity and its grants (after a notification, or for a
    /// lookup of an entity not cached) and installs them, unless a change of
    /// it was heard meanwhile: then it reads again.
    pub(crate) async fn refresh(&self, pool: &PgPool, url: &str) -> StoreResult<Option<EntityRecord>> {
        self.refresh_then(pool, url, None).await
    }

    async fn refresh_then(&self, pool: &PgPool, url: &str, pause: Option<&str>) -> StoreResult<Option<EntityRecord>> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let ticket = self.ticket(url);
            let entity: Option<(String, i64)> =
                sqlx::query_as("SELECT record, version FROM attache_entities WHERE url = $1")
                    .bind(url)
                    .fetch_optional(pool)
                    .await
                    .map_err(db_err)?;
            let grants: Vec<(String,)> =
                sqlx::query_as("SELECT record FROM attache_grants WHERE entity_url = $1 ORDER BY id")
                    .bind(url)
                    .fetch_all(pool)
                    .await
                    .map_err(db_err)?;
            let grants = grants.iter().map(|(g,)| parse(g)).collect::<StoreResult<Vec<GrantRecord>>>()?;
            let entity =
                entity.map(|(record, version)| parse::<EntityRecord>(&record).map(|r| (version, r))).transpose()?;
            if let Some(point) = pause {
                self.pauses.at(point).await;
            }
            let mut state = self.state.write();
            if !ticket.unchanged(&state) {
                if attempt < REFRESH_ATTEMPTS {
                    continue;
                }
                // Still changing: what was read may be older than what the cache holds.
                return Ok(entity.map(|(_, record)| record));
            }
            return Ok(match entity {
                Some((version, record)) => {
                    // Versions only grow while the entity lives (a removal was heard, or the ticket would show it).
                    if state.records.version(url).is_none_or(|v| v <= version) {
                        state.records.put(version, Arc::new(record.clone()));
                    }
                    state.records.set_grants(url, grants);
                    Some(record)
                }
                None => {
                    state.records.remove(url);
                    None
                }
            });
        }
    }

    /// After a write of this instance to `url` committed: applies `change`
    /// to the cache if nothing of the URL was heard since the write's ticket
    /// was taken (the cache then holds what the write changed), else reads
    /// the URL again. Either way reads of it in flight read again.
    async fn wrote(&self, pool: &PgPool, ticket: Ticket<'_>, change: impl FnOnce(&mut State)) {
        let url = {
            let mut state = self.state.write();
            let unchanged = ticket.unchanged(&state);
            state.heard(&ticket.url);
            if unchanged {
                change(&mut state);
                return;
            }
            ticket.url.clone()
        };
        drop(ticket);
        // Committed whatever happens here: a failed read leaves it to the write's own notification.
        if let Err(err) = self.refresh(pool, &url).await {
            tracing::warn!(%err, url, "cannot read an entity again after writing it");
        }
    }
}

/// Test hooks: points where the next registry call to arrive waits until
/// the test lets it go. Nothing is armed outside tests: each point costs a
/// lock of an empty map.
#[doc(hidden)]
#[derive(Default)]
pub struct Pauses(Mutex<HashMap<&'static str, Arc<Pause>>>);

/// Between a lookup's read of an entity it had not cached (record and
/// grants) and its putting them in the cache.
#[doc(hidden)]
pub const LOOKUP_INSTALL: &str = "lookup_install";

/// In the listener, when a registry notification has arrived, before any of
/// its batch is taken.
#[doc(hidden)]
pub const NOTIFIED: &str = "notified";

/// In the listener, when a stream notification has arrived, before any of
/// its batch is taken: this instance's cached view of streams stays as it
/// was until the pause is let go.
#[doc(hidden)]
pub const STREAMS_NOTIFIED: &str = "streams_notified";

#[doc(hidden)]
pub struct Pause {
    reached: tokio::sync::watch::Sender<bool>,
    go: tokio::sync::Semaphore,
}

impl Pauses {
    /// The next call to reach `point` waits there until the pause is released.
    pub fn arm(&self, point: &'static str) -> Arc<Pause> {
        let pause =
            Arc::new(Pause { reached: tokio::sync::watch::Sender::new(false), go: tokio::sync::Semaphore::new(0) });
        self.0.lock().insert(point, pause.clone());
        pause
    }

    pub(crate) async fn at(&self, point: &str) {
        let armed = self.0.lock().remove(point);
        if let Some(pause) = armed {
            pause.reached.send_replace(true);
            let _ = pause.go.acquire().await.map(tokio::sync::SemaphorePermit::forget);
        }
    }
}

impl Pause {
    /// Waits until a call waits at the point.
    pub async fn reached(&self) {
        let _ = self.reached.subscribe().wait_for(|reached| *reached).await;
    }

    /// Lets the waiting call go on.
    pub fn release(&self) {
        self.go.add_permits(1);
    }
}

async fn announce(conn: &mut sqlx::PgConnection, url: &str) -> StoreResult<()> {
    sqlx::query("SELECT pg_notify($1, $2)").bind(REGISTRY_CHANGES).bind(url).execute(conn).await.map_err(db_err)?;
    Ok(())
}

pub struct PgRegistry {
    shared: Arc<Shared>,
    io: Arc<Io>,
}

impl PgRegistry {
    pub(crate) fn new(shared: Arc<Shared>, io: Arc<Io>) -> PgRegistry {
        PgRegistry { shared, io }
    }

    fn cache(&self) -> &Cache {
        &self.shared.registry
    }

    /// Test hooks ([`LOOKUP_INSTALL`], [`NOTIFIED`]).
    #[doc(hidden)]
    pub fn pauses(&self) -> &Pauses {
        &self.cache().pauses
    }
}

#[async_trait]
impl Registry for PgRegistry {
    async fn entity(&self, url: &str) -> Option<EntityRecord> {
        if let Some(e) = self.cache().state.read().records.get(url) {
            return Some((**e).clone());
        }
        // Spawned on another instance a moment ago, perhaps: ask the database.
        let shared = self.shared.clone();
        let url = url.to_owned();
        self.io
            .run(async move { shared.registry.refresh_then(&shared.pool, &url, Some(LOOKUP_INSTALL)).await })
            .await
            .ok()
            .flatten()
    }

    fn is_current(&self, url: &str, incarnation: Option<&str>) -> bool {
        self.cache().state.read().records.get(url).is_some_and(|e| e.incarnation.as_deref() == incarnation)
    }

    fn held_by(&self, created_by: &str) -> crate::registry::Holdings {
        self.cache().state.read().records.held_by(created_by)
    }

    fn entities(&self, type_filter: Option<&str>) -> Vec<Arc<EntityRecord>> {
        self.cache().state.read().records.entities(type_filter)
    }

    fn entities_for(&self, who: &attache_core::PrincipalKey, type_filter: Option<&str>) -> Vec<Arc<EntityRecord>> {
        self.cache().state.read().records.entities_for(who, type_filter)
    }

    async fn insert_entity(&self, entity: EntityRecord) -> StoreResult<(EntityRecord, bool)> {
        let shared = self.shared.clone();
        self.io
            .run(async move {
                let cache = &shared.registry;
                let ticket = cache.ticket(&entity.url);
                let mut tx = shared.pool.begin().await.map_err(db_err)?;
                let inserted = sqlx::query(
                    "INSERT INTO attache_entities (url, record, version) VALUES ($1, $2, 1) ON CONFLICT (url) DO NOTHING",
                )
                .bind(&entity.url)
                .bind(json(&entity)?)
                .execute(&mut *tx)
                .await
                .map_err(db_err)?;
                if inserted.rows_affected() == 0 {
                    let (record, version): (String, i64) =
                        sqlx::query_as("SELECT record, version FROM attache_entities WHERE url = $1")
                            .bind(&entity.url)
                            .fetch_one(&mut *tx)
                            .await
                            .map_err(db_err)?;
                    tx.commit().await.map_err(db_err)?;
                    let existing: EntityRecord = parse(&record)?;
                    let put = existing.clone();
                    cache.wrote(&shared.pool, ticket, |state| put_entity(state, version, put)).await;
                    return Ok((existing, false));
                }
                announce(&mut tx, &entity.url).await?;
                tx.commit().await.map_err(db_err)?;
                let put = entity.clone();
                cache.wrote(&shared.pool, ticket, |state| put_entity(state, 1, put)).await;
                Ok((entity, true))
            })
            .await
    }

    async fn update_entity(&self, url: &str, update: EntityUpdate) -> StoreResult<EntityRecord> {
        let shared = self.shared.clone();
        let url = url.to_owned();
        self.io
            .run(async move {
                let cache = &shared.registry;
                let ticket = cache.ticket(&url);
                let mut tx = shared.pool.begin().await.map_err(db_err)?;
                let row: Option<(String, i64)> =
                    sqlx::query_as("SELECT record, version FROM attache_entities WHERE url = $1 FOR UPDATE")
                        .bind(&url)
                        .fetch_optional(&mut *tx)
                        .await
                        .map_err(db_err)?;
                let (record, version) = row.ok_or(StoreError::NotFound)?;
                let mut entity: EntityRecord = parse(&record)?;
                update(&mut entity)?;
                sqlx::query("UPDATE attache_entities SET record = $2, version = $3 WHERE url = $1")
                    .bind(&url)
                    .bind(json(&entity)?)
                    .bind(version + 1)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_err)?;
                announce(&mut tx, &url).await?;
                tx.commit().await.map_err(db_err)?;
                let put = entity.clone();
                cache.wrote(&shared.pool, ticket, |state| put_entity(state, version + 1, put)).await;
                Ok(entity)
            })
            .await
    }

    async fn remove_entity(&self, url: &str) -> StoreResult<bool> {
        let shared = self.shared.clone();
        let url = url.to_owned();
        self.io
            .run(async move {
                let cache = &shared.registry;
                let ticket = cache.ticket(&url);
                let mut tx = shared.pool.begin().await.map_err(db_err)?;
                let removed = sqlx::query("DELETE FROM attache_entities WHERE url = $1")
                    .bind(&url)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_err)?;
                sqlx::query("DELETE FROM attache_grants WHERE entity_url = $1")
                    .bind(&url)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_err)?;
                announce(&mut tx, &url).await?;
                tx.commit().await.map_err(db_err)?;
                cache.wrote(&shared.pool, ticket, |state| state.records.remove(&url)).await;
                Ok(removed.rows_affected() > 0)
            })
            .await
    }

    fn grants(&self, entity_url: &str) -> Vec<GrantRecord> {
        self.cache().state.read().records.grants(entity_url).to_vec()
    }

    fn grants_to(&self, entity_url: &str, who: &attache_core::PrincipalKey) -> Vec<GrantRecord> {
        self.cache().state.read().records.grants_to(entity_url, who)
    }

    async fn add_grant(&self, grant: NewGrant) -> StoreResult<GrantRecord> {
        let shared = self.shared.clone();
        self.io
            .run(async move {
                let cache = &shared.registry;
                let ticket = cache.ticket(&grant.entity_url);
                let mut tx = shared.pool.begin().await.map_err(db_err)?;
                // The entity's row, key-share locked to the commit: a removal
                // (`remove_entity` deletes the row, then its grants) either
                // came first, and there is no row or another life's, or waits
                // for this commit and then deletes the grant with the rest.
                let row: Option<(String,)> =
                    sqlx::query_as("SELECT record FROM attache_entities WHERE url = $1 FOR KEY SHARE")
                        .bind(&grant.entity_url)
                        .fetch_optional(&mut *tx)
                        .await
                        .map_err(db_err)?;
                let entity: Option<EntityRecord> = row.map(|(record,)| parse(&record)).transpose()?;
                if entity.is_none_or(|e| e.incarnation != grant.incarnation) {
                    return Err(StoreError::NotFound);
                }
                let (id,): (i64,) =
                    sqlx::query_as("SELECT nextval('attache_grant_ids')").fetch_one(&mut *tx).await.map_err(db_err)?;
                let record = grant.into_record(id as u64);
                sqlx::query("INSERT INTO attache_grants (entity_url, id, record) VALUES ($1, $2, $3)")
                    .bind(&record.entity_url)
                    .bind(id)
                    .bind(json(&record)?)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_err)?;
                announce(&mut tx, &record.entity_url).await?;
                tx.commit().await.map_err(db_err)?;
                let added = record.clone();
                cache
                    .wrote(&shared.pool, ticket, |state| {
                        let url = added.entity_url.clone();
                        state.records.change_grants(&url, |list| {
                            if !list.iter().any(|g| g.id == added.id) {
                                list.push(added);
                            }
                        });
                    })
                    .await;
                Ok(record)
            })
            .await
    }

    async fn remove_grant(&self, entity_url: &str, id: u64) -> StoreResult<bool> {
        let shared = self.shared.clone();
        let url = entity_url.to_owned();
        self.io
            .run(async move {
                let cache = &shared.registry;
                let ticket = cache.ticket(&url);
                let mut tx = shared.pool.begin().await.map_err(db_err)?;
                let removed = sqlx::query("DELETE FROM attache_grants WHERE entity_url = $1 AND id = $2")
                    .bind(&url)
                    .bind(id as i64)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_err)?;
                announce(&mut tx, &url).await?;
                tx.commit().await.map_err(db_err)?;
                cache
                    .wrote(&shared.pool, ticket, |state| {
                        state.records.change_grants(&url, |list| list.retain(|g| g.id != id))
                    })
                    .await;
                Ok(removed.rows_affected() > 0)
            })
            .await
    }
}

/// Puts a record the cache's holder wrote, unless the cache holds a newer version of it.
fn put_entity(state: &mut State, version: i64, record: EntityRecord) {
    if state.records.version(&record.url).is_none_or(|v| v < version) {
        state.records.put(version, Arc::new(record));
    }
}

//! The registry in PostgreSQL: entities and grants, cached whole in every
//! instance (permission checks run on every request) and refreshed from
//! `NOTIFY attache_registry`. Each write is one transaction; `update_entity`
//! locks the entity's row (`SELECT ... FOR UPDATE`) for its compare-and-set,
//! so two instances claiming one task cannot both win.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use async_trait::async_trait;
use parking_lot::RwLock;
use sqlx::PgPool;

use super::{db_err, Io, Shared, REGISTRY_CHANGES};
use crate::error::{StoreError, StoreResult};
use crate::registry::{EntityRecord, EntityUpdate, GrantRecord, NewGrant, Registry};

fn json<T: serde::Serialize>(v: &T) -> StoreResult<String> {
    serde_json::to_string(v).map_err(|e| StoreError::Storage(e.to_string()))
}

fn parse<T: serde::de::DeserializeOwned>(s: &str) -> StoreResult<T> {
    serde_json::from_str(s).map_err(|e| StoreError::Storage(format!("corrupt registry record: {e}")))
}

#[derive(Default)]
struct State {
    /// url → (row version, record).
    entities: BTreeMap<String, (i64, EntityRecord)>,
    grants: HashMap<String, Vec<GrantRecord>>,
    /// Entities this instance removed, counted: a refresh that read the
    /// database before a removal committed must not put the removed record
    /// back into the cache after it (a spawn at the purged URL then saw the
    /// old, stopped entity).
    removals: u64,
}

/// What this instance knows of the registry.
#[derive(Default)]
pub(crate) struct Cache {
    state: RwLock<State>,
}

impl Cache {
    pub(crate) async fn load_all(&self, pool: &PgPool) -> StoreResult<()> {
        let entities: Vec<(String, String, i64)> = sqlx::query_as("SELECT url, record, version FROM attache_entities")
            .fetch_all(pool)
            .await
            .map_err(db_err)?;
        let grants: Vec<(String,)> =
            sqlx::query_as("SELECT record FROM attache_grants ORDER BY id").fetch_all(pool).await.map_err(db_err)?;
        let mut state = State::default();
        for (url, record, version) in entities {
            state.entities.insert(url, (version, parse(&record)?));
        }
        for (record,) in grants {
            let g: GrantRecord = parse(&record)?;
            state.grants.entry(g.entity_url.clone()).or_default().push(g);
        }
        *self.state.write() = state;
        Ok(())
    }

    /// Re-reads one entity and its grants (after a notification).
    pub(crate) async fn refresh(&self, pool: &PgPool, url: &str) -> StoreResult<Option<EntityRecord>> {
        let removals_before = self.state.read().removals;
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
        let mut state = self.state.write();
        match entity {
            Some((record, version)) => {
                let record: EntityRecord = parse(&record)?;
                let newer = match state.entities.get(url) {
                    Some((v, _)) => *v <= version,
                    // Not cached: maybe removed while this read ran; then the next lookup reads again.
                    None => state.removals == removals_before,
                };
                if newer {
                    state.entities.insert(url.to_owned(), (version, record.clone()));
                }
                state.grants.insert(url.to_owned(), grants);
                Ok(Some(record))
            }
            None => {
                state.entities.remove(url);
                state.grants.remove(url);
                Ok(None)
            }
        }
    }

    fn put(&self, version: i64, record: EntityRecord) {
        let mut state = self.state.write();
        let newer = state.entities.get(&record.url).is_none_or(|(v, _)| *v < version);
        if newer {
            state.entities.insert(record.url.clone(), (version, record));
        }
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
}

#[async_trait]
impl Registry for PgRegistry {
    async fn entity(&self, url: &str) -> Option<EntityRecord> {
        if let Some((_, e)) = self.cache().state.read().entities.get(url) {
            return Some(e.clone());
        }
        // Spawned on another instance a moment ago, perhaps: ask the database.
        let shared = self.shared.clone();
        let url = url.to_owned();
        self.io.run(async move { shared.registry.refresh(&shared.pool, &url).await }).await.ok().flatten()
    }

    fn is_current(&self, url: &str, incarnation: Option<&str>) -> bool {
        self.cache().state.read().entities.get(url).is_some_and(|(_, e)| e.incarnation.as_deref() == incarnation)
    }

    fn entities(&self, type_filter: Option<&str>) -> Vec<EntityRecord> {
        let state = self.cache().state.read();
        let mut all: Vec<EntityRecord> = state
            .entities
            .values()
            .map(|(_, e)| e)
            .filter(|e| type_filter.is_none_or(|t| e.entity_type == t))
            .cloned()
            .collect();
        all.sort_by(|a, b| b.created_at_ms.cmp(&a.created_at_ms).then_with(|| a.url.cmp(&b.url)));
        all
    }

    async fn insert_entity(&self, entity: EntityRecord) -> StoreResult<(EntityRecord, bool)> {
        let shared = self.shared.clone();
        self.io
            .run(async move {
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
                    shared.registry.put(version, existing.clone());
                    return Ok((existing, false));
                }
                announce(&mut tx, &entity.url).await?;
                tx.commit().await.map_err(db_err)?;
                shared.registry.put(1, entity.clone());
                Ok((entity, true))
            })
            .await
    }

    async fn update_entity(&self, url: &str, update: EntityUpdate) -> StoreResult<EntityRecord> {
        let shared = self.shared.clone();
        let url = url.to_owned();
        self.io
            .run(async move {
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
                shared.registry.put(version + 1, entity.clone());
                Ok(entity)
            })
            .await
    }

    async fn remove_entity(&self, url: &str) -> StoreResult<bool> {
        let shared = self.shared.clone();
        let url = url.to_owned();
        self.io
            .run(async move {
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
                let mut state = shared.registry.state.write();
                state.entities.remove(&url);
                state.grants.remove(&url);
                state.removals += 1;
                Ok(removed.rows_affected() > 0)
            })
            .await
    }

    fn grants(&self, entity_url: &str) -> Vec<GrantRecord> {
        self.cache().state.read().grants.get(entity_url).cloned().unwrap_or_default()
    }

    async fn add_grant(&self, grant: NewGrant) -> StoreResult<GrantRecord> {
        let shared = self.shared.clone();
        self.io
            .run(async move {
                let mut tx = shared.pool.begin().await.map_err(db_err)?;
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
                let mut state = shared.registry.state.write();
                let list = state.grants.entry(record.entity_url.clone()).or_default();
                if !list.iter().any(|g| g.id == record.id) {
                    list.push(record.clone());
                }
                Ok(record)
            })
            .await
    }

    async fn remove_grant(&self, entity_url: &str, id: u64) -> StoreResult<bool> {
        let shared = self.shared.clone();
        let url = entity_url.to_owned();
        self.io
            .run(async move {
                let mut tx = shared.pool.begin().await.map_err(db_err)?;
                let removed = sqlx::query("DELETE FROM attache_grants WHERE entity_url = $1 AND id = $2")
                    .bind(&url)
                    .bind(id as i64)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_err)?;
                announce(&mut tx, &url).await?;
                tx.commit().await.map_err(db_err)?;
                if let Some(list) = shared.registry.state.write().grants.get_mut(&url) {
                    list.retain(|g| g.id != id);
                }
                Ok(removed.rows_affected() > 0)
            })
            .await
    }
}

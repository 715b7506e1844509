//! The embedded registry: a second small redb file, cached whole in memory.
//! Every write is one durable redb transaction under a mutex, so updates
//! are atomic compare-and-set operations (task claims rely on that). A write
//! runs on a task of its own, so a caller that goes away (a cancelled
//! request) never leaves it half done: its commit, the cache and the file
//! handle always end up together.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use parking_lot::RwLock;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::Mutex;

use crate::error::{StoreError, StoreResult};
use crate::records::Records;
use crate::registry::{EntityRecord, EntityUpdate, GrantRecord, NewGrant, Registry};

const ENTITIES: TableDefinition<&str, &[u8]> = TableDefinition::new("entities");
/// (entity url, grant id) → grant JSON.
const GRANTS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("grants");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");

#[derive(Default)]
struct Cache {
    /// Every entity and grant, with the indexes `entities_for` reads.
    records: Records,
    next_grant: u64,
}

/// The registry, shared with the write tasks it spawns ([`EmbeddedRegistry::detached`]).
pub struct EmbeddedRegistry(Arc<Inner>);

struct Inner {
    /// Only writes use it, one at a time (under `write`), each taking it out
    /// for its transaction. Empty after a disk error it could not reopen from.
    db: parking_lot::Mutex<Option<Database>>,
    path: std::path::PathBuf,
    cache: RwLock<Cache>,
    write: Mutex<()>,
    /// Tests only: disk faults injected into `registry.redb`'s writes and syncs.
    faults: Option<crate::FaultPlan>,
    /// Whether the last write hit a disk error (for `/healthz`).
    health: crate::health::Health,
    /// When `probe_writes` last tried a write, so probes stay rare.
    probed: parking_lot::Mutex<Option<std::time::Instant>>,
}

/// The least time between two write probes while the registry's writes fail.
const PROBE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

fn json<T: serde::Serialize>(v: &T) -> StoreResult<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| StoreError::Storage(e.to_string()))
}

fn parse<T: serde::de::DeserializeOwned>(b: &[u8]) -> StoreResult<T> {
    serde_json::from_slice(b).map_err(|e| StoreError::Storage(format!("corrupt registry record: {e}")))
}

impl EmbeddedRegistry {
    pub fn open(dir: &Path) -> StoreResult<EmbeddedRegistry> {
        EmbeddedRegistry::open_with_faults(dir, None)
    }

    /// [`EmbeddedRegistry::open`], its file's writes and syncs going through
    /// `faults` (tests; `None` is the plain file).
    pub fn open_with_faults(dir: &Path, faults: Option<crate::FaultPlan>) -> StoreResult<EmbeddedRegistry> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("registry.redb");
        {
            // Created once here, so a reopen after a disk error only reads.
            let db = open_db(&path, faults.as_ref())?;
            let txn = db.begin_write()?;
            {
                let entities = txn.open_table(ENTITIES)?;
                // Grants whose entity is gone, which versions before session 21
                // could keep when a grant raced a purge: removed, so none reaches
                // an entity spawned at its URL later.
                let mut orphans = 0usize;
                txn.open_table(GRANTS)?.retain(|(url, _), _| {
                    let kept = entities.get(url).map_or(true, |e| e.is_some());
                    orphans += usize::from(!kept);
                    kept
                })?;
                if orphans > 0 {
                    tracing::warn!(orphans, "removed grants whose entity is gone");
                }
            }
            txn.open_table(COUNTERS)?;
            txn.commit()?;
        }
        let (db, cache) = open_and_load(&path, faults.as_ref())?;
        Ok(EmbeddedRegistry(Arc::new(Inner {
            db: parking_lot::Mutex::new(Some(db)),
            path,
            cache: RwLock::new(cache),
            write: Mutex::new(()),
            faults,
            health: crate::health::Health::default(),
            probed: parking_lot::Mutex::new(None),
        })))
    }

    /// Runs a write (`Inner`'s methods) to its end on a task of its own and
    /// waits for it. Awaited inline, a write dropped by its caller while its
    /// transaction ran on the blocking pool never put the file handle back
    /// nor updated the cache: the next writers failed ("Database already
    /// open") until the handle was dropped, and the cache missed a change the
    /// file held until some later write reloaded it.
    async fn detached<T, F>(&self, write: impl FnOnce(Arc<Inner>) -> F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: std::future::Future<Output = StoreResult<T>> + Send + 'static,
    {
        tokio::spawn(write(self.0.clone()))
            .await
            .map_err(|e| StoreError::Storage(format!("registry write task failed: {e}")))?
    }
}

impl Inner {
    /// Runs one durable write transaction off the async threads (the caller
    /// holds `write`). redb refuses everything after a disk error until the
    /// file is reopened: it is reopened then, and the cache reloaded from it,
    /// so the cache says what the file holds whatever the failed commit left.
    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> StoreResult<T> + Send + 'static,
    ) -> StoreResult<T> {
        let db = self.db.lock().take();
        let path = self.path.clone();
        let faults = self.faults.clone();
        let (written, db, reloaded) = tokio::task::spawn_blocking(move || {
            let mut reloaded = None;
            let db = match db {
                Some(db) => db,
                None => match open_and_load(&path, faults.as_ref()) {
                    Ok((db, cache)) => {
                        reloaded = Some(cache);
                        db
                    }
                    Err(err) => return (Err(err), None, None),
                },
            };
            let written = (|| -> StoreResult<T> {
                let txn = db.begin_write()?;
                let out = f(&txn)?;
                txn.commit()?;
                Ok(out)
            })();
            match &written {
                Err(err) if err.is_io() => {
                    drop(db);
                    match open_and_load(&path, faults.as_ref()) {
                        Ok((db, cache)) => (written, Some(db), Some(cache)),
                        Err(e) => {
                            tracing::warn!(err = %e, "the registry cannot be reopened yet; the next write tries again");
                            (written, None, None)
                        }
                    }
                }
                _ => (written, Some(db), reloaded),
            }
        })
        .await
        .map_err(|e| StoreError::Storage(e.to_string()))?;
        *self.db.lock() = db;
        if let Some(cache) = reloaded {
            *self.cache.write() = cache;
        }
        match &written {
            Ok(_) => self.health.recovered(crate::health::Source::Registry),
            Err(err) => self.health.fail(crate::health::Source::Registry, err),
        }
        written
    }

    fn cached(&self, url: &str) -> Option<EntityRecord> {
        self.cache.read().records.get(url).map(|e| (**e).clone())
    }
}

fn open_db(path: &Path, faults: Option<&crate::FaultPlan>) -> StoreResult<Database> {
    let mut builder = Database::builder();
    builder.set_cache_size(8 << 20);
    let Some(plan) = faults else {
        return Ok(builder.create(path)?);
    };
    let points = (crate::FaultPoint::RegistryWrite, crate::FaultPoint::RegistrySync);
    Ok(builder.create_with_backend(crate::fault::FaultyBackend::open(path, plan, points)?)?)
}

fn open_and_load(path: &Path, faults: Option<&crate::FaultPlan>) -> StoreResult<(Database, Cache)> {
    let db = open_db(path, faults)?;
    let mut cache = Cache { next_grant: 1, ..Default::default() };
    {
        let txn = db.begin_read()?;
        let entities = txn.open_table(ENTITIES)?;
        for row in entities.iter()? {
            let (_, v) = row?;
            cache.records.put(0, Arc::new(parse(v.value())?));
        }
        let grants = txn.open_table(GRANTS)?;
        for row in grants.iter()? {
            let (_, v) = row?;
            let g: GrantRecord = parse(v.value())?;
            let url = g.entity_url.clone();
            cache.records.change_grants(&url, |list| list.push(g));
        }
        let counters = txn.open_table(COUNTERS)?;
        let next = counters.get("next_grant_id")?.map(|v| v.value());
        if let Some(next) = next {
            cache.next_grant = next;
        }
    }
    Ok((db, cache))
}

#[async_trait]
impl Registry for EmbeddedRegistry {
    fn health(&self) -> crate::WriteHealth {
        self.0.health.snapshot()
    }

    async fn probe_writes(&self) {
        if !self.0.health.is_failing() {
            return;
        }
        {
            let mut probed = self.0.probed.lock();
            if probed.is_some_and(|at| at.elapsed() < PROBE_EVERY) {
                return;
            }
            *probed = Some(std::time::Instant::now());
        }
        // A real write in progress answers the question itself: never wait behind it.
        let _ = self
            .detached(|r| async move {
                let Ok(_guard) = r.write.try_lock() else { return Ok(()) };
                r.write(|_txn| Ok(())).await
            })
            .await;
    }

    async fn entity(&self, url: &str) -> Option<EntityRecord> {
        self.0.cached(url)
    }

    async fn entity_shared(&self, url: &str) -> Option<Arc<EntityRecord>> {
        self.0.cache.read().records.get(url).cloned()
    }

    fn is_current(&self, url: &str, incarnation: Option<&str>) -> bool {
        self.0.cache.read().records.get(url).is_some_and(|e| e.incarnation.as_deref() == incarnation)
    }

    fn held_by(&self, created_by: &str) -> crate::registry::Holdings {
        self.0.cache.read().records.held_by(created_by)
    }

    fn entities(&self, type_filter: Option<&str>) -> Vec<Arc<EntityRecord>> {
        self.0.cache.read().records.entities(type_filter)
    }

    fn entities_for(&self, who: &attache_core::PrincipalKey, type_filter: Option<&str>) -> Vec<Arc<EntityRecord>> {
        self.0.cache.read().records.entities_for(who, type_filter)
    }

    fn grants(&self, entity_url: &str) -> Vec<GrantRecord> {
        self.0.cache.read().records.grants(entity_url).to_vec()
    }

    fn grants_to(&self, entity_url: &str, who: &attache_core::PrincipalKey) -> Vec<GrantRecord> {
        self.0.cache.read().records.grants_to(entity_url, who)
    }

    async fn insert_entity(&self, entity: EntityRecord) -> StoreResult<(EntityRecord, bool)> {
        self.detached(move |r| async move { r.insert_entity(entity).await }).await
    }

    async fn update_entity(&self, url: &str, update: EntityUpdate) -> StoreResult<EntityRecord> {
        let url = url.to_owned();
        self.detached(move |r| async move { r.update_entity(&url, update).await }).await
    }

    async fn remove_entity(&self, url: &str) -> StoreResult<bool> {
        let url = url.to_owned();
        self.detached(move |r| async move { r.remove_entity(&url).await }).await
    }

    async fn add_grant(&self, grant: NewGrant) -> StoreResult<GrantRecord> {
        self.detached(move |r| async move { r.add_grant(grant).await }).await
    }

    async fn remove_grant(&self, entity_url: &str, id: u64) -> StoreResult<bool> {
        let url = entity_url.to_owned();
        self.detached(move |r| async move { r.remove_grant(&url, id).await }).await
    }
}

/// The writes, each run to its end by [`EmbeddedRegistry::detached`].
impl Inner {
    async fn insert_entity(&self, entity: EntityRecord) -> StoreResult<(EntityRecord, bool)> {
        let _guard = self.write.lock().await;
        if let Some(existing) = self.cached(&entity.url) {
            return Ok((existing, false));
        }
        let bytes = json(&entity)?;
        let url = entity.url.clone();
        self.write(move |txn| {
            txn.open_table(ENTITIES)?.insert(url.as_str(), bytes.as_slice())?;
            Ok(())
        })
        .await?;
        self.cache.write().records.put(0, Arc::new(entity.clone()));
        Ok((entity, true))
    }

    async fn update_entity(&self, url: &str, update: EntityUpdate) -> StoreResult<EntityRecord> {
        let _guard = self.write.lock().await;
        let mut entity = self.cached(url).ok_or(StoreError::NotFound)?;
        update(&mut entity)?;
        let bytes = json(&entity)?;
        let key = url.to_owned();
        self.write(move |txn| {
            txn.open_table(ENTITIES)?.insert(key.as_str(), bytes.as_slice())?;
            Ok(())
        })
        .await?;
        self.cache.write().records.put(0, Arc::new(entity.clone()));
        Ok(entity)
    }

    async fn remove_entity(&self, url: &str) -> StoreResult<bool> {
        let _guard = self.write.lock().await;
        if self.cached(url).is_none() {
            return Ok(false);
        }
        let key = url.to_owned();
        self.write(move |txn| {
            txn.open_table(ENTITIES)?.remove(key.as_str())?;
            txn.open_table(GRANTS)?.retain_in((key.as_str(), 0)..=(key.as_str(), u64::MAX), |_, _| false)?;
            Ok(())
        })
        .await?;
        self.cache.write().records.remove(url);
        Ok(true)
    }

    async fn add_grant(&self, grant: NewGrant) -> StoreResult<GrantRecord> {
        // Under the write lock `remove_entity` takes: the entity checked here is
        // the one there when the grant is written.
        let _guard = self.write.lock().await;
        if self.cached(&grant.entity_url).is_none_or(|e| e.incarnation != grant.incarnation) {
            return Err(StoreError::NotFound);
        }
        let id = self.cache.read().next_grant;
        let record = grant.into_record(id);
        let bytes = json(&record)?;
        let url = record.entity_url.clone();
        self.write(move |txn| {
            txn.open_table(GRANTS)?.insert((url.as_str(), id), bytes.as_slice())?;
            txn.open_table(COUNTERS)?.insert("next_grant_id", id + 1)?;
            Ok(())
        })
        .await?;
        let mut cache = self.cache.write();
        cache.next_grant = id + 1;
        let added = record.clone();
        cache.records.change_grants(&record.entity_url, |list| list.push(added));
        Ok(record)
    }

    async fn remove_grant(&self, entity_url: &str, id: u64) -> StoreResult<bool> {
        let _guard = self.write.lock().await;
        if !self.cache.read().records.grants(entity_url).iter().any(|g| g.id == id) {
            return Ok(false);
        }
        let url = entity_url.to_owned();
        self.write(move |txn| {
            txn.open_table(GRANTS)?.remove((url.as_str(), id))?;
            Ok(())
        })
        .await?;
        self.cache.write().records.change_grants(entity_url, |list| list.retain(|g| g.id != id));
        Ok(true)
    }
}

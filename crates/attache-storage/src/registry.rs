//! The registry seam: entities and their grants (the "repo" beside the
//! stream store). Registry writes are rare (spawn, stop, grant, task
//! changes) and small; they are durable before they are acknowledged.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use attache_core::{GrantSubject, Permission, PrincipalKey, Propagation};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;

use crate::error::StoreResult;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EntityRecord {
    pub url: String,
    pub entity_type: String,
    pub instance_id: String,
    /// `idle` once spawned; `stopped` after DELETE (no more writes).
    pub status: String,
    pub tags: BTreeMap<String, String>,
    /// The spawn args, as their JSON text (`RawJson`): as a `Value` tree,
    /// 64 KiB of `[0,0,...]` took ~1 MB of the registry's cache per entity.
    pub args: Option<RawJson>,
    /// The principal URL of the spawner.
    pub created_by: String,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    /// Face-specific state kept with the entity (the task face keeps its
    /// task here), as its JSON text: the registry's cache holds every entity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extra: Option<RawJson>,
    /// Which life of this URL the record is: a random id the server gives the
    /// entity when it is spawned, so what a purged entity left behind (its task
    /// events) is never taken for the next one's. `None` on records written
    /// before incarnations existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incarnation: Option<String>,
    /// The entity it was spawned (or forked) under, Electric's `parent`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// Its ancestors, nearest first (the parent, its parent, ...), each with
    /// the incarnation it had at the spawn: a `descendants` grant of an
    /// ancestor applies only while that life is the one at its URL.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ancestors: Vec<Ancestor>,
}

/// A JSON value kept as its text, stored and sent as that JSON (the record's
/// format is unchanged), read when a caller needs it (`parse`). Held so, a
/// value costs about its text: as a `Value` tree, an object of many small
/// members costs ~10 times that (a task's metadata of ~5,200 members just
/// under `max_entity_data_bytes`, 64 KiB, took ~660 KB of the registry
/// cache). Clones share the text.
#[derive(Clone, PartialEq, Eq)]
pub struct RawJson(Arc<str>);

impl RawJson {
    /// `v` as JSON text.
    pub fn of(v: &impl Serialize) -> serde_json::Result<RawJson> {
        Ok(RawJson(serde_json::to_string(v)?.into()))
    }

    /// `null`.
    pub fn null() -> RawJson {
        RawJson("null".into())
    }

    /// The JSON text.
    pub fn get(&self) -> &str {
        &self.0
    }

    /// Reads the value as a `T` (which may borrow from the text).
    pub fn parse<'a, T: Deserialize<'a>>(&'a self) -> serde_json::Result<T> {
        serde_json::from_str(&self.0)
    }
}

impl std::fmt::Debug for RawJson {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for RawJson {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // The text was JSON when it was made; written as it is.
        let raw: &RawValue = serde_json::from_str(&self.0).map_err(serde::ser::Error::custom)?;
        raw.serialize(s)
    }
}

impl<'de> Deserialize<'de> for RawJson {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<RawJson, D::Error> {
        let raw = Box::<RawValue>::deserialize(d)?;
        Ok(RawJson(raw.get().into()))
    }
}

/// One ancestor of an entity: its URL and which life of that URL it was.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ancestor {
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incarnation: Option<String>,
}

impl EntityRecord {
    pub fn is_running(&self) -> bool {
        self.status != "stopped"
    }

    /// The client data the record keeps in memory: spawn args, face state
    /// (a task's metadata) and tags, as their JSON text.
    pub fn data_bytes(&self) -> usize {
        data_bytes(self.args.as_ref().map_or(0, |a| a.get().len()), self.extra.as_ref(), &self.tags)
    }
}

/// [`EntityRecord::data_bytes`] of a record still to be made: its spawn args'
/// JSON length, its face state and its tags.
pub fn data_bytes(args_len: usize, extra: Option<&RawJson>, tags: &BTreeMap<String, String>) -> usize {
    args_len + extra.map_or(0, |e| e.get().len()) + tags.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
}

/// What one principal holds in the registry (`Registry::held_by`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Holdings {
    /// Entities it created and has not purged.
    pub entities: usize,
    /// Their client data, [`EntityRecord::data_bytes`] summed, and their grants ([`GRANT_BYTES`] each).
    pub data_bytes: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GrantRecord {
    pub id: u64,
    pub entity_url: String,
    #[serde(flatten)]
    pub subject: GrantSubject,
    pub permission: Permission,
    pub expires_at: Option<String>,
    pub expires_at_ms: Option<i64>,
    pub created_by: String,
    pub created_at_ms: i64,
    /// `self` (default, and what grants stored before it existed mean) or `descendants`.
    #[serde(default)]
    pub propagation: Propagation,
    #[serde(default)]
    pub copy_to_children: bool,
    /// Grants are not changed once made; `None` (older records) means `created_at_ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at_ms: Option<i64>,
}

#[derive(Debug, Clone)]
pub struct NewGrant {
    pub entity_url: String,
    /// The life of the entity at `entity_url` the grant was decided for
    /// (its `incarnation`): the grant is stored only while that entity is
    /// still there, in that life, and [`Registry::add_grant`] answers
    /// [`crate::StoreError::NotFound`] otherwise, so a grant decided before a
    /// purge never lands on the entity spawned at the URL next (session 21's
    /// attack pass: it did, and gave its grantee the next owner's entity).
    pub incarnation: Option<String>,
    pub subject: GrantSubject,
    pub permission: Permission,
    pub expires_at: Option<String>,
    pub expires_at_ms: Option<i64>,
    pub created_by: String,
    pub propagation: Propagation,
    pub copy_to_children: bool,
}

impl NewGrant {
    /// The stored grant, once the backend has given it an id.
    pub fn into_record(self, id: u64) -> GrantRecord {
        let now = chrono::Utc::now().timestamp_millis();
        GrantRecord {
            id,
            entity_url: self.entity_url,
            // `incarnation` is a condition of the write, not part of the grant:
            // the entity's removal takes its grants with it.
            subject: self.subject,
            permission: self.permission,
            expires_at: self.expires_at,
            expires_at_ms: self.expires_at_ms,
            created_by: self.created_by,
            created_at_ms: now,
            propagation: self.propagation,
            copy_to_children: self.copy_to_children,
            updated_at_ms: Some(now),
        }
    }
}

/// A change to one entity, applied atomically with respect to other changes.
pub type EntityUpdate = Box<dyn FnOnce(&mut EntityRecord) -> StoreResult<()> + Send>;

#[async_trait]
pub trait Registry: Send + Sync + 'static {
    /// Whether the registry's writes are failing (a full or failing disk), and since when.
    fn health(&self) -> crate::WriteHealth {
        crate::WriteHealth::Ok
    }
    /// While writes are failing, tries one durable write that changes nothing, so the
    /// health turns good again once the disk has room, without waiting for a real write.
    /// Cheap and rate-limited; a no-op while writes succeed.
    async fn probe_writes(&self) {}
    /// The entity at `url`. A backend shared by several instances may ask its
    /// database (an entity spawned elsewhere a moment ago), so this awaits.
    async fn entity(&self, url: &str) -> Option<EntityRecord>;
    /// The entity at `url`, shared: a backend that caches records hands out its copy without cloning it.
    async fn entity_shared(&self, url: &str) -> Option<std::sync::Arc<EntityRecord>> {
        self.entity(url).await.map(std::sync::Arc::new)
    }
    /// Is the entity at `url` the life `incarnation`, as this instance
    /// knows it? Memory only, as `entities` (lineage checks run on every
    /// permission check).
    fn is_current(&self, url: &str, incarnation: Option<&str>) -> bool;
    /// Every entity, newest first; `type_filter` narrows to one type. Memory
    /// only in every backend (each keeps every record, refreshed on change),
    /// and shared: no record is copied. A copy of every task per `task.list`
    /// or `task.claim` held as many bytes as the registry itself for the
    /// call's length (40,000 small tasks: tens of MB a call, whoever they
    /// belong to), a bound no client should be able to multiply.
    fn entities(&self, type_filter: Option<&str>) -> Vec<std::sync::Arc<EntityRecord>>;
    /// The entities `who` may possibly see, newest first, as `entities`:
    /// those it created, those holding a grant that lets it read (`read` or
    /// `manage`) whose subject is it (its URL or its kind), and those
    /// listing among their ancestors an entity that
    /// holds such a grant reaching `descendants`; every entity for a
    /// built-in system principal. A superset of what the permission rule
    /// allows (expired grants and ancestors of another life are still in):
    /// callers check each one. Memory only, as `entities`, from indexes the
    /// backend keeps with its records, so its work grows with these entities,
    /// not with every principal's (`task.list` scanned 40,000 tasks of
    /// another principal at ~90 ms a call).
    fn entities_for(&self, who: &PrincipalKey, type_filter: Option<&str>) -> Vec<std::sync::Arc<EntityRecord>>;
    /// How many entities `created_by` (a principal's URL) created, and how
    /// much client data they keep, as this instance knows them. Memory only,
    /// as `entities`, and no record is copied.
    fn held_by(&self, created_by: &str) -> Holdings;
    /// Inserts the entity unless one exists at its URL; returns the stored one and whether it was new.
    async fn insert_entity(&self, entity: EntityRecord) -> StoreResult<(EntityRecord, bool)>;
    /// Applies `update` to the entity under the registry's write lock (compare-and-set).
    async fn update_entity(&self, url: &str, update: EntityUpdate) -> StoreResult<EntityRecord>;
    /// Removes the entity and its grants for good.
    async fn remove_entity(&self, url: &str) -> StoreResult<bool>;
    /// The grants on an entity. Memory only, as `entities`.
    fn grants(&self, entity_url: &str) -> Vec<GrantRecord>;
    /// The grants on an entity whose subject is `who` (its URL or its kind):
    /// all a permission check of `who` looks at, copied without the others.
    /// Memory only, as `entities`.
    fn grants_to(&self, entity_url: &str, who: &attache_core::PrincipalKey) -> Vec<GrantRecord> {
        self.grants(entity_url).into_iter().filter(|g| g.subject.matches(who)).collect()
    }
    /// Stores `grant`, atomically with the check that the entity at its URL
    /// is still the life it names ([`NewGrant::incarnation`]); `NotFound`
    /// when it is not (removed, or removed and spawned again).
    async fn add_grant(&self, grant: NewGrant) -> StoreResult<GrantRecord>;
    async fn remove_grant(&self, entity_url: &str, id: u64) -> StoreResult<bool>;
}

/// What one grant keeps in a registry's memory, measured (25,700 grants held
/// ~19 MB after a restart: session 16's attack pass).
pub const GRANT_BYTES: usize = 750;

/// [`Registry::held_by`] over the records a backend keeps; `grants_of` says
/// how many grants an entity holds, each counted to the entity's creator as
/// [`GRANT_BYTES`] of its data.
pub(crate) fn holdings<'a>(
    records: impl Iterator<Item = &'a EntityRecord>,
    created_by: &str,
    grants_of: impl Fn(&str) -> usize,
) -> Holdings {
    records.filter(|e| e.created_by == created_by).fold(Holdings::default(), |h, e| Holdings {
        entities: h.entities + 1,
        data_bytes: h.data_bytes + e.data_bytes() + grants_of(&e.url) * GRANT_BYTES,
    })
}

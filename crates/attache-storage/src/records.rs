//! The records a registry backend keeps in memory (every entity and every
//! grant), with the indexes that let a listing for one principal look only
//! at what it may possibly see ([`Registry::entities_for`]): the entities
//! each principal created, the entities holding a grant for each subject
//! (and those whose grant reaches their descendants), and each entity's
//! descendants. Every change goes through [`Records`], which keeps the
//! indexes with the records; a backend that reloads builds a new one.
//!
//! [`Registry::entities_for`]: crate::Registry::entities_for

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use attache_core::{GrantSubject, PrincipalKey, Propagation};

use crate::registry::{holdings, EntityRecord, GrantRecord, Holdings};

#[derive(Default)]
pub(crate) struct Records {
    /// url → (row version, record). The embedded backend keeps no versions (0).
    entities: BTreeMap<String, (i64, Arc<EntityRecord>)>,
    /// url → its grants, oldest first; no entry for an entity without grants.
    grants: HashMap<String, Vec<GrantRecord>>,
    /// A creator's principal URL → the URLs of the entities it created.
    by_owner: HashMap<String, HashSet<String>>,
    /// A grant subject → the URLs of the entities holding a grant for it that lets it read.
    by_subject: HashMap<GrantSubject, HashSet<String>>,
    /// A grant subject → the URLs of the entities holding a `descendants`
    /// grant for it (which reaches the entities that list them as ancestors).
    above_subject: HashMap<GrantSubject, HashSet<String>>,
    /// An ancestor's URL → the URLs of the entities that list it among their ancestors.
    descendants: HashMap<String, HashSet<String>>,
    /// url → where in its grants list the grants that decide a permission
    /// check are: for each (subject, permission, propagation) the one that
    /// lasts longest (a grant of the same kind that expires sooner allows
    /// nothing it does not). What a check of one principal copies is then at
    /// most a few grants an entity, however many the entity holds: before
    /// (session 18's second attack pass), a chain of 32 entities with 1,000
    /// `user`-kind grants each, differing only in expiry, made every user's
    /// checks copy 32,000 grants.
    deciding: HashMap<String, Vec<u32>>,
}

/// Whether `g` lets its subject read its entity (what a listing needs).
fn reveals(g: &GrantRecord) -> bool {
    matches!(g.permission, attache_core::Permission::Read | attache_core::Permission::Manage)
}

/// Whether grant `a` allows for at least as long as `b` (no expiry is longest).
fn outlasts(a: &GrantRecord, b: &GrantRecord) -> bool {
    match (a.expires_at_ms, b.expires_at_ms) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(x), Some(y)) => x >= y,
    }
}

/// [`Records::deciding`] of one entity's grants.
fn deciding_of(list: &[GrantRecord]) -> Vec<u32> {
    let mut best: HashMap<(&GrantSubject, attache_core::Permission, Propagation), usize> = HashMap::new();
    for (i, g) in list.iter().enumerate() {
        best.entry((&g.subject, g.permission, g.propagation))
            .and_modify(|at| {
                if outlasts(g, &list[*at]) {
                    *at = i;
                }
            })
            .or_insert(i);
    }
    let mut at: Vec<u32> = best.into_values().filter_map(|i| u32::try_from(i).ok()).collect();
    at.sort_unstable();
    at
}

/// Adds `url` to `key`'s set in `index`.
fn index<K: std::hash::Hash + Eq>(index: &mut HashMap<K, HashSet<String>>, key: K, url: &str) {
    index.entry(key).or_default().insert(url.to_owned());
}

/// Takes `url` out of `key`'s set in `index`, and the set once it is empty.
fn unindex<K, Q>(index: &mut HashMap<K, HashSet<String>>, key: &Q, url: &str)
where
    K: std::borrow::Borrow<Q> + std::hash::Hash + Eq,
    Q: std::hash::Hash + Eq + ?Sized,
{
    if let Some(set) = index.get_mut(key) {
        set.remove(url);
        if set.is_empty() {
            index.remove(key);
        }
    }
}

/// Newest first, then by URL: the order every listing of the registry gives.
fn newest_first(records: &mut [Arc<EntityRecord>]) {
    records.sort_by(|a, b| b.created_at_ms.cmp(&a.created_at_ms).then_with(|| a.url.cmp(&b.url)));
}

impl Records {
    pub(crate) fn get(&self, url: &str) -> Option<&Arc<EntityRecord>> {
        self.entities.get(url).map(|(_, e)| e)
    }

    /// The row version the record at `url` was read at.
    pub(crate) fn version(&self, url: &str) -> Option<i64> {
        self.entities.get(url).map(|(v, _)| *v)
    }

    /// Puts `record` at its URL (replacing what was there) at row `version`.
    pub(crate) fn put(&mut self, version: i64, record: Arc<EntityRecord>) {
        let old = self.entities.get(&record.url).map(|(_, e)| e.clone());
        let reindex =
            old.as_ref().is_none_or(|old| old.created_by != record.created_by || old.ancestors != record.ancestors);
        if reindex {
            if let Some(old) = &old {
                self.unindex_entity(old);
            }
            self.index_entity(&record);
        }
        self.entities.insert(record.url.clone(), (version, record));
    }

    /// Removes the entity at `url` and its grants.
    pub(crate) fn remove(&mut self, url: &str) {
        if let Some((_, old)) = self.entities.remove(url) {
            self.unindex_entity(&old);
        }
        self.change_grants(url, Vec::clear);
    }

    fn index_entity(&mut self, e: &EntityRecord) {
        index(&mut self.by_owner, e.created_by.clone(), &e.url);
        for a in &e.ancestors {
            index(&mut self.descendants, a.url.clone(), &e.url);
        }
    }

    fn unindex_entity(&mut self, e: &EntityRecord) {
        unindex(&mut self.by_owner, e.created_by.as_str(), &e.url);
        for a in &e.ancestors {
            unindex(&mut self.descendants, a.url.as_str(), &e.url);
        }
    }

    /// The grants on `url`, oldest first.
    pub(crate) fn grants(&self, url: &str) -> &[GrantRecord] {
        self.grants.get(url).map_or(&[], Vec::as_slice)
    }

    /// Replaces the grants on `url`.
    pub(crate) fn set_grants(&mut self, url: &str, grants: Vec<GrantRecord>) {
        self.change_grants(url, |list| *list = grants);
    }

    /// Applies `change` to the grants on `url`, and the grant indexes with it.
    pub(crate) fn change_grants(&mut self, url: &str, change: impl FnOnce(&mut Vec<GrantRecord>)) {
        let mut list = self.grants.remove(url).unwrap_or_default();
        for g in &list {
            unindex(&mut self.by_subject, &g.subject, url);
            unindex(&mut self.above_subject, &g.subject, url);
        }
        change(&mut list);
        // Only grants that let their subject read make an entity a candidate
        // of its listings (`read`, or `manage`, which allows everything): a
        // `user`-kind `write` grant on each of another principal's 10,000
        // entities made every user's list look at all of them (session 18's
        // third attack pass).
        for g in list.iter().filter(|g| reveals(g)) {
            index(&mut self.by_subject, g.subject.clone(), url);
            if g.propagation == Propagation::Descendants {
                index(&mut self.above_subject, g.subject.clone(), url);
            }
        }
        if list.is_empty() {
            self.deciding.remove(url);
        } else {
            self.deciding.insert(url.to_owned(), deciding_of(&list));
            self.grants.insert(url.to_owned(), list);
        }
    }

    /// The grants on `url` that decide a permission check of `who`: those
    /// whose subject is `who` (its URL or its kind), one for each
    /// (subject, permission, propagation), the longest-lasting. A check over
    /// them answers as over all of `who`'s grants on `url`.
    pub(crate) fn grants_to(&self, url: &str, who: &PrincipalKey) -> Vec<GrantRecord> {
        let (Some(list), Some(at)) = (self.grants.get(url), self.deciding.get(url)) else { return Vec::new() };
        at.iter().filter_map(|&i| list.get(i as usize)).filter(|g| g.subject.matches(who)).cloned().collect()
    }

    /// Every entity, newest first; `type_filter` narrows to one type.
    pub(crate) fn entities(&self, type_filter: Option<&str>) -> Vec<Arc<EntityRecord>> {
        let mut all: Vec<Arc<EntityRecord>> = self
            .entities
            .values()
            .map(|(_, e)| e)
            .filter(|e| type_filter.is_none_or(|t| e.entity_type == t))
            .cloned()
            .collect();
        newest_first(&mut all);
        all
    }

    /// The entities `who` may possibly see, newest first ([`crate::Registry::entities_for`]):
    /// those it created, those holding a grant for it (by URL or by kind),
    /// and those under an entity holding a `descendants` grant for it; all
    /// of them for a built-in system principal. Its work grows with these,
    /// not with every entity.
    pub(crate) fn entities_for(&self, who: &PrincipalKey, type_filter: Option<&str>) -> Vec<Arc<EntityRecord>> {
        if who.is_built_in_system() {
            return self.entities(type_filter);
        }
        let me = who.url();
        let mut urls: HashSet<&str> = HashSet::new();
        urls.extend(self.by_owner.get(&me).into_iter().flatten().map(String::as_str));
        for subject in [GrantSubject::Principal(me), GrantSubject::PrincipalKind(who.kind().as_str().to_owned())] {
            urls.extend(self.by_subject.get(&subject).into_iter().flatten().map(String::as_str));
            for above in self.above_subject.get(&subject).into_iter().flatten() {
                urls.extend(self.descendants.get(above).into_iter().flatten().map(String::as_str));
            }
        }
        let mut found: Vec<Arc<EntityRecord>> = urls
            .into_iter()
            .filter_map(|url| self.get(url))
            .filter(|e| type_filter.is_none_or(|t| e.entity_type == t))
            .cloned()
            .collect();
        newest_first(&mut found);
        found
    }

    /// [`crate::Registry::held_by`]: from the entities `created_by` created only.
    pub(crate) fn held_by(&self, created_by: &str) -> Holdings {
        let owned = self.by_owner.get(created_by).into_iter().flatten().filter_map(|url| self.get(url));
        holdings(owned.map(|e| &**e), created_by, |url| self.grants(url).len())
    }
}

#[cfg(test)]
mod tests {
    //! The indexes against a brute-force filter of every record, over random
    //! changes (entities put, replaced and removed; grants added and removed).

    use super::*;
    use crate::registry::Ancestor;
    use attache_core::{Permission, PrincipalKind};
    use proptest::prelude::*;

    const PRINCIPALS: [(PrincipalKind, &str); 5] = [
        (PrincipalKind::User, "alice"),
        (PrincipalKind::User, "bob"),
        (PrincipalKind::Agent, "carol"),
        (PrincipalKind::Service, "dave"),
        (PrincipalKind::System, "eve"),
    ];
    const URLS: usize = 8;

    fn principal(i: usize) -> PrincipalKey {
        let (kind, id) = PRINCIPALS[i % PRINCIPALS.len()];
        PrincipalKey::new(kind, id).unwrap()
    }

    fn url(i: usize) -> String {
        format!("/{}/e{}", if i.is_multiple_of(2) { "task" } else { "chat" }, i % URLS)
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// An entity at url `.0`, created by principal `.1`, at time `.2`, under the entities `.3`.
        Put(usize, usize, i64, Vec<usize>),
        Remove(usize),
        /// A grant on url `.0`: to principal `.1` (or its kind when `.2`), reaching descendants when `.3`.
        Grant(usize, usize, bool, bool),
        /// Revokes the `.1`th grant (modulo how many) of url `.0`.
        Revoke(usize, usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..URLS, 0..PRINCIPALS.len(), 0..4i64, proptest::collection::vec(0..URLS, 0..3))
                .prop_map(|(u, p, t, a)| Op::Put(u, p, t, a)),
            1 => (0..URLS).prop_map(Op::Remove),
            4 => (0..URLS, 0..PRINCIPALS.len(), any::<bool>(), any::<bool>())
                .prop_map(|(u, p, k, d)| Op::Grant(u, p, k, d)),
            2 => (0..URLS, 0..4usize).prop_map(|(u, i)| Op::Revoke(u, i)),
        ]
    }

    fn record(u: usize, by: usize, at: i64, ancestors: &[usize]) -> EntityRecord {
        let url = url(u);
        EntityRecord {
            url: url.clone(),
            entity_type: url[1..].split('/').next().unwrap().to_owned(),
            instance_id: format!("e{u}"),
            status: "idle".into(),
            tags: Default::default(),
            args: None,
            created_by: principal(by).url(),
            created_at_ms: at,
            updated_at_ms: at,
            extra: None,
            incarnation: None,
            parent: ancestors.first().map(|a| self::url(*a)),
            ancestors: ancestors.iter().map(|a| Ancestor { url: self::url(*a), incarnation: None }).collect(),
        }
    }

    /// The same records, indexed from scratch.
    fn rebuilt(r: &Records) -> Records {
        let mut fresh = Records::default();
        for e in r.entities(None) {
            fresh.put(0, e);
        }
        for (url, grants) in &r.grants {
            fresh.set_grants(url, grants.clone());
        }
        fresh
    }

    /// What `who` may possibly see, by looking at every record.
    fn brute_force(r: &Records, who: &PrincipalKey, type_filter: Option<&str>) -> Vec<String> {
        r.entities(type_filter)
            .into_iter()
            .filter(|e| {
                who.is_built_in_system()
                    || e.created_by == who.url()
                    || r.grants(&e.url).iter().any(|g| reveals(g) && g.subject.matches(who))
                    || e.ancestors.iter().any(|a| {
                        r.grants(&a.url)
                            .iter()
                            .any(|g| reveals(g) && g.propagation == Propagation::Descendants && g.subject.matches(who))
                    })
            })
            .map(|e| e.url.clone())
            .collect()
    }

    proptest! {
        /// A check over the grants that decide it answers as over all of
        /// them, at any moment, for any principal and permission: kind and
        /// principal grants of every permission, with and without expiry.
        #[test]
        fn a_check_over_the_deciding_grants_answers_as_over_all(
            grants in proptest::collection::vec((0..PRINCIPALS.len(), any::<bool>(), 0..6u8, proptest::option::of(0..100i64)), 0..40),
            now in 0..120i64,
        ) {
            let permissions = [Permission::Read, Permission::Write, Permission::Delete, Permission::Manage, Permission::Signal, Permission::Spawn];
            let mut r = Records::default();
            let list: Vec<GrantRecord> = grants.iter().enumerate().map(|(id, &(p, kind, perm, expires))| GrantRecord {
                id: id as u64,
                entity_url: url(0),
                subject: if kind { GrantSubject::PrincipalKind(principal(p).kind().as_str().to_owned()) } else { GrantSubject::Principal(principal(p).url()) },
                permission: permissions[usize::from(perm)],
                expires_at: None,
                expires_at_ms: expires,
                created_by: principal(0).url(),
                created_at_ms: 0,
                propagation: Propagation::Own,
                copy_to_children: false,
                updated_at_ms: None,
            }).collect();
            r.set_grants(&url(0), list.clone());
            for who in (0..PRINCIPALS.len()).map(principal) {
                let deciding = r.grants_to(&url(0), &who);
                prop_assert!(deciding.len() <= 2 * permissions.len(), "{}", deciding.len());
                for wanted in permissions {
                    let over = |g: &[GrantRecord]| attache_core::entity::access(&who, Some("/_principal/user/nobody"), g.iter().map(|g| (&g.subject, g.permission, g.expires_at_ms)), wanted, now);
                    prop_assert_eq!(over(&deciding), over(&list), "{} {:?}", who, wanted);
                }
            }
        }

        #[test]
        fn the_entities_for_a_principal_are_those_a_scan_of_all_finds(ops in proptest::collection::vec(op(), 0..60)) {
            let mut r = Records::default();
            let mut next_id = 1;
            for op in ops {
                match op {
                    Op::Put(u, by, at, ancestors) => r.put(0, Arc::new(record(u, by, at, &ancestors))),
                    Op::Remove(u) => r.remove(&url(u)),
                    Op::Grant(u, p, kind, below) => {
                        let who = principal(p);
                        let subject = if kind {
                            GrantSubject::PrincipalKind(who.kind().as_str().to_owned())
                        } else {
                            GrantSubject::Principal(who.url())
                        };
                        let grant = GrantRecord {
                            id: next_id,
                            entity_url: url(u),
                            subject,
                            permission: [Permission::Read, Permission::Write, Permission::Manage][next_id as usize % 3],
                            expires_at: None,
                            expires_at_ms: None,
                            created_by: principal(0).url(),
                            created_at_ms: 0,
                            propagation: if below { Propagation::Descendants } else { Propagation::Own },
                            copy_to_children: false,
                            updated_at_ms: None,
                        };
                        next_id += 1;
                        r.change_grants(&url(u), |list| list.push(grant));
                    }
                    Op::Revoke(u, i) => {
                        let ids: Vec<u64> = r.grants(&url(u)).iter().map(|g| g.id).collect();
                        if !ids.is_empty() {
                            let id = ids[i % ids.len()];
                            r.change_grants(&url(u), |list| list.retain(|g| g.id != id));
                        }
                    }
                }
            }
            let fresh = rebuilt(&r);
            prop_assert_eq!(&r.by_owner, &fresh.by_owner);
            prop_assert_eq!(&r.by_subject, &fresh.by_subject);
            prop_assert_eq!(&r.above_subject, &fresh.above_subject);
            prop_assert_eq!(&r.descendants, &fresh.descendants);
            prop_assert_eq!(&r.deciding, &fresh.deciding);
            let system = PrincipalKey::new(PrincipalKind::System, "framework").unwrap();
            for who in (0..PRINCIPALS.len()).map(principal).chain([system]) {
                for type_filter in [None, Some("task"), Some("chat")] {
                    let found: Vec<String> = r.entities_for(&who, type_filter).iter().map(|e| e.url.clone()).collect();
                    prop_assert_eq!(found, brute_force(&r, &who, type_filter), "{} {:?}", who, type_filter);
                }
                let me = who.url();
                let scanned = holdings(r.entities(None).iter().map(|e| &**e), &me, |url| r.grants(url).len());
                prop_assert_eq!(r.held_by(&me), scanned);
            }
        }
    }
}

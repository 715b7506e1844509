//! Entities `/{type}/{instanceId}`, the streams they own, and the
//! permissions principals hold on them.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::principal::{percent_decode_strict, PrincipalKey, PrincipalKind};

/// An entity's address: `/{type}/{instanceId}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EntityUrl {
    entity_type: String,
    instance_id: String,
}

fn check_segment(what: &str, s: &str) -> Result<()> {
    if s.is_empty() || s.len() > 128 {
        return Err(Error::Invalid(format!("{what} must be 1 to 128 bytes")));
    }
    if s.starts_with('.') {
        return Err(Error::Invalid(format!("{what} {s:?} must not start with '.'")));
    }
    if s.contains('/') || s.contains('\\') || s.chars().any(|c| c.is_control()) {
        return Err(Error::Invalid(format!("{what} {s:?} must not contain '/', '\\' or control characters")));
    }
    if s.contains('%') {
        return Err(Error::Invalid(format!("{what} {s:?} must not contain percent-escapes")));
    }
    Ok(())
}

/// The characters a new entity's type and instance id are spelled with, for
/// error messages: RFC 3986's unreserved characters.
pub const NAME_CHARS: &str = "letters A-Z and a-z, digits 0-9, '-', '.', '_' and '~'";

/// One of [`NAME_CHARS`]. A URL path spells these one way only: as
/// themselves (`encodeURIComponent` leaves them as they are, and the server
/// refuses their percent-encodings with 400, `origin::has_refused_escape`),
/// so a name made of them is one stream path for every client.
fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Checks that `s`, a new name that becomes a stream path segment (an entity's
/// type or id, an attachment id), is spelled with [`NAME_CHARS`] only; the
/// refusal names them.
pub(crate) fn check_name_chars(what: &str, s: &str) -> std::result::Result<(), String> {
    if s.bytes().all(is_name_byte) {
        return Ok(());
    }
    Err(format!(
        "{what} {s:?} may contain only {NAME_CHARS}: other characters have more than one spelling in a URL path"
    ))
}

impl EntityUrl {
    /// An entity URL as addressed: the entity may exist, made by this release
    /// or by an older one, whose names were looser (any characters but '/',
    /// '\\', '%', '*' and control characters). Every route that reaches an
    /// existing entity, and the stream routes, take names by this rule, so
    /// stored entities stay readable and deletable; a new entity's name takes
    /// [`EntityUrl::for_new_entity`]'s stricter one.
    pub fn new(entity_type: &str, instance_id: &str) -> Result<EntityUrl> {
        check_segment("entity type", entity_type)?;
        if entity_type.starts_with('_') || entity_type.contains('*') {
            return Err(Error::Invalid(format!("entity type {entity_type:?} must not start with '_' or contain '*'")));
        }
        check_segment("instance id", instance_id)?;
        if instance_id.contains('*') {
            return Err(Error::Invalid(format!("instance id {instance_id:?} must not contain '*'")));
        }
        Ok(EntityUrl { entity_type: entity_type.to_owned(), instance_id: instance_id.to_owned() })
    }

    /// The URL a new entity takes (spawn, fork, `task.create`): [`EntityUrl::new`]'s
    /// rules, and its type and instance id spelled only with [`NAME_CHARS`],
    /// so every client addresses its streams by one path. An id with a space,
    /// '?', '#', a non-ASCII letter or a sub-delimiter (`!`, `'`, `(`, `:`,
    /// ...) had spellings that reached different streams, or none.
    pub fn for_new_entity(entity_type: &str, instance_id: &str) -> Result<EntityUrl> {
        let url = EntityUrl::new(entity_type, instance_id)?;
        check_name_chars("entity type", entity_type).map_err(Error::InvalidEntityName)?;
        check_name_chars("instance id", instance_id).map_err(Error::InvalidEntityName)?;
        Ok(url)
    }

    /// If `path`, read as lenient clients and proxies may read it, is an
    /// entity's stream (`/{t}/{i}/main`, `/{t}/{i}/attachments/{x}`) spelled
    /// another way, that entity. The readings: percent-escapes decoded
    /// (`/chat/a%20b/main`), empty segments merged (`/t//i/main`, `//t/i/main`,
    /// `/t/i/main/`) and `\` taken for `/` (WHATWG URL parsers do, for
    /// http); and all that with path parameters dropped as well (`/t/i/main;x`:
    /// some proxies strip them). Such a path is no entity's
    /// ([`EntityUrl::owning`] is `None`), but a client or proxy that reads it
    /// so reaches the entity's: a plain stream may not be created there.
    pub fn respelled_by(path: &str) -> Option<EntityUrl> {
        let rest = path.strip_prefix('/')?;
        [false, true].into_iter().find_map(|drop_params| {
            let mut read = Vec::new();
            for segment in rest.split(['/', '\\']) {
                let segment = if drop_params { segment.split(';').next().unwrap_or_default() } else { segment };
                let decoded = percent_decode_strict(segment).ok()?;
                if !decoded.is_empty() {
                    read.push(decoded);
                }
            }
            let entity = match read.as_slice() {
                [t, i, main] if main == "main" => EntityUrl::new(t, i).ok()?,
                [t, i, attachments, _] if attachments == "attachments" => EntityUrl::new(t, i).ok()?,
                _ => return None,
            };
            // Read as it is spelled: the entity's own path, not another spelling of it.
            let as_is = rest.split('/').eq(read.iter().map(String::as_str));
            (!as_is).then_some(entity)
        })
    }

    /// Parses `/{type}/{instanceId}` (as addressed, [`EntityUrl::new`]).
    pub fn parse(url: &str) -> Result<EntityUrl> {
        let rest =
            url.strip_prefix('/').ok_or_else(|| Error::Invalid(format!("entity url {url:?} must start with '/'")))?;
        let (t, i) =
            rest.split_once('/').ok_or_else(|| Error::Invalid(format!("entity url {url:?} is not /type/id")))?;
        EntityUrl::new(t, i)
    }

    pub fn entity_type(&self) -> &str {
        &self.entity_type
    }
    pub fn instance_id(&self) -> &str {
        &self.instance_id
    }
    /// `/{type}/{instanceId}`, as [`Display`](fmt::Display) writes it, built
    /// in one allocation of its size (the task face asks for it on every call).
    pub fn path(&self) -> String {
        ["/", &self.entity_type, "/", &self.instance_id].concat()
    }
    /// (Joined like [`EntityUrl::path`]: `format!` starts small, grows, and
    /// goes through the formatter for every piece.)
    pub fn main_stream(&self) -> String {
        ["/", &self.entity_type, "/", &self.instance_id, "/main"].concat()
    }
    pub fn attachment_stream(&self, attachment_id: &str) -> String {
        ["/", &self.entity_type, "/", &self.instance_id, "/attachments/", attachment_id].concat()
    }

    /// If `path` is a stream an entity owns (`/{t}/{i}/main` or
    /// `/{t}/{i}/attachments/{x}`), the entity and which stream.
    pub fn owning(path: &str) -> Option<(EntityUrl, EntityStream)> {
        let rest = path.strip_prefix('/')?;
        // `/{type}/{id}/main` at least: a path with fewer separators is no
        // entity's (most are not, and this runs several times a request).
        if rest.bytes().filter(|&b| b == b'/').take(2).count() < 2 {
            return None;
        }
        let mut parts = rest.splitn(4, '/');
        let (t, i, kind) = (parts.next()?, parts.next()?, parts.next()?);
        // Which stream first: most paths are no entity's, and need no allocation to say so.
        let which = match (kind, parts.next()) {
            ("main", None) => EntityStream::Main,
            ("attachments", Some(id)) if !id.is_empty() => EntityStream::Attachment(id.to_owned()),
            _ => return None,
        };
        Some((EntityUrl::new(t, i).ok()?, which))
    }
}

impl fmt::Display for EntityUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "/{}/{}", self.entity_type, self.instance_id)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntityStream {
    Main,
    Attachment(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Permission {
    Read,
    Write,
    Delete,
    /// Send a signal (`POST .../signal`).
    Signal,
    /// Fork the entity (`POST .../fork`).
    Fork,
    /// Electric's `schedule`: grantable (and kept), for the routes that will need it.
    Schedule,
    /// Spawn (or fork) an entity under this one (Electric's `parent`).
    Spawn,
    Manage,
}

/// Where a grant applies: the entity itself (`self`, the default), or the
/// entity and every entity spawned under it (`descendants`), as Electric has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Propagation {
    #[default]
    #[serde(rename = "self")]
    Own,
    Descendants,
}

impl Propagation {
    pub fn parse(s: &str) -> Result<Propagation> {
        match s {
            "self" => Ok(Propagation::Own),
            "descendants" => Ok(Propagation::Descendants),
            other => Err(Error::Invalid(format!("unknown propagation {other:?}: expected self or descendants"))),
        }
    }
    pub fn as_str(&self) -> &'static str {
        match self {
            Propagation::Own => "self",
            Propagation::Descendants => "descendants",
        }
    }
}

impl Permission {
    pub fn parse(s: &str) -> Result<Permission> {
        match s {
            "read" => Ok(Permission::Read),
            "write" => Ok(Permission::Write),
            "delete" => Ok(Permission::Delete),
            "signal" => Ok(Permission::Signal),
            "fork" => Ok(Permission::Fork),
            "schedule" => Ok(Permission::Schedule),
            "spawn" => Ok(Permission::Spawn),
            "manage" => Ok(Permission::Manage),
            other => Err(Error::Invalid(format!(
                "unknown permission {other:?}: expected read, write, delete, signal, fork, schedule, spawn or manage"
            ))),
        }
    }
    pub fn as_str(&self) -> &'static str {
        match self {
            Permission::Read => "read",
            Permission::Write => "write",
            Permission::Delete => "delete",
            Permission::Signal => "signal",
            Permission::Fork => "fork",
            Permission::Schedule => "schedule",
            Permission::Spawn => "spawn",
            Permission::Manage => "manage",
        }
    }
}

/// A signal sent to an entity (`POST /_electric/entities/{type}/{id}/signal`),
/// by Electric's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Int,
    Hup,
    Term,
    Kill,
    Stop,
    Cont,
    Usr,
}

/// What a signal does to an entity in attache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalEffect {
    /// Stops the entity, as `DELETE` does (status `stopped`, main stream closed).
    Stops,
    /// Recorded on the main stream as an unhandled `signal` row, for whatever
    /// runtime reads the stream; the entity's status does not change.
    Recorded,
    /// Refused: attache has no paused state, so recording the signal would
    /// claim a pause (or resume) that never happens.
    Unsupported,
}

impl Signal {
    pub const ALL: [Signal; 7] =
        [Signal::Int, Signal::Hup, Signal::Term, Signal::Kill, Signal::Stop, Signal::Cont, Signal::Usr];

    /// The names there are, for error messages.
    pub const NAMES: &'static str = "SIGINT, SIGHUP, SIGTERM, SIGKILL, SIGSTOP, SIGCONT or SIGUSR";

    pub fn parse(s: &str) -> Result<Signal> {
        Signal::ALL
            .into_iter()
            .find(|sig| sig.as_str() == s)
            .ok_or_else(|| Error::Invalid(format!("unknown signal {s:?}: expected {}", Signal::NAMES)))
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Signal::Int => "SIGINT",
            Signal::Hup => "SIGHUP",
            Signal::Term => "SIGTERM",
            Signal::Kill => "SIGKILL",
            Signal::Stop => "SIGSTOP",
            Signal::Cont => "SIGCONT",
            Signal::Usr => "SIGUSR",
        }
    }

    pub fn effect(&self) -> SignalEffect {
        match self {
            Signal::Kill | Signal::Term => SignalEffect::Stops,
            Signal::Int | Signal::Hup | Signal::Usr => SignalEffect::Recorded,
            Signal::Stop | Signal::Cont => SignalEffect::Unsupported,
        }
    }
}

/// Who a grant is for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "subject_kind", content = "subject_value", rename_all = "snake_case")]
pub enum GrantSubject {
    /// One principal, recorded by URL.
    Principal(String),
    /// Every principal of a kind.
    PrincipalKind(String),
}

impl GrantSubject {
    pub fn parse(kind: &str, value: &str) -> Result<GrantSubject> {
        match kind {
            "principal" => Ok(GrantSubject::Principal(PrincipalKey::parse(value)?.url())),
            "principal_kind" => Ok(GrantSubject::PrincipalKind(PrincipalKind::parse(value)?.as_str().to_owned())),
            other => {
                Err(Error::Invalid(format!("unknown subject_kind {other:?}: expected principal or principal_kind")))
            }
        }
    }

    pub fn matches(&self, who: &PrincipalKey) -> bool {
        match self {
            GrantSubject::Principal(url) => *url == who.url(),
            GrantSubject::PrincipalKind(kind) => kind == who.kind().as_str(),
        }
    }
}

/// What a principal gets from an entity route (Electric's route table: each
/// route needs one permission).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// It may do what the route does.
    Allowed,
    /// It holds something on the entity (so it may know that the entity
    /// exists), but not this permission: 403.
    Forbidden,
    /// It holds nothing on the entity: the entity does not exist for it (404).
    Hidden,
}

/// The rule, without I/O: what may `who` do on an entity created by
/// `owner_url`, given its grants `(subject, permission, expires_at_ms)` at
/// `now_ms`? The owner and built-in system principals may do anything;
/// anyone else what an unexpired grant of `wanted`, or of `manage`, allows.
/// A principal holding any unexpired grant may learn that the entity exists;
/// one holding none may not.
pub fn access<'a>(
    who: &PrincipalKey,
    owner_url: Option<&str>,
    grants: impl IntoIterator<Item = (&'a GrantSubject, Permission, Option<i64>)>,
    wanted: Permission,
    now_ms: i64,
) -> Access {
    if who.is_built_in_system() || owner_url == Some(who.url().as_str()) {
        return Access::Allowed;
    }
    let mut holds_any = false;
    for (subject, permission, expires) in grants {
        if expires.is_some_and(|at| now_ms >= at) || !subject.matches(who) {
            continue;
        }
        if permission == wanted || permission == Permission::Manage {
            return Access::Allowed;
        }
        holds_any = true;
    }
    if holds_any {
        Access::Forbidden
    } else {
        Access::Hidden
    }
}

/// May `who` do `wanted`? ([`access`] is `Allowed`.)
pub fn permits<'a>(
    who: &PrincipalKey,
    owner_url: Option<&str>,
    grants: impl IntoIterator<Item = (&'a GrantSubject, Permission, Option<i64>)>,
    wanted: Permission,
    now_ms: i64,
) -> bool {
    access(who, owner_url, grants, wanted, now_ms) == Access::Allowed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entitys_paths_are_its_url_and_the_stream_suffixes() {
        let url = EntityUrl::new("task", "t-1").unwrap();
        assert_eq!(url.path(), url.to_string());
        assert_eq!(url.main_stream(), format!("{url}/main"));
        assert_eq!(url.attachment_stream("a-1"), format!("{url}/attachments/a-1"));
        assert_eq!(crate::manifest::ManifestEntry::row_key("a-1"), "attachment:a-1");
    }

    #[test]
    fn entity_urls_refuse_reserved_and_unsafe_names() {
        assert!(EntityUrl::new("chat", "abc").is_ok());
        for (t, i) in [
            ("_x", "a"),
            ("a*", "a"),
            ("chat", "a/b"),
            ("chat", ".hidden"),
            ("chat", "a\nb"),
            ("chat", ""),
            ("chat", "a%2Fb"),
        ] {
            assert!(EntityUrl::new(t, i).is_err(), "{t}/{i}");
        }
    }

    #[test]
    fn new_entity_names_use_unreserved_characters_and_old_ones_stay_addressable() {
        for (t, i) in [("chat", "abc"), ("chat", "T-1.b_c~d"), ("task", "t-1795967306688-0a1b2c"), ("a.b", "x")] {
            assert!(EntityUrl::for_new_entity(t, i).is_ok(), "{t}/{i}");
        }
        for i in
            ["a b", "a?b", "a#b", "caf\u{e9}", "a'b", "a(b)", "a!b", "a:b", "a@b", "a+b", "a,b", "a;b", "a=b", "a|b"]
        {
            assert!(matches!(EntityUrl::for_new_entity("chat", i), Err(Error::InvalidEntityName(_))), "{i:?}");
            assert!(matches!(EntityUrl::for_new_entity(i, "x"), Err(Error::InvalidEntityName(_))), "{i:?}");
            // Made by an older release, such an entity is still addressed.
            assert_eq!(EntityUrl::new("chat", i).map(|u| u.instance_id().to_owned()), Ok(i.to_owned()));
        }
        // The rules of every name still hold first.
        for (t, i) in [("_x", "a"), ("chat", ".a"), ("chat", "a*"), ("chat", "a%41")] {
            assert!(matches!(EntityUrl::for_new_entity(t, i), Err(Error::Invalid(_))), "{t}/{i}");
        }
        let message = EntityUrl::for_new_entity("chat", "a b").unwrap_err().to_string();
        assert!(message.contains("A-Z") && message.contains("'~'"), "{message}");
    }

    #[test]
    fn a_percent_encoded_entity_stream_path_names_the_entity_it_respells() {
        let respelled = |p: &str| EntityUrl::respelled_by(p).map(|e| e.to_string());
        assert_eq!(respelled("/chat/a%20b/main").as_deref(), Some("/chat/a b"));
        assert_eq!(respelled("/chat/a%21b/attachments/x").as_deref(), Some("/chat/a!b"));
        assert_eq!(respelled("/ch%C3%A4t/x/main").as_deref(), Some("/ch\u{e4}t/x"));
        assert_eq!(respelled("/principal/user%3Asam/main").as_deref(), Some("/principal/user:sam"));
        // Empty segments: a proxy that merges slashes reads these as the entity's.
        for merged in ["/chat//c1/main", "//chat/c1/main", "/chat/c1/main/", "/chat/c1//attachments/x"] {
            assert_eq!(respelled(merged).as_deref(), Some("/chat/c1"), "{merged}");
        }
        // Backslashes and path parameters: read away by WHATWG URL parsers and some proxies.
        for lenient in
            ["/chat\\c1/main", "/chat/c1\\main", "/chat/c1/main;x", "/chat;p/c1/main", "/chat/c1;v=1/attachments/x"]
        {
            assert_eq!(respelled(lenient).as_deref(), Some("/chat/c1"), "{lenient}");
        }
        for not_one in [
            "/chat//c1/other",
            "/chat//c1/attachments/x/y",
            "/chat/abc/main",    // spelled as it is: the entity's own path
            "/chat/a%25b/main",  // "a%b" is no entity's name
            "/chat/a%2Fb/main",  // nor "a/b"
            "/chat/a%zzb/main",  // a malformed escape decodes to nothing
            "/chat/a%C3/main",   // nor do bytes that are not UTF-8
            "/_x/a%20b/main",    // "_x" is no entity type
            "/chat/a%20b/other", // not an entity's stream
            "/chat/a%20b/attachments/",
            "/v1/stream/a%20b",
        ] {
            assert_eq!(respelled(not_one), None, "{not_one}");
        }
    }

    /// `s` with the characters `mask` picks (bit n for the n-th, mod 64) written as `%XX` escapes of their bytes.
    fn escaped(s: &str, mask: u64) -> String {
        let mut out = String::new();
        for (n, c) in s.chars().enumerate() {
            if mask >> (n % 64) & 1 == 1 {
                c.encode_utf8(&mut [0; 4]).bytes().for_each(|b| out.push_str(&format!("%{b:02X}")));
            } else {
                out.push(c);
            }
        }
        out
    }

    proptest::proptest! {
        /// A new name is an addressable name whose every byte is one of the 66
        /// unreserved characters, which `encodeURIComponent` leaves as they are.
        #[test]
        fn new_names_are_names_spelled_with_unreserved_characters_only(
            t in "[a-zA-Z0-9._~!*'() %?#:@+é_-]{0,10}",
            i in "[a-zA-Z0-9._~!*'() %?#:@+é/-]{0,10}",
        ) {
            const UNRESERVED: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~";
            let unreserved = |s: &str| s.chars().all(|c| UNRESERVED.contains(c));
            let new = EntityUrl::for_new_entity(&t, &i);
            proptest::prop_assert_eq!(new.is_ok(), EntityUrl::new(&t, &i).is_ok() && unreserved(&t) && unreserved(&i));
            if new.is_ok() {
                proptest::prop_assert_eq!(crate::principal::encode_uri_component(&i), i);
            }
        }

        /// Every other spelling of any entity's stream (some of its type's or
        /// id's bytes percent-encoded) is no entity's stream, and is known as a
        /// spelling of that entity's: no plain stream may take it.
        #[test]
        fn every_other_spelling_of_an_entity_stream_respells_that_entity(
            t in "[a-z0-9._~!'() ?#:@+é-]{1,8}",
            i in "[a-zA-Z0-9._~!'() ?#:@+é-]{1,12}",
            t_mask in proptest::prelude::any::<u64>(),
            i_mask in proptest::prelude::any::<u64>(),
            attachment in proptest::prelude::any::<bool>(),
        ) {
            let Ok(entity) = EntityUrl::new(&t, &i) else { return Ok(()) };
            let suffix = if attachment { "/attachments/x" } else { "/main" };
            let path = format!("/{}/{}{suffix}", escaped(&t, t_mask), escaped(&i, i_mask));
            if path == format!("{entity}{suffix}") {
                proptest::prop_assert!(EntityUrl::owning(&path).is_some_and(|(e, _)| e == entity));
            } else {
                proptest::prop_assert_eq!(EntityUrl::owning(&path), None);
                proptest::prop_assert_eq!(EntityUrl::respelled_by(&path), Some(entity));
            }
        }
    }

    #[test]
    fn entity_owned_streams_are_recognised() {
        let (e, s) = EntityUrl::owning("/chat/abc/main").unwrap();
        assert_eq!((e.to_string(), s), ("/chat/abc".to_string(), EntityStream::Main));
        let (_, s) = EntityUrl::owning("/chat/abc/attachments/x1").unwrap();
        assert_eq!(s, EntityStream::Attachment("x1".into()));
        assert!(EntityUrl::owning("/chat/abc/other").is_none());
        assert!(EntityUrl::owning("/v1/stream/x").is_none());
    }

    #[test]
    fn signals_parse_by_electric_names_and_only_kill_and_term_stop() {
        for sig in Signal::ALL {
            assert_eq!(Signal::parse(sig.as_str()), Ok(sig));
        }
        for bad in ["", "sigkill", "KILL", "SIGQUIT", "SIGUSR1", " SIGKILL"] {
            assert!(Signal::parse(bad).is_err(), "{bad:?}");
        }
        let stops: Vec<_> = Signal::ALL.into_iter().filter(|s| s.effect() == SignalEffect::Stops).collect();
        assert_eq!(stops, [Signal::Term, Signal::Kill]);
        assert_eq!(Signal::Stop.effect(), SignalEffect::Unsupported);
        assert_eq!(Signal::Cont.effect(), SignalEffect::Unsupported);
        assert_eq!(Signal::Usr.effect(), SignalEffect::Recorded);
    }

    #[test]
    fn any_unexpired_grant_reveals_the_entity_and_only_the_wanted_one_allows() {
        let sam = PrincipalKey::parse("user:sam").unwrap();
        let to_sam = GrantSubject::parse("principal", "user:sam").unwrap();
        let to_ann = GrantSubject::parse("principal", "user:ann").unwrap();
        let owner = Some("/principal/user%3Aowner");
        let now = 1_000;
        let write_only = [(&to_sam, Permission::Write, None)];
        assert_eq!(access(&sam, owner, write_only, Permission::Write, now), Access::Allowed);
        assert_eq!(access(&sam, owner, write_only, Permission::Read, now), Access::Forbidden);
        let signal_only = [(&to_sam, Permission::Signal, None)];
        assert_eq!(access(&sam, owner, signal_only, Permission::Signal, now), Access::Allowed);
        assert_eq!(access(&sam, owner, signal_only, Permission::Delete, now), Access::Forbidden);
        // Nothing, someone else's grant, or an expired one: the entity is hidden.
        assert_eq!(access(&sam, owner, [], Permission::Read, now), Access::Hidden);
        assert_eq!(access(&sam, owner, [(&to_ann, Permission::Read, None)], Permission::Read, now), Access::Hidden);
        let lapsed = [(&to_sam, Permission::Manage, Some(now))];
        assert_eq!(access(&sam, owner, lapsed, Permission::Read, now), Access::Hidden);
    }

    #[test]
    fn every_electric_verb_and_propagation_parses_and_prints_back() {
        for verb in ["read", "write", "delete", "signal", "fork", "schedule", "spawn", "manage"] {
            assert_eq!(Permission::parse(verb).map(|p| p.as_str()), Ok(verb));
        }
        assert!(Permission::parse("admin").is_err() && Permission::parse("Read").is_err());
        for p in ["self", "descendants"] {
            assert_eq!(Propagation::parse(p).map(|p| p.as_str()), Ok(p));
        }
        assert!(Propagation::parse("children").is_err());
        assert_eq!(serde_json::to_string(&Propagation::Own).unwrap(), "\"self\"");
    }

    #[test]
    fn grants_follow_subject_permission_and_expiry() {
        let sam = PrincipalKey::parse("user:sam").unwrap();
        let ann = PrincipalKey::parse("user:ann").unwrap();
        let bot = PrincipalKey::parse("agent:bot").unwrap();
        let to_sam = GrantSubject::parse("principal", "user:sam").unwrap();
        let agents = GrantSubject::parse("principal_kind", "agent").unwrap();
        let owner = Some("/principal/user%3Aowner");
        let now = 1_000;
        assert!(permits(&sam, owner, [(&to_sam, Permission::Read, None)], Permission::Read, now));
        assert!(!permits(&sam, owner, [(&to_sam, Permission::Read, None)], Permission::Write, now));
        assert!(permits(&sam, owner, [(&to_sam, Permission::Manage, None)], Permission::Delete, now));
        assert!(!permits(&sam, owner, [(&to_sam, Permission::Read, Some(999))], Permission::Read, now));
        assert!(!permits(&ann, owner, [(&to_sam, Permission::Read, None)], Permission::Read, now));
        assert!(permits(&bot, owner, [(&agents, Permission::Write, None)], Permission::Write, now));
        assert!(permits(&PrincipalKey::dev_local(), owner, [], Permission::Manage, now));
        let owner_key = PrincipalKey::parse("user:owner").unwrap();
        assert!(permits(&owner_key, owner, [], Permission::Manage, now));
    }
}

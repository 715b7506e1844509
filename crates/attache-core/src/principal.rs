//! Principals: who acts. A principal is `<kind>:<id>`; its URL is
//! `/principal/<url-encoded key>`, the form grants and rows record.

use std::fmt;

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PrincipalKind {
    User,
    Agent,
    Service,
    System,
}

impl PrincipalKind {
    pub fn parse(s: &str) -> Result<PrincipalKind> {
        match s {
            "user" => Ok(PrincipalKind::User),
            "agent" => Ok(PrincipalKind::Agent),
            "service" => Ok(PrincipalKind::Service),
            "system" => Ok(PrincipalKind::System),
            other => Err(Error::Invalid(format!(
                "unknown principal kind {other:?}: expected user, agent, service or system"
            ))),
        }
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            PrincipalKind::User => "user",
            PrincipalKind::Agent => "agent",
            PrincipalKind::Service => "service",
            PrincipalKind::System => "system",
        }
    }
}

/// A validated principal key, `<kind>:<id>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PrincipalKey {
    kind: PrincipalKind,
    id: String,
}

/// Principals that may do everything: the server's own actors. No request
/// may claim one in dev mode (see `attache_server::auth`).
pub const BUILT_IN_SYSTEM_PRINCIPALS: &[&str] = &["dev-local", "framework", "auth-sync", "attache"];

impl PrincipalKey {
    pub const DEV_LOCAL: &'static str = "system:dev-local";
    /// Who a dev-mode request that names no principal acts as.
    pub const ANONYMOUS: &'static str = "user:anonymous";
    const URL_PREFIX: &'static str = "/principal/";

    pub fn new(kind: PrincipalKind, id: &str) -> Result<PrincipalKey> {
        if id.is_empty() || id.len() > 256 {
            return Err(Error::Invalid("a principal id is 1 to 256 characters".into()));
        }
        if id.contains('/') || id.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(Error::Invalid(format!(
                "principal id {id:?} must not contain '/', whitespace or control characters"
            )));
        }
        Ok(PrincipalKey { kind, id: id.to_owned() })
    }

    /// Parses `<kind>:<id>`, or a principal URL `/principal/<encoded key>`.
    pub fn parse(raw: &str) -> Result<PrincipalKey> {
        let raw = raw.trim();
        let key = match raw.strip_prefix(Self::URL_PREFIX) {
            Some(encoded) => percent_decode_strict(encoded)?,
            None => raw.to_owned(),
        };
        let (kind, id) = key
            .split_once(':')
            .ok_or_else(|| Error::Invalid(format!("principal {raw:?} is not of the form <kind>:<id>")))?;
        PrincipalKey::new(PrincipalKind::parse(kind)?, id)
    }

    pub fn dev_local() -> PrincipalKey {
        PrincipalKey { kind: PrincipalKind::System, id: "dev-local".into() }
    }

    /// `system:attache`: the server itself, as the author of what it does on
    /// its own (a signal it handled, the task face's events).
    pub fn server() -> PrincipalKey {
        PrincipalKey { kind: PrincipalKind::System, id: "attache".into() }
    }

    /// `user:anonymous`: an ordinary user, with no permission beyond what any
    /// principal has. It owns what it creates (so a client that sends no
    /// principal can still use its own streams), reads nothing of others,
    /// and is shared by every request that names no principal.
    pub fn anonymous() -> PrincipalKey {
        PrincipalKey { kind: PrincipalKind::User, id: "anonymous".into() }
    }

    pub fn kind(&self) -> PrincipalKind {
        self.kind
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// `/principal/<encodeURIComponent(key)>`. Written straight into one
    /// buffer (every task write asks for it, some twice).
    pub fn url(&self) -> String {
        let (kind, id) = (self.kind.as_str(), self.id.as_str());
        let mut out = String::with_capacity(Self::URL_PREFIX.len() + 3 * (kind.len() + 1 + id.len()));
        out.push_str(Self::URL_PREFIX);
        encode_uri_component_into(&mut out, kind);
        encode_uri_component_into(&mut out, ":");
        encode_uri_component_into(&mut out, id);
        out
    }

    /// Built-in system principals bypass permission checks.
    pub fn is_built_in_system(&self) -> bool {
        self.kind == PrincipalKind::System && BUILT_IN_SYSTEM_PRINCIPALS.contains(&self.id.as_str())
    }
}

impl fmt::Display for PrincipalKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind.as_str(), self.id)
    }
}

/// JavaScript's `encodeURIComponent`: everything but `A-Z a-z 0-9 - _ . ! ~ * ' ( )` is escaped.
pub fn encode_uri_component(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    encode_uri_component_into(&mut out, s);
    out
}

/// [`encode_uri_component`], appended to `out`.
fn encode_uri_component_into(out: &mut String, s: &str) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.!~*'()".contains(&b) {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(HEX[usize::from(b >> 4)] as char);
            out.push(HEX[usize::from(b & 0xf)] as char);
        }
    }
}

/// Percent-decoding that refuses malformed escapes instead of guessing.
pub fn percent_decode_strict(s: &str) -> Result<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let pair = hex_pair(bytes.get(i + 1..i + 3))
                .ok_or_else(|| Error::Invalid(format!("malformed percent-escape in {s:?}")))?;
            out.push(pair);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| Error::Invalid(format!("{s:?} does not decode to UTF-8")))
}

/// The byte two hex digits spell (`from_str_radix` alone would also take `+1`).
pub(crate) fn hex_pair(pair: Option<&[u8]>) -> Option<u8> {
    let pair = pair.filter(|p| p.len() == 2 && p.iter().all(u8::is_ascii_hexdigit))?;
    u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn keys_and_urls_name_the_same_principal() {
        let p = PrincipalKey::parse("user:sam").unwrap();
        assert_eq!(p.url(), "/principal/user%3Asam");
        assert_eq!(PrincipalKey::parse(&p.url()).unwrap(), p);
        assert!(PrincipalKey::dev_local().is_built_in_system());
        assert!(!PrincipalKey::parse("system:someone").unwrap().is_built_in_system());
        assert!(!PrincipalKey::anonymous().is_built_in_system());
        assert_eq!(PrincipalKey::anonymous().to_string(), PrincipalKey::ANONYMOUS);
    }

    #[test]
    fn malformed_principals_are_rejected() {
        for bad in ["", "sam", "robot:x", "user:", "user:a/b", "user:a b", "/principal/user%3", "/principal/%ZZ"] {
            assert!(PrincipalKey::parse(bad).is_err(), "{bad:?}");
        }
        for malformed in ["%+1", "%-1", "a%+f", "%1"] {
            assert!(percent_decode_strict(malformed).is_err(), "{malformed:?} is not two hex digits");
        }
    }

    proptest! {
        #[test]
        fn principal_urls_round_trip(id in "[A-Za-z0-9@._:+-]{1,40}") {
            let p = PrincipalKey::new(PrincipalKind::Agent, &id).unwrap();
            prop_assert_eq!(PrincipalKey::parse(&p.url()).unwrap(), p.clone());
            // Written straight into one buffer, it is the encoded key all the same.
            prop_assert_eq!(p.url(), format!("/principal/{}", encode_uri_component(&p.to_string())));
            prop_assert_eq!(PrincipalKey::parse(&p.to_string()).unwrap(), p);
        }

        #[test]
        fn principal_parser_never_panics(s in ".{0,64}") {
            let _ = PrincipalKey::parse(&s);
        }
    }
}

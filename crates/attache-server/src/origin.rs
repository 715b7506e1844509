//! Who may reach the server from a web browser, and the CORS and
//! browser-security headers on every response (PROTOCOL.md §12.7).
//!
//! Dev mode trusts a request header, so a web page the developer visits must
//! not be able to send requests that take effect:
//! - Host (DNS rebinding): the `Host` must be a loopback name (`localhost`,
//!   `*.localhost`, `127.x.y.z`, `[::1]`) or one given with `--allow-host`;
//!   otherwise 403 `HOST_NOT_ALLOWED`, on every route.
//! - Origin: a request whose `Origin` is neither its own origin nor one given
//!   with `--cors-origin` is refused with 403 `ORIGIN_NOT_ALLOWED` before any
//!   handler runs. That stops "simple" requests too (a `text/plain` POST or a
//!   form post has no preflight), preflights, and WebSocket upgrades.
//!   `Origin: null` (sandboxed frames, `file:` pages) is never allowed.
//!
//! Token mode: a bearer token is not sent by a browser on its own, so there
//! is no Host rule and any origin may call (`Access-Control-Allow-Origin: *`)
//! unless `--cors-origin` lists the origins, which are then the only ones.

use std::net::{Ipv4Addr, Ipv6Addr};

use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::auth::AuthMode;
use crate::config::ServerConfig;
use crate::error::ApiError;
use crate::AppState;

/// What is exposed to and accepted from browser scripts on allowed origins.
const EXPOSED: &str = "Stream-Next-Offset, Stream-Cursor, Stream-Up-To-Date, Stream-Closed, Stream-TTL, \
Stream-Expires-At, Stream-Sse-Data-Encoding, Producer-Epoch, Producer-Seq, Producer-Expected-Seq, \
Producer-Received-Seq, ETag, Location, Content-Type, Content-Length, Content-Range, Content-Disposition, Accept-Ranges, \
Mcp-Session-Id, X-Total-Count, X-Next-Offset, Retry-After, WWW-Authenticate";
/// A fixed list: what a browser asks for is never echoed back.
const ALLOWED_HEADERS: &str = "Content-Type, Authorization, If-None-Match, If-Match, Range, Stream-Seq, Stream-TTL, \
Stream-Expires-At, Stream-Closed, Stream-Forked-From, Stream-Fork-Offset, Stream-Fork-Sub-Offset, Producer-Id, \
Producer-Epoch, Producer-Seq, Electric-Principal, Mcp-Session-Id, Mcp-Protocol-Version, Last-Event-ID";
const ALLOWED_METHODS: &str = "GET, HEAD, POST, PUT, DELETE, OPTIONS";

/// The browser rules of one server, fixed at start.
#[derive(Debug, Clone)]
pub struct BrowserPolicy {
    /// Dev mode: the Host rule applies and `Origin: null` is refused.
    dev: bool,
    /// Host names allowed besides loopback ones (lower case, no port).
    allowed_hosts: Vec<String>,
    /// `None`: any origin (`*`); otherwise the serialized origins allowed.
    origins: Option<Vec<String>>,
}

/// What the guard decided about a request's origin.
enum Verdict {
    /// Not a cross-origin browser request (no `Origin`, or its own origin).
    NoCors,
    /// Any origin may read the answer.
    Any,
    /// This listed origin may read the answer.
    Listed(HeaderValue),
}

impl BrowserPolicy {
    /// Checks `--cors-origin` and `--allow-host` values; the error names the bad one.
    pub fn new(mode: AuthMode, config: &ServerConfig) -> Result<BrowserPolicy, String> {
        let dev = mode == AuthMode::Dev;
        let mut origins = Vec::with_capacity(config.cors_origins.len());
        for raw in &config.cors_origins {
            let origin = normalize_origin(raw).ok_or_else(|| {
                format!("--cors-origin {raw:?} is not an origin: give scheme://host[:port], e.g. http://localhost:5173")
            })?;
            if dev && origin == "null" {
                return Err("--cors-origin null is never allowed in dev mode: any sandboxed page sends it".into());
            }
            origins.push(origin);
        }
        let mut allowed_hosts = Vec::with_capacity(config.allowed_hosts.len());
        for raw in &config.allowed_hosts {
            let host = raw.trim().to_ascii_lowercase();
            let valid = !host.is_empty()
                && (host.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
                    || (host.starts_with('[')
                        && host.ends_with(']')
                        && host[1..host.len() - 1].parse::<Ipv6Addr>().is_ok()));
            if !valid {
                return Err(format!("--allow-host {raw:?} is not a host name: give a name without scheme or port"));
            }
            allowed_hosts.push(host);
        }
        let origins = if origins.is_empty() && !dev { None } else { Some(origins) };
        Ok(BrowserPolicy { dev, allowed_hosts, origins })
    }

    /// The request's Host, if the Host rule lets it in (dev mode only).
    fn check_host(&self, req: &Request) -> Result<(), ApiError> {
        // RFC 9112 3.2: more than one Host is 400, in every mode. Before
        // (session 18's attack pass), the first one was checked and the
        // rest ignored.
        let first = single(req.headers(), header::HOST, "Host")?;
        // RFC 9112 3.2.2 and RFC 9113 8.3.1: a request target with an
        // authority (absolute form, or HTTP/2's `:authority`) names the host
        // itself; a Host naming another is refused, rather than one of the two
        // checked and the other served (before, `GET http://evil.example/x`
        // with `Host: 127.0.0.1` passed dev mode's check: session 19's attack pass).
        if let (Some(authority), Some(v)) = (req.uri().authority(), first) {
            let named = |a: &str| split_authority(a).map(|(name, _)| name.into_owned());
            let header = v.to_str().ok().and_then(named);
            if header.is_none() || header != named(authority.as_str()) {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "HOST_MISMATCH",
                    format!(
                        "this request's target names the host {:?} and its Host header another",
                        authority.as_str()
                    ),
                ));
            }
        }
        if !self.dev {
            return Ok(());
        }
        // `request_host`, from the one lookup above.
        let host = match first {
            Some(v) => v.to_str().map_err(|_| host_unreadable("this request's Host is not visible ASCII"))?,
            None => {
                req.uri().authority().map(|a| a.as_str()).ok_or_else(|| host_unreadable("this request has no Host"))?
            }
        };
        let (name, _) = split_authority(host).ok_or_else(|| host_not_allowed(host))?;
        if is_loopback_name(&name) || self.allowed_hosts.iter().any(|h| *h == name) {
            Ok(())
        } else {
            Err(host_not_allowed(host))
        }
    }

    fn check_origin(&self, req: &Request) -> Result<Verdict, ApiError> {
        let Some(origins) = &self.origins else { return Ok(Verdict::Any) };
        // An Origin is one origin (RFC 6454 7): two are no answer to "whose page is this".
        let Some(value) = single(req.headers(), header::ORIGIN, "Origin")? else { return Ok(Verdict::NoCors) };
        let raw = value.to_str().unwrap_or("");
        let refuse = || {
            ApiError::new(
                StatusCode::FORBIDDEN,
                "ORIGIN_NOT_ALLOWED",
                format!("origin {raw:?} may not call this server: start it with --cors-origin <origin> to allow one"),
            )
        };
        let origin = normalize_origin(raw).ok_or_else(refuse)?;
        if origin == "null" {
            return if !self.dev && origins.iter().any(|o| o == "null") {
                Ok(Verdict::Listed(value.clone()))
            } else {
                Err(refuse())
            };
        }
        if origins.contains(&origin) {
            return Ok(Verdict::Listed(value.clone()));
        }
        if request_host(req).is_some_and(|host| same_origin(&origin, host)) {
            return Ok(Verdict::NoCors);
        }
        Err(refuse())
    }

    /// Security headers every answer carries, refused or not.
    fn stamp(&self, headers: &mut HeaderMap) {
        headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
        // Nothing attache serves is a page: a stream or attachment a browser
        // renders runs no script and gets an opaque origin.
        headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static("sandbox"));
        // Dev mode: other sites may not embed answers (`<img>`, `<script>`).
        let corp = if self.dev { "same-origin" } else { "cross-origin" };
        headers.insert(CROSS_ORIGIN_RESOURCE_POLICY, HeaderValue::from_static(corp));
        if self.origins.is_some() {
            headers.append(header::VARY, HeaderValue::from_static("Origin"));
        }
    }
}

/// Not among `http`'s named headers; a name given as `&str` is parsed at every insert.
const CROSS_ORIGIN_RESOURCE_POLICY: axum::http::HeaderName =
    axum::http::HeaderName::from_static("cross-origin-resource-policy");

/// The one value of a field that is one value (`Host`, `Origin`,
/// `Content-Type`, the credentials), if it came: two are 400
/// `DUPLICATE_HEADER` (`label` names the field in the message), never the
/// first taken and the rest ignored.
pub(crate) fn single<'h>(
    headers: &'h HeaderMap,
    name: impl axum::http::header::AsHeaderName,
    label: &str,
) -> Result<Option<&'h HeaderValue>, ApiError> {
    let mut values = headers.get_all(name).iter();
    let first = values.next();
    if values.next().is_some() {
        return Err(more_than_one(label));
    }
    Ok(first)
}

/// 400 `DUPLICATE_HEADER`: a field that is one value came twice.
fn more_than_one(name: &str) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "DUPLICATE_HEADER",
        format!("a request carries one {name} header at most; this one carries several"),
    )
}

/// As [`host_not_allowed`], for a Host that is missing or not text (no name to quote).
fn host_unreadable(what: &str) -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        "HOST_NOT_ALLOWED",
        format!("{what}: dev mode answers only requests whose Host is a loopback name or an --allow-host name"),
    )
}

fn host_not_allowed(host: &str) -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        "HOST_NOT_ALLOWED",
        format!("Host {host:?} is not a loopback name: dev mode answers only loopback names and --allow-host names"),
    )
}

/// Applies the Host and Origin rules, answers preflights, refuses encoded
/// separators in the path, and stamps every response. A step of the front
/// door (`router::front`): each middleware layer costs every request a boxed
/// future and a state clone, so there is one for all of it.
pub async fn guard<F, Fut>(state: &AppState, req: Request, next: F) -> Response
where
    F: FnOnce(Request) -> Fut,
    Fut: std::future::Future<Output = Response>,
{
    let policy = &state.browser;
    let verdict = match policy.check_host(&req).and_then(|()| policy.check_origin(&req)) {
        Ok(verdict) => verdict,
        Err(refused) => {
            let refused = refused.refusal();
            tracing::debug!(code = refused.code, message = %refused.message, "browser request refused");
            let mut res = refused.into_response();
            policy.stamp(res.headers_mut());
            return res;
        }
    };
    let preflight = req.method() == Method::OPTIONS;
    let mut res = if preflight {
        StatusCode::NO_CONTENT.into_response()
    } else if has_refused_escape(req.uri().path()) {
        ApiError::bad_request(
            "encoded '/', '.', '\\', control characters, letters, digits, '-', '_' or '~' in a URL path are not allowed",
        )
        .into_response()
    } else {
        next(req).await
    };
    let h = res.headers_mut();
    policy.stamp(h);
    let allow = match verdict {
        Verdict::Any => HeaderValue::from_static("*"),
        Verdict::Listed(origin) => origin,
        Verdict::NoCors => return res,
    };
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allow);
    h.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, HeaderValue::from_static(EXPOSED));
    if preflight {
        h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static(ALLOWED_METHODS));
        h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, HeaderValue::from_static(ALLOWED_HEADERS));
        h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("86400"));
    }
    res
}

/// `Host`, or the `:authority` of an HTTP/2 request.
fn request_host(req: &Request) -> Option<&str> {
    match req.headers().get(header::HOST) {
        Some(v) => v.to_str().ok(),
        None => req.uri().authority().map(|a| a.as_str()),
    }
}

/// `host[:port]` → (lower-case host, port); IPv6 hosts keep their brackets.
fn split_authority(authority: &str) -> Option<(std::borrow::Cow<'_, str>, Option<u16>)> {
    let (host, port) = if authority.starts_with('[') {
        let end = authority.find(']')?;
        let rest = &authority[end + 1..];
        let port = match rest {
            "" => None,
            _ => Some(rest.strip_prefix(':')?),
        };
        (&authority[..=end], port)
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    if host.is_empty() || host.bytes().any(|b| matches!(b, b'/' | b'@' | b'?' | b'#' | b' ')) {
        return None;
    }
    let port = match port {
        None => None,
        Some(p) => Some(p.parse::<u16>().ok()?),
    };
    // Copied only when it has capitals: the Host of nearly every request is
    // already lower-case, and this runs on every request in dev mode.
    let host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(host.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(host)
    };
    Some((host, port))
}

/// Names that can only reach this machine: `localhost` and `*.localhost`
/// (browsers resolve them to loopback themselves), 127.0.0.0/8 and `[::1]`.
/// `0.0.0.0` is not one: some browsers route it to this machine, which is
/// exactly the trick a hostile page uses.
pub fn is_loopback_name(host: &str) -> bool {
    // The names nearly every local request carries, before any parsing.
    if matches!(host, "127.0.0.1" | "[::1]") {
        return true;
    }
    if host == "localhost" || host.strip_suffix(".localhost").is_some_and(|label| !label.is_empty()) {
        return true;
    }
    if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return v6
            .parse::<Ipv6Addr>()
            .is_ok_and(|ip| ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()));
    }
    host.parse::<Ipv4Addr>().is_ok_and(|ip| ip.is_loopback())
}

fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" | "ws" => Some(80),
        "https" | "wss" => Some(443),
        _ => None,
    }
}

/// An origin as browsers serialize it, `scheme://host[:port]` (default port
/// dropped, lower case), or `null`; `None` when it is not one.
pub fn normalize_origin(raw: &str) -> Option<String> {
    let raw = raw.trim().trim_end_matches('/');
    if raw.eq_ignore_ascii_case("null") {
        return Some("null".into());
    }
    let (scheme, authority) = raw.split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    let scheme_ok = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    if !scheme_ok {
        return None;
    }
    let (host, port) = split_authority(authority)?;
    Some(match port {
        Some(p) if default_port(&scheme) != Some(p) => format!("{scheme}://{host}:{p}"),
        _ => format!("{scheme}://{host}"),
    })
}

/// Does the (normalized) origin name the server the request was sent to?
/// The scheme is not compared: behind a TLS proxy the server cannot see it.
fn same_origin(origin: &str, host: &str) -> bool {
    let Some((scheme, authority)) = origin.split_once("://") else { return false };
    let (Some((o_host, o_port)), Some((h_host, h_port))) = (split_authority(authority), split_authority(host)) else {
        return false;
    };
    let port = |p: Option<u16>| p.or_else(|| default_port(scheme));
    o_host == h_host && port(o_port) == port(h_port)
}

/// Encoded slashes, dots, backslashes and NULs in a path are refused outright
/// (400, by [`guard`]): they are how path confusion starts. So are encoded
/// unreserved characters (letters, digits, `-`, `_`, `~`), which RFC 3986
/// makes equivalent to themselves: `/chat/a1/m%61in` was a plain stream
/// anyone could create beside the entity `/chat/a1`'s main stream, which a
/// client normalizing the URL reads as `/chat/a1/main`. A path has one spelling.
///
/// `%2F`, `%2E`, `%5C`, an encoded control character (C0, DEL, C1) or an
/// unreserved character, in any case (no allocation: this runs on every request).
pub fn has_refused_escape(path: &str) -> bool {
    let bytes = path.as_bytes();
    let escaped = |at: usize| -> Option<u8> {
        let hex = |b: u8| (b as char).to_digit(16);
        match bytes.get(at..at + 3)? {
            &[b'%', hi, lo] => Some((hex(hi)? * 16 + hex(lo)?) as u8),
            _ => None,
        }
    };
    (0..bytes.len()).any(|at| match escaped(at) {
        // A control character, encoded: refused as the raw one is (session
        // 19's attack pass found `%0a` and `%7f` taken as part of a name
        // where a raw control character is 400), C1 controls too (`%C2%80`
        // to `%C2%9F`, U+0080 to U+009F in UTF-8).
        Some(b) if b < 0x20 || b == 0x7f => true,
        Some(0xc2) => escaped(at + 3).is_some_and(|next| (0x80..=0x9f).contains(&next)),
        Some(b) => matches!(b, b'/' | b'.' | b'\\') || b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'~'),
        None => false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoded_separators_are_found_in_any_case() {
        for bad in [
            "/a%2Fb",
            "/a%2fb",
            "/%2E%2E/x",
            "/a%5cb",
            "/a%00",
            "/x/%2e",
            "/a%41",
            "/chat/a1/m%61in",
            "/a%7E",
            "/a%2d",
            "/a%5F",
            "/a%01",
            "/a%0a",
            "/a%0D%0A",
            "/a%7f",
            "/a%1F",
            "/a%c2%85",
            "/a%C2%9F",
            "/a%C2%80",
        ] {
            assert!(has_refused_escape(bad), "{bad}");
        }
        for ok in [
            "/a/b",
            "/a%20b",
            "/a%2",
            "/%",
            "/a%C3%A9",
            "/a%3A",
            "/a%25",
            "/a%C2%A0",
            "/a%c2",
            "/a%C2%20",
            "/a%E2%82%AC",
        ] {
            assert!(!has_refused_escape(ok), "{ok}");
        }
    }

    #[test]
    fn loopback_names_are_recognised_and_others_are_not() {
        for ok in ["localhost", "app.localhost", "127.0.0.1", "127.8.9.10", "[::1]", "[::ffff:127.0.0.1]"] {
            assert!(is_loopback_name(ok), "{ok}");
        }
        for bad in
            ["0.0.0.0", "evil.com", "localhost.evil.com", ".localhost", "[::]", "10.0.0.1", "127.1", "localhost."]
        {
            assert!(!is_loopback_name(bad), "{bad}");
        }
    }

    #[test]
    fn origins_normalize_as_browsers_serialize_them() {
        assert_eq!(normalize_origin("HTTP://LocalHost:5173/").as_deref(), Some("http://localhost:5173"));
        assert_eq!(normalize_origin("https://a.example:443").as_deref(), Some("https://a.example"));
        assert_eq!(normalize_origin("http://[::1]:80").as_deref(), Some("http://[::1]"));
        assert_eq!(normalize_origin("null").as_deref(), Some("null"));
        for bad in ["", "localhost:5173", "http://", "http://a/b", "http://u@a", "http://a:99999", "*", "1x://a"] {
            assert_eq!(normalize_origin(bad), None, "{bad}");
        }
    }

    #[test]
    fn same_origin_compares_host_and_port_with_scheme_defaults() {
        assert!(same_origin("http://127.0.0.1:4437", "127.0.0.1:4437"));
        assert!(same_origin("https://a.example", "a.example"));
        assert!(same_origin("https://a.example", "a.example:443"));
        assert!(!same_origin("http://127.0.0.1:4438", "127.0.0.1:4437"));
        assert!(!same_origin("http://evil.example", "127.0.0.1:80"));
    }
}

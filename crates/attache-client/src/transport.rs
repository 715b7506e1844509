//! `RuntimeServerClient`'s plumbing: one HTTP client for every face of an
//! attache server, acting as one principal (dev mode) or bearer token; the
//! request, the error answer as [`Error::Api`], the headers every face reads.
//! Below every face of the client: `client` (entities, attachments),
//! `streams` and `rpc` add their methods to the same type from above it.

use std::time::Duration;

use attache_core::principal::encode_uri_component;
use attache_core::{EntityUrl, PrincipalKey};
use reqwest::header::HeaderValue;
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde_json::Value;

use crate::error::{Error, ErrorCode, Result};

/// The default server address of the CLI and the examples.
pub const DEFAULT_URL: &str = "http://127.0.0.1:4437";
/// The header dev-mode servers trust to name the caller.
pub const PRINCIPAL_HEADER: &str = "electric-principal";

/// How the client proves who it is.
#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    /// Nothing: a dev-mode server treats the caller as `user:anonymous`, an
    /// ordinary principal that sees only what it created.
    None,
    /// Dev mode: `electric-principal: <kind>:<id>`.
    Principal(PrincipalKey),
    /// Token mode: `Authorization: Bearer <token>`.
    Bearer(String),
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::None => f.write_str("None"),
            Credentials::Principal(p) => write!(f, "Principal({p})"),
            Credentials::Bearer(_) => f.write_str("Bearer(<redacted>)"),
        }
    }
}

/// A client of one attache server. Cheap to clone; clones share connections.
#[derive(Debug, Clone)]
pub struct RuntimeServerClient {
    base: String,
    http: reqwest::Client,
    credentials: Credentials,
}

impl RuntimeServerClient {
    /// A client of the server at `base_url` (e.g. `http://127.0.0.1:4437`), with no credentials.
    pub fn new(base_url: &str) -> Result<RuntimeServerClient> {
        let base = base_url.trim_end_matches('/').to_owned();
        let parsed = reqwest::Url::parse(&base)
            .map_err(|e| Error::Invalid(format!("server URL {base_url:?} is not a URL: {e}")))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(Error::Invalid(format!("server URL {base_url:?} must start with http:// or https://")));
        }
        // No overall timeout: live reads and large transfers last as long as they need.
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .tcp_keepalive(Duration::from_secs(30))
            .build()
            .map_err(|e| Error::Transport { url: base.clone(), source: e })?;
        Ok(RuntimeServerClient { base, http, credentials: Credentials::None })
    }

    /// Acts as `principal` (dev-mode servers).
    pub fn with_principal(mut self, principal: PrincipalKey) -> RuntimeServerClient {
        self.credentials = Credentials::Principal(principal);
        self
    }

    /// Sends `Authorization: Bearer <token>` (token-mode servers).
    pub fn with_token(mut self, token: impl Into<String>) -> RuntimeServerClient {
        self.credentials = Credentials::Bearer(token.into());
        self
    }

    /// A clone that acts as `principal` when this client names principals
    /// itself (dev mode); a bearer-token client stays as it is, since a token
    /// is one principal and cannot speak for another.
    pub fn acting_as(&self, principal: &PrincipalKey) -> RuntimeServerClient {
        match &self.credentials {
            Credentials::Bearer(_) => self.clone(),
            _ => self.clone().with_principal(principal.clone()),
        }
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    pub fn credentials(&self) -> &Credentials {
        &self.credentials
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// A request to `path` (which starts with `/`) carrying the credentials.
    pub(crate) fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let rb = self.http.request(method, self.url(path));
        match &self.credentials {
            Credentials::None => rb,
            Credentials::Principal(p) => rb.header(PRINCIPAL_HEADER, p.to_string()),
            Credentials::Bearer(t) => rb.bearer_auth(t),
        }
    }

    /// Sends a request; any status outside 2xx (and 304) becomes [`Error::Api`].
    pub(crate) async fn send(&self, rb: RequestBuilder, method: &Method, path: &str) -> Result<Response> {
        let res = rb.send().await.map_err(|e| self.transport(e))?;
        if res.status().is_success() || res.status() == StatusCode::NOT_MODIFIED {
            return Ok(res);
        }
        Err(api_error(method, path, res).await)
    }

    pub(crate) fn transport(&self, source: reqwest::Error) -> Error {
        Error::Transport { url: self.base.clone(), source }
    }

    pub(crate) async fn json<T: serde::de::DeserializeOwned>(&self, res: Response, what: &str) -> Result<T> {
        let bytes = res.bytes().await.map_err(|e| self.transport(e))?;
        serde_json::from_slice(&bytes).map_err(|e| Error::Protocol(format!("{what}: {e}")))
    }

    /// `GET /healthz`: whether the server answers.
    pub async fn health(&self) -> Result<()> {
        self.send(self.request(Method::GET, "/healthz"), &Method::GET, "/healthz").await.map(|_| ())
    }
}

/// Turns an error answer into [`Error::Api`], reading `{"error":{"code","message"}}` when there is one.
pub(crate) async fn api_error(method: &Method, path: &str, res: Response) -> Error {
    let status = res.status().as_u16();
    let text = res.text().await.unwrap_or_default();
    let body: Option<Value> = serde_json::from_str(&text).ok();
    let err = body.as_ref().and_then(|b| b.get("error"));
    let code = err
        .and_then(|e| e.get("code"))
        .and_then(Value::as_str)
        .map(ErrorCode::parse)
        .unwrap_or_else(|| ErrorCode::from_status(status));
    let message = err.and_then(|e| e.get("message")).and_then(Value::as_str).map(str::to_owned).unwrap_or_else(|| {
        if text.trim().is_empty() {
            status_text(status)
        } else {
            text.trim().to_owned()
        }
    });
    Error::Api { method: method.to_string(), path: path.to_owned(), status, code, message }
}

fn status_text(status: u16) -> String {
    StatusCode::from_u16(status).ok().and_then(|s| s.canonical_reason()).unwrap_or("error").to_owned()
}

pub(crate) fn header(res: &Response, name: &str) -> Option<String> {
    res.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
}

/// `/_electric/entities/{type}/{id}` + `rest`, the type and id percent-encoded
/// as `encodeURIComponent` does: a new entity's name is unchanged by it, and
/// an entity an older release named with a space, `?` or `#` is reached too
/// (the server decodes the route's segments).
pub(crate) fn entity_route(entity: &EntityUrl, rest: &str) -> String {
    let (t, i) = (encode_uri_component(entity.entity_type()), encode_uri_component(entity.instance_id()));
    ["/_electric/entities/", &t, "/", &i, rest].concat()
}

/// `entity_route(entity, "/attachments/{id}")`, the id percent-encoded the same way.
pub(crate) fn attachment_route(entity: &EntityUrl, id: &str) -> String {
    entity_route(entity, &["/attachments/", &encode_uri_component(id)].concat())
}

/// Headers the SDK sends on appends.
pub(crate) fn content_type_header(content_type: &str) -> Result<HeaderValue> {
    HeaderValue::from_str(content_type).map_err(|_| Error::Invalid(format!("{content_type:?} is not a content type")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_urls_must_be_http() {
        assert!(RuntimeServerClient::new("http://127.0.0.1:4437/").is_ok());
        assert!(RuntimeServerClient::new("ftp://x").is_err());
        assert!(RuntimeServerClient::new("not a url").is_err());
    }

    #[test]
    fn entity_routes_encode_the_names_older_releases_allowed_and_keep_new_ones() {
        let new = EntityUrl::new("chat", "A-z_0.9~").unwrap();
        assert_eq!(entity_route(&new, "/send"), "/_electric/entities/chat/A-z_0.9~/send");
        let old = EntityUrl::new("chat", "a b?c#d").unwrap();
        assert_eq!(entity_route(&old, ""), "/_electric/entities/chat/a%20b%3Fc%23d");
        assert_eq!(attachment_route(&new, "x y"), "/_electric/entities/chat/A-z_0.9~/attachments/x%20y");
    }

    #[test]
    fn tokens_never_show_in_debug_output() {
        let c = RuntimeServerClient::new(DEFAULT_URL).unwrap().with_token("secret-token");
        assert!(!format!("{c:?}").contains("secret-token"));
    }
}

//! Who is asking. Two modes:
//! - dev: the `electric-principal` header is trusted; none means
//!   `user:anonymous`, an ordinary principal that sees only what it created.
//!   The header may not name a built-in system principal (`system:attache`,
//!   `system:dev-local`, ...): a client never becomes the server. Allowed only
//!   on loopback listeners, behind the Host and Origin rules of `origin`.
//! - token: `Authorization: Bearer <token>`, checked against the token store.

use attache_core::PrincipalKey;
use attache_storage::tokens::{TokenRejection, TokenStore};
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode};

use crate::error::ApiError;
use crate::origin::single;
use crate::AppState;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    Dev,
    Token,
}

impl AuthMode {
    pub fn parse(s: &str) -> Option<AuthMode> {
        match s {
            "dev" => Some(AuthMode::Dev),
            "token" => Some(AuthMode::Token),
            _ => None,
        }
    }
}

pub struct Auth {
    pub mode: AuthMode,
    pub tokens: TokenStore,
}

pub const PRINCIPAL_HEADER: &str = "electric-principal";

fn unauthorized(message: &str) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", message)
        .with_header(axum::http::header::WWW_AUTHENTICATE, "Bearer")
}

impl Auth {
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<PrincipalKey, ApiError> {
        match self.mode {
            AuthMode::Dev => match single(headers, PRINCIPAL_HEADER, PRINCIPAL_HEADER)? {
                None => Ok(PrincipalKey::anonymous()),
                Some(v) => {
                    let raw =
                        v.to_str().map_err(|_| ApiError::bad_request("electric-principal is not visible ASCII"))?;
                    let who = PrincipalKey::parse(raw)
                        .map_err(|e| ApiError::bad_request(format!("malformed electric-principal header: {e}")))?;
                    if who.is_built_in_system() {
                        return Err(ApiError::new(
                            StatusCode::FORBIDDEN,
                            "PRINCIPAL_NOT_ALLOWED",
                            format!("{who} is one of the server's own principals; a request may not act as it"),
                        ));
                    }
                    Ok(who)
                }
            },
            AuthMode::Token => {
                let header = single(headers, axum::http::header::AUTHORIZATION, "authorization")?
                    .ok_or_else(|| unauthorized("credentials required: send Authorization: Bearer <token>"))?;
                let raw = header.to_str().map_err(|_| unauthorized("malformed Authorization header"))?;
                let token = raw
                    .strip_prefix("Bearer ")
                    .or_else(|| raw.strip_prefix("bearer "))
                    .ok_or_else(|| unauthorized("Authorization must be a Bearer token"))?;
                let principal = self.tokens.verify(token.trim()).map_err(|r| match r {
                    TokenRejection::Malformed | TokenRejection::Unknown => unauthorized("unknown token"),
                    TokenRejection::Expired => unauthorized("token expired"),
                    TokenRejection::Revoked => unauthorized("token revoked"),
                })?;
                PrincipalKey::parse(&principal).map_err(|_| unauthorized("token names an invalid principal"))
            }
        }
    }

    /// Whom a request's budgets are counted to (`http::Shares`): its
    /// principal, told from its credentials without checking them again (the
    /// route checked them before it read its body); `None` when they name none.
    pub fn owner_of(&self, headers: &HeaderMap) -> Option<PrincipalKey> {
        match self.mode {
            AuthMode::Dev => self.authenticate(headers).ok(),
            AuthMode::Token => {
                let raw = headers.get(axum::http::header::AUTHORIZATION)?.to_str().ok()?;
                let token = raw.strip_prefix("Bearer ").or_else(|| raw.strip_prefix("bearer "))?;
                PrincipalKey::parse(&self.tokens.principal_of(token.trim())?).ok()
            }
        }
    }

    /// Whether the credentials a connection presented when it opened still
    /// stand for `who`: a connection that outlives its request (a WebSocket)
    /// asks again before it acts or sends, so a token revoked or expired
    /// meanwhile ends it instead of acting for good.
    pub fn still_valid(&self, presented: &Presented, who: &PrincipalKey) -> bool {
        self.authenticate(&presented.0).is_ok_and(|now| &now == who)
    }
}

/// The subprotocol prefix that carries a token in a WebSocket handshake:
/// `Sec-WebSocket-Protocol: attache.bearer.<token>`. A browser's WebSocket
/// API can set no header but this one, so in token mode `/ws` takes its
/// credential from it when `Authorization` is absent (as Kubernetes' API
/// server does with `base64url.bearer.authorization.k8s.io.`).
pub const WS_BEARER_PROTOCOL: &str = "attache.bearer.";

/// The subprotocols a WebSocket handshake offers, in order (comma-separated, any number of headers).
pub fn offered_subprotocols(headers: &HeaderMap) -> Vec<&str> {
    headers
        .get_all(axum::http::header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect()
}

/// A WebSocket handshake's credentials: its headers, with `Authorization:
/// Bearer <token>` made from each offered `attache.bearer.<token>`
/// subprotocol. What [`Auth::authenticate`] and [`Presented::of`] then read:
/// one credential, given once or the same in several places, is taken; two
/// different ones (two bearer subprotocols, or one beside an `Authorization`
/// naming another token) are refused as two `Authorization` headers are,
/// never decided by which came first (session 20's second attack pass).
pub fn websocket_credentials(headers: &HeaderMap) -> HeaderMap {
    let mut creds = headers.clone();
    let name = axum::http::header::AUTHORIZATION;
    for token in offered_subprotocols(headers).into_iter().filter_map(|p| p.strip_prefix(WS_BEARER_PROTOCOL)) {
        let Ok(value) = HeaderValue::from_str(&format!("Bearer {token}")) else { continue };
        if !creds.get_all(&name).iter().any(|v| v == value) {
            creds.append(name.clone(), value);
        }
    }
    creds
}

/// The credential headers of a request, kept to be checked again later
/// (`Auth::still_valid`); nothing else of the request is kept.
#[derive(Debug, Clone)]
pub struct Presented(HeaderMap);

impl Presented {
    pub fn of(headers: &HeaderMap) -> Presented {
        let mut kept = HeaderMap::new();
        for name in [axum::http::header::AUTHORIZATION.as_str(), PRINCIPAL_HEADER] {
            // Copied, not cloned: a parsed header value is a slice of the
            // connection's read buffer, and a clone kept all of it (a
            // WebSocket opened with a 60 KB head held 64 KB+ for its life).
            let Some(v) = headers.get(name) else { continue };
            if let Ok(mut copy) = HeaderValue::from_bytes(v.as_bytes()) {
                copy.set_sensitive(v.is_sensitive());
                kept.insert(axum::http::HeaderName::from_static(name), copy);
            }
        }
        Presented(kept)
    }
}

/// The authenticated principal of a request.
#[derive(Debug, Clone)]
pub struct Caller(pub PrincipalKey);

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Caller, ApiError> {
        state.auth.authenticate(&parts.headers).map(Caller)
    }
}

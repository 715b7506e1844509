//! The permission matrix, generated: every route and method that touches an
//! entity or a stream, against every kind of actor, in token mode and in dev
//! mode. Each cell's expected status comes from the rules below, never from
//! a list of cells:
//! - token mode: 401 without valid credentials; dev mode: a malformed
//!   `electric-principal` is 400, one naming a built-in system principal 403,
//!   and a request that names no principal is `user:anonymous`, an ordinary
//!   principal with no grants;
//! - 404 when the actor holds nothing on the entity (its existence does not leak);
//! - 403 when it holds something, but not the permission the route needs
//!   (Electric's table: write for uploads and attachment deletes, read for
//!   reads, delete for stop and purge, signal for signals, SIGKILL and
//!   SIGTERM included, which stop the entity as in Electric; fork for forks;
//!   spawn for spawning a child under the entity; manage for grants);
//! - grants on the entity's parent apply to it when made with
//!   `propagation: "descendants"`, and not when made for the parent alone;
//! - otherwise the route's own answer.
//!
//! Every cell gets a fresh entity (with the same grants, an attachment, an
//! open resumable upload and a plain stream), spawned under one parent that
//! carries the parent-scoped grants, so mutations never interfere.
//!
//! Why one file of this size: the matrix is one table (route × principal × grant) over one fixture;
//! in pieces, no one could check it for a missing cell. Besides, each file under tests/ is its own
//! test binary (one more link of the server and all its dependencies), and this one is one face's
//! suite: its fixtures and helpers at the top, then tests that each start their own server and read
//! alone.

mod common;
mod entity_support;

use std::collections::BTreeSet;

use attache_server::auth::AuthMode;
use attache_storage::tokens::TokenStore;
use common::TestServer;
use entity_support::Form;
use futures::StreamExt;
use reqwest::{Method, RequestBuilder, StatusCode};
use serde_json::{json, Value};

const OWNER: &str = "user:owner";
/// Every fixture entity's parent.
const PARENT: &str = "/matrixparent/p";
const SYSTEM: &str = "system:framework";
/// Who a dev-mode request that names no principal is.
const ANONYMOUS: &str = "user:anonymous";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Token,
    Dev,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Perm {
    Read,
    Write,
    Delete,
    Signal,
    Fork,
    Spawn,
    Manage,
}

impl Perm {
    fn name(self) -> &'static str {
        match self {
            Perm::Read => "read",
            Perm::Write => "write",
            Perm::Delete => "delete",
            Perm::Signal => "signal",
            Perm::Fork => "fork",
            Perm::Spawn => "spawn",
            Perm::Manage => "manage",
        }
    }
}

/// Where a grant is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// On the fixture entity.
    Entity,
    /// On its parent, `propagation: "descendants"`: it applies to the entity.
    ParentDescendants,
    /// On its parent, `propagation: "self"`: it does not.
    ParentOnly,
}

/// A grant every fixture entity (or its parent) carries, for one actor.
#[derive(Debug, Clone, Copy)]
struct Grant {
    subject_kind: &'static str,
    subject_value: &'static str,
    perm: Perm,
    expired: bool,
    scope: Scope,
}

impl Grant {
    /// Does it reach the fixture entity?
    fn applies(&self) -> bool {
        !self.expired && self.scope != Scope::ParentOnly
    }
}

const fn to(who: &'static str, perm: Perm) -> Grant {
    Grant { subject_kind: "principal", subject_value: who, perm, expired: false, scope: Scope::Entity }
}

const fn on_parent(who: &'static str, perm: Perm, scope: Scope) -> Grant {
    Grant { subject_kind: "principal", subject_value: who, perm, expired: false, scope }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Credentials {
    /// A valid token for the actor's principal (dev mode: its principal header).
    Token,
    /// A token the server never issued (dev mode: a malformed principal header).
    BadToken,
    /// No Authorization header at all (dev mode: no principal header).
    Nothing,
}

#[derive(Debug, Clone, Copy)]
struct Actor {
    name: &'static str,
    principal: &'static str,
    credentials: Credentials,
    grants: &'static [Grant],
}

const ACTORS: &[Actor] = &[
    Actor { name: "owner", principal: OWNER, credentials: Credentials::Token, grants: &[] },
    Actor {
        name: "granted read",
        principal: "user:reader",
        credentials: Credentials::Token,
        grants: &[to("user:reader", Perm::Read)],
    },
    Actor {
        name: "granted read+write",
        principal: "user:writer",
        credentials: Credentials::Token,
        grants: &[to("user:writer", Perm::Read), to("user:writer", Perm::Write)],
    },
    Actor {
        name: "granted write only",
        principal: "user:scribe",
        credentials: Credentials::Token,
        grants: &[to("user:scribe", Perm::Write)],
    },
    Actor {
        name: "granted signal only",
        principal: "user:signaller",
        credentials: Credentials::Token,
        grants: &[to("user:signaller", Perm::Signal)],
    },
    Actor {
        name: "granted delete only",
        principal: "user:deleter",
        credentials: Credentials::Token,
        grants: &[to("user:deleter", Perm::Delete)],
    },
    Actor {
        name: "granted manage",
        principal: "user:manager",
        credentials: Credentials::Token,
        grants: &[to("user:manager", Perm::Manage)],
    },
    Actor {
        name: "kind grant (agent: read+write)",
        principal: "agent:bot",
        credentials: Credentials::Token,
        grants: &[
            Grant {
                subject_kind: "principal_kind",
                subject_value: "agent",
                perm: Perm::Read,
                expired: false,
                scope: Scope::Entity,
            },
            Grant {
                subject_kind: "principal_kind",
                subject_value: "agent",
                perm: Perm::Write,
                expired: false,
                scope: Scope::Entity,
            },
        ],
    },
    Actor {
        name: "expired manage grant",
        principal: "user:lapsed",
        credentials: Credentials::Token,
        grants: &[Grant {
            subject_kind: "principal",
            subject_value: "user:lapsed",
            perm: Perm::Manage,
            expired: true,
            scope: Scope::Entity,
        }],
    },
    Actor {
        name: "granted spawn only",
        principal: "user:spawner",
        credentials: Credentials::Token,
        grants: &[to("user:spawner", Perm::Spawn)],
    },
    Actor {
        name: "parent's descendants read+fork",
        principal: "user:heir",
        credentials: Credentials::Token,
        grants: &[
            on_parent("user:heir", Perm::Read, Scope::ParentDescendants),
            on_parent("user:heir", Perm::Fork, Scope::ParentDescendants),
        ],
    },
    Actor {
        name: "parent's own manage only",
        principal: "user:uncle",
        credentials: Credentials::Token,
        grants: &[on_parent("user:uncle", Perm::Manage, Scope::ParentOnly)],
    },
    Actor { name: "stranger", principal: "user:stranger", credentials: Credentials::Token, grants: &[] },
    Actor { name: "built-in system", principal: SYSTEM, credentials: Credentials::Token, grants: &[] },
    Actor { name: "bad token", principal: "user:owner", credentials: Credentials::BadToken, grants: &[] },
    Actor { name: "no credentials", principal: "user:owner", credentials: Credentials::Nothing, grants: &[] },
];

impl Actor {
    /// The principal the server must see, or the status that refuses the
    /// request before any route runs.
    fn who(&self, mode: Mode) -> Result<&'static str, u16> {
        match (self.credentials, mode) {
            // No dev-mode request may act as one of the server's own principals.
            (Credentials::Token, Mode::Dev) if self.principal == SYSTEM => Err(403),
            (Credentials::Token, _) => Ok(self.principal),
            (Credentials::BadToken | Credentials::Nothing, Mode::Token) => Err(401),
            (Credentials::BadToken, Mode::Dev) => Err(400),
            (Credentials::Nothing, Mode::Dev) => Ok(ANONYMOUS),
        }
    }

    fn is_owner(&self, mode: Mode) -> bool {
        self.who(mode) == Ok(OWNER)
    }

    fn is_system(&self, mode: Mode) -> bool {
        self.who(mode) == Ok(SYSTEM)
    }

    /// Does it hold anything on the entity (so it may learn that it exists)?
    fn holds_anything(&self, mode: Mode) -> bool {
        match self.who(mode) {
            Err(_) => false,
            Ok(who) => {
                who == OWNER || who == SYSTEM || (who == self.principal && self.grants.iter().any(Grant::applies))
            }
        }
    }

    /// The rule: owners and built-in system principals may do anything;
    /// others what an unexpired grant of that permission, or of manage, allows.
    fn may(&self, mode: Mode, perm: Perm) -> bool {
        match self.who(mode) {
            Err(_) => false,
            Ok(who) => {
                who == OWNER
                    || who == SYSTEM
                    || (who == self.principal
                        && self.grants.iter().any(|g| g.applies() && (g.perm == perm || g.perm == Perm::Manage)))
            }
        }
    }
}

/// How a route decides.
#[derive(Debug, Clone, Copy)]
enum Rule {
    /// Needs this permission on the entity.
    Entity(Perm),
    /// PUT on an existing entity: idempotent for its creator, 409 DUPLICATE_URL for anyone else.
    Respawn,
    /// The entity list: 200 for anyone, and the entity is listed iff the actor may read it.
    List,
    /// A plain stream belongs to its creator (and to built-in system principals).
    /// Anyone else gets 404, except a PUT, which is a create that collides: 409.
    PlainStream,
}

#[derive(Debug, Clone, Copy)]
enum Body {
    Empty,
    Json(&'static str),
    Bytes(&'static str, &'static str),
    Upload,
}

#[derive(Debug, Clone, Copy)]
struct Route {
    method: &'static str,
    /// `{api}` is `/_electric/entities/{type}/{id}`, `{e}` is `/{type}/{id}`,
    /// `{plain}` the plain stream, `{grant}` a grant id.
    path: &'static str,
    body: Body,
    rule: Rule,
    /// The status when the rule allows the actor.
    allowed: u16,
}

const fn route(method: &'static str, path: &'static str, body: Body, rule: Rule, allowed: u16) -> Route {
    Route { method, path, body, rule, allowed }
}

use Body::{Empty, Json, Upload};
use Perm::{Delete, Fork, Manage, Read, Signal, Spawn, Write};

const ENTITY_ROUTES: &[Route] = &[
    route("GET", "{api}", Empty, Rule::Entity(Read), 200),
    route("HEAD", "{api}", Empty, Rule::Entity(Read), 200),
    route("PUT", "{api}", Json("{}"), Rule::Respawn, 200),
    route("DELETE", "{api}", Empty, Rule::Entity(Delete), 200),
    route("DELETE", "{api}?purge=true", Empty, Rule::Entity(Delete), 200),
    route("POST", "{api}/send", Json(r#"{"payload":"hi"}"#), Rule::Entity(Write), 200),
    route("POST", "{api}/signal", Json(r#"{"signal":"SIGKILL"}"#), Rule::Entity(Signal), 200),
    // No instance_id: the fork gets a fresh one, so cells never collide.
    route("POST", "{api}/fork", Json("{}"), Rule::Entity(Fork), 201),
    // A child spawned under the entity: `spawn` on it (`{n}`: the cell, so children never collide).
    route("PUT", "/_electric/entities/matrixkid/c{n}", Json(r#"{"parent":"{e}"}"#), Rule::Entity(Spawn), 201),
    route("GET", "{api}/grants", Empty, Rule::Entity(Manage), 200),
    route(
        "POST",
        "{api}/grants",
        Json(r#"{"subject_kind":"principal","subject_value":"user:newcomer","permission":"read"}"#),
        Rule::Entity(Manage),
        201,
    ),
    route("DELETE", "{api}/grants/{grant}", Empty, Rule::Entity(Manage), 204),
    route("POST", "{api}/tags/color", Json(r#"{"value":"red"}"#), Rule::Entity(Write), 200),
    route("DELETE", "{api}/tags/color", Empty, Rule::Entity(Write), 200),
    route("GET", "/_electric/entities?type=matrix&limit=1000", Empty, Rule::List, 200),
];

const ATTACHMENT_ROUTES: &[Route] = &[
    route("GET", "{api}/attachments", Empty, Rule::Entity(Read), 200),
    route("POST", "{api}/attachments", Upload, Rule::Entity(Write), 201),
    route("GET", "{api}/attachments/done", Empty, Rule::Entity(Read), 200),
    route("HEAD", "{api}/attachments/done", Empty, Rule::Entity(Read), 200),
    route("DELETE", "{api}/attachments/done", Empty, Rule::Entity(Write), 200),
    route(
        "PUT",
        "{api}/attachments/fresh",
        Json(r#"{"mimeType":"text/plain","subject":{"type":"context","key":"test"}}"#),
        Rule::Entity(Write),
        201,
    ),
];

/// The raw Durable Streams routes on the streams an entity owns. DELETE is
/// checked like the rest, then refused (409) in favour of the entity routes;
/// so is a raw PUT creating an attachment stream, and a row of a collection
/// only the server writes (403 SERVER_OWNED_ROW) whoever sends it.
const ENTITY_STREAM_ROUTES: &[Route] = &[
    route("GET", "{e}/main?offset=-1", Empty, Rule::Entity(Read), 200),
    route("HEAD", "{e}/main", Empty, Rule::Entity(Read), 200),
    route(
        "POST",
        "{e}/main",
        Body::Bytes("application/json", r#"{"type":"note","key":"n1","value":{},"headers":{"operation":"insert"}}"#),
        Rule::Entity(Write),
        204,
    ),
    route(
        "POST",
        "{e}/main",
        Body::Bytes("application/json", r#"{"type":"inbox","key":"i1","value":{},"headers":{"operation":"insert"}}"#),
        Rule::Entity(Write),
        403,
    ),
    route("PUT", "{e}/main", Body::Bytes("application/json", ""), Rule::Entity(Write), 200),
    route("DELETE", "{e}/main", Empty, Rule::Entity(Delete), 409),
    route("GET", "{e}/attachments/done?offset=-1", Empty, Rule::Entity(Read), 200),
    route("HEAD", "{e}/attachments/done", Empty, Rule::Entity(Read), 200),
    route("POST", "{e}/attachments/open", Body::Bytes("text/plain", "more"), Rule::Entity(Write), 204),
    // Attachment streams are created by the attachment routes only: a permitted raw PUT is refused.
    route("PUT", "{e}/attachments/open", Body::Bytes("text/plain", ""), Rule::Entity(Write), 409),
    route("DELETE", "{e}/attachments/done", Empty, Rule::Entity(Delete), 409),
];

const PLAIN_STREAM_ROUTES: &[Route] = &[
    route("GET", "{plain}?offset=-1", Empty, Rule::PlainStream, 200),
    route("HEAD", "{plain}", Empty, Rule::PlainStream, 200),
    route("POST", "{plain}", Body::Bytes("text/plain", "more"), Rule::PlainStream, 204),
    route("PUT", "{plain}", Body::Bytes("text/plain", ""), Rule::PlainStream, 200),
    route("DELETE", "{plain}", Empty, Rule::PlainStream, 204),
];

/// What a cell shows: a status, plus for the list whether the entity is in it.
fn expected(mode: Mode, route: &Route, actor: &Actor) -> String {
    if let Err(refused) = actor.who(mode) {
        return refused.to_string();
    }
    match route.rule {
        Rule::Entity(_) if !actor.holds_anything(mode) => "404".into(),
        Rule::Entity(perm) if !actor.may(mode, perm) => "403".into(),
        Rule::Entity(_) => route.allowed.to_string(),
        Rule::Respawn if actor.is_owner(mode) => route.allowed.to_string(),
        Rule::Respawn => "409".into(),
        Rule::List if actor.may(mode, Read) => format!("{} listed", route.allowed),
        Rule::List => format!("{} unlisted", route.allowed),
        Rule::PlainStream if actor.is_owner(mode) || actor.is_system(mode) => route.allowed.to_string(),
        Rule::PlainStream if route.method == "PUT" => "409".into(),
        Rule::PlainStream => "404".into(),
    }
}

/// A server in token mode, with a token for every actor's principal, or in dev mode.
struct Matrix {
    server: TestServer,
    mode: Mode,
    tokens: std::collections::HashMap<&'static str, String>,
}

/// One cell's fresh world.
struct Fixture {
    entity: String,
    plain: String,
    grant: u64,
}

impl Matrix {
    async fn start(mode: Mode) -> Matrix {
        let server = TestServer::start_with(|c| {
            c.auth = Some(match mode {
                Mode::Token => AuthMode::Token,
                Mode::Dev => AuthMode::Dev,
            });
            c.durable = false;
        })
        .await;
        let store = TokenStore::new(&server.config.data_dir);
        let principals: BTreeSet<&'static str> = ACTORS.iter().map(|a| a.principal).collect();
        let tokens =
            principals.into_iter().map(|p| (p, store.create(p, None).expect("a token is created").1)).collect();
        let matrix = Matrix { server, mode, tokens };
        // The fixtures' parent, carrying every parent-scoped grant.
        let grants: Vec<Value> = ACTORS
            .iter()
            .flat_map(|a| a.grants)
            .filter(|g| g.scope != Scope::Entity)
            .map(|g| {
                let propagation = if g.scope == Scope::ParentDescendants { "descendants" } else { "self" };
                json!({ "subject_kind": g.subject_kind, "subject_value": g.subject_value,
                        "permission": g.perm.name(), "propagation": propagation })
            })
            .collect();
        let res = matrix
            .as_owner(Method::PUT, &entity_support::api(PARENT))
            .json(&json!({ "grants": grants }))
            .send()
            .await
            .expect("spawn the parent");
        assert_eq!(res.status(), StatusCode::CREATED, "the fixtures' parent: {}", res.text().await.unwrap());
        matrix
    }

    fn as_actor(&self, rb: RequestBuilder, actor: &Actor) -> RequestBuilder {
        match (actor.credentials, self.mode) {
            (Credentials::Token, Mode::Token) => rb.bearer_auth(&self.tokens[actor.principal]),
            (Credentials::Token, Mode::Dev) => rb.header("electric-principal", actor.principal),
            (Credentials::BadToken, Mode::Token) => rb.bearer_auth("att_0000_not-a-token-this-server-issued"),
            (Credentials::BadToken, Mode::Dev) => rb.header("electric-principal", "no-colon"),
            (Credentials::Nothing, _) => rb,
        }
    }

    fn as_owner(&self, method: Method, path: &str) -> RequestBuilder {
        let rb = self.server.request(method, path);
        match self.mode {
            Mode::Token => rb.bearer_auth(&self.tokens[OWNER]),
            Mode::Dev => rb.header("electric-principal", OWNER),
        }
    }

    /// An entity owned by OWNER carrying every actor's grants, with a complete
    /// attachment `done`, an open resumable upload `open`, a removable grant,
    /// and a plain stream OWNER created.
    async fn fixture(&self, n: usize) -> Fixture {
        let entity = format!("/matrix/e{n}");
        let api = entity_support::api(&entity);
        let grants: Vec<Value> = ACTORS
            .iter()
            .flat_map(|a| a.grants)
            .filter(|g| g.scope == Scope::Entity)
            .map(|g| {
                let mut v = json!({
                    "subject_kind": g.subject_kind,
                    "subject_value": g.subject_value,
                    "permission": g.perm.name(),
                });
                if g.expired {
                    v["expires_at"] = json!("2001-01-01T00:00:00Z");
                }
                v
            })
            .collect();
        let res = self
            .as_owner(Method::PUT, &api)
            .json(&json!({ "grants": grants, "parent": PARENT }))
            .send()
            .await
            .expect("spawn");
        assert_eq!(res.status(), StatusCode::CREATED, "fixture spawn {entity}: {}", res.text().await.unwrap());

        let form = Form::new().field("id", "done").file(Some("done.txt"), Some("text/plain"), b"hello").finish();
        let res = self
            .as_owner(Method::POST, &format!("{api}/attachments"))
            .header("content-type", Form::content_type())
            .body(form)
            .send()
            .await
            .expect("upload");
        assert_eq!(res.status(), StatusCode::CREATED, "fixture upload: {}", res.text().await.unwrap());

        let res = self
            .as_owner(Method::PUT, &format!("{api}/attachments/open"))
            .json(&json!({ "mimeType": "text/plain", "subject": {"type": "context", "key": "test"} }))
            .send()
            .await
            .expect("resumable");
        assert_eq!(res.status(), StatusCode::CREATED, "fixture resumable: {}", res.text().await.unwrap());

        let res = self
            .as_owner(Method::POST, &format!("{api}/grants"))
            .json(&json!({ "subject_kind": "principal", "subject_value": "user:removable", "permission": "read" }))
            .send()
            .await
            .expect("grant");
        assert_eq!(res.status(), StatusCode::CREATED, "fixture grant");
        let grant: Value = res.json().await.expect("a grant is JSON");
        let grant = grant["id"].as_u64().expect("a grant has a numeric id");

        let plain = format!("/plain/p{n}");
        let res = self
            .as_owner(Method::PUT, &plain)
            .header("content-type", "text/plain")
            .body("first")
            .send()
            .await
            .expect("plain create");
        assert_eq!(res.status(), StatusCode::CREATED, "fixture plain stream");
        Fixture { entity, plain, grant }
    }

    /// What the owner sees of a fixture: entity, main stream tail, grants,
    /// attachments, plain stream tail. A refused request must leave it as it was.
    async fn world(&self, f: &Fixture) -> Vec<String> {
        let api = entity_support::api(&f.entity);
        let mut out = Vec::new();
        for (method, path) in [
            (Method::GET, api.clone()),
            (Method::HEAD, format!("{}/main", f.entity)),
            (Method::GET, format!("{api}/grants")),
            (Method::GET, format!("{api}/attachments")),
            (Method::HEAD, format!("{}/attachments/open", f.entity)),
            (Method::HEAD, f.plain.clone()),
        ] {
            let res = self.as_owner(method, &path).send().await.expect("the owner's read is answered");
            let tail = common::header(&res, common::NEXT_OFFSET).unwrap_or_default();
            out.push(format!("{path}: {} {tail} {}", res.status(), res.text().await.unwrap_or_default()));
        }
        out
    }

    /// Runs one cell on its own fixture; returns what it observed, and
    /// whether the fixture changed.
    async fn observe(&self, n: usize, route: &Route, actor: &Actor) -> (String, String, bool) {
        let f = self.fixture(n).await;
        let before = self.world(&f).await;
        let path = route
            .path
            .replace("{api}", &entity_support::api(&f.entity))
            .replace("{e}", &f.entity)
            .replace("{plain}", &f.plain)
            .replace("{grant}", &f.grant.to_string())
            .replace("{n}", &n.to_string());
        let method = Method::from_bytes(route.method.as_bytes()).expect("a method name");
        let mut rb = self.as_actor(self.server.request(method, &path), actor);
        rb = match route.body {
            Body::Empty => rb,
            Body::Json(j) => rb.header("content-type", "application/json").body(j.replace("{e}", &f.entity)),
            Body::Bytes(ct, b) => rb.header("content-type", ct).body(b),
            Body::Upload => rb
                .header("content-type", Form::content_type())
                .body(Form::new().field("id", "uploaded").file(Some("u.txt"), Some("text/plain"), b"bytes").finish()),
        };
        let res = rb.send().await.expect("the request is answered");
        let status = res.status().as_u16();
        let text = res.text().await.unwrap_or_default();
        let observed = match route.rule {
            Rule::List if status == 200 => {
                let list: Vec<Value> = serde_json::from_str(&text).expect("the list is a JSON array");
                let listed = list.iter().any(|e| e["url"] == f.entity.as_str());
                format!("{status} {}", if listed { "listed" } else { "unlisted" })
            }
            _ => status.to_string(),
        };
        let changed = self.world(&f).await != before;
        (observed, text.chars().take(160).collect(), changed)
    }

    /// Every route × every actor; panics listing each cell that disagrees with the rules.
    async fn check(&self, face: &str, routes: &[Route]) {
        let cells: Vec<(usize, &Route, &Actor)> = routes
            .iter()
            .flat_map(|r| ACTORS.iter().map(move |a| (r, a)))
            .enumerate()
            .map(|(i, (r, a))| (i, r, a))
            .collect();
        let total = cells.len();
        let results: Vec<_> = futures::stream::iter(cells)
            .map(|(i, route, actor)| async move {
                let (got, body, changed) = self.observe(i, route, actor).await;
                let want = expected(self.mode, route, actor);
                // A refusal changes nothing.
                let refused = want.starts_with('4');
                let got = if refused && changed { format!("{got} +changed") } else { got };
                (route, actor, want, got, body)
            })
            .buffered(4)
            .collect()
            .await;
        let failures: Vec<String> = results
            .iter()
            .filter(|(_, _, want, got, _)| want != got)
            .map(|(route, actor, want, got, body)| {
                format!(
                    "  {:<7} {:<40} as {:<32} expected {:<12} got {:<20} {}",
                    route.method, route.path, actor.name, want, got, body
                )
            })
            .collect();
        assert!(
            failures.is_empty(),
            "{face}: {} of {total} cells disagree with the rules:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entity_routes_answer_every_actor_by_the_rules() {
    Matrix::start(Mode::Token).await.check("entity routes", ENTITY_ROUTES).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attachment_routes_answer_every_actor_by_the_rules() {
    Matrix::start(Mode::Token).await.check("attachment routes", ATTACHMENT_ROUTES).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_stream_routes_on_entity_streams_answer_every_actor_by_the_rules() {
    Matrix::start(Mode::Token).await.check("entity stream routes", ENTITY_STREAM_ROUTES).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_stream_routes_answer_every_actor_by_the_rules() {
    Matrix::start(Mode::Token).await.check("plain stream routes", PLAIN_STREAM_ROUTES).await;
}

// Dev mode: the principal header is trusted; a request without one is
// user:anonymous, a malformed one 400, a built-in system principal 403.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_mode_entity_routes_answer_every_actor_by_the_rules() {
    Matrix::start(Mode::Dev).await.check("dev mode entity routes", ENTITY_ROUTES).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_mode_attachment_routes_answer_every_actor_by_the_rules() {
    Matrix::start(Mode::Dev).await.check("dev mode attachment routes", ATTACHMENT_ROUTES).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_mode_raw_stream_routes_on_entity_streams_answer_every_actor_by_the_rules() {
    Matrix::start(Mode::Dev).await.check("dev mode entity stream routes", ENTITY_STREAM_ROUTES).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_mode_plain_stream_routes_answer_every_actor_by_the_rules() {
    Matrix::start(Mode::Dev).await.check("dev mode plain stream routes", PLAIN_STREAM_ROUTES).await;
}

/// The rules table itself: a guard against a table that can no longer fail.
#[test]
fn the_rules_give_every_status_class_somewhere() {
    for (mode, refusals) in [(Mode::Token, &["401"][..]), (Mode::Dev, &["400", "403"][..])] {
        let all: Vec<String> = [ENTITY_ROUTES, ATTACHMENT_ROUTES, ENTITY_STREAM_ROUTES, PLAIN_STREAM_ROUTES]
            .iter()
            .flat_map(|routes| routes.iter())
            .flat_map(|r| ACTORS.iter().map(move |a| expected(mode, r, a)))
            .collect();
        let common = ["403", "404", "409", "200", "201", "204", "200 listed", "200 unlisted"];
        for status in refusals.iter().chain(common.iter()) {
            assert!(all.iter().any(|s| s == status), "{mode:?}: no cell expects {status}");
        }
    }
    // Dev mode: the anonymous principal is a stranger, not a refusal.
    let anonymous = ACTORS.iter().find(|a| a.credentials == Credentials::Nothing).expect("an anonymous actor");
    assert_eq!(expected(Mode::Dev, &ENTITY_ROUTES[0], anonymous), "404");
    assert_eq!(expected(Mode::Token, &ENTITY_ROUTES[0], anonymous), "401");
}

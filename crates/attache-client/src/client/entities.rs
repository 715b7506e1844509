//! Entities: spawn (under a parent), fork, read, stop, send to the inbox, list; grants.

use std::collections::BTreeMap;

use attache_core::{EntityUrl, PrincipalKey};
use reqwest::{Method, Response};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::{Map, Value};

use crate::error::Result;
use crate::transport::{entity_route, header, RuntimeServerClient};

/// An entity as the server describes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entity {
    pub url: String,
    #[serde(rename = "type")]
    pub entity_type: String,
    pub status: String,
    #[serde(default)]
    pub streams: EntityStreams,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spawn_args: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
    /// The entity it was spawned (or forked) under, `/type/id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    #[serde(default)]
    pub created_at: i64,
    #[serde(default)]
    pub updated_at: i64,
    /// The spawn's transaction id (on the spawn answer only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub txid: Option<Value>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EntityStreams {
    #[serde(default)]
    pub main: String,
}

/// The body of a spawn.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SpawnOptions {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub args: Option<Value>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
    #[serde(rename = "initialMessage", skip_serializing_if = "Option::is_none")]
    pub initial_message: Option<Value>,
    #[serde(rename = "initialMessageType", skip_serializing_if = "Option::is_none")]
    pub initial_message_type: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub grants: Vec<NewGrant>,
    /// Spawn as a child of this entity (the caller needs `spawn` on it): its
    /// grants propagated to descendants apply to the child, and those marked
    /// `copy_to_children` are copied onto it.
    #[serde(serialize_with = "entity_url_text", skip_serializing_if = "Option::is_none")]
    pub parent: Option<EntityUrl>,
}

/// The body of a fork (Electric's): the fork's id, where on the source's
/// main stream it diverges, its parent and extra tags.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ForkOptions {
    /// The fork's instance id (same type as the source); the server names it
    /// `{id}-fork-{8 hex}` without one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    /// Where the fork diverges; the source's tail without one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fork_pointer: Option<ForkPointer>,
    /// Make the fork a child of this entity (the caller needs `spawn` on it).
    #[serde(serialize_with = "entity_url_text", skip_serializing_if = "Option::is_none")]
    pub parent: Option<EntityUrl>,
    /// Tags added to (or replacing) the source's.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
}

/// A position on the source's main stream: an offset the server returned
/// (opaque, as every offset; `None`: the start), then `sub_offset` messages
/// further within the append there. An offset inside a message is refused (400).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ForkPointer {
    pub offset: Option<String>,
    pub sub_offset: u64,
}

impl ForkPointer {
    /// The history up to `offset` (e.g. the `next_offset` of a read or append).
    pub fn at(offset: impl Into<String>) -> ForkPointer {
        ForkPointer { offset: Some(offset.into()), sub_offset: 0 }
    }
}

/// What a fork answers: the new entity (`root`), every entity it made (the
/// root alone: attache forks an entity without its children) and the txid.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Forked {
    pub root: Entity,
    #[serde(default)]
    pub entities: Vec<Entity>,
    #[serde(default)]
    pub txid: String,
}

fn entity_url_text<S: Serializer>(url: &Option<EntityUrl>, s: S) -> std::result::Result<S::Ok, S::Error> {
    match url {
        Some(url) => s.collect_str(url),
        None => s.serialize_none(),
    }
}

/// A grant to add: `subject_kind` is `principal` or `principal_kind`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NewGrant {
    pub subject_kind: String,
    pub subject_value: String,
    pub permission: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
}

impl NewGrant {
    /// A grant of `permission` to one principal (`user:sam`).
    pub fn principal(principal: &PrincipalKey, permission: &str) -> NewGrant {
        NewGrant {
            subject_kind: "principal".into(),
            subject_value: principal.to_string(),
            permission: permission.into(),
            expires_at: None,
        }
    }
    /// A grant of `permission` to every principal of a kind (`agent`).
    pub fn kind(kind: &str, permission: &str) -> NewGrant {
        NewGrant {
            subject_kind: "principal_kind".into(),
            subject_value: kind.into(),
            permission: permission.into(),
            expires_at: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Grant {
    pub id: u64,
    pub entity_url: String,
    pub permission: String,
    pub subject_kind: String,
    pub subject_value: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
}

/// An inbox message to send.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SendMessage {
    pub payload: Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub message_type: Option<String>,
}

impl SendMessage {
    pub fn new(payload: Value) -> SendMessage {
        SendMessage { payload, key: None, message_type: None }
    }
    /// A text message: payload `{"text": ...}`.
    pub fn text(text: &str) -> SendMessage {
        SendMessage::new(serde_json::json!({ "text": text }))
    }
    pub fn key(mut self, key: impl Into<String>) -> SendMessage {
        self.key = Some(key.into());
        self
    }
}

/// What a send answers: the transaction id of the inbox row and its key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendReceipt {
    pub txid: String,
    pub key: String,
}

impl RuntimeServerClient {
    async fn entity_call(&self, method: Method, route: String, body: Option<&impl Serialize>) -> Result<Response> {
        let mut rb = self.request(method.clone(), &route);
        if let Some(body) = body {
            rb = rb.json(body);
        }
        self.send(rb, &method, &route).await
    }

    /// `PUT /_electric/entities/{type}/{id}`: spawns an entity (an existing one of yours is returned as is).
    pub async fn spawn_entity(&self, entity: &EntityUrl, options: &SpawnOptions) -> Result<Entity> {
        let res = self.entity_call(Method::PUT, entity_route(entity, ""), Some(options)).await?;
        self.json(res, "spawn answer").await
    }

    /// `POST /_electric/entities/{type}/{id}/fork`: forks `entity` (needs
    /// `fork` on it) into a new entity of the same type, owned by the caller:
    /// its history up to the pointer, and the attachments complete there.
    pub async fn fork_entity(&self, entity: &EntityUrl, options: &ForkOptions) -> Result<Forked> {
        let res = self.entity_call(Method::POST, entity_route(entity, "/fork"), Some(options)).await?;
        self.json(res, "fork answer").await
    }

    pub async fn get_entity(&self, entity: &EntityUrl) -> Result<Entity> {
        let res = self.entity_call(Method::GET, entity_route(entity, ""), None::<&()>).await?;
        self.json(res, "entity").await
    }

    /// The entities the caller may read, newest first, optionally of one type (every page).
    pub async fn list_entities(&self, entity_type: Option<&str>) -> Result<Vec<Entity>> {
        let mut out = Vec::new();
        let mut offset = 0usize;
        loop {
            let mut rb = self.request(Method::GET, "/_electric/entities").query(&[("limit", "1000")]);
            rb = rb.query(&[("offset", offset.to_string())]);
            if let Some(t) = entity_type {
                rb = rb.query(&[("type", t)]);
            }
            let res = self.send(rb, &Method::GET, "/_electric/entities").await?;
            let next = header(&res, "x-next-offset").and_then(|n| n.parse::<usize>().ok());
            let page: Vec<Entity> = self.json(res, "entity list").await?;
            out.extend(page);
            match next {
                Some(n) if n > offset => offset = n,
                _ => return Ok(out),
            }
        }
    }

    /// `DELETE /_electric/entities/{type}/{id}`: stops the entity; `purge` also deletes its streams.
    pub async fn stop_entity(&self, entity: &EntityUrl, purge: bool) -> Result<Value> {
        let route = entity_route(entity, if purge { "?purge=true" } else { "" });
        let res = self.entity_call(Method::DELETE, route, None::<&()>).await?;
        self.json(res, "stop answer").await
    }

    /// `POST .../send`: appends an inbox message.
    pub async fn send_message(&self, entity: &EntityUrl, message: &SendMessage) -> Result<SendReceipt> {
        let res = self.entity_call(Method::POST, entity_route(entity, "/send"), Some(message)).await?;
        self.json(res, "send answer").await
    }

    pub async fn list_grants(&self, entity: &EntityUrl) -> Result<Vec<Grant>> {
        #[derive(Deserialize)]
        struct Grants {
            grants: Vec<Grant>,
        }
        let res = self.entity_call(Method::GET, entity_route(entity, "/grants"), None::<&()>).await?;
        Ok(self.json::<Grants>(res, "grant list").await?.grants)
    }

    pub async fn add_grant(&self, entity: &EntityUrl, grant: &NewGrant) -> Result<Grant> {
        let res = self.entity_call(Method::POST, entity_route(entity, "/grants"), Some(grant)).await?;
        self.json(res, "grant").await
    }

    pub async fn remove_grant(&self, entity: &EntityUrl, grant_id: u64) -> Result<()> {
        self.entity_call(Method::DELETE, entity_route(entity, &format!("/grants/{grant_id}")), None::<&()>).await?;
        Ok(())
    }
}

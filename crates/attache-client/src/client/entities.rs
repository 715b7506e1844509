//! Entities: spawn, read, stop, signal, send to the inbox, list; grants and tags.

use std::collections::BTreeMap;

use attache_core::{EntityUrl, PrincipalKey};
use reqwest::{Method, Response};
use serde::{Deserialize, Serialize};
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

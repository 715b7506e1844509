//! `entity ...` (spawn, fork, get, ls, stop, grant, grants, revoke) and
//! `send`, a message to an entity's inbox with files attached.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;
use attache_client::client::{guess_mime_type, NewGrant};
use attache_client::{AttachmentInput, ForkOptions, ForkPointer, PrincipalKey, SendMessage, SpawnOptions};
use serde_json::json;

use super::{describe, entity_arg, json_arg, Conn};
use crate::output::{Output, UsageError};

#[derive(clap::Args, Debug)]
pub struct SendArgs {
    #[command(flatten)]
    pub(super) conn: Conn,
    entity: String,
    /// The message text (sent as {"text": TEXT})
    text: String,
    /// A file to attach as an input of the message; repeat for more
    #[arg(long = "attach", value_name = "FILE")]
    attach: Vec<PathBuf>,
    /// The message key [default: client-<ms>-<random>]
    #[arg(long)]
    key: Option<String>,
    /// The message type
    #[arg(long = "type")]
    message_type: Option<String>,
}

#[derive(clap::Args, Debug)]
pub struct EntityArgs {
    #[command(flatten)]
    pub(super) conn: Conn,
    #[command(subcommand)]
    command: EntityCommand,
}

#[derive(clap::Subcommand, Debug)]
enum EntityCommand {
    /// Spawn an entity
    Spawn {
        entity: String,
        /// Spawn arguments, a JSON value
        #[arg(long, value_name = "JSON")]
        args: Option<String>,
        /// A tag, K=V; repeat for more
        #[arg(long = "tag", value_name = "K=V")]
        tags: Vec<String>,
        /// A first message to send, as text
        #[arg(long)]
        message: Option<String>,
        /// A grant, SUBJECT=PERMISSION (user:ann=read, agent=write); repeat for more
        #[arg(long = "grant", value_name = "SUBJECT=PERMISSION")]
        grants: Vec<String>,
        /// Spawn it as a child of this entity (you need spawn on it)
        #[arg(long, value_name = "ENTITY")]
        parent: Option<String>,
    },
    /// Fork an entity: a new one of the same type with its history up to a
    /// point (its tail by default) and the attachments complete there
    Fork {
        /// The entity to fork (you need fork on it)
        entity: String,
        /// The fork's instance id [default: ID-fork-<8 hex>]
        #[arg(long)]
        id: Option<String>,
        /// Fork at this offset of the source's main stream (one the server returned), not at its tail
        #[arg(long, value_name = "OFFSET")]
        at: Option<String>,
        /// Then this many messages further, within the append at --at
        #[arg(long, value_name = "N", requires = "at")]
        sub_offset: Option<u64>,
        /// Make the fork a child of this entity (you need spawn on it)
        #[arg(long, value_name = "ENTITY")]
        parent: Option<String>,
        /// A tag added to the source's, K=V; repeat for more
        #[arg(long = "tag", value_name = "K=V")]
        tags: Vec<String>,
    },
    /// Show an entity
    Get { entity: String },
    /// List the entities you can read
    Ls {
        /// Only entities of this type
        #[arg(long = "type")]
        entity_type: Option<String>,
    },
    /// Stop an entity (no more writes); --purge deletes it and its streams
    Stop {
        entity: String,
        #[arg(long)]
        purge: bool,
    },
    /// Grant a permission: SUBJECT is a principal (user:ann) or a kind (agent)
    Grant {
        entity: String,
        subject: String,
        /// read, write, delete, signal, fork, schedule, spawn or manage
        permission: String,
        /// RFC 3339 expiry, e.g. 2030-01-01T00:00:00Z
        #[arg(long)]
        expires_at: Option<String>,
    },
    /// List an entity's grants
    Grants { entity: String },
    /// Remove a grant by id
    Revoke { entity: String, grant_id: u64 },
}

pub(super) async fn send(a: SendArgs, out: Output) -> anyhow::Result<()> {
    let client = a.conn.client()?;
    let entity = entity_arg(&a.entity)?;
    let mut files = Vec::new();
    let mut total = 0u64;
    let mut opened = Vec::new();
    for path in &a.attach {
        let file = tokio::fs::File::open(path).await.with_context(|| format!("cannot open {}", path.display()))?;
        let len = file.metadata().await.with_context(|| format!("cannot read {}", path.display()))?.len();
        total += len;
        opened.push((path, file, len));
    }
    let bar = out.progress(Some(total), "uploading");
    if a.attach.is_empty() {
        bar.finish_and_clear();
    }
    for (path, file, len) in opened {
        let mut input = AttachmentInput::reader(bar.wrap_async_read(file), Some(len)).mime_type(guess_mime_type(path));
        if let Some(name) = path.file_name().and_then(|n| n.to_str()) {
            input = input.filename(name);
        }
        files.push(input);
    }
    let mut message = SendMessage::text(&a.text);
    message.key = a.key;
    message.message_type = a.message_type;
    let sent = client.send_with_attachments(&entity, message, files).await?;
    bar.finish_and_clear();
    if out.json {
        out.json_value(&sent)?;
    } else {
        out.line(&sent.receipt.key);
        let names: Vec<String> = sent.attachments.iter().map(describe).collect();
        let with = if names.is_empty() { String::new() } else { format!(" with {}", names.join(", ")) };
        out.note(&format!("sent {} to {entity}{with}", sent.receipt.key));
    }
    Ok(())
}

/// `--tag K=V`, repeated.
fn tag_args(tags: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for tag in tags {
        let (k, v) = tag.split_once('=').ok_or_else(|| UsageError(format!("--tag {tag:?} must be K=V")))?;
        out.insert(k.to_owned(), v.to_owned());
    }
    Ok(out)
}

fn grant_arg(subject: &str, permission: &str, expires_at: Option<String>) -> anyhow::Result<NewGrant> {
    if attache_core::Permission::parse(permission).is_err() {
        return Err(UsageError(format!(
            "permission {permission:?} must be read, write, delete, signal, fork, schedule, spawn or manage"
        ))
        .into());
    }
    let mut grant = match subject.strip_prefix("kind:") {
        Some(kind) => NewGrant::kind(kind, permission),
        None if !subject.contains(':') => NewGrant::kind(subject, permission),
        None => {
            let key = PrincipalKey::parse(subject).map_err(|e| {
                UsageError(format!("{subject:?} is neither a principal like user:ann nor a kind like agent ({e})"))
            })?;
            NewGrant::principal(&key, permission)
        }
    };
    grant.expires_at = expires_at;
    Ok(grant)
}

pub(super) async fn entity(a: EntityArgs, out: Output) -> anyhow::Result<()> {
    let client = a.conn.client()?;
    match a.command {
        EntityCommand::Spawn { entity, args, tags, message, grants, parent } => {
            let url = entity_arg(&entity)?;
            let mut options = SpawnOptions {
                args: args.as_deref().map(|r| json_arg("--args", r)).transpose()?,
                parent: parent.as_deref().map(entity_arg).transpose()?,
                ..SpawnOptions::default()
            };
            options.tags = tag_args(&tags)?;
            options.initial_message = message.map(|m| json!({ "text": m }));
            for g in grants {
                let (subject, permission) = g.rsplit_once('=').ok_or_else(|| {
                    UsageError(format!("--grant {g:?} must be SUBJECT=PERMISSION, e.g. user:ann=read"))
                })?;
                options.grants.push(grant_arg(subject, permission, None)?);
            }
            let spawned = client.spawn_entity(&url, &options).await?;
            if out.json {
                out.json_value(&spawned)?;
            } else {
                out.line(&spawned.url);
                out.note(&format!("spawned {} (main stream {})", spawned.url, spawned.streams.main));
            }
        }
        EntityCommand::Fork { entity, id, at, sub_offset, parent, tags } => {
            let source = entity_arg(&entity)?;
            let options = ForkOptions {
                instance_id: id,
                fork_pointer: at
                    .map(|offset| ForkPointer { offset: Some(offset), sub_offset: sub_offset.unwrap_or(0) }),
                parent: parent.as_deref().map(entity_arg).transpose()?,
                tags: tag_args(&tags)?,
            };
            let forked = client.fork_entity(&source, &options).await?;
            if out.json {
                out.json_value(&forked)?;
            } else {
                out.line(&forked.root.url);
                out.note(&format!(
                    "forked {source} into {} (main stream {})",
                    forked.root.url, forked.root.streams.main
                ));
            }
        }
        EntityCommand::Get { entity } => {
            let e = client.get_entity(&entity_arg(&entity)?).await?;
            if out.json {
                out.json_value(&e)?;
            } else {
                out.line(&serde_json::to_string_pretty(&e)?);
            }
        }
        EntityCommand::Ls { entity_type } => {
            let all = client.list_entities(entity_type.as_deref()).await?;
            if out.json {
                out.json_value(&all)?;
            } else {
                for e in all {
                    out.line(&format!("{}\t{}\t{}", e.url, e.status, e.created_by.unwrap_or_default()));
                }
            }
        }
        EntityCommand::Stop { entity, purge } => {
            let url = entity_arg(&entity)?;
            let answer = client.stop_entity(&url, purge).await?;
            if out.json {
                out.json_value(&answer)?;
            } else {
                out.note(&format!("{} {url}", if purge { "purged" } else { "stopped" }));
            }
        }
        EntityCommand::Grant { entity, subject, permission, expires_at } => {
            let grant = grant_arg(&subject, &permission, expires_at)?;
            let stored = client.add_grant(&entity_arg(&entity)?, &grant).await?;
            if out.json {
                out.json_value(&stored)?;
            } else {
                out.line(&stored.id.to_string());
                out.note(&format!(
                    "granted {} on {} to {} {}",
                    stored.permission, stored.entity_url, stored.subject_kind, stored.subject_value
                ));
            }
        }
        EntityCommand::Grants { entity } => {
            let grants = client.list_grants(&entity_arg(&entity)?).await?;
            if out.json {
                out.json_value(&grants)?;
            } else {
                for g in grants {
                    let expiry = g.expires_at.unwrap_or_else(|| "no expiry".into());
                    out.line(&format!("{}\t{}\t{} {}\t{expiry}", g.id, g.permission, g.subject_kind, g.subject_value));
                }
            }
        }
        EntityCommand::Revoke { entity, grant_id } => {
            client.remove_grant(&entity_arg(&entity)?, grant_id).await?;
            if out.json {
                out.json_value(&json!({ "revoked": grant_id }))?;
            } else {
                out.note(&format!("revoked grant {grant_id}"));
            }
        }
    }
    Ok(())
}

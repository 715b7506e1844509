//! The client commands (`put`, `get`, `ls`, `rm`, `tail`, `send`, `rpc`,
//! `entity ...`): thin shells over the SDK that turn flags into calls and
//! answers into text, JSON and exit codes.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Context;
use attache_client::client::{guess_mime_type, ByteRange, NewGrant};
use attache_client::streams::{LiveMode, TailOptions};
use attache_client::{
    AttachmentInput, EntityUrl, ManifestEntry, PrincipalKey, Role, RuntimeServerClient, SendMessage, SpawnOptions,
    Subject, DEFAULT_URL,
};
use serde_json::{json, Map, Value};
use tokio::io::AsyncWriteExt;

use crate::output::{exit, exit_code, explain, stdout_bytes, Output, UsageError};

/// Where the server is and who is asking.
#[derive(clap::Args, Debug, Clone)]
pub struct Conn {
    /// The attache server's URL
    #[arg(long, env = "ATTACHE_URL", default_value = DEFAULT_URL, global = true)]
    server: String,
    /// Act as this principal, e.g. user:sam (dev-mode servers)
    #[arg(long, env = "ATTACHE_PRINCIPAL", global = true)]
    principal: Option<String>,
    /// A bearer token from `attache token create` (token-mode servers)
    #[arg(long, env = "ATTACHE_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// Print JSON for scripts instead of text
    #[arg(long, global = true)]
    json: bool,
}

impl Conn {
    fn client(&self) -> anyhow::Result<RuntimeServerClient> {
        let mut client = RuntimeServerClient::new(&self.server)?;
        if let Some(p) = &self.principal {
            let key = PrincipalKey::parse(p)
                .map_err(|e| UsageError(format!("--principal {p:?} is not a principal like user:sam ({e})")))?;
            client = client.with_principal(key);
        }
        if let Some(t) = &self.token {
            client = client.with_token(t.trim());
        }
        Ok(client)
    }
}

#[derive(clap::Subcommand, Debug)]
pub enum ClientCommand {
    /// Upload a file (or - for stdin) as an attachment of an entity
    Put(PutArgs),
    /// Download an attachment (or a byte range of it) to a file or stdout
    Get(GetArgs),
    /// List an entity's attachments
    Ls(LsArgs),
    /// Delete an attachment
    Rm(RmArgs),
    /// Follow a stream, or an entity's main stream, live; reconnects and resumes by itself
    Tail(TailArgs),
    /// Send a message to an entity, with files attached (rolled back if the send fails)
    Send(SendArgs),
    /// Call a JSON-RPC method, e.g. `attache rpc task.create '{"text":"review"}'`
    Rpc(RpcArgs),
    /// Spawn, inspect, stop and share entities
    Entity(EntityArgs),
}

#[derive(clap::Args, Debug)]
pub struct PutArgs {
    #[command(flatten)]
    conn: Conn,
    /// The entity, e.g. /chat/abc
    entity: String,
    /// The file to upload; - reads stdin
    file: PathBuf,
    /// The attachment id (default: chosen by the server)
    #[arg(long)]
    id: Option<String>,
    /// What the attachment is about, TYPE:KEY, e.g. inbox:msg-1 (TYPE: inbox, run, text,
    /// tool_call, context) [default: context:ID, or context:FILE-NAME without --id, context:stdin for -]
    #[arg(long, value_name = "TYPE:KEY")]
    subject: Option<String>,
    /// input or output [default: input]
    #[arg(long, value_parser = ["input", "output"])]
    role: Option<String>,
    /// A JSON object of metadata, e.g. '{"caption":"a cat"}'
    #[arg(long, value_name = "JSON")]
    meta: Option<String>,
    /// The media type [default: guessed from the file name]
    #[arg(long)]
    mime_type: Option<String>,
    /// The file name recorded [default: the file's own name]
    #[arg(long)]
    filename: Option<String>,
    /// A key-value name the attachment is also known by
    #[arg(long)]
    key: Option<String>,
    /// Upload in chunks over the attachment's stream; run again with the same --id to resume
    #[arg(long, requires = "id")]
    resumable: bool,
}

#[derive(clap::Args, Debug)]
pub struct GetArgs {
    #[command(flatten)]
    conn: Conn,
    entity: String,
    id: String,
    /// Write to this file instead of stdout
    #[arg(short = 'o', long)]
    output: Option<PathBuf>,
    /// Only these bytes, inclusive: START-END or START-
    #[arg(long, value_name = "A-B")]
    range: Option<String>,
}

#[derive(clap::Args, Debug)]
pub struct LsArgs {
    #[command(flatten)]
    conn: Conn,
    entity: String,
}

#[derive(clap::Args, Debug)]
pub struct RmArgs {
    #[command(flatten)]
    conn: Conn,
    entity: String,
    id: String,
}

#[derive(clap::Args, Debug)]
pub struct TailArgs {
    #[command(flatten)]
    conn: Conn,
    /// A stream path (/logs/a) or an entity (/chat/abc: its main stream)
    target: String,
    /// Where to start: -1 (the beginning), now (new data only), or an offset printed before
    #[arg(long, default_value = "-1", allow_hyphen_values = true)]
    offset: String,
    /// Wait for data by Server-Sent Events instead of long-poll
    #[arg(long)]
    sse: bool,
    /// Stop once caught up instead of following
    #[arg(long)]
    once: bool,
}

#[derive(clap::Args, Debug)]
pub struct SendArgs {
    #[command(flatten)]
    conn: Conn,
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
pub struct RpcArgs {
    #[command(flatten)]
    conn: Conn,
    /// The method, e.g. task.create
    method: String,
    /// The params as JSON [default: {}]; - reads stdin
    params: Option<String>,
}

#[derive(clap::Args, Debug)]
pub struct EntityArgs {
    #[command(flatten)]
    conn: Conn,
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

/// Runs a client command; returns the process exit code.
pub fn main(command: ClientCommand) -> i32 {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("ATTACHE_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let conn = match &command {
        ClientCommand::Put(a) => a.conn.clone(),
        ClientCommand::Get(a) => a.conn.clone(),
        ClientCommand::Ls(a) => a.conn.clone(),
        ClientCommand::Rm(a) => a.conn.clone(),
        ClientCommand::Tail(a) => a.conn.clone(),
        ClientCommand::Send(a) => a.conn.clone(),
        ClientCommand::Rpc(a) => a.conn.clone(),
        ClientCommand::Entity(a) => a.conn.clone(),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}.");
            return exit::FAILURE;
        }
    };
    let out = Output { json: conn.json };
    match runtime.block_on(run(command, out)) {
        Ok(()) => exit::OK,
        Err(err) if broken_pipe(&err) => exit::OK,
        Err(err) => {
            eprintln!("{}", explain(&err, &conn.server));
            exit_code(&err)
        }
    }
}

/// The reader of stdout went away (`attache get ... | head`): not a failure.
fn broken_pipe(err: &anyhow::Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(err.as_ref());
    while let Some(e) = cause {
        if e.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe) {
            return true;
        }
        cause = e.source();
    }
    false
}

async fn run(command: ClientCommand, out: Output) -> anyhow::Result<()> {
    match command {
        ClientCommand::Put(a) => put(a, out).await,
        ClientCommand::Get(a) => get(a, out).await,
        ClientCommand::Ls(a) => ls(a, out).await,
        ClientCommand::Rm(a) => rm(a, out).await,
        ClientCommand::Tail(a) => tail(a, out).await,
        ClientCommand::Send(a) => send(a, out).await,
        ClientCommand::Rpc(a) => rpc(a, out).await,
        ClientCommand::Entity(a) => entity(a, out).await,
    }
}

/// `/chat/abc` or `chat/abc`.
fn entity_arg(raw: &str) -> anyhow::Result<EntityUrl> {
    let url = if raw.starts_with('/') { raw.to_owned() } else { format!("/{raw}") };
    EntityUrl::parse(&url)
        .map_err(|e| UsageError(format!("{raw:?} is not an entity: write it as /TYPE/ID, e.g. /chat/abc ({e})")).into())
}

fn json_arg(flag: &str, raw: &str) -> anyhow::Result<Value> {
    serde_json::from_str(raw).map_err(|e| UsageError(format!("{flag} is not valid JSON: {e}")).into())
}

fn json_object(flag: &str, raw: &str) -> anyhow::Result<Map<String, Value>> {
    match json_arg(flag, raw)? {
        Value::Object(map) => Ok(map),
        _ => Err(UsageError(format!("{flag} must be a JSON object, like '{{\"k\":\"v\"}}'")).into()),
    }
}

/// The subject `put` gives an upload that names none (the server requires one,
/// as Electric does): `context`, keyed by the attachment's id, else the
/// file's name (`stdin` for `-`), cut to the 256 bytes a key may have.
fn default_subject(id: Option<&str>, file: &std::path::Path) -> anyhow::Result<Subject> {
    let key = match id {
        Some(id) => id.to_owned(),
        None if file.as_os_str() == "-" => "stdin".to_owned(),
        None => file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "file".to_owned()),
    };
    let mut cut = String::new();
    for c in key.chars().filter(|c| !c.is_control()) {
        if cut.len() + c.len_utf8() > 256 {
            break;
        }
        cut.push(c);
    }
    let key = cut;
    let key = if key.is_empty() { "file".to_owned() } else { key };
    Subject::new("context", &key).map_err(|e| UsageError(format!("no default subject for this file: {e}")).into())
}

fn subject_arg(raw: &str) -> anyhow::Result<Subject> {
    let (kind, key) = raw
        .split_once(':')
        .ok_or_else(|| UsageError(format!("--subject {raw:?} must be TYPE:KEY, e.g. inbox:msg-1")))?;
    Subject::new(kind, key).map_err(|e| UsageError(format!("--subject {raw:?}: {e}")).into())
}

fn size(n: Option<u64>) -> String {
    match n {
        None => "-".into(),
        Some(n) if n >= 1 << 20 => format!("{:.1}MiB", n as f64 / (1u64 << 20) as f64),
        Some(n) if n >= 1 << 10 => format!("{:.1}KiB", n as f64 / 1024.0),
        Some(n) => format!("{n}B"),
    }
}

fn describe(e: &ManifestEntry) -> String {
    format!(
        "{} ({}, {}, {})",
        e.id,
        size(e.byte_length),
        e.mime_type,
        serde_json::to_value(e.status).unwrap_or_default().as_str().unwrap_or("?")
    )
}

async fn put(a: PutArgs, out: Output) -> anyhow::Result<()> {
    let client = a.conn.client()?;
    let entity = entity_arg(&a.entity)?;
    let stdin = a.file.as_os_str() == "-";
    let mut input = if stdin {
        AttachmentInput::reader(tokio::io::stdin(), None)
    } else if a.resumable {
        AttachmentInput::file(&a.file)
    } else {
        let file = tokio::fs::File::open(&a.file).await.with_context(|| format!("cannot open {}", a.file.display()))?;
        let len = file.metadata().await.with_context(|| format!("cannot read {}", a.file.display()))?.len();
        let bar = out.progress(Some(len), "uploading");
        let name = a.file.file_name().and_then(|n| n.to_str()).map(str::to_owned);
        let mut input =
            AttachmentInput::reader(bar.wrap_async_read(file), Some(len)).mime_type(guess_mime_type(&a.file));
        if let Some(name) = name {
            input = input.filename(name);
        }
        input
    };
    if let Some(id) = a.id.clone() {
        input = input.id(id);
    }
    if let Some(m) = a.mime_type {
        input = input.mime_type(m);
    }
    if let Some(f) = a.filename {
        input = input.filename(f);
    }
    let subject = match &a.subject {
        Some(s) => subject_arg(s)?,
        None => {
            let picked = default_subject(a.id.as_deref(), &a.file)?;
            out.note(&format!("no --subject given: the attachment is about {}:{}", picked.kind, picked.key));
            picked
        }
    };
    input = input.subject(subject);
    if let Some(r) = &a.role {
        input = input.role(if r == "output" { Role::Output } else { Role::Input });
    }
    if let Some(m) = &a.meta {
        input = input.meta(json_object("--meta", m)?);
    }
    if let Some(k) = a.key {
        input = input.key(k);
    }
    let entry = if a.resumable {
        client.upload_attachment_resumable(&entity, input, attache_client::client::RESUMABLE_CHUNK_BYTES).await?
    } else {
        client.create_attachment(&entity, input).await?
    };
    if out.json {
        out.json_value(&entry)?;
    } else {
        out.line(&entry.id);
        out.note(&format!("uploaded {} to {entity}", describe(&entry)));
    }
    Ok(())
}

async fn get(a: GetArgs, out: Output) -> anyhow::Result<()> {
    let client = a.conn.client()?;
    let entity = entity_arg(&a.entity)?;
    let range =
        a.range.as_deref().map(ByteRange::parse).transpose().map_err(|e| UsageError(format!("--range: {e}")))?;
    let download = client.open_attachment(&entity, &a.id, range).await?;
    let bar = out.progress(download.content_length, "downloading");
    let written = match &a.output {
        Some(path) => {
            let file =
                tokio::fs::File::create(path).await.with_context(|| format!("cannot create {}", path.display()))?;
            let mut w = bar.wrap_async_write(file);
            download.write_to(&mut w).await?
        }
        None => {
            let mut w = bar.wrap_async_write(tokio::io::stdout());
            let n = download.write_to(&mut w).await?;
            w.flush().await.ok();
            n
        }
    };
    bar.finish_and_clear();
    if let Some(path) = &a.output {
        if out.json {
            out.json_value(&json!({ "id": a.id, "bytes": written, "path": path }))?;
        } else {
            out.note(&format!("wrote {} of {} to {}", size(Some(written)), a.id, path.display()));
        }
    }
    Ok(())
}

async fn ls(a: LsArgs, out: Output) -> anyhow::Result<()> {
    let client = a.conn.client()?;
    let entity = entity_arg(&a.entity)?;
    let entries = client.list_attachments(&entity).await?;
    if out.json {
        return out.json_value(&entries);
    }
    if entries.is_empty() {
        out.note(&format!("{entity} has no attachments"));
        return Ok(());
    }
    let rows: Vec<[String; 7]> = entries
        .iter()
        .map(|e| {
            [
                e.id.clone(),
                serde_json::to_value(e.status).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default(),
                if e.role == Role::Output { "output" } else { "input" }.to_owned(),
                e.subject.as_ref().map(|s| format!("{}:{}", s.kind, s.key)).unwrap_or_else(|| "-".into()),
                size(e.byte_length),
                e.mime_type.clone(),
                e.filename
                    .clone()
                    .or_else(|| e.ext.get("name").and_then(Value::as_str).map(str::to_owned))
                    .unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    let header = ["ID", "STATUS", "ROLE", "SUBJECT", "SIZE", "TYPE", "NAME"].map(String::from);
    let mut widths = header.clone().map(|h| h.len());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in std::iter::once(&header).chain(rows.iter()) {
        let cells: Vec<String> = row.iter().zip(widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.line(cells.join("  ").trim_end());
    }
    Ok(())
}

async fn rm(a: RmArgs, out: Output) -> anyhow::Result<()> {
    let client = a.conn.client()?;
    let entity = entity_arg(&a.entity)?;
    let txid = client.delete_attachment(&entity, &a.id).await?;
    if out.json {
        out.json_value(&json!({ "id": a.id, "txid": txid }))?;
    } else {
        out.note(&format!("deleted {} from {entity}", a.id));
    }
    Ok(())
}

/// A stream path, or an entity whose main stream is meant.
async fn tail_target(client: &RuntimeServerClient, raw: &str) -> anyhow::Result<String> {
    let path = if raw.starts_with('/') { raw.to_owned() } else { format!("/{raw}") };
    let Ok(entity) = EntityUrl::parse(&path) else { return Ok(path) };
    // Two segments name an entity, unless a plain stream lives there.
    match client.head_stream(&path).await {
        Ok(_) => Ok(path),
        Err(e) if e.is_not_found() => Ok(entity.main_stream()),
        Err(e) => Err(e.into()),
    }
}

async fn tail(a: TailArgs, out: Output) -> anyhow::Result<()> {
    let client = a.conn.client()?;
    let path = tail_target(&client, &a.target).await?;
    let live = if a.sse { LiveMode::Sse } else { LiveMode::LongPoll };
    let mut options = TailOptions::from_offset(a.offset.clone()).live(live);
    options.stop_when_up_to_date = a.once;
    let mut tail = client.tail(&path, options)?;
    let mut closed = false;
    while let Some(chunk) = tail.next().await {
        let chunk = chunk?;
        if chunk.json {
            for item in chunk.json_items()? {
                out.line(&serde_json::to_string(&item)?);
            }
        } else if !chunk.data.is_empty() {
            stdout_bytes(&chunk.data);
        }
        closed |= chunk.closed;
    }
    if closed {
        out.note(&format!("{path} is closed; its end is offset {}", tail.offset()));
    } else {
        out.note(&format!("caught up at offset {} (continue with --offset {})", tail.offset(), tail.offset()));
    }
    Ok(())
}

async fn send(a: SendArgs, out: Output) -> anyhow::Result<()> {
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

async fn rpc(a: RpcArgs, out: Output) -> anyhow::Result<()> {
    let client = a.conn.client()?;
    let params = match a.params.as_deref() {
        None => json!({}),
        Some("-") => {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut text).context("reading params from stdin")?;
            json_arg("the params on stdin", &text)?
        }
        Some(raw) => json_arg("the params", raw)?,
    };
    let result = client.rpc(&a.method, params).await?;
    if out.json || !std::io::stdout().is_terminal() {
        out.json_value(&result)
    } else {
        out.line(&serde_json::to_string_pretty(&result)?);
        Ok(())
    }
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

async fn entity(a: EntityArgs, out: Output) -> anyhow::Result<()> {
    let client = a.conn.client()?;
    match a.command {
        EntityCommand::Spawn { entity, args, tags, message, grants } => {
            let url = entity_arg(&entity)?;
            let mut options = SpawnOptions {
                args: args.as_deref().map(|r| json_arg("--args", r)).transpose()?,
                ..SpawnOptions::default()
            };
            for tag in tags {
                let (k, v) = tag.split_once('=').ok_or_else(|| UsageError(format!("--tag {tag:?} must be K=V")))?;
                options.tags.insert(k.to_owned(), v.to_owned());
            }
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

//! The client commands (`put`, `get`, `ls`, `rm`, `tail`, `send`, `rpc`,
//! `entity ...`): thin shells over the SDK that turn flags into calls and
//! answers into text, JSON and exit codes. One file per group of commands:
//! `attachments` (put, get, ls, rm), `entity` (entity ..., send), `tail`,
//! `rpc`; the flags every command shares and the parsers of shared
//! arguments are here.

mod attachments;
mod entity;
mod rpc;
mod tail;

use attache_client::{EntityUrl, ManifestEntry, PrincipalKey, RuntimeServerClient, DEFAULT_URL};
use serde_json::{Map, Value};

use crate::output::{exit, exit_code, explain, Output, UsageError};

pub use attachments::{GetArgs, LsArgs, PutArgs, RmArgs};
pub use entity::{EntityArgs, SendArgs};
pub use rpc::RpcArgs;
pub use tail::TailArgs;

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
        // An empty value (`ATTACHE_TOKEN=`) is no value, as for most tools.
        let principal = self.principal.as_deref().map(str::trim).filter(|p| !p.is_empty());
        let token = self.token.as_deref().map(str::trim).filter(|t| !t.is_empty());
        if principal.is_some() && token.is_some() {
            eprintln!(
                "note: a token and a principal were both given; a token-mode server acts as the token's principal \
                 and ignores --principal (ATTACHE_PRINCIPAL)"
            );
        }
        if let Some(p) = principal {
            let key = PrincipalKey::parse(p)
                .map_err(|e| UsageError(format!("--principal {p:?} is not a principal like user:sam ({e})")))?;
            client = client.with_principal(key);
        }
        if let Some(t) = token {
            client = client.with_token(t);
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
            let sentence = explain(&err, &conn.server);
            eprintln!("{sentence}");
            let code = exit_code(&err);
            if out.json {
                // With --json, stdout holds one document whatever happened.
                let _ = out.json_value(&crate::output::error_document(&err, &sentence, code));
            }
            code
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
        ClientCommand::Put(a) => attachments::put(a, out).await,
        ClientCommand::Get(a) => attachments::get(a, out).await,
        ClientCommand::Ls(a) => attachments::ls(a, out).await,
        ClientCommand::Rm(a) => attachments::rm(a, out).await,
        ClientCommand::Tail(a) => tail::tail(a, out).await,
        ClientCommand::Send(a) => entity::send(a, out).await,
        ClientCommand::Rpc(a) => rpc::rpc(a, out).await,
        ClientCommand::Entity(a) => entity::entity(a, out).await,
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

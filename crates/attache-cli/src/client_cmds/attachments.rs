//! `put`, `get`, `ls` and `rm`: an entity's attachments.

use std::path::PathBuf;

use anyhow::Context;
use attache_client::client::{guess_mime_type, ByteRange};
use attache_client::{AttachmentInput, Role, Subject};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

use super::{describe, entity_arg, json_object, size, Conn};
use crate::output::{Output, UsageError};

#[derive(clap::Args, Debug)]
pub struct PutArgs {
    #[command(flatten)]
    pub(super) conn: Conn,
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
    /// Upload in chunks over the attachment's stream; run again with the same --id and the same file
    /// to resume (another file, or the file changed, is refused: exit 5)
    #[arg(long, requires = "id")]
    resumable: bool,
}

#[derive(clap::Args, Debug)]
pub struct GetArgs {
    #[command(flatten)]
    pub(super) conn: Conn,
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
    pub(super) conn: Conn,
    entity: String,
}

#[derive(clap::Args, Debug)]
pub struct RmArgs {
    #[command(flatten)]
    pub(super) conn: Conn,
    entity: String,
    id: String,
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

pub(super) async fn put(a: PutArgs, out: Output) -> anyhow::Result<()> {
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
    let defaulted = a.subject.is_none();
    let subject = match &a.subject {
        Some(s) => subject_arg(s)?,
        None => default_subject(a.id.as_deref(), &a.file)?,
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
    if let Some(subject) = entry.subject.as_ref().filter(|_| defaulted) {
        // What the entry says (a resumed upload keeps the subject it began with).
        out.note(&format!("no --subject given: the attachment is about {}:{}", subject.kind, subject.key));
    }
    if out.json {
        out.json_value(&entry)?;
    } else {
        out.line(&entry.id);
        out.note(&format!("uploaded {} to {entity}", describe(&entry)));
    }
    Ok(())
}

pub(super) async fn get(a: GetArgs, out: Output) -> anyhow::Result<()> {
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

pub(super) async fn ls(a: LsArgs, out: Output) -> anyhow::Result<()> {
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

pub(super) async fn rm(a: RmArgs, out: Output) -> anyhow::Result<()> {
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

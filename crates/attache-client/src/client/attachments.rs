//! Attachments: streamed multipart uploads, downloads with byte ranges,
//! listing and deletion (resumable uploads are in `resumable`).

use std::path::{Path, PathBuf};

use attache_core::manifest::{ManifestEntry, Role, Subject};
use attache_core::EntityUrl;
use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};
use reqwest::{Method, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_util::io::ReaderStream;

use crate::error::{Error, Result};
use crate::transport::{attachment_route, entity_route, header, RuntimeServerClient};

/// Where an attachment's bytes come from.
pub enum AttachmentBody {
    Bytes(Bytes),
    /// Opened at upload time and streamed from disk.
    File(PathBuf),
    /// Streamed as read; `length` lets the server check the size up front.
    Reader {
        reader: Box<dyn AsyncRead + Send + Unpin + 'static>,
        length: Option<u64>,
    },
}

impl std::fmt::Debug for AttachmentBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AttachmentBody::Bytes(b) => write!(f, "Bytes({} bytes)", b.len()),
            AttachmentBody::File(p) => write!(f, "File({})", p.display()),
            AttachmentBody::Reader { length, .. } => write!(f, "Reader(length={length:?})"),
        }
    }
}

/// An attachment to create: its bytes and what the manifest says about them.
#[derive(Debug)]
pub struct AttachmentInput {
    pub body: AttachmentBody,
    pub id: Option<String>,
    pub mime_type: Option<String>,
    pub filename: Option<String>,
    /// What the attachment is about. The server requires one, as Electric
    /// does: without it the upload is refused, 400 `attachment subject is required`.
    pub subject: Option<Subject>,
    pub role: Option<Role>,
    pub meta: Option<Map<String, Value>>,
    /// attache extension: a key-value name the attachment is also known by.
    pub key: Option<String>,
}

impl AttachmentInput {
    fn with_body(body: AttachmentBody) -> AttachmentInput {
        AttachmentInput {
            body,
            id: None,
            mime_type: None,
            filename: None,
            subject: None,
            role: None,
            meta: None,
            key: None,
        }
    }
    pub fn bytes(bytes: impl Into<Bytes>) -> AttachmentInput {
        AttachmentInput::with_body(AttachmentBody::Bytes(bytes.into()))
    }
    /// A file, streamed from disk; its name and (by extension) type are the defaults.
    pub fn file(path: impl Into<PathBuf>) -> AttachmentInput {
        AttachmentInput::with_body(AttachmentBody::File(path.into()))
    }
    pub fn reader(reader: impl AsyncRead + Send + Unpin + 'static, length: Option<u64>) -> AttachmentInput {
        AttachmentInput::with_body(AttachmentBody::Reader { reader: Box::new(reader), length })
    }
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }
    pub fn mime_type(mut self, mime: impl Into<String>) -> Self {
        self.mime_type = Some(mime.into());
        self
    }
    pub fn filename(mut self, name: impl Into<String>) -> Self {
        self.filename = Some(name.into());
        self
    }
    pub fn subject(mut self, subject: Subject) -> Self {
        self.subject = Some(subject);
        self
    }
    /// About the inbox message with this key.
    pub fn inbox(self, message_key: &str) -> Result<Self> {
        Ok(self.subject(Subject::new("inbox", message_key)?))
    }
    pub fn role(mut self, role: Role) -> Self {
        self.role = Some(role);
        self
    }
    pub fn meta(mut self, meta: Map<String, Value>) -> Self {
        self.meta = Some(meta);
        self
    }
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }
}

/// The answer to an upload: the manifest entry and the transaction that wrote it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttachmentReceipt {
    pub txid: String,
    pub attachment: ManifestEntry,
}

/// A byte range of an attachment, inclusive as in HTTP: `start..=end`, or from `start` to the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    pub start: u64,
    pub end: Option<u64>,
}

impl ByteRange {
    /// Parses `A-B` or `A-` (inclusive, as in an HTTP Range header).
    pub fn parse(s: &str) -> Result<ByteRange> {
        let bad = || Error::Invalid(format!("range {s:?} is not of the form START-END or START- (bytes, inclusive)"));
        let (a, b) = s.trim().split_once('-').ok_or_else(bad)?;
        let start = a.parse::<u64>().map_err(|_| bad())?;
        let end = if b.is_empty() { None } else { Some(b.parse::<u64>().map_err(|_| bad())?) };
        if end.is_some_and(|e| e < start) {
            return Err(bad());
        }
        Ok(ByteRange { start, end })
    }

    fn header(&self) -> String {
        match self.end {
            Some(end) => format!("bytes={}-{end}", self.start),
            None => format!("bytes={}-", self.start),
        }
    }
}

/// An attachment download in flight: what the server said about it, and its bytes as they arrive.
pub struct AttachmentDownload {
    pub status: u16,
    /// Bytes this answer carries (the range's length for a 206).
    pub content_length: Option<u64>,
    pub mime_type: Option<String>,
    pub content_range: Option<String>,
    response: Response,
}

impl AttachmentDownload {
    pub fn into_stream(self) -> impl Stream<Item = Result<Bytes>> {
        self.response.bytes_stream().map_err(|e| Error::Protocol(format!("the download broke off: {e}")))
    }

    /// Writes the bytes to `out` as they arrive; returns how many were written.
    pub async fn write_to<W: AsyncWrite + Unpin + ?Sized>(self, out: &mut W) -> Result<u64> {
        let mut stream = Box::pin(self.into_stream());
        let mut written = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            out.write_all(&chunk).await.map_err(|e| Error::io("writing the download", e))?;
            written += chunk.len() as u64;
        }
        out.flush().await.map_err(|e| Error::io("writing the download", e))?;
        Ok(written)
    }
}

/// A guess at a file's media type from its extension (the default when none is given).
pub fn guess_mime_type(path: &Path) -> &'static str {
    let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).unwrap_or_default();
    match ext.as_str() {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "svg" => "image/svg+xml",
        "pdf" => "application/pdf",
        "json" => "application/json",
        "txt" | "log" => "text/plain",
        "md" => "text/markdown",
        "csv" => "text/csv",
        "html" | "htm" => "text/html",
        "mp3" => "audio/mpeg",
        "wav" => "audio/wav",
        "mp4" => "video/mp4",
        "zip" => "application/zip",
        _ => "application/octet-stream",
    }
}

impl RuntimeServerClient {
    /// `POST .../attachments`: uploads an attachment and returns its manifest entry.
    pub async fn create_attachment(&self, entity: &EntityUrl, input: AttachmentInput) -> Result<ManifestEntry> {
        Ok(self.upload_attachment(entity, input).await?.attachment)
    }

    /// As [`create_attachment`](Self::create_attachment), returning the transaction id too.
    pub async fn upload_attachment(&self, entity: &EntityUrl, input: AttachmentInput) -> Result<AttachmentReceipt> {
        let form = attachment_form(input).await?;
        let route = entity_route(entity, "/attachments");
        let res = self.send(self.request(Method::POST, &route).multipart(form), &Method::POST, &route).await?;
        self.json(res, "upload answer").await
    }

    /// `GET .../attachments`: the entity's manifest.
    pub async fn list_attachments(&self, entity: &EntityUrl) -> Result<Vec<ManifestEntry>> {
        #[derive(Deserialize)]
        struct Listing {
            attachments: Vec<ManifestEntry>,
        }
        let route = entity_route(entity, "/attachments");
        let res = self.send(self.request(Method::GET, &route), &Method::GET, &route).await?;
        Ok(self.json::<Listing>(res, "attachment list").await?.attachments)
    }

    /// One manifest entry, from the listing (`None` if there is no such attachment).
    pub async fn get_attachment(&self, entity: &EntityUrl, id: &str) -> Result<Option<ManifestEntry>> {
        Ok(self.list_attachments(entity).await?.into_iter().find(|e| e.id == id))
    }

    /// `GET .../attachments/{id}`: all of an attachment's bytes, in memory.
    pub async fn read_attachment(&self, entity: &EntityUrl, id: &str) -> Result<Bytes> {
        let download = self.open_attachment(entity, id, None).await?;
        download.response.bytes().await.map_err(|e| self.transport(e))
    }

    /// Starts a download, optionally of a byte range; the bytes are read from the answer as they arrive.
    pub async fn open_attachment(
        &self,
        entity: &EntityUrl,
        id: &str,
        range: Option<ByteRange>,
    ) -> Result<AttachmentDownload> {
        attache_core::manifest::validate_attachment_id(id)?;
        let route = attachment_route(entity, id);
        let mut rb = self.request(Method::GET, &route);
        if let Some(r) = range {
            rb = rb.header("range", r.header());
        }
        let response = self.send(rb, &Method::GET, &route).await?;
        Ok(AttachmentDownload {
            status: response.status().as_u16(),
            content_length: header(&response, "content-length").and_then(|n| n.parse().ok()),
            mime_type: header(&response, "content-type"),
            content_range: header(&response, "content-range"),
            response,
        })
    }

    /// Streams an attachment (or a range of it) into `out`; returns the bytes written.
    pub async fn read_attachment_to<W: AsyncWrite + Unpin + ?Sized>(
        &self,
        entity: &EntityUrl,
        id: &str,
        range: Option<ByteRange>,
        out: &mut W,
    ) -> Result<u64> {
        self.open_attachment(entity, id, range).await?.write_to(out).await
    }

    /// Streams an attachment (or a range of it) into a new file at `path`.
    pub async fn read_attachment_to_file(
        &self,
        entity: &EntityUrl,
        id: &str,
        range: Option<ByteRange>,
        path: &Path,
    ) -> Result<u64> {
        let download = self.open_attachment(entity, id, range).await?;
        let mut file = tokio::fs::File::create(path)
            .await
            .map_err(|e| Error::io(format!("cannot create {}", path.display()), e))?;
        download.write_to(&mut file).await
    }

    /// `DELETE .../attachments/{id}`: removes the attachment; returns the transaction id.
    pub async fn delete_attachment(&self, entity: &EntityUrl, id: &str) -> Result<String> {
        #[derive(Deserialize)]
        struct Deleted {
            txid: String,
        }
        attache_core::manifest::validate_attachment_id(id)?;
        let route = attachment_route(entity, id);
        let res = self.send(self.request(Method::DELETE, &route), &Method::DELETE, &route).await?;
        Ok(self.json::<Deleted>(res, "delete answer").await?.txid)
    }
}

/// The multipart form of an upload. Text fields come first so the server
/// knows what it stores before the bytes arrive; the file part streams.
async fn attachment_form(input: AttachmentInput) -> Result<reqwest::multipart::Form> {
    use reqwest::multipart::{Form, Part};
    if let Some(id) = &input.id {
        attache_core::manifest::validate_new_attachment_id(id)?;
    }
    let (part, default_name, default_mime) = match input.body {
        AttachmentBody::Bytes(bytes) => {
            let len = bytes.len() as u64;
            (Part::stream_with_length(reqwest::Body::from(bytes), len), None, None)
        }
        AttachmentBody::File(path) => {
            let file = tokio::fs::File::open(&path)
                .await
                .map_err(|e| Error::io(format!("cannot open {}", path.display()), e))?;
            let len = file
                .metadata()
                .await
                .map_err(|e| Error::io(format!("cannot read the size of {}", path.display()), e))?
                .len();
            let body = reqwest::Body::wrap_stream(ReaderStream::new(file));
            let name = path.file_name().and_then(|n| n.to_str()).map(str::to_owned);
            (Part::stream_with_length(body, len), name, Some(guess_mime_type(&path).to_owned()))
        }
        AttachmentBody::Reader { reader, length } => {
            let body = reqwest::Body::wrap_stream(ReaderStream::new(reader));
            let part = match length {
                Some(len) => Part::stream_with_length(body, len),
                None => Part::stream(body),
            };
            (part, None, None)
        }
    };
    let filename = input.filename.or(default_name);
    let mime = input.mime_type.or(default_mime).unwrap_or_else(|| "application/octet-stream".to_owned());
    let mut form = Form::new();
    if let Some(id) = input.id {
        form = form.text("id", id);
    }
    form = form.text("mimeType", mime.clone());
    if let Some(name) = &filename {
        form = form.text("filename", name.clone());
    }
    if let Some(subject) = &input.subject {
        let json = serde_json::to_string(subject).map_err(|e| Error::Invalid(e.to_string()))?;
        form = form.text("subject", json);
    }
    if let Some(role) = input.role {
        form = form.text("role", if role == Role::Output { "output" } else { "input" });
    }
    if let Some(meta) = input.meta {
        form = form.text("meta", Value::Object(meta).to_string());
    }
    if let Some(key) = input.key {
        form = form.text("key", key);
    }
    let part = part
        .file_name(filename.unwrap_or_else(|| "attachment".to_owned()))
        .mime_str(&mime)
        .map_err(|_| Error::Invalid(format!("{mime:?} is not a media type")))?;
    Ok(form.part("file", part))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_ranges_parse_as_inclusive_http_ranges() {
        assert_eq!(ByteRange::parse("0-9").unwrap(), ByteRange { start: 0, end: Some(9) });
        assert_eq!(ByteRange::parse("5-").unwrap().header(), "bytes=5-");
        for bad in ["", "9-3", "a-b", "-5", "5"] {
            assert!(ByteRange::parse(bad).is_err(), "{bad:?}");
        }
    }
}

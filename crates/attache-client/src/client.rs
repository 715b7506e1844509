//! `RuntimeServerClient`: one HTTP client for every face of an attache
//! server, acting as one principal (dev mode) or bearer token. This module
//! owns the request plumbing, entities and attachments; `streams` and `rpc`
//! add their methods to the same type.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use attache_core::manifest::{ManifestEntry, Role, Subject};
use attache_core::{EntityUrl, PrincipalKey};
use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};
use reqwest::header::HeaderValue;
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_util::io::ReaderStream;

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

/// `/_electric/entities/{type}/{id}` + `rest`.
pub(crate) fn entity_route(entity: &EntityUrl, rest: &str) -> String {
    format!("/_electric/entities{entity}{rest}")
}

// ---------------------------------------------------------------- entities

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

// ------------------------------------------------------------- attachments

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
        let route = entity_route(entity, &format!("/attachments/{id}"));
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
        let route = entity_route(entity, &format!("/attachments/{id}"));
        let res = self.send(self.request(Method::DELETE, &route), &Method::DELETE, &route).await?;
        Ok(self.json::<Deleted>(res, "delete answer").await?.txid)
    }
}

/// The chunk size of resumable uploads unless told otherwise.
pub const RESUMABLE_CHUNK_BYTES: usize = 4 << 20;

impl RuntimeServerClient {
    /// `PUT .../attachments/{id}`: opens a resumable upload (a `pending` entry
    /// with an open stream at its `streamPath`). Opening the same upload
    /// again, as the same principal, returns the pending entry.
    pub async fn begin_resumable_upload(
        &self,
        entity: &EntityUrl,
        id: &str,
        input: &AttachmentInput,
    ) -> Result<ManifestEntry> {
        #[derive(Deserialize)]
        struct Begun {
            attachment: ManifestEntry,
        }
        attache_core::manifest::validate_attachment_id(id)?;
        let mut body = Map::new();
        let mime = input.mime_type.clone().unwrap_or_else(|| match &input.body {
            AttachmentBody::File(p) => guess_mime_type(p).to_owned(),
            _ => "application/octet-stream".to_owned(),
        });
        body.insert("mimeType".into(), Value::String(mime));
        let filename = input.filename.clone().or_else(|| match &input.body {
            AttachmentBody::File(p) => p.file_name().and_then(|n| n.to_str()).map(str::to_owned),
            _ => None,
        });
        if let Some(f) = filename {
            body.insert("filename".into(), Value::String(f));
        }
        if let Some(s) = &input.subject {
            body.insert("subject".into(), serde_json::to_value(s).map_err(|e| Error::Invalid(e.to_string()))?);
        }
        if let Some(r) = input.role {
            body.insert("role".into(), Value::String(if r == Role::Output { "output" } else { "input" }.into()));
        }
        if let Some(m) = &input.meta {
            body.insert("meta".into(), Value::Object(m.clone()));
        }
        if let Some(k) = &input.key {
            body.insert("key".into(), Value::String(k.clone()));
        }
        let route = entity_route(entity, &format!("/attachments/{id}"));
        let res = self.send(self.request(Method::PUT, &route).json(&body), &Method::PUT, &route).await?;
        Ok(self.json::<Begun>(res, "resumable upload answer").await?.attachment)
    }

    /// Uploads in chunks over the attachment's own stream, with an idempotent
    /// producer, and closes it; returns the complete entry. If the upload was
    /// begun before (a previous run died), it continues after the bytes the
    /// server already has, so run it again with the same id to resume.
    pub async fn upload_attachment_resumable(
        &self,
        entity: &EntityUrl,
        input: AttachmentInput,
        chunk_bytes: usize,
    ) -> Result<ManifestEntry> {
        use tokio::io::{AsyncReadExt, AsyncSeekExt};
        let id = input.id.clone().unwrap_or_else(crate::send::new_uuid);
        let pending = self.begin_resumable_upload(entity, &id, &input).await?;
        let info = self.head_stream(&pending.stream_path).await?;
        let have = attache_core::Offset::parse(&info.next_offset).map(|o| o.0).unwrap_or(0);
        if !info.closed {
            let mut reader: Box<dyn AsyncRead + Send + Unpin> = match input.body {
                AttachmentBody::Bytes(b) => {
                    Box::new(std::io::Cursor::new(b.slice(have.min(b.len() as u64) as usize..)))
                }
                AttachmentBody::File(path) => {
                    let mut f = tokio::fs::File::open(&path)
                        .await
                        .map_err(|e| Error::io(format!("cannot open {}", path.display()), e))?;
                    f.seek(std::io::SeekFrom::Start(have))
                        .await
                        .map_err(|e| Error::io(format!("cannot seek in {}", path.display()), e))?;
                    Box::new(f)
                }
                AttachmentBody::Reader { mut reader, .. } => {
                    // A reader cannot seek: skip what the server already has.
                    let mut sink = tokio::io::sink();
                    tokio::io::copy(&mut (&mut reader).take(have), &mut sink)
                        .await
                        .map_err(|e| Error::io("skipping uploaded bytes", e))?;
                    reader
                }
            };
            // A fresh epoch per session (milliseconds since 1970 only grow), so a
            // resumed upload is never mistaken for a retry of the last one.
            let epoch = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0);
            let mut producer = crate::streams::IdempotentProducer::new(
                self,
                &pending.stream_path,
                &pending.mime_type,
                &format!("upload-{id}"),
                epoch,
            )?;
            let mut buf = vec![0u8; chunk_bytes.max(1)];
            loop {
                let mut filled = 0;
                while filled < buf.len() {
                    let n = reader.read(&mut buf[filled..]).await.map_err(|e| Error::io("reading the upload", e))?;
                    if n == 0 {
                        break;
                    }
                    filled += n;
                }
                if filled == 0 {
                    producer.close(Bytes::new()).await?;
                    break;
                }
                producer.append(Bytes::copy_from_slice(&buf[..filled])).await?;
            }
        }
        self.get_attachment(entity, &id)
            .await?
            .ok_or_else(|| Error::Protocol(format!("attachment {id:?} is gone after its upload")))
    }
}

/// The multipart form of an upload. Text fields come first so the server
/// knows what it stores before the bytes arrive; the file part streams.
async fn attachment_form(input: AttachmentInput) -> Result<reqwest::multipart::Form> {
    use reqwest::multipart::{Form, Part};
    if let Some(id) = &input.id {
        attache_core::manifest::validate_attachment_id(id)?;
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

/// Headers the SDK sends on appends.
pub(crate) fn content_type_header(content_type: &str) -> Result<HeaderValue> {
    HeaderValue::from_str(content_type).map_err(|_| Error::Invalid(format!("{content_type:?} is not a content type")))
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

    #[test]
    fn server_urls_must_be_http() {
        assert!(RuntimeServerClient::new("http://127.0.0.1:4437/").is_ok());
        assert!(RuntimeServerClient::new("ftp://x").is_err());
        assert!(RuntimeServerClient::new("not a url").is_err());
    }

    #[test]
    fn tokens_never_show_in_debug_output() {
        let c = RuntimeServerClient::new(DEFAULT_URL).unwrap().with_token("secret-token");
        assert!(!format!("{c:?}").contains("secret-token"));
    }
}

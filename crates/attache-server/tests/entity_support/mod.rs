//! What the entity, attachment and permission tests share: multipart bodies
//! built by hand (so the edge cases are byte-exact), the manifest as the
//! server lists it and as the main stream says it, and the blob directory.

// Each test binary that includes this module uses a different subset of it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::common::TestServer;

pub const BOUNDARY: &str = "attache-test-7MA4YWxkTrZu0gW";
pub const PRINCIPAL: &str = "electric-principal";

/// A `multipart/form-data` body, part by part, exactly as written, except
/// that [`Form::finish`] and [`Form::unfinished`] add the subject every
/// upload needs (`{"type":"context","key":"test"}`, last) when no part named
/// one; [`Form::finish_without_subject`] does not.
pub struct Form {
    body: Vec<u8>,
    names_subject: bool,
}

/// The subject `Form::finish` adds when a form names none.
pub const DEFAULT_SUBJECT: &str = r#"{"type":"context","key":"test"}"#;

impl Default for Form {
    fn default() -> Self {
        Form::new()
    }
}

impl Form {
    pub fn new() -> Form {
        Form { body: Vec::new(), names_subject: false }
    }

    pub fn content_type() -> String {
        format!("multipart/form-data; boundary={BOUNDARY}")
    }

    /// A part with the given header lines (no trailing CRLF) and bytes.
    pub fn part(mut self, headers: &str, bytes: &[u8]) -> Form {
        self.body.extend_from_slice(format!("--{BOUNDARY}\r\n{headers}\r\n\r\n").as_bytes());
        self.body.extend_from_slice(bytes);
        self.body.extend_from_slice(b"\r\n");
        self
    }

    pub fn field(mut self, name: &str, value: &str) -> Form {
        self.names_subject |= matches!(name, "subject" | "subjectType" | "subjectKey");
        self.part(&format!("Content-Disposition: form-data; name=\"{name}\""), value.as_bytes())
    }

    /// The `file` part, with a filename and a content type when given.
    pub fn file(self, filename: Option<&str>, content_type: Option<&str>, bytes: &[u8]) -> Form {
        let mut headers = String::from("Content-Disposition: form-data; name=\"file\"");
        if let Some(f) = filename {
            headers.push_str(&format!("; filename=\"{f}\""));
        }
        if let Some(ct) = content_type {
            headers.push_str(&format!("\r\nContent-Type: {ct}"));
        }
        self.part(&headers, bytes)
    }

    /// The body with its closing delimiter (and a subject, when none was named).
    pub fn finish(self) -> Vec<u8> {
        if self.names_subject {
            self.finish_without_subject()
        } else {
            self.field("subject", DEFAULT_SUBJECT).finish_without_subject()
        }
    }

    /// The body with its closing delimiter, as written.
    pub fn finish_without_subject(mut self) -> Vec<u8> {
        self.body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
        self.body
    }

    /// The body as written so far (and a subject, when none was named), without a closing delimiter.
    pub fn unfinished(self) -> Vec<u8> {
        if self.names_subject {
            self.body
        } else {
            self.field("subject", DEFAULT_SUBJECT).body
        }
    }
}

/// `/_electric/entities/{entity}` for an entity URL `/{type}/{id}`.
pub fn api(entity: &str) -> String {
    format!("/_electric/entities{entity}")
}

/// Spawns `entity` in dev mode as `principal` (none: user:anonymous); insists it is new.
pub async fn spawn(ts: &TestServer, principal: Option<&str>, entity: &str) -> Value {
    let res = as_principal(ts.request(Method::PUT, &api(entity)), principal).send().await.expect("spawn answered");
    let status = res.status();
    let body: Value = res.json().await.expect("spawn answers JSON");
    assert_eq!(status, StatusCode::CREATED, "spawning {entity}: {body}");
    body
}

pub fn as_principal(rb: RequestBuilder, principal: Option<&str>) -> RequestBuilder {
    match principal {
        Some(p) => rb.header(PRINCIPAL, p),
        None => rb,
    }
}

/// `GET path` as `principal`, its answer's JSON.
pub async fn get_json_as(ts: &TestServer, path: &str, principal: Option<&str>) -> Value {
    let res = as_principal(ts.request(Method::GET, path), principal).send().await.expect("an answer");
    res.json().await.expect("a JSON answer")
}

/// POSTs a multipart body to the entity's attachments route (dev mode, no principal: user:anonymous).
pub async fn upload_raw(ts: &TestServer, entity: &str, body: Vec<u8>) -> Response {
    ts.request(Method::POST, &format!("{}/attachments", api(entity)))
        .header("content-type", Form::content_type())
        .body(body)
        .send()
        .await
        .expect("upload answered")
}

/// Uploads `bytes` as attachment `id`; insists on 201 and returns the manifest entry.
pub async fn upload(ts: &TestServer, entity: &str, id: &str, mime: &str, bytes: &[u8]) -> Value {
    let form = Form::new().field("id", id).file(Some(&format!("{id}.bin")), Some(mime), bytes).finish();
    let res = upload_raw(ts, entity, form).await;
    let status = res.status();
    let body: Value = res.json().await.expect("upload answers JSON");
    assert_eq!(status, StatusCode::CREATED, "uploading {id} to {entity}: {body}");
    body["attachment"].clone()
}

/// The manifest as `GET …/attachments` lists it, by attachment id.
pub async fn listed(ts: &TestServer, entity: &str) -> BTreeMap<String, Value> {
    let res = ts.request(Method::GET, &format!("{}/attachments", api(entity))).send().await.expect("list answered");
    assert_eq!(res.status(), StatusCode::OK, "listing attachments of {entity}");
    let body: Value = res.json().await.expect("list answers JSON");
    body["attachments"]
        .as_array()
        .expect("attachments is an array")
        .iter()
        .map(|e| (e["id"].as_str().expect("an entry has an id").to_owned(), e.clone()))
        .collect()
}

/// The rows of a JSON stream, read from the start.
pub async fn rows(ts: &TestServer, path: &str) -> Vec<Value> {
    rows_as(ts, path, None).await
}

/// `rows` as `principal` (dev mode; none: user:anonymous).
pub async fn rows_as(ts: &TestServer, path: &str, principal: Option<&str>) -> Vec<Value> {
    let bytes = ts.read_all_as(path, principal).await;
    // Catch-up pages are JSON arrays, concatenated: `[..][..]`.
    let mut out = Vec::new();
    let mut de = serde_json::Deserializer::from_slice(&bytes).into_iter::<Vec<Value>>();
    for page in de.by_ref() {
        out.extend(page.expect("a page of a JSON stream is an array"));
    }
    out
}

/// State Protocol materialization of a main stream: (type, key) → value.
pub async fn materialize(ts: &TestServer, entity: &str) -> BTreeMap<(String, String), Value> {
    materialize_as(ts, entity, None).await
}

/// `materialize` as `principal` (dev mode; none: user:anonymous).
pub async fn materialize_as(
    ts: &TestServer,
    entity: &str,
    principal: Option<&str>,
) -> BTreeMap<(String, String), Value> {
    let mut state = BTreeMap::new();
    for row in rows_as(ts, &format!("{entity}/main"), principal).await {
        let (Some(t), Some(k)) = (row["type"].as_str(), row["key"].as_str()) else { continue };
        let key = (t.to_owned(), k.to_owned());
        match row["headers"]["operation"].as_str() {
            Some("insert" | "update" | "upsert") => {
                state.insert(key, row["value"].clone());
            }
            Some("delete") => {
                state.remove(&key);
            }
            _ => {}
        }
    }
    state
}

/// The manifest entries the main stream materializes to, by attachment id.
pub async fn manifest(ts: &TestServer, entity: &str) -> BTreeMap<String, Value> {
    materialize(ts, entity)
        .await
        .into_iter()
        .filter(|((t, _), _)| t == "manifest")
        .map(|((_, k), v)| (k.strip_prefix("attachment:").unwrap_or(&k).to_owned(), v))
        .collect()
}

pub async fn get_bytes(ts: &TestServer, entity: &str, id: &str) -> (StatusCode, Vec<u8>) {
    let res = ts
        .request(Method::GET, &format!("{}/attachments/{id}", api(entity)))
        .send()
        .await
        .expect("attachment read answered");
    let status = res.status();
    (status, res.bytes().await.expect("the body arrives").to_vec())
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// `len` deterministic pseudo-random bytes (xorshift), different per seed.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Every regular file under `dir`, recursively (empty when `dir` is missing).
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return out };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// Blob files under `<data_dir>/blobs`, outside the staging dir `tmp/`.
pub fn stored_blobs(data_dir: &Path) -> Vec<PathBuf> {
    let tmp = data_dir.join("blobs").join("tmp");
    files_under(&data_dir.join("blobs")).into_iter().filter(|p| !p.starts_with(&tmp)).collect()
}

/// Files in the staging dir `<data_dir>/blobs/tmp`.
pub fn staged_blobs(data_dir: &Path) -> Vec<PathBuf> {
    files_under(&data_dir.join("blobs").join("tmp"))
}

/// Polls `check` until it returns `Some`, or panics with `what` after `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// `error.code` and the whole body of an error response.
pub async fn error_of(res: Response) -> (StatusCode, String, Value) {
    let status = res.status();
    let text = res.text().await.expect("the body arrives");
    let body: Value = serde_json::from_str(&text).unwrap_or_else(|_| Value::String(text.clone()));
    let code = body["error"]["code"].as_str().unwrap_or("").to_owned();
    (status, code, body)
}

/// A multipart upload sent over its own connection up to the middle of its
/// file, then held there: the server has written the upload's `pending` row
/// (its id and subject come before the file) and waits for the rest.
pub struct StalledUpload {
    sock: tokio::net::TcpStream,
    rest: Vec<u8>,
}

impl StalledUpload {
    /// Sends the request head and the form up to the middle of `file`, as
    /// `principal` (none: user:anonymous in dev mode), with `fields` before the file.
    pub async fn start(
        ts: &TestServer,
        principal: Option<&str>,
        entity: &str,
        fields: &[(&str, &str)],
        file: &[u8],
    ) -> StalledUpload {
        use tokio::io::AsyncWriteExt;
        let mut form = Form::new();
        for (name, value) in fields {
            form = form.field(name, value);
        }
        let mut sent = form.unfinished();
        sent.extend_from_slice(
            format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"f.bin\"\r\n\r\n")
                .as_bytes(),
        );
        let half = file.len() / 2;
        sent.extend_from_slice(&file[..half]);
        let mut rest = file[half..].to_vec();
        rest.extend_from_slice(format!("\r\n--{BOUNDARY}--\r\n").as_bytes());
        let addr = ts.url.trim_start_matches("http://").to_owned();
        let mut head = format!(
            "POST {}/attachments HTTP/1.1\r\nHost: {addr}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
            api(entity),
            Form::content_type(),
            sent.len() + rest.len()
        );
        if let Some(p) = principal {
            head.push_str(&format!("{PRINCIPAL}: {p}\r\n"));
        }
        head.push_str("\r\n");
        let mut sock = tokio::net::TcpStream::connect(&addr).await.expect("a connection");
        sock.write_all(head.as_bytes()).await.expect("the head is sent");
        sock.write_all(&sent).await.expect("half the body is sent");
        sock.flush().await.expect("flushed");
        StalledUpload { sock, rest }
    }

    /// Sends the rest of the body; the status and the JSON body of the answer.
    pub async fn finish(mut self) -> (StatusCode, Value) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        self.sock.write_all(&self.rest).await.expect("the rest is sent");
        self.sock.flush().await.expect("flushed");
        let mut answer = Vec::new();
        self.sock.read_to_end(&mut answer).await.expect("the answer arrives");
        let text = String::from_utf8_lossy(&answer).into_owned();
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse::<u16>().ok())
            .and_then(|code| StatusCode::from_u16(code).ok())
            .unwrap_or_else(|| panic!("an HTTP answer: {text}"));
        let body = text.split_once("\r\n\r\n").map(|(_, body)| body).unwrap_or("");
        (status, serde_json::from_str(body).unwrap_or_else(|_| Value::String(body.to_owned())))
    }
}

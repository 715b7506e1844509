//! Fuzz targets for the server's network parsers: `Range`, JSON-RPC requests
//! and batches, the rows of a main stream as the server reads them back,
//! and, over the real server, multipart uploads, WebSocket messages,
//! Durable Streams request headers and read query strings.
//!
//! The pure parsers are called directly. What a face does with its input
//! (multipart through `multer`, WebSocket frames, headers, queries) is fuzzed
//! through the running server ([`TestServer`]): that way the target follows
//! the handler as it is, limits included, and asserts what a client sees: no
//! 5xx, error bodies of the documented shape, refused uploads that change
//! nothing, accepted uploads that read back byte for byte.
//!
//! Each target is a `bolero::check!()` and runs under `cargo test` on stable
//! Rust with random inputs for about a second; inputs are bounded.
//!
//! Longer runs:
//! - random inputs, any toolchain: `BOLERO_RANDOM_TEST_TIME_MS=60000 cargo test -p attache-server --test fuzz_parsers`
//!   (per target; `BOLERO_RANDOM_ITERATIONS=N` counts inputs instead);
//! - coverage-guided (libfuzzer, nightly): `cargo bolero test -p attache-server --test fuzz_parsers <target> -T 60s`.
//!
//! A failure prints the input and `BOLERO_RANDOM_SEED=..`; setting that
//! variable replays it.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use attache_core::{Offset, ReadOffset};
use attache_server::attachments::{content_disposition, parse_range, RangeRequest};
use attache_server::rows::MainView;
use attache_server::rpc::{parse_request, RpcError};
use axum::http::HeaderValue;
use bolero::check;
use bolero::generator::TypeGenerator;
use common::{header, TestServer};
use futures::{SinkExt, StreamExt};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const PRINCIPAL: (&str, &str) = ("electric-principal", "user:fuzz");

// ------------------------------------------------------------ generators

/// One piece of a generated string: a word of the grammar under test, a
/// number, or any character; so random inputs get past a parser's first check.
#[derive(Debug, Clone, TypeGenerator)]
enum Piece {
    Word(u8),
    Number(u64),
    Small(u8),
    Char(char),
    Ascii(u8),
}

fn render(pieces: &[Piece], words: &[&str]) -> String {
    let mut out = String::new();
    for p in pieces {
        match p {
            Piece::Word(i) => out.push_str(words[*i as usize % words.len()]),
            Piece::Number(n) => out.push_str(&n.to_string()),
            Piece::Small(n) => out.push_str(&n.to_string()),
            Piece::Char(c) => out.push(*c),
            Piece::Ascii(b) => out.push((b & 0x7f) as char),
        }
    }
    out
}

/// A JSON value, generated (integers only, so values compare exactly).
#[derive(Debug, Clone, TypeGenerator)]
enum Json {
    Null,
    Bool(bool),
    Int(i64),
    Str(String),
    Array(Vec<Json>),
    Object(Vec<(String, Json)>),
}

impl Json {
    fn value(&self) -> Value {
        match self {
            Json::Null => Value::Null,
            Json::Bool(b) => Value::Bool(*b),
            Json::Int(n) => Value::from(*n),
            Json::Str(s) => Value::from(s.as_str()),
            Json::Array(items) => Value::Array(items.iter().map(Json::value).collect()),
            Json::Object(fields) => Value::Object(fields.iter().map(|(k, v)| (k.clone(), v.value())).collect()),
        }
    }
}

/// A field value: usually a word of the protocol, sometimes any text or JSON.
#[derive(Debug, Clone, TypeGenerator)]
enum Field {
    Word(u8),
    Words(Vec<Piece>),
    Text(String),
    Other(Json),
}

impl Field {
    fn value(&self, words: &[&str]) -> Value {
        match self {
            Field::Word(i) => Value::from(words[*i as usize % words.len()]),
            Field::Words(p) => Value::from(render(p, words)),
            Field::Text(s) => Value::from(s.as_str()),
            Field::Other(j) => j.value(),
        }
    }

    fn text(&self, words: &[&str]) -> String {
        match self.value(words) {
            Value::String(s) => s,
            other => other.to_string(),
        }
    }
}

/// The real server on its own runtime, for the targets that go over HTTP.
struct Harness {
    ts: TestServer,
    rt: tokio::runtime::Runtime,
}

impl Harness {
    fn start() -> Harness {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime for the fuzzed server");
        // Long-polls that find nothing return quickly, so inputs stay fast.
        let ts = rt.block_on(TestServer::start_with(|c| c.long_poll_timeout = Duration::from_millis(20)));
        Harness { ts, rt }
    }

    fn stop(self) {
        let Harness { ts, rt } = self;
        rt.block_on(ts.stop());
    }
}

/// A 4xx answer has the documented body `{"error":{"code","message"}}`.
async fn assert_client_error_shape(res: reqwest::Response, what: &str) {
    let status = res.status();
    let body = res.bytes().await.expect("an error body arrives");
    let parsed: Value = serde_json::from_slice(&body)
        .unwrap_or_else(|_| panic!("{what}: {status} body is not JSON: {:?}", String::from_utf8_lossy(&body)));
    assert!(
        parsed["error"]["code"].is_string() && parsed["error"]["message"].is_string(),
        "{what}: {status} body is not an error object: {parsed}"
    );
}

fn assert_not_server_error(status: StatusCode, what: &str) {
    assert!(!status.is_server_error(), "{what} answered {status}");
}

// ------------------------------------------------------------------ Range

#[test]
fn fuzz_range_stays_inside_the_length() {
    check!().with_type::<(Vec<Piece>, u64, bool)>().for_each(|(pieces, len, small)| {
        let len = if *small { len % 64 } else { *len };
        let text = render(pieces, &["bytes=", "-", ",", " ", "0", "1", "items=", "18446744073709551615"]);
        match parse_range(Some(&text), len) {
            RangeRequest::Partial(a, b) => assert!(a <= b && b < len, "{text:?} on {len} bytes gave {a}-{b}"),
            RangeRequest::Full => {}
            RangeRequest::Unsatisfiable => assert!(text.trim().starts_with("bytes=")),
        }
    });
    check!().with_type::<(u64, u64, u64)>().cloned().for_each(|(a, b, len)| {
        let (len, a, b) = (len % 1000, a % 1100, b % 1100);
        let expected = if a <= b && a < len { RangeRequest::Partial(a, b.min(len - 1)) } else { RangeRequest::Unsatisfiable };
        assert_eq!(parse_range(Some(&format!("bytes={a}-{b}")), len), expected);
        let suffix = match (b, len) {
            (0, _) | (_, 0) => RangeRequest::Unsatisfiable,
            (n, len) => RangeRequest::Partial(len.saturating_sub(n), len - 1),
        };
        assert_eq!(parse_range(Some(&format!("bytes=-{b}")), len), suffix);
    });
}

#[test]
fn fuzz_content_disposition_is_a_safe_header_for_any_filename() {
    check!().with_type::<String>().for_each(|filename| {
        let d = content_disposition(filename);
        assert!(HeaderValue::from_str(&d).is_ok(), "{d:?} is a valid header value");
        let quoted = d.split('"').nth(1).expect("a quoted fallback");
        assert_eq!(d.matches('"').count(), 2, "the filename cannot close the quotes: {d:?}");
        assert!(quoted.chars().all(|c| c.is_ascii_graphic() || c == ' '));
        let encoded = d.rsplit("UTF-8''").next().expect("an RFC 5987 value");
        assert_eq!(percent_decode(encoded), filename.as_bytes(), "filename* decodes back");
    });
}

fn percent_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).expect("two hex digits"));
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

// --------------------------------------------------------------- JSON-RPC

const RPC_WORDS: &[&str] = &[
    "2.0",
    "1.0",
    "task.create",
    "task.get",
    "task.update",
    "task.list",
    "task.assign",
    "task.unassign",
    "task.claim",
    "task.complete",
    "task.delete",
    "task.create_attachment",
    "task.get_attachment",
    "task.list_attachments",
    "task.get_attachments_batch",
    "task.delete_attachment",
    "task.nope",
    "t-1",
    "pending",
    "in_progress",
    "completed",
    "json",
    "markdown",
    "text",
    "url",
    "binary",
    "k",
    "worker-1",
];

const PARAM_NAMES: &[&str] = &[
    "text",
    "title",
    "description",
    "priority",
    "id",
    "taskId",
    "status",
    "assignee",
    "workerId",
    "key",
    "type",
    "value",
    "content",
    "url",
    "mimeType",
    "limit",
    "offset",
    "result",
    "metadata",
    "updates",
    "keys",
    "requests",
];

/// A JSON-RPC message: each member may be missing, mistyped or unexpected.
#[derive(Debug, Clone, TypeGenerator)]
struct RpcMsg {
    jsonrpc: Option<Field>,
    method: Option<Field>,
    id: Option<Json>,
    params: Option<Json>,
    named_params: Vec<(u8, Field)>,
    not_an_object: Option<Json>,
}

impl RpcMsg {
    fn value(&self) -> Value {
        if let Some(other) = &self.not_an_object {
            return other.value();
        }
        let mut m = serde_json::Map::new();
        if let Some(v) = &self.jsonrpc {
            m.insert("jsonrpc".into(), v.value(RPC_WORDS));
        }
        if let Some(v) = &self.method {
            m.insert("method".into(), v.value(RPC_WORDS));
        }
        if let Some(v) = &self.id {
            m.insert("id".into(), v.value());
        }
        match (&self.params, self.named_params.is_empty()) {
            (Some(p), _) => {
                m.insert("params".into(), p.value());
            }
            (None, false) => {
                let params = self
                    .named_params
                    .iter()
                    .map(|(k, v)| (PARAM_NAMES[*k as usize % PARAM_NAMES.len()].to_owned(), v.value(RPC_WORDS)))
                    .collect();
                m.insert("params".into(), Value::Object(params));
            }
            (None, true) => {}
        }
        Value::Object(m)
    }
}

#[test]
fn fuzz_rpc_parse_request_keeps_what_it_reads() {
    check!().with_type::<RpcMsg>().for_each(|msg| {
        let v = msg.value();
        let id = v.get("id").cloned();
        let id_ok = matches!(id, None | Some(Value::Null | Value::String(_) | Value::Number(_)));
        match parse_request(v.clone()) {
            Ok(req) => {
                assert_eq!(v["jsonrpc"], "2.0");
                assert_eq!(Some(&Value::from(req.method.as_str())), v.get("method"));
                assert_eq!(req.id, id);
                assert_eq!(&req.params, v.get("params").unwrap_or(&Value::Null));
                assert!(req.params.is_null() || req.params.is_object());
            }
            Err((reply_id, e)) => {
                assert_eq!(reply_id, if id_ok { id.unwrap_or(Value::Null) } else { Value::Null });
                assert!(matches!(e, RpcError::InvalidRequest(_) | RpcError::Call(_)), "{e:?}");
            }
        }
    });
}

/// A body for `POST /rpc`: one message, a batch, or bytes.
#[derive(Debug, Clone, TypeGenerator)]
enum RpcBody {
    One(RpcMsg),
    Batch(Vec<RpcMsg>),
    Bytes(Vec<u8>),
}

impl RpcBody {
    fn bytes(&self) -> Vec<u8> {
        match self {
            RpcBody::One(m) => m.value().to_string().into_bytes(),
            RpcBody::Batch(ms) => Value::Array(ms.iter().map(RpcMsg::value).collect()).to_string().into_bytes(),
            RpcBody::Bytes(b) => b.clone(),
        }
    }
}

/// One answer of a JSON-RPC response: well formed, and answering a request
/// that was sent (or `null`); never an internal error.
fn assert_rpc_answer(answer: &Value, sent_ids: &[Value], body: &[u8]) {
    let what = String::from_utf8_lossy(body);
    assert_eq!(answer["jsonrpc"], "2.0", "{answer} for {what}");
    assert!(answer.get("result").is_some() != answer.get("error").is_some(), "{answer}");
    let id = answer.get("id").unwrap_or_else(|| panic!("an answer carries an id: {answer}"));
    assert!(id.is_null() || sent_ids.contains(id), "{id} was never sent: {what}");
    if let Some(e) = answer.get("error") {
        let code = e["code"].as_i64().unwrap_or_else(|| panic!("an integer code: {answer}"));
        assert_ne!(code, -32603, "an internal error is a server fault: {answer} for {what}");
        assert!(e["message"].is_string());
    }
}

#[test]
fn fuzz_rpc_bodies_over_http() {
    let h = Harness::start();
    let hh = AssertUnwindSafe(&h);
    check!().with_type::<RpcBody>().for_each(|body| {
        let bytes = body.bytes();
        hh.rt.block_on(async {
            let res = hh
                .ts
                .request(Method::POST, "/rpc")
                .header(PRINCIPAL.0, PRINCIPAL.1)
                .header("content-type", "application/json")
                .body(bytes.clone())
                .send()
                .await
                .expect("/rpc answers");
            let status = res.status();
            let answer = res.bytes().await.expect("the answer arrives");
            let parsed = serde_json::from_slice::<Value>(&bytes).ok();
            let items: Vec<Value> = match &parsed {
                Some(Value::Array(items)) => items.clone(),
                Some(one) => vec![one.clone()],
                None => vec![],
            };
            let sent_ids: Vec<Value> = items.iter().filter_map(|i| i.get("id").cloned()).collect();
            match status {
                StatusCode::NO_CONTENT => {
                    assert!(answer.is_empty());
                    assert!(parsed.is_some() && items.iter().all(|i| i.get("id").is_none()), "only notifications");
                }
                StatusCode::OK => {
                    let answer: Value = serde_json::from_slice(&answer).expect("an answer is JSON");
                    match (&parsed, &answer) {
                        (Some(Value::Array(batch)), Value::Array(answers)) => {
                            assert!(!batch.is_empty() && answers.len() <= batch.len());
                            answers.iter().for_each(|a| assert_rpc_answer(a, &sent_ids, &bytes));
                        }
                        (Some(Value::Array(batch)), one) => {
                            // An empty or oversized batch is refused as a whole.
                            assert!(batch.is_empty() || batch.len() > 100, "{one}");
                            assert_eq!(one["error"]["code"], -32600);
                        }
                        (Some(_), one) => assert_rpc_answer(one, &sent_ids, &bytes),
                        (None, one) => assert_eq!(one["error"]["code"], -32700, "{one}"),
                    }
                }
                other => panic!("/rpc answered {other} to {:?}", String::from_utf8_lossy(&bytes)),
            }
        });
    });
    h.stop();
}

// ----------------------------------------------------------- State rows

const ROW_WORDS: &[&str] = &[
    "manifest",
    "inbox",
    "event",
    "run",
    "insert",
    "update",
    "upsert",
    "delete",
    "attachment:a",
    "attachment:b",
    "a",
    "b",
    "m1",
];

/// A manifest entry as a row value, generated field by field.
#[derive(Debug, Clone, TypeGenerator)]
struct EntryParts {
    id: Option<Field>,
    status: Option<Field>,
    role: Option<Field>,
    name: Option<Field>,
    drop_required: Option<u8>,
    extra: Vec<(String, Json)>,
}

impl EntryParts {
    fn value(&self) -> Value {
        let mut v = json!({
            "key": "attachment:a", "kind": "attachment", "id": "a", "streamPath": "/c/x/attachments/a",
            "status": "complete", "role": "input", "mimeType": "text/plain", "createdAt": "2026-01-01T00:00:00.000Z",
        });
        let obj = v.as_object_mut().expect("an object literal");
        let statuses = &["pending", "complete", "failed", "done"];
        for (name, f, words) in
            [("id", &self.id, ROW_WORDS), ("status", &self.status, statuses), ("role", &self.role, &["input", "output"])]
        {
            if let Some(f) = f {
                obj.insert(name.into(), f.value(words));
            }
        }
        if let Some(n) = &self.name {
            obj.insert("name".into(), n.value(&["n1", "n2"]));
        }
        for (k, j) in &self.extra {
            obj.insert(k.clone(), j.value());
        }
        if let Some(i) = self.drop_required {
            let required = ["key", "kind", "id", "streamPath", "status", "role", "mimeType", "createdAt"];
            obj.remove(required[i as usize % required.len()]);
        }
        v
    }
}

/// One row of a main stream: as the server writes it, or anything else.
#[derive(Debug, Clone, TypeGenerator)]
enum Row {
    Manifest { key: Field, operation: Field, value: Option<EntryParts>, spaced: bool },
    Other { collection: Field, key: Field, operation: Option<Field>, value: Option<Json> },
    Bytes(Vec<u8>),
}

impl Row {
    fn bytes(&self) -> Vec<u8> {
        // Written by hand: the server's rows start `{"type":..,"key":..` (its
        // shortcuts look for that), and serde_json's maps would sort the keys.
        let row = |collection: Value, key: Value, value: Option<Value>, headers: Option<Value>, sep: &str| {
            let mut out = format!(r#"{{"type":{collection},{sep}"key":{key}"#);
            if let Some(v) = value {
                out.push_str(&format!(r#",{sep}"value":{v}"#));
            }
            if let Some(h) = headers {
                out.push_str(&format!(r#",{sep}"headers":{h}"#));
            }
            out.push('}');
            out.into_bytes()
        };
        match self {
            Row::Manifest { key, operation, value, spaced } => row(
                Value::from("manifest"),
                key.value(ROW_WORDS),
                value.as_ref().map(EntryParts::value),
                Some(json!({ "operation": operation.value(ROW_WORDS), "txid": "t" })),
                if *spaced { " " } else { "" },
            ),
            Row::Other { collection, key, operation, value } => row(
                collection.value(ROW_WORDS),
                key.value(ROW_WORDS),
                value.as_ref().map(Json::value),
                operation.as_ref().map(|op| json!({ "operation": op.value(ROW_WORDS) })),
                "",
            ),
            Row::Bytes(b) => b.clone(),
        }
    }
}

#[test]
fn fuzz_main_view_reads_any_row_as_its_general_path_does() {
    check!().with_type::<Vec<Row>>().for_each(|rows| {
        let (mut fast, mut general) = (MainView::default(), MainView::default());
        for row in rows {
            let bytes = row.bytes();
            fast.apply(&bytes);
            // A leading space skips the shortcuts for rows shaped as the server writes them.
            let mut spaced = b" ".to_vec();
            spaced.extend_from_slice(&bytes);
            general.apply(&spaced);
            assert_eq!(fast, general, "the shortcut and the general path disagree on {:?}", String::from_utf8_lossy(&bytes));
        }
        for (id, entry) in &fast.manifest {
            assert_eq!(&entry.id, id);
        }
        assert_eq!(fast.inbox.len(), fast.inbox_order.len());
        assert_eq!(fast.inbox.keys().collect::<BTreeSet<_>>(), fast.inbox_order.iter().collect::<BTreeSet<_>>());
    });
}

// -------------------------------------------------------------- multipart

const BOUNDARY: &str = "fuzz-boundary-Xq3";
const PART_NAMES: &[&str] =
    &["id", "mimeType", "filename", "subject", "subjectType", "subjectKey", "role", "meta", "key", "file", "other", ""];
const PART_VALUES: &[&str] = &[
    "a",
    "b",
    "x1",
    "input",
    "output",
    "text/plain",
    "image/png",
    r#"{"type":"inbox","key":"m"}"#,
    r#"{"type":"run"}"#,
    "{}",
    "[]",
    "inbox",
    "m",
    "",
    " ",
    ".",
    "a/b",
    "%",
    "\"",
    ";",
];

/// One part of a multipart body: any of its headers may be odd.
#[derive(Debug, Clone, TypeGenerator)]
struct Part {
    name: Option<Field>,
    filename: Option<Field>,
    content_type: Option<Field>,
    extra_headers: Vec<(Field, Field)>,
    value: Field,
}

/// A whole upload: parts, and whether the body is finished properly.
#[derive(Debug, Clone, TypeGenerator)]
struct Upload {
    parts: Vec<Part>,
    unfinished: bool,
    trailing: Vec<u8>,
}

impl Upload {
    /// The body, and the bytes of each part.
    fn body(&self) -> (Vec<u8>, Vec<Vec<u8>>) {
        let mut body = Vec::new();
        let mut values = Vec::new();
        for p in &self.parts {
            let mut head = String::from("Content-Disposition: form-data");
            let name = p.name.as_ref().map(|n| n.text(PART_NAMES));
            if let Some(n) = &name {
                head.push_str(&format!("; name=\"{n}\""));
            }
            if let Some(f) = &p.filename {
                head.push_str(&format!("; filename=\"{}\"", f.text(PART_VALUES)));
            }
            if let Some(ct) = &p.content_type {
                head.push_str(&format!("\r\nContent-Type: {}", ct.text(PART_VALUES)));
            }
            for (k, v) in &p.extra_headers {
                head.push_str(&format!("\r\n{}: {}", k.text(&["X-A", "Content-Type", "Content-Length"]), v.text(PART_VALUES)));
            }
            let value = p.value.text(PART_VALUES);
            body.extend_from_slice(format!("--{BOUNDARY}\r\n{head}\r\n\r\n").as_bytes());
            body.extend_from_slice(value.as_bytes());
            body.extend_from_slice(b"\r\n");
            values.push(value.into_bytes());
        }
        if !self.unfinished {
            body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
        }
        body.extend_from_slice(&self.trailing);
        (body, values)
    }
}

async fn listed(h: &Harness, entity: &str) -> BTreeMap<String, Value> {
    let res = h
        .ts
        .request(Method::GET, &format!("/_electric/entities{entity}/attachments"))
        .header(PRINCIPAL.0, PRINCIPAL.1)
        .send()
        .await
        .expect("the list is answered");
    assert_eq!(res.status(), StatusCode::OK);
    let body: Value = res.json().await.expect("the list is JSON");
    body["attachments"]
        .as_array()
        .expect("an array of attachments")
        .iter()
        .map(|e| (e["id"].as_str().expect("an id").to_owned(), e.clone()))
        .collect()
}

#[test]
fn fuzz_multipart_uploads_over_http() {
    const ENTITY: &str = "/fuzz/uploads";
    let h = Harness::start();
    h.rt.block_on(async {
        let res = h
            .ts
            .request(Method::PUT, &format!("/_electric/entities{ENTITY}"))
            .header(PRINCIPAL.0, PRINCIPAL.1)
            .send()
            .await
            .expect("spawn is answered");
        assert_eq!(res.status(), StatusCode::CREATED, "spawning {ENTITY}");
    });
    let hh = AssertUnwindSafe(&h);
    check!().with_type::<Upload>().for_each(|upload| {
        let (body, values) = upload.body();
        hh.rt.block_on(async {
            let before = listed(&hh, ENTITY).await;
            let res = hh
                .ts
                .request(Method::POST, &format!("/_electric/entities{ENTITY}/attachments"))
                .header(PRINCIPAL.0, PRINCIPAL.1)
                .header("content-type", format!("multipart/form-data; boundary={BOUNDARY}"))
                .body(body.clone())
                .send()
                .await
                .expect("an upload is answered");
            let status = res.status();
            let what = format!("{:?}", String::from_utf8_lossy(&body));
            assert_not_server_error(status, &what);
            if status == StatusCode::CREATED {
                let answer: Value = res.json().await.expect("a created upload answers JSON");
                let entry = &answer["attachment"];
                assert_eq!(entry["status"], "complete", "{answer}");
                let id = entry["id"].as_str().expect("an id");
                let read = hh
                    .ts
                    .request(Method::GET, &format!("/_electric/entities{ENTITY}/attachments/{id}"))
                    .header(PRINCIPAL.0, PRINCIPAL.1)
                    .send()
                    .await
                    .expect("the attachment is read");
                assert_eq!(read.status(), StatusCode::OK);
                let bytes = read.bytes().await.expect("its bytes");
                assert!(values.iter().any(|v| v.as_slice() == bytes.as_ref()), "{bytes:?} is the value of a part: {what}");
                assert_eq!(entry["byteLength"], bytes.len());
                // Free the id for later inputs.
                let del = hh
                    .ts
                    .request(Method::DELETE, &format!("/_electric/entities{ENTITY}/attachments/{id}"))
                    .header(PRINCIPAL.0, PRINCIPAL.1)
                    .send()
                    .await
                    .expect("the delete is answered");
                assert!(del.status().is_success(), "deleting {id}: {}", del.status());
            } else {
                assert!(status.is_client_error(), "{status} for {what}");
                let code = {
                    let bytes = res.bytes().await.expect("an error body");
                    let v: Value = serde_json::from_slice(&bytes).expect("an error body is JSON");
                    v["error"]["code"].as_str().expect("an error code").to_owned()
                };
                if code != "UPLOAD_INTERRUPTED" {
                    assert_eq!(listed(&hh, ENTITY).await, before, "a refused upload ({code}) changed the manifest: {what}");
                }
            }
        });
    });
    h.stop();
}

// -------------------------------------------------------------- WebSocket

const WS_WORDS: &[&str] = &["subscribe", "unsubscribe", "ping", "execute", "task.*", "*", "task.created", "-1", "now"];

/// A message a WebSocket client may send.
#[derive(Debug, Clone, TypeGenerator)]
enum WsMsg {
    Subscribe { events: Vec<Field>, offset: Option<Field> },
    Unsubscribe { events: Vec<Field> },
    Ping,
    Execute { request: Option<RpcMsg> },
    Object { action: Option<Field>, events: Option<Json> },
    Text(Vec<Piece>),
    Binary(Vec<u8>),
}

impl WsMsg {
    fn message(&self) -> Message {
        let events = |e: &[Field]| Value::Array(e.iter().map(|f| Value::from(f.text(WS_WORDS))).collect());
        let v = match self {
            WsMsg::Subscribe { events: e, offset } => {
                let mut v = json!({ "action": "subscribe", "events": events(e) });
                if let Some(o) = offset {
                    v["offset"] = o.value(&["-1", "now", "0000000000000000_0000000000000000", "x"]);
                }
                v
            }
            WsMsg::Unsubscribe { events: e } => json!({ "action": "unsubscribe", "events": events(e) }),
            WsMsg::Ping => json!({ "action": "ping" }),
            WsMsg::Execute { request } => match request {
                Some(r) => json!({ "action": "execute", "request": r.value() }),
                None => json!({ "action": "execute" }),
            },
            WsMsg::Object { action, events } => {
                let mut v = json!({});
                if let Some(a) = action {
                    v["action"] = a.value(WS_WORDS);
                }
                if let Some(e) = events {
                    v["events"] = e.value();
                }
                v
            }
            WsMsg::Text(p) => return Message::Text(render(p, &["{", "}", "\"action\":", "\"ping\"", "[", "]"]).into()),
            WsMsg::Binary(b) => return Message::Binary(b.clone().into()),
        };
        Message::Text(v.to_string().into())
    }
}

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The next JSON message from the server that is not a pushed event.
async fn next_reply(socket: &mut Socket) -> Value {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), socket.next())
            .await
            .expect("the server answers within 10 s")
            .expect("the socket stays open")
            .expect("a frame arrives");
        let text = match msg {
            Message::Text(t) => t.to_string(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected frame {other:?}"),
        };
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("a reply is JSON: {text}"));
        if v["type"] != "event" {
            return v;
        }
    }
}

/// What the server must answer to `msg` (checked on the replies before the next pong).
fn check_ws_replies(msg: &WsMsg, sent: &Message, replies: &[Value]) {
    let what = format!("{sent:?} -> {replies:?}");
    for r in replies {
        assert!(r["type"].is_string() || r["jsonrpc"] == "2.0", "{what}");
        if r["type"] == "error" {
            assert!(r["error"]["code"].is_i64() && r["error"]["message"].is_string(), "{what}");
        }
        if let Some(code) = r["error"]["code"].as_i64() {
            assert_ne!(code, -32603, "an internal error is a server fault: {what}");
        }
    }
    let text = match sent {
        Message::Text(t) => t.to_string(),
        Message::Binary(b) => String::from_utf8_lossy(b).into_owned(),
        _ => String::new(),
    };
    let parsed = serde_json::from_str::<Value>(&text).ok();
    match (msg, parsed) {
        (_, None) => assert!(replies.iter().any(|r| r["error"]["code"] == -32700), "{what}"),
        (WsMsg::Subscribe { events, offset }, Some(v)) => {
            let valid_offset = offset.is_none()
                || v["offset"].as_str().is_some_and(|o| ReadOffset::parse(Some(o)).is_ok())
                || !v["offset"].is_string();
            if valid_offset {
                let subscribed = replies.iter().find(|r| r["type"] == "subscribed").unwrap_or_else(|| panic!("{what}"));
                for e in events {
                    let e = e.text(WS_WORDS);
                    assert!(subscribed["events"].as_array().is_some_and(|a| a.contains(&Value::from(e.as_str()))), "{what}");
                }
            }
        }
        (WsMsg::Unsubscribe { .. }, Some(_)) => assert!(replies.iter().any(|r| r["type"] == "unsubscribed"), "{what}"),
        (WsMsg::Ping, Some(_)) => assert!(replies.iter().any(|r| r["type"] == "pong"), "{what}"),
        (WsMsg::Execute { request: None }, Some(_)) => {
            assert!(replies.iter().any(|r| r["error"]["code"] == -32602), "{what}")
        }
        _ => {}
    }
}

#[test]
fn fuzz_websocket_messages_over_a_socket() {
    let h = Harness::start();
    let hh = AssertUnwindSafe(&h);
    check!().with_type::<Vec<WsMsg>>().for_each(|msgs| {
        hh.rt.block_on(async {
            let url = hh.ts.url.replacen("http://", "ws://", 1) + "/ws";
            let mut req = url.into_client_request().expect("a WebSocket request");
            req.headers_mut().insert(PRINCIPAL.0, HeaderValue::from_static(PRINCIPAL.1));
            let (mut socket, _) = tokio_tungstenite::connect_async(req).await.expect("the WebSocket opens");
            assert_eq!(next_reply(&mut socket).await["type"], "connected");
            for (n, msg) in msgs.iter().take(16).enumerate() {
                let sent = msg.message();
                socket.send(sent.clone()).await.expect("a message is sent");
                // A barrier after each message: every reply to it comes before the barrier's.
                let marker = format!("barrier-{n}");
                let barrier = json!({ "action": "unsubscribe", "events": [marker] }).to_string();
                socket.send(Message::Text(barrier.into())).await.expect("the barrier is sent");
                let mut replies = Vec::new();
                loop {
                    let r = next_reply(&mut socket).await;
                    if r["type"] == "unsubscribed" && r["events"] == json!([marker]) {
                        break;
                    }
                    replies.push(r);
                }
                check_ws_replies(msg, &sent, &replies);
            }
            let _ = socket.close(None).await;
        });
    });
    h.stop();
}

// ------------------------------------------------ Durable Streams headers

const CONTENT_TYPES: &[&str] =
    &["application/json", "text/plain", "application/octet-stream", "Application/JSON; charset=utf-8", "nonsense", ""];
const HEADER_WORDS: &[&str] =
    &["0", "1", "3600", "-1", "+1", "01", "18446744073709551615", "2030-01-01T00:00:00Z", "true", "TRUE", "false", "a", "b"];

/// The headers of one request, each maybe absent or odd.
#[derive(Debug, Clone, TypeGenerator)]
struct StreamHeaders {
    content_type: Option<Field>,
    ttl: Option<Field>,
    expires_at: Option<Field>,
    seq: Option<Field>,
    producer: Option<(Field, Field, Field)>,
    closed: Option<Field>,
}

#[derive(Debug, Clone, TypeGenerator)]
struct StreamOps {
    create: StreamHeaders,
    json_stream: bool,
    appends: Vec<(StreamHeaders, Field)>,
}

/// Adds the headers `h` names; a value no HTTP client can send is left out.
fn with_headers(mut rb: reqwest::RequestBuilder, h: &StreamHeaders, json_stream: bool) -> reqwest::RequestBuilder {
    let default_ct = if json_stream { "application/json" } else { "text/plain" };
    let mut headers = vec![("content-type", h.content_type.as_ref().map_or(default_ct.to_owned(), |f| f.text(CONTENT_TYPES)))];
    for (name, f) in [("stream-ttl", &h.ttl), ("stream-expires-at", &h.expires_at), ("stream-seq", &h.seq), ("stream-closed", &h.closed)]
    {
        if let Some(f) = f {
            headers.push((name, f.text(HEADER_WORDS)));
        }
    }
    if let Some((id, epoch, seq)) = &h.producer {
        headers.push(("producer-id", id.text(HEADER_WORDS)));
        headers.push(("producer-epoch", epoch.text(HEADER_WORDS)));
        headers.push(("producer-seq", seq.text(HEADER_WORDS)));
    }
    for (name, value) in headers {
        if HeaderValue::from_str(&value).is_ok() {
            rb = rb.header(name, value);
        }
    }
    rb
}

#[test]
fn fuzz_stream_headers_over_http() {
    let h = Harness::start();
    let hh = AssertUnwindSafe(&h);
    let counter = std::sync::atomic::AtomicU64::new(0);
    check!().with_type::<StreamOps>().for_each(|ops| {
        let path = format!("/fuzz/streams/s{}", counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        hh.rt.block_on(async {
            let put = with_headers(hh.ts.request(Method::PUT, &path).header(PRINCIPAL.0, PRINCIPAL.1), &ops.create, ops.json_stream)
                .send()
                .await
                .expect("PUT is answered");
            let status = put.status();
            assert_not_server_error(status, &format!("PUT {ops:?}"));
            if status.is_client_error() {
                assert_client_error_shape(put, &format!("PUT {:?}", ops.create)).await;
                return;
            }
            let mut last_seq: Option<String> = None;
            let mut tail = Offset::ZERO;
            for (headers, body) in ops.appends.iter().take(12) {
                let body = body.text(&[r#"{"a":1}"#, "[1,2]", "[]", "x", ""]);
                let res = with_headers(hh.ts.request(Method::POST, &path).header(PRINCIPAL.0, PRINCIPAL.1), headers, ops.json_stream)
                    .body(body.clone())
                    .send()
                    .await
                    .expect("POST is answered");
                let status = res.status();
                let what = format!("POST {headers:?} {body:?}");
                assert_not_server_error(status, &what);
                if status.is_success() {
                    let next = header(&res, "stream-next-offset").expect("an append answers its next offset");
                    let next = Offset::parse(&next).expect("a minted offset parses");
                    assert!(next >= tail, "the tail never moves back");
                    tail = next;
                    let seq = headers.seq.as_ref().map(|f| f.text(HEADER_WORDS)).filter(|s| HeaderValue::from_str(s).is_ok());
                    if let (Some(seq), false) = (seq, body.is_empty()) {
                        if status == StatusCode::NO_CONTENT && headers.producer.is_none() {
                            if let Some(last) = &last_seq {
                                assert!(seq.as_bytes() > last.as_bytes(), "Stream-Seq {seq:?} after {last:?} was accepted");
                            }
                            last_seq = Some(seq);
                        }
                    }
                } else {
                    assert_client_error_shape(res, &what).await;
                }
            }
            let head = hh.ts.request(Method::HEAD, &path).header(PRINCIPAL.0, PRINCIPAL.1).send().await.expect("HEAD");
            if head.status() != StatusCode::NOT_FOUND || (ops.create.ttl.is_none() && ops.create.expires_at.is_none()) {
                assert_eq!(head.status(), StatusCode::OK, "only a stream with an expiry may be gone");
                let next = header(&head, "stream-next-offset").expect("HEAD answers the tail");
                assert!(Offset::parse(&next).expect("it parses") >= tail);
            }
        });
    });
    h.stop();
}

// ------------------------------------------------------------ read queries

const QUERY_WORDS: &[&str] = &[
    "offset=",
    "live=",
    "cursor=",
    "taskId=",
    "long-poll",
    "sse",
    "-1",
    "now",
    "0000000000000000_0000000000000000",
    "18446744073709551615",
    "&",
    "=",
    "%",
    "%2D1",
    "+",
];

#[test]
fn fuzz_read_queries_over_http() {
    let h = Harness::start();
    h.rt.block_on(async {
        for (method, body) in [(Method::PUT, ""), (Method::POST, r#"[{"a":1},{"b":2}]"#)] {
            let res = h
                .ts
                .request(method, "/fuzz/read")
                .header(PRINCIPAL.0, PRINCIPAL.1)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .expect("answered");
            assert!(res.status().is_success(), "{}", res.status());
        }
    });
    let hh = AssertUnwindSafe(&h);
    check!().with_type::<(Vec<Piece>, bool)>().for_each(|(pieces, events)| {
        let query = render(pieces, QUERY_WORDS);
        let path = if *events { "/_attache/events" } else { "/fuzz/read" };
        hh.rt.block_on(async {
            let url = format!("{}?{}", hh.ts.url(path), query);
            let Ok(url) = reqwest::Url::parse(&url) else { return };
            let sent = url.query().unwrap_or("").to_owned();
            let res = hh.ts.client.get(url).header(PRINCIPAL.0, PRINCIPAL.1).send().await.expect("a read is answered");
            let status = res.status();
            assert_not_server_error(status, &format!("GET {path}?{query}"));
            if status.is_client_error() {
                assert_client_error_shape(res, &format!("GET {path}?{query}")).await;
                return;
            }
            if let Some(next) = header(&res, "stream-next-offset") {
                assert!(Offset::parse(&next).is_ok(), "{next:?} is a minted offset");
            }
            if let Some(cursor) = header(&res, "stream-cursor") {
                let cursor: u64 = cursor.parse().expect("a cursor is a number");
                let echoed = attache_core::query::form_pairs(&sent)
                    .into_iter()
                    .filter(|(k, _)| k == "cursor")
                    .next_back()
                    .and_then(|(_, v)| v.parse::<u64>().ok());
                if let Some(echoed) = echoed {
                    assert!(cursor >= echoed, "cursor {cursor} behind the echoed {echoed}");
                }
            }
            // A live SSE read never ends by itself: drop it here.
            drop(res);
        });
    });
    h.stop();
}

// ------------------------------------------------- regressions found so far

/// Found by `fuzz_cursor_only_moves_forward` (attache-core): an echoed
/// cursor of u64::MAX overflowed (a panic in debug builds, a cursor that
/// went back to 0 in release ones).
#[tokio::test]
async fn a_long_poll_echoing_the_largest_cursor_is_answered_with_a_cursor_not_behind_it() {
    let ts = TestServer::start().await;
    for (method, body) in [(Method::PUT, ""), (Method::POST, "x")] {
        let res = ts
            .request(method, "/fuzz/cursor")
            .header(PRINCIPAL.0, PRINCIPAL.1)
            .header("content-type", "text/plain")
            .body(body)
            .send()
            .await
            .expect("answered");
        assert!(res.status().is_success(), "{}", res.status());
    }
    for live in ["long-poll", "sse"] {
        let res = ts
            .request(Method::GET, "/fuzz/cursor")
            .header(PRINCIPAL.0, PRINCIPAL.1)
            .query(&[("offset", "-1"), ("live", live), ("cursor", "18446744073709551615")])
            .send()
            .await
            .expect("the read is answered");
        assert_eq!(res.status(), StatusCode::OK, "{live}");
        let cursor = if live == "long-poll" {
            header(&res, "stream-cursor").expect("a long-poll answers a cursor")
        } else {
            // The first control event carries the cursor.
            let mut body = res.bytes_stream();
            let mut text = String::new();
            while !text.contains("streamCursor") {
                let chunk = tokio::time::timeout(Duration::from_secs(10), body.next())
                    .await
                    .expect("an SSE event within 10 s")
                    .expect("the stream stays open")
                    .expect("a chunk");
                text.push_str(&String::from_utf8_lossy(&chunk));
            }
            let at = text.find("\"streamCursor\":\"").expect("a cursor field") + "\"streamCursor\":\"".len();
            text[at..].split('"').next().expect("a cursor value").to_owned()
        };
        assert_eq!(cursor, u64::MAX.to_string(), "{live}");
    }
    ts.stop().await;
}

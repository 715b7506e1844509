//! A stream store against a model small enough to be obviously right,
//! shared by every backend's test (`engine_model.rs`, `postgres_model.rs`).
//!
//! Random sequences of creates, forks, appends, closes, deletes, paged reads
//! and restarts run against a `StreamStore` and against an in-memory model
//! (path → content, closed, lineage). After every step the result kind, the
//! bytes or messages read, and every stream's existence, closure and tail
//! must agree.
//!
//! The model knows nothing of how offsets are encoded. It learns each offset
//! the engine hands out (a tail, a read's next offset) together with the
//! position it means in model units (bytes, or messages in JSON mode), and
//! insists the mapping stays consistent: one offset, one position, and
//! offsets ordered like positions.
//!
//! Why one file of this size: the model, the operation generator and the comparison are one unit:
//! each operation's expected outcome sits beside how it is generated and applied, and both
//! backends' tests share it.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;

use attache_core::{ContentType, Offset, StreamPath};
use attache_storage::{AppendRequest, CreateOutcome, CreateStream, ForkSpec, ReadFrom, StoreError, StreamStore};
use bytes::Bytes;
use proptest::prelude::*;
use serde_json::Value;

const PATHS: [&str; 3] = ["/m/a", "/m/b", "/m/c"];
const BINARY: &str = "application/octet-stream";
const JSON: &str = "application/json";

// ---- operations ----

#[derive(Debug, Clone)]
pub enum Body {
    /// Bytes sent as `application/octet-stream`.
    Binary(Vec<u8>),
    /// One JSON value sent as `application/json` (an array is flattened once).
    Json(Value),
    /// Text that is not JSON, sent as `application/json`.
    BadJson(&'static str),
    /// Bytes with no content type at all.
    Untyped(Vec<u8>),
    /// Whichever of the two suits the stream it goes to: most appends should land.
    Fitting(Vec<u8>, Value),
}

impl Body {
    fn bytes(&self) -> Vec<u8> {
        match self {
            Body::Binary(b) | Body::Untyped(b) => b.clone(),
            Body::Json(v) => serde_json::to_vec(v).unwrap(),
            Body::BadJson(s) => s.as_bytes().to_vec(),
            Body::Fitting(..) => unreachable!("resolved before use"),
        }
    }

    fn content_type(&self) -> Option<&'static str> {
        match self {
            Body::Binary(_) => Some(BINARY),
            Body::Json(_) | Body::BadJson(_) => Some(JSON),
            Body::Untyped(_) => None,
            Body::Fitting(..) => unreachable!("resolved before use"),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub enum ReadStart {
    Start,
    Tail,
    /// The n-th (modulo) offset this stream has handed out.
    Learned(usize),
}

/// Which stream an operation addresses.
#[derive(Debug, Clone, Copy)]
pub enum Target {
    /// `PATHS[i]` (modulo), whatever is there.
    Path(usize),
    /// The i-th (modulo) stream the model holds as live, or `Path(i)` if none
    /// is: most operations should meet a stream, not a 404.
    Live(usize),
}

#[derive(Debug, Clone)]
pub enum Op {
    Create {
        path: Target,
        json: bool,
        closed: bool,
        initial: Body,
    },
    Fork {
        path: Target,
        source: Target,
        /// `None`: at the source's tail.
        at: Option<usize>,
        /// The fork's own first bytes, written after the fork point.
        initial: &'static str,
    },
    Append {
        path: Target,
        body: Body,
        close: bool,
    },
    Close {
        path: Target,
    },
    Delete {
        path: Target,
    },
    Read {
        path: Target,
        from: ReadStart,
        page: usize,
    },
    Restart,
}

pub fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i32>().prop_map(Value::from),
        "[a-z \"\\\\é]{0,6}".prop_map(Value::String),
    ];
    leaf.prop_recursive(2, 8, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
            prop::collection::btree_map("[a-z]{1,3}", inner, 0..3).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

pub fn body() -> impl Strategy<Value = Body> {
    prop_oneof![
        12 => (prop::collection::vec(any::<u8>(), 1..40), json_value())
            .prop_map(|(bytes, json)| Body::Fitting(bytes, json)),
        4 => prop::collection::vec(any::<u8>(), 0..40).prop_map(Body::Binary),
        4 => json_value().prop_map(Body::Json),
        1 => prop::sample::select(vec!["{", "[1,", "nope", "{\"a\":1} {\"b\":2}", "", "[]"])
            .prop_map(Body::BadJson),
        1 => prop::collection::vec(any::<u8>(), 1..8).prop_map(Body::Untyped),
    ]
}

pub fn path() -> impl Strategy<Value = Target> {
    prop_oneof![
        1 => (0..PATHS.len()).prop_map(Target::Path),
        3 => (0..PATHS.len()).prop_map(Target::Live),
    ]
}

pub fn any_path() -> impl Strategy<Value = Target> {
    (0..PATHS.len()).prop_map(Target::Path)
}

pub fn op() -> impl Strategy<Value = Op> {
    let from = prop_oneof![Just(ReadStart::Start), Just(ReadStart::Tail), any::<usize>().prop_map(ReadStart::Learned),];
    // A JSON stream is created with JSON (or not-quite-JSON) text, a binary one with bytes.
    let create = any::<bool>().prop_flat_map(|json| {
        let initial = if json {
            prop_oneof![
                json_value().prop_map(Body::Json),
                prop::sample::select(vec!["", "[]", "{", "[1,"]).prop_map(Body::BadJson),
            ]
            .boxed()
        } else {
            prop::collection::vec(any::<u8>(), 0..40).prop_map(Body::Binary).boxed()
        };
        (any_path(), Just(json), prop::bool::weighted(0.1), initial)
    });
    prop_oneof![
        6 => create.prop_map(|(path, json, closed, initial)| Op::Create { path, json, closed, initial }),
        2 => (any_path(), path(), prop::option::of(any::<usize>()))
            .prop_flat_map(|(path, source, at)| {
                let initial = prop::sample::select(vec!["", "", "", "7", "{"]);
                initial.prop_map(move |initial| Op::Fork { path, source, at, initial })
            }),
        12 => (path(), body(), prop::bool::weighted(0.03))
            .prop_map(|(path, body, close)| Op::Append { path, body, close }),
        1 => path().prop_map(|path| Op::Close { path }),
        1 => path().prop_map(|path| Op::Delete { path }),
        4 => (path(), from, 1usize..64).prop_map(|(path, from, page)| Op::Read { path, from, page }),
        1 => Just(Op::Restart),
    ]
}

// ---- outcomes ----

/// What a caller can tell apart, at the granularity the HTTP face maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    NotFound,
    Gone,
    Conflict,
    Closed,
    TypeMismatch,
    BadRequest,
    SourceNotFound,
    SourceGone,
}

pub fn kind(err: StoreError) -> Kind {
    match err {
        StoreError::NotFound => Kind::NotFound,
        StoreError::Gone => Kind::Gone,
        StoreError::ConfigMismatch(_) => Kind::Conflict,
        StoreError::Closed { .. } => Kind::Closed,
        StoreError::ContentTypeMismatch { .. } => Kind::TypeMismatch,
        StoreError::MissingContentType
        | StoreError::Invalid(_)
        | StoreError::Rule(_)
        | StoreError::ForkOffsetInsideMessage { .. } => Kind::BadRequest,
        StoreError::ForkSourceNotFound => Kind::SourceNotFound,
        StoreError::ForkSourceGone => Kind::SourceGone,
        other => panic!("the engine failed unexpectedly: {other}"),
    }
}

/// What a read returned, in model units.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    Bytes(Vec<u8>),
    Messages(Vec<Vec<u8>>),
}

// ---- the model ----

#[derive(Debug, Clone)]
pub struct ModelStream {
    json: bool,
    /// Binary streams: the bytes. JSON streams: empty.
    bytes: Vec<u8>,
    /// JSON streams: each message, exactly as serialised.
    messages: Vec<Vec<u8>>,
    closed: bool,
    /// (source path, the fork offset as requested).
    fork: Option<(usize, u64)>,
    forks: u32,
    soft_deleted: bool,
    /// Offsets learned from the engine → the position each means.
    learned: BTreeMap<u64, usize>,
}

impl ModelStream {
    fn new(json: bool) -> ModelStream {
        ModelStream {
            json,
            bytes: Vec::new(),
            messages: Vec::new(),
            closed: false,
            fork: None,
            forks: 0,
            soft_deleted: false,
            learned: BTreeMap::new(),
        }
    }

    fn units(&self) -> usize {
        if self.json {
            self.messages.len()
        } else {
            self.bytes.len()
        }
    }

    fn content_from(&self, units: usize) -> Content {
        if self.json {
            Content::Messages(self.messages[units..].to_vec())
        } else {
            Content::Bytes(self.bytes[units..].to_vec())
        }
    }

    fn tail_offset(&self) -> u64 {
        let units = self.units();
        *self.learned.iter().find(|(_, u)| **u == units).expect("the model always knows the tail's offset").0
    }

    /// Records that `offset` means position `units`, insisting on consistency.
    fn learn(&mut self, offset: u64, units: usize) {
        if let Some(known) = self.learned.get(&offset) {
            assert_eq!(*known, units, "offset {offset} changed meaning");
        }
        for (o, u) in &self.learned {
            assert_eq!(
                o.cmp(&offset),
                u.cmp(&units),
                "offsets {o} and {offset} are ordered unlike positions {u} and {units}"
            );
        }
        self.learned.insert(offset, units);
    }
}

/// The messages a JSON body carries, or why it is rejected.
fn model_messages(body: &Body, creating: bool) -> Result<Vec<Vec<u8>>, Kind> {
    match body {
        Body::Json(Value::Array(items)) if items.is_empty() && !creating => Err(Kind::BadRequest),
        Body::Json(Value::Array(items)) => Ok(items.iter().map(|v| serde_json::to_vec(v).unwrap()).collect()),
        Body::Json(v) => Ok(vec![serde_json::to_vec(v).unwrap()]),
        Body::BadJson("") if creating => Ok(Vec::new()),
        Body::BadJson("[]") if creating => Ok(Vec::new()),
        Body::BadJson(_) => Err(Kind::BadRequest),
        Body::Binary(b) | Body::Untyped(b) if b.is_empty() && creating => Ok(Vec::new()),
        Body::Binary(_) | Body::Untyped(_) => Err(Kind::BadRequest),
        Body::Fitting(..) => unreachable!("resolved before use"),
    }
}

#[derive(Default)]
pub struct Model {
    streams: HashMap<usize, ModelStream>,
}

impl Model {
    fn live(&self, path: usize) -> Result<&ModelStream, Kind> {
        match self.streams.get(&path) {
            None => Err(Kind::NotFound),
            Some(s) if s.soft_deleted => Err(Kind::Gone),
            Some(s) => Ok(s),
        }
    }

    /// The expected outcome of a create: `Ok(true)` if it creates.
    fn create(&self, path: usize, json: bool, closed: bool, initial: &Body) -> Result<bool, Kind> {
        if let Some(s) = self.streams.get(&path) {
            let same = !s.soft_deleted && s.fork.is_none() && s.json == json && s.closed == closed;
            return if same { Ok(false) } else { Err(Kind::Conflict) };
        }
        if json {
            model_messages(initial, true)?;
        }
        Ok(true)
    }

    fn apply_create(&mut self, path: usize, json: bool, closed: bool, initial: &Body) {
        let mut s = ModelStream::new(json);
        if json {
            s.messages = model_messages(initial, true).unwrap();
        } else {
            s.bytes = initial.bytes();
        }
        s.closed = closed;
        self.streams.insert(path, s);
    }

    /// The expected outcome of an append: `Ok(None)` if it changes nothing.
    fn append(&self, path: usize, body: &Body, close: bool) -> Result<Option<Vec<Vec<u8>>>, Kind> {
        let s = self.live(path)?;
        let bytes = body.bytes();
        if bytes.is_empty() && !close {
            return Err(Kind::BadRequest);
        }
        let type_matches = body.content_type().is_some_and(|ct| (ct == JSON) == s.json);
        let mut messages = Vec::new();
        if s.json && type_matches && !s.closed && !bytes.is_empty() {
            messages = model_messages(body, false)?;
        }
        if s.closed {
            return if bytes.is_empty() { Ok(None) } else { Err(Kind::Closed) };
        }
        if !bytes.is_empty() {
            match body.content_type() {
                None => return Err(Kind::BadRequest),
                Some(_) if !type_matches => return Err(Kind::TypeMismatch),
                Some(_) => {}
            }
        }
        Ok(Some(messages))
    }

    /// The expected outcome of a fork: the source's (offset, position) to fork at.
    fn fork(&self, path: usize, source: usize, at: Option<usize>, initial: &str) -> Result<(u64, usize), Kind> {
        let anchor = |src: &ModelStream| match at {
            None => (src.tail_offset(), src.units()),
            Some(n) => {
                let (o, u) = src.learned.iter().nth(n % src.learned.len()).unwrap();
                (*o, *u)
            }
        };
        if let Some(s) = self.streams.get(&path) {
            let src = self.streams.get(&source);
            let same = !s.soft_deleted
                && !s.closed
                && match (s.fork, at, src) {
                    (Some((from, _)), None, _) => from == source,
                    (Some((from, requested)), Some(_), Some(src)) => from == source && anchor(src).0 == requested,
                    _ => false,
                };
            return if same { Ok((0, 0)) } else { Err(Kind::Conflict) };
        }
        match self.streams.get(&source) {
            None => Err(Kind::SourceNotFound),
            Some(src) if src.soft_deleted => Err(Kind::SourceGone),
            Some(src) if src.json && initial == "{" => Err(Kind::BadRequest),
            Some(src) => Ok(anchor(src)),
        }
    }

    fn apply_fork(&mut self, path: usize, source: usize, (offset, units): (u64, usize), initial: &str) {
        let src = self.streams.get_mut(&source).unwrap();
        src.forks += 1;
        let mut s = ModelStream::new(src.json);
        if s.json {
            s.messages = src.messages[..units].to_vec();
        } else {
            s.bytes = src.bytes[..units].to_vec();
        }
        if s.json && !initial.is_empty() {
            s.messages.push(initial.as_bytes().to_vec());
        } else {
            s.bytes.extend_from_slice(initial.as_bytes());
        }
        // Below the fork point the fork shares the source's positions.
        s.learned = src.learned.range(..=offset).map(|(o, u)| (*o, *u)).collect();
        s.fork = Some((source, offset));
        self.streams.insert(path, s);
    }

    /// Deletes for good, or softly while forks read through the stream.
    fn remove(&mut self, path: usize) {
        let s = self.streams.get_mut(&path).unwrap();
        if s.forks > 0 {
            s.soft_deleted = true;
            return;
        }
        let s = self.streams.remove(&path).unwrap();
        if let Some((source, _)) = s.fork {
            let src = self.streams.get_mut(&source).unwrap();
            src.forks -= 1;
            if src.soft_deleted && src.forks == 0 {
                self.remove(source);
            }
        }
    }
}

// ---- the engine side ----

pub fn content_type(raw: &str) -> ContentType {
    ContentType::parse(raw).unwrap()
}

pub fn create_request(path: usize, json: bool, closed: bool, initial: &Body) -> CreateStream {
    CreateStream {
        path: StreamPath::new(PATHS[path]).unwrap(),
        content_type: Some(content_type(if json { JSON } else { BINARY })),
        ttl: None,
        expires_at: None,
        closed,
        initial: Bytes::from(initial.bytes()),
        fork: None,
        owner: None,
        take_kept_path: false,
    }
}

pub fn append_request(path: usize, body: &Body, close: bool) -> AppendRequest {
    AppendRequest {
        path: PATHS[path].to_owned(),
        content_type: body.content_type().map(content_type),
        body: Bytes::from(body.bytes()),
        close,
        seq: None,
        producer: None,
        messages: None,
    }
}

/// Opens the store under test over the same durable state each time it is
/// called (the first call starts empty): `Restart` closes it and calls again.
pub type Opener = Box<dyn FnMut() -> Pin<Box<dyn Future<Output = Box<dyn StreamStore>>>>>;

struct Harness {
    open: Opener,
    store: Option<Box<dyn StreamStore>>,
    model: Model,
    /// Restart without closing: the opener is called while the old store still runs.
    crash: bool,
}

impl Harness {
    async fn new(mut open: Opener) -> Harness {
        let store = open().await;
        Harness { open, store: Some(store), model: Model::default(), crash: false }
    }

    fn store(&self) -> &dyn StreamStore {
        self.store.as_deref().unwrap()
    }

    async fn restart(&mut self) {
        let store = self.store.take().unwrap();
        if self.crash {
            self.store = Some((self.open)().await);
            drop(store);
            return;
        }
        store.close().await;
        drop(store);
        self.store = Some((self.open)().await);
    }

    /// The index into `PATHS` a target means in the model's current state.
    fn at(&self, target: Target) -> usize {
        match target {
            Target::Path(i) => i % PATHS.len(),
            Target::Live(i) => {
                let live: Vec<usize> = (0..PATHS.len()).filter(|p| self.model.live(*p).is_ok()).collect();
                if live.is_empty() {
                    i % PATHS.len()
                } else {
                    live[i % live.len()]
                }
            }
        }
    }

    async fn step(&mut self, op: &Op) {
        match op {
            Op::Create { path, json, closed, initial } => {
                let path = &self.at(*path);
                let expected = self.model.create(*path, *json, *closed, initial);
                let got = self.store().create(create_request(*path, *json, *closed, initial)).await;
                match (expected, got) {
                    (Ok(true), Ok(CreateOutcome::Created(info))) => {
                        self.model.apply_create(*path, *json, *closed, initial);
                        let s = self.model.streams.get_mut(path).unwrap();
                        let units = s.units();
                        s.learn(0, 0);
                        s.learn(info.tail, units);
                    }
                    (Ok(false), Ok(CreateOutcome::Existed(_))) => {}
                    (Err(e), Err(g)) => assert_eq!(e, kind(g), "create"),
                    (expected, got) => panic!("create: expected {expected:?}, got {got:?}"),
                }
            }
            Op::Fork { path, source, at, initial } => {
                let (path, source) = (&self.at(*path), &self.at(*source));
                let expected = self.model.fork(*path, *source, *at, initial);
                // The source's n-th learned offset, when there is a source to ask.
                let offset = at.and_then(|n| {
                    let src = self.model.streams.get(source)?;
                    src.learned.keys().nth(n % src.learned.len()).map(|o| Offset(*o))
                });
                let got = self
                    .store()
                    .create(CreateStream {
                        path: StreamPath::new(PATHS[*path]).unwrap(),
                        content_type: None,
                        ttl: None,
                        expires_at: None,
                        closed: false,
                        initial: Bytes::from_static(initial.as_bytes()),
                        fork: Some(ForkSpec {
                            source: StreamPath::new(PATHS[*source]).unwrap(),
                            offset,
                            sub_offset: 0,
                        }),
                        owner: None,
                        take_kept_path: false,
                    })
                    .await;
                let existed = self.model.streams.contains_key(path);
                match (expected, got) {
                    (Ok(anchor), Ok(CreateOutcome::Created(info))) if !existed => {
                        self.model.apply_fork(*path, *source, anchor, initial);
                        let s = self.model.streams.get_mut(path).unwrap();
                        let units = s.units();
                        s.learn(info.tail, units);
                    }
                    (Ok(_), Ok(CreateOutcome::Existed(_))) if existed => {}
                    (Err(e), Err(g)) => assert_eq!(e, kind(g), "fork"),
                    (expected, got) => panic!("fork: expected {expected:?}, got {got:?}"),
                }
            }
            Op::Append { path, body, close } => {
                let path = &self.at(*path);
                let body = &match body {
                    Body::Fitting(bytes, json) => match self.model.streams.get(path) {
                        Some(s) if s.json => Body::Json(json.clone()),
                        _ => Body::Binary(bytes.clone()),
                    },
                    other => other.clone(),
                };
                let expected = self.model.append(*path, body, *close);
                let got = self.store().append(append_request(*path, body, *close)).await;
                match (expected, got) {
                    (Ok(None), Ok(outcome)) => {
                        let s = &self.model.streams[path];
                        assert_eq!(outcome.info.tail, s.tail_offset(), "a no-op append moved the tail");
                    }
                    (Ok(Some(messages)), Ok(outcome)) => {
                        let s = self.model.streams.get_mut(path).unwrap();
                        if s.json {
                            s.messages.extend(messages);
                        } else {
                            s.bytes.extend(body.bytes());
                        }
                        s.closed |= *close;
                        let units = s.units();
                        s.learn(outcome.info.tail, units);
                        assert_eq!(outcome.info.closed, s.closed);
                    }
                    (Err(Kind::Closed), Err(StoreError::Closed { next })) => {
                        let s = &self.model.streams[path];
                        assert_eq!(next.0, s.tail_offset(), "409 names the final offset");
                    }
                    (Err(e), Err(g)) => assert_eq!(e, kind(g), "append {body:?}"),
                    (expected, got) => panic!("append {body:?}: expected {expected:?}, got {got:?}"),
                }
            }
            Op::Close { path } => {
                let path = &self.at(*path);
                let expected = self.model.live(*path).map(|_| ());
                let got = self.store().append(append_request(*path, &Body::Binary(Vec::new()), true)).await;
                match (expected, got) {
                    (Ok(()), Ok(outcome)) => {
                        let s = self.model.streams.get_mut(path).unwrap();
                        s.closed = true;
                        assert!(outcome.info.closed);
                        assert_eq!(outcome.info.tail, s.tail_offset());
                    }
                    (Err(e), Err(g)) => assert_eq!(e, kind(g), "close"),
                    (expected, got) => panic!("close: expected {expected:?}, got {got:?}"),
                }
            }
            Op::Delete { path } => {
                let path = &self.at(*path);
                let expected = self.model.live(*path).map(|_| ());
                let got = self.store().delete(PATHS[*path]).await;
                match (expected, got) {
                    (Ok(()), Ok(())) => self.model.remove(*path),
                    (Err(e), Err(g)) => assert_eq!(e, kind(g), "delete"),
                    (expected, got) => panic!("delete: expected {expected:?}, got {got:?}"),
                }
            }
            Op::Read { path, from, page } => self.read(self.at(*path), *from, *page).await,
            Op::Restart => self.restart().await,
        }
        self.check_all().await;
    }

    /// Reads `path` from `from` in pages of about `page` bytes until caught up.
    async fn read(&mut self, path: usize, from: ReadStart, page: usize) {
        let expected = self.model.live(path).map(|s| {
            let (offset, units) = match from {
                ReadStart::Start => (0, 0),
                ReadStart::Tail => (s.tail_offset(), s.units()),
                ReadStart::Learned(n) => {
                    let (o, u) = s.learned.iter().nth(n % s.learned.len()).unwrap();
                    (*o, *u)
                }
            };
            (offset, units, s.content_from(units))
        });
        let (mut offset, mut units, expected) = match expected {
            Ok(e) => e,
            Err(e) => {
                let got = self.store().read(PATHS[path], ReadFrom::Start, page);
                assert_eq!(Err(e), got.await.map(|_| ()).map_err(kind), "read");
                return;
            }
        };
        let json = self.model.streams[&path].json;
        let mut got = if json { Content::Messages(Vec::new()) } else { Content::Bytes(Vec::new()) };
        let start = if matches!(from, ReadStart::Start) { ReadFrom::Start } else { ReadFrom::At(Offset(offset)) };
        let mut batch = self.store().read(PATHS[path], start, page).await.unwrap();
        loop {
            assert_eq!(batch.start.0, offset, "a page starts where asked");
            match &mut got {
                Content::Bytes(b) => {
                    assert!(batch.byte_len() <= page, "a page is at most its size");
                    b.extend(batch.messages().iter().flat_map(|c| c.iter().copied()));
                    units += batch.byte_len();
                }
                Content::Messages(m) => {
                    m.extend(batch.messages().iter().map(|c| c.to_vec()));
                    units += batch.messages().len();
                }
            }
            offset = batch.next.0;
            let s = self.model.streams.get_mut(&path).unwrap();
            s.learn(offset, units);
            assert_eq!(batch.at_closed_end(), s.closed && batch.up_to_date());
            if batch.up_to_date() {
                break;
            }
            assert!(!batch.is_empty(), "a page that is not the last makes progress");
            batch = self.store().read(PATHS[path], ReadFrom::At(Offset(offset)), page).await.unwrap();
        }
        assert_eq!(got, expected, "read of {} from {from:?}", PATHS[path]);
    }

    /// Every path exists, is gone, or is absent exactly as the model says,
    /// with the same closure, tail and whole content.
    async fn check_all(&mut self) {
        for (i, path) in PATHS.iter().enumerate() {
            let head = self.store().head(path).await;
            match self.model.live(i) {
                Ok(s) => {
                    let info = head.unwrap_or_else(|e| panic!("HEAD {path}: {e}"));
                    assert_eq!(info.closed, s.closed, "{path} closed");
                    assert_eq!(info.tail, s.tail_offset(), "{path} tail");
                    assert_eq!(info.is_json(), s.json, "{path} mode");
                    let content = s.content_from(0);
                    let batch = self.store().read(path, ReadFrom::Start, 1 << 20).await.unwrap();
                    let got = if batch.json {
                        Content::Messages(batch.messages().iter().map(|c| c.to_vec()).collect())
                    } else {
                        Content::Bytes(batch.messages().iter().flat_map(|c| c.to_vec()).collect())
                    };
                    assert_eq!(got, content, "{path} content");
                    assert!(batch.up_to_date());
                    // The same read as it goes out (a file range where the store leaves it in one).
                    let sent = self.store().read_sendable(path, ReadFrom::Start, 1 << 20).await.unwrap();
                    assert_eq!((sent.start, sent.next, sent.json), (batch.start, batch.next, batch.json), "{path}");
                    let body: Vec<u8> = match &sent.body {
                        attache_storage::ReadBody::Bytes(b) => b.to_vec(),
                        attache_storage::ReadBody::File(f) => {
                            use futures::StreamExt as _;
                            f.chunks().map(|c| c.unwrap()).collect::<Vec<_>>().await.concat()
                        }
                    };
                    assert_eq!(body, batch.body.to_vec(), "{path}: the read as it goes out");
                }
                Err(e) => assert_eq!(Err(e), head.map(|_| ()).map_err(kind), "HEAD {path}"),
            }
        }
        let listed: Vec<String> =
            self.store().list_prefix("/m/", 100).await.into_iter().map(|i| i.path.to_string()).collect();
        let mut live: Vec<String> =
            (0..PATHS.len()).filter(|i| self.model.live(*i).is_ok()).map(|i| PATHS[i].to_owned()).collect();
        live.sort();
        assert_eq!(listed, live, "list_prefix");
    }
}
/// Runs `ops` against a fresh store from `open` and the model, checking after each step.
pub fn run_with(ops: &[Op], open: Opener) {
    run_harness(ops, open, false);
}

/// As [`run_with`], but each `Restart` is a crash: `open` is called while the
/// previous store still runs, never closed (it opens a copy of the files as a
/// crash would leave them).
#[allow(dead_code)] // Used by the embedded engine's test, not by every test crate that includes the model.
pub fn run_with_crashes(ops: &[Op], open: Opener) {
    run_harness(ops, open, true);
}

fn run_harness(ops: &[Op], open: Opener, crash: bool) {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let mut harness = Harness::new(open).await;
        harness.crash = crash;
        for op in ops {
            harness.step(op).await;
        }
        harness.store().close().await;
    });
}

// Cases worth keeping whatever the random search finds.

pub fn create(path: usize, json: bool, initial: Body) -> Op {
    Op::Create { path: Target::Path(path), json, closed: false, initial }
}

pub fn fork(path: usize, source: usize, initial: &'static str) -> Op {
    Op::Fork { path: Target::Path(path), source: Target::Path(source), at: None, initial }
}

pub fn append(path: usize, bytes: &[u8]) -> Op {
    Op::Append { path: Target::Path(path), body: Body::Binary(bytes.to_vec()), close: false }
}

pub fn delete(path: usize) -> Op {
    Op::Delete { path: Target::Path(path) }
}

pub fn read(path: usize, from: ReadStart) -> Op {
    Op::Read { path: Target::Path(path), from, page: 3 }
}

pub fn a_fork_that_fails_does_not_keep_its_source_alive() -> Vec<Op> {
    vec![
        create(0, true, Body::Json(Value::from(1))),
        // The fork's own body is not JSON: no fork exists afterwards...
        fork(1, 0, "{"),
        // ...so deleting the source removes it for good (404, not 410).
        delete(0),
    ]
}

pub fn fork_chains_read_through_deleted_sources_across_restarts() -> Vec<Op> {
    vec![
        create(0, false, Body::Binary(b"abc".to_vec())),
        append(0, b"def"),
        fork(1, 0, "g"),
        append(0, b"XYZ"),
        fork(2, 1, ""),
        append(2, b"hij"),
        delete(0),
        delete(1),
        read(2, ReadStart::Learned(3)),
        Op::Restart,
        read(2, ReadStart::Start),
        delete(2),
        Op::Restart,
    ]
}

//! Fuzz targets for every parser in attache-core that reads network input:
//! offsets and cursors, Durable Streams headers (TTL, Expires-At, content
//! types, producer headers, stream paths), JSON-mode bodies, State Protocol
//! rows and manifest entries, entity URLs, principal keys and query strings.
//!
//! Each target is a `bolero::check!()`: under `cargo test` it runs as an
//! ordinary test on stable Rust with random inputs for about a second
//! (bolero's default), so CI runs every target on every build. Each asserts
//! the parser's property (round trips, what a parse implies), not only that
//! it does not panic; inputs are bounded (bolero's 4 KiB by default).
//!
//! Longer runs:
//! - random inputs, any toolchain: `BOLERO_RANDOM_TEST_TIME_MS=60000 cargo test -p attache-core --test fuzz_parsers`
//!   (per target; `BOLERO_RANDOM_ITERATIONS=N` counts inputs instead);
//! - coverage-guided (libfuzzer, nightly): `cargo bolero test -p attache-core --test fuzz_parsers <target> -T 60s`.
//!
//! A failure prints the input and `BOLERO_RANDOM_SEED=..`; setting that
//! variable replays it.
//!
//! String inputs are mostly built from [`Piece`]s: words of the grammar under
//! test mixed with numbers and arbitrary characters, so random inputs get past
//! the first check of a parser as often as they fail it.

use attache_core::entity::{EntityStream, EntityUrl};
use attache_core::json::{split_messages, JsonBodyUse};
use attache_core::manifest::{validate_attachment_id, ManifestEntry, Subject, SUBJECT_TYPES};
use attache_core::principal::{encode_uri_component, percent_decode_strict, PrincipalKey};
use attache_core::producer::MAX_SAFE_INTEGER;
use attache_core::query::{form_pairs, percent_decode};
use attache_core::state::ChangeEvent;
use attache_core::stream::expiry_deadline_ms;
use attache_core::{ContentType, Cursor, ExpiresAt, Offset, ProducerHeaders, ReadOffset, StreamPath, Ttl};
use bolero::check;
use bolero::generator::{produce, TypeGenerator};
use serde_json::Value;

/// One piece of a generated string.
#[derive(Debug, Clone, TypeGenerator)]
enum Piece {
    /// A word of the grammar under test (index into its word list).
    Word(u8),
    /// A decimal number.
    Number(u64),
    /// A small decimal number (more likely to be in range).
    Small(u8),
    /// Any character.
    Char(char),
    /// An ASCII byte (punctuation and controls included).
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

/// A JSON value, generated; numbers are integers so values compare exactly.
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

/// True when a JSON value holds a non-integer number (which `serde_json`
/// does not promise to read back bit-exactly without `float_roundtrip`).
fn has_float(v: &Value) -> bool {
    match v {
        Value::Number(n) => n.is_f64(),
        Value::Array(items) => items.iter().any(has_float),
        Value::Object(map) => map.values().any(has_float),
        _ => false,
    }
}

// ---------------------------------------------------------------- offsets

const OFFSET_WORDS: &[&str] = &["0000000000000000", "_", "-1", "now", "0", "9", "+", " ", "00000000"];

#[test]
fn fuzz_offset_round_trips() {
    check!().with_type::<u64>().cloned().for_each(|n| {
        let n = n % (Offset::MAX + 1);
        let text = Offset(n).to_string();
        assert_eq!(Offset::parse(&text), Ok(Offset(n)));
        assert_eq!(ReadOffset::parse(Some(&text)), Ok(ReadOffset::At(Offset(n))));
    });
}

#[test]
fn fuzz_offset_parse_accepts_only_canonical_text() {
    check!().with_type::<Vec<Piece>>().for_each(|pieces| {
        let text = render(pieces, OFFSET_WORDS);
        if let Ok(offset) = Offset::parse(&text) {
            assert_eq!(offset.to_string(), text, "an accepted offset is the one the server mints");
            assert!(offset.0 <= Offset::MAX);
        }
        match ReadOffset::parse(Some(&text)) {
            Ok(ReadOffset::Start) => assert_eq!(text, "-1"),
            Ok(ReadOffset::Now) => assert_eq!(text, "now"),
            Ok(ReadOffset::At(o)) => assert_eq!(o.to_string(), text),
            Err(_) => {}
        }
    });
}

#[test]
fn fuzz_cursor_only_moves_forward() {
    const EPOCH: i64 = 1_728_432_000;
    check!().with_type::<(u32, Vec<Piece>, u16)>().for_each(|(since_epoch, echoed, jitter)| {
        let now = EPOCH + i64::from(*since_epoch);
        let jitter = u64::from(*jitter) % 3600 + 1;
        let echoed = render(echoed, &["0", "1", "9", "18446744073709551615", "-", "+"]);
        let current = Cursor::next(now, None, jitter);
        let next = Cursor::next(now, Some(&echoed), jitter);
        assert!(next >= current, "a cursor never goes back in time");
        if let Ok(client) = echoed.parse::<u64>() {
            if client >= current.0 {
                assert!(next.0 > client || client == u64::MAX, "{echoed} -> {next}");
                assert!(next.0 >= client);
            }
        }
    });
}

// ------------------------------------------------------- stream headers

const HEADER_WORDS: &[&str] = &[
    "0",
    "1",
    "application/json",
    "text/plain",
    "application/octet-stream",
    ";",
    "charset=utf-8",
    "/",
    " ",
    "2030-01-01T00:00:00Z",
    "T",
    "Z",
    "+02:00",
    ".",
    "..",
    "-",
    ":",
];

#[test]
fn fuzz_ttl_accepts_only_canonical_decimals() {
    check!().with_type::<Vec<Piece>>().for_each(|pieces| {
        let text = render(pieces, HEADER_WORDS);
        if let Ok(Ttl(secs)) = Ttl::parse(&text) {
            assert_eq!(secs.to_string(), text);
        }
    });
    check!().with_type::<u64>().cloned().for_each(|secs| {
        assert_eq!(Ttl::parse(&secs.to_string()), Ok(Ttl(secs)));
    });
}

#[test]
fn fuzz_expires_at_keeps_what_the_client_wrote() {
    check!().with_type::<Vec<Piece>>().for_each(|pieces| {
        let text = render(pieces, HEADER_WORDS);
        if let Ok(at) = ExpiresAt::parse(&text) {
            assert_eq!(at.raw, text.trim());
            assert_eq!(ExpiresAt::parse(&at.raw), Ok(at.clone()));
            assert_eq!(expiry_deadline_ms(None, Some(&at), 0), Some(at.unix_ms));
        }
    });
}

#[test]
fn fuzz_content_type_parse_is_stable() {
    check!().with_type::<Vec<Piece>>().for_each(|pieces| {
        let text = render(pieces, HEADER_WORDS);
        if let Ok(ct) = ContentType::parse(&text) {
            assert_eq!(ContentType::parse(ct.as_str()).as_ref(), Ok(&ct), "parsing what was kept changes nothing");
            assert!(ct.matches(&ct));
            let media = ct.media_type();
            assert!(!media.is_empty() && media.contains('/'));
            assert_eq!(media, media.to_ascii_lowercase());
            assert_eq!(ct.is_json(), media == "application/json");
        }
    });
}

#[test]
fn fuzz_stream_path_refuses_what_it_promises_to() {
    check!().with_type::<Vec<Piece>>().for_each(|pieces| {
        let text = render(pieces, &["/", ".", "..", "a", "%2e", "\n", "chat", "main"]);
        if let Ok(path) = StreamPath::new(text.clone()) {
            assert_eq!(path.as_str(), text);
            assert!(text.starts_with('/') && text.len() >= 2 && text.len() <= StreamPath::MAX_LEN);
            assert!(!text.chars().any(char::is_control));
            assert!(!text.split('/').any(|s| s == "." || s == ".."));
        }
    });
}

#[test]
fn fuzz_producer_headers() {
    check!().with_type::<(Option<Vec<Piece>>, Option<Vec<Piece>>, Option<Vec<Piece>>)>().for_each(
        |(id, epoch, seq)| {
            let words = &["p", "0", "1", "9007199254740991", "9007199254740992", "-", " ", "\n"];
            let (id, epoch, seq) = (
                id.as_ref().map(|p| render(p, words)),
                epoch.as_ref().map(|p| render(p, words)),
                seq.as_ref().map(|p| render(p, words)),
            );
            let parsed = ProducerHeaders::parse(id.as_deref(), epoch.as_deref(), seq.as_deref());
            match (&id, &epoch, &seq) {
                (None, None, None) => assert_eq!(parsed, Ok(None)),
                (Some(id), Some(epoch), Some(seq)) => {
                    if let Ok(Some(p)) = &parsed {
                        assert_eq!(&p.id, id);
                        assert!(!id.is_empty() && id.len() <= 256);
                        assert_eq!(epoch.parse::<u64>().ok(), Some(p.epoch));
                        assert_eq!(seq.parse::<u64>().ok(), Some(p.seq));
                        assert!(p.epoch <= MAX_SAFE_INTEGER && p.seq <= MAX_SAFE_INTEGER);
                    }
                }
                _ => assert!(parsed.is_err(), "the three headers come together"),
            }
        },
    );
    check!().with_type::<(u64, u64)>().cloned().for_each(|(epoch, seq)| {
        let parsed = ProducerHeaders::parse(Some("p"), Some(&epoch.to_string()), Some(&seq.to_string()));
        if epoch <= MAX_SAFE_INTEGER && seq <= MAX_SAFE_INTEGER {
            assert_eq!(parsed, Ok(Some(ProducerHeaders { id: "p".into(), epoch, seq })));
        } else {
            assert!(parsed.is_err());
        }
    });
}

// ------------------------------------------------------------ JSON mode

#[test]
fn fuzz_json_split_then_rejoin_preserves_each_message() {
    check!().for_each(|body: &[u8]| {
        for usage in [JsonBodyUse::Create, JsonBodyUse::Append] {
            let Ok(messages) = split_messages(body, usage) else { continue };
            for m in &messages {
                assert!(serde_json::from_slice::<Value>(m).is_ok(), "each message is one JSON value");
            }
            let trimmed = std::str::from_utf8(body).unwrap().trim_matches(|c: char| c.is_ascii_whitespace());
            if !trimmed.starts_with('[') && !trimmed.is_empty() {
                assert_eq!(messages, vec![trimmed.as_bytes()]);
            }
            if !messages.is_empty() {
                let rejoined = rejoin(&messages, &[]);
                assert_eq!(split_messages(&rejoined, JsonBodyUse::Append).unwrap(), messages);
            }
        }
    });
}

fn rejoin(messages: &[&[u8]], spaces: &[u8]) -> Vec<u8> {
    let ws = |i: usize| [&b" "[..], b"\n", b"\t", b"\r", b""][spaces.get(i).copied().unwrap_or(4) as usize % 5];
    let mut out = b"[".to_vec();
    for (i, m) in messages.iter().enumerate() {
        if i > 0 {
            out.extend_from_slice(ws(2 * i));
            out.push(b',');
        }
        out.extend_from_slice(ws(2 * i + 1));
        out.extend_from_slice(m);
    }
    out.push(b']');
    out
}

#[test]
fn fuzz_json_split_keeps_generated_messages_byte_for_byte() {
    check!().with_type::<(Vec<Json>, Vec<u8>, bool)>().for_each(|(values, spaces, pretty)| {
        let texts: Vec<String> = values
            .iter()
            .map(|v| {
                let v = v.value();
                if *pretty {
                    serde_json::to_string_pretty(&v).unwrap()
                } else {
                    serde_json::to_string(&v).unwrap()
                }
            })
            .collect();
        let messages: Vec<&[u8]> = texts.iter().map(|t| t.as_bytes()).collect();
        let body = rejoin(&messages, spaces);
        match split_messages(&body, JsonBodyUse::Append) {
            Ok(parts) => assert_eq!(parts, messages),
            Err(_) => assert!(messages.is_empty(), "only an empty array is refused"),
        }
        for (text, json) in texts.iter().zip(values) {
            assert_eq!(split_messages(text.as_bytes(), JsonBodyUse::Create).unwrap().len(), {
                // A lone array is flattened one level; anything else is one message.
                match json {
                    Json::Array(items) => items.len(),
                    _ => 1,
                }
            });
        }
    });
}

// ------------------------------------------------- State Protocol rows

fn row_words() -> Vec<String> {
    let mut words: Vec<String> = [
        r#"{"type":"manifest","key":"attachment:a","value":"#,
        r#","headers":{"operation":"insert"}}"#,
        r#""headers":{"operation":"delete","txid":"t","timestamp":"2026-01-01T00:00:00Z"}"#,
        r#"{"key":"attachment:a","kind":"attachment","id":"a","streamPath":"/c/x/attachments/a","status":"complete","role":"input","mimeType":"text/plain","createdAt":"2026"}"#,
        r#""subject":{"type":"inbox","key":"m"}"#,
        r#""byteLength":3"#,
        r#""meta":{}"#,
        r#""name":"n""#,
        "null",
        "{",
        "}",
        "[",
        "]",
        ",",
        ":",
        "\"",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    words.push(r#""status":"pending""#.into());
    words
}

/// A row a server could read back: parse, write, parse again gives the same row.
fn assert_row_round_trips(bytes: &[u8]) {
    if let Ok(row) = serde_json::from_slice::<ChangeEvent>(bytes) {
        if row.value.as_ref().is_some_and(has_float) {
            return;
        }
        let again: ChangeEvent = serde_json::from_slice(&serde_json::to_vec(&row).unwrap()).unwrap();
        assert_eq!(again, row);
    }
    if let Ok(entry) = serde_json::from_slice::<ManifestEntry>(bytes) {
        if entry.meta.iter().flat_map(|m| m.values()).chain(entry.ext.values()).any(has_float) {
            return;
        }
        let text = serde_json::to_string(&entry).unwrap();
        let again: ManifestEntry = serde_json::from_str(&text).unwrap();
        assert_eq!(again, entry, "{text}");
    }
}

#[test]
fn fuzz_state_rows_round_trip() {
    let words = row_words();
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    check!().with_type::<Vec<Piece>>().for_each(|pieces| assert_row_round_trips(render(pieces, &words).as_bytes()));
    check!().for_each(|bytes: &[u8]| assert_row_round_trips(bytes));
}

/// A State Protocol row, generated field by field; any field may be missing or mistyped.
#[derive(Debug, Clone, TypeGenerator)]
struct RowParts {
    collection: Option<Field>,
    key: Option<Field>,
    value: Option<Json>,
    operation: Option<Field>,
    headers_missing: bool,
    txid: Option<Field>,
    timestamp: Option<Field>,
    extra: Vec<(String, Json)>,
}

/// A field's value: usually a string, sometimes another JSON value.
#[derive(Debug, Clone, TypeGenerator)]
enum Field {
    Word(u8),
    Text(String),
    Other(Json),
}

impl Field {
    fn value(&self) -> Value {
        const WORDS: &[&str] = &["manifest", "inbox", "event", "run", "insert", "update", "delete", "attachment:a"];
        match self {
            Field::Word(i) => Value::from(WORDS[*i as usize % WORDS.len()]),
            Field::Text(s) => Value::from(s.as_str()),
            Field::Other(j) => j.value(),
        }
    }
}

#[test]
fn fuzz_generated_state_rows_parse_exactly_when_well_formed() {
    check!().with_type::<RowParts>().for_each(|r| {
        let mut row = serde_json::Map::new();
        for (k, v) in &r.extra {
            row.insert(k.clone(), v.value());
        }
        let mut set = |name: &str, v: Option<Value>| match v {
            Some(v) => row.insert(name.into(), v),
            None => row.remove(name),
        };
        set("type", r.collection.as_ref().map(Field::value));
        set("key", r.key.as_ref().map(Field::value));
        set("value", r.value.as_ref().map(Json::value));
        let mut headers = serde_json::Map::new();
        for (name, f) in [("operation", &r.operation), ("txid", &r.txid), ("timestamp", &r.timestamp)] {
            if let Some(f) = f {
                headers.insert(name.into(), f.value());
            }
        }
        set("headers", (!r.headers_missing).then_some(Value::Object(headers.clone())));
        let text = Value::Object(row.clone()).to_string();
        let string_or_absent = |v: Option<&Value>| v.is_none_or(|v| v.is_string() || v.is_null());
        let well_formed = row.get("type").is_some_and(Value::is_string)
            && row.get("key").is_some_and(Value::is_string)
            && !r.headers_missing
            && headers.get("operation").is_some_and(Value::is_string)
            && string_or_absent(headers.get("txid"))
            && string_or_absent(headers.get("timestamp"));
        let parsed = serde_json::from_str::<ChangeEvent>(&text);
        assert_eq!(parsed.is_ok(), well_formed, "{text}");
        assert_row_round_trips(text.as_bytes());
    });
}

#[test]
fn fuzz_generated_manifest_entries_round_trip() {
    check!().with_type::<(Vec<(String, Json)>, Option<(String, String)>, Option<u64>, Option<String>)>().for_each(
        |(fields, subject, byte_length, filename)| {
            let mut v = serde_json::json!({
                "key": "attachment:a", "kind": "attachment", "id": "a", "streamPath": "/c/x/attachments/a",
                "status": "complete", "role": "output", "mimeType": "text/plain", "createdAt": "2026-01-01T00:00:00.000Z",
            });
            let obj = v.as_object_mut().unwrap();
            for (k, val) in fields {
                obj.insert(k.clone(), val.value());
            }
            if let Some((t, k)) = subject {
                obj.insert("subject".into(), serde_json::json!({"type": t, "key": k}));
            }
            if let Some(n) = byte_length {
                obj.insert("byteLength".into(), Value::from(*n));
            }
            if let Some(f) = filename {
                obj.insert("filename".into(), Value::from(f.as_str()));
            }
            assert_row_round_trips(v.to_string().as_bytes());
        },
    );
}

#[test]
fn fuzz_subject_and_attachment_id_validation() {
    check!().with_type::<Vec<Piece>>().for_each(|pieces| {
        let text = render(pieces, &[r#"{"type":"#, r#","key":"#, "}", "\"inbox\"", "\"run\"", "\"m\"", "\"", "\\n"]);
        if let Ok(s) = Subject::parse_json(&text) {
            assert!(SUBJECT_TYPES.contains(&s.kind.as_str()));
            assert!(!s.key.is_empty() && s.key.len() <= 256 && !s.key.chars().any(char::is_control));
        }
        if validate_attachment_id(&text).is_ok() {
            assert!(!text.is_empty() && text.len() <= 128 && !text.starts_with('.'));
            assert!(!text.contains(['/', '\\', '%']) && !text.chars().any(char::is_control));
        }
    });
}

// ---------------------------------------------- entity URLs, principals

const NAME_WORDS: &[&str] = &["/", "chat", "abc", "_", "*", ".", "%2F", "\\", "main", "attachments", ":", "user"];

#[test]
fn fuzz_entity_urls_round_trip() {
    check!().with_type::<(Vec<Piece>, Vec<Piece>, Vec<Piece>)>().for_each(|(t, i, a)| {
        let (t, i, a) = (render(t, NAME_WORDS), render(i, NAME_WORDS), render(a, NAME_WORDS));
        if let Ok(entity) = EntityUrl::new(&t, &i) {
            assert_eq!(EntityUrl::parse(&entity.to_string()).as_ref(), Ok(&entity));
            assert_eq!(EntityUrl::owning(&entity.main_stream()), Some((entity.clone(), EntityStream::Main)));
            assert!(StreamPath::new(entity.main_stream()).is_ok(), "an entity's stream is a valid stream path");
            if validate_attachment_id(&a).is_ok() {
                let path = entity.attachment_stream(&a);
                assert_eq!(EntityUrl::owning(&path), Some((entity.clone(), EntityStream::Attachment(a.clone()))));
                assert!(StreamPath::new(path).is_ok());
            }
        }
    });
    check!().with_type::<Vec<Piece>>().for_each(|pieces| {
        let text = render(pieces, NAME_WORDS);
        if let Ok(entity) = EntityUrl::parse(&text) {
            assert_eq!(entity.to_string(), text);
        }
        if let Some((entity, stream)) = EntityUrl::owning(&text) {
            let rebuilt = match &stream {
                EntityStream::Main => entity.main_stream(),
                EntityStream::Attachment(id) => entity.attachment_stream(id),
            };
            assert_eq!(rebuilt, text, "the owner of a path names that path");
        }
    });
}

const PRINCIPAL_WORDS: &[&str] =
    &["user:", "agent:", "system:", "service:", "/principal/", "%3A", "%", "%2", "%+1", ":", "sam", " ", "/"];

#[test]
fn fuzz_principal_keys_round_trip() {
    check!().with_type::<Vec<Piece>>().for_each(|pieces| {
        let text = render(pieces, PRINCIPAL_WORDS);
        if let Ok(p) = PrincipalKey::parse(&text) {
            assert_eq!(PrincipalKey::parse(&p.url()).as_ref(), Ok(&p));
            assert_eq!(PrincipalKey::parse(&p.to_string()).as_ref(), Ok(&p));
            assert!(!p.id().is_empty() && p.id().len() <= 256);
        }
    });
}

/// What strict percent-decoding accepts: every `%` starts two hex digits.
fn well_formed_escapes(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            if !b.get(i + 1..i + 3).is_some_and(|p| p.iter().all(u8::is_ascii_hexdigit)) {
                return false;
            }
            i += 3;
        } else {
            i += 1;
        }
    }
    true
}

#[test]
fn fuzz_percent_decoding() {
    check!().with_type::<String>().for_each(|s| {
        assert_eq!(percent_decode_strict(&encode_uri_component(s)).as_ref(), Ok(s));
        assert_eq!(&percent_decode(&encode_uri_component(s)), s);
    });
    check!().with_type::<Vec<Piece>>().for_each(|pieces| {
        let text = render(pieces, &["%", "%2", "%41", "%e9", "%C3%A9", "%+1", "%-1", "+", "%%", "%zz"]);
        if percent_decode_strict(&text).is_ok() {
            assert!(well_formed_escapes(&text), "{text:?} has a malformed escape and was accepted");
        }
        assert_eq!(percent_decode(&text), reference_form_decode(&text), "{text:?}");
    });
}

/// `application/x-www-form-urlencoded` decoding as the URL standard writes it.
fn reference_form_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if b.get(i + 1..i + 3).is_some_and(|p| p.iter().all(u8::is_ascii_hexdigit)) => {
                out.push(u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap(), 16).unwrap());
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn fuzz_query_strings_round_trip() {
    check!().with_generator(produce::<Vec<(String, String)>>().with().len(0usize..8)).for_each(|pairs| {
        let query: Vec<String> =
            pairs.iter().map(|(k, v)| format!("{}={}", encode_uri_component(k), encode_uri_component(v))).collect();
        assert_eq!(&form_pairs(&query.join("&")), pairs);
    });
    check!().with_type::<Vec<Piece>>().for_each(|pieces| {
        let text = render(pieces, &["&", "=", "offset", "live", "cursor", "sse", "-1", "%", "+", "%26", "%3D"]);
        let pairs = form_pairs(&text);
        assert!(pairs.len() <= text.split('&').count());
        for (k, v) in &pairs {
            assert!(k.len() + v.len() <= text.len() * 3, "decoding never grows much");
        }
    });
}

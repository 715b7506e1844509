//! The values that cross the storage seam.

use std::sync::Arc;

use attache_core::{ContentType, ExpiresAt, Offset, ProducerHeaders, ProducerState, StreamPath, Ttl};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// A stream's committed metadata, as persisted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamInfo {
    pub id: u64,
    /// Shared, as the content type and owner are: a stream's metadata is
    /// copied on every append (the writer's working copy, the readers'
    /// view), and these are its only variable-size parts on that path.
    pub path: Arc<str>,
    pub content_type: Arc<str>,
    pub ttl_secs: Option<u64>,
    pub expires_at: Option<String>,
    pub expires_at_ms: Option<i64>,
    pub created_at_ms: i64,
    pub closed: bool,
    /// The next position: where the next append lands.
    pub tail: u64,
    pub fork: Option<ForkInfo>,
    /// How many forks read through this stream.
    pub fork_refs: u32,
    /// Deleted while forks read through it: kept only for their reads.
    pub soft_deleted: bool,
    /// Soft-deleted and no longer named by `path`: a create took the path for
    /// a new stream, and this one lives on under its id until its last fork goes.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unlinked: bool,
    /// Last `Stream-Seq` accepted (scope: the stream).
    pub last_seq: Option<String>,
    /// The producer request that closed the stream, so its retry is a duplicate.
    pub closed_by: Option<(String, u64, u64)>,
    /// The principal that created the stream.
    pub owner: Option<Arc<str>>,
    /// A closed stream whose bytes are one content-addressed blob (attachments).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blob: Option<BlobRef>,
}

/// A content-addressed blob: its SHA-256 (hex) names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRef {
    pub sha256: String,
    pub len: u64,
}

/// Bytes written to a staging file and synced, waiting to become a blob.
#[derive(Debug)]
pub struct StagedBlob {
    pub path: std::path::PathBuf,
    pub sha256: String,
    pub len: u64,
}

impl Drop for StagedBlob {
    /// A staged blob nobody adopted leaves nothing behind. (Once adopted, the
    /// staging path no longer exists and this does nothing.)
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(error = %e, path = %self.path.display(), "could not remove a staged blob");
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForkInfo {
    pub source_id: u64,
    pub source_path: String,
    /// The divergence position: below it, data comes from the source.
    pub offset: u64,
    /// As requested, for idempotent re-creation.
    pub requested_offset: u64,
    pub requested_sub_offset: u64,
}

impl StreamInfo {
    pub fn content_type(&self) -> ContentType {
        ContentType::parse(&self.content_type).unwrap_or_else(|_| ContentType::octet_stream())
    }
    pub fn is_json(&self) -> bool {
        attache_core::stream::is_json_media(&self.content_type)
    }
    /// The content type its reads and `HEAD` answer with ([`attache_core::stream::advertised_media`]).
    pub fn advertised_content_type(&self) -> &str {
        attache_core::stream::advertised_media(&self.content_type, self.blob.is_some())
    }
    pub fn tail_offset(&self) -> Offset {
        Offset(self.tail)
    }
    pub fn ttl(&self) -> Option<Ttl> {
        self.ttl_secs.map(Ttl)
    }
}

#[derive(Debug, Clone)]
pub struct ForkSpec {
    pub source: StreamPath,
    /// Defaults to the source's tail.
    pub offset: Option<Offset>,
    pub sub_offset: u64,
}

#[derive(Debug, Clone)]
pub struct CreateStream {
    pub path: StreamPath,
    /// `None` only for forks, which inherit the source's type.
    pub content_type: Option<ContentType>,
    pub ttl: Option<Ttl>,
    pub expires_at: Option<ExpiresAt>,
    pub closed: bool,
    pub initial: Bytes,
    pub fork: Option<ForkSpec>,
    pub owner: Option<String>,
    /// Whether this create takes the path from a stream deleted but kept for
    /// its forks (which then lives on under its id, unnamed). Without it, such
    /// a path is held as PROTOCOL.md says (a create there is 409). The server's
    /// own creates take it; the raw route takes it only for a caller that may
    /// not see the kept stream (docs/SECURITY.md).
    pub take_kept_path: bool,
}

#[derive(Debug, Clone)]
pub enum CreateOutcome {
    Created(StreamInfo),
    Existed(StreamInfo),
}

impl CreateOutcome {
    pub fn info(&self) -> &StreamInfo {
        match self {
            CreateOutcome::Created(i) | CreateOutcome::Existed(i) => i,
        }
    }
}

#[derive(Debug, Clone)]
pub struct AppendRequest {
    pub path: String,
    pub content_type: Option<ContentType>,
    pub body: Bytes,
    pub close: bool,
    pub seq: Option<String>,
    pub producer: Option<ProducerHeaders>,
    /// The JSON messages of `body`, when the server built it from messages it
    /// serialized itself ([`AppendRequest::json_messages`]): the store then does
    /// not parse `body` again to find them.
    pub messages: Option<Vec<Bytes>>,
}

/// The guard of a conditional append ([`StreamStore::append_guarded`](crate::StreamStore::append_guarded)):
/// what the caller decided from (`key`: the rows its decision is about; an
/// entity's manifest key, `attachment:{id}`) and up to where it read the
/// stream (`since`: its tail then).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowGuard {
    pub key: String,
    pub since: attache_core::Offset,
}

/// What a conditional write ([`StreamStore::append_guarded`](crate::StreamStore::append_guarded))
/// expects at a path, as the caller last saw it: the live stream `id`, or
/// (`None`) no live stream (none at all, one deleted but kept for its forks,
/// or one expired: what [`head`](crate::StreamStore::head) answers
/// `NotFound`/`Gone` for).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamAt {
    pub path: String,
    pub id: Option<u64>,
}

impl AppendRequest {
    /// An append of server-serialized JSON messages (each one valid JSON) to a JSON stream.
    pub fn json_messages(path: String, content_type: ContentType, messages: &[Vec<u8>], close: bool) -> AppendRequest {
        let mut body = Vec::with_capacity(messages.iter().map(|m| m.len() + 1).sum::<usize>() + 2);
        let mut spans = Vec::with_capacity(messages.len());
        body.push(b'[');
        for (i, message) in messages.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            spans.push(body.len()..body.len() + message.len());
            body.extend_from_slice(message);
        }
        body.push(b']');
        let body = Bytes::from(body);
        let messages = spans.into_iter().map(|span| body.slice(span)).collect();
        AppendRequest {
            path,
            content_type: Some(content_type),
            body,
            close,
            seq: None,
            producer: None,
            messages: Some(messages),
        }
    }
}

#[derive(Debug, Clone)]
pub struct AppendOutcome {
    pub info: StreamInfo,
    /// The producer's state after this request (echoed in headers).
    pub producer: Option<ProducerState>,
    /// True when nothing was written because the request was a retry.
    pub duplicate: bool,
}

/// Where a read starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadFrom {
    Start,
    Tail,
    At(Offset),
}

/// Committed data from one read.
#[derive(Debug, Clone)]
pub struct ReadBatch {
    pub info: StreamInfo,
    pub start: Offset,
    pub next: Offset,
    /// What a reader receives, as one buffer: binary, the stream's bytes from
    /// `start` to `next`; JSON, the array of the messages between them
    /// (`[m1,m2]`, `[]` when there are none), each message's bytes as appended.
    pub body: Bytes,
    pub json: bool,
    /// JSON, when the read knew them: where each message starts in `body`
    /// (ascending; the first is 1, just past the `[`), so [`ReadBatch::messages`]
    /// slices the body without scanning it. `None`: the body is scanned.
    pub(crate) starts: Option<Arc<[u32]>>,
}

impl ReadBatch {
    /// A batch from its pieces: binary runs to concatenate, or JSON messages (one per element).
    pub fn from_pieces(info: StreamInfo, start: Offset, next: Offset, json: bool, pieces: &[Bytes]) -> ReadBatch {
        let mut starts = None;
        let body = match (json, pieces) {
            (false, [one]) => one.clone(),
            (false, _) => pieces.concat().into(),
            (true, _) => {
                let mut out = Vec::with_capacity(pieces.iter().map(|m| m.len() + 1).sum::<usize>() + 2);
                let mut at = Vec::with_capacity(pieces.len());
                out.push(b'[');
                for (i, m) in pieces.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    at.push(out.len());
                    out.extend_from_slice(m);
                }
                out.push(b']');
                starts = Self::starts_of(at.into_iter(), out.len());
                out.into()
            }
        };
        ReadBatch { info, start, next, body, json, starts }
    }

    /// A batch as a backend's read assembled it; `starts` as [`ReadBatch::starts`]
    /// says, for a JSON body whose message starts the read knew.
    pub(crate) fn new(info: StreamInfo, start: Offset, next: Offset, body: Bytes, json: bool) -> ReadBatch {
        ReadBatch { info, start, next, body, json, starts: None }
    }

    /// Message starts in a body of `len` bytes, as stored: `None` when a body
    /// that long could not hold them as `u32`.
    pub(crate) fn starts_of(starts: impl ExactSizeIterator<Item = usize>, len: usize) -> Option<Arc<[u32]>> {
        u32::try_from(len).ok()?;
        Some(starts.map(|s| s as u32).collect())
    }

    pub fn up_to_date(&self) -> bool {
        self.next.0 >= self.info.tail
    }
    /// EOF: the stream is closed and this read reached its end.
    pub fn at_closed_end(&self) -> bool {
        self.info.closed && self.up_to_date()
    }
    /// No message (JSON) or no byte (binary).
    pub fn is_empty(&self) -> bool {
        if self.json {
            self.body.len() <= 2
        } else {
            self.body.is_empty()
        }
    }
    /// Bytes of the body.
    pub fn byte_len(&self) -> usize {
        self.body.len()
    }
    /// JSON: each message, in order, as a slice of the body (no copies).
    /// Binary: the body as one piece (none when empty).
    pub fn messages(&self) -> Vec<Bytes> {
        if !self.json {
            return if self.body.is_empty() { Vec::new() } else { vec![self.body.clone()] };
        }
        match &self.starts {
            Some(starts) => slice_at(&self.body, starts).unwrap_or_else(|| split_array(&self.body)),
            None => split_array(&self.body),
        }
    }
}

/// The messages of a JSON array body whose element starts are known: each
/// runs to the byte before the next one's start (its `,`), the last to the
/// byte before the closing `]`. `None` when the starts do not fit the body.
fn slice_at(body: &Bytes, starts: &[u32]) -> Option<Vec<Bytes>> {
    let close = body.len().checked_sub(1).filter(|&c| body.get(c) == Some(&b']'))?;
    let mut out = Vec::with_capacity(starts.len());
    for (i, &s) in starts.iter().enumerate() {
        let from = s as usize;
        let to = match starts.get(i + 1) {
            Some(&n) => (n as usize).checked_sub(1)?,
            None => close,
        };
        let piece = body.get(from..to)?;
        let lead = piece.iter().take_while(|c| c.is_ascii_whitespace()).count();
        let trail = piece[lead..].iter().rev().take_while(|c| c.is_ascii_whitespace()).count();
        if lead + trail < piece.len() {
            out.push(body.slice(from + lead..to - trail));
        }
    }
    Some(out)
}

/// A read as it goes out ([`StreamStore::read_sendable`](crate::StreamStore::read_sendable)):
/// a [`ReadBatch`]'s positions, with its body either in memory or left where
/// it lies in a file.
#[derive(Debug, Clone)]
pub struct SendableRead {
    pub info: StreamInfo,
    pub start: Offset,
    pub next: Offset,
    pub json: bool,
    /// The same bytes a [`ReadBatch`] of this read would hold as its body.
    pub body: ReadBody,
}

/// Where a [`SendableRead`]'s body is.
#[derive(Debug, Clone)]
pub enum ReadBody {
    Bytes(Bytes),
    /// A range of a file, framed (JSON: `[` and `]` around the messages).
    File(crate::FileBody),
}

impl ReadBody {
    /// Bytes of the body.
    pub fn len(&self) -> u64 {
        match self {
            ReadBody::Bytes(b) => b.len() as u64,
            ReadBody::File(f) => f.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl From<ReadBatch> for SendableRead {
    fn from(batch: ReadBatch) -> SendableRead {
        SendableRead {
            info: batch.info,
            start: batch.start,
            next: batch.next,
            json: batch.json,
            body: ReadBody::Bytes(batch.body),
        }
    }
}

impl SendableRead {
    /// As [`ReadBatch::up_to_date`].
    pub fn up_to_date(&self) -> bool {
        self.next.0 >= self.info.tail
    }
    /// As [`ReadBatch::at_closed_end`].
    pub fn at_closed_end(&self) -> bool {
        self.info.closed && self.up_to_date()
    }
}

/// The elements of a JSON array whose elements are valid JSON values (what
/// the store keeps): a scan for the commas outside strings at the top level.
fn split_array(body: &Bytes) -> Vec<Bytes> {
    let b = body.as_ref();
    let mut out = Vec::new();
    let (Some(open), Some(close)) = (b.iter().position(|&c| c == b'['), b.iter().rposition(|&c| c == b']')) else {
        return out;
    };
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    let mut from = open + 1;
    let mut push = |from: usize, to: usize| {
        let piece = body.slice(from..to);
        let trimmed = piece.as_ref();
        let lead = trimmed.iter().take_while(|c| c.is_ascii_whitespace()).count();
        let trail = trimmed.iter().rev().take_while(|c| c.is_ascii_whitespace()).count();
        if lead + trail < trimmed.len() {
            out.push(piece.slice(lead..trimmed.len() - trail));
        }
    };
    for (i, &c) in b.iter().enumerate().take(close).skip(open + 1) {
        if in_string {
            if escaped {
                escaped = false;
            } else if c == b'\\' {
                escaped = true;
            } else if c == b'"' {
                in_string = false;
            }
            continue;
        }
        match c {
            b'"' => in_string = true,
            b'[' | b'{' => depth += 1,
            b']' | b'}' => depth = depth.saturating_sub(1),
            b',' if depth == 0 => {
                push(from, i);
                from = i + 1;
            }
            _ => {}
        }
    }
    push(from, close);
    out
}

/// Wakes live readers after each committed change to one stream.
pub type ChangeSignal = tokio::sync::watch::Receiver<u64>;

/// A create of a plain, open, empty stream at `path` for unit tests.
#[cfg(test)]
impl CreateStream {
    pub(crate) fn for_tests(path: &str, content_type: Option<&str>) -> CreateStream {
        CreateStream {
            path: StreamPath::new(path).expect("a valid path"),
            content_type: content_type.map(|c| ContentType::parse(c).expect("a valid type")),
            ttl: None,
            expires_at: None,
            closed: false,
            initial: Bytes::new(),
            fork: None,
            owner: None,
            take_kept_path: false,
        }
    }
}

/// A plain stream `/s` (id 1) for unit tests: JSON or bytes, its tail at `tail`.
#[cfg(test)]
impl StreamInfo {
    pub(crate) fn for_tests(tail: u64, json: bool) -> StreamInfo {
        let content_type = if json { "application/json" } else { "application/octet-stream" };
        let req = CreateStream::for_tests("/s", Some(content_type));
        let content_type = ContentType::parse(content_type).expect("a valid type");
        StreamInfo { tail, created_at_ms: 0, ..crate::rules::fresh_stream(1, &req, &content_type) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use attache_core::json::{split_messages, JsonBodyUse};

    #[test]
    fn a_json_messages_body_is_the_array_of_exactly_its_messages() {
        let messages: Vec<Vec<u8>> = vec![br#"{"a":[1,2]}"#.to_vec(), b"0".to_vec(), br#""x,]""#.to_vec()];
        let json = ContentType::parse("application/json").unwrap();
        let req = AppendRequest::json_messages("/s".into(), json, &messages, false);
        let split: Vec<&[u8]> = split_messages(&req.body, JsonBodyUse::Append).unwrap();
        let given: Vec<&[u8]> = req.messages.as_ref().unwrap().iter().map(|b| b.as_ref()).collect();
        assert_eq!(split, given);
        assert_eq!(given, messages.iter().map(Vec::as_slice).collect::<Vec<_>>());
    }

    #[test]
    fn a_json_body_splits_back_into_exactly_its_messages() {
        let messages: Vec<Bytes> = [r#"{"a":[1,{"b":"],"}]}"#, "0", r#""x,\"]""#, "[]", "{}", r#""\\""#, "-1.5e3"]
            .iter()
            .map(|m| Bytes::copy_from_slice(m.as_bytes()))
            .collect();
        let batch = ReadBatch::from_pieces(StreamInfo::for_tests(0, true), Offset(0), Offset(0), true, &messages);
        assert_eq!(batch.messages(), messages);
        assert!(!batch.is_empty());
        let empty = ReadBatch::from_pieces(StreamInfo::for_tests(0, true), Offset(0), Offset(0), true, &[]);
        assert_eq!(&empty.body[..], b"[]");
        assert!(empty.is_empty() && empty.messages().is_empty());
    }

    #[test]
    fn messages_sliced_at_known_starts_are_the_messages_the_scan_finds() {
        let messages: Vec<Bytes> = [r#"{"a":[1,{"b":"],"}]}"#, "0", r#""x,\"]""#, "[]", r#""\\""#]
            .iter()
            .map(|m| Bytes::copy_from_slice(m.as_bytes()))
            .collect();
        let batch = ReadBatch::from_pieces(StreamInfo::for_tests(0, true), Offset(0), Offset(0), true, &messages);
        assert!(batch.starts.is_some(), "from_pieces knows where its messages start");
        assert_eq!(batch.messages(), messages);
        assert_eq!(split_array(&batch.body), messages);
        // Starts that do not fit the body are not trusted: the body is scanned instead.
        let wrong = ReadBatch { starts: Some(vec![1, 999].into()), ..batch.clone() };
        assert_eq!(wrong.messages(), messages);
        let unclosed = ReadBatch { body: batch.body.slice(..batch.body.len() - 1), ..batch.clone() };
        assert_eq!(slice_at(&unclosed.body, &[1]), None);
    }

    #[test]
    fn a_binary_body_is_its_pieces_concatenated() {
        let pieces = [Bytes::from_static(b"ab"), Bytes::from_static(b"c")];
        let batch = ReadBatch::from_pieces(StreamInfo::for_tests(0, false), Offset(0), Offset(3), false, &pieces);
        assert_eq!(&batch.body[..], b"abc");
        assert_eq!(batch.messages(), vec![Bytes::from_static(b"abc")]);
    }
}

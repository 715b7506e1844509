//! Resumable uploads: `PUT .../attachments/{id}` opens a `pending` entry
//! with an open stream, the bytes go there in chunks through an idempotent
//! producer, and closing the stream completes the attachment. Running the
//! upload again with the same id continues after the bytes the server holds,
//! but only with the same input: the server cannot know the local file, so
//! the client checks it. The upload records its input's size and sha256 in
//! the entry's `meta` ([`UPLOAD_FINGERPRINT_KEY`]); a resume compares them
//! with the input's, or, for an upload that recorded none (a reader, or an
//! older client), reads the bytes the server holds back and compares them
//! with the input's first bytes. Before the close, the bytes read must
//! still be the recorded input (a file edited meanwhile is not closed), and
//! after it the complete entry's `sha256` and `byteLength` must be theirs.
//! A mismatch is [`Error::UploadMismatch`], never a `complete` answer.

use std::fmt;

use attache_core::manifest::{AttachmentStatus, ManifestEntry, Role};
use attache_core::EntityUrl;
use bytes::Bytes;
use reqwest::Method;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt};

use super::attachments::{guess_mime_type, AttachmentBody, AttachmentInput};
use crate::error::{Error, Result};
use crate::transport::{attachment_route, RuntimeServerClient};

/// The chunk size of resumable uploads unless told otherwise.
pub const RESUMABLE_CHUNK_BYTES: usize = 4 << 20;

/// The key of a resumable upload's `meta` under which the client records
/// its input: `{"size": N, "sha256": "<64 hex digits>"}`. It stays in the
/// complete entry's `meta`, next to the caller's own keys; a caller's
/// `meta` may not use it.
pub const UPLOAD_FINGERPRINT_KEY: &str = "attacheUpload";

/// What a whole input is: its length and content hash.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fingerprint {
    size: u64,
    sha256: String,
}

impl Fingerprint {
    fn to_value(&self) -> Value {
        json!({ "size": self.size, "sha256": self.sha256 })
    }

    /// The fingerprint an entry's `meta` records, if any (a malformed one counts as none).
    fn recorded_in(entry: &ManifestEntry) -> Option<Fingerprint> {
        let v = entry.meta.as_ref()?.get(UPLOAD_FINGERPRINT_KEY)?;
        Some(Fingerprint { size: v.get("size")?.as_u64()?, sha256: v.get("sha256")?.as_str()?.to_ascii_lowercase() })
    }

    /// Reads the input once to hash it; a reader cannot be read twice, so it has none.
    async fn of(body: &AttachmentBody) -> Result<Option<Fingerprint>> {
        match body {
            AttachmentBody::Bytes(b) => {
                Ok(Some(Fingerprint { size: b.len() as u64, sha256: hex(Sha256::digest(b).as_slice()) }))
            }
            AttachmentBody::File(path) => {
                let mut file = tokio::fs::File::open(path)
                    .await
                    .map_err(|e| Error::io(format!("cannot open {}", path.display()), e))?;
                let mut hasher = Sha256::new();
                let mut buf = vec![0u8; 1 << 20];
                let mut size = 0u64;
                loop {
                    let n = file
                        .read(&mut buf)
                        .await
                        .map_err(|e| Error::io(format!("cannot read {}", path.display()), e))?;
                    if n == 0 {
                        break;
                    }
                    hasher.update(&buf[..n]);
                    size += n as u64;
                }
                Ok(Some(Fingerprint { size, sha256: hex(hasher.finalize().as_slice()) }))
            }
            AttachmentBody::Reader { .. } => Ok(None),
        }
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} bytes with sha256 {}", self.size, self.sha256)
    }
}

fn hex(digest: &[u8]) -> String {
    use fmt::Write;
    digest.iter().fold(String::with_capacity(digest.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// What to do about an upload whose held bytes are not the input's.
const START_OVER: &str = "resume it with the input it was begun with, or upload this input under another id \
     (an upload that is never closed ends at the server's --upload-expiry, 24h by default)";

fn mismatch(id: &str, reason: String) -> Error {
    Error::UploadMismatch { id: id.to_owned(), reason }
}

impl RuntimeServerClient {
    /// `PUT .../attachments/{id}`: opens a resumable upload (a `pending` entry
    /// with an open stream at its `streamPath`). Opening the same upload
    /// again, as the same principal, returns the pending entry as it was
    /// begun. A `Bytes` or `File` input's size and sha256 are recorded in the
    /// entry's `meta` under [`UPLOAD_FINGERPRINT_KEY`] (a file is read once
    /// for this), so that a resume can tell whether it has the same input.
    pub async fn begin_resumable_upload(
        &self,
        entity: &EntityUrl,
        id: &str,
        input: &AttachmentInput,
    ) -> Result<ManifestEntry> {
        let fingerprint = Fingerprint::of(&input.body).await?;
        self.begin_recording(entity, id, input, fingerprint.as_ref()).await
    }

    async fn begin_recording(
        &self,
        entity: &EntityUrl,
        id: &str,
        input: &AttachmentInput,
        fingerprint: Option<&Fingerprint>,
    ) -> Result<ManifestEntry> {
        #[derive(Deserialize)]
        struct Begun {
            attachment: ManifestEntry,
        }
        attache_core::manifest::validate_new_attachment_id(id)?;
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
        let mut meta = input.meta.clone().unwrap_or_default();
        if meta.contains_key(UPLOAD_FINGERPRINT_KEY) {
            return Err(Error::Invalid(format!(
                "the meta key {UPLOAD_FINGERPRINT_KEY:?} is reserved: a resumable upload records its input there"
            )));
        }
        if let Some(f) = fingerprint {
            meta.insert(UPLOAD_FINGERPRINT_KEY.into(), f.to_value());
        }
        if input.meta.is_some() || !meta.is_empty() {
            body.insert("meta".into(), Value::Object(meta));
        }
        if let Some(k) = &input.key {
            body.insert("key".into(), Value::String(k.clone()));
        }
        let route = attachment_route(entity, id);
        let res = self.send(self.request(Method::PUT, &route).json(&body), &Method::PUT, &route).await?;
        Ok(self.json::<Begun>(res, "resumable upload answer").await?.attachment)
    }

    /// Uploads in chunks over the attachment's own stream, with an idempotent
    /// producer, and closes it; returns the complete entry. If the upload was
    /// begun before (a previous run died), it continues after the bytes the
    /// server already has, so run it again with the same id and the same
    /// input to resume.
    ///
    /// The bytes the server holds must be this input's first bytes, or the
    /// attachment would complete with another file's prefix: a resume is
    /// refused with [`Error::UploadMismatch`] before anything is appended when
    /// the upload was begun with another input (size and sha256 recorded in
    /// its `meta`, compared with this input's), or, for an upload that
    /// recorded none (begun from a reader or by an older client), when the
    /// held bytes, read back from the server, differ from this input's first
    /// bytes. A reader input is read from its start (the bytes the server
    /// holds are read and compared, not sent). The stream is closed only if
    /// the bytes read are still the recorded input (else the upload stays
    /// pending: a file edited during the upload), and the complete entry must
    /// carry their sha256 and length.
    pub async fn upload_attachment_resumable(
        &self,
        entity: &EntityUrl,
        input: AttachmentInput,
        chunk_bytes: usize,
    ) -> Result<ManifestEntry> {
        let id = input.id.clone().unwrap_or_else(crate::ids::new_uuid);
        let local = Fingerprint::of(&input.body).await?;
        let pending = match self.begin_recording(entity, &id, &input, local.as_ref()).await {
            Ok(pending) => pending,
            // A run before this one finished the upload (and its answer was
            // lost): done, if what completed is this input.
            Err(e) if e.code() == Some(&crate::ErrorCode::DuplicateId) => {
                let done = match (&local, self.get_attachment(entity, &id).await?) {
                    (Some(local), Some(entry)) => {
                        let same = Fingerprint::recorded_in(&entry).as_ref() == Some(local)
                            && entry.status == AttachmentStatus::Complete
                            && entry.byte_length == Some(local.size)
                            && entry.sha256.as_deref().map(str::to_ascii_lowercase).as_deref()
                                == Some(local.sha256.as_str());
                        same.then_some(entry)
                    }
                    _ => None,
                };
                return done.ok_or(e);
            }
            Err(e) => return Err(e),
        };
        let recorded = Fingerprint::recorded_in(&pending);
        if let (Some(local), Some(recorded)) = (&local, &recorded) {
            if local != recorded {
                return Err(mismatch(
                    &id,
                    format!(
                        "it was begun with {recorded} and this input is {local}; nothing was appended: {START_OVER}"
                    ),
                ));
            }
        }
        let info = self.head_stream(&pending.stream_path).await?;
        let have = attache_core::Offset::parse(&info.next_offset).map(|o| o.0).unwrap_or(0);

        // The input from its start: its first `have` bytes are what the server
        // holds, hashed here and not sent, so the hash covers the whole input.
        let mut reader: Box<dyn AsyncRead + Send + Unpin> = match input.body {
            AttachmentBody::Bytes(b) => Box::new(std::io::Cursor::new(b)),
            AttachmentBody::File(path) => Box::new(
                tokio::fs::File::open(&path)
                    .await
                    .map_err(|e| Error::io(format!("cannot open {}", path.display()), e))?,
            ),
            AttachmentBody::Reader { reader, .. } => reader,
        };
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; chunk_bytes.max(1)];
        let mut size = 0u64;
        while size < have {
            let want = (have - size).min(buf.len() as u64) as usize;
            let n = reader.read(&mut buf[..want]).await.map_err(|e| Error::io("reading the upload", e))?;
            if n == 0 {
                return Err(mismatch(
                    &id,
                    format!(
                        "the server holds {have} bytes of it and this input has only {size}; nothing was appended: {START_OVER}"
                    ),
                ));
            }
            hasher.update(&buf[..n]);
            size += n as u64;
        }
        if have > 0 && (local.is_none() || recorded.is_none()) {
            // No two fingerprints say these bytes came from this input (it is a
            // reader, or the upload recorded none): compare the bytes themselves.
            let held = self.hash_of_first_bytes(&pending.stream_path, have).await?;
            let ours = hex(hasher.clone().finalize().as_slice());
            if held != ours {
                return Err(mismatch(
                    &id,
                    format!(
                        "the {have} bytes the server holds (sha256 {held}) are not this input's first {have} bytes \
                         (sha256 {ours}); nothing was appended: {START_OVER}"
                    ),
                ));
            }
        }
        let expected = local.or(recorded);

        let mut producer = if info.closed {
            None
        } else {
            // A fresh epoch per session (milliseconds since 1970 only grow), so a
            // resumed upload is never mistaken for a retry of the last one.
            let epoch = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0);
            Some(crate::streams::IdempotentProducer::new(
                self,
                &pending.stream_path,
                &pending.mime_type,
                &format!("upload-{id}"),
                epoch,
            )?)
        };
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
                break;
            }
            hasher.update(&buf[..filled]);
            size += filled as u64;
            if let Some(producer) = producer.as_mut() {
                producer.append(Bytes::copy_from_slice(&buf[..filled])).await?;
            }
        }
        let read = Fingerprint { size, sha256: hex(hasher.finalize().as_slice()) };
        if let Some(expected) = expected.filter(|e| *e != read) {
            return Err(mismatch(
                &id,
                format!(
                    "it was begun with {expected} and the input read now is {read} (did the file change during \
                     the upload?); the upload was not closed and stays pending: upload the input under another id"
                ),
            ));
        }
        if let Some(producer) = producer.as_mut() {
            producer.close(Bytes::new()).await?;
        }
        let entry = self
            .get_attachment(entity, &id)
            .await?
            .ok_or_else(|| Error::Protocol(format!("attachment {id:?} is gone after its upload")))?;
        if entry.status != AttachmentStatus::Complete {
            return Err(Error::Protocol(format!(
                "attachment {id:?} is {:?} after its upload was closed: {}",
                entry.status,
                entry.error.as_deref().unwrap_or("no reason given")
            )));
        }
        let stored = (entry.byte_length, entry.sha256.as_deref().map(str::to_ascii_lowercase));
        if stored != (Some(read.size), Some(read.sha256.clone())) {
            return Err(mismatch(
                &id,
                format!(
                    "it completed with {} bytes with sha256 {}, which is not this input ({read}): \
                     delete it (`DELETE .../attachments/{id}`) and upload again",
                    stored.0.map_or("?".into(), |n| n.to_string()),
                    stored.1.as_deref().unwrap_or("(none)"),
                ),
            ));
        }
        Ok(entry)
    }

    /// The sha256 of the first `len` bytes of an attachment's open stream, read back.
    async fn hash_of_first_bytes(&self, path: &str, len: u64) -> Result<String> {
        let mut hasher = Sha256::new();
        let mut offset = crate::streams::START.to_owned();
        let mut got = 0u64;
        while got < len {
            let chunk = self.read_stream(path, &offset).await?;
            let take = (len - got).min(chunk.data.len() as u64) as usize;
            hasher.update(&chunk.data[..take]);
            got += take as u64;
            if chunk.next_offset == offset || (chunk.data.is_empty() && (chunk.up_to_date || chunk.closed)) {
                break;
            }
            offset = chunk.next_offset;
        }
        if got < len {
            return Err(Error::Protocol(format!(
                "the upload's stream {path} answered {got} bytes where its head said {len}"
            )));
        }
        Ok(hex(hasher.finalize().as_slice()))
    }
}

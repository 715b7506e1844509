//! Image hydration: an entity's inbox messages and their input attachments
//! become model messages, as Anthropic Messages or OpenAI Chat content blocks.
//!
//! Which attachments belong to a message: manifest rows with role `input`,
//! status `complete` and subject `{type:"inbox", key:<message key>}`, plus any
//! ids the payload names in `attachments` (so a reference to a missing or
//! unfinished attachment is visible too).
//!
//! The guardrails: walking from the newest message back (and within a message
//! from its last attachment back), images are sent while they fit in
//! [`HydrationLimits`] (4 images and 10 MiB by default). An image that does not
//! fit is skipped, which does not stop the walk: a smaller, older image can
//! still fit. Everything not sent becomes a text placeholder.

use std::future::Future;
use std::pin::Pin;

use attache_core::manifest::{AttachmentStatus, ManifestEntry, Role};
use attache_core::EntityUrl;
use base64::Engine;
use bytes::Bytes;
use serde_json::{json, Value};

use crate::client::RuntimeServerClient;
use crate::error::Result;
use crate::state::{InboxMessage, MaterializedState};

/// How much image data one model call may carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HydrationLimits {
    pub max_images: usize,
    pub max_image_bytes: u64,
    /// Media types sent as images; other `image/*` types get a placeholder.
    /// The default is what both Anthropic and OpenAI accept.
    pub image_media_types: Vec<String>,
}

impl Default for HydrationLimits {
    fn default() -> HydrationLimits {
        HydrationLimits {
            max_images: 4,
            max_image_bytes: 10 * 1024 * 1024,
            image_media_types: ["image/png", "image/jpeg", "image/gif", "image/webp"].map(String::from).to_vec(),
        }
    }
}

impl HydrationLimits {
    pub fn new(max_images: usize, max_image_bytes: u64) -> HydrationLimits {
        HydrationLimits { max_images, max_image_bytes, ..HydrationLimits::default() }
    }

    fn is_image(&self, mime: &str) -> bool {
        let media = mime.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        self.image_media_types.iter().any(|t| t.eq_ignore_ascii_case(&media))
    }
}

/// Where attachment bytes come from during hydration.
pub trait AttachmentSource: Sync {
    fn read<'a>(&'a self, entry: &'a ManifestEntry) -> Pin<Box<dyn Future<Output = Result<Bytes>> + Send + 'a>>;
}

/// Reads attachments of one entity over HTTP.
pub struct HttpSource<'c> {
    pub client: &'c RuntimeServerClient,
    pub entity: &'c EntityUrl,
}

impl AttachmentSource for HttpSource<'_> {
    fn read<'a>(&'a self, entry: &'a ManifestEntry) -> Pin<Box<dyn Future<Output = Result<Bytes>> + Send + 'a>> {
        Box::pin(self.client.read_attachment(self.entity, &entry.id))
    }
}

/// One block of a model message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContentBlock {
    Text(String),
    Image { attachment_id: String, media_type: String, data_base64: String, byte_length: u64 },
}

/// One user turn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelMessage {
    /// The inbox key it came from.
    pub key: String,
    pub content: Vec<ContentBlock>,
}

/// The messages of an entity, oldest first, ready for a model.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Conversation {
    pub messages: Vec<ModelMessage>,
}

impl Conversation {
    /// The ids of the images sent, oldest first.
    pub fn image_ids(&self) -> Vec<&str> {
        self.blocks()
            .filter_map(|b| match b {
                ContentBlock::Image { attachment_id, .. } => Some(attachment_id.as_str()),
                ContentBlock::Text(_) => None,
            })
            .collect()
    }

    pub fn image_bytes(&self) -> u64 {
        self.blocks()
            .map(|b| match b {
                ContentBlock::Image { byte_length, .. } => *byte_length,
                ContentBlock::Text(_) => 0,
            })
            .sum()
    }

    fn blocks(&self) -> impl Iterator<Item = &ContentBlock> {
        self.messages.iter().flat_map(|m| m.content.iter())
    }

    /// Anthropic Messages: `[{"role":"user","content":[{"type":"text"},{"type":"image","source":{...}}]}]`.
    pub fn to_anthropic(&self) -> Value {
        self.user_messages(|media_type, data_base64| {
            json!({
                "type": "image",
                "source": { "type": "base64", "media_type": media_type, "data": data_base64 },
            })
        })
    }

    /// OpenAI Chat Completions: images as `image_url` data URLs.
    pub fn to_openai(&self) -> Value {
        self.user_messages(|media_type, data_base64| {
            json!({
                "type": "image_url",
                "image_url": { "url": format!("data:{media_type};base64,{data_base64}") },
            })
        })
    }

    /// One user message per hydrated message; text blocks are the same in both
    /// formats, `image` says how a model API spells an image block.
    fn user_messages(&self, image: impl Fn(&str, &str) -> Value) -> Value {
        let messages = self.messages.iter().map(|m| {
            let content: Vec<Value> = m
                .content
                .iter()
                .map(|b| match b {
                    ContentBlock::Text(t) => json!({ "type": "text", "text": t }),
                    ContentBlock::Image { media_type, data_base64, .. } => image(media_type, data_base64),
                })
                .collect();
            json!({ "role": "user", "content": content })
        });
        Value::Array(messages.collect())
    }
}

/// What a message points at.
#[derive(Debug, Clone, PartialEq)]
pub enum AttachmentRef {
    Entry(Box<ManifestEntry>),
    Missing(String),
}

/// An inbox message and the attachments that belong to it.
#[derive(Debug, Clone, PartialEq)]
pub struct MessageInput {
    pub key: String,
    pub text: Option<String>,
    pub attachments: Vec<AttachmentRef>,
}

fn display_name(e: &ManifestEntry) -> &str {
    e.filename.as_deref().filter(|n| !n.is_empty()).unwrap_or(&e.id)
}

/// `[attachment: <name>, type=<mime>, size=<n>]`
pub fn described(e: &ManifestEntry) -> String {
    let size = e.byte_length.map(|n| n.to_string()).unwrap_or_else(|| "unknown".into());
    format!("[attachment: {}, type={}, size={size}]", display_name(e), e.mime_type)
}

/// `[attachment not sent to model: <name>, reason=image attachment prompt limit]`
pub fn over_limit(e: &ManifestEntry) -> String {
    format!("[attachment not sent to model: {}, reason=image attachment prompt limit]", display_name(e))
}

/// `[attachment missing: id=<id>]`
pub fn missing(id: &str) -> String {
    format!("[attachment missing: id={id}]")
}

/// `[attachment unreadable: <name>]`
pub fn unreadable(e: &ManifestEntry) -> String {
    format!("[attachment unreadable: {}]", display_name(e))
}

/// Whether a manifest entry belongs to the inbox message `key`.
pub fn belongs_to(e: &ManifestEntry, key: &str) -> bool {
    e.role == Role::Input
        && e.status == AttachmentStatus::Complete
        && e.subject.as_ref().is_some_and(|s| s.kind == "inbox" && s.key == key)
}

/// Ids a payload names in `attachments` (strings, or objects with an `id`).
fn referenced_ids(payload: &Value) -> Vec<String> {
    let Some(list) = payload.get("attachments").and_then(Value::as_array) else { return Vec::new() };
    list.iter().filter_map(|v| v.as_str().or_else(|| v.get("id").and_then(Value::as_str))).map(str::to_owned).collect()
}

fn message_text(m: &InboxMessage) -> Option<String> {
    match m.text() {
        Some(t) => Some(t.to_owned()),
        None if m.payload.is_null() => None,
        None => {
            let mut payload = m.payload.clone();
            if let Some(obj) = payload.as_object_mut() {
                obj.remove("attachments");
                if obj.is_empty() {
                    return None;
                }
            }
            Some(payload.to_string())
        }
    }
}

/// The messages of a materialized main stream with their attachments, in stream order.
pub fn messages_of(state: &MaterializedState) -> Vec<MessageInput> {
    let manifest = state.manifest();
    state
        .inbox()
        .iter()
        .map(|m| {
            let mut attachments: Vec<AttachmentRef> = manifest
                .iter()
                .filter(|e| belongs_to(e, &m.key))
                .map(|e| AttachmentRef::Entry(Box::new(e.clone())))
                .collect();
            for id in referenced_ids(&m.payload) {
                let known = attachments.iter().any(|a| matches!(a, AttachmentRef::Entry(e) if e.id == id));
                if known {
                    continue;
                }
                attachments.push(match manifest.iter().find(|e| e.id == id) {
                    Some(e) => AttachmentRef::Entry(Box::new(e.clone())),
                    None => AttachmentRef::Missing(id),
                });
            }
            MessageInput { key: m.key.clone(), text: message_text(m), attachments }
        })
        .collect()
}

/// Hydrates `messages` (oldest first) within `limits`, reading images from `source`.
pub async fn hydrate(
    messages: &[MessageInput],
    source: &(impl AttachmentSource + ?Sized),
    limits: &HydrationLimits,
) -> Conversation {
    // One rendered block per attachment, filled in while walking newest first.
    let mut rendered: Vec<Vec<Option<ContentBlock>>> =
        messages.iter().map(|m| vec![None; m.attachments.len()]).collect();
    let mut images = 0usize;
    let mut bytes_used = 0u64;
    for (mi, message) in messages.iter().enumerate().rev() {
        for (ai, attachment) in message.attachments.iter().enumerate().rev() {
            let block = match attachment {
                AttachmentRef::Missing(id) => ContentBlock::Text(missing(id)),
                AttachmentRef::Entry(e) if e.status != AttachmentStatus::Complete || !limits.is_image(&e.mime_type) => {
                    ContentBlock::Text(described(e))
                }
                AttachmentRef::Entry(e) => {
                    let declared = e.byte_length.unwrap_or(0);
                    if images >= limits.max_images || bytes_used.saturating_add(declared) > limits.max_image_bytes {
                        ContentBlock::Text(over_limit(e))
                    } else {
                        match source.read(e).await {
                            // The bytes read are what counts: a wrong byteLength cannot break the limit.
                            Ok(data) if bytes_used.saturating_add(data.len() as u64) > limits.max_image_bytes => {
                                ContentBlock::Text(over_limit(e))
                            }
                            Ok(data) => {
                                images += 1;
                                bytes_used += data.len() as u64;
                                ContentBlock::Image {
                                    attachment_id: e.id.clone(),
                                    media_type: e.mime_type.split(';').next().unwrap_or("").trim().to_owned(),
                                    data_base64: base64::engine::general_purpose::STANDARD.encode(&data),
                                    byte_length: data.len() as u64,
                                }
                            }
                            Err(err) => {
                                tracing::warn!(id = %e.id, %err, "an attachment could not be read for hydration");
                                ContentBlock::Text(unreadable(e))
                            }
                        }
                    }
                }
            };
            rendered[mi][ai] = Some(block);
        }
    }
    let messages = messages
        .iter()
        .zip(rendered)
        .map(|(m, blocks)| {
            let mut content: Vec<ContentBlock> = m.text.iter().cloned().map(ContentBlock::Text).collect();
            content.extend(blocks.into_iter().flatten());
            ModelMessage { key: m.key.clone(), content }
        })
        .collect();
    Conversation { messages }
}

impl RuntimeServerClient {
    /// Reads an entity's main stream and hydrates its inbox.
    pub async fn hydrate_entity(&self, entity: &EntityUrl, limits: &HydrationLimits) -> Result<Conversation> {
        let chunk = self.read_all(&entity.main_stream(), crate::streams::START).await?;
        let mut state = MaterializedState::new();
        state.apply_all(chunk.json_items()?.iter());
        let source = HttpSource { client: self, entity };
        Ok(hydrate(&messages_of(&state), &source, limits).await)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use attache_core::manifest::Subject;
    use proptest::prelude::*;
    use serde_json::Map;

    use super::*;
    use crate::error::Error;

    fn entry(id: &str, key: &str, mime: &str, len: u64) -> ManifestEntry {
        ManifestEntry {
            key: ManifestEntry::row_key(id),
            kind: "attachment".into(),
            id: id.into(),
            stream_path: format!("/chat/x/attachments/{id}"),
            status: AttachmentStatus::Complete,
            subject: Some(Subject::new("inbox", key).unwrap()),
            role: Role::Input,
            mime_type: mime.into(),
            filename: Some(format!("{id}.bin")),
            byte_length: Some(len),
            sha256: None,
            created_at: "2026-01-01T00:00:00.000Z".into(),
            created_by: None,
            error: None,
            meta: None,
            ext: Map::new(),
        }
    }

    /// Serves `len` zero bytes per entry, or fails for ids in `broken`.
    struct Memory {
        broken: Vec<String>,
        lie: HashMap<String, u64>,
    }

    impl AttachmentSource for Memory {
        fn read<'a>(&'a self, e: &'a ManifestEntry) -> Pin<Box<dyn Future<Output = Result<Bytes>> + Send + 'a>> {
            Box::pin(async move {
                if self.broken.contains(&e.id) {
                    return Err(Error::Other("disk on fire".into()));
                }
                let len = self.lie.get(&e.id).copied().or(e.byte_length).unwrap_or(0);
                Ok(Bytes::from(vec![0u8; len as usize]))
            })
        }
    }

    fn memory() -> Memory {
        Memory { broken: Vec::new(), lie: HashMap::new() }
    }

    fn msg(key: &str, attachments: Vec<ManifestEntry>) -> MessageInput {
        MessageInput {
            key: key.into(),
            text: Some(format!("text of {key}")),
            attachments: attachments.into_iter().map(|e| AttachmentRef::Entry(Box::new(e))).collect(),
        }
    }

    fn texts(c: &Conversation) -> Vec<String> {
        c.blocks()
            .filter_map(|b| match b {
                ContentBlock::Text(t) => Some(t.clone()),
                _ => None,
            })
            .collect()
    }

    fn run<F: Future>(f: F) -> F::Output {
        futures::executor::block_on(f)
    }

    #[test]
    fn a_big_newer_image_is_skipped_and_a_smaller_older_one_still_fits() {
        let limits = HydrationLimits::new(4, 100);
        let messages = vec![
            msg("m1", vec![entry("small", "m1", "image/png", 40)]),
            msg("m2", vec![entry("big", "m2", "image/png", 90)]),
            msg("m3", vec![entry("newest", "m3", "image/png", 30)]),
        ];
        let c = run(hydrate(&messages, &memory(), &limits));
        assert_eq!(c.image_ids(), ["small", "newest"]);
        assert!(
            texts(&c).contains(&"[attachment not sent to model: big.bin, reason=image attachment prompt limit]".into())
        );
    }

    #[test]
    fn placeholders_read_exactly_as_specified() {
        let mut pending = entry("p", "m", "image/png", 5);
        pending.status = AttachmentStatus::Pending;
        pending.byte_length = None;
        let mut m = msg("m", vec![entry("doc", "m", "application/pdf", 7), pending, entry("bad", "m", "image/png", 3)]);
        m.attachments.push(AttachmentRef::Missing("gone".into()));
        let source = Memory { broken: vec!["bad".into()], lie: HashMap::new() };
        let c = run(hydrate(&[m], &source, &HydrationLimits::default()));
        assert_eq!(
            texts(&c),
            [
                "text of m",
                "[attachment: doc.bin, type=application/pdf, size=7]",
                "[attachment: p.bin, type=image/png, size=unknown]",
                "[attachment unreadable: bad.bin]",
                "[attachment missing: id=gone]",
            ]
        );
    }

    #[test]
    fn a_server_that_sends_more_bytes_than_declared_cannot_break_the_byte_limit() {
        let source = Memory { broken: Vec::new(), lie: HashMap::from([("liar".to_owned(), 500)]) };
        let m = msg("m", vec![entry("liar", "m", "image/png", 10)]);
        let c = run(hydrate(&[m], &source, &HydrationLimits::new(4, 100)));
        assert!(c.image_ids().is_empty());
    }

    #[test]
    fn both_output_formats_carry_base64_images_with_their_media_type() {
        let m = msg("m", vec![entry("i", "m", "image/jpeg", 3)]);
        let c = run(hydrate(&[m], &memory(), &HydrationLimits::default()));
        let a = c.to_anthropic();
        assert_eq!(a[0]["role"], "user");
        assert_eq!(a[0]["content"][0], json!({"type": "text", "text": "text of m"}));
        assert_eq!(a[0]["content"][1]["source"], json!({"type": "base64", "media_type": "image/jpeg", "data": "AAAA"}));
        let o = c.to_openai();
        assert_eq!(o[0]["content"][1]["image_url"]["url"], "data:image/jpeg;base64,AAAA");
    }

    #[test]
    fn only_complete_input_rows_about_the_message_belong_to_it() {
        let mut output = entry("o", "m", "image/png", 1);
        output.role = Role::Output;
        let other = entry("x", "other", "image/png", 1);
        let mut pending = entry("p", "m", "image/png", 1);
        pending.status = AttachmentStatus::Pending;
        assert!(belongs_to(&entry("i", "m", "image/png", 1), "m"));
        assert!(!belongs_to(&output, "m") && !belongs_to(&other, "m") && !belongs_to(&pending, "m"));
    }

    /// Image sizes per message, oldest first.
    fn conversation() -> impl Strategy<Value = Vec<Vec<u64>>> {
        prop::collection::vec(prop::collection::vec(0u64..400, 0..4), 0..8)
    }

    proptest! {
        #[test]
        fn hydration_never_exceeds_its_limits_and_walks_newest_first_skipping_not_stopping(
            sizes in conversation(), max_images in 0usize..6, max_bytes in 0u64..1200,
        ) {
            let limits = HydrationLimits::new(max_images, max_bytes);
            let messages: Vec<MessageInput> = sizes.iter().enumerate().map(|(mi, atts)| {
                let key = format!("m{mi}");
                msg(&key, atts.iter().enumerate().map(|(ai, n)| entry(&format!("{mi}-{ai}"), &key, "image/png", *n)).collect())
            }).collect();
            let c = run(hydrate(&messages, &memory(), &limits));
            let chosen: Vec<String> = c.image_ids().into_iter().map(str::to_owned).collect();
            prop_assert!(chosen.len() <= max_images);
            prop_assert!(c.image_bytes() <= max_bytes);
            // The reference: a greedy walk from the newest attachment back that skips what does not fit.
            let mut expected = Vec::new();
            let (mut count, mut used) = (0usize, 0u64);
            for (mi, atts) in sizes.iter().enumerate().rev() {
                for (ai, n) in atts.iter().enumerate().rev() {
                    if count < max_images && used + n <= max_bytes {
                        count += 1;
                        used += n;
                        expected.push(format!("{mi}-{ai}"));
                    }
                }
            }
            expected.reverse();
            prop_assert_eq!(&chosen, &expected);
            // Every attachment shows up once, as an image or a placeholder, and every message keeps its text.
            let total: usize = sizes.iter().map(Vec::len).sum();
            let placeholders = texts(&c).iter().filter(|t| t.starts_with("[attachment")).count();
            prop_assert_eq!(chosen.len() + placeholders, total);
            prop_assert_eq!(c.messages.len(), sizes.len());
        }
    }
}

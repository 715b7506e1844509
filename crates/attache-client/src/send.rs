//! Sending a message with attachments, Electric's way: choose the message
//! key, upload each file with a client-chosen id and the message as its
//! subject, then send the message. If any step fails, what was uploaded is
//! deleted and the first error is returned.

use attache_core::manifest::{ManifestEntry, Role, Subject};
use attache_core::EntityUrl;
use serde::Serialize;

use crate::client::{AttachmentInput, RuntimeServerClient, SendMessage, SendReceipt};
use crate::error::{Error, Result};

/// A message and its attachments, sent together.
#[derive(Debug, Clone, Serialize)]
pub struct SentWithAttachments {
    pub receipt: SendReceipt,
    pub attachments: Vec<ManifestEntry>,
    /// The transaction ids of the uploads, in order (then the send's, in `receipt`).
    pub txids: Vec<String>,
}

pub use crate::ids::new_uuid;

/// A message key in Electric's client style: `client-<ms>-<random>`.
pub fn new_message_key() -> String {
    let ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
    let r: u32 = rand::random();
    format!("client-{ms}-{r:08x}")
}

impl RuntimeServerClient {
    /// Uploads `files` as input attachments of a new message, then sends it.
    /// Each file gets a fresh id (unless it has one) and the subject
    /// `{type:"inbox", key}`. On any failure the uploads are deleted and the
    /// first error is returned.
    pub async fn send_with_attachments(
        &self,
        entity: &EntityUrl,
        mut message: SendMessage,
        files: Vec<AttachmentInput>,
    ) -> Result<SentWithAttachments> {
        let key = message.key.clone().unwrap_or_else(new_message_key);
        message.key = Some(key.clone());
        let subject = Subject::new("inbox", &key)?;
        let mut uploaded: Vec<ManifestEntry> = Vec::new();
        let mut txids = Vec::new();
        let mut failure: Option<Error> = None;
        // An upload that broke off may have left a `failed` row under its id; it goes too.
        let mut attempted: Option<String> = None;
        for mut file in files {
            let id = file.id.clone().unwrap_or_else(new_uuid);
            file.id = Some(id.clone());
            file.subject = Some(subject.clone());
            file.role = Some(file.role.unwrap_or(Role::Input));
            match self.upload_attachment(entity, file).await {
                Ok(receipt) if receipt.attachment.id == id => {
                    txids.push(receipt.txid);
                    uploaded.push(receipt.attachment);
                }
                Ok(receipt) => {
                    // The server stored it under another id: remember it for the rollback.
                    let got = receipt.attachment.id.clone();
                    uploaded.push(receipt.attachment);
                    failure = Some(Error::Protocol(format!("uploaded attachment {id:?} came back as {got:?}")));
                    break;
                }
                Err(e) => {
                    attempted = Some(id);
                    failure = Some(e);
                    break;
                }
            }
        }
        let outcome = match failure {
            Some(e) => Err(e),
            None => self.send_message(entity, &message).await,
        };
        match outcome {
            Ok(receipt) => Ok(SentWithAttachments { receipt, attachments: uploaded, txids }),
            Err(first) => {
                let mut ids: Vec<String> = uploaded.iter().map(|e| e.id.clone()).collect();
                ids.extend(attempted);
                self.roll_back(entity, &ids).await;
                Err(first)
            }
        }
    }

    /// Deletes every upload, all at once; failures are logged, the original error wins.
    async fn roll_back(&self, entity: &EntityUrl, ids: &[String]) {
        let deletions = ids.iter().map(|id| async move { (id.as_str(), self.delete_attachment(entity, id).await) });
        for (id, result) in futures::future::join_all(deletions).await {
            match result {
                Ok(_) => {}
                Err(err) if err.is_not_found() => {}
                Err(err) => tracing::warn!(%entity, id, %err, "rolling back an upload failed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_are_valid_attachment_ids_and_distinct() {
        let (a, b) = (new_uuid(), new_uuid());
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        attache_core::manifest::validate_attachment_id(&a).unwrap();
        assert!(new_message_key().starts_with("client-"));
    }
}

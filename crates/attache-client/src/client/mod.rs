//! The entities and attachments faces of [`RuntimeServerClient`]: their
//! methods (`entities`, `attachments`, `resumable`) and the types they take and return.
//! The client itself and its request plumbing are in `crate::transport`,
//! below this module and `streams`, which both build on it.

mod attachments;
mod entities;
mod resumable;

pub use crate::transport::{Credentials, RuntimeServerClient, DEFAULT_URL, PRINCIPAL_HEADER};
pub use attachments::{
    guess_mime_type, AttachmentBody, AttachmentDownload, AttachmentInput, AttachmentReceipt, ByteRange,
};
pub use entities::{
    Entity, EntityStreams, ForkOptions, ForkPointer, Forked, Grant, NewGrant, SendMessage, SendReceipt, SpawnOptions,
};
pub use resumable::{RESUMABLE_CHUNK_BYTES, UPLOAD_FINGERPRINT_KEY};

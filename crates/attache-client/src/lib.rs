//! attache's Rust SDK.
//!
//! - [`RuntimeServerClient`]: entities, attachments (streamed uploads and
//!   downloads, byte ranges), Durable Streams ([`streams`]), the task
//!   JSON-RPC face ([`rpc`]).
//! - [`state`]: the State Protocol materializer, live.
//! - [`runtime`]: the handler runtime with `ctx.attachments`.
//! - [`send`]: send a message with attachments, rolling back on failure.
//! - [`hydrate`]: image hydration into Anthropic and OpenAI content blocks.

pub mod client;
pub mod error;
pub mod hydrate;
mod ids;
pub mod rpc;
pub mod runtime;
pub mod send;
pub mod state;
pub mod streams;
mod transport;

pub use attache_core::manifest::{AttachmentStatus, ManifestEntry, Role, Subject};
pub use attache_core::{EntityUrl, PrincipalKey};
pub use client::{
    AttachmentBody, AttachmentInput, AttachmentReceipt, ByteRange, Credentials, Entity, ForkOptions, ForkPointer,
    Forked, Grant, NewGrant, RuntimeServerClient, SendMessage, SendReceipt, SpawnOptions, DEFAULT_URL,
};
pub use error::{Error, ErrorCode, Result, RpcError};
pub use hydrate::{Conversation, HydrationLimits};
pub use runtime::{AttachmentFilter, Attachments, HandlerContext, HandlerResult, Runtime, RuntimeOptions};
pub use state::{InboxMessage, LiveState, MaterializedState};
pub use streams::{Chunk, CreateStream, IdempotentProducer, LiveMode, Tail, TailOptions};

/// The guides' Rust examples compile as doctests, so they stay true to the API.
#[cfg(doctest)]
pub mod guides {
    #[doc = include_str!("../../../docs/guides/streams.md")]
    pub struct Streams;
    #[doc = include_str!("../../../docs/guides/entities.md")]
    pub struct Entities;
    #[doc = include_str!("../../../docs/guides/attachments.md")]
    pub struct Attachments;
    #[doc = include_str!("../../../docs/guides/tasks.md")]
    pub struct Tasks;
    #[doc = include_str!("../../../docs/guides/sdk.md")]
    pub struct Sdk;
}

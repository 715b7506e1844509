//! What the blob tests share: a closed blob stream to create, and bytes to store.

use attache_core::{ContentType, StreamPath};
use attache_storage::CreateStream;
use bytes::Bytes;

/// A closed octet-stream stream at `path`, to hold a blob.
pub fn blob_stream(path: &str) -> CreateStream {
    CreateStream {
        path: StreamPath::new(path).unwrap(),
        content_type: Some(ContentType::octet_stream()),
        ttl: None,
        expires_at: None,
        closed: true,
        initial: Bytes::new(),
        fork: None,
        owner: None,
        take_kept_path: false,
    }
}

/// Bytes that differ at every position a wrong offset or a misplaced part could land on.
pub fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32).map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 13) as u8).collect()
}

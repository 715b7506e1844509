//! A read's body named by where its bytes lie instead of copied out: a range
//! of one file, framed by a few bytes before and after it.
//!
//! Why (issue 11, docs/ARCHITECTURE.md "Large reads leave by sendfile"): a
//! 1 MiB catch-up read spent its server CPU in two kernel copies, the `pread`
//! into the response buffer (15%) and the write into the socket (22%); user
//! space was under 5%. Handed a [`FileBody`], the lean HTTP/1 path sends the
//! range with `sendfile(2)` ([`FileBody::send_to`]): the page cache goes to
//! the socket with one copy and no buffer of the server's in between.
//! Every other writer (hyper, HTTP/2) reads the same range in bounded chunks
//! ([`FileBody::chunks`]), as blob reads do.
//!
//! What makes this safe: the range lies below the stream's committed tail
//! when the read is planned, and those bytes of a segment file never change
//! afterwards (docs/ARCHITECTURE.md says why); the body holds the file open,
//! so a stream deleted meanwhile (its file unlinked) still sends the bytes the
//! read saw. Each body holds one of a fixed number of permits while it lives
//! ([`FILE_BODIES_MAX`]): the open files they hold stay bounded.

use std::fs::File;
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt as _;

use crate::error::StoreResult;

/// Most file bodies alive at once, per store. Each may hold a segment file
/// open after the store's handle cache closed it (one descriptor each, out of
/// the descriptors the server keeps free beside connections and segment
/// files); past it a read is copied into memory as before.
pub const FILE_BODIES_MAX: usize = 64;

/// A body of `prefix`, then `len` bytes of `file` from offset `at`, then
/// `suffix`. Cheap to clone: clones share the file and the permit.
#[derive(Clone)]
pub struct FileBody {
    file: Arc<File>,
    at: u64,
    len: u64,
    prefix: &'static [u8],
    suffix: &'static [u8],
    /// Permits for the positioned reads of [`FileBody::chunks`] (the store's read permits).
    reads: Option<Arc<tokio::sync::Semaphore>>,
    _held: Arc<tokio::sync::OwnedSemaphorePermit>,
}

impl std::fmt::Debug for FileBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileBody").field("at", &self.at).field("len", &self.len).finish_non_exhaustive()
    }
}

impl FileBody {
    pub(crate) fn new(
        file: Arc<File>,
        at: u64,
        len: u64,
        framing: (&'static [u8], &'static [u8]),
        reads: Option<Arc<tokio::sync::Semaphore>>,
        held: tokio::sync::OwnedSemaphorePermit,
    ) -> FileBody {
        FileBody { file, at, len, prefix: framing.0, suffix: framing.1, reads, _held: Arc::new(held) }
    }

    /// Bytes of the whole body: prefix, file range and suffix.
    pub fn len(&self) -> u64 {
        self.prefix.len() as u64 + self.len + self.suffix.len() as u64
    }

    /// Never true: a read is answered with a file only when it has bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What goes before the file's bytes (JSON: `[`).
    pub fn prefix(&self) -> &'static [u8] {
        self.prefix
    }

    /// What goes after them (JSON: `]`).
    pub fn suffix(&self) -> &'static [u8] {
        self.suffix
    }

    /// Bytes of the file range.
    pub fn file_len(&self) -> u64 {
        self.len
    }

    /// One `sendfile(2)` of the file range from its byte `from` on into
    /// `socket`: how many bytes the socket took (0 only when the file ends
    /// early, which the caller treats as an error). On a non-blocking
    /// socket that has no room this is `WouldBlock`, and the caller waits
    /// for it to be writable. `Unsupported` where the kernel cannot send
    /// from this file (the caller then copies [`FileBody::file_chunks`]).
    pub fn send_to(&self, socket: std::os::fd::BorrowedFd<'_>, from: u64) -> std::io::Result<usize> {
        send_file(&self.file, socket, self.at + from, self.len.saturating_sub(from))
    }

    /// The file range from its byte `from` on, in chunks of at most
    /// [`crate::BLOB_CHUNK`] bytes, each read on the blocking pool only when
    /// asked for (a slow consumer holds one chunk, and no thread).
    pub fn file_chunks(&self, from: u64) -> BoxStream<'static, StoreResult<Bytes>> {
        let start = self.at + from.min(self.len);
        let held = self._held.clone();
        crate::blob::file_range(self.file.clone(), start..self.at + self.len, self.reads.clone())
            .map(move |chunk| {
                // The permit lives as long as the stream.
                let _ = &held;
                chunk
            })
            .boxed()
    }

    /// The whole body (prefix, file range, suffix) in bounded chunks: how it
    /// goes out where `sendfile` cannot be used.
    pub fn chunks(&self) -> BoxStream<'static, StoreResult<Bytes>> {
        let framing =
            |bytes: &'static [u8]| futures::stream::iter((!bytes.is_empty()).then(|| Ok(Bytes::from_static(bytes))));
        framing(self.prefix).chain(self.file_chunks(0)).chain(framing(self.suffix)).boxed()
    }
}

/// Largest count one `sendfile` call takes (Linux's own cap).
const SENDFILE_MAX: u64 = 0x7fff_f000;

#[cfg(target_os = "linux")]
fn send_file(file: &File, socket: std::os::fd::BorrowedFd<'_>, at: u64, len: u64) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd as _;
    let mut offset =
        libc::off_t::try_from(at).map_err(|_| std::io::Error::other("file offset out of range for sendfile"))?;
    let count = len.min(SENDFILE_MAX) as usize;
    // SAFETY: both descriptors are open for the call (`file` and the borrowed
    // socket); the kernel reads `offset` and writes it back, nothing else.
    let n = unsafe { libc::sendfile(socket.as_raw_fd(), file.as_raw_fd(), &mut offset, count) };
    if n < 0 {
        let err = std::io::Error::last_os_error();
        // The file cannot be spliced from (a file system without it).
        if matches!(err.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP)) {
            return Err(std::io::Error::new(std::io::ErrorKind::Unsupported, err));
        }
        return Err(err);
    }
    Ok(n as usize)
}

#[cfg(not(target_os = "linux"))]
fn send_file(_file: &File, _socket: std::os::fd::BorrowedFd<'_>, _at: u64, _len: u64) -> std::io::Result<usize> {
    Err(std::io::ErrorKind::Unsupported.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read as _, Write as _};
    use std::os::fd::AsFd as _;

    fn body_of(bytes: &[u8], at: u64, len: u64, framing: (&'static [u8], &'static [u8])) -> FileBody {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(bytes).unwrap();
        let permits = Arc::new(tokio::sync::Semaphore::new(1));
        let held = permits.try_acquire_owned().unwrap();
        FileBody::new(Arc::new(file), at, len, framing, None, held)
    }

    #[tokio::test]
    async fn chunks_are_the_framing_around_exactly_the_range() {
        let bytes: Vec<u8> = (0..700_000u32).map(|i| (i % 253) as u8).collect();
        let body = body_of(&bytes, 1_000, 600_000, (b"[", b"]"));
        assert_eq!(body.len(), 600_002);
        let chunks: Vec<Bytes> = body.chunks().map(|c| c.unwrap()).collect().await;
        assert!(chunks.iter().all(|c| c.len() <= crate::BLOB_CHUNK));
        let all: Vec<u8> = chunks.concat();
        assert_eq!(all.len(), 600_002);
        assert_eq!((all[0], all[all.len() - 1]), (b'[', b']'));
        assert_eq!(&all[1..all.len() - 1], &bytes[1_000..601_000]);
        let rest: Vec<u8> = body.file_chunks(599_990).map(|c| c.unwrap()).collect::<Vec<_>>().await.concat();
        assert_eq!(&rest[..], &bytes[600_990..601_000]);
    }

    #[test]
    fn sendfile_sends_exactly_the_range_from_any_point() {
        let bytes: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let body = body_of(&bytes, 5, 200_000, (b"", b""));
        let (mut near, far) = std::os::unix::net::UnixStream::pair().unwrap();
        let sender = std::thread::spawn(move || {
            let mut sent = 7u64;
            while sent < body.file_len() {
                let n = body.send_to(far.as_fd(), sent).unwrap();
                assert!(n > 0);
                sent += n as u64;
            }
        });
        let mut got = Vec::new();
        near.read_to_end(&mut got).unwrap();
        sender.join().unwrap();
        assert_eq!(&got[..], &bytes[12..200_005]);
    }
}

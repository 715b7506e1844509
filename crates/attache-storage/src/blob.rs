//! Blob bytes: staging them on the way in, and ranged reads on the way out.
//!
//! **Staging** ([`BlobWriter`]): written as they stream, hashed on the way,
//! synced once at the end. Memory stays flat whatever the size.
//!
//! Chunks gather into batches of [`BATCH`] bytes; each full batch is hashed
//! and written by one short job on the blocking pool while the next batch
//! arrives from the client, so receiving, hashing and writing overlap. At
//! most one job per upload runs at a time (the backpressure: a slow disk
//! slows the upload, it never fills memory), and no thread waits on the
//! client: an upload whose client sends slowly holds no thread between its
//! batches, so slow uploads cannot starve the bounded blocking pool
//! (`--blocking-threads`) that reads and other uploads share.
//!
//! **Reading** ([`BlobRead`]): every backend answers
//! [`StreamStore::read_blob`](crate::StreamStore::read_blob) with the blob's
//! length and a stream of the asked range in chunks of at most
//! [`BLOB_CHUNK`] bytes. A local file is read by [`file_range`]: one
//! positioned read per chunk on the blocking pool, taken only when the
//! consumer asks for the next chunk (a slow client holds no thread and at
//! most one chunk).

use std::io::Write;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::BoxStream;
use sha2::{Digest, Sha256};
use tokio::task::JoinHandle;

use crate::error::{StoreError, StoreResult};
use crate::fault::{FaultPlan, FaultPoint};
use crate::health::{Health, Source};
use crate::model::StagedBlob;

/// Bytes gathered before a batch is hashed and written: large enough that a
/// job's cost is the work, not the hop to a thread; small enough that an
/// upload holds at most two of them (one gathering, one being written).
const BATCH: usize = 256 * 1024;

/// What a batch job takes and gives back: the file and the running hash.
struct Sink {
    file: StagingFile,
    hash: Sha256,
}

impl Sink {
    fn take(mut self, chunks: Vec<Bytes>) -> std::io::Result<Sink> {
        for chunk in &chunks {
            self.hash.update(chunk);
            self.file.write_all(chunk)?;
        }
        Ok(self)
    }
}

pub struct BlobWriter {
    path: PathBuf,
    /// The file and hash, when no batch job holds them.
    sink: Option<Sink>,
    /// The batch job writing now, if any; it gives the sink back.
    writing: Option<JoinHandle<std::io::Result<Sink>>>,
    /// Chunks gathered for the next batch, and their length.
    gathered: Vec<Bytes>,
    gathered_len: usize,
    len: u64,
    /// Where disk errors are reported (the store's write-health signal).
    health: Option<Arc<Health>>,
}

/// The staging file, with its writes through the fault seam.
struct StagingFile {
    file: std::fs::File,
    faults: Option<FaultPlan>,
}

impl Write for StagingFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.faults.is_none() {
            return self.file.write(buf);
        }
        let file = &mut self.file;
        crate::fault::write(self.faults.as_ref(), FaultPoint::BlobWrite, buf, |b| file.write_all(b))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

fn stopped() -> StoreError {
    StoreError::Storage("blob writer already finished".into())
}

impl BlobWriter {
    pub async fn create(path: PathBuf) -> StoreResult<BlobWriter> {
        BlobWriter::create_with(path, None, None).await
    }

    /// A staging file whose writes go through `faults` and whose disk errors `health` hears of.
    pub(crate) async fn create_with(
        path: PathBuf,
        faults: Option<FaultPlan>,
        health: Option<Arc<Health>>,
    ) -> StoreResult<BlobWriter> {
        let file = match tokio::fs::OpenOptions::new().write(true).create_new(true).open(&path).await {
            Ok(file) => file.into_std().await,
            Err(e) => {
                let err = StoreError::from(e);
                if let Some(health) = &health {
                    health.fail(Source::Blob, &err);
                }
                return Err(err);
            }
        };
        Ok(BlobWriter {
            path,
            sink: Some(Sink { file: StagingFile { file, faults }, hash: Sha256::new() }),
            writing: None,
            gathered: Vec::new(),
            gathered_len: 0,
            len: 0,
            health,
        })
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub async fn write(&mut self, chunk: Bytes) -> StoreResult<()> {
        if self.sink.is_none() && self.writing.is_none() {
            return Err(stopped());
        }
        self.len += chunk.len() as u64;
        self.gathered_len += chunk.len();
        self.gathered.push(chunk);
        if self.gathered_len >= BATCH {
            self.start_batch().await?;
        }
        Ok(())
    }

    /// Waits for the batch job in flight (if any) and takes the sink back.
    async fn sink(&mut self) -> StoreResult<Sink> {
        if let Some(job) = self.writing.take() {
            let done = job.await.map_err(|e| StoreError::Storage(e.to_string()))?;
            match done {
                Ok(sink) => return Ok(sink),
                Err(e) => {
                    let err = StoreError::from(e);
                    self.report(&err);
                    return Err(err);
                }
            }
        }
        self.sink.take().ok_or_else(stopped)
    }

    /// Hands the gathered chunks to a job, after the previous job is done.
    async fn start_batch(&mut self) -> StoreResult<()> {
        let sink = self.sink().await?;
        let chunks = std::mem::take(&mut self.gathered);
        self.gathered_len = 0;
        self.writing = Some(tokio::task::spawn_blocking(move || sink.take(chunks)));
        Ok(())
    }

    /// Writes what is left, syncs the bytes; they are durable once this returns.
    pub async fn finish(mut self) -> StoreResult<StagedBlob> {
        let sink = self.sink().await?;
        let chunks = std::mem::take(&mut self.gathered);
        let last = tokio::task::spawn_blocking(move || {
            let sink = sink.take(chunks)?;
            let Sink { file, hash } = sink;
            crate::fault::sync(file.faults.as_ref(), FaultPoint::BlobSync, || file.file.sync_all())?;
            Ok::<_, std::io::Error>(hash.finalize())
        });
        let digest = match last.await.map_err(|e| StoreError::Storage(e.to_string()))? {
            Ok(digest) => digest,
            Err(e) => {
                let err = StoreError::from(e);
                self.report(&err);
                return Err(err);
            }
        };
        if let Some(health) = &self.health {
            health.recovered(Source::Blob);
        }
        Ok(StagedBlob { path: std::mem::take(&mut self.path), sha256: hex::encode(digest), len: self.len })
    }
}

impl BlobWriter {
    fn report(&self, err: &StoreError) {
        if let Some(health) = &self.health {
            health.fail(Source::Blob, err);
        }
    }
}

impl Drop for BlobWriter {
    /// An unfinished upload leaves nothing behind (a batch job still writing
    /// writes to the unlinked file, which goes when the job ends).
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Largest chunk a blob read yields: large enough that a chunk's cost is the
/// bytes, not the hop to a blocking thread; small enough that a reader holds
/// little while its client is slow.
pub const BLOB_CHUNK: usize = 256 * 1024;

/// The answer to a ranged blob read.
pub struct BlobRead {
    /// The whole blob's length.
    pub len: u64,
    /// The bytes `body` yields: the asked range cut at `len` (empty, at
    /// `len..len`, when the asked range starts at or past the end, or is empty).
    pub range: Range<u64>,
    /// `range`'s bytes in order, in chunks of 1 to [`BLOB_CHUNK`] bytes. An
    /// error ends it (the bytes may have been deleted or the disk failed
    /// since the read began).
    pub body: BoxStream<'static, StoreResult<Bytes>>,
}

impl std::fmt::Debug for BlobRead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobRead").field("len", &self.len).field("range", &self.range).finish_non_exhaustive()
    }
}

/// `asked` cut to a blob of `len` bytes; `len..len` when nothing of it is there.
pub fn clamp_range(asked: &Range<u64>, len: u64) -> Range<u64> {
    let end = asked.end.min(len);
    if asked.start >= end {
        return len..len;
    }
    asked.start..end
}

/// Whether `sha256` can name a blob (64 hex digits): anything else is a
/// client's guess that never reaches a path.
pub fn is_blob_name(sha256: &str) -> bool {
    sha256.len() == 64 && sha256.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A read of `range` (already within the file) of an open blob file: one
/// positioned read of at most [`BLOB_CHUNK`] bytes per chunk, on the blocking
/// pool, each behind a permit of `permits` when given (the embedded store's
/// read permits).
pub(crate) fn file_range(
    file: Arc<std::fs::File>,
    range: Range<u64>,
    permits: Option<Arc<tokio::sync::Semaphore>>,
) -> BoxStream<'static, StoreResult<Bytes>> {
    use futures::StreamExt;
    let end = range.end;
    let chunks = futures::stream::try_unfold(range.start, move |pos| {
        let file = file.clone();
        let permits = permits.clone();
        async move {
            if pos >= end {
                return Ok(None);
            }
            let want = ((end - pos) as usize).min(BLOB_CHUNK);
            let _permit = match permits {
                Some(p) => Some(p.acquire_owned().await.map_err(|_| StoreError::ShuttingDown)?),
                None => None,
            };
            let chunk = tokio::task::spawn_blocking(move || {
                use std::os::unix::fs::FileExt;
                let mut buf = vec![0u8; want];
                file.read_exact_at(&mut buf, pos)?;
                Ok::<_, std::io::Error>(Bytes::from(buf))
            })
            .await
            .map_err(|e| StoreError::Storage(format!("blob read task failed: {e}")))??;
            Ok(Some((chunk, pos + want as u64)))
        }
    });
    chunks.boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn staged_bytes_hash_and_land_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = BlobWriter::create(dir.path().join("s")).await.unwrap();
        let mut all = Vec::new();
        for i in 0..200u32 {
            let chunk: Vec<u8> = (0..(i * 37 % 5000)).map(|j| (i ^ j) as u8).collect();
            all.extend_from_slice(&chunk);
            w.write(Bytes::from(chunk)).await.unwrap();
        }
        let staged = w.finish().await.unwrap();
        assert_eq!(staged.len, all.len() as u64);
        assert_eq!(staged.sha256, hex::encode(Sha256::digest(&all)));
        assert_eq!(std::fs::read(&staged.path).unwrap(), all);
    }

    #[tokio::test]
    async fn an_abandoned_upload_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let mut w = BlobWriter::create(path.clone()).await.unwrap();
        w.write(Bytes::from_static(b"partial")).await.unwrap();
        drop(w);
        assert!(!path.exists());
    }
}

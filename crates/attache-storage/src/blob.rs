//! Staging blob bytes: written as they stream, hashed on the way, synced
//! once at the end. Memory stays flat whatever the size.
//!
//! Hashing and writing each run on their own blocking thread, fed the same
//! chunks (shared `Bytes`, no copies) through small bounded channels, so
//! SHA-256, the write syscalls and receiving the next chunk overlap instead
//! of taking turns. The bounded channels are the backpressure: a slow disk
//! slows the upload, it never fills memory.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::error::{StoreError, StoreResult};
use crate::fault::{FaultPlan, FaultPoint};
use crate::health::{Health, Source};
use crate::model::StagedBlob;

/// Chunks in flight per stage.
const DEPTH: usize = 8;

pub struct BlobWriter {
    path: PathBuf,
    to_hasher: Option<mpsc::Sender<Bytes>>,
    to_disk: Option<mpsc::Sender<Bytes>>,
    hasher: Option<JoinHandle<[u8; 32]>>,
    disk: Option<JoinHandle<std::io::Result<()>>>,
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
        let (to_hasher, mut hash_rx) = mpsc::channel::<Bytes>(DEPTH);
        let (to_disk, mut disk_rx) = mpsc::channel::<Bytes>(DEPTH);
        let hasher = tokio::task::spawn_blocking(move || {
            let mut h = Sha256::new();
            while let Some(chunk) = hash_rx.blocking_recv() {
                h.update(&chunk);
            }
            h.finalize().into()
        });
        let disk = tokio::task::spawn_blocking(move || {
            let mut out = std::io::BufWriter::with_capacity(1 << 20, StagingFile { file, faults });
            while let Some(chunk) = disk_rx.blocking_recv() {
                out.write_all(&chunk)?;
            }
            let staged = out.into_inner().map_err(|e| e.into_error())?;
            crate::fault::sync(staged.faults.as_ref(), FaultPoint::BlobSync, || staged.file.sync_all())
        });
        Ok(BlobWriter {
            path,
            to_hasher: Some(to_hasher),
            to_disk: Some(to_disk),
            hasher: Some(hasher),
            disk: Some(disk),
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
        let (Some(h), Some(d)) = (&self.to_hasher, &self.to_disk) else { return Err(stopped()) };
        let n = chunk.len() as u64;
        if h.send(chunk.clone()).await.is_err() || d.send(chunk).await.is_err() {
            // A stage stopped early: the disk writer failed. Its error says why.
            self.to_hasher = None;
            self.to_disk = None;
            let err = match self.disk.take() {
                Some(disk) => match disk.await {
                    Ok(Err(e)) => e.into(),
                    _ => stopped(),
                },
                None => stopped(),
            };
            self.report(&err);
            return Err(err);
        }
        self.len += n;
        Ok(())
    }

    /// Waits for both stages, syncs the bytes; they are durable once this returns.
    pub async fn finish(mut self) -> StoreResult<StagedBlob> {
        self.to_hasher = None;
        self.to_disk = None;
        let disk = self.disk.take().ok_or_else(stopped)?;
        let hasher = self.hasher.take().ok_or_else(stopped)?;
        let written = disk.await.map_err(|e| StoreError::Storage(e.to_string()))?;
        if let Err(e) = written {
            let err = StoreError::from(e);
            self.report(&err);
            return Err(err);
        }
        if let Some(health) = &self.health {
            health.recovered(Source::Blob);
        }
        let digest = hasher.await.map_err(|e| StoreError::Storage(e.to_string()))?;
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
    /// An unfinished upload leaves nothing behind (the stages stop when their channels close).
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
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

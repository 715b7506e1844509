//! Staging blob bytes: written as they stream, hashed on the way, synced
//! once at the end. Memory stays flat whatever the size.

use std::path::PathBuf;

use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::error::{StoreError, StoreResult};
use crate::model::StagedBlob;

pub struct BlobWriter {
    path: PathBuf,
    file: Option<tokio::io::BufWriter<tokio::fs::File>>,
    hasher: Sha256,
    len: u64,
}

impl BlobWriter {
    pub async fn create(path: PathBuf) -> StoreResult<BlobWriter> {
        let file = tokio::fs::OpenOptions::new().write(true).create_new(true).open(&path).await?;
        Ok(BlobWriter {
            path,
            file: Some(tokio::io::BufWriter::with_capacity(1 << 20, file)),
            hasher: Sha256::new(),
            len: 0,
        })
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub async fn write(&mut self, chunk: &[u8]) -> StoreResult<()> {
        let file = self.file.as_mut().ok_or_else(|| StoreError::Storage("blob writer already finished".into()))?;
        self.hasher.update(chunk);
        file.write_all(chunk).await?;
        self.len += chunk.len() as u64;
        Ok(())
    }

    /// Flushes and syncs the bytes; they are durable once this returns.
    pub async fn finish(mut self) -> StoreResult<StagedBlob> {
        let mut file = self.file.take().ok_or_else(|| StoreError::Storage("blob writer already finished".into()))?;
        file.flush().await?;
        let inner = file.into_inner();
        inner.sync_all().await?;
        let sha256 = hex::encode(std::mem::take(&mut self.hasher).finalize());
        Ok(StagedBlob { path: std::mem::take(&mut self.path), sha256, len: self.len })
    }
}

impl Drop for BlobWriter {
    /// An unfinished upload leaves nothing behind.
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

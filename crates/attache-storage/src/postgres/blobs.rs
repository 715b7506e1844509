//! Blob bytes in an object store, reference counts in PostgreSQL.
//!
//! An upload is staged in a local file (hashed and synced as it streams),
//! then *pinned* (a row in `attache_blobs` that collection leaves alone until
//! the pin expires), uploaded under `blobs/<aa>/<sha256>` unless those bytes
//! are already there, and only then referenced by the stream that holds it,
//! in the writer's batch. Collection deletes an object only while holding
//! its row locked with no references and no live pin, and deletes the object
//! before the row: an upload that pins after that finds no row and uploads
//! again. Reads go through a local cache of whole blobs (content-addressed,
//! so a cached copy is never stale).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, PutPayload, WriteMultipart};
use sqlx::PgPool;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{db_err, now_ms, PgConfig};
use crate::error::{StoreError, StoreResult};
use crate::model::StagedBlob;

/// Blobs up to this size go up in one request; bigger ones in parts of it.
const PART_BYTES: usize = 8 << 20;

pub(crate) struct Blobs {
    objects: Arc<dyn ObjectStore>,
    staging: PathBuf,
    cache: PathBuf,
    grace_ms: i64,
}

fn object_path(sha256: &str) -> ObjectPath {
    ObjectPath::from(format!("blobs/{}/{sha256}", sha256.get(0..2).unwrap_or("xx")))
}

fn store_err(e: object_store::Error) -> StoreError {
    StoreError::Storage(format!("object store: {e}"))
}

/// Opens the object store named by `url` (`s3://`, `file://`, `memory://`).
pub(crate) fn object_store(url: &str) -> StoreResult<Arc<dyn ObjectStore>> {
    let bad = |why: String| StoreError::Invalid(format!("object store URL {url:?}: {why}"));
    let parsed = url::Url::parse(url).map_err(|e| bad(e.to_string()))?;
    match parsed.scheme() {
        "file" => {
            let dir = parsed.to_file_path().map_err(|_| bad("not a local path".into()))?;
            std::fs::create_dir_all(&dir)?;
            Ok(Arc::new(object_store::local::LocalFileSystem::new_with_prefix(dir).map_err(store_err)?))
        }
        "memory" => Ok(Arc::new(object_store::memory::InMemory::new())),
        "s3" | "s3a" => {
            let s3 = object_store::aws::AmazonS3Builder::from_env().with_url(url).build().map_err(store_err)?;
            let prefix = parsed.path().trim_matches('/');
            if prefix.is_empty() {
                Ok(Arc::new(s3))
            } else {
                Ok(Arc::new(object_store::prefix::PrefixStore::new(s3, prefix)))
            }
        }
        other => Err(bad(format!("unsupported scheme {other:?} (use s3://, file:// or memory://)"))),
    }
}

impl Blobs {
    pub(crate) fn open(config: &PgConfig) -> StoreResult<Blobs> {
        let url = match &config.object_store_url {
            Some(url) => url.clone(),
            None => {
                let dir = config.data_dir.join("objects");
                std::fs::create_dir_all(&dir)?;
                let dir = dir.canonicalize()?;
                format!("file://{}", dir.display())
            }
        };
        let objects = object_store(&url)?;
        let staging = config.data_dir.join("staging");
        let cache = config.data_dir.join("blob-cache");
        // Staging files belong to uploads that never finished.
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir_all(&staging)?;
        std::fs::create_dir_all(&cache)?;
        Ok(Blobs { objects, staging, cache, grace_ms: config.blob_grace.as_millis() as i64 })
    }

    pub(crate) async fn stage(&self) -> StoreResult<crate::BlobWriter> {
        let name = format!("{}-{:016x}", now_ms(), rand::random::<u64>());
        crate::BlobWriter::create(self.staging.join(name)).await
    }

    fn cached(&self, sha256: &str) -> PathBuf {
        self.cache.join(sha256.get(0..2).unwrap_or("xx")).join(sha256)
    }

    /// Pins, uploads (unless present) and keeps a local copy; the caller then
    /// references the blob in a batch. The staging file is gone afterwards.
    pub(crate) async fn publish(&self, pool: &PgPool, staged: StagedBlob) -> StoreResult<()> {
        let result = self.publish_inner(pool, &staged).await;
        let _ = tokio::fs::remove_file(&staged.path).await;
        result
    }

    async fn publish_inner(&self, pool: &PgPool, staged: &StagedBlob) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO attache_blobs (sha256, len, refs, pinned_until_ms) VALUES ($1, $2, 0, $3) \
             ON CONFLICT (sha256) DO UPDATE SET pinned_until_ms = GREATEST(attache_blobs.pinned_until_ms, $3)",
        )
        .bind(&staged.sha256)
        .bind(staged.len as i64)
        .bind(now_ms() + self.grace_ms)
        .execute(pool)
        .await
        .map_err(db_err)?;
        let target = object_path(&staged.sha256);
        match self.objects.head(&target).await {
            Ok(meta) if meta.size == staged.len => {}
            Ok(_) | Err(object_store::Error::NotFound { .. }) => self.upload(&staged.path, &target).await?,
            Err(e) => return Err(store_err(e)),
        }
        let local = self.cached(&staged.sha256);
        if tokio::fs::metadata(&local).await.is_err() {
            if let Some(dir) = local.parent() {
                tokio::fs::create_dir_all(dir).await?;
            }
            tokio::fs::rename(&staged.path, &local).await?;
        }
        Ok(())
    }

    async fn upload(&self, file: &Path, target: &ObjectPath) -> StoreResult<()> {
        let mut file = tokio::fs::File::open(file).await?;
        let len = file.metadata().await?.len() as usize;
        if len <= PART_BYTES {
            let mut buf = Vec::with_capacity(len);
            file.read_to_end(&mut buf).await?;
            self.objects.put(target, PutPayload::from(buf)).await.map_err(store_err)?;
            return Ok(());
        }
        let upload = self.objects.put_multipart(target).await.map_err(store_err)?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
        let mut buf = vec![0u8; 1 << 20];
        loop {
            // Memory stays bounded: at most a few parts in flight.
            writer.wait_for_capacity(4).await.map_err(store_err)?;
            let n = file.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            writer.write(&buf[..n]);
        }
        writer.finish().await.map_err(store_err)?;
        Ok(())
    }

    /// A local copy of the blob, fetched from the object store if this instance has none.
    pub(crate) async fn local(&self, sha256: &str) -> StoreResult<PathBuf> {
        let local = self.cached(sha256);
        if tokio::fs::metadata(&local).await.is_ok() {
            return Ok(local);
        }
        let got = match self.objects.get(&object_path(sha256)).await {
            Ok(got) => got,
            Err(object_store::Error::NotFound { .. }) => return Err(StoreError::NotFound),
            Err(e) => return Err(store_err(e)),
        };
        let tmp = self.staging.join(format!("fetch-{}-{:016x}", now_ms(), rand::random::<u64>()));
        let fetched = async {
            let mut out = tokio::fs::File::create(&tmp).await?;
            let mut body = got.into_stream();
            while let Some(chunk) = body.next().await {
                out.write_all(&chunk.map_err(store_err)?).await?;
            }
            out.flush().await?;
            if let Some(dir) = local.parent() {
                tokio::fs::create_dir_all(dir).await?;
            }
            tokio::fs::rename(&tmp, &local).await?;
            Ok::<_, StoreError>(())
        }
        .await;
        if fetched.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        fetched.map(|_| local)
    }

    /// Deletes blobs no stream holds and no upload has pinned.
    pub(crate) async fn collect_garbage(&self, pool: &PgPool) -> StoreResult<usize> {
        let candidates: Vec<(String,)> =
            sqlx::query_as("SELECT sha256 FROM attache_blobs WHERE refs = 0 AND pinned_until_ms < $1 LIMIT 100")
                .bind(now_ms())
                .fetch_all(pool)
                .await
                .map_err(db_err)?;
        let mut removed = 0;
        for (sha,) in candidates {
            let mut tx = pool.begin().await.map_err(db_err)?;
            let still: Option<(String,)> = sqlx::query_as(
                "SELECT sha256 FROM attache_blobs WHERE sha256 = $1 AND refs = 0 AND pinned_until_ms < $2 \
                 FOR UPDATE SKIP LOCKED",
            )
            .bind(&sha)
            .bind(now_ms())
            .fetch_optional(&mut *tx)
            .await
            .map_err(db_err)?;
            if still.is_none() {
                continue;
            }
            // The object goes first, while the row is locked: see the module comment.
            match self.objects.delete(&object_path(&sha)).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(store_err(e)),
            }
            sqlx::query("DELETE FROM attache_blobs WHERE sha256 = $1")
                .bind(&sha)
                .execute(&mut *tx)
                .await
                .map_err(db_err)?;
            tx.commit().await.map_err(db_err)?;
            let _ = tokio::fs::remove_file(self.cached(&sha)).await;
            removed += 1;
        }
        Ok(removed)
    }
}

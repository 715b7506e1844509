//! Blob bytes in an object store, reference counts in PostgreSQL.
//!
//! An upload is staged in a local file (hashed and synced as it streams),
//! then *pinned* (a row in `attache_blobs` that collection leaves alone until
//! the pin expires), uploaded under `blobs/<aa>/<sha256>` unless those bytes
//! are already there (read into memory a part at a time, within the budget
//! of all uploads: `upload_budget.rs`), and only then referenced by the
//! stream that holds it, in the writer's batch. Collection deletes an object only while holding
//! its row locked with no references and no live pin, and deletes the object
//! before the row: an upload that pins after that finds no row and uploads
//! again.
//!
//! Reads fetch only the bytes asked for: from the bounded local cache of whole
//! blobs when it holds the blob (`blob_cache.rs`), else by one ranged GET of
//! the object store, streamed to the reader through a channel of a few
//! chunks (a reader that stops stops the fetch). A read of a whole blob that
//! the cache admits is written to it on the way past.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{GetOptions, GetRange, MultipartUpload, ObjectStore, PutPayload};
use sqlx::PgPool;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::blob_cache::BlobCache;
use super::upload_budget::UploadBudget;
use super::{db_err, now_ms, PgConfig};
use crate::blob::{clamp_range, file_range, BlobRead, BLOB_CHUNK};
use crate::error::{StoreError, StoreResult};
use crate::model::StagedBlob;

/// Chunks a fetch holds for its reader before it waits for the reader.
const FETCH_AHEAD: usize = 2;

/// Blobs up to this size go up in one request; bigger ones in parts of it.
/// S3 allows parts from 5 MiB and at most 10,000 of them: 8 MiB parts carry
/// blobs up to 78 GiB in fewer requests, and the budget, not the part size,
/// bounds the memory all uploads hold.
pub(crate) const PART_BYTES: usize = 8 << 20;

/// Parts one upload sends at once (the budget permitting).
const PARTS_IN_FLIGHT: usize = 4;

pub(crate) struct Blobs {
    objects: Arc<dyn ObjectStore>,
    staging: PathBuf,
    cache: Arc<BlobCache>,
    budget: UploadBudget,
    grace_ms: i64,
}

/// The outcome of one part's send, from [`JoinSet::join_next`].
fn part_sent(joined: Option<Result<object_store::Result<()>, tokio::task::JoinError>>) -> StoreResult<()> {
    match joined {
        Some(Ok(sent)) => sent.map_err(store_err),
        Some(Err(e)) => Err(StoreError::Storage(format!("part upload task failed: {e}"))),
        None => Ok(()),
    }
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
        // Staging files belong to uploads (and cache fills) that never finished.
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir_all(&staging)?;
        let cache = Arc::new(BlobCache::open(config.data_dir.join("blob-cache"), config.blob_cache_bytes)?);
        let budget = UploadBudget::new(config.upload_buffer_bytes, PART_BYTES);
        Ok(Blobs { objects, staging, cache, budget, grace_ms: config.blob_grace.as_millis() as i64 })
    }

    pub(crate) async fn stage(&self) -> StoreResult<crate::BlobWriter> {
        let name = format!("{}-{:016x}", now_ms(), rand::random::<u64>());
        crate::BlobWriter::create(self.staging.join(name)).await
    }

    /// Pins, uploads (unless present) and keeps a local copy if the cache admits it; the caller then
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
        // The staged file is synced (`BlobWriter::finish`): it moves in as it is.
        self.cache.adopt(&staged.sha256, staged.len, &staged.path).await
    }

    /// Sends the staged `file` to `target`: one `PUT` up to [`PART_BYTES`], else
    /// parts of it, at most [`PARTS_IN_FLIGHT`] at once. Each part (or small
    /// blob) is read into memory only once the budget has room for it, and
    /// gives the room back when its send is over (`upload_budget.rs`).
    async fn upload(&self, file: &Path, target: &ObjectPath) -> StoreResult<()> {
        let mut file = tokio::fs::File::open(file).await?;
        let len = file.metadata().await?.len() as usize;
        if len <= PART_BYTES {
            let _held = self.budget.take(len).await?;
            let mut buf = vec![0u8; len];
            file.read_exact(&mut buf).await?;
            self.objects.put(target, PutPayload::from(buf)).await.map_err(store_err)?;
            return Ok(());
        }
        let mut upload = self.objects.put_multipart(target).await.map_err(store_err)?;
        let sent = self.send_parts(&mut file, len, upload.as_mut()).await;
        let done = match sent {
            Ok(()) => upload.complete().await.map(drop).map_err(store_err),
            Err(e) => Err(e),
        };
        if done.is_err() {
            // S3 keeps the parts of an upload neither completed nor aborted.
            if let Err(err) = upload.abort().await {
                tracing::debug!(%err, "multipart upload not aborted");
            }
        }
        done
    }

    async fn send_parts(
        &self,
        file: &mut tokio::fs::File,
        len: usize,
        upload: &mut dyn MultipartUpload,
    ) -> StoreResult<()> {
        // Spawned, so a part is sent while this upload waits for room for the
        // next (a part not polled would hold its room for ever); aborted if
        // this upload is dropped.
        let mut sending = JoinSet::new();
        let mut left = len;
        while left > 0 {
            if sending.len() >= PARTS_IN_FLIGHT {
                part_sent(sending.join_next().await)?;
            }
            let n = left.min(PART_BYTES);
            let held = self.budget.take(n).await?;
            let mut buf = vec![0u8; n];
            file.read_exact(&mut buf).await?;
            let part = upload.put_part(PutPayload::from(buf));
            sending.spawn(async move {
                let sent = part.await;
                drop(held);
                sent
            });
            left -= n;
        }
        while let Some(joined) = sending.join_next().await {
            part_sent(Some(joined))?;
        }
        Ok(())
    }

    /// The most bytes uploads have held in memory at once (never above the budget).
    pub(crate) fn upload_buffer_high_water(&self) -> u64 {
        self.budget.high_water()
    }

    /// Bytes `asked` of blob `sha256`: from the cache if it holds the blob,
    /// else by a ranged GET of the object store (see the module comment).
    pub(crate) async fn read(&self, sha256: &str, asked: Range<u64>) -> StoreResult<BlobRead> {
        if let Some(path) = self.cache.lookup(sha256) {
            let opened = tokio::task::spawn_blocking(move || {
                let file = std::fs::File::open(path)?;
                let len = file.metadata()?.len();
                Ok::<_, std::io::Error>((file, len))
            })
            .await
            .map_err(|e| StoreError::Storage(format!("blob read task failed: {e}")))?;
            match opened {
                Ok((file, len)) => {
                    let range = clamp_range(&asked, len);
                    let body = file_range(Arc::new(file), range.clone(), None);
                    return Ok(BlobRead { len, range, body });
                }
                // Evicted since the lookup: read the object store.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => self.cache.forget(sha256),
                Err(e) => return Err(e.into()),
            }
        }
        let location = object_path(sha256);
        // A ranged GET answers the object's length with the bytes; only a
        // range it refuses (empty, or starting past the end) costs a HEAD.
        let mut refused = None;
        if asked.start < asked.end {
            let options = GetOptions { range: Some(GetRange::Bounded(asked.clone())), ..GetOptions::default() };
            match self.objects.get_opts(&location, options).await {
                Ok(got) => {
                    let len = got.meta.size;
                    let range = got.range.clone();
                    let tee = if range == (0..len) && self.cache.admits(len) {
                        Some(Tee {
                            cache: self.cache.clone(),
                            sha256: sha256.to_owned(),
                            staging: self.staging.clone(),
                        })
                    } else {
                        None
                    };
                    let (tx, rx) = mpsc::channel(FETCH_AHEAD);
                    tokio::spawn(fetch(got.into_stream(), range.end - range.start, tx, tee));
                    let body = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) });
                    return Ok(BlobRead { len, range, body: body.boxed() });
                }
                Err(object_store::Error::NotFound { .. }) => return Err(StoreError::NotFound),
                Err(e) => refused = Some(e),
            }
        }
        let len = match self.objects.head(&location).await {
            Ok(meta) => meta.size,
            Err(object_store::Error::NotFound { .. }) => return Err(StoreError::NotFound),
            Err(e) => return Err(store_err(e)),
        };
        let range = clamp_range(&asked, len);
        if let (Some(e), false) = (refused, range.is_empty()) {
            // The range exists: the GET failed for another reason.
            return Err(store_err(e));
        }
        Ok(BlobRead { len, range, body: futures::stream::empty().boxed() })
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
            self.cache.remove(&sha).await;
            removed += 1;
        }
        Ok(removed)
    }
}

/// Where a whole-blob fetch is written on its way to the reader, to be cached.
struct Tee {
    cache: Arc<BlobCache>,
    sha256: String,
    staging: PathBuf,
}

/// A cache fill in progress: removed unless it completes.
struct Filling {
    file: tokio::fs::File,
    path: PathBuf,
    written: u64,
}

impl Drop for Filling {
    fn drop(&mut self) {
        // Moved into the cache by then if it completed (a no-op then).
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Hands `body` (`len` bytes) to the reader in chunks of at most
/// [`BLOB_CHUNK`], at most [`FETCH_AHEAD`] ahead of it, and (with a `tee`)
/// writes it to the cache. Stops when the reader goes: a partial fill is dropped.
async fn fetch(
    mut body: BoxStream<'static, object_store::Result<Bytes>>,
    len: u64,
    tx: mpsc::Sender<StoreResult<Bytes>>,
    tee: Option<Tee>,
) {
    let mut filling = match &tee {
        Some(tee) => {
            let path = tee.staging.join(format!("fill-{}-{:016x}", now_ms(), rand::random::<u64>()));
            match tokio::fs::File::create(&path).await {
                Ok(file) => Some(Filling { file, path, written: 0 }),
                Err(err) => {
                    tracing::debug!(%err, "blob cache fill not started");
                    None
                }
            }
        }
        None => None,
    };
    while let Some(next) = body.next().await {
        let mut chunk = match next {
            Ok(chunk) => chunk,
            Err(e) => {
                let _ = tx.send(Err(store_err(e))).await;
                return;
            }
        };
        if let Some(fill) = &mut filling {
            match fill.file.write_all(&chunk).await {
                Ok(()) => fill.written += chunk.len() as u64,
                Err(err) => {
                    tracing::debug!(%err, "blob cache fill abandoned");
                    filling = None;
                }
            }
        }
        while !chunk.is_empty() {
            let part = chunk.split_to(chunk.len().min(BLOB_CHUNK));
            if tx.send(Ok(part)).await.is_err() {
                return;
            }
        }
    }
    let (Some(mut fill), Some(tee)) = (filling, tee) else { return };
    if fill.written != len {
        return;
    }
    // Synced before it is renamed in: a cached copy is whole or absent, even after a power loss.
    let synced = async {
        fill.file.flush().await?;
        fill.file.sync_all().await?;
        Ok::<_, StoreError>(())
    }
    .await;
    let adopted = match synced {
        Ok(()) => tee.cache.adopt(&tee.sha256, len, &fill.path).await,
        Err(e) => Err(e),
    };
    if let Err(err) = adopted {
        tracing::debug!(%err, "blob cache fill not kept");
    }
}

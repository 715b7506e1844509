//! The PostgreSQL store's uploads to the object store hold at most
//! `upload_buffer_bytes` in memory all together, however many run at once,
//! and every upload still completes with its bytes intact. Runs on a
//! throwaway PostgreSQL cluster (or `ATTACHE_TEST_PG_URL`); without
//! PostgreSQL it prints why and passes (`ATTACHE_REQUIRE_SERVICES=1` makes
//! that a failure).

use attache_storage::postgres::test_cluster::TestCluster;
use attache_storage::postgres::{self, PgConfig};
use attache_storage::StreamStore;
use bytes::Bytes;
use futures::TryStreamExt;

const MIB: usize = 1 << 20;

mod blobs;
use blobs::{blob_stream, pattern};

#[test]
fn concurrent_uploads_hold_no_more_than_the_upload_buffer_budget() {
    let cluster = match TestCluster::start(false) {
        Ok(c) => c,
        Err(why) => return postgres::test_cluster::missing_service("PostgreSQL", &why),
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let url = cluster.fresh_database().await.unwrap();
        let (objects, scratch) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let budget = 16 * MIB;
        let mut config = PgConfig::new(url, scratch.path());
        config.object_store_url = Some(format!("file://{}", objects.path().display()));
        // Reads below come from the object store, not from a cached copy.
        config.blob_cache_bytes = 0;
        config.upload_buffer_bytes = budget as u64;
        let store = postgres::open(config).await.expect("open a postgres store").store;

        // Six multipart uploads (8 + 8 + 1 MiB and a few bytes) and four single PUTs (3 MiB).
        let sizes: Vec<usize> = (0..6).map(|i| 17 * MIB + 3 + i).chain((0..4).map(|i| 3 * MIB + i)).collect();
        let blobs: Vec<Vec<u8>> = sizes.iter().enumerate().map(|(i, &len)| pattern(len, i as u32)).collect();
        let mut staged = Vec::new();
        for bytes in &blobs {
            let mut writer = store.stage_blob().await.unwrap();
            for chunk in bytes.chunks(MIB) {
                writer.write(Bytes::copy_from_slice(chunk)).await.unwrap();
            }
            staged.push(writer.finish().await.unwrap());
        }
        let uploads = staged
            .into_iter()
            .enumerate()
            .map(|(i, blob)| store.create_blob_stream(blob_stream(&format!("/upload/{i}")), blob));
        let infos = futures::future::try_join_all(uploads).await.expect("every upload completes");

        let high_water = store.upload_buffer_high_water();
        assert!(high_water > 0, "uploads are metered");
        assert!(
            high_water <= budget as u64,
            "uploads held {high_water} bytes at once, over the budget of {budget} bytes"
        );
        for (i, (info, bytes)) in infos.iter().zip(&blobs).enumerate() {
            let sha = &info.blob.as_ref().expect("a blob stream").sha256;
            let read = store.read_blob(sha, 0..u64::MAX).await.unwrap();
            let got: Vec<Bytes> = read.body.try_collect().await.unwrap();
            assert!(got.concat() == *bytes, "upload {i}: the object store holds other bytes");
        }
        store.close().await;
    });
}

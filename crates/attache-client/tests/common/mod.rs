//! The one way the SDK tests run attache: the real server, in-process, on
//! `127.0.0.1:0` with a temporary data dir.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use attache_client::{EntityUrl, PrincipalKey, RuntimeServerClient, SpawnOptions};
use attache_server::{Server, ServerConfig};
use tempfile::TempDir;

pub struct TestServer {
    pub url: String,
    pub addr: SocketAddr,
    config: ServerConfig,
    server: Option<Server>,
    dir: TempDir,
}

impl TestServer {
    /// A dev-mode server with short live-read timeouts, so tests stay fast.
    pub async fn start() -> TestServer {
        TestServer::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut ServerConfig)) -> TestServer {
        let dir = tempfile::tempdir().expect("a temporary data dir");
        let mut config = ServerConfig::new("127.0.0.1:0".parse().expect("an address"), dir.path());
        config.long_poll_timeout = Duration::from_secs(1);
        config.sse_max_duration = Duration::from_secs(2);
        config.durable = false;
        tweak(&mut config);
        let server = Server::start(config.clone()).await.expect("the server starts");
        TestServer { url: format!("http://{}", server.addr), addr: server.addr, config, server: Some(server), dir }
    }

    /// Stops the server, then starts it again on the same data dir and the same port.
    pub async fn restart(&mut self) {
        if let Some(server) = self.server.take() {
            server.stop().await;
        }
        let mut config = self.config.clone();
        config.listen = self.addr;
        config.data_dir = self.dir.path().to_path_buf();
        let mut last = None;
        for _ in 0..50 {
            match Server::start(config.clone()).await {
                Ok(server) => {
                    self.server = Some(server);
                    return;
                }
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the server does not restart on {}: {last:?}", self.addr);
    }

    pub async fn stop(mut self) {
        if let Some(server) = self.server.take() {
            server.stop().await;
        }
    }

    /// A client that names no principal: the server treats it as `user:anonymous`.
    pub fn client(&self) -> RuntimeServerClient {
        RuntimeServerClient::new(&self.url).expect("a client")
    }

    /// A client acting as `principal` (e.g. `user:sam`).
    pub fn client_as(&self, principal: &str) -> RuntimeServerClient {
        self.client().with_principal(PrincipalKey::parse(principal).expect("a principal"))
    }

    pub fn data_dir(&self) -> &std::path::Path {
        self.dir.path()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            server.trigger_shutdown();
        }
    }
}

/// Spawns `/{type}/{id}` as `client`'s principal.
pub async fn spawn(client: &RuntimeServerClient, url: &str) -> EntityUrl {
    let entity = EntityUrl::parse(url).expect("an entity url");
    client.spawn_entity(&entity, &SpawnOptions::default()).await.expect("spawn succeeds");
    entity
}

/// A tiny valid PNG-sized payload: the bytes do not matter to the server.
pub fn image_bytes(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

//! `attache serve`: settings from flags, then environment, then a TOML
//! config file, then defaults; runs until SIGTERM or SIGINT.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use attache_server::{Server, ServerConfig};
use serde::Deserialize;

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Address to listen on [default: 127.0.0.1:4437]
    #[arg(long, env = "ATTACHE_LISTEN")]
    listen: Option<SocketAddr>,
    /// Where the embedded store keeps its files [default: ./attache-data]
    #[arg(long, env = "ATTACHE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// How long a long-poll read waits for data, e.g. 30s or 1500ms [default: 30s]
    #[arg(long, env = "ATTACHE_LONG_POLL_TIMEOUT", value_parser = humantime::parse_duration)]
    long_poll_timeout: Option<Duration>,
    /// Largest body of a stream append or create, in bytes [default: 16777216]
    #[arg(long, env = "ATTACHE_MAX_APPEND_BYTES")]
    max_append_bytes: Option<usize>,
    /// Largest attachment, in bytes [default: 1073741824]
    #[arg(long, env = "ATTACHE_MAX_ATTACHMENT_BYTES")]
    max_attachment_bytes: Option<u64>,
    /// Acknowledge writes before they are synced to disk (faster; a crash may lose the last moments)
    #[arg(long, env = "ATTACHE_NO_FSYNC")]
    no_fsync: bool,
    /// Who is asking: `dev` trusts the electric-principal header (loopback only),
    /// `token` requires Authorization: Bearer [default: dev on loopback, token elsewhere]
    #[arg(long, env = "ATTACHE_AUTH", value_parser = ["dev", "token"])]
    auth: Option<String>,
    /// A TOML file with any of: listen, data_dir, long_poll_timeout, max_append_bytes, no_fsync, auth
    #[arg(long, env = "ATTACHE_CONFIG")]
    config: Option<PathBuf>,
}

/// The config file: the same settings as the flags.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    long_poll_timeout: Option<String>,
    max_append_bytes: Option<usize>,
    max_attachment_bytes: Option<u64>,
    no_fsync: Option<bool>,
    auth: Option<String>,
}

fn resolve(args: ServeArgs) -> anyhow::Result<ServerConfig> {
    let file: FileConfig = match &args.config {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).with_context(|| format!("cannot read config file {}", path.display()))?;
            toml::from_str(&text).with_context(|| format!("config file {} is not valid", path.display()))?
        }
        None => FileConfig::default(),
    };
    let listen = args.listen.or(file.listen).unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 4437)));
    let data_dir = args.data_dir.or(file.data_dir).unwrap_or_else(|| PathBuf::from("./attache-data"));
    let mut config = ServerConfig::new(listen, data_dir);
    if let Some(t) = args.long_poll_timeout {
        config.long_poll_timeout = t;
    } else if let Some(t) = file.long_poll_timeout {
        config.long_poll_timeout = humantime::parse_duration(&t)
            .with_context(|| format!("long_poll_timeout {t:?} is not a duration like 2s"))?;
    }
    if let Some(n) = args.max_append_bytes.or(file.max_append_bytes) {
        config.max_append_bytes = n;
    }
    if let Some(n) = args.max_attachment_bytes.or(file.max_attachment_bytes) {
        config.max_attachment_bytes = n;
    }
    config.durable = !(args.no_fsync || file.no_fsync.unwrap_or(false));
    if let Some(mode) = args.auth.or(file.auth) {
        config.auth = Some(
            attache_server::auth::AuthMode::parse(&mode)
                .with_context(|| format!("auth must be dev or token, got {mode:?}"))?,
        );
    }
    Ok(config)
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let config = resolve(args)?;
    if !config.durable {
        tracing::warn!("--no-fsync: writes are acknowledged before they are on disk");
    }
    let server = Server::start(config).await?;
    shutdown_signal().await;
    tracing::info!("shutting down");
    server.stop().await;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

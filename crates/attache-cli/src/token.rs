//! `attache token create|list|revoke`: manage bearer tokens in the data
//! directory. Works whether or not the server runs; a running server sees
//! changes on the next request.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use attache_core::PrincipalKey;
use attache_storage::tokens::TokenStore;

#[derive(clap::Args, Debug)]
pub struct TokenArgs {
    /// The server's data directory
    #[arg(long, env = "ATTACHE_DATA_DIR", default_value = "./attache-data", global = true)]
    data_dir: PathBuf,
    /// Print JSON instead of text
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: TokenCommand,
}

#[derive(clap::Subcommand, Debug)]
enum TokenCommand {
    /// Create a token for a principal; the token is printed once and never stored.
    Create {
        /// The principal the token acts as, e.g. user:sam
        #[arg(long)]
        principal: String,
        /// Lifetime, e.g. 30d or 12h (default: no expiry)
        #[arg(long, value_parser = humantime::parse_duration)]
        expires_in: Option<Duration>,
    },
    /// List tokens (ids, principals, expiry; never secrets).
    List,
    /// Revoke a token by id.
    Revoke { id: String },
}

pub fn run(args: TokenArgs) -> anyhow::Result<()> {
    let store = TokenStore::new(&args.data_dir);
    match args.command {
        TokenCommand::Create { principal, expires_in } => {
            let key = PrincipalKey::parse(&principal).with_context(|| format!("{principal:?} is not a principal"))?;
            let expires_at_ms = expires_in.map(|d| attache_core::now_ms() + d.as_millis() as i64);
            let (info, token) = store.create(&key.to_string(), expires_at_ms)?;
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({ "id": info.id, "principal": info.principal, "token": token, "expires_at_ms": info.expires_at_ms })
                );
            } else {
                println!("{token}");
                eprintln!("token {} for {} (shown once; store it now)", info.id, info.principal);
            }
        }
        TokenCommand::List => {
            let all = store.list()?;
            if args.json {
                println!("{}", serde_json::to_string(&all)?);
            } else {
                for t in all {
                    let state = if t.revoked { "revoked" } else { "active" };
                    let expiry = t
                        .expires_at_ms
                        .map(|ms| format!("expires {}", attache_core::state::timestamp(ms)))
                        .unwrap_or_else(|| "no expiry".into());
                    println!("{}\t{}\t{state}\t{expiry}", t.id, t.principal);
                }
            }
        }
        TokenCommand::Revoke { id } => {
            if !store.revoke(&id)? {
                bail!("no token with id {id:?}: see `attache token list`");
            }
            if !args.json {
                eprintln!("token {id} revoked");
            }
        }
    }
    Ok(())
}

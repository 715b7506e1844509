//! The `attache` binary: `serve` runs the server; the other commands are
//! clients of a running server.

mod client_cmds;
mod output;
mod serve;
mod token;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "attache",
    version,
    about = "Durable attachments for AI agents, their tasks and the people who steer them",
    after_help = output::EXIT_CODES_HELP
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start: the size of the biggest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run the server on the embedded store.
    Serve(serve::ServeArgs),
    /// Manage bearer tokens (token auth mode).
    Token(token::TokenArgs),
    #[command(flatten)]
    Client(client_cmds::ClientCommand),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Command::Token(args) = cli.command {
        return token::run(args);
    }
    if let Command::Client(command) = cli.command {
        std::process::exit(client_cmds::main(command));
    }
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("ATTACHE_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => serve::run(args).await,
            Command::Token(_) | Command::Client(_) => Ok(()),
        }
    })
}

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

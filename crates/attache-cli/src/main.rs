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
    /// Run the server, on the embedded store or on PostgreSQL (--store).
    Serve(serve::ServeArgs),
    /// Manage bearer tokens (token auth mode).
    Token(token::TokenArgs),
    #[command(flatten)]
    Client(client_cmds::ClientCommand),
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // A refused setting or a store that cannot open is a message for the
        // operator, not a crash: its causes on one line, with no stack trace
        // even under RUST_BACKTRACE (which is for panics).
        Err(err) => {
            eprintln!("Error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
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
        // Colours only for a terminal: logs sent to a file or a collector stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none())
        .init();
    #[cfg(feature = "jemalloc")]
    attache_server::metrics::set_allocator_probe(jemalloc_stats);
    #[cfg(feature = "jemalloc-profiling")]
    dump_heap_profile_on_sigusr2();
    match cli.command {
        Command::Serve(args) => serve::main(args),
        Command::Token(_) | Command::Client(_) => Ok(()),
    }
}

#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read before `main` (the `_RJEM_MALLOC_CONF` environment
/// variable still overrides them). Memory freed after a burst of load goes back
/// to the system within about a second, by a background thread, instead of
/// staying with the process until the next allocation happens to purge it; two
/// arenas instead of eight per core (this server runs a handful of threads);
/// a thread cache's garbage collection every 1 MiB allocated instead of every
/// 64 KiB (it ran every few requests: ~2% of an append's instructions).
/// docs/ARCHITECTURE.md, "Process-wide choices", has the figures.
#[cfg(feature = "jemalloc")]
#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: &u8 =
    &b"background_thread:true,narenas:2,dirty_decay_ms:1000,muzzy_decay_ms:0,tcache_gc_incr_bytes:1048576\0"[0];

/// Profiling builds only (`--features jemalloc-profiling`, started with
/// `_RJEM_MALLOC_CONF=prof:true,prof_prefix:<dir>/heap`): each SIGUSR2 writes
/// jemalloc's sampled heap profile next to that prefix, for `jeprof --base` to
/// tell what grew between two moments of a soak (bench/README.md, "Heap growth").
#[cfg(feature = "jemalloc-profiling")]
fn dump_heap_profile_on_sigusr2() {
    use tokio::signal::unix::{signal, SignalKind};
    std::thread::spawn(|| {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
            return;
        };
        rt.block_on(async {
            let Ok(mut usr2) = signal(SignalKind::user_defined2()) else {
                return;
            };
            while usr2.recv().await.is_some() {
                // SAFETY: `prof.dump` takes a file name or null (the profile goes to
                // `prof_prefix` with a sequence number); null is always valid.
                let done =
                    unsafe { tikv_jemalloc_ctl::raw::write(b"prof.dump\0", std::ptr::null::<std::ffi::c_char>()) };
                match done {
                    Ok(()) => tracing::info!("heap profile written"),
                    Err(e) => tracing::warn!(error = %e, "heap profile not written (started without prof:true?)"),
                }
            }
        });
    });
}

/// jemalloc's figures for `/metrics`: what the program holds (allocated),
/// the pages that holds (active), what jemalloc keeps resident for itself and
/// for reuse (resident), and what it has unmapped from RSS but keeps reserved
/// (retained). RSS growing while `allocated` stays flat is the allocator, not a leak.
#[cfg(feature = "jemalloc")]
fn jemalloc_stats() -> Vec<(&'static str, &'static str, u64)> {
    use tikv_jemalloc_ctl::{epoch, stats};
    // The statistics are a snapshot taken at each epoch.
    if epoch::advance().is_err() {
        return Vec::new();
    }
    let figures = [
        (
            "attache_allocator_allocated_bytes",
            "Bytes in live allocations (jemalloc stats.allocated).",
            stats::allocated::read(),
        ),
        (
            "attache_allocator_active_bytes",
            "Bytes in pages holding live allocations (jemalloc stats.active).",
            stats::active::read(),
        ),
        ("attache_allocator_metadata_bytes", "Bytes of jemalloc's own metadata (stats.metadata).", stats::metadata::read()),
        (
            "attache_allocator_resident_bytes",
            "Bytes of physically resident pages jemalloc maps, including dirty pages kept for reuse (stats.resident).",
            stats::resident::read(),
        ),
        (
            "attache_allocator_retained_bytes",
            "Bytes jemalloc returned to the system but keeps reserved in its address space, not in RSS (stats.retained).",
            stats::retained::read(),
        ),
    ];
    figures.into_iter().filter_map(|(name, help, read)| read.ok().map(|bytes| (name, help, bytes as u64))).collect()
}

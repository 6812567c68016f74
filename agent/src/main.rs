use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use shoal_agent::config::{Config, ServeFlags};
use tokio_util::sync::CancellationToken;

/// Shoal agent: the per-host registry endpoint and peer.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the local registry and exchange pieces with peers.
    Serve {
        #[command(flatten)]
        flags: ServeFlags,
        /// TOML file with the same keys as the flags.
        #[arg(long, env = "SHOAL_CONFIG")]
        config: Option<PathBuf>,
    },
}

/// Piece buffers (4 MiB by default) at or above this size are mmapped by glibc and
/// returned to the OS when freed. Without a fixed threshold glibc raises it dynamically
/// after the first free, the buffers then come from per-thread arenas that keep their
/// memory, and the agent's resident size grows with every blob it downloads.
const MMAP_THRESHOLD: libc::c_int = 2 << 20;

#[allow(unsafe_code)]
fn fix_mmap_threshold() {
    // SAFETY: mallopt only changes allocator parameters; it is called before any other
    // thread exists, and a failure (return 0) just leaves glibc's default in place.
    let ok = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) };
    if ok == 0 {
        eprintln!("warning: mallopt(M_MMAP_THRESHOLD) failed; memory use may grow with blob count");
    }
}

fn main() -> anyhow::Result<()> {
    fix_mmap_threshold();
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(serve())
}

async fn serve() -> anyhow::Result<()> {
    shoal_shared::telemetry::init_tracing();
    let Command::Serve { flags, config } = Cli::parse().command;
    let config: Config = shoal_shared::config::layered(&flags, config.as_deref())?;
    let listeners = shoal_agent::Listeners::bind(&config)
        .with_context(|| format!("bind {} / {}", config.registry, config.peer))?;
    let shutdown = CancellationToken::new();
    tokio::spawn(shoal_shared::telemetry::cancel_on_signal(shutdown.clone()));
    shoal_agent::run(config, listeners, shutdown).await?;
    Ok(())
}

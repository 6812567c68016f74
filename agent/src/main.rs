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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
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

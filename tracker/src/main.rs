use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use shoal_tracker::config::{Config, ServeFlags};
use tokio_util::sync::CancellationToken;

/// Shoal tracker: who has which blob.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve announces and lookups.
    Serve {
        #[command(flatten)]
        flags: ServeFlags,
        /// TOML file with the same keys as the flags (flags and environment win) [default: none].
        #[arg(long, env = "SHOAL_CONFIG")]
        config: Option<PathBuf>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Command::Serve { flags, config } = Cli::parse().command;
    let config: Config = shoal_shared::config::layered(&flags, config.as_deref())?;
    shoal_shared::telemetry::init_tracing(config.log_format);
    let listeners = shoal_tracker::Listeners::bind(&config)
        .with_context(|| format!("bind {} (and --metrics {:?})", config.http, config.metrics))?;
    let shutdown = CancellationToken::new();
    tokio::spawn(shoal_shared::telemetry::cancel_on_signal(shutdown.clone()));
    shoal_tracker::run(config, listeners, shutdown).await?;
    Ok(())
}

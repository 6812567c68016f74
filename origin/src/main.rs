use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use shoal_origin::config::{Config, ServeFlags};
use shoal_origin::push::{self, Progress, Source};
use tokio_util::sync::CancellationToken;

/// Shoal origin: authoritative blob store, seeder, seeding CLI and cluster CA tool.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the registry API and seed blobs to peers over QUIC.
    Serve {
        #[command(flatten)]
        flags: Box<ServeFlags>,
        /// TOML file with the same keys as the flags.
        #[arg(long, env = "SHOAL_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Push an image to an origin: SOURCE is oci:DIR[:REF] or docker-archive:FILE.
    Push {
        /// Base URL of the origin, e.g. http://127.0.0.1:5000
        #[arg(long, env = "SHOAL_ORIGIN")]
        origin: String,
        /// Bearer token, when the origin requires one for uploads.
        #[arg(long, env = "SHOAL_UPLOAD_TOKEN", hide_env_values = true)]
        token: Option<String>,
        source: Source,
        /// NAME:TAG to publish the image as.
        target: String,
    },
    /// Cluster certificate authority.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
}

#[derive(Subcommand)]
enum CaCommand {
    /// Create a cluster CA in DIR (ca.pem, ca.key).
    Init { dir: PathBuf },
    /// Issue a node certificate into OUT (ca.pem, cert.pem, key.pem).
    Issue {
        #[arg(long)]
        ca: PathBuf,
        #[arg(long)]
        name: String,
        out: PathBuf,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    shoal_shared::telemetry::init_tracing();
    match Cli::parse().command {
        Command::Serve { flags, config } => {
            let config: Config = shoal_shared::config::layered(&flags, config.as_deref())?;
            let listeners = shoal_origin::Listeners::bind(&config)
                .with_context(|| format!("bind {} / {}", config.http, config.peer))?;
            let shutdown = CancellationToken::new();
            tokio::spawn(shoal_shared::telemetry::cancel_on_signal(shutdown.clone()));
            shoal_origin::run(config, listeners, shutdown).await?;
        }
        Command::Push { origin, token, source, target } => {
            let progress = if std::io::stderr().is_terminal() { Progress::Bar } else { Progress::Lines };
            let report = push::push_with_token(&origin, token.as_deref(), &source, &target, progress).await?;
            println!(
                "pushed {target} ({}): {} blobs uploaded, {} already present, {} bytes",
                report.root, report.uploaded, report.skipped, report.bytes
            );
        }
        Command::Ca { command: CaCommand::Init { dir } } => {
            shoal_shared::tls::init_ca(&dir)?;
            println!("cluster CA written to {}", dir.display());
        }
        Command::Ca { command: CaCommand::Issue { ca, name, out } } => {
            shoal_shared::tls::issue(&ca, &name, &out)?;
            println!("certificate for {name} written to {}", out.display());
        }
    }
    Ok(())
}

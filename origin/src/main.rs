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
        /// TOML file with the same keys as the flags (flags and environment win) [default: none].
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
    /// Issue a node certificate into OUT (ca.pem, cert.pem, key.pem, and crl.pem once
    /// anything was revoked). A node running on OUT picks a new one up without a restart.
    Issue {
        #[arg(long)]
        ca: PathBuf,
        #[arg(long)]
        name: String,
        /// What the node is: origin, tracker or agent. Peers check it.
        #[arg(long, default_value = "agent")]
        role: shoal_shared::tls::Role,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = shoal_shared::tls::DEFAULT_VALIDITY.as_secs() / 86400)]
        days: u64,
        out: PathBuf,
    },
    /// Revoke every certificate issued to a node name (or one serial) and rewrite DIR/crl.pem;
    /// copy it next to ca.pem on every node (they reload it within seconds).
    Revoke {
        #[arg(long)]
        ca: PathBuf,
        /// The node name the certificates were issued to.
        #[arg(long, conflicts_with = "serial", required_unless_present = "serial")]
        name: Option<String>,
        /// One certificate's serial number, in hex.
        #[arg(long)]
        serial: Option<String>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let command = Cli::parse().command;
    if !matches!(command, Command::Serve { .. }) {
        // `serve` installs it once its configuration (the log format) is read.
        shoal_shared::telemetry::init_tracing(Default::default());
    }
    match command {
        Command::Serve { flags, config } => {
            let config: Config = shoal_shared::config::layered(&flags, config.as_deref())?;
            shoal_shared::telemetry::init_tracing(config.log_format);
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
        Command::Ca { command: CaCommand::Issue { ca, name, role, days, out } } => {
            anyhow::ensure!((1..=3650).contains(&days), "--days must be between 1 and 3650");
            let validity = std::time::Duration::from_secs(days * 86400);
            shoal_shared::tls::issue_with(&ca, &name, role, validity, &out)?;
            println!("{role} certificate for {name}, valid {days} days, written to {}", out.display());
        }
        Command::Ca { command: CaCommand::Revoke { ca, name, serial } } => {
            use shoal_shared::tls::RevokeTarget;
            let target = match (&name, &serial) {
                (Some(n), _) => RevokeTarget::Name(n),
                (None, Some(s)) => RevokeTarget::Serial(s),
                (None, None) => anyhow::bail!("give --name or --serial"),
            };
            let added = shoal_shared::tls::revoke(&ca, target)?;
            println!(
                "{added} certificate(s) newly revoked; {} lists every revoked one: copy it to each node's TLS directory as crl.pem",
                ca.join(shoal_shared::tls::CRL_FILE).display()
            );
        }
    }
    Ok(())
}

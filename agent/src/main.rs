use std::path::{Path, PathBuf};

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
        flags: Box<ServeFlags>,
        /// TOML file with the same keys as the flags (flags and environment win) [default: none].
        #[arg(long, env = "SHOAL_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Write containerd `hosts.toml` files that pull through this agent, with the
    /// registry itself as fallback.
    ContainerdConfig {
        /// containerd's `config_path` (hosts directory).
        #[arg(long, default_value = "/etc/containerd/certs.d")]
        dir: PathBuf,
        /// The agent's registry endpoint as containerd reaches it.
        #[arg(long, default_value = "http://127.0.0.1:5050")]
        endpoint: String,
        /// Registries to mirror (repeatable, comma-separated); `_default` covers every
        /// registry without its own file.
        #[arg(long = "registry", value_delimiter = ',', default_value = "_default")]
        registries: Vec<String>,
        /// Print the files instead of writing them.
        #[arg(long)]
        dry_run: bool,
        /// Take the agent out of the files again: what was there before comes back byte for
        /// byte, and files it created are deleted.
        #[arg(long, conflicts_with = "dry_run")]
        remove: bool,
    },
    /// Ask an agent to pull an image into its cache ahead of a rollout.
    Preload {
        /// `[registry/]name:tag` or `[registry/]name@sha256:...`.
        image: String,
        /// The agent's registry endpoint.
        #[arg(long, default_value = "http://127.0.0.1:5050")]
        agent: String,
        /// `os/arch[/variant]` or `all` (default: the agent's own platform).
        #[arg(long)]
        platform: Option<String>,
        /// Return at once; the agent downloads in the background.
        #[arg(long)]
        no_wait: bool,
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
    let runtime = || tokio::runtime::Builder::new_multi_thread().enable_all().build();
    match Cli::parse().command {
        Command::Serve { flags, config } => runtime()?.block_on(serve(*flags, config)),
        Command::ContainerdConfig { dir, endpoint, registries, dry_run, remove } => {
            containerd_config(&dir, &endpoint, &registries, dry_run, remove)
        }
        Command::Preload { image, agent, platform, no_wait } => {
            runtime()?.block_on(preload(&agent, image, platform, !no_wait))
        }
    }
}

fn containerd_config(
    dir: &Path,
    endpoint: &str,
    registries: &[String],
    dry_run: bool,
    remove: bool,
) -> anyhow::Result<()> {
    use shoal_agent::containerd;
    if remove {
        for (path, action) in containerd::remove(dir, registries)? {
            println!("{action} {}", path.display());
        }
        return Ok(());
    }
    if dry_run {
        for (path, body) in containerd::preview(dir, registries, endpoint)? {
            println!("# {}\n{body}", path.display());
        }
    } else {
        for (path, action) in containerd::apply(dir, registries, endpoint)? {
            println!("{action} {}", path.display());
        }
    }
    println!("\n{}", containerd::containerd_snippet(dir));
    Ok(())
}

async fn preload(agent: &str, image: String, platform: Option<String>, wait: bool) -> anyhow::Result<()> {
    use shoal_agent::preload::PreloadRequest;
    let url = format!("{}/shoal/v1/preload", agent.trim_end_matches('/'));
    let resp = reqwest::Client::new()
        .post(&url)
        .json(&PreloadRequest { image, platform, wait })
        .send()
        .await
        .with_context(|| format!("POST {url}"))?;
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    if !status.is_success() {
        anyhow::bail!("{url}: {status}: {body}");
    }
    println!("{body}");
    Ok(())
}

async fn serve(flags: ServeFlags, config: Option<PathBuf>) -> anyhow::Result<()> {
    let config: Config = shoal_shared::config::layered(&flags, config.as_deref())?;
    shoal_shared::telemetry::init_tracing(config.log_format);
    let listeners = shoal_agent::Listeners::bind(&config)
        .with_context(|| format!("bind {} / {}", config.registry, config.peer))?;
    let shutdown = CancellationToken::new();
    tokio::spawn(shoal_shared::telemetry::cancel_on_signal(shutdown.clone()));
    shoal_agent::run(config, listeners, shutdown).await?;
    Ok(())
}

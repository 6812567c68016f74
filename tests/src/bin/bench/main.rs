//! `shoal-bench`: hand-run tools around a real Shoal cluster.
//!
//! * `gen-image` writes a test OCI image layout (see [`shoal_tests::image`]).
//! * `pull-through` measures pulls through an origin from a local upstream registry
//!   (see [`shoal_tests::upstream_bench`]).
//! * `pull` is the loopback benchmark: it starts the real `shoal-tracker`, `shoal-origin` and
//!   `shoal-agent` binaries on 127.0.0.1, uploads one large pseudo-random blob to the origin and
//!   compares a direct HTTP download from the origin with cold (over QUIC from the origin, on
//!   pre-touched and on untouched memory) and hot (from the agent's cache) downloads through
//!   the agent, and with the raw QUIC ceiling; it reports the servers' CPU-seconds per GiB
//!   and the agent's peak RSS during the cold pulls.
//! * `quic-ceiling` repeats `pull`'s raw QUIC measurement alone, for comparing transport settings.
//! * `swarm` is the multi-host benchmark in network namespaces (see [`shoal_tests::netns`]).
//!
//! Not a test: run it by hand on a release build:
//! `cargo build --release --workspace && target/release/shoal-bench pull --size-mib 1024`.
//!
//! Layout: this file holds the command line and dispatch; `cluster` starts and watches the
//! server processes, `loopback` the one-agent cluster and its test blob, `fetch` timed and
//! verified downloads, and `pull`, `load`, `quic_ceiling` one subcommand each (the others
//! live in the `shoal_tests` library).

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

mod cluster;
mod fetch;
mod load;
mod loopback;
mod pull;
mod quic_ceiling;

use load::{load, LoadArgs};
use pull::{pull, PullArgs};
use quic_ceiling::quic_ceiling;

/// Size of the chunks the blob is generated, uploaded and hashed in.
pub(crate) const CHUNK: usize = 1 << 20;
pub(crate) const MIB: u64 = 1 << 20;
/// MB as used in every figure: 10^6 bytes.
pub(crate) const MB: f64 = 1e6;

/// Shoal benchmark and test-image tools.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Write a test OCI image layout and print its manifest digest.
    GenImage {
        /// Directory of the OCI layout (created if missing).
        #[arg(long)]
        dir: PathBuf,
        /// Tag recorded as the manifest's `org.opencontainers.image.ref.name`.
        #[arg(long)]
        tag: String,
        /// Layer sizes in bytes, comma separated.
        #[arg(long, value_delimiter = ',', default_value = "1048576,2097152")]
        layers: Vec<usize>,
        /// Seed of the pseudo-random layer contents.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Loopback benchmark: direct origin download vs cold and hot downloads through an agent.
    Pull(PullArgs),
    /// Pull-through benchmark against a local CNCF distribution registry as the upstream.
    PullThrough {
        /// Size of the image's one layer in MiB.
        #[arg(long, default_value_t = 256)]
        size_mib: u64,
        /// Agents (one cold, then the others at once).
        #[arg(long, default_value_t = 3)]
        agents: usize,
        /// Piece length in bytes.
        #[arg(long, default_value_t = shoal_shared::metainfo::DEFAULT_PIECE_LENGTH)]
        piece_length: u32,
    },
    /// Load test: many clients at once on an agent (and the origin as the baseline), and a
    /// sustained announce rate on the tracker; latency percentiles and resident memory.
    Load(LoadArgs),
    /// A ring of 3 origins vs one origin (push, cold pull), then an owner killed: time until
    /// pulls succeed and until repair restores two copies of every blob.
    Ring(shoal_tests::ring_bench::Options),
    /// Multi-host swarm benchmark in Linux network namespaces (root, iproute2): N hosts on
    /// capped links pull one blob at once, from the origin over HTTP and through their agents.
    Swarm(shoal_tests::netns::SwarmArgs),
    /// The raw QUIC ceiling alone (as `pull` measures it), repeated: rate and CPU-seconds
    /// per GiB of this process (both ends), for comparing transport settings quickly.
    QuicCeiling {
        /// Bytes sent per run, in MiB.
        #[arg(long, default_value_t = 1024)]
        size_mib: u64,
        /// Runs.
        #[arg(long, default_value_t = 5)]
        runs: u32,
    },
    /// The HTTP client `swarm` runs inside each namespace.
    #[command(hide = true)]
    NetnsClient {
        #[command(subcommand)]
        cmd: shoal_tests::netns::client::ClientCmd,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::GenImage { dir, tag, layers, seed } => {
            let image = shoal_tests::image::generate_oci_layout(&dir, &tag, &layers, seed)
                .with_context(|| format!("generating an OCI layout in {}", dir.display()))?;
            println!("{}", image.manifest);
            Ok(())
        }
        Cmd::Pull(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("tokio runtime")?
            .block_on(pull(args)),
        Cmd::PullThrough { size_mib, agents, piece_length } => {
            let opts = shoal_tests::upstream_bench::Options { size_mib, agents, piece_length };
            let report = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("tokio runtime")?
                .block_on(shoal_tests::upstream_bench::run(opts))?;
            print!("{report}");
            Ok(())
        }
        Cmd::Load(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("tokio runtime")?
            .block_on(load(args)),
        Cmd::Ring(opts) => {
            let report = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("tokio runtime")?
                .block_on(shoal_tests::ring_bench::run(opts))?;
            print!("{report}");
            Ok(())
        }
        Cmd::Swarm(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("tokio runtime")?
            .block_on(shoal_tests::netns::swarm(args)),
        Cmd::NetnsClient { cmd } => shoal_tests::netns::client::main(cmd),
        Cmd::QuicCeiling { size_mib, runs } => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("tokio runtime")?
            .block_on(quic_ceiling(size_mib * MIB, runs)),
    }
}

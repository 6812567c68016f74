//! `shoal-sim`: simulates one blob spreading through a swarm of thousands of agents on a
//! virtual clock, with the project's scheduler state machine in every agent, and prints the
//! netns benchmark's ratios (completion time over the physical limit, origin egress over the
//! blob). See `shoal_tests::sim` for the model.
//!
//! `cargo build --release -p shoal-tests --bin shoal-sim && target/release/shoal-sim --hosts 1000`

use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use shoal_shared::ratelimit::ByteRate;
use shoal_tests::sim::{self, driver::Policy, parse_duration, parse_rate, Config};

/// Swarm simulator: N agents pull one blob at once over modelled links.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Agents pulling the blob.
    #[arg(long, default_value_t = 1000)]
    hosts: u32,
    /// Blob size in MiB.
    #[arg(long, default_value_t = 128)]
    size_mib: u64,
    /// Blob size in bytes (overrides --size-mib), e.g. 3000000000 for Kraken's 3 GB.
    #[arg(long)]
    size_bytes: Option<u64>,
    /// Piece length in KiB (default: the origin's).
    #[arg(long, default_value_t = u64::from(shoal_shared::metainfo::DEFAULT_PIECE_LENGTH) / 1024)]
    piece_kib: u64,
    /// Every host's uplink and downlink: 100mbit, 1gbit, 300MB/s, ...
    #[arg(long, default_value = "100mbit")]
    rate: String,
    /// Round-trip time between any two hosts: 1ms, 250us, ...
    #[arg(long, default_value = "1ms")]
    latency: String,
    /// Fraction of agents on slower links, spread evenly (0.1: one in ten)
    #[arg(long, default_value_t = 0.0)]
    slow_hosts: f64,
    /// The slow agents' link rate [default: a tenth of --rate]
    #[arg(long)]
    slow_rate: Option<String>,
    /// Packet loss probability.
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// Fraction of agents leaving at a random time during the download.
    #[arg(long, default_value_t = 0.0)]
    churn: f64,
    /// Origin hosts, each holding the whole blob.
    #[arg(long, default_value_t = 1)]
    origins: u32,
    /// Piece bytes an agent sends at once (the agent's --upload-budget): 12MiB, 4MiB, ...
    #[arg(long, default_value = "12MiB")]
    agent_budget: ByteRate,
    /// Piece bytes an origin sends at once (the origin's --upload-budget).
    #[arg(long, default_value = "16MiB")]
    origin_budget: ByteRate,
    /// Requests a server keeps waiting for upload budget; more are refused as Busy (the
    /// servers' --upload-queue).
    #[arg(long, default_value_t = 2)]
    server_queue: u32,
    /// First copies first at origins: the longest wave in seconds (0: off), as the real
    /// origin's 30 s.
    #[arg(long, default_value_t = shoal_shared::session::LONGEST_WAVE.as_secs_f64())]
    origin_wave: f64,
    /// Peers the tracker lists per announce, besides the origins.
    #[arg(long, default_value_t = 50)]
    tracker_peers: u32,
    /// Peers a download keeps (the agent's max_peers, default 10).
    #[arg(long)]
    max_peers: Option<u32>,
    /// Copies of one piece in flight at once during the endgame (default: the scheduler's).
    #[arg(long)]
    endgame_copies: Option<u32>,
    /// Starting pipeline depth to an agent still downloading (default: the agent's).
    #[arg(long)]
    peer_pipeline: Option<u32>,
    /// Starting pipeline depth to a seeder or an origin (default: the agent's).
    #[arg(long)]
    seeder_pipeline: Option<u32>,
    /// Deepest pipeline to an origin while other agents are known (default: the scheduler's).
    #[arg(long)]
    origin_pipeline: Option<u32>,
    /// Deepest a pipeline grows (default: the agent's).
    #[arg(long)]
    max_pipeline: Option<u32>,
    /// Requests in flight per download (default: the agent's, 16 MiB of pieces, 4..=64).
    #[arg(long)]
    max_in_flight: Option<u32>,
    /// Requests in flight a download starts with, grown by fast pieces and shrunk by slow
    /// ones (default: the agent's; with --cut-through 0, --max-in-flight).
    #[arg(long)]
    start_in_flight: Option<u32>,
    /// Fewest requests in flight slow pieces shrink a download to (default: the agent's, 2;
    /// --min-in-flight and --start-in-flight both at --max-in-flight turn the rule off).
    #[arg(long)]
    min_in_flight: Option<u32>,
    /// Pieces at the front of the blob fetched in order (the agent's IN_ORDER_WINDOW).
    #[arg(long)]
    window: Option<u32>,
    /// Shortest piece request deadline (default: the scheduler's, 5s); deadlines grow with
    /// piece size times pipeline depth at 1 MiB/s.
    #[arg(long)]
    timeout_floor: Option<String>,
    /// How long a peer that answered Busy is not asked again (default: the scheduler's).
    #[arg(long)]
    busy_pause: Option<String>,
    /// Longest Busy pause, reached by doubling (default: the scheduler's).
    #[arg(long)]
    max_busy_pause: Option<String>,
    /// Seconds without progress after which a download fails (re-planned at half).
    #[arg(long)]
    progress_timeout: Option<String>,
    /// Cut-through, as the agent does: pieces checked in blocks of this size are passed on
    /// while still arriving. 0: whole pieces only (the agent's `--cut-through false`).
    #[arg(long, default_value = "16KiB")]
    cut_through: ByteRate,
    /// Hold Have messages back this long to apply them together (speeds up huge runs).
    #[arg(long, default_value = "0")]
    have_batch: String,
    /// Stop after this much virtual time, finished or not.
    #[arg(long, default_value = "3600s")]
    max_time: String,
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let size = match cli.size_bytes {
        Some(b) => b,
        None => cli.size_mib.checked_mul(1 << 20).context("--size-mib too large")?,
    };
    let piece_len = cli.piece_kib.checked_mul(1024).context("--piece-kib too large")?;
    let rate = parse_rate(&cli.rate)?;
    let mut cfg = Config::new(cli.hosts, size, piece_len, rate);
    cfg.rtt = parse_duration(&cli.latency)?;
    cfg.loss = cli.loss;
    cfg.slow_hosts = cli.slow_hosts;
    if let Some(r) = &cli.slow_rate {
        cfg.slow_rate = parse_rate(r)?;
    }
    cfg.churn = cli.churn;
    cfg.origins = cli.origins;
    cfg.agent_budget = cli.agent_budget.0;
    cfg.origin_budget = cli.origin_budget.0;
    cfg.tracker_peers = cli.tracker_peers;
    cfg.server_queue = cli.server_queue;
    cfg.origin_wave = (cli.origin_wave.max(0.0) * 1e9) as u64;
    cfg.have_batch = parse_duration(&cli.have_batch)?;
    cfg.cut_through = cli.cut_through.0;
    cfg.max_time = parse_duration(&cli.max_time)?;
    cfg.seed = cli.seed;
    let mut policy = Policy::agent(piece_len);
    let c = &mut policy.scheduler;
    let counts = [
        (cli.window, &mut c.window),
        (cli.peer_pipeline, &mut c.peer_pipeline),
        (cli.seeder_pipeline, &mut c.seeder_pipeline),
        (cli.origin_pipeline, &mut c.shared_origin_pipeline),
        (cli.max_pipeline, &mut c.max_pipeline),
        (cli.max_in_flight, &mut c.max_in_flight),
        (cli.start_in_flight, &mut c.start_in_flight),
        (cli.min_in_flight, &mut c.min_in_flight),
        (cli.endgame_copies, &mut c.endgame_copies),
    ];
    for (flag, field) in counts {
        if let Some(v) = flag {
            *field = v;
        }
    }
    if cfg.cut_through == 0 && cli.start_in_flight.is_none() {
        *c = c.whole_pieces();
    }
    if let Some(v) = cli.max_peers {
        c.max_peers = v as usize;
    }
    if let Some(t) = &cli.timeout_floor {
        c.timeout_floor = Duration::from_nanos(parse_duration(t)?);
    }
    if let Some(t) = &cli.busy_pause {
        c.busy_pause = Duration::from_nanos(parse_duration(t)?);
    }
    if let Some(t) = &cli.max_busy_pause {
        c.max_busy_pause = Duration::from_nanos(parse_duration(t)?);
    }
    if let Some(t) = &cli.progress_timeout {
        policy.progress_timeout = parse_duration(t)?;
    }
    cfg.policy = policy;
    let report = sim::run(&cfg)?;
    println!("{report}");
    Ok(())
}

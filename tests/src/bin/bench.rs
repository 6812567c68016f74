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

use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufWriter, Write as _};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use rand::rngs::StdRng;
use rand::{RngCore as _, SeedableRng as _};
use sha2::{Digest as _, Sha256};
use shoal_tests::pretouch::{Releaser, ScratchMemory};
use std::process::{Child, Command};
use tokio::io::AsyncReadExt as _;

/// Size of the chunks the blob is generated, uploaded and hashed in.
const CHUNK: usize = 1 << 20;
const MIB: u64 = 1 << 20;
/// MB as used in every figure: 10^6 bytes.
const MB: f64 = 1e6;

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
        #[arg(long, default_value_t = 4 * 1024 * 1024)]
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

#[derive(Debug, clap::Args)]
struct PullArgs {
    /// Size of the benchmark blob in MiB.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Directory with shoal-origin, shoal-tracker and shoal-agent (default: this binary's).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Piece length the origin uses for the blob's metainfo, in bytes.
    #[arg(long, default_value_t = 4 * 1024 * 1024)]
    piece_length: u32,
    /// Keep the temp dir (data, certificates, logs) and print its path.
    #[arg(long)]
    keep: bool,
    /// Seed of the blob's pseudo-random contents (the second blob uses seed + 1).
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Record the agent with `perf record` during the pre-touched cold pull, into this file.
    #[arg(long)]
    perf_record: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct LoadArgs {
    /// Clients that GET the blob at the same moment.
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// Size of the blob they GET, in KiB.
    #[arg(long, default_value_t = 1024)]
    size_kib: u64,
    /// Simulated agents re-announcing to the tracker.
    #[arg(long, default_value_t = 500)]
    peers: u16,
    /// Blobs in each simulated agent's batched announce.
    #[arg(long, default_value_t = 64)]
    blobs: usize,
    /// Announce requests in flight at once.
    #[arg(long, default_value_t = 32)]
    announce_concurrency: usize,
    /// How long the announce load runs, in seconds.
    #[arg(long, default_value_t = 10)]
    announce_secs: u64,
    /// Directory with shoal-origin, shoal-tracker and shoal-agent (default: this binary's).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
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

/// One spawned server process and where its output goes; killed when dropped (tokio's
/// `kill_on_drop` needs its `process` feature, which this crate does not enable).
#[derive(Debug)]
struct Proc {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn pid(&mut self) -> anyhow::Result<u32> {
        self.check_alive()?;
        Ok(self.child.id())
    }

    /// SIGKILLs the process (if still running) and reaps it.
    fn kill(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // It may exit between the check and the kill; either way it is gone after wait.
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }

    /// Fails if the process has exited.
    fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait().context("try_wait")? {
            bail!("{} exited early: {status}", self.name);
        }
        Ok(())
    }
}

/// The processes of one cluster; killed when dropped.
#[derive(Debug, Default)]
struct Cluster {
    procs: Vec<Proc>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Cluster {
    fn spawn(
        &mut self,
        name: &'static str,
        bin: &Path,
        args: &[String],
        dir: &Path,
    ) -> anyhow::Result<usize> {
        let log = dir.join(format!("{name}.log"));
        let stderr = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let stdout = stderr.try_clone().context("dup log file")?;
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .env("SHOAL_LOG", std::env::var("SHOAL_LOG").unwrap_or_else(|_| "info".into()));
        let child = cmd.spawn().with_context(|| format!("starting {}", bin.display()))?;
        self.procs.push(Proc { name, child, log });
        Ok(self.procs.len() - 1)
    }

    fn check_alive(&mut self) -> anyhow::Result<()> {
        self.procs.iter_mut().try_for_each(Proc::check_alive)
    }

    fn kill_all(&mut self) {
        self.procs.iter_mut().for_each(Proc::kill);
    }

    fn print_log_tails(&self, lines: usize) {
        for p in &self.procs {
            let text = std::fs::read_to_string(&p.log).unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            let tail = &all[all.len().saturating_sub(lines)..];
            eprintln!("---- last {} lines of {} ({}) ----", tail.len(), p.name, p.log.display());
            for line in tail {
                eprintln!("{line}");
            }
        }
    }
}

fn free_tcp_port() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0").context("bind tcp :0")?.local_addr()?)
}

fn free_udp_port() -> anyhow::Result<SocketAddr> {
    Ok(UdpSocket::bind("127.0.0.1:0").context("bind udp :0")?.local_addr()?)
}

/// Runs a short-lived command (the CA tool) to completion.
fn run_tool(bin: &Path, args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    ensure!(
        out.status.success(),
        "{} {} failed ({}): {}",
        bin.display(),
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn s(x: impl ToString) -> String {
    x.to_string()
}

/// The server binaries a loopback cluster runs.
struct Bins {
    origin: PathBuf,
    tracker: PathBuf,
    agent: PathBuf,
}

impl Bins {
    /// The binaries in `dir`, or next to this one.
    fn find(dir: Option<&Path>) -> anyhow::Result<Self> {
        let dir = match dir {
            Some(d) => d.to_path_buf(),
            None => std::env::current_exe()
                .context("current exe")?
                .parent()
                .context("current exe has no directory")?
                .to_path_buf(),
        };
        let bin = |name: &str| -> anyhow::Result<PathBuf> {
            let path = dir.join(name);
            ensure!(path.is_file(), "{} not found (build the workspace, or pass --bin-dir)", path.display());
            Ok(path)
        };
        Ok(Self { origin: bin("shoal-origin")?, tracker: bin("shoal-tracker")?, agent: bin("shoal-agent")? })
    }
}

/// Runs `body` against a fresh temp dir and process set, printing the servers' log tails
/// when it fails; the processes are killed either way.
async fn with_cluster<F>(keep: bool, body: F) -> anyhow::Result<()>
where
    F: AsyncFnOnce(&Path, &mut Cluster) -> anyhow::Result<()>,
{
    let tmp = tempfile::Builder::new().prefix("shoal-bench-").tempdir().context("temp dir")?;
    let dir = tmp.path().to_path_buf();
    let mut cluster = Cluster::default();
    let result = body(&dir, &mut cluster).await;
    if let Err(e) = &result {
        eprintln!("benchmark failed: {e:#}");
        cluster.print_log_tails(30);
    }
    cluster.kill_all();
    drop(cluster);
    if keep {
        let kept = tmp.keep();
        eprintln!("kept {}", kept.display());
    }
    result
}

async fn pull(args: PullArgs) -> anyhow::Result<()> {
    ensure!(args.size_mib > 0, "--size-mib must be positive");
    let bins = Bins::find(args.bin_dir.as_deref())?;
    with_cluster(args.keep, async |dir: &Path, cluster: &mut Cluster| {
        run_bench(&args, dir, &bins, cluster).await
    })
    .await
}

async fn load(args: LoadArgs) -> anyhow::Result<()> {
    ensure!(args.clients > 0 && args.size_kib > 0 && args.peers > 0, "counts must be positive");
    let bins = Bins::find(args.bin_dir.as_deref())?;
    with_cluster(false, async |dir: &Path, cluster: &mut Cluster| run_load(&args, dir, &bins, cluster).await)
        .await
}

async fn run_load(args: &LoadArgs, dir: &Path, bins: &Bins, cluster: &mut Cluster) -> anyhow::Result<()> {
    use shoal_tests::load::{announce_load, concurrent_gets, rss_mib};
    let size = args.size_kib * 1024;
    let lb = start_loopback(dir, bins, 1 << 20, cluster).await?;
    let digest = upload_blob(&lb, dir, size, 11).await?;
    let origin_blob = format!("{}/v2/bench/blob/blobs/{digest}", lb.origin_url);
    let agent_blob = format!("{}/v2/bench/blob/blobs/{digest}", lb.agent_url);
    fetch(&lb.http, &agent_blob, size, Some(&digest)).await.context("warming the agent")?;

    let pids =
        [cluster.procs[lb.origin].pid()?, cluster.procs[lb.agent].pid()?, cluster.procs[lb.tracker].pid()?];
    let before: Vec<(f64, f64)> = pids.iter().map(|p| rss_mib(*p)).collect();
    eprintln!("(a) {} clients GET the blob from the origin at once...", args.clients);
    let origin = concurrent_gets(&origin_blob, args.clients, size).await?;
    eprintln!("(b) {} clients GET the blob from the agent (cached) at once...", args.clients);
    let agent = concurrent_gets(&agent_blob, args.clients, size).await?;
    eprintln!("(c) {} peers re-announcing {} blobs each to the tracker...", args.peers, args.blobs);
    let announces = announce_load(
        &lb.tracker_url,
        args.peers,
        args.blobs,
        args.announce_concurrency,
        Duration::from_secs(args.announce_secs),
    )
    .await?;
    cluster.check_alive()?;
    let after: Vec<(f64, f64)> = pids.iter().map(|p| rss_mib(*p)).collect();

    let ms = |d: Duration| format!("{:.1}", d.as_secs_f64() * 1e3);
    let mut out = String::new();
    writeln!(
        out,
        "\nshoal load test: {} clients GET one {} KiB blob at once; {} peers x {} blobs re-announced with {} in flight for {} s",
        args.clients, args.size_kib, args.peers, args.blobs, args.announce_concurrency, args.announce_secs
    )?;
    writeln!(
        out,
        "{:<38} {:>8} {:>8} {:>8} {:>8} {:>7}   {:>9} {:>9}",
        "phase", "p50 ms", "p99 ms", "max ms", "ok", "errors", "RSS MiB", "peak MiB"
    )?;
    let phases = [
        ("(a) origin, direct (baseline)", &origin, 0),
        ("(b) agent, from its cache", &agent, 1),
        ("(c) tracker, batched announces", &announces, 2),
    ];
    for (label, l, proc) in phases {
        writeln!(
            out,
            "{label:<38} {:>8} {:>8} {:>8} {:>8} {:>7}   {:>9.1} {:>9.1}",
            ms(l.percentile(50.0)),
            ms(l.percentile(99.0)),
            ms(l.percentile(100.0)),
            l.count(),
            l.errors,
            after[proc].0,
            after[proc].1,
        )?;
    }
    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64().max(1e-9);
    writeln!(
        out,
        "agent vs origin: p50 {:.2}x, p99 {:.2}x; agent RSS grew {:.1} MiB under the load",
        ratio(agent.percentile(50.0), origin.percentile(50.0)),
        ratio(agent.percentile(99.0), origin.percentile(99.0)),
        after[1].0 - before[1].0
    )?;
    writeln!(
        out,
        "tracker: {:.0} batched announces/s ({:.0} blob records/s)",
        announces.count() as f64 / announces.elapsed.as_secs_f64(),
        (announces.count() * args.blobs) as f64 / announces.elapsed.as_secs_f64()
    )?;
    print!("{out}");
    ensure!(origin.errors + agent.errors + announces.errors == 0, "requests failed under load");
    Ok(())
}

/// A loopback cluster of real processes: tracker, origin, one agent.
struct Loopback {
    http: reqwest::Client,
    tracker_url: String,
    origin_url: String,
    agent_url: String,
    /// Index of each in the [`Cluster`]'s processes.
    tracker: usize,
    origin: usize,
    agent: usize,
}

/// Issues certificates and starts tracker, origin and agent on free loopback ports.
async fn start_loopback(
    dir: &Path,
    bins: &Bins,
    piece_length: u32,
    cluster: &mut Cluster,
) -> anyhow::Result<Loopback> {
    let (origin_bin, tracker_bin, agent_bin) = (&bins.origin, &bins.tracker, &bins.agent);
    // Certificates.
    let ca = dir.join("ca");
    let path = |p: &Path| p.to_str().map(str::to_owned).context("non-UTF-8 temp path");
    run_tool(origin_bin, &["ca", "init", &path(&ca)?])?;
    for node in ["origin", "agent"] {
        run_tool(
            origin_bin,
            &[
                "ca",
                "issue",
                "--ca",
                &path(&ca)?,
                "--name",
                node,
                "--role",
                node,
                &path(&dir.join(node).join("tls"))?,
            ],
        )?;
    }

    // Ports: bind :0 to find free ones, release them, hand them to the servers.
    let tracker_http = free_tcp_port()?;
    let origin_http = free_tcp_port()?;
    let origin_peer = free_udp_port()?;
    let agent_http = free_tcp_port()?;
    let agent_peer = free_udp_port()?;
    let tracker_url = format!("http://{tracker_http}");
    let origin_url = format!("http://{origin_http}");
    let agent_url = format!("http://{agent_http}");

    let tracker = cluster.spawn(
        "tracker",
        tracker_bin,
        &[s("serve"), s("--http"), s(tracker_http), s("--origin"), origin_url.clone()],
        dir,
    )?;
    let origin = cluster.spawn(
        "origin",
        origin_bin,
        &[
            s("serve"),
            s("--http"),
            s(origin_http),
            s("--peer"),
            s(origin_peer),
            s("--data"),
            path(&dir.join("origin").join("data"))?,
            s("--tls"),
            path(&dir.join("origin").join("tls"))?,
            s("--piece-length"),
            s(piece_length),
        ],
        dir,
    )?;
    let agent = cluster.spawn(
        "agent",
        agent_bin,
        &[
            s("serve"),
            s("--registry"),
            s(agent_http),
            s("--peer"),
            s(agent_peer),
            s("--data"),
            path(&dir.join("agent").join("data"))?,
            s("--tls"),
            path(&dir.join("agent").join("tls"))?,
            s("--tracker"),
            tracker_url.clone(),
        ],
        dir,
    )?;

    let http = reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(Duration::from_secs(5))
        .build()
        .context("http client")?;
    for url in [format!("{tracker_url}/healthz"), format!("{origin_url}/healthz"), format!("{agent_url}/v2/")]
    {
        wait_healthy(&http, &url, cluster).await?;
    }
    Ok(Loopback { http, tracker_url, origin_url, agent_url, tracker, origin, agent })
}

/// Generates a pseudo-random blob of `size` bytes and uploads it to the origin as
/// `bench/blob`; returns its digest.
async fn upload_blob(lb: &Loopback, dir: &Path, size: u64, seed: u64) -> anyhow::Result<String> {
    let blob_path = dir.join("blob.bin");
    let started = Instant::now();
    let digest = {
        let blob_path = blob_path.clone();
        tokio::task::spawn_blocking(move || write_random_blob(&blob_path, size, seed)).await??
    };
    eprintln!("generated {} MiB blob {digest} in {:.1?}", size / MIB, started.elapsed());

    // Monolithic upload with a streaming body.
    let started = Instant::now();
    let file = tokio::fs::File::open(&blob_path).await.context("open blob")?;
    let body = futures_util::stream::unfold(file, |mut file| async move {
        let mut buf = vec![0u8; CHUNK];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<_, std::io::Error>(Bytes::from(buf)), file))
            }
            Err(e) => Some((Err(e), file)),
        }
    });
    let resp = lb
        .http
        .post(format!("{}/v2/bench/blob/blobs/uploads/?digest={digest}", lb.origin_url))
        .header(reqwest::header::CONTENT_LENGTH, size)
        .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await
        .context("uploading the blob to the origin")?;
    let status = resp.status();
    ensure!(status.as_u16() == 201, "upload answered {status}: {}", resp.text().await.unwrap_or_default());
    eprintln!("uploaded to the origin in {:.1?}", started.elapsed());
    // The local file is no longer needed; free the disk space.
    let _ = std::fs::remove_file(&blob_path);
    Ok(digest)
}

async fn run_bench(args: &PullArgs, dir: &Path, bins: &Bins, cluster: &mut Cluster) -> anyhow::Result<()> {
    let size = args.size_mib * MIB;
    eprintln!("working in {}", dir.display());
    let lb = start_loopback(dir, bins, args.piece_length, cluster).await?;
    let (http, origin_url, agent_url) = (&lb.http, &lb.origin_url, &lb.agent_url);
    // Two blobs, one per cold pull: the agent keeps what it pulled.
    let digest = upload_blob(&lb, dir, size, args.seed).await?;
    let untouched_digest = upload_blob(&lb, dir, size, args.seed + 1).await?;
    let blob_url = |base: &str, digest: &str| format!("{base}/v2/bench/blob/blobs/{digest}");

    eprintln!("(a) direct GET from the origin...");
    let direct =
        fetch(http, &blob_url(origin_url, &digest), size, Some(&digest)).await.context("direct download")?;
    cluster.check_alive()?;

    // The direct GET reads pages the origin has cached since the upload and allocates none;
    // the cold pull writes the whole blob into the agent's page cache. On a VM the first
    // touch of a page costs far more than the copy (see `shoal_tests::pretouch`), so the
    // pull that is compared with the direct GET runs on pre-touched memory: both then pay
    // what bare metal would. Caches are not dropped: that would make the origin read from
    // disk in one phase and not in the other. The pull on untouched memory is reported too,
    // as what a pull on a VM with cold memory sees.
    eprintln!("(b) cold GET through the agent, memory pre-touched...");
    let cold = cold_pull(&lb, cluster, &digest, size, Some(dir), args.perf_record.as_deref()).await?;
    // Pages freed by earlier phases go back to the host within ~3 s (free page reporting).
    tokio::time::sleep(Duration::from_secs(5)).await;
    eprintln!("(b) cold GET through the agent, memory untouched...");
    let untouched = cold_pull(&lb, cluster, &untouched_digest, size, None, None).await?;

    let agent_blob = blob_url(agent_url, &digest);
    let mut hot = Vec::new();
    for i in 1..=3 {
        eprintln!("(c) hot GET through the agent, run {i}/3...");
        // Only the first hot run is verified: sha256 would otherwise cap the figure.
        let verify = (i == 1).then_some(digest.as_str());
        hot.push(fetch(http, &agent_blob, size, verify).await.context("hot download")?);
    }
    cluster.check_alive()?;

    let sha_rate = sha256_rate();
    eprintln!("(e) raw QUIC between two endpoints, same TLS and transport config...");
    let cpu_before = shoal_tests::procfs::cpu_time("self")?;
    let quic_rate = shoal_tests::quic_ceiling::measure(size).await? / MB;
    let quic_cpu = shoal_tests::procfs::cpu_time("self")? - cpu_before;

    // Report.
    let rate = |d: Duration| size as f64 / MB / d.as_secs_f64();
    let gib = size as f64 / (1u64 << 30) as f64;
    let per_gib = |cpu: Duration| format!("{:.2} s", cpu.as_secs_f64() / gib);
    let direct_rate = rate(direct);
    let cold_rate = rate(cold.elapsed);
    let untouched_rate = rate(untouched.elapsed);
    let hot_first = rate(hot[0]);
    let hot_best = hot.iter().copied().map(rate).fold(0.0, f64::max);
    let verdict = |ok: bool| if ok { "PASS" } else { "MISS" };
    let mut out = String::new();
    writeln!(
        out,
        "\nshoal loopback pull benchmark: blob {} MiB ({} bytes), piece length {} bytes",
        args.size_mib, size, args.piece_length
    )?;
    writeln!(
        out,
        "MB = 10^6 bytes. Bodies are streamed and discarded; (a), (b) and the 1st hot run are sha256-verified\n\
         on a separate thread while receiving (this machine's sha256: {sha_rate:.0} MB/s), hot runs 2-3 length-checked.\n\
         (b) pre-touched: the pages the agent's page cache needs are touched beforehand and freed just ahead\n\
         of its writes (a VM's first touch of a page is slow); (b) untouched: memory as the VM left it.\n\
         CPU = user + system time of the process during the cold pull, per GiB moved."
    )?;
    let mut row = |label: &str, figure: String, direct: String, quic: String, target: &str, result: &str| {
        writeln!(out, "{label:<36} {figure:>10} {direct:>9} {quic:>8}   {target:<30} {result}")
    };
    let mbs = |r: f64| format!("{r:.0} MB/s");
    let x = |r: f64, base: f64| format!("{:.2}x", r / base);
    let none = String::new;
    row("measure", "figure".into(), "vs direct".into(), "vs QUIC".into(), "target", "result")?;
    row(&"-".repeat(36), "-".repeat(10), "-".repeat(9), "-".repeat(8), &"-".repeat(30), "------")?;
    row(
        "(a) direct HTTP from origin",
        mbs(direct_rate),
        x(direct_rate, direct_rate),
        none(),
        "(baseline)",
        "",
    )?;
    let quic_row = (mbs(quic_rate), x(quic_rate, direct_rate), x(quic_rate, quic_rate));
    row("(e) raw QUIC ceiling, in-process", quic_row.0, quic_row.1, quic_row.2, "(transport only)", "info")?;
    let cold_ok = cold_rate >= 0.8 * quic_rate && cold_rate >= 0.5 * direct_rate;
    let cold_row = (mbs(cold_rate), x(cold_rate, direct_rate), x(cold_rate, quic_rate));
    let cold_target = ">= 0.80x QUIC, >= 0.50x direct";
    row(
        "(b) cold via agent, pre-touched",
        cold_row.0,
        cold_row.1,
        cold_row.2,
        cold_target,
        verdict(cold_ok),
    )?;
    let untouched_row = (mbs(untouched_rate), x(untouched_rate, direct_rate), x(untouched_rate, quic_rate));
    row(
        "(b) cold via agent, untouched",
        untouched_row.0,
        untouched_row.1,
        untouched_row.2,
        "(VM first touch)",
        "info",
    )?;
    row(
        "(c) hot via agent, 1st (verified)",
        mbs(hot_first),
        x(hot_first, direct_rate),
        none(),
        "(sha256-bound)",
        "info",
    )?;
    let hot_ok = hot_best >= 2000.0;
    row(
        "(c) hot via agent, best of 3",
        mbs(hot_best),
        x(hot_best, direct_rate),
        none(),
        ">= 2000 MB/s",
        verdict(hot_ok),
    )?;
    let agent_ok = cold.agent_cpu.as_secs_f64() / gib <= 1.5;
    row(
        "(d) agent CPU/GiB, cold pre-touched",
        per_gib(cold.agent_cpu),
        none(),
        none(),
        "<= 1.5 s",
        verdict(agent_ok),
    )?;
    row("(d) agent CPU/GiB, cold untouched", per_gib(untouched.agent_cpu), none(), none(), "", "info")?;
    row("(d) origin CPU/GiB, cold pre-touched", per_gib(cold.origin_cpu), none(), none(), "", "info")?;
    row("(d) origin CPU/GiB, cold untouched", per_gib(untouched.origin_cpu), none(), none(), "", "info")?;
    row("(e) raw QUIC CPU/GiB, both ends", per_gib(quic_cpu), none(), none(), "", "info")?;
    let mib = |kib: u64| kib as f64 / 1024.0;
    let peak = mib(cold.agent_peak_kib.max(untouched.agent_peak_kib));
    let rss_target = format!("<= 64 MiB (moving {} MiB)", args.size_mib);
    let rss_ok = peak <= 64.0;
    row(
        "(d) agent peak RSS, cold pulls",
        format!("{peak:.1} MiB"),
        none(),
        none(),
        &rss_target,
        verdict(rss_ok),
    )?;
    for (label, pull) in [("pre-touched", &cold), ("untouched", &untouched)] {
        match pull.served {
            Some(bytes) => writeln!(
                out,
                "origin shoal_peer_bytes_served_total grew by {bytes} bytes during the cold run, {label} ({:.2}x the blob)",
                bytes / size as f64
            )?,
            None => writeln!(out, "origin shoal_peer_bytes_served_total: not found in /metrics")?,
        }
    }
    if let Some(held) = cold.scratch_unused {
        writeln!(
            out,
            "pre-touch: {} MiB of the scratch memory were still held when the pull ended",
            held / MIB
        )?;
    }
    if let Some(path) = &args.perf_record {
        writeln!(
            out,
            "perf recorded the agent during the pre-touched cold pull (slowing it) into {}",
            path.display()
        )?;
    }
    print!("{out}");
    Ok(())
}

/// What one cold pull through the agent took and what it cost the servers.
#[derive(Debug)]
struct ColdPull {
    elapsed: Duration,
    agent_cpu: Duration,
    origin_cpu: Duration,
    agent_peak_kib: u64,
    /// Growth of the origin's `shoal_peer_bytes_served_total`.
    served: Option<f64>,
    /// Scratch bytes the pull did not need, when memory was pre-touched.
    scratch_unused: Option<u64>,
}

/// GETs blob `digest` through the agent, which does not have it yet. With `pretouch`, first
/// touches `size` bytes of memory with a scratch file in that directory and frees it just
/// ahead of the agent's writes (see `shoal_tests::pretouch`); with `perf`, records the
/// agent's profile into that file meanwhile.
async fn cold_pull(
    lb: &Loopback,
    cluster: &mut Cluster,
    digest: &str,
    size: u64,
    pretouch: Option<&Path>,
    perf: Option<&Path>,
) -> anyhow::Result<ColdPull> {
    use shoal_tests::procfs::{cpu_time, peak_rss_kib, reset_peak_rss};
    let agent = cluster.procs[lb.agent].pid()?;
    let origin = cluster.procs[lb.origin].pid()?;
    let perf = perf.map(|out| PerfRecord::start(out, agent)).transpose()?;
    if perf.is_some() {
        // Let it attach before the measured phase starts.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let scratch = match pretouch {
        Some(dir) => {
            let dir = dir.to_path_buf();
            Some(tokio::task::spawn_blocking(move || ScratchMemory::touch(&dir, size)).await??)
        }
        None => None,
    };
    let served_before = peer_bytes_served(&lb.http, &lb.origin_url).await;
    reset_peak_rss(agent)?;
    let (agent_before, origin_before) = (cpu_time(&agent.to_string())?, cpu_time(&origin.to_string())?);
    let releaser = scratch.map(|s| s.release_ahead_of(agent)).transpose()?;
    let url = format!("{}/v2/bench/blob/blobs/{digest}", lb.agent_url);
    let elapsed = fetch(&lb.http, &url, size, Some(digest)).await.context("cold download")?;
    let scratch_unused = releaser.map(Releaser::finish);
    let (agent_after, origin_after) = (cpu_time(&agent.to_string())?, cpu_time(&origin.to_string())?);
    let agent_peak_kib = peak_rss_kib(agent)?;
    if let Some(perf) = perf {
        perf.stop()?;
    }
    cluster.check_alive()?;
    let served_after = peer_bytes_served(&lb.http, &lb.origin_url).await;
    Ok(ColdPull {
        elapsed,
        agent_cpu: agent_after.saturating_sub(agent_before),
        origin_cpu: origin_after.saturating_sub(origin_before),
        agent_peak_kib,
        served: served_before.zip(served_after).map(|(before, after)| after - before),
        scratch_unused,
    })
}

/// `perf record` attached to one process, stopped with SIGINT so it writes its data file.
#[derive(Debug)]
struct PerfRecord {
    child: Child,
}

impl PerfRecord {
    fn start(out: &Path, pid: u32) -> anyhow::Result<Self> {
        let child = Command::new("perf")
            .args(["record", "-F", "999", "--call-graph", "dwarf,16384", "-p", &pid.to_string(), "-o"])
            .arg(out)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("starting perf record (is perf installed?)")?;
        Ok(Self { child })
    }

    fn stop(mut self) -> anyhow::Result<()> {
        let status = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status()
            .context("signalling perf")?;
        ensure!(status.success(), "kill -INT perf: {status}");
        self.child.wait().context("waiting for perf")?;
        Ok(())
    }
}

/// Runs the raw QUIC ceiling `runs` times and prints each rate and CPU cost.
async fn quic_ceiling(size: u64, runs: u32) -> anyhow::Result<()> {
    let gib = size as f64 / (1u64 << 30) as f64;
    for run in 1..=runs {
        let cpu_before = shoal_tests::procfs::cpu_time("self")?;
        let rate = shoal_tests::quic_ceiling::measure(size).await? / MB;
        let cpu = (shoal_tests::procfs::cpu_time("self")? - cpu_before).as_secs_f64();
        println!("run {run}/{runs}: {rate:.0} MB/s, {:.2} CPU-s/GiB (both ends)", cpu / gib);
    }
    Ok(())
}

/// Polls `url` until it answers 2xx, failing fast if a server died.
async fn wait_healthy(http: &reqwest::Client, url: &str, cluster: &mut Cluster) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        cluster.check_alive()?;
        if let Ok(resp) = http.get(url).timeout(Duration::from_secs(2)).send().await {
            if resp.status().is_success() {
                return Ok(());
            }
        }
        ensure!(Instant::now() < deadline, "{url} not healthy after 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Writes `size` pseudo-random bytes to `path` chunk by chunk; returns `sha256:<hex>`.
fn write_random_blob(path: &Path, size: u64, seed: u64) -> anyhow::Result<String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = BufWriter::with_capacity(CHUNK, File::create(path).context("create blob file")?);
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut left = size;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        rng.fill_bytes(&mut buf[..n]);
        hash.update(&buf[..n]);
        out.write_all(&buf[..n]).context("write blob file")?;
        left -= n as u64;
    }
    out.into_inner().map_err(|e| e.into_error()).context("flush blob file")?.sync_all()?;
    Ok(format!("sha256:{}", hex::encode(hash.finalize())))
}

/// GETs `url` and discards the body; returns the time from sending the request until the
/// last byte arrived and, with `digest`, was sha256-verified by a separate thread (hashing
/// overlaps the transfer, but a verified run cannot be faster than this machine's sha256).
/// Without `digest` only the length is checked.
async fn fetch(
    http: &reqwest::Client,
    url: &str,
    size: u64,
    digest: Option<&str>,
) -> anyhow::Result<Duration> {
    let (tx, hasher) = match digest {
        Some(_) => {
            let (tx, rx) = std::sync::mpsc::sync_channel::<Bytes>(64);
            let hasher = std::thread::spawn(move || {
                let mut hash = Sha256::new();
                for chunk in rx {
                    hash.update(&chunk);
                }
                format!("sha256:{}", hex::encode(hash.finalize()))
            });
            (Some(tx), Some(hasher))
        }
        None => (None, None),
    };
    let started = Instant::now();
    let received = async {
        let mut resp = http.get(url).send().await.with_context(|| format!("GET {url}"))?;
        let status = resp.status();
        if !status.is_success() {
            bail!("GET {url}: {status}: {}", resp.text().await.unwrap_or_default());
        }
        let mut len = 0u64;
        while let Some(chunk) = resp.chunk().await.with_context(|| format!("reading {url}"))? {
            len += chunk.len() as u64;
            if let Some(tx) = &tx {
                tx.send(chunk).map_err(|_| anyhow::anyhow!("hasher thread gone"))?;
            }
        }
        Ok(len)
    }
    .await;
    drop(tx);
    let actual = match hasher {
        Some(h) => Some(h.join().map_err(|_| anyhow::anyhow!("hasher thread panicked"))?),
        None => None,
    };
    let elapsed = started.elapsed();
    let len = received?;
    ensure!(len == size, "GET {url}: got {len} bytes, expected {size}");
    if let (Some(expected), Some(actual)) = (digest, actual) {
        ensure!(actual == expected, "GET {url}: body has digest {actual}, expected {expected}");
    }
    eprintln!(
        "    {:.0} MB/s ({:.2?}){}",
        size as f64 / MB / elapsed.as_secs_f64(),
        elapsed,
        if digest.is_some() { ", sha256 OK" } else { ", length OK" }
    );
    Ok(elapsed)
}

/// This machine's single-thread sha256 speed in MB/s (over 64 MiB).
fn sha256_rate() -> f64 {
    let buf = vec![0x5au8; CHUNK];
    let mut hash = Sha256::new();
    let started = Instant::now();
    for _ in 0..64 {
        hash.update(&buf);
    }
    std::hint::black_box(hash.finalize());
    (64 * CHUNK) as f64 / MB / started.elapsed().as_secs_f64()
}

/// `shoal_peer_bytes_served_total` from the origin's `/metrics` (summed over label sets).
async fn peer_bytes_served(http: &reqwest::Client, origin_url: &str) -> Option<f64> {
    let text = http.get(format!("{origin_url}/metrics")).send().await.ok()?.text().await.ok()?;
    let values: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with("shoal_peer_bytes_served_total"))
        .filter_map(|l| l.split_whitespace().last()?.parse().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

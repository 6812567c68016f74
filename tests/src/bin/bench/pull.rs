//! `shoal-bench pull`, the loopback benchmark: a direct download from the origin against cold
//! pulls through the agent (pre-touched and untouched memory, with the servers' CPU and the
//! agent's peak RSS), hot pulls from its cache and the raw QUIC ceiling, as one table.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{ensure, Context as _};
use shoal_tests::pretouch::{Releaser, ScratchMemory};

use crate::cluster::{with_cluster, Bins, Cluster};
use crate::fetch::{fetch, peer_bytes_served, sha256_rate};
use crate::loopback::{start_loopback, upload_blob, Loopback};
use crate::{MB, MIB};

#[derive(Debug, clap::Args)]
pub(crate) struct PullArgs {
    /// Size of the benchmark blob in MiB.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Directory with shoal-origin, shoal-tracker and shoal-agent (default: this binary's).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Piece length the origin uses for the blob's metainfo, in bytes.
    #[arg(long, default_value_t = shoal_shared::metainfo::DEFAULT_PIECE_LENGTH)]
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

pub(crate) async fn pull(args: PullArgs) -> anyhow::Result<()> {
    ensure!(args.size_mib > 0, "--size-mib must be positive");
    let bins = Bins::find(args.bin_dir.as_deref())?;
    with_cluster(args.keep, async |dir: &Path, cluster: &mut Cluster| {
        run_bench(&args, dir, &bins, cluster).await
    })
    .await
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

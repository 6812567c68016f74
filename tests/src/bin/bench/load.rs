//! `shoal-bench load`: many clients at once on the agent (the origin as the baseline) and a
//! sustained announce rate on the tracker, as latency percentiles and resident memory.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Context as _};

use crate::cluster::{with_cluster, Bins, Cluster};
use crate::fetch::fetch;
use crate::loopback::{start_loopback, upload_blob};

#[derive(Debug, clap::Args)]
pub(crate) struct LoadArgs {
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

pub(crate) async fn load(args: LoadArgs) -> anyhow::Result<()> {
    ensure!(args.clients > 0 && args.size_kib > 0 && args.peers > 0, "counts must be positive");
    let bins = Bins::find(args.bin_dir.as_deref())?;
    with_cluster(false, async |dir: &Path, cluster: &mut Cluster| run_load(&args, dir, &bins, cluster).await)
        .await
}

pub(crate) async fn run_load(
    args: &LoadArgs,
    dir: &Path,
    bins: &Bins,
    cluster: &mut Cluster,
) -> anyhow::Result<()> {
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

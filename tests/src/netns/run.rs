//! The run: its fixed ports and names, cleanup however it ends, and the setup (certificates,
//! image, tracker, origin and agents in the namespaces) before the three phases and the
//! report. Processes live in `procs`, a phase's measurement in `phase`, the table in
//! `report`, CPU accounting in `cpu`.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{anyhow, ensure, Context as _};
use tokio::signal::unix::{signal, SignalKind};

use super::phase::{agents_metric, phase, Ctx};
use super::procs::{run_tool, s, wait_healthy, Bins, Procs};
use super::report::report;
use super::topology::{self, Topology};
use super::SwarmArgs;

const MIB: u64 = 1 << 20;
const REPO: &str = "bench/swarm";
const TAG: &str = "v1";
const ORIGIN_HTTP_PORT: u16 = 5000;
const ORIGIN_PEER_PORT: u16 = 5001;
const TRACKER_PORT: u16 = 5100;
/// The origin serves beyond loopback here, so it needs an upload token.
const UPLOAD_TOKEN: &str = "netns-bench-token";
pub(super) const AGENT_REGISTRY: &str = "127.0.0.1:5050";
const AGENT_PEER_PORT: u16 = 5051;

/// Runs the benchmark; namespaces and processes are removed however it ends (error, panic,
/// Ctrl-C or SIGTERM). Leftovers of a crashed earlier run are removed first.
pub async fn swarm(args: SwarmArgs) -> anyhow::Result<()> {
    ensure!((1..=200).contains(&args.hosts), "--hosts must be between 1 and 200");
    ensure!(args.size_mib > 0 && args.size_mib <= 64 * 1024, "--size-mib must be between 1 and 65536");
    ensure!((64..=65536).contains(&args.piece_kib), "--piece-kib must be between 64 and 65536");
    let bins = Bins::find(args.bin_dir.as_deref())?;
    // Registered before anything is built, so a Ctrl-C during setup is seen, not fatal.
    let mut interrupt = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut terminate = signal(SignalKind::terminate()).context("SIGTERM handler")?;

    for ns in topology::remove_stale()? {
        eprintln!("removed namespace {ns} left by an earlier run");
    }
    let tmp = tempfile::Builder::new().prefix("shoal-netbench-").tempdir().context("temp dir")?;
    let dir = tmp.path().to_path_buf();
    eprintln!("working in {}", dir.display());
    let topo = Topology::create(args.rate, &args.host_rates()?)?;
    let mut procs = Procs::default();
    let result = tokio::select! {
        r = run(&args, &bins, &topo, &dir, &mut procs) => r,
        _ = interrupt.recv() => Err(anyhow!("interrupted")),
        _ = terminate.recv() => Err(anyhow!("terminated")),
    };
    if let Err(e) = &result {
        eprintln!("benchmark failed: {e:#}");
        procs.print_log_tails(20);
    }
    drop(procs);
    drop(topo);
    if args.keep {
        eprintln!("kept {}", tmp.keep().display());
    }
    result
}

async fn run(
    args: &SwarmArgs,
    bins: &Bins,
    topo: &Topology,
    dir: &Path,
    procs: &mut Procs,
) -> anyhow::Result<()> {
    let seed = &topo.seed;
    let path = |p: &Path| p.to_str().map(str::to_owned).context("non-UTF-8 temp path");

    // Certificates: one per node, from one cluster CA.
    let ca = dir.join("ca");
    run_tool(&bins.origin, None, &["ca", "init", &path(&ca)?]).await?;
    let tls = |name: &str| dir.join(name).join("tls");
    for name in std::iter::once("seed".to_owned()).chain((0..args.hosts).map(|i| format!("h{i}"))) {
        run_tool(
            &bins.origin,
            None,
            &[
                "ca",
                "issue",
                "--ca",
                &path(&ca)?,
                "--name",
                &name,
                "--role",
                if name == "seed" { "origin" } else { "agent" },
                &path(&tls(&name))?,
            ],
        )
        .await?;
    }

    // The image: one layer of pseudo-random data.
    let layout = dir.join("image");
    let size_bytes = usize::try_from(args.size_mib * MIB).context("--size-mib too large")?;
    let image = {
        let (layout, seed) = (layout.clone(), args.seed);
        tokio::task::spawn_blocking(move || {
            crate::image::generate_oci_layout(&layout, TAG, &[size_bytes], seed)
        })
        .await??
    };
    let (digest, size) = image.layers[0].clone();
    eprintln!("generated image {} with layer {digest} ({size} bytes)", image.manifest);

    // Seed host: tracker and origin.
    let origin_url = format!("http://{}:{ORIGIN_HTTP_PORT}", seed.ip);
    let tracker_url = format!("http://{}:{TRACKER_PORT}", seed.ip);
    procs.spawn(
        "tracker",
        &seed.ns,
        &bins.tracker,
        &[
            s("serve"),
            s("--http"),
            format!("{}:{TRACKER_PORT}", seed.ip),
            s("--origin"),
            origin_url.clone(),
            s("--origin-token"),
            s(UPLOAD_TOKEN),
        ],
        dir,
    )?;
    procs.spawn(
        "origin",
        &seed.ns,
        &bins.origin,
        &[
            s("serve"),
            s("--http"),
            format!("{}:{ORIGIN_HTTP_PORT}", seed.ip),
            s("--peer"),
            format!("{}:{ORIGIN_PEER_PORT}", seed.ip),
            s("--data"),
            path(&dir.join("seed").join("data"))?,
            s("--tls"),
            path(&tls("seed"))?,
            s("--piece-length"),
            s(u64::from(args.piece_kib) * 1024),
            s("--upload-token"),
            s(UPLOAD_TOKEN),
        ],
        dir,
    )?;
    for url in [format!("{tracker_url}/healthz"), format!("{origin_url}/healthz")] {
        wait_healthy(bins, seed, &url, procs).await?;
    }
    let layout_ref = format!("oci:{}:{TAG}", path(&layout)?);
    run_tool(
        &bins.origin,
        Some(&seed.ns),
        &["push", "--origin", &origin_url, "--token", UPLOAD_TOKEN, &layout_ref, &format!("{REPO}:{TAG}")],
    )
    .await
    .context("pushing the image to the origin")?;
    eprintln!("pushed {REPO}:{TAG} to the origin");
    // The image directory is no longer needed; free the disk.
    let _ = std::fs::remove_dir_all(&layout);

    // One agent per host, advertising its namespace address.
    for (i, host) in topo.hosts.iter().enumerate() {
        let name = format!("h{i}");
        procs.spawn(
            &format!("agent-{name}"),
            &host.ns,
            &bins.agent,
            &[
                s("serve"),
                s("--registry"),
                s(AGENT_REGISTRY),
                s("--peer"),
                format!("{}:{AGENT_PEER_PORT}", host.ip),
                s("--data"),
                path(&dir.join(&name).join("data"))?,
                s("--tls"),
                path(&tls(&name))?,
                s("--tracker"),
                tracker_url.clone(),
            ],
            dir,
        )?;
    }
    for host in &topo.hosts {
        wait_healthy(bins, host, &format!("http://{AGENT_REGISTRY}/v2/"), procs).await?;
    }

    let ctx = Ctx { args, bins, topo, dir, size, digest: digest.clone(), origin_url: origin_url.clone() };
    let origin_blob = format!("{origin_url}/v2/{REPO}/blobs/{digest}");
    let agent_blob = format!("http://{AGENT_REGISTRY}/v2/{REPO}/blobs/{digest}");
    let n = args.hosts;

    eprintln!("(1) physical limit: one host alone GETs the blob from the origin over HTTP...");
    let physical =
        phase(&ctx, procs, "(1) physical limit, HTTP, 1 host", &topo.hosts[..1], &origin_blob).await?;
    let limit = physical.secs[0];
    let mut phases = vec![physical];
    if !args.skip_baseline {
        eprintln!("(2) baseline: {n} hosts GET the blob from the origin over HTTP at once...");
        let label = format!("(2) baseline, HTTP from origin, {n}");
        phases.push(phase(&ctx, procs, &label, &topo.hosts, &origin_blob).await?);
    }
    eprintln!("(3) shoal: {n} hosts GET the blob from their own agent at once (cold caches)...");
    let label = format!("(3) shoal, via own agent, {n}");
    phases.push(phase(&ctx, procs, &label, &topo.hosts, &agent_blob).await?);

    // The agents' own view of the Shoal phase (they were idle before it).
    let pieces = ctx.size.div_ceil(u64::from(args.piece_kib) * 1024) as f64;
    let fetched = agents_metric(&ctx, "shoal_agent_pieces_fetched_total").await;
    let served = agents_metric(&ctx, "shoal_peer_bytes_served_total").await;
    let bad = agents_metric(&ctx, "shoal_agent_bad_pieces_total").await;
    let held_back = agents_metric(&ctx, "shoal_agent_pieces_held_back_total").await;
    let discarded = agents_metric(&ctx, "shoal_agent_piece_discarded_bytes_total").await;
    let show = |v: Option<f64>| v.map(|v| format!("{v:.0}")).unwrap_or_else(|| "n/a".into());
    let agents_line = format!(
        "agents (from their /metrics): pieces fetched {} for {} needed ({:.2}x), piece bytes served to peers {} \
         ({:.2}x the blob), piece bytes received and not kept {} ({:.3}x the blob), bad pieces {}, \
         pieces held back from early offers (arriving too slowly) {}",
        show(fetched),
        pieces * n as f64,
        fetched.unwrap_or(f64::NAN) / (pieces * n as f64),
        show(served),
        served.unwrap_or(f64::NAN) / size as f64,
        show(discarded),
        discarded.unwrap_or(f64::NAN) / size as f64,
        show(bad),
        show(held_back),
    );

    let mut qdisc = String::new();
    for node in std::iter::once(seed).chain(&topo.hosts) {
        writeln!(qdisc, "{}", topo.qdisc_stats(node))?;
    }
    std::fs::write(dir.join("qdisc.txt"), qdisc).context("writing qdisc.txt")?;
    print!("{}", report(args, size, limit, &phases)?);
    println!("{agents_line}");
    Ok(())
}

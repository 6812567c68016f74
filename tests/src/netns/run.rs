//! The run: certificates, image, processes in the namespaces, the three phases, the report.

use std::fmt::Write as _;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context as _};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::signal::unix::{signal, SignalKind};

use super::client::{unix_ns, PullReport};
use super::topology::{self, Node, Topology};
use super::{Spread, SwarmArgs};

const MIB: u64 = 1 << 20;
const REPO: &str = "bench/swarm";
const TAG: &str = "v1";
const ORIGIN_HTTP_PORT: u16 = 5000;
const ORIGIN_PEER_PORT: u16 = 5001;
const TRACKER_PORT: u16 = 5100;
/// The origin serves beyond loopback here, so it needs an upload token.
const UPLOAD_TOKEN: &str = "netns-bench-token";
const AGENT_REGISTRY: &str = "127.0.0.1:5050";
const AGENT_PEER_PORT: u16 = 5051;
/// The kernel's USER_HZ: the unit of the CPU times in `/proc/*/stat`.
const USER_HZ: f64 = 100.0;

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
    let topo = Topology::create(args.hosts, args.rate)?;
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

#[derive(Debug)]
struct Bins {
    origin: PathBuf,
    tracker: PathBuf,
    agent: PathBuf,
    /// This binary, run inside the namespaces as the HTTP client.
    bench: PathBuf,
}

impl Bins {
    fn find(dir: Option<&Path>) -> anyhow::Result<Self> {
        let bench = std::env::current_exe().context("current exe")?;
        let dir = match dir {
            Some(d) => d.to_path_buf(),
            None => bench.parent().context("current exe has no directory")?.to_path_buf(),
        };
        let bin = |name: &str| -> anyhow::Result<PathBuf> {
            let path = dir.join(name);
            ensure!(
                path.is_file(),
                "{} not found (cargo build --release --workspace, or --bin-dir)",
                path.display()
            );
            Ok(path)
        };
        Ok(Self {
            origin: bin("shoal-origin")?,
            tracker: bin("shoal-tracker")?,
            agent: bin("shoal-agent")?,
            bench,
        })
    }
}

/// One long-running server process in a namespace; SIGKILLed when dropped.
#[derive(Debug)]
struct Proc {
    name: String,
    child: Child,
    pid: u32,
    log: PathBuf,
}

/// The server processes of the run.
#[derive(Debug, Default)]
struct Procs {
    list: Vec<Proc>,
}

impl Procs {
    fn spawn(&mut self, name: &str, ns: &str, bin: &Path, args: &[String], dir: &Path) -> anyhow::Result<()> {
        let log = dir.join(format!("{name}.log"));
        let stderr = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let stdout = stderr.try_clone().context("dup log file")?;
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .env("SHOAL_LOG", std::env::var("SHOAL_LOG").unwrap_or_else(|_| "info".into()))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let pid = child.id().context("no pid")?;
        self.list.push(Proc { name: name.to_owned(), child, pid, log });
        Ok(())
    }

    fn check_alive(&mut self) -> anyhow::Result<()> {
        for p in &mut self.list {
            if let Some(status) = p.child.try_wait().context("try_wait")? {
                bail!("{} exited early: {status} (log: {})", p.name, p.log.display());
            }
        }
        Ok(())
    }

    /// CPU seconds used so far by the processes whose name starts with `prefix`.
    fn cpu_secs(&self, prefix: &str) -> f64 {
        self.list
            .iter()
            .filter(|p| p.name.starts_with(prefix))
            .filter_map(|p| proc_cpu_secs(&p.pid.to_string()).ok())
            .sum()
    }

    fn print_log_tails(&self, lines: usize) {
        for p in &self.list {
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

/// User + system CPU seconds of `/proc/<pid>` (`self` for this process).
pub(super) fn proc_cpu_secs(pid: &str) -> anyhow::Result<f64> {
    let stat =
        std::fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("/proc/{pid}/stat"))?;
    // The command name may hold spaces and parentheses: fields are counted after the last ')'.
    let rest = stat.rsplit_once(')').context("malformed /proc/pid/stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<f64> {
        Ok(fields.get(i).context("short /proc/pid/stat")?.parse::<u64>()? as f64)
    };
    // utime and stime are fields 14 and 15 of the line, 12th and 13th after the name.
    Ok((ticks(11)? + ticks(12)?) / USER_HZ)
}

/// Machine-wide CPU time from `/proc/stat`, in ticks.
#[derive(Debug, Clone, Copy, Default)]
struct CpuTimes {
    user: u64,
    system: u64,
    softirq: u64,
    idle: u64,
    total: u64,
}

impl CpuTimes {
    fn now() -> anyhow::Result<Self> {
        let stat = std::fs::read_to_string("/proc/stat").context("/proc/stat")?;
        let line = stat.lines().next().context("empty /proc/stat")?;
        let v: Vec<u64> = line.split_whitespace().skip(1).map(|f| f.parse().unwrap_or(0)).collect();
        ensure!(v.len() >= 7, "short cpu line in /proc/stat");
        // user nice system idle iowait irq softirq steal ...
        let total = v.iter().take(8).sum();
        Ok(Self { user: v[0] + v[1], system: v[2] + v[5], softirq: v[6], idle: v[3] + v[4], total })
    }

    /// The ticks spent between `before` and `self`. Saturating: the kernel's counters are
    /// not all monotonic (iowait, part of `idle` and `total`, can go backwards).
    fn since(self, before: Self) -> Self {
        Self {
            user: self.user.saturating_sub(before.user),
            system: self.system.saturating_sub(before.system),
            softirq: self.softirq.saturating_sub(before.softirq),
            idle: self.idle.saturating_sub(before.idle),
            total: self.total.saturating_sub(before.total),
        }
    }

    fn pct(self, part: u64) -> f64 {
        100.0 * part as f64 / self.total.max(1) as f64
    }
}

/// What one phase measured.
#[derive(Debug)]
struct Phase {
    label: String,
    /// Completion time of each host, seconds from the common start.
    secs: Vec<f64>,
    /// Time to the first body byte, seconds from the common start.
    first_byte_secs: Vec<f64>,
    /// Bytes the seed host sent (origin + tracker, everything on its link).
    seed_tx: u64,
    /// Bytes all hosts sent (uploads to other hosts, requests).
    hosts_tx: u64,
    /// Growth of the origin's `shoal_peer_bytes_served_total` (QUIC piece bytes).
    origin_quic: Option<f64>,
    cpu: CpuTimes,
    wall: f64,
    agents_cpu: f64,
    origin_cpu: f64,
    tracker_cpu: f64,
    clients_cpu: f64,
}

/// Everything a phase needs.
struct Ctx<'a> {
    args: &'a SwarmArgs,
    bins: &'a Bins,
    topo: &'a Topology,
    dir: &'a Path,
    size: u64,
    digest: String,
    origin_url: String,
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
    let show = |v: Option<f64>| v.map(|v| format!("{v:.0}")).unwrap_or_else(|| "n/a".into());
    let agents_line = format!(
        "agents (from their /metrics): pieces fetched {} for {} needed ({:.2}x), piece bytes served to peers {} \
         ({:.2}x the blob), bad pieces {}",
        show(fetched),
        pieces * n as f64,
        fetched.unwrap_or(f64::NAN) / (pieces * n as f64),
        show(served),
        served.unwrap_or(f64::NAN) / size as f64,
        show(bad),
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

fn s(x: impl ToString) -> String {
    x.to_string()
}

/// Runs a short-lived command (in `ns` when given) to completion.
async fn run_tool(bin: &Path, ns: Option<&str>, args: &[&str]) -> anyhow::Result<String> {
    let mut cmd = match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(bin);
            c
        }
        None => Command::new(bin),
    };
    let out = cmd
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("running {}", bin.display()))?;
    ensure!(
        out.status.success(),
        "{} {} failed ({}): {}",
        bin.display(),
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8(out.stdout).context("non-UTF-8 output")
}

async fn wait_healthy(bins: &Bins, node: &Node, url: &str, procs: &mut Procs) -> anyhow::Result<()> {
    procs.check_alive()?;
    run_tool(&bins.bench, Some(&node.ns), &["netns-client", "wait", "--url", url, "--timeout-secs", "30"])
        .await
        .with_context(|| format!("waiting for {url} in {}", node.ns))?;
    procs.check_alive()
}

/// `shoal_peer_bytes_served_total` of the origin (summed over label sets), if exported.
async fn origin_quic_bytes(ctx: &Ctx<'_>) -> Option<f64> {
    let url = format!("{}/metrics", ctx.origin_url);
    metric(ctx, &ctx.topo.seed, &url, "shoal_peer_bytes_served_total").await
}

/// A counter from a Prometheus page fetched inside `node`'s namespace (summed over label
/// sets), if exported.
async fn metric(ctx: &Ctx<'_>, node: &Node, url: &str, name: &str) -> Option<f64> {
    let text =
        run_tool(&ctx.bins.bench, Some(&node.ns), &["netns-client", "body", "--url", url]).await.ok()?;
    let values: Vec<f64> = text
        .lines()
        .filter(|l| l.split([' ', '{']).next() == Some(name))
        .filter_map(|l| l.split_whitespace().last()?.parse().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// Sum of a counter over every agent (cumulative since the agents started).
async fn agents_metric(ctx: &Ctx<'_>, name: &str) -> Option<f64> {
    let url = format!("http://{AGENT_REGISTRY}/metrics");
    let mut sum = 0.0;
    for host in &ctx.topo.hosts {
        sum += metric(ctx, host, &url, name).await?;
    }
    Some(sum)
}

/// `timeout` from now; an error instead of an overflow for a huge `--phase-timeout`.
fn deadline_after(timeout: Duration) -> anyhow::Result<tokio::time::Instant> {
    tokio::time::Instant::now()
        .checked_add(timeout)
        .with_context(|| format!("--phase-timeout {} s is too large", timeout.as_secs()))
}

/// One pulling client per host, started together.
struct Puller {
    ns: String,
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

/// Runs `url` on every host in `hosts` at once and measures it.
async fn phase(
    ctx: &Ctx<'_>,
    procs: &mut Procs,
    label: &str,
    hosts: &[Node],
    url: &str,
) -> anyhow::Result<Phase> {
    procs.check_alive()?;
    let nominal = ctx.size as f64 / ctx.args.rate.bytes_per_sec();
    let timeout = Duration::from_secs(
        ctx.args.phase_timeout.unwrap_or(((3.0 * hosts.len() as f64 * nominal) as u64).saturating_add(120)),
    );
    // Refused before any client starts (the deadline itself is taken at the start).
    deadline_after(timeout)?;
    let mut pullers = Vec::with_capacity(hosts.len());
    for host in hosts {
        let log = ctx.dir.join(format!("client-{}.log", host.ns.rsplit('-').next().unwrap_or("x")));
        let stderr = File::options().create(true).append(true).open(&log).context("client log")?;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &host.ns])
            .arg(&ctx.bins.bench)
            .args([
                "netns-client",
                "pull",
                "--url",
                url,
                "--size",
                &ctx.size.to_string(),
                "--digest",
                &ctx.digest,
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .context("starting a client")?;
        let stdin = child.stdin.take().context("client stdin")?;
        let lines = BufReader::new(child.stdout.take().context("client stdout")?).lines();
        pullers.push(Puller { ns: host.ns.clone(), child, stdin, lines });
    }
    for p in &mut pullers {
        let line = tokio::time::timeout(Duration::from_secs(30), p.lines.next_line())
            .await
            .with_context(|| format!("client in {} not ready after 30 s", p.ns))??;
        ensure!(line.as_deref() == Some("ready"), "client in {} said {line:?} instead of ready", p.ns);
    }

    let seed_tx = Topology::tx_bytes(&ctx.topo.seed)?;
    let hosts_tx: u64 = hosts.iter().map(Topology::tx_bytes).sum::<anyhow::Result<u64>>()?;
    let origin_quic = origin_quic_bytes(ctx).await;
    let cpu_before = (procs.cpu_secs("agent"), procs.cpu_secs("origin"), procs.cpu_secs("tracker"));
    let stat_before = CpuTimes::now()?;

    let start = unix_ns();
    for p in &mut pullers {
        p.stdin.write_all(b"go\n").await.with_context(|| format!("starting the client in {}", p.ns))?;
        p.stdin.flush().await?;
    }
    let mut reports = Vec::with_capacity(pullers.len());
    let deadline = deadline_after(timeout)?;
    for p in &mut pullers {
        let line = tokio::time::timeout_at(deadline, p.lines.next_line())
            .await
            .map_err(|_| anyhow!("{label}: client in {} not done after {} s", p.ns, timeout.as_secs()))??
            .with_context(|| format!("{label}: client in {} exited without a report", p.ns))?;
        let report: PullReport =
            serde_json::from_str(&line).with_context(|| format!("client in {} printed {line:?}", p.ns))?;
        let _ = p.child.wait().await;
        reports.push((p.ns.clone(), report));
    }
    let stat = CpuTimes::now()?.since(stat_before);
    let wall = (unix_ns().saturating_sub(start)) as f64 / 1e9;
    let errors: Vec<String> =
        reports.iter().filter_map(|(ns, r)| r.error.as_ref().map(|e| format!("{ns}: {e}"))).collect();
    ensure!(
        errors.is_empty(),
        "{label}: {} of {} hosts failed:\n{}",
        errors.len(),
        reports.len(),
        errors.join("\n")
    );
    procs.check_alive()?;

    let secs_since = |t: u64| t.saturating_sub(start) as f64 / 1e9;
    let origin_after = origin_quic_bytes(ctx).await;
    let hosts_tx_after: u64 = hosts.iter().map(Topology::tx_bytes).sum::<anyhow::Result<u64>>()?;
    let mut done: Vec<f64> = reports.iter().map(|(_, r)| secs_since(r.done_unix_ns)).collect();
    done.sort_by(f64::total_cmp);
    let (first, last) = (done.first().copied().unwrap_or(0.0), done.last().copied().unwrap_or(0.0));
    eprintln!("    done in {first:.2} s to {last:.2} s, every sha256 OK");
    Ok(Phase {
        label: label.to_owned(),
        secs: reports.iter().map(|(_, r)| secs_since(r.done_unix_ns)).collect(),
        first_byte_secs: reports.iter().map(|(_, r)| secs_since(r.first_byte_unix_ns)).collect(),
        seed_tx: Topology::tx_bytes(&ctx.topo.seed)? - seed_tx,
        hosts_tx: hosts_tx_after - hosts_tx,
        origin_quic: origin_quic.zip(origin_after).map(|(a, b)| b - a),
        cpu: stat,
        wall,
        agents_cpu: procs.cpu_secs("agent") - cpu_before.0,
        origin_cpu: procs.cpu_secs("origin") - cpu_before.1,
        tracker_cpu: procs.cpu_secs("tracker") - cpu_before.2,
        clients_cpu: reports.iter().map(|(_, r)| r.cpu_secs).sum(),
    })
}

/// The table printed at the end.
fn report(args: &SwarmArgs, size: u64, limit: f64, phases: &[Phase]) -> anyhow::Result<String> {
    let mut out = String::new();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let goodput_bits = size as f64 * 8.0 / limit;
    let cap = args.rate.bits_per_sec() as f64;
    writeln!(
        out,
        "\nshoal swarm benchmark: {} hosts + 1 seed (tracker, origin) in network namespaces on one bridge,\n\
         every link capped at {} in each direction (tbf); blob {size} bytes ({} MiB file in a tar layer), piece {} KiB, {cores} cores",
        args.hosts, args.rate, args.size_mib, args.piece_kib
    )?;
    writeln!(
        out,
        "link check: one host alone over HTTP took {limit:.2} s = {:.1} Mbit/s of payload, {:.1}% of the cap \
         (TCP/IP/Ethernet headers cost ~4%){}",
        goodput_bits / 1e6,
        100.0 * goodput_bits / cap,
        if goodput_bits > 1.02 * cap || goodput_bits < 0.8 * cap { "  WARNING: not the cap asked for" } else { "" }
    )?;
    writeln!(out, "times are ratios to that physical limit; egress is bytes sent / blob size\n")?;
    writeln!(
        out,
        "{:<36} {:>6} {:>6} {:>6}  {:>8} {:>8} {:>8}  {:>8} {:>8} {:>8}  {:>5}",
        "phase", "p50", "p99", "max", "p50 s", "max s", "1st B s", "seed tx", "QUIC", "hosts tx", "CPU%"
    )?;
    for p in phases {
        let s = Spread::of(&p.secs.iter().map(|t| t / limit).collect::<Vec<_>>()).context("no hosts")?;
        let first = super::percentile(&p.first_byte_secs, 50.0).unwrap_or(f64::NAN);
        let quic = p.origin_quic.map(|b| format!("{:.2}x", b / size as f64)).unwrap_or_else(|| "n/a".into());
        writeln!(
            out,
            "{:<36} {:>5.2}x {:>5.2}x {:>5.2}x  {:>8.2} {:>8.2} {:>8.2}  {:>7.2}x {:>8} {:>7.2}x  {:>5.0}",
            p.label,
            s.p50,
            s.p99,
            s.max,
            s.p50 * limit,
            s.max * limit,
            first,
            p.seed_tx as f64 / size as f64,
            quic,
            p.hosts_tx as f64 / size as f64,
            100.0 - p.cpu.pct(p.cpu.idle),
        )?;
    }
    writeln!(
        out,
        "  seed tx: all bytes the seed host sent (origin HTTP + QUIC + tracker); QUIC: the origin's \
         shoal_peer_bytes_served_total;\n  hosts tx: all bytes the hosts sent (peer uploads); 1st B s: \
         median time to the first body byte; CPU%: machine busy over the phase"
    )?;
    let Some(shoal) = phases.last() else { return Ok(out) };
    let ratios: Vec<f64> = shoal.secs.iter().map(|t| t / limit).collect();
    let s = Spread::of(&ratios).context("no hosts")?;
    let egress = shoal.seed_tx as f64 / size as f64;
    let verdict = |ok: bool| if ok { "PASS" } else { "MISS" };
    writeln!(
        out,
        "\ntargets (shoal): p50 <= 1.05x {} ({:.2}x); max <= 1.25x {} ({:.2}x); origin egress <= 1.2x {} ({egress:.2}x)",
        verdict(s.p50 <= 1.05),
        s.p50,
        verdict(s.max <= 1.25),
        s.max,
        verdict(egress <= 1.2),
    )?;
    let mut sorted = ratios.clone();
    sorted.sort_by(f64::total_cmp);
    let list: Vec<String> = sorted.iter().map(|r| format!("{r:.2}")).collect();
    writeln!(out, "shoal completion ratios, sorted: {}", list.join(" "))?;
    for p in phases {
        let core_secs = p.wall * cores as f64;
        let busy = core_secs * (1.0 - p.cpu.pct(p.cpu.idle) / 100.0);
        let ours = p.agents_cpu + p.origin_cpu + p.tracker_cpu + p.clients_cpu;
        writeln!(
            out,
            "CPU {}: busy {:.0}% of {cores} cores (user {:.0}%, system {:.0}%, softirq {:.0}%) over {:.1} s = {busy:.1} \
             core-s;\n    benchmark processes {ours:.1} core-s: agents {:.1}, origin {:.1}, tracker {:.1}, clients {:.1}; \
             the rest ({:.1} core-s) is the kernel's forwarding and shaping plus any other load on the machine",
            p.label,
            100.0 - p.cpu.pct(p.cpu.idle),
            p.cpu.pct(p.cpu.user),
            p.cpu.pct(p.cpu.system),
            p.cpu.pct(p.cpu.softirq),
            p.wall,
            p.agents_cpu,
            p.origin_cpu,
            p.tracker_cpu,
            p.clients_cpu,
            (busy - ours).max(0.0),
        )?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_times_that_go_backwards_count_as_zero() {
        let before = CpuTimes { user: 10, system: 10, softirq: 10, idle: 100, total: 130 };
        // iowait (in idle and total) dropped between the two reads.
        let after = CpuTimes { user: 15, system: 12, softirq: 10, idle: 90, total: 127 };
        let d = after.since(before);
        assert_eq!((d.user, d.system, d.softirq, d.idle, d.total), (5, 2, 0, 0, 0));
    }

    #[test]
    fn a_huge_phase_timeout_is_an_error_not_an_overflow() {
        assert!(deadline_after(Duration::from_secs(60)).is_ok());
        let err = deadline_after(Duration::from_secs(u64::MAX)).expect_err("overflows");
        assert!(err.to_string().contains("--phase-timeout"), "{err}");
    }
}

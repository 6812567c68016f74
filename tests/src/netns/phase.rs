//! One phase: a pulling client per host started in its namespace, released together, and
//! what the phase cost (completion and first-byte times, bytes sent by the seed and the
//! hosts, the origin's QUIC bytes, CPU), plus the Prometheus counters read inside a namespace.

use std::fs::File;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, ensure, Context as _};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use super::client::{unix_ns, PullReport};
use super::cpu::CpuTimes;
use super::procs::{run_tool, Bins, Procs};
use super::run::AGENT_REGISTRY;
use super::topology::{Node, Topology};
use super::SwarmArgs;

/// What one phase measured.
#[derive(Debug)]
pub(super) struct Phase {
    pub(super) label: String,
    /// Completion time of each host, seconds from the common start.
    pub(super) secs: Vec<f64>,
    /// Time to the first body byte, seconds from the common start.
    pub(super) first_byte_secs: Vec<f64>,
    /// Bytes the seed host sent (origin + tracker, everything on its link).
    pub(super) seed_tx: u64,
    /// Bytes all hosts sent (uploads to other hosts, requests).
    pub(super) hosts_tx: u64,
    /// Growth of the origin's `shoal_peer_bytes_served_total` (QUIC piece bytes).
    pub(super) origin_quic: Option<f64>,
    pub(super) cpu: CpuTimes,
    pub(super) wall: f64,
    pub(super) agents_cpu: f64,
    pub(super) origin_cpu: f64,
    pub(super) tracker_cpu: f64,
    pub(super) clients_cpu: f64,
}

/// Everything a phase needs.
pub(super) struct Ctx<'a> {
    pub(super) args: &'a SwarmArgs,
    pub(super) bins: &'a Bins,
    pub(super) topo: &'a Topology,
    pub(super) dir: &'a Path,
    pub(super) size: u64,
    pub(super) digest: String,
    pub(super) origin_url: String,
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
pub(super) async fn agents_metric(ctx: &Ctx<'_>, name: &str) -> Option<f64> {
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
pub(super) async fn phase(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_phase_timeout_is_an_error_not_an_overflow() {
        assert!(deadline_after(Duration::from_secs(60)).is_ok());
        let err = deadline_after(Duration::from_secs(u64::MAX)).expect_err("overflows");
        assert!(err.to_string().contains("--phase-timeout"), "{err}");
    }
}

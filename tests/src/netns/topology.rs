//! The namespaces, the bridge, the veth pairs and their `tc` caps; removed when dropped.
//!
//! Names are `shoal-nb<pid>-<role>`, so runs of several users do not collide and a run can
//! tell the leftovers of a crashed run (whose pid is gone) from a live one. The bridge lives in
//! a namespace of its own: nothing is added to the root namespace, so a crash cannot leave
//! interfaces or routes behind on the machine, only namespaces, which the next run deletes.

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use anyhow::{bail, Context as _};

use super::Rate;

/// Prefix of every namespace this benchmark creates.
const PREFIX: &str = "shoal-nb";
/// The hosts' subnet (private to the bridge namespace; never routed anywhere).
const SUBNET_PREFIX_LEN: u8 = 24;
/// Queueing delay `tbf` accepts before dropping: a shallow router-like buffer.
const TBF_LATENCY_MS: u32 = 20;

/// One host (or the seed) of the topology.
#[derive(Debug, Clone)]
pub struct Node {
    /// Network namespace name, for `ip netns exec`.
    pub ns: String,
    pub ip: Ipv4Addr,
}

/// The built topology; dropping it kills what still runs in its namespaces and deletes them.
#[derive(Debug)]
pub struct Topology {
    pub seed: Node,
    pub hosts: Vec<Node>,
    bridge_ns: String,
    /// Every namespace created so far, in creation order (the bridge first).
    created: Vec<String>,
}

/// Interface name of every node's end of its veth pair.
pub const NODE_IF: &str = "eth0";

impl Topology {
    /// Builds the bridge namespace, the seed (its link capped at `rate`) and one host
    /// namespace per entry of `host_rates` (each capped at its own), in both directions. On
    /// error, what was built is removed (by `Drop`).
    pub fn create(rate: Rate, host_rates: &[Rate]) -> anyhow::Result<Self> {
        let hosts = host_rates.len();
        if !(1..=200).contains(&hosts) {
            bail!("--hosts must be between 1 and 200, got {hosts}");
        }
        let run = format!("{PREFIX}{}", std::process::id());
        let mut topo = Self {
            seed: Node { ns: format!("{run}-seed"), ip: Ipv4Addr::new(10, 77, 0, 1) },
            hosts: (0..hosts)
                .map(|i| Node { ns: format!("{run}-h{i}"), ip: Ipv4Addr::new(10, 77, 0, 10 + i as u8) })
                .collect(),
            bridge_ns: format!("{run}-br"),
            created: Vec::new(),
        };
        topo.add_ns(&topo.bridge_ns.clone())?;
        ip(&["-n", &topo.bridge_ns, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &topo.bridge_ns, "link", "set", "br0", "up"])?;
        let nodes: Vec<Node> = std::iter::once(topo.seed.clone()).chain(topo.hosts.clone()).collect();
        let rates: Vec<Rate> = std::iter::once(rate).chain(host_rates.iter().copied()).collect();
        for (i, (node, rate)) in nodes.iter().zip(rates).enumerate() {
            topo.add_node(node, &format!("p{i}"), rate)?;
        }
        Ok(topo)
    }

    fn add_ns(&mut self, ns: &str) -> anyhow::Result<()> {
        ip(&["netns", "add", ns])?;
        self.created.push(ns.to_owned());
        ip(&["-n", ns, "link", "set", "lo", "up"])
    }

    /// A namespace with `eth0` at `node.ip`, its peer `port` on the bridge, and a `tbf` on
    /// both: the node's egress (its upload) and the port's egress (the node's download).
    fn add_node(&mut self, node: &Node, port: &str, rate: Rate) -> anyhow::Result<()> {
        self.add_ns(&node.ns)?;
        let br = self.bridge_ns.clone();
        ip(&["link", "add", NODE_IF, "netns", &node.ns, "type", "veth", "peer", "name", port, "netns", &br])?;
        ip(&["-n", &br, "link", "set", port, "master", "br0", "up"])?;
        ip(&["-n", &node.ns, "addr", "add", &format!("{}/{SUBNET_PREFIX_LEN}", node.ip), "dev", NODE_IF])?;
        ip(&["-n", &node.ns, "link", "set", NODE_IF, "up"])?;
        cap(&node.ns, NODE_IF, rate)?;
        cap(&br, port, rate)
    }

    /// Transmitted bytes of a node's `eth0` (everything it sent: HTTP, QUIC, tracker).
    pub fn tx_bytes(node: &Node) -> anyhow::Result<u64> {
        let out = output("ip", &["-n", &node.ns, "-s", "-j", "link", "show", "dev", NODE_IF])?;
        let json: serde_json::Value =
            serde_json::from_str(&out).with_context(|| format!("parsing `ip -s -j link` of {}", node.ns))?;
        json[0]["stats64"]["tx"]["bytes"]
            .as_u64()
            .with_context(|| format!("no stats64.tx.bytes in `ip -s -j link` of {}", node.ns))
    }

    /// `tc -s qdisc` of a node's link, both ends, for the log.
    pub fn qdisc_stats(&self, node: &Node) -> String {
        let port = std::iter::once(&self.seed)
            .chain(&self.hosts)
            .position(|n| n.ns == node.ns)
            .map(|i| format!("p{i}"))
            .unwrap_or_default();
        let up = output("tc", &["-n", &node.ns, "-s", "qdisc", "show", "dev", NODE_IF]).unwrap_or_default();
        let down =
            output("tc", &["-n", &self.bridge_ns, "-s", "qdisc", "show", "dev", &port]).unwrap_or_default();
        format!("{} upload: {}\n{} download: {}", node.ns, up.trim(), node.ns, down.trim())
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in self.created.iter().rev() {
            remove_ns(ns);
        }
    }
}

/// `tbf` at `rate` on `dev` in `ns`. The burst is 2 ms at the rate (at least 16 KiB, so a
/// timer tick of sending still fits); the queue holds `TBF_LATENCY_MS` at the rate.
fn cap(ns: &str, dev: &str, rate: Rate) -> anyhow::Result<()> {
    let burst = ((rate.bytes_per_sec() / 500.0) as u64).max(16 * 1024);
    tc(&[
        "-n",
        ns,
        "qdisc",
        "add",
        "dev",
        dev,
        "root",
        "tbf",
        "rate",
        &format!("{}bit", rate.bits_per_sec()),
        "burst",
        &burst.to_string(),
        "latency",
        &format!("{TBF_LATENCY_MS}ms"),
    ])
}

/// Deletes the namespaces of earlier runs whose process is gone (a crash or SIGKILL), after
/// killing what still runs in them. Namespaces of live runs are left alone.
pub fn remove_stale() -> anyhow::Result<Vec<String>> {
    let list = output("ip", &["netns", "list"])?;
    let mut removed = Vec::new();
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(pid) = name.strip_prefix(PREFIX).and_then(|rest| rest.split('-').next()) else {
            continue;
        };
        let Ok(pid) = pid.parse::<u32>() else { continue };
        // A killed run can linger as a zombie until it is reaped: that is not alive either.
        let alive = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|stat| {
                let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next());
                stat.contains("(shoal-bench)") && !matches!(state, Some("Z" | "X"))
            })
            .unwrap_or(false);
        if !alive {
            remove_ns(name);
            removed.push(name.to_owned());
        }
    }
    Ok(removed)
}

/// Kills every process in `ns` (processes this benchmark started there) and deletes it.
fn remove_ns(ns: &str) {
    if let Ok(pids) = output("ip", &["netns", "pids", ns]) {
        for pid in pids.split_whitespace() {
            let _ = Command::new("kill").args(["-KILL", pid]).stderr(Stdio::null()).status();
        }
    }
    if let Err(e) = ip(&["netns", "del", ns]) {
        eprintln!("warning: could not delete namespace {ns}: {e:#}");
    }
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    output("ip", args).map(drop)
}

fn tc(args: &[&str]) -> anyhow::Result<()> {
    output("tc", args).map(drop)
}

/// Runs a command to completion and returns its stdout; fails with its stderr.
fn output(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {program} (needs iproute2 and root)"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8(out.stdout).with_context(|| format!("{program} printed non-UTF-8"))
}

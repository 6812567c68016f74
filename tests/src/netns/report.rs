//! The table printed at the end of a run: each phase's completion ratios to the physical
//! limit and its egress, the targets' verdicts, and where the CPU went.

use std::fmt::Write as _;

use anyhow::Context as _;

use super::phase::Phase;
use super::{Spread, SwarmArgs};

/// Issue 12's targets for the swarm at 10 hosts: p50 and max completion over the one-host
/// limit, and the seed's egress over the blob.
const P50_TARGET: f64 = 1.10;
const MAX_TARGET: f64 = 1.20;
const EGRESS_TARGET: f64 = 1.10;

/// The table printed at the end.
pub(super) fn report(args: &SwarmArgs, size: u64, limit: f64, phases: &[Phase]) -> anyhow::Result<String> {
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
    let all: Vec<f64> = shoal.secs.iter().map(|t| t / limit).collect();
    // With slow hosts, the targets are the fast hosts'; the slow ones are measured against
    // their own link's limit.
    let slow_limit = args.rate.bytes_per_sec() / args.slow_rate().bytes_per_sec();
    let (mut ratios, mut slow) = (Vec::new(), Vec::new());
    for (i, &r) in all.iter().enumerate() {
        if args.is_slow(i) {
            slow.push(r / slow_limit);
        } else {
            ratios.push(r);
        }
    }
    if !slow.is_empty() {
        let f = Spread::of(&ratios).context("no fast hosts")?;
        let s = Spread::of(&slow).context("no slow hosts")?;
        writeln!(
            out,
            "\nwith {} slow hosts at {}: fast hosts ({}) p50 {:.2}x max {:.2}x; slow hosts, over their own limit, \
             p50 {:.2}x max {:.2}x",
            slow.len(),
            args.slow_rate(),
            ratios.len(),
            f.p50,
            f.max,
            s.p50,
            s.max
        )?;
    }
    let s = Spread::of(&ratios).context("no hosts")?;
    let egress = shoal.seed_tx as f64 / size as f64;
    let verdict = |ok: bool| if ok { "PASS" } else { "MISS" };
    writeln!(
        out,
        "\ntargets (shoal): p50 <= {P50_TARGET:.2}x {} ({:.2}x); max <= {MAX_TARGET:.2}x {} ({:.2}x); \
         origin egress <= {EGRESS_TARGET:.2}x {} ({egress:.2}x)",
        verdict(s.p50 <= P50_TARGET),
        s.p50,
        verdict(s.max <= MAX_TARGET),
        s.max,
        verdict(egress <= EGRESS_TARGET),
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

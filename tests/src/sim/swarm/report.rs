//! What a run measured, and how it is printed.

use super::*;

/// What a run measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub config: Config,
    /// Seconds: blob / link rate + one round trip.
    pub limit: f64,
    /// Completion times of the agents that finished, over `limit`, sorted (slow agents
    /// not included).
    pub ratios: Vec<f64>,
    /// Completion times of the slow agents that finished, over their own limit, sorted.
    pub slow_ratios: Vec<f64>,
    /// The requests in flight each agent that finished was allowed at the end (the cap
    /// follows how fast pieces' first blocks came), sorted; slow agents apart.
    pub caps: Vec<u32>,
    pub slow_caps: Vec<u32>,
    /// Agents that left before finishing.
    pub departed: u32,
    /// Agents whose download stalled for the whole progress timeout and failed.
    pub failed: u32,
    /// Agents still downloading when the run stopped (at `max_time`).
    pub unfinished: u32,
    /// Bytes the origins sent, over the blob size.
    pub origin_egress: f64,
    /// Bytes sent that gave nobody a new piece (cut short or arrived after a timeout), over
    /// the blob size.
    pub wasted: f64,
    /// Piece requests sent.
    pub requests: u64,
    /// Piece requests refused Busy.
    pub busy: u64,
    /// Virtual seconds until the last agent finished (or the run stopped).
    pub virtual_secs: f64,
    pub wall_secs: f64,
    pub events: u64,
}

impl Report {
    /// The `q` quantile (0..=1, nearest rank) of the completion ratios.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        quantile(&self.ratios, q)
    }

    /// The `q` quantile of the slow agents' completion ratios (over their own limit).
    pub fn slow_quantile(&self, q: f64) -> Option<f64> {
        quantile(&self.slow_ratios, q)
    }

    pub fn completed(&self) -> usize {
        self.ratios.len() + self.slow_ratios.len()
    }
}

/// The `q` quantile (0..=1, nearest rank) of sorted `ratios`.
fn quantile(ratios: &[f64], q: f64) -> Option<f64> {
    if ratios.is_empty() {
        return None;
    }
    let rank = ((q * ratios.len() as f64).ceil() as usize).clamp(1, ratios.len());
    Some(ratios[rank - 1])
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        let q = |x: f64| self.quantile(x).map_or("-".to_string(), |r| format!("{r:.3}x"));
        writeln!(
            f,
            "swarm: {} agents + {} origin(s), blob {:.1} MiB in {} pieces of {} KiB, links {:.1} Mbit/s, \
             RTT {:.3} ms, loss {}, churn {}, seed {}",
            c.hosts,
            c.origins,
            c.size as f64 / (1u64 << 20) as f64,
            c.pieces(),
            c.piece_len / 1024,
            c.rate * 8.0 / 1e6,
            c.rtt as f64 / 1e6,
            c.loss,
            c.churn,
            c.seed
        )?;
        writeln!(f, "physical limit (blob / link rate + RTT): {:.3} s", self.limit)?;
        writeln!(
            f,
            "completed: {} of {} agents ({} left mid-download, {} failed, {} unfinished)",
            self.completed(),
            c.hosts,
            self.departed,
            self.failed,
            self.unfinished
        )?;
        if c.slow_hosts > 0.0 {
            let s = |x: f64| self.slow_quantile(x).map_or("-".to_string(), |r| format!("{r:.3}x"));
            writeln!(f, "fast agents, completion / limit: p50 {}  p99 {}  max {}", q(0.5), q(0.99), q(1.0))?;
            writeln!(
                f,
                "slow agents ({} at {:.1} Mbit/s), completion / their limit: p50 {}  p99 {}  max {}",
                (0..c.hosts).filter(|&a| c.is_slow(a)).count(),
                c.slow_rate * 8.0 / 1e6,
                s(0.5),
                s(0.99),
                s(1.0)
            )?;
        } else {
            writeln!(f, "completion / limit: p50 {}  p99 {}  max {}", q(0.5), q(0.99), q(1.0))?;
        }
        let median = |caps: &[u32]| caps.get(caps.len() / 2).map_or("-".to_string(), u32::to_string);
        if c.slow_hosts > 0.0 {
            writeln!(
                f,
                "requests in flight allowed at the end, p50: fast agents {}, slow agents {}",
                median(&self.caps),
                median(&self.slow_caps)
            )?;
        } else {
            writeln!(f, "requests in flight allowed at the end, p50: {}", median(&self.caps))?;
        }
        writeln!(f, "origin egress / blob: {:.3}x", self.origin_egress)?;
        writeln!(f, "wasted transfer / blob: {:.3}x", self.wasted)?;
        let per = |n: u64| n as f64 / (f64::from(c.hosts) * f64::from(c.pieces())).max(1.0);
        writeln!(
            f,
            "requests: {} ({:.2} per agent per piece), refused Busy: {} ({:.2} per agent per piece)",
            self.requests,
            per(self.requests),
            self.busy,
            per(self.busy)
        )?;
        write!(
            f,
            "simulation: {} events, {:.3} virtual s, {:.2} wall s, {:.0} events/s",
            self.events,
            self.virtual_secs,
            self.wall_secs,
            self.events as f64 / self.wall_secs.max(1e-9)
        )
    }
}

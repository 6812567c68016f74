//! `shoal-sim`: a discrete-event simulation of one blob spreading through a swarm.
//!
//! Thousands of simulated agents each drive the project's scheduler state machine (through
//! [`driver`], the only module that calls it) over modelled links ([`net`]) on a virtual
//! clock ([`queue`]); [`swarm`] holds the hosts, the tracker and the origins. The report
//! gives the same ratios as the netns benchmark: each host's completion time over the
//! physical limit, and the origins' egress over the blob size.

pub mod driver;
pub mod net;
pub mod queue;
pub mod swarm;

pub use swarm::{run, Report};

use queue::{Nanos, SEC};

/// What to simulate.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Agents pulling the blob (origins not included).
    pub hosts: u32,
    /// Blob size in bytes.
    pub size: u64,
    /// Piece length in bytes.
    pub piece_len: u64,
    /// Every host's uplink and downlink capacity, bytes per second.
    pub rate: f64,
    /// Round-trip time between any two hosts.
    pub rtt: Nanos,
    /// Fraction of agents on slower links (0: none), spread evenly over the agents.
    pub slow_hosts: f64,
    /// The slow agents' uplink and downlink capacity, bytes per second.
    pub slow_rate: f64,
    /// Probability that a packet is lost.
    pub loss: f64,
    /// Fraction of agents that leave at a random time during the download.
    pub churn: f64,
    /// Origin hosts (each seeds the whole blob).
    pub origins: u32,
    /// Piece bytes an agent sends at once (its `--upload-budget`; at least one piece).
    pub agent_budget: u64,
    /// Piece bytes an origin sends at once.
    pub origin_budget: u64,
    /// Requests a server keeps waiting for upload budget; more are refused (Busy), as the
    /// real servers' `--upload-queue` (default 2).
    pub server_queue: u32,
    /// First copies first at origins (origin/src/spread.rs): the longest wave, 0 for off.
    pub origin_wave: Nanos,
    /// Peers the tracker returns per announce (origins come on top).
    pub tracker_peers: u32,
    /// How long Have messages are held back to be applied together (0: on arrival).
    pub have_batch: Nanos,
    /// Cut-through, as the agent does by default: pieces are checked in blocks of this many
    /// bytes (the protocol's 16 KiB), and a host passes a piece on while it is still
    /// receiving it. 0: a piece moves on only once whole (the agent's `--cut-through false`).
    pub cut_through: u64,
    /// The download loop's knobs.
    pub policy: driver::Policy,
    /// Virtual time after which the run stops, finished or not.
    pub max_time: Nanos,
    pub seed: u64,
}

impl Config {
    /// Defaults of the real components for `hosts` agents pulling `size` bytes in pieces of
    /// `piece_len` over `rate` bytes/s links.
    /// Pieces a server with `budget` bytes of upload budget sends at once.
    pub fn slots(&self, budget: u64) -> u32 {
        (budget / self.piece_len.max(1)).clamp(1, u64::from(u32::MAX)) as u32
    }

    pub fn new(hosts: u32, size: u64, piece_len: u64, rate: f64) -> Self {
        Self {
            hosts,
            size,
            piece_len,
            rate,
            rtt: SEC / 1000,
            slow_hosts: 0.0,
            slow_rate: rate / 10.0,
            loss: 0.0,
            churn: 0.0,
            origins: 1,
            agent_budget: 12 << 20,
            origin_budget: 16 << 20,
            server_queue: 2,
            origin_wave: shoal_shared::session::LONGEST_WAVE.as_nanos() as Nanos,
            tracker_peers: 50,
            have_batch: 0,
            cut_through: u64::from(shoal_shared::blocks::BLOCK_SIZE),
            policy: driver::Policy::agent(piece_len),
            max_time: 3600 * SEC,
            seed: 1,
        }
    }

    /// The physical limit every ratio is taken against: one host alone fetching the blob
    /// over its link, plus one round trip.
    pub fn limit(&self) -> f64 {
        self.size as f64 / self.rate + self.rtt as f64 / SEC as f64
    }

    /// The physical limit of a slow agent: the blob over its own link, plus one round trip.
    pub fn slow_limit(&self) -> f64 {
        self.size as f64 / self.slow_rate + self.rtt as f64 / SEC as f64
    }

    /// Whether agent `agent` (0-based, origins not counted) is on a slow link: agents are
    /// picked evenly, one in every `1 / slow_hosts`.
    pub fn is_slow(&self, agent: u32) -> bool {
        picked_evenly(u64::from(agent), self.slow_hosts)
    }

    pub fn pieces(&self) -> u32 {
        self.size.div_ceil(self.piece_len) as u32
    }

    /// Checks the bounds a run needs (each is a user input).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |what: &str| Err(ConfigError(what.to_string()));
        if self.hosts == 0 || self.hosts > 1_000_000 {
            return bad("hosts must be 1..=1000000");
        }
        if self.origins == 0 || self.origins > 1000 {
            return bad("origins must be 1..=1000");
        }
        if self.size == 0 || self.piece_len == 0 {
            return bad("size and piece length must be positive");
        }
        if self.size.div_ceil(self.piece_len) > 1 << 20 {
            return bad("at most 1048576 pieces");
        }
        // Every host keeps per-piece state (the scheduler's, about 36 bytes a piece): bound
        // the product so that a large input is refused here instead of aborting on
        // allocation. 1 << 28 (about 10 GiB) is 100x the largest documented run.
        let nodes = u64::from(self.hosts) + u64::from(self.origins);
        if nodes.saturating_mul(self.size.div_ceil(self.piece_len)) > MAX_HOST_PIECES {
            return bad("(hosts + origins) x pieces must be at most 268435456");
        }
        if !(self.rate.is_finite() && self.rate >= 1.0) {
            return bad("rate must be at least 1 byte/s");
        }
        if !(0.0..=1.0).contains(&self.slow_hosts) {
            return bad("slow hosts must be a fraction in [0, 1]");
        }
        if !(self.slow_rate.is_finite() && self.slow_rate >= 1.0) {
            return bad("slow rate must be at least 1 byte/s");
        }
        if !(0.0..0.5).contains(&self.loss) {
            return bad("loss must be in [0, 0.5)");
        }
        if !(0.0..=1.0).contains(&self.churn) {
            return bad("churn must be in [0, 1]");
        }
        let p = &self.policy;
        if self.agent_budget == 0 || self.origin_budget == 0 || self.tracker_peers == 0 {
            return bad("upload budgets and tracker peers must be positive");
        }
        let c = &p.scheduler;
        let pipelines = [c.peer_pipeline, c.seeder_pipeline, c.shared_origin_pipeline, c.max_pipeline];
        if c.max_in_flight == 0 || c.max_peers == 0 || pipelines.contains(&0) {
            return bad("pipelines, in-flight cap and peer count must be positive");
        }
        if c.timeout_floor.is_zero()
            || c.min_rate == 0
            || p.announces.longest.is_zero()
            || p.progress_timeout == 0
        {
            return bad("timeouts, minimum rate and re-announce interval must be positive");
        }
        if self.piece_len > u64::from(u32::MAX) {
            return bad("piece length must fit in 32 bits");
        }
        Ok(())
    }
}

/// Bound on (hosts + origins) x pieces: the per-piece state every node keeps.
const MAX_HOST_PIECES: u64 = 1 << 28;

/// A configuration a run cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid simulation: {0}")]
pub struct ConfigError(pub String);

/// A rate that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad rate {0:?}: expected a number and a unit, e.g. 100mbit, 1gbit, 300MB/s")]
pub struct RateError(pub String);

/// Parses a link rate into bytes per second: `100mbit`, `1gbit`, `500kbit` (bits, powers of
/// 1000, as `tc` reads them) or `300MB/s`, `300mbyte` (bytes, powers of 1000).
pub fn parse_rate(s: &str) -> Result<f64, RateError> {
    let err = || RateError(s.to_string());
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| err())?;
    let unit = unit.trim().trim_end_matches("/s").trim_end_matches("ps").to_ascii_lowercase();
    let bytes_per_unit = match unit.as_str() {
        "bit" => 1.0 / 8.0,
        "kbit" => 1e3 / 8.0,
        "mbit" => 1e6 / 8.0,
        "gbit" => 1e9 / 8.0,
        "b" | "byte" => 1.0,
        "kb" | "kbyte" => 1e3,
        "mb" | "mbyte" => 1e6,
        "gb" | "gbyte" => 1e9,
        _ => return Err(err()),
    };
    let r = n * bytes_per_unit;
    if r.is_finite() && r > 0.0 {
        Ok(r)
    } else {
        Err(err())
    }
}

/// A duration that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad duration {0:?}: expected e.g. 1ms, 250us, 2s")]
pub struct DurationError(pub String);

/// Parses `1ms`, `250us`, `2s`, `0` into virtual nanoseconds.
pub fn parse_duration(s: &str) -> Result<Nanos, DurationError> {
    let err = || DurationError(s.to_string());
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| err())?;
    let scale = match unit.trim() {
        "ns" => 1.0,
        "us" => 1e3,
        "ms" => 1e6,
        "s" => 1e9,
        "" if n == 0.0 => 0.0,
        _ => return Err(err()),
    };
    let v = n * scale;
    if (0.0..1e18).contains(&v) {
        Ok(v.round() as Nanos)
    } else {
        Err(err())
    }
}

/// Whether item `i` (from 0) is among a `fraction` of the items picked evenly: one in every
/// `1 / fraction`, the last of each run (so item 0 is picked only when every item is). Slow
/// hosts in `shoal-sim` and in the netns benchmark are picked this way.
pub fn picked_evenly(i: u64, fraction: f64) -> bool {
    fraction > 0.0 && ((i as f64 + 1.0) * fraction).floor() > (i as f64 * fraction).floor()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_and_durations_parse() {
        assert_eq!(parse_rate("100mbit"), Ok(12.5e6));
        assert_eq!(parse_rate("1gbit"), Ok(125e6));
        assert_eq!(parse_rate("300MB/s"), Ok(300e6));
        assert_eq!(parse_rate("2.5 mbyte"), Ok(2.5e6));
        for bad in ["", "mbit", "100", "100furlongs", "-5mbit", "0mbit", "1e999gbit"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_duration("1ms"), Ok(1_000_000));
        assert_eq!(parse_duration("250us"), Ok(250_000));
        assert_eq!(parse_duration("2s"), Ok(2 * SEC));
        assert_eq!(parse_duration("0"), Ok(0));
        for bad in ["", "5", "1h", "ms", "-1ms"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bounds_are_checked() {
        let ok = Config::new(10, 1 << 20, 1 << 18, 1e6);
        assert!(ok.validate().is_ok());
        assert!(Config { hosts: 0, ..ok.clone() }.validate().is_err());
        assert!(Config { piece_len: 0, ..ok.clone() }.validate().is_err());
        assert!(Config { loss: 0.9, ..ok.clone() }.validate().is_err());
        assert!(Config { churn: 1.5, ..ok.clone() }.validate().is_err());
        assert!(Config { rate: f64::NAN, ..ok.clone() }.validate().is_err());
        assert!(Config { size: 1 << 40, piece_len: 1, ..ok.clone() }.validate().is_err());
        // Each bound alone holds, the product does not: refused with a clear message.
        let huge = Config { hosts: 1_000_000, size: 1 << 20, piece_len: 1, ..ok.clone() };
        let err = huge.validate().expect_err("too much state");
        assert!(err.0.contains("(hosts + origins) x pieces"), "{err}");
        // At the bound exactly: accepted.
        let edge = Config { hosts: 255, origins: 1, size: 1 << 20, piece_len: 1, ..ok };
        assert!(edge.validate().is_ok());
        assert!(Config { hosts: 256, ..edge }.validate().is_err());
    }
}

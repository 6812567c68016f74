//! `shoal-bench swarm`: the multi-host swarm benchmark in Linux network namespaces.
//!
//! N hosts and one seed host (tracker + origin) each get a network namespace; a bridge in a
//! namespace of its own joins them through veth pairs whose both ends are capped with `tc tbf`,
//! so every host has an upload and a download limit and the root namespace is never touched.
//! The real release binaries run as processes inside the namespaces, and one run measures:
//!
//! 1. the physical limit: one host alone GETs the blob from the origin over plain HTTP;
//! 2. the baseline: all N hosts GET it from the origin over HTTP at once;
//! 3. Shoal: all N hosts GET it at once from their own agent (cold caches).
//!
//! Every completion time is reported as a ratio to (1), the origin's egress as a ratio to the
//! blob size. Needs root, `ip` and `tc`; takes minutes, so it is a command, not a test.
//!
//! Modules: `topology` (namespaces, bridge, capped links), `run` (setup and the phases in
//! order), `procs` (the server processes), `phase` (one measured phase), `report` (the
//! table), `cpu` (CPU accounting from `/proc`), [`client`] (the HTTP client in each namespace).

pub mod client;
mod cpu;
mod phase;
mod procs;
mod report;
mod run;
mod topology;

use std::fmt;
use std::path::PathBuf;

pub use run::swarm;

/// `shoal-bench swarm` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct SwarmArgs {
    /// Number of agent hosts (each in its own network namespace), 1 to 200.
    #[arg(long, default_value_t = 10)]
    pub hosts: usize,
    /// Link cap of every host and of the seed, in both directions: an integer or decimal
    /// followed by bit, kbit, mbit or gbit (powers of 1000), as in `tc`.
    #[arg(long, default_value = "100mbit", value_parser = Rate::parse)]
    pub rate: Rate,
    /// Size of the pseudo-random file in the benchmark image's only layer, in MiB (the
    /// blob is that plus 2 KiB of tar headers).
    #[arg(long, default_value_t = 128)]
    pub size_mib: u64,
    /// Piece length the origin uses for the blob's metainfo, in KiB (64 to 65536).
    #[arg(long, default_value_t = shoal_shared::metainfo::DEFAULT_PIECE_LENGTH / 1024)]
    pub piece_kib: u32,
    /// Directory with shoal-origin, shoal-tracker and shoal-agent (default: this binary's).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// Keep the work directory (image, data, certificates, logs) and print its path.
    #[arg(long)]
    pub keep: bool,
    /// Skip phase 2 (all hosts from the origin over HTTP), which takes N times the physical
    /// limit: for quick runs when only the Shoal figures are wanted.
    #[arg(long)]
    pub skip_baseline: bool,
    /// Seconds any one phase may take before the run fails (default: 3 x N x the nominal
    /// transfer time + 120).
    #[arg(long)]
    pub phase_timeout: Option<u64>,
    /// Seed of the image's pseudo-random contents.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Hosts on slower links (`--slow-rate`), spread evenly, never the first (which
    /// measures the physical limit); their ratios are reported apart, over their own limit.
    #[arg(long, default_value_t = 0)]
    pub slow_hosts: usize,
    /// The slow hosts' link cap, in both directions (default: a tenth of `--rate`).
    #[arg(long, value_parser = Rate::parse)]
    pub slow_rate: Option<Rate>,
}

impl SwarmArgs {
    /// Whether host `i` (from 0) is one of the `--slow-hosts`, spread evenly as in
    /// `shoal-sim`: one every `hosts / slow_hosts`, the last of each run.
    pub fn is_slow(&self, i: usize) -> bool {
        crate::sim::picked_evenly(i as u64, self.slow_hosts as f64 / self.hosts.max(1) as f64)
    }

    /// The slow hosts' link cap.
    pub fn slow_rate(&self) -> Rate {
        self.slow_rate.unwrap_or(Rate(self.rate.0 / 10))
    }

    /// Each host's link cap, in host order.
    pub fn host_rates(&self) -> anyhow::Result<Vec<Rate>> {
        if self.slow_hosts >= self.hosts {
            anyhow::bail!(
                "--slow-hosts must be fewer than --hosts ({}), got {}",
                self.hosts,
                self.slow_hosts
            );
        }
        if self.slow_rate().0 < 1000 {
            anyhow::bail!("--slow-rate must be at least 1kbit, got {}", self.slow_rate());
        }
        Ok((0..self.hosts).map(|i| if self.is_slow(i) { self.slow_rate() } else { self.rate }).collect())
    }
}

/// A link rate in bits per second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate(u64);

/// Why a `--rate` was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RateError {
    #[error("rate {0:?}: expected a number followed by bit, kbit, mbit or gbit (e.g. 100mbit)")]
    Syntax(String),
    #[error("rate {0:?}: must be between 1kbit and 100gbit")]
    OutOfRange(String),
}

impl Rate {
    /// Parses `tc`-style rates: `100mbit`, `1.5gbit`, `800kbit`, `1000000bit`.
    pub fn parse(s: &str) -> Result<Self, RateError> {
        let lower = s.trim().to_ascii_lowercase();
        let split = lower.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(lower.len());
        let (number, unit) = lower.split_at(split);
        let scale = match unit {
            "bit" => 1.0,
            "kbit" => 1e3,
            "mbit" => 1e6,
            "gbit" => 1e9,
            _ => return Err(RateError::Syntax(s.to_owned())),
        };
        let value: f64 = number.parse().map_err(|_| RateError::Syntax(s.to_owned()))?;
        let bits = value * scale;
        if !(1e3..=1e11).contains(&bits) {
            return Err(RateError::OutOfRange(s.to_owned()));
        }
        Ok(Self(bits.round() as u64))
    }

    pub fn bits_per_sec(self) -> u64 {
        self.0
    }

    pub fn bytes_per_sec(self) -> f64 {
        self.0 as f64 / 8.0
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            b if b % 1_000_000_000 == 0 => write!(f, "{}gbit", b / 1_000_000_000),
            b if b % 1_000_000 == 0 => write!(f, "{}mbit", b / 1_000_000),
            b if b % 1_000 == 0 => write!(f, "{}kbit", b / 1_000),
            b => write!(f, "{b}bit"),
        }
    }
}

/// The `p`-th percentile (0 < p <= 100) of `values` by the nearest-rank method: the smallest
/// value at least `p`% of the values are less than or equal to. With 10 hosts p99 is the max.
pub fn percentile(values: &[f64], p: f64) -> Option<f64> {
    if values.is_empty() || !(p > 0.0 && p <= 100.0) || values.iter().any(|v| v.is_nan()) {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// p50, p99 and max of a set of completion ratios.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl Spread {
    pub fn of(values: &[f64]) -> Option<Self> {
        Some(Self {
            p50: percentile(values, 50.0)?,
            p99: percentile(values, 99.0)?,
            max: percentile(values, 100.0)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_like_tc() {
        assert_eq!(Rate::parse("100mbit"), Ok(Rate(100_000_000)));
        assert_eq!(Rate::parse("100Mbit"), Ok(Rate(100_000_000)));
        assert_eq!(Rate::parse("1.5gbit"), Ok(Rate(1_500_000_000)));
        assert_eq!(Rate::parse("800kbit"), Ok(Rate(800_000)));
        assert_eq!(Rate::parse("250000bit"), Ok(Rate(250_000)));
        assert_eq!(Rate(100_000_000).to_string(), "100mbit");
        assert_eq!(Rate(1_500_000_000).to_string(), "1500mbit");
        assert_eq!(Rate(250_500).to_string(), "250500bit");
        assert_eq!(Rate(100_000_000).bytes_per_sec(), 12_500_000.0);
    }

    #[test]
    fn bad_rates_are_refused() {
        for bad in ["", "100", "mbit", "100mbps", "100 mbit", "1.2.3mbit", "-5mbit", "100MB", "1e3kbit"] {
            assert!(matches!(Rate::parse(bad), Err(RateError::Syntax(_))), "{bad:?} accepted");
        }
        for out in ["0mbit", "999bit", "101gbit"] {
            assert!(matches!(Rate::parse(out), Err(RateError::OutOfRange(_))), "{out:?} accepted");
        }
    }

    #[test]
    fn nearest_rank_percentiles() {
        let ten: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(percentile(&ten, 50.0), Some(5.0));
        assert_eq!(percentile(&ten, 99.0), Some(10.0));
        assert_eq!(percentile(&ten, 100.0), Some(10.0));
        assert_eq!(percentile(&ten, 10.0), Some(1.0));
        let hundred: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(percentile(&hundred, 99.0), Some(99.0));
        assert_eq!(percentile(&hundred, 50.0), Some(50.0));
        assert_eq!(percentile(&[3.0], 50.0), Some(3.0));
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&ten, 0.0), None);
        assert_eq!(percentile(&ten, 101.0), None);
        assert_eq!(percentile(&[1.0, f64::NAN], 50.0), None);
        let s = Spread::of(&[1.2, 1.0, 1.1, 1.9]).expect("spread");
        assert_eq!((s.p50, s.p99, s.max), (1.1, 1.9, 1.9));
    }

    #[test]
    fn slow_hosts_are_spread_evenly_and_never_the_first() {
        use clap::Parser as _;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: SwarmArgs,
        }
        let args =
            |flags: &[&str]| Cli::parse_from(std::iter::once("bench").chain(flags.iter().copied())).args;
        let a = args(&["--hosts", "10", "--slow-hosts", "2"]);
        let rates = a.host_rates().expect("valid");
        let slow: Vec<usize> = (0..10).filter(|&i| rates[i] == Rate(10_000_000)).collect();
        assert_eq!(slow, vec![4, 9]);
        assert_eq!(rates[0], Rate(100_000_000));
        let a = args(&["--hosts", "4", "--slow-hosts", "1", "--slow-rate", "5mbit"]);
        assert_eq!(
            a.host_rates().expect("valid"),
            vec![Rate(100_000_000); 3].into_iter().chain([Rate(5_000_000)]).collect::<Vec<_>>()
        );
        assert!(args(&["--hosts", "3", "--slow-hosts", "3"]).host_rates().is_err());
        assert!(args(&["--hosts", "3"]).host_rates().expect("valid").iter().all(|&r| r == Rate(100_000_000)));
    }
}

//! The tracker's configuration: flags, environment and TOML file.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// `shoal-tracker serve` flags.
#[derive(Debug, Default, Clone, clap::Args, Serialize)]
pub struct ServeFlags {
    /// HTTP address for announces and lookups [default: 127.0.0.1:5100].
    #[arg(long, env = "SHOAL_HTTP")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http: Option<SocketAddr>,
    /// TLS directory (`ca.pem`, `cert.pem`, `key.pem` from `shoal-origin ca issue --role
    /// tracker`, `crl.pem` if any): serve HTTPS and require every caller's certificate from
    /// the cluster CA with the agent or origin role (mutual TLS). Without it, plain HTTP.
    /// [default: none: plain HTTP].
    #[arg(long, env = "SHOAL_TLS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<std::path::PathBuf>,
    /// Extra plain-HTTP listener with only the read-only operations routes: /metrics,
    /// /healthz, /readyz and the status page. For probes and scrapers, which cannot present
    /// a cluster certificate to a tracker served with `--tls` [default: none].
    #[arg(long, env = "SHOAL_METRICS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics: Option<SocketAddr>,
    /// An origin (repeatable; asked in order, or on a ring a blob's owners first): a base URL
    /// (optionally weighted, `http://o1:5000#weight=2`, as in the origins' --cluster) or
    /// `dns:NAME:PORT`, every address of a name (a headless Service), resolved every 30 s.
    /// (required, at least one).
    #[arg(long = "origin", visible_alias = "cluster", env = "SHOAL_ORIGIN", value_delimiter = ',')]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub origin: Vec<String>,
    /// How often peers announce (e.g. `10s`); a peer is forgotten after three missed
    /// [default: 10s].
    #[arg(long, env = "SHOAL_ANNOUNCE_INTERVAL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub announce_interval: Option<shoal_shared::config::Span>,
    /// Most peers returned by one announce [default: 50].
    #[arg(long, env = "SHOAL_TRACKER_MAX_PEERS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_peers: Option<usize>,
    /// Record announced peer addresses whatever IP the announce came from (for agents
    /// behind NAT). By default an announcer may announce only its own IP [default: false].
    #[arg(long, env = "SHOAL_TRUST_ANNOUNCED_ADDRESSES", num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trust_announced_addresses: Option<bool>,
    /// The origins' upload token, sent with every lookup: pull-through lookups reach the
    /// upstreams, so origins with a token require it [default: none].
    #[arg(long, env = "SHOAL_ORIGIN_TOKEN", hide_env_values = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub origin_token: Option<String>,
    /// The origins form a ring with this key (their `--ring-key`): lookups go to a blob's
    /// owners first. Give it (or `--replicas`) when the origins run with `--cluster`.
    /// [default: a built-in key].
    #[arg(long, env = "SHOAL_RING_KEY", hide_env_values = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ring_key: Option<String>,
    /// The origins' `--replicas`; with it (or `--ring-key`) the origins are treated as a ring.
    /// [default: none: no ring].
    #[arg(long, env = "SHOAL_REPLICAS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replicas: Option<usize>,
    /// On SIGTERM, how long responses in flight may take to finish [default: 30s].
    #[arg(long, env = "SHOAL_DRAIN_TIMEOUT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drain_timeout: Option<shoal_shared::config::Span>,
    /// Log format: `text` or `json` (one object per line, for log shippers) [default: text].
    #[arg(long, env = "SHOAL_LOG_FORMAT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Option<shoal_shared::telemetry::LogFormat>,
}

/// The tracker's validated configuration.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_http")]
    pub http: SocketAddr,
    #[serde(default)]
    pub tls: Option<std::path::PathBuf>,
    #[serde(default)]
    pub metrics: Option<SocketAddr>,
    #[serde(default)]
    pub origin: Vec<String>,
    #[serde(default = "default_interval", deserialize_with = "shoal_shared::config::secs")]
    pub announce_interval: u64,
    #[serde(default = "default_max_peers")]
    pub max_peers: usize,
    #[serde(default)]
    pub trust_announced_addresses: bool,
    #[serde(default)]
    pub origin_token: Option<String>,
    #[serde(default)]
    pub ring_key: Option<String>,
    #[serde(default)]
    pub replicas: Option<usize>,
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout: shoal_shared::config::Span,
    #[serde(default)]
    pub log_format: shoal_shared::telemetry::LogFormat,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the token.
        f.debug_struct("Config")
            .field("http", &self.http)
            .field("tls", &self.tls)
            .field("metrics", &self.metrics)
            .field("origin", &self.origin)
            .field("announce_interval", &self.announce_interval)
            .field("max_peers", &self.max_peers)
            .field("trust_announced_addresses", &self.trust_announced_addresses)
            .field("origin_token", &self.origin_token.as_ref().map(|_| "<redacted>"))
            .field("ring_key", &self.ring_key.as_ref().map(|_| "<redacted>"))
            .field("replicas", &self.replicas)
            .field("drain_timeout", &self.drain_timeout)
            .field("log_format", &self.log_format)
            .finish()
    }
}

fn default_http() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 5100))
}
fn default_interval() -> u64 {
    10
}
fn default_max_peers() -> usize {
    50
}
fn default_drain_timeout() -> shoal_shared::config::Span {
    shoal_shared::config::Span(std::time::Duration::from_secs(30))
}

impl Config {
    /// Defaults with the given origins (for tests).
    pub fn new(origin: Vec<String>) -> Self {
        Self {
            http: default_http(),
            tls: None,
            metrics: None,
            origin,
            announce_interval: default_interval(),
            max_peers: default_max_peers(),
            trust_announced_addresses: false,
            origin_token: None,
            ring_key: None,
            replicas: None,
            drain_timeout: default_drain_timeout(),
            log_format: Default::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        flags: ServeFlags,
    }

    #[test]
    fn repeated_origins_and_file_keys() {
        let cli =
            Cli::try_parse_from(["tracker", "--origin", "http://o1:5000", "--origin", "http://o2:5000"])
                .expect("flags");
        let c: Config = shoal_shared::config::layered(&cli.flags, None).expect("config");
        assert_eq!(c.origin, vec!["http://o1:5000".to_string(), "http://o2:5000".to_string()]);
        assert_eq!(c.announce_interval, 10);
        let dir = tempfile::tempdir().expect("tmp");
        let file = dir.path().join("tracker.toml");
        std::fs::write(
            &file,
            "http = \"0.0.0.0:5100\"\nmetrics = \"0.0.0.0:9090\"\norigin = [\"http://o\"]\nannounce_interval = 5\nmax_peers = 20\n",
        )
        .expect("write");
        let cli = Cli::try_parse_from(["tracker"]).expect("flags");
        let c: Config = shoal_shared::config::layered(&cli.flags, Some(&file)).expect("config");
        assert_eq!((c.announce_interval, c.max_peers), (5, 20));
        assert_eq!(c.metrics, Some("0.0.0.0:9090".parse().expect("addr")));
    }
}

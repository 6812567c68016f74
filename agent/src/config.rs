//! The agent's configuration: flags, environment and TOML file.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use shoal_shared::config::{DiskShare, Span};
use shoal_shared::ratelimit::ByteRate;
use shoal_shared::telemetry::LogFormat;

/// `shoal-agent serve` flags.
#[derive(Debug, Default, Clone, clap::Args, Serialize)]
pub struct ServeFlags {
    /// Address of the local registry endpoint containerd pulls from (localhost by default).
    /// [default: 127.0.0.1:5050].
    #[arg(long, env = "SHOAL_REGISTRY")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub registry: Option<SocketAddr>,
    /// UDP address of the QUIC peer endpoint [default: 127.0.0.1:5051].
    #[arg(long, env = "SHOAL_PEER")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<SocketAddr>,
    /// Address other peers should dial [default: the --peer address].
    #[arg(long, env = "SHOAL_ADVERTISE_PEER")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advertise_peer: Option<SocketAddr>,
    /// Data directory (the blob cache) (required).
    #[arg(long, env = "SHOAL_DATA")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<PathBuf>,
    /// Directory with ca.pem, cert.pem, key.pem (from `shoal-origin ca issue`).
    /// (required).
    #[arg(long, env = "SHOAL_TLS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<PathBuf>,
    /// Base URL of a tracker (repeatable; tried in order).
    /// (required, at least one).
    #[arg(long = "tracker", env = "SHOAL_TRACKER", value_delimiter = ',')]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tracker: Vec<String>,
    /// Where an upstream registry is reached, `REGISTRY=URL` (repeatable), for checking a
    /// client's credentials for private pulled-through content against it; a registry not
    /// listed is `https://REGISTRY` (`http://` only for loopback)
    /// [default: none: every registry at `https://REGISTRY`].
    #[arg(long = "upstream", env = "SHOAL_AGENT_UPSTREAM", value_delimiter = ',')]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub upstream: Vec<String>,
    /// How long a download may go without progress before it fails (e.g. `90s`; a bare
    /// number is seconds) [default: 60s].
    #[arg(long, env = "SHOAL_PROGRESS_TIMEOUT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress_timeout: Option<shoal_shared::config::Span>,
    /// How long a completed blob keeps being announced as seeded [default: 1h].
    #[arg(long, env = "SHOAL_SEED_TIME")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed_time: Option<shoal_shared::config::Span>,
    /// Piece bytes sent to peers at once, e.g. `16MiB` (a piece holds its share until the
    /// peer has acknowledged it) [default: 12MiB].
    #[arg(long, env = "SHOAL_UPLOAD_BUDGET")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upload_budget: Option<ByteRate>,
    /// Piece requests that may wait for upload budget; more are refused as busy [default: 2].
    #[arg(long, env = "SHOAL_UPLOAD_QUEUE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upload_queue: Option<usize>,
    /// Most peers one download fetches from at once [default: 10].
    #[arg(long, env = "SHOAL_AGENT_MAX_PEERS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_peers: Option<usize>,
    /// Pass pieces on to peers while they are still arriving, block by block (`false`: only
    /// whole pieces, as Kraken does; for comparison) [default: true].
    #[arg(long, env = "SHOAL_AGENT_CUT_THROUGH")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cut_through: Option<bool>,
    /// Most bytes per second sent to peers, all together (e.g. `100MiB`, `800Mbit`; 0 = no limit).
    /// [default: 0].
    #[arg(long, env = "SHOAL_EGRESS_LIMIT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub egress_limit: Option<ByteRate>,
    /// Most bytes per second received from peers, all together (0 = no limit) [default: 0].
    #[arg(long, env = "SHOAL_INGRESS_LIMIT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ingress_limit: Option<ByteRate>,
    /// How long an unfinished download is kept on disk for resuming; older ones are deleted
    /// at startup [default: 24h].
    #[arg(long, env = "SHOAL_PARTIAL_MAX_AGE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partial_max_age: Option<shoal_shared::config::Span>,
    /// How long a response may make no progress into a local client's socket before the
    /// connection is dropped [default: 30s].
    #[arg(long, env = "SHOAL_SEND_TIMEOUT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub send_timeout: Option<shoal_shared::config::Span>,
    /// Most disk the blob cache (whole blobs, metainfo, partial downloads) may take: a size
    /// (`50GiB`) or a share of the data directory's filesystem (`80%`) [default: 50%].
    #[arg(long, env = "SHOAL_CACHE_SIZE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_size: Option<DiskShare>,
    /// Evict blobs unused for this long (`6h`, `7d`; `0` keeps them until space is needed)
    /// [default: 24h].
    #[arg(long, env = "SHOAL_CACHE_TTL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_ttl: Option<Span>,
    /// On SIGTERM, how long responses in flight may take to finish (peers keep being served
    /// meanwhile) [default: 30s].
    #[arg(long, env = "SHOAL_DRAIN_TIMEOUT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drain_timeout: Option<Span>,
    /// Extra listener for /metrics, /healthz, /readyz and the status page (e.g. the node's
    /// address, while the registry stays on loopback) [default: none].
    #[arg(long, env = "SHOAL_METRICS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics: Option<SocketAddr>,
    /// Log format: `text` or `json` (one object per line, for log shippers) [default: text].
    #[arg(long, env = "SHOAL_LOG_FORMAT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Option<LogFormat>,
}

/// The agent's validated configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_registry")]
    pub registry: SocketAddr,
    #[serde(default = "default_peer")]
    pub peer: SocketAddr,
    #[serde(default)]
    pub advertise_peer: Option<SocketAddr>,
    pub data: PathBuf,
    pub tls: PathBuf,
    pub tracker: Vec<String>,
    #[serde(default)]
    pub upstream: Vec<String>,
    #[serde(default = "default_progress_timeout", deserialize_with = "shoal_shared::config::secs")]
    pub progress_timeout: u64,
    #[serde(default = "default_seed_time", deserialize_with = "shoal_shared::config::secs")]
    pub seed_time: u64,
    #[serde(default = "default_upload_budget")]
    pub upload_budget: ByteRate,
    #[serde(default = "default_upload_queue")]
    pub upload_queue: usize,
    #[serde(default = "default_max_peers")]
    pub max_peers: usize,
    #[serde(default = "default_cut_through")]
    pub cut_through: bool,
    #[serde(default)]
    pub egress_limit: ByteRate,
    #[serde(default)]
    pub ingress_limit: ByteRate,
    #[serde(default = "default_partial_max_age", deserialize_with = "shoal_shared::config::secs")]
    pub partial_max_age: u64,
    #[serde(default = "default_send_timeout", deserialize_with = "shoal_shared::config::secs")]
    pub send_timeout: u64,
    #[serde(default = "default_cache_size")]
    pub cache_size: DiskShare,
    #[serde(default = "default_cache_ttl")]
    pub cache_ttl: Span,
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout: Span,
    #[serde(default)]
    pub metrics: Option<SocketAddr>,
    #[serde(default)]
    pub log_format: LogFormat,
}

/// Half the filesystem: room for the node's images in containerd's own store beside it.
fn default_cache_size() -> DiskShare {
    DiskShare::Percent(50)
}
/// A day: containerd keeps its own copy of what it pulled, so the agent's copy serves
/// peers and re-pulls; a daily rollout still finds it.
fn default_cache_ttl() -> Span {
    Span(std::time::Duration::from_secs(24 * 3600))
}
fn default_drain_timeout() -> Span {
    Span(std::time::Duration::from_secs(30))
}

fn default_registry() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 5050))
}
fn default_peer() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 5051))
}
fn default_progress_timeout() -> u64 {
    60
}
fn default_seed_time() -> u64 {
    3600
}
fn default_upload_budget() -> ByteRate {
    ByteRate(12 << 20)
}
fn default_upload_queue() -> usize {
    2
}
fn default_max_peers() -> usize {
    10
}
fn default_cut_through() -> bool {
    true
}
fn default_send_timeout() -> u64 {
    shoal_shared::http::SEND_TIMEOUT.as_secs()
}
fn default_partial_max_age() -> u64 {
    24 * 3600
}

impl Config {
    /// Defaults with the given directories and trackers (for tests).
    pub fn new(data: PathBuf, tls: PathBuf, tracker: Vec<String>) -> Self {
        Self {
            registry: default_registry(),
            peer: default_peer(),
            advertise_peer: None,
            data,
            tls,
            tracker,
            upstream: Vec::new(),
            progress_timeout: default_progress_timeout(),
            seed_time: default_seed_time(),
            upload_budget: default_upload_budget(),
            upload_queue: default_upload_queue(),
            max_peers: default_max_peers(),
            cut_through: default_cut_through(),
            egress_limit: ByteRate::default(),
            ingress_limit: ByteRate::default(),
            partial_max_age: default_partial_max_age(),
            send_timeout: default_send_timeout(),
            cache_size: default_cache_size(),
            cache_ttl: default_cache_ttl(),
            drain_timeout: default_drain_timeout(),
            metrics: None,
            log_format: LogFormat::default(),
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
    fn flags_env_and_file_layer_in_that_order() {
        let dir = tempfile::tempdir().expect("tmp");
        let file = dir.path().join("agent.toml");
        std::fs::write(
            &file,
            r#"
registry = "127.0.0.1:6000"
peer = "0.0.0.0:6001"
advertise_peer = "10.0.0.17:6001"
data = "/var/lib/shoal/agent"
tls = "/etc/shoal/tls"
tracker = ["http://t1:5100", "http://t2:5100"]
progress_timeout = 120
seed_time = 60
upload_budget = "4MiB"
upload_queue = 2
max_peers = 3
egress_limit = "100MiB"
ingress_limit = 1000
partial_max_age = 600
send_timeout = 9
cache_size = "20GiB"
cache_ttl = "6h"
drain_timeout = 45
metrics = "0.0.0.0:9090"
log_format = "json"
"#,
        )
        .expect("write");
        // The environment (read by clap) beats the file; a flag beats both.
        std::env::set_var("SHOAL_PROGRESS_TIMEOUT", "30");
        std::env::set_var("SHOAL_MAX_PEERS", "7");
        let cli = Cli::try_parse_from([
            "agent",
            "--max-peers",
            "9",
            "--tracker",
            "http://a,http://b",
            "--ingress-limit",
            "800Mbit",
        ])
        .expect("flags");
        std::env::remove_var("SHOAL_PROGRESS_TIMEOUT");
        std::env::remove_var("SHOAL_MAX_PEERS");
        let c: Config = shoal_shared::config::layered(&cli.flags, Some(&file)).expect("config");
        assert_eq!(c.registry, "127.0.0.1:6000".parse().expect("addr"));
        assert_eq!(c.advertise_peer, Some("10.0.0.17:6001".parse().expect("addr")));
        assert_eq!(c.progress_timeout, 30, "env beats file");
        assert_eq!(c.max_peers, 9, "flag beats env");
        assert_eq!(c.tracker, vec!["http://a".to_string(), "http://b".to_string()]);
        assert_eq!((c.seed_time, c.upload_budget, c.upload_queue), (60, ByteRate(4 << 20), 2));
        assert_eq!(c.egress_limit, ByteRate(100 << 20), "units in the file");
        assert_eq!(c.ingress_limit, ByteRate(100_000_000), "flag beats file");
        assert_eq!((c.partial_max_age, c.send_timeout), (600, 9));
        assert_eq!(c.cache_size, DiskShare::Bytes(20 << 30));
        assert_eq!((c.cache_ttl.0.as_secs(), c.drain_timeout.0.as_secs()), (6 * 3600, 45));
        assert_eq!(c.metrics, Some("0.0.0.0:9090".parse().expect("addr")));
        assert_eq!(c.log_format, LogFormat::Json);

        // Defaults fill what nobody set; the registry stays on localhost.
        let cli = Cli::try_parse_from(["agent", "--data", "/d", "--tls", "/t", "--tracker", "http://t"])
            .expect("flags");
        let c: Config = shoal_shared::config::layered(&cli.flags, None).expect("config");
        assert!(c.registry.ip().is_loopback());
        assert_eq!(c.progress_timeout, 60);
        assert_eq!((c.egress_limit.limit(), c.ingress_limit.limit()), (None, None), "unlimited by default");
        assert_eq!((c.cache_size, c.cache_ttl.0.as_secs()), (DiskShare::Percent(50), 24 * 3600));
        assert!(Cli::try_parse_from(["agent", "--cache-size", "150%"]).is_err());
        assert!(Cli::try_parse_from(["agent", "--cache-ttl", "whenever"]).is_err());

        // Missing required keys and bad values are refused with the key's name.
        let cli = Cli::try_parse_from(["agent"]).expect("flags");
        let err = shoal_shared::config::layered::<Config>(&cli.flags, None).expect_err("no data dir");
        assert!(err.to_string().contains("data"), "{err}");
        std::fs::write(&file, "data = \"/d\"\ntls = \"/t\"\ntracker = []\nmax_peers = \"many\"\n")
            .expect("write");
        let err = shoal_shared::config::layered::<Config>(&cli.flags, Some(&file)).expect_err("bad value");
        assert!(err.to_string().contains("max_peers"), "{err}");
        assert!(Cli::try_parse_from(["agent", "--registry", "not-an-address"]).is_err());
        assert!(Cli::try_parse_from(["agent", "--egress-limit", "fast"]).is_err());
        std::fs::write(&file, "data = \"/d\"\ntls = \"/t\"\ntracker = []\negress_limit = \"-1MiB\"\n")
            .expect("write");
        let err = shoal_shared::config::layered::<Config>(&cli.flags, Some(&file)).expect_err("bad rate");
        assert!(err.to_string().contains("egress_limit"), "{err}");
    }
}

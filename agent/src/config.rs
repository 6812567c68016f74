//! The agent's configuration: flags, environment and TOML file.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `shoal-agent serve` flags.
#[derive(Debug, Default, Clone, clap::Args, Serialize)]
pub struct ServeFlags {
    /// Address of the local registry endpoint containerd pulls from (localhost by default).
    #[arg(long, env = "SHOAL_REGISTRY")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub registry: Option<SocketAddr>,
    /// UDP address of the QUIC peer endpoint.
    #[arg(long, env = "SHOAL_PEER")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<SocketAddr>,
    /// Address other peers should dial (defaults to --peer).
    #[arg(long, env = "SHOAL_ADVERTISE_PEER")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advertise_peer: Option<SocketAddr>,
    /// Data directory (the blob cache).
    #[arg(long, env = "SHOAL_DATA")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<PathBuf>,
    /// Directory with ca.pem, cert.pem, key.pem (from `shoal-origin ca issue`).
    #[arg(long, env = "SHOAL_TLS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<PathBuf>,
    /// Base URL of a tracker (repeatable; tried in order).
    #[arg(long = "tracker", env = "SHOAL_TRACKER", value_delimiter = ',')]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tracker: Vec<String>,
    /// Seconds a download may go without progress before it fails.
    #[arg(long, env = "SHOAL_PROGRESS_TIMEOUT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress_timeout: Option<u64>,
    /// Seconds a completed blob keeps being announced as seeded.
    #[arg(long, env = "SHOAL_SEED_TIME")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed_time: Option<u64>,
    /// Most pieces sent to peers at once.
    #[arg(long, env = "SHOAL_MAX_UPLOADS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_uploads: Option<usize>,
    /// Most peers one download fetches from at once.
    #[arg(long, env = "SHOAL_MAX_PEERS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_peers: Option<usize>,
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
    #[serde(default = "default_progress_timeout")]
    pub progress_timeout: u64,
    #[serde(default = "default_seed_time")]
    pub seed_time: u64,
    #[serde(default = "default_max_uploads")]
    pub max_uploads: usize,
    #[serde(default = "default_max_peers")]
    pub max_peers: usize,
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
fn default_max_uploads() -> usize {
    16
}
fn default_max_peers() -> usize {
    10
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
            progress_timeout: default_progress_timeout(),
            seed_time: default_seed_time(),
            max_uploads: default_max_uploads(),
            max_peers: default_max_peers(),
        }
    }
}

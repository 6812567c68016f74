//! What the harness starts: the cluster's options, the origin's pull-through settings and
//! each agent's own settings, with the defaults tests start from.

use std::path::PathBuf;

/// What to start.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Number of agents started with the cluster.
    pub agents: usize,
    /// The origin's piece length (64 KiB to 64 MiB).
    pub piece_length: u32,
    /// The agents' progress timeout, in seconds.
    pub progress_timeout: u64,
    /// Bearer token the origin requires for uploads (`push_image` sends it).
    pub upload_token: Option<String>,
    /// Pull-through settings of the origin (none: no upstream).
    pub upstream: Option<UpstreamOptions>,
    /// The origin's data directory (none: one in the cluster's temp dir), for a test that
    /// puts it on a small filesystem.
    pub origin_data: Option<PathBuf>,
    /// Seconds a response may stall in a client's socket on the origin and the agents.
    pub send_timeout: u64,
    /// The origin's bound on bytes held by open chunked uploads (none: its default).
    pub max_upload_bytes: Option<u64>,
    /// Serve the tracker over HTTPS with mutual TLS (`--tls`, a tracker certificate from
    /// the cluster CA); agents and the origin call it with `https://` and their certificates.
    pub tracker_tls: bool,
    /// Give the origin an internal listener (`--internal`, mutual TLS) and have the tracker
    /// ask it there (`https://`, with the tracker's certificate, no token). Needs
    /// `tracker_tls` (the tracker's certificate).
    pub origin_internal: bool,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            agents: 1,
            piece_length: 1 << 20,
            progress_timeout: 20,
            upload_token: None,
            upstream: None,
            origin_data: None,
            send_timeout: shoal_shared::http::SEND_TIMEOUT.as_secs(),
            max_upload_bytes: None,
            tracker_tls: false,
            origin_internal: false,
        }
    }
}

/// The origin's pull-through settings (`shoal-origin serve --upstream ...`).
#[derive(Debug, Clone)]
pub struct UpstreamOptions {
    pub urls: Vec<String>,
    /// Docker `config.json` with the upstreams' credentials.
    pub auth_file: Option<PathBuf>,
    /// Where the origin looks for `docker-credential-*` helpers (none: `PATH`).
    pub helper_path: Option<PathBuf>,
    /// Extra CA certificates (PEM) trusted for upstreams.
    pub ca_file: Option<PathBuf>,
    pub tag_ttl: u64,
    pub stall: u64,
    pub prefetch_sync: bool,
    pub prefetch_max_size: u64,
}

impl UpstreamOptions {
    /// One upstream, defaults otherwise.
    pub fn new(url: &str) -> Self {
        Self {
            urls: vec![url.to_owned()],
            auth_file: None,
            helper_path: None,
            ca_file: None,
            tag_ttl: 300,
            stall: 30,
            prefetch_sync: false,
            prefetch_max_size: u64::MAX,
        }
    }
}

/// Per-agent settings for [`Cluster::start_agent`](super::Cluster::start_agent).
#[derive(Debug, Clone, Default)]
pub struct AgentOptions {
    /// Bytes per second sent to peers (0: unlimited).
    pub egress_limit: u64,
    /// Bytes per second received from peers (0: unlimited).
    pub ingress_limit: u64,
    /// The agent's data directory (none: one in the cluster's temp dir).
    pub data_dir: Option<PathBuf>,
    /// The agent's `--cache-size` in bytes (none: its default).
    pub cache_size: Option<u64>,
    /// The agent's `--drain-timeout` in seconds (none: its default, 30 s). A short one makes
    /// a stop close to a kill: responses in flight are cut.
    pub drain_timeout: Option<u64>,
}

//! The origin's configuration: flags, environment and TOML file, merged by
//! [`shoal_shared::config::layered`].

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use shoal_shared::metainfo::DEFAULT_PIECE_LENGTH;
use shoal_shared::ratelimit::ByteRate;

/// `shoal-origin serve` flags. Every flag is optional here; defaults live in [`Config`].
#[derive(Debug, Default, Clone, clap::Args, Serialize)]
pub struct ServeFlags {
    /// HTTP address of the registry and seeding API [default: 127.0.0.1:5000].
    #[arg(long, env = "SHOAL_HTTP")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http: Option<SocketAddr>,
    /// UDP address of the QUIC peer endpoint [default: 127.0.0.1:5001].
    #[arg(long, env = "SHOAL_PEER")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<SocketAddr>,
    /// HTTPS address of the internal listener: the origin's API with mutual TLS, for the
    /// cluster's trackers and ring members only (tracker or origin certificates of the
    /// cluster CA, checked against crl.pem on every request), where their lookups, copies and
    /// forwards are authorized by the certificate's role instead of the upload token. List
    /// it as `https://HOST:PORT` in trackers' --origin and in --cluster
    /// [default: none (off): the public port alone, as a standalone origin needs].
    #[arg(long, env = "SHOAL_INTERNAL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub internal: Option<SocketAddr>,
    /// Address other peers should dial [default: the --peer address].
    #[arg(long, env = "SHOAL_ADVERTISE_PEER")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advertise_peer: Option<SocketAddr>,
    /// Data directory (blobs, metainfo, tags) (required).
    #[arg(long, env = "SHOAL_DATA")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<PathBuf>,
    /// Where blobs, metainfo and tags are kept for good: `s3://BUCKET/PREFIX` (standard
    /// `AWS_*` environment), `gs://`, `az://` or `file:///DIR`; --data is then a cache
    /// [default: the data directory itself].
    #[arg(long, env = "SHOAL_STORE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
    /// Directory with ca.pem, cert.pem, key.pem (from `shoal-origin ca issue`).
    /// (required).
    #[arg(long, env = "SHOAL_TLS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<PathBuf>,
    /// Piece length of new blobs' metainfo, a power of two from 64KiB to 64MiB (e.g. `4MiB`;
    /// a bare number is bytes) [default: 1MiB].
    #[arg(long, env = "SHOAL_PIECE_LENGTH")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub piece_length: Option<shoal_shared::ratelimit::ByteRate>,
    /// Piece bytes sent to peers at once, e.g. `64MiB` (a piece holds its share until the
    /// peer has acknowledged it) [default: 16MiB].
    #[arg(long, env = "SHOAL_UPLOAD_BUDGET")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upload_budget: Option<ByteRate>,
    /// Piece requests that may wait for upload budget; more are refused as busy [default: 2].
    #[arg(long, env = "SHOAL_UPLOAD_QUEUE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upload_queue: Option<usize>,
    /// Tracker base URL (repeatable): the origin announces the blobs peers are fetching
    /// from it as a seeder there [default: none].
    #[arg(long = "tracker", env = "SHOAL_TRACKER", value_delimiter = ',')]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tracker: Vec<String>,
    /// Bearer token required for every write (push, tag, delete) and for prefetch. Without
    /// one the origin serves only on loopback, unless --allow-anonymous-writes.
    #[arg(long, env = "SHOAL_UPLOAD_TOKEN", hide_env_values = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upload_token: Option<String>,
    /// Serve beyond loopback with no upload token: anyone who reaches the origin can push,
    /// overwrite tags and fill its disk from the upstreams [default: false].
    #[arg(long, env = "SHOAL_ALLOW_ANONYMOUS_WRITES", num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_anonymous_writes: Option<bool>,
    /// How long a response may make no progress into a client's socket before the connection
    /// is dropped [default: 30s].
    #[arg(long, env = "SHOAL_SEND_TIMEOUT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub send_timeout: Option<shoal_shared::config::Span>,
    /// Base URL of every origin of the cluster, this one included, written the same on every
    /// member and tracker (repeatable). Without it the origin stands alone.
    /// [default: none: a standalone origin].
    #[arg(long = "cluster", env = "SHOAL_CLUSTER", value_delimiter = ',')]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub cluster: Vec<String>,
    /// This origin's base URL as it appears in --cluster [default: https://<--internal
    /// address> with --internal, else http://<--http address>].
    #[arg(long = "self", env = "SHOAL_SELF")]
    #[serde(rename = "self", skip_serializing_if = "Option::is_none")]
    pub self_url: Option<String>,
    /// Origins that hold each blob (its owners on the ring) [default: 2].
    #[arg(long, env = "SHOAL_REPLICAS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replicas: Option<usize>,
    /// Key of the ring's hash, the same on every origin and tracker (keeps anyone without it
    /// from choosing digests that all land on one origin) [default: a built-in key].
    #[arg(long, env = "SHOAL_RING_KEY", hide_env_values = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ring_key: Option<String>,
    /// How long this origin keeps a copy of a blob it no longer owns once every owner holds
    /// it (the repair pass copies it there first); then the local copy is dropped (with
    /// --store, the store's object stays: several origins may share one store) [default: 1h].
    #[arg(long, env = "SHOAL_HANDOFF_GRACE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handoff_grace: Option<shoal_shared::config::Span>,
    /// With --store, most disk the local copies of blobs may take: a size (`500GiB`) or a
    /// share of the data directory's filesystem (`80%`); least recently used copies are
    /// dropped locally (they stay in the store) [default: 50%].
    #[arg(long, env = "SHOAL_CACHE_SIZE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_size: Option<shoal_shared::config::DiskShare>,
    /// Pulled-through blobs no one asked for this long are dropped, locally and from the
    /// store (the upstream still has them); pushed blobs are kept for good. `0` keeps them
    /// [default: 7d].
    #[arg(long, env = "SHOAL_PULL_THROUGH_RETENTION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pull_through_retention: Option<shoal_shared::config::Span>,
    /// On SIGTERM, how long responses in flight (uploads included) may take to finish
    /// [default: 30s].
    #[arg(long, env = "SHOAL_DRAIN_TIMEOUT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drain_timeout: Option<shoal_shared::config::Span>,
    /// Log format: `text` or `json` (one object per line, for log shippers) [default: text].
    #[arg(long, env = "SHOAL_LOG_FORMAT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Option<shoal_shared::telemetry::LogFormat>,
    /// Most bytes all uploads in progress may hold together, e.g. `20GiB`; 0 for no bound
    /// (default: a quarter of the data directory's filesystem). A chunk past it ends its
    /// upload.
    #[arg(long, env = "SHOAL_MAX_UPLOAD_BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_upload_bytes: Option<ByteRate>,
    /// HTTP worker threads [default: 2].
    #[arg(long, env = "SHOAL_HTTP_WORKERS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_workers: Option<usize>,
    /// Upstream registry to pull images through from (repeatable), e.g.
    /// https://registry-1.docker.io, or REGISTRY=URL (docker.io=https://mirror.example: the
    /// registry named docker.io is served at that URL); plain http only for localhost.
    /// Requests without `?ns=` go to the first [default: none].
    #[arg(long = "upstream", env = "SHOAL_UPSTREAM", value_delimiter = ',')]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub upstream: Vec<String>,
    /// Docker config.json with the upstreams' credentials: `auths` (auth, username/password,
    /// identitytoken, registrytoken), `credsStore` and `credHelpers` (docker-credential-*
    /// helpers, as Docker runs them).
    #[arg(long, env = "SHOAL_UPSTREAM_AUTH")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_auth: Option<PathBuf>,
    /// Directories (PATH syntax) searched for docker-credential-* helpers [default: PATH].
    #[arg(long, env = "SHOAL_UPSTREAM_HELPER_PATH")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_helper_path: Option<String>,
    /// PEM file of extra CA certificates trusted for upstream registries.
    /// [default: the system's roots].
    #[arg(long, env = "SHOAL_UPSTREAM_CA")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_ca: Option<PathBuf>,
    /// How long a pulled-through tag is served without asking the upstream again (then a HEAD
    /// checks it) [default: 5m].
    #[arg(long, env = "SHOAL_TAG_TTL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tag_ttl: Option<shoal_shared::config::Span>,
    /// How long an upstream fetch may make no progress before it is cancelled and retried
    /// [default: 30s].
    #[arg(long, env = "SHOAL_UPSTREAM_STALL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_stall: Option<shoal_shared::config::Span>,
    /// Attempts per upstream blob fetch [default: 3].
    #[arg(long, env = "SHOAL_UPSTREAM_ATTEMPTS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_attempts: Option<u32>,
    /// `/proxy/v1/registry/prefetch` waits until the blobs are stored [default: false].
    #[arg(long, env = "SHOAL_PREFETCH_SYNC", num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefetch_sync: Option<bool>,
    /// Blobs smaller than this are not prefetched (e.g. `1MiB`) [default: 0].
    #[arg(long, env = "SHOAL_PREFETCH_MIN_SIZE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefetch_min_size: Option<shoal_shared::ratelimit::ByteRate>,
    /// Blobs larger than this are not prefetched (e.g. `10GiB`) [default: no limit].
    #[arg(long, env = "SHOAL_PREFETCH_MAX_SIZE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefetch_max_size: Option<shoal_shared::ratelimit::ByteRate>,
}

/// The origin's validated configuration.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_http")]
    pub http: SocketAddr,
    #[serde(default = "default_peer")]
    pub peer: SocketAddr,
    #[serde(default)]
    pub internal: Option<SocketAddr>,
    #[serde(default)]
    pub advertise_peer: Option<SocketAddr>,
    pub data: PathBuf,
    /// `None`: the data directory is the store.
    #[serde(default)]
    pub store: Option<String>,
    pub tls: PathBuf,
    #[serde(default = "default_piece_length", deserialize_with = "shoal_shared::config::bytes_u32")]
    pub piece_length: u32,
    #[serde(default = "default_upload_budget")]
    pub upload_budget: ByteRate,
    #[serde(default = "default_upload_queue")]
    pub upload_queue: usize,
    #[serde(default = "default_workers")]
    pub http_workers: usize,
    #[serde(default = "default_send_timeout", deserialize_with = "shoal_shared::config::secs")]
    pub send_timeout: u64,
    #[serde(default)]
    pub cluster: Vec<String>,
    #[serde(default, rename = "self")]
    pub self_url: Option<String>,
    #[serde(default = "default_replicas")]
    pub replicas: usize,
    #[serde(default)]
    pub ring_key: Option<String>,
    #[serde(default = "default_handoff_grace")]
    pub handoff_grace: shoal_shared::config::Span,
    #[serde(default = "default_cache_size")]
    pub cache_size: shoal_shared::config::DiskShare,
    #[serde(default = "default_pull_through_retention")]
    pub pull_through_retention: shoal_shared::config::Span,
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout: shoal_shared::config::Span,
    #[serde(default)]
    pub log_format: shoal_shared::telemetry::LogFormat,
    /// `None`: a quarter of the data filesystem.
    #[serde(default)]
    pub max_upload_bytes: Option<ByteRate>,
    #[serde(default)]
    pub upload_token: Option<String>,
    #[serde(default)]
    pub allow_anonymous_writes: bool,
    #[serde(default)]
    pub tracker: Vec<String>,
    #[serde(default)]
    pub upstream: Vec<String>,
    #[serde(default)]
    pub upstream_auth: Option<PathBuf>,
    #[serde(default)]
    pub upstream_helper_path: Option<String>,
    #[serde(default)]
    pub upstream_ca: Option<PathBuf>,
    #[serde(default = "default_tag_ttl", deserialize_with = "shoal_shared::config::secs")]
    pub tag_ttl: u64,
    #[serde(default = "default_upstream_stall", deserialize_with = "shoal_shared::config::secs")]
    pub upstream_stall: u64,
    #[serde(default = "default_upstream_attempts")]
    pub upstream_attempts: u32,
    #[serde(default)]
    pub prefetch_sync: bool,
    #[serde(default, deserialize_with = "shoal_shared::config::bytes")]
    pub prefetch_min_size: u64,
    #[serde(default = "default_prefetch_max_size", deserialize_with = "shoal_shared::config::bytes")]
    pub prefetch_max_size: u64,
}

fn default_http() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 5000))
}
fn default_peer() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 5001))
}
fn default_piece_length() -> u32 {
    DEFAULT_PIECE_LENGTH
}
fn default_upload_budget() -> ByteRate {
    ByteRate(16 << 20)
}
fn default_upload_queue() -> usize {
    2
}
fn default_workers() -> usize {
    2
}
fn default_send_timeout() -> u64 {
    shoal_shared::http::SEND_TIMEOUT.as_secs()
}
fn default_cache_size() -> shoal_shared::config::DiskShare {
    shoal_shared::config::DiskShare::Percent(50)
}
/// A week, as Harbor's proxy caches keep what they pulled.
fn default_pull_through_retention() -> shoal_shared::config::Span {
    shoal_shared::config::Span(std::time::Duration::from_secs(7 * 86400))
}
fn default_handoff_grace() -> shoal_shared::config::Span {
    shoal_shared::config::Span(std::time::Duration::from_secs(3600))
}
fn default_replicas() -> usize {
    2
}
fn default_drain_timeout() -> shoal_shared::config::Span {
    shoal_shared::config::Span(std::time::Duration::from_secs(30))
}
fn default_tag_ttl() -> u64 {
    300
}
fn default_upstream_stall() -> u64 {
    30
}
fn default_upstream_attempts() -> u32 {
    3
}
fn default_prefetch_max_size() -> u64 {
    u64::MAX
}

impl Config {
    /// A configuration with defaults for everything but the directories (for tests).
    pub fn new(data: PathBuf, tls: PathBuf) -> Self {
        Self {
            http: default_http(),
            peer: default_peer(),
            internal: None,
            advertise_peer: None,
            data,
            store: None,
            tls,
            piece_length: default_piece_length(),
            upload_budget: default_upload_budget(),
            upload_queue: default_upload_queue(),
            http_workers: default_workers(),
            send_timeout: default_send_timeout(),
            cache_size: default_cache_size(),
            pull_through_retention: default_pull_through_retention(),
            cluster: Vec::new(),
            self_url: None,
            replicas: default_replicas(),
            ring_key: None,
            handoff_grace: default_handoff_grace(),
            drain_timeout: default_drain_timeout(),
            log_format: Default::default(),
            max_upload_bytes: None,
            upload_token: None,
            allow_anonymous_writes: false,
            tracker: Vec::new(),
            upstream: Vec::new(),
            upstream_auth: None,
            upstream_helper_path: None,
            upstream_ca: None,
            tag_ttl: default_tag_ttl(),
            upstream_stall: default_upstream_stall(),
            upstream_attempts: default_upstream_attempts(),
            prefetch_sync: false,
            prefetch_min_size: 0,
            prefetch_max_size: default_prefetch_max_size(),
        }
    }
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the token.
        f.debug_struct("Config")
            .field("http", &self.http)
            .field("internal", &self.internal)
            .field("peer", &self.peer)
            .field("advertise_peer", &self.advertise_peer)
            .field("data", &self.data)
            .field("store", &self.store)
            .field("tls", &self.tls)
            .field("piece_length", &self.piece_length)
            .field("tracker", &self.tracker)
            .field("upload_token", &self.upload_token.as_ref().map(|_| "<redacted>"))
            .field("upstream", &self.upstream)
            .field("upstream_auth", &self.upstream_auth)
            .field("upstream_helper_path", &self.upstream_helper_path)
            .field("tag_ttl", &self.tag_ttl)
            .finish_non_exhaustive()
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
    fn durations_and_sizes_take_units_and_bare_numbers() {
        let cli = Cli::try_parse_from([
            "origin",
            "--data",
            "/d",
            "--tls",
            "/t",
            "--tag-ttl",
            "5m",
            "--upstream-stall",
            "45",
            "--piece-length",
            "1MiB",
            "--prefetch-max-size",
            "2GiB",
            "--send-timeout",
            "1m 30s",
        ])
        .expect("flags");
        let c: Config = shoal_shared::config::layered(&cli.flags, None).expect("config");
        assert_eq!((c.tag_ttl, c.upstream_stall, c.send_timeout), (300, 45, 90));
        assert_eq!((c.piece_length, c.prefetch_max_size), (1 << 20, 2 << 30));
        let cli = Cli::try_parse_from(["origin", "--data", "/d", "--tls", "/t", "--tag-ttl", "1500ms"])
            .expect("flags");
        let err = shoal_shared::config::layered::<Config>(&cli.flags, None).expect_err("refused");
        assert!(err.to_string().contains("whole seconds"), "{err}");
        assert!(Cli::try_parse_from(["origin", "--tag-ttl", "soon"]).is_err());
    }

    #[test]
    fn every_key_loads_and_the_token_is_never_printed() {
        let dir = tempfile::tempdir().expect("tmp");
        let file = dir.path().join("origin.toml");
        std::fs::write(
            &file,
            r#"
http = "0.0.0.0:5000"
peer = "0.0.0.0:5001"
advertise_peer = "10.0.0.5:5001"
data = "/var/lib/shoal/origin"
store = "s3://shoal-blobs/prod"
tls = "/etc/shoal/tls"
piece_length = 1048576
upload_budget = "64MiB"
http_workers = 4
send_timeout = 7
max_upload_bytes = "2GiB"
upload_token = "hunter2"
tracker = ["http://tracker:5100"]
upstream = ["https://registry-1.docker.io"]
upstream_auth = "/etc/shoal/docker.json"
upstream_helper_path = "/opt/shoal/helpers:/usr/bin"
upstream_ca = "/etc/shoal/ca.pem"
tag_ttl = 60
upstream_stall = 10
upstream_attempts = 2
prefetch_sync = true
prefetch_min_size = 1
prefetch_max_size = 1000
"#,
        )
        .expect("write");
        let cli =
            Cli::try_parse_from(["origin", "--piece-length", "65536", "--tag-ttl", "5"]).expect("flags");
        let c: Config = shoal_shared::config::layered(&cli.flags, Some(&file)).expect("config");
        assert_eq!((c.tag_ttl, c.upstream_stall, c.upstream_attempts), (5, 10, 2));
        assert_eq!(c.upstream, vec!["https://registry-1.docker.io".to_string()]);
        assert_eq!(c.upstream_helper_path.as_deref(), Some("/opt/shoal/helpers:/usr/bin"));
        assert!(c.prefetch_sync);
        assert_eq!((c.prefetch_min_size, c.prefetch_max_size), (1, 1000));
        assert_eq!(c.piece_length, 65536);
        assert_eq!(c.store.as_deref(), Some("s3://shoal-blobs/prod"));
        assert_eq!((c.http_workers, c.send_timeout), (4, 7));
        assert_eq!(c.max_upload_bytes, Some(ByteRate(2 << 30)));
        assert_eq!(c.tracker, vec!["http://tracker:5100".to_string()]);
        assert_eq!(c.upload_token.as_deref(), Some("hunter2"));
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}

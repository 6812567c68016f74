//! In-process cluster harness: one origin, one tracker and N agents, each on its own
//! loopback listeners, sharing a private CA in a temporary directory.
//!
//! [`Cluster::start`] returns once every HTTP endpoint answers; dropping the [`Cluster`]
//! cancels every node. Each agent runs on its own runtime (its own thread), so stopping one
//! ends its downloads as a killed process would, and it can be restarted on the same data.
//! Fault injection: [`Cluster::restart_agent`], [`Cluster::restart_tracker`],
//! [`Cluster::stop_origin`], and [`Cluster::start_rogue_peer`] for a peer that misbehaves. [`pull_image`] is an independent registry client that pulls an image
//! the way containerd would and verifies every digest.

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context as _};
use futures_util::StreamExt as _;
use sha2::{Digest as _, Sha256};
use shoal_shared::client::Announce;
use shoal_shared::digest::Digest;
use shoal_shared::peer::{PeerStats, PieceSource};
use shoal_shared::ratelimit::ByteRate;
use shoal_shared::tls::Role;
use shoal_shared::tracker::TrackerClient;
use tempfile::TempDir;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::image::{generate_oci_layout, GeneratedImage};

/// Media types a pulling client accepts for manifests.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
     application/vnd.oci.image.index.v1+json, \
     application/vnd.docker.distribution.manifest.v2+json, \
     application/vnd.docker.distribution.manifest.list.v2+json";

/// How long a node may take to answer its first HTTP request.
const STARTUP: Duration = Duration::from_secs(15);

/// Initialises tracing for tests (once; `RUST_LOG` picks the filter, default `warn`).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
}

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

/// Per-agent settings for [`Cluster::start_agent`].
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

/// One running agent.
#[derive(Debug)]
pub struct AgentNode {
    /// Base URL of its local registry, e.g. `http://127.0.0.1:34567`.
    pub registry_url: String,
    /// Its QUIC peer address.
    pub peer_addr: SocketAddr,
    /// Cancel to stop it.
    pub shutdown: CancellationToken,
    /// Its blob cache.
    pub data_dir: PathBuf,
    /// Its TLS directory.
    pub tls_dir: PathBuf,
    /// The thread running the agent's own runtime.
    thread: Option<std::thread::JoinHandle<()>>,
}

impl AgentNode {
    /// `127.0.0.1:PORT` of the registry endpoint (what containerd and skopeo want).
    pub fn registry_host(&self) -> &str {
        self.registry_url.trim_start_matches("http://")
    }

    /// Stops the agent and waits until its runtime is gone: every task it ran, downloads
    /// included, has ended (as when the process exits). An error if it is still running
    /// after [`STOP`] or its thread panicked: it may still hold its data directory and
    /// ports, so nothing may be started in its place.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        let Some(thread) = self.thread.take() else { return Ok(()) };
        let name = thread.thread().name().unwrap_or("agent").to_owned();
        let join = tokio::task::spawn_blocking(move || thread.join());
        match tokio::time::timeout(STOP, join).await {
            Err(_) => bail!(
                "{name} ({}) still running {} s after it was told to stop",
                self.registry_url,
                STOP.as_secs()
            ),
            Ok(Err(e)) => bail!("joining {name}: {e}"),
            Ok(Ok(Err(panic))) => bail!("{name} panicked: {}", panic_message(panic.as_ref())),
            Ok(Ok(Ok(()))) => Ok(()),
        }
    }
}

/// How long a stopped agent may take to end every task it ran.
const STOP: Duration = Duration::from_secs(20);

fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(not a string)")
}

/// A whole cluster running inside the test process.
#[derive(Debug)]
pub struct Cluster {
    /// Base URL of the origin's HTTP API.
    pub origin_url: String,
    /// Base URL of the origin's internal listener (with `origin_internal`).
    pub origin_internal_url: Option<String>,
    /// The origin's URL as the tracker is told it (`--origin`).
    pub tracker_origin_url: String,
    /// The origin's QUIC peer address.
    pub origin_peer: SocketAddr,
    /// Base URL of the tracker.
    pub tracker_url: String,
    /// The agents, in start order.
    pub agents: Vec<AgentNode>,
    /// The cluster CA directory (`ca.pem`, `ca.key`).
    pub ca_dir: PathBuf,
    /// A plain HTTP client.
    pub client: reqwest::Client,
    /// A client the tracker admits: [`Cluster::client`], or with `tracker_tls` one that
    /// presents an agent certificate from the cluster CA.
    pub tracker_client: reqwest::Client,
    /// The tracker's TLS directory (with `tracker_tls`).
    tracker_tls: Option<PathBuf>,
    /// The options the cluster was started with.
    pub options: ClusterOptions,
    origin_shutdown: CancellationToken,
    origin_task: Option<JoinHandle<()>>,
    tracker_shutdown: CancellationToken,
    tracker_task: Option<JoinHandle<()>>,
    // Dropped last: the nodes' files live here.
    dir: TempDir,
}

pub(crate) fn bind() -> anyhow::Result<(TcpListener, UdpSocket)> {
    let tcp = TcpListener::bind("127.0.0.1:0").context("binding TCP")?;
    let udp = UdpSocket::bind("127.0.0.1:0").context("binding UDP")?;
    Ok((tcp, udp))
}

/// Polls `url` until it answers 2xx.
pub(crate) async fn wait_ready(client: &reqwest::Client, url: &str) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + STARTUP;
    loop {
        match client.get(url).send().await {
            Ok(r) if r.status().is_success() => return Ok(()),
            Ok(r) if tokio::time::Instant::now() >= deadline => bail!("{url} answered {}", r.status()),
            Err(e) if tokio::time::Instant::now() >= deadline => bail!("{url} not ready: {e}"),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

impl Cluster {
    /// Starts an origin, a tracker and `opts.agents` agents.
    pub async fn start(opts: ClusterOptions) -> anyhow::Result<Cluster> {
        init_tracing();
        let dir = tempfile::tempdir().context("creating cluster temp dir")?;
        let ca_dir = dir.path().join("ca");
        shoal_shared::tls::init_ca(&ca_dir)?;
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .context("building HTTP client")?;

        // The tracker's socket first: the origin announces to it.
        let listener = TcpListener::bind("127.0.0.1:0").context("binding tracker")?;
        let (tracker_url, tracker_tls, tracker_client) = if opts.tracker_tls {
            let tls = dir.path().join("tracker/tls");
            shoal_shared::tls::issue(&ca_dir, "tracker", Role::Tracker, &tls)?;
            let caller = dir.path().join("harness/tls");
            shoal_shared::tls::issue(&ca_dir, "harness", Role::Agent, &caller)?;
            let http = shoal_shared::tls::http::HttpTls::load(&caller, Role::Agent)?;
            let client = shoal_shared::tls::http::tracker_client(&http)?;
            (format!("https://{}", listener.local_addr()?), Some(tls), client)
        } else {
            (format!("http://{}", listener.local_addr()?), None, client.clone())
        };

        // Origin.
        let origin_tls = dir.path().join("origin/tls");
        shoal_shared::tls::issue(&ca_dir, "origin", Role::Origin, &origin_tls)?;
        let origin_data = opts.origin_data.clone().unwrap_or_else(|| dir.path().join("origin/data"));
        let mut config = shoal_origin::Config::new(origin_data, origin_tls);
        config.piece_length = opts.piece_length;
        config.send_timeout = opts.send_timeout;
        config.max_upload_bytes = opts.max_upload_bytes.map(ByteRate);
        config.upload_token = opts.upload_token.clone();
        config.tracker = vec![tracker_url.clone()];
        if let Some(up) = &opts.upstream {
            config.upstream = up.urls.clone();
            config.upstream_auth = up.auth_file.clone();
            config.upstream_helper_path = up.helper_path.as_ref().map(|p| p.display().to_string());
            config.upstream_ca = up.ca_file.clone();
            config.tag_ttl = up.tag_ttl;
            config.upstream_stall = up.stall;
            config.prefetch_sync = up.prefetch_sync;
            config.prefetch_max_size = up.prefetch_max_size;
        }
        let (http, peer) = bind()?;
        let origin_url = format!("http://{}", http.local_addr()?);
        if opts.origin_internal && !opts.tracker_tls {
            bail!("origin_internal needs tracker_tls: the tracker calls the internal listener with its certificate");
        }
        let internal = opts.origin_internal.then(|| TcpListener::bind("127.0.0.1:0")).transpose()?;
        let origin_internal_url =
            internal.as_ref().map(|l| l.local_addr().map(|a| format!("https://{a}"))).transpose()?;
        // What the tracker is told (`--origin`): the internal listener when there is one.
        let tracker_origin_url = origin_internal_url.clone().unwrap_or_else(|| origin_url.clone());
        let origin_peer = peer.local_addr()?;
        let origin_shutdown = CancellationToken::new();
        let origin_task = tokio::spawn({
            let shutdown = origin_shutdown.clone();
            async move {
                if let Err(e) =
                    shoal_origin::run(config, shoal_origin::Listeners { http, peer, internal }, shutdown)
                        .await
                {
                    tracing::error!(cause = %e, "origin failed");
                }
            }
        });

        // Tracker.
        let tracker_shutdown = CancellationToken::new();
        // With an internal listener the tracker has no token: its certificate stands in.
        let tracker_token = opts.upload_token.as_deref().filter(|_| origin_internal_url.is_none());
        let tracker_task = spawn_tracker(
            std::slice::from_ref(&tracker_origin_url),
            tracker_token,
            tracker_tls.clone(),
            listener,
            tracker_shutdown.clone(),
        );

        let mut cluster = Cluster {
            origin_url,
            origin_internal_url,
            tracker_origin_url,
            origin_peer,
            tracker_url,
            agents: Vec::new(),
            ca_dir,
            client,
            tracker_client,
            tracker_tls,
            options: opts.clone(),
            origin_shutdown,
            origin_task: Some(origin_task),
            tracker_shutdown,
            tracker_task: Some(tracker_task),
            dir,
        };
        wait_ready(&cluster.client, &format!("{}/healthz", cluster.origin_url)).await?;
        wait_ready(&cluster.tracker_client, &format!("{}/healthz", cluster.tracker_url)).await?;
        for _ in 0..opts.agents {
            cluster.start_extra_agent(None).await?;
        }
        Ok(cluster)
    }

    /// The cluster's temporary directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Starts one more agent and returns its index in [`Cluster::agents`]. With
    /// `tls_dir_override`, the agent uses that TLS directory instead of a certificate from
    /// the cluster CA.
    pub async fn start_extra_agent(&mut self, tls_dir_override: Option<PathBuf>) -> anyhow::Result<usize> {
        let index = self.agents.len();
        let base = self.dir.path().join(format!("agent-{index}"));
        let tls = match tls_dir_override {
            Some(t) => t,
            None => {
                let tls = base.join("tls");
                shoal_shared::tls::issue(&self.ca_dir, &format!("agent-{index}"), Role::Agent, &tls)?;
                tls
            }
        };
        let node = self.launch_agent(index, base.join("data"), tls, &AgentOptions::default()).await?;
        self.agents.push(node);
        Ok(index)
    }

    /// Starts one more agent with `opts` and returns its index in [`Cluster::agents`].
    pub async fn start_agent(&mut self, opts: AgentOptions) -> anyhow::Result<usize> {
        let index = self.agents.len();
        let base = self.dir.path().join(format!("agent-{index}"));
        let tls = base.join("tls");
        shoal_shared::tls::issue(&self.ca_dir, &format!("agent-{index}"), Role::Agent, &tls)?;
        let data = opts.data_dir.clone().unwrap_or_else(|| base.join("data"));
        let node = self.launch_agent(index, data, tls, &opts).await?;
        self.agents.push(node);
        Ok(index)
    }

    /// Stops agent `index` and starts it again on the same data and certificate (new
    /// ports), with `opts`.
    pub async fn restart_agent(&mut self, index: usize, opts: AgentOptions) -> anyhow::Result<()> {
        let node = self.agents.get_mut(index).ok_or_else(|| anyhow!("no agent {index}"))?;
        node.stop().await.with_context(|| format!("stopping agent {index} to restart it"))?;
        let (data, tls) = (node.data_dir.clone(), node.tls_dir.clone());
        self.agents[index] = self.launch_agent(index, data, tls, &opts).await?;
        Ok(())
    }

    async fn launch_agent(
        &self,
        index: usize,
        data_dir: PathBuf,
        tls: PathBuf,
        opts: &AgentOptions,
    ) -> anyhow::Result<AgentNode> {
        let trackers = vec![self.tracker_url.clone()];
        launch_agent(index, data_dir, tls, trackers, &self.options, opts, &self.client).await
    }

    /// The origin's TLS directory (hand it a new `crl.pem` to revoke a caller).
    pub fn origin_tls_dir(&self) -> PathBuf {
        self.dir.path().join("origin/tls")
    }

    /// Stops the tracker (losing everything it learnt) and starts a fresh one on the same
    /// address.
    pub async fn restart_tracker(&mut self, down_for: Duration) -> anyhow::Result<()> {
        let origins = vec![self.tracker_origin_url.clone()];
        self.restart_tracker_with(down_for, origins).await
    }

    /// [`restart_tracker`](Self::restart_tracker) with other `--origin` URLs (say, one that
    /// lies about its peer address).
    pub async fn restart_tracker_with(
        &mut self,
        down_for: Duration,
        origins: Vec<String>,
    ) -> anyhow::Result<()> {
        self.stop_tracker().await;
        tokio::time::sleep(down_for).await;
        self.start_tracker(origins).await
    }

    /// Stops the tracker and waits until its socket is closed.
    pub async fn stop_tracker(&mut self) {
        self.tracker_shutdown.cancel();
        if let Some(task) = self.tracker_task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
    }

    /// Starts a fresh tracker on the stopped one's address, asking `origins`.
    pub async fn start_tracker(&mut self, origins: Vec<String>) -> anyhow::Result<()> {
        let addr = self.tracker_url.split_once("://").map_or(&*self.tracker_url, |(_, a)| a).to_owned();
        let deadline = tokio::time::Instant::now() + STARTUP;
        let listener = loop {
            match TcpListener::bind(&addr) {
                Ok(l) => break l,
                Err(e) if tokio::time::Instant::now() >= deadline => bail!("rebinding tracker {addr}: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        self.tracker_shutdown = CancellationToken::new();
        let token = self.options.upload_token.clone().filter(|_| self.origin_internal_url.is_none());
        let (tls, shutdown) = (self.tracker_tls.clone(), self.tracker_shutdown.clone());
        self.tracker_task = Some(spawn_tracker(&origins, token.as_deref(), tls, listener, shutdown));
        wait_ready(&self.tracker_client, &format!("{}/healthz", self.tracker_url)).await
    }

    /// Starts a peer serving `source` with a certificate from the cluster CA, and keeps
    /// announcing it to the tracker as a seeder of `digests` until it is stopped.
    pub async fn start_rogue_peer<S: PieceSource>(
        &self,
        name: &str,
        source: S,
        digests: Vec<Digest>,
    ) -> anyhow::Result<RoguePeer> {
        let tls = self.dir.path().join(format!("rogue-{name}"));
        shoal_shared::tls::issue(&self.ca_dir, name, Role::Agent, &tls)?;
        let identity = shoal_shared::tls::TlsIdentity::load(&tls)?;
        let socket = UdpSocket::bind("127.0.0.1:0").context("binding UDP")?;
        let addr = socket.local_addr()?;
        let endpoint = shoal_shared::tls::endpoint(socket, &identity)?;
        let shutdown = CancellationToken::new();
        let stats = Arc::new(PeerStats::default());
        let server = tokio::spawn(shoal_shared::peer::serve(
            endpoint,
            Arc::new(source),
            stats.clone(),
            shoal_shared::peer::UploadLimits { budget: 64 << 20, queue: 16 },
            Default::default(),
            shutdown.clone(),
        ));
        // The guard first: if the announce below fails, dropping it stops the server.
        let mut peer = RoguePeer { addr, stats, shutdown: shutdown.clone(), tasks: vec![server] };
        let http = shoal_shared::tls::http::HttpTls::new(&identity)?;
        let tracker = TrackerClient::with_tls(std::slice::from_ref(&self.tracker_url), &http)?;
        for digest in &digests {
            tracker.announce(&Announce { digest: *digest, peer: addr, complete: true }).await?;
        }
        let announcer = tokio::spawn({
            let shutdown = shutdown.clone();
            async move {
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                    for digest in &digests {
                        let _ =
                            tracker.announce(&Announce { digest: *digest, peer: addr, complete: true }).await;
                    }
                }
            }
        });
        peer.tasks.push(announcer);
        Ok(peer)
    }

    /// Generates an OCI layout (see [`generate_oci_layout`]) and pushes it to the origin as
    /// `tag` (`name:tag`).
    pub async fn push_image(
        &self,
        tag: &str,
        layer_sizes: &[usize],
        seed: u64,
    ) -> anyhow::Result<GeneratedImage> {
        let (_, short) = tag.rsplit_once(':').ok_or_else(|| anyhow!("{tag:?} must be NAME:TAG"))?;
        let layout = tempfile::tempdir_in(self.dir.path()).context("layout dir")?;
        let (dir, short, sizes) = (layout.path().to_path_buf(), short.to_owned(), layer_sizes.to_vec());
        let image = tokio::task::spawn_blocking(move || generate_oci_layout(&dir, &short, &sizes, seed))
            .await
            .context("generator task")??;
        let source = shoal_origin::push::Source::Oci {
            dir: layout.path().to_path_buf(),
            reference: Some(tag.rsplit_once(':').map(|(_, t)| t.to_owned()).unwrap_or_default()),
        };
        let report = shoal_origin::push::push_with_token(
            &self.origin_url,
            self.options.upload_token.as_deref(),
            &source,
            tag,
            shoal_origin::push::Progress::Quiet,
        )
        .await?;
        ensure!(
            report.root.to_string() == image.manifest,
            "push reported root {} but the manifest is {}",
            report.root,
            image.manifest
        );
        Ok(image)
    }

    /// The value of counter `name` (e.g. `shoal_peer_pieces_served_total`) on the origin.
    pub async fn origin_counter(&self, name: &str) -> anyhow::Result<u64> {
        scrape_counter(&self.client, &format!("{}/metrics", self.origin_url), name).await
    }

    /// Stops the origin and waits until its sockets are closed.
    pub async fn stop_origin(&mut self) {
        self.origin_shutdown.cancel();
        if let Some(task) = self.origin_task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
    }
}

/// A peer started by [`Cluster::start_rogue_peer`]; stopped when dropped.
#[derive(Debug)]
pub struct RoguePeer {
    /// Its QUIC address.
    pub addr: SocketAddr,
    /// What its server counted.
    pub stats: Arc<PeerStats>,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for RoguePeer {
    fn drop(&mut self) {
        self.shutdown.cancel();
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn spawn_tracker(
    origins: &[String],
    origin_token: Option<&str>,
    tls: Option<PathBuf>,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    let mut config = shoal_tracker::Config::new(origins.to_vec());
    config.origin_token = origin_token.map(str::to_owned);
    config.tls = tls;
    config.announce_interval = 2;
    tokio::spawn(async move {
        if let Err(e) = shoal_tracker::run(config, listener, shutdown).await {
            tracing::error!(cause = %e, "tracker failed");
        }
    })
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for agent in &self.agents {
            agent.shutdown.cancel();
        }
        self.tracker_shutdown.cancel();
        self.origin_shutdown.cancel();
    }
}

/// Scrapes a Prometheus text endpoint and returns the sum of the samples of `name` (0 when
/// absent).
pub async fn scrape_counter(client: &reqwest::Client, url: &str, name: &str) -> anyhow::Result<u64> {
    let resp = client.get(url).send().await.with_context(|| format!("GET {url}"))?;
    ensure!(resp.status().is_success(), "GET {url}: {}", resp.status());
    let text = resp.text().await?;
    Ok(parse_counter(&text, name))
}

/// Sums the samples of metric `name` in Prometheus text format.
pub fn parse_counter(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let value = if rest.starts_with('{') { rest.rsplit_once('}')?.1 } else { rest };
            if !value.starts_with(' ') {
                return None;
            }
            let value = value.split_whitespace().next()?;
            value.parse::<f64>().ok().map(|v| v as u64)
        })
        .sum()
}

/// What [`pull_image`] fetched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PulledImage {
    /// Digest of the manifest bytes (checked against `Docker-Content-Digest`).
    pub manifest_digest: String,
    /// The manifest's `Content-Type`.
    pub media_type: String,
    /// `(digest, size)` of the config, then of every layer.
    pub blobs: Vec<(String, u64)>,
    /// Manifest bytes plus every blob's bytes.
    pub total_bytes: u64,
}

fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// GETs a blob, streaming it through sha256, and checks digest and size.
pub async fn fetch_blob(
    client: &reqwest::Client,
    registry_url: &str,
    name: &str,
    digest: &str,
    size: Option<u64>,
) -> anyhow::Result<u64> {
    fetch_blob_in(client, registry_url, name, digest, size, "").await
}

/// [`fetch_blob`] with a query (`?ns=REGISTRY`, as containerd's mirror requests carry).
pub async fn fetch_blob_in(
    client: &reqwest::Client,
    registry_url: &str,
    name: &str,
    digest: &str,
    size: Option<u64>,
    query: &str,
) -> anyhow::Result<u64> {
    let url = format!("{registry_url}/v2/{name}/blobs/{digest}{query}");
    let resp = client.get(&url).send().await.with_context(|| format!("GET {url}"))?;
    let status = resp.status();
    if !status.is_success() {
        let body = resp.text().await.unwrap_or_default();
        bail!("GET {url}: {status}: {body}");
    }
    let length = resp.content_length();
    let mut hash = Sha256::new();
    let mut got = 0u64;
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.with_context(|| format!("reading {url}"))?;
        hash.update(&chunk);
        got += chunk.len() as u64;
    }
    let actual = format!("sha256:{}", hex::encode(hash.finalize()));
    ensure!(actual == digest, "{url}: content hashes to {actual}");
    if let Some(len) = length {
        ensure!(len == got, "{url}: Content-Length {len} but {got} bytes");
    }
    if let Some(size) = size {
        ensure!(size == got, "{url}: descriptor says {size} bytes, got {got}");
    }
    Ok(got)
}

/// A client that sends `user:password` (HTTP Basic) on every request, as containerd does to
/// a registry it holds credentials for.
pub fn basic_auth_client(user: &str, password: &str) -> reqwest::Client {
    use base64::Engine as _;
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("Authorization", format!("Basic {basic}").parse().expect("header"));
    reqwest::Client::builder().default_headers(headers).build().expect("client")
}

/// Pulls `name:tag` from a registry like a container runtime would: the manifest, then the
/// config and every layer, verifying each digest (and size against its descriptor).
pub async fn pull_image(
    client: &reqwest::Client,
    registry_url: &str,
    name: &str,
    tag: &str,
) -> anyhow::Result<PulledImage> {
    pull_image_in(client, registry_url, name, tag, "").await
}

/// [`pull_image`] with a query on every request (`?ns=REGISTRY`, as containerd's mirror
/// requests carry).
pub async fn pull_image_in(
    client: &reqwest::Client,
    registry_url: &str,
    name: &str,
    tag: &str,
    query: &str,
) -> anyhow::Result<PulledImage> {
    let url = format!("{registry_url}/v2/{name}/manifests/{tag}{query}");
    let resp = client
        .get(&url)
        .header("Accept", MANIFEST_ACCEPT)
        .send()
        .await
        .with_context(|| format!("GET {url}"))?;
    let status = resp.status();
    if !status.is_success() {
        let body = resp.text().await.unwrap_or_default();
        bail!("GET {url}: {status}: {body}");
    }
    let header = |h: &str| resp.headers().get(h).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let media_type = header("content-type").unwrap_or_default();
    let claimed = header("docker-content-digest");
    let bytes = resp.bytes().await.with_context(|| format!("reading {url}"))?;
    let manifest_digest = sha256_digest(&bytes);
    ensure!(
        claimed.as_deref() == Some(manifest_digest.as_str()),
        "{url}: Docker-Content-Digest {claimed:?} but the manifest hashes to {manifest_digest}"
    );
    if let Ok(reference) = tag.parse::<shoal_shared::digest::Digest>() {
        ensure!(reference.to_string() == manifest_digest, "{url}: manifest does not match its digest");
    }
    let manifest: serde_json::Value = serde_json::from_slice(&bytes).context("manifest is not JSON")?;
    ensure!(manifest["schemaVersion"] == 2, "{url}: not a schema 2 manifest");
    let mut descriptors = Vec::new();
    descriptors.push(&manifest["config"]);
    if let Some(layers) = manifest["layers"].as_array() {
        descriptors.extend(layers);
    } else {
        bail!("{url}: manifest has no layers (an index is not supported here)");
    }
    let mut blobs = Vec::new();
    let mut total = bytes.len() as u64;
    for d in descriptors {
        let digest = d["digest"].as_str().ok_or_else(|| anyhow!("descriptor without digest"))?;
        let size = d["size"].as_u64();
        let got = fetch_blob_in(client, registry_url, name, digest, size, query).await?;
        blobs.push((digest.to_owned(), got));
        total += got;
    }
    Ok(PulledImage { manifest_digest, media_type, blobs, total_bytes: total })
}

/// Pieces of a blob of `size` bytes at `piece_length`.
pub fn pieces(size: u64, piece_length: u32) -> u64 {
    size.div_ceil(u64::from(piece_length))
}

/// Total pieces of every blob of `image` (manifest, config, layers) at `piece_length`;
/// sizes come from the manifest's descriptors.
pub fn image_pieces(image: &GeneratedImage, piece_length: u32) -> anyhow::Result<u64> {
    let manifest: serde_json::Value = serde_json::from_slice(&image.manifest_bytes)?;
    let config_len = manifest["config"]["size"].as_u64().ok_or_else(|| anyhow!("config without size"))?;
    let mut total =
        pieces(image.manifest_bytes.len() as u64, piece_length) + pieces(config_len, piece_length);
    total += image.layers.iter().map(|(_, size)| pieces(*size, piece_length)).sum::<u64>();
    Ok(total)
}

/// Starts agent `index` on its own runtime (thread), asking `trackers`, and waits until its
/// registry answers.
pub(crate) async fn launch_agent(
    index: usize,
    data_dir: PathBuf,
    tls: PathBuf,
    trackers: Vec<String>,
    cluster: &ClusterOptions,
    opts: &AgentOptions,
    client: &reqwest::Client,
) -> anyhow::Result<AgentNode> {
    let mut config = shoal_agent::Config::new(data_dir.clone(), tls.clone(), trackers);
    config.progress_timeout = cluster.progress_timeout;
    config.send_timeout = cluster.send_timeout;
    config.egress_limit = ByteRate(opts.egress_limit);
    config.ingress_limit = ByteRate(opts.ingress_limit);
    // The agents reach the origin's upstreams where it does (checks of clients' credentials
    // for private content).
    if let Some(up) = &cluster.upstream {
        config.upstream = up.urls.clone();
    }
    if let Some(bytes) = opts.cache_size {
        config.cache_size = shoal_shared::config::DiskShare::Bytes(bytes);
    }
    if let Some(secs) = opts.drain_timeout {
        config.drain_timeout = shoal_shared::config::Span(Duration::from_secs(secs));
    }
    let (registry, peer) = bind()?;
    let registry_url = format!("http://{}", registry.local_addr()?);
    let peer_addr = peer.local_addr()?;
    let shutdown = CancellationToken::new();
    let thread = std::thread::Builder::new().name(format!("agent-{index}")).spawn({
        let shutdown = shutdown.clone();
        move || {
            let runtime =
                match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
                    Ok(r) => r,
                    Err(e) => return tracing::error!(agent = index, cause = %e, "agent runtime"),
                };
            let run =
                shoal_agent::run(config, shoal_agent::Listeners { registry, peer, metrics: None }, shutdown);
            if let Err(e) = runtime.block_on(run) {
                tracing::error!(agent = index, cause = %e, "agent failed");
            }
            // Ends the tasks still running (downloads), as a process exit would.
            runtime.shutdown_timeout(Duration::from_secs(5));
        }
    })?;
    if let Err(e) = wait_ready(client, &format!("{registry_url}/v2/")).await {
        // Not left running behind the error (its thread ends on its own).
        shutdown.cancel();
        return Err(e.context(format!("agent {index} did not start")));
    }
    Ok(AgentNode { registry_url, peer_addr, shutdown, data_dir, tls_dir: tls, thread: Some(thread) })
}

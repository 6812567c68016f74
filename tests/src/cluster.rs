//! In-process cluster harness: one origin, one tracker and N agents, each on its own
//! loopback listeners, sharing a private CA in a temporary directory.
//!
//! [`Cluster::start`] returns once every HTTP endpoint answers; dropping the [`Cluster`]
//! cancels every node. Each agent runs on its own runtime (its own thread), so stopping one
//! ends its downloads as a killed process would, and it can be restarted on the same data.
//! Fault injection: [`Cluster::restart_agent`], [`Cluster::restart_tracker`],
//! [`Cluster::stop_origin`], and [`Cluster::start_rogue_peer`] for a peer that misbehaves. [`pull_image`] is an independent registry client that pulls an image
//! the way containerd would and verifies every digest.
//!
//! This file owns the cluster itself (start, the tracker and origin, stop); the options are
//! in `options`, the agents (each on its own thread) in `agent`, the misbehaving peer in
//! `rogue`, and the client side (pulls, blob fetches, counters) in `client`.

mod agent;
mod client;
mod options;
mod rogue;

pub(crate) use agent::launch_agent;
pub use agent::AgentNode;
pub use client::{
    basic_auth_client, fetch_blob, fetch_blob_in, image_pieces, parse_counter, pieces, pull_image,
    pull_image_in, scrape_counter, PulledImage, MANIFEST_ACCEPT,
};
pub use options::{AgentOptions, ClusterOptions, UpstreamOptions};
pub use rogue::RoguePeer;

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context as _};
use shoal_shared::ratelimit::ByteRate;
use shoal_shared::tls::Role;
use tempfile::TempDir;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::image::{generate_oci_layout, GeneratedImage};

/// How long a node may take to answer its first HTTP request.
const STARTUP: Duration = Duration::from_secs(15);

/// Initialises tracing for tests (once; `RUST_LOG` picks the filter, default `warn`).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
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

//! In-process harness for a cluster without a single point of failure: N origins forming a
//! ring (`--cluster`, `--replicas`), M trackers that know the ring, and agents that use every
//! tracker. Any origin or tracker can be stopped (and an origin started again on the same
//! address and data) to test fail-over and repair.

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use shoal_shared::tls::Role;
use tempfile::TempDir;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::cluster::{launch_agent, wait_ready, AgentNode, AgentOptions, ClusterOptions};
use crate::image::{generate_oci_layout, GeneratedImage};

/// What to start.
#[derive(Debug, Clone)]
pub struct RingOptions {
    pub origins: usize,
    pub trackers: usize,
    pub agents: usize,
    pub replicas: usize,
    /// The origins' piece length.
    pub piece_length: u32,
    /// Per origin, the members it is told about (`--cluster`); `None`: every origin. For
    /// tests of inconsistent membership.
    pub membership: Option<Vec<Vec<usize>>>,
    /// The origins' `--handoff-grace`.
    pub handoff_grace: Duration,
    /// An upstream registry the origins pull through from (`--upstream`).
    pub upstream: Option<String>,
    /// The origins' durable store (`--store`), shared by all of them; the `AWS_*`
    /// environment must be set before the cluster starts for an `s3://` one.
    pub store: Option<String>,
    /// Trackers find the origins by this `dns:NAME:PORT` instead of their URLs (`{port}`
    /// stands for origin 0's HTTP port).
    pub tracker_origins: Option<String>,
    /// Origins get internal listeners (`--internal`, mutual TLS) and every ring member and
    /// tracker names them by those (`https://`); trackers serve with `--tls`.
    pub internal: bool,
}

impl Default for RingOptions {
    fn default() -> Self {
        Self {
            origins: 3,
            trackers: 2,
            agents: 3,
            replicas: 2,
            piece_length: 1 << 20,
            membership: None,
            handoff_grace: Duration::from_secs(3600),
            upstream: None,
            store: None,
            tracker_origins: None,
            internal: false,
        }
    }
}

/// One origin of the ring.
#[derive(Debug)]
pub struct OriginNode {
    /// The public port (pushes, clients).
    pub url: String,
    /// The id other members and trackers know it by: its internal listener's URL with
    /// `internal`, else [`url`](Self::url).
    pub member: String,
    internal: Option<SocketAddr>,
    pub peer: SocketAddr,
    pub data: PathBuf,
    tls: PathBuf,
    members: Vec<String>,
    shutdown: CancellationToken,
    task: Option<JoinHandle<()>>,
}

/// One tracker.
#[derive(Debug)]
pub struct TrackerNode {
    pub url: String,
    shutdown: CancellationToken,
    task: Option<JoinHandle<()>>,
}

/// The running ring cluster. Dropping it stops every node.
#[derive(Debug)]
pub struct RingCluster {
    pub origins: Vec<OriginNode>,
    pub trackers: Vec<TrackerNode>,
    pub agents: Vec<AgentNode>,
    pub client: reqwest::Client,
    pub options: RingOptions,
    dir: TempDir,
}

/// The upload token every origin of the ring takes.
pub const TOKEN: &str = "ring-test-token";

impl RingCluster {
    pub async fn start(options: RingOptions) -> anyhow::Result<Self> {
        crate::cluster::init_tracing();
        let dir = tempfile::tempdir().context("temp dir")?;
        let ca = dir.path().join("ca");
        shoal_shared::tls::init_ca(&ca)?;
        let client = reqwest::Client::builder().timeout(Duration::from_secs(60)).build()?;
        let mut listeners = Vec::new();
        for _ in 0..options.origins {
            let http = TcpListener::bind("127.0.0.1:0")?;
            let peer = UdpSocket::bind("127.0.0.1:0")?;
            let internal = options.internal.then(|| TcpListener::bind("127.0.0.1:0")).transpose()?;
            listeners.push((http, peer, internal));
        }
        let public: Vec<String> = listeners
            .iter()
            .map(|(h, _, _)| h.local_addr().map(|a| format!("http://{a}")))
            .collect::<Result<_, _>>()?;
        // Ring ids: the internal listeners when there are some.
        let urls: Vec<String> = listeners
            .iter()
            .zip(&public)
            .map(|((_, _, i), p)| match i {
                Some(l) => l.local_addr().map(|a| format!("https://{a}")),
                None => Ok(p.clone()),
            })
            .collect::<Result<_, _>>()?;
        let mut origins = Vec::new();
        for (i, (http, peer, internal)) in listeners.into_iter().enumerate() {
            let tls = dir.path().join(format!("origin-{i}/tls"));
            shoal_shared::tls::issue(&ca, &format!("origin-{i}"), Role::Origin, &tls)?;
            let members = match &options.membership {
                Some(m) => m[i].iter().map(|&j| urls[j].clone()).collect(),
                None => urls.clone(),
            };
            let mut node = OriginNode {
                url: public[i].clone(),
                member: urls[i].clone(),
                internal: internal.as_ref().map(TcpListener::local_addr).transpose()?,
                peer: peer.local_addr()?,
                data: dir.path().join(format!("origin-{i}/data")),
                tls,
                members,
                shutdown: CancellationToken::new(),
                task: None,
            };
            node.task = Some(spawn_origin(&node, &options, http, peer, internal));
            origins.push(node);
        }
        let mut trackers = Vec::new();
        // With internal listeners the trackers call them with their certificates, so they
        // serve with --tls too; the harness asks them as an agent.
        let tracker_client = if options.internal {
            let caller = dir.path().join("harness/tls");
            shoal_shared::tls::issue(&ca, "harness", Role::Agent, &caller)?;
            shoal_shared::tls::http::tracker_client(&shoal_shared::tls::http::HttpTls::load(
                &caller,
                Role::Agent,
            )?)?
        } else {
            client.clone()
        };
        for t in 0..options.trackers {
            let listener = TcpListener::bind("127.0.0.1:0")?;
            let tls = options.internal.then(|| dir.path().join(format!("tracker-{t}/tls")));
            if let Some(tls) = &tls {
                shoal_shared::tls::issue(&ca, &format!("tracker-{t}"), Role::Tracker, tls)?;
            }
            let scheme = if tls.is_some() { "https" } else { "http" };
            let url = format!("{scheme}://{}", listener.local_addr()?);
            let shutdown = CancellationToken::new();
            let origins = match &options.tracker_origins {
                Some(dns) => {
                    let port = origins[0].url.rsplit(':').next().unwrap_or_default().to_owned();
                    vec![dns.replace("{port}", &port)]
                }
                None => urls.clone(),
            };
            let task = spawn_tracker(&origins, options.replicas, tls, listener, shutdown.clone());
            trackers.push(TrackerNode { url, shutdown, task: Some(task) });
        }
        for o in &origins {
            wait_ready(&client, &format!("{}/healthz", o.url)).await?;
        }
        for t in &trackers {
            wait_ready(&tracker_client, &format!("{}/healthz", t.url)).await?;
        }
        let tracker_urls: Vec<String> = trackers.iter().map(|t| t.url.clone()).collect();
        let mut agents = Vec::new();
        let defaults = ClusterOptions::default();
        for i in 0..options.agents {
            let base = dir.path().join(format!("agent-{i}"));
            let tls = base.join("tls");
            shoal_shared::tls::issue(&ca, &format!("agent-{i}"), Role::Agent, &tls)?;
            let node = launch_agent(
                i,
                base.join("data"),
                tls,
                tracker_urls.clone(),
                &defaults,
                &AgentOptions::default(),
                &client,
            )
            .await?;
            agents.push(node);
        }
        Ok(Self { origins, trackers, agents, client, options, dir })
    }

    /// The cluster's temporary directory.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Generates an image and pushes it through origin `via` as `tag` (`name:tag`).
    pub async fn push_image(
        &self,
        via: usize,
        tag: &str,
        layer_sizes: &[usize],
        seed: u64,
    ) -> anyhow::Result<GeneratedImage> {
        let (_, short) = tag.rsplit_once(':').context("NAME:TAG")?;
        let layout = tempfile::tempdir_in(self.dir.path())?;
        let (path, short, sizes) = (layout.path().to_path_buf(), short.to_owned(), layer_sizes.to_vec());
        let image =
            tokio::task::spawn_blocking(move || generate_oci_layout(&path, &short, &sizes, seed)).await??;
        let source = shoal_origin::push::Source::Oci {
            dir: layout.path().to_path_buf(),
            reference: tag.rsplit_once(':').map(|(_, t)| t.to_owned()),
        };
        shoal_origin::push::push_with_token(
            &self.origins[via].url,
            Some(TOKEN),
            &source,
            tag,
            shoal_origin::push::Progress::Quiet,
        )
        .await?;
        Ok(image)
    }

    /// Stops origin `i` and waits until its sockets are closed.
    pub async fn stop_origin(&mut self, i: usize) {
        let node = &mut self.origins[i];
        node.shutdown.cancel();
        if let Some(task) = node.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
    }

    /// Starts origin `i` again on its address and data.
    pub async fn restart_origin(&mut self, i: usize) -> anyhow::Result<()> {
        let addr = self.origins[i].url.trim_start_matches("http://").to_owned();
        let http = TcpListener::bind(&addr).with_context(|| format!("rebinding {addr}"))?;
        let peer = UdpSocket::bind(self.origins[i].peer)?;
        let internal = self.origins[i].internal.map(TcpListener::bind).transpose()?;
        self.origins[i].shutdown = CancellationToken::new();
        let task = spawn_origin(&self.origins[i], &self.options, http, peer, internal);
        self.origins[i].task = Some(task);
        wait_ready(&self.client, &format!("{}/healthz", self.origins[i].url)).await
    }

    /// Stops tracker `i`.
    pub async fn stop_tracker(&mut self, i: usize) {
        let node = &mut self.trackers[i];
        node.shutdown.cancel();
        if let Some(task) = node.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
    }

    /// The owners of `item` (a digest, a repository name) as the origins rank them, best
    /// first (every origin up).
    pub fn owners(&self, item: &str) -> Vec<usize> {
        let members: Vec<shoal_shared::ring::Member> =
            self.origins.iter().map(|o| shoal_shared::ring::Member::new(o.member.clone())).collect();
        let key = shoal_shared::ring::RingKey::default();
        let mut owners = shoal_shared::ring::rank(&key, &members, item.as_bytes());
        owners.truncate(self.options.replicas);
        owners.sort_unstable();
        owners
    }

    /// Which origins hold blob `digest` on disk.
    pub fn holders(&self, digest: &str) -> Vec<usize> {
        let hex = digest.trim_start_matches("sha256:");
        (0..self.origins.len()).filter(|&i| self.origins[i].data.join("blobs").join(hex).exists()).collect()
    }
}

fn spawn_origin(
    node: &OriginNode,
    options: &RingOptions,
    http: TcpListener,
    peer: UdpSocket,
    internal: Option<TcpListener>,
) -> JoinHandle<()> {
    let mut config = shoal_origin::Config::new(node.data.clone(), node.tls.clone());
    config.piece_length = options.piece_length;
    config.upload_token = Some(TOKEN.to_owned());
    config.cluster = node.members.clone();
    config.self_url = Some(node.member.clone());
    config.replicas = options.replicas;
    config.handoff_grace = shoal_shared::config::Span(options.handoff_grace);
    config.upstream = options.upstream.iter().cloned().collect();
    config.prefetch_sync = true;
    config.store = options.store.clone();
    let shutdown = node.shutdown.clone();
    tokio::spawn(async move {
        if let Err(e) =
            shoal_origin::run(config, shoal_origin::Listeners { http, peer, internal }, shutdown).await
        {
            tracing::error!(cause = %e, "origin failed");
        }
    })
}

fn spawn_tracker(
    origins: &[String],
    replicas: usize,
    tls: Option<PathBuf>,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    let mut config = shoal_tracker::Config::new(origins.to_vec());
    // Over internal listeners the tracker's certificate stands in for the token.
    config.origin_token = tls.is_none().then(|| TOKEN.to_owned());
    config.tls = tls;
    config.announce_interval = 2;
    config.replicas = Some(replicas);
    tokio::spawn(async move {
        if let Err(e) = shoal_tracker::run(config, listener, shutdown).await {
            tracing::error!(cause = %e, "tracker failed");
        }
    })
}

impl Drop for RingCluster {
    fn drop(&mut self) {
        for a in &self.agents {
            a.shutdown.cancel();
        }
        for t in &self.trackers {
            t.shutdown.cancel();
        }
        for o in &self.origins {
            o.shutdown.cancel();
        }
    }
}

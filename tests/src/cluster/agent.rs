//! The cluster's agents: each runs on its own runtime (its own thread), so stopping one ends
//! its downloads as a killed process would, and it can be restarted on the same data and
//! certificate. [`launch_agent`] is shared with the ring harness (`ring_cluster`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use shoal_shared::ratelimit::ByteRate;
use shoal_shared::tls::Role;
use tokio_util::sync::CancellationToken;

use super::{bind, wait_ready, AgentOptions, Cluster, ClusterOptions};

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

impl Cluster {
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

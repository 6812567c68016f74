//! The Shoal agent: one per host. It presents a local, read-only OCI registry that
//! containerd pulls from, downloads blobs piece by piece from peers over mutually
//! authenticated QUIC (one download per digest however many pulls want it), verifies them,
//! and seeds what it holds to other agents.

pub mod config;
pub mod containerd;
pub mod download;
pub mod preload;
pub mod registry;
pub mod seeding;

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use actix_web::{web, App, HttpServer};
use prometheus_client::registry::Registry;
use shoal_shared::peer::{self, PeerClient, PeerStats};
use shoal_shared::ratelimit::{EgressLimited, RateLimiter};
use shoal_shared::store::{BlobStore, StoreError};
use shoal_shared::tls::{self, TlsError, TlsIdentity};
use tokio_util::sync::CancellationToken;

pub use config::Config;

/// Why the agent could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("HTTP server: {0}")]
    Http(#[from] std::io::Error),
    #[error("no tracker configured (--tracker URL)")]
    NoTracker,
}

/// The bound sockets the agent serves on.
#[derive(Debug)]
pub struct Listeners {
    pub registry: TcpListener,
    pub peer: UdpSocket,
}

impl Listeners {
    /// Binds the configured addresses.
    pub fn bind(config: &Config) -> std::io::Result<Self> {
        Ok(Self { registry: TcpListener::bind(config.registry)?, peer: UdpSocket::bind(config.peer)? })
    }
}

/// Runs the agent until `shutdown` is cancelled.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    if config.tracker.is_empty() {
        return Err(AgentError::NoTracker);
    }
    // Unfinished downloads stay on disk and resume when their blob is next asked for; their
    // pieces are checked again then, so a half-written piece is never served.
    let store = BlobStore::open(&config.data)?;
    let stale = {
        let (store, age) = (store.clone(), Duration::from_secs(config.partial_max_age));
        tokio::task::spawn_blocking(move || store.remove_stale_partials(age)).await.unwrap_or(Ok(0))?
    };
    if stale > 0 {
        tracing::info!(removed = stale, "removed stale partial downloads");
    }
    let identity = TlsIdentity::load(&config.tls)?;
    identity.require_role(tls::Role::Agent)?;
    tls::reload::log_expiry(&identity);
    let me: SocketAddr = match config.advertise_peer {
        Some(a) => a,
        None => listeners.peer.local_addr()?,
    };
    let endpoint = tls::endpoint(listeners.peer, &identity)?;
    let client_tls = tls::reload::ClientTls::new(identity.client_config()?);
    let reloader = tokio::spawn(tls::reload::watch(
        config.tls.clone(),
        tls::Role::Agent,
        endpoint.clone(),
        client_tls.clone(),
        tls::reload::RELOAD_INTERVAL,
        shutdown.clone(),
    ));
    let downloads = Arc::new(download::Downloads::new(
        store,
        shoal_shared::tracker::TrackerClient::new(&config.tracker),
        PeerClient::new(endpoint.clone())
            .with_client_tls(client_tls)
            .with_ingress_limit(RateLimiter::for_rate(config.ingress_limit)),
        download::Settings {
            me,
            progress_timeout: Duration::from_secs(config.progress_timeout.max(1)),
            seed_time: Duration::from_secs(config.seed_time),
            max_peers: config.max_peers.max(1),
        },
    ));
    let stats = PeerStats::default();
    let mut registry = Registry::default();
    stats.register(&mut registry);
    downloads.metrics.register(&mut registry);

    let peer_task = tokio::spawn(peer::serve(
        endpoint,
        Arc::new(EgressLimited::new(
            seeding::AgentSource::new(downloads.clone()),
            RateLimiter::for_rate(config.egress_limit),
        )),
        Arc::new(stats),
        peer::UploadLimits { budget: config.upload_budget.0, queue: config.upload_queue },
        shutdown.clone(),
    ));
    let announcer = tokio::spawn({
        let (downloads, shutdown) = (downloads.clone(), shutdown.clone());
        async move {
            loop {
                let wait = downloads.announce_all().await;
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    });
    let state = web::Data::new(registry::AppState {
        downloads,
        registry,
        preloads: Arc::new(tokio::sync::Semaphore::new(preload::MAX_BACKGROUND)),
    });
    let send_timeout = std::time::Duration::from_secs(config.send_timeout.max(1));
    let server = HttpServer::new(move || App::new().app_data(state.clone()).configure(registry::configure))
        .on_connect(move |conn, _| shoal_shared::http::set_send_timeout(conn, send_timeout))
        .workers(2)
        .disable_signals()
        .shutdown_timeout(2)
        .listen(listeners.registry)?
        .run();
    tracing::info!(peer = %me, trackers = ?config.tracker, "agent serving");
    let result = shoal_shared::http::run_server(server, shutdown).await;
    let _ = announcer.await;
    let _ = peer_task.await;
    let _ = reloader.await;
    result.map_err(AgentError::from)
}

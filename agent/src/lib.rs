//! The Shoal agent: one per host. It presents a local, read-only OCI registry that
//! containerd pulls from, downloads blobs piece by piece from peers over mutually
//! authenticated QUIC (one download per digest however many pulls want it), verifies them,
//! and seeds what it holds to other agents.

pub mod cache;
pub mod config;
pub mod containerd;
pub mod delivery;
pub mod download;
pub mod preload;
pub mod registry;
pub mod seeding;
pub mod status;
pub mod tenant;

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
    #[error("--upstream: {0}")]
    Upstream(String),
}

/// The bound sockets the agent serves on.
#[derive(Debug)]
pub struct Listeners {
    pub registry: TcpListener,
    pub peer: UdpSocket,
    /// The operations listener (`--metrics`), if any.
    pub metrics: Option<TcpListener>,
}

impl Listeners {
    /// Binds the configured addresses.
    pub fn bind(config: &Config) -> std::io::Result<Self> {
        Ok(Self {
            registry: TcpListener::bind(config.registry)?,
            peer: UdpSocket::bind(config.peer)?,
            metrics: config.metrics.map(TcpListener::bind).transpose()?,
        })
    }
}

/// How often the cache's TTL and watermarks are checked.
const CACHE_SWEEP: Duration = Duration::from_secs(10);
/// How long downloads and preloads get to end once responses drained at shutdown.
const TASKS_END: Duration = Duration::from_secs(5);

/// Runs the agent until `shutdown` is cancelled.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    if config.tracker.is_empty() {
        return Err(AgentError::NoTracker);
    }
    let tenants = Arc::new(tenant::Tenants::new(&config.upstream).map_err(AgentError::Upstream)?);
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
    let cache = {
        let limit = config.cache_size.bytes_of(store.filesystem_bytes()?);
        let ttl = (!config.cache_ttl.0.is_zero()).then_some(config.cache_ttl.0);
        let store = store.clone();
        let cache = tokio::task::spawn_blocking(move || cache::Cache::open(store, limit, ttl))
            .await
            .map_err(|e| StoreError::Io { path: Default::default(), source: std::io::Error::other(e) })??;
        tracing::info!(limit, used = cache.used(), blobs = cache.len(), "cache opened");
        Arc::new(cache)
    };
    let identity = TlsIdentity::load(&config.tls)?;
    identity.require_role(tls::Role::Agent)?;
    tls::reload::log_expiry(&identity);
    let me: SocketAddr = match config.advertise_peer {
        Some(a) => a,
        None => listeners.peer.local_addr()?,
    };
    let endpoint = tls::endpoint(listeners.peer, &identity)?;
    let client_tls = tls::reload::ClientTls::new(identity.client_config()?);
    // Both ends' connections, so a revocation closes the ones already open.
    let live = tls::live::LiveConnections::default();
    let reloader = tokio::spawn(tls::reload::watch(
        config.tls.clone(),
        tls::Role::Agent,
        endpoint.clone(),
        client_tls.clone(),
        live.clone(),
        tls::reload::RELOAD_INTERVAL,
        shutdown.clone(),
    ));
    // Trackers are called with the same certificate (mutual TLS when their URL is https://).
    let control_tls = tls::http::HttpTls::new(&identity)?;
    let tracker = shoal_shared::tracker::TrackerClient::with_tls(&config.tracker, &control_tls)?;
    let control_reloader = tokio::spawn(tls::reload::watch_http(
        config.tls.clone(),
        tls::Role::Agent,
        control_tls,
        tls::reload::RELOAD_INTERVAL,
        shutdown.clone(),
    ));
    let downloads = Arc::new(download::Downloads::new(
        store,
        cache.clone(),
        tracker,
        PeerClient::new(endpoint.clone())
            .with_client_tls(client_tls)
            .with_live_connections(live.clone())
            .with_ingress_limit(RateLimiter::for_rate(config.ingress_limit)),
        download::Settings {
            me,
            progress_timeout: Duration::from_secs(config.progress_timeout.max(1)),
            seed_time: Duration::from_secs(config.seed_time),
            max_peers: config.max_peers.max(1),
            cut_through: config.cut_through,
        },
    ));
    let stats = PeerStats::default();
    let mut registry = Registry::default();
    stats.register(&mut registry);
    downloads.metrics.register(&mut registry);
    cache.metrics.register(&mut registry);
    registry.sub_registry_with_prefix("shoal_agent").register(
        "tenant_checks",
        "Checks of a client's credentials for private content sent to an upstream registry",
        tenants.checks.clone(),
    );

    // Peers keep being served while local responses drain after a SIGTERM; they stop last.
    let peers_stop = CancellationToken::new();
    let peer_task = tokio::spawn(peer::serve(
        endpoint,
        Arc::new(EgressLimited::new(
            seeding::AgentSource::new(downloads.clone()),
            RateLimiter::for_rate(config.egress_limit),
        )),
        Arc::new(stats),
        peer::UploadLimits { budget: config.upload_budget.0, queue: config.upload_queue },
        live,
        peers_stop.clone(),
    ));
    let sweeper = tokio::spawn(shoal_shared::http::every(CACHE_SWEEP, shutdown.clone(), {
        let downloads = downloads.clone();
        move || {
            let downloads = downloads.clone();
            async move {
                let _ = tokio::task::spawn_blocking(move || downloads.sweep_cache()).await;
            }
        }
    }));
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
    let all_downloads = downloads.clone();
    let state = web::Data::new(registry::AppState {
        downloads,
        registry,
        preloads: Arc::new(tokio::sync::Semaphore::new(preload::MAX_BACKGROUND)),
        started: std::time::Instant::now(),
        me,
        tenants,
    });
    let send_timeout = std::time::Duration::from_secs(config.send_timeout.max(1));
    let drain = config.drain_timeout.0.as_secs().max(1);
    let server = {
        let state = state.clone();
        HttpServer::new(move || {
            App::new()
                .wrap(actix_web::middleware::from_fn(shoal_shared::http::request_span))
                .app_data(state.clone())
                .configure(registry::configure)
        })
        .on_connect(move |conn, _| shoal_shared::http::set_send_timeout(conn, send_timeout))
        .workers(2)
        .disable_signals()
        .shutdown_timeout(drain)
        .listen(listeners.registry)?
        .run()
    };
    let ops = match listeners.metrics {
        Some(listener) => {
            let server = HttpServer::new(move || {
                App::new().app_data(state.clone()).configure(registry::configure_ops)
            })
            .workers(1)
            .disable_signals()
            .shutdown_timeout(1)
            .listen(listener)?
            .run();
            Some(tokio::spawn(shoal_shared::http::run_server(server, shutdown.clone())))
        }
        None => None,
    };
    tracing::info!(peer = %me, trackers = ?config.tracker, "agent serving");
    // On shutdown the registry stops accepting and lets responses in flight finish (up to
    // --drain-timeout); then the peer server and the rest stop.
    let result = shoal_shared::http::run_server(server, shutdown.clone()).await;
    tracing::info!("local responses drained");
    if !all_downloads.shutdown(TASKS_END).await {
        tracing::warn!("downloads still running at shutdown were abandoned");
    }
    peers_stop.cancel();
    let _ = announcer.await;
    let _ = peer_task.await;
    let _ = reloader.await;
    let _ = control_reloader.await;
    let _ = sweeper.await;
    if let Some(ops) = ops {
        let _ = ops.await;
    }
    result.map_err(AgentError::from)
}

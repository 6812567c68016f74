//! The Shoal origin: the authoritative, content-addressed copy of every blob.
//!
//! It speaks the OCI distribution API for pushes and pulls, hands out metainfo, and seeds
//! every blob it holds to peers over mutually authenticated QUIC. [`run`] takes listeners
//! that are already bound and a shutdown token, so tests run whole clusters in one process.

pub mod api;
pub mod cluster;
pub mod config;
pub mod delete;
pub mod durable;
pub mod internal;
pub mod outcomes;
pub mod prefetch;
pub mod private;
pub mod push;
pub mod referrers;
pub mod retention;
pub mod seeder;
pub mod spread;
pub mod tags;
pub mod uploads;
pub mod upstream;

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::sync::Arc;

use actix_web::{web, App, HttpServer};
use prometheus_client::registry::Registry;
use shoal_shared::peer::{self, PeerStats};
use shoal_shared::ratelimit::ByteRate;
use shoal_shared::store::{BlobStore, StoreError};
use shoal_shared::tls::{self, TlsError, TlsIdentity};
use tokio_util::sync::CancellationToken;

pub use config::Config;

/// Upstream fills waiting to be copied to their owners (beyond it, the repair pass).
const FILL_QUEUE: usize = 4096;
/// Most upload sessions open at once.
const MAX_UPLOAD_SESSIONS: usize = 1024;
/// An upload session unused for this long is cancelled and its temp file deleted.
const UPLOAD_IDLE: std::time::Duration = std::time::Duration::from_secs(3600);

/// Why the origin could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum OriginError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("HTTP server: {0}")]
    Http(#[from] std::io::Error),
    #[error(transparent)]
    Durable(#[from] durable::DurableError),
    #[error("upstream: {0}")]
    Upstream(String),
    #[error(
        "refusing to serve on {0} without --upload-token: anyone who can reach it could push, \
         overwrite tags and fill the disk from the upstreams; set a token, listen on loopback, \
         or pass --allow-anonymous-writes"
    )]
    AnonymousWrites(SocketAddr),
    #[error("cluster: {0}")]
    Cluster(#[from] cluster::ClusterError),
    #[error(transparent)]
    Internal(#[from] internal::InternalError),
}

/// The bound sockets the origin serves on.
#[derive(Debug)]
pub struct Listeners {
    /// The public port: the registry API, plain HTTP.
    pub http: TcpListener,
    pub peer: UdpSocket,
    /// The internal listener (`--internal`): the same API over HTTPS with mutual TLS, for
    /// trackers and ring members ([`internal`]).
    pub internal: Option<TcpListener>,
}

impl Listeners {
    /// Binds the configured addresses.
    pub fn bind(config: &Config) -> std::io::Result<Self> {
        Ok(Self {
            http: TcpListener::bind(config.http)?,
            peer: UdpSocket::bind(config.peer)?,
            internal: config.internal.map(TcpListener::bind).transpose()?,
        })
    }
}

/// Runs the origin until `shutdown` is cancelled.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), OriginError> {
    let http_addr = listeners.http.local_addr()?;
    let internal_addr = listeners.internal.as_ref().map(TcpListener::local_addr).transpose()?;
    if config.upload_token.is_none() && !config.allow_anonymous_writes && !http_addr.ip().is_loopback() {
        return Err(OriginError::AnonymousWrites(http_addr));
    }
    let mut store_metrics = None;
    let store = match &config.store {
        Some(url) => match durable::connect(url, &config.data).await? {
            Some(backing) => {
                tracing::info!(store = %backing.url(), "durable store");
                let counted = Arc::new(outcomes::CountedBacking::new(backing));
                store_metrics = Some(counted.requests.clone());
                BlobStore::open_backed(&config.data, counted)?
            }
            None => BlobStore::open(&config.data)?,
        },
        None => BlobStore::open(&config.data)?,
    };
    let max_upload_bytes = match config.max_upload_bytes {
        Some(ByteRate(0)) => u64::MAX,
        Some(ByteRate(b)) => b,
        None => store.filesystem_bytes()? / 4,
    };
    let identity = TlsIdentity::load(&config.tls)?;
    identity.require_role(tls::Role::Origin)?;
    tls::reload::log_expiry(&identity);
    // `--tracker`s are called with the origin's certificate (mutual TLS when https://), ring
    // members on their internal listeners too, and the internal listener serves with it.
    let control_tls = tls::http::HttpTls::new(&identity)?;
    let trackers = shoal_shared::tracker::TrackerClient::with_tls(&config.tracker, &control_tls)?;
    let peer_addr: SocketAddr = match config.advertise_peer {
        Some(a) => a,
        None => listeners.peer.local_addr()?,
    };
    let endpoint = tls::endpoint(listeners.peer, &identity)?;
    // Spawned once nothing can fail before the server runs. The origin dials no peers; its
    // client side follows the directory all the same.
    // The seeder's connections, so a revocation closes the ones already open.
    let live = tls::live::LiveConnections::default();
    let reload = tls::reload::watch(
        config.tls.clone(),
        tls::Role::Origin,
        endpoint.clone(),
        tls::reload::ClientTls::new(identity.client_config()?),
        live.clone(),
        tls::reload::RELOAD_INTERVAL,
        shutdown.clone(),
    );
    shoal_shared::metainfo::piece_count(0, config.piece_length)
        .map_err(|e| OriginError::Http(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?;

    let mut upstreams = upstream::Upstreams::new(
        &upstream::Settings {
            urls: config.upstream.clone(),
            auth_file: config.upstream_auth.clone(),
            helper_path: config.upstream_helper_path.clone().map(Into::into),
            ca_file: config.upstream_ca.clone(),
            tag_ttl: std::time::Duration::from_secs(config.tag_ttl),
            stall: std::time::Duration::from_secs(config.upstream_stall.max(1)),
            attempts: config.upstream_attempts,
        },
        &store,
        config.piece_length,
    )
    .map_err(OriginError::Upstream)?;
    let seeder = Arc::new(seeder::Seeder::new(store.clone(), config.piece_length));
    let retention = Arc::new(retention::Retention::new(
        store.clone(),
        config.cache_size.bytes_of(store.filesystem_bytes()?),
        (!config.pull_through_retention.0.is_zero()).then_some(config.pull_through_retention.0),
        seeder.clone(),
    ));
    let seeder_for_announce = seeder.clone();
    let stats = PeerStats::default();
    let mut registry = Registry::default();
    stats.register(&mut registry);
    retention.register(&mut registry);
    upstreams.metrics.register(&mut registry);
    if let Some(requests) = store_metrics {
        registry.register(
            "shoal_origin_store_requests",
            "Requests to the durable store (--store), by operation and outcome",
            requests,
        );
    }
    let cluster = if config.cluster.is_empty() {
        None
    } else {
        // Members call each other on their internal listeners when they have one.
        let (scheme, addr) = match internal_addr {
            Some(a) => ("https", a),
            None => ("http", http_addr),
        };
        let me = match &config.self_url {
            Some(url) => url.clone(),
            // Listening on every address says nothing about which one the others dial.
            None if addr.ip().is_unspecified() => {
                return Err(OriginError::Cluster(cluster::ClusterError::NoSelf(addr)))
            }
            None => format!("{scheme}://{addr}"),
        };
        let key =
            config.ring_key.as_deref().map(shoal_shared::ring::RingKey::from_passphrase).unwrap_or_default();
        let c = cluster::Cluster::new(cluster::Settings {
            members: config.cluster.clone(),
            me,
            replicas: config.replicas,
            key,
            token: config.upload_token.clone(),
            handoff_grace: config.handoff_grace.0,
            tls: Some(control_tls.clone()),
        })
        .map_err(OriginError::Cluster)?;
        c.metrics.register(&mut registry);
        tracing::info!(
            me = c.me(),
            members = config.cluster.len(),
            replicas = config.replicas,
            "origin cluster"
        );
        Some(Arc::new(c))
    };
    // Upstream fills reach the other owners at once, not at the next repair pass.
    let fills = cluster.as_ref().map(|_| {
        let (tx, rx) = tokio::sync::mpsc::channel(FILL_QUEUE);
        upstreams.notify_fills(tx);
        rx
    });
    let state = web::Data::new(api::AppState {
        tags: tags::TagStore::new(&store),
        referrers: referrers::Referrers::new(&store),
        store,
        uploads: uploads::Uploads::new(MAX_UPLOAD_SESSIONS, max_upload_bytes),
        seeder: seeder.clone(),
        piece_length: config.piece_length,
        peer_addr,
        registry,
        upload_token: config.upload_token.clone(),
        upstreams: Arc::new(upstreams),
        prefetch_sync: config.prefetch_sync,
        prefetch_sizes: prefetch::SizeFilter { min: config.prefetch_min_size, max: config.prefetch_max_size },
        // Credentials never reach the page, even when written into a URL.
        cluster: cluster.clone(),
        retention: retention.clone(),
        upstream_names: config
            .upstream
            .iter()
            .map(|u| match (u.find("://"), u.rfind('@')) {
                (Some(scheme), Some(at)) if at > scheme => format!("{}://***{}", &u[..scheme], &u[at..]),
                _ => u.clone(),
            })
            .collect(),
        started: std::time::Instant::now(),
    });

    let peer_task = tokio::spawn(peer::serve(
        endpoint,
        seeder,
        Arc::new(stats),
        peer::UploadLimits { budget: config.upload_budget.0, queue: config.upload_queue },
        live,
        shutdown.clone(),
    ));
    let server = HttpServer::new({
        let state = state.clone();
        move || {
            App::new()
                .wrap(actix_web::middleware::from_fn(shoal_shared::http::request_span))
                .app_data(state.clone())
                .configure(api::configure)
                .configure(prefetch::configure)
        }
    })
    .on_connect({
        let timeout = std::time::Duration::from_secs(config.send_timeout.max(1));
        move |conn, _| shoal_shared::http::set_send_timeout(conn, timeout)
    })
    .workers(config.http_workers.max(1))
    .disable_signals()
    .shutdown_timeout(config.drain_timeout.0.as_secs().max(1))
    .listen(listeners.http)?
    .run();
    // The internal listener: the same routes and state, mutual TLS with the control-plane
    // certificate (reloaded below), callers authorized by their role.
    let internal_server = match listeners.internal {
        Some(listener) => Some(internal::server(
            listener,
            control_tls.clone(),
            state.clone(),
            config.http_workers,
            std::time::Duration::from_secs(config.send_timeout.max(1)),
            config.drain_timeout.0.as_secs(),
        )?),
        None => None,
    };
    let internal_task =
        internal_server.map(|s| tokio::spawn(shoal_shared::http::run_server(s, shutdown.clone())));
    let control_reload = tokio::spawn(tls::reload::watch_http(
        config.tls.clone(),
        tls::Role::Origin,
        control_tls.clone(),
        tls::reload::RELOAD_INTERVAL,
        shutdown.clone(),
    ));
    tracing::info!(peer = %peer_addr, internal = ?internal_addr, "origin serving");
    let replicator = cluster
        .clone()
        .zip(fills)
        .map(|(c, rx)| tokio::spawn(cluster::replicate_fills(c, state.store.clone(), rx, shutdown.clone())));
    let maintainer = cluster.map(|c| {
        tokio::spawn(cluster::maintain(
            c,
            state.store.clone(),
            state.tags.clone(),
            config.data.clone(),
            shutdown.clone(),
        ))
    });
    let retainer = tokio::spawn(retention::maintain(retention, shutdown.clone()));
    let upstreams = state.upstreams.clone();
    let sweeper = tokio::spawn(shoal_shared::http::every(UPLOAD_IDLE / 4, shutdown.clone(), move || {
        let state = state.clone();
        async move { state.uploads.expire(UPLOAD_IDLE).await }
    }));
    let announcer = tokio::spawn(announce_hot_blobs(
        (trackers, config.tracker.len()),
        seeder_for_announce,
        peer_addr,
        shutdown.clone(),
    ));
    let reloader = tokio::spawn(reload);
    let result = shoal_shared::http::run_server(server, shutdown).await;
    if !upstreams.shutdown(std::time::Duration::from_secs(5)).await {
        tracing::warn!("upstream fetches still running at shutdown were abandoned");
    }
    let _ = sweeper.await;
    let _ = announcer.await;
    let _ = peer_task.await;
    let _ = reloader.await;
    let _ = control_reload.await;
    if let Some(t) = internal_task {
        if let Ok(Err(e)) = t.await {
            tracing::warn!(cause = %e, "internal listener stopped with an error");
        }
    }
    let _ = retainer.await;
    if let Some(m) = maintainer {
        let _ = m.await;
    }
    if let Some(r) = replicator {
        let _ = r.await;
    }
    result.map_err(OriginError::from)
}

/// How long after its last fetch a blob is still announced.
pub(crate) const HOT_WINDOW: std::time::Duration = std::time::Duration::from_secs(600);

/// With `--tracker`: announces, as a seeder, every blob peers fetched from this origin
/// recently, so trackers list this origin even when it is not among their `--origin`s.
async fn announce_hot_blobs(
    (client, trackers): (shoal_shared::tracker::TrackerClient, usize),
    seeder: Arc<seeder::Seeder>,
    peer: SocketAddr,
    shutdown: CancellationToken,
) {
    if trackers == 0 {
        return;
    }
    let mut wait = std::time::Duration::from_secs(1);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        for digest in seeder.hot_set(HOT_WINDOW) {
            let a = shoal_shared::client::Announce { digest, peer, complete: true };
            match client.announce(&a).await {
                Ok(resp) => wait = std::time::Duration::from_secs(resp.interval.clamp(1, 300)),
                Err(e) => tracing::warn!(%digest, cause = %e, "announce to tracker failed"),
            }
        }
    }
}

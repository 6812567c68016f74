//! The Shoal tracker: tells peers who has which blob, and resolves metainfo and tags by
//! asking the origins. It holds no blob data and its state is soft: peers re-announce, so
//! a restarted tracker is whole again within one announce interval.
//!
//! With `--tls` it serves HTTPS with mutual TLS: callers prove with a cluster certificate
//! that they are agents or origins before anything is read (`shoal_shared::tls::http`), and
//! each request's certificate is checked again against the current revocation list. The
//! operations routes are also served on an optional plain listener (`--metrics`) for probes
//! and scrapers, which have no certificate.

pub mod api;
pub mod config;
pub mod origins;
pub mod swarms;

use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::{web, App, HttpServer};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use shoal_shared::tls::{self, http::HttpTls, Role, TlsError, TlsIdentity};
use tokio_util::sync::CancellationToken;

pub use config::Config;

/// Why the tracker could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum TrackerError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("HTTP server: {0}")]
    Http(#[from] std::io::Error),
    #[error(transparent)]
    Origin(#[from] origins::SetupError),
}

/// Roles that may call a tracker served with `--tls`: the nodes that announce and look up.
/// A tracker's own certificate (or any other role) is refused at the handshake.
pub const CALLERS: &[Role] = &[Role::Agent, Role::Origin];

/// The bound sockets the tracker serves on.
#[derive(Debug)]
pub struct Listeners {
    /// Announces and lookups (HTTPS with `--tls`), and the operations routes too.
    pub http: TcpListener,
    /// The plain operations listener (`--metrics`), if any.
    pub metrics: Option<TcpListener>,
}

impl Listeners {
    /// Binds the configured addresses.
    pub fn bind(config: &Config) -> std::io::Result<Self> {
        Ok(Self {
            http: TcpListener::bind(config.http)?,
            metrics: config.metrics.map(TcpListener::bind).transpose()?,
        })
    }
}

impl From<TcpListener> for Listeners {
    /// The announce listener alone (no operations listener).
    fn from(http: TcpListener) -> Self {
        Self { http, metrics: None }
    }
}

/// Runs the tracker on `listeners` until `shutdown` is cancelled. With `config.tls` it
/// serves HTTPS and admits only callers with a certificate from the cluster CA carrying
/// one of the [`CALLERS`] roles; the operations listener, if any, stays plain HTTP.
pub async fn run(
    config: Config,
    listeners: impl Into<Listeners>,
    shutdown: CancellationToken,
) -> Result<(), TrackerError> {
    let Listeners { http: listener, metrics } = listeners.into();
    let tls = match &config.tls {
        Some(dir) => {
            let identity = TlsIdentity::load(dir)?;
            identity.require_role(Role::Tracker)?;
            tls::reload::log_expiry(&identity);
            Some(HttpTls::new(&identity)?)
        }
        None => {
            let addr = listener.local_addr()?;
            if !addr.ip().is_loopback() {
                tracing::warn!(
                    %addr,
                    "serving plain HTTP beyond loopback: anyone who reaches the tracker can announce \
                     and look up; give it --tls (a certificate from `shoal-origin ca issue --role tracker`)"
                );
            }
            None
        }
    };
    let interval = Duration::from_secs(config.announce_interval.max(1));
    let swarms = Arc::new(swarms::Swarms::default());
    let announces = Counter::default();
    let mut registry = Registry::default();
    registry.register("shoal_tracker_announces", "Announces received", announces.clone());
    // `https://` origins (internal listeners) are called with the tracker's certificate.
    let mut origins = origins::Origins::new(&config.origin, config.origin_token.as_deref(), tls.as_ref())?;
    origins.resolve().await;
    if config.ring_key.is_some() || config.replicas.is_some() {
        let key =
            config.ring_key.as_deref().map(shoal_shared::ring::RingKey::from_passphrase).unwrap_or_default();
        origins = origins.with_ring(key, config.replicas.unwrap_or(2));
    }
    registry.register(
        "shoal_tracker_origin_lookups",
        "Metainfo requests sent to origins",
        origins.lookups.clone(),
    );
    let state = web::Data::new(api::AppState {
        swarms: swarms.clone(),
        origins,
        interval,
        max_peers: config.max_peers.max(1),
        trust_announced_addresses: config.trust_announced_addresses,
        announces,
        registry,
        started: Instant::now(),
    });
    let ops = match metrics {
        Some(listener) => {
            let state = state.clone();
            let server =
                HttpServer::new(move || App::new().app_data(state.clone()).configure(api::configure_ops))
                    .workers(1)
                    .disable_signals()
                    .shutdown_timeout(1)
                    .listen(listener)?
                    .run();
            Some(tokio::spawn(shoal_shared::http::run_server(server, shutdown.clone())))
        }
        None => None,
    };
    // With --tls every request is checked against the current revocation list too: a
    // keep-alive connection outlives its handshake.
    let live_tls = tls.clone().map(web::Data::new);
    let resolver_state = state.clone();
    let server = HttpServer::new(move || {
        let app = App::new()
            .wrap(actix_web::middleware::from_fn(tls::http::require_trusted_caller))
            .wrap(actix_web::middleware::from_fn(shoal_shared::http::request_span))
            .app_data(state.clone());
        match &live_tls {
            Some(t) => app.app_data(t.clone()),
            None => app,
        }
        .configure(api::configure)
    })
    .workers(2)
    .disable_signals()
    .shutdown_timeout(config.drain_timeout.0.as_secs().max(1));
    let server = match &tls {
        Some(tls) => server
            .on_connect(tls::http::record_caller)
            .listen_rustls_0_23(listener, tls.server_config(CALLERS)?)?,
        None => server.listen(listener)?,
    }
    .run();
    let reloader = tls.map(|tls| {
        tokio::spawn(tls::reload::watch_http(
            config.tls.clone().unwrap_or_default(),
            Role::Tracker,
            tls,
            tls::reload::RELOAD_INTERVAL,
            shutdown.clone(),
        ))
    });
    let sweeper = tokio::spawn(shoal_shared::http::every(interval, shutdown.clone(), move || {
        swarms.sweep(Instant::now());
        std::future::ready(())
    }));
    let resolver = tokio::spawn(shoal_shared::http::every(
        shoal_shared::members::RESOLVE_EVERY,
        shutdown.clone(),
        move || {
            let state = resolver_state.clone();
            async move {
                state.origins.resolve().await;
            }
        },
    ));
    tracing::info!(origins = ?config.origin, tls = config.tls.is_some(), "tracker serving");
    let result = shoal_shared::http::run_server(server, shutdown).await;
    let _ = sweeper.await;
    let _ = resolver.await;
    if let Some(reloader) = reloader {
        let _ = reloader.await;
    }
    if let Some(ops) = ops {
        let _ = ops.await;
    }
    Ok(result?)
}

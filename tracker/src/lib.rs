//! The Shoal tracker: tells peers who has which blob, and resolves metainfo and tags by
//! asking the origins. It holds no blob data and its state is soft: peers re-announce, so
//! a restarted tracker is whole again within one announce interval.

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
use tokio_util::sync::CancellationToken;

pub use config::Config;

/// Runs the tracker on `listener` until `shutdown` is cancelled.
pub async fn run(config: Config, listener: TcpListener, shutdown: CancellationToken) -> std::io::Result<()> {
    let interval = Duration::from_secs(config.announce_interval.max(1));
    let swarms = Arc::new(swarms::Swarms::default());
    let announces = Counter::default();
    let mut registry = Registry::default();
    registry.register("shoal_tracker_announces", "Announces received", announces.clone());
    let mut origins = origins::Origins::new(config.origin.clone(), config.origin_token.as_deref());
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
    let server = HttpServer::new(move || {
        App::new()
            .wrap(actix_web::middleware::from_fn(shoal_shared::http::request_span))
            .app_data(state.clone())
            .configure(api::configure)
    })
    .workers(2)
    .disable_signals()
    .shutdown_timeout(config.drain_timeout.0.as_secs().max(1))
    .listen(listener)?
    .run();
    let sweeper = tokio::spawn(shoal_shared::http::every(interval, shutdown.clone(), move || {
        swarms.sweep(Instant::now());
        std::future::ready(())
    }));
    tracing::info!(origins = ?config.origin, "tracker serving");
    let result = shoal_shared::http::run_server(server, shutdown).await;
    let _ = sweeper.await;
    result
}

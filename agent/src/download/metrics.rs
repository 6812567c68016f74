//! The download engine's counters, gauges and histograms, registered as `shoal_agent_*`.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

use crate::delivery::Delivered;

/// Agent counters.
#[derive(Debug, Clone)]
pub struct DownloadMetrics {
    pub started: Counter,
    pub completed: Counter,
    pub failed: Counter,
    pub pieces: Counter,
    pub bad_pieces: Counter,
    /// Pieces that arrived too slowly to be offered to peers before they were whole.
    pub held_back: Counter,
    /// Piece bytes received and not kept (the peer client's [`PeerClient::discarded`]).
    ///
    /// [`PeerClient::discarded`]: shoal_shared::peer::PeerClient::discarded
    pub discarded: Counter,
    pub damaged_blobs: Counter,
    pub active: Gauge,
    /// Peers (agents and origins) this agent holds a connection to.
    pub peers: Gauge,
    /// Bytes sent to local clients, by where they came from.
    pub delivered: Delivered,
    pub piece_seconds: Histogram,
    pub download_seconds: Histogram,
}

impl Default for DownloadMetrics {
    fn default() -> Self {
        Self {
            started: Counter::default(),
            completed: Counter::default(),
            failed: Counter::default(),
            pieces: Counter::default(),
            bad_pieces: Counter::default(),
            held_back: Counter::default(),
            discarded: Counter::default(),
            damaged_blobs: Counter::default(),
            active: Gauge::default(),
            peers: Gauge::default(),
            delivered: Delivered::default(),
            // 1 ms to ~65 s.
            piece_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 17)),
            // 10 ms to ~22 min.
            download_seconds: Histogram::new(exponential_buckets(0.01, 2.0, 18)),
        }
    }
}

impl DownloadMetrics {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("shoal_agent");
        r.register("downloads_started", "Downloads started", self.started.clone());
        r.register("downloads_completed", "Downloads completed and verified", self.completed.clone());
        r.register("downloads_failed", "Downloads that failed", self.failed.clone());
        r.register("pieces_fetched", "Verified pieces fetched from peers", self.pieces.clone());
        r.register("bad_pieces", "Pieces rejected for a bad hash or protocol error", self.bad_pieces.clone());
        r.register(
            "pieces_held_back",
            "Pieces that arrived too slowly to be offered to peers before they were whole (cut-through)",
            self.held_back.clone(),
        );
        r.register_with_unit(
            "piece_discarded",
            "Piece bytes received from peers and origins and not kept: requests that failed, were cut short or given up (an endgame copy that lost), and whole copies of pieces already held",
            Unit::Bytes,
            self.discarded.clone(),
        );
        r.register(
            "damaged_blobs",
            "Cached blobs dropped because a piece no longer matched its hash",
            self.damaged_blobs.clone(),
        );
        r.register("active_downloads", "Downloads in progress", self.active.clone());
        r.register(
            "peers",
            "Peers (agents and origins) this agent holds a connection to",
            self.peers.clone(),
        );
        r.register(
            "delivered_bytes",
            "Blob bytes sent to local clients, by where they came from (cache, peer, origin)",
            self.delivered.clone(),
        );
        r.register_with_unit(
            "piece_fetch",
            "Time to fetch and verify one piece from a peer or origin",
            Unit::Seconds,
            self.piece_seconds.clone(),
        );
        r.register_with_unit(
            "download_duration",
            "Time from a download's metainfo to its blob verified in the cache",
            Unit::Seconds,
            self.download_seconds.clone(),
        );
    }
}

//! The peer protocol over QUIC: serving pieces and fetching them.
//!
//! One bidirectional stream per request (see [`crate::wire`]). The server side is generic
//! over a [`PieceSource`], so the origin (whole blobs on disk) and the agent (its cache plus
//! downloads in progress) share the same code. The client side keeps one connection per
//! peer address, shared by every download, and returns pieces only as [`VerifiedPiece`]s.
//!
//! Bounds: request frames are at most [`wire::MAX_FRAME`] bytes and must arrive within
//! [`REQUEST_TIMEOUT`]; a malformed frame closes the whole connection; piece bodies are
//! allocated only after their length has been checked against the metainfo; concurrent piece
//! reads on the server are capped by a semaphore.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use quinn::{Connection, Endpoint, RecvStream, SendStream, VarInt};
use tokio::sync::{watch, OnceCell, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::bitfield::{Bitfield, BitfieldError};
use crate::blocks::{BlockHashes, PiecePool, PieceReceiver};
use crate::digest::Digest;
use crate::metainfo::{Metainfo, MetainfoError, VerifiedPiece};
use crate::ratelimit::RateLimiter;
use crate::tls::live::{LiveConnections, Side};
use crate::tls::PEER_SERVER_NAME;
use crate::wire::{self, FrameError, Refusal, Request, Response, MAX_HAVES, PROTOCOL_VERSION};

/// How long a peer may take to send its request frame.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Application error code for a protocol violation.
const PROTOCOL_VIOLATION: u32 = 1;
/// Application error code for a peer we no longer want (bad piece).
const BANNED: u32 = 2;

/// What a peer server can serve.
pub trait PieceSource: Send + Sync + 'static {
    /// The pieces held of `digest`, or `None` if the blob is unknown here.
    fn bitfield(&self, digest: Digest) -> impl Future<Output = Option<Bitfield>> + Send;
    /// The bytes of a held piece, or `None`. Must only return verified bytes.
    fn piece(&self, digest: Digest, index: u32) -> impl Future<Output = Option<Bytes>> + Send;
    /// The length of piece `index` of `digest` if known, before reading it: what sending it
    /// takes from the upload budget ([`UploadLimits`]). Unknown: counted as [`DEFAULT_COST`].
    fn piece_size(&self, _digest: Digest, _index: u32) -> impl Future<Output = Option<u32>> + Send {
        async { None }
    }
    /// Piece `index` of `digest` while it is still arriving here (cut-through), or `None`:
    /// asked when [`piece`](Self::piece) has nothing.
    fn relay(&self, _digest: Digest, _index: u32) -> impl Future<Output = Option<Arc<Relay>>> + Send {
        async { None }
    }
    /// Follows the pieces held of a blob still downloading, or `None` (unknown, or not
    /// downloading: ask for the bitfield instead). The stream ends when the sender drops.
    /// `from` is the subscriber's address (its peer server, as agents connect from the
    /// endpoint they serve on): a subscriber is downloading the blob too, worth following.
    fn subscribe(
        &self,
        _digest: Digest,
        _from: SocketAddr,
    ) -> impl Future<Output = Option<watch::Receiver<Bitfield>>> + Send {
        async { None }
    }
}

/// Counters kept by a peer server, exported as metrics.
#[derive(Debug, Default, Clone)]
pub struct PeerStats {
    pub pieces_served: Counter,
    pub bytes_served: Counter,
    pub protocol_errors: Counter,
    pub connections: Counter,
    pub busy: Counter,
    /// Pieces sent while this host was still receiving them (cut-through).
    pub pieces_relayed: Counter,
}

impl PeerStats {
    /// Registers the counters under `shoal_peer_*`.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("shoal_peer");
        r.register("pieces_served", "Pieces sent to peers", self.pieces_served.clone());
        r.register("bytes_served", "Piece bytes sent to peers", self.bytes_served.clone());
        r.register(
            "protocol_errors",
            "Connections closed for protocol violations",
            self.protocol_errors.clone(),
        );
        r.register("connections", "Peer connections accepted", self.connections.clone());
        r.register("busy", "Piece requests refused past the upload budget", self.busy.clone());
        r.register(
            "pieces_relayed",
            "Pieces sent to peers while still arriving here (cut-through)",
            self.pieces_relayed.clone(),
        );
    }
}

mod client;
mod frames;
pub mod relay;
mod server;
#[cfg(test)]
mod tests;

pub use client::{HaveStream, PeerClient, PeerError, MAX_CONNECTIONS};
use frames::{read_frame, write_frame, StreamError};
pub use relay::{Judgements, Relay, Relays};
pub use server::{serve, UploadLimits, DEFAULT_COST};

//! The seams a download crosses, as traits: the peer transport ([`PeerTransport`], real:
//! [`PeerClient`] over QUIC) and the tracker ([`Announcer`], real: [`TrackerClient`] over
//! HTTP). The agent's swarm loop is generic over both, so tests drive it with fakes that lie,
//! stall or vanish, in process and without a network. (The other seams: the durable store is
//! [`crate::store::backing::Backing`], with an in-memory implementation; the piece server is
//! [`crate::peer::PieceSource`]; the origin's upstream registry is
//! `shoal_origin::upstream::Registry`, real: the HTTP client with token auth, with an
//! in-memory implementation that fails on demand, `origin/src/upstream/memory.rs`.)

use std::future::Future;
use std::net::SocketAddr;

use crate::bitfield::Bitfield;
use crate::client::{Announce, AnnounceResponse};
use crate::metainfo::{Metainfo, VerifiedPiece};
use crate::peer::{HaveStream, PeerClient, PeerError, Relays};
use crate::tls::Role;
use crate::tracker::{LookupError, TrackerClient};

/// The pieces a subscribed peer announces as it verifies them.
pub trait Haves: Send + 'static {
    /// The next batch of newly held piece indices (each checked against the blob); `None`
    /// once the peer finished the stream.
    fn next(&mut self) -> impl Future<Output = Result<Option<Vec<u32>>, PeerError>> + Send;
}

/// Asking peers for what they hold and for pieces. Every piece returned is verified against
/// the metainfo; a peer that sends a bad one is [`PeerError::is_misbehaviour`].
pub trait PeerTransport: Clone + Send + Sync + 'static {
    type Haves: Haves;

    /// The role the peer's certificate carries.
    fn role(&self, addr: SocketAddr) -> impl Future<Output = Result<Option<Role>, PeerError>> + Send;

    /// Which pieces of `metainfo`'s blob `addr` holds.
    fn bitfield(
        &self,
        addr: SocketAddr,
        metainfo: &Metainfo,
    ) -> impl Future<Output = Result<Bitfield, PeerError>> + Send;

    /// What `addr` holds now and the pieces it verifies from now on (refused when it is not
    /// downloading the blob).
    fn subscribe(
        &self,
        addr: SocketAddr,
        metainfo: &Metainfo,
    ) -> impl Future<Output = Result<(Bitfield, Self::Haves), PeerError>> + Send;

    /// Piece `index`, verified block by block; each block that passed is passed on to
    /// `relays` as it lands (cut-through).
    fn piece(
        &self,
        addr: SocketAddr,
        metainfo: &Metainfo,
        index: u32,
        relays: &Relays,
    ) -> impl Future<Output = Result<VerifiedPiece, PeerError>> + Send;

    /// Stops talking to a peer that misbehaved.
    fn ban(&self, addr: SocketAddr);
}

/// Announcing to the tracker and learning of peers.
pub trait Announcer: Clone + Send + Sync + 'static {
    fn announce(
        &self,
        announce: &Announce,
    ) -> impl Future<Output = Result<AnnounceResponse, LookupError>> + Send;
}

impl Haves for HaveStream {
    async fn next(&mut self) -> Result<Option<Vec<u32>>, PeerError> {
        HaveStream::next(self).await
    }
}

impl PeerTransport for PeerClient {
    type Haves = HaveStream;

    async fn role(&self, addr: SocketAddr) -> Result<Option<Role>, PeerError> {
        PeerClient::role(self, addr).await
    }

    async fn bitfield(&self, addr: SocketAddr, metainfo: &Metainfo) -> Result<Bitfield, PeerError> {
        PeerClient::bitfield(self, addr, metainfo).await
    }

    async fn subscribe(
        &self,
        addr: SocketAddr,
        metainfo: &Metainfo,
    ) -> Result<(Bitfield, HaveStream), PeerError> {
        PeerClient::subscribe(self, addr, metainfo).await
    }

    async fn piece(
        &self,
        addr: SocketAddr,
        metainfo: &Metainfo,
        index: u32,
        relays: &Relays,
    ) -> Result<VerifiedPiece, PeerError> {
        PeerClient::piece(self, addr, metainfo, index, relays).await
    }

    fn ban(&self, addr: SocketAddr) {
        PeerClient::ban(self, addr);
    }
}

impl Announcer for TrackerClient {
    async fn announce(&self, announce: &Announce) -> Result<AnnounceResponse, LookupError> {
        TrackerClient::announce(self, announce).await
    }
}

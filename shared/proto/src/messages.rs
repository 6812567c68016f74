//! What agents, origins and trackers say to each other over HTTP: announces, peer lists,
//! tag answers, and the size limits each side holds the other to.

use serde::{Deserialize, Serialize};

use crate::digest::Digest;

/// Largest metainfo document accepted (JSON of `MAX_PIECES` hashes).
pub const MAX_METAINFO_JSON: usize = 96 << 20;
/// Set (`1`) on a metainfo answer when an origin pulled the blob through from an upstream
/// registry within [`PULLED_THROUGH_RECENT`]: the bytes an agent then gets from origins came
/// from the upstream for this pull.
pub const PULLED_THROUGH_HEADER: &str = "X-Shoal-Pulled-Through";
/// How recent a pull-through must be for [`PULLED_THROUGH_HEADER`].
pub const PULLED_THROUGH_RECENT: std::time::Duration = std::time::Duration::from_secs(600);

/// Largest announce request or response accepted.
pub const MAX_ANNOUNCE_JSON: usize = 256 << 10;

/// What a peer tells the tracker.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Announce {
    pub digest: Digest,
    /// Where the peer accepts QUIC connections.
    pub peer: std::net::SocketAddr,
    /// True when the peer holds the whole blob.
    pub complete: bool,
}

/// One peer in the tracker's answer.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct PeerInfo {
    pub addr: std::net::SocketAddr,
    pub complete: bool,
    pub origin: bool,
}

/// The tracker's answer to an announce.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AnnounceResponse {
    /// Seconds until the peer should announce again.
    pub interval: u64,
    /// Origins first, then seeders, then other downloaders; never the announcer.
    pub peers: Vec<PeerInfo>,
}

/// Most blobs in one batched announce.
pub const MAX_BATCH: usize = 1024;
/// Most blobs still downloading in one batched announce (each gets a peer list back).
pub const MAX_BATCH_DOWNLOADING: usize = 64;
/// Largest batched announce response accepted.
pub const MAX_ANNOUNCE_BATCH_JSON: usize = 2 << 20;

/// One blob in a batched announce.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct BlobState {
    pub digest: Digest,
    /// True when the peer holds the whole blob (seeding).
    pub complete: bool,
}

/// Every blob a peer downloads or seeds, announced in one request per tick
/// (`POST /shoal/v1/announce/batch`): at most [`MAX_BATCH`] blobs, of which at most
/// [`MAX_BATCH_DOWNLOADING`] incomplete.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AnnounceBatch {
    pub peer: std::net::SocketAddr,
    pub blobs: Vec<BlobState>,
}

/// Blobs a peer no longer holds (`POST /shoal/v1/leave`), e.g. evicted from its cache: the
/// tracker stops listing it for them at once instead of when its announce expires. At most
/// [`MAX_BATCH`] digests.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Leave {
    pub peer: std::net::SocketAddr,
    pub digests: Vec<Digest>,
}

/// Peers of one blob the announcer is still downloading.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BlobPeers {
    pub digest: Digest,
    /// As in [`AnnounceResponse::peers`].
    pub peers: Vec<PeerInfo>,
}

/// The tracker's answer to a batched announce: peer lists for the incomplete blobs only
/// (a seeder needs none).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AnnounceBatchResponse {
    pub interval: u64,
    pub swarms: Vec<BlobPeers>,
}

/// The tracker's answer to a tag lookup.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TagResponse {
    pub digest: Digest,
}

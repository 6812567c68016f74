//! Who has what: the peers announced for each blob, with expiry.
//!
//! Pure bookkeeping over `now` (no clock inside), so expiry is tested without sleeping.
//! The map is the single owner of peer entries; callers never hold a guard across `.await`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use shoal_shared::client::PeerInfo;
use shoal_shared::digest::Digest;

/// Most peers remembered for one blob.
const MAX_PEERS_PER_BLOB: usize = 10_000;
/// Most blobs tracked at once; announces for new blobs beyond it are answered, not recorded.
const MAX_BLOBS: usize = 1_000_000;

#[derive(Debug, Clone, Copy)]
struct Entry {
    complete: bool,
    expires: Instant,
}

/// Announced peers per blob.
#[derive(Debug, Default)]
pub struct Swarms {
    blobs: DashMap<Digest, HashMap<SocketAddr, Entry>>,
}

impl Swarms {
    /// Records an announce and returns up to `max` other live peers, seeders first.
    pub fn announce(
        &self,
        digest: Digest,
        peer: SocketAddr,
        complete: bool,
        ttl: Duration,
        max: usize,
        now: Instant,
    ) -> Vec<PeerInfo> {
        if self.blobs.len() >= MAX_BLOBS && !self.blobs.contains_key(&digest) {
            return self.peers(&digest, max, now);
        }
        let mut peers = self.blobs.entry(digest).or_default();
        peers.retain(|_, e| e.expires > now);
        if peers.len() < MAX_PEERS_PER_BLOB || peers.contains_key(&peer) {
            peers.insert(peer, Entry { complete, expires: now + ttl });
        }
        let mut out: Vec<PeerInfo> = peers
            .iter()
            .filter(|(addr, _)| **addr != peer)
            .map(|(addr, e)| PeerInfo { addr: *addr, complete: e.complete, origin: false })
            .collect();
        // Seeders first; then a random order so load spreads over the swarm.
        use rand::seq::SliceRandom;
        out.shuffle(&mut rand::rng());
        out.sort_by_key(|p| !p.complete);
        out.truncate(max);
        out
    }

    /// The live peers of `digest` (at most `max`), seeders first, without recording anything.
    pub fn peers(&self, digest: &Digest, max: usize, now: Instant) -> Vec<PeerInfo> {
        let Some(peers) = self.blobs.get(digest) else { return Vec::new() };
        let mut out: Vec<PeerInfo> = peers
            .iter()
            .filter(|(_, e)| e.expires > now)
            .map(|(addr, e)| PeerInfo { addr: *addr, complete: e.complete, origin: false })
            .collect();
        out.sort_by_key(|p| (!p.complete, p.addr));
        out.truncate(max);
        out
    }

    /// Drops expired peers and empty blobs.
    pub fn sweep(&self, now: Instant) {
        self.blobs.retain(|_, peers| {
            peers.retain(|_, e| e.expires > now);
            !peers.is_empty()
        });
    }

    /// Number of blobs with live peers.
    pub fn len(&self) -> usize {
        self.blobs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blobs.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn never_returns_the_announcer_and_seeders_come_first() {
        let s = Swarms::default();
        let d = Digest::of(b"x");
        let now = Instant::now();
        let ttl = Duration::from_secs(30);
        assert!(s.announce(d, addr(1), false, ttl, 10, now).is_empty());
        s.announce(d, addr(2), true, ttl, 10, now);
        let peers = s.announce(d, addr(3), false, ttl, 10, now);
        assert_eq!(peers.len(), 2);
        assert_eq!(peers[0], PeerInfo { addr: addr(2), complete: true, origin: false });
        assert!(peers.iter().all(|p| p.addr != addr(3)));
        assert_eq!(s.announce(d, addr(3), false, ttl, 1, now).len(), 1);
    }

    #[test]
    fn peers_expire() {
        let s = Swarms::default();
        let d = Digest::of(b"x");
        let now = Instant::now();
        let ttl = Duration::from_secs(30);
        s.announce(d, addr(1), true, ttl, 10, now);
        assert_eq!(s.announce(d, addr(2), false, ttl, 10, now + Duration::from_secs(10)).len(), 1);
        assert!(s.announce(d, addr(2), false, ttl, 10, now + Duration::from_secs(31)).is_empty());
        s.sweep(now + Duration::from_secs(100));
        assert!(s.is_empty());
    }
}

//! Who has what: the peers announced for each blob, with expiry.
//!
//! Pure bookkeeping over `now` (no clock inside), so expiry is tested without sleeping.
//! The map is the single owner of peer entries; callers never hold a guard across `.await`.
//! Bounded so that it degrades fairly: the whole table, each swarm, each IP's share of the
//! table and each IP's share of a swarm; an announce costs one pass over its swarm, no sort.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use rand::seq::IteratorRandom;
use shoal_shared::client::PeerInfo;
use shoal_shared::digest::Digest;

/// Most peers remembered for one blob.
const MAX_PEERS_PER_BLOB: usize = 10_000;
/// Most blobs tracked at once; announces for new blobs beyond it are answered, not recorded.
const MAX_BLOBS: usize = 1_000_000;
/// Most entries (blob, address) one IP may hold in the whole table: one host cannot fill
/// it and lock the others out.
pub const MAX_ENTRIES_PER_IP: usize = MAX_BLOBS / 16;
/// Most addresses of one IP in one blob's swarm: a host runs one agent (and maybe an origin);
/// ten thousand "seeders" on one host are a flood, not a swarm.
pub const MAX_PER_IP_PER_BLOB: usize = 64;

/// What an announcer holds of a blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// Some pieces: it is downloading.
    Part,
    /// All of it: a seeder.
    Whole,
    /// All of it, and the announcer proved with its certificate that it is an origin
    /// (mutual TLS): listed as an origin. Without TLS no announcer is.
    Origin,
}

impl Held {
    /// `Whole` or `Part`.
    pub fn of(complete: bool) -> Self {
        if complete {
            Self::Whole
        } else {
            Self::Part
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    complete: bool,
    origin: bool,
    expires: Instant,
}

impl Entry {
    fn info(&self, addr: SocketAddr) -> PeerInfo {
        PeerInfo { addr, complete: self.complete, origin: self.origin }
    }
}

/// Announced peers per blob, and how many entries each IP holds.
#[derive(Debug, Default)]
pub struct Swarms {
    blobs: DashMap<Digest, HashMap<SocketAddr, Entry>>,
    per_ip: DashMap<IpAddr, usize>,
}

impl Swarms {
    fn add_ip(&self, ip: IpAddr) {
        *self.per_ip.entry(ip).or_default() += 1;
    }

    fn drop_ips(&self, gone: impl IntoIterator<Item = IpAddr>) {
        for ip in gone {
            if let dashmap::mapref::entry::Entry::Occupied(mut e) = self.per_ip.entry(ip) {
                *e.get_mut() = e.get().saturating_sub(1);
                if *e.get() == 0 {
                    e.remove();
                }
            }
        }
    }

    /// Records that `peer` holds (part of) `digest` for `ttl`, within the bounds: the table,
    /// the blob's swarm, the IP's share of the table and of the swarm. Returns whether it
    /// is recorded.
    pub fn record(&self, digest: Digest, peer: SocketAddr, held: Held, ttl: Duration, now: Instant) -> bool {
        if self.blobs.len() >= MAX_BLOBS && !self.blobs.contains_key(&digest) {
            return false;
        }
        let ip = peer.ip();
        let mut peers = self.blobs.entry(digest).or_default();
        let mut expired = Vec::new();
        drop_expired(&mut peers, now, &mut expired);
        let known = peers.contains_key(&peer);
        let fits = known
            || (peers.len() < MAX_PEERS_PER_BLOB
                && self.per_ip.get(&ip).map_or(0, |n| *n) < MAX_ENTRIES_PER_IP
                && peers.keys().filter(|a| a.ip() == ip).count() < MAX_PER_IP_PER_BLOB);
        if fits {
            let (complete, origin) = (held != Held::Part, held == Held::Origin);
            peers.insert(peer, Entry { complete, origin, expires: now + ttl });
        }
        let empty = peers.is_empty();
        drop(peers);
        if empty {
            self.blobs.remove_if(&digest, |_, p| p.is_empty());
        }
        self.drop_ips(expired);
        if fits && !known {
            self.add_ip(ip);
        }
        fits
    }

    /// Records an announce and returns up to `max` other live peers, seeders first, each
    /// group in random order (so load spreads over the swarm) without sorting the swarm.
    pub fn announce(
        &self,
        digest: Digest,
        peer: SocketAddr,
        held: Held,
        ttl: Duration,
        max: usize,
        now: Instant,
    ) -> Vec<PeerInfo> {
        self.record(digest, peer, held, ttl, now);
        let Some(peers) = self.blobs.get(&digest) else { return Vec::new() };
        let live = || peers.iter().filter(move |(a, e)| **a != peer && e.expires > now);
        let info = |(a, e): (&SocketAddr, &Entry)| e.info(*a);
        let mut rng = rand::rng();
        let mut out: Vec<PeerInfo> =
            live().filter(|(_, e)| e.complete).map(info).choose_multiple(&mut rng, max);
        let room = max - out.len();
        out.extend(live().filter(|(_, e)| !e.complete).map(info).choose_multiple(&mut rng, room));
        out
    }

    /// The live peers of `digest` (at most `max`), seeders first, without recording anything.
    pub fn peers(&self, digest: &Digest, max: usize, now: Instant) -> Vec<PeerInfo> {
        let Some(peers) = self.blobs.get(digest) else { return Vec::new() };
        let mut out: Vec<PeerInfo> =
            peers.iter().filter(|(_, e)| e.expires > now).map(|(addr, e)| e.info(*addr)).collect();
        out.sort_by_key(|p| (!p.complete, p.addr));
        out.truncate(max);
        out
    }

    /// Forgets that `peer` holds `digest` (it left the swarm). Returns whether it was listed.
    pub fn remove(&self, digest: &Digest, peer: SocketAddr) -> bool {
        let Some(mut peers) = self.blobs.get_mut(digest) else { return false };
        let removed = peers.remove(&peer).is_some();
        let empty = peers.is_empty();
        drop(peers);
        if empty {
            self.blobs.remove_if(digest, |_, p| p.is_empty());
        }
        if removed {
            self.drop_ips([peer.ip()]);
        }
        removed
    }

    /// Drops expired peers and empty blobs.
    pub fn sweep(&self, now: Instant) {
        let mut expired = Vec::new();
        self.blobs.retain(|_, peers| {
            drop_expired(peers, now, &mut expired);
            !peers.is_empty()
        });
        self.drop_ips(expired);
    }

    /// The `n` largest swarms: digest, live seeders, live downloaders.
    pub fn largest(&self, n: usize, now: Instant) -> Vec<(Digest, usize, usize)> {
        let mut all: Vec<(Digest, usize, usize)> = self
            .blobs
            .iter()
            .map(|e| {
                let live = e.value().values().filter(|p| p.expires > now);
                let (seeders, total) = live.fold((0, 0), |(s, t), p| (s + usize::from(p.complete), t + 1));
                (*e.key(), seeders, total - seeders)
            })
            .collect();
        all.sort_by(|a, b| (b.1 + b.2).cmp(&(a.1 + a.2)).then(a.0.cmp(&b.0)));
        all.truncate(n);
        all
    }

    /// Number of blobs with live peers.
    pub fn len(&self) -> usize {
        self.blobs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blobs.is_empty()
    }

    /// Entries (blob, address) held by addresses of `ip`.
    pub fn entries_of(&self, ip: IpAddr) -> usize {
        self.per_ip.get(&ip).map_or(0, |n| *n)
    }
}

/// Drops the expired entries of one swarm, noting their IPs in `gone`.
fn drop_expired(peers: &mut HashMap<SocketAddr, Entry>, now: Instant, gone: &mut Vec<IpAddr>) {
    peers.retain(|addr, e| {
        let live = e.expires > now;
        if !live {
            gone.push(addr.ip());
        }
        live
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn only_origin_announces_are_listed_as_origins() {
        let s = Swarms::default();
        let d = Digest::of(b"o");
        let (now, ttl) = (Instant::now(), Duration::from_secs(30));
        s.announce(d, addr(1), Held::Origin, ttl, 10, now);
        s.announce(d, addr(2), Held::Whole, ttl, 10, now);
        let mut peers = s.announce(d, addr(3), Held::Part, ttl, 10, now);
        peers.sort_by_key(|p| p.addr);
        assert_eq!(
            peers,
            vec![
                PeerInfo { addr: addr(1), complete: true, origin: true },
                PeerInfo { addr: addr(2), complete: true, origin: false },
            ]
        );
    }

    #[test]
    fn never_returns_the_announcer_and_seeders_come_first() {
        let s = Swarms::default();
        let d = Digest::of(b"x");
        let now = Instant::now();
        let ttl = Duration::from_secs(30);
        assert!(s.announce(d, addr(1), Held::Part, ttl, 10, now).is_empty());
        s.announce(d, addr(2), Held::Whole, ttl, 10, now);
        let peers = s.announce(d, addr(3), Held::Part, ttl, 10, now);
        assert_eq!(peers.len(), 2);
        assert_eq!(peers[0], PeerInfo { addr: addr(2), complete: true, origin: false });
        assert!(peers.iter().all(|p| p.addr != addr(3)));
        assert_eq!(s.announce(d, addr(3), Held::Part, ttl, 1, now).len(), 1);
    }

    #[test]
    fn one_ip_cannot_flood_a_swarm_or_the_table() {
        let s = Swarms::default();
        let d = Digest::of(b"layer");
        let now = Instant::now();
        let ttl = Duration::from_secs(30);
        let flood = |port: u16| SocketAddr::from(([10, 0, 0, 66], port));
        let recorded = (1..=10_000u16).filter(|&p| s.record(d, flood(p), Held::Whole, ttl, now)).count();
        assert_eq!(recorded, MAX_PER_IP_PER_BLOB);
        // Another host still joins the swarm, and gets every seeder it may.
        assert!(s.record(d, SocketAddr::from(([10, 0, 0, 7], 5051)), Held::Part, ttl, now));
        assert_eq!(s.announce(d, addr(9), Held::Part, ttl, 100, now).len(), MAX_PER_IP_PER_BLOB + 1);

        // Across blobs, one IP holds at most its share of the table.
        let mut n = 0u64;
        while s.record(Digest::of(&n.to_le_bytes()), flood(1), Held::Whole, ttl, now) {
            n += 1;
            assert!(n <= MAX_ENTRIES_PER_IP as u64, "no bound");
        }
        assert_eq!(s.entries_of(flood(1).ip()), MAX_ENTRIES_PER_IP);
        assert!(s.record(
            Digest::of(b"newcomer"),
            SocketAddr::from(([10, 0, 0, 7], 5051)),
            Held::Whole,
            ttl,
            now
        ));
        // Expiry gives the share back.
        s.sweep(now + Duration::from_secs(31));
        assert_eq!(s.entries_of(flood(1).ip()), 0);
        assert!(s.is_empty());
    }

    #[test]
    fn peers_expire() {
        let s = Swarms::default();
        let d = Digest::of(b"x");
        let now = Instant::now();
        let ttl = Duration::from_secs(30);
        s.announce(d, addr(1), Held::Whole, ttl, 10, now);
        assert_eq!(s.announce(d, addr(2), Held::Part, ttl, 10, now + Duration::from_secs(10)).len(), 1);
        assert!(s.announce(d, addr(2), Held::Part, ttl, 10, now + Duration::from_secs(31)).is_empty());
        s.sweep(now + Duration::from_secs(100));
        assert!(s.is_empty());
    }
}

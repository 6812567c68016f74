//! The peer set: who is known, what each holds, in which order peers are asked (seeders,
//! agents, origins), and the peer cap that lets a seeder or origin displace the weakest
//! agent. Availability counts per piece are kept here as peers come, go and announce pieces.

use std::hash::Hash;
use std::time::Duration;

use super::{Action, AddPeerError, Scheduler};
use crate::bitfield::Bitfield;

#[derive(Debug)]
pub(super) struct Peer {
    pub(super) bits: Bitfield,
    pub(super) held: u32,
    pub(super) origin: bool,
    pub(super) in_flight: u32,
    pub(super) depth: u32,
    /// Backing off: its pieces do not count as available (so an origin may serve them).
    pub(super) suspended: bool,
}

impl Peer {
    pub(super) fn seeder(&self) -> bool {
        self.held == self.bits.len()
    }

    /// Pick order: seeders, agents, origins.
    pub(super) fn rank(&self) -> u8 {
        if self.origin {
            2
        } else if self.seeder() {
            0
        } else {
            1
        }
    }
}

impl<P: Copy + Eq + Hash + std::fmt::Debug> Scheduler<P> {
    /// Whether [`add_peer`](Self::add_peer) would take `peer` now (not banned, not backing
    /// off); lets a driver skip contacting a peer it would be told to drop.
    pub fn admits(&self, peer: P, now: Duration) -> bool {
        self.standing.get(&peer).is_none_or(|s| !s.banned && s.until <= now)
    }

    /// True if `peer` was added as an origin.
    pub fn is_origin(&self, peer: P) -> bool {
        self.peers.get(&peer).is_some_and(|p| p.origin)
    }

    /// True once `peer` is known to hold every piece (or is an origin).
    pub fn is_seeder(&self, peer: P) -> bool {
        self.peers.get(&peer).is_some_and(|p| p.origin || p.seeder())
    }

    /// Registers `peer` with the pieces it holds (an origin is assumed to hold everything,
    /// whatever `bits` says), or replaces what it holds if known.
    pub fn add_peer(
        &mut self,
        peer: P,
        origin: bool,
        bits: Bitfield,
        now: Duration,
    ) -> Result<(), AddPeerError> {
        if bits.len() != self.len() {
            return Err(AddPeerError::Misfit);
        }
        match self.standing.get(&peer) {
            Some(s) if s.banned => return Err(AddPeerError::Banned),
            Some(s) if s.until > now && !self.peers.contains_key(&peer) => {
                return Err(AddPeerError::BackingOff)
            }
            _ => {}
        }
        let bits = if origin { Bitfield::full(self.len()) } else { bits };
        if let Some(known) = self.peers.get_mut(&peer) {
            if !known.origin {
                for i in bits.iter() {
                    if !known.bits.get(i) {
                        known.bits.set(i);
                        known.held += 1;
                        if !known.suspended {
                            self.pieces[i as usize].avail += 1;
                        }
                    }
                }
            }
            self.reorder();
            return Ok(());
        }
        if self.peers.len() >= self.config.max_peers {
            let strong = origin || bits.is_complete();
            let weakest = self
                .peers
                .iter()
                .filter(|(_, p)| !p.origin && !p.seeder())
                .min_by_key(|(_, p)| p.held)
                .map(|(&k, _)| k);
            match weakest {
                Some(w) if strong => self.remove_peer(w),
                _ => return Err(AddPeerError::Full),
            }
        }
        let held = bits.count();
        if !origin {
            self.agents += 1;
            for i in bits.iter() {
                self.pieces[i as usize].avail += 1;
            }
        }
        let full = origin || held == self.len();
        let depth = if full { self.config.seeder_pipeline } else { self.config.peer_pipeline };
        self.peers
            .insert(peer, Peer { bits, held, origin, in_flight: 0, depth: depth.max(1), suspended: false });
        self.order.push(peer);
        self.reorder();
        Ok(())
    }

    fn reorder(&mut self) {
        let peers = &self.peers;
        self.order.sort_by_key(|k| peers.get(k).map_or(3, Peer::rank));
    }

    /// `peer` now holds piece `index` (a Have message). Unknown peers and indices are ignored.
    pub fn on_have(&mut self, peer: P, index: u32) {
        let Some(p) = self.peers.get_mut(&peer) else { return };
        if index >= p.bits.len() || p.bits.get(index) || p.origin {
            return;
        }
        p.bits.set(index);
        p.held += 1;
        if !p.suspended {
            self.pieces[index as usize].avail += 1;
        }
        if p.seeder() {
            p.depth = p.depth.max(self.config.seeder_pipeline);
            self.reorder();
        }
    }

    /// Forgets `peer` (gone from the swarm, or displaced): its requests are cancelled and
    /// their pieces freed. Its standing (ban, back-off) is kept.
    pub fn remove_peer(&mut self, peer: P) {
        let Some(p) = self.peers.remove(&peer) else { return };
        self.order.retain(|k| *k != peer);
        if !p.origin {
            self.agents -= 1;
            if !p.suspended {
                for i in p.bits.iter() {
                    self.pieces[i as usize].avail -= 1;
                }
            }
        }
        let mine: Vec<u32> = self.requests.keys().filter(|(k, _)| *k == peer).map(|&(_, i)| i).collect();
        for index in mine {
            self.drop_request(peer, index);
            self.pending.push(Action::Cancel { peer, index });
        }
    }
}

//! The one place the simulator calls the project's scheduler state machine.
//!
//! Every call into `shoal_shared` scheduling goes through [`Scheduler`], so moving the
//! simulator to a new scheduler API means editing this file only. Today that state machine
//! is [`Picker`], which knows pieces and peers but not time; the policy around it mirrors the
//! agent's download loop (`agent/src/download.rs`): origins first, then seeders, a pipeline
//! per peer, a cap on requests per download, a peer dropped and backed off on any failure.
//!
//! SIM-ONLY (not in today's Picker, modelled here until the scheduler grows them):
//! * Have messages. The Picker only takes whole bitfields (`add_peer`), and replacing a peer
//!   forgets its in-flight pieces. So a peer whose bitfield grew is re-registered under a
//!   fresh key (`host` plus an epoch) while its old key stays until the requests sent under
//!   it settle. Until then the old key's pieces count twice towards availability.
//! * Request timeouts and the backoff after a failure, whose clocks the simulator keeps
//!   (`Policy::request_timeout`, `Policy::backoff`).

use shoal_shared::bitfield::Bitfield;
use shoal_shared::picker::Picker;

use super::queue::{Nanos, SEC};

/// The download loop's knobs (defaults: the agent's constants).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Requests in flight to one origin.
    pub origin_pipeline: u32,
    /// Requests in flight to one other agent.
    pub peer_pipeline: u32,
    /// Requests in flight per download, all peers together.
    pub max_in_flight: u32,
    /// Pieces at the front fetched in order.
    pub window: u32,
    /// Peers asked for their bitfields per announce, less the seeders already known (the
    /// agent's `max_peers`).
    pub max_peers: u32,
    /// How long a piece request may take before it is given up on.
    pub request_timeout: Nanos,
    /// How long a peer that failed is left alone.
    pub backoff: Nanos,
    /// How often a download re-announces.
    pub reannounce: Nanos,
}

impl Policy {
    /// The agent's defaults for pieces of `piece_len` bytes.
    pub fn agent(piece_len: u64) -> Self {
        Self {
            origin_pipeline: 3,
            peer_pipeline: 3,
            max_in_flight: 8,
            window: 8,
            max_peers: 10,
            // The agent's piece timeout: 10 s plus 1 s per MiB of piece.
            request_timeout: 10 * SEC + piece_len / (1 << 20) * SEC,
            backoff: 5 * SEC,
            reannounce: 3 * SEC,
        }
    }
}

#[derive(Debug)]
struct Peer {
    host: u32,
    origin: bool,
    epoch: u32,
    bits: Bitfield,
    have: u32,
    /// Bits changed since the picker last saw them.
    dirty: bool,
}

/// One host's download: the scheduler state machine plus the policy around it.
#[derive(Debug)]
pub struct Scheduler {
    picker: Picker<u64>,
    policy: Policy,
    pieces: u32,
    /// Known peers, in the order they were added (deterministic iteration).
    peers: Vec<Peer>,
    /// Requests in flight: (piece, host, picker key).
    outstanding: Vec<(u32, u32, u64)>,
    /// Superseded picker keys still holding in-flight requests.
    stale: Vec<u64>,
    /// Peers not to be re-added before the given time.
    backoff: Vec<(u32, Nanos)>,
    order: Vec<usize>,
}

fn key(host: u32, epoch: u32) -> u64 {
    (u64::from(host) << 32) | u64::from(epoch)
}

fn key_host(key: u64) -> u32 {
    (key >> 32) as u32
}

impl Scheduler {
    /// A download of `pieces` pieces, none held; `rotation` is the picker's random tie-break.
    pub fn new(pieces: u32, rotation: u32, policy: Policy) -> Self {
        Self {
            picker: Picker::new(&Bitfield::new(pieces), rotation, policy.window),
            policy,
            pieces,
            peers: Vec::new(),
            outstanding: Vec::new(),
            stale: Vec::new(),
            backoff: Vec::new(),
            order: Vec::new(),
        }
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    pub fn is_complete(&self) -> bool {
        self.picker.is_complete()
    }

    pub fn in_flight(&self) -> usize {
        self.outstanding.len()
    }

    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }

    /// Known peers holding the whole blob.
    pub fn complete_peers(&self) -> usize {
        self.peers.iter().filter(|p| p.have == self.pieces).count()
    }

    pub fn knows(&self, host: u32) -> bool {
        self.peers.iter().any(|p| p.host == host)
    }

    /// True when `host` failed recently and must not be asked again yet.
    pub fn backed_off(&mut self, host: u32, now: Nanos) -> bool {
        self.backoff.retain(|&(_, until)| until > now);
        self.backoff.iter().any(|&(h, _)| h == host)
    }

    /// A peer did not answer: leave it alone for a while.
    pub fn back_off(&mut self, host: u32, now: Nanos) {
        self.backoff.push((host, now.saturating_add(self.policy.backoff)));
    }

    /// A peer answered with its bitfield.
    pub fn add_peer(&mut self, host: u32, origin: bool, bits: Bitfield) {
        if bits.len() != self.pieces || self.knows(host) {
            return;
        }
        let have = bits.count();
        self.picker.add_peer(key(host, 0), bits.clone());
        self.peers.push(Peer { host, origin, epoch: 0, bits, have, dirty: false });
    }

    /// `host` announced it now holds `piece`.
    pub fn on_have(&mut self, host: u32, piece: u32) {
        if let Some(p) = self.peers.iter_mut().find(|p| p.host == host) {
            if piece < self.pieces && !p.bits.get(piece) {
                p.bits.set(piece);
                p.have += 1;
                p.dirty = true;
            }
        }
    }

    /// SIM-ONLY: hands grown bitfields to the picker under fresh keys (see the module doc).
    fn sync(&mut self) {
        for p in self.peers.iter_mut().filter(|p| p.dirty) {
            p.dirty = false;
            let old = key(p.host, p.epoch);
            p.epoch = p.epoch.wrapping_add(1);
            self.picker.add_peer(key(p.host, p.epoch), p.bits.clone());
            if self.outstanding.iter().any(|&(_, _, k)| k == old) {
                self.stale.push(old);
            } else {
                self.picker.remove_peer(old);
            }
        }
    }

    /// The requests to send now, as (host, piece), appended to `out`: every peer's pipeline
    /// filled, origins first, then seeders, within the per-download cap.
    pub fn next_requests(&mut self, out: &mut Vec<(u32, u32)>) {
        self.sync();
        let mut order = std::mem::take(&mut self.order);
        order.clear();
        order.extend(0..self.peers.len());
        let complete = |p: &Peer| p.have == self.pieces;
        order.sort_by_key(|&i| (!self.peers[i].origin, !complete(&self.peers[i])));
        for &i in &order {
            let p = &self.peers[i];
            let depth = if p.origin { self.policy.origin_pipeline } else { self.policy.peer_pipeline };
            let current = key(p.host, p.epoch);
            // Requests sent under superseded keys still fill this peer's pipeline.
            let older =
                self.outstanding.iter().filter(|&&(_, h, k)| h == p.host && k != current).count() as u32;
            let depth = depth.saturating_sub(older);
            while (self.outstanding.len() as u32) < self.policy.max_in_flight {
                let Some(piece) = self.picker.next_request(current, depth) else { break };
                self.outstanding.push((piece, p.host, current));
                out.push((p.host, piece));
            }
        }
        self.order = order;
    }

    fn settle(&mut self, host: u32, piece: u32) -> Option<u64> {
        let i = self.outstanding.iter().position(|&(pc, h, _)| pc == piece && h == host)?;
        let (_, _, k) = self.outstanding.swap_remove(i);
        Some(k)
    }

    fn drop_stale(&mut self, k: u64) {
        if self.stale.contains(&k) && !self.outstanding.iter().any(|&(_, _, o)| o == k) {
            self.stale.retain(|&s| s != k);
            self.picker.remove_peer(k);
        }
    }

    /// A requested piece arrived (and verified). False if no such request was in flight.
    pub fn on_piece(&mut self, host: u32, piece: u32) -> bool {
        let Some(k) = self.settle(host, piece) else { return false };
        self.picker.on_piece(piece, k);
        self.drop_stale(k);
        true
    }

    /// A request failed or timed out: like the agent, the piece goes back to missing and the
    /// peer is dropped and backed off. Returns the other pieces that were in flight to that
    /// peer, now missing again (the caller gives up on those requests too).
    pub fn on_failure(&mut self, host: u32, piece: u32, now: Nanos) -> Vec<u32> {
        if let Some(k) = self.settle(host, piece) {
            self.picker.on_failure(piece, k);
        }
        self.backoff.push((host, now.saturating_add(self.policy.backoff)));
        self.remove_peer(host)
    }

    /// Forgets `host` (it failed or left); returns the pieces that were in flight to it.
    pub fn remove_peer(&mut self, host: u32) -> Vec<u32> {
        let mut lost = Vec::new();
        self.outstanding.retain(|&(pc, h, _)| {
            if h == host {
                lost.push(pc);
            }
            h != host
        });
        if let Some(i) = self.peers.iter().position(|p| p.host == host) {
            let p = self.peers.remove(i);
            self.picker.remove_peer(key(host, p.epoch));
        }
        let picker = &mut self.picker;
        self.stale.retain(|&k| {
            if key_host(k) == host {
                picker.remove_peer(k);
            }
            key_host(k) != host
        });
        lost
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bits(n: u32, set: &[u32]) -> Bitfield {
        let mut b = Bitfield::new(n);
        for &i in set {
            b.set(i);
        }
        b
    }

    fn policy() -> Policy {
        Policy { window: 0, ..Policy::agent(1 << 20) }
    }

    #[test]
    fn origins_first_within_the_cap() {
        let mut s = Scheduler::new(16, 0, policy());
        s.add_peer(5, false, Bitfield::full(16));
        s.add_peer(1, true, Bitfield::full(16));
        let mut out = Vec::new();
        s.next_requests(&mut out);
        assert_eq!(out.len(), 6, "3 to the origin, 3 to the peer");
        assert!(out[..3].iter().all(|&(h, _)| h == 1));
        assert!(out[3..].iter().all(|&(h, _)| h == 5));
        let mut pieces: Vec<u32> = out.iter().map(|&(_, p)| p).collect();
        pieces.sort_unstable();
        pieces.dedup();
        assert_eq!(pieces.len(), 6, "no piece asked twice");
    }

    #[test]
    fn a_have_makes_a_peer_useful_without_losing_its_requests() {
        let mut s = Scheduler::new(4, 0, policy());
        s.add_peer(7, false, bits(4, &[0]));
        let mut out = Vec::new();
        s.next_requests(&mut out);
        assert_eq!(out, vec![(7, 0)]);
        s.on_have(7, 2);
        out.clear();
        s.next_requests(&mut out);
        assert_eq!(out, vec![(7, 2)], "piece 0 is still in flight, 2 is new");
        assert!(s.on_piece(7, 0));
        assert!(s.on_piece(7, 2));
        assert!(!s.on_piece(7, 2), "already settled");
        assert_eq!(s.in_flight(), 0);
        assert!(s.stale.is_empty());
    }

    #[test]
    fn a_failure_drops_the_peer_and_frees_its_pieces() {
        let mut s = Scheduler::new(4, 0, policy());
        s.add_peer(3, false, Bitfield::full(4));
        let mut out = Vec::new();
        s.next_requests(&mut out);
        assert_eq!(out.len(), 3);
        let lost = s.on_failure(3, out[0].1, 0);
        assert_eq!(lost.len(), 2);
        assert!(!s.knows(3) && s.backed_off(3, SEC) && !s.backed_off(3, 5 * SEC));
        s.add_peer(4, false, Bitfield::full(4));
        out.clear();
        s.next_requests(&mut out);
        assert_eq!(out.len(), 3, "the freed pieces are asked of the next peer");
    }

    #[test]
    fn misfit_bitfields_are_ignored() {
        let mut s = Scheduler::new(4, 0, policy());
        s.add_peer(3, false, Bitfield::full(5));
        assert_eq!(s.peer_count(), 0);
        s.on_have(3, 1);
        s.on_have(9, 100);
    }
}

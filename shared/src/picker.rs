//! The piece picker: which piece to ask which peer for next.
//!
//! A pure state machine (no I/O, no clock): the driver tells it which pieces each peer holds
//! and what happened to each request, and asks it for the next request to send to a peer.
//! Policy: first, the lowest missing piece within a small window at the front of the blob
//! (the pieces a client streaming the blob waits for next, so the verified prefix keeps
//! growing); otherwise rarest first among the pieces the peer holds that are neither held
//! nor in flight, ties broken by a per-download random rotation so that peers starting
//! together spread over different pieces. At most `pipeline` requests in flight per peer.

use std::collections::HashMap;
use std::hash::Hash;

use crate::bitfield::Bitfield;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State<P> {
    Missing,
    InFlight(P),
    Have,
}

/// Piece selection for one download, keyed by a peer identifier `P`.
#[derive(Debug)]
pub struct Picker<P> {
    pieces: Vec<State<P>>,
    availability: Vec<u32>,
    peers: HashMap<P, PeerState>,
    rotation: u32,
    have: u32,
    /// Lowest index not held: the end of the held prefix.
    first_missing: u32,
    window: u32,
}

#[derive(Debug)]
struct PeerState {
    bits: Bitfield,
    in_flight: u32,
}

impl<P: Copy + Eq + Hash> Picker<P> {
    /// A picker over `pieces` pieces, of which those set in `have` are already held.
    /// `rotation` picks the tie-break order (pass a random number); `window` is how many
    /// pieces at the front of the missing range are fetched in order first (0: pure
    /// rarest first).
    pub fn new(have: &Bitfield, rotation: u32, window: u32) -> Self {
        let n = have.len();
        let pieces = (0..n).map(|i| if have.get(i) { State::Have } else { State::Missing }).collect();
        Self {
            pieces,
            availability: vec![0; n as usize],
            peers: HashMap::new(),
            rotation: if n == 0 { 0 } else { rotation % n },
            have: have.count(),
            first_missing: (0..n).find(|&i| !have.get(i)).unwrap_or(n),
            window,
        }
    }

    /// Number of pieces in the blob.
    pub fn len(&self) -> u32 {
        self.pieces.len() as u32
    }

    pub fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }

    /// True when every piece is held.
    pub fn is_complete(&self) -> bool {
        self.have == self.len()
    }

    /// Registers (or replaces) what `peer` holds. The bitfield must have been validated
    /// against this blob's piece count.
    pub fn add_peer(&mut self, peer: P, bits: Bitfield) {
        self.remove_peer(peer);
        for i in bits.iter() {
            self.availability[i as usize] += 1;
        }
        self.peers.insert(peer, PeerState { bits, in_flight: 0 });
    }

    /// Forgets `peer`: its in-flight pieces become missing again.
    pub fn remove_peer(&mut self, peer: P) {
        if let Some(state) = self.peers.remove(&peer) {
            for i in state.bits.iter() {
                self.availability[i as usize] -= 1;
            }
        }
        for s in &mut self.pieces {
            if *s == State::InFlight(peer) {
                *s = State::Missing;
            }
        }
    }

    /// Peers currently known.
    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }

    /// True when some known peer holds a piece that is still missing (not in flight).
    pub fn has_work(&self) -> bool {
        self.pieces
            .iter()
            .enumerate()
            .any(|(i, s)| *s == State::Missing && self.peers.values().any(|p| p.bits.get(i as u32)))
    }

    /// The next piece to request from `peer`, if it has one we need and its pipeline
    /// (`pipeline` requests) is not full. Marks the piece in flight.
    pub fn next_request(&mut self, peer: P, pipeline: u32) -> Option<u32> {
        let state = self.peers.get(&peer)?;
        if state.in_flight >= pipeline {
            return None;
        }
        let n = self.len();
        let front = self.first_missing..self.first_missing.saturating_add(self.window).min(n);
        let in_order =
            front.into_iter().find(|&i| self.pieces[i as usize] == State::Missing && state.bits.get(i));
        let mut best: Option<(u32, u32)> = in_order.map(|i| (i, 0));
        for k in 0..if best.is_some() { 0 } else { n } {
            let i = (k + self.rotation) % n;
            if self.pieces[i as usize] != State::Missing || !state.bits.get(i) {
                continue;
            }
            let avail = self.availability[i as usize];
            if best.is_none_or(|(_, a)| avail < a) {
                best = Some((i, avail));
                if avail <= 1 {
                    break;
                }
            }
        }
        let (index, _) = best?;
        self.pieces[index as usize] = State::InFlight(peer);
        if let Some(s) = self.peers.get_mut(&peer) {
            s.in_flight += 1;
        }
        Some(index)
    }

    fn settle(&mut self, index: u32, peer: P) -> bool {
        let Some(slot) = self.pieces.get_mut(index as usize) else { return false };
        if let Some(s) = self.peers.get_mut(&peer) {
            s.in_flight = s.in_flight.saturating_sub(1);
        }
        *slot == State::InFlight(peer)
    }

    /// `peer` delivered a verified piece.
    pub fn on_piece(&mut self, index: u32, peer: P) {
        if self.settle(index, peer) || self.pieces.get(index as usize) == Some(&State::Missing) {
            self.pieces[index as usize] = State::Have;
            self.have += 1;
            while self.pieces.get(self.first_missing as usize) == Some(&State::Have) {
                self.first_missing += 1;
            }
        }
    }

    /// A request to `peer` failed (error, refusal, bad hash): the piece is missing again.
    pub fn on_failure(&mut self, index: u32, peer: P) {
        if self.settle(index, peer) {
            self.pieces[index as usize] = State::Missing;
        }
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

    #[test]
    fn rarest_first_and_pipeline() {
        let mut p = Picker::new(&Bitfield::new(4), 0, 0);
        p.add_peer(1u8, bits(4, &[0, 1, 2, 3]));
        p.add_peer(2u8, bits(4, &[0, 1, 2]));
        // Piece 3 is held by one peer only: asked first.
        assert_eq!(p.next_request(1, 2), Some(3));
        assert_eq!(p.next_request(1, 2), Some(0));
        assert_eq!(p.next_request(1, 2), None, "pipeline full");
        assert_eq!(p.next_request(2, 2), Some(1));
        p.on_piece(3, 1);
        p.on_failure(0, 1);
        assert_eq!(p.next_request(2, 2), Some(0));
        assert!(!p.is_complete());
    }

    #[test]
    fn lost_peer_releases_its_pieces() {
        let mut p = Picker::new(&Bitfield::new(2), 1, 0);
        p.add_peer(1u8, Bitfield::full(2));
        let a = p.next_request(1, 4).expect("piece");
        p.remove_peer(1);
        p.add_peer(2u8, Bitfield::full(2));
        let mut got = vec![p.next_request(2, 4).expect("x"), p.next_request(2, 4).expect("y")];
        got.sort();
        assert_eq!(got, vec![0, 1]);
        assert!(got.contains(&a));
        p.on_piece(0, 2);
        p.on_piece(1, 2);
        assert!(p.is_complete());
        assert!(!p.has_work());
    }

    #[test]
    fn the_front_window_goes_in_order_then_rarest_first() {
        let mut p = Picker::new(&Bitfield::new(10), 7, 3);
        p.add_peer(1u8, Bitfield::full(10));
        p.add_peer(2u8, bits(10, &[0, 1, 2, 3, 4, 5, 6, 7, 8]));
        assert_eq!(p.next_request(1, 8), Some(0));
        assert_eq!(p.next_request(1, 8), Some(1));
        assert_eq!(p.next_request(1, 8), Some(2));
        // The window [0, 3) is all in flight: rarest next (9 is held by one peer only).
        assert_eq!(p.next_request(1, 8), Some(9));
        p.on_piece(0, 1);
        p.on_piece(1, 1);
        // The window slid to [2, 5): 3 is next in order.
        assert_eq!(p.next_request(2, 8), Some(3));
        assert_eq!(p.next_request(2, 8), Some(4));
    }

    #[test]
    fn already_held_pieces_are_never_requested() {
        let mut p = Picker::new(&bits(3, &[0, 2]), 0, 2);
        p.add_peer(7u8, Bitfield::full(3));
        assert_eq!(p.next_request(7, 8), Some(1));
        assert_eq!(p.next_request(7, 8), None);
    }
}

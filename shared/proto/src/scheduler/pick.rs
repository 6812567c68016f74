//! Which piece a peer is asked for: the in-order front window, rarest first with a random
//! tie-break over a bounded sample, the shared-origin walk over pieces no agent holds, and
//! endgame duplicates. Also the scheduler's seeded random source.

use std::hash::Hash;

use super::{Peer, Scheduler};

/// Candidates a rarest-first pick examines (among pieces the peer holds) before settling.
pub const SAMPLE: u32 = 32;

impl<P: Copy + Eq + Hash + std::fmt::Debug> Scheduler<P> {
    pub(super) fn random(&mut self) -> u64 {
        // xorshift64*: plenty for tie-breaks, and reproducible from the seed.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// An origin pick while other agents are known: the next free piece no agent holds,
    /// walking on from the cursor; endgame duplicates only when no piece is free.
    fn pick_shared_origin(&mut self, peer: P) -> Option<u32> {
        let n = self.len();
        if !self.free.is_empty() {
            let mut jumped = false;
            let mut k = 0;
            while k < n {
                let i = (self.origin_cursor + k) % n;
                let piece = self.pieces[i as usize];
                if !piece.have && piece.copies == 0 {
                    if (piece.avail == 0 || piece.stalled_until > self.clock)
                        && piece.origin_after <= self.clock
                    {
                        self.origin_cursor = (i + 1) % n;
                        return Some(i);
                    }
                    // The walk ran into another agent's run: following it would fetch its
                    // next pieces at the same time. Start a new run at a random free piece.
                    if !jumped {
                        jumped = true;
                        let r = self.random() % self.free.len() as u64;
                        self.origin_cursor = self.free[r as usize];
                        k = 0;
                        continue;
                    }
                }
                k += 1;
            }
            return None;
        }
        self.endgame_pick(peer)
    }

    /// Endgame: the fewest-copied outstanding piece `peer` can serve and is not already
    /// asked for.
    fn endgame_pick(&self, peer: P) -> Option<u32> {
        let p = &self.peers[&peer];
        self.holders
            .iter()
            .filter(|(&i, h)| {
                (h.len() as u32) < self.config.endgame_copies && !h.contains(&peer) && self.eligible(p, i)
            })
            .min_by_key(|(&i, h)| (h.len(), i))
            .map(|(&i, _)| i)
    }

    /// Whether `peer` may be asked for piece `index` at all.
    fn eligible(&self, p: &Peer, index: u32) -> bool {
        let piece = &self.pieces[index as usize];
        p.bits.get(index)
            && (!p.origin
                || ((piece.avail == 0 || piece.stalled_until > self.clock)
                    && piece.origin_after <= self.clock))
    }

    pub(super) fn pick(&mut self, peer: P) -> Option<u32> {
        let p = self.peers.get(&peer)?;
        let n = self.len();
        if p.origin && self.agents > 0 {
            return self.pick_shared_origin(peer);
        }
        let end = self.first_missing.saturating_add(self.config.window).min(n);
        for i in self.first_missing..end {
            let piece = &self.pieces[i as usize];
            if !piece.have && piece.copies == 0 && self.eligible(p, i) {
                return Some(i);
            }
        }
        if !self.free.is_empty() {
            let len = self.free.len();
            let start = (self.random() % len as u64) as usize;
            let mut best: Option<(u32, u32)> = None;
            let mut seen = 0;
            for k in 0..len {
                let i = self.free[(start + k) % len];
                let p = &self.peers[&peer];
                if !self.eligible(p, i) {
                    continue;
                }
                let avail = self.pieces[i as usize].avail;
                if best.is_none_or(|(_, a)| avail < a) {
                    best = Some((i, avail));
                }
                seen += 1;
                if avail <= 1 || seen >= SAMPLE {
                    break;
                }
            }
            if best.is_some() {
                return best.map(|(i, _)| i);
            }
            // Free pieces remain but this peer holds none of them: no endgame yet.
            return None;
        }
        // Endgame: duplicate the fewest-copied outstanding piece this peer can serve.
        self.endgame_pick(peer)
    }
}

//! Dispatch: the poll loop that expires overdue requests and fills every pipeline, and the
//! bookkeeping of requests in flight (deadlines scaled to piece size and depth, the free
//! list, copies per piece, and what a delivered piece cancels).

use std::hash::Hash;
use std::time::Duration;

use super::{Action, Scheduler, NOT_FREE};

#[derive(Debug, Clone, Copy)]
pub(super) struct Outstanding {
    pub(super) sent: Duration,
    pub(super) deadline: Duration,
}

impl<P: Copy + Eq + Hash + std::fmt::Debug> Scheduler<P> {
    /// `peer` delivered piece `index`, verified and stored. Other copies in flight are
    /// cancelled at the next [`poll`](Self::poll).
    pub fn on_piece(&mut self, peer: P, index: u32, now: Duration) {
        if index >= self.len() {
            return;
        }
        if let Some(req) = self.drop_request(peer, index) {
            if let Some(p) = self.peers.get_mut(&peer) {
                let budget = req.deadline.saturating_sub(req.sent);
                if now.saturating_sub(req.sent) < budget / 4 {
                    p.depth = (p.depth + 1).min(self.config.max_pipeline.max(1));
                }
            }
            if let Some(s) = self.standing.get_mut(&peer) {
                s.failures = 0;
                s.busy = 0;
            }
        }
        if self.pieces[index as usize].have {
            return;
        }
        for other in self.holders.get(&index).cloned().unwrap_or_default() {
            self.drop_request(other, index);
            self.pending.push(Action::Cancel { peer: other, index });
        }
        self.take_free(index);
        self.pieces[index as usize].have = true;
        self.have += 1;
        while self.pieces.get(self.first_missing as usize).is_some_and(|p| p.have) {
            self.first_missing += 1;
        }
        self.last_progress = now;
    }

    /// The first blocks of a piece requested arrived fast enough to offer it before it is
    /// whole (`fast`), or too slowly ([`crate::session::EarlyOffer`]'s judgement): the
    /// download's cap on requests in flight grows or shrinks by one, within
    /// [`Config::min_in_flight`](super::Config::min_in_flight)..=`max_in_flight`.
    pub fn on_first_blocks(&mut self, fast: bool) {
        let (lo, hi) = self.config.in_flight_bounds();
        self.cap = if fast { self.cap + 1 } else { self.cap.saturating_sub(1) }.clamp(lo, hi);
    }

    /// Expires overdue requests and fills every pipeline. Appends to `out` the cancels first,
    /// then the new requests.
    pub fn poll(&mut self, now: Duration, out: &mut Vec<Action<P>>) {
        let overdue: Vec<(P, u32)> =
            self.requests.iter().filter(|(_, r)| r.deadline <= now).map(|(&k, _)| k).collect();
        let mut slow: Vec<P> = Vec::new();
        for (peer, index) in overdue {
            self.drop_request(peer, index);
            self.mark_stalled(peer, index, now);
            self.pending.push(Action::Cancel { peer, index });
            if !slow.contains(&peer) {
                slow.push(peer);
            }
        }
        // One stall per peer per poll, however many of its requests it held up.
        for peer in slow {
            if let Some(p) = self.peers.get_mut(&peer) {
                p.depth = (p.depth / 2).max(1);
            }
            self.back_off(peer, now);
        }
        out.append(&mut self.pending);
        if self.is_complete() {
            return;
        }
        self.resume_expired(now);
        self.clock = now;
        while self.defer_ends.front().is_some_and(|&t| t <= now) {
            self.defer_ends.pop_front();
        }
        for k in 0..self.order.len() {
            let peer = self.order[k];
            if self.in_flight >= self.cap {
                break;
            }
            if self.standing.get(&peer).is_some_and(|s| s.until > now) {
                continue;
            }
            while self.in_flight < self.cap {
                let Some(p) = self.peers.get(&peer) else { break };
                let shared = p.origin && self.agents > 0;
                let depth =
                    if shared { p.depth.min(self.config.shared_origin_pipeline.max(1)) } else { p.depth };
                if p.in_flight >= depth {
                    break;
                }
                let Some(index) = self.pick(peer) else { break };
                self.issue(peer, index, now);
                out.push(Action::Request { peer, index });
            }
        }
    }

    fn issue(&mut self, peer: P, index: u32, now: Duration) {
        self.take_free(index);
        let p = self.peers.get_mut(&peer).expect("picked peer is known");
        p.in_flight += 1;
        let rate = self.config.min_rate.max(1);
        // The pieces this one may queue behind: the peer's pipeline, or every piece the
        // download has in flight, whichever is more (they share the downlink; on a slow one,
        // timing them out as the peer's fault would back every peer off).
        let pieces = u64::from(p.depth.max(self.in_flight + 1));
        let scaled = Duration::from_secs_f64((self.piece_len * pieces) as f64 / rate as f64);
        let deadline = now + scaled.max(self.config.timeout_floor);
        self.requests.insert((peer, index), Outstanding { sent: now, deadline });
        self.holders.entry(index).or_default().push(peer);
        self.pieces[index as usize].copies += 1;
        self.in_flight += 1;
    }

    /// Forgets one outstanding request; frees its piece if no copy remains in flight.
    pub(super) fn drop_request(&mut self, peer: P, index: u32) -> Option<Outstanding> {
        let req = self.requests.remove(&(peer, index))?;
        self.in_flight -= 1;
        if let Some(p) = self.peers.get_mut(&peer) {
            p.in_flight -= 1;
        }
        if let Some(h) = self.holders.get_mut(&index) {
            h.retain(|k| *k != peer);
            if h.is_empty() {
                self.holders.remove(&index);
            }
        }
        let piece = &mut self.pieces[index as usize];
        piece.copies -= 1;
        if piece.copies == 0 && !piece.have {
            piece.slot = self.free.len() as u32;
            self.free.push(index);
        }
        Some(req)
    }

    fn take_free(&mut self, index: u32) {
        let slot = self.pieces[index as usize].slot;
        if slot == NOT_FREE {
            return;
        }
        self.free.swap_remove(slot as usize);
        if let Some(&moved) = self.free.get(slot as usize) {
            self.pieces[moved as usize].slot = slot;
        }
        self.pieces[index as usize].slot = NOT_FREE;
    }
}

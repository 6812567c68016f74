//! Peer standing and time: failures reported by the driver (ban, back-off, Busy pause,
//! origin deferral), back-offs that grow with consecutive failures and take a peer's pieces
//! out of the availability counts, re-planning a stalled download, and the next wake-up.

use std::hash::Hash;
use std::time::Duration;

use super::{Action, Failure, Scheduler, DEFER};

#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Standing {
    pub(super) banned: bool,
    pub(super) failures: u32,
    /// Busy answers since the peer last delivered a piece, counting one per pause.
    pub(super) busy: u32,
    pub(super) until: Duration,
}

impl<P: Copy + Eq + Hash + std::fmt::Debug> Scheduler<P> {
    /// A request to `peer` for `index` failed. Answers to cancelled requests are ignored.
    pub fn on_failure(&mut self, peer: P, index: u32, now: Duration, failure: Failure) {
        if self.drop_request(peer, index).is_none() {
            return;
        }
        match failure {
            Failure::Bad => {
                self.standing.entry(peer).or_default().banned = true;
                self.remove_peer(peer);
            }
            Failure::Unavailable => {
                self.mark_stalled(peer, index, now);
                self.back_off(peer, now);
            }
            Failure::Busy => {
                if let Some(p) = self.peers.get_mut(&peer) {
                    p.depth = p.in_flight.clamp(1, p.depth.max(1));
                }
                let s = self.standing.entry(peer).or_default();
                // Answers to requests sent before the pause are one refusal, not several.
                if s.until <= now {
                    s.busy = s.busy.saturating_add(1);
                }
                let factor = 1u32 << s.busy.saturating_sub(1).min(16);
                let pause = self.config.busy_pause.saturating_mul(factor).min(self.config.max_busy_pause);
                s.until = s.until.max(now + pause);
            }
            Failure::Deferred => {
                self.pieces[index as usize].origin_after = now + DEFER;
                self.defer_ends.push_back(now + DEFER);
            }
        }
    }

    /// A request for `index` to `peer` timed out or failed: if `peer` is an agent, origins
    /// may be asked for the piece whoever else offers it, for as long as the longest back-off.
    pub(super) fn mark_stalled(&mut self, peer: P, index: u32, now: Duration) {
        if self.peers.get(&peer).is_some_and(|p| !p.origin) {
            if let Some(piece) = self.pieces.get_mut(index as usize) {
                piece.stalled_until = now + self.config.max_backoff;
            }
        }
    }

    /// Backs `peer` off after a failure outside any request (it could not be reached, or
    /// its bitfield did not come).
    pub fn back_off(&mut self, peer: P, now: Duration) {
        let s = self.standing.entry(peer).or_default();
        s.failures = s.failures.saturating_add(1);
        let factor = 1u32 << (s.failures - 1).min(16);
        s.until = now + self.config.backoff.saturating_mul(factor).min(self.config.max_backoff);
        self.suspend(peer, true);
    }

    /// Takes a backing-off agent's pieces out of (or puts them back into) the availability
    /// counts: a piece only a stalled or unreachable peer holds may come from an origin.
    fn suspend(&mut self, peer: P, suspended: bool) {
        let Some(p) = self.peers.get_mut(&peer) else { return };
        if p.origin || p.suspended == suspended {
            return;
        }
        p.suspended = suspended;
        for i in p.bits.iter() {
            let a = &mut self.pieces[i as usize].avail;
            *a = if suspended { *a - 1 } else { *a + 1 };
        }
    }

    /// Counts again the pieces of peers whose back-off has ended.
    pub(super) fn resume_expired(&mut self, now: Duration) {
        let expired: Vec<P> = self
            .peers
            .iter()
            .filter(|(k, p)| p.suspended && self.standing.get(k).is_none_or(|s| s.until <= now))
            .map(|(&k, _)| k)
            .collect();
        for peer in expired {
            self.suspend(peer, false);
        }
    }

    /// Cancels every request and forgives back-offs (not bans): for a download that made no
    /// progress for a while, so that it starts over with whatever peers the driver finds.
    /// [`last_progress`](Self::last_progress) is left alone: the driver decides how long a
    /// re-planned download may still go without progress.
    pub fn replan(&mut self) {
        let all: Vec<(P, u32)> = self.requests.keys().copied().collect();
        for (peer, index) in all {
            self.drop_request(peer, index);
            self.pending.push(Action::Cancel { peer, index });
        }
        self.standing.retain(|_, s| s.banned);
        let all: Vec<P> = self.peers.keys().copied().collect();
        for peer in all {
            self.suspend(peer, false);
        }
        for p in self.peers.values_mut() {
            p.depth =
                if p.origin || p.seeder() { self.config.seeder_pipeline } else { self.config.peer_pipeline };
        }
    }

    /// The earliest time after `now` at which [`poll`](Self::poll) may have something new
    /// to do without any other event: a request deadline or the end of a back-off.
    pub fn next_wakeup(&self, now: Duration) -> Option<Duration> {
        let deadlines = self.requests.values().map(|r| r.deadline);
        let backoffs =
            self.peers.keys().filter_map(|k| self.standing.get(k)).filter(|s| !s.banned).map(|s| s.until);
        let deferrals = self.defer_ends.iter().copied();
        deadlines.chain(backoffs).chain(deferrals).filter(|&t| t > now).min()
    }
}

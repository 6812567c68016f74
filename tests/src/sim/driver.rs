//! The one place the simulator calls the project's scheduler state machine.
//!
//! Every call into `shoal_shared` scheduling goes through [`Scheduler`], so moving the
//! simulator to another scheduler API means editing this file only. It wraps
//! [`shoal_shared::scheduler::Scheduler`], the pure state machine the agent's download loop
//! (`agent/src/download/swarm.rs`) drives, keyed by host number and fed virtual time. The
//! scheduler owns the policy (front window, rarest first, origin as fallback, pipelines,
//! deadlines with re-dispatch, endgame, back-off, peer cap); this file only converts clocks
//! and carries [`Policy`], the agent's constants for the scheduler and its download loop
//! (re-announce schedule, progress timeout). The progress timer is the agent's own
//! ([`shoal_shared::session::Progress`]), kept beside the scheduler it reads; an origin's
//! first-copies-first waves are the origin's own ([`FirstCopies`]).

use std::time::Duration;

use shoal_shared::bitfield::Bitfield;
use shoal_shared::scheduler;
pub use shoal_shared::scheduler::{Action, Failure};
use shoal_shared::session::{self, Announces, Progress, Schedule};
pub use shoal_shared::session::{EarlyOffer, Listed, Miss, Stall, EARLY_OFFER_BLOCKS};

/// How long an agent waits for a probed peer's bitfield (the agent's own).
pub const PROBE_TIMEOUT: Nanos = session::PROBE_TIMEOUT.as_nanos() as Nanos;
pub use shoal_shared::wire::Refusal;

use super::queue::{Nanos, SEC};

/// The download loop's knobs (defaults: the agent's, see [`Policy::agent`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// The scheduler's configuration, as the agent builds it.
    pub scheduler: scheduler::Config,
    /// The re-announce intervals (the agent's [`Schedule::AGENT`]).
    pub announces: Schedule,
    /// No progress for half of this: re-plan; for all of it: the download fails.
    pub progress_timeout: Nanos,
}

impl Policy {
    /// The agent's policy for pieces of `piece_len` bytes: the scheduler configuration its
    /// download loop uses ([`scheduler::Config::for_agent`] with its default `max_peers`),
    /// its re-announce schedule and default progress timeout.
    pub fn agent(piece_len: u64) -> Self {
        Self {
            scheduler: scheduler::Config::for_agent(piece_len, 10),
            announces: Schedule::AGENT,
            progress_timeout: 60 * SEC,
        }
    }
}

fn dur(t: Nanos) -> Duration {
    Duration::from_nanos(t)
}

fn nanos(d: Duration) -> Nanos {
    d.as_nanos().min(u128::from(Nanos::MAX)) as Nanos
}

/// One host's download: the scheduler keyed by host number, its progress timer and its
/// announce timer, on the virtual clock (the download starts at 0).
#[derive(Debug)]
pub struct Scheduler {
    inner: scheduler::Scheduler<u32>,
    progress: Progress,
    announces: Announces,
    policy: Policy,
}

impl Scheduler {
    /// A download of `pieces` pieces of `piece_len` bytes, none held; `seed` drives the
    /// scheduler's random choices.
    pub fn new(pieces: u32, piece_len: u64, seed: u64, policy: Policy) -> Self {
        let piece_len = u32::try_from(piece_len).unwrap_or(u32::MAX);
        Self {
            inner: scheduler::Scheduler::new(&Bitfield::new(pieces), piece_len, seed, policy.scheduler),
            progress: Progress::new(dur(policy.progress_timeout)),
            announces: Announces::new(policy.announces),
            policy,
        }
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    pub fn is_complete(&self) -> bool {
        self.inner.is_complete()
    }

    pub fn in_flight(&self) -> u32 {
        self.inner.in_flight()
    }

    pub fn peer_count(&self) -> usize {
        self.inner.peer_count()
    }

    /// Whether `host` would be taken now (not banned, not backing off).
    pub fn admits(&self, host: u32, now: Nanos) -> bool {
        self.inner.admits(host, dur(now))
    }

    pub fn is_seeder(&self, host: u32) -> bool {
        self.inner.is_seeder(host)
    }

    pub fn is_origin(&self, host: u32) -> bool {
        self.inner.is_origin(host)
    }

    /// The agent's choice of listed peers to probe ([`session::to_probe`]).
    pub fn to_probe(
        &self,
        listed: impl IntoIterator<Item = Listed<u32>>,
        now: Nanos,
        busy: impl Fn(u32) -> bool,
    ) -> Vec<Listed<u32>> {
        session::to_probe(&self.inner, listed, dur(now), busy)
    }

    /// The agent's rule for a lead ([`session::takes_lead`]).
    pub fn takes_lead(&self, host: u32, now: Nanos, busy: bool) -> bool {
        session::takes_lead(&self.inner, host, dur(now), busy)
    }

    /// When the last piece arrived (or the download started).
    pub fn last_progress(&self) -> Nanos {
        nanos(self.inner.last_progress())
    }

    /// What the progress timer says at `now`: re-plan (once per stall) or fail.
    pub fn stall(&mut self, now: Nanos) -> Option<Stall> {
        self.progress.check(dur(now), self.inner.last_progress())
    }

    /// When [`stall`](Self::stall) next has something to say without a new piece.
    pub fn next_stall_check(&self) -> Nanos {
        nanos(self.progress.next_check(self.inner.last_progress()))
    }

    /// A peer answered with its bitfield; false if the scheduler turned it away.
    pub fn add_peer(&mut self, host: u32, origin: bool, bits: Bitfield, now: Nanos) -> bool {
        self.inner.add_peer(host, origin, bits, dur(now)).is_ok()
    }

    /// `host` announced it now holds `piece`.
    pub fn on_have(&mut self, host: u32, piece: u32) {
        self.inner.on_have(host, piece);
    }

    /// A peer could not be reached (its bitfield did not come).
    pub fn back_off(&mut self, host: u32, now: Nanos) {
        self.inner.back_off(host, dur(now));
    }

    /// Cancels every request and forgives back-offs (a download that stopped progressing),
    /// and asks for an announce at once (or as soon as the one in flight is answered).
    pub fn replan(&mut self, now: Nanos) {
        self.inner.replan();
        self.announces.replan(dur(now));
    }

    /// Whether an announce is due at `now`; if so it counts as sent.
    pub fn announce_due(&mut self, now: Nanos) -> bool {
        self.announces.poll(dur(now))
    }

    /// The tracker answered the announce in flight.
    pub fn on_announce_answer(&mut self, now: Nanos) {
        self.announces.on_answer(dur(now));
    }

    /// When the next announce is due, unless one is in flight.
    pub fn next_announce(&self) -> Option<Nanos> {
        self.announces.next_wakeup().map(nanos)
    }

    /// Expires overdue requests and fills the pipelines: cancels first, then requests.
    pub fn poll(&mut self, now: Nanos, out: &mut Vec<Action<u32>>) {
        self.inner.poll(dur(now), out);
    }

    /// A requested piece arrived (and verified).
    pub fn on_piece(&mut self, host: u32, piece: u32, now: Nanos) {
        self.inner.on_piece(host, piece, dur(now));
    }

    /// The first blocks of a requested piece came fast enough to offer it early, or not:
    /// the download's cap on requests in flight grows or shrinks.
    pub fn on_first_blocks(&mut self, fast: bool) {
        self.inner.on_first_blocks(fast);
    }

    /// How many requests the download may have in flight now.
    pub fn in_flight_cap(&self) -> u32 {
        self.inner.in_flight_cap()
    }

    /// A request failed (refused, reset).
    pub fn on_failure(&mut self, host: u32, piece: u32, now: Nanos, failure: Failure) {
        self.inner.on_failure(host, piece, dur(now), failure);
    }

    /// When [`poll`](Self::poll) next has something to do without another event.
    pub fn next_wakeup(&self, now: Nanos) -> Option<Nanos> {
        self.inner.next_wakeup(dur(now)).map(nanos)
    }
}

/// An origin's first copies first (the origin's own [`session::FirstCopies`]) on the
/// virtual clock.
#[derive(Debug)]
pub struct FirstCopies(session::FirstCopies);

impl FirstCopies {
    /// A blob of `pieces` pieces whose waves last at most `longest`, the first from `now`.
    pub fn new(pieces: u32, longest: Nanos, now: Nanos) -> Self {
        Self(session::FirstCopies::new(pieces, dur(longest), dur(now)))
    }

    /// Whether `piece` may be served at `now` (recorded if so).
    pub fn admit(&mut self, piece: u32, now: Nanos) -> bool {
        self.0.admit(piece, dur(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn requests(actions: &[Action<u32>]) -> Vec<(u32, u32)> {
        actions.iter().filter_map(Action::as_request).collect()
    }

    #[test]
    fn agent_constants_follow_the_piece_size() {
        let c = Policy::agent(4 << 20).scheduler;
        assert_eq!((c.max_in_flight, c.peer_pipeline, c.seeder_pipeline, c.max_pipeline), (4, 4, 2, 4));
        let p = Policy::agent(256 << 10);
        let c = &p.scheduler;
        assert_eq!((c.max_in_flight, c.peer_pipeline, c.seeder_pipeline, c.max_pipeline), (64, 4, 2, 32));
        assert_eq!(c.max_peers, 10);
        assert_eq!(p.announces, Schedule::AGENT);
        assert_eq!(p.progress_timeout, 60 * SEC);
    }

    #[test]
    fn virtual_time_drives_deadlines() {
        // 1 MiB pieces to a seeder at its starting depth of 2, at 1 MiB/s: 2 s scaled, so
        // the 5 s floor.
        let mut policy = Policy::agent(1 << 20);
        policy.scheduler.window = 0;
        let mut s = Scheduler::new(8, 1 << 20, 3, policy);
        assert!(s.add_peer(7, false, Bitfield::full(8), SEC));
        let mut out = Vec::new();
        s.poll(SEC, &mut out);
        let got = requests(&out);
        assert_eq!(got.len(), 2, "a seeder at depth 2: {got:?}");
        assert_eq!(s.next_wakeup(SEC), Some(SEC + 5 * SEC), "the floor");
        s.on_piece(7, got[0].1, 2 * SEC);
        assert_eq!(s.last_progress(), 2 * SEC);
        out.clear();
        s.poll(9 * SEC, &mut out);
        assert_eq!(out.iter().filter(|a| matches!(a, Action::Cancel { .. })).count(), 1, "{out:?}");
        assert!(!s.admits(7, 9 * SEC), "the slow peer backs off");
    }
}

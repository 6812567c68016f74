//! The swarm scheduler: which (peer, piece) requests one download issues, and when.
//!
//! A pure state machine (no I/O, no real clock, no global randomness): the driver reports
//! what peers hold and what happened to each request, passing `now` as a [`Duration`] since
//! any fixed start (the agent uses the download's start, a simulator its virtual clock), and
//! collects [`Action`]s from [`Scheduler::poll`]. Everything it decides comes out of `poll`,
//! so a driver has exactly one place to act.
//!
//! Policy, in the order it applies:
//! - **Front window**: the lowest missing pieces (up to [`Config::window`]) are fetched in
//!   order first, so the verified prefix streamed to a waiting client keeps growing.
//! - **Rarest first** otherwise, among pieces neither held nor in flight, with a random
//!   tie-break (a random start in the free list on every pick) so that peers starting
//!   together spread over different pieces. The scan stops after [`SAMPLE`] candidates the
//!   peer holds, or at once on a piece only one peer holds: a pick costs O(sample), not
//!   O(pieces), when peers hold much of the blob.
//! - **Origins are a fallback**: an origin is asked only for pieces no other known peer
//!   holds, not counting peers that are backing off (a dead or stalled seeder must not hide
//!   its pieces from the origin). Seeders are asked first, then other agents, origins last. While other agents
//!   are known, origin requests walk the blob from a random per-download start (so agents
//!   that cannot see each other's requests in flight take disjoint runs of pieces), jump to
//!   a random free piece when the walk runs into a piece another agent holds (rather than
//!   racing that agent along its run), skip the front window, and are capped at
//!   [`Config::shared_origin_pipeline`].
//! - **Pipelines**: each peer has a depth of requests in flight, deeper for seeders and
//!   origins, grown by one when a piece comes back in under a quarter of its deadline,
//!   halved on a timeout. A download-wide cap bounds piece buffers in memory.
//! - **Deadlines** scale with the piece size and the peer's depth:
//!   `max(timeout_floor, piece_len * depth / min_rate)`. A request past its deadline is
//!   cancelled, its piece becomes free for another peer, and the slow peer backs off.
//! - **Endgame**: once every missing piece is in flight, idle pipelines duplicate the
//!   outstanding requests (up to [`Config::endgame_copies`] copies of a piece, never twice
//!   to one peer); when a copy arrives the others are cancelled.
//! - **Peer standing**: a peer that sent a bad piece is banned for this blob (never asked
//!   again, even if re-added); a peer that fails or stalls backs off, exponentially with
//!   its consecutive failures; a delivered piece clears its failures. A peer that answers
//!   Busy (no upload budget free) is only paused for [`Config::busy_pause`], its pipeline
//!   cut to what it accepted; its pieces still count as available.
//! - **Peer cap**: at most [`Config::max_peers`] peers; when full, a seeder or origin
//!   displaces the agent holding the fewest pieces.
//! - **Re-plan**: [`Scheduler::replan`] cancels every request and forgives back-offs, for a
//!   download that stopped progressing.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, DefaultHasher, Hash};
use std::time::Duration;

use crate::bitfield::Bitfield;

/// Maps with fixed hash keys: iteration order (which request is cancelled first, which of
/// two equally weak peers is displaced) then depends only on the calls made, so a driver
/// with a fixed seed gets the same actions every run. Keys are the driver's peers, at most
/// [`Config::max_peers`] of them, not attacker-chosen in bulk.
type Map<K, V> = HashMap<K, V, BuildHasherDefault<DefaultHasher>>;

/// Candidates a rarest-first pick examines (among pieces the peer holds) before settling.
pub const SAMPLE: u32 = 32;

/// Tuning of a [`Scheduler`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Pieces at the front of the missing range fetched in order.
    pub window: u32,
    /// Starting depth of an agent still downloading.
    pub peer_pipeline: u32,
    /// Starting depth of a seeder or origin.
    pub seeder_pipeline: u32,
    /// Deepest pipeline to an origin while other agents are known: agents that cannot see
    /// each other's requests in flight would otherwise fetch the same pieces from it.
    pub shared_origin_pipeline: u32,
    /// Deepest a pipeline grows.
    pub max_pipeline: u32,
    /// Requests in flight for the whole download.
    pub max_in_flight: u32,
    /// Peers kept per download.
    pub max_peers: usize,
    /// Shortest deadline of a request.
    pub timeout_floor: Duration,
    /// Slowest transfer rate (bytes/s) a peer may deliver before a request times out.
    pub min_rate: u64,
    /// First back-off of a failing peer; doubled on each consecutive failure.
    pub backoff: Duration,
    /// Longest back-off.
    pub max_backoff: Duration,
    /// Copies of one piece in flight at once during the endgame.
    pub endgame_copies: u32,
    /// How long a peer that answered Busy is not asked again.
    pub busy_pause: Duration,
}

/// Pieces at the front of the missing range an agent fetches in order, so the prefix
/// streamed to waiting clients keeps growing.
pub const AGENT_WINDOW: u32 = 8;
/// Piece buffers an agent's download keeps in flight, in bytes (bounds memory, not
/// throughput).
pub const AGENT_IN_FLIGHT_BYTES: u64 = 16 << 20;

impl Config {
    /// The agent's download policy for pieces of `piece_len` bytes and at most `max_peers`
    /// peers (the simulator uses the same).
    pub fn for_agent(piece_len: u64, max_peers: usize) -> Self {
        let max_in_flight = (AGENT_IN_FLIGHT_BYTES / piece_len.max(1)).clamp(4, 64) as u32;
        Self {
            window: AGENT_WINDOW,
            peer_pipeline: 4.min(max_in_flight),
            seeder_pipeline: 8.min(max_in_flight),
            max_pipeline: 32.min(max_in_flight),
            max_in_flight,
            max_peers: max_peers.max(1),
            ..Self::default()
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            window: 8,
            peer_pipeline: 4,
            seeder_pipeline: 8,
            shared_origin_pipeline: 1,
            max_pipeline: 32,
            max_in_flight: 64,
            max_peers: 32,
            timeout_floor: Duration::from_secs(5),
            min_rate: 1 << 20,
            backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
            endgame_copies: 2,
            busy_pause: Duration::from_millis(250),
        }
    }
}

/// What the driver must do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action<P> {
    /// Ask `peer` for piece `index`; report the answer with [`Scheduler::on_piece`] or
    /// [`Scheduler::on_failure`] (answers must be reported even after a deadline).
    Request { peer: P, index: u32 },
    /// Drop the request for `index` to `peer` (lost an endgame race, timed out, peer banned
    /// or displaced). Its answer, if one still comes, may be reported or ignored.
    Cancel { peer: P, index: u32 },
}

impl<P: Copy> Action<P> {
    /// `(peer, index)` of a request.
    pub fn as_request(&self) -> Option<(P, u32)> {
        match *self {
            Self::Request { peer, index } => Some((peer, index)),
            Self::Cancel { .. } => None,
        }
    }

    /// `(peer, index)` of a cancel.
    pub fn as_cancel(&self) -> Option<(P, u32)> {
        match *self {
            Self::Cancel { peer, index } => Some((peer, index)),
            Self::Request { .. } => None,
        }
    }
}

/// How a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The bytes did not verify, or the peer broke the protocol: ban it for this blob.
    Bad,
    /// Unreachable, refused, reset: back the peer off.
    Unavailable,
    /// The peer is alive and holds the piece but has no upload slot free: pause asking it
    /// for [`Config::busy_pause`] and shrink its pipeline to what it accepted. Not a
    /// failure: no exponential back-off, and its pieces still count as available (an
    /// origin is not asked for them because a peer is busy).
    Busy,
    /// An origin declined this piece for now (it already sent it to another agent, which
    /// will share it): ask the origin for other pieces, and for this one not before
    /// [`DEFER`] has passed. No back-off.
    Deferred,
}

/// How long an origin is not asked again for a piece it deferred.
pub const DEFER: Duration = Duration::from_secs(1);

/// Why [`Scheduler::add_peer`] turned a peer away.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AddPeerError {
    #[error("peer is banned for this blob")]
    Banned,
    #[error("peer is backing off")]
    BackingOff,
    #[error("peer cap reached")]
    Full,
    #[error("bitfield does not fit the blob")]
    Misfit,
}

#[derive(Debug)]
struct Peer {
    bits: Bitfield,
    held: u32,
    origin: bool,
    in_flight: u32,
    depth: u32,
    /// Backing off: its pieces do not count as available (so an origin may serve them).
    suspended: bool,
}

impl Peer {
    fn seeder(&self) -> bool {
        self.held == self.bits.len()
    }

    /// Pick order: seeders, agents, origins.
    fn rank(&self) -> u8 {
        if self.origin {
            2
        } else if self.seeder() {
            0
        } else {
            1
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Standing {
    banned: bool,
    failures: u32,
    until: Duration,
}

#[derive(Debug, Clone, Copy)]
struct Outstanding {
    sent: Duration,
    deadline: Duration,
}

#[derive(Debug, Clone, Copy, Default)]
struct Piece {
    have: bool,
    /// Copies in flight.
    copies: u32,
    /// Non-origin peers holding it, not counting peers that are backing off.
    avail: u32,
    /// Origins are not asked for it before this time (it was deferred).
    origin_after: Duration,
    /// Position in `free`, when free (missing and not in flight).
    slot: u32,
}

const NOT_FREE: u32 = u32::MAX;

/// Scheduling state of one download, keyed by a peer identifier `P`.
#[derive(Debug)]
pub struct Scheduler<P> {
    config: Config,
    piece_len: u64,
    pieces: Vec<Piece>,
    /// Pieces missing and not in flight, in no particular order.
    free: Vec<u32>,
    have: u32,
    first_missing: u32,
    peers: Map<P, Peer>,
    /// Peers in pick order (see [`Peer::rank`]), kept sorted on insertion.
    order: Vec<P>,
    standing: Map<P, Standing>,
    requests: Map<(P, u32), Outstanding>,
    /// Peers each in-flight piece is requested from.
    holders: Map<u32, Vec<P>>,
    in_flight: u32,
    pending: Vec<Action<P>>,
    /// Non-origin peers known.
    agents: usize,
    /// Where the next origin pick starts looking (see the module doc).
    origin_cursor: u32,
    rng: u64,
    last_progress: Duration,
    /// The `now` of the latest [`poll`](Self::poll).
    clock: Duration,
    /// When deferrals end, in order (each lasts [`DEFER`] from a later `now`).
    defer_ends: std::collections::VecDeque<Duration>,
}

impl<P: Copy + Eq + Hash + std::fmt::Debug> Scheduler<P> {
    /// A download of `have.len()` pieces of `piece_len` bytes, of which those set in `have`
    /// are already held (a resumed download). `seed` drives every random choice: pass a
    /// random number, or a fixed one for a reproducible simulation.
    pub fn new(have: &Bitfield, piece_len: u32, seed: u64, config: Config) -> Self {
        let n = have.len();
        let mut pieces = vec![Piece::default(); n as usize];
        let mut free = Vec::with_capacity(n as usize);
        for (i, p) in pieces.iter_mut().enumerate() {
            if have.get(i as u32) {
                p.have = true;
                p.slot = NOT_FREE;
            } else {
                p.slot = free.len() as u32;
                free.push(i as u32);
            }
        }
        let mut s = Self {
            config,
            piece_len: u64::from(piece_len),
            pieces,
            free,
            have: have.count(),
            first_missing: (0..n).find(|&i| !have.get(i)).unwrap_or(n),
            peers: Map::default(),
            order: Vec::new(),
            standing: Map::default(),
            requests: Map::default(),
            holders: Map::default(),
            in_flight: 0,
            pending: Vec::new(),
            agents: 0,
            origin_cursor: 0,
            rng: seed | 1,
            last_progress: Duration::ZERO,
            clock: Duration::ZERO,
            defer_ends: std::collections::VecDeque::new(),
        };
        if n > 0 {
            s.origin_cursor = (s.random() % u64::from(n)) as u32;
        }
        s
    }

    /// Pieces in the blob.
    pub fn len(&self) -> u32 {
        self.pieces.len() as u32
    }

    pub fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }

    /// Pieces held.
    pub fn have_count(&self) -> u32 {
        self.have
    }

    pub fn is_complete(&self) -> bool {
        self.have == self.len()
    }

    /// Requests outstanding.
    pub fn in_flight(&self) -> u32 {
        self.in_flight
    }

    /// Peers known (not counting banned or removed ones).
    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }

    /// When the last piece arrived (or the download started, or was re-planned).
    pub fn last_progress(&self) -> Duration {
        self.last_progress
    }

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
            Failure::Unavailable => self.back_off(peer, now),
            Failure::Busy => {
                if let Some(p) = self.peers.get_mut(&peer) {
                    p.depth = p.in_flight.clamp(1, p.depth.max(1));
                }
                let s = self.standing.entry(peer).or_default();
                s.until = s.until.max(now + self.config.busy_pause);
            }
            Failure::Deferred => {
                self.pieces[index as usize].origin_after = now + DEFER;
                self.defer_ends.push_back(now + DEFER);
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
    fn resume_expired(&mut self, now: Duration) {
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

    /// Expires overdue requests and fills every pipeline. Appends to `out` the cancels first,
    /// then the new requests.
    pub fn poll(&mut self, now: Duration, out: &mut Vec<Action<P>>) {
        let overdue: Vec<(P, u32)> =
            self.requests.iter().filter(|(_, r)| r.deadline <= now).map(|(&k, _)| k).collect();
        let mut slow: Vec<P> = Vec::new();
        for (peer, index) in overdue {
            self.drop_request(peer, index);
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
            if self.in_flight >= self.config.max_in_flight {
                break;
            }
            if self.standing.get(&peer).is_some_and(|s| s.until > now) {
                continue;
            }
            while self.in_flight < self.config.max_in_flight {
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
        let scaled = Duration::from_secs_f64((self.piece_len * u64::from(p.depth)) as f64 / rate as f64);
        let deadline = now + scaled.max(self.config.timeout_floor);
        self.requests.insert((peer, index), Outstanding { sent: now, deadline });
        self.holders.entry(index).or_default().push(peer);
        self.pieces[index as usize].copies += 1;
        self.in_flight += 1;
    }

    /// Forgets one outstanding request; frees its piece if no copy remains in flight.
    fn drop_request(&mut self, peer: P, index: u32) -> Option<Outstanding> {
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

    fn random(&mut self) -> u64 {
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
                    if piece.avail == 0 && piece.origin_after <= self.clock {
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
        p.bits.get(index) && (!p.origin || (piece.avail == 0 && piece.origin_after <= self.clock))
    }

    fn pick(&mut self, peer: P) -> Option<u32> {
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

    fn cfg() -> Config {
        Config {
            window: 0,
            peer_pipeline: 2,
            seeder_pipeline: 2,
            shared_origin_pipeline: 8,
            max_pipeline: 4,
            max_in_flight: 64,
            max_peers: 8,
            timeout_floor: Duration::from_secs(2),
            min_rate: 1 << 20,
            backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(8),
            endgame_copies: 2,
            busy_pause: Duration::from_millis(250),
        }
    }

    const T0: Duration = Duration::ZERO;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn poll(s: &mut Scheduler<u8>, now: Duration) -> Vec<Action<u8>> {
        let mut out = Vec::new();
        s.poll(now, &mut out);
        out
    }

    fn requests(actions: &[Action<u8>]) -> Vec<(u8, u32)> {
        actions.iter().filter_map(Action::as_request).collect()
    }

    fn cancels(actions: &[Action<u8>]) -> Vec<(u8, u32)> {
        actions.iter().filter_map(Action::as_cancel).collect()
    }

    #[test]
    fn rarest_first_and_pipeline_depth() {
        let mut s = Scheduler::new(&Bitfield::new(6), 1 << 20, 7, cfg());
        s.add_peer(1, false, bits(6, &[0, 1, 2, 3, 4]), T0).expect("add");
        s.add_peer(2, false, Bitfield::full(6), T0).expect("add");
        s.add_peer(3, false, bits(6, &[0, 1, 2, 3, 4]), T0).expect("add");
        let got = requests(&poll(&mut s, T0));
        // Piece 5 is held by one peer only: peer 2 asks for it first. Each peer gets 2.
        assert_eq!(got[0], (2, 5), "{got:?}");
        assert_eq!(got.len(), 6, "three peers, six pieces: {got:?}");
        for peer in 1..=3 {
            assert!(got.iter().filter(|(p, _)| *p == peer).count() <= 2, "depth 2: {got:?}");
        }
        let mut pieces: Vec<u32> = got.iter().map(|&(_, i)| i).collect();
        pieces.sort();
        assert_eq!(pieces, vec![0, 1, 2, 3, 4, 5], "no duplicates outside the endgame");
    }

    #[test]
    fn random_tie_break_spreads_downloads_starting_together() {
        // Ten downloaders facing the same seeder pick different first pieces.
        let firsts: std::collections::HashSet<u32> = (0..10u64)
            .map(|k| {
                let mut s = Scheduler::new(
                    &Bitfield::new(1000),
                    1 << 20,
                    2 * k + 1,
                    Config { peer_pipeline: 1, seeder_pipeline: 1, ..cfg() },
                );
                s.add_peer(1, false, Bitfield::full(1000), T0).expect("add");
                requests(&poll(&mut s, T0))[0].1
            })
            .collect();
        assert!(firsts.len() >= 8, "{firsts:?}");
    }

    #[test]
    fn front_window_goes_in_order() {
        let mut s =
            Scheduler::new(&Bitfield::new(20), 1 << 20, 3, Config { window: 3, seeder_pipeline: 3, ..cfg() });
        s.add_peer(1, false, Bitfield::full(20), T0).expect("add");
        assert_eq!(requests(&poll(&mut s, T0)), vec![(1, 0), (1, 1), (1, 2)]);
        s.on_piece(1, 0, secs(1));
        s.on_piece(1, 1, secs(1));
        assert_eq!(requests(&poll(&mut s, secs(1))), vec![(1, 3), (1, 4)], "the window slid to [2, 5)");
    }

    #[test]
    fn resumed_pieces_are_never_requested() {
        let mut s = Scheduler::new(&bits(3, &[0, 2]), 1 << 20, 1, cfg());
        assert_eq!(s.have_count(), 2);
        s.add_peer(1, false, Bitfield::full(3), T0).expect("add");
        assert_eq!(requests(&poll(&mut s, T0)), vec![(1, 1)]);
        s.on_piece(1, 1, T0);
        assert!(s.is_complete());
        assert!(poll(&mut s, T0).is_empty());
    }

    #[test]
    fn pieces_of_a_backing_off_seeder_come_from_the_origin() {
        let mut s = Scheduler::new(&Bitfield::new(4), 1 << 20, 1, Config { seeder_pipeline: 2, ..cfg() });
        s.add_peer(1, false, Bitfield::full(4), T0).expect("seeder");
        s.add_peer(9, true, Bitfield::new(4), T0).expect("origin");
        let first = requests(&poll(&mut s, T0));
        assert!(first.iter().all(|(p, _)| *p == 1), "the seeder first, the origin not at all: {first:?}");
        // The seeder stalls: its requests time out, it backs off, and the origin takes over.
        let later = requests(&poll(&mut s, secs(10)));
        assert!(!later.is_empty() && later.iter().all(|(p, _)| *p == 9), "{later:?}");
        // Once its back-off ends, the seeder counts again: the origin is not asked for more.
        for (p, i) in later {
            s.on_piece(p, i, secs(11));
        }
        let resumed = requests(&poll(&mut s, secs(60)));
        assert!(!resumed.is_empty() && resumed.iter().all(|(p, _)| *p == 1), "{resumed:?}");
    }

    #[test]
    fn a_deferred_piece_is_not_asked_of_the_origin_again_for_a_while() {
        let mut s = Scheduler::new(&Bitfield::new(3), 1 << 20, 1, Config { seeder_pipeline: 1, ..cfg() });
        s.add_peer(9, true, Bitfield::new(3), T0).expect("origin");
        let (_, first) = requests(&poll(&mut s, T0))[0];
        s.on_failure(9, first, T0, Failure::Deferred);
        assert!(s.admits(9, T0), "no back-off");
        let next = requests(&poll(&mut s, T0));
        assert_eq!(next.len(), 1);
        assert_ne!(next[0].1, first, "another piece meanwhile");
        assert_eq!(s.next_wakeup(T0), Some(DEFER), "wakes when the deferral ends");
        s.on_piece(9, next[0].1, T0);
        let third = requests(&poll(&mut s, T0));
        assert!(third.iter().all(|(_, i)| *i != first), "{third:?}");
        for (p, i) in third {
            s.on_piece(p, i, T0);
        }
        assert!(requests(&poll(&mut s, T0)).is_empty(), "only the deferred piece is left");
        assert_eq!(requests(&poll(&mut s, DEFER)), vec![(9, first)]);
    }

    #[test]
    fn origin_is_asked_only_for_pieces_no_peer_holds() {
        let mut s = Scheduler::new(&Bitfield::new(6), 1 << 20, 5, Config { seeder_pipeline: 8, ..cfg() });
        s.add_peer(9, true, Bitfield::new(6), T0).expect("origin");
        s.add_peer(1, false, bits(6, &[0, 1]), T0).expect("add");
        let got = requests(&poll(&mut s, T0));
        let from_origin: Vec<u32> = got.iter().filter(|(p, _)| *p == 9).map(|&(_, i)| i).collect();
        let mut from_origin_sorted = from_origin.clone();
        from_origin_sorted.sort();
        assert_eq!(from_origin_sorted, vec![2, 3, 4, 5], "{got:?}");
        // The peer learns piece 3 before anyone asks: the origin is not used for it later.
        let mut s = Scheduler::new(&Bitfield::new(2), 1 << 20, 5, cfg());
        s.add_peer(9, true, Bitfield::new(2), T0).expect("origin");
        s.add_peer(1, false, Bitfield::new(2), T0).expect("add");
        s.on_have(1, 1);
        let got = requests(&poll(&mut s, T0));
        assert!(got.contains(&(9, 0)) && got.contains(&(1, 1)) && got.len() == 2, "{got:?}");
    }

    #[test]
    fn agents_sharing_an_origin_take_disjoint_runs_at_a_shallow_depth() {
        let shared = Config { window: 4, seeder_pipeline: 8, shared_origin_pipeline: 3, ..cfg() };
        let mut s = Scheduler::new(&Bitfield::new(100), 1 << 20, 11, shared);
        s.add_peer(9, true, Bitfield::new(100), T0).expect("origin");
        // Alone with the origin: the front window in order, at full depth.
        let got = requests(&poll(&mut s, T0));
        assert_eq!(got.len(), 8);
        assert_eq!(&got[..4], &[(9, 0), (9, 1), (9, 2), (9, 3)]);
        // Another agent appears: no more than 3 in flight to the origin, in one run.
        let mut s = Scheduler::new(&Bitfield::new(100), 1 << 20, 11, shared);
        s.add_peer(9, true, Bitfield::new(100), T0).expect("origin");
        s.add_peer(1, false, Bitfield::new(100), T0).expect("agent");
        let got = requests(&poll(&mut s, T0));
        assert_eq!(got.len(), 3, "{got:?}");
        let first = got[0].1;
        let run: Vec<(u8, u32)> = (0..3).map(|k| (9, (first + k) % 100)).collect();
        assert_eq!(got, run);
        // Pieces the other agent holds are skipped.
        s.on_have(1, (first + 3) % 100);
        s.on_piece(9, first, T0);
        let origin: Vec<(u8, u32)> = requests(&poll(&mut s, T0)).into_iter().filter(|r| r.0 == 9).collect();
        assert_eq!(origin, vec![(9, (first + 4) % 100)]);
    }

    #[test]
    fn endgame_duplicates_then_cancels_the_loser() {
        let mut s = Scheduler::new(
            &Bitfield::new(2),
            1 << 20,
            1,
            Config { peer_pipeline: 1, seeder_pipeline: 1, ..cfg() },
        );
        s.add_peer(1, false, Bitfield::full(2), T0).expect("add");
        let first = requests(&poll(&mut s, T0));
        assert_eq!(first.len(), 1);
        s.add_peer(2, false, Bitfield::full(2), T0).expect("add");
        let second = requests(&poll(&mut s, T0));
        assert_eq!(second.len(), 1);
        assert_ne!(first[0].1, second[0].1);
        s.add_peer(3, false, Bitfield::full(2), T0).expect("add");
        // Every missing piece is in flight: peer 3 duplicates one of them.
        let dup = requests(&poll(&mut s, T0));
        assert_eq!(dup.len(), 1, "{dup:?}");
        let index = dup[0].1;
        let original = if first[0].1 == index { 1 } else { 2 };
        s.on_piece(3, index, secs(1));
        assert_eq!(cancels(&poll(&mut s, secs(1))), vec![(original, index)]);
        // The loser's late answer is ignored.
        s.on_failure(original, index, secs(1), Failure::Unavailable);
        assert!(s.admits(original, secs(1)), "a cancelled request does not back the peer off");
        assert_eq!(s.have_count(), 1);
    }

    #[test]
    fn endgame_never_exceeds_copies_nor_asks_a_peer_twice() {
        let mut s = Scheduler::new(&Bitfield::new(1), 1 << 20, 1, cfg());
        for peer in 1..=4 {
            s.add_peer(peer, false, Bitfield::full(1), T0).expect("add");
        }
        let got = requests(&poll(&mut s, T0));
        assert_eq!(got.len(), 2, "two copies at most: {got:?}");
        assert_ne!(got[0].0, got[1].0);
        assert!(requests(&poll(&mut s, T0)).is_empty());
    }

    #[test]
    fn timeouts_re_dispatch_and_back_off_the_slow_peer() {
        let mut s = Scheduler::new(&Bitfield::new(1), 1 << 20, 1, Config { endgame_copies: 1, ..cfg() });
        s.add_peer(1, false, Bitfield::full(1), T0).expect("add");
        assert_eq!(requests(&poll(&mut s, T0)), vec![(1, 0)]);
        // Deadline: max(2 s floor, 1 MiB * depth 2 / 1 MiB/s) = 2 s.
        assert_eq!(s.next_wakeup(T0), Some(secs(2)));
        s.add_peer(2, false, Bitfield::full(1), T0).expect("add");
        assert!(requests(&poll(&mut s, secs(1))).is_empty(), "one copy only");
        let at_deadline = poll(&mut s, secs(2));
        assert_eq!(cancels(&at_deadline), vec![(1, 0)]);
        assert_eq!(requests(&at_deadline), vec![(2, 0)], "re-dispatched to another peer");
        assert!(!s.admits(1, secs(2)), "the slow peer backs off");
        assert!(s.admits(1, secs(3)));
        s.on_piece(2, 0, secs(3));
        assert!(s.is_complete());
        assert_eq!(s.last_progress(), secs(3));
    }

    #[test]
    fn wakeups_are_never_in_the_past() {
        let mut s = Scheduler::new(&Bitfield::new(2), 1 << 20, 1, cfg());
        s.add_peer(1, false, bits(2, &[0]), T0).expect("add");
        let r = requests(&poll(&mut s, T0));
        assert_eq!(r, vec![(1, 0)]);
        s.on_failure(1, 0, T0, Failure::Unavailable);
        assert_eq!(s.next_wakeup(T0), Some(secs(1)), "the back-off ends");
        // Past the back-off, with nothing in flight and nothing to ask: nothing to wake for.
        poll(&mut s, secs(1));
        s.on_failure(1, 0, secs(1), Failure::Unavailable);
        assert_eq!(s.next_wakeup(secs(5)), None);
    }

    #[test]
    fn a_busy_peer_is_paused_briefly_and_its_pieces_stay_off_the_origin() {
        let ms = Duration::from_millis;
        let mut s = Scheduler::new(&Bitfield::new(8), 1 << 20, 3, Config { seeder_pipeline: 4, ..cfg() });
        s.add_peer(1, false, Bitfield::full(8), T0).expect("add");
        s.add_peer(9, true, Bitfield::new(8), T0).expect("origin");
        let got = requests(&poll(&mut s, T0));
        assert_eq!(got.len(), 4, "the agent's pipeline fills; the origin holds nothing rare: {got:?}");
        assert!(got.iter().all(|(p, _)| *p == 1));
        // Two are refused Busy: the peer accepted two, so its pipeline is two.
        s.on_failure(1, got[2].1, T0, Failure::Busy);
        s.on_failure(1, got[3].1, T0, Failure::Busy);
        assert!(requests(&poll(&mut s, ms(100))).is_empty(), "paused, and not sent to the origin");
        assert_eq!(s.next_wakeup(ms(100)), Some(ms(250)), "the pause ends");
        assert!(s.admits(1, ms(250)), "a pause is not a back-off");
        s.on_piece(1, got[0].1, ms(200));
        let again = requests(&poll(&mut s, ms(250)));
        // Depth two, plus one for a piece that came back fast: three in flight again.
        assert_eq!(again.len(), 2, "{again:?}");
        assert!(again.iter().all(|(p, _)| *p == 1));
        // Busy again and again: still a short pause each time, never an exponential one.
        let mut outstanding = vec![got[1], again[0], again[1]];
        for k in 0..6u64 {
            let t = ms(1000 * (k + 1));
            for (p, i) in outstanding.drain(..) {
                s.on_failure(p, i, t, Failure::Busy);
            }
            assert!(!s.admits(1, t + ms(249)) && s.admits(1, t + ms(250)), "round {k}");
            let r = requests(&poll(&mut s, t + ms(250)));
            assert_eq!(r.len(), 1, "back to one in flight: {r:?}");
            outstanding = r;
        }
    }

    #[test]
    fn deadlines_scale_with_piece_size() {
        let mut s = Scheduler::new(&Bitfield::new(1), 16 << 20, 1, Config { seeder_pipeline: 1, ..cfg() });
        s.add_peer(1, false, bits(1, &[0]), T0).expect("add");
        poll(&mut s, T0);
        assert_eq!(s.next_wakeup(T0), Some(secs(16)), "16 MiB at 1 MiB/s");
    }

    #[test]
    fn banned_peers_are_never_asked_again() {
        let mut s = Scheduler::new(&Bitfield::new(3), 1 << 20, 1, cfg());
        s.add_peer(1, false, Bitfield::full(3), T0).expect("add");
        let got = requests(&poll(&mut s, T0));
        assert_eq!(got.len(), 2);
        s.on_failure(1, got[0].1, T0, Failure::Bad);
        // Its other request is cancelled, and it cannot come back.
        assert_eq!(cancels(&poll(&mut s, T0)), vec![got[1]]);
        assert_eq!(s.add_peer(1, false, Bitfield::full(3), secs(100)), Err(AddPeerError::Banned));
        assert!(!s.admits(1, secs(1000)));
        s.replan();
        assert_eq!(s.add_peer(1, false, Bitfield::full(3), secs(100)), Err(AddPeerError::Banned));
        s.add_peer(2, false, Bitfield::full(3), secs(100)).expect("add");
        assert!(requests(&poll(&mut s, secs(100))).iter().all(|(p, _)| *p == 2));
    }

    #[test]
    fn backoff_grows_and_expires() {
        let mut s = Scheduler::new(&Bitfield::new(4), 1 << 20, 1, Config { seeder_pipeline: 1, ..cfg() });
        s.add_peer(1, false, Bitfield::full(4), T0).expect("add");
        let r = requests(&poll(&mut s, T0))[0];
        s.on_failure(1, r.1, T0, Failure::Unavailable);
        assert!(requests(&poll(&mut s, Duration::from_millis(999))).is_empty(), "1 s back-off");
        let r = requests(&poll(&mut s, secs(1)))[0];
        s.on_failure(1, r.1, secs(1), Failure::Unavailable);
        assert!(requests(&poll(&mut s, Duration::from_millis(2999))).is_empty(), "2 s back-off");
        let r = requests(&poll(&mut s, secs(3)))[0];
        // A delivered piece clears the failures: the next back-off is 1 s again.
        s.on_piece(1, r.1, secs(3));
        let r = requests(&poll(&mut s, secs(3)))[0];
        s.on_failure(1, r.1, secs(3), Failure::Unavailable);
        assert_eq!(requests(&poll(&mut s, secs(4))).len(), 1);
        // A removed peer that is backing off is refused until its back-off ends.
        let r = requests(&poll(&mut s, secs(4)));
        assert!(r.is_empty());
        s.remove_peer(1);
        s.back_off(1, secs(4));
        assert_eq!(s.add_peer(1, false, Bitfield::full(4), secs(4)), Err(AddPeerError::BackingOff));
        assert!(s.add_peer(1, false, Bitfield::full(4), secs(60)).is_ok());
    }

    #[test]
    fn fast_peers_get_deeper_pipelines_and_timeouts_shrink_them() {
        let mut s = Scheduler::new(&Bitfield::new(100), 1 << 20, 1, Config { max_pipeline: 6, ..cfg() });
        s.add_peer(1, false, Bitfield::full(100), T0).expect("add");
        let mut now = T0;
        for _ in 0..6 {
            for (peer, index) in requests(&poll(&mut s, now)) {
                s.on_piece(peer, index, now + Duration::from_millis(10));
            }
            now += Duration::from_millis(10);
        }
        assert_eq!(requests(&poll(&mut s, now)).len(), 6, "grew to the 6 maximum");
        let later = now + secs(60);
        let expired = cancels(&poll(&mut s, later));
        assert_eq!(expired.len(), 6);
        assert_eq!(requests(&poll(&mut s, later + secs(10))).len(), 3, "halved");
    }

    #[test]
    fn peer_cap_prefers_seeders() {
        let mut s = Scheduler::new(&Bitfield::new(4), 1 << 20, 1, Config { max_peers: 2, ..cfg() });
        s.add_peer(1, false, bits(4, &[0]), T0).expect("add");
        s.add_peer(2, false, bits(4, &[0, 1]), T0).expect("add");
        assert_eq!(s.add_peer(3, false, bits(4, &[2]), T0), Err(AddPeerError::Full));
        s.add_peer(4, false, Bitfield::full(4), T0).expect("a seeder displaces the weakest");
        assert_eq!(s.peer_count(), 2);
        assert!(s.is_seeder(4));
        let got = requests(&poll(&mut s, T0));
        assert!(got.iter().all(|(p, _)| *p != 1), "peer 1 was displaced: {got:?}");
        assert_eq!(got[0].0, 4, "seeders are asked first");
        assert_eq!(s.add_peer(5, false, bits(3, &[0]), T0), Err(AddPeerError::Misfit));
    }

    #[test]
    fn replan_cancels_everything_and_forgives_backoffs() {
        let mut s = Scheduler::new(&Bitfield::new(4), 1 << 20, 1, cfg());
        s.add_peer(1, false, Bitfield::full(4), T0).expect("add");
        s.add_peer(2, false, Bitfield::full(4), T0).expect("add");
        let got = requests(&poll(&mut s, T0));
        assert_eq!(got.len(), 4);
        s.on_failure(2, got.iter().find(|(p, _)| *p == 2).expect("peer 2").1, T0, Failure::Unavailable);
        s.replan();
        let after = poll(&mut s, secs(1));
        assert_eq!(cancels(&after).len(), 3);
        assert_eq!(requests(&after).len(), 4, "both peers asked again, peer 2 forgiven");
    }

    #[test]
    fn the_same_calls_give_the_same_actions() {
        // Two downloads fed identically: every cancel (timeouts, a displaced peer) comes out
        // in the same order, which a seeded simulation needs to be reproducible.
        let run = || {
            let mut s = Scheduler::new(&Bitfield::new(64), 1 << 20, 9, Config { max_peers: 6, ..cfg() });
            for peer in 1..=6 {
                s.add_peer(peer, false, bits(64, &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]), T0).expect("add");
            }
            let mut log = poll(&mut s, T0);
            log.extend(poll(&mut s, secs(60)));
            s.add_peer(7, false, Bitfield::full(64), secs(60)).expect("a seeder displaces one");
            log.extend(poll(&mut s, secs(61)));
            log
        };
        let first = run();
        assert!(cancels(&first).len() >= 10, "{first:?}");
        for _ in 0..8 {
            assert_eq!(run(), first);
        }
    }

    #[test]
    fn out_of_range_reports_are_ignored() {
        let mut s = Scheduler::new(&Bitfield::new(2), 1 << 20, 1, cfg());
        s.on_have(1, 0);
        s.on_piece(1, 5, T0);
        s.on_failure(1, 0, T0, Failure::Bad);
        s.add_peer(1, false, Bitfield::new(2), T0).expect("unknown reports did not ban");
        s.on_have(1, 99);
        assert_eq!(s.have_count(), 0);
        assert!(requests(&poll(&mut s, T0)).is_empty());
    }
}

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
//!   halved on a timeout. A download-wide cap bounds piece buffers in memory; it starts
//!   low ([`Config::start_in_flight`]) and grows by one for each request whose first blocks
//!   come fast, shrinks by one for each whose first blocks come slowly
//!   ([`Scheduler::on_first_blocks`]): a host on a slow link keeps few requests in flight,
//!   so it does not hold many of a busy server's upload slots at a fraction of its rate.
//! - **Deadlines** scale with the piece size and the pieces a request may queue behind, its
//!   peer's depth or the download's requests in flight, whichever is more (they share one
//!   downlink): `max(timeout_floor, piece_len * max(depth, in_flight) / min_rate)`. Without
//!   the second, a host on a slow link times out its own requests and backs every peer
//!   off. A request past its deadline is
//!   cancelled, its piece becomes free for another peer, and the slow peer backs off.
//! - **Endgame**: once every missing piece is in flight, idle pipelines duplicate the
//!   outstanding requests (up to [`Config::endgame_copies`] copies of a piece, never twice
//!   to one peer); when a copy arrives the others are cancelled.
//! - **Peer standing**: a peer that sent a bad piece is banned for this blob (never asked
//!   again, even if re-added); a peer that fails or stalls backs off, exponentially with
//!   its consecutive failures; a delivered piece clears its failures. A peer that answers
//!   Busy (no upload budget free) is only paused, for [`Config::busy_pause`] doubled with
//!   each further Busy before it delivers a piece (at most [`Config::max_busy_pause`]), its
//!   pipeline cut to what it accepted; its pieces still count as available.
//! - **Peer cap**: at most [`Config::max_peers`] peers; when full, a seeder or origin
//!   displaces the agent holding the fewest pieces.
//! - **Re-plan**: [`Scheduler::replan`] cancels every request and forgives back-offs, for a
//!   download that stopped progressing.
//!
//! Layout: this module holds the state ([`Scheduler`]) and its read-only accessors;
//! `config` the tuning, `events` what goes in and out (actions, failures), `peers` the
//! peer set and what each holds, `dispatch` the poll loop and request bookkeeping, `pick`
//! which piece a peer is asked for, `standing` failures, bans, back-offs and wake-ups.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, DefaultHasher, Hash};
use std::time::Duration;

use crate::bitfield::Bitfield;

mod config;
mod dispatch;
mod events;
mod peers;
mod pick;
mod standing;
#[cfg(test)]
mod tests;

pub use config::{Config, AGENT_IN_FLIGHT_BYTES, AGENT_MIN_IN_FLIGHT, AGENT_START_IN_FLIGHT, AGENT_WINDOW};
pub use events::{Action, AddPeerError, Failure, DEFER};
pub use pick::SAMPLE;

use dispatch::Outstanding;
use peers::Peer;
use standing::Standing;

/// Maps with fixed hash keys: iteration order (which request is cancelled first, which of
/// two equally weak peers is displaced) then depends only on the calls made, so a driver
/// with a fixed seed gets the same actions every run. Keys are the driver's peers, at most
/// [`Config::max_peers`] of them, not attacker-chosen in bulk.
type Map<K, V> = HashMap<K, V, BuildHasherDefault<DefaultHasher>>;

#[derive(Debug, Clone, Copy, Default)]
struct Piece {
    have: bool,
    /// Copies in flight.
    copies: u32,
    /// Non-origin peers holding it, not counting peers that are backing off.
    avail: u32,
    /// Origins are not asked for it before this time (it was deferred).
    origin_after: Duration,
    /// A request for it to an agent timed out or failed: until this time origins may be
    /// asked for it whoever else offers it (a piece offered early by a slow relay is
    /// otherwise held up by that relay and every relay fed by it).
    stalled_until: Duration,
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
    /// Requests the download may have in flight now (see [`Config::start_in_flight`]).
    cap: u32,
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
            cap: {
                let (lo, hi) = config.in_flight_bounds();
                config.start_in_flight.clamp(lo, hi)
            },
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

    /// The configuration it was made with.
    pub fn config(&self) -> &Config {
        &self.config
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

    /// Requests the download may have in flight now (grown and shrunk by
    /// [`on_first_blocks`](Self::on_first_blocks)).
    pub fn in_flight_cap(&self) -> u32 {
        self.cap
    }

    /// Peers known (not counting banned or removed ones).
    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }

    /// When the last piece arrived (or the download started, or was re-planned).
    pub fn last_progress(&self) -> Duration {
        self.last_progress
    }
}

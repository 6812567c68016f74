//! Tuning of a download: [`Config`], its defaults, and the agent's policy
//! ([`Config::for_agent`]), which the simulator shares so its figures hold for agents.

use std::time::Duration;

#[cfg(doc)]
use super::Scheduler;

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
    /// Most requests in flight for the whole download.
    pub max_in_flight: u32,
    /// Requests in flight for the whole download at the start. The cap grows by one for
    /// each request whose first blocks arrive fast enough to be offered early
    /// ([`crate::session::EarlyOffer`]) and shrinks by one for each that does not, within
    /// [`min_in_flight`](Self::min_in_flight)..=[`max_in_flight`](Self::max_in_flight)
    /// ([`Scheduler::on_first_blocks`]). A driver that does not judge first blocks (whole
    /// pieces only) sets it to `max_in_flight`.
    pub start_in_flight: u32,
    /// Fewest requests in flight the cap shrinks to.
    pub min_in_flight: u32,
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
    /// How long a peer that answered Busy is not asked again; doubled for each further
    /// Busy before it delivers a piece.
    pub busy_pause: Duration,
    /// Longest Busy pause.
    pub max_busy_pause: Duration,
}

/// Pieces at the front of the missing range an agent fetches in order, so the prefix
/// streamed to waiting clients keeps growing.
pub const AGENT_WINDOW: u32 = 8;
/// Piece buffers an agent's download keeps in flight, in bytes (bounds memory, not
/// throughput).
pub const AGENT_IN_FLIGHT_BYTES: u64 = 16 << 20;
/// Requests an agent's download starts with in flight, before it has seen how fast pieces
/// come. Measured in the simulator with 1 MiB pieces (`shoal-sim --hosts 1000 --slow-hosts
/// 0.1`): with 16 in flight throughout, the origin's upload slots were held by slow hosts
/// each with 16 requests at a sixteenth of its link, and the fast hosts' p50 was 4.5x the
/// limit; starting at 4, growing with fast pieces and shrinking with slow ones, 1.133x
/// (starting at 16, 1.148x).
pub const AGENT_START_IN_FLIGHT: u32 = 4;
/// Fewest requests in flight an agent's download shrinks to when pieces come slowly.
pub const AGENT_MIN_IN_FLIGHT: u32 = 2;

impl Config {
    /// The agent's download policy for pieces of `piece_len` bytes and at most `max_peers`
    /// peers (the simulator uses the same).
    pub fn for_agent(piece_len: u64, max_peers: usize) -> Self {
        let max_in_flight = (AGENT_IN_FLIGHT_BYTES / piece_len.max(1)).clamp(4, 64) as u32;
        Self {
            window: AGENT_WINDOW,
            peer_pipeline: 4.min(max_in_flight),
            // Two: deeper, the first agents to reach the origin take many pieces from it
            // at a fraction of its uplink each, and the swarm waits on them (a 10 MiB blob
            // to 1000 hosts: 2.0x the limit at depth 2, 3.4x at 8).
            seeder_pipeline: 2.min(max_in_flight),
            max_pipeline: 32.min(max_in_flight),
            max_in_flight,
            start_in_flight: AGENT_START_IN_FLIGHT.min(max_in_flight),
            min_in_flight: AGENT_MIN_IN_FLIGHT.min(max_in_flight),
            max_peers: max_peers.max(1),
            ..Self::default()
        }
    }

    /// This policy for a download that takes whole pieces only (no cut-through): nothing
    /// judges first blocks, so the download keeps its most requests in flight from the start.
    pub fn whole_pieces(self) -> Self {
        Self { start_in_flight: self.max_in_flight, ..self }
    }

    /// The least and most requests in flight, each at least 1, the least never above the most.
    pub(super) fn in_flight_bounds(&self) -> (u32, u32) {
        let hi = self.max_in_flight.max(1);
        (self.min_in_flight.clamp(1, hi), hi)
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
            start_in_flight: 64,
            min_in_flight: 2,
            max_peers: 32,
            timeout_floor: Duration::from_secs(5),
            min_rate: 1 << 20,
            backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
            endgame_copies: 2,
            // Short, then doubling: a fixed 250 ms pause idled a peer for 75 MB of a
            // 300 MB/s link and held Kraken's scenario in the simulator at 1.33x the limit
            // (1.05x with this); 100 Mbit/s runs are unchanged, at about twice the Busy
            // answers (each a small frame on a stream).
            busy_pause: Duration::from_millis(10),
            max_busy_pause: Duration::from_millis(100),
        }
    }
}

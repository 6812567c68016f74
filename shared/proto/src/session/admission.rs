//! Which peers a download contacts: of those the tracker lists, and of the leads it hears
//! of between announces (an agent that subscribed to its pieces, a peer list from the
//! batched announce).
//!
//! A peer is probed (asked for its bitfield, or subscribed to) only if the scheduler would
//! take it (not banned, not backing off), it is not already known as a seeder, and the
//! driver is not already probing or following it. From an announce, at most the room left
//! under the peer cap is probed, but at least one, seeders and origins first, since they may
//! displace an agent when the cap is reached; a lead only while there is room. A probe
//! unanswered within [`PROBE_TIMEOUT`] backs the peer off.

use std::fmt::Debug;
use std::hash::Hash;
use std::net::SocketAddr;
use std::time::Duration;

use crate::messages::PeerInfo;
use crate::scheduler::Scheduler;

/// How long a download waits for a probed peer's bitfield (or its subscription's first
/// answer) before backing the peer off.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// A peer as the tracker lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listed<P> {
    pub peer: P,
    /// It holds the whole blob (a seeder).
    pub complete: bool,
    pub origin: bool,
}

impl From<PeerInfo> for Listed<SocketAddr> {
    fn from(p: PeerInfo) -> Self {
        Self { peer: p.addr, complete: p.complete, origin: p.origin }
    }
}

impl From<Listed<SocketAddr>> for PeerInfo {
    fn from(l: Listed<SocketAddr>) -> Self {
        Self { addr: l.peer, complete: l.complete, origin: l.origin }
    }
}

/// Of the peers an announce listed, in the tracker's order, those to probe now, in the
/// order to probe them. `busy` says which ones the driver already probes or follows (or
/// must not contact, such as itself).
pub fn to_probe<P: Copy + Eq + Hash + Debug>(
    sched: &Scheduler<P>,
    listed: impl IntoIterator<Item = Listed<P>>,
    now: Duration,
    busy: impl Fn(P) -> bool,
) -> Vec<Listed<P>> {
    let room = sched.config().max_peers.max(1).saturating_sub(sched.peer_count()).max(1);
    let mut wanted: Vec<Listed<P>> =
        listed.into_iter().filter(|l| wanted(sched, l.peer, now) && !busy(l.peer)).collect();
    // Seeders and origins first: they may displace agents when the cap is reached.
    wanted.sort_by_key(|l| (!l.complete, l.origin));
    wanted.truncate(room);
    wanted
}

/// Whether to probe `peer`, a lead heard of between announces, now; `busy` as for
/// [`to_probe`].
pub fn takes_lead<P: Copy + Eq + Hash + Debug>(
    sched: &Scheduler<P>,
    peer: P,
    now: Duration,
    busy: bool,
) -> bool {
    !busy && wanted(sched, peer, now) && sched.peer_count() < sched.config().max_peers.max(1)
}

fn wanted<P: Copy + Eq + Hash + Debug>(sched: &Scheduler<P>, peer: P, now: Duration) -> bool {
    sched.admits(peer, now) && !sched.is_seeder(peer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bitfield::Bitfield;
    use crate::scheduler::Config;

    const PIECES: u32 = 8;

    fn sched(max_peers: usize) -> Scheduler<u32> {
        Scheduler::new(&Bitfield::new(PIECES), 1 << 20, 5, Config::for_agent(1 << 20, max_peers))
    }

    fn agent(peer: u32) -> Listed<u32> {
        Listed { peer, complete: false, origin: false }
    }

    fn peers(l: &[Listed<u32>]) -> Vec<u32> {
        l.iter().map(|l| l.peer).collect()
    }

    #[test]
    fn seeders_and_origins_first_up_to_the_room_left() {
        let s = sched(3);
        let listed = [
            Listed { peer: 1, complete: true, origin: true },
            agent(2),
            Listed { peer: 3, complete: true, origin: false },
            agent(4),
        ];
        let got = to_probe(&s, listed, Duration::ZERO, |_| false);
        assert_eq!(peers(&got), vec![3, 1, 2], "seeder, origin, then agents in listed order");
    }

    #[test]
    fn skips_the_busy_the_backing_off_and_known_seeders_and_probes_one_when_full() {
        let mut s = sched(2);
        let t = Duration::from_secs(1);
        s.add_peer(10, false, Bitfield::full(PIECES), t).expect("taken");
        s.add_peer(11, false, Bitfield::new(PIECES), t).expect("taken");
        s.add_peer(12, false, Bitfield::new(PIECES), t).expect_err("full");
        s.back_off(11, t);
        let listed = [agent(10), agent(11), agent(13), agent(14), agent(15)];
        let got = to_probe(&s, listed, t, |p| p == 13);
        assert_eq!(peers(&got), vec![14], "10 is a known seeder, 11 backs off, 13 is busy; full: one");
        assert!(!takes_lead(&s, 14, t, false), "no lead is taken at the cap");
    }

    #[test]
    fn a_lead_is_taken_while_there_is_room() {
        let mut s = sched(2);
        let t = Duration::ZERO;
        assert!(takes_lead(&s, 7, t, false));
        assert!(!takes_lead(&s, 7, t, true), "already probing it");
        s.add_peer(7, false, Bitfield::full(PIECES), t).expect("taken");
        assert!(!takes_lead(&s, 7, t, false), "a known seeder");
        assert!(takes_lead(&s, 8, t, false));
    }
}

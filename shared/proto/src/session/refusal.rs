//! How a piece request that brought no piece counts for the scheduler.
//!
//! A peer that misbehaved (bad bytes, a broken protocol) is banned. A `Busy` refusal only
//! pauses the peer (it is alive and holds the piece). A `NotFound` from an origin means it
//! declined a piece it just sent to another agent (first copies first, see
//! [`FirstCopies`](super::FirstCopies)): the piece is deferred there, to come from that
//! agent. Anything else (unreachable, reset, another refusal) backs the peer off.

use crate::scheduler::Failure;
use crate::wire::Refusal;

/// How a piece request ended without a piece, as the driver saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Miss {
    /// The peer answered with a refusal.
    Refused(Refusal),
    /// The peer sent bytes that did not verify, or broke the protocol.
    Misbehaved,
    /// No answer: unreachable, reset, or another transport failure.
    Lost,
}

impl Miss {
    /// What to report to the scheduler for this miss from a peer that is (or is not) an
    /// origin.
    pub fn failure(self, from_origin: bool) -> Failure {
        match self {
            Self::Misbehaved => Failure::Bad,
            Self::Refused(Refusal::Busy) => Failure::Busy,
            Self::Refused(Refusal::NotFound) if from_origin => Failure::Deferred,
            Self::Refused(Refusal::NotFound | Refusal::Version) | Self::Lost => Failure::Unavailable,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_map_to_failures() {
        for origin in [false, true] {
            assert_eq!(Miss::Misbehaved.failure(origin), Failure::Bad);
            assert_eq!(Miss::Refused(Refusal::Busy).failure(origin), Failure::Busy);
            assert_eq!(Miss::Refused(Refusal::Version).failure(origin), Failure::Unavailable);
            assert_eq!(Miss::Lost.failure(origin), Failure::Unavailable);
        }
        assert_eq!(Miss::Refused(Refusal::NotFound).failure(true), Failure::Deferred, "first copies first");
        assert_eq!(
            Miss::Refused(Refusal::NotFound).failure(false),
            Failure::Unavailable,
            "an agent without the piece"
        );
    }
}

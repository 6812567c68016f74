//! The driver-facing vocabulary: what the scheduler asks the driver to do ([`Action`]),
//! how the driver reports a failed request ([`Failure`]), and why a peer is turned away
//! ([`AddPeerError`]).

use std::time::Duration;

#[cfg(doc)]
use super::{Config, Scheduler};

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

//! The download session's rules around the scheduler, as pure state on a caller's clock.
//!
//! The [`scheduler`](crate::scheduler) decides which peer is asked for which piece. The
//! rules here decide the rest of a download's and a server's timing: when a download that
//! stopped progressing is re-planned and when it fails ([`Progress`]), when it announces
//! itself to the tracker ([`Announces`]), which peers it contacts ([`to_probe`],
//! [`takes_lead`]), how a request that brought no piece counts ([`Miss`]), how far its
//! verified prefix reaches ([`Prefix`]), which piece an origin serves a second copy of
//! ([`FirstCopies`]), and which piece still arriving is offered to other peers
//! ([`EarlyOffer`]). Like the scheduler,
//! nothing here does I/O or reads a clock: the caller passes `now` as a [`Duration`] since
//! any fixed start. The agent's download loop (`agent/src/download/swarm.rs`) drives these
//! with real peers and a real clock; the simulator (`shoal-tests`, `sim`) drives the same
//! types on its virtual clock, so its figures come from the product's rules, not a copy.
//!
//! [`Duration`]: std::time::Duration

mod admission;
mod announce;
mod offer;
mod prefix;
mod progress;
mod refusal;
mod waves;

pub use admission::{takes_lead, to_probe, Listed, PROBE_TIMEOUT};
pub use announce::{Announces, Schedule};
pub use offer::{EarlyOffer, EARLY_OFFER_BLOCKS, EARLY_OFFER_WITHIN};
pub use prefix::Prefix;
pub use progress::{Progress, Stall};
pub use refusal::Miss;
pub use waves::{FirstCopies, LONGEST_WAVE};

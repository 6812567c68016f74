//! First copies first: when many agents pull one blob from an origin at once, the origin
//! hands out every piece once before it hands out any piece a second time, so the agents
//! have something to trade and the origin's uplink carries about one copy of the blob
//! instead of one per agent.
//!
//! Agents cannot see each other's requests in flight, so without this two of them often
//! ask the origin for the same piece at the same moment. A request for a piece already
//! served in the current wave is refused (the agent defers the piece at that origin and
//! takes it from a peer once that peer announces it); a wave ends when every piece has been
//! served, or after its longest length ([`LONGEST_WAVE`] at the origin); and a piece asked
//! for again [`PIECE_HOLD`] after its last copy goes out again, so an agent retrying a piece
//! whose copies did not spread waits at most that long.
//!
//! One [`FirstCopies`] tracks one blob. The origin's server keeps one per blob being served
//! (`origin/src/spread.rs`, on the origin's clock); the simulator keeps one per origin host
//! on its virtual clock.

use std::time::Duration;

use super::offer::EARLY_OFFER_WITHIN;

/// The origin's longest wave.
pub const LONGEST_WAVE: Duration = Duration::from_secs(30);

/// How long after a piece went out in a wave it may go out again in the same wave: the
/// longest a copy that spreads takes to be offered.
///
/// Agents stop asking the origin for a piece once one of them offers it. A copy arriving fast
/// enough is offered after its first blocks, and only a copy that would be whole within
/// [`EARLY_OFFER_WITHIN`] is; so a request for the piece later than that means its copies
/// went somewhere that does not pass them on soon (a slow link, relays fed by one, an agent
/// that left). Without this hold such a piece waited for the wave to end, and a wave whose
/// other pieces every agent already holds lasts its longest, as nobody asks the origin for
/// them: in the simulator, fast agents waited 30 s and more for the last piece of a 10 MiB
/// blob in 1 MiB pieces with a tenth of the hosts slow (43x-72x the limit; 5.5x-6.1x with
/// the hold, and 1,000 hosts at the defaults unchanged). A shorter hold (1-2 s) sent more
/// second copies from the origin and made the default runs slower.
pub const PIECE_HOLD: Duration = EARLY_OFFER_WITHIN;

/// Which pieces of one blob went out in the current wave, when, and since when the wave runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirstCopies {
    /// When each piece last went out in this wave.
    served: Vec<Option<Duration>>,
    count: u32,
    started: Duration,
    longest: Duration,
    hold: Duration,
}

impl FirstCopies {
    /// A blob of `pieces` pieces whose first wave starts at `now` and lasts at most
    /// `longest` (zero: every request starts a new wave, so every piece is admitted).
    pub fn new(pieces: u32, longest: Duration, now: Duration) -> Self {
        Self { served: vec![None; pieces as usize], count: 0, started: now, longest, hold: PIECE_HOLD }
    }

    /// The same with a piece going out again `hold` after its last copy (rather than
    /// [`PIECE_HOLD`]); at least the wave's longest turns the hold off.
    #[cfg(test)]
    fn with_hold(mut self, hold: Duration) -> Self {
        self.hold = hold;
        self
    }

    /// Pieces in the blob.
    pub fn pieces(&self) -> u32 {
        u32::try_from(self.served.len()).unwrap_or(u32::MAX)
    }

    /// When the current wave started.
    pub fn started(&self) -> Duration {
        self.started
    }

    /// Whether piece `index` may be served at `now`; records it if so. A new wave starts
    /// first if every piece went out in this one or it has lasted its longest. A piece that
    /// went out in this wave goes out again once the hold has passed since its last copy. A
    /// piece out of range is refused and changes nothing.
    pub fn admit(&mut self, index: u32, now: Duration) -> bool {
        if index >= self.pieces() {
            return false;
        }
        if self.count == self.pieces() || now.saturating_sub(self.started) >= self.longest {
            self.served.iter_mut().for_each(|b| *b = None);
            self.count = 0;
            self.started = now;
        }
        let slot = &mut self.served[index as usize];
        match *slot {
            Some(at) if now.saturating_sub(at) < self.hold => return false,
            Some(_) => {}
            None => self.count += 1,
        }
        *slot = Some(now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn every_piece_once_before_any_twice() {
        let mut w = FirstCopies::new(3, LONGEST_WAVE, secs(0));
        assert!(w.admit(0, secs(0)));
        assert!(!w.admit(0, secs(0)), "a second copy while pieces 1 and 2 never went out");
        assert!(w.admit(1, secs(1)));
        assert!(w.admit(2, secs(2)));
        assert_eq!(w.started(), secs(0));
        // Every piece went out: a new wave starts with the next request.
        assert!(w.admit(0, secs(3)));
        assert_eq!(w.started(), secs(3));
        assert!(!w.admit(0, secs(3)));
        assert!(!w.admit(3, secs(3)), "out of range");
        assert_eq!(w.started(), secs(3), "an out-of-range request starts no wave");
    }

    #[test]
    fn a_piece_goes_out_again_once_its_hold_has_passed() {
        let hold = PIECE_HOLD;
        let mut w = FirstCopies::new(100, LONGEST_WAVE, secs(0));
        assert!(w.admit(7, secs(0)));
        assert!(!w.admit(7, hold - secs(1)), "within the hold, while 99 pieces never went out");
        assert!(w.admit(7, hold), "the hold passed: the first copy did not spread");
        assert!(!w.admit(7, hold + secs(1)), "the hold runs from the last copy");
        assert!(w.admit(7, hold * 2));
        assert_eq!(w.started(), secs(0), "still the same wave");
        assert!(w.admit(8, hold * 2), "other pieces are untouched");
        assert!(!w.admit(8, hold * 2 + secs(1)));
    }

    #[test]
    fn a_wave_ends_after_its_longest() {
        let mut w = FirstCopies::new(100, secs(30), secs(5)).with_hold(secs(30));
        assert!(w.admit(7, secs(5)));
        assert!(!w.admit(7, secs(34)), "29 s into the wave");
        assert!(w.admit(7, secs(35)), "a lone agent retrying waits at most one wave");
        assert_eq!(w.started(), secs(35));
        assert!(!w.admit(7, secs(36)));
    }

    #[test]
    fn a_zero_wave_admits_everything() {
        let mut w = FirstCopies::new(4, Duration::ZERO, secs(0));
        for _ in 0..3 {
            assert!(w.admit(1, secs(0)));
        }
        assert_eq!(w.pieces(), 4);
    }
}

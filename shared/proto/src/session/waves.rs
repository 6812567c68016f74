//! First copies first: when many agents pull one blob from an origin at once, the origin
//! hands out every piece once before it hands out any piece a second time, so the agents
//! have something to trade and the origin's uplink carries about one copy of the blob
//! instead of one per agent.
//!
//! Agents cannot see each other's requests in flight, so without this two of them often
//! ask the origin for the same piece at the same moment. A request for a piece already
//! served in the current wave is refused (the agent defers the piece at that origin and
//! takes it from a peer once that peer announces it); a wave ends when every piece has been
//! served, or after its longest length ([`LONGEST_WAVE`] at the origin), so a lone agent
//! retrying a piece waits at most that long.
//!
//! One [`FirstCopies`] tracks one blob. The origin's server keeps one per blob being served
//! (`origin/src/spread.rs`, on the origin's clock); the simulator keeps one per origin host
//! on its virtual clock.

use std::time::Duration;

/// The origin's longest wave.
pub const LONGEST_WAVE: Duration = Duration::from_secs(30);

/// Which pieces of one blob went out in the current wave, and since when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirstCopies {
    served: Vec<bool>,
    count: u32,
    started: Duration,
    longest: Duration,
}

impl FirstCopies {
    /// A blob of `pieces` pieces whose first wave starts at `now` and lasts at most
    /// `longest` (zero: every request starts a new wave, so every piece is admitted).
    pub fn new(pieces: u32, longest: Duration, now: Duration) -> Self {
        Self { served: vec![false; pieces as usize], count: 0, started: now, longest }
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
    /// first if every piece went out in this one or it has lasted its longest. A piece out
    /// of range is refused and changes nothing.
    pub fn admit(&mut self, index: u32, now: Duration) -> bool {
        if index >= self.pieces() {
            return false;
        }
        if self.count == self.pieces() || now.saturating_sub(self.started) >= self.longest {
            self.served.iter_mut().for_each(|b| *b = false);
            self.count = 0;
            self.started = now;
        }
        let slot = &mut self.served[index as usize];
        if *slot {
            return false;
        }
        *slot = true;
        self.count += 1;
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
    fn a_wave_ends_after_its_longest() {
        let mut w = FirstCopies::new(100, secs(30), secs(5));
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

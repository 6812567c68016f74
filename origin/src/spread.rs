//! First copies first, per blob: the origin hands out every piece of a blob once before it
//! hands out any piece a second time, unless that piece's copies did not spread within the
//! hold (see [`FirstCopies`] in the protocol core for the rule and why; the simulator drives
//! the same type).
//!
//! This module only keeps one wave per blob being served, on the origin's clock, and bounds
//! how many it remembers.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use shoal_shared::digest::Digest;
use shoal_shared::session::FirstCopies;
pub use shoal_shared::session::LONGEST_WAVE as WAVE;

/// Blobs tracked at once; beyond this, idle ones are forgotten.
const MAX_BLOBS: usize = 4096;

/// Which pieces went out in the current wave of each blob.
#[derive(Debug)]
pub struct Spread {
    /// The origin's clock starts here: waves are kept as offsets from it.
    epoch: Instant,
    blobs: Mutex<HashMap<Digest, FirstCopies>>,
}

impl Default for Spread {
    fn default() -> Self {
        Self { epoch: Instant::now(), blobs: Mutex::default() }
    }
}

impl Spread {
    /// Whether piece `index` of a blob of `pieces` pieces may be served now; records it if so.
    pub fn admit(&self, digest: Digest, index: u32, pieces: u32, now: Instant) -> bool {
        if index >= pieces {
            return false;
        }
        let now = self.since_epoch(now);
        let mut blobs = self.blobs.lock().unwrap_or_else(|p| p.into_inner());
        if blobs.len() >= MAX_BLOBS && !blobs.contains_key(&digest) {
            blobs.retain(|_, w| now.saturating_sub(w.started()) < WAVE);
            // Every remembered wave still runs: the oldest ends early (its blob's pieces are
            // then served to anyone), the others keep theirs.
            if blobs.len() >= MAX_BLOBS {
                if let Some(oldest) = blobs.iter().min_by_key(|(_, w)| w.started()).map(|(d, _)| *d) {
                    blobs.remove(&oldest);
                }
            }
        }
        let wave = blobs.entry(digest).or_insert_with(|| FirstCopies::new(pieces, WAVE, now));
        if wave.pieces() != pieces {
            *wave = FirstCopies::new(pieces, WAVE, now);
        }
        wave.admit(index, now)
    }

    fn since_epoch(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.epoch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest() -> Digest {
        Digest::of(b"blob")
    }

    #[test]
    fn every_piece_once_before_any_twice() {
        let s = Spread::default();
        let t = Instant::now();
        assert!(s.admit(digest(), 0, 3, t));
        assert!(!s.admit(digest(), 0, 3, t), "a second copy while pieces 1 and 2 never went out");
        assert!(s.admit(digest(), 1, 3, t));
        assert!(s.admit(digest(), 2, 3, t));
        // Every piece went out: a new wave starts.
        assert!(s.admit(digest(), 0, 3, t));
        assert!(!s.admit(digest(), 0, 3, t));
        assert!(!s.admit(digest(), 3, 3, t), "out of range");
    }

    #[test]
    fn a_blob_of_another_length_starts_over() {
        let s = Spread::default();
        let t = Instant::now();
        assert!(s.admit(digest(), 0, 3, t));
        assert!(s.admit(digest(), 0, 4, t), "a new piece count is a new wave");
        assert!(!s.admit(digest(), 0, 4, t));
    }

    #[test]
    fn a_full_table_forgets_the_oldest_wave_only() {
        let s = Spread::default();
        let t = Instant::now();
        let d = |i: usize| Digest::of(&i.to_le_bytes());
        for i in 0..MAX_BLOBS {
            assert!(s.admit(d(i), 0, 2, t + Duration::from_micros(i as u64)));
        }
        let later = t + Duration::from_millis(10);
        assert!(s.admit(Digest::of(b"newcomer"), 0, 2, later));
        assert!(!s.admit(d(1), 0, 2, later), "a running wave is still remembered");
        assert!(s.admit(d(0), 0, 2, later), "the oldest wave was forgotten");
    }

    #[test]
    fn a_wave_ends_after_its_time() {
        let s = Spread::default();
        let t = Instant::now();
        assert!(s.admit(digest(), 0, 100, t));
        assert!(!s.admit(digest(), 0, 100, t + Duration::from_secs(1)));
        assert!(s.admit(digest(), 0, 100, t + WAVE), "a lone agent retrying waits at most one wave");
        // Other blobs have their own waves.
        assert!(s.admit(Digest::of(b"other"), 0, 100, t));
    }
}

//! First copies first: when many agents pull one blob from the origin at once, the origin
//! hands out every piece once before it hands out any piece a second time, so the agents
//! have something to trade and the origin's uplink carries about one copy of the blob
//! instead of one per agent.
//!
//! Agents cannot see each other's requests in flight, so without this two of them often
//! ask the origin for the same piece at the same moment. A request for a piece already
//! served in the current wave is refused (the agent backs the origin off briefly and takes
//! the piece from a peer once that peer announces it); a wave ends when every piece has
//! been served, or after [`WAVE`], so a lone agent retrying a piece waits at most that long.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use shoal_shared::digest::Digest;

/// Longest wave.
pub const WAVE: Duration = Duration::from_secs(30);
/// Blobs tracked at once; beyond this, idle ones are forgotten.
const MAX_BLOBS: usize = 4096;

#[derive(Debug)]
struct Wave {
    served: Vec<bool>,
    count: u32,
    started: Instant,
}

/// Which pieces went out in the current wave of each blob.
#[derive(Debug, Default)]
pub struct Spread {
    blobs: Mutex<HashMap<Digest, Wave>>,
}

impl Spread {
    /// Whether piece `index` of a blob of `pieces` pieces may be served now; records it if so.
    pub fn admit(&self, digest: Digest, index: u32, pieces: u32, now: Instant) -> bool {
        if index >= pieces {
            return false;
        }
        let mut blobs = self.blobs.lock().unwrap_or_else(|p| p.into_inner());
        if blobs.len() >= MAX_BLOBS && !blobs.contains_key(&digest) {
            blobs.retain(|_, w| now.saturating_duration_since(w.started) < WAVE);
            // Every remembered wave still runs: the oldest ends early (its blob's pieces are
            // then served to anyone), the others keep theirs.
            if blobs.len() >= MAX_BLOBS {
                if let Some(oldest) = blobs.iter().min_by_key(|(_, w)| w.started).map(|(d, _)| *d) {
                    blobs.remove(&oldest);
                }
            }
        }
        let wave = blobs.entry(digest).or_insert_with(|| Wave {
            served: vec![false; pieces as usize],
            count: 0,
            started: now,
        });
        if wave.served.len() != pieces as usize
            || wave.count == pieces
            || now.saturating_duration_since(wave.started) >= WAVE
        {
            *wave = Wave { served: vec![false; pieces as usize], count: 0, started: now };
        }
        let slot = &mut wave.served[index as usize];
        if *slot {
            return false;
        }
        *slot = true;
        wave.count += 1;
        true
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

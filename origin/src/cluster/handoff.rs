//! Copies this origin holds but no longer owns: when each was first seen so, so that the
//! repair pass drops it only after the handoff grace (`--handoff-grace`) and once every
//! owner holds it. A membership that flaps back within the grace costs nothing.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use shoal_shared::digest::Digest;

/// When each held, non-owned blob was first seen not owned. Bounded by the blobs held: every
/// pass forgets digests no longer held or owned again.
#[derive(Debug)]
pub struct Handoff {
    grace: Duration,
    since: Mutex<HashMap<Digest, Instant>>,
}

impl Handoff {
    pub fn new(grace: Duration) -> Self {
        Self { grace, since: Mutex::new(HashMap::new()) }
    }

    fn since(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, Instant>> {
        self.since.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records the pass's view: `held` are the complete blobs on disk, `owned` says which
    /// this origin owns.
    pub fn note(&self, held: &[Digest], owned: impl Fn(&Digest) -> bool) {
        let now = Instant::now();
        let mut since = self.since();
        let mut keep: HashMap<Digest, Instant> = HashMap::with_capacity(since.len());
        for d in held.iter().filter(|d| !owned(d)) {
            keep.insert(*d, since.get(d).copied().unwrap_or(now));
        }
        *since = keep;
    }

    /// Whether `digest` has not been owned for the whole grace.
    pub fn due(&self, digest: &Digest) -> bool {
        self.since().get(digest).is_some_and(|at| at.elapsed() >= self.grace)
    }

    /// `digest` was dropped.
    pub fn forget(&self, digest: &Digest) {
        self.since().remove(digest);
    }

    /// How many held copies are not owned (a gauge).
    pub fn len(&self) -> usize {
        self.since().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(i: u8) -> Digest {
        format!("sha256:{}", format!("{i:02x}").repeat(32)).parse().expect("digest")
    }

    #[test]
    fn a_copy_is_due_only_after_the_grace_and_owning_it_again_resets_it() {
        let h = Handoff::new(Duration::from_millis(30));
        let (a, b) = (digest(1), digest(2));
        h.note(&[a, b], |d| *d == b);
        assert!(!h.due(&a) && !h.due(&b));
        std::thread::sleep(Duration::from_millis(40));
        h.note(&[a, b], |d| *d == b);
        assert!(h.due(&a), "not owned for longer than the grace");
        assert!(!h.due(&b), "owned");
        // Owned again for one pass: the clock starts over.
        h.note(&[a, b], |_| true);
        h.note(&[a, b], |d| *d == b);
        assert!(!h.due(&a));
        // No longer held: forgotten.
        h.note(&[b], |d| *d == b);
        assert_eq!(h.len(), 0);
    }
}

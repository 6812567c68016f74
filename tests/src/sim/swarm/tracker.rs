//! The modelled tracker: who has the blob (origins, seeders, every agent that announced) and
//! the sample of peers an announce gets back.

use super::*;

/// How long the tracker keeps listing a host that stopped announcing.
const TRACKER_TTL: Nanos = 30 * SEC;

/// Who has the blob: origins, finished agents (seeders) and every agent that announced.
#[derive(Debug, Default)]
pub(super) struct Tracker {
    pub(super) origins: Vec<u32>,
    pub(super) seeders: Vec<u32>,
    pub(super) members: Vec<u32>,
}

impl Tracker {
    /// Up to `max` peers for `me` besides the origins (listed first, as the real tracker
    /// does): seeders first, then others, each drawn at random. O(max), never O(hosts).
    pub(super) fn sample(
        &self,
        me: u32,
        hosts: &[Host],
        now: Nanos,
        max: usize,
        rng: &mut StdRng,
    ) -> Vec<u32> {
        let mut out = self.origins.clone();
        let listed = |h: u32| h != me && hosts[h as usize].left_at.is_none_or(|t| now < t + TRACKER_TTL);
        let limit = out.len() + max;
        for (pool, downloading) in [(&self.seeders, false), (&self.members, true)] {
            let fits = |h: u32| listed(h) && (!downloading || hosts[h as usize].done_at.is_none());
            if pool.len() <= 2 * max {
                let mut all: Vec<u32> = pool.iter().copied().filter(|&h| fits(h)).collect();
                all.shuffle(rng);
                for h in all {
                    if out.len() >= limit {
                        break;
                    }
                    if !out.contains(&h) {
                        out.push(h);
                    }
                }
            } else {
                for _ in 0..4 * max {
                    if out.len() >= limit {
                        break;
                    }
                    let h = pool[rng.random_range(0..pool.len())];
                    if fits(h) && !out.contains(&h) {
                        out.push(h);
                    }
                }
            }
        }
        out
    }
}

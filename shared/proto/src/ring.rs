//! Who owns a blob: rendezvous (highest random weight) hashing over a set of members, with
//! a keyed SipHash so that nobody who does not know the key can pick digests that all land
//! on one member (hash flooding). The same code ranks origins for a blob (its owners are the
//! first `replicas` healthy ones) and trackers for a digest (the first one that answers).
//!
//! Rendezvous hashing moves only what it must: when a member joins or leaves, only the
//! blobs it owns (about 1/N) change owners; every other blob keeps its ranking. Weighted
//! members get a share of blobs proportional to their weight (the logarithmic method).

use siphasher::sip::SipHasher13;
use std::hash::Hasher as _;

/// The ring's hash key, the same on every member (`--ring-key`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct RingKey([u8; 16]);

impl RingKey {
    /// Derives the key from a passphrase (any length).
    pub fn from_passphrase(passphrase: &str) -> Self {
        let derived = blake3::derive_key("shoal ring key v1", passphrase.as_bytes());
        let mut key = [0u8; 16];
        key.copy_from_slice(&derived[..16]);
        Self(key)
    }
}

impl Default for RingKey {
    /// The key every member uses when none is configured.
    fn default() -> Self {
        Self::from_passphrase("shoal")
    }
}

impl std::fmt::Debug for RingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RingKey(<redacted>)")
    }
}

/// One member: a stable identity (its base URL, written the same on every member) and a
/// weight (1 for all unless some hold more).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Member {
    pub id: String,
    pub weight: u32,
}

impl Member {
    pub fn new(id: impl Into<String>) -> Self {
        Self { id: id.into(), weight: 1 }
    }
}

/// The score of `member` for `item`: higher ranks first.
fn score(key: &RingKey, member: &Member, item: &[u8]) -> f64 {
    let mut h = SipHasher13::new_with_key(&key.0);
    h.write(member.id.as_bytes());
    h.write_u8(0xff);
    h.write(item);
    let hash = h.finish();
    // A uniform draw in (0, 1], never 0 (its logarithm would be -inf).
    let unit = ((hash >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
    f64::from(member.weight.max(1)) / -unit.ln()
}

/// Every member, ranked for `item` (a digest's bytes, a repository name): indices into
/// `members`, best first. Ties (practically impossible) break by identity, so every member
/// computes the same order.
pub fn rank(key: &RingKey, members: &[Member], item: &[u8]) -> Vec<usize> {
    let mut scored: Vec<(f64, usize)> =
        members.iter().enumerate().map(|(i, m)| (score(key, m, item), i)).collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| members[a.1].id.cmp(&members[b.1].id)));
    scored.into_iter().map(|(_, i)| i).collect()
}

/// The first `n` members for `item` among those `usable` (healthy): the item's owners.
/// An unusable member's place goes to the next usable one on the ring.
pub fn owners(
    key: &RingKey,
    members: &[Member],
    item: &[u8],
    n: usize,
    usable: impl Fn(usize) -> bool,
) -> Vec<usize> {
    rank(key, members, item).into_iter().filter(|&i| usable(i)).take(n).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn members(n: usize) -> Vec<Member> {
        (0..n).map(|i| Member::new(format!("http://origin-{i}:5000"))).collect()
    }

    fn item(i: u32) -> Vec<u8> {
        blake3::hash(&i.to_le_bytes()).as_bytes().to_vec()
    }

    #[test]
    fn blobs_spread_evenly_and_weights_count() {
        let key = RingKey::default();
        let ms = members(5);
        let mut firsts = [0u32; 5];
        for i in 0..20_000 {
            firsts[rank(&key, &ms, &item(i))[0]] += 1;
        }
        for f in firsts {
            assert!((3_400..=4_600).contains(&f), "{firsts:?}");
        }
        let mut weighted = members(2);
        weighted[1].weight = 3;
        let heavy = (0..20_000).filter(|&i| rank(&key, &weighted, &item(i))[0] == 1).count();
        assert!((14_000..=16_000).contains(&heavy), "weight 3 of 4 takes about 3/4: {heavy}");
    }

    #[test]
    fn only_about_one_nth_of_blobs_move_when_a_member_leaves_or_joins() {
        let key = RingKey::default();
        let ms = members(5);
        let fewer: Vec<Member> = ms.iter().filter(|m| m.id != ms[2].id).cloned().collect();
        let mut more = ms.clone();
        more.push(Member::new("http://origin-9:5000"));
        let (mut moved_leave, mut moved_join) = (0, 0);
        for i in 0..10_000 {
            let it = item(i);
            let before = ms[rank(&key, &ms, &it)[0]].id.clone();
            let after = fewer[rank(&key, &fewer, &it)[0]].id.clone();
            if before != after {
                assert_eq!(before, ms[2].id, "only the leaver's blobs move");
                moved_leave += 1;
            }
            let joined = more[rank(&key, &more, &it)[0]].id.clone();
            if joined != before {
                assert_eq!(joined, "http://origin-9:5000", "blobs move only to the newcomer");
                moved_join += 1;
            }
        }
        assert!((1_600..=2_400).contains(&moved_leave), "{moved_leave}");
        assert!((1_300..=2_000).contains(&moved_join), "{moved_join}");
    }

    #[test]
    fn the_key_changes_the_ranking() {
        let ms = members(5);
        let a = RingKey::from_passphrase("one");
        let b = RingKey::from_passphrase("two");
        let differ = (0..1000).filter(|&i| rank(&a, &ms, &item(i))[0] != rank(&b, &ms, &item(i))[0]).count();
        assert!(differ > 600, "{differ}");
        assert_eq!(format!("{a:?}"), "RingKey(<redacted>)");
    }

    #[test]
    fn unhealthy_owners_give_their_place_to_the_next_member() {
        let key = RingKey::default();
        let ms = members(4);
        let it = item(7);
        let ranked = rank(&key, &ms, &it);
        assert_eq!(owners(&key, &ms, &it, 2, |_| true), ranked[..2].to_vec());
        let down = ranked[0];
        assert_eq!(owners(&key, &ms, &it, 2, |i| i != down), ranked[1..3].to_vec());
        assert!(owners(&key, &ms, &it, 2, |_| false).is_empty());
    }

    proptest! {
        #[test]
        fn rankings_are_permutations_independent_of_member_order(
            n in 1usize..12, seed in any::<u32>(), rotate in 0usize..12,
        ) {
            let key = RingKey::default();
            let ms = members(n);
            let it = item(seed);
            let ranked = rank(&key, &ms, &it);
            let mut sorted = ranked.clone();
            sorted.sort_unstable();
            prop_assert_eq!(sorted, (0..n).collect::<Vec<_>>());
            // The same members listed in another order rank the same identities.
            let mut shuffled = ms.clone();
            shuffled.rotate_left(rotate % n);
            let ids = |list: &[Member], r: Vec<usize>| r.into_iter().map(|i| list[i].id.clone()).collect::<Vec<_>>();
            prop_assert_eq!(ids(&ms, ranked), ids(&shuffled, rank(&key, &shuffled, &it)));
        }
    }
}

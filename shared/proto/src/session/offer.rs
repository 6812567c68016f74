//! Cut-through's offer rule: which pieces still arriving are offered to other peers.
//!
//! A relay passes a piece on only as fast as it receives it, so a piece offered while it
//! arrives slowly (its sender or this host's own link is slow) holds up every peer that
//! takes it from here, and every peer those relay it to. Such a piece is offered once it is
//! whole instead. The rate is measured between the first block and the
//! [`EARLY_OFFER_BLOCKS`]th, so the request's round trip is not counted; the piece is
//! offered early if at that rate it would be whole within [`EARLY_OFFER_WITHIN`].
//!
//! Measured in the simulator (`shoal-sim --hosts 1000 --slow-hosts 0.1`, seeds 1 to 4): a
//! tenth of the hosts on a tenth of the link held the fast hosts' p50 9% above the all-fast
//! run, and their p99 at 2.0x the limit; with the rule, 2% and 1.4x. A fast host receives
//! each of its four pieces in flight in about 1.3 s, a slow one in about 13 s. The cost: on
//! a fleet where every piece takes longer than that (a uniformly slow network), nothing is
//! relayed early and each hop costs a piece time again.

use std::time::Duration;

/// Blocks of a piece that must have passed before it may be offered early.
pub const EARLY_OFFER_BLOCKS: u32 = 4;
/// Longest a piece offered early may take to arrive whole, at the rate its first blocks came.
pub const EARLY_OFFER_WITHIN: Duration = Duration::from_secs(4);

/// Whether a piece of `piece_len` bytes, of which `bytes` after its first block took
/// `elapsed` to arrive, is fast enough to be offered before it is whole.
fn fast_enough(piece_len: u64, bytes: u64, elapsed: Duration) -> bool {
    bytes as f64 * EARLY_OFFER_WITHIN.as_secs_f64() >= piece_len as f64 * elapsed.as_secs_f64()
}

/// One piece's offer decision, fed each block as it passes.
#[derive(Debug, Clone, Copy)]
pub struct EarlyOffer {
    piece_len: u64,
    /// When the first block passed.
    first: Option<Duration>,
    /// Bytes of the blocks after the first.
    bytes: u64,
    blocks: u32,
}

impl EarlyOffer {
    /// The decision for a piece of `piece_len` bytes.
    pub fn new(piece_len: u64) -> Self {
        Self { piece_len, first: None, bytes: 0, blocks: 0 }
    }

    /// A block of `len` bytes passed at `now`. At the [`EARLY_OFFER_BLOCKS`]th block, the
    /// decision: `Some(true)` to offer the piece now (it arrived fast enough since the
    /// first block), `Some(false)` to offer it only once whole; `None` at every other block.
    pub fn on_block(&mut self, now: Duration, len: usize) -> Option<bool> {
        self.blocks = self.blocks.saturating_add(1);
        let Some(first) = self.first else {
            self.first = Some(now);
            return None;
        };
        self.bytes += len as u64;
        (self.blocks == EARLY_OFFER_BLOCKS)
            .then(|| fast_enough(self.piece_len, self.bytes, now.saturating_sub(first)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BLOCK: usize = 16 << 10;
    const PIECE: u64 = 4 << 20;

    /// Feeds `n` blocks `gap` apart, starting at `start`; returns the blocks at which the
    /// rule decided, and what.
    fn feed(n: u32, start: Duration, gap: Duration) -> Vec<(u32, bool)> {
        let mut offer = EarlyOffer::new(PIECE);
        (1..=n).filter_map(|k| offer.on_block(start + gap * (k - 1), BLOCK).map(|o| (k, o))).collect()
    }

    #[test]
    fn a_fast_piece_is_offered_once_at_the_fourth_block() {
        // 16 KiB every millisecond: 16 MB/s.
        assert_eq!(
            feed(10, Duration::from_secs(3), Duration::from_millis(1)),
            vec![(EARLY_OFFER_BLOCKS, true)]
        );
    }

    #[test]
    fn a_slow_piece_is_not_offered_early() {
        // 16 KiB every 50 ms: 320 KB/s, 13 s for the piece.
        assert_eq!(feed(64, Duration::ZERO, Duration::from_millis(50)), vec![(EARLY_OFFER_BLOCKS, false)]);
    }

    #[test]
    fn the_wait_for_the_first_block_does_not_count() {
        // The first block came after a long round trip; the rest at 16 MB/s.
        let mut offer = EarlyOffer::new(PIECE);
        assert_eq!(offer.on_block(Duration::from_millis(900), BLOCK), None);
        let t = Duration::from_millis(900);
        assert_eq!(offer.on_block(t + Duration::from_millis(1), BLOCK), None);
        assert_eq!(offer.on_block(t + Duration::from_millis(2), BLOCK), None);
        assert_eq!(offer.on_block(t + Duration::from_millis(3), BLOCK), Some(true));
    }

    #[test]
    fn the_bar_is_the_whole_piece_within_four_seconds() {
        let second = Duration::from_secs(1);
        // 1 MiB/s: a 4 MiB piece in 4 s, a 1 MiB piece in 1 s.
        assert!(fast_enough(PIECE, 1 << 20, second));
        assert!(!fast_enough(PIECE, (1 << 20) - 1, second));
        assert!(fast_enough(1 << 20, 1 << 18, second));
        assert!(!fast_enough(1 << 20, (1 << 18) - 1, second));
        assert!(fast_enough(PIECE, 0, Duration::ZERO));
    }

    #[test]
    fn a_piece_shorter_than_the_blocks_counted_is_offered_only_whole() {
        assert!(feed(EARLY_OFFER_BLOCKS - 1, Duration::ZERO, Duration::from_micros(10)).is_empty());
    }
}

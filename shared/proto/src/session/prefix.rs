//! The verified prefix: how far from the start of the blob every piece is held, which is
//! what a client streaming the blob may be sent.
//!
//! It only moves forward, and only when the piece right after it arrives; a download
//! resumed with pieces already held starts past them.

use crate::bitfield::Bitfield;
use crate::metainfo::Metainfo;

/// The contiguous run of held pieces from piece 0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Prefix {
    pieces: u32,
}

impl Prefix {
    /// Pieces in the prefix.
    pub fn pieces(&self) -> u32 {
        self.pieces
    }

    /// Moves past every piece `have` holds; if the prefix grew, the bytes it now covers.
    pub fn advance(&mut self, have: &Bitfield, metainfo: &Metainfo) -> Option<u64> {
        let from = self.pieces;
        while have.get(self.pieces) {
            self.pieces += 1;
        }
        (self.pieces > from).then(|| metainfo.piece_offset(self.pieces).min(metainfo.length()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metainfo::MetainfoBuilder;

    const PIECE: u32 = 64 << 10;

    fn blob(pieces: u32, tail: u32) -> Metainfo {
        let mut b = MetainfoBuilder::new(PIECE).expect("piece length");
        b.update(&vec![7u8; ((pieces - 1) * PIECE + tail) as usize]);
        b.finish().expect("metainfo")
    }

    #[test]
    fn grows_only_over_a_contiguous_run() {
        let m = blob(4, 100);
        let mut have = Bitfield::new(4);
        let mut p = Prefix::default();
        assert_eq!(p.advance(&have, &m), None, "nothing held");
        have.set(1);
        assert_eq!(p.advance(&have, &m), None, "a hole at piece 0");
        have.set(0);
        assert_eq!(p.advance(&have, &m), Some(2 * u64::from(PIECE)), "pieces 0 and 1");
        assert_eq!(p.advance(&have, &m), None, "no change, no news");
        have.set(3);
        have.set(2);
        assert_eq!(p.advance(&have, &m), Some(m.length()), "the last piece is short");
        assert_eq!(p.pieces(), 4);
    }

    #[test]
    fn a_resumed_download_starts_past_what_it_holds() {
        let m = blob(3, PIECE);
        let mut have = Bitfield::new(3);
        have.set(0);
        have.set(1);
        let mut p = Prefix::default();
        assert_eq!(p.advance(&have, &m), Some(2 * u64::from(PIECE)));
        assert_eq!(p.pieces(), 2);
    }
}

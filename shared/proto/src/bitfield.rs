//! A fixed-length set of piece indices, packed MSB-first as in BitTorrent.

use serde::{Deserialize, Serialize};

/// Which pieces of a blob a peer holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bitfield {
    len: u32,
    bits: Vec<u8>,
}

/// A bitfield from the network that does not fit the blob.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bitfield does not fit a blob of {expected} pieces")]
pub struct BitfieldError {
    pub expected: u32,
}

impl Bitfield {
    /// An empty set over `len` pieces.
    pub fn new(len: u32) -> Self {
        Self { len, bits: vec![0; (len as usize).div_ceil(8)] }
    }

    /// A full set over `len` pieces.
    pub fn full(len: u32) -> Self {
        let mut b = Self::new(len);
        for i in 0..len {
            b.set(i);
        }
        b
    }

    /// Checks a bitfield received for a blob of `expected` pieces: the length must match and
    /// padding bits must be zero.
    pub fn validate(self, expected: u32) -> Result<Self, BitfieldError> {
        let err = BitfieldError { expected };
        if self.len != expected || self.bits.len() != (expected as usize).div_ceil(8) {
            return Err(err);
        }
        let pad = (8 - expected % 8) % 8;
        if pad > 0 {
            let last = self.bits.last().copied().unwrap_or(0);
            if last & ((1u8 << pad) - 1) != 0 {
                return Err(err);
            }
        }
        Ok(self)
    }

    pub fn len(&self) -> u32 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn get(&self, i: u32) -> bool {
        i < self.len && self.bits[(i / 8) as usize] & (0x80 >> (i % 8)) != 0
    }

    /// Marks piece `i`; out-of-range indices are ignored.
    pub fn set(&mut self, i: u32) {
        if i < self.len {
            self.bits[(i / 8) as usize] |= 0x80 >> (i % 8);
        }
    }

    pub fn count(&self) -> u32 {
        self.bits.iter().map(|b| b.count_ones()).sum()
    }

    pub fn is_complete(&self) -> bool {
        self.count() == self.len
    }

    /// Indices of the pieces held, in order.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.len).filter(|&i| self.get(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_get_count() {
        let mut b = Bitfield::new(10);
        b.set(0);
        b.set(9);
        b.set(10);
        assert!(b.get(0) && b.get(9) && !b.get(5) && !b.get(10));
        assert_eq!(b.count(), 2);
        assert_eq!(b.iter().collect::<Vec<_>>(), vec![0, 9]);
        assert!(Bitfield::full(10).is_complete());
    }

    #[test]
    fn validate_rejects_misfits() {
        assert!(Bitfield::full(10).validate(10).is_ok());
        assert!(Bitfield::full(10).validate(11).is_err());
        let padded = Bitfield { len: 10, bits: vec![0xff, 0xff] };
        assert!(padded.validate(10).is_err());
        let short = Bitfield { len: 10, bits: vec![0xff] };
        assert!(short.validate(10).is_err());
    }
}

//! Blocks: checking a piece's bytes as they arrive, before the piece is whole.
//!
//! A piece's hash in the [`Metainfo`] is its blake3 hash, and blake3 is a tree hash: the
//! piece's bytes fall into aligned blocks of [`BLOCK_SIZE`] (a power-of-two number of blake3
//! chunks), each block is a subtree of the piece's tree, and the piece's hash is the root
//! over the blocks' chaining values. So a sender puts the chaining value of every block
//! ([`BlockHashes`], 32 bytes per 16 KiB: 0.2% of the piece) before the piece's bytes; the
//! receiver first checks that those values merge into the piece hash it trusts
//! ([`Metainfo::check_blocks`]), then checks each block against its value as it lands
//! ([`BlockVerifier::verify`]). A wrong byte is caught within the block it is in, before any
//! byte of that block is kept, and a block that passed is as certain as a whole piece that
//! matched its hash: the chaining values are bound to the root by the same function.
//!
//! This is the bao construction with the whole proof up front instead of interleaved: a
//! piece's proof is small (at most [`MAX_BLOCKS`] values, 128 KiB for a 64 MiB piece), and
//! sending it first lets a peer that has only part of a piece pass on the part it holds
//! with the same proof. Built on blake3's own tree API (`blake3::hazmat`), tested against
//! [`blake3::hash`] over random sizes.
//!
//! A piece of a single block has no proof (an empty list): its one block is checked against
//! the piece hash itself.

use blake3::hazmat::{self, ChainingValue, HasherExt as _, Mode};
use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use crate::metainfo::{Metainfo, MetainfoError, VerifiedPiece, MAX_PIECE_LENGTH};

/// Bytes per block: 16 blake3 chunks. Small enough that a hop of a piece costs a few
/// packets rather than the whole piece; large enough that a block is hashed with blake3's
/// SIMD lanes full and the proof stays 0.2% of the bytes.
pub const BLOCK_SIZE: u32 = 16 << 10;
/// Most blocks in one piece (a piece of [`MAX_PIECE_LENGTH`]).
pub const MAX_BLOCKS: usize = (MAX_PIECE_LENGTH / BLOCK_SIZE) as usize;

/// Number of blocks in a piece of `size` bytes (at least one).
pub fn block_count(size: u32) -> u32 {
    size.div_ceil(BLOCK_SIZE).max(1)
}

/// The chaining values of a piece's blocks, in order; empty for a piece of one block.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockHashes(Vec<ChainingValue>);

impl std::fmt::Debug for BlockHashes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BlockHashes({} blocks)", self.0.len())
    }
}

impl BlockHashes {
    /// The block hashes of `piece` (a sender's side: the bytes must be a verified piece).
    pub fn of(piece: &[u8]) -> Self {
        if piece.len() <= BLOCK_SIZE as usize {
            return Self::default();
        }
        Self(
            piece
                .chunks(BLOCK_SIZE as usize)
                .enumerate()
                .map(|(k, block)| block_cv(k as u64, block))
                .collect(),
        )
    }

    /// How many block hashes this holds.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// A copy with one hash changed (for tests of refusal).
    #[doc(hidden)]
    pub fn damaged(&self, block: usize) -> Self {
        let mut out = self.clone();
        if let Some(cv) = out.0.get_mut(block) {
            cv[0] ^= 1;
        }
        out
    }
}

/// The chaining value of block `k` of a piece.
fn block_cv(k: u64, block: &[u8]) -> ChainingValue {
    blake3::Hasher::new().set_input_offset(k * u64::from(BLOCK_SIZE)).update(block).finalize_non_root()
}

/// The chaining value of the subtree over blocks `cvs`, which start at byte 0 of the
/// subtree and cover `len` bytes (the tree's shape is blake3's: the left subtree holds the
/// largest power of two of chunks below the whole).
fn subtree(cvs: &[ChainingValue], len: u64) -> ChainingValue {
    if cvs.len() == 1 {
        return cvs[0];
    }
    let (left, right) = split(cvs, len);
    hazmat::merge_subtrees_non_root(&subtree(left.0, left.1), &subtree(right.0, right.1), Mode::Hash)
}

type Part<'a> = (&'a [ChainingValue], u64);

fn split(cvs: &[ChainingValue], len: u64) -> (Part<'_>, Part<'_>) {
    let left_len = hazmat::left_subtree_len(len);
    // A power of two no smaller than one block: a whole number of blocks.
    let left_blocks = (left_len / u64::from(BLOCK_SIZE)) as usize;
    ((&cvs[..left_blocks], left_len), (&cvs[left_blocks..], len - left_len))
}

/// The root hash over the blocks of a piece of `len` bytes (more than one block).
fn root(cvs: &[ChainingValue], len: u64) -> blake3::Hash {
    let (left, right) = split(cvs, len);
    hazmat::merge_subtrees_root(&subtree(left.0, left.1), &subtree(right.0, right.1), Mode::Hash)
}

impl Metainfo {
    /// Checks that `hashes` are the block hashes of piece `index` (they merge into its hash),
    /// and returns what checks its blocks as they arrive.
    pub fn check_blocks(&self, index: u32, hashes: BlockHashes) -> Result<BlockVerifier, MetainfoError> {
        let size = self.piece_size(index)?;
        let blocks = block_count(size);
        let expected = if blocks == 1 { 0 } else { blocks as usize };
        if hashes.len() != expected {
            return Err(MetainfoError::BlockHashes(index));
        }
        if blocks > 1 && !self.piece_hash_matches(index, &root(&hashes.0, u64::from(size))) {
            return Err(MetainfoError::BlockHashes(index));
        }
        Ok(BlockVerifier { metainfo_piece: self.piece_hash(index), index, size, hashes, next: 0 })
    }
}

/// Checks the blocks of one piece, in order, against block hashes already bound to the
/// piece's hash. Made only by [`Metainfo::check_blocks`].
#[derive(Debug, Clone)]
pub struct BlockVerifier {
    /// The piece's hash, for a piece of one block.
    metainfo_piece: [u8; 32],
    index: u32,
    size: u32,
    hashes: BlockHashes,
    next: u32,
}

impl BlockVerifier {
    /// The piece these blocks belong to.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The piece's length in bytes.
    pub fn size(&self) -> u32 {
        self.size
    }

    /// The proof, to pass on to a peer that asks for this piece.
    pub fn hashes(&self) -> &BlockHashes {
        &self.hashes
    }

    /// The blocks checked so far (the next block to check is this one).
    pub fn verified(&self) -> u32 {
        self.next
    }

    /// Bytes checked so far: a prefix of the piece.
    pub fn verified_bytes(&self) -> u32 {
        (self.next * BLOCK_SIZE).min(self.size)
    }

    /// True once every block has been checked.
    pub fn is_complete(&self) -> bool {
        self.next == block_count(self.size)
    }

    /// The length of the next block to check (0 once complete).
    pub fn next_len(&self) -> u32 {
        if self.is_complete() {
            return 0;
        }
        (self.size - self.verified_bytes()).min(BLOCK_SIZE)
    }

    /// Checks `block` as the next block of the piece. On an error nothing is recorded: the
    /// block's bytes must be dropped and the sender treated as one that sent a bad piece.
    pub fn verify(&mut self, block: &[u8]) -> Result<(), MetainfoError> {
        let k = self.next;
        let expected = self.next_len();
        if expected == 0 || block.len() != expected as usize {
            return Err(MetainfoError::BlockSize { index: self.index, block: k });
        }
        let ok = if self.hashes.is_empty() {
            blake3::hash(block).as_bytes() == &self.metainfo_piece
        } else {
            block_cv(u64::from(k), block) == self.hashes.0[k as usize]
        };
        if !ok {
            return Err(MetainfoError::BlockHash { index: self.index, block: k });
        }
        self.next += 1;
        Ok(())
    }
}

/// Piece buffers kept for reuse: a [`PieceReceiver`] made with [`PieceReceiver::pooled`]
/// takes its buffer from here and gives it back when it finishes, and the buffer is taken
/// again once every block of the piece it held has been dropped (written, hashed, relayed).
/// A fresh multi-MiB buffer per piece costs a page fault and a zeroed page per 4 KiB, in
/// the hot loop that copies bytes off the network; a reused one is already resident.
///
/// Holds at most `max_bytes` of buffers (a buffer larger than that is never kept), so what
/// it pins while idle is bounded. Cheap to clone; clones share the buffers.
#[derive(Debug, Clone)]
pub struct PiecePool {
    /// Handles to buffers, with the capacity each was made with.
    buffers: std::sync::Arc<std::sync::Mutex<Vec<(BytesMut, usize)>>>,
    max_bytes: usize,
}

impl PiecePool {
    pub fn new(max_bytes: usize) -> Self {
        Self { buffers: Default::default(), max_bytes }
    }

    /// An empty buffer of at least `size` bytes of capacity, and the capacity it spans: a
    /// kept one nobody reads any more, else a new one.
    fn take(&self, size: usize) -> (BytesMut, usize) {
        let mut buffers = self.buffers.lock().unwrap_or_else(|p| p.into_inner());
        // `try_reclaim` succeeds only on the last handle to a buffer, never copying (the
        // handles kept are empty) nor allocating.
        if let Some(i) = buffers.iter_mut().position(|(b, span)| *span >= size && b.try_reclaim(size)) {
            return buffers.swap_remove(i);
        }
        drop(buffers);
        (BytesMut::with_capacity(size), size)
    }

    /// Keeps `buffer`, whose allocation spans `span` bytes (its blocks may still be in
    /// use), if there is room.
    fn give(&self, mut buffer: BytesMut, span: usize) {
        buffer.clear();
        let mut buffers = self.buffers.lock().unwrap_or_else(|p| p.into_inner());
        let kept: usize = buffers.iter().map(|(_, span)| span).sum();
        if kept + span <= self.max_bytes {
            buffers.push((buffer, span));
        }
    }
}

/// Receives one piece's bytes in chunks of any size, checking each block as soon as it is
/// whole: only checked blocks are ever exposed ([`PieceReceiver::blocks`], each its own
/// [`Bytes`] over one buffer, without copying), and the piece is handed over only once every
/// block passed. The buffer is sized by the metainfo, never by the sender.
#[derive(Debug)]
pub struct PieceReceiver {
    verifier: BlockVerifier,
    /// The block being received (its capacity is the rest of the piece).
    pending: BytesMut,
    blocks: Vec<Bytes>,
    received: usize,
    /// Where the buffer goes back to when the piece is whole, and the capacity it spans.
    pool: Option<(PiecePool, usize)>,
}

impl PieceReceiver {
    pub fn new(verifier: BlockVerifier) -> Self {
        let pending = BytesMut::with_capacity(verifier.size() as usize);
        Self::with_buffer(verifier, pending, None)
    }

    /// A receiver whose buffer comes from `pool` and goes back to it.
    pub fn pooled(verifier: BlockVerifier, pool: &PiecePool) -> Self {
        let (pending, span) = pool.take(verifier.size() as usize);
        Self::with_buffer(verifier, pending, Some((pool.clone(), span)))
    }

    fn with_buffer(verifier: BlockVerifier, pending: BytesMut, pool: Option<(PiecePool, usize)>) -> Self {
        let blocks = Vec::with_capacity(block_count(verifier.size()) as usize);
        Self { verifier, pending, blocks, received: 0, pool }
    }

    /// The block hashes, checked against the piece hash.
    pub fn hashes(&self) -> &BlockHashes {
        self.verifier.hashes()
    }

    /// Bytes still to receive.
    pub fn remaining(&self) -> usize {
        self.verifier.size() as usize - self.received
    }

    /// Takes the next `bytes` of the piece, checking every block they complete. Bytes past
    /// the piece's end or a block that fails its hash are an error, after which the
    /// receiver must be dropped.
    pub fn extend(&mut self, mut bytes: &[u8]) -> Result<(), MetainfoError> {
        if bytes.len() > self.remaining() {
            return Err(MetainfoError::BlockSize {
                index: self.verifier.index(),
                block: self.verifier.verified(),
            });
        }
        while !bytes.is_empty() {
            let block_len = self.verifier.next_len() as usize;
            let take = (block_len - self.pending.len()).min(bytes.len());
            self.pending.extend_from_slice(&bytes[..take]);
            self.received += take;
            bytes = &bytes[take..];
            if self.pending.len() == block_len {
                self.verifier.verify(&self.pending)?;
                self.blocks.push(self.pending.split().freeze());
            }
        }
        Ok(())
    }

    /// The blocks checked so far, in order: a prefix of the piece.
    pub fn blocks(&self) -> &[Bytes] {
        &self.blocks
    }

    /// The whole piece, once every block passed.
    pub fn finish(self) -> Result<VerifiedPiece, MetainfoError> {
        let index = self.verifier.index();
        if !self.verifier.is_complete() {
            return Err(MetainfoError::PieceSize {
                index,
                expected: u64::from(self.verifier.size()),
                actual: self.received as u64,
            });
        }
        if let Some((pool, span)) = self.pool {
            pool.give(self.pending, span);
        }
        Ok(VerifiedPiece::from_blocks(index, self.blocks))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::metainfo::{MetainfoBuilder, MIN_PIECE_LENGTH};

    fn blob(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 11) as u8).collect()
    }

    fn metainfo(data: &[u8], piece_length: u32) -> Metainfo {
        let mut b = MetainfoBuilder::new(piece_length).expect("piece length");
        b.update(data);
        b.finish().expect("metainfo")
    }

    fn piece(data: &[u8], m: &Metainfo, index: u32) -> Vec<u8> {
        let off = m.piece_offset(index) as usize;
        data[off..off + m.piece_size(index).expect("size") as usize].to_vec()
    }

    /// Feeds `bytes` block by block; the number of blocks accepted, or the first error.
    fn feed(v: &mut BlockVerifier, bytes: &[u8]) -> Result<u32, MetainfoError> {
        let mut at = 0usize;
        while !v.is_complete() {
            let n = v.next_len() as usize;
            let block = bytes
                .get(at..at + n)
                .ok_or(MetainfoError::BlockSize { index: v.index(), block: v.verified() })?;
            v.verify(block)?;
            at += n;
        }
        Ok(v.verified())
    }

    #[test]
    fn block_hashes_merge_into_blake3_for_many_sizes() {
        // Sizes around block and power-of-two boundaries, where the tree's shape changes.
        let b = BLOCK_SIZE as usize;
        for len in
            [b + 1, 2 * b - 1, 2 * b, 2 * b + 1, 3 * b, 5 * b + 7, 8 * b, 8 * b + 1, 17 * b - 3, 256 * b]
        {
            let data = blob(len, len as u8);
            let hashes = BlockHashes::of(&data);
            assert_eq!(hashes.len(), len.div_ceil(b), "len {len}");
            assert_eq!(root(&hashes.0, len as u64), blake3::hash(&data), "len {len}");
        }
    }

    #[test]
    fn a_whole_piece_passes_block_by_block() {
        let data = blob(3 * MIN_PIECE_LENGTH as usize + 5000, 1);
        let m = metainfo(&data, MIN_PIECE_LENGTH);
        for i in 0..m.piece_count() {
            let p = piece(&data, &m, i);
            let mut v = m.check_blocks(i, BlockHashes::of(&p)).expect("proof");
            assert_eq!(feed(&mut v, &p), Ok(block_count(p.len() as u32)));
            assert!(v.is_complete());
            assert_eq!(v.verified_bytes() as usize, p.len());
        }
    }

    #[test]
    fn a_piece_of_one_block_needs_no_proof() {
        let data = blob(5000, 2);
        let m = metainfo(&data, MIN_PIECE_LENGTH);
        let mut v = m.check_blocks(0, BlockHashes::default()).expect("empty proof");
        assert_eq!(feed(&mut v, &data), Ok(1));
        let mut bad = data.clone();
        bad[4999] ^= 0x80;
        let mut v = m.check_blocks(0, BlockHashes::default()).expect("empty proof");
        assert_eq!(v.verify(&bad), Err(MetainfoError::BlockHash { index: 0, block: 0 }));
        // A proof where none is due is refused, as is one for a different piece.
        assert_eq!(
            m.check_blocks(0, BlockHashes::of(&blob(2 * BLOCK_SIZE as usize, 0))).err(),
            Some(MetainfoError::BlockHashes(0))
        );
    }

    #[test]
    fn a_proof_for_another_piece_or_a_damaged_proof_is_refused() {
        let data = blob(2 * MIN_PIECE_LENGTH as usize, 3);
        let m = metainfo(&data, MIN_PIECE_LENGTH);
        let p0 = BlockHashes::of(&piece(&data, &m, 0));
        let p1 = BlockHashes::of(&piece(&data, &m, 1));
        assert!(m.check_blocks(0, p0.clone()).is_ok());
        assert_eq!(m.check_blocks(1, p0.clone()).err(), Some(MetainfoError::BlockHashes(1)));
        assert_eq!(m.check_blocks(0, p1).err(), Some(MetainfoError::BlockHashes(0)));
        assert_eq!(m.check_blocks(0, p0.damaged(2)).err(), Some(MetainfoError::BlockHashes(0)));
        let mut short = p0.clone();
        short.0.pop();
        assert_eq!(m.check_blocks(0, short).err(), Some(MetainfoError::BlockHashes(0)));
        assert_eq!(m.check_blocks(2, p0).err(), Some(MetainfoError::NoSuchPiece(2)));
    }

    #[test]
    fn blocks_out_of_place_or_of_the_wrong_length_are_refused() {
        let data = blob(MIN_PIECE_LENGTH as usize, 4);
        let m = metainfo(&data, MIN_PIECE_LENGTH);
        let mut v = m.check_blocks(0, BlockHashes::of(&data)).expect("proof");
        let b = BLOCK_SIZE as usize;
        // Block 1 offered as block 0: same length, wrong place in the tree.
        assert_eq!(v.verify(&data[b..2 * b]), Err(MetainfoError::BlockHash { index: 0, block: 0 }));
        assert_eq!(v.verify(&data[..b - 1]), Err(MetainfoError::BlockSize { index: 0, block: 0 }));
        assert_eq!(v.verified(), 0);
        v.verify(&data[..b]).expect("block 0");
        assert_eq!(v.verified_bytes() as usize, b);
    }

    #[test]
    fn a_receiver_takes_chunks_of_any_size_and_exposes_only_checked_bytes() {
        let data = blob(MIN_PIECE_LENGTH as usize + 3000, 5);
        let m = metainfo(&data, MIN_PIECE_LENGTH);
        for chunk in [1usize, 1000, BLOCK_SIZE as usize, 40_000, 1 << 20] {
            let p = piece(&data, &m, 0);
            let mut r = PieceReceiver::new(m.check_blocks(0, BlockHashes::of(&p)).expect("proof"));
            for c in p.chunks(chunk) {
                r.extend(c).expect("good bytes");
                let checked = r.blocks().concat();
                assert_eq!(checked, &p[..checked.len()]);
                assert_eq!(checked.len() % BLOCK_SIZE as usize, 0);
            }
            let got = r.finish().expect("whole");
            assert_eq!(got.data(), Bytes::from(p));
        }
        // More bytes than the piece holds, or too few, is never a piece.
        let p = piece(&data, &m, 1);
        let mut r = PieceReceiver::new(m.check_blocks(1, BlockHashes::of(&p)).expect("proof"));
        assert!(r.extend(&[p.as_slice(), b"x"].concat()).is_err());
        let mut r = PieceReceiver::new(m.check_blocks(1, BlockHashes::of(&p)).expect("proof"));
        r.extend(&p[..p.len() - 1]).expect("prefix");
        assert!(matches!(r.finish(), Err(MetainfoError::PieceSize { .. })));
    }

    #[test]
    fn a_pooled_buffer_is_reused_only_once_its_blocks_are_dropped() {
        let data = blob(MIN_PIECE_LENGTH as usize, 6);
        let m = metainfo(&data, MIN_PIECE_LENGTH);
        let pool = PiecePool::new(MIN_PIECE_LENGTH as usize);
        let receive = || {
            let mut r =
                PieceReceiver::pooled(m.check_blocks(0, BlockHashes::of(&data)).expect("proof"), &pool);
            r.extend(&data).expect("good bytes");
            r.finish().expect("whole")
        };
        let first = receive();
        let at = first.blocks()[0].as_ptr();
        // Still read: the next piece gets a buffer of its own, and the pool (full) keeps
        // only the first.
        let second = receive();
        assert_ne!(second.blocks()[0].as_ptr(), at);
        assert_eq!(second.data(), Bytes::from(data.clone()));
        drop(second);
        drop(first);
        let third = receive();
        assert_eq!(third.blocks()[0].as_ptr(), at, "the first buffer, reclaimed");
        assert_eq!(third.data(), Bytes::from(data.clone()));
        // A piece larger than the pool is never kept.
        let small = PiecePool::new(MIN_PIECE_LENGTH as usize - 1);
        let mut r = PieceReceiver::pooled(m.check_blocks(0, BlockHashes::of(&data)).expect("proof"), &small);
        r.extend(&data).expect("good bytes");
        drop(r.finish());
        assert!(small.buffers.lock().expect("pool").is_empty());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Any single corrupted byte, anywhere in any piece (first, middle or last block), is
        /// refused in the block that holds it, and every block before it passes; a piece cut
        /// short stops at the missing block.
        #[test]
        fn any_corruption_is_caught_in_its_block(
            len in 1usize..(6 * MIN_PIECE_LENGTH as usize),
            seed in any::<u8>(),
            at in any::<prop::sample::Index>(),
            flip in 1u8..=255,
            cut in any::<prop::sample::Index>(),
        ) {
            let data = blob(len, seed);
            let m = metainfo(&data, MIN_PIECE_LENGTH);
            let index = (at.index(len) as u64 / u64::from(MIN_PIECE_LENGTH)) as u32;
            let p = piece(&data, &m, index);
            let pos = at.index(len) - m.piece_offset(index) as usize;
            let mut bad = p.clone();
            bad[pos] ^= flip;
            let mut v = m.check_blocks(index, BlockHashes::of(&p)).expect("proof");
            let block = (pos / BLOCK_SIZE as usize) as u32;
            prop_assert_eq!(feed(&mut v, &bad), Err(MetainfoError::BlockHash { index, block }));
            prop_assert_eq!(v.verified(), block);

            let mut r = PieceReceiver::new(m.check_blocks(index, BlockHashes::of(&p)).expect("proof"));
            prop_assert!(r.extend(&bad).is_err());
            prop_assert_eq!(r.blocks().concat(), &p[..block as usize * BLOCK_SIZE as usize]);

            let keep = cut.index(p.len());
            let mut v = m.check_blocks(index, BlockHashes::of(&p)).expect("proof");
            prop_assert!(feed(&mut v, &p[..keep]).is_err());
            prop_assert_eq!(v.verified() as usize, keep / BLOCK_SIZE as usize);
        }
    }
}

//! Metainfo: what a peer needs to fetch and verify a blob piece by piece.
//!
//! A blob is cut into fixed-size pieces (the last one may be shorter); the metainfo holds the
//! blob's OCI digest, its length, the piece length and the blake3 hash of every piece. It is
//! produced by the origin with [`MetainfoBuilder`], which is fed the blob as a stream and
//! never holds more than one piece's hasher state, and it is the only thing a downloader
//! trusts: pieces from peers become [`VerifiedPiece`]s only by matching it.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::digest::{Digest, DigestHasher};

/// Default piece length: 1 MiB, with the agent's requests in flight following how fast
/// pieces come (`scheduler::Config::start_in_flight`). See docs/ARCHITECTURE.md, "Defaults",
/// for the sweeps against 2 MiB (the previous default) and Kraken's 4 MiB.
pub const DEFAULT_PIECE_LENGTH: u32 = 1 << 20;
/// Smallest accepted piece length.
pub const MIN_PIECE_LENGTH: u32 = 64 << 10;
/// Largest accepted piece length; also bounds every piece buffer.
pub const MAX_PIECE_LENGTH: u32 = 64 << 20;
/// Most pieces one blob may have (bounds metainfo and bitfield sizes).
pub const MAX_PIECES: u64 = 1 << 20;

/// A blake3 piece hash.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PieceHash(pub [u8; 32]);

impl std::fmt::Debug for PieceHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl Serialize for PieceHash {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&hex::encode(self.0))
        } else {
            self.0.serialize(s)
        }
    }
}

impl<'de> Deserialize<'de> for PieceHash {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
            let mut raw = [0u8; 32];
            hex::decode_to_slice(s.as_bytes(), &mut raw).map_err(serde::de::Error::custom)?;
            Ok(Self(raw))
        } else {
            Ok(Self(<[u8; 32]>::deserialize(d)?))
        }
    }
}

/// Why a metainfo or a piece was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetainfoError {
    #[error("piece length {0} outside [{MIN_PIECE_LENGTH}, {MAX_PIECE_LENGTH}]")]
    PieceLength(u32),
    #[error("blob of {length} bytes needs {expected} pieces, metainfo lists {actual}")]
    PieceCount { length: u64, expected: u64, actual: u64 },
    #[error("blob of {0} bytes has too many pieces")]
    TooLarge(u64),
    #[error("piece {0} does not exist")]
    NoSuchPiece(u32),
    #[error("piece {index} has {actual} bytes, expected {expected}")]
    PieceSize { index: u32, expected: u64, actual: u64 },
    #[error("piece {0} does not match its hash")]
    PieceHash(u32),
    #[error("the block hashes sent for piece {0} do not match its hash")]
    BlockHashes(u32),
    #[error("block {block} of piece {index} does not match its hash")]
    BlockHash { index: u32, block: u32 },
    #[error("block {block} of piece {index} has the wrong length")]
    BlockSize { index: u32, block: u32 },
}

/// The verified description of a blob, cut into pieces.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawMetainfo")]
pub struct Metainfo {
    digest: Digest,
    length: u64,
    piece_length: u32,
    pieces: Vec<PieceHash>,
}

/// Unchecked form used only for deserialization; converted with [`Metainfo::new`].
#[derive(Deserialize)]
struct RawMetainfo {
    digest: Digest,
    length: u64,
    piece_length: u32,
    pieces: Vec<PieceHash>,
}

impl TryFrom<RawMetainfo> for Metainfo {
    type Error = MetainfoError;
    fn try_from(raw: RawMetainfo) -> Result<Self, Self::Error> {
        Metainfo::new(raw.digest, raw.length, raw.piece_length, raw.pieces)
    }
}

/// Number of pieces a blob of `length` bytes has at `piece_length`, checked.
pub fn piece_count(length: u64, piece_length: u32) -> Result<u64, MetainfoError> {
    if !(MIN_PIECE_LENGTH..=MAX_PIECE_LENGTH).contains(&piece_length) {
        return Err(MetainfoError::PieceLength(piece_length));
    }
    let count = length.div_ceil(u64::from(piece_length));
    if count > MAX_PIECES {
        return Err(MetainfoError::TooLarge(length));
    }
    Ok(count)
}

impl Metainfo {
    /// Builds a metainfo, checking that the piece list fits the length.
    pub fn new(
        digest: Digest,
        length: u64,
        piece_length: u32,
        pieces: Vec<PieceHash>,
    ) -> Result<Self, MetainfoError> {
        let expected = piece_count(length, piece_length)?;
        let actual = pieces.len() as u64;
        if expected != actual {
            return Err(MetainfoError::PieceCount { length, expected, actual });
        }
        Ok(Self { digest, length, piece_length, pieces })
    }

    pub fn digest(&self) -> Digest {
        self.digest
    }

    pub fn length(&self) -> u64 {
        self.length
    }

    pub fn piece_length(&self) -> u32 {
        self.piece_length
    }

    pub fn piece_count(&self) -> u32 {
        // `new` bounds the count by MAX_PIECES, which fits in u32.
        self.pieces.len() as u32
    }

    /// Byte offset of piece `index` in the blob.
    pub fn piece_offset(&self, index: u32) -> u64 {
        u64::from(index) * u64::from(self.piece_length)
    }

    /// Length in bytes of piece `index`.
    pub fn piece_size(&self, index: u32) -> Result<u32, MetainfoError> {
        if index >= self.piece_count() {
            return Err(MetainfoError::NoSuchPiece(index));
        }
        let rest = self.length - self.piece_offset(index);
        // Bounded by piece_length, a u32.
        Ok(rest.min(u64::from(self.piece_length)) as u32)
    }

    /// Piece `index`'s hash (the caller has checked that the piece exists).
    pub(crate) fn piece_hash(&self, index: u32) -> [u8; 32] {
        self.pieces[index as usize].0
    }

    /// True when `hash` (blake3 of the whole piece) is piece `index`'s.
    pub fn piece_hash_matches(&self, index: u32, hash: &blake3::Hash) -> bool {
        self.pieces.get(index as usize).is_some_and(|p| hash.as_bytes() == &p.0)
    }

    /// Checks `data` against piece `index`'s hash.
    pub fn verify_piece(&self, index: u32, data: Bytes) -> Result<VerifiedPiece, MetainfoError> {
        let expected = u64::from(self.piece_size(index)?);
        if data.len() as u64 != expected {
            return Err(MetainfoError::PieceSize { index, expected, actual: data.len() as u64 });
        }
        let hash = blake3::hash(&data);
        if hash.as_bytes() != &self.pieces[index as usize].0 {
            return Err(MetainfoError::PieceHash(index));
        }
        Ok(VerifiedPiece { index, blocks: vec![data] })
    }
}

/// A piece whose bytes matched the metainfo. Only [`Metainfo::verify_piece`] and
/// [`crate::blocks::PieceReceiver::finish`] make one. Its bytes are one or more blocks, in
/// order (a piece received block by block keeps them apart rather than copy them together).
#[derive(Debug, Clone)]
pub struct VerifiedPiece {
    index: u32,
    blocks: Vec<Bytes>,
}

impl VerifiedPiece {
    /// A piece whose every block was checked ([`crate::blocks::PieceReceiver`]).
    pub(crate) fn from_blocks(index: u32, blocks: Vec<Bytes>) -> Self {
        Self { index, blocks }
    }

    pub fn index(&self) -> u32 {
        self.index
    }

    /// The piece's bytes, in order, as the blocks they arrived in.
    pub fn blocks(&self) -> &[Bytes] {
        &self.blocks
    }

    /// The piece's length in bytes.
    pub fn len(&self) -> usize {
        self.blocks.iter().map(Bytes::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The piece's bytes as one buffer (copied together if it arrived in blocks).
    pub fn data(&self) -> Bytes {
        match self.blocks.as_slice() {
            [one] => one.clone(),
            many => Bytes::from(many.concat()),
        }
    }
}

/// Streams a blob into its metainfo and sha256 digest.
#[derive(Debug)]
pub struct MetainfoBuilder {
    piece_length: u32,
    length: u64,
    in_piece: u32,
    piece: blake3::Hasher,
    pieces: Vec<PieceHash>,
    sha: DigestHasher,
}

impl MetainfoBuilder {
    pub fn new(piece_length: u32) -> Result<Self, MetainfoError> {
        piece_count(0, piece_length)?;
        Ok(Self {
            piece_length,
            length: 0,
            in_piece: 0,
            piece: blake3::Hasher::new(),
            pieces: Vec::new(),
            sha: DigestHasher::new(),
        })
    }

    /// Feeds the next bytes of the blob.
    pub fn update(&mut self, mut data: &[u8]) {
        self.sha.update(data);
        self.length += data.len() as u64;
        while !data.is_empty() {
            let room = (self.piece_length - self.in_piece) as usize;
            let take = room.min(data.len());
            self.piece.update(&data[..take]);
            self.in_piece += take as u32;
            data = &data[take..];
            if self.in_piece == self.piece_length {
                self.close_piece();
            }
        }
    }

    fn close_piece(&mut self) {
        let hash = self.piece.finalize();
        self.pieces.push(PieceHash(*hash.as_bytes()));
        self.piece.reset();
        self.in_piece = 0;
    }

    /// Bytes fed so far.
    pub fn length(&self) -> u64 {
        self.length
    }

    /// Finishes the blob: its digest as computed, and the metainfo.
    pub fn finish(mut self) -> Result<Metainfo, MetainfoError> {
        if self.in_piece > 0 {
            self.close_piece();
        }
        let digest = self.sha.finish();
        Metainfo::new(digest, self.length, self.piece_length, self.pieces)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(data: &[u8], piece_length: u32, chunk: usize) -> Metainfo {
        let mut b = MetainfoBuilder::new(piece_length).expect("piece length");
        for c in data.chunks(chunk.max(1)) {
            b.update(c);
        }
        b.finish().expect("metainfo")
    }

    #[test]
    fn pieces_cover_the_blob() {
        let data: Vec<u8> = (0..(MIN_PIECE_LENGTH as usize * 3 + 17)).map(|i| i as u8).collect();
        let m = build(&data, MIN_PIECE_LENGTH, 1000);
        assert_eq!(m.piece_count(), 4);
        assert_eq!(m.digest(), Digest::of(&data));
        assert_eq!(m.piece_size(3), Ok(17));
        assert_eq!(m, build(&data, MIN_PIECE_LENGTH, 7919));
        for i in 0..4 {
            let off = m.piece_offset(i) as usize;
            let len = m.piece_size(i).expect("size") as usize;
            let piece = Bytes::copy_from_slice(&data[off..off + len]);
            assert!(m.verify_piece(i, piece).is_ok());
        }
    }

    #[test]
    fn rejects_bad_pieces() {
        let data = vec![7u8; MIN_PIECE_LENGTH as usize * 2];
        let m = build(&data, MIN_PIECE_LENGTH, 4096);
        let mut bad = data[..MIN_PIECE_LENGTH as usize].to_vec();
        bad[5] ^= 1;
        assert_eq!(m.verify_piece(0, bad.into()).err(), Some(MetainfoError::PieceHash(0)));
        assert!(matches!(
            m.verify_piece(1, Bytes::from_static(b"short")),
            Err(MetainfoError::PieceSize { .. })
        ));
        assert_eq!(m.verify_piece(2, Bytes::new()).err(), Some(MetainfoError::NoSuchPiece(2)));
    }

    #[test]
    fn empty_blob_has_no_pieces() {
        let m = build(b"", MIN_PIECE_LENGTH, 1);
        assert_eq!(m.piece_count(), 0);
        assert_eq!(m.length(), 0);
    }

    #[test]
    fn deserialization_validates() {
        let m = build(&[1u8; 100], MIN_PIECE_LENGTH, 10);
        let mut json: serde_json::Value = serde_json::to_value(&m).expect("json");
        assert_eq!(serde_json::from_value::<Metainfo>(json.clone()).expect("ok"), m);
        json["length"] = serde_json::json!(MIN_PIECE_LENGTH as u64 * 5);
        assert!(serde_json::from_value::<Metainfo>(json.clone()).is_err());
        json["piece_length"] = serde_json::json!(1);
        assert!(serde_json::from_value::<Metainfo>(json).is_err());
    }
}

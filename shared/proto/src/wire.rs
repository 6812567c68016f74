//! Peer-to-peer messages and their framing.
//!
//! The protocol runs over QUIC, one bidirectional stream per request: the requester writes
//! one [`Request`] frame and finishes its side; the responder writes one [`Response`] frame
//! and, for [`Response::Piece`], the piece's raw bytes right after it (their length is given
//! by the frame and checked against the metainfo before anything is allocated). Piece data
//! is never copied through the codec. The piece frame carries the piece's block hashes
//! ([`BlockHashes`], see [`crate::blocks`]), so the requester checks the bytes block by
//! block as they land rather than only once the whole piece is in (protocol version 3).
//!
//! [`Request::Subscribe`] is the one long-lived stream: the responder first writes the
//! [`Response::Bitfield`] it holds, then [`Response::Have`] frames (each at most
//! [`MAX_HAVES`] indices, batched: one frame carries every piece verified since the last)
//! as its download progresses, and finishes the stream once it holds everything or its
//! download ends. The requester learns of new pieces at once instead of re-asking.
//!
//! A frame is a 4-byte big-endian length followed by that many bytes of codec output. A
//! length above [`MAX_FRAME`] is refused before any buffer is allocated, and the caller
//! closes the connection.

use serde::{Deserialize, Serialize};

use crate::bitfield::Bitfield;
use crate::blocks::BlockHashes;
use crate::codec::{self, CodecError};
use crate::digest::Digest;

/// Largest frame accepted (a bitfield of `MAX_PIECES` is 128 KiB).
pub const MAX_FRAME: usize = 256 << 10;
/// Protocol version carried in every request; a mismatch is answered with an error.
/// 3: piece frames carry block hashes.
pub const PROTOCOL_VERSION: u16 = 3;

/// Most piece indices in one [`Response::Have`] frame.
pub const MAX_HAVES: usize = 4096;

/// What a peer asks of another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Which pieces of `digest` do you hold?
    Bitfield { version: u16, digest: Digest },
    /// Send piece `index` of `digest`.
    Piece { version: u16, digest: Digest, index: u32 },
    /// Send your bitfield of `digest`, then the pieces you verify from now on.
    Subscribe { version: u16, digest: Digest },
}

/// Why a request was not served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Refusal {
    /// The peer does not hold this blob or piece.
    NotFound,
    /// The peer speaks another protocol version.
    Version,
    /// The peer is overloaded or shutting down; try elsewhere.
    Busy,
}

/// What a peer answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    Bitfield(Bitfield),
    /// Followed on the stream by exactly `length` raw bytes, to be checked block by block
    /// against `blocks` (which the requester first checks against the piece's hash).
    Piece {
        index: u32,
        length: u32,
        blocks: BlockHashes,
    },
    Refused(Refusal),
    /// Pieces newly held, on a [`Request::Subscribe`] stream.
    Have(Vec<u32>),
}

impl Response {
    /// What kind of response this is, for errors (never the payload: a bitfield or a Have
    /// batch from a hostile peer can be a quarter of a megabyte).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Bitfield(_) => "Bitfield",
            Self::Piece { .. } => "Piece",
            Self::Refused(_) => "Refused",
            Self::Have(_) => "Have",
        }
    }
}

/// A frame that breaks the protocol; the connection it came from must be closed.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    #[error(transparent)]
    Codec(#[from] CodecError),
}

/// Encodes `msg` as a length-prefixed frame.
pub fn encode_frame<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let body = codec::encode(msg)?;
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLarge(body.len()));
    }
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Reads a frame header, refusing lengths over [`MAX_FRAME`].
pub fn frame_len(header: [u8; 4]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    Ok(len)
}

/// Decodes a frame body (the bytes after the header).
pub fn decode_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    Ok(codec::decode(body)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blocks::BLOCK_SIZE;
    use proptest::prelude::*;

    fn digest_strategy() -> impl Strategy<Value = Digest> {
        any::<[u8; 32]>().prop_map(Digest::from_sha256)
    }

    fn request_strategy() -> impl Strategy<Value = Request> {
        prop_oneof![
            (any::<u16>(), digest_strategy())
                .prop_map(|(version, digest)| Request::Bitfield { version, digest }),
            (any::<u16>(), digest_strategy(), any::<u32>())
                .prop_map(|(version, digest, index)| Request::Piece { version, digest, index }),
            (any::<u16>(), digest_strategy())
                .prop_map(|(version, digest)| Request::Subscribe { version, digest }),
        ]
    }

    fn response_strategy() -> impl Strategy<Value = Response> {
        prop_oneof![
            (0u32..5000, proptest::collection::vec(any::<u32>(), 0..64)).prop_map(|(len, set)| {
                let mut b = Bitfield::new(len);
                for i in set {
                    b.set(i % len.max(1));
                }
                Response::Bitfield(b)
            }),
            (any::<u32>(), any::<u32>(), proptest::collection::vec(any::<u8>(), 0..3 * BLOCK_SIZE as usize))
                .prop_map(|(index, length, bytes)| Response::Piece {
                    index,
                    length,
                    blocks: BlockHashes::of(&bytes)
                }),
            prop_oneof![Just(Refusal::NotFound), Just(Refusal::Version), Just(Refusal::Busy)]
                .prop_map(Response::Refused),
            proptest::collection::vec(any::<u32>(), 0..MAX_HAVES).prop_map(Response::Have),
        ]
    }

    fn round_trip<T>(msg: &T) -> T
    where
        T: Serialize + serde::de::DeserializeOwned,
    {
        let frame = encode_frame(msg).expect("encode");
        let len = frame_len(frame[..4].try_into().expect("header")).expect("len");
        assert_eq!(len, frame.len() - 4);
        decode_body(&frame[4..]).expect("decode")
    }

    proptest! {
        #[test]
        fn requests_round_trip(msg in request_strategy()) {
            prop_assert_eq!(round_trip(&msg), msg);
        }

        #[test]
        fn responses_round_trip(msg in response_strategy()) {
            prop_assert_eq!(round_trip(&msg), msg);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let _ = decode_body::<Request>(&bytes);
            let _ = decode_body::<Response>(&bytes);
            if bytes.len() >= 4 {
                let _ = frame_len(bytes[..4].try_into().expect("4 bytes"));
            }
        }
    }

    #[test]
    fn a_full_have_frame_fits() {
        let full = Response::Have(vec![u32::MAX; MAX_HAVES]);
        assert_eq!(round_trip(&full), full);
    }

    #[test]
    fn the_proof_of_the_largest_piece_fits_a_frame() {
        let piece = vec![0u8; crate::metainfo::MAX_PIECE_LENGTH as usize];
        let blocks = BlockHashes::of(&piece);
        assert_eq!(blocks.len(), crate::blocks::MAX_BLOCKS);
        let full = Response::Piece { index: u32::MAX, length: u32::MAX, blocks };
        assert_eq!(round_trip(&full), full);
    }

    #[test]
    fn oversized_frames_are_refused() {
        assert!(matches!(frame_len(u32::MAX.to_be_bytes()), Err(FrameError::TooLarge(_))));
        assert!(frame_len((MAX_FRAME as u32).to_be_bytes()).is_ok());
    }

    #[test]
    fn forged_inner_length_does_not_allocate() {
        // A Bitfield response whose byte-vector length claims 2^60 elements.
        let mut forged = codec::encode(&Response::Bitfield(Bitfield::new(8))).expect("encode");
        forged.truncate(forged.len() - 2);
        forged.push(0xff);
        forged.extend_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(decode_body::<Response>(&forged).is_err());
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut body = codec::encode(&Response::Refused(Refusal::Busy)).expect("encode");
        body.push(0);
        assert!(decode_body::<Response>(&body).is_err());
    }
}

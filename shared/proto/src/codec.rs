//! The one place that knows the binary encoding of Shoal's messages (bincode 2.x).
//!
//! Everything that goes on the wire is serialized here, so the encoding can change in one
//! place. Decoding is bounded: bincode's allocation limit stops a forged length prefix inside
//! a message from allocating more than [`MAX_MESSAGE`] bytes.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Upper bound on one encoded message, and on what decoding may allocate for it.
pub const MAX_MESSAGE: usize = 1 << 20;

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_MESSAGE>()
}

/// A message that could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("cannot encode message: {0}")]
    Encode(#[from] bincode::error::EncodeError),
    #[error("malformed message: {0}")]
    Decode(#[from] bincode::error::DecodeError),
    #[error("message has {0} trailing bytes")]
    Trailing(usize),
}

/// Encodes `value`.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    Ok(bincode::serde::encode_to_vec(value, config())?)
}

/// Decodes exactly one `T` from `bytes`; trailing bytes are an error.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let (value, used) = bincode::serde::decode_from_slice(bytes, config())?;
    if used != bytes.len() {
        return Err(CodecError::Trailing(bytes.len() - used));
    }
    Ok(value)
}

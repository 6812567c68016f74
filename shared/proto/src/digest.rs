//! OCI content digests.
//!
//! A [`Digest`] can only be obtained by parsing (`sha256:` followed by 64 lowercase hex
//! characters) or by hashing bytes, so code that holds one never has to re-validate it and
//! a digest can be used directly as a file name without any risk of path traversal.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest as _, Sha256};

/// Length of the hex part of a sha256 digest.
const SHA256_HEX_LEN: usize = 64;

/// A validated `sha256:<hex>` content digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest([u8; 32]);

/// Why a string is not a digest Shoal accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    #[error("digest has no algorithm prefix (expected sha256:<64 hex>)")]
    MissingAlgorithm,
    #[error("unsupported digest algorithm {0:?}: only sha256 is supported")]
    UnsupportedAlgorithm(String),
    #[error("sha256 digest must have 64 lowercase hex characters")]
    BadEncoding,
}

impl Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self(Sha256::digest(bytes).into())
    }

    /// Wraps raw sha256 output.
    pub fn from_sha256(raw: [u8; 32]) -> Self {
        Self(raw)
    }

    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The lowercase hex encoding, without the algorithm prefix (safe as a file name).
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl FromStr for Digest {
    type Err = DigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (algorithm, encoded) = s.split_once(':').ok_or(DigestError::MissingAlgorithm)?;
        if algorithm != "sha256" {
            // Bound what we echo back: the input is untrusted.
            let shown: String = algorithm.chars().take(32).collect();
            return Err(DigestError::UnsupportedAlgorithm(shown));
        }
        let valid = encoded.len() == SHA256_HEX_LEN
            && encoded.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if !valid {
            return Err(DigestError::BadEncoding);
        }
        let mut raw = [0u8; 32];
        hex::decode_to_slice(encoded, &mut raw).map_err(|_| DigestError::BadEncoding)?;
        Ok(Self(raw))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.collect_str(self)
        } else {
            self.0.serialize(serializer)
        }
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if deserializer.is_human_readable() {
            let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
            s.parse().map_err(serde::de::Error::custom)
        } else {
            let raw = <[u8; 32]>::deserialize(deserializer)?;
            Ok(Self(raw))
        }
    }
}

/// Incremental sha256 that yields a [`Digest`].
#[derive(Default, Clone)]
pub struct DigestHasher(Sha256);

impl fmt::Debug for DigestHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DigestHasher")
    }
}

impl DigestHasher {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    pub fn finish(self) -> Digest {
        Digest(self.0.finalize().into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn parses_and_displays() {
        let d: Digest = EMPTY.parse().expect("valid");
        assert_eq!(d.to_string(), EMPTY);
        assert_eq!(d, Digest::of(b""));
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!("abc".parse::<Digest>(), Err(DigestError::MissingAlgorithm));
        assert!(matches!("sha512:00".parse::<Digest>(), Err(DigestError::UnsupportedAlgorithm(_))));
        assert_eq!("sha256:00".parse::<Digest>(), Err(DigestError::BadEncoding));
        let upper = EMPTY.to_uppercase().replace("SHA256", "sha256");
        assert_eq!(upper.parse::<Digest>(), Err(DigestError::BadEncoding));
        let traversal = format!("sha256:../{}", &EMPTY[10..]);
        assert_eq!(traversal.parse::<Digest>(), Err(DigestError::BadEncoding));
    }

    #[test]
    fn serde_json_round_trip() {
        let d = Digest::of(b"x");
        let json = serde_json::to_string(&d).expect("encode");
        assert_eq!(json, format!("\"{d}\""));
        assert_eq!(serde_json::from_str::<Digest>(&json).expect("decode"), d);
        assert!(serde_json::from_str::<Digest>("\"md5:00\"").is_err());
    }

    #[test]
    fn hasher_matches_one_shot() {
        let mut h = DigestHasher::new();
        h.update(b"hello ");
        h.update(b"world");
        assert_eq!(h.finish(), Digest::of(b"hello world"));
    }
}

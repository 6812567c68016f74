//! Reading an image to push from local storage.
//!
//! This module owns the parsing of push sources (`oci:DIR[:REF]` and `docker-archive:FILE`)
//! and turns them into an [`Image`]: the manifests to upload verbatim plus the location of
//! every blob they reference. Blob contents are *not* hashed here for OCI layouts (the
//! uploader verifies every byte it sends against the expected digest); for classic
//! `docker save` archives the layer digests are computed by streaming the tar entries, since
//! the OCI manifest has to be synthesized.
//!
//! All inputs are untrusted: JSON documents are size-bounded, digests are validated before
//! being used as file names, and every failure is a [`SourceError`], never a panic.
//!
//! This file owns the source spec, the error type and what a loaded image is; `store` reads
//! files out of a directory or a tar archive, `layout` walks an OCI image layout and
//! `classic` synthesizes a manifest for a classic `docker save` archive.

mod classic;
mod layout;
mod store;
#[cfg(test)]
mod tests;

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::str::FromStr;

use shoal_shared::digest::Digest;

use classic::load_classic;
use layout::load_layout;
use store::Store;

/// Largest JSON document (index, manifest, config, `manifest.json`) we read into memory.
pub const MAX_JSON_BYTES: u64 = 4 * 1024 * 1024;

/// How deep nested indexes may go before we give up.
const MAX_INDEX_DEPTH: usize = 4;

/// Annotation holding the tag of a descriptor in an OCI layout's `index.json`.
const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";
/// Annotation containerd/docker put next to `ref.name` with the full image name.
const CONTAINERD_NAME_ANNOTATION: &str = "io.containerd.image.name";

/// Where to read the image from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// An OCI image layout directory, optionally with the `ref.name` to pick.
    Oci { dir: PathBuf, reference: Option<String> },
    /// A `docker save` tarball (classic or OCI-in-tar format).
    DockerArchive(PathBuf),
}

impl FromStr for Source {
    type Err = SourceError;

    /// Parses `oci:DIR[:REF]` (the directory ends at the first `:` after the prefix, like
    /// skopeo) or `docker-archive:FILE`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(rest) = s.strip_prefix("oci:") {
            let (dir, reference) = match rest.split_once(':') {
                Some((dir, reference)) => {
                    if reference.is_empty() {
                        return Err(SourceError::BadSpec(format!(
                            "{s:?}: empty reference after ':' (use oci:DIR or oci:DIR:REF)"
                        )));
                    }
                    (dir, Some(reference.to_owned()))
                }
                None => (rest, None),
            };
            if dir.is_empty() {
                return Err(SourceError::BadSpec(format!("{s:?}: missing directory (use oci:DIR[:REF])")));
            }
            Ok(Self::Oci { dir: PathBuf::from(dir), reference })
        } else if let Some(file) = s.strip_prefix("docker-archive:") {
            if file.is_empty() {
                return Err(SourceError::BadSpec(format!("{s:?}: missing file (use docker-archive:FILE)")));
            }
            Ok(Self::DockerArchive(PathBuf::from(file)))
        } else {
            let shown: String = s.chars().take(200).collect();
            Err(SourceError::BadSpec(format!(
                "unsupported image source {shown:?}: expected oci:DIR[:REF] or docker-archive:FILE"
            )))
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Oci { dir, reference: None } => write!(f, "oci:{}", dir.display()),
            Self::Oci { dir, reference: Some(r) } => write!(f, "oci:{}:{r}", dir.display()),
            Self::DockerArchive(file) => write!(f, "docker-archive:{}", file.display()),
        }
    }
}

/// Why an image source could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{0}")]
    BadSpec(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{what} not found in the image source")]
    NotFound { what: String },
    #[error("{what} is {size} bytes, larger than the {max} byte limit")]
    TooLarge { what: String, size: u64, max: u64 },
    #[error("{what} is not valid JSON of the expected shape: {source}")]
    Json {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("reference {reference:?} not found; available: {available:?}")]
    RefNotFound { reference: String, available: Vec<String> },
    #[error("index.json lists {} images; pick one with oci:DIR:REF (available: {available:?})", available.len())]
    AmbiguousRef { available: Vec<String> },
    #[error("{0}")]
    Invalid(String),
    #[error("blob {digest}: expected {expected} bytes, found {actual}")]
    SizeMismatch { digest: Digest, expected: u64, actual: u64 },
    #[error("{what}: content digest is {actual}, expected {expected}")]
    DigestMismatch { what: String, expected: Digest, actual: Digest },
}

/// Where the bytes of a blob live on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlobLocation {
    /// A whole file.
    File(PathBuf),
    /// `size` bytes starting at `offset` inside an uncompressed tar archive.
    TarEntry { archive: PathBuf, offset: u64 },
}

/// A blob (config or layer) to upload. Its digest is what the manifest claims; the uploader
/// verifies it while streaming.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobRef {
    pub digest: Digest,
    pub size: u64,
    pub location: BlobLocation,
}

/// A manifest or index, uploaded with exactly these bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestDoc {
    pub digest: Digest,
    pub media_type: String,
    pub bytes: Vec<u8>,
}

/// Everything needed to push one image.
#[derive(Debug, Clone)]
pub struct Image {
    /// Every distinct blob referenced by the manifests.
    pub blobs: Vec<BlobRef>,
    /// Every manifest to push by digest, children before the parents that reference them
    /// (image manifests and nested indexes). If the root is an image manifest it is included
    /// here too.
    pub manifests: Vec<ManifestDoc>,
    /// What the tag points at: an index or an image manifest.
    pub root: ManifestDoc,
}

/// Loads `source` (blocking file I/O; call from `spawn_blocking` in async code).
pub fn load(source: &Source) -> Result<Image, SourceError> {
    match source {
        Source::Oci { dir, reference } => {
            let store = Store::Dir(dir.clone());
            load_layout(&store, reference.as_deref())
        }
        Source::DockerArchive(path) => {
            let store = Store::open_tar(path)?;
            if store.exists("index.json") {
                load_layout(&store, None)
            } else if store.exists("manifest.json") {
                load_classic(&store)
            } else {
                Err(SourceError::Invalid(format!(
                    "{}: neither index.json nor manifest.json found; not a docker save archive",
                    path.display()
                )))
            }
        }
    }
}

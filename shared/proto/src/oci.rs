//! OCI distribution-spec rules that need no I/O: repository names, references, manifest
//! media types and the error codes of the registry API.

use std::fmt;
use std::str::FromStr;

use crate::digest::Digest;

/// Longest repository name accepted.
pub const MAX_NAME: usize = 255;
/// Largest manifest or index accepted (the distribution spec's recommended 4 MiB).
pub const MAX_MANIFEST: usize = 4 << 20;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const OCI_LAYER_TAR_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// An `Accept` header taking every manifest and index type this project serves.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
    application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json, \
    application/vnd.docker.distribution.manifest.v2+json";

/// Registry API error codes: exactly the distribution spec's list ("Error Codes"), the only
/// codes clients may rely on, so no other code can be sent.
///
/// The spec has no code for "the server failed" (distribution's `UNAVAILABLE` and `UNKNOWN`
/// are its own). Server-side failures (a store that cannot write, an upstream or tracker
/// that does not answer, a full disk) keep a meaningful HTTP status (503, 502, 507: retry
/// later) and carry the code of what the request was about, as a not-found would: a blob
/// read answers `BLOB_UNKNOWN`, a manifest read `MANIFEST_UNKNOWN`, an upload
/// `BLOB_UPLOAD_INVALID`, a manifest or tag write `MANIFEST_INVALID`. `TOOMANYREQUESTS` is
/// kept for 429 (a client's own rate) and never used for a 503, which is not about the
/// client's rate; `UNSUPPORTED` is kept for what this registry does not do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    BlobUnknown,
    BlobUploadInvalid,
    BlobUploadUnknown,
    DigestInvalid,
    ManifestBlobUnknown,
    ManifestInvalid,
    ManifestUnknown,
    NameInvalid,
    NameUnknown,
    SizeInvalid,
    Unauthorized,
    Denied,
    Unsupported,
    TooManyRequests,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BlobUnknown => "BLOB_UNKNOWN",
            Self::BlobUploadInvalid => "BLOB_UPLOAD_INVALID",
            Self::BlobUploadUnknown => "BLOB_UPLOAD_UNKNOWN",
            Self::DigestInvalid => "DIGEST_INVALID",
            Self::ManifestBlobUnknown => "MANIFEST_BLOB_UNKNOWN",
            Self::ManifestInvalid => "MANIFEST_INVALID",
            Self::ManifestUnknown => "MANIFEST_UNKNOWN",
            Self::NameInvalid => "NAME_INVALID",
            Self::NameUnknown => "NAME_UNKNOWN",
            Self::SizeInvalid => "SIZE_INVALID",
            Self::Unauthorized => "UNAUTHORIZED",
            Self::Denied => "DENIED",
            Self::Unsupported => "UNSUPPORTED",
            Self::TooManyRequests => "TOOMANYREQUESTS",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Checks a repository name against the distribution spec's grammar:
/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(\/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_NAME && name.split('/').all(valid_component)
}

fn valid_component(c: &str) -> bool {
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bytes = c.as_bytes();
    let (Some(&first), Some(&last)) = (bytes.first(), bytes.last()) else { return false };
    if !alnum(first) || !alnum(last) {
        return false;
    }
    // Every run of non-alphanumerics must be ".", "_", "__" or "-"+.
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = matches!(sep, "." | "_" | "__") || sep.bytes().all(|b| b == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// Checks a tag: `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
pub fn valid_tag(tag: &str) -> bool {
    let mut bytes = tag.bytes();
    let first_ok = bytes.next().is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_');
    first_ok
        && tag.len() <= 128
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// A manifest reference: a tag or a digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Reference {
    Tag(String),
    Digest(Digest),
}

/// A reference that is neither a valid tag nor a valid digest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    #[error("invalid digest: {0}")]
    Digest(#[from] crate::digest::DigestError),
    #[error("invalid tag")]
    Tag,
}

impl FromStr for Reference {
    type Err = ReferenceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.contains(':') {
            Ok(Self::Digest(s.parse()?))
        } else if valid_tag(s) {
            Ok(Self::Tag(s.to_owned()))
        } else {
            Err(ReferenceError::Tag)
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tag(t) => f.write_str(t),
            Self::Digest(d) => d.fmt(f),
        }
    }
}

/// The media type of a manifest document: its `mediaType` field, or, when absent (allowed
/// for OCI), inferred from its shape. `None` for anything that is not a JSON manifest.
pub fn manifest_media_type(bytes: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Probe {
        schema_version: Option<u32>,
        media_type: Option<String>,
        manifests: Option<serde::de::IgnoredAny>,
        layers: Option<serde::de::IgnoredAny>,
    }
    let probe: Probe = serde_json::from_slice(bytes).ok()?;
    if probe.schema_version != Some(2) {
        return None;
    }
    match probe.media_type {
        Some(m) if [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST].contains(&m.as_str()) => Some(m),
        Some(_) => None,
        None if probe.manifests.is_some() => Some(OCI_INDEX.to_owned()),
        None if probe.layers.is_some() => Some(OCI_MANIFEST.to_owned()),
        None => None,
    }
}

/// The digests a manifest or index refers to (config, layers, child manifests).
pub fn manifest_references(bytes: &[u8]) -> Result<Vec<Digest>, serde_json::Error> {
    Ok(crate::manifest::Manifest::parse(bytes)?.references().collect())
}

/// The body of `GET /v2/<name>/tags/list`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TagList {
    pub name: String,
    pub tags: Vec<String>,
}

/// Applies the spec's pagination (`last`: tags after this one; `n`: at most this many) to a
/// sorted tag list.
pub fn paginate(tags: &[String], last: Option<&str>, n: Option<usize>) -> Vec<String> {
    tags.iter()
        .filter(|t| last.is_none_or(|l| t.as_str() > l))
        .take(n.unwrap_or(usize::MAX))
        .cloned()
        .collect()
}

/// A byte range of a blob, inclusive start, exclusive end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    pub start: u64,
    pub end: u64,
}

/// Parses a `Range` header for a blob of `len` bytes. `Ok(None)` means "send everything"
/// (no header, or a form we do not serve such as multiple ranges, which RFC 9110 allows us
/// to ignore); `Err(())` means unsatisfiable (416).
#[allow(clippy::result_unit_err)]
pub fn parse_range(header: Option<&str>, len: u64) -> Result<Option<ByteRange>, ()> {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else { return Ok(None) };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((a, b)) = spec.trim().split_once('-') else { return Err(()) };
    let num = |s: &str| s.trim().parse::<u64>().map_err(|_| ());
    let range = match (a.trim().is_empty(), b.trim().is_empty()) {
        (true, true) => return Err(()),
        (true, false) => {
            let n = num(b)?;
            if n == 0 || len == 0 {
                return Err(());
            }
            ByteRange { start: len.saturating_sub(n), end: len }
        }
        (false, true) => ByteRange { start: num(a)?, end: len },
        (false, false) => {
            let (s, e) = (num(a)?, num(b)?);
            if e < s {
                return Err(());
            }
            ByteRange { start: s, end: e.saturating_add(1).min(len) }
        }
    };
    if range.start >= len {
        return Err(());
    }
    Ok(Some(range))
}

/// What a `/v2/<tail>` path addresses. Names are validated; references and digests are
/// left as text for the handler to parse (so it can answer with the right error code).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum V2Path<'a> {
    /// `/v2/` itself.
    Base,
    /// `/v2/<name>/tags/list`
    TagsList {
        name: &'a str,
    },
    Blob {
        name: &'a str,
        digest: &'a str,
    },
    Manifest {
        name: &'a str,
        reference: &'a str,
    },
    /// `/v2/<name>/blobs/uploads/`
    UploadStart {
        name: &'a str,
    },
    /// `/v2/<name>/blobs/uploads/<id>`
    Upload {
        name: &'a str,
        id: &'a str,
    },
    /// `/v2/<name>/referrers/<digest>`
    Referrers {
        name: &'a str,
        digest: &'a str,
    },
}

/// A `/v2/` path that is not valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum V2PathError {
    /// The repository name breaks the grammar.
    Name,
    /// No such endpoint.
    NotFound,
}

/// Splits the part of a request path after `/v2/`.
pub fn parse_v2_path<'a>(tail: &'a str) -> Result<V2Path<'a>, V2PathError> {
    if tail.is_empty() {
        return Ok(V2Path::Base);
    }
    fn checked(name: &str) -> Result<&str, V2PathError> {
        if valid_name(name) {
            Ok(name)
        } else {
            Err(V2PathError::Name)
        }
    }
    if let Some(name) = tail.strip_suffix("/tags/list") {
        return Ok(V2Path::TagsList { name: checked(name)? });
    }
    if let Some(name) = tail.strip_suffix("/blobs/uploads/").or_else(|| tail.strip_suffix("/blobs/uploads")) {
        return Ok(V2Path::UploadStart { name: checked(name)? });
    }
    if let Some((name, id)) = tail.rsplit_once("/blobs/uploads/") {
        return Ok(V2Path::Upload { name: checked(name)?, id });
    }
    // The digest is the last segment (a repository may have a component named `referrers`).
    if let Some((name, digest)) =
        tail.rsplit_once('/').and_then(|(prefix, last)| Some((prefix.strip_suffix("/referrers")?, last)))
    {
        return Ok(V2Path::Referrers { name: checked(name)?, digest });
    }
    if let Some((name, digest)) = tail.rsplit_once("/blobs/") {
        return Ok(V2Path::Blob { name: checked(name)?, digest });
    }
    if let Some((name, reference)) = tail.rsplit_once("/manifests/") {
        return Ok(V2Path::Manifest { name: checked(name)?, reference });
    }
    Err(V2PathError::NotFound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v2_paths() {
        assert_eq!(parse_v2_path(""), Ok(V2Path::Base));
        assert_eq!(
            parse_v2_path("library/alpine/manifests/3.20"),
            Ok(V2Path::Manifest { name: "library/alpine", reference: "3.20" })
        );
        assert_eq!(parse_v2_path("a/b/blobs/sha256:x"), Ok(V2Path::Blob { name: "a/b", digest: "sha256:x" }));
        assert_eq!(parse_v2_path("a/blobs/uploads/"), Ok(V2Path::UploadStart { name: "a" }));
        assert_eq!(parse_v2_path("a/blobs/uploads/u1"), Ok(V2Path::Upload { name: "a", id: "u1" }));
        assert_eq!(parse_v2_path("../x/blobs/sha256:x"), Err(V2PathError::Name));
        assert_eq!(parse_v2_path("a/b/tags/list"), Ok(V2Path::TagsList { name: "a/b" }));
        assert_eq!(parse_v2_path("a/tags/other"), Err(V2PathError::NotFound));
        assert_eq!(
            parse_v2_path("a/b/referrers/sha256:x"),
            Ok(V2Path::Referrers { name: "a/b", digest: "sha256:x" })
        );
        assert_eq!(parse_v2_path("A/referrers/sha256:x"), Err(V2PathError::Name));
        assert_eq!(
            parse_v2_path("a/referrers/blobs/sha256:x"),
            Ok(V2Path::Blob { name: "a/referrers", digest: "sha256:x" })
        );
    }

    #[test]
    fn names() {
        for ok in ["a", "library/alpine", "a.b_c__d---e/f0", "x/y/z"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", "A", "a/", "/a", "a//b", "../etc", "a/../b", "a..b", "a___b", "a-", "a:b", "a%2e"] {
            assert!(!valid_name(bad), "{bad}");
        }
        assert!(!valid_name(&"a".repeat(256)));
    }

    #[test]
    fn references() {
        assert_eq!("latest".parse(), Ok(Reference::Tag("latest".into())));
        assert!(".x".parse::<Reference>().is_err());
        assert!("sha256:xyz".parse::<Reference>().is_err());
        assert!(matches!(Digest::of(b"").to_string().parse::<Reference>(), Ok(Reference::Digest(_))));
        assert!(!valid_tag(&"a".repeat(129)));
    }

    #[test]
    fn media_types() {
        let oci = br#"{"schemaVersion":2,"config":{},"layers":[]}"#;
        assert_eq!(manifest_media_type(oci).as_deref(), Some(OCI_MANIFEST));
        let list = format!(r#"{{"schemaVersion":2,"mediaType":"{DOCKER_LIST}","manifests":[]}}"#);
        assert_eq!(manifest_media_type(list.as_bytes()).as_deref(), Some(DOCKER_LIST));
        assert_eq!(manifest_media_type(br#"{"schemaVersion":1}"#), None);
        assert_eq!(manifest_media_type(b"not json"), None);
    }

    #[test]
    fn tag_pagination() {
        let tags: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        assert_eq!(paginate(&tags, None, None), tags);
        assert_eq!(paginate(&tags, Some("a"), Some(1)), vec!["b".to_string()]);
        assert!(paginate(&tags, Some("c"), None).is_empty());
    }

    #[test]
    fn ranges() {
        let r = |s, e| Ok(Some(ByteRange { start: s, end: e }));
        assert_eq!(parse_range(None, 10), Ok(None));
        assert_eq!(parse_range(Some("bytes=0-4"), 10), r(0, 5));
        assert_eq!(parse_range(Some("bytes=5-"), 10), r(5, 10));
        assert_eq!(parse_range(Some("bytes=-3"), 10), r(7, 10));
        assert_eq!(parse_range(Some("bytes=8-100"), 10), r(8, 10));
        assert_eq!(parse_range(Some("bytes=0-1,3-4"), 10), Ok(None));
        assert_eq!(parse_range(Some("bytes=10-"), 10), Err(()));
        assert_eq!(parse_range(Some("bytes=5-2"), 10), Err(()));
        assert_eq!(parse_range(Some("bytes=x-2"), 10), Err(()));
        assert_eq!(parse_range(Some("bytes=-0"), 10), Err(()));
    }
}

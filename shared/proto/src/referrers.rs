//! The referrers API's data (distribution spec, "Listing Referrers"), without I/O: which
//! manifest refers to which (`subject`), the descriptor a referrer is listed with, and the
//! image index a `GET /v2/<name>/referrers/<digest>` answers.
//!
//! A referrer's descriptor is computed once, when its manifest is pushed, and stored next to
//! the link from its subject; listing then needs no manifest to be read again.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::oci::OCI_INDEX;

/// Most referrers one answer lists (and one tracker merges): cosign, notation and SBOM tools
/// attach a handful per image; a subject with more is refused new ones rather than making
/// every listing unbounded.
pub const MAX_REFERRERS: usize = 1024;
/// Largest referrers index read from another component (1,024 descriptors with annotations).
pub const MAX_REFERRERS_JSON: usize = 4 << 20;
/// Most bytes of a referrer's stored descriptor (annotations included).
pub const MAX_DESCRIPTOR_JSON: usize = 64 << 10;

/// A referrer as the index lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// A pushed manifest that names a subject: the subject's digest and how to list the manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Referrer {
    pub subject: Digest,
    pub descriptor: Descriptor,
}

/// Why a manifest's `subject` part cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ReferrerError {
    #[error("manifest: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the descriptor of this referrer is larger than {MAX_DESCRIPTOR_JSON} bytes")]
    TooLarge,
}

/// The referrer a manifest makes of itself, if it has a `subject`. `media_type` is the
/// manifest's (already checked by the caller), `digest` and `size` those of its bytes. The
/// artifact type is the manifest's `artifactType`, else its config's media type (spec).
pub fn referrer_of(
    bytes: &[u8],
    media_type: &str,
    digest: Digest,
) -> Result<Option<Referrer>, ReferrerError> {
    #[derive(Deserialize)]
    struct Subject {
        digest: Digest,
    }
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Config {
        media_type: Option<String>,
    }
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Probe {
        subject: Option<Subject>,
        artifact_type: Option<String>,
        config: Option<Config>,
        #[serde(default)]
        annotations: BTreeMap<String, String>,
    }
    let probe: Probe = serde_json::from_slice(bytes)?;
    let Some(subject) = probe.subject else { return Ok(None) };
    let artifact_type = probe.artifact_type.or_else(|| probe.config.and_then(|c| c.media_type));
    let descriptor = Descriptor {
        media_type: media_type.to_owned(),
        digest,
        size: bytes.len() as u64,
        artifact_type,
        annotations: probe.annotations,
    };
    if serde_json::to_vec(&descriptor)?.len() > MAX_DESCRIPTOR_JSON {
        return Err(ReferrerError::TooLarge);
    }
    Ok(Some(Referrer { subject: subject.digest, descriptor }))
}

/// The answer of the referrers API: an OCI image index of descriptors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReferrersIndex {
    pub schema_version: u32,
    pub media_type: String,
    pub manifests: Vec<Descriptor>,
}

impl ReferrersIndex {
    /// The index of `referrers`, keeping only those of `artifact_type` when one is given;
    /// sorted by digest, one entry per digest, at most [`MAX_REFERRERS`].
    pub fn new(referrers: impl IntoIterator<Item = Descriptor>, artifact_type: Option<&str>) -> Self {
        let mut by_digest = BTreeMap::new();
        for d in referrers {
            if artifact_type.is_none_or(|t| d.artifact_type.as_deref() == Some(t)) {
                by_digest.entry(d.digest).or_insert(d);
            }
        }
        let manifests = by_digest.into_values().take(MAX_REFERRERS).collect();
        Self { schema_version: 2, media_type: OCI_INDEX.to_owned(), manifests }
    }
}

/// The response header saying which filters an answer applied.
pub const FILTERS_APPLIED: &str = "OCI-Filters-Applied";
/// The response header of a manifest PUT whose `subject` the registry processed.
pub const OCI_SUBJECT: &str = "OCI-Subject";

/// Whether `artifact_type` (a `?artifactType=` value) is a plausible media type: bounded,
/// printable ASCII without spaces. Anything else is refused rather than echoed back.
pub fn valid_artifact_type(artifact_type: &str) -> bool {
    !artifact_type.is_empty()
        && artifact_type.len() <= 255
        && artifact_type.bytes().all(|b| b.is_ascii_graphic())
        && artifact_type.contains('/')
}

/// The query string (`?artifactType=...`, percent-encoded; empty without a filter) that
/// passes a filter on to another component.
pub fn filter_query(artifact_type: Option<&str>) -> String {
    let Some(t) = artifact_type else { return String::new() };
    let mut out = String::from("?artifactType=");
    for b in t.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::OCI_MANIFEST;

    fn manifest(subject: Option<&Digest>, artifact_type: Option<&str>, config_type: &str) -> Vec<u8> {
        let mut m = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": config_type, "digest": Digest::of(b"{}").to_string(), "size": 2},
            "layers": [],
            "annotations": {"org.example.k": "v"},
        });
        if let Some(s) = subject {
            m["subject"] = serde_json::json!({"mediaType": OCI_MANIFEST, "digest": s.to_string(), "size": 1});
        }
        if let Some(t) = artifact_type {
            m["artifactType"] = serde_json::json!(t);
        }
        serde_json::to_vec(&m).expect("json")
    }

    #[test]
    fn a_referrer_is_listed_with_its_artifact_type_or_its_configs_media_type() {
        let subject = Digest::of(b"subject");
        let bytes = manifest(Some(&subject), Some("application/vnd.example.sbom"), "application/x");
        let r = referrer_of(&bytes, OCI_MANIFEST, Digest::of(&bytes)).expect("ok").expect("referrer");
        assert_eq!(r.subject, subject);
        assert_eq!(r.descriptor.artifact_type.as_deref(), Some("application/vnd.example.sbom"));
        assert_eq!(r.descriptor.size, bytes.len() as u64);
        assert_eq!(r.descriptor.annotations.get("org.example.k").map(String::as_str), Some("v"));

        let bytes = manifest(Some(&subject), None, "application/vnd.example.sig");
        let r = referrer_of(&bytes, OCI_MANIFEST, Digest::of(&bytes)).expect("ok").expect("referrer");
        assert_eq!(r.descriptor.artifact_type.as_deref(), Some("application/vnd.example.sig"));

        let plain = manifest(None, None, "application/x");
        assert!(referrer_of(&plain, OCI_MANIFEST, Digest::of(&plain)).expect("ok").is_none());
        assert!(referrer_of(b"{\"subject\":{\"digest\":\"md5:x\"}}", OCI_MANIFEST, Digest::of(b"")).is_err());
    }

    #[test]
    fn the_index_filters_dedups_and_sorts() {
        let d = |n: &[u8], t: &str| Descriptor {
            media_type: OCI_MANIFEST.into(),
            digest: Digest::of(n),
            size: 1,
            artifact_type: Some(t.into()),
            annotations: BTreeMap::new(),
        };
        let all = vec![d(b"a", "x/sig"), d(b"b", "x/sbom"), d(b"a", "x/sig")];
        let index = ReferrersIndex::new(all.clone(), None);
        assert_eq!(index.manifests.len(), 2);
        assert_eq!(index.media_type, OCI_INDEX);
        assert!(index.manifests.windows(2).all(|w| w[0].digest < w[1].digest));
        let sigs = ReferrersIndex::new(all, Some("x/sig"));
        assert_eq!(sigs.manifests, vec![d(b"a", "x/sig")]);
        assert!(ReferrersIndex::new(Vec::new(), None).manifests.is_empty());
        let json = serde_json::to_value(&sigs).expect("json");
        assert_eq!(json["schemaVersion"], 2);
        assert_eq!(json["manifests"][0]["artifactType"], "x/sig");
        assert!(json["manifests"][0].get("annotations").is_none());
    }

    #[test]
    fn filters_are_percent_encoded() {
        assert_eq!(filter_query(None), "");
        assert_eq!(filter_query(Some("application/vnd.x+json")), "?artifactType=application%2Fvnd.x%2Bjson");
    }

    #[test]
    fn artifact_types() {
        assert!(valid_artifact_type("application/vnd.example.sbom.v1+json"));
        for bad in ["", "no-slash", "a b/c", "a/\u{7f}", &format!("a/{}", "b".repeat(255))] {
            assert!(!valid_artifact_type(bad), "{bad:?}");
        }
    }
}

//! One model of image manifests and indexes (OCI image spec and Docker schema 2), read by
//! every part of Shoal that looks inside one: the origin's prefetch, pull-through and
//! referrers, the agent's preload, the seeding CLI's layouts. Only the fields Shoal uses are
//! modelled; unknown fields are ignored, as the specs ask. Media types live in
//! [`crate::oci`].

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::digest::Digest;

/// A platform an index entry is for.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    #[serde(default)]
    pub variant: Option<String>,
}

/// A reference to content: what it is, its digest and size.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default)]
    pub media_type: Option<String>,
    pub digest: Digest,
    #[serde(default)]
    pub size: u64,
    #[serde(default)]
    pub platform: Option<Platform>,
    #[serde(default)]
    pub artifact_type: Option<String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

/// An image manifest or an index (a manifest list): which it is follows from its fields
/// ([`is_index`](Self::is_index)); [`crate::oci::manifest_media_type`] names its type.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    #[serde(default)]
    pub schema_version: Option<u32>,
    #[serde(default)]
    pub media_type: Option<String>,
    #[serde(default)]
    pub artifact_type: Option<String>,
    /// A manifest's config.
    #[serde(default)]
    pub config: Option<Descriptor>,
    /// A manifest's layers.
    #[serde(default)]
    pub layers: Vec<Descriptor>,
    /// An index's manifests.
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
    /// The manifest this one refers to (signatures, SBOMs).
    #[serde(default)]
    pub subject: Option<Descriptor>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

impl Manifest {
    /// Parses a manifest or index document.
    pub fn parse(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    /// Whether it lists manifests rather than layers.
    pub fn is_index(&self) -> bool {
        !self.manifests.is_empty() && self.config.is_none()
    }

    /// The config and layers of a manifest, in order.
    pub fn blobs(&self) -> impl Iterator<Item = &Descriptor> {
        self.config.iter().chain(&self.layers)
    }

    /// Every digest it refers to: config, layers, child manifests (not the subject, which
    /// a referrer may be pushed before).
    pub fn references(&self) -> impl Iterator<Item = Digest> + '_ {
        self.blobs().chain(&self.manifests).map(|d| d.digest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    #[test]
    fn a_manifest_and_an_index_read_alike() {
        let manifest = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",
               "config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":7}},
               "layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{}","size":9}}],
               "subject":{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{}","size":3}},
               "annotations":{{"a":"b"}},"extra":true}}"#,
            d('a'),
            d('b'),
            d('c')
        );
        let m = Manifest::parse(manifest.as_bytes()).expect("manifest");
        assert!(!m.is_index());
        assert_eq!(m.blobs().map(|b| b.size).collect::<Vec<_>>(), vec![7, 9]);
        let refs: Vec<String> = m.references().map(|r| r.to_string()).collect();
        assert_eq!(refs, vec![d('a'), d('b')]);
        assert_eq!(m.subject.map(|s| s.digest.to_string()), Some(d('c')));

        let index = format!(
            r#"{{"schemaVersion":2,"manifests":[
                {{"digest":"{}","size":1,"platform":{{"os":"linux","architecture":"arm64","variant":"v8"}}}},
                {{"digest":"{}","size":2}}]}}"#,
            d('d'),
            d('e')
        );
        let i = Manifest::parse(index.as_bytes()).expect("index");
        assert!(i.is_index());
        assert_eq!(i.manifests[0].platform.as_ref().and_then(|p| p.variant.as_deref()), Some("v8"));
        assert_eq!(i.references().count(), 2);
        assert!(Manifest::parse(br#"{"layers":[{"digest":"md5:x"}]}"#).is_err(), "digests are checked");
    }
}

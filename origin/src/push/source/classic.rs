//! Classic `docker save` archives (`manifest.json` plus config and layer tars): there is no
//! OCI manifest to push verbatim, so one is synthesized, with each layer's digest computed by
//! streaming its tar entry and its media type chosen by the gzip magic.

use std::collections::HashSet;
use std::io::Read;
use std::path::Path;

use serde::Deserialize;
use shoal_shared::digest::{Digest, DigestHasher};
use shoal_shared::oci::{OCI_CONFIG, OCI_LAYER_TAR, OCI_LAYER_TAR_GZIP, OCI_MANIFEST};

use super::store::{io_err, normalize, open_range, parse_json, Store};
use super::{BlobLocation, BlobRef, Image, ManifestDoc, SourceError};

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ClassicEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// Streams a tar entry through sha256, returning its digest and whether it starts with the
/// gzip magic.
fn hash_entry(location: &BlobLocation, size: u64) -> Result<(Digest, bool), SourceError> {
    let (path, offset) = match location {
        BlobLocation::File(path) => (path.as_path(), 0),
        BlobLocation::TarEntry { archive, offset } => (archive.as_path(), *offset),
    };
    let mut reader = open_range(path, offset, size)?;
    let mut hasher = DigestHasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    let mut magic = [0u8; 2];
    loop {
        let n = reader.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        for (i, byte) in buf[..n].iter().take(2).enumerate() {
            let at = total as usize + i;
            if at < 2 {
                magic[at] = *byte;
            }
        }
        total += n as u64;
        hasher.update(&buf[..n]);
    }
    if total != size {
        return Err(SourceError::Invalid(format!(
            "{}: archive entry truncated ({total} of {size} bytes)",
            path.display()
        )));
    }
    Ok((hasher.finish(), size >= 2 && magic == [0x1f, 0x8b]))
}

pub(super) fn load_classic(store: &Store) -> Result<Image, SourceError> {
    let bytes = store.read_doc("manifest.json")?;
    let entries: Vec<ClassicEntry> = parse_json("manifest.json", &bytes)?;
    let entry =
        entries.first().ok_or_else(|| SourceError::Invalid("manifest.json lists no images".to_owned()))?;
    if entries.len() > 1 {
        tracing::warn!(
            count = entries.len(),
            tags = ?entry.repo_tags,
            "docker archive holds several images; pushing the first"
        );
    }
    let mut blobs = Vec::new();
    let mut seen = HashSet::new();

    let locate = |rel: &str| -> Result<(BlobLocation, u64), SourceError> {
        let name = normalize(Path::new(rel))
            .ok_or_else(|| SourceError::Invalid(format!("bad path {rel:?} in manifest.json")))?;
        store
            .locate(&name)?
            .ok_or_else(|| SourceError::NotFound { what: format!("{rel:?} (referenced by manifest.json)") })
    };

    let config_bytes = store.read_doc(
        &normalize(Path::new(&entry.config))
            .ok_or_else(|| SourceError::Invalid(format!("bad config path {:?}", entry.config)))?,
    )?;
    let _: serde_json::Value = parse_json("image config", &config_bytes)?;
    let config_digest = Digest::of(&config_bytes);
    let (config_location, config_size) = locate(&entry.config)?;
    seen.insert(config_digest);
    blobs.push(BlobRef { digest: config_digest, size: config_size, location: config_location });

    let mut layers = Vec::with_capacity(entry.layers.len());
    for rel in &entry.layers {
        let (location, size) = locate(rel)?;
        let (digest, gzip) = hash_entry(&location, size)?;
        let media_type = if gzip { OCI_LAYER_TAR_GZIP } else { OCI_LAYER_TAR };
        layers.push(serde_json::json!({
            "mediaType": media_type,
            "digest": digest.to_string(),
            "size": size,
        }));
        if seen.insert(digest) {
            blobs.push(BlobRef { digest, size, location });
        }
    }
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": OCI_CONFIG,
            "digest": config_digest.to_string(),
            "size": config_size,
        },
        "layers": layers,
    });
    let manifest_bytes = serde_json::to_vec(&manifest)
        .map_err(|source| SourceError::Json { what: "generated manifest".to_owned(), source })?;
    let root = ManifestDoc {
        digest: Digest::of(&manifest_bytes),
        media_type: OCI_MANIFEST.to_owned(),
        bytes: manifest_bytes,
    };
    Ok(Image { blobs, manifests: vec![root.clone()], root })
}

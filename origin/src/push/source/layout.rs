//! OCI image layouts (a directory, or inside a `docker save` tar): `index.json` is read,
//! the image is picked by its `ref.name` annotation, and manifests and nested indexes are
//! walked (children first, at most [`MAX_INDEX_DEPTH`] deep) to collect every blob, each
//! document checked against its descriptor's size and digest.

use std::collections::HashSet;

use oci_spec::image::{Descriptor, ImageIndex, ImageManifest, MediaType};
use shoal_shared::digest::Digest;
use shoal_shared::oci::{DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST};

use super::store::{blob_rel, descriptor_digest, parse_json, Store};
use super::{
    BlobRef, Image, ManifestDoc, SourceError, CONTAINERD_NAME_ANNOTATION, MAX_INDEX_DEPTH,
    REF_NAME_ANNOTATION,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DocKind {
    Index,
    Manifest,
}

/// Decides whether a document is an index or an image manifest: by its own `mediaType`, then
/// the descriptor's, then by shape (`manifests` vs `layers`).
fn classify(hint: Option<&str>, bytes: &[u8], what: &str) -> Result<(DocKind, String), SourceError> {
    let value: serde_json::Value = parse_json(what, bytes)?;
    let own = value.get("mediaType").and_then(|v| v.as_str());
    let by_type = |mt: &str| match mt {
        OCI_INDEX | DOCKER_LIST => Some(DocKind::Index),
        OCI_MANIFEST | DOCKER_MANIFEST => Some(DocKind::Manifest),
        _ => None,
    };
    for mt in [own, hint].into_iter().flatten() {
        if mt.starts_with("application/vnd.docker.distribution.manifest.v1") {
            return Err(SourceError::Invalid(format!("{what}: docker schema 1 manifests are not supported")));
        }
        if let Some(kind) = by_type(mt) {
            return Ok((kind, mt.to_owned()));
        }
    }
    let fallback_type = own.or(hint);
    if value.get("manifests").is_some_and(|v| v.is_array()) {
        Ok((DocKind::Index, fallback_type.unwrap_or(OCI_INDEX).to_owned()))
    } else if value.get("layers").is_some_and(|v| v.is_array()) {
        Ok((DocKind::Manifest, fallback_type.unwrap_or(OCI_MANIFEST).to_owned()))
    } else {
        Err(SourceError::Invalid(format!("{what}: neither an image index nor an image manifest")))
    }
}

#[derive(Default)]
struct Collector {
    blobs: Vec<BlobRef>,
    seen_blobs: HashSet<Digest>,
    manifests: Vec<ManifestDoc>,
    seen_manifests: HashSet<Digest>,
}

/// Reads the document `desc` points at and checks its size and digest.
fn read_described(store: &Store, desc: &Descriptor) -> Result<Option<(Digest, Vec<u8>)>, SourceError> {
    let digest = descriptor_digest(desc)?;
    let rel = blob_rel(&digest);
    if !store.exists(&rel) {
        return Ok(None);
    }
    let bytes = store.read_doc(&rel)?;
    let actual = Digest::of(&bytes);
    if actual != digest {
        return Err(SourceError::DigestMismatch { what: rel, expected: digest, actual });
    }
    if bytes.len() as u64 != desc.size() {
        return Err(SourceError::SizeMismatch { digest, expected: desc.size(), actual: bytes.len() as u64 });
    }
    Ok(Some((digest, bytes)))
}

fn add_blob(store: &Store, out: &mut Collector, desc: &Descriptor) -> Result<(), SourceError> {
    let digest = descriptor_digest(desc)?;
    if out.seen_blobs.contains(&digest) {
        return Ok(());
    }
    let Some((location, size)) = store.locate(&blob_rel(&digest))? else {
        if desc.urls().as_ref().is_some_and(|u| !u.is_empty()) {
            tracing::warn!(%digest, "skipping foreign layer that is not in the image source");
            return Ok(());
        }
        return Err(SourceError::NotFound { what: format!("blob {digest}") });
    };
    if size != desc.size() {
        return Err(SourceError::SizeMismatch { digest, expected: desc.size(), actual: size });
    }
    out.seen_blobs.insert(digest);
    out.blobs.push(BlobRef { digest, size, location });
    Ok(())
}

/// Walks a manifest or index, collecting blobs and child manifests (children first).
fn visit(
    store: &Store,
    out: &mut Collector,
    digest: Digest,
    hint: Option<&str>,
    bytes: Vec<u8>,
    depth: usize,
) -> Result<ManifestDoc, SourceError> {
    let what = format!("manifest {digest}");
    let (kind, media_type) = classify(hint, &bytes, &what)?;
    match kind {
        DocKind::Manifest => {
            let manifest: ImageManifest = parse_json(&what, &bytes)?;
            add_blob(store, out, manifest.config())?;
            for layer in manifest.layers() {
                add_blob(store, out, layer)?;
            }
        }
        DocKind::Index => {
            if depth >= MAX_INDEX_DEPTH {
                return Err(SourceError::Invalid(format!(
                    "{what}: indexes nested more than {MAX_INDEX_DEPTH} deep"
                )));
            }
            let index: ImageIndex = parse_json(&what, &bytes)?;
            let mut found = 0usize;
            for child in index.manifests() {
                let Some((child_digest, child_bytes)) = read_described(store, child)? else {
                    let platform = child
                        .platform()
                        .as_ref()
                        .map(|p| format!("{}/{}", p.os(), p.architecture()))
                        .unwrap_or_else(|| "unknown platform".to_owned());
                    tracing::warn!(
                        digest = %child.digest(),
                        %platform,
                        "index child manifest not present in the image source; skipping it"
                    );
                    continue;
                };
                found += 1;
                if out.seen_manifests.contains(&child_digest) {
                    continue;
                }
                let child_type = child.media_type().to_string();
                let doc = visit(store, out, child_digest, Some(&child_type), child_bytes, depth + 1)?;
                if out.seen_manifests.insert(doc.digest) {
                    out.manifests.push(doc);
                }
            }
            if found == 0 {
                return Err(SourceError::Invalid(format!(
                    "{what}: none of its {} child manifests are present in the image source",
                    index.manifests().len()
                )));
            }
        }
    }
    Ok(ManifestDoc { digest, media_type, bytes })
}

fn ref_names(desc: &Descriptor) -> Vec<&str> {
    let Some(annotations) = desc.annotations() else {
        return Vec::new();
    };
    [REF_NAME_ANNOTATION, CONTAINERD_NAME_ANNOTATION]
        .iter()
        .filter_map(|key| annotations.get(*key).map(String::as_str))
        .collect()
}

pub(super) fn load_layout(store: &Store, reference: Option<&str>) -> Result<Image, SourceError> {
    let index_bytes = store.read_doc("index.json")?;
    let index: ImageIndex = parse_json("index.json", &index_bytes)?;
    let available: Vec<String> = index
        .manifests()
        .iter()
        .map(|d| {
            d.annotations()
                .as_ref()
                .and_then(|a| a.get(REF_NAME_ANNOTATION))
                .cloned()
                .unwrap_or_else(|| d.digest().to_string())
        })
        .collect();
    let chosen = match reference {
        Some(reference) => index
            .manifests()
            .iter()
            .find(|d| ref_names(d).first() == Some(&reference))
            .or_else(|| index.manifests().iter().find(|d| ref_names(d).contains(&reference)))
            .ok_or_else(|| SourceError::RefNotFound {
                reference: reference.to_owned(),
                available: available.clone(),
            })?,
        None => match index.manifests().as_slice() {
            [only] => only,
            [] => return Err(SourceError::Invalid("index.json lists no images".to_owned())),
            _ => return Err(SourceError::AmbiguousRef { available }),
        },
    };
    if let MediaType::Other(other) = chosen.media_type() {
        if other != DOCKER_MANIFEST && other != DOCKER_LIST {
            tracing::debug!(media_type = %other, "root descriptor has a non-standard media type");
        }
    }
    let (digest, bytes) = read_described(store, chosen)?
        .ok_or_else(|| SourceError::NotFound { what: format!("root manifest {}", chosen.digest()) })?;
    let mut out = Collector::default();
    let hint = chosen.media_type().to_string();
    let root = visit(store, &mut out, digest, Some(&hint), bytes, 0)?;
    if classify(Some(&hint), &root.bytes, "root")?.0 == DocKind::Manifest
        && out.seen_manifests.insert(root.digest)
    {
        out.manifests.push(root.clone());
    }
    Ok(Image { blobs: out.blobs, manifests: out.manifests, root })
}

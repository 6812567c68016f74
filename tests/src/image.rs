//! Test image generator: writes real, pullable OCI image layouts to disk.
//!
//! [`generate_oci_layout`] produces a linux/amd64 image whose layers are uncompressed tar
//! archives of seeded pseudo-random data, so images of hundreds of MiB can be produced
//! deterministically without holding a layer in memory. The output is a valid OCI image layout
//! (`oci-layout`, `index.json`, `blobs/sha256/<hex>`) accepted by skopeo and containerd.
//! This module deliberately does not use the origin's push code, so it can serve as an
//! independent oracle for it.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::Context as _;
use rand::rngs::StdRng;
use rand::{RngCore as _, SeedableRng as _};
use serde_json::json;
use sha2::{Digest as _, Sha256};

const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";
const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";
const CHUNK: usize = 1 << 20;
const BLOCK: u64 = 512;

/// What [`generate_oci_layout`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GeneratedImage {
    /// Digest of the image manifest (`sha256:...`).
    pub manifest: String,
    /// The exact manifest bytes.
    pub manifest_bytes: Vec<u8>,
    /// Digest of the config blob.
    pub config: String,
    /// `(digest, size)` of each layer, base layer first.
    pub layers: Vec<(String, u64)>,
}

fn digest_string(hash: Sha256) -> String {
    format!("sha256:{}", hex::encode(hash.finalize()))
}

/// A writer that hashes and counts what passes through it.
struct HashingWriter<W> {
    inner: W,
    hash: Sha256,
    written: u64,
}

impl<W: Write> HashingWriter<W> {
    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.inner.write_all(bytes)?;
        self.hash.update(bytes);
        self.written += bytes.len() as u64;
        Ok(())
    }
}

/// Writes `bytes` as `blobs/sha256/<hex>` and returns its digest.
fn write_blob(blobs: &Path, bytes: &[u8]) -> anyhow::Result<String> {
    let hex = hex::encode(Sha256::digest(bytes));
    let path = blobs.join(&hex);
    fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
    Ok(format!("sha256:{hex}"))
}

fn tar_header(path: &str, entry_type: tar::EntryType, mode: u32, size: u64) -> anyhow::Result<tar::Header> {
    let mut header = tar::Header::new_ustar();
    header.set_path(path).with_context(|| format!("tar path {path}"))?;
    header.set_entry_type(entry_type);
    header.set_mode(mode);
    header.set_size(size);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_cksum();
    Ok(header)
}

/// Streams one layer tar (`data/` + `data/layer-<index>.bin`) into `blobs`, returning its
/// digest and size.
fn write_layer(blobs: &Path, index: usize, size: usize, rng: &mut StdRng) -> anyhow::Result<(String, u64)> {
    let tmp_path = blobs.join(format!(".layer-{index}.tmp"));
    let file = File::create(&tmp_path).with_context(|| format!("creating {}", tmp_path.display()))?;
    let mut out =
        HashingWriter { inner: BufWriter::with_capacity(CHUNK, file), hash: Sha256::new(), written: 0 };
    let dir = tar_header("data/", tar::EntryType::Directory, 0o755, 0)?;
    out.put(dir.as_bytes())?;
    let file_header =
        tar_header(&format!("data/layer-{index}.bin"), tar::EntryType::Regular, 0o644, size as u64)?;
    out.put(file_header.as_bytes())?;
    let mut buf = vec![0u8; CHUNK.min(size.max(1))];
    let mut remaining = size;
    while remaining > 0 {
        let n = remaining.min(buf.len());
        rng.fill_bytes(&mut buf[..n]);
        out.put(&buf[..n])?;
        remaining -= n;
    }
    let padding = (BLOCK - (size as u64 % BLOCK)) % BLOCK;
    // Data padding plus the two zero blocks that end the archive.
    let zeros = vec![0u8; (padding + 2 * BLOCK) as usize];
    out.put(&zeros)?;
    let HashingWriter { inner, hash, written } = out;
    inner
        .into_inner()
        .map_err(|e| e.into_error())
        .and_then(|f| f.sync_all())
        .with_context(|| format!("writing {}", tmp_path.display()))?;
    let digest = digest_string(hash);
    let final_path = blobs.join(digest.trim_start_matches("sha256:"));
    fs::rename(&tmp_path, &final_path).with_context(|| format!("renaming to {}", final_path.display()))?;
    Ok((digest, written))
}

/// Writes a linux/amd64 OCI image layout at `dir` tagged `tag` (the `ref.name` annotation),
/// with one uncompressed tar layer per entry of `layer_sizes`, each holding
/// `/data/layer-<i>.bin` of that many pseudo-random bytes derived from `seed`.
pub fn generate_oci_layout(
    dir: &Path,
    tag: &str,
    layer_sizes: &[usize],
    seed: u64,
) -> anyhow::Result<GeneratedImage> {
    let blobs = dir.join("blobs").join("sha256");
    fs::create_dir_all(&blobs).with_context(|| format!("creating {}", blobs.display()))?;

    let mut rng = StdRng::seed_from_u64(seed);
    let mut layers = Vec::with_capacity(layer_sizes.len());
    for (index, &size) in layer_sizes.iter().enumerate() {
        layers.push(write_layer(&blobs, index, size, &mut rng)?);
    }

    let diff_ids: Vec<&str> = layers.iter().map(|(d, _)| d.as_str()).collect();
    let history: Vec<_> = layers
        .iter()
        .enumerate()
        .map(|(i, _)| json!({"created_by": format!("shoal test layer {i}")}))
        .collect();
    let config = json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/bin/true"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": history,
    });
    let config_bytes = serde_json::to_vec(&config)?;
    let config_digest = write_blob(&blobs, &config_bytes)?;

    let layer_descriptors: Vec<_> = layers
        .iter()
        .map(|(digest, size)| json!({"mediaType": LAYER_MEDIA_TYPE, "digest": digest, "size": size}))
        .collect();
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": {
            "mediaType": CONFIG_MEDIA_TYPE,
            "digest": config_digest,
            "size": config_bytes.len(),
        },
        "layers": layer_descriptors,
    });
    let manifest_bytes = serde_json::to_vec(&manifest)?;
    let manifest_digest = write_blob(&blobs, &manifest_bytes)?;

    let index = json!({
        "schemaVersion": 2,
        "mediaType": INDEX_MEDIA_TYPE,
        "manifests": [{
            "mediaType": MANIFEST_MEDIA_TYPE,
            "digest": manifest_digest,
            "size": manifest_bytes.len(),
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }],
    });
    fs::write(dir.join("index.json"), serde_json::to_vec(&index)?)
        .with_context(|| format!("writing {}/index.json", dir.display()))?;
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)
        .with_context(|| format!("writing {}/oci-layout", dir.display()))?;

    Ok(GeneratedImage { manifest: manifest_digest, manifest_bytes, config: config_digest, layers })
}

/// Writes a two-platform (linux/amd64, linux/arm64) OCI image layout at `dir` whose
/// `index.json` tags an image index `tag`; returns the index digest and bytes and the two
/// images, amd64 first. The images differ (seeds `seed` and `seed + 1`).
pub fn generate_multiarch_layout(
    dir: &Path,
    tag: &str,
    layer_sizes: &[usize],
    seed: u64,
) -> anyhow::Result<(String, Vec<u8>, Vec<GeneratedImage>)> {
    let amd64 = generate_oci_layout(dir, tag, layer_sizes, seed)?;
    let arm64 = generate_oci_layout(dir, tag, layer_sizes, seed + 1)?;
    let entry = |image: &GeneratedImage, arch: &str| {
        json!({
            "mediaType": MANIFEST_MEDIA_TYPE,
            "digest": image.manifest,
            "size": image.manifest_bytes.len(),
            "platform": {"architecture": arch, "os": "linux"},
        })
    };
    let image_index = json!({
        "schemaVersion": 2,
        "mediaType": INDEX_MEDIA_TYPE,
        "manifests": [entry(&amd64, "amd64"), entry(&arm64, "arm64")],
    });
    let index_bytes = serde_json::to_vec(&image_index)?;
    let index_digest = write_blob(&dir.join("blobs").join("sha256"), &index_bytes)?;
    let layout_index = json!({
        "schemaVersion": 2,
        "mediaType": INDEX_MEDIA_TYPE,
        "manifests": [{
            "mediaType": INDEX_MEDIA_TYPE,
            "digest": index_digest,
            "size": index_bytes.len(),
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }],
    });
    fs::write(dir.join("index.json"), serde_json::to_vec(&layout_index)?)
        .with_context(|| format!("writing {}/index.json", dir.display()))?;
    Ok((index_digest, index_bytes, vec![amd64, arm64]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read as _;

    #[test]
    fn generated_layout_is_consistent() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let sizes = [0usize, 1000, CHUNK + 17];
        let image = generate_oci_layout(tmp.path(), "v1", &sizes, 42).expect("generate");

        // Every blob's name is its sha256.
        let blobs = tmp.path().join("blobs/sha256");
        let mut count = 0;
        for entry in fs::read_dir(&blobs).expect("read_dir") {
            let entry = entry.expect("entry");
            let name = entry.file_name().into_string().expect("utf-8 name");
            let bytes = fs::read(entry.path()).expect("read blob");
            assert_eq!(hex::encode(Sha256::digest(&bytes)), name);
            count += 1;
        }
        assert_eq!(count, sizes.len() + 2, "layers + config + manifest");

        // Manifest, index and config agree.
        assert_eq!(image.manifest, format!("sha256:{}", hex::encode(Sha256::digest(&image.manifest_bytes))));
        let index: serde_json::Value =
            serde_json::from_slice(&fs::read(tmp.path().join("index.json")).expect("index")).expect("json");
        assert_eq!(index["manifests"][0]["digest"], image.manifest.as_str());
        assert_eq!(index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"], "v1");
        let config_path = blobs.join(image.config.trim_start_matches("sha256:"));
        let config: serde_json::Value =
            serde_json::from_slice(&fs::read(config_path).expect("config")).expect("json");
        assert_eq!(config["architecture"], "amd64");
        assert_eq!(config["os"], "linux");
        assert_eq!(config["config"]["Cmd"][0], "/bin/true");
        let diff_ids: Vec<&str> = config["rootfs"]["diff_ids"]
            .as_array()
            .expect("array")
            .iter()
            .map(|v| v.as_str().expect("str"))
            .collect();
        let layer_digests: Vec<&str> = image.layers.iter().map(|(d, _)| d.as_str()).collect();
        assert_eq!(diff_ids, layer_digests);

        // Each layer is a valid tar with the expected file.
        for (i, ((digest, size), want)) in image.layers.iter().zip(sizes).enumerate() {
            let path = blobs.join(digest.trim_start_matches("sha256:"));
            assert_eq!(fs::metadata(&path).expect("meta").len(), *size);
            assert_eq!(size % 512, 0);
            let mut archive = tar::Archive::new(File::open(&path).expect("open"));
            let mut files = Vec::new();
            for entry in archive.entries().expect("entries") {
                let mut entry = entry.expect("entry");
                let name = entry.path().expect("path").to_string_lossy().into_owned();
                let mut data = Vec::new();
                entry.read_to_end(&mut data).expect("read");
                files.push((name, data.len()));
            }
            assert_eq!(files, vec![("data/".to_owned(), 0), (format!("data/layer-{i}.bin"), want)]);
        }

        // Deterministic for a given seed; different for another.
        let again = tempfile::tempdir().expect("tempdir");
        let same = generate_oci_layout(again.path(), "v1", &sizes, 42).expect("generate");
        assert_eq!(same, image);
        let other = tempfile::tempdir().expect("tempdir");
        let different = generate_oci_layout(other.path(), "v1", &sizes, 43).expect("generate");
        assert_ne!(different.layers[1], image.layers[1]);
    }
}

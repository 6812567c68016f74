//! Unit tests of push sources: spec parsing, OCI layouts (with and without a ref, partial
//! indexes, Docker media types, malformed input) and `docker save` archives of both kinds.

use std::fs::File;
use std::path::Path;

use serde_json::json;
use shoal_shared::oci::{
    DOCKER_MANIFEST, OCI_CONFIG, OCI_INDEX, OCI_LAYER_TAR, OCI_LAYER_TAR_GZIP, OCI_MANIFEST,
};

use super::*;

/// Writes a blob into an OCI layout and returns its descriptor JSON.
fn put_blob(dir: &Path, media_type: &str, bytes: &[u8]) -> serde_json::Value {
    let digest = Digest::of(bytes);
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).expect("mkdir");
    std::fs::write(blobs.join(digest.hex()), bytes).expect("write blob");
    json!({"mediaType": media_type, "digest": digest.to_string(), "size": bytes.len()})
}

fn put_manifest(dir: &Path, layers: &[&[u8]]) -> (serde_json::Value, Vec<u8>) {
    let config = put_blob(dir, OCI_CONFIG, br#"{"architecture":"amd64","os":"linux"}"#);
    let layers: Vec<_> = layers.iter().map(|l| put_blob(dir, OCI_LAYER_TAR, l)).collect();
    let manifest = json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config, "layers": layers,
    });
    let bytes = serde_json::to_vec(&manifest).expect("json");
    (put_blob(dir, OCI_MANIFEST, &bytes), bytes)
}

fn write_index(dir: &Path, manifests: Vec<serde_json::Value>) {
    let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).expect("json")).expect("write index");
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).expect("write oci-layout");
}

fn tagged(mut desc: serde_json::Value, tag: &str) -> serde_json::Value {
    desc["annotations"] = json!({ REF_NAME_ANNOTATION: tag });
    desc
}

#[test]
fn parses_source_specs() {
    assert_eq!(
        "oci:/tmp/x".parse::<Source>().expect("parse"),
        Source::Oci { dir: "/tmp/x".into(), reference: None }
    );
    assert_eq!(
        "oci:/tmp/x:v1".parse::<Source>().expect("parse"),
        Source::Oci { dir: "/tmp/x".into(), reference: Some("v1".into()) }
    );
    assert_eq!(
        "docker-archive:/tmp/a.tar".parse::<Source>().expect("parse"),
        Source::DockerArchive("/tmp/a.tar".into())
    );
    for bad in ["", "oci:", "oci::v1", "oci:/x:", "docker-archive:", "docker://x", "/tmp/x"] {
        assert!(bad.parse::<Source>().is_err(), "{bad:?} should be rejected");
    }
}

#[test]
fn oci_layout_with_and_without_ref() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let (m1, m1_bytes) = put_manifest(dir, &[b"layer-a", b"layer-b"]);
    write_index(dir, vec![tagged(m1.clone(), "v1")]);

    let src = Source::Oci { dir: dir.to_owned(), reference: None };
    let image = load(&src).expect("load without ref");
    assert_eq!(image.root.bytes, m1_bytes);
    assert_eq!(image.root.media_type, OCI_MANIFEST);
    assert_eq!(image.manifests.len(), 1);
    assert_eq!(image.blobs.len(), 3);
    assert!(image.blobs.iter().any(|b| b.digest == Digest::of(b"layer-a") && b.size == 7));
    assert!(
        matches!(&image.blobs[1].location, BlobLocation::File(p) if p.ends_with(Digest::of(b"layer-a").hex()))
    );

    let (m2, m2_bytes) = put_manifest(dir, &[b"layer-c"]);
    write_index(dir, vec![tagged(m1, "v1"), tagged(m2, "v2")]);
    let image = load(&Source::Oci { dir: dir.to_owned(), reference: Some("v2".into()) }).expect("load v2");
    assert_eq!(image.root.bytes, m2_bytes);
    assert_eq!(image.blobs.len(), 2);

    assert!(matches!(load(&src), Err(SourceError::AmbiguousRef { .. })));
    let unknown = load(&Source::Oci { dir: dir.to_owned(), reference: Some("nope".into()) });
    assert!(matches!(unknown, Err(SourceError::RefNotFound { .. })));
}

#[test]
fn index_with_missing_child_is_pushed_partially() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let (mut amd64, amd64_bytes) = put_manifest(dir, &[b"amd64-layer"]);
    amd64["platform"] = json!({"architecture": "amd64", "os": "linux"});
    let missing = json!({
        "mediaType": OCI_MANIFEST,
        "digest": Digest::of(b"not there").to_string(),
        "size": 9,
        "platform": {"architecture": "arm64", "os": "linux"},
    });
    let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [amd64, missing]});
    let index_bytes = serde_json::to_vec(&index).expect("json");
    let index_desc = put_blob(dir, OCI_INDEX, &index_bytes);
    write_index(dir, vec![tagged(index_desc, "multi")]);

    let image = load(&Source::Oci { dir: dir.to_owned(), reference: Some("multi".into()) }).expect("load");
    assert_eq!(image.root.bytes, index_bytes);
    assert_eq!(image.root.media_type, OCI_INDEX);
    assert_eq!(image.manifests.len(), 1);
    assert_eq!(image.manifests[0].bytes, amd64_bytes);
    assert_eq!(image.blobs.len(), 2);
}

#[test]
fn docker_media_types_are_accepted() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let config = put_blob(dir, "application/vnd.docker.container.image.v1+json", b"{}");
    let layer = put_blob(dir, "application/vnd.docker.image.rootfs.diff.tar.gzip", b"\x1f\x8bxx");
    let manifest = json!({
        "schemaVersion": 2, "mediaType": DOCKER_MANIFEST, "config": config, "layers": [layer],
    });
    let bytes = serde_json::to_vec(&manifest).expect("json");
    let desc = put_blob(dir, DOCKER_MANIFEST, &bytes);
    write_index(dir, vec![desc]);
    let image = load(&Source::Oci { dir: dir.to_owned(), reference: None }).expect("load");
    assert_eq!(image.root.media_type, DOCKER_MANIFEST);
    assert_eq!(image.blobs.len(), 2);
}

#[test]
fn bad_layouts_give_errors() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let src = Source::Oci { dir: dir.to_owned(), reference: None };
    assert!(matches!(load(&src), Err(SourceError::NotFound { .. })));

    std::fs::write(dir.join("index.json"), b"{not json").expect("write");
    assert!(matches!(load(&src), Err(SourceError::Json { .. })));

    std::fs::write(dir.join("index.json"), b"[1,2,3]").expect("write");
    assert!(matches!(load(&src), Err(SourceError::Json { .. })));

    // Descriptor whose blob is missing.
    write_index(
        dir,
        vec![json!({"mediaType": OCI_MANIFEST, "digest": Digest::of(b"x").to_string(), "size": 1})],
    );
    assert!(matches!(load(&src), Err(SourceError::NotFound { .. })));

    // Non-sha256 digest.
    write_index(dir, vec![json!({"mediaType": OCI_MANIFEST, "digest": "sha512:abcd", "size": 1})]);
    assert!(load(&src).is_err());

    // Manifest whose layer is missing.
    let (m, _) = put_manifest(dir, &[b"present"]);
    std::fs::remove_file(dir.join("blobs/sha256").join(Digest::of(b"present").hex())).expect("rm");
    write_index(dir, vec![m]);
    assert!(matches!(load(&src), Err(SourceError::NotFound { .. })));

    // Manifest blob whose content does not match its digest.
    let (m, _) = put_manifest(dir, &[b"other"]);
    let digest: Digest = m["digest"].as_str().expect("str").parse().expect("digest");
    std::fs::write(dir.join("blobs/sha256").join(digest.hex()), b"{\"layers\":[]}  ").expect("corrupt");
    write_index(dir, vec![m]);
    assert!(load(&src).is_err());

    // Oversized index.json.
    let big = vec![b' '; (MAX_JSON_BYTES + 1) as usize];
    std::fs::write(dir.join("index.json"), big).expect("write");
    assert!(matches!(load(&src), Err(SourceError::TooLarge { .. })));

    assert!(load(&Source::DockerArchive(dir.join("missing.tar"))).is_err());
    std::fs::write(dir.join("garbage.tar"), b"this is not a tar file").expect("write");
    assert!(load(&Source::DockerArchive(dir.join("garbage.tar"))).is_err());
}

fn append(builder: &mut tar::Builder<File>, path: &str, bytes: &[u8]) {
    let mut header = tar::Header::new_gnu();
    header.set_size(bytes.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    builder.append_data(&mut header, path, bytes).expect("append");
}

#[test]
fn docker_archive_classic() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("image.tar");
    let config = br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers"}}"#;
    let layer1 = vec![7u8; 5000];
    let layer2 = b"\x1f\x8b\x08 pretend gzip".to_vec();
    {
        let mut builder = tar::Builder::new(File::create(&path).expect("create"));
        append(&mut builder, "abc.json", config);
        append(&mut builder, "l1/layer.tar", &layer1);
        append(&mut builder, "l2/layer.tar", &layer2);
        let mut link = tar::Header::new_gnu();
        link.set_entry_type(tar::EntryType::Symlink);
        link.set_size(0);
        builder.append_link(&mut link, "l3/layer.tar", "../l1/layer.tar").expect("link");
        let manifest = json!([{
            "Config": "abc.json",
            "RepoTags": ["example:latest"],
            "Layers": ["l1/layer.tar", "l2/layer.tar", "l3/layer.tar"],
        }]);
        append(&mut builder, "manifest.json", &serde_json::to_vec(&manifest).expect("json"));
        builder.finish().expect("finish");
    }
    let image = load(&Source::DockerArchive(path.clone())).expect("load");
    assert_eq!(image.blobs.len(), 3, "config + two distinct layers");
    assert_eq!(image.manifests, vec![image.root.clone()]);
    let manifest: serde_json::Value = serde_json::from_slice(&image.root.bytes).expect("json");
    assert_eq!(manifest["schemaVersion"], 2);
    assert_eq!(manifest["config"]["digest"], Digest::of(config).to_string());
    assert_eq!(manifest["layers"][0]["digest"], Digest::of(&layer1).to_string());
    assert_eq!(manifest["layers"][0]["mediaType"], OCI_LAYER_TAR);
    assert_eq!(manifest["layers"][1]["mediaType"], OCI_LAYER_TAR_GZIP);
    assert_eq!(manifest["layers"][2]["digest"], Digest::of(&layer1).to_string());
    assert_eq!(image.root.digest, Digest::of(&image.root.bytes));

    // The recorded offsets point at the exact entry bytes.
    let all = std::fs::read(&path).expect("read");
    for blob in &image.blobs {
        let BlobLocation::TarEntry { offset, .. } = blob.location else {
            panic!("expected tar entry");
        };
        let start = offset as usize;
        let end = start + blob.size as usize;
        assert_eq!(Digest::of(&all[start..end]), blob.digest);
    }
}

#[test]
fn docker_archive_with_oci_layout_inside() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let layout = tmp.path().join("layout");
    let (m, m_bytes) = put_manifest(&layout, &[b"tar-layer"]);
    write_index(&layout, vec![tagged(m, "latest")]);
    let path = tmp.path().join("image.tar");
    {
        let mut builder = tar::Builder::new(File::create(&path).expect("create"));
        builder.append_dir_all(".", &layout).expect("append dir");
        append(&mut builder, "manifest.json", b"[]");
        builder.finish().expect("finish");
    }
    let image = load(&Source::DockerArchive(path)).expect("load");
    assert_eq!(image.root.bytes, m_bytes);
    assert_eq!(image.blobs.len(), 2);
    assert!(image.blobs.iter().all(|b| matches!(b.location, BlobLocation::TarEntry { .. })));
}

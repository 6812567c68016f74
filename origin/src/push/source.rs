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

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;

use oci_spec::image::{Descriptor, ImageIndex, ImageManifest, MediaType};
use serde::Deserialize;
use shoal_shared::digest::{Digest, DigestHasher};

/// Largest JSON document (index, manifest, config, `manifest.json`) we read into memory.
pub const MAX_JSON_BYTES: u64 = 4 * 1024 * 1024;

/// How deep nested indexes may go before we give up.
const MAX_INDEX_DEPTH: usize = 4;

/// Annotation holding the tag of a descriptor in an OCI layout's `index.json`.
const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";
/// Annotation containerd/docker put next to `ref.name` with the full image name.
const CONTAINERD_NAME_ANNOTATION: &str = "io.containerd.image.name";

use shoal_shared::oci::{
    DOCKER_LIST, DOCKER_MANIFEST, OCI_CONFIG, OCI_INDEX, OCI_LAYER_TAR, OCI_LAYER_TAR_GZIP, OCI_MANIFEST,
};

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

// ---------------------------------------------------------------------------------------------
// Storage: a directory or a tar archive.

#[derive(Debug, Clone)]
enum TarKind {
    Regular,
    Symlink(String),
    Hardlink(String),
    Other,
}

#[derive(Debug, Clone)]
struct TarItem {
    offset: u64,
    size: u64,
    kind: TarKind,
}

#[derive(Debug)]
enum Store {
    Dir(PathBuf),
    Tar { archive: PathBuf, entries: HashMap<String, TarItem> },
}

/// Normalizes an archive path: drops `.` components and leading `/`, rejects `..`.
fn normalize(path: &Path) -> Option<String> {
    let mut parts: Vec<String> = Vec::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => parts.push(part.to_str()?.to_owned()),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir => {
                parts.pop()?;
            }
            Component::Prefix(_) => return None,
        }
    }
    if parts.is_empty() {
        None
    } else {
        Some(parts.join("/"))
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SourceError + '_ {
    move |source| SourceError::Io { path: path.to_owned(), source }
}

impl Store {
    fn open_tar(path: &Path) -> Result<Self, SourceError> {
        let file = File::open(path).map_err(io_err(path))?;
        let mut archive = tar::Archive::new(BufReader::new(file));
        let mut entries = HashMap::new();
        for entry in archive.entries_with_seek().map_err(io_err(path))? {
            let entry = entry.map_err(io_err(path))?;
            let Some(name) = entry.path().ok().and_then(|p| normalize(&p)) else {
                continue;
            };
            let header = entry.header();
            let entry_type = header.entry_type();
            let link = || -> Option<String> {
                let target = entry.link_name().ok()??;
                Some(target.to_string_lossy().into_owned())
            };
            let kind = if entry_type.is_file() {
                TarKind::Regular
            } else if entry_type.is_symlink() {
                link().map_or(TarKind::Other, TarKind::Symlink)
            } else if entry_type.is_hard_link() {
                link().map_or(TarKind::Other, TarKind::Hardlink)
            } else {
                TarKind::Other
            };
            let item = TarItem { offset: entry.raw_file_position(), size: entry.size(), kind };
            entries.insert(name, item);
        }
        Ok(Self::Tar { archive: path.to_owned(), entries })
    }

    /// Follows symlinks/hardlinks inside a tar archive to the regular file entry.
    fn resolve_tar<'a>(
        entries: &'a HashMap<String, TarItem>,
        name: &str,
    ) -> Result<Option<&'a TarItem>, SourceError> {
        let mut current = name.to_owned();
        for _ in 0..8 {
            let Some(item) = entries.get(&current) else {
                return Ok(None);
            };
            match &item.kind {
                TarKind::Regular => return Ok(Some(item)),
                TarKind::Other => {
                    return Err(SourceError::Invalid(format!(
                        "archive entry {current:?} is not a regular file"
                    )))
                }
                TarKind::Hardlink(target) => {
                    current = normalize(Path::new(target)).ok_or_else(|| {
                        SourceError::Invalid(format!("bad hard link target in {current:?}"))
                    })?;
                }
                TarKind::Symlink(target) => {
                    let base = Path::new(&current).parent().unwrap_or(Path::new(""));
                    let joined =
                        if target.starts_with('/') { PathBuf::from(target) } else { base.join(target) };
                    current = normalize(&joined)
                        .ok_or_else(|| SourceError::Invalid(format!("bad symlink target in {current:?}")))?;
                }
            }
        }
        Err(SourceError::Invalid(format!("too many links resolving archive entry {name:?}")))
    }

    fn exists(&self, rel: &str) -> bool {
        matches!(self.locate(rel), Ok(Some(_)))
    }

    /// Where `rel` is stored and how large it is, or `None` if absent.
    fn locate(&self, rel: &str) -> Result<Option<(BlobLocation, u64)>, SourceError> {
        match self {
            Self::Dir(dir) => {
                let path = dir.join(rel);
                match std::fs::metadata(&path) {
                    Ok(meta) if meta.is_file() => Ok(Some((BlobLocation::File(path), meta.len()))),
                    Ok(_) => Err(SourceError::Invalid(format!("{} is not a regular file", path.display()))),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(io_err(&path)(e)),
                }
            }
            Self::Tar { archive, entries } => Ok(Self::resolve_tar(entries, rel)?.map(|item| {
                (BlobLocation::TarEntry { archive: archive.clone(), offset: item.offset }, item.size)
            })),
        }
    }

    /// Reads a small document (at most [`MAX_JSON_BYTES`]).
    fn read_doc(&self, rel: &str) -> Result<Vec<u8>, SourceError> {
        let (location, size) =
            self.locate(rel)?.ok_or_else(|| SourceError::NotFound { what: rel.to_owned() })?;
        if size > MAX_JSON_BYTES {
            return Err(SourceError::TooLarge { what: rel.to_owned(), size, max: MAX_JSON_BYTES });
        }
        let (path, offset) = match &location {
            BlobLocation::File(path) => (path.as_path(), 0),
            BlobLocation::TarEntry { archive, offset } => (archive.as_path(), *offset),
        };
        let mut reader = open_range(path, offset, size)?;
        let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        reader.read_to_end(&mut bytes).map_err(io_err(path))?;
        if bytes.len() as u64 != size {
            return Err(SourceError::Invalid(format!("{rel}: truncated ({} of {size} bytes)", bytes.len())));
        }
        Ok(bytes)
    }
}

/// Opens `path` positioned at `offset`, limited to `size` bytes.
fn open_range(path: &Path, offset: u64, size: u64) -> Result<io::Take<File>, SourceError> {
    let mut file = File::open(path).map_err(io_err(path))?;
    file.seek(SeekFrom::Start(offset)).map_err(io_err(path))?;
    Ok(file.take(size))
}

fn blob_rel(digest: &Digest) -> String {
    format!("blobs/sha256/{}", digest.hex())
}

fn parse_json<'a, T: Deserialize<'a>>(what: &str, bytes: &'a [u8]) -> Result<T, SourceError> {
    serde_json::from_slice(bytes).map_err(|source| SourceError::Json { what: what.to_owned(), source })
}

/// Converts an OCI descriptor digest into Shoal's (sha256 only).
fn descriptor_digest(desc: &Descriptor) -> Result<Digest, SourceError> {
    let raw = desc.digest().to_string();
    raw.parse().map_err(|e| {
        let shown: String = raw.chars().take(100).collect();
        SourceError::Invalid(format!("unsupported descriptor digest {shown:?}: {e}"))
    })
}

// ---------------------------------------------------------------------------------------------
// OCI image layout (a directory, or inside a docker save tar).

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

fn load_layout(store: &Store, reference: Option<&str>) -> Result<Image, SourceError> {
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

// ---------------------------------------------------------------------------------------------
// Classic `docker save` archives (manifest.json + config + layer tars).

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

fn load_classic(store: &Store) -> Result<Image, SourceError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
        std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).expect("json"))
            .expect("write index");
        std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)
            .expect("write oci-layout");
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
        let image =
            load(&Source::Oci { dir: dir.to_owned(), reference: Some("v2".into()) }).expect("load v2");
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

        let image =
            load(&Source::Oci { dir: dir.to_owned(), reference: Some("multi".into()) }).expect("load");
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
}

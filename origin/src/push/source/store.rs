//! Where a push source's files live: a directory, or a tar archive indexed once (entries by
//! normalized path, symlinks and hardlinks resolved, `..` rejected) so a blob is read in
//! place as a byte range of the archive. Also the small helpers every reader shares: bounded
//! JSON parsing and descriptor digests.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::{Component, Path, PathBuf};

use oci_spec::image::Descriptor;
use serde::Deserialize;
use shoal_shared::digest::Digest;

use super::{BlobLocation, SourceError, MAX_JSON_BYTES};

#[derive(Debug, Clone)]
enum TarKind {
    Regular,
    Symlink(String),
    Hardlink(String),
    Other,
}

#[derive(Debug, Clone)]
pub(super) struct TarItem {
    offset: u64,
    size: u64,
    kind: TarKind,
}

#[derive(Debug)]
pub(super) enum Store {
    Dir(PathBuf),
    Tar { archive: PathBuf, entries: HashMap<String, TarItem> },
}

/// Normalizes an archive path: drops `.` components and leading `/`, rejects `..`.
pub(super) fn normalize(path: &Path) -> Option<String> {
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

pub(super) fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SourceError + '_ {
    move |source| SourceError::Io { path: path.to_owned(), source }
}

impl Store {
    pub(super) fn open_tar(path: &Path) -> Result<Self, SourceError> {
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

    pub(super) fn exists(&self, rel: &str) -> bool {
        matches!(self.locate(rel), Ok(Some(_)))
    }

    /// Where `rel` is stored and how large it is, or `None` if absent.
    pub(super) fn locate(&self, rel: &str) -> Result<Option<(BlobLocation, u64)>, SourceError> {
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
    pub(super) fn read_doc(&self, rel: &str) -> Result<Vec<u8>, SourceError> {
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
pub(super) fn open_range(path: &Path, offset: u64, size: u64) -> Result<io::Take<File>, SourceError> {
    let mut file = File::open(path).map_err(io_err(path))?;
    file.seek(SeekFrom::Start(offset)).map_err(io_err(path))?;
    Ok(file.take(size))
}

pub(super) fn blob_rel(digest: &Digest) -> String {
    format!("blobs/sha256/{}", digest.hex())
}

pub(super) fn parse_json<'a, T: Deserialize<'a>>(what: &str, bytes: &'a [u8]) -> Result<T, SourceError> {
    serde_json::from_slice(bytes).map_err(|source| SourceError::Json { what: what.to_owned(), source })
}

/// Converts an OCI descriptor digest into Shoal's (sha256 only).
pub(super) fn descriptor_digest(desc: &Descriptor) -> Result<Digest, SourceError> {
    let raw = desc.digest().to_string();
    raw.parse().map_err(|e| {
        let shown: String = raw.chars().take(100).collect();
        SourceError::Invalid(format!("unsupported descriptor digest {shown:?}: {e}"))
    })
}

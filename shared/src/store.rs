//! The content-addressed blob store on disk.
//!
//! Layout under the data directory:
//! - `blobs/<hex>`: whole blobs, each verified against its sha256 before it appears here;
//! - `meta/<hex>`: the blob's metainfo (JSON);
//! - `partial/<hex>`: downloads in progress, kept across restarts so a download resumes;
//! - `tmp/`: uploads in progress, emptied when the store opens.
//!
//! A blob becomes visible only through [`Staged::commit`]: bytes are written to a temp file,
//! the digest is checked, the file is fsynced, its metainfo saved, and it is atomically
//! renamed into `blobs/`. File names
//! come from [`Digest::hex`], so no input can name a path outside the store.
//!
//! A store may have a durable [`Backing`] (the origin's `--store`): commits are written
//! through to it before they are acknowledged, and blobs missing on disk are filled from it
//! (see [`backing`]).

pub mod backing;

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};

use crate::bitfield::Bitfield;
use crate::digest::{Digest, DigestHasher};
use crate::metainfo::{Metainfo, MetainfoBuilder, MetainfoError, VerifiedPiece, DEFAULT_PIECE_LENGTH};

pub use backing::{Backing, BackingError};

/// Read size used when streaming blobs from disk.
pub const READ_CHUNK: usize = 1 << 20;

/// Store failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("I/O error on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("content has digest {actual}, expected {expected}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("content has {actual} bytes, expected {expected}")]
    SizeMismatch { expected: u64, actual: u64 },
    #[error(transparent)]
    Metainfo(#[from] MetainfoError),
    #[error("stored metainfo for {0} is unreadable")]
    BadMetainfo(Digest),
    /// The durable store failed (clients see 503; nothing of the write is visible).
    #[error(transparent)]
    Backing(#[from] BackingError),
}

impl StoreError {
    /// True when the filesystem is full (or over quota).
    pub fn is_out_of_space(&self) -> bool {
        matches!(self, Self::Io { source, .. }
            if matches!(source.kind(), io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded))
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.to_path_buf(), source }
}

/// Runs blocking file work off the async executor.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|join| Err(StoreError::Io { path: PathBuf::new(), source: io::Error::other(join) }))
}

/// The content-addressed store. Cheap to clone.
#[derive(Debug, Clone)]
pub struct BlobStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    root: PathBuf,
    next_tmp: AtomicU64,
    backing: Option<Arc<dyn Backing>>,
    /// One fill from the backing per digest at a time.
    fills: std::sync::Mutex<std::collections::HashMap<Digest, Arc<tokio::sync::Mutex<()>>>>,
}

impl BlobStore {
    /// Opens (creating if needed) a store under `root`, discarding unfinished uploads.
    /// Partial downloads are kept; they are checked when next opened.
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        Self::open_with(root, None)
    }

    /// Opens the store under `root` with a durable copy in `backing`: commits are written
    /// through to it and blobs missing on disk are filled from it.
    pub fn open_backed(root: &Path, backing: Arc<dyn Backing>) -> Result<Self, StoreError> {
        Self::open_with(root, Some(backing))
    }

    fn open_with(root: &Path, backing: Option<Arc<dyn Backing>>) -> Result<Self, StoreError> {
        for sub in ["blobs", "meta", "partial"] {
            let p = root.join(sub);
            std::fs::create_dir_all(&p).map_err(io_err(&p))?;
        }
        let tmp = root.join("tmp");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
        }
        std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
        let inner = Inner {
            root: root.to_path_buf(),
            next_tmp: AtomicU64::new(0),
            backing,
            fills: Default::default(),
        };
        Ok(Self { inner: Arc::new(inner) })
    }

    /// The durable copy, if the store has one.
    pub fn backing(&self) -> Option<&Arc<dyn Backing>> {
        self.inner.backing.as_ref()
    }

    /// Makes sure the blob `digest` is on disk, filling it from the backing if it is not:
    /// true when it is there. Without a backing, whether it is on disk.
    pub async fn ensure_local(&self, digest: &Digest) -> Result<bool, StoreError> {
        let path = self.blob_path(digest);
        if tokio::fs::try_exists(&path).await.unwrap_or(false) {
            return Ok(true);
        }
        let Some(backing) = self.inner.backing.clone() else { return Ok(false) };
        let turn = {
            let mut fills = self.inner.fills.lock().unwrap_or_else(|p| p.into_inner());
            fills.entry(*digest).or_default().clone()
        };
        let (store, digest) = (self.clone(), *digest);
        // Spawned: a request that goes away does not cancel the fill others wait for.
        let fill = tokio::spawn(async move {
            let result = {
                let _turn = turn.lock().await;
                if tokio::fs::try_exists(&path).await.unwrap_or(false) {
                    Ok(true)
                } else {
                    store.fill(&*backing, &digest).await
                }
            };
            let mut fills = store.inner.fills.lock().unwrap_or_else(|p| p.into_inner());
            if fills.get(&digest).is_some_and(|t| Arc::ptr_eq(t, &turn)) {
                fills.remove(&digest);
            }
            result
        });
        fill.await.unwrap_or_else(|join| Err(StoreError::Backing(BackingError(join.to_string()))))
    }

    /// Fetches blob `digest` from the backing: streamed into a temp file with its sha256
    /// and metainfo computed on the way (at the piece length of the metainfo stored with it),
    /// checked, then published locally only (it is in the backing already).
    async fn fill(&self, backing: &dyn Backing, digest: &Digest) -> Result<bool, StoreError> {
        use futures_util::StreamExt as _;
        let Some(mut blob) = backing.get(&backing::blob_key(digest)).await? else { return Ok(false) };
        let piece_length = match backing.get(&backing::meta_key(digest)).await? {
            Some(meta) => backing::read_small(meta, backing::MAX_META)
                .await
                .ok()
                .and_then(|json| serde_json::from_slice::<Metainfo>(&json).ok())
                .filter(|m| m.digest() == *digest)
                .map_or(DEFAULT_PIECE_LENGTH, |m| m.piece_length()),
            None => DEFAULT_PIECE_LENGTH,
        };
        let mut staged = self.stage(piece_length).await?;
        while let Some(chunk) = blob.body.next().await {
            staged.write(&chunk?).await?;
        }
        let m = staged.publish(digest, false).await?;
        tracing::info!(%digest, bytes = m.length(), "blob filled from the durable store");
        Ok(true)
    }

    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// The size of the filesystem the store is on, in bytes.
    pub fn filesystem_bytes(&self) -> Result<u64, StoreError> {
        let root = &self.inner.root;
        let st = rustix::fs::statvfs(root).map_err(|e| io_err(root)(e.into()))?;
        Ok(st.f_blocks.saturating_mul(st.f_frsize))
    }

    /// Where the whole blob `digest` lives once committed.
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.inner.root.join("blobs").join(digest.hex())
    }

    /// Where the download of `digest` keeps its pieces until it is whole.
    fn partial_path(&self, digest: &Digest) -> PathBuf {
        self.inner.root.join("partial").join(digest.hex())
    }

    /// Deletes partial downloads not written to for `max_age`: nobody asked for them since,
    /// so their bytes are unlikely to be worth the disk. Returns how many were removed.
    /// Blocking (one directory listing); call it before downloads start.
    pub fn remove_stale_partials(&self, max_age: Duration) -> Result<usize, StoreError> {
        let dir = self.inner.root.join("partial");
        let now = SystemTime::now();
        let mut removed = 0;
        for entry in std::fs::read_dir(&dir).map_err(io_err(&dir))? {
            let entry = entry.map_err(io_err(&dir))?;
            let Ok(meta) = entry.metadata() else { continue };
            let age = meta.modified().ok().and_then(|m| now.duration_since(m).ok()).unwrap_or_default();
            if age >= max_age && std::fs::remove_file(entry.path()).is_ok() {
                removed += 1;
            }
        }
        Ok(removed)
    }

    fn meta_path(&self, digest: &Digest) -> PathBuf {
        self.inner.root.join("meta").join(digest.hex())
    }

    /// The metainfo saved with a committed blob, whatever its piece length (the blob is
    /// filled from the backing first when it is not on disk).
    pub async fn stored_metainfo(&self, digest: &Digest) -> Option<Metainfo> {
        let path = self.meta_path(digest);
        if self.inner.backing.is_some() && !tokio::fs::try_exists(&path).await.unwrap_or(false) {
            self.filled(digest).await;
        }
        let bytes = tokio::fs::read(path).await.ok()?;
        let m = serde_json::from_slice::<Metainfo>(&bytes).ok()?;
        (m.digest() == *digest).then_some(m)
    }

    /// A fresh temp path inside the store (same filesystem, so rename is atomic).
    pub fn temp_path(&self, label: &str) -> PathBuf {
        let n = self.inner.next_tmp.fetch_add(1, Ordering::Relaxed);
        self.inner.root.join("tmp").join(format!("{label}-{}-{n}", std::process::id()))
    }

    /// Whether the blob is on disk after a fill from the backing (if any); a failing
    /// backing counts as "absent", logged.
    async fn filled(&self, digest: &Digest) -> bool {
        match self.ensure_local(digest).await {
            Ok(held) => held,
            Err(e) => {
                tracing::error!(%digest, cause = %e, "cannot fill blob from the durable store");
                false
            }
        }
    }

    /// Size of the committed blob, or `None` if absent (filled from the backing first).
    pub async fn size(&self, digest: &Digest) -> Option<u64> {
        if let Ok(m) = tokio::fs::metadata(self.blob_path(digest)).await {
            return Some(m.len());
        }
        if self.inner.backing.is_none() || !self.filled(digest).await {
            return None;
        }
        tokio::fs::metadata(self.blob_path(digest)).await.ok().map(|m| m.len())
    }

    /// Opens the committed blob for reading (filled from the backing first).
    pub async fn open_blob(&self, digest: &Digest) -> Option<(File, u64)> {
        if self.inner.backing.is_some() && !self.filled(digest).await {
            return None;
        }
        let path = self.blob_path(digest);
        blocking(move || {
            let f = File::open(&path).map_err(io_err(&path))?;
            let len = f.metadata().map_err(io_err(&path))?.len();
            Ok((f, len))
        })
        .await
        .ok()
    }

    /// Starts writing a new blob.
    pub async fn stage(&self, piece_length: u32) -> Result<Staged, StoreError> {
        let builder = MetainfoBuilder::new(piece_length)?;
        let path = self.temp_path("upload");
        let p = path.clone();
        let file = blocking(move || File::create(&p).map_err(io_err(&p))).await?;
        Ok(Staged {
            store: self.clone(),
            guard: TempGuard(Some(path.clone())),
            path,
            state: Some((file, builder)),
            pending: BytesMut::new(),
            written: 0,
        })
    }

    /// The metainfo of a committed blob at `piece_length`: read from `meta/`, or computed by
    /// streaming the blob once and saved.
    pub async fn metainfo(&self, digest: &Digest, piece_length: u32) -> Result<Option<Metainfo>, StoreError> {
        if let Some(m) = self.stored_metainfo(digest).await {
            if m.piece_length() == piece_length {
                return Ok(Some(m));
            }
        }
        let Some((file, _)) = self.open_blob(digest).await else { return Ok(None) };
        let path = self.blob_path(digest);
        let m = blocking(move || {
            let mut builder = MetainfoBuilder::new(piece_length)?;
            let mut buf = vec![0u8; READ_CHUNK];
            let mut file = file;
            loop {
                let n = file.read(&mut buf).map_err(io_err(&path))?;
                if n == 0 {
                    break;
                }
                builder.update(&buf[..n]);
            }
            Ok(builder.finish()?)
        })
        .await?;
        if m.digest() != *digest {
            return Err(StoreError::DigestMismatch { expected: *digest, actual: m.digest() });
        }
        self.put_metainfo(&m).await?;
        Ok(Some(m))
    }

    /// Saves a metainfo (atomically) next to its blob.
    pub async fn put_metainfo(&self, m: &Metainfo) -> Result<(), StoreError> {
        let json = serde_json::to_vec(m)
            .map_err(|e| StoreError::Io { path: PathBuf::new(), source: io::Error::other(e) })?;
        let tmp = self.temp_path("meta");
        tokio::fs::write(&tmp, json).await.map_err(io_err(&tmp))?;
        let dest = self.meta_path(&m.digest());
        tokio::fs::rename(&tmp, &dest).await.map_err(io_err(&dest))
    }

    /// Reads `len` bytes at `offset` of a committed blob.
    pub async fn read_range(
        &self,
        digest: &Digest,
        offset: u64,
        len: usize,
    ) -> Result<Option<Bytes>, StoreError> {
        let Some((file, size)) = self.open_blob(digest).await else { return Ok(None) };
        if offset.saturating_add(len as u64) > size {
            return Ok(None);
        }
        let path = self.blob_path(digest);
        let bytes = blocking(move || read_at(&file, &path, offset, len)).await?;
        Ok(Some(bytes))
    }

    /// Whether the store's directory takes writes (a probe file in `tmp/`, written and
    /// removed): what readiness checks.
    pub async fn writable(&self) -> bool {
        let probe = self.temp_path("readyz");
        let ok = tokio::fs::write(&probe, b"ok").await.is_ok();
        let _ = tokio::fs::remove_file(&probe).await;
        ok
    }

    /// What the store holds per digest, on disk: whole blobs with their metainfo and partial
    /// downloads, each as the bytes the filesystem allocated for it and when it was last
    /// modified. Only the store's own files count (named by a digest in its own
    /// directories); anything else on the filesystem is not the cache's. Blocking (three
    /// directory listings); call it at startup.
    pub fn usage(&self) -> Result<Vec<Usage>, StoreError> {
        use std::collections::HashMap;
        use std::os::unix::fs::MetadataExt as _;
        let mut by_digest: HashMap<Digest, Usage> = HashMap::new();
        for sub in ["blobs", "meta", "partial"] {
            let dir = self.inner.root.join(sub);
            for entry in std::fs::read_dir(&dir).map_err(io_err(&dir))? {
                let entry = entry.map_err(io_err(&dir))?;
                let Some(digest) =
                    entry.file_name().to_str().and_then(|n| format!("sha256:{n}").parse().ok())
                else {
                    continue;
                };
                let Ok(meta) = entry.metadata() else { continue };
                if !meta.is_file() {
                    continue;
                }
                let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                let u =
                    by_digest.entry(digest).or_insert(Usage { digest, bytes: 0, modified, complete: false });
                u.bytes += meta.blocks() * 512;
                u.modified = u.modified.max(modified);
                u.complete |= sub == "blobs";
            }
        }
        Ok(by_digest.into_values().collect())
    }

    /// Removes everything the store holds of `digest`: the blob, its metainfo and any
    /// partial download (a cache eviction). Blocking: a few unlinks.
    pub fn remove_all(&self, digest: &Digest) {
        self.remove(digest);
        let _ = std::fs::remove_file(self.partial_path(digest));
    }

    /// Removes a committed blob and its metainfo (used when a cached copy turns out to be
    /// damaged). Two unlinks, done at once so that a fresh copy fetched right after cannot
    /// be the one removed.
    pub fn remove(&self, digest: &Digest) {
        let _ = std::fs::remove_file(self.blob_path(digest));
        let _ = std::fs::remove_file(self.meta_path(digest));
    }
}

/// One digest's files in the store (see [`BlobStore::usage`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub digest: Digest,
    /// Bytes allocated on disk for the blob, its metainfo and its partial download.
    pub bytes: u64,
    /// The latest modification of any of them.
    pub modified: SystemTime,
    /// Whether the whole blob is there (else only a partial download or a stray metainfo).
    pub complete: bool,
}

/// Reads exactly `len` bytes at `offset`. Positional (`pread`), so any number of readers
/// can share one open file. Read into the buffer's spare capacity: it is not zeroed first
/// only to be overwritten (that memset was a few percent of a cold pull's CPU).
pub fn read_at(file: &File, path: &Path, offset: u64, len: usize) -> Result<Bytes, StoreError> {
    let mut buf = Vec::with_capacity(len);
    while buf.len() < len {
        let at = offset + buf.len() as u64;
        let spare = rustix::buffer::spare_capacity(&mut buf);
        match rustix::io::pread(file, spare, at) {
            Ok(0) => return Err(io_err(path)(io::ErrorKind::UnexpectedEof.into())),
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(io_err(path)(e.into())),
        }
    }
    buf.truncate(len);
    Ok(Bytes::from(buf))
}

/// Whether piece `index` of `m`, as stored in `file` (a whole blob), still hashes to the
/// metainfo: read in [`CHECK_CHUNK`]s, so checking holds no more than that in memory.
pub fn piece_intact(file: &File, m: &Metainfo, index: u32) -> io::Result<bool> {
    let Ok(size) = m.piece_size(index) else { return Ok(false) };
    let (start, end) = (m.piece_offset(index), m.piece_offset(index) + u64::from(size));
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; CHECK_CHUNK.min(size as usize)];
    let mut offset = start;
    while offset < end {
        let n = (end - offset).min(buf.len() as u64) as usize;
        match file.read_exact_at(&mut buf[..n], offset) {
            Ok(()) => {}
            // The file is shorter than its metainfo says: damaged too.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(false),
            Err(e) => return Err(e),
        }
        hasher.update(&buf[..n]);
        offset += n as u64;
    }
    Ok(m.piece_hash_matches(index, &hasher.finalize()))
}

/// Read size when checking a stored piece against its hash.
const CHECK_CHUNK: usize = 128 << 10;

mod partial;
mod staged;
#[cfg(test)]
mod tests;

#[cfg(test)]
use partial::held_pieces;
pub use partial::{Ahead, PartialBlob, PrefixHasher, KEEP_AHEAD};
pub use staged::Staged;
use staged::TempGuard;

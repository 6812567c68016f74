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
/// can share one open file.
pub fn read_at(file: &File, path: &Path, offset: u64, len: usize) -> Result<Bytes, StoreError> {
    let mut buf = BytesMut::zeroed(len);
    file.read_exact_at(&mut buf, offset).map_err(io_err(path))?;
    Ok(buf.freeze())
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

/// Deletes a temp file when dropped, unless disarmed (the file was published).
#[derive(Debug)]
struct TempGuard(Option<PathBuf>);

impl TempGuard {
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            // A single unlink; a request cancelled mid-upload must not leave its bytes behind.
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Why a poisoned upload refuses every later call.
const POISONED: &str = "an earlier write of this upload failed";

/// How many bytes of an upload are gathered before they are written (one blocking write).
const STAGE_BUFFER: usize = 1 << 20;

/// A blob being written; visible in the store only after [`Staged::commit`]. Dropping it
/// (say, when the client goes away mid-upload) deletes the temp file.
///
/// Bytes are hashed only after the kernel accepted their write, so the hashes describe what
/// is in the file and nothing else; [`commit`](Self::commit) checks the file's length on disk
/// against what was hashed before it checks the digest. A failed write poisons the upload:
/// the bytes on disk are no longer known, so every later call fails and the caller must
/// start over (an upload resumed past a failed write would publish a short blob under the
/// digest its client claimed).
#[derive(Debug)]
pub struct Staged {
    store: BlobStore,
    path: PathBuf,
    /// The file and the hashes of what it holds; out while a blocking write runs, `None`
    /// for good once a write failed.
    state: Option<(File, MetainfoBuilder)>,
    /// Bytes accepted but not yet written.
    pending: BytesMut,
    /// Bytes written and hashed.
    written: u64,
    guard: TempGuard,
}

impl Staged {
    /// Appends bytes. They reach the file in batches; [`flush`](Self::flush) forces them.
    pub async fn write(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        if self.state.is_none() {
            return Err(self.poisoned());
        }
        self.pending.extend_from_slice(bytes);
        if self.pending.len() >= STAGE_BUFFER {
            self.flush().await?;
        }
        Ok(())
    }

    /// Writes every pending byte to the file, then hashes it.
    pub async fn flush(&mut self) -> Result<(), StoreError> {
        let Some((file, builder)) = self.state.take() else { return Err(self.poisoned()) };
        if self.pending.is_empty() {
            self.state = Some((file, builder));
            return Ok(());
        }
        let chunk = self.pending.split().freeze();
        let path = self.path.clone();
        let (file, builder) = blocking(move || {
            let mut file = file;
            let mut builder = builder;
            io::Write::write_all(&mut file, &chunk).map_err(io_err(&path))?;
            builder.update(&chunk);
            Ok((file, builder))
        })
        .await?;
        self.written = builder.length();
        self.state = Some((file, builder));
        Ok(())
    }

    fn poisoned(&self) -> StoreError {
        StoreError::Io { path: self.path.clone(), source: io::Error::other(POISONED) }
    }

    /// Bytes accepted so far (written or about to be).
    pub fn len(&self) -> u64 {
        self.written + self.pending.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Writes what is pending, proves the file holds exactly the hashed bytes, verifies the
    /// content against `expected`, fsyncs, writes it through to the store's backing (if
    /// any) and publishes it. On any failure the temp file is removed and nothing is stored.
    pub async fn commit(self, expected: &Digest) -> Result<Metainfo, StoreError> {
        self.publish(expected, true).await
    }

    /// [`commit`](Self::commit), with the write to the backing only if `write_through`.
    async fn publish(mut self, expected: &Digest, write_through: bool) -> Result<Metainfo, StoreError> {
        self.flush().await?;
        let Staged { store, path, state, mut guard, .. } = self;
        let Some((file, builder)) = state else {
            return Err(StoreError::Io { path, source: io::Error::other(POISONED) });
        };
        let expected = *expected;
        let p = path.clone();
        let m = blocking(move || {
            let on_disk = file.metadata().map_err(io_err(&p))?.len();
            if on_disk != builder.length() {
                return Err(StoreError::SizeMismatch { expected: builder.length(), actual: on_disk });
            }
            let m = builder.finish()?;
            if m.digest() != expected {
                return Err(StoreError::DigestMismatch { expected, actual: m.digest() });
            }
            file.sync_all().map_err(io_err(&p))?;
            Ok(m)
        })
        .await?;
        if let Some(backing) = store.inner.backing.as_ref().filter(|_| write_through) {
            // Durable before it is visible anywhere: the metainfo first, then the blob, whose
            // object appears whole or not at all. A failure drops the temp file (`guard`).
            let json = serde_json::to_vec(&m).map_err(|e| BackingError(e.to_string()))?;
            backing.put_bytes(&backing::meta_key(&expected), json.into()).await?;
            backing.put_file(&backing::blob_key(&expected), &path).await?;
        }
        // The metainfo first: a blob is never visible without it (readers check pieces
        // against it).
        store.put_metainfo(&m).await?;
        let dest = store.blob_path(&expected);
        tokio::fs::rename(&path, &dest).await.map_err(io_err(&dest))?;
        guard.disarm();
        Ok(m)
    }

    /// Drops the upload and its temp file.
    pub async fn abort(self) {
        drop(self);
    }
}

/// A download in progress: a temp file filled piece by piece, in any order.
///
/// Only [`VerifiedPiece`]s can be written, so every byte in it matched the metainfo. The file
/// is never extended ahead of the pieces: it is as long as the furthest piece written, so a
/// download resumed after stalling near its start re-reads only what it wrote, and the file
/// reaches the blob's exact length when its last piece lands.
#[derive(Debug)]
pub struct PartialBlob {
    store: BlobStore,
    path: PathBuf,
    file: Arc<File>,
    metainfo: Metainfo,
}

impl PartialBlob {
    /// Opens the partial download of `metainfo`'s blob left by an earlier run (or creates
    /// it) and returns the pieces it already holds.
    ///
    /// Every piece on disk is checked against its blake3 hash, so no bookkeeping has to
    /// survive a crash: a piece cut short by a crash, or damaged on disk, fails its hash and
    /// is fetched again. Costs one read of what is on disk (up to the furthest piece an
    /// earlier run wrote, holes before it included), once per resumed download.
    pub async fn open_or_create(
        store: &BlobStore,
        metainfo: Metainfo,
    ) -> Result<(Self, Bitfield), StoreError> {
        let path = store.partial_path(&metainfo.digest());
        let (p, m) = (path.clone(), metainfo.clone());
        let (file, held, verified) = blocking(move || {
            let f = File::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&p)
                .map_err(io_err(&p))?;
            let on_disk = f.metadata().map_err(io_err(&p))?.len();
            if on_disk > m.length() {
                // Nothing past the blob's end is ours; the published file must be exact.
                f.set_len(m.length()).map_err(io_err(&p))?;
            }
            // The blob's whole space, reserved before anything is fetched or answered: a full
            // disk is an error now, not a body cut short later (the file's length is kept,
            // so it still says how far pieces were written).
            if let Err(e) = reserve(&f, m.length()) {
                if on_disk == 0 {
                    let _ = std::fs::remove_file(&p);
                }
                return Err(io_err(&p)(e));
            }
            // Marks the file as in use for `remove_stale_partials`.
            let _ = f.set_modified(SystemTime::now());
            let (held, verified) = held_pieces(&f, &p, &m, on_disk.min(m.length()))?;
            Ok((f, held, verified))
        })
        .await?;
        if held.count() > 0 {
            tracing::info!(digest = %metainfo.digest(), held = held.count(), of = metainfo.piece_count(), verified, "resuming download");
        }
        Ok((Self { store: store.clone(), path, file: Arc::new(file), metainfo }, held))
    }

    pub fn metainfo(&self) -> &Metainfo {
        &self.metainfo
    }

    /// Writes a verified piece at its offset.
    pub async fn write_piece(&self, piece: VerifiedPiece) -> Result<(), StoreError> {
        let file = self.file.clone();
        let path = self.path.clone();
        let offset = self.metainfo.piece_offset(piece.index());
        blocking(move || file.write_all_at(piece.data(), offset).map_err(io_err(&path))).await
    }

    /// Reads `len` bytes at `offset`, which the caller knows to be written and verified.
    pub async fn read_at(&self, offset: u64, len: usize) -> Result<Bytes, StoreError> {
        let (file, path) = (self.file.clone(), self.path.clone());
        blocking(move || read_at(&file, &path, offset, len)).await
    }

    /// Whether piece `index` on disk still matches its hash (read back in small chunks,
    /// never held whole): what a reader checks before sending any byte of it.
    pub async fn piece_intact(&self, index: u32) -> Result<bool, StoreError> {
        let (file, path, m) = (self.file.clone(), self.path.clone(), self.metainfo.clone());
        blocking(move || piece_intact(&file, &m, index).map_err(io_err(&path))).await
    }

    /// Reads back a piece previously written (the caller tracks which are).
    pub async fn read_piece(&self, index: u32) -> Result<Bytes, StoreError> {
        let len = self.metainfo.piece_size(index)? as usize;
        let offset = self.metainfo.piece_offset(index);
        let (file, path) = (self.file.clone(), self.path.clone());
        blocking(move || read_at(&file, &path, offset, len)).await
    }

    /// A sha256 hasher over this file's prefix, advanced as the prefix grows.
    pub fn prefix_hasher(&self) -> PrefixHasher {
        PrefixHasher {
            file: self.file.clone(),
            path: self.path.clone(),
            state: Some((DigestHasher::new(), vec![0u8; READ_CHUNK])),
            offset: 0,
        }
    }

    /// Publishes the blob given the sha256 of its whole content (from a [`PrefixHasher`]
    /// that reached the end): checked against the metainfo's digest and the file against its
    /// length, fsynced, renamed into `blobs/`. On mismatch the file is deleted. Readers
    /// holding pieces keep working: the open file is the published one.
    pub async fn commit_hashed(&self, actual: Digest) -> Result<(), StoreError> {
        let expected = self.metainfo.digest();
        if actual != expected {
            self.discard().await;
            return Err(StoreError::DigestMismatch { expected, actual });
        }
        // The file grows with the pieces written: it must now be exactly the blob, no piece
        // missing at its end and nothing past it.
        let (file, p, expected_len) = (self.file.clone(), self.path.clone(), self.metainfo.length());
        let synced = blocking(move || {
            let actual = file.metadata().map_err(io_err(&p))?.len();
            if actual != expected_len {
                return Err(StoreError::SizeMismatch { expected: expected_len, actual });
            }
            file.sync_all().map_err(io_err(&p))
        })
        .await;
        if let Err(e) = synced {
            if matches!(e, StoreError::SizeMismatch { .. }) {
                self.discard().await;
            }
            return Err(e);
        }
        // The metainfo first: a blob is never visible without it.
        self.store.put_metainfo(&self.metainfo).await?;
        let dest = self.store.blob_path(&expected);
        tokio::fs::rename(&self.path, &dest).await.map_err(io_err(&dest))
    }

    /// Hashes the whole file, then [`commit_hashed`](Self::commit_hashed).
    pub async fn commit(&self) -> Result<(), StoreError> {
        let mut hasher = self.prefix_hasher();
        hasher.advance(self.metainfo.length()).await?;
        self.commit_hashed(hasher.finish()).await
    }

    /// Abandons the download and deletes its file.
    pub async fn discard(&self) {
        let _ = tokio::fs::remove_file(&self.path).await;
    }
}

/// Allocates `len` bytes of disk for `file` without changing its length. Filesystems that
/// cannot reserve space (they answer "not supported") are let through.
fn reserve(file: &File, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    match rustix::fs::fallocate(file, rustix::fs::FallocateFlags::KEEP_SIZE, 0, len) {
        Ok(()) => Ok(()),
        Err(e) if e == rustix::io::Errno::OPNOTSUPP || e == rustix::io::Errno::NOSYS => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Which pieces of a partial download's file, whose first `written` bytes are on disk, verify
/// against their blake3 hashes; and how many bytes that read. Pieces reaching past `written`
/// were never written whole (the file grows only as pieces are written) and are not read.
fn held_pieces(f: &File, path: &Path, m: &Metainfo, written: u64) -> Result<(Bitfield, u64), StoreError> {
    let mut held = Bitfield::new(m.piece_count());
    let mut verified = 0;
    for index in 0..m.piece_count() {
        let size = m.piece_size(index)?;
        if m.piece_offset(index) + u64::from(size) > written {
            break;
        }
        verified += u64::from(size);
        // Hashed as it is read: no piece is held whole in memory.
        if piece_intact(f, m, index).map_err(io_err(path))? {
            held.set(index);
        }
    }
    Ok((held, verified))
}

/// Streams sha256 over a growing prefix of a file, so a download's whole-blob digest is
/// ready when its last piece lands instead of costing a second pass over the blob.
#[derive(Debug)]
pub struct PrefixHasher {
    file: Arc<File>,
    path: PathBuf,
    /// The hasher and its read buffer; out only while a blocking read runs.
    state: Option<(DigestHasher, Vec<u8>)>,
    offset: u64,
}

impl PrefixHasher {
    /// Bytes hashed so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Hashes the file up to `to` (bytes before it must be written and final).
    pub async fn advance(&mut self, to: u64) -> Result<(), StoreError> {
        if to <= self.offset {
            return Ok(());
        }
        let Some((mut hasher, mut buf)) = self.state.take() else {
            return Err(StoreError::Io { path: self.path.clone(), source: io::Error::other("hasher lost") });
        };
        let (file, path, mut offset) = (self.file.clone(), self.path.clone(), self.offset);
        let (hasher, buf, offset) = blocking(move || {
            while offset < to {
                let n = (to - offset).min(buf.len() as u64) as usize;
                file.read_exact_at(&mut buf[..n], offset).map_err(io_err(&path))?;
                hasher.update(&buf[..n]);
                offset += n as u64;
            }
            Ok((hasher, buf, offset))
        })
        .await?;
        self.state = Some((hasher, buf));
        self.offset = offset;
        Ok(())
    }

    /// The digest of everything hashed.
    pub fn finish(self) -> Digest {
        self.state.map(|(h, _)| h.finish()).unwrap_or_else(|| DigestHasher::new().finish())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metainfo::MIN_PIECE_LENGTH;

    #[tokio::test]
    async fn stage_commit_and_read() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = BlobStore::open(dir.path()).expect("open");
        let data = vec![42u8; MIN_PIECE_LENGTH as usize + 10];
        let digest = Digest::of(&data);
        let mut staged = store.stage(MIN_PIECE_LENGTH).await.expect("stage");
        staged.write(&data[..100]).await.expect("write");
        staged.write(&data[100..]).await.expect("write");
        let m = staged.commit(&digest).await.expect("commit");
        assert_eq!(m.piece_count(), 2);
        assert_eq!(store.size(&digest).await, Some(data.len() as u64));
        let again = store.metainfo(&digest, MIN_PIECE_LENGTH).await.expect("meta");
        assert_eq!(again, Some(m));
        let piece = store.read_range(&digest, 5, 10).await.expect("read");
        assert_eq!(piece.as_deref(), Some(&data[5..15]));
        assert_eq!(store.read_range(&digest, data.len() as u64, 1).await.expect("read"), None);
    }

    #[tokio::test]
    async fn wrong_digest_stores_nothing() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = BlobStore::open(dir.path()).expect("open");
        let claimed = Digest::of(b"something else");
        let mut staged = store.stage(MIN_PIECE_LENGTH).await.expect("stage");
        staged.write(b"actual bytes").await.expect("write");
        assert!(matches!(staged.commit(&claimed).await, Err(StoreError::DigestMismatch { .. })));
        assert_eq!(store.size(&claimed).await, None);
        assert_eq!(std::fs::read_dir(dir.path().join("tmp")).expect("tmp").count(), 0);
    }

    #[tokio::test]
    async fn a_dropped_upload_leaves_no_temp_file() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = BlobStore::open(dir.path()).expect("open");
        let mut staged = store.stage(MIN_PIECE_LENGTH).await.expect("stage");
        staged.write(b"half an upload").await.expect("write");
        assert_eq!(std::fs::read_dir(dir.path().join("tmp")).expect("tmp").count(), 1);
        drop(staged);
        assert_eq!(std::fs::read_dir(dir.path().join("tmp")).expect("tmp").count(), 0);
    }

    #[tokio::test]
    async fn partial_blob_with_the_wrong_content_is_not_published() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = BlobStore::open(dir.path()).expect("open");
        let mut b = MetainfoBuilder::new(MIN_PIECE_LENGTH).expect("builder");
        b.update(b"some bytes");
        let m = b.finish().expect("meta");
        let (partial, _) = PartialBlob::open_or_create(&store, m.clone()).await.expect("create");
        let piece = m.verify_piece(0, Bytes::from_static(b"some bytes")).expect("verified");
        partial.write_piece(piece).await.expect("write");
        let wrong = Digest::of(b"other bytes");
        assert!(matches!(partial.commit_hashed(wrong).await, Err(StoreError::DigestMismatch { .. })));
        assert_eq!(store.size(&m.digest()).await, None);
        assert_eq!(std::fs::read_dir(dir.path().join("partial")).expect("partial").count(), 0);
    }

    #[tokio::test]
    async fn partial_blob_assembles_verified_pieces() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = BlobStore::open(dir.path()).expect("open");
        let data: Vec<u8> = (0..MIN_PIECE_LENGTH * 2 + 3).map(|i| (i % 251) as u8).collect();
        let mut b = MetainfoBuilder::new(MIN_PIECE_LENGTH).expect("builder");
        b.update(&data);
        let m = b.finish().expect("meta");
        let (partial, _) = PartialBlob::open_or_create(&store, m.clone()).await.expect("create");
        for i in (0..m.piece_count()).rev() {
            let off = m.piece_offset(i) as usize;
            let len = m.piece_size(i).expect("size") as usize;
            let piece = m.verify_piece(i, Bytes::copy_from_slice(&data[off..off + len]));
            partial.write_piece(piece.expect("verified")).await.expect("write");
        }
        assert_eq!(partial.read_piece(2).await.expect("read").len(), 3);
        partial.commit().await.expect("commit");
        let on_disk = std::fs::read(store.blob_path(&m.digest())).expect("read");
        assert_eq!(on_disk, data);
    }

    fn blob_of(len: u32) -> (Vec<u8>, Metainfo) {
        let data: Vec<u8> = (0..len).map(|i| (i.wrapping_mul(7) % 253) as u8).collect();
        let mut b = MetainfoBuilder::new(MIN_PIECE_LENGTH).expect("builder");
        b.update(&data);
        (data, b.finish().expect("meta"))
    }

    fn piece_of(data: &[u8], m: &Metainfo, i: u32) -> VerifiedPiece {
        let off = m.piece_offset(i) as usize;
        let len = m.piece_size(i).expect("size") as usize;
        m.verify_piece(i, Bytes::copy_from_slice(&data[off..off + len])).expect("verified")
    }

    #[tokio::test]
    async fn a_partial_download_resumes_with_only_its_intact_pieces() {
        let dir = tempfile::tempdir().expect("tmp");
        let (data, m) = blob_of(MIN_PIECE_LENGTH * 5 + 17);
        {
            let store = BlobStore::open(dir.path()).expect("open");
            let (partial, held) = PartialBlob::open_or_create(&store, m.clone()).await.expect("create");
            assert_eq!(held.count(), 0);
            for i in [0, 2, 3, 5] {
                partial.write_piece(piece_of(&data, &m, i)).await.expect("write");
            }
        }
        // Piece 3 is damaged on disk (a torn write, a bad sector) while the agent is down.
        let path = dir.path().join("partial").join(m.digest().hex());
        let f = File::options().write(true).open(&path).expect("open partial");
        f.write_all_at(b"\xff\xff", m.piece_offset(3) + 100).expect("corrupt");
        drop(f);

        let store = BlobStore::open(dir.path()).expect("reopen");
        let (partial, held) = PartialBlob::open_or_create(&store, m.clone()).await.expect("resume");
        assert_eq!(held.iter().collect::<Vec<_>>(), vec![0, 2, 5]);
        assert_eq!(
            partial.read_piece(2).await.expect("read").as_ref(),
            piece_of(&data, &m, 2).data().as_ref()
        );
        for i in [1, 3, 4] {
            partial.write_piece(piece_of(&data, &m, i)).await.expect("write");
        }
        partial.commit().await.expect("commit");
        assert_eq!(std::fs::read(store.blob_path(&m.digest())).expect("blob"), data);
        assert!(!path.exists(), "the partial file became the blob");

        // `discard` starts over whatever is on disk.
        let (partial, _) = PartialBlob::open_or_create(&store, m.clone()).await.expect("again");
        partial.write_piece(piece_of(&data, &m, 0)).await.expect("write");
        partial.discard().await;
        drop(partial);
        let (_, held) = PartialBlob::open_or_create(&store, m.clone()).await.expect("reopen");
        assert_eq!(held.count(), 0);
    }

    #[tokio::test]
    async fn a_truncated_partial_file_counts_only_whole_pieces() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = BlobStore::open(dir.path()).expect("open");
        let (data, m) = blob_of(MIN_PIECE_LENGTH * 3);
        let path = dir.path().join("partial").join(m.digest().hex());
        // A file cut inside piece 1, as if the disk filled up.
        std::fs::write(&path, &data[..MIN_PIECE_LENGTH as usize + 10]).expect("write");
        let (partial, held) = PartialBlob::open_or_create(&store, m.clone()).await.expect("resume");
        assert_eq!(held.iter().collect::<Vec<_>>(), vec![0]);
        // Not extended: the file grows only as pieces are written.
        assert_eq!(std::fs::metadata(&path).expect("meta").len(), u64::from(MIN_PIECE_LENGTH) + 10);
        // Publishing needs the whole blob, even with the right digest in hand.
        assert!(matches!(
            partial.commit_hashed(m.digest()).await,
            Err(StoreError::SizeMismatch { expected, actual }) if expected == m.length() && actual < expected
        ));
        assert_eq!(store.size(&m.digest()).await, None);
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn a_resumed_partial_reads_only_what_was_written() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = BlobStore::open(dir.path()).expect("open");
        let (data, m) = blob_of(MIN_PIECE_LENGTH * 40 + 5);
        let path = dir.path().join("partial").join(m.digest().hex());
        let two = 2 * u64::from(MIN_PIECE_LENGTH);
        {
            let (partial, held) = PartialBlob::open_or_create(&store, m.clone()).await.expect("create");
            assert_eq!(held.count(), 0);
            assert_eq!(std::fs::metadata(&path).expect("meta").len(), 0, "not pre-extended");
            for i in [0, 1] {
                partial.write_piece(piece_of(&data, &m, i)).await.expect("write");
            }
        }
        assert_eq!(std::fs::metadata(&path).expect("meta").len(), two);
        let (partial, held) = PartialBlob::open_or_create(&store, m.clone()).await.expect("resume");
        assert_eq!(held.iter().collect::<Vec<_>>(), vec![0, 1]);
        // Reads are exact (`read_exact_at`): opening would have failed had it read past the
        // two pieces on disk, and it did not grow the file to make room.
        assert_eq!(std::fs::metadata(&path).expect("meta").len(), two);
        let file = File::open(&path).expect("open partial");
        let (again, verified) = held_pieces(&file, &path, &m, two).expect("verify");
        assert_eq!((again.count(), verified), (2, two));

        // The rest arrives out of order; the file ends exactly at the blob's length.
        for i in (2..m.piece_count()).rev() {
            partial.write_piece(piece_of(&data, &m, i)).await.expect("write");
        }
        assert_eq!(std::fs::metadata(&path).expect("meta").len(), m.length());
        partial.commit().await.expect("commit");
        assert_eq!(std::fs::read(store.blob_path(&m.digest())).expect("blob"), data);
    }

    mod backed {
        use super::super::backing::testing::MemoryBacking;
        use super::super::backing::{blob_key, meta_key};
        use super::*;
        use std::sync::atomic::Ordering;

        fn backed(dir: &Path, backing: &Arc<MemoryBacking>) -> BlobStore {
            BlobStore::open_backed(dir, backing.clone() as Arc<dyn Backing>).expect("open")
        }

        async fn push(store: &BlobStore, data: &[u8]) -> Result<Metainfo, StoreError> {
            let mut staged = store.stage(MIN_PIECE_LENGTH).await?;
            staged.write(data).await?;
            staged.commit(&Digest::of(data)).await
        }

        #[test]
        fn keys_are_named_by_the_digest() {
            let d = Digest::of(b"x");
            assert_eq!(blob_key(&d), format!("blobs/sha256/{}", d.hex()));
            assert_eq!(meta_key(&d), format!("meta/{}", d.hex()));
        }

        #[tokio::test]
        async fn a_commit_is_in_the_backing_and_an_empty_disk_is_filled_from_it() {
            let backing = Arc::new(MemoryBacking::default());
            let (data, _) = blob_of(MIN_PIECE_LENGTH * 3 + 5);
            let digest = Digest::of(&data);
            let first = tempfile::tempdir().expect("tmp");
            let m = push(&backed(first.path(), &backing), &data).await.expect("commit");
            assert_eq!(backing.object(&blob_key(&digest)).as_deref(), Some(&data[..]));
            let meta: Metainfo =
                serde_json::from_slice(&backing.object(&meta_key(&digest)).expect("meta")).expect("json");
            assert_eq!(meta, m);

            // Another (or the same, wiped) disk: nothing there until it is asked for.
            let second = tempfile::tempdir().expect("tmp");
            let store = backed(second.path(), &backing);
            assert!(!store.blob_path(&digest).exists());
            assert_eq!(store.size(&digest).await, Some(data.len() as u64));
            assert_eq!(std::fs::read(store.blob_path(&digest)).expect("blob"), data);
            assert_eq!(store.stored_metainfo(&digest).await, Some(m));
            // Filling wrote nothing back.
            assert_eq!(backing.keys().len(), 2);
            // Absent in both: absent.
            assert_eq!(store.size(&Digest::of(b"nothing")).await, None);
        }

        #[tokio::test]
        async fn concurrent_requests_fill_once() {
            let backing = Arc::new(MemoryBacking::default());
            let (data, _) = blob_of(MIN_PIECE_LENGTH * 2);
            let digest = Digest::of(&data);
            let first = tempfile::tempdir().expect("tmp");
            push(&backed(first.path(), &backing), &data).await.expect("commit");
            let second = tempfile::tempdir().expect("tmp");
            let store = backed(second.path(), &backing);
            backing.calls.store(0, Ordering::Relaxed);
            let sizes = futures_util::future::join_all((0..8).map(|_| store.size(&digest))).await;
            assert!(sizes.iter().all(|s| *s == Some(data.len() as u64)));
            // One get of the blob and one of its metainfo.
            assert_eq!(backing.calls.load(Ordering::Relaxed), 2);
        }

        #[tokio::test]
        async fn a_failing_backing_fails_the_commit_and_leaves_nothing() {
            let backing = Arc::new(MemoryBacking::default());
            let dir = tempfile::tempdir().expect("tmp");
            let store = backed(dir.path(), &backing);
            backing.fail.store(true, Ordering::Relaxed);
            let data = b"pushed while the store is down";
            let err = push(&store, data).await.expect_err("must fail");
            assert!(matches!(err, StoreError::Backing(_)), "{err}");
            let digest = Digest::of(data);
            assert!(!store.blob_path(&digest).exists());
            assert!(!dir.path().join("meta").join(digest.hex()).exists());
            assert_eq!(std::fs::read_dir(dir.path().join("tmp")).expect("tmp").count(), 0);
            backing.fail.store(false, Ordering::Relaxed);
            assert!(backing.object(&blob_key(&digest)).is_none());
            assert_eq!(store.size(&digest).await, None);
        }

        #[tokio::test]
        async fn damaged_objects_are_not_served() {
            let backing = Arc::new(MemoryBacking::default());
            let data = vec![7u8; 5000];
            let digest = Digest::of(&data);
            let first = tempfile::tempdir().expect("tmp");
            push(&backed(first.path(), &backing), &data).await.expect("commit");
            let mut bad = data.clone();
            bad[4000] ^= 1;
            backing.insert(&blob_key(&digest), bad.into());
            let second = tempfile::tempdir().expect("tmp");
            let store = backed(second.path(), &backing);
            assert_eq!(store.size(&digest).await, None);
            assert!(matches!(store.ensure_local(&digest).await, Err(StoreError::DigestMismatch { .. })));
            assert!(!store.blob_path(&digest).exists());
            assert_eq!(std::fs::read_dir(second.path().join("tmp")).expect("tmp").count(), 0);
        }
    }

    #[tokio::test]
    async fn stale_partials_are_removed() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = BlobStore::open(dir.path()).expect("open");
        let (_, m) = blob_of(MIN_PIECE_LENGTH);
        drop(PartialBlob::open_or_create(&store, m).await.expect("create"));
        assert_eq!(store.remove_stale_partials(Duration::from_secs(3600)).expect("clean"), 0);
        assert_eq!(store.remove_stale_partials(Duration::ZERO).expect("clean"), 1);
        assert_eq!(std::fs::read_dir(dir.path().join("partial")).expect("dir").count(), 0);
    }
}

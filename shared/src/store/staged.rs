//! Uploads: a temp file hashed as the kernel accepts each write, published under its
//! digest only when length and digest are proven against the bytes on disk.

use super::*;

/// Deletes a temp file when dropped, unless disarmed (the file was published).
#[derive(Debug)]
pub(super) struct TempGuard(pub(super) Option<PathBuf>);

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
    pub(super) store: BlobStore,
    pub(super) path: PathBuf,
    /// The file and the hashes of what it holds; out while a blocking write runs, `None`
    /// for good once a write failed.
    pub(super) state: Option<(File, MetainfoBuilder)>,
    /// Bytes accepted but not yet written.
    pub(super) pending: BytesMut,
    /// Bytes written and hashed.
    pub(super) written: u64,
    pub(super) guard: TempGuard,
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
    pub(super) async fn publish(
        mut self,
        expected: &Digest,
        write_through: bool,
    ) -> Result<Metainfo, StoreError> {
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

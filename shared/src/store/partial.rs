//! Downloads: a file grown piece by piece from verified pieces only, kept across restarts
//! (every piece re-verified on reopen), published after the whole-blob sha256.

use std::collections::BTreeMap;

use super::*;

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
        blocking(move || {
            let mut at = offset;
            for block in piece.blocks() {
                file.write_all_at(block, at).map_err(io_err(&path))?;
                at += block.len() as u64;
            }
            Ok(())
        })
        .await
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
            ahead: Ahead::new(self.metainfo.piece_length()),
            from_memory: 0,
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
pub(super) fn held_pieces(
    f: &File,
    path: &Path,
    m: &Metainfo,
    written: u64,
) -> Result<(Bitfield, u64), StoreError> {
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

/// Bytes of pieces a reader of a download's prefix (the sha256 along it, a client
/// streaming it) keeps in memory beyond the piece at its offset (which is always kept: it is
/// taken next). None: on a cold pull from an origin, 8 pieces in flight complete nearly
/// together and keeping 1-2 ahead (4-8 MiB) raised the share taken from memory from ~40%
/// to ~50-60% without a measurable change in CPU, but the agent's peak RSS went from
/// 59-64 MiB to 64-77 MiB.
pub const KEEP_AHEAD: usize = 0;

/// Pieces just written to a download's file, kept in memory for a reader that moves along
/// the file's prefix, so that it takes them from memory when it gets there instead of
/// reading them back (and, for a client, checking them again). A piece is the verified
/// bytes that were written (the very buffers, shared, not copied).
///
/// Bounded: pieces before the reader's offset are dropped, and beyond the piece at the
/// offset at most `limit` bytes are kept ([`KEEP_AHEAD`]), the furthest pieces giving way to
/// nearer ones; what is not kept is read back.
#[derive(Debug)]
pub struct Ahead {
    piece_length: u64,
    limit: usize,
    /// By offset, all at or past the reader's offset.
    kept: BTreeMap<u64, VerifiedPiece>,
}

impl Ahead {
    /// Keeps [`KEEP_AHEAD`] bytes beyond the piece at the reader's offset.
    pub fn new(piece_length: u32) -> Self {
        Self::with_limit(piece_length, KEEP_AHEAD)
    }

    /// Keeps `limit` bytes beyond the piece at the reader's offset.
    pub fn with_limit(piece_length: u32, limit: usize) -> Self {
        Self { piece_length: u64::from(piece_length), limit, kept: BTreeMap::new() }
    }

    /// Offers a piece just written, for a reader now at `from`.
    pub fn offer(&mut self, piece: VerifiedPiece, from: u64) {
        let at = u64::from(piece.index()) * self.piece_length;
        if at < from {
            return;
        }
        self.kept.insert(at, piece);
        let mut beyond: usize = self.kept.range(from + 1..).map(|(_, p)| p.len()).sum();
        while beyond > self.limit {
            match self.kept.last_entry() {
                Some(last) if *last.key() != from => beyond -= last.remove().len(),
                _ => break,
            }
        }
    }

    /// The piece starting at `at`, if kept; pieces before it are dropped.
    pub fn take(&mut self, at: u64) -> Option<VerifiedPiece> {
        let rest = self.kept.split_off(&at);
        self.kept = rest;
        self.kept.remove(&at)
    }

    /// The kept pieces starting before `to`, taken out.
    fn take_below(&mut self, to: u64) -> BTreeMap<u64, VerifiedPiece> {
        let rest = self.kept.split_off(&to);
        std::mem::replace(&mut self.kept, rest)
    }
}

/// Streams sha256 over a growing prefix of a file, so a download's whole-blob digest is
/// ready when its last piece lands instead of costing a second pass over the blob.
///
/// Pieces just written can be [`offer`](Self::offer)ed ([`Ahead`]): they are hashed from
/// memory when the prefix reaches them, instead of being read back from the page cache.
/// Most pieces arrive at or just past the prefix; the others, and pieces held from an
/// earlier run, are read back. Either way the digest is over the bytes the file holds.
#[derive(Debug)]
pub struct PrefixHasher {
    file: Arc<File>,
    path: PathBuf,
    /// The hasher and its read buffer; out only while a blocking task hashes.
    state: Option<(DigestHasher, Vec<u8>)>,
    offset: u64,
    ahead: Ahead,
    /// Bytes hashed from memory (the rest was read back), for tests and logs.
    from_memory: u64,
}

impl PrefixHasher {
    /// Bytes hashed so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Bytes hashed from offered pieces rather than read back.
    pub fn from_memory(&self) -> u64 {
        self.from_memory
    }

    /// Offers a piece that was just written to the file (its bytes are what the file now
    /// holds at its offset), to hash from memory when the prefix reaches it.
    pub fn offer(&mut self, piece: VerifiedPiece) {
        self.ahead.offer(piece, self.offset);
    }

    /// Hashes the file up to `to` (bytes before it must be written and final): from the
    /// pieces offered where they start at the offset, else read back.
    pub async fn advance(&mut self, to: u64) -> Result<(), StoreError> {
        if to <= self.offset {
            return Ok(());
        }
        let Some((mut hasher, mut buf)) = self.state.take() else {
            return Err(StoreError::Io { path: self.path.clone(), source: io::Error::other("hasher lost") });
        };
        let mut kept = self.ahead.take_below(to);
        let (file, path, mut offset) = (self.file.clone(), self.path.clone(), self.offset);
        let (hasher, buf, offset, from_memory) = blocking(move || {
            let mut from_memory = 0;
            while offset < to {
                // `to` ends a piece (or the blob), so an offered piece at the offset fits.
                if let Some(piece) = kept.remove(&offset).filter(|p| offset + p.len() as u64 <= to) {
                    for block in piece.blocks() {
                        hasher.update(block);
                    }
                    offset += piece.len() as u64;
                    from_memory += piece.len() as u64;
                    continue;
                }
                // Read back up to the next piece offered (or `to`).
                let until = kept.range(offset..).next().map_or(to, |(&at, _)| at).min(to);
                let n = (until - offset).min(buf.len() as u64) as usize;
                file.read_exact_at(&mut buf[..n], offset).map_err(io_err(&path))?;
                hasher.update(&buf[..n]);
                offset += n as u64;
            }
            Ok((hasher, buf, offset, from_memory))
        })
        .await?;
        self.state = Some((hasher, buf));
        self.offset = offset;
        self.from_memory += from_memory;
        Ok(())
    }

    /// The digest of everything hashed.
    pub fn finish(self) -> Digest {
        self.state.map(|(h, _)| h.finish()).unwrap_or_else(|| DigestHasher::new().finish())
    }
}

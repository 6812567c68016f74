//! The origin as a peer: every whole blob it holds is served piece by piece over QUIC.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use shoal_shared::bitfield::Bitfield;
use shoal_shared::digest::Digest;
use shoal_shared::metainfo::Metainfo;
use shoal_shared::peer::PieceSource;
use shoal_shared::store::BlobStore;

/// Most metainfos kept in memory (least recently used out; read from disk again when asked).
const METAINFO_CACHE: u64 = 4096;
/// Most blobs remembered as recently fetched (least recently fetched out).
const HOT_SET: u64 = 100_000;
/// How long a fetch is remembered at most: longer than any retention asks about (the
/// pull-through retention reads it as "last used").
const HOT_MEMORY: Duration = Duration::from_secs(30 * 86400);

/// Serves pieces of committed blobs at the origin's piece length.
#[derive(Debug)]
pub struct Seeder {
    store: BlobStore,
    piece_length: u32,
    cache: moka::sync::Cache<Digest, Arc<Metainfo>>,
    /// Blobs whose metainfo or pieces were asked for, and when last.
    hot: moka::sync::Cache<Digest, Instant>,
    /// First copies first across agents pulling a blob at once.
    spread: crate::spread::Spread,
}

impl Seeder {
    pub fn new(store: BlobStore, piece_length: u32) -> Self {
        Self {
            store,
            piece_length,
            cache: moka::sync::Cache::new(METAINFO_CACHE),
            hot: moka::sync::Cache::builder().max_capacity(HOT_SET).time_to_live(HOT_MEMORY).build(),
            spread: Default::default(),
        }
    }

    /// When a peer last asked for `digest`'s metainfo or pieces, if lately.
    pub fn last_fetch(&self, digest: &Digest) -> Option<Instant> {
        self.hot.get(digest)
    }

    /// Blobs fetched within `window`: the ones worth announcing as seeded.
    pub fn hot_set(&self, window: Duration) -> Vec<Digest> {
        let now = Instant::now();
        self.hot.iter().filter(|(_, last)| now.duration_since(*last) < window).map(|(d, _)| *d).collect()
    }

    /// The metainfo of a held blob (cached).
    pub async fn metainfo(&self, digest: Digest) -> Option<Arc<Metainfo>> {
        let m = self.lookup(digest).await?;
        self.hot.insert(digest, Instant::now());
        Some(m)
    }

    async fn lookup(&self, digest: Digest) -> Option<Arc<Metainfo>> {
        if let Some(m) = self.cache.get(&digest) {
            return Some(m);
        }
        match self.store.metainfo(&digest, self.piece_length).await {
            Ok(Some(m)) => {
                let m = Arc::new(m);
                self.cache.insert(digest, m.clone());
                Some(m)
            }
            Ok(None) => None,
            Err(e) => {
                tracing::error!(%digest, cause = %e, "cannot compute metainfo");
                None
            }
        }
    }
}

impl PieceSource for Seeder {
    async fn bitfield(&self, digest: Digest) -> Option<Bitfield> {
        let m = self.metainfo(digest).await?;
        Some(Bitfield::full(m.piece_count()))
    }

    async fn piece_size(&self, digest: Digest, index: u32) -> Option<u32> {
        // Sizing a request is not serving it: no mark in the hot set.
        self.lookup(digest).await?.piece_size(index).ok()
    }

    async fn piece(&self, digest: Digest, index: u32) -> Option<Bytes> {
        let m = self.metainfo(digest).await?;
        let size = m.piece_size(index).ok()?;
        if !self.spread.admit(digest, index, m.piece_count(), Instant::now()) {
            // Refused: the asking agent gets it from the peer it went to (see `spread`).
            return None;
        }
        match self.store.read_range(&digest, m.piece_offset(index), size as usize).await {
            Ok(bytes) => bytes,
            Err(e) => {
                tracing::error!(%digest, index, cause = %e, "cannot read piece");
                None
            }
        }
    }
}

//! The agent as a peer: serves verified pieces of blobs it holds, whole or in progress.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use shoal_shared::bitfield::Bitfield;
use shoal_shared::client::PeerInfo;
use shoal_shared::digest::Digest;
use shoal_shared::metainfo::Metainfo;
use shoal_shared::peer::{PieceSource, Relay};
use shoal_shared::store::read_at;
use tokio::sync::watch;

use crate::download::Downloads;

/// Most metainfos of cached blobs kept in memory (least recently used out; the rest are
/// read from disk again when asked for).
const METAINFO_CACHE: u64 = 4096;

/// Serves pieces out of an agent's downloads and cache.
#[derive(Debug)]
pub struct AgentSource {
    downloads: Arc<Downloads>,
    metainfo: moka::sync::Cache<Digest, Arc<Metainfo>>,
}

impl AgentSource {
    pub fn new(downloads: Arc<Downloads>) -> Self {
        Self { downloads, metainfo: moka::sync::Cache::new(METAINFO_CACHE) }
    }

    /// Metainfo of a whole cached blob.
    async fn cached(&self, digest: Digest) -> Option<Arc<Metainfo>> {
        if let Some(m) = self.metainfo.get(&digest) {
            return Some(m);
        }
        let store = &self.downloads.store;
        let m = Arc::new(store.stored_metainfo(&digest).await?);
        store.size(&digest).await?;
        self.metainfo.insert(digest, m.clone());
        Some(m)
    }
}

impl PieceSource for AgentSource {
    async fn bitfield(&self, digest: Digest) -> Option<Bitfield> {
        if let Some(active) = self.downloads.active.get(&digest).map(|a| a.clone()) {
            return Some(active.have.borrow().clone());
        }
        Some(Bitfield::full(self.cached(digest).await?.piece_count()))
    }

    async fn subscribe(&self, digest: Digest, from: SocketAddr) -> Option<watch::Receiver<Bitfield>> {
        let active = self.downloads.active.get(&digest)?.clone();
        // Tell our download of this subscriber, so both follow each other; dropped if the
        // download is not keeping up with such news.
        let _ = active.leads.try_send(PeerInfo { addr: from, complete: false, origin: false });
        Some(active.relays.offered())
    }

    async fn relay(&self, digest: Digest, index: u32) -> Option<Arc<Relay>> {
        self.downloads.active.get(&digest)?.relays.get(index)
    }

    async fn piece_size(&self, digest: Digest, index: u32) -> Option<u32> {
        if let Some(active) = self.downloads.active.get(&digest).map(|a| a.clone()) {
            return active.partial.metainfo().piece_size(index).ok();
        }
        self.cached(digest).await?.piece_size(index).ok()
    }

    async fn piece(&self, digest: Digest, index: u32) -> Option<Bytes> {
        if let Some(active) = self.downloads.active.get(&digest).map(|a| a.clone()) {
            // Only pieces already verified and written are served.
            let held = active.have.borrow().get(index);
            return if held { active.partial.read_piece(index).await.ok() } else { None };
        }
        let m = self.cached(digest).await?;
        let size = m.piece_size(index).ok()? as usize;
        let store = &self.downloads.store;
        let (file, len) = store.open_blob(&digest).await?;
        let file = Arc::new(file);
        // Checked on every read: a piece damaged on disk (or a blob whose length is not its
        // metainfo's) is never offered to a peer, and the blob is dropped so this agent
        // stops seeding it.
        let data = if len == m.length() {
            let (f, path, offset) = (file.clone(), store.blob_path(&digest), m.piece_offset(index));
            tokio::task::spawn_blocking(move || read_at(&f, &path, offset, size)).await.ok()?.ok()
        } else {
            None
        };
        match data.map(|d| m.verify_piece(index, d)) {
            Some(Ok(piece)) => {
                // Its swarm is active: the cache keeps it while it seeds.
                self.downloads.cache.peer_read(digest);
                Some(piece.data())
            }
            _ => {
                self.metainfo.remove(&digest);
                self.downloads.quarantine(digest, &file);
                None
            }
        }
    }
}

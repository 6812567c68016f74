//! The agent as a peer: serves verified pieces of blobs it holds, whole or in progress.

use std::sync::Arc;

use bytes::Bytes;
use shoal_shared::bitfield::Bitfield;
use shoal_shared::digest::Digest;
use shoal_shared::peer::PieceSource;

use crate::download::Downloads;

/// Serves pieces out of an agent's downloads and cache.
#[derive(Debug)]
pub struct AgentSource(pub Arc<Downloads>);

impl PieceSource for AgentSource {
    async fn bitfield(&self, digest: Digest) -> Option<Bitfield> {
        if let Some(active) = self.0.active.get(&digest).map(|a| a.clone()) {
            return Some(active.have.lock().unwrap_or_else(|p| p.into_inner()).clone());
        }
        let m = self.0.store.stored_metainfo(&digest).await?;
        self.0.store.size(&digest).await?;
        Some(Bitfield::full(m.piece_count()))
    }

    async fn piece(&self, digest: Digest, index: u32) -> Option<Bytes> {
        if let Some(active) = self.0.active.get(&digest).map(|a| a.clone()) {
            // Only pieces already verified and written are served.
            let held = active.have.lock().unwrap_or_else(|p| p.into_inner()).get(index);
            return if held { active.partial.read_piece(index).await.ok() } else { None };
        }
        let m = self.0.store.stored_metainfo(&digest).await?;
        let size = m.piece_size(index).ok()? as usize;
        self.0.store.read_range(&digest, m.piece_offset(index), size).await.ok().flatten()
    }
}

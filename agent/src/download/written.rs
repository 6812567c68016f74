//! Pieces just written, handed to the readers of the prefix (streaming clients and the
//! sha256 along the prefix) so that they take them from memory instead of reading them back.

use std::sync::Arc;

use shoal_shared::digest::Digest;
use shoal_shared::metainfo::VerifiedPiece;

use super::{store_err, Active, DownloadError};

/// Written pieces queued for one reader before further ones are left to be read back (a
/// reader drains its queue at once unless it is busy hashing or its client is not reading;
/// 2 raised the peak RSS of a cold pull by ~5-10 MiB).
const WRITTEN_QUEUE: usize = 1;

/// Hands each piece the swarm loop writes to every reader of the prefix that subscribed,
/// each of which keeps what it can use ([`Ahead`](shoal_shared::store::Ahead)). Never waits:
/// a reader whose queue is full reads that piece back from the file instead.
#[derive(Debug, Default)]
pub struct Written(std::sync::Mutex<Vec<tokio::sync::mpsc::Sender<VerifiedPiece>>>);

impl Written {
    /// The pieces written from now on (those written before are read back).
    pub fn subscribe(&self) -> tokio::sync::mpsc::Receiver<VerifiedPiece> {
        let (tx, rx) = tokio::sync::mpsc::channel(WRITTEN_QUEUE);
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(tx);
        rx
    }

    /// Offers `piece`, just written, to every reader (a clone of its block list each, the
    /// bytes shared); must come before the prefix moves past it.
    pub(crate) fn send(&self, piece: &VerifiedPiece) {
        use tokio::sync::mpsc::error::TrySendError;
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|tx| !matches!(tx.try_send(piece.clone()), Err(TrySendError::Closed(_))));
    }
}

/// Hashes the blob with sha256 along its verified prefix; returns the digest once the
/// prefix covers the whole blob. Pieces the swarm loop wrote are taken as they come (each
/// is offered before the prefix moves past it), so those within reach are hashed from
/// memory.
pub(super) async fn hash_along(
    active: Arc<Active>,
    mut written: tokio::sync::mpsc::Receiver<VerifiedPiece>,
) -> Result<Digest, DownloadError> {
    let mut rx = active.subscribe();
    let mut hasher = active.partial.prefix_hasher();
    let length = active.length();
    loop {
        while let Ok(piece) = written.try_recv() {
            hasher.offer(piece);
        }
        let prefix = *rx.borrow_and_update();
        if prefix.failed {
            return Err(DownloadError::Unavailable("download failed".into()));
        }
        hasher.advance(prefix.bytes).await.map_err(store_err)?;
        if hasher.offset() >= length {
            tracing::debug!(bytes = length, from_memory = hasher.from_memory(), "sha256 along the prefix");
            return Ok(hasher.finish());
        }
        tokio::select! {
            changed = rx.changed() => {
                if changed.is_err() {
                    return Err(DownloadError::Unavailable("download ended".into()));
                }
            }
            Some(piece) = written.recv() => hasher.offer(piece),
        }
    }
}

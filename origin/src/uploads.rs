//! Blob upload sessions of the registry push API (`POST`, `PATCH`..., `PUT ?digest=`).
//!
//! Each session owns one [`Staged`] temp file; the map only hands out the session, and each
//! session is behind its own async mutex so concurrent chunks of one upload are serialized
//! without blocking others. Open sessions are bounded in number and in the bytes they hold
//! together: a chunk that would take them past the byte bound ends its session.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use shoal_shared::store::Staged;
use tokio::sync::Mutex;

/// One upload: `None` once committed or cancelled.
pub type Session = Arc<Mutex<Option<Staged>>>;

#[derive(Debug)]
struct Entry {
    session: Session,
    touched: Instant,
    /// Bytes the session held after its last chunk.
    held: u64,
}

/// Open upload sessions.
#[derive(Debug)]
pub struct Uploads {
    sessions: DashMap<String, Entry>,
    max: usize,
    max_bytes: u64,
}

impl Uploads {
    /// At most `max` sessions holding at most `max_bytes` together.
    pub fn new(max: usize, max_bytes: u64) -> Self {
        Self { sessions: DashMap::new(), max, max_bytes }
    }

    /// How many bytes session `id` may hold in all: the bound less what the others hold.
    /// (Summed over at most `max` sessions, once per chunk.)
    pub fn room_for(&self, id: &str) -> u64 {
        let others: u64 = self.sessions.iter().filter(|e| e.key() != id).map(|e| e.held).sum();
        self.max_bytes.saturating_sub(others)
    }

    /// Records what session `id` holds now.
    pub fn set_held(&self, id: &str, bytes: u64) {
        if let Some(mut e) = self.sessions.get_mut(id) {
            e.held = bytes;
        }
    }

    /// Registers a new session; gives the upload back when too many are open.
    pub fn open(&self, staged: Staged) -> Result<String, Staged> {
        if self.sessions.len() >= self.max {
            return Err(staged);
        }
        let id = format!("{:032x}", rand::random::<u128>());
        let entry = Entry { session: Arc::new(Mutex::new(Some(staged))), touched: Instant::now(), held: 0 };
        self.sessions.insert(id.clone(), entry);
        Ok(id)
    }

    /// The session `id`, marking it as used now.
    pub fn get(&self, id: &str) -> Option<Session> {
        self.sessions.get_mut(id).map(|mut e| {
            e.touched = Instant::now();
            e.session.clone()
        })
    }

    /// Cancels sessions unused for `idle`, deleting their temp files.
    pub async fn expire(&self, idle: Duration) {
        let now = Instant::now();
        let mut stale = Vec::new();
        self.sessions.retain(|_, e| {
            let keep = now.duration_since(e.touched) < idle;
            if !keep {
                stale.push(e.session.clone());
            }
            keep
        });
        for session in stale {
            if let Some(staged) = session.lock().await.take() {
                tracing::info!("abandoned upload expired");
                staged.abort().await;
            }
        }
    }

    /// Sessions open.
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    pub fn remove(&self, id: &str) {
        self.sessions.remove(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_shared::metainfo::MIN_PIECE_LENGTH;
    use shoal_shared::store::BlobStore;

    #[tokio::test]
    async fn idle_sessions_expire_and_the_cap_holds() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = BlobStore::open(dir.path()).expect("store");
        let uploads = Uploads::new(2, 100);
        let a = uploads.open(store.stage(MIN_PIECE_LENGTH).await.expect("stage")).expect("a");
        uploads.open(store.stage(MIN_PIECE_LENGTH).await.expect("stage")).expect("b");
        let refused = uploads.open(store.stage(MIN_PIECE_LENGTH).await.expect("stage"));
        refused.expect_err("over the cap").abort().await;
        uploads.expire(Duration::from_secs(3600)).await;
        assert_eq!(uploads.len(), 2);
        // The byte bound is shared: what one session holds is room the other lacks.
        assert_eq!(uploads.room_for(&a), 100);
        uploads.set_held(&a, 70);
        assert_eq!(uploads.room_for(&a), 100);
        let b = uploads.sessions.iter().map(|e| e.key().clone()).find(|k| *k != a).expect("b");
        assert_eq!(uploads.room_for(&b), 30);
        uploads.expire(Duration::ZERO).await;
        assert!(uploads.is_empty());
        assert!(uploads.get(&a).is_none());
        assert_eq!(std::fs::read_dir(dir.path().join("tmp")).expect("tmp").count(), 0);
    }
}

//! Blob upload sessions of the registry push API (`POST`, `PATCH`..., `PUT ?digest=`).
//!
//! Each session owns one [`Staged`] temp file; the map only hands out the session, and each
//! session is behind its own async mutex so concurrent chunks of one upload are serialized
//! without blocking others. The number of open sessions is capped.

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
}

/// Open upload sessions.
#[derive(Debug)]
pub struct Uploads {
    sessions: DashMap<String, Entry>,
    max: usize,
}

impl Uploads {
    pub fn new(max: usize) -> Self {
        Self { sessions: DashMap::new(), max }
    }

    /// Registers a new session; gives the upload back when too many are open.
    pub fn open(&self, staged: Staged) -> Result<String, Staged> {
        if self.sessions.len() >= self.max {
            return Err(staged);
        }
        let id = format!("{:032x}", rand::random::<u128>());
        let entry = Entry { session: Arc::new(Mutex::new(Some(staged))), touched: Instant::now() };
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
        let uploads = Uploads::new(2);
        let a = uploads.open(store.stage(MIN_PIECE_LENGTH).await.expect("stage")).expect("a");
        uploads.open(store.stage(MIN_PIECE_LENGTH).await.expect("stage")).expect("b");
        let refused = uploads.open(store.stage(MIN_PIECE_LENGTH).await.expect("stage"));
        refused.expect_err("over the cap").abort().await;
        uploads.expire(Duration::from_secs(3600)).await;
        assert_eq!(uploads.len(), 2);
        uploads.expire(Duration::ZERO).await;
        assert!(uploads.is_empty());
        assert!(uploads.get(&a).is_none());
        assert_eq!(std::fs::read_dir(dir.path().join("tmp")).expect("tmp").count(), 0);
    }
}

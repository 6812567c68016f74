//! Blob upload sessions of the registry push API (`POST`, `PATCH`..., `PUT ?digest=`).
//!
//! Each session owns one [`Staged`] temp file; the map only hands out the session, and each
//! session is behind its own async mutex so concurrent chunks of one upload are serialized
//! without blocking others. Sessions are bounded in number, and every upload in progress
//! (sessions and single-request uploads) in the bytes they hold together: each chunk takes
//! its bytes of the bound before it is written ([`Held::grow`]), and a chunk that does not
//! fit ends its upload.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use shoal_shared::store::Staged;
use tokio::sync::Mutex;

/// An upload in progress and the bytes it holds of the shared bound.
#[derive(Debug)]
pub struct Upload {
    pub staged: Staged,
    pub held: Held,
}

/// One upload session: `None` once committed or cancelled.
pub type Session = Arc<Mutex<Option<Upload>>>;

#[derive(Debug)]
struct Entry {
    session: Session,
    touched: Instant,
}

/// The bytes every upload in progress may hold together.
#[derive(Debug)]
struct Budget {
    used: AtomicU64,
    max: u64,
}

/// Bytes of the shared bound one upload holds; given back when dropped (the upload was
/// committed, cancelled, failed or expired).
#[derive(Debug)]
pub struct Held {
    budget: Arc<Budget>,
    bytes: u64,
}

impl Held {
    /// Takes `n` more bytes of the bound, before they are written; false (taking nothing)
    /// when they do not fit. Checked against what every upload holds at this moment, so
    /// concurrent uploads cannot each take the whole bound.
    pub fn grow(&mut self, n: u64) -> bool {
        let budget = &self.budget;
        let taken = budget.used.fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
            used.checked_add(n).filter(|&total| total <= budget.max)
        });
        if taken.is_ok() {
            self.bytes += n;
        }
        taken.is_ok()
    }

    /// What the shared bound has left.
    pub fn room(&self) -> u64 {
        self.budget.max.saturating_sub(self.budget.used.load(Ordering::Acquire))
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// Open upload sessions, and the bound on the bytes of every upload in progress.
#[derive(Debug)]
pub struct Uploads {
    sessions: DashMap<String, Entry>,
    max: usize,
    budget: Arc<Budget>,
}

impl Uploads {
    /// At most `max` sessions; uploads in progress (sessions and single-request uploads)
    /// hold at most `max_bytes` together.
    pub fn new(max: usize, max_bytes: u64) -> Self {
        let budget = Arc::new(Budget { used: AtomicU64::new(0), max: max_bytes });
        Self { sessions: DashMap::new(), max, budget }
    }

    /// A share of the bound, empty until it grows.
    pub fn hold(&self) -> Held {
        Held { budget: self.budget.clone(), bytes: 0 }
    }

    /// Registers a new session; gives the upload back when too many are open.
    pub fn open(&self, upload: Upload) -> Result<String, Upload> {
        if self.sessions.len() >= self.max {
            return Err(upload);
        }
        let id = format!("{:032x}", rand::random::<u128>());
        let entry = Entry { session: Arc::new(Mutex::new(Some(upload))), touched: Instant::now() };
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
            if let Some(upload) = session.lock().await.take() {
                tracing::info!("abandoned upload expired");
                upload.staged.abort().await;
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
    async fn idle_sessions_expire_and_the_caps_hold() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = BlobStore::open(dir.path()).expect("store");
        let uploads = Uploads::new(2, 100);
        let upload = |staged| Upload { staged, held: uploads.hold() };
        let a = uploads.open(upload(store.stage(MIN_PIECE_LENGTH).await.expect("stage"))).expect("a");
        uploads.open(upload(store.stage(MIN_PIECE_LENGTH).await.expect("stage"))).expect("b");
        let refused = uploads.open(upload(store.stage(MIN_PIECE_LENGTH).await.expect("stage")));
        refused.expect_err("over the cap").staged.abort().await;

        // The byte bound is shared, at the moment each chunk is taken.
        let session = uploads.get(&a).expect("a");
        let mut guard = session.lock().await;
        let held = &mut guard.as_mut().expect("open").held;
        assert!(held.grow(70));
        let mut other = uploads.hold();
        assert!(!other.grow(31), "two uploads took more than the bound");
        assert!(other.grow(30));
        assert_eq!(held.room(), 0);
        drop(other);
        assert_eq!(held.room(), 30, "a finished upload gives its bytes back");
        drop(guard);

        uploads.expire(Duration::from_secs(3600)).await;
        assert_eq!(uploads.len(), 2);
        uploads.expire(Duration::ZERO).await;
        assert!(uploads.is_empty());
        assert!(uploads.get(&a).is_none());
        assert_eq!(uploads.hold().room(), 100, "expired uploads give their bytes back");
        assert_eq!(std::fs::read_dir(dir.path().join("tmp")).expect("tmp").count(), 0);
    }
}

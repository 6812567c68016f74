//! Blob upload sessions of the registry push API (`POST`, `PATCH`..., `PUT ?digest=`).
//!
//! Each session owns one [`Staged`] temp file; the map only hands out the session, and each
//! session is behind its own async mutex so concurrent chunks of one upload are serialized
//! without blocking others. The number of open sessions is capped.

use std::sync::Arc;

use dashmap::DashMap;
use shoal_shared::store::Staged;
use tokio::sync::Mutex;

/// One upload: `None` once committed or cancelled.
pub type Session = Arc<Mutex<Option<Staged>>>;

/// Open upload sessions.
#[derive(Debug)]
pub struct Uploads {
    sessions: DashMap<String, Session>,
    max: usize,
}

impl Uploads {
    pub fn new(max: usize) -> Self {
        Self { sessions: DashMap::new(), max }
    }

    /// Registers a new session; `None` when too many are open.
    pub fn open(&self, staged: Staged) -> Option<String> {
        if self.sessions.len() >= self.max {
            return None;
        }
        let id = format!("{:032x}", rand::random::<u128>());
        self.sessions.insert(id.clone(), Arc::new(Mutex::new(Some(staged))));
        Some(id)
    }

    pub fn get(&self, id: &str) -> Option<Session> {
        self.sessions.get(id).map(|s| s.clone())
    }

    pub fn remove(&self, id: &str) {
        self.sessions.remove(id);
    }
}

//! Which pulled-through content is private, kept so that a restart does not open it.
//!
//! A repository is private when its upstream refused it without credentials and served it
//! with the `--upstream-auth` ones ([`crate::upstream::Registry::learned_private`]). Two
//! kinds of marker record that, each a small file under the data directory and, with a
//! durable store (`--store`), an object under the same key, written there first and read
//! from there when the local file is missing (as tags are, `crate::tags`):
//!
//! - `private-repos/<blake3 of "registry/repository">`: the repository is private. Sticky:
//!   once learned, a restart or a cache that forgot what the upstream said keeps it private.
//! - `private/<digest hex>`: the blob or manifest was pulled for that private repository; the
//!   content is `registry/repository`. A blob is decided by the repository it was first
//!   pulled for; pushing the same digest removes the marker (pushed content is open).
//!
//! Metainfo and tag answers for marked content carry
//! [`shoal_shared::tenant::PRIVATE_HEADER`] (see `api.rs`), which trackers pass on and
//! agents enforce (`shoal_agent::tenant`).

use std::path::PathBuf;

use shoal_shared::digest::Digest;
use shoal_shared::store::{backing, BlobStore};
use shoal_shared::tenant::{PrivateRepo, MAX_PRIVATE_REPO};

const REPO_DIR: &str = "private-repos";
const BLOB_DIR: &str = "private";

/// The private markers of one origin's store.
#[derive(Debug, Clone)]
pub struct PrivateMarks {
    store: BlobStore,
}

fn repo_key(repo: &PrivateRepo) -> String {
    format!("{REPO_DIR}/{}", blake3::hash(repo.to_string().as_bytes()).to_hex())
}

fn blob_key(digest: &Digest) -> String {
    format!("{BLOB_DIR}/{}", digest.hex())
}

impl PrivateMarks {
    pub fn new(store: &BlobStore) -> Self {
        Self { store: store.clone() }
    }

    fn local(&self, key: &str) -> PathBuf {
        self.store.root().join(key)
    }

    /// Writes `text` under `key`: in the durable store first, then on disk.
    async fn put(&self, key: &str, text: String) -> std::io::Result<()> {
        if let Some(b) = self.store.backing() {
            b.put_bytes(key, text.clone().into()).await.map_err(std::io::Error::other)?;
        }
        let path = self.local(key);
        if let Some(dir) = path.parent() {
            tokio::fs::create_dir_all(dir).await?;
        }
        let tmp = self.store.temp_path("private");
        if let Some(dir) = tmp.parent() {
            tokio::fs::create_dir_all(dir).await?;
        }
        tokio::fs::write(&tmp, text).await?;
        tokio::fs::rename(&tmp, &path).await
    }

    /// The text under `key`: from disk, else from the durable store (kept on disk).
    async fn get(&self, key: &str) -> Option<String> {
        if let Ok(text) = tokio::fs::read_to_string(self.local(key)).await {
            return Some(text);
        }
        let fetched = match self.store.backing()?.get(key).await {
            Ok(f) => f?,
            Err(e) => {
                // Failing closed is not possible here (the store may be down for good), so
                // say it loudly: a private marker could not be read.
                tracing::error!(%key, cause = %e, "cannot read a private marker from the durable store");
                return None;
            }
        };
        let bytes = backing::read_small(fetched, MAX_PRIVATE_REPO).await.ok()?;
        let text = String::from_utf8(bytes).ok()?;
        let path = self.local(key);
        if let Some(dir) = path.parent() {
            let _ = tokio::fs::create_dir_all(dir).await;
        }
        let _ = tokio::fs::write(path, &text).await;
        Some(text)
    }

    /// Records that `repo` is private.
    pub async fn mark_repo(&self, repo: &PrivateRepo) {
        if let Err(e) = self.put(&repo_key(repo), repo.to_string()).await {
            tracing::error!(%repo, cause = %e, "cannot record a private repository");
        }
    }

    /// Whether `repo` was recorded private.
    pub async fn repo_is_private(&self, repo: &PrivateRepo) -> bool {
        self.get(&repo_key(repo)).await.is_some()
    }

    /// Records that `digest` was pulled for private `repo` (called before the content becomes
    /// visible; content already held is not fetched again, so the first pull decides).
    pub async fn mark_blob(&self, digest: &Digest, repo: &PrivateRepo) -> std::io::Result<()> {
        self.put(&blob_key(digest), repo.to_string()).await
    }

    /// The private repository `digest` was pulled for, if any.
    pub async fn blob(&self, digest: &Digest) -> Option<PrivateRepo> {
        PrivateRepo::parse(&self.get(&blob_key(digest)).await?).ok()
    }

    /// `digest` was pushed: it is open to everyone, whatever a pull said.
    pub async fn unmark_blob(&self, digest: &Digest) {
        let key = blob_key(digest);
        if let Some(b) = self.store.backing() {
            if let Err(e) = b.delete(&key).await {
                tracing::warn!(%digest, cause = %e, "cannot remove a private marker from the durable store");
            }
        }
        let _ = tokio::fs::remove_file(self.local(&key)).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use shoal_shared::store::backing::testing::MemoryBacking;

    use super::*;

    #[tokio::test]
    async fn markers_survive_the_loss_of_the_local_disk() {
        let backing = Arc::new(MemoryBacking::default());
        let (dir, other) = (tempfile::tempdir().expect("dir"), tempfile::tempdir().expect("dir"));
        let marks = PrivateMarks::new(&BlobStore::open_backed(dir.path(), backing.clone()).expect("store"));
        let repo = PrivateRepo::new("localhost:5000", "team/app").expect("repo");
        let digest = Digest::of(b"layer");
        marks.mark_repo(&repo).await;
        marks.mark_blob(&digest, &repo).await.expect("mark");
        // A fresh disk with the same durable store still knows.
        let fresh = PrivateMarks::new(&BlobStore::open_backed(other.path(), backing).expect("store"));
        assert!(fresh.repo_is_private(&repo).await);
        assert_eq!(fresh.blob(&digest).await, Some(repo.clone()));
        fresh.unmark_blob(&digest).await;
        assert_eq!(fresh.blob(&digest).await, None);
        assert!(marks.blob(&digest).await.is_some(), "the other disk's copy is its own");
        let public = PrivateRepo::new("localhost:5000", "team/public").expect("repo");
        assert!(!fresh.repo_is_private(&public).await);
    }
}

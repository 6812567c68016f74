//! Tags: `name:tag -> manifest digest`, one small file each under `<data>/tags/`.
//!
//! Names and tags are validated by the caller ([`shoal_shared::oci::valid_name`],
//! [`shoal_shared::oci::valid_tag`]), so they are safe path components: names cannot contain
//! `..` or empty segments and tags cannot contain `/`.

use std::io;
use std::path::PathBuf;

use shoal_shared::digest::Digest;
use shoal_shared::store::BlobStore;

/// The tag store, written atomically (temp file + rename).
#[derive(Debug, Clone)]
pub struct TagStore {
    root: PathBuf,
    store: BlobStore,
}

impl TagStore {
    pub fn new(store: &BlobStore) -> Self {
        Self { root: store.root().join("tags"), store: store.clone() }
    }

    /// Tags kept under `<data>/<dir>` (pulled-through tags live apart from pushed ones, one
    /// directory per upstream). `dir` must be a safe relative path.
    pub fn in_dir(store: &BlobStore, dir: &str) -> Self {
        Self { root: store.root().join(dir), store: store.clone() }
    }

    /// The digest `name:tag` points at and how long ago it was written (its fetched-at
    /// time, for pulled-through tags).
    pub async fn get_with_age(&self, name: &str, tag: &str) -> Option<(Digest, std::time::Duration)> {
        let path = self.path(name, tag);
        let modified = tokio::fs::metadata(&path).await.ok()?.modified().ok()?;
        let digest = self.get(name, tag).await?;
        Some((digest, modified.elapsed().unwrap_or_default()))
    }

    fn path(&self, name: &str, tag: &str) -> PathBuf {
        self.root.join(name).join(format!("{tag}.tag"))
    }

    /// The digest `name:tag` points at, if any.
    pub async fn get(&self, name: &str, tag: &str) -> Option<Digest> {
        let text = tokio::fs::read_to_string(self.path(name, tag)).await.ok()?;
        text.trim().parse().ok()
    }

    /// The tags of `name`, sorted; `None` when the repository has none.
    pub async fn list(&self, name: &str) -> Option<Vec<String>> {
        let mut dir = tokio::fs::read_dir(self.root.join(name)).await.ok()?;
        let mut tags = Vec::new();
        while let Ok(Some(entry)) = dir.next_entry().await {
            if let Some(tag) = entry.file_name().to_str().and_then(|f| f.strip_suffix(".tag")) {
                tags.push(tag.to_owned());
            }
        }
        tags.sort();
        (!tags.is_empty()).then_some(tags)
    }

    /// Points `name:tag` at `digest`.
    pub async fn put(&self, name: &str, tag: &str, digest: &Digest) -> io::Result<()> {
        let path = self.path(name, tag);
        if let Some(dir) = path.parent() {
            tokio::fs::create_dir_all(dir).await?;
        }
        let tmp = self.store.temp_path("tag");
        tokio::fs::write(&tmp, digest.to_string()).await?;
        tokio::fs::rename(&tmp, &path).await
    }
}

//! Tags: `name:tag -> manifest digest`, one small file each under `<data>/tags/`.
//!
//! Names and tags are validated by the caller ([`shoal_shared::oci::valid_name`],
//! [`shoal_shared::oci::valid_tag`]), so they are safe path components: names cannot contain
//! `..` or empty segments and tags cannot contain `/`.
//!
//! With a durable store (`--store`) every tag is also an object under the same relative
//! name (`tags/<name>/<tag>.tag`, `upstream-tags/<host>/<name>/<tag>.tag`): written there
//! before the local file, read from there when the local file is missing (and kept), and
//! listed from both.

use std::io;
use std::path::PathBuf;
use std::time::SystemTime;

use shoal_shared::digest::Digest;
use shoal_shared::oci::{valid_name, valid_tag};
use shoal_shared::store::{backing, BlobStore};

/// The tag store, written atomically (temp file + rename).
#[derive(Debug, Clone)]
pub struct TagStore {
    root: PathBuf,
    /// The directory's name relative to the data directory, and so in the durable store.
    dir: String,
    store: BlobStore,
}

impl TagStore {
    pub fn new(store: &BlobStore) -> Self {
        Self::in_dir(store, "tags")
    }

    /// Tags kept under `<data>/<dir>` (pulled-through tags live apart from pushed ones, one
    /// directory per upstream). `dir` must be a safe relative path.
    pub fn in_dir(store: &BlobStore, dir: &str) -> Self {
        Self { root: store.root().join(dir), dir: dir.to_owned(), store: store.clone() }
    }

    /// The digest `name:tag` points at and how long ago it was written (its fetched-at
    /// time, for pulled-through tags).
    pub async fn get_with_age(&self, name: &str, tag: &str) -> Option<(Digest, std::time::Duration)> {
        let digest = self.get(name, tag).await?;
        let modified = tokio::fs::metadata(self.path(name, tag)).await.ok()?.modified().ok()?;
        Some((digest, modified.elapsed().unwrap_or_default()))
    }

    fn path(&self, name: &str, tag: &str) -> PathBuf {
        self.root.join(name).join(format!("{tag}.tag"))
    }

    /// The key of `name:tag` in the durable store; `None` for a name or tag outside the
    /// grammar (callers validate; this keeps a bug from naming another key).
    fn key(&self, name: &str, tag: &str) -> Option<String> {
        (valid_name(name) && valid_tag(tag)).then(|| format!("{}/{name}/{tag}.tag", self.dir))
    }

    /// The digest `name:tag` points at, if any (from the durable store when not on disk).
    pub async fn get(&self, name: &str, tag: &str) -> Option<Digest> {
        if let Ok(text) = tokio::fs::read_to_string(self.path(name, tag)).await {
            return text.trim().parse().ok();
        }
        self.fill(name, tag).await
    }

    /// Copies `name:tag` from the durable store to disk, keeping the object's time as the
    /// file's (a pulled-through tag's age survives the trip).
    async fn fill(&self, name: &str, tag: &str) -> Option<Digest> {
        let backing = self.store.backing()?;
        let key = self.key(name, tag)?;
        let fetched = match backing.get(&key).await {
            Ok(Some(f)) => f,
            Ok(None) => return None,
            Err(e) => {
                tracing::error!(%key, cause = %e, "cannot read tag from the durable store");
                return None;
            }
        };
        let modified = fetched.modified;
        let text = match read_tag(fetched).await {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(%key, cause = %e, "cannot read tag from the durable store");
                return None;
            }
        };
        let digest: Digest = text.trim().parse().ok()?;
        if let Err(e) = self.write_local(name, tag, &digest, modified).await {
            tracing::warn!(%key, cause = %e, "cannot keep tag from the durable store on disk");
        }
        Some(digest)
    }

    /// The tags of `name`, sorted; `None` when the repository has none. With a durable
    /// store, those it holds too (a failing store is logged and the local ones listed).
    pub async fn list(&self, name: &str) -> Option<Vec<String>> {
        let mut tags = Vec::new();
        if let Ok(mut dir) = tokio::fs::read_dir(self.root.join(name)).await {
            while let Ok(Some(entry)) = dir.next_entry().await {
                if let Some(tag) = entry.file_name().to_str().and_then(|f| f.strip_suffix(".tag")) {
                    tags.push(tag.to_owned());
                }
            }
        }
        if let Some(backing) = self.store.backing().filter(|_| valid_name(name)) {
            let dir = format!("{}/{name}", self.dir);
            match backing.list(&dir).await {
                Ok(names) => tags.extend(
                    names
                        .iter()
                        .filter_map(|n| n.strip_suffix(".tag"))
                        .filter(|t| valid_tag(t))
                        .map(str::to_owned),
                ),
                Err(e) => tracing::error!(%dir, cause = %e, "cannot list tags in the durable store"),
            }
        }
        tags.sort();
        tags.dedup();
        (!tags.is_empty()).then_some(tags)
    }

    /// Points `name:tag` at `digest`: in the durable store first (if any), then on disk, so
    /// a tag this origin serves is never one the durable store lacks.
    pub async fn put(&self, name: &str, tag: &str, digest: &Digest) -> io::Result<()> {
        if let Some(backing) = self.store.backing() {
            let key = self
                .key(name, tag)
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "invalid name or tag"))?;
            backing.put_bytes(&key, digest.to_string().into()).await.map_err(io::Error::other)?;
        }
        self.write_local(name, tag, digest, None).await
    }

    /// Removes `name:tag`: from the durable store first (if any), then from disk, so a tag
    /// the store still holds is never filled back after it was deleted. `Ok(false)` when
    /// there was no such tag.
    pub async fn remove(&self, name: &str, tag: &str) -> io::Result<bool> {
        let existed = self.get(name, tag).await.is_some();
        if let Some(backing) = self.store.backing() {
            let key = self
                .key(name, tag)
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "invalid name or tag"))?;
            backing.delete(&key).await.map_err(io::Error::other)?;
        }
        match tokio::fs::remove_file(self.path(name, tag)).await {
            Ok(()) => Ok(existed),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(existed),
            Err(e) => Err(e),
        }
    }

    /// Every tag on disk under this store's directory that points at `digest`, as
    /// `(name, tag)` (for pulled-through tags the name starts with the upstream's host).
    /// Reads every tag file: for deletions, which are rare.
    pub async fn pointing_at(&self, digest: &Digest) -> Vec<(String, String)> {
        let root = self.root.clone();
        let files = tokio::task::spawn_blocking(move || list_tag_files(&root)).await.unwrap_or_default();
        let mut out = Vec::new();
        for (name, tag) in files {
            let path = self.path(&name, &tag);
            if let Ok(text) = tokio::fs::read_to_string(&path).await {
                if text.trim().parse::<Digest>().is_ok_and(|d| d == *digest) {
                    out.push((name, tag));
                }
            }
        }
        out
    }

    async fn write_local(
        &self,
        name: &str,
        tag: &str,
        digest: &Digest,
        modified: Option<SystemTime>,
    ) -> io::Result<()> {
        let path = self.path(name, tag);
        if let Some(dir) = path.parent() {
            tokio::fs::create_dir_all(dir).await?;
        }
        let tmp = self.store.temp_path("tag");
        tokio::fs::write(&tmp, digest.to_string()).await?;
        if let Some(t) = modified {
            let f = std::fs::File::options().write(true).open(&tmp)?;
            f.set_modified(t)?;
        }
        tokio::fs::rename(&tmp, &path).await
    }
}

/// Every `(name, tag)` whose file lies under `root` (`<root>/<name>/<tag>.tag`), sorted.
/// Blocking: walks the directory.
pub fn list_tag_files(root: &std::path::Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if let (Some(tag), Ok(rel)) = (
                path.file_name().and_then(|f| f.to_str()).and_then(|f| f.strip_suffix(".tag")),
                dir.strip_prefix(root),
            ) {
                if let Some(name) = rel.to_str().filter(|n| !n.is_empty()) {
                    out.push((name.to_owned(), tag.to_owned()));
                }
            }
        }
    }
    out.sort();
    out
}

/// A tag object's text (a digest: small).
async fn read_tag(fetched: backing::Fetched) -> Result<String, backing::BackingError> {
    use futures_util::StreamExt as _;
    let mut body = fetched.body;
    let mut out = Vec::new();
    while let Some(chunk) = body.next().await {
        out.extend_from_slice(&chunk?);
        if out.len() > 1024 {
            return Err(backing::BackingError("tag object larger than 1 KiB".into()));
        }
    }
    String::from_utf8(out).map_err(|e| backing::BackingError(e.to_string()))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::sync::Arc;

    use shoal_shared::store::backing::testing::MemoryBacking;
    use shoal_shared::store::Backing;

    use super::*;

    fn backed(dir: &std::path::Path, backing: &Arc<MemoryBacking>) -> BlobStore {
        BlobStore::open_backed(dir, backing.clone() as Arc<dyn Backing>).expect("open")
    }

    #[tokio::test]
    async fn tags_are_written_through_and_read_back_on_an_empty_disk() {
        let backing = Arc::new(MemoryBacking::default());
        let (a, b) = (Digest::of(b"a"), Digest::of(b"b"));
        let first = tempfile::tempdir().expect("tmp");
        let tags = TagStore::new(&backed(first.path(), &backing));
        tags.put("team/app", "v1", &a).await.expect("put");
        tags.put("team/app", "v2", &b).await.expect("put");
        tags.put("team", "v3", &a).await.expect("put");
        let pulled = TagStore::in_dir(&backed(first.path(), &backing), "upstream-tags/ghcr.io");
        pulled.put("library/x", "latest", &b).await.expect("put");
        assert_eq!(backing.object("tags/team/app/v1.tag").as_deref(), Some(a.to_string().as_bytes()));
        assert!(backing.object("upstream-tags/ghcr.io/library/x/latest.tag").is_some());

        let second = tempfile::tempdir().expect("tmp");
        let store = backed(second.path(), &backing);
        let tags = TagStore::new(&store);
        assert_eq!(tags.list("team/app").await, Some(vec!["v1".into(), "v2".into()]));
        // `team`'s tags are not `team/app`'s.
        assert_eq!(tags.list("team").await, Some(vec!["v3".into()]));
        assert_eq!(tags.list("nobody").await, None);
        assert_eq!(tags.get("team/app", "v2").await, Some(b));
        assert_eq!(tags.get("team/app", "v9").await, None);
        let pulled = TagStore::in_dir(&store, "upstream-tags/ghcr.io");
        let (digest, age) = pulled.get_with_age("library/x", "latest").await.expect("tag");
        assert_eq!(digest, b);
        assert!(age < std::time::Duration::from_secs(60));
        // Kept on disk: no second read from the store.
        let calls = backing.calls.load(Ordering::Relaxed);
        assert_eq!(tags.get("team/app", "v2").await, Some(b));
        assert_eq!(backing.calls.load(Ordering::Relaxed), calls);
    }

    #[tokio::test]
    async fn a_failing_store_refuses_the_tag_and_changes_nothing() {
        let backing = Arc::new(MemoryBacking::default());
        let dir = tempfile::tempdir().expect("tmp");
        let tags = TagStore::new(&backed(dir.path(), &backing));
        let (a, b) = (Digest::of(b"a"), Digest::of(b"b"));
        tags.put("app", "v1", &a).await.expect("put");
        backing.fail.store(true, Ordering::Relaxed);
        assert!(tags.put("app", "v1", &b).await.is_err());
        assert!(tags.put("app", "v2", &b).await.is_err());
        assert_eq!(tags.get("app", "v1").await, Some(a));
        assert_eq!(tags.get("app", "v2").await, None);
        assert_eq!(tags.list("app").await, Some(vec!["v1".into()]));
    }

    #[tokio::test]
    async fn removed_tags_are_gone_from_disk_and_store_and_found_by_digest_before() {
        let backing = Arc::new(MemoryBacking::default());
        let dir = tempfile::tempdir().expect("tmp");
        let tags = TagStore::new(&backed(dir.path(), &backing));
        let (a, b) = (Digest::of(b"a"), Digest::of(b"b"));
        tags.put("team/app", "v1", &a).await.expect("put");
        tags.put("team/app", "v2", &b).await.expect("put");
        tags.put("other", "x", &a).await.expect("put");
        assert_eq!(
            tags.pointing_at(&a).await,
            vec![("other".into(), "x".into()), ("team/app".into(), "v1".into())]
        );
        assert!(tags.remove("team/app", "v1").await.expect("remove"));
        assert!(!tags.remove("team/app", "v1").await.expect("remove again"));
        assert!(backing.object("tags/team/app/v1.tag").is_none());
        assert_eq!(tags.get("team/app", "v1").await, None);
        assert_eq!(tags.list("team/app").await, Some(vec!["v2".into()]));
        assert_eq!(tags.pointing_at(&a).await, vec![("other".into(), "x".into())]);
        // A store that cannot delete keeps the tag everywhere.
        backing.fail.store(true, Ordering::Relaxed);
        assert!(tags.remove("team/app", "v2").await.is_err());
        backing.fail.store(false, Ordering::Relaxed);
        assert_eq!(tags.get("team/app", "v2").await, Some(b));
    }

    #[test]
    fn keys_are_only_made_of_valid_names() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = BlobStore::open(dir.path()).expect("open");
        let tags = TagStore::new(&store);
        assert_eq!(tags.key("team/app", "v1.2").as_deref(), Some("tags/team/app/v1.2.tag"));
        assert_eq!(tags.key("../etc", "v1"), None);
        assert_eq!(tags.key("app", "a/b"), None);
        let pulled = TagStore::in_dir(&store, "upstream-tags/localhost_5000");
        assert_eq!(pulled.key("a", "b").as_deref(), Some("upstream-tags/localhost_5000/a/b.tag"));
    }
}

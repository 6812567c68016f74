//! The durable copy behind a [`BlobStore`](super::BlobStore): where committed content is kept
//! for good when the local directory is only a cache (the origin's `--store s3://...`).
//!
//! The store talks to it through [`Backing`], a small key/object interface with boxed futures
//! (so it is a trait object and this crate needs no object-storage client: the origin
//! implements it with `object_store`). Keys are relative, `/`-separated and built here and in
//! the origin's tag store from validated names only ([`blob_key`], [`meta_key`]).
//!
//! What the store does with it:
//! - **Write-through.** [`Staged::commit`](super::Staged::commit) verifies and fsyncs the temp
//!   file, then puts the metainfo and the blob (streamed from the file) in the backing, and
//!   only then publishes the blob locally. A failed put removes the temp file and is a
//!   [`StoreError::Backing`](super::StoreError::Backing): nothing becomes visible, locally or
//!   (the blob object being written last, and whole) in the backing.
//! - **Fill on miss.** A blob asked for but not on disk is fetched from the backing into a
//!   temp file, its sha256 checked while it streams in, and published like an upload, once per
//!   digest however many requests wait for it.

use std::path::Path;
use std::time::SystemTime;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;

use crate::digest::Digest;

/// A failure of the durable store: what was attempted and why, for logs (clients see 503).
#[derive(Debug, Clone, thiserror::Error)]
#[error("durable store: {0}")]
pub struct BackingError(pub String);

/// An object being read from the backing.
pub struct Fetched {
    /// The object's bytes, in order.
    pub body: BoxStream<'static, Result<Bytes, BackingError>>,
    /// When the object was last written, if the backing says.
    pub modified: Option<SystemTime>,
}

impl std::fmt::Debug for Fetched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetched").field("modified", &self.modified).finish_non_exhaustive()
    }
}

/// Where committed content is kept for good. Every method is one logical operation on one
/// key; implementations retry transient failures themselves and bound how long they take.
pub trait Backing: std::fmt::Debug + Send + Sync + 'static {
    /// Stores the file at `path` under `key`, streamed from the file (never held whole in
    /// memory). The object appears under `key` only once it is whole.
    fn put_file<'a>(&'a self, key: &'a str, path: &'a Path) -> BoxFuture<'a, Result<(), BackingError>>;

    /// Stores a small object.
    fn put_bytes<'a>(&'a self, key: &'a str, bytes: Bytes) -> BoxFuture<'a, Result<(), BackingError>>;

    /// The object under `key`, `None` when there is none.
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Fetched>, BackingError>>;

    /// The names of the objects directly under the directory `dir` (not those further down).
    fn list<'a>(&'a self, dir: &'a str) -> BoxFuture<'a, Result<Vec<String>, BackingError>>;

    /// Whether an object exists under `key` (a metadata request, no body).
    fn exists<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool, BackingError>>;

    /// Deletes the object under `key`; deleting what is not there is not an error.
    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), BackingError>>;
}

/// The key of a blob: `blobs/sha256/<hex>`.
pub fn blob_key(digest: &Digest) -> String {
    format!("blobs/sha256/{}", digest.hex())
}

/// The key of a blob's metainfo (JSON, as in the local `meta/`): `meta/<hex>`.
pub fn meta_key(digest: &Digest) -> String {
    format!("meta/{}", digest.hex())
}

/// Most bytes of a metainfo object read from the backing (a 1 TiB blob in 4 MiB pieces has
/// a metainfo of about 20 MiB).
pub(super) const MAX_META: usize = 64 << 20;

/// Reads a whole small object.
pub async fn read_small(mut fetched: Fetched, limit: usize) -> Result<Vec<u8>, BackingError> {
    use futures_util::StreamExt as _;
    let mut out = Vec::new();
    while let Some(chunk) = fetched.body.next().await {
        let chunk = chunk?;
        if out.len() + chunk.len() > limit {
            return Err(BackingError(format!("object larger than {limit} bytes")));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// Backings for tests: in memory, with switchable failures.
pub mod testing {
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Mutex;

    use super::*;

    /// An in-memory backing; `fail` makes every call fail (the store is down).
    #[derive(Debug, Default)]
    pub struct MemoryBacking {
        objects: Mutex<BTreeMap<String, (Bytes, SystemTime)>>,
        pub fail: AtomicBool,
        /// Calls made, to check that something was (or was not) asked.
        pub calls: AtomicUsize,
    }

    impl MemoryBacking {
        /// The object under `key`.
        pub fn object(&self, key: &str) -> Option<Bytes> {
            self.objects.lock().expect("lock").get(key).map(|(b, _)| b.clone())
        }

        /// Every key held.
        pub fn keys(&self) -> Vec<String> {
            self.objects.lock().expect("lock").keys().cloned().collect()
        }

        /// Replaces an object (to damage it).
        pub fn insert(&self, key: &str, bytes: Bytes) {
            self.objects.lock().expect("lock").insert(key.to_owned(), (bytes, SystemTime::now()));
        }

        fn check(&self) -> Result<(), BackingError> {
            self.calls.fetch_add(1, Ordering::Relaxed);
            if self.fail.load(Ordering::Relaxed) {
                return Err(BackingError("unreachable (test)".into()));
            }
            Ok(())
        }
    }

    impl Backing for MemoryBacking {
        fn put_file<'a>(&'a self, key: &'a str, path: &'a Path) -> BoxFuture<'a, Result<(), BackingError>> {
            Box::pin(async move {
                self.check()?;
                let bytes = tokio::fs::read(path).await.map_err(|e| BackingError(e.to_string()))?;
                self.insert(key, bytes.into());
                Ok(())
            })
        }

        fn put_bytes<'a>(&'a self, key: &'a str, bytes: Bytes) -> BoxFuture<'a, Result<(), BackingError>> {
            Box::pin(async move {
                self.check()?;
                self.insert(key, bytes);
                Ok(())
            })
        }

        fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Fetched>, BackingError>> {
            Box::pin(async move {
                self.check()?;
                let Some((bytes, modified)) = self.objects.lock().expect("lock").get(key).cloned() else {
                    return Ok(None);
                };
                // In small chunks, as a network body arrives.
                let chunks: Vec<Result<Bytes, BackingError>> =
                    bytes.chunks(1000).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
                Ok(Some(Fetched {
                    body: Box::pin(futures_util::stream::iter(chunks)),
                    modified: Some(modified),
                }))
            })
        }

        fn list<'a>(&'a self, dir: &'a str) -> BoxFuture<'a, Result<Vec<String>, BackingError>> {
            Box::pin(async move {
                self.check()?;
                let prefix = format!("{}/", dir.trim_end_matches('/'));
                Ok(self
                    .objects
                    .lock()
                    .expect("lock")
                    .keys()
                    .filter_map(|k| k.strip_prefix(&prefix))
                    .filter(|rest| !rest.contains('/'))
                    .map(str::to_owned)
                    .collect())
            })
        }

        fn exists<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool, BackingError>> {
            Box::pin(async move {
                self.check()?;
                Ok(self.objects.lock().expect("lock").contains_key(key))
            })
        }

        fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), BackingError>> {
            Box::pin(async move {
                self.check()?;
                self.objects.lock().expect("lock").remove(key);
                Ok(())
            })
        }
    }
}

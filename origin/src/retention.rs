//! What an origin keeps: pulled-through blobs no one asked for within the retention are
//! dropped (locally and from the durable store: the upstream still has them), and with a
//! durable store (`--store`) the local disk is a bounded cache in front of it, whose least
//! recently used copies are dropped locally (they stay in the store and are filled back on
//! the next request).
//!
//! Blobs pulled through from an upstream carry a marker, `<data>/pulled/<hex>`, written when
//! the fill commits and removed when the same digest is pushed (pushed content is kept for
//! good). When a blob was last used is the latest of: its marker's or file's modification,
//! a request for it on the registry API ([`Retention::touch`]), and a peer's fetch of its
//! metainfo or pieces (the seeder's hot set).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use dashmap::DashMap;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use shoal_shared::digest::Digest;
use shoal_shared::store::backing::{blob_key, meta_key};
use shoal_shared::store::BlobStore;

use crate::seeder::Seeder;

/// How often the retention and the local bound are applied.
pub const SWEEP_EVERY: Duration = Duration::from_secs(60);
/// Above this share of the local bound, least recently used copies are dropped...
const HIGH_WATERMARK: f64 = 0.90;
/// ...down to this share.
const LOW_WATERMARK: f64 = 0.80;

/// Marks `digest` as pulled through from an upstream.
pub async fn mark_pulled(store: &BlobStore, digest: &Digest) {
    let dir = store.root().join("pulled");
    if tokio::fs::create_dir_all(&dir).await.is_ok() {
        if let Err(e) = tokio::fs::write(dir.join(digest.hex()), b"").await {
            tracing::warn!(%digest, cause = %e, "cannot mark a pulled-through blob");
        }
    }
}

/// Whether `digest` was pulled through from an upstream within `window` (its mark is that
/// recent).
pub async fn pulled_within(store: &BlobStore, digest: &Digest, window: Duration) -> bool {
    let marker = store.root().join("pulled").join(digest.hex());
    let Ok(meta) = tokio::fs::metadata(&marker).await else { return false };
    meta.modified().ok().and_then(|m| m.elapsed().ok()).is_some_and(|age| age < window)
}

/// Whether `digest` carries the pulled-through mark at all (however old).
pub async fn is_pulled(store: &BlobStore, digest: &Digest) -> bool {
    tokio::fs::try_exists(store.root().join("pulled").join(digest.hex())).await.unwrap_or(false)
}

/// `digest` was pushed: it is kept for good, whatever an upstream fill said.
pub async fn unmark_pulled(store: &BlobStore, digest: &Digest) {
    let _ = tokio::fs::remove_file(store.root().join("pulled").join(digest.hex())).await;
}

/// Counters (`shoal_origin_*`).
#[derive(Debug, Default, Clone)]
pub struct RetentionMetrics {
    pub expired: Counter,
    pub dropped_locally: Counter,
    pub local_bytes: Gauge,
}

/// The origin's retention and local bound.
#[derive(Debug)]
pub struct Retention {
    store: BlobStore,
    /// Most bytes of blobs on the local disk (only with a durable store; 0: no bound).
    limit: u64,
    /// Pulled-through blobs unused this long go.
    keep_pulled: Option<Duration>,
    used: DashMap<Digest, SystemTime>,
    seeder: Arc<Seeder>,
    pub metrics: RetentionMetrics,
}

impl Retention {
    pub fn new(store: BlobStore, limit: u64, keep_pulled: Option<Duration>, seeder: Arc<Seeder>) -> Self {
        let limit = if store.backing().is_some() { limit } else { 0 };
        Self { store, limit, keep_pulled, used: DashMap::new(), seeder, metrics: RetentionMetrics::default() }
    }

    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("shoal_origin");
        r.register(
            "pulled_through_expired",
            "Pulled-through blobs dropped after the retention",
            self.metrics.expired.clone(),
        );
        r.register(
            "local_copies_dropped",
            "Local copies of blobs dropped to keep the disk within --cache-size (they stay in the store)",
            self.metrics.dropped_locally.clone(),
        );
        r.register("local_blob_bytes", "Bytes of blobs on the local disk", self.metrics.local_bytes.clone());
    }

    /// A client asked for `digest`.
    pub fn touch(&self, digest: Digest) {
        self.used.insert(digest, SystemTime::now());
    }

    fn last_used(&self, digest: &Digest, modified: SystemTime) -> SystemTime {
        let mut last = modified;
        if let Some(t) = self.used.get(digest) {
            last = last.max(*t);
        }
        if let Some(ago) = self.seeder.last_fetch(digest).map(|at| at.elapsed()) {
            last = last.max(SystemTime::now() - ago);
        }
        last
    }

    /// One pass: the retention, then the local bound. Returns (expired, dropped locally).
    pub async fn sweep(&self) -> (usize, usize) {
        let expired = match self.keep_pulled {
            Some(keep) => self.expire_pulled(keep).await,
            None => 0,
        };
        let dropped = self.bound_local().await;
        self.used.retain(|_, t| t.elapsed().unwrap_or_default() < Duration::from_secs(7 * 86400));
        (expired, dropped)
    }

    async fn expire_pulled(&self, keep: Duration) -> usize {
        let dir = self.store.root().join("pulled");
        let Ok(mut entries) = tokio::fs::read_dir(&dir).await else { return 0 };
        let now = SystemTime::now();
        let mut expired = 0;
        while let Ok(Some(entry)) = entries.next_entry().await {
            let Some(digest) =
                entry.file_name().to_str().and_then(|n| format!("sha256:{n}").parse::<Digest>().ok())
            else {
                continue;
            };
            let modified = entry.metadata().await.ok().and_then(|m| m.modified().ok()).unwrap_or(now);
            if now.duration_since(self.last_used(&digest, modified)).unwrap_or_default() < keep {
                continue;
            }
            if let Some(backing) = self.store.backing() {
                // The store first: a blob gone from the store but still marked locally is
                // tried again next pass.
                let removed = async {
                    backing.delete(&blob_key(&digest)).await?;
                    backing.delete(&meta_key(&digest)).await
                }
                .await;
                if let Err(e) = removed {
                    tracing::warn!(%digest, cause = %e, "cannot drop an expired blob from the store");
                    continue;
                }
            }
            self.store.remove(&digest);
            let _ = tokio::fs::remove_file(entry.path()).await;
            self.metrics.expired.inc();
            tracing::info!(%digest, "pulled-through blob unused for the retention; dropped");
            expired += 1;
        }
        expired
    }

    async fn bound_local(&self) -> usize {
        let usage = {
            let store = self.store.clone();
            tokio::task::spawn_blocking(move || store.usage())
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default()
        };
        let mut used: u64 = usage.iter().map(|u| u.bytes).sum();
        self.metrics.local_bytes.set(i64::try_from(used).unwrap_or(i64::MAX));
        let Some(backing) = self.store.backing() else { return 0 };
        if self.limit == 0 || (used as f64) <= self.limit as f64 * HIGH_WATERMARK {
            return 0;
        }
        let target = (self.limit as f64 * LOW_WATERMARK) as u64;
        let mut candidates: Vec<(SystemTime, Digest, u64)> = usage
            .iter()
            .filter(|u| u.complete)
            .map(|u| (self.last_used(&u.digest, u.modified), u.digest, u.bytes))
            .collect();
        candidates.sort();
        let mut dropped = 0;
        for (_, digest, bytes) in candidates {
            if used <= target {
                break;
            }
            // Only what the store holds whole may go (blobs from before --store stay).
            let held = async {
                Ok::<_, shoal_shared::store::backing::BackingError>(
                    backing.exists(&blob_key(&digest)).await? && backing.exists(&meta_key(&digest)).await?,
                )
            }
            .await;
            match held {
                Ok(true) => {
                    self.store.remove(&digest);
                    used = used.saturating_sub(bytes);
                    dropped += 1;
                    self.metrics.dropped_locally.inc();
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(cause = %e, "store unreachable; keeping local copies");
                    break;
                }
            }
        }
        self.metrics.local_bytes.set(i64::try_from(used).unwrap_or(i64::MAX));
        if dropped > 0 {
            tracing::info!(
                dropped,
                used,
                limit = self.limit,
                "local copies dropped (they stay in the store)"
            );
        }
        dropped
    }
}

/// Runs [`Retention::sweep`] every [`SWEEP_EVERY`] until `shutdown`.
pub async fn maintain(retention: Arc<Retention>, shutdown: tokio_util::sync::CancellationToken) {
    let started = Instant::now();
    shoal_shared::http::every(SWEEP_EVERY, shutdown, move || {
        let retention = retention.clone();
        async move {
            let (expired, dropped) = retention.sweep().await;
            tracing::debug!(expired, dropped, up = ?started.elapsed(), "retention pass");
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_shared::store::backing::testing::MemoryBacking;

    async fn put(store: &BlobStore, bytes: &[u8]) -> Digest {
        let digest = Digest::of(bytes);
        let mut staged = store.stage(1 << 20).await.expect("stage");
        staged.write(bytes).await.expect("write");
        staged.commit(&digest).await.expect("commit");
        digest
    }

    fn age(path: &std::path::Path, by: Duration) {
        let f = std::fs::File::options().write(true).open(path).expect("open");
        f.set_modified(SystemTime::now() - by).expect("mtime");
    }

    #[tokio::test]
    async fn pulled_through_blobs_unused_for_the_retention_go_everywhere_pushed_ones_stay() {
        let dir = tempfile::tempdir().expect("tmp");
        let backing = Arc::new(MemoryBacking::default());
        let store = BlobStore::open_backed(dir.path(), backing.clone()).expect("store");
        let seeder = Arc::new(Seeder::new(store.clone(), 1 << 20));
        let r = Retention::new(store.clone(), 0, Some(Duration::from_secs(3600)), seeder);
        let (old, fresh, pushed) =
            (put(&store, b"old").await, put(&store, b"fresh").await, put(&store, b"pushed").await);
        for d in [old, fresh, pushed] {
            mark_pulled(&store, &d).await;
        }
        unmark_pulled(&store, &pushed).await;
        let marker = |d: &Digest| dir.path().join("pulled").join(d.hex());
        age(&marker(&old), Duration::from_secs(7200));
        assert!(!marker(&pushed).exists(), "a push takes the mark off");
        // `fresh` was used lately although its marker is old.
        age(&marker(&fresh), Duration::from_secs(7200));
        r.touch(fresh);

        assert_eq!(r.sweep().await, (1, 0));
        assert!(!store.blob_path(&old).exists() && !marker(&old).exists());
        assert!(backing.object(&blob_key(&old)).is_none(), "gone from the store too");
        assert!(store.blob_path(&fresh).exists() && store.blob_path(&pushed).exists());
        assert!(backing.object(&blob_key(&pushed)).is_some());
    }

    #[tokio::test]
    async fn with_a_store_the_local_disk_keeps_within_its_bound_and_refills() {
        let dir = tempfile::tempdir().expect("tmp");
        let backing = Arc::new(MemoryBacking::default());
        let store = BlobStore::open_backed(dir.path(), backing.clone()).expect("store");
        let seeder = Arc::new(Seeder::new(store.clone(), 1 << 20));
        let blobs: Vec<Vec<u8>> = (0..6u8).map(|i| vec![i; 100_000]).collect();
        let mut digests = Vec::new();
        for (i, b) in blobs.iter().enumerate() {
            let d = put(&store, b).await;
            age(&store.blob_path(&d), Duration::from_secs(1000 - i as u64 * 100));
            digests.push(d);
        }
        // One blob from before the store existed: on disk only, never dropped.
        let local_only = Digest::of(b"local only");
        std::fs::write(store.blob_path(&local_only), b"local only").expect("write");
        age(&store.blob_path(&local_only), Duration::from_secs(5000));
        let per_blob: u64 = store.usage().expect("usage").iter().map(|u| u.bytes).max().expect("some");
        let r = Retention::new(store.clone(), 4 * per_blob, None, seeder);
        let (_, dropped) = r.sweep().await;
        assert!(dropped >= 3, "{dropped}");
        assert!(!store.blob_path(&digests[0]).exists(), "the least recently used goes first");
        assert!(store.blob_path(&digests[5]).exists(), "the most recent stays");
        assert!(store.blob_path(&local_only).exists(), "not in the store: kept");
        let used: u64 = store.usage().expect("usage").iter().map(|u| u.bytes).sum();
        assert!(used <= 4 * per_blob, "{used}");
        // Dropped locally, still served: filled back from the store.
        assert_eq!(store.size(&digests[0]).await, Some(100_000));
        // Without a store, no bound applies (the disk is the store).
        let plain = tempfile::tempdir().expect("tmp");
        let store = BlobStore::open(plain.path()).expect("store");
        put(&store, &[9; 100_000]).await;
        let seeder = Arc::new(Seeder::new(store.clone(), 1 << 20));
        assert_eq!(Retention::new(store, 1, None, seeder).sweep().await, (0, 0));
    }
}

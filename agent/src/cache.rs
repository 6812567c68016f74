//! The bounded blob cache: how many bytes the agent's blobs, metainfo and partial downloads
//! take on disk, which of them may go, and evicting the least recently used ones.
//!
//! [`Cache`] is the one owner of the accounting. Usage is tracked in memory and rebuilt at
//! startup from the store's own files only ([`BlobStore::usage`]), so other files on the
//! filesystem never count. A download is admitted before it fetches a byte, with the whole
//! blob's size: the cache makes room first (evicting down to the low watermark) or refuses
//! with [`CacheFull`], so the disk never holds more than the limit. A blob is never evicted
//! while it is pinned ([`Hold`]: downloading, or streaming to a client) or while it is
//! seeding to a swarm that fetched from it in the last [`SWARM_ACTIVE`].
//!
//! Evictions are returned to the caller, which stops announcing them and tells the tracker.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use shoal_shared::digest::Digest;
use shoal_shared::store::{BlobStore, StoreError};

/// A seeding blob a peer fetched a piece of within this long is serving an active swarm.
pub const SWARM_ACTIVE: Duration = Duration::from_secs(60);
/// Above this share of the limit, the background sweep evicts...
const HIGH_WATERMARK: f64 = 0.90;
/// ...down to this share (and so does making room for a download).
const LOW_WATERMARK: f64 = 0.80;
/// Disk bytes charged for a blob's metainfo file (one filesystem block; the JSON of a blob
/// of 128 pieces fits: up to 128 MiB at the default 1 MiB pieces).
const META_BYTES: u64 = 4096;

/// The cache cannot make room: everything it holds is in use.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the agent's cache is full ({used} of {limit} bytes, all in use); cannot fit {wanted} more bytes")]
pub struct CacheFull {
    pub used: u64,
    pub limit: u64,
    pub wanted: u64,
}

/// Bytes a blob of `length` takes on disk with its metainfo, in whole blocks.
pub fn disk_bytes(length: u64) -> u64 {
    length.div_ceil(4096) * 4096 + META_BYTES
}

#[derive(Debug)]
struct Entry {
    bytes: u64,
    last_used: Instant,
    pins: u32,
    /// Seeding until then (set when a download completes).
    seed_until: Option<Instant>,
    /// When a peer last fetched a piece of it.
    peer_read: Option<Instant>,
}

impl Entry {
    fn swarm_active(&self, now: Instant) -> bool {
        self.seed_until.is_some_and(|until| until > now)
            && self.peer_read.is_some_and(|at| now.duration_since(at) < SWARM_ACTIVE)
    }

    fn evictable(&self, now: Instant) -> bool {
        self.pins == 0 && !self.swarm_active(now)
    }
}

#[derive(Debug, Default)]
struct State {
    entries: HashMap<Digest, Entry>,
    used: u64,
}

/// Cache gauges and counters (`shoal_agent_cache_*`).
#[derive(Debug, Default, Clone)]
pub struct CacheMetrics {
    pub bytes: Gauge,
    pub entries: Gauge,
    pub limit: Gauge,
    pub evictions: Counter,
    pub evicted_bytes: Counter,
    pub refused: Counter,
}

impl CacheMetrics {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("shoal_agent_cache");
        r.register(
            "bytes",
            "Disk bytes held by cached blobs, metainfo and partial downloads",
            self.bytes.clone(),
        );
        r.register("entries", "Blobs (whole or partial) in the cache", self.entries.clone());
        r.register("limit_bytes", "The cache's size limit", self.limit.clone());
        r.register("evictions", "Blobs evicted from the cache", self.evictions.clone());
        r.register("evicted_bytes", "Disk bytes freed by evictions", self.evicted_bytes.clone());
        r.register(
            "refused",
            "Downloads refused because the cache was full of blobs in use",
            self.refused.clone(),
        );
    }
}

/// One cached blob as the status page shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EntryView {
    pub digest: Digest,
    pub bytes: u64,
    pub idle_secs: u64,
    /// Responses and downloads holding it.
    pub pins: u32,
    /// Seeding to a swarm that fetched from it lately.
    pub swarm_active: bool,
}

/// The agent's bounded cache. Shared as `Arc<Cache>`.
#[derive(Debug)]
pub struct Cache {
    store: BlobStore,
    limit: u64,
    ttl: Option<Duration>,
    state: Mutex<State>,
    pub metrics: CacheMetrics,
}

/// Keeps a blob from being evicted while it lives (a download, a response streaming it).
#[derive(Debug)]
pub struct Hold {
    cache: Arc<Cache>,
    digest: Digest,
}

impl Drop for Hold {
    fn drop(&mut self) {
        let mut state = self.cache.lock();
        if let Some(e) = state.entries.get_mut(&self.digest) {
            e.pins = e.pins.saturating_sub(1);
            e.last_used = Instant::now();
        }
    }
}

impl Cache {
    /// The cache over `store`, at most `limit` bytes (0: no limit), evicting blobs unused for
    /// `ttl`; usage rebuilt from what the store holds. Blocking (lists the store).
    pub fn open(store: BlobStore, limit: u64, ttl: Option<Duration>) -> Result<Self, StoreError> {
        let now = (Instant::now(), SystemTime::now());
        let mut state = State::default();
        for u in store.usage()? {
            // Ages carry over a restart, so the TTL and the LRU order survive it.
            let age = now.1.duration_since(u.modified).unwrap_or_default();
            let last_used = now.0.checked_sub(age).unwrap_or(now.0);
            state.used += u.bytes;
            state.entries.insert(
                u.digest,
                Entry { bytes: u.bytes, last_used, pins: 0, seed_until: None, peer_read: None },
            );
        }
        let cache = Self { store, limit, ttl, state: Mutex::new(state), metrics: CacheMetrics::default() };
        cache.metrics.limit.set(i64::try_from(limit).unwrap_or(i64::MAX));
        cache.publish(&cache.lock());
        Ok(cache)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn publish(&self, state: &State) {
        self.metrics.bytes.set(i64::try_from(state.used).unwrap_or(i64::MAX));
        self.metrics.entries.set(state.entries.len() as i64);
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes held now.
    pub fn used(&self) -> u64 {
        self.lock().used
    }

    /// Admits a download of a blob of `length` bytes: room is made for it (evicting the least
    /// recently used blobs not in use, down to the low watermark) and it is pinned until the
    /// returned [`Hold`] drops. Blocking (evictions unlink files): call it off the executor.
    /// Also returns the digests evicted to make room.
    pub fn admit(self: &Arc<Self>, digest: Digest, length: u64) -> Result<(Hold, Vec<Digest>), CacheFull> {
        let wanted = disk_bytes(length);
        let mut state = self.lock();
        let held = state.entries.get(&digest).map_or(0, |e| e.bytes);
        let extra = wanted.saturating_sub(held);
        let mut evicted = Vec::new();
        if self.limit > 0 && state.used + extra > self.limit {
            let target = (self.limit as f64 * LOW_WATERMARK) as u64;
            evicted = self.evict(&mut state, target.saturating_sub(extra), Some(digest));
            if state.used + extra > self.limit {
                self.metrics.refused.inc();
                self.publish(&state);
                return Err(CacheFull { used: state.used, limit: self.limit, wanted: extra });
            }
        }
        let now = Instant::now();
        let entry = state.entries.entry(digest).or_insert(Entry {
            bytes: 0,
            last_used: now,
            pins: 0,
            seed_until: None,
            peer_read: None,
        });
        entry.pins += 1;
        entry.last_used = now;
        entry.bytes = entry.bytes.max(wanted);
        let charged = entry.bytes;
        state.used = state.used - held + charged;
        self.publish(&state);
        drop(state);
        Ok((Hold { cache: self.clone(), digest }, evicted))
    }

    /// Pins a cached blob while a response streams it. `None` when the cache does not know
    /// it (the caller serves it anyway: it was just checked on disk).
    pub fn hold(self: &Arc<Self>, digest: Digest) -> Option<Hold> {
        let mut state = self.lock();
        let e = state.entries.get_mut(&digest)?;
        e.pins += 1;
        e.last_used = Instant::now();
        Some(Hold { cache: self.clone(), digest })
    }

    /// A download of `digest` completed: it seeds until `seed_until`.
    pub fn completed(&self, digest: Digest, seed_until: Instant) {
        if let Some(e) = self.lock().entries.get_mut(&digest) {
            e.seed_until = Some(seed_until);
            e.last_used = Instant::now();
        }
    }

    /// A peer fetched a piece of `digest`.
    pub fn peer_read(&self, digest: Digest) {
        if let Some(e) = self.lock().entries.get_mut(&digest) {
            let now = Instant::now();
            e.peer_read = Some(now);
            e.last_used = now;
        }
    }

    /// The store no longer holds `digest` (dropped as damaged, or a failed download removed
    /// its file).
    pub fn forget(&self, digest: &Digest) {
        let mut state = self.lock();
        if let Some(e) = state.entries.remove(digest) {
            state.used -= e.bytes;
        }
        self.publish(&state);
    }

    /// The periodic pass: evicts blobs unused for the TTL, and least recently used ones
    /// while above the high watermark (down to the low one). Blocking. Returns the evicted.
    pub fn sweep(&self) -> Vec<Digest> {
        let mut state = self.lock();
        let mut evicted = Vec::new();
        if let Some(ttl) = self.ttl {
            let now = Instant::now();
            let expired: Vec<Digest> = state
                .entries
                .iter()
                .filter(|(_, e)| e.evictable(now) && now.duration_since(e.last_used) >= ttl)
                .map(|(d, _)| *d)
                .collect();
            for digest in expired {
                self.remove(&mut state, digest);
                evicted.push(digest);
            }
        }
        if self.limit > 0 && state.used as f64 > self.limit as f64 * HIGH_WATERMARK {
            let target = (self.limit as f64 * LOW_WATERMARK) as u64;
            evicted.extend(self.evict(&mut state, target, None));
        }
        self.publish(&state);
        evicted
    }

    /// The largest entries, for the status page.
    pub fn largest(&self, n: usize) -> Vec<EntryView> {
        let state = self.lock();
        let now = Instant::now();
        let mut all: Vec<EntryView> = state
            .entries
            .iter()
            .map(|(d, e)| EntryView {
                digest: *d,
                bytes: e.bytes,
                idle_secs: now.duration_since(e.last_used).as_secs(),
                pins: e.pins,
                swarm_active: e.swarm_active(now),
            })
            .collect();
        all.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.digest.cmp(&b.digest)));
        all.truncate(n);
        all
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Evicts least recently used evictable entries (never `keep`) until `used <= target`.
    fn evict(&self, state: &mut State, target: u64, keep: Option<Digest>) -> Vec<Digest> {
        let now = Instant::now();
        let mut candidates: Vec<(Instant, Digest)> = state
            .entries
            .iter()
            .filter(|(d, e)| Some(**d) != keep && e.evictable(now))
            .map(|(d, e)| (e.last_used, *d))
            .collect();
        candidates.sort();
        let mut evicted = Vec::new();
        for (_, digest) in candidates {
            if state.used <= target {
                break;
            }
            self.remove(state, digest);
            evicted.push(digest);
        }
        evicted
    }

    /// Drops one entry and its files. The files go while the lock is held, so a download of
    /// the same digest admitted right after cannot have its new file removed.
    fn remove(&self, state: &mut State, digest: Digest) {
        let Some(e) = state.entries.remove(&digest) else { return };
        state.used -= e.bytes;
        self.store.remove_all(&digest);
        self.metrics.evictions.inc();
        self.metrics.evicted_bytes.inc_by(e.bytes);
        tracing::info!(%digest, bytes = e.bytes, "evicted from the cache");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(i: u32) -> Digest {
        Digest::of(&i.to_le_bytes())
    }

    fn cache(limit: u64) -> (tempfile::TempDir, Arc<Cache>) {
        let dir = tempfile::tempdir().expect("tmp");
        let store = BlobStore::open(dir.path()).expect("store");
        (dir, Arc::new(Cache::open(store, limit, None).expect("cache")))
    }

    #[test]
    fn least_recently_used_blobs_go_first_and_held_ones_never() {
        let mb = 1 << 20;
        let (_dir, cache) = cache(10 * disk_bytes(mb));
        let mut held = Vec::new();
        for i in 0..10 {
            let (hold, evicted) = cache.admit(digest(i), mb).expect("fits");
            assert!(evicted.is_empty());
            held.push(hold);
        }
        assert_eq!(cache.used(), 10 * disk_bytes(mb));
        // Everything in use: a new download is refused, nothing is evicted.
        let err = cache.admit(digest(100), mb).expect_err("full of blobs in use");
        assert_eq!(err.wanted, disk_bytes(mb));
        // Blobs 0..5 finish; 3 is used again; 6..10 are still downloading.
        for hold in held.drain(..5) {
            drop(hold);
        }
        drop(cache.hold(digest(3)));
        let (_new, evicted) = cache.admit(digest(100), mb).expect("room made");
        // Down to the low watermark (8 of 10 with the new one): the 3 oldest unheld go, 3 stays.
        assert_eq!(evicted, vec![digest(0), digest(1), digest(2)]);
        assert!(cache.used() <= cache.limit());
        // Admitting what is already held charges nothing more.
        let before = cache.used();
        let (_again, evicted) = cache.admit(digest(100), mb).expect("same blob");
        assert!(evicted.is_empty());
        assert_eq!(cache.used(), before);
    }

    #[test]
    fn a_seeding_blob_with_an_active_swarm_is_kept() {
        let mb = 1 << 20;
        let (_dir, cache) = cache(2 * disk_bytes(mb));
        drop(cache.admit(digest(1), mb).expect("fits"));
        drop(cache.admit(digest(2), mb).expect("fits"));
        cache.completed(digest(1), Instant::now() + Duration::from_secs(3600));
        cache.peer_read(digest(1));
        let (_hold, evicted) = cache.admit(digest(3), mb).expect("room made");
        assert_eq!(evicted, vec![digest(2)], "the swarm's blob stays, the other goes");
    }

    #[test]
    fn usage_is_rebuilt_from_the_stores_own_files_at_startup() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = BlobStore::open(dir.path()).expect("store");
        let d = digest(7);
        std::fs::write(store.blob_path(&d), vec![1u8; 10_000]).expect("blob");
        // Not the cache's: foreign names in its directories and files beside them.
        std::fs::write(dir.path().join("blobs").join("notes.txt"), vec![0u8; 50_000]).expect("foreign");
        std::fs::write(dir.path().join("other"), vec![0u8; 50_000]).expect("foreign");
        let cache = Cache::open(store, 0, None).expect("cache");
        assert_eq!(cache.len(), 1);
        assert!((10_000..=16_384).contains(&cache.used()), "{}", cache.used());
    }

    #[test]
    fn the_ttl_evicts_blobs_unused_that_long() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = BlobStore::open(dir.path()).expect("store");
        let cache = Arc::new(Cache::open(store.clone(), 0, Some(Duration::from_millis(50))).expect("cache"));
        drop(cache.admit(digest(1), 10).expect("fits"));
        let hold = cache.admit(digest(2), 10).expect("fits").0;
        std::thread::sleep(Duration::from_millis(80));
        assert_eq!(cache.sweep(), vec![digest(1)], "the held blob stays");
        drop(hold);
        assert!(cache.sweep().is_empty(), "just released: used now");
    }
}

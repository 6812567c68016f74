//! Downloads: one per digest however many requests want it (single-flight), fetched piece by
//! piece from the peers the tracker hands out, and published only when whole and verified.
//!
//! [`Downloads`] owns the map of downloads in flight; each download's state (its picker,
//! peers, in-flight requests) is owned by the one task that runs it. Requests that arrive
//! while a download runs subscribe to its [`Phase`]: once the metainfo is known they can
//! stream the verified prefix as it grows ([`Active::subscribe`]); once it is done they read
//! the cache. The task runs on the agent's main runtime, so a client that disconnects does
//! not cancel a download other clients are waiting for.
//!
//! Verification: every piece is checked against its blake3 hash before it is written; a
//! second task hashes the blob with sha256 along the verified prefix while the download runs,
//! and the blob enters the cache only if that digest is the one asked for.

#[cfg(test)]
mod faults;
mod metrics;
mod swarm;
mod written;

pub use metrics::DownloadMetrics;
use written::hash_along;
pub use written::Written;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use shoal_shared::bitfield::Bitfield;
use shoal_shared::client::{Announce, AnnounceBatch, BlobState, PeerInfo, MAX_BATCH, MAX_BATCH_DOWNLOADING};
use shoal_shared::digest::Digest;
use shoal_shared::hint::Hint;
use shoal_shared::peer::{PeerClient, Relays};
use shoal_shared::store::{BlobStore, PartialBlob, StoreError};
use tokio::sync::watch;
use tracing::Instrument;

use shoal_shared::tracker::{LookupError, TrackerClient};

use crate::cache::{Cache, Hold};
use crate::delivery::{Sources, Tally};

/// Why a download failed. Cloned to every waiting request.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DownloadError {
    #[error("blob unknown to the cluster")]
    NotFound,
    #[error("{0}")]
    Unavailable(String),
    /// The registry the blob comes from refused the cluster's credentials.
    #[error("the registry refused the cluster's credentials: {0}")]
    Denied(String),
    #[error("no progress for {0:?}")]
    Stalled(Duration),
    #[error("local storage: {0}")]
    Store(String),
    /// The agent's disk cannot hold the blob; nothing of it was fetched.
    #[error("the agent's disk has no room for this blob")]
    OutOfSpace,
    /// The cache is at its size limit with blobs that are all in use.
    #[error("{0}")]
    CacheFull(String),
}

impl From<LookupError> for DownloadError {
    fn from(e: LookupError) -> Self {
        match e {
            LookupError::NotFound => Self::NotFound,
            LookupError::Unavailable(m) => Self::Unavailable(m),
            LookupError::Denied(m) => Self::Denied(m),
        }
    }
}

/// A store failure as clients see it: what went wrong, never a path of the host (the full
/// error is logged).
fn store_err(e: StoreError) -> DownloadError {
    tracing::error!(cause = %e, "local storage failure");
    match e {
        e if e.is_out_of_space() => DownloadError::OutOfSpace,
        StoreError::Io { source, .. } => DownloadError::Store(source.kind().to_string()),
        other => DownloadError::Store(other.to_string()),
    }
}

/// What a waiting request sees of a download.
#[derive(Debug, Clone)]
pub enum Phase {
    /// Looking up the metainfo.
    Starting,
    /// Pieces are arriving; the verified prefix can be streamed.
    Streaming(Arc<Active>),
    /// Finished: the blob is in the cache (with who sent its pieces), or the download failed.
    Done(Result<Arc<Sources>, DownloadError>),
}

/// How far a download's verified, written, contiguous prefix reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Prefix {
    pub bytes: u64,
    /// Set when the download fails: no more bytes will come.
    pub failed: bool,
}

/// A download in progress, visible to the peer server (its verified pieces are served) and
/// to registry requests streaming it.
#[derive(Debug)]
pub struct Active {
    pub partial: PartialBlob,
    /// Verified, written pieces.
    pub have: watch::Sender<Bitfield>,
    /// Pieces arriving from peers, passed on block by block before they are whole
    /// (cut-through); its offered bitfield (held or arriving) is what subscribed peers
    /// follow (Have).
    pub relays: Relays,
    /// Peers worth probing that the download loop has not asked for: agents that
    /// subscribed to this download's pieces, peers from the batched announce.
    pub(crate) leads: tokio::sync::mpsc::Sender<PeerInfo>,
    /// Pieces just written, offered to the readers of the prefix (the sha256 along it,
    /// clients streaming it) so that they take them from memory instead of reading them back.
    pub(crate) written: Written,
    prefix: watch::Sender<Prefix>,
    /// Who sent each piece.
    pub sources: Arc<Sources>,
    /// Pieces received from each peer, for the status page.
    pub by_peer: std::sync::Mutex<std::collections::HashMap<SocketAddr, u32>>,
    /// When it started, for the status page.
    pub started: Instant,
    /// Its file became the cache's blob: from then on it is the cache's to serve (and to
    /// drop, if damaged), and new requests are not given this download.
    committed: std::sync::atomic::AtomicBool,
    /// Keeps the blob in the cache while the download, or a client streaming it, lives.
    _hold: Hold,
}

impl Active {
    /// Follows the verified prefix.
    pub fn subscribe(&self) -> watch::Receiver<Prefix> {
        self.prefix.subscribe()
    }

    pub fn length(&self) -> u64 {
        self.partial.metainfo().length()
    }

    /// Bytes verified and written so far.
    pub fn verified_bytes(&self) -> u64 {
        let m = self.partial.metainfo();
        let have = self.have.borrow();
        (0..m.piece_count()).filter(|&i| have.get(i)).map(|i| u64::from(m.piece_size(i).unwrap_or(0))).sum()
    }
}

/// Where a requested blob can be read from.
#[derive(Debug)]
pub enum Fetched {
    /// Whole and verified in the cache; how to count its bytes.
    Cached(Tally),
    /// Still downloading: stream its verified prefix.
    Streaming(Arc<Active>),
}

/// Settings of the download engine.
#[derive(Debug, Clone)]
pub struct Settings {
    pub me: SocketAddr,
    pub progress_timeout: Duration,
    pub seed_time: Duration,
    pub max_peers: usize,
    /// Relay pieces to peers while they arrive (cut-through).
    pub cut_through: bool,
}

/// All downloads of this agent, and the blobs it seeds.
#[derive(Debug)]
pub struct Downloads {
    pub store: BlobStore,
    pub cache: Arc<Cache>,
    tracker: TrackerClient,
    peers: PeerClient,
    settings: Settings,
    runtime: tokio::runtime::Handle,
    /// Every task spawned for downloads, preloads and swarm leaves: ended at shutdown.
    tasks: shoal_shared::tasks::Tasks,
    inflight: DashMap<Digest, watch::Receiver<Phase>>,
    pub active: DashMap<Digest, Arc<Active>>,
    seeding: DashMap<Digest, Instant>,
    pub metrics: DownloadMetrics,
}

impl Downloads {
    pub fn new(
        store: BlobStore,
        cache: Arc<Cache>,
        tracker: TrackerClient,
        peers: PeerClient,
        settings: Settings,
    ) -> Self {
        Self {
            metrics: DownloadMetrics { discarded: peers.discarded().clone(), ..DownloadMetrics::default() },
            store,
            cache,
            tracker,
            peers,
            settings,
            runtime: tokio::runtime::Handle::current(),
            tasks: shoal_shared::tasks::Tasks::new(),
            inflight: DashMap::new(),
            active: DashMap::new(),
            seeding: DashMap::new(),
        }
    }

    /// Runs `task` on the agent's runtime until it ends or the agent shuts down (then it is
    /// dropped where it stands: partial downloads resume at the next start).
    pub fn spawn<F>(&self, task: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.tasks.spawn_on(task, &self.runtime);
    }

    /// Ends every task [`spawn`](Self::spawn)ed and waits for them, at most `within`.
    /// Returns whether all ended in time.
    pub async fn shutdown(&self, within: Duration) -> bool {
        self.tasks.shutdown(within).await
    }

    pub fn tracker(&self) -> &TrackerClient {
        &self.tracker
    }

    /// Joins the download of `digest`, starting it if none runs. `None` when the blob is
    /// already cached.
    fn join(self: &Arc<Self>, digest: Digest, hint: Option<&Hint>) -> Option<watch::Receiver<Phase>> {
        match self.inflight.entry(digest) {
            Entry::Occupied(e) => Some(e.get().clone()),
            Entry::Vacant(v) => {
                // A download may have finished since the caller looked at the cache.
                if self.store.blob_path(&digest).exists() {
                    return None;
                }
                let (tx, rx) = watch::channel(Phase::Starting);
                v.insert(rx.clone());
                let this = self.clone();
                let hint = hint.cloned();
                self.spawn(async move {
                    this.metrics.started.inc();
                    let span = tracing::info_span!("download", %digest);
                    let result = this.download(digest, hint.as_ref(), &tx).instrument(span).await;
                    match &result {
                        Ok(_) => {
                            this.metrics.completed.inc();
                            let until = Instant::now() + this.settings.seed_time;
                            this.seeding.insert(digest, until);
                            this.cache.completed(digest, until);
                        }
                        Err(e) => {
                            this.metrics.failed.inc();
                            tracing::warn!(%digest, cause = %e, "download failed");
                        }
                    }
                    this.inflight.remove(&digest);
                    tx.send_replace(Phase::Done(result));
                });
                Some(rx)
            }
        }
    }

    /// Waits for a phase that satisfies `ready`.
    async fn wait(mut rx: watch::Receiver<Phase>, ready: fn(&Phase) -> bool) -> Phase {
        match rx.wait_for(ready).await {
            Ok(phase) => phase.clone(),
            Err(_) => Phase::Done(Err(DownloadError::Unavailable("download task ended".into()))),
        }
    }

    /// Returns once `digest` is in the local cache, downloading it if needed, with how to
    /// count its bytes. Concurrent callers share one download.
    pub async fn ensure(
        self: &Arc<Self>,
        digest: Digest,
        hint: Option<&Hint>,
    ) -> Result<Tally, DownloadError> {
        if self.store.size(&digest).await.is_some() {
            return Ok(Tally::Cache);
        }
        let Some(rx) = self.join(digest, hint) else { return Ok(Tally::Cache) };
        match Self::wait(rx, |p| matches!(p, Phase::Done(_))).await {
            Phase::Done(result) => result.map(Tally::Download),
            _ => Err(DownloadError::Unavailable("download task ended".into())),
        }
    }

    /// Like [`ensure`](Self::ensure), but returns as soon as the blob can be streamed.
    pub async fn fetch(
        self: &Arc<Self>,
        digest: Digest,
        hint: Option<&Hint>,
    ) -> Result<Fetched, DownloadError> {
        let mut looked = 0;
        let (rx, active) = loop {
            if self.store.size(&digest).await.is_some() {
                return Ok(Fetched::Cached(Tally::Cache));
            }
            let Some(rx) = self.join(digest, hint) else { return Ok(Fetched::Cached(Tally::Cache)) };
            let active = match Self::wait(rx.clone(), |p| !matches!(p, Phase::Starting)).await {
                Phase::Streaming(active) => active,
                Phase::Done(Ok(sources)) => return Ok(Fetched::Cached(Tally::Download(sources))),
                Phase::Done(Err(e)) => return Err(e),
                Phase::Starting => return Err(DownloadError::Unavailable("download task ended".into())),
            };
            // A download whose blob is committed already (and since dropped as damaged, or
            // the cache would have answered): wait for its end, then look again, which
            // starts a new one.
            if active.committed.load(std::sync::atomic::Ordering::Acquire) && looked < 2 {
                looked += 1;
                let _ = Self::wait(rx, |p| matches!(p, Phase::Done(_))).await;
                continue;
            }
            break (rx, active);
        };
        // Answer only once bytes are verified, so that a download that cannot start is a
        // clear error rather than a response cut short.
        let length = active.length();
        let verified = active
            .subscribe()
            .wait_for(|p| p.bytes > 0 || p.failed || length == 0)
            .await
            .is_ok_and(|p| !p.failed);
        if verified {
            return Ok(Fetched::Streaming(active));
        }
        match Self::wait(rx, |p| matches!(p, Phase::Done(_))).await {
            Phase::Done(Ok(sources)) => Ok(Fetched::Cached(Tally::Download(sources))),
            Phase::Done(Err(e)) => Err(e),
            _ => Err(DownloadError::Unavailable("download task ended".into())),
        }
    }

    /// Drops a cached blob found damaged on disk: it is deleted (the next request fetches
    /// it again from the swarm) and no longer announced, so the tracker forgets this agent
    /// as its seeder.
    /// `read` is the file the damage was found in: when the stored blob is no longer that
    /// file (a fresh copy replaced it meanwhile), nothing is removed.
    pub fn quarantine(&self, digest: Digest, read: &std::fs::File) {
        use std::os::unix::fs::MetadataExt as _;
        let stored = std::fs::metadata(self.store.blob_path(&digest)).ok().map(|m| (m.dev(), m.ino()));
        let damaged = read.metadata().ok().map(|m| (m.dev(), m.ino()));
        if stored.is_none() || stored != damaged {
            return;
        }
        self.seeding.remove(&digest);
        self.store.remove(&digest);
        self.cache.forget(&digest);
        self.metrics.damaged_blobs.inc();
        tracing::error!(%digest, "cached blob is damaged on disk; dropped, will be fetched again");
    }

    /// Stops seeding blobs the cache evicted and tells the trackers, so they stop listing
    /// this agent for them (in the background; a tracker that misses it lets the entries
    /// expire).
    pub fn evicted(&self, digests: Vec<Digest>) {
        if digests.is_empty() {
            return;
        }
        for d in &digests {
            self.seeding.remove(d);
        }
        let (tracker, peer) = (self.tracker.clone(), self.settings.me);
        self.spawn(async move {
            for chunk in digests.chunks(MAX_BATCH) {
                let leave = shoal_shared::client::Leave { peer, digests: chunk.to_vec() };
                if let Err(e) = tracker.leave(&leave).await {
                    tracing::warn!(cause = %e, blobs = chunk.len(), "leaving swarms failed");
                }
            }
        });
    }

    /// Evicts what the cache's TTL and watermarks say must go. Blocking.
    pub fn sweep_cache(&self) {
        let evicted = self.cache.sweep();
        self.evicted(evicted);
    }

    /// The digests of downloads in progress and of blobs seeding, for the status page.
    pub fn seeding(&self) -> Vec<(Digest, Duration)> {
        let now = Instant::now();
        self.seeding.iter().map(|e| (*e.key(), e.value().saturating_duration_since(now))).collect()
    }

    /// Announces, in one batched request per [`MAX_BATCH`] blobs, every blob still in its
    /// seeding period and every download in progress (whose loops get the peer lists back);
    /// returns the interval to wait.
    pub async fn announce_all(&self) -> Duration {
        self.metrics.peers.set(self.peers.connected() as i64);
        let now = Instant::now();
        self.seeding.retain(|_, until| *until > now);
        let seeded: Vec<Digest> = self.seeding.iter().map(|e| *e.key()).collect();
        let downloading: Vec<Digest> = self.active.iter().map(|e| *e.key()).collect();
        let mut interval = Duration::from_secs(10);
        let mut answered = false;
        for blobs in announce_batches(&seeded, &downloading) {
            let batch = AnnounceBatch { peer: self.settings.me, blobs };
            match self.tracker.announce_batch(&batch).await {
                Ok(resp) => {
                    // Every batch goes to the same trackers: the first answer sets the pace.
                    if !answered {
                        interval = Duration::from_secs(resp.interval.clamp(1, 300));
                        answered = true;
                    }
                    for swarm in resp.swarms {
                        let Some(active) = self.active.get(&swarm.digest).map(|a| a.clone()) else {
                            continue;
                        };
                        for peer in swarm.peers {
                            let _ = active.leads.try_send(peer);
                        }
                    }
                }
                Err(e) => tracing::warn!(cause = %e, blobs = batch.blobs.len(), "batched announce failed"),
            }
        }
        interval
    }

    async fn download(
        &self,
        digest: Digest,
        hint: Option<&Hint>,
        phase: &watch::Sender<Phase>,
    ) -> Result<Arc<Sources>, DownloadError> {
        let sourced = self.tracker.metainfo_sourced(digest, hint).await?;
        let (metainfo, pulled_through) = (sourced.metainfo, sourced.pulled_through);
        // Before any byte can be served: whom the blob may be served to (rewritten by every
        // download, so a blob's marker is what the cluster says of it now).
        crate::tenant::set_marker(&self.store, &digest, sourced.private.as_ref())
            .await
            .map_err(|e| DownloadError::Store(format!("private marker: {}", e.kind())))?;
        let started = Instant::now();
        // Room in the cache first: the whole blob is charged before a byte is fetched.
        let hold = {
            let cache = self.cache.clone();
            let length = metainfo.length();
            let admitted = tokio::task::spawn_blocking(move || cache.admit(digest, length))
                .await
                .map_err(|e| DownloadError::Store(e.to_string()))?;
            // A blob larger than the whole cache can never fit: that is the disk having no
            // room for it (507), not a cache momentarily full of blobs in use (503).
            let (hold, evicted) = admitted.map_err(|e| {
                if e.wanted > e.limit {
                    DownloadError::OutOfSpace
                } else {
                    DownloadError::CacheFull(e.to_string())
                }
            })?;
            self.evicted(evicted);
            hold
        };
        // Resumes what an earlier run left on disk; only pieces that verify count as held.
        let (partial, held) = match PartialBlob::open_or_create(&self.store, metainfo.clone()).await {
            Ok(opened) => opened,
            Err(e) => {
                drop(hold);
                self.cache.forget(&digest);
                return Err(store_err(e));
            }
        };
        let (leads, leads_rx) = tokio::sync::mpsc::channel(swarm::LEAD_QUEUE);
        let written = Written::default();
        // Before any piece is written: the sha256 task sees every one.
        let written_rx = written.subscribe();
        let active = Arc::new(Active {
            partial,
            leads,
            written,
            relays: if self.settings.cut_through {
                Relays::new(held.clone()).counting_held_back(self.metrics.held_back.clone())
            } else {
                Relays::whole_pieces(held.clone())
            },
            have: watch::Sender::new(held),
            // The swarm loop moves the prefix past the pieces already held before it fetches.
            prefix: watch::Sender::new(Prefix::default()),
            sources: Arc::new({
                let sources = Sources::new(metainfo.piece_length(), metainfo.piece_count());
                if pulled_through {
                    sources.from_upstream()
                } else {
                    sources
                }
            }),
            by_peer: Default::default(),
            started,
            committed: Default::default(),
            _hold: hold,
        });
        self.active.insert(digest, active.clone());
        self.metrics.active.inc();
        phase.send_replace(Phase::Streaming(active.clone()));
        let hasher = tokio::spawn(hash_along(active.clone(), written_rx));
        let result = async {
            let env = swarm::Env {
                peers: &self.peers,
                tracker: &self.tracker,
                settings: &self.settings,
                metrics: &self.metrics,
            };
            swarm::run(&env, &metainfo, &active, leads_rx).await?;
            let actual = hasher.await.map_err(|e| DownloadError::Store(e.to_string()))??;
            active.partial.commit_hashed(actual).await.map_err(store_err)?;
            active.committed.store(true, std::sync::atomic::Ordering::Release);
            Ok(())
        }
        .await;
        self.active.remove(&digest);
        self.metrics.active.dec();
        if let Err(e) = &result {
            active.prefix.send_modify(|p| p.failed = true);
            // A download that stalled or lost its peers keeps its verified pieces on disk:
            // the next request for the blob resumes from them (they are re-verified then).
            // A local storage failure starts over.
            if matches!(e, DownloadError::Store(_) | DownloadError::OutOfSpace) {
                active.partial.discard().await;
                self.cache.forget(&digest);
            }
        } else {
            let secs = started.elapsed().as_secs_f64();
            self.metrics.download_seconds.observe(secs);
            tracing::info!(%digest, bytes = metainfo.length(), secs, "download complete");
            let a = Announce { digest, peer: self.settings.me, complete: true };
            if let Err(e) = self.tracker.announce(&a).await {
                tracing::warn!(%digest, cause = %e, "completion announce failed");
            }
        }
        result.map(|()| active.sources.clone())
    }
}

/// Splits one tick's announce into batches the tracker accepts: at most [`MAX_BATCH`] blobs
/// each, of which at most [`MAX_BATCH_DOWNLOADING`] downloading. Every blob is in one batch;
/// downloads go first (their loops wait for the peer lists), seeded blobs fill the rest.
fn announce_batches(seeded: &[Digest], downloading: &[Digest]) -> Vec<Vec<BlobState>> {
    let mut batches = Vec::new();
    let mut downloading = downloading.iter().map(|&digest| BlobState { digest, complete: false });
    let mut seeded = seeded.iter().map(|&digest| BlobState { digest, complete: true });
    loop {
        let mut batch: Vec<BlobState> = downloading.by_ref().take(MAX_BATCH_DOWNLOADING).collect();
        let room = MAX_BATCH - batch.len();
        batch.extend(seeded.by_ref().take(room));
        if batch.is_empty() {
            return batches;
        }
        batches.push(batch);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    fn digests(range: std::ops::Range<u32>) -> Vec<Digest> {
        range.map(|i| Digest::of(&i.to_le_bytes())).collect()
    }

    #[test]
    fn every_blob_is_announced_in_batches_the_tracker_accepts() {
        assert!(announce_batches(&[], &[]).is_empty());

        let seeded = digests(0..2 * MAX_BATCH as u32 + 7);
        let downloading = digests(10_000..10_003);
        let batches = announce_batches(&seeded, &downloading);
        assert_eq!(batches.len(), 3);
        for batch in &batches {
            assert!(batch.len() <= MAX_BATCH);
            assert!(batch.iter().filter(|b| !b.complete).count() <= MAX_BATCH_DOWNLOADING);
        }
        // Downloads ride in the first batch.
        assert_eq!(batches[0].iter().filter(|b| !b.complete).count(), downloading.len());
        assert_eq!(batches[0].len(), MAX_BATCH);
        let all: Vec<BlobState> = batches.into_iter().flatten().collect();
        assert_eq!(all.len(), seeded.len() + downloading.len(), "each blob once");
        let complete: HashSet<Digest> = all.iter().filter(|b| b.complete).map(|b| b.digest).collect();
        let incomplete: HashSet<Digest> = all.iter().filter(|b| !b.complete).map(|b| b.digest).collect();
        assert_eq!(complete, seeded.into_iter().collect());
        assert_eq!(incomplete, downloading.into_iter().collect());

        // More downloads than one batch takes spill into the next, still within limits.
        let downloading = digests(0..MAX_BATCH_DOWNLOADING as u32 + 1);
        let batches = announce_batches(&digests(50_000..50_010), &downloading);
        assert_eq!(batches.len(), 2);
        assert_eq!(batches[0].iter().filter(|b| !b.complete).count(), MAX_BATCH_DOWNLOADING);
        assert_eq!(batches.iter().map(Vec::len).sum::<usize>(), downloading.len() + 10);
    }
}

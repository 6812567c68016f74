//! Pull-through from upstream registries (`shoal-origin serve --upstream URL`).
//!
//! Manifests are fetched when a tag is resolved and stored as if pushed; blobs are fetched
//! when the cluster first asks for their metainfo. One fetch per blob runs at a time in the
//! whole cluster: agents ask the tracker, the tracker asks the origin, and the origin keeps
//! one flight per digest; everyone else is told 202 (come back shortly) until the blob is
//! stored. The metainfo (every piece's blake3 hash) can only be made once the whole blob is
//! here, and agents verify every piece against it, so agents wait for the whole blob rather
//! than receiving unverifiable pieces as they arrive.
//!
//! The upstreams are [`Registry`] trait objects (the seam, `registry.rs`; real: the HTTP
//! client, `client.rs`); what is fetched is checked and stored by `fill.rs`, the same for
//! every implementation. `faults.rs` tests this module over an in-memory registry that fails
//! on demand (`memory.rs`); `tests.rs` over an in-process HTTP registry.

pub mod auth;
pub mod client;
pub mod credentials;
pub mod error;
mod fill;
pub mod registry;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use shoal_shared::digest::Digest;
use shoal_shared::hint::Hint;
use shoal_shared::oci::{Reference, DOCKER_LIST, OCI_INDEX};
use shoal_shared::store::BlobStore;
use shoal_shared::tenant::PrivateRepo;
use tokio::sync::watch;

use crate::private::PrivateMarks;
use crate::tags::TagStore;
pub use client::Upstream;
pub use error::UpstreamError;
use fill::Filler;
pub use registry::Registry;

/// How long a failed fetch is reported to pollers before a new request retries it.
const FAILURE_MEMORY: Duration = Duration::from_secs(10);
/// The pause before a blob fetch's second attempt; the n-th waits n times as long.
const BACKOFF: Duration = Duration::from_millis(500);
/// Most blob fetches running at once: a peer asking for many made-up digests must not turn
/// the origin into a request amplifier against the upstream.
const MAX_FLIGHTS: usize = 512;
/// Most failures remembered (least recently used out; each for at most
/// [`Timing::failure_memory`]).
const MAX_FAILURES: u64 = 10_000;
/// Most platform manifests fetched for one index.
const MAX_CHILDREN: usize = 256;

/// Pull-through settings from the origin's configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub urls: Vec<String>,
    pub auth_file: Option<PathBuf>,
    /// Where `docker-credential-*` helpers are looked for (`PATH` syntax); `None`: `PATH`.
    pub helper_path: Option<std::ffi::OsString>,
    pub ca_file: Option<PathBuf>,
    /// How long a pulled-through tag is served without asking the upstream.
    pub tag_ttl: Duration,
    /// An upstream request that makes no progress for this long is cancelled.
    pub stall: Duration,
    /// Attempts per blob fetch (stalls and transient errors are retried).
    pub attempts: u32,
}

/// How long things may take and are remembered: the configured ones from [`Settings`], the
/// others the constants of this module. Tests shorten them all.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// How long a pulled-through tag is served without asking the upstream.
    pub tag_ttl: Duration,
    /// A blob body that makes no progress for this long is cancelled (and each request of
    /// the HTTP client that does not answer).
    pub stall: Duration,
    /// Attempts per blob fetch (stalls and transient errors are retried).
    pub attempts: u32,
    /// The pause before a blob fetch's second attempt; the n-th waits n times as long.
    pub backoff: Duration,
    /// How long a failed blob fetch is reported before a new request retries it.
    pub failure_memory: Duration,
}

impl Timing {
    pub fn of(settings: &Settings) -> Self {
        Self {
            tag_ttl: settings.tag_ttl,
            stall: settings.stall,
            attempts: settings.attempts,
            backoff: BACKOFF,
            failure_memory: FAILURE_MEMORY,
        }
    }
}

/// A blob fetch in flight: turns `Some` when it ends.
pub type Flight = watch::Receiver<Option<Result<(), Arc<UpstreamError>>>>;

/// A blob fetch in flight and what it fetches under: the upstream and repository of the
/// first request for the digest.
#[derive(Debug)]
struct InFlight {
    rx: Flight,
    index: usize,
    name: String,
}

/// A remembered blob fetch failure is the failure of one digest from one repository of one
/// upstream: a request with a made-up repository name must not fail the digest for everyone.
type FailureKey = (Digest, usize, String);

/// A tag being resolved: upstream index, repository, tag.
type TagKey = (usize, String, String);

/// The last resolution of a tag: when it ended, and its outcome.
type TagOutcome = Option<(Instant, Result<Digest, Arc<UpstreamError>>)>;

/// Removes a tag's single-flight slot when the last lookup using it ends, even when the
/// lookup is cancelled (its future dropped).
struct TagTurn<'a> {
    resolving: &'a DashMap<TagKey, Arc<tokio::sync::Mutex<TagOutcome>>>,
    key: TagKey,
    slot: Arc<tokio::sync::Mutex<TagOutcome>>,
}

impl Drop for TagTurn<'_> {
    fn drop(&mut self) {
        // The map holds one reference and this turn another: no one else waits. Taken under
        // the shard lock, as `entry` is, so no new lookup can pick up a removed slot.
        self.resolving.remove_if(&self.key, |_, s| Arc::ptr_eq(s, &self.slot) && Arc::strong_count(s) <= 2);
    }
}

/// Owned by a blob fetch task: ends the flight when the task ends, however it ends (a panic
/// included), so the digest can be fetched again.
struct FlightGuard {
    flights: Arc<DashMap<Digest, InFlight>>,
    digest: Digest,
    rx: Flight,
    tx: watch::Sender<Option<Result<(), Arc<UpstreamError>>>>,
}

impl FlightGuard {
    /// Removes this flight (not a later one for the same digest) from the map.
    fn release(&self) {
        self.flights.remove_if(&self.digest, |_, f| f.rx.same_channel(&self.rx));
    }

    /// Ends the flight with `result`: the entry goes first, so a waiter that sees the end
    /// and asks again starts a new flight rather than joining this one.
    fn finish(self, result: Result<(), Arc<UpstreamError>>) {
        self.release();
        self.tx.send_replace(Some(result));
    }
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        // After `finish` a no-op; after a panic, the waiters see the sender gone.
        self.release();
    }
}

/// Where a blob stands.
#[derive(Debug)]
pub enum BlobState {
    Held,
    /// Being fetched.
    Pending(Flight),
    Failed(Arc<UpstreamError>),
}

/// The configured upstreams, their tag caches and the blob fetches in flight.
#[derive(Debug)]
pub struct Upstreams {
    list: Vec<Arc<dyn Registry>>,
    tags: Vec<TagStore>,
    store: BlobStore,
    /// Where fetched content goes: the store, the private marks, the piece length, the stall
    /// timeout and whom to tell.
    fill: Filler,
    timing: Timing,
    flights: Arc<DashMap<Digest, InFlight>>,
    /// One resolution per tag at a time, so a burst of cold pulls costs the upstream one
    /// HEAD and one manifest GET (Docker Hub counts manifest GETs against its rate limit);
    /// lookups that waited for a resolution take its outcome.
    resolving: DashMap<TagKey, Arc<tokio::sync::Mutex<TagOutcome>>>,
    failures: moka::sync::Cache<FailureKey, (Arc<UpstreamError>, Instant)>,
    /// The blob fetches' tasks: ended at shutdown (a fetch cut short leaves only a temp
    /// file, discarded when the store opens).
    tasks: shoal_shared::tasks::Tasks,
    /// Requests and bytes by upstream and outcome.
    pub metrics: crate::outcomes::UpstreamMetrics,
}

impl Upstreams {
    /// Builds the HTTP client (custom CA if any) and loads credentials; errors name the
    /// file, never its content.
    pub fn new(settings: &Settings, store: &BlobStore, piece_length: u32) -> Result<Self, String> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(settings.stall.min(Duration::from_secs(10)))
            .pool_idle_timeout(Duration::from_secs(60))
            .user_agent(concat!("shoal-origin/", env!("CARGO_PKG_VERSION")));
        if let Some(ca) = &settings.ca_file {
            let pem = std::fs::read(ca).map_err(|e| format!("{}: {e}", ca.display()))?;
            for cert in
                reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| format!("{}: {e}", ca.display()))?
            {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder.build().map_err(|e| format!("upstream HTTP client: {e}"))?;
        let creds = match &settings.auth_file {
            Some(path) => auth::load_docker_config(path).map_err(|e| e.to_string())?,
            None => auth::DockerConfig::default(),
        };
        let helpers = Arc::new(credentials::Helpers::new(settings.helper_path.clone()));
        let mut list: Vec<Arc<dyn Registry>> = Vec::new();
        for url in &settings.urls {
            let up = Upstream::new(url, http.clone(), None, settings.stall)?;
            let keychain = creds.source(&up.host).map(|s| credentials::Keychain::new(s, &helpers));
            list.push(Arc::new(Upstream::new(url, http.clone(), keychain, settings.stall)?));
        }
        Ok(Self::over(list, store, piece_length, Timing::of(settings)))
    }

    /// Pull-through from `list`, whatever implements [`Registry`] (the HTTP client in
    /// [`new`](Self::new); fault-injecting registries in tests).
    pub fn over(list: Vec<Arc<dyn Registry>>, store: &BlobStore, piece_length: u32, timing: Timing) -> Self {
        // `host[:port]` is a safe path component once ':' is replaced.
        let tags = list
            .iter()
            .map(|up| TagStore::in_dir(store, &format!("upstream-tags/{}", up.host().replace(':', "_"))))
            .collect();
        let fill = Filler {
            store: store.clone(),
            marks: PrivateMarks::new(store),
            piece_length,
            stall: timing.stall,
            filled: None,
        };
        Self {
            list,
            tags,
            store: store.clone(),
            fill,
            timing: Timing { attempts: timing.attempts.max(1), ..timing },
            flights: Arc::new(DashMap::new()),
            resolving: DashMap::new(),
            failures: moka::sync::Cache::builder()
                .max_capacity(MAX_FAILURES)
                .time_to_live(timing.failure_memory)
                .build(),
            tasks: shoal_shared::tasks::Tasks::new(),
            metrics: Default::default(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The upstream `ns` names; without `ns`, the first one.
    pub fn select(&self, ns: Option<&str>) -> Result<usize, UpstreamError> {
        match ns {
            Some(ns) => self
                .list
                .iter()
                .position(|u| u.serves(ns))
                .ok_or_else(|| UpstreamError::UnknownRegistry(ns.to_owned())),
            None if self.list.is_empty() => Err(UpstreamError::UnknownRegistry("(none)".into())),
            None => Ok(0),
        }
    }

    fn held(&self, digest: &Digest) -> bool {
        self.store.blob_path(digest).exists()
    }

    /// Whether the origin holds `digest` on disk or in its durable store (filling the disk
    /// from the store): a pulled-through manifest survives the loss of the local disk.
    async fn held_anywhere(&self, digest: &Digest) -> bool {
        self.store.size(digest).await.is_some()
    }

    /// Resolves `name:tag` at upstream `index`: from the tag cache while it is younger than
    /// the TTL, else with a HEAD (and a GET when it changed); when the upstream is down or
    /// busy (unreachable, 5xx, 429, stalled), the cached answer however old.
    ///
    /// One resolution per tag runs at a time; a lookup that arrives while one runs takes its
    /// outcome, so a burst of lookups against a failing or stalling upstream costs one
    /// upstream request and one stall timeout, not one per lookup.
    pub async fn resolve_tag(
        &self,
        index: usize,
        name: &str,
        tag: &str,
    ) -> Result<Digest, Arc<UpstreamError>> {
        let key = (index, name.to_owned(), tag.to_owned());
        let slot = self.resolving.entry(key.clone()).or_default().clone();
        let turn = TagTurn { resolving: &self.resolving, key, slot };
        let arrived = Instant::now();
        let mut last = turn.slot.lock().await;
        if let Some((ended, outcome)) = &*last {
            if *ended >= arrived {
                return outcome.clone();
            }
        }
        let outcome = self.resolve_tag_now(index, name, tag).await.map_err(Arc::new);
        *last = Some((Instant::now(), outcome.clone()));
        outcome
    }

    async fn resolve_tag_now(&self, index: usize, name: &str, tag: &str) -> Result<Digest, UpstreamError> {
        let (up, tags) = (&self.list[index], &self.tags[index]);
        let cached = match tags.get_with_age(name, tag).await {
            Some((d, age)) if self.held_anywhere(&d).await => Some((d, age)),
            _ => None,
        };
        if let Some((digest, age)) = cached {
            if age < self.timing.tag_ttl {
                return Ok(digest);
            }
        }
        let fresh = async {
            match up.head_manifest(name, tag).await? {
                Some(d) if cached.is_some_and(|(c, _)| c == d) => Ok(d),
                _ => self.pull_manifest(index, name, &Reference::Tag(tag.to_owned())).await,
            }
        }
        .await;
        match (fresh, cached) {
            (Ok(digest), _) => {
                privacy(up.as_ref(), &self.fill.marks, name).await;
                if let Err(e) = tags.put(name, tag, &digest).await {
                    tracing::warn!(cause = %e, "cannot write pulled-through tag");
                }
                Ok(digest)
            }
            (Err(e), Some((digest, _))) if e.transient() => {
                tracing::warn!(upstream = %up.host(), %name, %tag, cause = %e, "upstream failing: serving the cached tag");
                Ok(digest)
            }
            (Err(e), _) => Err(e),
        }
    }

    /// Fetches a manifest (by tag or digest) and stores it; for an index, every platform's
    /// manifest too, so each is reachable by digest.
    pub async fn pull_manifest(
        &self,
        index: usize,
        name: &str,
        reference: &Reference,
    ) -> Result<Digest, UpstreamError> {
        let up = &self.list[index];
        let got = fill::manifest(up.as_ref(), name, &reference.to_string()).await;
        self.metrics.request(up.host(), "manifest", got.is_ok());
        let (body, digest) = got?;
        if let Reference::Digest(want) = reference {
            if *want != digest {
                return Err(UpstreamError::Invalid(format!(
                    "{}: manifest {want} has digest {digest}",
                    up.host()
                )));
            }
        }
        let private = privacy(up.as_ref(), &self.fill.marks, name).await;
        let children = child_manifests(&body);
        for child in children.iter().take(MAX_CHILDREN) {
            if self.held_anywhere(child).await {
                continue;
            }
            let got = fill::manifest(up.as_ref(), name, &child.to_string()).await;
            self.metrics.request(up.host(), "manifest", got.is_ok());
            let (child_body, child_digest) = got?;
            if child_digest != *child {
                return Err(UpstreamError::Invalid(format!(
                    "{}: manifest {child} has digest {child_digest}",
                    up.host()
                )));
            }
            self.fill.put(&child_body, &child_digest, private.as_ref()).await?;
        }
        self.fill.put(&body, &digest, private.as_ref()).await?;
        tracing::info!(upstream = %up.host(), %name, %reference, %digest, "manifest pulled through");
        Ok(digest)
    }

    /// Ends the blob fetches in flight and waits for them, at most `within`; returns whether
    /// all ended in time.
    pub async fn shutdown(&self, within: Duration) -> bool {
        self.tasks.shutdown(within).await
    }

    /// Tells `filled` of every blob and manifest stored from an upstream from now on.
    pub fn notify_fills(&mut self, filled: tokio::sync::mpsc::Sender<Digest>) {
        self.fill.filled = Some(filled);
    }

    /// Where blob `digest` stands; starts its fetch from the upstream `hint` names unless one
    /// runs already or one from the same repository of the same upstream failed within the
    /// last [`Timing::failure_memory`].
    pub fn blob(&self, digest: Digest, hint: &Hint) -> BlobState {
        self.blob_state(digest, hint).0
    }

    /// [`blob`](Self::blob), and for a flight, whether it runs under `hint`'s upstream and
    /// repository (a flight started by another request may run under another name).
    fn blob_state(&self, digest: Digest, hint: &Hint) -> (BlobState, bool) {
        if self.held(&digest) {
            return (BlobState::Held, true);
        }
        let index = match self.select(hint.ns.as_deref()) {
            Ok(i) => i,
            Err(e) => return (BlobState::Failed(Arc::new(e)), true),
        };
        let key: FailureKey = (digest, index, hint.name.clone());
        if let Some(f) = self.failures.get(&key) {
            if f.1.elapsed() < self.timing.failure_memory {
                return (BlobState::Failed(f.0.clone()), true);
            }
        }
        // Counted before taking the entry: `len` locks every shard, the entry holds one.
        let busy = self.flights.len() >= MAX_FLIGHTS;
        match self.flights.entry(digest) {
            dashmap::mapref::entry::Entry::Occupied(e) => {
                let f = e.get();
                (BlobState::Pending(f.rx.clone()), f.index == index && f.name == hint.name)
            }
            dashmap::mapref::entry::Entry::Vacant(v) => {
                // The flight may have ended since the first look.
                if self.held(&digest) {
                    return (BlobState::Held, true);
                }
                if busy {
                    return (BlobState::Failed(Arc::new(UpstreamError::Busy)), true);
                }
                let (tx, rx): (_, Flight) = watch::channel(None);
                v.insert(InFlight { rx: rx.clone(), index, name: hint.name.clone() });
                self.failures.invalidate(&key);
                let guard = FlightGuard { flights: self.flights.clone(), digest, rx: rx.clone(), tx };
                let (up, fill, name) = (self.list[index].clone(), self.fill.clone(), hint.name.clone());
                let failures = self.failures.clone();
                let metrics = self.metrics.clone();
                let (attempts, backoff) = (self.timing.attempts, self.timing.backoff);
                let fetch = async move {
                    let started = Instant::now();
                    let mut attempt = 1;
                    let result = loop {
                        let fetched = fill.blob(up.as_ref(), &name, &digest).await;
                        metrics.request(up.host(), "blob", fetched.is_ok());
                        match fetched {
                            Ok(bytes) => break Ok(bytes),
                            Err(e) if e.transient() && attempt < attempts => {
                                tracing::warn!(upstream = %up.host(), %digest, attempt, cause = %e, "upstream fetch failed, retrying");
                                tokio::time::sleep(backoff * attempt).await;
                                attempt += 1;
                            }
                            Err(e) => break Err(Arc::new(e)),
                        }
                    };
                    let result = match result {
                        Ok(bytes) => {
                            let host = crate::outcomes::HostLabel { upstream: up.host().to_owned() };
                            metrics.bytes.get_or_create(&host).inc_by(bytes);
                            let secs = started.elapsed().as_secs_f64();
                            tracing::info!(upstream = %up.host(), %name, %digest, bytes, secs, "blob pulled through");
                            Ok(())
                        }
                        Err(e) => {
                            tracing::warn!(upstream = %up.host(), %name, %digest, cause = %e, "blob pull-through failed");
                            failures.insert(key, (e.clone(), Instant::now()));
                            Err(e)
                        }
                    };
                    guard.finish(result);
                };
                self.tasks.spawn(fetch);
                (BlobState::Pending(rx), true)
            }
        }
    }

    /// Fetches blob `digest` (or joins its fetch) and waits for the end. When the fetch it
    /// joined ran under another repository or upstream and failed, tries once under its own.
    pub async fn wait_blob(&self, digest: Digest, hint: &Hint) -> Result<(), Arc<UpstreamError>> {
        let mut retried = false;
        loop {
            let (state, own) = self.blob_state(digest, hint);
            let mut rx = match state {
                BlobState::Held => return Ok(()),
                BlobState::Failed(e) => return Err(e),
                BlobState::Pending(rx) => rx,
            };
            let result = match rx.wait_for(Option::is_some).await {
                Ok(r) => r.clone().unwrap_or(Ok(())),
                Err(_) => Err(Arc::new(UpstreamError::Unreachable("fetch task ended".into()))),
            };
            match result {
                Err(_) if !own && !retried => retried = true,
                r => return r,
            }
        }
    }
}

/// The private repository `name` of `up` is, if it is one: learned from the upstream since
/// this process started (then recorded durably) or recorded before.
pub async fn privacy(up: &dyn Registry, marks: &PrivateMarks, name: &str) -> Option<PrivateRepo> {
    let repo = PrivateRepo::new(up.host(), name).ok()?;
    if up.learned_private(name) {
        if !marks.repo_is_private(&repo).await {
            tracing::info!(upstream = %up.host(), %name, "private repository: served only to clients the upstream accepts");
            marks.mark_repo(&repo).await;
        }
        return Some(repo);
    }
    marks.repo_is_private(&repo).await.then_some(repo)
}

/// The platform manifests an index lists; nothing for a manifest.
pub fn child_manifests(body: &[u8]) -> Vec<Digest> {
    match shoal_shared::oci::manifest_media_type(body).as_deref() {
        Some(OCI_INDEX) | Some(DOCKER_LIST) => {
            shoal_shared::oci::manifest_references(body).unwrap_or_default()
        }
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod faults;
#[cfg(test)]
mod memory;
#[cfg(test)]
mod tests;

//! Origins as a cluster: every origin knows the members, a blob's owners are the first
//! `--replicas` healthy members by rendezvous hashing of its digest (a tag's, of its
//! repository name), writes land on every healthy owner before they are acknowledged, reads
//! of what this origin does not hold are forwarded once to an owner, and a repair pass copies
//! what this origin holds to owners that lack it.
//!
//! [`Cluster`] owns the membership and each member's health. Health is active (a `/healthz`
//! probe every [`PROBE_EVERY`]; [`FAILS_TO_DOWN`] failures mark a member down,
//! [`PASSES_TO_UP`] passes bring it back) and passive (a failed request marks it down at
//! once). Requests between origins carry [`HOP_HEADER`]; a request that carries it is
//! answered from local state only and never forwarded or replicated again, so members that
//! disagree about the membership cannot make a request loop.
//!
//! Members written `https://` are other origins' internal listeners (`crate::internal`):
//! they are called with this origin's certificate and must present an origin certificate of
//! the cluster, and the upload token is not sent. Members written `http://` are public
//! ports, called with the upload token as before (and warned about at start).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use actix_web::http::header;
use actix_web::HttpRequest;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use shoal_shared::digest::Digest;
use shoal_shared::ring::{self, Member, RingKey};
use shoal_shared::store::BlobStore;
use tokio_util::sync::CancellationToken;

use crate::tags::TagStore;

mod handoff;
use handoff::Handoff;

/// Whether `member` is an internal listener (called with mutual TLS, not the token).
fn internal(member: &str) -> bool {
    member.starts_with("https://")
}

/// Marks a request between origins: answer it from local state, never pass it on.
pub const HOP_HEADER: &str = "X-Shoal-Hop";
/// How often every other member's `/healthz` is probed.
pub const PROBE_EVERY: Duration = Duration::from_secs(2);
/// Consecutive failed probes before a member is down.
const FAILS_TO_DOWN: u32 = 2;
/// Consecutive passed probes before a down member is up again.
const PASSES_TO_UP: u32 = 2;
/// Timeout of a health probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// How often the repair pass runs.
pub const REPAIR_EVERY: Duration = Duration::from_secs(10);
/// Repository name under which blobs are copied between origins (blobs are content
/// addressed: any name reaches the same store).
const REPLICA_REPO: &str = "shoal/replica";

use shoal_shared::members::{Members, RESOLVE_EVERY};

/// The cluster's settings (`--cluster`, `--self`, `--replicas`, `--ring-key`).
#[derive(Debug, Clone)]
pub struct Settings {
    /// Every origin's base URL, this one included, written the same on every member; or
    /// `dns:NAME:PORT`, every address of a name (a Kubernetes headless Service) as
    /// `http://IP:PORT`, resolved again every [`RESOLVE_EVERY`]. A URL may carry a weight
    /// (`#weight=N`): the member owns a share of blobs proportional to it.
    pub members: Vec<String>,
    /// This origin's base URL as the others list it.
    pub me: String,
    pub replicas: usize,
    pub key: RingKey,
    /// The upload token, sent on writes to other members.
    pub token: Option<String>,
    /// How long a copy this origin no longer owns is kept (`--handoff-grace`).
    pub handoff_grace: Duration,
    /// This origin's control-plane certificate: `https://` members (their internal
    /// listeners) are called with it and must present an origin certificate of the cluster.
    pub tls: Option<shoal_shared::tls::http::HttpTls>,
}

#[derive(Debug, Clone, Copy)]
struct Health {
    up: bool,
    fails: u32,
    passes: u32,
}

impl Default for Health {
    fn default() -> Self {
        Self { up: true, fails: 0, passes: 0 }
    }
}

/// Counters of the cluster (`shoal_origin_cluster_*`).
#[derive(Debug, Default, Clone)]
pub struct ClusterMetrics {
    pub replicated: Counter,
    pub replication_failures: Counter,
    pub forwarded: Counter,
    pub repaired: Counter,
    pub repair_backlog: Gauge,
    pub members_up: Gauge,
    pub handed_off: Counter,
    pub unowned: Gauge,
}

impl ClusterMetrics {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("shoal_origin_cluster");
        r.register(
            "replicated",
            "Blobs, manifests and tags copied to another owner on write",
            self.replicated.clone(),
        );
        r.register(
            "replication_failures",
            "Copies to another owner that failed (repaired later)",
            self.replication_failures.clone(),
        );
        r.register("forwarded", "Reads forwarded to an owner", self.forwarded.clone());
        r.register("repaired", "Copies made by the repair pass", self.repaired.clone());
        r.register(
            "repair_backlog",
            "Copies the last repair pass found missing and has not made yet",
            self.repair_backlog.clone(),
        );
        r.register("members_up", "Members (this one included) currently healthy", self.members_up.clone());
        r.register(
            "handed_off",
            "Local copies of blobs this origin no longer owns, dropped after the handoff grace",
            self.handed_off.clone(),
        );
        r.register("unowned", "Blobs held here that this origin does not own", self.unowned.clone());
    }
}

/// The membership, health and the calls between origins.
#[derive(Debug)]
pub struct Cluster {
    /// The members now (what `--cluster` said, `dns:` names resolved), sorted by id.
    members: Members,
    me: String,
    replicas: usize,
    key: RingKey,
    token: Option<String>,
    health: Mutex<HashMap<String, Health>>,
    http: reqwest::Client,
    handoff: Handoff,
    /// Membership or some member's health changed since the last repair pass: run one now.
    changed: std::sync::atomic::AtomicBool,
    pub metrics: ClusterMetrics,
}

/// Why a cluster could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("--self {0} is not among the --cluster members")]
    NotAMember(String),
    #[error("--replicas must be at least 1")]
    NoReplicas,
    #[error("--cluster {0}: expected a base URL or dns:NAME:PORT")]
    BadMember(String),
    #[error("{0} listens on every address: give --self URL, this origin's URL as the others reach it")]
    NoSelf(std::net::SocketAddr),
    #[error("--cluster member {0} is https:// but this origin has no control-plane certificate")]
    NoTls(String),
    #[error(transparent)]
    Tls(#[from] shoal_shared::tls::TlsError),
}

impl Cluster {
    pub fn new(settings: Settings) -> Result<Self, ClusterError> {
        if settings.replicas == 0 {
            return Err(ClusterError::NoReplicas);
        }
        let me = shoal_shared::members::normalize(&settings.me);
        let members = Members::new(&settings.members, Some(&me)).map_err(|e| ClusterError::BadMember(e.0))?;
        // Named members must include this origin; `dns:` ones are checked once resolved.
        if members.all_named() && !members.names(&me) {
            return Err(ClusterError::NotAMember(me));
        }
        let builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(300));
        // https:// members are internal listeners: mutual TLS, origin certificates only.
        let http = match &settings.tls {
            Some(tls) => {
                shoal_shared::tls::http::mtls_client(tls, &[shoal_shared::tls::Role::Origin], builder)?
            }
            None => match settings.members.iter().find(|m| m.starts_with("https://")) {
                Some(m) => return Err(ClusterError::NoTls(m.clone())),
                None => builder.build().unwrap_or_default(),
            },
        };
        let plain: Vec<&String> = settings.members.iter().filter(|m| m.starts_with("http://")).collect();
        if !plain.is_empty() {
            tracing::warn!(
                members = ?plain,
                "ring members on plain HTTP: calls between origins are authenticated by the upload \
                 token only; list the members' internal listeners (https://, --internal) instead"
            );
        }
        let cluster = Self {
            members,
            me,
            replicas: settings.replicas,
            key: settings.key,
            token: settings.token,
            health: Mutex::new(HashMap::new()),
            http,
            handoff: Handoff::new(settings.handoff_grace),
            changed: std::sync::atomic::AtomicBool::new(false),
            metrics: ClusterMetrics::default(),
        };
        cluster.publish_up();
        Ok(cluster)
    }

    fn health(&self) -> MutexGuard<'_, HashMap<String, Health>> {
        self.health.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn snapshot(&self) -> Vec<Member> {
        self.members.snapshot()
    }

    fn is_up(&self, member: &str) -> bool {
        member == self.me || self.health().get(member).is_none_or(|h| h.up)
    }

    /// This origin's base URL.
    pub fn me(&self) -> &str {
        &self.me
    }

    /// Every member with its health, for the status page.
    pub fn members(&self) -> Vec<(String, bool)> {
        self.snapshot().into_iter().map(|m| (m.id.clone(), self.is_up(&m.id))).collect()
    }

    /// The healthy owners of `item` (a digest's bytes or a repository name), best first.
    fn owners_of(&self, item: &[u8]) -> Vec<String> {
        let members = self.snapshot();
        ring::owners(&self.key, &members, item, self.replicas, |i| self.is_up(&members[i].id))
            .into_iter()
            .map(|i| members[i].id.clone())
            .collect()
    }

    /// The owners of a blob.
    pub fn blob_owners(&self, digest: &Digest) -> Vec<String> {
        self.owners_of(digest.to_string().as_bytes())
    }

    /// The owners of a repository's tags.
    pub fn repo_owners(&self, name: &str) -> Vec<String> {
        self.owners_of(name.as_bytes())
    }

    /// Whether this origin owns `digest`.
    pub fn owns_blob(&self, digest: &Digest) -> bool {
        self.blob_owners(digest).contains(&self.me)
    }

    /// A failed request to `member`: it is down until its probes pass again.
    fn suspect(&self, member: &str) {
        if member == self.me {
            return;
        }
        let mut health = self.health();
        let h = health.entry(member.to_owned()).or_default();
        if h.up {
            tracing::warn!(%member, "origin marked down after a failed request");
            self.note_change();
        }
        *h = Health { up: false, fails: FAILS_TO_DOWN, passes: 0 };
        drop(health);
        self.publish_up();
    }

    fn note_change(&self) {
        self.changed.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether membership or health changed since the last call.
    fn take_change(&self) -> bool {
        self.changed.swap(false, std::sync::atomic::Ordering::Relaxed)
    }

    fn publish_up(&self) {
        let up = self.snapshot().iter().filter(|m| self.is_up(&m.id)).count();
        self.metrics.members_up.set(up as i64);
    }

    /// Resolves the `dns:` members again (every address of each name, as
    /// `http://IP:PORT`); named members and this origin stay. A name that does not resolve
    /// keeps the last membership.
    pub async fn resolve(&self) {
        if self.members.resolve().await {
            self.note_change();
        }
        self.publish_up();
    }

    /// Whether `req` came from another origin (answer it from local state only).
    pub fn is_hop(req: &HttpRequest) -> bool {
        req.headers().contains_key(HOP_HEADER)
    }

    /// A request to `member` with the hop header and its credentials: over an internal
    /// listener (`https://`) this origin's certificate, which the client presents; over
    /// plain HTTP the upload token (never sent to an internal listener, which ignores it).
    fn authorized(&self, member: &str, builder: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        let builder = builder.header(HOP_HEADER, self.me());
        match &self.token {
            Some(t) if !internal(member) => builder.bearer_auth(t),
            _ => builder,
        }
    }

    /// Probes every other member once and updates their health.
    pub async fn probe_all(&self) {
        let others: Vec<String> =
            self.snapshot().into_iter().map(|m| m.id).filter(|m| *m != self.me).collect();
        let probes = others.into_iter().map(|m| {
            let req = self.http.get(format!("{m}/healthz")).timeout(PROBE_TIMEOUT).send();
            async move { (m, matches!(req.await, Ok(r) if r.status().is_success())) }
        });
        for (m, passed) in futures_util::future::join_all(probes).await {
            let mut health = self.health();
            let h = health.entry(m.clone()).or_default();
            if passed {
                h.fails = 0;
                h.passes += 1;
                if !h.up && h.passes >= PASSES_TO_UP {
                    h.up = true;
                    tracing::info!(member = %m, "origin back up");
                    self.note_change();
                }
            } else {
                h.passes = 0;
                h.fails += 1;
                if h.up && h.fails >= FAILS_TO_DOWN {
                    h.up = false;
                    tracing::warn!(member = %m, "origin down (health probes failed)");
                    self.note_change();
                }
            }
        }
        self.publish_up();
    }

    /// Copies blob `digest` from `store` to `member` unless it holds it already.
    async fn copy_blob(&self, store: &BlobStore, digest: &Digest, member: &str) -> Result<bool, String> {
        let base = member;
        let head = format!("{base}/v2/{REPLICA_REPO}/blobs/{digest}");
        match self.authorized(member, self.http.head(&head)).send().await {
            Ok(r) if r.status().is_success() => return Ok(false),
            Ok(_) => {}
            Err(e) => return Err(format!("{head}: {e}")),
        }
        let path = store.blob_path(digest);
        let file = tokio::fs::File::open(&path).await.map_err(|e| format!("{digest}: {e}"))?;
        let len = file.metadata().await.map_err(|e| format!("{digest}: {e}"))?.len();
        let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::with_capacity(file, 1 << 20));
        let url = format!("{base}/v2/{REPLICA_REPO}/blobs/uploads/?digest={digest}");
        let mut req = self.authorized(member, self.http.post(&url));
        if crate::retention::is_pulled(store, digest).await {
            req = req.header(shoal_shared::client::PULLED_THROUGH_HEADER, "1");
        }
        if let Some(repo) = crate::private::PrivateMarks::new(store).blob(digest).await {
            req = req.header(shoal_shared::tenant::PRIVATE_HEADER, repo.to_string());
        }
        let resp = req
            .header(header::CONTENT_LENGTH.as_str(), len)
            .header(header::CONTENT_TYPE.as_str(), "application/octet-stream")
            .body(body)
            .send()
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        if resp.status().is_success() {
            Ok(true)
        } else {
            Err(format!("{url}: {}", resp.status()))
        }
    }

    /// Copies a manifest (and with `tag`, the tag) to `member`.
    async fn copy_manifest(
        &self,
        name: &str,
        reference: &str,
        body: &[u8],
        media_type: &str,
        member: &str,
    ) -> Result<(), String> {
        let url = format!("{member}/v2/{name}/manifests/{reference}");
        let resp = self
            .authorized(member, self.http.put(&url))
            .header(header::CONTENT_TYPE.as_str(), media_type)
            .body(body.to_vec())
            .send()
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(format!("{url}: {}", resp.status()))
        }
    }

    /// Writes blob `digest` (just stored here) to its other healthy owners, before the push
    /// is answered. An owner that fails is marked down and its place goes to the next member
    /// on the ring, once; what is still missing is left to the repair pass.
    pub async fn replicate_blob(&self, store: &BlobStore, digest: &Digest) {
        let mut tried: Vec<String> = Vec::new();
        for _ in 0..2 {
            let targets: Vec<String> = self
                .blob_owners(digest)
                .into_iter()
                .filter(|m| *m != self.me && !tried.contains(m))
                .collect();
            if targets.is_empty() {
                return;
            }
            let copies = targets.into_iter().map(|m| async move {
                let result = self.copy_blob(store, digest, &m).await;
                (m, result)
            });
            let mut failed = false;
            for (m, result) in futures_util::future::join_all(copies).await {
                match result {
                    Ok(copied) => {
                        if copied {
                            self.metrics.replicated.inc();
                        }
                    }
                    Err(e) => {
                        tracing::warn!(%digest, cause = %e, "replicating a blob failed");
                        self.metrics.replication_failures.inc();
                        self.suspect(&m);
                        failed = true;
                    }
                }
                tried.push(m);
            }
            if !failed {
                return;
            }
        }
    }

    /// Writes a manifest, and its tag, to the other healthy owners of the digest and of the
    /// repository, before the push is answered.
    pub async fn replicate_manifest(
        &self,
        name: &str,
        reference: &str,
        digest: &Digest,
        body: &[u8],
        media_type: &str,
    ) {
        let mut targets = self.blob_owners(digest);
        for m in self.repo_owners(name) {
            if !targets.contains(&m) {
                targets.push(m);
            }
        }
        targets.retain(|m| *m != self.me);
        let copies = targets.into_iter().map(|m| async move {
            let result = self.copy_manifest(name, reference, body, media_type, &m).await;
            (m, result)
        });
        for (m, result) in futures_util::future::join_all(copies).await {
            match result {
                Ok(()) => {
                    self.metrics.replicated.inc();
                }
                Err(e) => {
                    tracing::warn!(%name, %reference, cause = %e, "replicating a manifest failed");
                    self.metrics.replication_failures.inc();
                    self.suspect(&m);
                }
            }
        }
    }

    /// Sends a deletion (`DELETE <path>`, `/v2/...`) to every other healthy member, not only
    /// the owners: a copy held by a former owner would otherwise come back with the next
    /// repair pass. A member that answers 404 had nothing to delete; one that fails is marked
    /// down (a member down during the deletion keeps its copy, see docs/ARCHITECTURE.md).
    pub async fn replicate_delete(&self, path: &str) {
        let members: Vec<String> =
            self.snapshot().into_iter().map(|m| m.id).filter(|m| *m != self.me && self.is_up(m)).collect();
        let deletes = members.into_iter().map(|m| async move {
            let url = format!("{m}{path}");
            let result = self.authorized(&m, self.http.delete(&url)).send().await;
            (m, url, result)
        });
        for (m, url, result) in futures_util::future::join_all(deletes).await {
            match result {
                Ok(r) if r.status().is_success() || r.status() == reqwest::StatusCode::NOT_FOUND => {}
                Ok(r) => tracing::warn!(%url, status = %r.status(), "a member refused a deletion"),
                Err(e) => {
                    tracing::warn!(%url, cause = %e, "replicating a deletion failed");
                    self.suspect(&m);
                }
            }
        }
    }

    /// Forwards a read this origin cannot answer to the owners of `item`, in order; the first
    /// answer that is not a 404 (or a transport failure) is returned. `path_and_query` starts
    /// with `/v2/`.
    pub async fn forward(
        &self,
        method: &actix_web::http::Method,
        path_and_query: &str,
        item: &[u8],
        headers: &actix_web::http::header::HeaderMap,
        with_token: bool,
    ) -> Option<reqwest::Response> {
        let method = reqwest::Method::from_bytes(method.as_str().as_bytes()).ok()?;
        for m in self.owners_of(item).into_iter().filter(|m| *m != self.me) {
            let url = format!("{m}{path_and_query}");
            // The token (over an internal listener, this member's word for it) travels only
            // when the client gave it: forwarding never lets a caller without it make an
            // owner pull from an upstream.
            let mut req = self.http.request(method.clone(), &url).header(HOP_HEADER, self.me());
            match (with_token, &self.token) {
                (true, _) if internal(&m) => req = req.header(crate::internal::MAY_FETCH_HEADER, "1"),
                (true, Some(t)) => req = req.bearer_auth(t),
                _ => {}
            }
            for name in [header::RANGE, header::ACCEPT] {
                if let Some(v) = headers.get(&name).and_then(|v| v.to_str().ok()) {
                    req = req.header(name.as_str(), v);
                }
            }
            match req.send().await {
                Ok(r) if r.status() == reqwest::StatusCode::NOT_FOUND => continue,
                Ok(r) => {
                    self.metrics.forwarded.inc();
                    return Some(r);
                }
                Err(e) => {
                    tracing::warn!(%url, cause = %e, "forwarding to an owner failed");
                    self.suspect(&m);
                }
            }
        }
        None
    }

    /// One repair pass: every blob and tag this origin holds is copied to each healthy owner
    /// that lacks it, one copy at a time (throttled by construction), and the local copy of
    /// a blob this origin has not owned for the handoff grace is dropped once every owner
    /// holds it. Returns copies made.
    pub async fn repair(&self, store: &BlobStore, tags: &TagStore, data: &Path) -> usize {
        let usage = {
            let store = store.clone();
            tokio::task::spawn_blocking(move || store.usage())
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default()
        };
        let blobs: Vec<Digest> = usage.into_iter().filter(|u| u.complete).map(|u| u.digest).collect();
        let mut work: Vec<(Digest, Vec<String>)> = Vec::new();
        for d in &blobs {
            let others: Vec<String> = self.blob_owners(d).into_iter().filter(|m| *m != self.me).collect();
            if !others.is_empty() {
                work.push((*d, others));
            }
        }
        self.handoff.note(&blobs, |d| self.owns_blob(d) || self.nominal_owner(d));
        self.metrics.unowned.set(self.handoff.len() as i64);
        let tag_files = {
            let root = data.join("tags");
            tokio::task::spawn_blocking(move || crate::tags::list_tag_files(&root)).await.unwrap_or_default()
        };
        let mut tag_work = Vec::new();
        for (name, tag) in tag_files {
            for m in self.repo_owners(&name).into_iter().filter(|m| *m != self.me) {
                tag_work.push((name.clone(), tag.clone(), m));
            }
        }
        let copies: usize = work.iter().map(|(_, m)| m.len()).sum();
        self.metrics.repair_backlog.set((copies + tag_work.len()) as i64);
        let mut copied = 0;
        for (digest, owners) in work {
            // Every owner confirmed to hold it (already, or by this copy).
            let mut all_hold = owners.len() >= self.replicas;
            for m in owners {
                if !self.is_up(&m) {
                    all_hold = false;
                    self.metrics.repair_backlog.dec();
                    continue;
                }
                match self.copy_blob(store, &digest, &m).await {
                    Ok(made) => {
                        if made {
                            copied += 1;
                            self.metrics.repaired.inc();
                        }
                    }
                    Err(e) => {
                        all_hold = false;
                        tracing::warn!(%digest, cause = %e, "repair copy failed");
                        self.suspect(&m);
                    }
                }
                self.metrics.repair_backlog.dec();
            }
            if all_hold
                && self.handoff.due(&digest)
                && !self.owns_blob(&digest)
                && !self.nominal_owner(&digest)
            {
                let (store, d) = (store.clone(), digest);
                let _ = tokio::task::spawn_blocking(move || store.remove(&d)).await;
                self.handoff.forget(&digest);
                self.metrics.handed_off.inc();
                tracing::info!(%digest, "copy of a blob this origin no longer owns dropped (its owners hold it)");
            }
        }
        for (name, tag, m) in tag_work {
            if self.is_up(&m) {
                match self.repair_tag(store, tags, &name, &tag, &m).await {
                    Ok(true) => {
                        copied += 1;
                        self.metrics.repaired.inc();
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(%name, %tag, cause = %e, "repair of a tag failed");
                        self.suspect(&m);
                    }
                }
            }
            self.metrics.repair_backlog.dec();
        }
        if copied > 0 {
            tracing::info!(copied, "repair copied blobs and tags to their owners");
        }
        copied
    }

    /// Whether this origin is among `digest`'s owners when every member is up (a member
    /// standing in for a down owner is not one, and keeps its copy until the owner is back
    /// and holds it).
    fn nominal_owner(&self, digest: &Digest) -> bool {
        let members = self.snapshot();
        ring::owners(&self.key, &members, digest.to_string().as_bytes(), self.replicas, |_| true)
            .into_iter()
            .any(|i| members[i].id == self.me)
    }

    /// Copies tag `name:tag` (and its manifest) to `member` unless it points at the same
    /// digest there already.
    async fn repair_tag(
        &self,
        store: &BlobStore,
        tags: &TagStore,
        name: &str,
        tag: &str,
        member: &str,
    ) -> Result<bool, String> {
        let Some(digest) = tags.get(name, tag).await else { return Ok(false) };
        let url = format!("{member}/v2/{name}/manifests/{tag}");
        let accept = shoal_shared::oci::MANIFEST_ACCEPT;
        let resp = self.authorized(member, self.http.head(&url)).header("Accept", accept).send().await;
        let there = resp
            .map_err(|e| format!("{url}: {e}"))?
            .headers()
            .get("Docker-Content-Digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<Digest>().ok());
        if there == Some(digest) {
            return Ok(false);
        }
        let size = store.size(&digest).await.ok_or_else(|| format!("{digest}: manifest not held"))?;
        let body = store
            .read_range(&digest, 0, size as usize)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("{digest}: manifest not held"))?;
        let media_type = shoal_shared::oci::manifest_media_type(&body).ok_or("not a manifest")?;
        self.copy_manifest(name, tag, &body, &media_type, member).await?;
        Ok(true)
    }
}

/// Copies every blob an upstream fill stored here to its owners as it arrives (a fill has
/// no client waiting on a 201, so the copies run after it, not before it is answered), until
/// `shutdown`.
pub async fn replicate_fills(
    cluster: Arc<Cluster>,
    store: BlobStore,
    mut filled: tokio::sync::mpsc::Receiver<Digest>,
    shutdown: CancellationToken,
) {
    loop {
        let digest = tokio::select! {
            _ = shutdown.cancelled() => return,
            d = filled.recv() => match d { Some(d) => d, None => return },
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = cluster.replicate_blob(&store, &digest) => {}
        }
    }
}

/// Runs the health probes and the repair pass until `shutdown`: every [`REPAIR_EVERY`], and at
/// once when membership or a member's health changed.
pub async fn maintain(
    cluster: Arc<Cluster>,
    store: BlobStore,
    tags: TagStore,
    data: std::path::PathBuf,
    shutdown: CancellationToken,
) {
    let mut probe = tokio::time::interval(PROBE_EVERY);
    let mut repair = tokio::time::interval(REPAIR_EVERY);
    let mut resolve = tokio::time::interval(RESOLVE_EVERY);
    repair.reset();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = resolve.tick() => cluster.resolve().await,
            _ = probe.tick() => cluster.probe_all().await,
            _ = repair.tick() => {
                cluster.take_change();
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = cluster.repair(&store, &tags, &data) => {}
                }
            }
        }
        if cluster.take_change() {
            repair.reset();
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = cluster.repair(&store, &tags, &data) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(n: usize, me: usize) -> Settings {
        let members: Vec<String> = (0..n).map(|i| format!("http://o{i}:5000/")).collect();
        Settings {
            me: members[me].clone(),
            members,
            replicas: 2,
            key: RingKey::default(),
            token: None,
            handoff_grace: Duration::from_secs(3600),
            tls: None,
        }
    }

    #[test]
    fn every_member_computes_the_same_owners() {
        let digest = Digest::of(b"blob");
        let owners: Vec<Vec<String>> = (0..3)
            .map(|me| {
                let c = Cluster::new(settings(3, me)).expect("cluster");
                c.blob_owners(&digest)
            })
            .collect();
        assert_eq!(owners[0].len(), 2);
        assert!(owners.iter().all(|o| *o == owners[0]), "{owners:?}");
    }

    #[test]
    fn a_suspect_member_is_skipped_until_its_probes_pass() {
        let c = Cluster::new(settings(3, 0)).expect("cluster");
        let digest = (0..100u32)
            .map(|i| Digest::of(&i.to_le_bytes()))
            .find(|d| !c.owns_blob(d))
            .expect("a blob this member does not own");
        let owners = c.blob_owners(&digest);
        assert!(!c.take_change());
        c.suspect(&owners[0]);
        assert!(c.take_change(), "a member going down calls for a repair pass");
        assert!(!c.take_change());
        c.suspect(&owners[0]);
        assert!(!c.take_change(), "already down: nothing changed");
        let now = c.blob_owners(&digest);
        assert!(!now.contains(&owners[0]));
        assert_eq!(now.len(), 2, "the next member takes its place");
        c.suspect(c.me());
        assert!(c.is_up(c.me()), "this origin is never down to itself");
    }

    #[test]
    fn self_must_be_a_member() {
        let mut s = settings(3, 0);
        s.me = "http://elsewhere:5000".into();
        assert!(matches!(Cluster::new(s), Err(ClusterError::NotAMember(_))));
        let mut s = settings(3, 0);
        s.replicas = 0;
        assert!(matches!(Cluster::new(s), Err(ClusterError::NoReplicas)));
        let mut s = settings(3, 0);
        s.members.push("origin-9:5000".into());
        assert!(matches!(Cluster::new(s), Err(ClusterError::BadMember(_))));
    }

    #[tokio::test]
    async fn dns_members_are_every_address_of_the_name() {
        let mut s = settings(1, 0);
        s.members = vec!["dns:localhost:5000".into()];
        s.me = "http://10.9.9.9:5000".into();
        let c = Cluster::new(s).expect("cluster");
        assert_eq!(c.members().len(), 1, "only itself until resolved");
        c.resolve().await;
        let ids: Vec<String> = c.members().into_iter().map(|(id, _)| id).collect();
        assert!(ids.contains(&"http://127.0.0.1:5000".to_owned()), "{ids:?}");
        assert!(ids.contains(&"http://10.9.9.9:5000".to_owned()), "{ids:?}");
    }

    #[test]
    fn tags_are_listed_with_their_repository() {
        let dir = tempfile::tempdir().expect("tmp");
        for (name, tag) in [("app", "v1"), ("team/app", "v2"), ("team/app", "latest")] {
            let d = dir.path().join(name);
            std::fs::create_dir_all(&d).expect("dir");
            std::fs::write(d.join(format!("{tag}.tag")), "x").expect("tag");
        }
        assert_eq!(
            crate::tags::list_tag_files(dir.path()),
            vec![
                ("app".to_owned(), "v1".to_owned()),
                ("team/app".to_owned(), "latest".to_owned()),
                ("team/app".to_owned(), "v2".to_owned())
            ]
        );
    }
}

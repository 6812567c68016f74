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
//!
//! This file owns the settings, the membership and health (probes, suspicion, ownership on
//! the ring); the calls on the request path (copies to owners, deletions, forwarded reads)
//! are in `replicate`, the background repair pass and its loop in `repair`, the counters in
//! `metrics`, and the handoff of copies no longer owned in `handoff`.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use actix_web::HttpRequest;
use shoal_shared::digest::Digest;
use shoal_shared::ring::{self, Member, RingKey};

mod handoff;
mod metrics;
mod repair;
mod replicate;
#[cfg(test)]
mod tests;

use handoff::Handoff;
pub use metrics::ClusterMetrics;
pub use repair::maintain;
pub use replicate::replicate_fills;

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

use shoal_shared::members::Members;

/// The cluster's settings (`--cluster`, `--self`, `--replicas`, `--ring-key`).
#[derive(Debug, Clone)]
pub struct Settings {
    /// Every origin's base URL, this one included, written the same on every member; or
    /// `dns:NAME:PORT`, every address of a name (a Kubernetes headless Service) as
    /// `http://IP:PORT`, resolved again every
    /// [`RESOLVE_EVERY`](shoal_shared::members::RESOLVE_EVERY). A URL may carry a weight
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
}

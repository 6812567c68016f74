//! The tracker's view of the origins: which one holds a blob, its metainfo, tag lookups.
//!
//! The origins are `--origin` URLs (optionally weighted, `#weight=N`) and `dns:NAME:PORT`
//! names resolved again every [`shoal_shared::members::RESOLVE_EVERY`], read as the origins
//! read their `--cluster`. They are asked in the configured order, or on a ring a blob's
//! owners first. Metainfo is immutable for a digest, so it is
//! cached (bounded by bytes, least recently used out); so, briefly, is "no origin has it",
//! so that a flood of lookups for unknown digests costs the origins one request per digest
//! and [`MISS_TTL`]. Tags are mutable and always asked afresh.
//!
//! `https://` origins are their internal listeners (`shoal-origin serve --internal`): the
//! tracker calls them with its own certificate and trusts only an origin certificate of the
//! cluster, so neither side can be impersonated; `http://` ones are public ports, asked with
//! `--origin-token`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use shoal_shared::client::{
    self, ClientError, MAX_METAINFO_JSON, PULLED_THROUGH_HEADER, PULLED_THROUGH_RECENT,
};
use shoal_shared::digest::Digest;
use shoal_shared::hint::Hint;
use shoal_shared::metainfo::Metainfo;
use shoal_shared::oci::{valid_tag, TagList, DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST};
use shoal_shared::referrers::{filter_query, ReferrersIndex, MAX_REFERRERS_JSON};
use shoal_shared::tenant::PrivateRepo;
use shoal_shared::tls::http::HttpTls;
use shoal_shared::tls::Role;

/// Largest tag list accepted from an origin.
pub const MAX_TAG_LIST: usize = 4 << 20;
/// Bytes of metainfo (about 32 a piece) the cache holds at most.
const METAINFO_CACHE_BYTES: u64 = 256 << 20;
/// How long "no origin has it" is remembered for a digest (and hint).
pub const MISS_TTL: std::time::Duration = std::time::Duration::from_secs(2);
/// How long an origin's peer address is trusted before it is asked again (a dead origin
/// stops being handed out as a holder within this).
pub const PEER_ADDR_TTL: std::time::Duration = std::time::Duration::from_secs(5);
/// Most misses remembered.
const MISS_CACHE: u64 = 100_000;

/// Why the origins could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("--origin {0}")]
    Source(#[from] shoal_shared::members::BadSource),
    #[error(
        "--origin {0} is https:// (an origin's internal listener): give the tracker --tls, its certificate"
    )]
    NoTls(String),
    #[error(transparent)]
    Tls(#[from] shoal_shared::tls::TlsError),
}

/// A lookup that no origin could answer.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("no origin has it")]
    NotFound,
    #[error("no origin answered: {0}")]
    Unavailable(String),
    /// An origin is pulling the blob through from an upstream registry: ask again later.
    #[error("being pulled from upstream")]
    Pending,
    /// An origin's upstream refused the credentials (or the origin refused us): retrying
    /// elsewhere in the cluster will not help, and the client should know.
    #[error("refused: {0}")]
    Denied(String),
}

#[derive(Debug, Clone)]
struct Known {
    metainfo: Arc<Metainfo>,
    /// The base URL of the origin that answered.
    origin: String,
    /// The origin said it pulled the blob through from an upstream lately, then.
    pulled_through: Option<Instant>,
    /// The private upstream repository the origin pulled the blob for.
    private: Option<PrivateRepo>,
}

/// An origin's metainfo answer, passed on to agents.
#[derive(Debug, Clone)]
pub struct Sourced {
    pub metainfo: Arc<Metainfo>,
    /// An origin pulled the blob through from an upstream within [`PULLED_THROUGH_RECENT`].
    pub pulled_through: bool,
    /// The private upstream repository it was pulled for ([`shoal_shared::tenant`]).
    pub private: Option<PrivateRepo>,
}

/// The configured origins.
#[derive(Debug)]
pub struct Origins {
    members: shoal_shared::members::Members,
    http: reqwest::Client,
    /// Origins' peer addresses, asked again after [`PEER_ADDR_TTL`]: an origin that stops
    /// answering drops out of the holders handed to agents.
    peer_addrs: moka::sync::Cache<String, SocketAddr>,
    /// The origins form a ring (`--ring-key`, `--replicas`): lookups go to a blob's owners
    /// first, and every live owner is a holder.
    ring: Option<(shoal_shared::ring::RingKey, usize)>,
    known: moka::sync::Cache<Digest, Known>,
    /// Digests (with the hint's query) no origin had, moments ago.
    misses: moka::sync::Cache<(Digest, String), ()>,
    /// Metainfo requests sent to origins.
    pub lookups: prometheus_client::metrics::counter::Counter,
}

#[derive(serde::Deserialize)]
struct Info {
    peer: SocketAddr,
}

impl Origins {
    /// The origins' base URLs now.
    pub fn urls(&self) -> Vec<String> {
        self.members.snapshot().into_iter().map(|m| m.id).collect()
    }

    /// Resolves `dns:` origins again (see [`shoal_shared::members::Members::resolve`]).
    pub async fn resolve(&self) -> bool {
        self.members.resolve().await
    }

    /// Whether some origin answers its liveness check within `timeout`; the error says why
    /// none did.
    pub async fn reachable(&self, timeout: std::time::Duration) -> Result<(), String> {
        client::any_healthy(&self.http, &self.urls(), timeout, "origin").await
    }

    /// The origins at `urls` (base URLs or `dns:NAME:PORT`), asked with `token` (the
    /// origins' upload token: pull-through lookups reach upstreams and fill the origins'
    /// disks, so they take it). `https://` origins are internal listeners, called with
    /// `tls` (the tracker's certificate, which stands in for the token there) and trusted only
    /// with an origin certificate of the cluster; `http://` ones in the clear, with a warning.
    pub fn new(urls: &[String], token: Option<&str>, tls: Option<&HttpTls>) -> Result<Self, SetupError> {
        let members = shoal_shared::members::Members::new(urls, None)?;
        let plain: Vec<&String> = urls.iter().filter(|u| !u.starts_with("https://")).collect();
        if !plain.is_empty() {
            tracing::warn!(
                origins = ?plain,
                "origins called over plain HTTP: lookups are authenticated by --origin-token only \
                 and the answers not at all; give the origins --internal and list them as https://"
            );
        }
        let http = match tls {
            Some(tls) => shoal_shared::tls::http::mtls_client(tls, &[Role::Origin], client::builder(token))?,
            None => match urls.iter().find(|u| u.starts_with("https://")) {
                Some(u) => return Err(SetupError::NoTls(u.clone())),
                None => client::http_client_with_token(token),
            },
        };
        let known = moka::sync::Cache::builder()
            .weigher(|_, k: &Known| {
                u32::try_from(k.metainfo.piece_count() as u64 * 32 + 256).unwrap_or(u32::MAX)
            })
            .max_capacity(METAINFO_CACHE_BYTES)
            .build();
        let misses = moka::sync::Cache::builder().max_capacity(MISS_CACHE).time_to_live(MISS_TTL).build();
        Ok(Self {
            members,
            http,
            peer_addrs: moka::sync::Cache::builder().max_capacity(4096).time_to_live(PEER_ADDR_TTL).build(),
            ring: None,
            known,
            misses,
            lookups: Default::default(),
        })
    }

    /// Treats the origins as one ring with `replicas` owners per blob, hashed with `key` (the
    /// same `--ring-key` and `--replicas` as the origins').
    pub fn with_ring(mut self, key: shoal_shared::ring::RingKey, replicas: usize) -> Self {
        self.ring = Some((key, replicas.max(1)));
        self
    }

    /// The origins' base URLs in the order to ask them for `item` (a digest, a repository
    /// name): its owners first on a ring, else as configured.
    fn order(&self, item: &[u8]) -> Vec<String> {
        let members = self.members.snapshot();
        match &self.ring {
            Some((key, _)) => shoal_shared::ring::rank(key, &members, item)
                .into_iter()
                .map(|i| members[i].id.clone())
                .collect(),
            None => members.into_iter().map(|m| m.id).collect(),
        }
    }

    /// The metainfo of `digest` from the first origin that has it.
    pub async fn metainfo(&self, digest: Digest) -> Result<Arc<Metainfo>, LookupError> {
        self.metainfo_for(digest, None).await
    }

    /// Like [`metainfo`](Self::metainfo); with a hint, an origin that pulls through from
    /// upstream registries may answer that it is fetching the blob ([`LookupError::Pending`]),
    /// which is the answer only when no other origin holds it. 401 and 403 are
    /// [`LookupError::Denied`], as for [`tag`](Self::tag). Only complete answers are cached.
    pub async fn metainfo_for(
        &self,
        digest: Digest,
        hint: Option<&Hint>,
    ) -> Result<Arc<Metainfo>, LookupError> {
        self.metainfo_sourced(digest, hint).await.map(|s| s.metainfo)
    }

    /// [`metainfo_for`](Self::metainfo_for), with where the origin got the blob.
    pub async fn metainfo_sourced(
        &self,
        digest: Digest,
        hint: Option<&Hint>,
    ) -> Result<Sourced, LookupError> {
        let recent = |k: &Known| k.pulled_through.is_some_and(|at| at.elapsed() < PULLED_THROUGH_RECENT);
        if let Some(k) = self.known.get(&digest) {
            return Ok(Sourced {
                metainfo: k.metainfo.clone(),
                pulled_through: recent(&k),
                private: k.private,
            });
        }
        let query = hint.map(|h| format!("?{}", h.query())).unwrap_or_default();
        let miss = (digest, query);
        if self.misses.contains_key(&miss) {
            return Err(LookupError::NotFound);
        }
        let query = &miss.1;
        let (mut last_error, mut denied, mut pending) = (None, None, false);
        for base in self.order(digest.to_string().as_bytes()) {
            let url = format!("{base}/shoal/v1/metainfo/{digest}{query}");
            self.lookups.inc();
            let resp = match self.http.get(&url).send().await {
                Ok(r) => r,
                Err(e) => {
                    last_error = Some(format!("{url}: {e}"));
                    continue;
                }
            };
            if resp.status() == reqwest::StatusCode::ACCEPTED {
                // A later origin may hold the blob already.
                pending = true;
                continue;
            }
            let pulled = resp.headers().contains_key(PULLED_THROUGH_HEADER);
            let mut private = None;
            let body = match client::check(resp).await {
                Ok(resp) => match client::private_repo(&url, resp.headers()) {
                    Ok(p) => {
                        private = p;
                        client::read_limited(resp, MAX_METAINFO_JSON).await
                    }
                    Err(e) => Err(e),
                },
                Err(e) => Err(e),
            };
            match body.and_then(|b| {
                serde_json::from_slice::<Metainfo>(&b)
                    .map_err(|e| ClientError::Malformed { url: url.clone(), cause: e.to_string() })
            }) {
                Ok(m) if m.digest() == digest => {
                    let m = Arc::new(m);
                    let pulled_through = pulled.then(Instant::now);
                    let known =
                        Known { metainfo: m.clone(), origin: base, pulled_through, private: private.clone() };
                    self.known.insert(digest, known);
                    return Ok(Sourced { metainfo: m, pulled_through: pulled, private });
                }
                Ok(_) => last_error = Some(format!("{url}: metainfo for another digest")),
                Err(ClientError::NotFound { .. }) => {}
                Err(e @ ClientError::Status { status: 401 | 403, .. }) => denied = Some(e.to_string()),
                Err(e) => last_error = Some(e.to_string()),
            }
        }
        if pending {
            return Err(LookupError::Pending);
        }
        if let Some(denied) = denied {
            return Err(LookupError::Denied(denied));
        }
        match last_error {
            Some(e) => Err(LookupError::Unavailable(e)),
            None => {
                self.misses.insert(miss, ());
                Err(LookupError::NotFound)
            }
        }
    }

    /// Peer addresses of the origins known to hold `digest` (after a metainfo lookup): the
    /// one that answered, and on a ring every live owner (an agent asks each; one that lacks
    /// the blob says so at once).
    pub async fn holders(&self, digest: Digest) -> Vec<SocketAddr> {
        if self.metainfo(digest).await.is_err() {
            return Vec::new();
        }
        let Some(origin) = self.known.get(&digest).map(|k| k.origin) else { return Vec::new() };
        let mut candidates = vec![origin];
        if let Some((_, replicas)) = &self.ring {
            candidates.extend(self.order(digest.to_string().as_bytes()).into_iter().take(*replicas));
        }
        candidates.dedup();
        let mut out = Vec::new();
        for (i, c) in candidates.iter().enumerate() {
            if candidates[..i].contains(c) {
                continue;
            }
            if let Some(addr) = self.peer_addr(c).await {
                out.push(addr);
            }
        }
        out
    }

    async fn peer_addr(&self, origin: &str) -> Option<SocketAddr> {
        if let Some(a) = self.peer_addrs.get(origin) {
            return Some(a);
        }
        let url = format!("{origin}/shoal/v1/info");
        match client::get_json::<Info>(&self.http, &url, 64 << 10).await {
            Ok(info) => {
                self.peer_addrs.insert(origin.to_owned(), info.peer);
                Some(info.peer)
            }
            Err(e) => {
                tracing::warn!(cause = %e, "origin info unavailable");
                None
            }
        }
    }

    /// The referrers of `subject` in `name` that any reachable origin lists (a union, as for
    /// tags: a standalone origin holds only what was pushed to it), filtered again here.
    pub async fn referrers(
        &self,
        name: &str,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<ReferrersIndex, LookupError> {
        let query = filter_query(artifact_type);
        let (mut all, mut answered, mut last_error) = (Vec::new(), false, None);
        for base in self.urls() {
            let url = format!("{base}/v2/{name}/referrers/{subject}{query}");
            match client::get_json::<ReferrersIndex>(&self.http, &url, MAX_REFERRERS_JSON).await {
                Ok(index) => {
                    answered = true;
                    all.extend(index.manifests);
                }
                Err(e) => last_error = Some(e.to_string()),
            }
        }
        match (answered, last_error) {
            (false, Some(e)) => Err(LookupError::Unavailable(e)),
            _ => Ok(ReferrersIndex::new(all, artifact_type)),
        }
    }

    /// The union of the tags every reachable origin holds for `name`, sorted.
    pub async fn tag_list(&self, name: &str) -> Result<Vec<String>, LookupError> {
        let mut tags = std::collections::BTreeSet::new();
        let (mut found, mut last_error) = (false, None);
        for base in self.urls() {
            let url = format!("{base}/v2/{name}/tags/list");
            match client::get_json::<TagList>(&self.http, &url, MAX_TAG_LIST).await {
                Ok(list) => {
                    found = true;
                    tags.extend(list.tags.into_iter().filter(|t| valid_tag(t)));
                }
                Err(ClientError::NotFound { .. }) => {}
                Err(e) => last_error = Some(e.to_string()),
            }
        }
        match (found, last_error) {
            (true, _) => Ok(tags.into_iter().collect()),
            (false, Some(e)) => Err(LookupError::Unavailable(e)),
            (false, None) => Err(LookupError::NotFound),
        }
    }

    /// Resolves `name:tag` (in registry `ns`, for origins that pull through) with a GET to
    /// each origin in turn. Not a HEAD: an origin's error body says why an upstream failed.
    /// Also the private upstream repository the manifest was pulled for, if any.
    pub async fn tag(
        &self,
        name: &str,
        tag: &str,
        ns: Option<&str>,
    ) -> Result<(Digest, Option<PrivateRepo>), LookupError> {
        let query = ns.map(|ns| format!("?ns={ns}")).unwrap_or_default();
        let accept = [OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST].join(", ");
        let (mut last_error, mut denied) = (None, None);
        for base in self.order(name.as_bytes()) {
            let url = format!("{base}/v2/{name}/manifests/{tag}{query}");
            let resp = match self.http.get(&url).header("Accept", &accept).send().await {
                Ok(r) => r,
                Err(e) => {
                    last_error = Some(format!("{url}: {e}"));
                    continue;
                }
            };
            match client::check(resp).await {
                Ok(resp) => {
                    let digest = resp
                        .headers()
                        .get("Docker-Content-Digest")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<Digest>().ok());
                    match (digest, client::private_repo(&url, resp.headers())) {
                        (Some(d), Ok(private)) => return Ok((d, private)),
                        (_, Err(e)) => last_error = Some(e.to_string()),
                        (None, _) => last_error = Some(format!("{url}: no valid Docker-Content-Digest")),
                    }
                }
                Err(ClientError::NotFound { .. }) => {}
                Err(e @ ClientError::Status { status: 401 | 403, .. }) => denied = Some(e.to_string()),
                Err(e) => last_error = Some(e.to_string()),
            }
        }
        if let Some(denied) = denied {
            return Err(LookupError::Denied(denied));
        }
        Err(last_error.map_or(LookupError::NotFound, LookupError::Unavailable))
    }
}

#[cfg(test)]
mod tests {
    use actix_web::http::StatusCode;
    use actix_web::{web, App, HttpResponse, HttpServer};
    use shoal_shared::metainfo::MetainfoBuilder;

    use super::*;

    /// An origin that answers every request with `status` and `body`.
    fn origin(status: u16, body: String) -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let status = StatusCode::from_u16(status).expect("status");
        let server = HttpServer::new(move || {
            let body = body.clone();
            App::new().default_service(web::to(move || {
                let body = body.clone();
                async move { HttpResponse::build(status).body(body) }
            }))
        })
        .workers(1)
        .disable_signals()
        .listen(listener)
        .expect("listen")
        .run();
        tokio::spawn(server);
        format!("http://{addr}")
    }

    #[tokio::test]
    async fn an_origin_holding_the_blob_wins_over_one_pulling_it_and_refusals_are_denied() {
        let mut builder = MetainfoBuilder::new(64 << 10).expect("piece length");
        builder.update(b"blob");
        let metainfo = builder.finish().expect("metainfo");
        let digest = metainfo.digest();
        let json = serde_json::to_string(&metainfo).expect("json");
        let hint = Hint::new("r", None).expect("hint");
        let (pulling, holding) = (origin(202, String::new()), origin(200, json));
        let (missing, refusing, unauthorized) =
            (origin(404, String::new()), origin(403, "denied".into()), origin(401, "no".into()));

        let lookup = |urls: Vec<&String>| {
            let urls: Vec<String> = urls.into_iter().cloned().collect();
            let origins = Origins::new(&urls, None, None).expect("origins");
            let hint = hint.clone();
            async move { origins.metainfo_for(digest, Some(&hint)).await }
        };
        let m = lookup(vec![&pulling, &holding]).await.expect("the second origin holds it");
        assert_eq!(*m, metainfo);
        assert!(matches!(lookup(vec![&pulling, &missing]).await, Err(LookupError::Pending)));
        assert!(matches!(lookup(vec![&refusing, &pulling]).await, Err(LookupError::Pending)));
        assert!(matches!(lookup(vec![&refusing, &missing]).await, Err(LookupError::Denied(_))));
        assert!(matches!(lookup(vec![&unauthorized]).await, Err(LookupError::Denied(_))));
        assert!(matches!(lookup(vec![&missing]).await, Err(LookupError::NotFound)));
    }
}

//! Per-tenant authorization at the local registry boundary.
//!
//! Content an origin pulled through from a *private* upstream repository arrives marked
//! with that repository ([`PrivateRepo`], `X-Shoal-Private` on metainfo and tag answers).
//! The agent serves it only to a client whose credentials the upstream accepts for that
//! repository, so on a shared node one tenant's image is not another's by name:
//!
//! - no `Authorization`: 401 with `WWW-Authenticate: Basic realm="shoal"`, so containerd
//!   sends the credentials it holds for the registry (`hosts.toml` / `ctr --user`);
//! - a `Basic` header is checked with a HEAD of the manifest (or blob) on the upstream with
//!   those credentials, following the upstream's Bearer challenge with them; the outcome is
//!   cached [`OUTCOME_TTL`] under a keyed blake3 hash of the header and the repository (the
//!   credentials themselves are never kept, logged or shown in `Debug`);
//! - a refusal is answered as the registry answered it (401 or 403).
//!
//! The marker is kept with the cached blob (`<data>/private/<hex>`, written before the
//! blob's first byte is served and rewritten by every download of it), so cached content
//! stays protected. Pushed and public content carries no marker and stays open. Peers
//! exchange pieces by digest over mutually authenticated QUIC between cluster nodes; the
//! check is here, where local clients enter.

use std::collections::HashMap;
use std::time::Duration;

use actix_web::http::header::{HeaderValue, WWW_AUTHENTICATE};
use actix_web::http::StatusCode;
use actix_web::HttpResponse;
use reqwest::header::{ACCEPT, AUTHORIZATION};
use reqwest::StatusCode as UpStatus;
use shoal_shared::digest::Digest;
use shoal_shared::http::oci_error;
use shoal_shared::oci::{ErrorCode, DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST};
use shoal_shared::registry_auth::{self, Challenge};
use shoal_shared::registry_client::{realm_allowed, UpstreamUrl};
use shoal_shared::store::BlobStore;
use shoal_shared::tenant::PrivateRepo;

/// How long an upstream's answer about a client's credentials is reused.
pub const OUTCOME_TTL: Duration = Duration::from_secs(60);
/// Most outcomes cached.
const MAX_OUTCOMES: u64 = 100_000;
/// Longest `Authorization` header considered.
const MAX_AUTHORIZATION: usize = 4096;
/// Longest an upstream check may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(15);
/// The challenge that makes containerd send the credentials it holds for the registry.
pub const CHALLENGE: &str = "Basic realm=\"shoal\"";

/// What the upstream said of a client's credentials for a repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Allowed,
    /// 401 or 403, as the upstream answered.
    Refused(u16),
}

/// What a check is made with: the manifest reference or the blob being served.
#[derive(Debug, Clone, Copy)]
pub enum Probe<'a> {
    Manifest(&'a str),
    Blob(&'a Digest),
    /// The repository as a whole (content asked for under another repository's name).
    Repository,
}

/// Why a request for private content is not served.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("{0} is private: credentials for it are required")]
    NoCredentials(PrivateRepo),
    #[error("{0} is private: it must be asked for through its registry and repository")]
    WrongName(PrivateRepo),
    #[error("the upstream refused these credentials for {1}")]
    Upstream(u16, PrivateRepo),
    #[error("cannot check credentials for {repo} with the upstream: {cause}")]
    Unavailable { repo: PrivateRepo, cause: String },
}

impl Refusal {
    /// The registry error for the client.
    pub fn response(&self) -> HttpResponse {
        match self {
            Self::NoCredentials(_) | Self::Upstream(401, _) => {
                let mut resp = oci_error(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, self);
                resp.headers_mut().insert(WWW_AUTHENTICATE, HeaderValue::from_static(CHALLENGE));
                resp
            }
            Self::WrongName(_) => oci_error(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, self),
            Self::Upstream(..) => oci_error(StatusCode::FORBIDDEN, ErrorCode::Denied, self),
            Self::Unavailable { .. } => {
                oci_error(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unauthorized, self)
            }
        }
    }
}

/// The upstream registries' URLs and the cached outcomes of checks against them.
pub struct Tenants {
    /// Registry name (lowercase) -> base URL, from `--upstream REGISTRY=URL`; others are
    /// `https://<registry>`.
    upstreams: HashMap<String, UpstreamUrl>,
    http: reqwest::Client,
    /// Keys the hashes of credentials: they are not guessable offline from memory.
    key: [u8; 32],
    outcomes: moka::sync::Cache<[u8; 32], Outcome>,
    /// Checks sent to upstreams.
    pub checks: prometheus_client::metrics::counter::Counter,
}

impl std::fmt::Debug for Tenants {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tenants")
            .field("upstreams", &self.upstreams.values().collect::<Vec<_>>())
            .field("outcomes", &self.outcomes.entry_count())
            .finish_non_exhaustive()
    }
}

impl Tenants {
    /// `upstreams` are `REGISTRY=URL` (or bare URL) as the origin's `--upstream`.
    pub fn new(upstreams: &[String]) -> Result<Self, String> {
        let mut map = HashMap::new();
        for spec in upstreams {
            let u = UpstreamUrl::parse(spec)?;
            map.insert(u.registry.clone(), u);
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(CHECK_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("shoal-agent/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("upstream HTTP client: {e}"))?;
        Ok(Self {
            upstreams: map,
            http,
            key: rand::random(),
            outcomes: moka::sync::Cache::builder()
                .max_capacity(MAX_OUTCOMES)
                .time_to_live(OUTCOME_TTL)
                .build(),
            checks: Default::default(),
        })
    }

    fn upstream(&self, registry: &str) -> Option<UpstreamUrl> {
        match self.upstreams.get(registry) {
            Some(u) => Some(u.clone()),
            None => UpstreamUrl::parse(registry).ok(),
        }
    }

    fn outcome_key(&self, authorization: &str, repo: &PrivateRepo) -> [u8; 32] {
        let mut h = blake3::Hasher::new_keyed(&self.key);
        h.update(authorization.as_bytes());
        h.update(&[0]);
        h.update(repo.to_string().as_bytes());
        *h.finalize().as_bytes()
    }

    /// Whether a client that sent `authorization` and asked under `ns`/`name` may have
    /// content private to `repo`.
    pub async fn authorize(
        &self,
        authorization: Option<&HeaderValue>,
        ns: Option<&str>,
        name: &str,
        repo: &PrivateRepo,
        probe: Probe<'_>,
    ) -> Result<(), Refusal> {
        // A blob is decided by the repository it was pulled for: asked for under another
        // registry (or none), it cannot be checked against the right upstream.
        let same_registry = ns.is_some_and(|ns| {
            registry_auth::normalize_host(ns) == registry_auth::normalize_host(&repo.registry)
        });
        if !same_registry {
            return Err(Refusal::WrongName(repo.clone()));
        }
        let Some(basic) = authorization
            .filter(|v| v.len() <= MAX_AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .filter(|v| v.len() > 6 && v[..6].eq_ignore_ascii_case("basic "))
        else {
            return Err(Refusal::NoCredentials(repo.clone()));
        };
        // Checked against the repository the content was pulled for, whatever name it was
        // asked under: the upstream decides who may read that repository.
        let probe = if name == repo.name { probe } else { Probe::Repository };
        let key = self.outcome_key(basic, repo);
        let outcome = match self.outcomes.get(&key) {
            Some(o) => o,
            None => {
                let o = self.check(basic, repo, probe).await?;
                self.outcomes.insert(key, o);
                o
            }
        };
        match outcome {
            Outcome::Allowed => Ok(()),
            Outcome::Refused(status) => Err(Refusal::Upstream(status, repo.clone())),
        }
    }

    /// Asks the upstream whether `basic` opens `repo`.
    async fn check(&self, basic: &str, repo: &PrivateRepo, probe: Probe<'_>) -> Result<Outcome, Refusal> {
        let unavailable = |cause: String| Refusal::Unavailable { repo: repo.clone(), cause };
        let up =
            self.upstream(&repo.registry).ok_or_else(|| unavailable("no URL for the registry".into()))?;
        self.checks.inc();
        let url = match probe {
            Probe::Blob(d) => format!("{}/v2/{}/blobs/{d}", up.base, repo.name),
            // Without a reference of its own, the repository's `latest`: any answer but a
            // refusal (404 included) says the credentials open the repository.
            Probe::Repository => format!("{}/v2/{}/manifests/latest", up.base, repo.name),
            Probe::Manifest(r) => format!("{}/v2/{}/manifests/{r}", up.base, repo.name),
        };
        let accept = [OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST].join(", ");
        let head = |auth: &str| {
            let mut value = reqwest::header::HeaderValue::from_str(auth).ok();
            if let Some(v) = value.as_mut() {
                v.set_sensitive(true);
            }
            let mut req = self.http.head(&url).header(ACCEPT, &accept);
            if let Some(v) = value {
                req = req.header(AUTHORIZATION, v);
            }
            req
        };
        let send =
            |req: reqwest::RequestBuilder| async move { req.send().await.map_err(|e| without_url(&e)) };
        let resp = send(head(basic)).await.map_err(unavailable)?;
        let resp = match resp.status() {
            UpStatus::UNAUTHORIZED => {
                let challenge = resp
                    .headers()
                    .get(reqwest::header::WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(registry_auth::parse_challenge);
                match challenge {
                    Some(Challenge::Bearer { realm, service, scope }) => {
                        if !realm_allowed(&realm, up.plain_http()) {
                            return Err(unavailable("token service is plain HTTP on another host".into()));
                        }
                        let scope = scope.unwrap_or_else(|| format!("repository:{}:pull", repo.name));
                        let mut req = self.http.get(&realm).query(&[("scope", scope.as_str())]);
                        if let Some(service) = service {
                            req = req.query(&[("service", service.as_str())]);
                        }
                        let mut value = reqwest::header::HeaderValue::from_str(basic)
                            .map_err(|_| unavailable("bad header".into()))?;
                        value.set_sensitive(true);
                        let token = send(req.header(AUTHORIZATION, value)).await.map_err(unavailable)?;
                        match token.status() {
                            s if s.is_success() => {}
                            s @ (UpStatus::UNAUTHORIZED | UpStatus::FORBIDDEN) => {
                                return Ok(Outcome::Refused(s.as_u16()))
                            }
                            s => return Err(unavailable(format!("token service answered {s}"))),
                        }
                        let body =
                            read_limited(token, registry_auth::MAX_TOKEN_JSON).await.map_err(unavailable)?;
                        let (bearer, _) = registry_auth::bearer_from_response(&body).map_err(unavailable)?;
                        send(head(&bearer)).await.map_err(unavailable)?
                    }
                    // Basic was what it asked for, and these credentials were refused.
                    _ => return Ok(Outcome::Refused(401)),
                }
            }
            _ => resp,
        };
        Ok(match resp.status() {
            s if s.is_success() => Outcome::Allowed,
            s @ (UpStatus::UNAUTHORIZED | UpStatus::FORBIDDEN) => Outcome::Refused(s.as_u16()),
            // The credentials opened the repository; only the probe's target is missing.
            UpStatus::NOT_FOUND if matches!(probe, Probe::Repository) => Outcome::Allowed,
            UpStatus::NOT_FOUND => Outcome::Refused(403),
            s => return Err(unavailable(format!("upstream answered {s}"))),
        })
    }
}

/// Reads a small body, at most `limit` bytes.
async fn read_limited(resp: reqwest::Response, limit: usize) -> Result<Vec<u8>, String> {
    use futures_util::StreamExt as _;
    let mut body = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| without_url(&e))?;
        if body.len() + chunk.len() > limit {
            return Err(format!("token response larger than {limit} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// A reqwest error's text without its URL (which could carry a token in a query).
fn without_url(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    if let Some(url) = e.url() {
        text = text.replace(url.as_str(), "<url>");
    }
    text
}

/// Where the private marker of a cached blob lives.
fn marker_path(store: &BlobStore, digest: &Digest) -> std::path::PathBuf {
    store.root().join("private").join(digest.hex())
}

/// Records (or with `None`, clears) the private repository of `digest`, before any of its
/// bytes are served.
pub async fn set_marker(
    store: &BlobStore,
    digest: &Digest,
    repo: Option<&PrivateRepo>,
) -> std::io::Result<()> {
    let path = marker_path(store, digest);
    match repo {
        Some(repo) => {
            let dir = store.root().join("private");
            tokio::fs::create_dir_all(&dir).await?;
            let tmp = store.temp_path("private");
            if let Some(parent) = tmp.parent() {
                tokio::fs::create_dir_all(parent).await?;
            }
            tokio::fs::write(&tmp, repo.to_string()).await?;
            tokio::fs::rename(&tmp, &path).await
        }
        None => match tokio::fs::remove_file(&path).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        },
    }
}

/// The private repository of cached `digest`, if any. A marker that cannot be read or
/// parsed is an error: the content is not served.
pub async fn marker(store: &BlobStore, digest: &Digest) -> std::io::Result<Option<PrivateRepo>> {
    match tokio::fs::read_to_string(marker_path(store, digest)).await {
        Ok(text) => PrivateRepo::parse(&text)
            .map(Some)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn markers_round_trip_and_fail_closed() {
        let dir = tempfile::tempdir().expect("dir");
        let store = BlobStore::open(dir.path()).expect("store");
        let (digest, repo) =
            (Digest::of(b"x"), PrivateRepo::new("localhost:5000", "team/app").expect("repo"));
        assert_eq!(marker(&store, &digest).await.expect("none"), None);
        set_marker(&store, &digest, Some(&repo)).await.expect("set");
        assert_eq!(marker(&store, &digest).await.expect("read"), Some(repo));
        std::fs::write(marker_path(&store, &digest), "not a repo").expect("write");
        assert!(marker(&store, &digest).await.is_err(), "a mangled marker must not open the blob");
        set_marker(&store, &digest, None).await.expect("clear");
        assert_eq!(marker(&store, &digest).await.expect("none"), None);
    }

    #[tokio::test]
    async fn requests_without_credentials_or_under_another_registry_are_refused_unasked() {
        let tenants = Tenants::new(&["localhost:5000=http://127.0.0.1:9".into()]).expect("tenants");
        let repo = PrivateRepo::new("localhost:5000", "team/app").expect("repo");
        let probe = Probe::Manifest("v1");
        let none = tenants.authorize(None, Some("localhost:5000"), "team/app", &repo, probe).await;
        assert!(matches!(none, Err(Refusal::NoCredentials(_))));
        let resp = none.expect_err("refused").response();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(resp.headers().get(WWW_AUTHENTICATE).expect("challenge"), CHALLENGE);
        let basic = HeaderValue::from_static("Basic dTpw");
        let other = tenants.authorize(Some(&basic), Some("other.example"), "team/app", &repo, probe).await;
        assert!(matches!(other, Err(Refusal::WrongName(_))));
        let bearer = HeaderValue::from_static("Bearer t");
        let wrong = tenants.authorize(Some(&bearer), Some("localhost:5000"), "team/app", &repo, probe).await;
        assert!(matches!(wrong, Err(Refusal::NoCredentials(_))));
        assert_eq!(tenants.checks.get(), 0, "none of these reached the upstream");
        assert!(!format!("{tenants:?}").contains("dTpw"));
    }
}

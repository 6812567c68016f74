//! The client for the tracker(s), used by agents and origins: metainfo, tags and announces,
//! trying each configured tracker in turn when one is unreachable. Nodes call `https://`
//! trackers with their certificate ([`TrackerClient::with_tls`], mutual TLS).

use crate::client::{
    self, Announce, AnnounceResponse, ClientError, TagResponse, MAX_ANNOUNCE_JSON, MAX_METAINFO_JSON,
};
use crate::digest::Digest;
use crate::hint::Hint;
use crate::metainfo::Metainfo;
use crate::oci::TagList;
use crate::tenant::PrivateRepo;

/// A metainfo answer: the metainfo, whether an origin pulled the blob through from an
/// upstream lately (for this pull: the bytes from origins are the upstream's), and the
/// private upstream repository it was pulled for (see [`crate::tenant`]).
#[derive(Debug, Clone)]
pub struct Sourced {
    pub metainfo: Metainfo,
    pub pulled_through: bool,
    pub private: Option<PrivateRepo>,
}

/// Longest wait for an origin to pull a blob through from an upstream registry.
pub const PULL_THROUGH_WAIT: std::time::Duration = std::time::Duration::from_secs(1800);
/// Longest pause between two polls of a blob being pulled through, whatever `Retry-After` says.
const MAX_RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(5);

/// A metainfo answer: ready, or come back after a while (202).
enum Pending {
    /// The metainfo, whether an origin pulled the blob through from an upstream lately, and
    /// the private repository it was pulled for.
    Ready(Metainfo, bool, Option<PrivateRepo>),
    Wait(std::time::Duration),
}

/// GET a metainfo that may be pending (202 + `Retry-After` seconds) at an origin.
async fn get_metainfo(http: &reqwest::Client, url: &str) -> Result<Pending, ClientError> {
    let transport = |e: reqwest::Error| ClientError::Transport { url: url.to_owned(), cause: e.to_string() };
    let resp = client::check(http.get(url).send().await.map_err(transport)?).await?;
    if resp.status() == reqwest::StatusCode::ACCEPTED {
        let secs = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(1);
        return Ok(Pending::Wait(std::time::Duration::from_secs(secs.max(1)).min(MAX_RETRY_AFTER)));
    }
    let pulled = resp.headers().contains_key(client::PULLED_THROUGH_HEADER);
    let private = client::private_repo(url, resp.headers())?;
    let body = client::read_limited(resp, MAX_METAINFO_JSON).await?;
    serde_json::from_slice(&body)
        .map(|m| Pending::Ready(m, pulled, private))
        .map_err(|e| ClientError::Malformed { url: url.to_owned(), cause: e.to_string() })
}

/// A lookup answered by no tracker.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LookupError {
    #[error("unknown to the cluster")]
    NotFound,
    #[error("tracker unavailable: {0}")]
    Unavailable(String),
    /// The registry the image comes from refused the cluster's credentials.
    #[error("{0}")]
    Denied(String),
}

/// Talks to the configured trackers.
#[derive(Debug, Clone)]
pub struct TrackerClient {
    urls: Vec<String>,
    http: reqwest::Client,
}

impl TrackerClient {
    /// Trackers called without a client certificate: `http://` ones, or `https://` ones
    /// whose certificate the system trusts (tests, tools). Nodes use [`with_tls`](Self::with_tls).
    pub fn new(urls: &[String]) -> Self {
        Self::with_http(urls, client::http_client())
    }

    /// Trackers called as this node: `https://` ones with `tls`'s certificate as client
    /// identity, trusting only tracker certificates from the cluster CA (mutual TLS);
    /// `http://` ones in the clear.
    pub fn with_tls(urls: &[String], tls: &crate::tls::http::HttpTls) -> Result<Self, crate::tls::TlsError> {
        let plain: Vec<&String> = urls.iter().filter(|u| !u.starts_with("https://")).collect();
        if !plain.is_empty() {
            tracing::warn!(
                trackers = ?plain,
                "tracker called over plain HTTP: its announces and lookups are not authenticated; \
                 give the tracker --tls and call it with https://"
            );
        }
        Ok(Self::with_http(urls, crate::tls::http::tracker_client(tls)?))
    }

    fn with_http(urls: &[String], http: reqwest::Client) -> Self {
        let urls = urls.iter().map(|u| u.trim_end_matches('/').to_owned()).collect();
        Self { urls, http }
    }

    /// The trackers in the order to ask them about `item` (a digest, a repository name):
    /// rendezvous hashing spreads blobs over the trackers, every agent asks the same one
    /// about the same blob (so its swarm meets there), and when that one does not answer the
    /// next on the ring takes over.
    fn order(&self, item: &[u8]) -> Vec<&str> {
        let members: Vec<crate::ring::Member> =
            self.urls.iter().map(|u| crate::ring::Member::new(u.clone())).collect();
        crate::ring::rank(&crate::ring::RingKey::default(), &members, item)
            .into_iter()
            .map(|i| self.urls[i].as_str())
            .collect()
    }

    async fn first<T, F, Fut>(&self, item: &[u8], call: F) -> Result<T, LookupError>
    where
        F: Fn(String) -> Fut,
        Fut: std::future::Future<Output = Result<T, ClientError>>,
    {
        let mut last = String::from("no tracker configured");
        for base in self.order(item) {
            match call(base.to_owned()).await {
                Ok(v) => return Ok(v),
                Err(ClientError::NotFound { .. }) => return Err(LookupError::NotFound),
                Err(ClientError::Status { status: 401, body, .. }) => return Err(LookupError::Denied(body)),
                Err(e) => {
                    tracing::warn!(tracker = %base, cause = %e, "tracker call failed");
                    last = e.to_string();
                }
            }
        }
        Err(LookupError::Unavailable(last))
    }

    /// The metainfo of `digest`, checked to be about that digest.
    pub async fn metainfo(&self, digest: Digest) -> Result<Metainfo, LookupError> {
        self.metainfo_for(digest, None).await
    }

    /// Like [`metainfo`](Self::metainfo), with where the blob can be pulled from when the
    /// cluster does not hold it yet. While an origin pulls it through, trackers answer 202
    /// with `Retry-After`; this waits (up to [`PULL_THROUGH_WAIT`]) so callers see only the
    /// final answer.
    pub async fn metainfo_for(&self, digest: Digest, hint: Option<&Hint>) -> Result<Metainfo, LookupError> {
        self.metainfo_sourced(digest, hint).await.map(|s| s.metainfo)
    }

    /// [`metainfo_for`](Self::metainfo_for), with where the content came from.
    pub async fn metainfo_sourced(
        &self,
        digest: Digest,
        hint: Option<&Hint>,
    ) -> Result<Sourced, LookupError> {
        let query = hint.map(|h| format!("?{}", h.query())).unwrap_or_default();
        let deadline = tokio::time::Instant::now() + PULL_THROUGH_WAIT;
        let (m, pulled, private) = loop {
            let answer = self
                .first(digest.to_string().as_bytes(), |base| {
                    let url = format!("{base}/shoal/v1/metainfo/{digest}{query}");
                    async move { get_metainfo(&self.http, &url).await }
                })
                .await?;
            match answer {
                Pending::Ready(m, pulled, private) => break (m, pulled, private),
                Pending::Wait(after) if tokio::time::Instant::now() + after < deadline => {
                    tokio::time::sleep(after).await
                }
                Pending::Wait(_) => {
                    return Err(LookupError::Unavailable(format!(
                        "{digest} still being pulled from upstream after {}s",
                        PULL_THROUGH_WAIT.as_secs()
                    )))
                }
            }
        };
        if m.digest() != digest {
            return Err(LookupError::Unavailable("tracker sent metainfo for another blob".into()));
        }
        Ok(Sourced { metainfo: m, pulled_through: pulled, private })
    }

    /// The digest `name:tag` points at.
    pub async fn tag(&self, name: &str, tag: &str) -> Result<Digest, LookupError> {
        self.tag_in(name, tag, None).await
    }

    /// The digest `name:tag` points at in registry `ns` (a containerd mirror request's
    /// `?ns=`, validated by the caller with [`crate::hint::valid_ns`]).
    pub async fn tag_in(&self, name: &str, tag: &str, ns: Option<&str>) -> Result<Digest, LookupError> {
        self.tag_sourced(name, tag, ns).await.map(|(d, _)| d)
    }

    /// [`tag_in`](Self::tag_in), and the private upstream repository the manifest was
    /// pulled for, if any.
    pub async fn tag_sourced(
        &self,
        name: &str,
        tag: &str,
        ns: Option<&str>,
    ) -> Result<(Digest, Option<PrivateRepo>), LookupError> {
        let query = ns.map(|ns| format!("?ns={ns}")).unwrap_or_default();
        self.first(name.as_bytes(), |base| {
            let url = format!("{base}/shoal/v1/tags/{name}/{tag}{query}");
            async move {
                let transport =
                    |e: reqwest::Error| ClientError::Transport { url: url.clone(), cause: e.to_string() };
                let resp = client::check(self.http.get(&url).send().await.map_err(transport)?).await?;
                let private = client::private_repo(&url, resp.headers())?;
                let body = client::read_limited(resp, 4096).await?;
                let r: TagResponse = serde_json::from_slice(&body)
                    .map_err(|e| ClientError::Malformed { url: url.clone(), cause: e.to_string() })?;
                Ok((r.digest, private))
            }
        })
        .await
    }

    /// The tags of `name` known to the cluster, sorted.
    pub async fn tag_list(&self, name: &str) -> Result<Vec<String>, LookupError> {
        let list: TagList = self
            .first(name.as_bytes(), |base| {
                let url = format!("{base}/shoal/v1/taglist/{name}");
                async move { client::get_json(&self.http, &url, 4 << 20).await }
            })
            .await?;
        Ok(list.tags)
    }

    /// The referrers of `subject` in `name` known to the cluster (an OCI image index),
    /// filtered by `artifact_type` when given.
    pub async fn referrers(
        &self,
        name: &str,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<crate::referrers::ReferrersIndex, LookupError> {
        let query = crate::referrers::filter_query(artifact_type);
        self.first(name.as_bytes(), |base| {
            let url = format!("{base}/shoal/v1/referrers/{subject}/{name}{query}");
            async move { client::get_json(&self.http, &url, crate::referrers::MAX_REFERRERS_JSON).await }
        })
        .await
    }

    /// Announces and returns the peers to fetch from.
    pub async fn announce(&self, announce: &Announce) -> Result<AnnounceResponse, LookupError> {
        self.first(announce.digest.to_string().as_bytes(), |base| {
            let url = format!("{base}/shoal/v1/announce");
            async move {
                let transport =
                    |e: reqwest::Error| ClientError::Transport { url: url.clone(), cause: e.to_string() };
                let resp = self.http.post(&url).json(announce).send().await.map_err(transport)?;
                let body = client::read_limited(client::check(resp).await?, MAX_ANNOUNCE_JSON).await?;
                serde_json::from_slice(&body)
                    .map_err(|e| ClientError::Malformed { url: url.clone(), cause: e.to_string() })
            }
        })
        .await
    }

    /// Announces every blob of this peer at once; peer lists come back for the incomplete
    /// ones.
    pub async fn announce_batch(
        &self,
        batch: &client::AnnounceBatch,
    ) -> Result<client::AnnounceBatchResponse, LookupError> {
        // Each blob goes to its own tracker (the first on its ring), so one batch becomes one
        // request per tracker; the answers are merged.
        let mut groups: Vec<(&str, Vec<client::BlobState>)> = Vec::new();
        for blob in &batch.blobs {
            let primary = self.order(blob.digest.to_string().as_bytes()).first().copied().unwrap_or_default();
            match groups.iter_mut().find(|(t, _)| *t == primary) {
                Some((_, blobs)) => blobs.push(*blob),
                None => groups.push((primary, vec![*blob])),
            }
        }
        let mut merged: Option<client::AnnounceBatchResponse> = None;
        let mut last_error = None;
        for (_, blobs) in groups {
            let part = client::AnnounceBatch { peer: batch.peer, blobs };
            match self.announce_group(&part).await {
                Ok(resp) => match &mut merged {
                    Some(m) => m.swarms.extend(resp.swarms),
                    None => merged = Some(resp),
                },
                Err(e) => last_error = Some(e),
            }
        }
        match (merged, last_error) {
            (Some(m), _) => Ok(m),
            (None, Some(e)) => Err(e),
            (None, None) => Ok(client::AnnounceBatchResponse { interval: 10, swarms: Vec::new() }),
        }
    }

    /// One batch whose blobs share their first tracker, with fail-over along its ring.
    async fn announce_group(
        &self,
        batch: &client::AnnounceBatch,
    ) -> Result<client::AnnounceBatchResponse, LookupError> {
        let item = batch.blobs.first().map(|b| b.digest.to_string()).unwrap_or_default();
        self.first(item.as_bytes(), |base| {
            let url = format!("{base}/shoal/v1/announce/batch");
            async move {
                let transport =
                    |e: reqwest::Error| ClientError::Transport { url: url.clone(), cause: e.to_string() };
                let resp = self.http.post(&url).json(batch).send().await.map_err(transport)?;
                let body =
                    client::read_limited(client::check(resp).await?, client::MAX_ANNOUNCE_BATCH_JSON).await?;
                serde_json::from_slice(&body)
                    .map_err(|e| ClientError::Malformed { url: url.clone(), cause: e.to_string() })
            }
        })
        .await
    }

    /// Tells every tracker this peer no longer holds `leave.digests` (they may be spread
    /// over all of them). Fails only when no tracker took it.
    pub async fn leave(&self, leave: &client::Leave) -> Result<(), LookupError> {
        let mut last = None;
        let mut taken = false;
        for base in &self.urls {
            let url = format!("{base}/shoal/v1/leave");
            match self.http.post(&url).json(leave).send().await {
                Ok(resp) => match client::check(resp).await {
                    Ok(_) => taken = true,
                    Err(e) => last = Some(e.to_string()),
                },
                Err(e) => last = Some(format!("{url}: {e}")),
            }
        }
        match (taken, last) {
            (true, _) | (false, None) => Ok(()),
            (false, Some(e)) => Err(LookupError::Unavailable(e)),
        }
    }

    /// Whether some tracker answers its liveness check within `timeout`; the error says
    /// why none did.
    pub async fn reachable(&self, timeout: std::time::Duration) -> Result<(), String> {
        client::any_healthy(&self.http, &self.urls, timeout, "tracker").await
    }
}

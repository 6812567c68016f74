//! The client for the tracker(s), used by agents and origins: metainfo, tags and announces,
//! trying each configured tracker in turn when one is unreachable.

use crate::client::{
    self, Announce, AnnounceResponse, ClientError, TagResponse, MAX_ANNOUNCE_JSON, MAX_METAINFO_JSON,
};
use crate::digest::Digest;
use crate::metainfo::Metainfo;
use crate::oci::TagList;

/// A lookup answered by no tracker.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LookupError {
    #[error("unknown to the cluster")]
    NotFound,
    #[error("tracker unavailable: {0}")]
    Unavailable(String),
}

/// Talks to the configured trackers.
#[derive(Debug, Clone)]
pub struct TrackerClient {
    urls: Vec<String>,
    http: reqwest::Client,
}

impl TrackerClient {
    pub fn new(urls: &[String]) -> Self {
        let urls = urls.iter().map(|u| u.trim_end_matches('/').to_owned()).collect();
        Self { urls, http: client::http_client() }
    }

    async fn first<T, F, Fut>(&self, call: F) -> Result<T, LookupError>
    where
        F: Fn(String) -> Fut,
        Fut: std::future::Future<Output = Result<T, ClientError>>,
    {
        let mut last = String::from("no tracker configured");
        for base in &self.urls {
            match call(base.clone()).await {
                Ok(v) => return Ok(v),
                Err(ClientError::NotFound { .. }) => return Err(LookupError::NotFound),
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
        let m: Metainfo = self
            .first(|base| {
                let url = format!("{base}/shoal/v1/metainfo/{digest}");
                async move { client::get_json(&self.http, &url, MAX_METAINFO_JSON).await }
            })
            .await?;
        if m.digest() != digest {
            return Err(LookupError::Unavailable("tracker sent metainfo for another blob".into()));
        }
        Ok(m)
    }

    /// The digest `name:tag` points at.
    pub async fn tag(&self, name: &str, tag: &str) -> Result<Digest, LookupError> {
        let r: TagResponse = self
            .first(|base| {
                let url = format!("{base}/shoal/v1/tags/{name}/{tag}");
                async move { client::get_json(&self.http, &url, 4096).await }
            })
            .await?;
        Ok(r.digest)
    }

    /// The tags of `name` known to the cluster, sorted.
    pub async fn tag_list(&self, name: &str) -> Result<Vec<String>, LookupError> {
        let list: TagList = self
            .first(|base| {
                let url = format!("{base}/shoal/v1/taglist/{name}");
                async move { client::get_json(&self.http, &url, 4 << 20).await }
            })
            .await?;
        Ok(list.tags)
    }

    /// Announces and returns the peers to fetch from.
    pub async fn announce(&self, announce: &Announce) -> Result<AnnounceResponse, LookupError> {
        self.first(|base| {
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
        self.first(|base| {
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
}

//! The calls between origins on the request path: a blob or manifest just stored is written
//! to its other healthy owners before the push is answered (an owner that fails is suspected
//! and its place goes to the next member, once), a deletion goes to every healthy member, a
//! read this origin cannot answer is forwarded to the owners, and upstream fills are copied
//! as they arrive ([`replicate_fills`]).

use std::sync::Arc;

use actix_web::http::header;
use shoal_shared::digest::Digest;
use shoal_shared::store::BlobStore;
use tokio_util::sync::CancellationToken;

use super::{internal, Cluster, HOP_HEADER, REPLICA_REPO};

impl Cluster {
    /// Copies blob `digest` from `store` to `member` unless it holds it already.
    pub(super) async fn copy_blob(
        &self,
        store: &BlobStore,
        digest: &Digest,
        member: &str,
    ) -> Result<bool, String> {
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
    pub(super) async fn copy_manifest(
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

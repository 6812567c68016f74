//! The repair pass: every blob and tag this origin holds is copied to each healthy owner
//! that lacks it, and a copy this origin no longer owns is dropped after the handoff grace
//! once every owner holds it. [`maintain`] runs it, with the health probes and the `dns:`
//! resolution, until shutdown.

use std::path::Path;
use std::sync::Arc;

use shoal_shared::digest::Digest;
use shoal_shared::members::RESOLVE_EVERY;
use shoal_shared::ring;
use shoal_shared::store::BlobStore;
use tokio_util::sync::CancellationToken;

use super::{Cluster, PROBE_EVERY, REPAIR_EVERY};
use crate::tags::TagStore;

impl Cluster {
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

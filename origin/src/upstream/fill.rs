//! What the origin does with what an upstream sends, whichever [`Registry`] sent it: a
//! manifest is checked (schema 2 or OCI, bounded) and addressed by the digest of its bytes; a
//! blob body is streamed into a [`Staged`] upload, watched for progress chunk by chunk,
//! bounded by what a metainfo can describe, checked against the length the upstream declared,
//! and published only when its sha256 is the digest asked for. On every failure the upload is
//! dropped and the marks written for it (pulled-through, private) are taken back, so a failed
//! fill leaves nothing behind.

use std::time::Duration;

use futures_util::StreamExt;
use shoal_shared::digest::Digest;
use shoal_shared::oci::{manifest_media_type, MAX_MANIFEST};
use shoal_shared::store::{BlobStore, Staged, StoreError};
use shoal_shared::tenant::PrivateRepo;

use super::registry::{BlobBody, Registry};
use super::UpstreamError;
use crate::private::PrivateMarks;

/// Where upstream content goes, and how long a body may make no progress.
#[derive(Debug, Clone)]
pub(super) struct Filler {
    pub store: BlobStore,
    pub marks: PrivateMarks,
    pub piece_length: u32,
    pub stall: Duration,
    /// Told of every blob and manifest stored (see `Upstreams::notify_fills`).
    pub filled: Option<tokio::sync::mpsc::Sender<Digest>>,
}

/// Fetches manifest `name:reference` from `up` and checks it: its bytes and their digest.
/// Schema 1 is refused.
pub(super) async fn manifest(
    up: &dyn Registry,
    name: &str,
    reference: &str,
) -> Result<(Vec<u8>, Digest), UpstreamError> {
    let body = up.get_manifest(name, reference).await?;
    if body.len() > MAX_MANIFEST {
        return Err(UpstreamError::TooLarge { limit: MAX_MANIFEST });
    }
    if manifest_media_type(&body).is_none() {
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Version {
            schema_version: Option<u32>,
        }
        let v = serde_json::from_slice::<Version>(&body).ok().and_then(|v| v.schema_version);
        let at = format!("{}/{name}:{reference}", up.host());
        return Err(if v == Some(1) {
            UpstreamError::Schema1(at)
        } else {
            UpstreamError::Invalid(format!("{at} is not a manifest"))
        });
    }
    let digest = Digest::of(&body);
    Ok((body, digest))
}

impl Filler {
    /// Stores a manifest fetched and checked by [`manifest`], unless it is held already.
    pub async fn put(
        &self,
        body: &[u8],
        digest: &Digest,
        private: Option<&PrivateRepo>,
    ) -> Result<(), UpstreamError> {
        if self.store.size(digest).await.is_some() {
            return Ok(());
        }
        let mut staged = self.store.stage(self.piece_length).await.map_err(UpstreamError::Store)?;
        staged.write(body).await.map_err(UpstreamError::Store)?;
        self.publish(staged, digest, private).await.map_err(UpstreamError::Store)
    }

    /// Streams blob `digest` of repository `name` from `up` into the store; returns its
    /// length.
    pub async fn blob(&self, up: &dyn Registry, name: &str, digest: &Digest) -> Result<u64, UpstreamError> {
        let body = up.get_blob(name, digest).await?;
        // The most a metainfo can describe at this piece length; a lying or broken upstream
        // must not fill the disk.
        let max = u64::from(self.piece_length) * shoal_shared::metainfo::MAX_PIECES;
        if body.length.is_some_and(|n| n > max) {
            return Err(UpstreamError::TooLarge { limit: usize::try_from(max).unwrap_or(usize::MAX) });
        }
        let mut staged = self.store.stage(self.piece_length).await.map_err(UpstreamError::Store)?;
        if let Err(e) = self.stream(up.host(), body, &mut staged, max).await {
            staged.abort().await;
            return Err(e);
        }
        let len = staged.len();
        let private = super::privacy(up, &self.marks, name).await;
        match self.publish(staged, digest, private.as_ref()).await {
            Ok(()) => Ok(len),
            Err(StoreError::DigestMismatch { actual, .. }) => {
                Err(UpstreamError::Invalid(format!("{}: {digest} has digest {actual}", up.host())))
            }
            Err(e) => Err(UpstreamError::Store(e)),
        }
    }

    /// Writes `body` into `staged`: each chunk within the stall timeout, at most `max` bytes
    /// in all, and as many as the upstream declared.
    async fn stream(
        &self,
        host: &str,
        body: BlobBody,
        staged: &mut Staged,
        max: u64,
    ) -> Result<(), UpstreamError> {
        let BlobBody { length, mut chunks } = body;
        loop {
            let chunk = match tokio::time::timeout(self.stall, chunks.next()).await {
                Ok(Some(chunk)) => chunk?,
                Ok(None) => break,
                Err(_) => {
                    return Err(UpstreamError::Stalled { host: host.to_owned(), secs: self.stall.as_secs() })
                }
            };
            if staged.len() + chunk.len() as u64 > max {
                return Err(UpstreamError::TooLarge { limit: usize::try_from(max).unwrap_or(usize::MAX) });
            }
            staged.write(&chunk).await.map_err(UpstreamError::Store)?;
        }
        match length {
            Some(declared) if staged.len() < declared => {
                Err(UpstreamError::Truncated { host: host.to_owned(), received: staged.len(), declared })
            }
            Some(declared) if staged.len() > declared => Err(UpstreamError::Invalid(format!(
                "{host}: a body of {} bytes declared as {declared}",
                staged.len()
            ))),
            _ => Ok(()),
        }
    }

    /// Marks `digest` (private, pulled through) and publishes it: the marks go first, so no
    /// answer about the content can miss them, and are taken back when the commit fails.
    async fn publish(
        &self,
        staged: Staged,
        digest: &Digest,
        private: Option<&PrivateRepo>,
    ) -> Result<(), StoreError> {
        // Failing closed: content whose private mark cannot be written is not stored.
        if let Some(repo) = private {
            if let Err(e) = self.marks.mark_blob(digest, repo).await {
                staged.abort().await;
                return Err(StoreError::Io { path: "private marker".into(), source: e });
            }
        }
        crate::retention::mark_pulled(&self.store, digest).await;
        if let Err(e) = staged.commit(digest).await {
            crate::retention::unmark_pulled(&self.store, digest).await;
            // Left behind, the mark would make the digest private to this repository when
            // its real content is later pulled from a public one (the first mark decides).
            if private.is_some() {
                self.marks.unmark_blob(digest).await;
            }
            return Err(e);
        }
        if let Some(tx) = &self.filled {
            // A full queue leaves it to the repair pass.
            let _ = tx.try_send(*digest);
        }
        Ok(())
    }
}

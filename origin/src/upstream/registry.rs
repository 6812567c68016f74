//! The seam between the origin and an upstream registry: [`Registry`], what the pull-through
//! code asks of an upstream, and nothing of how it is asked. The real implementation is the
//! HTTP client with token auth ([`super::client::Upstream`]); tests use an in-memory one that
//! fails on demand (`super::memory::MemoryRegistry`), as mountpoint-s3 tests its prefetcher
//! over `mock_client.rs` and `failure_client.rs`.
//!
//! The line between the two sides: an implementation sends requests, answers auth
//! challenges, bounds each of its round trips by the stall timeout and turns statuses into
//! [`UpstreamError`]s ([`status_error`]). Everything that makes a response safe to keep is on
//! the origin's side, so no implementation can skip it: manifests are checked and addressed by
//! the digest of their bytes, blob bodies are watched for progress chunk by chunk, bounded in
//! size, checked against their declared length and stored only when their sha256 matches
//! (`super::fill`).

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use shoal_shared::digest::Digest;

use super::{auth, UpstreamError};

/// A blob body as an upstream sends it.
pub struct BlobBody {
    /// The length the upstream declared (`Content-Length`), if it did.
    pub length: Option<u64>,
    /// The bytes, in order; an error ends the body.
    pub chunks: BoxStream<'static, Result<Bytes, UpstreamError>>,
}

impl std::fmt::Debug for BlobBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobBody").field("length", &self.length).finish_non_exhaustive()
    }
}

/// One upstream registry, as the pull-through code uses it.
///
/// Held as `Arc<dyn Registry>` rather than as a type parameter of
/// [`Upstreams`](super::Upstreams): `Upstreams` lives in the origin's `AppState`, so a
/// parameter would spread to every handler, the cluster and the prefetcher for the sake of
/// one boxed future per upstream request, a cost lost in a network round trip. (The durable
/// store's [`Backing`](shoal_shared::store::backing::Backing) is a trait object for the same
/// reason.)
pub trait Registry: std::fmt::Debug + Send + Sync + 'static {
    /// `host[:port]`: the registry name containerd's `ns` and image references use.
    fn host(&self) -> &str;

    /// True when containerd's `ns` names this registry.
    fn serves(&self, ns: &str) -> bool {
        auth::normalize_host(ns) == auth::normalize_host(self.host())
    }

    /// Whether repository `name` was refused without credentials and served with them since
    /// this process started (see [`crate::private`]).
    fn learned_private(&self, name: &str) -> bool;

    /// The digest the registry says `name:reference` has (a HEAD), used only to tell whether
    /// a cached tag is still current: nothing is stored under it.
    fn head_manifest<'a>(
        &'a self,
        name: &'a str,
        reference: &'a str,
    ) -> BoxFuture<'a, Result<Option<Digest>, UpstreamError>>;

    /// The bytes of manifest `name:reference` (schema 2 and OCI asked for), at most
    /// [`MAX_MANIFEST`](shoal_shared::oci::MAX_MANIFEST); unchecked.
    fn get_manifest<'a>(
        &'a self,
        name: &'a str,
        reference: &'a str,
    ) -> BoxFuture<'a, Result<Vec<u8>, UpstreamError>>;

    /// The body of blob `digest` of repository `name` (or of the manifest with that digest,
    /// when the registry keeps it only as a manifest); unchecked.
    fn get_blob<'a>(
        &'a self,
        name: &'a str,
        digest: &'a Digest,
    ) -> BoxFuture<'a, Result<BlobBody, UpstreamError>>;
}

/// The error an upstream's non-success status is, for every implementation alike.
pub fn status_error(host: &str, status: u16) -> UpstreamError {
    match status {
        404 => UpstreamError::NotFound,
        401 => UpstreamError::Unauthorized(format!("{host} refused the credentials")),
        403 => UpstreamError::Denied(host.to_owned()),
        status => UpstreamError::Status { host: host.to_owned(), status },
    }
}
